/*
 * tokenizer: loading from GGUF metadata, special-token matching, decoding and the public API.
 * The two models live in tokenizer_bpe.c and tokenizer_spm.c.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "engine/tokenizer_int.h"

/* Anything larger is not a tokenizer we can index with int32 ids and uint32 offsets. */
#define TOK_MAX_VOCAB (1 << 24)
#define TOK_MAX_TEXT_LEN ((size_t)1 << 29) /* 512 MiB of input per encode call */

/* Control tokens that end a turn in common chat formats, besides the file's EOS/EOT ids. */
static const char *const eog_texts[] = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|eom_id|>",
    "<EOT>",
    "<|return|>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
};

/* ---- Allocation (with a test hook that fails the Nth call) ---- */

static _Atomic long alloc_fail_countdown;

void
eng_tok_test_fail_alloc(long n)
{
    atomic_store(&alloc_fail_countdown, n);
}

static bool
alloc_should_fail(void)
{
    long c = atomic_load_explicit(&alloc_fail_countdown, memory_order_relaxed);
    while (c > 0)
        if (atomic_compare_exchange_weak(&alloc_fail_countdown, &c, c - 1))
            return c == 1;
    return false;
}

void *
tok_malloc(size_t n)
{
    return alloc_should_fail() ? NULL : malloc(n ? n : 1);
}

void *
tok_calloc(size_t count, size_t size)
{
    return alloc_should_fail() ? NULL : calloc(count ? count : 1, size ? size : 1);
}

void *
tok_realloc(void *p, size_t n)
{
    return alloc_should_fail() ? NULL : realloc(p, n ? n : 1);
}

/* ---- Small shared helpers ---- */

int
tok_ids_push(struct tok_ids *ids, int32_t id)
{
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? 2 * ids->cap : 64;
        int32_t *v = tok_realloc(ids->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        ids->v = v;
        ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return 0;
}

uint32_t
tok_hash(const char *s, size_t len)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

int32_t
tok_text_find(const struct eng_tok *t, const char *s, size_t len)
{
    const struct tok_text_map *m = &t->text_map;
    for (uint32_t i = tok_hash(s, len) & m->mask;; i = (i + 1) & m->mask) {
        int32_t id = m->slots[i];
        if (id < 0)
            return -1;
        if (t->text_len[id] == len && memcmp(t->text_blob + t->text_off[id], s, len) == 0)
            return id;
    }
}

size_t
tok_utf8_seq_len(const unsigned char *s, size_t len)
{
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0)
            lo = 0xA0; /* no overlongs */
        else if (c == 0xED)
            hi = 0x9F; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F; /* <= U+10FFFF */
    } else {
        return 0;
    }
    if (len < n || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    return n;
}

static void set_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
set_err(char *err, size_t err_len, const char *fmt, ...)
{
    if (!err || err_len == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

/* ---- Loading ---- */

static int
read_kind(const struct eng_gguf *g, struct eng_tok *t, char *err, size_t err_len)
{
    struct eng_gguf_str s;
    if (eng_gguf_get_str(g, "tokenizer.ggml.model", &s) < 0) {
        set_err(err, err_len, "tokenizer.ggml.model is missing or not a string");
        return -EBADMSG;
    }
    if (eng_gguf_str_eq(s, "gpt2")) {
        t->kind = ENG_TOK_BPE;
    } else if (eng_gguf_str_eq(s, "llama")) {
        t->kind = ENG_TOK_SPM;
    } else {
        set_err(err, err_len, "tokenizer.ggml.model '%.*s' is not supported (gpt2, llama)",
                (int)(s.len > 32 ? 32 : s.len), s.data);
        return -ENOTSUP;
    }
    int rc = eng_gguf_get_str(g, "tokenizer.ggml.pre", &s);
    if (rc == -ENOENT) {
        if (t->kind == ENG_TOK_BPE)
            CM_LOG(CM_LOG_WARN, "tokenizer: no tokenizer.ggml.pre, using the GPT-2 split");
        snprintf(t->pre, sizeof(t->pre), "default");
    } else if (rc < 0 || s.len >= sizeof(t->pre) || memchr(s.data, '\0', s.len)) {
        set_err(err, err_len, "tokenizer.ggml.pre is not a short string");
        return -EBADMSG;
    } else {
        memcpy(t->pre, s.data, s.len);
        t->pre[s.len] = '\0';
    }
    return 0;
}

/* Optional numeric array of n elements: -ENOENT when absent, -EBADMSG when malformed. */
static int
get_num_arr(const struct eng_gguf *g, const char *key, bool want_float, uint64_t n,
            struct eng_gguf_arr *a, char *err, size_t err_len)
{
    int rc = eng_gguf_get_arr(g, key, a);
    if (rc == -ENOENT)
        return rc;
    bool is_float = rc == 0 && (a->type == ENG_GGUF_F32 || a->type == ENG_GGUF_F64);
    bool is_int = rc == 0 && a->type != ENG_GGUF_STRING && a->type != ENG_GGUF_ARRAY &&
                  a->type != ENG_GGUF_BOOL && !is_float;
    if (rc < 0 || (want_float ? !is_float : !is_int) || a->n != n) {
        set_err(err, err_len, "%s is not an array of %llu %s values", key, (unsigned long long)n,
                want_float ? "float" : "integer");
        return -EBADMSG;
    }
    return 0;
}

static int
load_texts(struct eng_tok *t, const struct eng_gguf_arr *tokens, char *err, size_t err_len)
{
    uint64_t total = 0;
    for (uint64_t i = 0; i < tokens->n; i++)
        total += tokens->strs[i].len;
    if (total > UINT32_MAX - 1) {
        set_err(err, err_len, "tokenizer.ggml.tokens: %llu bytes of text is too much",
                (unsigned long long)total);
        return -EBADMSG;
    }
    size_t n = tokens->n;
    t->text_blob = tok_malloc(total + 1);
    t->piece_blob = tok_malloc(total + 1);
    t->text_off = tok_malloc(n * sizeof(*t->text_off));
    t->text_len = tok_malloc(n * sizeof(*t->text_len));
    t->piece_off = tok_malloc(n * sizeof(*t->piece_off));
    t->piece_len = tok_malloc(n * sizeof(*t->piece_len));
    t->type = tok_malloc(n);
    t->flags = tok_calloc(n, 1);
    size_t cap = 1;
    while (cap < 2 * n)
        cap <<= 1;
    t->text_map.slots = tok_malloc(cap * sizeof(*t->text_map.slots));
    if (!t->text_blob || !t->piece_blob || !t->text_off || !t->text_len || !t->piece_off ||
        !t->piece_len || !t->type || !t->flags || !t->text_map.slots)
        return -ENOMEM;
    t->text_map.mask = (uint32_t)(cap - 1);
    memset(t->text_map.slots, 0xff, cap * sizeof(*t->text_map.slots));
    uint32_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const struct eng_gguf_str *s = &tokens->strs[i];
        memcpy(t->text_blob + off, s->data, s->len);
        t->text_off[i] = off;
        t->text_len[i] = (uint32_t)s->len;
        off += (uint32_t)s->len;
        /* A repeated text maps to its last id, as a Hugging Face vocab dict built in order does. */
        struct tok_text_map *m = &t->text_map;
        for (uint32_t h = tok_hash(s->data, s->len) & m->mask;; h = (h + 1) & m->mask) {
            int32_t id = m->slots[h];
            if (id < 0 || (t->text_len[id] == s->len &&
                           memcmp(t->text_blob + t->text_off[id], s->data, s->len) == 0)) {
                m->slots[h] = (int32_t)i;
                break;
            }
        }
    }
    return 0;
}

static int
load_types_scores(const struct eng_gguf *g, struct eng_tok *t, char *err, size_t err_len)
{
    struct eng_gguf_arr a;
    int rc =
        get_num_arr(g, "tokenizer.ggml.token_type", false, (uint64_t)t->n_vocab, &a, err, err_len);
    if (rc < 0 && rc != -ENOENT)
        return rc;
    for (int i = 0; i < t->n_vocab; i++) {
        int64_t v = rc == 0 ? eng_gguf_arr_i64(&a, (uint64_t)i) : TOK_TYPE_NORMAL;
        t->type[i] = v >= 0 && v <= TOK_TYPE_BYTE ? (uint8_t)v : TOK_TYPE_UNDEFINED;
    }
    if (t->kind != ENG_TOK_SPM)
        return 0;
    t->score = tok_calloc((size_t)t->n_vocab, sizeof(*t->score));
    if (!t->score)
        return -ENOMEM;
    rc = get_num_arr(g, "tokenizer.ggml.scores", true, (uint64_t)t->n_vocab, &a, err, err_len);
    if (rc == -ENOENT)
        return 0; /* all pieces equal: merges go leftmost first */
    if (rc < 0)
        return rc;
    for (int i = 0; i < t->n_vocab; i++)
        t->score[i] = eng_gguf_arr_f32(&a, (uint64_t)i);
    return 0;
}

/* An optional token id: -1 when absent, -EBADMSG when not a valid id. */
static int
get_id(const struct eng_gguf *g, const struct eng_tok *t, const char *key, int32_t *out, char *err,
       size_t err_len)
{
    int64_t v;
    int rc = eng_gguf_get_i64(g, key, &v);
    *out = -1;
    if (rc == -ENOENT)
        return 0;
    if (rc < 0 || v >= t->n_vocab) {
        set_err(err, err_len, "%s is not a token id below %d", key, t->n_vocab);
        return -EBADMSG;
    }
    if (v >= 0)
        *out = (int32_t)v;
    return 0;
}

static int
load_special_ids(const struct eng_gguf *g, struct eng_tok *t, char *err, size_t err_len)
{
    int32_t eom;
    int rc = get_id(g, t, "tokenizer.ggml.bos_token_id", &t->bos, err, err_len);
    if (rc == 0)
        rc = get_id(g, t, "tokenizer.ggml.eos_token_id", &t->eos, err, err_len);
    if (rc == 0)
        rc = get_id(g, t, "tokenizer.ggml.eot_token_id", &t->eot, err, err_len);
    if (rc == 0)
        rc = get_id(g, t, "tokenizer.ggml.eom_token_id", &eom, err, err_len);
    if (rc == 0)
        rc = get_id(g, t, "tokenizer.ggml.unknown_token_id", &t->unk, err, err_len);
    if (rc < 0)
        return rc;
    t->add_bos = t->kind == ENG_TOK_SPM;
    t->add_space_prefix = t->kind == ENG_TOK_SPM;
    bool b;
    if (eng_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b) == 0)
        t->add_bos = b;
    if (t->kind == ENG_TOK_SPM && eng_gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &b) == 0)
        t->add_space_prefix = b;
    int32_t ends[] = {t->eos, t->eot, eom};
    for (size_t i = 0; i < sizeof(ends) / sizeof(ends[0]); i++)
        if (ends[i] >= 0)
            t->flags[ends[i]] |= TOK_F_EOG;
    return 0;
}

static int
hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* The byte of a "<0xXX>" text, or -1. */
static int
byte_token_value(const char *s, size_t len)
{
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    int hi = hex_digit(s[3]), lo = hex_digit(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

/* Flags from the token types, and the decoded bytes of every token. */
static void
build_pieces(struct eng_tok *t)
{
    uint32_t off = 0;
    for (int i = 0; i < t->n_vocab; i++) {
        const char *text = t->text_blob + t->text_off[i];
        size_t len = t->text_len[i];
        char *dst = t->piece_blob + off;
        size_t n;
        uint8_t type = t->type[i];
        uint8_t f = t->flags[i];
        if (type == TOK_TYPE_CONTROL || type == TOK_TYPE_UNKNOWN || type == TOK_TYPE_UNUSED)
            f |= TOK_F_RENDER_SPECIAL;
        if (len > 0 && (type == TOK_TYPE_CONTROL || type == TOK_TYPE_UNKNOWN))
            f |= TOK_F_MATCH_SPECIAL;
        if (len > 0 && type == TOK_TYPE_USER_DEFINED)
            f |= TOK_F_MATCH_ALWAYS;
        if (t->kind == ENG_TOK_SPM && (type == TOK_TYPE_NORMAL || type == TOK_TYPE_USER_DEFINED ||
                                       type == TOK_TYPE_UNDEFINED))
            f |= TOK_F_SPM_USABLE;
        if (type == TOK_TYPE_CONTROL || type == TOK_TYPE_USER_DEFINED)
            for (size_t k = 0; k < sizeof(eog_texts) / sizeof(eog_texts[0]); k++)
                if (strlen(eog_texts[k]) == len && memcmp(eog_texts[k], text, len) == 0)
                    f |= TOK_F_EOG;
        t->flags[i] = f;

        int byte;
        if (f & TOK_F_RENDER_SPECIAL || type == TOK_TYPE_USER_DEFINED) {
            memcpy(dst, text, len); /* added tokens decode to their text as written */
            n = len;
        } else if (t->kind == ENG_TOK_SPM && type == TOK_TYPE_BYTE &&
                   (byte = byte_token_value(text, len)) >= 0) {
            dst[0] = (char)byte;
            n = 1;
        } else if (t->kind == ENG_TOK_SPM) {
            n = tok_spm_decode_text(text, len, dst);
        } else {
            n = tok_bpe_decode_text(text, len, dst);
        }
        t->piece_off[i] = off;
        t->piece_len[i] = (uint32_t)n;
        off += (uint32_t)n;
    }
}

static int
cmp_special(const void *a, const void *b, void *arg)
{
    const struct eng_tok *t = arg;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    unsigned char fx = (unsigned char)t->text_blob[t->text_off[x]];
    unsigned char fy = (unsigned char)t->text_blob[t->text_off[y]];
    if (fx != fy)
        return fx < fy ? -1 : 1;
    if (t->text_len[x] != t->text_len[y])
        return t->text_len[x] > t->text_len[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

static int
build_specials(struct eng_tok *t)
{
    size_t n = 0;
    for (int i = 0; i < t->n_vocab; i++)
        if (t->flags[i] & (TOK_F_MATCH_SPECIAL | TOK_F_MATCH_ALWAYS))
            n++;
    t->special_ids = tok_malloc((n ? n : 1) * sizeof(*t->special_ids));
    if (!t->special_ids)
        return -ENOMEM;
    n = 0;
    for (int i = 0; i < t->n_vocab; i++)
        if (t->flags[i] & (TOK_F_MATCH_SPECIAL | TOK_F_MATCH_ALWAYS))
            t->special_ids[n++] = i;
    qsort_r(t->special_ids, n, sizeof(*t->special_ids), cmp_special, t);
    size_t k = 0;
    for (int b = 0; b < 256; b++) {
        t->special_start[b] = (uint32_t)k;
        while (k < n && (unsigned char)t->text_blob[t->text_off[t->special_ids[k]]] == b)
            k++;
    }
    t->special_start[256] = (uint32_t)k;
    return 0;
}

static int
load_vocab(const struct eng_gguf *g, struct eng_tok *t, char *err, size_t err_len)
{
    struct eng_gguf_arr tokens;
    int rc = eng_gguf_get_arr(g, "tokenizer.ggml.tokens", &tokens);
    if (rc < 0 || tokens.type != ENG_GGUF_STRING || tokens.n == 0 || tokens.n > TOK_MAX_VOCAB) {
        set_err(err, err_len, "tokenizer.ggml.tokens is missing or not 1..%d strings",
                TOK_MAX_VOCAB);
        return -EBADMSG;
    }
    t->n_vocab = (int)tokens.n;
    rc = load_texts(t, &tokens, err, err_len);
    if (rc == 0)
        rc = load_types_scores(g, t, err, err_len);
    if (rc == 0)
        rc = load_special_ids(g, t, err, err_len);
    return rc;
}

static int
init_model(const struct eng_gguf *g, struct eng_tok *t, char *err, size_t err_len)
{
    if (t->kind == ENG_TOK_SPM)
        return tok_spm_init(t);
    struct eng_gguf_arr merges;
    int rc = eng_gguf_get_arr(g, "tokenizer.ggml.merges", &merges);
    if (rc < 0 || merges.type != ENG_GGUF_STRING || merges.n > (uint64_t)INT32_MAX / 4) {
        set_err(err, err_len, "tokenizer.ggml.merges is missing or not a string array");
        return -EBADMSG;
    }
    return tok_bpe_init(t, &merges, err, err_len);
}

int
eng_tok_new(const struct eng_gguf *g, struct eng_tok **out, char *err, size_t err_len)
{
    char buf[256];
    if (!err || err_len == 0) {
        err = buf;
        err_len = sizeof(buf);
    }
    err[0] = '\0';
    struct eng_tok *t = tok_calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    int rc = read_kind(g, t, err, err_len);
    if (rc == 0)
        rc = load_vocab(g, t, err, err_len);
    if (rc == 0)
        rc = init_model(g, t, err, err_len);
    if (rc == 0) {
        build_pieces(t);
        rc = build_specials(t);
    }
    if (rc < 0) {
        if (rc == -ENOMEM && err[0] == '\0')
            set_err(err, err_len, "out of memory loading the tokenizer");
        eng_tok_free(t);
        return rc;
    }
    CM_LOG(CM_LOG_DEBUG, "tokenizer: model=%s pre=%s n_vocab=%d bos=%d eos=%d eot=%d specials=%u",
           t->kind == ENG_TOK_BPE ? "bpe" : "spm", t->pre, t->n_vocab, t->bos, t->eos, t->eot,
           t->special_start[256]);
    *out = t;
    return 0;
}

void
eng_tok_free(struct eng_tok *t)
{
    if (!t)
        return;
    if (t->kind == ENG_TOK_BPE)
        tok_bpe_fini(t);
    free(t->text_blob);
    free(t->text_off);
    free(t->text_len);
    free(t->piece_blob);
    free(t->piece_off);
    free(t->piece_len);
    free(t->type);
    free(t->flags);
    free(t->score);
    free(t->text_map.slots);
    free(t->special_ids);
    free(t);
}

/* ---- Encoding ---- */

/* The longest added token at s[0..len) that may be matched, or 0. */
static size_t
special_at(const struct eng_tok *t, const char *s, size_t len, bool parse_special, int32_t *id)
{
    unsigned char b = (unsigned char)s[0];
    for (uint32_t k = t->special_start[b]; k < t->special_start[b + 1]; k++) {
        int32_t i = t->special_ids[k];
        size_t n = t->text_len[i];
        if (n > len || memcmp(t->text_blob + t->text_off[i], s, n) != 0)
            continue;
        if (!parse_special && !(t->flags[i] & TOK_F_MATCH_ALWAYS))
            continue;
        *id = i;
        return n;
    }
    return 0;
}

static int
encode_raw(const struct eng_tok *t, const char *s, size_t len, bool after_special,
           struct tok_ids *ids)
{
    if (t->kind == ENG_TOK_SPM)
        return tok_spm_encode(t, s, len, t->add_space_prefix && after_special, ids);
    return tok_bpe_encode(t, s, len, ids);
}

int
eng_tok_encode(const struct eng_tok *t, const char *text, size_t len, bool add_bos,
               bool parse_special, int32_t **ids_out, int *n_out)
{
    struct tok_ids ids = {0};
    int rc = 0;
    if (len > TOK_MAX_TEXT_LEN) {
        rc = -ENOMEM;
        goto out;
    }
    if (add_bos && t->add_bos && t->bos >= 0 && (rc = tok_ids_push(&ids, t->bos)) < 0)
        goto out;
    /* SentencePiece prefixes a space to the text at the start and after each added token. */
    bool after_special = true;
    size_t seg = 0;
    for (size_t i = 0; i < len;) {
        int32_t id = -1;
        unsigned char b = (unsigned char)text[i];
        size_t n = t->special_start[b] < t->special_start[b + 1]
                       ? special_at(t, text + i, len - i, parse_special, &id)
                       : 0;
        if (n == 0) {
            i++;
            continue;
        }
        if (i > seg && (rc = encode_raw(t, text + seg, i - seg, after_special, &ids)) < 0)
            goto out;
        if ((rc = tok_ids_push(&ids, id)) < 0)
            goto out;
        after_special = true;
        i += n;
        seg = i;
    }
    if (seg < len && (rc = encode_raw(t, text + seg, len - seg, after_special, &ids)) < 0)
        goto out;
    if (ids.n > (size_t)INT32_MAX) {
        rc = -ENOMEM;
        goto out;
    }
    if (!ids.v && (rc = tok_ids_push(&ids, 0)) == 0)
        ids.n = 0; /* an empty result is still a buffer the caller frees */
    if (rc < 0)
        goto out;
    *ids_out = ids.v;
    *n_out = (int)ids.n;
    ids.v = NULL;
out:
    free(ids.v);
    return rc;
}

/* ---- Decoding ---- */

size_t
eng_tok_piece(const struct eng_tok *t, int32_t id, bool render_special, const char **bytes)
{
    *bytes = "";
    if (id < 0 || id >= t->n_vocab)
        return 0;
    if ((t->flags[id] & TOK_F_RENDER_SPECIAL) && !render_special)
        return 0;
    *bytes = t->piece_blob + t->piece_off[id];
    return t->piece_len[id];
}

int
eng_tok_decode(const struct eng_tok *t, const int32_t *ids, int n, bool render_special, char **out,
               size_t *len_out)
{
    size_t total = 0;
    const char *p;
    for (int i = 0; i < n; i++)
        total += eng_tok_piece(t, ids[i], render_special, &p);
    char *buf = tok_malloc(total + 1);
    if (!buf)
        return -ENOMEM;
    /* SentencePiece: the space the encoder prefixed sits at the start of the first text token. */
    bool strip = t->kind == ENG_TOK_SPM && t->add_space_prefix;
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        size_t len = eng_tok_piece(t, ids[i], render_special, &p);
        if (strip && ids[i] >= 0 && ids[i] < t->n_vocab &&
            !(t->flags[ids[i]] & TOK_F_RENDER_SPECIAL)) {
            strip = false;
            if (len > 0 && p[0] == ' ') {
                p++;
                len--;
            }
        }
        memcpy(buf + o, p, len);
        o += len;
    }
    buf[o] = '\0';
    *out = buf;
    *len_out = o;
    return 0;
}

size_t
eng_tok_utf8_complete(const char *buf, size_t len)
{
    const unsigned char *s = (const unsigned char *)buf;
    /* Find the start of the last character: at most 3 continuation bytes back. */
    size_t i = len, back = 0;
    while (i > 0 && back < 4 && (s[i - 1] & 0xC0) == 0x80) {
        i--;
        back++;
    }
    if (i == 0 || back >= 4)
        return len; /* only continuation bytes: invalid, so complete */
    size_t lead = i - 1;
    unsigned char c = s[lead];
    size_t need = c >= 0xC2 && c <= 0xDF   ? 2
                  : c >= 0xE0 && c <= 0xEF ? 3
                  : c >= 0xF0 && c <= 0xF4 ? 4
                                           : 0;
    size_t have = len - lead;
    if (need == 0 || have >= need)
        return len; /* ASCII, an invalid lead byte, or a whole (or over-long, invalid) sequence */
    /* Hold the tail back only if it can still become a valid character. */
    if (have >= 2) {
        unsigned char s1 = s[lead + 1];
        if ((c == 0xE0 && s1 < 0xA0) || (c == 0xED && s1 > 0x9F) || (c == 0xF0 && s1 < 0x90) ||
            (c == 0xF4 && s1 > 0x8F))
            return len;
    }
    return lead;
}

/* ---- Queries ---- */

enum eng_tok_kind
eng_tok_kind(const struct eng_tok *t)
{
    return t->kind;
}

const char *
eng_tok_pre(const struct eng_tok *t)
{
    return t->pre;
}

int
eng_tok_n_vocab(const struct eng_tok *t)
{
    return t->n_vocab;
}

int32_t
eng_tok_bos(const struct eng_tok *t)
{
    return t->bos;
}

int32_t
eng_tok_eos(const struct eng_tok *t)
{
    return t->eos;
}

bool
eng_tok_add_bos(const struct eng_tok *t)
{
    return t->add_bos && t->bos >= 0;
}

bool
eng_tok_is_eog(const struct eng_tok *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab && (t->flags[id] & TOK_F_EOG);
}

int32_t
eng_tok_find(const struct eng_tok *t, const char *s)
{
    return tok_text_find(t, s, strlen(s));
}

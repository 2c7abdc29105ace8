/*
 * tokenizer_bpe: byte-level BPE (tokenizer.ggml.model = "gpt2").
 *
 * Encoding a piece of text: split it into maximal valid UTF-8 runs and runs of invalid bytes; run
 * the pre-tokenizer regexes over each valid run (each regex splits every piece the previous one
 * produced into its matches and the unmatched text between them, as Hugging Face's
 * Split(behavior="isolated") and llama.cpp's regex sequence do); every resulting word, and every
 * invalid run, is then merged on its own: its bytes start as the tokens of their byte-level
 * characters, and the adjacent pair with the lowest merge rank (the leftmost on a tie) is merged
 * until no pair has a merge.
 */
#define PCRE2_CODE_UNIT_WIDTH 8

#include <errno.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "engine/gguf.h"
#include "engine/tokenizer_int.h"

/* ---- Pre-tokenizer regexes ---- */

/* The GPT-2 split (Hugging Face's ByteLevel pre-tokenizer with use_regex). */
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
/* Every digit alone (Hugging Face's Digits(individual_digits=true)). */
#define RE_DIGIT "\\p{N}"
#define RE_LLAMA3                                                                                  \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"                       \
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_QWEN2                                                                                   \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"                            \
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

#define PRE_MAX_NAMES 12

struct pre_family {
    const char *re[TOK_MAX_RE]; /* applied in order, NULL-terminated when shorter */
    bool ignore_merges;
    const char *names[PRE_MAX_NAMES];
};

/* tokenizer.ggml.pre names (llama.cpp's) and the split each model's own tokenizer.json does.
 * "default" (and a file without the key) is the plain GPT-2 split, as in a GPT-2 tokenizer.json. */
static const struct pre_family pre_families[] = {
    {{RE_GPT2}, false, {"gpt-2", "default", "mpt", "olmo", "jais"}},
    {{RE_DIGIT, RE_GPT2},
     false,
     {"starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva"}},
    {{RE_LLAMA3},
     true,
     {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"}},
    {{RE_LLAMA3}, false, {"dbrx", "smaug-bpe"}},
    {{RE_QWEN2}, false, {"qwen2", "deepseek-r1-qwen", "megrez"}},
};

static const struct pre_family *
pre_lookup(const char *name)
{
    for (size_t f = 0; f < sizeof(pre_families) / sizeof(pre_families[0]); f++)
        for (size_t i = 0; i < PRE_MAX_NAMES && pre_families[f].names[i]; i++)
            if (strcmp(pre_families[f].names[i], name) == 0)
                return &pre_families[f];
    return NULL;
}

/* PCRE2's \s in UCP mode also matches U+180E, which Unicode's White_Space (what Oniguruma, Rust
 * and llama.cpp use for \s) does not; spell \s and \S as the property instead. */
static char *
re_expand_ws(const char *re)
{
    size_t n = strlen(re);
    char *out = tok_malloc(n * 16 + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (re[i] == '\\' && i + 1 < n && (re[i + 1] == 's' || re[i + 1] == 'S')) {
            const char *rep = re[i + 1] == 's' ? "\\p{White_Space}" : "\\P{White_Space}";
            memcpy(out + o, rep, strlen(rep));
            o += strlen(rep);
            i++;
        } else if (re[i] == '\\' && i + 1 < n) {
            out[o++] = re[i++];
            out[o++] = re[i];
        } else {
            out[o++] = re[i];
        }
    }
    out[o] = '\0';
    return out;
}

static int
re_compile(const char *re, pcre2_code **out, char *err, size_t err_len)
{
    int rc = 0;
    char *pat = re_expand_ws(re);
    if (!pat)
        return -ENOMEM;
    int ec = 0;
    PCRE2_SIZE eoff = 0;
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                                     &ec, &eoff, NULL);
    if (!code) {
        PCRE2_UCHAR msg[128];
        pcre2_get_error_message(ec, msg, sizeof(msg));
        snprintf(err, err_len, "pre-tokenizer regex does not compile at %zu: %s", (size_t)eoff,
                 (const char *)msg);
        rc = -ENOTSUP;
        goto out;
    }
    /* Without JIT (e.g. a PCRE2 built without it) the interpreter gives the same matches. */
    int jrc = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    if (jrc != 0)
        CM_LOG(CM_LOG_DEBUG, "tokenizer: PCRE2 JIT unavailable rc=%d, using the interpreter", jrc);
    *out = code;
out:
    free(pat);
    return rc;
}

/* ---- The byte-level alphabet (GPT-2's bytes_to_unicode) ----
 * Printable bytes (33..126, 161..172, 174..255) stand for themselves; the other 68 (0..32,
 * 127..160, 173) are renumbered in order from U+0100. */

static uint32_t
byte_to_cp(uint8_t b)
{
    if (b <= 32)
        return 256u + b;
    if (b >= 127 && b <= 160)
        return 256u + 33 + (b - 127u);
    if (b == 173)
        return 256u + 67;
    return b;
}

static int
cp_to_byte(uint32_t cp)
{
    if (cp < 256)
        return byte_to_cp((uint8_t)cp) == cp ? (int)cp : -1;
    uint32_t k = cp - 256;
    if (k <= 32)
        return (int)k;
    if (k <= 66)
        return (int)(127 + k - 33);
    if (k == 67)
        return 173;
    return -1;
}

/* UTF-8 of a code point below U+0800 (all the alphabet needs). Returns the length. */
static size_t
cp_utf8(uint32_t cp, char *dst)
{
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    }
    dst[0] = (char)(0xC0 | (cp >> 6));
    dst[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

static uint32_t
utf8_cp(const unsigned char *s, size_t n)
{
    switch (n) {
    case 1:
        return s[0];
    case 2:
        return ((uint32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
    case 3:
        return ((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    default:
        return ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
               ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    }
}

size_t
tok_bpe_decode_text(const char *text, size_t len, char *dst)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t n = tok_utf8_seq_len(s + i, len - i);
        if (n == 0) { /* not UTF-8: keep the byte */
            dst[o++] = (char)s[i++];
            continue;
        }
        int b = cp_to_byte(utf8_cp(s + i, n));
        if (b >= 0) {
            dst[o++] = (char)b;
        } else { /* outside the alphabet (e.g. an added token): keep the character */
            memcpy(dst + o, s + i, n);
            o += n;
        }
        i += n;
    }
    return o;
}

/* ---- Merges: (left id, right id) -> (rank, result id) ---- */

static uint32_t
pair_hash(uint64_t key)
{
    key *= 0x9E3779B97F4A7C15ull;
    return (uint32_t)(key >> 32);
}

static void
merge_put(struct tok_merge_map *m, int32_t left, int32_t right, int32_t rank, int32_t result)
{
    uint64_t key = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    for (uint32_t i = pair_hash(key) & m->mask;; i = (i + 1) & m->mask) {
        if (m->keys[i] == key)
            return; /* a repeated pair keeps its first (best) rank */
        if (m->keys[i] == 0) {
            m->keys[i] = key;
            m->rank[i] = rank;
            m->result[i] = result;
            return;
        }
    }
}

/* The rank of merging (left, right), or -1; *result gets the merged token. */
static int32_t
merge_get(const struct tok_merge_map *m, int32_t left, int32_t right, int32_t *result)
{
    uint64_t key = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    for (uint32_t i = pair_hash(key) & m->mask;; i = (i + 1) & m->mask) {
        if (m->keys[i] == key) {
            *result = m->result[i];
            return m->rank[i];
        }
        if (m->keys[i] == 0)
            return -1;
    }
}

static int
merges_build(struct eng_tok *t, const struct eng_gguf_arr *merges, char *err, size_t err_len)
{
    int rc = 0;
    char *buf = NULL;
    size_t cap = 1;
    while (cap < 2 * merges->n + 2)
        cap <<= 1;
    struct tok_merge_map *m = &t->merges;
    m->keys = tok_calloc(cap, sizeof(*m->keys));
    m->rank = tok_malloc(cap * sizeof(*m->rank));
    m->result = tok_malloc(cap * sizeof(*m->result));
    size_t max_len = 0;
    for (uint64_t i = 0; i < merges->n; i++)
        if (merges->strs[i].len > max_len)
            max_len = merges->strs[i].len;
    buf = tok_malloc(max_len + 1);
    if (!m->keys || !m->rank || !m->result || !buf) {
        rc = -ENOMEM;
        goto out;
    }
    m->mask = (uint32_t)(cap - 1);
    size_t n_skipped = 0;
    for (uint64_t i = 0; i < merges->n; i++) {
        const char *s = merges->strs[i].data;
        size_t len = merges->strs[i].len;
        const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
        if (!sp) {
            snprintf(err, err_len, "tokenizer.ggml.merges[%llu] has no space between its parts",
                     (unsigned long long)i);
            rc = -EBADMSG;
            goto out;
        }
        size_t ll = (size_t)(sp - s), rl = len - ll - 1;
        int32_t left = tok_text_find(t, s, ll), right = tok_text_find(t, sp + 1, rl);
        memcpy(buf, s, ll);
        memcpy(buf + ll, sp + 1, rl);
        int32_t result = tok_text_find(t, buf, ll + rl);
        if (left < 0 || right < 0 || result < 0) {
            n_skipped++; /* a merge that cannot produce a token never applies */
            continue;
        }
        merge_put(m, left, right, (int32_t)i, result);
    }
    if (n_skipped)
        CM_LOG(CM_LOG_WARN, "tokenizer: %zu merges name tokens not in the vocabulary, ignored",
               n_skipped);
out:
    free(buf);
    return rc;
}

int
tok_bpe_init(struct eng_tok *t, const struct eng_gguf_arr *merges, char *err, size_t err_len)
{
    const struct pre_family *fam = pre_lookup(t->pre);
    if (!fam) {
        snprintf(err, err_len,
                 "tokenizer.ggml.pre '%s' is not supported (known: gpt-2, default, starcoder, "
                 "smollm, llama-bpe, llama3, qwen2 and their aliases)",
                 t->pre);
        return -ENOTSUP;
    }
    t->ignore_merges = fam->ignore_merges;
    for (int b = 0; b < 256; b++) {
        char c[2];
        size_t n = cp_utf8(byte_to_cp((uint8_t)b), c);
        t->byte_tok[b] = tok_text_find(t, c, n);
    }
    int rc = merges_build(t, merges, err, err_len);
    if (rc < 0)
        return rc;
    for (int i = 0; i < TOK_MAX_RE && fam->re[i]; i++) {
        pcre2_code *code = NULL;
        rc = re_compile(fam->re[i], &code, err, err_len);
        if (rc < 0)
            return rc;
        t->re[t->n_re++] = code;
    }
    return 0;
}

void
tok_bpe_fini(struct eng_tok *t)
{
    for (int i = 0; i < t->n_re; i++)
        pcre2_code_free(t->re[i]);
    t->n_re = 0;
    free(t->merges.keys);
    free(t->merges.rank);
    free(t->merges.result);
}

/* ---- Merging one word ---- */

struct bpe_sym {
    int32_t id;
    int32_t prev, next; /* -1 at the ends */
};

struct bpe_cand {
    int32_t rank;
    int32_t pos; /* index of the left symbol */
    int32_t left, right;
};

/* Scratch for one encode call, grown to the longest word. */
struct bpe_ctx {
    const struct eng_tok *t;
    struct tok_ids *out;
    pcre2_match_data *md;
    struct bpe_sym *sym; /* (sym_cap) */
    char *mapped;        /* (2 * sym_cap) the word in the byte-level alphabet */
    size_t sym_cap;
    struct bpe_cand *heap; /* (heap_cap) candidate merges, a binary min-heap */
    size_t n_heap, heap_cap;
};

static int
ctx_reserve(struct bpe_ctx *c, size_t n)
{
    if (n <= c->sym_cap)
        return 0;
    size_t cap = c->sym_cap ? c->sym_cap : 64;
    while (cap < n)
        cap *= 2;
    struct bpe_sym *sym = tok_realloc(c->sym, cap * sizeof(*sym));
    if (!sym)
        return -ENOMEM;
    c->sym = sym;
    char *mapped = tok_realloc(c->mapped, cap * 2);
    if (!mapped)
        return -ENOMEM;
    c->mapped = mapped;
    c->sym_cap = cap;
    return 0;
}

static bool
cand_less(const struct bpe_cand *a, const struct bpe_cand *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static int
heap_push(struct bpe_ctx *c, struct bpe_cand e)
{
    if (c->n_heap == c->heap_cap) {
        size_t cap = c->heap_cap ? 2 * c->heap_cap : 128;
        struct bpe_cand *heap = tok_realloc(c->heap, cap * sizeof(*heap));
        if (!heap)
            return -ENOMEM;
        c->heap = heap;
        c->heap_cap = cap;
    }
    size_t i = c->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_less(&e, &c->heap[p]))
            break;
        c->heap[i] = c->heap[p];
        i = p;
    }
    c->heap[i] = e;
    return 0;
}

static struct bpe_cand
heap_pop(struct bpe_ctx *c)
{
    struct bpe_cand top = c->heap[0];
    struct bpe_cand last = c->heap[--c->n_heap];
    size_t i = 0, n = c->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const struct bpe_cand *best = &last;
        if (l < n && cand_less(&c->heap[l], best)) {
            m = l;
            best = &c->heap[l];
        }
        if (r < n && cand_less(&c->heap[r], best))
            m = r;
        if (m == i)
            break;
        c->heap[i] = c->heap[m];
        i = m;
    }
    if (n > 0)
        c->heap[i] = last;
    return top;
}

static int
push_pair(struct bpe_ctx *c, int32_t pos)
{
    const struct bpe_sym *s = c->sym;
    int32_t next = s[pos].next;
    if (next < 0 || s[pos].id < 0 || s[next].id < 0)
        return 0;
    int32_t result;
    int32_t rank = merge_get(&c->t->merges, s[pos].id, s[next].id, &result);
    if (rank < 0)
        return 0;
    return heap_push(c, (struct bpe_cand){rank, pos, s[pos].id, s[next].id});
}

static int
merge_word(struct bpe_ctx *c, size_t n)
{
    struct bpe_sym *s = c->sym;
    c->n_heap = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        int rc = push_pair(c, (int32_t)i);
        if (rc < 0)
            return rc;
    }
    while (c->n_heap > 0) {
        struct bpe_cand e = heap_pop(c);
        int32_t next = s[e.pos].next;
        /* Stale entries: a side was merged away or changed since the pair was queued. */
        if (next < 0 || s[e.pos].id != e.left || s[next].id != e.right)
            continue;
        int32_t result;
        merge_get(&c->t->merges, e.left, e.right, &result);
        s[e.pos].id = result;
        s[e.pos].next = s[next].next;
        if (s[next].next >= 0)
            s[s[next].next].prev = e.pos;
        s[next].id = -1;
        int32_t prev = s[e.pos].prev;
        int rc = prev >= 0 ? push_pair(c, prev) : 0;
        if (rc == 0)
            rc = push_pair(c, e.pos);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int
bpe_word(struct bpe_ctx *c, const char *w, size_t len)
{
    const struct eng_tok *t = c->t;
    const unsigned char *u = (const unsigned char *)w;
    if (len == 1)
        return t->byte_tok[u[0]] >= 0 ? tok_ids_push(c->out, t->byte_tok[u[0]]) : 0;
    int rc = ctx_reserve(c, len);
    if (rc < 0)
        return rc;
    if (t->ignore_merges) {
        size_t m = 0;
        for (size_t i = 0; i < len; i++)
            m += cp_utf8(byte_to_cp(u[i]), c->mapped + m);
        int32_t id = tok_text_find(t, c->mapped, m);
        if (id >= 0)
            return tok_ids_push(c->out, id);
    }
    for (size_t i = 0; i < len; i++) {
        c->sym[i].id = t->byte_tok[u[i]];
        c->sym[i].prev = (int32_t)i - 1;
        c->sym[i].next = i + 1 < len ? (int32_t)i + 1 : -1;
    }
    rc = merge_word(c, len);
    if (rc < 0)
        return rc;
    /* A byte whose character is not in the vocabulary is dropped, as Hugging Face's BPE does
     * without an unknown token. */
    for (int32_t i = 0; i >= 0; i = c->sym[i].next)
        if (c->sym[i].id >= 0 && (rc = tok_ids_push(c->out, c->sym[i].id)) < 0)
            return rc;
    return 0;
}

/* ---- Pre-tokenizing ---- */

/* Finds the next match of re in s[0..len) from pos. Returns 1 with [*ms, *me), 0 for none. */
static int
re_next(struct bpe_ctx *c, const pcre2_code *re, const char *s, size_t len, size_t pos, size_t *ms,
        size_t *me)
{
    int rc = pcre2_match(re, (PCRE2_SPTR)s, len, pos, PCRE2_NO_UTF_CHECK, c->md, NULL);
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH) /* e.g. the JIT stack limit: retry interpreted */
        rc = pcre2_match(re, (PCRE2_SPTR)s, len, pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, c->md,
                         NULL);
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    if (rc < 0) {
        /* Resource limits only: the rest becomes one piece, which still round-trips. */
        CM_LOG(CM_LOG_WARN, "tokenizer: regex match failed rc=%d, piece of %zu bytes unsplit", rc,
               len - pos);
        return 0;
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
    *ms = ov[0];
    *me = ov[1];
    return 1;
}

static int
split_level(struct bpe_ctx *c, int level, const char *s, size_t len)
{
    if (level == c->t->n_re)
        return bpe_word(c, s, len);
    const pcre2_code *re = c->t->re[level];
    size_t pos = 0, gap = 0, ms, me;
    int rc = 0;
    while (pos < len && re_next(c, re, s, len, pos, &ms, &me)) {
        if (me == ms) { /* an empty match splits nothing: step over one character */
            size_t n = tok_utf8_seq_len((const unsigned char *)s + ms, len - ms);
            pos = ms + (n ? n : 1);
            continue;
        }
        if (ms > gap && (rc = split_level(c, level + 1, s + gap, ms - gap)) < 0)
            return rc;
        if ((rc = split_level(c, level + 1, s + ms, me - ms)) < 0)
            return rc;
        gap = pos = me;
    }
    if (gap < len)
        rc = split_level(c, level + 1, s + gap, len - gap);
    return rc;
}

int
tok_bpe_encode(const struct eng_tok *t, const char *text, size_t len, struct tok_ids *out)
{
    int rc = 0;
    struct bpe_ctx c = {.t = t, .out = out};
    c.md = pcre2_match_data_create(1, NULL);
    if (!c.md) {
        rc = -ENOMEM;
        goto out;
    }
    const unsigned char *u = (const unsigned char *)text;
    for (size_t i = 0; i < len && rc == 0;) {
        size_t j = i, n;
        while (j < len && (n = tok_utf8_seq_len(u + j, len - j)) > 0)
            j += n;
        if (j > i && (rc = split_level(&c, 0, text + i, j - i)) < 0)
            break;
        size_t k = j;
        while (k < len && tok_utf8_seq_len(u + k, len - k) == 0)
            k++;
        /* Invalid UTF-8 bypasses the regexes: its bytes are one word, so they round-trip. */
        if (k > j)
            rc = bpe_word(&c, text + j, k - j);
        i = k;
    }
out:
    pcre2_match_data_free(c.md);
    free(c.sym);
    free(c.heap);
    free(c.mapped);
    return rc;
}

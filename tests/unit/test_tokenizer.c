/*
 * test_tokenizer: the tokenizer against llama.cpp's golden vectors (tests/data/tokenizer/, see its
 * README.md), on small hand-built vocabularies that pin down the merge order, special-token
 * matching and metadata validation, and on invalid UTF-8, long inputs, threads and failed
 * allocations. Run from the repository root. LLM_TEST_MODEL (or models/default.gguf when present)
 * names the SmolLM2 model for its ChatML checks; without it that test is skipped.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/cm_log.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"

#define GOLDEN_DIR "tests/data/tokenizer/"
#define GOLDEN_SEP "\n__ggml_vocab_test__\n"
#define GOLDEN_N 46

/* ---- Helpers ---- */

static char *
read_file(const char *path, size_t *len_out)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t cap = 0, len = 0, n;
    if (!f)
        return NULL;
    do {
        if (len == cap) {
            cap = cap ? cap * 2 : 1 << 16;
            buf = realloc(buf, cap + 1);
            assert_non_null(buf);
        }
        n = fread(buf + len, 1, cap - len, f);
        len += n;
    } while (n > 0);
    fclose(f);
    buf[len] = '\0';
    *len_out = len;
    return buf;
}

struct vocab {
    struct eng_gguf *g;
    struct eng_tok *t;
};

static void
vocab_open(struct vocab *v, const char *path)
{
    char err[256] = "";
    v->g = NULL;
    v->t = NULL;
    int rc = eng_gguf_open(path, &v->g, err, sizeof(err));
    if (rc == 0)
        rc = eng_tok_new(v->g, &v->t, err, sizeof(err));
    if (rc != 0)
        fail_msg("%s: %s (rc %d)", path, err, rc);
}

static void
vocab_close(struct vocab *v)
{
    eng_tok_free(v->t);
    eng_gguf_close(v->g);
}

static void
golden_path(char *buf, size_t cap, const char *name, const char *ext)
{
    snprintf(buf, cap, GOLDEN_DIR "ggml-vocab-%s.gguf%s", name, ext);
}

/* Encodes s and returns the ids (caller frees); asserts success. */
static int32_t *
encode(const struct eng_tok *t, const char *s, size_t len, bool special, int *n)
{
    int32_t *ids = NULL;
    assert_int_equal(eng_tok_encode(t, s, len, false, special, &ids, n), 0);
    assert_non_null(ids);
    for (int i = 0; i < *n; i++)
        assert_true(ids[i] >= 0 && ids[i] < eng_tok_n_vocab(t));
    return ids;
}

/* decode(encode(s)) == s. */
static void
assert_roundtrip(const struct eng_tok *t, const char *s, size_t len, bool special)
{
    int n;
    int32_t *ids = encode(t, s, len, special, &n);
    char *back = NULL;
    size_t blen = 0;
    assert_int_equal(eng_tok_decode(t, ids, n, special, &back, &blen), 0);
    if (blen != len || memcmp(back, s, len) != 0)
        fail_msg("round trip of %zu bytes gave %zu bytes", len, blen);
    assert_int_equal(back[blen], '\0');
    free(back);
    free(ids);
}

static void
assert_ids(const struct eng_tok *t, const char *s, bool special, const int32_t *want, int n_want)
{
    int n;
    int32_t *ids = encode(t, s, strlen(s), special, &n);
    assert_int_equal(n, n_want);
    for (int i = 0; i < n; i++)
        assert_int_equal(ids[i], want[i]);
    free(ids);
}

/* ---- Golden vectors ---- */

/* Compares one .out line ("  id id id") with ids. */
static bool
line_matches(const char *line, size_t len, const int32_t *ids, int n)
{
    char *copy = strndup(line, len), *p = copy, *end;
    int i = 0;
    bool ok = true;
    assert_non_null(copy);
    for (;;) {
        long v = strtol(p, &end, 10);
        if (end == p)
            break;
        if (i >= n || ids[i] != v)
            ok = false;
        i++;
        p = end;
    }
    free(copy);
    return ok && i == n;
}

static void
check_golden(const char *name)
{
    char path[256], inp_path[256], out_path[256];
    size_t inp_len, out_len;
    struct vocab v;
    golden_path(path, sizeof(path), name, "");
    golden_path(inp_path, sizeof(inp_path), name, ".inp");
    golden_path(out_path, sizeof(out_path), name, ".out");
    char *inp = read_file(inp_path, &inp_len), *out = read_file(out_path, &out_len);
    if (!inp || !out)
        fail_msg("cannot read %s or %s (run the test from the repository root)", inp_path,
                 out_path);
    vocab_open(&v, path);
    const char *s = inp, *line = out;
    int count = 0;
    for (const char *sep;
         (sep = memmem(s, inp_len - (size_t)(s - inp), GOLDEN_SEP, strlen(GOLDEN_SEP))) != NULL;
         s = sep + strlen(GOLDEN_SEP), count++) {
        size_t len = (size_t)(sep - s);
        const char *nl = memchr(line, '\n', out_len - (size_t)(line - out));
        size_t line_len = nl ? (size_t)(nl - line) : out_len - (size_t)(line - out);
        int n;
        int32_t *ids = encode(v.t, s, len, false, &n);
        if (!line_matches(line, line_len, ids, n))
            fail_msg("%s input %d (%zu bytes): ids differ from '%.*s'", name, count, len,
                     (int)line_len, line);
        free(ids);
        assert_roundtrip(v.t, s, len, false);
        line = nl ? nl + 1 : line + line_len;
    }
    assert_int_equal(count, GOLDEN_N);
    vocab_close(&v);
    free(inp);
    free(out);
}

static void
test_tokenizer_golden_gpt2(void **state)
{
    (void)state;
    check_golden("gpt-2");
}

static void
test_tokenizer_golden_starcoder(void **state)
{
    (void)state;
    check_golden("starcoder");
}

static void
test_tokenizer_golden_llama_spm(void **state)
{
    (void)state;
    check_golden("llama-spm");
}

/* ---- Metadata of the golden vocabularies ---- */

static void
test_tokenizer_metadata(void **state)
{
    (void)state;
    struct vocab v;
    vocab_open(&v, GOLDEN_DIR "ggml-vocab-starcoder.gguf");
    assert_int_equal(eng_tok_kind(v.t), ENG_TOK_BPE);
    assert_string_equal(eng_tok_pre(v.t), "starcoder");
    assert_int_equal(eng_tok_n_vocab(v.t), 49152);
    assert_int_equal(eng_tok_eos(v.t), 0);
    assert_false(eng_tok_add_bos(v.t));
    assert_int_equal(eng_tok_find(v.t, "<fim_prefix>"), 1);
    assert_int_equal(eng_tok_find(v.t, "no such token text"), -1);
    vocab_close(&v);

    vocab_open(&v, GOLDEN_DIR "ggml-vocab-llama-spm.gguf");
    assert_int_equal(eng_tok_kind(v.t), ENG_TOK_SPM);
    assert_int_equal(eng_tok_bos(v.t), 1);
    assert_int_equal(eng_tok_eos(v.t), 2);
    assert_true(eng_tok_add_bos(v.t));
    int32_t *ids = NULL;
    int n;
    assert_int_equal(eng_tok_encode(v.t, "Hello", 5, true, false, &ids, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 15043);
    free(ids);
    vocab_close(&v);
}

static void
test_tokenizer_is_eog(void **state)
{
    (void)state;
    struct vocab v;
    vocab_open(&v, GOLDEN_DIR "ggml-vocab-gpt-2.gguf");
    assert_true(eng_tok_is_eog(v.t, 50256)); /* <|endoftext|>, also EOS */
    assert_false(eng_tok_is_eog(v.t, 0));
    assert_false(eng_tok_is_eog(v.t, -1));
    assert_false(eng_tok_is_eog(v.t, 50257));
    vocab_close(&v);
    vocab_open(&v, GOLDEN_DIR "ggml-vocab-starcoder.gguf");
    assert_true(eng_tok_is_eog(v.t, 0));
    assert_false(eng_tok_is_eog(v.t, eng_tok_find(v.t, "<fim_prefix>")));
    vocab_close(&v);
    vocab_open(&v, GOLDEN_DIR "ggml-vocab-llama-spm.gguf");
    assert_true(eng_tok_is_eog(v.t, 2));
    assert_false(eng_tok_is_eog(v.t, 1));
    vocab_close(&v);
}

/* ---- Special tokens ---- */

static void
test_tokenizer_special_starcoder(void **state)
{
    (void)state;
    struct vocab v;
    vocab_open(&v, GOLDEN_DIR "ggml-vocab-starcoder.gguf");
    const char *s = "<fim_prefix>def f():<fim_suffix>\n    return 1<fim_middle>";
    int n;
    int32_t *ids = encode(v.t, s, strlen(s), true, &n);
    assert_true(n > 4);
    assert_int_equal(ids[0], 1);
    int n_special = 0;
    for (int i = 0; i < n; i++)
        n_special += ids[i] >= 1 && ids[i] <= 3;
    assert_int_equal(n_special, 3);
    assert_int_equal(ids[n - 1], 2);
    /* The text between two special tokens is tokenized as if it stood alone. */
    int n_mid;
    int32_t *mid = encode(v.t, "def f():", 8, false, &n_mid);
    assert_true(n_mid < n);
    for (int i = 0; i < n_mid; i++)
        assert_int_equal(ids[1 + i], mid[i]);
    assert_int_equal(ids[1 + n_mid], 3);
    free(mid);
    free(ids);
    assert_roundtrip(v.t, s, strlen(s), true);

    /* Without parse_special the markers are plain text. */
    ids = encode(v.t, s, strlen(s), false, &n);
    for (int i = 0; i < n; i++)
        assert_true(ids[i] > 37);
    free(ids);
    assert_roundtrip(v.t, s, strlen(s), false);

    /* Control tokens render only when asked. */
    const char *p;
    assert_int_equal(eng_tok_piece(v.t, 1, false, &p), 0);
    assert_int_equal(eng_tok_piece(v.t, 1, true, &p), strlen("<fim_prefix>"));
    assert_memory_equal(p, "<fim_prefix>", strlen("<fim_prefix>"));
    assert_int_equal(eng_tok_piece(v.t, 49152, true, &p), 0);
    assert_int_equal(eng_tok_piece(v.t, -5, true, &p), 0);
    vocab_close(&v);
}

/* The SmolLM2 model: ChatML markers, EOG set, no BOS. */
static void
test_tokenizer_model_chatml(void **state)
{
    (void)state;
    const char *path = getenv("LLM_TEST_MODEL");
    struct stat st;
    if (!path || !*path)
        path = stat("models/default.gguf", &st) == 0 ? "models/default.gguf" : NULL;
    if (!path) {
        skip();
        return;
    }
    struct vocab v;
    vocab_open(&v, path);
    if (strcmp(eng_tok_pre(v.t), "smollm") != 0) {
        vocab_close(&v);
        skip(); /* another model: its ids are not the ones below */
        return;
    }
    int32_t im_start = eng_tok_find(v.t, "<|im_start|>"), im_end = eng_tok_find(v.t, "<|im_end|>");
    assert_int_equal(im_start, 1);
    assert_int_equal(im_end, 2);
    assert_true(eng_tok_is_eog(v.t, im_end));
    assert_true(eng_tok_is_eog(v.t, eng_tok_find(v.t, "<|endoftext|>")));
    assert_false(eng_tok_is_eog(v.t, im_start));
    assert_false(eng_tok_add_bos(v.t));
    /* Ids from Hugging Face's tokenizer of the same file (digits split one by one). */
    static const int32_t want[] = {19556, 905, 216, 33, 34, 35, 36, 37, 216, 1, 4093};
    assert_ids(v.t, "Hello world 12345 <|im_start|>user", true, want, 11);
    int32_t *ids = NULL;
    int n;
    const char *chat = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_int_equal(eng_tok_encode(v.t, chat, strlen(chat), true, true, &ids, &n), 0);
    assert_int_equal(ids[0], im_start); /* add_bos asked, but the model wants none */
    int n_markers = 0;
    for (int i = 0; i < n; i++)
        n_markers += ids[i] == im_start || ids[i] == im_end;
    assert_int_equal(n_markers, 3);
    free(ids);
    assert_roundtrip(v.t, chat, strlen(chat), true);
    vocab_close(&v);
}

/* ---- Hand-built vocabularies ---- */

/* A GGUF v3 image with no tensors, built key by key. */
struct gb {
    uint8_t *buf;
    size_t len, cap;
    uint64_t n_kv;
};

static void
gb_put(struct gb *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 256;
        b->buf = realloc(b->buf, b->cap);
        assert_non_null(b->buf);
    }
    memcpy(b->buf + b->len, p, n);
    b->len += n;
}

static void
gb_u32v(struct gb *b, uint32_t v)
{
    gb_put(b, &v, 4);
}

static void
gb_strv(struct gb *b, const char *s)
{
    uint64_t n = strlen(s);
    gb_put(b, &n, 8);
    gb_put(b, s, n);
}

static void
gb_key(struct gb *b, const char *key, uint32_t type)
{
    gb_strv(b, key);
    gb_u32v(b, type);
    b->n_kv++;
}

static void
gb_str(struct gb *b, const char *key, const char *val)
{
    gb_key(b, key, ENG_GGUF_STRING);
    gb_strv(b, val);
}

static void
gb_u32(struct gb *b, const char *key, uint32_t val)
{
    gb_key(b, key, ENG_GGUF_U32);
    gb_u32v(b, val);
}

static void
gb_bool(struct gb *b, const char *key, bool val)
{
    uint8_t v = val;
    gb_key(b, key, ENG_GGUF_BOOL);
    gb_put(b, &v, 1);
}

static void
gb_arr_head(struct gb *b, const char *key, uint32_t type, uint64_t n)
{
    gb_key(b, key, ENG_GGUF_ARRAY);
    gb_u32v(b, type);
    gb_put(b, &n, 8);
}

static void
gb_strs(struct gb *b, const char *key, const char *const *v, size_t n)
{
    gb_arr_head(b, key, ENG_GGUF_STRING, n);
    for (size_t i = 0; i < n; i++)
        gb_strv(b, v[i]);
}

static void
gb_i32s(struct gb *b, const char *key, const int32_t *v, size_t n)
{
    gb_arr_head(b, key, ENG_GGUF_I32, n);
    gb_put(b, v, 4 * n);
}

static void
gb_f32s(struct gb *b, const char *key, const float *v, size_t n)
{
    gb_arr_head(b, key, ENG_GGUF_F32, n);
    gb_put(b, v, 4 * n);
}

/* Parses the image and builds the tokenizer: returns eng_tok_new's rc; err gets its message. */
static int
gb_tok(struct gb *b, struct vocab *v, char *err, size_t err_len)
{
    struct gb img = {0};
    uint64_t zero = 0;
    gb_u32v(&img, ENG_GGUF_MAGIC);
    gb_u32v(&img, 3);
    gb_put(&img, &zero, 8);
    gb_put(&img, &b->n_kv, 8);
    gb_put(&img, b->buf, b->len);
    free(b->buf);
    *b = img; /* the tokenizer copies what it keeps, but the gguf borrows the image */
    v->t = NULL;
    char gerr[256];
    int rc = eng_gguf_parse(b->buf, b->len, &v->g, gerr, sizeof(gerr));
    if (rc != 0)
        fail_msg("test image does not parse: %s", gerr);
    rc = eng_tok_new(v->g, &v->t, err, err_len);
    return rc;
}

static void
gb_done(struct gb *b, struct vocab *v)
{
    vocab_close(v);
    free(b->buf);
}

/* A byte-level vocabulary of a few letters (their own byte-level characters) plus tokens. */
static void
tiny_bpe(struct gb *b, const char *pre, const char *const *merges, size_t n_merges)
{
    static const char *const tokens[] = {"a",
                                         "b",
                                         "c",
                                         "d",
                                         "\xc4\xa0" /* Ġ, the byte-level space */,
                                         "aa",
                                         "aaaa",
                                         "ab",
                                         "bc",
                                         "abc",
                                         "cd",
                                         "\304\240c" /* Ġc */,
                                         "<|im_start|>",
                                         "<|im_end|>",
                                         "<x>",
                                         "<x><y>",
                                         "xy",
                                         "yzzz",
                                         "x",
                                         "y",
                                         "z",
                                         "<think>"};
    static const int32_t types[] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                    1, 3, 3, 3, 3, 3, 3, 1, 1, 1, 4};
    *b = (struct gb){0};
    gb_str(b, "tokenizer.ggml.model", "gpt2");
    if (pre)
        gb_str(b, "tokenizer.ggml.pre", pre);
    gb_strs(b, "tokenizer.ggml.tokens", tokens, sizeof(tokens) / sizeof(tokens[0]));
    gb_i32s(b, "tokenizer.ggml.token_type", types, sizeof(types) / sizeof(types[0]));
    gb_strs(b, "tokenizer.ggml.merges", merges, n_merges);
    gb_u32(b, "tokenizer.ggml.eos_token_id", 13);
}

enum {
    T_A,
    T_B,
    T_C,
    T_D,
    T_SP,
    T_AA,
    T_AAAA,
    T_AB,
    T_BC,
    T_ABC,
    T_CD,
    T_SPC,
    T_IMS,
    T_IME,
    T_X_,
    T_XY_,
    T_XY,
    T_YZZZ,
    T_X,
    T_Y,
    T_Z,
    T_THINK
};

static void
test_tokenizer_bpe_merge_order(void **state)
{
    (void)state;
    struct gb b;
    struct vocab v;
    char err[256];
    /* Lowest rank first: b+c before a+b. */
    static const char *const m1[] = {"b c", "a b", "a bc", "ab c"};
    tiny_bpe(&b, "gpt-2", m1, 4);
    assert_int_equal(gb_tok(&b, &v, err, sizeof(err)), 0);
    assert_ids(v.t, "abc", false, (int32_t[]){T_ABC}, 1);
    assert_ids(v.t, "ab", false, (int32_t[]){T_AB}, 1);
    assert_ids(v.t, "abcd", false, (int32_t[]){T_ABC, T_D}, 2);
    gb_done(&b, &v);
    /* Now a+b first, and "ab c" is not a merge: a+b, c stays. */
    static const char *const m2[] = {"a b", "b c", "c d"};
    tiny_bpe(&b, "gpt-2", m2, 3);
    assert_int_equal(gb_tok(&b, &v, err, sizeof(err)), 0);
    assert_ids(v.t, "abc", false, (int32_t[]){T_AB, T_C}, 2);
    assert_ids(v.t, "abcd", false, (int32_t[]){T_AB, T_CD}, 2);
    /* The pre-tokenizer keeps the space with the word after it. */
    assert_ids(v.t, "ab cd", false, (int32_t[]){T_AB, T_SP, T_CD}, 3);
    /* Equal ranks: leftmost first. */
    gb_done(&b, &v);
    static const char *const m3[] = {"a a", "aa aa"};
    tiny_bpe(&b, "gpt-2", m3, 2);
    assert_int_equal(gb_tok(&b, &v, err, sizeof(err)), 0);
    assert_ids(v.t, "aaa", false, (int32_t[]){T_AA, T_A}, 2);
    assert_ids(v.t, "aaaa", false, (int32_t[]){T_AAAA}, 1);
    assert_ids(v.t, "aaaaaaa", false, (int32_t[]){T_AAAA, T_AA, T_A}, 3);
    /* A byte whose character is not in the vocabulary is dropped (no unknown token). */
    assert_ids(v.t, "aQa", false, (int32_t[]){T_A, T_A}, 2);
    gb_done(&b, &v);
}

static void
test_tokenizer_bpe_ignore_merges(void **state)
{
    (void)state;
    struct gb b;
    struct vocab v;
    char err[256];
    /* "abc" is a token but no merge makes it: llama3 takes the whole word, gpt-2 cannot. */
    static const char *const m[] = {"a b"};
    tiny_bpe(&b, "llama-bpe", m, 1);
    assert_int_equal(gb_tok(&b, &v, err, sizeof(err)), 0);
    assert_ids(v.t, "abc", false, (int32_t[]){T_ABC}, 1);
    gb_done(&b, &v);
    tiny_bpe(&b, "gpt-2", m, 1);
    assert_int_equal(gb_tok(&b, &v, err, sizeof(err)), 0);
    assert_ids(v.t, "abc", false, (int32_t[]){T_AB, T_C}, 2);
    gb_done(&b, &v);
}

static void
test_tokenizer_special_leftmost_longest(void **state)
{
    (void)state;
    struct gb b;
    struct vocab v;
    char err[256];
    static const char *const m[] = {"a b"};
    tiny_bpe(&b, "gpt-2", m, 1);
    assert_int_equal(gb_tok(&b, &v, err, sizeof(err)), 0);
    /* Longest of those starting at the same place. */
    assert_ids(v.t, "<x><y>", true, (int32_t[]){T_XY_}, 1);
    assert_ids(v.t, "<x><x>", true, (int32_t[]){T_X_, T_X_}, 2);
    /* Leftmost first, even when a longer one starts later. */
    assert_ids(v.t, "xyzzz", true, (int32_t[]){T_XY, T_Z, T_Z, T_Z}, 4);
    assert_ids(v.t, "ab<|im_start|>ab<|im_end|>", true, (int32_t[]){T_AB, T_IMS, T_AB, T_IME}, 4);
    /* A user-defined token is matched even without parse_special; control tokens are not. */
    assert_ids(v.t, "ab<think>ab", false, (int32_t[]){T_AB, T_THINK, T_AB}, 3);
    int n;
    int32_t *ids = encode(v.t, "<|im_start|>", 12, false, &n);
    for (int i = 0; i < n; i++)
        assert_true(ids[i] != T_IMS);
    free(ids);
    assert_true(eng_tok_is_eog(v.t, T_IME)); /* by its text, and as the EOS id */
    assert_false(eng_tok_is_eog(v.t, T_IMS));
    gb_done(&b, &v);
}

/* SentencePiece: <unk>, <s>, </s>, byte tokens for 0xC3 and 0xA9, then pieces with scores. */
static void
tiny_spm(struct gb *b, float score_a_b, float score_sp_a, bool add_space_prefix)
{
    static const char *const tokens[] = {
        "<unk>",        "<s>", "</s>", "<0xC3>", "<0xA9>",
        "\xe2\x96\x81", "a",   "b",    "ab",     "\342\226\201a" /* ▁a */,
        "<|eot_id|>"};
    static const int32_t types[] = {2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 3};
    float scores[] = {0, 0, 0, 0, 0, -3, -1, -1, score_a_b, score_sp_a, 0};
    *b = (struct gb){0};
    gb_str(b, "tokenizer.ggml.model", "llama");
    gb_strs(b, "tokenizer.ggml.tokens", tokens, 11);
    gb_i32s(b, "tokenizer.ggml.token_type", types, 11);
    gb_f32s(b, "tokenizer.ggml.scores", scores, 11);
    gb_u32(b, "tokenizer.ggml.bos_token_id", 1);
    gb_u32(b, "tokenizer.ggml.eos_token_id", 2);
    gb_u32(b, "tokenizer.ggml.unknown_token_id", 0);
    gb_bool(b, "tokenizer.ggml.add_space_prefix", add_space_prefix);
}

enum { S_UNK, S_BOS, S_EOS, S_C3, S_A9, S_SP, S_A, S_B, S_AB, S_SPA, S_EOT };

static void
test_tokenizer_spm_scores_and_bytes(void **state)
{
    (void)state;
    struct gb b;
    struct vocab v;
    char err[256];
    tiny_spm(&b, -0.5f, -2.0f, true); /* "ab" scores higher than "▁a" */
    assert_int_equal(gb_tok(&b, &v, err, sizeof(err)), 0);
    assert_ids(v.t, "ab", false, (int32_t[]){S_SP, S_AB}, 2);
    /* Byte fallback for é (C3 A9), <unk> for a byte without a token. */
    assert_ids(v.t, "\xc3\xa9", false, (int32_t[]){S_SP, S_C3, S_A9}, 3);
    assert_ids(v.t, "\xc3\xaa", false, (int32_t[]){S_SP, S_C3, S_UNK}, 3);
    /* Added tokens: a space is prefixed again after each; <s> and <unk> are matched when
     * parsing specials, and are plain text otherwise. */
    assert_ids(v.t, "a<s>a", true, (int32_t[]){S_SPA, S_BOS, S_SPA}, 3);
    int n;
    int32_t *ids = encode(v.t, "<s>", 3, false, &n);
    for (int i = 0; i < n; i++)
        assert_true(ids[i] != S_BOS);
    free(ids);
    assert_true(eng_tok_is_eog(v.t, S_EOT));
    assert_true(eng_tok_is_eog(v.t, S_EOS));
    /* Decoding: the prefixed space goes, control tokens render only when asked. */
    char *out;
    size_t len;
    assert_int_equal(
        eng_tok_decode(v.t, (int32_t[]){S_BOS, S_SPA, S_B, S_SP, S_C3, S_A9}, 6, false, &out, &len),
        0);
    assert_string_equal(out, "ab \xc3\xa9");
    free(out);
    assert_int_equal(eng_tok_decode(v.t, (int32_t[]){S_BOS, S_SPA}, 2, true, &out, &len), 0);
    assert_string_equal(out, "<s>a");
    free(out);
    gb_done(&b, &v);

    tiny_spm(&b, -2.0f, -0.5f, true); /* now "▁a" first, and "▁a"+"b" is no piece */
    assert_int_equal(gb_tok(&b, &v, err, sizeof(err)), 0);
    assert_ids(v.t, "ab", false, (int32_t[]){S_SPA, S_B}, 2);
    gb_done(&b, &v);

    tiny_spm(&b, -0.5f, -2.0f, false); /* no space prefix */
    assert_int_equal(gb_tok(&b, &v, err, sizeof(err)), 0);
    assert_ids(v.t, "ab", false, (int32_t[]){S_AB}, 1);
    assert_ids(v.t, " ab", false, (int32_t[]){S_SP, S_AB}, 2);
    assert_roundtrip(v.t, " ab a", 5, false);
    gb_done(&b, &v);
}

/* ---- Metadata validation ---- */

static void
test_tokenizer_bad_metadata(void **state)
{
    (void)state;
    static const char *const tokens[] = {"a", "b", "ab"};
    static const char *const merges[] = {"a b"};
    static const char *const bad_merges[] = {"ab"};
    static const int32_t types2[] = {1, 1};
    struct {
        const char *what;
        int rc;
        const char *msg;
    } cases[] = {
        {"no model", -EBADMSG, "tokenizer.ggml.model"},
        {"model bert", -ENOTSUP, "bert"},
        {"pre unknown", -ENOTSUP, "gpt-5-pre"},
        {"no tokens", -EBADMSG, "tokenizer.ggml.tokens"},
        {"types short", -EBADMSG, "token_type"},
        {"eos out of range", -EBADMSG, "eos_token_id"},
        {"no merges", -EBADMSG, "merges"},
        {"merge without space", -EBADMSG, "merges"},
        {"pre not a string", -EBADMSG, "tokenizer.ggml.pre"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *w = cases[i].what;
        struct gb b = {0};
        struct vocab v;
        char err[256] = "";
        if (strcmp(w, "no model") != 0)
            gb_str(&b, "tokenizer.ggml.model", strcmp(w, "model bert") == 0 ? "bert" : "gpt2");
        if (strcmp(w, "pre unknown") == 0)
            gb_str(&b, "tokenizer.ggml.pre", "gpt-5-pre");
        if (strcmp(w, "pre not a string") == 0)
            gb_u32(&b, "tokenizer.ggml.pre", 7);
        if (strcmp(w, "no tokens") != 0)
            gb_strs(&b, "tokenizer.ggml.tokens", tokens, 3);
        if (strcmp(w, "types short") == 0)
            gb_i32s(&b, "tokenizer.ggml.token_type", types2, 2);
        if (strcmp(w, "eos out of range") == 0)
            gb_u32(&b, "tokenizer.ggml.eos_token_id", 3);
        if (strcmp(w, "merge without space") == 0)
            gb_strs(&b, "tokenizer.ggml.merges", bad_merges, 1);
        else if (strcmp(w, "no merges") != 0)
            gb_strs(&b, "tokenizer.ggml.merges", merges, 1);
        int rc = gb_tok(&b, &v, err, sizeof(err));
        if (rc != cases[i].rc || !strstr(err, cases[i].msg))
            fail_msg("%s: rc %d err '%s'", w, rc, err);
        assert_null(v.t);
        gb_done(&b, &v);
    }
}

/* ---- UTF-8 ---- */

static void
test_tokenizer_utf8_complete(void **state)
{
    (void)state;
    struct {
        const char *s;
        size_t want;
    } cases[] = {
        {"", 0},
        {"abc", 3},
        {"a\xc3", 1},
        {"a\xc3\xa9", 3},
        {"\xe2\x82", 0},
        {"\xe2", 0},
        {"\xe2\x82\xac", 3},
        {"x\xf0\x9f\x98", 1},
        {"\xf0\x9f\x98\x80", 4},
        {"\xf0\x9f\x98\x80\xf0", 4},
        {"\xff", 1},
        {"a\x80", 2},
        {"\xe0\x80", 2}, /* overlong: can never complete */
        {"\xed\xa0", 2}, /* surrogate */
        {"\xf4\x90", 2}, /* above U+10FFFF */
        {"\xf5", 1},
        {"\xc0", 1},
        {"\xc3\xa9\xa9", 3},
        {"\x80\x80\x80\x80\x80", 5},
        {"\xe0\xa0", 0}, /* a valid prefix of U+0800 */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t got = eng_tok_utf8_complete(cases[i].s, strlen(cases[i].s));
        if (got != cases[i].want)
            fail_msg("case %zu: %zu, want %zu", i, got, cases[i].want);
    }
}

static uint64_t
xorshift(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Which single bytes the vocabulary can represent: a byte-level vocabulary may lack the bytes
 * UTF-8 never uses (StarCoder's has no token for 0xC0, 0xC1, 0xF5..0xFF). */
static void
representable_bytes(const struct eng_tok *t, bool ok[256])
{
    for (int b = 0; b < 256; b++) {
        char c = (char)b, *out = NULL;
        int32_t *ids = NULL;
        int n;
        size_t len;
        assert_int_equal(eng_tok_encode(t, &c, 1, false, false, &ids, &n), 0);
        assert_int_equal(eng_tok_decode(t, ids, n, false, &out, &len), 0);
        ok[b] = len == 1 && out[0] == c;
        if (!ok[b] && len != 0)
            fail_msg("byte 0x%02x decodes to %zu bytes", b, len);
        free(ids);
        free(out);
    }
}

/* decode(encode(s)) is s without the bytes the vocabulary cannot represent. */
static void
assert_roundtrip_lossy(const struct eng_tok *t, const char *s, size_t len, const bool ok[256])
{
    char *want = malloc(len + 1), *back = NULL;
    size_t n_want = 0, blen;
    int n;
    assert_non_null(want);
    for (size_t i = 0; i < len; i++)
        if (ok[(unsigned char)s[i]])
            want[n_want++] = s[i];
    int32_t *ids = encode(t, s, len, false, &n);
    assert_int_equal(eng_tok_decode(t, ids, n, false, &back, &blen), 0);
    if (blen != n_want || memcmp(back, want, blen) != 0)
        fail_msg("lossy round trip of %zu bytes gave %zu, want %zu", len, blen, n_want);
    free(ids);
    free(back);
    free(want);
}

/* Invalid UTF-8 (and NUL bytes) is tokenized, not rejected, and decodes to the same bytes. */
static void
test_tokenizer_invalid_utf8_roundtrip(void **state)
{
    (void)state;
    static const char *const names[] = {"gpt-2", "starcoder", "llama-spm"};
    static const char *const fixed[] = {"\xff",
                                        "\x80",
                                        "abc\xff"
                                        "def",
                                        "\xc3",
                                        "\xc3(",
                                        "\xe2\x82",
                                        "\xe2\x82 x",
                                        "\xf0\x9f\x98",
                                        "\xed\xa0\x80",
                                        "\xc0\xaf",
                                        "\xf8\x88\x80\x80\x80",
                                        "caf\xe9 na\xef"
                                        "ve",
                                        "  \xfe\xfe  ",
                                        "\xef\xbb\xbf\xef\xbb",
                                        "1\xff"
                                        "2\xfe"
                                        "3",
                                        "<|endoftext|>\xff<fim_prefix>"};
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    char buf[96];
    for (size_t k = 0; k < 3; k++) {
        char path[256];
        struct vocab v;
        golden_path(path, sizeof(path), names[k], "");
        vocab_open(&v, path);
        bool spm = eng_tok_kind(v.t) == ENG_TOK_SPM, ok[256];
        representable_bytes(v.t, ok);
        for (int c = 0; c < 256; c++) /* what a vocabulary may lack: see eng_tok_encode */
            if (!ok[c] && (strcmp(names[k], "starcoder") != 0 ||
                           !(c == 0xC0 || c == 0xC1 || c == 0xF1 || c >= 0xF5)))
                fail_msg("%s: byte 0x%02x does not round-trip", names[k], c);
        for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++) {
            assert_roundtrip_lossy(v.t, fixed[i], strlen(fixed[i]), ok);
            if (!spm && strcmp(names[k], "gpt-2") == 0)
                assert_roundtrip(v.t, fixed[i], strlen(fixed[i]), true);
        }
        for (int i = 0; i < 300; i++) {
            size_t len = xorshift(&seed) % sizeof(buf);
            for (size_t j = 0; j < len; j++) {
                uint64_t r = xorshift(&seed);
                /* Mostly high bytes and UTF-8 lead/continuation bytes, some ASCII. */
                buf[j] = (char)(r % 4 == 0 ? (r >> 8) % 128 : 0x80 + (r >> 8) % 128);
            }
            assert_roundtrip_lossy(v.t, buf, len, ok);
        }
        vocab_close(&v);
    }
}

/* ---- Long inputs ---- */

static void
test_tokenizer_long_inputs(void **state)
{
    (void)state;
    static const char *const names[] = {"starcoder", "llama-spm"};
    size_t len = 100000;
    char *s = malloc(len);
    assert_non_null(s);
    for (size_t k = 0; k < 2; k++) {
        char path[256];
        struct vocab v;
        golden_path(path, sizeof(path), names[k], "");
        vocab_open(&v, path);
        memset(s, ' ', len); /* one run of spaces */
        assert_roundtrip(v.t, s, len, false);
        memset(s, 'a', len); /* one word */
        assert_roundtrip(v.t, s, len, false);
        for (size_t i = 0; i < len; i++) /* many short words, digits, newlines */
            s[i] = "The 1st quick fox, 42 times!\n\t"[i % 31];
        assert_roundtrip(v.t, s, len, false);
        vocab_close(&v);
    }
    free(s);
}

/* ---- Threads ---- */

struct thread_arg {
    const struct eng_tok *t;
    const char *s;
    size_t len;
    const int32_t *want;
    int n_want;
    int bad;
};

static void *
encode_loop(void *p)
{
    struct thread_arg *a = p;
    for (int r = 0; r < 50; r++) {
        int32_t *ids = NULL;
        int n = 0;
        if (eng_tok_encode(a->t, a->s, a->len, false, true, &ids, &n) != 0 || n != a->n_want ||
            memcmp(ids, a->want, (size_t)n * sizeof(*ids)) != 0)
            a->bad++;
        free(ids);
    }
    return NULL;
}

static void
test_tokenizer_concurrent_encode(void **state)
{
    (void)state;
    struct vocab v;
    vocab_open(&v, GOLDEN_DIR "ggml-vocab-starcoder.gguf");
    const char *s = "<fim_prefix>int main(void) { return 42; }\n<fim_suffix>  \xf0\x9f\xa6\x99 "
                    "caf\xc3\xa9 12345<fim_middle>";
    int n;
    int32_t *want = encode(v.t, s, strlen(s), true, &n);
    struct thread_arg args[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
        args[i] = (struct thread_arg){v.t, s, strlen(s), want, n, 0};
        assert_int_equal(pthread_create(&th[i], NULL, encode_loop, &args[i]), 0);
    }
    for (int i = 0; i < 3; i++) {
        assert_int_equal(pthread_join(th[i], NULL), 0);
        assert_int_equal(args[i].bad, 0);
    }
    free(want);
    vocab_close(&v);
}

/* ---- Failed allocations ---- */

static void
test_tokenizer_alloc_failures(void **state)
{
    (void)state;
    static const char *const names[] = {"starcoder", "llama-spm"};
    const char *s = "<fim_prefix>Hello world, 12345 \xf0\x9f\xa6\x99 caf\xc3\xa9<s>\xff x";
    for (size_t k = 0; k < 2; k++) {
        char path[256], err[256];
        struct eng_gguf *g = NULL;
        struct eng_tok *t = NULL;
        golden_path(path, sizeof(path), names[k], "");
        assert_int_equal(eng_gguf_open(path, &g, err, sizeof(err)), 0);
        int rc = -ENOMEM;
        long n;
        for (n = 1; n < 1000 && rc != 0; n++) {
            eng_tok_test_fail_alloc(n);
            rc = eng_tok_new(g, &t, err, sizeof(err));
            eng_tok_test_fail_alloc(0);
            if (rc != 0) {
                assert_int_equal(rc, -ENOMEM);
                assert_null(t);
            }
        }
        assert_int_equal(rc, 0);
        assert_true(n > 5);
        int32_t *ids = NULL;
        int n_ids = 0;
        rc = -ENOMEM;
        for (n = 1; n < 1000 && rc != 0; n++) {
            eng_tok_test_fail_alloc(n);
            rc = eng_tok_encode(t, s, strlen(s), true, true, &ids, &n_ids);
            eng_tok_test_fail_alloc(0);
            if (rc != 0)
                assert_int_equal(rc, -ENOMEM);
        }
        assert_int_equal(rc, 0);
        assert_true(n > 2);
        char *out = NULL;
        size_t len;
        eng_tok_test_fail_alloc(1);
        assert_int_equal(eng_tok_decode(t, ids, n_ids, true, &out, &len), -ENOMEM);
        eng_tok_test_fail_alloc(0);
        assert_int_equal(eng_tok_decode(t, ids, n_ids, true, &out, &len), 0);
        free(out);
        free(ids);
        eng_tok_free(t);
        eng_gguf_close(g);
    }
    eng_tok_free(NULL);
}

static void
test_tokenizer_empty_input(void **state)
{
    (void)state;
    static const char *const names[] = {"gpt-2", "llama-spm"};
    for (size_t k = 0; k < 2; k++) {
        char path[256];
        struct vocab v;
        golden_path(path, sizeof(path), names[k], "");
        vocab_open(&v, path);
        int32_t *ids = NULL;
        int n = -1;
        assert_int_equal(eng_tok_encode(v.t, "", 0, false, true, &ids, &n), 0);
        assert_non_null(ids);
        assert_int_equal(n, 0);
        free(ids);
        char *out = NULL;
        size_t len = 9;
        assert_int_equal(eng_tok_decode(v.t, NULL, 0, true, &out, &len), 0);
        assert_int_equal(len, 0);
        assert_string_equal(out, "");
        free(out);
        vocab_close(&v);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokenizer_golden_gpt2),
        cmocka_unit_test(test_tokenizer_golden_starcoder),
        cmocka_unit_test(test_tokenizer_golden_llama_spm),
        cmocka_unit_test(test_tokenizer_metadata),
        cmocka_unit_test(test_tokenizer_is_eog),
        cmocka_unit_test(test_tokenizer_special_starcoder),
        cmocka_unit_test(test_tokenizer_model_chatml),
        cmocka_unit_test(test_tokenizer_bpe_merge_order),
        cmocka_unit_test(test_tokenizer_bpe_ignore_merges),
        cmocka_unit_test(test_tokenizer_special_leftmost_longest),
        cmocka_unit_test(test_tokenizer_spm_scores_and_bytes),
        cmocka_unit_test(test_tokenizer_bad_metadata),
        cmocka_unit_test(test_tokenizer_utf8_complete),
        cmocka_unit_test(test_tokenizer_invalid_utf8_roundtrip),
        cmocka_unit_test(test_tokenizer_long_inputs),
        cmocka_unit_test(test_tokenizer_concurrent_encode),
        cmocka_unit_test(test_tokenizer_alloc_failures),
        cmocka_unit_test(test_tokenizer_empty_input),
    };
    cm_log_set_level(CM_LOG_ERROR); /* the bad-metadata cases warn on purpose */
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * fuzz_tokenizer: libFuzzer harness for the tokenizer (engine/tokenizer) on real vocabularies.
 * The vocabularies are the checked-in GGUF files of tests/data/tokenizer/ (GPT-2 byte-level BPE,
 * StarCoder byte-level BPE with the digit split, Llama SentencePiece) plus, when it exists,
 * models/default.gguf (SmolLM2); LLM_FUZZ_VOCAB=FILE.gguf replaces the list with one file. Run
 * from the repository root. Input: byte 0 picks the vocabulary (value % count) and the flags (bit
 * 4 add_bos, bit 5 parse_special); the rest is the text, arbitrary bytes.
 * Properties checked (anything else is abort()):
 *   - encode returns 0 (-ENOMEM only under memory pressure, then nothing is checked), every id is
 *     in [0, n_vocab), and with add_bos the first id is BOS exactly when eng_tok_add_bos says so;
 *   - byte-level BPE: decode(encode(x)) with render_special == x, byte for byte, for ANY bytes x
 *     without parse_special, and with parse_special too (a control token renders its own text),
 *     as long as x holds no byte the vocabulary has no token for (computed at start-up by encoding
 *     each byte alone; the header documents that those bytes are dropped); and the concatenated
 *     eng_tok_piece texts equal the decoded text;
 *   - SentencePiece: decode(encode(x)) == x without parse_special for x that is valid UTF-8
 *     without NUL (invalid bytes are encoded and decoded, but not compared) and contains no
 *     "\xe2\x96\x81" (U+2581, the SPM space marker, which decodes to a space by design);
 *   - eng_tok_utf8_complete never exceeds the length and leaves at most 3 bytes behind.
 * Seeds (tests/fuzz/corpus/tokenizer/): the golden input strings of tests/data/tokenizer (mixed
 * scripts, digits, white space runs, emoji, code), ChatML and Llama 3 control tokens in text,
 * invalid UTF-8, each for every vocabulary.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "guards/guard_utf8.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define MAX_VOCABS 4

struct vocab {
    struct eng_gguf *g;
    struct eng_tok *t;
    bool dropped[256]; /* BPE: bytes without a token (encode drops them) */
};

static struct vocab vocabs[MAX_VOCABS];
static int n_vocabs;

static void
die(const char *what, long v)
{
    fprintf(stderr, "fuzz_tokenizer: %s (%ld)\n", what, v);
    abort();
}

static void
load(const char *path)
{
    struct vocab *v = &vocabs[n_vocabs];
    char err[256];
    if (eng_gguf_open(path, &v->g, err, sizeof(err)) != 0 ||
        eng_tok_new(v->g, &v->t, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_tokenizer: %s: %s\n", path, err);
        exit(1);
    }
    for (int b = 0; b < 256 && eng_tok_kind(v->t) == ENG_TOK_BPE; b++) {
        char c = (char)b, *out = NULL;
        int32_t *ids = NULL;
        int n = 0;
        size_t len = 0;
        if (eng_tok_encode(v->t, &c, 1, false, false, &ids, &n) != 0 ||
            eng_tok_decode(v->t, ids, n, true, &out, &len) != 0)
            die("encoding one byte failed", b);
        v->dropped[b] = !(len == 1 && out[0] == c);
        free(ids);
        free(out);
    }
    n_vocabs++;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    static const char *const paths[] = {
        "tests/data/tokenizer/ggml-vocab-gpt-2.gguf",
        "tests/data/tokenizer/ggml-vocab-starcoder.gguf",
        "tests/data/tokenizer/ggml-vocab-llama-spm.gguf",
        "models/default.gguf",
    };
    const char *env = getenv("LLM_FUZZ_VOCAB");
    struct stat st;
    if (env && *env) {
        load(env);
        return 0;
    }
    for (int i = 0; i < MAX_VOCABS; i++)
        if (i < 3 || stat(paths[i], &st) == 0)
            load(paths[i]);
    return 0;
}

static void
check_pieces(const struct eng_tok *t, const int32_t *ids, int n, const char *dec, size_t dec_len)
{
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        const char *b = NULL;
        size_t l = eng_tok_piece(t, ids[i], true, &b);
        if (off + l > dec_len || (l && memcmp(dec + off, b, l) != 0))
            die("the pieces do not concatenate to the decoded text", i);
        off += l;
    }
    if (off != dec_len)
        die("the pieces are shorter than the decoded text", (long)off);
}

static bool
roundtrip_expected(const struct vocab *v, const char *x, size_t n, bool parse_special)
{
    if (eng_tok_kind(v->t) == ENG_TOK_BPE) {
        for (size_t i = 0; i < n; i++)
            if (v->dropped[(unsigned char)x[i]])
                return false;
        return true;
    }
    /* SPM: the header promises the round trip only without added tokens; the marker U+2581
     * decodes to a space. NUL bytes are kept out: guard_utf8_valid refuses them. */
    return !parse_special && guard_utf8_valid(x, n) && !memmem(x, n, "\xe2\x96\x81", 3);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || n_vocabs == 0)
        return 0;
    const struct vocab *v = &vocabs[(data[0] & 15) % n_vocabs];
    bool add_bos = (data[0] & 16) != 0, parse_special = (data[0] & 32) != 0;
    const char *x = (const char *)data + 1;
    size_t n = size - 1;
    int32_t *ids = NULL;
    int n_ids = 0;
    if (eng_tok_encode(v->t, x, n, add_bos, parse_special, &ids, &n_ids) != 0)
        return 0;
    int n_vocab = eng_tok_n_vocab(v->t);
    for (int i = 0; i < n_ids; i++)
        if (ids[i] < 0 || ids[i] >= n_vocab)
            die("an id out of range", ids[i]);
    bool bos = add_bos && eng_tok_add_bos(v->t);
    if (bos && (n_ids < 1 || ids[0] != eng_tok_bos(v->t)))
        die("add_bos without BOS first", n_ids);
    const int32_t *body = ids + (bos ? 1 : 0);
    int n_body = n_ids - (bos ? 1 : 0);

    char *dec = NULL;
    size_t dec_len = 0;
    if (eng_tok_decode(v->t, body, n_body, true, &dec, &dec_len) == 0) {
        if (roundtrip_expected(v, x, n, parse_special) &&
            (dec_len != n || (n && memcmp(dec, x, n) != 0))) {
            fprintf(stderr, "in  (%zu): %.*s\nout (%zu): %.*s\n", n, (int)n, x, dec_len,
                    (int)dec_len, dec);
            die("decode(encode(x)) != x", eng_tok_kind(v->t));
        }
        if (eng_tok_kind(v->t) == ENG_TOK_BPE)
            check_pieces(v->t, body, n_body, dec, dec_len);
        size_t c = eng_tok_utf8_complete(dec, dec_len);
        if (c > dec_len || dec_len - c > 3)
            die("eng_tok_utf8_complete out of range", (long)c);
        free(dec);
    }
    free(ids);
    return 0;
}

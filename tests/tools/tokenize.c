/*
 * tokenize: runs the engine's tokenizer over inputs read from stdin (for the integration tests).
 *
 *   tokenize -m MODEL.gguf [--special] [--decode] [--bos] [--repeat N]
 *
 * stdin holds the inputs, each ended by a NUL byte (a last piece without one counts as an input
 * when it is not empty); no other framing, so any bytes but NUL may appear in an input. For each
 * input one line goes to stdout: its token ids separated by single spaces (an empty line for none).
 *   --special   parse control tokens in the text (parse_special); decode renders them
 *   --decode    check decode(encode(s)) == s for each input; a mismatch is reported on stderr and
 *               the exit status is 1
 *   --bos       add BOS when the model wants one
 *   --repeat N  encode every input N times and print encode throughput (tokens/s) on stderr
 * Exit status: 0, 1 (a --decode mismatch), 2 (usage, I/O or load error).
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_util.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"

struct opts {
    const char *model;
    bool special, decode, bos;
    long repeat;
};

static int
parse_args(int argc, char **argv, struct opts *o)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-m") == 0 && i + 1 < argc) {
            o->model = argv[++i];
        } else if (strcmp(argv[i], "--special") == 0) {
            o->special = true;
        } else if (strcmp(argv[i], "--decode") == 0) {
            o->decode = true;
        } else if (strcmp(argv[i], "--bos") == 0) {
            o->bos = true;
        } else if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc) {
            o->repeat = strtol(argv[++i], NULL, 10);
            if (o->repeat < 1)
                return -EINVAL;
        } else {
            return -EINVAL;
        }
    }
    return o->model ? 0 : -EINVAL;
}

static int
read_all(FILE *f, char **out, size_t *len_out)
{
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        return -ENOMEM;
    for (;;) {
        if (len == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return -ENOMEM;
            }
            buf = nb;
            cap *= 2;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    if (ferror(f)) {
        free(buf);
        return -EIO;
    }
    *out = buf;
    *len_out = len;
    return 0;
}

/* Tokenizes one input, prints its line, and checks the round trip. Returns 0, 1 or -errno. */
static int
run_one(const struct eng_tok *t, const struct opts *o, const char *s, size_t len, size_t index,
        uint64_t *n_tokens, uint64_t *encode_ns)
{
    int32_t *ids = NULL;
    char *back = NULL;
    int n = 0, rc = 0;
    for (long r = 0; r < (o->repeat ? o->repeat : 1); r++) {
        free(ids);
        ids = NULL;
        uint64_t t0 = cm_now_ns();
        if ((rc = eng_tok_encode(t, s, len, o->bos, o->special, &ids, &n)) < 0)
            goto out;
        *encode_ns += cm_now_ns() - t0;
        *n_tokens += (uint64_t)n;
    }
    for (int i = 0; i < n; i++)
        printf(i ? " %d" : "%d", ids[i]);
    putchar('\n');
    if (o->decode) {
        size_t blen;
        if ((rc = eng_tok_decode(t, ids, n, o->special, &back, &blen)) < 0)
            goto out;
        if (blen != len || memcmp(back, s, len) != 0) {
            fprintf(stderr,
                    "tokenize: input %zu: decode(encode(s)) differs (%zu bytes in, %zu out)\n",
                    index, len, blen);
            rc = 1;
        }
    }
out:
    free(ids);
    free(back);
    return rc;
}

int
main(int argc, char **argv)
{
    struct opts o = {0};
    struct eng_gguf *g = NULL;
    struct eng_tok *t = NULL;
    char *in = NULL;
    size_t in_len = 0;
    char err[256] = "";
    int status = 2, rc;
    if (parse_args(argc, argv, &o) < 0) {
        fprintf(stderr, "usage: tokenize -m MODEL.gguf [--special] [--decode] [--bos] "
                        "[--repeat N] < NUL-terminated inputs\n");
        return 2;
    }
    if ((rc = eng_gguf_open(o.model, &g, err, sizeof(err))) < 0 ||
        (rc = eng_tok_new(g, &t, err, sizeof(err))) < 0) {
        fprintf(stderr, "tokenize: %s: %s (%s)\n", o.model, err, strerror(-rc));
        goto out;
    }
    if ((rc = read_all(stdin, &in, &in_len)) < 0) {
        fprintf(stderr, "tokenize: reading stdin: %s\n", strerror(-rc));
        goto out;
    }
    status = 0;
    uint64_t n_tokens = 0, encode_ns = 0;
    size_t index = 0;
    for (size_t pos = 0; pos < in_len; index++) {
        const char *nul = memchr(in + pos, '\0', in_len - pos);
        size_t len = nul ? (size_t)(nul - (in + pos)) : in_len - pos;
        rc = run_one(t, &o, in + pos, len, index, &n_tokens, &encode_ns);
        if (rc < 0) {
            fprintf(stderr, "tokenize: input %zu: %s\n", index, strerror(-rc));
            status = 2;
            goto out;
        }
        if (rc > 0)
            status = 1;
        pos += len + (nul ? 1 : 0);
    }
    if (o.repeat) {
        double s = (double)encode_ns / 1e9;
        fprintf(stderr, "tokenize: %llu tokens in %.3f s: %.0f tokens/s\n",
                (unsigned long long)n_tokens, s, s > 0 ? (double)n_tokens / s : 0.0);
    }
out:
    if (fflush(stdout) != 0 && status == 0)
        status = 2;
    free(in);
    eng_tok_free(t);
    eng_gguf_close(g);
    return status;
}

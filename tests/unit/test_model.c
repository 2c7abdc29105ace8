/* The forward pass on the tiny generated models ($BUILD/tests/models/tiny-<type>.gguf): chunked
 * prefill, batched prefill and token-by-token decode agree; bad input leaves the cache as it was.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cmocka.h>

#include "engine/gguf.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "kernels/kern.h"

struct fixture {
    /* Agreement bound between two ways of computing the same logits. f32 weights: only the
     * summation order differs. Quantized weights: a different order can move an activation across
     * a rounding boundary of its 8-bit quantization, which shifts later values by up to 1/127 of a
     * block's range; observed up to 0.42% on tiny-q4_1, so the bound is 2%. */
    double tol;
    struct eng_gguf *g;
    struct eng_model *m;
    struct kern_pool *pool;
};

static int
open_model(void **state, const char *type, double tol)
{
    struct fixture *fx = calloc(1, sizeof(*fx));
    fx->tol = tol;
    char path[512], err[ENG_GGUF_ERR_LEN];
    const char *build = getenv("BUILD") ? getenv("BUILD") : "build";
    snprintf(path, sizeof(path), "%s/tests/models/tiny-%s.gguf", build, type);
    if (eng_gguf_open(path, &fx->g, err, sizeof(err)) < 0) {
        fprintf(stderr, "cannot open %s: %s (run make first)\n", path, err);
        free(fx);
        return -1;
    }
    if (eng_model_load(fx->g, &fx->m, err, sizeof(err)) < 0) {
        fprintf(stderr, "cannot load %s: %s\n", path, err);
        eng_gguf_close(fx->g);
        free(fx);
        return -1;
    }
    if (kern_pool_new(2, &fx->pool) < 0)
        return -1;
    *state = fx;
    return 0;
}

static int
setup_q4_1(void **state)
{
    return open_model(state, "q4_1", 2e-2);
}

static int
setup_f32(void **state)
{
    return open_model(state, "f32", 1e-4);
}

static int
teardown(void **state)
{
    struct fixture *fx = *state;
    kern_pool_free(fx->pool);
    eng_model_free(fx->m);
    eng_gguf_close(fx->g);
    free(fx);
    return 0;
}

#define N_TOK 37

static void
make_tokens(const struct eng_model *m, int32_t *toks, int n)
{
    for (int i = 0; i < n; i++)
        toks[i] = (int32_t)((i * 7919 + 13) % m->hp.n_vocab);
}

/* Max over positions of ||a - b|| / ||b||. */
static double
max_rel_err(const float *a, const float *b, int n_rows, int n_cols)
{
    double worst = 0;
    for (int r = 0; r < n_rows; r++) {
        double num = 0, den = 0;
        for (int c = 0; c < n_cols; c++) {
            double d = (double)a[(size_t)r * n_cols + c] - b[(size_t)r * n_cols + c];
            num += d * d;
            den += (double)b[(size_t)r * n_cols + c] * b[(size_t)r * n_cols + c];
        }
        double e = sqrt(num / (den > 0 ? den : 1));
        worst = e > worst ? e : worst;
    }
    return worst;
}

static int
argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        best = x[i] > x[best] ? i : best;
    return best;
}

static bool
same_argmax(const float *a, const float *b, int n_rows, int n_cols)
{
    for (int r = 0; r < n_rows; r++) {
        if (argmax(a + (size_t)r * n_cols, n_cols) != argmax(b + (size_t)r * n_cols, n_cols))
            return false;
    }
    return true;
}

/* Logits of every prompt position with the prompt split into chunks of n_batch tokens. */
static float *
prefill_all(struct fixture *fx, int n_batch, const int32_t *toks, int n)
{
    struct eng_fwd *f = NULL;
    struct eng_kv *kv = NULL;
    int n_vocab = fx->m->hp.n_vocab;
    float *logits = malloc((size_t)n * n_vocab * sizeof(float));
    assert_int_equal(eng_fwd_new(fx->m, fx->pool, n_batch, 64, &f), 0);
    assert_int_equal(eng_kv_new(fx->m, 64, &kv), 0);
    assert_int_equal(eng_forward(f, kv, toks, n, logits, true), 0);
    assert_int_equal(kv->n_past, n);
    eng_kv_free(kv);
    eng_fwd_free(f);
    return logits;
}

static void
test_model_chunked_prefill_matches_one_batch(void **state)
{
    struct fixture *fx = *state;
    int32_t toks[N_TOK];
    make_tokens(fx->m, toks, N_TOK);
    float *one = prefill_all(fx, 64, toks, N_TOK);
    float *chunked = prefill_all(fx, 5, toks, N_TOK);
    assert_true(max_rel_err(chunked, one, N_TOK, fx->m->hp.n_vocab) < fx->tol);
    assert_true(same_argmax(chunked, one, N_TOK, fx->m->hp.n_vocab));
    free(one);
    free(chunked);
}

static void
test_model_decode_matches_prefill(void **state)
{
    struct fixture *fx = *state;
    int32_t toks[N_TOK];
    int n_vocab = fx->m->hp.n_vocab;
    make_tokens(fx->m, toks, N_TOK);
    float *pre = prefill_all(fx, 64, toks, N_TOK);
    float *dec = malloc((size_t)N_TOK * n_vocab * sizeof(float));
    struct eng_fwd *f = NULL;
    struct eng_kv *kv = NULL;
    assert_int_equal(eng_fwd_new(fx->m, fx->pool, 64, 64, &f), 0);
    assert_int_equal(eng_kv_new(fx->m, 64, &kv), 0);
    for (int i = 0; i < N_TOK; i++)
        assert_int_equal(eng_forward(f, kv, &toks[i], 1, dec + (size_t)i * n_vocab, false), 0);
    assert_true(max_rel_err(dec, pre, N_TOK, n_vocab) < fx->tol);
    assert_true(same_argmax(dec, pre, N_TOK, n_vocab));
    eng_kv_free(kv);
    eng_fwd_free(f);
    free(pre);
    free(dec);
}

static void
test_model_bad_token_leaves_cache(void **state)
{
    struct fixture *fx = *state;
    struct eng_fwd *f = NULL;
    struct eng_kv *kv = NULL;
    assert_int_equal(eng_fwd_new(fx->m, fx->pool, 8, 16, &f), 0);
    assert_int_equal(eng_kv_new(fx->m, 16, &kv), 0);
    int32_t ok[3] = {1, 2, 3};
    assert_int_equal(eng_forward(f, kv, ok, 3, NULL, false), 0);
    int32_t bad[2] = {4, fx->m->hp.n_vocab};
    assert_int_equal(eng_forward(f, kv, bad, 2, NULL, false), -EINVAL);
    int32_t neg = -1;
    assert_int_equal(eng_forward(f, kv, &neg, 1, NULL, false), -EINVAL);
    assert_int_equal(kv->n_past, 3);
    int32_t many[14] = {0};
    assert_int_equal(eng_forward(f, kv, many, 14, NULL, false), -E2BIG);
    assert_int_equal(kv->n_past, 3);
    assert_int_equal(eng_forward(f, kv, many, 13, NULL, false), 0);
    assert_int_equal(kv->n_past, 16);
    assert_int_equal(eng_forward(f, kv, many, 1, NULL, false), -E2BIG);
    eng_kv_free(kv);
    eng_fwd_free(f);
}

static void
test_model_weight_bytes_counts_every_matrix(void **state)
{
    struct fixture *fx = *state;
    const struct eng_gguf *g = fx->g;
    size_t total = 0;
    for (uint64_t i = 0; i < g->n_tensors; i++)
        total += g->tensors[i].n_bytes;
    /* Every tensor is read once per token, plus the tied head when the embedding doubles as it
     * (the embedding lookup itself reads one row only). */
    size_t expect = total;
    if (!fx->m->tied_output)
        expect -= fx->m->tok_embd.row_bytes * (size_t)fx->m->tok_embd.n_out;
    assert_int_equal(eng_model_weight_bytes(fx->m), expect);
}

/* Logits of the last token of toks[0..n) computed for one sequence alone, token by token after
 * the prompt. */
static void
alone(struct fixture *fx, const int32_t *toks, int n_prompt, int n_total, float *out_rows)
{
    struct eng_fwd *f = NULL;
    struct eng_kv *kv = NULL;
    int n_vocab = fx->m->hp.n_vocab;
    assert_int_equal(eng_fwd_new(fx->m, fx->pool, 64, 64, &f), 0);
    assert_int_equal(eng_kv_new(fx->m, 64, &kv), 0);
    assert_int_equal(eng_forward(f, kv, toks, n_prompt, out_rows, false), 0);
    for (int i = n_prompt; i < n_total; i++)
        assert_int_equal(
            eng_forward(f, kv, &toks[i], 1, out_rows + (size_t)(i - n_prompt + 1) * n_vocab, false),
            0);
    eng_kv_free(kv);
    eng_fwd_free(f);
}

/* Two sequences prefilled in one batch and then decoded together (one token each per step), in
 * a shared pool whose blocks they take alternately, give the logits each gives alone. */
static void
test_model_batch_of_sequences_matches_alone(void **state)
{
    struct fixture *fx = *state;
    int n_vocab = fx->m->hp.n_vocab;
    enum { NA = 21, NB = 9, STEPS = 6 };
    int32_t ta[NA + STEPS], tb[NB + STEPS];
    make_tokens(fx->m, ta, NA + STEPS);
    for (int i = 0; i < NB + STEPS; i++)
        tb[i] = (int32_t)((i * 131 + 5) % n_vocab);
    float *ra = malloc((size_t)(STEPS + 1) * n_vocab * sizeof(float));
    float *rb = malloc((size_t)(STEPS + 1) * n_vocab * sizeof(float));
    alone(fx, ta, NA, NA + STEPS, ra);
    alone(fx, tb, NB, NB + STEPS, rb);

    struct eng_kv_pool *pool = NULL;
    struct eng_fwd *f = NULL;
    assert_int_equal(
        eng_kv_pool_new(fx->m->hp.n_layer, fx->m->hp.n_head_kv * fx->m->hp.head_dim, 16, &pool), 0);
    assert_int_equal(eng_fwd_new(fx->m, fx->pool, 64, 64, &f), 0);
    struct eng_kv_seq sa, sb;
    eng_kv_seq_init(&sa);
    eng_kv_seq_init(&sb);
    int32_t toks[NA + NB], pos[NA + NB], idx[2];
    struct eng_kv_seq *seqs[NA + NB];
    float *logits = malloc(2 * (size_t)n_vocab * sizeof(float));
    /* Step 0: both prompts, B's tokens first; logits for each prompt's last token. */
    for (int i = 0; i < NB; i++) {
        toks[i] = tb[i];
        pos[i] = i;
        seqs[i] = &sb;
    }
    for (int i = 0; i < NA; i++) {
        toks[NB + i] = ta[i];
        pos[NB + i] = i;
        seqs[NB + i] = &sa;
    }
    assert_int_equal(eng_kv_seq_reserve(pool, &sb, NB), 0);
    assert_int_equal(eng_kv_seq_reserve(pool, &sa, NA), 0);
    idx[0] = NB + NA - 1;
    idx[1] = NB - 1;
    struct eng_batch b = {.n_tokens = NA + NB,
                          .tokens = toks,
                          .pos = pos,
                          .seqs = seqs,
                          .n_logits = 2,
                          .logits_idx = idx};
    for (int step = 0; step <= STEPS; step++) {
        if (step > 0) {
            /* One decode token each. */
            toks[0] = ta[NA + step - 1];
            pos[0] = NA + step - 1;
            seqs[0] = &sa;
            toks[1] = tb[NB + step - 1];
            pos[1] = NB + step - 1;
            seqs[1] = &sb;
            assert_int_equal(eng_kv_seq_reserve(pool, &sa, pos[0] + 1), 0);
            assert_int_equal(eng_kv_seq_reserve(pool, &sb, pos[1] + 1), 0);
            b.n_tokens = 2;
            idx[0] = 0;
            idx[1] = 1;
        }
        assert_int_equal(eng_forward_batch(f, pool, &b, logits), 0);
        assert_true(max_rel_err(logits, ra + (size_t)step * n_vocab, 1, n_vocab) < fx->tol);
        assert_true(max_rel_err(logits + n_vocab, rb + (size_t)step * n_vocab, 1, n_vocab) <
                    fx->tol);
        assert_true(same_argmax(logits, ra + (size_t)step * n_vocab, 1, n_vocab));
    }
    /* A token whose position has no block is refused. */
    pos[0] = (sa.n_blocks) * ENG_KV_BLOCK;
    b.n_tokens = 1;
    b.n_logits = 0;
    assert_int_equal(eng_forward_batch(f, pool, &b, NULL), -EINVAL);
    eng_kv_seq_fini(pool, &sa);
    eng_kv_seq_fini(pool, &sb);
    assert_int_equal(eng_kv_pool_n_free(pool), 16);
    eng_kv_pool_free(pool);
    eng_fwd_free(f);
    free(logits);
    free(ra);
    free(rb);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_model_chunked_prefill_matches_one_batch, setup_q4_1,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_model_decode_matches_prefill, setup_q4_1, teardown),
        cmocka_unit_test_setup_teardown(test_model_chunked_prefill_matches_one_batch, setup_f32,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_model_decode_matches_prefill, setup_f32, teardown),
        cmocka_unit_test_setup_teardown(test_model_batch_of_sequences_matches_alone, setup_q4_1,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_model_batch_of_sequences_matches_alone, setup_f32,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_model_bad_token_leaves_cache, setup_q4_1, teardown),
        cmocka_unit_test_setup_teardown(test_model_weight_bytes_counts_every_matrix, setup_q4_1,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for engine/sampler: greedy, seeding, truncation (top_k, top_p, min_p), temperature
 * statistics, penalties, logit_bias, logprobs, RNG save/restore and parameter validation.
 * Every statistical test uses a fixed seed, so it is deterministic; the bounds are several
 * standard deviations wide so that a correct sampler with any seed would pass them too.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sampler.h"

/* ---- Helpers ---- */

static struct eng_sampler *
new_sampler(const struct eng_sampler_params *p, int n_vocab)
{
    struct eng_sampler *s = NULL;
    assert_int_equal(eng_sampler_new(p, n_vocab, &s), 0);
    assert_non_null(s);
    return s;
}

/* Samples once from a copy of logits (the sampler modifies its input). */
static int32_t
sample_copy(struct eng_sampler *s, const float *logits, int n, struct eng_sample *out)
{
    float *tmp = malloc((size_t)n * sizeof(*tmp));
    struct eng_sample local;
    assert_non_null(tmp);
    memcpy(tmp, logits, (size_t)n * sizeof(*tmp));
    if (out == NULL)
        out = &local;
    assert_int_equal(eng_sampler_sample(s, tmp, NULL, 0, out), 0);
    free(tmp);
    return out->id;
}

/* Deterministic pseudo-random logits in [-scale, scale), independent of the sampler's RNG. */
static void
fill_logits(float *l, int n, uint32_t seed, float scale)
{
    uint32_t x = seed * 2654435761u + 1;
    for (int i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        l[i] = ((float)(x >> 8) / 16777216.0f * 2.0f - 1.0f) * scale;
    }
}

/* ---- Greedy and seeding ---- */

static void
test_sampler_greedy_picks_argmax(void **state)
{
    (void)state;
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.temperature = 0.0f;
    struct eng_sampler *s = new_sampler(&p, 6);
    float l[6] = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f, -10.0f};
    assert_int_equal(sample_copy(s, l, 6, NULL), 1); /* first of the two 3.0 */
    l[4] = 3.5f;
    assert_int_equal(sample_copy(s, l, 6, NULL), 4);
    assert_int_equal(eng_sampler_argmax(l, 6), 4);

    /* Greedy never touches the RNG. */
    uint64_t before[4], after[4];
    eng_sampler_get_rng(s, before);
    sample_copy(s, l, 6, NULL);
    eng_sampler_get_rng(s, after);
    assert_memory_equal(before, after, sizeof(before));
    eng_sampler_free(s);
}

static void
test_sampler_argmax_ties_and_nan(void **state)
{
    (void)state;
    float l[5] = {NAN, 1.0f, 2.0f, 2.0f, NAN};
    assert_int_equal(eng_sampler_argmax(l, 5), 2);
    float all_inf[3] = {-INFINITY, -INFINITY, -INFINITY};
    assert_int_equal(eng_sampler_argmax(all_inf, 3), 0);
}

static void
draw_sequence(uint64_t seed, int32_t *ids, int n_draw)
{
    enum { N = 100 };
    float l[N];
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.seed = seed;
    fill_logits(l, N, 7, 0.5f);
    struct eng_sampler *s = new_sampler(&p, N);
    for (int i = 0; i < n_draw; i++)
        ids[i] = sample_copy(s, l, N, NULL);
    eng_sampler_free(s);
}

static void
test_sampler_seed_reproducible(void **state)
{
    (void)state;
    int32_t a[64], b[64], c[64];
    draw_sequence(42, a, 64);
    draw_sequence(42, b, 64);
    draw_sequence(43, c, 64);
    assert_memory_equal(a, b, sizeof(a));
    assert_memory_not_equal(a, c, sizeof(a));
    /* Not stuck on one token either. */
    int distinct = 0;
    for (int i = 1; i < 64; i++)
        distinct += a[i] != a[0];
    assert_true(distinct > 10);
}

static void
test_sampler_rng_save_restore(void **state)
{
    (void)state;
    enum { N = 50 };
    float l[N];
    int32_t first[20], again[20], other[20];
    uint64_t st[4];
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.seed = 7;
    p.top_k = 20;
    fill_logits(l, N, 3, 1.0f);
    struct eng_sampler *s = new_sampler(&p, N);
    for (int i = 0; i < 10; i++)
        sample_copy(s, l, N, NULL);
    eng_sampler_get_rng(s, st);
    for (int i = 0; i < 20; i++)
        first[i] = sample_copy(s, l, N, NULL);
    eng_sampler_set_rng(s, st);
    for (int i = 0; i < 20; i++)
        again[i] = sample_copy(s, l, N, NULL);
    assert_memory_equal(first, again, sizeof(first));

    /* A fresh sampler with another seed continues identically once given the state. */
    p.seed = 999;
    struct eng_sampler *t = new_sampler(&p, N);
    eng_sampler_set_rng(t, st);
    for (int i = 0; i < 20; i++)
        other[i] = sample_copy(t, l, N, NULL);
    assert_memory_equal(first, other, sizeof(first));

    /* An all-zero state is not kept (it would be a fixed point). */
    uint64_t zero[4] = {0, 0, 0, 0};
    eng_sampler_set_rng(t, zero);
    eng_sampler_get_rng(t, st);
    assert_true((st[0] | st[1] | st[2] | st[3]) != 0);
    eng_sampler_free(s);
    eng_sampler_free(t);
}

/* ---- Truncation ---- */

static void
test_sampler_top_k_one_is_greedy(void **state)
{
    (void)state;
    enum { N = 1000 };
    float l[N];
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.top_k = 1;
    p.temperature = 5.0f;
    struct eng_sampler *s = new_sampler(&p, N);
    for (uint32_t trial = 0; trial < 50; trial++) {
        fill_logits(l, N, trial, 3.0f);
        assert_int_equal(sample_copy(s, l, N, NULL), eng_sampler_argmax(l, N));
    }
    eng_sampler_free(s);
}

static void
test_sampler_top_p_tiny_is_greedy(void **state)
{
    (void)state;
    enum { N = 1000 };
    float l[N];
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.top_p = 1e-6f;
    p.temperature = 5.0f;
    struct eng_sampler *s = new_sampler(&p, N);
    for (uint32_t trial = 0; trial < 50; trial++) {
        fill_logits(l, N, trial, 3.0f);
        assert_int_equal(sample_copy(s, l, N, NULL), eng_sampler_argmax(l, N));
    }
    eng_sampler_free(s);
}

static int
cmp_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

static void
test_sampler_top_k_stays_in_top_set(void **state)
{
    (void)state;
    enum { N = 3000, K = 37 };
    float l[N], sorted[N];
    bool hit[N] = {false};
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.top_k = K;
    p.temperature = 100.0f; /* nearly flat over the survivors */
    p.seed = 5;
    fill_logits(l, N, 11, 2.0f);
    memcpy(sorted, l, sizeof(l));
    qsort(sorted, N, sizeof(float), cmp_desc);
    float kth = sorted[K - 1];
    struct eng_sampler *s = new_sampler(&p, N);
    int n_hit = 0;
    for (int i = 0; i < 4000; i++) {
        int32_t id = sample_copy(s, l, N, NULL);
        assert_true(l[id] >= kth);
        if (!hit[id])
            n_hit++;
        hit[id] = true;
    }
    assert_int_equal(n_hit, K); /* every survivor reachable, none else */
    eng_sampler_free(s);
}

/* Probabilities 0.4, 0.4, 0.2: over the top_k = 2 survivors they are 0.5, 0.5, so top_p = 0.5
 * keeps only the first (llama.cpp renormalises before top_p). */
static void
test_sampler_top_p_after_top_k_renormalises(void **state)
{
    (void)state;
    float l[3] = {logf(0.4f), logf(0.4f), logf(0.2f)};
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.top_k = 2;
    p.top_p = 0.5f;
    struct eng_sampler *s = new_sampler(&p, 3);
    for (int i = 0; i < 200; i++)
        assert_int_equal(sample_copy(s, l, 3, NULL), 0);
    eng_sampler_free(s);
}

/* Flat logits over 5000 tokens: top_p = 0.9 keeps the 4500 lowest ids (ties rank by id), which
 * needs the selection prefix to grow past its first 256. */
static void
test_sampler_top_p_expands_prefix(void **state)
{
    (void)state;
    enum { N = 5000 };
    static float l[N];
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.top_p = 0.9f;
    p.seed = 1;
    for (int i = 0; i < N; i++)
        l[i] = 0.25f;
    struct eng_sampler *s = new_sampler(&p, N);
    int32_t max_id = 0;
    for (int i = 0; i < 5000; i++) {
        int32_t id = sample_copy(s, l, N, NULL);
        if (id > max_id)
            max_id = id;
    }
    assert_true(max_id < 4502);
    assert_true(max_id > 4400);
    eng_sampler_free(s);
}

/* Non-flat logits whose nucleus is thousands of tokens (the histogram path): the drawn tokens are
 * exactly the smallest top-ranked set holding top_p of the mass, computed here by a full sort. */
static int
cmp_rank(const void *a, const void *b)
{
    const float *la = *(const float *const *)a, *lb = *(const float *const *)b;
    if (*la != *lb)
        return *la > *lb ? -1 : 1;
    return la < lb ? -1 : la > lb; /* ties by id (address) */
}

static void
test_sampler_top_p_matches_full_sort(void **state)
{
    (void)state;
    enum { N = 3000 };
    static float l[N];
    static const float *order[N];
    static int rank[N];
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.top_p = 0.8f;
    p.temperature = 1000.0f; /* nearly uniform over the nucleus, so its edge gets drawn */
    p.seed = 17;
    fill_logits(l, N, 5, 1.5f);
    for (int i = 0; i < N; i++)
        order[i] = &l[i];
    qsort(order, N, sizeof(order[0]), cmp_rank);
    double z = 0.0, cum = 0.0;
    float m = *order[0];
    for (int i = 0; i < N; i++)
        z += exp((double)l[i] - m);
    int keep = N;
    for (int i = 0; i < N; i++) {
        rank[order[i] - l] = i;
        cum += exp((double)*order[i] - m) / z;
        if (cum >= 0.8 && keep == N)
            keep = i + 1;
    }
    assert_true(keep > 1000); /* really past the first prefix of 256 */
    struct eng_sampler *s = new_sampler(&p, N);
    int max_rank = 0;
    for (int i = 0; i < 10000; i++) { /* misses the last 3 of ~1800 with p < 1e-7 */
        int r = rank[sample_copy(s, l, N, NULL)];
        max_rank = r > max_rank ? r : max_rank;
    }
    /* The last kept token has rank keep - 1; float rounding may move the cut by one. */
    assert_in_range(max_rank, keep - 2, keep);
    eng_sampler_free(s);
}

static void
test_sampler_min_p_filters(void **state)
{
    (void)state;
    /* Relative to the max: 1, 0.6, 0.45, 0.1, 0.05. min_p = 0.5 keeps ids 0 and 1. */
    float l[5] = {0.0f, logf(0.6f), logf(0.45f), logf(0.1f), logf(0.05f)};
    int count[5] = {0};
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.min_p = 0.5f;
    p.seed = 3;
    struct eng_sampler *s = new_sampler(&p, 5);
    for (int i = 0; i < 4000; i++)
        count[sample_copy(s, l, 5, NULL)]++;
    assert_int_equal(count[2] + count[3] + count[4], 0);
    /* p(0) = 1 / 1.6 = 0.625: 2500 expected, sd ~31. */
    assert_in_range(count[0], 2300, 2700);
    eng_sampler_free(s);

    /* Same through the sorted-candidate path (with top_k). */
    p.top_k = 4;
    s = new_sampler(&p, 5);
    memset(count, 0, sizeof(count));
    for (int i = 0; i < 4000; i++)
        count[sample_copy(s, l, 5, NULL)]++;
    assert_int_equal(count[2] + count[3] + count[4], 0);
    assert_in_range(count[0], 2300, 2700);
    eng_sampler_free(s);
}

/* ---- Temperature ---- */

/* Two tokens with weights 1 : 2. At temperature t, p(1) = 2^(1/t) / (1 + 2^(1/t)). */
static void
check_temperature(float t, int top_k, uint64_t seed)
{
    enum { DRAWS = 20000 };
    float l[4] = {0.0f, logf(2.0f), -INFINITY, -INFINITY};
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.temperature = t;
    p.top_k = top_k;
    p.seed = seed;
    struct eng_sampler *s = new_sampler(&p, 4);
    int ones = 0;
    for (int i = 0; i < DRAWS; i++) {
        int32_t id = sample_copy(s, l, 4, NULL);
        assert_true(id == 0 || id == 1);
        ones += id == 1;
    }
    double w = pow(2.0, 1.0 / t); /* inf for a tiny t: then p(1) = 1 */
    double expect = isinf(w) ? 1.0 : w / (1.0 + w);
    double sd = sqrt(expect * (1.0 - expect) / DRAWS);
    double got = (double)ones / DRAWS;
    if (sd < 1e-9)
        assert_int_equal(ones, DRAWS); /* a near-zero temperature: token 1 every time */
    else
        assert_true(fabs(got - expect) < 5.0 * sd);
    eng_sampler_free(s);
}

static void
test_sampler_temperature_statistics(void **state)
{
    (void)state;
    /* 0.5: p = 0.8; 1: p = 2/3; 2: p = 0.586. Full-vocabulary and sorted-candidate paths. */
    check_temperature(0.5f, 0, 11);
    check_temperature(1.0f, 0, 12);
    check_temperature(2.0f, 0, 13);
    check_temperature(0.5f, 3, 14);
    check_temperature(2.0f, 3, 15);
    /* A tiny positive temperature is effectively greedy and must not produce NaN. */
    check_temperature(1e-30f, 0, 16);
}

/* ---- Penalties and bias ---- */

static void
test_sampler_repetition_penalty(void **state)
{
    (void)state;
    float l[6] = {4.0f, -1.0f, 2.0f, 3.0f, 0.0f, 1.0f};
    /* Token 0 three times (penalised once), token 1 once, token 2 only outside the window. */
    int32_t hist[6] = {2, 0, 1, 0, 0, 4};
    struct eng_sample out;
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.repetition_penalty = 2.0f;
    p.repeat_last_n = 5;
    struct eng_sampler *s = new_sampler(&p, 6);
    assert_int_equal(eng_sampler_sample(s, l, hist, 6, &out), 0);
    assert_true(l[0] == 2.0f);  /* positive: divided */
    assert_true(l[1] == -2.0f); /* negative: multiplied */
    assert_true(l[2] == 2.0f);  /* outside the window */
    assert_true(l[3] == 3.0f);  /* never seen */
    assert_true(l[4] == 0.0f);
    assert_true(l[5] == 1.0f);
    assert_int_equal(out.id, 3);

    /* A second call sees a clean slate: penalties do not accumulate in the sampler. */
    float l2[6] = {4.0f, -1.0f, 2.0f, 3.0f, 0.0f, 1.0f};
    assert_int_equal(eng_sampler_sample(s, l2, hist, 6, &out), 0);
    assert_true(l2[0] == 2.0f);
    eng_sampler_free(s);

    /* repeat_last_n = 0: the whole history. Ids out of range are ignored. */
    p.repeat_last_n = 0;
    s = new_sampler(&p, 6);
    float l3[6] = {4.0f, -1.0f, 2.0f, 3.0f, 0.0f, 1.0f};
    int32_t hist3[4] = {2, 99, -1, 2};
    assert_int_equal(eng_sampler_sample(s, l3, hist3, 4, &out), 0);
    assert_true(l3[2] == 1.0f);
    assert_true(l3[0] == 4.0f);
    eng_sampler_free(s);
}

static void
test_sampler_presence_frequency_penalty(void **state)
{
    (void)state;
    float l[5] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
    int32_t hist[7] = {0, 1, 1, 1, 3, 0, 1};
    struct eng_sample out;
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    p.repeat_last_n = 1; /* irrelevant: repetition penalty is off */
    struct eng_sampler *s = new_sampler(&p, 5);
    assert_int_equal(eng_sampler_sample(s, l, hist, 7, &out), 0);
    assert_float_equal(l[0], 1.0f - 0.5f - 2 * 0.25f, 1e-6);
    assert_float_equal(l[1], 1.0f - 0.5f - 4 * 0.25f, 1e-6);
    assert_float_equal(l[2], 1.0f, 0.0);
    assert_float_equal(l[3], 1.0f - 0.5f - 1 * 0.25f, 1e-6);
    assert_float_equal(l[4], 1.0f, 0.0);
    assert_int_equal(out.id, 2);
    eng_sampler_free(s);

    /* Negative penalties encourage repetition (OpenAI allows -2..2). */
    p.presence_penalty = -1.0f;
    p.frequency_penalty = 0.0f;
    s = new_sampler(&p, 5);
    float l2[5] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
    assert_int_equal(eng_sampler_sample(s, l2, hist, 7, &out), 0);
    assert_float_equal(l2[3], 2.0f, 1e-6);
    assert_int_equal(out.id, 0);
    eng_sampler_free(s);
}

static void
test_sampler_repetition_and_frequency_combine(void **state)
{
    (void)state;
    float l[3] = {6.0f, 1.0f, 0.0f};
    int32_t hist[2] = {0, 0};
    struct eng_sample out;
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.repetition_penalty = 1.5f;
    p.frequency_penalty = 1.0f;
    struct eng_sampler *s = new_sampler(&p, 3);
    assert_int_equal(eng_sampler_sample(s, l, hist, 2, &out), 0);
    assert_float_equal(l[0], 6.0f / 1.5f - 2.0f, 1e-6); /* repetition first, then frequency */
    eng_sampler_free(s);
}

static void
test_sampler_logit_bias(void **state)
{
    (void)state;
    float l[4] = {5.0f, 1.0f, 0.0f, 0.5f};
    struct eng_logit_bias bias[3] = {{0, -INFINITY}, {2, 0.75f}, {2, 0.75f}};
    struct eng_sample out;
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.logit_bias = bias;
    p.n_logit_bias = 3;
    struct eng_sampler *s = new_sampler(&p, 4);
    bias[0].bias = 100.0f; /* copied at _new: later changes do not leak in */
    float tmp[4];
    memcpy(tmp, l, sizeof(l));
    assert_int_equal(eng_sampler_sample(s, tmp, NULL, 0, &out), 0);
    assert_true(isinf(tmp[0]) && tmp[0] < 0);
    assert_float_equal(tmp[2], 1.5f, 1e-6); /* repeated ids add up */
    assert_int_equal(out.id, 2);
    eng_sampler_free(s);

    /* Sampling never picks the banned token, even though it dominated before the ban. */
    bias[0].bias = -INFINITY;
    p.n_logit_bias = 1;
    p.temperature = 1.0f;
    p.seed = 9;
    s = new_sampler(&p, 4);
    for (int i = 0; i < 2000; i++)
        assert_int_not_equal(sample_copy(s, l, 4, NULL), 0);
    eng_sampler_free(s);
}

static void
test_sampler_no_finite_logit_is_edom(void **state)
{
    (void)state;
    float l[3] = {-INFINITY, NAN, -INFINITY};
    struct eng_sample out;
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    struct eng_sampler *s = new_sampler(&p, 3);
    assert_int_equal(eng_sampler_sample(s, l, NULL, 0, &out), -EDOM);
    float l2[3] = {0.0f, INFINITY, 1.0f};
    assert_int_equal(eng_sampler_sample(s, l2, NULL, 0, &out), -EDOM);
    /* A NaN beside finite logits is treated as -inf. */
    float l3[3] = {NAN, 0.0f, NAN};
    for (int i = 0; i < 20; i++)
        assert_int_equal(sample_copy(s, l3, 3, NULL), 1);
    eng_sampler_free(s);
}

/* ---- Logprobs ---- */

static void
test_sampler_logprobs_consistent(void **state)
{
    (void)state;
    enum { N = 8 };
    float l[N] = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f, -INFINITY, 2.0f, 0.0f};
    double ref[N], z = 0.0;
    for (int i = 0; i < N; i++)
        z += exp((double)l[i] - 3.0);
    for (int i = 0; i < N; i++)
        ref[i] = (double)l[i] - 3.0 - log(z);

    struct eng_sample out;
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.top_logprobs = N;
    p.temperature = 0.3f; /* logprobs are reported before temperature */
    p.top_k = 2;          /* and before truncation */
    struct eng_sampler *s = new_sampler(&p, N);
    for (int trial = 0; trial < 20; trial++) {
        sample_copy(s, l, N, &out);
        assert_true(out.id == 1 || out.id == 3);
        assert_float_equal(out.logprob, ref[out.id], 1e-5);
        assert_int_equal(out.n_top, N);
        double total = 0.0;
        for (int i = 0; i < N; i++) {
            total += exp(out.top_logprobs[i]);
            assert_float_equal(out.top_logprobs[i], ref[out.top_ids[i]], 1e-5);
            if (i > 0)
                assert_true(out.top_logprobs[i] <= out.top_logprobs[i - 1]);
        }
        assert_float_equal(total, 1.0, 1e-5);
        /* Sorted with ties by id: 1 before 3, the banned token last. */
        assert_int_equal(out.top_ids[0], 1);
        assert_int_equal(out.top_ids[1], 3);
        assert_int_equal(out.top_ids[2], 6);
        assert_int_equal(out.top_ids[N - 1], 5);
    }
    eng_sampler_free(s);

    /* Fewer alternatives than tokens; none asked. */
    p.top_logprobs = 3;
    s = new_sampler(&p, N);
    sample_copy(s, l, N, &out);
    assert_int_equal(out.n_top, 3);
    assert_int_equal(out.top_ids[2], 6);
    eng_sampler_free(s);
    p.top_logprobs = 0;
    s = new_sampler(&p, N);
    sample_copy(s, l, N, &out);
    assert_int_equal(out.n_top, 0);
    eng_sampler_free(s);
}

/* The top list on a large vocabulary agrees with a full sort. */
static void
test_sampler_top_logprobs_match_sort(void **state)
{
    (void)state;
    enum { N = 20000 };
    static float l[N], sorted[N];
    struct eng_sample out;
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.top_logprobs = ENG_SAMPLER_MAX_TOP_LOGPROBS;
    p.temperature = 0.0f;
    fill_logits(l, N, 21, 10.0f);
    memcpy(sorted, l, sizeof(l));
    qsort(sorted, N, sizeof(float), cmp_desc);
    struct eng_sampler *s = new_sampler(&p, N);
    sample_copy(s, l, N, &out);
    assert_int_equal(out.n_top, ENG_SAMPLER_MAX_TOP_LOGPROBS);
    assert_int_equal(out.top_ids[0], out.id);
    assert_float_equal(out.top_logprobs[0], out.logprob, 0.0);
    for (int i = 0; i < ENG_SAMPLER_MAX_TOP_LOGPROBS; i++)
        assert_true(l[out.top_ids[i]] == sorted[i]);
    eng_sampler_free(s);
}

/* ---- Validation ---- */

static void
expect_invalid(const struct eng_sampler_params *p, int n_vocab)
{
    struct eng_sampler *s = NULL;
    assert_int_equal(eng_sampler_new(p, n_vocab, &s), -EINVAL);
    assert_null(s);
}

static void
test_sampler_invalid_params(void **state)
{
    (void)state;
    struct eng_sampler_params d, p;
    struct eng_logit_bias b = {3, 1.0f};
    struct eng_sampler *s = NULL;
    eng_sampler_params_default(&d);

    expect_invalid(&d, 0);
    assert_int_equal(eng_sampler_new(NULL, 10, &s), -EINVAL);
    assert_int_equal(eng_sampler_new(&d, 10, NULL), -EINVAL);

    p = d, p.temperature = -0.1f, expect_invalid(&p, 10);
    p = d, p.temperature = NAN, expect_invalid(&p, 10);
    p = d, p.temperature = INFINITY, expect_invalid(&p, 10);
    p = d, p.top_k = -1, expect_invalid(&p, 10);
    p = d, p.top_p = 0.0f, expect_invalid(&p, 10);
    p = d, p.top_p = 1.5f, expect_invalid(&p, 10);
    p = d, p.top_p = NAN, expect_invalid(&p, 10);
    p = d, p.min_p = -0.1f, expect_invalid(&p, 10);
    p = d, p.min_p = 1.01f, expect_invalid(&p, 10);
    p = d, p.repetition_penalty = 0.0f, expect_invalid(&p, 10);
    p = d, p.repetition_penalty = NAN, expect_invalid(&p, 10);
    p = d, p.repeat_last_n = -1, expect_invalid(&p, 10);
    p = d, p.presence_penalty = INFINITY, expect_invalid(&p, 10);
    p = d, p.frequency_penalty = NAN, expect_invalid(&p, 10);
    p = d, p.top_logprobs = -1, expect_invalid(&p, 10);
    p = d, p.top_logprobs = ENG_SAMPLER_MAX_TOP_LOGPROBS + 1, expect_invalid(&p, 10);
    p = d, p.n_logit_bias = 1, p.logit_bias = NULL, expect_invalid(&p, 10);
    p = d, p.n_logit_bias = -1, expect_invalid(&p, 10);
    p = d, p.n_logit_bias = 1, p.logit_bias = &b, expect_invalid(&p, 3); /* id 3 of 3 */
    b.id = -1, expect_invalid(&p, 10);
    b.id = 2, b.bias = NAN, expect_invalid(&p, 10);
    b.bias = INFINITY, expect_invalid(&p, 10);

    /* The edges that are valid. */
    b.bias = -INFINITY;
    p.temperature = 0.0f, p.top_p = 1.0f, p.min_p = 1.0f, p.top_k = 0;
    p.top_logprobs = ENG_SAMPLER_MAX_TOP_LOGPROBS;
    assert_int_equal(eng_sampler_new(&p, 3, &s), 0);

    /* Bad sample arguments. */
    float l[3] = {0.0f, 1.0f, 2.0f};
    struct eng_sample out;
    assert_int_equal(eng_sampler_sample(s, l, NULL, 2, &out), -EINVAL);
    assert_int_equal(eng_sampler_sample(s, l, NULL, -1, &out), -EINVAL);
    assert_int_equal(eng_sampler_sample(s, NULL, NULL, 0, &out), -EINVAL);
    assert_int_equal(eng_sampler_sample(s, l, NULL, 0, NULL), -EINVAL);
    eng_sampler_free(s);
    eng_sampler_free(NULL);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sampler_greedy_picks_argmax),
        cmocka_unit_test(test_sampler_argmax_ties_and_nan),
        cmocka_unit_test(test_sampler_seed_reproducible),
        cmocka_unit_test(test_sampler_rng_save_restore),
        cmocka_unit_test(test_sampler_top_k_one_is_greedy),
        cmocka_unit_test(test_sampler_top_p_tiny_is_greedy),
        cmocka_unit_test(test_sampler_top_k_stays_in_top_set),
        cmocka_unit_test(test_sampler_top_p_after_top_k_renormalises),
        cmocka_unit_test(test_sampler_top_p_expands_prefix),
        cmocka_unit_test(test_sampler_top_p_matches_full_sort),
        cmocka_unit_test(test_sampler_min_p_filters),
        cmocka_unit_test(test_sampler_temperature_statistics),
        cmocka_unit_test(test_sampler_repetition_penalty),
        cmocka_unit_test(test_sampler_presence_frequency_penalty),
        cmocka_unit_test(test_sampler_repetition_and_frequency_combine),
        cmocka_unit_test(test_sampler_logit_bias),
        cmocka_unit_test(test_sampler_no_finite_logit_is_edom),
        cmocka_unit_test(test_sampler_logprobs_consistent),
        cmocka_unit_test(test_sampler_top_logprobs_match_sort),
        cmocka_unit_test(test_sampler_invalid_params),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Attention kernels: every ISA against kern_attn_f32_ref, and the reference against a direct
 * double-precision computation. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/kern.h"

static float
frand(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xffffff) / (float)0x1000000 * 2.0f - 1.0f;
}

struct attn_case {
    int n_kv, n_q, head_dim, stride;
};

static const struct attn_case cases[] = {
    {1, 1, 64, 64},   {7, 3, 64, 192},  {16, 3, 64, 192}, {17, 4, 128, 256},
    {100, 3, 64, 64}, {513, 2, 32, 96}, {33, 1, 48, 48},
};

/* Fills q, k, v; larger q makes the softmax peaky, which tests the max subtraction. */
static void
fill(float *x, size_t n, float scale, uint64_t *s)
{
    for (size_t i = 0; i < n; i++)
        x[i] = frand(s) * scale;
}

/* Double-precision attention for one query head. */
static void
attn_double(double *out, const float *q, const float *k, const float *v, int n_kv, int hd,
            int stride, double scale)
{
    double *w = calloc((size_t)n_kv, sizeof(double));
    double mx = -INFINITY, sum = 0;
    for (int p = 0; p < n_kv; p++) {
        double acc = 0;
        for (int d = 0; d < hd; d++)
            acc += (double)q[d] * k[(size_t)p * stride + d];
        w[p] = acc * scale;
        mx = w[p] > mx ? w[p] : mx;
    }
    for (int p = 0; p < n_kv; p++)
        sum += (w[p] = exp(w[p] - mx));
    for (int d = 0; d < hd; d++) {
        double acc = 0;
        for (int p = 0; p < n_kv; p++)
            acc += w[p] / sum * v[(size_t)p * stride + d];
        out[d] = acc;
    }
    free(w);
}

static void
run_case(const struct attn_case *c, enum kern_isa isa, float qscale)
{
    uint64_t s = 42 + (uint64_t)c->n_kv;
    size_t kv_n = (size_t)c->n_kv * (size_t)c->stride;
    size_t q_n = (size_t)c->n_q * (size_t)c->head_dim;
    float *q = malloc(q_n * sizeof(float)), *k = malloc(kv_n * sizeof(float));
    float *v = malloc(kv_n * sizeof(float)), *out = malloc(q_n * sizeof(float));
    float *ref = malloc(q_n * sizeof(float));
    float *scratch = malloc((size_t)c->n_q * (size_t)c->n_kv * sizeof(float));
    double *exact = malloc((size_t)c->head_dim * sizeof(double));
    fill(q, q_n, qscale, &s);
    fill(k, kv_n, 1.0f, &s);
    fill(v, kv_n, 1.0f, &s);
    float scale = 1.0f / sqrtf((float)c->head_dim);

    /* The reference reads one contiguous block; the kernel under test reads the same rows copied
     * into 16-row blocks stored in reverse order (as a paged cache scatters them). */
    const float *k1[1] = {k}, *v1[1] = {v};
    kern_attn_f32_ref(ref, q, k1, v1, c->n_kv, c->n_kv, c->n_q, c->head_dim, (size_t)c->stride,
                      scale, scratch);
    int n_blk = (c->n_kv + 15) / 16;
    size_t blk_floats = 16 * (size_t)c->stride;
    float *kpaged = calloc((size_t)n_blk * blk_floats, sizeof(float));
    float *vpaged = calloc((size_t)n_blk * blk_floats, sizeof(float));
    const float **kb = calloc((size_t)n_blk, sizeof(*kb)),
                **vb = calloc((size_t)n_blk, sizeof(*vb));
    for (int b = 0; b < n_blk; b++) {
        int slot = n_blk - 1 - b;
        int rows = c->n_kv - b * 16 < 16 ? c->n_kv - b * 16 : 16;
        memcpy(kpaged + slot * blk_floats, k + (size_t)b * blk_floats,
               rows * c->stride * sizeof(float));
        memcpy(vpaged + slot * blk_floats, v + (size_t)b * blk_floats,
               rows * c->stride * sizeof(float));
        kb[b] = kpaged + slot * blk_floats;
        vb[b] = vpaged + slot * blk_floats;
    }
    assert_int_equal(kern_cpu_set_isa(isa), 0);
    kern_attn_f32(out, q, kb, vb, 16, c->n_kv, c->n_q, c->head_dim, (size_t)c->stride, scale,
                  scratch);
    free(kpaged);
    free(vpaged);
    free(kb);
    free(vb);
    for (int j = 0; j < c->n_q; j++) {
        attn_double(exact, q + (size_t)j * c->head_dim, k, v, c->n_kv, c->head_dim, c->stride,
                    scale);
        for (int d = 0; d < c->head_dim; d++) {
            size_t i = (size_t)j * c->head_dim + (size_t)d;
            /* The outputs are convex combinations of values in [-1, 1]: absolute bounds. */
            assert_true(fabs(ref[i] - exact[d]) < 1e-5);
            assert_true(fabsf(out[i] - ref[i]) < 2e-5f);
        }
    }
    free(q);
    free(k);
    free(v);
    free(out);
    free(ref);
    free(scratch);
    free(exact);
}

static void
check_isa(enum kern_isa isa)
{
    if (isa > kern_cpu_best_isa())
        skip();
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        run_case(&cases[i], isa, 1.0f);
        run_case(&cases[i], isa, 30.0f);
    }
    kern_cpu_set_isa(kern_cpu_best_isa());
}

static void
test_attn_scalar_matches_exact(void **state)
{
    (void)state;
    check_isa(KERN_ISA_SCALAR);
}

static void
test_attn_avx2_matches_ref(void **state)
{
    (void)state;
    check_isa(KERN_ISA_AVX2);
}

static void
test_attn_avx512_matches_ref(void **state)
{
    (void)state;
    check_isa(KERN_ISA_AVX512);
}

/* One cached position: the output is exactly that position's value row. */
static void
test_attn_single_position_is_value(void **state)
{
    (void)state;
    float q[64], k[64], v[64], out[64], scratch[1];
    uint64_t s = 7;
    fill(q, 64, 5.0f, &s);
    fill(k, 64, 1.0f, &s);
    fill(v, 64, 1.0f, &s);
    const float *kb[1] = {k}, *vb[1] = {v};
    kern_attn_f32(out, q, kb, vb, 16, 1, 1, 64, 64, 0.125f, scratch);
    for (int d = 0; d < 64; d++)
        assert_true(fabsf(out[d] - v[d]) < 1e-6f);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attn_scalar_matches_exact),
        cmocka_unit_test(test_attn_avx2_matches_ref),
        cmocka_unit_test(test_attn_avx512_matches_ref),
        cmocka_unit_test(test_attn_single_position_is_value),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

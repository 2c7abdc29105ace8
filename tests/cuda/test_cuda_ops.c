/*
 * The CUDA kernels (kernels/cuda/kern_cuda.h) against the CPU references on fresh random data, and
 * the CUDA forward pass (engine/model_cuda.h) against the CPU engine on the tiny generated models
 * ($BUILD/tests/models/tiny-<type>.gguf, BUILD defaults to build/cuda). Errors are NMSE against
 * the reference with a bound per op and weight type.
 *
 * Without a usable CUDA device (kern_cuda_probe fails: no GPU, no driver) every test calls skip():
 * cmocka reports each as SKIPPED, never as passed, and the binary exits 0.
 *
 * Run on a GPU machine: make cuda && build/cuda/tests/test_cuda_ops
 */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/cm_util.h"
#include "engine/gguf.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/model_cuda.h"
#include "kernels/cuda/kern_cuda.h"
#include "kernels/kern.h"

/* ---- Fixtures and helpers ---- */

static struct kern_cuda *g_kc; /* NULL: no device, every test skips */

static const enum kern_dtype all_types[] = {
    KERN_DTYPE_F32,  KERN_DTYPE_F16,  KERN_DTYPE_BF16, KERN_DTYPE_Q4_0,
    KERN_DTYPE_Q4_1, KERN_DTYPE_Q5_0, KERN_DTYPE_Q5_1, KERN_DTYPE_Q8_0,
    KERN_DTYPE_Q4_K, KERN_DTYPE_Q5_K, KERN_DTYPE_Q6_K,
};
#define N_TYPES (sizeof(all_types) / sizeof(all_types[0]))

static uint64_t
rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [-scale, scale). */
static void
fill(uint64_t *s, float *x, int64_t n, float scale)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = (float)((double)(rng_next(s) >> 11) * 0x1.0p-53 * 2.0 - 1.0) * scale;
}

static double
nmse(const float *a, const float *ref, int64_t n)
{
    double e = 0.0, s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)ref[i];
        e += d * d;
        s += (double)ref[i] * (double)ref[i];
    }
    return s > 0.0 ? e / s : e;
}

/* Device buffer holding a copy of host floats. */
static void *
dev_from(const void *host, size_t bytes)
{
    void *d = NULL;
    assert_int_equal(kern_cuda_alloc(g_kc, bytes, &d), 0);
    assert_int_equal(kern_cuda_upload(g_kc, d, host, bytes), 0);
    return d;
}

static void
to_host(void *host, const void *dev, size_t bytes)
{
    assert_int_equal(kern_cuda_download(g_kc, host, dev, bytes), 0);
}

/* A random host matrix of type t (n_out rows of n_in), caller frees m->data. */
static void
random_matrix(uint64_t *s, enum kern_dtype t, int64_t n_in, int64_t n_out, struct kern_matrix *m)
{
    float *row = malloc((size_t)n_in * sizeof(float));
    size_t rb = kern_row_bytes((uint32_t)t, n_in);
    uint8_t *data = malloc(rb * (size_t)n_out);
    assert_non_null(row);
    assert_non_null(data);
    for (int64_t r = 0; r < n_out; r++) {
        fill(s, row, n_in, 1.0f);
        assert_int_equal(kern_quantize_row(t, row, data + (size_t)r * rb, n_in), 0);
    }
    free(row);
    *m = (struct kern_matrix){
        .type = t, .n_in = n_in, .n_out = n_out, .row_bytes = rb, .data = data};
}

static int
group_setup(void **state)
{
    (void)state;
    char name[256];
    if (kern_cuda_probe(name, sizeof(name)) < 0) {
        fprintf(stderr, "test_cuda_ops: no CUDA device (cudaGetDeviceCount failed or found none): "
                        "every device test is SKIPPED\n");
        return 0;
    }
    if (kern_cuda_new(&g_kc) < 0)
        return -1;
    fprintf(stderr, "test_cuda_ops: device %s\n", name);
    return 0;
}

static int
group_teardown(void **state)
{
    (void)state;
    kern_cuda_free(g_kc);
    g_kc = NULL;
    return 0;
}

/* ---- Weights: dequantization and matmuls ---- */

static void
test_cuda_ops_dequant_f16(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    uint64_t s = 11;
    const int64_t n_in = 512, n_out = 37;
    for (size_t ti = 0; ti < N_TYPES; ti++) {
        struct kern_matrix w;
        struct kern_cuda_matrix dw;
        random_matrix(&s, all_types[ti], n_in, n_out, &w);
        assert_int_equal(kern_cuda_matrix_upload(g_kc, &w, &dw), 0);
        uint16_t *d16 = NULL;
        assert_int_equal(kern_cuda_alloc(g_kc, (size_t)(n_in * n_out) * 2, (void **)&d16), 0);
        /* Rows 3..n_out: an offset tile, as the GEMM path uses them. */
        assert_int_equal(kern_cuda_dequant_f16(g_kc, &dw, 3, n_out, d16), 0);
        uint16_t *h16 = malloc((size_t)(n_in * n_out) * 2);
        float *got = malloc((size_t)(n_in * n_out) * sizeof(float));
        float *ref = malloc((size_t)(n_in * n_out) * sizeof(float));
        to_host(h16, d16, (size_t)(n_in * (n_out - 3)) * 2);
        for (int64_t r = 3; r < n_out; r++) {
            assert_int_equal(kern_dequant_row(w.type, (const uint8_t *)w.data + r * w.row_bytes,
                                              ref + (r - 3) * n_in, n_in),
                             0);
            for (int64_t i = 0; i < n_in; i++)
                got[(r - 3) * n_in + i] = cm_fp16_to_f32(h16[(r - 3) * n_in + i]);
        }
        double e = nmse(got, ref, n_in * (n_out - 3));
        if (!(e < 1e-6)) /* f16 rounding of the dequantized values only */
            fail_msg("%s: dequant f16 nmse %g", kern_dtype_traits(w.type)->name, e);
        kern_cuda_dfree(g_kc, d16);
        kern_cuda_matrix_free(g_kc, &dw);
        free((void *)w.data);
        free(h16);
        free(got);
        free(ref);
    }
}

/* W x for n_tok rows through fn against kern_matmul_ref, NMSE below tol. */
static void
check_matmul(int (*fn)(struct kern_cuda *, const struct kern_cuda_matrix *, const float *, int,
                       float *),
             const char *what, enum kern_dtype t, int64_t n_in, int64_t n_out, int n_tok,
             double tol, uint64_t *s)
{
    struct kern_matrix w;
    struct kern_cuda_matrix dw;
    random_matrix(s, t, n_in, n_out, &w);
    assert_int_equal(kern_cuda_matrix_upload(g_kc, &w, &dw), 0);
    float *x = malloc((size_t)(n_tok * n_in) * sizeof(float));
    float *y = malloc((size_t)(n_tok * n_out) * sizeof(float));
    float *yr = malloc((size_t)(n_tok * n_out) * sizeof(float));
    fill(s, x, n_tok * n_in, 1.0f);
    float *dx = dev_from(x, (size_t)(n_tok * n_in) * sizeof(float));
    float *dy = NULL;
    assert_int_equal(kern_cuda_alloc(g_kc, (size_t)(n_tok * n_out) * sizeof(float), (void **)&dy),
                     0);
    assert_int_equal(fn(g_kc, &dw, dx, n_tok, dy), 0);
    to_host(y, dy, (size_t)(n_tok * n_out) * sizeof(float));
    assert_int_equal(kern_matmul_ref(&w, x, n_tok, yr), 0);
    double e = nmse(y, yr, n_tok * n_out);
    if (!(e < tol))
        fail_msg("%s %s n_in=%lld n_out=%lld n_tok=%d: nmse %g >= %g", what,
                 kern_dtype_traits(t)->name, (long long)n_in, (long long)n_out, n_tok, e, tol);
    kern_cuda_dfree(g_kc, dx);
    kern_cuda_dfree(g_kc, dy);
    kern_cuda_matrix_free(g_kc, &dw);
    free((void *)w.data);
    free(x);
    free(y);
    free(yr);
}

static void
test_cuda_ops_matvec(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    uint64_t s = 12;
    static const int n_toks[] = {1, 2, 3, 8, 11};
    for (size_t ti = 0; ti < N_TYPES; ti++)
        for (size_t k = 0; k < sizeof(n_toks) / sizeof(n_toks[0]); k++)
            /* Exact weights and f32 activations: only the f32 summation differs from the double
             * reference. 67 rows: a partial last block of warps. */
            check_matmul(kern_cuda_matvec, "matvec", all_types[ti], 768, 67, n_toks[k], 1e-9, &s);
}

static void
test_cuda_ops_gemm(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    uint64_t s = 13;
    static const int n_toks[] = {16, 40};
    for (size_t ti = 0; ti < N_TYPES; ti++)
        for (size_t k = 0; k < sizeof(n_toks) / sizeof(n_toks[0]); k++)
            /* f16 weights and activations (relative rounding 2^-11 each), f32 sums. */
            check_matmul(kern_cuda_gemm, "gemm", all_types[ti], 512, 130, n_toks[k], 2e-6, &s);
    /* kern_cuda_matmul takes each path by n_tok. */
    check_matmul(kern_cuda_matmul, "matmul", KERN_DTYPE_Q4_K, 256, 64, 5, 1e-9, &s);
    check_matmul(kern_cuda_matmul, "matmul", KERN_DTYPE_Q4_K, 256, 64, 17, 2e-6, &s);
}

/* ---- Element-wise and row ops ---- */

static void
test_cuda_ops_rmsnorm_swiglu_add(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    uint64_t s = 14;
    const int rows = 5, n = 1000;
    const size_t bytes = (size_t)rows * n * sizeof(float);
    float *x = malloc(bytes), *g = malloc(bytes), *ref = malloc(bytes), *got = malloc(bytes);
    float w[1000], b[1000];
    fill(&s, x, rows * n, 3.0f);
    fill(&s, g, rows * n, 4.0f);
    fill(&s, w, n, 1.0f);
    fill(&s, b, n, 1.0f);
    float *dx = dev_from(x, bytes), *dg = dev_from(g, bytes), *dw = dev_from(w, sizeof(w));
    float *db = dev_from(b, sizeof(b)), *dout = dev_from(x, bytes);

    assert_int_equal(kern_cuda_rmsnorm(g_kc, dout, dx, dw, rows, n, 1e-5f), 0);
    to_host(got, dout, bytes);
    for (int r = 0; r < rows; r++)
        kern_rmsnorm(ref + r * n, x + r * n, w, n, 1e-5f);
    assert_true(nmse(got, ref, rows * n) < 1e-12);

    assert_int_equal(kern_cuda_swiglu(g_kc, dout, dg, dx, (int64_t)rows * n), 0);
    to_host(got, dout, bytes);
    kern_swiglu(ref, g, x, rows * n);
    assert_true(nmse(got, ref, rows * n) < 1e-12);

    assert_int_equal(kern_cuda_add(g_kc, dout, dx, (int64_t)rows * n), 0);
    to_host(got, dout, bytes);
    kern_add(ref, x, rows * n);
    assert_true(nmse(got, ref, rows * n) < 1e-14);

    assert_int_equal(kern_cuda_add_rows(g_kc, dout, db, rows, n), 0);
    to_host(got, dout, bytes);
    for (int r = 0; r < rows; r++)
        kern_add(ref + r * n, b, n);
    assert_true(nmse(got, ref, rows * n) < 1e-14);

    kern_cuda_dfree(g_kc, dx);
    kern_cuda_dfree(g_kc, dg);
    kern_cuda_dfree(g_kc, dw);
    kern_cuda_dfree(g_kc, db);
    kern_cuda_dfree(g_kc, dout);
    free(x);
    free(g);
    free(ref);
    free(got);
}

static void
test_cuda_ops_softmax_argmax(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    uint64_t s = 15;
    const int rows = 4, n = 3001;
    const size_t bytes = (size_t)rows * n * sizeof(float);
    float *x = malloc(bytes), *got = malloc(bytes);
    fill(&s, x, rows * n, 10.0f);
    x[2 * n + 17] = 50.0f; /* a tie for row 2: the first index wins */
    x[2 * n + 900] = 50.0f;
    float *dx = dev_from(x, bytes);
    int32_t *didx = NULL, idx[4];
    assert_int_equal(kern_cuda_alloc(g_kc, sizeof(idx), (void **)&didx), 0);
    assert_int_equal(kern_cuda_argmax(g_kc, dx, rows, n, didx), 0);
    to_host(idx, didx, sizeof(idx));
    for (int r = 0; r < rows; r++) {
        int best = 0;
        for (int i = 1; i < n; i++)
            best = x[r * n + i] > x[r * n + best] ? i : best;
        assert_int_equal(idx[r], best);
    }
    assert_int_equal(idx[2], 17);
    assert_int_equal(kern_cuda_softmax(g_kc, dx, rows, n), 0);
    to_host(got, dx, bytes);
    for (int r = 0; r < rows; r++)
        kern_softmax(x + r * n, n);
    assert_true(nmse(got, x, rows * n) < 1e-10);
    kern_cuda_dfree(g_kc, dx);
    kern_cuda_dfree(g_kc, didx);
    free(x);
    free(got);
}

/* The CPU model's rotation (engine/model.c) written out for one head. */
static void
rope_ref(float *xh, int pos, const float *freq, int n_rot, int neox)
{
    for (int j = 0; j < n_rot / 2; j++) {
        float a = (float)pos * freq[j], c = cosf(a), sn = sinf(a);
        int ia = neox ? j : 2 * j, ib = neox ? j + n_rot / 2 : 2 * j + 1;
        float x0 = xh[ia], x1 = xh[ib];
        xh[ia] = x0 * c - x1 * sn;
        xh[ib] = x0 * sn + x1 * c;
    }
}

static void
test_cuda_ops_rope(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    uint64_t s = 16;
    enum { N_TOK = 6, N_HEADS = 3, HD = 64, N_ROT = 48 };
    int32_t pos[N_TOK] = {0, 1, 7, 100, 1000, 4095};
    float freq[N_ROT / 2];
    for (int j = 0; j < N_ROT / 2; j++)
        freq[j] = powf(10000.0f, -2.0f * (float)j / (float)N_ROT);
    static float x[N_TOK * N_HEADS * HD], got[N_TOK * N_HEADS * HD];
    float *dfreq = dev_from(freq, sizeof(freq));
    int32_t *dpos = dev_from(pos, sizeof(pos));
    for (int neox = 0; neox <= 1; neox++) {
        fill(&s, x, N_TOK * N_HEADS * HD, 1.0f);
        float *dx = dev_from(x, sizeof(x));
        assert_int_equal(kern_cuda_rope(g_kc, dx, dpos, dfreq, N_TOK, N_HEADS, HD, N_ROT, neox), 0);
        to_host(got, dx, sizeof(got));
        for (int t = 0; t < N_TOK; t++)
            for (int h = 0; h < N_HEADS; h++)
                rope_ref(x + (t * N_HEADS + h) * HD, pos[t], freq, N_ROT, neox);
        double e = nmse(got, x, N_TOK * N_HEADS * HD);
        if (!(e < 1e-11)) /* device sinf/cosf are within a few ulp of glibc's */
            fail_msg("rope neox=%d: nmse %g", neox, e);
        kern_cuda_dfree(g_kc, dx);
    }
    kern_cuda_dfree(g_kc, dfreq);
    kern_cuda_dfree(g_kc, dpos);
}

static void
test_cuda_ops_embed_gather(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    uint64_t s = 17;
    const int64_t n_embd = 256, n_vocab = 50;
    int32_t toks[5] = {0, 49, 7, 7, 23}, idx[3] = {4, 0, 2};
    float got[5 * 256], ref[5 * 256], gathered[3 * 256];
    int32_t *dtoks = dev_from(toks, sizeof(toks)), *didx = dev_from(idx, sizeof(idx));
    float *dout = NULL, *dg = NULL;
    assert_int_equal(kern_cuda_alloc(g_kc, sizeof(got), (void **)&dout), 0);
    assert_int_equal(kern_cuda_alloc(g_kc, sizeof(gathered), (void **)&dg), 0);
    for (size_t ti = 0; ti < N_TYPES; ti++) {
        struct kern_matrix w;
        struct kern_cuda_matrix dw;
        random_matrix(&s, all_types[ti], n_embd, n_vocab, &w);
        assert_int_equal(kern_cuda_matrix_upload(g_kc, &w, &dw), 0);
        assert_int_equal(kern_cuda_embed(g_kc, &dw, dtoks, 5, dout), 0);
        to_host(got, dout, sizeof(got));
        for (int t = 0; t < 5; t++)
            kern_dequant_row(w.type, (const uint8_t *)w.data + toks[t] * w.row_bytes,
                             ref + t * n_embd, n_embd);
        /* Bit-exact but for fused multiply-adds on the device. */
        if (memcmp(got, ref, sizeof(got)) != 0 && nmse(got, ref, 5 * n_embd) > 1e-12)
            fail_msg("embed %s: nmse %g", kern_dtype_traits(w.type)->name,
                     nmse(got, ref, 5 * n_embd));
        assert_int_equal(kern_cuda_gather_rows(g_kc, dg, dout, didx, 3, (int)n_embd), 0);
        to_host(gathered, dg, sizeof(gathered));
        for (int r = 0; r < 3; r++)
            assert_memory_equal(gathered + r * n_embd, got + idx[r] * n_embd,
                                (size_t)n_embd * sizeof(float));
        kern_cuda_matrix_free(g_kc, &dw);
        free((void *)w.data);
    }
    kern_cuda_dfree(g_kc, dtoks);
    kern_cuda_dfree(g_kc, didx);
    kern_cuda_dfree(g_kc, dout);
    kern_cuda_dfree(g_kc, dg);
}

/* ---- Paged attention ---- */

static void
test_cuda_ops_attention(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    uint64_t s = 18;
    enum { N_BLOCKS = 24, BR = 16, N_HEAD = 8, N_HEAD_KV = 2, HD = 80, N_TOK = 4 };
    const int kv_dim = N_HEAD_KV * HD, q_dim = N_HEAD * HD, group = N_HEAD / N_HEAD_KV;
    const size_t cache_n = (size_t)N_BLOCKS * BR * kv_dim;
    float *kc = malloc(cache_n * sizeof(float)), *vc = malloc(cache_n * sizeof(float));
    fill(&s, kc, (int64_t)cache_n, 1.0f);
    fill(&s, vc, (int64_t)cache_n, 1.0f);
    /* Two sequences with scattered blocks; tokens 0, 1 of sequence A, 2, 3 of sequence B. */
    int32_t tables[] = {5, 17, 2, 9, 11, 23, 0, 8, 19, 3, 14, 20, 1};
    int32_t tab_off[N_TOK] = {0, 0, 6, 6}, pos[N_TOK] = {0, 90, 3, 111};
    float q[N_TOK * N_HEAD * HD], out[N_TOK * N_HEAD * HD], ref[N_TOK * N_HEAD * HD];
    fill(&s, q, N_TOK * q_dim, 1.0f);
    float *dk = dev_from(kc, cache_n * sizeof(float)), *dv = dev_from(vc, cache_n * sizeof(float));
    float *dq = dev_from(q, sizeof(q)), *dout = NULL;
    assert_int_equal(kern_cuda_alloc(g_kc, sizeof(out), (void **)&dout), 0);
    int32_t *dtab = dev_from(tables, sizeof(tables)), *doff = dev_from(tab_off, sizeof(tab_off));
    int32_t *dpos = dev_from(pos, sizeof(pos));
    struct kern_cuda_attn a = {.out = dout,
                               .q = dq,
                               .k_cache = dk,
                               .v_cache = dv,
                               .tables = dtab,
                               .tab_off = doff,
                               .pos = dpos,
                               .n_tok = N_TOK,
                               .n_head = N_HEAD,
                               .n_head_kv = N_HEAD_KV,
                               .head_dim = HD,
                               .block_rows = BR,
                               .scale = 1.0f / sqrtf((float)HD)};
    assert_int_equal(kern_cuda_attention(g_kc, &a), 0);
    to_host(out, dout, sizeof(out));
    static float scratch[N_HEAD * 200];
    for (int t = 0; t < N_TOK; t++) {
        const float *kb[8], *vb[8];
        int n_kv = pos[t] + 1;
        for (int h = 0; h < N_HEAD_KV; h++) {
            for (int j = 0; j < eng_kv_blocks_for(n_kv); j++) {
                kb[j] = kc + (size_t)tables[tab_off[t] + j] * BR * kv_dim + h * HD;
                vb[j] = vc + (size_t)tables[tab_off[t] + j] * BR * kv_dim + h * HD;
            }
            size_t qo = (size_t)t * q_dim + (size_t)h * group * HD;
            kern_attn_f32_ref(ref + qo, q + qo, kb, vb, BR, n_kv, group, HD, (size_t)kv_dim,
                              a.scale, scratch);
        }
    }
    double e = nmse(out, ref, N_TOK * q_dim);
    if (!(e < 1e-10))
        fail_msg("attention: nmse %g", e);
    float *bufs[] = {dk, dv, dq, dout};
    for (size_t i = 0; i < 4; i++)
        kern_cuda_dfree(g_kc, bufs[i]);
    kern_cuda_dfree(g_kc, dtab);
    kern_cuda_dfree(g_kc, doff);
    kern_cuda_dfree(g_kc, dpos);
    free(kc);
    free(vc);
}

static void
test_cuda_ops_kv_write(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    uint64_t s = 19;
    enum { ROWS = 48, KV = 40, N = 3 };
    static float cache[ROWS * KV], k[N * KV], v[N * KV], got_k[ROWS * KV], got_v[ROWS * KV];
    int32_t dst[N] = {47, 0, 20};
    fill(&s, k, N * KV, 1.0f);
    fill(&s, v, N * KV, 1.0f);
    float *dkc = dev_from(cache, sizeof(cache)), *dvc = dev_from(cache, sizeof(cache));
    float *dk = dev_from(k, sizeof(k)), *dv = dev_from(v, sizeof(v));
    int32_t *ddst = dev_from(dst, sizeof(dst));
    assert_int_equal(kern_cuda_kv_write(g_kc, dkc, dvc, dk, dv, ddst, N, KV), 0);
    to_host(got_k, dkc, sizeof(got_k));
    to_host(got_v, dvc, sizeof(got_v));
    for (int t = 0; t < N; t++) {
        assert_memory_equal(got_k + dst[t] * KV, k + t * KV, KV * sizeof(float));
        assert_memory_equal(got_v + dst[t] * KV, v + t * KV, KV * sizeof(float));
    }
    assert_float_equal(got_k[KV], 0.0f, 0.0f); /* untouched rows stay */
    float *bufs[] = {dkc, dvc, dk, dv};
    for (size_t i = 0; i < 4; i++)
        kern_cuda_dfree(g_kc, bufs[i]);
    kern_cuda_dfree(g_kc, ddst);
}

/* ---- The model against the CPU engine ---- */

#define N_PROMPT 21 /* above KERN_CUDA_GEMM_MIN_TOK: the prefill takes the cuBLAS path */
#define N_DECODE 4

/*
 * Prefill N_PROMPT tokens (logits of every position) then N_DECODE single-token steps, on the CPU
 * and on the device, and compare the logits. The CPU quantizes activations to 8 bits and the
 * device's prefill uses f16 inputs, so quantized types get a looser bound than float types.
 */
static void
check_model(const char *type, double tol)
{
    char path[512], err[ENG_GGUF_ERR_LEN];
    const char *build = getenv("BUILD") ? getenv("BUILD") : "build/cuda";
    snprintf(path, sizeof(path), "%s/tests/models/tiny-%s.gguf", build, type);
    struct eng_gguf *g = NULL;
    struct eng_model *m = NULL;
    if (eng_gguf_open(path, &g, err, sizeof(err)) < 0 ||
        eng_model_load(g, &m, err, sizeof(err)) < 0)
        fail_msg("cannot load %s: %s (run make cuda first)", path, err);
    const int n_vocab = m->hp.n_vocab, n_ctx = 64;
    struct kern_pool *pool = NULL;
    struct eng_fwd *cf = NULL;
    struct eng_cuda_fwd *gf = NULL;
    struct eng_kv *ckv = NULL, *gkv = NULL;
    assert_int_equal(kern_pool_new(2, &pool), 0);
    assert_int_equal(eng_fwd_new(m, pool, 32, n_ctx, &cf), 0);
    assert_int_equal(eng_cuda_fwd_new(m, 32, n_ctx, eng_kv_blocks_for(n_ctx), &gf), 0);
    assert_int_equal(eng_kv_new(m, n_ctx, &ckv), 0);
    assert_int_equal(eng_kv_new(m, n_ctx, &gkv), 0);
    int32_t toks[N_PROMPT + N_DECODE];
    uint64_t s = 20;
    for (int i = 0; i < N_PROMPT + N_DECODE; i++)
        toks[i] = (int32_t)(rng_next(&s) % (uint64_t)n_vocab);
    size_t n_l = (size_t)N_PROMPT * (size_t)n_vocab;
    float *lc = malloc(n_l * sizeof(float)), *lg = malloc(n_l * sizeof(float));
    assert_int_equal(eng_forward(cf, ckv, toks, N_PROMPT, lc, true), 0);
    assert_int_equal(eng_cuda_forward(gf, gkv, toks, N_PROMPT, lg, true), 0);
    double e = nmse(lg, lc, (int64_t)n_l);
    if (!(e < tol))
        fail_msg("%s prefill logits: nmse %g >= %g", type, e, tol);
    for (int i = 0; i < N_DECODE; i++) {
        assert_int_equal(eng_forward(cf, ckv, &toks[N_PROMPT + i], 1, lc, false), 0);
        assert_int_equal(eng_cuda_forward(gf, gkv, &toks[N_PROMPT + i], 1, lg, false), 0);
        e = nmse(lg, lc, n_vocab);
        if (!(e < tol))
            fail_msg("%s decode step %d logits: nmse %g >= %g", type, i, e, tol);
    }
    assert_int_equal(gkv->n_past, N_PROMPT + N_DECODE);
    free(lc);
    free(lg);
    eng_kv_free(ckv);
    eng_kv_free(gkv);
    eng_cuda_fwd_free(gf);
    eng_fwd_free(cf);
    kern_pool_free(pool);
    eng_model_free(m);
    eng_gguf_close(g);
}

static void
test_cuda_ops_model_float(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    check_model("f32", 1e-4);
    check_model("f16", 1e-4);
    check_model("bf16", 1e-4);
}

static void
test_cuda_ops_model_quant(void **state)
{
    (void)state;
    if (!g_kc)
        skip();
    static const char *const types[] = {"q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k"};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        check_model(types[i], 1e-2);
}

/* Without a device the engine entry points fail cleanly (this one runs everywhere). */
static void
test_cuda_ops_no_device_is_enodev(void **state)
{
    (void)state;
    if (g_kc)
        skip(); /* meaningful only on a machine without a GPU */
    char msg[256] = "";
    assert_int_equal(eng_cuda_available(msg, sizeof(msg)), -ENODEV);
    assert_true(strlen(msg) > 0);
    struct kern_cuda *c = NULL;
    assert_int_equal(kern_cuda_new(&c), -ENODEV);
    assert_null(c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cuda_ops_no_device_is_enodev),
        cmocka_unit_test(test_cuda_ops_dequant_f16),
        cmocka_unit_test(test_cuda_ops_matvec),
        cmocka_unit_test(test_cuda_ops_gemm),
        cmocka_unit_test(test_cuda_ops_rmsnorm_swiglu_add),
        cmocka_unit_test(test_cuda_ops_softmax_argmax),
        cmocka_unit_test(test_cuda_ops_rope),
        cmocka_unit_test(test_cuda_ops_embed_gather),
        cmocka_unit_test(test_cuda_ops_attention),
        cmocka_unit_test(test_cuda_ops_kv_write),
        cmocka_unit_test(test_cuda_ops_model_float),
        cmocka_unit_test(test_cuda_ops_model_quant),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

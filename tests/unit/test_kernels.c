/*
 * test_kernels: quantization layouts, every ISA's kernels against the scalar reference, the
 * activation quantizer against its spec (matmul.c), the element-wise ops and the thread pool.
 *
 * Tolerances are NMSE = sum (a - b)^2 / sum b^2 against kern_matmul_ref (double precision over
 * dequantized weights). They are set a few times above the error of 8-bit activations per block:
 * ~1e-5 for 32-element blocks, larger for 256-element blocks (one scale for 256 values).
 */
#include <errno.h>
#include <math.h>
#include <sched.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/cm_util.h"
#include "kernels/cpu/cpu_int.h"
#include "kernels/kern.h"

/* ---- Helpers ---- */

static const enum kern_dtype all_types[] = {
    KERN_DTYPE_F32,  KERN_DTYPE_F16,  KERN_DTYPE_BF16, KERN_DTYPE_Q4_0,
    KERN_DTYPE_Q4_1, KERN_DTYPE_Q5_0, KERN_DTYPE_Q5_1, KERN_DTYPE_Q8_0,
    KERN_DTYPE_Q4_K, KERN_DTYPE_Q5_K, KERN_DTYPE_Q6_K,
};
#define N_TYPES (sizeof(all_types) / sizeof(all_types[0]))

struct rng {
    uint64_t s;
};

static uint32_t
rng_u32(struct rng *r)
{
    r->s ^= r->s << 13;
    r->s ^= r->s >> 7;
    r->s ^= r->s << 17;
    return (uint32_t)(r->s >> 16);
}

/* Roughly normal: sum of four uniforms, centred, unit-ish variance. */
static float
rng_normal(struct rng *r)
{
    float s = 0.0f;
    for (int i = 0; i < 4; i++)
        s += (float)(rng_u32(r) & 0xFFFFFF) / 16777216.0f;
    return (s - 2.0f) * 1.7f;
}

static void
fill_normal(struct rng *r, float *x, int64_t n, float scale)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = rng_normal(r) * scale;
}

static double
nmse(const float *a, const float *b, int64_t n)
{
    double e = 0.0, s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        e += d * d;
        s += (double)b[i] * (double)b[i];
    }
    return s > 0.0 ? e / s : e;
}

static int
block_of(enum kern_dtype t)
{
    return kern_dtype_traits((uint32_t)t)->block_elems;
}

/* Quantization error bound of quantize -> dequantize on normal data, per type. */
static double
roundtrip_tol(enum kern_dtype t)
{
    switch (t) {
    case KERN_DTYPE_F32:
        return 0.0;
    case KERN_DTYPE_F16:
        return 1e-6;
    case KERN_DTYPE_BF16:
        return 1e-4;
    case KERN_DTYPE_Q8_0:
        return 1e-4;
    case KERN_DTYPE_Q6_K:
        return 2e-3;
    case KERN_DTYPE_Q5_0:
    case KERN_DTYPE_Q5_1:
    case KERN_DTYPE_Q5_K:
        return 6e-3;
    default:
        return 2.5e-2;
    }
}

/* kern_matmul against kern_matmul_ref (see the header comment). */
static double
matmul_tol(enum kern_dtype t)
{
    switch (t) {
    case KERN_DTYPE_F32:
    case KERN_DTYPE_F16:
    case KERN_DTYPE_BF16:
        return 1e-10;
    case KERN_DTYPE_Q4_K:
    case KERN_DTYPE_Q5_K:
    case KERN_DTYPE_Q6_K:
        return 3e-4;
    default:
        return 1e-4;
    }
}

static bool
isa_available(enum kern_isa isa)
{
    return isa <= kern_cpu_best_isa();
}

/* The ISA a test runs for (its prestate); skips when the CPU lacks it. */
static enum kern_isa
state_isa(void **state)
{
    enum kern_isa isa = *(const enum kern_isa *)*state;
    if (!isa_available(isa))
        skip();
    return isa;
}

static const enum kern_isa isa_scalar = KERN_ISA_SCALAR, isa_avx2 = KERN_ISA_AVX2,
                           isa_avx512 = KERN_ISA_AVX512;

struct wmat {
    struct kern_matrix m;
    uint8_t *data;
};

static void
wmat_init(struct wmat *w, struct rng *r, enum kern_dtype t, int64_t n_in, int64_t n_out)
{
    size_t rb = kern_row_bytes((uint32_t)t, n_in);
    assert_true(rb > 0);
    w->data = malloc(rb * (size_t)n_out);
    float *row = malloc(sizeof(float) * (size_t)n_in);
    assert_non_null(w->data);
    assert_non_null(row);
    for (int64_t o = 0; o < n_out; o++) {
        fill_normal(r, row, n_in, 0.05f);
        assert_int_equal(kern_quantize_row(t, row, w->data + o * (int64_t)rb, n_in), 0);
    }
    free(row);
    w->m = (struct kern_matrix){
        .type = t, .n_in = n_in, .n_out = n_out, .row_bytes = rb, .data = w->data};
}

static void
restore_isa(void)
{
    assert_int_equal(kern_cpu_set_isa(kern_cpu_best_isa()), 0);
}

/* ---- Types and layouts ---- */

static void
test_kernels_traits_and_row_bytes(void **state)
{
    (void)state;
    assert_int_equal(kern_row_bytes(KERN_DTYPE_Q4_1, 64), 40);
    assert_int_equal(kern_row_bytes(KERN_DTYPE_Q4_K, 512), 288);
    assert_int_equal(kern_row_bytes(KERN_DTYPE_Q6_K, 256), 210);
    assert_int_equal(kern_row_bytes(KERN_DTYPE_F16, 3), 6);
    assert_int_equal(kern_row_bytes(KERN_DTYPE_Q8_0, 33), 0);
    assert_int_equal(kern_row_bytes(4, 32), 0);    /* removed Q4_2 */
    assert_int_equal(kern_row_bytes(1000, 32), 0); /* unknown */
    assert_int_equal(kern_row_bytes(KERN_DTYPE_COUNT, 32), 0);
    assert_null(kern_dtype_traits(5));
    assert_null(kern_dtype_traits(UINT32_MAX));
    assert_string_equal(kern_dtype_traits(KERN_DTYPE_Q4_1)->name, "q4_1");
    assert_false(kern_dtype_traits(KERN_DTYPE_Q2_K)->supported);
    for (size_t i = 0; i < N_TYPES; i++)
        assert_true(kern_dtype_traits((uint32_t)all_types[i])->supported);
}

static void
test_kernels_quantize_roundtrip(void **state)
{
    (void)state;
    static const int64_t sizes[] = {256, 512, 1536};
    for (size_t ti = 0; ti < N_TYPES; ti++) {
        enum kern_dtype t = all_types[ti];
        for (uint64_t seed = 1; seed <= 3; seed++) {
            for (size_t si = 0; si < 3; si++) {
                int64_t n = sizes[si];
                struct rng r = {seed * 7919};
                float *x = malloc(sizeof(float) * (size_t)n),
                      *y = malloc(sizeof(float) * (size_t)n);
                uint8_t *q = malloc(kern_row_bytes((uint32_t)t, n));
                fill_normal(&r, x, n, 1.0f);
                assert_int_equal(kern_quantize_row(t, x, q, n), 0);
                assert_int_equal(kern_dequant_row(t, q, y, n), 0);
                double e = nmse(y, x, n);
                if (e > roundtrip_tol(t))
                    fail_msg("%s n=%lld nmse %g > %g", kern_dtype_traits(t)->name, (long long)n, e,
                             roundtrip_tol(t));
                free(x);
                free(y);
                free(q);
            }
        }
    }
}

static void
test_kernels_quantize_rejects_bad_input(void **state)
{
    (void)state;
    float x[64] = {0};
    uint8_t q[256];
    assert_int_equal(kern_quantize_row(KERN_DTYPE_Q4_0, x, q, 33), -EINVAL);
    assert_int_equal(kern_quantize_row(KERN_DTYPE_Q2_K, x, q, 256), -EINVAL);
    assert_int_equal(kern_quantize_row((enum kern_dtype)4, x, q, 32), -EINVAL);
    assert_int_equal(kern_dequant_row(KERN_DTYPE_Q4_K, q, x, 32), -EINVAL);
    assert_int_equal(kern_dequant_row(KERN_DTYPE_Q8_K, q, x, 256), -EINVAL);
    /* all zero input gives zero scales and an exact zero row */
    assert_int_equal(kern_quantize_row(KERN_DTYPE_Q4_1, x, q, 64), 0);
    float y[64];
    assert_int_equal(kern_dequant_row(KERN_DTYPE_Q4_1, q, y, 64), 0);
    for (int i = 0; i < 64; i++)
        assert_true(y[i] == 0.0f);
}

/* Every ISA's dequantizer gives the reference's values (fp16 conversions exactly too). */
static void
test_kernels_dequant_isa_matches_ref(void **state)
{
    const int64_t n = 1024;
    enum kern_isa isa = state_isa(state);
    {
        for (size_t ti = 0; ti < N_TYPES; ti++) {
            enum kern_dtype t = all_types[ti];
            struct rng r = {ti + 11};
            float *x = malloc(sizeof(float) * n), *a = malloc(sizeof(float) * n),
                  *b = malloc(sizeof(float) * n);
            uint8_t *q = malloc(kern_row_bytes((uint32_t)t, n));
            fill_normal(&r, x, n, 3.0f);
            assert_int_equal(kern_quantize_row(t, x, q, n), 0);
            kern_cpu_type_ops_isa(KERN_ISA_SCALAR, t)->dequant(q, a, n);
            kern_cpu_type_ops_isa(isa, t)->dequant(q, b, n);
            for (int64_t i = 0; i < n; i++)
                if (a[i] != b[i])
                    fail_msg("%s %s [%lld]: %g != %g", kern_isa_name(isa),
                             kern_dtype_traits(t)->name, (long long)i, a[i], b[i]);
            free(x);
            free(a);
            free(b);
            free(q);
        }
    }
}

/* ---- Activation quantization spec ---- */

struct act_buf {
    struct kern_cpu_act a;
    int8_t q[512];
    float d[32], s[32];
    int32_t corr[32], dcorr[128];
};

static void
act_buf_init(struct act_buf *b, int64_t n_in, int unit, int off)
{
    memset(b, 0, sizeof(*b));
    b->a = (struct kern_cpu_act){.n_tok = 1,
                                 .n_in = n_in,
                                 .unit = unit,
                                 .n_units = n_in / unit,
                                 .off = off,
                                 .q = b->q,
                                 .d = b->d,
                                 .s = b->s,
                                 .corr = b->corr,
                                 .dcorr = b->dcorr};
}

static void
test_kernels_act_quant_spec(void **state)
{
    (void)state;
    float x[64];
    struct act_buf b;
    /* block 0: amax 127 -> id 1: ties round to even, 127.4 -> 127 */
    for (int i = 0; i < 32; i++)
        x[i] = 0.0f;
    x[0] = 127.0f;
    x[1] = 0.5f;
    x[2] = 1.5f;
    x[3] = 2.5f;
    x[4] = -0.5f;
    x[5] = -1.5f;
    x[6] = -126.5f;
    x[7] = 3.4999f;
    /* block 1: all zero -> d 0, q 0 */
    for (int i = 32; i < 64; i++)
        x[i] = 0.0f;
    act_buf_init(&b, 64, 32, 8);
    kern_cpu_act_quant_ref(x, &b.a, 32, 0, 1);
    static const int8_t want[8] = {127, 0, 2, 2, 0, -2, -126, 3};
    for (int i = 0; i < 8; i++)
        assert_int_equal(b.q[i], want[i]);
    assert_true(b.d[0] == 127.0f / 127.0f);
    assert_true(b.s[0] == 1.0f * (127 + 2 + 2 - 2 - 126 + 3));
    assert_int_equal(b.corr[0], -8 * (127 + 2 + 2 - 2 - 126 + 3));
    assert_int_equal(b.dcorr[0], -8 * (127 + 0 + 2 + 2));
    assert_true(b.d[1] == 0.0f);
    assert_true(b.s[1] == 0.0f);
    for (int i = 32; i < 64; i++)
        assert_int_equal(b.q[i], 0);

    /* d = amax / 127 in f32, q = rint(x * (127 / amax)) */
    for (int i = 0; i < 32; i++)
        x[i] = (float)(i - 16) * 0.37f;
    act_buf_init(&b, 32, 32, 0);
    kern_cpu_act_quant_ref(x, &b.a, 32, 0, 1);
    float amax = 16 * 0.37f, id = 127.0f / amax;
    assert_true(b.d[0] == amax / 127.0f);
    for (int i = 0; i < 32; i++)
        assert_int_equal(b.q[i], (int)nearbyintf(x[i] * id));
    assert_int_equal(b.q[0], -127);

    /* 256-element blocks share d across their units (K-quants) */
    float xk[256];
    for (int i = 0; i < 256; i++)
        xk[i] = (float)((i * 37) % 101 - 50) / 10.0f;
    act_buf_init(&b, 256, 16, 32);
    kern_cpu_act_quant_ref(xk, &b.a, 256, 0, 1);
    for (int u = 0; u < 16; u++)
        assert_true(b.d[u] == 5.0f / 127.0f);
}

/* Every ISA's activation quantizer writes the reference's bytes. */
static void
test_kernels_act_quant_isa_identical(void **state)
{
    float x[512];
    struct rng r = {99};
    enum kern_isa isa = state_isa(state);
    {
        for (int rep = 0; rep < 20; rep++) {
            fill_normal(&r, x, 512, rep == 0 ? 0.0f : (float)rep);
            x[rep] = 0.5f * (float)rep; /* some exact halves */
            static const int cfg[3][3] = {{32, 32, 128}, {256, 32, 0}, {256, 16, 32}};
            for (int c = 0; c < 3; c++) {
                struct act_buf ra, sa;
                act_buf_init(&ra, 512, cfg[c][1], cfg[c][2]);
                act_buf_init(&sa, 512, cfg[c][1], cfg[c][2]);
                kern_cpu_act_quant_ref(x, &ra.a, cfg[c][0], 0, 1);
                kern_cpu_isa_ops(isa)->act_quant(x, &sa.a, cfg[c][0], 0, 1);
                assert_memory_equal(ra.q, sa.q, 512);
                assert_memory_equal(ra.d, sa.d, sizeof(ra.d));
                assert_memory_equal(ra.corr, sa.corr, sizeof(ra.corr));
                assert_memory_equal(ra.dcorr, sa.dcorr, sizeof(ra.dcorr));
                for (int u = 0; u < 512 / cfg[c][1]; u++)
                    assert_float_equal(ra.s[u], sa.s[u], 1e-6 * fabsf(ra.s[u]) + 1e-30);
            }
        }
    }
}

/* ---- Matmul ---- */

static void
check_matmul_isa(enum kern_isa isa, struct kern_pool *pool, enum kern_dtype t, int64_t n_in,
                 int64_t n_out, int n_tok, uint64_t seed)
{
    struct rng r = {seed};
    struct wmat w;
    wmat_init(&w, &r, t, n_in, n_out);
    float *x = malloc(sizeof(float) * (size_t)(n_in * n_tok));
    float *y = malloc(sizeof(float) * (size_t)(n_out * n_tok));
    float *yr = malloc(sizeof(float) * (size_t)(n_out * n_tok));
    fill_normal(&r, x, n_in * n_tok, 1.0f);
    assert_int_equal(kern_matmul_ref(&w.m, x, n_tok, yr), 0);
    assert_int_equal(kern_cpu_set_isa(isa), 0);
    memset(y, 0xFF, sizeof(float) * (size_t)(n_out * n_tok));
    assert_int_equal(kern_matmul(pool, &w.m, x, n_tok, y), 0);
    double e = nmse(y, yr, n_out * n_tok);
    if (!(e <= matmul_tol(t)))
        fail_msg("%s %s n_in=%lld n_out=%lld n_tok=%d threads=%d: nmse %g > %g", kern_isa_name(isa),
                 kern_dtype_traits(t)->name, (long long)n_in, (long long)n_out, n_tok,
                 kern_pool_n_threads(pool), e, matmul_tol(t));
    restore_isa();
    free(x);
    free(y);
    free(yr);
    free(w.data);
}

static void
test_kernels_matmul_vs_ref(void **state)
{
    static const int n_toks[] = {1, 2, 3, 5, 8, 17};
    struct kern_pool *pools[2] = {NULL, NULL};
    assert_int_equal(kern_pool_new(1, &pools[0]), 0);
    assert_int_equal(kern_pool_new(2, &pools[1]), 0);
    enum kern_isa isa = state_isa(state);
    {
        for (size_t ti = 0; ti < N_TYPES; ti++) {
            enum kern_dtype t = all_types[ti];
            int64_t n_in = block_of(t) == 256 ? 768 : 608; /* not a multiple of 16 blocks */
            for (size_t k = 0; k < 6; k++)
                for (int p = 0; p < 2; p++)
                    check_matmul_isa(isa, pools[p], t, n_in, 37, n_toks[k], 1000 + ti * 10 + k);
        }
    }
    kern_pool_free(pools[0]);
    kern_pool_free(pools[1]);
}

/* Large batches take the batched kernels; odd shapes exercise their edges. */
static void
test_kernels_matmul_batched_vs_ref(void **state)
{
    enum kern_isa isa = state_isa(state);
    struct kern_pool *pool = NULL;
    assert_int_equal(kern_pool_new(2, &pool), 0);
    {
        for (size_t ti = 0; ti < N_TYPES; ti++) {
            enum kern_dtype t = all_types[ti];
            int64_t n_in = block_of(t) == 256 ? 512 : 576;
            check_matmul_isa(isa, pool, t, n_in, 83, 45, 77 + ti);
            check_matmul_isa(isa, pool, t, n_in, 16, 64, 78 + ti);
        }
    }
    kern_pool_free(pool);
}

/* Every batch size of batched decode (2..33) on the common types, with row counts that leave a
 * partial last tile: 53 rows (a tile of 32, then 16 + 5) and 7 (one group, partly empty). */
static void
test_kernels_matmul_small_batches_vs_ref(void **state)
{
    static const enum kern_dtype types[] = {KERN_DTYPE_Q4_0, KERN_DTYPE_Q4_1, KERN_DTYPE_Q8_0};
    static const int64_t n_outs[] = {53, 7};
    enum kern_isa isa = state_isa(state);
    struct kern_pool *pool = NULL;
    assert_int_equal(kern_pool_new(2, &pool), 0);
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++)
        for (int n_tok = 2; n_tok <= 33; n_tok++)
            for (size_t o = 0; o < 2; o++)
                check_matmul_isa(isa, pool, types[ti], 608, n_outs[o], n_tok,
                                 500 + 100 * ti + (uint64_t)n_tok * 2 + o);
    kern_pool_free(pool);
}

/* With the same quantized activations the SIMD kernels differ from the scalar ones only by the
 * order of f32 sums. */
static void
test_kernels_matmul_simd_vs_scalar(void **state)
{
    enum kern_isa isa = state_isa(state);
    struct kern_pool *pool = NULL;
    assert_int_equal(kern_pool_new(2, &pool), 0);
    static const int n_toks[] = {1, 4, 33};
    {
        for (size_t ti = 0; ti < N_TYPES; ti++) {
            enum kern_dtype t = all_types[ti];
            for (int k = 0; k < 3; k++) {
                struct rng r = {5 + ti};
                int64_t n_in = block_of(t) == 256 ? 1024 : 1088, n_out = 51;
                int n_tok = n_toks[k];
                struct wmat w;
                wmat_init(&w, &r, t, n_in, n_out);
                float *x = malloc(sizeof(float) * (size_t)(n_in * n_tok));
                float *ys = malloc(sizeof(float) * (size_t)(n_out * n_tok));
                float *yv = malloc(sizeof(float) * (size_t)(n_out * n_tok));
                fill_normal(&r, x, n_in * n_tok, 1.0f);
                assert_int_equal(kern_cpu_set_isa(KERN_ISA_SCALAR), 0);
                assert_int_equal(kern_matmul(pool, &w.m, x, n_tok, ys), 0);
                assert_int_equal(kern_cpu_set_isa(isa), 0);
                assert_int_equal(kern_matmul(pool, &w.m, x, n_tok, yv), 0);
                double e = nmse(yv, ys, n_out * n_tok);
                if (!(e < 1e-11))
                    fail_msg("%s %s n_tok=%d: nmse vs scalar %g", kern_isa_name(isa),
                             kern_dtype_traits(t)->name, n_tok, e);
                restore_isa();
                free(x);
                free(ys);
                free(yv);
                free(w.data);
            }
        }
    }
    kern_pool_free(pool);
}

/*
 * Batch invariance (the spec in matmul.c): the output of a token is bit-identical whatever the
 * batch around it, its place in the batch, the thread count and the row chunking. Every type,
 * n_tok 1..40 (both sides of the ISA's batch_min), 1..3 threads; 300 rows give different chunk
 * sizes per thread count and a partial last tile; n_in is not a multiple of 16 units.
 */
#define INV_POOL 48 /* tokens the batches are cut from */

static void
check_batch_invariant(enum kern_isa isa, struct kern_pool *const pools[3], enum kern_dtype t,
                      uint64_t seed, bool pack)
{
    const int64_t n_in = block_of(t) == 256 ? 768 : 608, n_out = 300;
    struct rng r = {seed};
    struct wmat w;
    wmat_init(&w, &r, t, n_in, n_out);
    if (pack && kern_matrix_repack(&w.m) != 1) {
        free(w.data);
        return; /* no packed layout for this type on this CPU */
    }
    float *x = malloc(sizeof(float) * (size_t)(n_in * INV_POOL));
    float *alone = malloc(sizeof(float) * (size_t)(n_out * INV_POOL));
    float *y = malloc(sizeof(float) * (size_t)(n_out * INV_POOL));
    assert_non_null(x);
    assert_non_null(alone);
    assert_non_null(y);
    fill_normal(&r, x, n_in * INV_POOL, 1.0f);
    assert_int_equal(kern_cpu_set_isa(isa), 0);
    for (int i = 0; i < INV_POOL; i++)
        assert_int_equal(kern_matmul(pools[0], &w.m, x + i * n_in, 1, alone + i * n_out), 0);
    for (int n_tok = 1; n_tok <= 40; n_tok++) {
        int off = (n_tok * 7) % (INV_POOL + 1 - n_tok);
        for (int p = 0; p < 3; p++) {
            memset(y, 0xFF, sizeof(float) * (size_t)(n_out * n_tok));
            assert_int_equal(kern_matmul(pools[p], &w.m, x + off * n_in, n_tok, y), 0);
            for (int i = 0; i < n_tok; i++) {
                const float *ya = alone + (off + i) * n_out, *yb = y + i * n_out;
                if (memcmp(ya, yb, sizeof(float) * (size_t)n_out) == 0)
                    continue;
                int64_t o = 0;
                while (memcmp(ya + o, yb + o, sizeof(float)) == 0)
                    o++;
                fail_msg("%s %s n_tok=%d threads=%d: token %d row %lld: %.9g batched, %.9g alone",
                         kern_isa_name(isa), kern_dtype_traits(t)->name, n_tok, p + 1, i,
                         (long long)o, (double)yb[o], (double)ya[o]);
            }
        }
    }
    restore_isa();
    kern_matrix_unpack(&w.m);
    free(x);
    free(alone);
    free(y);
    free(w.data);
}

static void
test_kernels_matmul_batch_invariant(void **state)
{
    enum kern_isa isa = state_isa(state);
    struct kern_pool *pools[3] = {NULL, NULL, NULL};
    for (int p = 0; p < 3; p++)
        assert_int_equal(kern_pool_new(p + 1, &pools[p]), 0);
    for (size_t ti = 0; ti < N_TYPES; ti++) {
        check_batch_invariant(isa, pools, all_types[ti], 900 + ti, false);
        /* with packed rows the small batches take the packed kernels, the rest the batch kernel */
        check_batch_invariant(isa, pools, all_types[ti], 900 + ti, true);
    }
    for (int p = 0; p < 3; p++)
        kern_pool_free(pools[p]);
}

/* kern_matrix_repack changes no bit of any result (every ISA; only AVX-512 reads the packed rows)
 * and packs nothing it has no layout for; kern_matrix_unpack clears it. */
static void
test_kernels_matmul_packed_identical(void **state)
{
    enum kern_isa isa = state_isa(state);
    struct kern_pool *pool = NULL;
    assert_int_equal(kern_pool_new(2, &pool), 0);
    for (size_t ti = 0; ti < N_TYPES; ti++) {
        enum kern_dtype t = all_types[ti];
        const int64_t n_in = block_of(t) == 256 ? 512 : 1056, n_out = 45, n_x = 4;
        struct rng r = {700 + ti};
        struct wmat w;
        wmat_init(&w, &r, t, n_in, n_out);
        float *x = malloc(sizeof(float) * (size_t)(n_in * n_x));
        float *y0 = malloc(sizeof(float) * (size_t)(n_out * n_x));
        float *y1 = malloc(sizeof(float) * (size_t)(n_out * n_x));
        assert_true(x && y0 && y1);
        fill_normal(&r, x, n_in * n_x, 1.0f);
        bool packable = t == KERN_DTYPE_Q4_0 || t == KERN_DTYPE_Q4_1 || t == KERN_DTYPE_Q8_0;
        int rc = kern_matrix_repack(&w.m);
        assert_int_equal(rc, packable && kern_cpu_best_isa() == KERN_ISA_AVX512 ? 1 : 0);
        assert_true((w.m.packed != NULL) == (rc == 1));
        for (int n_tok = 1; n_tok <= n_x; n_tok++) {
            struct kern_matrix plain = w.m;
            plain.packed = NULL;
            assert_int_equal(kern_cpu_set_isa(isa), 0);
            assert_int_equal(kern_matmul(pool, &plain, x, n_tok, y0), 0);
            assert_int_equal(kern_matmul(pool, &w.m, x, n_tok, y1), 0);
            restore_isa();
            if (memcmp(y0, y1, sizeof(float) * (size_t)(n_out * n_tok)))
                fail_msg("%s %s n_tok=%d: packed result differs", kern_isa_name(isa),
                         kern_dtype_traits(t)->name, n_tok);
        }
        kern_matrix_unpack(&w.m);
        assert_null(w.m.packed);
        free(x);
        free(y0);
        free(y1);
        free(w.data);
    }
    kern_pool_free(pool);
}

/* kern_matmul_multi gives each matrix the bits of its own kern_matmul: q/k/v-like shapes of one
 * type (one shared pool run), packed or not, small and large batches, 1..3 threads; and matrices
 * of different types (separate runs). */
static void
test_kernels_matmul_multi_identical(void **state)
{
    enum kern_isa isa = state_isa(state);
    static const int n_toks[] = {1, 2, 3, 7};
    const int64_t n_in = 576, n_outs[3] = {100, 33, 64};
    const enum kern_dtype types[2][3] = {
        {KERN_DTYPE_Q4_1, KERN_DTYPE_Q4_1, KERN_DTYPE_Q4_1},
        {KERN_DTYPE_Q8_0, KERN_DTYPE_Q4_0, KERN_DTYPE_F16},
    };
    struct rng r = {4242};
    float *x = malloc(sizeof(float) * (size_t)(n_in * 7));
    fill_normal(&r, x, n_in * 7, 1.0f);
    for (int p = 1; p <= 3; p++) {
        struct kern_pool *pool = NULL;
        assert_int_equal(kern_pool_new(p, &pool), 0);
        for (int set = 0; set < 2; set++) {
            for (int pack = 0; pack < 2; pack++) {
                struct wmat w[3];
                const struct kern_matrix *wp[3];
                float *ya[3], *yb[3];
                for (int i = 0; i < 3; i++) {
                    wmat_init(&w[i], &r, types[set][i], n_in, n_outs[i]);
                    if (pack)
                        assert_true(kern_matrix_repack(&w[i].m) >= 0);
                    wp[i] = &w[i].m;
                    ya[i] = malloc(sizeof(float) * (size_t)(n_outs[i] * 7));
                    yb[i] = malloc(sizeof(float) * (size_t)(n_outs[i] * 7));
                }
                for (size_t k = 0; k < 4; k++) {
                    int n_tok = n_toks[k];
                    assert_int_equal(kern_cpu_set_isa(isa), 0);
                    for (int i = 0; i < 3; i++)
                        assert_int_equal(kern_matmul(pool, wp[i], x, n_tok, ya[i]), 0);
                    assert_int_equal(kern_matmul_multi(pool, wp, 3, x, n_tok, yb), 0);
                    restore_isa();
                    for (int i = 0; i < 3; i++)
                        if (memcmp(ya[i], yb[i], sizeof(float) * (size_t)(n_outs[i] * n_tok)))
                            fail_msg("%s set %d pack %d n_tok %d threads %d: matrix %d differs",
                                     kern_isa_name(isa), set, pack, n_tok, p, i);
                }
                for (int i = 0; i < 3; i++) {
                    kern_matrix_unpack(&w[i].m);
                    free(w[i].data);
                    free(ya[i]);
                    free(yb[i]);
                }
            }
        }
        kern_pool_free(pool);
    }
    assert_int_equal(kern_matmul_multi(NULL, NULL, 0, x, 1, NULL), -EINVAL);
    free(x);
}

/* Places n bytes so that they end where an inaccessible page begins; *base is the mapping. */
static void *
guarded(size_t n, void **base, size_t *len)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t span = (n + page - 1) / page * page;
    *len = span + page;
    uint8_t *p = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(p != MAP_FAILED);
    assert_int_equal(mprotect(p + span, page, PROT_NONE), 0);
    *base = p;
    return p + span - n;
}

/* The kernels never read past the last weight row or the last activation (the SIMD kernels use
 * wide and masked loads near the ends): both end at an inaccessible page. */
static void
test_kernels_matmul_reads_within_bounds(void **state)
{
    enum kern_isa isa = state_isa(state);
    static const int n_toks[] = {1, 2, 5, 9};
    struct kern_pool *pool = NULL;
    assert_int_equal(kern_pool_new(2, &pool), 0);
    for (size_t ti = 0; ti < N_TYPES; ti++) {
        enum kern_dtype t = all_types[ti];
        int64_t n_in = block_of(t) == 256 ? 256 : (t == KERN_DTYPE_F32 ? 35 : 96), n_out = 5;
        struct rng r = {31 + ti};
        struct wmat w;
        wmat_init(&w, &r, t, n_in, n_out);
        size_t wbytes = w.m.row_bytes * (size_t)n_out, wlen, xlen;
        void *wbase, *xbase;
        uint8_t *wg = guarded(wbytes, &wbase, &wlen);
        memcpy(wg, w.data, wbytes);
        w.m.data = wg;
        for (size_t k = 0; k < 4; k++) {
            int n_tok = n_toks[k];
            float *x = guarded(sizeof(float) * (size_t)(n_in * n_tok), &xbase, &xlen);
            float *y = malloc(sizeof(float) * (size_t)(n_out * n_tok));
            float *yr = malloc(sizeof(float) * (size_t)(n_out * n_tok));
            fill_normal(&r, x, n_in * n_tok, 1.0f);
            assert_int_equal(kern_matmul_ref(&w.m, x, n_tok, yr), 0);
            assert_int_equal(kern_cpu_set_isa(isa), 0);
            assert_int_equal(kern_matmul(pool, &w.m, x, n_tok, y), 0);
            restore_isa();
            double e = nmse(y, yr, n_out * n_tok);
            /* only 5..45 outputs here: the quantization noise in the NMSE is not averaged out */
            if (!(e <= 10 * matmul_tol(t)))
                fail_msg("%s %s n_tok=%d: nmse %g", kern_isa_name(isa), kern_dtype_traits(t)->name,
                         n_tok, e);
            float *row = malloc(sizeof(float) * (size_t)n_in);
            assert_int_equal(kern_cpu_set_isa(isa), 0);
            assert_int_equal(
                kern_dequant_row(t, wg + w.m.row_bytes * (size_t)(n_out - 1), row, n_in), 0);
            restore_isa();
            free(row);
            free(y);
            free(yr);
            munmap(xbase, xlen);
        }
        munmap(wbase, wlen);
        free(w.data);
    }
    kern_pool_free(pool);
}

static void
test_kernels_matrix_check(void **state)
{
    (void)state;
    uint8_t data[64] = {0};
    struct kern_matrix m = {
        .type = KERN_DTYPE_Q8_0, .n_in = 32, .n_out = 1, .row_bytes = 34, .data = data};
    assert_int_equal(kern_matrix_check(&m), 0);
    m.n_in = 48;
    m.row_bytes = kern_row_bytes(KERN_DTYPE_Q8_0, 48);
    assert_int_equal(kern_matrix_check(&m), -EINVAL);
    m.n_in = 0;
    assert_int_equal(kern_matrix_check(&m), -EINVAL);
    m.n_in = 32;
    m.row_bytes = 33;
    assert_int_equal(kern_matrix_check(&m), -EINVAL);
    m.type = KERN_DTYPE_Q2_K;
    m.n_in = 256;
    m.row_bytes = 84;
    assert_int_equal(kern_matrix_check(&m), -ENOTSUP);
    m.type = (enum kern_dtype)4;
    assert_int_equal(kern_matrix_check(&m), -EINVAL);
    m.type = (enum kern_dtype)77;
    assert_int_equal(kern_matrix_check(&m), -EINVAL);
    assert_int_equal(kern_matrix_check(NULL), -EINVAL);
}

/* ---- ISA selection ---- */

static void
test_kernels_isa_selection(void **state)
{
    (void)state;
    assert_string_equal(kern_isa_name(KERN_ISA_SCALAR), "scalar");
    assert_string_equal(kern_isa_name(KERN_ISA_AVX512), "avx512");
    assert_int_equal(kern_cpu_set_isa((enum kern_isa)7), -ENOTSUP);
    assert_int_equal(kern_cpu_set_isa(KERN_ISA_SCALAR), 0);
    assert_int_equal(kern_cpu_isa(), KERN_ISA_SCALAR);
    restore_isa();
    assert_int_equal(kern_cpu_isa(), kern_cpu_best_isa());
    if (kern_cpu_best_isa() < KERN_ISA_AVX512)
        assert_int_equal(kern_cpu_set_isa(KERN_ISA_AVX512), -ENOTSUP);
}

/* ---- Element-wise ops ---- */

static void
test_kernels_elementwise(void **state)
{
    (void)state;
    enum { N = 100 };
    float x[N], w[N], g[N], u[N], out[N];
    struct rng r = {3};
    fill_normal(&r, x, N, 2.0f);
    fill_normal(&r, w, N, 1.0f);
    fill_normal(&r, g, N, 3.0f);
    fill_normal(&r, u, N, 1.0f);

    double ss = 0.0;
    for (int i = 0; i < N; i++)
        ss += (double)x[i] * x[i];
    double sc = 1.0 / sqrt(ss / N + 1e-5);
    kern_rmsnorm(out, x, w, N, 1e-5f);
    for (int i = 0; i < N; i++)
        assert_float_equal(out[i], x[i] * sc * w[i], 1e-5);
    memcpy(out, x, sizeof(x));
    kern_rmsnorm(out, out, w, N, 1e-5f); /* aliasing */
    for (int i = 0; i < N; i++)
        assert_float_equal(out[i], x[i] * sc * w[i], 1e-5);

    kern_swiglu(out, g, u, N);
    for (int i = 0; i < N; i++)
        assert_float_equal(out[i], g[i] / (1.0 + exp(-g[i])) * u[i], 1e-5);

    memcpy(out, x, sizeof(x));
    kern_add(out, w, N);
    for (int i = 0; i < N; i++)
        assert_true(out[i] == x[i] + w[i]);

    memcpy(out, g, sizeof(g));
    float mx = kern_softmax(out, N);
    double sum = 0.0, ref_mx = g[0], z = 0.0;
    for (int i = 1; i < N; i++)
        ref_mx = g[i] > ref_mx ? g[i] : ref_mx;
    assert_true(mx == (float)ref_mx);
    for (int i = 0; i < N; i++)
        z += exp(g[i] - ref_mx);
    for (int i = 0; i < N; i++) {
        assert_float_equal(out[i], exp(g[i] - ref_mx) / z, 1e-6);
        sum += out[i];
    }
    assert_float_equal(sum, 1.0, 1e-5);
}

/* ---- Thread pool ---- */

struct count_ctx {
    _Atomic int hits[8];
    _Atomic int calls;
    int nth_seen[8];
};

static void
count_task(void *ctx, int ith, int nth)
{
    struct count_ctx *c = ctx;
    atomic_fetch_add(&c->hits[ith], 1);
    atomic_fetch_add(&c->calls, 1);
    c->nth_seen[ith] = nth;
}

static void
test_kernels_pool_each_ith_once(void **state)
{
    (void)state;
    for (int n = 1; n <= 4; n++) {
        struct kern_pool *pool = NULL;
        assert_int_equal(kern_pool_new(n, &pool), 0);
        assert_int_equal(kern_pool_n_threads(pool), n);
        struct count_ctx c;
        memset(&c, 0, sizeof(c));
        for (int run = 1; run <= 2000; run++) {
            kern_pool_run(pool, count_task, &c);
            /* when run returns, every thread has finished this run */
            assert_int_equal(atomic_load(&c.calls), run * n);
        }
        for (int i = 0; i < n; i++) {
            assert_int_equal(atomic_load(&c.hits[i]), 2000);
            assert_int_equal(c.nth_seen[i], n);
        }
        for (int i = n; i < 8; i++)
            assert_int_equal(atomic_load(&c.hits[i]), 0);
        kern_pool_free(pool);
    }
    kern_pool_free(NULL);
    struct kern_pool *pool = NULL;
    assert_int_equal(kern_pool_new(0, &pool), -EINVAL);
    assert_null(pool);
}

/* Workers that went to sleep are woken by the next run, and can be freed while asleep. */
static void
test_kernels_pool_sleeping_workers(void **state)
{
    (void)state;
    struct kern_pool *pool = NULL;
    assert_int_equal(kern_pool_new(3, &pool), 0);
    struct count_ctx c;
    memset(&c, 0, sizeof(c));
    for (int round = 0; round < 3; round++) {
        while (kern_cpu_pool_n_sleeping(pool) < 2)
            sched_yield(); /* waits for a state, not for time */
        kern_pool_run(pool, count_task, &c);
        assert_int_equal(atomic_load(&c.calls), 3 * (round + 1));
    }
    while (kern_cpu_pool_n_sleeping(pool) < 2)
        sched_yield();
    kern_pool_free(pool);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kernels_traits_and_row_bytes),
        cmocka_unit_test(test_kernels_quantize_roundtrip),
        cmocka_unit_test(test_kernels_quantize_rejects_bad_input),
        {"test_kernels_dequant_isa_matches_ref/avx2", test_kernels_dequant_isa_matches_ref, NULL,
         NULL, (void *)&isa_avx2},
        {"test_kernels_dequant_isa_matches_ref/avx512", test_kernels_dequant_isa_matches_ref, NULL,
         NULL, (void *)&isa_avx512},
        cmocka_unit_test(test_kernels_act_quant_spec),
        {"test_kernels_act_quant_isa_identical/avx2", test_kernels_act_quant_isa_identical, NULL,
         NULL, (void *)&isa_avx2},
        {"test_kernels_act_quant_isa_identical/avx512", test_kernels_act_quant_isa_identical, NULL,
         NULL, (void *)&isa_avx512},
        {"test_kernels_matmul_vs_ref/scalar", test_kernels_matmul_vs_ref, NULL, NULL,
         (void *)&isa_scalar},
        {"test_kernels_matmul_vs_ref/avx2", test_kernels_matmul_vs_ref, NULL, NULL,
         (void *)&isa_avx2},
        {"test_kernels_matmul_vs_ref/avx512", test_kernels_matmul_vs_ref, NULL, NULL,
         (void *)&isa_avx512},
        {"test_kernels_matmul_batched_vs_ref/avx2", test_kernels_matmul_batched_vs_ref, NULL, NULL,
         (void *)&isa_avx2},
        {"test_kernels_matmul_batched_vs_ref/avx512", test_kernels_matmul_batched_vs_ref, NULL,
         NULL, (void *)&isa_avx512},
        {"test_kernels_matmul_small_batches_vs_ref/avx2", test_kernels_matmul_small_batches_vs_ref,
         NULL, NULL, (void *)&isa_avx2},
        {"test_kernels_matmul_small_batches_vs_ref/avx512",
         test_kernels_matmul_small_batches_vs_ref, NULL, NULL, (void *)&isa_avx512},
        {"test_kernels_matmul_simd_vs_scalar/avx2", test_kernels_matmul_simd_vs_scalar, NULL, NULL,
         (void *)&isa_avx2},
        {"test_kernels_matmul_simd_vs_scalar/avx512", test_kernels_matmul_simd_vs_scalar, NULL,
         NULL, (void *)&isa_avx512},
        {"test_kernels_matmul_batch_invariant/scalar", test_kernels_matmul_batch_invariant, NULL,
         NULL, (void *)&isa_scalar},
        {"test_kernels_matmul_batch_invariant/avx2", test_kernels_matmul_batch_invariant, NULL,
         NULL, (void *)&isa_avx2},
        {"test_kernels_matmul_batch_invariant/avx512", test_kernels_matmul_batch_invariant, NULL,
         NULL, (void *)&isa_avx512},
        {"test_kernels_matmul_packed_identical/scalar", test_kernels_matmul_packed_identical, NULL,
         NULL, (void *)&isa_scalar},
        {"test_kernels_matmul_packed_identical/avx2", test_kernels_matmul_packed_identical, NULL,
         NULL, (void *)&isa_avx2},
        {"test_kernels_matmul_packed_identical/avx512", test_kernels_matmul_packed_identical, NULL,
         NULL, (void *)&isa_avx512},
        {"test_kernels_matmul_multi_identical/scalar", test_kernels_matmul_multi_identical, NULL,
         NULL, (void *)&isa_scalar},
        {"test_kernels_matmul_multi_identical/avx2", test_kernels_matmul_multi_identical, NULL,
         NULL, (void *)&isa_avx2},
        {"test_kernels_matmul_multi_identical/avx512", test_kernels_matmul_multi_identical, NULL,
         NULL, (void *)&isa_avx512},
        {"test_kernels_matmul_reads_within_bounds/scalar", test_kernels_matmul_reads_within_bounds,
         NULL, NULL, (void *)&isa_scalar},
        {"test_kernels_matmul_reads_within_bounds/avx2", test_kernels_matmul_reads_within_bounds,
         NULL, NULL, (void *)&isa_avx2},
        {"test_kernels_matmul_reads_within_bounds/avx512", test_kernels_matmul_reads_within_bounds,
         NULL, NULL, (void *)&isa_avx512},
        cmocka_unit_test(test_kernels_matrix_check),
        cmocka_unit_test(test_kernels_isa_selection),
        cmocka_unit_test(test_kernels_elementwise),
        cmocka_unit_test(test_kernels_pool_each_ith_once),
        cmocka_unit_test(test_kernels_pool_sleeping_workers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

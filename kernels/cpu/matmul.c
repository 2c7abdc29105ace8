/*
 * matmul: kern_matmul (the engine's hot path), its double-precision reference, and the checks.
 *
 * ---- Activation quantization: the exact spec (tests/ and a numpy reference re-implement it) ----
 *
 * Float weights (F32, F16, BF16): activations stay f32; each output is the f32 sum of f32 products
 * (order below).
 *
 * Quantized weights: each activation row is cut into blocks of blk elements, blk = 32 for Q4_0,
 * Q4_1, Q5_0, Q5_1, Q8_0 and blk = 256 for Q4_K, Q5_K, Q6_K. Per block:
 *     amax = max |x|                       (f32)
 *     d    = amax / 127                    (f32, kept as f32, not fp16)
 *     id   = d != 0 ? 127 / amax : 0       (f32)
 *     q    = clamp(rint(x * id), -127, 127) with x * id rounded to f32 first and rint rounding
 *            half to even (what _mm*_cvtps_epi32 does under the default MXCSR)
 * The weights are seen per scale unit of 32 elements (16 for Q6_K) as x_w = dw * (qc - off) + mw
 * with integer qc (cpu_int.h: canonical form; for the K-quants dw = d * sc_j and mw = -dmin *
 * mn_j). Per unit u the activation side keeps d (the d of the block holding u), s = d * sum(q over
 * u) (f32) and the integer sum of q over u. The output is y = sum over units u of (dw_u * d_u) *
 * isum_u + mw_u * s_u (f32) with isum_u = sum over the unit of (qc - off) * q (an exact integer,
 * whatever the order of its adds): the usual ggml scheme, integer accumulation inside a unit, f32
 * across units.
 *
 * ---- Batch invariance: the exact f32 order, per ISA ----
 *
 * For a given ISA, y of (row, token) is bit-identical whatever n_tok, the token's place in the
 * batch, the thread count and the row chunking: every kernel path of the ISA (small-batch and
 * batch, every tile shape) performs the same f32 operations, in the same order, on each (row,
 * token), and the activation quantization of a token depends on that token alone. Greedy decoding
 * of a sequence is therefore the same alone and batched (issue 3). Orders (fma: fused, one
 * rounding; other ops rounded each):
 *   scalar: acc = 0; for u in order: acc = acc + ((dw_u * d_u) * isum_u + mw_u * s_u) (C
 *           expression order; gcc -std=c11 does not contract it). Floats: acc += w_k * x_k in
 * order. AVX2:   8 lanes; per 32 elements e0 (a unit of 32, or two units of 16 for Q6_K), lane l
 * holds the exact integer partial ip of elements e0 + 4l .. e0 + 4l + 3 (offset included): A_l =
 * fma(ip, dw_u * d_u, A_l); separately m = m + mw_u * s_u per unit in order (for unit 16 the first
 * unit then the second); y = hsum8(A) + m with hsum8 = lanes (l + l+4), then (+2), then (+1).
 * Floats: A_l = fma(w, x, A_l) over k = l mod 8 in order, then hsum8, then the n mod 8 tail in
 * order. AVX-512: 16 unit classes j = u mod 16; P_j = 0; for u = j, j + 16, ... in order: P_j =
 * fma(float(isum_u), dw_u * d_u, P_j), then, for the types with a min (Q4_1, Q5_1, Q4_K, Q5_K), P_j
 * = fma(mw_u, s_u, P_j). y = tree16(P): h_j = P_j + P_{j+8} (j < 8), then h_j + h_{j+4} (j < 4),
 * then + 2, then + 1. The small-batch kernels get one unit per lane per chunk of 16 units by exact
 * integer lane merges (merge_units) and update the 16 lanes at once; the batch kernel has rows on
 * lanes and keeps the 16 partials of each (row group, token) in L1. Floats: P_j = fma(w_k, x_k,
 * P_j) over k = j mod 16 in order (the masked tail is zero), then tree16.
 *
 * ---- Work split ----
 *
 * The activations are quantized once per call (on the calling thread for small batches, else split
 * across the pool by token rows; kernels with their own activation layout re-lay them out in the
 * same step), then the output rows are handed out in chunks from an atomic counter, so a thread
 * that lost its core does not hold the others up. Below the ISA's batch_min tokens the small-batch
 * kernel (rows) unpacks each weight row once per tile of up to four tokens; from batch_min on the
 * batch kernel (rows_batch) converts a tile of rows once and runs every token over it (AVX-512:
 * from 3 tokens, so batched decode of 3..64 sequences takes it). Either way the weights are read
 * from memory once per call.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_int.h"
#include "kernels/kern.h"

#define ALIGN64(n) (((n) + 63) & ~(size_t)63)
#define QUANT_INLINE_ELEMS 32768 /* below this many activations, quantize on the calling thread */

int
kern_matrix_check(const struct kern_matrix *w)
{
    if (!w || w->n_in <= 0 || w->n_out <= 0 || !w->data)
        return -EINVAL;
    const struct kern_dtype_traits *t = kern_dtype_traits((uint32_t)w->type);
    if (!t)
        return -EINVAL;
    if (!t->supported || !kern_cpu_isa_ref.types[w->type].dequant)
        return -ENOTSUP;
    if (w->n_in % t->block_elems || w->n_in > (INT64_C(1) << 30))
        return -EINVAL;
    if (w->row_bytes != kern_row_bytes((uint32_t)w->type, w->n_in))
        return -EINVAL;
    return 0;
}

/* ---- Tasks ---- */

struct quant_task {
    const float *x;
    struct kern_cpu_act *act;
    kern_cpu_act_quant_fn fn;
    void (*prep)(struct kern_cpu_act *a, int t0, int t1); /* or NULL */
    int blk;
};

static void
quant_task(void *ctx, int ith, int nth)
{
    struct quant_task *qt = ctx;
    int n = qt->act->n_tok;
    int t0 = (int)((int64_t)n * ith / nth), t1 = (int)((int64_t)n * (ith + 1) / nth);
    if (t0 < t1) {
        qt->fn(qt->x, qt->act, qt->blk, t0, t1);
        if (qt->prep)
            qt->prep(qt->act, t0, t1);
    }
}

#define MM_MAX 4     /* matrices per kern_matmul_multi pool run */
#define MM_RANGES 16 /* home ranges of a run (threads beyond share them) */

/* One thread's home range of chunks, [front, back) packed as back << 32 | front: the owner claims
 * from the front, so its rows stream through memory in order (one stream per thread for the
 * hardware prefetchers); a thread whose own range is empty claims from the back of the others'. */
struct mm_range {
    _Alignas(64) _Atomic uint64_t fb;
};

/* The row chunks of up to MM_MAX matrices sharing one activation; chunk c of the run belongs to
 * matrix i with first[i] <= c < first[i + 1]. The chunks are split into n_ranges contiguous home
 * ranges. Which thread computes a chunk changes no bit of the result. */
struct rows_task {
    struct kern_cpu_mm mm[MM_MAX];
    kern_cpu_rows_fn fn[MM_MAX];
    int64_t chunk[MM_MAX];
    int64_t first[MM_MAX + 1];
    int n_mm;
    int n_ranges;
    uint8_t *scratch;
    size_t thread_bytes;
    struct mm_range range[MM_RANGES];
};

/* Claims the front (owner) or the back (thief) chunk of a range; -1 when it is empty. */
static int64_t
range_claim(struct mm_range *r, bool front)
{
    uint64_t fb = atomic_load_explicit(&r->fb, memory_order_relaxed);
    for (;;) {
        uint32_t f = (uint32_t)fb, b = (uint32_t)(fb >> 32);
        if (f >= b)
            return -1;
        uint64_t nfb = front ? fb + 1 : (uint64_t)(b - 1) << 32 | f;
        if (atomic_compare_exchange_weak_explicit(&r->fb, &fb, nfb, memory_order_relaxed,
                                                  memory_order_relaxed))
            return front ? f : b - 1;
    }
}

static void
rows_chunk(struct rows_task *rt, int64_t c, void *scratch)
{
    int i = 0;
    while (c >= rt->first[i + 1])
        i++;
    int64_t n_out = rt->mm[i].w->n_out;
    int64_t r0 = (c - rt->first[i]) * rt->chunk[i];
    int64_t r1 = r0 + rt->chunk[i] < n_out ? r0 + rt->chunk[i] : n_out;
    rt->fn[i](&rt->mm[i], r0, r1, scratch);
}

static void
rows_task(void *ctx, int ith, int nth)
{
    (void)nth;
    struct rows_task *rt = ctx;
    void *scratch = rt->scratch + (size_t)ith * rt->thread_bytes;
    int home = ith % rt->n_ranges;
    int64_t c;
    while ((c = range_claim(&rt->range[home], true)) >= 0)
        rows_chunk(rt, c, scratch);
    for (int k = 1; k < rt->n_ranges; k++) {
        struct mm_range *r = &rt->range[(home + k) % rt->n_ranges];
        while ((c = range_claim(r, false)) >= 0)
            rows_chunk(rt, c, scratch);
    }
}

/* ---- kern_matmul ---- */

/* Lays out the activation arrays at the start of buf; returns the bytes used (buf NULL: sizes).
 * dcorr only exists when the kernel reads it. */
static size_t
act_layout(struct kern_cpu_act *a, bool want_dcorr, uint8_t *buf)
{
    size_t n_q = (size_t)a->n_tok * (size_t)a->n_in;
    size_t n_u = (size_t)a->n_tok * (size_t)a->n_units;
    size_t off = 0;
    a->q = (int8_t *)(buf + off);
    off += ALIGN64(n_q);
    a->d = (float *)(buf + off);
    off += ALIGN64(n_u * sizeof(float));
    a->s = (float *)(buf + off);
    off += ALIGN64(n_u * sizeof(float));
    a->corr = (int32_t *)(buf + off);
    off += ALIGN64(n_u * sizeof(int32_t));
    a->dcorr = NULL;
    if (want_dcorr) {
        a->dcorr = (int32_t *)(buf + off);
        off += ALIGN64(n_q / 4 * sizeof(int32_t));
    }
    if (a->prep_stride) {
        a->prep = buf + off;
        off += (size_t)a->n_tok * a->prep_stride;
    }
    return off;
}

/* Rows per claim: about per_thread chunks per thread, a multiple of align. */
static int64_t
chunk_rows(int64_t n_out, int nth, int align, int per_thread)
{
    int64_t n = (int64_t)nth * per_thread;
    int64_t c = (n_out + n - 1) / n;
    c = (c + align - 1) / align * align;
    return c > 0 ? c : align;
}

/* The claims of a run over w[0..n_w): rows per chunk of each matrix, first[i] its first chunk
 * (first[n_w] the total); returns the number of home ranges. */
static int
plan_rows(const struct kern_matrix *const *w, int n_w, int nth, bool packed, int row_align,
          int64_t *chunk, int64_t *first)
{
    first[0] = 0;
    for (int i = 0; i < n_w; i++) {
        /* Decode matmuls take microseconds: small claims of whole 16-row groups keep the
         * threads finishing together (the last claim is what the others wait for). */
        chunk[i] = packed ? chunk_rows(w[i]->n_out, nth, KERN_PACK_ROWS, 8)
                          : chunk_rows(w[i]->n_out, nth, row_align, 4);
        first[i + 1] = first[i] + (w[i]->n_out + chunk[i] - 1) / chunk[i];
    }
    int n_ranges = nth < MM_RANGES ? nth : MM_RANGES;
    return n_ranges < first[n_w] ? n_ranges : (int)first[n_w];
}

/* Whether w[1..n_w) can share w[0]'s activations and pool run. */
static bool
same_input(const struct kern_matrix *const *w, int n_w)
{
    for (int i = 1; i < n_w; i++)
        if (w[i]->type != w[0]->type || w[i]->n_in != w[0]->n_in)
            return false;
    return true;
}

/* n_w (1..MM_MAX) matrices of one type and n_in against the same x: one activation quantization,
 * one pool run over the row chunks of all of them. */
static int
matmul_group(struct kern_pool *pool, const struct kern_matrix *const *w, int n_w, const float *x,
             int n_tok, float *const *y)
{
    int rc = 0;
    for (int i = 0; i < n_w && !rc; i++)
        rc = kern_matrix_check(w[i]);
    if (rc)
        return rc;
    if (!pool || n_tok < 0)
        return -EINVAL;
    if (n_tok == 0)
        return 0;
    const struct kern_cpu_isa_ops *iops = kern_cpu_isa_ops(kern_cpu_isa());
    const struct kern_cpu_type_ops *tops = kern_cpu_type_ops_isa(iops->isa, w[0]->type);
    int nth = kern_pool_n_threads(pool);

    struct kern_cpu_act act = {.n_tok = n_tok, .n_in = w[0]->n_in, .x = x};
    size_t act_bytes = 0;
    int batched = n_tok >= iops->batch_min;
    /* Decode from the packed rows when every matrix has them and this ISA reads them. */
    bool packed = !batched && tops->rows_packed;
    for (int i = 0; i < n_w; i++)
        packed = packed && w[i]->packed;
    bool want_dcorr = false;
    if (tops->unit) {
        act.unit = tops->unit;
        act.n_units = w[0]->n_in / tops->unit;
        act.off = tops->off;
        if (!batched && !packed && tops->prep)
            act.prep_stride = ALIGN64(tops->prep_bytes(w[0]->n_in));
        want_dcorr = !batched && !packed && tops->dcorr && tops->off;
        act_bytes = act_layout(&act, want_dcorr, NULL);
    }
    size_t thread_bytes = ALIGN64(kern_cpu_mm_scratch_bytes(w[0]->n_in));
    uint8_t *buf = NULL;
    rc = kern_cpu_pool_scratch(pool, act_bytes + (size_t)nth * thread_bytes, (void **)&buf);
    if (rc)
        return rc;
    if (tops->unit) {
        act_layout(&act, want_dcorr, buf);
        struct quant_task qt = {.x = x,
                                .act = &act,
                                .fn = iops->act_quant,
                                .prep = act.prep ? tops->prep : NULL,
                                .blk = tops->act_blk};
        if ((int64_t)n_tok * w[0]->n_in < QUANT_INLINE_ELEMS || nth == 1)
            quant_task(&qt, 0, 1);
        else
            kern_pool_run(pool, quant_task, &qt);
    }

    struct rows_task rt = {.n_mm = n_w, .scratch = buf + act_bytes, .thread_bytes = thread_bytes};
    for (int i = 0; i < n_w; i++) {
        rt.mm[i] = (struct kern_cpu_mm){.w = w[i], .act = &act, .y = y[i], .n_tok = n_tok};
        rt.fn[i] = batched ? tops->rows_batch : packed ? tops->rows_packed : tops->rows;
    }
    rt.n_ranges = plan_rows(w, n_w, nth, packed, iops->row_align, rt.chunk, rt.first);
    for (int k = 0; k < rt.n_ranges;
         k++) { /* range k: chunks [n k / n_ranges, n (k+1) / n_ranges) */
        uint64_t f = (uint64_t)(rt.first[n_w] * k / rt.n_ranges);
        uint64_t b = (uint64_t)(rt.first[n_w] * (k + 1) / rt.n_ranges);
        atomic_init(&rt.range[k].fb, b << 32 | f);
    }
    kern_pool_run(pool, rows_task, &rt);
    return 0;
}

int
kern_matmul(struct kern_pool *pool, const struct kern_matrix *w, const float *x, int n_tok,
            float *y)
{
    return matmul_group(pool, &w, 1, x, n_tok, &y);
}

int
kern_matmul_multi(struct kern_pool *pool, const struct kern_matrix *const *w, int n_w,
                  const float *x, int n_tok, float *const *y)
{
    if (n_w < 1 || !w)
        return -EINVAL;
    if (n_w <= MM_MAX && same_input(w, n_w))
        return matmul_group(pool, w, n_w, x, n_tok, y);
    for (int i = 0; i < n_w; i++) {
        int rc = matmul_group(pool, &w[i], 1, x, n_tok, &y[i]);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- Reference ---- */

int
kern_matmul_ref(const struct kern_matrix *w, const float *x, int n_tok, float *y)
{
    int rc = kern_matrix_check(w);
    if (rc)
        return rc;
    if (n_tok < 0)
        return -EINVAL;
    float *row = malloc(sizeof(float) * (size_t)w->n_in);
    if (!row)
        return -ENOMEM;
    for (int64_t o = 0; o < w->n_out; o++) {
        kern_cpu_isa_ref.types[w->type].dequant(
            (const uint8_t *)w->data + o * (int64_t)w->row_bytes, row, w->n_in);
        for (int t = 0; t < n_tok; t++) {
            const float *xt = x + (int64_t)t * w->n_in;
            double acc = 0.0;
            for (int64_t k = 0; k < w->n_in; k++)
                acc += (double)row[k] * (double)xt[k];
            y[(int64_t)t * w->n_out + o] = (float)acc;
        }
    }
    free(row);
    return 0;
}

/*
 * dot_ref: the scalar reference kernels of the CPU backend: canonical weight forms, the activation
 * quantizer and the row kernels that define what every SIMD kernel must compute (see the spec at
 * the top of matmul.c).
 */
#include <math.h>
#include <string.h>

#include "common/cm_util.h"
#include "kernels/cpu/cpu_int.h"

/* ---- Canonical weight forms ---- */

void
kern_cpu_canon_q4_0_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m)
{
    const struct kern_block_q4_0 *b = row;
    for (int64_t i = 0; i < n / KERN_QK; i++, b++, qc += KERN_QK) {
        d[i] = cm_fp16_to_f32(b->d);
        m[i] = 0.0f;
        for (int j = 0; j < 16; j++) {
            qc[j] = b->qs[j] & 0xF;
            qc[j + 16] = b->qs[j] >> 4;
        }
    }
}

void
kern_cpu_canon_q4_1_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m)
{
    const struct kern_block_q4_1 *b = row;
    for (int64_t i = 0; i < n / KERN_QK; i++, b++, qc += KERN_QK) {
        d[i] = cm_fp16_to_f32(b->d);
        m[i] = cm_fp16_to_f32(b->m);
        for (int j = 0; j < 16; j++) {
            qc[j] = b->qs[j] & 0xF;
            qc[j + 16] = b->qs[j] >> 4;
        }
    }
}

static void
canon_q5(const uint8_t qs[16], const uint8_t qh4[4], uint8_t *qc)
{
    uint32_t qh =
        (uint32_t)qh4[0] | (uint32_t)qh4[1] << 8 | (uint32_t)qh4[2] << 16 | (uint32_t)qh4[3] << 24;
    for (int j = 0; j < 16; j++) {
        qc[j] = (uint8_t)((qs[j] & 0xF) | ((qh >> j) & 1) << 4);
        qc[j + 16] = (uint8_t)((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
    }
}

void
kern_cpu_canon_q5_0_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m)
{
    const struct kern_block_q5_0 *b = row;
    for (int64_t i = 0; i < n / KERN_QK; i++, b++, qc += KERN_QK) {
        d[i] = cm_fp16_to_f32(b->d);
        m[i] = 0.0f;
        canon_q5(b->qs, b->qh, qc);
    }
}

void
kern_cpu_canon_q5_1_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m)
{
    const struct kern_block_q5_1 *b = row;
    for (int64_t i = 0; i < n / KERN_QK; i++, b++, qc += KERN_QK) {
        d[i] = cm_fp16_to_f32(b->d);
        m[i] = cm_fp16_to_f32(b->m);
        canon_q5(b->qs, b->qh, qc);
    }
}

void
kern_cpu_canon_q8_0_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m)
{
    const struct kern_block_q8_0 *b = row;
    for (int64_t i = 0; i < n / KERN_QK; i++, b++, qc += KERN_QK) {
        d[i] = cm_fp16_to_f32(b->d);
        m[i] = 0.0f;
        for (int j = 0; j < KERN_QK; j++)
            qc[j] = (uint8_t)b->qs[j] ^ 0x80;
    }
}

/* Q4_K and Q5_K: per sub-block d * sc and -dmin * mn. */
static void
canon_k_scales(uint16_t d16, uint16_t dmin16, const uint8_t *scales, float *d, float *m)
{
    float dd = cm_fp16_to_f32(d16), dm = cm_fp16_to_f32(dmin16);
    for (int j = 0; j < 8; j++) {
        uint8_t sc, mn;
        kern_cpu_k_scale_min(scales, j, &sc, &mn);
        d[j] = dd * (float)sc;
        m[j] = -(dm * (float)mn);
    }
}

void
kern_cpu_canon_q4_k_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m)
{
    const struct kern_block_q4_k *b = row;
    for (int64_t i = 0; i < n / KERN_QK_K; i++, b++, qc += KERN_QK_K, d += 8, m += 8) {
        canon_k_scales(b->d, b->dmin, b->scales, d, m);
        for (int g = 0; g < 4; g++) {
            for (int l = 0; l < 32; l++) {
                qc[64 * g + l] = b->qs[32 * g + l] & 0xF;
                qc[64 * g + 32 + l] = b->qs[32 * g + l] >> 4;
            }
        }
    }
}

void
kern_cpu_canon_q5_k_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m)
{
    const struct kern_block_q5_k *b = row;
    for (int64_t i = 0; i < n / KERN_QK_K; i++, b++, qc += KERN_QK_K, d += 8, m += 8) {
        canon_k_scales(b->d, b->dmin, b->scales, d, m);
        for (int g = 0; g < 4; g++) {
            for (int l = 0; l < 32; l++) {
                qc[64 * g + l] =
                    (uint8_t)((b->qs[32 * g + l] & 0xF) | ((b->qh[l] >> (2 * g)) & 1) << 4);
                qc[64 * g + 32 + l] =
                    (uint8_t)((b->qs[32 * g + l] >> 4) | ((b->qh[l] >> (2 * g + 1)) & 1) << 4);
            }
        }
    }
}

void
kern_cpu_canon_q6_k_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m)
{
    const struct kern_block_q6_k *b = row;
    for (int64_t i = 0; i < n / KERN_QK_K; i++, b++, qc += KERN_QK_K, d += 16, m += 16) {
        float dd = cm_fp16_to_f32(b->d);
        for (int j = 0; j < 16; j++) {
            d[j] = dd * (float)b->scales[j];
            m[j] = 0.0f;
        }
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
            uint8_t *y = qc + 128 * h;
            for (int l = 0; l < 32; l++) {
                y[l] = (uint8_t)((ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4);
                y[l + 32] = (uint8_t)((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4);
                y[l + 64] = (uint8_t)((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4);
                y[l + 96] = (uint8_t)((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4);
            }
        }
    }
}

/* ---- Activation quantizer (the spec in matmul.c) ---- */

/* Quantizes one block of blk values: q = rint(x * 127 / amax), d = amax / 127. */
static float
act_block_ref(const float *x, int blk, int8_t *q)
{
    float amax = 0.0f;
    for (int i = 0; i < blk; i++) {
        float v = fabsf(x[i]);
        amax = v > amax ? v : amax;
    }
    float d = amax / 127.0f;
    float id = d != 0.0f ? 127.0f / amax : 0.0f;
    for (int i = 0; i < blk; i++) {
        float v = nearbyintf(x[i] * id);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        q[i] = (int8_t)v;
    }
    return d;
}

void
kern_cpu_act_quant_ref(const float *x, struct kern_cpu_act *a, int blk, int t0, int t1)
{
    int upb = blk / a->unit; /* units per activation block */
    for (int t = t0; t < t1; t++) {
        const float *xt = x + (int64_t)t * a->n_in;
        int8_t *q = a->q + (int64_t)t * a->n_in;
        float *d = a->d + (int64_t)t * a->n_units, *s = a->s + (int64_t)t * a->n_units;
        int32_t *corr = a->corr + (int64_t)t * a->n_units;
        int32_t *dcorr = a->dcorr ? a->dcorr + (int64_t)t * (a->n_in / 4) : NULL;
        for (int64_t b = 0; b < a->n_in / blk; b++) {
            float db = act_block_ref(xt + b * blk, blk, q + b * blk);
            for (int u = 0; u < upb; u++) {
                int64_t iu = b * upb + u;
                const int8_t *qu = q + iu * a->unit;
                int32_t sum = 0;
                for (int i = 0; i < a->unit; i++)
                    sum += qu[i];
                d[iu] = db;
                s[iu] = db * (float)sum;
                corr[iu] = -a->off * sum;
            }
        }
        for (int64_t g = 0; dcorr && g < a->n_in / 4; g++)
            dcorr[g] = -a->off * (q[4 * g] + q[4 * g + 1] + q[4 * g + 2] + q[4 * g + 3]);
    }
}

/* ---- Reference row kernels ---- */

size_t
kern_cpu_mm_scratch_bytes(int64_t n_in)
{
    /* The largest user is the AVX-512 batch kernel: 32 interleaved rows (bytes, and f32 scales and
     * mins per unit of 16 or 32) plus 16 canonical rows being converted: under 80 bytes per
     * element of n_in. The reference kernels need one canonical or f32 row. */
    return 96 * (size_t)n_in + 64 * 1024;
}

void
kern_cpu_rows_quant_ref(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1, void *scratch)
{
    const struct kern_matrix *w = mm->w;
    const struct kern_cpu_act *a = mm->act;
    const struct kern_cpu_type_ops *ops = kern_cpu_type_ops_isa(KERN_ISA_SCALAR, w->type);
    int unit = a->unit;
    int64_t nu = a->n_units;
    uint8_t *qc = scratch;
    float *dw = (float *)(qc + ((w->n_in + 63) & ~(int64_t)63));
    float *mw = dw + nu;
    for (int64_t r = r0; r < r1; r++) {
        ops->canon((const uint8_t *)w->data + r * (int64_t)w->row_bytes, w->n_in, qc, dw, mw);
        for (int t = 0; t < mm->n_tok; t++) {
            const int8_t *q = a->q + (int64_t)t * a->n_in;
            const float *da = a->d + (int64_t)t * nu, *sa = a->s + (int64_t)t * nu;
            const int32_t *corr = a->corr + (int64_t)t * nu;
            float acc = 0.0f;
            for (int64_t u = 0; u < nu; u++) {
                int32_t isum = corr[u];
                for (int i = 0; i < unit; i++)
                    isum += qc[u * unit + i] * q[u * unit + i];
                acc += dw[u] * da[u] * (float)isum + mw[u] * sa[u];
            }
            mm->y[(int64_t)t * w->n_out + r] = acc;
        }
    }
}

void
kern_cpu_rows_float_ref(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1, void *scratch)
{
    const struct kern_matrix *w = mm->w;
    const struct kern_cpu_type_ops *ops = kern_cpu_type_ops_isa(KERN_ISA_SCALAR, w->type);
    float *row = scratch;
    for (int64_t r = r0; r < r1; r++) {
        ops->dequant((const uint8_t *)w->data + r * (int64_t)w->row_bytes, row, w->n_in);
        for (int t = 0; t < mm->n_tok; t++) {
            const float *x = mm->act->x + (int64_t)t * w->n_in;
            float acc = 0.0f;
            for (int64_t k = 0; k < w->n_in; k++)
                acc += row[k] * x[k];
            mm->y[(int64_t)t * w->n_out + r] = acc;
        }
    }
}

/* ---- The reference table ---- */

#define FLOAT_OPS(deq)                                                                             \
    {                                                                                              \
        .dequant = deq, .rows = kern_cpu_rows_float_ref                                            \
    }
#define QUANT_OPS(deq, can, u, blk, o, mn)                                                         \
    {                                                                                              \
        .dequant = deq, .canon = can, .rows = kern_cpu_rows_quant_ref, .unit = u, .act_blk = blk,  \
        .off = o, .has_min = mn                                                                    \
    }

static const struct kern_cpu_type_ops ref_types[KERN_DTYPE_COUNT] = {
    [KERN_DTYPE_F32] = FLOAT_OPS(kern_cpu_dequant_f32_ref),
    [KERN_DTYPE_F16] = FLOAT_OPS(kern_cpu_dequant_f16_ref),
    [KERN_DTYPE_BF16] = FLOAT_OPS(kern_cpu_dequant_bf16_ref),
    [KERN_DTYPE_Q4_0] =
        QUANT_OPS(kern_cpu_dequant_q4_0_ref, kern_cpu_canon_q4_0_ref, 32, 32, 8, false),
    [KERN_DTYPE_Q4_1] =
        QUANT_OPS(kern_cpu_dequant_q4_1_ref, kern_cpu_canon_q4_1_ref, 32, 32, 0, true),
    [KERN_DTYPE_Q5_0] =
        QUANT_OPS(kern_cpu_dequant_q5_0_ref, kern_cpu_canon_q5_0_ref, 32, 32, 16, false),
    [KERN_DTYPE_Q5_1] =
        QUANT_OPS(kern_cpu_dequant_q5_1_ref, kern_cpu_canon_q5_1_ref, 32, 32, 0, true),
    [KERN_DTYPE_Q8_0] =
        QUANT_OPS(kern_cpu_dequant_q8_0_ref, kern_cpu_canon_q8_0_ref, 32, 32, 128, false),
    [KERN_DTYPE_Q4_K] =
        QUANT_OPS(kern_cpu_dequant_q4_k_ref, kern_cpu_canon_q4_k_ref, 32, 256, 0, true),
    [KERN_DTYPE_Q5_K] =
        QUANT_OPS(kern_cpu_dequant_q5_k_ref, kern_cpu_canon_q5_k_ref, 32, 256, 0, true),
    [KERN_DTYPE_Q6_K] =
        QUANT_OPS(kern_cpu_dequant_q6_k_ref, kern_cpu_canon_q6_k_ref, 16, 256, 32, false),
};

const struct kern_cpu_isa_ops kern_cpu_isa_ref = {
    .isa = KERN_ISA_SCALAR,
    .types = ref_types,
    .act_quant = kern_cpu_act_quant_ref,
    .batch_min = 1 << 30,
    .row_align = 1,
};

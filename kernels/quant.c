/*
 * quant: per-type facts (block sizes), row quantization for tests and generated models, and the
 * scalar reference dequantizers (the definition of each block layout in kernels/quant.h).
 *
 * The quantizers pick scales simply (absolute maximum or min/max per block), not with ggml's error
 * search: they exist to produce valid rows of every supported type, not the best ones.
 */
#include "kernels/quant.h"

#include <errno.h>
#include <math.h>
#include <string.h>

#include "common/cm_util.h"
#include "kernels/cpu/cpu_int.h"
#include "kernels/kern.h"

/* ---- Type table ---- */

/* Indexed by GGUF type id; entries with a NULL name are unknown or removed ids. The IQ and TQ
 * types are listed so that files holding them are measured (and then rejected) correctly. */
static const struct kern_dtype_traits dtype_table[KERN_DTYPE_COUNT] = {
    [KERN_DTYPE_F32] = {"f32", 1, 4, true},
    [KERN_DTYPE_F16] = {"f16", 1, 2, true},
    [KERN_DTYPE_Q4_0] = {"q4_0", KERN_QK, 18, true},
    [KERN_DTYPE_Q4_1] = {"q4_1", KERN_QK, 20, true},
    [KERN_DTYPE_Q5_0] = {"q5_0", KERN_QK, 22, true},
    [KERN_DTYPE_Q5_1] = {"q5_1", KERN_QK, 24, true},
    [KERN_DTYPE_Q8_0] = {"q8_0", KERN_QK, 34, true},
    [KERN_DTYPE_Q8_1] = {"q8_1", KERN_QK, 36, false},
    [KERN_DTYPE_Q2_K] = {"q2_K", KERN_QK_K, 84, false},
    [KERN_DTYPE_Q3_K] = {"q3_K", KERN_QK_K, 110, false},
    [KERN_DTYPE_Q4_K] = {"q4_K", KERN_QK_K, 144, true},
    [KERN_DTYPE_Q5_K] = {"q5_K", KERN_QK_K, 176, true},
    [KERN_DTYPE_Q6_K] = {"q6_K", KERN_QK_K, 210, true},
    [KERN_DTYPE_Q8_K] = {"q8_K", KERN_QK_K, 292, false},
    [16] = {"iq2_xxs", KERN_QK_K, 66, false},
    [17] = {"iq2_xs", KERN_QK_K, 74, false},
    [18] = {"iq3_xxs", KERN_QK_K, 98, false},
    [19] = {"iq1_s", KERN_QK_K, 50, false},
    [20] = {"iq4_nl", KERN_QK, 18, false},
    [21] = {"iq3_s", KERN_QK_K, 110, false},
    [22] = {"iq2_s", KERN_QK_K, 82, false},
    [23] = {"iq4_xs", KERN_QK_K, 136, false},
    [24] = {"i8", 1, 1, false},
    [25] = {"i16", 1, 2, false},
    [26] = {"i32", 1, 4, false},
    [27] = {"i64", 1, 8, false},
    [28] = {"f64", 1, 8, false},
    [29] = {"iq1_m", KERN_QK_K, 56, false},
    [KERN_DTYPE_BF16] = {"bf16", 1, 2, true},
    [34] = {"tq1_0", KERN_QK_K, 54, false},
    [35] = {"tq2_0", KERN_QK_K, 66, false},
};

const struct kern_dtype_traits *
kern_dtype_traits(uint32_t type)
{
    if (type >= KERN_DTYPE_COUNT || !dtype_table[type].name)
        return NULL;
    return &dtype_table[type];
}

size_t
kern_row_bytes(uint32_t type, int64_t n)
{
    const struct kern_dtype_traits *t = kern_dtype_traits(type);
    if (!t || n < 0 || n % t->block_elems)
        return 0;
    return (size_t)(n / t->block_elems) * (size_t)t->block_bytes;
}

/* ---- Quantization helpers ---- */

static int
clampi(int v, int lo, int hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/* The value of largest magnitude, with its sign (ties: the first). */
static float
signed_absmax(const float *x, int n)
{
    float best = 0.0f, amax = 0.0f;
    for (int i = 0; i < n; i++) {
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            best = x[i];
        }
    }
    return best;
}

static void
min_max(const float *x, int n, float *mn, float *mx)
{
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    *mn = lo;
    *mx = hi;
}

/* Inverse of a scale that was stored as fp16, so rounding uses the scale the decoder sees. */
static float
inv_fp16(uint16_t h)
{
    float d = cm_fp16_to_f32(h);
    return d != 0.0f ? 1.0f / d : 0.0f;
}

/* ---- Quantizers, one block each ---- */

static void
quant_q8_0(const float *x, struct kern_block_q8_0 *b)
{
    float amax = fabsf(signed_absmax(x, KERN_QK));
    b->d = cm_f32_to_fp16(amax / 127.0f);
    float id = inv_fp16(b->d);
    for (int i = 0; i < KERN_QK; i++)
        b->qs[i] = (int8_t)clampi((int)lrintf(x[i] * id), -127, 127);
}

/* Symmetric nibble types: the extreme value maps onto -half (-8 or -16). */
static void
quant_sym(const float *x, int half, uint16_t *d, uint8_t *q)
{
    float mx = signed_absmax(x, KERN_QK);
    *d = cm_f32_to_fp16(mx / (float)-half);
    float id = inv_fp16(*d);
    for (int i = 0; i < KERN_QK; i++)
        q[i] = (uint8_t)clampi((int)lrintf(x[i] * id) + half, 0, 2 * half - 1);
}

/* Affine types: x = d * q + m with q in 0..qmax. */
static void
quant_affine(const float *x, int qmax, uint16_t *d, uint16_t *m, uint8_t *q)
{
    float lo, hi;
    min_max(x, KERN_QK, &lo, &hi);
    *d = cm_f32_to_fp16((hi - lo) / (float)qmax);
    *m = cm_f32_to_fp16(lo);
    float id = inv_fp16(*d);
    float mf = cm_fp16_to_f32(*m);
    for (int i = 0; i < KERN_QK; i++)
        q[i] = (uint8_t)clampi((int)lrintf((x[i] - mf) * id), 0, qmax);
}

static void
pack_nibbles(const uint8_t *q, uint8_t *qs)
{
    for (int i = 0; i < KERN_QK / 2; i++)
        qs[i] = (uint8_t)((q[i] & 0xF) | ((q[i + KERN_QK / 2] & 0xF) << 4));
}

static void
pack_qh32(const uint8_t *q, uint8_t qh[4])
{
    uint32_t h = 0;
    for (int i = 0; i < KERN_QK; i++)
        h |= (uint32_t)((q[i] >> 4) & 1) << i;
    for (int i = 0; i < 4; i++)
        qh[i] = (uint8_t)(h >> (8 * i));
}

static void
quant_q4_0(const float *x, struct kern_block_q4_0 *b)
{
    uint8_t q[KERN_QK];
    quant_sym(x, 8, &b->d, q);
    pack_nibbles(q, b->qs);
}

static void
quant_q5_0(const float *x, struct kern_block_q5_0 *b)
{
    uint8_t q[KERN_QK];
    quant_sym(x, 16, &b->d, q);
    pack_nibbles(q, b->qs);
    pack_qh32(q, b->qh);
}

static void
quant_q4_1(const float *x, struct kern_block_q4_1 *b)
{
    uint8_t q[KERN_QK];
    quant_affine(x, 15, &b->d, &b->m, q);
    pack_nibbles(q, b->qs);
}

static void
quant_q5_1(const float *x, struct kern_block_q5_1 *b)
{
    uint8_t q[KERN_QK];
    quant_affine(x, 31, &b->d, &b->m, q);
    pack_nibbles(q, b->qs);
    pack_qh32(q, b->qh);
}

/* Packs eight 6-bit scales and mins into the 12-byte K-quant form (see kern_block_q4_k). */
static void
pack_k_scales(const uint8_t sc[8], const uint8_t mn[8], uint8_t out[KERN_K_SCALE_SIZE])
{
    for (int j = 0; j < 4; j++) {
        out[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        out[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
        out[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
    }
}

/*
 * Q4_K / Q5_K: per sub-block of 32, x ~ scale_j * q - min_j with min_j >= 0; the 6-bit sc/mn are
 * those scaled by d and dmin. Fills q[256] with values in 0..qmax.
 */
static void
quant_k_affine(const float *x, int qmax, uint16_t *d, uint16_t *dmin, uint8_t scales[12],
               uint8_t q[KERN_QK_K])
{
    float scale[8], mins[8], max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; j++) {
        float lo, hi;
        min_max(x + 32 * j, 32, &lo, &hi);
        lo = lo < 0.0f ? lo : 0.0f;
        scale[j] = (hi - lo) / (float)qmax;
        mins[j] = -lo;
        max_scale = scale[j] > max_scale ? scale[j] : max_scale;
        max_min = mins[j] > max_min ? mins[j] : max_min;
    }
    *d = cm_f32_to_fp16(max_scale / 63.0f);
    *dmin = cm_f32_to_fp16(max_min / 63.0f);
    float df = cm_fp16_to_f32(*d), dmf = cm_fp16_to_f32(*dmin);
    float id = df != 0.0f ? 1.0f / df : 0.0f, idm = dmf != 0.0f ? 1.0f / dmf : 0.0f;
    uint8_t sc[8], mn[8];
    for (int j = 0; j < 8; j++) {
        sc[j] = (uint8_t)clampi((int)lrintf(scale[j] * id), 0, 63);
        mn[j] = (uint8_t)clampi((int)lrintf(mins[j] * idm), 0, 63);
    }
    pack_k_scales(sc, mn, scales);
    for (int j = 0; j < 8; j++) {
        float s = df * (float)sc[j], m = dmf * (float)mn[j];
        float is = s != 0.0f ? 1.0f / s : 0.0f;
        for (int i = 0; i < 32; i++)
            q[32 * j + i] = (uint8_t)clampi((int)lrintf((x[32 * j + i] + m) * is), 0, qmax);
    }
}

static void
quant_q4_k(const float *x, struct kern_block_q4_k *b)
{
    uint8_t q[KERN_QK_K];
    quant_k_affine(x, 15, &b->d, &b->dmin, b->scales, q);
    for (int g = 0; g < 4; g++)
        for (int l = 0; l < 32; l++)
            b->qs[32 * g + l] = (uint8_t)(q[64 * g + l] | (q[64 * g + 32 + l] << 4));
}

static void
quant_q5_k(const float *x, struct kern_block_q5_k *b)
{
    uint8_t q[KERN_QK_K];
    quant_k_affine(x, 31, &b->d, &b->dmin, b->scales, q);
    memset(b->qh, 0, sizeof(b->qh));
    for (int g = 0; g < 4; g++) {
        for (int l = 0; l < 32; l++) {
            uint8_t lo = q[64 * g + l], hi = q[64 * g + 32 + l];
            b->qs[32 * g + l] = (uint8_t)((lo & 0xF) | ((hi & 0xF) << 4));
            b->qh[l] |= (uint8_t)(((lo >> 4) << (2 * g)) | ((hi >> 4) << (2 * g + 1)));
        }
    }
}

static void
quant_q6_k(const float *x, struct kern_block_q6_k *b)
{
    float scale[16], max_abs = 0.0f, max_scale = 0.0f;
    for (int j = 0; j < 16; j++) {
        scale[j] = signed_absmax(x + 16 * j, 16) / -32.0f;
        if (fabsf(scale[j]) > max_abs) {
            max_abs = fabsf(scale[j]);
            max_scale = scale[j];
        }
    }
    b->d = cm_f32_to_fp16(max_scale / -127.0f);
    float df = cm_fp16_to_f32(b->d), id = df != 0.0f ? 1.0f / df : 0.0f;
    uint8_t q[KERN_QK_K];
    for (int j = 0; j < 16; j++) {
        b->scales[j] = (int8_t)clampi((int)lrintf(scale[j] * id), -128, 127);
        float s = df * (float)b->scales[j];
        float is = s != 0.0f ? 1.0f / s : 0.0f;
        for (int i = 0; i < 16; i++)
            q[16 * j + i] = (uint8_t)clampi((int)lrintf(x[16 * j + i] * is) + 32, 0, 63);
    }
    for (int h = 0; h < 2; h++) {
        const uint8_t *qq = q + 128 * h;
        uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
        for (int l = 0; l < 32; l++) {
            ql[l] = (uint8_t)((qq[l] & 0xF) | ((qq[l + 64] & 0xF) << 4));
            ql[l + 32] = (uint8_t)((qq[l + 32] & 0xF) | ((qq[l + 96] & 0xF) << 4));
            qh[l] = (uint8_t)((qq[l] >> 4) | ((qq[l + 32] >> 4) << 2) | ((qq[l + 64] >> 4) << 4) |
                              ((qq[l + 96] >> 4) << 6));
        }
    }
}

int
kern_quantize_row(enum kern_dtype type, const float *src, void *dst, int64_t n)
{
    const struct kern_dtype_traits *t = kern_dtype_traits(type);
    if (!t || !t->supported || n < 0 || n % t->block_elems)
        return -EINVAL;
    int64_t nb = n / t->block_elems;
    uint8_t *out = dst;
    for (int64_t i = 0; i < nb; i++) {
        const float *x = src + i * t->block_elems;
        void *b = out + i * t->block_bytes;
        switch (type) {
        case KERN_DTYPE_F32:
            memcpy(b, x, 4);
            break;
        case KERN_DTYPE_F16: {
            uint16_t h = cm_f32_to_fp16(*x);
            memcpy(b, &h, 2);
            break;
        }
        case KERN_DTYPE_BF16: {
            uint16_t h = cm_f32_to_bf16(*x);
            memcpy(b, &h, 2);
            break;
        }
        case KERN_DTYPE_Q4_0:
            quant_q4_0(x, b);
            break;
        case KERN_DTYPE_Q4_1:
            quant_q4_1(x, b);
            break;
        case KERN_DTYPE_Q5_0:
            quant_q5_0(x, b);
            break;
        case KERN_DTYPE_Q5_1:
            quant_q5_1(x, b);
            break;
        case KERN_DTYPE_Q8_0:
            quant_q8_0(x, b);
            break;
        case KERN_DTYPE_Q4_K:
            quant_q4_k(x, b);
            break;
        case KERN_DTYPE_Q5_K:
            quant_q5_k(x, b);
            break;
        case KERN_DTYPE_Q6_K:
            quant_q6_k(x, b);
            break;
        default:
            return -EINVAL;
        }
    }
    return 0;
}

/* ---- Reference dequantizers (the definition of each layout) ---- */

void
kern_cpu_dequant_f32_ref(const void *src, float *dst, int64_t n)
{
    memcpy(dst, src, (size_t)n * sizeof(float));
}

void
kern_cpu_dequant_f16_ref(const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        dst[i] = cm_fp16_to_f32(h);
    }
}

void
kern_cpu_dequant_bf16_ref(const void *src, float *dst, int64_t n)
{
    const uint8_t *p = src;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        dst[i] = cm_bf16_to_f32(h);
    }
}

void
kern_cpu_dequant_q4_0_ref(const void *src, float *dst, int64_t n)
{
    const struct kern_block_q4_0 *b = src;
    for (int64_t i = 0; i < n / KERN_QK; i++, b++, dst += KERN_QK) {
        float d = cm_fp16_to_f32(b->d);
        for (int j = 0; j < KERN_QK / 2; j++) {
            dst[j] = d * (float)((b->qs[j] & 0xF) - 8);
            dst[j + 16] = d * (float)((b->qs[j] >> 4) - 8);
        }
    }
}

void
kern_cpu_dequant_q4_1_ref(const void *src, float *dst, int64_t n)
{
    const struct kern_block_q4_1 *b = src;
    for (int64_t i = 0; i < n / KERN_QK; i++, b++, dst += KERN_QK) {
        float d = cm_fp16_to_f32(b->d), m = cm_fp16_to_f32(b->m);
        for (int j = 0; j < KERN_QK / 2; j++) {
            dst[j] = d * (float)(b->qs[j] & 0xF) + m;
            dst[j + 16] = d * (float)(b->qs[j] >> 4) + m;
        }
    }
}

static uint32_t
load_qh32(const uint8_t qh[4])
{
    return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
}

void
kern_cpu_dequant_q5_0_ref(const void *src, float *dst, int64_t n)
{
    const struct kern_block_q5_0 *b = src;
    for (int64_t i = 0; i < n / KERN_QK; i++, b++, dst += KERN_QK) {
        float d = cm_fp16_to_f32(b->d);
        uint32_t qh = load_qh32(b->qh);
        for (int j = 0; j < KERN_QK / 2; j++) {
            int lo = (b->qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
            int hi = (b->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            dst[j] = d * (float)(lo - 16);
            dst[j + 16] = d * (float)(hi - 16);
        }
    }
}

void
kern_cpu_dequant_q5_1_ref(const void *src, float *dst, int64_t n)
{
    const struct kern_block_q5_1 *b = src;
    for (int64_t i = 0; i < n / KERN_QK; i++, b++, dst += KERN_QK) {
        float d = cm_fp16_to_f32(b->d), m = cm_fp16_to_f32(b->m);
        uint32_t qh = load_qh32(b->qh);
        for (int j = 0; j < KERN_QK / 2; j++) {
            int lo = (b->qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
            int hi = (b->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            dst[j] = d * (float)lo + m;
            dst[j + 16] = d * (float)hi + m;
        }
    }
}

void
kern_cpu_dequant_q8_0_ref(const void *src, float *dst, int64_t n)
{
    const struct kern_block_q8_0 *b = src;
    for (int64_t i = 0; i < n / KERN_QK; i++, b++, dst += KERN_QK) {
        float d = cm_fp16_to_f32(b->d);
        for (int j = 0; j < KERN_QK; j++)
            dst[j] = d * (float)b->qs[j];
    }
}

void
kern_cpu_k_scale_min(const uint8_t scales[KERN_K_SCALE_SIZE], int j, uint8_t *sc, uint8_t *mn)
{
    if (j < 4) {
        *sc = scales[j] & 63;
        *mn = scales[j + 4] & 63;
    } else {
        *sc = (uint8_t)((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4));
        *mn = (uint8_t)((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
    }
}

void
kern_cpu_dequant_q4_k_ref(const void *src, float *dst, int64_t n)
{
    const struct kern_block_q4_k *b = src;
    for (int64_t i = 0; i < n / KERN_QK_K; i++, b++, dst += KERN_QK_K) {
        float d = cm_fp16_to_f32(b->d), dmin = cm_fp16_to_f32(b->dmin);
        for (int g = 0; g < 4; g++) {
            uint8_t sc0, mn0, sc1, mn1;
            kern_cpu_k_scale_min(b->scales, 2 * g, &sc0, &mn0);
            kern_cpu_k_scale_min(b->scales, 2 * g + 1, &sc1, &mn1);
            float d0 = d * (float)sc0, m0 = dmin * (float)mn0;
            float d1 = d * (float)sc1, m1 = dmin * (float)mn1;
            for (int l = 0; l < 32; l++) {
                dst[64 * g + l] = d0 * (float)(b->qs[32 * g + l] & 0xF) - m0;
                dst[64 * g + 32 + l] = d1 * (float)(b->qs[32 * g + l] >> 4) - m1;
            }
        }
    }
}

void
kern_cpu_dequant_q5_k_ref(const void *src, float *dst, int64_t n)
{
    const struct kern_block_q5_k *b = src;
    for (int64_t i = 0; i < n / KERN_QK_K; i++, b++, dst += KERN_QK_K) {
        float d = cm_fp16_to_f32(b->d), dmin = cm_fp16_to_f32(b->dmin);
        for (int g = 0; g < 4; g++) {
            uint8_t sc0, mn0, sc1, mn1;
            kern_cpu_k_scale_min(b->scales, 2 * g, &sc0, &mn0);
            kern_cpu_k_scale_min(b->scales, 2 * g + 1, &sc1, &mn1);
            float d0 = d * (float)sc0, m0 = dmin * (float)mn0;
            float d1 = d * (float)sc1, m1 = dmin * (float)mn1;
            for (int l = 0; l < 32; l++) {
                int lo = (b->qs[32 * g + l] & 0xF) | ((b->qh[l] >> (2 * g)) & 1) << 4;
                int hi = (b->qs[32 * g + l] >> 4) | ((b->qh[l] >> (2 * g + 1)) & 1) << 4;
                dst[64 * g + l] = d0 * (float)lo - m0;
                dst[64 * g + 32 + l] = d1 * (float)hi - m1;
            }
        }
    }
}

void
kern_cpu_dequant_q6_k_ref(const void *src, float *dst, int64_t n)
{
    const struct kern_block_q6_k *b = src;
    for (int64_t i = 0; i < n / KERN_QK_K; i++, b++, dst += KERN_QK_K) {
        float d = cm_fp16_to_f32(b->d);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
            const int8_t *sc = b->scales + 8 * h;
            float *y = dst + 128 * h;
            for (int l = 0; l < 32; l++) {
                int q1 = (ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4;
                int q2 = (ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4;
                int q3 = (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4;
                int q4 = (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4;
                int is = l / 16;
                y[l] = d * (float)sc[is] * (float)(q1 - 32);
                y[l + 32] = d * (float)sc[is + 2] * (float)(q2 - 32);
                y[l + 64] = d * (float)sc[is + 4] * (float)(q3 - 32);
                y[l + 96] = d * (float)sc[is + 6] * (float)(q4 - 32);
            }
        }
    }
}

/* ---- Public entry ---- */

int
kern_dequant_row(enum kern_dtype type, const void *src, float *dst, int64_t n)
{
    const struct kern_dtype_traits *t = kern_dtype_traits(type);
    if (!t || !t->supported || n < 0 || n % t->block_elems)
        return -EINVAL;
    const struct kern_cpu_type_ops *ops = kern_cpu_type_ops(type);
    if (!ops || !ops->dequant)
        return -EINVAL;
    ops->dequant(src, dst, n);
    return 0;
}

/*
 * dot_avx2: the AVX2 (+ FMA + F16C) kernels of the CPU backend, for CPUs without AVX-512 VNNI.
 * Compiled with the AVX2 flags; only called after kern_cpu_best_isa() found the features.
 *
 * One kernel body serves every quantized type through always-inline helpers that know the block
 * layout: unpack32(e0) gives the 32 canonical bytes of elements [e0, e0 + 32) (one unit of 32, or
 * two units of 16 for Q6_K) and unit_scales(u) the scale and min of unit u. The integer dot of a
 * unit is vpmaddubsw (unsigned weights x signed activations, pairs) + vpmaddwd with ones; no pair
 * can saturate because canonical weights are at most 63 except for Q8_0, which is multiplied in
 * signed form with the vpsignb trick instead (|q| <= 128 times |a| <= 127). Each weight row is
 * unpacked once per tile of up to four tokens. Large batches use the same kernel.
 */
#include <immintrin.h>
#include <string.h>

#include "kernels/cpu/cpu_int.h"

#define AI static inline __attribute__((always_inline))

enum kt {
    KT_Q4_0,
    KT_Q4_1,
    KT_Q5_0,
    KT_Q5_1,
    KT_Q8_0,
    KT_Q4_K,
    KT_Q5_K,
    KT_Q6_K,
};

AI int
kt_unit(int kt)
{
    return kt == KT_Q6_K ? 16 : 32;
}

AI int
kt_bs(int kt)
{
    static const int bs[] = {18, 20, 22, 24, 34, 144, 176, 210};
    return bs[kt];
}

AI int
kt_has_min(int kt)
{
    return kt == KT_Q4_1 || kt == KT_Q5_1 || kt == KT_Q4_K || kt == KT_Q5_K;
}

AI int
kt_off(int kt)
{
    static const int off[] = {8, 0, 16, 0, 128, 0, 0, 32};
    return off[kt];
}

AI float
h2f(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

AI void
k_scale_min(const uint8_t *q, int j, int *sc, int *mn)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* ---- Unpacking ---- */

AI __m256i
nibbles32(const uint8_t *qs)
{
    __m128i x = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), _mm256_set1_epi8(0x0F));
}

/* 0x10 in byte i where bit i of the 32-bit qh is set. */
AI __m256i
bits32(uint32_t qh)
{
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* 0x10 in byte i where bit b of qh[i] is set. */
AI __m256i
bits_k(const uint8_t *qh, int b)
{
    const __m256i m = _mm256_set1_epi8((char)(1 << b));
    __m256i v = _mm256_loadu_si256((const __m256i *)qh);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, m), m);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* Canonical bytes of elements [e0, e0 + 32); for Q8_0 the signed quants instead. */
AI __m256i
unpack32(int kt, const uint8_t *row, int64_t e0)
{
    const int bs = kt_bs(kt);
    uint32_t qh;
    if (kt <= KT_Q8_0) {
        const uint8_t *b = row + (e0 / 32) * bs;
        switch (kt) {
        case KT_Q4_0:
            return nibbles32(b + 2);
        case KT_Q4_1:
            return nibbles32(b + 4);
        case KT_Q5_0:
            memcpy(&qh, b + 2, 4);
            return _mm256_or_si256(nibbles32(b + 6), bits32(qh));
        case KT_Q5_1:
            memcpy(&qh, b + 4, 4);
            return _mm256_or_si256(nibbles32(b + 8), bits32(qh));
        default:
            return _mm256_loadu_si256((const __m256i *)(b + 2));
        }
    }
    const uint8_t *sb = row + (e0 / 256) * bs;
    int j = (int)((e0 % 256) / 32);
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    if (kt == KT_Q6_K) {
        int h = j / 4, k = j % 4;
        __m256i ql = _mm256_loadu_si256((const __m256i *)(sb + 64 * h + 32 * (k & 1)));
        __m256i hb = _mm256_loadu_si256((const __m256i *)(sb + 128 + 32 * h));
        ql = _mm256_and_si256(k >= 2 ? _mm256_srli_epi16(ql, 4) : ql, m0f);
        hb = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * k)), _mm256_set1_epi8(3));
        return _mm256_or_si256(ql, _mm256_slli_epi16(hb, 4));
    }
    int g = j / 2, hi = j & 1;
    __m256i x = _mm256_loadu_si256((const __m256i *)(sb + (kt == KT_Q4_K ? 16 : 48) + 32 * g));
    x = _mm256_and_si256(hi ? _mm256_srli_epi16(x, 4) : x, m0f);
    if (kt == KT_Q5_K)
        x = _mm256_or_si256(x, bits_k(sb + 16, 2 * g + hi));
    return x;
}

/* dw and mw of unit u. */
AI void
unit_scales(int kt, const uint8_t *row, int64_t u, float *dw, float *mw)
{
    const int bs = kt_bs(kt);
    if (kt <= KT_Q8_0) {
        const uint8_t *b = row + u * bs;
        *dw = h2f(b);
        *mw = kt_has_min(kt) ? h2f(b + 2) : 0.0f;
        return;
    }
    if (kt == KT_Q6_K) {
        const uint8_t *sb = row + (u / 16) * bs;
        *dw = h2f(sb + 208) * (float)(int8_t)sb[192 + u % 16];
        *mw = 0.0f;
        return;
    }
    const uint8_t *sb = row + (u / 8) * bs;
    int sc, mn;
    k_scale_min(sb + 4, (int)(u % 8), &sc, &mn);
    *dw = h2f(sb) * (float)sc;
    *mw = -(h2f(sb + 2) * (float)mn);
}

/* ---- Dequantization ---- */

AI void
dequant_generic(int kt, const void *src, float *dst, int64_t n)
{
    const uint8_t *row = src;
    const int unit = kt_unit(kt), off = kt_off(kt);
    for (int64_t e = 0; e < n; e += 32) {
        __m256i z = unpack32(kt, row, e);
        for (int i = 0; i < 4; i++) {
            __m128i h = i < 2 ? _mm256_castsi256_si128(z) : _mm256_extracti128_si256(z, 1);
            if (i & 1)
                h = _mm_srli_si128(h, 8);
            __m256i qi;
            if (kt == KT_Q8_0) {
                qi = _mm256_cvtepi8_epi32(h);
            } else {
                qi = _mm256_cvtepu8_epi32(h);
                if (off)
                    qi = _mm256_sub_epi32(qi, _mm256_set1_epi32(off));
            }
            float dw, mw;
            unit_scales(kt, row, (e + 8 * i) / unit, &dw, &mw);
            __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(qi), _mm256_set1_ps(dw));
            if (kt_has_min(kt))
                y = _mm256_add_ps(y, _mm256_set1_ps(mw));
            _mm256_storeu_ps(dst + e + 8 * i, y);
        }
    }
}

/* ---- Row kernel ---- */

AI __m256i
madd_u8s8(__m256i w, __m256i a)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1));
}

AI float
hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[t * n_out] for tokens t0 .. t0 + nt - 1 of one row. */
AI void
dot_tile(int kt, const uint8_t *row, const struct kern_cpu_act *a, int t0, int nt, float *y,
         int64_t n_out)
{
    const int unit = kt_unit(kt), has_min = kt_has_min(kt), has_off = kt_off(kt) != 0;
    const int q8 = kt == KT_Q8_0;
    const int64_t nu = a->n_units, n_in = a->n_in;
    __m256 acc[4];
    float accm[4];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) {
        acc[t] = _mm256_setzero_ps();
        accm[t] = 0.0f;
    }
    for (int64_t e = 0; e < n_in; e += 32) {
        __m256i w = unpack32(kt, row, e);
        __m256i wabs = q8 ? _mm256_sign_epi8(w, w) : w;
        int64_t u = e / unit;
        float dw0, mw0, dw1 = 0.0f, mw1 = 0.0f;
        unit_scales(kt, row, u, &dw0, &mw0);
        if (unit == 16)
            unit_scales(kt, row, u + 1, &dw1, &mw1);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            const int64_t tu = (int64_t)(t0 + t) * nu + u;
            __m256i av = _mm256_loadu_si256((const __m256i *)(a->q + (int64_t)(t0 + t) * n_in + e));
            __m256i is;
            if (q8) {
                is = madd_u8s8(wabs, _mm256_sign_epi8(av, w));
            } else {
                is = madd_u8s8(w, av);
                if (has_off)
                    is = _mm256_add_epi32(
                        is,
                        _mm256_loadu_si256(
                            (const __m256i *)(a->dcorr + (int64_t)(t0 + t) * (n_in / 4) + e / 4)));
            }
            __m256 sv;
            if (unit == 16)
                sv = _mm256_set_m128(_mm_set1_ps(dw1 * a->d[tu + 1]), _mm_set1_ps(dw0 * a->d[tu]));
            else
                sv = _mm256_set1_ps(dw0 * a->d[tu]);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), sv, acc[t]);
            if (has_min) {
                accm[t] += mw0 * a->s[tu];
                if (unit == 16)
                    accm[t] += mw1 * a->s[tu + 1];
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        y[(int64_t)t * n_out] = hsum8(acc[t]) + accm[t];
}

AI void
rows_generic(int kt, const struct kern_cpu_mm *mm, int64_t r0, int64_t r1)
{
    const struct kern_matrix *w = mm->w;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->data + r * (int64_t)w->row_bytes;
        for (int t0 = 0; t0 < mm->n_tok; t0 += 4) {
            float *y = mm->y + (int64_t)t0 * w->n_out + r;
            switch (mm->n_tok - t0) {
            case 1:
                dot_tile(kt, row, mm->act, t0, 1, y, w->n_out);
                break;
            case 2:
                dot_tile(kt, row, mm->act, t0, 2, y, w->n_out);
                break;
            case 3:
                dot_tile(kt, row, mm->act, t0, 3, y, w->n_out);
                break;
            default:
                dot_tile(kt, row, mm->act, t0, 4, y, w->n_out);
                break;
            }
        }
    }
}

/* ---- Float weights ---- */

static void
dequant_f16(const void *src, float *dst, int64_t n)
{
    const uint16_t *h = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++)
        dst[i] = _cvtsh_ss(h[i]);
}

static void
dequant_bf16(const void *src, float *dst, int64_t n)
{
    const uint16_t *h = src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; i < n; i++) {
        uint32_t b = (uint32_t)h[i] << 16;
        memcpy(dst + i, &b, 4);
    }
}

AI void
float_tile(const float *row, const float *x, int64_t n, int nt, float *y, int64_t n_out)
{
    __m256 acc[4];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        acc[t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 wv = _mm256_loadu_ps(row + k);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * n + k), acc[t]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) {
        float s = hsum8(acc[t]);
        for (int64_t i = k; i < n; i++)
            s += row[i] * x[t * n + i];
        y[(int64_t)t * n_out] = s;
    }
}

static void
rows_float(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1, void *scratch)
{
    const struct kern_matrix *w = mm->w;
    const int64_t n = w->n_in;
    float *buf = scratch;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *src = (const uint8_t *)w->data + r * (int64_t)w->row_bytes;
        const float *row = buf;
        if (w->type == KERN_DTYPE_F32)
            row = (const float *)src;
        else if (w->type == KERN_DTYPE_F16)
            dequant_f16(src, buf, n);
        else
            dequant_bf16(src, buf, n);
        for (int t0 = 0; t0 < mm->n_tok; t0 += 4) {
            const float *x = mm->act->x + (int64_t)t0 * n;
            float *y = mm->y + (int64_t)t0 * w->n_out + r;
            switch (mm->n_tok - t0) {
            case 1:
                float_tile(row, x, n, 1, y, w->n_out);
                break;
            case 2:
                float_tile(row, x, n, 2, y, w->n_out);
                break;
            case 3:
                float_tile(row, x, n, 3, y, w->n_out);
                break;
            default:
                float_tile(row, x, n, 4, y, w->n_out);
                break;
            }
        }
    }
}

/* ---- Activation quantizer (bit-identical to kern_cpu_act_quant_ref) ---- */

static void
act_quant(const float *x, struct kern_cpu_act *a, int blk, int t0, int t1)
{
    const int unit = a->unit, off = a->off;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int t = t0; t < t1; t++) {
        const float *xt = x + (int64_t)t * a->n_in;
        int8_t *q = a->q + (int64_t)t * a->n_in;
        float *d = a->d + (int64_t)t * a->n_units, *s = a->s + (int64_t)t * a->n_units;
        int32_t *corr = a->corr + (int64_t)t * a->n_units;
        int32_t *dcorr = a->dcorr ? a->dcorr + (int64_t)t * (a->n_in / 4) : NULL;
        for (int64_t b = 0; b < a->n_in / blk; b++) {
            const float *xb = xt + b * blk;
            __m256 mx = _mm256_setzero_ps();
            for (int i = 0; i < blk; i += 8)
                mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xb + i), absmask));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            float amax = _mm_cvtss_f32(m4);
            float db = amax / 127.0f;
            float id = db != 0.0f ? 127.0f / amax : 0.0f;
            __m256 vid = _mm256_set1_ps(id);
            for (int i = 0; i < blk; i += 32) {
                __m256i v[4];
                for (int k = 0; k < 4; k++) {
                    v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * k), vid));
                    v[k] = _mm256_min_epi32(_mm256_max_epi32(v[k], lo), hi);
                }
                __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                               _mm256_packs_epi32(v[2], v[3]));
                p = _mm256_permutevar8x32_epi32(p, perm);
                _mm256_storeu_si256((__m256i *)(q + b * blk + i), p);
            }
            for (int64_t e = b * blk; e < (b + 1) * blk; e += unit) {
                int32_t usum = 0;
                for (int g = 0; g < unit; g += 4) {
                    const int8_t *qq = q + e + g;
                    int32_t s4 = qq[0] + qq[1] + qq[2] + qq[3];
                    if (dcorr)
                        dcorr[(e + g) / 4] = -off * s4;
                    usum += s4;
                }
                int64_t iu = e / unit;
                d[iu] = db;
                s[iu] = db * (float)usum;
                corr[iu] = -off * usum;
            }
        }
    }
}

/* ---- Instantiations ---- */

#define DEFINE_TYPE(name, kt)                                                                      \
    static void dequant_##name(const void *src, float *dst, int64_t n)                             \
    {                                                                                              \
        dequant_generic(kt, src, dst, n);                                                          \
    }                                                                                              \
    static void rows_##name(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1, void *scratch)   \
    {                                                                                              \
        (void)scratch;                                                                             \
        rows_generic(kt, mm, r0, r1);                                                              \
    }

DEFINE_TYPE(q4_0, KT_Q4_0)
DEFINE_TYPE(q4_1, KT_Q4_1)
DEFINE_TYPE(q5_0, KT_Q5_0)
DEFINE_TYPE(q5_1, KT_Q5_1)
DEFINE_TYPE(q8_0, KT_Q8_0)
DEFINE_TYPE(q4_k, KT_Q4_K)
DEFINE_TYPE(q5_k, KT_Q5_K)
DEFINE_TYPE(q6_k, KT_Q6_K)

#define QUANT_ENTRY(name)                                                                          \
    {                                                                                              \
        .dequant = dequant_##name, .rows = rows_##name, .dcorr = true                              \
    }

static const struct kern_cpu_type_ops avx2_types[KERN_DTYPE_COUNT] = {
    [KERN_DTYPE_F32] = {.rows = rows_float},
    [KERN_DTYPE_F16] = {.dequant = dequant_f16, .rows = rows_float},
    [KERN_DTYPE_BF16] = {.dequant = dequant_bf16, .rows = rows_float},
    [KERN_DTYPE_Q4_0] = QUANT_ENTRY(q4_0),
    [KERN_DTYPE_Q4_1] = QUANT_ENTRY(q4_1),
    [KERN_DTYPE_Q5_0] = QUANT_ENTRY(q5_0),
    [KERN_DTYPE_Q5_1] = QUANT_ENTRY(q5_1),
    [KERN_DTYPE_Q8_0] = QUANT_ENTRY(q8_0),
    [KERN_DTYPE_Q4_K] = QUANT_ENTRY(q4_k),
    [KERN_DTYPE_Q5_K] = QUANT_ENTRY(q5_k),
    [KERN_DTYPE_Q6_K] = QUANT_ENTRY(q6_k),
};

const struct kern_cpu_isa_ops kern_cpu_isa_avx2 = {
    .isa = KERN_ISA_AVX2,
    .types = avx2_types,
    .act_quant = act_quant,
    .batch_min = 1 << 30,
    .row_align = 4,
};

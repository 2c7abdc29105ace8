/*
 * dot_avx512: the AVX-512 (F/BW/VL/DQ + VNNI) kernels of the CPU backend. Compiled with the
 * AVX-512 flags; only called after kern_cpu_best_isa() found the features.
 *
 * Every quantized type is handled by the same two kernel bodies, specialised at compile time
 * through always-inline helpers that know the block layout:
 *   unpack64(e0)  the 64 canonical bytes qc of elements [e0, e0 + 64) of a row, natural order
 *   scales16(c)   dw and mw of the 16 scale units of chunk c (16 * unit elements)
 *
 * Small batches (rows_*, n_tok < batch_min): a tile of up to four (row, token) pairs (4 rows x 1
 * token, 2 x 2, 1 x 3 or 1 x 4) is unpacked 64 elements at a time. vpdpbusd multiplies the
 * unsigned qc by the signed activations into per-step partials (units on consecutive lanes); per
 * chunk of 16 units exact integer lane merges (merge_push) give one unit per lane, the offset
 * types add the unit's correction corr, and the chunk is scaled once in the canonical order of
 * matmul.c (16 unit-class partials, tree16 at the end). Q4_0, Q4_1 and Q8_0, the common types,
 * have their own kernels that read whole block groups in place ("Small-batch kernels for Q4_0,
 * Q4_1 and Q8_0" below) and prefetch ahead of the hardware prefetchers.
 *
 * Large batches (rows_batch_*, from batch_min = 3 tokens, so batched decode too): 32 rows at a
 * time are converted to canonical form and interleaved so that a zmm holds the same 4 elements of
 * 16 rows; the activations' 4-byte groups are then broadcast, and one vpdpbusd does 16 rows x 4
 * elements. Per unit and token the integer sums start from the unit's correction corr, and are
 * scaled once: 8 (unit 32) vpdpbusd per cvt + mul + fma into the partial of the unit's class
 * (u mod 16, kept in L1), and the outputs of 16 rows come out of the tree in one vector. Weights
 * are read once per call and reused from L1/L2 for every token tile. Q4_0, Q4_1 and Q8_0 build the
 * tile straight from their blocks (4x4 dword transposes in registers, the next tile prefetched to
 * L2), cheap enough to pay off from 3 tokens.
 *
 * Float weights: tiles of 4 rows (converted to f32) x 4 tokens of f32 FMAs.
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

/* ---- Per-type facts (constant-folded) ---- */

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

AI int
kt_is_k(int kt)
{
    return kt >= KT_Q4_K;
}

AI float
h2f(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

AI uint32_t
ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The eight 6-bit scales and mins of a Q4_K/Q5_K super-block (layout in quant.h), four at a time
 * in 32-bit words: the high two bits of sub-blocks 4..7 sit in bits 6..7 of bytes 0..7. */
AI void
k_scales8(const uint8_t *q, uint8_t sc[8], uint8_t mn[8])
{
    uint32_t w0 = ld32(q), w1 = ld32(q + 4), w2 = ld32(q + 8);
    uint32_t s0 = w0 & 0x3F3F3F3Fu, m0 = w1 & 0x3F3F3F3Fu;
    uint32_t s1 = (w2 & 0x0F0F0F0Fu) | ((w0 >> 2) & 0x30303030u);
    uint32_t m1 = ((w2 >> 4) & 0x0F0F0F0Fu) | ((w1 >> 2) & 0x30303030u);
    memcpy(sc, &s0, 4);
    memcpy(sc + 4, &s1, 4);
    memcpy(mn, &m0, 4);
    memcpy(mn + 4, &m1, 4);
}

/* ---- Unpacking: 64 canonical bytes ---- */

/* Two 16-byte nibble arrays -> [lo(x0), hi(x0), lo(x1), hi(x1)]; half: x0 only, upper zero. */
AI __m512i
unpack_nibbles2(const uint8_t *p0, const uint8_t *p1, int half)
{
    __m512i z = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p0));
    if (!half)
        z = _mm512_mask_broadcast_i32x4(z, 0xFF00, _mm_loadu_si128((const __m128i *)p1));
    const __m512i cnt = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0, 0,
                                         0x0004000400040004, 0x0004000400040004, 0, 0);
    z = _mm512_and_si512(_mm512_srlv_epi16(z, cnt), _mm512_set1_epi8(0x0F));
    return half ? _mm512_maskz_mov_epi64(0x0F, z) : z;
}

AI __m512i
add_bit4(__m512i z, uint64_t bits)
{
    return _mm512_mask_add_epi8(z, _cvtu64_mask64(bits), z, _mm512_set1_epi8(16));
}

/* Canonical bytes of elements [e0, e0 + 64) (e0 a multiple of 64); half: only 32 exist. */
AI __m512i
unpack64(int kt, const uint8_t *row, int64_t e0, int half)
{
    const int bs = kt_bs(kt);
    if (!kt_is_k(kt)) {
        const uint8_t *b0 = row + (e0 / 32) * bs, *b1 = b0 + bs;
        switch (kt) {
        case KT_Q4_0:
            return unpack_nibbles2(b0 + 2, b1 + 2, half);
        case KT_Q4_1:
            return unpack_nibbles2(b0 + 4, b1 + 4, half);
        case KT_Q5_0: {
            __m512i z = unpack_nibbles2(b0 + 6, b1 + 6, half);
            return add_bit4(z, ld32(b0 + 2) | (half ? 0 : (uint64_t)ld32(b1 + 2) << 32));
        }
        case KT_Q5_1: {
            __m512i z = unpack_nibbles2(b0 + 8, b1 + 8, half);
            return add_bit4(z, ld32(b0 + 4) | (half ? 0 : (uint64_t)ld32(b1 + 4) << 32));
        }
        default: { /* Q8_0 */
            const __m256i x80 = _mm256_set1_epi8((char)0x80);
            __m256i y0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(b0 + 2)), x80);
            __m512i z = _mm512_zextsi256_si512(y0);
            if (!half)
                z = _mm512_inserti64x4(
                    z, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(b1 + 2)), x80), 1);
            return z;
        }
        }
    }
    const uint8_t *sb = row + (e0 / 256) * bs;
    int v = (int)((e0 % 256) / 64);
    if (kt == KT_Q6_K) {
        int h = v / 2, odd = v & 1;
        __m512i ql = _mm512_loadu_si512((const void *)(sb + 64 * h));
        __m512i qh =
            _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(sb + 128 + 32 * h)));
        __m512i lo = odd ? _mm512_srli_epi16(ql, 4) : ql;
        lo = _mm512_and_si512(lo, _mm512_set1_epi8(0x0F));
        __m512i cnt = odd ? _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4)
                          : _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
        cnt = _mm512_or_si512(cnt, _mm512_slli_epi64(cnt, 16));
        cnt = _mm512_or_si512(cnt, _mm512_slli_epi64(cnt, 32));
        __m512i hb = _mm512_and_si512(_mm512_srlv_epi16(qh, cnt), _mm512_set1_epi8(3));
        return _mm512_or_si512(lo, _mm512_slli_epi16(hb, 4));
    }
    const uint8_t *qs = sb + (kt == KT_Q4_K ? 16 : 48) + 32 * v;
    __m512i z = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qs));
    const __m512i cnt = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0x0004000400040004,
                                         0x0004000400040004, 0, 0, 0, 0);
    z = _mm512_and_si512(_mm512_srlv_epi16(z, cnt), _mm512_set1_epi8(0x0F));
    if (kt == KT_Q5_K) {
        __m256i qh = _mm256_loadu_si256((const __m256i *)(sb + 16));
        uint32_t lo = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << (2 * v))));
        uint32_t hi = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << (2 * v + 1))));
        z = add_bit4(z, lo | (uint64_t)hi << 32);
    }
    return z;
}

/* ---- Scales of 16 units ---- */

/* dw and mw of units [16c, 16c + nu_c) (the rest zero). */
AI void
scales16(int kt, const uint8_t *row, int64_t c, int nu_c, __m512 *dw, __m512 *mw)
{
    const int bs = kt_bs(kt);
    __mmask16 um = (__mmask16)((1u << nu_c) - 1);
    if (!kt_is_k(kt)) {
        const __m512i vidx = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(bs));
        __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), um, vidx,
                                                (const void *)(row + c * 16 * bs), 1);
        *dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
        *mw = kt_has_min(kt) ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)))
                             : _mm512_setzero_ps();
        return;
    }
    if (kt == KT_Q6_K) {
        const uint8_t *sb = row + c * bs;
        __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sb + 192)));
        *dw = _mm512_mul_ps(_mm512_set1_ps(h2f(sb + 208)), _mm512_cvtepi32_ps(sc));
        *mw = _mm512_setzero_ps();
        return;
    }
    uint8_t sc[16] = {0}, mn[16] = {0};
    float dd[2] = {0.0f, 0.0f}, dm[2] = {0.0f, 0.0f};
    for (int s = 0; s < nu_c / 8; s++) {
        const uint8_t *sb = row + (2 * c + s) * bs;
        k_scales8(sb + 4, sc + 8 * s, mn + 8 * s);
        dd[s] = h2f(sb);
        dm[s] = h2f(sb + 2);
    }
    __m512 vd = _mm512_insertf32x8(_mm512_set1_ps(dd[0]), _mm256_set1_ps(dd[1]), 1);
    __m512 vm = _mm512_insertf32x8(_mm512_set1_ps(dm[0]), _mm256_set1_ps(dm[1]), 1);
    __m512 fs = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sc)));
    __m512 fm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)mn)));
    *dw = _mm512_mul_ps(vd, fs);
    *mw = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mul_ps(vm, fm)),
                                               _mm512_set1_epi32((int)0x80000000)));
}

/* ---- Dequantization and canonical rows ---- */

AI void
dequant_generic(int kt, const void *src, float *dst, int64_t n)
{
    const uint8_t *row = src;
    const int unit = kt_unit(kt), off = kt_off(kt);
    int64_t nu = n / unit;
    for (int64_t c = 0; c * 16 < nu; c++) {
        int nu_c = (int)(nu - c * 16 < 16 ? nu - c * 16 : 16);
        __m512 dw, mw;
        scales16(kt, row, c, nu_c, &dw, &mw);
        int64_t ec = c * 16 * unit;
        for (int v = 0; v * 64 < nu_c * unit; v++) {
            int half = nu_c * unit - v * 64 < 64;
            __m512i z = unpack64(kt, row, ec + 64 * v, half);
            for (int i = 0; i < (half ? 2 : 4); i++) {
                __m512i qi = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(z, 0));
                switch (i) {
                case 1:
                    qi = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(z, 1));
                    break;
                case 2:
                    qi = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(z, 2));
                    break;
                case 3:
                    qi = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(z, 3));
                    break;
                }
                if (off)
                    qi = _mm512_sub_epi32(qi, _mm512_set1_epi32(off));
                int u = unit == 32 ? 2 * v + i / 2 : 4 * v + i;
                __m512i iu = _mm512_set1_epi32(u);
                __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(qi), _mm512_permutexvar_ps(iu, dw));
                if (kt_has_min(kt))
                    y = _mm512_add_ps(y, _mm512_permutexvar_ps(iu, mw));
                _mm512_storeu_ps(dst + ec + 64 * v + 16 * i, y);
            }
        }
    }
}

AI void
canon_generic(int kt, const void *src, int64_t n, uint8_t *qc, float *d, float *m)
{
    const uint8_t *row = src;
    const int unit = kt_unit(kt);
    int64_t nu = n / unit;
    for (int64_t c = 0; c * 16 < nu; c++) {
        int nu_c = (int)(nu - c * 16 < 16 ? nu - c * 16 : 16);
        __mmask16 um = (__mmask16)((1u << nu_c) - 1);
        __m512 dw, mw;
        scales16(kt, row, c, nu_c, &dw, &mw);
        _mm512_mask_storeu_ps(d + c * 16, um, dw);
        _mm512_mask_storeu_ps(m + c * 16, um, mw);
        int64_t ec = c * 16 * unit;
        for (int v = 0; v * 64 < nu_c * unit; v++) {
            int half = nu_c * unit - v * 64 < 64;
            __m512i z = unpack64(kt, row, ec + 64 * v, half);
            if (half)
                _mm256_storeu_si256((__m256i *)(qc + ec + 64 * v), _mm512_castsi512_si256(z));
            else
                _mm512_storeu_si512((void *)(qc + ec + 64 * v), z);
        }
    }
}

/* ---- The canonical order (the spec in matmul.c) ---- */

/* y = the fixed tree over the 16 unit-class partials P_j (lane j): P_j + P_{j+8}, then + 4, + 2,
 * + 1. */
AI float
tree16(__m512 p)
{
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(p), _mm512_extractf32x8_ps(p, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

/*
 * Exact integer lane merges. The step vectors of a chunk hold the partial sums of their units on L
 * consecutive lanes (L = 8: two units of 32 elements or two Q8_0 blocks per vector, 8 vectors per
 * chunk; L = 4: four units, 4 vectors). Merging two vectors adds the lanes of the same unit and
 * keeps both vectors' units: levels 0 and 1 add lanes i and i + 2 of each 128-bit lane (vpunpck,
 * no lane crossing), level 2 adds 128-bit lanes 2k and 2k + 1 (vshufi32x4). After the last level
 * each lane holds one unit, in a fixed order that unit_order puts back in place.
 */
AI __m512i
merge_level(__m512i a, __m512i b, int level)
{
    if (level < 2)
        return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD));
}

/* The merge stack of one (row, token): level b holds the merge of 2^b steps. */
struct mstack {
    __m512i l[4];
};

/* Adds step vector x (step k of a chunk, k a constant after unrolling) to the merge stack: after
 * the last of 2^n steps level n holds one unit per lane (unit_order). */
AI void
merge_push(struct mstack *st, int k, __m512i x)
{
    if (k & 1) {
        x = merge_level(st->l[0], x, 0);
        if (k & 2) {
            x = merge_level(st->l[1], x, 1);
            if (k & 4) {
                st->l[3] = merge_level(st->l[2], x, 2);
                return;
            }
            st->l[2] = x;
            return;
        }
        st->l[1] = x;
        return;
    }
    st->l[0] = x;
}

/* The merged vector of level lv (3: 8 steps, 2: 4 steps) with unit j on lane j. */
AI __m512i
unit_order(const struct mstack *st, int lv)
{
    if (lv == 3)
        return _mm512_permutexvar_epi32(
            _mm512_set_epi32(15, 11, 13, 9, 14, 10, 12, 8, 7, 3, 5, 1, 6, 2, 4, 0), st->l[3]);
    return _mm512_permutexvar_epi32(
        _mm512_set_epi32(15, 11, 7, 3, 13, 9, 5, 1, 14, 10, 6, 2, 12, 8, 4, 0), st->l[2]);
}

/* One chunk of 16 units of a (row, token): P = fma(isum, dw * da, P), then fma(mw, s, P) for the
 * types with a min, on the chunk's lanes only (um). */
AI __m512
chunk_update(__m512 p, __m512i isum, __m512 dw, __m512 da, __m512 mw, __m512 s, int has_min,
             __mmask16 um)
{
    p = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, da), p, um);
    if (has_min)
        p = _mm512_mask3_fmadd_ps(mw, s, p, um);
    return p;
}

/* ---- Small-batch kernel ---- */

/* R rows x T tokens (R * T <= 4); y points at y[t0 * n_out + r]. Per chunk of 16 units, the
 * vpdpbusd partials of its 64-element steps (8 steps for unit 32, 4 for unit 16, units on
 * consecutive lanes) are merged into one unit per lane, then scaled once. */
AI void
dot_tile(int kt, const struct kern_matrix *w, int64_t r, const struct kern_cpu_act *a, int t0,
         int R, int T, float *y)
{
    const int unit = kt_unit(kt), has_min = kt_has_min(kt), has_off = kt_off(kt) != 0;
    const int steps = unit / 4, lv = unit == 32 ? 3 : 2;
    const int64_t nu = a->n_units, n_in = a->n_in;
    const uint8_t *rows[4];
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < R; i++) {
        rows[i] = (const uint8_t *)w->data + (r + i) * (int64_t)w->row_bytes;
#pragma GCC unroll 4
        for (int t = 0; t < T; t++)
            acc[i][t] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c * 16 < nu; c++) {
        int nu_c = (int)(nu - c * 16 < 16 ? nu - c * 16 : 16);
        __mmask16 um = (__mmask16)((1u << nu_c) - 1);
        int64_t ec = c * 16 * unit;
        struct mstack stk[4][4];
#pragma GCC unroll 8
        for (int v = 0; v < steps; v++) {
            int live = v * 64 < nu_c * unit, half = nu_c * unit - v * 64 < 64;
            int64_t e = ec + 64 * v;
            __m512i av[4];
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                const int8_t *q = a->q + (int64_t)(t0 + t) * n_in + e;
                av[t] = !live  ? _mm512_setzero_si512()
                        : half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, q)
                               : _mm512_loadu_si512((const void *)q);
            }
#pragma GCC unroll 4
            for (int i = 0; i < R; i++) {
                __m512i wv = live ? unpack64(kt, rows[i], e, half) : _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int t = 0; t < T; t++)
                    merge_push(&stk[i][t], v,
                               _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, av[t]));
            }
        }
        __m512 da[4], sa[4];
        __m512i corr[4];
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            int64_t ut = (int64_t)(t0 + t) * nu + c * 16;
            da[t] = _mm512_maskz_loadu_ps(um, a->d + ut);
            sa[t] = has_min ? _mm512_maskz_loadu_ps(um, a->s + ut) : _mm512_setzero_ps();
            corr[t] = has_off ? _mm512_maskz_loadu_epi32(um, a->corr + ut) : _mm512_setzero_si512();
        }
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            __m512 dw, mw;
            scales16(kt, rows[i], c, nu_c, &dw, &mw);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                __m512i is = unit_order(&stk[i][t], lv);
                if (has_off)
                    is = _mm512_add_epi32(is, corr[t]);
                acc[i][t] = chunk_update(acc[i][t], is, dw, da[t], mw, sa[t], has_min, um);
            }
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
#pragma GCC unroll 4
        for (int i = 0; i < R; i++)
            y[(int64_t)t * w->n_out + i] = tree16(acc[i][t]);
}

/* ---- Large-batch kernel ---- */

#define BT_ROWS 32 /* rows per interleaved tile: two zmm of 16 rows */
#define BT_TOK 4   /* tokens per register tile */
#ifndef BATCH_MIN
#define BATCH_MIN 3 /* from here the batch kernel beats the small-batch tiles (bench/NOTES.md) */
#endif

/* An interleaved tile of 32 rows: q[g] holds, for dword k of the row, 16 rows x 4 bytes at
 * q[g] + 64 k; d[g] and m[g] hold 16 rows per unit. */
struct itile {
    uint8_t *q[2];
    float *d[2], *m[2];
};

/* 4-byte group k of token row q, broadcast. */
AI __m512i
bcast4(const int8_t *q, int64_t k)
{
    int32_t v;
    memcpy(&v, q + 4 * k, 4);
    return _mm512_set1_epi32(v);
}

/* The canonical order with rows on lanes: units in order, the partial P_j of unit class j = u % 16
 * of every (row group, token) kept in part (L1), then the tree of tree16 over the 16 partials. */
AI void
batch_tile(int unit, int has_min, int has_off, const struct itile *it, const struct kern_cpu_act *a,
           int t0, int nt, float *y, int64_t n_out, __mmask16 rm0, __mmask16 rm1)
{
    const int64_t nu = a->n_units, n_in = a->n_in;
    const int steps = unit / 4;
    __m512 part[16][2][BT_TOK];
    const int8_t *q[BT_TOK];
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++)
        q[t] = a->q + (int64_t)(t0 + t) * n_in;
    for (int64_t j = nu; j < 16; j++)
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            part[j][0][t] = _mm512_setzero_ps();
            part[j][1][t] = _mm512_setzero_ps();
        }
    for (int64_t u = 0; u < nu; u++) {
        const int j = (int)(u & 15);
        __m512i acc[2][BT_TOK];
        __m512 accf[2][BT_TOK];
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            __m512i c0 = has_off ? _mm512_set1_epi32(a->corr[(int64_t)(t0 + t) * nu + u])
                                 : _mm512_setzero_si512();
            acc[0][t] = c0;
            acc[1][t] = c0;
        }
        const uint8_t *w0 = it->q[0] + u * steps * 64, *w1 = it->q[1] + u * steps * 64;
#pragma GCC unroll 8
        for (int k = 0; k < steps; k++) {
            __m512i wv0 = _mm512_load_si512((const void *)(w0 + 64 * k));
            __m512i wv1 = _mm512_load_si512((const void *)(w1 + 64 * k));
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                __m512i av = bcast4(q[t], u * steps + k);
                acc[0][t] = _mm512_dpbusd_epi32(acc[0][t], wv0, av);
                acc[1][t] = _mm512_dpbusd_epi32(acc[1][t], wv1, av);
            }
        }
        if (u < 16) {
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                accf[0][t] = _mm512_setzero_ps();
                accf[1][t] = _mm512_setzero_ps();
            }
        } else {
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                accf[0][t] = part[j][0][t];
                accf[1][t] = part[j][1][t];
            }
        }
        __m512 dw0 = _mm512_load_ps(it->d[0] + u * 16), dw1 = _mm512_load_ps(it->d[1] + u * 16);
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            __m512 da = _mm512_set1_ps(a->d[(int64_t)(t0 + t) * nu + u]);
            accf[0][t] =
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[0][t]), _mm512_mul_ps(dw0, da), accf[0][t]);
            accf[1][t] =
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[1][t]), _mm512_mul_ps(dw1, da), accf[1][t]);
        }
        if (has_min) {
            __m512 mw0 = _mm512_load_ps(it->m[0] + u * 16), mw1 = _mm512_load_ps(it->m[1] + u * 16);
#pragma GCC unroll 8
            for (int t = 0; t < nt; t++) {
                __m512 sa = _mm512_set1_ps(a->s[(int64_t)(t0 + t) * nu + u]);
                accf[0][t] = _mm512_fmadd_ps(mw0, sa, accf[0][t]);
                accf[1][t] = _mm512_fmadd_ps(mw1, sa, accf[1][t]);
            }
        }
#pragma GCC unroll 8
        for (int t = 0; t < nt; t++) {
            part[j][0][t] = accf[0][t];
            part[j][1][t] = accf[1][t];
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < nt; t++) {
#pragma GCC unroll 2
        for (int g = 0; g < 2; g++) {
            __m512 h[8];
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++)
                h[j] = _mm512_add_ps(part[j][g][t], part[j + 8][g][t]);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++)
                h[j] = _mm512_add_ps(h[j], h[j + 4]);
            h[0] = _mm512_add_ps(h[0], h[2]);
            h[1] = _mm512_add_ps(h[1], h[3]);
            h[0] = _mm512_add_ps(h[0], h[1]);
            _mm512_mask_storeu_ps(y + (int64_t)t * n_out + 16 * g, g ? rm1 : rm0, h[0]);
        }
    }
}

AI void
batch_tiles(int unit, int has_min, int has_off, const struct itile *it,
            const struct kern_cpu_mm *mm, int64_t r, int nr)
{
    int64_t n_out = mm->w->n_out;
    __mmask16 rm0 = (__mmask16)(nr >= 16 ? 0xFFFF : (1u << nr) - 1);
    __mmask16 rm1 = (__mmask16)(nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : (1u << (nr - 16)) - 1);
    for (int t0 = 0; t0 < mm->n_tok; t0 += BT_TOK) {
        float *y = mm->y + (int64_t)t0 * n_out + r;
        switch (mm->n_tok - t0) {
        case 1:
            batch_tile(unit, has_min, has_off, it, mm->act, t0, 1, y, n_out, rm0, rm1);
            break;
        case 2:
            batch_tile(unit, has_min, has_off, it, mm->act, t0, 2, y, n_out, rm0, rm1);
            break;
        case 3:
            batch_tile(unit, has_min, has_off, it, mm->act, t0, 3, y, n_out, rm0, rm1);
            break;
        default:
            batch_tile(unit, has_min, has_off, it, mm->act, t0, BT_TOK, y, n_out, rm0, rm1);
            break;
        }
    }
}

static void
batch_tiles_u32_min(const struct itile *it, const struct kern_cpu_mm *mm, int64_t r, int nr)
{
    batch_tiles(32, 1, 0, it, mm, r, nr);
}

static void
batch_tiles_u32_off(const struct itile *it, const struct kern_cpu_mm *mm, int64_t r, int nr)
{
    batch_tiles(32, 0, 1, it, mm, r, nr);
}

static void
batch_tiles_u16_off(const struct itile *it, const struct kern_cpu_mm *mm, int64_t r, int nr)
{
    batch_tiles(16, 0, 1, it, mm, r, nr);
}

/* Transposes 16 rows of ncols (<= 16) dwords, ld bytes apart, into ncols vectors of 16 dwords
 * (one per column, 64 bytes apart at dst). */
AI void
transpose16(const uint8_t *src, int64_t ld, int ncols, uint8_t *dst)
{
    __mmask16 m = (__mmask16)(ncols >= 16 ? 0xFFFF : (1u << ncols) - 1);
    __m512i r[16], t[16], u[16];
#pragma GCC unroll 16
    for (int l = 0; l < 16; l++)
        r[l] = _mm512_maskz_loadu_epi32(m, src + l * ld);
#pragma GCC unroll 8
    for (int l = 0; l < 16; l += 2) {
        t[l] = _mm512_unpacklo_epi32(r[l], r[l + 1]);
        t[l + 1] = _mm512_unpackhi_epi32(r[l], r[l + 1]);
    }
    /* u[4a + j], 128-bit lane L: rows 4a..4a+3 of column 4L + j */
#pragma GCC unroll 4
    for (int a = 0; a < 16; a += 4) {
        u[a] = _mm512_unpacklo_epi64(t[a], t[a + 2]);
        u[a + 1] = _mm512_unpackhi_epi64(t[a], t[a + 2]);
        u[a + 2] = _mm512_unpacklo_epi64(t[a + 1], t[a + 3]);
        u[a + 3] = _mm512_unpackhi_epi64(t[a + 1], t[a + 3]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
        __m512i v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
        __m512i w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
        __m512i w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
        __m512i o[4] = {_mm512_shuffle_i32x4(v0, w0, 0x88), _mm512_shuffle_i32x4(v1, w1, 0x88),
                        _mm512_shuffle_i32x4(v0, w0, 0xDD), _mm512_shuffle_i32x4(v1, w1, 0xDD)};
#pragma GCC unroll 4
        for (int L = 0; L < 4; L++)
            if (4 * L + j < ncols)
                _mm512_store_si512((void *)(dst + 64 * (4 * L + j)), o[L]);
    }
}

/* Converts rows [r, r + nr) to an interleaved tile (rows past nr are zero): each group of 16 rows
 * goes to canonical form in tmp (16 rows of ldq bytes, then 16 rows of nu scales and of nu mins)
 * and is transposed by blocks of 16 dwords. */
AI void
build_tile(int kt, const struct kern_matrix *w, int64_t r, int nr, const struct itile *it,
           uint8_t *tmp)
{
    const int64_t n_in = w->n_in, nu = n_in / kt_unit(kt), n_dw = n_in / 4;
    const int64_t ldq = (n_in + 63) & ~(int64_t)63;
    float *td = (float *)(tmp + 16 * ldq), *tm = td + 16 * nu;
#pragma GCC unroll 1
    for (int g = 0; g < 2; g++) {
        for (int l = 0; l < 16; l++) {
            int i = 16 * g + l;
            if (i < nr) {
                canon_generic(kt, (const uint8_t *)w->data + (r + i) * (int64_t)w->row_bytes, n_in,
                              tmp + l * ldq, td + l * nu, tm + l * nu);
            } else {
                memset(tmp + l * ldq, 0, (size_t)n_in);
                memset(td + l * nu, 0, sizeof(float) * (size_t)nu);
                memset(tm + l * nu, 0, sizeof(float) * (size_t)nu);
            }
        }
        for (int64_t k = 0; k < n_dw; k += 16)
            transpose16(tmp + 4 * k, ldq, (int)(n_dw - k < 16 ? n_dw - k : 16), it->q[g] + 64 * k);
        for (int64_t u = 0; u < nu; u += 16) {
            int nc = (int)(nu - u < 16 ? nu - u : 16);
            transpose16((const uint8_t *)(td + u), 4 * nu, nc, (uint8_t *)(it->d[g] + 16 * u));
            transpose16((const uint8_t *)(tm + u), 4 * nu, nc, (uint8_t *)(it->m[g] + 16 * u));
        }
    }
}

#ifndef PF_HINT
/* To L2: a tile ahead does not fit in L1 beside the tile being built (T0 measured 1.5x slower). */
#define PF_HINT _MM_HINT_T1
#endif

/* Transposes 4 vectors of 4 rows x 4 dwords (z[a], 128-bit lane L: row a + 4L) into 4 vectors of
 * 16 rows (o[j], lane l: dword j of row l). */
AI void
transpose4x4x4(const __m512i z[4], __m512i o[4])
{
    __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    o[0] = _mm512_unpacklo_epi64(t0, t2);
    o[1] = _mm512_unpackhi_epi64(t0, t2);
    o[2] = _mm512_unpacklo_epi64(t1, t3);
    o[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* The 16 bytes at offset off of rows p, p + ld, p + 2 ld, p + 3 ld (in 128-bit lanes 0..3). */
AI __m512i
load_rows4(const uint8_t *p, int64_t ld, int64_t off)
{
    __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + off)));
    z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(p + ld + off)), 1);
    z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(p + 2 * ld + off)), 2);
    return _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(p + 3 * ld + off)), 3);
}

/*
 * One group of 16 rows (row l at p0 + l * rb) of Q4_0 / Q4_1 / Q8_0 blocks to interleaved form: the
 * quant bytes are transposed in registers by 4x4 dword blocks, the fp16 scale words first collected
 * with scalar loads into sdm (nb * 16 dwords; vpgatherdd is far slower on Zen 4). pf: the slice of
 * the next tile to prefetch per block, pf_step bytes, up to pf_end.
 */
AI void
build_group(int kt, const uint8_t *p0, int64_t rb, int64_t nb, uint8_t *q, float *d, float *m,
            uint32_t *sdm, const uint8_t *pf, int64_t pf_step, const uint8_t *pf_end)
{
    const int bs = kt_bs(kt), qoff = kt == KT_Q4_1 ? 4 : 2;
    const __m512i m0f = _mm512_set1_epi8(0x0F), x80 = _mm512_set1_epi8((char)0x80);
    for (int l = 0; l < 16; l++) {
        const uint8_t *pr = p0 + l * rb;
        for (int64_t b = 0; b < nb; b++)
            sdm[16 * b + l] = ld32(pr + b * bs);
    }
    const int64_t rb4 = 4 * rb;
    for (int64_t b = 0; b < nb; b++, pf += pf_step) {
        for (int64_t l = 0; l < pf_step; l += 64)
            if (pf + l < pf_end)
                _mm_prefetch((const char *)(pf + l), PF_HINT);
        __m512i sc = _mm512_load_si512((const void *)(sdm + 16 * b));
        _mm512_store_ps(d + 16 * b, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(sc)));
        if (kt == KT_Q4_1)
            _mm512_store_ps(m + 16 * b,
                            _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(sc, 16))));
        const uint8_t *pb = p0 + b * bs + qoff;
        __m512i z[4], o[4];
        if (kt == KT_Q8_0) {
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
#pragma GCC unroll 4
                for (int a = 0; a < 4; a++)
                    z[a] = load_rows4(pb + a * rb, rb4, 16 * h);
                transpose4x4x4(z, o);
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++)
                    _mm512_store_si512((void *)(q + 64 * (8 * b + 4 * h + j)),
                                       _mm512_xor_si512(o[j], x80));
            }
            continue;
        }
#pragma GCC unroll 4
        for (int a = 0; a < 4; a++)
            z[a] = load_rows4(pb + a * rb, rb4, 0);
        transpose4x4x4(z, o);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            _mm512_store_si512((void *)(q + 64 * (8 * b + j)), _mm512_and_si512(o[j], m0f));
            _mm512_store_si512((void *)(q + 64 * (8 * b + 4 + j)),
                               _mm512_and_si512(_mm512_srli_epi16(o[j], 4), m0f));
        }
    }
}

/* Builds an interleaved tile straight from Q4_0 / Q4_1 / Q8_0 blocks. A group with fewer than 16
 * rows is first copied to pad (16 rows, the missing ones zero: their lanes are never stored).
 * tmp: 64 * nb bytes. */
AI void
build_tile_blocks(int kt, const struct kern_matrix *w, int64_t r, int nr, const struct itile *it,
                  uint8_t *pad, uint32_t *tmp)
{
    const int64_t nb = w->n_in / 32, rb = (int64_t)w->row_bytes;
    /* The next tile of rows (contiguous after this one), a slice per block step: 16 rows
     * advancing together are more streams than the hardware prefetchers follow. */
    const uint8_t *pf = (const uint8_t *)w->data + (r + BT_ROWS) * rb;
    const int64_t pf_step = (BT_ROWS * rb / (2 * nb) + 63) & ~(int64_t)63;
    const uint8_t *pf_end = (const uint8_t *)w->data + w->n_out * rb;
#pragma GCC unroll 1
    for (int g = 0; g < 2; g++) {
        const uint8_t *p0 = (const uint8_t *)w->data + (r + 16 * g) * rb;
        int n = nr - 16 * g;
        if (n <= 0) {
            memset(it->d[g], 0, sizeof(float) * 16 * (size_t)nb);
            memset(it->m[g], 0, sizeof(float) * 16 * (size_t)nb);
            continue;
        }
        if (n < 16) {
            memcpy(pad, p0, (size_t)(n * rb));
            memset(pad + n * rb, 0, (size_t)((16 - n) * rb));
            p0 = pad;
        }
        build_group(kt, p0, rb, nb, it->q[g], it->d[g], it->m[g], tmp, pf + g * nb * pf_step,
                    pf_step, pf_end);
    }
}

AI void
rows_batch_generic(int kt, const struct kern_cpu_mm *mm, int64_t r0, int64_t r1, void *scratch)
{
    const int64_t n_in = mm->w->n_in, nu = n_in / kt_unit(kt);
    size_t qb = (size_t)n_in * 16, sb = sizeof(float) * 16 * (size_t)nu;
    uint8_t *p = scratch;
    struct itile it;
#pragma GCC unroll 8
    for (int g = 0; g < 2; g++) {
        it.q[g] = p;
        p += qb;
        it.d[g] = (float *)p;
        p += sb;
        it.m[g] = (float *)p;
        p += sb;
    }
    for (int64_t r = r0; r < r1; r += BT_ROWS) {
        int nr = (int)(r1 - r < BT_ROWS ? r1 - r : BT_ROWS);
        if (kt == KT_Q4_0 || kt == KT_Q4_1 || kt == KT_Q8_0)
            build_tile_blocks(kt, mm->w, r, nr, &it, p,
                              (uint32_t *)(p + ((16 * mm->w->row_bytes + 63) & ~(size_t)63)));
        else
            build_tile(kt, mm->w, r, nr, &it, p);
        if (kt_unit(kt) == 16)
            batch_tiles_u16_off(&it, mm, r, nr);
        else if (kt_has_min(kt))
            batch_tiles_u32_min(&it, mm, r, nr);
        else
            batch_tiles_u32_off(&it, mm, r, nr);
    }
}

/* ---- Small-batch kernels for Q4_0, Q4_1 and Q8_0: whole blocks per lane group ---- */

/*
 * These read blocks in place: a group of 4 (Q4) or 2 (Q8_0) consecutive blocks is loaded with two
 * (masked) loads and vpermt2w gathers the quant bytes, so lanes 4j..4j+3 (Q4) or 8j..8j+7 (Q8_0)
 * all belong to block j of the group. The groups of a chunk of 16 blocks are merged into one block
 * per lane (merge_push) and scaled once per chunk, in the canonical order; vpermw puts each
 * group's fp16 scales (and mins) on the chunk's lanes of those blocks.
 * Q4_0/Q4_1 activations are re-laid out per group of 4 blocks (act->prep, 128 bytes per group and
 * token): lo[64] = elements 0..15 of each block, hi[64] = elements 16..31. Q8_0 reads act->q as it
 * is. Blocks past the end of the row are zero in the layout and masked off on the weight side.
 */
#define G4_BYTES 128
#ifndef PF_BYTES
#define PF_BYTES 4096 /* prefetch distance (rounded to whole row tiles) */
#endif

static size_t
prep_bytes_q4(int64_t n_in)
{
    return (size_t)((n_in / 32 + 3) / 4) * G4_BYTES;
}

static void
prep_q4(struct kern_cpu_act *a, int t0, int t1)
{
    const int64_t nb = a->n_in / 32;
    for (int t = t0; t < t1; t++) {
        uint8_t *p = a->prep + (size_t)t * a->prep_stride;
        const int8_t *q = a->q + (int64_t)t * a->n_in;
        memset(p, 0, prep_bytes_q4(a->n_in));
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *g = p + (b / 4) * G4_BYTES;
            int j = (int)(b % 4);
            memcpy(g + 16 * j, q + 32 * b, 16);
            memcpy(g + 64 + 16 * j, q + 32 * b + 16, 16);
        }
    }
}

AI __mmask64
byte_mask(int n)
{
    return n >= 64 ? ~(__mmask64)0 : n <= 0 ? 0 : (((__mmask64)1 << n) - 1);
}

/* Word indices into a group's first 64 bytes: which = 0, the quant bytes of 4 Q4 blocks (16 bytes
 * each) or 2 Q8_0 blocks (32 bytes each); which = 1, the scales for the chunk's lanes (word l, l <
 * 16: d of block l % blocks-per-group; word 16 + l: its m, Q4_1). */
AI __m512i
idx_words(int kt, int which)
{
    const int bs = kt_bs(kt), qoff = kt == KT_Q4_1 ? 4 : 2, gb = kt == KT_Q8_0 ? 2 : 4;
    uint16_t idx[32];
    for (int i = 0; i < 32; i++) {
        if (which == 0) /* quant bytes */
            idx[i] = (uint16_t)(kt == KT_Q8_0 ? (i / 16) * (bs / 2) + 1 + i % 16
                                              : (i / 8) * (bs / 2) + qoff / 2 + i % 8);
        else
            idx[i] = (uint16_t)((i % 16) % gb * (bs / 2) + i / 16);
    }
    return _mm512_loadu_si512((const void *)idx);
}

/* R rows x T tokens (R * T <= 4) of a Q4_0/Q4_1/Q8_0 matrix; y points at y[t0 * n_out + r]. */
AI void
fast_tile(int kt, const struct kern_matrix *w, int64_t r, const struct kern_cpu_act *a, int t0,
          int R, int T, float *y)
{
    const int bs = kt_bs(kt), q8 = kt == KT_Q8_0, gb = q8 ? 2 : 4, gpc = 16 / gb;
    const int lv = q8 ? 3 : 2, has_min = kt == KT_Q4_1;
    const int64_t nb = w->n_in / 32, n_in = w->n_in;
    const __m512i iq = idx_words(kt, 0), is = idx_words(kt, 1);
    const __m512i m0f = _mm512_set1_epi8(0x0F), x80 = _mm512_set1_epi8((char)0x80);
    const uint8_t *rows[4];
    const int64_t pf_rows = (PF_BYTES / (R * (int64_t)w->row_bytes) + 1) * R;
    __m512 acc[4][4];
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) {
        rows[i] = (const uint8_t *)w->data + (r + i) * (int64_t)w->row_bytes;
#pragma GCC unroll 8
        for (int t = 0; t < T; t++)
            acc[i][t] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c * 16 < nb; c++) {
        int nb_c = (int)(nb - c * 16 < 16 ? nb - c * 16 : 16);
        __mmask16 um = (__mmask16)((1u << nb_c) - 1);
        struct mstack stk[4][4];
        __m512i sc[4];
#pragma GCC unroll 8
        for (int i = 0; i < R; i++)
            sc[i] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int k = 0; k < gpc; k++) {
            int nbg = nb_c - k * gb < gb ? nb_c - k * gb : gb;
            int64_t g = c * gpc + k;
            if (nbg <= 0) {
#pragma GCC unroll 8
                for (int i = 0; i < R; i++)
#pragma GCC unroll 8
                    for (int t = 0; t < T; t++)
                        merge_push(&stk[i][t], k, _mm512_setzero_si512());
                continue;
            }
            __mmask64 m0 = byte_mask(nbg * bs), m1 = byte_mask(nbg * bs - 64);
            __mmask32 smask = (__mmask32)(((1u << gb) - 1) << (k * gb));
            if (has_min)
                smask |= smask << 16;
            __m512i al[4], ah[4];
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                if (q8) {
                    al[t] = _mm512_maskz_loadu_epi8(byte_mask(nbg * 32),
                                                    a->q + (int64_t)(t0 + t) * n_in + g * 64);
                } else {
                    const uint8_t *p =
                        a->prep + (size_t)(t0 + t) * a->prep_stride + (size_t)g * G4_BYTES;
                    al[t] = _mm512_load_si512((const void *)p);
                    ah[t] = _mm512_load_si512((const void *)(p + 64));
                }
            }
            /* Rows are contiguous: fetch the tile about PF_BYTES ahead at the pace this one is
             * read, as the hardware prefetchers stop at page boundaries. */
            const uint8_t *pf = rows[0] + pf_rows * (int64_t)w->row_bytes + g * gb * bs * R;
            for (int l = 0; l < gb * bs * R; l += 64)
                _mm_prefetch((const char *)(pf + l), _MM_HINT_T0);
#pragma GCC unroll 8
            for (int i = 0; i < R; i++) {
                const uint8_t *base = rows[i] + g * gb * bs;
                __m512i z0 = _mm512_maskz_loadu_epi8(m0, base);
                __m512i z1 = _mm512_maskz_loadu_epi8(m1, base + 64);
                __m512i qs = _mm512_permutex2var_epi16(z0, iq, z1);
                sc[i] = _mm512_mask_permutexvar_epi16(sc[i], smask, is, z0);
                if (q8) {
                    __m512i wq = _mm512_xor_si512(qs, x80);
#pragma GCC unroll 8
                    for (int t = 0; t < T; t++)
                        merge_push(&stk[i][t], k,
                                   _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, al[t]));
                    continue;
                }
                __m512i lo = _mm512_and_si512(qs, m0f);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(qs, 4), m0f);
#pragma GCC unroll 8
                for (int t = 0; t < T; t++) {
                    __m512i ai = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, al[t]);
                    merge_push(&stk[i][t], k, _mm512_dpbusd_epi32(ai, hi, ah[t]));
                }
            }
        }
        __m512 da[4], sa[4];
        __m512i corr[4];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            int64_t ut = (int64_t)(t0 + t) * nb + c * 16;
            da[t] = _mm512_maskz_loadu_ps(um, a->d + ut);
            sa[t] = has_min ? _mm512_maskz_loadu_ps(um, a->s + ut) : _mm512_setzero_ps();
            corr[t] = has_min ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi32(um, a->corr + ut);
        }
#pragma GCC unroll 8
        for (int i = 0; i < R; i++) {
            __m512 dw = _mm512_cvtph_ps(_mm512_castsi512_si256(sc[i]));
            __m512 mw = has_min ? _mm512_cvtph_ps(_mm512_extracti64x4_epi64(sc[i], 1))
                                : _mm512_setzero_ps();
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                __m512i isum = unit_order(&stk[i][t], lv);
                if (!has_min)
                    isum = _mm512_add_epi32(isum, corr[t]);
                acc[i][t] = chunk_update(acc[i][t], isum, dw, da[t], mw, sa[t], has_min, um);
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; t++)
#pragma GCC unroll 8
        for (int i = 0; i < R; i++)
            y[(int64_t)t * w->n_out + i] = tree16(acc[i][t]);
}

/* Q4_0, Q4_1 and Q8_0 have their block-group kernel, the other types the generic one. */
AI void
tile_any(int kt, const struct kern_matrix *w, int64_t r, const struct kern_cpu_act *a, int t0,
         int R, int T, float *y)
{
    if (kt == KT_Q4_0 || kt == KT_Q4_1 || kt == KT_Q8_0)
        fast_tile(kt, w, r, a, t0, R, T, y);
    else
        dot_tile(kt, w, r, a, t0, R, T, y);
}

/* Tiles of 4 rows x 1 token, 2 x 2, or 1 row x 3 or 4 tokens (the accumulators and merge stacks of
 * larger tiles would not fit in the registers). */
AI void
rows_tiled(int kt, const struct kern_cpu_mm *mm, int64_t r0, int64_t r1)
{
    const struct kern_matrix *w = mm->w;
    for (int t0 = 0; t0 < mm->n_tok; t0 += 4) {
        int nt = mm->n_tok - t0 < 4 ? mm->n_tok - t0 : 4;
        float *y = mm->y + (int64_t)t0 * w->n_out;
        int64_t r = r0;
        switch (nt) {
        case 1:
            for (; r + 4 <= r1; r += 4)
                tile_any(kt, w, r, mm->act, t0, 4, 1, y + r);
            for (; r < r1; r++)
                tile_any(kt, w, r, mm->act, t0, 1, 1, y + r);
            break;
        case 2:
            for (; r + 2 <= r1; r += 2)
                tile_any(kt, w, r, mm->act, t0, 2, 2, y + r);
            for (; r < r1; r++)
                tile_any(kt, w, r, mm->act, t0, 1, 2, y + r);
            break;
        case 3:
            for (; r < r1; r++)
                tile_any(kt, w, r, mm->act, t0, 1, 3, y + r);
            break;
        default:
            for (; r < r1; r++)
                tile_any(kt, w, r, mm->act, t0, 1, 4, y + r);
            break;
        }
    }
}

/* ---- Decode kernels on packed rows (kern_matrix_repack; layout in cpu_int.h) ---- */

#ifndef PF_PACKED
#define PF_PACKED 4096 /* software prefetch distance in the packed stream, bytes */
#endif

/*
 * One group of 16 packed rows x T tokens (T <= 2), rows on lanes: per unit (block) u the integer
 * sums of 16 rows come from 8 vpdpbusd on the packed vectors with the token's 4-byte activation
 * groups broadcast (two chains, added exactly), then P_{u mod 16} = fma(isum, dw * da, P), and
 * fma(mw, s, P) for Q4_1: the batch kernel's order, so the results are the same bits. The tree of
 * the 16 unit-class partials gives the 16 outputs in one vector (rm: rows that exist).
 */
AI void
packed_group(int kt, const uint8_t *g, int64_t nb, const struct kern_cpu_act *a, int t0, int T,
             float *y, int64_t n_out, __mmask16 rm)
{
    const int q8 = kt == KT_Q8_0, has_min = kt == KT_Q4_1, has_off = !has_min;
    const int64_t qb = q8 ? 512 : 256, bstride = qb + (has_min ? 64 : 32);
    const __m512i m0f = _mm512_set1_epi8(0x0F);
    const int8_t *q[2];
    const float *da[2], *sa[2];
    const int32_t *corr[2];
    __m512 P[2][16];
#pragma GCC unroll 2
    for (int t = 0; t < T; t++) {
        q[t] = a->q + (int64_t)(t0 + t) * a->n_in;
        da[t] = a->d + (int64_t)(t0 + t) * nb;
        sa[t] = a->s + (int64_t)(t0 + t) * nb;
        corr[t] = a->corr + (int64_t)(t0 + t) * nb;
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++)
            P[t][j] = _mm512_setzero_ps();
    }
    for (int64_t u0 = 0; u0 < nb; u0 += 16) {
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) {
            const int64_t u = u0 + j;
            if (u >= nb)
                break;
            const uint8_t *wq = g + u * bstride;
#pragma GCC unroll 8
            for (int64_t l = 0; l < bstride; l += 64)
                _mm_prefetch((const char *)(wq + PF_PACKED + l), _MM_HINT_T0);
            __m512i acc0[2], acc1[2];
#pragma GCC unroll 2
            for (int t = 0; t < T; t++) {
                acc0[t] = has_off ? _mm512_set1_epi32(corr[t][u]) : _mm512_setzero_si512();
                acc1[t] = _mm512_setzero_si512();
            }
            if (q8) {
#pragma GCC unroll 8
                for (int k = 0; k < 8; k += 2) {
                    __m512i w0 = _mm512_loadu_si512((const void *)(wq + 64 * k));
                    __m512i w1 = _mm512_loadu_si512((const void *)(wq + 64 * k + 64));
#pragma GCC unroll 2
                    for (int t = 0; t < T; t++) {
                        acc0[t] = _mm512_dpbusd_epi32(acc0[t], w0, bcast4(q[t] + 32 * u, k));
                        acc1[t] = _mm512_dpbusd_epi32(acc1[t], w1, bcast4(q[t] + 32 * u, k + 1));
                    }
                }
            } else {
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    __m512i z = _mm512_loadu_si512((const void *)(wq + 64 * i));
                    __m512i lo = _mm512_and_si512(z, m0f);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), m0f);
#pragma GCC unroll 2
                    for (int t = 0; t < T; t++) {
                        acc0[t] = _mm512_dpbusd_epi32(acc0[t], lo, bcast4(q[t] + 32 * u, i));
                        acc1[t] = _mm512_dpbusd_epi32(acc1[t], hi, bcast4(q[t] + 32 * u, 4 + i));
                    }
                }
            }
            __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wq + qb)));
            __m512 mw = has_min
                            ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wq + qb + 32)))
                            : _mm512_setzero_ps();
#pragma GCC unroll 2
            for (int t = 0; t < T; t++) {
                __m512 is = _mm512_cvtepi32_ps(_mm512_add_epi32(acc0[t], acc1[t]));
                P[t][j] = _mm512_fmadd_ps(is, _mm512_mul_ps(dw, _mm512_set1_ps(da[t][u])), P[t][j]);
                if (has_min)
                    P[t][j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sa[t][u]), P[t][j]);
            }
        }
    }
#pragma GCC unroll 2
    for (int t = 0; t < T; t++) {
        __m512 h[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++)
            h[j] = _mm512_add_ps(P[t][j], P[t][j + 8]);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++)
            h[j] = _mm512_add_ps(h[j], h[j + 4]);
        h[0] = _mm512_add_ps(h[0], h[2]);
        h[1] = _mm512_add_ps(h[1], h[3]);
        h[0] = _mm512_add_ps(h[0], h[1]);
        _mm512_mask_storeu_ps(y + (int64_t)t * n_out, rm, h[0]);
    }
}

/* Rows [r0, r1) (r0 a multiple of 16) from w->packed, tokens by two. */
AI void
rows_packed_generic(int kt, const struct kern_cpu_mm *mm, int64_t r0, int64_t r1)
{
    const struct kern_matrix *w = mm->w;
    const int64_t nb = w->n_in / 32;
    const size_t gbytes = kern_cpu_pack_group_bytes(w->type, w->n_in);
    for (int64_t r = r0; r < r1; r += KERN_PACK_ROWS) {
        const uint8_t *g = (const uint8_t *)w->packed + (size_t)(r / KERN_PACK_ROWS) * gbytes;
        int nr = (int)(r1 - r < KERN_PACK_ROWS ? r1 - r : KERN_PACK_ROWS);
        __mmask16 rm = (__mmask16)((1u << nr) - 1);
        int t0 = 0;
        for (; t0 + 2 <= mm->n_tok; t0 += 2)
            packed_group(kt, g, nb, mm->act, t0, 2, mm->y + (int64_t)t0 * w->n_out + r, w->n_out,
                         rm);
        if (t0 < mm->n_tok)
            packed_group(kt, g, nb, mm->act, t0, 1, mm->y + (int64_t)t0 * w->n_out + r, w->n_out,
                         rm);
    }
}

#define DEFINE_PACKED(name, kt)                                                                    \
    static void rows_packed_##name(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1,           \
                                   void *scratch)                                                  \
    {                                                                                              \
        (void)scratch;                                                                             \
        rows_packed_generic(kt, mm, r0, r1);                                                       \
    }

DEFINE_PACKED(q4_0, KT_Q4_0)
DEFINE_PACKED(q4_1, KT_Q4_1)
DEFINE_PACKED(q8_0, KT_Q8_0)

/* ---- Float weights ---- */

static void
dequant_f16(const void *src, float *dst, int64_t n)
{
    const uint16_t *h = src;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
    for (; i < n; i++)
        dst[i] = _cvtsh_ss(h[i]);
}

static void
dequant_bf16(const void *src, float *dst, int64_t n)
{
    const uint16_t *h = src;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(h + i)));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
    for (; i < n; i++) {
        uint32_t b = (uint32_t)h[i] << 16;
        memcpy(dst + i, &b, 4);
    }
}

/* R rows (converted to f32, ld floats apart) x T tokens; y points at y[t0 * n_out + r]. */
AI void
float_tile(const float *rows, int64_t ld, const float *x, int64_t n, int R, int T, float *y,
           int64_t n_out)
{
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++)
            acc[i][t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16) {
        __mmask16 m = (__mmask16)(n - k >= 16 ? 0xFFFF : (1u << (n - k)) - 1);
        __m512 xv[4];
#pragma GCC unroll 4
        for (int t = 0; t < T; t++)
            xv[t] = _mm512_maskz_loadu_ps(m, x + t * n + k);
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            __m512 wv = _mm512_maskz_loadu_ps(m, rows + i * ld + k);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++)
                acc[i][t] = _mm512_fmadd_ps(wv, xv[t], acc[i][t]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
#pragma GCC unroll 4
        for (int i = 0; i < R; i++)
            y[(int64_t)t * n_out + i] = tree16(acc[i][t]);
}

/* Float weights: R rows at a time as f32 (converted into scratch unless F32), tokens by 4. */
static void
rows_float(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1, void *scratch)
{
    const struct kern_matrix *w = mm->w;
    const int64_t n = w->n_in, ld = (n + 15) & ~(int64_t)15;
    for (int64_t r = r0; r < r1; r += 4) {
        int R = r1 - r < 4 ? (int)(r1 - r) : 4;
        const float *rows = scratch;
        int64_t rld = ld;
        if (w->type == KERN_DTYPE_F32) {
            rows = (const float *)((const uint8_t *)w->data + r * (int64_t)w->row_bytes);
            rld = n;
        } else {
            for (int i = 0; i < R; i++) {
                const uint8_t *src = (const uint8_t *)w->data + (r + i) * (int64_t)w->row_bytes;
                if (w->type == KERN_DTYPE_F16)
                    dequant_f16(src, (float *)scratch + i * ld, n);
                else
                    dequant_bf16(src, (float *)scratch + i * ld, n);
            }
        }
        for (int t0 = 0; t0 < mm->n_tok; t0 += 4) {
            int T = mm->n_tok - t0 < 4 ? mm->n_tok - t0 : 4;
            const float *x = mm->act->x + (int64_t)t0 * n;
            float *y = mm->y + (int64_t)t0 * w->n_out + r;
            if (R == 4 && T == 4)
                float_tile(rows, rld, x, n, 4, 4, y, w->n_out);
            else if (R == 4)
                for (int t = 0; t < T; t++)
                    float_tile(rows, rld, x + t * n, n, 4, 1, y + (int64_t)t * w->n_out, w->n_out);
            else if (T == 4)
                for (int i = 0; i < R; i++)
                    float_tile(rows + i * rld, rld, x, n, 1, 4, y + i, w->n_out);
            else
                for (int i = 0; i < R; i++)
                    for (int t = 0; t < T; t++)
                        float_tile(rows + i * rld, rld, x + t * n, n, 1, 1,
                                   y + (int64_t)t * w->n_out + i, w->n_out);
        }
    }
}

/* ---- Activation quantizer (bit-identical to kern_cpu_act_quant_ref) ---- */

/* Quantizes 16 values: rint(x * id) (|x * id| <= 127 up to rounding, so saturation is the clamp).
 */
AI __m128i
quant16(const float *x, __m512 vid)
{
    return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), vid)));
}

/* Sums of the signed bytes of 32-byte halves (unit 32) or 16-byte quarters (unit 16) of z. */
AI void
unit_sums64(__m512i z, int unit, int32_t *sums)
{
    /* vpsadbw sums 8 bytes at a time; the bias of 128 per byte comes off afterwards */
    __m512i sad =
        _mm512_sad_epu8(_mm512_xor_si512(z, _mm512_set1_epi8((char)0x80)), _mm512_setzero_si512());
    int64_t q[8];
    _mm512_storeu_si512((void *)q, sad);
    if (unit == 32) {
        sums[0] = (int32_t)(q[0] + q[1] + q[2] + q[3]) - 32 * 128;
        sums[1] = (int32_t)(q[4] + q[5] + q[6] + q[7]) - 32 * 128;
    } else {
        for (int i = 0; i < 4; i++)
            sums[i] = (int32_t)(q[2 * i] + q[2 * i + 1]) - 16 * 128;
    }
}

static void
act_quant(const float *x, struct kern_cpu_act *a, int blk, int t0, int t1)
{
    const int unit = a->unit, off = a->off;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    const __m512i ones = _mm512_set1_epi8(1);
    for (int t = t0; t < t1; t++) {
        const float *xt = x + (int64_t)t * a->n_in;
        int8_t *q = a->q + (int64_t)t * a->n_in;
        float *d = a->d + (int64_t)t * a->n_units, *s = a->s + (int64_t)t * a->n_units;
        int32_t *corr = a->corr + (int64_t)t * a->n_units;
        int32_t *dcorr = a->dcorr ? a->dcorr + (int64_t)t * (a->n_in / 4) : NULL;
        for (int64_t b = 0; b < a->n_in / blk; b++) {
            const float *xb = xt + b * blk;
            __m512 mx = _mm512_and_ps(_mm512_loadu_ps(xb), absmask);
            for (int i = 16; i < blk; i += 16)
                mx = _mm512_max_ps(mx, _mm512_and_ps(_mm512_loadu_ps(xb + i), absmask));
            float amax = _mm512_reduce_max_ps(mx);
            float db = amax / 127.0f;
            float id = db != 0.0f ? 127.0f / amax : 0.0f;
            __m512 vid = _mm512_set1_ps(id);
            for (int i = 0; i < blk; i += 64) {
                int64_t e = b * blk + i;
                __m512i z;
                if (blk - i >= 64) {
                    z = _mm512_castsi128_si512(quant16(xb + i, vid));
                    z = _mm512_inserti32x4(z, quant16(xb + i + 16, vid), 1);
                    z = _mm512_inserti32x4(z, quant16(xb + i + 32, vid), 2);
                    z = _mm512_inserti32x4(z, quant16(xb + i + 48, vid), 3);
                    _mm512_storeu_si512((void *)(q + e), z);
                } else { /* a block of 32 */
                    z = _mm512_castsi128_si512(quant16(xb + i, vid));
                    z = _mm512_inserti32x4(z, quant16(xb + i + 16, vid), 1);
                    z = _mm512_maskz_mov_epi64(0x0F, z);
                    _mm256_storeu_si256((__m256i *)(q + e), _mm512_castsi512_si256(z));
                }
                int32_t sums[4];
                int n_units = (blk - i >= 64 ? 64 : 32) / unit;
                unit_sums64(z, unit, sums);
                for (int k = 0; k < n_units; k++) {
                    int64_t iu = e / unit + k;
                    d[iu] = db;
                    s[iu] = db * (float)sums[k];
                    corr[iu] = -off * sums[k];
                }
                if (dcorr) {
                    __m512i ds = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, z);
                    ds = _mm512_mullo_epi32(ds, _mm512_set1_epi32(-off));
                    if (blk - i >= 64)
                        _mm512_storeu_si512((void *)(dcorr + e / 4), ds);
                    else
                        _mm256_storeu_si256((__m256i *)(dcorr + e / 4), _mm512_castsi512_si256(ds));
                }
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
    static void canon_##name(const void *src, int64_t n, uint8_t *qc, float *d, float *m)          \
    {                                                                                              \
        canon_generic(kt, src, n, qc, d, m);                                                       \
    }                                                                                              \
    static void rows_batch_##name(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1,            \
                                  void *scratch)                                                   \
    {                                                                                              \
        rows_batch_generic(kt, mm, r0, r1, scratch);                                               \
    }

/* The small-batch kernels (rows_tiled picks the block-group kernel or the generic one). */
#define DEFINE_ROWS(name, kt)                                                                      \
    static void rows_##name(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1, void *scratch)   \
    {                                                                                              \
        (void)scratch;                                                                             \
        rows_tiled(kt, mm, r0, r1);                                                                \
    }

DEFINE_TYPE(q4_0, KT_Q4_0)
DEFINE_TYPE(q4_1, KT_Q4_1)
DEFINE_TYPE(q5_0, KT_Q5_0)
DEFINE_TYPE(q5_1, KT_Q5_1)
DEFINE_TYPE(q8_0, KT_Q8_0)
DEFINE_TYPE(q4_k, KT_Q4_K)
DEFINE_TYPE(q5_k, KT_Q5_K)
DEFINE_TYPE(q6_k, KT_Q6_K)
DEFINE_ROWS(q4_0, KT_Q4_0)
DEFINE_ROWS(q4_1, KT_Q4_1)
DEFINE_ROWS(q5_0, KT_Q5_0)
DEFINE_ROWS(q5_1, KT_Q5_1)
DEFINE_ROWS(q8_0, KT_Q8_0)
DEFINE_ROWS(q4_k, KT_Q4_K)
DEFINE_ROWS(q5_k, KT_Q5_K)
DEFINE_ROWS(q6_k, KT_Q6_K)

#define QUANT_ENTRY(name)                                                                          \
    {                                                                                              \
        .dequant = dequant_##name, .canon = canon_##name, .rows = rows_##name,                     \
        .rows_batch = rows_batch_##name                                                            \
    }

#define FAST_ENTRY(name, grp)                                                                      \
    {                                                                                              \
        .dequant = dequant_##name, .canon = canon_##name, .rows = rows_##name,                     \
        .rows_batch = rows_batch_##name, .prep_bytes = prep_bytes_##grp, .prep = prep_##grp,       \
        .rows_packed = rows_packed_##name                                                          \
    }

static const struct kern_cpu_type_ops avx512_types[KERN_DTYPE_COUNT] = {
    [KERN_DTYPE_F32] = {.rows = rows_float},
    [KERN_DTYPE_F16] = {.dequant = dequant_f16, .rows = rows_float},
    [KERN_DTYPE_BF16] = {.dequant = dequant_bf16, .rows = rows_float},
    [KERN_DTYPE_Q4_0] = FAST_ENTRY(q4_0, q4),
    [KERN_DTYPE_Q4_1] = FAST_ENTRY(q4_1, q4),
    [KERN_DTYPE_Q5_0] = QUANT_ENTRY(q5_0),
    [KERN_DTYPE_Q5_1] = QUANT_ENTRY(q5_1),
    [KERN_DTYPE_Q8_0] = {.dequant = dequant_q8_0,
                         .canon = canon_q8_0,
                         .rows = rows_q8_0,
                         .rows_batch = rows_batch_q8_0,
                         .rows_packed = rows_packed_q8_0},
    [KERN_DTYPE_Q4_K] = QUANT_ENTRY(q4_k),
    [KERN_DTYPE_Q5_K] = QUANT_ENTRY(q5_k),
    [KERN_DTYPE_Q6_K] = QUANT_ENTRY(q6_k),
};

const struct kern_cpu_isa_ops kern_cpu_isa_avx512 = {
    .isa = KERN_ISA_AVX512,
    .types = avx512_types,
    .act_quant = act_quant,
    .batch_min = BATCH_MIN,
    .row_align = BT_ROWS,
};

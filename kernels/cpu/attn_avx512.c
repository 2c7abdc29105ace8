/* AVX-512 attention (see kern_attn_f32) and SwiGLU (kern_swiglu). exp is a degree-6 polynomial
 * after range reduction, within a few ulp of expf for the arguments softmax uses (x <= 0) and for
 * silu's exp(-g) (overflow past 88 gives inf, so silu goes to -0 as it should). */
#include <immintrin.h>
#include <math.h>

#include "kernels/cpu/attn_int.h"

static inline __m512
exp512(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/*
 * Scores of 16 positions at once: the per-position partial vectors (lane l: the FMA chain over
 * elements l, l + 16, ...) are summed by a merge tree over 16 vectors whose per-position order is
 * that of _mm512_reduce_add_ps (lanes j + 8, then + 4, then + 2, then + 1), so the scores are the
 * bits the one-position-at-a-time kernel computed, at a fraction of the shuffles.
 */
struct hstack {
    __m512 l[4];
};

static inline __attribute__((always_inline)) __m512
hmerge(__m512 a, __m512 b, int level)
{
    switch (level) {
    case 0: /* lanes j + (j + 8): a's position in lanes 0-7, b's in 8-15 */
        return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    case 1: /* + 4: each 128-bit lane one position */
        return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    case 2: /* + 2 */
        return _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
            _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))));
    default: /* + 1 */
        return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
    }
}

/* Pushes the partial vector of position i (0..15, a constant after unrolling) of a block. */
static inline __attribute__((always_inline)) void
hpush(struct hstack *st, int i, __m512 x)
{
    if (i & 1) {
        x = hmerge(st->l[0], x, 0);
        if (i & 2) {
            x = hmerge(st->l[1], x, 1);
            if (i & 4) {
                x = hmerge(st->l[2], x, 2);
                if (i & 8) {
                    st->l[3] = hmerge(st->l[3], x, 3);
                    return;
                }
                st->l[3] = x;
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

/* The 16 scores of a block in position order (after the tree, lane 4k + m holds position
 * 4m + k). */
static inline __attribute__((always_inline)) __m512
hscores(const struct hstack *st)
{
    return _mm512_permutexvar_ps(
        _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), st->l[3]);
}

/* Scores of nq (<= 4) query heads over positions [p0, p0 + 16) (np of them exist) into scratch,
 * and the running maxima vmx updated. qs: the scaled queries, 16 vector slots per head. */
static inline __attribute__((always_inline)) void
score_block(const __m512 *qs, int nq, int nv, const float *const *k_blocks, int block_rows,
            size_t stride, int p0, int np, float *scratch, int n_kv, __m512 *vmx)
{
    struct hstack st[4];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {
        const float *kp = NULL;
        if (i < np) {
            int p = p0 + i;
            kp = k_blocks[p / block_rows] + (size_t)(p % block_rows) * stride;
        }
#pragma GCC unroll 4
        for (int j = 0; j < nq; j++) {
            __m512 acc = _mm512_setzero_ps();
            if (kp) {
                acc = _mm512_mul_ps(qs[j * 16], _mm512_loadu_ps(kp));
#pragma GCC unroll 16
                for (int c = 1; c < nv; c++)
                    acc = _mm512_fmadd_ps(qs[j * 16 + c], _mm512_loadu_ps(kp + 16 * c), acc);
            }
            hpush(&st[j], i, acc);
        }
    }
    __mmask16 m = (__mmask16)(np >= 16 ? 0xFFFF : (1u << np) - 1);
    for (int j = 0; j < nq; j++) {
        __m512 sc = hscores(&st[j]);
        _mm512_mask_storeu_ps(scratch + (size_t)j * n_kv + p0, m, sc);
        vmx[j] = _mm512_mask_max_ps(vmx[j], m, vmx[j], sc);
    }
}

/* Attention of up to 4 query heads sharing K/V: scores 16 positions at a time, softmax per head,
 * then one pass over V for all heads (each head's FMA chain over positions in order). Inlined
 * with constant nq and nv for head_dim 64 so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void
attn_heads(float *out, const float *q, const float *const *k_blocks, const float *const *v_blocks,
           int block_rows, int n_kv, int nq, int head_dim, size_t stride, float scale,
           float *scratch)
{
    int nv = head_dim / 16;
    __m512 qs[4 * 16], vmx[4];
    for (int j = 0; j < nq; j++) {
        for (int c = 0; c < nv; c++)
            qs[j * 16 + c] = _mm512_mul_ps(_mm512_loadu_ps(q + (size_t)j * head_dim + 16 * c),
                                           _mm512_set1_ps(scale));
        vmx[j] = _mm512_set1_ps(-INFINITY);
    }
    for (int p0 = 0; p0 < n_kv; p0 += 16) {
        int np = n_kv - p0 < 16 ? n_kv - p0 : 16;
        score_block(qs, nq, nv, k_blocks, block_rows, stride, p0, np, scratch, n_kv, vmx);
    }
    float inv[4];
    for (int j = 0; j < nq; j++) {
        float *s = scratch + (size_t)j * n_kv;
        float mx = _mm512_reduce_max_ps(vmx[j]);
        __m512 vm = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
        int p = 0;
        for (; p + 16 <= n_kv; p += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + p), vm));
            _mm512_storeu_ps(s + p, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        if (p < n_kv) {
            __mmask16 m = (__mmask16)((1u << (n_kv - p)) - 1);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + p), vm));
            e = _mm512_maskz_mov_ps(m, e);
            _mm512_mask_storeu_ps(s + p, m, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        inv[j] = 1.0f / _mm512_reduce_add_ps(vsum);
    }
    __m512 acc[4][16];
#pragma GCC unroll 4
    for (int j = 0; j < nq; j++)
#pragma GCC unroll 16
        for (int c = 0; c < nv; c++)
            acc[j][c] = _mm512_setzero_ps();
    const float *vb = v_blocks[0];
    int r = 0, blk = 0;
    for (int p = 0; p < n_kv; p++, r++) {
        if (r == block_rows) {
            vb = v_blocks[++blk];
            r = 0;
        }
        const float *vp = vb + (size_t)r * stride;
#pragma GCC unroll 16
        for (int c = 0; c < nv; c++) {
            __m512 v = _mm512_loadu_ps(vp + 16 * c);
#pragma GCC unroll 4
            for (int j = 0; j < nq; j++)
                acc[j][c] =
                    _mm512_fmadd_ps(_mm512_set1_ps(scratch[(size_t)j * n_kv + p]), v, acc[j][c]);
        }
    }
    for (int j = 0; j < nq; j++) {
        float *oj = out + (size_t)j * head_dim;
        for (int c = 0; c < nv; c++)
            _mm512_storeu_ps(oj + 16 * c, _mm512_mul_ps(acc[j][c], _mm512_set1_ps(inv[j])));
    }
}

void
kern_attn_f32_avx512(float *out, const float *q, const float *const *k_blocks,
                     const float *const *v_blocks, int block_rows, int n_kv, int n_q, int head_dim,
                     size_t stride, float scale, float *scratch)
{
    for (int j = 0; j < n_q; j += 4) {
        int nq = n_q - j < 4 ? n_q - j : 4;
        float *o = out + (size_t)j * head_dim, *sc = scratch + (size_t)j * n_kv;
        const float *qj = q + (size_t)j * head_dim;
#define HEADS(NQ, HD)                                                                              \
    attn_heads(o, qj, k_blocks, v_blocks, block_rows, n_kv, NQ, HD, stride, scale, sc)
        if (head_dim == 64 && nq == 3)
            HEADS(3, 64);
        else if (head_dim == 64 && nq == 1)
            HEADS(1, 64);
        else if (head_dim == 64 && nq == 4)
            HEADS(4, 64);
        else if (head_dim == 64 && nq == 2)
            HEADS(2, 64);
        else
            HEADS(nq, head_dim);
#undef HEADS
    }
}

void
kern_swiglu_avx512(float *out, const float *gate, const float *up, int n)
{
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = (__mmask16)(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        __m512 y = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)),
                                 _mm512_maskz_loadu_ps(m, up + i));
        _mm512_mask_storeu_ps(out + i, m, y);
    }
}

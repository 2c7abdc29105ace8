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

void
kern_attn_f32_avx512(float *out, const float *q, const float *const *k_blocks,
                     const float *const *v_blocks, int block_rows, int n_kv, int n_q, int head_dim,
                     size_t stride, float scale, float *scratch)
{
    int nv = head_dim / 16;
    int r, blk;
    for (int j = 0; j < n_q; j++) {
        const float *qj = q + (size_t)j * head_dim;
        float *s = scratch + (size_t)j * n_kv;
        __m512 qv[16];
        for (int c = 0; c < nv; c++)
            qv[c] = _mm512_mul_ps(_mm512_loadu_ps(qj + 16 * c), _mm512_set1_ps(scale));
        float mx = -INFINITY;
        const float *kb = k_blocks[0];
        r = 0;
        blk = 0;
        for (int p = 0; p < n_kv; p++, r++) {
            if (r == block_rows) {
                kb = k_blocks[++blk];
                r = 0;
            }
            const float *kp = kb + (size_t)r * stride;
            __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kp));
            for (int c = 1; c < nv; c++)
                acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kp + 16 * c), acc);
            float sc = _mm512_reduce_add_ps(acc);
            s[p] = sc;
            mx = sc > mx ? sc : mx;
        }
        __m512 vmx = _mm512_set1_ps(mx), vsum = _mm512_setzero_ps();
        int p = 0;
        for (; p + 16 <= n_kv; p += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + p), vmx));
            _mm512_storeu_ps(s + p, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        if (p < n_kv) {
            __mmask16 m = (__mmask16)((1u << (n_kv - p)) - 1);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + p), vmx));
            e = _mm512_maskz_mov_ps(m, e);
            _mm512_mask_storeu_ps(s + p, m, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        float inv = 1.0f / _mm512_reduce_add_ps(vsum);
        __m512 acc[16];
        for (int c = 0; c < nv; c++)
            acc[c] = _mm512_setzero_ps();
        const float *vb = v_blocks[0];
        r = 0;
        blk = 0;
        for (p = 0; p < n_kv; p++, r++) {
            if (r == block_rows) {
                vb = v_blocks[++blk];
                r = 0;
            }
            const float *vp = vb + (size_t)r * stride;
            __m512 w = _mm512_set1_ps(s[p]);
            for (int c = 0; c < nv; c++)
                acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vp + 16 * c), acc[c]);
        }
        float *oj = out + (size_t)j * head_dim;
        for (int c = 0; c < nv; c++)
            _mm512_storeu_ps(oj + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
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

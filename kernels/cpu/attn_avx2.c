/* AVX2 attention (see kern_attn_f32); exp as in attn_avx512.c, 8 lanes. */
#include <immintrin.h>
#include <math.h>

#include "kernels/cpu/attn_int.h"

static inline __m256
exp256(__m256 x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n: n is in [-126, 0] here, so the exponent bits never underflow the biased range. */
    __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float
hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

void
kern_attn_f32_avx2(float *out, const float *q, const float *const *k_blocks,
                   const float *const *v_blocks, int block_rows, int n_kv, int n_q, int head_dim,
                   size_t stride, float scale, float *scratch)
{
    int nv = head_dim / 8;
    int r, blk;
    for (int j = 0; j < n_q; j++) {
        const float *qj = q + (size_t)j * head_dim;
        float *s = scratch + (size_t)j * n_kv;
        __m256 qv[32];
        for (int c = 0; c < nv; c++)
            qv[c] = _mm256_mul_ps(_mm256_loadu_ps(qj + 8 * c), _mm256_set1_ps(scale));
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
            __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kp));
            for (int c = 1; c < nv; c++)
                acc = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kp + 8 * c), acc);
            float sc = hsum256(acc);
            s[p] = sc;
            mx = sc > mx ? sc : mx;
        }
        __m256 vmx = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
        int p = 0;
        for (; p + 8 <= n_kv; p += 8) {
            __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + p), vmx));
            _mm256_storeu_ps(s + p, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum256(vsum);
        for (; p < n_kv; p++) {
            s[p] = expf(s[p] - mx);
            sum += s[p];
        }
        float inv = 1.0f / sum;
        __m256 acc[32];
        for (int c = 0; c < nv; c++)
            acc[c] = _mm256_setzero_ps();
        const float *vb = v_blocks[0];
        r = 0;
        blk = 0;
        for (p = 0; p < n_kv; p++, r++) {
            if (r == block_rows) {
                vb = v_blocks[++blk];
                r = 0;
            }
            const float *vp = vb + (size_t)r * stride;
            __m256 w = _mm256_set1_ps(s[p]);
            for (int c = 0; c < nv; c++)
                acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vp + 8 * c), acc[c]);
        }
        float *oj = out + (size_t)j * head_dim;
        for (int c = 0; c < nv; c++)
            _mm256_storeu_ps(oj + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
    }
}

/*
 * Attention over one sequence's cached K/V rows for a group of query heads sharing a KV head:
 * the scalar reference and the dispatch to the SIMD versions (attn_avx2.c, attn_avx512.c).
 */
#include <math.h>
#include <stddef.h>

#include "kernels/cpu/attn_int.h"
#include "kernels/kern.h"

void
kern_attn_f32_ref(float *out, const float *q, const float *const *k_blocks,
                  const float *const *v_blocks, int block_rows, int n_kv, int n_q, int head_dim,
                  size_t stride, float scale, float *scratch)
{
    int r, blk;
    for (int j = 0; j < n_q; j++) {
        const float *qj = q + (size_t)j * head_dim;
        float *s = scratch + (size_t)j * n_kv;
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
            float acc = 0;
            for (int d = 0; d < head_dim; d++)
                acc += qj[d] * kp[d];
            s[p] = acc * scale;
            if (s[p] > mx)
                mx = s[p];
        }
        float sum = 0;
        for (int p = 0; p < n_kv; p++) {
            s[p] = expf(s[p] - mx);
            sum += s[p];
        }
        float inv = 1.0f / sum;
        float *oj = out + (size_t)j * head_dim;
        for (int d = 0; d < head_dim; d++)
            oj[d] = 0;
        const float *vb = v_blocks[0];
        r = 0;
        blk = 0;
        for (int p = 0; p < n_kv; p++, r++) {
            if (r == block_rows) {
                vb = v_blocks[++blk];
                r = 0;
            }
            const float *vp = vb + (size_t)r * stride;
            float w = s[p] * inv;
            for (int d = 0; d < head_dim; d++)
                oj[d] += w * vp[d];
        }
    }
}

void
kern_attn_f32(float *out, const float *q, const float *const *k_blocks,
              const float *const *v_blocks, int block_rows, int n_kv, int n_q, int head_dim,
              size_t stride, float scale, float *scratch)
{
    enum kern_isa isa = kern_cpu_isa();
    if (isa == KERN_ISA_AVX512 && head_dim % 16 == 0 && head_dim <= 256)
        kern_attn_f32_avx512(out, q, k_blocks, v_blocks, block_rows, n_kv, n_q, head_dim, stride,
                             scale, scratch);
    else if (isa >= KERN_ISA_AVX2 && head_dim % 8 == 0 && head_dim <= 256)
        kern_attn_f32_avx2(out, q, k_blocks, v_blocks, block_rows, n_kv, n_q, head_dim, stride,
                           scale, scratch);
    else
        kern_attn_f32_ref(out, q, k_blocks, v_blocks, block_rows, n_kv, n_q, head_dim, stride,
                          scale, scratch);
}

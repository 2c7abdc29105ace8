/* attn_int: the SIMD attention kernels behind kern_attn_f32 (same contract; head_dim a multiple
 * of the vector width and at most 256). */
#ifndef KERN_CPU_ATTN_INT_H
#define KERN_CPU_ATTN_INT_H

#include <stddef.h>

void kern_attn_f32_avx2(float *out, const float *q, const float *const *k_blocks,
                        const float *const *v_blocks, int block_rows, int n_kv, int n_q,
                        int head_dim, size_t stride, float scale, float *scratch);
void kern_attn_f32_avx512(float *out, const float *q, const float *const *k_blocks,
                          const float *const *v_blocks, int block_rows, int n_kv, int n_q,
                          int head_dim, size_t stride, float scale, float *scratch);

/* kern_swiglu with AVX-512 (exp by polynomial, a few ulp from expf). */
void kern_swiglu_avx512(float *out, const float *gate, const float *up, int n);

#endif

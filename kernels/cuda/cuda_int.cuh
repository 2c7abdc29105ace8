/*
 * cuda_int: internals shared by the .cu files of the CUDA backend: the context struct, the status
 * checks (every CUDA and cuBLAS call goes through KC_CUDA / KC_BLAS, every kernel launch is
 * followed by KC_LAUNCH), warp reductions and the per-type dequantization of one 32-element chunk
 * of a weight row, which the dequant, matvec and embedding kernels share.
 *
 * A "chunk" is 32 consecutive elements of a row: a whole block of the 32-element types, one
 * sub-block (Q4_K, Q5_K) or two scale units (Q6_K) of a K-quant super-block, 32 values of a float
 * type. Chunk c of a row is elements [32c, 32c + 32). Each kc_deq32 specialisation below is the
 * block layout of kernels/quant.h written out for one chunk, matching the reference dequantizers
 * in kernels/quant.c.
 */
#ifndef KERN_CUDA_INT_CUH
#define KERN_CUDA_INT_CUH

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <stdint.h>

#include "kernels/cuda/kern_cuda.h"
#include "kernels/quant.h"

/* ---- Context ---- */

struct kern_cuda {
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    void *x16; /* f16 activations of the GEMM path */
    size_t x16_bytes;
    void *w16; /* one f16 weight tile of the GEMM path */
    size_t w16_bytes;
};

/* ---- Status checks ---- */

/* Maps a CUDA status to 0 or a negative errno; logs a failure (once per distinct error in a row,
 * so a sticky error does not flood the log) with the expression and its place. */
int kc_status(cudaError_t e, const char *expr, const char *file, int line);
int kc_blas_status(cublasStatus_t s, const char *expr, const char *file, int line);

#define KC_CUDA(call) kc_status((call), #call, __FILE__, __LINE__)
#define KC_BLAS(call) kc_blas_status((call), #call, __FILE__, __LINE__)
#define KC_LAUNCH() kc_status(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

/* Grows a scratch buffer of c to at least bytes (waits for the stream before freeing the old one).
 */
int kc_scratch(struct kern_cuda *c, void **buf, size_t *have, size_t bytes);

/* Blocks for a grid-stride launch over n items with threads per block. */
static inline unsigned
kc_blocks(int64_t n, int threads)
{
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

/* ---- Reductions ---- */

__device__ __forceinline__ float
kc_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float
kc_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets it.
 * smem holds 32 floats. */
__device__ __forceinline__ float
kc_block_sum(float v, float *smem)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = kc_warp_sum(v);
    __syncthreads(); /* smem may still be read from a previous reduction */
    if (lane == 0)
        smem[warp] = v;
    __syncthreads();
    v = lane < n_warps ? smem[lane] : 0.0f;
    return kc_warp_sum(v);
}

__device__ __forceinline__ float
kc_block_max(float v, float *smem)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = kc_warp_max(v);
    __syncthreads();
    if (lane == 0)
        smem[warp] = v;
    __syncthreads();
    v = lane < n_warps ? smem[lane] : -INFINITY;
    return kc_warp_max(v);
}

/* ---- Dequantization of one chunk ---- */

__device__ __forceinline__ float
kc_h2f(uint16_t h)
{
    return __half2float(__ushort_as_half(h));
}

template <int T> __device__ __forceinline__ void kc_deq32(const uint8_t *row, int64_t c, float *o);

template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_F32>(const uint8_t *row, int64_t c, float *o)
{
    const float *p = (const float *)row + 32 * c;
    for (int i = 0; i < 32; i++)
        o[i] = p[i];
}

template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_F16>(const uint8_t *row, int64_t c, float *o)
{
    const uint16_t *p = (const uint16_t *)row + 32 * c;
    for (int i = 0; i < 32; i++)
        o[i] = kc_h2f(p[i]);
}

template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_BF16>(const uint8_t *row, int64_t c, float *o)
{
    const uint16_t *p = (const uint16_t *)row + 32 * c;
    for (int i = 0; i < 32; i++)
        o[i] = __uint_as_float((uint32_t)p[i] << 16);
}

template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_Q4_0>(const uint8_t *row, int64_t c, float *o)
{
    const struct kern_block_q4_0 *b = (const struct kern_block_q4_0 *)row + c;
    float d = kc_h2f(b->d);
    for (int j = 0; j < 16; j++) {
        o[j] = d * (float)((b->qs[j] & 0xF) - 8);
        o[j + 16] = d * (float)((b->qs[j] >> 4) - 8);
    }
}

template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_Q4_1>(const uint8_t *row, int64_t c, float *o)
{
    const struct kern_block_q4_1 *b = (const struct kern_block_q4_1 *)row + c;
    float d = kc_h2f(b->d), m = kc_h2f(b->m);
    for (int j = 0; j < 16; j++) {
        o[j] = d * (float)(b->qs[j] & 0xF) + m;
        o[j + 16] = d * (float)(b->qs[j] >> 4) + m;
    }
}

/* The 32 fifth bits of Q5_0 / Q5_1 (qh is not 4-byte aligned in the block). */
__device__ __forceinline__ uint32_t
kc_qh32(const uint8_t *qh)
{
    return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
}

template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_Q5_0>(const uint8_t *row, int64_t c, float *o)
{
    const struct kern_block_q5_0 *b = (const struct kern_block_q5_0 *)row + c;
    float d = kc_h2f(b->d);
    uint32_t qh = kc_qh32(b->qh);
    for (int j = 0; j < 16; j++) {
        int lo = (b->qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
        int hi = (b->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        o[j] = d * (float)(lo - 16);
        o[j + 16] = d * (float)(hi - 16);
    }
}

template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_Q5_1>(const uint8_t *row, int64_t c, float *o)
{
    const struct kern_block_q5_1 *b = (const struct kern_block_q5_1 *)row + c;
    float d = kc_h2f(b->d), m = kc_h2f(b->m);
    uint32_t qh = kc_qh32(b->qh);
    for (int j = 0; j < 16; j++) {
        int lo = (b->qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
        int hi = (b->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        o[j] = d * (float)lo + m;
        o[j + 16] = d * (float)hi + m;
    }
}

template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_Q8_0>(const uint8_t *row, int64_t c, float *o)
{
    const struct kern_block_q8_0 *b = (const struct kern_block_q8_0 *)row + c;
    float d = kc_h2f(b->d);
    for (int j = 0; j < 32; j++)
        o[j] = d * (float)b->qs[j];
}

/* The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (kernels/quant.h). */
__device__ __forceinline__ void
kc_k_scale_min(const uint8_t *s, int j, float *sc, float *mn)
{
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *mn = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *mn = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* Q4_K: chunk c is sub-block j = c % 8 of super-block c / 8; its nibbles are the low (j even) or
 * high (j odd) halves of the 32 bytes of group j / 2. */
template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_Q4_K>(const uint8_t *row, int64_t c, float *o)
{
    const struct kern_block_q4_k *b = (const struct kern_block_q4_k *)row + c / 8;
    int j = (int)(c % 8), shift = 4 * (j & 1);
    float sc, mn;
    kc_k_scale_min(b->scales, j, &sc, &mn);
    float d = kc_h2f(b->d) * sc, m = kc_h2f(b->dmin) * mn;
    const uint8_t *qs = b->qs + 32 * (j / 2);
    for (int l = 0; l < 32; l++)
        o[l] = d * (float)((qs[l] >> shift) & 0xF) - m;
}

/* Q5_K: as Q4_K, plus bit j of qh[l] as the fifth bit of element l. */
template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_Q5_K>(const uint8_t *row, int64_t c, float *o)
{
    const struct kern_block_q5_k *b = (const struct kern_block_q5_k *)row + c / 8;
    int j = (int)(c % 8), shift = 4 * (j & 1);
    float sc, mn;
    kc_k_scale_min(b->scales, j, &sc, &mn);
    float d = kc_h2f(b->d) * sc, m = kc_h2f(b->dmin) * mn;
    const uint8_t *qs = b->qs + 32 * (j / 2);
    for (int l = 0; l < 32; l++) {
        int q = ((qs[l] >> shift) & 0xF) | ((b->qh[l] >> j) & 1) << 4;
        o[l] = d * (float)q - m;
    }
}

/* Q6_K: chunk c is quarter k = c % 4 of half h = (c / 4) % 2 of super-block c / 8. Element l of
 * the quarter has its low nibble in ql[l + 32 * (k & 1)] (high nibble when k >= 2), its two high
 * bits at bit 2k of qh[l], and scale scales[8h + l / 16 + 2k]. */
template <>
__device__ __forceinline__ void
kc_deq32<KERN_DTYPE_Q6_K>(const uint8_t *row, int64_t c, float *o)
{
    const struct kern_block_q6_k *b = (const struct kern_block_q6_k *)row + c / 8;
    int h = (int)((c / 4) % 2), k = (int)(c % 4);
    const uint8_t *ql = b->ql + 64 * h + 32 * (k & 1);
    const uint8_t *qh = b->qh + 32 * h;
    const int8_t *sc = b->scales + 8 * h + 2 * k;
    float d = kc_h2f(b->d);
    int nshift = k >= 2 ? 4 : 0;
    for (int l = 0; l < 32; l++) {
        int q = ((ql[l] >> nshift) & 0xF) | ((qh[l] >> (2 * k)) & 3) << 4;
        o[l] = d * (float)sc[l / 16] * (float)(q - 32);
    }
}

/* Evaluates F<T>(args...) (a function template returning int) for the weight type t; -ENOTSUP for
 * other types. */
#define KC_DISPATCH_TYPE(t, F, ...)                                                                \
    ((t) == KERN_DTYPE_F32    ? F<KERN_DTYPE_F32>(__VA_ARGS__)                                     \
     : (t) == KERN_DTYPE_F16  ? F<KERN_DTYPE_F16>(__VA_ARGS__)                                     \
     : (t) == KERN_DTYPE_BF16 ? F<KERN_DTYPE_BF16>(__VA_ARGS__)                                    \
     : (t) == KERN_DTYPE_Q4_0 ? F<KERN_DTYPE_Q4_0>(__VA_ARGS__)                                    \
     : (t) == KERN_DTYPE_Q4_1 ? F<KERN_DTYPE_Q4_1>(__VA_ARGS__)                                    \
     : (t) == KERN_DTYPE_Q5_0 ? F<KERN_DTYPE_Q5_0>(__VA_ARGS__)                                    \
     : (t) == KERN_DTYPE_Q5_1 ? F<KERN_DTYPE_Q5_1>(__VA_ARGS__)                                    \
     : (t) == KERN_DTYPE_Q8_0 ? F<KERN_DTYPE_Q8_0>(__VA_ARGS__)                                    \
     : (t) == KERN_DTYPE_Q4_K ? F<KERN_DTYPE_Q4_K>(__VA_ARGS__)                                    \
     : (t) == KERN_DTYPE_Q5_K ? F<KERN_DTYPE_Q5_K>(__VA_ARGS__)                                    \
     : (t) == KERN_DTYPE_Q6_K ? F<KERN_DTYPE_Q6_K>(__VA_ARGS__)                                    \
                              : -ENOTSUP)

/* Checks a device matrix: supported type, n_in a multiple of 32, row_bytes consistent. */
int kc_matrix_ok(const struct kern_cuda_matrix *w);

#endif

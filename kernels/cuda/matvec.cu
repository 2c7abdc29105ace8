/*
 * matvec: quantized matrix x few activation rows, for decode. One warp per output row; each lane
 * dequantizes 32-element chunks of the row into registers (chunks lane, lane + 32, ...) and
 * multiplies them with up to NT token rows of f32 activations, so each weight is read once per NT
 * tokens. Sums are f32: per lane in chunk order, then a butterfly across the warp.
 */
#include "kernels/cuda/cuda_int.cuh"

#define MMV_WARPS 4 /* rows (warps) per thread block */

template <int T, int NT>
__global__ void __launch_bounds__(32 * MMV_WARPS)
    matvec_kernel(const uint8_t *w, size_t row_bytes, int64_t n_chunks, int64_t n_out,
                  const float *x, int64_t n_in, int n_tok, float *y)
{
    int64_t row = (int64_t)blockIdx.x * MMV_WARPS + threadIdx.y;
    if (row >= n_out)
        return; /* the whole warp leaves together */
    const uint8_t *wr = w + (size_t)row * row_bytes;
    float acc[NT];
    for (int t = 0; t < NT; t++)
        acc[t] = 0.0f;
    for (int64_t ch = threadIdx.x; ch < n_chunks; ch += 32) {
        float v[32];
        kc_deq32<T>(wr, ch, v);
        for (int t = 0; t < NT; t++) {
            if (t < n_tok) {
                const float4 *xp = (const float4 *)(x + t * n_in + ch * 32);
                float s = 0.0f;
                for (int j = 0; j < 8; j++) {
                    float4 a = __ldg(xp + j);
                    s += v[4 * j] * a.x + v[4 * j + 1] * a.y + v[4 * j + 2] * a.z +
                         v[4 * j + 3] * a.w;
                }
                acc[t] += s;
            }
        }
    }
    for (int t = 0; t < NT; t++) {
        float s = kc_warp_sum(acc[t]);
        if (threadIdx.x == 0 && t < n_tok)
            y[t * n_out + row] = s;
    }
}

template <int T, int NT>
static int
launch_nt(struct kern_cuda *c, const struct kern_cuda_matrix *w, const float *x, int n_tok,
          float *y)
{
    dim3 block(32, MMV_WARPS);
    unsigned grid = (unsigned)((w->n_out + MMV_WARPS - 1) / MMV_WARPS);
    matvec_kernel<T, NT><<<grid, block, 0, c->stream>>>(
        (const uint8_t *)w->data, w->row_bytes, w->n_in / 32, w->n_out, x, w->n_in, n_tok, y);
    return KC_LAUNCH();
}

/* One launch for up to KERN_CUDA_MMV_MAX_TOK tokens, with the smallest NT that holds them. */
template <int T>
static int
launch_matvec(struct kern_cuda *c, const struct kern_cuda_matrix *w, const float *x, int n_tok,
              float *y)
{
    if (n_tok == 1)
        return launch_nt<T, 1>(c, w, x, n_tok, y);
    if (n_tok == 2)
        return launch_nt<T, 2>(c, w, x, n_tok, y);
    if (n_tok <= 4)
        return launch_nt<T, 4>(c, w, x, n_tok, y);
    return launch_nt<T, KERN_CUDA_MMV_MAX_TOK>(c, w, x, n_tok, y);
}

extern "C" int
kern_cuda_matvec(struct kern_cuda *c, const struct kern_cuda_matrix *w, const float *x, int n_tok,
                 float *y)
{
    int rc = kc_matrix_ok(w);
    if (rc < 0)
        return rc;
    /* float4 loads of x: rows start 16-byte aligned because n_in is a multiple of 32. */
    if (n_tok < 0 || (n_tok > 0 && (!x || !y)) || ((uintptr_t)x & 15))
        return -EINVAL;
    for (int t0 = 0; t0 < n_tok && rc == 0; t0 += KERN_CUDA_MMV_MAX_TOK) {
        int n = n_tok - t0 < KERN_CUDA_MMV_MAX_TOK ? n_tok - t0 : KERN_CUDA_MMV_MAX_TOK;
        rc = KC_DISPATCH_TYPE(w->type, launch_matvec, c, w, x + (int64_t)t0 * w->n_in, n,
                              y + (int64_t)t0 * w->n_out);
    }
    return rc;
}

extern "C" int
kern_cuda_matmul(struct kern_cuda *c, const struct kern_cuda_matrix *w, const float *x, int n_tok,
                 float *y)
{
    if (n_tok >= KERN_CUDA_GEMM_MIN_TOK)
        return kern_cuda_gemm(c, w, x, n_tok, y);
    return kern_cuda_matvec(c, w, x, n_tok, y);
}

/*
 * gemm: the prefill path. Activations are converted to f16 once, the weight matrix is dequantized
 * to f16 one tile of rows at a time (tiles of at most GEMM_TILE_ELEMS elements bound the scratch),
 * and cublasGemmEx multiplies each tile with f32 accumulation into the f32 output columns of
 * those rows.
 *
 * Layout: cuBLAS is column-major. The row-major weights (n_out, n_in) are the column-major
 * (n_in, n_out) matrix W^T, the activations (n_tok, n_in) are column-major (n_in, n_tok) and the
 * output (n_tok, n_out) is column-major (n_out, n_tok) with leading dimension n_out. So
 * Y_cm = op(W^T) * X_cm with op = transpose: m = tile rows, n = n_tok, k = n_in.
 */
#include "kernels/cuda/cuda_int.cuh"

#define GEMM_TILE_ELEMS ((int64_t)32 << 20) /* 64 MiB of f16 per weight tile */

__global__ void
f32_to_f16_kernel(const float *x, __half *y, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = __float2half_rn(x[i]);
}

extern "C" int
kern_cuda_gemm(struct kern_cuda *c, const struct kern_cuda_matrix *w, const float *x, int n_tok,
               float *y)
{
    int rc = kc_matrix_ok(w);
    if (rc < 0)
        return rc;
    if (n_tok < 0 || (n_tok > 0 && (!x || !y)))
        return -EINVAL;
    if (n_tok == 0)
        return 0;
    int64_t n_x = (int64_t)n_tok * w->n_in;
    int64_t tile_rows = GEMM_TILE_ELEMS / w->n_in;
    tile_rows = tile_rows < 1 ? 1 : (tile_rows > w->n_out ? w->n_out : tile_rows);
    if ((rc = kc_scratch(c, &c->x16, &c->x16_bytes, (size_t)n_x * sizeof(__half))) < 0 ||
        (rc = kc_scratch(c, &c->w16, &c->w16_bytes, (size_t)(tile_rows * w->n_in) * 2)) < 0)
        return rc;
    f32_to_f16_kernel<<<kc_blocks(n_x, 256), 256, 0, c->stream>>>(x, (__half *)c->x16, n_x);
    if ((rc = KC_LAUNCH()) < 0)
        return rc;
    const float alpha = 1.0f, beta = 0.0f;
    for (int64_t r0 = 0; r0 < w->n_out; r0 += tile_rows) {
        int64_t r1 = r0 + tile_rows < w->n_out ? r0 + tile_rows : w->n_out;
        if ((rc = kern_cuda_dequant_f16(c, w, r0, r1, (uint16_t *)c->w16)) < 0)
            return rc;
        rc = KC_BLAS(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)(r1 - r0), n_tok,
                                  (int)w->n_in, &alpha, c->w16, CUDA_R_16F, (int)w->n_in, c->x16,
                                  CUDA_R_16F, (int)w->n_in, &beta, y + r0, CUDA_R_32F,
                                  (int)w->n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        if (rc < 0)
            return rc;
    }
    return 0;
}

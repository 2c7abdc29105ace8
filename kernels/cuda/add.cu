/*
 * add: the residual add (y += x) and the per-row bias add (y[r] += b).
 */
#include "kernels/cuda/cuda_int.cuh"

__global__ void
add_kernel(float *y, const float *x, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

__global__ void
add_rows_kernel(float *y, const float *b, int64_t total, int n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] += b[i % n];
}

extern "C" int
kern_cuda_add(struct kern_cuda *c, float *y, const float *x, int64_t n)
{
    if (n < 0)
        return -EINVAL;
    if (n == 0)
        return 0;
    add_kernel<<<kc_blocks(n, 256), 256, 0, c->stream>>>(y, x, n);
    return KC_LAUNCH();
}

extern "C" int
kern_cuda_add_rows(struct kern_cuda *c, float *y, const float *b, int n_rows, int n)
{
    if (n_rows < 0 || n < 1)
        return -EINVAL;
    if (n_rows == 0)
        return 0;
    int64_t total = (int64_t)n_rows * n;
    add_rows_kernel<<<kc_blocks(total, 256), 256, 0, c->stream>>>(y, b, total, n);
    return KC_LAUNCH();
}

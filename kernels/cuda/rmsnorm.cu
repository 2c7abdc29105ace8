/*
 * rmsnorm: one thread block per row; the sum of squares is reduced in f32 (the CPU kernel sums in
 * double), then every element is scaled by 1 / sqrt(mean + eps) and the weight.
 */
#include "kernels/cuda/cuda_int.cuh"

__global__ void
rmsnorm_kernel(float *out, const float *x, const float *w, int n, float eps)
{
    __shared__ float smem[32];
    const float *xr = x + (int64_t)blockIdx.x * n;
    float *orow = out + (int64_t)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        ss += xr[i] * xr[i];
    ss = kc_block_sum(ss, smem);
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        orow[i] = xr[i] * scale * w[i];
}

extern "C" int
kern_cuda_rmsnorm(struct kern_cuda *c, float *out, const float *x, const float *w, int n_rows,
                  int n, float eps)
{
    if (n_rows < 0 || n < 1)
        return -EINVAL;
    if (n_rows == 0)
        return 0;
    rmsnorm_kernel<<<(unsigned)n_rows, 256, 0, c->stream>>>(out, x, w, n, eps);
    return KC_LAUNCH();
}

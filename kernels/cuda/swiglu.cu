/*
 * swiglu: out = silu(gate) * up, element-wise (expf, as the CPU kernel).
 */
#include "kernels/cuda/cuda_int.cuh"

__global__ void
swiglu_kernel(float *out, const float *gate, const float *up, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" int
kern_cuda_swiglu(struct kern_cuda *c, float *out, const float *gate, const float *up, int64_t n)
{
    if (n < 0)
        return -EINVAL;
    if (n == 0)
        return 0;
    swiglu_kernel<<<kc_blocks(n, 256), 256, 0, c->stream>>>(out, gate, up, n);
    return KC_LAUNCH();
}

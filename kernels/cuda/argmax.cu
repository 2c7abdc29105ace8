/*
 * argmax and softmax helpers: one thread block per row.
 */
#include "kernels/cuda/cuda_int.cuh"

#define ROW_THREADS 256

__global__ void
softmax_kernel(float *x, int n)
{
    __shared__ float smem[32];
    float *r = x + (int64_t)blockIdx.x * n;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        mx = fmaxf(mx, r[i]);
    mx = kc_block_max(mx, smem);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float e = expf(r[i] - mx);
        r[i] = e;
        sum += e;
    }
    sum = kc_block_sum(sum, smem);
    float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        r[i] *= inv;
}

/* Each thread keeps its best (value, index); ties go to the smaller index, so the result is the
 * first maximum whatever the reduction order. NaN never wins. */
__device__ __forceinline__ void
better(float v, int i, float *bv, int *bi)
{
    if (v > *bv || (v == *bv && i < *bi)) {
        *bv = v;
        *bi = i;
    }
}

__global__ void
argmax_kernel(const float *x, int n, int32_t *out)
{
    __shared__ float sv[ROW_THREADS];
    __shared__ int si[ROW_THREADS];
    const float *r = x + (int64_t)blockIdx.x * n;
    float bv = -INFINITY;
    int bi = n; /* "none": loses every tie */
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        better(r[i], i, &bv, &bi);
    sv[threadIdx.x] = bv;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) {
            float v = sv[threadIdx.x];
            int i = si[threadIdx.x];
            better(sv[threadIdx.x + s], si[threadIdx.x + s], &v, &i);
            sv[threadIdx.x] = v;
            si[threadIdx.x] = i;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0)
        out[blockIdx.x] = si[0] < n ? si[0] : 0;
}

extern "C" int
kern_cuda_softmax(struct kern_cuda *c, float *x, int n_rows, int n)
{
    if (n_rows < 0 || n < 1)
        return -EINVAL;
    if (n_rows == 0)
        return 0;
    softmax_kernel<<<(unsigned)n_rows, ROW_THREADS, 0, c->stream>>>(x, n);
    return KC_LAUNCH();
}

extern "C" int
kern_cuda_argmax(struct kern_cuda *c, const float *x, int n_rows, int n, int32_t *out)
{
    if (n_rows < 0 || n < 1)
        return -EINVAL;
    if (n_rows == 0)
        return 0;
    argmax_kernel<<<(unsigned)n_rows, ROW_THREADS, 0, c->stream>>>(x, n, out);
    return KC_LAUNCH();
}

/*
 * rope: rotary position embedding in place, one thread per rotated pair. The angle is computed as
 * the CPU model does it ((float)pos * freq[j] with freq from the host), with precise sinf/cosf.
 */
#include "kernels/cuda/cuda_int.cuh"

__global__ void
rope_kernel(float *x, const int32_t *pos, const float *freq, int n_tok, int n_heads, int head_dim,
            int n_rot, int neox)
{
    int half = n_rot / 2;
    int64_t n = (int64_t)n_tok * n_heads * half;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int j = (int)(i % half);
        int64_t th = i / half; /* token * n_heads + head */
        int t = (int)(th / n_heads);
        float *xh = x + th * head_dim;
        float a = (float)pos[t] * freq[j];
        float cs = cosf(a), sn = sinf(a);
        int ia = neox ? j : 2 * j, ib = neox ? j + half : 2 * j + 1;
        float x0 = xh[ia], x1 = xh[ib];
        xh[ia] = x0 * cs - x1 * sn;
        xh[ib] = x0 * sn + x1 * cs;
    }
}

extern "C" int
kern_cuda_rope(struct kern_cuda *c, float *x, const int32_t *pos, const float *freq, int n_tok,
               int n_heads, int head_dim, int n_rot, int neox)
{
    if (n_tok < 0 || n_heads < 1 || head_dim < 2 || n_rot < 2 || n_rot % 2 || n_rot > head_dim)
        return -EINVAL;
    if (n_tok == 0)
        return 0;
    int64_t n = (int64_t)n_tok * n_heads * (n_rot / 2);
    rope_kernel<<<kc_blocks(n, 256), 256, 0, c->stream>>>(x, pos, freq, n_tok, n_heads, head_dim,
                                                          n_rot, neox);
    return KC_LAUNCH();
}

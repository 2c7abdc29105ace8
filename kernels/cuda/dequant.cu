/*
 * dequant: weight rows to f16 tiles for the cuBLAS path. One thread per 32-element chunk.
 */
#include "kernels/cuda/cuda_int.cuh"

template <int T>
__global__ void
dequant_f16_kernel(const uint8_t *w, size_t row_bytes, int64_t n_chunks, int64_t r0, int64_t n_rows,
                   __half *dst)
{
    int64_t n = n_rows * n_chunks;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / n_chunks, ch = i % n_chunks;
        float v[32];
        kc_deq32<T>(w + (size_t)(r0 + r) * row_bytes, ch, v);
        __half2 *o = (__half2 *)(dst + r * n_chunks * 32 + ch * 32);
        for (int j = 0; j < 16; j++)
            o[j] = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
    }
}

template <int T>
static int
launch_dequant(struct kern_cuda *c, const struct kern_cuda_matrix *w, int64_t r0, int64_t r1,
               uint16_t *dst)
{
    const int threads = 128;
    int64_t n_chunks = w->n_in / 32;
    dequant_f16_kernel<T><<<kc_blocks((r1 - r0) * n_chunks, threads), threads, 0, c->stream>>>(
        (const uint8_t *)w->data, w->row_bytes, n_chunks, r0, r1 - r0, (__half *)dst);
    return KC_LAUNCH();
}

extern "C" int
kern_cuda_dequant_f16(struct kern_cuda *c, const struct kern_cuda_matrix *w, int64_t r0, int64_t r1,
                      uint16_t *dst)
{
    int rc = kc_matrix_ok(w);
    if (rc < 0)
        return rc;
    if (r0 < 0 || r1 > w->n_out || r0 >= r1 || !dst)
        return -EINVAL;
    return KC_DISPATCH_TYPE(w->type, launch_dequant, c, w, r0, r1, dst);
}

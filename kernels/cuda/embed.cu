/*
 * embed: token embedding lookup (rows of the embedding matrix dequantized to f32) and row gather.
 */
#include "kernels/cuda/cuda_int.cuh"

template <int T>
__global__ void
embed_kernel(const uint8_t *w, size_t row_bytes, int64_t n_chunks, const int32_t *tokens, int n_tok,
             float *out)
{
    int64_t n = (int64_t)n_tok * n_chunks;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / n_chunks, ch = i % n_chunks;
        float v[32];
        kc_deq32<T>(w + (size_t)tokens[t] * row_bytes, ch, v);
        float *o = out + t * n_chunks * 32 + ch * 32;
        for (int j = 0; j < 32; j++)
            o[j] = v[j];
    }
}

template <int T>
static int
launch_embed(struct kern_cuda *c, const struct kern_cuda_matrix *w, const int32_t *tokens,
             int n_tok, float *out)
{
    const int threads = 128;
    int64_t n_chunks = w->n_in / 32;
    embed_kernel<T><<<kc_blocks(n_tok * n_chunks, threads), threads, 0, c->stream>>>(
        (const uint8_t *)w->data, w->row_bytes, n_chunks, tokens, n_tok, out);
    return KC_LAUNCH();
}

extern "C" int
kern_cuda_embed(struct kern_cuda *c, const struct kern_cuda_matrix *emb, const int32_t *tokens,
                int n_tok, float *out)
{
    int rc = kc_matrix_ok(emb);
    if (rc < 0)
        return rc;
    if (n_tok < 0 || (n_tok > 0 && (!tokens || !out)))
        return -EINVAL;
    if (n_tok == 0)
        return 0;
    return KC_DISPATCH_TYPE(emb->type, launch_embed, c, emb, tokens, n_tok, out);
}

__global__ void
gather_kernel(float *out, const float *x, const int32_t *idx, int n_rows, int n)
{
    int64_t total = (int64_t)n_rows * n;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / n, k = i % n;
        out[i] = x[(int64_t)idx[r] * n + k];
    }
}

extern "C" int
kern_cuda_gather_rows(struct kern_cuda *c, float *out, const float *x, const int32_t *idx,
                      int n_rows, int n)
{
    if (n_rows < 0 || n < 1)
        return -EINVAL;
    if (n_rows == 0)
        return 0;
    gather_kernel<<<kc_blocks((int64_t)n_rows * n, 256), 256, 0, c->stream>>>(out, x, idx, n_rows,
                                                                              n);
    return KC_LAUNCH();
}

/*
 * attn: the paged KV cache writes and causal grouped-query attention over it.
 *
 * Attention: one thread block per (token, query head) with ATT_WARPS warps. Warp w visits the
 * positions p = w, w + ATT_WARPS, ... of the token's sequence; lane l holds dimensions l, l + 32,
 * ... of the query and of its running output. Per position the warp reduces q . k, then updates an
 * online softmax (running maximum m, running sum s, output rescaled by exp(m_old - m_new)). The
 * warps' partial results are merged at the end through shared memory. Scores never leave
 * registers, so the context length is not bounded by shared memory.
 */
#include "kernels/cuda/cuda_int.cuh"

#define ATT_WARPS 8
#define ATT_PER_LANE (KERN_CUDA_MAX_HEAD_DIM / 32)

__global__ void
kv_write_kernel(float *k_cache, float *v_cache, const float *k, const float *v,
                const int32_t *dst_row, int n_tok, int kv_dim)
{
    int64_t n = (int64_t)n_tok * kv_dim;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / kv_dim, d = i % kv_dim;
        int64_t dst = (int64_t)dst_row[t] * kv_dim + d;
        k_cache[dst] = k[i];
        v_cache[dst] = v[i];
    }
}

extern "C" int
kern_cuda_kv_write(struct kern_cuda *c, float *k_cache, float *v_cache, const float *k,
                   const float *v, const int32_t *dst_row, int n_tok, int kv_dim)
{
    if (n_tok < 0 || kv_dim < 1)
        return -EINVAL;
    if (n_tok == 0)
        return 0;
    int64_t n = (int64_t)n_tok * kv_dim;
    kv_write_kernel<<<kc_blocks(n, 256), 256, 0, c->stream>>>(k_cache, v_cache, k, v, dst_row,
                                                              n_tok, kv_dim);
    return KC_LAUNCH();
}

__global__ void __launch_bounds__(32 * ATT_WARPS) attn_kernel(struct kern_cuda_attn a)
{
    __shared__ float sm_m[ATT_WARPS], sm_s[ATT_WARPS];
    __shared__ float sm_o[ATT_WARPS][KERN_CUDA_MAX_HEAD_DIM];
    const int t = blockIdx.x, h = blockIdx.y, hd = a.head_dim;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hk = h / (a.n_head / a.n_head_kv);
    const int64_t kv_dim = (int64_t)a.n_head_kv * hd;
    const float *q = a.q + ((int64_t)t * a.n_head + h) * hd;
    const int32_t *table = a.tables + a.tab_off[t];
    const int n_kv = a.pos[t] + 1;

    float qr[ATT_PER_LANE], o[ATT_PER_LANE];
    for (int i = 0; i < ATT_PER_LANE; i++) {
        int d = lane + 32 * i;
        qr[i] = d < hd ? q[d] : 0.0f;
        o[i] = 0.0f;
    }
    float m = -INFINITY, s = 0.0f;
    for (int p = warp; p < n_kv; p += ATT_WARPS) {
        int64_t row = (int64_t)table[p / a.block_rows] * a.block_rows + p % a.block_rows;
        const float *kp = a.k_cache + row * kv_dim + (int64_t)hk * hd;
        const float *vp = a.v_cache + row * kv_dim + (int64_t)hk * hd;
        float dot = 0.0f;
        for (int i = 0; i < ATT_PER_LANE; i++) {
            int d = lane + 32 * i;
            if (d < hd)
                dot += qr[i] * kp[d];
        }
        float sc = kc_warp_sum(dot) * a.scale;
        float m_new = fmaxf(m, sc);
        float corr = expf(m - m_new); /* 0 on the first position (m = -inf) */
        float e = expf(sc - m_new);
        s = s * corr + e;
        for (int i = 0; i < ATT_PER_LANE; i++) {
            int d = lane + 32 * i;
            o[i] = o[i] * corr + (d < hd ? e * vp[d] : 0.0f);
        }
        m = m_new;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_s[warp] = s;
    }
    for (int i = 0; i < ATT_PER_LANE; i++) {
        int d = lane + 32 * i;
        if (d < hd)
            sm_o[warp][d] = o[i];
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++)
        mx = fmaxf(mx, sm_m[w]);
    float *out = a.out + ((int64_t)t * a.n_head + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) {
            if (sm_s[w] > 0.0f) { /* warps that saw no position hold m = -inf, s = 0 */
                float f = expf(sm_m[w] - mx);
                num += f * sm_o[w][d];
                den += f * sm_s[w];
            }
        }
        out[d] = num / den;
    }
}

extern "C" int
kern_cuda_attention(struct kern_cuda *c, const struct kern_cuda_attn *a)
{
    if (!a || a->n_tok < 0 || a->n_head < 1 || a->n_head_kv < 1 || a->n_head % a->n_head_kv ||
        a->head_dim < 2 || a->head_dim > KERN_CUDA_MAX_HEAD_DIM || a->block_rows < 1 ||
        a->n_head > 65535)
        return -EINVAL;
    if (a->n_tok == 0)
        return 0;
    dim3 grid((unsigned)a->n_tok, (unsigned)a->n_head);
    attn_kernel<<<grid, 32 * ATT_WARPS, 0, c->stream>>>(*a);
    return KC_LAUNCH();
}

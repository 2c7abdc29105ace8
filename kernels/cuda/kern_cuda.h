/*
 * kern_cuda: the CUDA backend's kernels, as a plain C contract (no CUDA types), so that the engine
 * (engine/model_cuda.c) and the tests are ordinary C files compiled by the host compiler.
 *
 * Only the CUDA build (make cuda, CUDA=1) compiles the .cu files of kernels/cuda and links cudart
 * and cuBLAS; the CPU build neither compiles nor links anything declared here.
 *
 * A struct kern_cuda is one device context: the device, one stream, a cuBLAS handle bound to that
 * stream and scratch buffers for the prefill GEMMs. Every op below is enqueued on that stream and
 * returns without waiting; kern_cuda_sync waits. Pointers documented "device" are device memory
 * from kern_cuda_alloc (or inside an uploaded matrix); pointers documented "host" are ordinary
 * memory. Ops check their launch and return 0 or a negative errno: -EINVAL for bad arguments,
 * -ENOMEM when device memory runs out, -ENODEV when there is no usable device, -EIO for any other
 * CUDA or cuBLAS failure (logged once, where it happens, with the call, file and line). An error
 * of an earlier asynchronous op may be reported by a later call.
 *
 * Numerics: weights keep their GGUF block layout on the device (kernels/quant.h, the same
 * structs). Decode matvecs dequantize on the fly and multiply f32 activations with f32
 * accumulation (the CPU backend quantizes activations to 8 bits, so the two agree within that
 * quantization's tolerance, not bit for bit). Prefill GEMMs (n_tok >= KERN_CUDA_GEMM_MIN_TOK)
 * dequantize weight tiles to f16 and call cublasGemmEx with f16 inputs and f32 accumulation.
 *
 * Thread context: a struct kern_cuda is used by one thread at a time. kern_cuda_probe is
 * reentrant.
 */
#ifndef KERN_CUDA_H
#define KERN_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" { /* kern.h is a C header: its functions have C linkage in the .cu files too */
#endif

#include "kernels/kern.h"

/* Matmuls with at least this many token rows go through cuBLAS; fewer use the matvec kernels. */
#define KERN_CUDA_GEMM_MIN_TOK 16
/* The matvec kernels read each weight once for up to this many token rows. */
#define KERN_CUDA_MMV_MAX_TOK 8
/* Largest head size the attention kernel handles. */
#define KERN_CUDA_MAX_HEAD_DIM 256

/* ---- Device and context ---- */

/* Looks for a CUDA device: 0 and the name of device 0 in name (n bytes, may be NULL), or -ENODEV
 * when cudaGetDeviceCount fails for any reason (no driver, "CUDA driver version is insufficient")
 * or finds none. Logs nothing. */
int kern_cuda_probe(char *name, size_t n);

struct kern_cuda;

/* Opens device 0: stream, cuBLAS handle. Returns 0, -ENODEV, -ENOMEM or -EIO. */
int kern_cuda_new(struct kern_cuda **out);
/* Waits for outstanding work and frees the context and its scratch. NULL is a no-op. */
void kern_cuda_free(struct kern_cuda *c);

/* Waits until every op enqueued on c has finished. Returns 0 or the first pending error. */
int kern_cuda_sync(struct kern_cuda *c);

/* ---- Memory ---- */

/* bytes of device memory (uninitialised) into *out. Returns 0, -EINVAL (0 bytes) or -ENOMEM. */
int kern_cuda_alloc(struct kern_cuda *c, size_t bytes, void **out);
/* Frees device memory from kern_cuda_alloc (after waiting for c's stream). NULL is a no-op. */
void kern_cuda_dfree(struct kern_cuda *c, void *dev);
/* Page-locked host memory (for transfers that overlap), freed with kern_cuda_host_free. */
int kern_cuda_host_alloc(size_t bytes, void **out);
void kern_cuda_host_free(void *host);

/* Copies host -> device, device -> host, device -> device; enqueued on c's stream. A copy from or
 * to pageable host memory returns when the host buffer may be reused (download: when the data is
 * there). */
int kern_cuda_upload(struct kern_cuda *c, void *dev, const void *host, size_t bytes);
int kern_cuda_download(struct kern_cuda *c, void *host, const void *dev, size_t bytes);
int kern_cuda_copy(struct kern_cuda *c, void *dev_dst, const void *dev_src, size_t bytes);
int kern_cuda_memset0(struct kern_cuda *c, void *dev, size_t bytes);

/* Device memory read bandwidth in GB/s: the best of reps device-to-device copies of bytes (read +
 * write counted), timed with CUDA events. 0 on failure. */
double kern_cuda_measure_bw(struct kern_cuda *c, size_t bytes, int reps);

/* ---- Weights ---- */

/* A weight matrix in device memory: the same fields as struct kern_matrix, data on the device. */
struct kern_cuda_matrix {
    enum kern_dtype type;
    int64_t n_in;
    int64_t n_out;
    size_t row_bytes;
    void *data; /* device, n_out * row_bytes */
};

/* Whether the CUDA kernels handle a weight type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
 * Q4_K, Q5_K, Q6_K). */
int kern_cuda_type_supported(enum kern_dtype type);

/* Copies a host matrix (checked with kern_matrix_check) to the device. Returns 0, -EINVAL,
 * -ENOTSUP (type), -ENOMEM or -EIO. Free with kern_cuda_matrix_free. */
int kern_cuda_matrix_upload(struct kern_cuda *c, const struct kern_matrix *w,
                            struct kern_cuda_matrix *out);
/* Frees the device data and zeroes the struct; a zeroed struct is a no-op. */
void kern_cuda_matrix_free(struct kern_cuda *c, struct kern_cuda_matrix *w);

/* Dequantizes rows [r0, r1) of w to f16 (raw IEEE half bits), row-major, into dst (device,
 * (r1 - r0) * n_in halves). */
int kern_cuda_dequant_f16(struct kern_cuda *c, const struct kern_cuda_matrix *w, int64_t r0,
                          int64_t r1, uint16_t *dst);

/* ---- Matrix multiplication (x, y device; y[t * n_out + o] = sum_k W[o][k] x[t * n_in + k]) ----
 */

/* Picks the matvec kernels below KERN_CUDA_GEMM_MIN_TOK token rows and cuBLAS from there. */
int kern_cuda_matmul(struct kern_cuda *c, const struct kern_cuda_matrix *w, const float *x,
                     int n_tok, float *y);
/* The matvec kernels (one warp per output row, weights dequantized in registers, f32 sums) for any
 * n_tok, in chunks of KERN_CUDA_MMV_MAX_TOK tokens. */
int kern_cuda_matvec(struct kern_cuda *c, const struct kern_cuda_matrix *w, const float *x,
                     int n_tok, float *y);
/* cuBLAS: activations to f16, weight row tiles dequantized to f16, cublasGemmEx with f32
 * accumulation and f32 output. Scratch grows in c as needed (-ENOMEM if it cannot). */
int kern_cuda_gemm(struct kern_cuda *c, const struct kern_cuda_matrix *w, const float *x, int n_tok,
                   float *y);

/* ---- Element-wise and row ops (all pointers device, f32) ---- */

/* out[r][i] = x[r][i] / sqrt(mean(x[r]^2) + eps) * w[i] for n_rows rows of n. out may alias x. */
int kern_cuda_rmsnorm(struct kern_cuda *c, float *out, const float *x, const float *w, int n_rows,
                      int n, float eps);

/* out[i] = silu(gate[i]) * up[i]; out may alias gate. */
int kern_cuda_swiglu(struct kern_cuda *c, float *out, const float *gate, const float *up,
                     int64_t n);

/* y[i] += x[i]. */
int kern_cuda_add(struct kern_cuda *c, float *y, const float *x, int64_t n);

/* y[r][i] += b[i] for n_rows rows of n (biases). */
int kern_cuda_add_rows(struct kern_cuda *c, float *y, const float *b, int n_rows, int n);

/*
 * RoPE in place on x: n_tok rows of n_heads heads of head_dim floats (row stride n_heads *
 * head_dim). Token t is at position pos[t] (device); pair j < n_rot / 2 is rotated by the angle
 * (float)pos * freq[j] (freq device, computed on the host as the CPU model does). neox: rotate
 * (x[j], x[j + n_rot/2]), else (x[2j], x[2j+1]).
 */
int kern_cuda_rope(struct kern_cuda *c, float *x, const int32_t *pos, const float *freq, int n_tok,
                   int n_heads, int head_dim, int n_rot, int neox);

/* out[t] = row tokens[t] of emb dequantized to f32 (n_tok rows of n_in; tokens device, in range).
 */
int kern_cuda_embed(struct kern_cuda *c, const struct kern_cuda_matrix *emb, const int32_t *tokens,
                    int n_tok, float *out);

/* out[r] = x[idx[r]] for n_rows rows of n floats (idx device). */
int kern_cuda_gather_rows(struct kern_cuda *c, float *out, const float *x, const int32_t *idx,
                          int n_rows, int n);

/* In-place softmax of n_rows rows of n. */
int kern_cuda_softmax(struct kern_cuda *c, float *x, int n_rows, int n);

/* out[r] = the index of the largest value of row r (the first of equals); out device. */
int kern_cuda_argmax(struct kern_cuda *c, const float *x, int n_rows, int n, int32_t *out);

/* ---- Paged KV cache and attention ---- */

/*
 * The device KV cache of one layer is two arrays of n_blocks blocks of block_rows rows of kv_dim
 * floats (K and V); row r of block b is at (b * block_rows + r) * kv_dim. A sequence's position p
 * is in block tables[tab_off[t] + p / block_rows], row p % block_rows.
 */

/* Writes k[t], v[t] (kv_dim floats each) to row dst_row[t] (= block * block_rows + row) of the
 * layer's caches, for n_tok tokens. */
int kern_cuda_kv_write(struct kern_cuda *c, float *k_cache, float *v_cache, const float *k,
                       const float *v, const int32_t *dst_row, int n_tok, int kv_dim);

struct kern_cuda_attn {
    float *out;             /* (n_tok, n_head * head_dim) */
    const float *q;         /* (n_tok, n_head * head_dim), RoPE applied */
    const float *k_cache;   /* this layer's K blocks (layout above) */
    const float *v_cache;   /* this layer's V blocks */
    const int32_t *tables;  /* block ids, device */
    const int32_t *tab_off; /* (n_tok) start of token t's sequence table in tables */
    const int32_t *pos;     /* (n_tok) token t attends to positions 0..pos[t] */
    int n_tok;
    int n_head;
    int n_head_kv;
    int head_dim; /* even, at most KERN_CUDA_MAX_HEAD_DIM */
    int block_rows;
    float scale;
};

/* Causal grouped-query attention over the paged cache: out[t, h] = sum_p softmax_p(scale * q[t,h]
 * . k_p) v_p with k_p, v_p of KV head h / (n_head / n_head_kv). */
int kern_cuda_attention(struct kern_cuda *c, const struct kern_cuda_attn *a);

#ifdef __cplusplus
}
#endif

#endif

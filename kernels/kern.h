/*
 * kern: the compute kernels the engine calls, and the thread pool they run on.
 *
 * The CPU backend (kernels/cpu/) has a scalar reference for each kernel (`_ref`, the definition of
 * the result) and AVX2 / AVX-512 versions picked at run time from the CPU's features. A
 * struct kern_pool is a persistent set of worker threads; kern_pool_run hands every thread the same
 * task and returns when all have finished. Matmuls split their output rows across the pool's
 * threads and read each weight row once for all rows of the activation batch.
 *
 * Thread context: one thread (the caller of kern_pool_run, e.g. the engine's forward pass) drives a
 * pool; kernels called with a pool must not be called concurrently on the same pool. Functions that
 * take no pool are reentrant.
 */
#ifndef KERN_KERN_H
#define KERN_KERN_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/quant.h"

/* ---- Instruction set selection ---- */

enum kern_isa {
    KERN_ISA_SCALAR = 0, /* the _ref kernels */
    KERN_ISA_AVX2 = 1,   /* AVX2 + FMA + F16C */
    KERN_ISA_AVX512 = 2, /* AVX-512 F/BW/VL + VNNI */
};

/* The best ISA this CPU supports. */
enum kern_isa kern_cpu_best_isa(void);

/* The ISA the kernels use now: the best one, or the env var LLM_ISA=scalar|avx2|avx512 if set and
 * supported. Not thread-safe with running kernels. */
enum kern_isa kern_cpu_isa(void);

/* Forces an ISA (tests compare each against the reference). Returns 0, or -ENOTSUP when the CPU
 * lacks it. Not thread-safe with running kernels. */
int kern_cpu_set_isa(enum kern_isa isa);

const char *kern_isa_name(enum kern_isa isa);

/* ---- Thread pool ---- */

struct kern_pool;

/* A task: called once for each ith = 0..nth-1, normally each on its own thread (the caller of
 * kern_pool_run is ith 0). An ith that no worker has picked up by the time the caller is done with
 * its own runs on the caller instead (a worker may have lost its core), so the iths of a task must
 * never wait for each other. */
typedef void (*kern_task_fn)(void *ctx, int ith, int nth);

/* Starts n_threads - 1 workers (the caller is the n-th). Returns 0, -EINVAL, or -ENOMEM/-EAGAIN. */
int kern_pool_new(int n_threads, struct kern_pool **out);

/* Stops and joins the workers. NULL is a no-op. */
void kern_pool_free(struct kern_pool *pool);

int kern_pool_n_threads(const struct kern_pool *pool);

/* Runs fn on every thread of the pool and returns when all have returned. Workers spin briefly
 * between tasks before sleeping, so back-to-back calls are cheap. */
void kern_pool_run(struct kern_pool *pool, kern_task_fn fn, void *ctx);

/* ---- Rows ---- */

/* Dequantizes n elements (a multiple of the type's block size) of one row to f32.
 * Returns 0, or -EINVAL for an unsupported type or bad n. */
int kern_dequant_row(enum kern_dtype type, const void *src, float *dst, int64_t n);

/* Quantizes n f32 values (a multiple of the block size) into one row of type (every type the
 * kernels support, for tests and generated test models; simple scale choice, not ggml's search).
 * Returns 0 or -EINVAL. */
int kern_quantize_row(enum kern_dtype type, const float *src, void *dst, int64_t n);

/* ---- Matrix multiplication ---- */

/*
 * A weight matrix as stored in GGUF: n_out rows of n_in elements, each row row_bytes long
 * (kern_row_bytes(type, n_in)). data is borrowed (usually the mmapped file) and must outlive it.
 */
struct kern_matrix {
    enum kern_dtype type;
    int64_t n_in;
    int64_t n_out;
    size_t row_bytes;
    const void *data;
    /* Optional (NULL: none): the rows re-laid out by kern_matrix_repack for the small-batch
     * (decode) kernels; owned by whoever called kern_matrix_repack. data stays in use. */
    const void *packed;
};

/*
 * Re-lays out w's rows for the decode kernels of the best ISA this CPU has (AVX-512: Q4_0, Q4_1
 * and Q8_0 as interleaved groups of 16 rows, kernels/cpu/pack.c) into a new buffer that w->packed
 * points at. Matmuls of fewer tokens than the ISA's batch kernel takes then read the packed copy,
 * with results bit-identical to the unpacked ones. Returns 1 when packed, 0 when the type or CPU
 * has no packed layout (w unchanged), or -ENOMEM / -EINVAL. Free with kern_matrix_unpack.
 */
int kern_matrix_repack(struct kern_matrix *w);

/* Frees w->packed (if any) and sets it to NULL. */
void kern_matrix_unpack(struct kern_matrix *w);

/* Checks that the matrix can be used by kern_matmul: supported type, n_in a multiple of the block
 * size. Returns 0 or -EINVAL / -ENOTSUP. */
int kern_matrix_check(const struct kern_matrix *w);

/*
 * y[t * n_out + o] = sum_k W[o][k] * x[t * n_in + k] for t < n_tok, o < n_out.
 * Activations are quantized internally (8-bit blocks) for the quantized weight types, as ggml does,
 * so results match kern_matmul_ref within the tolerance of that quantization.
 * Scratch memory lives in the pool and grows as needed. Returns 0 or -ENOMEM.
 */
int kern_matmul(struct kern_pool *pool, const struct kern_matrix *w, const float *x, int n_tok,
                float *y);

/*
 * n_w products of the same x: y[i] = w[i] x, each bit-identical to kern_matmul(pool, w[i], x,
 * n_tok, y[i]). When the matrices share type and n_in (e.g. a layer's q, k and v) the activations
 * are quantized once and the rows of all matrices are handed out in one pool run (one wake-up and
 * one wait instead of n_w). Every w[i] must have n_in == the row length of x. Returns 0, -EINVAL
 * or -ENOMEM (some y[i] may then be written).
 */
int kern_matmul_multi(struct kern_pool *pool, const struct kern_matrix *const *w, int n_w,
                      const float *x, int n_tok, float *const *y);

/* The same product computed with dequantized f32 weights and f32 activations in double precision
 * accumulators, single-threaded: the reference the tests compare against. */
int kern_matmul_ref(const struct kern_matrix *w, const float *x, int n_tok, float *y);

/* ---- Attention ---- */

/*
 * Attention of a group of n_q query heads that share one KV head, over n_kv cached positions held
 * in blocks of block_rows rows (the paged KV cache): position p's key is the row
 * k_blocks[p / block_rows] + (p % block_rows) * stride (floats), its value likewise in v_blocks.
 * For each query head j: out[j*head_dim ..] = sum_p softmax_p(scale * q_j . k_p) v_p.
 * q and out hold n_q * head_dim floats (head-major); scratch holds n_q * n_kv floats.
 * A contiguous cache is one block with block_rows >= n_kv. Reentrant (one call per thread).
 */
void kern_attn_f32(float *out, const float *q, const float *const *k_blocks,
                   const float *const *v_blocks, int block_rows, int n_kv, int n_q, int head_dim,
                   size_t stride, float scale, float *scratch);
void kern_attn_f32_ref(float *out, const float *q, const float *const *k_blocks,
                       const float *const *v_blocks, int block_rows, int n_kv, int n_q,
                       int head_dim, size_t stride, float scale, float *scratch);

/* ---- Element-wise ops (f32, one row each; reentrant) ---- */

/* out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i]. out may alias x. */
void kern_rmsnorm(float *out, const float *x, const float *w, int n, float eps);

/* out[i] = silu(gate[i]) * up[i]. out may alias gate. */
void kern_swiglu(float *out, const float *gate, const float *up, int n);

/* y[i] += x[i]. */
void kern_add(float *y, const float *x, int n);

/* In-place softmax of n values; returns the maximum. */
float kern_softmax(float *x, int n);

#endif

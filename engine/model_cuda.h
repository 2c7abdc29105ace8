/*
 * model_cuda: the forward pass of engine/model.h on a CUDA device (the `--backend cuda` of
 * llm-engine, llm-run and llm-bench).
 *
 * eng_cuda_fwd_new uploads every weight matrix and norm of a loaded struct eng_model once and
 * allocates the device KV cache: n_kv_blocks blocks of ENG_KV_BLOCK positions, the same block ids
 * as the host struct eng_kv_pool the caller allocates and schedules with (engine/kv.h). The host
 * pool keeps doing the bookkeeping (block tables, free list); its K/V memory is simply not used by
 * this backend. The layer sequence, RoPE convention, biases and tied output are those of the CPU
 * forward pass; the numerics differ as kernels/cuda/kern_cuda.h says (f32 activations in decode
 * matvecs, f16 GEMM inputs in prefill, f32 KV cache).
 *
 * Each call runs on one stream: the batch's tokens, positions and block tables go up in one copy,
 * the logits come back in one copy per chunk of rows, and the call returns when the device is done.
 *
 * Builds: the file compiles in both builds. Without CUDA (the CPU build) every function returns
 * -ENOTSUP and eng_cuda_available says so, so the binaries need no #ifdef to reject
 * `--backend cuda`.
 *
 * Ownership and threads: the model must outlive the eng_cuda_fwd; one thread at a time uses it.
 */
#ifndef ENG_MODEL_CUDA_H
#define ENG_MODEL_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"

struct eng_cuda_fwd;

/* 0 when the CUDA backend can run: this is a CUDA build and a device is present (msg gets its
 * name). -ENOTSUP (a build without CUDA) or -ENODEV (no usable device: no driver, "CUDA driver
 * version is insufficient", no GPU): msg gets a one-line explanation for the user. */
int eng_cuda_available(char *msg, size_t msg_len);

/* Uploads m and allocates scratch for batches of up to n_batch tokens over sequences of up to
 * n_ctx positions, and a device KV cache of n_kv_blocks blocks. Returns 0, -EINVAL, -ENOTSUP (no
 * CUDA build, or a weight the CUDA kernels cannot use), -ENODEV, -ENOMEM (device memory) or -EIO.
 */
int eng_cuda_fwd_new(const struct eng_model *m, int n_batch, int n_ctx, int n_kv_blocks,
                     struct eng_cuda_fwd **out);
void eng_cuda_fwd_free(struct eng_cuda_fwd *f);

/* eng_forward_batch on the device: same batch contract, block ids from b->seqs[i]->table (they
 * must be below n_kv_blocks). Returns 0, -EINVAL, -ENOMEM or -EIO. */
int eng_cuda_forward_batch(struct eng_cuda_fwd *f, const struct eng_batch *b, float *logits);

/* eng_forward on the device for one sequence; kv's host pool provides the block ids (it must have
 * at most n_kv_blocks blocks). Same return codes as eng_forward, plus -EIO. */
int eng_cuda_forward(struct eng_cuda_fwd *f, struct eng_kv *kv, const int32_t *tokens, int n_tokens,
                     float *logits, bool all_logits);

/* Device memory bandwidth in GB/s (device-to-device copies of bytes, best of reps), for the bench's
 * bandwidth floor. 0 when unavailable. */
double eng_cuda_measure_bw(struct eng_cuda_fwd *f, size_t bytes, int reps);

#endif

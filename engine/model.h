/*
 * model: a llama-family transformer (Llama 2/3, SmolLM2, TinyLlama, Mistral; Qwen2 with attention
 * biases) loaded from a validated GGUF file, and its forward pass over a batch of tokens.
 *
 * eng_model_load checks the hyper-parameters and every tensor (presence, shape, type) and keeps
 * pointers into the GGUF mapping: the weights are never copied. The forward pass per layer:
 * RMSNorm -> Q,K,V (+bias) -> RoPE (the file's theta; adjacent pairs for "llama", halves for
 * "qwen2") -> K,V appended to the KV cache -> causal grouped-query attention -> output projection
 * -> residual -> RMSNorm -> SwiGLU FFN -> residual; then the final RMSNorm and the output head
 * (tied to the token embedding when the file has no output.weight).
 *
 * Ownership: the model borrows the struct eng_gguf (which must outlive it). K and V live in the
 * paged cache of engine/kv.h; eng_forward_batch runs a batch mixing tokens of many sequences, and
 * eng_forward is the one-sequence convenience on a struct eng_kv. A struct eng_fwd owns the scratch
 * buffers of a forward pass and borrows a thread pool. A model is
 * read-only after load and can be shared; an eng_fwd and an eng_kv are used by one thread at a
 * time.
 */
#ifndef ENG_MODEL_H
#define ENG_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kern.h"

struct eng_gguf;
struct kern_pool;

enum eng_arch {
    ENG_ARCH_LLAMA = 1,
    ENG_ARCH_QWEN2 = 2,
};

enum eng_rope_type {
    ENG_ROPE_NORM = 0, /* rotate (x[2i], x[2i+1]) */
    ENG_ROPE_NEOX = 2, /* rotate (x[i], x[i + head_dim/2]) */
};

struct eng_hparams {
    enum eng_arch arch;
    enum eng_rope_type rope_type;
    int n_vocab;
    int n_ctx_train;
    int n_embd;
    int n_layer;
    int n_head;
    int n_head_kv;
    int head_dim;
    int n_ff;
    int n_rot; /* rotated dims per head (rope.dimension_count, default head_dim) */
    float rope_theta;
    float rms_eps;
};

struct eng_layer {
    const float *attn_norm;            /* (n_embd) */
    struct kern_matrix wq, wk, wv, wo; /* (n_embd -> n_head*hd), (-> kv_dim) x2, (-> n_embd) */
    const float *bq, *bk, *bv;         /* qwen2 biases or NULL */
    const float *ffn_norm;             /* (n_embd) */
    struct kern_matrix w_gate, w_up, w_down; /* (n_embd -> n_ff) x2, (n_ff -> n_embd) */
};

struct eng_model {
    struct eng_hparams hp;
    char name[128];              /* general.name, or the file's basename */
    struct kern_matrix tok_embd; /* (n_vocab rows of n_embd) */
    const float *output_norm;    /* (n_embd) */
    struct kern_matrix output;   /* (n_vocab rows of n_embd); == tok_embd when tied */
    bool tied_output;
    struct eng_layer *layers;    /* (n_layer) */
    const struct eng_gguf *gguf; /* borrowed */
};

/* Loads the model from g. Returns 0, -EBADMSG (a missing tensor, wrong shape or type, or
 * inconsistent hyper-parameters: one-line message in err), -ENOTSUP (an architecture or tensor
 * type we do not run) or -ENOMEM. */
int eng_model_load(const struct eng_gguf *g, struct eng_model **out, char *err, size_t err_len);
void eng_model_free(struct eng_model *m);

/* Bytes of weights read per generated token (every matrix once plus the norms): the bandwidth
 * floor's numerator. */
size_t eng_model_weight_bytes(const struct eng_model *m);

/* ---- KV cache of one sequence (a paged pool of its own; for llm-run, benches, tests) ---- */

struct eng_kv {
    int n_ctx;  /* capacity in tokens */
    int n_past; /* tokens stored; the next token's position */
    struct eng_kv_pool *pool;
    struct eng_kv_seq *seq;
};

/* Returns 0, -EINVAL (n_ctx < 1) or -ENOMEM. */
int eng_kv_new(const struct eng_model *m, int n_ctx, struct eng_kv **out);
void eng_kv_free(struct eng_kv *kv);

/* ---- Batched forward pass over the paged KV cache ---- */

struct eng_fwd;
struct eng_kv_pool;
struct eng_kv_seq;

/* Scratch for batches of up to n_batch tokens over sequences of up to n_ctx positions. pool is
 * borrowed. Returns 0, -EINVAL or -ENOMEM. */
int eng_fwd_new(const struct eng_model *m, struct kern_pool *pool, int n_batch, int n_ctx,
                struct eng_fwd **out);
void eng_fwd_free(struct eng_fwd *f);

/*
 * One step of continuous batching: tokens of several sequences (decode tokens and prefill chunks
 * mixed). Token i belongs to seqs[i] at position pos[i]; its K and V are written there, and it
 * attends to positions 0..pos[i] of its sequence, which must have been written earlier or be in
 * this batch. The caller has reserved blocks for every position (eng_kv_seq_reserve) and advances
 * each sequence's n_tokens after the call. Logits are produced for the n_logits tokens listed in
 * logits_idx (indices into the batch), in that order.
 */
struct eng_batch {
    int n_tokens;
    const int32_t *tokens;          /* (n_tokens) */
    const int32_t *pos;             /* (n_tokens) */
    struct eng_kv_seq *const *seqs; /* (n_tokens) */
    int n_logits;
    const int32_t *logits_idx; /* (n_logits) */
};

/*
 * Runs the batch through the model; writes (n_logits, n_vocab) floats to logits. Batches larger
 * than the eng_fwd's n_batch are -EINVAL (the scheduler sizes them). Returns 0, -EINVAL (bad token
 * id, position or missing block) or -ENOMEM.
 */
int eng_forward_batch(struct eng_fwd *f, struct eng_kv_pool *kv, const struct eng_batch *b,
                      float *logits);

/* ---- Forward pass of one sequence ---- */

/*
 * Runs n_tokens tokens of one sequence at positions kv->n_past.. through the model, appending
 * their K and V to kv (kv->n_past advances by n_tokens). Batches larger than the eng_fwd's n_batch
 * are split. Logits: when logits is not NULL, writes (n_vocab) floats for the last token, or for
 * every token ((n_tokens, n_vocab)) when all_logits is set.
 * Returns 0, -EINVAL (a token id outside the vocabulary), -E2BIG (the cache is full) or -ENOMEM.
 * On error kv is unchanged.
 */
int eng_forward(struct eng_fwd *f, struct eng_kv *kv, const int32_t *tokens, int n_tokens,
                float *logits, bool all_logits);

#endif

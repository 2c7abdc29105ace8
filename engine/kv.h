/*
 * kv: the paged KV cache. One pool of fixed-size blocks (ENG_KV_BLOCK tokens each) holds the keys
 * and values of every sequence; a sequence owns a block table (struct eng_kv_seq) listing its
 * blocks in position order. Position p of a sequence lives in block table[p / ENG_KV_BLOCK], row
 * p % ENG_KV_BLOCK.
 *
 * Layout (f32): for block b and layer l, the K rows are ENG_KV_BLOCK x kv_dim floats at
 * eng_kv_k(pool, b, l), the V rows likewise at eng_kv_v(pool, b, l). The pool only hands out
 * that region; the forward pass (engine/model.c) stores it head-major: KV head h's row r (its
 * head_dim floats) at eng_kv_head_row(h, r, head_dim) = (h * ENG_KV_BLOCK + r) * head_dim, so that one head's keys of a block are
 * one contiguous run (4 KiB for head_dim 64) which attention streams, instead of 256 bytes out of
 * every kv_dim-float row.
 *
 * Ownership and threads: the pool owns all K/V memory and the free list; block tables are owned by
 * their sequences but their blocks come from and return to the pool. Allocation and release happen
 * on one thread (the engine loop / scheduler); the forward pass reads and writes rows of blocks it
 * was handed, from the compute pool's threads, never the free list.
 */
#ifndef ENG_KV_H
#define ENG_KV_H

#include <stddef.h>
#include <stdint.h>

#define ENG_KV_BLOCK 16

struct eng_kv_pool;

struct eng_kv_seq {
    int n_tokens;   /* positions written so far (the next token's position) */
    int n_blocks;   /* blocks held */
    int cap_blocks; /* capacity of table */
    int32_t *table; /* (cap_blocks) block ids, position order */
};

/* A pool of n_blocks blocks for a model with n_layer layers and kv_dim = n_head_kv * head_dim.
 * Returns 0, -EINVAL or -ENOMEM. */
int eng_kv_pool_new(int n_layer, int kv_dim, int n_blocks, struct eng_kv_pool **out);
void eng_kv_pool_free(struct eng_kv_pool *pool);

/* Blocks a budget of mb MiB buys (at least 1). */
int eng_kv_blocks_for_mb(int n_layer, int kv_dim, size_t mb);

int eng_kv_pool_n_blocks(const struct eng_kv_pool *pool);
int eng_kv_pool_n_free(const struct eng_kv_pool *pool);
size_t eng_kv_pool_block_bytes(const struct eng_kv_pool *pool);

/* Row pointers: block b, layer l; ENG_KV_BLOCK rows of kv_dim floats. */
float *eng_kv_k(const struct eng_kv_pool *pool, int32_t b, int l);
float *eng_kv_v(const struct eng_kv_pool *pool, int32_t b, int l);

/* Sequence block tables. _init gives an empty table; _reserve makes room for n_tokens positions in
 * total (allocating blocks as needed; all or nothing): 0, or -ENOSPC when the pool has too few
 * free blocks (nothing changes), -ENOMEM. _release returns every block to the pool and empties the
 * table; _fini releases and frees the table. */
void eng_kv_seq_init(struct eng_kv_seq *s);
int eng_kv_seq_reserve(struct eng_kv_pool *pool, struct eng_kv_seq *s, int n_tokens);
void eng_kv_seq_release(struct eng_kv_pool *pool, struct eng_kv_seq *s);
void eng_kv_seq_fini(struct eng_kv_pool *pool, struct eng_kv_seq *s);

/* Blocks needed to hold n_tokens positions. */
static inline int
eng_kv_blocks_for(int n_tokens)
{
    return (n_tokens + ENG_KV_BLOCK - 1) / ENG_KV_BLOCK;
}

/* Offset in floats, from eng_kv_k / eng_kv_v of a block and layer, of KV head h's row r in the
 * head-major layout above. */
static inline size_t
eng_kv_head_row(int h, int r, int head_dim)
{
    return ((size_t)h * ENG_KV_BLOCK + (size_t)r) * (size_t)head_dim;
}

#endif

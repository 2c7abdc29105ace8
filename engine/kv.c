#include "engine/kv.h"

#include <errno.h>
#include <stdlib.h>

#include "common/cm_util.h"

struct eng_kv_pool {
    int n_layer;
    int kv_dim;
    int n_blocks;
    int n_free;
    int32_t *free_list;  /* (n_blocks) stack of free block ids; the top is free_list[n_free - 1] */
    size_t block_floats; /* n_layer * ENG_KV_BLOCK * kv_dim: one block's K (or V) */
    float *k;            /* (n_blocks, n_layer, ENG_KV_BLOCK, kv_dim) */
    float *v;
};

int
eng_kv_pool_new(int n_layer, int kv_dim, int n_blocks, struct eng_kv_pool **out)
{
    if (n_layer < 1 || kv_dim < 1 || n_blocks < 1)
        return -EINVAL;
    struct eng_kv_pool *p = cm_xcalloc(1, sizeof(*p));
    p->n_layer = n_layer;
    p->kv_dim = kv_dim;
    p->n_blocks = n_blocks;
    p->block_floats = (size_t)n_layer * ENG_KV_BLOCK * (size_t)kv_dim;
    p->free_list = malloc((size_t)n_blocks * sizeof(int32_t));
    p->k = malloc((size_t)n_blocks * p->block_floats * sizeof(float));
    p->v = malloc((size_t)n_blocks * p->block_floats * sizeof(float));
    if (!p->free_list || !p->k || !p->v) {
        eng_kv_pool_free(p);
        return -ENOMEM;
    }
    /* Lowest ids on top, so a fresh pool hands out blocks 0, 1, 2, ... */
    for (int i = 0; i < n_blocks; i++)
        p->free_list[i] = n_blocks - 1 - i;
    p->n_free = n_blocks;
    *out = p;
    return 0;
}

void
eng_kv_pool_free(struct eng_kv_pool *p)
{
    if (!p)
        return;
    free(p->free_list);
    free(p->k);
    free(p->v);
    free(p);
}

int
eng_kv_blocks_for_mb(int n_layer, int kv_dim, size_t mb)
{
    size_t block_bytes = 2 * (size_t)n_layer * ENG_KV_BLOCK * (size_t)kv_dim * sizeof(float);
    size_t n = (mb << 20) / block_bytes;
    if (n < 1)
        n = 1;
    if (n > (1u << 30))
        n = 1u << 30;
    return (int)n;
}

int
eng_kv_pool_n_blocks(const struct eng_kv_pool *p)
{
    return p->n_blocks;
}

int
eng_kv_pool_n_free(const struct eng_kv_pool *p)
{
    return p->n_free;
}

size_t
eng_kv_pool_block_bytes(const struct eng_kv_pool *p)
{
    return 2 * p->block_floats * sizeof(float);
}

float *
eng_kv_k(const struct eng_kv_pool *p, int32_t b, int l)
{
    return p->k + (size_t)b * p->block_floats + (size_t)l * ENG_KV_BLOCK * (size_t)p->kv_dim;
}

float *
eng_kv_v(const struct eng_kv_pool *p, int32_t b, int l)
{
    return p->v + (size_t)b * p->block_floats + (size_t)l * ENG_KV_BLOCK * (size_t)p->kv_dim;
}

void
eng_kv_seq_init(struct eng_kv_seq *s)
{
    s->n_tokens = 0;
    s->n_blocks = 0;
    s->cap_blocks = 0;
    s->table = NULL;
}

int
eng_kv_seq_reserve(struct eng_kv_pool *p, struct eng_kv_seq *s, int n_tokens)
{
    if (n_tokens < 0)
        return -EINVAL;
    int need = eng_kv_blocks_for(n_tokens) - s->n_blocks;
    if (need <= 0)
        return 0;
    if (need > p->n_free)
        return -ENOSPC;
    if (s->n_blocks + need > s->cap_blocks) {
        int cap = s->cap_blocks ? s->cap_blocks : 4;
        while (cap < s->n_blocks + need)
            cap *= 2;
        int32_t *t = realloc(s->table, (size_t)cap * sizeof(*t));
        if (!t)
            return -ENOMEM;
        s->table = t;
        s->cap_blocks = cap;
    }
    for (int i = 0; i < need; i++)
        s->table[s->n_blocks++] = p->free_list[--p->n_free];
    return 0;
}

void
eng_kv_seq_release(struct eng_kv_pool *p, struct eng_kv_seq *s)
{
    /* Push in reverse so the sequence's first block is reused first. */
    for (int i = s->n_blocks - 1; i >= 0; i--)
        p->free_list[p->n_free++] = s->table[i];
    s->n_blocks = 0;
    s->n_tokens = 0;
}

void
eng_kv_seq_fini(struct eng_kv_pool *p, struct eng_kv_seq *s)
{
    eng_kv_seq_release(p, s);
    free(s->table);
    s->table = NULL;
    s->cap_blocks = 0;
}

/*
 * model_cuda: the device forward pass (contract in model_cuda.h). In the CPU build (no LLM_CUDA)
 * only the stubs at the end are compiled.
 */
#include "engine/model_cuda.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv.h"

#ifdef LLM_CUDA

#include <math.h>

#include "common/cm_log.h"
#include "common/cm_util.h"
#include "kernels/cuda/kern_cuda.h"

/* Rows of logits computed (and copied back) per output-head matmul. */
#define LOGIT_ROWS 256

struct cuda_layer {
    float *attn_norm, *ffn_norm; /* (n_embd) */
    float *bq, *bk, *bv;         /* biases or NULL */
    struct kern_cuda_matrix wq, wk, wv, wo, w_gate, w_up, w_down;
};

struct eng_cuda_fwd {
    const struct eng_model *m;
    struct kern_cuda *kc;
    int n_batch, n_ctx, n_blocks;
    int max_blocks; /* blocks of one sequence of n_ctx positions */
    int logit_rows; /* min(n_batch, LOGIT_ROWS) */
    struct kern_cuda_matrix tok_embd, output;
    float *output_norm;        /* (n_embd) */
    struct cuda_layer *layers; /* (n_layer) */
    float *k_cache, *v_cache;  /* (n_layer, n_blocks * ENG_KV_BLOCK, kv_dim) */
    /* Activations, device: */
    float *x, *xb;      /* (n_batch, n_embd) residual stream, normed input */
    float *q, *att;     /* (n_batch, n_head * head_dim) */
    float *k, *v;       /* (n_batch, kv_dim) */
    float *tmp;         /* (n_batch, n_embd) */
    float *hb, *hb2;    /* (n_batch, n_ff) */
    float *logits;      /* (logit_rows, n_vocab) */
    float *freq;        /* (n_rot / 2) */
    int32_t *meta;      /* device copy of meta_host */
    int32_t *meta_host; /* page-locked: the batch description (layout in build_meta) */
    size_t meta_cap;    /* int32s */
    /* eng_cuda_forward's batch description (host): */
    int32_t *pos;
    struct eng_kv_seq **seqs;
    int32_t *logits_idx;
};

/* ---- Set-up ---- */

static int
upload_vec(struct eng_cuda_fwd *f, const float *host, int n, float **out)
{
    *out = NULL;
    if (!host)
        return 0;
    void *d = NULL;
    size_t bytes = (size_t)n * sizeof(float);
    int rc = kern_cuda_alloc(f->kc, bytes, &d);
    if (rc < 0)
        return rc;
    *out = d;
    return kern_cuda_upload(f->kc, d, host, bytes);
}

static int
upload_layer(struct eng_cuda_fwd *f, const struct eng_layer *l, struct cuda_layer *d)
{
    const struct eng_hparams *hp = &f->m->hp;
    int q_dim = hp->n_head * hp->head_dim, kv_dim = hp->n_head_kv * hp->head_dim;
    int rc;
    if ((rc = upload_vec(f, l->attn_norm, hp->n_embd, &d->attn_norm)) < 0 ||
        (rc = upload_vec(f, l->ffn_norm, hp->n_embd, &d->ffn_norm)) < 0 ||
        (rc = upload_vec(f, l->bq, q_dim, &d->bq)) < 0 ||
        (rc = upload_vec(f, l->bk, kv_dim, &d->bk)) < 0 ||
        (rc = upload_vec(f, l->bv, kv_dim, &d->bv)) < 0 ||
        (rc = kern_cuda_matrix_upload(f->kc, &l->wq, &d->wq)) < 0 ||
        (rc = kern_cuda_matrix_upload(f->kc, &l->wk, &d->wk)) < 0 ||
        (rc = kern_cuda_matrix_upload(f->kc, &l->wv, &d->wv)) < 0 ||
        (rc = kern_cuda_matrix_upload(f->kc, &l->wo, &d->wo)) < 0 ||
        (rc = kern_cuda_matrix_upload(f->kc, &l->w_gate, &d->w_gate)) < 0 ||
        (rc = kern_cuda_matrix_upload(f->kc, &l->w_up, &d->w_up)) < 0 ||
        (rc = kern_cuda_matrix_upload(f->kc, &l->w_down, &d->w_down)) < 0)
        return rc;
    return 0;
}

static int
dalloc(struct eng_cuda_fwd *f, size_t n_floats, float **out)
{
    void *p = NULL;
    int rc = kern_cuda_alloc(f->kc, n_floats * sizeof(float), &p);
    if (rc == 0)
        *out = p;
    return rc;
}

static int
alloc_buffers(struct eng_cuda_fwd *f)
{
    const struct eng_hparams *hp = &f->m->hp;
    size_t nb = (size_t)f->n_batch, q_dim = (size_t)hp->n_head * (size_t)hp->head_dim;
    size_t kv_dim = (size_t)hp->n_head_kv * (size_t)hp->head_dim;
    size_t cache = (size_t)hp->n_layer * (size_t)f->n_blocks * ENG_KV_BLOCK * kv_dim;
    int rc;
    if ((rc = dalloc(f, cache, &f->k_cache)) < 0 || (rc = dalloc(f, cache, &f->v_cache)) < 0 ||
        (rc = dalloc(f, nb * (size_t)hp->n_embd, &f->x)) < 0 ||
        (rc = dalloc(f, nb * (size_t)hp->n_embd, &f->xb)) < 0 ||
        (rc = dalloc(f, nb * q_dim, &f->q)) < 0 || (rc = dalloc(f, nb * q_dim, &f->att)) < 0 ||
        (rc = dalloc(f, nb * kv_dim, &f->k)) < 0 || (rc = dalloc(f, nb * kv_dim, &f->v)) < 0 ||
        (rc = dalloc(f, nb * (size_t)hp->n_embd, &f->tmp)) < 0 ||
        (rc = dalloc(f, nb * (size_t)hp->n_ff, &f->hb)) < 0 ||
        (rc = dalloc(f, nb * (size_t)hp->n_ff, &f->hb2)) < 0 ||
        (rc = dalloc(f, (size_t)f->logit_rows * (size_t)hp->n_vocab, &f->logits)) < 0 ||
        (rc = dalloc(f, (size_t)hp->n_rot / 2, &f->freq)) < 0)
        return rc;
    /* tokens, pos, dst_row, tab_off, logits_idx: n_batch each; tables: n_batch * max_blocks. */
    f->meta_cap = 5 * nb + nb * (size_t)f->max_blocks;
    void *p = NULL;
    if ((rc = kern_cuda_alloc(f->kc, f->meta_cap * sizeof(int32_t), &p)) < 0)
        return rc;
    f->meta = p;
    if ((rc = kern_cuda_host_alloc(f->meta_cap * sizeof(int32_t), &p)) < 0)
        return rc;
    f->meta_host = p;
    f->pos = malloc(nb * sizeof(*f->pos));
    f->seqs = malloc(nb * sizeof(*f->seqs));
    f->logits_idx = malloc(nb * sizeof(*f->logits_idx));
    if (!f->pos || !f->seqs || !f->logits_idx)
        return -ENOMEM;
    /* The same frequencies as the CPU forward pass, computed the same way on the host. */
    float *freq = malloc((size_t)hp->n_rot / 2 * sizeof(float));
    if (!freq)
        return -ENOMEM;
    for (int j = 0; j < hp->n_rot / 2; j++)
        freq[j] = powf(hp->rope_theta, -2.0f * (float)j / (float)hp->n_rot);
    rc = kern_cuda_upload(f->kc, f->freq, freq, (size_t)hp->n_rot / 2 * sizeof(float));
    if (rc == 0)
        rc = kern_cuda_sync(f->kc);
    free(freq);
    return rc;
}

int
eng_cuda_available(char *msg, size_t msg_len)
{
    char name[256] = "";
    int rc = kern_cuda_probe(name, sizeof(name));
    if (msg && msg_len)
        snprintf(msg, msg_len, "%s",
                 rc == 0 ? name
                         : "no CUDA device is usable here (cudaGetDeviceCount failed or found "
                           "none: no GPU, or no driver matching this CUDA runtime)");
    return rc;
}

int
eng_cuda_fwd_new(const struct eng_model *m, int n_batch, int n_ctx, int n_kv_blocks,
                 struct eng_cuda_fwd **out)
{
    const struct eng_hparams *hp = &m->hp;
    if (n_batch < 1 || n_ctx < 1 || n_kv_blocks < 1 || hp->head_dim > KERN_CUDA_MAX_HEAD_DIM)
        return -EINVAL;
    struct eng_cuda_fwd *f = cm_xcalloc(1, sizeof(*f));
    f->m = m;
    f->n_batch = n_batch;
    f->n_ctx = n_ctx;
    f->n_blocks = n_kv_blocks;
    f->max_blocks = eng_kv_blocks_for(n_ctx);
    f->logit_rows = n_batch < LOGIT_ROWS ? n_batch : LOGIT_ROWS;
    int rc = kern_cuda_new(&f->kc);
    if (rc < 0)
        goto fail;
    f->layers = cm_xcalloc((size_t)hp->n_layer, sizeof(*f->layers));
    if ((rc = kern_cuda_matrix_upload(f->kc, &m->tok_embd, &f->tok_embd)) < 0 ||
        (!m->tied_output && (rc = kern_cuda_matrix_upload(f->kc, &m->output, &f->output)) < 0) ||
        (rc = upload_vec(f, m->output_norm, hp->n_embd, &f->output_norm)) < 0)
        goto fail;
    for (int il = 0; il < hp->n_layer; il++) {
        if ((rc = upload_layer(f, &m->layers[il], &f->layers[il])) < 0)
            goto fail;
    }
    if ((rc = alloc_buffers(f)) < 0)
        goto fail;
    CM_LOG(CM_LOG_INFO, "cuda forward ready n_batch=%d n_ctx=%d kv_blocks=%d", n_batch, n_ctx,
           n_kv_blocks);
    *out = f;
    return 0;
fail:
    eng_cuda_fwd_free(f);
    return rc;
}

static void
free_layer(struct kern_cuda *kc, struct cuda_layer *d)
{
    kern_cuda_dfree(kc, d->attn_norm);
    kern_cuda_dfree(kc, d->ffn_norm);
    kern_cuda_dfree(kc, d->bq);
    kern_cuda_dfree(kc, d->bk);
    kern_cuda_dfree(kc, d->bv);
    kern_cuda_matrix_free(kc, &d->wq);
    kern_cuda_matrix_free(kc, &d->wk);
    kern_cuda_matrix_free(kc, &d->wv);
    kern_cuda_matrix_free(kc, &d->wo);
    kern_cuda_matrix_free(kc, &d->w_gate);
    kern_cuda_matrix_free(kc, &d->w_up);
    kern_cuda_matrix_free(kc, &d->w_down);
}

void
eng_cuda_fwd_free(struct eng_cuda_fwd *f)
{
    if (!f)
        return;
    struct kern_cuda *kc = f->kc;
    if (kc) {
        for (int il = 0; f->layers && il < f->m->hp.n_layer; il++)
            free_layer(kc, &f->layers[il]);
        kern_cuda_matrix_free(kc, &f->tok_embd);
        kern_cuda_matrix_free(kc, &f->output);
        float *bufs[] = {f->output_norm, f->k_cache, f->v_cache, f->x,  f->xb,  f->q,      f->att,
                         f->k,           f->v,       f->tmp,     f->hb, f->hb2, f->logits, f->freq};
        for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
            kern_cuda_dfree(kc, bufs[i]);
        kern_cuda_dfree(kc, f->meta);
        kern_cuda_host_free(f->meta_host);
        kern_cuda_free(kc);
    }
    free(f->layers);
    free(f->pos);
    free(f->seqs);
    free(f->logits_idx);
    free(f);
}

double
eng_cuda_measure_bw(struct eng_cuda_fwd *f, size_t bytes, int reps)
{
    return kern_cuda_measure_bw(f->kc, bytes, reps);
}

/* ---- Forward pass ---- */

static int
check_batch(const struct eng_cuda_fwd *f, const struct eng_batch *b)
{
    const struct eng_hparams *hp = &f->m->hp;
    if (b->n_tokens < 1 || b->n_tokens > f->n_batch || b->n_logits < 0 || b->n_logits > b->n_tokens)
        return -EINVAL;
    for (int i = 0; i < b->n_tokens; i++) {
        const struct eng_kv_seq *s = b->seqs[i];
        if (b->tokens[i] < 0 || b->tokens[i] >= hp->n_vocab || b->pos[i] < 0 ||
            b->pos[i] >= f->n_ctx || !s || s->n_blocks < eng_kv_blocks_for(b->pos[i] + 1))
            return -EINVAL;
        int nb = s->n_blocks < f->max_blocks ? s->n_blocks : f->max_blocks;
        for (int j = 0; j < nb; j++) {
            if (s->table[j] < 0 || s->table[j] >= f->n_blocks)
                return -EINVAL;
        }
    }
    for (int i = 0; i < b->n_logits; i++) {
        if (b->logits_idx[i] < 0 || b->logits_idx[i] >= b->n_tokens)
            return -EINVAL;
    }
    return 0;
}

/* Where each array of the batch description starts in meta (int32 offsets). */
struct meta_off {
    size_t tokens, pos, dst_row, tab_off, logits_idx, tables, used;
};

/*
 * Fills meta_host: tokens, positions, the cache row each token's K/V goes to, each token's offset
 * of its sequence's block table in the tables area (tokens of one sequence that follow each other
 * share one copy of the table), the logits rows.
 */
static void
build_meta(struct eng_cuda_fwd *f, const struct eng_batch *b, struct meta_off *o)
{
    size_t n = (size_t)b->n_tokens;
    int32_t *h = f->meta_host;
    o->tokens = 0;
    o->pos = n;
    o->dst_row = 2 * n;
    o->tab_off = 3 * n;
    o->logits_idx = 4 * n;
    o->tables = 5 * n;
    size_t t_used = 0;
    for (size_t i = 0; i < n; i++) {
        const struct eng_kv_seq *s = b->seqs[i];
        int p = b->pos[i];
        h[o->tokens + i] = b->tokens[i];
        h[o->pos + i] = p;
        h[o->dst_row + i] = s->table[p / ENG_KV_BLOCK] * ENG_KV_BLOCK + p % ENG_KV_BLOCK;
        if (i > 0 && b->seqs[i - 1] == s) {
            h[o->tab_off + i] = h[o->tab_off + i - 1];
            continue;
        }
        int nb = s->n_blocks < f->max_blocks ? s->n_blocks : f->max_blocks;
        h[o->tab_off + i] = (int32_t)t_used;
        memcpy(h + o->tables + t_used, s->table, (size_t)nb * sizeof(int32_t));
        t_used += (size_t)nb;
    }
    for (int i = 0; i < b->n_logits; i++)
        h[o->logits_idx + (size_t)i] = b->logits_idx[i];
    o->used = o->tables + t_used;
}

static int
forward_layer(struct eng_cuda_fwd *f, int il, int n, const struct meta_off *o)
{
    const struct eng_hparams *hp = &f->m->hp;
    const struct cuda_layer *l = &f->layers[il];
    struct kern_cuda *kc = f->kc;
    int q_dim = hp->n_head * hp->head_dim, kv_dim = hp->n_head_kv * hp->head_dim;
    size_t cache_off = (size_t)il * (size_t)f->n_blocks * ENG_KV_BLOCK * (size_t)kv_dim;
    float *kc_l = f->k_cache + cache_off, *vc_l = f->v_cache + cache_off;
    int neox = hp->rope_type == ENG_ROPE_NEOX;
    int rc;
    if ((rc = kern_cuda_rmsnorm(kc, f->xb, f->x, l->attn_norm, n, hp->n_embd, hp->rms_eps)) < 0 ||
        (rc = kern_cuda_matmul(kc, &l->wq, f->xb, n, f->q)) < 0 ||
        (rc = kern_cuda_matmul(kc, &l->wk, f->xb, n, f->k)) < 0 ||
        (rc = kern_cuda_matmul(kc, &l->wv, f->xb, n, f->v)) < 0)
        return rc;
    if ((l->bq && (rc = kern_cuda_add_rows(kc, f->q, l->bq, n, q_dim)) < 0) ||
        (l->bk && (rc = kern_cuda_add_rows(kc, f->k, l->bk, n, kv_dim)) < 0) ||
        (l->bv && (rc = kern_cuda_add_rows(kc, f->v, l->bv, n, kv_dim)) < 0))
        return rc;
    struct kern_cuda_attn a = {
        .out = f->att,
        .q = f->q,
        .k_cache = kc_l,
        .v_cache = vc_l,
        .tables = f->meta + o->tables,
        .tab_off = f->meta + o->tab_off,
        .pos = f->meta + o->pos,
        .n_tok = n,
        .n_head = hp->n_head,
        .n_head_kv = hp->n_head_kv,
        .head_dim = hp->head_dim,
        .block_rows = ENG_KV_BLOCK,
        .scale = 1.0f / sqrtf((float)hp->head_dim),
    };
    const int32_t *pos = f->meta + o->pos;
    if ((rc = kern_cuda_rope(kc, f->q, pos, f->freq, n, hp->n_head, hp->head_dim, hp->n_rot,
                             neox)) < 0 ||
        (rc = kern_cuda_rope(kc, f->k, pos, f->freq, n, hp->n_head_kv, hp->head_dim, hp->n_rot,
                             neox)) < 0 ||
        (rc = kern_cuda_kv_write(kc, kc_l, vc_l, f->k, f->v, f->meta + o->dst_row, n, kv_dim)) <
            0 ||
        (rc = kern_cuda_attention(kc, &a)) < 0 ||
        (rc = kern_cuda_matmul(kc, &l->wo, f->att, n, f->tmp)) < 0 ||
        (rc = kern_cuda_add(kc, f->x, f->tmp, (int64_t)n * hp->n_embd)) < 0 ||
        (rc = kern_cuda_rmsnorm(kc, f->xb, f->x, l->ffn_norm, n, hp->n_embd, hp->rms_eps)) < 0 ||
        (rc = kern_cuda_matmul(kc, &l->w_gate, f->xb, n, f->hb)) < 0 ||
        (rc = kern_cuda_matmul(kc, &l->w_up, f->xb, n, f->hb2)) < 0 ||
        (rc = kern_cuda_swiglu(kc, f->hb, f->hb, f->hb2, (int64_t)n * hp->n_ff)) < 0 ||
        (rc = kern_cuda_matmul(kc, &l->w_down, f->hb, n, f->tmp)) < 0 ||
        (rc = kern_cuda_add(kc, f->x, f->tmp, (int64_t)n * hp->n_embd)) < 0)
        return rc;
    return 0;
}

/* Final norm and output head for the listed rows, LOGIT_ROWS at a time, copied to the host. */
static int
forward_logits(struct eng_cuda_fwd *f, const struct eng_batch *b, const struct meta_off *o,
               float *logits)
{
    const struct eng_hparams *hp = &f->m->hp;
    const struct kern_cuda_matrix *out = f->m->tied_output ? &f->tok_embd : &f->output;
    int rc = 0;
    for (int j0 = 0; j0 < b->n_logits && rc == 0; j0 += f->logit_rows) {
        int nr = b->n_logits - j0 < f->logit_rows ? b->n_logits - j0 : f->logit_rows;
        if ((rc = kern_cuda_gather_rows(f->kc, f->xb, f->x, f->meta + o->logits_idx + j0, nr,
                                        hp->n_embd)) < 0 ||
            (rc = kern_cuda_rmsnorm(f->kc, f->xb, f->xb, f->output_norm, nr, hp->n_embd,
                                    hp->rms_eps)) < 0 ||
            (rc = kern_cuda_matmul(f->kc, out, f->xb, nr, f->logits)) < 0)
            break;
        rc = kern_cuda_download(f->kc, logits + (size_t)j0 * hp->n_vocab, f->logits,
                                (size_t)nr * (size_t)hp->n_vocab * sizeof(float));
    }
    return rc;
}

int
eng_cuda_forward_batch(struct eng_cuda_fwd *f, const struct eng_batch *b, float *logits)
{
    const struct eng_hparams *hp = &f->m->hp;
    int rc = check_batch(f, b);
    if (rc < 0)
        return rc;
    struct meta_off o;
    build_meta(f, b, &o);
    int n = b->n_tokens;
    if ((rc = kern_cuda_upload(f->kc, f->meta, f->meta_host, o.used * sizeof(int32_t))) < 0 ||
        (rc = kern_cuda_embed(f->kc, &f->tok_embd, f->meta + o.tokens, n, f->x)) < 0)
        goto out;
    for (int il = 0; il < hp->n_layer; il++) {
        if ((rc = forward_layer(f, il, n, &o)) < 0)
            goto out;
    }
    if (b->n_logits > 0)
        rc = forward_logits(f, b, &o, logits);
out:
    /* Always wait: meta_host is rewritten by the next call while its upload may be pending. */
    if (rc == 0)
        rc = kern_cuda_sync(f->kc);
    else
        (void)kern_cuda_sync(f->kc);
    return rc;
}

int
eng_cuda_forward(struct eng_cuda_fwd *f, struct eng_kv *kv, const int32_t *tokens, int n_tokens,
                 float *logits, bool all_logits)
{
    const struct eng_hparams *hp = &f->m->hp;
    if (n_tokens < 1)
        return -EINVAL;
    for (int i = 0; i < n_tokens; i++) {
        if (tokens[i] < 0 || tokens[i] >= hp->n_vocab)
            return -EINVAL;
    }
    if (n_tokens > kv->n_ctx - kv->n_past || kv->n_past + n_tokens > f->n_ctx)
        return -E2BIG;
    int rc = eng_kv_seq_reserve(kv->pool, kv->seq, kv->n_past + n_tokens);
    if (rc < 0)
        return rc;
    int n_past0 = kv->n_past;
    for (int done = 0; done < n_tokens;) {
        int n = n_tokens - done < f->n_batch ? n_tokens - done : f->n_batch;
        bool last = done + n == n_tokens;
        struct eng_batch b = {.n_tokens = n,
                              .tokens = tokens + done,
                              .pos = f->pos,
                              .seqs = f->seqs,
                              .n_logits = 0,
                              .logits_idx = f->logits_idx};
        for (int i = 0; i < n; i++) {
            f->pos[i] = kv->n_past + i;
            f->seqs[i] = kv->seq;
        }
        float *out = NULL;
        if (logits && all_logits) {
            for (int i = 0; i < n; i++)
                f->logits_idx[i] = i;
            b.n_logits = n;
            out = logits + (size_t)done * hp->n_vocab;
        } else if (logits && last) {
            f->logits_idx[0] = n - 1;
            b.n_logits = 1;
            out = logits;
        }
        if ((rc = eng_cuda_forward_batch(f, &b, out)) < 0) {
            kv->n_past = n_past0;
            kv->seq->n_tokens = n_past0;
            return rc;
        }
        kv->n_past += n;
        kv->seq->n_tokens = kv->n_past;
        done += n;
    }
    return 0;
}

#else /* !LLM_CUDA: the CPU build */

int
eng_cuda_available(char *msg, size_t msg_len)
{
    if (msg && msg_len)
        snprintf(msg, msg_len, "this build has no CUDA backend (build it with `make cuda`)");
    return -ENOTSUP;
}

int
eng_cuda_fwd_new(const struct eng_model *m, int n_batch, int n_ctx, int n_kv_blocks,
                 struct eng_cuda_fwd **out)
{
    (void)m;
    (void)n_batch;
    (void)n_ctx;
    (void)n_kv_blocks;
    (void)out;
    return -ENOTSUP;
}

void
eng_cuda_fwd_free(struct eng_cuda_fwd *f)
{
    (void)f;
}

int
eng_cuda_forward_batch(struct eng_cuda_fwd *f, const struct eng_batch *b, float *logits)
{
    (void)f;
    (void)b;
    (void)logits;
    return -ENOTSUP;
}

int
eng_cuda_forward(struct eng_cuda_fwd *f, struct eng_kv *kv, const int32_t *tokens, int n_tokens,
                 float *logits, bool all_logits)
{
    (void)f;
    (void)kv;
    (void)tokens;
    (void)n_tokens;
    (void)logits;
    (void)all_logits;
    return -ENOTSUP;
}

double
eng_cuda_measure_bw(struct eng_cuda_fwd *f, size_t bytes, int reps)
{
    (void)f;
    (void)bytes;
    (void)reps;
    return 0;
}

#endif

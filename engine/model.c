#include "engine/model.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_util.h"
#include "engine/gguf.h"
#include "engine/kv.h"

/* ---- Loading ---- */

static void __attribute__((format(printf, 3, 4)))
set_err(char *err, size_t err_len, const char *fmt, ...)
{
    if (!err || err_len == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

/* Reads "<arch>.<suffix>" as a positive int. */
static int
get_hparam(const struct eng_gguf *g, const char *arch, const char *suffix, bool required, int dflt,
           int *out, char *err, size_t err_len)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    uint32_t v = 0;
    int rc = eng_gguf_get_u32(g, key, &v);
    if (rc == -ENOENT && !required) {
        *out = dflt;
        return 0;
    }
    if (rc == -ENOENT) {
        set_err(err, err_len, "model: missing metadata key %s", key);
        return -EBADMSG;
    }
    if (rc < 0 || v == 0 || v > (1u << 24)) {
        set_err(err, err_len, "model: metadata %s is not a positive integer in range", key);
        return -EBADMSG;
    }
    *out = (int)v;
    return 0;
}

static int
get_fparam(const struct eng_gguf *g, const char *arch, const char *suffix, float dflt, float *out,
           char *err, size_t err_len)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    float v = dflt;
    int rc = eng_gguf_get_f32(g, key, &v);
    if (rc < 0 && rc != -ENOENT) {
        set_err(err, err_len, "model: metadata %s is not a number", key);
        return -EBADMSG;
    }
    if (!isfinite(v) || v <= 0) {
        set_err(err, err_len, "model: metadata %s = %g is out of range", key, (double)v);
        return -EBADMSG;
    }
    *out = v;
    return 0;
}

static const struct eng_gguf_tensor *
find_tensor(const struct eng_gguf *g, const char *name, char *err, size_t err_len)
{
    const struct eng_gguf_tensor *t = eng_gguf_find_tensor(g, name);
    if (!t)
        set_err(err, err_len, "model: missing tensor %s", name);
    return t;
}

/* A 1-D f32 tensor of n elements. */
static int
get_vec(const struct eng_gguf *g, const char *name, int n, bool required, const float **out,
        char *err, size_t err_len)
{
    const struct eng_gguf_tensor *t = eng_gguf_find_tensor(g, name);
    if (!t) {
        if (!required) {
            *out = NULL;
            return 0;
        }
        set_err(err, err_len, "model: missing tensor %s", name);
        return -EBADMSG;
    }
    if (t->type != KERN_DTYPE_F32 || t->ne[0] != (uint64_t)n || t->ne[1] != 1 || t->ne[2] != 1 ||
        t->ne[3] != 1) {
        set_err(err, err_len, "model: tensor %s must be f32 of shape [%d], got %s [%llu, %llu]",
                name, n, kern_dtype_traits(t->type) ? kern_dtype_traits(t->type)->name : "?",
                (unsigned long long)t->ne[0], (unsigned long long)t->ne[1]);
        return -EBADMSG;
    }
    *out = t->data;
    return 0;
}

/* A 2-D matrix of n_out rows of n_in elements (GGUF shape [n_in, n_out]). */
static int
get_matrix(const struct eng_gguf *g, const char *name, int n_in, int n_out, struct kern_matrix *out,
           char *err, size_t err_len)
{
    const struct eng_gguf_tensor *t = find_tensor(g, name, err, err_len);
    if (!t)
        return -EBADMSG;
    if (t->ne[0] != (uint64_t)n_in || t->ne[1] != (uint64_t)n_out || t->ne[2] != 1 ||
        t->ne[3] != 1) {
        set_err(err, err_len, "model: tensor %s has shape [%llu, %llu, %llu], expected [%d, %d]",
                name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                (unsigned long long)t->ne[2], n_in, n_out);
        return -EBADMSG;
    }
    struct kern_matrix m = {
        .type = t->type,
        .n_in = n_in,
        .n_out = n_out,
        .row_bytes = kern_row_bytes(t->type, n_in),
        .data = t->data,
    };
    int rc = kern_matrix_check(&m);
    if (rc < 0 || m.row_bytes * (uint64_t)n_out != t->n_bytes) {
        const struct kern_dtype_traits *tr = kern_dtype_traits(t->type);
        set_err(err, err_len, "model: tensor %s has type %s, which the kernels cannot use", name,
                tr ? tr->name : "unknown");
        return -ENOTSUP;
    }
    *out = m;
    return 0;
}

static int
load_hparams(const struct eng_gguf *g, struct eng_hparams *hp, char *arch_out, size_t arch_len,
             char *err, size_t err_len)
{
    struct eng_gguf_str arch_s;
    if (eng_gguf_get_str(g, "general.architecture", &arch_s) < 0) {
        set_err(err, err_len, "model: missing metadata general.architecture");
        return -EBADMSG;
    }
    if (arch_s.len >= arch_len)
        arch_s.len = arch_len - 1;
    memcpy(arch_out, arch_s.data, arch_s.len);
    arch_out[arch_s.len] = 0;
    const char *arch = arch_out;
    if (strcmp(arch, "llama") == 0) {
        hp->arch = ENG_ARCH_LLAMA;
        hp->rope_type = ENG_ROPE_NORM;
    } else if (strcmp(arch, "qwen2") == 0) {
        hp->arch = ENG_ARCH_QWEN2;
        hp->rope_type = ENG_ROPE_NEOX;
    } else {
        set_err(err, err_len, "model: architecture '%s' is not supported (llama, qwen2)", arch);
        return -ENOTSUP;
    }
    int rc;
    if ((rc = get_hparam(g, arch, "embedding_length", true, 0, &hp->n_embd, err, err_len)) < 0 ||
        (rc = get_hparam(g, arch, "block_count", true, 0, &hp->n_layer, err, err_len)) < 0 ||
        (rc = get_hparam(g, arch, "feed_forward_length", true, 0, &hp->n_ff, err, err_len)) < 0 ||
        (rc = get_hparam(g, arch, "attention.head_count", true, 0, &hp->n_head, err, err_len)) <
            0 ||
        (rc = get_hparam(g, arch, "attention.head_count_kv", false, hp->n_head, &hp->n_head_kv, err,
                         err_len)) < 0 ||
        (rc = get_hparam(g, arch, "context_length", false, 2048, &hp->n_ctx_train, err, err_len)) <
            0)
        return rc;
    if (hp->n_embd % hp->n_head != 0 || hp->n_head % hp->n_head_kv != 0 || hp->n_layer > 1024) {
        set_err(err, err_len,
                "model: inconsistent attention shape: n_embd %d, n_head %d, n_head_kv %d",
                hp->n_embd, hp->n_head, hp->n_head_kv);
        return -EBADMSG;
    }
    hp->head_dim = hp->n_embd / hp->n_head;
    if ((rc = get_hparam(g, arch, "attention.key_length", false, hp->head_dim, &hp->head_dim, err,
                         err_len)) < 0 ||
        (rc = get_hparam(g, arch, "rope.dimension_count", false, hp->head_dim, &hp->n_rot, err,
                         err_len)) < 0)
        return rc;
    if (hp->head_dim % 2 != 0 || hp->n_rot % 2 != 0 || hp->n_rot > hp->head_dim) {
        set_err(err, err_len, "model: head_dim %d / rope dims %d must be even and nested",
                hp->head_dim, hp->n_rot);
        return -EBADMSG;
    }
    if ((rc = get_fparam(g, arch, "rope.freq_base", 10000.0f, &hp->rope_theta, err, err_len)) < 0 ||
        (rc = get_fparam(g, arch, "attention.layer_norm_rms_epsilon", 1e-5f, &hp->rms_eps, err,
                         err_len)) < 0)
        return rc;
    return 0;
}

static int
load_layer(const struct eng_gguf *g, const struct eng_hparams *hp, int il, struct eng_layer *l,
           char *err, size_t err_len)
{
    char name[96];
    int q_dim = hp->n_head * hp->head_dim;
    int kv_dim = hp->n_head_kv * hp->head_dim;
    int rc;
#define NAME(suffix) (snprintf(name, sizeof(name), "blk.%d.%s", il, suffix), name)
    if ((rc = get_vec(g, NAME("attn_norm.weight"), hp->n_embd, true, &l->attn_norm, err, err_len)) <
            0 ||
        (rc = get_matrix(g, NAME("attn_q.weight"), hp->n_embd, q_dim, &l->wq, err, err_len)) < 0 ||
        (rc = get_matrix(g, NAME("attn_k.weight"), hp->n_embd, kv_dim, &l->wk, err, err_len)) < 0 ||
        (rc = get_matrix(g, NAME("attn_v.weight"), hp->n_embd, kv_dim, &l->wv, err, err_len)) < 0 ||
        (rc = get_matrix(g, NAME("attn_output.weight"), q_dim, hp->n_embd, &l->wo, err, err_len)) <
            0 ||
        (rc = get_vec(g, NAME("ffn_norm.weight"), hp->n_embd, true, &l->ffn_norm, err, err_len)) <
            0 ||
        (rc = get_matrix(g, NAME("ffn_gate.weight"), hp->n_embd, hp->n_ff, &l->w_gate, err,
                         err_len)) < 0 ||
        (rc = get_matrix(g, NAME("ffn_up.weight"), hp->n_embd, hp->n_ff, &l->w_up, err, err_len)) <
            0 ||
        (rc = get_matrix(g, NAME("ffn_down.weight"), hp->n_ff, hp->n_embd, &l->w_down, err,
                         err_len)) < 0)
        return rc;
    bool bias = hp->arch == ENG_ARCH_QWEN2;
    if ((rc = get_vec(g, NAME("attn_q.bias"), q_dim, bias, &l->bq, err, err_len)) < 0 ||
        (rc = get_vec(g, NAME("attn_k.bias"), kv_dim, bias, &l->bk, err, err_len)) < 0 ||
        (rc = get_vec(g, NAME("attn_v.bias"), kv_dim, bias, &l->bv, err, err_len)) < 0)
        return rc;
#undef NAME
    return 0;
}

/* The matrices of the forward pass, for repacking and freeing. */
static int
layer_mats(struct eng_layer *l, struct kern_matrix **out)
{
    struct kern_matrix *v[] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
    memcpy(out, v, sizeof(v));
    return (int)(sizeof(v) / sizeof(v[0]));
}

/* Re-lays out every matmul weight for the decode kernels where the CPU has a packed layout for its
 * type (kern_matrix_repack); tok_embd stays as it is (embedding rows are read from the file). */
static int
repack_all(struct eng_model *m)
{
    int rc = kern_matrix_repack(&m->output);
    for (int il = 0; rc >= 0 && il < m->hp.n_layer; il++) {
        struct kern_matrix *mats[8];
        int n = layer_mats(&m->layers[il], mats);
        for (int i = 0; rc >= 0 && i < n; i++)
            rc = kern_matrix_repack(mats[i]);
    }
    return rc < 0 ? rc : 0;
}

int
eng_model_load(const struct eng_gguf *g, struct eng_model **out, char *err, size_t err_len)
{
    struct eng_model *m = cm_xcalloc(1, sizeof(*m));
    char arch[32];
    int rc = load_hparams(g, &m->hp, arch, sizeof(arch), err, err_len);
    if (rc < 0)
        goto fail;
    struct eng_hparams *hp = &m->hp;

    const struct eng_gguf_tensor *emb = find_tensor(g, "token_embd.weight", err, err_len);
    if (!emb) {
        rc = -EBADMSG;
        goto fail;
    }
    if (emb->ne[1] < 1 || emb->ne[1] > (1u << 24)) {
        set_err(err, err_len, "model: token_embd.weight has an absurd vocabulary size %llu",
                (unsigned long long)emb->ne[1]);
        rc = -EBADMSG;
        goto fail;
    }
    hp->n_vocab = (int)emb->ne[1];
    uint32_t meta_vocab = 0;
    char key[64];
    snprintf(key, sizeof(key), "%s.vocab_size", arch);
    if (eng_gguf_get_u32(g, key, &meta_vocab) == 0 && meta_vocab != (uint32_t)hp->n_vocab) {
        set_err(err, err_len, "model: %s = %u but token_embd.weight has %d rows", key, meta_vocab,
                hp->n_vocab);
        rc = -EBADMSG;
        goto fail;
    }
    struct eng_gguf_arr toks;
    if (eng_gguf_get_arr(g, "tokenizer.ggml.tokens", &toks) == 0 &&
        toks.n != (uint64_t)hp->n_vocab) {
        set_err(err, err_len, "model: the tokenizer has %llu tokens but token_embd.weight has %d",
                (unsigned long long)toks.n, hp->n_vocab);
        rc = -EBADMSG;
        goto fail;
    }
    if ((rc = get_matrix(g, "token_embd.weight", hp->n_embd, hp->n_vocab, &m->tok_embd, err,
                         err_len)) < 0 ||
        (rc = get_vec(g, "output_norm.weight", hp->n_embd, true, &m->output_norm, err, err_len)) <
            0)
        goto fail;
    if (eng_gguf_find_tensor(g, "output.weight")) {
        if ((rc = get_matrix(g, "output.weight", hp->n_embd, hp->n_vocab, &m->output, err,
                             err_len)) < 0)
            goto fail;
    } else {
        m->output = m->tok_embd;
        m->tied_output = true;
    }
    m->layers = cm_xcalloc((size_t)hp->n_layer, sizeof(*m->layers));
    for (int il = 0; il < hp->n_layer; il++) {
        if ((rc = load_layer(g, hp, il, &m->layers[il], err, err_len)) < 0)
            goto fail;
    }
    if ((rc = repack_all(m)) < 0) {
        set_err(err, err_len, "model: no memory for the repacked weights");
        goto fail;
    }
    struct eng_gguf_str name;
    if (eng_gguf_get_str(g, "general.name", &name) == 0 && name.len > 0) {
        size_t n = name.len < sizeof(m->name) - 1 ? name.len : sizeof(m->name) - 1;
        memcpy(m->name, name.data, n);
        m->name[n] = 0;
    } else {
        snprintf(m->name, sizeof(m->name), "%s", arch);
    }
    m->gguf = g;
    *out = m;
    return 0;
fail:
    eng_model_free(m);
    return rc;
}

void
eng_model_free(struct eng_model *m)
{
    if (!m)
        return;
    kern_matrix_unpack(&m->output);
    for (int il = 0; m->layers && il < m->hp.n_layer; il++) {
        struct kern_matrix *mats[8];
        int n = layer_mats(&m->layers[il], mats);
        for (int i = 0; i < n; i++)
            kern_matrix_unpack(mats[i]);
    }
    free(m->layers);
    free(m);
}

static size_t
matrix_bytes(const struct kern_matrix *w)
{
    return w->row_bytes * (size_t)w->n_out;
}

size_t
eng_model_weight_bytes(const struct eng_model *m)
{
    const struct eng_hparams *hp = &m->hp;
    size_t n = matrix_bytes(&m->output) + (size_t)hp->n_embd * 4;
    for (int il = 0; il < hp->n_layer; il++) {
        const struct eng_layer *l = &m->layers[il];
        n += matrix_bytes(&l->wq) + matrix_bytes(&l->wk) + matrix_bytes(&l->wv) +
             matrix_bytes(&l->wo) + matrix_bytes(&l->w_gate) + matrix_bytes(&l->w_up) +
             matrix_bytes(&l->w_down) + 2 * (size_t)hp->n_embd * 4;
    }
    return n;
}

/* ---- KV cache of one sequence ---- */

int
eng_kv_new(const struct eng_model *m, int n_ctx, struct eng_kv **out)
{
    if (n_ctx < 1)
        return -EINVAL;
    struct eng_kv *kv = cm_xcalloc(1, sizeof(*kv));
    kv->n_ctx = n_ctx;
    kv->seq = cm_xcalloc(1, sizeof(*kv->seq));
    eng_kv_seq_init(kv->seq);
    int rc = eng_kv_pool_new(m->hp.n_layer, m->hp.n_head_kv * m->hp.head_dim,
                             eng_kv_blocks_for(n_ctx), &kv->pool);
    if (rc < 0) {
        free(kv->seq);
        free(kv);
        return rc;
    }
    *out = kv;
    return 0;
}

void
eng_kv_free(struct eng_kv *kv)
{
    if (!kv)
        return;
    eng_kv_seq_fini(kv->pool, kv->seq);
    eng_kv_pool_free(kv->pool);
    free(kv->seq);
    free(kv);
}

/* ---- Forward pass ---- */

struct eng_fwd {
    const struct eng_model *m;
    struct kern_pool *pool;
    int n_batch;
    int n_ctx;
    int n_threads;
    float *x;              /* (n_batch, n_embd) residual stream */
    float *xb;             /* (n_batch, n_embd) normed input of a block */
    float *q;              /* (n_batch, n_head * head_dim) */
    float *k;              /* (n_batch, kv_dim) */
    float *v;              /* (n_batch, kv_dim) */
    float *att;            /* (n_batch, n_head * head_dim) attention output */
    float *tmp;            /* (n_batch, n_embd) output of wo / w_down */
    float *hb;             /* (n_batch, n_ff) gate, then silu(gate) * up */
    float *hb2;            /* (n_batch, n_ff) up */
    float *rope;           /* (n_batch, n_rot / 2, 2) cos, sin */
    float *freq;           /* (n_rot / 2) theta^(-2j / n_rot), computed once */
    float *score;          /* (n_threads, n_group * n_ctx) attention scratch per thread */
    const float **blk_ptr; /* (n_threads, 2 * max_blocks) K and V block pointers per thread */
    int max_blocks;
    /* eng_forward's batch description: */
    int32_t *pos;             /* (n_batch) */
    struct eng_kv_seq **seqs; /* (n_batch) */
    int32_t *logits_idx;      /* (n_batch) */
};

int
eng_fwd_new(const struct eng_model *m, struct kern_pool *pool, int n_batch, int n_ctx,
            struct eng_fwd **out)
{
    if (n_batch < 1 || n_ctx < 1 || !pool)
        return -EINVAL;
    const struct eng_hparams *hp = &m->hp;
    struct eng_fwd *f = cm_xcalloc(1, sizeof(*f));
    f->m = m;
    f->pool = pool;
    f->n_batch = n_batch;
    f->n_ctx = n_ctx;
    f->n_threads = kern_pool_n_threads(pool);
    f->max_blocks = eng_kv_blocks_for(n_ctx);
    size_t nb = (size_t)n_batch, nt = (size_t)f->n_threads;
    size_t q_dim = (size_t)hp->n_head * (size_t)hp->head_dim;
    size_t kv_dim = (size_t)hp->n_head_kv * (size_t)hp->head_dim;
    size_t n_group = (size_t)(hp->n_head / hp->n_head_kv);
    f->x = malloc(nb * (size_t)hp->n_embd * sizeof(float));
    f->xb = malloc(nb * (size_t)hp->n_embd * sizeof(float));
    f->q = malloc(nb * q_dim * sizeof(float));
    f->k = malloc(nb * kv_dim * sizeof(float));
    f->v = malloc(nb * kv_dim * sizeof(float));
    f->att = malloc(nb * q_dim * sizeof(float));
    f->tmp = malloc(nb * (size_t)hp->n_embd * sizeof(float));
    f->hb = malloc(nb * (size_t)hp->n_ff * sizeof(float));
    f->hb2 = malloc(nb * (size_t)hp->n_ff * sizeof(float));
    f->rope = malloc(nb * (size_t)hp->n_rot * sizeof(float));
    f->freq = malloc((size_t)hp->n_rot / 2 * sizeof(float));
    f->score = malloc(nt * n_group * (size_t)n_ctx * sizeof(float));
    f->blk_ptr = malloc(nt * 2 * (size_t)f->max_blocks * sizeof(*f->blk_ptr));
    f->pos = malloc(nb * sizeof(*f->pos));
    f->seqs = malloc(nb * sizeof(*f->seqs));
    f->logits_idx = malloc(nb * sizeof(*f->logits_idx));
    if (!f->x || !f->xb || !f->q || !f->k || !f->v || !f->att || !f->tmp || !f->hb || !f->hb2 ||
        !f->rope || !f->freq || !f->score || !f->blk_ptr || !f->pos || !f->seqs || !f->logits_idx) {
        eng_fwd_free(f);
        return -ENOMEM;
    }
    for (int j = 0; j < hp->n_rot / 2; j++)
        f->freq[j] = powf(hp->rope_theta, -2.0f * (float)j / (float)hp->n_rot);
    *out = f;
    return 0;
}

void
eng_fwd_free(struct eng_fwd *f)
{
    if (!f)
        return;
    free(f->x);
    free(f->xb);
    free(f->q);
    free(f->k);
    free(f->v);
    free(f->att);
    free(f->tmp);
    free(f->hb);
    free(f->hb2);
    free(f->rope);
    free(f->freq);
    free(f->score);
    free(f->blk_ptr);
    free(f->pos);
    free(f->seqs);
    free(f->logits_idx);
    free(f);
}

/* A task over the tokens of the current batch, split evenly across the pool. */
struct row_task {
    struct eng_fwd *f;
    struct eng_kv_pool *kv;
    const struct eng_batch *b;
    int layer;
    atomic_int next; /* task_attention: items claimed so far */
};

static void
split_range(int n, int ith, int nth, int *lo, int *hi)
{
    int per = (n + nth - 1) / nth;
    *lo = ith * per < n ? ith * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* RMSNorm of x into xb with the layer's attention norm weights. */
static void
task_attn_norm(void *ctx, int ith, int nth)
{
    struct row_task *t = ctx;
    const struct eng_hparams *hp = &t->f->m->hp;
    const float *w = t->f->m->layers[t->layer].attn_norm;
    int lo, hi;
    split_range(t->b->n_tokens, ith, nth, &lo, &hi);
    for (int i = lo; i < hi; i++)
        kern_rmsnorm(t->f->xb + (size_t)i * hp->n_embd, t->f->x + (size_t)i * hp->n_embd, w,
                     hp->n_embd, hp->rms_eps);
}

static void
rope_rotate(float *x, const float *cs, int n_heads, int head_dim, int n_rot,
            enum eng_rope_type type)
{
    for (int h = 0; h < n_heads; h++) {
        float *xh = x + (size_t)h * head_dim;
        for (int i = 0; i < n_rot / 2; i++) {
            float c = cs[2 * i], s = cs[2 * i + 1];
            int a = type == ENG_ROPE_NEOX ? i : 2 * i;
            int b = type == ENG_ROPE_NEOX ? i + n_rot / 2 : 2 * i + 1;
            float x0 = xh[a], x1 = xh[b];
            xh[a] = x0 * c - x1 * s;
            xh[b] = x0 * s + x1 * c;
        }
    }
}

static void
add_bias(float *x, const float *b, int n)
{
    if (b)
        kern_add(x, b, n);
}

/* Biases, RoPE on q and k, then k and v written to their sequence's cache block. */
static void
task_qkv_post(void *ctx, int ith, int nth)
{
    struct row_task *t = ctx;
    struct eng_fwd *f = t->f;
    const struct eng_hparams *hp = &f->m->hp;
    const struct eng_layer *l = &f->m->layers[t->layer];
    int q_dim = hp->n_head * hp->head_dim, kv_dim = hp->n_head_kv * hp->head_dim;
    int lo, hi;
    split_range(t->b->n_tokens, ith, nth, &lo, &hi);
    for (int i = lo; i < hi; i++) {
        float *q = f->q + (size_t)i * q_dim;
        float *k = f->k + (size_t)i * kv_dim;
        float *v = f->v + (size_t)i * kv_dim;
        add_bias(q, l->bq, q_dim);
        add_bias(k, l->bk, kv_dim);
        add_bias(v, l->bv, kv_dim);
        const float *cs = f->rope + (size_t)i * hp->n_rot;
        rope_rotate(q, cs, hp->n_head, hp->head_dim, hp->n_rot, hp->rope_type);
        rope_rotate(k, cs, hp->n_head_kv, hp->head_dim, hp->n_rot, hp->rope_type);
        int pos = t->b->pos[i];
        int32_t blk = t->b->seqs[i]->table[pos / ENG_KV_BLOCK];
        float *kc = eng_kv_k(t->kv, blk, t->layer), *vc = eng_kv_v(t->kv, blk, t->layer);
        size_t hd = (size_t)hp->head_dim;
        for (int h = 0; h < hp->n_head_kv; h++) {
            size_t row = eng_kv_head_row(h, pos % ENG_KV_BLOCK, hp->head_dim);
            memcpy(kc + row, k + (size_t)h * hd, hd * sizeof(float));
            memcpy(vc + row, v + (size_t)h * hd, hd * sizeof(float));
        }
    }
}

/* Attention: work items are (token, kv head) pairs, claimed one at a time from the last (a
 * token's cost grows with its position, and a prefill chunk's positions rise, so the costliest
 * go first and the threads finish within one item of each other; a fixed split of a chunk gave
 * the second half three times the first half's work). Which thread computes an item changes no
 * bit: each item is computed whole by one thread. */
static void
task_attention(void *ctx, int ith, int nth)
{
    struct row_task *t = ctx;
    struct eng_fwd *f = t->f;
    const struct eng_hparams *hp = &f->m->hp;
    int hd = hp->head_dim, q_dim = hp->n_head * hd;
    int n_group = hp->n_head / hp->n_head_kv;
    float scale = 1.0f / sqrtf((float)hd);
    float *score = f->score + (size_t)ith * (size_t)n_group * (size_t)f->n_ctx;
    const float **kb = f->blk_ptr + (size_t)ith * 2 * (size_t)f->max_blocks;
    const float **vb = kb + f->max_blocks;
    int n_items = t->b->n_tokens * hp->n_head_kv;
    (void)nth;
    for (;;) {
        int claimed = atomic_fetch_add_explicit(&t->next, 1, memory_order_relaxed);
        if (claimed >= n_items)
            break;
        int item = n_items - 1 - claimed;
        int i = item / hp->n_head_kv, h = item % hp->n_head_kv;
        const struct eng_kv_seq *seq = t->b->seqs[i];
        int n_kv = t->b->pos[i] + 1;
        size_t head_off = eng_kv_head_row(h, 0, hd);
        for (int j = 0; j < eng_kv_blocks_for(n_kv); j++) {
            kb[j] = eng_kv_k(t->kv, seq->table[j], t->layer) + head_off;
            vb[j] = eng_kv_v(t->kv, seq->table[j], t->layer) + head_off;
        }
        size_t qo = (size_t)i * q_dim + (size_t)h * n_group * hd;
        kern_attn_f32(f->att + qo, f->q + qo, kb, vb, ENG_KV_BLOCK, n_kv, n_group, hd,
                      (size_t)hd, scale, score);
    }
}

/* x += tmp, then xb = rmsnorm(x) with the FFN norm. */
static void
task_attn_residual(void *ctx, int ith, int nth)
{
    struct row_task *t = ctx;
    const struct eng_hparams *hp = &t->f->m->hp;
    const float *w = t->f->m->layers[t->layer].ffn_norm;
    int lo, hi;
    split_range(t->b->n_tokens, ith, nth, &lo, &hi);
    for (int i = lo; i < hi; i++) {
        float *x = t->f->x + (size_t)i * hp->n_embd;
        kern_add(x, t->f->tmp + (size_t)i * hp->n_embd, hp->n_embd);
        kern_rmsnorm(t->f->xb + (size_t)i * hp->n_embd, x, w, hp->n_embd, hp->rms_eps);
    }
}

static void
task_swiglu(void *ctx, int ith, int nth)
{
    struct row_task *t = ctx;
    const struct eng_hparams *hp = &t->f->m->hp;
    int lo, hi;
    split_range(t->b->n_tokens, ith, nth, &lo, &hi);
    for (int i = lo; i < hi; i++) {
        float *g = t->f->hb + (size_t)i * hp->n_ff;
        kern_swiglu(g, g, t->f->hb2 + (size_t)i * hp->n_ff, hp->n_ff);
    }
}

static void
task_ffn_residual(void *ctx, int ith, int nth)
{
    struct row_task *t = ctx;
    const struct eng_hparams *hp = &t->f->m->hp;
    int lo, hi;
    split_range(t->b->n_tokens, ith, nth, &lo, &hi);
    for (int i = lo; i < hi; i++)
        kern_add(t->f->x + (size_t)i * hp->n_embd, t->f->tmp + (size_t)i * hp->n_embd, hp->n_embd);
}

/* Embedding rows and RoPE angles of every token. */
static int
embed(struct eng_fwd *f, const struct eng_batch *b)
{
    const struct eng_model *m = f->m;
    const struct eng_hparams *hp = &m->hp;
    for (int i = 0; i < b->n_tokens; i++) {
        const uint8_t *row =
            (const uint8_t *)m->tok_embd.data + (size_t)b->tokens[i] * m->tok_embd.row_bytes;
        int rc = kern_dequant_row(m->tok_embd.type, row, f->x + (size_t)i * hp->n_embd, hp->n_embd);
        if (rc < 0)
            return rc;
        float *cs = f->rope + (size_t)i * hp->n_rot;
        for (int j = 0; j < hp->n_rot / 2; j++) {
            float a = (float)b->pos[i] * f->freq[j];
            cs[2 * j] = cosf(a);
            cs[2 * j + 1] = sinf(a);
        }
    }
    return 0;
}

static int
check_batch(const struct eng_fwd *f, const struct eng_batch *b)
{
    const struct eng_hparams *hp = &f->m->hp;
    if (b->n_tokens < 1 || b->n_tokens > f->n_batch || b->n_logits < 0 || b->n_logits > b->n_tokens)
        return -EINVAL;
    for (int i = 0; i < b->n_tokens; i++) {
        if (b->tokens[i] < 0 || b->tokens[i] >= hp->n_vocab || b->pos[i] < 0 ||
            b->pos[i] >= f->n_ctx || !b->seqs[i] ||
            b->seqs[i]->n_blocks < eng_kv_blocks_for(b->pos[i] + 1))
            return -EINVAL;
    }
    for (int i = 0; i < b->n_logits; i++) {
        if (b->logits_idx[i] < 0 || b->logits_idx[i] >= b->n_tokens)
            return -EINVAL;
    }
    return 0;
}

/* Element-wise work on a few tokens costs less than waking the pool: run it on this thread. A
 * pool run is a few microseconds; 30 layers x 5 such tasks per decode step add up. */
#define INLINE_MAX_TOKENS 4

static void
run_rows(struct eng_fwd *f, kern_task_fn fn, struct row_task *t)
{
    if (t->b->n_tokens <= INLINE_MAX_TOKENS)
        fn(t, 0, 1);
    else
        kern_pool_run(f->pool, fn, t);
}

int
eng_forward_batch(struct eng_fwd *f, struct eng_kv_pool *kv, const struct eng_batch *b,
                  float *logits)
{
    const struct eng_model *m = f->m;
    const struct eng_hparams *hp = &m->hp;
    int n = b->n_tokens;
    int rc = check_batch(f, b);
    if (rc < 0 || (rc = embed(f, b)) < 0)
        return rc;
    struct row_task t = {.f = f, .kv = kv, .b = b};

    for (int il = 0; il < hp->n_layer; il++) {
        const struct eng_layer *l = &m->layers[il];
        t.layer = il;
        run_rows(f, task_attn_norm, &t);
        /* q, k and v (and below gate and up) share their input: one quantization, one pool run */
        const struct kern_matrix *qkv[3] = {&l->wq, &l->wk, &l->wv};
        float *qkv_out[3] = {f->q, f->k, f->v};
        if ((rc = kern_matmul_multi(f->pool, qkv, 3, f->xb, n, qkv_out)) < 0)
            return rc;
        run_rows(f, task_qkv_post, &t);
        atomic_store_explicit(&t.next, 0, memory_order_relaxed);
        kern_pool_run(f->pool, task_attention, &t);
        if ((rc = kern_matmul(f->pool, &l->wo, f->att, n, f->tmp)) < 0)
            return rc;
        run_rows(f, task_attn_residual, &t);
        const struct kern_matrix *gate_up[2] = {&l->w_gate, &l->w_up};
        float *gate_up_out[2] = {f->hb, f->hb2};
        if ((rc = kern_matmul_multi(f->pool, gate_up, 2, f->xb, n, gate_up_out)) < 0)
            return rc;
        run_rows(f, task_swiglu, &t);
        if ((rc = kern_matmul(f->pool, &l->w_down, f->hb, n, f->tmp)) < 0)
            return rc;
        run_rows(f, task_ffn_residual, &t);
    }

    if (b->n_logits > 0) {
        for (int j = 0; j < b->n_logits; j++)
            kern_rmsnorm(f->xb + (size_t)j * hp->n_embd,
                         f->x + (size_t)b->logits_idx[j] * hp->n_embd, m->output_norm, hp->n_embd,
                         hp->rms_eps);
        if ((rc = kern_matmul(f->pool, &m->output, f->xb, b->n_logits, logits)) < 0)
            return rc;
    }
    return 0;
}

int
eng_forward(struct eng_fwd *f, struct eng_kv *kv, const int32_t *tokens, int n_tokens,
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
        struct eng_batch b = {
            .n_tokens = n,
            .tokens = tokens + done,
            .pos = f->pos,
            .seqs = f->seqs,
            .n_logits = 0,
            .logits_idx = f->logits_idx,
        };
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
        if ((rc = eng_forward_batch(f, kv->pool, &b, out)) < 0) {
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

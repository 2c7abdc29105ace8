#include "engine/sched.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "spill/spill.h"

/* ---- Sequences ---- */

struct seq {
    uint64_t id;
    uint64_t req_id;
    void *owner;
    uint64_t arrival;     /* submit order, for FIFO */
    uint64_t admit_order; /* latest admission order, for victim ties */
    int priority;

    struct seq *prev, *next; /* queue links while queued */
    bool queued;
    bool accepted;  /* ACCEPTED emitted */
    bool preempted; /* waiting in the queue after a preemption: goes first */
    bool paused;
    bool cancel;
    char cancel_reason[ENG_SCHED_REASON_MAX];

    int n_prompt;
    int n_toks; /* prompt + generated */
    int n_gen;
    int cap_toks;
    int max_tokens;
    int32_t *toks; /* (cap_toks) prompt, then generated tokens */
    int n_stop;
    int32_t *stop; /* (n_stop) */
    struct eng_sampler *sampler;
    struct eng_kv_seq kv; /* kv.n_tokens: positions computed */
    int n_preempted;
    int token_loop; /* token_loop guard repeats; 0: off */

    /* For the spill file (the sampler keeps its own copy). */
    struct eng_sampler_params sp; /* logit_bias points to bias */
    struct eng_logit_bias *bias;  /* (sp.n_logit_bias) */
    bool on_disk;                 /* spilled: KV in the file of key id; blocks released */
    int disk_positions;           /* positions in the file */
    int immune_until;             /* not a victim while n_gen < immune_until (unless all are) */

    uint64_t deadline_ns;
    uint64_t t_submit, t_admit, t_first, t_last, paused_since;
};

/* ---- The scheduler ---- */

struct eng_sched {
    struct eng_sched_config cfg;
    struct eng_sched_model model;
    struct eng_sched_events ev;
    struct eng_kv_pool *kv;
    int n_ctx_eff; /* min(n_ctx, whole pool): positions a sequence can ever use */

    uint64_t next_id;
    uint64_t n_arrivals;
    uint64_t n_admissions;
    uint64_t now;

    struct seq *q_head, *q_tail; /* the queue, in admission order */
    int n_queued;
    struct seq **run; /* (max_seqs) running sequences, in admission order */
    int n_run;

    /* One tick's batch. */
    int32_t *b_tokens;          /* (max_batch_tokens) */
    int32_t *b_pos;             /* (max_batch_tokens) */
    struct eng_kv_seq **b_seqs; /* (max_batch_tokens) */
    int32_t *b_logits_idx;      /* (max_seqs) */
    struct seq **b_members;     /* (max_seqs) sequences in the batch, in batch order */
    int *b_count;               /* (max_seqs) their tokens in the batch */
    int *b_row;                 /* (max_seqs) their logits row, or -1 */
    float *logits;              /* (max_seqs, n_vocab) */
    int bn_tokens, bn_members, bn_logits;

    struct eng_sched_stats st; /* counters; gauges are filled by eng_sched_get_stats */

    struct eng_sched_spill spill; /* store NULL: recompute only */
};

/* ---- Allocation, with fault injection for tests ---- */

static long fail_alloc_at; /* the allocation number that fails; 0: none */
static long n_allocs;

void
eng_sched_test_fail_alloc(long n)
{
    fail_alloc_at = n;
    n_allocs = 0;
}

static bool
alloc_fails(void)
{
    return fail_alloc_at > 0 && ++n_allocs == fail_alloc_at;
}

static void *
sched_malloc(size_t n)
{
    return alloc_fails() ? NULL : malloc(n);
}

static void *
sched_calloc(size_t count, size_t size)
{
    return alloc_fails() ? NULL : calloc(count, size);
}

const double eng_sched_hist_le_ms[ENG_SCHED_HIST_BUCKETS - 1] = {
    1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
};

static const char *const finish_names[ENG_SCHED_FINISH_COUNT] = {
    "eos", "length", "stop_token", "cancelled", "deadline", "error",
};

const char *
eng_sched_finish_name(enum eng_sched_finish f)
{
    if ((int)f < 0 || f >= ENG_SCHED_FINISH_COUNT)
        return "?";
    return finish_names[f];
}

void
eng_sched_config_default(struct eng_sched_config *cfg)
{
    cfg->max_seqs = 64;
    cfg->max_batch_tokens = 256;
    cfg->max_queue = 256;
    cfg->watermark_blocks = 4;
}

static int
config_check(const struct eng_sched_config *cfg, const struct eng_sched_model *m)
{
    if (cfg->max_seqs < 1 || cfg->max_seqs > 4096)
        return -EINVAL;
    if (cfg->max_batch_tokens < cfg->max_seqs || cfg->max_batch_tokens > (1 << 20))
        return -EINVAL;
    if (cfg->max_queue < 0 || cfg->watermark_blocks < 0)
        return -EINVAL;
    if (m->forward == NULL || m->n_vocab < 1 || m->n_ctx < 1)
        return -EINVAL;
    return 0;
}

int
eng_sched_new(const struct eng_sched_config *cfg, const struct eng_sched_model *model,
              struct eng_kv_pool *kv, const struct eng_sched_events *ev, struct eng_sched **out)
{
    struct eng_sched *s = NULL;
    int rc = -EINVAL;

    if (cfg == NULL || model == NULL || kv == NULL || out == NULL ||
        eng_kv_pool_n_free(kv) != eng_kv_pool_n_blocks(kv))
        goto err;
    rc = config_check(cfg, model);
    if (rc < 0)
        goto err;
    rc = -ENOMEM;
    s = sched_calloc(1, sizeof(*s));
    if (s == NULL)
        goto err;
    s->cfg = *cfg;
    s->model = *model;
    if (ev != NULL)
        s->ev = *ev;
    s->kv = kv;
    long pool_tokens = (long)eng_kv_pool_n_blocks(kv) * ENG_KV_BLOCK;
    s->n_ctx_eff = pool_tokens < model->n_ctx ? (int)pool_tokens : model->n_ctx;
    s->next_id = 1;

    size_t nb = (size_t)cfg->max_batch_tokens, ns = (size_t)cfg->max_seqs;
    s->run = sched_calloc(ns, sizeof(*s->run));
    s->b_tokens = sched_malloc(nb * sizeof(*s->b_tokens));
    s->b_pos = sched_malloc(nb * sizeof(*s->b_pos));
    s->b_seqs = sched_malloc(nb * sizeof(*s->b_seqs));
    s->b_logits_idx = sched_malloc(ns * sizeof(*s->b_logits_idx));
    s->b_members = sched_malloc(ns * sizeof(*s->b_members));
    s->b_count = sched_malloc(ns * sizeof(*s->b_count));
    s->b_row = sched_malloc(ns * sizeof(*s->b_row));
    s->logits = sched_malloc(ns * (size_t)model->n_vocab * sizeof(*s->logits));
    if (!s->run || !s->b_tokens || !s->b_pos || !s->b_seqs || !s->b_logits_idx || !s->b_members ||
        !s->b_count || !s->b_row || !s->logits)
        goto err;
    *out = s;
    return 0;
err:
    eng_sched_free(s);
    return rc;
}

static void
seq_free(struct eng_sched *s, struct seq *q)
{
    if (q->on_disk) {
        spill_remove(s->spill.store, q->id);
        q->on_disk = false;
        s->st.spill_deleted++;
    }
    eng_kv_seq_fini(s->kv, &q->kv);
    free(q->bias);
    eng_sampler_free(q->sampler);
    free(q->toks);
    free(q->stop);
    free(q);
}

void
eng_sched_free(struct eng_sched *s)
{
    if (s == NULL)
        return;
    for (int i = 0; i < s->n_run; i++)
        seq_free(s, s->run[i]);
    struct seq *q = s->q_head;
    while (q != NULL) {
        struct seq *next = q->next;
        seq_free(s, q);
        q = next;
    }
    free(s->run);
    free(s->b_tokens);
    free(s->b_pos);
    free(s->b_seqs);
    free(s->b_logits_idx);
    free(s->b_members);
    free(s->b_count);
    free(s->b_row);
    free(s->logits);
    free(s);
}

/* ---- Queue and running set ---- */

/* Whether a goes before b in the queue: preempted sequences first, then priority, then arrival. */
static bool
queue_before(const struct seq *a, const struct seq *b)
{
    if (a->preempted != b->preempted)
        return a->preempted;
    if (a->priority != b->priority)
        return a->priority > b->priority;
    return a->arrival < b->arrival;
}

static void
queue_insert(struct eng_sched *s, struct seq *q)
{
    struct seq *at = s->q_tail;
    while (at != NULL && queue_before(q, at))
        at = at->prev;
    /* q goes right after at (at the head when at is NULL). */
    q->prev = at;
    q->next = at ? at->next : s->q_head;
    if (q->next)
        q->next->prev = q;
    else
        s->q_tail = q;
    if (at)
        at->next = q;
    else
        s->q_head = q;
    q->queued = true;
    s->n_queued++;
}

static void
queue_remove(struct eng_sched *s, struct seq *q)
{
    if (q->prev)
        q->prev->next = q->next;
    else
        s->q_head = q->next;
    if (q->next)
        q->next->prev = q->prev;
    else
        s->q_tail = q->prev;
    q->prev = q->next = NULL;
    q->queued = false;
    s->n_queued--;
}

static void
run_remove(struct eng_sched *s, struct seq *q)
{
    for (int i = 0; i < s->n_run; i++) {
        if (s->run[i] == q) {
            memmove(&s->run[i], &s->run[i + 1], (size_t)(s->n_run - i - 1) * sizeof(*s->run));
            s->n_run--;
            return;
        }
    }
}

static struct seq *
seq_find(const struct eng_sched *s, uint64_t id)
{
    for (int i = 0; i < s->n_run; i++)
        if (s->run[i]->id == id)
            return s->run[i];
    for (struct seq *q = s->q_head; q != NULL; q = q->next)
        if (q->id == id)
            return q;
    return NULL;
}

/* Nanoseconds from t0 to t1; 0 if the caller's clock went backwards. */
static uint64_t
elapsed(uint64_t t0, uint64_t t1)
{
    return t1 > t0 ? t1 - t0 : 0;
}

/* Positions still to feed: > 1 prefilling, 1 decoding. */
static int
seq_pending(const struct seq *q)
{
    return q->n_toks - q->kv.n_tokens;
}

/* ---- Statistics ---- */

static void
hist_add(struct eng_sched_hist *h, uint64_t ns)
{
    double ms = (double)ns / 1e6;
    int i = 0;
    while (i < ENG_SCHED_HIST_BUCKETS - 1 && ms > eng_sched_hist_le_ms[i])
        i++;
    h->counts[i]++;
    h->n++;
    h->sum_ms += ms;
}

static void
count_cancel(struct eng_sched *s, const char *reason)
{
    struct eng_sched_stats *st = &s->st;
    for (int i = 0; i < st->n_cancel_reasons; i++) {
        if (strcmp(st->cancels[i].reason, reason) == 0) {
            st->cancels[i].n++;
            return;
        }
    }
    if (st->n_cancel_reasons == ENG_SCHED_MAX_CANCEL_REASONS) {
        st->cancels_other++;
        return;
    }
    int i = st->n_cancel_reasons++;
    snprintf(st->cancels[i].reason, sizeof(st->cancels[i].reason), "%s", reason);
    st->cancels[i].n = 1;
}

/* ---- The one finish path ---- */

/* Removes q from wherever it is, returns its blocks, frees its sampler, emits DONE and frees it. */
static void
seq_finish(struct eng_sched *s, struct seq *q, enum eng_sched_finish f, int error, int32_t tok)
{
    uint64_t now = s->now;
    if (q->queued)
        queue_remove(s, q);
    else
        run_remove(s, q);
    eng_kv_seq_fini(s->kv, &q->kv);

    struct eng_sched_done d = {
        .finish = f,
        .cancel_reason = f == ENG_SCHED_FINISH_CANCELLED ? q->cancel_reason : "",
        .error = f == ENG_SCHED_FINISH_ERROR ? error : 0,
        .finish_token = tok,
        .prompt_tokens = q->n_prompt,
        .completion_tokens = q->n_gen,
        .cached_tokens = 0,
        .n_preempted = q->n_preempted,
        .queue_ns = elapsed(q->t_submit, q->accepted ? q->t_admit : now),
        .ttft_ns = q->n_gen > 0 ? elapsed(q->t_submit, q->t_first) : 0,
        .total_ns = elapsed(q->t_submit, now),
    };
    s->st.finished++;
    s->st.finished_by[f]++;
    if (f == ENG_SCHED_FINISH_CANCELLED)
        count_cancel(s, q->cancel_reason);
    CM_LOG(CM_LOG_DEBUG, "sched: done seq=%llu req=%llu finish=%s prompt=%d completion=%d",
           (unsigned long long)q->id, (unsigned long long)q->req_id, eng_sched_finish_name(f),
           q->n_prompt, q->n_gen);
    if (s->ev.on_done)
        s->ev.on_done(s->ev.ctx, q->owner, q->req_id, q->id, &d);
    seq_free(s, q);
}

/* ---- Requests ---- */

static int
req_check(const struct eng_sched *s, const struct eng_sched_req *r)
{
    if (r->prompt == NULL || r->n_prompt < 1 || r->max_tokens < 1 || r->n_stop < 0 ||
        (r->n_stop > 0 && r->stop_tokens == NULL))
        return -EINVAL;
    if (r->token_loop != 0 && (r->token_loop < 2 || r->token_loop > ENG_SCHED_MAX_TOKEN_LOOP))
        return -EINVAL;
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= s->model.n_vocab)
            return -EINVAL;
    for (int i = 0; i < r->n_stop; i++)
        if (r->stop_tokens[i] < 0 || r->stop_tokens[i] >= s->model.n_vocab)
            return -EINVAL;
    /* Room for the prompt and one generated token, in the context and in the whole pool. */
    if (r->n_prompt >= s->n_ctx_eff)
        return -E2BIG;
    return 0;
}

static int
seq_new(struct eng_sched *s, const struct eng_sched_req *r, uint64_t now, struct seq **out)
{
    struct seq *q = NULL;
    int rc = -ENOMEM;

    q = sched_calloc(1, sizeof(*q));
    if (q == NULL)
        goto err;
    eng_kv_seq_init(&q->kv);
    q->n_prompt = r->n_prompt;
    q->n_toks = r->n_prompt;
    q->max_tokens = r->max_tokens;
    long cap = (long)r->n_prompt + r->max_tokens;
    q->cap_toks = cap < s->n_ctx_eff ? (int)cap : s->n_ctx_eff;
    q->toks = sched_malloc((size_t)q->cap_toks * sizeof(*q->toks));
    if (q->toks == NULL)
        goto err;
    memcpy(q->toks, r->prompt, (size_t)r->n_prompt * sizeof(*q->toks));
    if (r->n_stop > 0) {
        q->stop = sched_malloc((size_t)r->n_stop * sizeof(*q->stop));
        if (q->stop == NULL)
            goto err;
        memcpy(q->stop, r->stop_tokens, (size_t)r->n_stop * sizeof(*q->stop));
        q->n_stop = r->n_stop;
    }
    struct eng_sampler_params sp = r->sampling;
    if (!r->logprobs)
        sp.top_logprobs = 0;
    rc = eng_sampler_new(&sp, s->model.n_vocab, &q->sampler);
    if (rc < 0)
        goto err;
    rc = -ENOMEM;
    if (sp.n_logit_bias > 0) {
        q->bias = sched_malloc((size_t)sp.n_logit_bias * sizeof(*q->bias));
        if (q->bias == NULL)
            goto err;
        memcpy(q->bias, sp.logit_bias, (size_t)sp.n_logit_bias * sizeof(*q->bias));
    }
    sp.logit_bias = q->bias;
    q->sp = sp;
    q->owner = r->owner;
    q->req_id = r->req_id;
    q->priority = r->priority;
    q->deadline_ns = r->deadline_ns;
    q->token_loop = r->token_loop;
    q->t_submit = now;
    *out = q;
    return 0;
err:
    if (q != NULL)
        seq_free(s, q);
    return rc;
}

int
eng_sched_submit(struct eng_sched *s, const struct eng_sched_req *req, uint64_t now_ns,
                 uint64_t *seq_id_out)
{
    struct seq *q = NULL;
    int rc = -EINVAL;

    if (s == NULL || req == NULL || seq_id_out == NULL)
        return -EINVAL;
    rc = req_check(s, req);
    if (rc < 0)
        goto rejected;
    if (s->n_queued >= s->cfg.max_queue) {
        s->st.rejected_full++;
        return -EAGAIN;
    }
    rc = seq_new(s, req, now_ns, &q);
    if (rc == -ENOMEM)
        return rc;
    if (rc < 0)
        goto rejected;
    if (now_ns > s->now)
        s->now = now_ns;
    q->id = s->next_id++;
    q->arrival = s->n_arrivals++;
    queue_insert(s, q);
    s->st.submitted++;
    s->st.prompt_tokens += (uint64_t)req->n_prompt;
    *seq_id_out = q->id;
    return 0;
rejected:
    s->st.rejected_invalid++;
    return rc;
}

static void
mark_cancel(struct seq *q, const char *reason)
{
    if (q->cancel)
        return;
    q->cancel = true;
    snprintf(q->cancel_reason, sizeof(q->cancel_reason), "%s", reason ? reason : "cancelled");
}

int
eng_sched_cancel(struct eng_sched *s, uint64_t seq_id, const char *reason)
{
    struct seq *q = seq_find(s, seq_id);
    if (q == NULL)
        return -ENOENT;
    mark_cancel(q, reason);
    return 0;
}

/* Marks every sequence of owner (any owner when all) cancelled; detaches owner. */
static int
cancel_where(struct eng_sched *s, const void *owner, bool all, const char *reason)
{
    int n = 0;
    for (int i = 0; i < s->n_run; i++) {
        struct seq *q = s->run[i];
        if (all || q->owner == owner) {
            mark_cancel(q, reason);
            if (!all)
                q->owner = NULL;
            n++;
        }
    }
    for (struct seq *q = s->q_head; q != NULL; q = q->next) {
        if (all || q->owner == owner) {
            mark_cancel(q, reason);
            if (!all)
                q->owner = NULL;
            n++;
        }
    }
    return n;
}

int
eng_sched_cancel_owner(struct eng_sched *s, const void *owner, const char *reason)
{
    if (owner == NULL)
        return 0;
    return cancel_where(s, owner, false, reason);
}

int
eng_sched_cancel_all(struct eng_sched *s, const char *reason)
{
    return cancel_where(s, NULL, true, reason);
}

int
eng_sched_pause(struct eng_sched *s, uint64_t seq_id, bool paused)
{
    struct seq *q = seq_find(s, seq_id);
    if (q == NULL)
        return -ENOENT;
    if (paused && !q->paused)
        q->paused_since = s->now;
    q->paused = paused;
    return 0;
}

/* ---- One tick ---- */

/* 1. Cancels and deadlines. */
static bool
expired(const struct eng_sched *s, const struct seq *q)
{
    return q->cancel || (q->deadline_ns != 0 && s->now >= q->deadline_ns);
}

static struct seq *
sweep_next(const struct eng_sched *s)
{
    for (struct seq *q = s->q_head; q != NULL; q = q->next)
        if (expired(s, q))
            return q;
    for (int i = 0; i < s->n_run; i++)
        if (expired(s, s->run[i]))
            return s->run[i];
    return NULL;
}

static void
sweep(struct eng_sched *s)
{
    /* Searched afresh after each finish: on_done may mark others, never remove them. */
    struct seq *q;
    while ((q = sweep_next(s)) != NULL)
        seq_finish(s, q, q->cancel ? ENG_SCHED_FINISH_CANCELLED : ENG_SCHED_FINISH_DEADLINE, 0, -1);
}

static bool
immune(const struct seq *q)
{
    return q->n_gen < q->immune_until;
}

/* The victim of a preemption: not recently re-admitted unless all are, then paused first, then
 * the fewest computed positions, then the latest admitted. */
static struct seq *
pick_victim(const struct eng_sched *s)
{
    struct seq *best = NULL;
    for (int i = 0; i < s->n_run; i++) {
        struct seq *q = s->run[i];
        if (best == NULL) {
            best = q;
            continue;
        }
        if (immune(q) != immune(best)) {
            if (!immune(q))
                best = q;
            continue;
        }
        if (q->paused != best->paused) {
            if (q->paused)
                best = q;
            continue;
        }
        if (q->kv.n_tokens != best->kv.n_tokens) {
            if (q->kv.n_tokens < best->kv.n_tokens)
                best = q;
            continue;
        }
        if (q->admit_order > best->admit_order)
            best = q;
    }
    return best;
}

/* ---- Spill ---- */

int
eng_sched_set_spill(struct eng_sched *s, const struct eng_sched_spill *sp)
{
    if (s == NULL || sp == NULL || s->n_arrivals > 0)
        return -EINVAL;
    if (sp->store != NULL &&
        (sp->n_layer < 1 || sp->kv_dim < 1 || sp->min_positions < 0 ||
         2 * (size_t)sp->n_layer * ENG_KV_BLOCK * (size_t)sp->kv_dim * sizeof(float) !=
             eng_kv_pool_block_bytes(s->kv)))
        return -EINVAL;
    s->spill = *sp;
    if (s->spill.min_positions == 0)
        s->spill.min_positions = ENG_KV_BLOCK;
    return 0;
}

static uint64_t
clock_now(const struct eng_sched *s)
{
    return s->model.now ? s->model.now(s->model.ctx) : s->now;
}

struct blocks_io {
    struct eng_kv_pool *pool;
    const struct eng_kv_seq *kv;
};

static void *
block_of(void *ctx, int kind, int i)
{
    struct blocks_io *b = ctx;
    if (i < 0 || i >= b->kv->n_blocks)
        return NULL;
    int32_t id = b->kv->table[i];
    return kind == 0 ? (void *)eng_kv_k(b->pool, id, 0) : (void *)eng_kv_v(b->pool, id, 0);
}

static struct spill_kv_shape
spill_shape(const struct eng_sched *s, int n_positions)
{
    return (struct spill_kv_shape){
        .dtype = SPILL_KV_F32,
        .n_layer = s->spill.n_layer,
        .kv_dim = s->spill.kv_dim,
        .block_tokens = ENG_KV_BLOCK,
        .n_positions = n_positions,
    };
}

/* The file's description of q (arrays borrowed from q). */
static void
spill_state_of(const struct eng_sched *s, const struct seq *q, struct spill_state *st)
{
    const struct eng_sampler_params *p = &q->sp;
    memset(st, 0, sizeof(*st));
    st->req_id = q->req_id;
    st->key = q->id;
    eng_sampler_get_rng(q->sampler, st->rng);
    st->sampling = (struct spill_sampling){
        .temperature = p->temperature,
        .top_k = p->top_k,
        .top_p = p->top_p,
        .min_p = p->min_p,
        .repetition_penalty = p->repetition_penalty,
        .repeat_last_n = p->repeat_last_n,
        .presence_penalty = p->presence_penalty,
        .frequency_penalty = p->frequency_penalty,
        .seed = p->seed,
        .top_logprobs = p->top_logprobs,
    };
    st->max_tokens = q->max_tokens;
    st->logprobs = p->top_logprobs > 0;
    st->token_loop = q->token_loop;
    st->priority = q->priority;
    st->n_prompt = q->n_prompt;
    st->n_generated = q->n_gen;
    st->tokens = q->toks;
    st->n_logit_bias = p->n_logit_bias;
    /* struct eng_logit_bias and struct spill_bias are both (int32 id, float bias). */
    _Static_assert(sizeof(struct eng_logit_bias) == sizeof(struct spill_bias), "bias layout");
    st->logit_bias = (const struct spill_bias *)(const void *)q->bias;
    st->n_stop = q->n_stop;
    st->stop = q->stop;
    st->kv = spill_shape(s, q->kv.n_tokens);
}

/* Writes q's KV to its file. Returns 0 or the spill error (the caller recomputes). */
static int
spill_out(struct eng_sched *s, struct seq *q)
{
    uint64_t t0 = clock_now(s);
    struct spill_state st;
    spill_state_of(s, q, &st);
    struct blocks_io b = {s->kv, &q->kv};
    struct spill_kv_io io = {&b, block_of};
    int rc = spill_write(s->spill.store, &st, &io);
    if (rc < 0) {
        s->st.spill_failures++;
        s->st.recompute_fallbacks++;
        CM_LOG(CM_LOG_WARN,
               "spill failed, recomputing instead req=%llu seq=%llu positions=%d rc=%d",
               (unsigned long long)q->req_id, (unsigned long long)q->id, q->kv.n_tokens, rc);
        return rc;
    }
    s->st.spills++;
    s->st.spill_bytes += spill_file_bytes(&st);
    hist_add(&s->st.spill_ms, elapsed(t0, clock_now(s)));
    q->on_disk = true;
    q->disk_positions = q->kv.n_tokens;
    return 0;
}

/* Whether the file's state is q's: the re-binding by request id, and a guard against a file
 * that is whole but not this sequence's. */
static bool
state_matches(const struct seq *q, const struct spill_state *st)
{
    uint64_t rng[4];
    eng_sampler_get_rng(q->sampler, rng);
    return st->req_id == q->req_id && st->n_prompt == q->n_prompt && st->n_generated == q->n_gen &&
           memcmp(st->tokens, q->toks, (size_t)q->n_toks * sizeof(*q->toks)) == 0 &&
           memcmp(st->rng, rng, sizeof(rng)) == 0 && st->max_tokens == q->max_tokens &&
           st->n_stop == q->n_stop &&
           (q->n_stop == 0 || memcmp(st->stop, q->stop, (size_t)q->n_stop * sizeof(*q->stop)) == 0);
}

/* Reads q's file into the blocks just reserved for it and deletes the file. A file that cannot
 * be read or verified leaves q to recompute from its tokens (kv.n_tokens 0). */
static void
restore_in(struct eng_sched *s, struct seq *q)
{
    uint64_t t0 = clock_now(s);
    struct spill_expect exp = {
        .kv = spill_shape(s, q->disk_positions),
        .max_positions = q->disk_positions,
        .max_tokens_total = q->n_toks,
    };
    struct blocks_io b = {s->kv, &q->kv};
    struct spill_kv_io io = {&b, block_of};
    struct spill_state *st = NULL;
    int rc = spill_read(s->spill.store, q->id, &exp, &io, &st);
    if (rc == 0 && !state_matches(q, st))
        rc = -EBADMSG;
    spill_state_free(st);
    spill_remove(s->spill.store, q->id);
    q->on_disk = false;
    if (rc < 0) {
        s->st.restore_failures++;
        s->st.recompute_fallbacks++;
        CM_LOG(CM_LOG_WARN, "restore failed, recomputing req=%llu seq=%llu positions=%d rc=%d",
               (unsigned long long)q->req_id, (unsigned long long)q->id, q->disk_positions, rc);
        q->kv.n_tokens = 0;
        return;
    }
    q->kv.n_tokens = q->disk_positions;
    s->st.restores++;
    hist_add(&s->st.restore_ms, elapsed(t0, clock_now(s)));
}

/* Preemption: spill when there is a store and enough to save, else (or when that fails)
 * recompute. Blocks back to the pool, tokens and sampler kept, front of the queue. */
static void
preempt(struct eng_sched *s, struct seq *q)
{
    bool spilled =
        s->spill.store != NULL && q->kv.n_tokens >= s->spill.min_positions && spill_out(s, q) == 0;
    CM_LOG(CM_LOG_DEBUG, "sched: preempt seq=%llu computed=%d blocks=%d spilled=%d",
           (unsigned long long)q->id, q->kv.n_tokens, q->kv.n_blocks, spilled);
    run_remove(s, q);
    eng_kv_seq_release(s->kv, &q->kv);
    q->preempted = true;
    q->n_preempted++;
    s->st.preemptions++;
    queue_insert(s, q);
}

/* Blocks the decoding, unpaused sequences need this tick. */
static int
growth_needed(const struct eng_sched *s)
{
    int need = 0;
    for (int i = 0; i < s->n_run; i++) {
        const struct seq *q = s->run[i];
        if (!q->paused && !q->cancel && seq_pending(q) == 1 &&
            eng_kv_blocks_for(q->n_toks) > q->kv.n_blocks)
            need++;
    }
    return need;
}

/* 2. One more block for every decoding sequence that needs one, preempting until they fit. */
static void
grow(struct eng_sched *s)
{
    while (s->n_run > 0 && growth_needed(s) > eng_kv_pool_n_free(s->kv)) {
        struct seq *v = pick_victim(s);
        /* Never true when n_ctx_eff holds (tokens stop at the pool's size), kept so that a
         * sequence that could never fit again is finished rather than requeued forever. */
        if (eng_kv_blocks_for(v->n_toks) > eng_kv_pool_n_blocks(s->kv))
            seq_finish(s, v, ENG_SCHED_FINISH_LENGTH, 0, -1);
        else
            preempt(s, v);
    }
    for (int i = 0; i < s->n_run; i++) {
        struct seq *q = s->run[i];
        if (q->paused || q->cancel || seq_pending(q) != 1)
            continue;
        int rc = eng_kv_seq_reserve(s->kv, &q->kv, q->n_toks);
        if (rc < 0) { /* -ENOMEM for the table: the pool had the blocks */
            seq_finish(s, q, ENG_SCHED_FINISH_ERROR, rc, -1);
            i--;
        }
    }
}

static bool
any_unpaused_running(const struct eng_sched *s)
{
    for (int i = 0; i < s->n_run; i++)
        if (!s->run[i]->paused)
            return true;
    return false;
}

/* The first queued sequence admission would consider (unpaused, not cancelled), or NULL. */
static struct seq *
queue_candidate(const struct eng_sched *s)
{
    for (struct seq *q = s->q_head; q != NULL; q = q->next)
        if (!q->paused && !q->cancel)
            return q;
    return NULL;
}

static bool
admissible(const struct eng_sched *s, const struct seq *q)
{
    if (s->n_run >= s->cfg.max_seqs)
        return false;
    int need = eng_kv_blocks_for(q->n_toks);
    int n_free = eng_kv_pool_n_free(s->kv);
    if (need > n_free)
        return false;
    return n_free - need >= s->cfg.watermark_blocks || !any_unpaused_running(s);
}

/* 3. Admission. */
static void
admit(struct eng_sched *s)
{
    struct seq *q;
    while ((q = queue_candidate(s)) != NULL && admissible(s, q)) {
        int rc = eng_kv_seq_reserve(s->kv, &q->kv, q->n_toks);
        if (rc < 0) {
            seq_finish(s, q, ENG_SCHED_FINISH_ERROR, rc, -1);
            continue;
        }
        queue_remove(s, q);
        if (q->preempted)
            q->immune_until = q->n_gen + ENG_SCHED_IMMUNITY;
        if (q->on_disk)
            restore_in(s, q);
        q->preempted = false;
        q->admit_order = ++s->n_admissions;
        s->run[s->n_run++] = q;
        if (!q->accepted) {
            q->accepted = true;
            q->t_admit = s->now;
            if (s->ev.on_accepted)
                s->ev.on_accepted(s->ev.ctx, q->owner, q->req_id, q->id, q->n_prompt, 0);
        }
    }
}

/* Appends q's next n positions to the batch; with_logits asks for the last one's logits. */
static void
batch_add(struct eng_sched *s, struct seq *q, int n, bool with_logits)
{
    int start = q->kv.n_tokens;
    for (int i = 0; i < n; i++) {
        int t = s->bn_tokens++;
        s->b_tokens[t] = q->toks[start + i];
        s->b_pos[t] = start + i;
        s->b_seqs[t] = &q->kv;
    }
    int m = s->bn_members++;
    s->b_members[m] = q;
    s->b_count[m] = n;
    s->b_row[m] = -1;
    if (with_logits) {
        s->b_row[m] = s->bn_logits;
        s->b_logits_idx[s->bn_logits++] = s->bn_tokens - 1;
    }
}

/* 4. One decode token per decoding sequence, then prefill chunks while the budget lasts. */
static void
build_batch(struct eng_sched *s)
{
    s->bn_tokens = s->bn_members = s->bn_logits = 0;
    for (int i = 0; i < s->n_run; i++) {
        struct seq *q = s->run[i];
        /* A sequence unpaused by a callback since grow() may still lack its block: next tick. */
        if (q->paused || q->cancel || seq_pending(q) != 1 ||
            eng_kv_blocks_for(q->n_toks) > q->kv.n_blocks)
            continue;
        batch_add(s, q, 1, true);
    }
    s->st.decode_tokens += (uint64_t)s->bn_tokens;
    for (int i = 0; i < s->n_run && s->bn_tokens < s->cfg.max_batch_tokens; i++) {
        struct seq *q = s->run[i];
        int pending = seq_pending(q);
        if (q->paused || q->cancel || pending <= 1)
            continue;
        int room = s->cfg.max_batch_tokens - s->bn_tokens;
        int n = pending < room ? pending : room;
        batch_add(s, q, n, n == pending);
        s->st.prefill_tokens += (uint64_t)n;
    }
}

static bool
is_stop(const struct seq *q, int32_t id)
{
    for (int i = 0; i < q->n_stop; i++)
        if (q->stop[i] == id)
            return true;
    return false;
}

/* 6. Samples q's next token from its logits row, emits it, finishes q when it ends. */
static void
emit_one(struct eng_sched *s, struct seq *q, float *logits)
{
    if (q->cancel) {
        seq_finish(s, q, ENG_SCHED_FINISH_CANCELLED, 0, -1);
        return;
    }
    struct eng_sample smp;
    int rc = eng_sampler_sample(q->sampler, logits, q->toks + q->n_prompt, q->n_gen, &smp);
    if (rc < 0) {
        seq_finish(s, q, ENG_SCHED_FINISH_ERROR, rc, -1);
        return;
    }
    q->toks[q->n_toks++] = smp.id;
    q->n_gen++;
    s->st.generated_tokens++;
    if (q->n_gen == 1) {
        q->t_first = s->now;
        hist_add(&s->st.ttft, elapsed(q->t_submit, s->now));
    } else {
        hist_add(&s->st.itl, elapsed(q->t_last, s->now));
    }
    q->t_last = s->now;

    if (s->model.is_eog != NULL && s->model.is_eog(s->model.ctx, smp.id)) {
        seq_finish(s, q, ENG_SCHED_FINISH_EOS, 0, smp.id);
        return;
    }
    if (is_stop(q, smp.id)) {
        seq_finish(s, q, ENG_SCHED_FINISH_STOP_TOKEN, 0, smp.id);
        return;
    }
    if (s->ev.on_token)
        s->ev.on_token(s->ev.ctx, q->owner, q->req_id, q->id, &smp, q->n_gen - 1);
    if (q->token_loop > 0 && !q->cancel &&
        guard_token_loop_check(q->toks + q->n_prompt, q->n_gen, q->token_loop)) {
        const char *name = guard_name(GUARD_TOKEN_LOOP);
        CM_LOG(CM_LOG_WARN, "guard trip req=%llu seq=%llu guard=%s completion_tokens=%d",
               (unsigned long long)q->req_id, (unsigned long long)q->id, name, q->n_gen);
        s->st.guard_trips[GUARD_TOKEN_LOOP]++;
        mark_cancel(q, name);
        seq_finish(s, q, ENG_SCHED_FINISH_CANCELLED, 0, -1);
        return;
    }
    /* The context (or the whole pool) cannot take the token just emitted: stop here. */
    if (q->n_gen >= q->max_tokens || q->n_toks >= s->n_ctx_eff)
        seq_finish(s, q, ENG_SCHED_FINISH_LENGTH, 0, -1);
}

/* 5. and 6. */
static void
run_batch(struct eng_sched *s)
{
    struct eng_batch b = {
        .n_tokens = s->bn_tokens,
        .tokens = s->b_tokens,
        .pos = s->b_pos,
        .seqs = s->b_seqs,
        .n_logits = s->bn_logits,
        .logits_idx = s->b_logits_idx,
    };
    int rc = s->model.forward(s->model.ctx, s->kv, &b, s->logits);
    if (s->model.now)
        s->now = s->model.now(s->model.ctx);
    s->st.ticks++;
    s->st.batch_tokens += (uint64_t)s->bn_tokens;
    if (rc < 0) {
        CM_LOG(CM_LOG_ERROR, "sched: forward failed rc=%d tokens=%d seqs=%d", rc, s->bn_tokens,
               s->bn_members);
        for (int m = 0; m < s->bn_members; m++)
            seq_finish(s, s->b_members[m], ENG_SCHED_FINISH_ERROR, rc, -1);
        return;
    }
    for (int m = 0; m < s->bn_members; m++)
        s->b_members[m]->kv.n_tokens += s->b_count[m];
    /* Members are only ever finished here, one at a time, so later ones stay valid. */
    for (int m = 0; m < s->bn_members; m++) {
        if (s->b_row[m] >= 0)
            emit_one(s, s->b_members[m],
                     s->logits + (size_t)s->b_row[m] * (size_t)s->model.n_vocab);
    }
}

int
eng_sched_step(struct eng_sched *s, uint64_t now_ns)
{
    s->now = now_ns;
    s->st.steps++;
    sweep(s);
    grow(s);
    admit(s);
    build_batch(s);
    if (s->bn_tokens == 0)
        return 0;
    int n = s->bn_tokens;
    run_batch(s);
    return n;
}

bool
eng_sched_has_work(const struct eng_sched *s)
{
    for (const struct seq *q = s->q_head; q != NULL; q = q->next)
        if (q->cancel)
            return true;
    for (int i = 0; i < s->n_run; i++)
        if (s->run[i]->cancel || !s->run[i]->paused)
            return true;
    const struct seq *q = queue_candidate(s);
    return q != NULL && admissible(s, q);
}

uint64_t
eng_sched_next_deadline(const struct eng_sched *s)
{
    uint64_t best = 0;
    for (const struct seq *q = s->q_head; q != NULL; q = q->next)
        if (q->deadline_ns != 0 && (best == 0 || q->deadline_ns < best))
            best = q->deadline_ns;
    for (int i = 0; i < s->n_run; i++) {
        uint64_t d = s->run[i]->deadline_ns;
        if (d != 0 && (best == 0 || d < best))
            best = d;
    }
    return best;
}

/* ---- Queries ---- */

int
eng_sched_seq_info(const struct eng_sched *s, uint64_t seq_id, struct eng_sched_seq_info *out)
{
    const struct seq *q = seq_find(s, seq_id);
    if (q == NULL)
        return -ENOENT;
    if (q->queued)
        out->state = ENG_SCHED_QUEUED;
    else
        out->state = seq_pending(q) > 1 ? ENG_SCHED_PREFILL : ENG_SCHED_DECODE;
    out->paused = q->paused;
    out->cancel_pending = q->cancel;
    out->paused_since_ns = q->paused ? q->paused_since : 0;
    out->n_prompt = q->n_prompt;
    out->n_generated = q->n_gen;
    out->n_computed = q->kv.n_tokens;
    out->n_blocks = q->kv.n_blocks;
    out->n_preempted = q->n_preempted;
    out->on_disk = q->on_disk;
    return 0;
}

void
eng_sched_get_stats(const struct eng_sched *s, struct eng_sched_stats *out)
{
    *out = s->st;
    out->running = s->n_run;
    out->queued = s->n_queued;
    out->paused = 0;
    for (int i = 0; i < s->n_run; i++)
        out->paused += s->run[i]->paused;
    for (const struct seq *q = s->q_head; q != NULL; q = q->next)
        out->paused += q->paused;
    out->kv_blocks_total = eng_kv_pool_n_blocks(s->kv);
    out->kv_blocks_used = out->kv_blocks_total - eng_kv_pool_n_free(s->kv);
    out->on_disk = s->spill.store ? spill_store_n_files(s->spill.store) : 0;
    out->disk_bytes = s->spill.store ? spill_store_bytes(s->spill.store) : 0;
}

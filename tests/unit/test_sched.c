/*
 * Unit tests for engine/sched, the continuous-batching scheduler, on a fake model.
 *
 * The fake model keeps its state in the real paged KV pool: for every batch token it writes the
 * token id (K) and its position (V) to the sequence's block, and the logits of a token come from a
 * hash of everything the sequence's blocks hold at positions 0..pos. So a wrong block table, a
 * stale block, a lost position or a mixed-up sequence changes the output, and a reference that
 * runs the same hash over a plain array (ref_generate) says what every request must produce,
 * alone or in any batch. The fake also checks each batch's shape (budget, contiguous positions
 * starting at the sequence's computed length, reserved blocks, logits rows at the end of each
 * sequence's run) and counts violations; every test asserts there are none.
 * Time is a counter advanced 1 ms per tick: no clock, no sleeps.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/sched.h"
#include "guards/guard.h"
#include "spill/spill.h"

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#define N_VOCAB 64
#define MAX_IDS 2048 /* seq ids a test may use */
#define MAX_TOK 512  /* tokens a request may hold */
#define TICK_NS 1000000ull

/* ---- The fake model ---- */

struct fake {
    int n_vocab;
    int max_batch_tokens;
    int max_logits;
    int32_t eog;   /* -1: none */
    int fail_call; /* 1-based forward call that fails with -ENOMEM; 0: none */
    int calls;
    int violations;
    int last_n_tokens;
    int last_n_logits;
    int mixed_batches; /* batches holding a decode token and a prefill chunk */
    int cycle;         /* > 0: the next token is (last token + 1) % cycle by a wide margin */
};

static uint32_t
hash_step(uint32_t h, int32_t tok, int pos)
{
    h ^= (uint32_t)tok * 0x9e3779b1u + (uint32_t)pos;
    h *= 16777619u;
    return h ^ (h >> 15);
}

static void
fill_logits(uint32_t h, float *logits, int n_vocab)
{
    uint32_t x = h * 2654435761u + 12345u;
    for (int j = 0; j < n_vocab; j++) {
        x = x * 1664525u + 1013904223u;
        logits[j] = (float)(x >> 8) / 16777216.0f;
    }
    logits[h % (uint32_t)n_vocab] = 4.0f;
}

static float *
kv_row(struct eng_kv_pool *kv, const struct eng_kv_seq *s, int pos, bool v)
{
    int32_t b = s->table[pos / ENG_KV_BLOCK];
    float *base = v ? eng_kv_v(kv, b, 0) : eng_kv_k(kv, b, 0);
    return base + (size_t)(pos % ENG_KV_BLOCK) * 2;
}

/* Shape checks of one batch; returns the number of violations. */
static int
fake_check_batch(const struct fake *f, const struct eng_batch *b, int *mixed)
{
    int bad = 0;
    bool has_decode = false, has_prefill = false;
    if (b->n_tokens < 1 || b->n_tokens > f->max_batch_tokens || b->n_logits < 0 ||
        b->n_logits > f->max_logits)
        return 1;
    for (int i = 0; i < b->n_tokens; i++) {
        const struct eng_kv_seq *s = b->seqs[i];
        if (b->tokens[i] < 0 || b->tokens[i] >= f->n_vocab)
            bad++;
        if (b->pos[i] / ENG_KV_BLOCK >= s->n_blocks)
            bad++;
        if (i > 0 && b->seqs[i - 1] == s) {
            if (b->pos[i] != b->pos[i - 1] + 1)
                bad++;
            continue;
        }
        if (b->pos[i] != s->n_tokens)
            bad++;
        for (int j = 0; j < i; j++)
            if (b->seqs[j] == s)
                bad++; /* a sequence's tokens are not contiguous */
        int n = 1;
        while (i + n < b->n_tokens && b->seqs[i + n] == s)
            n++;
        if (n == 1)
            has_decode = true;
        else
            has_prefill = true;
    }
    for (int r = 0; r < b->n_logits; r++) {
        int idx = b->logits_idx[r];
        if (idx < 0 || idx >= b->n_tokens || (r > 0 && idx <= b->logits_idx[r - 1]))
            return bad + 1;
        if (idx + 1 < b->n_tokens && b->seqs[idx + 1] == b->seqs[idx])
            bad++; /* logits of a token that is not its sequence's last */
    }
    *mixed = has_decode && has_prefill;
    return bad;
}

static int
fake_forward(void *ctx, struct eng_kv_pool *kv, const struct eng_batch *b, float *logits)
{
    struct fake *f = ctx;
    int mixed = 0;
    f->calls++;
    int bad = fake_check_batch(f, b, &mixed);
    f->violations += bad;
    if (bad)
        return -EINVAL;
    f->mixed_batches += mixed;
    f->last_n_tokens = b->n_tokens;
    f->last_n_logits = b->n_logits;
    if (f->fail_call == f->calls)
        return -ENOMEM;
    for (int i = 0; i < b->n_tokens; i++) {
        kv_row(kv, b->seqs[i], b->pos[i], false)[0] = (float)b->tokens[i];
        kv_row(kv, b->seqs[i], b->pos[i], true)[0] = (float)b->pos[i];
    }
    for (int r = 0; r < b->n_logits; r++) {
        int idx = b->logits_idx[r];
        const struct eng_kv_seq *s = b->seqs[idx];
        uint32_t h = 2166136261u;
        for (int p = 0; p <= b->pos[idx]; p++) {
            if (kv_row(kv, s, p, true)[0] != (float)p)
                f->violations++;
            h = hash_step(h, (int32_t)kv_row(kv, s, p, false)[0], p);
        }
        fill_logits(h, logits + (size_t)r * (size_t)f->n_vocab, f->n_vocab);
        if (f->cycle > 0) {
            int32_t last = (int32_t)kv_row(kv, s, b->pos[idx], false)[0];
            logits[(size_t)r * (size_t)f->n_vocab + (size_t)((last + 1) % f->cycle)] = 20.0f;
        }
    }
    return 0;
}

static bool
fake_is_eog(void *ctx, int32_t id)
{
    const struct fake *f = ctx;
    return id == f->eog;
}

/* ---- The reference: one request alone, no batching, no KV ---- */

struct ref {
    int n;
    int32_t toks[MAX_TOK];
    enum eng_sched_finish finish;
    int completion; /* sampled tokens, the finishing one included */
};

static void
ref_generate(const struct fake *f, const int32_t *prompt, int n_prompt, int max_tokens, int n_ctx,
             const struct eng_sampler_params *p, const int32_t *stop, int n_stop, struct ref *out)
{
    int32_t hist[MAX_TOK + 8];
    float logits[N_VOCAB];
    struct eng_sampler *sm = NULL;
    assert_true(n_prompt + max_tokens <= MAX_TOK);
    assert_int_equal(eng_sampler_new(p, f->n_vocab, &sm), 0);
    memcpy(hist, prompt, (size_t)n_prompt * sizeof(*hist));
    int n = n_prompt;
    out->n = 0;
    for (;;) {
        uint32_t h = 2166136261u;
        for (int i = 0; i < n; i++)
            h = hash_step(h, hist[i], i);
        fill_logits(h, logits, f->n_vocab);
        struct eng_sample smp;
        assert_int_equal(eng_sampler_sample(sm, logits, hist + n_prompt, n - n_prompt, &smp), 0);
        hist[n++] = smp.id;
        bool stopped = false;
        for (int i = 0; i < n_stop; i++)
            stopped |= stop[i] == smp.id;
        if (smp.id == f->eog) {
            out->finish = ENG_SCHED_FINISH_EOS;
            break;
        }
        if (stopped) {
            out->finish = ENG_SCHED_FINISH_STOP_TOKEN;
            break;
        }
        out->toks[out->n++] = smp.id;
        if (n - n_prompt >= max_tokens || n >= n_ctx) {
            out->finish = ENG_SCHED_FINISH_LENGTH;
            break;
        }
    }
    out->completion = n - n_prompt;
    eng_sampler_free(sm);
}

static void
make_prompt(int32_t *p, int n, uint32_t seed)
{
    uint32_t x = seed * 747796405u + 2891336453u;
    for (int i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        p[i] = (int32_t)((x >> 10) % N_VOCAB);
    }
}

static struct eng_sampler_params
greedy(void)
{
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.temperature = 0.0f;
    return p;
}

static struct eng_sampler_params
sampled(uint64_t seed)
{
    struct eng_sampler_params p;
    eng_sampler_params_default(&p);
    p.temperature = 0.9f;
    p.top_k = 20;
    p.seed = seed;
    return p;
}

/* ---- The harness: a scheduler, its pool and what its events said ---- */

struct rec {
    bool used;
    int n_accepted;
    int n_done;
    int n_toks;
    int32_t toks[MAX_TOK];
    void *owner_seen;
    struct eng_sched_done done;
    char reason[ENG_SCHED_REASON_MAX];
    void *done_owner;
    /* the request, for ref_generate */
    int32_t prompt[MAX_TOK];
    int n_prompt;
    int max_tokens;
    struct eng_sampler_params sp;
    int32_t stop[4];
    int n_stop;
    uint64_t deadline;
    bool cancelled_by_test;
};

struct h {
    struct fake fake;
    struct eng_kv_pool *kv;
    struct eng_sched *s;
    struct eng_sched_config cfg;
    int n_ctx;
    uint64_t now;
    struct rec *recs; /* (MAX_IDS) by seq id */
    int bad_events;
    int n_done;
    /* optional hook run after each TOKEN */
    void (*token_hook)(struct h *h, uint64_t seq_id, int index);
    uint64_t hook_arg;
};

static void
ev_accepted(void *ctx, void *owner, uint64_t req_id, uint64_t seq_id, int prompt_tokens,
            int cached_tokens)
{
    struct h *h = ctx;
    if (seq_id == 0 || seq_id >= MAX_IDS || req_id != seq_id * 10) {
        h->bad_events++;
        return;
    }
    struct rec *r = &h->recs[seq_id];
    if (r->n_accepted || r->n_done || prompt_tokens != r->n_prompt || cached_tokens != 0)
        h->bad_events++;
    r->n_accepted++;
    r->owner_seen = owner;
}

static void
ev_token(void *ctx, void *owner, uint64_t req_id, uint64_t seq_id, const struct eng_sample *tok,
         int index)
{
    struct h *h = ctx;
    (void)owner;
    if (seq_id == 0 || seq_id >= MAX_IDS || req_id != seq_id * 10) {
        h->bad_events++;
        return;
    }
    struct rec *r = &h->recs[seq_id];
    if (r->n_done || !r->n_accepted || index != r->n_toks || r->n_toks >= MAX_TOK ||
        !(tok->logprob <= 0.0f))
        h->bad_events++;
    else
        r->toks[r->n_toks++] = tok->id;
    if (h->token_hook)
        h->token_hook(h, seq_id, index);
}

static void
ev_done(void *ctx, void *owner, uint64_t req_id, uint64_t seq_id, const struct eng_sched_done *d)
{
    struct h *h = ctx;
    if (seq_id == 0 || seq_id >= MAX_IDS || req_id != seq_id * 10) {
        h->bad_events++;
        return;
    }
    struct rec *r = &h->recs[seq_id];
    if (r->n_done)
        h->bad_events++;
    r->n_done++;
    r->done = *d;
    snprintf(r->reason, sizeof(r->reason), "%s", d->cancel_reason ? d->cancel_reason : "(null)");
    r->done.cancel_reason = NULL;
    r->done_owner = owner;
    h->n_done++;
}

static struct h *
h_new_cfg(int n_blocks, int n_ctx, const struct eng_sched_config *cfg)
{
    struct h *h = calloc(1, sizeof(*h));
    assert_non_null(h);
    h->recs = calloc(MAX_IDS, sizeof(*h->recs));
    assert_non_null(h->recs);
    h->cfg = *cfg;
    h->n_ctx = n_ctx;
    h->fake.n_vocab = N_VOCAB;
    h->fake.max_batch_tokens = cfg->max_batch_tokens;
    h->fake.max_logits = cfg->max_seqs;
    h->fake.eog = -1;
    assert_int_equal(eng_kv_pool_new(1, 2, n_blocks, &h->kv), 0);
    struct eng_sched_model m = {
        .ctx = &h->fake,
        .n_vocab = N_VOCAB,
        .n_ctx = n_ctx,
        .forward = fake_forward,
        .is_eog = fake_is_eog,
    };
    struct eng_sched_events ev = {
        .ctx = h,
        .on_accepted = ev_accepted,
        .on_token = ev_token,
        .on_done = ev_done,
    };
    assert_int_equal(eng_sched_new(cfg, &m, h->kv, &ev, &h->s), 0);
    h->now = 1000 * TICK_NS;
    return h;
}

static struct h *
h_new(int n_blocks, int n_ctx, int max_seqs, int max_batch_tokens)
{
    struct eng_sched_config cfg;
    eng_sched_config_default(&cfg);
    cfg.max_seqs = max_seqs;
    cfg.max_batch_tokens = max_batch_tokens;
    cfg.watermark_blocks = 1;
    return h_new_cfg(n_blocks, n_ctx, &cfg);
}

static void
h_free(struct h *h)
{
    eng_sched_free(h->s);
    eng_kv_pool_free(h->kv);
    free(h->recs);
    free(h);
}

/* Submits a request (token_loop: the guard's repeats, 0 off); returns the seq id, or 0 with *rc
 * set when rejected. */
static uint64_t
h_submit_loop(struct h *h, const int32_t *prompt, int n_prompt, int max_tokens,
              const struct eng_sampler_params *sp, const int32_t *stop, int n_stop, void *owner,
              uint64_t deadline, int priority, int token_loop, int *rc_out)
{
    struct eng_sched_req req = {
        .token_loop = token_loop,
        .prompt = prompt,
        .n_prompt = n_prompt,
        .max_tokens = max_tokens,
        .sampling = *sp,
        .logprobs = true,
        .stop_tokens = stop,
        .n_stop = n_stop,
        .deadline_ns = deadline,
        .priority = priority,
        .owner = owner,
    };
    uint64_t id = 0;
    /* req_id is checked against seq_id * 10 by the events: ids are handed out in order. */
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    req.req_id = (st.submitted + 1) * 10;
    int rc = eng_sched_submit(h->s, &req, h->now, &id);
    if (rc_out)
        *rc_out = rc;
    if (rc < 0)
        return 0;
    assert_true(id > 0 && id < MAX_IDS);
    assert_int_equal(id, st.submitted + 1);
    struct rec *r = &h->recs[id];
    r->used = true;
    memcpy(r->prompt, prompt, (size_t)n_prompt * sizeof(*prompt));
    r->n_prompt = n_prompt;
    r->max_tokens = max_tokens;
    r->sp = *sp;
    if (n_stop > 0)
        memcpy(r->stop, stop, (size_t)n_stop * sizeof(*stop));
    r->n_stop = n_stop;
    r->deadline = deadline;
    return id;
}

static uint64_t
h_submit_ex(struct h *h, const int32_t *prompt, int n_prompt, int max_tokens,
            const struct eng_sampler_params *sp, const int32_t *stop, int n_stop, void *owner,
            uint64_t deadline, int priority, int *rc_out)
{
    return h_submit_loop(h, prompt, n_prompt, max_tokens, sp, stop, n_stop, owner, deadline,
                         priority, 0, rc_out);
}

static uint64_t
h_submit(struct h *h, int n_prompt, uint32_t seed, int max_tokens,
         const struct eng_sampler_params *sp)
{
    int32_t prompt[MAX_TOK];
    make_prompt(prompt, n_prompt, seed);
    int rc = 0;
    uint64_t id = h_submit_ex(h, prompt, n_prompt, max_tokens, sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, 0);
    return id;
}

static int
n_ctx_eff(const struct h *h)
{
    int pool = eng_kv_pool_n_blocks(h->kv) * ENG_KV_BLOCK;
    return pool < h->n_ctx ? pool : h->n_ctx;
}

static void
h_ref(const struct h *h, uint64_t id, struct ref *out)
{
    const struct rec *r = &h->recs[id];
    ref_generate(&h->fake, r->prompt, r->n_prompt, r->max_tokens, n_ctx_eff(h), &r->sp, r->stop,
                 r->n_stop, out);
}

/* Sum of blocks held by live sequences must equal the pool's used blocks. */
static void
h_check_blocks(const struct h *h)
{
    int held = 0;
    for (uint64_t id = 1; id < MAX_IDS; id++) {
        struct eng_sched_seq_info info;
        if (!h->recs[id].used || h->recs[id].n_done)
            continue;
        assert_int_equal(eng_sched_seq_info(h->s, id, &info), 0);
        held += info.n_blocks;
        if (info.state == ENG_SCHED_QUEUED)
            assert_int_equal(info.n_blocks, 0);
    }
    assert_int_equal(held, eng_kv_pool_n_blocks(h->kv) - eng_kv_pool_n_free(h->kv));
}

/* Tokens sampled so far by id (emitted ones, plus a finishing EOS / stop token). */
static int
sampled_count(const struct h *h, uint64_t id)
{
    const struct rec *r = &h->recs[id];
    int n = r->n_toks;
    if (r->n_done &&
        (r->done.finish == ENG_SCHED_FINISH_EOS || r->done.finish == ENG_SCHED_FINISH_STOP_TOKEN))
        n++;
    return n;
}

/*
 * One tick, checked: with strict set, every sequence that was decoding, unpaused and not cancelled
 * before the tick samples exactly one token in it (preemption would excuse one, so strict tests run
 * with a roomy pool); sequences that were paused sample none. Returns the batch size.
 */
static int
h_step_ex(struct h *h, bool strict)
{
    static int before[MAX_IDS];
    static signed char expect[MAX_IDS]; /* 1: one token, 0: none, -1: anything */
    for (uint64_t id = 1; id < MAX_IDS; id++) {
        struct eng_sched_seq_info info;
        expect[id] = -1;
        if (!h->recs[id].used || h->recs[id].n_done)
            continue;
        assert_int_equal(eng_sched_seq_info(h->s, id, &info), 0);
        before[id] = sampled_count(h, id);
        if (info.paused)
            expect[id] = 0;
        else if (strict && info.state == ENG_SCHED_DECODE && !info.cancel_pending &&
                 (h->recs[id].deadline == 0 || h->recs[id].deadline > h->now + TICK_NS))
            expect[id] = 1;
    }
    h->now += TICK_NS;
    int n = eng_sched_step(h->s, h->now);
    assert_true(n >= 0 && n <= h->cfg.max_batch_tokens);
    for (uint64_t id = 1; id < MAX_IDS; id++) {
        if (expect[id] < 0)
            continue;
        assert_int_equal(sampled_count(h, id) - before[id], expect[id]);
    }
    assert_int_equal(h->bad_events, 0);
    assert_int_equal(h->fake.violations, 0);
    h_check_blocks(h);
    return n;
}

static int
h_step(struct h *h)
{
    return h_step_ex(h, true);
}

/* Steps until every submitted request is done (bounded). */
static void
h_run_all(struct h *h, bool strict)
{
    struct eng_sched_stats st;
    for (int i = 0; i < 100000; i++) {
        eng_sched_get_stats(h->s, &st);
        if (st.running == 0 && st.queued == 0)
            break;
        h_step_ex(h, strict);
    }
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.running + st.queued, 0);
    assert_int_equal(eng_kv_pool_n_free(h->kv), eng_kv_pool_n_blocks(h->kv));
}

static void
assert_matches_ref(const struct h *h, uint64_t id)
{
    struct ref ref;
    const struct rec *r = &h->recs[id];
    h_ref(h, id, &ref);
    assert_int_equal(r->n_done, 1);
    assert_int_equal(r->done.finish, ref.finish);
    assert_int_equal(r->n_toks, ref.n);
    assert_memory_equal(r->toks, ref.toks, (size_t)ref.n * sizeof(int32_t));
    assert_int_equal(r->done.completion_tokens, ref.completion);
    assert_int_equal(r->done.prompt_tokens, r->n_prompt);
}

/* r's tokens are a prefix of what it would produce alone. */
static void
assert_prefix_of_ref(const struct h *h, uint64_t id)
{
    struct ref ref;
    const struct rec *r = &h->recs[id];
    h_ref(h, id, &ref);
    assert_true(r->n_toks <= ref.n);
    assert_memory_equal(r->toks, ref.toks, (size_t)r->n_toks * sizeof(int32_t));
}

/* ---- Single requests ---- */

static void
test_sched_single_length(void **state)
{
    (void)state;
    struct h *h = h_new(64, 256, 4, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t id = h_submit(h, 7, 1, 10, &sp);
    assert_int_equal(h_step(h), 7); /* the whole prompt, then the first token */
    assert_int_equal(h->recs[id].n_accepted, 1);
    assert_int_equal(h->recs[id].n_toks, 1);
    for (int i = 0; i < 9; i++)
        assert_int_equal(h_step(h), 1);
    assert_int_equal(h->recs[id].n_done, 1);
    assert_int_equal(h->recs[id].done.finish, ENG_SCHED_FINISH_LENGTH);
    assert_int_equal(h->recs[id].done.finish_token, -1);
    assert_int_equal(h->recs[id].n_toks, 10);
    assert_matches_ref(h, id);
    assert_int_equal(h->recs[id].done.ttft_ns, TICK_NS);
    assert_int_equal(h->recs[id].done.total_ns, 10 * TICK_NS);
    assert_int_equal(h_step(h), 0); /* nothing left */
    assert_int_equal(eng_kv_pool_n_free(h->kv), 64);
    assert_int_equal(eng_sched_cancel(h->s, id, "late"), -ENOENT);
    h_free(h);
}

/* The first index k >= 1 whose token does not occur before it in ref. */
static int
first_fresh_index(const struct ref *ref)
{
    for (int k = 1; k < ref->n; k++) {
        bool seen = false;
        for (int j = 0; j < k; j++)
            seen |= ref->toks[j] == ref->toks[k];
        if (!seen)
            return k;
    }
    fail_msg("no fresh token in the reference");
    return -1;
}

static void
test_sched_single_eos(void **state)
{
    (void)state;
    struct h *h = h_new(64, 256, 4, 64);
    struct eng_sampler_params sp = greedy();
    struct ref ref;
    int32_t prompt[5];
    make_prompt(prompt, 5, 2);
    ref_generate(&h->fake, prompt, 5, 30, 256, &sp, NULL, 0, &ref);
    int k = first_fresh_index(&ref);
    h->fake.eog = ref.toks[k];

    uint64_t id = h_submit(h, 5, 2, 30, &sp);
    h_run_all(h, true);
    struct rec *r = &h->recs[id];
    assert_int_equal(r->done.finish, ENG_SCHED_FINISH_EOS);
    assert_int_equal(r->done.finish_token, ref.toks[k]);
    assert_int_equal(r->n_toks, k); /* the EOS itself is not emitted */
    assert_int_equal(r->done.completion_tokens, k + 1);
    assert_matches_ref(h, id);
    h_free(h);
}

static void
test_sched_single_stop_token(void **state)
{
    (void)state;
    struct h *h = h_new(64, 256, 4, 64);
    struct eng_sampler_params sp = greedy();
    struct ref ref;
    int32_t prompt[9];
    make_prompt(prompt, 9, 3);
    ref_generate(&h->fake, prompt, 9, 30, 256, &sp, NULL, 0, &ref);
    int k = first_fresh_index(&ref);
    int32_t stop[2] = {N_VOCAB - 1 == ref.toks[k] ? 0 : N_VOCAB - 1, ref.toks[k]};
    /* the decoy must not occur before k either */
    for (int j = 0; j < k; j++)
        if (ref.toks[j] == stop[0])
            stop[0] = ref.toks[k];

    int rc = 0;
    uint64_t id = h_submit_ex(h, prompt, 9, 30, &sp, stop, 2, NULL, 0, 0, &rc);
    assert_int_equal(rc, 0);
    h_run_all(h, true);
    struct rec *r = &h->recs[id];
    assert_int_equal(r->done.finish, ENG_SCHED_FINISH_STOP_TOKEN);
    assert_int_equal(r->done.finish_token, ref.toks[k]);
    assert_int_equal(r->n_toks, k);
    assert_matches_ref(h, id);
    h_free(h);
}

static void
test_sched_context_full(void **state)
{
    (void)state;
    struct h *h = h_new(64, 40, 4, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t id = h_submit(h, 30, 4, 100, &sp);
    h_run_all(h, true);
    assert_int_equal(h->recs[id].done.finish, ENG_SCHED_FINISH_LENGTH);
    assert_int_equal(h->recs[id].n_toks, 10); /* 30 + 10 = n_ctx */
    assert_matches_ref(h, id);
    h_free(h);
}

/* A sequence that alone outgrows the whole pool ends with "length" where the pool ends. */
static void
test_sched_pool_smaller_than_context(void **state)
{
    (void)state;
    struct h *h = h_new(4, 1000, 4, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t id = h_submit(h, 10, 5, 100, &sp);
    h_run_all(h, true);
    assert_int_equal(h->recs[id].done.finish, ENG_SCHED_FINISH_LENGTH);
    assert_int_equal(h->recs[id].n_toks, 4 * ENG_KV_BLOCK - 10);
    assert_matches_ref(h, id);
    h_free(h);
}

/* ---- Batching ---- */

static void
test_sched_batching_invariance(void **state)
{
    (void)state;
    static const int lens[8] = {5, 17, 33, 1, 64, 100, 3, 48};
    static const int maxt[8] = {20, 31, 25, 40, 22, 35, 28, 30};
    struct h *h = h_new(256, 512, 8, 64);
    uint64_t ids[8];
    for (int i = 0; i < 8; i++) {
        struct eng_sampler_params sp = (i % 2) ? sampled(100 + (uint64_t)i) : greedy();
        ids[i] = h_submit(h, lens[i], 10 + (uint32_t)i, maxt[i], &sp);
        /* staggered arrivals: prefill chunks land in batches that already decode */
        if (i % 3 == 2)
            h_step(h);
    }
    h_run_all(h, true);
    for (int i = 0; i < 8; i++)
        assert_matches_ref(h, ids[i]);
    assert_true(h->fake.mixed_batches > 0);

    /* And each alone, in a fresh scheduler, produces the same as in the batch. */
    for (int i = 0; i < 8; i++) {
        struct h *a = h_new(256, 512, 8, 64);
        struct eng_sampler_params sp = (i % 2) ? sampled(100 + (uint64_t)i) : greedy();
        uint64_t id = h_submit(a, lens[i], 10 + (uint32_t)i, maxt[i], &sp);
        h_run_all(a, true);
        assert_int_equal(a->recs[id].n_toks, h->recs[ids[i]].n_toks);
        assert_memory_equal(a->recs[id].toks, h->recs[ids[i]].toks,
                            (size_t)a->recs[id].n_toks * sizeof(int32_t));
        h_free(a);
    }
    h_free(h);
}

static void
test_sched_chunked_prefill(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 4, 16);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 4, 20, 50, &sp);
    assert_int_equal(h_step(h), 4);
    uint64_t b = h_submit(h, 100, 21, 5, &sp);
    /* Each tick: A's decode token, then 15 of B's prompt (the budget is 16). */
    for (int t = 1; t <= 6; t++) {
        assert_int_equal(h_step(h), 16);
        struct eng_sched_seq_info info;
        assert_int_equal(eng_sched_seq_info(h->s, b, &info), 0);
        assert_int_equal(info.state, ENG_SCHED_PREFILL);
        assert_int_equal(info.n_computed, 15 * t);
        assert_int_equal(h->recs[b].n_toks, 0);
        assert_int_equal(h->fake.last_n_logits, 1); /* A only */
    }
    assert_int_equal(h_step(h), 11); /* A + the last 10 of B, which samples its first token */
    assert_int_equal(h->fake.last_n_logits, 2);
    assert_int_equal(h->recs[b].n_toks, 1);
    h_run_all(h, true);
    assert_matches_ref(h, a);
    assert_matches_ref(h, b);
    h_free(h);
}

/* ---- Admission, the queue and validation ---- */

static void
test_sched_admission_waits_for_kv(void **state)
{
    (void)state;
    struct h *h = h_new(8, 512, 4, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 60, 30, 20, &sp); /* 4 blocks, growing to 5 */
    uint64_t b = h_submit(h, 50, 31, 5, &sp);  /* 4 blocks: 8 - 4 - 4 < watermark 1 */
    int ticks = 0;
    while (!h->recs[a].n_done) {
        h_step(h);
        ticks++;
        if (!h->recs[a].n_done) {
            struct eng_sched_seq_info info;
            assert_int_equal(eng_sched_seq_info(h->s, b, &info), 0);
            assert_int_equal(info.state, ENG_SCHED_QUEUED);
            assert_int_equal(h->recs[b].n_accepted, 0);
            assert_true(eng_sched_has_work(h->s));
        }
    }
    assert_int_equal(ticks, 20);
    assert_int_equal(h->recs[b].n_accepted, 0);
    h_step(h); /* A's blocks are back: B is admitted */
    assert_int_equal(h->recs[b].n_accepted, 1);
    h_run_all(h, true);
    assert_matches_ref(h, a);
    assert_matches_ref(h, b);
    h_free(h);
}

static void
test_sched_watermark_waived_when_idle(void **state)
{
    (void)state;
    struct eng_sched_config cfg;
    eng_sched_config_default(&cfg);
    cfg.max_seqs = 4;
    cfg.max_batch_tokens = 64;
    cfg.watermark_blocks = 100; /* more than the pool */
    struct h *h = h_new_cfg(8, 512, &cfg);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 40, 32, 5, &sp);
    uint64_t b = h_submit(h, 40, 33, 5, &sp);
    h_step(h);
    assert_int_equal(h->recs[a].n_accepted, 1);
    assert_int_equal(h->recs[b].n_accepted, 0); /* A runs: the watermark holds */
    h_run_all(h, true);
    assert_matches_ref(h, a);
    assert_matches_ref(h, b);
    h_free(h);
}

static void
test_sched_priority_order(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 1, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 5, 40, 3, &sp);
    h_step(h);
    int32_t prompt[5];
    make_prompt(prompt, 5, 41);
    int rc = 0;
    uint64_t low = h_submit_ex(h, prompt, 5, 3, &sp, NULL, 0, NULL, 0, 0, &rc);
    uint64_t high = h_submit_ex(h, prompt, 5, 3, &sp, NULL, 0, NULL, 0, 5, &rc);
    uint64_t low2 = h_submit_ex(h, prompt, 5, 3, &sp, NULL, 0, NULL, 0, 0, &rc);
    while (!h->recs[a].n_done)
        h_step(h);
    h_step(h);
    assert_int_equal(h->recs[high].n_accepted, 1);
    assert_int_equal(h->recs[low].n_accepted, 0);
    while (!h->recs[high].n_done)
        h_step(h);
    h_step(h);
    assert_int_equal(h->recs[low].n_accepted, 1); /* FIFO within a priority */
    assert_int_equal(h->recs[low2].n_accepted, 0);
    h_run_all(h, true);
    h_free(h);
}

static void
test_sched_queue_full(void **state)
{
    (void)state;
    struct eng_sched_config cfg;
    eng_sched_config_default(&cfg);
    cfg.max_seqs = 1;
    cfg.max_batch_tokens = 16;
    cfg.max_queue = 2;
    struct h *h = h_new_cfg(64, 512, &cfg);
    struct eng_sampler_params sp = greedy();
    int32_t prompt[4] = {1, 2, 3, 4};
    int rc = 0;
    h_submit_ex(h, prompt, 4, 5, &sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, 0);
    h_submit_ex(h, prompt, 4, 5, &sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, 0);
    assert_int_equal(h_submit_ex(h, prompt, 4, 5, &sp, NULL, 0, NULL, 0, 0, &rc), 0);
    assert_int_equal(rc, -EAGAIN);
    h_step(h); /* one admitted: room in the queue again */
    h_submit_ex(h, prompt, 4, 5, &sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, 0);
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.rejected_full, 1);
    assert_int_equal(st.submitted, 3);
    assert_int_equal(st.queued, 2);
    assert_int_equal(st.running, 1);
    h_run_all(h, true);
    assert_int_equal(h->n_done, 3);
    h_free(h);
}

static void
test_sched_submit_rejects(void **state)
{
    (void)state;
    struct h *h = h_new(64, 64, 4, 64);
    struct eng_sampler_params sp = greedy();
    int32_t prompt[80];
    make_prompt(prompt, 80, 50);
    int rc = 0;
    assert_int_equal(h_submit_ex(h, prompt, 64, 5, &sp, NULL, 0, NULL, 0, 0, &rc), 0);
    assert_int_equal(rc, -E2BIG); /* prompt + 1 > n_ctx */
    h_submit_ex(h, prompt, 63, 5, &sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, 0);
    h_submit_ex(h, prompt, 0, 5, &sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, -EINVAL);
    h_submit_ex(h, prompt, 5, 0, &sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, -EINVAL);
    int32_t bad[2] = {3, N_VOCAB};
    h_submit_ex(h, bad, 2, 5, &sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, -EINVAL);
    bad[1] = -1;
    h_submit_ex(h, bad, 2, 5, &sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, -EINVAL);
    int32_t stop[1] = {N_VOCAB + 3};
    h_submit_ex(h, prompt, 5, 5, &sp, stop, 1, NULL, 0, 0, &rc);
    assert_int_equal(rc, -EINVAL);
    struct eng_sampler_params bad_sp = greedy();
    bad_sp.top_p = 0.0f;
    h_submit_ex(h, prompt, 5, 5, &bad_sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, -EINVAL);
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.submitted, 1);
    assert_int_equal(st.rejected_invalid, 7);
    h_run_all(h, true);
    assert_int_equal(h->n_done, 1);
    h_free(h);

    /* A pool of 2 blocks holds 32 positions, whatever n_ctx says. */
    h = h_new(2, 1000, 4, 64);
    h_submit_ex(h, prompt, 32, 5, &sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, -E2BIG);
    h_submit_ex(h, prompt, 31, 5, &sp, NULL, 0, NULL, 0, 0, &rc);
    assert_int_equal(rc, 0);
    h_run_all(h, true);
    h_free(h);
}

static void
test_sched_config_rejects(void **state)
{
    (void)state;
    struct eng_kv_pool *kv = NULL;
    struct fake f = {.n_vocab = N_VOCAB};
    struct eng_sched_model m = {
        .ctx = &f, .n_vocab = N_VOCAB, .n_ctx = 64, .forward = fake_forward};
    struct eng_sched_config cfg;
    struct eng_sched *s = NULL;
    assert_int_equal(eng_kv_pool_new(1, 2, 8, &kv), 0);
    eng_sched_config_default(&cfg);
    cfg.max_batch_tokens = cfg.max_seqs - 1;
    assert_int_equal(eng_sched_new(&cfg, &m, kv, NULL, &s), -EINVAL);
    eng_sched_config_default(&cfg);
    cfg.max_seqs = 0;
    assert_int_equal(eng_sched_new(&cfg, &m, kv, NULL, &s), -EINVAL);
    eng_sched_config_default(&cfg);
    cfg.watermark_blocks = -1;
    assert_int_equal(eng_sched_new(&cfg, &m, kv, NULL, &s), -EINVAL);
    eng_sched_config_default(&cfg);
    m.forward = NULL;
    assert_int_equal(eng_sched_new(&cfg, &m, kv, NULL, &s), -EINVAL);
    m.forward = fake_forward;
    assert_int_equal(eng_sched_new(&cfg, &m, kv, NULL, &s), 0);
    assert_string_equal(eng_sched_finish_name(ENG_SCHED_FINISH_STOP_TOKEN), "stop_token");
    assert_string_equal(eng_sched_finish_name(ENG_SCHED_FINISH_COUNT), "?");
    eng_sched_free(s);
    eng_sched_free(NULL);
    eng_kv_pool_free(kv);
}

/* ---- Cancellation ---- */

static void
test_sched_cancel_queued(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 1, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 5, 60, 10, &sp);
    uint64_t b = h_submit(h, 5, 61, 10, &sp);
    h_step(h);
    assert_int_equal(eng_sched_cancel(h->s, b, "guard_repeat"), 0);
    assert_int_equal(eng_sched_cancel(h->s, b, "second"), 0); /* the first reason stays */
    struct eng_sched_seq_info info;
    assert_int_equal(eng_sched_seq_info(h->s, b, &info), 0);
    assert_true(info.cancel_pending);
    h_step(h);
    struct rec *r = &h->recs[b];
    assert_int_equal(r->n_done, 1);
    assert_int_equal(r->n_accepted, 0);
    assert_int_equal(r->done.finish, ENG_SCHED_FINISH_CANCELLED);
    assert_string_equal(r->reason, "guard_repeat");
    assert_int_equal(r->done.prompt_tokens, 5);
    assert_int_equal(r->done.completion_tokens, 0);
    assert_int_equal(r->done.ttft_ns, 0);
    assert_int_equal(eng_sched_cancel(h->s, b, "again"), -ENOENT);
    assert_int_equal(eng_sched_cancel(h->s, 999, "x"), -ENOENT);
    assert_int_equal(eng_sched_pause(h->s, 999, true), -ENOENT);
    h_run_all(h, true);
    assert_matches_ref(h, a);
    h_free(h);
}

static void
test_sched_cancel_prefill(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 4, 16);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 100, 62, 10, &sp);
    h_step(h);
    h_step(h);
    struct eng_sched_seq_info info;
    assert_int_equal(eng_sched_seq_info(h->s, a, &info), 0);
    assert_int_equal(info.state, ENG_SCHED_PREFILL);
    assert_int_equal(info.n_blocks, 7);
    assert_int_equal(eng_sched_cancel(h->s, a, "client_disconnect"), 0);
    int calls = h->fake.calls;
    assert_int_equal(h_step(h), 0);
    assert_int_equal(h->fake.calls, calls); /* stopped before computing more */
    assert_int_equal(h->recs[a].done.finish, ENG_SCHED_FINISH_CANCELLED);
    assert_string_equal(h->recs[a].reason, "client_disconnect");
    assert_int_equal(h->recs[a].n_toks, 0);
    assert_int_equal(eng_kv_pool_n_free(h->kv), 64);
    h_free(h);
}

static void
test_sched_cancel_decoding(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 4, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 20, 63, 50, &sp);
    uint64_t b = h_submit(h, 8, 64, 12, &sp);
    for (int i = 0; i < 4; i++)
        h_step(h);
    assert_int_equal(h->recs[a].n_toks, 4);
    assert_int_equal(eng_sched_cancel(h->s, a, NULL), 0);
    assert_int_equal(h_step(h), 1); /* only B computes */
    assert_int_equal(h->recs[a].done.finish, ENG_SCHED_FINISH_CANCELLED);
    assert_string_equal(h->recs[a].reason, "cancelled");
    assert_int_equal(h->recs[a].n_toks, 4);
    assert_int_equal(h->recs[a].done.completion_tokens, 4);
    assert_prefix_of_ref(h, a);
    h_run_all(h, true);
    assert_matches_ref(h, b);
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.finished_by[ENG_SCHED_FINISH_CANCELLED], 1);
    assert_int_equal(st.n_cancel_reasons, 1);
    assert_string_equal(st.cancels[0].reason, "cancelled");
    assert_int_equal(st.cancels[0].n, 1);
    h_free(h);
}

/* A cancel set by a callback in the middle of a tick stops the sequence at its own emit. */
static void
cancel_hook(struct h *h, uint64_t seq_id, int index)
{
    if (seq_id != h->hook_arg && index == 2)
        assert_int_equal(eng_sched_cancel(h->s, h->hook_arg, "guard_loop"), 0);
}

static void
test_sched_cancel_at_emit(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 4, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 6, 65, 20, &sp);
    uint64_t b = h_submit(h, 6, 66, 20, &sp); /* admitted after A: emits after A in a tick */
    h->hook_arg = b;
    h->token_hook = cancel_hook;
    h_step_ex(h, false);
    h_step_ex(h, false);
    assert_int_equal(h->recs[b].n_toks, 2);
    h_step_ex(h, false); /* A emits its token 2 and cancels B before B's emit */
    assert_int_equal(h->recs[a].n_toks, 3);
    assert_int_equal(h->recs[b].n_toks, 2);
    assert_int_equal(h->recs[b].n_done, 1);
    assert_int_equal(h->recs[b].done.finish, ENG_SCHED_FINISH_CANCELLED);
    assert_string_equal(h->recs[b].reason, "guard_loop");
    h->token_hook = NULL;
    h_run_all(h, true);
    assert_matches_ref(h, a);
    h_free(h);
}

static void
test_sched_cancel_owner(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 3, 64);
    struct eng_sampler_params sp = greedy();
    int o1 = 1, o2 = 2;
    int32_t prompt[10];
    uint64_t ids[5];
    void *owners[5] = {&o1, &o2, &o1, &o2, &o1};
    int rc = 0;
    for (int i = 0; i < 5; i++) {
        make_prompt(prompt, 10, 70 + (uint32_t)i);
        ids[i] = h_submit_ex(h, prompt, 10, 15, &sp, NULL, 0, owners[i], 0, 0, &rc);
        assert_int_equal(rc, 0);
    }
    h_step(h);
    h_step(h); /* three running (two of o1), two queued */
    assert_int_equal(h->recs[ids[0]].owner_seen, &o1);
    assert_int_equal(eng_sched_cancel_owner(h->s, &o1, "client_disconnect"), 3);
    assert_int_equal(eng_sched_cancel_owner(h->s, &o1, "client_disconnect"), 0); /* detached */
    h_step(h);
    for (int i = 0; i < 5; i++) {
        struct rec *r = &h->recs[ids[i]];
        if (owners[i] == &o1) {
            assert_int_equal(r->n_done, 1);
            assert_int_equal(r->done.finish, ENG_SCHED_FINISH_CANCELLED);
            assert_null(r->done_owner);
            assert_string_equal(r->reason, "client_disconnect");
        } else {
            assert_int_equal(r->n_done, 0);
        }
    }
    h_run_all(h, true);
    assert_matches_ref(h, ids[1]);
    assert_matches_ref(h, ids[3]);
    assert_ptr_equal(h->recs[ids[3]].done_owner, &o2);
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.cancels[0].n, 3);
    h_free(h);
}

static void
test_sched_cancel_all(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 2, 64);
    struct eng_sampler_params sp = greedy();
    for (int i = 0; i < 4; i++)
        h_submit(h, 12, 80 + (uint32_t)i, 30, &sp);
    h_step(h);
    assert_int_equal(eng_sched_cancel_all(h->s, "shutdown"), 4);
    assert_true(eng_sched_has_work(h->s));
    assert_int_equal(h_step(h), 0);
    assert_int_equal(h->n_done, 4);
    assert_false(eng_sched_has_work(h->s));
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_string_equal(st.cancels[0].reason, "shutdown");
    assert_int_equal(st.cancels[0].n, 4);
    assert_int_equal(st.kv_blocks_used, 0);
    h_free(h);
}

/* ---- Deadlines ---- */

static void
test_sched_deadline(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 1, 64);
    struct eng_sampler_params sp = greedy();
    int32_t prompt[8];
    make_prompt(prompt, 8, 90);
    int rc = 0;
    uint64_t a = h_submit_ex(h, prompt, 8, 30, &sp, NULL, 0, NULL, h->now + 10 * TICK_NS, 0, &rc);
    uint64_t b = h_submit_ex(h, prompt, 8, 30, &sp, NULL, 0, NULL, h->now + 4 * TICK_NS, 0, &rc);
    assert_int_equal(eng_sched_next_deadline(h->s), h->now + 4 * TICK_NS);
    for (int i = 0; i < 4; i++)
        h_step_ex(h, true);
    /* B expired in the queue, never admitted. */
    assert_int_equal(h->recs[b].done.finish, ENG_SCHED_FINISH_DEADLINE);
    assert_int_equal(h->recs[b].n_accepted, 0);
    assert_int_equal(h->recs[b].done.queue_ns, 4 * TICK_NS);
    assert_int_equal(eng_sched_next_deadline(h->s), h->now + 6 * TICK_NS);
    for (int i = 0; i < 6; i++)
        h_step_ex(h, true);
    /* A expired while decoding: 9 ticks of tokens, then the 10th tick ends it. */
    assert_int_equal(h->recs[a].done.finish, ENG_SCHED_FINISH_DEADLINE);
    assert_int_equal(h->recs[a].n_toks, 9);
    assert_prefix_of_ref(h, a);
    assert_int_equal(eng_sched_next_deadline(h->s), 0);
    assert_int_equal(eng_kv_pool_n_free(h->kv), 64);
    h_free(h);
}

/* ---- Backpressure ---- */

static void
test_sched_pause(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 4, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 5, 100, 30, &sp);
    uint64_t b = h_submit(h, 6, 101, 30, &sp);
    uint64_t c = h_submit(h, 7, 102, 30, &sp);
    h_step(h);
    h_step(h);
    uint64_t t_pause = h->now;
    assert_int_equal(eng_sched_pause(h->s, b, true), 0);
    int b_toks = h->recs[b].n_toks;
    for (int i = 0; i < 5; i++)
        assert_int_equal(h_step(h), 2); /* A and C only; h_step checks B gets none */
    assert_int_equal(h->recs[b].n_toks, b_toks);
    assert_int_equal(h->recs[a].n_toks, 7);
    struct eng_sched_seq_info info;
    assert_int_equal(eng_sched_seq_info(h->s, b, &info), 0);
    assert_true(info.paused);
    assert_int_equal(info.paused_since_ns, t_pause);
    assert_true(info.n_blocks > 0); /* keeps its KV */
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.paused, 1);

    /* Everything paused: nothing to do. */
    assert_int_equal(eng_sched_pause(h->s, a, true), 0);
    assert_int_equal(eng_sched_pause(h->s, c, true), 0);
    assert_false(eng_sched_has_work(h->s));
    assert_int_equal(h_step(h), 0);
    assert_int_equal(eng_sched_pause(h->s, a, false), 0);
    assert_int_equal(eng_sched_pause(h->s, b, false), 0);
    assert_int_equal(eng_sched_pause(h->s, c, false), 0);
    assert_true(eng_sched_has_work(h->s));
    h_run_all(h, true);
    assert_matches_ref(h, a);
    assert_matches_ref(h, b);
    assert_matches_ref(h, c);
    h_free(h);
}

/* A paused prefill computes nothing more until resumed. */
static void
test_sched_pause_prefill(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 4, 16);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 60, 103, 5, &sp);
    uint64_t b = h_submit(h, 3, 104, 20, &sp);
    h_step(h); /* A gets all 16 */
    assert_int_equal(eng_sched_pause(h->s, a, true), 0);
    for (int i = 0; i < 4; i++)
        h_step(h);
    struct eng_sched_seq_info info;
    assert_int_equal(eng_sched_seq_info(h->s, a, &info), 0);
    assert_int_equal(info.state, ENG_SCHED_PREFILL);
    assert_int_equal(info.n_computed, 16);
    assert_int_equal(h->recs[b].n_toks, 4);
    assert_int_equal(eng_sched_pause(h->s, a, false), 0);
    h_run_all(h, true);
    assert_matches_ref(h, a);
    assert_matches_ref(h, b);
    h_free(h);
}

/* ---- KV exhaustion ---- */

static void
test_sched_kv_exhaustion_recompute(void **state)
{
    (void)state;
    struct h *h = h_new(12, 512, 4, 32);
    uint64_t ids[6];
    for (int i = 0; i < 6; i++) {
        struct eng_sampler_params sp = (i % 2) ? sampled(200 + (uint64_t)i) : greedy();
        ids[i] = h_submit(h, 20 + i, 110 + (uint32_t)i, 60, &sp); /* up to 5 blocks each */
    }
    h_run_all(h, false);
    int preempted = 0;
    for (int i = 0; i < 6; i++) {
        assert_matches_ref(h, ids[i]);
        preempted += h->recs[ids[i]].done.n_preempted;
    }
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_true(st.preemptions > 0);
    assert_int_equal(st.preemptions, (uint64_t)preempted);
    assert_true(st.prefill_tokens > st.prompt_tokens); /* recomputation happened */
    h_free(h);
}

/* A paused sequence is the first victim, even with more progress: the running ones keep going. */
static void
test_sched_kv_exhaustion_paused_victim(void **state)
{
    (void)state;
    struct h *h = h_new(7, 512, 4, 128);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 20, 120, 60, &sp); /* 2 blocks, growing to 5 */
    uint64_t b = h_submit(h, 60, 121, 60, &sp); /* 4 blocks, more computed than A ever has */
    h_step(h);
    assert_int_equal(h->recs[b].n_toks, 1);
    assert_int_equal(eng_sched_pause(h->s, b, true), 0);
    while (!h->recs[a].n_done)
        h_step_ex(h, true); /* A never misses a tick */
    assert_int_equal(h->recs[a].done.n_preempted, 0);
    struct eng_sched_seq_info info;
    assert_int_equal(eng_sched_seq_info(h->s, b, &info), 0);
    assert_int_equal(info.state, ENG_SCHED_QUEUED);
    assert_int_equal(info.n_preempted, 1);
    assert_int_equal(eng_sched_pause(h->s, b, false), 0);
    h_run_all(h, true);
    assert_matches_ref(h, a);
    assert_matches_ref(h, b);
    h_free(h);
}

/* A preempted sequence goes back to the front of the queue, ahead of higher priorities. */
static void
test_sched_preempted_goes_first(void **state)
{
    (void)state;
    struct eng_sched_config cfg;
    eng_sched_config_default(&cfg);
    cfg.max_seqs = 2;
    cfg.max_batch_tokens = 64;
    cfg.watermark_blocks = 0;
    struct h *h = h_new_cfg(6, 512, &cfg);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 16, 122, 40, &sp); /* 1 block */
    uint64_t c = h_submit(h, 30, 123, 30, &sp); /* 2 blocks */
    h_step(h);
    int32_t prompt[70];
    make_prompt(prompt, 70, 124);
    int rc = 0;
    uint64_t b = h_submit_ex(h, prompt, 70, 5, &sp, NULL, 0, NULL, 0, 5, &rc); /* 5 blocks */
    assert_int_equal(rc, 0);
    bool a_back = false;
    while (!h->recs[b].n_accepted) {
        struct eng_sched_seq_info info;
        h_step_ex(h, false);
        if (!h->recs[a].n_done && eng_sched_seq_info(h->s, a, &info) == 0 && info.n_preempted &&
            info.state != ENG_SCHED_QUEUED)
            a_back = true;
    }
    assert_true(h->recs[a].n_done || a_back); /* A was readmitted before B */
    h_run_all(h, false);
    assert_true(h->recs[a].done.n_preempted > 0);
    assert_matches_ref(h, a);
    assert_matches_ref(h, b);
    assert_matches_ref(h, c);
    h_free(h);
}

/* ---- Errors ---- */

static void
test_sched_forward_error(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 2, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 5, 130, 10, &sp);
    uint64_t b = h_submit(h, 5, 131, 10, &sp);
    uint64_t c = h_submit(h, 5, 132, 10, &sp);
    h->fake.fail_call = 3;
    h_step(h);
    h_step(h);
    cm_log_set_level(CM_LOG_OFF); /* the expected error line */
    h_step_ex(h, false);
    cm_log_set_level(CM_LOG_INFO);
    assert_int_equal(h->recs[a].done.finish, ENG_SCHED_FINISH_ERROR);
    assert_int_equal(h->recs[a].done.error, -ENOMEM);
    assert_int_equal(h->recs[b].done.finish, ENG_SCHED_FINISH_ERROR);
    assert_int_equal(h->recs[c].n_done, 0);
    h_run_all(h, true);
    assert_matches_ref(h, c);
    h_free(h);
}

static void
test_sched_sampling_error(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 2, 64);
    struct eng_logit_bias ban[N_VOCAB];
    for (int i = 0; i < N_VOCAB; i++)
        ban[i] = (struct eng_logit_bias){.id = i, .bias = -INFINITY};
    struct eng_sampler_params sp = greedy();
    sp.n_logit_bias = N_VOCAB;
    sp.logit_bias = ban;
    uint64_t a = h_submit(h, 5, 140, 10, &sp);
    h_step_ex(h, false);
    assert_int_equal(h->recs[a].done.finish, ENG_SCHED_FINISH_ERROR);
    assert_int_equal(h->recs[a].done.error, -EDOM);
    assert_int_equal(eng_kv_pool_n_free(h->kv), 64);
    h_free(h);
}

/* Every allocation of the scheduler's own failing in turn: a clean -ENOMEM, nothing leaked (the
 * sanitizer and valgrind runs check), and the scheduler unharmed. */
static void
test_sched_alloc_failures(void **state)
{
    (void)state;
    struct eng_kv_pool *kv = NULL;
    struct fake f = {.n_vocab = N_VOCAB, .max_batch_tokens = 64, .max_logits = 4, .eog = -1};
    struct eng_sched_model m = {
        .ctx = &f, .n_vocab = N_VOCAB, .n_ctx = 64, .forward = fake_forward};
    struct eng_sched_config cfg;
    eng_sched_config_default(&cfg);
    cfg.max_seqs = 4;
    cfg.max_batch_tokens = 64;
    assert_int_equal(eng_kv_pool_new(1, 2, 8, &kv), 0);
    struct eng_sched *s = NULL;
    int n = 1;
    for (;; n++) {
        eng_sched_test_fail_alloc(n);
        int rc = eng_sched_new(&cfg, &m, kv, NULL, &s);
        if (rc == 0)
            break;
        assert_int_equal(rc, -ENOMEM);
        assert_null(s);
    }
    eng_sched_test_fail_alloc(0);
    assert_int_equal(n, 11); /* ten allocations: the struct and its nine arrays */
    eng_sched_free(s);
    eng_kv_pool_free(kv);

    struct h *h = h_new(64, 512, 4, 64);
    struct eng_sampler_params sp = greedy();
    int32_t prompt[6] = {1, 2, 3, 4, 5, 6};
    int32_t stop[1] = {9};
    for (n = 1;; n++) {
        int rc = 0;
        eng_sched_test_fail_alloc(n);
        h_submit_ex(h, prompt, 6, 5, &sp, stop, 1, NULL, 0, 0, &rc);
        if (rc == 0)
            break;
        assert_int_equal(rc, -ENOMEM);
    }
    eng_sched_test_fail_alloc(0);
    assert_int_equal(n, 4); /* the sequence, its tokens, its stop tokens */
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.submitted, 1);
    assert_int_equal(st.queued, 1);
    h_run_all(h, true);
    assert_int_equal(h->n_done, 1);
    h_free(h);
}

/* ---- Statistics ---- */

static void
test_sched_stats(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 4, 64);
    struct eng_sampler_params sp = greedy();
    uint64_t a = h_submit(h, 10, 150, 8, &sp);
    uint64_t b = h_submit(h, 20, 151, 5, &sp);
    uint64_t c = h_submit(h, 3, 152, 50, &sp);
    h_step(h);
    h_step(h);
    eng_sched_cancel(h->s, c, "guard_x");
    h_run_all(h, true);
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.submitted, 3);
    assert_int_equal(st.finished, 3);
    assert_int_equal(st.finished_by[ENG_SCHED_FINISH_LENGTH], 2);
    assert_int_equal(st.finished_by[ENG_SCHED_FINISH_CANCELLED], 1);
    assert_int_equal(st.prompt_tokens, 33);
    assert_int_equal(st.prefill_tokens, 33);
    uint64_t gen = 0;
    for (uint64_t id = a; id <= c; id++)
        gen += (uint64_t)h->recs[id].done.completion_tokens;
    assert_int_equal(st.generated_tokens, gen);
    assert_int_equal(st.generated_tokens, 8 + 5 + 2);
    assert_matches_ref(h, b);
    /* Tick 1: three prompts (33 tokens), tick 2: 3 decodes, tick 3: C is cancelled, 2 decodes ...
     */
    assert_int_equal(st.batch_tokens, st.prefill_tokens + st.decode_tokens);
    assert_int_equal(st.decode_tokens, gen - 3);
    assert_int_equal(st.ticks, 8);
    assert_int_equal(st.running + st.queued + st.paused + st.kv_blocks_used, 0);
    assert_int_equal(st.kv_blocks_total, 64);
    assert_int_equal(st.ttft.n, 3);
    assert_int_equal(st.ttft.counts[0], 3); /* 1 ms each */
    assert_true(fabs(st.ttft.sum_ms - 3.0) < 1e-9);
    assert_int_equal(st.itl.n, gen - 3);
    assert_int_equal(st.itl.counts[0], gen - 3);
    assert_int_equal(st.n_cancel_reasons, 1);
    assert_string_equal(st.cancels[0].reason, "guard_x");

    /* A slow tick lands in a higher bucket. */
    uint64_t d = h_submit(h, 4, 153, 2, &sp);
    h->now += 40 * TICK_NS; /* 41 ms to the first token: the <= 50 ms bucket */
    h_step(h);
    h->now += 3 * TICK_NS; /* 4 ms to the second: the <= 5 ms bucket */
    h_step(h);
    assert_int_equal(h->recs[d].n_done, 1);
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.ttft.counts[5], 1);
    assert_int_equal(st.itl.counts[2], 1);
    uint64_t sum = 0;
    for (int i = 0; i < ENG_SCHED_HIST_BUCKETS; i++)
        sum += st.itl.counts[i];
    assert_int_equal(sum, st.itl.n);
    h_free(h);
}

/* Many distinct cancel reasons: the table fills, the rest are counted as other. */
static void
test_sched_cancel_reason_table(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 4, 64);
    struct eng_sampler_params sp = greedy();
    char reason[64];
    for (int i = 0; i < ENG_SCHED_MAX_CANCEL_REASONS + 3; i++) {
        uint64_t id = h_submit(h, 2, 160 + (uint32_t)i, 5, &sp);
        snprintf(reason, sizeof(reason), "guard_%02d_with_a_rather_long_name_to_be_cut_at_48_bytes",
                 i);
        assert_int_equal(eng_sched_cancel(h->s, id, reason), 0);
        h_step(h);
        assert_int_equal(strlen(h->recs[id].reason), ENG_SCHED_REASON_MAX - 1);
    }
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.n_cancel_reasons, ENG_SCHED_MAX_CANCEL_REASONS);
    assert_int_equal(st.cancels_other, 3);
    h_free(h);
}

/* ---- token_loop ---- */

/* A model caught in a cycle of 5 tokens with token_loop 3: the check first runs at 48 generated
 * tokens, where the last 15 are three repeats of the period; the sequence ends in that tick like a
 * cancel named token_loop, its blocks back in the pool, while a neighbour without the guard (same
 * cycle) and one with it that does not loop run on. */
static void
test_sched_token_loop_trips(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 4, 64);
    h->fake.cycle = 5;
    struct eng_sampler_params sp = greedy();
    int32_t prompt[6] = {40, 41, 42, 43, 44, 3};
    int rc = 0;
    uint64_t a = h_submit_loop(h, prompt, 6, 200, &sp, NULL, 0, NULL, 0, 0, 3, &rc);
    assert_int_equal(rc, 0);
    uint64_t b = h_submit_loop(h, prompt, 6, 60, &sp, NULL, 0, NULL, 0, 0, 0, &rc);
    assert_int_equal(rc, 0);
    for (int i = 0; i < 47; i++)
        h_step(h);
    assert_int_equal(h->recs[a].n_toks, 47);
    assert_int_equal(h->recs[a].n_done, 0);
    struct eng_sched_seq_info info;
    assert_int_equal(eng_sched_seq_info(h->s, a, &info), 0);
    assert_true(info.n_blocks > 0);
    int used_before = eng_kv_pool_n_blocks(h->kv) - eng_kv_pool_n_free(h->kv);
    h_step(h); /* token 48 completes the third repeat */
    assert_int_equal(h->recs[a].n_done, 1);
    assert_int_equal(h->recs[a].done.finish, ENG_SCHED_FINISH_CANCELLED);
    assert_string_equal(h->recs[a].reason, "token_loop");
    assert_int_equal(h->recs[a].n_toks, 48);
    assert_int_equal(h->recs[a].done.completion_tokens, 48);
    for (int i = 0; i < 48; i++)
        assert_int_equal(h->recs[a].toks[i], (4 + i) % 5); /* 3 -> 4, 0, 1, ... */
    assert_int_equal(eng_sched_seq_info(h->s, a, &info), -ENOENT);
    int used_after = eng_kv_pool_n_blocks(h->kv) - eng_kv_pool_n_free(h->kv);
    assert_true(used_after < used_before);
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.guard_trips[GUARD_TOKEN_LOOP], 1);
    for (int g = 0; g < GUARD_N; g++)
        if (g != GUARD_TOKEN_LOOP)
            assert_int_equal(st.guard_trips[g], 0);
    assert_int_equal(st.finished_by[ENG_SCHED_FINISH_CANCELLED], 1);
    assert_int_equal(st.n_cancel_reasons, 1);
    assert_string_equal(st.cancels[0].reason, "token_loop");
    /* B, the same cycle without the guard, runs to max_tokens. */
    h_run_all(h, true);
    assert_int_equal(h->recs[b].done.finish, ENG_SCHED_FINISH_LENGTH);
    assert_int_equal(h->recs[b].n_toks, 60);
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.guard_trips[GUARD_TOKEN_LOOP], 1);
    h_free(h);
}

/* token_loop on a sequence that does not loop changes nothing; bad values are rejected. */
static void
test_sched_token_loop_no_loop(void **state)
{
    (void)state;
    struct h *h = h_new(64, 512, 4, 64);
    struct eng_sampler_params sp = greedy();
    int32_t prompt[MAX_TOK];
    make_prompt(prompt, 9, 321);
    int rc = 0;
    uint64_t id = h_submit_loop(h, prompt, 9, 120, &sp, NULL, 0, NULL, 0, 0, 2, &rc);
    assert_int_equal(rc, 0);
    h_run_all(h, true);
    struct ref ref;
    h_ref(h, id, &ref);
    /* The reference (no guard) must itself be loop-free for this test to mean anything. */
    for (int n = 1; n <= ref.n; n++)
        assert_false(guard_token_loop_check(ref.toks, n, 2));
    assert_matches_ref(h, id);
    int bad[] = {1, -1, ENG_SCHED_MAX_TOKEN_LOOP + 1};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(h_submit_loop(h, prompt, 9, 10, &sp, NULL, 0, NULL, 0, 0, bad[i], &rc), 0);
        assert_int_equal(rc, -EINVAL);
    }
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.guard_trips[GUARD_TOKEN_LOOP], 0);
    h_free(h);
}

/* ---- Randomized stress ---- */

static uint32_t
rnd(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return (uint32_t)(*x >> 11);
}

static void
stress_actions(struct h *h, uint64_t *rng, int *owners, uint64_t *n_sub)
{
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    if (rnd(rng) % 100 < 35 && st.submitted + st.rejected_full < MAX_IDS - 2) {
        int32_t prompt[MAX_TOK];
        int n = 1 + (int)(rnd(rng) % 90);
        make_prompt(prompt, n, rnd(rng));
        struct eng_sampler_params sp = rnd(rng) % 2 ? greedy() : sampled(rnd(rng));
        int32_t stop[1] = {(int32_t)(rnd(rng) % N_VOCAB)};
        uint64_t deadline = rnd(rng) % 10 == 0 ? h->now + (rnd(rng) % 100) * TICK_NS : 0;
        int rc = 0;
        h_submit_ex(h, prompt, n, 1 + (int)(rnd(rng) % 70), &sp, stop, (int)(rnd(rng) % 2),
                    &owners[rnd(rng) % 4], deadline, (int)(rnd(rng) % 3), &rc);
        assert_true(rc == 0 || rc == -EAGAIN);
        *n_sub += rc == 0;
    }
    uint64_t pick = 1 + rnd(rng) % (st.submitted + 1);
    if (pick < MAX_IDS && h->recs[pick].used) {
        uint32_t r = rnd(rng) % 100;
        int rc = 0;
        if (r < 4) {
            rc = eng_sched_cancel(h->s, pick, "guard_stress");
            h->recs[pick].cancelled_by_test = true;
        } else if (r < 14) {
            rc = eng_sched_pause(h->s, pick, r < 9);
        }
        assert_true(rc == 0 || (rc == -ENOENT && h->recs[pick].n_done));
    }
    if (rnd(rng) % 300 == 0) {
        int o = (int)(rnd(rng) % 4);
        eng_sched_cancel_owner(h->s, &owners[o], "client_disconnect");
    }
}

static void
test_sched_stress(void **state)
{
    (void)state;
    struct eng_sched_config cfg;
    eng_sched_config_default(&cfg);
    cfg.max_seqs = 6;
    cfg.max_batch_tokens = 24;
    cfg.max_queue = 10;
    cfg.watermark_blocks = 2;
    struct h *h = h_new_cfg(24, 256, &cfg);
    h->fake.eog = 7;
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    int owners[4] = {0};
    uint64_t n_sub = 0;
    for (int t = 0; t < 3000; t++) {
        stress_actions(h, &rng, owners, &n_sub);
        h_step_ex(h, false);
    }
    /* Unpause everything and drain. */
    for (uint64_t id = 1; id < MAX_IDS; id++)
        if (h->recs[id].used && !h->recs[id].n_done)
            assert_int_equal(eng_sched_pause(h->s, id, false), 0);
    h_run_all(h, false);

    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.submitted, n_sub);
    assert_int_equal(st.finished, n_sub);
    print_message("stress: %llu requests, %llu preemptions, %llu ticks, %llu tokens generated\n",
                  (unsigned long long)n_sub, (unsigned long long)st.preemptions,
                  (unsigned long long)st.ticks, (unsigned long long)st.generated_tokens);
    assert_true(n_sub > 500);
    assert_true(st.preemptions > 0);
    uint64_t gen = 0, by[ENG_SCHED_FINISH_COUNT] = {0};
    for (uint64_t id = 1; id <= n_sub; id++) {
        const struct rec *r = &h->recs[id];
        assert_true(r->used);
        assert_int_equal(r->n_done, 1);
        gen += (uint64_t)r->done.completion_tokens;
        by[r->done.finish]++;
        switch (r->done.finish) {
        case ENG_SCHED_FINISH_EOS:
        case ENG_SCHED_FINISH_LENGTH:
        case ENG_SCHED_FINISH_STOP_TOKEN:
            assert_matches_ref(h, id);
            break;
        case ENG_SCHED_FINISH_CANCELLED:
        case ENG_SCHED_FINISH_DEADLINE:
            assert_prefix_of_ref(h, id);
            break;
        default:
            fail_msg("seq %llu finished with %s", (unsigned long long)id,
                     eng_sched_finish_name(r->done.finish));
        }
    }
    assert_int_equal(st.generated_tokens, gen);
    for (int f = 0; f < ENG_SCHED_FINISH_COUNT; f++)
        assert_int_equal(st.finished_by[f], by[f]);
    assert_true(by[ENG_SCHED_FINISH_EOS] > 0 && by[ENG_SCHED_FINISH_CANCELLED] > 0 &&
                by[ENG_SCHED_FINISH_DEADLINE] > 0 && by[ENG_SCHED_FINISH_STOP_TOKEN] > 0);
    h_free(h);
}

/* ---- Spill ---- */

/* A spill store over a fresh directory, behind a fault layer (the posix ops with no-op fsyncs:
 * the fault layer still counts and fails them). */
struct sp {
    char dir[64];
    struct spill_io_ops base;
    struct spill_fault f;
    struct spill_store *store;
};

static int
sp_nop_fsync(void *ctx, int fd)
{
    (void)ctx;
    (void)fd;
    return 0;
}

static int
sp_nop_fsync_dir(void *ctx, const char *d)
{
    (void)ctx;
    (void)d;
    return 0;
}

static int
sp_count_entries(const char *d)
{
    DIR *dp = opendir(d);
    assert_non_null(dp);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dp)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    closedir(dp);
    return n;
}

static void
sp_open(struct sp *sp, struct h *h)
{
    snprintf(sp->dir, sizeof(sp->dir), "/tmp/test_sched_spill.XXXXXX");
    assert_non_null(mkdtemp(sp->dir));
    sp->base = *spill_io_posix();
    sp->base.fsync = sp_nop_fsync;
    sp->base.fsync_dir = sp_nop_fsync_dir;
    spill_fault_init(&sp->f, &sp->base, SPILL_OP_WRITE, 0, 0, false, false);
    assert_int_equal(spill_store_open(sp->dir, 0, 77, &sp->f.ops, &sp->store), 0);
    struct eng_sched_spill cfg = {.store = sp->store, .n_layer = 1, .kv_dim = 2};
    assert_int_equal(eng_sched_set_spill(h->s, &cfg), 0);
}

static void
sp_close(struct sp *sp)
{
    spill_store_close(sp->store);
    assert_int_equal(sp_count_entries(sp->dir), 0);
    rmdir(sp->dir);
}

/* The KV-exhaustion workload of test_sched_kv_exhaustion_recompute. */
static void
spill_workload(struct h *h, uint64_t ids[6])
{
    for (int i = 0; i < 6; i++) {
        struct eng_sampler_params sp = (i % 2) ? sampled(200 + (uint64_t)i) : greedy();
        ids[i] = h_submit(h, 20 + i, 110 + (uint32_t)i, 60, &sp);
    }
}

static void
test_sched_spill_restore_matches_ref(void **state)
{
    (void)state;
    struct h *h = h_new(12, 512, 4, 32);
    struct sp sp;
    sp_open(&sp, h);
    struct eng_sched_spill bad = {.store = sp.store, .n_layer = 2, .kv_dim = 2};
    assert_int_equal(eng_sched_set_spill(h->s, &bad), -EINVAL); /* not the pool's shape */
    uint64_t ids[6];
    spill_workload(h, ids);
    int max_on_disk = 0;
    struct eng_sched_stats st;
    for (int i = 0; i < 100000; i++) {
        eng_sched_get_stats(h->s, &st);
        if (st.running == 0 && st.queued == 0)
            break;
        h_step_ex(h, false);
        eng_sched_get_stats(h->s, &st);
        assert_int_equal(st.on_disk, sp_count_entries(sp.dir)); /* no temp files, no strays */
        if (st.on_disk > max_on_disk)
            max_on_disk = st.on_disk;
    }
    for (int i = 0; i < 6; i++)
        assert_matches_ref(h, ids[i]);
    eng_sched_get_stats(h->s, &st);
    assert_true(st.spills > 0);
    assert_true(max_on_disk > 0);
    assert_int_equal(st.restores, st.spills);
    assert_int_equal(st.recompute_fallbacks, 0);
    assert_int_equal(st.on_disk, 0);
    assert_int_equal(st.disk_bytes, 0);
    assert_int_equal(eng_kv_pool_n_free(h->kv), eng_kv_pool_n_blocks(h->kv));
    /* Spilled victims were not prefilled again: less recomputation than without spill. */
    struct h *h2 = h_new(12, 512, 4, 32);
    uint64_t ids2[6];
    spill_workload(h2, ids2);
    h_run_all(h2, false);
    struct eng_sched_stats st2;
    eng_sched_get_stats(h2->s, &st2);
    assert_true(st.prefill_tokens < st2.prefill_tokens);
    h_free(h2);
    h_free(h);
    sp_close(&sp);
}

static int
count_fds(void)
{
    return sp_count_entries("/proc/self/fd");
}

/* Fail the Nth call of each kind of a spill or a restore with ENOSPC or EIO (and short writes),
 * for every N: every request still matches its reference, nothing leaks. */
static void
test_sched_spill_faults_every_call(void **state)
{
    (void)state;
    static const enum spill_op ops[] = {SPILL_OP_OPEN,  SPILL_OP_WRITE,  SPILL_OP_FSYNC,
                                        SPILL_OP_CLOSE, SPILL_OP_RENAME, SPILL_OP_FSYNC_DIR,
                                        SPILL_OP_READ,  SPILL_OP_UNLINK};
    static const int errs[] = {ENOSPC, EIO};
    int runs = 0, with_fallback = 0;
    cm_log_set_level(CM_LOG_OFF); /* a WARN per injected fault */
    for (size_t o = 0; o < sizeof(ops) / sizeof(ops[0]); o++)
        for (int e = 0; e < 3; e++) /* ENOSPC, EIO, a short write */
            for (long n = 1;; n++) {
                bool short_w = e == 2;
                if (short_w && ops[o] != SPILL_OP_WRITE)
                    break; /* before anything is allocated */
                struct h *h = h_new(12, 512, 4, 32);
                struct sp sp;
                sp_open(&sp, h);
                int fds = count_fds();
                spill_fault_init(&sp.f, &sp.base, ops[o], n, short_w ? EIO : errs[e], false,
                                 short_w);
                uint64_t ids[6];
                spill_workload(h, ids);
                h_run_all(h, false);
                for (int i = 0; i < 6; i++)
                    assert_matches_ref(h, ids[i]);
                struct eng_sched_stats st;
                eng_sched_get_stats(h->s, &st);
                assert_int_equal(st.on_disk, 0);
                assert_int_equal(count_fds(), fds);
                long injected = sp.f.n_injected;
                if (injected && !short_w && ops[o] != SPILL_OP_UNLINK && ops[o] != SPILL_OP_CLOSE)
                    assert_true(st.recompute_fallbacks >= 1);
                if (st.recompute_fallbacks)
                    with_fallback++;
                runs++;
                h_free(h);
                sp.f.fail_at = 0;
                if (ops[o] == SPILL_OP_UNLINK && injected) {
                    /* A file the engine failed to delete is the one leak allowed: remove it. */
                    DIR *dp = opendir(sp.dir);
                    struct dirent *de;
                    char path[512];
                    while ((de = readdir(dp)) != NULL) {
                        if (de->d_name[0] == '.')
                            continue;
                        snprintf(path, sizeof(path), "%s/%s", sp.dir, de->d_name);
                        unlink(path);
                    }
                    closedir(dp);
                }
                sp_close(&sp);
                if (injected == 0)
                    break;
            }
    cm_log_set_level(CM_LOG_INFO);
    print_message("spill faults: %d runs, %d with a recompute fallback\n", runs, with_fallback);
    assert_true(with_fallback > 20);
}

/* A file corrupted while on disk: detected at restore, recomputed, same output. */
static void
test_sched_spill_corrupt_file_recomputes(void **state)
{
    (void)state;
    struct h *h = h_new(12, 512, 4, 32);
    struct sp sp;
    sp_open(&sp, h);
    uint64_t ids[6];
    spill_workload(h, ids);
    int corrupted = 0;
    bool done_this_spill[6] = {false};
    struct eng_sched_stats st;
    for (int i = 0; i < 100000; i++) {
        eng_sched_get_stats(h->s, &st);
        if (st.running == 0 && st.queued == 0)
            break;
        h_step_ex(h, false);
        for (int k = 0; k < 6; k++) {
            struct eng_sched_seq_info info;
            if (h->recs[ids[k]].n_done || eng_sched_seq_info(h->s, ids[k], &info) < 0 ||
                !info.on_disk) {
                done_this_spill[k] = false;
                continue;
            }
            if (done_this_spill[k])
                continue;
            done_this_spill[k] = true;
            char path[512];
            snprintf(path, sizeof(path), "%s/spill-%ld-%llu.kv", sp.dir, (long)getpid(),
                     (unsigned long long)ids[k]);
            int fd = open(path, O_RDWR);
            assert_true(fd >= 0);
            uint8_t b = 0;
            off_t at = 200 + corrupted * 7;
            assert_int_equal(pread(fd, &b, 1, at), 1);
            b ^= 0x10;
            assert_int_equal(pwrite(fd, &b, 1, at), 1);
            close(fd);
            corrupted++;
        }
    }
    for (int i = 0; i < 6; i++)
        assert_matches_ref(h, ids[i]);
    eng_sched_get_stats(h->s, &st);
    assert_true(corrupted > 0);
    assert_int_equal(st.restore_failures, (uint64_t)corrupted);
    assert_int_equal(st.restores + st.restore_failures, st.spills);
    h_free(h);
    sp_close(&sp);
}

/* Cancel by id, and by owner (a closed connection), of a sequence on disk: finished at the next
 * step without reading the file, which is deleted; the owner is detached. */
static void
test_sched_spill_cancel_on_disk(void **state)
{
    (void)state;
    for (int mode = 0; mode < 2; mode++) {
        struct h *h = h_new(12, 512, 4, 32);
        struct sp sp;
        sp_open(&sp, h);
        int owner = 1;
        uint64_t ids[6];
        for (int i = 0; i < 6; i++) {
            int32_t prompt[64];
            make_prompt(prompt, 20 + i, 110 + (uint32_t)i);
            struct eng_sampler_params gp = greedy();
            int rc = 0;
            ids[i] = h_submit_ex(h, prompt, 20 + i, 60, &gp, NULL, 0, &owner, 0, 0, &rc);
            assert_int_equal(rc, 0);
        }
        uint64_t victim = 0;
        struct eng_sched_seq_info info;
        for (int t = 0; t < 10000 && !victim; t++) {
            h_step_ex(h, false);
            for (int k = 0; k < 6; k++)
                if (!h->recs[ids[k]].n_done && eng_sched_seq_info(h->s, ids[k], &info) == 0 &&
                    info.on_disk)
                    victim = ids[k];
        }
        assert_true(victim != 0);
        assert_int_equal(sp_count_entries(sp.dir), 1);
        if (mode == 0)
            assert_int_equal(eng_sched_cancel(h->s, victim, "client"), 0);
        else
            assert_true(eng_sched_cancel_owner(h->s, &owner, "disconnect") > 0);
        struct eng_sched_stats st;
        eng_sched_get_stats(h->s, &st);
        uint64_t restores = st.restores;
        h_step_ex(h, false);
        assert_int_equal(h->recs[victim].n_done, 1);
        assert_int_equal(h->recs[victim].done.finish, ENG_SCHED_FINISH_CANCELLED);
        if (mode == 1)
            assert_null(h->recs[victim].done_owner);
        eng_sched_get_stats(h->s, &st);
        assert_int_equal(st.restores, restores); /* not read back */
        assert_int_equal(st.spill_deleted, 1);
        assert_int_equal(st.on_disk, sp_count_entries(sp.dir));
        h_run_all(h, false);
        if (mode == 0)
            for (int i = 0; i < 6; i++)
                if (ids[i] != victim)
                    assert_matches_ref(h, ids[i]);
        h_free(h);
        sp_close(&sp);
    }
}

/* Over the budget: every spill is refused, every victim recomputes, outputs unchanged. */
static void
test_sched_spill_budget_falls_back(void **state)
{
    (void)state;
    struct h *h = h_new(12, 512, 4, 32);
    char dir[64];
    snprintf(dir, sizeof(dir), "/tmp/test_sched_spill.XXXXXX");
    assert_non_null(mkdtemp(dir));
    struct spill_store *store = NULL;
    assert_int_equal(spill_store_open(dir, 100, 77, NULL, &store), 0);
    struct eng_sched_spill cfg = {.store = store, .n_layer = 1, .kv_dim = 2};
    assert_int_equal(eng_sched_set_spill(h->s, &cfg), 0);
    uint64_t ids[6];
    spill_workload(h, ids);
    h_run_all(h, false);
    for (int i = 0; i < 6; i++)
        assert_matches_ref(h, ids[i]);
    struct eng_sched_stats st;
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.spills, 0);
    assert_true(st.spill_failures > 0);
    assert_int_equal(st.recompute_fallbacks, st.spill_failures);
    assert_int_equal(sp_count_entries(dir), 0);
    h_free(h);
    spill_store_close(store);
    rmdir(dir);
}

/* ---- Victim choice ---- */

/*
 * An independent model of the victim rules of sched.h (step 2), checked at every preemption of the
 * tests below: a sequence re-admitted after a preemption is immune while it has generated fewer
 * than ENG_SCHED_IMMUNITY tokens since; the victim is a non-immune running sequence unless every
 * one is immune, then a paused one, then the one with the fewest computed positions (least
 * progress). The latest-admitted tie-break is not modelled: equal keys are accepted either way.
 */
#define VT_MAX_D (3 * ENG_SCHED_IMMUNITY)

struct vt_seq {
    bool running;
    bool paused;
    bool immune;
    int n_computed;
    int n_generated;
    int n_preempted;
    int sampled;
};

struct vt {
    struct vt_seq before[MAX_IDS];
    int readmit_gen[MAX_IDS]; /* n_generated at its latest re-admission; -1: never re-admitted */
    int readmits;
    int preemptions;
    int all_immune; /* preemptions with every candidate immune */
    /* A re-admitted candidate with strictly the least progress while another, non-immune one ran,
     * by d = tokens generated since its re-admission: passed over, or chosen. */
    int least_passed[VT_MAX_D + 1];
    int least_chosen[VT_MAX_D + 1];
    uint64_t last_victim; /* the victim of the latest preemption */
};

static void
vt_init(struct vt *vt)
{
    memset(vt, 0, sizeof(*vt));
    for (int i = 0; i < MAX_IDS; i++)
        vt->readmit_gen[i] = -1;
}

/* Whether c goes before v as a victim. */
static bool
vt_before(const struct vt_seq *c, const struct vt_seq *v)
{
    if (c->immune != v->immune)
        return !c->immune;
    if (c->paused != v->paused)
        return c->paused;
    return c->n_computed < v->n_computed;
}

static int
vt_preempted_now(const struct h *h, uint64_t id)
{
    struct eng_sched_seq_info info;
    if (h->recs[id].n_done)
        return h->recs[id].done.n_preempted;
    assert_int_equal(eng_sched_seq_info(h->s, id, &info), 0);
    return info.n_preempted;
}

static void
vt_snapshot(struct vt *vt, const struct h *h)
{
    for (uint64_t id = 1; id < MAX_IDS; id++) {
        struct vt_seq *b = &vt->before[id];
        struct eng_sched_seq_info info;
        b->running = false;
        if (!h->recs[id].used || h->recs[id].n_done)
            continue;
        assert_int_equal(eng_sched_seq_info(h->s, id, &info), 0);
        b->running = info.state != ENG_SCHED_QUEUED;
        b->paused = info.paused;
        b->n_computed = info.n_computed;
        b->n_generated = info.n_generated;
        b->n_preempted = info.n_preempted;
        b->sampled = sampled_count(h, id);
        b->immune =
            vt->readmit_gen[id] >= 0 && info.n_generated < vt->readmit_gen[id] + ENG_SCHED_IMMUNITY;
    }
}

/* Records where a least-progress re-admitted candidate stood against the victims of this step. */
static void
vt_note_least(struct vt *vt, const bool *victim)
{
    uint64_t least = 0;
    bool tie = false, other_mortal = false;
    for (uint64_t id = 1; id < MAX_IDS; id++) {
        const struct vt_seq *c = &vt->before[id];
        if (!c->running)
            continue;
        if (least == 0 || c->n_computed < vt->before[least].n_computed) {
            least = id;
            tie = false;
        } else if (c->n_computed == vt->before[least].n_computed) {
            tie = true;
        }
    }
    if (least == 0 || tie || vt->readmit_gen[least] < 0 || vt->before[least].paused)
        return;
    for (uint64_t id = 1; id < MAX_IDS; id++)
        if (id != least && vt->before[id].running && !vt->before[id].immune &&
            !vt->before[id].paused)
            other_mortal = true;
    int d = vt->before[least].n_generated - vt->readmit_gen[least];
    if (!other_mortal || d < 0 || d > VT_MAX_D)
        return;
    if (victim[least])
        vt->least_chosen[d]++;
    else
        vt->least_passed[d]++;
}

/* One unchecked-pace tick (h_step_ex(h, false)) with the victim rules checked. */
static void
h_step_vt(struct h *h, struct vt *vt)
{
    static bool victim[MAX_IDS];
    vt_snapshot(vt, h);
    h_step_ex(h, false);
    int n_victims = 0, n_cand = 0, n_immune = 0;
    for (uint64_t id = 1; id < MAX_IDS; id++) {
        const struct vt_seq *b = &vt->before[id];
        victim[id] = false;
        if (!b->running)
            continue;
        n_cand++;
        n_immune += b->immune;
        int np = vt_preempted_now(h, id);
        assert_true(np == b->n_preempted || np == b->n_preempted + 1);
        victim[id] = np > b->n_preempted;
        n_victims += victim[id];
        if (victim[id])
            vt->last_victim = id;
    }
    for (uint64_t v = 1; v < MAX_IDS; v++) {
        if (!victim[v])
            continue;
        for (uint64_t c = 1; c < MAX_IDS; c++) {
            if (!vt->before[c].running || victim[c] || !vt_before(&vt->before[c], &vt->before[v]))
                continue;
            print_error("victim seq %llu (immune %d, paused %d, computed %d) chosen over seq %llu "
                        "(immune %d, paused %d, computed %d)\n",
                        (unsigned long long)v, vt->before[v].immune, vt->before[v].paused,
                        vt->before[v].n_computed, (unsigned long long)c, vt->before[c].immune,
                        vt->before[c].paused, vt->before[c].n_computed);
            fail();
        }
    }
    if (n_victims > 0) {
        vt->preemptions += n_victims;
        if (n_immune == n_cand)
            vt->all_immune++;
        vt_note_least(vt, victim);
    }
    /* Re-admissions in this step (a victim may even come back in the step it was preempted). */
    for (uint64_t id = 1; id < MAX_IDS; id++) {
        struct eng_sched_seq_info info;
        const struct vt_seq *b = &vt->before[id];
        if (!h->recs[id].used || h->recs[id].n_done || (b->running && !victim[id]))
            continue;
        assert_int_equal(eng_sched_seq_info(h->s, id, &info), 0);
        if (info.state == ENG_SCHED_QUEUED || info.n_preempted == 0)
            continue;
        vt->readmit_gen[id] = info.n_generated - (sampled_count(h, id) - b->sampled);
        vt->readmits++;
    }
}

/* Steps until every submitted request is done (bounded), checking the victim rules. */
static void
h_run_all_vt(struct h *h, struct vt *vt)
{
    struct eng_sched_stats st;
    for (int i = 0; i < 100000; i++) {
        eng_sched_get_stats(h->s, &st);
        if (st.running == 0 && st.queued == 0)
            break;
        h_step_vt(h, vt);
    }
    eng_sched_get_stats(h->s, &st);
    assert_int_equal(st.running + st.queued, 0);
    assert_int_equal(eng_kv_pool_n_free(h->kv), eng_kv_pool_n_blocks(h->kv));
}

/* Three decoding sequences fill the pool (2 + 2 + 3 blocks, none free). A (30 tokens) is the first
 * to need a block (its 33rd position, 3 tokens in); the victim is B, the one with the fewest
 * computed positions: neither the first nor the latest admitted, nor the one that needs the block.
 */
static void
test_sched_victim_least_progress(void **state)
{
    (void)state;
    struct eng_sched_config cfg;
    eng_sched_config_default(&cfg);
    cfg.max_seqs = 4;
    cfg.max_batch_tokens = 128;
    cfg.watermark_blocks = 0;
    struct h *h = h_new_cfg(7, 512, &cfg);
    struct vt *vt = malloc(sizeof(*vt));
    assert_non_null(vt);
    vt_init(vt);
    struct eng_sampler_params gp = greedy(), sp = sampled(313);
    uint64_t a = h_submit(h, 30, 310, 40, &gp);
    uint64_t b = h_submit(h, 20, 311, 40, &sp);
    uint64_t c = h_submit(h, 40, 312, 40, &gp);
    for (int t = 0; t < 100 && vt->preemptions == 0; t++)
        h_step_vt(h, vt);
    assert_int_equal(vt->preemptions, 1);
    assert_int_equal(vt->last_victim, b);
    struct eng_sched_seq_info ia, ib, ic;
    assert_int_equal(eng_sched_seq_info(h->s, a, &ia), 0);
    assert_int_equal(eng_sched_seq_info(h->s, b, &ib), 0);
    assert_int_equal(eng_sched_seq_info(h->s, c, &ic), 0);
    assert_int_equal(ib.state, ENG_SCHED_QUEUED);
    assert_int_equal(ib.n_preempted, 1);
    assert_int_equal(ia.n_preempted + ic.n_preempted, 0);
    assert_int_equal(ia.state, ENG_SCHED_DECODE);
    assert_int_equal(ic.state, ENG_SCHED_DECODE);
    /* Same tokens generated until then (A and C one more in the tick): progress is the prompt. */
    assert_true(ia.n_generated == ic.n_generated && ib.n_generated + 1 == ia.n_generated);
    h_run_all_vt(h, vt);
    assert_matches_ref(h, a);
    assert_matches_ref(h, b);
    assert_matches_ref(h, c);
    free(vt);
    h_free(h);
}

/* What one run of the immunity workload did. */
struct vt_run {
    int n_preempted[3]; /* X, R, G */
    bool r_on_disk;     /* R was seen spilled */
    struct eng_sched_stats st;
};

/*
 * The immunity workload: X (111 tokens) and R (pr tokens, the least progress throughout) decode
 * beside G (116 tokens, 20 to generate) in a pool of their blocks plus slack. At 13 tokens (slack
 * 2) R is the victim (spilled with a spill store: it has two blocks of positions); G's end frees
 * room and R comes back (restored) with 13 tokens, then decodes beside X until the pool runs out
 * again: with pr 21 when R has generated 63 tokens since, with pr 20 when it has generated 64.
 * With slack 0 X and R are both preempted early and come back together, and the pool runs out
 * while both are immune. Every preemption is checked against the model of the rules, and every
 * request against its reference.
 */
static void
vt_immunity_run(int pr, int slack, bool spill, struct vt *vt, struct vt_run *out)
{
    struct eng_sched_config cfg;
    eng_sched_config_default(&cfg);
    cfg.max_seqs = 4;
    cfg.max_batch_tokens = 256;
    cfg.watermark_blocks = 0;
    int n_blocks = eng_kv_blocks_for(111) + eng_kv_blocks_for(pr) + eng_kv_blocks_for(116) + slack;
    struct h *h = h_new_cfg(n_blocks, 512, &cfg);
    struct sp sp;
    if (spill)
        sp_open(&sp, h);
    vt_init(vt);
    memset(out, 0, sizeof(*out));
    struct eng_sampler_params gp = greedy(), smp = sampled(321);
    uint64_t ids[3];
    ids[0] = h_submit(h, 111, 320, 150, &gp);
    ids[1] = h_submit(h, pr, 321, 150, &smp);
    ids[2] = h_submit(h, 116, 322, 20, &gp);
    struct eng_sched_stats st;
    for (int i = 0; i < 100000; i++) {
        struct eng_sched_seq_info info;
        eng_sched_get_stats(h->s, &st);
        if (st.running == 0 && st.queued == 0)
            break;
        h_step_vt(h, vt);
        if (!h->recs[ids[1]].n_done && eng_sched_seq_info(h->s, ids[1], &info) == 0 && info.on_disk)
            out->r_on_disk = true;
    }
    eng_sched_get_stats(h->s, &out->st);
    assert_int_equal(out->st.running + out->st.queued, 0);
    assert_int_equal(eng_kv_pool_n_free(h->kv), eng_kv_pool_n_blocks(h->kv));
    for (int i = 0; i < 3; i++) {
        assert_matches_ref(h, ids[i]);
        out->n_preempted[i] = h->recs[ids[i]].done.n_preempted;
    }
    assert_true(vt->readmit_gen[ids[1]] >= 0); /* R came back after a preemption */
    if (spill) {
        assert_true(out->r_on_disk);
        assert_true(out->st.restores >= 1);
        assert_int_equal(out->st.restores, out->st.spills);
        assert_int_equal(out->st.recompute_fallbacks, 0);
    }
    h_free(h);
    if (spill)
        sp_close(&sp);
}

/* A sequence re-admitted after a preemption (recomputed, or restored from disk) is passed over
 * while it has generated fewer than ENG_SCHED_IMMUNITY tokens since, though it has the least
 * progress, for one that is not immune; from that many tokens on it is a victim again. */
static void
test_sched_restored_sequence_is_immune_for_64_tokens(void **state)
{
    (void)state;
    _Static_assert(ENG_SCHED_IMMUNITY == 64, "the workload is tuned to 64 tokens");
    struct vt *vt = malloc(sizeof(*vt));
    assert_non_null(vt);
    struct vt_run run;
    for (int spill = 0; spill < 2; spill++) {
        /* 63 tokens after its return: immune, X (far more progress) goes instead. */
        vt_immunity_run(21, 2, spill, vt, &run);
        assert_int_equal(vt->least_passed[ENG_SCHED_IMMUNITY - 1], 1);
        for (int d = 0; d <= VT_MAX_D; d++)
            assert_int_equal(vt->least_chosen[d], 0);
        assert_int_equal(vt->all_immune, 0);
        assert_int_equal(run.n_preempted[0], 1); /* X */
        assert_int_equal(run.n_preempted[1], 1); /* R: only before its return */
        assert_int_equal(run.n_preempted[2], 0);
        /* 64 tokens after its return: no longer immune, R goes again. */
        vt_immunity_run(20, 2, spill, vt, &run);
        assert_int_equal(vt->least_chosen[ENG_SCHED_IMMUNITY], 1);
        for (int d = 0; d <= VT_MAX_D; d++)
            assert_int_equal(vt->least_passed[d], 0);
        assert_int_equal(vt->all_immune, 0);
        assert_int_equal(run.n_preempted[0], 0);
        assert_int_equal(run.n_preempted[1], 2);
        assert_int_equal(run.n_preempted[2], 0);
    }
    free(vt);
}

/* When every candidate is immune one is still preempted (the least progress among them): the
 * scheduler goes on and every request finishes with its reference output. */
static void
test_sched_all_immune_still_preempts(void **state)
{
    (void)state;
    struct vt *vt = malloc(sizeof(*vt));
    assert_non_null(vt);
    struct vt_run run;
    for (int spill = 0; spill < 2; spill++) {
        vt_immunity_run(20, 0, spill, vt, &run);
        assert_int_equal(vt->all_immune, 1);
        assert_int_equal(vt->last_victim, 2); /* R, the least progress of the immune X and R */
        assert_int_equal(run.n_preempted[0], 1);
        assert_int_equal(run.n_preempted[1], 2);
        assert_int_equal(run.n_preempted[2], 0);
        assert_int_equal(run.st.finished, 3);
    }
    free(vt);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sched_single_length),
        cmocka_unit_test(test_sched_single_eos),
        cmocka_unit_test(test_sched_single_stop_token),
        cmocka_unit_test(test_sched_context_full),
        cmocka_unit_test(test_sched_pool_smaller_than_context),
        cmocka_unit_test(test_sched_batching_invariance),
        cmocka_unit_test(test_sched_chunked_prefill),
        cmocka_unit_test(test_sched_admission_waits_for_kv),
        cmocka_unit_test(test_sched_watermark_waived_when_idle),
        cmocka_unit_test(test_sched_priority_order),
        cmocka_unit_test(test_sched_queue_full),
        cmocka_unit_test(test_sched_submit_rejects),
        cmocka_unit_test(test_sched_config_rejects),
        cmocka_unit_test(test_sched_cancel_queued),
        cmocka_unit_test(test_sched_cancel_prefill),
        cmocka_unit_test(test_sched_cancel_decoding),
        cmocka_unit_test(test_sched_cancel_at_emit),
        cmocka_unit_test(test_sched_cancel_owner),
        cmocka_unit_test(test_sched_cancel_all),
        cmocka_unit_test(test_sched_deadline),
        cmocka_unit_test(test_sched_pause),
        cmocka_unit_test(test_sched_pause_prefill),
        cmocka_unit_test(test_sched_kv_exhaustion_recompute),
        cmocka_unit_test(test_sched_kv_exhaustion_paused_victim),
        cmocka_unit_test(test_sched_preempted_goes_first),
        cmocka_unit_test(test_sched_forward_error),
        cmocka_unit_test(test_sched_sampling_error),
        cmocka_unit_test(test_sched_alloc_failures),
        cmocka_unit_test(test_sched_stats),
        cmocka_unit_test(test_sched_cancel_reason_table),
        cmocka_unit_test(test_sched_token_loop_trips),
        cmocka_unit_test(test_sched_token_loop_no_loop),
        cmocka_unit_test(test_sched_stress),
        cmocka_unit_test(test_sched_spill_restore_matches_ref),
        cmocka_unit_test(test_sched_spill_faults_every_call),
        cmocka_unit_test(test_sched_spill_corrupt_file_recomputes),
        cmocka_unit_test(test_sched_spill_cancel_on_disk),
        cmocka_unit_test(test_sched_spill_budget_falls_back),
        cmocka_unit_test(test_sched_victim_least_progress),
        cmocka_unit_test(test_sched_restored_sequence_is_immune_for_64_tokens),
        cmocka_unit_test(test_sched_all_immune_still_preempts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

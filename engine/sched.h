/*
 * sched: the continuous-batching scheduler. It owns the request queue, the running sequences, their
 * KV block tables (blocks come from a borrowed struct eng_kv_pool) and their samplers, and turns
 * them into one batched forward pass per tick. It does no I/O and reads no clock: the engine loop
 * drives it through function calls, passes the time in (now_ns, any monotonic nanosecond clock),
 * and hears back through a struct eng_sched_events. The model sits behind struct eng_sched_model,
 * so tests run the scheduler on a fake model.
 *
 * Lifecycle of a sequence: eng_sched_submit queues it (QUEUED). Admission moves it to the running
 * set when its blocks fit (ACCEPTED is emitted once, at the first admission); it prefills in chunks
 * (PREFILL), then decodes one token per tick (DECODE). Every end goes through one path (KV blocks
 * released, sampler freed, DONE emitted with the reason and usage, sequence removed): EOS, a stop
 * token, max_tokens, the context or KV pool full, a deadline, a cancel, an error. Every accepted
 * submit gets exactly one DONE; after on_done the scheduler never mentions that owner pointer for
 * that sequence again.
 *
 * One tick (eng_sched_step):
 *   1. Apply pending cancels and expired deadlines (queued and running sequences).
 *   2. Reserve one more block for each decoding, unpaused sequence that needs one. When the pool
 *      is short, preempt a victim: sequences re-admitted after a preemption in the last
 *      ENG_SCHED_IMMUNITY generated tokens only when every candidate is, then paused sequences
 *      first, then the fewest computed positions (least progress), then the latest admitted. With
 *      a spill store (eng_sched_set_spill) and at least min_positions computed positions the
 *      victim is spilled: its KV blocks are written to one file (spill/spill.h) and released.
 *      Otherwise, or when the spill fails (ENOSPC, EIO, a short write, the --spill-max-mb budget),
 *      it is preempted by recompute: its blocks are released and re-admission prefills its tokens
 *      again. Either way it goes back to the front of the queue with its prompt, generated
 *      tokens and sampler kept in memory and goes on exactly where it stopped. Growth comes
 *      before admission, so running sequences are never starved by new ones.
 *   3. Admit from the queue in order (preempted first, then priority, then arrival: so spilled
 *      sequences are restored before new requests are admitted, oldest first) while the running
 *      set has room (max_seqs) and the pool has blocks for the whole sequence plus
 *      watermark_blocks free; a head that does not fit stops admission (no overtaking); paused
 *      entries are skipped. With no unpaused sequence running the watermark is waived, so a
 *      request that fits is never stuck. A spilled sequence is restored into the freshly
 *      reserved blocks: the file is read and verified (checksum, shape, and its request id,
 *      tokens and RNG state against the sequence's in-memory record) and deleted; a corrupt or
 *      unreadable file is counted and the sequence recomputes from its tokens instead.
 *
 * Spilled sequences and their connections: the file holds state, not connections. While a
 * sequence is on disk the scheduler keeps a small record of it in the queue (ids, owner, tokens,
 * sampler, cancel state), so the owner link never dangles: eng_sched_cancel_owner detaches the
 * owner (NULL) and marks it cancelled exactly as for a queued sequence, and that mark is the
 * tombstone. The restored state is re-bound to the record by request id (a file whose request id,
 * tokens or RNG differ from the record is treated as corrupt). A cancel, a closed connection or
 * an expired deadline finishes an on-disk sequence at the top of the next step: its file is
 * deleted and DONE is emitted (CANCELLED / DEADLINE) without reading it back.
 *   4. Build one batch: one decode token per decoding, unpaused sequence, then prefill chunks of
 *      prefilling, unpaused sequences (oldest first) up to max_batch_tokens in total.
 *   5. Run the forward pass; advance each sequence's KV position.
 *   6. For each sequence with logits (decodes, and prefills that reached their last token): check
 *      its cancel flag (a cancel set by a callback earlier in this tick wins over the token),
 *      sample with its own sampler (history: its generated tokens), emit TOKEN, and finish on EOS,
 *      a stop token, the token_loop guard, max_tokens or a full context.
 * token_loop (GUARDS.md, engine side): a request with token_loop = R > 0 has its generated ids
 * checked by guard_token_loop_check(ids, n_gen, R) after each emitted token; when it trips, the
 * sequence is finished within that tick exactly like a cancel with reason "token_loop" (DONE
 * CANCELLED, cancel_reason "token_loop", blocks released, counted in cancels[] and in
 * guard_trips[GUARD_TOKEN_LOOP]), the token that completed the loop having been emitted. One WARN
 * line per trip (req id, seq id, guard name). It is checked before max_tokens / context full.
 * A forward error finishes every sequence of that batch with ERROR; a sampling error finishes its
 * sequence with ERROR. No path waits: a tick runs or skips, it never blocks. A sequence can never
 * hold more positions than the pool has blocks for (submit rejects longer prompts, generation
 * stops there with LENGTH), so a sequence running alone always fits and preemption always ends.
 *
 * Tokens: EOS (model->is_eog) and stop tokens end the sequence and are not emitted as TOKEN; DONE
 * names them (finish_token). usage.completion_tokens counts every sampled token, that one included.
 *
 * Threads: every function runs on the engine loop thread. The model's forward may use a compute
 * pool internally. Callbacks run inside eng_sched_step; from a callback only eng_sched_cancel,
 * eng_sched_cancel_owner, eng_sched_cancel_all, eng_sched_pause and the read-only queries may be
 * called (they only mark state; nothing is freed under the tick's feet).
 */
#ifndef ENG_SCHED_H
#define ENG_SCHED_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/sampler.h"
#include "guards/guard.h"

#define ENG_SCHED_N_GUARDS GUARD_N

struct eng_kv_pool;
struct eng_batch;
struct eng_sched;
struct spill_store;

/* Generated tokens after a re-admission during which a sequence is not preempted again unless
 * every candidate is as recent. */
#define ENG_SCHED_IMMUNITY 64

/* ---- Seams ---- */

/* The model. forward runs one batch (see struct eng_batch in engine/model.h) and writes
 * (b->n_logits, n_vocab) floats to logits; it returns 0 or a negative errno. is_eog says whether a
 * token ends generation. The scheduler never calls forward with more than max_batch_tokens tokens
 * or more than max_seqs logits rows. ctx is borrowed. */
struct eng_sched_model {
    void *ctx;
    int n_vocab;
    int n_ctx; /* positions a sequence may use: prompt + generated <= n_ctx */
    int (*forward)(void *ctx, struct eng_kv_pool *kv, const struct eng_batch *b, float *logits);
    bool (*is_eog)(void *ctx, int32_t id);
    /* Optional clock read after each forward pass, so that the tokens it produced are stamped
     * with the time they exist (TTFT and inter-token latency include the compute); NULL: the
     * step's now_ns. */
    uint64_t (*now)(void *ctx);
};

enum eng_sched_finish {
    ENG_SCHED_FINISH_EOS = 0,        /* the model's end-of-generation token */
    ENG_SCHED_FINISH_LENGTH = 1,     /* max_tokens, the context or the KV pool full */
    ENG_SCHED_FINISH_STOP_TOKEN = 2, /* one of the request's stop token ids */
    ENG_SCHED_FINISH_CANCELLED = 3,  /* eng_sched_cancel*: reason in cancel_reason */
    ENG_SCHED_FINISH_DEADLINE = 4,   /* the request's deadline passed */
    ENG_SCHED_FINISH_ERROR = 5,      /* forward or sampling failed: errno in error */
    ENG_SCHED_FINISH_COUNT = 6,
};

/* "eos", "length", "stop_token", "cancelled", "deadline", "error" ("?" for anything else). */
const char *eng_sched_finish_name(enum eng_sched_finish f);

#define ENG_SCHED_REASON_MAX 48 /* bytes of a cancel reason, NUL included; longer ones are cut */

struct eng_sched_done {
    enum eng_sched_finish finish;
    const char *cancel_reason; /* CANCELLED: the reason given (e.g. a guard name); else "" */
    int error;                 /* ERROR: the negative errno; else 0 */
    int32_t finish_token;      /* EOS / STOP_TOKEN: the token; else -1 */
    int prompt_tokens;
    int completion_tokens; /* sampled tokens, the finishing EOS / stop token included */
    int cached_tokens;     /* prompt tokens reused from a cache (prefix reuse: always 0 now) */
    int n_preempted;       /* times the sequence was preempted and recomputed */
    uint64_t queue_ns;     /* submit to first admission (to the end when never admitted) */
    uint64_t ttft_ns;      /* submit to the first sampled token; 0 when none */
    uint64_t total_ns;     /* submit to the end */
};

/* Events. owner is the request's owner pointer (NULL after eng_sched_cancel_owner detached it);
 * req_id is the request's own id, seq_id the scheduler's. Pointers passed in are valid only during
 * the call. ctx is borrowed. Any callback may be NULL. */
struct eng_sched_events {
    void *ctx;
    void (*on_accepted)(void *ctx, void *owner, uint64_t req_id, uint64_t seq_id, int prompt_tokens,
                        int cached_tokens);
    /* tok->id, its logprob and top alternatives (n_top > 0 only when the request asked for them);
     * index is the token's 0-based position in the completion. */
    void (*on_token)(void *ctx, void *owner, uint64_t req_id, uint64_t seq_id,
                     const struct eng_sample *tok, int index);
    void (*on_done)(void *ctx, void *owner, uint64_t req_id, uint64_t seq_id,
                    const struct eng_sched_done *done);
};

/* ---- Configuration ---- */

struct eng_sched_config {
    int max_seqs;         /* running sequences at once (1..4096); default 64 */
    int max_batch_tokens; /* tokens per forward pass, >= max_seqs; default 256 */
    int max_queue;        /* queued requests; beyond it submit is -EAGAIN (>= 0); default 256 */
    int watermark_blocks; /* blocks left free at admission for running sequences to grow (>= 0);
                             default 4 */
};

void eng_sched_config_default(struct eng_sched_config *cfg);

/* Creates a scheduler over kv (borrowed; every block free now and left to the scheduler from
 * then on), model and events (copied; their ctx pointers are borrowed). Returns 0, -EINVAL (a
 * config value out of range, a pool with blocks in use, a missing forward, n_vocab or n_ctx < 1)
 * or -ENOMEM. */
int eng_sched_new(const struct eng_sched_config *cfg, const struct eng_sched_model *model,
                  struct eng_kv_pool *kv, const struct eng_sched_events *ev,
                  struct eng_sched **out);

/* Frees every sequence without emitting events (use eng_sched_cancel_all and step first for a
 * clean shutdown); their blocks go back to the pool. NULL is a no-op. */
void eng_sched_free(struct eng_sched *s);

/* Spill (issue 6). store is borrowed and must outlive the scheduler; n_layer and kv_dim describe
 * the pool (for the file's shape); victims with fewer than min_positions computed positions are
 * recomputed instead (cheaper than a file); 0 picks ENG_KV_BLOCK. Call before any submit. Only for
 * a pool whose blocks hold the KV data (the CPU backend). Returns 0, or -EINVAL (a shape that does
 * not match the pool's block size, or sequences already submitted). */
struct eng_sched_spill {
    struct spill_store *store;
    int n_layer;
    int kv_dim;
    int min_positions;
};

int eng_sched_set_spill(struct eng_sched *s, const struct eng_sched_spill *sp);

/* ---- Requests ---- */

struct eng_sched_req {
    const int32_t *prompt;              /* (n_prompt) token ids, copied */
    int n_prompt;                       /* >= 1 */
    int max_tokens;                     /* >= 1; the context may end it sooner */
    struct eng_sampler_params sampling; /* validated and copied (logit_bias included) */
    bool logprobs;              /* report top alternatives (sampling.top_logprobs of them) */
    const int32_t *stop_tokens; /* (n_stop) token ids that end generation, copied */
    int n_stop;
    uint64_t deadline_ns; /* absolute, on the now_ns clock; 0: none */
    int priority;         /* larger is admitted first; default 0 */
    void *owner;          /* opaque (the connection), handed back in events */
    uint64_t req_id;      /* opaque (the wire request id), handed back in events */
    int token_loop;       /* token_loop guard repeats: 0 off, else 2..ENG_SCHED_MAX_TOKEN_LOOP */
};

#define ENG_SCHED_MAX_TOKEN_LOOP 16

/* Queues a request at time now_ns; *seq_id_out gets its id (never 0). Returns 0, -EAGAIN (the
 * queue holds max_queue requests), -E2BIG (n_prompt + 1 > n_ctx, or more blocks than the whole
 * pool has), -EINVAL (an empty prompt, a token id outside the vocabulary, max_tokens < 1, bad
 * sampling parameters, n_stop < 0, token_loop not 0 nor in 2..ENG_SCHED_MAX_TOKEN_LOOP) or
 * -ENOMEM. Nothing is emitted for a rejected request. */
int eng_sched_submit(struct eng_sched *s, const struct eng_sched_req *req, uint64_t now_ns,
                     uint64_t *seq_id_out);

/* Marks seq_id cancelled; it finishes with CANCELLED and reason (NULL: "cancelled") at the top of
 * the next step, or at its next emit if that comes first within a step. A second cancel keeps the
 * first reason. Returns 0, or -ENOENT for an unknown or finished sequence. */
int eng_sched_cancel(struct eng_sched *s, uint64_t seq_id, const char *reason);

/* Cancels every sequence of owner (a closed connection) and detaches the owner: from this call on
 * their events carry owner NULL, so the caller may free it at once. Returns the number of
 * sequences marked (0 when none). */
int eng_sched_cancel_owner(struct eng_sched *s, const void *owner, const char *reason);

/* Cancels every sequence (shutdown). Returns the number marked. */
int eng_sched_cancel_all(struct eng_sched *s, const char *reason);

/* Pauses (its reader is slow: the connection's output buffer is full) or resumes a sequence. A
 * paused sequence keeps its KV blocks (unless preempted) but is left out of batches and out of
 * admission; it is still cancelled and still expires. The pause time is the now_ns of the latest
 * step or submit. Returns 0, or -ENOENT. */
int eng_sched_pause(struct eng_sched *s, uint64_t seq_id, bool paused);

/* ---- Ticks ---- */

/* Runs one tick at time now_ns (see the top of this file). Returns the number of tokens in the
 * batch it ran (0: nothing to compute; events may still have been emitted). */
int eng_sched_step(struct eng_sched *s, uint64_t now_ns);

/* Whether a step now would do anything: a pending cancel, a running unpaused sequence, or an
 * admissible queue head. When false the loop may block until I/O or eng_sched_next_deadline. */
bool eng_sched_has_work(const struct eng_sched *s);

/* The earliest deadline of a live sequence, or 0 when none. */
uint64_t eng_sched_next_deadline(const struct eng_sched *s);

/* ---- Queries and statistics ---- */

enum eng_sched_state {
    ENG_SCHED_QUEUED = 0,
    ENG_SCHED_PREFILL = 1,
    ENG_SCHED_DECODE = 2,
};

struct eng_sched_seq_info {
    enum eng_sched_state state;
    bool paused;
    bool cancel_pending;
    uint64_t paused_since_ns; /* when paused: the step time it was paused at */
    int n_prompt;
    int n_generated;
    int n_computed; /* positions in the KV cache */
    int n_blocks;   /* KV blocks held */
    int n_preempted;
    bool on_disk; /* spilled: its KV is in a file */
};

/* Returns 0 and fills *out, or -ENOENT. */
int eng_sched_seq_info(const struct eng_sched *s, uint64_t seq_id, struct eng_sched_seq_info *out);

/* Latency histograms: bucket i counts observations <= eng_sched_hist_le_ms[i] and above the
 * previous bound (not cumulative: sum a prefix for Prometheus' le buckets); the last bucket is
 * +Inf. */
#define ENG_SCHED_HIST_BUCKETS 15
extern const double eng_sched_hist_le_ms[ENG_SCHED_HIST_BUCKETS - 1];

struct eng_sched_hist {
    uint64_t counts[ENG_SCHED_HIST_BUCKETS];
    uint64_t n;
    double sum_ms;
};

#define ENG_SCHED_MAX_CANCEL_REASONS 16

struct eng_sched_stats {
    uint64_t submitted;        /* accepted by eng_sched_submit */
    uint64_t rejected_full;    /* -EAGAIN */
    uint64_t rejected_invalid; /* -E2BIG, -EINVAL */
    uint64_t finished;         /* DONE events */
    uint64_t finished_by[ENG_SCHED_FINISH_COUNT];
    uint64_t prompt_tokens;    /* of submitted requests */
    uint64_t generated_tokens; /* sampled tokens */
    uint64_t prefill_tokens;   /* prefill positions computed, recomputation included */
    uint64_t preemptions;
    uint64_t steps;        /* eng_sched_step calls */
    uint64_t ticks;        /* steps that ran a forward pass */
    uint64_t batch_tokens; /* tokens over all forward passes */
    uint64_t decode_tokens;
    int running; /* admitted sequences (prefilling or decoding, paused included) */
    int queued;
    int paused; /* running or queued */
    int kv_blocks_used;
    int kv_blocks_total;
    struct eng_sched_hist ttft;
    struct eng_sched_hist itl; /* between consecutive sampled tokens of a sequence */
    int n_cancel_reasons;
    struct {
        char reason[ENG_SCHED_REASON_MAX];
        uint64_t n;
    } cancels[ENG_SCHED_MAX_CANCEL_REASONS];
    uint64_t cancels_other; /* reasons beyond the table */
    /* Guard trips the scheduler itself detected, by enum guard_id (guards/guard.h): only
     * token_loop so far. Trips named by a worker's CANCEL are counted by the engine daemon. */
    uint64_t guard_trips[ENG_SCHED_N_GUARDS];
    /* Spill. Latencies come from model.now (0 without it). */
    uint64_t spills;              /* sequences written to disk */
    uint64_t spill_bytes;         /* bytes those files took */
    uint64_t restores;            /* sequences read back and verified */
    uint64_t spill_failures;      /* spills that failed (or the budget refused): recomputed */
    uint64_t restore_failures;    /* corrupt or unreadable files at restore: recomputed */
    uint64_t recompute_fallbacks; /* spill_failures + restore_failures */
    uint64_t spill_deleted;       /* files deleted unread (cancel, deadline, shutdown) */
    int on_disk;                  /* sequences on disk now */
    uint64_t disk_bytes;          /* bytes of their files now */
    struct eng_sched_hist spill_ms;
    struct eng_sched_hist restore_ms;
};

void eng_sched_get_stats(const struct eng_sched *s, struct eng_sched_stats *out);

/* Tests only: makes the Nth allocation the scheduler itself makes from now on fail (0 disarms).
 * The sampler's and the block tables' own allocations are not counted. Loop thread only. */
void eng_sched_test_fail_alloc(long n);

#endif

/*
 * llm-engine: the scheduler daemon. Loads one GGUF model, listens on a Unix socket (mode 0660) and
 * serves the wire protocol of common/cm_wire.h to llm-fcgi workers.
 *
 * One loop thread, Redis-style: epoll for the listening socket, the worker connections and a
 * signalfd; while the scheduler has work the loop polls without blocking, runs one scheduler tick
 * (one batched forward pass on the compute pool), queues the resulting frames on each connection's
 * bounded output buffer and writes them without blocking. A connection whose output buffer is over
 * its bound has its sequences paused (never waited on); one stuck past --max-stall-ms is cancelled.
 * A bad frame closes only its own connection. A closed connection cancels its sequences.
 * SIGTERM/SIGINT: stop accepting, let running sequences finish within the grace period, cancel the
 * rest, exit 0.
 *
 * Guards: the engine is the single source of truth for guard trips (GUARDS.md). STATS_REPLY
 * carries "guard_trips": {"<guard name>": n, ...} with every name of guard.h present (0 when
 * none): the CANCEL frames received whose reason is a guard name (counted on receipt, whether or
 * not the sequence was still live, since the worker's trip happened either way) plus the trips the
 * scheduler detected itself (token_loop, enabled per request by SUBMIT's "token_loop"; logged
 * there with one WARN line per trip). The worker logs its own trips; the engine does not.
 *
 * Spill (issue 6): with --spill-dir (default $TMPDIR or /tmp, then llm-engine-spill-UID; "none"
 * disables) a preempted sequence's KV cache goes to a file there instead of being recomputed
 * (engine/sched.h, spill/spill.h), within --spill-max-mb. The directory is created if missing;
 * stale files of dead engines are removed at start-up. If the default directory cannot be used
 * the engine logs a warning and preempts by recompute; an explicit --spill-dir that cannot be
 * used is a start-up error. The CUDA backend keeps its KV on the device: no spill there.
 * The model fingerprint in each file hashes the GGUF's metadata and tensor table.
 * Tests only: LLM_ENGINE_SPILL_FAULT="OP:N:ERRNO[:sticky|:short]" (spill_fault_parse) makes the
 * Nth spill I/O call of kind OP fail, e.g. "write:3:ENOSPC"; a bad value is a start-up error.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <json-c/json.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/cm_chat.h"
#include "common/cm_log.h"
#include "common/cm_util.h"
#include "common/cm_wire.h"
#include "engine/gguf.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/model_cuda.h"
#include "engine/sched.h"
#include "engine/tokenizer.h"
#include "guards/guard.h"
#include "kernels/kern.h"
#include "spill/spill.h"

/* ---- Options ---- */

struct opts {
    const char *model;
    const char *socket_path;
    const char *model_name;
    int n_threads;
    int kv_cache_mb;
    int n_ctx;
    int request_timeout_s;
    int max_stall_ms;
    int out_buffer_kb;
    int grace_s;
    int max_frame_bytes;
    enum cm_log_level log_level;
    bool cuda;             /* --backend cuda */
    const char *spill_dir; /* NULL: the default; "none": off */
    int spill_max_mb;
    struct eng_sched_config sched;
};

static void
usage(FILE *f)
{
    fprintf(
        f,
        "usage: llm-engine -m MODEL --socket PATH [options]\n"
        "\n"
        "The llm-fcgi engine daemon: loads a GGUF model and serves llm-fcgi workers over a Unix\n"
        "socket with continuous batching on the CPU.\n"
        "\n"
        "  -m, --model FILE          GGUF model file\n"
        "  -s, --socket PATH         Unix socket to listen on (created with mode 0660; a stale\n"
        "                            file is replaced, a live engine there is an error)\n"
        "      --model-name NAME     model id reported to workers (default: general.name)\n"
        "  -t, --threads N           compute threads (default: online CPUs)\n"
        "      --backend cpu|cuda    compute backend (default cpu; cuda: make cuda, a GPU)\n"
        "      --kv-cache-mb M       KV cache size in MiB (default 256)\n"
        "  -c, --ctx N               context per sequence in tokens (default: the model's)\n"
        "      --max-seqs S          sequences decoded at once (default 64)\n"
        "      --max-batch-tokens B  tokens per forward pass, prefill chunks included "
        "(default 256;\n"
        "                            512 with --backend cuda)\n"
        "      --max-queue Q         queued requests; beyond it a submit gets EAGAIN (default "
        "256)\n"
        "      --request-timeout SEC deadline of a request without its own (default 600; 0 "
        "none)\n"
        "      --max-stall-ms MS     cancel a sequence whose reader has not taken its output "
        "for MS\n"
        "                            (default 30000)\n"
        "      --out-buffer-kb KB    output bound per connection; above it its sequences pause\n"
        "                            (default 256)\n"
        "      --max-frame-bytes N   largest frame payload accepted (default 1048576)\n"
        "      --grace-seconds G     on SIGTERM, time running sequences get to finish "
        "(default 10)\n"
        "      --spill-dir DIR       where preempted sequences' KV caches are written when the\n"
        "                            cache is full, instead of recomputing them later (default\n"
        "                            $TMPDIR or /tmp, then llm-engine-spill-UID; 'none': always\n"
        "                            recompute). Files of dead engines there are removed at start\n"
        "      --spill-max-mb M      bytes of spill files at once; beyond it recompute (default\n"
        "                            4096)\n"
        "      --log-level L         debug, info, warn or error (default info)\n"
        "  -h, --help                this text\n");
}

enum {
    OPT_MODEL_NAME = 1000,
    OPT_KV_MB,
    OPT_MAX_SEQS,
    OPT_MAX_BATCH,
    OPT_MAX_QUEUE,
    OPT_TIMEOUT,
    OPT_STALL,
    OPT_OUTBUF,
    OPT_FRAME,
    OPT_GRACE,
    OPT_LOG,
    OPT_BACKEND,
    OPT_SPILL_DIR,
    OPT_SPILL_MB,
};

static int
parse_int(const char *s, const char *what, long lo, long hi, int *out)
{
    return cm_parse_int_arg("llm-engine", what, s, lo, hi, out);
}

/* Returns 0 to run, 1 after --help, -1 on bad usage. */
static int
parse_args(int argc, char **argv, struct opts *o)
{
    static const struct option longopts[] = {
        {"model", required_argument, 0, 'm'},
        {"socket", required_argument, 0, 's'},
        {"model-name", required_argument, 0, OPT_MODEL_NAME},
        {"threads", required_argument, 0, 't'},
        {"kv-cache-mb", required_argument, 0, OPT_KV_MB},
        {"ctx", required_argument, 0, 'c'},
        {"max-seqs", required_argument, 0, OPT_MAX_SEQS},
        {"max-batch-tokens", required_argument, 0, OPT_MAX_BATCH},
        {"max-queue", required_argument, 0, OPT_MAX_QUEUE},
        {"request-timeout", required_argument, 0, OPT_TIMEOUT},
        {"max-stall-ms", required_argument, 0, OPT_STALL},
        {"out-buffer-kb", required_argument, 0, OPT_OUTBUF},
        {"max-frame-bytes", required_argument, 0, OPT_FRAME},
        {"grace-seconds", required_argument, 0, OPT_GRACE},
        {"log-level", required_argument, 0, OPT_LOG},
        {"backend", required_argument, 0, OPT_BACKEND},
        {"spill-dir", required_argument, 0, OPT_SPILL_DIR},
        {"spill-max-mb", required_argument, 0, OPT_SPILL_MB},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    o->n_threads = ncpu > 0 ? (int)ncpu : 1;
    o->kv_cache_mb = 256;
    o->request_timeout_s = 600;
    o->max_stall_ms = 30000;
    o->out_buffer_kb = 256;
    o->grace_s = 10;
    o->max_frame_bytes = (int)CM_WIRE_DEFAULT_MAX_PAYLOAD;
    o->log_level = CM_LOG_INFO;
    o->spill_max_mb = 4096;
    eng_sched_config_default(&o->sched);
    bool max_batch_set = false;
    int c;
    while ((c = getopt_long(argc, argv, "m:s:t:c:h", longopts, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case 'm':
            o->model = optarg;
            break;
        case 's':
            o->socket_path = optarg;
            break;
        case OPT_MODEL_NAME:
            o->model_name = optarg;
            break;
        case 't':
            rc = parse_int(optarg, "--threads", 1, 256, &o->n_threads);
            break;
        case OPT_KV_MB:
            rc = parse_int(optarg, "--kv-cache-mb", 1, 1 << 20, &o->kv_cache_mb);
            break;
        case 'c':
            rc = parse_int(optarg, "--ctx", 16, 1 << 20, &o->n_ctx);
            break;
        case OPT_MAX_SEQS:
            rc = parse_int(optarg, "--max-seqs", 1, 4096, &o->sched.max_seqs);
            break;
        case OPT_MAX_BATCH:
            rc = parse_int(optarg, "--max-batch-tokens", 1, 65536, &o->sched.max_batch_tokens);
            max_batch_set = true;
            break;
        case OPT_MAX_QUEUE:
            rc = parse_int(optarg, "--max-queue", 0, 1 << 20, &o->sched.max_queue);
            break;
        case OPT_TIMEOUT:
            rc = parse_int(optarg, "--request-timeout", 0, 7 * 24 * 3600, &o->request_timeout_s);
            break;
        case OPT_STALL:
            rc = parse_int(optarg, "--max-stall-ms", 1, 1 << 30, &o->max_stall_ms);
            break;
        case OPT_OUTBUF:
            rc = parse_int(optarg, "--out-buffer-kb", 1, 1 << 20, &o->out_buffer_kb);
            break;
        case OPT_FRAME:
            rc = parse_int(optarg, "--max-frame-bytes", (long)CM_WIRE_MIN_MAX_PAYLOAD,
                           (long)CM_WIRE_MAX_MAX_PAYLOAD, &o->max_frame_bytes);
            break;
        case OPT_GRACE:
            rc = parse_int(optarg, "--grace-seconds", 0, 3600, &o->grace_s);
            break;
        case OPT_LOG:
            if (cm_log_parse_level(optarg, &o->log_level) < 0) {
                fprintf(stderr, "llm-engine: unknown --log-level '%s'\n", optarg);
                rc = -1;
            }
            break;
        case OPT_BACKEND:
            if (strcmp(optarg, "cpu") != 0 && strcmp(optarg, "cuda") != 0) {
                fprintf(stderr, "llm-engine: --backend must be cpu or cuda, got '%s'\n", optarg);
                rc = -1;
            }
            o->cuda = strcmp(optarg, "cuda") == 0;
            break;
        case OPT_SPILL_DIR:
            o->spill_dir = optarg;
            break;
        case OPT_SPILL_MB:
            rc = parse_int(optarg, "--spill-max-mb", 1, 1 << 30, &o->spill_max_mb);
            break;
        case 'h':
            usage(stdout);
            return 1;
        default:
            return -1;
        }
        if (rc < 0)
            return -1;
    }
    if (optind < argc) {
        fprintf(stderr, "llm-engine: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (!o->model || !o->socket_path) {
        fprintf(stderr, "llm-engine: -m MODEL and --socket PATH are required (see --help)\n");
        return -1;
    }
    /* CPU: 256-token steps prefill as fast as 512-token ones (8 streams: equal tok/s, TTFT p50
     * and inter-token p99 lower, bench/NOTES.md); CUDA keeps larger steps to fill the GPU. */
    if (o->cuda && !max_batch_set)
        o->sched.max_batch_tokens = 512;
    if (o->sched.max_batch_tokens < o->sched.max_seqs) {
        fprintf(stderr, "llm-engine: --max-batch-tokens must be at least --max-seqs\n");
        return -1;
    }
    return 0;
}

/* ---- State ---- */

/* A live request of a connection: its wire id and the scheduler's sequence. */
struct live_req {
    uint64_t req_id;
    uint64_t seq_id;
    bool logprobs; /* the request asked for logprobs: TOKEN frames carry them */
};

struct conn {
    int fd;
    bool hello_done;
    bool paused;           /* its sequences are paused: the output buffer is over the bound */
    uint64_t paused_since; /* ns */
    struct cm_wire_reader rd;
    struct cm_wire_buf out;
    bool want_write; /* EPOLLOUT registered */
    int n_live;
    int cap_live;
    struct live_req *live;
    struct conn *prev, *next;
};

struct engine {
    struct opts o;
    struct eng_gguf *gguf;
    struct eng_model *model;
    struct eng_tok *tok;
    struct kern_pool *pool;
    struct eng_fwd *fwd;
    struct eng_cuda_fwd *cfwd; /* --backend cuda: used instead of fwd */
    struct eng_kv_pool *kv;
    struct eng_sched *sched;
    struct spill_store *spill;
    struct spill_fault spill_fault; /* LLM_ENGINE_SPILL_FAULT */
    char spill_dir[4096];
    struct cm_wire_model_info info;
    char *default_system;
    int n_ctx;
    int ep;
    int listen_fd;
    int sig_fd;
    struct conn *conns;
    int n_conns;
    bool stopping;
    bool cancelled_rest;
    uint64_t stop_deadline;
    uint64_t started_ns;
    uint64_t rejected_full;
    uint64_t frames_rejected;
    uint64_t guard_cancels[GUARD_N]; /* CANCEL frames whose reason is a guard name */
    size_t out_bound;
};

/* ---- Model adapter for the scheduler ---- */

static int
model_forward(void *ctx, struct eng_kv_pool *kv, const struct eng_batch *b, float *logits)
{
    struct engine *e = ctx;
    if (e->cfwd)
        return eng_cuda_forward_batch(e->cfwd, b, logits);
    return eng_forward_batch(e->fwd, kv, b, logits);
}

static bool
model_is_eog(void *ctx, int32_t id)
{
    struct engine *e = ctx;
    return eng_tok_is_eog(e->tok, id);
}

static uint64_t
model_now(void *ctx)
{
    (void)ctx;
    return cm_now_ns();
}

/* ---- Connections ---- */

static void
conn_update_events(struct engine *e, struct conn *c)
{
    bool want = cm_wire_buf_pending(&c->out) > 0;
    if (want == c->want_write)
        return;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0u),
                             .data.ptr = c};
    if (epoll_ctl(e->ep, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->want_write = want;
}

static void
conn_free(struct engine *e, struct conn *c, const char *why)
{
    int n = eng_sched_cancel_owner(e->sched, c, CM_WIRE_CANCEL_CLIENT_DISCONNECT);
    CM_LOG(CM_LOG_DEBUG, "connection closed fd=%d why=%s cancelled=%d", c->fd, why, n);
    epoll_ctl(e->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (c->prev)
        c->prev->next = c->next;
    else
        e->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    e->n_conns--;
    cm_wire_reader_fini(&c->rd);
    cm_wire_buf_fini(&c->out);
    free(c->live);
    free(c);
}

static int
live_find(const struct conn *c, uint64_t req_id)
{
    for (int i = 0; i < c->n_live; i++) {
        if (c->live[i].req_id == req_id)
            return i;
    }
    return -1;
}

static void
live_remove(struct conn *c, uint64_t req_id)
{
    int i = live_find(c, req_id);
    if (i >= 0)
        c->live[i] = c->live[--c->n_live];
}

/* Sends ERROR; fatal errors also stop reading from the connection (it is closed by the caller). */
static void
send_error(struct conn *c, uint64_t req_id, int code, uint32_t retry_ms, const char *msg)
{
    struct cm_wire_error m = {.code = code, .retry_after_ms = retry_ms};
    snprintf(m.message, sizeof(m.message), "%s", msg);
    if (cm_wire_encode_error(&c->out, req_id, &m) < 0)
        CM_LOG(CM_LOG_WARN, "cannot encode an ERROR frame fd=%d", c->fd);
}

/* Pauses or resumes every sequence of c by its output backlog. */
static void
conn_backpressure(struct engine *e, struct conn *c, uint64_t now)
{
    size_t pending = cm_wire_buf_pending(&c->out);
    bool over = pending > e->out_bound;
    bool under = pending <= e->out_bound / 2;
    if (!c->paused && over) {
        c->paused = true;
        c->paused_since = now;
    } else if (c->paused && under) {
        c->paused = false;
    } else {
        return;
    }
    for (int i = 0; i < c->n_live; i++)
        eng_sched_pause(e->sched, c->live[i].seq_id, c->paused);
}

/* ---- Scheduler events ---- */

static void
on_accepted(void *ctx, void *owner, uint64_t req_id, uint64_t seq_id, int prompt_tokens,
            int cached_tokens)
{
    (void)ctx;
    (void)seq_id;
    struct conn *c = owner;
    if (!c)
        return;
    struct cm_wire_accepted m = {.prompt_tokens = (uint32_t)prompt_tokens,
                                 .cached_tokens = (uint32_t)cached_tokens};
    cm_wire_encode_accepted(&c->out, req_id, &m);
}

static void
on_token(void *ctx, void *owner, uint64_t req_id, uint64_t seq_id, const struct eng_sample *tok,
         int index)
{
    (void)seq_id;
    (void)index;
    struct engine *e = ctx;
    struct conn *c = owner;
    if (!c)
        return;
    struct cm_wire_token m = {.id = tok->id};
    const char *piece = NULL;
    size_t len = eng_tok_piece(e->tok, tok->id, false, &piece);
    if (len > CM_WIRE_MAX_TOKEN_TEXT)
        len = CM_WIRE_MAX_TOKEN_TEXT;
    memcpy(m.text, piece, len);
    m.text[len] = 0;
    m.text_len = (uint32_t)len;
    if (len == 0 && eng_tok_piece(e->tok, tok->id, true, &piece) > 0)
        m.flags |= CM_WIRE_TOKEN_SPECIAL;
    int li = live_find(c, req_id);
    if (li >= 0 && c->live[li].logprobs) {
        m.flags |= CM_WIRE_TOKEN_LOGPROB;
        m.logprob = tok->logprob;
        m.n_top = (uint32_t)tok->n_top;
        m.flags |= CM_WIRE_TOKEN_TOP_TEXT;
        uint32_t off = 0;
        for (int i = 0; i < tok->n_top; i++) {
            m.top_ids[i] = tok->top_ids[i];
            m.top_logprobs[i] = tok->top_logprobs[i];
            /* Alternatives show control tokens by their text ("<|im_end|>"). */
            const char *alt = NULL;
            size_t alen = eng_tok_piece(e->tok, tok->top_ids[i], true, &alt);
            if (alen > CM_WIRE_MAX_TOP_TEXT - off)
                alen = 0;
            if (alen)
                memcpy(m.top_text + off, alt, alen);
            m.top_off[i] = (uint16_t)off;
            m.top_len[i] = (uint16_t)alen;
            off += (uint32_t)alen;
        }
    }
    if (cm_wire_encode_token(&c->out, req_id, &m) < 0)
        CM_LOG(CM_LOG_WARN, "cannot encode a TOKEN frame req=%llu", (unsigned long long)req_id);
}

static enum cm_wire_finish
wire_finish(enum eng_sched_finish f)
{
    switch (f) {
    case ENG_SCHED_FINISH_EOS:
        return CM_WIRE_FINISH_EOS;
    case ENG_SCHED_FINISH_LENGTH:
        return CM_WIRE_FINISH_LENGTH;
    case ENG_SCHED_FINISH_STOP_TOKEN:
        return CM_WIRE_FINISH_STOP_TOKEN;
    case ENG_SCHED_FINISH_CANCELLED:
        return CM_WIRE_FINISH_CANCELLED;
    case ENG_SCHED_FINISH_DEADLINE:
        return CM_WIRE_FINISH_DEADLINE;
    default:
        return CM_WIRE_FINISH_ERROR;
    }
}

static void
on_done(void *ctx, void *owner, uint64_t req_id, uint64_t seq_id, const struct eng_sched_done *d)
{
    (void)ctx;
    (void)seq_id;
    struct conn *c = owner;
    if (!c)
        return;
    struct cm_wire_done m = {
        .finish = wire_finish(d->finish),
        .prompt_tokens = (uint32_t)d->prompt_tokens,
        .completion_tokens = (uint32_t)d->completion_tokens,
        .cached_tokens = (uint32_t)d->cached_tokens,
        .queue_ms = (double)d->queue_ns / 1e6,
    };
    if (d->ttft_ns) {
        m.prefill_ms = (double)(d->ttft_ns - (d->queue_ns < d->ttft_ns ? d->queue_ns : 0)) / 1e6;
        m.decode_ms = (double)(d->total_ns - d->ttft_ns) / 1e6;
    }
    if (d->finish == ENG_SCHED_FINISH_CANCELLED && d->cancel_reason && d->cancel_reason[0])
        snprintf(m.guard, sizeof(m.guard), "%s", d->cancel_reason);
    if (cm_wire_encode_done(&c->out, req_id, &m) < 0) {
        /* A reason that is not a valid wire name: send the finish without it. */
        m.guard[0] = 0;
        cm_wire_encode_done(&c->out, req_id, &m);
    }
    live_remove(c, req_id);
}

/* ---- Requests ---- */

static struct json_object *
hist_json(const struct eng_sched_hist *h)
{
    struct json_object *o = json_object_new_object();
    struct json_object *b = json_object_new_array();
    uint64_t cum = 0;
    for (int i = 0; i < ENG_SCHED_HIST_BUCKETS; i++) {
        cum += h->counts[i];
        struct json_object *pair = json_object_new_array();
        if (i < ENG_SCHED_HIST_BUCKETS - 1)
            json_object_array_add(pair, json_object_new_double(eng_sched_hist_le_ms[i]));
        else
            json_object_array_add(pair, json_object_new_string("+Inf"));
        json_object_array_add(pair, json_object_new_uint64(cum));
        json_object_array_add(b, pair);
    }
    json_object_object_add(o, "count", json_object_new_uint64(h->n));
    json_object_object_add(o, "sum", json_object_new_double(h->sum_ms));
    json_object_object_add(o, "buckets", b);
    return o;
}

static struct json_object *
stats_json(const struct engine *e)
{
    struct eng_sched_stats s;
    eng_sched_get_stats(e->sched, &s);
    struct json_object *o = json_object_new_object();
#define U64(k, v) json_object_object_add(o, k, json_object_new_uint64(v))
#define I32(k, v) json_object_object_add(o, k, json_object_new_int(v))
    U64("requests_submitted", s.submitted);
    U64("requests_finished", s.finished);
    U64("requests_rejected_full", s.rejected_full + e->rejected_full);
    U64("requests_rejected_invalid", s.rejected_invalid);
    U64("prompt_tokens", s.prompt_tokens);
    U64("generated_tokens", s.generated_tokens);
    U64("prefill_tokens", s.prefill_tokens);
    U64("preemptions", s.preemptions);
    U64("steps", s.steps);
    U64("ticks", s.ticks);
    U64("batch_tokens", s.batch_tokens);
    U64("decode_tokens", s.decode_tokens);
    U64("frames_rejected", e->frames_rejected);
    I32("running", s.running);
    I32("queued", s.queued);
    I32("paused", s.paused);
    I32("kv_blocks_used", s.kv_blocks_used);
    I32("kv_blocks_total", s.kv_blocks_total);
    I32("connections", e->n_conns);
    U64("uptime_s", (cm_now_ns() - e->started_ns) / 1000000000ull);
    U64("spills", s.spills);
    U64("spill_bytes", s.spill_bytes);
    U64("restores", s.restores);
    U64("spill_failures", s.spill_failures);
    U64("restore_failures", s.restore_failures);
    U64("recompute_fallbacks", s.recompute_fallbacks);
    U64("spill_deleted", s.spill_deleted);
    I32("spill_on_disk", s.on_disk);
    U64("spill_disk_bytes", s.disk_bytes);
#undef U64
#undef I32
    struct json_object *fin = json_object_new_object();
    for (int i = 0; i < ENG_SCHED_FINISH_COUNT; i++)
        json_object_object_add(fin, eng_sched_finish_name((enum eng_sched_finish)i),
                               json_object_new_uint64(s.finished_by[i]));
    json_object_object_add(o, "finished_by", fin);
    struct json_object *can = json_object_new_object();
    for (int i = 0; i < s.n_cancel_reasons; i++)
        json_object_object_add(can, s.cancels[i].reason, json_object_new_uint64(s.cancels[i].n));
    if (s.cancels_other)
        json_object_object_add(can, "other", json_object_new_uint64(s.cancels_other));
    json_object_object_add(o, "cancels", can);
    struct json_object *trips = json_object_new_object();
    for (int g = 0; g < GUARD_N; g++)
        json_object_object_add(trips, guard_name((enum guard_id)g),
                               json_object_new_uint64(e->guard_cancels[g] + s.guard_trips[g]));
    json_object_object_add(o, "guard_trips", trips);
    json_object_object_add(o, "spill_ms", hist_json(&s.spill_ms));
    json_object_object_add(o, "restore_ms", hist_json(&s.restore_ms));
    json_object_object_add(o, "ttft_ms", hist_json(&s.ttft));
    json_object_object_add(o, "itl_ms", hist_json(&s.itl));
    return o;
}

static uint64_t
random_seed(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t x = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ cm_now_ns();
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

/* Turns a decoded SUBMIT into a scheduler request. Returns 0, or sends ERROR and returns < 0. */
static int
handle_submit(struct engine *e, struct conn *c, const struct cm_wire_frame *f, uint64_t now)
{
    struct cm_wire_submit sub;
    char err[CM_WIRE_ERR_LEN];
    int rc = cm_wire_decode_submit(f, &sub, err, sizeof(err));
    if (rc < 0) {
        send_error(c, f->req_id, rc == -ENOMEM ? -ENOMEM : rc, 0, err);
        return rc == -ENOMEM ? 0 : -EPROTO; /* a rejected frame closes the connection */
    }
    int32_t *ids = NULL;
    int n_ids = 0;
    struct eng_logit_bias *bias = NULL;
    if (e->stopping) {
        send_error(c, f->req_id, -ESHUTDOWN, 0, "the engine is shutting down");
        goto out;
    }
    if (live_find(c, f->req_id) >= 0) {
        send_error(c, f->req_id, -EINVAL, 0, "req_id is already in use on this connection");
        goto out;
    }
    if (sub.prompt) {
        bool add_bos = sub.add_special && eng_tok_add_bos(e->tok);
        if (eng_tok_encode(e->tok, sub.prompt, sub.prompt_len, add_bos, sub.parse_special, &ids,
                           &n_ids) < 0) {
            send_error(c, f->req_id, -ENOMEM, 0, "out of memory tokenizing the prompt");
            goto out;
        }
    } else {
        ids = cm_xmalloc((size_t)sub.n_prompt_ids * sizeof(*ids));
        memcpy(ids, sub.prompt_ids, (size_t)sub.n_prompt_ids * sizeof(*ids));
        n_ids = (int)sub.n_prompt_ids;
    }
    if (n_ids == 0) {
        send_error(c, f->req_id, -EINVAL, 0, "the prompt is empty");
        goto out;
    }
    struct eng_sched_req req = {
        .prompt = ids,
        .n_prompt = n_ids,
        .max_tokens = (int)sub.max_tokens,
        .logprobs = sub.logprobs,
        .stop_tokens = sub.stop_ids,
        .n_stop = (int)sub.n_stop_ids,
        .priority = sub.priority,
        .owner = c,
        .req_id = f->req_id,
        .token_loop = sub.token_loop,
    };
    eng_sampler_params_default(&req.sampling);
    const struct cm_wire_sampling *ws = &sub.sampling;
    req.sampling.temperature = ws->temperature;
    req.sampling.top_k = ws->top_k;
    req.sampling.top_p = ws->top_p;
    req.sampling.min_p = ws->min_p;
    req.sampling.repetition_penalty = ws->repetition_penalty;
    req.sampling.repeat_last_n = ws->repeat_last_n;
    req.sampling.presence_penalty = ws->presence_penalty;
    req.sampling.frequency_penalty = ws->frequency_penalty;
    req.sampling.seed = ws->has_seed ? ws->seed : random_seed();
    req.sampling.top_logprobs = sub.logprobs ? sub.top_logprobs : 0;
    if (ws->n_logit_bias > 0) {
        bias = cm_xmalloc(ws->n_logit_bias * sizeof(*bias));
        for (uint32_t i = 0; i < ws->n_logit_bias; i++) {
            bias[i].id = ws->logit_bias[i].id;
            bias[i].bias = ws->logit_bias[i].bias;
        }
        req.sampling.logit_bias = bias;
        req.sampling.n_logit_bias = (int)ws->n_logit_bias;
    }
    if (sub.deadline_ms)
        req.deadline_ns = now + (uint64_t)sub.deadline_ms * 1000000ull;
    else if (e->o.request_timeout_s)
        req.deadline_ns = now + (uint64_t)e->o.request_timeout_s * 1000000000ull;

    uint64_t seq_id = 0;
    rc = eng_sched_submit(e->sched, &req, now, &seq_id);
    if (rc == -EAGAIN) {
        send_error(c, f->req_id, -EAGAIN, 1000, "the engine's queue is full");
    } else if (rc == -E2BIG) {
        char msg[160];
        snprintf(msg, sizeof(msg),
                 "the prompt is %d tokens; with max_tokens it must fit the context of %d tokens",
                 n_ids, e->n_ctx);
        send_error(c, f->req_id, -E2BIG, 0, msg);
    } else if (rc < 0) {
        send_error(c, f->req_id, rc == -ENOMEM ? -ENOMEM : -EINVAL, 0,
                   "invalid request parameters (token ids, sampling or stop ids)");
    } else {
        if (c->n_live == c->cap_live) {
            c->cap_live = c->cap_live ? 2 * c->cap_live : 4;
            c->live = cm_xrealloc(c->live, (size_t)c->cap_live * sizeof(*c->live));
        }
        c->live[c->n_live++] =
            (struct live_req){.req_id = f->req_id, .seq_id = seq_id, .logprobs = sub.logprobs};
        if (c->paused)
            eng_sched_pause(e->sched, seq_id, true);
        CM_LOG(CM_LOG_DEBUG, "submit req=%llu seq=%llu prompt_tokens=%d max_tokens=%u",
               (unsigned long long)f->req_id, (unsigned long long)seq_id, n_ids, sub.max_tokens);
    }
out:
    free(bias);
    free(ids);
    cm_wire_submit_fini(&sub);
    return 0;
}

/* Handles one frame. Returns 0, or < 0 to close the connection (after flushing an ERROR). */
static int
handle_frame(struct engine *e, struct conn *c, const struct cm_wire_frame *f, uint64_t now)
{
    char err[CM_WIRE_ERR_LEN];
    if (!c->hello_done && f->type != CM_WIRE_HELLO) {
        send_error(c, f->req_id, -EPROTO, 0, "the first frame must be HELLO");
        return -EPROTO;
    }
    switch (f->type) {
    case CM_WIRE_HELLO: {
        struct cm_wire_hello h;
        if (cm_wire_decode_hello(f, &h, err, sizeof(err)) < 0 || c->hello_done) {
            send_error(c, f->req_id, -EPROTO, 0, c->hello_done ? "HELLO sent twice" : err);
            return -EPROTO;
        }
        if (h.version != CM_WIRE_VERSION) {
            send_error(c, f->req_id, -EPROTO, 0, "unsupported protocol version");
            return -EPROTO;
        }
        c->hello_done = true;
        cm_wire_encode_model_info(&c->out, 0, &e->info);
        return 0;
    }
    case CM_WIRE_SUBMIT:
        return handle_submit(e, c, f, now);
    case CM_WIRE_CANCEL: {
        struct cm_wire_cancel m;
        if (cm_wire_decode_cancel(f, &m, err, sizeof(err)) < 0) {
            send_error(c, f->req_id, -EPROTO, 0, err);
            return -EPROTO;
        }
        enum guard_id g;
        if (guard_from_name(m.reason, &g) == 0)
            e->guard_cancels[g]++;
        int i = live_find(c, f->req_id);
        if (i >= 0)
            eng_sched_cancel(e->sched, c->live[i].seq_id, m.reason);
        return 0;
    }
    case CM_WIRE_STATS: {
        if (cm_wire_decode_stats(f, err, sizeof(err)) < 0) {
            send_error(c, f->req_id, -EPROTO, 0, err);
            return -EPROTO;
        }
        struct json_object *o = stats_json(e);
        cm_wire_encode_stats_reply(&c->out, f->req_id, o);
        json_object_put(o);
        return 0;
    }
    default:
        send_error(c, f->req_id, -EPROTO, 0, "a frame type the engine does not accept");
        return -EPROTO;
    }
}

/* Flushes what can be written now. Returns 0, or < 0 when the peer is gone. */
static int
conn_flush(struct engine *e, struct conn *c, uint64_t now)
{
    if (cm_wire_buf_pending(&c->out) > 0) {
        ssize_t n = cm_wire_buf_write_fd(&c->out, c->fd);
        if (n < 0 && n != -EAGAIN)
            return (int)n;
    }
    conn_update_events(e, c);
    conn_backpressure(e, c, now);
    return 0;
}

/* Reads and handles every complete frame. Returns 0, or < 0 to close. */
static int
conn_read(struct engine *e, struct conn *c, uint64_t now)
{
    for (;;) {
        ssize_t n = cm_wire_reader_read_fd(&c->rd, c->fd);
        if (n == 0)
            return -ECONNRESET;
        if (n < 0 && n != -EAGAIN && n != -ENOBUFS) {
            if (n == -EPROTO || n == -EMSGSIZE) {
                e->frames_rejected++;
                send_error(c, 0, (int)n, 0, n == -EPROTO ? "malformed frame" : "frame too large");
            }
            return (int)n;
        }
        struct cm_wire_frame f;
        int rc;
        while ((rc = cm_wire_reader_next(&c->rd, &f)) == 1) {
            if ((rc = handle_frame(e, c, &f, now)) < 0) {
                e->frames_rejected++;
                return rc;
            }
        }
        if (rc < 0) {
            e->frames_rejected++;
            send_error(c, 0, rc, 0, rc == -EPROTO ? "malformed frame" : "frame too large");
            return rc;
        }
        if (n == -EAGAIN)
            return 0;
    }
}

/* Closes c after a last attempt to deliver its ERROR frame. */
static void
conn_close_after_error(struct engine *e, struct conn *c, const char *why)
{
    if (cm_wire_buf_pending(&c->out) > 0)
        cm_wire_buf_write_fd(&c->out, c->fd);
    conn_free(e, c, why);
}

static void
accept_all(struct engine *e)
{
    for (;;) {
        int fd = accept4(e->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR)
                CM_LOG(CM_LOG_WARN, "accept failed: %s", strerror(errno));
            return;
        }
        struct conn *c = cm_xcalloc(1, sizeof(*c));
        c->fd = fd;
        cm_wire_reader_init(&c->rd, (uint32_t)e->o.max_frame_bytes);
        cm_wire_buf_init(&c->out, (uint32_t)e->o.max_frame_bytes);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
        if (epoll_ctl(e->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            CM_LOG(CM_LOG_WARN, "epoll_ctl failed: %s", strerror(errno));
            cm_wire_reader_fini(&c->rd);
            cm_wire_buf_fini(&c->out);
            close(fd);
            free(c);
            continue;
        }
        c->next = e->conns;
        if (e->conns)
            e->conns->prev = c;
        e->conns = c;
        e->n_conns++;
    }
}

/* ---- Start-up ---- */

/* Binds the socket: a live engine there is an error, a stale socket file is replaced. */
static int
open_listener(const char *path, int *out)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "llm-engine: socket path too long: %s\n", path);
        return -1;
    }
    strcpy(addr.sun_path, path);
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            fprintf(stderr, "llm-engine: %s exists and is not a socket\n", path);
            return -1;
        }
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe >= 0 && connect(probe, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
            close(probe);
            fprintf(stderr, "llm-engine: another engine is listening on %s\n", path);
            return -1;
        }
        if (probe >= 0)
            close(probe);
        if (unlink(path) < 0) {
            fprintf(stderr, "llm-engine: cannot remove the stale socket %s: %s\n", path,
                    strerror(errno));
            return -1;
        }
        CM_LOG(CM_LOG_INFO, "removed a stale socket path=%s", path);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "llm-engine: socket: %s\n", strerror(errno));
        return -1;
    }
    mode_t old = umask(0117); /* the socket is born 0660, never wider */
    int rc = bind(fd, (struct sockaddr *)&addr, sizeof(addr));
    umask(old);
    if (rc < 0 || chmod(path, 0660) < 0 || listen(fd, 128) < 0) {
        fprintf(stderr, "llm-engine: cannot listen on %s: %s\n", path, strerror(errno));
        close(fd);
        return -1;
    }
    *out = fd;
    return 0;
}

static void
fill_special(const struct engine *e, int32_t id, struct cm_wire_special *out)
{
    out->id = id;
    out->text[0] = 0;
    if (id < 0)
        return;
    const char *p = NULL;
    size_t len = eng_tok_piece(e->tok, id, true, &p);
    if (len > CM_WIRE_MAX_SPECIAL_TEXT)
        len = 0; /* not representable: send the id alone */
    memcpy(out->text, p, len);
    out->text[len] = 0;
}

/* The model fingerprint of spill files: the GGUF's metadata (keys, types, scalar and string
 * values, array types and lengths) and tensor table (names, shapes, types, offsets, sizes). */
static uint64_t
model_fingerprint(const struct eng_gguf *g)
{
    uint64_t h = spill_hash64(0, &g->version, sizeof(g->version));
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const struct eng_gguf_kv *kv = &g->kv[i];
        h = spill_hash64(h, kv->key.data, (size_t)kv->key.len);
        h = spill_hash64(h, &kv->type, sizeof(kv->type));
        if (kv->type == ENG_GGUF_STRING)
            h = spill_hash64(h, kv->v.str.data, (size_t)kv->v.str.len);
        else if (kv->type == ENG_GGUF_ARRAY)
            h = spill_hash64(h, &kv->v.arr.n, sizeof(kv->v.arr.n));
        else
            h = spill_hash64(h, &kv->v.u64, sizeof(kv->v.u64));
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const struct eng_gguf_tensor *t = &g->tensors[i];
        h = spill_hash64(h, t->name.data, (size_t)t->name.len);
        h = spill_hash64(h, t->ne, sizeof(t->ne));
        h = spill_hash64(h, &t->type, sizeof(t->type));
        h = spill_hash64(h, &t->offset, sizeof(t->offset));
        h = spill_hash64(h, &t->n_bytes, sizeof(t->n_bytes));
    }
    return h;
}

/* Opens the spill store and hands it to the scheduler (see the top of this file). Returns 0
 * (spill on, or off by choice or after a warning), or -1 after a message. */
static int
spill_setup(struct engine *e)
{
    const struct opts *o = &e->o;
    const struct spill_io_ops *ops = spill_io_posix();
    const char *fault = getenv("LLM_ENGINE_SPILL_FAULT");
    if (o->spill_dir && strcmp(o->spill_dir, "none") == 0)
        return 0;
    if (o->cuda) {
        CM_LOG(CM_LOG_INFO, "spill off: the cuda backend keeps its KV cache on the device");
        return 0;
    }
    if (o->spill_dir) {
        snprintf(e->spill_dir, sizeof(e->spill_dir), "%s", o->spill_dir);
    } else {
        const char *tmp = getenv("TMPDIR");
        snprintf(e->spill_dir, sizeof(e->spill_dir), "%s/llm-engine-spill-%ld",
                 tmp && *tmp ? tmp : "/tmp", (long)getuid());
    }
    if (fault) {
        if (spill_fault_parse(&e->spill_fault, ops, fault) < 0) {
            fprintf(stderr, "llm-engine: bad LLM_ENGINE_SPILL_FAULT '%s'\n", fault);
            return -1;
        }
        ops = &e->spill_fault.ops;
        CM_LOG(CM_LOG_WARN, "spill fault injection on spec=%s", fault);
    }
    const struct eng_hparams *hp = &e->model->hp;
    int rc = spill_store_open(e->spill_dir, (uint64_t)o->spill_max_mb << 20,
                              model_fingerprint(e->gguf), ops, &e->spill);
    if (rc < 0) {
        if (o->spill_dir) {
            fprintf(stderr, "llm-engine: --spill-dir %s: %s\n", e->spill_dir, strerror(-rc));
            return -1;
        }
        CM_LOG(CM_LOG_WARN, "spill off: cannot use dir=%s rc=%d (preempting by recompute)",
               e->spill_dir, rc);
        return 0;
    }
    struct eng_sched_spill sp = {
        .store = e->spill, .n_layer = hp->n_layer, .kv_dim = hp->n_head_kv * hp->head_dim};
    if ((rc = eng_sched_set_spill(e->sched, &sp)) < 0) {
        fprintf(stderr, "llm-engine: cannot enable spill: %s\n", strerror(-rc));
        return -1;
    }
    CM_LOG(CM_LOG_INFO, "spill on dir=%s max_mb=%d stale_removed=%d", e->spill_dir, o->spill_max_mb,
           spill_store_n_stale(e->spill));
    return 0;
}

static int
load(struct engine *e)
{
    char err[ENG_GGUF_ERR_LEN] = "";
    const struct opts *o = &e->o;
    if (eng_gguf_open(o->model, &e->gguf, err, sizeof(err)) < 0 ||
        eng_model_load(e->gguf, &e->model, err, sizeof(err)) < 0 ||
        eng_tok_new(e->gguf, &e->tok, err, sizeof(err)) < 0) {
        fprintf(stderr, "llm-engine: %s: %s\n", o->model, err);
        return -1;
    }
    const struct eng_hparams *hp = &e->model->hp;
    e->n_ctx = o->n_ctx ? o->n_ctx : hp->n_ctx_train;
    int kv_dim = hp->n_head_kv * hp->head_dim;
    int n_blocks = eng_kv_blocks_for_mb(hp->n_layer, kv_dim, (size_t)o->kv_cache_mb);
    int rc;
    if ((rc = kern_pool_new(o->n_threads, &e->pool)) < 0 ||
        (!o->cuda &&
         (rc = eng_fwd_new(e->model, e->pool, o->sched.max_batch_tokens, e->n_ctx, &e->fwd)) < 0) ||
        (o->cuda && (rc = eng_cuda_fwd_new(e->model, o->sched.max_batch_tokens, e->n_ctx, n_blocks,
                                           &e->cfwd)) < 0) ||
        (rc = eng_kv_pool_new(hp->n_layer, kv_dim, n_blocks, &e->kv)) < 0) {
        fprintf(stderr, "llm-engine: cannot allocate the engine: %s\n", strerror(-rc));
        return -1;
    }
    struct eng_sched_model sm = {.ctx = e,
                                 .n_vocab = hp->n_vocab,
                                 .n_ctx = e->n_ctx,
                                 .forward = model_forward,
                                 .is_eog = model_is_eog,
                                 .now = model_now};
    struct eng_sched_events ev = {
        .ctx = e, .on_accepted = on_accepted, .on_token = on_token, .on_done = on_done};
    if ((rc = eng_sched_new(&o->sched, &sm, e->kv, &ev, &e->sched)) < 0) {
        fprintf(stderr, "llm-engine: invalid scheduler settings: %s\n", strerror(-rc));
        return -1;
    }
    if (spill_setup(e) < 0)
        return -1;

    cm_wire_model_info_init(&e->info);
    snprintf(e->info.model, sizeof(e->info.model), "%s",
             o->model_name ? o->model_name : e->model->name);
    e->info.n_ctx = (uint32_t)e->n_ctx;
    e->info.n_vocab = (uint32_t)hp->n_vocab;
    e->info.max_payload = (uint32_t)o->max_frame_bytes;
    e->info.caps = CM_WIRE_CAP_LOGPROBS | CM_WIRE_CAP_PROMPT_IDS | CM_WIRE_CAP_LOGIT_BIAS;
    struct eng_gguf_str tmpl;
    if (eng_gguf_get_str(e->gguf, "tokenizer.chat_template", &tmpl) == 0) {
        e->info.chat_family = cm_chat_detect(tmpl.data, (size_t)tmpl.len);
        if (cm_chat_default_system(tmpl.data, (size_t)tmpl.len, &e->default_system) == 0 &&
            e->default_system && strlen(e->default_system) <= CM_WIRE_MAX_SYSTEM)
            e->info.default_system = e->default_system;
    }
    fill_special(e, eng_tok_bos(e->tok), &e->info.bos);
    fill_special(e, eng_tok_eos(e->tok), &e->info.eos);
    int32_t eot = eng_tok_find(e->tok, "<|eot_id|>");
    if (eot < 0)
        eot = eng_tok_find(e->tok, "<|im_end|>");
    fill_special(e, eot, &e->info.eot);
    if (cm_wire_model_info_validate(&e->info, err, sizeof(err)) < 0) {
        fprintf(stderr, "llm-engine: cannot describe the model to workers: %s\n", err);
        return -1;
    }
    CM_LOG(CM_LOG_INFO,
           "model loaded name=\"%s\" n_ctx=%d kv_blocks=%d kv_mb=%d threads=%d isa=%s "
           "max_seqs=%d max_batch_tokens=%d",
           e->info.model, e->n_ctx, n_blocks, o->kv_cache_mb, o->n_threads,
           kern_isa_name(kern_cpu_isa()), o->sched.max_seqs, o->sched.max_batch_tokens);
    return 0;
}

/* Frees whatever load() got to; connections exist only once the scheduler does. */
static void
unload(struct engine *e)
{
    while (e->conns)
        conn_free(e, e->conns, "exit");
    eng_sched_free(e->sched);
    spill_store_close(e->spill);
    eng_kv_pool_free(e->kv);
    eng_fwd_free(e->fwd);
    eng_cuda_fwd_free(e->cfwd);
    kern_pool_free(e->pool);
    eng_tok_free(e->tok);
    eng_model_free(e->model);
    eng_gguf_close(e->gguf);
    free(e->default_system);
}

/* ---- The loop ---- */

static void
begin_shutdown(struct engine *e, uint64_t now)
{
    if (e->stopping)
        return;
    e->stopping = true;
    e->stop_deadline = now + (uint64_t)e->o.grace_s * 1000000000ull;
    epoll_ctl(e->ep, EPOLL_CTL_DEL, e->listen_fd, NULL);
    close(e->listen_fd);
    e->listen_fd = -1;
    unlink(e->o.socket_path);
    CM_LOG(CM_LOG_INFO, "shutting down grace_s=%d", e->o.grace_s);
}

/* Cancels sequences whose connection has been paused past the stall limit. */
static void
check_stalls(struct engine *e, uint64_t now)
{
    uint64_t limit = (uint64_t)e->o.max_stall_ms * 1000000ull;
    for (struct conn *c = e->conns; c; c = c->next) {
        if (!c->paused || now - c->paused_since < limit)
            continue;
        for (int i = 0; i < c->n_live; i++)
            eng_sched_cancel(e->sched, c->live[i].seq_id, "slow_reader");
    }
}

/* epoll timeout: 0 when the scheduler has work, else until the next deadline (bounded). */
static int
loop_timeout_ms(const struct engine *e, uint64_t now)
{
    if (eng_sched_has_work(e->sched))
        return 0;
    uint64_t wake = now + 1000000000ull; /* at most 1 s: stall checks and deadlines */
    uint64_t d = eng_sched_next_deadline(e->sched);
    if (d && d < wake)
        wake = d;
    if (e->stopping && e->stop_deadline < wake)
        wake = e->stop_deadline;
    for (const struct conn *c = e->conns; c; c = c->next) {
        if (c->paused) {
            uint64_t t = c->paused_since + (uint64_t)e->o.max_stall_ms * 1000000ull;
            if (t < wake)
                wake = t;
        }
    }
    return wake <= now ? 0 : (int)((wake - now + 999999) / 1000000);
}

/* Shutdown is complete when no sequence is left and every connection has taken its output, or,
 * once the grace period is over, when no sequence is left: output a stuck reader never takes is
 * dropped rather than holding the process. */
static bool
all_done(const struct engine *e, uint64_t now)
{
    struct eng_sched_stats s;
    eng_sched_get_stats(e->sched, &s);
    if (s.running || s.queued)
        return false;
    if (now >= e->stop_deadline)
        return true;
    for (const struct conn *c = e->conns; c; c = c->next) {
        if (cm_wire_buf_pending(&c->out) > 0)
            return false;
    }
    return true;
}

static int
run_loop(struct engine *e)
{
    struct epoll_event evs[64];
    for (;;) {
        uint64_t now = cm_now_ns();
        if (e->stopping && all_done(e, now))
            return 0;
        int n = epoll_wait(e->ep, evs, 64, loop_timeout_ms(e, now));
        if (n < 0 && errno != EINTR) {
            CM_LOG(CM_LOG_ERROR, "epoll_wait failed: %s", strerror(errno));
            return -1;
        }
        now = cm_now_ns();
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p == &e->listen_fd) {
                accept_all(e);
            } else if (p == &e->sig_fd) {
                struct signalfd_siginfo si;
                while (read(e->sig_fd, &si, sizeof(si)) == (ssize_t)sizeof(si))
                    CM_LOG(CM_LOG_INFO, "signal %u received", si.ssi_signo);
                begin_shutdown(e, now);
            } else {
                struct conn *c = p;
                int rc = 0;
                if (evs[i].events & EPOLLOUT)
                    rc = conn_flush(e, c, now);
                if (rc == 0 && (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
                    rc = conn_read(e, c, now);
                if (rc < 0)
                    conn_close_after_error(e, c, strerror(-rc));
            }
        }
        if (e->stopping && !e->cancelled_rest && now >= e->stop_deadline) {
            e->cancelled_rest = true;
            int k = eng_sched_cancel_all(e->sched, CM_WIRE_CANCEL_SHUTDOWN);
            CM_LOG(CM_LOG_INFO, "grace period over cancelled=%d", k);
        }
        check_stalls(e, now);
        eng_sched_step(e->sched, now);
        for (struct conn *c = e->conns, *next; c; c = next) {
            next = c->next;
            if (conn_flush(e, c, now) < 0)
                conn_free(e, c, "write failed");
        }
    }
}

int
main(int argc, char **argv)
{
    static struct engine eng;
    struct engine *e = &eng;
    int prc = parse_args(argc, argv, &e->o);
    if (prc != 0)
        return prc > 0 ? 0 : 2;
    char cuda_msg[256];
    if (e->o.cuda && eng_cuda_available(cuda_msg, sizeof(cuda_msg)) < 0) {
        fprintf(stderr, "llm-engine: --backend cuda: %s\n", cuda_msg);
        return 2;
    }
    cm_log_set_level(e->o.log_level);
    e->started_ns = cm_now_ns();
    e->out_bound = (size_t)e->o.out_buffer_kb << 10;
    e->listen_fd = e->sig_fd = e->ep = -1;
    int ret = 1;

    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    /* Blocked before the compute pool starts, so its threads inherit the mask. */
    pthread_sigmask(SIG_BLOCK, &mask, NULL);

    if (load(e) < 0)
        goto out;
    if (open_listener(e->o.socket_path, &e->listen_fd) < 0)
        goto out;
    e->sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    e->ep = epoll_create1(EPOLL_CLOEXEC);
    if (e->sig_fd < 0 || e->ep < 0) {
        fprintf(stderr, "llm-engine: cannot set up the event loop: %s\n", strerror(errno));
        goto out;
    }
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &e->listen_fd};
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &e->sig_fd};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, e->listen_fd, &lev) < 0 ||
        epoll_ctl(e->ep, EPOLL_CTL_ADD, e->sig_fd, &sev) < 0) {
        fprintf(stderr, "llm-engine: epoll_ctl: %s\n", strerror(errno));
        goto out;
    }
    CM_LOG(CM_LOG_INFO, "ready socket=%s", e->o.socket_path);
    if (run_loop(e) == 0)
        ret = 0;
    CM_LOG(CM_LOG_INFO, "stopped");
out:
    if (e->listen_fd >= 0) {
        close(e->listen_fd);
        unlink(e->o.socket_path);
    }
    if (e->sig_fd >= 0)
        close(e->sig_fd);
    unload(e);
    if (e->ep >= 0)
        close(e->ep);
    return ret;
}

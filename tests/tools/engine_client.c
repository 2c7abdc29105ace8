/*
 * engine_client: talks the llm-engine wire protocol (common/cm_wire.h) without HTTP, for the
 * integration tests and as a load generator for the benchmarks.
 *
 *   engine_client --socket PATH [--prompt TEXT | --prompt-ids 1,2,3]... [options]
 *
 * Each request runs on its own connection: connect, HELLO, wait for MODEL_INFO, SUBMIT (req_id =
 * request number, from 1), then read ACCEPTED, TOKEN... and DONE (or one ERROR). Request i uses
 * prompt i mod the number of prompts given (--prompt and --prompt-ids may be repeated and mixed).
 * --concurrency C keeps up to C requests open at once, all driven by one poll(2) loop; --requests R
 * (default: one per prompt) sets how many run in all. With --stats, after the requests, one more
 * connection sends STATS and prints the STATS_REPLY object.
 *
 * Output (stdout), one block per request in the order they end:
 *   default  "req N finish=F guard=G prompt_tokens=P completion_tokens=C" (or "req N error=CODE
 *            message"), then "ids: 1 2 3" and "text: ..." lines
 *   --json   one JSON object per line: {"req", "ids", "text", "finish", "guard", "usage",
 *            "timings", "accepted", "error", "ttft_ms", "disconnected"}; "text" is the bytes of
 *            the tokens with invalid UTF-8 replaced by U+FFFD; "error" is null or {"code",
 *            "message", "retry_after_ms"} (an engine ERROR) or {"code": "CLIENT", "message"} (a
 *            failure seen here: connect, end of file before DONE, a bad frame, a timeout)
 *   --stats  the STATS_REPLY object on one line (with --json: {"stats": {...}})
 * stderr gets one summary line: "summary: requests=R ok=N errors=E completion_tokens=T wall_s=X
 * tok_s=Y ttft_ms_p50=A ttft_ms_max=B" (tok_s: completion tokens of all requests over the wall
 * time from the first connect to the last end: the aggregate decode rate for the bench).
 *
 * Exit status: 0 when every request ended as asked (DONE, or the requested disconnect), 1 when any
 * got an ERROR or failed, 2 for bad usage.
 */
#include <errno.h>
#include <getopt.h>
#include <json-c/json.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <fcntl.h>

#include "common/cm_util.h"
#include "common/cm_wire.h"

#define CLIENT_NAME "engine_client/0.1"
#define MAX_PROMPTS 256

/* ---- Options ---- */

struct prompt {
    const char *text; /* NULL for ids */
    int32_t *ids;     /* (n_ids) */
    uint32_t n_ids;
};

struct opts {
    const char *socket;
    struct prompt prompts[MAX_PROMPTS];
    int n_prompts;
    int max_tokens;
    float temperature;
    bool has_seed;
    uint64_t seed;
    int concurrency;
    int requests;     /* -1: one per prompt */
    int cancel_after; /* -1: off; K: CANCEL after K tokens (0: right after SUBMIT) */
    const char *cancel_reason;
    int disconnect_after; /* -1: off; K: close after K tokens (0: right after SUBMIT) */
    bool no_read;
    int hold_ms; /* --no-read: how long to hold before draining (0: until the engine hangs up) */
    bool ignore_eos;
    bool special;
    bool stats;
    bool json;
    bool quiet;
    int timeout_ms;
    uint32_t max_payload;
};

static void
usage(FILE *f)
{
    fprintf(
        f,
        "usage: engine_client --socket PATH [--prompt TEXT | --prompt-ids 1,2,3]... "
        "[options]\n"
        "\n"
        "Sends requests to llm-engine over its wire protocol, each on its own connection.\n"
        "\n"
        "  -s, --socket PATH        the engine's Unix socket\n"
        "  -p, --prompt TEXT        a prompt (repeatable: request i uses prompt i mod count)\n"
        "      --prompt-ids LIST    a prompt as comma-separated token ids (repeatable)\n"
        "  -n, --max-tokens N       tokens to generate per request (default 16)\n"
        "      --temp T             temperature (default 0: greedy)\n"
        "      --seed S             sampler seed (default: the engine picks)\n"
        "  -c, --concurrency C      requests open at once (default 1)\n"
        "  -r, --requests R         requests in all (default: one per prompt)\n"
        "      --cancel-after K     send CANCEL after K tokens (0: right after SUBMIT)\n"
        "      --cancel-reason NAME the CANCEL reason (default client_cancel)\n"
        "      --disconnect-after K close the connection after K tokens (0: after SUBMIT)\n"
        "      --no-read            after SUBMIT read nothing until the engine hangs up or\n"
        "                           --hold-ms passes, then read what is there\n"
        "      --hold-ms MS         bound for --no-read (default 0: until hang-up)\n"
        "      --ignore-eos         logit_bias -100 on the model's EOS/EOT tokens (fixed-length\n"
        "                           generations for load tests)\n"
        "      --special            parse special-token text (<|im_start|>) in prompts\n"
        "      --stats              print the engine's STATS_REPLY after the requests\n"
        "      --json               one JSON line per request (and for --stats)\n"
        "  -q, --quiet              no per-request output (load mode: summary only)\n"
        "      --timeout-ms MS      give up on requests still open after MS (default 600000)\n"
        "      --max-frame-bytes N  largest frame payload accepted (default 1 MiB)\n"
        "  -h, --help               this text\n"
        "\n"
        "stderr gets a summary line with the aggregate generation rate (tok_s).\n"
        "Exit status: 0 all requests ended as asked, 1 an ERROR or failure, 2 bad usage.\n");
}

static int
parse_int(const char *s, const char *what, long lo, long hi, int *out)
{
    return cm_parse_int_arg("engine_client", what, s, lo, hi, out);
}

static int
parse_ids(const char *s, struct prompt *p)
{
    size_t cap = 16;
    uint32_t n = 0;
    int32_t *ids = cm_xmalloc(cap * sizeof(*ids));
    const char *q = s;
    int rc = -EINVAL;
    while (*q) {
        char *end = NULL;
        errno = 0;
        long v = strtol(q, &end, 10);
        if (errno || end == q || v < 0 || v >= CM_WIRE_MAX_VOCAB || (*end && *end != ','))
            goto out;
        if (n == cap) {
            cap *= 2;
            ids = cm_xrealloc(ids, cap * sizeof(*ids));
        }
        ids[n++] = (int32_t)v;
        q = *end ? end + 1 : end;
        if (*end && !*q)
            goto out; /* trailing comma */
    }
    if (n == 0)
        goto out;
    p->ids = ids;
    p->n_ids = n;
    ids = NULL;
    rc = 0;
out:
    free(ids);
    if (rc < 0)
        fprintf(stderr, "engine_client: --prompt-ids must be comma-separated ids, got '%s'\n", s);
    return rc;
}

enum {
    OPT_PROMPT_IDS = 1000,
    OPT_TEMP,
    OPT_SEED,
    OPT_CANCEL_AFTER,
    OPT_CANCEL_REASON,
    OPT_DISCONNECT_AFTER,
    OPT_NO_READ,
    OPT_HOLD_MS,
    OPT_IGNORE_EOS,
    OPT_SPECIAL,
    OPT_STATS,
    OPT_JSON,
    OPT_TIMEOUT_MS,
    OPT_MAX_FRAME,
};

static int
add_prompt(struct opts *o, const char *text, const char *ids)
{
    if (o->n_prompts == MAX_PROMPTS) {
        fprintf(stderr, "engine_client: at most %d prompts\n", MAX_PROMPTS);
        return -EINVAL;
    }
    struct prompt *p = &o->prompts[o->n_prompts];
    if (ids) {
        int rc = parse_ids(ids, p);
        if (rc < 0)
            return rc;
    } else {
        p->text = text;
    }
    o->n_prompts++;
    return 0;
}

static int
parse_opt(struct opts *o, int c, const char *arg)
{
    long v = 0;
    int rc = 0;
    char *end = NULL;
    switch (c) {
    case 's':
        o->socket = arg;
        break;
    case 'p':
        rc = add_prompt(o, arg, NULL);
        break;
    case OPT_PROMPT_IDS:
        rc = add_prompt(o, NULL, arg);
        break;
    case 'n':
        rc = parse_int(arg, "-n", 1, CM_WIRE_MAX_VOCAB, &o->max_tokens);
        break;
    case OPT_TEMP:
        errno = 0;
        o->temperature = strtof(arg, &end);
        if (errno || end == arg || *end || !isfinite(o->temperature) || o->temperature < 0) {
            fprintf(stderr, "engine_client: --temp must be a number >= 0, got '%s'\n", arg);
            rc = -EINVAL;
        }
        break;
    case OPT_SEED:
        rc = cm_parse_long_arg("engine_client", "--seed", arg, 0, LONG_MAX, &v);
        o->seed = (uint64_t)v;
        o->has_seed = true;
        break;
    case 'c':
        rc = parse_int(arg, "--concurrency", 1, 4096, &o->concurrency);
        break;
    case 'r':
        rc = parse_int(arg, "--requests", 0, 1 << 24, &o->requests);
        break;
    case OPT_CANCEL_AFTER:
        rc = parse_int(arg, "--cancel-after", 0, INT_MAX, &o->cancel_after);
        break;
    case OPT_CANCEL_REASON:
        o->cancel_reason = arg;
        break;
    case OPT_DISCONNECT_AFTER:
        rc = parse_int(arg, "--disconnect-after", 0, INT_MAX, &o->disconnect_after);
        break;
    case OPT_NO_READ:
        o->no_read = true;
        break;
    case OPT_HOLD_MS:
        rc = parse_int(arg, "--hold-ms", 0, INT_MAX, &o->hold_ms);
        break;
    case OPT_IGNORE_EOS:
        o->ignore_eos = true;
        break;
    case OPT_SPECIAL:
        o->special = true;
        break;
    case OPT_STATS:
        o->stats = true;
        break;
    case OPT_JSON:
        o->json = true;
        break;
    case 'q':
        o->quiet = true;
        break;
    case OPT_TIMEOUT_MS:
        rc = parse_int(arg, "--timeout-ms", 1, INT_MAX, &o->timeout_ms);
        break;
    case OPT_MAX_FRAME:
        rc = cm_parse_long_arg("engine_client", "--max-frame-bytes", arg, CM_WIRE_MIN_MAX_PAYLOAD,
                               CM_WIRE_MAX_MAX_PAYLOAD, &v);
        o->max_payload = (uint32_t)v;
        break;
    default:
        rc = -EINVAL;
        break;
    }
    return rc;
}

/* Returns 0 to run, 1 when --help was printed, -EINVAL on bad usage (message printed). */
static int
parse_args(int argc, char **argv, struct opts *o)
{
    static const struct option longopts[] = {
        {"socket", required_argument, 0, 's'},
        {"prompt", required_argument, 0, 'p'},
        {"prompt-ids", required_argument, 0, OPT_PROMPT_IDS},
        {"max-tokens", required_argument, 0, 'n'},
        {"temp", required_argument, 0, OPT_TEMP},
        {"seed", required_argument, 0, OPT_SEED},
        {"concurrency", required_argument, 0, 'c'},
        {"requests", required_argument, 0, 'r'},
        {"cancel-after", required_argument, 0, OPT_CANCEL_AFTER},
        {"cancel-reason", required_argument, 0, OPT_CANCEL_REASON},
        {"disconnect-after", required_argument, 0, OPT_DISCONNECT_AFTER},
        {"no-read", no_argument, 0, OPT_NO_READ},
        {"hold-ms", required_argument, 0, OPT_HOLD_MS},
        {"ignore-eos", no_argument, 0, OPT_IGNORE_EOS},
        {"special", no_argument, 0, OPT_SPECIAL},
        {"stats", no_argument, 0, OPT_STATS},
        {"json", no_argument, 0, OPT_JSON},
        {"quiet", no_argument, 0, 'q'},
        {"timeout-ms", required_argument, 0, OPT_TIMEOUT_MS},
        {"max-frame-bytes", required_argument, 0, OPT_MAX_FRAME},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    o->max_tokens = 16;
    o->concurrency = 1;
    o->requests = -1;
    o->cancel_after = -1;
    o->disconnect_after = -1;
    o->cancel_reason = "client_cancel";
    o->timeout_ms = 600000;
    int c;
    while ((c = getopt_long(argc, argv, "s:p:n:c:r:qh", longopts, NULL)) != -1) {
        if (c == 'h') {
            usage(stdout);
            return 1;
        }
        if (c == '?' || parse_opt(o, c, optarg) < 0)
            goto bad;
    }
    if (optind < argc) {
        fprintf(stderr, "engine_client: unexpected argument '%s'\n", argv[optind]);
        goto bad;
    }
    if (!o->socket) {
        fprintf(stderr, "engine_client: --socket is required\n");
        goto bad;
    }
    if (o->requests < 0)
        o->requests = o->n_prompts;
    if (o->requests > 0 && o->n_prompts == 0) {
        fprintf(stderr, "engine_client: --requests needs a --prompt or --prompt-ids\n");
        goto bad;
    }
    if (o->cancel_after >= 0 && o->disconnect_after >= 0) {
        fprintf(stderr, "engine_client: --cancel-after and --disconnect-after exclude each "
                        "other\n");
        goto bad;
    }
    size_t n = strlen(o->cancel_reason);
    if (n == 0 || n > CM_WIRE_MAX_NAME ||
        strspn(o->cancel_reason, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                 "0123456789_.:-") != n) {
        fprintf(stderr, "engine_client: --cancel-reason must be 1..%d bytes of [A-Za-z0-9_.:-]\n",
                CM_WIRE_MAX_NAME);
        goto bad;
    }
    return 0;
bad:
    usage(stderr);
    return -EINVAL;
}

/* ---- Requests ---- */

enum req_state {
    REQ_HELLO = 0, /* HELLO sent, waiting for MODEL_INFO */
    REQ_RUNNING,   /* SUBMIT sent, reading until DONE or ERROR */
    REQ_HOLD,      /* --no-read: reading nothing for now */
    REQ_ENDED,
};

struct req {
    int index;       /* 0-based request number */
    uint64_t req_id; /* index + 1 */
    int fd;
    enum req_state state;
    struct cm_wire_reader rd;
    struct cm_wire_buf out;
    int32_t *ids; /* (n_ids) generated tokens */
    size_t n_ids, cap_ids;
    char *text; /* (text_len) their bytes */
    size_t text_len, text_cap;
    bool accepted, have_done, have_error;
    struct cm_wire_accepted acc;
    struct cm_wire_done done;
    struct cm_wire_error error;
    char fail[CM_WIRE_ERR_LEN + 64]; /* a failure seen by the client; "" when none */
    bool cancel_sent, disconnected;
    bool close_when_written; /* --disconnect-after 0 */
    bool hold_when_written;  /* --no-read */
    uint64_t t_start_ns, t_first_ns, t_end_ns, hold_until_ns;
};

struct client {
    const struct opts *o;
    struct req *reqs; /* (o->requests) */
    int n_started, n_active, n_ok, n_bad;
    uint64_t t0_ns, t_last_ns;
    uint64_t completion_tokens;
};

static void req_failf(struct req *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Records the first failure of a request. */
static void
req_failf(struct req *r, const char *fmt, ...)
{
    if (r->fail[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->fail, sizeof(r->fail), fmt, ap);
    va_end(ap);
}

static void
req_add_token(struct req *r, const struct cm_wire_token *t)
{
    if (r->n_ids == r->cap_ids) {
        r->cap_ids = r->cap_ids ? 2 * r->cap_ids : 64;
        r->ids = cm_xrealloc(r->ids, r->cap_ids * sizeof(*r->ids));
    }
    r->ids[r->n_ids++] = t->id;
    if (r->text_len + t->text_len + 1 > r->text_cap) {
        while (r->text_len + t->text_len + 1 > r->text_cap)
            r->text_cap = r->text_cap ? 2 * r->text_cap : 1024;
        r->text = cm_xrealloc(r->text, r->text_cap);
    }
    memcpy(r->text + r->text_len, t->text, t->text_len);
    r->text_len += t->text_len;
    r->text[r->text_len] = '\0';
}

static int
req_connect(const char *path, char *err, size_t err_len)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(sa.sun_path)) {
        snprintf(err, err_len, "socket path too long");
        return -ENAMETOOLONG;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int e = errno;
        snprintf(err, err_len, "socket: %s", strerror(e));
        return -e;
    }
    int rc = 0;
    do {
        rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    } while (rc < 0 && errno == EINTR);
    if (rc < 0 || fcntl(fd, F_SETFL, O_NONBLOCK) < 0) {
        rc = -errno;
        snprintf(err, err_len, "connect %s: %s", path, strerror(-rc));
        close(fd);
        return rc;
    }
    return fd;
}

/* Queues SUBMIT (and a CANCEL at once for --cancel-after 0). */
static int
req_submit(const struct opts *o, struct req *r, const struct cm_wire_model_info *mi)
{
    const struct prompt *p = &o->prompts[r->index % o->n_prompts];
    struct cm_wire_submit s;
    struct cm_wire_logit_bias lb[3];
    char err[CM_WIRE_ERR_LEN];
    cm_wire_submit_init(&s);
    if (p->text) {
        s.prompt = (char *)p->text; /* borrowed by the encoder, not modified */
        s.prompt_len = strlen(p->text);
    } else {
        s.prompt_ids = p->ids;
        s.n_prompt_ids = p->n_ids;
    }
    s.parse_special = o->special;
    s.max_tokens = (uint32_t)o->max_tokens;
    s.sampling.temperature = o->temperature;
    s.sampling.has_seed = o->has_seed;
    s.sampling.seed = o->seed;
    if (o->ignore_eos) {
        uint32_t n = 0;
        const struct cm_wire_special *sp[2] = {&mi->eos, &mi->eot};
        for (int i = 0; i < 2; i++) {
            bool dup = false;
            for (uint32_t j = 0; j < n; j++)
                dup |= lb[j].id == sp[i]->id;
            if (sp[i]->id >= 0 && !dup)
                lb[n++] = (struct cm_wire_logit_bias){.id = sp[i]->id, .bias = -100.0f};
        }
        s.sampling.logit_bias = lb;
        s.sampling.n_logit_bias = n;
    }
    int rc = cm_wire_submit_validate(&s, err, sizeof(err));
    if (rc == 0)
        rc = cm_wire_encode_submit(&r->out, r->req_id, &s);
    if (rc < 0) {
        req_failf(r, "cannot encode SUBMIT: %s", rc == -EMSGSIZE ? "too large" : err);
        return rc;
    }
    r->state = REQ_RUNNING;
    r->t_start_ns = cm_now_ns();
    if (o->cancel_after == 0) {
        struct cm_wire_cancel c;
        snprintf(c.reason, sizeof(c.reason), "%s", o->cancel_reason);
        rc = cm_wire_encode_cancel(&r->out, r->req_id, &c);
        r->cancel_sent = rc == 0;
    }
    r->close_when_written = o->disconnect_after == 0;
    r->hold_when_written = o->no_read;
    return rc;
}

static void
req_on_token(const struct opts *o, struct req *r, const struct cm_wire_frame *f)
{
    struct cm_wire_token t;
    char err[CM_WIRE_ERR_LEN];
    if (cm_wire_decode_token(f, &t, err, sizeof(err)) < 0) {
        req_failf(r, "bad TOKEN: %s", err);
        return;
    }
    if (r->n_ids == 0)
        r->t_first_ns = cm_now_ns();
    req_add_token(r, &t);
    if (o->cancel_after > 0 && r->n_ids == (size_t)o->cancel_after && !r->cancel_sent) {
        struct cm_wire_cancel c;
        snprintf(c.reason, sizeof(c.reason), "%s", o->cancel_reason);
        if (cm_wire_encode_cancel(&r->out, r->req_id, &c) == 0)
            r->cancel_sent = true;
    }
    if (o->disconnect_after > 0 && r->n_ids == (size_t)o->disconnect_after)
        r->disconnected = true; /* the caller closes */
}

/* Handles one frame; the request may end (r->state REQ_ENDED is set by the caller on have_done,
 * have_error, disconnected or fail). */
static void
req_on_frame(const struct opts *o, struct req *r, const struct cm_wire_frame *f)
{
    char err[CM_WIRE_ERR_LEN];
    err[0] = '\0';
    if (f->type == CM_WIRE_ERROR) {
        if (cm_wire_decode_error(f, &r->error, err, sizeof(err)) < 0)
            req_failf(r, "bad ERROR: %s", err);
        else
            r->have_error = true;
        return;
    }
    if (r->state == REQ_HELLO) {
        struct cm_wire_model_info mi;
        cm_wire_model_info_init(&mi);
        if (f->type != CM_WIRE_MODEL_INFO || f->req_id != 0)
            req_failf(r, "expected MODEL_INFO, got %s", cm_wire_type_name(f->type));
        else if (cm_wire_decode_model_info(f, &mi, err, sizeof(err)) < 0)
            req_failf(r, "bad MODEL_INFO: %s", err);
        else
            req_submit(o, r, &mi);
        cm_wire_model_info_fini(&mi);
        return;
    }
    if (f->req_id != r->req_id) {
        req_failf(r, "%s for another request id", cm_wire_type_name(f->type));
        return;
    }
    switch (f->type) {
    case CM_WIRE_ACCEPTED:
        if (r->accepted || r->n_ids > 0)
            req_failf(r, "ACCEPTED twice or after a TOKEN");
        else if (cm_wire_decode_accepted(f, &r->acc, err, sizeof(err)) < 0)
            req_failf(r, "bad ACCEPTED: %s", err);
        else
            r->accepted = true;
        break;
    case CM_WIRE_TOKEN:
        req_on_token(o, r, f);
        break;
    case CM_WIRE_DONE:
        if (cm_wire_decode_done(f, &r->done, err, sizeof(err)) < 0)
            req_failf(r, "bad DONE: %s", err);
        else
            r->have_done = true;
        break;
    default:
        req_failf(r, "unexpected %s frame", cm_wire_type_name(f->type));
        break;
    }
}

static bool
req_finished(const struct req *r)
{
    return r->have_done || r->have_error || r->disconnected || r->fail[0];
}

/* Reads what is available and handles whole frames. Returns when the request finished, the
 * socket would block, or at end of file. */
static void
req_read(const struct opts *o, struct req *r)
{
    for (;;) {
        ssize_t n = cm_wire_reader_read_fd(&r->rd, r->fd);
        if (n == -EAGAIN)
            return;
        if (n < 0 && n != -ENOBUFS && n != -ECONNRESET) {
            req_failf(r, "read: %s",
                      n == -EPROTO || n == -EMSGSIZE ? "bad frame header" : strerror((int)-n));
            return;
        }
        struct cm_wire_frame f;
        int rc = 0;
        while (!req_finished(r) && (rc = cm_wire_reader_next(&r->rd, &f)) == 1)
            req_on_frame(o, r, &f);
        if (req_finished(r))
            return;
        if (rc < 0) {
            req_failf(r, "bad frame from the engine: %s", cm_wire_errno_name(rc));
            return;
        }
        if (n == 0 || n == -ECONNRESET) {
            req_failf(r, "the engine closed the connection before DONE");
            return;
        }
    }
}

/* ---- Output ---- */

/* Returns a malloc'ed NUL-terminated copy of s[0..n) with each invalid UTF-8 sequence replaced
 * by U+FFFD. */
static char *
utf8_sanitize(const char *s, size_t n, size_t *len_out)
{
    char *out = cm_xmalloc(3 * n + 1);
    size_t o = 0;
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = p[i];
        size_t k = c < 0x80                  ? 1
                   : (c >= 0xc2 && c < 0xe0) ? 2
                   : (c >= 0xe0 && c < 0xf0) ? 3
                   : (c >= 0xf0 && c < 0xf5) ? 4
                                             : 0;
        bool ok = k > 0 && i + k <= n;
        for (size_t j = 1; ok && j < k; j++)
            ok = (p[i + j] & 0xc0) == 0x80;
        if (ok && k == 3)
            ok = !(c == 0xe0 && p[i + 1] < 0xa0) && !(c == 0xed && p[i + 1] >= 0xa0);
        if (ok && k == 4)
            ok = !(c == 0xf0 && p[i + 1] < 0x90) && !(c == 0xf4 && p[i + 1] >= 0x90);
        if (ok) {
            memcpy(out + o, p + i, k);
            o += k;
            i += k;
        } else {
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        }
    }
    out[o] = '\0';
    *len_out = o;
    return out;
}

static struct json_object *
usage_json(const struct cm_wire_done *d)
{
    struct json_object *u = json_object_new_object();
    json_object_object_add(u, "prompt_tokens", json_object_new_int64(d->prompt_tokens));
    json_object_object_add(u, "completion_tokens", json_object_new_int64(d->completion_tokens));
    json_object_object_add(u, "cached_tokens", json_object_new_int64(d->cached_tokens));
    return u;
}

static struct json_object *
error_json(const struct req *r)
{
    struct json_object *e = json_object_new_object();
    if (r->have_error) {
        const char *code = cm_wire_errno_name(r->error.code);
        json_object_object_add(e, "code", json_object_new_string(code ? code : "?"));
        json_object_object_add(e, "message", json_object_new_string(r->error.message));
        json_object_object_add(e, "retry_after_ms", json_object_new_int64(r->error.retry_after_ms));
    } else {
        json_object_object_add(e, "code", json_object_new_string("CLIENT"));
        json_object_object_add(e, "message", json_object_new_string(r->fail));
    }
    return e;
}

static void
print_json(const struct req *r)
{
    struct json_object *o = json_object_new_object();
    struct json_object *ids = json_object_new_array_ext((int)r->n_ids);
    for (size_t i = 0; i < r->n_ids; i++)
        json_object_array_add(ids, json_object_new_int(r->ids[i]));
    size_t tlen = 0;
    char *text = utf8_sanitize(r->text ? r->text : "", r->text_len, &tlen);
    json_object_object_add(o, "req", json_object_new_int64((int64_t)r->req_id));
    json_object_object_add(o, "ids", ids);
    json_object_object_add(o, "text", json_object_new_string_len(text, (int)tlen));
    free(text);
    json_object_object_add(
        o, "finish",
        r->have_done ? json_object_new_string(cm_wire_finish_name(r->done.finish)) : NULL);
    json_object_object_add(o, "guard", r->have_done ? json_object_new_string(r->done.guard) : NULL);
    json_object_object_add(o, "usage", r->have_done ? usage_json(&r->done) : NULL);
    struct json_object *t = NULL;
    if (r->have_done) {
        t = json_object_new_object();
        json_object_object_add(t, "queue_ms", json_object_new_double(r->done.queue_ms));
        json_object_object_add(t, "prefill_ms", json_object_new_double(r->done.prefill_ms));
        json_object_object_add(t, "decode_ms", json_object_new_double(r->done.decode_ms));
    }
    json_object_object_add(o, "timings", t);
    struct json_object *a = NULL;
    if (r->accepted) {
        a = json_object_new_object();
        json_object_object_add(a, "prompt_tokens", json_object_new_int64(r->acc.prompt_tokens));
        json_object_object_add(a, "cached_tokens", json_object_new_int64(r->acc.cached_tokens));
    }
    json_object_object_add(o, "accepted", a);
    json_object_object_add(o, "error", r->have_error || r->fail[0] ? error_json(r) : NULL);
    json_object_object_add(
        o, "ttft_ms",
        r->t_first_ns ? json_object_new_double((double)(r->t_first_ns - r->t_start_ns) / 1e6)
                      : NULL);
    json_object_object_add(o, "cancel_sent", json_object_new_boolean(r->cancel_sent));
    json_object_object_add(o, "disconnected", json_object_new_boolean(r->disconnected));
    printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
                                                         JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(o);
}

static void
print_text(const struct req *r)
{
    if (r->have_done)
        printf("req %llu finish=%s guard=%s prompt_tokens=%u completion_tokens=%u\n",
               (unsigned long long)r->req_id, cm_wire_finish_name(r->done.finish), r->done.guard,
               r->done.prompt_tokens, r->done.completion_tokens);
    else if (r->have_error)
        printf("req %llu error=%s retry_after_ms=%u message=%s\n", (unsigned long long)r->req_id,
               cm_wire_errno_name(r->error.code) ? cm_wire_errno_name(r->error.code) : "?",
               r->error.retry_after_ms, r->error.message);
    else if (r->fail[0])
        printf("req %llu error=CLIENT message=%s\n", (unsigned long long)r->req_id, r->fail);
    else
        printf("req %llu disconnected after %zu tokens\n", (unsigned long long)r->req_id, r->n_ids);
    printf("ids:");
    for (size_t i = 0; i < r->n_ids; i++)
        printf(" %d", r->ids[i]);
    printf("\ntext: ");
    fwrite(r->text ? r->text : "", 1, r->text_len, stdout);
    printf("\n");
}

/* ---- The loop ---- */

static void
req_end(struct client *cl, struct req *r)
{
    r->t_end_ns = cm_now_ns();
    r->state = REQ_ENDED;
    if (r->fd >= 0)
        close(r->fd);
    r->fd = -1;
    cm_wire_reader_fini(&r->rd);
    cm_wire_buf_fini(&r->out);
    cl->n_active--;
    cl->t_last_ns = r->t_end_ns;
    bool ok = !r->fail[0] && !r->have_error && (r->have_done || r->disconnected);
    if (ok)
        cl->n_ok++;
    else
        cl->n_bad++;
    cl->completion_tokens += r->have_done ? r->done.completion_tokens : r->n_ids;
    if (!cl->o->quiet) {
        if (cl->o->json)
            print_json(r);
        else
            print_text(r);
        fflush(stdout);
    }
    free(r->ids);
    free(r->text);
    r->ids = NULL;
    r->text = NULL;
}

static void
req_start(struct client *cl, struct req *r)
{
    const struct opts *o = cl->o;
    char err[256] = "";
    r->fd = -1;
    r->state = REQ_HELLO;
    r->t_start_ns = cm_now_ns();
    cl->n_active++;
    if (cm_wire_reader_init(&r->rd, o->max_payload) < 0 ||
        cm_wire_buf_init(&r->out, o->max_payload) < 0) {
        req_failf(r, "bad --max-frame-bytes");
        goto out;
    }
    int fd = req_connect(o->socket, err, sizeof(err));
    if (fd < 0) {
        req_failf(r, "%s", err);
        goto out;
    }
    r->fd = fd;
    struct cm_wire_hello h = {.version = CM_WIRE_VERSION};
    snprintf(h.client, sizeof(h.client), "%s", CLIENT_NAME);
    if (cm_wire_encode_hello(&r->out, 0, &h) < 0)
        req_failf(r, "cannot encode HELLO");
out:
    if (r->fail[0])
        req_end(cl, r);
}

/* Writes pending output; applies the actions that wait for SUBMIT to be on the wire. */
static void
req_flush(struct req *r)
{
    if (cm_wire_buf_pending(&r->out) > 0) {
        ssize_t n = cm_wire_buf_write_fd(&r->out, r->fd);
        if (n < 0 && n != -EAGAIN) {
            /* The engine closed its end: what it said last (an ERROR) is still readable. */
            cm_wire_buf_consume(&r->out, cm_wire_buf_pending(&r->out));
            if (r->state == REQ_HOLD)
                r->state = REQ_RUNNING;
            return;
        }
    }
    if (cm_wire_buf_pending(&r->out) > 0 || r->state != REQ_RUNNING)
        return;
    if (r->close_when_written)
        r->disconnected = true;
    else if (r->hold_when_written)
        r->state = REQ_HOLD;
    r->close_when_written = r->hold_when_written = false;
}

static void
req_poll_setup(const struct client *cl, const struct req *r, struct pollfd *p, int *timeout_ms)
{
    p->fd = r->fd;
    p->revents = 0;
    p->events = cm_wire_buf_pending(&r->out) > 0 ? POLLOUT : 0;
    if (r->state != REQ_HOLD) {
        p->events |= POLLIN;
    } else {
        p->events |= POLLRDHUP; /* the engine hanging up ends the hold; data does not */
        if (cl->o->hold_ms > 0) {
            uint64_t now = cm_now_ns();
            int ms = r->hold_until_ns > now ? (int)((r->hold_until_ns - now) / 1000000 + 1) : 0;
            if (*timeout_ms < 0 || ms < *timeout_ms)
                *timeout_ms = ms;
        }
    }
}

static void
req_on_poll(struct client *cl, struct req *r, short revents)
{
    const struct opts *o = cl->o;
    if (revents & POLLOUT)
        req_flush(r);
    if (r->state == REQ_HOLD) {
        if ((revents & (POLLHUP | POLLRDHUP | POLLERR)) ||
            (o->hold_ms > 0 && cm_now_ns() >= r->hold_until_ns))
            r->state = REQ_RUNNING; /* drain what the engine sent */
        else
            return;
    }
    if (revents & (POLLIN | POLLHUP | POLLERR)) {
        req_read(o, r);
        if (!req_finished(r))
            req_flush(r); /* a CANCEL or SUBMIT queued by the frames */
    }
    if (req_finished(r))
        req_end(cl, r);
}

static int
run_requests(struct client *cl)
{
    const struct opts *o = cl->o;
    int n = o->requests;
    struct pollfd *pfd = cm_xcalloc((size_t)o->concurrency, sizeof(*pfd));
    struct req **act = cm_xcalloc((size_t)o->concurrency, sizeof(*act));
    uint64_t deadline = cm_now_ns() + (uint64_t)o->timeout_ms * 1000000;
    cl->t0_ns = cl->t_last_ns = cm_now_ns();
    while (cl->n_started < n || cl->n_active > 0) {
        while (cl->n_active < o->concurrency && cl->n_started < n) {
            struct req *r = &cl->reqs[cl->n_started];
            r->index = cl->n_started;
            r->req_id = (uint64_t)cl->n_started + 1;
            cl->n_started++;
            req_start(cl, r);
        }
        int k = 0, timeout_ms = -1;
        for (int i = 0; i < cl->n_started; i++) {
            struct req *r = &cl->reqs[i];
            if (r->state == REQ_ENDED)
                continue;
            if (r->state == REQ_HOLD && r->hold_until_ns == 0)
                r->hold_until_ns = cm_now_ns() + (uint64_t)o->hold_ms * 1000000;
            req_poll_setup(cl, r, &pfd[k], &timeout_ms);
            act[k++] = r;
        }
        if (k == 0)
            continue;
        uint64_t now = cm_now_ns();
        if (now >= deadline) {
            for (int i = 0; i < k; i++) {
                req_failf(act[i], "timeout after %d ms", o->timeout_ms);
                req_end(cl, act[i]);
            }
            continue;
        }
        int left_ms = (int)((deadline - now) / 1000000) + 1;
        if (timeout_ms < 0 || timeout_ms > left_ms)
            timeout_ms = left_ms;
        int rc = poll(pfd, (nfds_t)k, timeout_ms);
        if (rc < 0 && errno != EINTR) {
            perror("engine_client: poll");
            break;
        }
        for (int i = 0; i < k; i++)
            req_on_poll(cl, act[i], rc > 0 ? pfd[i].revents : 0);
    }
    free(pfd);
    free(act);
    return cl->n_bad > 0 ? 1 : 0;
}

/* ---- STATS ---- */

/* Sends HELLO and STATS on a fresh connection and prints the reply. Returns 0 or 1. */
static int
run_stats(const struct opts *o)
{
    struct req r;
    memset(&r, 0, sizeof(r));
    struct client cl = {.o = o};
    struct opts quiet = *o;
    quiet.quiet = true;
    cl.o = &quiet;
    req_start(&cl, &r);
    if (r.state == REQ_ENDED) {
        fprintf(stderr, "engine_client: stats: %s\n", r.fail);
        return 1;
    }
    struct cm_wire_frame f;
    struct cm_wire_stats_reply sr = {0};
    char err[CM_WIRE_ERR_LEN] = "";
    int ret = 1, got_info = 0;
    uint64_t deadline = cm_now_ns() + (uint64_t)o->timeout_ms * 1000000;
    while (cm_now_ns() < deadline) {
        struct pollfd p = {.fd = r.fd,
                           .events = (short)(POLLIN | (cm_wire_buf_pending(&r.out) ? POLLOUT : 0))};
        if (poll(&p, 1, 100) < 0 && errno != EINTR)
            break;
        ssize_t w = cm_wire_buf_pending(&r.out) ? cm_wire_buf_write_fd(&r.out, r.fd) : 0;
        if (w < 0 && w != -EAGAIN) {
            snprintf(err, sizeof(err), "write: %s", strerror((int)-w));
            break;
        }
        ssize_t n = cm_wire_reader_read_fd(&r.rd, r.fd);
        if (n == 0 || (n < 0 && n != -EAGAIN && n != -ENOBUFS)) {
            snprintf(err, sizeof(err), "connection closed");
            break;
        }
        int rc;
        while ((rc = cm_wire_reader_next(&r.rd, &f)) == 1) {
            if (f.type == CM_WIRE_MODEL_INFO && !got_info) {
                got_info = 1;
                cm_wire_encode_stats(&r.out, 0);
            } else if (f.type == CM_WIRE_STATS_REPLY) {
                if (cm_wire_decode_stats_reply(&f, &sr, err, sizeof(err)) == 0)
                    ret = 0;
                goto out;
            } else {
                snprintf(err, sizeof(err), "unexpected %s", cm_wire_type_name(f.type));
                goto out;
            }
        }
    }
out:
    if (ret == 0) {
        const char *js = json_object_to_json_string_ext(sr.obj, JSON_C_TO_STRING_PLAIN);
        if (o->json)
            printf("{\"stats\":%s}\n", js);
        else
            printf("%s\n", js);
    } else {
        fprintf(stderr, "engine_client: stats: %s\n", err[0] ? err : "no reply");
    }
    cm_wire_stats_reply_fini(&sr);
    close(r.fd);
    cm_wire_reader_fini(&r.rd);
    cm_wire_buf_fini(&r.out);
    return ret;
}

/* ---- Main ---- */

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void
print_summary(const struct client *cl)
{
    const struct opts *o = cl->o;
    uint64_t *ttft = cm_xcalloc((size_t)o->requests + 1, sizeof(*ttft));
    int n = 0;
    for (int i = 0; i < o->requests; i++)
        if (cl->reqs[i].t_first_ns)
            ttft[n++] = cl->reqs[i].t_first_ns - cl->reqs[i].t_start_ns;
    qsort(ttft, (size_t)n, sizeof(*ttft), cmp_u64);
    double wall_s = (double)(cl->t_last_ns - cl->t0_ns) / 1e9;
    fprintf(stderr,
            "summary: requests=%d ok=%d errors=%d completion_tokens=%llu wall_s=%.3f "
            "tok_s=%.1f ttft_ms_p50=%.1f ttft_ms_max=%.1f\n",
            o->requests, cl->n_ok, cl->n_bad, (unsigned long long)cl->completion_tokens, wall_s,
            wall_s > 0 ? (double)cl->completion_tokens / wall_s : 0.0,
            n ? (double)ttft[n / 2] / 1e6 : 0.0, n ? (double)ttft[n - 1] / 1e6 : 0.0);
    free(ttft);
}

int
main(int argc, char **argv)
{
    static struct opts o;
    struct client cl = {.o = &o};
    int ret = 0;
    int rc = parse_args(argc, argv, &o);
    if (rc != 0) {
        ret = rc > 0 ? 0 : 2;
        goto out;
    }
    if (o.requests > 0) {
        cl.reqs = cm_xcalloc((size_t)o.requests, sizeof(*cl.reqs));
        ret = run_requests(&cl);
        print_summary(&cl);
    }
    if (o.stats && run_stats(&o) != 0)
        ret = 1;
out:
    free(cl.reqs);
    for (int i = 0; i < o.n_prompts; i++)
        free(o.prompts[i].ids);
    return ret;
}

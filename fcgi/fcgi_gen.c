/*
 * fcgi_gen: the generation endpoints (see fcgi_gen.h). One struct gen per request lives on the
 * request thread's stack; the pipeline of each generated token is
 *   TOKEN bytes -> guard_utf8 -> (chat with tools) guard_toolcall -> CONTENT events
 *   -> guard_stop (hold-back) -> an SSE delta (streaming) or the collected content.
 * Tool calls are buffered until their block closes and parses: a call that turns out invalid is
 * dropped without a trace on the wire, and a valid one goes out as a head delta (index, id, type,
 * name) followed by its arguments. The loop guards (guards/guard.h, one struct guard per response)
 * see what would be emitted: each content delta after the stop-string hold-back, each valid call
 * after its block closes, and the token count of an open block; they are fed before the client
 * sees the piece, so the delta or call that trips is not emitted. A trip stops the pipeline
 * (text_stopped), sends CANCEL naming the guard and waits (bounded) for DONE; finish_reason and
 * stop_reason then come from fcgi_resp_finish_of. Headers are sent lazily (first ACCEPTED or TOKEN
 * frame, or the first heartbeat), so an engine refusal of the SUBMIT (EAGAIN, E2BIG, EINVAL), which
 * comes at once, is still a plain HTTP error.
 */
#include "fcgi/fcgi_gen.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <json-c/json.h>

#include "common/cm_chat.h"
#include "common/cm_log.h"
#include "common/cm_util.h"
#include "common/cm_wire.h"
#include "fcgi/fcgi.h"
#include "fcgi/fcgi_dump.h"
#include "fcgi/fcgi_engine.h"
#include "fcgi/fcgi_http.h"
#include "fcgi/fcgi_req.h"
#include "fcgi/fcgi_resp.h"
#include "guards/guard.h"
#include "guards/guard_stop.h"
#include "guards/guard_toolcall.h"
#include "guards/guard_utf8.h"

#define CANCEL_WAIT_MS 5000     /* bounded wait for DONE after a CANCEL */
#define DEADLINE_GRACE_MS 10000 /* the worker's own bound past the engine deadline */
#define NS_PER_MS 1000000ull
#define STOP_PARSE 1 /* a tool-parser callback's "stop here" (text_stopped), not an error */

struct buf {
    char *p;
    size_t len, cap;
};

/* The tool call being parsed (between CALL_BEGIN and CALL_END). */
struct cur_call {
    bool open;
    char *name;
    struct buf args; /* the raw arguments text as the model wrote it */
};

struct gen {
    struct fcgi_ctx *ctx;
    struct fcgi_http *h;
    enum fcgi_req_kind kind;
    struct fcgi_req req;
    bool have_req;
    struct fcgi_engine_conn *conn;
    const struct cm_wire_model_info *info;
    uint64_t req_id;
    char id[FCGI_RESP_ID_MAX];
    struct fcgi_resp_meta meta;
    char model[CM_WIRE_MAX_MODEL_ID + 1];

    struct guard_utf8 utf8;
    struct guard_stop *stop;
    struct guard_toolcall *tc; /* NULL: no tool parsing */
    struct guard_config gcfg;  /* the server's guards with the request's overrides */
    struct guard *guard;       /* this response's loop guards */
    int call_tokens;           /* tokens since the open <tool_call> block began */
    struct fcgi_resp_logprobs lp;

    bool streaming;
    bool started; /* streaming: headers and the role chunk sent */
    uint64_t last_event_ns;
    uint64_t heartbeat_ns;
    uint64_t hard_deadline_ns;   /* 0: none */
    uint64_t cancel_deadline_ns; /* after a CANCEL: 0 none */

    struct buf content;
    bool keep_content; /* non-streaming or --dump */
    struct cur_call cur;
    struct buf ws; /* white space between tool calls, held until non-space content follows */
    struct fcgi_resp_call *calls;
    int n_calls, cap_calls;

    bool finished;     /* DONE, ERROR or the engine connection lost */
    bool text_stopped; /* stop string matched: later text is ignored */
    struct fcgi_resp_cut cut;
    struct cm_wire_done done;
    struct fcgi_resp_usage usage;
    uint32_t n_tokens;

    /* an error response or event */
    int err_status;
    char err_message[CM_WIRE_MAX_MESSAGE + 1];
    char err_param[96]; /* "" : null */
    char err_code[48];
    int err_retry_s;
};

/* ---- Small helpers ---- */

static int
buf_add(struct buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return -ENOMEM;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

static void set_error(struct gen *g, int status, const char *param, const char *code,
                      const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void
set_error(struct gen *g, int status, const char *param, const char *code, const char *fmt, ...)
{
    g->err_status = status;
    snprintf(g->err_param, sizeof(g->err_param), "%s", param ? param : "");
    snprintf(g->err_code, sizeof(g->err_code), "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g->err_message, sizeof(g->err_message), fmt, ap);
    va_end(ap);
}

static void
client_left(struct gen *g)
{
    if (g->cut.client_gone)
        return;
    g->cut.client_gone = true;
    g->h->client_gone = true;
    atomic_fetch_add(&g->ctx->counters.client_disconnects, 1);
    if (g->conn && !g->finished)
        fcgi_engine_cancel(g->conn, g->req_id, CM_WIRE_CANCEL_CLIENT_DISCONNECT);
}

static void
send_cancel(struct gen *g, const char *reason)
{
    if (g->cancel_deadline_ns || g->finished)
        return;
    g->cancel_deadline_ns = cm_now_ns() + CANCEL_WAIT_MS * NS_PER_MS;
    if (fcgi_engine_cancel(g->conn, g->req_id, reason) < 0)
        g->finished = true; /* the engine is gone: nothing to wait for */
}

/* A loop guard tripped: nothing more reaches the client, the engine sequence is cancelled. */
static void
trip(struct gen *g, enum guard_id id)
{
    if (g->cut.guard)
        return;
    g->cut.guard = guard_name(id);
    g->cut.guard_tool_loop = guard_is_tool_loop(id);
    g->text_stopped = true;
    CM_LOG(CM_LOG_WARN, "guard tripped req=%llu guard=%s tokens=%u calls=%d",
           (unsigned long long)g->req_id, g->cut.guard, g->n_tokens, g->n_calls);
    send_cancel(g, g->cut.guard);
}

/* ---- SSE output ---- */

static int
send_obj(struct gen *g, struct json_object *o)
{
    if (!o)
        return -ENOMEM;
    size_t n = 0;
    const char *s = json_object_to_json_string_length(
        o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &n);
    int rc = fcgi_http_sse_data(g->h, s, n);
    json_object_put(o);
    g->last_event_ns = cm_now_ns();
    if (rc < 0)
        client_left(g);
    return rc;
}

static int
start_stream(struct gen *g)
{
    if (g->started || !g->streaming)
        return 0;
    g->started = true;
    int rc = fcgi_http_begin(g->h, 200, "text/event-stream", true, NULL);
    if (rc < 0) {
        client_left(g);
        return rc;
    }
    g->last_event_ns = cm_now_ns();
    if (g->kind == FCGI_REQ_CHAT)
        return send_obj(g, fcgi_resp_chat_chunk(&g->meta, fcgi_resp_delta_role(), NULL, NULL));
    return fcgi_http_flush(g->h) < 0 ? (client_left(g), -EPIPE) : 0;
}

/* ---- Content and tool calls ---- */

static int
emit_content(struct gen *g, const char *s, size_t n)
{
    if (n == 0)
        return 0;
    if (g->guard && guard_feed_text(g->guard, s, n) != GUARD_NONE) {
        trip(g, guard_tripped(g->guard));
        return 0;
    }
    if (g->keep_content && buf_add(&g->content, s, n) < 0)
        return -ENOMEM;
    if (!g->streaming)
        return 0;
    int rc = start_stream(g);
    if (rc < 0)
        return rc;
    struct json_object *lp = fcgi_resp_logprobs_take(&g->lp);
    if (g->kind == FCGI_REQ_CHAT)
        return send_obj(g, fcgi_resp_chat_chunk(&g->meta, fcgi_resp_delta_content(s, n), lp, NULL));
    return send_obj(g, fcgi_resp_text_chunk(&g->meta, s, n, lp, NULL));
}

/* Text outside tool-call blocks: through the stop strings. */
static int
content_text(struct gen *g, const char *s, size_t n)
{
    if (g->text_stopped || n == 0)
        return 0;
    const char *emit = NULL;
    size_t emit_len = 0;
    bool matched = false;
    int rc = guard_stop_feed(g->stop, s, n, &emit, &emit_len, &matched);
    if (rc < 0)
        return rc;
    rc = emit_content(g, emit, emit_len);
    if (matched) {
        g->text_stopped = true;
        g->cut.stop_string = true;
        atomic_fetch_add(&g->ctx->counters.stop_string_matches, 1);
        send_cancel(g, "stop_string");
    }
    return rc;
}

static void
cur_reset(struct cur_call *c)
{
    free(c->name);
    free(c->args.p);
    memset(c, 0, sizeof(*c));
}

/* The arguments of a completed call: the model's own text trimmed, else the canonical form. */
static char *
call_arguments(struct gen *g, const struct guard_toolcall_event *ev)
{
    const char *s = g->cur.args.p ? g->cur.args.p : "";
    size_t n = g->cur.args.len;
    while (n > 0 && strchr(" \t\r\n", s[0]))
        s++, n--;
    while (n > 0 && strchr(" \t\r\n", s[n - 1]))
        n--;
    if (n == 0 || s[0] != '{') {
        s = ev->args;
        n = ev->args_len;
    }
    return strndup(s, n);
}

static bool
tool_declared(const struct gen *g, const char *name)
{
    for (int i = 0; i < g->req.n_tools; i++)
        if (strcmp(g->req.tool_names[i], name) == 0)
            return true;
    return false;
}

static int
call_end(struct gen *g, const struct guard_toolcall_event *ev)
{
    int rc = 0;
    const char *why = ev->ok ? NULL : ev->error ? ev->error : "invalid";
    if (!why && !tool_declared(g, ev->name))
        why = "not a declared function";
    if (why) {
        atomic_fetch_add(&g->ctx->counters.tool_calls_invalid, 1);
        CM_LOG(CM_LOG_WARN, "tool call dropped req=%llu index=%d error=%s",
               (unsigned long long)g->req_id, ev->index, why);
        goto out;
    }
    if (!g->req.parallel_tool_calls && g->n_calls >= 1) {
        CM_LOG(CM_LOG_DEBUG,
               "tool call beyond the first dropped (parallel_tool_calls false) "
               "req=%llu",
               (unsigned long long)g->req_id);
        goto out;
    }
    if (g->guard && guard_feed_call(g->guard, ev->name, ev->args, ev->args_len) != GUARD_NONE) {
        trip(g, guard_tripped(g->guard)); /* the call that trips is not emitted */
        rc = STOP_PARSE;
        goto out;
    }
    if (g->n_calls == g->cap_calls) {
        int cap = g->cap_calls ? 2 * g->cap_calls : 4;
        struct fcgi_resp_call *c = realloc(g->calls, (size_t)cap * sizeof(*c));
        if (!c) {
            rc = -ENOMEM;
            goto out;
        }
        g->calls = c;
        g->cap_calls = cap;
    }
    struct fcgi_resp_call *c = &g->calls[g->n_calls];
    memset(c, 0, sizeof(*c));
    fcgi_resp_make_id("call_", c->id);
    c->name = strdup(ev->name);
    c->arguments = call_arguments(g, ev);
    if (!c->name || !c->arguments) {
        free(c->name);
        free(c->arguments);
        rc = -ENOMEM;
        goto out;
    }
    int index = g->n_calls++;
    g->cut.n_tool_calls = g->n_calls;
    atomic_fetch_add(&g->ctx->counters.tool_calls, 1);
    if (g->streaming) {
        if ((rc = start_stream(g)) < 0)
            goto out;
        rc = send_obj(g, fcgi_resp_chat_chunk(&g->meta,
                                              fcgi_resp_delta_call_head(index, c->id, c->name),
                                              NULL, NULL));
        if (rc == 0)
            rc = send_obj(g, fcgi_resp_chat_chunk(&g->meta,
                                                  fcgi_resp_delta_call_args(index, c->arguments,
                                                                            strlen(c->arguments)),
                                                  NULL, NULL));
    }
out:
    cur_reset(&g->cur);
    return rc;
}

static bool
all_space(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strchr(" \t\r\n", s[i]))
            return false;
    return true;
}

/* Content around tool calls: white space alone is held (the newlines between blocks would
 * otherwise make a tool-call-only answer carry content). */
static int
tool_content(struct gen *g, const char *s, size_t n)
{
    if (all_space(s, n))
        return buf_add(&g->ws, s, n);
    int rc = 0;
    if (g->ws.len > 0) {
        rc = content_text(g, g->ws.p, g->ws.len);
        g->ws.len = 0;
    }
    return rc == 0 ? content_text(g, s, n) : rc;
}

static int
on_tool_event(void *arg, const struct guard_toolcall_event *ev)
{
    struct gen *g = arg;
    if (g->text_stopped) /* a stop string or a guard: the rest of this feed is dropped */
        return STOP_PARSE;
    switch (ev->type) {
    case GUARD_TOOLCALL_CONTENT:
        return tool_content(g, ev->text, ev->len);
    case GUARD_TOOLCALL_CALL_BEGIN:
        g->ws.len = 0; /* the separator before a call is not content */
        cur_reset(&g->cur);
        g->cur.open = true;
        g->call_tokens = 0;
        return 0;
    case GUARD_TOOLCALL_CALL_NAME:
        free(g->cur.name);
        g->cur.name = strdup(ev->name);
        return g->cur.name ? 0 : -ENOMEM;
    case GUARD_TOOLCALL_CALL_ARGS:
        return buf_add(&g->cur.args, ev->text, ev->len);
    case GUARD_TOOLCALL_CALL_END:
        return call_end(g, ev);
    }
    return 0;
}

/* Valid UTF-8 text of the generation, in order. */
static int
route_text(struct gen *g, const char *s, size_t n)
{
    if (n == 0 || g->text_stopped)
        return 0;
    if (g->tc) {
        int rc = guard_toolcall_feed(g->tc, s, n, on_tool_event, g);
        return rc == STOP_PARSE ? 0 : rc;
    }
    return content_text(g, s, n);
}

/* End of generation: release what the UTF-8 assembler, the parser and the stop strings hold. */
static int
drain_pipeline(struct gen *g)
{
    char *tail = NULL;
    size_t n = 0;
    int rc = guard_utf8_flush(&g->utf8, &tail, &n);
    if (rc == 0)
        rc = route_text(g, tail, n);
    free(tail);
    if (rc == 0 && g->tc && !g->text_stopped) {
        rc = guard_toolcall_finish(g->tc, on_tool_event, g);
        rc = rc == STOP_PARSE ? 0 : rc;
    }
    if (rc == 0 && g->ws.len > 0 && g->n_calls == 0)
        rc = content_text(g, g->ws.p, g->ws.len);
    g->ws.len = 0;
    if (rc == 0 && !g->text_stopped) {
        const char *emit = NULL;
        size_t emit_len = 0;
        guard_stop_flush(g->stop, &emit, &emit_len);
        rc = emit_content(g, emit, emit_len);
        if (guard_stop_matched_index(g->stop) >= 0) {
            g->text_stopped = true;
            g->cut.stop_string = true;
            atomic_fetch_add(&g->ctx->counters.stop_string_matches, 1);
        }
    }
    return rc;
}

/* ---- Engine frames ---- */

static void
engine_error(struct gen *g, const struct cm_wire_error *e)
{
    switch (e->code) {
    case -EAGAIN: {
        int s = (int)((e->retry_after_ms + 999) / 1000);
        set_error(g, 429, NULL, "rate_limit_exceeded", "the engine's queue is full, retry later");
        g->err_retry_s = s > 0 ? s : 1;
        break;
    }
    case -E2BIG:
        set_error(g, 400, g->kind == FCGI_REQ_CHAT ? "messages" : "prompt",
                  "context_length_exceeded", "%s",
                  e->message[0] ? e->message : "the prompt is longer than the model's context");
        break;
    case -EINVAL:
        set_error(g, 400, NULL, NULL, "%s", e->message[0] ? e->message : "invalid request");
        break;
    case -ENOMEM:
    case -EBUSY:
    case -ESHUTDOWN:
        set_error(g, 503, NULL, NULL, "the engine cannot take the request now");
        g->err_retry_s = 1;
        break;
    default:
        set_error(g, 500, NULL, NULL, "the engine failed the request (%s)",
                  cm_wire_errno_name(e->code) ? cm_wire_errno_name(e->code) : "error");
        break;
    }
    g->cut.error = true;
    g->finished = true;
}

static void
engine_lost(struct gen *g, const char *why)
{
    CM_LOG(CM_LOG_WARN, "engine connection lost req=%llu: %s", (unsigned long long)g->req_id, why);
    set_error(g, 503, NULL, NULL, "the engine connection was lost");
    g->err_retry_s = 1;
    g->cut.error = true;
    g->finished = true;
}

/* A DONE "cancelled" that this worker did not ask for and that names no guard (engine-side
 * guards such as token_loop do): the engine cut the response short (shutdown past its grace
 * period, a reader stuck too long). That is not a finished answer: the client gets an error
 * (an error event in a stream, a 503 to retry otherwise), never a silently truncated success. */
static void
server_cut(struct gen *g)
{
    enum guard_id id;
    if (g->done.finish != CM_WIRE_FINISH_CANCELLED || g->cancel_deadline_ns || g->cut.guard ||
        g->cut.stop_string || g->cut.client_gone || guard_from_name(g->done.guard, &id) == 0)
        return;
    const char *why = g->done.guard[0] ? g->done.guard : "cancelled";
    CM_LOG(CM_LOG_WARN, "engine cut the response short req=%llu reason=%s",
           (unsigned long long)g->req_id, why);
    set_error(g, 503, NULL, NULL, "the engine stopped this response early (%s); retry", why);
    g->err_retry_s = 1;
    g->cut.error = true;
}

static int
on_token(struct gen *g, const struct cm_wire_token *t)
{
    g->n_tokens++;
    int rc = start_stream(g);
    if (rc < 0)
        return rc;
    if (g->text_stopped) /* after a stop string: nothing more reaches the client */
        return 0;
    if (g->req.logprobs && (rc = fcgi_resp_logprobs_add(&g->lp, t)) < 0)
        return rc;
    if (!(t->flags & CM_WIRE_TOKEN_SPECIAL)) {
        char *text = NULL;
        size_t n = 0;
        if ((rc = guard_utf8_feed(&g->utf8, t->text, t->text_len, &text, &n)) < 0)
            return rc;
        rc = route_text(g, text, n);
        free(text);
        if (rc < 0)
            return rc;
    }
    /* unterminated_tool_call: every token from the one that opened the block counts */
    if (g->tc && g->guard && !g->text_stopped && guard_toolcall_in_call(g->tc) &&
        guard_feed_call_tokens(g->guard, ++g->call_tokens) != GUARD_NONE)
        trip(g, guard_tripped(g->guard));
    return 0;
}

/* One frame. Returns 0 or a negative errno that ends the request (client gone, no memory). */
static int
on_frame(struct gen *g, const struct cm_wire_frame *f)
{
    char err[CM_WIRE_ERR_LEN];
    if (f->req_id != g->req_id) {
        engine_lost(g, "a frame for another request");
        return 0;
    }
    switch (f->type) {
    case CM_WIRE_ACCEPTED: {
        struct cm_wire_accepted a;
        if (cm_wire_decode_accepted(f, &a, err, sizeof(err)) < 0)
            break;
        g->usage.prompt_tokens = a.prompt_tokens;
        g->usage.cached_tokens = a.cached_tokens;
        return start_stream(g);
    }
    case CM_WIRE_TOKEN: {
        struct cm_wire_token t;
        if (cm_wire_decode_token(f, &t, err, sizeof(err)) < 0)
            break;
        return on_token(g, &t);
    }
    case CM_WIRE_DONE:
        if (cm_wire_decode_done(f, &g->done, err, sizeof(err)) < 0)
            break;
        g->cut.have_done = true;
        g->cut.done_finish = g->done.finish;
        g->cut.done_guard = g->done.guard;
        g->usage.prompt_tokens = g->done.prompt_tokens;
        g->usage.completion_tokens = g->done.completion_tokens;
        g->usage.cached_tokens = g->done.cached_tokens;
        g->finished = true;
        server_cut(g);
        return 0;
    case CM_WIRE_ERROR: {
        struct cm_wire_error e;
        if (cm_wire_decode_error(f, &e, err, sizeof(err)) < 0)
            break;
        engine_error(g, &e);
        return 0;
    }
    default:
        snprintf(err, sizeof(err), "unexpected %s frame", cm_wire_type_name(f->type));
        break;
    }
    engine_lost(g, err);
    return 0;
}

/* ---- The wait loop ---- */

static int
poll_timeout_ms(struct gen *g, uint64_t now)
{
    uint64_t next = UINT64_MAX;
    if (g->streaming && g->heartbeat_ns)
        next = g->last_event_ns + g->heartbeat_ns;
    if (g->cancel_deadline_ns && g->cancel_deadline_ns < next)
        next = g->cancel_deadline_ns;
    if (g->hard_deadline_ns && g->hard_deadline_ns < next)
        next = g->hard_deadline_ns;
    if (next == UINT64_MAX)
        return -1;
    if (next <= now)
        return 0;
    uint64_t ms = (next - now + NS_PER_MS - 1) / NS_PER_MS;
    return ms > 60000 ? 60000 : (int)ms;
}

/* Timers: a heartbeat, the end of the wait after a CANCEL, the worker's own deadline. */
static int
on_timers(struct gen *g, uint64_t now)
{
    if (g->cancel_deadline_ns && now >= g->cancel_deadline_ns) {
        CM_LOG(CM_LOG_WARN, "no DONE within %d ms of a CANCEL req=%llu", CANCEL_WAIT_MS,
               (unsigned long long)g->req_id);
        g->finished = true;
        return 0;
    }
    if (g->hard_deadline_ns && now >= g->hard_deadline_ns && !g->cancel_deadline_ns) {
        g->cut.guard = "deadline";
        send_cancel(g, "deadline");
        return 0;
    }
    if (g->streaming && g->heartbeat_ns && now >= g->last_event_ns + g->heartbeat_ns) {
        if (!g->started)
            return start_stream(g);
        int rc = fcgi_http_sse_comment(g->h, "keep-alive");
        g->last_event_ns = now;
        if (rc < 0)
            client_left(g);
        return rc;
    }
    return 0;
}

static int
drain_frames(struct gen *g)
{
    while (!g->finished) {
        struct cm_wire_frame f;
        int rc = fcgi_engine_next(g->conn, &f);
        if (rc == 0)
            return 0;
        if (rc < 0) {
            engine_lost(g, rc == -ECONNRESET ? "closed" : "malformed frame");
            return 0;
        }
        if ((rc = on_frame(g, &f)) < 0)
            return rc;
    }
    return 0;
}

static int
wait_loop(struct gen *g)
{
    int rc = 0;
    while (!g->finished && rc == 0 && !g->cut.client_gone) {
        struct pollfd p[2] = {{.fd = fcgi_engine_conn_fd(g->conn), .events = POLLIN}, {.fd = -1}};
        int np = 1;
        if (g->h->client_fd >= 0) {
            p[1] = (struct pollfd){.fd = g->h->client_fd, .events = POLLIN | POLLRDHUP};
            np = 2;
        }
        int n = poll(p, (nfds_t)np, poll_timeout_ms(g, cm_now_ns()));
        if (n < 0 && errno != EINTR) {
            engine_lost(g, "poll failed");
            break;
        }
        if (n > 0 && np == 2 && p[1].revents && fcgi_http_poll_gone(g->h)) {
            client_left(g);
            break;
        }
        if (n > 0 && p[0].revents)
            rc = drain_frames(g);
        if (rc == 0 && !g->finished)
            rc = on_timers(g, cm_now_ns());
    }
    if (g->h->client_gone)
        client_left(g);
    return rc;
}

/* ---- Finishing ---- */

static struct json_object *
dump_calls(const struct gen *g)
{
    struct json_object *arr = json_object_new_array();
    for (int i = 0; i < g->n_calls; i++) {
        struct json_object *c = json_object_new_object(), *fn = json_object_new_object();
        json_object_object_add(c, "id", json_object_new_string(g->calls[i].id));
        json_object_object_add(c, "type", json_object_new_string("function"));
        json_object_object_add(fn, "name", json_object_new_string(g->calls[i].name));
        json_object_object_add(fn, "arguments", json_object_new_string(g->calls[i].arguments));
        json_object_object_add(c, "function", fn);
        json_object_array_add(arr, c);
    }
    return arr;
}

static void
write_dump(struct gen *g, const struct fcgi_resp_finish *fin, const char *endpoint)
{
    if (!g->ctx->dump)
        return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct json_object *rec = json_object_new_object(), *resp = json_object_new_object();
    json_object_object_add(rec, "time",
                           json_object_new_double((double)ts.tv_sec + ts.tv_nsec * 1e-9));
    json_object_object_add(rec, "id", json_object_new_string(g->id));
    json_object_object_add(rec, "endpoint", json_object_new_string(endpoint));
    json_object_object_add(rec, "request", g->have_req ? json_object_get(g->req.root) : NULL);
    json_object_object_add(
        resp, "content",
        json_object_new_string_len(g->content.p ? g->content.p : "", (int)g->content.len));
    json_object_object_add(resp, "tool_calls", dump_calls(g));
    json_object_object_add(resp, "finish_reason",
                           fin ? json_object_new_string(fin->finish_reason) : NULL);
    json_object_object_add(resp, "stop_reason",
                           fin && fin->stop_reason ? json_object_new_string(fin->stop_reason)
                                                   : NULL);
    json_object_object_add(resp, "tool_loop_capped",
                           json_object_new_boolean(fin && fin->tool_loop_capped));
    json_object_object_add(resp, "usage", fcgi_resp_usage_json(&g->usage));
    json_object_object_add(resp, "error",
                           g->err_status
                               ? fcgi_resp_error(fcgi_resp_error_type(g->err_status),
                                                 g->err_message, g->err_param, g->err_code)
                               : NULL);
    json_object_object_add(rec, "response", resp);
    fcgi_dump_write(g->ctx->dump, rec);
    json_object_put(rec);
}

static int
send_error_response(struct gen *g)
{
    if (g->err_status == 503)
        atomic_fetch_add(&g->ctx->counters.engine_unavailable, 1);
    int rc = fcgi_http_send_error(g->h, g->err_status, fcgi_resp_error_type(g->err_status),
                                  g->err_message, g->err_param[0] ? g->err_param : NULL,
                                  g->err_code[0] ? g->err_code : NULL, g->err_retry_s);
    return rc == -EPIPE ? -EPIPE : 0;
}

static int
finish_stream(struct gen *g, const struct fcgi_resp_finish *fin)
{
    int rc = start_stream(g);
    if (rc == 0 && g->err_status) {
        struct json_object *e = fcgi_resp_error(fcgi_resp_error_type(g->err_status), g->err_message,
                                                g->err_param, g->err_code);
        rc = send_obj(g, e);
    }
    struct json_object *lp = fcgi_resp_logprobs_take(&g->lp);
    if (rc == 0)
        rc = send_obj(g, g->kind == FCGI_REQ_CHAT ? fcgi_resp_chat_chunk(&g->meta, NULL, lp, fin)
                                                  : fcgi_resp_text_chunk(&g->meta, "", 0, lp, fin));
    else
        json_object_put(lp);
    if (rc == 0 && g->req.include_usage)
        rc = send_obj(g, fcgi_resp_usage_chunk(&g->meta, &g->usage));
    if (rc == 0) {
        rc = fcgi_http_write(g->h, "data: [DONE]\n\n", 14);
        if (rc == 0)
            rc = fcgi_http_flush(g->h);
        if (rc < 0)
            client_left(g);
    }
    return rc < 0 ? -EPIPE : 0;
}

static int
finish_whole(struct gen *g, const struct fcgi_resp_finish *fin)
{
    if (g->err_status)
        return send_error_response(g);
    struct json_object *lp = fcgi_resp_logprobs_take(&g->lp);
    struct json_object *o =
        g->kind == FCGI_REQ_CHAT
            ? fcgi_resp_chat_completion(&g->meta, g->content.p ? g->content.p : "", g->content.len,
                                        g->calls, g->n_calls, lp, fin, &g->usage)
            : fcgi_resp_text_completion(&g->meta, g->content.p, g->content.len, lp, fin, &g->usage);
    if (!o) {
        set_error(g, 500, NULL, NULL, "out of memory");
        return send_error_response(g);
    }
    int rc = fcgi_http_send_json(g->h, 200, o);
    json_object_put(o);
    return rc == -EPIPE ? -EPIPE : 0;
}

/* ---- Setup ---- */

static int
render_chat(struct gen *g, char **prompt, char **prefix)
{
    const struct cm_wire_model_info *mi = g->info;
    struct cm_chat_opts o = {
        .default_system = mi->default_system,
        .tools_json = g->req.tool_choice != FCGI_TOOL_CHOICE_NONE ? g->req.tools_json : NULL,
        .add_generation_prompt = true,
    };
    int rc = cm_chat_render_ex(mi->chat_family, &o, g->req.msgs, g->req.n_msgs, prompt);
    if (rc == -ENOTSUP) {
        set_error(g, 400, "tools", NULL, "the model's chat template (%s) has no tool-call format",
                  cm_chat_family_name(mi->chat_family));
    } else if (rc == -EINVAL) {
        set_error(g, 400, "messages", NULL,
                  mi->chat_family == CM_CHAT_UNKNOWN
                      ? "the model's chat template is not one this server can render; use "
                        "/v1/completions"
                      : "the messages cannot be rendered with the model's chat template (%s)",
                  cm_chat_family_name(mi->chat_family));
    } else if (rc < 0) {
        set_error(g, 500, NULL, NULL, "out of memory");
    }
    if (rc < 0)
        return rc;
    if (g->req.tool_choice == FCGI_TOOL_CHOICE_REQUIRED ||
        g->req.tool_choice == FCGI_TOOL_CHOICE_NAMED) {
        /* "required" with a single declared tool can only mean that tool: naming it keeps a
         * small model from writing something else where the name goes. */
        const char *name = g->req.tool_choice == FCGI_TOOL_CHOICE_NAMED ? g->req.tool_choice_name
                           : g->req.n_tools == 1                        ? g->req.tool_names[0]
                                                                        : NULL;
        rc = cm_chat_tool_prefix(mi->chat_family, name, prefix);
        if (rc < 0) {
            set_error(g, 400, "tool_choice", NULL, "tool_choice cannot be enforced for this model");
            return rc;
        }
        size_t a = strlen(*prompt), b = strlen(*prefix);
        char *p = realloc(*prompt, a + b + 1);
        if (!p) {
            set_error(g, 500, NULL, NULL, "out of memory");
            return -ENOMEM;
        }
        memcpy(p + a, *prefix, b + 1);
        *prompt = p;
    }
    return 0;
}

static bool
model_ok(struct gen *g)
{
    const char *served = g->ctx->conf.model_name ? g->ctx->conf.model_name : g->info->model;
    snprintf(g->model, sizeof(g->model), "%s", served);
    if (!g->req.model || g->ctx->conf.any_model_name || strcmp(g->req.model, served) == 0)
        return true;
    set_error(g, 404, "model", "model_not_found",
              "the model '%.200s' does not exist; this server serves '%s'", g->req.model, served);
    return false;
}

static int
open_engine(struct gen *g)
{
    int rc = fcgi_engine_connect(g->ctx->engine, &g->conn);
    if (rc < 0) {
        set_error(g, 503, NULL, NULL, "the engine is unavailable");
        g->err_retry_s = fcgi_engine_retry_after_s(g->ctx->engine);
        return rc;
    }
    g->info = fcgi_engine_conn_info(g->conn);
    return 0;
}

static int
pipeline_new(struct gen *g, const char *prefix)
{
    int rc = guard_stop_new(g->req.stop, g->req.n_stop, &g->stop);
    if (rc == 0 && fcgi_req_parses_tools(&g->req)) {
        rc = guard_toolcall_new(0, &g->tc);
        if (rc == 0 && prefix)
            rc = guard_toolcall_feed(g->tc, prefix, strlen(prefix), on_tool_event, g);
    }
    if (rc < 0)
        set_error(g, rc == -ENOMEM ? 500 : 400, rc == -ENOMEM ? NULL : "stop", NULL,
                  rc == -ENOMEM ? "out of memory" : "invalid stop strings");
    return rc;
}

/* The request's guard configuration (the server's, with the request's "guards" overrides when the
 * server allows them) and the response's guard object: the chat history seeds the tool-loop
 * guards; completions have none (the content guards only). */
static int
guards_new(struct gen *g)
{
    char err[256];
    g->gcfg = g->ctx->conf.guards;
    struct json_object *o = g->req.guards;
    if (o && json_object_object_length(o) > 0 && !g->ctx->conf.allow_guard_overrides) {
        set_error(g, 400, "guards", NULL,
                  "this server does not accept per-request guard settings (it runs without "
                  "--allow-request-guard-overrides)");
        return -EPERM;
    }
    if (o) {
        /* key by key, so that the 400 names the offending one */
        json_object_object_foreach(o, key, val)
        {
            struct json_object *one = json_object_new_object();
            if (!one || json_object_object_add(one, key, json_object_get(val)) < 0) {
                json_object_put(one);
                set_error(g, 500, NULL, NULL, "out of memory");
                return -ENOMEM;
            }
            int rc = guard_config_override(&g->gcfg, one, err, sizeof(err));
            json_object_put(one);
            if (rc < 0) {
                char param[96];
                snprintf(param, sizeof(param), "guards.%.80s", key);
                set_error(g, 400, param, NULL, "%s", err);
                return rc;
            }
        }
    }
    bool chat = g->kind == FCGI_REQ_CHAT;
    int rc = guard_new(&g->gcfg, chat ? g->req.msgs : NULL, chat ? g->req.n_msgs : 0, &g->guard);
    if (rc < 0)
        set_error(g, 500, NULL, NULL, "out of memory");
    return rc;
}

static int
submit(struct gen *g, const char *prompt, size_t prompt_len)
{
    struct cm_wire_submit s;
    fcgi_req_to_submit(&g->req, &g->ctx->conf, g->info->n_ctx, &s);
    s.token_loop = guard_config_int(&g->gcfg, GUARD_TOKEN_LOOP); /* 0 under --no-guards */
    s.prompt = (char *)prompt;
    s.prompt_len = prompt_len;
    g->req_id = atomic_fetch_add(&g->ctx->next_req_id, 1);
    int rc = fcgi_engine_submit(g->conn, g->req_id, &s);
    if (rc == -EMSGSIZE) {
        set_error(g, 400, g->kind == FCGI_REQ_CHAT ? "messages" : "prompt",
                  "context_length_exceeded", "the prompt is larger than the engine accepts");
    } else if (rc == -EINVAL) {
        set_error(g, 400, NULL, NULL, "the request's parameters are out of the engine's range");
    } else if (rc < 0) {
        set_error(g, 503, NULL, NULL, "the engine connection was lost");
        g->err_retry_s = 1;
    }
    if (rc < 0)
        return rc;
    uint64_t now = cm_now_ns();
    g->last_event_ns = now;
    if (s.deadline_ms)
        g->hard_deadline_ns = now + ((uint64_t)s.deadline_ms + DEADLINE_GRACE_MS) * NS_PER_MS;
    return 0;
}

/* Parse, connect, check the model, render, build the pipeline and SUBMIT. Returns 0, or < 0 with
 * g->err_* set. */
static int
prepare(struct gen *g, const struct fcgi_http *h)
{
    struct fcgi_req_error e;
    char *prompt = NULL, *prefix = NULL;
    int rc = fcgi_req_parse(g->kind, h->body, h->body_len, &g->req, &e);
    if (rc < 0) {
        set_error(g, e.status, e.param, e.code, "%s", e.message);
        return rc;
    }
    g->have_req = true;
    g->streaming = g->req.stream;
    g->keep_content = !g->streaming || g->ctx->dump;
    fcgi_resp_logprobs_init(&g->lp, g->kind, g->req.top_logprobs);
    if ((rc = guards_new(g)) < 0)
        return rc;
    if ((rc = open_engine(g)) < 0)
        return rc;
    if (!model_ok(g))
        return -ENOENT;
    if (g->kind == FCGI_REQ_CHAT) {
        if ((rc = render_chat(g, &prompt, &prefix)) < 0)
            goto out;
    } else if (!(prompt = strndup(g->req.prompt, g->req.prompt_len))) {
        set_error(g, 500, NULL, NULL, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    if ((rc = pipeline_new(g, prefix)) < 0)
        goto out;
    rc = submit(g, prompt, strlen(prompt));
out:
    free(prompt);
    free(prefix);
    return rc;
}

static void
gen_fini(struct gen *g)
{
    fcgi_engine_conn_close(g->conn);
    guard_stop_free(g->stop);
    guard_toolcall_free(g->tc);
    guard_free(g->guard);
    fcgi_resp_logprobs_fini(&g->lp);
    cur_reset(&g->cur);
    for (int i = 0; i < g->n_calls; i++) {
        free(g->calls[i].name);
        free(g->calls[i].arguments);
    }
    free(g->calls);
    free(g->content.p);
    free(g->ws.p);
    if (g->have_req)
        fcgi_req_fini(&g->req);
}

int
fcgi_gen_handle(struct fcgi_ctx *ctx, struct fcgi_http *h, enum fcgi_gen_endpoint ep)
{
    struct gen g;
    memset(&g, 0, sizeof(g));
    g.ctx = ctx;
    g.h = h;
    g.kind = ep == FCGI_GEN_CHAT ? FCGI_REQ_CHAT : FCGI_REQ_COMPLETION;
    g.heartbeat_ns =
        ctx->conf.heartbeat_s > 0 ? (uint64_t)ctx->conf.heartbeat_s * 1000000000ull : 0;
    guard_utf8_init(&g.utf8);
    fcgi_resp_make_id(fcgi_resp_id_prefix(g.kind), g.id);
    const char *endpoint = ep == FCGI_GEN_CHAT ? "/v1/chat/completions" : "/v1/completions";
    int rc = 0;

    if (prepare(&g, h) < 0) {
        write_dump(&g, NULL, endpoint);
        rc = send_error_response(&g);
        goto out;
    }
    g.meta = (struct fcgi_resp_meta){.kind = g.kind,
                                     .id = g.id,
                                     .created = (int64_t)time(NULL),
                                     .model = g.model,
                                     .fingerprint = ctx->fingerprint[0] ? ctx->fingerprint : NULL};
    rc = wait_loop(&g);
    if (rc == 0 && !g.cut.client_gone && !g.cut.error)
        rc = drain_pipeline(&g);
    if (rc < 0 && !g.cut.client_gone) { /* out of memory, or a guard module failed */
        CM_LOG(CM_LOG_ERROR, "generation failed req=%llu rc=%d", (unsigned long long)g.req_id, rc);
        set_error(&g, 500, NULL, NULL, "internal error");
        g.cut.error = true;
    }
    if (g.usage.completion_tokens == 0 && !g.cut.have_done)
        g.usage.completion_tokens = g.n_tokens;
    struct fcgi_resp_finish fin;
    fcgi_resp_finish_of(&g.cut, &fin);
    write_dump(&g, &fin, endpoint);
    if (g.cut.client_gone) {
        rc = -EPIPE;
        goto out;
    }
    rc = g.streaming && (g.started || !g.err_status) ? finish_stream(&g, &fin)
                                                     : finish_whole(&g, &fin);
out:
    gen_fini(&g);
    return rc;
}

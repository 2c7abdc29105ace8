/*
 * Unit tests for fcgi/fcgi_gen: the generation endpoints end to end against a fake engine peer (a
 * thread serving one connection on a temporary Unix socket: HELLO -> MODEL_INFO, SUBMIT ->
 * scripted TOKEN frames and DONE / ERROR / a close, every CANCEL recorded) with the response
 * captured by fcgi_http over memory-buffer ops. The fake never sleeps: it answers what it reads,
 * and its only timeout is a safety net that turns a missing CANCEL into a failed assertion instead
 * of a hang.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <json-c/json.h>

#include "common/cm_wire.h"
#include "fcgi/fcgi.h"
#include "fcgi/fcgi_dump.h"
#include "fcgi/fcgi_engine.h"
#include "fcgi/fcgi_gen.h"
#include "fcgi/fcgi_http.h"

#define MAX_TOKS 256
#define SAFETY_MS 10000

/* ---- The fake engine ---- */

enum fake_end {
    END_DONE = 0,        /* tokens, then DONE(finish) */
    END_WAIT_CANCEL = 1, /* tokens, then wait for CANCEL, then DONE(cancelled, reason) */
    END_CLOSE = 2,       /* tokens, then close the connection */
    END_ERROR = 3,       /* ERROR(err_code) instead of anything else */
};

struct fake {
    /* script */
    const char *toks[MAX_TOKS];
    size_t tok_len[MAX_TOKS]; /* 0: strlen */
    int n_toks;
    bool logprobs_in_tokens;
    enum fake_end end;
    enum cm_wire_finish finish;
    int err_code;
    uint32_t retry_after_ms;
    const char *chat_family;
    int wait_fd;            /* > 0: send nothing after SUBMIT until this fd is readable */
    const char *done_guard; /* END_DONE: DONE's guard (an engine-side trip: token_loop) */
    /* recorded */
    char *prompt;
    struct cm_wire_submit sub;
    bool got_submit;
    char cancels[4][CM_WIRE_MAX_NAME + 1];
    int n_cancels;
    bool safety_fired;
    /* plumbing */
    char dir[64];
    char path[96];
    int lfd;
    int stop_pipe[2]; /* written by fake_stop: no connection will come */
    pthread_t th;
};

static void
send_buf(int fd, struct cm_wire_buf *b)
{
    while (cm_wire_buf_pending(b) > 0) {
        ssize_t n = cm_wire_buf_write_fd(b, fd);
        if (n < 0)
            break;
    }
}

/* Reads one frame (blocking, bounded by SAFETY_MS). Returns 1, 0 at EOF or on timeout. */
static int
read_frame(struct fake *fk, int fd, struct cm_wire_reader *rd, struct cm_wire_frame *f)
{
    for (;;) {
        int rc = cm_wire_reader_next(rd, f);
        if (rc != 0)
            return rc > 0;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, SAFETY_MS) == 0) {
            fk->safety_fired = true;
            return 0;
        }
        if (cm_wire_reader_read_fd(rd, fd) <= 0)
            return 0;
    }
}

static void
send_script(struct fake *fk, int fd, uint64_t req_id)
{
    struct cm_wire_buf b;
    cm_wire_buf_init(&b, 0);
    if (fk->end == END_ERROR) {
        struct cm_wire_error e = {.code = fk->err_code, .retry_after_ms = fk->retry_after_ms};
        snprintf(e.message, sizeof(e.message), "scripted error");
        cm_wire_encode_error(&b, req_id, &e);
        send_buf(fd, &b);
        cm_wire_buf_fini(&b);
        return;
    }
    struct cm_wire_accepted a = {.prompt_tokens = 11, .cached_tokens = 3};
    cm_wire_encode_accepted(&b, req_id, &a);
    for (int i = 0; i < fk->n_toks; i++) {
        struct cm_wire_token t = {.id = 100 + i};
        size_t n = fk->tok_len[i] ? fk->tok_len[i] : strlen(fk->toks[i]);
        memcpy(t.text, fk->toks[i], n);
        t.text_len = (uint32_t)n;
        if (fk->logprobs_in_tokens) {
            t.flags = CM_WIRE_TOKEN_LOGPROB;
            t.logprob = -0.5f;
            t.n_top = 1;
            t.top_ids[0] = t.id;
            t.top_logprobs[0] = -0.5f;
        }
        cm_wire_encode_token(&b, req_id, &t);
    }
    if (fk->end == END_DONE) {
        struct cm_wire_done d = {.finish = fk->finish,
                                 .prompt_tokens = 11,
                                 .completion_tokens = (uint32_t)fk->n_toks,
                                 .cached_tokens = 3};
        if (fk->done_guard)
            snprintf(d.guard, sizeof(d.guard), "%s", fk->done_guard);
        cm_wire_encode_done(&b, req_id, &d);
    }
    send_buf(fd, &b);
    cm_wire_buf_fini(&b);
}

static void
serve(struct fake *fk, int fd)
{
    struct cm_wire_reader rd;
    struct cm_wire_buf b;
    struct cm_wire_frame f;
    char err[CM_WIRE_ERR_LEN];
    cm_wire_reader_init(&rd, 0);
    cm_wire_buf_init(&b, 0);
    if (!read_frame(fk, fd, &rd, &f) || f.type != CM_WIRE_HELLO)
        goto out;
    struct cm_wire_model_info mi;
    cm_wire_model_info_init(&mi);
    snprintf(mi.model, sizeof(mi.model), "smol");
    mi.n_ctx = 2048;
    mi.n_vocab = 49152;
    cm_chat_family_parse(fk->chat_family ? fk->chat_family : "chatml", &mi.chat_family);
    cm_wire_encode_model_info(&b, 0, &mi);
    send_buf(fd, &b);
    if (!read_frame(fk, fd, &rd, &f) || f.type != CM_WIRE_SUBMIT)
        goto out;
    uint64_t req_id = f.req_id;
    if (cm_wire_decode_submit(&f, &fk->sub, err, sizeof(err)) == 0) {
        fk->got_submit = true;
        fk->prompt = strdup(fk->sub.prompt ? fk->sub.prompt : "");
    }
    if (fk->wait_fd > 0) {
        struct pollfd wp = {.fd = fk->wait_fd, .events = POLLIN};
        if (poll(&wp, 1, SAFETY_MS) == 0)
            fk->safety_fired = true;
    }
    send_script(fk, fd, req_id);
    if (fk->end == END_CLOSE || fk->end == END_ERROR)
        goto out;
    /* Record every CANCEL until the worker closes; answer the first with DONE when waiting. */
    bool done_sent = fk->end == END_DONE;
    for (;;) {
        if (!read_frame(fk, fd, &rd, &f)) {
            if (fk->safety_fired && !done_sent) {
                struct cm_wire_done d = {.finish = CM_WIRE_FINISH_EOS};
                cm_wire_encode_done(&b, req_id, &d);
                send_buf(fd, &b);
                done_sent = true;
                fk->safety_fired = false;
                continue;
            }
            break;
        }
        struct cm_wire_cancel c;
        if (f.type != CM_WIRE_CANCEL || cm_wire_decode_cancel(&f, &c, err, sizeof(err)) < 0)
            continue;
        if (fk->n_cancels < 4)
            snprintf(fk->cancels[fk->n_cancels++], sizeof(fk->cancels[0]), "%s", c.reason);
        if (!done_sent) {
            struct cm_wire_done d = {.finish = CM_WIRE_FINISH_CANCELLED,
                                     .prompt_tokens = 11,
                                     .completion_tokens = (uint32_t)fk->n_toks};
            snprintf(d.guard, sizeof(d.guard), "%s", c.reason);
            cm_wire_encode_done(&b, req_id, &d);
            send_buf(fd, &b);
            done_sent = true;
        }
    }
out:
    cm_wire_reader_fini(&rd);
    cm_wire_buf_fini(&b);
}

static void *
fake_thread(void *arg)
{
    struct fake *fk = arg;
    struct pollfd p[2] = {{.fd = fk->lfd, .events = POLLIN},
                          {.fd = fk->stop_pipe[0], .events = POLLIN}};
    if (poll(p, 2, SAFETY_MS) <= 0 || !(p[0].revents & POLLIN))
        return NULL;
    int fd = accept(fk->lfd, NULL, NULL);
    if (fd < 0)
        return NULL;
    serve(fk, fd);
    close(fd);
    return NULL;
}

static void
fake_start(struct fake *fk)
{
    snprintf(fk->dir, sizeof(fk->dir), "/tmp/test_fcgi_gen.XXXXXX");
    assert_non_null(mkdtemp(fk->dir));
    snprintf(fk->path, sizeof(fk->path), "%s/engine.sock", fk->dir);
    fk->lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_true(fk->lfd >= 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", fk->path);
    assert_int_equal(bind(fk->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(fk->lfd, 4), 0);
    assert_int_equal(pipe(fk->stop_pipe), 0);
    assert_int_equal(pthread_create(&fk->th, NULL, fake_thread, fk), 0);
}

static void
fake_stop(struct fake *fk)
{
    assert_int_equal(write(fk->stop_pipe[1], "s", 1), 1);
    pthread_join(fk->th, NULL);
    close(fk->stop_pipe[0]);
    close(fk->stop_pipe[1]);
    close(fk->lfd);
    unlink(fk->path);
    rmdir(fk->dir);
}

/* ---- The response side ---- */

struct out {
    char *data;
    size_t len, cap;
    int n_flushes;
    int fail_flush_at; /* fail this flush and every later one (1-based); 0: never */
    int notify_fd;     /* > 0: a byte is written here when a ": keep-alive" comment is written */
};

static int
out_write(void *io, const void *data, size_t n)
{
    struct out *o = io;
    if (o->len + n + 1 > o->cap) {
        o->cap = (o->len + n + 1) * 2;
        o->data = realloc(o->data, o->cap);
        assert_non_null(o->data);
    }
    memcpy(o->data + o->len, data, n);
    o->len += n;
    o->data[o->len] = 0;
    if (o->notify_fd > 0 && n >= 2 && memcmp(data, ": ", 2) == 0)
        assert_int_equal(write(o->notify_fd, "k", 1), 1);
    return 0;
}

static int
out_flush(void *io)
{
    struct out *o = io;
    o->n_flushes++;
    return o->fail_flush_at && o->n_flushes >= o->fail_flush_at ? -EPIPE : 0;
}

static const struct fcgi_http_ops out_ops = {.write = out_write, .flush = out_flush};

struct run {
    struct fake fk;
    struct fcgi_ctx ctx;
    struct out out;
    int rc;
    int status;
    const char *headers; /* into out.data */
    const char *body;
    /* SSE */
    struct json_object *events[512];
    int n_events;
    bool done_last; /* "data: [DONE]" is the last event */
};

static void
parse_sse(struct run *r)
{
    const char *p = r->body;
    while (p && *p) {
        const char *end = strstr(p, "\n\n");
        assert_non_null(end);
        if (strncmp(p, "data: [DONE]\n\n", 14) == 0) {
            r->done_last = true;
        } else if (strncmp(p, "data: ", 6) == 0) {
            r->done_last = false;
            char *s = strndup(p + 6, (size_t)(end - p - 6));
            struct json_object *o = json_tokener_parse(s);
            free(s);
            assert_non_null(o);
            assert_true(r->n_events < 512);
            r->events[r->n_events++] = o;
        }
        p = end + 2;
    }
}

/* Runs one request against the scripted fake. */
static void
run(struct run *r, enum fcgi_gen_endpoint ep, const char *body)
{
    fake_start(&r->fk);
    r->ctx.conf.request_timeout_s = 0;
    atomic_store(&r->ctx.next_req_id, 1);
    snprintf(r->ctx.fingerprint, sizeof(r->ctx.fingerprint), "llm-fcgi-test");
    assert_int_equal(fcgi_engine_new(r->fk.path, 5000, &r->ctx.engine), 0);
    struct fcgi_http h;
    fcgi_http_init(&h, &out_ops, &r->out, &r->ctx.conf);
    h.method = strdup("POST");
    h.body = strdup(body);
    h.body_len = strlen(body);
    r->rc = fcgi_gen_handle(&r->ctx, &h, ep);
    r->status = h.status;
    fcgi_http_fini(&h);
    fake_stop(&r->fk);
    fcgi_engine_free(r->ctx.engine);
    if (r->out.data) {
        char *sep = strstr(r->out.data, "\r\n\r\n");
        assert_non_null(sep);
        *sep = 0;
        r->headers = r->out.data;
        r->body = sep + 4;
        if (strstr(r->headers, "text/event-stream"))
            parse_sse(r);
    }
}

static void
run_free(struct run *r)
{
    for (int i = 0; i < r->n_events; i++)
        json_object_put(r->events[i]);
    free(r->out.data);
    free(r->fk.prompt);
    cm_wire_submit_fini(&r->fk.sub);
}

static struct json_object *
at(struct json_object *o, const char *path)
{
    char key[64];
    const char *p = path;
    while (o && *p) {
        if (*p == '.') {
            p++;
            continue;
        }
        if (*p == '[') {
            if (json_object_get_type(o) != json_type_array)
                return NULL;
            o = json_object_array_get_idx(o, (size_t)atoi(p + 1));
            p = strchr(p, ']') + 1;
            continue;
        }
        size_t n = strcspn(p, ".[");
        memcpy(key, p, n);
        key[n] = 0;
        p += n;
        struct json_object *v = NULL;
        if (!json_object_object_get_ex(o, key, &v))
            return NULL;
        o = v;
    }
    return o;
}

static const char *
str_at(struct json_object *o, const char *path)
{
    struct json_object *v = at(o, path);
    return v && json_object_get_type(v) == json_type_string ? json_object_get_string(v) : NULL;
}

/* The concatenated content deltas of a chat stream (or text of a completion stream). */
static char *
stream_content(struct run *r, const char *field)
{
    size_t cap = 1, len = 0;
    char *s = calloc(1, 1);
    for (int i = 0; i < r->n_events; i++) {
        const char *c = str_at(r->events[i], field);
        if (!c)
            continue;
        size_t n = strlen(c);
        s = realloc(s, cap += n);
        memcpy(s + len, c, n + 1);
        len += n;
    }
    return s;
}

/* The final chunk: the last event with a non-null finish_reason. */
static struct json_object *
final_chunk(struct run *r)
{
    for (int i = r->n_events - 1; i >= 0; i--)
        if (str_at(r->events[i], "choices[0].finish_reason"))
            return r->events[i];
    return NULL;
}

#define CHAT_BODY(extra)                                                                           \
    "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]" extra "}"

#define TOOLS                                                                                      \
    ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":"    \
    "{\"type\":\"object\"}}},{\"type\":\"function\",\"function\":{\"name\":\"get_time\"}}]"

/* ---- Content ---- */

static void
test_fcgi_gen_stream_content(void **state)
{
    (void)state;
    struct run r = {0};
    r.fk.toks[0] = "Hel";
    r.fk.toks[1] = "lo";
    r.fk.toks[2] = " world";
    r.fk.n_toks = 3;
    r.fk.finish = CM_WIRE_FINISH_EOS;
    run(&r, FCGI_GEN_CHAT,
        CHAT_BODY(",\"stream\":true,\"stream_options\":{\"include_usage\":true},"
                  "\"temperature\":0,\"max_tokens\":7,\"seed\":5"));
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.headers, "Cache-Control: no-cache"));
    assert_non_null(strstr(r.headers, "X-Accel-Buffering: no"));
    assert_true(r.done_last);
    assert_true(r.n_events >= 4);
    assert_string_equal(str_at(r.events[0], "choices[0].delta.role"), "assistant");
    const char *id = str_at(r.events[0], "id");
    assert_non_null(id);
    assert_int_equal(strncmp(id, "chatcmpl-", 9), 0);
    for (int i = 0; i < r.n_events; i++)
        assert_string_equal(str_at(r.events[i], "id"), id);
    char *content = stream_content(&r, "choices[0].delta.content");
    assert_string_equal(content, "Hello world");
    free(content);
    struct json_object *fin = final_chunk(&r);
    assert_non_null(fin);
    assert_string_equal(str_at(fin, "choices[0].finish_reason"), "stop");
    assert_null(at(fin, "choices[0].stop_reason"));
    struct json_object *usage = r.events[r.n_events - 1];
    assert_int_equal(json_object_array_length(at(usage, "choices")), 0);
    assert_int_equal(json_object_get_int(at(usage, "usage.prompt_tokens")), 11);
    assert_int_equal(json_object_get_int(at(usage, "usage.completion_tokens")), 3);
    assert_int_equal(json_object_get_int(at(usage, "usage.prompt_tokens_details.cached_tokens")),
                     3);
    /* the SUBMIT: ChatML prompt, parameters mapped */
    assert_true(r.fk.got_submit);
    assert_string_equal(r.fk.prompt, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    assert_int_equal(r.fk.sub.max_tokens, 7);
    assert_float_equal(r.fk.sub.sampling.temperature, 0.0f, 0);
    assert_int_equal(r.fk.sub.sampling.seed, 5);
    assert_true(r.fk.sub.parse_special);
    assert_true(r.fk.sub.add_special);
    assert_int_equal(r.fk.n_cancels, 0);
    run_free(&r);
}

static void
test_fcgi_gen_whole_content_length(void **state)
{
    (void)state;
    struct run r = {0};
    r.fk.toks[0] = "Hi";
    r.fk.toks[1] = " there";
    r.fk.n_toks = 2;
    r.fk.finish = CM_WIRE_FINISH_LENGTH;
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(""));
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.status, 200);
    struct json_object *o = json_tokener_parse(r.body);
    assert_non_null(o);
    assert_string_equal(str_at(o, "object"), "chat.completion");
    assert_string_equal(str_at(o, "choices[0].message.content"), "Hi there");
    assert_string_equal(str_at(o, "choices[0].finish_reason"), "length");
    assert_int_equal(json_object_get_int(at(o, "usage.total_tokens")), 13);
    assert_string_equal(str_at(o, "model"), "smol");
    /* no max_tokens given: up to the context, the engine caps */
    assert_int_equal(r.fk.sub.max_tokens, 2048);
    json_object_put(o);
    run_free(&r);
}

static void
test_fcgi_gen_utf8_split_across_tokens(void **state)
{
    (void)state;
    struct run r = {0};
    r.fk.toks[0] = "\xc3";
    r.fk.toks[1] = "\xa9t\xc3";
    r.fk.toks[2] = "\xa9";
    r.fk.toks[3] = "\xe2\x82"; /* cut off by the end of the stream: one U+FFFD */
    r.fk.n_toks = 4;
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(",\"stream\":true"));
    char *content = stream_content(&r, "choices[0].delta.content");
    assert_string_equal(content, "\xc3\xa9t\xc3\xa9\xef\xbf\xbd");
    free(content);
    /* no delta carried half a character */
    for (int i = 0; i < r.n_events; i++) {
        const char *c = str_at(r.events[i], "choices[0].delta.content");
        if (c && c[0])
            assert_true((unsigned char)c[0] < 0x80 || (unsigned char)c[0] >= 0xc0);
    }
    run_free(&r);
}

/* ---- Stop strings ---- */

static void
test_fcgi_gen_stop_string_split_cancels(void **state)
{
    (void)state;
    for (int streaming = 0; streaming < 2; streaming++) {
        struct run r = {0};
        r.fk.toks[0] = "abc E";
        r.fk.toks[1] = "N";
        r.fk.toks[2] = "D more";
        r.fk.toks[3] = " text";
        r.fk.n_toks = 4;
        r.fk.end = END_WAIT_CANCEL;
        run(&r, FCGI_GEN_CHAT,
            streaming ? CHAT_BODY(",\"stream\":true,\"stop\":[\"xyz\",\"END\"]")
                      : CHAT_BODY(",\"stop\":\"END\""));
        assert_int_equal(r.rc, 0);
        assert_false(r.fk.safety_fired);
        assert_int_equal(r.fk.n_cancels, 1);
        assert_string_equal(r.fk.cancels[0], "stop_string");
        assert_int_equal(atomic_load(&r.ctx.counters.stop_string_matches), 1);
        assert_null(strstr(r.body, "END"));
        assert_null(strstr(r.body, "more"));
        if (streaming) {
            char *content = stream_content(&r, "choices[0].delta.content");
            assert_string_equal(content, "abc ");
            free(content);
            struct json_object *fin = final_chunk(&r);
            assert_string_equal(str_at(fin, "choices[0].finish_reason"), "stop");
            assert_string_equal(str_at(fin, "choices[0].stop_reason"), "stop_string");
            assert_true(r.done_last);
        } else {
            struct json_object *o = json_tokener_parse(r.body);
            assert_string_equal(str_at(o, "choices[0].message.content"), "abc ");
            assert_string_equal(str_at(o, "choices[0].finish_reason"), "stop");
            json_object_put(o);
        }
        run_free(&r);
    }
}

/* ---- Tool calls ---- */

static const char call_text[] =
    "Let me look.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", "
    "\"days\": [1, 2]}}\n</tool_call>";

/* Splits text into tokens of k bytes (the script keeps pointers into text). */
static void
script_split(struct fake *fk, const char *text, size_t k)
{
    size_t n = strlen(text);
    fk->n_toks = 0;
    for (size_t off = 0; off < n; off += k) {
        assert_true(fk->n_toks < MAX_TOKS);
        fk->toks[fk->n_toks] = text + off;
        fk->tok_len[fk->n_toks] = off + k <= n ? k : n - off;
        fk->n_toks++;
    }
}

/* The tool calls of a stream, reassembled as a client does: by index, name from the head, the
 * arguments concatenated. Returns the number of calls. */
static int
stream_calls(struct run *r, char names[4][64], char args[4][256], char ids[4][64])
{
    int n = 0;
    for (int i = 0; i < 4; i++)
        names[i][0] = args[i][0] = ids[i][0] = 0;
    for (int e = 0; e < r->n_events; e++) {
        struct json_object *tcs = at(r->events[e], "choices[0].delta.tool_calls");
        if (!tcs)
            continue;
        for (size_t j = 0; j < json_object_array_length(tcs); j++) {
            struct json_object *tc = json_object_array_get_idx(tcs, j);
            int idx = json_object_get_int(at(tc, "index"));
            assert_true(idx >= 0 && idx < 4);
            if (idx + 1 > n)
                n = idx + 1;
            if (str_at(tc, "id")) {
                assert_string_equal(str_at(tc, "type"), "function");
                snprintf(ids[idx], 64, "%s", str_at(tc, "id"));
                snprintf(names[idx], 64, "%s", str_at(tc, "function.name"));
            }
            const char *a = str_at(tc, "function.arguments");
            if (a)
                strncat(args[idx], a, 255 - strlen(args[idx]));
        }
    }
    return n;
}

static void
test_fcgi_gen_tool_call_any_split(void **state)
{
    (void)state;
    for (size_t k = 1; k <= 13; k++) {
        struct run r = {0};
        script_split(&r.fk, call_text, k);
        run(&r, FCGI_GEN_CHAT, CHAT_BODY(",\"stream\":true" TOOLS));
        assert_int_equal(r.rc, 0);
        char names[4][64], args[4][256], ids[4][64];
        assert_int_equal(stream_calls(&r, names, args, ids), 1);
        assert_string_equal(names[0], "get_weather");
        assert_int_equal(strncmp(ids[0], "call_", 5), 0);
        struct json_object *a = json_tokener_parse(args[0]);
        if (!a)
            fail_msg("split %zu: arguments '%s' are not JSON", k, args[0]);
        assert_string_equal(str_at(a, "city"), "Paris");
        assert_int_equal(json_object_array_length(at(a, "days")), 2);
        json_object_put(a);
        char *content = stream_content(&r, "choices[0].delta.content");
        assert_string_equal(content, "Let me look.");
        free(content);
        struct json_object *fin = final_chunk(&r);
        assert_string_equal(str_at(fin, "choices[0].finish_reason"), "tool_calls");
        assert_true(r.done_last);
        /* the system prompt told the model about the tools */
        assert_non_null(strstr(r.fk.prompt, "<tools>"));
        assert_non_null(strstr(r.fk.prompt, "get_weather"));
        assert_int_equal(atomic_load(&r.ctx.counters.tool_calls), 1);
        run_free(&r);
    }
}

static void
test_fcgi_gen_two_calls_invalid_dropped(void **state)
{
    (void)state;
    static const char text[] =
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": }\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}\n"
        "</tool_call>";
    for (int streaming = 0; streaming < 2; streaming++) {
        struct run r = {0};
        script_split(&r.fk, text, 5);
        run(&r, FCGI_GEN_CHAT, streaming ? CHAT_BODY(",\"stream\":true" TOOLS) : CHAT_BODY(TOOLS));
        assert_int_equal(r.rc, 0);
        assert_int_equal(atomic_load(&r.ctx.counters.tool_calls), 2);
        assert_int_equal(atomic_load(&r.ctx.counters.tool_calls_invalid), 2);
        if (streaming) {
            char names[4][64], args[4][256], ids[4][64];
            assert_int_equal(stream_calls(&r, names, args, ids), 2);
            assert_string_equal(names[0], "get_weather");
            assert_string_equal(names[1], "get_time");
            assert_string_not_equal(ids[0], ids[1]);
            struct json_object *a = json_tokener_parse(args[1]);
            assert_non_null(a);
            assert_string_equal(str_at(a, "tz"), "UTC");
            json_object_put(a);
            assert_string_equal(str_at(final_chunk(&r), "choices[0].finish_reason"), "tool_calls");
        } else {
            struct json_object *o = json_tokener_parse(r.body);
            assert_non_null(o);
            assert_null(at(o, "choices[0].message.content"));
            assert_int_equal(json_object_array_length(at(o, "choices[0].message.tool_calls")), 2);
            assert_string_equal(str_at(o, "choices[0].message.tool_calls[1].function.name"),
                                "get_time");
            struct json_object *a = json_tokener_parse(
                str_at(o, "choices[0].message.tool_calls[0].function.arguments"));
            assert_string_equal(str_at(a, "city"), "Oslo");
            json_object_put(a);
            assert_string_equal(str_at(o, "choices[0].finish_reason"), "tool_calls");
            json_object_put(o);
        }
        run_free(&r);
    }
}

static void
test_fcgi_gen_tool_choice_forced_and_none(void **state)
{
    (void)state;
    /* named: the prompt ends with the opener and the name; the model writes the rest */
    struct run r = {0};
    r.fk.toks[0] = "{\"city\": ";
    r.fk.toks[1] = "\"Rome\"}}\n</tool_call>";
    r.fk.n_toks = 2;
    run(&r, FCGI_GEN_CHAT,
        CHAT_BODY(TOOLS ",\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":"
                        "\"get_weather\"}}"));
    const char *suffix = "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", "
                         "\"arguments\": ";
    size_t lp = strlen(r.fk.prompt), ls = strlen(suffix);
    assert_true(lp > ls);
    assert_string_equal(r.fk.prompt + lp - ls, suffix);
    struct json_object *o = json_tokener_parse(r.body);
    assert_non_null(o);
    assert_null(at(o, "choices[0].message.content"));
    assert_string_equal(str_at(o, "choices[0].message.tool_calls[0].function.name"), "get_weather");
    assert_string_equal(str_at(o, "choices[0].finish_reason"), "tool_calls");
    json_object_put(o);
    run_free(&r);

    /* required: the opener only */
    struct run q = {0};
    q.fk.toks[0] = "get_time\", \"arguments\": {}}\n</tool_call>";
    q.fk.n_toks = 1;
    run(&q, FCGI_GEN_CHAT, CHAT_BODY(TOOLS ",\"tool_choice\":\"required\",\"stream\":true"));
    assert_non_null(strstr(q.fk.prompt, "assistant\n<tool_call>\n{\"name\": \""));
    char names[4][64], args[4][256], ids[4][64];
    assert_int_equal(stream_calls(&q, names, args, ids), 1);
    assert_string_equal(names[0], "get_time");
    assert_string_equal(args[0], "{}");
    run_free(&q);

    /* required with a single declared tool: that tool is named in the opener */
    struct run one = {0};
    one.fk.toks[0] = "{\"city\": \"Oslo\"}}\n</tool_call>";
    one.fk.n_toks = 1;
    run(&one, FCGI_GEN_CHAT,
        CHAT_BODY(",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\"}}],"
                  "\"tool_choice\":\"required\""));
    lp = strlen(one.fk.prompt);
    assert_true(lp > ls);
    assert_string_equal(one.fk.prompt + lp - ls, suffix);
    o = json_tokener_parse(one.body);
    assert_string_equal(str_at(o, "choices[0].message.tool_calls[0].function.name"), "get_weather");
    json_object_put(o);
    run_free(&one);

    /* none: tools not rendered, a <tool_call> in the text is plain content */
    struct run n = {0};
    n.fk.toks[0] = "<tool_call>x</tool_call>";
    n.fk.n_toks = 1;
    run(&n, FCGI_GEN_CHAT, CHAT_BODY(TOOLS ",\"tool_choice\":\"none\""));
    assert_null(strstr(n.fk.prompt, "<tools>"));
    o = json_tokener_parse(n.body);
    assert_string_equal(str_at(o, "choices[0].message.content"), "<tool_call>x</tool_call>");
    assert_string_equal(str_at(o, "choices[0].finish_reason"), "stop");
    json_object_put(o);
    run_free(&n);
}

/* ---- Engine errors ---- */

static void
test_fcgi_gen_engine_eagain_429(void **state)
{
    (void)state;
    struct run r = {0};
    r.fk.end = END_ERROR;
    r.fk.err_code = -EAGAIN;
    r.fk.retry_after_ms = 2500;
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(",\"stream\":true"));
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.status, 429);
    assert_non_null(strstr(r.headers, "Retry-After: 3"));
    struct json_object *o = json_tokener_parse(r.body);
    assert_non_null(o);
    assert_string_equal(str_at(o, "error.type"), "rate_limit_exceeded");
    json_object_put(o);
    run_free(&r);
}

static void
test_fcgi_gen_engine_e2big_400(void **state)
{
    (void)state;
    struct run r = {0};
    r.fk.end = END_ERROR;
    r.fk.err_code = -E2BIG;
    run(&r, FCGI_GEN_COMPLETION, "{\"prompt\":\"long\",\"stream\":true}");
    assert_int_equal(r.status, 400);
    struct json_object *o = json_tokener_parse(r.body);
    assert_string_equal(str_at(o, "error.type"), "invalid_request_error");
    assert_string_equal(str_at(o, "error.code"), "context_length_exceeded");
    assert_string_equal(str_at(o, "error.param"), "prompt");
    json_object_put(o);
    run_free(&r);
}

static void
test_fcgi_gen_engine_closes_mid_stream(void **state)
{
    (void)state;
    struct run r = {0};
    r.fk.toks[0] = "partial";
    r.fk.n_toks = 1;
    r.fk.end = END_CLOSE;
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(",\"stream\":true"));
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.status, 200);
    assert_true(r.done_last);
    int err_at = -1;
    for (int i = 0; i < r.n_events; i++)
        if (at(r.events[i], "error"))
            err_at = i;
    assert_true(err_at > 0);
    assert_string_equal(str_at(r.events[err_at], "error.type"), "server_error");
    struct json_object *fin = final_chunk(&r);
    assert_non_null(fin);
    assert_ptr_equal(fin, r.events[err_at + 1]);
    assert_string_equal(str_at(fin, "choices[0].finish_reason"), "length");
    assert_string_equal(str_at(fin, "choices[0].stop_reason"), "error");
    run_free(&r);

    /* not streaming: a 503 */
    struct run q = {0};
    q.fk.toks[0] = "partial";
    q.fk.n_toks = 1;
    q.fk.end = END_CLOSE;
    run(&q, FCGI_GEN_CHAT, CHAT_BODY(""));
    assert_int_equal(q.status, 503);
    assert_null(strstr(q.body, "partial"));
    run_free(&q);
}

/* The engine cancels on its own (shutdown past the grace period, a stuck reader): an error, not
 * a finished answer; an engine-side guard (token_loop) is not such a cut. */
static void
test_fcgi_gen_engine_cut_is_an_error(void **state)
{
    (void)state;
    struct run r = {0};
    r.fk.toks[0] = "partial";
    r.fk.n_toks = 1;
    r.fk.finish = CM_WIRE_FINISH_CANCELLED;
    r.fk.done_guard = "shutdown";
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(",\"stream\":true"));
    assert_int_equal(r.status, 200);
    assert_true(r.done_last);
    int err_at = -1;
    for (int i = 0; i < r.n_events; i++)
        if (at(r.events[i], "error"))
            err_at = i;
    assert_true(err_at > 0);
    assert_non_null(strstr(str_at(r.events[err_at], "error.message"), "shutdown"));
    struct json_object *fin = final_chunk(&r);
    assert_ptr_equal(fin, r.events[err_at + 1]);
    assert_string_equal(str_at(fin, "choices[0].finish_reason"), "length");
    run_free(&r);

    struct run q = {0};
    q.fk.toks[0] = "partial";
    q.fk.n_toks = 1;
    q.fk.finish = CM_WIRE_FINISH_CANCELLED;
    q.fk.done_guard = "slow_reader";
    run(&q, FCGI_GEN_CHAT, CHAT_BODY(""));
    assert_int_equal(q.status, 503);
    assert_null(strstr(q.body, "partial"));
    run_free(&q);
}

static void
test_fcgi_gen_engine_down_503(void **state)
{
    (void)state;
    struct fcgi_ctx ctx;
    memset(&ctx, 0, sizeof(ctx));
    assert_int_equal(fcgi_engine_new("/nonexistent/engine.sock", 1000, &ctx.engine), 0);
    struct out o = {0};
    struct fcgi_http h;
    fcgi_http_init(&h, &out_ops, &o, &ctx.conf);
    h.body = strdup(CHAT_BODY(""));
    h.body_len = strlen(h.body);
    assert_int_equal(fcgi_gen_handle(&ctx, &h, FCGI_GEN_CHAT), 0);
    assert_int_equal(h.status, 503);
    assert_non_null(strstr(o.data, "Retry-After: "));
    assert_non_null(strstr(o.data, "server_error"));
    assert_int_equal(atomic_load(&ctx.counters.engine_unavailable), 1);
    fcgi_http_fini(&h);
    fcgi_engine_free(ctx.engine);
    free(o.data);
}

/* ---- Client side ---- */

static void
test_fcgi_gen_client_gone_cancels(void **state)
{
    (void)state;
    struct run r = {0};
    for (int i = 0; i < 8; i++)
        r.fk.toks[i] = "word ";
    r.fk.n_toks = 8;
    r.fk.end = END_WAIT_CANCEL;
    r.out.fail_flush_at = 3; /* headers + role chunk, one delta, then the client is gone */
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(",\"stream\":true"));
    assert_int_equal(r.rc, -EPIPE);
    assert_false(r.fk.safety_fired);
    assert_int_equal(r.fk.n_cancels, 1);
    assert_string_equal(r.fk.cancels[0], "client_disconnect");
    assert_int_equal(atomic_load(&r.ctx.counters.client_disconnects), 1);
    run_free(&r);
}

static void
test_fcgi_gen_bad_request_and_model(void **state)
{
    (void)state;
    struct run r = {0};
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(",\"temperature\":9"));
    assert_int_equal(r.status, 400);
    struct json_object *o = json_tokener_parse(r.body);
    assert_string_equal(str_at(o, "error.param"), "temperature");
    assert_string_equal(str_at(o, "error.type"), "invalid_request_error");
    json_object_put(o);
    assert_false(r.fk.got_submit);
    run_free(&r);

    struct run m = {0};
    run(&m, FCGI_GEN_CHAT,
        "{\"model\":\"gpt-9\",\"messages\":[{\"role\":\"user\",\"content\":"
        "\"x\"}]}");
    assert_int_equal(m.status, 404);
    o = json_tokener_parse(m.body);
    assert_string_equal(str_at(o, "error.code"), "model_not_found");
    json_object_put(o);
    assert_false(m.fk.got_submit);
    run_free(&m);

    /* tools with a family that has no tool format */
    struct run t = {0};
    t.fk.chat_family = "llama2";
    run(&t, FCGI_GEN_CHAT, CHAT_BODY(TOOLS));
    assert_int_equal(t.status, 400);
    o = json_tokener_parse(t.body);
    assert_string_equal(str_at(o, "error.param"), "tools");
    json_object_put(o);
    run_free(&t);
}

/* ---- Completions ---- */

static void
test_fcgi_gen_completion_stream_logprobs(void **state)
{
    (void)state;
    struct run r = {0};
    r.fk.toks[0] = "Once";
    r.fk.toks[1] = " upon";
    r.fk.n_toks = 2;
    r.fk.logprobs_in_tokens = true;
    r.fk.finish = CM_WIRE_FINISH_LENGTH;
    run(&r, FCGI_GEN_COMPLETION, "{\"prompt\":\"Tell\",\"stream\":true,\"logprobs\":1}");
    assert_int_equal(r.status, 200);
    assert_true(r.fk.sub.logprobs);
    assert_int_equal(r.fk.sub.top_logprobs, 1);
    assert_string_equal(r.fk.prompt, "Tell");
    assert_string_equal(str_at(r.events[0], "object"), "text_completion");
    assert_int_equal(strncmp(str_at(r.events[0], "id"), "cmpl-", 5), 0);
    char *text = stream_content(&r, "choices[0].text");
    assert_string_equal(text, "Once upon");
    free(text);
    int n_lp = 0;
    for (int i = 0; i < r.n_events; i++) {
        struct json_object *t = at(r.events[i], "choices[0].logprobs.tokens");
        if (t)
            n_lp += (int)json_object_array_length(t);
    }
    assert_int_equal(n_lp, 2);
    assert_string_equal(str_at(final_chunk(&r), "choices[0].finish_reason"), "length");
    assert_true(r.done_last);
    run_free(&r);
}

static void
test_fcgi_gen_chat_logprobs_whole(void **state)
{
    (void)state;
    struct run r = {0};
    r.fk.toks[0] = "A";
    r.fk.toks[1] = "B";
    r.fk.n_toks = 2;
    r.fk.logprobs_in_tokens = true;
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(",\"logprobs\":true,\"top_logprobs\":1"));
    struct json_object *o = json_tokener_parse(r.body);
    assert_non_null(o);
    assert_int_equal(json_object_array_length(at(o, "choices[0].logprobs.content")), 2);
    assert_string_equal(str_at(o, "choices[0].logprobs.content[1].token"), "B");
    assert_string_equal(str_at(o, "choices[0].logprobs.content[1].top_logprobs[0].token"), "B");
    json_object_put(o);
    run_free(&r);
}

/* ---- Heartbeat, parallel_tool_calls, dump ---- */

/* The engine stays silent until the client has seen a keep-alive comment: with heartbeat_s 1 the
 * headers and role chunk go out after a second, the comment after the next. */
static void
test_fcgi_gen_heartbeat_while_idle(void **state)
{
    (void)state;
    int p[2];
    assert_int_equal(pipe(p), 0);
    struct run r = {0};
    r.ctx.conf.heartbeat_s = 1;
    r.out.notify_fd = p[1];
    r.fk.wait_fd = p[0];
    r.fk.toks[0] = "late";
    r.fk.n_toks = 1;
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(",\"stream\":true"));
    assert_false(r.fk.safety_fired);
    const char *hb = strstr(r.body, ": keep-alive\n\n");
    const char *late = strstr(r.body, "late");
    assert_non_null(hb);
    assert_non_null(late);
    assert_true(hb < late);
    assert_true(r.done_last);
    close(p[0]);
    close(p[1]);
    run_free(&r);
}

static void
test_fcgi_gen_parallel_tool_calls_false(void **state)
{
    (void)state;
    struct run r = {0};
    r.fk.toks[0] = "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
    r.fk.toks[1] = "<tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>";
    r.fk.n_toks = 2;
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(TOOLS ",\"parallel_tool_calls\":false"));
    struct json_object *o = json_tokener_parse(r.body);
    assert_int_equal(json_object_array_length(at(o, "choices[0].message.tool_calls")), 1);
    assert_string_equal(str_at(o, "choices[0].message.tool_calls[0].function.name"), "get_time");
    json_object_put(o);
    run_free(&r);
}

static void
test_fcgi_gen_dump_record(void **state)
{
    (void)state;
    char path[] = "/tmp/test_fcgi_gen_dump.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    unlink(path);
    struct run r = {0};
    assert_int_equal(fcgi_dump_open(path, &r.ctx.dump), 0);
    r.fk.toks[0] =
        "<tool_call>{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}</tool_call>";
    r.fk.n_toks = 1;
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(TOOLS ",\"stream\":true,\"timeout\":2"));
    assert_int_equal(r.fk.sub.deadline_ms, 2000);
    fcgi_dump_close(r.ctx.dump);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    FILE *f = fopen(path, "r");
    char line[8192];
    assert_non_null(fgets(line, sizeof(line), f));
    fclose(f);
    unlink(path);
    struct json_object *rec = json_tokener_parse(line);
    assert_non_null(rec);
    assert_string_equal(str_at(rec, "endpoint"), "/v1/chat/completions");
    assert_int_equal(strncmp(str_at(rec, "id"), "chatcmpl-", 9), 0);
    assert_string_equal(str_at(rec, "request.messages[0].content"), "hi");
    assert_string_equal(str_at(rec, "response.finish_reason"), "tool_calls");
    assert_string_equal(str_at(rec, "response.tool_calls[0].function.name"), "get_time");
    assert_string_equal(str_at(rec, "response.content"), "");
    assert_int_equal(json_object_get_int(at(rec, "response.usage.prompt_tokens")), 11);
    assert_null(at(rec, "response.error"));
    assert_string_equal(str_at(r.events[0], "id"), str_at(rec, "id"));
    json_object_put(rec);
    run_free(&r);
}

/* ---- Loop guards ---- */

#define CALL(name, args)                                                                           \
    "<tool_call>\n{\"name\": \"" name "\", \"arguments\": " args "}\n</tool_call>\n"
#define SHELL_TOOLS                                                                                \
    ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"bash\",\"parameters\":"           \
    "{\"type\":\"object\"}}},{\"type\":\"function\",\"function\":{\"name\":\"get_weather\"}}]"

/* A stream that never ends by itself: the script, then the fake waits for a CANCEL. */
static void
degenerate(struct run *r, const char *unit, int repeats)
{
    assert_true(repeats <= MAX_TOKS);
    for (int i = 0; i < repeats; i++)
        r->fk.toks[i] = unit;
    r->fk.n_toks = repeats;
    r->fk.end = END_WAIT_CANCEL;
    guard_config_init(&r->ctx.conf.guards);
}

/* The final chunk of a guard trip, then the usage chunk and [DONE]. */
static void
check_trip_stream(struct run *r, const char *guard, bool tool_loop)
{
    assert_int_equal(r->rc, 0);
    assert_int_equal(r->fk.n_cancels, 1);
    assert_string_equal(r->fk.cancels[0], guard);
    assert_false(r->fk.safety_fired);
    assert_true(r->done_last);
    struct json_object *fin = final_chunk(r);
    assert_non_null(fin);
    assert_string_equal(str_at(fin, "choices[0].finish_reason"), "length");
    assert_string_equal(str_at(fin, "choices[0].stop_reason"), guard);
    struct json_object *cap = at(fin, "choices[0].tool_loop_capped");
    if (tool_loop)
        assert_true(cap && json_object_get_boolean(cap));
    else
        assert_true(!cap || !json_object_get_boolean(cap));
    struct json_object *usage = r->events[r->n_events - 1];
    assert_non_null(at(usage, "usage"));
    assert_int_equal(json_object_get_int(at(usage, "usage.completion_tokens")), r->fk.n_toks);
}

static void
test_fcgi_gen_guard_identical_call_stream(void **state)
{
    (void)state;
    struct run r = {0};
    degenerate(&r, CALL("bash", "{\"command\": \"which cargo\"}"), 6);
    r.fk.toks[6] = "AFTER THE TRIP";
    r.fk.n_toks = 7;
    run(&r, FCGI_GEN_CHAT,
        CHAT_BODY(",\"stream\":true,\"stream_options\":{\"include_usage\":true}" SHELL_TOOLS));
    check_trip_stream(&r, "identical_call", true);
    char names[4][64], args[4][256], ids[4][64];
    /* the first call went out; the identical second one tripped and was not emitted */
    assert_int_equal(stream_calls(&r, names, args, ids), 1);
    assert_string_equal(names[0], "bash");
    char *content = stream_content(&r, "choices[0].delta.content");
    assert_string_equal(content, "");
    free(content);
    assert_int_equal(atomic_load(&r.ctx.counters.tool_calls), 1);
    run_free(&r);
}

static void
test_fcgi_gen_guard_name_run_cap_whole(void **state)
{
    (void)state;
    static const char *cities[] = {"A", "B", "C", "D", "E", "F", "G", "H", "I", "J"};
    static char calls[10][128];
    struct run r = {0};
    degenerate(&r, "", 0);
    for (int i = 0; i < 10; i++) {
        snprintf(calls[i], sizeof(calls[i]), CALL("get_weather", "{\"city\": \"%s\"}"), cities[i]);
        r.fk.toks[i] = calls[i];
    }
    r.fk.n_toks = 10;
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(SHELL_TOOLS));
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.fk.n_cancels, 1);
    assert_string_equal(r.fk.cancels[0], "name_run_cap");
    struct json_object *o = json_tokener_parse(r.body);
    assert_non_null(o);
    /* N = 8: the 8th call in a row trips and is not emitted */
    assert_int_equal(json_object_array_length(at(o, "choices[0].message.tool_calls")), 7);
    assert_string_equal(str_at(o, "choices[0].message.tool_calls[6].function.name"), "get_weather");
    assert_string_equal(str_at(o, "choices[0].finish_reason"), "length");
    assert_string_equal(str_at(o, "choices[0].stop_reason"), "name_run_cap");
    assert_true(json_object_get_boolean(at(o, "choices[0].tool_loop_capped")));
    assert_int_equal(json_object_get_int(at(o, "usage.completion_tokens")), 10);
    json_object_put(o);
    run_free(&r);
}

static void
test_fcgi_gen_guard_line_repeat_both_endpoints(void **state)
{
    (void)state;
    for (int ep = 0; ep < 2; ep++) {
        struct run r = {0};
        degenerate(&r, "The same line of text again\n", 10);
        run(&r, ep ? FCGI_GEN_COMPLETION : FCGI_GEN_CHAT,
            ep ? "{\"prompt\":\"x\",\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
               : CHAT_BODY(",\"stream\":true,\"stream_options\":{\"include_usage\":true}"));
        check_trip_stream(&r, "line_repeat", false);
        char *content = stream_content(&r, ep ? "choices[0].text" : "choices[0].delta.content");
        /* no sentence end: only line_repeat can see it; three lines went out, the fourth
         * tripped */
        assert_string_equal(content, "The same line of text again\nThe same line of text again\n"
                                     "The same line of text again\n");
        free(content);
        run_free(&r);
    }
}

static void
test_fcgi_gen_guard_sentence_loop_whole(void **state)
{
    (void)state;
    static const char *s[] = {"I will check the weather in the city for you now. ",
                              "I will check the weather in this city for you now. ",
                              "I will check the weather in that city for you now. ",
                              "I will check the weather in the city for you soon. "};
    struct run r = {0};
    degenerate(&r, "", 0);
    for (int i = 0; i < 4; i++)
        r.fk.toks[i] = s[i];
    r.fk.n_toks = 4;
    run(&r, FCGI_GEN_COMPLETION, "{\"prompt\":\"x\"}");
    assert_int_equal(r.fk.n_cancels, 1);
    assert_string_equal(r.fk.cancels[0], "sentence_loop");
    struct json_object *o = json_tokener_parse(r.body);
    assert_non_null(o);
    assert_string_equal(str_at(o, "choices[0].finish_reason"), "length");
    assert_string_equal(str_at(o, "choices[0].stop_reason"), "sentence_loop");
    assert_null(at(o, "choices[0].tool_loop_capped"));
    /* the third near-repeat trips: the first two sentences went out */
    const char *text = str_at(o, "choices[0].text");
    assert_non_null(strstr(text, s[1]));
    assert_null(strstr(text, s[2]));
    json_object_put(o);
    run_free(&r);
}

static void
test_fcgi_gen_guard_unterminated_tool_call(void **state)
{
    (void)state;
    struct run r = {0};
    degenerate(&r, "aa", 40);
    r.ctx.conf.guards.value[GUARD_UNTERMINATED_TOOL_CALL] = 20;
    r.fk.toks[0] = "Sure.<tool_call>";
    r.fk.toks[1] = "{\"name\": \"bash\", \"arguments\": {\"command\": \"";
    run(&r, FCGI_GEN_CHAT,
        CHAT_BODY(",\"stream\":true,\"stream_options\":{\"include_usage\":true}" SHELL_TOOLS));
    check_trip_stream(&r, "unterminated_tool_call", false);
    char names[4][64], args[4][256], ids[4][64];
    assert_int_equal(stream_calls(&r, names, args, ids), 0);
    char *content = stream_content(&r, "choices[0].delta.content");
    assert_string_equal(content, "Sure.");
    free(content);
    run_free(&r);
}

static void
test_fcgi_gen_guard_permanent_failure_from_history(void **state)
{
    (void)state;
    struct run r = {0};
    degenerate(&r, CALL("bash", "{\"command\": \"cargo build\"}"), 3);
    run(&r, FCGI_GEN_CHAT,
        "{\"model\":\"smol\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"build"
        "\"},{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\",\"type\":"
        "\"function\",\"function\":{\"name\":\"bash\",\"arguments\":\"{\\\"command\\\": "
        "\\\"cargo test\\\"}\"}}]},{\"role\":\"tool\",\"tool_call_id\":\"c1\",\"content\":"
        "\"sh: 1: cargo: command not found\"}]" SHELL_TOOLS "}");
    assert_int_equal(r.rc, 0);
    assert_int_equal(r.fk.n_cancels, 1);
    assert_string_equal(r.fk.cancels[0], "permanent_failure");
    char names[4][64], args[4][256], ids[4][64];
    assert_int_equal(stream_calls(&r, names, args, ids), 0);
    struct json_object *fin = final_chunk(&r);
    assert_string_equal(str_at(fin, "choices[0].finish_reason"), "length");
    assert_string_equal(str_at(fin, "choices[0].stop_reason"), "permanent_failure");
    assert_true(json_object_get_boolean(at(fin, "choices[0].tool_loop_capped")));
    assert_true(r.done_last);
    run_free(&r);
}

static void
test_fcgi_gen_guard_engine_token_loop(void **state)
{
    (void)state;
    struct run r = {0};
    guard_config_init(&r.ctx.conf.guards);
    r.ctx.conf.guards.value[GUARD_TOKEN_LOOP] = 4;
    r.fk.toks[0] = "ab";
    r.fk.n_toks = 1;
    r.fk.finish = CM_WIRE_FINISH_CANCELLED;
    r.fk.done_guard = "token_loop";
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(",\"stream\":true"));
    assert_int_equal(r.fk.sub.token_loop, 4);
    assert_int_equal(r.fk.n_cancels, 0);
    struct json_object *fin = final_chunk(&r);
    assert_string_equal(str_at(fin, "choices[0].finish_reason"), "length");
    assert_string_equal(str_at(fin, "choices[0].stop_reason"), "token_loop");
    assert_null(at(fin, "choices[0].tool_loop_capped"));
    assert_true(r.done_last);
    run_free(&r);
}

static void
test_fcgi_gen_guard_overrides(void **state)
{
    (void)state;
    /* allowed: identical_call and name_run_cap off for this request, token_loop on */
    struct run r = {0};
    degenerate(&r, CALL("bash", "{\"command\": \"ls\"}"), 3);
    r.fk.end = END_DONE;
    r.fk.finish = CM_WIRE_FINISH_EOS;
    r.ctx.conf.allow_guard_overrides = true;
    run(&r, FCGI_GEN_CHAT,
        CHAT_BODY(SHELL_TOOLS ",\"guards\":{\"identical_call\":0,\"name_run_cap\":false,"
                              "\"token_loop\":3}"));
    assert_int_equal(r.status, 200);
    assert_int_equal(r.fk.n_cancels, 0);
    assert_int_equal(r.fk.sub.token_loop, 3);
    struct json_object *o = json_tokener_parse(r.body);
    assert_int_equal(json_object_array_length(at(o, "choices[0].message.tool_calls")), 3);
    assert_string_equal(str_at(o, "choices[0].finish_reason"), "tool_calls");
    json_object_put(o);
    run_free(&r);

    /* a lower value applies */
    memset(&r, 0, sizeof(r));
    degenerate(&r, "A line that is long enough to count.\n", 5);
    r.ctx.conf.allow_guard_overrides = true;
    run(&r, FCGI_GEN_COMPLETION, "{\"prompt\":\"x\",\"guards\":{\"line_repeat\":2}}");
    assert_int_equal(r.fk.n_cancels, 1);
    assert_string_equal(r.fk.cancels[0], "line_repeat");
    o = json_tokener_parse(r.body);
    assert_string_equal(str_at(o, "choices[0].text"), "A line that is long enough to count.\n");
    json_object_put(o);
    run_free(&r);

    /* refused: raising, unknown, a bad type (400 naming guards.<key>); not allowed at all */
    static const char *bad[][3] = {
        {"{\"name_run_cap\":9}", "guards.name_run_cap", "1"},
        {"{\"line_repeat\":2,\"bogus\":1}", "guards.bogus", "1"},
        {"{\"sentence_loop\":\"x\"}", "guards.sentence_loop", "1"},
        {"{\"name_run_cap\":2}", "guards", "0"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char body[512];
        snprintf(body, sizeof(body), CHAT_BODY(",\"guards\":%s"), bad[i][0]);
        memset(&r, 0, sizeof(r));
        guard_config_init(&r.ctx.conf.guards);
        r.ctx.conf.allow_guard_overrides = bad[i][2][0] == '1';
        run(&r, FCGI_GEN_CHAT, body);
        assert_int_equal(r.status, 400);
        assert_false(r.fk.got_submit);
        o = json_tokener_parse(r.body);
        assert_non_null(o);
        if (!str_at(o, "error.param") || strcmp(str_at(o, "error.param"), bad[i][1]) != 0)
            fail_msg("%s: %s", bad[i][0], r.body);
        json_object_put(o);
        run_free(&r);
    }
}

static void
test_fcgi_gen_no_guards(void **state)
{
    (void)state;
    struct run r = {0};
    degenerate(&r, "The same line of text again\n", 10);
    r.fk.toks[10] = CALL("bash", "{\"command\": \"ls\"}");
    r.fk.toks[11] = CALL("bash", "{\"command\": \"ls\"}");
    r.fk.n_toks = 12;
    r.fk.end = END_DONE;
    r.fk.finish = CM_WIRE_FINISH_LENGTH;
    r.ctx.conf.guards.value[GUARD_TOKEN_LOOP] = 3;
    r.ctx.conf.guards.enabled = false;
    r.ctx.conf.allow_guard_overrides = true;
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(SHELL_TOOLS ",\"guards\":{\"token_loop\":3}"));
    assert_int_equal(r.status, 200);
    assert_int_equal(r.fk.sub.token_loop, 0);
    assert_int_equal(r.fk.n_cancels, 0);
    struct json_object *o = json_tokener_parse(r.body);
    assert_int_equal(json_object_array_length(at(o, "choices[0].message.tool_calls")), 2);
    assert_int_equal(strlen(str_at(o, "choices[0].message.content")), 10 * 28);
    assert_string_equal(str_at(o, "choices[0].finish_reason"), "tool_calls");
    assert_null(at(o, "choices[0].stop_reason"));
    json_object_put(o);
    run_free(&r);
}

static void
test_fcgi_gen_guard_dump_record(void **state)
{
    (void)state;
    char path[] = "/tmp/test_fcgi_gen_gdump.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    unlink(path);
    struct run r = {0};
    assert_int_equal(fcgi_dump_open(path, &r.ctx.dump), 0);
    degenerate(&r, CALL("bash", "{\"command\": \"which cargo\"}"), 4);
    run(&r, FCGI_GEN_CHAT, CHAT_BODY(SHELL_TOOLS ",\"stream\":true"));
    fcgi_dump_close(r.ctx.dump);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[8192];
    assert_non_null(fgets(line, sizeof(line), f));
    fclose(f);
    unlink(path);
    struct json_object *rec = json_tokener_parse(line);
    assert_non_null(rec);
    assert_string_equal(str_at(rec, "response.finish_reason"), "length");
    assert_string_equal(str_at(rec, "response.stop_reason"), "identical_call");
    assert_true(json_object_get_boolean(at(rec, "response.tool_loop_capped")));
    assert_int_equal(json_object_array_length(at(rec, "response.tool_calls")), 1);
    json_object_put(rec);
    run_free(&r);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fcgi_gen_stream_content),
        cmocka_unit_test(test_fcgi_gen_whole_content_length),
        cmocka_unit_test(test_fcgi_gen_utf8_split_across_tokens),
        cmocka_unit_test(test_fcgi_gen_stop_string_split_cancels),
        cmocka_unit_test(test_fcgi_gen_tool_call_any_split),
        cmocka_unit_test(test_fcgi_gen_two_calls_invalid_dropped),
        cmocka_unit_test(test_fcgi_gen_tool_choice_forced_and_none),
        cmocka_unit_test(test_fcgi_gen_engine_eagain_429),
        cmocka_unit_test(test_fcgi_gen_engine_e2big_400),
        cmocka_unit_test(test_fcgi_gen_engine_closes_mid_stream),
        cmocka_unit_test(test_fcgi_gen_engine_cut_is_an_error),
        cmocka_unit_test(test_fcgi_gen_engine_down_503),
        cmocka_unit_test(test_fcgi_gen_client_gone_cancels),
        cmocka_unit_test(test_fcgi_gen_bad_request_and_model),
        cmocka_unit_test(test_fcgi_gen_completion_stream_logprobs),
        cmocka_unit_test(test_fcgi_gen_chat_logprobs_whole),
        cmocka_unit_test(test_fcgi_gen_heartbeat_while_idle),
        cmocka_unit_test(test_fcgi_gen_parallel_tool_calls_false),
        cmocka_unit_test(test_fcgi_gen_dump_record),
        cmocka_unit_test(test_fcgi_gen_guard_identical_call_stream),
        cmocka_unit_test(test_fcgi_gen_guard_name_run_cap_whole),
        cmocka_unit_test(test_fcgi_gen_guard_line_repeat_both_endpoints),
        cmocka_unit_test(test_fcgi_gen_guard_sentence_loop_whole),
        cmocka_unit_test(test_fcgi_gen_guard_unterminated_tool_call),
        cmocka_unit_test(test_fcgi_gen_guard_permanent_failure_from_history),
        cmocka_unit_test(test_fcgi_gen_guard_engine_token_loop),
        cmocka_unit_test(test_fcgi_gen_guard_overrides),
        cmocka_unit_test(test_fcgi_gen_no_guards),
        cmocka_unit_test(test_fcgi_gen_guard_dump_record),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

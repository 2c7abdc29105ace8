/*
 * Unit tests for fcgi/fcgi_engine against a fake engine: a thread serving a temporary Unix socket
 * one connection at a time with a scripted behaviour (a well-behaved engine answering HELLO,
 * SUBMIT and STATS; garbage; a frame cut by a close; silence). The backoff runs on an injected
 * clock, so no test waits for real time to pass except the HELLO timeout (a real poll timeout).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <json-c/json.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/cm_wire.h"
#include "fcgi/fcgi_engine.h"

/* ---- Fake clock ---- */

static uint64_t fake_now_ns = 1000000000ull;

static uint64_t
fake_now(void)
{
    return fake_now_ns;
}

/* ---- Fake engine ---- */

enum fake_mode {
    FAKE_OK = 0,    /* MODEL_INFO, then SUBMIT -> ACCEPTED TOKEN DONE, STATS -> STATS_REPLY */
    FAKE_GARBAGE,   /* answers HELLO with bytes that are not a frame */
    FAKE_ERROR,     /* answers HELLO with an ERROR frame */
    FAKE_CUT_FRAME, /* MODEL_INFO, then half a TOKEN frame, then close */
    FAKE_SILENT,    /* reads HELLO, answers nothing until the client closes */
};

struct fake {
    char path[108];
    int listen_fd;
    int stop_pipe[2];
    pthread_t th;
    bool running;
    enum fake_mode mode;
    int n_accepted;
    char cancel_reason[CM_WIRE_MAX_NAME + 1];
    uint64_t submit_req_id;
};

static int
send_buf(int fd, struct cm_wire_buf *b)
{
    while (cm_wire_buf_pending(b) > 0) {
        ssize_t w = cm_wire_buf_write_fd(b, fd);
        if (w < 0)
            return (int)w;
    }
    return 0;
}

/* Blocking: the next frame, or <= 0 at end of file / error. */
static int
fake_read_frame(int fd, struct cm_wire_reader *rd, struct cm_wire_frame *f)
{
    for (;;) {
        int rc = cm_wire_reader_next(rd, f);
        if (rc != 0)
            return rc;
        ssize_t n = cm_wire_reader_read_fd(rd, fd);
        if (n <= 0)
            return (int)n;
    }
}

static void
fake_model_info(struct cm_wire_buf *b)
{
    struct cm_wire_model_info mi;
    cm_wire_model_info_init(&mi);
    snprintf(mi.model, sizeof(mi.model), "fake-model");
    mi.n_ctx = 2048;
    mi.n_vocab = 1000;
    mi.chat_family = CM_CHAT_CHATML;
    mi.default_system = "be brief";
    cm_wire_encode_model_info(b, 0, &mi);
}

static void
fake_serve_ok(struct fake *fk, int fd, struct cm_wire_reader *rd, struct cm_wire_buf *b)
{
    struct cm_wire_frame f;
    while (fake_read_frame(fd, rd, &f) == 1) {
        if (f.type == CM_WIRE_STATS) {
            struct json_object *o = json_object_new_object();
            json_object_object_add(o, "requests_submitted", json_object_new_int(3));
            cm_wire_encode_stats_reply(b, 0, o);
            json_object_put(o);
        } else if (f.type == CM_WIRE_SUBMIT) {
            fk->submit_req_id = f.req_id;
            struct cm_wire_accepted acc = {.prompt_tokens = 5};
            cm_wire_encode_accepted(b, f.req_id, &acc);
            struct cm_wire_token tok = {.id = 42, .text_len = 2};
            memcpy(tok.text, "hi", 3);
            cm_wire_encode_token(b, f.req_id, &tok);
        } else if (f.type == CM_WIRE_CANCEL) {
            struct cm_wire_cancel c = {0};
            if (cm_wire_decode_cancel(&f, &c, NULL, 0) == 0)
                memcpy(fk->cancel_reason, c.reason, sizeof(c.reason));
            struct cm_wire_done d = {.finish = CM_WIRE_FINISH_CANCELLED, .completion_tokens = 1};
            snprintf(d.guard, sizeof(d.guard), "%s", c.reason);
            cm_wire_encode_done(b, f.req_id, &d);
        }
        if (send_buf(fd, b) < 0)
            return;
    }
}

static void
fake_serve(struct fake *fk, int fd)
{
    struct cm_wire_reader rd;
    struct cm_wire_buf b;
    cm_wire_reader_init(&rd, 0);
    cm_wire_buf_init(&b, 0);
    struct cm_wire_frame f;
    if (fake_read_frame(fd, &rd, &f) != 1 || f.type != CM_WIRE_HELLO)
        goto out;
    switch (fk->mode) {
    case FAKE_OK:
        fake_model_info(&b);
        if (send_buf(fd, &b) == 0)
            fake_serve_ok(fk, fd, &rd, &b);
        break;
    case FAKE_GARBAGE: {
        static const char junk[] = "HTTP/1.1 400 Bad Request\r\n\r\nnot a frame at all";
        if (write(fd, junk, sizeof(junk) - 1) < 0)
            break;
        break;
    }
    case FAKE_ERROR: {
        struct cm_wire_error er = {.code = -EPROTO};
        snprintf(er.message, sizeof(er.message), "unsupported version");
        cm_wire_encode_error(&b, 0, &er);
        send_buf(fd, &b);
        break;
    }
    case FAKE_CUT_FRAME: {
        fake_model_info(&b);
        struct cm_wire_token tok = {.id = 7, .text_len = 5};
        memcpy(tok.text, "hello", 6);
        cm_wire_encode_token(&b, 1, &tok);
        size_t half = cm_wire_buf_pending(&b) - 10;
        while (half > 0) {
            ssize_t w = write(fd, cm_wire_buf_head(&b), half);
            if (w <= 0)
                break;
            cm_wire_buf_consume(&b, (size_t)w);
            half -= (size_t)w;
        }
        break;
    }
    case FAKE_SILENT:
        while (fake_read_frame(fd, &rd, &f) == 1)
            ;
        break;
    }
out:
    cm_wire_reader_fini(&rd);
    cm_wire_buf_fini(&b);
}

static void *
fake_thread(void *arg)
{
    struct fake *fk = arg;
    for (;;) {
        struct pollfd p[2] = {{.fd = fk->listen_fd, .events = POLLIN},
                              {.fd = fk->stop_pipe[0], .events = POLLIN}};
        if (poll(p, 2, -1) < 0)
            continue;
        if (p[1].revents)
            break;
        int fd = accept(fk->listen_fd, NULL, NULL);
        if (fd < 0)
            continue;
        __atomic_add_fetch(&fk->n_accepted, 1, __ATOMIC_SEQ_CST);
        fake_serve(fk, fd);
        close(fd);
    }
    return NULL;
}

/* Binds and listens (no thread yet: connections queue in the backlog). */
static void
fake_bind(struct fake *fk, const char *path)
{
    memset(fk, 0, sizeof(*fk));
    snprintf(fk->path, sizeof(fk->path), "%s", path);
    unlink(path);
    fk->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fk->listen_fd >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    assert_int_equal(bind(fk->listen_fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(fk->listen_fd, 16), 0);
    assert_int_equal(pipe(fk->stop_pipe), 0);
}

static void
fake_run(struct fake *fk, enum fake_mode mode)
{
    fk->mode = mode;
    assert_int_equal(pthread_create(&fk->th, NULL, fake_thread, fk), 0);
    fk->running = true;
}

static void
fake_start(struct fake *fk, const char *path, enum fake_mode mode)
{
    fake_bind(fk, path);
    fake_run(fk, mode);
}

static void
fake_stop(struct fake *fk)
{
    if (fk->running) {
        assert_int_equal(write(fk->stop_pipe[1], "x", 1), 1);
        pthread_join(fk->th, NULL);
    }
    close(fk->stop_pipe[0]);
    close(fk->stop_pipe[1]);
    close(fk->listen_fd);
    unlink(fk->path);
}

static void
tmp_sock_path(char *buf, size_t n, const char *tag)
{
    snprintf(buf, n, "/tmp/test_fcgi_engine_%d_%s.sock", (int)getpid(), tag);
}

/* Polls the connection until fcgi_engine_next returns non-zero. */
static int
next_blocking(struct fcgi_engine_conn *c, struct cm_wire_frame *f)
{
    for (;;) {
        int rc = fcgi_engine_next(c, f);
        if (rc != 0)
            return rc;
        struct pollfd p = {.fd = fcgi_engine_conn_fd(c), .events = POLLIN};
        if (poll(&p, 1, -1) < 0 && errno != EINTR)
            return -errno;
    }
}

/* ---- Tests ---- */

static void
test_fcgi_engine_connect_ok(void **state)
{
    (void)state;
    char path[108];
    tmp_sock_path(path, sizeof(path), "ok");
    struct fake fk;
    fake_start(&fk, path, FAKE_OK);
    struct fcgi_engine *e = NULL;
    assert_int_equal(fcgi_engine_new(path, 0, &e), 0);
    struct cm_wire_model_info mi;
    assert_int_equal(fcgi_engine_model_info(e, &mi), -EAGAIN);
    assert_false(fcgi_engine_is_up(e));

    struct fcgi_engine_conn *c = NULL;
    assert_int_equal(fcgi_engine_connect(e, &c), 0);
    assert_true(fcgi_engine_is_up(e));
    assert_string_equal(fcgi_engine_conn_info(c)->model, "fake-model");
    assert_int_equal(fcgi_engine_conn_info(c)->n_ctx, 2048);
    assert_int_equal(fcgi_engine_model_info(e, &mi), 0);
    assert_string_equal(mi.model, "fake-model");
    assert_string_equal(mi.default_system, "be brief");
    assert_int_equal(mi.chat_family, CM_CHAT_CHATML);
    cm_wire_model_info_fini(&mi);

    /* SUBMIT -> ACCEPTED, TOKEN; CANCEL -> DONE. */
    struct cm_wire_submit s;
    cm_wire_submit_init(&s);
    s.prompt = "hello";
    s.prompt_len = 5;
    s.max_tokens = 4;
    assert_int_equal(fcgi_engine_submit(c, 77, &s), 0);
    struct cm_wire_frame f;
    assert_int_equal(next_blocking(c, &f), 1);
    assert_int_equal(f.type, CM_WIRE_ACCEPTED);
    assert_int_equal(f.req_id, 77);
    struct cm_wire_accepted acc;
    assert_int_equal(cm_wire_decode_accepted(&f, &acc, NULL, 0), 0);
    assert_int_equal(acc.prompt_tokens, 5);
    assert_int_equal(next_blocking(c, &f), 1);
    assert_int_equal(f.type, CM_WIRE_TOKEN);
    struct cm_wire_token tok;
    assert_int_equal(cm_wire_decode_token(&f, &tok, NULL, 0), 0);
    assert_string_equal(tok.text, "hi");
    assert_int_equal(fcgi_engine_cancel(c, 77, "client_disconnect"), 0);
    assert_int_equal(next_blocking(c, &f), 1);
    assert_int_equal(f.type, CM_WIRE_DONE);
    struct cm_wire_done d;
    assert_int_equal(cm_wire_decode_done(&f, &d, NULL, 0), 0);
    assert_int_equal(d.finish, CM_WIRE_FINISH_CANCELLED);
    assert_string_equal(d.guard, "client_disconnect");
    /* Nothing more buffered: a non-blocking 0. */
    assert_int_equal(fcgi_engine_next(c, &f), 0);
    /* A cancel reason that is not a wire name is refused by the encoder. */
    assert_int_equal(fcgi_engine_cancel(c, 77, "bad reason!"), -EINVAL);
    fcgi_engine_conn_close(c);
    fcgi_engine_conn_close(NULL);
    fcgi_engine_free(e);
    fake_stop(&fk);
    assert_int_equal(fk.submit_req_id, 77);
    assert_string_equal(fk.cancel_reason, "client_disconnect");
}

static void
test_fcgi_engine_backoff_then_recovers(void **state)
{
    (void)state;
    char path[108];
    tmp_sock_path(path, sizeof(path), "backoff");
    unlink(path);
    struct fcgi_engine *e = NULL;
    assert_int_equal(fcgi_engine_new(path, 0, &e), 0);
    fcgi_engine_set_clock(e, fake_now);
    struct fcgi_engine_conn *c = NULL;

    /* Absent: the first attempt touches the socket and fails; the backoff starts at 100 ms. */
    assert_int_equal(fcgi_engine_connect(e, &c), -EHOSTDOWN);
    assert_null(c);
    assert_false(fcgi_engine_is_up(e));
    assert_int_equal(fcgi_engine_retry_after_s(e), 1);

    /* The engine appears, but within the interval connects fail without touching it. */
    struct fake fk;
    fake_bind(&fk, path);
    fake_now_ns += 99 * 1000000ull;
    assert_int_equal(fcgi_engine_connect(e, &c), -EHOSTDOWN);
    struct pollfd p = {.fd = fk.listen_fd, .events = POLLIN};
    assert_int_equal(poll(&p, 1, 0), 0); /* no connection reached the backlog */

    /* After the interval the next attempt connects. */
    fake_run(&fk, FAKE_OK);
    fake_now_ns += 1000000ull;
    assert_int_equal(fcgi_engine_connect(e, &c), 0);
    assert_true(fcgi_engine_is_up(e));
    fcgi_engine_conn_close(c);
    c = NULL;
    fake_stop(&fk);

    /* Down again: intervals double (100, 200, 400 ms) after each failure. */
    assert_int_equal(fcgi_engine_connect(e, &c), -EHOSTDOWN); /* next at +100 */
    fake_now_ns += 100 * 1000000ull;
    assert_int_equal(fcgi_engine_connect(e, &c), -EHOSTDOWN); /* tried; next at +200 */
    fake_now_ns += 199 * 1000000ull;
    fake_bind(&fk, path);
    assert_int_equal(fcgi_engine_connect(e, &c), -EHOSTDOWN); /* still in backoff */
    assert_int_equal(poll(&p, 1, 0), 0);
    fake_run(&fk, FAKE_OK);
    fake_now_ns += 1000000ull;
    assert_int_equal(fcgi_engine_connect(e, &c), 0);
    fcgi_engine_conn_close(c);
    fake_stop(&fk);
    fcgi_engine_free(e);
}

static void
test_fcgi_engine_backoff_caps_at_1s(void **state)
{
    (void)state;
    char path[108];
    tmp_sock_path(path, sizeof(path), "cap");
    unlink(path);
    struct fcgi_engine *e = NULL;
    assert_int_equal(fcgi_engine_new(path, 0, &e), 0);
    fcgi_engine_set_clock(e, fake_now);
    struct fcgi_engine_conn *c = NULL;
    for (int i = 0; i < 10; i++) {
        assert_int_equal(fcgi_engine_connect(e, &c), -EHOSTDOWN);
        fake_now_ns += 10ull * 1000000000ull; /* past any interval */
    }
    assert_int_equal(fcgi_engine_connect(e, &c), -EHOSTDOWN);
    assert_int_equal(fcgi_engine_retry_after_s(e), 1);
    /* The engine comes back: refused while the interval runs, found once 1 s has passed. */
    struct fake fk;
    fake_start(&fk, path, FAKE_OK);
    fake_now_ns += 999 * 1000000ull;
    assert_int_equal(fcgi_engine_connect(e, &c), -EHOSTDOWN);
    fake_now_ns += 2 * 1000000ull;
    assert_int_equal(fcgi_engine_connect(e, &c), 0);
    assert_true(fcgi_engine_is_up(e));
    fcgi_engine_conn_close(c);
    fake_stop(&fk);
    fcgi_engine_free(e);
}

static void
test_fcgi_engine_garbage_is_eproto(void **state)
{
    (void)state;
    char path[108];
    tmp_sock_path(path, sizeof(path), "garbage");
    struct fake fk;
    fake_start(&fk, path, FAKE_GARBAGE);
    struct fcgi_engine *e = NULL;
    assert_int_equal(fcgi_engine_new(path, 0, &e), 0);
    struct fcgi_engine_conn *c = NULL;
    assert_int_equal(fcgi_engine_connect(e, &c), -EPROTO);
    assert_null(c);
    assert_false(fcgi_engine_is_up(e));
    fcgi_engine_free(e);
    fake_stop(&fk);
}

static void
test_fcgi_engine_error_answer_is_eproto(void **state)
{
    (void)state;
    char path[108];
    tmp_sock_path(path, sizeof(path), "error");
    struct fake fk;
    fake_start(&fk, path, FAKE_ERROR);
    struct fcgi_engine *e = NULL;
    assert_int_equal(fcgi_engine_new(path, 0, &e), 0);
    struct fcgi_engine_conn *c = NULL;
    assert_int_equal(fcgi_engine_connect(e, &c), -EPROTO);
    fcgi_engine_free(e);
    fake_stop(&fk);
}

static void
test_fcgi_engine_cut_frame_is_econnreset(void **state)
{
    (void)state;
    char path[108];
    tmp_sock_path(path, sizeof(path), "cut");
    struct fake fk;
    fake_start(&fk, path, FAKE_CUT_FRAME);
    struct fcgi_engine *e = NULL;
    assert_int_equal(fcgi_engine_new(path, 0, &e), 0);
    struct fcgi_engine_conn *c = NULL;
    assert_int_equal(fcgi_engine_connect(e, &c), 0);
    struct cm_wire_frame f;
    assert_int_equal(next_blocking(c, &f), -ECONNRESET);
    fcgi_engine_conn_close(c);
    fcgi_engine_free(e);
    fake_stop(&fk);
}

static void
test_fcgi_engine_hello_timeout(void **state)
{
    (void)state;
    char path[108];
    tmp_sock_path(path, sizeof(path), "silent");
    struct fake fk;
    fake_start(&fk, path, FAKE_SILENT);
    struct fcgi_engine *e = NULL;
    assert_int_equal(fcgi_engine_new(path, 50, &e), 0);
    struct fcgi_engine_conn *c = NULL;
    fcgi_engine_set_clock(e, fake_now); /* frozen: a backoff would refuse the next connect */
    assert_int_equal(fcgi_engine_connect(e, &c), -EHOSTDOWN);
    /* Connected but silent: busy, not down, so no backoff is started for the other requests:
     * the next connect reaches the engine again. */
    assert_int_equal(fcgi_engine_connect(e, &c), -EHOSTDOWN);
    assert_int_equal(__atomic_load_n(&fk.n_accepted, __ATOMIC_SEQ_CST), 2);
    fcgi_engine_free(e);
    fake_stop(&fk);
}

static void
test_fcgi_engine_stats_round_trip(void **state)
{
    (void)state;
    char path[108];
    tmp_sock_path(path, sizeof(path), "stats");
    struct fake fk;
    fake_start(&fk, path, FAKE_OK);
    struct fcgi_engine *e = NULL;
    assert_int_equal(fcgi_engine_new(path, 0, &e), 0);
    char *json = NULL;
    assert_int_equal(fcgi_engine_stats(e, &json), 0);
    assert_non_null(json);
    struct json_object *o = json_tokener_parse(json);
    assert_non_null(o);
    assert_int_equal(json_object_get_int(json_object_object_get(o, "requests_submitted")), 3);
    json_object_put(o);
    free(json);
    /* The stats connection also refreshed MODEL_INFO. */
    struct cm_wire_model_info mi;
    assert_int_equal(fcgi_engine_model_info(e, &mi), 0);
    assert_string_equal(mi.model, "fake-model");
    cm_wire_model_info_fini(&mi);
    fcgi_engine_free(e);
    fake_stop(&fk);

    /* Engine gone: -EHOSTDOWN. */
    assert_int_equal(fcgi_engine_new(path, 0, &e), 0);
    json = NULL;
    assert_int_equal(fcgi_engine_stats(e, &json), -EHOSTDOWN);
    assert_null(json);
    fcgi_engine_free(e);
}

static void
test_fcgi_engine_new_rejects_long_path(void **state)
{
    (void)state;
    char path[300];
    memset(path, 'a', sizeof(path) - 1);
    path[sizeof(path) - 1] = 0;
    struct fcgi_engine *e = NULL;
    assert_int_equal(fcgi_engine_new(path, 0, &e), -EINVAL);
    assert_int_equal(fcgi_engine_new("", 0, &e), -EINVAL);
    assert_null(e);
    fcgi_engine_free(NULL);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fcgi_engine_connect_ok),
        cmocka_unit_test(test_fcgi_engine_backoff_then_recovers),
        cmocka_unit_test(test_fcgi_engine_backoff_caps_at_1s),
        cmocka_unit_test(test_fcgi_engine_garbage_is_eproto),
        cmocka_unit_test(test_fcgi_engine_error_answer_is_eproto),
        cmocka_unit_test(test_fcgi_engine_cut_frame_is_econnreset),
        cmocka_unit_test(test_fcgi_engine_hello_timeout),
        cmocka_unit_test(test_fcgi_engine_stats_round_trip),
        cmocka_unit_test(test_fcgi_engine_new_rejects_long_path),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

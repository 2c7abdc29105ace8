/*
 * Unit tests for fcgi/fcgi_http (over a memory-buffer ops seam: status line, headers, CORS, SSE
 * framing, JSON and error bodies, failing flushes latching client_gone, client-fd polling over a
 * socketpair) and fcgi/fcgi_dump (file mode, one valid JSON object per line).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fcgi/fcgi.h"
#include "fcgi/fcgi_dump.h"
#include "fcgi/fcgi_http.h"

/* ---- Buffer ops ---- */

struct membuf {
    char data[8192];
    size_t len;
    int n_writes;
    int n_flushes;
    int fail_flush_at; /* fail the Nth flush (1-based); 0: never */
    int fail_write_at; /* fail the Nth write; 0: never */
};

static int
mem_write(void *io, const void *data, size_t n)
{
    struct membuf *b = io;
    b->n_writes++;
    if (b->fail_write_at && b->n_writes >= b->fail_write_at)
        return -EPIPE;
    if (b->len + n >= sizeof(b->data))
        return -ENOSPC;
    memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = 0;
    return 0;
}

static int
mem_flush(void *io)
{
    struct membuf *b = io;
    b->n_flushes++;
    if (b->fail_flush_at && b->n_flushes >= b->fail_flush_at)
        return -EPIPE;
    return 0;
}

static const struct fcgi_http_ops mem_ops = {.write = mem_write, .flush = mem_flush};

/* The body after the blank line ending the headers. */
static const char *
body_of(const struct membuf *b)
{
    const char *p = strstr(b->data, "\r\n\r\n");
    return p ? p + 4 : NULL;
}

/* ---- Tests ---- */

static void
test_fcgi_http_begin_status_and_headers(void **state)
{
    (void)state;
    struct membuf b = {0};
    struct fcgi_conf conf = {0};
    struct fcgi_http h;
    fcgi_http_init(&h, &mem_ops, &b, &conf);
    assert_int_equal(h.client_fd, -1);
    assert_int_equal(fcgi_http_begin(&h, 404, "application/json", false, "X-A: 1\r\n"), 0);
    assert_true(h.headers_sent);
    assert_int_equal(h.status, 404);
    assert_string_equal(b.data, "Status: 404 Not Found\r\nContent-Type: application/json\r\n"
                                "X-A: 1\r\n\r\n");
    assert_null(strstr(b.data, "Access-Control"));
    assert_int_equal(fcgi_http_begin(&h, 200, "text/plain", false, NULL), -EALREADY);
    fcgi_http_fini(&h);
}

static void
test_fcgi_http_begin_sse_and_cors(void **state)
{
    (void)state;
    struct membuf b = {0};
    struct fcgi_conf conf = {.cors_origin = "https://app.example"};
    struct fcgi_http h;
    fcgi_http_init(&h, &mem_ops, &b, &conf);
    assert_int_equal(fcgi_http_begin(&h, 200, "text/event-stream", true, NULL), 0);
    assert_non_null(strstr(b.data, "Status: 200 OK\r\n"));
    assert_non_null(strstr(b.data, "Content-Type: text/event-stream\r\n"));
    assert_non_null(strstr(b.data, "Cache-Control: no-cache\r\n"));
    assert_non_null(strstr(b.data, "X-Accel-Buffering: no\r\n"));
    assert_non_null(strstr(b.data, "Access-Control-Allow-Origin: https://app.example\r\n"));
    assert_non_null(
        strstr(b.data, "Access-Control-Allow-Headers: Authorization, Content-Type\r\n"));
    assert_non_null(strstr(b.data, "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"));
    assert_non_null(strstr(b.data, "Vary: Origin\r\n"));
    assert_null(strstr(b.data, "Content-Length"));
    assert_null(strstr(b.data, "Transfer-Encoding"));
    int flushes = b.n_flushes;
    assert_int_equal(fcgi_http_sse_data(&h, "{\"a\":1}", 7), 0);
    assert_int_equal(b.n_flushes, flushes + 1);
    assert_int_equal(fcgi_http_sse_comment(&h, "keep-alive"), 0);
    assert_int_equal(b.n_flushes, flushes + 2);
    assert_string_equal(body_of(&b), "data: {\"a\":1}\n\n: keep-alive\n\n");
    fcgi_http_fini(&h);
}

static void
test_fcgi_http_no_content_type_when_null(void **state)
{
    (void)state;
    struct membuf b = {0};
    struct fcgi_http h;
    fcgi_http_init(&h, &mem_ops, &b, NULL);
    assert_int_equal(fcgi_http_begin(&h, 204, NULL, false, NULL), 0);
    assert_string_equal(b.data, "Status: 204 No Content\r\n\r\n");
    fcgi_http_fini(&h);
}

static void
test_fcgi_http_send_json(void **state)
{
    (void)state;
    struct membuf b = {0};
    struct fcgi_http h;
    fcgi_http_init(&h, &mem_ops, &b, NULL);
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "status", json_object_new_string("ok"));
    assert_int_equal(fcgi_http_send_json(&h, 200, o), 0);
    json_object_put(o);
    assert_int_equal(b.n_flushes, 1);
    assert_non_null(strstr(b.data, "Content-Type: application/json\r\n"));
    struct json_object *back = json_tokener_parse(body_of(&b));
    assert_non_null(back);
    assert_string_equal(json_object_get_string(json_object_object_get(back, "status")), "ok");
    json_object_put(back);
    fcgi_http_fini(&h);
}

static void
test_fcgi_http_send_error_body_and_retry_after(void **state)
{
    (void)state;
    struct membuf b = {0};
    struct fcgi_http h;
    fcgi_http_init(&h, &mem_ops, &b, NULL);
    assert_int_equal(
        fcgi_http_send_error(&h, 503, "server_error", "engine unavailable", NULL, NULL, 3), 0);
    assert_int_equal(h.status, 503);
    assert_non_null(strstr(b.data, "Status: 503 Service Unavailable\r\n"));
    assert_non_null(strstr(b.data, "Retry-After: 3\r\n"));
    struct json_object *back = json_tokener_parse(body_of(&b));
    assert_non_null(back);
    struct json_object *err = json_object_object_get(back, "error");
    assert_non_null(err);
    assert_string_equal(json_object_get_string(json_object_object_get(err, "message")),
                        "engine unavailable");
    assert_string_equal(json_object_get_string(json_object_object_get(err, "type")),
                        "server_error");
    struct json_object *v = NULL;
    assert_true(json_object_object_get_ex(err, "param", &v));
    assert_null(v);
    assert_true(json_object_object_get_ex(err, "code", &v));
    assert_null(v);
    json_object_put(back);
    /* A second error after the headers writes nothing. */
    size_t len = b.len;
    assert_int_equal(fcgi_http_send_error(&h, 400, "invalid_request_error", "x", "p", "c", 0),
                     -EALREADY);
    assert_int_equal(b.len, len);
    fcgi_http_fini(&h);
}

static void
test_fcgi_http_send_error_param_code(void **state)
{
    (void)state;
    struct membuf b = {0};
    struct fcgi_http h;
    fcgi_http_init(&h, &mem_ops, &b, NULL);
    assert_int_equal(fcgi_http_send_error(&h, 400, "invalid_request_error", "bad", "messages",
                                          "context_length_exceeded", 0),
                     0);
    assert_null(strstr(b.data, "Retry-After"));
    struct json_object *back = json_tokener_parse(body_of(&b));
    struct json_object *err = json_object_object_get(back, "error");
    assert_string_equal(json_object_get_string(json_object_object_get(err, "param")), "messages");
    assert_string_equal(json_object_get_string(json_object_object_get(err, "code")),
                        "context_length_exceeded");
    json_object_put(back);
    fcgi_http_fini(&h);
}

static void
test_fcgi_http_failed_flush_latches_client_gone(void **state)
{
    (void)state;
    struct membuf b = {.fail_flush_at = 2};
    struct fcgi_http h;
    fcgi_http_init(&h, &mem_ops, &b, NULL);
    assert_int_equal(fcgi_http_begin(&h, 200, "text/event-stream", true, NULL), 0);
    assert_int_equal(fcgi_http_sse_data(&h, "1", 1), 0);
    assert_false(h.client_gone);
    assert_int_equal(fcgi_http_sse_data(&h, "2", 1), -EPIPE);
    assert_true(h.client_gone);
    int writes = b.n_writes, flushes = b.n_flushes;
    assert_int_equal(fcgi_http_write(&h, "x", 1), -EPIPE);
    assert_int_equal(fcgi_http_flush(&h), -EPIPE);
    assert_int_equal(fcgi_http_sse_comment(&h, "keep-alive"), -EPIPE);
    /* Later calls fail fast without touching the stream. */
    assert_int_equal(b.n_writes, writes);
    assert_int_equal(b.n_flushes, flushes);
    assert_true(fcgi_http_poll_gone(&h));
    fcgi_http_fini(&h);
}

static void
test_fcgi_http_failed_write_latches_client_gone(void **state)
{
    (void)state;
    struct membuf b = {.fail_write_at = 1};
    struct fcgi_http h;
    fcgi_http_init(&h, &mem_ops, &b, NULL);
    assert_int_equal(fcgi_http_send_error(&h, 500, "server_error", "x", NULL, NULL, 0), -EPIPE);
    assert_true(h.client_gone);
    assert_true(h.headers_sent);
    assert_int_equal(fcgi_http_write(&h, "x", 1), -EPIPE);
    assert_int_equal(b.n_writes, 1);
    fcgi_http_fini(&h);
}

static void
test_fcgi_http_poll_gone_socketpair(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    struct membuf b = {0};
    struct fcgi_http h;
    fcgi_http_init(&h, &mem_ops, &b, NULL);
    assert_false(fcgi_http_poll_gone(&h)); /* client_fd -1: unknown */
    h.client_fd = sv[0];
    assert_false(fcgi_http_poll_gone(&h));
    assert_false(h.client_gone);
    close(sv[1]);
    assert_true(fcgi_http_poll_gone(&h));
    assert_true(h.client_gone);
    assert_int_equal(fcgi_http_begin(&h, 200, "application/json", false, NULL), -EPIPE);
    assert_int_equal(b.len, 0);
    close(sv[0]);
    fcgi_http_fini(&h);
}

static void
test_fcgi_http_fini_frees_request(void **state)
{
    (void)state;
    struct fcgi_http h;
    fcgi_http_init(&h, &mem_ops, NULL, NULL);
    h.method = strdup("POST");
    h.path = strdup("/v1/models");
    h.body = strdup("{}");
    h.body_len = 2;
    fcgi_http_fini(&h);
    assert_null(h.method);
    assert_null(h.body);
    assert_int_equal(h.body_len, 0);
}

static void
test_fcgi_http_reason(void **state)
{
    (void)state;
    assert_string_equal(fcgi_http_reason(200), "OK");
    assert_string_equal(fcgi_http_reason(401), "Unauthorized");
    assert_string_equal(fcgi_http_reason(405), "Method Not Allowed");
    assert_string_equal(fcgi_http_reason(413), "Payload Too Large");
    assert_string_equal(fcgi_http_reason(429), "Too Many Requests");
    assert_string_equal(fcgi_http_reason(503), "Service Unavailable");
    assert_string_equal(fcgi_http_reason(299), "Unknown");
}

/* ---- fcgi_dump ---- */

static void
test_fcgi_dump_mode_and_lines(void **state)
{
    (void)state;
    char path[] = "/tmp/test_fcgi_dump_XXXXXX";
    int tfd = mkstemp(path);
    assert_true(tfd >= 0);
    close(tfd);
    unlink(path);
    mode_t old = umask(0);
    struct fcgi_dump *d = NULL;
    assert_int_equal(fcgi_dump_open(path, &d), 0);
    umask(old);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    for (int i = 0; i < 3; i++) {
        struct json_object *o = json_object_new_object();
        json_object_object_add(o, "i", json_object_new_int(i));
        json_object_object_add(o, "text", json_object_new_string("line\nbreak \"quoted\""));
        fcgi_dump_write(d, o);
        json_object_put(o);
    }
    fcgi_dump_write(NULL, NULL); /* no-op */
    fcgi_dump_close(d);
    /* Reopening appends. */
    assert_int_equal(fcgi_dump_open(path, &d), 0);
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "i", json_object_new_int(3));
    fcgi_dump_write(d, o);
    json_object_put(o);
    fcgi_dump_close(d);

    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[512];
    int n = 0;
    while (fgets(line, sizeof(line), f)) {
        size_t len = strlen(line);
        assert_true(len > 0 && line[len - 1] == '\n');
        struct json_object *back = json_tokener_parse(line);
        assert_non_null(back);
        assert_int_equal(json_object_get_int(json_object_object_get(back, "i")), n);
        json_object_put(back);
        n++;
    }
    fclose(f);
    assert_int_equal(n, 4);
    unlink(path);
}

static void
test_fcgi_dump_open_error(void **state)
{
    (void)state;
    struct fcgi_dump *d = NULL;
    assert_int_equal(fcgi_dump_open("/nonexistent-dir/x/dump.jsonl", &d), -ENOENT);
    assert_null(d);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fcgi_http_begin_status_and_headers),
        cmocka_unit_test(test_fcgi_http_begin_sse_and_cors),
        cmocka_unit_test(test_fcgi_http_no_content_type_when_null),
        cmocka_unit_test(test_fcgi_http_send_json),
        cmocka_unit_test(test_fcgi_http_send_error_body_and_retry_after),
        cmocka_unit_test(test_fcgi_http_send_error_param_code),
        cmocka_unit_test(test_fcgi_http_failed_flush_latches_client_gone),
        cmocka_unit_test(test_fcgi_http_failed_write_latches_client_gone),
        cmocka_unit_test(test_fcgi_http_poll_gone_socketpair),
        cmocka_unit_test(test_fcgi_http_fini_frees_request),
        cmocka_unit_test(test_fcgi_http_reason),
        cmocka_unit_test(test_fcgi_dump_mode_and_lines),
        cmocka_unit_test(test_fcgi_dump_open_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for fcgi/fcgi_server over a memory-buffer fcgi_http: the routing path (REQUEST_URI,
 * SCRIPT_NAME + PATH_INFO, base path), API keys, CORS preflight, 401/404/405/413, /v1/models with
 * --model-name, /health and /v1/models with no engine (503), /metrics text (engine STATS converted
 * to Prometheus, worker counters), response counters. No engine runs: the engine socket path does
 * not exist, and no test reaches fcgi_gen.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fcgi/fcgi.h"
#include "fcgi/fcgi_engine.h"
#include "fcgi/fcgi_http.h"
#include "fcgi/fcgi_server.h"

/* ---- Buffer ops ---- */

struct membuf {
    char data[65536];
    size_t len;
};

static int
mem_write(void *io, const void *data, size_t n)
{
    struct membuf *b = io;
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
    (void)io;
    return 0;
}

static const struct fcgi_http_ops mem_ops = {.write = mem_write, .flush = mem_flush};

/* ---- Fixture ---- */

struct fx {
    struct fcgi_ctx ctx;
    struct membuf out;
    struct fcgi_http h;
};

static int
setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    char path[108];
    snprintf(path, sizeof(path), "/tmp/test_fcgi_server_%d_absent.sock", (int)getpid());
    unlink(path);
    if (fcgi_engine_new(path, 200, &f->ctx.engine) < 0)
        return -1;
    f->ctx.conf.max_body_bytes = 1000;
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fx *f = *state;
    fcgi_engine_free(f->ctx.engine);
    free(f);
    return 0;
}

/* Runs one request; returns the status sent. */
static int
run(struct fx *f, const char *method, const char *path, const char *auth)
{
    f->out.len = 0;
    f->out.data[0] = 0;
    fcgi_http_init(&f->h, &mem_ops, &f->out, &f->ctx.conf);
    f->h.method = strdup(method);
    f->h.path = strdup(path);
    f->h.authorization = auth ? strdup(auth) : NULL;
    assert_int_equal(fcgi_server_handle(&f->ctx, &f->h), 0);
    int status = f->h.status;
    fcgi_http_fini(&f->h);
    return status;
}

static const char *
body(const struct fx *f)
{
    const char *p = strstr(f->out.data, "\r\n\r\n");
    return p ? p + 4 : "";
}

/* The error type of a JSON error body. */
static void
assert_error_type(const struct fx *f, const char *type)
{
    struct json_object *o = json_tokener_parse(body(f));
    assert_non_null(o);
    struct json_object *err = json_object_object_get(o, "error");
    assert_non_null(err);
    assert_string_equal(json_object_get_string(json_object_object_get(err, "type")), type);
    json_object_put(o);
}

/* ---- Tests ---- */

static void
test_fcgi_server_request_path(void **state)
{
    (void)state;
    struct fcgi_conf conf = {0};
    char *p = NULL;
    fcgi_server_request_path(&conf, "/v1/models?x=1", "/v1", "/models", &p);
    assert_string_equal(p, "/v1/models");
    free(p);
    fcgi_server_request_path(&conf, "", "/v1/chat", "/completions", &p);
    assert_string_equal(p, "/v1/chat/completions");
    free(p);
    fcgi_server_request_path(&conf, NULL, "/v1/chat/completions", NULL, &p);
    assert_string_equal(p, "/v1/chat/completions");
    free(p);
    fcgi_server_request_path(&conf, NULL, NULL, NULL, &p);
    assert_string_equal(p, "/");
    free(p);
    fcgi_server_request_path(&conf, "/v1/models/#frag", NULL, NULL, &p);
    assert_string_equal(p, "/v1/models");
    free(p);
    conf.base_path = "/llm";
    fcgi_server_request_path(&conf, "/llm/v1/models", NULL, NULL, &p);
    assert_string_equal(p, "/v1/models");
    free(p);
    fcgi_server_request_path(&conf, "/llm", NULL, NULL, &p);
    assert_string_equal(p, "/");
    free(p);
    fcgi_server_request_path(&conf, "/llmx/v1/models", NULL, NULL, &p);
    assert_string_equal(p, "/llmx/v1/models");
    free(p);
    fcgi_server_request_path(&conf, "/v1/models", NULL, NULL, &p); /* already stripped */
    assert_string_equal(p, "/v1/models");
    free(p);
}

static void
test_fcgi_server_key_ok(void **state)
{
    (void)state;
    struct fcgi_conf conf = {0};
    assert_true(fcgi_server_key_ok(&conf, NULL));
    conf.api_keys[0] = "sk-alpha";
    conf.api_keys[1] = "sk-beta-longer";
    conf.n_api_keys = 2;
    assert_true(fcgi_server_key_ok(&conf, "Bearer sk-alpha"));
    assert_true(fcgi_server_key_ok(&conf, "bearer   sk-beta-longer  "));
    assert_false(fcgi_server_key_ok(&conf, NULL));
    assert_false(fcgi_server_key_ok(&conf, ""));
    assert_false(fcgi_server_key_ok(&conf, "Bearer"));
    assert_false(fcgi_server_key_ok(&conf, "Bearer "));
    assert_false(fcgi_server_key_ok(&conf, "sk-alpha"));
    assert_false(fcgi_server_key_ok(&conf, "Basic sk-alpha"));
    assert_false(fcgi_server_key_ok(&conf, "Bearer sk-alph"));
    assert_false(fcgi_server_key_ok(&conf, "Bearer sk-alphaa"));
    assert_false(fcgi_server_key_ok(&conf, "Bearer sk-alphB"));
    assert_false(fcgi_server_key_ok(&conf, "Bearer sk-beta"));
    assert_false(fcgi_server_key_ok(&conf, "Bearersk-alpha"));
}

static void
test_fcgi_server_unknown_path_404(void **state)
{
    struct fx *f = *state;
    assert_int_equal(run(f, "GET", "/nope", NULL), 404);
    assert_error_type(f, "not_found_error");
    assert_int_equal(run(f, "POST", "/v1/embeddings", NULL), 404);
    assert_int_equal(atomic_load(&f->ctx.counters.responses_4xx), 2);
    assert_int_equal(atomic_load(&f->ctx.counters.requests), 2);
    assert_int_equal(atomic_load(&f->ctx.counters.active_requests), 0);
}

static void
test_fcgi_server_wrong_method_405(void **state)
{
    struct fx *f = *state;
    assert_int_equal(run(f, "GET", "/v1/chat/completions", NULL), 405);
    assert_non_null(strstr(f->out.data, "Allow: POST\r\n"));
    assert_error_type(f, "invalid_request_error");
    assert_int_equal(run(f, "POST", "/v1/models", NULL), 405);
    assert_non_null(strstr(f->out.data, "Allow: GET, HEAD\r\n"));
    assert_int_equal(run(f, "DELETE", "/health", NULL), 405);
    assert_int_equal(run(f, "OPTIONS", "/v1/models", NULL), 405); /* no CORS configured */
}

static void
test_fcgi_server_auth(void **state)
{
    struct fx *f = *state;
    f->ctx.conf.api_keys[0] = "sk-test";
    f->ctx.conf.n_api_keys = 1;
    f->ctx.conf.model_name = "smol";
    assert_int_equal(run(f, "GET", "/v1/models", NULL), 401);
    assert_error_type(f, "authentication_error");
    assert_non_null(strstr(body(f), "invalid_api_key"));
    assert_int_equal(run(f, "GET", "/v1/models", "Bearer wrong"), 401);
    assert_int_equal(run(f, "POST", "/v1/chat/completions", NULL), 401);
    assert_int_equal(run(f, "GET", "/metrics", NULL), 401);
    assert_int_equal(run(f, "GET", "/unknown", NULL), 401); /* no path probing without a key */
    assert_int_equal(run(f, "GET", "/v1/models", "Bearer sk-test"), 200);
    /* /health stays open: here 503, the engine being absent. */
    assert_int_equal(run(f, "GET", "/health", NULL), 503);
}

static void
test_fcgi_server_cors_preflight(void **state)
{
    struct fx *f = *state;
    f->ctx.conf.cors_origin = "*";
    f->ctx.conf.api_keys[0] = "sk-test";
    f->ctx.conf.n_api_keys = 1;
    assert_int_equal(run(f, "OPTIONS", "/v1/chat/completions", NULL), 204);
    assert_non_null(strstr(f->out.data, "Access-Control-Allow-Origin: *\r\n"));
    assert_non_null(strstr(f->out.data, "Access-Control-Allow-Headers: Authorization"));
    assert_non_null(strstr(f->out.data, "Access-Control-Allow-Methods: GET, POST, OPTIONS"));
    assert_string_equal(body(f), "");
    /* Every other response carries the CORS headers too. */
    assert_int_equal(run(f, "GET", "/v1/models", NULL), 401);
    assert_non_null(strstr(f->out.data, "Access-Control-Allow-Origin: *\r\n"));
    assert_int_equal(atomic_load(&f->ctx.counters.responses_2xx), 1);
}

static void
test_fcgi_server_models_with_name(void **state)
{
    struct fx *f = *state;
    f->ctx.conf.model_name = "SmolLM2 135M";
    assert_int_equal(run(f, "GET", "/v1/models", NULL), 200);
    struct json_object *o = json_tokener_parse(body(f));
    assert_non_null(o);
    assert_string_equal(json_object_get_string(json_object_object_get(o, "object")), "list");
    struct json_object *m = json_object_array_get_idx(json_object_object_get(o, "data"), 0);
    assert_string_equal(json_object_get_string(json_object_object_get(m, "id")), "SmolLM2 135M");
    assert_string_equal(json_object_get_string(json_object_object_get(m, "object")), "model");
    assert_string_equal(json_object_get_string(json_object_object_get(m, "owned_by")), "llm-fcgi");
    assert_true(json_object_get_int64(json_object_object_get(m, "created")) > 0);
    json_object_put(o);

    assert_int_equal(run(f, "GET", "/v1/models/SmolLM2%20135M", NULL), 200);
    o = json_tokener_parse(body(f));
    assert_string_equal(json_object_get_string(json_object_object_get(o, "id")), "SmolLM2 135M");
    json_object_put(o);
    assert_int_equal(run(f, "GET", "/v1/models/gpt-4", NULL), 404);
    assert_non_null(strstr(body(f), "model_not_found"));
    assert_int_equal(run(f, "GET", "/v1/models/bad%zz", NULL), 404);
    assert_int_equal(run(f, "HEAD", "/v1/models", NULL), 200);
}

static void
test_fcgi_server_engine_absent_503(void **state)
{
    struct fx *f = *state;
    assert_int_equal(run(f, "GET", "/health", NULL), 503);
    assert_error_type(f, "server_error");
    assert_non_null(strstr(f->out.data, "Retry-After: "));
    assert_int_equal(run(f, "GET", "/v1/models", NULL), 503);
    assert_int_equal(atomic_load(&f->ctx.counters.engine_unavailable), 2);
    assert_int_equal(atomic_load(&f->ctx.counters.responses_5xx), 2);
    /* /metrics still answers, with the engine marked down. */
    assert_int_equal(run(f, "GET", "/metrics", NULL), 200);
    assert_non_null(strstr(f->out.data, "Content-Type: text/plain; version=0.0.4"));
    assert_non_null(strstr(body(f), "\nllm_engine_up 0\n"));
    assert_non_null(strstr(body(f), "llm_fcgi_responses_total{class=\"5xx\"} 2\n"));
}

static void
test_fcgi_server_metrics_text(void **state)
{
    struct fx *f = *state;
    atomic_store(&f->ctx.counters.requests, 5);
    atomic_store(&f->ctx.counters.tool_calls, 2);
    const char *stats = "{\"requests_submitted\": 7, \"running\": 2, \"kv_blocks_total\": 64,"
                        " \"finished_by\": {\"eos\": 3, \"length\": 1},"
                        " \"cancels\": {\"client_disconnect\": 1, \"we\\\"ird\": 2},"
                        " \"guard_trips\": {\"name_run_cap\": 1, \"token_loop\": 0},"
                        " \"ttft_ms\": {\"count\": 4, \"sum\": 12.5,"
                        "   \"buckets\": [[1, 1], [10, 3], [\"+Inf\", 4]]}}";
    char *text = NULL;
    assert_int_equal(fcgi_server_metrics_text(&f->ctx, stats, &text), 0);
    const char *want[] = {
        "llm_engine_up 1\n",
        "# TYPE llm_engine_requests_submitted_total counter\n",
        "llm_engine_requests_submitted_total 7\n",
        "# TYPE llm_engine_running gauge\nllm_engine_running 2\n",
        "llm_engine_kv_blocks_total 64\n",
        "llm_engine_finished_by_total{reason=\"eos\"} 3\n",
        "llm_engine_cancels_total{reason=\"we\\\"ird\"} 2\n",
        "# TYPE llm_guard_trips_total counter\n",
        "llm_guard_trips_total{guard=\"name_run_cap\"} 1\n",
        "llm_guard_trips_total{guard=\"token_loop\"} 0\n",
        "# TYPE llm_engine_ttft_ms histogram\n",
        "llm_engine_ttft_ms_bucket{le=\"1\"} 1\n",
        "llm_engine_ttft_ms_bucket{le=\"10\"} 3\n",
        "llm_engine_ttft_ms_bucket{le=\"+Inf\"} 4\n",
        "llm_engine_ttft_ms_sum 12.5\n",
        "llm_engine_ttft_ms_count 4\n",
        "llm_fcgi_requests_total 5\n",
        "llm_fcgi_tool_calls_total 2\n",
        "# TYPE llm_fcgi_active_requests gauge\n",
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        if (!strstr(text, want[i]))
            fail_msg("missing from /metrics: %s\n%s", want[i], text);
    }
    /* Every sample line belongs to a metric declared with HELP and TYPE before it. */
    assert_null(strstr(text, "llm_engine_kv_blocks_total_total"));
    assert_null(strstr(text, "llm_engine_guard_trips"));
    free(text);
    assert_int_equal(fcgi_server_metrics_text(&f->ctx, "not json", &text), 0);
    assert_non_null(strstr(text, "llm_engine_up 0\n"));
    free(text);
}

static void
test_fcgi_server_too_large_413(void **state)
{
    struct fx *f = *state;
    fcgi_http_init(&f->h, &mem_ops, &f->out, &f->ctx.conf);
    assert_int_equal(fcgi_server_handle_too_large(&f->ctx, &f->h), 0);
    assert_int_equal(f->h.status, 413);
    assert_error_type(f, "invalid_request_error");
    assert_non_null(strstr(body(f), "1000 bytes"));
    assert_int_equal(atomic_load(&f->ctx.counters.responses_4xx), 1);
    fcgi_http_fini(&f->h);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fcgi_server_request_path),
        cmocka_unit_test(test_fcgi_server_key_ok),
        cmocka_unit_test_setup_teardown(test_fcgi_server_unknown_path_404, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fcgi_server_wrong_method_405, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fcgi_server_auth, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fcgi_server_cors_preflight, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fcgi_server_models_with_name, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fcgi_server_engine_absent_503, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fcgi_server_metrics_text, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fcgi_server_too_large_413, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

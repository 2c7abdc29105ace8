/*
 * Unit tests for fcgi/fcgi_resp: ids, chunk and response shapes (checked by parsing the JSON
 * back), logprobs in both shapes, error bodies, and the finish_reason table.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "fcgi/fcgi_resp.h"

/* Serialises o, parses it back (so the test sees what a client sees) and releases o. */
static struct json_object *
roundtrip(struct json_object *o)
{
    assert_non_null(o);
    const char *s = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN);
    struct json_object *back = json_tokener_parse(s);
    assert_non_null(back);
    json_object_put(o);
    return back;
}

/* The value at a path of keys and [indices]: "choices[0].delta.content". NULL when absent. */
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
            int idx = atoi(p + 1);
            if (json_object_get_type(o) != json_type_array)
                return NULL;
            o = json_object_array_get_idx(o, (size_t)idx);
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

static bool
has(struct json_object *o, const char *path)
{
    /* present, possibly null: look the last key up in its parent */
    char parent[128];
    const char *dot = strrchr(path, '.');
    if (!dot)
        return json_object_object_get_ex(o, path, NULL);
    memcpy(parent, path, (size_t)(dot - path));
    parent[dot - path] = 0;
    struct json_object *p = at(o, parent);
    return p && json_object_object_get_ex(p, dot + 1, NULL);
}

static const char *
str_at(struct json_object *o, const char *path)
{
    struct json_object *v = at(o, path);
    return v && json_object_get_type(v) == json_type_string ? json_object_get_string(v) : NULL;
}

static const struct fcgi_resp_meta chat_meta = {
    .kind = FCGI_REQ_CHAT,
    .id = "chatcmpl-abc",
    .created = 1700000000,
    .model = "smol",
    .fingerprint = "fp_x",
};

/* ---- Ids ---- */

static void
check_id(const char *id, const char *prefix)
{
    size_t p = strlen(prefix);
    assert_int_equal(strncmp(id, prefix, p), 0);
    assert_int_equal(strlen(id), p + FCGI_RESP_ID_RANDOM);
    for (size_t i = p; id[i]; i++)
        assert_true(isalnum((unsigned char)id[i]));
}

static void *
id_thread(void *arg)
{
    char(*ids)[FCGI_RESP_ID_MAX] = arg;
    for (int i = 0; i < 100; i++)
        fcgi_resp_make_id("call_", ids[i]);
    return NULL;
}

static void
test_fcgi_resp_ids_unique_alnum(void **state)
{
    (void)state;
    static char ids[4][100][FCGI_RESP_ID_MAX];
    pthread_t th[4];
    for (int t = 0; t < 4; t++)
        assert_int_equal(pthread_create(&th[t], NULL, id_thread, ids[t]), 0);
    for (int t = 0; t < 4; t++)
        pthread_join(th[t], NULL);
    for (int a = 0; a < 400; a++) {
        check_id(ids[a / 100][a % 100], "call_");
        for (int b = 0; b < a; b++)
            assert_string_not_equal(ids[a / 100][a % 100], ids[b / 100][b % 100]);
    }
    char id[FCGI_RESP_ID_MAX];
    fcgi_resp_make_id(fcgi_resp_id_prefix(FCGI_REQ_CHAT), id);
    check_id(id, "chatcmpl-");
    fcgi_resp_make_id(fcgi_resp_id_prefix(FCGI_REQ_COMPLETION), id);
    check_id(id, "cmpl-");
}

/* ---- finish_reason ---- */

static void
test_fcgi_resp_finish_table(void **state)
{
    (void)state;
    static const struct {
        struct fcgi_resp_cut cut;
        const char *finish, *stop_reason;
        bool capped;
    } rows[] = {
        /* tool-loop guard wins over everything */
        {{.guard = "identical_call",
          .guard_tool_loop = true,
          .n_tool_calls = 2,
          .stop_string = true,
          .have_done = true},
         "length",
         "identical_call",
         true},
        /* parsed calls beat a stop string, another guard, the deadline */
        {{.n_tool_calls = 1,
          .stop_string = true,
          .guard = "line_repeat",
          .have_done = true,
          .done_finish = CM_WIRE_FINISH_DEADLINE},
         "tool_calls",
         NULL,
         false},
        {{.n_tool_calls = 1, .have_done = true, .done_finish = CM_WIRE_FINISH_EOS},
         "tool_calls",
         NULL,
         false},
        /* stop string beats another guard */
        {{.stop_string = true,
          .guard = "line_repeat",
          .have_done = true,
          .done_finish = CM_WIRE_FINISH_CANCELLED,
          .done_guard = "stop_string"},
         "stop",
         "stop_string",
         false},
        {{.guard = "sentence_loop",
          .have_done = true,
          .done_finish = CM_WIRE_FINISH_CANCELLED,
          .done_guard = "sentence_loop"},
         "length",
         "sentence_loop",
         false},
        {{.have_done = true, .done_finish = CM_WIRE_FINISH_DEADLINE}, "length", "deadline", false},
        {{.have_done = true, .done_finish = CM_WIRE_FINISH_CANCELLED, .done_guard = "token_loop"},
         "length",
         "token_loop",
         false},
        {{.have_done = true, .done_finish = CM_WIRE_FINISH_CANCELLED, .done_guard = ""},
         "length",
         "cancelled",
         false},
        {{.have_done = true, .done_finish = CM_WIRE_FINISH_LENGTH}, "length", NULL, false},
        {{.have_done = true, .done_finish = CM_WIRE_FINISH_EOS}, "stop", NULL, false},
        {{.have_done = true, .done_finish = CM_WIRE_FINISH_STOP_TOKEN}, "stop", NULL, false},
        {{.have_done = true, .done_finish = CM_WIRE_FINISH_ERROR}, "length", "error", false},
        {{.error = true}, "length", "error", false},
        {{.client_gone = true}, "length", "client_disconnect", false},
        {{.have_done = false}, "length", "error", false},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        struct fcgi_resp_finish f;
        fcgi_resp_finish_of(&rows[i].cut, &f);
        if (strcmp(f.finish_reason, rows[i].finish) != 0)
            fail_msg("row %zu: finish %s, want %s", i, f.finish_reason, rows[i].finish);
        if (rows[i].stop_reason)
            assert_non_null(f.stop_reason);
        if (rows[i].stop_reason && strcmp(f.stop_reason, rows[i].stop_reason) != 0)
            fail_msg("row %zu: stop_reason %s, want %s", i, f.stop_reason, rows[i].stop_reason);
        if (!rows[i].stop_reason && f.stop_reason)
            fail_msg("row %zu: stop_reason %s, want none", i, f.stop_reason);
        assert_int_equal(f.tool_loop_capped, rows[i].capped);
    }
}

/* ---- Chunks ---- */

static void
test_fcgi_resp_chat_chunks(void **state)
{
    (void)state;
    struct json_object *c =
        roundtrip(fcgi_resp_chat_chunk(&chat_meta, fcgi_resp_delta_role(), NULL, NULL));
    assert_string_equal(str_at(c, "object"), "chat.completion.chunk");
    assert_string_equal(str_at(c, "id"), "chatcmpl-abc");
    assert_int_equal(json_object_get_int64(at(c, "created")), 1700000000);
    assert_string_equal(str_at(c, "model"), "smol");
    assert_string_equal(str_at(c, "system_fingerprint"), "fp_x");
    assert_int_equal(json_object_array_length(at(c, "choices")), 1);
    assert_int_equal(json_object_get_int(at(c, "choices[0].index")), 0);
    assert_string_equal(str_at(c, "choices[0].delta.role"), "assistant");
    assert_true(has(c, "choices[0].finish_reason"));
    assert_null(at(c, "choices[0].finish_reason"));
    assert_true(has(c, "choices[0].logprobs"));
    assert_false(has(c, "choices[0].stop_reason"));
    json_object_put(c);

    static const char text[] = "h\xc3\xa9\"llo\n";
    c = roundtrip(fcgi_resp_chat_chunk(&chat_meta, fcgi_resp_delta_content(text, sizeof(text) - 1),
                                       NULL, NULL));
    assert_string_equal(str_at(c, "choices[0].delta.content"), text);
    assert_false(has(c, "choices[0].delta.role"));
    json_object_put(c);

    c = roundtrip(fcgi_resp_chat_chunk(
        &chat_meta, fcgi_resp_delta_call_head(1, "call_X", "get_weather"), NULL, NULL));
    assert_int_equal(json_object_get_int(at(c, "choices[0].delta.tool_calls[0].index")), 1);
    assert_string_equal(str_at(c, "choices[0].delta.tool_calls[0].id"), "call_X");
    assert_string_equal(str_at(c, "choices[0].delta.tool_calls[0].type"), "function");
    assert_string_equal(str_at(c, "choices[0].delta.tool_calls[0].function.name"), "get_weather");
    assert_string_equal(str_at(c, "choices[0].delta.tool_calls[0].function.arguments"), "");
    json_object_put(c);

    c = roundtrip(fcgi_resp_chat_chunk(&chat_meta, fcgi_resp_delta_call_args(1, "{\"city\":", 8),
                                       NULL, NULL));
    assert_false(has(c, "choices[0].delta.tool_calls[0].id"));
    assert_false(has(c, "choices[0].delta.tool_calls[0].function.name"));
    assert_string_equal(str_at(c, "choices[0].delta.tool_calls[0].function.arguments"),
                        "{\"city\":");
    json_object_put(c);

    struct fcgi_resp_finish fin = {"length", "name_run_cap", true};
    c = roundtrip(fcgi_resp_chat_chunk(&chat_meta, NULL, NULL, &fin));
    assert_int_equal(json_object_object_length(at(c, "choices[0].delta")), 0);
    assert_string_equal(str_at(c, "choices[0].finish_reason"), "length");
    assert_string_equal(str_at(c, "choices[0].stop_reason"), "name_run_cap");
    assert_true(json_object_get_boolean(at(c, "choices[0].tool_loop_capped")));
    json_object_put(c);

    struct fcgi_resp_finish plain = {"stop", NULL, false};
    c = roundtrip(fcgi_resp_chat_chunk(&chat_meta, NULL, NULL, &plain));
    assert_string_equal(str_at(c, "choices[0].finish_reason"), "stop");
    assert_false(has(c, "choices[0].stop_reason"));
    assert_false(has(c, "choices[0].tool_loop_capped"));
    json_object_put(c);

    struct fcgi_resp_usage u = {.prompt_tokens = 9, .completion_tokens = 4, .cached_tokens = 2};
    c = roundtrip(fcgi_resp_usage_chunk(&chat_meta, &u));
    assert_int_equal(json_object_array_length(at(c, "choices")), 0);
    assert_int_equal(json_object_get_int(at(c, "usage.prompt_tokens")), 9);
    assert_int_equal(json_object_get_int(at(c, "usage.completion_tokens")), 4);
    assert_int_equal(json_object_get_int(at(c, "usage.total_tokens")), 13);
    assert_int_equal(json_object_get_int(at(c, "usage.prompt_tokens_details.cached_tokens")), 2);
    json_object_put(c);
}

static void
test_fcgi_resp_text_chunks(void **state)
{
    (void)state;
    struct fcgi_resp_meta m = chat_meta;
    m.kind = FCGI_REQ_COMPLETION;
    m.id = "cmpl-1";
    struct json_object *c = roundtrip(fcgi_resp_text_chunk(&m, "abc", 3, NULL, NULL));
    assert_string_equal(str_at(c, "object"), "text_completion");
    assert_string_equal(str_at(c, "choices[0].text"), "abc");
    assert_null(at(c, "choices[0].finish_reason"));
    assert_true(has(c, "choices[0].logprobs"));
    json_object_put(c);
    struct fcgi_resp_usage u = {1, 2, 0};
    c = roundtrip(fcgi_resp_usage_chunk(&m, &u));
    assert_string_equal(str_at(c, "object"), "text_completion");
    json_object_put(c);
}

/* ---- Whole responses ---- */

static void
test_fcgi_resp_chat_completion_shapes(void **state)
{
    (void)state;
    struct fcgi_resp_usage u = {.prompt_tokens = 5, .completion_tokens = 7, .cached_tokens = 0};
    struct fcgi_resp_finish fin = {"stop", NULL, false};
    struct json_object *c =
        roundtrip(fcgi_resp_chat_completion(&chat_meta, "Hi!", 3, NULL, 0, NULL, &fin, &u));
    assert_string_equal(str_at(c, "object"), "chat.completion");
    assert_string_equal(str_at(c, "choices[0].message.role"), "assistant");
    assert_string_equal(str_at(c, "choices[0].message.content"), "Hi!");
    assert_false(has(c, "choices[0].message.tool_calls"));
    assert_string_equal(str_at(c, "choices[0].finish_reason"), "stop");
    assert_int_equal(json_object_get_int(at(c, "usage.total_tokens")), 12);
    json_object_put(c);

    struct fcgi_resp_call calls[2] = {
        {.id = "call_a", .name = "get", .arguments = "{\"x\":1}"},
        {.id = "call_b", .name = "put", .arguments = "{}"},
    };
    struct fcgi_resp_finish tc = {"tool_calls", NULL, false};
    c = roundtrip(fcgi_resp_chat_completion(&chat_meta, "", 0, calls, 2, NULL, &tc, &u));
    assert_true(has(c, "choices[0].message.content"));
    assert_null(at(c, "choices[0].message.content"));
    assert_int_equal(json_object_array_length(at(c, "choices[0].message.tool_calls")), 2);
    assert_string_equal(str_at(c, "choices[0].message.tool_calls[1].id"), "call_b");
    assert_string_equal(str_at(c, "choices[0].message.tool_calls[0].type"), "function");
    assert_string_equal(str_at(c, "choices[0].message.tool_calls[0].function.name"), "get");
    assert_string_equal(str_at(c, "choices[0].message.tool_calls[0].function.arguments"),
                        "{\"x\":1}");
    assert_string_equal(str_at(c, "choices[0].finish_reason"), "tool_calls");
    json_object_put(c);

    /* content kept next to calls when there is some */
    c = roundtrip(
        fcgi_resp_chat_completion(&chat_meta, "Let me check.", 13, calls, 1, NULL, &tc, &u));
    assert_string_equal(str_at(c, "choices[0].message.content"), "Let me check.");
    json_object_put(c);

    struct fcgi_resp_meta m = chat_meta;
    m.kind = FCGI_REQ_COMPLETION;
    struct fcgi_resp_finish cut = {"length", "deadline", false};
    c = roundtrip(fcgi_resp_text_completion(&m, "once", 4, NULL, &cut, &u));
    assert_string_equal(str_at(c, "object"), "text_completion");
    assert_string_equal(str_at(c, "choices[0].text"), "once");
    assert_string_equal(str_at(c, "choices[0].finish_reason"), "length");
    assert_string_equal(str_at(c, "choices[0].stop_reason"), "deadline");
    assert_int_equal(json_object_get_int(at(c, "usage.completion_tokens")), 7);
    json_object_put(c);
}

/* ---- Logprobs ---- */

static struct cm_wire_token
tok(int32_t id, const char *text, float lp, int n_top)
{
    struct cm_wire_token t = {.id = id, .flags = CM_WIRE_TOKEN_LOGPROB, .logprob = lp};
    t.text_len = (uint32_t)strlen(text);
    memcpy(t.text, text, t.text_len);
    t.n_top = (uint32_t)n_top;
    for (int k = 0; k < n_top; k++) {
        t.top_ids[k] = k == 0 ? id : 1000 + k;
        t.top_logprobs[k] = lp - (float)k;
    }
    return t;
}

static void
test_fcgi_resp_logprobs_chat(void **state)
{
    (void)state;
    struct fcgi_resp_logprobs lp;
    fcgi_resp_logprobs_init(&lp, FCGI_REQ_CHAT, 2);
    assert_null(fcgi_resp_logprobs_take(&lp));
    struct cm_wire_token a = tok(5, "Hel", -0.25f, 3);
    struct cm_wire_token b = tok(6, "\xc3", -1.5f, 0); /* half a character */
    struct cm_wire_token no = {.id = 7};               /* no logprob: ignored */
    assert_int_equal(fcgi_resp_logprobs_add(&lp, &a), 0);
    assert_int_equal(fcgi_resp_logprobs_add(&lp, &b), 0);
    assert_int_equal(fcgi_resp_logprobs_add(&lp, &no), 0);
    struct json_object *o = roundtrip(fcgi_resp_logprobs_take(&lp));
    assert_int_equal(json_object_array_length(at(o, "content")), 2);
    assert_string_equal(str_at(o, "content[0].token"), "Hel");
    assert_float_equal(json_object_get_double(at(o, "content[0].logprob")), -0.25, 0);
    assert_int_equal(json_object_array_length(at(o, "content[0].bytes")), 3);
    assert_int_equal(json_object_get_int(at(o, "content[0].bytes[0]")), 'H');
    assert_int_equal(json_object_array_length(at(o, "content[0].top_logprobs")), 2);
    assert_string_equal(str_at(o, "content[0].top_logprobs[0].token"), "Hel");
    assert_string_equal(str_at(o, "content[0].top_logprobs[1].token"), "token_id:1001");
    assert_null(at(o, "content[0].top_logprobs[1].bytes"));
    assert_float_equal(json_object_get_double(at(o, "content[0].top_logprobs[1].logprob")), -1.25,
                       0);
    assert_string_equal(str_at(o, "content[1].token"), "\xef\xbf\xbd");
    assert_int_equal(json_object_get_int(at(o, "content[1].bytes[0]")), 0xc3);
    json_object_put(o);
    /* With the alternatives' texts from the engine, they are shown by text. */
    struct cm_wire_token c = tok(9, "lo", -0.5f, 2);
    c.flags |= CM_WIRE_TOKEN_TOP_TEXT;
    c.top_off[1] = 0;
    c.top_len[1] = 3;
    memcpy(c.top_text, "low", 3);
    assert_int_equal(fcgi_resp_logprobs_add(&lp, &c), 0);
    o = roundtrip(fcgi_resp_logprobs_take(&lp));
    assert_string_equal(str_at(o, "content[0].top_logprobs[1].token"), "low");
    assert_int_equal(json_object_array_length(at(o, "content[0].top_logprobs[1].bytes")), 3);
    json_object_put(o);
    /* taken: the next take starts afresh */
    assert_null(fcgi_resp_logprobs_take(&lp));
    struct cm_wire_token inf = tok(8, "x", -INFINITY, 0);
    assert_int_equal(fcgi_resp_logprobs_add(&lp, &inf), 0);
    o = roundtrip(fcgi_resp_logprobs_take(&lp));
    assert_int_equal(json_object_array_length(at(o, "content")), 1);
    assert_float_equal(json_object_get_double(at(o, "content[0].logprob")), -9999.0, 0);
    json_object_put(o);
    fcgi_resp_logprobs_fini(&lp);
}

static void
test_fcgi_resp_logprobs_completion(void **state)
{
    (void)state;
    struct fcgi_resp_logprobs lp;
    fcgi_resp_logprobs_init(&lp, FCGI_REQ_COMPLETION, 2);
    struct cm_wire_token a = tok(5, "Once", -0.5f, 2), b = tok(6, " upon", -0.75f, 2);
    assert_int_equal(fcgi_resp_logprobs_add(&lp, &a), 0);
    assert_int_equal(fcgi_resp_logprobs_add(&lp, &b), 0);
    struct json_object *o = roundtrip(fcgi_resp_logprobs_take(&lp));
    assert_string_equal(str_at(o, "tokens[1]"), " upon");
    assert_float_equal(json_object_get_double(at(o, "token_logprobs[0]")), -0.5, 0);
    assert_int_equal(json_object_get_int(at(o, "text_offset[0]")), 0);
    assert_int_equal(json_object_get_int(at(o, "text_offset[1]")), 4);
    assert_float_equal(json_object_get_double(at(o, "top_logprobs[0].Once")), -0.5, 0);
    assert_float_equal(json_object_get_double(at(o, "top_logprobs[0].token_id:1001")), -1.5, 0);
    json_object_put(o);
    /* offsets keep counting across takes (streaming) */
    struct cm_wire_token c = tok(7, " a", -1.0f, 0);
    assert_int_equal(fcgi_resp_logprobs_add(&lp, &c), 0);
    o = roundtrip(fcgi_resp_logprobs_take(&lp));
    assert_int_equal(json_object_get_int(at(o, "text_offset[0]")), 9);
    json_object_put(o);
    fcgi_resp_logprobs_fini(&lp);

    /* logprobs 0: no alternatives, top_logprobs entries null */
    fcgi_resp_logprobs_init(&lp, FCGI_REQ_COMPLETION, 0);
    assert_int_equal(fcgi_resp_logprobs_add(&lp, &a), 0);
    o = roundtrip(fcgi_resp_logprobs_take(&lp));
    assert_null(at(o, "top_logprobs[0]"));
    assert_int_equal(json_object_array_length(at(o, "top_logprobs")), 1);
    json_object_put(o);
    fcgi_resp_logprobs_fini(&lp);
}

/* ---- Errors ---- */

static void
test_fcgi_resp_errors(void **state)
{
    (void)state;
    assert_string_equal(fcgi_resp_error_type(400), "invalid_request_error");
    assert_string_equal(fcgi_resp_error_type(405), "invalid_request_error");
    assert_string_equal(fcgi_resp_error_type(413), "invalid_request_error");
    assert_string_equal(fcgi_resp_error_type(401), "authentication_error");
    assert_string_equal(fcgi_resp_error_type(404), "not_found_error");
    assert_string_equal(fcgi_resp_error_type(429), "rate_limit_exceeded");
    assert_string_equal(fcgi_resp_error_type(500), "server_error");
    assert_string_equal(fcgi_resp_error_type(503), "server_error");

    struct json_object *e =
        roundtrip(fcgi_resp_error("invalid_request_error", "bad temp", "temperature", NULL));
    assert_string_equal(str_at(e, "error.message"), "bad temp");
    assert_string_equal(str_at(e, "error.type"), "invalid_request_error");
    assert_string_equal(str_at(e, "error.param"), "temperature");
    assert_true(has(e, "error.code"));
    assert_null(at(e, "error.code"));
    json_object_put(e);
    e = roundtrip(
        fcgi_resp_error("invalid_request_error", "too long", "", "context_length_exceeded"));
    assert_null(at(e, "error.param"));
    assert_string_equal(str_at(e, "error.code"), "context_length_exceeded");
    json_object_put(e);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fcgi_resp_ids_unique_alnum),
        cmocka_unit_test(test_fcgi_resp_finish_table),
        cmocka_unit_test(test_fcgi_resp_chat_chunks),
        cmocka_unit_test(test_fcgi_resp_text_chunks),
        cmocka_unit_test(test_fcgi_resp_chat_completion_shapes),
        cmocka_unit_test(test_fcgi_resp_logprobs_chat),
        cmocka_unit_test(test_fcgi_resp_logprobs_completion),
        cmocka_unit_test(test_fcgi_resp_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

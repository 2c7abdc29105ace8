/*
 * Unit tests for fcgi/fcgi_req: every honoured field accepted with its value, and rejected with
 * the right param when of the wrong type or out of range; the mapping to SUBMIT.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "fcgi/fcgi.h"
#include "fcgi/fcgi_req.h"

static int
parse(enum fcgi_req_kind kind, const char *body, struct fcgi_req *r, struct fcgi_req_error *e)
{
    memset(e, 0, sizeof(*e));
    return fcgi_req_parse(kind, body, strlen(body), r, e);
}

#define CHAT_MSGS "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"

/* ---- Valid requests ---- */

static void
test_fcgi_req_minimal_chat(void **state)
{
    (void)state;
    struct fcgi_req r;
    struct fcgi_req_error e;
    assert_int_equal(parse(FCGI_REQ_CHAT, "{" CHAT_MSGS "}", &r, &e), 0);
    assert_int_equal(r.n_msgs, 1);
    assert_string_equal(r.msgs[0].role, "user");
    assert_string_equal(r.msgs[0].content, "hi");
    assert_null(r.model);
    assert_int_equal(r.max_tokens, 0);
    assert_float_equal(r.sampling.temperature, 1.0f, 0);
    assert_float_equal(r.sampling.top_p, 1.0f, 0);
    assert_false(r.sampling.has_seed);
    assert_int_equal(r.n_stop, 0);
    assert_false(r.stream);
    assert_false(r.logprobs);
    assert_int_equal(r.n_tools, 0);
    assert_int_equal(r.tool_choice, FCGI_TOOL_CHOICE_NONE);
    assert_false(fcgi_req_parses_tools(&r));
    assert_true(r.parallel_tool_calls);
    fcgi_req_fini(&r);
}

static void
test_fcgi_req_every_field(void **state)
{
    (void)state;
    const char *body =
        "{\"model\":\"m1\",\"messages\":["
        "{\"role\":\"system\",\"content\":\"sys\"},"
        "{\"role\":\"developer\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
        "{\"type\":\"text\",\"text\":\"bc\"}]},"
        "{\"role\":\"user\",\"content\":\"q\",\"name\":\"bob\"},"
        "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"call_1\","
        "\"type\":\"function\",\"function\":{\"name\":\"get\",\"arguments\":\"{\\\"x\\\":1}\"}},"
        "{\"id\":\"call_2\",\"type\":\"function\",\"function\":{\"name\":\"put\","
        "\"arguments\":{\"y\":2}}}]},"
        "{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"name\":\"get\",\"content\":\"r1\"},"
        "{\"role\":\"assistant\",\"content\":\"done\"}],"
        "\"max_tokens\":10,\"max_completion_tokens\":20,\"temperature\":0.5,\"top_p\":0.9,"
        "\"top_k\":40,\"min_p\":0.05,\"presence_penalty\":-1.5,\"frequency_penalty\":2,"
        "\"repetition_penalty\":1.1,\"seed\":42,\"stop\":[\"END\",\"\\n\\n\"],"
        "\"logit_bias\":{\"5\":-100,\"17\":2.5},\"logprobs\":true,\"top_logprobs\":3,\"n\":1,"
        "\"stream\":true,\"stream_options\":{\"include_usage\":true},"
        "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get\",\"description\":\"d\","
        "\"parameters\":{\"type\":\"object\"}}},{\"type\":\"function\",\"function\":{\"name\":"
        "\"put\"}}],\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"put\"}},"
        "\"parallel_tool_calls\":false,\"response_format\":{\"type\":\"text\"},\"timeout\":1.5,"
        "\"guards\":{\"name_run_cap\":0},\"user\":\"u\",\"unknown_field\":[1,2,{}]}";
    struct fcgi_req r;
    struct fcgi_req_error e;
    assert_int_equal(parse(FCGI_REQ_CHAT, body, &r, &e), 0);
    assert_string_equal(r.model, "m1");
    assert_int_equal(r.n_msgs, 6);
    assert_string_equal(r.msgs[1].role, "developer");
    assert_string_equal(r.msgs[1].content, "abc");
    assert_null(r.msgs[3].content);
    assert_int_equal(r.msgs[3].n_tool_calls, 2);
    assert_string_equal(r.msgs[3].tool_calls[0].id, "call_1");
    assert_string_equal(r.msgs[3].tool_calls[0].name, "get");
    assert_string_equal(r.msgs[3].tool_calls[0].arguments, "{\"x\":1}");
    assert_string_equal(r.msgs[3].tool_calls[1].name, "put");
    assert_string_equal(r.msgs[3].tool_calls[1].arguments, "{\"y\":2}");
    assert_string_equal(r.msgs[4].tool_call_id, "call_1");
    assert_string_equal(r.msgs[4].name, "get");
    assert_string_equal(r.msgs[4].content, "r1");
    assert_int_equal(r.msgs[5].n_tool_calls, 0);
    assert_int_equal(r.max_tokens, 20);
    assert_float_equal(r.sampling.temperature, 0.5f, 0);
    assert_float_equal(r.sampling.top_p, 0.9f, 0);
    assert_int_equal(r.sampling.top_k, 40);
    assert_float_equal(r.sampling.min_p, 0.05f, 0);
    assert_float_equal(r.sampling.presence_penalty, -1.5f, 0);
    assert_float_equal(r.sampling.frequency_penalty, 2.0f, 0);
    assert_float_equal(r.sampling.repetition_penalty, 1.1f, 0);
    assert_true(r.sampling.has_seed);
    assert_int_equal(r.sampling.seed, 42);
    assert_int_equal(r.n_stop, 2);
    assert_string_equal(r.stop[0], "END");
    assert_string_equal(r.stop[1], "\n\n");
    assert_int_equal(r.sampling.n_logit_bias, 2);
    int32_t id0 = r.sampling.logit_bias[0].id, id1 = r.sampling.logit_bias[1].id;
    assert_true((id0 == 5 && id1 == 17) || (id0 == 17 && id1 == 5));
    assert_true(r.logprobs);
    assert_int_equal(r.top_logprobs, 3);
    assert_true(r.stream);
    assert_true(r.include_usage);
    assert_int_equal(r.n_tools, 2);
    assert_non_null(r.tools_json);
    assert_non_null(strstr(r.tools_json, "\"name\":\"get\""));
    assert_int_equal(r.tool_choice, FCGI_TOOL_CHOICE_NAMED);
    assert_string_equal(r.tool_choice_name, "put");
    assert_true(fcgi_req_parses_tools(&r));
    assert_false(r.parallel_tool_calls);
    assert_int_equal(r.timeout_ms, 1500);
    assert_non_null(r.guards);
    assert_int_equal(json_object_get_type(r.guards), json_type_object);
    fcgi_req_fini(&r);
    fcgi_req_fini(&r); /* zeroed: a second fini is harmless */
}

static void
test_fcgi_req_completion(void **state)
{
    (void)state;
    struct fcgi_req r;
    struct fcgi_req_error e;
    assert_int_equal(parse(FCGI_REQ_COMPLETION,
                           "{\"prompt\":[\"Once upon\"],\"logprobs\":2,\"max_tokens\":5,"
                           "\"messages\":7,\"tools\":\"ignored here\",\"seed\":-1}",
                           &r, &e),
                     0);
    assert_string_equal(r.prompt, "Once upon");
    assert_int_equal(r.prompt_len, 9);
    assert_true(r.logprobs);
    assert_int_equal(r.top_logprobs, 2);
    assert_int_equal(r.max_tokens, 5);
    assert_int_equal(r.n_msgs, 0);
    assert_int_equal(r.n_tools, 0);
    assert_int_equal(r.sampling.seed, UINT64_MAX);
    fcgi_req_fini(&r);

    assert_int_equal(parse(FCGI_REQ_COMPLETION, "{\"prompt\":\"x\",\"logprobs\":0}", &r, &e), 0);
    assert_true(r.logprobs);
    assert_int_equal(r.top_logprobs, 0);
    fcgi_req_fini(&r);

    assert_int_equal(parse(FCGI_REQ_COMPLETION, "{\"prompt\":\"x\",\"logprobs\":null}", &r, &e), 0);
    assert_false(r.logprobs);
    fcgi_req_fini(&r);
}

static void
test_fcgi_req_tool_choice_values(void **state)
{
    (void)state;
    static const struct {
        const char *choice;
        bool tools;
        enum fcgi_req_tool_choice want;
        bool parses;
    } cases[] = {
        {NULL, true, FCGI_TOOL_CHOICE_AUTO, true},
        {"\"auto\"", true, FCGI_TOOL_CHOICE_AUTO, true},
        {"\"none\"", true, FCGI_TOOL_CHOICE_NONE, false},
        {"\"required\"", true, FCGI_TOOL_CHOICE_REQUIRED, true},
        {"\"auto\"", false, FCGI_TOOL_CHOICE_NONE, false},
        {"\"none\"", false, FCGI_TOOL_CHOICE_NONE, false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char body[512];
        snprintf(body, sizeof(body), "{" CHAT_MSGS "%s%s%s}",
                 cases[i].tools ? ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":"
                                  "\"f\"}}]"
                                : "",
                 cases[i].choice ? ",\"tool_choice\":" : "",
                 cases[i].choice ? cases[i].choice : "");
        struct fcgi_req r;
        struct fcgi_req_error e;
        assert_int_equal(parse(FCGI_REQ_CHAT, body, &r, &e), 0);
        assert_int_equal(r.tool_choice, cases[i].want);
        assert_int_equal(fcgi_req_parses_tools(&r), cases[i].parses);
        fcgi_req_fini(&r);
    }
}

static void
test_fcgi_req_nulls_are_absent(void **state)
{
    (void)state;
    struct fcgi_req r;
    struct fcgi_req_error e;
    assert_int_equal(parse(FCGI_REQ_CHAT,
                           "{" CHAT_MSGS ",\"model\":null,\"max_tokens\":null,\"temperature\":"
                           "null,\"stop\":null,\"tools\":null,\"tool_choice\":null,\"n\":null,"
                           "\"stream_options\":null,\"response_format\":null,\"seed\":null}",
                           &r, &e),
                     0);
    assert_null(r.model);
    assert_int_equal(r.max_tokens, 0);
    assert_false(r.sampling.has_seed);
    fcgi_req_fini(&r);
}

static void
test_fcgi_req_top_k_minus_one_and_huge_max_tokens(void **state)
{
    (void)state;
    struct fcgi_req r;
    struct fcgi_req_error e;
    assert_int_equal(
        parse(FCGI_REQ_CHAT, "{" CHAT_MSGS ",\"top_k\":-1,\"max_tokens\":99999999999}", &r, &e), 0);
    assert_int_equal(r.sampling.top_k, 0);
    assert_int_equal(r.max_tokens, CM_WIRE_MAX_VOCAB);
    fcgi_req_fini(&r);
}

/* ---- Invalid requests: each names its param ---- */

struct bad_case {
    enum fcgi_req_kind kind;
    const char *body;
    const char *param; /* "" for null */
};

#define C(body, param)                                                                             \
    {                                                                                              \
        FCGI_REQ_CHAT, body, param                                                                 \
    }
#define P(body, param)                                                                             \
    {                                                                                              \
        FCGI_REQ_COMPLETION, body, param                                                           \
    }
#define M CHAT_MSGS

static const struct bad_case bad_cases[] = {
    /* the body itself */
    C("", ""),
    C("{", ""),
    C("[1]", ""),
    C("{\"messages\":[]} x", ""),
    C("{\"messages\":\"\xff\"}", ""),
    /* messages */
    C("{}", "messages"),
    C("{\"messages\":{}}", "messages"),
    C("{\"messages\":[]}", "messages"),
    C("{\"messages\":[1]}", "messages[0]"),
    C("{\"messages\":[{\"content\":\"x\"}]}", "messages[0].role"),
    C("{\"messages\":[{\"role\":5,\"content\":\"x\"}]}", "messages[0].role"),
    C("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"function\","
      "\"content\":\"x\"}]}",
      "messages[1].role"),
    C("{\"messages\":[{\"role\":\"user\"}]}", "messages[0].content"),
    C("{\"messages\":[{\"role\":\"user\",\"content\":null}]}", "messages[0].content"),
    C("{\"messages\":[{\"role\":\"user\",\"content\":3}]}", "messages[0].content"),
    C("{\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\"}]}", "messages[0].content"),
    C("{\"messages\":[{\"role\":\"user\",\"content\":[\"x\"]}]}", "messages[0].content[0]"),
    C("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}",
      "messages[0].content[0].type"),
    C("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":1}]}]}",
      "messages[0].content[0].text"),
    C("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}",
      "messages[0].content[0].text"),
    C("{\"messages\":[{\"role\":\"tool\",\"content\":\"r\"}]}", "messages[0].tool_call_id"),
    C("{\"messages\":[{\"role\":\"tool\",\"content\":\"r\",\"tool_call_id\":1}]}",
      "messages[0].tool_call_id"),
    C("{\"messages\":[{\"role\":\"tool\",\"content\":\"r\",\"tool_call_id\":\"c\","
      "\"name\":[]}]}",
      "messages[0].name"),
    C("{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":{}}]}", "messages[0].tool_calls"),
    C("{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[1]}]}", "messages[0].tool_calls[0]"),
    C("{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"type\":\"x\",\"function\":{"
      "\"name\":\"f\",\"arguments\":\"{}\"}}]}]}",
      "messages[0].tool_calls[0].type"),
    C("{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":3,\"function\":{"
      "\"name\":\"f\",\"arguments\":\"{}\"}}]}]}",
      "messages[0].tool_calls[0].id"),
    C("{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"id\":\"c\"}]}]}",
      "messages[0].tool_calls[0].function"),
    C("{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"arguments\":"
      "\"{}\"}}]}]}",
      "messages[0].tool_calls[0].function.name"),
    C("{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"name\":\"\","
      "\"arguments\":\"{}\"}}]}]}",
      "messages[0].tool_calls[0].function.name"),
    C("{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"name\":\"f\"}}"
      "]}]}",
      "messages[0].tool_calls[0].function.arguments"),
    C("{\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"name\":\"f\","
      "\"arguments\":7}}]}]}",
      "messages[0].tool_calls[0].function.arguments"),
    /* prompt */
    P("{}", "prompt"),
    P("{\"prompt\":1}", "prompt"),
    P("{\"prompt\":[]}", "prompt"),
    P("{\"prompt\":[\"a\",\"b\"]}", "prompt"),
    P("{\"prompt\":[[1,2]]}", "prompt"),
    P("{\"prompt\":[1,2]}", "prompt"),
    P("{\"prompt\":\"a\\u0000\"}", "prompt"),
    /* model, user, guards, response_format */
    C("{" M ",\"model\":1}", "model"),
    C("{" M ",\"user\":1}", "user"),
    C("{" M ",\"guards\":true}", "guards"),
    C("{" M ",\"response_format\":{\"type\":\"json_object\"}}", "response_format"),
    C("{" M ",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{}}}",
      "response_format"),
    C("{" M ",\"response_format\":\"text\"}", "response_format"),
    C("{" M ",\"response_format\":{}}", "response_format"),
    /* limits */
    C("{" M ",\"max_tokens\":0}", "max_tokens"),
    C("{" M ",\"max_tokens\":-5}", "max_tokens"),
    C("{" M ",\"max_tokens\":1.5}", "max_tokens"),
    C("{" M ",\"max_tokens\":\"10\"}", "max_tokens"),
    C("{" M ",\"max_completion_tokens\":0}", "max_completion_tokens"),
    C("{" M ",\"max_completion_tokens\":true}", "max_completion_tokens"),
    C("{" M ",\"n\":2}", "n"),
    C("{" M ",\"n\":0}", "n"),
    C("{" M ",\"n\":\"1\"}", "n"),
    C("{" M ",\"timeout\":0}", "timeout"),
    C("{" M ",\"timeout\":-1}", "timeout"),
    C("{" M ",\"timeout\":1e9}", "timeout"),
    C("{" M ",\"timeout\":\"5\"}", "timeout"),
    /* sampling */
    C("{" M ",\"temperature\":-0.1}", "temperature"),
    C("{" M ",\"temperature\":2.01}", "temperature"),
    C("{" M ",\"temperature\":\"1\"}", "temperature"),
    C("{" M ",\"temperature\":1e999}", "temperature"),
    C("{" M ",\"top_p\":0}", "top_p"),
    C("{" M ",\"top_p\":1.01}", "top_p"),
    C("{" M ",\"top_p\":false}", "top_p"),
    C("{" M ",\"top_k\":-2}", "top_k"),
    C("{" M ",\"top_k\":2.5}", "top_k"),
    C("{" M ",\"top_k\":99999999999}", "top_k"),
    C("{" M ",\"min_p\":-0.01}", "min_p"),
    C("{" M ",\"min_p\":1.5}", "min_p"),
    C("{" M ",\"presence_penalty\":2.5}", "presence_penalty"),
    C("{" M ",\"presence_penalty\":-2.5}", "presence_penalty"),
    C("{" M ",\"frequency_penalty\":3}", "frequency_penalty"),
    C("{" M ",\"frequency_penalty\":[]}", "frequency_penalty"),
    C("{" M ",\"repetition_penalty\":0}", "repetition_penalty"),
    C("{" M ",\"repetition_penalty\":11}", "repetition_penalty"),
    C("{" M ",\"seed\":1.5}", "seed"),
    C("{" M ",\"seed\":\"1\"}", "seed"),
    /* stop */
    C("{" M ",\"stop\":1}", "stop"),
    C("{" M ",\"stop\":\"\"}", "stop"),
    C("{" M ",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", "stop"),
    C("{" M ",\"stop\":[\"a\",2]}", "stop[1]"),
    C("{" M ",\"stop\":[\"a\",\"\"]}", "stop[1]"),
    C("{" M ",\"stop\":{}}", "stop"),
    /* logit_bias */
    C("{" M ",\"logit_bias\":[]}", "logit_bias"),
    C("{" M ",\"logit_bias\":{\"x\":1}}", "logit_bias"),
    C("{" M ",\"logit_bias\":{\"-1\":1}}", "logit_bias"),
    C("{" M ",\"logit_bias\":{\"01\":1}}", "logit_bias"),
    C("{" M ",\"logit_bias\":{\"99999999\":1}}", "logit_bias"),
    C("{" M ",\"logit_bias\":{\"1\":101}}", "logit_bias"),
    C("{" M ",\"logit_bias\":{\"1\":\"1\"}}", "logit_bias"),
    /* logprobs */
    C("{" M ",\"logprobs\":1}", "logprobs"),
    C("{" M ",\"top_logprobs\":2}", "top_logprobs"),
    C("{" M ",\"logprobs\":false,\"top_logprobs\":2}", "top_logprobs"),
    C("{" M ",\"logprobs\":true,\"top_logprobs\":21}", "top_logprobs"),
    C("{" M ",\"logprobs\":true,\"top_logprobs\":-1}", "top_logprobs"),
    P("{\"prompt\":\"x\",\"logprobs\":6}", "logprobs"),
    P("{\"prompt\":\"x\",\"logprobs\":true}", "logprobs"),
    P("{\"prompt\":\"x\",\"logprobs\":-1}", "logprobs"),
    /* stream */
    C("{" M ",\"stream\":1}", "stream"),
    C("{" M ",\"stream_options\":{\"include_usage\":true}}", "stream_options"),
    C("{" M ",\"stream\":true,\"stream_options\":[]}", "stream_options"),
    C("{" M ",\"stream\":true,\"stream_options\":{\"include_usage\":1}}",
      "stream_options.include_usage"),
    /* tools */
    C("{" M ",\"tools\":{}}", "tools"),
    C("{" M ",\"tools\":[1]}", "tools[0]"),
    C("{" M ",\"tools\":[{\"function\":{\"name\":\"f\"}}]}", "tools[0].type"),
    C("{" M ",\"tools\":[{\"type\":\"code\",\"function\":{\"name\":\"f\"}}]}", "tools[0].type"),
    C("{" M ",\"tools\":[{\"type\":\"function\"}]}", "tools[0].function"),
    C("{" M ",\"tools\":[{\"type\":\"function\",\"function\":{}}]}", "tools[0].function.name"),
    C("{" M ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"a b\"}}]}",
      "tools[0].function.name"),
    C("{" M ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}},{\"type\":"
      "\"function\",\"function\":{\"name\":\"f\"}}]}",
      "tools[1].function.name"),
    C("{" M ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\","
      "\"description\":1}}]}",
      "tools[0].function.description"),
    C("{" M ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\","
      "\"parameters\":[]}}]}",
      "tools[0].function.parameters"),
    C("{" M ",\"parallel_tool_calls\":\"yes\"}", "parallel_tool_calls"),
    C("{" M ",\"tool_choice\":\"required\"}", "tool_choice"),
    C("{" M ",\"tool_choice\":\"sometimes\"}", "tool_choice"),
    C("{" M ",\"tool_choice\":3}", "tool_choice"),
    C("{" M ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],"
      "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"g\"}}}",
      "tool_choice"),
    C("{" M ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],"
      "\"tool_choice\":{\"type\":\"function\"}}",
      "tool_choice"),
    C("{" M ",\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"f\"}}}",
      "tool_choice"),
};

static void
test_fcgi_req_invalid_fields_name_param(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++) {
        const struct bad_case *c = &bad_cases[i];
        struct fcgi_req r;
        struct fcgi_req_error e;
        memset(&r, 0x5a, sizeof(r));
        int rc = parse(c->kind, c->body, &r, &e);
        if (rc != -EINVAL || strcmp(e.param, c->param) != 0 || e.status != 400 || e.message[0] == 0)
            fail_msg("case %zu %s: rc %d param '%s' (want '%s') message '%s'", i, c->body, rc,
                     e.param, c->param, e.message);
        /* *out untouched on failure */
        assert_int_equal(((unsigned char *)&r)[0], 0x5a);
    }
}

/* Found by fuzz_req: json-c's UTF-8 check passed overlong and other ill-formed sequences, so a
 * validated request carried a prompt the engine's SUBMIT validator refuses. */
static void
test_fcgi_req_rejects_ill_formed_utf8(void **state)
{
    static const char *const bodies[] = {
        "{\"prompt\": \"a\xc1\xa9\"}",        /* overlong (C1) */
        "{\"prompt\": \"\xc0\x80\"}",         /* overlong NUL */
        "{\"prompt\": \"\xed\xa0\x80\"}",     /* a surrogate */
        "{\"prompt\": \"\xf4\x90\x80\x80\"}", /* above U+10FFFF */
        "{\"prompt\": \"\xe2\x82\"}",         /* truncated */
    };
    (void)state;
    for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
        struct fcgi_req r;
        struct fcgi_req_error e;
        memset(&r, 0x5a, sizeof(r));
        assert_int_equal(fcgi_req_parse(FCGI_REQ_COMPLETION, bodies[i], strlen(bodies[i]), &r, &e),
                         -EINVAL);
        assert_int_equal(e.status, 400);
        assert_int_equal(((unsigned char *)&r)[0], 0x5a);
    }
    struct fcgi_req r;
    struct fcgi_req_error e;
    static const char ok[] = "{\"prompt\": \"Gr\xc3\xbc\xc3\x9f\xc3\x9f \xf0\x9f\x99\x82\"}";
    assert_int_equal(fcgi_req_parse(FCGI_REQ_COMPLETION, ok, sizeof(ok) - 1, &r, &e), 0);
    fcgi_req_fini(&r);
}

static void
test_fcgi_req_deep_nesting_and_nul_byte(void **state)
{
    (void)state;
    char body[1024];
    size_t n = 0;
    n += (size_t)snprintf(body, sizeof(body), "{" CHAT_MSGS ",\"x\":");
    for (int i = 0; i < 200; i++)
        body[n++] = '[';
    for (int i = 0; i < 200; i++)
        body[n++] = ']';
    body[n++] = '}';
    struct fcgi_req r;
    struct fcgi_req_error e;
    assert_int_equal(fcgi_req_parse(FCGI_REQ_CHAT, body, n, &r, &e), -EINVAL);
    assert_string_equal(e.param, "");

    static const char with_nul[] = "{\"messages\":[{\"role\":\"user\",\"content\":\"a\0b\"}]}";
    assert_int_equal(fcgi_req_parse(FCGI_REQ_CHAT, with_nul, sizeof(with_nul) - 1, &r, &e),
                     -EINVAL);
    assert_int_equal(fcgi_req_parse(FCGI_REQ_CHAT, NULL, 0, &r, &e), -EINVAL);
}

/* ---- Mapping to SUBMIT ---- */

static void
test_fcgi_req_to_submit(void **state)
{
    (void)state;
    struct fcgi_conf conf = {.request_timeout_s = 600, .default_max_tokens = 0};
    struct fcgi_req r;
    struct fcgi_req_error e;
    assert_int_equal(parse(FCGI_REQ_CHAT,
                           "{" CHAT_MSGS ",\"temperature\":0,\"seed\":7,\"logit_bias\":{\"3\":1},"
                           "\"logprobs\":true,\"top_logprobs\":4}",
                           &r, &e),
                     0);
    struct cm_wire_submit s;
    fcgi_req_to_submit(&r, &conf, 2048, &s);
    assert_int_equal(s.max_tokens, 2048); /* up to the context: the engine caps */
    assert_float_equal(s.sampling.temperature, 0.0f, 0);
    assert_true(s.sampling.has_seed);
    assert_int_equal(s.sampling.seed, 7);
    assert_int_equal(s.sampling.n_logit_bias, 1);
    assert_ptr_equal(s.sampling.logit_bias, r.sampling.logit_bias);
    assert_true(s.logprobs);
    assert_int_equal(s.top_logprobs, 4);
    assert_int_equal(s.deadline_ms, 600000);
    assert_true(s.add_special);
    assert_true(s.parse_special);
    s.prompt = "x";
    s.prompt_len = 1;
    char err[CM_WIRE_ERR_LEN];
    assert_int_equal(cm_wire_submit_validate(&s, err, sizeof(err)), 0);

    conf.default_max_tokens = 128;
    assert_int_equal(fcgi_req_max_tokens(&r, &conf, 2048), 128);
    r.max_tokens = 9;
    assert_int_equal(fcgi_req_max_tokens(&r, &conf, 2048), 9);
    r.timeout_ms = 2500;
    assert_int_equal(fcgi_req_deadline_ms(&r, &conf), 2500);
    r.timeout_ms = 0;
    conf.request_timeout_s = 0;
    assert_int_equal(fcgi_req_deadline_ms(&r, &conf), 0);
    assert_int_equal(fcgi_req_deadline_ms(&r, NULL), 0);
    r.max_tokens = 0;
    assert_int_equal(fcgi_req_max_tokens(&r, NULL, 4096), 4096);
    fcgi_req_fini(&r);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fcgi_req_minimal_chat),
        cmocka_unit_test(test_fcgi_req_every_field),
        cmocka_unit_test(test_fcgi_req_completion),
        cmocka_unit_test(test_fcgi_req_tool_choice_values),
        cmocka_unit_test(test_fcgi_req_nulls_are_absent),
        cmocka_unit_test(test_fcgi_req_top_k_minus_one_and_huge_max_tokens),
        cmocka_unit_test(test_fcgi_req_invalid_fields_name_param),
        cmocka_unit_test(test_fcgi_req_rejects_ill_formed_utf8),
        cmocka_unit_test(test_fcgi_req_deep_nesting_and_nul_byte),
        cmocka_unit_test(test_fcgi_req_to_submit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

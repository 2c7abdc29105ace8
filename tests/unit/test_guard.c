/*
 * Unit tests for guards/guard: names, the configuration (defaults, flag/config-file setters,
 * request overrides that may only lower or disable), the tool-loop guards (each at exactly its
 * threshold and one below, a reset, the legitimate look-alikes: a 3-call parallel fan-out, the
 * same tool with different arguments, a long file written through one call), the permanent-failure
 * circuit breaker over the history, unterminated_tool_call, --no-guards, and the token_loop
 * detector. The content guards are in test_guard_watch.c.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "common/cm_chat.h"
#include "guards/guard.h"
#include "guards/guard_toolcall.h"

/* ---- Allocation-failure injection (glibc malloc replaced in this binary; skipped under
 * sanitizers, which own malloc). Only allocations made by code of this executable (libllm.a's
 * objects) are failed; json-c's own are counted for leaks but never failed. ---- */

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define GUARD_SANITIZED 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) ||                         \
    __has_feature(memory_sanitizer)
#define GUARD_SANITIZED 1
#endif
#endif

#ifndef GUARD_SANITIZED
static bool fi_on;
static long fi_fail_at; /* 1-based index of the allocation to fail in the window; 0: none */
static long fi_count;   /* allocations attempted in the window by this executable's code */
static long fi_live;    /* allocations minus frees in the window (any caller) */

void *__libc_malloc(size_t n);
void *__libc_calloc(size_t count, size_t size);
void *__libc_realloc(void *p, size_t n);
void __libc_free(void *p);
extern char __executable_start[], etext[];

static bool
fi_should_fail(const void *caller)
{
    if (!fi_on || (const char *)caller < __executable_start || (const char *)caller >= etext)
        return false;
    return ++fi_count == fi_fail_at;
}

void *
malloc(size_t n)
{
    if (fi_should_fail(__builtin_return_address(0)))
        return NULL;
    void *p = __libc_malloc(n);
    if (p && fi_on)
        fi_live++;
    return p;
}

void *
calloc(size_t count, size_t size)
{
    if (fi_should_fail(__builtin_return_address(0)))
        return NULL;
    void *p = __libc_calloc(count, size);
    if (p && fi_on)
        fi_live++;
    return p;
}

void *
realloc(void *p, size_t n)
{
    if (fi_should_fail(__builtin_return_address(0)))
        return NULL;
    void *q = __libc_realloc(p, n);
    if (fi_on && !p && q)
        fi_live++;
    else if (fi_on && p && n == 0)
        fi_live--;
    return q;
}

void
free(void *p)
{
    if (p && fi_on)
        fi_live--;
    __libc_free(p);
}
#endif

/* ---- Helpers ---- */

static struct guard *
new_guard(const struct guard_config *cfg, const struct cm_chat_msg *h, int n)
{
    struct guard *g = NULL;
    assert_int_equal(guard_new(cfg, h, n, &g), 0);
    assert_non_null(g);
    return g;
}

static struct guard *
default_guard(void)
{
    struct guard_config c;
    guard_config_init(&c);
    return new_guard(&c, NULL, 0);
}

static enum guard_id
call(struct guard *g, const char *name, const char *args)
{
    return guard_feed_call(g, name, args, strlen(args));
}

/* A config with only guard `only` on (at its default or value v when v > 0). */
static void
config_only(struct guard_config *c, enum guard_id only, double v)
{
    guard_config_init(c);
    for (int i = 0; i < GUARD_N; i++)
        if (i != (int)only)
            c->value[i] = 0;
    if (v > 0)
        c->value[only] = v;
}

/* ---- Names ---- */

static void
test_guard_names(void **state)
{
    (void)state;
    static const char *const names[GUARD_N] = {
        "name_run_cap",  "identical_call",         "repeated_call_history",
        "tool_call_cap", "permanent_failure",      "line_repeat",
        "sentence_loop", "unterminated_tool_call", "token_loop",
    };
    for (int i = 0; i < GUARD_N; i++) {
        enum guard_id id = GUARD_NONE;
        assert_string_equal(guard_name((enum guard_id)i), names[i]);
        assert_int_equal(guard_from_name(names[i], &id), 0);
        assert_int_equal(id, i);
        assert_int_equal(guard_is_tool_loop((enum guard_id)i), i <= GUARD_PERMANENT_FAILURE);
    }
    assert_null(guard_name(GUARD_NONE));
    assert_null(guard_name(GUARD_N));
    assert_false(guard_is_tool_loop(GUARD_NONE));
    assert_int_equal(guard_from_name("Name_Run_Cap", NULL), -ENOENT);
    assert_int_equal(guard_from_name("stop_string", NULL), -ENOENT);
}

/* ---- Configuration ---- */

static void
test_guard_config_defaults(void **state)
{
    (void)state;
    struct guard_config c;
    guard_config_init(&c);
    assert_true(c.enabled);
    assert_true(c.value[GUARD_NAME_RUN_CAP] == 8);
    assert_true(c.value[GUARD_IDENTICAL_CALL] == 4);
    assert_true(c.value[GUARD_REPEATED_CALL_HISTORY] == 8);
    assert_true(c.value[GUARD_TOOL_CALL_CAP] == 12);
    assert_true(c.value[GUARD_PERMANENT_FAILURE] == 1);
    assert_true(c.value[GUARD_LINE_REPEAT] == 4);
    assert_true(c.value[GUARD_SENTENCE_LOOP] == 0.55);
    assert_true(c.value[GUARD_UNTERMINATED_TOOL_CALL] == 1024);
    assert_true(c.value[GUARD_TOKEN_LOOP] == 0);
    for (int i = 0; i < GUARD_N; i++)
        assert_int_equal(guard_config_active(&c, (enum guard_id)i), i != GUARD_TOKEN_LOOP);
}

static void
test_guard_config_set(void **state)
{
    (void)state;
    struct guard_config c;
    char err[160];
    guard_config_init(&c);
    assert_int_equal(guard_config_set(&c, "name_run_cap", " 5 ", err, sizeof(err)), 0);
    assert_true(c.value[GUARD_NAME_RUN_CAP] == 5);
    assert_int_equal(guard_config_set(&c, "tool-call-cap", "0", err, sizeof(err)), 0);
    assert_false(guard_config_active(&c, GUARD_TOOL_CALL_CAP));
    assert_int_equal(guard_config_set(&c, "sentence_loop", "0.7", err, sizeof(err)), 0);
    assert_true(c.value[GUARD_SENTENCE_LOOP] == 0.7);
    assert_int_equal(guard_config_set(&c, "token_loop", "3", err, sizeof(err)), 0);
    assert_true(guard_config_active(&c, GUARD_TOKEN_LOOP));

    struct guard_config before = c;
    assert_int_equal(guard_config_set(&c, "name_run_cap", "8x", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "name_run_cap"));
    assert_non_null(strstr(err, "8x"));
    assert_int_equal(guard_config_set(&c, "name_run_cap", "-1", err, sizeof(err)), -EINVAL);
    assert_int_equal(guard_config_set(&c, "name_run_cap", "", err, sizeof(err)), -EINVAL);
    assert_int_equal(guard_config_set(&c, "identical_call", "2", err, sizeof(err)), -EINVAL);
    assert_int_equal(guard_config_set(&c, "identical_call", "65", err, sizeof(err)), -EINVAL);
    assert_int_equal(guard_config_set(&c, "sentence_loop", "1.5", err, sizeof(err)), -EINVAL);
    assert_int_equal(guard_config_set(&c, "permanent_failure", "2", err, sizeof(err)), -EINVAL);
    assert_int_equal(guard_config_set(&c, "line_repeat", "4.5", err, sizeof(err)), -EINVAL);
    assert_int_equal(guard_config_set(&c, "no_such_guard", "1", err, sizeof(err)), -ENOENT);
    assert_non_null(strstr(err, "no_such_guard"));
    assert_memory_equal(&c, &before, sizeof(c));

    assert_int_equal(guard_config_set(&c, "guards", "off", NULL, 0), 0);
    assert_false(c.enabled);
    for (int i = 0; i < GUARD_N; i++)
        assert_false(guard_config_active(&c, (enum guard_id)i));
    assert_int_equal(guard_config_set(&c, "guards", "on", NULL, 0), 0);
    assert_true(c.enabled);
    assert_int_equal(guard_config_set(&c, "guards", "maybe", NULL, 0), -EINVAL);
}

static int
override(struct guard_config *c, const char *json, char *err, size_t len)
{
    struct json_object *o = json_tokener_parse(json);
    assert_non_null(o);
    int rc = guard_config_override(c, o, err, len);
    json_object_put(o);
    return rc;
}

static void
test_guard_config_override_lowers_and_disables(void **state)
{
    (void)state;
    struct guard_config c;
    char err[200] = "";
    guard_config_init(&c);
    assert_int_equal(override(&c,
                              "{\"name_run_cap\": 3, \"identical_call\": 0, "
                              "\"sentence_loop\": 0.5, \"line_repeat\": false, "
                              "\"tool_call_cap\": 12}",
                              err, sizeof(err)),
                     0);
    assert_true(c.value[GUARD_NAME_RUN_CAP] == 3);
    assert_false(guard_config_active(&c, GUARD_IDENTICAL_CALL));
    assert_true(c.value[GUARD_SENTENCE_LOOP] == 0.5);
    assert_false(guard_config_active(&c, GUARD_LINE_REPEAT));
    assert_true(c.value[GUARD_TOOL_CALL_CAP] == 12);
    assert_int_equal(override(&c, "{}", err, sizeof(err)), 0);
}

static void
test_guard_config_override_cannot_raise(void **state)
{
    (void)state;
    struct guard_config c, before;
    char err[200] = "";
    guard_config_init(&c);
    before = c;
    /* one above the server's value, in a batch whose other key is fine: nothing changes */
    assert_int_equal(override(&c, "{\"tool_call_cap\": 2, \"name_run_cap\": 9}", err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "name_run_cap"));
    assert_non_null(strstr(err, "9"));
    assert_memory_equal(&c, &before, sizeof(c));
    assert_int_equal(override(&c, "{\"sentence_loop\": 0.56}", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "sentence_loop"));
    assert_int_equal(override(&c, "{\"unterminated_tool_call\": 1025}", err, sizeof(err)), -EINVAL);
    /* a guard that is off on the server cannot be enabled by a request */
    c.value[GUARD_NAME_RUN_CAP] = 0;
    assert_int_equal(override(&c, "{\"name_run_cap\": 2}", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "name_run_cap"));
    assert_false(guard_config_active(&c, GUARD_NAME_RUN_CAP));
    /* bad keys, types and values */
    assert_int_equal(override(&c, "{\"bogus\": 1}", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "bogus"));
    assert_int_equal(override(&c, "{\"line_repeat\": \"2\"}", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "line_repeat"));
    assert_int_equal(override(&c, "{\"line_repeat\": -1}", err, sizeof(err)), -EINVAL);
    assert_int_equal(override(&c, "{\"line_repeat\": 2.5}", err, sizeof(err)), -EINVAL);
    assert_int_equal(override(&c, "{\"line_repeat\": true}", err, sizeof(err)), -EINVAL);
    assert_int_equal(override(&c, "[1]", err, sizeof(err)), -EINVAL);
    assert_int_equal(guard_config_override(&c, NULL, err, sizeof(err)), -EINVAL);
}

static void
test_guard_config_override_token_loop(void **state)
{
    (void)state;
    struct guard_config c;
    char err[200];
    guard_config_init(&c);
    /* GUARDS.md: token_loop is off unless enabled by config or request */
    assert_int_equal(override(&c, "{\"token_loop\": true}", err, sizeof(err)), 0);
    assert_true(guard_config_active(&c, GUARD_TOKEN_LOOP));
    assert_int_equal(guard_config_int(&c, GUARD_TOKEN_LOOP), 3);
    assert_int_equal(override(&c, "{\"token_loop\": 4}", err, sizeof(err)), -EINVAL);
    assert_int_equal(override(&c, "{\"token_loop\": 2}", err, sizeof(err)), 0);
    /* --no-guards: a request turns nothing on */
    guard_config_init(&c);
    c.enabled = false;
    assert_int_equal(override(&c, "{\"token_loop\": 3}", err, sizeof(err)), 0);
    assert_false(guard_config_active(&c, GUARD_TOKEN_LOOP));
    assert_int_equal(guard_config_int(&c, GUARD_TOKEN_LOOP), 0);
    assert_int_equal(guard_config_int(&c, GUARD_NAME_RUN_CAP), 0);
}

/* ---- name_run_cap ---- */

static void
test_guard_name_run_cap_threshold(void **state)
{
    (void)state;
    struct guard_config c;
    char args[64];
    guard_config_init(&c);
    c.value[GUARD_TOOL_CALL_CAP] = 0;
    struct guard *g = new_guard(&c, NULL, 0);
    for (int i = 0; i < 7; i++) {
        snprintf(args, sizeof(args), "{\"path\":\"/src/f%d.c\"}", i);
        assert_int_equal(call(g, "read_file", args), GUARD_NONE);
    }
    assert_int_equal(call(g, "read_file", "{\"path\":\"/src/f7.c\"}"), GUARD_NAME_RUN_CAP);
    assert_true(guard_is_tool_loop(guard_tripped(g)));
    /* stays tripped whatever comes next */
    assert_int_equal(call(g, "other", "{}"), GUARD_NAME_RUN_CAP);
    assert_int_equal(guard_feed_text(g, "fine", 4), GUARD_NAME_RUN_CAP);
    assert_int_equal(guard_feed_call_tokens(g, 0), GUARD_NAME_RUN_CAP);
    guard_free(g);
}

static void
test_guard_name_run_cap_reset_by_other_name(void **state)
{
    (void)state;
    struct guard_config c;
    char args[64];
    guard_config_init(&c);
    c.value[GUARD_TOOL_CALL_CAP] = 0;
    struct guard *g = new_guard(&c, NULL, 0);
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 7; i++) {
            snprintf(args, sizeof(args), "{\"path\":\"/r%d/f%d.c\"}", round, i);
            assert_int_equal(call(g, "read_file", args), GUARD_NONE);
        }
        snprintf(args, sizeof(args), "{\"pattern\":\"r%d\"}", round);
        assert_int_equal(call(g, "grep", args), GUARD_NONE);
    }
    guard_free(g);
}

/* ---- identical_call ---- */

static void
test_guard_identical_call_twice_in_a_row(void **state)
{
    (void)state;
    struct guard *g = default_guard();
    assert_int_equal(call(g, "bash", "{\"command\":\"ls\"}"), GUARD_NONE);
    assert_int_equal(call(g, "bash", "{\"command\":\"pwd\"}"), GUARD_NONE);
    assert_int_equal(call(g, "bash", "{\"command\":\"ls\"}"), GUARD_NONE); /* A B A */
    assert_int_equal(call(g, "bash", "{\"command\":\"ls\"}"), GUARD_IDENTICAL_CALL);
    guard_free(g);
}

static void
test_guard_identical_call_ring(void **state)
{
    (void)state;
    struct guard_config c;
    static const char *const seq[] = {"{\"q\":\"a\"}", "{\"q\":\"b\"}", "{\"q\":\"a\"}",
                                      "{\"q\":\"c\"}", "{\"q\":\"a\"}"};
    /* A B A C A: 3 among the last 5, never twice in a row */
    for (int ring = 4; ring <= 5; ring++) {
        config_only(&c, GUARD_IDENTICAL_CALL, ring);
        struct guard *g = new_guard(&c, NULL, 0);
        for (int i = 0; i < 4; i++)
            assert_int_equal(call(g, "search", seq[i]), GUARD_NONE);
        assert_int_equal(call(g, "search", seq[4]), ring == 5 ? GUARD_IDENTICAL_CALL : GUARD_NONE);
        guard_free(g);
    }
}

static void
test_guard_identical_call_is_name_and_arguments(void **state)
{
    (void)state;
    struct guard *g = default_guard();
    /* the same arguments under another name, the same name with other arguments */
    assert_int_equal(call(g, "read_file", "{\"path\":\"a\"}"), GUARD_NONE);
    assert_int_equal(call(g, "stat_file", "{\"path\":\"a\"}"), GUARD_NONE);
    assert_int_equal(call(g, "stat_file", "{\"path\":\"b\"}"), GUARD_NONE);
    assert_int_equal(call(g, "stat_file", "{\"path\":\"b\"}"), GUARD_IDENTICAL_CALL);
    guard_free(g);
}

/* ---- Look-alikes of the tool-loop guards ---- */

static void
test_guard_parallel_fan_out_does_not_trip(void **state)
{
    (void)state;
    struct guard *g = default_guard();
    assert_int_equal(call(g, "get_weather", "{\"city\":\"Paris\"}"), GUARD_NONE);
    assert_int_equal(call(g, "get_weather", "{\"city\":\"London\"}"), GUARD_NONE);
    assert_int_equal(call(g, "get_weather", "{\"city\":\"Tokyo\"}"), GUARD_NONE);
    assert_int_equal(guard_tripped(g), GUARD_NONE);
    guard_free(g);
}

static void
test_guard_same_tool_different_arguments_does_not_trip(void **state)
{
    (void)state;
    struct guard *g = default_guard();
    char args[64];
    for (int i = 0; i < 7; i++) { /* one below name_run_cap */
        snprintf(args, sizeof(args), "{\"offset\":%d,\"path\":\"/var/log/syslog\"}", i * 100);
        assert_int_equal(call(g, "read_file", args), GUARD_NONE);
    }
    guard_free(g);
}

static void
test_guard_long_file_in_one_call_does_not_trip(void **state)
{
    (void)state;
    struct guard *g = default_guard();
    /* a file of 300 lines, many of them identical, written through one call */
    size_t cap = 64 * 1024, len = 0;
    char *args = malloc(cap);
    assert_non_null(args);
    len += (size_t)snprintf(args + len, cap - len, "{\"content\":\"");
    for (int i = 0; i < 300; i++)
        len += (size_t)snprintf(args + len, cap - len, "%s\\n",
                                i % 3 ? "    assert_int_equal(rc, 0); /* same line */"
                                      : "    rc = step(ctx);");
    len += (size_t)snprintf(args + len, cap - len, "\",\"path\":\"tests/big.c\"}");
    assert_int_equal(guard_feed_text(g, "Writing the file now.\n", 22), GUARD_NONE);
    for (int t = 0; t <= 1024; t += 16) /* its tokens, up to the cap */
        assert_int_equal(guard_feed_call_tokens(g, t), GUARD_NONE);
    assert_int_equal(guard_feed_call(g, "write_file", args, len), GUARD_NONE);
    assert_int_equal(guard_feed_call_tokens(g, 0), GUARD_NONE);
    assert_int_equal(guard_feed_text(g, "\nDone: the file is written.", 27), GUARD_NONE);
    free(args);
    guard_free(g);
}

/* ---- tool_call_cap ---- */

static void
test_guard_tool_call_cap_threshold(void **state)
{
    (void)state;
    struct guard *g = default_guard();
    char name[32];
    for (int i = 0; i < 12; i++) {
        snprintf(name, sizeof(name), "tool_%d", i);
        assert_int_equal(call(g, name, "{}"), GUARD_NONE);
    }
    assert_int_equal(call(g, "tool_12", "{}"), GUARD_TOOL_CALL_CAP);
    guard_free(g);
}

/* History: n_rounds assistant messages, each with the call (name, args[i]) and its result. */
struct history {
    struct cm_chat_msg msg[64];
    struct cm_chat_tool_call tc[32];
    char ids[32][24];
    int n_msg;
};

static void
history_add(struct history *h, const char *name, const char *args, const char *result)
{
    int k = h->n_msg / 2;
    assert_true(k < 32 && h->n_msg + 2 <= 64);
    snprintf(h->ids[k], sizeof(h->ids[k]), "call_%d", k);
    h->tc[k] = (struct cm_chat_tool_call){.id = h->ids[k], .name = name, .arguments = args};
    h->msg[h->n_msg++] = (struct cm_chat_msg){
        .role = "assistant", .content = NULL, .tool_calls = &h->tc[k], .n_tool_calls = 1};
    h->msg[h->n_msg++] = (struct cm_chat_msg){
        .role = "tool", .content = result, .tool_call_id = h->ids[k], .name = name};
}

static void
test_guard_tool_call_cap_is_per_response(void **state)
{
    (void)state;
    struct history h = {.n_msg = 0};
    struct guard_config c;
    char name[32];
    static const char *const names[] = {"a", "b", "c", "d", "e", "f", "g", "h",
                                        "i", "j", "k", "l", "m", "n", "o", "p"};
    for (int i = 0; i < 16; i++)
        history_add(&h, names[i], "{}", "ok");
    guard_config_init(&c);
    struct guard *g = new_guard(&c, h.msg, h.n_msg);
    for (int i = 0; i < 12; i++) {
        snprintf(name, sizeof(name), "tool_%d", i);
        assert_int_equal(call(g, name, "{}"), GUARD_NONE);
    }
    guard_free(g);
}

/* ---- repeated_call_history ---- */

static const char *const CMD_A = "{\"command\":\"which cargo\"}";
static const char *const CMD_B = "{\"command\":\"ls -la\"}";

/* Builds a history of calls of bash named by the letters of seq (A or B), then feeds one call
 * CMD_A and returns the verdict. */
static enum guard_id
history_then_a(const char *seq)
{
    struct history h = {.n_msg = 0};
    struct guard_config c;
    for (const char *p = seq; *p; p++)
        history_add(&h, "bash", *p == 'A' ? "{ \"command\": \"which cargo\" }" : CMD_B,
                    "(exit status 1)");
    guard_config_init(&c);
    struct guard *g = new_guard(&c, h.msg, h.n_msg);
    enum guard_id t = call(g, "bash", CMD_A);
    guard_free(g);
    return t;
}

static void
test_guard_repeated_call_history_in_a_row(void **state)
{
    (void)state;
    assert_int_equal(history_then_a("AAAA"), GUARD_REPEATED_CALL_HISTORY); /* 5 in a row */
    assert_int_equal(history_then_a("AAA"), GUARD_NONE);
    assert_int_equal(history_then_a("BAAAA"), GUARD_REPEATED_CALL_HISTORY);
    /* reset: another call in between */
    assert_int_equal(history_then_a("AAAAB"), GUARD_NONE);
    assert_int_equal(history_then_a("AABAA"), GUARD_NONE);
}

static void
test_guard_repeated_call_history_ring(void **state)
{
    (void)state;
    assert_int_equal(history_then_a("AABAABA"), GUARD_REPEATED_CALL_HISTORY); /* 6 of 8 */
    assert_int_equal(history_then_a("AABAABB"), GUARD_NONE);                  /* 5 of 8 */
    assert_int_equal(history_then_a("AABBAABA"), GUARD_NONE); /* 6 of 9, 5 of the last 8 */
}

static void
test_guard_repeated_call_history_within_response(void **state)
{
    (void)state;
    struct history h = {.n_msg = 0};
    struct guard_config c;
    for (int i = 0; i < 3; i++)
        history_add(&h, "bash", CMD_A, "(exit status 1)");
    guard_config_init(&c);
    c.value[GUARD_IDENTICAL_CALL] = 0;
    struct guard *g = new_guard(&c, h.msg, h.n_msg);
    assert_int_equal(call(g, "bash", CMD_A), GUARD_NONE); /* 4 */
    assert_int_equal(call(g, "bash", CMD_A), GUARD_REPEATED_CALL_HISTORY);
    guard_free(g);
}

/* ---- permanent_failure ---- */

static enum guard_id
after_failure(const char *name, const char *args, const char *result, const char *new_name,
              const char *new_args)
{
    struct history h = {.n_msg = 0};
    struct guard_config c;
    history_add(&h, name, args, result);
    guard_config_init(&c);
    struct guard *g = new_guard(&c, h.msg, h.n_msg);
    enum guard_id t = call(g, new_name, new_args);
    guard_free(g);
    return t;
}

static void
test_guard_permanent_failure_phrases(void **state)
{
    (void)state;
    static const char *const results[] = {
        "bash: cargo: command not found",
        "cat: /etc/nope: No such file or directory",
        "open(\"/root/x\"): Permission denied",
        "mkdir: cannot create directory 'out': File exists",
        "ioctl: INVALID ARGUMENT",
    };
    for (size_t i = 0; i < sizeof(results) / sizeof(results[0]); i++)
        assert_int_equal(after_failure("bash", "{\"command\":\"cargo build\"}", results[i], "bash",
                                       "{\"command\":\"cargo build\"}"),
                         GUARD_PERMANENT_FAILURE);
    /* one below: the same call after a failure that may go away */
    assert_int_equal(after_failure("bash", "{\"command\":\"cargo build\"}",
                                   "error: could not compile; connection timed out", "bash",
                                   "{\"command\":\"cargo build\"}"),
                     GUARD_NONE);
}

static void
test_guard_permanent_failure_primary_argument(void **state)
{
    (void)state;
    const char *nf = "bash: line 1: cargo: command not found";
    /* shell-like: the first word of the command */
    assert_int_equal(after_failure("bash", "{\"command\":\"cargo build\"}", nf, "bash",
                                   "{\"command\":\"  cargo test --all\"}"),
                     GUARD_PERMANENT_FAILURE);
    assert_int_equal(after_failure("bash", "{\"command\":\"cargo build\"}", nf, "bash",
                                   "{\"command\":\"rustup install stable\"}"),
                     GUARD_NONE);
    assert_int_equal(after_failure("run", "{\"cmd\":[\"cargo\",\"build\"]}", nf, "run",
                                   "{\"cmd\":[\"cargo\",\"test\"]}"),
                     GUARD_PERMANENT_FAILURE);
    /* path, file_path, filename; the same tool only */
    const char *enoent = "Error: ENOENT: no such file or directory, open '/src/main.rs'";
    assert_int_equal(after_failure("read_file", "{\"path\":\"/src/main.rs\"}", enoent, "read_file",
                                   "{\"limit\":50,\"path\":\"/src/main.rs\"}"),
                     GUARD_PERMANENT_FAILURE);
    assert_int_equal(after_failure("read_file", "{\"path\":\"/src/main.rs\"}", enoent, "read_file",
                                   "{\"path\":\"/src/lib.rs\"}"),
                     GUARD_NONE);
    assert_int_equal(after_failure("read_file", "{\"path\":\"/src/main.rs\"}", enoent, "write_file",
                                   "{\"content\":\"fn main() {}\",\"path\":\"/src/main.rs\"}"),
                     GUARD_NONE);
    assert_int_equal(after_failure("edit", "{\"file_path\":\"/a.txt\",\"old\":\"x\"}", enoent,
                                   "edit", "{\"file_path\":\"/a.txt\",\"old\":\"y\"}"),
                     GUARD_PERMANENT_FAILURE);
    assert_int_equal(after_failure("open", "{\"filename\":\"/a.txt\"}", enoent, "open",
                                   "{\"filename\":\"/a.txt\",\"mode\":\"r\"}"),
                     GUARD_PERMANENT_FAILURE);
    /* no primary argument: only an identical call (keys in another order, other spacing) */
    assert_int_equal(after_failure("search", "{ \"q\": \"x\", \"limit\": 3 }", enoent, "search",
                                   "{\"limit\":3,\"q\":\"x\"}"),
                     GUARD_PERMANENT_FAILURE);
    assert_int_equal(
        after_failure("search", "{\"q\":\"x\",\"limit\":3}", enoent, "search", "{\"q\":\"x\"}"),
        GUARD_NONE);
}

static void
test_guard_permanent_failure_matched_by_tool_call_id(void **state)
{
    (void)state;
    /* one assistant message with two calls; the results come back in the other order */
    struct cm_chat_tool_call tc[2] = {
        {.id = "call_a", .name = "bash", .arguments = "{\"command\":\"cat a.txt\"}"},
        {.id = "call_b", .name = "bash", .arguments = "{\"command\":\"make\"}"},
    };
    struct cm_chat_msg msgs[] = {
        {.role = "user", .content = "build it"},
        {.role = "assistant", .content = "", .tool_calls = tc, .n_tool_calls = 2},
        {.role = "tool", .content = "make: command not found", .tool_call_id = "call_b"},
        {.role = "tool", .content = "hello", .tool_call_id = "call_a"},
        {.role = "tool", .content = "Permission denied", .tool_call_id = "call_zzz"},
        {.role = "tool", .content = "Permission denied"},
    };
    struct guard_config c;
    guard_config_init(&c);
    struct guard *g = new_guard(&c, msgs, 6);
    assert_int_equal(call(g, "bash", "{\"command\":\"cat a.txt\"}"), GUARD_NONE);
    assert_int_equal(call(g, "bash", "{\"command\":\"make -j2\"}"), GUARD_PERMANENT_FAILURE);
    guard_free(g);
}

/* The parser's events into the guards, as the worker will do it. */
static int
to_guard(void *ctx, const struct guard_toolcall_event *ev)
{
    struct guard *g = ctx;
    enum guard_id t = GUARD_NONE;
    if (ev->type == GUARD_TOOLCALL_CONTENT)
        t = guard_feed_text(g, ev->text, ev->len);
    else if (ev->type == GUARD_TOOLCALL_CALL_END && ev->ok)
        t = guard_feed_call(g, ev->name, ev->args, ev->args_len);
    return t == GUARD_NONE ? 0 : 1;
}

/* Runs text through guard_toolcall into a default guard in pieces of 1..max_piece bytes. */
static enum guard_id
through_parser(const char *text, size_t max_piece, int *n_ok)
{
    struct guard *g = default_guard();
    struct guard_toolcall *p = NULL;
    size_t n = strlen(text), off = 0;
    unsigned seed = 7;
    int rc = 0;
    assert_int_equal(guard_toolcall_new(0, &p), 0);
    while (off < n && rc == 0) {
        seed = seed * 1103515245u + 12345u;
        size_t len = 1 + (seed >> 16) % max_piece;
        if (len > n - off)
            len = n - off;
        rc = guard_toolcall_feed(p, text + off, len, to_guard, g);
        off += len;
    }
    if (rc == 0)
        rc = guard_toolcall_finish(p, to_guard, g);
    assert_true(rc == 0 || rc == 1);
    assert_int_equal(guard_toolcall_n_invalid(p), 0);
    *n_ok = guard_toolcall_n_ok(p);
    enum guard_id t = guard_tripped(g);
    guard_toolcall_free(p);
    guard_free(g);
    return t;
}

static void
test_guard_long_file_through_parser_does_not_trip(void **state)
{
    (void)state;
    const char *line = "    assert_int_equal(run_step(ctx), 0); /* every step must pass */";
    size_t cap = 32 * 1024, len = 0;
    char *text = malloc(cap), *content = malloc(cap);
    assert_non_null(text);
    assert_non_null(content);
    /* the file's lines inside the arguments: not content, so no content guard sees them */
    len += (size_t)snprintf(text + len, cap - len,
                            "I will write the test file now.\n<tool_call>\n{\"name\": "
                            "\"write_file\", \"arguments\": {\"path\": \"t.c\", \"content\": \"");
    for (int i = 0; i < 120; i++)
        len += (size_t)snprintf(text + len, cap - len, "%s\\n", line);
    len += (size_t)snprintf(text + len, cap - len, "\"}}\n</tool_call>\nThe file is written.");
    int n_ok = 0;
    for (size_t piece = 1; piece <= 64; piece *= 4) {
        assert_int_equal(through_parser(text, piece, &n_ok), GUARD_NONE);
        assert_int_equal(n_ok, 1);
    }
    /* the same lines as visible content are a loop */
    len = 0;
    for (int i = 0; i < 4; i++)
        len += (size_t)snprintf(content + len, cap - len, "%s\n", line);
    assert_int_equal(through_parser(content, 16, &n_ok), GUARD_LINE_REPEAT);
    free(text);
    free(content);
}

/* ---- unterminated_tool_call ---- */

static void
test_guard_unterminated_tool_call_threshold(void **state)
{
    (void)state;
    struct guard *g = default_guard();
    assert_int_equal(guard_feed_call_tokens(g, 1000), GUARD_NONE);
    assert_int_equal(guard_feed_call_tokens(g, 0), GUARD_NONE); /* closed: the next one restarts */
    assert_int_equal(guard_feed_call_tokens(g, 1024), GUARD_NONE);
    assert_int_equal(guard_feed_call_tokens(g, 1025), GUARD_UNTERMINATED_TOOL_CALL);
    assert_false(guard_is_tool_loop(guard_tripped(g)));
    guard_free(g);
}

/* ---- --no-guards ---- */

static void
test_guard_no_guards_disables_everything(void **state)
{
    (void)state;
    struct history h = {.n_msg = 0};
    struct guard_config c;
    for (int i = 0; i < 6; i++)
        history_add(&h, "bash", CMD_A, "bash: which: command not found");
    guard_config_init(&c);
    c.value[GUARD_TOKEN_LOOP] = 3;
    assert_int_equal(guard_config_set(&c, "guards", "off", NULL, 0), 0);
    struct guard *g = new_guard(&c, h.msg, h.n_msg);
    for (int i = 0; i < 40; i++)
        assert_int_equal(call(g, "bash", CMD_A), GUARD_NONE);
    for (int i = 0; i < 20; i++)
        assert_int_equal(guard_feed_text(g, "The same sentence again and again here. ", 40),
                         GUARD_NONE);
    assert_int_equal(guard_feed_text(g, "\n", 1), GUARD_NONE);
    assert_int_equal(guard_feed_call_tokens(g, 100000), GUARD_NONE);
    for (int i = 0; i < GUARD_N; i++)
        assert_false(guard_config_active(&c, (enum guard_id)i));
    guard_free(g);
}

/* ---- Construction ---- */

static void
test_guard_new_rejects_bad_arguments(void **state)
{
    (void)state;
    struct guard_config c;
    struct guard *g = NULL;
    guard_config_init(&c);
    assert_int_equal(guard_new(NULL, NULL, 0, &g), -EINVAL);
    assert_int_equal(guard_new(&c, NULL, 0, NULL), -EINVAL);
    assert_int_equal(guard_new(&c, NULL, 1, &g), -EINVAL);
    assert_int_equal(guard_new(&c, NULL, -1, &g), -EINVAL);
    assert_null(g);
    guard_free(NULL);
}

/* ---- Allocation failures ---- */

static void
test_guard_new_allocation_failures(void **state)
{
    (void)state;
#ifdef GUARD_SANITIZED
    skip();
#else
    struct history h = {.n_msg = 0};
    struct guard_config c;
    history_add(&h, "bash", "{ \"command\": \"cargo build\" }", "cargo: command not found");
    history_add(&h, "read_file", "{\"path\": \"/a\", \"n\": [1, 2, {\"x\": null}]}", "ok");
    guard_config_init(&c);
    int n_fail = 0;
    for (long at = 1;; at++) {
        struct guard *g = NULL;
        fi_count = 0;
        fi_live = 0;
        fi_fail_at = at;
        fi_on = true;
        int rc = guard_new(&c, h.msg, h.n_msg, &g);
        if (rc == 0) {
            assert_int_equal(call(g, "bash", "{\"command\":\"cargo test\"}"),
                             GUARD_PERMANENT_FAILURE);
            guard_free(g);
        }
        fi_on = false;
        assert_int_equal(fi_live, 0); /* nothing leaked, success or not */
        if (rc == 0)
            break;
        assert_int_equal(rc, -ENOMEM);
        assert_null(g);
        n_fail++;
    }
    assert_true(n_fail >= 3); /* the object, the history scratch, the failures, ... */
#endif
}

/* ---- token_loop ---- */

static void
fill_distinct(int32_t *ids, int n)
{
    for (int i = 0; i < n; i++)
        ids[i] = 1000 + i;
}

static void
test_guard_token_loop_threshold(void **state)
{
    (void)state;
    int32_t ids[512];
    /* period 2 repeated 3 times at the end of 48 tokens; only 2.5 times */
    fill_distinct(ids, 48);
    for (int i = 42; i < 48; i++)
        ids[i] = i % 2 ? 7 : 9;
    assert_true(guard_token_loop_check(ids, 48, 3));
    ids[42] = 5;
    assert_false(guard_token_loop_check(ids, 48, 3));
    assert_true(guard_token_loop_check(ids, 48, 2));
    /* period 64, 3 times: the longest period; a period of 65 is not looked for */
    fill_distinct(ids, 512);
    for (int i = 0; i < 192; i++)
        ids[512 - 192 + i] = 100 + i % 64;
    assert_true(guard_token_loop_check(ids, 512, 3));
    fill_distinct(ids, 512);
    for (int i = 0; i < 195; i++)
        ids[512 - 195 + i] = 100 + i % 65;
    assert_false(guard_token_loop_check(ids, 512, 3));
    /* one token repeated is also a block of period 2 */
    for (int i = 0; i < 64; i++)
        ids[i] = 42;
    assert_true(guard_token_loop_check(ids, 64, 3));
}

static void
test_guard_token_loop_cadence(void **state)
{
    (void)state;
    int32_t ids[80];
    for (int i = 0; i < 80; i++)
        ids[i] = i % 3;                               /* a loop from the first token */
    assert_false(guard_token_loop_check(ids, 32, 3)); /* before 48 output tokens */
    assert_false(guard_token_loop_check(ids, 47, 3));
    assert_true(guard_token_loop_check(ids, 48, 3));
    assert_false(guard_token_loop_check(ids, 49, 3)); /* between checks */
    assert_true(guard_token_loop_check(ids, 64, 3));
    assert_false(guard_token_loop_check(ids, 64, 0)); /* off */
    assert_false(guard_token_loop_check(NULL, 64, 3));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_guard_names),
        cmocka_unit_test(test_guard_config_defaults),
        cmocka_unit_test(test_guard_config_set),
        cmocka_unit_test(test_guard_config_override_lowers_and_disables),
        cmocka_unit_test(test_guard_config_override_cannot_raise),
        cmocka_unit_test(test_guard_config_override_token_loop),
        cmocka_unit_test(test_guard_name_run_cap_threshold),
        cmocka_unit_test(test_guard_name_run_cap_reset_by_other_name),
        cmocka_unit_test(test_guard_identical_call_twice_in_a_row),
        cmocka_unit_test(test_guard_identical_call_ring),
        cmocka_unit_test(test_guard_identical_call_is_name_and_arguments),
        cmocka_unit_test(test_guard_parallel_fan_out_does_not_trip),
        cmocka_unit_test(test_guard_same_tool_different_arguments_does_not_trip),
        cmocka_unit_test(test_guard_long_file_in_one_call_does_not_trip),
        cmocka_unit_test(test_guard_tool_call_cap_threshold),
        cmocka_unit_test(test_guard_tool_call_cap_is_per_response),
        cmocka_unit_test(test_guard_repeated_call_history_in_a_row),
        cmocka_unit_test(test_guard_repeated_call_history_ring),
        cmocka_unit_test(test_guard_repeated_call_history_within_response),
        cmocka_unit_test(test_guard_permanent_failure_phrases),
        cmocka_unit_test(test_guard_permanent_failure_primary_argument),
        cmocka_unit_test(test_guard_permanent_failure_matched_by_tool_call_id),
        cmocka_unit_test(test_guard_long_file_through_parser_does_not_trip),
        cmocka_unit_test(test_guard_unterminated_tool_call_threshold),
        cmocka_unit_test(test_guard_no_guards_disables_everything),
        cmocka_unit_test(test_guard_new_rejects_bad_arguments),
        cmocka_unit_test(test_guard_new_allocation_failures),
        cmocka_unit_test(test_guard_token_loop_threshold),
        cmocka_unit_test(test_guard_token_loop_cadence),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

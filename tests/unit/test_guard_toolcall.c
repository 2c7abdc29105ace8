/*
 * Unit tests for guards/guard_toolcall: scripted assistant streams are fed whole, cut at every one
 * and two positions, byte by byte and at random; the events, with adjacent CONTENT and CALL_ARGS
 * fragments merged, must equal the expected log in every split. The log is one line per event:
 *   C:<text>|  B<i>|  N<i>:<name>|  A<i>:<args text>|  E<i>:ok:<name>:<canonical args>|
 *   E<i>:bad:<error>|
 * The recorder also checks the ordering contract on every run (BEGIN before the call's other
 * events, NAME at most once and before ARGS, END last, no empty texts). Then stopping from the
 * callback, the block cap, the counters, random token soup, and guard_json_canonical.
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

#include "guards/guard_toolcall.h"

/* ---- The recorder ---- */

struct rec {
    char *log; /* rendered log, merged */
    size_t len, cap;
    int last_type;  /* type of the last event, -1 at first */
    int last_index; /* its index */
    int open_index; /* call begun and not ended, or -1 */
    int next_index; /* index the next BEGIN must carry */
    bool name_seen; /* NAME sent for the open call */
    int stop_on;    /* event type at which the callback returns 7, or -1 */
    int n_events;
};

static void
rec_put(struct rec *r, const char *s, size_t n)
{
    if (r->len + n + 1 > r->cap) {
        r->cap = (r->len + n + 1) * 2;
        r->log = realloc(r->log, r->cap);
        assert_non_null(r->log);
    }
    memcpy(r->log + r->len, s, n);
    r->len += n;
    r->log[r->len] = 0;
}

static void
rec_puts(struct rec *r, const char *s)
{
    rec_put(r, s, strlen(s));
}

static void
rec_init(struct rec *r)
{
    memset(r, 0, sizeof(*r));
    r->last_type = -1;
    r->open_index = -1;
    r->stop_on = -1;
    rec_puts(r, "");
}

static int
rec_cb(void *ctx, const struct guard_toolcall_event *ev)
{
    struct rec *r = ctx;
    char head[64];
    bool merge = r->last_type == (int)ev->type && r->last_index == ev->index &&
                 (ev->type == GUARD_TOOLCALL_CONTENT || ev->type == GUARD_TOOLCALL_CALL_ARGS);

    r->n_events++;
    switch (ev->type) {
    case GUARD_TOOLCALL_CONTENT:
        assert_int_equal(r->open_index, -1);
        assert_true(ev->len > 0);
        assert_int_equal(ev->index, -1);
        if (merge)
            r->len--; /* drop the '|' and go on */
        else
            rec_puts(r, "C:");
        rec_put(r, ev->text, ev->len);
        break;
    case GUARD_TOOLCALL_CALL_BEGIN:
        assert_int_equal(r->open_index, -1);
        assert_int_equal(ev->index, r->next_index);
        r->open_index = r->next_index++;
        r->name_seen = false;
        snprintf(head, sizeof(head), "B%d", ev->index);
        rec_puts(r, head);
        break;
    case GUARD_TOOLCALL_CALL_NAME:
        assert_int_equal(ev->index, r->open_index);
        assert_false(r->name_seen);
        assert_non_null(ev->name);
        r->name_seen = true;
        snprintf(head, sizeof(head), "N%d:", ev->index);
        rec_puts(r, head);
        rec_puts(r, ev->name);
        break;
    case GUARD_TOOLCALL_CALL_ARGS:
        assert_int_equal(ev->index, r->open_index);
        assert_true(r->name_seen);
        assert_true(ev->len > 0);
        if (merge) {
            r->len--;
        } else {
            snprintf(head, sizeof(head), "A%d:", ev->index);
            rec_puts(r, head);
        }
        rec_put(r, ev->text, ev->len);
        break;
    case GUARD_TOOLCALL_CALL_END:
        assert_int_equal(ev->index, r->open_index);
        r->open_index = -1;
        snprintf(head, sizeof(head), "E%d:%s:", ev->index, ev->ok ? "ok" : "bad");
        rec_puts(r, head);
        if (ev->ok) {
            assert_true(r->name_seen);
            assert_null(ev->error);
            assert_string_equal(ev->name, ev->name); /* NUL-terminated */
            assert_int_equal(strlen(ev->args), ev->args_len);
            rec_puts(r, ev->name);
            rec_puts(r, ":");
            rec_puts(r, ev->args);
        } else {
            assert_null(ev->name);
            assert_null(ev->args);
            assert_non_null(ev->error);
            rec_puts(r, ev->error);
        }
        break;
    }
    rec_puts(r, "|");
    r->last_type = (int)ev->type;
    r->last_index = ev->index;
    return (int)ev->type == r->stop_on ? 7 : 0;
}

/* Feeds text cut at the sorted positions cuts[0..n_cuts), then finishes; returns the log. */
static char *
run_split(const char *text, size_t n, const size_t *cuts, int n_cuts, size_t max_block)
{
    struct guard_toolcall *p = NULL;
    struct rec r;
    size_t at = 0;

    rec_init(&r);
    assert_int_equal(guard_toolcall_new(max_block, &p), 0);
    for (int i = 0; i <= n_cuts; i++) {
        size_t end = i < n_cuts ? cuts[i] : n;
        assert_int_equal(guard_toolcall_feed(p, text + at, end - at, rec_cb, &r), 0);
        assert_int_equal(guard_toolcall_in_call(p), r.open_index >= 0);
        at = end;
    }
    assert_int_equal(guard_toolcall_finish(p, rec_cb, &r), 0);
    assert_false(guard_toolcall_in_call(p));
    assert_int_equal(r.open_index, -1);
    assert_int_equal(guard_toolcall_n_ok(p) + guard_toolcall_n_invalid(p), r.next_index);
    guard_toolcall_free(p);
    return r.log;
}

static void
check_log(char *got, const char *want)
{
    if (strcmp(got, want) != 0)
        fail_msg("log\n  got:  %s\n  want: %s", got, want);
    free(got);
}

/* Whole, every one- and two-cut split, byte by byte. */
static void
check_all_splits_cap(const char *text, const char *want, size_t max_block)
{
    size_t n = strlen(text), cuts[2];
    size_t *all = malloc((n + 1) * sizeof(*all));

    assert_non_null(all);
    check_log(run_split(text, n, NULL, 0, max_block), want);
    for (size_t i = 0; i <= n; i++) {
        for (size_t j = i; j <= n; j++) {
            cuts[0] = i;
            cuts[1] = j;
            check_log(run_split(text, n, cuts, 2, max_block), want);
        }
    }
    for (size_t i = 0; i < n; i++)
        all[i] = i;
    check_log(run_split(text, n, all, (int)n, max_block), want);
    free(all);
}

static void
check_all_splits(const char *text, const char *want)
{
    check_all_splits_cap(text, want, 0);
}

/* ---- Scripted streams ---- */

static void
test_guard_toolcall_plain_content(void **state)
{
    (void)state;
    check_all_splits("Hello, world.", "C:Hello, world.|");
    check_all_splits("a < b and <tool> or <tool_cal x <<", "C:a < b and <tool> or <tool_cal x <<|");
    check_all_splits("", "");
}

static void
test_guard_toolcall_one_call_with_content_before_and_after(void **state)
{
    (void)state;
    check_all_splits("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
                     "{\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>\nDone.",
                     "C:Let me check.\n|B0|N0:get_weather|A0:{\"city\": \"Paris\", \"unit\": "
                     "\"c\"}|E0:ok:get_weather:{\"city\":\"Paris\",\"unit\":\"c\"}|C:\nDone.|");
}

static void
test_guard_toolcall_two_calls_content_between(void **state)
{
    (void)state;
    check_all_splits("<tool_call>{\"name\":\"a\",\"arguments\":{\"x\":1}}</tool_call>\n"
                     "<tool_call> {\"name\":\"b\",\"parameters\":{\"z\":[1,{\"d\":2,\"c\":3}],"
                     "\"y\":null}} </tool_call>",
                     "B0|N0:a|A0:{\"x\":1}|E0:ok:a:{\"x\":1}|C:\n|B1|N1:b|A1:{\"z\":[1,{\"d\":2,"
                     "\"c\":3}],\"y\":null}|E1:ok:b:{\"y\":null,\"z\":[1,{\"c\":3,\"d\":2}]}|");
}

static void
test_guard_toolcall_strings_with_braces_quotes_and_closer(void **state)
{
    (void)state;
    /* nested braces, escaped quotes, a backslash at the end of a string and the closer itself
     * inside argument strings do not end the block */
    check_all_splits(
        "<tool_call>{\"name\": \"write\", \"arguments\": {\"path\": \"a}.txt\", \"text\": "
        "\"x = {\\\"k\\\": \\\"</tool_call>\\\"} }\\\\\", \"n\": {\"m\": [{}]}}}</tool_call>ok",
        "B0|N0:write|A0:{\"path\": \"a}.txt\", \"text\": \"x = {\\\"k\\\": "
        "\\\"</tool_call>\\\"} }\\\\\", \"n\": {\"m\": [{}]}}|E0:ok:write:{\"n\":{\"m\":[{}]},"
        "\"path\":\"a}.txt\",\"text\":\"x = {\\\"k\\\": \\\"</tool_call>\\\"} }\\\\\"}|C:ok|");
}

static void
test_guard_toolcall_invalid_json_at_close_dropped(void **state)
{
    (void)state;
    /* the model forgot the outer brace: the arguments were streamed, the call is still bad */
    check_all_splits("<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}</tool_call>after",
                     "B0|N0:f|A0:{\"a\": 1}|E0:bad:invalid json|C:after|");
    check_all_splits("<tool_call>{'name': 'f', 'arguments': {}}</tool_call>",
                     "B0|E0:bad:invalid json|");
    check_all_splits("<tool_call>hello</tool_call>", "B0|E0:bad:invalid json|");
    check_all_splits("<tool_call>{\"name\":\"f\",\"arguments\":{}} extra</tool_call>",
                     "B0|N0:f|A0:{}|E0:bad:invalid json|");
    check_all_splits("<tool_call>{\"name\":\"f\",\"arguments\":{\"v\":NaN}}</tool_call>",
                     "B0|N0:f|A0:{\"v\":NaN}|E0:bad:invalid json|");
    check_all_splits("<tool_call></tool_call>", "B0|E0:bad:invalid json|");
}

static void
test_guard_toolcall_semantic_errors(void **state)
{
    (void)state;
    check_all_splits("<tool_call>[1]</tool_call>", "B0|E0:bad:not an object|");
    check_all_splits("<tool_call>{\"name\": \"has space\", \"arguments\": {}}</tool_call>",
                     "B0|E0:bad:bad name|");
    check_all_splits("<tool_call>{\"name\": 5, \"arguments\": {}}</tool_call>",
                     "B0|E0:bad:bad name|");
    check_all_splits("<tool_call>{\"name\": \"\", \"arguments\": {}}</tool_call>",
                     "B0|E0:bad:bad name|");
    check_all_splits("<tool_call>{\"arguments\": {}}</tool_call>", "B0|E0:bad:bad name|");
    check_all_splits("<tool_call>{\"name\": \"f\"}</tool_call>", "B0|N0:f|E0:bad:bad arguments|");
    check_all_splits("<tool_call>{\"name\": \"f\", \"arguments\": [1]}</tool_call>",
                     "B0|N0:f|E0:bad:bad arguments|");
    check_all_splits("<tool_call>{\"name\": \"f\", \"arguments\": \"[1]\"}</tool_call>",
                     "B0|N0:f|E0:bad:bad arguments|");
    check_all_splits("<tool_call>{\"name\": \"f\", \"arguments\": 12}</tool_call>",
                     "B0|N0:f|E0:bad:bad arguments|");
    /* "parameters" after the arguments (a model echoing the schema) is just another member;
     * before them it is the arguments, and then a later "arguments" is a second one. */
    check_all_splits("<tool_call>{\"name\":\"f\",\"arguments\":{\"x\":1},\"parameters\":{}}"
                     "</tool_call>",
                     "B0|N0:f|A0:{\"x\":1}|E0:ok:f:{\"x\":1}|");
    check_all_splits("<tool_call>{\"name\":\"f\",\"parameters\":{},\"arguments\":{}}</tool_call>",
                     "B0|N0:f|A0:{}|E0:bad:duplicate key|");
    check_all_splits("<tool_call>{\"name\":\"f\",\"arguments\":{},\"arguments\":{}}</tool_call>",
                     "B0|N0:f|A0:{}|E0:bad:duplicate key|");
    check_all_splits("<tool_call>{\"name\":\"f\",\"name\":\"g\",\"arguments\":{}}</tool_call>",
                     "B0|N0:f|A0:{}|E0:bad:duplicate key|");
}

static void
test_guard_toolcall_arguments_before_name_and_escaped_name(void **state)
{
    (void)state;
    check_all_splits("<tool_call>{\"arguments\": {\"q\": \"hi\"}, \"id\": 3, \"name\": "
                     "\"search\"}</tool_call>",
                     "B0|N0:search|A0:{\"q\": \"hi\"}|E0:ok:search:{\"q\":\"hi\"}|");
    check_all_splits("<tool_call>{\"name\": \"get\\u005fw\", \"arguments\": {}}</tool_call>",
                     "B0|N0:get_w|A0:{}|E0:ok:get_w:{}|");
}

static void
test_guard_toolcall_arguments_as_string(void **state)
{
    (void)state;
    check_all_splits("<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"b\\\": 1, \\\"a\\\": "
                     "\\\"</tool_call>\\\"}\"}</tool_call>",
                     "B0|N0:f|A0:{\"b\": 1, \"a\": \"</tool_call>\"}|E0:ok:f:{\"a\":\"</"
                     "tool_call>\",\"b\":1}|");
}

static void
test_guard_toolcall_unclosed_block_at_finish(void **state)
{
    (void)state;
    check_all_splits("text<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": \"b",
                     "C:text|B0|N0:f|A0:{\"a\": \"b|E0:bad:unclosed|");
    /* a possible closer start is not streamed as arguments */
    check_all_splits("<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}</tool_ca",
                     "B0|N0:f|A0:{\"a\": 1}|E0:bad:unclosed|");
    check_all_splits("<tool_call>", "B0|E0:bad:unclosed|");
    check_all_splits("x <tool_ca", "C:x <tool_ca|");
    check_all_splits("<<tool_call<tool_call>{\"name\":\"f\",\"arguments\":{}}</tool_call>",
                     "C:<<tool_call|B0|N0:f|A0:{}|E0:ok:f:{}|");
}

static void
test_guard_toolcall_block_cap(void **state)
{
    (void)state;
    /* block text {"name":"f","arguments":{"a":"0123456789"}} of 43 bytes, cap 40 */
    check_all_splits_cap("<tool_call>{\"name\":\"f\",\"arguments\":{\"a\":\"0123456789\"}}"
                         "</tool_call>x<tool_call>{\"name\":\"g\",\"arguments\":{}}</tool_call>",
                         "B0|N0:f|A0:{\"a\":\"0123456789\"}|E0:bad:too large|C:x|B1|N1:g|A1:{}|"
                         "E1:ok:g:{}|",
                         40);
    /* far over the cap: the rest of the block is swallowed up to its closer */
    check_all_splits_cap("<tool_call>{\"name\":\"f\",\"arguments\":{\"a\":\"0123456789012345678901"
                         "23456789012345678901234567890123456789\"}}</tool_call>y",
                         /* 52 bytes stored (cap + closer): 30 + 22 digits */
                         "B0|N0:f|A0:{\"a\":\"0123456789012345678901|E0:bad:too large|C:y|", 40);
    /* exactly at the cap is fine */
    check_all_splits_cap("<tool_call>{\"name\":\"f\",\"arguments\":{\"a\":\"0123456789\"}}"
                         "</tool_call>",
                         "B0|N0:f|A0:{\"a\":\"0123456789\"}|E0:ok:f:{\"a\":\"0123456789\"}|", 43);
}

static void
test_guard_toolcall_forced_prefix(void **state)
{
    struct guard_toolcall *p = NULL;
    struct rec r;
    static const char prefix[] = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": ";
    static const char model[] = "{\"tz\": \"UTC\"}}\n</tool_call>";
    (void)state;

    rec_init(&r);
    assert_int_equal(guard_toolcall_new(0, &p), 0);
    assert_int_equal(guard_toolcall_feed(p, prefix, strlen(prefix), rec_cb, &r), 0);
    assert_true(guard_toolcall_in_call(p));
    assert_string_equal(r.log, "B0|N0:get_time|");
    assert_int_equal(guard_toolcall_feed(p, model, strlen(model), rec_cb, &r), 0);
    assert_false(guard_toolcall_in_call(p));
    assert_int_equal(guard_toolcall_finish(p, rec_cb, &r), 0);
    assert_string_equal(r.log,
                        "B0|N0:get_time|A0:{\"tz\": \"UTC\"}|E0:ok:get_time:{\"tz\":\"UTC\"}|");
    assert_int_equal(guard_toolcall_n_ok(p), 1);
    assert_int_equal(guard_toolcall_n_invalid(p), 0);
    guard_toolcall_free(p);
    free(r.log);
    guard_toolcall_free(NULL);
}

static void
test_guard_toolcall_arguments_stream_before_the_closer(void **state)
{
    struct guard_toolcall *p = NULL;
    struct rec r;
    static const char a[] = "<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": \"1";
    static const char b[] = "23\"}";
    (void)state;

    rec_init(&r);
    assert_int_equal(guard_toolcall_new(0, &p), 0);
    assert_int_equal(guard_toolcall_feed(p, a, strlen(a), rec_cb, &r), 0);
    assert_string_equal(r.log, "B0|N0:f|A0:{\"x\": \"1|");
    assert_int_equal(guard_toolcall_feed(p, b, strlen(b), rec_cb, &r), 0);
    assert_string_equal(r.log, "B0|N0:f|A0:{\"x\": \"123\"}|");
    /* the outer brace and white space are not arguments */
    assert_int_equal(guard_toolcall_feed(p, "}\n", 2, rec_cb, &r), 0);
    assert_string_equal(r.log, "B0|N0:f|A0:{\"x\": \"123\"}|");
    guard_toolcall_free(p);
    free(r.log);
}

static void
test_guard_toolcall_callback_stops_the_parse(void **state)
{
    struct guard_toolcall *p = NULL;
    struct rec r;
    static const char s[] = "hi<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>more";
    (void)state;

    rec_init(&r);
    r.stop_on = GUARD_TOOLCALL_CALL_END;
    assert_int_equal(guard_toolcall_new(0, &p), 0);
    assert_int_equal(guard_toolcall_feed(p, s, strlen(s), rec_cb, &r), 7);
    assert_string_equal(r.log, "C:hi|B0|N0:f|A0:{}|E0:ok:f:{}|");
    int before = r.n_events;
    assert_int_equal(guard_toolcall_feed(p, "x", 1, rec_cb, &r), -ECANCELED);
    assert_int_equal(guard_toolcall_finish(p, rec_cb, &r), -ECANCELED);
    assert_int_equal(r.n_events, before);
    assert_int_equal(guard_toolcall_n_ok(p), 1);
    guard_toolcall_free(p);
    free(r.log);

    rec_init(&r);
    r.stop_on = GUARD_TOOLCALL_CALL_NAME;
    assert_int_equal(guard_toolcall_new(0, &p), 0);
    assert_int_equal(guard_toolcall_feed(p, s, strlen(s), rec_cb, &r), 7);
    assert_string_equal(r.log, "C:hi|B0|N0:f|");
    guard_toolcall_free(p);
    free(r.log);
}

static void
test_guard_toolcall_counts_and_indices(void **state)
{
    struct guard_toolcall *p = NULL;
    struct rec r;
    static const char s[] = "<tool_call>{}</tool_call><tool_call>{\"name\":\"a\",\"arguments\":{}}"
                            "</tool_call><tool_call>{\"name\":\"a\",\"arguments\":{}}</tool_call>"
                            "<tool_call>{";
    (void)state;

    rec_init(&r);
    assert_int_equal(guard_toolcall_new(0, &p), 0);
    assert_int_equal(guard_toolcall_feed(p, s, strlen(s), rec_cb, &r), 0);
    assert_int_equal(guard_toolcall_n_ok(p), 2);
    assert_int_equal(guard_toolcall_n_invalid(p), 1);
    assert_true(guard_toolcall_in_call(p));
    assert_int_equal(guard_toolcall_finish(p, rec_cb, &r), 0);
    assert_int_equal(guard_toolcall_n_invalid(p), 2);
    assert_string_equal(r.log, "B0|E0:bad:bad name|B1|N1:a|A1:{}|E1:ok:a:{}|B2|N2:a|A2:{}|"
                               "E2:ok:a:{}|B3|E3:bad:unclosed|");
    guard_toolcall_free(p);
    free(r.log);
}

/* Random soup of the pieces that matter: every split gives the same log, nothing crashes. */
static void
test_guard_toolcall_random_soup_split_invariant(void **state)
{
    static const char *const pieces[] = {"<tool_call>",
                                         "</tool_call>",
                                         "<tool_",
                                         "</tool",
                                         "{",
                                         "}",
                                         "[",
                                         "]",
                                         "\"",
                                         "\\",
                                         "\"name\"",
                                         "\"arguments\"",
                                         "\"parameters\"",
                                         ":",
                                         ",",
                                         " ",
                                         "\n",
                                         "x",
                                         "1",
                                         "<",
                                         "\"f\"",
                                         "{\"name\": \"f\", \"arguments\": {",
                                         "\xC3\xA9"};
    const int n_pieces = (int)(sizeof(pieces) / sizeof(pieces[0]));
    char text[512];
    size_t cuts[16];
    unsigned seed = 99;
    (void)state;

    for (int iter = 0; iter < 3000; iter++) {
        size_t n = 0;
        int count = 1 + iter % 40;
        for (int k = 0; k < count; k++) {
            seed = seed * 1103515245u + 12345u;
            const char *pc = pieces[(seed >> 16) % (unsigned)n_pieces];
            size_t l = strlen(pc);
            if (n + l >= sizeof(text))
                break;
            memcpy(text + n, pc, l);
            n += l;
        }
        text[n] = 0;
        for (int k = 0; k < 16; k++) {
            seed = seed * 1103515245u + 12345u;
            cuts[k] = (seed >> 8) % (n + 1);
        }
        for (int a = 0; a < 16; a++)
            for (int b = a + 1; b < 16; b++)
                if (cuts[b] < cuts[a]) {
                    size_t t = cuts[a];
                    cuts[a] = cuts[b];
                    cuts[b] = t;
                }
        size_t cap = iter % 3 == 0 ? 48 : 0;
        char *whole = run_split(text, n, NULL, 0, cap);
        check_log(run_split(text, n, cuts, 16, cap), whole);
        free(whole);
    }
}

/* ---- Canonical JSON ---- */

static void
check_canon(const char *in, int want_rc, const char *want)
{
    char *out = NULL;
    int rc = guard_json_canonical(in, strlen(in), &out);

    assert_int_equal(rc, want_rc);
    if (rc == 0) {
        assert_string_equal(out, want);
        free(out);
    } else {
        assert_null(out);
    }
}

static void
test_guard_toolcall_json_canonical(void **state)
{
    (void)state;
    check_canon("{\"b\": 1, \"a\": {\"y\": [3, {\"q\": 1, \"p\": 2}], \"x\": \"u/v\"}}", 0,
                "{\"a\":{\"x\":\"u/v\",\"y\":[3,{\"p\":2,\"q\":1}]},\"b\":1}");
    check_canon(" \n{ \"a\" :\t1.50 , \"b\":-0e+3 }\r\n", 0, "{\"a\":1.50,\"b\":-0e+3}");
    check_canon("{\"\xC3\xA9\":1,\"z\":2,\"A\":3}", 0, "{\"A\":3,\"z\":2,\"\xC3\xA9\":1}");
    check_canon("{\"s\":\"line\\nnext \\u0041 \\\"q\\\"\"}", 0,
                "{\"s\":\"line\\nnext A \\\"q\\\"\"}");
    check_canon("[true,false,null,\"\"]", 0, "[true,false,null,\"\"]");
    check_canon("null", 0, "null");
    check_canon("42", 0, "42");
    check_canon("{}", 0, "{}");
    /* key order and formatting do not matter */
    char *a = NULL, *b = NULL;
    assert_int_equal(guard_json_canonical("{\"x\":1,\"y\":[1,2]}", 17, &a), 0);
    assert_int_equal(guard_json_canonical("{ \"y\" : [ 1 , 2 ] , \"x\" : 1 }", 29, &b), 0);
    assert_string_equal(a, b);
    free(a);
    free(b);

    static const char *const bad[] = {
        "",
        " ",
        "{",
        "{\"a\":1",
        "{\"a\":1,}",
        "[1,]",
        "{'a':1}",
        "NaN",
        "Infinity",
        "01",
        "1.",
        ".5",
        "-",
        "1e",
        "tru",
        "nul",
        "{\"a\" 1}",
        "{a:1}",
        "\"abc",
        "\"a\\x\"",
        "\"\\u12g4\"",
        "\"tab\there\"",
        "{} {}",
        "[1] x",
        "/*c*/{}",
        "{\"a\":1}}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        check_canon(bad[i], -EINVAL, NULL);
    /* an embedded NUL is not JSON */
    char *out = NULL;
    assert_int_equal(guard_json_canonical("{}\0", 3, &out), -EINVAL);
    assert_int_equal(guard_json_canonical("\"a\0\"", 4, &out), -EINVAL);
    /* nesting: 32 levels parse, 33 do not (json-c's default depth) */
    char deep[80];
    for (int d = 31; d <= 33; d++) {
        memset(deep, '[', (size_t)d);
        memset(deep + d, ']', (size_t)d);
        deep[2 * d] = 0;
        out = NULL;
        int rc = guard_json_canonical(deep, strlen(deep), &out);
        assert_int_equal(rc, d <= 32 ? 0 : -EINVAL);
        if (rc == 0)
            assert_string_equal(out, deep);
        free(out);
    }
}

/* ---- Allocation failures ----
 * This executable replaces malloc (glibc allows it) to fail the Nth allocation made by code linked
 * into it (the parser, not json-c's own internals, whose failures json-c reports as NULL to us
 * anyway) and to count live blocks, json-c's included. Sanitizer and valgrind builds bring their
 * own malloc; the test is skipped there. */

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TC_SANITIZED 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define TC_SANITIZED 1
#endif
#endif

#ifndef TC_SANITIZED
void *__libc_malloc(size_t n);
void *__libc_calloc(size_t count, size_t size);
void *__libc_realloc(void *p, size_t n);
void __libc_free(void *p);
extern char __executable_start[], etext[];

static struct {
    bool on;
    long fail_at, seen, live;
} fi;

static bool
fi_fail(const void *caller)
{
    if (!fi.on || (const char *)caller < __executable_start || (const char *)caller >= etext)
        return false;
    return ++fi.seen == fi.fail_at;
}

void *
malloc(size_t n)
{
    void *p = fi_fail(__builtin_return_address(0)) ? NULL : __libc_malloc(n);
    fi.live += p && fi.on;
    return p;
}

void *
calloc(size_t count, size_t size)
{
    void *p = fi_fail(__builtin_return_address(0)) ? NULL : __libc_calloc(count, size);
    fi.live += p && fi.on;
    return p;
}

void *
realloc(void *p, size_t n)
{
    void *q = fi_fail(__builtin_return_address(0)) ? NULL : __libc_realloc(p, n);
    fi.live += !p && q && fi.on;
    return q;
}

void
free(void *p)
{
    fi.live -= p && fi.on;
    __libc_free(p);
}

static int
quiet_cb(void *ctx, const struct guard_toolcall_event *ev)
{
    (*(int *)ctx)++;
    (void)ev;
    return 0;
}

/* One response through a parser and a canonicalisation; returns the first error. */
static int
fi_response(void)
{
    static const char s[] =
        "hi <tool_call>{\"name\": \"f\", \"arguments\": {\"b\": [1, {\"y\": 2, \"x\": 3}], "
        "\"a\": \"</tool_call>\"}}</tool_call>\n<tool_call>{\"arguments\": \"{\\\"k\\\": "
        "{}}\", \"name\": \"g\"}</tool_call> <tool_call>{\"name\": \"h\", \"arguments\": {";
    static const char canon_in[] = "{\"z\": [{\"b\": 1, \"a\": 2}], \"y\": \"s\"}";
    struct guard_toolcall *p = NULL;
    char *out = NULL;
    int n_events = 0, rc;

    rc = guard_toolcall_new(0, &p);
    for (size_t i = 0; rc == 0 && i < sizeof(s) - 1; i += 7)
        rc = guard_toolcall_feed(p, s + i, sizeof(s) - 1 - i < 7 ? sizeof(s) - 1 - i : 7, quiet_cb,
                                 &n_events);
    if (rc == 0)
        rc = guard_toolcall_finish(p, quiet_cb, &n_events);
    if (rc == 0 && (guard_toolcall_n_ok(p) != 2 || guard_toolcall_n_invalid(p) != 1))
        rc = -EBADMSG; /* an allocation failure must never pass as a different result */
    if (rc == 0)
        rc = guard_json_canonical(canon_in, strlen(canon_in), &out);
    if (rc == 0 && strcmp(out, "{\"y\":\"s\",\"z\":[{\"a\":2,\"b\":1}]}") != 0)
        rc = -EBADMSG;
    free(out);
    guard_toolcall_free(p);
    return rc;
}
#endif

static void
test_guard_toolcall_allocation_failures(void **state)
{
    (void)state;
#ifdef TC_SANITIZED
    skip();
#else
    long n;
    for (n = 1;; n++) {
        fi.fail_at = n;
        fi.seen = fi.live = 0;
        fi.on = true;
        int rc = fi_response();
        long seen = fi.seen, live = fi.live;
        fi.on = false;
        if (live != 0)
            fail_msg("allocation %ld failing: rc %d, %ld blocks leaked", n, rc, live);
        if (seen < n) { /* nothing failed: the whole response went through */
            assert_int_equal(rc, 0);
            break;
        }
        assert_int_equal(rc, -ENOMEM);
    }
    assert_true(n > 5);
    print_message("allocation failures injected: %ld\n", n - 1);
#endif
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_guard_toolcall_plain_content),
        cmocka_unit_test(test_guard_toolcall_one_call_with_content_before_and_after),
        cmocka_unit_test(test_guard_toolcall_two_calls_content_between),
        cmocka_unit_test(test_guard_toolcall_strings_with_braces_quotes_and_closer),
        cmocka_unit_test(test_guard_toolcall_invalid_json_at_close_dropped),
        cmocka_unit_test(test_guard_toolcall_semantic_errors),
        cmocka_unit_test(test_guard_toolcall_arguments_before_name_and_escaped_name),
        cmocka_unit_test(test_guard_toolcall_arguments_as_string),
        cmocka_unit_test(test_guard_toolcall_unclosed_block_at_finish),
        cmocka_unit_test(test_guard_toolcall_block_cap),
        cmocka_unit_test(test_guard_toolcall_forced_prefix),
        cmocka_unit_test(test_guard_toolcall_arguments_stream_before_the_closer),
        cmocka_unit_test(test_guard_toolcall_callback_stops_the_parse),
        cmocka_unit_test(test_guard_toolcall_counts_and_indices),
        cmocka_unit_test(test_guard_toolcall_random_soup_split_invariant),
        cmocka_unit_test(test_guard_toolcall_json_canonical),
        cmocka_unit_test(test_guard_toolcall_allocation_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for guards/guard_stop: the emitted text, the matched flag and the matched index equal
 * those of a whole-text reference (earliest start, then shortest, then lowest index) for every
 * split of scripted streams and random streams over a small alphabet; nothing is emitted after a
 * match; the hold-back is bounded; argument checks.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "guards/guard_stop.h"

/* ---- Helpers ---- */

struct result {
    char s[4096];
    size_t len;
    int idx;
};

/* Whole-text reference. */
static struct result
reference(const char *const *stops, int n_stops, const char *text, size_t n)
{
    struct result r = {.idx = -1};
    size_t best = n, best_len = 0;

    for (int j = 0; j < n_stops; j++) {
        const char *m = memmem(text, n, stops[j], strlen(stops[j]));
        size_t at = m ? (size_t)(m - text) : n;
        if (m && (at < best || (at == best && strlen(stops[j]) < best_len))) {
            best = at;
            best_len = strlen(stops[j]);
            r.idx = j;
        }
    }
    r.len = best;
    memcpy(r.s, text, best);
    return r;
}

static void
append(struct result *r, const char *p, size_t n)
{
    assert_true(r->len + n <= sizeof(r->s));
    if (n)
        memcpy(r->s + r->len, p, n);
    r->len += n;
}

/* Feeds text cut at sorted positions cuts[0..n_cuts), then flushes. */
static struct result
run_split(const char *const *stops, int n_stops, const char *text, size_t n, const size_t *cuts,
          int n_cuts)
{
    struct guard_stop *s = NULL;
    struct result r = {.idx = -1};
    const char *emit = NULL;
    size_t emit_len = 0, at = 0, max_len = 0;
    bool matched = false, was_matched = false;

    for (int j = 0; j < n_stops; j++)
        if (strlen(stops[j]) > max_len)
            max_len = strlen(stops[j]);
    assert_int_equal(guard_stop_new(stops, n_stops, &s), 0);
    for (int i = 0; i <= n_cuts; i++) {
        size_t end = i < n_cuts ? cuts[i] : n;
        assert_int_equal(guard_stop_feed(s, text + at, end - at, &emit, &emit_len, &matched), 0);
        if (was_matched) {
            assert_true(matched);
            assert_int_equal(emit_len, 0);
        }
        append(&r, emit, emit_len);
        was_matched = matched;
        at = end;
        if (!matched && max_len) /* the hold-back is shorter than the longest stop */
            assert_true(at - r.len < max_len);
        assert_memory_equal(r.s, text, r.len); /* always a prefix of the stream */
    }
    assert_int_equal(guard_stop_flush(s, &emit, &emit_len), 0);
    if (was_matched)
        assert_int_equal(emit_len, 0);
    append(&r, emit, emit_len);
    r.idx = guard_stop_matched_index(s);
    assert_int_equal(r.idx >= 0, was_matched || r.len < n);
    guard_stop_free(s);
    return r;
}

static void
check_equal(struct result a, struct result b)
{
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.s, b.s, a.len);
    assert_int_equal(a.idx, b.idx);
}

/* Every one- and two-cut split, and byte by byte, against the reference and against want. */
static void
check_all_splits(const char *const *stops, int n_stops, const char *text, const char *want,
                 int want_idx)
{
    size_t n = strlen(text), cuts[4096];
    struct result ref = reference(stops, n_stops, text, n);

    assert_int_equal(ref.len, strlen(want));
    assert_memory_equal(ref.s, want, ref.len);
    assert_int_equal(ref.idx, want_idx);
    check_equal(run_split(stops, n_stops, text, n, NULL, 0), ref);
    for (size_t i = 0; i <= n; i++) {
        for (size_t j = i; j <= n; j++) {
            cuts[0] = i;
            cuts[1] = j;
            check_equal(run_split(stops, n_stops, text, n, cuts, 2), ref);
        }
    }
    assert_true(n <= 4096);
    for (size_t i = 0; i < n; i++)
        cuts[i] = i;
    check_equal(run_split(stops, n_stops, text, n, cuts, (int)n), ref);
}

/* ---- Tests ---- */

static void
test_guard_stop_match_spanning_feeds(void **state)
{
    const char *stops[] = {"END"};
    (void)state;
    check_all_splits(stops, 1, "hello wEN ENDLESS", "hello wEN ", 0);
}

static void
test_guard_stop_no_match_then_flush(void **state)
{
    const char *stops[] = {"###", "\n\nUser:"};
    (void)state;
    check_all_splits(stops, 2, "a ## b \n\nUser but ##", "a ## b \n\nUser but ##", -1);
}

static void
test_guard_stop_at_the_very_start(void **state)
{
    const char *stops[] = {"<|im_end|>"};
    (void)state;
    check_all_splits(stops, 1, "<|im_end|>more", "", 0);
}

static void
test_guard_stop_overlapping_stops_earliest_start_wins(void **state)
{
    const char *stops[] = {"bc", "abcd"};
    (void)state;
    /* "abcd" starts before "bc": nothing is emitted, and it wins even after "bc" completes */
    check_all_splits(stops, 2, "xxabcdyy", "xx", 1);
    /* "abcd" never completes: "bc" wins, found at the next byte or at the flush */
    check_all_splits(stops, 2, "xxabcey", "xxa", 0);
    check_all_splits(stops, 2, "xxabc", "xxa", 0);
}

static void
test_guard_stop_same_start_shortest_then_lowest_index(void **state)
{
    const char *stops[] = {"stop here", "stop", "stop"};
    (void)state;
    check_all_splits(stops, 3, "go stop here", "go ", 1);
}

static void
test_guard_stop_utf8_boundaries(void **state)
{
    const char *stops[] = {"\xC3\xA9t\xC3\xA9"}; /* "été" */
    const char *emit = NULL;
    size_t len = 0;
    bool matched = false;
    struct guard_stop *s = NULL;
    (void)state;

    check_all_splits(stops, 1, "un \xC3\xA9t\xC3\xA9 chaud", "un ", 0);
    /* a character that shares the stop's first byte only is released whole */
    assert_int_equal(guard_stop_new(stops, 1, &s), 0);
    assert_int_equal(guard_stop_feed(s, "\xC3\xA8", 2, &emit, &len, &matched), 0);
    assert_int_equal(len, 2);
    assert_memory_equal(emit, "\xC3\xA8", 2);
    assert_int_equal(guard_stop_feed(s, "\xC3\xA9t", 3, &emit, &len, &matched), 0);
    assert_int_equal(len, 0);
    assert_false(matched);
    assert_int_equal(guard_stop_feed(s, "x", 1, &emit, &len, &matched), 0);
    assert_int_equal(len, 4);
    assert_memory_equal(emit, "\xC3\xA9tx", 4);
    guard_stop_free(s);
}

static void
test_guard_stop_nothing_after_a_match(void **state)
{
    const char *stops[] = {"!"};
    const char *emit = NULL;
    size_t len = 0;
    bool matched = false;
    struct guard_stop *s = NULL;
    (void)state;

    assert_int_equal(guard_stop_new(stops, 1, &s), 0);
    assert_int_equal(guard_stop_feed(s, "hi! there", 9, &emit, &len, &matched), 0);
    assert_true(matched);
    assert_int_equal(len, 2);
    assert_memory_equal(emit, "hi", 2);
    assert_int_equal(guard_stop_feed(s, "more", 4, &emit, &len, &matched), 0);
    assert_true(matched);
    assert_int_equal(len, 0);
    assert_int_equal(guard_stop_flush(s, &emit, &len), 0);
    assert_int_equal(len, 0);
    assert_int_equal(guard_stop_matched_index(s), 0);
    guard_stop_free(s);
}

static void
test_guard_stop_no_stops_passes_through(void **state)
{
    struct guard_stop *s = NULL;
    const char *emit = NULL;
    size_t len = 0;
    bool matched = true;
    (void)state;

    assert_int_equal(guard_stop_new(NULL, 0, &s), 0);
    assert_int_equal(guard_stop_feed(s, "abc", 3, &emit, &len, &matched), 0);
    assert_false(matched);
    assert_int_equal(len, 3);
    assert_int_equal(guard_stop_feed(s, NULL, 0, &emit, &len, &matched), 0);
    assert_int_equal(len, 0);
    assert_int_equal(guard_stop_matched_index(s), -1);
    guard_stop_free(s);
    guard_stop_free(NULL);
}

/* Found by fuzz_toolcall: a flush before any text was fed did pointer arithmetic on the NULL
 * buffer (UBSan under make asan / make fuzz). */
static void
test_guard_stop_flush_before_any_text(void **state)
{
    const char *stops[] = {"</tool_call>", "x"};
    struct guard_stop *s = NULL;
    const char *emit = "unset";
    size_t len = 99;
    bool matched = true;
    (void)state;

    assert_int_equal(guard_stop_new(stops, 2, &s), 0);
    assert_int_equal(guard_stop_flush(s, &emit, &len), 0);
    assert_int_equal(len, 0);
    assert_int_equal(guard_stop_feed(s, NULL, 0, &emit, &len, &matched), 0);
    assert_false(matched);
    assert_int_equal(guard_stop_flush(s, &emit, &len), 0);
    assert_int_equal(len, 0);
    assert_int_equal(guard_stop_matched_index(s), -1);
    guard_stop_free(s);
}

static void
test_guard_stop_rejects_bad_arguments(void **state)
{
    char long_stop[GUARD_STOP_MAX_LEN + 2];
    const char *five[] = {"a", "b", "c", "d", "e"};
    const char *empty[] = {""};
    const char *null_stop[] = {NULL};
    const char *bad_utf8[] = {"a\xC3"};
    const char *too_long[] = {long_stop};
    struct guard_stop *s = NULL;
    (void)state;

    memset(long_stop, 'x', sizeof(long_stop) - 1);
    long_stop[sizeof(long_stop) - 1] = 0;
    assert_int_equal(guard_stop_new(five, 5, &s), -EINVAL);
    assert_int_equal(guard_stop_new(five, -1, &s), -EINVAL);
    assert_int_equal(guard_stop_new(NULL, 1, &s), -EINVAL);
    assert_int_equal(guard_stop_new(empty, 1, &s), -EINVAL);
    assert_int_equal(guard_stop_new(null_stop, 1, &s), -EINVAL);
    assert_int_equal(guard_stop_new(bad_utf8, 1, &s), -EINVAL);
    assert_int_equal(guard_stop_new(too_long, 1, &s), -EINVAL);
    assert_null(s);
    long_stop[GUARD_STOP_MAX_LEN] = 0; /* exactly 256 bytes is fine */
    assert_int_equal(guard_stop_new(too_long, 1, &s), 0);
    assert_non_null(s);
    guard_stop_free(s);
}

static void
test_guard_stop_random_streams_match_reference(void **state)
{
    /* small alphabet so that partial and overlapping matches are frequent */
    const char *stops[] = {"aab", "ba", "abab", "bbbb"};
    char text[80];
    size_t cuts[12];
    unsigned seed = 7;
    (void)state;

    for (int iter = 0; iter < 5000; iter++) {
        int n_stops = 1 + iter % 4;
        size_t n = (size_t)(iter % 79);
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1103515245u + 12345u;
            text[i] = "abbac"[(seed >> 16) % 5];
        }
        text[n] = 0;
        for (int k = 0; k < 12; k++) {
            seed = seed * 1103515245u + 12345u;
            cuts[k] = (seed >> 8) % (n + 1);
        }
        for (int a = 0; a < 12; a++)
            for (int b = a + 1; b < 12; b++)
                if (cuts[b] < cuts[a]) {
                    size_t t = cuts[a];
                    cuts[a] = cuts[b];
                    cuts[b] = t;
                }
        check_equal(run_split(stops + 4 - n_stops, n_stops, text, n, cuts, 12),
                    reference(stops + 4 - n_stops, n_stops, text, n));
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_guard_stop_match_spanning_feeds),
        cmocka_unit_test(test_guard_stop_no_match_then_flush),
        cmocka_unit_test(test_guard_stop_at_the_very_start),
        cmocka_unit_test(test_guard_stop_overlapping_stops_earliest_start_wins),
        cmocka_unit_test(test_guard_stop_same_start_shortest_then_lowest_index),
        cmocka_unit_test(test_guard_stop_utf8_boundaries),
        cmocka_unit_test(test_guard_stop_nothing_after_a_match),
        cmocka_unit_test(test_guard_stop_no_stops_passes_through),
        cmocka_unit_test(test_guard_stop_flush_before_any_text),
        cmocka_unit_test(test_guard_stop_rejects_bad_arguments),
        cmocka_unit_test(test_guard_stop_random_streams_match_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for guards/guard_utf8: valid text passes unchanged in every split, ill-formed input
 * becomes U+FFFD per maximal subpart (the Unicode 15 table 3-8 example), the result does not depend
 * on the split, and guard_utf8_valid agrees with an independent code-point decoder over all
 * one- and two-byte strings and boundary three- and four-byte strings.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "guards/guard_utf8.h"

#define FFFD "\xEF\xBF\xBD"

/* ---- Helpers ---- */

struct text {
    char *s;
    size_t len;
};

static void
text_add(struct text *t, char *piece, size_t n)
{
    t->s = realloc(t->s, t->len + n + 1);
    assert_non_null(t->s);
    memcpy(t->s + t->len, piece, n);
    t->len += n;
    t->s[t->len] = 0;
    free(piece);
}

/* Feeds in[0..n) cut at the sorted positions cuts[0..n_cuts), then flushes. */
static struct text
run_split(const char *in, size_t n, const size_t *cuts, int n_cuts)
{
    struct guard_utf8 u;
    struct text t = {0};
    size_t at = 0;
    char *out = NULL;
    size_t out_len = 0;

    guard_utf8_init(&u);
    for (int i = 0; i <= n_cuts; i++) {
        size_t end = i < n_cuts ? cuts[i] : n;
        assert_int_equal(guard_utf8_feed(&u, in + at, end - at, &out, &out_len), 0);
        assert_int_equal(strlen(out), out_len);
        assert_true(u.n_pend >= 0 && u.n_pend <= 3);
        text_add(&t, out, out_len);
        at = end;
    }
    assert_int_equal(guard_utf8_flush(&u, &out, &out_len), 0);
    text_add(&t, out, out_len);
    assert_int_equal(u.n_pend, 0);
    return t;
}

static struct text
run_whole(const char *in, size_t n)
{
    return run_split(in, n, NULL, 0);
}

/* Checks that the output for in equals expect whole, at every single and double cut and when
 * fed byte by byte. */
static void
check_all_splits(const char *in, size_t n, const char *expect, size_t expect_len)
{
    size_t cuts[2];
    struct text t = run_whole(in, n);

    assert_int_equal(t.len, expect_len);
    assert_memory_equal(t.s, expect, expect_len);
    assert_true(guard_utf8_valid(t.s, t.len));
    free(t.s);
    for (size_t i = 0; i <= n; i++) {
        for (size_t j = i; j <= n; j++) {
            cuts[0] = i;
            cuts[1] = j;
            t = run_split(in, n, cuts, 2);
            assert_int_equal(t.len, expect_len);
            assert_memory_equal(t.s, expect, expect_len);
            free(t.s);
        }
    }
    size_t *all = malloc((n + 1) * sizeof(*all));
    assert_non_null(all);
    for (size_t i = 0; i < n; i++)
        all[i] = i;
    t = run_split(in, n, all, (int)n);
    assert_memory_equal(t.s, expect, expect_len);
    free(t.s);
    free(all);
}

/* Independent reference: decode code points by the definition (RFC 3629), NUL rejected. */
static bool
ref_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        unsigned c = s[i];
        size_t len;
        uint32_t cp, min;
        if (c < 0x80) {
            len = 1, cp = c, min = 1;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return false;
        }
        if (i + len > n)
            return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += len;
    }
    return true;
}

/* ---- Tests ---- */

static void
test_guard_utf8_valid_text_unchanged_in_every_split(void **state)
{
    static const char s[] =
        "h\xC3\xA9llo \xE2\x82\xAC \xF0\x9D\x84\x9E z\xF4\x8F\xBF\xBF\xEF\xBF\xBF";
    (void)state;
    check_all_splits(s, sizeof(s) - 1, s, sizeof(s) - 1);
}

static void
test_guard_utf8_unicode_table_3_8_example(void **state)
{
    /* Unicode 15, 3.9, table 3-8: maximal subparts */
    static const char in[] = "\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64";
    static const char want[] = "a" FFFD FFFD FFFD "b" FFFD "c" FFFD FFFD "d";
    (void)state;
    check_all_splits(in, sizeof(in) - 1, want, sizeof(want) - 1);
}

static void
test_guard_utf8_invalid_forms_replaced(void **state)
{
    static const struct {
        const char *in;
        size_t n;
        const char *want;
    } cases[] = {
        {"\xC0\xAF", 2, FFFD FFFD},                           /* overlong '/' */
        {"\xE0\x80\xAF", 3, FFFD FFFD FFFD},                  /* overlong, 3 bytes */
        {"\xF0\x80\x80\xAF", 4, FFFD FFFD FFFD FFFD},         /* overlong, 4 bytes */
        {"\xED\xA0\x80", 3, FFFD FFFD FFFD},                  /* surrogate D800 */
        {"\xED\xBF\xBF", 3, FFFD FFFD FFFD},                  /* surrogate DFFF */
        {"\xF4\x90\x80\x80", 4, FFFD FFFD FFFD FFFD},         /* U+110000 */
        {"\xF5\x80", 2, FFFD FFFD},                           /* never-used lead */
        {"\xFF", 1, FFFD},                                    /* never-used byte */
        {"\x80x", 2, FFFD "x"},                               /* stray continuation */
        {"a\0b", 3, "a" FFFD "b"},                            /* NUL */
        {"\xE2\x82", 2, FFFD},                                /* truncated at the end */
        {"\xE2\x82x", 3, FFFD "x"},                           /* truncated, then ASCII */
        {"\xF0\x9F\x98", 3, FFFD},                            /* truncated 4-byte */
        {"\xE2\xF0\x9F\x98\x80", 5, FFFD "\xF0\x9F\x98\x80"}, /* breaker starts a sequence */
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_all_splits(cases[i].in, cases[i].n, cases[i].want, strlen(cases[i].want));
}

static void
test_guard_utf8_pending_bytes_wait_for_the_rest(void **state)
{
    struct guard_utf8 u;
    char *out = NULL;
    size_t len = 0;
    (void)state;

    guard_utf8_init(&u);
    assert_int_equal(guard_utf8_feed(&u, "a\xE2", 2, &out, &len), 0);
    assert_string_equal(out, "a");
    free(out);
    assert_int_equal(u.n_pend, 1);
    assert_int_equal(guard_utf8_feed(&u, "\x82", 1, &out, &len), 0);
    assert_int_equal(len, 0);
    assert_string_equal(out, "");
    free(out);
    assert_int_equal(u.n_pend, 2);
    assert_int_equal(guard_utf8_feed(&u, "\xAC", 1, &out, &len), 0);
    assert_string_equal(out, "\xE2\x82\xAC");
    free(out);
    assert_int_equal(u.n_pend, 0);
    /* flush with nothing pending gives nothing; with a pending tail, one U+FFFD */
    assert_int_equal(guard_utf8_flush(&u, &out, &len), 0);
    assert_int_equal(len, 0);
    free(out);
    assert_int_equal(guard_utf8_feed(&u, "\xF0\x9F", 2, &out, &len), 0);
    assert_int_equal(len, 0);
    free(out);
    assert_int_equal(guard_utf8_flush(&u, &out, &len), 0);
    assert_string_equal(out, FFFD);
    free(out);
    assert_int_equal(guard_utf8_feed(&u, NULL, 0, &out, &len), 0);
    assert_int_equal(len, 0);
    free(out);
}

static void
test_guard_utf8_valid_matches_reference(void **state)
{
    static const unsigned char edge[] = {0x00, 0x01, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF,
                                         0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF,
                                         0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xF8, 0xFE, 0xFF};
    const size_t ne = sizeof(edge);
    unsigned char b[4];
    long checked = 0;
    (void)state;

    for (int i = 0; i < 256; i++) {
        b[0] = (unsigned char)i;
        assert_int_equal(guard_utf8_valid((char *)b, 1), ref_valid(b, 1));
        for (int j = 0; j < 256; j++) {
            b[1] = (unsigned char)j;
            assert_int_equal(guard_utf8_valid((char *)b, 2), ref_valid(b, 2));
            checked++;
        }
    }
    for (int i = 0x80; i < 256; i++) {
        b[0] = (unsigned char)i;
        for (size_t j = 0; j < ne; j++) {
            b[1] = edge[j];
            for (size_t k = 0; k < ne; k++) {
                b[2] = edge[k];
                assert_int_equal(guard_utf8_valid((char *)b, 3), ref_valid(b, 3));
                for (size_t l = 0; l < ne; l++) {
                    b[3] = edge[l];
                    bool want = ref_valid(b, 4);
                    assert_int_equal(guard_utf8_valid((char *)b, 4), want);
                    /* the decoder's output is always valid, and valid input passes unchanged */
                    struct text t = run_whole((char *)b, 4);
                    assert_true(guard_utf8_valid(t.s, t.len));
                    if (want) {
                        assert_int_equal(t.len, 4);
                        assert_memory_equal(t.s, b, 4);
                    } else {
                        assert_true(memmem(t.s, t.len, FFFD, 3) != NULL);
                    }
                    free(t.s);
                    checked++;
                }
            }
        }
    }
    assert_true(checked > 1000000);
    assert_true(guard_utf8_valid("", 0));
}

static void
test_guard_utf8_random_bytes_split_invariant(void **state)
{
    unsigned seed = 12345;
    unsigned char buf[64];
    (void)state;

    for (int iter = 0; iter < 2000; iter++) {
        size_t n = 1 + (size_t)(iter % 63);
        size_t cuts[8];
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1103515245u + 12345u;
            /* bias toward bytes that form and break sequences */
            unsigned r = (seed >> 16) & 0xFF;
            buf[i] = (unsigned char)((r & 1) ? 0x80 | (r >> 2) : r);
        }
        struct text whole = run_whole((char *)buf, n);
        assert_true(guard_utf8_valid(whole.s, whole.len));
        for (int k = 0; k < 8; k++) {
            seed = seed * 1103515245u + 12345u;
            cuts[k] = (seed >> 8) % (n + 1);
        }
        for (int a = 0; a < 8; a++) /* sort the cuts */
            for (int b = a + 1; b < 8; b++)
                if (cuts[b] < cuts[a]) {
                    size_t t = cuts[a];
                    cuts[a] = cuts[b];
                    cuts[b] = t;
                }
        struct text split = run_split((char *)buf, n, cuts, 8);
        assert_int_equal(split.len, whole.len);
        assert_memory_equal(split.s, whole.s, whole.len);
        free(split.s);
        free(whole.s);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_guard_utf8_valid_text_unchanged_in_every_split),
        cmocka_unit_test(test_guard_utf8_unicode_table_3_8_example),
        cmocka_unit_test(test_guard_utf8_invalid_forms_replaced),
        cmocka_unit_test(test_guard_utf8_pending_bytes_wait_for_the_rest),
        cmocka_unit_test(test_guard_utf8_valid_matches_reference),
        cmocka_unit_test(test_guard_utf8_random_bytes_split_invariant),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for the content guards of guards/guard (line_repeat, sentence_loop): each trips at
 * exactly its threshold (the byte where it trips is checked) and not one below, the window and
 * the ring forget (resets), the cut rules (punctuation, blank line, closing fence, 1024 bytes),
 * fenced code is skipped, and the legitimate look-alikes (a numbered list of 30 items, a markdown
 * table, repeated code inside a fence) trip nothing. Every text is fed whole, byte by byte and in
 * random splits at character boundaries, and must give the same verdict at the same byte.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guards/guard.h"

/* ---- Helpers ---- */

enum which { ALL, LINE_ONLY, SENTENCE_ONLY };

static void
make_config(struct guard_config *c, enum which w)
{
    guard_config_init(c);
    if (w == LINE_ONLY)
        c->value[GUARD_SENTENCE_LOOP] = 0;
    if (w == SENTENCE_ONLY)
        c->value[GUARD_LINE_REPEAT] = 0;
}

static uint64_t rng_state;

static uint32_t
rng(void)
{
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(rng_state >> 33);
}

/* Feeds text whole (split 0) or byte by byte (split 1). Returns the verdict and in *pos the number
 * of bytes consumed up to the end of the feed that tripped (0 when nothing tripped). */
static enum guard_id
feed_split(const struct guard_config *c, const char *text, int split, size_t *pos)
{
    struct guard *g = NULL;
    size_t n = strlen(text), off = 0;
    enum guard_id t = GUARD_NONE;
    assert_int_equal(guard_new(c, NULL, 0, &g), 0);
    *pos = 0;
    while (off < n && t == GUARD_NONE) {
        size_t len = split == 1 ? 1 : n - off;
        t = guard_feed_text(g, text + off, len);
        off += len;
        if (t != GUARD_NONE)
            *pos = off;
    }
    assert_int_equal(guard_tripped(g), t);
    guard_free(g);
    return t;
}

/* Checks that text under configuration w gives verdict want, tripping at byte want_pos (the
 * 1-based offset of the byte whose feed trips), whatever the split. */
static void
expect(enum which w, const char *text, enum guard_id want, size_t want_pos)
{
    struct guard_config c;
    size_t pos = 0;
    make_config(&c, w);
    assert_int_equal(feed_split(&c, text, 1, &pos), want);
    assert_int_equal(pos, want == GUARD_NONE ? 0 : want_pos);
    assert_int_equal(feed_split(&c, text, 0, &pos), want);
    assert_int_equal(pos, want == GUARD_NONE ? 0 : strlen(text));
    for (int s = 0; s < 30; s++) {
        rng_state = (uint64_t)s + 1;
        size_t total = strlen(text), p;
        /* the piece that tripped ends at or after the tripping byte, and began before it */
        struct guard *g = NULL;
        assert_int_equal(guard_new(&c, NULL, 0, &g), 0);
        size_t off = 0;
        enum guard_id t = GUARD_NONE;
        while (off < total && t == GUARD_NONE) {
            size_t len = 1 + rng() % 37;
            if (len > total - off)
                len = total - off;
            while (off + len < total && ((unsigned char)text[off + len] & 0xC0) == 0x80)
                len++;
            t = guard_feed_text(g, text + off, len);
            p = off;
            off += len;
            if (t != GUARD_NONE) {
                assert_true(p < want_pos && want_pos <= off);
            }
        }
        assert_int_equal(t, want);
        guard_free(g);
    }
}

/* Appends to a growing buffer. */
struct buf {
    char *s;
    size_t len, cap;
};

static void
put(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        assert_true(n >= 0);
        if (b->s && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        b->cap = b->cap * 2 + (size_t)n + 64;
        b->s = realloc(b->s, b->cap);
        assert_non_null(b->s);
    }
}

static void
put_repeat(struct buf *b, const char *s, int n)
{
    for (int i = 0; i < n; i++)
        put(b, "%s", s);
}

/* A random word of 4..9 letters (distinct texts never repeat by accident). */
static void
put_word(struct buf *b)
{
    char w[10];
    int n = 4 + (int)(rng() % 6);
    for (int i = 0; i < n; i++)
        w[i] = (char)('a' + rng() % 26);
    w[n] = '\0';
    put(b, "%s", w);
}

/* ---- line_repeat: lines ---- */

static void
test_guard_line_repeat_threshold(void **state)
{
    (void)state;
    struct buf b = {0};
    put_repeat(&b, "repeat me please ok\n", 4); /* 19 characters */
    expect(ALL, b.s, GUARD_LINE_REPEAT, 80);
    b.len = 0;
    put_repeat(&b, "repeat me please ok\n", 3);
    put(&b, "repeat me please ok");
    expect(ALL, b.s, GUARD_NONE, 0); /* the 4th is not a line until its newline */
    free(b.s);
}

static void
test_guard_line_repeat_normalises(void **state)
{
    (void)state;
    const char *text = "Repeat me please ok\n"
                       "repeat   me please OK  \n"
                       "\tREPEAT me please ok\n"
                       "  repeat me\tplease ok\r\n";
    expect(ALL, text, GUARD_LINE_REPEAT, strlen(text));
}

static void
test_guard_line_repeat_length(void **state)
{
    (void)state;
    struct buf b = {0};
    put_repeat(&b, "abcdefghij klmn\n", 4); /* 15 characters: not counted */
    expect(ALL, b.s, GUARD_NONE, 0);
    b.len = 0;
    put_repeat(&b, "abcdefghij klmno\n", 4); /* 16 */
    expect(ALL, b.s, GUARD_LINE_REPEAT, b.len);
    b.len = 0;
    put_repeat(&b, "|------|------|------|------|\n", 6); /* symbols only: layout */
    expect(ALL, b.s, GUARD_NONE, 0);
    free(b.s);
}

static void
test_guard_line_repeat_window_forgets(void **state)
{
    (void)state;
    struct buf b = {0};
    for (int filler = 4000; filler <= 9000; filler += 5000) {
        b.len = 0;
        rng_state = 77;
        put(&b, "the build failed again today\n");
        while (b.len < (size_t)filler) {
            for (int i = 0; i < 8; i++) {
                put_word(&b);
                put(&b, " ");
            }
            put(&b, "\n");
        }
        put_repeat(&b, "the build failed again today\n", 3);
        /* 4 in the window trips; the first one 9000 bytes back is out of it */
        expect(ALL, b.s, filler < 8192 ? GUARD_LINE_REPEAT : GUARD_NONE, b.len);
    }
    free(b.s);
}

/* ---- line_repeat: phrases ---- */

static void
test_guard_line_repeat_phrase_threshold(void **state)
{
    (void)state;
    const char *rep = "we need to go back to the start and "; /* 36 bytes */
    struct buf b = {0};
    put_repeat(&b, rep, 4);
    /* the 30 bytes ending with the 4th "start" occur 4 times: trips at the space after it */
    expect(LINE_ONLY, b.s, GUARD_LINE_REPEAT, 3 * 36 + 32);
    b.len = 0;
    put_repeat(&b, rep, 3);
    put(&b, "we need to go back to the star");
    expect(LINE_ONLY, b.s, GUARD_NONE, 0);
    free(b.s);
}

static void
test_guard_line_repeat_phrase_case_insensitive(void **state)
{
    (void)state;
    const char *text = "Let me try that once more now. "
                       "LET ME TRY THAT ONCE MORE NOW. "
                       "let me try that Once More now. "
                       "let me try that once more now. ";
    expect(LINE_ONLY, text, GUARD_LINE_REPEAT, strlen(text));
}

/* ---- sentence_loop ---- */

static void
test_guard_sentence_loop_third_near_repeat(void **state)
{
    (void)state;
    const char *two = "I will check the configuration file for the error now. "
                      "I will check the configuration file for the problem now. ";
    char three[256];
    snprintf(three, sizeof(three), "%sI will check the configuration file for the issue now. ",
             two);
    expect(ALL, two, GUARD_NONE, 0);
    expect(ALL, three, GUARD_SENTENCE_LOOP, strlen(three));
    /* not cut yet: no white space after the last period */
    three[strlen(three) - 1] = '\0';
    expect(ALL, three, GUARD_NONE, 0);
}

/* Words a1..a16 (A) and a1..a12 b1..bk: Jaccard of the bigram sets 11 / (15 + k). */
static void
put_prefix_sentence(struct buf *b, int n_a, int n_b)
{
    static const char *const a[] = {"alpha", "bravo",    "charlie", "delta",  "echo", "foxtrot",
                                    "golf",  "hotel",    "india",   "juliet", "kilo", "lima",
                                    "mike",  "november", "oscar",   "papa"};
    static const char *const bw[] = {"red", "green", "blue", "cyan", "magenta", "yellow"};
    for (int i = 0; i < n_a; i++)
        put(b, "%s%s", i ? " " : "", a[i]);
    for (int i = 0; i < n_b; i++)
        put(b, " %s", bw[i]);
    put(b, ". ");
}

static void
test_guard_sentence_loop_similarity_threshold(void **state)
{
    (void)state;
    struct buf b = {0};
    put_prefix_sentence(&b, 16, 0);
    put_prefix_sentence(&b, 16, 0);
    put_prefix_sentence(&b, 12, 5); /* 11 / 20 = 0.55 with both */
    expect(SENTENCE_ONLY, b.s, GUARD_SENTENCE_LOOP, b.len);
    b.len = 0;
    put_prefix_sentence(&b, 16, 0);
    put_prefix_sentence(&b, 16, 0);
    put_prefix_sentence(&b, 12, 6); /* 11 / 21 < 0.55 */
    expect(SENTENCE_ONLY, b.s, GUARD_NONE, 0);
    free(b.s);
}

static void
put_random_sentence(struct buf *b)
{
    for (int i = 0; i < 8; i++) {
        if (i)
            put(b, " ");
        put_word(b);
    }
    put(b, ". ");
}

static void
test_guard_sentence_loop_ring_forgets(void **state)
{
    (void)state;
    const char *s = "The server returned an error so I will retry the request. ";
    struct buf b = {0};
    for (int k = 14; k <= 15; k++) {
        b.len = 0;
        rng_state = 5;
        put_repeat(&b, s, 2);
        for (int i = 0; i < k; i++)
            put_random_sentence(&b);
        put(&b, "%s", s);
        /* 14 others: both earlier copies are still among the last 16; 15: one is gone */
        expect(SENTENCE_ONLY, b.s, k == 14 ? GUARD_SENTENCE_LOOP : GUARD_NONE, b.len);
    }
    free(b.s);
}

static void
test_guard_sentence_loop_cuts(void **state)
{
    (void)state;
    struct buf b = {0};
    /* a blank line ends a sentence without punctuation; a single newline does not */
    put_repeat(&b, "we keep going around in circles here\n\n", 3);
    expect(SENTENCE_ONLY, b.s, GUARD_SENTENCE_LOOP, b.len);
    b.len = 0;
    put_repeat(&b, "we keep going around in circles here\n", 6);
    expect(SENTENCE_ONLY, b.s, GUARD_NONE, 0);
    /* ! ? : cut too */
    const char *marks = "This cannot be right at all! This cannot be right at all? "
                        "This cannot be right at all: ";
    expect(SENTENCE_ONLY, marks, GUARD_SENTENCE_LOOP, strlen(marks));
    /* a closing fence ends the sentence that was pending before the code */
    b.len = 0;
    put_repeat(&b, "some words come before the code block here\n```\nx = 1\n```\n", 2);
    put(&b, "some words come before the code block here\n```\nx = 1\n``");
    size_t at = b.len + 1;
    put(&b, "`\n");
    expect(SENTENCE_ONLY, b.s, GUARD_SENTENCE_LOOP, at);
    /* 1024 pending bytes */
    b.len = 0;
    rng_state = 9;
    struct buf block = {0};
    while (block.len < 1100) {
        put_word(&block);
        put(&block, " ");
    }
    block.s[1023] = 'x'; /* the block starts and ends with a letter */
    block.s[1024] = '\0';
    block.len = 1024;
    put_repeat(&b, block.s, 3);
    expect(SENTENCE_ONLY, b.s, GUARD_SENTENCE_LOOP, 3072);
    b.len = 0;
    put_repeat(&b, block.s, 2);
    put(&b, "%.1023s", block.s);
    expect(SENTENCE_ONLY, b.s, GUARD_NONE, 0);
    free(block.s);
    free(b.s);
}

static void
test_guard_sentence_loop_short_sentences_ignored(void **state)
{
    (void)state;
    struct buf b = {0};
    put_repeat(&b, "Yes, that is right. ", 10); /* 17 normalised characters */
    expect(SENTENCE_ONLY, b.s, GUARD_NONE, 0);
    b.len = 0;
    put_repeat(&b, "Internationalization, unquestionably. ", 10); /* 2 words */
    expect(SENTENCE_ONLY, b.s, GUARD_NONE, 0);
    free(b.s);
}

static void
test_guard_sentence_loop_skips_fenced_code(void **state)
{
    (void)state;
    const char *s = "I will check the configuration file for the error now. ";
    struct buf b = {0};
    put(&b, "Here is the script\n```python\n");
    put_repeat(&b, s, 4);
    put(&b, "\n~~~\nnot a fence end\n```\nThat was the script.\n");
    expect(SENTENCE_ONLY, b.s, GUARD_NONE, 0);
    b.len = 0;
    put_repeat(&b, s, 3);
    expect(SENTENCE_ONLY, b.s, GUARD_SENTENCE_LOOP, b.len);
    free(b.s);
}

static void
test_guard_sentence_loop_utf8(void **state)
{
    (void)state;
    struct buf b = {0};
    put_repeat(&b, "Ça recommence encore une fois, toujours la même chose. ", 2);
    put(&b, "Ça recommence encore une fois, toujours la même histoire. ");
    expect(SENTENCE_ONLY, b.s, GUARD_SENTENCE_LOOP, b.len);
    free(b.s);
}

/* ---- Look-alikes ---- */

static const char *const list_items[30] = {
    "Read the project README before changing anything",
    "Install the compiler toolchain and the debugger",
    "Clone the repository with its submodules",
    "Run the unit tests once to see a green baseline",
    "Skim the architecture notes for the module map",
    "Pick a small issue labelled good first issue",
    "Reproduce the bug with a minimal input file",
    "Write a failing test that shows the problem",
    "Find the function where the wrong value appears",
    "Check how callers use its return code",
    "Fix the off-by-one in the loop bound",
    "Rerun the failing test until it passes",
    "Run the whole suite under the address sanitizer",
    "Format the changed files with clang-format",
    "Describe the change in the commit message",
    "Push the branch to your fork",
    "Open a pull request against main",
    "Answer the reviewer's questions politely",
    "Squash fixup commits when asked",
    "Watch continuous integration for flaky jobs",
    "Update the changelog entry for the release",
    "Add documentation for any new option",
    "Benchmark the hot path if performance matters",
    "Compare results with the previous release",
    "Tag the maintainers who own the module",
    "Wait for the second approval",
    "Merge once every check is green",
    "Delete the merged branch",
    "Close the issue with a link to the fix",
    "Celebrate, then pick the next issue",
};

static void
test_guard_lookalike_numbered_list(void **state)
{
    (void)state;
    struct buf b = {0};
    put(&b, "Here are 30 steps for a first contribution:\n\n");
    for (int i = 0; i < 30; i++)
        put(&b, "%d. %s.\n", i + 1, list_items[i]);
    put(&b, "\nGood luck with your first contribution!\n");
    expect(ALL, b.s, GUARD_NONE, 0);
    free(b.s);
}

static void
test_guard_lookalike_markdown_table(void **state)
{
    (void)state;
    static const char *const rows[][4] = {
        {"C", "1972", "Dennis Ritchie", "static, weak"},
        {"C++", "1985", "Bjarne Stroustrup", "static"},
        {"Python", "1991", "Guido van Rossum", "dynamic, strong"},
        {"Java", "1995", "James Gosling", "static, strong"},
        {"JavaScript", "1995", "Brendan Eich", "dynamic, weak"},
        {"Ruby", "1995", "Yukihiro Matsumoto", "dynamic, strong"},
        {"PHP", "1995", "Rasmus Lerdorf", "dynamic, weak"},
        {"C#", "2000", "Anders Hejlsberg", "static, strong"},
        {"Go", "2009", "Griesemer, Pike, Thompson", "static, strong"},
        {"Rust", "2015", "Graydon Hoare", "static, strong"},
        {"Swift", "2014", "Chris Lattner", "static, strong"},
        {"Kotlin", "2011", "JetBrains", "static, strong"},
        {"Haskell", "1990", "a committee", "static, strong"},
        {"Lua", "1993", "Ierusalimschy et al.", "dynamic"},
        {"Perl", "1987", "Larry Wall", "dynamic"},
        {"Fortran", "1957", "John Backus", "static"},
        {"Lisp", "1958", "John McCarthy", "dynamic"},
        {"Erlang", "1986", "Joe Armstrong", "dynamic, strong"},
        {"Zig", "2016", "Andrew Kelley", "static"},
        {"OCaml", "1996", "INRIA", "static, inferred"},
    };
    struct buf b = {0};
    put(&b, "| Language | Year | Creator | Typing |\n| --- | --- | --- | --- |\n");
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        put(&b, "| %s | %s | %s | %s |\n", rows[i][0], rows[i][1], rows[i][2], rows[i][3]);
    put(&b, "\n| Tool | Use |\n| --- | --- |\n| make | builds |\n| gdb | debugs |\n");
    put(&b, "\n| Tool | Use |\n| --- | --- |\n| perf | profiles |\n| strace | traces |\n");
    expect(ALL, b.s, GUARD_NONE, 0);
    free(b.s);
}

static void
test_guard_lookalike_repeated_code_in_fence(void **state)
{
    (void)state;
    struct buf b = {0};
    put(&b, "Here is the test file. It checks each step.\n\n```c\n");
    for (int i = 0; i < 12; i++) {
        put(&b, "    rc = run_step(ctx, %d); /* one more step of the test */\n", i);
        put(&b, "    assert_int_equal(rc, 0); /* the step must succeed here */\n");
        put(&b, "    assert_int_equal(ctx->errors, 0); /* and leave no errors. */\n");
        put(&b, "    if (rc != 0) {\n        return rc;\n    }\n");
    }
    put(&b, "```\n\nEach step is checked the same way. Run it with make test.\n");
    expect(ALL, b.s, GUARD_NONE, 0);
    free(b.s);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_guard_line_repeat_threshold),
        cmocka_unit_test(test_guard_line_repeat_normalises),
        cmocka_unit_test(test_guard_line_repeat_length),
        cmocka_unit_test(test_guard_line_repeat_window_forgets),
        cmocka_unit_test(test_guard_line_repeat_phrase_threshold),
        cmocka_unit_test(test_guard_line_repeat_phrase_case_insensitive),
        cmocka_unit_test(test_guard_sentence_loop_third_near_repeat),
        cmocka_unit_test(test_guard_sentence_loop_similarity_threshold),
        cmocka_unit_test(test_guard_sentence_loop_ring_forgets),
        cmocka_unit_test(test_guard_sentence_loop_cuts),
        cmocka_unit_test(test_guard_sentence_loop_short_sentences_ignored),
        cmocka_unit_test(test_guard_sentence_loop_skips_fenced_code),
        cmocka_unit_test(test_guard_sentence_loop_utf8),
        cmocka_unit_test(test_guard_lookalike_numbered_list),
        cmocka_unit_test(test_guard_lookalike_markdown_table),
        cmocka_unit_test(test_guard_lookalike_repeated_code_in_fence),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

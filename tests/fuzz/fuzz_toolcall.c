/*
 * fuzz_toolcall: libFuzzer harness for the streaming text guards: guards/guard_utf8,
 * guard_toolcall (with guard_json_canonical) and guard_stop, each checked for split invariance.
 * Input layout:
 *   byte 0   bits 0-2: the largest chunk (1, 2, 3, 5, 8, 13, 64, 4096 bytes); bits 3-7: the
 *            parser's max_block_bytes (0: the default 64 KiB, else 16 * value);
 *   byte 1   the seed of the chunk sizes (xorshift; each chunk 1..largest bytes);
 *   byte 2   the number of stop strings (value % 5), then per stop one length byte L and
 *            1 + L % 24 bytes;
 *   the rest the model's output as raw bytes.
 * The raw bytes go through guard_utf8 fed whole and fed in chunks (then flushed): the two outputs
 * must be identical, valid (guard_utf8_valid), and equal to the input when the input was valid.
 * That text T goes to:
 *   - guard_toolcall fed whole and fed in chunks (same max_block_bytes), then finished: the event
 *     streams must be identical after merging adjacent CONTENT events and adjacent CALL_ARGS
 *     fragments of one call (the only split-dependent parts the header allows); so must n_ok and
 *     n_invalid. Every ok CALL_END has a name and canonical args (guard_json_canonical of them
 *     gives them back); every failed one an error and no name/args; a call's ARGS fragments follow
 *     its NAME; indices count up from 0. A third parser whose callback stops at the first event
 *     must answer that value and then -ECANCELED without callbacks;
 *   - guard_stop (when the stops are valid UTF-8) fed whole and in chunks, then flushed: the
 *     emitted text, matched flag and matched index must be identical; without a match the text is
 *     T, with one it is a prefix of T that the matched stop string follows;
 *   - guard_json_canonical of T: when it succeeds, canonicalising its output gives it again.
 * Anything else is abort().
 * Seeds (tests/fuzz/corpus/toolcall/): model outputs with one call, two calls with text between,
 * arguments before the name, string arguments, "</tool_call>" inside a string, an unclosed block,
 * a block over max_block_bytes, invalid JSON, a bad name, split multi-byte characters and invalid
 * UTF-8, stop strings that overlap ("abcd" / "bc").
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "guards/guard_stop.h"
#include "guards/guard_toolcall.h"
#include "guards/guard_utf8.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
die(const char *what, long v)
{
    fprintf(stderr, "fuzz_toolcall: %s (%ld)\n", what, v);
    abort();
}

/* ---- Growable byte string ---- */

struct str {
    char *p;
    size_t n, cap;
};

static void
str_add(struct str *s, const void *b, size_t n)
{
    if (s->n + n + 1 > s->cap) {
        size_t cap = (s->n + n + 1) * 2;
        char *p = realloc(s->p, cap);
        if (p == NULL)
            die("out of memory", 0);
        s->p = p;
        s->cap = cap;
    }
    if (n)
        memcpy(s->p + s->n, b, n);
    s->n += n;
    s->p[s->n] = '\0';
}

static bool
str_eq(const struct str *a, const struct str *b)
{
    return a->n == b->n && (a->n == 0 || memcmp(a->p, b->p, a->n) == 0);
}

/* ---- Chunking ---- */

struct chunker {
    uint32_t state;
    size_t largest;
};

static size_t
chunk_next(struct chunker *c)
{
    c->state ^= c->state << 13;
    c->state ^= c->state >> 17;
    c->state ^= c->state << 5;
    return 1 + c->state % c->largest;
}

/* ---- guard_utf8 ---- */

static void
utf8_run(const char *in, size_t n, struct chunker *ch, struct str *out)
{
    struct guard_utf8 u;
    char *o = NULL;
    size_t ol = 0;
    guard_utf8_init(&u);
    for (size_t pos = 0; pos < n;) {
        size_t k = ch ? chunk_next(ch) : n;
        if (k > n - pos)
            k = n - pos;
        if (guard_utf8_feed(&u, in + pos, k, &o, &ol) != 0)
            die("guard_utf8_feed failed", 0);
        str_add(out, o, ol);
        free(o);
        pos += k;
    }
    if (guard_utf8_flush(&u, &o, &ol) != 0)
        die("guard_utf8_flush failed", 0);
    str_add(out, o, ol);
    free(o);
}

/* ---- guard_toolcall ---- */

/* The event log: each event as 0xFF, type, index and its fields; bytes 0xFF never occur in valid
 * UTF-8, so the log is unambiguous. Adjacent CONTENT events, and adjacent ARGS of one call, are
 * merged. */
struct tc_log {
    struct str s;
    int last_type, last_index;
    int next_index; /* the index the next CALL_BEGIN must carry */
    int named;      /* the index of the last call that sent CALL_NAME, -1: none */
    int stop_at;    /* the callback returns 1 at this event number (-1: never) */
    int n_events;
};

static void
tc_check_end(const struct guard_toolcall_event *ev)
{
    if (ev->ok) {
        if (ev->name == NULL || ev->args == NULL || strlen(ev->args) != ev->args_len ||
            ev->error != NULL)
            die("an ok CALL_END without name/args", ev->index);
        char *c = NULL;
        if (guard_json_canonical(ev->args, ev->args_len, &c) != 0 || strcmp(c, ev->args) != 0)
            die("CALL_END args are not canonical", ev->index);
        free(c);
    } else if (ev->name != NULL || ev->args != NULL || ev->error == NULL) {
        die("a failed CALL_END with name/args or without error", ev->index);
    }
}

static int
tc_cb(void *ctx, const struct guard_toolcall_event *ev)
{
    struct tc_log *l = ctx;
    if (l->stop_at >= 0 && l->n_events++ == l->stop_at)
        return 1;
    bool merge = (ev->type == GUARD_TOOLCALL_CONTENT || ev->type == GUARD_TOOLCALL_CALL_ARGS) &&
                 (int)ev->type == l->last_type && ev->index == l->last_index;
    if ((ev->type == GUARD_TOOLCALL_CONTENT || ev->type == GUARD_TOOLCALL_CALL_ARGS) &&
        (ev->len == 0 || ev->text == NULL))
        die("an empty text event", ev->type);
    if (ev->type == GUARD_TOOLCALL_CONTENT && ev->index != -1)
        die("CONTENT with an index", ev->index);
    if (ev->type == GUARD_TOOLCALL_CALL_BEGIN && ev->index != l->next_index++)
        die("CALL_BEGIN index out of order", ev->index);
    if (ev->type != GUARD_TOOLCALL_CONTENT && ev->index != l->next_index - 1)
        die("an event of a call other than the open one", ev->index);
    if (ev->type == GUARD_TOOLCALL_CALL_NAME) {
        if (ev->name == NULL || strlen(ev->name) == 0 || l->named == ev->index)
            die("CALL_NAME without a name, or twice", ev->index);
        l->named = ev->index;
    }
    if (ev->type == GUARD_TOOLCALL_CALL_ARGS && l->named != ev->index)
        die("CALL_ARGS before CALL_NAME", ev->index);
    if (ev->type == GUARD_TOOLCALL_CALL_END)
        tc_check_end(ev);
    if (!merge) {
        char h[32];
        int n = snprintf(h, sizeof(h), "\xff%d:%d:", (int)ev->type, ev->index);
        str_add(&l->s, h, (size_t)n);
    }
    l->last_type = (int)ev->type;
    l->last_index = ev->index;
    if (ev->text)
        str_add(&l->s, ev->text, ev->len);
    if (ev->name) {
        str_add(&l->s,
                "\xff"
                "n",
                2);
        str_add(&l->s, ev->name, strlen(ev->name));
    }
    if (ev->type == GUARD_TOOLCALL_CALL_END) {
        str_add(&l->s,
                ev->ok ? "\xff"
                         "ok"
                       : "\xff"
                         "bad",
                ev->ok ? 3 : 4);
        if (ev->args)
            str_add(&l->s, ev->args, ev->args_len);
        if (ev->error)
            str_add(&l->s, ev->error, strlen(ev->error));
    }
    return 0;
}

static void
tc_run(const struct str *t, size_t max_block, struct chunker *ch, struct tc_log *l, int counts[2])
{
    struct guard_toolcall *p = NULL;
    l->last_type = -1;
    l->last_index = -2;
    l->named = -1;
    l->stop_at = -1;
    if (guard_toolcall_new(max_block, &p) != 0)
        die("guard_toolcall_new failed", 0);
    for (size_t pos = 0; pos < t->n;) {
        size_t k = ch ? chunk_next(ch) : t->n;
        if (k > t->n - pos)
            k = t->n - pos;
        /* chunks of valid UTF-8 may split a character: the parser must cope (any split) */
        if (guard_toolcall_feed(p, t->p + pos, k, tc_cb, l) != 0)
            die("guard_toolcall_feed failed", 0);
        pos += k;
    }
    if (guard_toolcall_finish(p, tc_cb, l) != 0)
        die("guard_toolcall_finish failed", 0);
    if (guard_toolcall_in_call(p))
        die("in a call after finish", 0);
    counts[0] = guard_toolcall_n_ok(p);
    counts[1] = guard_toolcall_n_invalid(p);
    guard_toolcall_free(p);
}

static int
tc_count_cb(void *ctx, const struct guard_toolcall_event *ev)
{
    (void)ev;
    (*(int *)ctx)++;
    return 7;
}

static void
tc_check_stop(const struct str *t)
{
    struct guard_toolcall *p = NULL;
    int n = 0;
    if (guard_toolcall_new(0, &p) != 0)
        die("guard_toolcall_new failed", 0);
    int rc = guard_toolcall_feed(p, t->p, t->n, tc_count_cb, &n);
    if (rc == 0)
        rc = guard_toolcall_finish(p, tc_count_cb, &n);
    if (rc != 7 || n != 1) {
        if (n != 0 || rc != 0)
            die("a stopping callback did not stop the parse", rc);
    } else if (guard_toolcall_feed(p, "x", 1, tc_count_cb, &n) != -ECANCELED ||
               guard_toolcall_finish(p, tc_count_cb, &n) != -ECANCELED || n != 1) {
        die("a stopped parser went on", n);
    }
    guard_toolcall_free(p);
}

static void
check_toolcall(const struct str *t, size_t max_block, struct chunker *ch)
{
    struct tc_log a, b;
    int ca[2], cb[2];
    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    tc_run(t, max_block, NULL, &a, ca);
    tc_run(t, max_block, ch, &b, cb);
    if (!str_eq(&a.s, &b.s) || ca[0] != cb[0] || ca[1] != cb[1]) {
        fprintf(stderr, "whole:   %.*s\nchunked: %.*s\n", (int)a.s.n, a.s.p, (int)b.s.n, b.s.p);
        die("guard_toolcall events depend on the split", 0);
    }
    free(a.s.p);
    free(b.s.p);
    tc_check_stop(t);

    char *c1 = NULL, *c2 = NULL;
    int rc = guard_json_canonical(t->p, t->n, &c1);
    if (rc == 0) {
        if (guard_json_canonical(c1, strlen(c1), &c2) != 0 || strcmp(c1, c2) != 0)
            die("guard_json_canonical is not idempotent", 0);
    } else if (rc != -EINVAL && rc != -ENOMEM) {
        die("guard_json_canonical: an unexpected error", rc);
    }
    free(c1);
    free(c2);
}

/* ---- guard_stop ---- */

static void
stop_run(const char *const *stops, int n_stops, const struct str *t, struct chunker *ch,
         struct str *out, int *idx)
{
    struct guard_stop *s = NULL;
    const char *e = NULL;
    size_t el = 0;
    bool matched = false, was = false;
    if (guard_stop_new(stops, n_stops, &s) != 0)
        die("guard_stop_new refused valid stops", n_stops);
    for (size_t pos = 0; pos < t->n;) {
        size_t k = ch ? chunk_next(ch) : t->n;
        if (k > t->n - pos)
            k = t->n - pos;
        if (guard_stop_feed(s, t->p + pos, k, &e, &el, &matched) != 0)
            die("guard_stop_feed failed", 0);
        if (was && el != 0)
            die("guard_stop emitted after a match", 0);
        was = matched;
        str_add(out, e, el);
        pos += k;
    }
    if (guard_stop_flush(s, &e, &el) != 0)
        die("guard_stop_flush failed", 0);
    if (was && el != 0)
        die("guard_stop flushed after a match", 0);
    str_add(out, e, el);
    *idx = guard_stop_matched_index(s);
    if (was && *idx < 0)
        die("matched without an index", 0);
    guard_stop_free(s);
}

static void
check_stop(const char *const *stops, int n_stops, const struct str *t, struct chunker *ch)
{
    for (int i = 0; i < n_stops; i++)
        if (!guard_utf8_valid(stops[i], strlen(stops[i])))
            return; /* guard_stop wants valid UTF-8 stops (the request validator ensures it) */
    struct str a = {0}, b = {0};
    int ia = -1, ib = -1;
    stop_run(stops, n_stops, t, NULL, &a, &ia);
    stop_run(stops, n_stops, t, ch, &b, &ib);
    if (!str_eq(&a, &b) || ia != ib)
        die("guard_stop depends on the split", ia);
    if (a.n > t->n || (a.n && memcmp(a.p, t->p, a.n) != 0))
        die("guard_stop output is not a prefix of its input", 0);
    if (ia < 0 && a.n != t->n)
        die("guard_stop lost text without a match", 0);
    if (ia >= 0) {
        if (ia >= n_stops)
            die("matched index out of range", ia);
        size_t sl = strlen(stops[ia]);
        if (t->n - a.n < sl || memcmp(t->p + a.n, stops[ia], sl) != 0)
            die("the matched stop string does not follow the output", ia);
    }
    free(a.p);
    free(b.p);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t largest[8] = {1, 2, 3, 5, 8, 13, 64, 4096};
    if (size < 3)
        return 0;
    size_t max_block = 16u * (data[0] >> 3);
    uint32_t seed = 0x9e3779b9u ^ data[1];
    int n_stops = data[2] % 5;
    size_t pos = 3;
    char stop_buf[GUARD_STOP_MAX_STOPS][25];
    const char *stops[GUARD_STOP_MAX_STOPS];
    for (int i = 0; i < n_stops; i++) {
        if (pos >= size)
            return 0;
        size_t l = 1 + data[pos++] % 24;
        if (size - pos < l)
            return 0;
        memcpy(stop_buf[i], data + pos, l);
        stop_buf[i][l] = '\0';
        if (strlen(stop_buf[i]) != l)
            return 0; /* a NUL inside: not a C string stop */
        stops[i] = stop_buf[i];
        pos += l;
    }
    const char *raw = (const char *)data + pos;
    size_t n = size - pos;

    struct chunker ch = {.state = seed, .largest = largest[data[0] & 7]};
    struct str t = {0}, t2 = {0};
    utf8_run(raw, n, NULL, &t);
    utf8_run(raw, n, &ch, &t2);
    if (!str_eq(&t, &t2))
        die("guard_utf8 depends on the split", 0);
    if (!guard_utf8_valid(t.p ? t.p : "", t.n))
        die("guard_utf8 output is not valid", 0);
    if (guard_utf8_valid(raw, n) && (t.n != n || (n && memcmp(t.p, raw, n) != 0)))
        die("guard_utf8 changed valid text", 0);
    free(t2.p);
    if (t.p == NULL)
        str_add(&t, "", 0);

    ch.state = seed;
    check_toolcall(&t, max_block, &ch);
    ch.state = seed;
    check_stop(stops, n_stops, &t, &ch);
    free(t.p);
    return 0;
}

/*
 * guard_stop: the pending text lives in buf[off..len). Each feed compacts it to the front, appends
 * the new text and decides how much of it can go out. Matches are found with memmem (complete
 * occurrences) and by comparing the tail against each stop's prefixes (occurrences that the next
 * bytes may still complete); both are bounded by the stop lengths, so a feed costs
 * O(n_stops * (pending + max_len^2)) in the worst case and typically one memchr per stop.
 */
#include "guards/guard_stop.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "guards/guard_utf8.h"

struct guard_stop {
    int n_stops;
    char *stops[GUARD_STOP_MAX_STOPS];
    size_t stop_len[GUARD_STOP_MAX_STOPS];
    char *buf;  /* (cap) pending text is buf[off..len) */
    size_t len; /* bytes in buf */
    size_t cap;
    size_t off;    /* start of the pending text; buf[0..off) was emitted by the last call */
    int match_idx; /* -1 until matched */
};

int
guard_stop_new(const char *const *stops, int n_stops, struct guard_stop **out)
{
    struct guard_stop *s = NULL;
    int rc = -EINVAL;

    if (n_stops < 0 || n_stops > GUARD_STOP_MAX_STOPS || (n_stops > 0 && !stops) || !out)
        goto out;
    for (int i = 0; i < n_stops; i++) {
        size_t n = stops[i] ? strnlen(stops[i], GUARD_STOP_MAX_LEN + 1) : 0;
        if (n == 0 || n > GUARD_STOP_MAX_LEN || !guard_utf8_valid(stops[i], n))
            goto out;
    }
    rc = -ENOMEM;
    s = calloc(1, sizeof(*s));
    if (!s)
        goto out;
    s->match_idx = -1;
    for (int i = 0; i < n_stops; i++) {
        s->stop_len[i] = strlen(stops[i]);
        s->stops[i] = malloc(s->stop_len[i]);
        if (!s->stops[i])
            goto out;
        memcpy(s->stops[i], stops[i], s->stop_len[i]);
        s->n_stops = i + 1;
    }
    *out = s;
    s = NULL;
    rc = 0;
out:
    guard_stop_free(s);
    return rc;
}

void
guard_stop_free(struct guard_stop *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n_stops; i++)
        free(s->stops[i]);
    free(s->buf);
    free(s);
}

/* Earliest start in p[0..n) of a proper prefix of stop j that runs to the end of p (an
 * occurrence the next bytes may complete), or n when there is none. */
static size_t
partial_start(const struct guard_stop *s, int j, const char *p, size_t n)
{
    size_t l = s->stop_len[j];
    size_t i = n >= l ? n - l + 1 : 0;

    for (; i < n; i++) {
        const char *c = memchr(p + i, s->stops[j][0], n - i);
        if (!c)
            break;
        i = (size_t)(c - p);
        if (memcmp(p + i, s->stops[j], n - i) == 0)
            return i;
    }
    return n;
}

/* Decides on pending text p[0..n). Returns how many bytes may be emitted; sets *idx to the stop
 * that matched right after them, or -1. With final set, occurrences that could still be completed
 * no longer hold anything back (end of stream). */
static size_t
decide(const struct guard_stop *s, const char *p, size_t n, bool final, int *idx)
{
    size_t best = n, best_len = 0, hold = n;

    *idx = -1;
    if (n == 0)
        return 0;
    for (int j = 0; j < s->n_stops; j++) {
        const char *m = memmem(p, n, s->stops[j], s->stop_len[j]);
        size_t at = m ? (size_t)(m - p) : n;
        if (m && (at < best || (at == best && s->stop_len[j] < best_len))) {
            best = at;
            best_len = s->stop_len[j];
            *idx = j;
        }
        if (!final) {
            size_t q = partial_start(s, j, p, n);
            if (q < hold)
                hold = q;
        }
    }
    /* a stop that may still complete at an earlier start would win over the match found */
    if (hold < best) {
        *idx = -1;
        return hold;
    }
    return best;
}

int
guard_stop_feed(struct guard_stop *s, const char *text, size_t n, const char **emit,
                size_t *emit_len, bool *matched)
{
    size_t pending, e;
    int idx;

    *emit = NULL;
    *emit_len = 0;
    *matched = s->match_idx >= 0;
    if (s->match_idx >= 0)
        return 0;
    pending = s->len - s->off;
    if (pending && s->off)
        memmove(s->buf, s->buf + s->off, pending);
    s->len = pending;
    s->off = 0;
    if (n > s->cap - s->len) {
        size_t cap = s->len + n;
        char *b = NULL;
        if (cap < 2 * s->cap)
            cap = 2 * s->cap;
        b = realloc(s->buf, cap ? cap : 1);
        if (!b)
            return -ENOMEM;
        s->buf = b;
        s->cap = cap;
    }
    if (n)
        memcpy(s->buf + s->len, text, n);
    s->len += n;
    e = decide(s, s->buf, s->len, false, &idx);
    *emit = s->buf;
    *emit_len = e;
    s->off = e;
    if (idx >= 0) {
        s->match_idx = idx;
        s->off = s->len;
        *matched = true;
    }
    return 0;
}

int
guard_stop_flush(struct guard_stop *s, const char **emit, size_t *emit_len)
{
    size_t n = s->len - s->off;
    int idx;

    *emit = NULL;
    *emit_len = 0;
    if (s->match_idx >= 0 || n == 0)
        return 0; /* s->buf may still be NULL: no pointer arithmetic on it before this */
    const char *p = s->buf + s->off;
    *emit = p;
    *emit_len = decide(s, p, n, true, &idx);
    s->off = s->len;
    if (idx >= 0)
        s->match_idx = idx;
    return 0;
}

int
guard_stop_matched_index(const struct guard_stop *s)
{
    return s->match_idx;
}

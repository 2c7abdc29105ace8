/*
 * guard_watch: the content guards, line_repeat and sentence_loop, over the assistant's visible
 * text. Everything is decided byte by byte (a check happens at a byte, never at a feed
 * boundary), which is what makes the verdict independent of how the text is split. Buffers are
 * fixed and allocated once. See guard.h for the rules.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "guards/guard_int.h"

#define WIN_CAP (2 * GUARD_LINE_WINDOW_BYTES) /* slid back to the window when full */
#define LINE_RING 512 /* > window / (GUARD_LINE_MIN_CHARS + 1): every countable line fits */
#define MAX_BIGRAMS (GUARD_SENTENCE_MAX_BYTES / 2)

/* A completed countable line: its normalised hash and where it started in the stream. */
struct line_rec {
    uint64_t hash;
    uint64_t start;
};

/* One sentence of the ring: its sorted, distinct bigram hashes. */
struct sentence_rec {
    uint64_t bigram[MAX_BIGRAMS];
    int n;
};

enum head_state {
    HEAD_LEAD,    /* only white space so far on this line */
    HEAD_FENCE,   /* white space, then 1..2 fence characters */
    HEAD_TEXT,    /* not a fence line */
    HEAD_FENCE_LN /* a fence line (```, ~~~); the rest of the line is its info string */
};

struct guard_watch {
    int line_n;   /* line_repeat count; 0 off */
    double sim;   /* sentence_loop similarity; 0 off */
    bool prev_ws; /* the previous byte was white space (true at the start) */

    /* the lower-cased window (line_repeat) */
    char win[WIN_CAP];
    size_t win_len;
    uint64_t win_pos; /* bytes that entered the window so far */

    /* the current line */
    enum head_state head;
    char fence_ch;      /* the fence character of this line's head */
    int fence_n;        /* how many of them */
    bool in_fence;      /* inside fenced code */
    char open_fence_ch; /* the character of the fence that opened it */
    struct guard_hasher line_h;
    int line_chars;     /* trimmed raw length so far, in characters */
    int line_ws_run;    /* white-space characters pending after the last non-white-space one */
    bool line_has_word; /* a letter, a digit or a non-ASCII character */
    uint64_t line_start;

    /* completed countable lines, newest at (lines_head - 1) */
    struct line_rec lines[LINE_RING];
    int lines_head, lines_n;

    /* the pending sentence */
    char sent[GUARD_SENTENCE_MAX_BYTES];
    size_t sent_len;
    size_t sent_line_start; /* sent_len when the current line began */
    bool sent_punct;        /* the last byte kept was . ! ? : */

    struct sentence_rec ring[GUARD_SENTENCE_RING];
    int ring_head, ring_n;
    struct sentence_rec cur;
};

int
guard_watch_new(int line_n, double sim, struct guard_watch **out)
{
    struct guard_watch *w = calloc(1, sizeof(*w));
    if (!w)
        return -ENOMEM;
    w->line_n = line_n;
    w->sim = sim;
    w->prev_ws = true;
    w->head = HEAD_LEAD;
    guard_hasher_init(&w->line_h);
    *out = w;
    return 0;
}

void
guard_watch_free(struct guard_watch *w)
{
    free(w);
}

static bool
is_ws(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static unsigned char
lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static bool
is_word_byte(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c >= 0x80;
}

/* ---- line_repeat: the phrase rule ---- */

/* At the end of a word: the last GUARD_PHRASE_BYTES bytes of the window (back to a character
 * boundary), when they hold a word character, counted without overlap in the window. */
static bool
phrase_repeats(const struct guard_watch *w)
{
    if (w->win_len < GUARD_PHRASE_BYTES)
        return false;
    size_t wstart = w->win_len > GUARD_LINE_WINDOW_BYTES ? w->win_len - GUARD_LINE_WINDOW_BYTES : 0;
    size_t nb = w->win_len - GUARD_PHRASE_BYTES;
    while (nb > wstart && ((unsigned char)w->win[nb] & 0xC0) == 0x80)
        nb--;
    const char *needle = w->win + nb;
    size_t nlen = w->win_len - nb;
    bool word = false;
    for (size_t i = 0; i < nlen && !word; i++)
        word = is_word_byte((unsigned char)needle[i]);
    if (!word)
        return false;
    int count = 0;
    const char *p = w->win + wstart, *end = w->win + w->win_len;
    while (p + nlen <= end) {
        const char *hit = memmem(p, (size_t)(end - p), needle, nlen);
        if (!hit)
            break;
        if (++count >= w->line_n)
            return true;
        p = hit + nlen;
    }
    return false;
}

static void
window_push(struct guard_watch *w, unsigned char c)
{
    if (w->win_len == WIN_CAP) {
        memmove(w->win, w->win + WIN_CAP - GUARD_LINE_WINDOW_BYTES, GUARD_LINE_WINDOW_BYTES);
        w->win_len = GUARD_LINE_WINDOW_BYTES;
    }
    w->win[w->win_len++] = (char)lower(c);
    w->win_pos++;
}

/* ---- line_repeat: the line rule ---- */

static void
line_byte(struct guard_watch *w, unsigned char c)
{
    if (is_ws(c)) {
        if (w->line_chars > 0)
            w->line_ws_run++;
        return;
    }
    if (w->line_chars > 0 && w->line_ws_run > 0) {
        guard_hasher_add(&w->line_h, " ", 1);
        w->line_chars += w->line_ws_run;
    }
    w->line_ws_run = 0;
    unsigned char l = lower(c);
    guard_hasher_add(&w->line_h, &l, 1);
    if ((c & 0xC0) != 0x80)
        w->line_chars++;
    if (is_word_byte(c))
        w->line_has_word = true;
}

/* At the newline ending a line: whether it is the line_n-th of its kind in the window. */
static bool
line_end(struct guard_watch *w)
{
    if (w->in_fence || w->head == HEAD_FENCE_LN || w->line_chars < GUARD_LINE_MIN_CHARS ||
        !w->line_has_word)
        return false;
    uint64_t h = guard_hasher_done(&w->line_h).a;
    uint64_t wstart =
        w->win_pos > GUARD_LINE_WINDOW_BYTES ? w->win_pos - GUARD_LINE_WINDOW_BYTES : 0;
    int count = 1;
    bool trip = false;
    if (w->line_start >= wstart) {
        for (int i = 0; i < w->lines_n; i++) {
            const struct line_rec *r = &w->lines[(w->lines_head - 1 - i + LINE_RING) % LINE_RING];
            if (r->start < wstart)
                break;
            count += r->hash == h;
        }
        trip = count >= w->line_n;
    }
    w->lines[w->lines_head] = (struct line_rec){h, w->line_start};
    w->lines_head = (w->lines_head + 1) % LINE_RING;
    if (w->lines_n < LINE_RING)
        w->lines_n++;
    return trip;
}

/* ---- sentence_loop ---- */

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Normalises sent[0..len) into cur's bigram set. Returns false when the sentence is too short to
 * be compared. */
static bool
sentence_bigrams(const char *s, size_t len, struct sentence_rec *cur)
{
    int chars = 0, words = 0;
    uint64_t prev = 0;
    size_t i = 0;
    cur->n = 0;
    while (i < len) {
        while (i < len && !is_word_byte((unsigned char)s[i]))
            i++;
        if (i == len)
            break;
        struct guard_hasher h;
        guard_hasher_init(&h);
        for (; i < len && is_word_byte((unsigned char)s[i]); i++) {
            unsigned char l = lower((unsigned char)s[i]);
            guard_hasher_add(&h, &l, 1);
            if (((unsigned char)s[i] & 0xC0) != 0x80)
                chars++;
        }
        uint64_t wh = guard_hasher_done(&h).a;
        if (words > 0) {
            chars++; /* the space between words */
            if (cur->n < MAX_BIGRAMS) {
                struct guard_hasher bh;
                guard_hasher_init(&bh);
                guard_hasher_add(&bh, &prev, sizeof(prev));
                guard_hasher_add(&bh, &wh, sizeof(wh));
                cur->bigram[cur->n++] = guard_hasher_done(&bh).a;
            }
        }
        prev = wh;
        words++;
    }
    if (chars < GUARD_SENTENCE_MIN_CHARS || words < GUARD_SENTENCE_MIN_WORDS)
        return false;
    qsort(cur->bigram, (size_t)cur->n, sizeof(uint64_t), cmp_u64);
    int k = 0;
    for (int j = 0; j < cur->n; j++)
        if (k == 0 || cur->bigram[k - 1] != cur->bigram[j])
            cur->bigram[k++] = cur->bigram[j];
    cur->n = k;
    return true;
}

static double
jaccard(const struct sentence_rec *x, const struct sentence_rec *y)
{
    int i = 0, j = 0, inter = 0;
    while (i < x->n && j < y->n) {
        if (x->bigram[i] == y->bigram[j]) {
            inter++;
            i++;
            j++;
        } else if (x->bigram[i] < y->bigram[j]) {
            i++;
        } else {
            j++;
        }
    }
    int uni = x->n + y->n - inter;
    return uni > 0 ? (double)inter / uni : 0;
}

/* Ends the pending sentence: compares it with the ring, then adds it. */
static bool
sentence_cut(struct guard_watch *w)
{
    size_t len = w->sent_len;
    w->sent_len = 0;
    w->sent_line_start = 0;
    w->sent_punct = false;
    if (len == 0 || !sentence_bigrams(w->sent, len, &w->cur))
        return false;
    int hits = 0;
    for (int i = 0; i < w->ring_n; i++)
        hits += jaccard(&w->cur, &w->ring[i]) >= w->sim - 1e-9;
    w->ring[w->ring_head] = w->cur;
    w->ring_head = (w->ring_head + 1) % GUARD_SENTENCE_RING;
    if (w->ring_n < GUARD_SENTENCE_RING)
        w->ring_n++;
    return hits >= GUARD_SENTENCE_MIN_HITS;
}

static bool
sentence_byte(struct guard_watch *w, unsigned char c)
{
    if (w->sent_punct && is_ws(c))
        return sentence_cut(w);
    if (w->sent_len == 0 && is_ws(c))
        return false; /* white space between sentences */
    w->sent[w->sent_len++] = (char)c;
    w->sent_punct = c == '.' || c == '!' || c == '?' || c == ':';
    if (w->sent_len == GUARD_SENTENCE_MAX_BYTES)
        return sentence_cut(w);
    return false;
}

/* ---- Line structure: fences, blank lines ---- */

/* Advances the fence detection of the line's head with byte c. Returns true when c completes a
 * fence marker (the third ` or ~). */
static bool
head_byte(struct guard_watch *w, unsigned char c)
{
    switch (w->head) {
    case HEAD_LEAD:
        if (c == '`' || c == '~') {
            w->head = HEAD_FENCE;
            w->fence_ch = (char)c;
            w->fence_n = 1;
        } else if (!is_ws(c)) {
            w->head = HEAD_TEXT;
        }
        return false;
    case HEAD_FENCE:
        if (c == (unsigned char)w->fence_ch && ++w->fence_n == 3) {
            w->head = HEAD_FENCE_LN;
            return true;
        }
        if (c != (unsigned char)w->fence_ch)
            w->head = HEAD_TEXT;
        return false;
    default:
        return false;
    }
}

static void
line_reset(struct guard_watch *w)
{
    w->head = HEAD_LEAD;
    w->fence_n = 0;
    guard_hasher_init(&w->line_h);
    w->line_chars = 0;
    w->line_ws_run = 0;
    w->line_has_word = false;
    w->line_start = w->win_pos;
    w->sent_line_start = w->sent_len;
}

/* One byte of content. Fenced code (the fence lines and what lies between them) is skipped by
 * both guards: repeated lines are normal in code. */
static enum guard_id
watch_byte(struct guard_watch *w, unsigned char c)
{
    bool ws = is_ws(c);
    bool code = w->in_fence || w->head == HEAD_FENCE_LN; /* before this byte */
    if (w->line_n && !code) {
        if (ws && !w->prev_ws && phrase_repeats(w))
            return GUARD_LINE_REPEAT;
        window_push(w, c);
    }
    w->prev_ws = ws;

    bool blank = w->head == HEAD_LEAD; /* before this byte */
    if (c == '\n') {
        bool trip = w->line_n && line_end(w);
        if (w->sim > 0 && !code) {
            if (blank ? sentence_cut(w) : sentence_byte(w, c))
                return GUARD_SENTENCE_LOOP;
        }
        line_reset(w);
        return trip ? GUARD_LINE_REPEAT : GUARD_NONE;
    }
    if (w->line_n)
        line_byte(w, c);
    if (head_byte(w, c)) {
        if (w->in_fence && w->fence_ch != w->open_fence_ch) {
            w->head = HEAD_TEXT; /* ~~~ inside ``` (or the reverse) is code, not the closer */
            return GUARD_NONE;
        }
        w->in_fence = !w->in_fence;
        w->open_fence_ch = w->fence_ch;
        if (w->in_fence) {
            /* the fence's own characters are not part of the sentence */
            if (w->sent_len > w->sent_line_start)
                w->sent_len = w->sent_line_start;
            w->sent_punct = false;
        } else if (w->sim > 0 && sentence_cut(w)) {
            return GUARD_SENTENCE_LOOP;
        }
        return GUARD_NONE;
    }
    if (w->sim > 0 && !code && sentence_byte(w, c))
        return GUARD_SENTENCE_LOOP;
    return GUARD_NONE;
}

enum guard_id
guard_watch_feed(struct guard_watch *w, const char *text, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        enum guard_id t = watch_byte(w, (unsigned char)text[i]);
        if (t != GUARD_NONE)
            return t;
    }
    return GUARD_NONE;
}

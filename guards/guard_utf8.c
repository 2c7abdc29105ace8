/*
 * guard_utf8: the decoder follows the WHATWG UTF-8 decoder: after a lead byte the allowed range of
 * the next byte is narrowed (E0 -> A0..BF, ED -> 80..9F, F0 -> 90..BF, F4 -> 80..8F), which
 * rejects overlongs, surrogates and code points above U+10FFFF at the first byte that makes them
 * so; the byte that breaks a sequence is then decoded afresh. This gives one U+FFFD per maximal
 * subpart, independent of how the input is split.
 */
#include "guards/guard_utf8.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const unsigned char replacement[3] = {0xEF, 0xBF, 0xBD};

struct dec {
    int need;            /* continuation bytes the current sequence needs in all */
    int seen;            /* continuation bytes seen so far */
    unsigned char lower; /* allowed range of the next continuation byte */
    unsigned char upper;
    unsigned char seq[4]; /* the sequence so far, lead byte first */
};

/* Output sink: NULL buf counts only whether anything was replaced (for guard_utf8_valid). */
struct sink {
    unsigned char *buf;
    size_t len;
    bool replaced;
};

static void
sink_put(struct sink *k, const unsigned char *p, size_t n)
{
    if (k->buf)
        memcpy(k->buf + k->len, p, n);
    k->len += n;
}

static void
sink_bad(struct sink *k)
{
    sink_put(k, replacement, 3);
    k->replaced = true;
}

/* Starts a sequence at byte c (need == 0). */
static void
dec_lead(struct dec *d, unsigned char c, struct sink *k)
{
    d->need = 0;
    d->lower = 0x80;
    d->upper = 0xBF;
    d->seen = 0;
    d->seq[0] = c;
    if (c == 0) {
        sink_bad(k);
    } else if (c < 0x80) {
        sink_put(k, &c, 1);
    } else if (c >= 0xC2 && c <= 0xDF) {
        d->need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
        if (c == 0xE0)
            d->lower = 0xA0;
        else if (c == 0xED)
            d->upper = 0x9F;
        d->need = 2;
    } else if (c >= 0xF0 && c <= 0xF4) {
        if (c == 0xF0)
            d->lower = 0x90;
        else if (c == 0xF4)
            d->upper = 0x8F;
        d->need = 3;
    } else {
        sink_bad(k); /* 80..C1 (stray continuation, overlong lead), F5..FF */
    }
}

static void
dec_byte(struct dec *d, unsigned char c, struct sink *k)
{
    if (d->need == 0) {
        dec_lead(d, c, k);
        return;
    }
    if (c < d->lower || c > d->upper) {
        d->need = 0;
        sink_bad(k);
        dec_lead(d, c, k);
        return;
    }
    d->lower = 0x80;
    d->upper = 0xBF;
    d->seq[++d->seen] = c;
    if (d->seen == d->need) {
        sink_put(k, d->seq, (size_t)d->need + 1);
        d->need = 0;
    }
}

void
guard_utf8_init(struct guard_utf8 *u)
{
    memset(u, 0, sizeof(*u));
}

int
guard_utf8_feed(struct guard_utf8 *u, const char *in, size_t n, char **out, size_t *out_len)
{
    struct dec d = {0};
    struct sink k = {0};
    size_t total;
    int i;

    if (n > (SIZE_MAX - 16) / 3)
        return -ENOMEM;
    total = (size_t)u->n_pend + n;
    k.buf = malloc(total * 3 + 1);
    if (!k.buf)
        return -ENOMEM;
    for (i = 0; i < u->n_pend; i++)
        dec_byte(&d, u->pend[i], &k);
    for (size_t j = 0; j < n; j++)
        dec_byte(&d, (unsigned char)in[j], &k);
    /* what is left is a valid incomplete prefix: lead byte plus seen continuation bytes */
    u->n_pend = d.need ? d.seen + 1 : 0;
    if (u->n_pend)
        memcpy(u->pend, d.seq, (size_t)u->n_pend);
    k.buf[k.len] = 0;
    *out = (char *)k.buf;
    *out_len = k.len;
    return 0;
}

int
guard_utf8_flush(struct guard_utf8 *u, char **out, size_t *out_len)
{
    char *buf = malloc(4);

    if (!buf)
        return -ENOMEM;
    *out_len = 0;
    if (u->n_pend) {
        memcpy(buf, replacement, 3);
        *out_len = 3;
    }
    buf[*out_len] = 0;
    u->n_pend = 0;
    *out = buf;
    return 0;
}

bool
guard_utf8_valid(const char *s, size_t n)
{
    struct dec d = {0};
    struct sink k = {0};

    for (size_t i = 0; i < n && !k.replaced; i++)
        dec_byte(&d, (unsigned char)s[i], &k);
    return !k.replaced && d.need == 0;
}

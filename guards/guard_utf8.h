/*
 * guard_utf8: turns the byte strings of generated tokens into valid UTF-8 text. A token may end in
 * the middle of a multi-byte character (byte-fallback tokens, merges across a character); the
 * bytes of an incomplete trailing sequence are kept in the caller-owned struct guard_utf8 until the
 * next feed completes them. Pure functions, no I/O, no allocation other than the output buffers.
 *
 * Output is always well-formed UTF-8 without NUL bytes:
 *   - every maximal ill-formed subsequence becomes one U+FFFD (EF BF BD), the "maximal subpart"
 *     practice of Unicode 15 section 3.9 / WHATWG: a stray continuation byte, a byte never used in
 *     UTF-8 (C0, C1, F5..FF), an overlong form, a surrogate (ED A0..BF), a code point above
 *     U+10FFFF, a lead byte followed by too few continuation bytes;
 *   - a NUL byte becomes U+FFFD as well: downstream code (C strings, json-c's string setters,
 *     log lines) would cut the text there. guard_utf8_valid() rejects NUL for the same reason.
 * The result does not depend on how the input is split across calls: feeding a byte string in any
 * pieces followed by guard_utf8_flush() gives the same concatenated output as feeding it whole.
 *
 * Thread context: a struct guard_utf8 belongs to one thread; the functions are reentrant.
 */
#ifndef GUARD_UTF8_H
#define GUARD_UTF8_H

#include <stdbool.h>
#include <stddef.h>

/* Caller-owned decoder state: the pending bytes of an incomplete trailing sequence (0..3 bytes,
 * always a valid prefix of some character). */
struct guard_utf8 {
    unsigned char pend[4];
    int n_pend;
};

void guard_utf8_init(struct guard_utf8 *u);

/* Appends in[0..n) to the stream. On success *out is a fresh malloc'ed, NUL-terminated buffer
 * (caller frees with free()) holding the complete, valid text now available (possibly empty:
 * *out_len == 0, the buffer still allocated), and an incomplete trailing sequence stays pending.
 * in may be NULL when n == 0. Returns 0, or -ENOMEM (state unchanged, *out not written). */
int guard_utf8_feed(struct guard_utf8 *u, const char *in, size_t n, char **out, size_t *out_len);

/* End of stream: a pending incomplete sequence becomes one U+FFFD. *out as for feed (caller frees);
 * the state is reset to empty. Returns 0 or -ENOMEM (state unchanged). */
int guard_utf8_flush(struct guard_utf8 *u, char **out, size_t *out_len);

/* Whether s[0..n) is well-formed UTF-8 without NUL bytes, i.e. exactly the strings that
 * feed + flush pass through unchanged. */
bool guard_utf8_valid(const char *s, size_t n);

#endif

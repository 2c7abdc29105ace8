/*
 * guard_stop: the client's `stop` strings over a stream of generated text, with hold-back. Text is
 * fed as it is produced; the module returns the part that can be sent to the client now, holding
 * back a tail that may still turn out to be the start of a stop string. On a match the text before
 * the match is returned, the stop string itself and anything after it never are, and the guard
 * stays matched: later feeds and the flush return nothing.
 *
 * Which match: the one that starts earliest in the whole stream; among matches starting at the
 * same byte, the shortest stop string; among equal strings, the lowest index. A match is decided
 * only once no other stop string could still match starting earlier, so the output, the matched
 * flag and the matched index do not depend on how the text is split into feeds (e.g. stops "abcd"
 * and "bc" over "abcd": "bc" is complete after "abc", but "abcd" may still start earlier, so the
 * module waits for the next byte; "abcd" wins with nothing emitted, "abcx" ends at "bc" with "a"
 * emitted). Matches may span any number of feeds. The held-back tail is shorter than the longest
 * stop string (at most 255 bytes).
 *
 * Input must be valid UTF-8 (guard_utf8's output); stop strings must be valid UTF-8 too, so a
 * match and the hold-back boundary always fall on character boundaries and the emitted pieces are
 * valid UTF-8 on their own.
 *
 * Ownership: the emitted text is returned as (pointer, length) into the guard's internal buffer,
 * valid until the next call on the same guard or guard_stop_free(); it is not NUL-terminated.
 * Thread context: one guard belongs to one thread (one response).
 */
#ifndef GUARD_STOP_H
#define GUARD_STOP_H

#include <stdbool.h>
#include <stddef.h>

#define GUARD_STOP_MAX_STOPS 4
#define GUARD_STOP_MAX_LEN 256

struct guard_stop;

/* Creates a guard for stops[0..n_stops), each a NUL-terminated valid UTF-8 string of 1..256 bytes
 * (copied; the caller keeps its strings). n_stops 0..4 (0 gives a guard that passes everything
 * through; stops may be NULL then). Returns 0 and *out, -EINVAL for bad arguments, -ENOMEM. */
int guard_stop_new(const char *const *stops, int n_stops, struct guard_stop **out);

/* NULL is a no-op. */
void guard_stop_free(struct guard_stop *s);

/* Appends text[0..n) (text may be NULL when n == 0). On success *emit, *emit_len are the text that
 * may be sent now (possibly empty; see Ownership) and *matched is whether a stop string has matched
 * (this feed or earlier). Returns 0 or -ENOMEM (nothing emitted, the feed is not consumed; the
 * caller should end the response). */
int guard_stop_feed(struct guard_stop *s, const char *text, size_t n, const char **emit,
                    size_t *emit_len, bool *matched);

/* End of generation: releases the held-back tail in *emit, *emit_len (nothing when already
 * matched). The tail can still hold a complete stop string that was waiting for a longer one that
 * could have started earlier (stops "abcd" and "bc", stream "abc"): then only the text before it
 * is returned and the guard becomes matched; check guard_stop_matched_index() after the flush.
 * Further feeds after a flush are treated as a new continuation of the same stream. Returns 0. */
int guard_stop_flush(struct guard_stop *s, const char **emit, size_t *emit_len);

/* Index into the stops given to guard_stop_new of the stop string that matched, or -1. */
int guard_stop_matched_index(const struct guard_stop *s);

#endif

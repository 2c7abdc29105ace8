/*
 * fcgi_engine: the worker's client of llm-engine. One shared struct fcgi_engine per process
 * (socket path, the latest MODEL_INFO, the reconnect backoff; thread-safe behind one mutex that
 * is never held across I/O) and one struct fcgi_engine_conn per request: a Unix-socket connection
 * that has done HELLO -> MODEL_INFO, used by the one thread serving that request, then closed.
 * Closing a connection is a cancel for its sequence (the engine's contract, cm_wire.h).
 *
 * Backoff: when a connect fails (no socket, refused, a connection closed or a bad answer
 * instead of MODEL_INFO), the engine is marked down; for the next backoff interval (100 ms doubling
 * to 1 s) connects fail at once with -EHOSTDOWN without touching the socket, so a dead engine costs
 * the workers nothing; the first connect after the interval tries again, and a success resets the
 * backoff. Callers answer -EHOSTDOWN with 503 and Retry-After: fcgi_engine_retry_after_s().
 * A connected engine that does not answer HELLO within 12x the connect timeout (60 s by default:
 * the engine answers between forward passes, and a long prefill or a sanitizer build is slow) is
 * busy, not down: that connect fails with -EHOSTDOWN but starts no backoff for the others.
 * An engine that restarts with another model is noticed at the next connect (MODEL_INFO is
 * re-read on every connection).
 */
#ifndef FCGI_ENGINE_H
#define FCGI_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "common/cm_wire.h"

struct fcgi_engine;
struct fcgi_engine_conn;

/* socket_path is copied. connect_timeout_ms bounds connect + HELLO/MODEL_INFO and STATS round
 * trips (0: 5000). Connects nothing yet. Returns 0 or -ENOMEM / -EINVAL (path too long for
 * sun_path). */
int fcgi_engine_new(const char *socket_path, int connect_timeout_ms, struct fcgi_engine **out);
void fcgi_engine_free(struct fcgi_engine *e);

/* A copy of the MODEL_INFO of the latest successful connection (caller releases it with
 * cm_wire_model_info_fini). Returns 0, -EAGAIN (never connected yet) or -ENOMEM. */
int fcgi_engine_model_info(struct fcgi_engine *e, struct cm_wire_model_info *out);

/* Whether the latest connect attempt succeeded, and the seconds until the next attempt is
 * allowed (>= 1, for Retry-After). */
bool fcgi_engine_is_up(struct fcgi_engine *e);
int fcgi_engine_retry_after_s(struct fcgi_engine *e);

/* Opens a connection: connect, HELLO, MODEL_INFO (also updates the shared copy). The socket is
 * non-blocking afterwards. Returns 0, -EHOSTDOWN (engine unreachable now or still in backoff),
 * -EPROTO (the engine answered something else; the connection is dropped) or -ENOMEM. */
int fcgi_engine_connect(struct fcgi_engine *e, struct fcgi_engine_conn **out);
/* Closes the socket (a cancel if a sequence is running) and frees. NULL is a no-op. */
void fcgi_engine_conn_close(struct fcgi_engine_conn *c);

/* The socket, for poll(POLLIN), and the MODEL_INFO this connection received (borrowed, valid
 * until close). */
int fcgi_engine_conn_fd(const struct fcgi_engine_conn *c);
const struct cm_wire_model_info *fcgi_engine_conn_info(const struct fcgi_engine_conn *c);

/* Sends SUBMIT(req_id) or CANCEL(reason). Writes the whole frame, waiting for the socket to be
 * writable at most the connect timeout. Return 0, -EINVAL / -EMSGSIZE (the message, from the
 * encoder), -EPIPE / -ECONNRESET (engine gone) or -ETIMEDOUT. */
int fcgi_engine_submit(struct fcgi_engine_conn *c, uint64_t req_id, const struct cm_wire_submit *s);
int fcgi_engine_cancel(struct fcgi_engine_conn *c, uint64_t req_id, const char *reason);

/* Non-blocking: reads what the socket has and cuts the next frame. Returns 1 with *out filled
 * (payload borrowed until the next call on c), 0 when no whole frame is available yet (poll the
 * fd again), -ECONNRESET when the engine closed the connection (a partial frame included), or
 * -EPROTO / -EMSGSIZE for a malformed frame. Decode with the cm_wire_decode_* functions. */
int fcgi_engine_next(struct fcgi_engine_conn *c, struct cm_wire_frame *out);

/* One STATS round trip on a fresh connection: *json_out is the STATS_REPLY JSON text
 * (NUL-terminated, caller frees with free()). Returns 0, -EHOSTDOWN, -EPROTO, -ETIMEDOUT or
 * -ENOMEM. For /health and /metrics. */
int fcgi_engine_stats(struct fcgi_engine *e, char **json_out);

/* For tests: replaces the monotonic clock of the backoff (nanoseconds; NULL: cm_now_ns). Call
 * before the engine is shared between threads. */
void fcgi_engine_set_clock(struct fcgi_engine *e, uint64_t (*now_ns)(void));

#endif

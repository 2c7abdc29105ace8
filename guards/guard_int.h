/*
 * guard_int: internals shared by guard.c (configuration, names, the object, token_loop),
 * guard_calls.c (the tool-loop guards and the history they read) and guard_watch.c (the content
 * guards). Not a public interface: fcgi and engine include guard.h only.
 */
#ifndef GUARD_INT_H
#define GUARD_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "guards/guard.h"

/* ---- Hashing ---- */

/* 128 bits: two independent 64-bit hashes, so that identities can be compared without keeping
 * the strings (a collision would need both to collide). */
struct guard_hash {
    uint64_t a, b;
};

struct guard_hasher {
    uint64_t a, b;
};

void guard_hasher_init(struct guard_hasher *h);
void guard_hasher_add(struct guard_hasher *h, const void *p, size_t n);
struct guard_hash guard_hasher_done(const struct guard_hasher *h);
bool guard_hash_eq(struct guard_hash x, struct guard_hash y);
uint64_t guard_hash64(const void *p, size_t n);

/* ---- Tool-loop guards (guard_calls.c) ---- */

/* A history call whose result says the failure is permanent. */
struct guard_fail {
    struct guard_hash call; /* (name, canonical arguments) */
    struct guard_hash name;
    struct guard_hash key; /* primary argument, when has_key */
    bool has_key;
};

/* The last calls in order, newest at (head - 1) mod GUARD_CALL_RING_MAX. */
struct guard_ring {
    struct guard_hash item[GUARD_CALL_RING_MAX];
    int head;
    int n;   /* items held, <= GUARD_CALL_RING_MAX */
    int run; /* how many of the newest items in a row are identical */
};

struct guard_calls {
    /* configured values, 0 = off */
    int name_run_cap, identical_ring, history_ring, call_cap;
    bool permanent;

    int n_calls; /* in this response */
    struct guard_hash last_name;
    int name_run;
    struct guard_ring resp;    /* this response's calls */
    struct guard_ring history; /* the history's calls, then this response's */
    struct guard_fail *fails;  /* owned */
    int n_fails;
};

/* Reads the history into c (configured values already set). Returns 0, -ENOMEM. */
int guard_calls_init(struct guard_calls *c, const struct cm_chat_msg *msgs, int n);
void guard_calls_fini(struct guard_calls *c);
enum guard_id guard_calls_feed(struct guard_calls *c, const char *name, const char *args,
                               size_t args_len);

/* The primary argument of canonical (or any) JSON arguments args[0..n), hashed (see guard.h).
 * Returns false when there is none. No allocation. */
bool guard_primary_key(const char *args, size_t n, struct guard_hash *out);

/* ---- Content guards (guard_watch.c) ---- */

struct guard_watch;

/* line_n: line_repeat count (0 off); sim: sentence_loop similarity (0 off). Returns 0, -ENOMEM. */
int guard_watch_new(int line_n, double sim, struct guard_watch **out);
void guard_watch_free(struct guard_watch *w);
enum guard_id guard_watch_feed(struct guard_watch *w, const char *text, size_t n);

#endif

/*
 * fcgi: what every part of the llm-fcgi worker shares: its configuration (flags and config
 * file), its counters for /metrics, and the context a request handler borrows. One struct
 * fcgi_ctx exists per process, built by main before the request threads start and freed after
 * they are joined; handlers only read conf and update the atomic counters, so it needs no lock.
 *
 * Modules of the worker (dependencies point down):
 *   main_fcgi.c    flags, signals, the listening socket, T threads each running FCGX_Accept_r
 *   fcgi_server    one request: routing, API key, CORS, body limit, /health /v1/models /metrics,
 *                  then fcgi_gen for the two generation endpoints
 *   fcgi_gen       /v1/chat/completions and /v1/completions: validate, render, submit, stream
 *   fcgi_req       the OpenAI request body -> a validated struct (pure)
 *   fcgi_resp      response JSON: chunks, completions, errors, finish_reason (pure)
 *   fcgi_http      the HTTP response side over an ops seam (libfcgi in production, a buffer in
 *                  unit tests): status, headers, JSON, SSE events, client-disconnect polling
 *   fcgi_engine    the engine client: connect + HELLO/MODEL_INFO, SUBMIT, frames, CANCEL, STATS,
 *                  reconnect backoff
 *   fcgi_dump      --dump: JSON lines of requests and synthesized responses (file mode 0600)
 */
#ifndef FCGI_H
#define FCGI_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "guards/guard.h"

struct fcgi_engine;
struct fcgi_dump;

#define FCGI_MAX_API_KEYS 64

struct fcgi_conf {
    const char *engine_socket;               /* --engine PATH (required) */
    int n_threads;                           /* --threads (8) */
    const char *listen;                      /* --listen unix:PATH | tcp:HOST:PORT, or NULL: fd 0 */
    const char *api_keys[FCGI_MAX_API_KEYS]; /* --api-key (repeatable) and --api-key-file lines */
    int n_api_keys;                          /* 0: no authentication */
    size_t max_body_bytes;                   /* --max-body-bytes (4 MiB) */
    const char *cors_origin;    /* --cors-origin ("*" or an origin), NULL: no CORS headers */
    const char *base_path;      /* --base-path prefix stripped before routing, NULL: none */
    bool any_model_name;        /* --any-model-name: accept any "model" value */
    const char *model_name;     /* --model-name: the id served, overriding the engine's */
    int request_timeout_s;      /* --request-timeout (600): engine deadline and worker bound */
    int heartbeat_s;            /* --heartbeat-seconds (15): ": keep-alive" while idle */
    int default_max_tokens;     /* --default-max-tokens (0: up to the context) */
    const char *dump_path;      /* --dump FILE, NULL: none */
    int log_level;              /* --log-level (CM_LOG levels) */
    struct guard_config guards; /* --guard-<name> N, --no-guards (GUARDS.md defaults) */
    bool allow_guard_overrides; /* --allow-request-guard-overrides: a request's "guards" */
};

/* Worker counters, exported on /metrics with the prefix llm_fcgi_ (this process only). */
struct fcgi_counters {
    _Atomic uint64_t requests; /* every request handled */
    _Atomic uint64_t responses_2xx, responses_4xx, responses_5xx;
    _Atomic uint64_t client_disconnects; /* a generation the client left (CANCEL sent) */
    _Atomic uint64_t engine_unavailable; /* 503 because the engine could not be reached */
    _Atomic uint64_t tool_calls;         /* valid tool calls sent to clients */
    _Atomic uint64_t tool_calls_invalid; /* blocks dropped: arguments not valid JSON, etc. */
    _Atomic uint64_t stop_string_matches;
    _Atomic uint64_t active_requests; /* gauge */
};

struct fcgi_ctx {
    struct fcgi_conf conf;
    struct fcgi_engine *engine; /* shared, thread-safe */
    struct fcgi_dump *dump;     /* NULL without --dump; thread-safe */
    struct fcgi_counters counters;
    _Atomic uint64_t next_req_id; /* wire request ids: atomic_fetch_add, starting at 1 */
    char fingerprint[80];         /* system_fingerprint: "llm-fcgi-0.1-" + model hash prefix */
};

#endif

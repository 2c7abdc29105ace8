/*
 * bench_load: the end-to-end load of BENCH.md item 3. C clients that each send R streaming
 * completions one after the other (closed loop), all driven by one poll(2) loop so the load
 * generator itself costs next to nothing, against either
 *   http://HOST:PORT   an OpenAI-compatible server (ours behind lighttpd, or a peer such as
 *                      llama-server): POST /v1/completions with "stream": true, HTTP/1.0;
 *   unix:PATH          llm-engine's socket directly, over the wire protocol (the same load
 *                      without the web server and the FastCGI worker: their cost is the
 *                      difference).
 * Every request asks for exactly gen tokens: EOS is suppressed with logit_bias (the ids come from
 * the engine's MODEL_INFO when an engine socket is given) and sampling is seeded. Prompts are
 * ~prompt_words English words, different per request (no prefix reuse).
 *
 * Per request: TTFT (send to first content event / TOKEN frame) and every inter-token gap.
 * Aggregate tok/s is completion tokens over the wall time from the first send to the last end.
 * A request that still ends early (a loop guard of our worker tripping on the model's
 * repetitive text, a stop, the context) is counted as short with its reason: the runs being
 * compared must show none, or they did unequal work.
 */
#ifndef BENCH_LOAD_H
#define BENCH_LOAD_H

#include <stdint.h>

struct bench_load_opts {
    const char *target; /* "http://127.0.0.1:8080" or "unix:/path/engine.sock" */
    const char *model;  /* "model" field for HTTP; NULL: asked from GET /v1/models */
    int clients;        /* concurrent clients */
    int rounds;         /* requests per client, one after the other */
    int prompt_words;   /* ~words per prompt (245 give ~250 tokens with the default model) */
    int gen;            /* completion tokens per request */
    const int32_t *ban; /* token ids given logit_bias -100 (EOS, EOT) */
    int n_ban;
    int timeout_s; /* per request */
};

/* Why requests ended short (see short_reqs): a name and how many ended so. */
#define BENCH_LOAD_MAX_WHY 4
struct bench_load_why {
    char name[80]; /* HTTP: the choice's stop_reason, else its finish_reason; engine: the DONE's
                      guard, else its finish */
    int n;
};

struct bench_load_result {
    int ok, errors;
    /* Requests that ended well but with fewer than gen completion tokens (a guard, a stop, the
     * context): tok/s then counts less work than a server that generated all of them. The first
     * BENCH_LOAD_MAX_WHY reasons are tallied in why (n_why of them), the rest in why_other. */
    int short_reqs;
    struct bench_load_why why[BENCH_LOAD_MAX_WHY];
    int n_why, why_other;
    long completion_tokens, prompt_tokens;
    double wall_s, tok_s;
    double ttft_p50_ms, ttft_p99_ms, itl_p50_ms, itl_p99_ms;
};

/* Runs the load; returns 0 (errors are counted in out, not returned) or a negative errno when the
 * load could not start (bad target, no memory). Prints nothing. */
int bench_load_run(const struct bench_load_opts *o, struct bench_load_result *out);

/* The EOS/EOT ids from an engine's MODEL_INFO (socket path); writes up to 2 ids into ban and
 * their count into *n. Returns 0 or a negative errno. */
int bench_load_engine_ban_ids(const char *socket_path, int32_t ban[2], int *n);

#endif

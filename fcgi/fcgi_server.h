/*
 * fcgi_server: one request, from the routed path to the last byte of the response, on the thread
 * serving it. Routes (API.md):
 *   GET  /health                 200 {"status":"ok"} when the engine answers STATS, else 503
 *   GET  /metrics                Prometheus text: the engine's STATS_REPLY as llm_engine_*, this
 *                                process's counters as llm_fcgi_*, llm_engine_up
 *   GET  /v1/models              the served model (--model-name, else the engine's MODEL_INFO)
 *   GET  /v1/models/{id}         that model, or 404 model_not_found
 *   POST /v1/chat/completions    fcgi_gen
 *   POST /v1/completions         fcgi_gen
 *   OPTIONS any                  CORS preflight (204) when --cors-origin is set, else 405
 * GET routes also take HEAD. Unknown path: 404 not_found_error; known path, wrong method: 405 with
 * an Allow header.
 * API keys: when keys are configured, every request except GET /health and CORS preflights needs
 * "Authorization: Bearer KEY" matching one of them (401 authentication_error, code
 * invalid_api_key); the comparison takes the same time whichever bytes differ.
 * Counters: requests, active_requests and responses_{2xx,4xx,5xx} (from h->status) are counted
 * here for every request; engine_unavailable for the 503s of /health and /v1/models.
 */
#ifndef FCGI_SERVER_H
#define FCGI_SERVER_H

#include <stdbool.h>

struct fcgi_ctx;
struct fcgi_conf;
struct fcgi_http;

/* h carries the request (method, path from fcgi_server_request_path, headers, body) and nothing
 * sent yet. Writes a complete response unless the client left. Returns 0, or -EPIPE when the
 * client left. */
int fcgi_server_handle(struct fcgi_ctx *ctx, struct fcgi_http *h);

/* A body over --max-body-bytes: a 413 invalid_request_error, counted like fcgi_server_handle. */
int fcgi_server_handle_too_large(struct fcgi_ctx *ctx, struct fcgi_http *h);

/* The routing path: REQUEST_URI without "?query" or "#fragment", or, when REQUEST_URI is absent or
 * empty, SCRIPT_NAME + PATH_INFO (each may be NULL); then conf->base_path is stripped when the path
 * starts with it (a path without the prefix is routed as is: the web server may have stripped it);
 * a trailing '/' is dropped except for "/". *out is malloc'ed (caller frees). Returns 0. */
int fcgi_server_request_path(const struct fcgi_conf *conf, const char *request_uri,
                             const char *script_name, const char *path_info, char **out);

/* Whether authorization ("Bearer KEY", scheme case-insensitive) carries one of the configured
 * keys; true when no key is configured. */
bool fcgi_server_key_ok(const struct fcgi_conf *conf, const char *authorization);

/* The /metrics body for a STATS_REPLY JSON text (NULL: the engine is down) and ctx's counters.
 * *out is malloc'ed, NUL-terminated. Returns 0 or -ENOMEM. */
int fcgi_server_metrics_text(struct fcgi_ctx *ctx, const char *stats_json, char **out);

#endif

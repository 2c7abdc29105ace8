/*
 * fcgi_gen: the two generation endpoints, POST /v1/chat/completions and POST /v1/completions,
 * from the request body to the last byte of the response. Called by fcgi_server after routing,
 * the method check, the API key and the body limit; it owns everything else of the exchange:
 *   parse and validate the body (fcgi_req; 400 naming the param), check the model name, open an
 *   engine connection (503 + Retry-After when the engine is down), render the chat template
 *   (cm_chat, with tools; tool_choice required / named forces the tool-call opener), SUBMIT,
 *   then stream or collect: UTF-8 assembly (guard_utf8), stop strings with hold-back
 *   (guard_stop; a match sends CANCEL), tool-call parsing (guard_toolcall; OpenAI tool_call
 *   deltas, finish_reason "tool_calls"), logprobs, include_usage, a ": keep-alive" comment every
 *   conf.heartbeat_s while nothing else is sent, client disconnect (poll of the client fd with the
 *   engine fd, failed flushes) -> CANCEL, a bounded wait for DONE after a CANCEL, the --dump
 *   record, the worker counters.
 * Engine ERROR replies map to HTTP: EAGAIN -> 429 rate_limit_exceeded with Retry-After, E2BIG ->
 * 400 context_length_exceeded, EINVAL -> 400, others -> 500/503. After a stream has started an
 * error is one `data: {"error": ...}` event, a final chunk and `data: [DONE]`.
 * Runs on the request's thread; shares only ctx (read-only conf, atomic counters, thread-safe
 * engine and dump).
 */
#ifndef FCGI_GEN_H
#define FCGI_GEN_H

#include <stdbool.h>

struct fcgi_ctx;
struct fcgi_http;

enum fcgi_gen_endpoint {
    FCGI_GEN_CHAT = 0,       /* /v1/chat/completions */
    FCGI_GEN_COMPLETION = 1, /* /v1/completions */
};

/* h carries the request (method POST, body read) and nothing sent yet. Writes a complete
 * response (success or error) unless the client left. Returns 0 when a response was written (an
 * error response counts), -EPIPE when the client left. */
int fcgi_gen_handle(struct fcgi_ctx *ctx, struct fcgi_http *h, enum fcgi_gen_endpoint ep);

#endif

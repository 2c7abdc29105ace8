/*
 * fcgi_resp: the JSON of OpenAI responses, built with json-c; pure (no I/O), any thread.
 *   - ids: "chatcmpl-" / "cmpl-" / "call_" + 24 random alphanumerics (getrandom(2));
 *   - streaming chunks (chat.completion.chunk / text_completion): the role chunk, content deltas,
 *     tool-call deltas (a head with index, id, type, function.name and empty arguments, then
 *     function.arguments fragments), the final chunk with an empty delta and finish_reason (plus
 *     the extension fields stop_reason and tool_loop_capped when set), the usage chunk with
 *     choices [];
 *   - whole responses: chat.completion (message content null when there are only tool calls) and
 *     text_completion, with usage {prompt_tokens, completion_tokens, total_tokens,
 *     prompt_tokens_details: {cached_tokens}};
 *   - logprobs in OpenAI's two shapes, accumulated token by token from TOKEN frames;
 *   - error bodies {"error": {message, type, param, code}};
 *   - THE one function that derives finish_reason and stop_reason from how a generation was cut
 *     (ARCHITECTURE.md "Cancellation").
 *
 * Ownership: builders return a new json_object (caller releases with json_object_put) or NULL
 * when memory ran out; objects passed in as arguments are taken over only where a prototype says
 * "takes". Strings are borrowed and copied.
 */
#ifndef FCGI_RESP_H
#define FCGI_RESP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/cm_wire.h"
#include "fcgi/fcgi_req.h"

struct json_object;

/* ---- Ids ---- */

#define FCGI_RESP_ID_RANDOM 24
#define FCGI_RESP_ID_MAX 40 /* longest prefix + 24 + NUL fits */

/* Writes prefix + 24 random [A-Za-z0-9] into out (FCGI_RESP_ID_MAX bytes). Thread-safe. */
void fcgi_resp_make_id(const char *prefix, char out[FCGI_RESP_ID_MAX]);
/* "chatcmpl-" for chat, "cmpl-" for completions. */
const char *fcgi_resp_id_prefix(enum fcgi_req_kind kind);

/* ---- finish_reason ---- */

/* How a generation ended, as the worker saw it. */
struct fcgi_resp_cut {
    const char *guard;    /* a worker guard that tripped (its name), NULL: none */
    bool guard_tool_loop; /* that guard is a tool-loop guard (GUARDS.md) */
    int n_tool_calls;     /* valid tool calls sent to the client */
    bool stop_string;     /* a client stop string matched */
    bool client_gone;     /* the client left */
    bool error;           /* an engine error or a lost engine connection after the start */
    bool have_done;       /* the engine's DONE arrived: */
    enum cm_wire_finish done_finish;
    const char *done_guard; /* DONE's guard ("" or NULL: none) */
};

struct fcgi_resp_finish {
    const char *finish_reason; /* "stop", "length", "tool_calls" (static) */
    const char *stop_reason;   /* the cut's name, NULL: none */
    bool tool_loop_capped;
};

/* In this order: tool-loop guard -> "length" (tool_loop_capped); valid tool calls ->
 * "tool_calls"; stop string -> "stop" (stop_reason "stop_string"); another guard, the deadline,
 * an error, a client disconnect or an engine cancel -> "length" (stop_reason its name: the guard,
 * "deadline", "error", "client_disconnect", DONE's guard or "cancelled"); max_tokens or the
 * context full -> "length"; EOS or a stop token -> "stop". No DONE and nothing else -> "length",
 * "error". */
void fcgi_resp_finish_of(const struct fcgi_resp_cut *cut, struct fcgi_resp_finish *out);

/* ---- Usage ---- */

struct fcgi_resp_usage {
    uint32_t prompt_tokens;
    uint32_t completion_tokens;
    uint32_t cached_tokens;
};

struct json_object *fcgi_resp_usage_json(const struct fcgi_resp_usage *u);

/* ---- Logprobs ---- */

/* Accumulates the logprobs of tokens in the shape of the endpoint:
 *   chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
 *                "logprob", "bytes"}, ...]}, ...]}
 *   completions: {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob},
 *                ...], "text_offset": [...]}
 * A token's string is its bytes with ill-formed UTF-8 replaced by U+FFFD ("bytes" is exact).
 * Alternatives carry only an id on the wire: an alternative equal to the sampled token gets its
 * text, the others are written "token_id:<id>" (bytes null). top_logprobs lists at most
 * `top` alternatives. */
struct fcgi_resp_logprobs {
    enum fcgi_req_kind kind;
    int top;
    struct json_object *content;                                /* chat */
    struct json_object *tokens, *token_logprobs, *top_logprobs; /* completions */
    struct json_object *text_offset;
    size_t n;        /* tokens since the last take */
    uint64_t offset; /* completions: text bytes so far (text_offset) */
};

void fcgi_resp_logprobs_init(struct fcgi_resp_logprobs *lp, enum fcgi_req_kind kind, int top);
void fcgi_resp_logprobs_fini(struct fcgi_resp_logprobs *lp);
/* Adds one token (with CM_WIRE_TOKEN_LOGPROB; others are ignored). Returns 0 or -ENOMEM. */
int fcgi_resp_logprobs_add(struct fcgi_resp_logprobs *lp, const struct cm_wire_token *t);
/* The logprobs object of the tokens added since the last take (NULL when none), and a reset. */
struct json_object *fcgi_resp_logprobs_take(struct fcgi_resp_logprobs *lp);

/* ---- Chunks (streaming) ---- */

/* What every chunk and response carries. */
struct fcgi_resp_meta {
    enum fcgi_req_kind kind;
    const char *id;
    int64_t created; /* Unix seconds */
    const char *model;
    const char *fingerprint; /* system_fingerprint, NULL: omitted */
};

/* Deltas for chat chunks. */
struct json_object *fcgi_resp_delta_role(void); /* {"role": "assistant", "content": ""} */
struct json_object *fcgi_resp_delta_content(const char *text, size_t len);
/* {"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]} */
struct json_object *fcgi_resp_delta_call_head(int index, const char *id, const char *name);
/* {"tool_calls": [{"index", "function": {"arguments": text}}]} */
struct json_object *fcgi_resp_delta_call_args(int index, const char *text, size_t len);

/* A chat.completion.chunk with one choice: takes delta (NULL: {}) and logprobs (NULL: null);
 * fin NULL: finish_reason null. */
struct json_object *fcgi_resp_chat_chunk(const struct fcgi_resp_meta *m, struct json_object *delta,
                                         struct json_object *logprobs,
                                         const struct fcgi_resp_finish *fin);

/* A text_completion chunk with one choice {"index", "text", "logprobs", "finish_reason"}. */
struct json_object *fcgi_resp_text_chunk(const struct fcgi_resp_meta *m, const char *text,
                                         size_t len, struct json_object *logprobs,
                                         const struct fcgi_resp_finish *fin);

/* The include_usage chunk: choices [] and usage. */
struct json_object *fcgi_resp_usage_chunk(const struct fcgi_resp_meta *m,
                                          const struct fcgi_resp_usage *u);

/* ---- Whole responses ---- */

struct fcgi_resp_call {
    char id[FCGI_RESP_ID_MAX];
    char *name;      /* owned by whoever fills it */
    char *arguments; /* JSON text */
};

/* chat.completion: message {"role": "assistant", "content": content (null when content is NULL,
 * or empty with calls), "tool_calls": [...] (only with calls)}, finish fields on the choice.
 * Takes logprobs (NULL: null). */
struct json_object *fcgi_resp_chat_completion(const struct fcgi_resp_meta *m, const char *content,
                                              size_t len, const struct fcgi_resp_call *calls,
                                              int n_calls, struct json_object *logprobs,
                                              const struct fcgi_resp_finish *fin,
                                              const struct fcgi_resp_usage *u);

/* text_completion: choices [{"index", "text", "logprobs", "finish_reason"}]. Takes logprobs. */
struct json_object *fcgi_resp_text_completion(const struct fcgi_resp_meta *m, const char *text,
                                              size_t len, struct json_object *logprobs,
                                              const struct fcgi_resp_finish *fin,
                                              const struct fcgi_resp_usage *u);

/* ---- Errors ---- */

/* The OpenAI error type of an HTTP status (API.md): 400/405/413 invalid_request_error, 401
 * authentication_error, 404 not_found_error, 429 rate_limit_exceeded, others server_error. */
const char *fcgi_resp_error_type(int status);

/* {"error": {"message", "type", "param", "code"}}; param and code null when NULL or empty. */
struct json_object *fcgi_resp_error(const char *type, const char *message, const char *param,
                                    const char *code);

#endif

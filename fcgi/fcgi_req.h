/*
 * fcgi_req: the body of POST /v1/chat/completions or /v1/completions -> a validated struct
 * fcgi_req, and the mapping of that struct to the engine's SUBMIT (struct cm_wire_submit). Pure:
 * json-c only, no I/O, no global state, any thread.
 *
 * Validation follows API.md "Request fields honoured": unknown fields are ignored, null counts as
 * absent, a known field of the wrong type or out of range is a 400 whose param names it the way
 * OpenAI does ("temperature", "messages[2].role", "tools[0].function.name", "stop[1]").
 * Fields and ranges (absent: the default in brackets):
 *   model             string [any]
 *   messages          chat: non-empty array of {role, content, ...}; role system, developer,
 *                     user, assistant, tool; content a string or an array of {"type": "text",
 *                     "text": ...} parts (joined without separator); null content only for an
 *                     assistant with tool_calls; assistant tool_calls [{id, type "function",
 *                     function {name, arguments (string)}}]; tool messages need tool_call_id
 *   prompt            completions: a string or an array of exactly one string
 *   max_tokens, max_completion_tokens (chat; wins over max_tokens)  integer >= 1 [none]
 *   temperature [1] 0..2; top_p [1] (0, 1]; top_k [0] integer, -1 or 0 off; min_p [0] 0..1;
 *   presence_penalty, frequency_penalty [0] -2..2; repetition_penalty [1] (0, 10]
 *   seed              integer (a negative one is taken modulo 2^64) [engine picks]
 *   stop              a string of 1..256 bytes or an array of at most FCGI_REQ_MAX_STOP of them
 *   logit_bias        {"<token id>": -100..100, ...}, at most CM_WIRE_MAX_LOGIT_BIAS entries
 *   logprobs          chat: bool; completions: integer 0..5, the number of top alternatives
 *   top_logprobs      chat: integer 0..20, only with logprobs true
 *   n                 1 only
 *   stream [false]; stream_options {include_usage: bool}, only with stream true
 *   tools             chat: array of at most FCGI_REQ_MAX_TOOLS {"type": "function", "function":
 *                     {"name": [A-Za-z0-9_-]{1,64}, "description": string, "parameters":
 *                     object}}, names unique
 *   tool_choice       "none", "auto", "required" or {"type": "function", "function": {"name"}}
 *                     naming a declared tool ["auto" with tools, "none" without]
 *   parallel_tool_calls  bool [true]
 *   response_format   only {"type": "text"}; anything else is a 400 naming response_format
 *   timeout           extension: seconds, a number > 0 and <= 7 days
 *   guards            extension (GUARDS.md): an object, kept as given for issue 5
 *   user              ignored
 * Strings must not contain NUL characters (the chat template works on C strings); the body must
 * be one JSON object of valid UTF-8, nested at most FCGI_REQ_MAX_DEPTH deep, with nothing but
 * white space after it.
 *
 * Ownership: struct fcgi_req owns the parsed JSON tree (root) and every array in it; the strings
 * it points to (model, message contents, names, stop strings...) borrow from root or from its own
 * allocations and die with fcgi_req_fini.
 */
#ifndef FCGI_REQ_H
#define FCGI_REQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/cm_chat.h"
#include "common/cm_wire.h"

struct json_object;
struct fcgi_conf;

#define FCGI_REQ_MAX_STOP 4
#define FCGI_REQ_MAX_TOOLS 128
#define FCGI_REQ_MAX_DEPTH 64
#define FCGI_REQ_MAX_TIMEOUT_S (7 * 24 * 3600)

enum fcgi_req_kind {
    FCGI_REQ_CHAT = 0,       /* /v1/chat/completions */
    FCGI_REQ_COMPLETION = 1, /* /v1/completions */
};

enum fcgi_req_tool_choice {
    FCGI_TOOL_CHOICE_NONE = 0,     /* tools are not rendered; no parsing of <tool_call> */
    FCGI_TOOL_CHOICE_AUTO = 1,     /* the model decides */
    FCGI_TOOL_CHOICE_REQUIRED = 2, /* the turn starts with the tool-call opener */
    FCGI_TOOL_CHOICE_NAMED = 3,    /* ... and the function name tool_choice_name */
};

/* A 400 (or other status) for the client: the fields of an OpenAI error object. Empty param or
 * code are sent as null. */
struct fcgi_req_error {
    int status;
    char message[256];
    char param[96];
    char code[48];
};

struct fcgi_req {
    enum fcgi_req_kind kind;
    struct json_object *root; /* the whole body, owned */

    const char *model; /* NULL: absent */

    /* chat */
    struct cm_chat_msg *msgs; /* (n_msgs) */
    int n_msgs;
    struct cm_chat_tool_call *calls; /* (n_calls) all assistant tool calls, msgs point in here */
    int n_calls;
    char **joined; /* (n_joined) contents joined from text parts, owned */
    int n_joined;

    /* completions */
    const char *prompt; /* NUL-terminated, prompt_len bytes */
    size_t prompt_len;

    uint32_t max_tokens;              /* 0: not given */
    struct cm_wire_sampling sampling; /* defaults of cm_wire_submit_init; logit_bias owned */
    const char *stop[FCGI_REQ_MAX_STOP];
    int n_stop;
    bool logprobs;
    int top_logprobs; /* 0..20 (chat), 0..5 (completions) */
    bool stream;
    bool include_usage;

    /* tools (chat) */
    char *tools_json; /* the tools array re-serialised for cm_chat_opts, owned; NULL: none */
    int n_tools;
    const char **tool_names; /* (n_tools) */
    enum fcgi_req_tool_choice tool_choice;
    const char *tool_choice_name; /* FCGI_TOOL_CHOICE_NAMED */
    bool parallel_tool_calls;

    uint32_t timeout_ms;        /* 0: not given */
    struct json_object *guards; /* borrowed from root; NULL: absent */
};

/* Parses and validates body (len bytes, need not be NUL-terminated) for endpoint kind. On success
 * fills *out (caller releases it with fcgi_req_fini) and returns 0. On a client error returns
 * -EINVAL and fills *err (status 400, message, param, code); -ENOMEM when memory ran out (err
 * then says 500). *out is untouched on failure. */
int fcgi_req_parse(enum fcgi_req_kind kind, const char *body, size_t len, struct fcgi_req *out,
                   struct fcgi_req_error *err);

/* Frees what r owns and zeroes it. A zeroed struct is fine. */
void fcgi_req_fini(struct fcgi_req *r);

/* Whether the response runs the tool-call parser: chat with tools and tool_choice not none. */
bool fcgi_req_parses_tools(const struct fcgi_req *r);

/* The max_tokens sent to the engine: the request's, else conf->default_max_tokens, else n_ctx
 * (the engine stops at the end of the context: its scheduler caps prompt + max_tokens at the
 * context and finishes with "length"), capped at CM_WIRE_MAX_VOCAB. conf may be NULL. */
uint32_t fcgi_req_max_tokens(const struct fcgi_req *r, const struct fcgi_conf *conf,
                             uint32_t n_ctx);

/* The engine deadline in ms: the request's timeout, else conf->request_timeout_s, else 0 (none),
 * capped at CM_WIRE_MAX_DEADLINE_MS. conf may be NULL. */
uint32_t fcgi_req_deadline_ms(const struct fcgi_req *r, const struct fcgi_conf *conf);

/* Fills *s (cm_wire_submit_init first) from r: max_tokens, sampling (logit_bias borrowed from r),
 * logprobs, top_logprobs, deadline_ms, add_special and parse_special true. The prompt is left to
 * the caller (prompt / prompt_len, borrowed). s must not be passed to cm_wire_submit_fini. */
void fcgi_req_to_submit(const struct fcgi_req *r, const struct fcgi_conf *conf, uint32_t n_ctx,
                        struct cm_wire_submit *s);

#endif

/*
 * fuzz_req: libFuzzer harness for the worker's request parser and validator (fcgi/fcgi_req) and
 * what the worker does with a request that passes. The first input byte picks the endpoint (bit 0:
 * /v1/completions, else /v1/chat/completions) and the chat family the prompt is rendered in (bit
 * 1: Llama 3, else ChatML); the rest is the HTTP body.
 * Properties checked (anything else is abort(); ASan/UBSan/LeakSanitizer watch memory):
 *   - a rejection is -EINVAL with status 400 and a non-empty message, or -ENOMEM with 500;
 *   - an accepted chat request has messages, renders with cm_chat_render_ex as the worker renders
 *     it (tools when tool_choice is not none, generation prompt; -ENOMEM the only failure), and a
 *     forced tool_choice yields a tool prefix; an accepted completion has a NUL-terminated prompt;
 *   - fcgi_req_to_submit of an accepted request with that prompt is a SUBMIT that
 *     cm_wire_submit_validate accepts, cm_wire_encode_submit encodes (or refuses as too large
 *     with -EMSGSIZE) and cm_wire_decode_submit reads back;
 *   - the request's "guards" object, applied with guard_config_override, either applies or is
 *     refused with -EINVAL and a message;
 *   - fcgi_resp builds a whole response (chat.completion or text_completion) naming the model and
 *     carrying the prompt as content, and the error body of a rejection, both serialisable.
 * Seeds (tests/fuzz/corpus/req/): chat-* and completion-* bodies from API.md's examples: plain
 * chat, system + multi-turn, content parts, tools with tool_choice auto/required/named, an
 * assistant tool call and its tool result, stop arrays, logit_bias, logprobs, stream options,
 * guards overrides, sampling fields, and a few invalid ones (wrong types, out of range).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "common/cm_chat.h"
#include "common/cm_wire.h"
#include "fcgi/fcgi_req.h"
#include "fcgi/fcgi_resp.h"
#include "guards/guard.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
die(const char *what, int rc)
{
    fprintf(stderr, "fuzz_req: %s (rc %d)\n", what, rc);
    abort();
}

static void
check_rejection(int rc, const struct fcgi_req_error *err)
{
    if (rc == -EINVAL && err->status != 400)
        die("-EINVAL without status 400", err->status);
    if (rc == -ENOMEM && err->status != 500)
        die("-ENOMEM without status 500", err->status);
    if (rc != -EINVAL && rc != -ENOMEM)
        die("an unexpected parser error", rc);
    if (err->message[0] == '\0' || memchr(err->message, '\0', sizeof(err->message)) == NULL ||
        memchr(err->param, '\0', sizeof(err->param)) == NULL ||
        memchr(err->code, '\0', sizeof(err->code)) == NULL)
        die("an error without a message, or not NUL-terminated", rc);
    struct json_object *o =
        fcgi_resp_error(fcgi_resp_error_type(err->status), err->message, err->param, err->code);
    if (o == NULL || json_object_to_json_string(o) == NULL)
        die("fcgi_resp_error failed", 0);
    json_object_put(o);
}

/* The prompt the worker would send: the rendered conversation (plus the forced tool prefix) for
 * chat, the prompt for completions. NULL only when memory ran out. Caller frees. */
static char *
prompt_of(const struct fcgi_req *r, enum cm_chat_family fam)
{
    if (r->kind == FCGI_REQ_COMPLETION) {
        if (r->prompt == NULL || strlen(r->prompt) != r->prompt_len)
            die("an accepted completion without a NUL-terminated prompt", 0);
        return strdup(r->prompt);
    }
    if (r->n_msgs < 1 || r->msgs == NULL)
        die("an accepted chat request without messages", r->n_msgs);
    struct cm_chat_opts o = {
        .tools_json = r->tool_choice != FCGI_TOOL_CHOICE_NONE ? r->tools_json : NULL,
        .add_generation_prompt = true,
    };
    char *p = NULL;
    int rc = cm_chat_render_ex(fam, &o, r->msgs, r->n_msgs, &p);
    if (rc == -ENOMEM)
        return NULL;
    if (rc != 0)
        die("a validated conversation does not render", rc);
    if (r->tool_choice == FCGI_TOOL_CHOICE_REQUIRED || r->tool_choice == FCGI_TOOL_CHOICE_NAMED) {
        char *prefix = NULL;
        const char *name = r->tool_choice == FCGI_TOOL_CHOICE_NAMED ? r->tool_choice_name : NULL;
        rc = cm_chat_tool_prefix(fam, name, &prefix);
        if (rc != 0 && rc != -ENOMEM)
            die("a validated tool_choice has no tool prefix", rc);
        free(prefix);
    }
    return p;
}

static void
check_submit(const struct fcgi_req *r, const char *prompt)
{
    struct cm_wire_submit s;
    char err[CM_WIRE_ERR_LEN];
    fcgi_req_to_submit(r, NULL, 2048, &s);
    s.prompt = (char *)prompt;
    s.prompt_len = strlen(prompt);
    if (cm_wire_submit_validate(&s, err, sizeof(err)) != 0) {
        fprintf(stderr, "fuzz_req: %s\n", err);
        die("the SUBMIT of a validated request is invalid", 0);
    }
    struct cm_wire_buf b;
    if (cm_wire_buf_init(&b, CM_WIRE_MAX_MAX_PAYLOAD) < 0)
        abort();
    int rc = cm_wire_encode_submit(&b, 7, &s);
    if (rc == 0) {
        struct cm_wire_header h;
        const uint8_t *p = cm_wire_buf_head(&b);
        if (cm_wire_header_check(p, cm_wire_buf_pending(&b), b.max_payload, &h) != 1)
            die("an encoded SUBMIT has a bad header", 0);
        struct cm_wire_frame f = {.type = h.type,
                                  .flags = h.flags,
                                  .req_id = h.req_id,
                                  .len = h.len,
                                  .payload = p + CM_WIRE_HEADER_BYTES};
        struct cm_wire_submit d;
        rc = cm_wire_decode_submit(&f, &d, err, sizeof(err));
        if (rc != 0 && rc != -ENOMEM) {
            fprintf(stderr, "fuzz_req: %s\n", err);
            die("an encoded SUBMIT does not decode", rc);
        }
        if (rc == 0) {
            if (d.prompt_len != s.prompt_len || memcmp(d.prompt, s.prompt, s.prompt_len) != 0 ||
                d.max_tokens != s.max_tokens || d.sampling.n_logit_bias != s.sampling.n_logit_bias)
                die("a SUBMIT changed in the wire round trip", 0);
            cm_wire_submit_fini(&d);
        }
    } else if (rc != -EMSGSIZE && rc != -ENOMEM) {
        die("cm_wire_encode_submit refused a validated request", rc);
    }
    cm_wire_buf_fini(&b);
}

static void
check_guards(const struct fcgi_req *r)
{
    if (r->guards == NULL)
        return;
    struct guard_config c;
    char err[256];
    guard_config_init(&c);
    err[0] = '\0';
    int rc = guard_config_override(&c, r->guards, err, sizeof(err));
    if (rc != 0 && (rc != -EINVAL || err[0] == '\0'))
        die("guard_config_override: an unexpected result", rc);
}

static void
check_response(const struct fcgi_req *r, const char *prompt)
{
    char id[FCGI_RESP_ID_MAX];
    fcgi_resp_make_id(fcgi_resp_id_prefix(r->kind), id);
    struct fcgi_resp_meta m = {
        .kind = r->kind, .id = id, .created = 1700000000, .model = r->model ? r->model : "m"};
    struct fcgi_resp_finish fin = {.finish_reason = "stop"};
    struct fcgi_resp_usage u = {.prompt_tokens = 3, .completion_tokens = 2};
    size_t n = strlen(prompt);
    struct json_object *o = r->kind == FCGI_REQ_CHAT
                                ? fcgi_resp_chat_completion(&m, prompt, n, NULL, 0, NULL, &fin, &u)
                                : fcgi_resp_text_completion(&m, prompt, n, NULL, &fin, &u);
    if (o != NULL && json_object_to_json_string(o) == NULL)
        die("a response does not serialise", 0);
    json_object_put(o);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    enum fcgi_req_kind kind = (data[0] & 1) ? FCGI_REQ_COMPLETION : FCGI_REQ_CHAT;
    enum cm_chat_family fam = (data[0] & 2) ? CM_CHAT_LLAMA3 : CM_CHAT_CHATML;
    struct fcgi_req r;
    struct fcgi_req_error err;
    memset(&r, 0x5a, sizeof(r));
    memset(&err, 0, sizeof(err));
    int rc = fcgi_req_parse(kind, (const char *)data + 1, size - 1, &r, &err);
    if (rc != 0) {
        check_rejection(rc, &err);
        const unsigned char *b = (const unsigned char *)&r;
        for (size_t i = 0; i < sizeof(r); i++)
            if (b[i] != 0x5a)
                die("a rejected parse wrote *out", rc);
        return 0;
    }
    if (r.kind != kind)
        die("the parsed kind differs", r.kind);
    char *prompt = prompt_of(&r, fam);
    if (prompt != NULL) {
        check_submit(&r, prompt);
        check_response(&r, prompt);
    }
    check_guards(&r);
    (void)fcgi_req_parses_tools(&r);
    free(prompt);
    fcgi_req_fini(&r);
    return 0;
}

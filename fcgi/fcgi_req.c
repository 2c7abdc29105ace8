/*
 * fcgi_req: request body -> struct fcgi_req. See fcgi_req.h for the fields and their ranges.
 */
#include "fcgi/fcgi_req.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "fcgi/fcgi.h"
#include "guards/guard_stop.h"
#include "guards/guard_utf8.h"

/* ---- Errors ---- */

static int __attribute__((format(printf, 3, 4)))
bad(struct fcgi_req_error *e, const char *param, const char *fmt, ...)
{
    memset(e, 0, sizeof(*e));
    e->status = 400;
    if (param)
        snprintf(e->param, sizeof(e->param), "%s", param);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
    va_end(ap);
    return -EINVAL;
}

static int
oom(struct fcgi_req_error *e)
{
    memset(e, 0, sizeof(*e));
    e->status = 500;
    snprintf(e->message, sizeof(e->message), "out of memory");
    return -ENOMEM;
}

/* ---- Field access ---- */

/* The value of key, or NULL when absent or null. */
static struct json_object *
field(struct json_object *o, const char *key)
{
    struct json_object *v = NULL;
    if (!json_object_object_get_ex(o, key, &v))
        return NULL;
    if (json_object_get_type(v) == json_type_null)
        return NULL;
    return v;
}

static bool
is_number(struct json_object *v)
{
    enum json_type t = json_object_get_type(v);
    return t == json_type_int || t == json_type_double;
}

/* A number in [lo, hi] (lo excluded when lo_open). Absent: *out untouched, returns 0. */
static int
get_number(struct json_object *o, const char *key, double lo, double hi, bool lo_open, double *out,
           struct fcgi_req_error *e)
{
    struct json_object *v = field(o, key);
    if (!v)
        return 0;
    double d = is_number(v) ? json_object_get_double(v) : NAN;
    if (!isfinite(d) || d < lo || d > hi || (lo_open && d == lo))
        return bad(e, key, "'%s' must be a number in %s%g, %g]", key, lo_open ? "(" : "[", lo, hi);
    *out = d;
    return 0;
}

static int
get_float(struct json_object *o, const char *key, double lo, double hi, bool lo_open, float *out,
          struct fcgi_req_error *e)
{
    double d = *out;
    int rc = get_number(o, key, lo, hi, lo_open, &d, e);
    if (rc == 0)
        *out = (float)d;
    return rc;
}

/* An integer in [lo, hi]. Absent: *out untouched, returns 0. */
static int
get_int(struct json_object *o, const char *key, int64_t lo, int64_t hi, int64_t *out,
        struct fcgi_req_error *e)
{
    struct json_object *v = field(o, key);
    if (!v)
        return 0;
    if (json_object_get_type(v) != json_type_int)
        return bad(e, key, "'%s' must be an integer", key);
    int64_t x = json_object_get_int64(v);
    if (x < lo || x > hi)
        return bad(e, key, "'%s' must be an integer in [%lld, %lld]", key, (long long)lo,
                   (long long)hi);
    *out = x;
    return 0;
}

static int
get_bool(struct json_object *o, const char *key, bool *out, struct fcgi_req_error *e)
{
    struct json_object *v = field(o, key);
    if (!v)
        return 0;
    if (json_object_get_type(v) != json_type_boolean)
        return bad(e, key, "'%s' must be a boolean", key);
    *out = json_object_get_boolean(v);
    return 0;
}

/* A string value without NUL characters; param names it in errors. */
static int
string_value(struct json_object *v, const char *param, const char **out, size_t *len,
             struct fcgi_req_error *e)
{
    if (json_object_get_type(v) != json_type_string)
        return bad(e, param, "'%s' must be a string", param);
    const char *s = json_object_get_string(v);
    size_t n = (size_t)json_object_get_string_len(v);
    if (strlen(s) != n)
        return bad(e, param, "'%s' must not contain NUL characters", param);
    *out = s;
    if (len)
        *len = n;
    return 0;
}

/* ---- Body ---- */

static int
parse_body(const char *body, size_t len, struct json_object **out, struct fcgi_req_error *e)
{
    struct json_tokener *tok = json_tokener_new_ex(FCGI_REQ_MAX_DEPTH);
    struct json_object *root = NULL;
    int rc = 0;

    if (!tok)
        return oom(e);
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
    if (len > INT32_MAX) {
        rc = bad(e, NULL, "the request body is too large");
        goto out;
    }
    /* json-c's UTF-8 check lets overlong forms (C0 80, C1 A9) and other ill-formed sequences
     * through; the engine's SUBMIT validator would then refuse the prompt. A raw NUL is not JSON
     * either. */
    if (len > 0 && body && !guard_utf8_valid(body, len)) {
        rc = bad(e, NULL, "the request body is not valid UTF-8 JSON text");
        goto out;
    }
    root = json_tokener_parse_ex(tok, body ? body : "", (int)len);
    enum json_tokener_error jerr = json_tokener_get_error(tok);
    if (!root) {
        if (jerr == json_tokener_continue)
            rc = bad(e, NULL, "invalid JSON in the request body: unexpected end of input");
        else
            rc =
                bad(e, NULL, "invalid JSON in the request body: %s", json_tokener_error_desc(jerr));
        goto out;
    }
    for (size_t i = json_tokener_get_parse_end(tok); i < len; i++) {
        char c = body[i];
        if (c != ' ' && c != '\t' && c != '\r' && c != '\n') {
            rc = bad(e, NULL, "invalid JSON in the request body: data after the object");
            goto out;
        }
    }
    if (json_object_get_type(root) != json_type_object) {
        rc = bad(e, NULL, "the request body must be a JSON object");
        goto out;
    }
    *out = root;
    root = NULL;
out:
    json_object_put(root);
    json_tokener_free(tok);
    return rc;
}

/* ---- Messages ---- */

static const char *const roles[] = {"system", "developer", "user", "assistant", "tool"};

static bool
role_known(const char *r)
{
    for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++)
        if (strcmp(r, roles[i]) == 0)
            return true;
    return false;
}

/* content given as [{"type": "text", "text": ...}, ...]: the texts joined, a fresh string kept in
 * r->joined. */
static int
content_parts(struct fcgi_req *r, struct json_object *arr, int mi, const char **out,
              struct fcgi_req_error *e)
{
    char param[96];
    size_t n = json_object_array_length(arr), total = 0;
    for (size_t j = 0; j < n; j++) {
        struct json_object *p = json_object_array_get_idx(arr, j);
        snprintf(param, sizeof(param), "messages[%d].content[%zu]", mi, j);
        if (json_object_get_type(p) != json_type_object)
            return bad(e, param, "'%s' must be an object", param);
        struct json_object *t = field(p, "type");
        if (!t || json_object_get_type(t) != json_type_string ||
            strcmp(json_object_get_string(t), "text") != 0) {
            snprintf(param, sizeof(param), "messages[%d].content[%zu].type", mi, j);
            return bad(e, param, "'%s' must be \"text\": only text content is supported", param);
        }
        struct json_object *tv = field(p, "text");
        snprintf(param, sizeof(param), "messages[%d].content[%zu].text", mi, j);
        const char *s = NULL;
        size_t len = 0;
        if (!tv)
            return bad(e, param, "'%s' is required", param);
        int rc = string_value(tv, param, &s, &len, e);
        if (rc < 0)
            return rc;
        total += len;
    }
    char *buf = malloc(total + 1);
    if (!buf)
        return oom(e);
    size_t off = 0;
    for (size_t j = 0; j < n; j++) {
        struct json_object *tv = field(json_object_array_get_idx(arr, j), "text");
        size_t len = (size_t)json_object_get_string_len(tv);
        memcpy(buf + off, json_object_get_string(tv), len);
        off += len;
    }
    buf[off] = 0;
    r->joined[r->n_joined++] = buf;
    *out = buf;
    return 0;
}

static int
message_content(struct fcgi_req *r, struct json_object *m, int mi, const char **out,
                struct fcgi_req_error *e)
{
    char param[96];
    snprintf(param, sizeof(param), "messages[%d].content", mi);
    struct json_object *c = field(m, "content");
    *out = NULL;
    if (!c)
        return 0;
    if (json_object_get_type(c) == json_type_array)
        return content_parts(r, c, mi, out, e);
    if (json_object_get_type(c) != json_type_string)
        return bad(e, param, "'%s' must be a string or an array of text parts", param);
    return string_value(c, param, out, NULL, e);
}

/* One assistant tool call: {"id", "type": "function", "function": {"name", "arguments"}}. */
static int
tool_call(struct json_object *tc, int mi, size_t k, struct cm_chat_tool_call *out,
          struct fcgi_req_error *e)
{
    char param[96];
    int rc = 0;
    snprintf(param, sizeof(param), "messages[%d].tool_calls[%zu]", mi, k);
    if (json_object_get_type(tc) != json_type_object)
        return bad(e, param, "'%s' must be an object", param);
    struct json_object *v = field(tc, "type");
    if (v && (json_object_get_type(v) != json_type_string ||
              strcmp(json_object_get_string(v), "function") != 0)) {
        snprintf(param, sizeof(param), "messages[%d].tool_calls[%zu].type", mi, k);
        return bad(e, param, "'%s' must be \"function\"", param);
    }
    if ((v = field(tc, "id"))) {
        snprintf(param, sizeof(param), "messages[%d].tool_calls[%zu].id", mi, k);
        if ((rc = string_value(v, param, &out->id, NULL, e)) < 0)
            return rc;
    }
    struct json_object *fn = field(tc, "function");
    snprintf(param, sizeof(param), "messages[%d].tool_calls[%zu].function", mi, k);
    if (!fn || json_object_get_type(fn) != json_type_object)
        return bad(e, param, "'%s' must be an object", param);
    snprintf(param, sizeof(param), "messages[%d].tool_calls[%zu].function.name", mi, k);
    if (!(v = field(fn, "name")))
        return bad(e, param, "'%s' is required", param);
    if ((rc = string_value(v, param, &out->name, NULL, e)) < 0)
        return rc;
    if (out->name[0] == 0)
        return bad(e, param, "'%s' must not be empty", param);
    snprintf(param, sizeof(param), "messages[%d].tool_calls[%zu].function.arguments", mi, k);
    v = field(fn, "arguments");
    if (!v)
        return bad(e, param, "'%s' is required", param);
    if (json_object_get_type(v) == json_type_object) /* lenient: an object instead of its text */
        out->arguments = json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN);
    else if ((rc = string_value(v, param, &out->arguments, NULL, e)) < 0)
        return rc;
    return 0;
}

static int
message_tools(struct fcgi_req *r, struct json_object *m, int mi, struct cm_chat_msg *msg,
              struct fcgi_req_error *e)
{
    char param[96];
    int rc = 0;
    struct json_object *v = NULL;
    if (strcmp(msg->role, "assistant") == 0 && (v = field(m, "tool_calls"))) {
        snprintf(param, sizeof(param), "messages[%d].tool_calls", mi);
        if (json_object_get_type(v) != json_type_array)
            return bad(e, param, "'%s' must be an array", param);
        size_t n = json_object_array_length(v);
        msg->tool_calls = r->calls + r->n_calls;
        for (size_t k = 0; k < n; k++) {
            rc = tool_call(json_object_array_get_idx(v, k), mi, k, &r->calls[r->n_calls], e);
            if (rc < 0)
                return rc;
            r->n_calls++;
        }
        msg->n_tool_calls = (int)n;
        if (n == 0)
            msg->tool_calls = NULL;
    }
    if (strcmp(msg->role, "tool") == 0) {
        snprintf(param, sizeof(param), "messages[%d].tool_call_id", mi);
        if (!(v = field(m, "tool_call_id")))
            return bad(e, param, "'%s' is required for role \"tool\"", param);
        if ((rc = string_value(v, param, &msg->tool_call_id, NULL, e)) < 0)
            return rc;
        if ((v = field(m, "name"))) {
            snprintf(param, sizeof(param), "messages[%d].name", mi);
            if ((rc = string_value(v, param, &msg->name, NULL, e)) < 0)
                return rc;
        }
    }
    return 0;
}

static int
message(struct fcgi_req *r, struct json_object *m, int mi, struct fcgi_req_error *e)
{
    char param[96];
    struct cm_chat_msg *msg = &r->msgs[mi];
    int rc = 0;

    snprintf(param, sizeof(param), "messages[%d]", mi);
    if (json_object_get_type(m) != json_type_object)
        return bad(e, param, "'%s' must be an object", param);
    snprintf(param, sizeof(param), "messages[%d].role", mi);
    struct json_object *v = field(m, "role");
    if (!v)
        return bad(e, param, "'%s' is required", param);
    if ((rc = string_value(v, param, &msg->role, NULL, e)) < 0)
        return rc;
    if (!role_known(msg->role))
        return bad(e, param, "'%s' must be one of system, developer, user, assistant, tool", param);
    if ((rc = message_content(r, m, mi, &msg->content, e)) < 0)
        return rc;
    if ((rc = message_tools(r, m, mi, msg, e)) < 0)
        return rc;
    if (msg->content == NULL) {
        if (strcmp(msg->role, "assistant") != 0) {
            snprintf(param, sizeof(param), "messages[%d].content", mi);
            return bad(e, param, "'%s' is required for role \"%s\"", param, msg->role);
        }
        if (msg->n_tool_calls == 0)
            msg->content = "";
    }
    return 0;
}

/* Counts the tool calls of every message for one allocation; malformed arrays count 0 here and
 * are reported by message(). */
static size_t
count_calls(struct json_object *arr)
{
    size_t total = 0, n = json_object_array_length(arr);
    for (size_t i = 0; i < n; i++) {
        struct json_object *m = json_object_array_get_idx(arr, i);
        if (json_object_get_type(m) != json_type_object)
            continue;
        struct json_object *tc = field(m, "tool_calls");
        if (tc && json_object_get_type(tc) == json_type_array)
            total += json_object_array_length(tc);
    }
    return total;
}

static int
parse_messages(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    struct json_object *arr = field(root, "messages");
    if (!arr)
        return bad(e, "messages", "'messages' is required");
    if (json_object_get_type(arr) != json_type_array)
        return bad(e, "messages", "'messages' must be an array");
    size_t n = json_object_array_length(arr);
    if (n == 0)
        return bad(e, "messages", "'messages' must not be empty");
    if (n > (1u << 20))
        return bad(e, "messages", "'messages' has too many entries");
    size_t n_calls = count_calls(arr);
    r->msgs = calloc(n, sizeof(*r->msgs));
    r->joined = calloc(n, sizeof(*r->joined));
    r->calls = calloc(n_calls ? n_calls : 1, sizeof(*r->calls));
    if (!r->msgs || !r->joined || !r->calls)
        return oom(e);
    r->n_msgs = (int)n;
    for (size_t i = 0; i < n; i++) {
        int rc = message(r, json_object_array_get_idx(arr, i), (int)i, e);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int
parse_prompt(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    struct json_object *v = field(root, "prompt");
    if (!v)
        return bad(e, "prompt", "'prompt' is required");
    if (json_object_get_type(v) == json_type_array) {
        if (json_object_array_length(v) != 1)
            return bad(e, "prompt", "'prompt' must be a string or an array of one string");
        v = json_object_array_get_idx(v, 0);
        if (json_object_get_type(v) != json_type_string)
            return bad(e, "prompt", "'prompt' must be a string or an array of one string");
    }
    return string_value(v, "prompt", &r->prompt, &r->prompt_len, e);
}

/* ---- Sampling and limits ---- */

static int
parse_seed(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    struct json_object *v = field(root, "seed");
    if (!v)
        return 0;
    if (json_object_get_type(v) != json_type_int)
        return bad(e, "seed", "'seed' must be an integer");
    int64_t x = json_object_get_int64(v);
    r->sampling.has_seed = true;
    r->sampling.seed = x == INT64_MAX ? json_object_get_uint64(v) : (uint64_t)x;
    return 0;
}

static int
parse_sampling(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    struct cm_wire_sampling *p = &r->sampling;
    int64_t top_k = p->top_k;
    int rc = 0;
    if ((rc = get_float(root, "temperature", 0, 2, false, &p->temperature, e)) < 0 ||
        (rc = get_float(root, "top_p", 0, 1, true, &p->top_p, e)) < 0 ||
        (rc = get_float(root, "min_p", 0, 1, false, &p->min_p, e)) < 0 ||
        (rc = get_float(root, "presence_penalty", -2, 2, false, &p->presence_penalty, e)) < 0 ||
        (rc = get_float(root, "frequency_penalty", -2, 2, false, &p->frequency_penalty, e)) < 0 ||
        (rc = get_float(root, "repetition_penalty", 0, 10, true, &p->repetition_penalty, e)) < 0 ||
        (rc = get_int(root, "top_k", -1, CM_WIRE_MAX_VOCAB, &top_k, e)) < 0)
        return rc;
    p->top_k = top_k < 0 ? 0 : (int32_t)top_k;
    return parse_seed(r, root, e);
}

/* "<id>": decimal digits, no sign, no leading zero, below CM_WIRE_MAX_VOCAB. */
static bool
token_id_key(const char *k, int32_t *out)
{
    size_t n = strlen(k);
    if (n == 0 || n > 8 || (k[0] == '0' && n > 1))
        return false;
    int64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (k[i] < '0' || k[i] > '9')
            return false;
        v = v * 10 + (k[i] - '0');
    }
    if (v >= CM_WIRE_MAX_VOCAB)
        return false;
    *out = (int32_t)v;
    return true;
}

static int
parse_logit_bias(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    struct json_object *o = field(root, "logit_bias");
    if (!o)
        return 0;
    if (json_object_get_type(o) != json_type_object)
        return bad(e, "logit_bias", "'logit_bias' must be an object of token ids to numbers");
    int n = json_object_object_length(o);
    if (n > (int)CM_WIRE_MAX_LOGIT_BIAS)
        return bad(e, "logit_bias", "'logit_bias' has more than %u entries",
                   CM_WIRE_MAX_LOGIT_BIAS);
    if (n == 0)
        return 0;
    r->sampling.logit_bias = calloc((size_t)n, sizeof(*r->sampling.logit_bias));
    if (!r->sampling.logit_bias)
        return oom(e);
    uint32_t k = 0;
    json_object_object_foreach(o, key, val)
    {
        int32_t id = 0;
        if (!token_id_key(key, &id))
            return bad(e, "logit_bias", "'logit_bias' keys must be token ids, got \"%.32s\"", key);
        double d = is_number(val) ? json_object_get_double(val) : NAN;
        if (!isfinite(d) || d < -100 || d > 100)
            return bad(e, "logit_bias", "'logit_bias' values must be numbers in [-100, 100]");
        r->sampling.logit_bias[k].id = id;
        r->sampling.logit_bias[k].bias = (float)d;
        k++;
    }
    r->sampling.n_logit_bias = k;
    return 0;
}

#define MAX_STOP_BYTES GUARD_STOP_MAX_LEN

static int
parse_stop(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    struct json_object *v = field(root, "stop");
    char param[32];
    int rc = 0;
    if (!v)
        return 0;
    if (json_object_get_type(v) == json_type_string) {
        if ((rc = string_value(v, "stop", &r->stop[0], NULL, e)) < 0)
            return rc;
        if (r->stop[0][0] == 0 || strlen(r->stop[0]) > MAX_STOP_BYTES)
            return bad(e, "stop", "'stop' must be 1..%d bytes", MAX_STOP_BYTES);
        r->n_stop = 1;
        return 0;
    }
    if (json_object_get_type(v) != json_type_array)
        return bad(e, "stop", "'stop' must be a string or an array of strings");
    size_t n = json_object_array_length(v);
    if (n > FCGI_REQ_MAX_STOP)
        return bad(e, "stop", "'stop' has at most %d strings", FCGI_REQ_MAX_STOP);
    for (size_t i = 0; i < n; i++) {
        snprintf(param, sizeof(param), "stop[%zu]", i);
        const char *s = NULL;
        if ((rc = string_value(json_object_array_get_idx(v, i), param, &s, NULL, e)) < 0)
            return rc;
        if (s[0] == 0 || strlen(s) > MAX_STOP_BYTES)
            return bad(e, param, "'%s' must be 1..%d bytes", param, MAX_STOP_BYTES);
        r->stop[r->n_stop++] = s;
    }
    return 0;
}

static int
parse_logprobs(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    int rc = 0;
    if (r->kind == FCGI_REQ_COMPLETION) {
        int64_t n = -1;
        if ((rc = get_int(root, "logprobs", 0, 5, &n, e)) < 0)
            return rc;
        r->logprobs = n >= 0;
        r->top_logprobs = n > 0 ? (int)n : 0;
        return 0;
    }
    int64_t top = 0;
    if ((rc = get_bool(root, "logprobs", &r->logprobs, e)) < 0 ||
        (rc = get_int(root, "top_logprobs", 0, CM_WIRE_MAX_TOP_LOGPROBS, &top, e)) < 0)
        return rc;
    if (field(root, "top_logprobs") && !r->logprobs)
        return bad(e, "top_logprobs", "'top_logprobs' requires 'logprobs' to be true");
    r->top_logprobs = (int)top;
    return 0;
}

static int
parse_limits(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    int64_t mt = 0, mct = 0, n = 1;
    int rc = 0;
    if ((rc = get_int(root, "max_tokens", 1, INT64_MAX, &mt, e)) < 0)
        return rc;
    if (r->kind == FCGI_REQ_CHAT &&
        (rc = get_int(root, "max_completion_tokens", 1, INT64_MAX, &mct, e)) < 0)
        return rc;
    if (mct > 0) /* the newer name wins */
        mt = mct;
    r->max_tokens = mt > CM_WIRE_MAX_VOCAB ? CM_WIRE_MAX_VOCAB : (uint32_t)mt;
    if ((rc = get_int(root, "n", INT64_MIN, INT64_MAX, &n, e)) < 0)
        return rc;
    if (n != 1)
        return bad(e, "n", "'n' must be 1: one choice per request is supported");
    double t = 0;
    if ((rc = get_number(root, "timeout", 0, FCGI_REQ_MAX_TIMEOUT_S, true, &t, e)) < 0)
        return rc;
    if (t > 0)
        r->timeout_ms = (uint32_t)ceil(t * 1000.0);
    return 0;
}

static int
parse_stream(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    int rc = get_bool(root, "stream", &r->stream, e);
    if (rc < 0)
        return rc;
    struct json_object *so = field(root, "stream_options");
    if (!so)
        return 0;
    if (json_object_get_type(so) != json_type_object)
        return bad(e, "stream_options", "'stream_options' must be an object");
    if (!r->stream)
        return bad(e, "stream_options", "'stream_options' is only allowed with 'stream': true");
    struct json_object *iu = field(so, "include_usage");
    if (iu && json_object_get_type(iu) != json_type_boolean)
        return bad(e, "stream_options.include_usage",
                   "'stream_options.include_usage' must be a boolean");
    r->include_usage = iu && json_object_get_boolean(iu);
    return 0;
}

/* ---- Tools ---- */

static bool
tool_name_valid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return false;
    }
    return true;
}

static int
tool_def(struct fcgi_req *r, struct json_object *t, int i, struct fcgi_req_error *e)
{
    char param[64];
    snprintf(param, sizeof(param), "tools[%d]", i);
    if (json_object_get_type(t) != json_type_object)
        return bad(e, param, "'%s' must be an object", param);
    struct json_object *v = field(t, "type");
    snprintf(param, sizeof(param), "tools[%d].type", i);
    if (!v || json_object_get_type(v) != json_type_string ||
        strcmp(json_object_get_string(v), "function") != 0)
        return bad(e, param, "'%s' must be \"function\"", param);
    struct json_object *fn = field(t, "function");
    snprintf(param, sizeof(param), "tools[%d].function", i);
    if (!fn || json_object_get_type(fn) != json_type_object)
        return bad(e, param, "'%s' must be an object", param);
    snprintf(param, sizeof(param), "tools[%d].function.name", i);
    v = field(fn, "name");
    if (!v || json_object_get_type(v) != json_type_string ||
        !tool_name_valid(json_object_get_string(v)))
        return bad(e, param, "'%s' must be 1..64 characters of a-z, A-Z, 0-9, _ and -", param);
    const char *name = json_object_get_string(v);
    for (int k = 0; k < i; k++)
        if (strcmp(r->tool_names[k], name) == 0)
            return bad(e, param, "'%s': the function \"%s\" is declared twice", param, name);
    r->tool_names[i] = name;
    snprintf(param, sizeof(param), "tools[%d].function.description", i);
    v = field(fn, "description");
    const char *desc = NULL;
    int rc = 0;
    if (v && (rc = string_value(v, param, &desc, NULL, e)) < 0)
        return rc;
    snprintf(param, sizeof(param), "tools[%d].function.parameters", i);
    v = field(fn, "parameters");
    if (v && json_object_get_type(v) != json_type_object)
        return bad(e, param, "'%s' must be a JSON Schema object", param);
    return 0;
}

static int
parse_tool_choice(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    struct json_object *v = field(root, "tool_choice");
    r->tool_choice = r->n_tools > 0 ? FCGI_TOOL_CHOICE_AUTO : FCGI_TOOL_CHOICE_NONE;
    if (!v)
        return 0;
    if (json_object_get_type(v) == json_type_string) {
        const char *s = json_object_get_string(v);
        if (strcmp(s, "none") == 0)
            r->tool_choice = FCGI_TOOL_CHOICE_NONE;
        else if (strcmp(s, "auto") == 0)
            r->tool_choice = r->n_tools > 0 ? FCGI_TOOL_CHOICE_AUTO : FCGI_TOOL_CHOICE_NONE;
        else if (strcmp(s, "required") == 0)
            r->tool_choice = FCGI_TOOL_CHOICE_REQUIRED;
        else
            return bad(e, "tool_choice",
                       "'tool_choice' must be \"none\", \"auto\", \"required\" or a function");
    } else if (json_object_get_type(v) == json_type_object) {
        struct json_object *t = field(v, "type"), *fn = field(v, "function");
        struct json_object *name = fn ? field(fn, "name") : NULL;
        if (!t || json_object_get_type(t) != json_type_string ||
            strcmp(json_object_get_string(t), "function") != 0 || !name ||
            json_object_get_type(name) != json_type_string)
            return bad(e, "tool_choice",
                       "'tool_choice' must be {\"type\": \"function\", \"function\": {\"name\": "
                       "...}}");
        r->tool_choice = FCGI_TOOL_CHOICE_NAMED;
        r->tool_choice_name = json_object_get_string(name);
        bool found = false;
        for (int i = 0; i < r->n_tools && !found; i++)
            found = strcmp(r->tool_names[i], r->tool_choice_name) == 0;
        if (!found)
            return bad(e, "tool_choice",
                       "'tool_choice' names the function \"%.64s\" that is not "
                       "in 'tools'",
                       r->tool_choice_name);
    } else {
        return bad(e, "tool_choice", "'tool_choice' must be a string or an object");
    }
    if (r->tool_choice == FCGI_TOOL_CHOICE_REQUIRED && r->n_tools == 0)
        return bad(e, "tool_choice", "'tool_choice' \"required\" needs 'tools'");
    return 0;
}

static int
parse_tools(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    struct json_object *arr = field(root, "tools");
    int rc = 0;
    r->parallel_tool_calls = true;
    if ((rc = get_bool(root, "parallel_tool_calls", &r->parallel_tool_calls, e)) < 0)
        return rc;
    if (arr) {
        if (json_object_get_type(arr) != json_type_array)
            return bad(e, "tools", "'tools' must be an array");
        size_t n = json_object_array_length(arr);
        if (n > FCGI_REQ_MAX_TOOLS)
            return bad(e, "tools", "'tools' has more than %d entries", FCGI_REQ_MAX_TOOLS);
        if (n > 0) {
            r->tool_names = calloc(n, sizeof(*r->tool_names));
            if (!r->tool_names)
                return oom(e);
            for (size_t i = 0; i < n; i++) {
                if ((rc = tool_def(r, json_object_array_get_idx(arr, i), (int)i, e)) < 0)
                    return rc;
                r->n_tools++;
            }
            const char *js = json_object_to_json_string_ext(
                arr, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
            r->tools_json = js ? strdup(js) : NULL;
            if (!r->tools_json)
                return oom(e);
        }
    }
    return parse_tool_choice(r, root, e);
}

static int
parse_response_format(struct json_object *root, struct fcgi_req_error *e)
{
    struct json_object *v = field(root, "response_format");
    if (!v)
        return 0;
    struct json_object *t = json_object_get_type(v) == json_type_object ? field(v, "type") : NULL;
    if (t && json_object_get_type(t) == json_type_string &&
        strcmp(json_object_get_string(t), "text") == 0)
        return 0;
    return bad(e, "response_format",
               "'response_format' other than {\"type\": \"text\"} is not supported (no "
               "constrained decoding)");
}

static int
parse_misc(struct fcgi_req *r, struct json_object *root, struct fcgi_req_error *e)
{
    struct json_object *v = field(root, "model");
    int rc = 0;
    if (v && (rc = string_value(v, "model", &r->model, NULL, e)) < 0)
        return rc;
    if ((v = field(root, "guards"))) {
        if (json_object_get_type(v) != json_type_object)
            return bad(e, "guards", "'guards' must be an object");
        r->guards = v;
    }
    if ((v = field(root, "user")) && json_object_get_type(v) != json_type_string)
        return bad(e, "user", "'user' must be a string");
    return parse_response_format(root, e);
}

/* ---- Entry points ---- */

int
fcgi_req_parse(enum fcgi_req_kind kind, const char *body, size_t len, struct fcgi_req *out,
               struct fcgi_req_error *err)
{
    struct fcgi_req r;
    struct cm_wire_submit defaults;
    struct json_object *root = NULL;
    int rc = 0;

    memset(&r, 0, sizeof(r));
    cm_wire_submit_init(&defaults);
    r.kind = kind;
    r.sampling = defaults.sampling;
    if ((rc = parse_body(body, len, &root, err)) < 0)
        goto fail;
    r.root = root;
    if ((rc = parse_misc(&r, root, err)) < 0)
        goto fail;
    if (kind == FCGI_REQ_CHAT) {
        if ((rc = parse_messages(&r, root, err)) < 0 || (rc = parse_tools(&r, root, err)) < 0)
            goto fail;
    } else {
        if ((rc = parse_prompt(&r, root, err)) < 0)
            goto fail;
    }
    if ((rc = parse_limits(&r, root, err)) < 0 || (rc = parse_sampling(&r, root, err)) < 0 ||
        (rc = parse_logit_bias(&r, root, err)) < 0 || (rc = parse_stop(&r, root, err)) < 0 ||
        (rc = parse_logprobs(&r, root, err)) < 0 || (rc = parse_stream(&r, root, err)) < 0)
        goto fail;
    *out = r;
    return 0;
fail:
    fcgi_req_fini(&r);
    return rc;
}

void
fcgi_req_fini(struct fcgi_req *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->n_joined; i++)
        free(r->joined[i]);
    free(r->joined);
    free(r->msgs);
    free(r->calls);
    free(r->tools_json);
    free(r->tool_names);
    free(r->sampling.logit_bias);
    json_object_put(r->root);
    memset(r, 0, sizeof(*r));
}

bool
fcgi_req_parses_tools(const struct fcgi_req *r)
{
    return r->kind == FCGI_REQ_CHAT && r->n_tools > 0 && r->tool_choice != FCGI_TOOL_CHOICE_NONE;
}

uint32_t
fcgi_req_max_tokens(const struct fcgi_req *r, const struct fcgi_conf *conf, uint32_t n_ctx)
{
    uint32_t mt = r->max_tokens;
    if (mt == 0 && conf && conf->default_max_tokens > 0)
        mt = (uint32_t)conf->default_max_tokens;
    if (mt == 0)
        mt = n_ctx;
    if (mt == 0)
        mt = 1;
    return mt > CM_WIRE_MAX_VOCAB ? CM_WIRE_MAX_VOCAB : mt;
}

uint32_t
fcgi_req_deadline_ms(const struct fcgi_req *r, const struct fcgi_conf *conf)
{
    uint64_t ms = r->timeout_ms;
    if (ms == 0 && conf && conf->request_timeout_s > 0)
        ms = (uint64_t)conf->request_timeout_s * 1000u;
    return ms > CM_WIRE_MAX_DEADLINE_MS ? CM_WIRE_MAX_DEADLINE_MS : (uint32_t)ms;
}

void
fcgi_req_to_submit(const struct fcgi_req *r, const struct fcgi_conf *conf, uint32_t n_ctx,
                   struct cm_wire_submit *s)
{
    cm_wire_submit_init(s);
    s->max_tokens = fcgi_req_max_tokens(r, conf, n_ctx);
    s->sampling = r->sampling;
    s->logprobs = r->logprobs;
    s->top_logprobs = r->logprobs ? r->top_logprobs : 0;
    s->deadline_ms = fcgi_req_deadline_ms(r, conf);
    s->add_special = true;
    s->parse_special = true;
}

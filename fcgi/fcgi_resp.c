/*
 * fcgi_resp: OpenAI response JSON. See fcgi_resp.h.
 */
#include "fcgi/fcgi_resp.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <json-c/json.h>

#include "guards/guard_utf8.h"

/* ---- Ids ---- */

static const char alnum[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/* Fallback when getrandom fails (it should not on Linux >= 3.17): a per-thread splitmix64. */
static uint64_t
fallback_random(void)
{
    static _Thread_local uint64_t state;
    if (state == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        state = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ (uint64_t)(uintptr_t)&ts;
    }
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void
fcgi_resp_make_id(const char *prefix, char out[FCGI_RESP_ID_MAX])
{
    size_t p = strnlen(prefix, FCGI_RESP_ID_MAX - FCGI_RESP_ID_RANDOM - 1);
    memcpy(out, prefix, p);
    size_t k = 0;
    while (k < FCGI_RESP_ID_RANDOM) {
        unsigned char buf[64];
        ssize_t n = getrandom(buf, sizeof(buf), 0);
        if (n <= 0) {
            uint64_t r = fallback_random();
            memcpy(buf, &r, sizeof(r));
            n = sizeof(r);
        }
        /* 62 * 4 = 248: rejecting bytes >= 248 keeps the characters uniform */
        for (ssize_t i = 0; i < n && k < FCGI_RESP_ID_RANDOM; i++)
            if (buf[i] < 248)
                out[p + k++] = alnum[buf[i] % 62];
    }
    out[p + k] = 0;
}

const char *
fcgi_resp_id_prefix(enum fcgi_req_kind kind)
{
    return kind == FCGI_REQ_CHAT ? "chatcmpl-" : "cmpl-";
}

/* ---- finish_reason ---- */

void
fcgi_resp_finish_of(const struct fcgi_resp_cut *c, struct fcgi_resp_finish *out)
{
    memset(out, 0, sizeof(*out));
    out->finish_reason = "length";
    if (c->guard && c->guard_tool_loop) {
        out->stop_reason = c->guard;
        out->tool_loop_capped = true;
        return;
    }
    if (c->n_tool_calls > 0) {
        out->finish_reason = "tool_calls";
        return;
    }
    if (c->stop_string) {
        out->finish_reason = "stop";
        out->stop_reason = "stop_string";
        return;
    }
    if (c->guard) {
        out->stop_reason = c->guard;
        return;
    }
    if (c->error) {
        out->stop_reason = "error";
        return;
    }
    if (c->client_gone) {
        out->stop_reason = CM_WIRE_CANCEL_CLIENT_DISCONNECT;
        return;
    }
    if (!c->have_done) {
        out->stop_reason = "error";
        return;
    }
    switch (c->done_finish) {
    case CM_WIRE_FINISH_EOS:
    case CM_WIRE_FINISH_STOP_TOKEN:
        out->finish_reason = "stop";
        break;
    case CM_WIRE_FINISH_LENGTH:
        break;
    case CM_WIRE_FINISH_DEADLINE:
        out->stop_reason = "deadline";
        break;
    case CM_WIRE_FINISH_CANCELLED:
        out->stop_reason = c->done_guard && c->done_guard[0] ? c->done_guard : "cancelled";
        break;
    case CM_WIRE_FINISH_ERROR:
    default:
        out->stop_reason = "error";
        break;
    }
}

/* ---- Small builders ---- */

/* A float written with the fewest digits that read back as the same float; -inf (a token the
 * sampler had excluded) as -9999.0, OpenAI's stand-in, since JSON has no infinities. */
static struct json_object *
jfloat(float f)
{
    if (!isfinite(f))
        f = -9999.0f;
    char buf[32];
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, sizeof(buf), "%.*g", prec, (double)f);
        if ((float)strtod(buf, NULL) == f)
            break;
    }
    return json_object_new_double_s((double)f, buf);
}

static struct json_object *
jstr(const char *s, size_t len)
{
    return json_object_new_string_len(s ? s : "", (int)(s ? len : 0));
}

static void
add_finish(struct json_object *choice, const struct fcgi_resp_finish *fin)
{
    json_object_object_add(choice, "finish_reason",
                           fin ? json_object_new_string(fin->finish_reason) : NULL);
    if (fin && fin->stop_reason)
        json_object_object_add(choice, "stop_reason", json_object_new_string(fin->stop_reason));
    if (fin && fin->tool_loop_capped)
        json_object_object_add(choice, "tool_loop_capped", json_object_new_boolean(true));
}

static struct json_object *
envelope(const struct fcgi_resp_meta *m, const char *object)
{
    struct json_object *o = json_object_new_object();
    if (!o)
        return NULL;
    json_object_object_add(o, "id", json_object_new_string(m->id ? m->id : ""));
    json_object_object_add(o, "object", json_object_new_string(object));
    json_object_object_add(o, "created", json_object_new_int64(m->created));
    json_object_object_add(o, "model", json_object_new_string(m->model ? m->model : ""));
    if (m->fingerprint)
        json_object_object_add(o, "system_fingerprint", json_object_new_string(m->fingerprint));
    return o;
}

static struct json_object *
one_choice(struct json_object *o, struct json_object *choice)
{
    struct json_object *arr = json_object_new_array();
    json_object_array_add(arr, choice);
    json_object_object_add(o, "choices", arr);
    return o;
}

/* ---- Usage ---- */

struct json_object *
fcgi_resp_usage_json(const struct fcgi_resp_usage *u)
{
    struct json_object *o = json_object_new_object();
    if (!o)
        return NULL;
    json_object_object_add(o, "prompt_tokens", json_object_new_int64(u->prompt_tokens));
    json_object_object_add(o, "completion_tokens", json_object_new_int64(u->completion_tokens));
    json_object_object_add(
        o, "total_tokens",
        json_object_new_int64((int64_t)u->prompt_tokens + (int64_t)u->completion_tokens));
    struct json_object *d = json_object_new_object();
    json_object_object_add(d, "cached_tokens", json_object_new_int64(u->cached_tokens));
    json_object_object_add(o, "prompt_tokens_details", d);
    return o;
}

/* ---- Logprobs ---- */

void
fcgi_resp_logprobs_init(struct fcgi_resp_logprobs *lp, enum fcgi_req_kind kind, int top)
{
    memset(lp, 0, sizeof(*lp));
    lp->kind = kind;
    lp->top = top < 0 ? 0 : top > CM_WIRE_MAX_TOP_LOGPROBS ? CM_WIRE_MAX_TOP_LOGPROBS : top;
}

static void
lp_reset(struct fcgi_resp_logprobs *lp)
{
    json_object_put(lp->content);
    json_object_put(lp->tokens);
    json_object_put(lp->token_logprobs);
    json_object_put(lp->top_logprobs);
    json_object_put(lp->text_offset);
    lp->content = lp->tokens = lp->token_logprobs = lp->top_logprobs = lp->text_offset = NULL;
    lp->n = 0;
}

void
fcgi_resp_logprobs_fini(struct fcgi_resp_logprobs *lp)
{
    lp_reset(lp);
}

/* The token's text as a JSON string (ill-formed UTF-8 -> U+FFFD). */
static struct json_object *
token_string(const char *bytes, size_t n)
{
    struct guard_utf8 u;
    char *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    struct json_object *s = NULL;
    guard_utf8_init(&u);
    if (guard_utf8_feed(&u, bytes, n, &a, &na) < 0 || guard_utf8_flush(&u, &b, &nb) < 0)
        goto out;
    char *joined = malloc(na + nb + 1);
    if (!joined)
        goto out;
    memcpy(joined, a, na);
    memcpy(joined + na, b, nb);
    s = json_object_new_string_len(joined, (int)(na + nb));
    free(joined);
out:
    free(a);
    free(b);
    return s;
}

static struct json_object *
token_bytes(const char *bytes, size_t n)
{
    struct json_object *arr = json_object_new_array_ext((int)n);
    for (size_t i = 0; i < n; i++)
        json_object_array_add(arr, json_object_new_int((unsigned char)bytes[i]));
    return arr;
}

static void
alt_token(const struct cm_wire_token *t, uint32_t k, struct json_object **tok,
          struct json_object **bytes)
{
    if (t->top_ids[k] == t->id) {
        *tok = token_string(t->text, t->text_len);
        *bytes = token_bytes(t->text, t->text_len);
    } else if (t->flags & CM_WIRE_TOKEN_TOP_TEXT) {
        *tok = token_string(t->top_text + t->top_off[k], t->top_len[k]);
        *bytes = token_bytes(t->top_text + t->top_off[k], t->top_len[k]);
    } else {
        char buf[32];
        snprintf(buf, sizeof(buf), "token_id:%d", t->top_ids[k]);
        *tok = json_object_new_string(buf);
        *bytes = NULL;
    }
}

static int
lp_add_chat(struct fcgi_resp_logprobs *lp, const struct cm_wire_token *t)
{
    if (!lp->content && !(lp->content = json_object_new_array()))
        return -ENOMEM;
    struct json_object *e = json_object_new_object();
    if (!e)
        return -ENOMEM;
    json_object_object_add(e, "token", token_string(t->text, t->text_len));
    json_object_object_add(e, "logprob", jfloat(t->logprob));
    json_object_object_add(e, "bytes", token_bytes(t->text, t->text_len));
    struct json_object *tops = json_object_new_array();
    uint32_t n_top = t->n_top < (uint32_t)lp->top ? t->n_top : (uint32_t)lp->top;
    for (uint32_t k = 0; k < n_top; k++) {
        struct json_object *a = json_object_new_object(), *tok = NULL, *bytes = NULL;
        alt_token(t, k, &tok, &bytes);
        json_object_object_add(a, "token", tok);
        json_object_object_add(a, "logprob", jfloat(t->top_logprobs[k]));
        json_object_object_add(a, "bytes", bytes);
        json_object_array_add(tops, a);
    }
    json_object_object_add(e, "top_logprobs", tops);
    json_object_array_add(lp->content, e);
    return 0;
}

static int
lp_add_completion(struct fcgi_resp_logprobs *lp, const struct cm_wire_token *t)
{
    if (!lp->tokens) {
        lp->tokens = json_object_new_array();
        lp->token_logprobs = json_object_new_array();
        lp->top_logprobs = json_object_new_array();
        lp->text_offset = json_object_new_array();
        if (!lp->tokens || !lp->token_logprobs || !lp->top_logprobs || !lp->text_offset)
            return -ENOMEM;
    }
    json_object_array_add(lp->tokens, token_string(t->text, t->text_len));
    json_object_array_add(lp->token_logprobs, jfloat(t->logprob));
    struct json_object *tops = NULL;
    if (lp->top > 0) {
        tops = json_object_new_object();
        uint32_t n_top = t->n_top < (uint32_t)lp->top ? t->n_top : (uint32_t)lp->top;
        for (uint32_t k = 0; k < n_top; k++) {
            struct json_object *tok = NULL, *bytes = NULL;
            alt_token(t, k, &tok, &bytes);
            json_object_object_add(tops, json_object_get_string(tok), jfloat(t->top_logprobs[k]));
            json_object_put(tok);
            json_object_put(bytes);
        }
    }
    json_object_array_add(lp->top_logprobs, tops);
    json_object_array_add(lp->text_offset, json_object_new_int64((int64_t)lp->offset));
    lp->offset += t->text_len;
    return 0;
}

int
fcgi_resp_logprobs_add(struct fcgi_resp_logprobs *lp, const struct cm_wire_token *t)
{
    if (!(t->flags & CM_WIRE_TOKEN_LOGPROB))
        return 0;
    int rc = lp->kind == FCGI_REQ_CHAT ? lp_add_chat(lp, t) : lp_add_completion(lp, t);
    if (rc == 0)
        lp->n++;
    return rc;
}

struct json_object *
fcgi_resp_logprobs_take(struct fcgi_resp_logprobs *lp)
{
    if (lp->n == 0)
        return NULL;
    struct json_object *o = json_object_new_object();
    if (!o)
        return NULL;
    if (lp->kind == FCGI_REQ_CHAT) {
        json_object_object_add(o, "content", lp->content);
        lp->content = NULL;
    } else {
        json_object_object_add(o, "tokens", lp->tokens);
        json_object_object_add(o, "token_logprobs", lp->token_logprobs);
        json_object_object_add(o, "top_logprobs", lp->top_logprobs);
        json_object_object_add(o, "text_offset", lp->text_offset);
        lp->tokens = lp->token_logprobs = lp->top_logprobs = lp->text_offset = NULL;
    }
    lp_reset(lp);
    return o;
}

/* ---- Deltas and chunks ---- */

struct json_object *
fcgi_resp_delta_role(void)
{
    struct json_object *d = json_object_new_object();
    if (!d)
        return NULL;
    json_object_object_add(d, "role", json_object_new_string("assistant"));
    json_object_object_add(d, "content", json_object_new_string(""));
    return d;
}

struct json_object *
fcgi_resp_delta_content(const char *text, size_t len)
{
    struct json_object *d = json_object_new_object();
    if (!d)
        return NULL;
    json_object_object_add(d, "content", jstr(text, len));
    return d;
}

static struct json_object *
call_delta(int index, const char *id, const char *name, const char *args, size_t args_len)
{
    struct json_object *d = json_object_new_object();
    if (!d)
        return NULL;
    struct json_object *c = json_object_new_object();
    json_object_object_add(c, "index", json_object_new_int(index));
    if (id) {
        json_object_object_add(c, "id", json_object_new_string(id));
        json_object_object_add(c, "type", json_object_new_string("function"));
    }
    struct json_object *fn = json_object_new_object();
    if (name)
        json_object_object_add(fn, "name", json_object_new_string(name));
    json_object_object_add(fn, "arguments", jstr(args, args_len));
    json_object_object_add(c, "function", fn);
    struct json_object *arr = json_object_new_array();
    json_object_array_add(arr, c);
    json_object_object_add(d, "tool_calls", arr);
    return d;
}

struct json_object *
fcgi_resp_delta_call_head(int index, const char *id, const char *name)
{
    return call_delta(index, id, name, "", 0);
}

struct json_object *
fcgi_resp_delta_call_args(int index, const char *text, size_t len)
{
    return call_delta(index, NULL, NULL, text, len);
}

struct json_object *
fcgi_resp_chat_chunk(const struct fcgi_resp_meta *m, struct json_object *delta,
                     struct json_object *logprobs, const struct fcgi_resp_finish *fin)
{
    struct json_object *o = envelope(m, "chat.completion.chunk");
    struct json_object *choice = json_object_new_object();
    if (!o || !choice) {
        json_object_put(o);
        json_object_put(choice);
        json_object_put(delta);
        json_object_put(logprobs);
        return NULL;
    }
    json_object_object_add(choice, "index", json_object_new_int(0));
    json_object_object_add(choice, "delta", delta ? delta : json_object_new_object());
    json_object_object_add(choice, "logprobs", logprobs);
    add_finish(choice, fin);
    return one_choice(o, choice);
}

struct json_object *
fcgi_resp_text_chunk(const struct fcgi_resp_meta *m, const char *text, size_t len,
                     struct json_object *logprobs, const struct fcgi_resp_finish *fin)
{
    struct json_object *o = envelope(m, "text_completion");
    struct json_object *choice = json_object_new_object();
    if (!o || !choice) {
        json_object_put(o);
        json_object_put(choice);
        json_object_put(logprobs);
        return NULL;
    }
    json_object_object_add(choice, "index", json_object_new_int(0));
    json_object_object_add(choice, "text", jstr(text, len));
    json_object_object_add(choice, "logprobs", logprobs);
    add_finish(choice, fin);
    return one_choice(o, choice);
}

struct json_object *
fcgi_resp_usage_chunk(const struct fcgi_resp_meta *m, const struct fcgi_resp_usage *u)
{
    struct json_object *o =
        envelope(m, m->kind == FCGI_REQ_CHAT ? "chat.completion.chunk" : "text_completion");
    if (!o)
        return NULL;
    json_object_object_add(o, "choices", json_object_new_array());
    json_object_object_add(o, "usage", fcgi_resp_usage_json(u));
    return o;
}

/* ---- Whole responses ---- */

struct json_object *
fcgi_resp_chat_completion(const struct fcgi_resp_meta *m, const char *content, size_t len,
                          const struct fcgi_resp_call *calls, int n_calls,
                          struct json_object *logprobs, const struct fcgi_resp_finish *fin,
                          const struct fcgi_resp_usage *u)
{
    struct json_object *o = envelope(m, "chat.completion");
    struct json_object *choice = json_object_new_object();
    struct json_object *msg = json_object_new_object();
    if (!o || !choice || !msg) {
        json_object_put(o);
        json_object_put(choice);
        json_object_put(msg);
        json_object_put(logprobs);
        return NULL;
    }
    json_object_object_add(msg, "role", json_object_new_string("assistant"));
    bool null_content = content == NULL || (len == 0 && n_calls > 0);
    json_object_object_add(msg, "content", null_content ? NULL : jstr(content, len));
    json_object_object_add(msg, "refusal", NULL);
    if (n_calls > 0) {
        struct json_object *arr = json_object_new_array();
        for (int i = 0; i < n_calls; i++) {
            struct json_object *c = json_object_new_object(), *fn = json_object_new_object();
            json_object_object_add(c, "id", json_object_new_string(calls[i].id));
            json_object_object_add(c, "type", json_object_new_string("function"));
            json_object_object_add(fn, "name", json_object_new_string(calls[i].name));
            json_object_object_add(
                fn, "arguments",
                json_object_new_string(calls[i].arguments ? calls[i].arguments : "{}"));
            json_object_object_add(c, "function", fn);
            json_object_array_add(arr, c);
        }
        json_object_object_add(msg, "tool_calls", arr);
    }
    json_object_object_add(choice, "index", json_object_new_int(0));
    json_object_object_add(choice, "message", msg);
    json_object_object_add(choice, "logprobs", logprobs);
    add_finish(choice, fin);
    one_choice(o, choice);
    json_object_object_add(o, "usage", fcgi_resp_usage_json(u));
    return o;
}

struct json_object *
fcgi_resp_text_completion(const struct fcgi_resp_meta *m, const char *text, size_t len,
                          struct json_object *logprobs, const struct fcgi_resp_finish *fin,
                          const struct fcgi_resp_usage *u)
{
    struct json_object *o = fcgi_resp_text_chunk(m, text, len, logprobs, fin);
    if (!o)
        return NULL;
    json_object_object_add(o, "usage", fcgi_resp_usage_json(u));
    return o;
}

/* ---- Errors ---- */

const char *
fcgi_resp_error_type(int status)
{
    switch (status) {
    case 400:
    case 405:
    case 413:
        return "invalid_request_error";
    case 401:
        return "authentication_error";
    case 404:
        return "not_found_error";
    case 429:
        return "rate_limit_exceeded";
    default:
        return "server_error";
    }
}

struct json_object *
fcgi_resp_error(const char *type, const char *message, const char *param, const char *code)
{
    struct json_object *e = json_object_new_object();
    struct json_object *top = json_object_new_object();
    if (!e || !top) {
        json_object_put(e);
        json_object_put(top);
        return NULL;
    }
    json_object_object_add(e, "message", json_object_new_string(message ? message : ""));
    json_object_object_add(e, "type", json_object_new_string(type ? type : "server_error"));
    json_object_object_add(e, "param", param && param[0] ? json_object_new_string(param) : NULL);
    json_object_object_add(e, "code", code && code[0] ? json_object_new_string(code) : NULL);
    json_object_object_add(top, "error", e);
    return top;
}

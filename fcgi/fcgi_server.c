/*
 * fcgi_server: routing, API keys, CORS preflight and the small endpoints (see fcgi_server.h). The
 * generation endpoints are fcgi_gen's; everything here is cheap and never holds a lock.
 */
#include "fcgi/fcgi_server.h"

#include <ctype.h>
#include <errno.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "common/cm_log.h"
#include "common/cm_util.h"
#include "common/cm_wire.h"
#include "fcgi/fcgi.h"
#include "fcgi/fcgi_engine.h"
#include "fcgi/fcgi_gen.h"
#include "fcgi/fcgi_http.h"

/* ---- Request path ---- */

int
fcgi_server_request_path(const struct fcgi_conf *conf, const char *request_uri,
                         const char *script_name, const char *path_info, char **out)
{
    char *p = NULL;
    if (request_uri && request_uri[0]) {
        size_t n = strcspn(request_uri, "?#");
        p = cm_xmalloc(n + 1);
        memcpy(p, request_uri, n);
        p[n] = 0;
    } else {
        const char *a = script_name ? script_name : "";
        const char *b = path_info ? path_info : "";
        size_t na = strlen(a), nb = strlen(b);
        p = cm_xmalloc(na + nb + 1);
        memcpy(p, a, na);
        memcpy(p + na, b, nb + 1);
    }
    const char *base = conf ? conf->base_path : NULL;
    size_t nbase = base ? strlen(base) : 0;
    if (nbase > 0 && strncmp(p, base, nbase) == 0 && (p[nbase] == '/' || p[nbase] == 0))
        memmove(p, p + nbase, strlen(p + nbase) + 1);
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/')
        p[--n] = 0;
    if (n == 0 || p[0] != '/') {
        char *q = cm_xmalloc(n + 2);
        q[0] = '/';
        memcpy(q + 1, p, n + 1);
        free(p);
        p = q;
    }
    *out = p;
    return 0;
}

/* ---- API keys ---- */

/* Compares the given key with every configured key over each configured key's full length, so
 * the time depends on the configured key lengths and the number of keys only. */
static bool
key_matches(const struct fcgi_conf *conf, const unsigned char *given, size_t glen)
{
    unsigned ok = 0;
    for (int k = 0; k < conf->n_api_keys; k++) {
        const unsigned char *key = (const unsigned char *)conf->api_keys[k];
        size_t klen = strlen((const char *)key);
        volatile unsigned diff = klen != glen;
        for (size_t i = 0; i < klen; i++) {
            unsigned char g = i < glen ? given[i] : 0;
            diff |= (unsigned)(key[i] ^ g);
        }
        ok |= diff == 0;
    }
    return ok != 0;
}

bool
fcgi_server_key_ok(const struct fcgi_conf *conf, const char *authorization)
{
    if (conf->n_api_keys == 0)
        return true;
    if (!authorization)
        return false;
    const char *s = authorization;
    while (*s == ' ' || *s == '\t')
        s++;
    if (strncasecmp(s, "Bearer", 6) != 0 || (s[6] != ' ' && s[6] != '\t'))
        return false;
    s += 6;
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    if (n == 0)
        return false;
    return key_matches(conf, (const unsigned char *)s, n);
}

/* ---- Small responses ---- */

static int
send_error_with(struct fcgi_http *h, int status, const char *type, const char *message,
                const char *code, const char *extra_headers)
{
    struct json_object *err = json_object_new_object();
    json_object_object_add(err, "message", json_object_new_string(message));
    json_object_object_add(err, "type", json_object_new_string(type));
    json_object_object_add(err, "param", NULL);
    json_object_object_add(err, "code", code ? json_object_new_string(code) : NULL);
    struct json_object *top = json_object_new_object();
    json_object_object_add(top, "error", err);
    int rc = fcgi_http_begin(h, status, "application/json", false, extra_headers);
    if (rc == 0) {
        size_t n = 0;
        const char *s = json_object_to_json_string_length(top, JSON_C_TO_STRING_PLAIN, &n);
        rc = fcgi_http_write(h, s, n);
    }
    if (rc == 0)
        rc = fcgi_http_write(h, "\n", 1);
    if (rc == 0)
        rc = fcgi_http_flush(h);
    json_object_put(top);
    return rc;
}

static int
engine_down(struct fcgi_ctx *ctx, struct fcgi_http *h)
{
    atomic_fetch_add(&ctx->counters.engine_unavailable, 1);
    return fcgi_http_send_error(h, 503, "server_error",
                                "The inference engine is unavailable; retry later.", NULL, NULL,
                                fcgi_engine_retry_after_s(ctx->engine));
}

/* ---- /health ---- */

static int
handle_health(struct fcgi_ctx *ctx, struct fcgi_http *h)
{
    char *stats = NULL;
    int rc = fcgi_engine_stats(ctx->engine, &stats);
    free(stats);
    if (rc < 0)
        return engine_down(ctx, h);
    struct json_object *o = json_object_new_object();
    json_object_object_add(o, "status", json_object_new_string("ok"));
    rc = fcgi_http_send_json(h, 200, o);
    json_object_put(o);
    return rc;
}

/* ---- /v1/models ---- */

/* The id served: --model-name, else the engine's model (connecting once if never seen). Returns 0,
 * or -EHOSTDOWN. */
static int
served_model(struct fcgi_ctx *ctx, char *buf, size_t len)
{
    if (ctx->conf.model_name) {
        snprintf(buf, len, "%s", ctx->conf.model_name);
        return 0;
    }
    struct cm_wire_model_info mi;
    int rc = fcgi_engine_model_info(ctx->engine, &mi);
    if (rc == -EAGAIN) {
        struct fcgi_engine_conn *c = NULL;
        if (fcgi_engine_connect(ctx->engine, &c) == 0)
            fcgi_engine_conn_close(c);
        rc = fcgi_engine_model_info(ctx->engine, &mi);
    }
    if (rc < 0)
        return -EHOSTDOWN;
    snprintf(buf, len, "%s", mi.model);
    cm_wire_model_info_fini(&mi);
    return 0;
}

static int64_t
created_time(void)
{
    static _Atomic int64_t first;
    int64_t expected = 0, now = (int64_t)time(NULL);
    if (atomic_compare_exchange_strong(&first, &expected, now))
        return now;
    return expected;
}

static struct json_object *
model_object(const char *id)
{
    struct json_object *m = json_object_new_object();
    json_object_object_add(m, "id", json_object_new_string(id));
    json_object_object_add(m, "object", json_object_new_string("model"));
    json_object_object_add(m, "created", json_object_new_int64(created_time()));
    json_object_object_add(m, "owned_by", json_object_new_string("llm-fcgi"));
    return m;
}

/* Decodes %XX escapes in place; returns -EINVAL for a bad escape or a decoded NUL. */
static int
percent_decode(char *s)
{
    char *w = s;
    for (const char *r = s; *r; r++) {
        if (*r != '%') {
            *w++ = *r;
            continue;
        }
        if (!isxdigit((unsigned char)r[1]) || !isxdigit((unsigned char)r[2]))
            return -EINVAL;
        char hex[3] = {r[1], r[2], 0};
        long v = strtol(hex, NULL, 16);
        if (v == 0)
            return -EINVAL;
        *w++ = (char)v;
        r += 2;
    }
    *w = 0;
    return 0;
}

static int
handle_models(struct fcgi_ctx *ctx, struct fcgi_http *h, const char *want)
{
    char id[CM_WIRE_MAX_MODEL_ID + 1];
    if (served_model(ctx, id, sizeof(id)) < 0)
        return engine_down(ctx, h);
    int rc;
    if (want) {
        char *w = cm_xstrdup(want);
        bool match = percent_decode(w) == 0 && (strcmp(w, id) == 0 || ctx->conf.any_model_name);
        if (!match) {
            free(w);
            return fcgi_http_send_error(h, 404, "not_found_error", "The model does not exist.",
                                        "model", "model_not_found", 0);
        }
        struct json_object *m = model_object(strcmp(w, id) == 0 ? id : w);
        free(w);
        rc = fcgi_http_send_json(h, 200, m);
        json_object_put(m);
        return rc;
    }
    struct json_object *list = json_object_new_object();
    struct json_object *data = json_object_new_array();
    json_object_array_add(data, model_object(id));
    json_object_object_add(list, "object", json_object_new_string("list"));
    json_object_object_add(list, "data", data);
    rc = fcgi_http_send_json(h, 200, list);
    json_object_put(list);
    return rc;
}

/* ---- /metrics ---- */

static const char *const engine_gauges[] = {
    "running",     "queued",   "paused",        "kv_blocks_used",   "kv_blocks_total",
    "connections", "uptime_s", "spill_on_disk", "spill_disk_bytes",
};

static bool
is_gauge(const char *key)
{
    for (size_t i = 0; i < sizeof(engine_gauges) / sizeof(engine_gauges[0]); i++) {
        if (strcmp(engine_gauges[i], key) == 0)
            return true;
    }
    return false;
}

/* A Prometheus metric name part: [a-zA-Z0-9_], anything else becomes '_'. */
static void
metric_name(char *out, size_t len, const char *prefix, const char *key, const char *suffix)
{
    snprintf(out, len, "%s%s%s", prefix, key, suffix);
    for (char *p = out + strlen(prefix); *p; p++) {
        if (!isalnum((unsigned char)*p) && *p != '_')
            *p = '_';
    }
}

static void
label_value(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            fprintf(f, "\\%c", *s);
        else if (*s == '\n')
            fputs("\\n", f);
        else
            fputc(*s, f);
    }
}

static void
print_number(FILE *f, struct json_object *v)
{
    if (json_object_is_type(v, json_type_int))
        fprintf(f, "%lld", (long long)json_object_get_int64(v));
    else
        fprintf(f, "%.17g", json_object_get_double(v));
}

static bool
is_number(struct json_object *v)
{
    return json_object_is_type(v, json_type_int) || json_object_is_type(v, json_type_double);
}

/* {"count": n, "sum": s, "buckets": [[le, cumulative], ..., ["+Inf", n]]} */
static void
emit_histogram(FILE *f, const char *key, struct json_object *h)
{
    char name[160];
    metric_name(name, sizeof(name), "llm_engine_", key, "");
    struct json_object *buckets = json_object_object_get(h, "buckets");
    fprintf(f, "# HELP %s llm-engine histogram %s\n# TYPE %s histogram\n", name, key, name);
    size_t n = json_object_array_length(buckets);
    for (size_t i = 0; i < n; i++) {
        struct json_object *pair = json_object_array_get_idx(buckets, i);
        struct json_object *le = json_object_array_get_idx(pair, 0);
        struct json_object *cum = json_object_array_get_idx(pair, 1);
        if (!le || !is_number(cum))
            continue;
        fprintf(f, "%s_bucket{le=\"", name);
        if (json_object_is_type(le, json_type_string))
            label_value(f, json_object_get_string(le));
        else
            fprintf(f, "%g", json_object_get_double(le));
        fputs("\"} ", f);
        print_number(f, cum);
        fputc('\n', f);
    }
    struct json_object *sum = json_object_object_get(h, "sum");
    struct json_object *count = json_object_object_get(h, "count");
    if (is_number(sum)) {
        fprintf(f, "%s_sum ", name);
        print_number(f, sum);
        fputc('\n', f);
    }
    if (is_number(count)) {
        fprintf(f, "%s_count ", name);
        print_number(f, count);
        fputc('\n', f);
    }
}

/* {"eos": 3, "length": 1} -> llm_engine_<key>_total{reason="eos"} 3; the engine's "guard_trips"
 * object is GUARDS.md's llm_guard_trips_total{guard="name_run_cap"} 1. */
static void
emit_labelled(FILE *f, const char *key, struct json_object *o)
{
    char name[160];
    bool guards = strcmp(key, "guard_trips") == 0;
    const char *label = guards ? "guard" : "reason";
    if (guards)
        snprintf(name, sizeof(name), "llm_guard_trips_total");
    else
        metric_name(name, sizeof(name), "llm_engine_", key, "_total");
    fprintf(f, "# HELP %s llm-engine %s by %s\n# TYPE %s counter\n", name, key, label, name);
    json_object_object_foreach(o, k, v)
    {
        if (!is_number(v))
            continue;
        fprintf(f, "%s{%s=\"", name, label);
        label_value(f, k);
        fputs("\"} ", f);
        print_number(f, v);
        fputc('\n', f);
    }
}

static void
emit_engine(FILE *f, struct json_object *stats)
{
    json_object_object_foreach(stats, key, v)
    {
        char name[160];
        if (is_number(v)) {
            bool gauge = is_gauge(key);
            metric_name(name, sizeof(name), "llm_engine_", key, gauge ? "" : "_total");
            fprintf(f, "# HELP %s llm-engine %s\n# TYPE %s %s\n%s ", name, key, name,
                    gauge ? "gauge" : "counter", name);
            print_number(f, v);
            fputc('\n', f);
        } else if (json_object_is_type(v, json_type_object)) {
            if (json_object_is_type(json_object_object_get(v, "buckets"), json_type_array))
                emit_histogram(f, key, v);
            else
                emit_labelled(f, key, v);
        }
    }
}

static void
emit_counter(FILE *f, const char *name, const char *help, _Atomic uint64_t *v)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name,
            (unsigned long long)atomic_load(v));
}

static void
emit_worker(FILE *f, struct fcgi_counters *c)
{
    emit_counter(f, "llm_fcgi_requests_total", "requests handled by this worker process",
                 &c->requests);
    fprintf(f, "# HELP llm_fcgi_responses_total responses by status class\n"
               "# TYPE llm_fcgi_responses_total counter\n");
    fprintf(f, "llm_fcgi_responses_total{class=\"2xx\"} %llu\n",
            (unsigned long long)atomic_load(&c->responses_2xx));
    fprintf(f, "llm_fcgi_responses_total{class=\"4xx\"} %llu\n",
            (unsigned long long)atomic_load(&c->responses_4xx));
    fprintf(f, "llm_fcgi_responses_total{class=\"5xx\"} %llu\n",
            (unsigned long long)atomic_load(&c->responses_5xx));
    emit_counter(f, "llm_fcgi_client_disconnects_total",
                 "generations cancelled because the client left", &c->client_disconnects);
    emit_counter(f, "llm_fcgi_engine_unavailable_total",
                 "503 responses because the engine could not be reached", &c->engine_unavailable);
    emit_counter(f, "llm_fcgi_tool_calls_total", "valid tool calls sent to clients",
                 &c->tool_calls);
    emit_counter(f, "llm_fcgi_tool_calls_invalid_total", "tool-call blocks dropped as invalid",
                 &c->tool_calls_invalid);
    emit_counter(f, "llm_fcgi_stop_string_matches_total", "generations ended by a stop string",
                 &c->stop_string_matches);
    fprintf(f,
            "# HELP llm_fcgi_active_requests requests in progress in this worker process\n"
            "# TYPE llm_fcgi_active_requests gauge\nllm_fcgi_active_requests %llu\n",
            (unsigned long long)atomic_load(&c->active_requests));
}

int
fcgi_server_metrics_text(struct fcgi_ctx *ctx, const char *stats_json, char **out)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f)
        return -ENOMEM;
    struct json_object *stats = stats_json ? json_tokener_parse(stats_json) : NULL;
    bool up = stats && json_object_is_type(stats, json_type_object);
    fprintf(f,
            "# HELP llm_engine_up whether the engine answered STATS\n"
            "# TYPE llm_engine_up gauge\nllm_engine_up %d\n",
            up ? 1 : 0);
    if (up)
        emit_engine(f, stats);
    json_object_put(stats);
    emit_worker(f, &ctx->counters);
    if (fclose(f) != 0 || !buf) {
        free(buf);
        return -ENOMEM;
    }
    *out = buf;
    return 0;
}

static int
handle_metrics(struct fcgi_ctx *ctx, struct fcgi_http *h)
{
    char *stats = NULL, *text = NULL;
    if (fcgi_engine_stats(ctx->engine, &stats) < 0)
        stats = NULL;
    int rc = fcgi_server_metrics_text(ctx, stats, &text);
    free(stats);
    if (rc < 0)
        return fcgi_http_send_error(h, 500, "server_error", "out of memory", NULL, NULL, 0);
    rc = fcgi_http_begin(h, 200, "text/plain; version=0.0.4; charset=utf-8", false, NULL);
    if (rc == 0)
        rc = fcgi_http_write(h, text, strlen(text));
    if (rc == 0)
        rc = fcgi_http_flush(h);
    free(text);
    return rc;
}

/* ---- Routing ---- */

enum route_id {
    ROUTE_NONE = 0,
    ROUTE_HEALTH,
    ROUTE_METRICS,
    ROUTE_MODELS,
    ROUTE_MODEL,
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
};

static enum route_id
route_of(const char *path)
{
    if (!strcmp(path, "/health"))
        return ROUTE_HEALTH;
    if (!strcmp(path, "/metrics"))
        return ROUTE_METRICS;
    if (!strcmp(path, "/v1/models"))
        return ROUTE_MODELS;
    if (!strncmp(path, "/v1/models/", 11) && path[11])
        return ROUTE_MODEL;
    if (!strcmp(path, "/v1/chat/completions"))
        return ROUTE_CHAT;
    if (!strcmp(path, "/v1/completions"))
        return ROUTE_COMPLETIONS;
    return ROUTE_NONE;
}

static bool
route_is_post(enum route_id r)
{
    return r == ROUTE_CHAT || r == ROUTE_COMPLETIONS;
}

static int
dispatch(struct fcgi_ctx *ctx, struct fcgi_http *h)
{
    const char *method = h->method ? h->method : "";
    const char *path = h->path ? h->path : "/";
    enum route_id r = route_of(path);
    if (!strcmp(method, "OPTIONS") && ctx->conf.cors_origin) {
        int rc = fcgi_http_begin(h, 204, NULL, false, "Access-Control-Max-Age: 86400\r\n");
        return rc < 0 ? rc : fcgi_http_flush(h);
    }
    bool open = r == ROUTE_HEALTH;
    if (!open && !fcgi_server_key_ok(&ctx->conf, h->authorization))
        return fcgi_http_send_error(h, 401, "authentication_error",
                                    "Missing or incorrect API key in the Authorization header "
                                    "(expected: Bearer KEY).",
                                    NULL, "invalid_api_key", 0);
    if (r == ROUTE_NONE)
        return fcgi_http_send_error(h, 404, "not_found_error", "Unknown path.", NULL, NULL, 0);
    bool ok = route_is_post(r) ? !strcmp(method, "POST")
                               : (!strcmp(method, "GET") || !strcmp(method, "HEAD"));
    if (!ok) {
        const char *allow = route_is_post(r) ? "Allow: POST\r\n" : "Allow: GET, HEAD\r\n";
        if (ctx->conf.cors_origin)
            allow = route_is_post(r) ? "Allow: POST, OPTIONS\r\n" : "Allow: GET, HEAD, OPTIONS\r\n";
        return send_error_with(h, 405, "invalid_request_error", "Method not allowed for this path.",
                               NULL, allow);
    }
    switch (r) {
    case ROUTE_HEALTH:
        return handle_health(ctx, h);
    case ROUTE_METRICS:
        return handle_metrics(ctx, h);
    case ROUTE_MODELS:
        return handle_models(ctx, h, NULL);
    case ROUTE_MODEL:
        return handle_models(ctx, h, path + 11);
    case ROUTE_CHAT:
        return fcgi_gen_handle(ctx, h, FCGI_GEN_CHAT);
    case ROUTE_COMPLETIONS:
        return fcgi_gen_handle(ctx, h, FCGI_GEN_COMPLETION);
    default:
        return fcgi_http_send_error(h, 404, "not_found_error", "Unknown path.", NULL, NULL, 0);
    }
}

static void
count_response(struct fcgi_ctx *ctx, const struct fcgi_http *h)
{
    if (h->status >= 200 && h->status < 300)
        atomic_fetch_add(&ctx->counters.responses_2xx, 1);
    else if (h->status >= 400 && h->status < 500)
        atomic_fetch_add(&ctx->counters.responses_4xx, 1);
    else if (h->status >= 500)
        atomic_fetch_add(&ctx->counters.responses_5xx, 1);
}

int
fcgi_server_handle(struct fcgi_ctx *ctx, struct fcgi_http *h)
{
    atomic_fetch_add(&ctx->counters.requests, 1);
    atomic_fetch_add(&ctx->counters.active_requests, 1);
    int rc = dispatch(ctx, h);
    atomic_fetch_sub(&ctx->counters.active_requests, 1);
    count_response(ctx, h);
    CM_LOG(CM_LOG_DEBUG, "request method=%s path=%s status=%d", h->method ? h->method : "-",
           h->path ? h->path : "-", h->status);
    return rc == -EPIPE || h->client_gone ? -EPIPE : 0;
}

int
fcgi_server_handle_too_large(struct fcgi_ctx *ctx, struct fcgi_http *h)
{
    atomic_fetch_add(&ctx->counters.requests, 1);
    char msg[96];
    snprintf(msg, sizeof(msg), "The request body is larger than the limit of %zu bytes.",
             ctx->conf.max_body_bytes);
    int rc = fcgi_http_send_error(h, 413, "invalid_request_error", msg, NULL, NULL, 0);
    count_response(ctx, h);
    return rc == -EPIPE ? -EPIPE : 0;
}

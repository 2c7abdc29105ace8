/*
 * guard: names, configuration, request overrides, the per-response object that dispatches to the
 * tool-loop guards (guard_calls.c) and the content guards (guard_watch.c), and the token_loop
 * detector. See guard.h for the contract.
 */
#include "guards/guard.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <strings.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "guards/guard_int.h"

/* ---- Names and value ranges ---- */

struct guard_info {
    const char *name;
    bool tool_loop;
    double def;
    double lo, hi; /* valid non-zero values */
    bool fraction; /* a similarity, not an integer */
};

static const struct guard_info guard_infos[GUARD_N] = {
    [GUARD_NAME_RUN_CAP] = {"name_run_cap", true, GUARD_DEFAULT_NAME_RUN_CAP, 1, 1024, false},
    [GUARD_IDENTICAL_CALL] = {"identical_call", true, GUARD_DEFAULT_IDENTICAL_CALL, 3,
                              GUARD_CALL_RING_MAX, false},
    [GUARD_REPEATED_CALL_HISTORY] = {"repeated_call_history", true,
                                     GUARD_DEFAULT_REPEATED_CALL_HISTORY, 6, GUARD_CALL_RING_MAX,
                                     false},
    [GUARD_TOOL_CALL_CAP] = {"tool_call_cap", true, GUARD_DEFAULT_TOOL_CALL_CAP, 1, 1024, false},
    [GUARD_PERMANENT_FAILURE] = {"permanent_failure", true, GUARD_DEFAULT_PERMANENT_FAILURE, 1, 1,
                                 false},
    [GUARD_LINE_REPEAT] = {"line_repeat", false, GUARD_DEFAULT_LINE_REPEAT, 2, 64, false},
    [GUARD_SENTENCE_LOOP] = {"sentence_loop", false, GUARD_DEFAULT_SENTENCE_LOOP, 0.01, 1, true},
    [GUARD_UNTERMINATED_TOOL_CALL] = {"unterminated_tool_call", false,
                                      GUARD_DEFAULT_UNTERMINATED_TOOL_CALL, 1, 1000000, false},
    [GUARD_TOKEN_LOOP] = {"token_loop", false, GUARD_DEFAULT_TOKEN_LOOP, 2, 16, false},
};

const char *
guard_name(enum guard_id id)
{
    if ((int)id < 0 || id >= GUARD_N)
        return NULL;
    return guard_infos[id].name;
}

int
guard_from_name(const char *name, enum guard_id *out)
{
    if (!name)
        return -ENOENT;
    for (int i = 0; i < GUARD_N; i++) {
        if (strcmp(name, guard_infos[i].name) == 0) {
            if (out)
                *out = (enum guard_id)i;
            return 0;
        }
    }
    return -ENOENT;
}

bool
guard_is_tool_loop(enum guard_id id)
{
    if ((int)id < 0 || id >= GUARD_N)
        return false;
    return guard_infos[id].tool_loop;
}

/* ---- Configuration ---- */

void
guard_config_init(struct guard_config *c)
{
    c->enabled = true;
    for (int i = 0; i < GUARD_N; i++)
        c->value[i] = guard_infos[i].def;
}

bool
guard_config_active(const struct guard_config *c, enum guard_id id)
{
    if (!c || (int)id < 0 || id >= GUARD_N)
        return false;
    return c->enabled && c->value[id] != 0;
}

int
guard_config_int(const struct guard_config *c, enum guard_id id)
{
    return guard_config_active(c, id) ? (int)c->value[id] : 0;
}

static void __attribute__((format(printf, 3, 4)))
set_err(char *err, size_t err_len, const char *fmt, ...)
{
    if (!err || err_len == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

/* Whether v is 0 or a valid value of guard id. */
static bool
value_valid(enum guard_id id, double v)
{
    const struct guard_info *in = &guard_infos[id];
    if (v == 0)
        return true;
    if (!isfinite(v) || v < in->lo || v > in->hi)
        return false;
    return in->fraction || v == floor(v);
}

static const char *
value_range_text(enum guard_id id, char *buf, size_t len)
{
    const struct guard_info *in = &guard_infos[id];
    if (in->fraction)
        snprintf(buf, len, "0 or a number in (0, 1]");
    else
        snprintf(buf, len, "0 or an integer %g..%g", in->lo, in->hi);
    return buf;
}

static int
parse_bool_word(const char *s, bool *out)
{
    static const char *const on[] = {"on", "true", "yes", "1"};
    static const char *const off[] = {"off", "false", "no", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, on[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcasecmp(s, off[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -EINVAL;
}

/* The text of value without surrounding white space, in buf. */
static int
trim_copy(const char *s, char *buf, size_t len)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        n--;
    if (n == 0 || n >= len)
        return -EINVAL;
    memcpy(buf, s, n);
    buf[n] = '\0';
    return 0;
}

static int
key_to_id(const char *key, enum guard_id *out)
{
    char name[64];
    size_t n = strlen(key);
    if (n >= sizeof(name))
        return -ENOENT;
    for (size_t i = 0; i <= n; i++)
        name[i] = key[i] == '-' ? '_' : key[i];
    return guard_from_name(name, out);
}

int
guard_config_set(struct guard_config *c, const char *key, const char *value, char *err,
                 size_t err_len)
{
    char text[64], range[64];
    enum guard_id id;
    if (!c || !key || !value) {
        set_err(err, err_len, "missing key or value");
        return -EINVAL;
    }
    bool bad = trim_copy(value, text, sizeof(text)) < 0;
    if (strcmp(key, "guards") == 0) {
        bool on = false;
        if (bad || parse_bool_word(text, &on) < 0) {
            set_err(err, err_len, "guards: bad value '%s' (on or off)", value);
            return -EINVAL;
        }
        c->enabled = on;
        return 0;
    }
    if (key_to_id(key, &id) < 0) {
        set_err(err, err_len, "unknown guard '%s'", key);
        return -ENOENT;
    }
    double v = 0;
    if (!bad) {
        char *end = NULL;
        errno = 0;
        if (guard_infos[id].fraction) {
            v = strtod(text, &end);
        } else {
            long l = strtol(text, &end, 10);
            v = (double)l;
        }
        bad = errno != 0 || end == text || *end != '\0';
    }
    if (bad || !value_valid(id, v)) {
        set_err(err, err_len, "%s: bad value '%s' (%s)", guard_infos[id].name, value,
                value_range_text(id, range, sizeof(range)));
        return -EINVAL;
    }
    c->value[id] = v;
    return 0;
}

/* One override value: the number it stands for, or -EINVAL with err set. */
static int
override_value(enum guard_id id, struct json_object *v, double *out, char *err, size_t err_len)
{
    const char *name = guard_infos[id].name;
    char range[64];
    double d = 0;
    switch (json_object_get_type(v)) {
    case json_type_int:
        d = (double)json_object_get_int64(v);
        break;
    case json_type_double:
        d = json_object_get_double(v);
        break;
    case json_type_boolean:
        if (!json_object_get_boolean(v))
            d = 0;
        else if (id == GUARD_TOKEN_LOOP)
            d = GUARD_TOKEN_LOOP_REPEATS;
        else {
            set_err(err, err_len, "guards.%s: true is not a value (a number, or false to disable)",
                    name);
            return -EINVAL;
        }
        break;
    default:
        set_err(err, err_len, "guards.%s: must be a number (or false to disable)", name);
        return -EINVAL;
    }
    if (!value_valid(id, d)) {
        set_err(err, err_len, "guards.%s: bad value %s (%s)", name, json_object_to_json_string(v),
                value_range_text(id, range, sizeof(range)));
        return -EINVAL;
    }
    *out = d;
    return 0;
}

int
guard_config_override(struct guard_config *c, const struct json_object *o, char *err,
                      size_t err_len)
{
    double next[GUARD_N];
    struct json_object *obj = (struct json_object *)o; /* json-c's iterators are not const */
    if (!c || !obj || !json_object_is_type(obj, json_type_object)) {
        set_err(err, err_len, "guards: must be an object");
        return -EINVAL;
    }
    memcpy(next, c->value, sizeof(next));
    json_object_object_foreach(obj, key, val)
    {
        enum guard_id id;
        double d = 0;
        if (guard_from_name(key, &id) < 0) {
            set_err(err, err_len, "guards: unknown guard '%s'", key);
            return -EINVAL;
        }
        if (override_value(id, val, &d, err, err_len) < 0)
            return -EINVAL;
        double cur = c->value[id];
        if (d != 0 && cur == 0 && id != GUARD_TOKEN_LOOP) {
            set_err(err, err_len,
                    "guards.%s: %s would enable a guard that is off on this server; a request may "
                    "only lower or disable a guard",
                    key, json_object_to_json_string(val));
            return -EINVAL;
        }
        if (d != 0 && cur != 0 && d > cur) {
            set_err(err, err_len,
                    "guards.%s: %s is above the server's %g; a request may only lower or disable a "
                    "guard",
                    key, json_object_to_json_string(val), cur);
            return -EINVAL;
        }
        next[id] = d;
    }
    memcpy(c->value, next, sizeof(next));
    return 0;
}

/* ---- Hashing ---- */

void
guard_hasher_init(struct guard_hasher *h)
{
    h->a = 0xcbf29ce484222325ULL; /* FNV-1a offset basis */
    h->b = 0x9e3779b97f4a7c15ULL;
}

void
guard_hasher_add(struct guard_hasher *h, const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t a = h->a, b = h->b;
    for (size_t i = 0; i < n; i++) {
        a = (a ^ s[i]) * 0x100000001b3ULL; /* FNV-1a */
        b = (b + s[i] + 1) * 0xff51afd7ed558ccdULL;
        b ^= b >> 31;
    }
    h->a = a;
    h->b = b;
}

struct guard_hash
guard_hasher_done(const struct guard_hasher *h)
{
    uint64_t b = h->b;
    b ^= b >> 33;
    b *= 0xc4ceb9fe1a85ec53ULL;
    b ^= b >> 33;
    return (struct guard_hash){h->a, b};
}

bool
guard_hash_eq(struct guard_hash x, struct guard_hash y)
{
    return x.a == y.a && x.b == y.b;
}

uint64_t
guard_hash64(const void *p, size_t n)
{
    struct guard_hasher h;
    guard_hasher_init(&h);
    guard_hasher_add(&h, p, n);
    return guard_hasher_done(&h).b;
}

/* ---- The per-response object ---- */

struct guard {
    bool enabled;
    enum guard_id tripped;
    int unterminated_n; /* 0 = off */
    struct guard_calls calls;
    struct guard_watch *watch; /* NULL when both content guards are off */
};

int
guard_new(const struct guard_config *cfg, const struct cm_chat_msg *history, int n_history,
          struct guard **out)
{
    struct guard *g = NULL;
    int rc = 0;
    if (!cfg || !out || n_history < 0 || (!history && n_history > 0))
        return -EINVAL;
    g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    g->enabled = cfg->enabled;
    g->tripped = GUARD_NONE;
    g->unterminated_n = guard_config_int(cfg, GUARD_UNTERMINATED_TOOL_CALL);
    g->calls.name_run_cap = guard_config_int(cfg, GUARD_NAME_RUN_CAP);
    g->calls.identical_ring = guard_config_int(cfg, GUARD_IDENTICAL_CALL);
    g->calls.history_ring = guard_config_int(cfg, GUARD_REPEATED_CALL_HISTORY);
    g->calls.call_cap = guard_config_int(cfg, GUARD_TOOL_CALL_CAP);
    g->calls.permanent = guard_config_int(cfg, GUARD_PERMANENT_FAILURE) != 0;
    rc = guard_calls_init(&g->calls, history, n_history);
    if (rc < 0)
        goto out;
    int line_n = guard_config_int(cfg, GUARD_LINE_REPEAT);
    double sim =
        guard_config_active(cfg, GUARD_SENTENCE_LOOP) ? cfg->value[GUARD_SENTENCE_LOOP] : 0;
    if (line_n || sim > 0) {
        rc = guard_watch_new(line_n, sim, &g->watch);
        if (rc < 0)
            goto out;
    }
    *out = g;
    g = NULL;
out:
    guard_free(g);
    return rc;
}

void
guard_free(struct guard *g)
{
    if (!g)
        return;
    guard_calls_fini(&g->calls);
    guard_watch_free(g->watch);
    free(g);
}

enum guard_id
guard_feed_text(struct guard *g, const char *text, size_t n)
{
    if (g->tripped != GUARD_NONE || !g->watch || n == 0 || !text)
        return g->tripped;
    g->tripped = guard_watch_feed(g->watch, text, n);
    return g->tripped;
}

enum guard_id
guard_feed_call(struct guard *g, const char *name, const char *args, size_t args_len)
{
    if (g->tripped != GUARD_NONE || !g->enabled || !name)
        return g->tripped;
    if (!args)
        args_len = 0;
    g->tripped = guard_calls_feed(&g->calls, name, args ? args : "", args_len);
    return g->tripped;
}

enum guard_id
guard_feed_call_tokens(struct guard *g, int n_tokens)
{
    if (g->tripped == GUARD_NONE && g->unterminated_n > 0 && n_tokens > g->unterminated_n)
        g->tripped = GUARD_UNTERMINATED_TOOL_CALL;
    return g->tripped;
}

enum guard_id
guard_tripped(const struct guard *g)
{
    return g->tripped;
}

/* ---- token_loop ---- */

bool
guard_token_loop_check(const int32_t *ids, int n, int n_repeats)
{
    if (!ids || n_repeats < 2 || n < GUARD_TOKEN_LOOP_START || n % GUARD_TOKEN_LOOP_EVERY != 0)
        return false;
    for (int p = GUARD_TOKEN_LOOP_MIN_PERIOD; p <= GUARD_TOKEN_LOOP_MAX_PERIOD; p++) {
        if ((long)p * n_repeats > n)
            break;
        /* the last p * n_repeats tokens are periodic with period p */
        int span = p * (n_repeats - 1), i = 0;
        while (i < span && ids[n - 1 - i] == ids[n - 1 - i - p])
            i++;
        if (i == span)
            return true;
    }
    return false;
}

/*
 * guard_calls: the tool-loop guards (name_run_cap, identical_call, repeated_call_history,
 * tool_call_cap, permanent_failure) and the conversation history they read. Identities are
 * 128-bit hashes of (name, canonical arguments), so feeding a call never allocates. See guard.h
 * for the rules.
 */
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_chat.h"
#include "guards/guard_int.h"
#include "guards/guard_toolcall.h"

/* ---- Rings of identities ---- */

static struct guard_hash
ring_nth_newest(const struct guard_ring *r, int i)
{
    int k = (r->head - 1 - i + 2 * GUARD_CALL_RING_MAX) % GUARD_CALL_RING_MAX;
    return r->item[k];
}

/* How many times the run of identical newest items would be if h were pushed. */
static int
ring_run_with(const struct guard_ring *r, struct guard_hash h)
{
    if (r->n > 0 && guard_hash_eq(ring_nth_newest(r, 0), h))
        return r->run + 1;
    return 1;
}

/* How many of the newest `window` items would equal h if h were pushed (h counts as one). */
static int
ring_count_with(const struct guard_ring *r, struct guard_hash h, int window)
{
    int c = 1;
    for (int i = 0; i < window - 1 && i < r->n; i++)
        c += guard_hash_eq(ring_nth_newest(r, i), h);
    return c;
}

static void
ring_push(struct guard_ring *r, struct guard_hash h)
{
    r->run = ring_run_with(r, h);
    r->item[r->head] = h;
    r->head = (r->head + 1) % GUARD_CALL_RING_MAX;
    if (r->n < GUARD_CALL_RING_MAX)
        r->n++;
}

static struct guard_hash
call_identity(const char *name, const char *args, size_t args_len)
{
    struct guard_hasher h;
    guard_hasher_init(&h);
    guard_hasher_add(&h, name, strlen(name) + 1); /* the NUL separates name and arguments */
    guard_hasher_add(&h, args, args_len);
    return guard_hasher_done(&h);
}

static struct guard_hash
name_identity(const char *name)
{
    struct guard_hasher h;
    guard_hasher_init(&h);
    guard_hasher_add(&h, name, strlen(name));
    return guard_hasher_done(&h);
}

/* ---- Primary argument: a small scanner over the top level of a JSON object ---- */

struct scan {
    const char *s, *end;
};

static void
scan_ws(struct scan *sc)
{
    while (sc->s < sc->end && (*sc->s == ' ' || *sc->s == '\t' || *sc->s == '\n' || *sc->s == '\r'))
        sc->s++;
}

/* A string token at sc->s: on success [*b, *e) is its raw (escaped) text between the quotes. */
static bool
scan_string(struct scan *sc, const char **b, const char **e)
{
    if (sc->s >= sc->end || *sc->s != '"')
        return false;
    const char *p = sc->s + 1;
    while (p < sc->end && *p != '"') {
        if (*p == '\\')
            p++;
        p++;
    }
    if (p >= sc->end)
        return false;
    *b = sc->s + 1;
    *e = p;
    sc->s = p + 1;
    return true;
}

/* Skips one value of any type (strings with their escapes, brackets balanced). */
static bool
scan_value(struct scan *sc)
{
    const char *b, *e;
    scan_ws(sc);
    if (sc->s >= sc->end)
        return false;
    if (*sc->s == '"')
        return scan_string(sc, &b, &e);
    if (*sc->s == '{' || *sc->s == '[') {
        int depth = 0;
        while (sc->s < sc->end) {
            char ch = *sc->s;
            if (ch == '"') {
                if (!scan_string(sc, &b, &e))
                    return false;
                continue;
            }
            if (ch == '{' || ch == '[') {
                depth++;
            } else if (ch == '}' || ch == ']') {
                if (--depth == 0) {
                    sc->s++;
                    return true;
                }
            }
            sc->s++;
        }
        return false;
    }
    const char *start = sc->s;
    while (sc->s < sc->end && !strchr(",}] \t\n\r", *sc->s))
        sc->s++;
    return sc->s > start;
}

/* The first word of the escaped string text [b, e): white space (literal, or escaped \t \n \r)
 * ends it and is skipped before it. */
static bool
first_word(const char *b, const char *e, const char **wb, const char **we)
{
    const char *p = b;
    for (;;) {
        if (p < e && (*p == ' ' || *p == '\t'))
            p++;
        else if (p + 1 < e && p[0] == '\\' && (p[1] == 't' || p[1] == 'n' || p[1] == 'r'))
            p += 2;
        else
            break;
    }
    const char *q = p;
    while (q < e && *q != ' ' && *q != '\t' &&
           !(q + 1 < e && q[0] == '\\' && (q[1] == 't' || q[1] == 'n' || q[1] == 'r')))
        q += (q[0] == '\\' && q + 1 < e) ? 2 : 1;
    if (q == p)
        return false;
    *wb = p;
    *we = q;
    return true;
}

enum key_kind { KEY_PATH = 0, KEY_FILE_PATH, KEY_FILENAME, KEY_COMMAND, KEY_N };

static int
key_kind_of(const char *b, const char *e)
{
    static const char *const names[] = {"path", "file_path", "filename", "command", "cmd"};
    static const int kinds[] = {KEY_PATH, KEY_FILE_PATH, KEY_FILENAME, KEY_COMMAND, KEY_COMMAND};
    size_t n = (size_t)(e - b);
    for (size_t i = 0; i < 5; i++)
        if (strlen(names[i]) == n && memcmp(names[i], b, n) == 0)
            return kinds[i];
    return -1;
}

bool
guard_primary_key(const char *args, size_t n, struct guard_hash *out)
{
    struct scan sc = {args, args + n};
    const char *vb[KEY_N] = {0}, *ve[KEY_N] = {0};
    scan_ws(&sc);
    if (sc.s >= sc.end || *sc.s != '{')
        return false;
    sc.s++;
    for (;;) {
        const char *kb, *ke;
        scan_ws(&sc);
        if (sc.s < sc.end && *sc.s == '}')
            break;
        if (!scan_string(&sc, &kb, &ke))
            return false;
        scan_ws(&sc);
        if (sc.s >= sc.end || *sc.s != ':')
            return false;
        sc.s++;
        scan_ws(&sc);
        int kind = key_kind_of(kb, ke);
        if (kind >= 0 && !vb[kind] && sc.s < sc.end && *sc.s == '"') {
            if (!scan_string(&sc, &vb[kind], &ve[kind]))
                return false;
        } else if (kind == KEY_COMMAND && !vb[kind] && sc.s < sc.end && *sc.s == '[') {
            /* an argv array: its first element, when a string */
            struct scan inner = {sc.s + 1, sc.end};
            scan_ws(&inner);
            const char *b, *e;
            if (inner.s < inner.end && *inner.s == '"' && scan_string(&inner, &b, &e)) {
                vb[kind] = b;
                ve[kind] = e;
            }
            if (!scan_value(&sc))
                return false;
        } else if (!scan_value(&sc)) {
            return false;
        }
        scan_ws(&sc);
        if (sc.s < sc.end && *sc.s == ',')
            sc.s++;
        else if (sc.s < sc.end && *sc.s == '}')
            break;
        else
            return false;
    }
    struct guard_hasher h;
    guard_hasher_init(&h);
    for (int k = KEY_PATH; k <= KEY_FILENAME; k++) {
        if (vb[k] && ve[k] > vb[k]) {
            guard_hasher_add(&h, "p", 1);
            guard_hasher_add(&h, vb[k], (size_t)(ve[k] - vb[k]));
            *out = guard_hasher_done(&h);
            return true;
        }
    }
    const char *wb, *we;
    if (vb[KEY_COMMAND] && first_word(vb[KEY_COMMAND], ve[KEY_COMMAND], &wb, &we)) {
        guard_hasher_add(&h, "c", 1);
        guard_hasher_add(&h, wb, (size_t)(we - wb));
        *out = guard_hasher_done(&h);
        return true;
    }
    return false;
}

/* ---- History ---- */

static const char *const failure_phrases[] = {
    "command not found", "no such file or directory", "permission denied",
    "file exists",       "invalid argument",
};

static bool
says_permanent_failure(const char *text)
{
    if (!text)
        return false;
    for (size_t i = 0; i < sizeof(failure_phrases) / sizeof(failure_phrases[0]); i++)
        if (strcasestr(text, failure_phrases[i]))
            return true;
    return false;
}

/* One call of the history, while it is read. */
struct hist_call {
    const char *id; /* borrowed from the messages */
    struct guard_hash call, name, key;
    bool has_key;
};

static int
hist_call_read(const struct cm_chat_tool_call *tc, struct hist_call *out)
{
    const char *raw = tc->arguments ? tc->arguments : "{}";
    char *canon = NULL;
    int rc = guard_json_canonical(raw, strlen(raw), &canon);
    if (rc == -ENOMEM)
        return rc;
    const char *args = rc == 0 ? canon : raw; /* not JSON: compared as written */
    const char *name = tc->name ? tc->name : "";
    out->id = tc->id;
    out->call = call_identity(name, args, strlen(args));
    out->name = name_identity(name);
    out->has_key = guard_primary_key(args, strlen(args), &out->key);
    free(canon);
    return 0;
}

static void
add_failure(struct guard_calls *c, const struct hist_call *hc)
{
    struct guard_fail *f = &c->fails[c->n_fails++];
    f->call = hc->call;
    f->name = hc->name;
    f->key = hc->key;
    f->has_key = hc->has_key;
}

/* The tool message msgs[i] answers a call made before it: the newest one with its id. */
static const struct hist_call *
find_answered(const struct hist_call *calls, int n_calls, const char *id)
{
    for (int k = n_calls - 1; k >= 0; k--)
        if (calls[k].id && strcmp(calls[k].id, id) == 0)
            return &calls[k];
    return NULL;
}

int
guard_calls_init(struct guard_calls *c, const struct cm_chat_msg *msgs, int n)
{
    struct hist_call *calls = NULL;
    int n_calls = 0, total = 0, n_tool = 0, rc = 0;
    for (int i = 0; i < n; i++) {
        if (msgs[i].role && strcmp(msgs[i].role, "assistant") == 0 && msgs[i].tool_calls &&
            msgs[i].n_tool_calls > 0)
            total += msgs[i].n_tool_calls;
        if (msgs[i].role && strcmp(msgs[i].role, "tool") == 0)
            n_tool++;
    }
    if (total == 0)
        return 0;
    calls = calloc((size_t)total, sizeof(*calls));
    if (c->permanent && n_tool > 0)
        c->fails = calloc((size_t)n_tool, sizeof(*c->fails));
    if (!calls || (c->permanent && n_tool > 0 && !c->fails)) {
        rc = -ENOMEM;
        goto out;
    }
    for (int i = 0; i < n; i++) {
        const struct cm_chat_msg *m = &msgs[i];
        if (!m->role)
            continue;
        if (strcmp(m->role, "assistant") == 0 && m->tool_calls) {
            for (int k = 0; k < m->n_tool_calls; k++) {
                rc = hist_call_read(&m->tool_calls[k], &calls[n_calls]);
                if (rc < 0)
                    goto out;
                ring_push(&c->history, calls[n_calls].call);
                n_calls++;
            }
        } else if (strcmp(m->role, "tool") == 0 && c->fails && m->tool_call_id &&
                   says_permanent_failure(m->content)) {
            const struct hist_call *hc = find_answered(calls, n_calls, m->tool_call_id);
            if (hc)
                add_failure(c, hc);
        }
    }
out:
    free(calls);
    return rc;
}

void
guard_calls_fini(struct guard_calls *c)
{
    free(c->fails);
    c->fails = NULL;
    c->n_fails = 0;
}

/* ---- The rules ---- */

static bool
permanent_failure_hit(const struct guard_calls *c, struct guard_hash id, struct guard_hash name,
                      const char *args, size_t args_len)
{
    bool have_key = false, key_done = false;
    struct guard_hash key = {0, 0};
    for (int i = 0; i < c->n_fails; i++) {
        const struct guard_fail *f = &c->fails[i];
        if (guard_hash_eq(f->call, id))
            return true;
        if (!f->has_key || !guard_hash_eq(f->name, name))
            continue;
        if (!key_done) {
            have_key = guard_primary_key(args, args_len, &key);
            key_done = true;
        }
        if (have_key && guard_hash_eq(f->key, key))
            return true;
    }
    return false;
}

enum guard_id
guard_calls_feed(struct guard_calls *c, const char *name, const char *args, size_t args_len)
{
    struct guard_hash id = call_identity(name, args, args_len);
    struct guard_hash nm = name_identity(name);
    int name_run = (c->n_calls > 0 && guard_hash_eq(c->last_name, nm)) ? c->name_run + 1 : 1;
    enum guard_id trip = GUARD_NONE;

    if (c->permanent && permanent_failure_hit(c, id, nm, args, args_len))
        trip = GUARD_PERMANENT_FAILURE;
    else if (c->identical_ring && (ring_run_with(&c->resp, id) >= 2 ||
                                   ring_count_with(&c->resp, id, c->identical_ring) >= 3))
        trip = GUARD_IDENTICAL_CALL;
    else if (c->history_ring && (ring_run_with(&c->history, id) >= 5 ||
                                 ring_count_with(&c->history, id, c->history_ring) >= 6))
        trip = GUARD_REPEATED_CALL_HISTORY;
    else if (c->name_run_cap && name_run >= c->name_run_cap)
        trip = GUARD_NAME_RUN_CAP;
    else if (c->call_cap && c->n_calls + 1 > c->call_cap)
        trip = GUARD_TOOL_CALL_CAP;

    c->n_calls++;
    c->last_name = nm;
    c->name_run = name_run;
    ring_push(&c->resp, id);
    ring_push(&c->history, id);
    return trip;
}

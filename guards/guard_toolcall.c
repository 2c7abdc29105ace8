/*
 * guard_toolcall: two modes. Outside a block the text is content, except a run of bytes matching
 * the start of the opener, which is held back as a count (the bytes are the opener's own, so they
 * need no buffer). Inside a block every byte goes through a small lexer (string, escape, nesting
 * depth) that decides whether a '<' can start the closer, and through a grammar that follows only
 * the members of the top-level object to find the "name" value and the arguments value while they
 * stream. The block text is kept (up to max_block) and parsed with json-c at the closer, which is
 * the only judge of validity; the streaming scan merely finds positions early.
 */
#include "guards/guard_toolcall.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#define OPEN_LEN (sizeof(GUARD_TOOLCALL_OPEN) - 1)
#define CLOSE_LEN (sizeof(GUARD_TOOLCALL_CLOSE) - 1)
#define NONE SIZE_MAX

/* Where the grammar is in the top-level object. */
enum gstate {
    G_START,       /* before the top-level '{' */
    G_KEY,         /* expecting a key (or ',' / '}') */
    G_IN_KEY,      /* inside a key string */
    G_COLON,       /* after a key */
    G_VALUE,       /* after ':' */
    G_IN_VALUE,    /* inside a member's value */
    G_AFTER_VALUE, /* after a value: ',' or '}' */
    G_DONE,        /* after the top-level object */
    G_BAD,         /* not something we follow; json-c will judge at the closer */
};

/* MEM_PARAMS: "parameters", a synonym of "arguments" only when it is the first of the two; a
 * "parameters" member after the arguments (models echo the schema) is just another member. */
enum member { MEM_OTHER, MEM_NAME, MEM_ARGS, MEM_PARAMS };

struct guard_toolcall {
    size_t max_block;
    bool stopped;
    int n_begun, n_ok, n_invalid;
    guard_toolcall_event_fn cb;
    void *ctx;

    /* outside a block */
    size_t open_match; /* held-back bytes: GUARD_TOOLCALL_OPEN[0..open_match) */

    /* inside a block */
    bool in_block;
    char *blk; /* (blk_cap) text since the opener */
    size_t blk_len, blk_cap;
    bool overflow;
    size_t close_match; /* bytes of the closer matched at the end of blk */
    bool in_str, esc;
    int depth;
    enum gstate g;
    enum member mem;  /* member whose key or value is being read */
    size_t tok_start; /* offset in blk of the current key or value */
    char vkind;       /* first byte of the current value */
    int n_name, n_args;
    bool name_sent;
    char name[GUARD_TOOLCALL_MAX_NAME + 1];
    char args_kind;   /* first byte of the arguments value, 0 before it */
    size_t args_sent; /* offset in blk up to which args fragments went out */
    size_t args_end;  /* offset in blk one past the arguments value, NONE until known */
};

static bool
is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* ---- Canonical JSON ---- */

/* json-c accepts more than JSON even with JSON_TOKENER_STRICT (single-quoted strings, NaN), and
 * the raw argument text goes to clients as JSON, so the syntax is checked here first (RFC 8259;
 * nesting bounded like json-c's default so the recursion is too). */
#define JSON_MAX_DEPTH JSON_TOKENER_DEFAULT_DEPTH

struct jscan {
    const char *s;
    size_t n, i;
};

static bool
js_peek(const struct jscan *j, char c)
{
    return j->i < j->n && j->s[j->i] == c;
}

static bool
js_digit(const struct jscan *j)
{
    return j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9';
}

static void
js_ws(struct jscan *j)
{
    while (j->i < j->n && is_ws(j->s[j->i]))
        j->i++;
}

static bool
js_literal(struct jscan *j, const char *lit)
{
    size_t l = strlen(lit);

    if (j->n - j->i < l || memcmp(j->s + j->i, lit, l) != 0)
        return false;
    j->i += l;
    return true;
}

static bool
js_string(struct jscan *j)
{
    j->i++; /* the opening quote */
    while (j->i < j->n) {
        unsigned char c = (unsigned char)j->s[j->i++];
        if (c == '"')
            return true;
        if (c < 0x20)
            return false;
        if (c != '\\')
            continue;
        if (j->i >= j->n)
            return false;
        c = (unsigned char)j->s[j->i++];
        if (c == 'u') {
            for (int k = 0; k < 4; k++, j->i++)
                if (j->i >= j->n || j->s[j->i] == 0 ||
                    !strchr("0123456789abcdefABCDEF", j->s[j->i]))
                    return false;
        } else if (c == 0 || !strchr("\"\\/bfnrt", c)) {
            return false;
        }
    }
    return false;
}

static bool
js_number(struct jscan *j)
{
    if (js_peek(j, '-'))
        j->i++;
    if (js_peek(j, '0')) {
        j->i++;
    } else if (js_digit(j)) {
        while (js_digit(j))
            j->i++;
    } else {
        return false;
    }
    if (js_peek(j, '.')) {
        j->i++;
        if (!js_digit(j))
            return false;
        while (js_digit(j))
            j->i++;
    }
    if (js_peek(j, 'e') || js_peek(j, 'E')) {
        j->i++;
        if (js_peek(j, '+') || js_peek(j, '-'))
            j->i++;
        if (!js_digit(j))
            return false;
        while (js_digit(j))
            j->i++;
    }
    return true;
}

static bool js_value(struct jscan *j, int depth);

/* An object or array body after its opening bracket. */
static bool
js_container(struct jscan *j, int depth, char close)
{
    j->i++;
    js_ws(j);
    if (js_peek(j, close)) {
        j->i++;
        return true;
    }
    for (;;) {
        if (close == '}') {
            js_ws(j);
            if (!js_peek(j, '"') || !js_string(j))
                return false;
            js_ws(j);
            if (!js_peek(j, ':'))
                return false;
            j->i++;
        }
        if (!js_value(j, depth + 1))
            return false;
        js_ws(j);
        if (js_peek(j, close)) {
            j->i++;
            return true;
        }
        if (!js_peek(j, ','))
            return false;
        j->i++;
    }
}

static bool
js_value(struct jscan *j, int depth)
{
    js_ws(j);
    if (j->i >= j->n)
        return false;
    switch (j->s[j->i]) {
    case '{':
    case '[':
        if (depth >= JSON_MAX_DEPTH)
            return false;
        return js_container(j, depth, j->s[j->i] == '{' ? '}' : ']');
    case '"':
        return js_string(j);
    case 't':
        return js_literal(j, "true");
    case 'f':
        return js_literal(j, "false");
    case 'n':
        return js_literal(j, "null");
    default:
        return js_number(j);
    }
}

/* Parses exactly one JSON value (strict RFC 8259, json-c's default depth) from s[0..n) with
 * white space around it. */
static int
parse_json(const char *s, size_t n, struct json_object **out)
{
    struct json_tokener *tok = NULL;
    struct json_object *obj = NULL;
    struct jscan js = {0};
    char *copy = NULL;
    int rc = -EINVAL;

    while (n && is_ws(s[0])) {
        s++;
        n--;
    }
    while (n && is_ws(s[n - 1]))
        n--;
    if (n == 0 || n > INT32_MAX - 1)
        goto out;
    js.s = s;
    js.n = n;
    if (!js_value(&js, 0) || js.i != n)
        goto out;
    rc = -ENOMEM;
    copy = malloc(n + 1);
    tok = json_tokener_new();
    if (!copy || !tok)
        goto out;
    memcpy(copy, s, n);
    copy[n] = 0;
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
    /* the terminating NUL is passed so that a top-level number is complete */
    obj = json_tokener_parse_ex(tok, copy, (int)n + 1);
    rc = -EINVAL;
    if (json_tokener_get_error(tok) != json_tokener_success || json_tokener_get_parse_end(tok) < n)
        goto out;
    *out = obj;
    obj = NULL;
    rc = 0;
out:
    json_object_put(obj);
    if (tok) /* json_tokener_free(NULL) crashes in json-c 0.16 */
        json_tokener_free(tok);
    free(copy);
    return rc;
}

static int
cmp_keys(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Copy of v with object keys sorted at every level (scalars shared by reference). */
static int
canon_value(struct json_object *v, struct json_object **out)
{
    struct json_object *res = NULL, *child = NULL;
    const char **keys = NULL;
    size_t n = 0, i = 0;
    int rc = -ENOMEM;

    if (json_object_is_type(v, json_type_object)) {
        n = (size_t)json_object_object_length(v);
        keys = malloc((n ? n : 1) * sizeof(*keys));
        res = json_object_new_object();
        if (!keys || !res)
            goto out;
        json_object_object_foreach(v, key, val)
        {
            (void)val;
            keys[i++] = key;
        }
        qsort(keys, n, sizeof(*keys), cmp_keys);
        for (i = 0; i < n; i++) {
            rc = canon_value(json_object_object_get(v, keys[i]), &child);
            if (rc < 0)
                goto out;
            rc = -ENOMEM;
            if (json_object_object_add(res, keys[i], child) < 0)
                goto out;
            child = NULL;
        }
    } else if (json_object_is_type(v, json_type_array)) {
        n = json_object_array_length(v);
        res = json_object_new_array_ext((int)(n ? n : 1));
        if (!res)
            goto out;
        for (i = 0; i < n; i++) {
            rc = canon_value(json_object_array_get_idx(v, i), &child);
            if (rc < 0)
                goto out;
            rc = -ENOMEM;
            if (json_object_array_add(res, child) < 0)
                goto out;
            child = NULL;
        }
    } else {
        res = json_object_get(v); /* NULL for JSON null */
    }
    *out = res;
    res = NULL;
    rc = 0;
out:
    json_object_put(child);
    json_object_put(res);
    free(keys);
    return rc;
}

static int
canon_string(struct json_object *v, char **out, size_t *out_len)
{
    struct json_object *c = NULL;
    const char *s;
    size_t len = 0;
    char *copy = NULL;
    int rc = canon_value(v, &c);

    if (rc < 0)
        goto out;
    rc = -ENOMEM;
    s = json_object_to_json_string_length(
        c, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
    if (!s)
        goto out;
    copy = malloc(len + 1);
    if (!copy)
        goto out;
    memcpy(copy, s, len + 1);
    *out = copy;
    if (out_len)
        *out_len = len;
    rc = 0;
out:
    json_object_put(c);
    return rc;
}

int
guard_json_canonical(const char *json, size_t n, char **out)
{
    struct json_object *v = NULL;
    int rc = parse_json(json, n, &v);

    if (rc == 0)
        rc = canon_string(v, out, NULL);
    json_object_put(v);
    return rc;
}

/* ---- Events ---- */

static int
emit(struct guard_toolcall *p, struct guard_toolcall_event *ev)
{
    int rc = p->cb(p->ctx, ev);

    if (rc != 0)
        p->stopped = true;
    return rc;
}

static int
emit_content(struct guard_toolcall *p, const char *text, size_t len)
{
    struct guard_toolcall_event ev = {.type = GUARD_TOOLCALL_CONTENT, .index = -1};

    if (len == 0)
        return 0;
    ev.text = text;
    ev.len = len;
    return emit(p, &ev);
}

static int
emit_args(struct guard_toolcall *p, const char *text, size_t len)
{
    struct guard_toolcall_event ev = {.type = GUARD_TOOLCALL_CALL_ARGS};

    if (len == 0)
        return 0;
    ev.index = p->n_begun - 1;
    ev.text = text;
    ev.len = len;
    return emit(p, &ev);
}

/* Sends the arguments text that arrived since the last fragment, when it may go out: after the
 * name, for an object value, and never the start of a possible closer. */
static int
flush_args(struct guard_toolcall *p)
{
    size_t lim;

    if (!p->name_sent || p->args_kind != '{' || p->n_args != 1 || p->overflow)
        return 0;
    lim = p->args_end != NONE ? p->args_end : p->blk_len - p->close_match;
    if (lim <= p->args_sent)
        return 0;
    lim -= p->args_sent;
    p->args_sent += lim;
    return emit_args(p, p->blk + p->args_sent - lim, lim);
}

/* ---- Inside a block: the streaming scan ---- */

static bool
valid_name(const char *s, size_t n)
{
    if (n < 1 || n > GUARD_TOOLCALL_MAX_NAME)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7E)
            return false;
    return true;
}

/* The "name" value blk[tok_start..end) is complete: decode it and announce it. */
static int
name_complete(struct guard_toolcall *p, size_t end)
{
    struct guard_toolcall_event ev = {.type = GUARD_TOOLCALL_CALL_NAME};
    struct json_object *v = NULL;
    int rc = 0;

    if (p->n_name != 1 || p->vkind != '"')
        goto out;
    rc = parse_json(p->blk + p->tok_start, end - p->tok_start, &v);
    if (rc == -EINVAL)
        rc = 0; /* a bad name, judged at the closer */
    if (rc < 0 || !v)
        goto out;
    if (!json_object_is_type(v, json_type_string) ||
        !valid_name(json_object_get_string(v), (size_t)json_object_get_string_len(v)))
        goto out;
    memcpy(p->name, json_object_get_string(v), (size_t)json_object_get_string_len(v) + 1);
    p->name_sent = true;
    ev.index = p->n_begun - 1;
    ev.name = p->name;
    rc = emit(p, &ev);
    if (rc == 0)
        rc = flush_args(p);
out:
    json_object_put(v);
    return rc;
}

static enum member
classify_key(const char *k, size_t n)
{
    if (n == 4 && memcmp(k, "name", 4) == 0)
        return MEM_NAME;
    if (n == 9 && memcmp(k, "arguments", 9) == 0)
        return MEM_ARGS;
    if (n == 10 && memcmp(k, "parameters", 10) == 0)
        return MEM_PARAMS;
    return MEM_OTHER;
}

static int
value_start(struct guard_toolcall *p, size_t pos, char c)
{
    int rc = 0;

    p->tok_start = pos;
    p->vkind = c;
    if (p->mem == MEM_PARAMS)
        p->mem = p->n_args == 0 ? MEM_ARGS : MEM_OTHER;
    if (p->mem == MEM_NAME)
        p->n_name++;
    if (p->mem != MEM_ARGS)
        return 0;
    if (p->n_args == 1) /* a second arguments value: the first one's text still goes out */
        rc = flush_args(p);
    if (++p->n_args == 1) {
        p->args_kind = c;
        p->args_sent = pos;
    }
    return rc;
}

static int
value_end(struct guard_toolcall *p, size_t end)
{
    p->g = G_AFTER_VALUE;
    if (p->mem == MEM_ARGS && p->n_args == 1)
        p->args_end = end;
    if (p->mem == MEM_NAME)
        return name_complete(p, end);
    return 0;
}

/* Grammar step for byte c at blk offset pos; was_str/was_esc: the lexer state before c. The
 * lexer (strings, depth) has already been advanced past c. */
static int
grammar_byte(struct guard_toolcall *p, char c, size_t pos, bool was_str)
{
    switch (p->g) {
    case G_START:
        if (c == '{')
            p->g = G_KEY;
        else if (!is_ws(c))
            p->g = G_BAD;
        return 0;
    case G_KEY:
        if (c == '"') {
            p->tok_start = pos;
            p->g = G_IN_KEY;
        } else if (c == '}') {
            p->g = G_DONE;
        } else if (!is_ws(c) && c != ',') {
            p->g = G_BAD;
        }
        return 0;
    case G_IN_KEY:
        if (!p->in_str) {
            p->mem = classify_key(p->blk + p->tok_start + 1, pos - p->tok_start - 1);
            p->g = G_COLON;
        }
        return 0;
    case G_COLON:
        if (c == ':')
            p->g = G_VALUE;
        else if (!is_ws(c))
            p->g = G_BAD;
        return 0;
    case G_VALUE:
        if (is_ws(c))
            return 0;
        if (c == ',' || c == '}' || c == ']' || c == ':') {
            p->g = G_BAD;
            return 0;
        }
        p->g = G_IN_VALUE;
        return value_start(p, pos, c);
    case G_IN_VALUE:
        if (p->vkind == '"' && was_str && !p->in_str)
            return value_end(p, pos + 1);
        if ((p->vkind == '{' || p->vkind == '[') && !was_str && p->depth == 1)
            return value_end(p, pos + 1);
        if (p->vkind != '"' && p->vkind != '{' && p->vkind != '[' && !was_str &&
            (is_ws(c) || c == ',' || c == '}')) {
            int rc = value_end(p, pos);
            if (rc == 0)
                rc = grammar_byte(p, c, pos, was_str);
            return rc;
        }
        return 0;
    case G_AFTER_VALUE:
        if (c == ',')
            p->g = G_KEY;
        else if (c == '}')
            p->g = G_DONE;
        else if (!is_ws(c))
            p->g = G_BAD;
        return 0;
    case G_DONE:
        if (!is_ws(c))
            p->g = G_BAD;
        return 0;
    case G_BAD:
        return 0;
    }
    return 0;
}

/* Lexer step: strings, escapes and (while the grammar still follows) nesting depth. */
static void
lex_byte(struct guard_toolcall *p, char c)
{
    if (p->in_str) {
        if (p->esc)
            p->esc = false;
        else if (c == '\\')
            p->esc = true;
        else if (c == '"')
            p->in_str = false;
        return;
    }
    if (c == '"')
        p->in_str = true;
    else if (p->g != G_BAD && (c == '{' || c == '['))
        p->depth++;
    else if (p->g != G_BAD && (c == '}' || c == ']'))
        p->depth--;
}

static int
blk_append(struct guard_toolcall *p, char c)
{
    if (p->overflow)
        return 0;
    /* room for the block and the closer's bytes, which are stored until the closer completes */
    if (p->blk_len >= p->max_block + CLOSE_LEN) {
        /* what was stored still goes out, so that the fragments do not depend on the split */
        int rc = flush_args(p);
        p->overflow = true;
        p->g = G_BAD;
        return rc;
    }
    if (p->blk_len + 1 >= p->blk_cap) {
        size_t cap = p->blk_cap ? 2 * p->blk_cap : 256;
        char *b;
        if (cap > p->max_block + CLOSE_LEN + 1)
            cap = p->max_block + CLOSE_LEN + 1;
        b = realloc(p->blk, cap);
        if (!b)
            return -ENOMEM;
        p->blk = b;
        p->blk_cap = cap;
    }
    p->blk[p->blk_len++] = c;
    return 0;
}

static void
block_reset(struct guard_toolcall *p)
{
    p->in_block = false;
    p->blk_len = 0;
    p->overflow = false;
    p->close_match = 0;
    p->in_str = p->esc = false;
    p->depth = 0;
    p->g = G_START;
    p->mem = MEM_OTHER;
    p->tok_start = 0;
    p->vkind = 0;
    p->n_name = p->n_args = 0;
    p->name_sent = false;
    p->name[0] = 0;
    p->args_kind = 0;
    p->args_sent = 0;
    p->args_end = NONE;
}

/* ---- Block end: the json-c verdict ---- */

/* Validates the block text blk[0..n); on success *args is the canonical arguments and *str_args
 * the decoded string when the arguments were given as a string. Returns NULL or the error. */
static const char *
judge(struct guard_toolcall *p, size_t n, char **args, size_t *args_len,
      struct json_object **str_args, int *rc)
{
    struct json_object *top = NULL, *a = NULL, *inner = NULL, *nm = NULL;
    const char *err = NULL;

    *rc = 0;
    if (p->overflow || n > p->max_block)
        return "too large";
    *rc = parse_json(p->blk, n, &top);
    if (*rc == -EINVAL)
        *rc = 0;
    if (*rc < 0 || !top) {
        err = "invalid json";
        goto out;
    }
    err = "not an object";
    if (!json_object_is_type(top, json_type_object))
        goto out;
    err = "duplicate key";
    if (p->n_name > 1 || p->n_args > 1)
        goto out;
    err = "bad name";
    if (!json_object_object_get_ex(top, "name", &nm) || !p->name_sent ||
        strcmp(json_object_get_string(nm), p->name) != 0)
        goto out;
    err = "bad arguments";
    if (!json_object_object_get_ex(top, "arguments", &a) &&
        !json_object_object_get_ex(top, "parameters", &a))
        goto out;
    if (json_object_is_type(a, json_type_string)) {
        *rc = parse_json(json_object_get_string(a), (size_t)json_object_get_string_len(a), &inner);
        if (*rc == -EINVAL)
            *rc = 0;
        if (*rc < 0 || !json_object_is_type(inner, json_type_object))
            goto out;
        *rc = canon_string(inner, args, args_len);
        if (*rc < 0)
            goto out;
        *str_args = json_object_get(a);
    } else if (json_object_is_type(a, json_type_object)) {
        *rc = canon_string(a, args, args_len);
        if (*rc < 0)
            goto out;
    } else {
        goto out;
    }
    err = NULL;
out:
    json_object_put(inner);
    json_object_put(top);
    return err;
}

/* The closer is complete; blk ends with its first CLOSE_LEN - 1 bytes. */
static int
block_end(struct guard_toolcall *p)
{
    struct guard_toolcall_event ev = {.type = GUARD_TOOLCALL_CALL_END};
    struct json_object *str_args = NULL;
    char name[GUARD_TOOLCALL_MAX_NAME + 1];
    char *args = NULL;
    size_t args_len = 0;
    int rc = 0;

    p->close_match = CLOSE_LEN - 1;
    rc = flush_args(p);
    if (rc != 0)
        goto out;
    ev.index = p->n_begun - 1;
    ev.error =
        judge(p, p->overflow ? 0 : p->blk_len - (CLOSE_LEN - 1), &args, &args_len, &str_args, &rc);
    if (rc < 0)
        goto out;
    ev.ok = ev.error == NULL;
    if (ev.ok && str_args) {
        rc = emit_args(p, json_object_get_string(str_args),
                       (size_t)json_object_get_string_len(str_args));
        if (rc != 0)
            goto out;
    }
    if (ev.ok) {
        memcpy(name, p->name, sizeof(name));
        ev.name = name;
        ev.args = args;
        ev.args_len = args_len;
        p->n_ok++;
    } else {
        p->n_invalid++;
    }
    block_reset(p);
    rc = emit(p, &ev);
out:
    json_object_put(str_args);
    free(args);
    return rc;
}

/* Feeds block bytes from text[*i..n) until the closer or the end. */
static int
block_feed(struct guard_toolcall *p, const char *text, size_t n, size_t *i)
{
    int rc = 0;

    for (; *i < n && p->in_block; (*i)++) {
        char c = text[*i];
        bool was_str = p->in_str;
        size_t pos = p->blk_len;

        if (!was_str) {
            if (c == GUARD_TOOLCALL_CLOSE[p->close_match]) {
                if (++p->close_match == CLOSE_LEN) {
                    rc = block_end(p);
                    if (rc != 0)
                        return rc;
                    continue;
                }
            } else {
                p->close_match = c == '<';
            }
        }
        rc = blk_append(p, c);
        if (rc != 0)
            return rc;
        lex_byte(p, c);
        if (!p->overflow) {
            rc = grammar_byte(p, c, pos, was_str);
            if (rc != 0)
                return rc;
        }
    }
    return flush_args(p);
}

/* ---- Outside a block ---- */

static int
block_begin(struct guard_toolcall *p)
{
    struct guard_toolcall_event ev = {.type = GUARD_TOOLCALL_CALL_BEGIN};

    block_reset(p);
    p->in_block = true;
    ev.index = p->n_begun++;
    return emit(p, &ev);
}

/* Feeds content bytes from text[*i..n) until an opener completes or the end. */
static int
text_feed(struct guard_toolcall *p, const char *text, size_t n, size_t *i)
{
    size_t run = *i; /* start of content not yet sent */
    int rc = 0;

    while (*i < n) {
        char c = text[*i];
        if (p->open_match == 0) {
            const char *lt = memchr(text + *i, '<', n - *i);
            if (!lt)
                break;
            *i = (size_t)(lt - text);
            rc = emit_content(p, text + run, *i - run);
            if (rc != 0)
                return rc;
            p->open_match = 1;
            run = ++*i;
            continue;
        }
        if (c == GUARD_TOOLCALL_OPEN[p->open_match]) {
            run = ++*i;
            if (++p->open_match == OPEN_LEN) {
                p->open_match = 0;
                return block_begin(p);
            }
            continue;
        }
        /* the held bytes were content after all; c is looked at afresh */
        rc = emit_content(p, GUARD_TOOLCALL_OPEN, p->open_match);
        p->open_match = 0;
        run = *i;
        if (rc != 0)
            return rc;
    }
    *i = n;
    return emit_content(p, text + run, n - run);
}

/* ---- Public ---- */

int
guard_toolcall_new(size_t max_block_bytes, struct guard_toolcall **out)
{
    struct guard_toolcall *p = calloc(1, sizeof(*p));

    if (!p)
        return -ENOMEM;
    p->max_block = max_block_bytes ? max_block_bytes : GUARD_TOOLCALL_DEFAULT_MAX_BLOCK;
    if (p->max_block > SIZE_MAX / 4)
        p->max_block = SIZE_MAX / 4;
    block_reset(p);
    *out = p;
    return 0;
}

void
guard_toolcall_free(struct guard_toolcall *p)
{
    if (!p)
        return;
    free(p->blk);
    free(p);
}

int
guard_toolcall_feed(struct guard_toolcall *p, const char *text, size_t n,
                    guard_toolcall_event_fn cb, void *ctx)
{
    size_t i = 0;
    int rc = 0;

    if (p->stopped)
        return -ECANCELED;
    p->cb = cb;
    p->ctx = ctx;
    while (rc == 0 && i < n)
        rc = p->in_block ? block_feed(p, text, n, &i) : text_feed(p, text, n, &i);
    if (rc != 0)
        p->stopped = true;
    return rc;
}

int
guard_toolcall_finish(struct guard_toolcall *p, guard_toolcall_event_fn cb, void *ctx)
{
    struct guard_toolcall_event ev = {.type = GUARD_TOOLCALL_CALL_END};
    int rc = 0;

    if (p->stopped)
        return -ECANCELED;
    p->cb = cb;
    p->ctx = ctx;
    if (p->in_block) {
        ev.index = p->n_begun - 1;
        ev.error = "unclosed";
        p->n_invalid++;
        block_reset(p);
        rc = emit(p, &ev);
    } else if (p->open_match) {
        size_t held = p->open_match;
        p->open_match = 0;
        rc = emit_content(p, GUARD_TOOLCALL_OPEN, held);
    }
    return rc;
}

bool
guard_toolcall_in_call(const struct guard_toolcall *p)
{
    return p->in_block;
}

int
guard_toolcall_n_ok(const struct guard_toolcall *p)
{
    return p->n_ok;
}

int
guard_toolcall_n_invalid(const struct guard_toolcall *p)
{
    return p->n_invalid;
}

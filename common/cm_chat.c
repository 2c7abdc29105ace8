/*
 * cm_chat: see cm_chat.h. Each family's renderer mirrors its reference Jinja template statement by
 * statement; the comments quote the part of the template a branch reproduces.
 */
#include "common/cm_chat.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

/* ---- A growable output string ---- */

struct sbuf {
    char *p;
    size_t len;
    size_t cap;
    int err; /* first error (-ENOMEM); later appends are no-ops */
};

static void
sb_append(struct sbuf *b, const char *s, size_t n)
{
    if (b->err < 0)
        return;
    if (n > SIZE_MAX - b->len - 1) {
        b->err = -ENOMEM;
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap = cap > SIZE_MAX / 2 ? b->len + n + 1 : cap * 2;
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->err = -ENOMEM;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void
sb_puts(struct sbuf *b, const char *s)
{
    sb_append(b, s, strlen(s));
}

/* Hands the string to *out (an empty result is still a fresh "" string) or frees it. */
static int
sb_finish(struct sbuf *b, char **out)
{
    if (b->err == 0 && b->p == NULL)
        sb_append(b, "", 0);
    if (b->err < 0) {
        free(b->p);
        return b->err;
    }
    *out = b->p;
    return 0;
}

/* ---- Python str.strip() on UTF-8 ---- */

/* Code point of the UTF-8 sequence at s (at most n bytes) and its length in *len; invalid,
 * overlong or truncated sequences give -1 with *len 1 (never whitespace). */
static int32_t
utf8_decode(const unsigned char *s, size_t n, size_t *len)
{
    *len = 1;
    if (s[0] < 0x80)
        return s[0];
    size_t need = s[0] >= 0xf0 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc0 ? 2 : 0;
    if (need == 0 || need > n)
        return -1;
    int32_t cp = s[0] & (0x7f >> need);
    for (size_t i = 1; i < need; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return -1;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    static const int32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[need]) /* overlong: "\xc0\xa0" is not a space */
        return -1;
    *len = need;
    return cp;
}

/* Python's str.isspace(): the characters with bidi class WS/B/S or category Zs. */
static bool
is_py_space(int32_t cp)
{
    return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 ||
           cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 ||
           cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

/* Appends s without leading and trailing whitespace (Jinja `| trim`, Python .strip()). */
static void
sb_put_stripped(struct sbuf *b, const char *s)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t n = strlen(s), start = 0, end = n, len;

    while (start < n && is_py_space(utf8_decode(u + start, n - start, &len)))
        start += len;
    while (end > start) {
        size_t k = end - 1; /* back to the lead byte of the last character */
        while (k > start && end - k < 4 && (u[k] & 0xc0) == 0x80)
            k--;
        int32_t cp = utf8_decode(u + k, end - k, &len);
        if (k + len != end || !is_py_space(cp))
            break;
        end = k;
    }
    sb_append(b, s + start, end - start);
}

/* ---- Family detection and names ---- */

static bool
contains(const char *hay, size_t len, const char *needle)
{
    return memmem(hay, len, needle, strlen(needle)) != NULL;
}

enum cm_chat_family
cm_chat_detect(const char *tmpl, size_t len)
{
    if (tmpl == NULL || len == 0)
        return CM_CHAT_UNKNOWN;
    if (contains(tmpl, len, "<|im_start|>"))
        return CM_CHAT_CHATML;
    if (contains(tmpl, len, "<|start_header_id|>"))
        return CM_CHAT_LLAMA3;
    if (contains(tmpl, len, "[INST]") && contains(tmpl, len, "<<SYS>>"))
        return CM_CHAT_LLAMA2;
    return CM_CHAT_UNKNOWN;
}

static const char *const family_names[] = {
    [CM_CHAT_UNKNOWN] = "unknown",
    [CM_CHAT_CHATML] = "chatml",
    [CM_CHAT_LLAMA3] = "llama3",
    [CM_CHAT_LLAMA2] = "llama2",
};

#define N_FAMILIES ((int)(sizeof(family_names) / sizeof(family_names[0])))

const char *
cm_chat_family_name(enum cm_chat_family f)
{
    if ((int)f < 0 || (int)f >= N_FAMILIES)
        return "unknown";
    return family_names[f];
}

int
cm_chat_family_parse(const char *name, enum cm_chat_family *out)
{
    if (name == NULL || out == NULL)
        return -EINVAL;
    for (int i = 0; i < N_FAMILIES; i++) {
        if (strcmp(name, family_names[i]) == 0) {
            *out = (enum cm_chat_family)i;
            return 0;
        }
    }
    return -EINVAL;
}

/* ---- Default system prompt ---- */

struct sys_marker {
    const char *open;  /* starts the literal (decoded form) */
    const char *close; /* ends the system text */
};

static const struct sys_marker sys_markers[] = {
    {"<|im_start|>system\n", "<|im_end|>"},
    {"<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"},
};

/* Decodes the Jinja string literal whose opening quote is at t[q] (t has len bytes) into b.
 * Returns false if it is not terminated. */
static bool
decode_literal(const char *t, size_t len, size_t q, struct sbuf *b)
{
    char quote = t[q];
    for (size_t i = q + 1; i < len; i++) {
        char c = t[i];
        if (c == quote)
            return true;
        if (c == '\\' && i + 1 < len) {
            char e = t[++i];
            const char *rep = e == 'n' ? "\n" : e == 't' ? "\t" : e == 'r' ? "\r" : NULL;
            if (rep != NULL) {
                sb_puts(b, rep);
            } else if (e == '\\' || e == '\'' || e == '"') {
                sb_append(b, &e, 1);
            } else { /* other escapes are kept as written */
                sb_append(b, t + i - 1, 2);
            }
            continue;
        }
        sb_append(b, &c, 1);
    }
    return false;
}

/* The first literal in t that starts with m->open and holds m->close: 1 with the text between in
 * *out, 0 when there is none, or -ENOMEM. */
static int
find_system_literal(const char *t, size_t len, const struct sys_marker *m, char **out)
{
    /* The open marker up to its first newline is matched raw; the rest after decoding. */
    size_t key_len = strcspn(m->open, "\n");
    size_t pos = 0;
    const char *hit;

    while (pos < len && (hit = memmem(t + pos, len - pos, m->open, key_len)) != NULL) {
        size_t at = (size_t)(hit - t);
        pos = at + 1;
        if (at == 0 || (t[at - 1] != '\'' && t[at - 1] != '"'))
            continue;
        /* An escaped quote opens no literal. Skipping these also bounds the work: a literal's
         * scan stops at the next unescaped quote of its kind, which is where the next candidate
         * of that kind starts, so scans never overlap and the whole search is linear. */
        if (at >= 2 && t[at - 2] == '\\')
            continue;
        struct sbuf lit = {0};
        bool closed = decode_literal(t, len, at - 1, &lit);
        if (lit.err < 0)
            return lit.err;
        size_t open_len = strlen(m->open);
        const char *end = NULL;
        if (closed && lit.len >= open_len && memcmp(lit.p, m->open, open_len) == 0)
            end = strstr(lit.p + open_len, m->close);
        if (end == NULL) {
            free(lit.p);
            continue;
        }
        size_t n = (size_t)(end - (lit.p + open_len));
        memmove(lit.p, lit.p + open_len, n);
        lit.p[n] = '\0';
        *out = lit.p;
        return 1;
    }
    return 0;
}

int
cm_chat_default_system(const char *tmpl, size_t len, char **out)
{
    if (out == NULL || (tmpl == NULL && len > 0))
        return -EINVAL;
    for (size_t i = 0; i < sizeof(sys_markers) / sizeof(sys_markers[0]); i++) {
        char *text = NULL;
        int rc = find_system_literal(tmpl, len, &sys_markers[i], &text);
        if (rc < 0)
            return rc;
        if (rc > 0) {
            *out = text;
            return 0;
        }
    }
    *out = NULL;
    return 0;
}

/* ---- JSON the way the reference template's `tojson` (Python json.dumps) writes it ---- */

/* The inside of a JSON string literal of s (n bytes, may hold NULs), escaped as
 * json.dumps(ensure_ascii=False) does: \" \\ \b \f \n \r \t, other control bytes as \u00xx,
 * everything else verbatim. */
static void
sb_json_escape(struct sbuf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t run = 0; /* start of the pending verbatim bytes */

    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        sb_append(b, s + run, i - run);
        run = i + 1;
        const char *esc = c == '"'    ? "\\\""
                          : c == '\\' ? "\\\\"
                          : c == '\b' ? "\\b"
                          : c == '\f' ? "\\f"
                          : c == '\n' ? "\\n"
                          : c == '\r' ? "\\r"
                          : c == '\t' ? "\\t"
                                      : NULL;
        if (esc != NULL) {
            sb_puts(b, esc);
        } else {
            char u[7] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15], '\0'};
            sb_puts(b, u);
        }
    }
    sb_append(b, s + run, n - run);
}

static void
sb_json_string(struct sbuf *b, const char *s, size_t n)
{
    sb_puts(b, "\"");
    sb_json_escape(b, s, n);
    sb_puts(b, "\"");
}

/* v (NULL is JSON null) on one line with ", " and ": " separators, keys in their given order.
 * Scalars other than strings keep json-c's text, which for numbers is the text they were parsed
 * from. The recursion is bounded by the tokener's nesting limit. */
static void
sb_json_value(struct sbuf *b, struct json_object *v)
{
    switch (json_object_get_type(v)) {
    case json_type_object: {
        bool first = true;
        sb_puts(b, "{");
        json_object_object_foreach(v, key, val)
        {
            sb_puts(b, first ? "" : ", ");
            first = false;
            sb_json_string(b, key, strlen(key));
            sb_puts(b, ": ");
            sb_json_value(b, val);
        }
        sb_puts(b, "}");
        break;
    }
    case json_type_array: {
        size_t n = json_object_array_length(v);
        sb_puts(b, "[");
        for (size_t i = 0; i < n; i++) {
            sb_puts(b, i ? ", " : "");
            sb_json_value(b, json_object_array_get_idx(v, i));
        }
        sb_puts(b, "]");
        break;
    }
    case json_type_string:
        sb_json_string(b, json_object_get_string(v), (size_t)json_object_get_string_len(v));
        break;
    case json_type_null:
        sb_puts(b, "null");
        break;
    default: {
        const char *t = json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN);
        if (t == NULL)
            b->err = -ENOMEM;
        else
            sb_puts(b, t);
        break;
    }
    }
}

/* Parses the whole of text (trailing whitespace allowed) as strict JSON into *out (NULL for
 * `null`; caller releases with json_object_put). Returns 0, -EINVAL (not JSON) or -ENOMEM (no
 * tokener). */
static int
json_parse_all(const char *text, struct json_object **out)
{
    struct json_tokener *tok = json_tokener_new();
    struct json_object *v = NULL;
    size_t len = strlen(text);
    int rc = -EINVAL;

    if (tok == NULL)
        return -ENOMEM;
    if (len >= INT32_MAX)
        goto out;
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
    /* The terminating NUL is passed too: it ends a top-level number or literal, which would
     * otherwise wait for more input. */
    v = json_tokener_parse_ex(tok, text, (int)len + 1);
    /* json-c 0.16 has no distinct error for a failed allocation inside the tokener: it reads as
     * invalid JSON. */
    if (json_tokener_get_error(tok) != json_tokener_success)
        goto out;
    size_t used = json_tokener_get_parse_end(tok);
    if (used < len && text[used + strspn(text + used, " \t\r\n")] != '\0')
        goto out;
    *out = v;
    v = NULL;
    rc = 0;
out:
    json_object_put(v);
    json_tokener_free(tok);
    return rc;
}

/* tools_json as a non-empty array of objects in *out, or NULL for NULL and "[]". */
static int
parse_tools(const char *tools_json, struct json_object **out)
{
    struct json_object *v = NULL;
    int rc;

    *out = NULL;
    if (tools_json == NULL)
        return 0;
    rc = json_parse_all(tools_json, &v);
    if (rc < 0)
        return rc;
    rc = -EINVAL;
    if (!json_object_is_type(v, json_type_array))
        goto out;
    size_t n = json_object_array_length(v);
    for (size_t i = 0; i < n; i++) {
        if (!json_object_is_type(json_object_array_get_idx(v, i), json_type_object))
            goto out;
    }
    if (n > 0) {
        *out = v;
        v = NULL;
    }
    rc = 0;
out:
    json_object_put(v);
    return rc;
}

/* ---- Tool text shared by the families ---- */

/* The call block, in the words of CM_CHAT_TOOLS_TAIL: TC_OPEN escaped-name TC_ARGS arguments
 * TC_CLOSE. cm_chat_tool_prefix hands out its start, so the two cannot drift apart. */
#define TC_OPEN "<tool_call>\n{\"name\": \""
#define TC_ARGS "\", \"arguments\": "
#define TC_CLOSE "}\n</tool_call>"

/* Appends the instructions after the system text that starts at b->p[mark]. */
static void
put_tools_block(struct sbuf *b, size_t mark, struct json_object *tools)
{
    if (b->len > mark)
        sb_puts(b, "\n\n");
    sb_puts(b, CM_CHAT_TOOLS_HEAD);
    size_t n = json_object_array_length(tools);
    for (size_t i = 0; i < n; i++) {
        sb_puts(b, "\n");
        sb_json_value(b, json_object_array_get_idx(tools, i));
    }
    sb_puts(b, CM_CHAT_TOOLS_TAIL);
}

/* One <tool_call> block for a call in the history. */
static void
put_tool_call(struct sbuf *b, const struct cm_chat_tool_call *c)
{
    sb_puts(b, TC_OPEN);
    sb_json_escape(b, c->name, strlen(c->name));
    sb_puts(b, TC_ARGS);
    if (c->arguments == NULL) {
        sb_puts(b, "{}");
    } else {
        struct json_object *args = NULL;
        int rc = json_parse_all(c->arguments, &args);
        if (rc == 0)
            sb_json_value(b, args);
        else if (rc == -EINVAL) /* as `tojson` renders a string */
            sb_json_string(b, c->arguments, strlen(c->arguments));
        else
            b->err = rc;
        json_object_put(args);
    }
    sb_puts(b, TC_CLOSE);
}

/* ---- Rendering ---- */

static const char *
role_name(const char *role)
{
    return strcmp(role, "developer") == 0 ? "system" : role;
}

static bool
is_system(const struct cm_chat_msg *m)
{
    return strcmp(role_name(m->role), "system") == 0;
}

static bool
is_tool(const struct cm_chat_msg *m)
{
    return strcmp(m->role, "tool") == 0;
}

/* What a renderer needs besides the messages. */
struct render_in {
    const char *default_system;
    struct json_object *tools; /* non-empty array or NULL */
    bool add_generation_prompt;
};

/* Qwen2.5: with tools, '<|im_start|>system\n' + (messages[0].content if it is a system message
 * else the default) + the tool text + '<|im_end|>\n', and the loop skips messages[0]; assistant
 * messages with tool_calls and runs of tool messages as described in cm_chat.h. Without tools and
 * tool messages this is SmolLM2's
 * {{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}. */
static void
render_chatml(struct sbuf *b, const struct render_in *in, const struct cm_chat_msg *msgs, int n)
{
    bool own_sys = is_system(&msgs[0]);
    int first = 0;

    if (in->tools != NULL) {
        const char *sys = own_sys ? msgs[0].content : in->default_system;
        sb_puts(b, "<|im_start|>system\n");
        size_t mark = b->len;
        sb_puts(b, sys != NULL ? sys : "");
        put_tools_block(b, mark, in->tools);
        sb_puts(b, "<|im_end|>\n");
        first = own_sys ? 1 : 0;
    } else if (in->default_system != NULL && !own_sys) {
        sb_puts(b, "<|im_start|>system\n");
        sb_puts(b, in->default_system);
        sb_puts(b, "<|im_end|>\n");
    }
    for (int i = first; i < n; i++) {
        const struct cm_chat_msg *m = &msgs[i];
        if (is_tool(m)) {
            if (i == first || !is_tool(&msgs[i - 1]))
                sb_puts(b, "<|im_start|>user");
            sb_puts(b, "\n<tool_response>\n");
            sb_puts(b, m->content);
            sb_puts(b, "\n</tool_response>");
            if (i == n - 1 || !is_tool(&msgs[i + 1]))
                sb_puts(b, "<|im_end|>\n");
        } else if (m->n_tool_calls > 0) {
            sb_puts(b, "<|im_start|>assistant");
            if (m->content != NULL && m->content[0] != '\0') {
                sb_puts(b, "\n");
                sb_puts(b, m->content);
            }
            for (int k = 0; k < m->n_tool_calls; k++) {
                sb_puts(b, "\n");
                put_tool_call(b, &m->tool_calls[k]);
            }
            sb_puts(b, "<|im_end|>\n");
        } else {
            sb_puts(b, "<|im_start|>");
            sb_puts(b, role_name(m->role));
            sb_puts(b, "\n");
            sb_puts(b, m->content);
            sb_puts(b, "<|im_end|>\n");
        }
    }
    if (in->add_generation_prompt)
        sb_puts(b, "<|im_start|>assistant\n");
}

/* '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim +
 * '<|eot_id|>', with bos_token before the first message (left to the tokenizer). The tool parts
 * are ours (Llama 3.0's template has none): see cm_chat.h. */
static void
render_llama3(struct sbuf *b, const struct render_in *in, const struct cm_chat_msg *msgs, int n)
{
    bool own_sys = is_system(&msgs[0]);
    int first = 0;

    if (in->tools != NULL) {
        sb_puts(b, "<|start_header_id|>system<|end_header_id|>\n\n");
        size_t mark = b->len;
        if (own_sys)
            sb_put_stripped(b, msgs[0].content);
        else if (in->default_system != NULL)
            sb_puts(b, in->default_system);
        put_tools_block(b, mark, in->tools);
        sb_puts(b, "<|eot_id|>");
        first = own_sys ? 1 : 0;
    } else if (in->default_system != NULL && !own_sys) {
        sb_puts(b, "<|start_header_id|>system<|end_header_id|>\n\n");
        sb_puts(b, in->default_system);
        sb_puts(b, "<|eot_id|>");
    }
    for (int i = first; i < n; i++) {
        const struct cm_chat_msg *m = &msgs[i];
        sb_puts(b, "<|start_header_id|>");
        sb_puts(b, is_tool(m) ? "ipython" : role_name(m->role));
        sb_puts(b, "<|end_header_id|>\n\n");
        size_t mark = b->len;
        if (m->content != NULL)
            sb_put_stripped(b, m->content);
        for (int k = 0; k < m->n_tool_calls; k++) {
            if (b->len > mark)
                sb_puts(b, "\n");
            put_tool_call(b, &m->tool_calls[k]);
        }
        sb_puts(b, "<|eot_id|>");
    }
    if (in->add_generation_prompt)
        sb_puts(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

/* Llama 2: an optional leading system message is folded into the first user turn as
 * '<<SYS>>\n' + system + '\n<</SYS>>\n\n'; then, alternating from a user turn,
 * user: bos_token + '[INST] ' + content.strip() + ' [/INST]'
 * assistant: ' ' + content.strip() + ' ' + eos_token.
 * raise_exception when (role == 'user') != (index is even); other roles render nothing. */
static int
render_llama2(struct sbuf *b, const char *default_system, const struct cm_chat_msg *msgs, int n)
{
    const char *sys = default_system;
    int first = 0;
    if (is_system(&msgs[0])) {
        sys = msgs[0].content;
        first = 1;
    }
    for (int i = first; i < n; i++) {
        int idx = i - first;
        const char *role = role_name(msgs[i].role);
        bool user = strcmp(role, "user") == 0;
        if (user != (idx % 2 == 0))
            return -EINVAL;
        if (user) {
            if (idx > 0)
                sb_puts(b, "<s>"); /* the first BOS comes from the tokenizer */
            sb_puts(b, "[INST] ");
            if (idx == 0 && sys != NULL) {
                /* The strip applies to the joined string, so build it first. */
                struct sbuf joined = {0};
                sb_puts(&joined, "<<SYS>>\n");
                sb_puts(&joined, sys);
                sb_puts(&joined, "\n<</SYS>>\n\n");
                sb_puts(&joined, msgs[i].content);
                if (joined.err < 0)
                    b->err = joined.err;
                else
                    sb_put_stripped(b, joined.p);
                free(joined.p);
            } else {
                sb_put_stripped(b, msgs[i].content);
            }
            sb_puts(b, " [/INST]");
        } else if (strcmp(role, "assistant") == 0) {
            sb_puts(b, " ");
            sb_put_stripped(b, msgs[i].content);
            sb_puts(b, " </s>");
        }
    }
    return 0;
}

/* The structural rules of cm_chat_render_ex's -EINVAL; *has_calls tells whether any assistant
 * message carries tool calls. */
static int
check_msgs(const struct cm_chat_msg *msgs, int n, bool *has_calls)
{
    *has_calls = false;
    for (int i = 0; i < n; i++) {
        const struct cm_chat_msg *m = &msgs[i];
        if (m->role == NULL || m->role[0] == '\0' || m->n_tool_calls < 0)
            return -EINVAL;
        if (m->n_tool_calls > 0) {
            if (m->tool_calls == NULL || strcmp(m->role, "assistant") != 0)
                return -EINVAL;
            for (int k = 0; k < m->n_tool_calls; k++) {
                if (m->tool_calls[k].name == NULL || m->tool_calls[k].name[0] == '\0')
                    return -EINVAL;
            }
            *has_calls = true;
        } else if (m->content == NULL) {
            return -EINVAL;
        }
    }
    return 0;
}

bool
cm_chat_supports_tools(enum cm_chat_family f)
{
    return f == CM_CHAT_CHATML || f == CM_CHAT_LLAMA3;
}

int
cm_chat_render_ex(enum cm_chat_family f, const struct cm_chat_opts *o,
                  const struct cm_chat_msg *msgs, int n, char **out)
{
    static const struct cm_chat_opts no_opts;
    struct sbuf b = {0};
    struct render_in in = {0};
    bool has_calls = false;
    int rc;

    if (msgs == NULL || out == NULL || n < 1)
        return -EINVAL;
    if (o == NULL)
        o = &no_opts;
    rc = check_msgs(msgs, n, &has_calls);
    if (rc < 0)
        return rc;
    rc = parse_tools(o->tools_json, &in.tools);
    if (rc < 0)
        return rc;
    in.default_system = o->default_system;
    in.add_generation_prompt = o->add_generation_prompt;
    if ((in.tools != NULL || has_calls) && !cm_chat_supports_tools(f)) {
        rc = f == CM_CHAT_UNKNOWN || f == CM_CHAT_LLAMA2 ? -ENOTSUP : -EINVAL;
        goto out;
    }
    switch (f) {
    case CM_CHAT_CHATML:
        render_chatml(&b, &in, msgs, n);
        break;
    case CM_CHAT_LLAMA3:
        render_llama3(&b, &in, msgs, n);
        break;
    case CM_CHAT_LLAMA2:
        rc = render_llama2(&b, in.default_system, msgs, n);
        break;
    default:
        rc = -EINVAL;
        break;
    }
    if (rc == 0)
        rc = sb_finish(&b, out);
    else
        free(b.p);
out:
    json_object_put(in.tools);
    return rc;
}

int
cm_chat_render(enum cm_chat_family f, const char *default_system, const struct cm_chat_msg *msgs,
               int n, bool add_generation_prompt, char **out)
{
    const struct cm_chat_opts o = {
        .default_system = default_system,
        .add_generation_prompt = add_generation_prompt,
    };
    return cm_chat_render_ex(f, &o, msgs, n, out);
}

int
cm_chat_tool_prefix(enum cm_chat_family f, const char *name, char **out)
{
    struct sbuf b = {0};

    if (out == NULL || (name != NULL && name[0] == '\0'))
        return -EINVAL;
    if (!cm_chat_supports_tools(f))
        return -ENOTSUP;
    sb_puts(&b, TC_OPEN);
    if (name != NULL) {
        sb_json_escape(&b, name, strlen(name));
        sb_puts(&b, TC_ARGS);
    }
    return sb_finish(&b, out);
}

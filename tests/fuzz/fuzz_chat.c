/*
 * fuzz_chat: libFuzzer harness for the chat template module (common/cm_chat). Input layout:
 *   byte 0       flags: bits 0-1 the family (unknown, chatml, llama3, llama2), bit 2
 *                add_generation_prompt, bit 3 use the template's default system prompt, bit 4 take
 *                the family from cm_chat_detect of the template instead of bits 0-1;
 *   then fields separated by NUL bytes:
 *     field 0    a template (Jinja source): cm_chat_detect and cm_chat_default_system;
 *     field 1    tools_json (empty: none);
 *     fields 2.. one message each: its first byte picks the role (1..5: system, developer,
 *                user, assistant, tool; an empty field is an empty user message; for any other
 *                value the rest up to ':' is the role itself),
 *                the rest is the content; in an assistant message, 0x01 bytes end the content and
 *                start a tool call "name 0x02 arguments" (an empty name stays empty, content
 *                "\x03" alone means content NULL); in a tool message 0x01 separates content and
 *                tool_call_id. At most 64 messages and 16 calls.
 * Properties checked (anything else is abort()):
 *   - cm_chat_detect of the template field is the same whether or not the text after it is
 *     visible (it reads only len bytes); cm_chat_family_parse(cm_chat_family_name(f)) == f;
 *   - cm_chat_default_system returns 0 or -ENOMEM, and its text is NUL-terminated;
 *   - cm_chat_render_ex returns 0, -EINVAL, -ENOTSUP or -ENOMEM; on success the text is
 *     NUL-terminated, the same on a second call, ends in the generation prompt when one was asked
 *     for (ChatML, Llama 3), and in ChatML contains every user message's content verbatim;
 *   - cm_chat_tool_prefix returns 0 for families with tools and -ENOTSUP without.
 * Seeds (tests/fuzz/corpus/chat/): the SmolLM2, Qwen2.5, Llama 3 and Llama 2 templates with
 * conversations: plain, system + multi-turn, tools with an assistant call and its tool result,
 * parallel calls, non-JSON arguments, Llama 2 alternation, unknown template.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_chat.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_MSGS 64
#define MAX_CALLS 16

static void
die(const char *what, int rc)
{
    fprintf(stderr, "fuzz_chat: %s (rc %d)\n", what, rc);
    abort();
}

/* The conversation parsed from the message fields; strings point into one mutable copy. */
struct convo {
    struct cm_chat_msg msgs[MAX_MSGS];
    struct cm_chat_tool_call calls[MAX_CALLS];
    int n_msgs, n_calls;
};

static const char *const roles[] = {"system", "developer", "user", "assistant", "tool"};

static void
parse_calls(struct convo *c, struct cm_chat_msg *m, char *rest)
{
    m->tool_calls = &c->calls[c->n_calls];
    while (rest != NULL && c->n_calls < MAX_CALLS) {
        char *next = strchr(rest, '\x01');
        if (next)
            *next++ = '\0';
        struct cm_chat_tool_call *tc = &c->calls[c->n_calls++];
        char *args = strchr(rest, '\x02');
        if (args)
            *args++ = '\0';
        tc->id = "call_0";
        tc->name = rest;
        tc->arguments = args;
        m->n_tool_calls++;
        rest = next;
    }
    if (m->n_tool_calls == 0)
        m->tool_calls = NULL;
}

static void
parse_msg(struct convo *c, char *f)
{
    struct cm_chat_msg *m = &c->msgs[c->n_msgs++];
    memset(m, 0, sizeof(*m));
    unsigned char sel = (unsigned char)*f;
    if (sel != '\0')
        f++;
    if (sel == 0) {
        m->role = "user";
    } else if (sel <= 5) {
        m->role = roles[sel - 1];
    } else {
        char *colon = strchr(f, ':');
        m->role = f;
        if (colon) {
            *colon = '\0';
            f = colon + 1;
        } else {
            f += strlen(f);
        }
    }
    m->content = f;
    char *sep = strchr(f, '\x01');
    if (sep)
        *sep++ = '\0';
    if (strcmp(m->role, "assistant") == 0 && sep)
        parse_calls(c, m, sep);
    else if (strcmp(m->role, "tool") == 0 && sep)
        m->tool_call_id = sep;
    if (strcmp(f, "\x03") == 0)
        m->content = NULL;
}

static void
check_render(enum cm_chat_family fam, const struct cm_chat_opts *o, const struct convo *c)
{
    char *out = NULL, *again = NULL;
    int rc = cm_chat_render_ex(fam, o, c->msgs, c->n_msgs, &out);
    if (rc != 0) {
        if (rc != -EINVAL && rc != -ENOTSUP && rc != -ENOMEM)
            die("cm_chat_render_ex: an unexpected error", rc);
        if (out != NULL)
            die("cm_chat_render_ex wrote *out on failure", rc);
        return;
    }
    if (cm_chat_render_ex(fam, o, c->msgs, c->n_msgs, &again) == 0 && strcmp(out, again) != 0)
        die("two renders of one conversation differ", 0);
    const char *gen = fam == CM_CHAT_CHATML   ? "<|im_start|>assistant\n"
                      : fam == CM_CHAT_LLAMA3 ? "<|start_header_id|>assistant<|end_header_id|>\n\n"
                                              : NULL;
    size_t n = strlen(out);
    if (o->add_generation_prompt && gen != NULL &&
        (n < strlen(gen) || strcmp(out + n - strlen(gen), gen) != 0))
        die("the render does not end in the generation prompt", 0);
    for (int i = 0; fam == CM_CHAT_CHATML && i < c->n_msgs; i++)
        if (strcmp(c->msgs[i].role, "user") == 0 && strstr(out, c->msgs[i].content) == NULL)
            die("a ChatML render lost a user message", i);
    free(again);
    free(out);
}

static void
check_template(const char *tmpl, size_t len, const char *whole, char **sys)
{
    enum cm_chat_family f = cm_chat_detect(tmpl, len);
    enum cm_chat_family back = CM_CHAT_UNKNOWN;
    if (cm_chat_detect(whole, len) != f)
        die("cm_chat_detect is not a function of its len bytes", f);
    if (cm_chat_family_parse(cm_chat_family_name(f), &back) != 0 || back != f)
        die("family name round trip", f);
    int rc = cm_chat_default_system(tmpl, len, sys);
    if (rc != 0 && rc != -ENOMEM)
        die("cm_chat_default_system: an unexpected error", rc);
    if (rc == 0 && *sys != NULL)
        (void)strlen(*sys);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t flags = data[0];
    /* a private copy with a terminating NUL: fields are cut in place. The message fields follow
     * the template, so cm_chat_detect(buf, tlen) sees more text after its len bytes. */
    char *buf = malloc(size);
    if (buf == NULL)
        return 0;
    memcpy(buf, data + 1, size - 1);
    buf[size - 1] = '\0';
    size_t n = size - 1;

    size_t tlen = strnlen(buf, n);
    /* the template without a NUL after it: a copy of exactly tlen bytes */
    char *tmpl = malloc(tlen ? tlen : 1);
    if (tmpl == NULL) {
        free(buf);
        return 0;
    }
    memcpy(tmpl, buf, tlen);
    char *sys = NULL;
    check_template(tmpl, tlen, buf, &sys);

    enum cm_chat_family fam =
        (flags & 16) ? cm_chat_detect(tmpl, tlen) : (enum cm_chat_family)(flags & 3);
    struct cm_chat_opts o = {
        .default_system = (flags & 8) ? sys : NULL,
        .add_generation_prompt = (flags & 4) != 0,
    };
    struct convo c;
    memset(&c, 0, sizeof(c));
    size_t pos = tlen < n ? tlen + 1 : n;
    if (pos < n) {
        size_t l = strlen(buf + pos);
        if (l > 0)
            o.tools_json = buf + pos;
        pos += l + 1;
    }
    while (pos < n && c.n_msgs < MAX_MSGS) {
        size_t l = strlen(buf + pos);
        parse_msg(&c, buf + pos);
        pos += l + 1;
    }
    if (c.n_msgs > 0)
        check_render(fam, &o, &c);
    char *prefix = NULL;
    int rc = cm_chat_tool_prefix(fam, c.n_calls > 0 && c.calls[0].name[0] ? c.calls[0].name : NULL,
                                 &prefix);
    if (rc != 0 && rc != -ENOMEM && !(rc == -ENOTSUP && !cm_chat_supports_tools(fam)))
        die("cm_chat_tool_prefix: an unexpected result", rc);
    free(prefix);
    free(sys);
    free(tmpl);
    free(buf);
    return 0;
}

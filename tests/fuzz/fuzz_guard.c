/*
 * fuzz_guard: libFuzzer harness for the loop guards (guards/guard). Input layout:
 *   byte 0     bit 0: the server's master switch off (--no-guards); bits 1-4: token_loop's
 *              n_repeats (0..15) for guard_token_loop_check; bits 5-7: the largest chunk (1..8
 *              bytes) of the split text feed;
 *   then fields separated by NUL bytes:
 *     field 0  a request's "guards" JSON, applied with guard_config_override;
 *     field 1  output token ids (one per byte) for guard_token_loop_check;
 *     fields 2.. by their first byte: 1..5 a history message of role system, developer, user,
 *              assistant, tool (assistant: content, then per 0x01 a call "name 0x02 arguments",
 *              ids "c0", "c1", ... in order; tool: content 0x01 tool_call_id); 6 a response call
 *              "name 0x02 arguments" (arguments canonicalised when they are JSON); 7 the token
 *              count of an open tool-call block (the field's length times 64); anything else
 *              response content text (made valid UTF-8 by guard_utf8 first).
 *              At most 64 history messages and 64 calls.
 * Properties checked (anything else is abort()):
 *   - guard_config_override gives 0 or -EINVAL with a message; on -EINVAL the config is
 *     unchanged; on success no value is above the server's, except token_loop's, and with the
 *     master switch off no guard is active (guard_config_active);
 *   - two guard objects from the same config and history, one fed each text field whole and one
 *     fed it in chunks cut at character boundaries (calls and token counts alike), agree after
 *     every field (content verdicts do not depend on the split); a tripped guard stays tripped with
 *     the same id, and every feed returns guard_tripped(); with the master switch off nothing
 *     trips;
 *   - guard_token_loop_check at every prefix of the ids agrees with a reference written the other
 *     way round (the last n_repeats blocks of p tokens are equal, compared block by block).
 * Seeds (tests/fuzz/corpus/guard/): a history with a failed shell call and its repeat, a run of
 * identical calls, a name run, line and sentence loops in text with fenced code, an unterminated
 * tool call, token loops, overrides that lower, disable, raise (rejected) and enable token_loop.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "common/cm_chat.h"
#include "guards/guard.h"
#include "guards/guard_toolcall.h"
#include "guards/guard_utf8.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_MSGS 64
#define MAX_CALLS 64

static void
die(const char *what, long v)
{
    fprintf(stderr, "fuzz_guard: %s (%ld)\n", what, v);
    abort();
}

static void
check_override(struct guard_config *c, const char *json)
{
    struct json_object *o = json_tokener_parse(json);
    if (o == NULL)
        return;
    struct guard_config before = *c;
    char err[256];
    err[0] = '\0';
    int rc = guard_config_override(c, o, err, sizeof(err));
    if (rc == -EINVAL) {
        if (err[0] == '\0' || memcmp(&before, c, sizeof(before)) != 0)
            die("a refused override without a message, or one that changed the config", rc);
    } else if (rc != 0) {
        die("guard_config_override: an unexpected result", rc);
    } else {
        for (int i = 0; i < GUARD_N; i++) {
            if (!c->enabled && guard_config_active(c, (enum guard_id)i))
                die("a guard runs under --no-guards", i);
            if (i != GUARD_TOKEN_LOOP && c->value[i] > before.value[i]) {
                die("an override raised a guard", i);
            }
        }
        if (c->enabled != before.enabled)
            die("an override changed the master switch", 0);
    }
    json_object_put(o);
}

static bool
token_loop_ref(const int32_t *ids, int n, int r)
{
    if (r < 2 || n < GUARD_TOKEN_LOOP_START || n % GUARD_TOKEN_LOOP_EVERY != 0)
        return false;
    for (int p = GUARD_TOKEN_LOOP_MIN_PERIOD; p <= GUARD_TOKEN_LOOP_MAX_PERIOD && p * r <= n; p++) {
        const int32_t *last = ids + n - p;
        int k = 1;
        while (k < r && memcmp(last, last - (size_t)k * p, (size_t)p * sizeof(*ids)) == 0)
            k++;
        if (k == r)
            return true;
    }
    return false;
}

static void
check_token_loop(const char *f, size_t n, int r)
{
    int32_t ids[1024];
    if (n > 1024)
        n = 1024;
    for (size_t i = 0; i < n; i++) {
        ids[i] = (unsigned char)f[i];
        if (guard_token_loop_check(ids, (int)i + 1, r) != token_loop_ref(ids, (int)i + 1, r))
            die("guard_token_loop_check differs from the reference", (long)i + 1);
    }
}

/* The parsed history; strings point into the harness's copy of the input. */
struct hist {
    struct cm_chat_msg msgs[MAX_MSGS];
    struct cm_chat_tool_call calls[MAX_CALLS];
    char ids[MAX_CALLS][8];
    int n_msgs, n_calls;
};

static const char *const roles[] = {"system", "developer", "user", "assistant", "tool"};

static void
hist_add(struct hist *h, int role, char *f)
{
    struct cm_chat_msg *m = &h->msgs[h->n_msgs++];
    memset(m, 0, sizeof(*m));
    m->role = roles[role];
    m->content = f;
    char *sep = strchr(f, '\x01');
    if (sep)
        *sep++ = '\0';
    if (role == 4) {
        m->tool_call_id = sep;
        return;
    }
    if (role != 3 || sep == NULL)
        return;
    m->tool_calls = &h->calls[h->n_calls];
    while (sep != NULL && h->n_calls < MAX_CALLS) {
        char *next = strchr(sep, '\x01');
        if (next)
            *next++ = '\0';
        struct cm_chat_tool_call *c = &h->calls[h->n_calls];
        snprintf(h->ids[h->n_calls], sizeof(h->ids[0]), "c%d", h->n_calls);
        c->id = h->ids[h->n_calls++];
        c->name = sep;
        c->arguments = strchr(sep, '\x02');
        if (c->arguments)
            *(char *)c->arguments++ = '\0';
        m->n_tool_calls++;
        sep = next;
    }
}

/* Feeds valid text t[0..n) in chunks of 1..largest bytes, cut back to character boundaries. */
static enum guard_id
feed_chunked(struct guard *g, const char *t, size_t n, size_t largest)
{
    enum guard_id id = guard_tripped(g);
    size_t pos = 0;
    while (pos < n) {
        size_t k = largest < n - pos ? largest : n - pos;
        while (pos + k < n && ((unsigned char)t[pos + k] & 0xC0) == 0x80)
            k++;
        id = guard_feed_text(g, t + pos, k);
        pos += k;
    }
    return id;
}

static void
check_same(struct guard *a, struct guard *b, enum guard_id ra, enum guard_id rb, bool enabled)
{
    if (ra != guard_tripped(a) || rb != guard_tripped(b))
        die("a feed returned something other than guard_tripped()", ra);
    if (ra != rb)
        die("the verdict depends on how the text is split", ra * 100 + rb);
    if (!enabled && ra != GUARD_NONE)
        die("a guard tripped under --no-guards", ra);
}

static void
feed_call(struct guard *a, struct guard *b, char *f, enum guard_id *ra, enum guard_id *rb)
{
    char *args = strchr(f, '\x02');
    if (args)
        *args++ = '\0';
    else
        args = (char *)"{}";
    char *canon = NULL;
    const char *use = args;
    if (guard_json_canonical(args, strlen(args), &canon) == 0)
        use = canon;
    *ra = guard_feed_call(a, f, use, strlen(use));
    *rb = guard_feed_call(b, f, use, strlen(use));
    free(canon);
}

static void
run_response(struct guard *a, struct guard *b, char **fields, int n_fields, size_t largest,
             bool enabled)
{
    for (int i = 0; i < n_fields; i++) {
        unsigned char sel = (unsigned char)fields[i][0];
        char *f = fields[i] + (sel ? 1 : 0);
        enum guard_id before = guard_tripped(a), ra = GUARD_NONE, rb = GUARD_NONE;
        if (sel >= 1 && sel <= 5) {
            continue; /* history */
        } else if (sel == 6) {
            feed_call(a, b, f, &ra, &rb);
        } else if (sel == 7) {
            ra = guard_feed_call_tokens(a, (int)strlen(f) * 64);
            rb = guard_feed_call_tokens(b, (int)strlen(f) * 64);
        } else {
            struct guard_utf8 u;
            char *t = NULL, *t2 = NULL;
            size_t tn = 0, tn2 = 0;
            guard_utf8_init(&u);
            if (guard_utf8_feed(&u, f, strlen(f), &t, &tn) != 0 ||
                guard_utf8_flush(&u, &t2, &tn2) != 0)
                die("guard_utf8 failed", 0);
            ra = guard_feed_text(a, t, tn);
            ra = guard_feed_text(a, t2, tn2);
            rb = feed_chunked(b, t, tn, largest);
            rb = feed_chunked(b, t2, tn2, largest);
            free(t);
            free(t2);
        }
        if (before != GUARD_NONE && ra != before)
            die("a tripped guard changed its verdict", ra);
        check_same(a, b, ra, rb, enabled);
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t flags = data[0];
    char *buf = malloc(size);
    if (buf == NULL)
        return 0;
    memcpy(buf, data + 1, size - 1);
    buf[size - 1] = '\0';
    size_t n = size - 1;

    char *fields[256];
    int n_fields = 0;
    for (size_t pos = 0; pos < n && n_fields < 256; pos += strlen(buf + pos) + 1)
        fields[n_fields++] = buf + pos;
    struct guard_config cfg;
    guard_config_init(&cfg);
    if (flags & 1)
        cfg.enabled = false;
    if (n_fields > 0)
        check_override(&cfg, fields[0]);
    if (n_fields > 1)
        check_token_loop(fields[1], strlen(fields[1]), (flags >> 1) & 15);

    static struct hist h;
    memset(&h, 0, sizeof(h));
    for (int i = 2; i < n_fields; i++)
        if (fields[i][0] >= 1 && fields[i][0] <= 5 && h.n_msgs < MAX_MSGS)
            hist_add(&h, fields[i][0] - 1, fields[i] + 1);
    struct guard *a = NULL, *b = NULL;
    if (guard_new(&cfg, h.msgs, h.n_msgs, &a) != 0 || guard_new(&cfg, h.msgs, h.n_msgs, &b) != 0)
        die("guard_new failed", 0);
    if (n_fields > 2)
        run_response(a, b, fields + 2, n_fields - 2, 1 + (flags >> 5), cfg.enabled);
    guard_free(a);
    guard_free(b);
    free(buf);
    return 0;
}

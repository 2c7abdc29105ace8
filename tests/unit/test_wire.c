/*
 * Unit tests for common/cm_wire: the frame header layout; every message encoded, cut into frames by
 * the reader from one piece, byte by byte and in random splits, decoded and compared; rejections
 * (header fields, oversize lengths from the header alone, truncated and malformed payloads, wrong
 * field types, out-of-range values, caps); the fd paths over a socketpair (bounded reader buffer,
 * partial non-blocking writes); and allocation-failure injection on every allocation the module
 * makes itself (glibc malloc replaced in this binary; skipped under sanitizers, which own malloc).
 * json-c's own allocations are counted for leaks but never failed: json-c 0.16 is not safe under
 * allocation failure (its tokener passes a failed strdup to strlen; a failed table resize leaks
 * the key), so failing them would test json-c, not this module.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <json-c/json.h>

#include "common/cm_wire.h"

/* ---- Allocation-failure injection ---- */

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define WIRE_SANITIZED 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) ||                         \
    __has_feature(memory_sanitizer)
#define WIRE_SANITIZED 1
#endif
#endif

#ifndef WIRE_SANITIZED
static bool fi_on;      /* counting and failing only inside a window */
static long fi_fail_at; /* fail the fi_fail_at-th allocation of the window (1-based); 0: none */
static long fi_count;   /* allocations attempted in the window by code of this executable */
static long fi_live;    /* allocations made in the window minus those freed in it (any caller) */

static void
fi_begin(long fail_at)
{
    fi_fail_at = fail_at;
    fi_count = 0;
    fi_live = 0;
    fi_on = true;
}

static void
fi_end(void)
{
    fi_on = false;
}

/* glibc allows replacing malloc, calloc, realloc and free; these forward to its own. */
void *__libc_malloc(size_t n);
void *__libc_calloc(size_t count, size_t size);
void *__libc_realloc(void *p, size_t n);
void __libc_free(void *p);

/* The bounds of this executable's code (linker symbols), where libllm.a's objects are linked. */
extern char __executable_start[], etext[];

static bool
fi_should_fail(const void *caller)
{
    if (!fi_on || (const char *)caller < __executable_start || (const char *)caller >= etext)
        return false;
    return ++fi_count == fi_fail_at;
}

void *
malloc(size_t n)
{
    if (fi_should_fail(__builtin_return_address(0)))
        return NULL;
    void *p = __libc_malloc(n);
    if (p != NULL && fi_on)
        fi_live++;
    return p;
}

void *
calloc(size_t count, size_t size)
{
    if (fi_should_fail(__builtin_return_address(0)))
        return NULL;
    void *p = __libc_calloc(count, size);
    if (p != NULL && fi_on)
        fi_live++;
    return p;
}

void *
realloc(void *p, size_t n)
{
    if (fi_should_fail(__builtin_return_address(0)))
        return NULL;
    void *q = __libc_realloc(p, n);
    if (fi_on) {
        if (p == NULL && q != NULL)
            fi_live++;
        else if (p != NULL && n == 0)
            fi_live--;
    }
    return q;
}

void
free(void *p)
{
    if (p != NULL && fi_on)
        fi_live--;
    __libc_free(p);
}
#endif

/* Whether the malloc above is the one running: not under a sanitizer or valgrind, which replace
 * it with their own (fault injection would then test nothing). */
static bool
fi_works(void)
{
#ifdef WIRE_SANITIZED
    return false;
#else
    void *(*volatile alloc)(size_t) = malloc;
    fi_begin(0);
    void *p = alloc(16);
    long count = fi_count;
    fi_end();
    free(p);
    return count == 1;
#endif
}

/* ---- Helpers ---- */

static uint64_t
rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

enum split { SPLIT_WHOLE, SPLIT_BYTES, SPLIT_RANDOM };

#define MAX_GOT 64

/* Frames cut by a reader, payloads copied out (the reader's pointers move on the next feed). */
struct got {
    int n;
    int rc; /* the reader's error, 0 if none */
    struct cm_wire_frame f[MAX_GOT];
};

static void
got_free(struct got *g)
{
    for (int i = 0; i < g->n; i++)
        free((void *)g->f[i].payload);
    g->n = 0;
}

static void
collect(const uint8_t *data, size_t n, enum split mode, uint64_t seed, uint32_t max_payload,
        struct got *g)
{
    struct cm_wire_reader r;
    assert_int_equal(cm_wire_reader_init(&r, max_payload), 0);
    memset(g, 0, sizeof(*g));
    uint64_t s = seed | 1;
    size_t pos = 0;
    while (pos < n && g->rc == 0) {
        size_t chunk = n - pos;
        if (mode == SPLIT_BYTES)
            chunk = 1;
        else if (mode == SPLIT_RANDOM)
            chunk = 1 + rng_next(&s) % 61;
        if (chunk > n - pos)
            chunk = n - pos;
        assert_int_equal(cm_wire_reader_feed(&r, data + pos, chunk), 0);
        pos += chunk;
        struct cm_wire_frame f;
        int rc;
        while ((rc = cm_wire_reader_next(&r, &f)) == 1) {
            assert_true(g->n < MAX_GOT);
            uint8_t *copy = NULL;
            if (f.len > 0) {
                copy = malloc(f.len);
                assert_non_null(copy);
                memcpy(copy, f.payload, f.len);
            }
            f.payload = copy;
            g->f[g->n++] = f;
        }
        if (rc < 0)
            g->rc = rc;
    }
    if (g->rc == 0)
        assert_int_equal(cm_wire_reader_buffered(&r), 0);
    cm_wire_reader_fini(&r);
}

typedef void (*check_fn)(const struct cm_wire_frame *f, const void *expected);

/* Encoded bytes -> reader (whole, byte by byte, 8 random splittings) -> one frame -> check. */
static void
roundtrip(const struct cm_wire_buf *b, enum cm_wire_type type, uint64_t req_id, check_fn check,
          const void *expected)
{
    for (int mode = 0; mode < 10; mode++) {
        struct got g;
        enum split sp = mode == 0 ? SPLIT_WHOLE : mode == 1 ? SPLIT_BYTES : SPLIT_RANDOM;
        collect(cm_wire_buf_head(b), cm_wire_buf_pending(b), sp, (uint64_t)mode * 7919, 0, &g);
        assert_int_equal(g.rc, 0);
        assert_int_equal(g.n, 1);
        assert_int_equal(g.f[0].type, type);
        assert_int_equal(g.f[0].flags, 0);
        assert_true(g.f[0].req_id == req_id);
        check(&g.f[0], expected);
        got_free(&g);
    }
}

static struct cm_wire_frame
raw_frame(enum cm_wire_type type, const char *payload)
{
    struct cm_wire_frame f = {
        .type = (uint16_t)type,
        .flags = 0,
        .req_id = 1,
        .len = (uint32_t)strlen(payload),
        .payload = (const uint8_t *)payload,
    };
    if (f.len == 0)
        f.payload = NULL;
    return f;
}

static bool
float_same(float a, float b)
{
    return memcmp(&a, &b, sizeof(a)) == 0;
}

/* ---- Names and header ---- */

static void
test_wire_names(void **state)
{
    (void)state;
    assert_string_equal(cm_wire_type_name(CM_WIRE_SUBMIT), "SUBMIT");
    assert_string_equal(cm_wire_type_name(CM_WIRE_STATS_REPLY), "STATS_REPLY");
    assert_string_equal(cm_wire_type_name(0), "UNKNOWN");
    assert_string_equal(cm_wire_type_name(11), "UNKNOWN");
    assert_int_equal(cm_wire_type_dir(CM_WIRE_CANCEL), CM_WIRE_TO_ENGINE);
    assert_int_equal(cm_wire_type_dir(CM_WIRE_TOKEN), CM_WIRE_TO_WORKER);
    assert_int_equal(cm_wire_type_dir(99), CM_WIRE_DIR_NONE);
    for (int i = 0; i <= CM_WIRE_FINISH_MAX; i++) {
        enum cm_wire_finish f;
        assert_int_equal(cm_wire_finish_parse(cm_wire_finish_name((enum cm_wire_finish)i), &f), 0);
        assert_int_equal(f, i);
    }
    enum cm_wire_finish f = CM_WIRE_FINISH_EOS;
    assert_int_equal(cm_wire_finish_parse("stop", &f), -EINVAL);
    assert_string_equal(cm_wire_finish_name((enum cm_wire_finish)42), "unknown");
    int errs[] = {EAGAIN, E2BIG, EPROTO, EMSGSIZE, EINVAL, ECANCELED, ENOSPC, ETIMEDOUT};
    for (size_t i = 0; i < sizeof(errs) / sizeof(errs[0]); i++) {
        const char *name = cm_wire_errno_name(-errs[i]);
        assert_non_null(name);
        assert_string_equal(name, cm_wire_errno_name(errs[i]));
        int v = 0;
        assert_int_equal(cm_wire_errno_parse(name, &v), 0);
        assert_int_equal(v, -errs[i]);
    }
    assert_string_equal(cm_wire_errno_name(-EAGAIN), "EAGAIN");
    assert_string_equal(cm_wire_errno_name(-E2BIG), "E2BIG");
    assert_null(cm_wire_errno_name(-EXDEV));
    int v = 0;
    assert_int_equal(cm_wire_errno_parse("EFOO", &v), -EINVAL);
    assert_int_equal(cm_wire_errno_parse("eagain", &v), -EINVAL);
}

static void
test_wire_header_layout(void **state)
{
    (void)state;
    struct cm_wire_buf b;
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_frame(&b, CM_WIRE_CANCEL, 0x0102030405060708ull, "abc", 3), 0);
    static const uint8_t want[] = {
        'L', 'L', 'M', 'W', 1, 0, 8, 0, 0, 0, 0,   0,   3,   0,
        0,   0,   8,   7,   6, 5, 4, 3, 2, 1, 'a', 'b', 'c',
    };
    assert_int_equal(cm_wire_buf_pending(&b), sizeof(want));
    assert_memory_equal(cm_wire_buf_head(&b), want, sizeof(want));

    struct cm_wire_header h;
    assert_int_equal(cm_wire_header_check(want, sizeof(want), 1 << 20, &h), 1);
    assert_int_equal(h.version, 1);
    assert_int_equal(h.type, CM_WIRE_CANCEL);
    assert_int_equal(h.len, 3);
    assert_true(h.req_id == 0x0102030405060708ull);
    for (size_t n = 0; n < CM_WIRE_HEADER_BYTES; n++)
        assert_int_equal(cm_wire_header_check(want, n, 1 << 20, &h), 0);
    /* The cap is on the payload: exactly max_payload is accepted, one more is not. */
    assert_int_equal(cm_wire_header_check(want, sizeof(want), 3, &h), 1);
    assert_int_equal(cm_wire_header_check(want, sizeof(want), 2, &h), -EMSGSIZE);

    assert_int_equal(cm_wire_encode_frame(&b, (enum cm_wire_type)0, 1, NULL, 0), -EINVAL);
    assert_int_equal(cm_wire_encode_frame(&b, (enum cm_wire_type)11, 1, NULL, 0), -EINVAL);
    assert_int_equal(cm_wire_buf_pending(&b), sizeof(want));
    cm_wire_buf_fini(&b);

    assert_int_equal(cm_wire_buf_init(&b, CM_WIRE_MIN_MAX_PAYLOAD - 1), -EINVAL);
    assert_int_equal(cm_wire_buf_init(&b, CM_WIRE_MAX_MAX_PAYLOAD + 1), -EINVAL);
    struct cm_wire_reader r;
    assert_int_equal(cm_wire_reader_init(&r, CM_WIRE_MAX_MAX_PAYLOAD + 1), -EINVAL);
}

/* ---- Round trips ---- */

static void
check_hello(const struct cm_wire_frame *f, const void *expected)
{
    const struct cm_wire_hello *e = expected;
    struct cm_wire_hello m;
    char err[CM_WIRE_ERR_LEN] = "";
    assert_int_equal(cm_wire_decode_hello(f, &m, err, sizeof(err)), 0);
    assert_int_equal(m.version, e->version);
    assert_string_equal(m.client, e->client);
}

static void
test_wire_roundtrip_hello(void **state)
{
    (void)state;
    struct cm_wire_hello m = {.version = 1, .client = "llm-fcgi/0.1 (pid 42)"};
    struct cm_wire_buf b;
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_hello(&b, 0, &m), 0);
    roundtrip(&b, CM_WIRE_HELLO, 0, check_hello, &m);
    cm_wire_buf_fini(&b);
}

static void
model_info_fill(struct cm_wire_model_info *m)
{
    cm_wire_model_info_init(m);
    strcpy(m->model, "SmolLM2-135M-Instruct.Q4_1 \xc3\xa9");
    m->n_ctx = 8192;
    m->n_vocab = 49152;
    m->chat_family = CM_CHAT_CHATML;
    m->default_system = "You are a helpful AI assistant named SmolLM, \"trained\" by\n"
                        "Hugging Face \xe2\x9c\x93 </script> \\";
    m->bos.id = 1;
    strcpy(m->bos.text, "<|im_start|>");
    m->eos.id = 2;
    strcpy(m->eos.text, "<|im_end|>");
    m->caps = CM_WIRE_CAP_LOGPROBS | CM_WIRE_CAP_PROMPT_IDS | CM_WIRE_CAP_SPILL;
    m->max_payload = 4u << 20;
}

static void
model_info_equal(const struct cm_wire_model_info *m, const struct cm_wire_model_info *e)
{
    assert_string_equal(m->model, e->model);
    assert_int_equal(m->n_ctx, e->n_ctx);
    assert_int_equal(m->n_vocab, e->n_vocab);
    assert_int_equal(m->chat_family, e->chat_family);
    if (e->default_system == NULL)
        assert_null(m->default_system);
    else
        assert_string_equal(m->default_system, e->default_system);
    const struct cm_wire_special *ms[] = {&m->bos, &m->eos, &m->eot};
    const struct cm_wire_special *es[] = {&e->bos, &e->eos, &e->eot};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(ms[i]->id, es[i]->id);
        assert_string_equal(ms[i]->text, es[i]->text);
    }
    assert_int_equal(m->caps, e->caps);
    assert_int_equal(m->max_payload, e->max_payload);
}

static void
check_model_info(const struct cm_wire_frame *f, const void *expected)
{
    struct cm_wire_model_info m;
    char err[CM_WIRE_ERR_LEN] = "";
    int rc = cm_wire_decode_model_info(f, &m, err, sizeof(err));
    if (rc != 0)
        fail_msg("decode: %d %s", rc, err);
    model_info_equal(&m, expected);
    cm_wire_model_info_fini(&m);
    assert_null(m.default_system);
}

static void
test_wire_roundtrip_model_info(void **state)
{
    (void)state;
    struct cm_wire_model_info m;
    model_info_fill(&m);
    struct cm_wire_buf b;
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_model_info(&b, 0, &m), 0);
    roundtrip(&b, CM_WIRE_MODEL_INFO, 0, check_model_info, &m);
    cm_wire_buf_fini(&b);

    /* No default system prompt, no specials, an unknown family, no capabilities. */
    cm_wire_model_info_init(&m);
    strcpy(m.model, "m");
    m.n_ctx = 1;
    m.n_vocab = 1;
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_model_info(&b, 0, &m), 0);
    roundtrip(&b, CM_WIRE_MODEL_INFO, 0, check_model_info, &m);
    cm_wire_buf_fini(&b);
}

static const int32_t submit_ids[] = {1, 9690, 49151, 0, 28};
static const int32_t submit_stops[] = {2, 0, 49151};
static struct cm_wire_logit_bias submit_bias[] = {
    {15, -100.0f}, {0, 100.0f}, {49151, 0.25f}, {7, -0.1f}};

static void
submit_fill(struct cm_wire_submit *s, bool with_ids)
{
    cm_wire_submit_init(s);
    if (with_ids) {
        s->prompt_ids = (int32_t *)submit_ids;
        s->n_prompt_ids = sizeof(submit_ids) / sizeof(submit_ids[0]);
    } else {
        s->prompt = "<|im_start|>user\nHello, w\xc3\xb6rld \"quoted\" \\ \t\x01</s>"
                    "\xf0\x9f\x98\x80<|im_end|>\n";
        s->prompt_len = strlen(s->prompt);
    }
    s->max_tokens = 512;
    s->sampling.temperature = 0.7f;
    s->sampling.top_k = 40;
    s->sampling.top_p = 0.95f;
    s->sampling.min_p = 0.05f;
    s->sampling.repetition_penalty = 1.1f;
    s->sampling.repeat_last_n = 0;
    s->sampling.presence_penalty = -1.5f;
    s->sampling.frequency_penalty = 3e-8f;
    s->sampling.has_seed = true;
    s->sampling.seed = UINT64_MAX;
    s->sampling.logit_bias = submit_bias;
    s->sampling.n_logit_bias = sizeof(submit_bias) / sizeof(submit_bias[0]);
    s->stop_ids = (int32_t *)submit_stops;
    s->n_stop_ids = sizeof(submit_stops) / sizeof(submit_stops[0]);
    s->logprobs = true;
    s->top_logprobs = 20;
    s->deadline_ms = 30000;
    s->priority = -5;
    s->add_special = false;
    s->parse_special = true;
    s->token_loop = 3;
}

static void
submit_equal(const struct cm_wire_submit *s, const struct cm_wire_submit *e)
{
    assert_int_equal(s->prompt == NULL, e->prompt == NULL);
    if (e->prompt != NULL) {
        assert_int_equal(s->prompt_len, e->prompt_len);
        assert_memory_equal(s->prompt, e->prompt, e->prompt_len);
        assert_int_equal(s->prompt[s->prompt_len], '\0');
    }
    assert_int_equal(s->n_prompt_ids, e->n_prompt_ids);
    if (e->n_prompt_ids > 0)
        assert_memory_equal(s->prompt_ids, e->prompt_ids, e->n_prompt_ids * sizeof(int32_t));
    assert_int_equal(s->max_tokens, e->max_tokens);
    const struct cm_wire_sampling *p = &s->sampling, *q = &e->sampling;
    assert_true(float_same(p->temperature, q->temperature));
    assert_int_equal(p->top_k, q->top_k);
    assert_true(float_same(p->top_p, q->top_p));
    assert_true(float_same(p->min_p, q->min_p));
    assert_true(float_same(p->repetition_penalty, q->repetition_penalty));
    assert_int_equal(p->repeat_last_n, q->repeat_last_n);
    assert_true(float_same(p->presence_penalty, q->presence_penalty));
    assert_true(float_same(p->frequency_penalty, q->frequency_penalty));
    assert_int_equal(p->has_seed, q->has_seed);
    assert_true(p->seed == q->seed);
    assert_int_equal(p->n_logit_bias, q->n_logit_bias);
    for (uint32_t i = 0; i < q->n_logit_bias; i++) {
        assert_int_equal(p->logit_bias[i].id, q->logit_bias[i].id);
        assert_true(float_same(p->logit_bias[i].bias, q->logit_bias[i].bias));
    }
    assert_int_equal(s->n_stop_ids, e->n_stop_ids);
    if (e->n_stop_ids > 0)
        assert_memory_equal(s->stop_ids, e->stop_ids, e->n_stop_ids * sizeof(int32_t));
    assert_int_equal(s->logprobs, e->logprobs);
    assert_int_equal(s->top_logprobs, e->top_logprobs);
    assert_int_equal(s->deadline_ms, e->deadline_ms);
    assert_int_equal(s->priority, e->priority);
    assert_int_equal(s->add_special, e->add_special);
    assert_int_equal(s->parse_special, e->parse_special);
    assert_int_equal(s->token_loop, e->token_loop);
}

static void
check_submit(const struct cm_wire_frame *f, const void *expected)
{
    struct cm_wire_submit s;
    char err[CM_WIRE_ERR_LEN] = "";
    int rc = cm_wire_decode_submit(f, &s, err, sizeof(err));
    if (rc != 0)
        fail_msg("decode: %d %s", rc, err);
    submit_equal(&s, expected);
    cm_wire_submit_fini(&s);
    assert_null(s.prompt);
}

static void
test_wire_roundtrip_submit(void **state)
{
    (void)state;
    struct cm_wire_submit s;
    struct cm_wire_buf b;
    for (int with_ids = 0; with_ids < 2; with_ids++) {
        submit_fill(&s, with_ids);
        assert_int_equal(cm_wire_buf_init(&b, 0), 0);
        assert_int_equal(cm_wire_encode_submit(&b, 77, &s), 0);
        roundtrip(&b, CM_WIRE_SUBMIT, 77, check_submit, &s);
        cm_wire_buf_fini(&b);
    }
    /* Defaults only: no seed, no bias, no stops, greedy; an empty prompt is a prompt. */
    cm_wire_submit_init(&s);
    s.prompt = "";
    s.max_tokens = 1;
    s.sampling.temperature = 0;
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_submit(&b, 78, &s), 0);
    roundtrip(&b, CM_WIRE_SUBMIT, 78, check_submit, &s);
    cm_wire_buf_fini(&b);
}

/* Defaults of a minimal SUBMIT, and null fields count as absent. */
static void
test_wire_submit_defaults(void **state)
{
    (void)state;
    struct cm_wire_frame f = raw_frame(
        CM_WIRE_SUBMIT, "{\"prompt\":\"hi\",\"max_tokens\":3,\"temperature\":null,\"seed\":null,"
                        "\"future_field\":{\"nested\":[1,2,{\"x\":null}]}}");
    struct cm_wire_submit s, d;
    char err[CM_WIRE_ERR_LEN] = "";
    int rc = cm_wire_decode_submit(&f, &s, err, sizeof(err));
    if (rc != 0)
        fail_msg("decode: %d %s", rc, err);
    cm_wire_submit_init(&d);
    d.prompt = "hi";
    d.prompt_len = 2;
    d.max_tokens = 3;
    submit_equal(&s, &d);
    assert_true(float_same(s.sampling.temperature, 1.0f));
    assert_int_equal(s.sampling.repeat_last_n, 64);
    assert_true(s.add_special);
    assert_false(s.parse_special);
    assert_false(s.sampling.has_seed);
    assert_int_equal(s.token_loop, 0);
    cm_wire_submit_fini(&s);
}

static void
check_accepted(const struct cm_wire_frame *f, const void *expected)
{
    const struct cm_wire_accepted *e = expected;
    struct cm_wire_accepted m;
    assert_int_equal(cm_wire_decode_accepted(f, &m, NULL, 0), 0);
    assert_int_equal(m.prompt_tokens, e->prompt_tokens);
    assert_int_equal(m.cached_tokens, e->cached_tokens);
}

static void
test_wire_roundtrip_accepted(void **state)
{
    (void)state;
    struct cm_wire_accepted m = {.prompt_tokens = 0xfffffff0u, .cached_tokens = 4096};
    struct cm_wire_buf b;
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_accepted(&b, 5, &m), 0);
    assert_int_equal(cm_wire_buf_pending(&b), CM_WIRE_HEADER_BYTES + 8);
    roundtrip(&b, CM_WIRE_ACCEPTED, 5, check_accepted, &m);
    m.cached_tokens = m.prompt_tokens + 1;
    assert_int_equal(cm_wire_encode_accepted(&b, 5, &m), -EINVAL);
    cm_wire_buf_fini(&b);
}

static void
check_token(const struct cm_wire_frame *f, const void *expected)
{
    const struct cm_wire_token *e = expected;
    struct cm_wire_token m;
    char err[CM_WIRE_ERR_LEN] = "";
    int rc = cm_wire_decode_token(f, &m, err, sizeof(err));
    if (rc != 0)
        fail_msg("decode: %d %s", rc, err);
    assert_int_equal(m.id, e->id);
    assert_int_equal(m.flags, e->flags);
    assert_true(float_same(m.logprob, e->logprob));
    assert_int_equal(m.n_top, e->n_top);
    for (uint32_t i = 0; i < e->n_top; i++) {
        assert_int_equal(m.top_ids[i], e->top_ids[i]);
        assert_true(float_same(m.top_logprobs[i], e->top_logprobs[i]));
    }
    assert_int_equal(m.text_len, e->text_len);
    assert_memory_equal(m.text, e->text, e->text_len);
    assert_int_equal(m.text[m.text_len], '\0');
    for (uint32_t i = 0; (e->flags & CM_WIRE_TOKEN_TOP_TEXT) && i < e->n_top; i++) {
        assert_int_equal(m.top_len[i], e->top_len[i]);
        assert_memory_equal(m.top_text + m.top_off[i], e->top_text + e->top_off[i], e->top_len[i]);
    }
}

static void
test_wire_roundtrip_token(void **state)
{
    (void)state;
    static struct cm_wire_token m;
    memset(&m, 0, sizeof(m));
    m.id = 49151;
    m.flags = CM_WIRE_TOKEN_LOGPROB;
    m.logprob = -0.6931472f;
    m.n_top = CM_WIRE_MAX_TOP_LOGPROBS;
    for (uint32_t i = 0; i < m.n_top; i++) {
        m.top_ids[i] = (int32_t)(i * 1000);
        m.top_logprobs[i] = i == 19 ? -INFINITY : -(float)i * 0.37f;
    }
    /* A partial UTF-8 sequence and a NUL byte are legal token text. */
    memcpy(m.text, "a\0\xe2\x82", 4);
    m.text_len = 4;
    struct cm_wire_buf b;
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_token(&b, 9, &m), 0);
    assert_int_equal(cm_wire_buf_pending(&b), CM_WIRE_HEADER_BYTES + 16 + 8 * 20 + 4);
    roundtrip(&b, CM_WIRE_TOKEN, 9, check_token, &m);
    cm_wire_buf_fini(&b);

    /* The alternatives' texts: packed after the text; an empty one; one too many is refused. */
    m.flags |= CM_WIRE_TOKEN_TOP_TEXT;
    size_t total = 0;
    for (uint32_t i = 0; i < m.n_top; i++) {
        m.top_off[i] = (uint16_t)(CM_WIRE_MAX_TOP_TEXT - 1 - i * 3);
        m.top_len[i] = (uint16_t)(i % 2 ? 0 : 1);
        m.top_text[m.top_off[i]] = (char)('A' + i);
        total += 2 + m.top_len[i];
    }
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_token(&b, 9, &m), 0);
    assert_int_equal(cm_wire_buf_pending(&b), CM_WIRE_HEADER_BYTES + 16 + 8 * 20 + 4 + total);
    roundtrip(&b, CM_WIRE_TOKEN, 9, check_token, &m);
    m.top_len[0] = 2; /* runs past the end of top_text */
    assert_int_equal(cm_wire_encode_token(&b, 9, &m), -EINVAL);
    cm_wire_buf_fini(&b);
    /* A frame whose top texts are truncated or followed by junk is -EPROTO. */
    {
        uint8_t pl[16 + 8 + 1 + 2 + 3];
        memset(pl, 0, sizeof(pl));
        pl[4] = CM_WIRE_TOKEN_LOGPROB | CM_WIRE_TOKEN_TOP_TEXT;
        pl[12] = 1;         /* n_top */
        pl[14] = 1;         /* text_len */
        pl[16 + 8 + 1] = 5; /* top text of 5 bytes, only 3 present */
        struct cm_wire_frame f = {.type = CM_WIRE_TOKEN, .len = sizeof(pl), .payload = pl};
        struct cm_wire_token d;
        assert_int_equal(cm_wire_decode_token(&f, &d, NULL, 0), -EPROTO);
        pl[16 + 8 + 1] = 2; /* 2 bytes, then one extra byte */
        assert_int_equal(cm_wire_decode_token(&f, &d, NULL, 0), -EPROTO);
        pl[16 + 8 + 1] = 3;
        assert_int_equal(cm_wire_decode_token(&f, &d, NULL, 0), 0);
        assert_int_equal(d.top_len[0], 3);
    }

    /* Longest text, no logprobs, a control token. */
    memset(&m, 0, sizeof(m));
    m.id = 2;
    m.flags = CM_WIRE_TOKEN_SPECIAL;
    m.text_len = CM_WIRE_MAX_TOKEN_TEXT;
    memset(m.text, 'x', m.text_len);
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_token(&b, 9, &m), 0);
    roundtrip(&b, CM_WIRE_TOKEN, 9, check_token, &m);
    cm_wire_buf_fini(&b);
}

static void
check_done(const struct cm_wire_frame *f, const void *expected)
{
    const struct cm_wire_done *e = expected;
    struct cm_wire_done m;
    char err[CM_WIRE_ERR_LEN] = "";
    int rc = cm_wire_decode_done(f, &m, err, sizeof(err));
    if (rc != 0)
        fail_msg("decode: %d %s", rc, err);
    assert_int_equal(m.finish, e->finish);
    assert_string_equal(m.guard, e->guard);
    assert_int_equal(m.prompt_tokens, e->prompt_tokens);
    assert_int_equal(m.completion_tokens, e->completion_tokens);
    assert_int_equal(m.cached_tokens, e->cached_tokens);
    assert_true(m.queue_ms == e->queue_ms);
    assert_true(m.prefill_ms == e->prefill_ms);
    assert_true(m.decode_ms == e->decode_ms);
}

static void
test_wire_roundtrip_done(void **state)
{
    (void)state;
    struct cm_wire_buf b;
    for (int fin = 0; fin <= CM_WIRE_FINISH_MAX; fin++) {
        struct cm_wire_done m = {
            .finish = (enum cm_wire_finish)fin,
            .prompt_tokens = 4000000000u,
            .completion_tokens = 17,
            .cached_tokens = 32,
            .queue_ms = 0.1,
            .prefill_ms = 1234.5678901234567,
            .decode_ms = 0,
        };
        if (fin == CM_WIRE_FINISH_CANCELLED)
            strcpy(m.guard, "name_run_cap");
        assert_int_equal(cm_wire_buf_init(&b, 0), 0);
        assert_int_equal(cm_wire_encode_done(&b, 3, &m), 0);
        roundtrip(&b, CM_WIRE_DONE, 3, check_done, &m);
        cm_wire_buf_fini(&b);
    }
}

static void
check_error(const struct cm_wire_frame *f, const void *expected)
{
    const struct cm_wire_error *e = expected;
    struct cm_wire_error m;
    assert_int_equal(cm_wire_decode_error(f, &m, NULL, 0), 0);
    assert_int_equal(m.code, e->code);
    assert_int_equal(m.retry_after_ms, e->retry_after_ms);
    assert_string_equal(m.message, e->message);
}

static void
test_wire_roundtrip_error(void **state)
{
    (void)state;
    struct cm_wire_error m = {.code = -EAGAIN, .retry_after_ms = 1000};
    strcpy(m.message, "queue full (64 waiting) \xe2\x80\x94 retry");
    struct cm_wire_buf b;
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_error(&b, 12, &m), 0);
    roundtrip(&b, CM_WIRE_ERROR, 12, check_error, &m);
    cm_wire_buf_fini(&b);
    m.code = -E2BIG;
    m.retry_after_ms = 0;
    memset(m.message, 'm', CM_WIRE_MAX_MESSAGE);
    m.message[CM_WIRE_MAX_MESSAGE] = '\0';
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_error(&b, 12, &m), 0);
    roundtrip(&b, CM_WIRE_ERROR, 12, check_error, &m);
    cm_wire_buf_fini(&b);
}

static void
check_cancel(const struct cm_wire_frame *f, const void *expected)
{
    const struct cm_wire_cancel *e = expected;
    struct cm_wire_cancel m;
    assert_int_equal(cm_wire_decode_cancel(f, &m, NULL, 0), 0);
    assert_string_equal(m.reason, e->reason);
}

static void
test_wire_roundtrip_cancel(void **state)
{
    (void)state;
    const char *reasons[] = {CM_WIRE_CANCEL_CLIENT_DISCONNECT, CM_WIRE_CANCEL_SHUTDOWN,
                             "sentence_loop", "a-B.c:9"};
    for (size_t i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++) {
        struct cm_wire_cancel m;
        strcpy(m.reason, reasons[i]);
        struct cm_wire_buf b;
        assert_int_equal(cm_wire_buf_init(&b, 0), 0);
        assert_int_equal(cm_wire_encode_cancel(&b, 44, &m), 0);
        roundtrip(&b, CM_WIRE_CANCEL, 44, check_cancel, &m);
        cm_wire_buf_fini(&b);
    }
}

static void
check_stats(const struct cm_wire_frame *f, const void *expected)
{
    (void)expected;
    assert_int_equal(f->len, 0);
    assert_null(f->payload);
    assert_int_equal(cm_wire_decode_stats(f, NULL, 0), 0);
}

static void
check_stats_reply(const struct cm_wire_frame *f, const void *expected)
{
    struct cm_wire_stats_reply m = {NULL};
    assert_int_equal(cm_wire_decode_stats_reply(f, &m, NULL, 0), 0);
    assert_true(json_object_equal(m.obj, (struct json_object *)expected));
    cm_wire_stats_reply_fini(&m);
    assert_null(m.obj);
}

static void
test_wire_roundtrip_stats(void **state)
{
    (void)state;
    struct cm_wire_buf b;
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_stats(&b, 0), 0);
    assert_int_equal(cm_wire_buf_pending(&b), CM_WIRE_HEADER_BYTES);
    roundtrip(&b, CM_WIRE_STATS, 0, check_stats, NULL);
    cm_wire_buf_fini(&b);

    struct json_object *o = json_tokener_parse(
        "{\"requests\":12,\"running\":2,\"kv_blocks\":{\"used\":10,\"total\":512},"
        "\"cancels\":{\"client_disconnect\":1,\"name_run_cap\":3},\"ttft_ms\":[1.5,2,4.25]}");
    assert_non_null(o);
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_stats_reply(&b, 0, o), 0);
    roundtrip(&b, CM_WIRE_STATS_REPLY, 0, check_stats_reply, o);
    cm_wire_buf_fini(&b);
    json_object_put(o);

    struct json_object *arr = json_object_new_array();
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_stats_reply(&b, 0, arr), -EINVAL);
    assert_int_equal(cm_wire_buf_pending(&b), 0);
    cm_wire_buf_fini(&b);
    json_object_put(arr);
}

/* A whole conversation in one stream, cut at random: every frame comes out in order. */
static void
test_wire_pipelined_frames(void **state)
{
    (void)state;
    struct cm_wire_buf b;
    struct cm_wire_submit s;
    struct cm_wire_token t;
    memset(&t, 0, sizeof(t));
    submit_fill(&s, false);
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    struct cm_wire_hello hello = {.version = 1, .client = "t"};
    assert_int_equal(cm_wire_encode_hello(&b, 0, &hello), 0);
    assert_int_equal(cm_wire_encode_submit(&b, 100, &s), 0);
    for (int i = 0; i < 40; i++) {
        t.id = i;
        t.text_len = (uint32_t)(i % 5);
        memset(t.text, 'a' + i % 26, t.text_len);
        assert_int_equal(cm_wire_encode_token(&b, 100 + (uint64_t)i, &t), 0);
    }
    assert_int_equal(cm_wire_encode_stats(&b, 0), 0);
    for (int mode = 0; mode < 12; mode++) {
        struct got g;
        enum split sp = mode == 0 ? SPLIT_WHOLE : mode == 1 ? SPLIT_BYTES : SPLIT_RANDOM;
        collect(cm_wire_buf_head(&b), cm_wire_buf_pending(&b), sp, (uint64_t)mode + 1, 0, &g);
        assert_int_equal(g.rc, 0);
        assert_int_equal(g.n, 43);
        assert_int_equal(g.f[0].type, CM_WIRE_HELLO);
        check_submit(&g.f[1], &s);
        for (int i = 0; i < 40; i++) {
            struct cm_wire_token m;
            assert_int_equal(cm_wire_decode_token(&g.f[2 + i], &m, NULL, 0), 0);
            assert_int_equal(m.id, i);
            assert_true(g.f[2 + i].req_id == 100 + (uint64_t)i);
            assert_int_equal(m.text_len, i % 5);
        }
        assert_int_equal(g.f[42].type, CM_WIRE_STATS);
        got_free(&g);
    }
    cm_wire_buf_fini(&b);
}

/* ---- Header rejections ---- */

static void
good_header(uint8_t h[CM_WIRE_HEADER_BYTES], uint16_t type, uint32_t len)
{
    struct cm_wire_header hd = {.version = 1, .type = type, .flags = 0, .len = len, .req_id = 7};
    cm_wire_header_pack(&hd, h);
}

/* Feeds bytes one at a time; returns the reader's first error and how many bytes it took. */
static int
first_error(const uint8_t *p, size_t n, uint32_t max_payload, size_t *at)
{
    struct cm_wire_reader r;
    struct cm_wire_frame f;
    int rc = 0;
    assert_int_equal(cm_wire_reader_init(&r, max_payload), 0);
    *at = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        assert_int_equal(cm_wire_reader_feed(&r, p + i, 1), 0);
        *at = i + 1;
        rc = cm_wire_reader_next(&r, &f);
        if (rc == 1) { /* a whole frame, only at its last byte */
            assert_int_equal(i + 1, n);
            rc = 0;
            break;
        }
    }
    if (rc < 0) { /* sticky */
        assert_int_equal(cm_wire_reader_next(&r, &f), rc);
        assert_int_equal(cm_wire_reader_feed(&r, "x", 1), rc);
    }
    cm_wire_reader_fini(&r);
    return rc;
}

static void
test_wire_reject_header(void **state)
{
    (void)state;
    uint8_t h[CM_WIRE_HEADER_BYTES + 4];
    size_t at = 0;

    good_header(h, CM_WIRE_CANCEL, 4);
    memcpy(h + CM_WIRE_HEADER_BYTES, "{}  ", 4);
    assert_int_equal(first_error(h, sizeof(h), 0, &at), 0);

    /* An HTTP client on the engine socket is refused at the first byte. */
    assert_int_equal(first_error((const uint8_t *)"GET / HTTP/1.1\r\n", 16, 0, &at), -EPROTO);
    assert_int_equal(at, 1);
    good_header(h, CM_WIRE_CANCEL, 4);
    h[3] = 'X';
    assert_int_equal(first_error(h, sizeof(h), 0, &at), -EPROTO);
    assert_int_equal(at, 4);

    good_header(h, CM_WIRE_CANCEL, 4);
    h[4] = 2; /* version 2 */
    assert_int_equal(first_error(h, sizeof(h), 0, &at), -EPROTO);
    assert_int_equal(at, 6);

    uint16_t bad_types[] = {0, CM_WIRE_TYPE_MAX + 1, 0xffff};
    for (size_t i = 0; i < 3; i++) {
        good_header(h, bad_types[i], 4);
        assert_int_equal(first_error(h, sizeof(h), 0, &at), -EPROTO);
        assert_int_equal(at, 8);
    }

    good_header(h, CM_WIRE_CANCEL, 4);
    h[11] = 0x80; /* a flag bit */
    assert_int_equal(first_error(h, sizeof(h), 0, &at), -EPROTO);
    assert_int_equal(at, 12);

    /* Oversize is decided from the length field: no payload byte is ever needed. */
    good_header(h, CM_WIRE_SUBMIT, CM_WIRE_MIN_MAX_PAYLOAD + 1);
    assert_int_equal(first_error(h, CM_WIRE_HEADER_BYTES, CM_WIRE_MIN_MAX_PAYLOAD, &at), -EMSGSIZE);
    assert_int_equal(at, 16);
    good_header(h, CM_WIRE_SUBMIT, 0xffffffffu);
    assert_int_equal(first_error(h, CM_WIRE_HEADER_BYTES, 0, &at), -EMSGSIZE);

    /* A truncated frame is "need more bytes", never an error or a frame. */
    good_header(h, CM_WIRE_CANCEL, 4);
    struct cm_wire_reader r;
    struct cm_wire_frame f;
    assert_int_equal(cm_wire_reader_init(&r, 0), 0);
    assert_int_equal(cm_wire_reader_feed(&r, h, CM_WIRE_HEADER_BYTES + 3), 0);
    assert_int_equal(cm_wire_reader_next(&r, &f), 0);
    assert_int_equal(cm_wire_reader_buffered(&r), CM_WIRE_HEADER_BYTES + 3);
    cm_wire_reader_fini(&r);
}

static void
test_wire_encode_oversize(void **state)
{
    (void)state;
    struct cm_wire_buf b;
    assert_int_equal(cm_wire_buf_init(&b, CM_WIRE_MIN_MAX_PAYLOAD), 0);
    assert_int_equal(cm_wire_encode_stats(&b, 1), 0);
    size_t before = cm_wire_buf_pending(&b);
    size_t n = CM_WIRE_MIN_MAX_PAYLOAD + 1;
    char *big = malloc(n + 1);
    assert_non_null(big);
    memset(big, 'a', n);
    big[n] = '\0';
    assert_int_equal(cm_wire_encode_frame(&b, CM_WIRE_SUBMIT, 1, big, n), -EMSGSIZE);
    assert_int_equal(cm_wire_encode_frame(&b, CM_WIRE_SUBMIT, 1, big, n - 1), 0);
    assert_int_equal(cm_wire_buf_pending(&b), before + CM_WIRE_HEADER_BYTES + n - 1);
    cm_wire_buf_consume(&b, cm_wire_buf_pending(&b));
    before = cm_wire_buf_pending(&b);
    assert_int_equal(before, 0);

    /* A SUBMIT whose JSON (quotes, keys, escapes) is over the cap; the text alone fits. */
    struct cm_wire_submit s;
    cm_wire_submit_init(&s);
    s.prompt = big;
    s.prompt_len = n - 10;
    s.max_tokens = 1;
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), -EMSGSIZE);
    s.prompt_len = n;
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), -EMSGSIZE);
    assert_int_equal(cm_wire_buf_pending(&b), 0);
    s.prompt_len = 1000;
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), 0);
    cm_wire_buf_fini(&b);
    free(big);
}

/* ---- Payload rejections ---- */

struct bad_case {
    const char *json;
    int rc;
    const char *needle; /* expected in the message */
};

static void
run_bad_cases(enum cm_wire_type type, const struct bad_case *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct cm_wire_frame f = raw_frame(type, cases[i].json);
        char err[CM_WIRE_ERR_LEN] = "";
        int rc = 0;
        union {
            struct cm_wire_submit s;
            struct cm_wire_model_info mi;
            struct cm_wire_hello h;
            struct cm_wire_done d;
            struct cm_wire_error e;
            struct cm_wire_cancel c;
            struct cm_wire_stats_reply sr;
        } out;
        memset(&out, 0xa5, sizeof(out));
        unsigned char before[sizeof(out)];
        memcpy(before, &out, sizeof(out));
        switch (type) {
        case CM_WIRE_SUBMIT:
            rc = cm_wire_decode_submit(&f, &out.s, err, sizeof(err));
            break;
        case CM_WIRE_MODEL_INFO:
            rc = cm_wire_decode_model_info(&f, &out.mi, err, sizeof(err));
            break;
        case CM_WIRE_HELLO:
            rc = cm_wire_decode_hello(&f, &out.h, err, sizeof(err));
            break;
        case CM_WIRE_DONE:
            rc = cm_wire_decode_done(&f, &out.d, err, sizeof(err));
            break;
        case CM_WIRE_ERROR:
            rc = cm_wire_decode_error(&f, &out.e, err, sizeof(err));
            break;
        case CM_WIRE_CANCEL:
            rc = cm_wire_decode_cancel(&f, &out.c, err, sizeof(err));
            break;
        case CM_WIRE_STATS_REPLY:
            rc = cm_wire_decode_stats_reply(&f, &out.sr, err, sizeof(err));
            break;
        default:
            fail();
        }
        if (rc != cases[i].rc || strstr(err, cases[i].needle) == NULL)
            fail_msg("case %zu (%s): rc %d err '%s', expected %d '%s'", i, cases[i].json, rc, err,
                     cases[i].rc, cases[i].needle);
        assert_memory_equal(&out, before, sizeof(out)); /* *out untouched on failure */
    }
}

static void
test_wire_reject_malformed_json(void **state)
{
    (void)state;
    static const struct bad_case cases[] = {
        {"", -EPROTO, "empty"},
        {"[1,2]", -EPROTO, "not a JSON object"},
        {"\"x\"", -EPROTO, "not a JSON object"},
        {"{\"reason\":\"x\"", -EPROTO, "truncated"},
        {"{\"reason\":\"x\"} {}", -EPROTO, ""},
        {"{\"reason\":\"x\"}}", -EPROTO, ""},
        {"{\"reason\":\"x\",}", -EPROTO, ""},
        {"{\"reason\":\"\xff\"}", -EPROTO, ""},
        {"{reason:\"x\"}", -EPROTO, ""},
        {"{\"reason\":\"x\" \"y\"}", -EPROTO, ""},
        {"{\"reason\":\"shutdown\",\"x\":[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]}", -EPROTO, ""},
        {"{\"reason\":tru}", -EPROTO, ""},
    };
    run_bad_cases(CM_WIRE_CANCEL, cases, sizeof(cases) / sizeof(cases[0]));

    /* A NUL byte inside the payload (not expressible as a C string case). */
    static const char with_nul[] = "{\"reason\":\"a\0b\"}";
    struct cm_wire_frame f = {
        .type = CM_WIRE_CANCEL, .len = sizeof(with_nul) - 1, .payload = (const uint8_t *)with_nul};
    struct cm_wire_cancel c;
    char err[CM_WIRE_ERR_LEN] = "";
    assert_int_equal(cm_wire_decode_cancel(&f, &c, err, sizeof(err)), -EPROTO);
    assert_non_null(strstr(err, "NUL"));

    /* A decoder given another type's frame. */
    f = raw_frame(CM_WIRE_HELLO, "{\"reason\":\"x\"}");
    assert_int_equal(cm_wire_decode_cancel(&f, &c, err, sizeof(err)), -EINVAL);
    struct cm_wire_token t;
    assert_int_equal(cm_wire_decode_token(&f, &t, NULL, 0), -EINVAL);
    assert_int_equal(cm_wire_decode_stats(&f, NULL, 0), -EINVAL);
}

#define SUB(extra) "{\"prompt\":\"p\",\"max_tokens\":8" extra "}"

static void
test_wire_reject_submit_fields(void **state)
{
    (void)state;
    static const struct bad_case cases[] = {
        /* wrong types */
        {SUB(",\"temperature\":\"hot\""), -EINVAL, "'temperature' must be a number"},
        {SUB(",\"top_k\":1.5"), -EINVAL, "'top_k' must be an integer"},
        {SUB(",\"top_k\":\"4\""), -EINVAL, "'top_k' must be an integer"},
        {SUB(",\"logprobs\":1"), -EINVAL, "'logprobs' must be a boolean"},
        {SUB(",\"add_special\":\"yes\""), -EINVAL, "'add_special'"},
        {SUB(",\"stop_ids\":{}"), -EINVAL, "'stop_ids' must be an array"},
        {SUB(",\"stop_ids\":[1,\"2\"]"), -EINVAL, "'stop_ids'[1]"},
        {SUB(",\"logit_bias\":[1]"), -EINVAL, "'logit_bias' must be an object"},
        {SUB(",\"logit_bias\":{\"5\":\"x\"}"), -EINVAL, "'logit_bias' values must be numbers"},
        {SUB(",\"seed\":1.0"), -EINVAL, "'seed'"},
        {SUB(",\"seed\":-1"), -EINVAL, "'seed'"},
        {"{\"prompt\":7,\"max_tokens\":8}", -EINVAL, "'prompt' must be a string"},
        {"{\"prompt_ids\":\"1 2\",\"max_tokens\":8}", -EINVAL, "'prompt_ids' must be an array"},
        {"{\"prompt\":\"p\",\"max_tokens\":\"8\"}", -EINVAL, "'max_tokens' must be an integer"},
        {"{\"prompt\":\"p\",\"max_tokens\":8.0}", -EINVAL, "'max_tokens' must be an integer"},
        /* missing or conflicting */
        {"{\"prompt\":\"p\"}", -EINVAL, "missing 'max_tokens'"},
        {"{\"max_tokens\":8}", -EINVAL, "missing 'prompt'"},
        {"{\"prompt\":\"p\",\"prompt_ids\":[1],\"max_tokens\":8}", -EINVAL, "exactly one"},
        {"{\"prompt_ids\":[],\"max_tokens\":8}", -EINVAL, "missing 'prompt'"},
        /* ranges */
        {"{\"prompt\":\"p\",\"max_tokens\":0}", -EINVAL, "'max_tokens' out of range"},
        {"{\"prompt\":\"p\",\"max_tokens\":-1}", -EINVAL, "'max_tokens' out of range"},
        {"{\"prompt\":\"p\",\"max_tokens\":99999999999}", -EINVAL, "'max_tokens' out of range"},
        {"{\"prompt\":\"p\",\"max_tokens\":16777217}", -EINVAL, "'max_tokens' out of range"},
        {SUB(",\"temperature\":-0.5"), -EINVAL, "'temperature'"},
        {SUB(",\"temperature\":NaN"), -EINVAL, "'temperature' must be finite"},
        {SUB(",\"temperature\":Infinity"), -EINVAL, "'temperature' must be finite"},
        {SUB(",\"temperature\":1e39"), -EINVAL, "'temperature' does not fit a float"},
        {SUB(",\"temperature\":1e400"), -EINVAL, "'temperature' must be finite"},
        {SUB(",\"top_p\":0"), -EINVAL, "'top_p' must be in (0, 1]"},
        {SUB(",\"top_p\":1.0001"), -EINVAL, "'top_p'"},
        {SUB(",\"min_p\":-0.01"), -EINVAL, "'min_p'"},
        {SUB(",\"min_p\":2"), -EINVAL, "'min_p'"},
        {SUB(",\"top_k\":-1"), -EINVAL, "'top_k' out of range"},
        {SUB(",\"top_k\":4294967296"), -EINVAL, "'top_k' out of range"},
        {SUB(",\"repetition_penalty\":0"), -EINVAL, "'repetition_penalty'"},
        {SUB(",\"repeat_last_n\":-2"), -EINVAL, "'repeat_last_n'"},
        {SUB(",\"presence_penalty\":-Infinity"), -EINVAL, "'presence_penalty'"},
        {SUB(",\"top_logprobs\":21,\"logprobs\":true"), -EINVAL, "'top_logprobs' out of range"},
        {SUB(",\"top_logprobs\":-1"), -EINVAL, "'top_logprobs' out of range"},
        {SUB(",\"top_logprobs\":3"), -EINVAL, "'top_logprobs' needs 'logprobs'"},
        {SUB(",\"deadline_ms\":604800001"), -EINVAL, "'deadline_ms'"},
        {SUB(",\"deadline_ms\":-1"), -EINVAL, "'deadline_ms'"},
        {SUB(",\"priority\":1001"), -EINVAL, "'priority'"},
        {SUB(",\"priority\":-1001"), -EINVAL, "'priority'"},
        {SUB(",\"token_loop\":1"), -EINVAL, "'token_loop' must be 0 or in [2, 16]"},
        {SUB(",\"token_loop\":17"), -EINVAL, "'token_loop' must be 0 or in [2, 16]"},
        {SUB(",\"token_loop\":-1"), -EINVAL, "'token_loop'"},
        {SUB(",\"token_loop\":3.0"), -EINVAL, "'token_loop' must be an integer"},
        {SUB(",\"token_loop\":true"), -EINVAL, "'token_loop' must be an integer"},
        {SUB(",\"stop_ids\":[-1]"), -EINVAL, "'stop_ids'[0]"},
        {SUB(",\"stop_ids\":[16777216]"), -EINVAL, "'stop_ids'[0]"},
        {"{\"prompt_ids\":[1,2,-3],\"max_tokens\":8}", -EINVAL, "'prompt_ids'[2]"},
        {SUB(",\"logit_bias\":{\"abc\":1}"), -EINVAL, "'logit_bias' key"},
        {SUB(",\"logit_bias\":{\"01\":1}"), -EINVAL, "'logit_bias' key"},
        {SUB(",\"logit_bias\":{\"-1\":1}"), -EINVAL, "'logit_bias' key"},
        {SUB(",\"logit_bias\":{\"\":1}"), -EINVAL, "'logit_bias' key"},
        {SUB(",\"logit_bias\":{\"16777216\":1}"), -EINVAL, "'logit_bias' key"},
        {SUB(",\"logit_bias\":{\" 5\":1}"), -EINVAL, "'logit_bias' key"},
        {SUB(",\"logit_bias\":{\"5\":100.5}"), -EINVAL, "for id 5 must be in [-100, 100]"},
        {SUB(",\"logit_bias\":{\"5\":NaN}"), -EINVAL, "for id 5"},
        /* text */
        {"{\"prompt\":\"a\\u0000b\",\"max_tokens\":8}", -EINVAL, "'prompt' is not UTF-8"},
    };
    run_bad_cases(CM_WIRE_SUBMIT, cases, sizeof(cases) / sizeof(cases[0]));
}

/* Builds SUB with an array or object of n entries. */
static char *
many(const char *field, int n, bool object)
{
    size_t cap = 64 + (size_t)n * 24;
    char *s = malloc(cap);
    assert_non_null(s);
    size_t len = (size_t)snprintf(s, cap, "{\"prompt\":\"p\",\"max_tokens\":8,\"%s\":%c", field,
                                  object ? '{' : '[');
    for (int i = 0; i < n; i++) {
        if (object)
            len += (size_t)snprintf(s + len, cap - len, "%s\"%d\":1", i ? "," : "", i);
        else
            len += (size_t)snprintf(s + len, cap - len, "%s%d", i ? "," : "", i);
    }
    snprintf(s + len, cap - len, "%c}", object ? '}' : ']');
    return s;
}

static void
test_wire_reject_huge_counts(void **state)
{
    (void)state;
    struct {
        const char *field;
        int cap;
        bool object;
    } caps[] = {{"stop_ids", CM_WIRE_MAX_STOP_IDS, false},
                {"logit_bias", CM_WIRE_MAX_LOGIT_BIAS, true}};
    for (size_t i = 0; i < 2; i++) {
        for (int extra = 0; extra < 2; extra++) {
            char *json = many(caps[i].field, caps[i].cap + extra, caps[i].object);
            struct cm_wire_frame f = raw_frame(CM_WIRE_SUBMIT, json);
            struct cm_wire_submit s;
            char err[CM_WIRE_ERR_LEN] = "";
            int rc = cm_wire_decode_submit(&f, &s, err, sizeof(err));
            if (extra == 0) {
                if (rc != 0)
                    fail_msg("%s at the cap: %d %s", caps[i].field, rc, err);
                cm_wire_submit_fini(&s);
            } else {
                assert_int_equal(rc, -EINVAL);
                assert_non_null(strstr(err, "more than"));
                assert_non_null(strstr(err, caps[i].field));
            }
            free(json);
        }
    }

    /* The encoder refuses what the decoder would: over the caps, repeated bias ids. */
    struct cm_wire_submit s;
    struct cm_wire_buf b;
    assert_int_equal(cm_wire_buf_init(&b, CM_WIRE_MAX_MAX_PAYLOAD), 0);
    cm_wire_submit_init(&s);
    s.max_tokens = 1;
    s.n_prompt_ids = CM_WIRE_MAX_PROMPT_IDS + 1;
    s.prompt_ids = calloc(s.n_prompt_ids, sizeof(int32_t));
    assert_non_null(s.prompt_ids);
    char err[CM_WIRE_ERR_LEN] = "";
    assert_int_equal(cm_wire_submit_validate(&s, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "'prompt_ids' has more than"));
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), -EINVAL);
    free(s.prompt_ids);
    s.prompt_ids = (int32_t *)submit_ids;
    s.n_prompt_ids = 1;
    struct cm_wire_logit_bias dup[] = {{3, 1.0f}, {4, 2.0f}, {3, 1.0f}};
    s.sampling.logit_bias = dup;
    s.sampling.n_logit_bias = 3;
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), -EINVAL);
    s.sampling.n_logit_bias = 2;
    assert_int_equal(cm_wire_buf_pending(&b), 0);
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), 0);
    cm_wire_buf_fini(&b);
}

static void
test_wire_reject_other_fields(void **state)
{
    (void)state;
    static const struct bad_case hello[] = {
        {"{}", -EINVAL, "missing 'version'"},
        {"{\"version\":0}", -EINVAL, "'version' out of range"},
        {"{\"version\":65536}", -EINVAL, "'version' out of range"},
        {"{\"version\":\"1\"}", -EINVAL, "'version' must be an integer"},
        {"{\"version\":1,\"client\":\"a\\nb\"}", -EINVAL, "'client'"},
        {"{\"version\":1,\"client\":[]}", -EINVAL, "'client' must be a string"},
    };
    run_bad_cases(CM_WIRE_HELLO, hello, sizeof(hello) / sizeof(hello[0]));

#define MI(extra) "{\"model\":\"m\",\"n_ctx\":8,\"n_vocab\":100,\"max_payload\":1048576" extra "}"
    static const struct bad_case mi[] = {
        {"{\"n_ctx\":8,\"n_vocab\":100,\"max_payload\":1048576}", -EINVAL, "missing 'model'"},
        {"{\"model\":\"\",\"n_ctx\":8,\"n_vocab\":100,\"max_payload\":1048576}", -EINVAL,
         "'model'"},
        {"{\"model\":\"m\",\"n_ctx\":0,\"n_vocab\":100,\"max_payload\":1048576}", -EINVAL,
         "'n_ctx' out of range"},
        {"{\"model\":\"m\",\"n_ctx\":8,\"n_vocab\":100}", -EINVAL, "missing 'max_payload'"},
        {"{\"model\":\"m\",\"n_ctx\":8,\"n_vocab\":100,\"max_payload\":100}", -EINVAL,
         "'max_payload' out of range"},
        {MI(",\"special\":{\"eos\":{\"id\":100}}"), -EINVAL, "'special.eos.id' out of range"},
        {MI(",\"special\":{\"eos\":{\"id\":-2}}"), -EINVAL, "'special.eos.id' out of range"},
        {MI(",\"special\":{\"eos\":{\"text\":\"x\"}}"), -EINVAL, "missing 'special.eos.id'"},
        {MI(",\"special\":{\"bos\":{\"id\":1,\"text\":5}}"), -EINVAL,
         "'special.bos.text' must be a string"},
        {MI(",\"special\":{\"bos\":{\"id\":-1,\"text\":\"x\"}}"), -EINVAL, "without an id"},
        {MI(",\"special\":[]"), -EINVAL, "'special' must be an object"},
        {MI(",\"capabilities\":\"logprobs\""), -EINVAL, "'capabilities' must be an array"},
        {MI(",\"capabilities\":[1]"), -EINVAL, "'capabilities'[0] must be a string"},
        {MI(",\"chat_family\":3"), -EINVAL, "'chat_family' must be a string"},
        {MI(",\"default_system\":false"), -EINVAL, "'default_system' must be a string"},
    };
    run_bad_cases(CM_WIRE_MODEL_INFO, mi, sizeof(mi) / sizeof(mi[0]));

    static const struct bad_case done[] = {
        {"{}", -EINVAL, "missing 'finish'"},
        {"{\"finish\":\"stop\"}", -EINVAL, "unknown 'finish'"},
        {"{\"finish\":1}", -EINVAL, "'finish' must be a string"},
        {"{\"finish\":\"eos\",\"guard\":\"name_run_cap\"}", -EINVAL, "not cancelled"},
        {"{\"finish\":\"cancelled\",\"guard\":\"a b\"}", -EINVAL, "'guard'"},
        {"{\"finish\":\"eos\",\"usage\":{\"prompt_tokens\":1,\"cached_tokens\":2}}", -EINVAL,
         "'cached_tokens' exceeds"},
        {"{\"finish\":\"eos\",\"usage\":{\"prompt_tokens\":-1}}", -EINVAL, "'prompt_tokens'"},
        {"{\"finish\":\"eos\",\"usage\":{\"prompt_tokens\":4294967296}}", -EINVAL,
         "'prompt_tokens' out of range"},
        {"{\"finish\":\"eos\",\"usage\":7}", -EINVAL, "'usage' must be an object"},
        {"{\"finish\":\"eos\",\"timings\":{\"decode_ms\":-1}}", -EINVAL, "'timings'"},
        {"{\"finish\":\"eos\",\"timings\":{\"decode_ms\":\"1\"}}", -EINVAL,
         "'decode_ms' must be a number"},
    };
    run_bad_cases(CM_WIRE_DONE, done, sizeof(done) / sizeof(done[0]));

    static const struct bad_case error[] = {
        {"{\"message\":\"x\"}", -EINVAL, "missing 'code'"},
        {"{\"code\":\"EFOO\"}", -EINVAL, "'code' is not a protocol errno"},
        {"{\"code\":11}", -EINVAL, "'code' must be a string"},
        {"{\"code\":\"EAGAIN\",\"retry_after_ms\":-5}", -EINVAL, "'retry_after_ms'"},
        {"{\"code\":\"EAGAIN\",\"message\":{}}", -EINVAL, "'message' must be a string"},
    };
    run_bad_cases(CM_WIRE_ERROR, error, sizeof(error) / sizeof(error[0]));

    static const struct bad_case cancel[] = {
        {"{}", -EINVAL, "missing 'reason'"},
        {"{\"reason\":\"\"}", -EINVAL, "'reason'"},
        {"{\"reason\":\"two words\"}", -EINVAL, "'reason'"},
        {"{\"reason\":\"x\\u00e9\"}", -EINVAL, "'reason'"},
        {"{\"reason\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}",
         -EINVAL, "longer than 64"},
        {"{\"reason\":null}", -EINVAL, "missing 'reason'"},
    };
    run_bad_cases(CM_WIRE_CANCEL, cancel, sizeof(cancel) / sizeof(cancel[0]));

    static const struct bad_case stats_reply[] = {
        {"[]", -EPROTO, "not a JSON object"},
        {"{\"a\":", -EPROTO, "truncated"},
    };
    run_bad_cases(CM_WIRE_STATS_REPLY, stats_reply, sizeof(stats_reply) / sizeof(stats_reply[0]));
}

/* Lenient where the contract says so: unknown names ignored, unknown family read as unknown. */
static void
test_wire_model_info_forward_compatible(void **state)
{
    (void)state;
    struct cm_wire_frame f =
        raw_frame(CM_WIRE_MODEL_INFO,
                  MI(",\"chat_family\":\"mistral-v7\",\"capabilities\":[\"logprobs\",\"teleport\"],"
                     "\"special\":{\"eot\":{\"id\":99}},\"backend\":{\"kind\":\"cuda\"}"));
    struct cm_wire_model_info m;
    char err[CM_WIRE_ERR_LEN] = "";
    int rc = cm_wire_decode_model_info(&f, &m, err, sizeof(err));
    if (rc != 0)
        fail_msg("decode: %d %s", rc, err);
    assert_int_equal(m.chat_family, CM_CHAT_UNKNOWN);
    assert_int_equal(m.caps, CM_WIRE_CAP_LOGPROBS);
    assert_int_equal(m.eot.id, 99);
    assert_string_equal(m.eot.text, "");
    assert_int_equal(m.bos.id, -1);
    assert_null(m.default_system);
    cm_wire_model_info_fini(&m);
}

static void
test_wire_reject_binary_payloads(void **state)
{
    (void)state;
    uint8_t p[16 + 8 * 21 + 8];
    memset(p, 0, sizeof(p));
    struct cm_wire_frame f = {.type = CM_WIRE_TOKEN, .payload = p};
    struct cm_wire_token t;
    char err[CM_WIRE_ERR_LEN] = "";
    for (uint32_t len = 0; len < 16; len++) { /* truncated fixed part */
        f.len = len;
        assert_int_equal(cm_wire_decode_token(&f, &t, NULL, 0), -EPROTO);
    }
    f.len = 16;
    assert_int_equal(cm_wire_decode_token(&f, &t, NULL, 0), 0);
    f.len = 17; /* a byte beyond the declared text */
    assert_int_equal(cm_wire_decode_token(&f, &t, err, sizeof(err)), -EPROTO);
    p[14] = 3; /* text_len 3 but only 2 bytes */
    f.len = 18;
    assert_int_equal(cm_wire_decode_token(&f, &t, NULL, 0), -EPROTO);
    p[14] = 0;
    p[12] = 21; /* n_top over the cap, whatever the length */
    f.len = 16 + 8 * 21;
    assert_int_equal(cm_wire_decode_token(&f, &t, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "'n_top'"));
    p[12] = 0;
    p[15] = 0x04; /* text_len 1024 + 1 = 0x401 */
    p[14] = 0x01;
    assert_int_equal(cm_wire_decode_token(&f, &t, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "'text_len'"));
    p[14] = p[15] = 0;
    f.len = 16;
    p[4] = 0x08; /* unknown flag */
    assert_int_equal(cm_wire_decode_token(&f, &t, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "'flags'"));
    p[4] = 0;
    float nan = NAN, one = 1.0f;
    memcpy(p + 8, &one, 4); /* a logprob without the flag */
    assert_int_equal(cm_wire_decode_token(&f, &t, NULL, 0), -EINVAL);
    p[4] = CM_WIRE_TOKEN_LOGPROB;
    assert_int_equal(cm_wire_decode_token(&f, &t, NULL, 0), 0); /* positive is allowed */
    memcpy(p + 8, &nan, 4);
    assert_int_equal(cm_wire_decode_token(&f, &t, NULL, 0), -EINVAL);
    memset(p + 8, 0, 4);
    p[3] = 0x80; /* id negative */
    assert_int_equal(cm_wire_decode_token(&f, &t, NULL, 0), -EINVAL);

    struct cm_wire_accepted a;
    uint8_t ap[9] = {5, 0, 0, 0, 6, 0, 0, 0, 0};
    f = (struct cm_wire_frame){.type = CM_WIRE_ACCEPTED, .payload = ap, .len = 7};
    assert_int_equal(cm_wire_decode_accepted(&f, &a, NULL, 0), -EPROTO);
    f.len = 9;
    assert_int_equal(cm_wire_decode_accepted(&f, &a, NULL, 0), -EPROTO);
    f.len = 8; /* cached 6 > prompt 5 */
    assert_int_equal(cm_wire_decode_accepted(&f, &a, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "'cached_tokens'"));

    f = (struct cm_wire_frame){.type = CM_WIRE_STATS, .payload = ap, .len = 1};
    assert_int_equal(cm_wire_decode_stats(&f, NULL, 0), -EPROTO);
}

/* Encoders validate as decoders do and leave the buffer unchanged on failure. */
static void
test_wire_encode_rejects_invalid(void **state)
{
    (void)state;
    struct cm_wire_buf b;
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    struct cm_wire_submit s;
    submit_fill(&s, false);
    s.sampling.top_p = NAN;
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), -EINVAL);
    submit_fill(&s, false);
    s.sampling.temperature = INFINITY;
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), -EINVAL);
    submit_fill(&s, false);
    s.prompt = "bad \xc0\xaf utf-8";
    s.prompt_len = strlen(s.prompt);
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), -EINVAL);
    s.prompt = "\xed\xa0\x80"; /* a surrogate */
    s.prompt_len = 3;
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), -EINVAL);
    s.prompt = "ab";
    s.prompt_len = 3; /* includes the NUL */
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), -EINVAL);
    submit_fill(&s, false);
    s.prompt_ids = (int32_t *)submit_ids;
    s.n_prompt_ids = 1; /* both prompt and ids */
    assert_int_equal(cm_wire_encode_submit(&b, 1, &s), -EINVAL);

    struct cm_wire_token t;
    memset(&t, 0, sizeof(t));
    t.n_top = 3; /* without the flag */
    assert_int_equal(cm_wire_encode_token(&b, 1, &t), -EINVAL);
    t.flags = CM_WIRE_TOKEN_LOGPROB;
    t.text_len = CM_WIRE_MAX_TOKEN_TEXT + 1;
    assert_int_equal(cm_wire_encode_token(&b, 1, &t), -EINVAL);

    struct cm_wire_done d;
    memset(&d, 0, sizeof(d));
    d.finish = CM_WIRE_FINISH_EOS;
    strcpy(d.guard, "x");
    assert_int_equal(cm_wire_encode_done(&b, 1, &d), -EINVAL);
    d.guard[0] = '\0';
    d.decode_ms = NAN;
    assert_int_equal(cm_wire_encode_done(&b, 1, &d), -EINVAL);
    d.decode_ms = 0;
    d.finish = (enum cm_wire_finish)9;
    assert_int_equal(cm_wire_encode_done(&b, 1, &d), -EINVAL);

    struct cm_wire_error e;
    memset(&e, 0, sizeof(e));
    e.code = EAGAIN; /* must be negative */
    assert_int_equal(cm_wire_encode_error(&b, 1, &e), -EINVAL);
    e.code = -EXDEV; /* not in the table */
    assert_int_equal(cm_wire_encode_error(&b, 1, &e), -EINVAL);
    e.code = -EAGAIN;
    memset(e.message, 'x', sizeof(e.message)); /* not NUL-terminated */
    assert_int_equal(cm_wire_encode_error(&b, 1, &e), -EINVAL);

    struct cm_wire_cancel c = {.reason = ""};
    assert_int_equal(cm_wire_encode_cancel(&b, 1, &c), -EINVAL);
    struct cm_wire_hello h = {.version = 0};
    assert_int_equal(cm_wire_encode_hello(&b, 1, &h), -EINVAL);

    struct cm_wire_model_info m;
    model_info_fill(&m);
    m.eos.id = (int32_t)m.n_vocab;
    assert_int_equal(cm_wire_encode_model_info(&b, 1, &m), -EINVAL);
    model_info_fill(&m);
    m.chat_family = (enum cm_chat_family)77;
    assert_int_equal(cm_wire_encode_model_info(&b, 1, &m), -EINVAL);
    model_info_fill(&m);
    m.caps |= 1u << 31;
    assert_int_equal(cm_wire_encode_model_info(&b, 1, &m), -EINVAL);

    assert_int_equal(cm_wire_buf_pending(&b), 0);
    cm_wire_buf_fini(&b);
}

/* ---- fd paths ---- */

static void
nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    assert_true(fl >= 0);
    assert_int_equal(fcntl(fd, F_SETFL, fl | O_NONBLOCK), 0);
}

/* Frames through a socketpair: partial non-blocking writes resume where they stopped, and the
 * reader's buffer never exceeds one maximal frame. */
static void
test_wire_fd_roundtrip(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    nonblock(sv[0]);
    nonblock(sv[1]);
    int small = 4096;
    assert_int_equal(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)), 0);

    uint32_t max = CM_WIRE_MIN_MAX_PAYLOAD;
    struct cm_wire_buf b;
    struct cm_wire_reader r;
    assert_int_equal(cm_wire_buf_init(&b, max), 0);
    assert_int_equal(cm_wire_reader_init(&r, max), 0);
    assert_int_equal(cm_wire_reader_read_fd(&r, sv[1]), -EAGAIN);

    /* 300 frames: cancels with growing req ids and a few maximal raw payloads. */
    uint8_t *big = malloc(max);
    assert_non_null(big);
    for (uint32_t i = 0; i < max; i++)
        big[i] = (uint8_t)(i * 31);
    const int n_frames = 300;
    for (int i = 0; i < n_frames; i++) {
        if (i % 50 == 7) {
            assert_int_equal(cm_wire_encode_frame(&b, CM_WIRE_STATS_REPLY, (uint64_t)i, big, max),
                             0);
        } else {
            struct cm_wire_cancel c;
            snprintf(c.reason, sizeof(c.reason), "g%d", i);
            assert_int_equal(cm_wire_encode_cancel(&b, (uint64_t)i, &c), 0);
        }
    }
    int got = 0, partial = 0;
    while (got < n_frames) {
        ssize_t w = cm_wire_buf_write_fd(&b, sv[0]);
        assert_true(w >= 0 || w == -EAGAIN);
        if (cm_wire_buf_pending(&b) > 0)
            partial++;
        for (;;) {
            ssize_t n = cm_wire_reader_read_fd(&r, sv[1]);
            assert_true(r.cap <= CM_WIRE_HEADER_BYTES + max);
            struct cm_wire_frame f;
            while (cm_wire_reader_next(&r, &f) == 1) {
                assert_true(f.req_id == (uint64_t)got);
                if (got % 50 == 7) {
                    assert_int_equal(f.type, CM_WIRE_STATS_REPLY);
                    assert_int_equal(f.len, max);
                    assert_memory_equal(f.payload, big, max);
                } else {
                    struct cm_wire_cancel c;
                    char want[16];
                    assert_int_equal(cm_wire_decode_cancel(&f, &c, NULL, 0), 0);
                    snprintf(want, sizeof(want), "g%d", got);
                    assert_string_equal(c.reason, want);
                }
                got++;
            }
            if (n == -EAGAIN)
                break;
            assert_true(n > 0);
        }
    }
    assert_true(partial > 0); /* the small send buffer did fill */
    assert_int_equal(cm_wire_buf_pending(&b), 0);

    /* Whole frames that fill the buffer must be cut before reading more. */
    for (int i = 0; i < 2; i++)
        assert_int_equal(cm_wire_encode_frame(&b, CM_WIRE_STATS_REPLY, 1, big, max - 100), 0);
    ssize_t n = 0, total = 0;
    while ((n = cm_wire_reader_read_fd(&r, sv[1])) != -ENOBUFS) {
        if (n == -EAGAIN)
            assert_true(cm_wire_buf_write_fd(&b, sv[0]) > 0);
        else
            total += n;
    }
    assert_int_equal(total, (ssize_t)(CM_WIRE_HEADER_BYTES + max));
    struct cm_wire_frame f;
    assert_int_equal(cm_wire_reader_next(&r, &f), 1);
    assert_int_equal(cm_wire_reader_next(&r, &f), 0);
    while (cm_wire_buf_pending(&b) > 0 || cm_wire_reader_buffered(&r) > 0) {
        cm_wire_buf_write_fd(&b, sv[0]);
        n = cm_wire_reader_read_fd(&r, sv[1]);
        assert_true(n > 0 || n == -EAGAIN);
        if (cm_wire_reader_next(&r, &f) == 1)
            assert_int_equal(f.len, max - 100);
    }

    /* An oversize header is refused before any payload is sent; then EOF reads 0. */
    uint8_t h[CM_WIRE_HEADER_BYTES];
    good_header(h, CM_WIRE_SUBMIT, max + 1);
    assert_int_equal(write(sv[0], h, sizeof(h)), (ssize_t)sizeof(h));
    assert_int_equal(cm_wire_reader_read_fd(&r, sv[1]), (ssize_t)sizeof(h));
    assert_int_equal(cm_wire_reader_next(&r, &f), -EMSGSIZE);
    assert_int_equal(cm_wire_reader_read_fd(&r, sv[1]), -EMSGSIZE);
    cm_wire_reader_fini(&r);
    assert_int_equal(cm_wire_reader_init(&r, max), 0);
    close(sv[0]);
    assert_int_equal(cm_wire_reader_read_fd(&r, sv[1]), 0);
    assert_int_equal(cm_wire_buf_pending(&b), 0);
    assert_int_equal(cm_wire_encode_stats(&b, 1), 0);
    assert_int_equal(cm_wire_buf_write_fd(&b, sv[1]), -EPIPE);

    cm_wire_reader_fini(&r);
    cm_wire_buf_fini(&b);
    close(sv[1]);
    free(big);
}

/* ---- Allocation failures ---- */

/* Runs op with the nth allocation failing, for n = 1, 2, ... until op needs no more. Inside the
 * counted window only op and release run (release frees what op produced, allocating nothing);
 * failed (a failure left nothing behind) and verify (a success is correct) run outside it, so
 * their own allocations are neither failed nor counted. */
struct fi_ops {
    int (*op)(void *ctx);
    void (*release)(void *ctx, int rc);
    void (*failed)(void *ctx);
    void (*verify)(void *ctx);
};

static void
fi_loop(const struct fi_ops *ops, void *ctx)
{
#ifdef WIRE_SANITIZED
    (void)ops;
    (void)ctx;
    fail_msg("fault injection needs the replaced malloc");
#else
    long n;
    for (n = 1;; n++) {
        fi_begin(n);
        int rc = ops->op(ctx);
        long count = fi_count;
        ops->release(ctx, rc);
        long live = fi_live;
        fi_end();
        if (live != 0)
            fail_msg("allocation %ld failing: rc %d, %ld allocations leaked", n, rc, live);
        if (rc == 0) {
            /* Once more without failures, to check the result. */
            assert_int_equal(ops->op(ctx), 0);
            ops->verify(ctx);
            ops->release(ctx, 0);
            if (count < n)
                break;
            continue;
        }
        assert_true(rc < 0);
        assert_true(n <= count); /* a failure without a failed allocation is a bug */
        ops->failed(ctx);
    }
    print_message("fault injection: %ld allocations\n", n - 1);
#endif
}

static void
assert_all_bytes(const void *p, size_t n, uint8_t v)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) {
        if (b[i] != v)
            fail_msg("*out was written on failure (byte %zu)", i);
    }
}

struct fi_submit {
    struct cm_wire_frame f;
    struct cm_wire_submit expected;
    struct cm_wire_submit out;
};

static int
fi_submit_op(void *ctx)
{
    struct fi_submit *c = ctx;
    memset(&c->out, 0x5a, sizeof(c->out));
    return cm_wire_decode_submit(&c->f, &c->out, NULL, 0);
}

static void
fi_submit_failed(void *ctx)
{
    struct fi_submit *c = ctx;
    assert_all_bytes(&c->out, sizeof(c->out), 0x5a);
}

static void
fi_submit_verify(void *ctx)
{
    struct fi_submit *c = ctx;
    submit_equal(&c->out, &c->expected);
}

static void
fi_submit_release(void *ctx, int rc)
{
    struct fi_submit *c = ctx;
    if (rc == 0)
        cm_wire_submit_fini(&c->out);
}

static void
test_wire_fault_decode_submit(void **state)
{
    (void)state;
    if (!fi_works())
        skip();
    struct cm_wire_buf b;
    struct got g;
    static struct fi_submit c;
    static const struct fi_ops ops = {fi_submit_op, fi_submit_release, fi_submit_failed,
                                      fi_submit_verify};
    for (int with_ids = 0; with_ids < 2; with_ids++) {
        submit_fill(&c.expected, with_ids);
        assert_int_equal(cm_wire_buf_init(&b, 0), 0);
        assert_int_equal(cm_wire_encode_submit(&b, 1, &c.expected), 0);
        collect(cm_wire_buf_head(&b), cm_wire_buf_pending(&b), SPLIT_WHOLE, 0, 0, &g);
        assert_int_equal(g.n, 1);
        c.f = g.f[0];
        fi_loop(&ops, &c);
        got_free(&g);
        cm_wire_buf_fini(&b);
    }
}

struct fi_model_info {
    struct cm_wire_frame f;
    struct cm_wire_model_info expected;
    struct cm_wire_model_info out;
};

static int
fi_model_info_op(void *ctx)
{
    struct fi_model_info *c = ctx;
    memset(&c->out, 0x5a, sizeof(c->out));
    return cm_wire_decode_model_info(&c->f, &c->out, NULL, 0);
}

static void
fi_model_info_failed(void *ctx)
{
    struct fi_model_info *c = ctx;
    assert_all_bytes(&c->out, sizeof(c->out), 0x5a);
}

static void
fi_model_info_verify(void *ctx)
{
    struct fi_model_info *c = ctx;
    model_info_equal(&c->out, &c->expected);
}

static void
fi_model_info_release(void *ctx, int rc)
{
    struct fi_model_info *c = ctx;
    if (rc == 0)
        cm_wire_model_info_fini(&c->out);
}

static void
test_wire_fault_decode_model_info(void **state)
{
    (void)state;
    if (!fi_works())
        skip();
    struct cm_wire_buf b;
    struct got g;
    static struct fi_model_info c;
    static const struct fi_ops ops = {fi_model_info_op, fi_model_info_release, fi_model_info_failed,
                                      fi_model_info_verify};
    model_info_fill(&c.expected);
    assert_int_equal(cm_wire_buf_init(&b, 0), 0);
    assert_int_equal(cm_wire_encode_model_info(&b, 1, &c.expected), 0);
    collect(cm_wire_buf_head(&b), cm_wire_buf_pending(&b), SPLIT_WHOLE, 0, 0, &g);
    assert_int_equal(g.n, 1);
    c.f = g.f[0];
    fi_loop(&ops, &c);
    got_free(&g);
    cm_wire_buf_fini(&b);
}

/* Encoding into a fresh buffer, which grows as frames are appended. */
struct fi_encode {
    struct cm_wire_buf b;
    uint8_t left[64 << 10]; /* what a failed run left in b, copied out by release */
    size_t n_left;
    struct cm_wire_submit s;
    struct cm_wire_model_info m;
    struct json_object *stats;
};

static int
fi_encode_op(void *ctx)
{
    struct fi_encode *c = ctx;
    int rc;
    if ((rc = cm_wire_encode_model_info(&c->b, 1, &c->m)) < 0 ||
        (rc = cm_wire_encode_stats_reply(&c->b, 2, c->stats)) < 0 ||
        (rc = cm_wire_encode_submit(&c->b, 3, &c->s)) < 0)
        return rc;
    return 0;
}

/* Copies out what a failed run left, then frees the buffer (no allocation here). */
static void
fi_encode_release(void *ctx, int rc)
{
    struct fi_encode *c = ctx;
    c->n_left = 0;
    if (rc != 0) {
        c->n_left = cm_wire_buf_pending(&c->b);
        assert_true(c->n_left <= sizeof(c->left));
        if (c->n_left > 0)
            memcpy(c->left, cm_wire_buf_head(&c->b), c->n_left);
    }
    cm_wire_buf_fini(&c->b);
}

/* The frames before the failing encoder are whole and correct; it appended nothing. */
static void
fi_encode_failed(void *ctx)
{
    struct fi_encode *c = ctx;
    struct got g;
    collect(c->left, c->n_left, SPLIT_WHOLE, 0, 0, &g);
    assert_int_equal(g.rc, 0);
    assert_true(g.n < 3);
    if (g.n > 0)
        check_model_info(&g.f[0], &c->m);
    if (g.n > 1)
        check_stats_reply(&g.f[1], c->stats);
    got_free(&g);
}

static void
fi_encode_verify(void *ctx)
{
    struct fi_encode *c = ctx;
    struct got g;
    collect(cm_wire_buf_head(&c->b), cm_wire_buf_pending(&c->b), SPLIT_WHOLE, 0, 0, &g);
    assert_int_equal(g.n, 3);
    check_model_info(&g.f[0], &c->m);
    check_stats_reply(&g.f[1], c->stats);
    check_submit(&g.f[2], &c->s);
    got_free(&g);
}

static void
test_wire_fault_encode(void **state)
{
    (void)state;
    if (!fi_works())
        skip();
    static struct fi_encode c;
    static const struct fi_ops ops = {fi_encode_op, fi_encode_release, fi_encode_failed,
                                      fi_encode_verify};
    assert_int_equal(cm_wire_buf_init(&c.b, 0), 0);
    submit_fill(&c.s, false);
    model_info_fill(&c.m);
    c.stats = json_tokener_parse("{\"requests\":1,\"kv\":{\"used\":3}}");
    assert_non_null(c.stats);
    /* json-c caches a serialization buffer in the object: create it outside the window. */
    assert_non_null(json_object_to_json_string(c.stats));
    /* A prompt long enough for the buffer to grow a few times. */
    size_t n = 40000;
    char *prompt = malloc(n + 1);
    assert_non_null(prompt);
    for (size_t i = 0; i < n; i++)
        prompt[i] = (char)('a' + i % 26);
    prompt[n] = '\0';
    c.s.prompt = prompt;
    c.s.prompt_len = n;
    fi_loop(&ops, &c);
    free(prompt);
    json_object_put(c.stats);
    cm_wire_buf_fini(&c.b);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wire_names),
        cmocka_unit_test(test_wire_header_layout),
        cmocka_unit_test(test_wire_roundtrip_hello),
        cmocka_unit_test(test_wire_roundtrip_model_info),
        cmocka_unit_test(test_wire_roundtrip_submit),
        cmocka_unit_test(test_wire_submit_defaults),
        cmocka_unit_test(test_wire_roundtrip_accepted),
        cmocka_unit_test(test_wire_roundtrip_token),
        cmocka_unit_test(test_wire_roundtrip_done),
        cmocka_unit_test(test_wire_roundtrip_error),
        cmocka_unit_test(test_wire_roundtrip_cancel),
        cmocka_unit_test(test_wire_roundtrip_stats),
        cmocka_unit_test(test_wire_pipelined_frames),
        cmocka_unit_test(test_wire_reject_header),
        cmocka_unit_test(test_wire_encode_oversize),
        cmocka_unit_test(test_wire_reject_malformed_json),
        cmocka_unit_test(test_wire_reject_submit_fields),
        cmocka_unit_test(test_wire_reject_huge_counts),
        cmocka_unit_test(test_wire_reject_other_fields),
        cmocka_unit_test(test_wire_model_info_forward_compatible),
        cmocka_unit_test(test_wire_reject_binary_payloads),
        cmocka_unit_test(test_wire_encode_rejects_invalid),
        cmocka_unit_test(test_wire_fd_roundtrip),
        cmocka_unit_test(test_wire_fault_decode_submit),
        cmocka_unit_test(test_wire_fault_decode_model_info),
        cmocka_unit_test(test_wire_fault_encode),
    };
    if (!fi_works())
        print_message("fault injection: malloc is not replaceable here (sanitizer or valgrind)\n");
    return cmocka_run_group_tests(tests, NULL, NULL);
}

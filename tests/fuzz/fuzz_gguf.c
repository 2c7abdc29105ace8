/*
 * fuzz_gguf: libFuzzer harness for the GGUF reader. Every input goes through eng_gguf_parse; an
 * accepted file is then walked completely (every key, value, array element, string byte and tensor
 * byte range, every lookup and getter, and the --inspect printer), so ASan/UBSan see any pointer
 * the reader handed out that does not lie inside the input. A rejected file must come with a
 * one-line message. Seeds (tests/fuzz/corpus/gguf/): mkgguf-q4_0-tied.gguf is `mkgguf --type q4_0
 * --dim 32 --layers 1 --ffn 32 --heads 2 --kv-heads 1 --tied`; the py-*.gguf files were written
 * with gguf-py's GGUFWriter (an independent writer): every value type and array kind, each
 * supported weight type, 3-D and 4-D shapes, alignment 64, a header without tensors, and a copy
 * patched to version 2.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile uint64_t sink;

static uint64_t
touch(const void *p, uint64_t n)
{
    const uint8_t *b = p;
    uint64_t h = 0;
    for (uint64_t i = 0; i < n; i++)
        h = h * 31 + b[i];
    return h;
}

/* Float values may be anything (NaN, 1e38): hash their bits, never convert them to integers. */
static uint32_t
float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* A NUL-terminated copy of a GGUF string for the lookup functions (NULL if it holds a NUL). */
static char *
cstr(struct eng_gguf_str s)
{
    if (memchr(s.data, 0, s.len))
        return NULL;
    char *c = malloc(s.len + 1);
    if (!c)
        abort();
    memcpy(c, s.data, s.len);
    c[s.len] = '\0';
    return c;
}

static void
walk_kv(const struct eng_gguf *g, const struct eng_gguf_kv *kv)
{
    uint64_t h = touch(kv->key.data, kv->key.len);
    if (kv->type == ENG_GGUF_STRING) {
        h += touch(kv->v.str.data, kv->v.str.len);
    } else if (kv->type == ENG_GGUF_ARRAY) {
        const struct eng_gguf_arr *a = &kv->v.arr;
        for (uint64_t i = 0; i < a->n; i++) {
            if (a->type == ENG_GGUF_STRING)
                h += touch(a->strs[i].data, a->strs[i].len);
            else
                h += (uint64_t)eng_gguf_arr_i64(a, i) + float_bits(eng_gguf_arr_f32(a, i));
        }
    }
    char *key = cstr(kv->key);
    if (key) {
        uint32_t u32;
        int64_t i64;
        float f;
        bool b;
        struct eng_gguf_str s;
        struct eng_gguf_arr arr;
        /* Keys are unique, so the lookup must find this very entry. */
        if (eng_gguf_find(g, key) != kv)
            abort();
        h += (uint64_t)eng_gguf_get_u32(g, key, &u32) + (uint64_t)eng_gguf_get_i64(g, key, &i64);
        if (eng_gguf_get_f32(g, key, &f) == 0)
            h += float_bits(f);
        h += (uint64_t)eng_gguf_get_bool(g, key, &b);
        h += (uint64_t)eng_gguf_get_str(g, key, &s) + (uint64_t)eng_gguf_get_arr(g, key, &arr);
        free(key);
    }
    sink += h;
}

static void
walk_tensor(const struct eng_gguf *g, const struct eng_gguf_tensor *t)
{
    const uint8_t *base = g->base;
    const uint8_t *p = t->data;
    /* The whole data range must lie inside the input. */
    if (t->n_bytes == 0 || p < base || (uint64_t)(p - base) + t->n_bytes > g->size)
        abort();
    if (t->n_dims < 1 || t->n_dims > ENG_GGUF_MAX_DIMS || !kern_dtype_traits((uint32_t)t->type))
        abort();
    sink += touch(t->name.data, t->name.len) + p[0] + p[t->n_bytes - 1];
    char *name = cstr(t->name);
    if (name) {
        if (eng_gguf_find_tensor(g, name) != t)
            abort();
        free(name);
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static FILE *devnull;
    struct eng_gguf *g = NULL;
    char err[ENG_GGUF_ERR_LEN] = "";
    if (!devnull && !(devnull = fopen("/dev/null", "w")))
        abort();
    int rc = eng_gguf_parse(data, size, &g, err, sizeof(err));
    if (rc != 0) {
        if (g || (rc != -EBADMSG && rc != -ENOMEM) || err[0] == '\0' || strchr(err, '\n'))
            abort();
        return 0;
    }
    for (uint64_t i = 0; i < g->n_kv; i++)
        walk_kv(g, &g->kv[i]);
    for (uint64_t i = 0; i < g->n_tensors; i++)
        walk_tensor(g, &g->tensors[i]);
    eng_gguf_print(g, devnull);
    eng_gguf_close(g);
    return 0;
}

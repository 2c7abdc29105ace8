/*
 * Unit tests of engine/gguf: GGUF images are built in memory by a small writer (struct img) from a
 * description (struct spec) that each test bends into a valid or a broken file.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "engine/gguf.h"

/* ---- Image writer ---- */

struct img {
    uint8_t *p;
    size_t len, cap;
};

static void
put(struct img *im, const void *p, size_t n)
{
    if (im->len + n > im->cap) {
        im->cap = (im->len + n) * 2 + 64;
        im->p = realloc(im->p, im->cap);
        assert_non_null(im->p);
    }
    if (n)
        memcpy(im->p + im->len, p, n);
    im->len += n;
}

static void
put_u8(struct img *im, uint8_t v)
{
    put(im, &v, 1);
}

static void
put_u32(struct img *im, uint32_t v)
{
    put(im, &v, 4);
}

static void
put_u64(struct img *im, uint64_t v)
{
    put(im, &v, 8);
}

static void
put_str(struct img *im, const char *s)
{
    put_u64(im, strlen(s));
    put(im, s, strlen(s));
}

/* Writes a key and its value type; the caller writes the value. Counts the key in *n_kv. */
static void
put_key(struct img *im, int *n_kv, const char *key, uint32_t type)
{
    put_str(im, key);
    put_u32(im, type);
    (*n_kv)++;
}

static void
put_arr_head(struct img *im, uint32_t elem_type, uint64_t n)
{
    put_u32(im, elem_type);
    put_u64(im, n);
}

/* ---- File descriptions ---- */

struct tspec {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    uint64_t offset;
    uint64_t name_len; /* 0: strlen(name) */
};

typedef void (*kv_writer_fn)(struct img *im, int *n_kv);

struct spec {
    uint32_t magic, version;
    int64_t n_tensors, n_kv; /* -1: the real counts */
    uint32_t alignment;      /* 0: no general.alignment key (default 32 applies) */
    bool all_types;          /* write the t.* key/values of every type */
    kv_writer_fn extra_kv;   /* written after the others */
    int n_t;
    struct tspec t[4];
    int64_t data_bytes; /* -1: up to the end of the last tensor */
};

/* Two tensors: f32 [8, 2] (64 bytes) at 0 and q8_0 [32, 2] (68 bytes) at 64. */
static struct spec
base_spec(void)
{
    struct spec s = {
        .magic = ENG_GGUF_MAGIC,
        .version = 3,
        .n_tensors = -1,
        .n_kv = -1,
        .alignment = 32,
        .all_types = true,
        .n_t = 2,
        .data_bytes = -1,
        .t =
            {
                {"tok.weight", 2, {8, 2, 1, 1}, KERN_DTYPE_F32, 0},
                {"blk.0.q", 2, {32, 2, 1, 1}, KERN_DTYPE_Q8_0, 64},
            },
    };
    return s;
}

static void
put_all_types(struct img *im, int *n)
{
    int32_t ai[3] = {1, -2, 3};
    float af[2] = {0.5f, -1.0f};
    uint8_t ab[2] = {1, 0};
    uint64_t au = (1ull << 63) + 5;
    float f = 1.5f;
    double d = 0.25;
    put_key(im, n, "t.u8", ENG_GGUF_U8);
    put_u8(im, 200);
    put_key(im, n, "t.i8", ENG_GGUF_I8);
    put_u8(im, (uint8_t)-100);
    put_key(im, n, "t.u16", ENG_GGUF_U16);
    put(im, &(uint16_t){60000}, 2);
    put_key(im, n, "t.i16", ENG_GGUF_I16);
    put(im, &(int16_t){-30000}, 2);
    put_key(im, n, "t.u32", ENG_GGUF_U32);
    put_u32(im, 4000000000u);
    put_key(im, n, "t.i32", ENG_GGUF_I32);
    put(im, &(int32_t){-2000000000}, 4);
    put_key(im, n, "t.f32", ENG_GGUF_F32);
    put(im, &f, 4);
    put_key(im, n, "t.bool", ENG_GGUF_BOOL);
    put_u8(im, 1);
    put_key(im, n, "t.str", ENG_GGUF_STRING);
    put_str(im, "hello");
    put_key(im, n, "t.u64", ENG_GGUF_U64);
    put_u64(im, (1ull << 40) + 1);
    put_key(im, n, "t.i64", ENG_GGUF_I64);
    put(im, &(int64_t){-(1ll << 40)}, 8);
    put_key(im, n, "t.f64", ENG_GGUF_F64);
    put(im, &d, 8);
    put_key(im, n, "t.arr_i32", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_I32, 3);
    put(im, ai, sizeof(ai));
    put_key(im, n, "t.arr_str", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_STRING, 3);
    put_str(im, "a");
    put_str(im, "bc");
    put_str(im, "");
    put_key(im, n, "t.arr_f32", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_F32, 2);
    put(im, af, sizeof(af));
    put_key(im, n, "t.arr_empty", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_U8, 0);
    put_key(im, n, "t.arr_bool", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_BOOL, 2);
    put(im, ab, sizeof(ab));
    put_key(im, n, "t.arr_u64", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_U64, 1);
    put_u64(im, au);
}

/* Bytes tensor t needs, or 0 when its type or shape is not computable. */
static uint64_t
tspec_bytes(const struct tspec *t)
{
    uint64_t rows = 1, row;
    if (t->n_dims < 1 || t->n_dims > 4)
        return 0;
    for (uint32_t d = 1; d < t->n_dims; d++) {
        if (__builtin_mul_overflow(rows, t->ne[d], &rows))
            return 0;
    }
    if (t->ne[0] > INT64_MAX)
        return 0;
    row = kern_row_bytes(t->type, (int64_t)t->ne[0]);
    if (row == 0 || __builtin_mul_overflow(row, rows, &rows))
        return 0;
    return rows;
}

static void
build(const struct spec *s, struct img *im)
{
    int n_kv = 0;
    uint32_t align = s->alignment ? s->alignment : 32;
    uint64_t end = 0;
    memset(im, 0, sizeof(*im));
    put_u32(im, s->magic);
    put_u32(im, s->version);
    put_u64(im, 0); /* patched below */
    put_u64(im, 0);
    if (s->alignment) {
        put_key(im, &n_kv, "general.alignment", ENG_GGUF_U32);
        put_u32(im, s->alignment);
    }
    if (s->all_types)
        put_all_types(im, &n_kv);
    if (s->extra_kv)
        s->extra_kv(im, &n_kv);
    for (int i = 0; i < s->n_t; i++) {
        const struct tspec *t = &s->t[i];
        uint64_t b = tspec_bytes(t), e;
        put_u64(im, t->name_len ? t->name_len : strlen(t->name));
        put(im, t->name, strlen(t->name));
        put_u32(im, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++)
            put_u64(im, d < 4 ? t->ne[d] : 1);
        put_u32(im, t->type);
        put_u64(im, t->offset);
        if (b && !__builtin_add_overflow(t->offset, b, &e) && e > end && e < (1u << 20))
            end = e;
    }
    while (align <= 4096 && im->len % align) /* larger alignments: the test wants no padding */
        put_u8(im, 0);
    uint64_t data = s->data_bytes >= 0 ? (uint64_t)s->data_bytes : end;
    for (uint64_t i = 0; i < data; i++)
        put_u8(im, (uint8_t)(i * 7 + 1));
    uint64_t nt = s->n_tensors >= 0 ? (uint64_t)s->n_tensors : (uint64_t)s->n_t;
    uint64_t nk = s->n_kv >= 0 ? (uint64_t)s->n_kv : (uint64_t)n_kv;
    memcpy(im->p + 8, &nt, 8);
    memcpy(im->p + 16, &nk, 8);
}

static int
parse_spec(const struct spec *s, struct img *im, struct eng_gguf **g, char *err, size_t err_len)
{
    build(s, im);
    return eng_gguf_parse(im->p, im->len, g, err, err_len);
}

/* ---- Valid files ---- */

static void
check_all_types(const struct eng_gguf *g)
{
    uint32_t u32 = 0;
    int64_t i64 = 0;
    float f = 0;
    bool b = false;
    struct eng_gguf_str str = {0};
    struct eng_gguf_arr arr = {0};
    const struct eng_gguf_kv *kv = eng_gguf_find(g, "t.i8");
    assert_non_null(kv);
    assert_int_equal(kv->type, ENG_GGUF_I8);
    assert_int_equal(kv->v.i64, -100);
    assert_int_equal(eng_gguf_find(g, "t.u16")->v.u64, 60000);
    assert_int_equal(eng_gguf_find(g, "t.i16")->v.i64, -30000);
    assert_int_equal(eng_gguf_get_u32(g, "t.u8", &u32), 0);
    assert_int_equal(u32, 200);
    assert_int_equal(eng_gguf_get_u32(g, "t.u32", &u32), 0);
    assert_int_equal(u32, 4000000000u);
    assert_int_equal(eng_gguf_get_i64(g, "t.i32", &i64), 0);
    assert_int_equal(i64, -2000000000);
    assert_int_equal(eng_gguf_get_i64(g, "t.u64", &i64), 0);
    assert_int_equal(i64, (1ll << 40) + 1);
    assert_int_equal(eng_gguf_get_i64(g, "t.i64", &i64), 0);
    assert_int_equal(i64, -(1ll << 40));
    assert_int_equal(eng_gguf_get_f32(g, "t.f32", &f), 0);
    assert_float_equal(f, 1.5f, 0);
    assert_int_equal(eng_gguf_get_f32(g, "t.f64", &f), 0);
    assert_float_equal(f, 0.25f, 0);
    assert_int_equal(eng_gguf_get_bool(g, "t.bool", &b), 0);
    assert_true(b);
    assert_int_equal(eng_gguf_get_str(g, "t.str", &str), 0);
    assert_true(eng_gguf_str_eq(str, "hello"));
    assert_false(eng_gguf_str_eq(str, "hell"));
    assert_int_equal(eng_gguf_get_arr(g, "t.arr_i32", &arr), 0);
    assert_int_equal(arr.type, ENG_GGUF_I32);
    assert_int_equal(arr.n, 3);
    assert_int_equal(eng_gguf_arr_i64(&arr, 1), -2);
    assert_float_equal(eng_gguf_arr_f32(&arr, 2), 3.0f, 0);
    assert_int_equal(eng_gguf_arr_i64(&arr, 3), 0); /* out of range */
    assert_int_equal(eng_gguf_get_arr(g, "t.arr_str", &arr), 0);
    assert_int_equal(arr.type, ENG_GGUF_STRING);
    assert_int_equal(arr.n, 3);
    assert_true(eng_gguf_str_eq(arr.strs[0], "a"));
    assert_true(eng_gguf_str_eq(arr.strs[1], "bc"));
    assert_true(eng_gguf_str_eq(arr.strs[2], ""));
    assert_int_equal(eng_gguf_get_arr(g, "t.arr_f32", &arr), 0);
    assert_float_equal(eng_gguf_arr_f32(&arr, 0), 0.5f, 0);
    assert_float_equal(eng_gguf_arr_f32(&arr, 1), -1.0f, 0);
    assert_int_equal(eng_gguf_arr_i64(&arr, 0), 0); /* float array: no integer view */
    assert_int_equal(eng_gguf_get_arr(g, "t.arr_empty", &arr), 0);
    assert_int_equal(arr.n, 0);
    assert_int_equal(eng_gguf_get_arr(g, "t.arr_bool", &arr), 0);
    assert_int_equal(eng_gguf_arr_i64(&arr, 0), 1);
    assert_int_equal(eng_gguf_get_arr(g, "t.arr_u64", &arr), 0);
    assert_int_equal(eng_gguf_arr_i64(&arr, 0), INT64_MAX); /* clamped */
}

static void
check_tensors(const struct eng_gguf *g, const struct img *im, uint32_t align)
{
    assert_int_equal(g->n_tensors, 2);
    const struct eng_gguf_tensor *t = eng_gguf_find_tensor(g, "blk.0.q");
    assert_non_null(t);
    assert_ptr_equal(t, &g->tensors[1]);
    assert_int_equal(t->type, KERN_DTYPE_Q8_0);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 32);
    assert_int_equal(t->ne[1], 2);
    assert_int_equal(t->ne[2], 1);
    assert_int_equal(t->ne[3], 1);
    assert_int_equal(t->n_bytes, 68);
    /* The data section starts at the first multiple of the alignment after the tensor infos. */
    size_t data_start = im->len - 64 - 68;
    assert_int_equal(data_start % align, 0);
    assert_ptr_equal(t->data, im->p + data_start + 64);
    assert_ptr_equal(g->tensors[0].data, im->p + data_start);
    assert_int_equal(g->tensors[0].n_bytes, 64);
    assert_null(eng_gguf_find_tensor(g, "blk.0"));
    assert_null(eng_gguf_find_tensor(g, "blk.0.q.x"));
}

static void
test_gguf_parses_valid_v3(void **state)
{
    (void)state;
    struct img im;
    struct eng_gguf *g = NULL;
    char err[ENG_GGUF_ERR_LEN] = "untouched";
    struct spec s = base_spec();
    assert_int_equal(parse_spec(&s, &im, &g, err, sizeof(err)), 0);
    assert_string_equal(err, "");
    assert_int_equal(g->version, 3);
    assert_int_equal(g->alignment, 32);
    assert_int_equal(g->n_kv, 19);
    assert_int_equal(g->size, im.len);
    assert_ptr_equal(g->base, im.p);
    check_all_types(g);
    check_tensors(g, &im, 32);
    eng_gguf_close(g);
    free(im.p);
}

static void
test_gguf_parses_valid_v2(void **state)
{
    (void)state;
    struct img im;
    struct eng_gguf *g = NULL;
    struct spec s = base_spec();
    s.version = 2;
    assert_int_equal(parse_spec(&s, &im, &g, NULL, 0), 0);
    assert_int_equal(g->version, 2);
    check_all_types(g);
    check_tensors(g, &im, 32);
    eng_gguf_close(g);
    free(im.p);
}

static void
test_gguf_alignment_64_and_default(void **state)
{
    (void)state;
    struct img im;
    struct eng_gguf *g = NULL;
    struct spec s = base_spec();
    s.alignment = 64;
    assert_int_equal(parse_spec(&s, &im, &g, NULL, 0), 0);
    assert_int_equal(g->alignment, 64);
    check_tensors(g, &im, 64);
    eng_gguf_close(g);
    free(im.p);

    s = base_spec();
    s.alignment = 0; /* no key: 32 */
    assert_int_equal(parse_spec(&s, &im, &g, NULL, 0), 0);
    assert_int_equal(g->alignment, 32);
    assert_null(eng_gguf_find(g, "general.alignment"));
    check_tensors(g, &im, 32);
    eng_gguf_close(g);
    free(im.p);
}

static void
test_gguf_parses_header_without_tensors(void **state)
{
    (void)state;
    struct img im;
    struct eng_gguf *g = NULL;
    struct spec s = base_spec();
    s.n_t = 0;
    s.all_types = false;
    s.alignment = 0;
    build(&s, &im);
    assert_int_equal(im.len, 32); /* header + padding to 32 */
    assert_int_equal(eng_gguf_parse(im.p, im.len, &g, NULL, 0), 0);
    eng_gguf_close(g);
    /* Without tensors, the padding after the header may be missing. */
    assert_int_equal(eng_gguf_parse(im.p, 24, &g, NULL, 0), 0);
    assert_int_equal(g->n_kv, 0);
    assert_int_equal(g->n_tensors, 0);
    assert_null(eng_gguf_find(g, "general.alignment"));
    eng_gguf_close(g);
    free(im.p);
}

/* ---- Getters ---- */

static void
put_getter_kvs(struct img *im, int *n)
{
    double big = 1e300;
    put_key(im, n, "g.neg", ENG_GGUF_I32);
    put(im, &(int32_t){-1}, 4);
    put_key(im, n, "g.pos_i64", ENG_GGUF_I64);
    put(im, &(int64_t){123}, 8);
    put_key(im, n, "g.huge_u64", ENG_GGUF_U64);
    put_u64(im, UINT64_MAX);
    put_key(im, n, "g.u64_33bit", ENG_GGUF_U64);
    put_u64(im, 1ull << 33);
    put_key(im, n, "g.big_f64", ENG_GGUF_F64);
    put(im, &big, 8);
    put_key(im, n, "g.u16", ENG_GGUF_U16);
    put(im, &(uint16_t){7}, 2);
}

static void
test_gguf_getters_convert_and_reject(void **state)
{
    (void)state;
    struct img im;
    struct eng_gguf *g = NULL;
    struct spec s = base_spec();
    s.extra_kv = put_getter_kvs;
    assert_int_equal(parse_spec(&s, &im, &g, NULL, 0), 0);
    uint32_t u32 = 42;
    int64_t i64 = 42;
    float f = 42;
    bool b = false;
    struct eng_gguf_str str = {0};
    struct eng_gguf_arr arr = {0};

    assert_int_equal(eng_gguf_get_u32(g, "g.pos_i64", &u32), 0); /* signed that fits */
    assert_int_equal(u32, 123);
    assert_int_equal(eng_gguf_get_u32(g, "g.u16", &u32), 0);
    assert_int_equal(u32, 7);
    u32 = 42;
    assert_int_equal(eng_gguf_get_u32(g, "g.neg", &u32), -EBADMSG);
    assert_int_equal(eng_gguf_get_u32(g, "g.u64_33bit", &u32), -EBADMSG);
    assert_int_equal(eng_gguf_get_u32(g, "t.f32", &u32), -EBADMSG);
    assert_int_equal(eng_gguf_get_u32(g, "t.bool", &u32), -EBADMSG);
    assert_int_equal(eng_gguf_get_u32(g, "t.str", &u32), -EBADMSG);
    assert_int_equal(eng_gguf_get_u32(g, "no.such.key", &u32), -ENOENT);
    assert_int_equal(u32, 42); /* written on success only */

    assert_int_equal(eng_gguf_get_i64(g, "g.neg", &i64), 0);
    assert_int_equal(i64, -1);
    i64 = 42;
    assert_int_equal(eng_gguf_get_i64(g, "g.huge_u64", &i64), -EBADMSG);
    assert_int_equal(eng_gguf_get_i64(g, "t.f64", &i64), -EBADMSG);
    assert_int_equal(eng_gguf_get_i64(g, "missing", &i64), -ENOENT);
    assert_int_equal(i64, 42);

    assert_int_equal(eng_gguf_get_f32(g, "g.u16", &f), 0); /* integers convert */
    assert_float_equal(f, 7.0f, 0);
    f = 42;
    assert_int_equal(eng_gguf_get_f32(g, "g.big_f64", &f), -EBADMSG);
    assert_int_equal(eng_gguf_get_f32(g, "t.str", &f), -EBADMSG);
    assert_int_equal(eng_gguf_get_f32(g, "missing", &f), -ENOENT);
    assert_float_equal(f, 42.0f, 0);

    assert_int_equal(eng_gguf_get_bool(g, "t.u8", &b), -EBADMSG);
    assert_int_equal(eng_gguf_get_bool(g, "missing", &b), -ENOENT);
    assert_false(b);
    assert_int_equal(eng_gguf_get_str(g, "t.u8", &str), -EBADMSG);
    assert_int_equal(eng_gguf_get_str(g, "t.arr_str", &str), -EBADMSG);
    assert_int_equal(eng_gguf_get_str(g, "missing", &str), -ENOENT);
    assert_null(str.data);
    assert_int_equal(eng_gguf_get_arr(g, "t.str", &arr), -EBADMSG);
    assert_int_equal(eng_gguf_get_arr(g, "missing", &arr), -ENOENT);
    assert_int_equal(arr.n, 0);
    assert_string_equal(eng_gguf_vtype_name(ENG_GGUF_F64), "f64");
    assert_string_equal(eng_gguf_vtype_name((enum eng_gguf_vtype)99), "unknown");
    eng_gguf_close(g);
    free(im.p);
}

/* ---- Rejections ---- */

static void
kv_key_len_huge(struct img *im, int *n)
{
    (*n)++;
    put_u64(im, 1ull << 40);
    put(im, "abc", 3);
}

static void
kv_str_len_2_63(struct img *im, int *n)
{
    put_key(im, n, "s", ENG_GGUF_STRING);
    put_u64(im, 1ull << 63);
}

static void
kv_unknown_type(struct img *im, int *n)
{
    put_key(im, n, "u", 13);
    put_u32(im, 0);
}

static void
kv_nested_array(struct img *im, int *n)
{
    put_key(im, n, "nested", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_ARRAY, 1);
    put_arr_head(im, ENG_GGUF_U8, 1);
    put_u8(im, 0);
}

static void
kv_unknown_elem_type(struct img *im, int *n)
{
    put_key(im, n, "a", ENG_GGUF_ARRAY);
    put_arr_head(im, 200, 1);
    put_u32(im, 0);
}

static void
kv_array_count_overflow(struct img *im, int *n)
{
    put_key(im, n, "a", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_U32, 1ull << 62); /* 2^62 * 4 overflows */
}

static void
kv_str_array_count_huge(struct img *im, int *n)
{
    put_key(im, n, "a", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_STRING, 1ull << 61);
    put_str(im, "x");
}

static void
kv_str_array_elem_len(struct img *im, int *n)
{
    put_key(im, n, "a", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_STRING, 2);
    put_str(im, "x");
    put_u64(im, 1ull << 63);
}

static void
kv_bool_2(struct img *im, int *n)
{
    put_key(im, n, "b", ENG_GGUF_BOOL);
    put_u8(im, 2);
}

static void
kv_bool_array_2(struct img *im, int *n)
{
    put_key(im, n, "b", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_BOOL, 3);
    put(im, "\x00\x01\x02", 3);
}

static void
kv_duplicate(struct img *im, int *n)
{
    put_key(im, n, "t.str", ENG_GGUF_STRING);
    put_str(im, "again");
}

static void
kv_alignment_0(struct img *im, int *n)
{
    put_key(im, n, "general.alignment", ENG_GGUF_U32);
    put_u32(im, 0);
}

static void
kv_alignment_u64(struct img *im, int *n)
{
    put_key(im, n, "general.alignment", ENG_GGUF_U64);
    put_u64(im, 32);
}

static void
mut_magic(struct spec *s)
{
    s->magic = 0x46554746;
}
static void
mut_version1(struct spec *s)
{
    s->version = 1;
}
static void
mut_version99(struct spec *s)
{
    s->version = 99;
}
static void
mut_big_endian(struct spec *s)
{
    s->version = 0x03000000;
}
static void
mut_n_kv_huge(struct spec *s)
{
    s->n_kv = INT64_MAX;
}
static void
mut_n_tensors_huge(struct spec *s)
{
    s->n_tensors = 1ll << 60;
}
static void
mut_n_kv_plus_one(struct spec *s)
{
    s->n_kv = 20;
}
static void
mut_key_len(struct spec *s)
{
    s->extra_kv = kv_key_len_huge;
}
static void
mut_str_len(struct spec *s)
{
    s->extra_kv = kv_str_len_2_63;
}
static void
mut_vtype(struct spec *s)
{
    s->extra_kv = kv_unknown_type;
}
static void
mut_nested(struct spec *s)
{
    s->extra_kv = kv_nested_array;
}
static void
mut_elem_type(struct spec *s)
{
    s->extra_kv = kv_unknown_elem_type;
}
static void
mut_arr_overflow(struct spec *s)
{
    s->extra_kv = kv_array_count_overflow;
}
static void
mut_str_arr_huge(struct spec *s)
{
    s->extra_kv = kv_str_array_count_huge;
}
static void
mut_str_arr_elem(struct spec *s)
{
    s->extra_kv = kv_str_array_elem_len;
}
static void
mut_bool(struct spec *s)
{
    s->extra_kv = kv_bool_2;
}
static void
mut_bool_arr(struct spec *s)
{
    s->extra_kv = kv_bool_array_2;
}
static void
mut_dup_key(struct spec *s)
{
    s->extra_kv = kv_duplicate;
}
static void
mut_align_48(struct spec *s)
{
    s->alignment = 48;
}
static void
mut_align_0(struct spec *s)
{
    s->alignment = 0;
    s->extra_kv = kv_alignment_0;
}
static void
mut_align_u64(struct spec *s)
{
    s->alignment = 0;
    s->extra_kv = kv_alignment_u64;
}
static void
mut_align_huge(struct spec *s)
{
    s->alignment = 1u << 31;
    s->data_bytes = 0;
}
static void
mut_dup_tensor(struct spec *s)
{
    s->t[1].name = "tok.weight";
}
static void
mut_dims0(struct spec *s)
{
    s->t[1].n_dims = 0;
}
static void
mut_dims5(struct spec *s)
{
    s->t[1].n_dims = 5;
}
static void
mut_dim_zero(struct spec *s)
{
    s->t[1].ne[1] = 0;
}
static void
mut_elems_overflow(struct spec *s)
{
    s->t[0].ne[0] = 1ull << 32;
    s->t[0].ne[1] = 1ull << 32;
}
static void
mut_bytes_overflow(struct spec *s)
{
    s->t[0].ne[0] = 1ull << 62;
    s->t[0].ne[1] = 1;
}
static void
mut_type77(struct spec *s)
{
    s->t[1].type = 77;
}
static void
mut_type_removed(struct spec *s)
{
    s->t[1].type = 4;
}
static void
mut_type_huge(struct spec *s)
{
    s->t[1].type = 0x80000000u;
}
static void
mut_type_q2_k(struct spec *s)
{
    s->t[1].type = KERN_DTYPE_Q2_K;
    s->t[1].ne[0] = 256;
}
static void
mut_row_block(struct spec *s)
{
    s->t[1].ne[0] = 48;
}
static void
mut_misaligned(struct spec *s)
{
    s->t[1].offset = 72;
    s->data_bytes = 200;
}
static void
mut_past_end(struct spec *s)
{
    s->t[1].offset = 4096;
    s->data_bytes = 132;
}
static void
mut_one_short(struct spec *s)
{
    s->data_bytes = 131;
}
static void
mut_offset_wrap(struct spec *s)
{
    s->t[1].offset = UINT64_MAX - 31;
    s->data_bytes = 132;
}
static void
mut_name_len(struct spec *s)
{
    s->t[1].name_len = 1ull << 63;
}

struct bad_case {
    const char *what;
    void (*mut)(struct spec *s);
    const char *words[3]; /* each must appear in the message */
};

static const struct bad_case bad_cases[] = {
    {"bad magic", mut_magic, {"magic", "FGUF"}},
    {"version 1", mut_version1, {"version 1", "not supported"}},
    {"version 99", mut_version99, {"version 99"}},
    {"big-endian", mut_big_endian, {"big-endian"}},
    {"n_kv 2^63-1", mut_n_kv_huge, {"key/value count 9223372036854775807"}},
    {"n_tensors 2^60", mut_n_tensors_huge, {"tensor count 1152921504606846976"}},
    {"n_kv one too many", mut_n_kv_plus_one, {"tensor 0: name length", "past the end"}},
    {"key length past end", mut_key_len, {"key length 1099511627776", "past the end"}},
    {"string length 2^63", mut_str_len, {"key 's'", "length 9223372036854775808", "past the end"}},
    {"unknown value type", mut_vtype, {"key 'u'", "unknown value type 13"}},
    {"nested array", mut_nested, {"key 'nested'", "arrays of arrays"}},
    {"unknown element type", mut_elem_type, {"unknown array element type 200"}},
    {"array size overflow", mut_arr_overflow, {"array of 4611686018427387904 u32", "past the end"}},
    {"string array count", mut_str_arr_huge, {"array of 2305843009213693952 strings"}},
    {"string array element", mut_str_arr_elem, {"array string length 9223372036854775808"}},
    {"bool 2", mut_bool, {"key 'b'", "bool value 2"}},
    {"bool array 2", mut_bool_arr, {"bool array element 2 is 2"}},
    {"duplicate key", mut_dup_key, {"duplicate key 't.str'"}},
    {"alignment 48", mut_align_48, {"general.alignment 48", "power of two"}},
    {"alignment 0", mut_align_0, {"general.alignment 0", "power of two"}},
    {"alignment u64", mut_align_u64, {"general.alignment must be a u32", "u64"}},
    {"data section past end", mut_align_huge, {"data section", "past the end"}},
    {"duplicate tensor", mut_dup_tensor, {"duplicate tensor name 'tok.weight'"}},
    {"n_dims 0", mut_dims0, {"'blk.0.q' has 0 dimensions"}},
    {"n_dims 5", mut_dims5, {"'blk.0.q' has 5 dimensions"}},
    {"dimension 0", mut_dim_zero, {"'blk.0.q'", "dimension 1 is 0"}},
    {"element count overflow", mut_elems_overflow, {"'tok.weight'", "element count", "overflows"}},
    {"byte size overflow", mut_bytes_overflow, {"'tok.weight'", "byte size overflows"}},
    {"type 77", mut_type77, {"'blk.0.q' has unknown type 77"}},
    {"removed type 4", mut_type_removed, {"unknown type 4"}},
    {"type 2^31", mut_type_huge, {"unknown type 2147483648"}},
    {"unsupported q2_k", mut_type_q2_k, {"type q2_", "not supported"}},
    {"row not whole blocks", mut_row_block, {"row length 48", "q8_0 block size 32"}},
    {"misaligned offset", mut_misaligned, {"offset 72 is not a multiple of the alignment 32"}},
    {"data past end", mut_past_end, {"'blk.0.q' data [offset 4096, 68 bytes]", "past the end"}},
    {"data one byte short", mut_one_short, {"'blk.0.q'", "past the end"}},
    {"offset + size wraps", mut_offset_wrap, {"offset 18446744073709551584", "past the end"}},
    {"tensor name length",
     mut_name_len,
     {"tensor 1: name length 9223372036854775808", "past the end"}},
};

static void
test_gguf_rejects_each_corruption(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++) {
        const struct bad_case *c = &bad_cases[i];
        struct spec s = base_spec();
        struct img im;
        struct eng_gguf *g = (struct eng_gguf *)&s; /* must stay untouched */
        char err[ENG_GGUF_ERR_LEN] = "";
        c->mut(&s);
        int rc = parse_spec(&s, &im, &g, err, sizeof(err));
        if (rc != -EBADMSG)
            fail_msg("%s: rc %d, message '%s'", c->what, rc, err);
        if (g != (struct eng_gguf *)&s)
            fail_msg("%s: *out written on failure", c->what);
        if (strncmp(err, "bad GGUF file: ", 15) != 0 || strchr(err, '\n'))
            fail_msg("%s: message '%s'", c->what, err);
        for (int w = 0; w < 3 && c->words[w]; w++) {
            if (!strstr(err, c->words[w]))
                fail_msg("%s: message '%s' lacks '%s'", c->what, err, c->words[w]);
        }
        free(im.p);
    }
}

static void
test_gguf_rejects_tiny_files(void **state)
{
    (void)state;
    char err[ENG_GGUF_ERR_LEN];
    struct eng_gguf *g = NULL;
    assert_int_equal(eng_gguf_parse(NULL, 0, &g, err, sizeof(err)), -EBADMSG);
    assert_non_null(strstr(err, "0 bytes, too small"));
    assert_int_equal(eng_gguf_parse("GGUF\3\0\0\0", 8, &g, err, sizeof(err)), -EBADMSG);
    assert_non_null(strstr(err, "8 bytes, too small"));
    assert_int_equal(eng_gguf_parse(NULL, 5, &g, err, sizeof(err)), -EINVAL);
    assert_int_equal(eng_gguf_parse("x", 1, NULL, err, sizeof(err)), -EINVAL);
    assert_null(g);
}

static void
put_bad_name_kv(struct img *im, int *n)
{
    put_key(im, n, "evil\nkey\x01\xff", ENG_GGUF_U32);
    put_u32(im, 1);
    put_key(im, n, "evil\nkey\x01\xff", ENG_GGUF_U32);
    put_u32(im, 1);
}

/* Names from the file cannot break the one-line message, and long ones are cut. */
static void
test_gguf_error_names_are_escaped(void **state)
{
    (void)state;
    char err[ENG_GGUF_ERR_LEN];
    char long_name[1000];
    struct img im;
    struct eng_gguf *g = NULL;
    struct spec s = base_spec();
    s.extra_kv = put_bad_name_kv;
    assert_int_equal(parse_spec(&s, &im, &g, err, sizeof(err)), -EBADMSG);
    assert_non_null(strstr(err, "duplicate key 'evil\\x0akey\\x01\\xff'"));
    free(im.p);

    memset(long_name, 'n', sizeof(long_name) - 1);
    long_name[sizeof(long_name) - 1] = '\0';
    s = base_spec();
    s.t[1].name = long_name;
    s.t[1].type = 77;
    assert_int_equal(parse_spec(&s, &im, &g, err, sizeof(err)), -EBADMSG);
    assert_non_null(strstr(err, "nnn...' has unknown type 77"));
    assert_true(strlen(err) < 200);
    free(im.p);

    /* A tiny buffer gets a cut message, still terminated; NULL gets nothing. */
    assert_int_equal(eng_gguf_parse("GGUF", 4, &g, err, 8), -EBADMSG);
    assert_string_equal(err, "bad GGU");
    assert_int_equal(eng_gguf_parse("GGUF", 4, &g, NULL, 0), -EBADMSG);
    assert_null(g);
}

/* Every proper prefix of a valid file is rejected cleanly (run under ASan for out-of-bounds). */
static void
test_gguf_every_truncation_fails(void **state)
{
    (void)state;
    struct img im;
    struct spec s = base_spec();
    build(&s, &im);
    for (size_t n = 0; n < im.len; n++) {
        /* A fresh copy of exactly n bytes, so ASan sees any read past the prefix. */
        uint8_t *cut = malloc(n ? n : 1);
        assert_non_null(cut);
        memcpy(cut, im.p, n);
        struct eng_gguf *g = NULL;
        char err[ENG_GGUF_ERR_LEN] = "";
        int rc = eng_gguf_parse(cut, n, &g, err, sizeof(err));
        if (rc != -EBADMSG || g || err[0] == '\0' || strchr(err, '\n'))
            fail_msg("prefix %zu of %zu: rc %d, message '%s'", n, im.len, rc, err);
        free(cut);
    }
    struct eng_gguf *g = NULL;
    assert_int_equal(eng_gguf_parse(im.p, im.len, &g, NULL, 0), 0);
    eng_gguf_close(g);
    free(im.p);
}

/* Every single-byte change of the header either parses or fails cleanly. */
static void
test_gguf_byte_flips_fail_cleanly(void **state)
{
    (void)state;
    struct img im;
    struct spec s = base_spec();
    build(&s, &im);
    size_t header = im.len - 132;
    int accepted = 0, rejected = 0;
    FILE *devnull = fopen("/dev/null", "w");
    assert_non_null(devnull);
    for (size_t i = 0; i < header; i++) {
        static const uint8_t vals[] = {0x00, 0x01, 0x7f, 0x80, 0xff};
        for (size_t v = 0; v < sizeof(vals); v++) {
            uint8_t *copy = malloc(im.len);
            assert_non_null(copy);
            memcpy(copy, im.p, im.len);
            copy[i] = vals[v];
            struct eng_gguf *g = NULL;
            char err[ENG_GGUF_ERR_LEN] = "";
            int rc = eng_gguf_parse(copy, im.len, &g, err, sizeof(err));
            if (rc == 0) {
                accepted++;
                eng_gguf_print(g, devnull); /* printing any accepted file is safe too */
                eng_gguf_close(g);
            } else if (rc == -EBADMSG && strncmp(err, "bad GGUF file: ", 15) == 0) {
                rejected++;
            } else {
                fail_msg("byte %zu = 0x%02x: rc %d, message '%s'", i, vals[v], rc, err);
            }
            free(copy);
        }
    }
    fclose(devnull);
    assert_true(accepted > 0);
    assert_true(rejected > 0);
    free(im.p);
}

/* ---- Allocation failures ---- */

static void
test_gguf_every_allocation_failure_is_clean(void **state)
{
    (void)state;
    struct img im;
    struct spec s = base_spec();
    build(&s, &im);
    int n_fail = 0;
    for (long n = 1;; n++) {
        struct eng_gguf *g = NULL;
        char err[ENG_GGUF_ERR_LEN] = "";
        eng_gguf_test_fail_alloc(n);
        int rc = eng_gguf_parse(im.p, im.len, &g, err, sizeof(err));
        eng_gguf_test_fail_alloc(0);
        if (rc == 0) {
            check_all_types(g);
            eng_gguf_close(g);
            break;
        }
        if (rc != -ENOMEM || g)
            fail_msg("allocation %ld failing: rc %d, message '%s'", n, rc, err);
        if (!strstr(err, "out of memory"))
            fail_msg("allocation %ld failing: message '%s'", n, err);
        n_fail++;
        assert_true(n < 100);
    }
    assert_true(n_fail >= 5); /* struct, priv, kv table, string array, indexes, tensors */
    free(im.p);
}

/* ---- Files ---- */

static char *
write_temp(const struct img *im)
{
    char *path = strdup("/tmp/test_gguf_XXXXXX");
    assert_non_null(path);
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, im->p, im->len), (ssize_t)im->len);
    close(fd);
    return path;
}

static void
test_gguf_open_maps_file(void **state)
{
    (void)state;
    struct img im;
    struct spec s = base_spec();
    struct eng_gguf *g = NULL;
    char err[ENG_GGUF_ERR_LEN] = "";
    build(&s, &im);
    char *path = write_temp(&im);
    assert_int_equal(eng_gguf_open(path, &g, err, sizeof(err)), 0);
    assert_int_equal(g->size, im.len);
    assert_memory_equal(g->base, im.p, im.len);
    check_all_types(g);
    const struct eng_gguf_tensor *t = eng_gguf_find_tensor(g, "blk.0.q");
    assert_non_null(t);
    assert_memory_equal(t->data, im.p + (im.len - 68), 68);
    eng_gguf_close(g);

    /* The same file cut short: a format error, not an OS error. */
    assert_int_equal(truncate(path, (off_t)im.len - 1), 0);
    g = NULL;
    assert_int_equal(eng_gguf_open(path, &g, err, sizeof(err)), -EBADMSG);
    assert_non_null(strstr(err, "past the end"));
    assert_null(g);
    assert_int_equal(truncate(path, 0), 0);
    assert_int_equal(eng_gguf_open(path, &g, err, sizeof(err)), -EBADMSG);
    assert_non_null(strstr(err, "too small"));
    unlink(path);
    free(path);
    free(im.p);
}

static void
test_gguf_open_reports_os_errors(void **state)
{
    (void)state;
    struct eng_gguf *g = NULL;
    char err[ENG_GGUF_ERR_LEN] = "";
    assert_int_equal(eng_gguf_open("/nonexistent/model.gguf", &g, err, sizeof(err)), -ENOENT);
    assert_non_null(strstr(err, "/nonexistent/model.gguf"));
    assert_non_null(strstr(err, strerror(ENOENT)));
    assert_int_equal(eng_gguf_open("/tmp", &g, err, sizeof(err)), -EISDIR);
    assert_non_null(strstr(err, "/tmp"));
    assert_int_equal(eng_gguf_open("/dev/null", &g, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "not a regular file"));
    assert_null(g);
    eng_gguf_close(NULL);
}

/* ---- Printing ---- */

static void
put_long_kvs(struct img *im, int *n)
{
    char s[300];
    memset(s, 'x', sizeof(s) - 1);
    s[sizeof(s) - 1] = '\0';
    put_key(im, n, "p.long", ENG_GGUF_STRING);
    put_str(im, s);
    put_key(im, n, "p.many", ENG_GGUF_ARRAY);
    put_arr_head(im, ENG_GGUF_I32, 100);
    for (int32_t i = 0; i < 100; i++)
        put(im, &i, 4);
    put_key(im, n, "p.utf8", ENG_GGUF_STRING);
    put_str(im, "\xc4\xa0the\n");
}

static void
test_gguf_print_shows_header_kvs_and_tensors(void **state)
{
    (void)state;
    struct img im;
    struct spec s = base_spec();
    struct eng_gguf *g = NULL;
    char *text = NULL;
    size_t text_len = 0;
    s.extra_kv = put_long_kvs;
    assert_int_equal(parse_spec(&s, &im, &g, NULL, 0), 0);
    FILE *f = open_memstream(&text, &text_len);
    assert_non_null(f);
    eng_gguf_print(g, f);
    fclose(f);
    assert_non_null(strstr(text, "GGUF v3"));
    assert_non_null(strstr(text, "22 key/values, 2 tensors, alignment 32"));
    assert_non_null(strstr(text, "t.str"));
    assert_non_null(strstr(text, "\"hello\""));
    assert_non_null(strstr(text, "[string x 3] \"a\", \"bc\", \"\""));
    assert_non_null(strstr(text, "[i32 x 100] 0, 1, 2, 3, 4, 5, ..."));
    assert_non_null(strstr(text, "xxx...\" (299 bytes)"));
    assert_null(strstr(
        text, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"));
    assert_non_null(strstr(text, "\"\xc4\xa0the\\x0a\""));
    assert_non_null(strstr(text, "[u64 x 1] 9223372036854775813"));
    assert_non_null(strstr(text, "blk.0.q"));
    assert_non_null(strstr(text, "q8_0"));
    assert_non_null(strstr(text, "[32, 2]"));
    assert_non_null(strstr(text, "total: 2 tensors, 80 elements"));
    assert_non_null(strstr(text, "132 bytes"));
    free(text);
    eng_gguf_close(g);
    free(im.p);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gguf_parses_valid_v3),
        cmocka_unit_test(test_gguf_parses_valid_v2),
        cmocka_unit_test(test_gguf_alignment_64_and_default),
        cmocka_unit_test(test_gguf_parses_header_without_tensors),
        cmocka_unit_test(test_gguf_getters_convert_and_reject),
        cmocka_unit_test(test_gguf_rejects_each_corruption),
        cmocka_unit_test(test_gguf_rejects_tiny_files),
        cmocka_unit_test(test_gguf_error_names_are_escaped),
        cmocka_unit_test(test_gguf_every_truncation_fails),
        cmocka_unit_test(test_gguf_byte_flips_fail_cleanly),
        cmocka_unit_test(test_gguf_every_allocation_failure_is_clean),
        cmocka_unit_test(test_gguf_open_maps_file),
        cmocka_unit_test(test_gguf_open_reports_os_errors),
        cmocka_unit_test(test_gguf_print_shows_header_kvs_and_tensors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

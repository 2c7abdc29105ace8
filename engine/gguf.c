/*
 * gguf: the validating GGUF reader (contract and file layout in gguf.h).
 *
 * Parsing is one forward pass over the file image with a bounds-checked cursor. Every length read
 * from the file is checked against the bytes that remain before it is used, and every size that
 * is computed from file values goes through the checked helpers below, so a hostile file can
 * neither read outside the image nor make us allocate more than a small multiple of its own size:
 * tables grow as items are actually parsed instead of being sized up front by a count from the
 * file.
 */
#include "engine/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the reader assumes a little-endian host");

#define GGUF_HEADER_BYTES 24     /* magic, version, n_tensors, n_kv */
#define GGUF_MIN_KV_BYTES 13     /* key length, value type, a one-byte value */
#define GGUF_MIN_TENSOR_BYTES 32 /* name length, n_dims, one dim, type, offset */
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_NAME_SHOWN 64 /* longest name quoted in an error message */

/* ---- Internal state ---- */

/* Open-addressing hash index over names (keys or tensor names): slots hold item index + 1. The
 * hash is seeded per index so a crafted file cannot line all its names up in one probe chain. */
struct gguf_index {
    uint64_t mask;
    uint64_t seed;
    uint64_t *slots;
};

struct gguf_priv {
    struct gguf_index kv_index;
    struct gguf_index tensor_index;
};

struct gguf_rd {
    const uint8_t *p;
    size_t len;
    size_t pos;
    char *err;
    size_t err_len;
};

/* ---- Allocation (with a test hook that fails the Nth call) ---- */

static long alloc_fail_countdown;

void
eng_gguf_test_fail_alloc(long n)
{
    alloc_fail_countdown = n;
}

static bool
alloc_should_fail(void)
{
    if (alloc_fail_countdown <= 0)
        return false;
    return --alloc_fail_countdown == 0;
}

static void *
gguf_calloc(size_t count, size_t size)
{
    if (alloc_should_fail())
        return NULL;
    return calloc(count ? count : 1, size ? size : 1);
}

/* Grows *p (an array of elem-sized items with capacity *cap) to hold at least need items. */
static int
gguf_grow(void **p, uint64_t *cap, uint64_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    uint64_t ncap = *cap ? *cap : 16;
    while (ncap < need)
        ncap *= 2;
    if (ncap > SIZE_MAX / elem)
        return -ENOMEM;
    if (alloc_should_fail())
        return -ENOMEM;
    void *q = realloc(*p, (size_t)(ncap * elem));
    if (!q)
        return -ENOMEM;
    *p = q;
    *cap = ncap;
    return 0;
}

/* ---- Checked arithmetic ---- */

static bool
add_ok(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_add_overflow(a, b, out);
}

static bool
mul_ok(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

/* ---- Error messages ---- */

static int set_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int
set_err(char *err, size_t err_len, const char *fmt, ...)
{
    if (err && err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return -EBADMSG;
}

static int rd_fail(struct gguf_rd *rd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Writes "bad GGUF file: <message>" and returns -EBADMSG. */
static int
rd_fail(struct gguf_rd *rd, const char *fmt, ...)
{
    if (rd->err && rd->err_len) {
        int n = snprintf(rd->err, rd->err_len, "bad GGUF file: ");
        if (n >= 0 && (size_t)n < rd->err_len) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(rd->err + n, rd->err_len - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return -EBADMSG;
}

/* Length of the valid UTF-8 sequence of 2..4 bytes (no overlongs, surrogates or code points above
 * U+10FFFF) at s[0..len), or 0. */
static size_t
utf8_seq_len(const unsigned char *s, uint64_t len)
{
    size_t n = s[0] >= 0xf0 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc2 ? 2 : 0;
    if (n == 0 || s[0] > 0xf4 || n > len)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
    }
    if ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] > 0x9f) ||
        (s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] > 0x8f))
        return 0;
    return n;
}

/* Quotes a string from the file on one line: printable ASCII kept (and valid UTF-8 when utf8 is
 * set), '"' and '\\' escaped, anything else as \xNN; cut after max_chars characters with "...".
 * dst always ends up NUL-terminated. */
static void
escape_str(char *dst, size_t cap, const char *s, uint64_t len, size_t max_chars, bool utf8)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0, chars = 0;
    for (uint64_t i = 0; i < len; chars++) {
        if (chars >= max_chars) {
            if (o + 4 <= cap) {
                memcpy(dst + o, "...", 3);
                o += 3;
            }
            break;
        }
        char tmp[5];
        size_t n = 1, used = 1;
        if (u[i] == '\\' || u[i] == '"') {
            tmp[0] = '\\';
            tmp[1] = (char)u[i];
            n = 2;
        } else if (u[i] >= 0x20 && u[i] < 0x7f) {
            tmp[0] = (char)u[i];
        } else if (utf8 && (used = utf8_seq_len(u + i, len - i)) > 0) {
            memcpy(tmp, u + i, used);
            n = used;
        } else {
            snprintf(tmp, sizeof(tmp), "\\x%02x", u[i]);
            n = 4;
            used = 1;
        }
        if (o + n + 1 > cap)
            break;
        memcpy(dst + o, tmp, n);
        o += n;
        i += used;
    }
    if (cap)
        dst[o < cap ? o : cap - 1] = '\0';
}

/* A short printable form of a GGUF string for error messages. */
#define SHOWN_BUF (GGUF_NAME_SHOWN * 4 + 8)
static const char *
shown(char buf[SHOWN_BUF], struct eng_gguf_str s)
{
    escape_str(buf, SHOWN_BUF, s.data, s.len, GGUF_NAME_SHOWN, false);
    return buf;
}

/* ---- Value types ---- */

static size_t
vtype_size(uint32_t t)
{
    switch (t) {
    case ENG_GGUF_U8:
    case ENG_GGUF_I8:
    case ENG_GGUF_BOOL:
        return 1;
    case ENG_GGUF_U16:
    case ENG_GGUF_I16:
        return 2;
    case ENG_GGUF_U32:
    case ENG_GGUF_I32:
    case ENG_GGUF_F32:
        return 4;
    case ENG_GGUF_U64:
    case ENG_GGUF_I64:
    case ENG_GGUF_F64:
        return 8;
    default:
        return 0; /* string, array, unknown */
    }
}

static bool
vtype_known(uint32_t t)
{
    return t <= ENG_GGUF_F64;
}

static bool
vtype_is_int(uint32_t t)
{
    switch (t) {
    case ENG_GGUF_U8:
    case ENG_GGUF_I8:
    case ENG_GGUF_U16:
    case ENG_GGUF_I16:
    case ENG_GGUF_U32:
    case ENG_GGUF_I32:
    case ENG_GGUF_U64:
    case ENG_GGUF_I64:
        return true;
    default:
        return false;
    }
}

static bool
vtype_is_signed(uint32_t t)
{
    return t == ENG_GGUF_I8 || t == ENG_GGUF_I16 || t == ENG_GGUF_I32 || t == ENG_GGUF_I64;
}

const char *
eng_gguf_vtype_name(enum eng_gguf_vtype t)
{
    static const char *const names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                        "bool", "string", "array", "u64", "i64", "f64"};
    if ((unsigned)t < sizeof(names) / sizeof(names[0]))
        return names[t];
    return "unknown";
}

/* ---- Bounds-checked cursor ---- */

static size_t
rd_left(const struct gguf_rd *rd)
{
    return rd->len - rd->pos;
}

static int
rd_bytes(struct gguf_rd *rd, void *dst, size_t n, const char *ctx, const char *what)
{
    if (n > rd_left(rd))
        return rd_fail(rd, "%s%s at byte %zu runs past the end of the file (%zu bytes)", ctx, what,
                       rd->pos, rd->len);
    memcpy(dst, rd->p + rd->pos, n);
    rd->pos += n;
    return 0;
}

static int
rd_u32(struct gguf_rd *rd, uint32_t *v, const char *ctx, const char *what)
{
    return rd_bytes(rd, v, 4, ctx, what);
}

static int
rd_u64(struct gguf_rd *rd, uint64_t *v, const char *ctx, const char *what)
{
    return rd_bytes(rd, v, 8, ctx, what);
}

static int
rd_str(struct gguf_rd *rd, struct eng_gguf_str *s, const char *ctx, const char *what)
{
    uint64_t len = 0;
    size_t at = rd->pos;
    int rc = rd_u64(rd, &len, ctx, what);
    if (rc)
        return rc;
    if (len > rd_left(rd))
        return rd_fail(
            rd, "%s%s length %" PRIu64 " at byte %zu runs past the end of the file (%zu bytes)",
            ctx, what, len, at, rd->len);
    s->len = len;
    s->data = (const char *)rd->p + rd->pos;
    rd->pos += (size_t)len;
    return 0;
}

/* ---- Key/value section ---- */

static int
parse_scalar(struct gguf_rd *rd, uint32_t type, struct eng_gguf_kv *kv, const char *ctx)
{
    uint8_t b[8];
    size_t n = vtype_size(type);
    int rc = rd_bytes(rd, b, n, ctx, "value");
    if (rc)
        return rc;
    switch (type) {
    case ENG_GGUF_U8:
        kv->v.u64 = b[0];
        break;
    case ENG_GGUF_BOOL:
        if (b[0] > 1)
            return rd_fail(rd, "%sbool value %u is not 0 or 1", ctx, b[0]);
        kv->v.u64 = b[0];
        break;
    case ENG_GGUF_I8:
        kv->v.i64 = (int8_t)b[0];
        break;
    case ENG_GGUF_U16: {
        uint16_t x;
        memcpy(&x, b, 2);
        kv->v.u64 = x;
        break;
    }
    case ENG_GGUF_I16: {
        int16_t x;
        memcpy(&x, b, 2);
        kv->v.i64 = x;
        break;
    }
    case ENG_GGUF_U32: {
        uint32_t x;
        memcpy(&x, b, 4);
        kv->v.u64 = x;
        break;
    }
    case ENG_GGUF_I32: {
        int32_t x;
        memcpy(&x, b, 4);
        kv->v.i64 = x;
        break;
    }
    case ENG_GGUF_F32: {
        float x;
        memcpy(&x, b, 4);
        kv->v.f64 = x;
        break;
    }
    case ENG_GGUF_U64:
        memcpy(&kv->v.u64, b, 8);
        break;
    case ENG_GGUF_I64:
        memcpy(&kv->v.i64, b, 8);
        break;
    case ENG_GGUF_F64:
        memcpy(&kv->v.f64, b, 8);
        break;
    default:
        return rd_fail(rd, "%sunknown value type %u", ctx, type);
    }
    return 0;
}

static int
parse_str_array(struct gguf_rd *rd, struct eng_gguf_arr *arr, const char *ctx)
{
    struct eng_gguf_str *strs = NULL;
    uint64_t cap = 0;
    int rc = 0;
    /* Each string needs at least its 8-byte length: a cheap early bound on the count. */
    if (arr->n > rd_left(rd) / 8) {
        rc = rd_fail(rd,
                     "%sarray of %" PRIu64 " strings at byte %zu runs past the end of the file "
                     "(%zu bytes)",
                     ctx, arr->n, rd->pos, rd->len);
        goto out;
    }
    for (uint64_t i = 0; i < arr->n; i++) {
        rc = gguf_grow((void **)&strs, &cap, i + 1, sizeof(*strs));
        if (rc)
            goto out;
        rc = rd_str(rd, &strs[i], ctx, "array string");
        if (rc)
            goto out;
    }
    arr->strs = strs;
    strs = NULL;
out:
    free(strs);
    return rc;
}

static int
parse_array(struct gguf_rd *rd, struct eng_gguf_arr *arr, const char *ctx)
{
    uint32_t et = 0;
    uint64_t n = 0;
    int rc = rd_u32(rd, &et, ctx, "array element type");
    if (rc)
        return rc;
    if (et == ENG_GGUF_ARRAY)
        return rd_fail(rd, "%sarrays of arrays are not supported", ctx);
    if (!vtype_known(et))
        return rd_fail(rd, "%sunknown array element type %u", ctx, et);
    rc = rd_u64(rd, &n, ctx, "array length");
    if (rc)
        return rc;
    arr->type = (enum eng_gguf_vtype)et;
    arr->n = n;
    arr->data = rd->p + rd->pos;
    arr->strs = NULL;
    if (et == ENG_GGUF_STRING)
        return parse_str_array(rd, arr, ctx);
    uint64_t bytes;
    if (!mul_ok(n, vtype_size(et), &bytes) || bytes > rd_left(rd))
        return rd_fail(rd,
                       "%sarray of %" PRIu64 " %s elements at byte %zu runs past the end of the "
                       "file (%zu bytes)",
                       ctx, n, eng_gguf_vtype_name(arr->type), rd->pos, rd->len);
    if (et == ENG_GGUF_BOOL) {
        for (uint64_t i = 0; i < n; i++) {
            uint8_t b = rd->p[rd->pos + i];
            if (b > 1)
                return rd_fail(rd, "%sbool array element %" PRIu64 " is %u, not 0 or 1", ctx, i, b);
        }
    }
    rd->pos += (size_t)bytes;
    return 0;
}

static int
parse_kv(struct gguf_rd *rd, uint64_t i, struct eng_gguf_kv *kv)
{
    char ctx[SHOWN_BUF + 48];
    char name[SHOWN_BUF];
    uint32_t type = 0;
    snprintf(ctx, sizeof(ctx), "key/value %" PRIu64 ": ", i);
    int rc = rd_str(rd, &kv->key, ctx, "key");
    if (rc)
        return rc;
    snprintf(ctx, sizeof(ctx), "key '%s': ", shown(name, kv->key));
    rc = rd_u32(rd, &type, ctx, "value type");
    if (rc)
        return rc;
    if (!vtype_known(type))
        return rd_fail(rd, "%sunknown value type %u", ctx, type);
    kv->type = (enum eng_gguf_vtype)type;
    if (type == ENG_GGUF_STRING)
        return rd_str(rd, &kv->v.str, ctx, "string value");
    if (type == ENG_GGUF_ARRAY)
        return parse_array(rd, &kv->v.arr, ctx);
    return parse_scalar(rd, type, kv, ctx);
}

static int
parse_kvs(struct gguf_rd *rd, struct eng_gguf *g, uint64_t n_kv)
{
    uint64_t cap = 0;
    for (uint64_t i = 0; i < n_kv; i++) {
        int rc = gguf_grow((void **)&g->kv, &cap, i + 1, sizeof(*g->kv));
        if (rc)
            return rc;
        memset(&g->kv[i], 0, sizeof(g->kv[i]));
        g->n_kv = i + 1; /* so eng_gguf_close frees what this entry owns */
        rc = parse_kv(rd, i, &g->kv[i]);
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- Name index ---- */

static uint64_t
name_hash(uint64_t seed, const char *s, uint64_t len)
{
    uint64_t h = 0xcbf29ce484222325ull ^ seed; /* FNV-1a, then a final mix of the high bits down */
    for (uint64_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ull;
    }
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    return h ^ (h >> 32);
}

typedef struct eng_gguf_str (*name_of_fn)(const struct eng_gguf *g, uint64_t i);

static struct eng_gguf_str
kv_name(const struct eng_gguf *g, uint64_t i)
{
    return g->kv[i].key;
}

static struct eng_gguf_str
tensor_name(const struct eng_gguf *g, uint64_t i)
{
    return g->tensors[i].name;
}

static bool
str_same(struct eng_gguf_str a, const char *b, uint64_t blen)
{
    return a.len == blen && (blen == 0 || memcmp(a.data, b, (size_t)blen) == 0);
}

/* Index of the item named (s, len), or -1. */
static int64_t
index_find(const struct gguf_index *ix, const struct eng_gguf *g, name_of_fn name_of, const char *s,
           uint64_t len)
{
    if (!ix->slots)
        return -1;
    for (uint64_t h = name_hash(ix->seed, s, len) & ix->mask;; h = (h + 1) & ix->mask) {
        uint64_t slot = ix->slots[h];
        if (slot == 0)
            return -1;
        if (str_same(name_of(g, slot - 1), s, len))
            return (int64_t)(slot - 1);
    }
}

/* Builds the index over n items; on a duplicate name sets *dup to its index and returns -EEXIST. */
static int
index_build(struct gguf_index *ix, const struct eng_gguf *g, name_of_fn name_of, uint64_t n,
            uint64_t *dup)
{
    uint64_t cap = 16;
    while (cap < 2 * n)
        cap *= 2; /* n is bounded by the file size, so this cannot overflow */
    ix->slots = gguf_calloc((size_t)cap, sizeof(*ix->slots));
    if (!ix->slots)
        return -ENOMEM;
    ix->mask = cap - 1;
    ix->seed = (uint64_t)(uintptr_t)ix->slots * 0x9e3779b97f4a7c15ull; /* varies with ASLR */
    for (uint64_t i = 0; i < n; i++) {
        struct eng_gguf_str s = name_of(g, i);
        uint64_t h = name_hash(ix->seed, s.data, s.len) & ix->mask;
        while (ix->slots[h] != 0) {
            if (str_same(name_of(g, ix->slots[h] - 1), s.data, s.len)) {
                *dup = i;
                return -EEXIST;
            }
            h = (h + 1) & ix->mask;
        }
        ix->slots[h] = i + 1;
    }
    return 0;
}

/* ---- Tensor info section ---- */

static int
parse_tensor_info(struct gguf_rd *rd, uint64_t i, struct eng_gguf_tensor *t)
{
    char ctx[SHOWN_BUF + 48];
    char name[SHOWN_BUF];
    uint32_t n_dims = 0, type = 0;
    snprintf(ctx, sizeof(ctx), "tensor %" PRIu64 ": ", i);
    int rc = rd_str(rd, &t->name, ctx, "name");
    if (rc)
        return rc;
    snprintf(ctx, sizeof(ctx), "tensor '%s': ", shown(name, t->name));
    rc = rd_u32(rd, &n_dims, ctx, "n_dims");
    if (rc)
        return rc;
    if (n_dims < 1 || n_dims > ENG_GGUF_MAX_DIMS)
        return rd_fail(rd, "tensor '%s' has %u dimensions (1..%d supported)", name, n_dims,
                       ENG_GGUF_MAX_DIMS);
    t->n_dims = n_dims;
    for (uint32_t d = 0; d < ENG_GGUF_MAX_DIMS; d++)
        t->ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        rc = rd_u64(rd, &t->ne[d], ctx, "dimension");
        if (rc)
            return rc;
    }
    rc = rd_u32(rd, &type, ctx, "type");
    if (rc)
        return rc;
    if (!kern_dtype_traits(type))
        return rd_fail(rd, "tensor '%s' has unknown type %u", name, type);
    t->type = (enum kern_dtype)type;
    return rd_u64(rd, &t->offset, ctx, "offset");
}

static int
parse_tensor_infos(struct gguf_rd *rd, struct eng_gguf *g, uint64_t n_tensors)
{
    uint64_t cap = 0;
    for (uint64_t i = 0; i < n_tensors; i++) {
        int rc = gguf_grow((void **)&g->tensors, &cap, i + 1, sizeof(*g->tensors));
        if (rc)
            return rc;
        memset(&g->tensors[i], 0, sizeof(g->tensors[i]));
        rc = parse_tensor_info(rd, i, &g->tensors[i]);
        if (rc)
            return rc;
        g->n_tensors = i + 1;
    }
    return 0;
}

/* Validates shape, type and placement of one tensor and sets n_bytes and data. */
static int
check_tensor(struct gguf_rd *rd, struct eng_gguf *g, uint64_t data_start, struct eng_gguf_tensor *t)
{
    char name[SHOWN_BUF];
    const struct kern_dtype_traits *tr = kern_dtype_traits((uint32_t)t->type);
    uint64_t n_elems = 1, n_blocks, n_bytes, start, end;
    shown(name, t->name);
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (t->ne[d] < 1)
            return rd_fail(rd, "tensor '%s': dimension %u is 0", name, d);
        if (!mul_ok(n_elems, t->ne[d], &n_elems) || n_elems > INT64_MAX)
            return rd_fail(rd,
                           "tensor '%s': element count of shape [%" PRIu64 ", %" PRIu64 ", %" PRIu64
                           ", %" PRIu64 "] overflows",
                           name, t->ne[0], t->ne[1], t->ne[2], t->ne[3]);
    }
    if (!tr->supported)
        return rd_fail(rd, "tensor '%s' has type %s, which is not supported", name, tr->name);
    if (tr->block_elems <= 0 || tr->block_bytes <= 0 || t->ne[0] % (uint64_t)tr->block_elems != 0)
        return rd_fail(rd,
                       "tensor '%s': row length %" PRIu64 " is not a multiple of the %s block "
                       "size %d",
                       name, t->ne[0], tr->name, tr->block_elems);
    n_blocks = n_elems / (uint64_t)tr->block_elems;
    if (!mul_ok(n_blocks, (uint64_t)tr->block_bytes, &n_bytes))
        return rd_fail(rd, "tensor '%s': byte size overflows", name);
    if (t->offset % g->alignment != 0)
        return rd_fail(rd, "tensor '%s': offset %" PRIu64 " is not a multiple of the alignment %u",
                       name, t->offset, g->alignment);
    if (!add_ok(data_start, t->offset, &start) || !add_ok(start, n_bytes, &end) || end > rd->len)
        return rd_fail(rd,
                       "tensor '%s' data [offset %" PRIu64 ", %" PRIu64 " bytes] runs past the "
                       "end of the file (%zu bytes, data section at byte %" PRIu64 ")",
                       name, t->offset, n_bytes, rd->len, data_start);
    t->n_bytes = n_bytes;
    t->data = rd->p + start;
    return 0;
}

/* ---- Whole file ---- */

static int
parse_header(struct gguf_rd *rd, uint32_t *version, uint64_t *n_tensors, uint64_t *n_kv)
{
    uint32_t magic = 0;
    if (rd->len < GGUF_HEADER_BYTES)
        return rd_fail(rd, "file is %zu bytes, too small for a GGUF header (%d bytes)", rd->len,
                       GGUF_HEADER_BYTES);
    rd_u32(rd, &magic, "", "magic");
    if (magic != ENG_GGUF_MAGIC) {
        char shown_magic[20];
        escape_str(shown_magic, sizeof(shown_magic), (const char *)rd->p, 4, 4, false);
        return rd_fail(rd, "bad magic \"%s\" (expected \"GGUF\")", shown_magic);
    }
    rd_u32(rd, version, "", "version");
    if (*version == 1)
        return rd_fail(rd, "GGUF version 1 is not supported (only versions 2 and 3); re-convert "
                           "the model with a current converter");
    if (*version != 2 && *version != 3) {
        if ((*version & 0xffff) == 0 && __builtin_bswap32(*version) <= 3)
            return rd_fail(rd, "big-endian GGUF file (version %u byte-swapped) is not supported",
                           __builtin_bswap32(*version));
        return rd_fail(rd, "unsupported GGUF version %u (expected 2 or 3)", *version);
    }
    rd_u64(rd, n_tensors, "", "tensor count");
    rd_u64(rd, n_kv, "", "key/value count");
    /* Counts the file cannot hold fail here, before anything is allocated for them. */
    size_t room = rd->len - GGUF_HEADER_BYTES;
    if (*n_kv > room / GGUF_MIN_KV_BYTES)
        return rd_fail(rd, "key/value count %" PRIu64 " is more than a file of %zu bytes can hold",
                       *n_kv, rd->len);
    if (*n_tensors > room / GGUF_MIN_TENSOR_BYTES)
        return rd_fail(rd, "tensor count %" PRIu64 " is more than a file of %zu bytes can hold",
                       *n_tensors, rd->len);
    if (*n_kv * GGUF_MIN_KV_BYTES + *n_tensors * GGUF_MIN_TENSOR_BYTES > room)
        return rd_fail(rd,
                       "%" PRIu64 " key/values and %" PRIu64 " tensors are more than a file "
                       "of %zu bytes can hold",
                       *n_kv, *n_tensors, rd->len);
    return 0;
}

static int
set_alignment(struct gguf_rd *rd, struct eng_gguf *g)
{
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    const struct eng_gguf_kv *kv = eng_gguf_find(g, "general.alignment");
    if (!kv)
        return 0;
    if (kv->type != ENG_GGUF_U32)
        return rd_fail(rd, "general.alignment must be a u32, not %s",
                       eng_gguf_vtype_name(kv->type));
    if (kv->v.u64 == 0 || (kv->v.u64 & (kv->v.u64 - 1)) != 0)
        return rd_fail(rd, "general.alignment %" PRIu64 " is not a power of two", kv->v.u64);
    g->alignment = (uint32_t)kv->v.u64;
    return 0;
}

static int
index_names(struct gguf_rd *rd, struct eng_gguf *g, bool tensors)
{
    struct gguf_priv *pv = g->priv;
    char name[SHOWN_BUF];
    uint64_t dup = 0;
    int rc;
    if (tensors)
        rc = index_build(&pv->tensor_index, g, tensor_name, g->n_tensors, &dup);
    else
        rc = index_build(&pv->kv_index, g, kv_name, g->n_kv, &dup);
    if (rc == -EEXIST && tensors)
        return rd_fail(rd, "duplicate tensor name '%s'", shown(name, g->tensors[dup].name));
    if (rc == -EEXIST)
        return rd_fail(rd, "duplicate key '%s'", shown(name, g->kv[dup].key));
    return rc;
}

static int
parse_all(struct gguf_rd *rd, struct eng_gguf *g)
{
    uint64_t n_tensors = 0, n_kv = 0, data_start = 0;
    int rc = parse_header(rd, &g->version, &n_tensors, &n_kv);
    if (rc)
        return rc;
    rc = parse_kvs(rd, g, n_kv);
    if (rc)
        return rc;
    rc = index_names(rd, g, false);
    if (rc)
        return rc;
    rc = set_alignment(rd, g);
    if (rc)
        return rc;
    rc = parse_tensor_infos(rd, g, n_tensors);
    if (rc)
        return rc;
    rc = index_names(rd, g, true);
    if (rc)
        return rc;
    if (!add_ok(rd->pos, g->alignment - 1, &data_start))
        return rd_fail(rd, "data section offset overflows");
    data_start &= ~(uint64_t)(g->alignment - 1);
    if (n_tensors > 0 && data_start > rd->len)
        return rd_fail(rd,
                       "tensor data section at byte %" PRIu64 " starts past the end of the "
                       "file (%zu bytes)",
                       data_start, rd->len);
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        rc = check_tensor(rd, g, data_start, &g->tensors[i]);
        if (rc)
            return rc;
    }
    return 0;
}

int
eng_gguf_parse(const void *buf, size_t len, struct eng_gguf **out, char *err, size_t err_len)
{
    struct eng_gguf *g = NULL;
    struct gguf_rd rd = {.p = buf, .len = len, .pos = 0, .err = err, .err_len = err_len};
    int rc = 0;
    if (err && err_len)
        err[0] = '\0';
    if (!out || (!buf && len > 0)) {
        rc = -EINVAL;
        goto out;
    }
    g = gguf_calloc(1, sizeof(*g));
    if (!g || !(g->priv = gguf_calloc(1, sizeof(struct gguf_priv)))) {
        rc = -ENOMEM;
        goto out;
    }
    g->base = buf;
    g->size = len;
    rc = parse_all(&rd, g);
    if (rc)
        goto out;
    *out = g;
    g = NULL;
out:
    if (rc == -ENOMEM)
        set_err(err, err_len, "out of memory while reading the GGUF header");
    eng_gguf_close(g);
    return rc;
}

/* ---- Open / close ---- */

static int
os_err(char *err, size_t err_len, int e, const char *what, const char *path)
{
    if (err && err_len)
        snprintf(err, err_len, "cannot %s %s: %s", what, path, strerror(e));
    return -e;
}

int
eng_gguf_open(const char *path, struct eng_gguf **out, char *err, size_t err_len)
{
    struct eng_gguf *g = NULL;
    void *map = NULL;
    size_t size = 0;
    struct stat st;
    int fd = -1, rc = 0;
    if (err && err_len)
        err[0] = '\0';
    if (!path || !out)
        return -EINVAL;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = os_err(err, err_len, errno, "open", path);
        goto out;
    }
    if (fstat(fd, &st) != 0) {
        rc = os_err(err, err_len, errno, "stat", path);
        goto out;
    }
    if (S_ISDIR(st.st_mode)) {
        rc = os_err(err, err_len, EISDIR, "read", path);
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        if (err && err_len)
            snprintf(err, err_len, "cannot read %s: not a regular file", path);
        rc = -EINVAL;
        goto out;
    }
    if ((uint64_t)st.st_size > SIZE_MAX) {
        rc = os_err(err, err_len, EFBIG, "map", path);
        goto out;
    }
    size = (size_t)st.st_size;
    if (size > 0) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            map = NULL;
            rc = os_err(err, err_len, errno, "map", path);
            goto out;
        }
    }
    rc = eng_gguf_parse(map, size, &g, err, err_len);
    if (rc)
        goto out;
    g->map = map;
    map = NULL;
    *out = g;
out:
    if (map)
        munmap(map, size);
    if (fd >= 0)
        close(fd);
    return rc;
}

void
eng_gguf_close(struct eng_gguf *g)
{
    if (!g)
        return;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        if (g->kv[i].type == ENG_GGUF_ARRAY && g->kv[i].v.arr.type == ENG_GGUF_STRING)
            free((void *)g->kv[i].v.arr.strs);
    }
    struct gguf_priv *pv = g->priv;
    if (pv) {
        free(pv->kv_index.slots);
        free(pv->tensor_index.slots);
        free(pv);
    }
    if (g->map)
        munmap(g->map, g->size);
    free(g->kv);
    free(g->tensors);
    free(g);
}

/* ---- Lookups and typed getters ---- */

const struct eng_gguf_kv *
eng_gguf_find(const struct eng_gguf *g, const char *key)
{
    if (!g || !key || !g->priv)
        return NULL;
    const struct gguf_priv *pv = g->priv;
    int64_t i = index_find(&pv->kv_index, g, kv_name, key, strlen(key));
    return i < 0 ? NULL : &g->kv[i];
}

const struct eng_gguf_tensor *
eng_gguf_find_tensor(const struct eng_gguf *g, const char *name)
{
    if (!g || !name || !g->priv)
        return NULL;
    const struct gguf_priv *pv = g->priv;
    int64_t i = index_find(&pv->tensor_index, g, tensor_name, name, strlen(name));
    return i < 0 ? NULL : &g->tensors[i];
}

static int
find_typed(const struct eng_gguf *g, const char *key, const struct eng_gguf_kv **kv)
{
    *kv = eng_gguf_find(g, key);
    return *kv ? 0 : -ENOENT;
}

int
eng_gguf_get_u32(const struct eng_gguf *g, const char *key, uint32_t *out)
{
    const struct eng_gguf_kv *kv;
    int rc = find_typed(g, key, &kv);
    if (rc)
        return rc;
    if (!vtype_is_int(kv->type))
        return -EBADMSG;
    if (vtype_is_signed(kv->type) ? (kv->v.i64 < 0 || kv->v.i64 > UINT32_MAX)
                                  : kv->v.u64 > UINT32_MAX)
        return -EBADMSG;
    *out = vtype_is_signed(kv->type) ? (uint32_t)kv->v.i64 : (uint32_t)kv->v.u64;
    return 0;
}

int
eng_gguf_get_i64(const struct eng_gguf *g, const char *key, int64_t *out)
{
    const struct eng_gguf_kv *kv;
    int rc = find_typed(g, key, &kv);
    if (rc)
        return rc;
    if (!vtype_is_int(kv->type))
        return -EBADMSG;
    if (!vtype_is_signed(kv->type) && kv->v.u64 > INT64_MAX)
        return -EBADMSG;
    *out = vtype_is_signed(kv->type) ? kv->v.i64 : (int64_t)kv->v.u64;
    return 0;
}

int
eng_gguf_get_f32(const struct eng_gguf *g, const char *key, float *out)
{
    const struct eng_gguf_kv *kv;
    int rc = find_typed(g, key, &kv);
    if (rc)
        return rc;
    if (kv->type == ENG_GGUF_F32 || kv->type == ENG_GGUF_F64) {
        if (isfinite(kv->v.f64) && fabs(kv->v.f64) > FLT_MAX)
            return -EBADMSG;
        *out = (float)kv->v.f64;
        return 0;
    }
    if (!vtype_is_int(kv->type))
        return -EBADMSG;
    *out = vtype_is_signed(kv->type) ? (float)kv->v.i64 : (float)kv->v.u64;
    return 0;
}

int
eng_gguf_get_bool(const struct eng_gguf *g, const char *key, bool *out)
{
    const struct eng_gguf_kv *kv;
    int rc = find_typed(g, key, &kv);
    if (rc)
        return rc;
    if (kv->type != ENG_GGUF_BOOL)
        return -EBADMSG;
    *out = kv->v.u64 != 0;
    return 0;
}

int
eng_gguf_get_str(const struct eng_gguf *g, const char *key, struct eng_gguf_str *out)
{
    const struct eng_gguf_kv *kv;
    int rc = find_typed(g, key, &kv);
    if (rc)
        return rc;
    if (kv->type != ENG_GGUF_STRING)
        return -EBADMSG;
    *out = kv->v.str;
    return 0;
}

int
eng_gguf_get_arr(const struct eng_gguf *g, const char *key, struct eng_gguf_arr *out)
{
    const struct eng_gguf_kv *kv;
    int rc = find_typed(g, key, &kv);
    if (rc)
        return rc;
    if (kv->type != ENG_GGUF_ARRAY)
        return -EBADMSG;
    *out = kv->v.arr;
    return 0;
}

int64_t
eng_gguf_arr_i64(const struct eng_gguf_arr *a, uint64_t i)
{
    if (!a || i >= a->n || !a->data)
        return 0;
    const uint8_t *p = (const uint8_t *)a->data + i * vtype_size(a->type);
    switch (a->type) {
    case ENG_GGUF_U8:
    case ENG_GGUF_BOOL:
        return p[0];
    case ENG_GGUF_I8:
        return (int8_t)p[0];
    case ENG_GGUF_U16: {
        uint16_t x;
        memcpy(&x, p, 2);
        return x;
    }
    case ENG_GGUF_I16: {
        int16_t x;
        memcpy(&x, p, 2);
        return x;
    }
    case ENG_GGUF_U32: {
        uint32_t x;
        memcpy(&x, p, 4);
        return x;
    }
    case ENG_GGUF_I32: {
        int32_t x;
        memcpy(&x, p, 4);
        return x;
    }
    case ENG_GGUF_U64: {
        uint64_t x;
        memcpy(&x, p, 8);
        return x > INT64_MAX ? INT64_MAX : (int64_t)x;
    }
    case ENG_GGUF_I64: {
        int64_t x;
        memcpy(&x, p, 8);
        return x;
    }
    default:
        return 0;
    }
}

float
eng_gguf_arr_f32(const struct eng_gguf_arr *a, uint64_t i)
{
    if (!a || i >= a->n || !a->data)
        return 0.0f;
    const uint8_t *p = (const uint8_t *)a->data + i * vtype_size(a->type);
    if (a->type == ENG_GGUF_F32) {
        float x;
        memcpy(&x, p, 4);
        return x;
    }
    if (a->type == ENG_GGUF_F64) {
        double x;
        memcpy(&x, p, 8);
        return (float)x;
    }
    if (a->type == ENG_GGUF_U64) {
        uint64_t x;
        memcpy(&x, p, 8);
        return (float)x;
    }
    return (float)eng_gguf_arr_i64(a, i);
}

bool
eng_gguf_str_eq(struct eng_gguf_str s, const char *c)
{
    return c && str_same(s, c, strlen(c));
}

/* ---- Printing (llm-run --inspect) ---- */

#define PRINT_STR_CHARS 60
#define PRINT_ARR_ELEMS 6

static void
print_str(FILE *f, struct eng_gguf_str s)
{
    char buf[PRINT_STR_CHARS * 4 + 8];
    escape_str(buf, sizeof(buf), s.data, s.len, PRINT_STR_CHARS, true);
    fprintf(f, "\"%s\"", buf);
}

static void
print_scalar(FILE *f, const struct eng_gguf_kv *kv)
{
    switch (kv->type) {
    case ENG_GGUF_BOOL:
        fputs(kv->v.u64 ? "true" : "false", f);
        break;
    case ENG_GGUF_F32:
    case ENG_GGUF_F64:
        fprintf(f, "%g", kv->v.f64);
        break;
    case ENG_GGUF_STRING:
        print_str(f, kv->v.str);
        if (kv->v.str.len > PRINT_STR_CHARS)
            fprintf(f, " (%" PRIu64 " bytes)", kv->v.str.len);
        break;
    default:
        if (vtype_is_signed(kv->type))
            fprintf(f, "%" PRId64, kv->v.i64);
        else
            fprintf(f, "%" PRIu64, kv->v.u64);
        break;
    }
}

static uint64_t
arr_u64(const struct eng_gguf_arr *a, uint64_t i)
{
    uint64_t x;
    memcpy(&x, (const uint8_t *)a->data + i * 8, 8);
    return x;
}

static void
print_arr(FILE *f, const struct eng_gguf_arr *a)
{
    fprintf(f, "[%s x %" PRIu64 "]", eng_gguf_vtype_name(a->type), a->n);
    uint64_t shown_n = a->n < PRINT_ARR_ELEMS ? a->n : PRINT_ARR_ELEMS;
    for (uint64_t i = 0; i < shown_n; i++) {
        fputs(i ? ", " : " ", f);
        if (a->type == ENG_GGUF_STRING)
            print_str(f, a->strs[i]);
        else if (a->type == ENG_GGUF_F32 || a->type == ENG_GGUF_F64)
            fprintf(f, "%g", (double)eng_gguf_arr_f32(a, i));
        else if (a->type == ENG_GGUF_U64)
            fprintf(f, "%" PRIu64, arr_u64(a, i));
        else
            fprintf(f, "%" PRId64, eng_gguf_arr_i64(a, i));
    }
    if (a->n > shown_n)
        fputs(", ...", f);
}

static void
print_tensor(FILE *f, const struct eng_gguf_tensor *t)
{
    char name[SHOWN_BUF], shape[96];
    const struct kern_dtype_traits *tr = kern_dtype_traits((uint32_t)t->type);
    int n = snprintf(shape, sizeof(shape), "[%" PRIu64, t->ne[0]);
    for (uint32_t d = 1; d < t->n_dims && n > 0 && (size_t)n < sizeof(shape); d++)
        n += snprintf(shape + n, sizeof(shape) - (size_t)n, ", %" PRIu64, t->ne[d]);
    if (n > 0 && (size_t)n < sizeof(shape))
        snprintf(shape + n, sizeof(shape) - (size_t)n, "]");
    fprintf(f, "  %-40s %-6s %-24s %12" PRIu64 " %12" PRIu64 "\n", shown(name, t->name),
            tr ? tr->name : "?", shape, t->offset, t->n_bytes);
}

void
eng_gguf_print(const struct eng_gguf *g, FILE *f)
{
    char name[SHOWN_BUF];
    uint64_t total_bytes = 0, total_elems = 0;
    fprintf(f, "GGUF v%u: %zu bytes, %" PRIu64 " key/values, %" PRIu64 " tensors, alignment %u\n",
            g->version, g->size, g->n_kv, g->n_tensors, g->alignment);
    fprintf(f, "key/values:\n");
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const struct eng_gguf_kv *kv = &g->kv[i];
        fprintf(f, "  %-40s %-6s ", shown(name, kv->key), eng_gguf_vtype_name(kv->type));
        if (kv->type == ENG_GGUF_ARRAY)
            print_arr(f, &kv->v.arr);
        else
            print_scalar(f, kv);
        fputc('\n', f);
    }
    fprintf(f, "tensors:\n  %-40s %-6s %-24s %12s %12s\n", "name", "type", "shape", "offset",
            "bytes");
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const struct eng_gguf_tensor *t = &g->tensors[i];
        uint64_t n = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3]; /* validated not to overflow */
        print_tensor(f, t);
        total_bytes += t->n_bytes;
        total_elems += n;
    }
    fprintf(f,
            "total: %" PRIu64 " tensors, %" PRIu64 " elements (%.2f M), %" PRIu64
            " bytes (%.2f MiB)\n",
            g->n_tensors, total_elems, (double)total_elems / 1e6, total_bytes,
            (double)total_bytes / (1024.0 * 1024.0));
}

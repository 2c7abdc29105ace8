/*
 * cm_wire: names, frame header, output buffer and reader of the engine <-> worker protocol (the
 * message codecs are in cm_wire_msg.c). The format is documented in cm_wire.h.
 */
#include "common/cm_wire.h"
#include "common/cm_wire_int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Buffers larger than this are released once drained, so idle connections stay small. */
#define WIRE_KEEP_BYTES (64u << 10)
#define WIRE_MIN_ALLOC 4096u

/* ---- Names ---- */

static const char *const type_names[CM_WIRE_TYPE_MAX + 1] = {
    [CM_WIRE_HELLO] = "HELLO",   [CM_WIRE_MODEL_INFO] = "MODEL_INFO",
    [CM_WIRE_SUBMIT] = "SUBMIT", [CM_WIRE_ACCEPTED] = "ACCEPTED",
    [CM_WIRE_TOKEN] = "TOKEN",   [CM_WIRE_DONE] = "DONE",
    [CM_WIRE_ERROR] = "ERROR",   [CM_WIRE_CANCEL] = "CANCEL",
    [CM_WIRE_STATS] = "STATS",   [CM_WIRE_STATS_REPLY] = "STATS_REPLY",
};

static const char *const finish_names[CM_WIRE_FINISH_MAX + 1] = {
    [CM_WIRE_FINISH_EOS] = "eos",
    [CM_WIRE_FINISH_LENGTH] = "length",
    [CM_WIRE_FINISH_STOP_TOKEN] = "stop_token",
    [CM_WIRE_FINISH_CANCELLED] = "cancelled",
    [CM_WIRE_FINISH_DEADLINE] = "deadline",
    [CM_WIRE_FINISH_ERROR] = "error",
};

struct errno_name {
    int value;
    const char *name;
};

static const struct errno_name errno_names[] = {
    {EAGAIN, "EAGAIN"},
    {E2BIG, "E2BIG"},
    {EPROTO, "EPROTO"},
    {EMSGSIZE, "EMSGSIZE"},
    {EINVAL, "EINVAL"},
    {ENOMEM, "ENOMEM"},
    {ECANCELED, "ECANCELED"},
    {ETIMEDOUT, "ETIMEDOUT"},
    {ESHUTDOWN, "ESHUTDOWN"},
    {EBUSY, "EBUSY"},
    {ENOSPC, "ENOSPC"},
    {EIO, "EIO"},
    {EOPNOTSUPP, "EOPNOTSUPP"},
    {ERANGE, "ERANGE"},
    {EBADMSG, "EBADMSG"},
    {ENOENT, "ENOENT"},
    {EEXIST, "EEXIST"},
    {EPERM, "EPERM"},
    {EACCES, "EACCES"},
    {ECONNRESET, "ECONNRESET"},
    {EPIPE, "EPIPE"},
    {EOVERFLOW, "EOVERFLOW"},
    {EDOM, "EDOM"},
    {ENOSYS, "ENOSYS"},
    {ENOBUFS, "ENOBUFS"},
};
#define N_ERRNO_NAMES (sizeof(errno_names) / sizeof(errno_names[0]))

const char *
cm_wire_type_name(unsigned type)
{
    if (type < 1 || type > CM_WIRE_TYPE_MAX)
        return "UNKNOWN";
    return type_names[type];
}

enum cm_wire_dir
cm_wire_type_dir(unsigned type)
{
    switch (type) {
    case CM_WIRE_HELLO:
    case CM_WIRE_SUBMIT:
    case CM_WIRE_CANCEL:
    case CM_WIRE_STATS:
        return CM_WIRE_TO_ENGINE;
    case CM_WIRE_MODEL_INFO:
    case CM_WIRE_ACCEPTED:
    case CM_WIRE_TOKEN:
    case CM_WIRE_DONE:
    case CM_WIRE_ERROR:
    case CM_WIRE_STATS_REPLY:
        return CM_WIRE_TO_WORKER;
    default:
        return CM_WIRE_DIR_NONE;
    }
}

const char *
cm_wire_finish_name(enum cm_wire_finish f)
{
    if ((int)f < 0 || (int)f > CM_WIRE_FINISH_MAX)
        return "unknown";
    return finish_names[f];
}

int
cm_wire_finish_parse(const char *name, enum cm_wire_finish *out)
{
    if (name == NULL || out == NULL)
        return -EINVAL;
    for (int i = 0; i <= CM_WIRE_FINISH_MAX; i++) {
        if (strcmp(name, finish_names[i]) == 0) {
            *out = (enum cm_wire_finish)i;
            return 0;
        }
    }
    return -EINVAL;
}

const char *
cm_wire_errno_name(int err)
{
    int v = err < 0 ? -err : err;
    for (size_t i = 0; i < N_ERRNO_NAMES; i++) {
        if (errno_names[i].value == v)
            return errno_names[i].name;
    }
    return NULL;
}

int
cm_wire_errno_parse(const char *name, int *out)
{
    if (name == NULL || out == NULL)
        return -EINVAL;
    for (size_t i = 0; i < N_ERRNO_NAMES; i++) {
        if (strcmp(name, errno_names[i].name) == 0) {
            *out = -errno_names[i].value;
            return 0;
        }
    }
    return -EINVAL;
}

/* ---- Frame header ---- */

void
cm_wire_header_pack(const struct cm_wire_header *h, uint8_t out[CM_WIRE_HEADER_BYTES])
{
    put_u32(out, CM_WIRE_MAGIC);
    put_u16(out + 4, h->version);
    put_u16(out + 6, h->type);
    put_u32(out + 8, h->flags);
    put_u32(out + 12, h->len);
    put_u64(out + 16, h->req_id);
}

/* Each field is checked as soon as its bytes are in, so garbage is refused early. */
int
cm_wire_header_check(const uint8_t *p, size_t n, uint32_t max_payload, struct cm_wire_header *out)
{
    uint8_t magic[4];
    if (n == 0)
        return 0;
    put_u32(magic, CM_WIRE_MAGIC);
    if (memcmp(p, magic, n < 4 ? n : 4) != 0)
        return -EPROTO;
    if (n >= 6 && get_u16(p + 4) != CM_WIRE_VERSION)
        return -EPROTO;
    if (n >= 8 && cm_wire_type_dir(get_u16(p + 6)) == CM_WIRE_DIR_NONE)
        return -EPROTO;
    if (n >= 12 && get_u32(p + 8) != 0)
        return -EPROTO;
    if (n >= 16 && get_u32(p + 12) > max_payload)
        return -EMSGSIZE;
    if (n < CM_WIRE_HEADER_BYTES)
        return 0;
    out->version = get_u16(p + 4);
    out->type = get_u16(p + 6);
    out->flags = get_u32(p + 8);
    out->len = get_u32(p + 12);
    out->req_id = get_u64(p + 16);
    return 1;
}

static int
check_max_payload(uint32_t *max_payload)
{
    if (*max_payload == 0)
        *max_payload = CM_WIRE_DEFAULT_MAX_PAYLOAD;
    if (*max_payload < CM_WIRE_MIN_MAX_PAYLOAD || *max_payload > CM_WIRE_MAX_MAX_PAYLOAD)
        return -EINVAL;
    return 0;
}

/* ---- Output buffer ---- */

int
cm_wire_buf_init(struct cm_wire_buf *b, uint32_t max_payload)
{
    int rc = check_max_payload(&max_payload);
    if (rc < 0)
        return rc;
    memset(b, 0, sizeof(*b));
    b->max_payload = max_payload;
    return 0;
}

void
cm_wire_buf_fini(struct cm_wire_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->off = b->cap = 0;
}

size_t
cm_wire_buf_pending(const struct cm_wire_buf *b)
{
    return b->len - b->off;
}

const uint8_t *
cm_wire_buf_head(const struct cm_wire_buf *b)
{
    return b->data ? b->data + b->off : NULL;
}

static void
buf_drained(struct cm_wire_buf *b)
{
    if (b->off != b->len)
        return;
    b->off = b->len = 0;
    if (b->cap > WIRE_KEEP_BYTES) {
        free(b->data);
        b->data = NULL;
        b->cap = 0;
    }
}

void
cm_wire_buf_consume(struct cm_wire_buf *b, size_t n)
{
    size_t pending = cm_wire_buf_pending(b);
    b->off += n < pending ? n : pending;
    buf_drained(b);
}

/* Makes room for n more bytes after len; moves pending bytes down first when that helps. */
static int
buf_reserve(struct cm_wire_buf *b, size_t n)
{
    if (b->cap - b->len >= n)
        return 0;
    if (b->off > 0) {
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->cap - b->len >= n)
            return 0;
    }
    if (n > SIZE_MAX / 2 - b->len)
        return -ENOMEM;
    size_t cap = b->cap ? b->cap : WIRE_MIN_ALLOC;
    while (cap - b->len < n)
        cap *= 2;
    uint8_t *p = realloc(b->data, cap);
    if (p == NULL)
        return -ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

int
cm_wire_buf_begin_frame(struct cm_wire_buf *b, enum cm_wire_type type, uint64_t req_id, size_t len,
                        uint8_t **payload)
{
    if (len > b->max_payload)
        return -EMSGSIZE;
    int rc = buf_reserve(b, CM_WIRE_HEADER_BYTES + len);
    if (rc < 0)
        return rc;
    struct cm_wire_header h = {
        .version = CM_WIRE_VERSION,
        .type = (uint16_t)type,
        .flags = 0,
        .len = (uint32_t)len,
        .req_id = req_id,
    };
    cm_wire_header_pack(&h, b->data + b->len);
    *payload = b->data + b->len + CM_WIRE_HEADER_BYTES;
    b->len += CM_WIRE_HEADER_BYTES + len;
    return 0;
}

int
cm_wire_encode_frame(struct cm_wire_buf *b, enum cm_wire_type type, uint64_t req_id,
                     const void *payload, size_t len)
{
    if (cm_wire_type_dir(type) == CM_WIRE_DIR_NONE || (len > 0 && payload == NULL))
        return -EINVAL;
    uint8_t *dst = NULL;
    int rc = cm_wire_buf_begin_frame(b, type, req_id, len, &dst);
    if (rc < 0)
        return rc;
    if (len > 0)
        memcpy(dst, payload, len);
    return 0;
}

ssize_t
cm_wire_buf_write_fd(struct cm_wire_buf *b, int fd)
{
    size_t total = 0;
    int err = 0;
    while (cm_wire_buf_pending(b) > 0) {
        ssize_t n = send(fd, cm_wire_buf_head(b), cm_wire_buf_pending(b), MSG_NOSIGNAL);
        if (n < 0 && errno == ENOTSOCK)
            n = write(fd, cm_wire_buf_head(b), cm_wire_buf_pending(b));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err = errno == EWOULDBLOCK ? EAGAIN : errno;
            break;
        }
        b->off += (size_t)n;
        total += (size_t)n;
    }
    buf_drained(b);
    if (total == 0 && err != 0)
        return -err;
    return (ssize_t)total;
}

/* ---- Reader ---- */

int
cm_wire_reader_init(struct cm_wire_reader *r, uint32_t max_payload)
{
    int rc = check_max_payload(&max_payload);
    if (rc < 0)
        return rc;
    memset(r, 0, sizeof(*r));
    r->max_payload = max_payload;
    return 0;
}

void
cm_wire_reader_fini(struct cm_wire_reader *r)
{
    free(r->buf);
    r->buf = NULL;
    r->cap = r->start = r->end = 0;
}

size_t
cm_wire_reader_buffered(const struct cm_wire_reader *r)
{
    return r->end - r->start;
}

/* Drops consumed bytes: moves the unconsumed tail to the front, or releases a big empty buffer. */
static void
reader_compact(struct cm_wire_reader *r)
{
    if (r->start == r->end) {
        r->start = r->end = 0;
        if (r->cap > WIRE_KEEP_BYTES) {
            free(r->buf);
            r->buf = NULL;
            r->cap = 0;
        }
    } else if (r->start > 0) {
        memmove(r->buf, r->buf + r->start, r->end - r->start);
        r->end -= r->start;
        r->start = 0;
    }
}

static int
reader_grow(struct cm_wire_reader *r, size_t cap)
{
    if (cap <= r->cap)
        return 0;
    uint8_t *p = realloc(r->buf, cap);
    if (p == NULL)
        return -ENOMEM;
    r->buf = p;
    r->cap = cap;
    return 0;
}

int
cm_wire_reader_feed(struct cm_wire_reader *r, const void *data, size_t n)
{
    if (r->err)
        return r->err;
    if (n == 0)
        return 0;
    reader_compact(r);
    if (n > SIZE_MAX / 2 - r->end)
        return -ENOMEM;
    if (r->cap - r->end < n) {
        size_t cap = r->cap ? r->cap : WIRE_MIN_ALLOC;
        while (cap - r->end < n)
            cap *= 2;
        int rc = reader_grow(r, cap);
        if (rc < 0)
            return rc;
    }
    memcpy(r->buf + r->end, data, n);
    r->end += n;
    return 0;
}

ssize_t
cm_wire_reader_read_fd(struct cm_wire_reader *r, int fd)
{
    if (r->err)
        return r->err;
    reader_compact(r);
    /* Room for the frame in progress (its size is known once its header is in), at least a
     * page for small frames, never more than one maximal frame. */
    size_t limit = (size_t)CM_WIRE_HEADER_BYTES + r->max_payload;
    size_t want = WIRE_MIN_ALLOC;
    struct cm_wire_header h;
    int rc = cm_wire_header_check(r->buf, r->end, r->max_payload, &h);
    if (rc < 0) {
        r->err = rc;
        return rc;
    }
    if (rc == 1 && CM_WIRE_HEADER_BYTES + (size_t)h.len > want)
        want = CM_WIRE_HEADER_BYTES + (size_t)h.len;
    if (want > limit)
        want = limit;
    if (r->cap < want) {
        size_t cap = r->cap ? r->cap : WIRE_MIN_ALLOC;
        while (cap < want)
            cap *= 2;
        rc = reader_grow(r, cap < limit ? cap : limit);
        if (rc < 0)
            return rc;
    }
    if (r->end == r->cap)
        return -ENOBUFS;
    for (;;) {
        ssize_t n = read(fd, r->buf + r->end, r->cap - r->end);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
        r->end += (size_t)n;
        return n;
    }
}

int
cm_wire_reader_next(struct cm_wire_reader *r, struct cm_wire_frame *out)
{
    if (r->err)
        return r->err;
    size_t avail = r->end - r->start;
    struct cm_wire_header h;
    if (avail == 0)
        return 0;
    int rc = cm_wire_header_check(r->buf + r->start, avail, r->max_payload, &h);
    if (rc < 0) {
        r->err = rc;
        return rc;
    }
    if (rc == 0 || avail - CM_WIRE_HEADER_BYTES < h.len)
        return 0;
    out->type = h.type;
    out->flags = h.flags;
    out->req_id = h.req_id;
    out->len = h.len;
    out->payload = h.len ? r->buf + r->start + CM_WIRE_HEADER_BYTES : NULL;
    r->start += CM_WIRE_HEADER_BYTES + (size_t)h.len;
    return 1;
}

#include "spill/spill.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_util.h"

/* Bounds on counts read from a file before anything is allocated from them. */
#define MAX_BIAS (1 << 20)
#define MAX_STOP (1 << 16)
#define COPY_CHUNK (1u << 16)

struct held {
    uint64_t key;
    uint64_t bytes;
};

struct spill_store {
    char *dir;
    uint64_t max_bytes;
    uint64_t fingerprint;
    const struct spill_io_ops *ops;
    long pid;
    int n_held;
    int cap_held;
    struct held *held;
    uint64_t bytes;
    int n_stale;
};

/* ---- CRC32C ---- */

static uint32_t crc_table[8][256];
static int crc_hw; /* SSE4.2 present */
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void
crc_init_once(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
        crc_table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    crc_hw = 0;
#endif
}

static void
crc_init(void)
{
    pthread_once(&crc_once, crc_init_once);
}

static uint32_t
crc_sw_raw(uint32_t c, const uint8_t *p, size_t n)
{
    while (n >= 8) { /* slicing by 8 */
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                           (uint32_t)p[3] << 24);
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
            crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^ crc_table[3][p[4]] ^
            crc_table[2][p[5]] ^ crc_table[1][p[6]] ^ crc_table[0][p[7]];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xff];
    return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t
crc_hw_raw(uint32_t c, const uint8_t *p, size_t n)
{
    uint64_t c64 = c;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--)
        c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}
#endif

uint32_t
spill_crc32c_sw(uint32_t crc, const void *p, size_t n)
{
    crc_init();
    return ~crc_sw_raw(~crc, p, n);
}

uint32_t
spill_crc32c(uint32_t crc, const void *p, size_t n)
{
    crc_init();
#if defined(__x86_64__)
    if (crc_hw)
        return ~crc_hw_raw(~crc, p, n);
#endif
    return ~crc_sw_raw(~crc, p, n);
}

uint64_t
spill_hash64(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    if (h == 0)
        h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* ---- POSIX ops ---- */

static int
px_open(void *ctx, const char *path, int flags, mode_t mode)
{
    (void)ctx;
    int fd;
    do
        fd = open(path, flags | O_CLOEXEC, mode);
    while (fd < 0 && errno == EINTR);
    return fd < 0 ? -errno : fd;
}

static ssize_t
px_write(void *ctx, int fd, const void *buf, size_t n)
{
    (void)ctx;
    ssize_t r;
    do
        r = write(fd, buf, n);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

static ssize_t
px_read(void *ctx, int fd, void *buf, size_t n)
{
    (void)ctx;
    ssize_t r;
    do
        r = read(fd, buf, n);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

static int
px_fsync(void *ctx, int fd)
{
    (void)ctx;
    return fsync(fd) < 0 ? -errno : 0;
}

static int
px_close(void *ctx, int fd)
{
    (void)ctx;
    /* Linux frees the descriptor even when close fails: never retry. */
    return close(fd) < 0 && errno != EINTR ? -errno : 0;
}

static int
px_rename(void *ctx, const char *from, const char *to)
{
    (void)ctx;
    return rename(from, to) < 0 ? -errno : 0;
}

static int
px_unlink(void *ctx, const char *path)
{
    (void)ctx;
    return unlink(path) < 0 ? -errno : 0;
}

static int
px_fsync_dir(void *ctx, const char *dir)
{
    int fd = px_open(ctx, dir, O_RDONLY | O_DIRECTORY, 0);
    if (fd < 0)
        return fd;
    int rc = px_fsync(ctx, fd);
    close(fd);
    return rc;
}

static int
px_mkdir(void *ctx, const char *dir, mode_t mode)
{
    (void)ctx;
    return mkdir(dir, mode) < 0 ? -errno : 0;
}

static int
px_list(void *ctx, const char *dir, int (*fn)(void *arg, const char *name), void *arg)
{
    (void)ctx;
    DIR *d = opendir(dir);
    if (!d)
        return -errno;
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            rc = fn(arg, e->d_name);
    closedir(d);
    return rc;
}

static int
px_pid_alive(void *ctx, long pid)
{
    (void)ctx;
    if (pid <= 0)
        return 0;
    return kill((pid_t)pid, 0) == 0 || errno == EPERM;
}

static const struct spill_io_ops posix_ops = {
    .open = px_open,
    .write = px_write,
    .read = px_read,
    .fsync = px_fsync,
    .close = px_close,
    .rename = px_rename,
    .unlink = px_unlink,
    .fsync_dir = px_fsync_dir,
    .mkdir = px_mkdir,
    .list = px_list,
    .pid_alive = px_pid_alive,
};

const struct spill_io_ops *
spill_io_posix(void)
{
    return &posix_ops;
}

/* ---- Fault injection ---- */

static const char *const op_names[SPILL_OP_COUNT + 1] = {
    "open",   "write",     "read",  "fsync", "close", "rename",
    "unlink", "fsync_dir", "mkdir", "list",  "any",
};

const char *
spill_op_name(enum spill_op op)
{
    return (unsigned)op <= SPILL_OP_COUNT ? op_names[op] : "?";
}

/* Counts a call of kind op; returns the positive errno to fail it with, or 0. */
static int
fault_hit(struct spill_fault *f, enum spill_op op)
{
    f->calls[op]++;
    f->calls[SPILL_OP_ANY]++;
    if (f->fail_at <= 0 || (f->op != SPILL_OP_ANY && f->op != op))
        return 0;
    long n = f->calls[f->op];
    if (n == f->fail_at || (f->sticky && n > f->fail_at)) {
        f->n_injected++;
        return f->err;
    }
    return 0;
}

static int
ft_open(void *ctx, const char *path, int flags, mode_t mode)
{
    struct spill_fault *f = ctx;
    int e = fault_hit(f, SPILL_OP_OPEN);
    return e ? -e : f->base->open(f->base->ctx, path, flags, mode);
}

static ssize_t
ft_write(void *ctx, int fd, const void *buf, size_t n)
{
    struct spill_fault *f = ctx;
    int e = fault_hit(f, SPILL_OP_WRITE);
    if (e && f->short_write)
        return f->base->write(f->base->ctx, fd, buf, n > 1 ? n / 2 : n);
    return e ? -e : f->base->write(f->base->ctx, fd, buf, n);
}

static ssize_t
ft_read(void *ctx, int fd, void *buf, size_t n)
{
    struct spill_fault *f = ctx;
    int e = fault_hit(f, SPILL_OP_READ);
    return e ? -e : f->base->read(f->base->ctx, fd, buf, n);
}

static int
ft_fsync(void *ctx, int fd)
{
    struct spill_fault *f = ctx;
    int e = fault_hit(f, SPILL_OP_FSYNC);
    return e ? -e : f->base->fsync(f->base->ctx, fd);
}

static int
ft_close(void *ctx, int fd)
{
    struct spill_fault *f = ctx;
    int e = fault_hit(f, SPILL_OP_CLOSE);
    int rc = f->base->close(f->base->ctx, fd); /* a failed close still frees the fd */
    return e ? -e : rc;
}

static int
ft_rename(void *ctx, const char *from, const char *to)
{
    struct spill_fault *f = ctx;
    int e = fault_hit(f, SPILL_OP_RENAME);
    return e ? -e : f->base->rename(f->base->ctx, from, to);
}

static int
ft_unlink(void *ctx, const char *path)
{
    struct spill_fault *f = ctx;
    int e = fault_hit(f, SPILL_OP_UNLINK);
    return e ? -e : f->base->unlink(f->base->ctx, path);
}

static int
ft_fsync_dir(void *ctx, const char *dir)
{
    struct spill_fault *f = ctx;
    int e = fault_hit(f, SPILL_OP_FSYNC_DIR);
    return e ? -e : f->base->fsync_dir(f->base->ctx, dir);
}

static int
ft_mkdir(void *ctx, const char *dir, mode_t mode)
{
    struct spill_fault *f = ctx;
    int e = fault_hit(f, SPILL_OP_MKDIR);
    return e ? -e : f->base->mkdir(f->base->ctx, dir, mode);
}

static int
ft_list(void *ctx, const char *dir, int (*fn)(void *arg, const char *name), void *arg)
{
    struct spill_fault *f = ctx;
    int e = fault_hit(f, SPILL_OP_LIST);
    return e ? -e : f->base->list(f->base->ctx, dir, fn, arg);
}

static int
ft_pid_alive(void *ctx, long pid)
{
    struct spill_fault *f = ctx;
    return f->base->pid_alive(f->base->ctx, pid);
}

void
spill_fault_init(struct spill_fault *f, const struct spill_io_ops *base, enum spill_op op,
                 long fail_at, int err, bool sticky, bool short_write)
{
    memset(f, 0, sizeof(*f));
    f->base = base ? base : spill_io_posix();
    f->op = op;
    f->fail_at = fail_at;
    f->err = err;
    f->sticky = sticky;
    f->short_write = short_write;
    f->ops = (struct spill_io_ops){
        .ctx = f,
        .open = ft_open,
        .write = ft_write,
        .read = ft_read,
        .fsync = ft_fsync,
        .close = ft_close,
        .rename = ft_rename,
        .unlink = ft_unlink,
        .fsync_dir = ft_fsync_dir,
        .mkdir = ft_mkdir,
        .list = ft_list,
        .pid_alive = ft_pid_alive,
    };
}

static const struct {
    const char *name;
    int err;
} errno_names[] = {
    {"ENOSPC", ENOSPC}, {"EIO", EIO},       {"EDQUOT", EDQUOT}, {"EACCES", EACCES},
    {"EROFS", EROFS},   {"ENOENT", ENOENT}, {"EINTR", EINTR},   {"ENOMEM", ENOMEM},
};

int
spill_fault_parse(struct spill_fault *f, const struct spill_io_ops *base, const char *spec)
{
    char buf[96];
    if (!spec || strlen(spec) >= sizeof(buf))
        return -EINVAL;
    strcpy(buf, spec);
    char *save = NULL;
    char *op_s = strtok_r(buf, ":", &save);
    char *n_s = strtok_r(NULL, ":", &save);
    char *e_s = strtok_r(NULL, ":", &save);
    char *mode_s = strtok_r(NULL, ":", &save);
    if (!op_s || !n_s || !e_s || strtok_r(NULL, ":", &save))
        return -EINVAL;
    int op = -1;
    for (int i = 0; i <= SPILL_OP_COUNT; i++)
        if (!strcmp(op_s, op_names[i]))
            op = i;
    char *end = NULL;
    long n = strtol(n_s, &end, 10);
    if (op < 0 || *end || n < 1)
        return -EINVAL;
    int err = 0;
    for (size_t i = 0; i < sizeof(errno_names) / sizeof(errno_names[0]); i++)
        if (!strcmp(e_s, errno_names[i].name))
            err = errno_names[i].err;
    if (!err) {
        long v = strtol(e_s, &end, 10);
        if (*end || v < 1 || v > 4095)
            return -EINVAL;
        err = (int)v;
    }
    bool sticky = mode_s && !strcmp(mode_s, "sticky");
    bool short_write = mode_s && !strcmp(mode_s, "short");
    if (mode_s && !sticky && !short_write)
        return -EINVAL;
    spill_fault_init(f, base, (enum spill_op)op, n, err, sticky, short_write);
    return 0;
}

/* ---- Encoding ---- */

static void
put_u32(uint8_t **p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        *(*p)++ = (uint8_t)(v >> (8 * i));
}

static void
put_u64(uint8_t **p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        *(*p)++ = (uint8_t)(v >> (8 * i));
}

static void
put_f32(uint8_t **p, float f)
{
    uint32_t v;
    memcpy(&v, &f, 4);
    put_u32(p, v);
}

static uint32_t
get_u32(const uint8_t **p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t) * (*p)++ << (8 * i);
    return v;
}

static uint64_t
get_u64(const uint8_t **p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t) * (*p)++ << (8 * i);
    return v;
}

static float
get_f32(const uint8_t **p)
{
    uint32_t v = get_u32(p);
    float f;
    memcpy(&f, &v, 4);
    return f;
}

static size_t
dtype_size(uint32_t dtype)
{
    return dtype == SPILL_KV_F32 ? 4 : 0;
}

size_t
spill_block_bytes(const struct spill_kv_shape *kv)
{
    size_t ds = dtype_size(kv->dtype);
    if (!ds || kv->n_layer < 1 || kv->kv_dim < 1 || kv->block_tokens < 1)
        return 0;
    return (size_t)kv->n_layer * (size_t)kv->block_tokens * (size_t)kv->kv_dim * ds;
}

static bool
counts_ok(int32_t n_prompt, int32_t n_gen, int32_t n_bias, int32_t n_stop)
{
    return n_prompt >= 0 && n_gen >= 0 && n_prompt <= INT32_MAX - n_gen && n_bias >= 0 &&
           n_bias <= MAX_BIAS && n_stop >= 0 && n_stop <= MAX_STOP;
}

static uint64_t
header_bytes_for(int32_t n_tokens, int32_t n_bias, int32_t n_stop)
{
    return SPILL_FIXED_BYTES + 4ull * (uint64_t)n_tokens + 8ull * (uint64_t)n_bias +
           4ull * (uint64_t)n_stop;
}

uint64_t
spill_file_bytes(const struct spill_state *st)
{
    size_t bb = spill_block_bytes(&st->kv);
    if (!bb || st->kv.n_positions < 0 ||
        !counts_ok(st->n_prompt, st->n_generated, st->n_logit_bias, st->n_stop))
        return 0;
    uint64_t hb = header_bytes_for(st->n_prompt + st->n_generated, st->n_logit_bias, st->n_stop);
    if (hb > UINT32_MAX)
        return 0;
    return hb + 2ull * (uint64_t)spill_n_blocks(&st->kv) * bb + 4;
}

/* The fixed header and the variable part of st, into a buffer of header_bytes_for(...). */
static void
encode_header(const struct spill_state *st, uint64_t fingerprint, uint32_t hb, uint8_t *buf)
{
    uint8_t *p = buf;
    memcpy(p, SPILL_MAGIC, 8);
    p += 8;
    put_u32(&p, SPILL_VERSION);
    put_u32(&p, hb);
    put_u64(&p, fingerprint);
    put_u64(&p, st->req_id);
    put_u64(&p, st->key);
    for (int i = 0; i < 4; i++)
        put_u64(&p, st->rng[i]);
    const struct spill_sampling *sp = &st->sampling;
    put_f32(&p, sp->temperature);
    put_u32(&p, (uint32_t)sp->top_k);
    put_f32(&p, sp->top_p);
    put_f32(&p, sp->min_p);
    put_f32(&p, sp->repetition_penalty);
    put_u32(&p, (uint32_t)sp->repeat_last_n);
    put_f32(&p, sp->presence_penalty);
    put_f32(&p, sp->frequency_penalty);
    put_u64(&p, sp->seed);
    put_u32(&p, (uint32_t)sp->top_logprobs);
    int32_t ints[] = {st->max_tokens,        st->logprobs,    st->token_loop,   st->priority,
                      st->n_prompt,          st->n_generated, st->n_logit_bias, st->n_stop,
                      (int32_t)st->kv.dtype, st->kv.n_layer,  st->kv.kv_dim,    st->kv.block_tokens,
                      st->kv.n_positions};
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++)
        put_u32(&p, (uint32_t)ints[i]);
    for (int32_t i = 0; i < st->n_prompt + st->n_generated; i++)
        put_u32(&p, (uint32_t)st->tokens[i]);
    for (int32_t i = 0; i < st->n_logit_bias; i++) {
        put_u32(&p, (uint32_t)st->logit_bias[i].id);
        put_f32(&p, st->logit_bias[i].bias);
    }
    for (int32_t i = 0; i < st->n_stop; i++)
        put_u32(&p, (uint32_t)st->stop[i]);
}

/* ---- Store ---- */

static char *
path_of(const struct spill_store *s, long pid, uint64_t key, bool tmp)
{
    char *p = NULL;
    if (asprintf(&p, "%s/spill-%ld-%" PRIu64 ".kv%s", s->dir, pid, key, tmp ? ".tmp" : "") < 0)
        return NULL;
    return p;
}

static int
held_find(const struct spill_store *s, uint64_t key)
{
    for (int i = 0; i < s->n_held; i++)
        if (s->held[i].key == key)
            return i;
    return -1;
}

/* Parses "spill-PID-KEY.kv" or "...kv.tmp". Returns the pid, or -1 for other names. */
static long
parse_name(const char *name)
{
    long pid = 0;
    unsigned long long key = 0;
    int end = 0;
    if (sscanf(name, "spill-%ld-%llu.kv%n", &pid, &key, &end) != 2 || end == 0)
        return -1;
    if (name[end] != '\0' && strcmp(name + end, ".tmp") != 0)
        return -1;
    return pid > 0 ? pid : -1;
}

/* Reads the fixed header of an open file; 0 when it starts with the magic and version. */
static int
peek_header(struct spill_store *s, int fd, uint64_t *req_id, uint64_t *fp)
{
    uint8_t buf[SPILL_FIXED_BYTES];
    size_t got = 0;
    while (got < sizeof(buf)) {
        ssize_t r = s->ops->read(s->ops->ctx, fd, buf + got, sizeof(buf) - got);
        if (r <= 0)
            return r < 0 ? (int)r : -EBADMSG;
        got += (size_t)r;
    }
    const uint8_t *p = buf + 8;
    if (memcmp(buf, SPILL_MAGIC, 8) || get_u32(&p) != SPILL_VERSION)
        return -EBADMSG;
    p = buf + 16;
    *fp = get_u64(&p);
    *req_id = get_u64(&p);
    return 0;
}

static int
scan_one(void *arg, const char *name)
{
    struct spill_store *s = arg;
    long pid = parse_name(name);
    if (pid < 0 || (pid != s->pid && s->ops->pid_alive(s->ops->ctx, pid)))
        return 0;
    char *path = NULL;
    if (asprintf(&path, "%s/%s", s->dir, name) < 0)
        return 0;
    uint64_t req = 0, fp = 0;
    int vrc = -EBADMSG;
    int fd = s->ops->open(s->ops->ctx, path, O_RDONLY, 0);
    if (fd >= 0) {
        vrc = peek_header(s, fd, &req, &fp);
        s->ops->close(s->ops->ctx, fd);
    }
    int rc = s->ops->unlink(s->ops->ctx, path);
    if (vrc == 0)
        CM_LOG(CM_LOG_WARN,
               "stale spill file removed file=%s pid=%ld req=%" PRIu64 " same_model=%d rc=%d", path,
               pid, req, fp == s->fingerprint, rc);
    else
        CM_LOG(CM_LOG_WARN, "stale spill file removed file=%s pid=%ld header=invalid rc=%d", path,
               pid, rc);
    if (rc == 0)
        s->n_stale++;
    free(path);
    return 0;
}

int
spill_store_open(const char *dir, uint64_t max_bytes, uint64_t fingerprint,
                 const struct spill_io_ops *ops, struct spill_store **out)
{
    int rc = 0;
    struct spill_store *s = NULL;
    if (!dir || !*dir || !out)
        return -EINVAL;
    s = calloc(1, sizeof(*s));
    if (!s || !(s->dir = strdup(dir))) {
        rc = -ENOMEM;
        goto err;
    }
    s->max_bytes = max_bytes;
    s->fingerprint = fingerprint;
    s->ops = ops ? ops : spill_io_posix();
    s->pid = (long)getpid();
    rc = s->ops->mkdir(s->ops->ctx, dir, 0700);
    if (rc < 0 && rc != -EEXIST)
        goto err;
    rc = s->ops->list(s->ops->ctx, dir, scan_one, s);
    if (rc < 0)
        goto err;
    *out = s;
    return 0;
err:
    if (s)
        free(s->dir);
    free(s);
    return rc;
}

void
spill_store_close(struct spill_store *s)
{
    if (!s)
        return;
    while (s->n_held > 0)
        spill_remove(s, s->held[s->n_held - 1].key);
    free(s->held);
    free(s->dir);
    free(s);
}

int
spill_store_n_files(const struct spill_store *s)
{
    return s->n_held;
}

uint64_t
spill_store_bytes(const struct spill_store *s)
{
    return s->bytes;
}

int
spill_store_n_stale(const struct spill_store *s)
{
    return s->n_stale;
}

/* Writes all n bytes (looping over short writes) and folds them into *crc. */
static int
write_all(struct spill_store *s, int fd, const void *buf, size_t n, uint32_t *crc)
{
    const uint8_t *p = buf;
    *crc = spill_crc32c(*crc, buf, n);
    while (n > 0) {
        ssize_t w = s->ops->write(s->ops->ctx, fd, p, n);
        if (w < 0)
            return (int)w;
        if (w == 0 || (size_t)w > n)
            return -EIO;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int
write_body(struct spill_store *s, int fd, const struct spill_state *st,
           const struct spill_kv_io *kv, uint32_t hb)
{
    uint32_t crc = 0;
    int rc = 0;
    uint8_t *hdr = malloc(hb);
    if (!hdr)
        return -ENOMEM;
    encode_header(st, s->fingerprint, hb, hdr);
    rc = write_all(s, fd, hdr, hb, &crc);
    free(hdr);
    size_t bb = spill_block_bytes(&st->kv);
    int nb = spill_n_blocks(&st->kv);
    for (int kind = 0; kind < 2 && rc == 0; kind++)
        for (int i = 0; i < nb && rc == 0; i++) {
            const void *blk = kv->block(kv->ctx, kind, i);
            rc = blk ? write_all(s, fd, blk, bb, &crc) : -EINVAL;
        }
    if (rc == 0) {
        uint8_t tail[4];
        uint8_t *p = tail;
        put_u32(&p, crc);
        uint32_t dummy = 0;
        rc = write_all(s, fd, tail, 4, &dummy);
    }
    return rc;
}

int
spill_write(struct spill_store *s, const struct spill_state *st, const struct spill_kv_io *kv)
{
    int rc = 0;
    int fd = -1;
    char *tmp = NULL, *fin = NULL;
    bool renamed = false;
    uint64_t bytes = spill_file_bytes(st);
    if (!bytes || !kv || !kv->block || st->kv.n_positions < 1 ||
        (st->n_prompt + st->n_generated > 0 && !st->tokens) ||
        (st->n_logit_bias > 0 && !st->logit_bias) || (st->n_stop > 0 && !st->stop))
        return -EINVAL;
    if (held_find(s, st->key) >= 0)
        return -EEXIST;
    if (s->max_bytes && s->bytes + bytes > s->max_bytes)
        return -EDQUOT;
    if (s->n_held == s->cap_held) {
        int cap = s->cap_held ? 2 * s->cap_held : 16;
        struct held *h = realloc(s->held, (size_t)cap * sizeof(*h));
        if (!h)
            return -ENOMEM;
        s->held = h;
        s->cap_held = cap;
    }
    tmp = path_of(s, s->pid, st->key, true);
    fin = path_of(s, s->pid, st->key, false);
    if (!tmp || !fin) {
        rc = -ENOMEM;
        goto out;
    }
    uint32_t hb =
        (uint32_t)header_bytes_for(st->n_prompt + st->n_generated, st->n_logit_bias, st->n_stop);
    fd = s->ops->open(s->ops->ctx, tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        rc = fd;
        goto out;
    }
    rc = write_body(s, fd, st, kv, hb);
    if (rc == 0)
        rc = s->ops->fsync(s->ops->ctx, fd);
    int crc_close = s->ops->close(s->ops->ctx, fd);
    fd = -1;
    if (rc == 0)
        rc = crc_close;
    if (rc == 0)
        rc = s->ops->rename(s->ops->ctx, tmp, fin);
    renamed = rc == 0;
    if (rc == 0)
        rc = s->ops->fsync_dir(s->ops->ctx, s->dir);
    if (rc == 0) {
        s->held[s->n_held++] = (struct held){st->key, bytes};
        s->bytes += bytes;
    }
out:
    if (rc < 0 && fd >= 0)
        s->ops->close(s->ops->ctx, fd);
    if (rc < 0 && tmp && fin) {
        int urc = s->ops->unlink(s->ops->ctx, renamed ? fin : tmp);
        if (urc < 0 && urc != -ENOENT)
            CM_LOG(CM_LOG_ERROR, "spill file left behind file=%s rc=%d", renamed ? fin : tmp, urc);
    }
    free(tmp);
    free(fin);
    return rc;
}

/* Reads exactly n bytes (folding them into *crc); a short file is -EBADMSG. */
static int
read_all(struct spill_store *s, int fd, void *buf, size_t n, uint32_t *crc)
{
    uint8_t *p = buf;
    size_t left = n;
    while (left > 0) {
        ssize_t r = s->ops->read(s->ops->ctx, fd, p, left);
        if (r < 0)
            return (int)r;
        if (r == 0 || (size_t)r > left)
            return -EBADMSG;
        p += r;
        left -= (size_t)r;
    }
    if (crc)
        *crc = spill_crc32c(*crc, buf, n);
    return 0;
}

static bool
shape_eq(const struct spill_kv_shape *a, const struct spill_kv_shape *b)
{
    return a->dtype == b->dtype && a->n_layer == b->n_layer && a->kv_dim == b->kv_dim &&
           a->block_tokens == b->block_tokens;
}

/* Decodes and validates the fixed header into st (arrays not yet set). */
static int
decode_fixed(struct spill_store *s, const uint8_t *buf, uint64_t key,
             const struct spill_expect *exp, struct spill_state *st, uint32_t *hb)
{
    const uint8_t *p = buf + 8;
    if (memcmp(buf, SPILL_MAGIC, 8) || get_u32(&p) != SPILL_VERSION)
        return -EBADMSG;
    *hb = get_u32(&p);
    if (get_u64(&p) != s->fingerprint)
        return -EBADMSG;
    st->req_id = get_u64(&p);
    st->key = get_u64(&p);
    for (int i = 0; i < 4; i++)
        st->rng[i] = get_u64(&p);
    struct spill_sampling *sp = &st->sampling;
    sp->temperature = get_f32(&p);
    sp->top_k = (int32_t)get_u32(&p);
    sp->top_p = get_f32(&p);
    sp->min_p = get_f32(&p);
    sp->repetition_penalty = get_f32(&p);
    sp->repeat_last_n = (int32_t)get_u32(&p);
    sp->presence_penalty = get_f32(&p);
    sp->frequency_penalty = get_f32(&p);
    sp->seed = get_u64(&p);
    sp->top_logprobs = (int32_t)get_u32(&p);
    int32_t *ints[] = {&st->max_tokens,    &st->logprobs,  &st->token_loop,
                       &st->priority,      &st->n_prompt,  &st->n_generated,
                       &st->n_logit_bias,  &st->n_stop,    (int32_t *)&st->kv.dtype,
                       &st->kv.n_layer,    &st->kv.kv_dim, &st->kv.block_tokens,
                       &st->kv.n_positions};
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++)
        *ints[i] = (int32_t)get_u32(&p);
    if (st->key != key || !shape_eq(&st->kv, &exp->kv) ||
        !counts_ok(st->n_prompt, st->n_generated, st->n_logit_bias, st->n_stop) ||
        st->n_prompt + st->n_generated > exp->max_tokens_total || st->kv.n_positions < 1 ||
        st->kv.n_positions > exp->max_positions ||
        (exp->kv.n_positions > 0 && st->kv.n_positions != exp->kv.n_positions) ||
        *hb != header_bytes_for(st->n_prompt + st->n_generated, st->n_logit_bias, st->n_stop))
        return -EBADMSG;
    return 0;
}

/* Reads the variable part into the arrays that follow st in its allocation. */
static int
read_variable(struct spill_store *s, int fd, struct spill_state *st, uint8_t *arrays, uint32_t *crc)
{
    size_t n_tok = (size_t)(st->n_prompt + st->n_generated);
    size_t var = 4 * n_tok + 8 * (size_t)st->n_logit_bias + 4 * (size_t)st->n_stop;
    uint8_t *raw = malloc(var ? var : 1);
    if (!raw)
        return -ENOMEM;
    int rc = read_all(s, fd, raw, var, crc);
    if (rc == 0) {
        const uint8_t *p = raw;
        int32_t *tok = (int32_t *)arrays;
        struct spill_bias *bias = (struct spill_bias *)(tok + n_tok);
        int32_t *stop = (int32_t *)(bias + st->n_logit_bias);
        for (size_t i = 0; i < n_tok; i++)
            tok[i] = (int32_t)get_u32(&p);
        for (int32_t i = 0; i < st->n_logit_bias; i++) {
            bias[i].id = (int32_t)get_u32(&p);
            bias[i].bias = get_f32(&p);
        }
        for (int32_t i = 0; i < st->n_stop; i++)
            stop[i] = (int32_t)get_u32(&p);
        st->tokens = tok;
        st->logit_bias = bias;
        st->stop = stop;
    }
    free(raw);
    return rc;
}

static int
read_kv(struct spill_store *s, int fd, const struct spill_state *st, const struct spill_kv_io *kv,
        uint32_t *crc)
{
    size_t bb = spill_block_bytes(&st->kv);
    int nb = spill_n_blocks(&st->kv);
    uint8_t *scratch = NULL;
    int rc = 0;
    if (!kv && !(scratch = malloc(COPY_CHUNK)))
        return -ENOMEM;
    for (int kind = 0; kind < 2 && rc == 0; kind++)
        for (int i = 0; i < nb && rc == 0; i++) {
            if (kv) {
                void *blk = kv->block(kv->ctx, kind, i);
                rc = blk ? read_all(s, fd, blk, bb, crc) : -EINVAL;
                continue;
            }
            for (size_t off = 0; off < bb && rc == 0; off += COPY_CHUNK) {
                size_t n = bb - off < COPY_CHUNK ? bb - off : COPY_CHUNK;
                rc = read_all(s, fd, scratch, n, crc);
            }
        }
    free(scratch);
    return rc;
}

int
spill_read(struct spill_store *s, uint64_t key, const struct spill_expect *exp,
           const struct spill_kv_io *kv, struct spill_state **out)
{
    int rc = 0;
    int fd = -1;
    char *path = NULL;
    struct spill_state *st = NULL;
    uint8_t fixed[SPILL_FIXED_BYTES];
    struct spill_state tmp;
    uint32_t hb = 0, crc = 0;
    if (held_find(s, key) < 0)
        return -ENOENT;
    if (!exp || (kv && !kv->block))
        return -EINVAL;
    if (!(path = path_of(s, s->pid, key, false)))
        return -ENOMEM;
    fd = s->ops->open(s->ops->ctx, path, O_RDONLY, 0);
    if (fd < 0) {
        rc = fd;
        goto out;
    }
    memset(&tmp, 0, sizeof(tmp));
    if ((rc = read_all(s, fd, fixed, sizeof(fixed), &crc)) < 0 ||
        (rc = decode_fixed(s, fixed, key, exp, &tmp, &hb)) < 0)
        goto out;
    size_t arrays = hb - SPILL_FIXED_BYTES;
    if (!(st = malloc(sizeof(*st) + arrays))) {
        rc = -ENOMEM;
        goto out;
    }
    *st = tmp;
    if ((rc = read_variable(s, fd, st, (uint8_t *)(st + 1), &crc)) < 0 ||
        (rc = read_kv(s, fd, st, kv, &crc)) < 0)
        goto out;
    uint8_t tail[5];
    if ((rc = read_all(s, fd, tail, 4, NULL)) < 0)
        goto out;
    const uint8_t *p = tail;
    if (get_u32(&p) != crc) {
        rc = -EBADMSG;
        goto out;
    }
    ssize_t more = s->ops->read(s->ops->ctx, fd, tail, 1);
    rc = more < 0 ? (int)more : more > 0 ? -EBADMSG : 0;
out:
    if (fd >= 0)
        s->ops->close(s->ops->ctx, fd);
    if (rc == 0)
        *out = st;
    else
        free(st);
    if (rc == -EBADMSG)
        CM_LOG(CM_LOG_WARN, "spill file corrupt file=%s", path);
    free(path);
    return rc;
}

void
spill_state_free(struct spill_state *st)
{
    free(st);
}

int
spill_remove(struct spill_store *s, uint64_t key)
{
    int i = held_find(s, key);
    if (i < 0)
        return -ENOENT;
    s->bytes -= s->held[i].bytes;
    s->held[i] = s->held[--s->n_held];
    char *path = path_of(s, s->pid, key, false);
    if (!path)
        return -ENOMEM;
    int rc = s->ops->unlink(s->ops->ctx, path);
    if (rc < 0)
        CM_LOG(CM_LOG_ERROR, "spill file not removed file=%s rc=%d", path, rc);
    free(path);
    return rc;
}

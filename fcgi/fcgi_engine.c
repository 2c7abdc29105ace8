/*
 * fcgi_engine: the worker's client of llm-engine (see fcgi_engine.h). The shared struct holds only
 * the socket path, the latest MODEL_INFO and the backoff state behind one mutex, taken for a few
 * field copies and never across I/O. Every connection does its own blocking-bounded handshake on
 * the calling thread; afterwards its socket is non-blocking and reads go through cm_wire_reader.
 */
#include "fcgi/fcgi_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_util.h"

#define HANDSHAKE_FACTOR 12 /* HELLO -> MODEL_INFO waits 12x the connect timeout (60 s) */
#define BACKOFF_FIRST_MS 100
#define BACKOFF_MAX_MS 1000 /* a restarted engine is found within a second */

struct fcgi_engine {
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int timeout_ms;
    uint64_t (*now_ns)(void);

    pthread_mutex_t mu; /* guards everything below */
    bool have_info;
    struct cm_wire_model_info info; /* default_system owned (malloc) */
    bool up;
    bool ever_tried;
    uint64_t next_try_ns; /* while down: connects before this fail at once */
    int backoff_ms;       /* the interval applied at the next failure */
};

struct fcgi_engine_conn {
    int fd;
    int timeout_ms;
    struct cm_wire_reader rd;
    struct cm_wire_buf out;
    struct cm_wire_model_info info;
};

/* ---- Shared state ---- */

int
fcgi_engine_new(const char *socket_path, int connect_timeout_ms, struct fcgi_engine **out)
{
    if (!socket_path || !socket_path[0])
        return -EINVAL;
    size_t n = strlen(socket_path);
    struct fcgi_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    if (n >= sizeof(e->path)) {
        free(e);
        return -EINVAL;
    }
    memcpy(e->path, socket_path, n + 1);
    e->timeout_ms = connect_timeout_ms > 0 ? connect_timeout_ms : 5000;
    e->now_ns = cm_now_ns;
    pthread_mutex_init(&e->mu, NULL);
    cm_wire_model_info_init(&e->info);
    e->up = true; /* unknown until the first attempt: not in backoff */
    e->backoff_ms = BACKOFF_FIRST_MS;
    *out = e;
    return 0;
}

void
fcgi_engine_free(struct fcgi_engine *e)
{
    if (!e)
        return;
    free(e->info.default_system);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

void
fcgi_engine_set_clock(struct fcgi_engine *e, uint64_t (*now_ns)(void))
{
    e->now_ns = now_ns ? now_ns : cm_now_ns;
}

/* A deep copy (default_system duplicated). Returns 0 or -ENOMEM. */
static int
info_copy(const struct cm_wire_model_info *src, struct cm_wire_model_info *dst)
{
    char *sys = NULL;
    if (src->default_system) {
        sys = strdup(src->default_system);
        if (!sys)
            return -ENOMEM;
    }
    *dst = *src;
    dst->default_system = sys;
    return 0;
}

int
fcgi_engine_model_info(struct fcgi_engine *e, struct cm_wire_model_info *out)
{
    int rc = -EAGAIN;
    pthread_mutex_lock(&e->mu);
    if (e->have_info)
        rc = info_copy(&e->info, out);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

bool
fcgi_engine_is_up(struct fcgi_engine *e)
{
    pthread_mutex_lock(&e->mu);
    bool up = e->up && e->ever_tried;
    pthread_mutex_unlock(&e->mu);
    return up;
}

int
fcgi_engine_retry_after_s(struct fcgi_engine *e)
{
    uint64_t now = e->now_ns();
    pthread_mutex_lock(&e->mu);
    uint64_t next = e->up ? now : e->next_try_ns;
    pthread_mutex_unlock(&e->mu);
    uint64_t wait_ns = next > now ? next - now : 0;
    int s = (int)((wait_ns + 999999999ull) / 1000000000ull);
    return s < 1 ? 1 : s;
}

/* Returns true when a connect may touch the socket now. */
static bool
backoff_allows(struct fcgi_engine *e)
{
    uint64_t now = e->now_ns();
    pthread_mutex_lock(&e->mu);
    bool ok = e->up || now >= e->next_try_ns;
    pthread_mutex_unlock(&e->mu);
    return ok;
}

static void
mark_down(struct fcgi_engine *e, int err)
{
    uint64_t now = e->now_ns();
    pthread_mutex_lock(&e->mu);
    bool was_up = e->up || !e->ever_tried;
    e->ever_tried = true;
    e->up = false;
    e->next_try_ns = now + (uint64_t)e->backoff_ms * 1000000ull;
    int interval = e->backoff_ms;
    e->backoff_ms = e->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : e->backoff_ms * 2;
    pthread_mutex_unlock(&e->mu);
    if (was_up)
        CM_LOG(CM_LOG_WARN, "engine unreachable socket=%s err=%s retry_ms=%d", e->path,
               strerror(-err), interval);
}

static int
mark_up(struct fcgi_engine *e, const struct cm_wire_model_info *info)
{
    struct cm_wire_model_info copy;
    if (info_copy(info, &copy) < 0)
        return -ENOMEM;
    pthread_mutex_lock(&e->mu);
    bool was_down = !e->up && e->ever_tried;
    bool changed = !e->have_info || strcmp(e->info.model, info->model) != 0;
    free(e->info.default_system);
    e->info = copy;
    e->have_info = true;
    e->ever_tried = true;
    e->up = true;
    e->backoff_ms = BACKOFF_FIRST_MS;
    pthread_mutex_unlock(&e->mu);
    if (was_down || changed)
        CM_LOG(CM_LOG_INFO, "engine connected socket=%s model=%s n_ctx=%u", e->path, info->model,
               info->n_ctx);
    return 0;
}

/* ---- Bounded I/O ---- */

static int
remaining_ms(uint64_t deadline_ns)
{
    uint64_t now = cm_now_ns();
    if (now >= deadline_ns)
        return 0;
    uint64_t ms = (deadline_ns - now + 999999) / 1000000;
    return ms > 1000000 ? 1000000 : (int)ms;
}

/* Waits for events on fd until the deadline. Returns 0 when ready, -ETIMEDOUT, or -errno. */
static int
wait_fd(int fd, short events, uint64_t deadline_ns)
{
    for (;;) {
        int ms = remaining_ms(deadline_ns);
        if (ms == 0)
            return -ETIMEDOUT;
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, ms);
        if (n > 0)
            return 0; /* errors and hang-ups show on the following read or write */
        if (n < 0 && errno != EINTR)
            return -errno;
    }
}

/* Writes everything pending in c->out, waiting at most the timeout for writability. */
static int
flush_out(struct fcgi_engine_conn *c)
{
    uint64_t deadline = cm_now_ns() + (uint64_t)c->timeout_ms * 1000000ull;
    while (cm_wire_buf_pending(&c->out) > 0) {
        ssize_t w = cm_wire_buf_write_fd(&c->out, c->fd);
        if (w >= 0)
            continue;
        if (w != -EAGAIN)
            return w == -ECONNRESET ? -ECONNRESET : -EPIPE;
        int rc = wait_fd(c->fd, POLLOUT, deadline);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Reads frames until one arrives or the deadline passes. Returns 1 with *f, -ETIMEDOUT,
 * -ECONNRESET (closed), -EPROTO / -EMSGSIZE, or another negative errno. */
static int
read_frame_until(struct fcgi_engine_conn *c, struct cm_wire_frame *f, uint64_t deadline_ns)
{
    for (;;) {
        int rc = fcgi_engine_next(c, f);
        if (rc != 0)
            return rc;
        rc = wait_fd(c->fd, POLLIN, deadline_ns);
        if (rc < 0)
            return rc;
    }
}

/* ---- Connections ---- */

static int
open_socket(const char *path, int timeout_ms, int *out)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    /* A blocking connect bounded by SO_SNDTIMEO: a full listen backlog waits instead of failing
     * at once, as a non-blocking Unix-socket connect would with EAGAIN. */
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int rc;
    do {
        rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    struct timeval zero = {0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &zero, sizeof(zero));
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    *out = fd;
    return 0;
}

/* HELLO -> MODEL_INFO on a fresh connection. Returns 0, -EPROTO, -ENOMEM, or the I/O error
 * (-ETIMEDOUT, -ECONNRESET, -EPIPE: the caller reports the engine down). */
static int
handshake(struct fcgi_engine_conn *c)
{
    struct cm_wire_hello hello = {.version = CM_WIRE_VERSION};
    snprintf(hello.client, sizeof(hello.client), "llm-fcgi/0.1");
    int rc = cm_wire_encode_hello(&c->out, 0, &hello);
    if (rc < 0)
        return rc == -ENOMEM ? -ENOMEM : -EPROTO;
    rc = flush_out(c);
    if (rc < 0)
        return rc;
    /* The engine answers HELLO between two forward passes; a busy engine (a long prefill, a slow
     * sanitizer build) is not a dead one, so the answer gets far longer than the connect. */
    int wait_ms = c->timeout_ms * HANDSHAKE_FACTOR;
    uint64_t deadline = cm_now_ns() + (uint64_t)wait_ms * 1000000ull;
    struct cm_wire_frame f;
    rc = read_frame_until(c, &f, deadline);
    if (rc == -EPROTO || rc == -EMSGSIZE)
        return -EPROTO;
    if (rc < 0)
        return rc;
    if (f.type != CM_WIRE_MODEL_INFO) {
        char msg[CM_WIRE_MAX_MESSAGE + 1] = "";
        struct cm_wire_error er;
        if (f.type == CM_WIRE_ERROR && cm_wire_decode_error(&f, &er, NULL, 0) == 0)
            snprintf(msg, sizeof(msg), "%s", er.message);
        CM_LOG(CM_LOG_ERROR, "engine answered HELLO with %s %s", cm_wire_type_name(f.type), msg);
        return -EPROTO;
    }
    char err[CM_WIRE_ERR_LEN];
    rc = cm_wire_decode_model_info(&f, &c->info, err, sizeof(err));
    if (rc < 0) {
        CM_LOG(CM_LOG_ERROR, "bad MODEL_INFO from the engine: %s", err);
        return rc == -ENOMEM ? -ENOMEM : -EPROTO;
    }
    /* Our SUBMITs must fit what the engine accepts. */
    c->out.max_payload = c->info.max_payload;
    return 0;
}

int
fcgi_engine_connect(struct fcgi_engine *e, struct fcgi_engine_conn **out)
{
    if (!backoff_allows(e))
        return -EHOSTDOWN;
    struct fcgi_engine_conn *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->fd = -1;
    c->timeout_ms = e->timeout_ms;
    cm_wire_model_info_init(&c->info);
    cm_wire_reader_init(&c->rd, 0);
    cm_wire_buf_init(&c->out, 0);
    int rc = open_socket(e->path, e->timeout_ms, &c->fd);
    if (rc < 0) {
        mark_down(e, rc);
        rc = -EHOSTDOWN;
        goto fail;
    }
    rc = handshake(c);
    if (rc == 0)
        rc = mark_up(e, &c->info);
    if (rc == -ETIMEDOUT) {
        /* Connected but no answer in time: overloaded, not down; no backoff for the others. */
        rc = -EHOSTDOWN;
        goto fail;
    }
    if (rc < 0 && rc != -ENOMEM) {
        mark_down(e, rc);
        if (rc != -EPROTO)
            rc = -EHOSTDOWN;
    }
    if (rc < 0)
        goto fail;
    *out = c;
    return 0;
fail:
    fcgi_engine_conn_close(c);
    return rc;
}

void
fcgi_engine_conn_close(struct fcgi_engine_conn *c)
{
    if (!c)
        return;
    if (c->fd >= 0)
        close(c->fd);
    cm_wire_reader_fini(&c->rd);
    cm_wire_buf_fini(&c->out);
    cm_wire_model_info_fini(&c->info);
    free(c);
}

int
fcgi_engine_conn_fd(const struct fcgi_engine_conn *c)
{
    return c->fd;
}

const struct cm_wire_model_info *
fcgi_engine_conn_info(const struct fcgi_engine_conn *c)
{
    return &c->info;
}

int
fcgi_engine_submit(struct fcgi_engine_conn *c, uint64_t req_id, const struct cm_wire_submit *s)
{
    int rc = cm_wire_encode_submit(&c->out, req_id, s);
    if (rc < 0)
        return rc == -ENOMEM ? -ENOMEM : rc;
    return flush_out(c);
}

int
fcgi_engine_cancel(struct fcgi_engine_conn *c, uint64_t req_id, const char *reason)
{
    struct cm_wire_cancel m;
    snprintf(m.reason, sizeof(m.reason), "%s", reason ? reason : "");
    int rc = cm_wire_encode_cancel(&c->out, req_id, &m);
    if (rc < 0)
        return rc;
    return flush_out(c);
}

int
fcgi_engine_next(struct fcgi_engine_conn *c, struct cm_wire_frame *out)
{
    for (;;) {
        int rc = cm_wire_reader_next(&c->rd, out);
        if (rc != 0)
            return rc;
        ssize_t n = cm_wire_reader_read_fd(&c->rd, c->fd);
        if (n > 0)
            continue;
        if (n == -EAGAIN)
            return 0;
        if (n == 0 || n == -ECONNRESET || n == -EPIPE)
            return -ECONNRESET;
        return (int)n;
    }
}

/* ---- STATS ---- */

int
fcgi_engine_stats(struct fcgi_engine *e, char **json_out)
{
    struct fcgi_engine_conn *c = NULL;
    char *text = NULL;
    int rc = fcgi_engine_connect(e, &c);
    if (rc < 0)
        goto out;
    rc = cm_wire_encode_stats(&c->out, 0);
    if (rc == 0)
        rc = flush_out(c);
    if (rc < 0) {
        rc = rc == -ETIMEDOUT ? -ETIMEDOUT : -EHOSTDOWN;
        goto out;
    }
    uint64_t deadline = cm_now_ns() + (uint64_t)c->timeout_ms * 1000000ull;
    struct cm_wire_frame f;
    rc = read_frame_until(c, &f, deadline);
    if (rc == -ETIMEDOUT || rc == -ENOMEM)
        goto out;
    if (rc == -ECONNRESET) {
        rc = -EHOSTDOWN;
        goto out;
    }
    if (rc < 0 || f.type != CM_WIRE_STATS_REPLY) {
        rc = -EPROTO;
        goto out;
    }
    struct cm_wire_stats_reply sr = {0};
    rc = cm_wire_decode_stats_reply(&f, &sr, NULL, 0);
    cm_wire_stats_reply_fini(&sr);
    if (rc < 0) {
        rc = rc == -ENOMEM ? -ENOMEM : -EPROTO;
        goto out;
    }
    text = malloc((size_t)f.len + 1);
    if (!text) {
        rc = -ENOMEM;
        goto out;
    }
    if (f.len)
        memcpy(text, f.payload, f.len);
    text[f.len] = 0;
    *json_out = text;
    rc = 0;
out:
    fcgi_engine_conn_close(c);
    return rc;
}

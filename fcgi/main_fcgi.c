/*
 * llm-fcgi: the FastCGI worker. Flags (fcgi_conf), the listening socket, signals, and T request
 * threads each running FCGX_Accept_r; one request is handed to fcgi_server.
 *
 * Listening socket: fd 0 when it is a socket (spawn-fcgi, lighttpd bin-path, Apache mod_fcgid),
 * else --listen unix:PATH (bound here, mode 0660; a live socket there is an error, a stale one is
 * replaced) or tcp:HOST:PORT (bound here, 127.0.0.1 when HOST is empty). FCGX_OpenSocket is never
 * used: it exits the process when bind fails and unlinks paths unconditionally.
 *
 * Signals and shutdown (FASTCGI.md): SIGTERM, SIGINT and SIGUSR1 are blocked in every thread before
 * FCGX_Init; one thread sigwaits for them and then stops the process gracefully: it sets the stop
 * eventfd (the request threads poll {listen fd, eventfd} before FCGX_Accept_r, the listen fd being
 * non-blocking, so -EAGAIN is retried), waits until no thread is inside FCGX_Accept_r and closes
 * this process's copy of the listening socket (never shutdown(): siblings share it). Requests in
 * flight finish; the threads are joined and the process exits 0.
 *
 * The engine may be down at start-up or restart at any time: requests get 503 until it answers.
 */
#include <errno.h>
#include <fcgiapp.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_util.h"
#include "fcgi/fcgi.h"
#include "fcgi/fcgi_conf.h"
#include "fcgi/fcgi_dump.h"
#include "fcgi/fcgi_engine.h"
#include "fcgi/fcgi_http.h"
#include "fcgi/fcgi_server.h"

/* Bytes of an over-limit body read and discarded after the 413, so that the web server can finish
 * sending it; beyond this the connection is simply closed. */
#define DRAIN_MAX_BYTES (64u << 20)

struct worker {
    struct fcgi_ctx ctx;
    int listen_fd;
    char *own_unix_path; /* --listen unix: path bound here, unlinked at exit */
    int stop_fd;         /* eventfd: readable once stopping */
    sigset_t sigs;
    pthread_t sig_thread;

    pthread_mutex_t mu; /* guards the three fields below */
    pthread_cond_t cond;
    bool stopping;
    bool listen_closed;
    int in_accept; /* threads between the stop check and the end of FCGX_Accept_r */
    atomic_int exit_code;
};

/* ---- Listening socket ---- */

static int
listen_unix(struct worker *w, const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path)) {
        fprintf(stderr, "llm-fcgi: --listen path too long: %s\n", path);
        return -EINVAL;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            fprintf(stderr, "llm-fcgi: %s exists and is not a socket\n", path);
            return -EEXIST;
        }
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int live = probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0;
        if (probe >= 0)
            close(probe);
        if (live) {
            fprintf(stderr, "llm-fcgi: a process already accepts on %s\n", path);
            return -EADDRINUSE;
        }
        unlink(path); /* stale */
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || chmod(path, 0660) < 0 ||
        listen(fd, 128) < 0) {
        int err = errno;
        fprintf(stderr, "llm-fcgi: cannot listen on %s: %s\n", path, strerror(err));
        if (fd >= 0)
            close(fd);
        return -err;
    }
    w->own_unix_path = cm_xstrdup(path);
    w->listen_fd = fd;
    return 0;
}

static int
listen_tcp(struct worker *w, const char *spec)
{
    /* HOST:PORT, HOST possibly empty (127.0.0.1) or [IPv6]. */
    char host[256];
    const char *colon = strrchr(spec, ':');
    size_t hlen = colon ? (size_t)(colon - spec) : 0;
    if (!colon || hlen >= sizeof(host))
        return -EINVAL;
    memcpy(host, spec, hlen);
    host[hlen] = 0;
    if (hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']') {
        memmove(host, host + 1, hlen - 2);
        host[hlen - 2] = 0;
    }
    if (!host[0])
        snprintf(host, sizeof(host), "127.0.0.1");
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(host, colon + 1, &hints, &res);
    if (gai != 0) {
        fprintf(stderr, "llm-fcgi: --listen tcp:%s: %s\n", spec, gai_strerror(gai));
        return -EINVAL;
    }
    int fd = -1, err = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0)
            break;
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        fprintf(stderr, "llm-fcgi: cannot listen on tcp:%s: %s\n", spec, strerror(err));
        return -(err ? err : EINVAL);
    }
    w->listen_fd = fd;
    return 0;
}

static int
open_listener(struct worker *w)
{
    int rc;
    const char *l = w->ctx.conf.listen;
    if (l && !strncmp(l, "unix:", 5)) {
        rc = listen_unix(w, l + 5);
    } else if (l && !strncmp(l, "tcp:", 4)) {
        rc = listen_tcp(w, l + 4);
    } else {
        struct stat st;
        if (fstat(0, &st) < 0 || !S_ISSOCK(st.st_mode)) {
            fprintf(stderr, "llm-fcgi: fd 0 is not a socket: start under spawn-fcgi or a web "
                            "server, or pass --listen unix:PATH|tcp:HOST:PORT (see --help)\n");
            return -ENOTSOCK;
        }
        w->listen_fd = 0;
        rc = 0;
    }
    if (rc < 0)
        return rc;
    int fl = fcntl(w->listen_fd, F_GETFL);
    if (fl < 0 || fcntl(w->listen_fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        fprintf(stderr, "llm-fcgi: cannot make the listening socket non-blocking: %s\n",
                strerror(errno));
        return -errno;
    }
    return 0;
}

/* ---- libfcgi output ops ---- */

static int
fcgx_write(void *io, const void *data, size_t n)
{
    FCGX_Stream *out = io;
    const char *p = data;
    while (n > 0) {
        int chunk = n > (size_t)INT_MAX ? INT_MAX : (int)n;
        if (FCGX_PutStr(p, chunk, out) != chunk)
            return -EPIPE;
        p += chunk;
        n -= (size_t)chunk;
    }
    return 0;
}

static int
fcgx_flush(void *io)
{
    FCGX_Stream *out = io;
    if (FCGX_FFlush(out) < 0 || FCGX_GetError(out) != 0)
        return -EPIPE;
    return 0;
}

static const struct fcgi_http_ops fcgx_ops = {.write = fcgx_write, .flush = fcgx_flush};

/* ---- One request ---- */

static char *
param_dup(const char *name, FCGX_ParamArray envp)
{
    const char *v = FCGX_GetParam(name, envp);
    return v ? cm_xstrdup(v) : NULL;
}

/* Reads the body into h (at most max bytes). Returns 0, -EFBIG (over the limit: the rest is left
 * unread), -EIO (the stream failed or ended early) or -ENOMEM. */
static int
read_body(FCGX_Request *req, size_t max, struct fcgi_http *h)
{
    const char *cl = FCGX_GetParam("CONTENT_LENGTH", req->envp);
    size_t want = 0;
    if (cl && cl[0]) {
        char *end = NULL;
        errno = 0;
        unsigned long long v = strtoull(cl, &end, 10);
        if (errno || *end || cl[0] == '-')
            return -EIO;
        if (v > max)
            return -EFBIG;
        want = (size_t)v;
    }
    size_t cap = want ? want + 1 : 4096, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        return -ENOMEM;
    for (;;) {
        if (len + 1 >= cap) {
            size_t ncap = cap * 2 > max + 2 ? max + 2 : cap * 2;
            char *nb = realloc(buf, ncap);
            if (!nb) {
                free(buf);
                return -ENOMEM;
            }
            buf = nb;
            cap = ncap;
        }
        size_t room = cap - 1 - len;
        if (cl && cl[0] && len == want) {
            /* CGI: the body is CONTENT_LENGTH bytes. What follows is read and dropped up to the
             * end of the stream: the end-of-stdin record must be consumed, or the connection
             * stays readable and the client-disconnect poll would fire at once. */
            char scratch[4096];
            size_t extra = 0;
            int d;
            while (extra < DRAIN_MAX_BYTES &&
                   (d = FCGX_GetStr(scratch, (int)sizeof(scratch), req->in)) > 0)
                extra += (size_t)d;
            break;
        }
        if (cl && cl[0] && room > want - len)
            room = want - len;
        int n = FCGX_GetStr(buf + len, room > (size_t)INT_MAX ? INT_MAX : (int)room, req->in);
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len > max) {
            free(buf);
            return -EFBIG;
        }
    }
    if (FCGX_GetError(req->in) != 0 || (cl && cl[0] && len != want)) {
        free(buf);
        return -EIO;
    }
    if (len == 0) {
        free(buf);
        return 0;
    }
    buf[len] = 0;
    h->body = buf;
    h->body_len = len;
    return 0;
}

static void
drain_body(FCGX_Request *req)
{
    char scratch[8192];
    size_t total = 0;
    int n;
    while (total < DRAIN_MAX_BYTES && (n = FCGX_GetStr(scratch, sizeof(scratch), req->in)) > 0)
        total += (size_t)n;
}

static void
serve_one(struct worker *w, FCGX_Request *req)
{
    uint64_t t0 = cm_now_ns();
    struct fcgi_http h;
    fcgi_http_init(&h, &fcgx_ops, req->out, &w->ctx.conf);
    h.client_fd = req->ipcFd;
    h.method = param_dup("REQUEST_METHOD", req->envp);
    h.authorization = param_dup("HTTP_AUTHORIZATION", req->envp);
    h.origin = param_dup("HTTP_ORIGIN", req->envp);
    h.content_type = param_dup("CONTENT_TYPE", req->envp);
    fcgi_server_request_path(&w->ctx.conf, FCGX_GetParam("REQUEST_URI", req->envp),
                             FCGX_GetParam("SCRIPT_NAME", req->envp),
                             FCGX_GetParam("PATH_INFO", req->envp), &h.path);
    int rc = read_body(req, w->ctx.conf.max_body_bytes, &h);
    if (rc == -EFBIG) {
        fcgi_server_handle_too_large(&w->ctx, &h);
        drain_body(req);
    } else if (rc == -EIO) {
        CM_LOG(CM_LOG_INFO, "request body unreadable (client gone?) path=%s", h.path);
    } else if (rc < 0) {
        fcgi_http_send_error(&h, 500, "server_error", "out of memory", NULL, NULL, 0);
    } else {
        fcgi_server_handle(&w->ctx, &h);
    }
    CM_LOG(CM_LOG_INFO, "method=%s path=%s status=%d ms=%.1f%s", h.method ? h.method : "-", h.path,
           h.status, (double)(cm_now_ns() - t0) / 1e6, h.client_gone ? " client_gone=1" : "");
    fcgi_http_fini(&h);
}

/* ---- Request threads ---- */

/* Waits for a new connection (or, on a kept-alive FastCGI connection, the next request) or the
 * stop. Returns true when the thread should stop. */
static bool
wait_work(struct worker *w, const FCGX_Request *req)
{
    int fd = req->ipcFd >= 0 ? req->ipcFd : w->listen_fd;
    for (;;) {
        struct pollfd p[2] = {{.fd = w->stop_fd, .events = POLLIN}, {.fd = fd, .events = POLLIN}};
        int n = poll(p, 2, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 || p[0].revents)
            return true;
        if (p[1].revents)
            return false;
    }
}

/* Enters FCGX_Accept_r unless stopping. Returns false when stopping. */
static bool
accept_enter(struct worker *w)
{
    pthread_mutex_lock(&w->mu);
    bool ok = !w->stopping;
    if (ok)
        w->in_accept++;
    pthread_mutex_unlock(&w->mu);
    return ok;
}

static void
accept_leave(struct worker *w)
{
    pthread_mutex_lock(&w->mu);
    if (--w->in_accept == 0 && w->stopping)
        pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

static void *
request_thread(void *arg)
{
    struct worker *w = arg;
    FCGX_Request req;
    FCGX_InitRequest(&req, w->listen_fd, 0);
    for (;;) {
        if (wait_work(w, &req) || !accept_enter(w))
            break;
        int rc = FCGX_Accept_r(&req);
        accept_leave(w);
        if (rc < 0) {
            if (rc == -EAGAIN || rc == -EWOULDBLOCK || rc == -EINTR || rc == -ECONNABORTED)
                continue;
            CM_LOG(CM_LOG_WARN, "FCGX_Accept_r failed: %s", strerror(-rc));
            /* EMFILE and the like: back off a little, waking early for the stop. */
            struct pollfd p = {.fd = w->stop_fd, .events = POLLIN};
            if (poll(&p, 1, 100) > 0)
                break;
            continue;
        }
        serve_one(w, &req);
        FCGX_Finish_r(&req);
    }
    FCGX_Free(&req, 1);
    return NULL;
}

/* ---- Stop ---- */

static void
begin_stop(struct worker *w)
{
    pthread_mutex_lock(&w->mu);
    w->stopping = true;
    uint64_t one = 1;
    if (write(w->stop_fd, &one, sizeof(one)) < 0)
        CM_LOG(CM_LOG_ERROR, "stop eventfd write failed: %s", strerror(errno));
    while (w->in_accept > 0)
        pthread_cond_wait(&w->cond, &w->mu);
    if (!w->listen_closed) {
        close(w->listen_fd);
        w->listen_closed = true;
    }
    pthread_mutex_unlock(&w->mu);
}

static void *
signal_thread(void *arg)
{
    struct worker *w = arg;
    int sig = 0;
    while (sigwait(&w->sigs, &sig) != 0)
        ;
    CM_LOG(CM_LOG_INFO, "signal %d: stopping after the requests in flight", sig);
    begin_stop(w);
    return NULL;
}

/* ---- Start-up ---- */

static void
set_fingerprint(struct worker *w)
{
    snprintf(w->ctx.fingerprint, sizeof(w->ctx.fingerprint), "llm-fcgi-%s", FCGI_VERSION);
    struct fcgi_engine_conn *c = NULL;
    int rc = fcgi_engine_connect(w->ctx.engine, &c);
    if (rc < 0) {
        CM_LOG(CM_LOG_WARN, "engine not reachable at start-up (503 until it is) socket=%s",
               w->ctx.conf.engine_socket);
        return;
    }
    const char *model = fcgi_engine_conn_info(c)->model;
    uint32_t hsh = 2166136261u; /* FNV-1a of the model id */
    for (const char *p = model; *p; p++)
        hsh = (hsh ^ (uint8_t)*p) * 16777619u;
    snprintf(w->ctx.fingerprint, sizeof(w->ctx.fingerprint), "llm-fcgi-%s-%08x", FCGI_VERSION, hsh);
    fcgi_engine_conn_close(c);
}

static int
setup(struct worker *w)
{
    if (open_listener(w) < 0)
        return -1;
    int rc = fcgi_engine_new(w->ctx.conf.engine_socket, 5000, &w->ctx.engine);
    if (rc < 0) {
        fprintf(stderr, "llm-fcgi: bad --engine path: %s\n", strerror(-rc));
        return -1;
    }
    if (w->ctx.conf.dump_path) {
        rc = fcgi_dump_open(w->ctx.conf.dump_path, &w->ctx.dump);
        if (rc < 0) {
            fprintf(stderr, "llm-fcgi: cannot open --dump %s: %s\n", w->ctx.conf.dump_path,
                    strerror(-rc));
            return -1;
        }
    }
    w->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (w->stop_fd < 0) {
        fprintf(stderr, "llm-fcgi: eventfd: %s\n", strerror(errno));
        return -1;
    }
    atomic_store(&w->ctx.next_req_id, 1);
    set_fingerprint(w);
    return 0;
}

static void
teardown(struct worker *w)
{
    if (w->listen_fd >= 0 && !w->listen_closed)
        close(w->listen_fd);
    if (w->own_unix_path)
        unlink(w->own_unix_path);
    free(w->own_unix_path);
    if (w->stop_fd >= 0)
        close(w->stop_fd);
    fcgi_dump_close(w->ctx.dump);
    fcgi_engine_free(w->ctx.engine);
    fcgi_conf_fini(&w->ctx.conf);
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->mu);
}

static int
run(struct worker *w)
{
    int n = w->ctx.conf.n_threads, started = 0;
    pthread_t *th = cm_xcalloc((size_t)n, sizeof(*th));
    if (pthread_create(&w->sig_thread, NULL, signal_thread, w) != 0) {
        fprintf(stderr, "llm-fcgi: cannot start the signal thread\n");
        free(th);
        return 1;
    }
    for (; started < n; started++) {
        if (pthread_create(&th[started], NULL, request_thread, w) != 0)
            break;
    }
    int ret = 0;
    if (started < n) {
        fprintf(stderr, "llm-fcgi: cannot start %d request threads\n", n);
        ret = 1;
        pthread_kill(w->sig_thread, SIGTERM);
    } else {
        CM_LOG(CM_LOG_INFO, "ready threads=%d engine=%s%s%s", n, w->ctx.conf.engine_socket,
               w->ctx.conf.listen ? " listen=" : " listen=fd0",
               w->ctx.conf.listen ? w->ctx.conf.listen : "");
    }
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    pthread_join(w->sig_thread, NULL);
    free(th);
    CM_LOG(CM_LOG_INFO, "stopped requests=%llu",
           (unsigned long long)atomic_load(&w->ctx.counters.requests));
    return ret;
}

int
main(int argc, char **argv)
{
    static struct worker wk;
    struct worker *w = &wk;
    w->listen_fd = -1;
    w->stop_fd = -1;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cond, NULL);
    int prc = fcgi_conf_parse(argc, argv, stdout, &w->ctx.conf);
    if (prc != 0) {
        fcgi_conf_fini(&w->ctx.conf);
        return prc > 0 ? 0 : 2;
    }
    cm_log_set_level((enum cm_log_level)w->ctx.conf.log_level);

    /* Before FCGX_Init and before any thread, so that every thread inherits the mask and libfcgi
     * leaves SIGTERM alone. SIGPIPE: writes to a gone peer return EPIPE. */
    sigemptyset(&w->sigs);
    sigaddset(&w->sigs, SIGTERM);
    sigaddset(&w->sigs, SIGINT);
    sigaddset(&w->sigs, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &w->sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (FCGX_Init() != 0) {
        fprintf(stderr, "llm-fcgi: FCGX_Init failed\n");
        fcgi_conf_fini(&w->ctx.conf);
        return 1;
    }
    int ret = 1;
    if (setup(w) == 0)
        ret = run(w);
    teardown(w);
    return ret;
}

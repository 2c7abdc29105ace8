/*
 * bench_load: see bench_load.h. One poll loop over every client's socket; each client is a small
 * state machine (connect, send the request, read events until the end, next round).
 */
#include "bench/bench_load.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/cm_util.h"
#include "common/cm_wire.h"

/* ---- Prompts ---- */

static const char *const words[] = {
    "the",    "river",    "carried", "small",  "boats",  "past",    "old",     "stone",
    "houses", "where",    "people",  "sold",   "bread",  "fish",    "and",     "bright",
    "cloth",  "every",    "morning", "before", "the",    "sun",     "rose",    "above",
    "hills",  "children", "ran",     "along",  "narrow", "streets", "calling", "friends",
};

/* ~n words, seeded by the request number so prompts differ from the first word on. */
static char *
make_prompt(int req, int n)
{
    size_t cap = (size_t)n * 12 + 64, len = 0;
    char *p = cm_xmalloc(cap);
    len += (size_t)snprintf(p, cap, "Story %d:", req);
    uint32_t s = 2166136261u ^ (uint32_t)req * 16777619u;
    for (int i = 0; i < n; i++) {
        s = s * 1103515245u + 12345u;
        const char *w = words[(s >> 16) % (sizeof(words) / sizeof(words[0]))];
        len += (size_t)snprintf(p + len, cap - len, " %s", w);
    }
    return p;
}

/* ---- Targets ---- */

struct target {
    bool http;
    struct sockaddr_storage addr;
    socklen_t addr_len;
    char host[128];
};

static int
parse_target(const char *t, struct target *out)
{
    memset(out, 0, sizeof(*out));
    if (strncmp(t, "unix:", 5) == 0) {
        struct sockaddr_un *un = (struct sockaddr_un *)&out->addr;
        if (strlen(t + 5) >= sizeof(un->sun_path))
            return -EINVAL;
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, t + 5);
        out->addr_len = sizeof(*un);
        return 0;
    }
    if (strncmp(t, "http://", 7) != 0)
        return -EINVAL;
    const char *h = t + 7, *colon = strchr(h, ':');
    size_t hl = colon ? (size_t)(colon - h) : strcspn(h, "/");
    if (hl == 0 || hl >= sizeof(out->host))
        return -EINVAL;
    memcpy(out->host, h, hl);
    int port = colon ? atoi(colon + 1) : 80;
    struct sockaddr_in *in = (struct sockaddr_in *)&out->addr;
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)port);
    if (strcmp(out->host, "localhost") == 0)
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    else if (inet_pton(AF_INET, out->host, &in->sin_addr) != 1)
        return -EINVAL;
    out->addr_len = sizeof(*in);
    out->http = true;
    return 0;
}

static int
connect_nb(const struct target *t)
{
    int fd = socket(t->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (t->http) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    if (connect(fd, (const struct sockaddr *)&t->addr, t->addr_len) < 0 && errno != EINPROGRESS) {
        int e = -errno;
        close(fd);
        return e;
    }
    return fd;
}

/* ---- Blocking helpers (set-up only) ---- */

/* GET /v1/models and return data[0].id (caller frees), or NULL. */
static char *
http_model_id(const struct target *t)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    char *id = NULL, buf[65536];
    size_t len = 0;
    if (fd < 0)
        return NULL;
    if (connect(fd, (const struct sockaddr *)&t->addr, t->addr_len) < 0)
        goto out;
    char req[256];
    int n = snprintf(req, sizeof(req), "GET /v1/models HTTP/1.0\r\nHost: %s\r\n\r\n", t->host);
    if (write(fd, req, (size_t)n) != n)
        goto out;
    for (ssize_t r; len < sizeof(buf) - 1 && (r = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0;)
        len += (size_t)r;
    buf[len] = 0;
    char *body = strstr(buf, "\r\n\r\n");
    if (!body)
        goto out;
    struct json_object *j = json_tokener_parse(body + 4), *data, *m0, *jid;
    if (j && json_object_object_get_ex(j, "data", &data) && json_object_array_length(data) > 0 &&
        (m0 = json_object_array_get_idx(data, 0)) && json_object_object_get_ex(m0, "id", &jid))
        id = strdup(json_object_get_string(jid));
    json_object_put(j);
out:
    close(fd);
    return id;
}

int
bench_load_engine_ban_ids(const char *socket_path, int32_t ban[2], int *n)
{
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    struct cm_wire_buf b;
    struct cm_wire_reader r;
    struct cm_wire_model_info mi;
    int rc = -EPROTO, fd = -1;
    cm_wire_buf_init(&b, 0);
    cm_wire_reader_init(&r, 0);
    cm_wire_model_info_init(&mi);
    *n = 0;
    if (strlen(socket_path) >= sizeof(un.sun_path)) {
        rc = -EINVAL;
        goto out;
    }
    strcpy(un.sun_path, socket_path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&un, sizeof(un)) < 0) {
        rc = -errno;
        goto out;
    }
    struct cm_wire_hello h = {.version = CM_WIRE_VERSION};
    strcpy(h.client, "llm-bench");
    if ((rc = cm_wire_encode_hello(&b, 0, &h)) < 0)
        goto out;
    while (cm_wire_buf_pending(&b) > 0)
        if ((rc = (int)cm_wire_buf_write_fd(&b, fd)) < 0)
            goto out;
    struct cm_wire_frame f;
    for (;;) {
        int got = cm_wire_reader_next(&r, &f);
        if (got < 0) {
            rc = got;
            goto out;
        }
        if (got == 1)
            break;
        ssize_t rd = cm_wire_reader_read_fd(&r, fd);
        if (rd <= 0) {
            rc = rd < 0 ? (int)rd : -ECONNRESET;
            goto out;
        }
    }
    if ((rc = cm_wire_decode_model_info(&f, &mi, NULL, 0)) < 0)
        goto out;
    if (mi.eos.id >= 0)
        ban[(*n)++] = mi.eos.id;
    if (mi.eot.id >= 0 && mi.eot.id != mi.eos.id)
        ban[(*n)++] = mi.eot.id;
    rc = 0;
out:
    if (fd >= 0)
        close(fd);
    cm_wire_model_info_fini(&mi);
    cm_wire_reader_fini(&r);
    cm_wire_buf_fini(&b);
    return rc;
}

/* ---- Clients ---- */

enum client_state { CL_IDLE, CL_SENDING, CL_READING, CL_DONE };

struct client {
    enum client_state st;
    int fd;
    int round;
    int req;   /* global request number */
    char *out; /* request bytes (HTTP) */
    size_t out_len, out_off;
    struct cm_wire_buf wb;         /* request frames (engine) */
    struct cm_wire_reader rd;      /* engine frames */
    char *in;                      /* HTTP bytes received */
    size_t in_len, in_cap, in_off; /* in_off: next unparsed byte of the body */
    bool headers_done;
    /* Transfer-Encoding: chunked (llama-server sends it even to HTTP/1.0): the body is decoded in
     * place, in[body_start..body_end) holding decoded bytes, raw_off the next raw byte. */
    bool chunked;
    size_t body_end, raw_off, chunk_left;
    int skip_crlf;
    uint64_t t_send, t_last, t_deadline;
    int n_events;
    long completion_tokens, prompt_tokens;
    char why[80]; /* how the request ended (see struct bench_load_why) */
};

struct samples {
    double *v;
    size_t n, cap;
};

static void
samples_add(struct samples *s, double x)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1024;
        s->v = cm_xrealloc(s->v, s->cap * sizeof(double));
    }
    s->v[s->n++] = x;
}

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double
percentile(struct samples *s, double p)
{
    if (s->n == 0)
        return 0;
    qsort(s->v, s->n, sizeof(double), cmp_double);
    size_t i = (size_t)(p * (double)(s->n - 1) + 0.5);
    return s->v[i];
}

struct load {
    const struct bench_load_opts *o;
    struct target t;
    char *model;
    int next_req;
    struct samples ttft, itl;
    struct bench_load_result *res;
};

static void
token_arrived(struct load *L, struct client *c, uint64_t now)
{
    if (c->n_events == 0)
        samples_add(&L->ttft, (double)(now - c->t_send) / 1e6);
    else
        samples_add(&L->itl, (double)(now - c->t_last) / 1e6);
    c->t_last = now;
    c->n_events++;
}

static void
bias_json(struct json_object *req, const struct bench_load_opts *o)
{
    struct json_object *lb = json_object_new_object();
    for (int i = 0; i < o->n_ban; i++) {
        char k[16];
        snprintf(k, sizeof(k), "%d", o->ban[i]);
        json_object_object_add(lb, k, json_object_new_double(-100));
    }
    json_object_object_add(req, "logit_bias", lb);
}

static int
client_start(struct load *L, struct client *c)
{
    const struct bench_load_opts *o = L->o;
    c->req = ++L->next_req;
    c->n_events = 0;
    c->completion_tokens = c->prompt_tokens = 0;
    c->why[0] = '\0';
    c->headers_done = false;
    c->in_len = c->in_off = 0;
    c->chunked = false;
    c->body_end = c->raw_off = c->chunk_left = 0;
    c->skip_crlf = 0;
    char *prompt = make_prompt(c->req, o->prompt_words);
    int rc = 0;
    if (L->t.http) {
        struct json_object *j = json_object_new_object(), *so = json_object_new_object();
        json_object_object_add(j, "model", json_object_new_string(L->model ? L->model : "x"));
        json_object_object_add(j, "prompt", json_object_new_string(prompt));
        json_object_object_add(j, "max_tokens", json_object_new_int(o->gen));
        json_object_object_add(j, "temperature", json_object_new_double(0.8));
        json_object_object_add(j, "seed", json_object_new_int(c->req));
        json_object_object_add(j, "stream", json_object_new_boolean(1));
        json_object_object_add(so, "include_usage", json_object_new_boolean(1));
        json_object_object_add(j, "stream_options", so);
        bias_json(j, o);
        const char *body = json_object_to_json_string_ext(j, JSON_C_TO_STRING_PLAIN);
        size_t bl = strlen(body), cap = bl + 512;
        free(c->out);
        c->out = cm_xmalloc(cap);
        c->out_len = (size_t)snprintf(c->out, cap,
                                      "POST /v1/completions HTTP/1.0\r\nHost: %s\r\n"
                                      "Content-Type: application/json\r\nContent-Length: %zu\r\n"
                                      "\r\n%s",
                                      L->t.host, bl, body);
        c->out_off = 0;
        json_object_put(j);
    } else {
        struct cm_wire_hello h = {.version = CM_WIRE_VERSION};
        strcpy(h.client, "llm-bench");
        struct cm_wire_submit s;
        cm_wire_submit_init(&s);
        s.prompt = prompt;
        s.prompt_len = strlen(prompt);
        s.max_tokens = (uint32_t)o->gen;
        s.sampling.temperature = 0.8f;
        s.sampling.has_seed = true;
        s.sampling.seed = (uint64_t)c->req;
        struct cm_wire_logit_bias lb[2];
        for (int i = 0; i < o->n_ban && i < 2; i++)
            lb[i] = (struct cm_wire_logit_bias){.id = o->ban[i], .bias = -100};
        s.sampling.logit_bias = lb;
        s.sampling.n_logit_bias = (uint32_t)(o->n_ban < 2 ? o->n_ban : 2);
        cm_wire_buf_fini(&c->wb);
        cm_wire_buf_init(&c->wb, 0);
        cm_wire_reader_fini(&c->rd);
        cm_wire_reader_init(&c->rd, 0);
        if ((rc = cm_wire_encode_hello(&c->wb, 0, &h)) < 0 ||
            (rc = cm_wire_encode_submit(&c->wb, (uint64_t)c->req, &s)) < 0) {
            free(prompt);
            return rc;
        }
    }
    free(prompt);
    c->fd = connect_nb(&L->t);
    if (c->fd < 0)
        return c->fd;
    c->t_send = cm_now_ns();
    c->t_deadline = c->t_send + (uint64_t)o->timeout_s * 1000000000ull;
    c->st = CL_SENDING;
    return 0;
}

static void
count_short(struct bench_load_result *r, const char *why)
{
    r->short_reqs++;
    for (int i = 0; i < r->n_why; i++)
        if (strcmp(r->why[i].name, why) == 0) {
            r->why[i].n++;
            return;
        }
    if (r->n_why == BENCH_LOAD_MAX_WHY) {
        r->why_other++;
        return;
    }
    snprintf(r->why[r->n_why].name, sizeof(r->why[r->n_why].name), "%s", why);
    r->why[r->n_why++].n = 1;
}

static void
client_end(struct load *L, struct client *c, bool ok)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    if (ok) {
        L->res->ok++;
        L->res->completion_tokens += c->completion_tokens;
        L->res->prompt_tokens += c->prompt_tokens;
        if (c->completion_tokens < L->o->gen)
            count_short(L->res, c->why[0] ? c->why : "unknown");
    } else {
        L->res->errors++;
    }
    c->round++;
    c->st = c->round < L->o->rounds ? CL_IDLE : CL_DONE;
}

/* One SSE event (the text between "data: " and the blank line). Returns 1 at [DONE], 0 to go on,
 * -1 on an error event. */
static int
http_event(struct load *L, struct client *c, const char *data, size_t n, uint64_t now)
{
    if (n == 6 && memcmp(data, "[DONE]", 6) == 0)
        return 1;
    struct json_object *j = json_tokener_parse(data), *v, *ch, *c0, *txt;
    (void)n;
    int rc = 0;
    if (!j || json_object_object_get_ex(j, "error", &v)) {
        rc = -1;
        goto out;
    }
    if (json_object_object_get_ex(j, "choices", &ch) && json_object_array_length(ch) > 0 &&
        (c0 = json_object_array_get_idx(ch, 0))) {
        if (json_object_object_get_ex(c0, "text", &txt) && json_object_get_string_len(txt) > 0)
            token_arrived(L, c, now);
        struct json_object *why;
        if ((json_object_object_get_ex(c0, "stop_reason", &why) ||
             json_object_object_get_ex(c0, "finish_reason", &why)) &&
            json_object_get_type(why) == json_type_string)
            snprintf(c->why, sizeof(c->why), "%s", json_object_get_string(why));
    }
    struct json_object *u, *ct, *pt;
    if (json_object_object_get_ex(j, "usage", &u) && json_object_get_type(u) == json_type_object) {
        if (json_object_object_get_ex(u, "completion_tokens", &ct))
            c->completion_tokens = json_object_get_int64(ct);
        if (json_object_object_get_ex(u, "prompt_tokens", &pt))
            c->prompt_tokens = json_object_get_int64(pt);
    }
out:
    json_object_put(j);
    return rc;
}

/* Decodes the chunked body bytes that arrived, moving them down to body_end. Returns 0, or -1 on
 * a malformed chunk header. */
static int
dechunk(struct client *c)
{
    while (c->raw_off < c->in_len) {
        if (c->chunk_left > 0) {
            size_t n =
                c->in_len - c->raw_off < c->chunk_left ? c->in_len - c->raw_off : c->chunk_left;
            memmove(c->in + c->body_end, c->in + c->raw_off, n);
            c->body_end += n;
            c->raw_off += n;
            c->chunk_left -= n;
            if (c->chunk_left == 0)
                c->skip_crlf = 2;
        } else if (c->skip_crlf > 0) {
            c->raw_off++;
            c->skip_crlf--;
        } else {
            char *e = memmem(c->in + c->raw_off, c->in_len - c->raw_off, "\r\n", 2);
            if (!e)
                break;
            char *end = NULL;
            unsigned long n = strtoul(c->in + c->raw_off, &end, 16);
            if (end == c->in + c->raw_off)
                return -1;
            c->raw_off = (size_t)(e + 2 - c->in);
            c->chunk_left = n;
            if (n == 0) /* the last chunk: the body ends (a trailer may follow) */
                c->raw_off = c->in_len;
        }
    }
    c->in[c->body_end] = 0;
    return 0;
}

/* Parses what arrived; returns 1 when the response is complete, 0 to go on, -1 on failure. */
static int
http_parse(struct load *L, struct client *c, uint64_t now)
{
    if (!c->headers_done) {
        char *e = memmem(c->in, c->in_len, "\r\n\r\n", 4);
        if (!e)
            return 0;
        if (c->in_len < 12 || memcmp(c->in + 9, "200", 3) != 0)
            return -1;
        c->headers_done = true;
        c->in_off = (size_t)(e + 4 - c->in);
        *e = 0;
        c->chunked = strcasestr(c->in, "\ntransfer-encoding: chunked") != NULL;
        *e = '\r';
        c->body_end = c->raw_off = c->in_off;
    }
    if (!c->chunked)
        c->body_end = c->in_len;
    else if (dechunk(c) < 0)
        return -1;
    for (;;) {
        char *s = c->in + c->in_off;
        char *e = memmem(s, c->body_end - c->in_off, "\n\n", 2);
        if (!e)
            return 0;
        *e = 0;
        c->in_off = (size_t)(e + 2 - c->in);
        if (strncmp(s, "data: ", 6) != 0)
            continue; /* a comment (heartbeat) */
        int rc = http_event(L, c, s + 6, strlen(s + 6), now);
        if (rc)
            return rc;
    }
}

static int
engine_parse(struct load *L, struct client *c, uint64_t now)
{
    struct cm_wire_frame f;
    int got;
    while ((got = cm_wire_reader_next(&c->rd, &f)) == 1) {
        if (f.type == CM_WIRE_TOKEN) {
            token_arrived(L, c, now);
        } else if (f.type == CM_WIRE_ACCEPTED) {
            struct cm_wire_accepted a;
            if (cm_wire_decode_accepted(&f, &a, NULL, 0) == 0)
                c->prompt_tokens = a.prompt_tokens;
        } else if (f.type == CM_WIRE_DONE) {
            struct cm_wire_done d;
            if (cm_wire_decode_done(&f, &d, NULL, 0) < 0)
                return -1;
            c->completion_tokens = d.completion_tokens;
            snprintf(c->why, sizeof(c->why), "%s",
                     d.guard[0] ? d.guard : cm_wire_finish_name(d.finish));
            return 1;
        } else if (f.type == CM_WIRE_ERROR) {
            return -1;
        }
    }
    return got < 0 ? -1 : 0;
}

static void
client_io(struct load *L, struct client *c, short rev, uint64_t now)
{
    if (c->st == CL_SENDING) {
        ssize_t w;
        if (L->t.http) {
            w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
            if (w > 0)
                c->out_off += (size_t)w;
            if (w < 0 && errno != EAGAIN && errno != EINTR)
                return client_end(L, c, false);
            if (c->out_off == c->out_len)
                c->st = CL_READING;
        } else {
            w = cm_wire_buf_write_fd(&c->wb, c->fd);
            if (w < 0 && w != -EAGAIN)
                return client_end(L, c, false);
            if (cm_wire_buf_pending(&c->wb) == 0)
                c->st = CL_READING;
        }
        return;
    }
    if (!(rev & (POLLIN | POLLHUP | POLLERR)))
        return;
    int rc;
    if (L->t.http) {
        if (c->in_cap - c->in_len < 4096) {
            c->in_cap = c->in_cap ? c->in_cap * 2 : 65536;
            c->in = cm_xrealloc(c->in, c->in_cap);
        }
        ssize_t r = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len - 1);
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (r <= 0)
            return client_end(L, c, false); /* closed before [DONE] */
        c->in_len += (size_t)r;
        c->in[c->in_len] = 0;
        rc = http_parse(L, c, now);
    } else {
        ssize_t r = cm_wire_reader_read_fd(&c->rd, c->fd);
        if (r == -EAGAIN)
            return;
        if (r <= 0 && r != -ENOBUFS)
            return client_end(L, c, false);
        rc = engine_parse(L, c, now);
    }
    if (rc != 0)
        client_end(L, c, rc > 0);
}

int
bench_load_run(const struct bench_load_opts *o, struct bench_load_result *out)
{
    struct load L = {.o = o};
    struct bench_load_result res = {0};
    L.res = &res;
    int rc = parse_target(o->target, &L.t);
    if (rc < 0 || o->clients < 1 || o->rounds < 1 || o->gen < 1)
        return rc < 0 ? rc : -EINVAL;
    if (L.t.http) {
        L.model = o->model ? strdup(o->model) : http_model_id(&L.t);
        if (!L.model)
            return -ECONNREFUSED;
    }
    struct client *cl = cm_xcalloc((size_t)o->clients, sizeof(*cl));
    struct pollfd *pf = cm_xcalloc((size_t)o->clients, sizeof(*pf));
    for (int i = 0; i < o->clients; i++) {
        cl[i].fd = -1;
        cm_wire_buf_init(&cl[i].wb, 0);
        cm_wire_reader_init(&cl[i].rd, 0);
    }
    uint64_t t0 = cm_now_ns();
    for (;;) {
        int n_live = 0;
        uint64_t now = cm_now_ns();
        for (int i = 0; i < o->clients; i++) {
            struct client *c = &cl[i];
            if (c->st == CL_IDLE && client_start(&L, c) < 0)
                client_end(&L, c, false);
            if ((c->st == CL_SENDING || c->st == CL_READING) && now > c->t_deadline)
                client_end(&L, c, false);
            pf[i].fd = (c->st == CL_SENDING || c->st == CL_READING) ? c->fd : -1;
            pf[i].events = c->st == CL_SENDING ? POLLOUT : POLLIN;
            pf[i].revents = 0;
            n_live += pf[i].fd >= 0 || c->st == CL_IDLE;
        }
        if (n_live == 0)
            break;
        if (poll(pf, (nfds_t)o->clients, 1000) < 0 && errno != EINTR)
            break;
        now = cm_now_ns();
        for (int i = 0; i < o->clients; i++)
            if (pf[i].fd >= 0 && pf[i].revents)
                client_io(&L, &cl[i], pf[i].revents, now);
    }
    res.wall_s = (double)(cm_now_ns() - t0) / 1e9;
    res.tok_s = res.wall_s > 0 ? (double)res.completion_tokens / res.wall_s : 0;
    res.ttft_p50_ms = percentile(&L.ttft, 0.50);
    res.ttft_p99_ms = percentile(&L.ttft, 0.99);
    res.itl_p50_ms = percentile(&L.itl, 0.50);
    res.itl_p99_ms = percentile(&L.itl, 0.99);
    for (int i = 0; i < o->clients; i++) {
        if (cl[i].fd >= 0)
            close(cl[i].fd);
        free(cl[i].out);
        free(cl[i].in);
        cm_wire_buf_fini(&cl[i].wb);
        cm_wire_reader_fini(&cl[i].rd);
    }
    free(cl);
    free(pf);
    free(L.ttft.v);
    free(L.itl.v);
    free(L.model);
    *out = res;
    return 0;
}

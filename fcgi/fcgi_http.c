/*
 * fcgi_http: the response side of one exchange over the ops seam (see fcgi_http.h). The first
 * failed write or flush latches client_gone, so a handler that keeps streaming after a disconnect
 * costs nothing more than a flag test per event.
 */
#include "fcgi/fcgi_http.h"

#include <errno.h>
#include <json-c/json.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fcgi/fcgi.h"

void
fcgi_http_init(struct fcgi_http *h, const struct fcgi_http_ops *ops, void *io,
               const struct fcgi_conf *conf)
{
    memset(h, 0, sizeof(*h));
    h->client_fd = -1;
    h->ops = ops;
    h->io = io;
    h->conf = conf;
}

void
fcgi_http_fini(struct fcgi_http *h)
{
    free(h->method);
    free(h->path);
    free(h->authorization);
    free(h->origin);
    free(h->content_type);
    free(h->body);
    h->method = h->path = h->authorization = h->origin = h->content_type = h->body = NULL;
    h->body_len = 0;
}

const char *
fcgi_http_reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 204:
        return "No Content";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 411:
        return "Length Required";
    case 413:
        return "Payload Too Large";
    case 415:
        return "Unsupported Media Type";
    case 422:
        return "Unprocessable Entity";
    case 429:
        return "Too Many Requests";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return "Unknown";
    }
}

/* ---- Raw output ---- */

static int
raw_write(struct fcgi_http *h, const void *data, size_t n)
{
    if (h->client_gone)
        return -EPIPE;
    if (n == 0)
        return 0;
    if (h->ops->write(h->io, data, n) < 0) {
        h->client_gone = true;
        return -EPIPE;
    }
    return 0;
}

int
fcgi_http_write(struct fcgi_http *h, const void *data, size_t n)
{
    return raw_write(h, data, n);
}

int
fcgi_http_flush(struct fcgi_http *h)
{
    if (h->client_gone)
        return -EPIPE;
    if (h->ops->flush(h->io) < 0) {
        h->client_gone = true;
        return -EPIPE;
    }
    return 0;
}

/* ---- Headers ---- */

/* A header name or value must not be able to start another header line. */
static bool
header_safe(const char *s)
{
    return s && !strpbrk(s, "\r\n");
}

int
fcgi_http_begin(struct fcgi_http *h, int status, const char *content_type, bool sse,
                const char *extra_headers)
{
    if (h->headers_sent)
        return -EALREADY;
    if (status < 100 || status > 999)
        status = 500;
    h->headers_sent = true;
    h->status = status;
    if (h->client_gone)
        return -EPIPE;

    char line[1024];
    int rc = 0;
    snprintf(line, sizeof(line), "Status: %d %s\r\n", status, fcgi_http_reason(status));
    rc = raw_write(h, line, strlen(line));
    if (rc == 0 && header_safe(content_type)) {
        snprintf(line, sizeof(line), "Content-Type: %s\r\n", content_type);
        rc = raw_write(h, line, strlen(line));
    }
    const char *origin = h->conf ? h->conf->cors_origin : NULL;
    if (rc == 0 && header_safe(origin) && strlen(origin) < 400) {
        snprintf(line, sizeof(line),
                 "Access-Control-Allow-Origin: %s\r\n"
                 "Access-Control-Allow-Headers: Authorization, Content-Type\r\n"
                 "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n"
                 "%s",
                 origin, strcmp(origin, "*") == 0 ? "" : "Vary: Origin\r\n");
        rc = raw_write(h, line, strlen(line));
    }
    if (rc == 0 && sse) {
        static const char sse_headers[] = "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n";
        rc = raw_write(h, sse_headers, sizeof(sse_headers) - 1);
    }
    if (rc == 0 && extra_headers)
        rc = raw_write(h, extra_headers, strlen(extra_headers));
    if (rc == 0)
        rc = raw_write(h, "\r\n", 2);
    return rc;
}

/* ---- Whole responses ---- */

static int
send_json_with(struct fcgi_http *h, int status, struct json_object *obj, const char *extra)
{
    if (h->headers_sent)
        return -EALREADY;
    int rc = fcgi_http_begin(h, status, "application/json", false, extra);
    if (rc == 0) {
        size_t n = 0;
        const char *s = json_object_to_json_string_length(obj, JSON_C_TO_STRING_PLAIN, &n);
        rc = raw_write(h, s, n);
    }
    if (rc == 0)
        rc = raw_write(h, "\n", 1);
    if (rc == 0)
        rc = fcgi_http_flush(h);
    return rc;
}

int
fcgi_http_send_json(struct fcgi_http *h, int status, struct json_object *obj)
{
    return send_json_with(h, status, obj, NULL);
}

int
fcgi_http_send_error(struct fcgi_http *h, int status, const char *type, const char *message,
                     const char *param, const char *code, int retry_after_s)
{
    if (h->headers_sent)
        return -EALREADY;
    struct json_object *err = json_object_new_object();
    json_object_object_add(err, "message", json_object_new_string(message ? message : ""));
    json_object_object_add(err, "type", json_object_new_string(type ? type : "server_error"));
    json_object_object_add(err, "param", param ? json_object_new_string(param) : NULL);
    json_object_object_add(err, "code", code ? json_object_new_string(code) : NULL);
    struct json_object *top = json_object_new_object();
    json_object_object_add(top, "error", err);
    char extra[64] = "";
    if (retry_after_s > 0)
        snprintf(extra, sizeof(extra), "Retry-After: %d\r\n", retry_after_s);
    int rc = send_json_with(h, status, top, extra[0] ? extra : NULL);
    json_object_put(top);
    return rc;
}

/* ---- SSE ---- */

int
fcgi_http_sse_data(struct fcgi_http *h, const char *json, size_t n)
{
    int rc = raw_write(h, "data: ", 6);
    if (rc == 0)
        rc = raw_write(h, json, n);
    if (rc == 0)
        rc = raw_write(h, "\n\n", 2);
    if (rc == 0)
        rc = fcgi_http_flush(h);
    return rc;
}

int
fcgi_http_sse_comment(struct fcgi_http *h, const char *text)
{
    int rc = raw_write(h, ": ", 2);
    if (rc == 0 && text)
        rc = raw_write(h, text, strcspn(text, "\r\n"));
    if (rc == 0)
        rc = raw_write(h, "\n\n", 2);
    if (rc == 0)
        rc = fcgi_http_flush(h);
    return rc;
}

/* ---- Disconnect ---- */

bool
fcgi_http_poll_gone(struct fcgi_http *h)
{
    if (h->client_gone)
        return true;
    if (h->client_fd < 0)
        return false;
    struct pollfd p = {.fd = h->client_fd, .events = POLLIN | POLLRDHUP};
    int n;
    do {
        n = poll(&p, 1, 0);
    } while (n < 0 && errno == EINTR);
    if (n > 0 && (p.revents & (POLLIN | POLLRDHUP | POLLHUP | POLLERR))) {
        h->client_gone = true;
        return true;
    }
    return false;
}

/*
 * fcgi_http: one HTTP exchange as the handlers see it. The request side is plain data copied out
 * of the FastCGI parameters (valid until fcgi_http_fini); the response side goes through an ops
 * seam so that handlers run unchanged over libfcgi (main_fcgi.c: FCGX_PutStr / FCGX_FFlush) and
 * over a memory buffer in unit tests. Everything here is for the one thread serving the request.
 *
 * Response rules (FASTCGI.md): a CGI "Status:" line and headers, never Content-Length or
 * Transfer-Encoding (the web server frames the body); SSE responses send Cache-Control: no-cache
 * and X-Accel-Buffering: no, and every event is flushed at once. A failed write or flush means the
 * client is gone: h->client_gone is set and every later write fails fast with -EPIPE.
 * FCGX_PutStr may report success on a dead stream; only the flush tells, so callers flush after
 * each event. CORS headers are added to every response when conf->cors_origin is set.
 */
#ifndef FCGI_HTTP_H
#define FCGI_HTTP_H

#include <stdbool.h>
#include <stddef.h>

struct fcgi_conf;
struct json_object;

struct fcgi_http_ops {
    /* Appends n bytes to the response. Returns 0 or a negative errno. */
    int (*write)(void *io, const void *data, size_t n);
    /* Pushes buffered bytes to the web server. Returns 0 or a negative errno (-EPIPE). */
    int (*flush)(void *io);
};

struct fcgi_http {
    /* ---- Request (owned by the struct, freed by fcgi_http_fini) ---- */
    char *method;        /* "GET", "POST", ... */
    char *path;          /* REQUEST_URI without "?query", base path stripped, e.g. "/v1/models" */
    char *authorization; /* HTTP_AUTHORIZATION, or NULL */
    char *origin;        /* HTTP_ORIGIN, or NULL */
    char *content_type;  /* CONTENT_TYPE, or NULL */
    char *body;          /* body_len bytes plus a NUL, or NULL when none was read */
    size_t body_len;
    int client_fd; /* the FastCGI connection: POLLIN|POLLRDHUP on it means the client left (never
                      read it); -1 when unknown */

    /* ---- Response ---- */
    const struct fcgi_http_ops *ops;
    void *io;
    const struct fcgi_conf *conf; /* CORS origin */
    int status;                   /* the status sent, 0 before fcgi_http_begin */
    bool headers_sent;
    bool client_gone; /* a write or flush failed, or fcgi_http_poll_gone saw the client leave */
};

/* Zeroes h and sets client_fd -1, ops, io and conf. */
void fcgi_http_init(struct fcgi_http *h, const struct fcgi_http_ops *ops, void *io,
                    const struct fcgi_conf *conf);
/* Frees the request strings and body. */
void fcgi_http_fini(struct fcgi_http *h);

/* Sends "Status: <status> <reason>", Content-Type, the CORS headers, extra_headers (NULL or
 * complete "Name: value\r\n" lines) and the blank line. Only once per request. sse: also
 * Cache-Control: no-cache and X-Accel-Buffering: no. Returns 0, -EALREADY (headers already sent)
 * or -EPIPE (client gone). */
int fcgi_http_begin(struct fcgi_http *h, int status, const char *content_type, bool sse,
                    const char *extra_headers);

/* Body bytes (after begin) and a flush. Return 0 or -EPIPE (client gone). */
int fcgi_http_write(struct fcgi_http *h, const void *data, size_t n);
int fcgi_http_flush(struct fcgi_http *h);

/* A whole JSON response: begin(status, "application/json") + the object serialised + flush.
 * Borrows obj. Returns as fcgi_http_write. */
int fcgi_http_send_json(struct fcgi_http *h, int status, struct json_object *obj);

/* A whole OpenAI error response {"error": {"message", "type", "param", "code"}} (param and code
 * null when NULL). retry_after_s > 0 adds a Retry-After header. When headers were already sent
 * (a stream is running) it writes nothing and returns -EALREADY: streams report errors as an SSE
 * event (fcgi_resp builds it). */
int fcgi_http_send_error(struct fcgi_http *h, int status, const char *type, const char *message,
                         const char *param, const char *code, int retry_after_s);

/* SSE: "data: <json>\n\n" then a flush; and a comment line ": <text>\n\n" then a flush (the
 * heartbeat). Return 0 or -EPIPE. */
int fcgi_http_sse_data(struct fcgi_http *h, const char *json, size_t n);
int fcgi_http_sse_comment(struct fcgi_http *h, const char *text);

/* Non-blocking check of client_fd for POLLIN|POLLRDHUP|POLLHUP|POLLERR: returns true (and sets
 * client_gone) when the client left; false when it is still there or client_fd is -1. */
bool fcgi_http_poll_gone(struct fcgi_http *h);

/* The reason phrase of a status ("OK", "Bad Request", ...; "Unknown" otherwise). */
const char *fcgi_http_reason(int status);

#endif

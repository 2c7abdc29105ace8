/*
 * fcgi_dump: --dump FILE (see fcgi_dump.h). Each record is serialised into one buffer ending in a
 * newline and written with one write(2) on an O_APPEND descriptor, so lines from the threads of
 * this process (the mutex) and from sibling processes (O_APPEND) never interleave.
 */
#include "fcgi/fcgi_dump.h"

#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_util.h"

struct fcgi_dump {
    int fd;
    pthread_mutex_t mu;
    bool error_logged;
};

int
fcgi_dump_open(const char *path, struct fcgi_dump **out)
{
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0600);
    if (fd < 0)
        return -errno;
    struct fcgi_dump *d = cm_xcalloc(1, sizeof(*d));
    d->fd = fd;
    pthread_mutex_init(&d->mu, NULL);
    *out = d;
    return 0;
}

void
fcgi_dump_close(struct fcgi_dump *d)
{
    if (!d)
        return;
    close(d->fd);
    pthread_mutex_destroy(&d->mu);
    free(d);
}

void
fcgi_dump_write(struct fcgi_dump *d, struct json_object *record)
{
    if (!d || !record)
        return;
    size_t n = 0;
    const char *s = json_object_to_json_string_length(record, JSON_C_TO_STRING_PLAIN, &n);
    char *line = malloc(n + 1);
    if (!line)
        return;
    memcpy(line, s, n);
    line[n] = '\n';
    pthread_mutex_lock(&d->mu);
    ssize_t w;
    do {
        w = write(d->fd, line, n + 1);
    } while (w < 0 && errno == EINTR);
    int err = w < 0 ? errno : (w != (ssize_t)(n + 1) ? EIO : 0);
    bool log_it = err && !d->error_logged;
    if (log_it)
        d->error_logged = true;
    pthread_mutex_unlock(&d->mu);
    if (log_it)
        CM_LOG(CM_LOG_ERROR, "dump write failed (further failures not logged): %s", strerror(err));
    free(line);
}

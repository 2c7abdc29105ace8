#include "common/cm_log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static enum cm_log_level g_level = CM_LOG_INFO;

void
cm_log_set_level(enum cm_log_level level)
{
    g_level = level;
}

int
cm_log_parse_level(const char *s, enum cm_log_level *out)
{
    static const char *names[] = {"debug", "info", "warn", "error", "off"};
    for (int i = 0; i < 5; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (enum cm_log_level)i;
            return 0;
        }
    }
    return -EINVAL;
}

void
cm_log_write(enum cm_log_level level, const char *file, int line, const char *fmt, ...)
{
    static const char *tags[] = {"DEBUG", "INFO", "WARN", "ERROR", "OFF"};
    if (level < g_level || level >= CM_LOG_OFF)
        return;
    char buf[2048];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);

    /* The module is the directory of the source file: "engine/gguf.c" -> "engine". */
    const char *base = strrchr(file, '/');
    const char *mod = file;
    int mod_len = 0;
    if (base) {
        const char *p = base;
        while (p > file && p[-1] != '/')
            p--;
        mod = p;
        mod_len = (int)(base - p);
        file = base + 1;
    }
    int n = snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %.*s %s:%d ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, tags[level], mod_len, mod, file, line);
    if (n < 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof(buf) - 2)
        len = sizeof(buf) - 2;
    buf[len++] = '\n';
    ssize_t w = write(2, buf, len);
    (void)w;
}

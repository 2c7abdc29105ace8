#include "common/cm_util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static void
oom(size_t n)
{
    fprintf(stderr, "fatal: out of memory allocating %zu bytes\n", n);
    abort();
}

void *
cm_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *
cm_xcalloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        oom(count * size);
    return p;
}

void *
cm_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom(n);
    return q;
}

char *
cm_xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = cm_xmalloc(n);
    memcpy(p, s, n);
    return p;
}

uint64_t
cm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int
cm_parse_long_arg(const char *prog, const char *what, const char *s, long lo, long hi, long *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "%s: %s must be an integer in [%ld, %ld], got '%s'\n", prog, what, lo, hi,
                s);
        return -EINVAL;
    }
    *out = v;
    return 0;
}

int
cm_parse_int_arg(const char *prog, const char *what, const char *s, long lo, long hi, int *out)
{
    long v = 0;
    int rc = cm_parse_long_arg(prog, what, s, lo, hi, &v);
    if (rc == 0)
        *out = (int)v;
    return rc;
}

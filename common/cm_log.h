/*
 * cm_log: one logging macro for every module.
 *
 * CM_LOG(level, fmt, ...) writes one line to stderr: UTC time, level, module (the file's
 * directory), file:line and the message, which should carry key=value pairs (`req=42 seq=7`). Lines
 * below the level set with cm_log_set_level() are dropped. Thread-safe: each line is written with
 * one write(2). Never log prompt or completion text at INFO or above, and never log from kernels or
 * per-token loops.
 */
#ifndef CM_LOG_H
#define CM_LOG_H

enum cm_log_level {
    CM_LOG_DEBUG = 0,
    CM_LOG_INFO = 1,
    CM_LOG_WARN = 2,
    CM_LOG_ERROR = 3,
    CM_LOG_OFF = 4,
};

#define CM_LOG(level, ...) cm_log_write((level), __FILE__, __LINE__, __VA_ARGS__)

/* Sets the lowest level written. Not thread-safe: call at start-up. */
void cm_log_set_level(enum cm_log_level level);

/* Parses "debug", "info", "warn", "error" or "off". Returns 0, or -EINVAL. */
int cm_log_parse_level(const char *s, enum cm_log_level *out);

void cm_log_write(enum cm_log_level level, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif

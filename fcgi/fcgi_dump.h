/*
 * fcgi_dump: --dump FILE, one JSON object per line for each generation request: the request as
 * received and a synthesized response record. The file is opened O_APPEND|O_CREAT with mode 0600
 * (an existing file keeps its content; its mode is not widened) and shared by every thread and,
 * through O_APPEND and one write(2) per line, by sibling worker processes. Thread-safe.
 *
 * Record (built by fcgi_gen): {"time": <unix seconds, float>, "id": "chatcmpl-...", "endpoint":
 * "/v1/chat/completions", "request": <the parsed request body>, "response": {"content": "...",
 * "tool_calls": [...], "finish_reason": "...", "stop_reason": "..." or null, "tool_loop_capped":
 * false, "usage": {...}, "error": null or {...}}}.
 */
#ifndef FCGI_DUMP_H
#define FCGI_DUMP_H

struct fcgi_dump;
struct json_object;

/* Returns 0, or a negative errno from open(2) (the caller reports it and exits). */
int fcgi_dump_open(const char *path, struct fcgi_dump **out);
void fcgi_dump_close(struct fcgi_dump *d);

/* Appends record as one line (serialised plain, newline-terminated). Borrows record. Errors are
 * logged once per run and otherwise ignored: a full disk never fails a request. d NULL: no-op. */
void fcgi_dump_write(struct fcgi_dump *d, struct json_object *record);

#endif

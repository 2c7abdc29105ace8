/*
 * guard_toolcall: streaming parser for Hermes/Qwen-style tool calls in the assistant's text:
 *
 *     some content<tool_call>
 *     {"name": "get_weather", "arguments": {"city": "Paris"}}
 *     </tool_call>more content
 *
 * Text is fed as it is generated (valid UTF-8, any split); the parser reports events in stream
 * order through a callback:
 *
 *   CONTENT(text, len)      text outside blocks, including text between and after calls (e.g. the
 *                           newline between two blocks). A trailing partial "<tool_call" is held
 *                           back until the next byte decides it; guard_toolcall_finish() releases
 *                           it. Adjacent CONTENT events are not merged across feeds.
 *   CALL_BEGIN(index)       at the opener "<tool_call>". index counts every call begun in this
 *                           response, valid or not: 0, 1, 2, ... (the consumer renumbers the valid
 *                           ones for the client).
 *   CALL_NAME(index, name)  as soon as the top-level "name" string value is complete and valid:
 *                           1..GUARD_TOOLCALL_MAX_NAME bytes of printable ASCII without space
 *                           (0x21..0x7E) after JSON unescaping. At most once per call; not sent for
 *                           an invalid name (the call will end with ok == false).
 *   CALL_ARGS(index, text)  the raw text of the top-level "arguments" (or "parameters") value in
 *                           fragments as it arrives, whitespace included; the fragments of a call
 *                           concatenate to the value exactly as the model wrote it, and the end of
 *                           the value is found by an incremental JSON scan (strings, escapes,
 *                           nesting), not by waiting for the closer. Only after CALL_NAME: text
 * that arrives before the name is known (arguments written first) is sent in one fragment right
 * after CALL_NAME. When the value is a JSON string (arguments given as a string containing an
 * object), no fragments are streamed; one fragment with the decoded string follows at the closer if
 *                           the call is ok.
 *   CALL_END(index, ok)     at the closer "</tool_call>". The block between opener and closer is
 *                           parsed with json-c: ok only when it is one JSON object (whitespace
 *                           around it allowed) with exactly one "name" key holding a valid name and
 *                           exactly one of "arguments"/"parameters" holding an object or a string
 *                           that parses to an object, and the block is within max_block_bytes.
 *                           When ok, name and args (canonical form, see guard_json_canonical) are
 *                           set; otherwise both are NULL and error says why (static string, for a
 *                           log line). A call may have sent CALL_NAME and CALL_ARGS and still end
 *                           with ok == false: the consumer must drop it, never repair it.
 *
 * The closer is recognised only outside JSON strings, so "</tool_call>" inside an argument string
 * is text. A block with an unterminated string therefore runs to the end of the generation, where
 * guard_toolcall_finish() reports it as CALL_END(ok == false, error "unclosed"). A block longer
 * than max_block_bytes is invalid; the rest of it is swallowed (not stored) until its closer.
 * Whether a call is inside a block is available at any time (for the unterminated_tool_call
 * guard). To start the parse inside a forced call (tool_choice "required" or a named function,
 * where the prompt ends with the opener), feed the forced prefix first as if the model had written
 * it.
 *
 * The callback returns 0 to continue; any other value stops the parse at that event: the feed or
 * finish returns that value at once, and every later feed/finish returns -ECANCELED without
 * callbacks (use this when a guard trips). Event pointers are borrowed and valid only during the
 * callback.
 *
 * Memory: the open block is buffered (at most max_block_bytes + 12) plus at most 10 held-back
 * bytes. Thread context: a parser belongs to one thread (one response); the functions are
 * reentrant.
 */
#ifndef GUARD_TOOLCALL_H
#define GUARD_TOOLCALL_H

#include <stdbool.h>
#include <stddef.h>

#define GUARD_TOOLCALL_OPEN "<tool_call>"
#define GUARD_TOOLCALL_CLOSE "</tool_call>"
#define GUARD_TOOLCALL_MAX_NAME 256
#define GUARD_TOOLCALL_DEFAULT_MAX_BLOCK (64 * 1024)

enum guard_toolcall_event_type {
    GUARD_TOOLCALL_CONTENT,
    GUARD_TOOLCALL_CALL_BEGIN,
    GUARD_TOOLCALL_CALL_NAME,
    GUARD_TOOLCALL_CALL_ARGS,
    GUARD_TOOLCALL_CALL_END,
};

struct guard_toolcall_event {
    enum guard_toolcall_event_type type;
    int index;        /* CALL_*: the call's index (see above); -1 for CONTENT */
    const char *text; /* CONTENT, CALL_ARGS: the text, not NUL-terminated */
    size_t len;       /* its length (> 0) */
    const char *name; /* CALL_NAME, CALL_END when ok: NUL-terminated; NULL otherwise */
    bool ok;          /* CALL_END */
    const char *args; /* CALL_END when ok: canonical arguments, NUL-terminated; else NULL */
    size_t args_len;
    const char *error; /* CALL_END when !ok: "invalid json", "not an object", "bad name",
                          "bad arguments", "duplicate key", "too large", "unclosed" */
};

typedef int (*guard_toolcall_event_fn)(void *ctx, const struct guard_toolcall_event *ev);

struct guard_toolcall;

/* max_block_bytes: cap on the text between opener and closer (0: the default, 64 KiB).
 * Returns 0 and *out, or -ENOMEM. */
int guard_toolcall_new(size_t max_block_bytes, struct guard_toolcall **out);

/* NULL is a no-op. */
void guard_toolcall_free(struct guard_toolcall *p);

/* Parses text[0..n) (text may be NULL when n == 0), reporting events through cb(ctx, ev).
 * Returns 0, the callback's non-zero value, -ECANCELED after an earlier stop, or -ENOMEM
 * (the parser is then stopped as well). */
int guard_toolcall_feed(struct guard_toolcall *p, const char *text, size_t n,
                        guard_toolcall_event_fn cb, void *ctx);

/* End of generation: an open block ends as CALL_END(ok == false, "unclosed"); a held-back partial
 * opener is released as CONTENT. The parser is then back in its initial state apart from the
 * counters and the call index. Returns as for feed. */
int guard_toolcall_finish(struct guard_toolcall *p, guard_toolcall_event_fn cb, void *ctx);

/* Whether an opener has been seen and its closer not yet. */
bool guard_toolcall_in_call(const struct guard_toolcall *p);

/* Calls ended so far with ok == true, and with ok == false (including unclosed ones). */
int guard_toolcall_n_ok(const struct guard_toolcall *p);
int guard_toolcall_n_invalid(const struct guard_toolcall *p);

/* Canonical form of one JSON value json[0..n) (whitespace around it allowed, nothing else):
 * object keys sorted by byte value at every level, no insignificant whitespace, '/' not escaped,
 * numbers as written. Two values that differ only in key order or formatting give the same
 * string. *out is malloc'ed and NUL-terminated (caller frees). Returns 0, -EINVAL (not valid JSON,
 * or nesting deeper than json-c's default limit of 32), -ENOMEM. */
int guard_json_canonical(const char *json, size_t n, char **out);

#endif

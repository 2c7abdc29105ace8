/*
 * guard: the loop guards of one response (GUARDS.md). A per-response state object, built from a
 * configuration and the request's conversation history, is fed what the model produces:
 *   - content text deltas (valid UTF-8, the assistant's visible text: what guard_toolcall reports
 *     as CONTENT, never the text inside <tool_call> blocks), any split;
 *   - completed, valid tool calls: name and canonical arguments (guard_toolcall's CALL_END with
 *     ok == true; dropped calls are not fed);
 *   - the number of tokens generated so far inside the currently open <tool_call> block;
 * and answers each feed with GUARD_NONE ("continue") or the guard that tripped. Once tripped the
 * object stays tripped: every later feed returns the same guard without looking at its input.
 * What to do on a trip (stop emitting, CANCEL naming guard_name(id), finish_reason "length",
 * stop_reason, tool_loop_capped = guard_is_tool_loop(id)) is the caller's; a call whose feed
 * trips must not be emitted.
 *
 * The guards and their exact rules (the configured value in brackets; 0 disables the guard):
 *   name_run_cap [N = 8, 0 or 1..1024]
 *       the N-th call in a row with the same function name in this response trips; a different
 *       name resets the run.
 *   identical_call [ring R = 4, 0 or 3..64]
 *       in this response, a call identical to the previous call, or a call that is the 3rd
 *       identical one among the last R calls (itself included).
 *   repeated_call_history [ring R = 8, 0 or 6..64]
 *       over the calls of the history's assistant messages followed by this response's, in
 *       order: a call that makes 5 identical in a row, or the 6th identical among the last R
 *       (itself included).
 *   tool_call_cap [N = 12, 0 or 1..1024]
 *       the (N+1)-th call of this response trips.
 *   permanent_failure [1, 0 or 1]
 *       the call is identical to, or has the same name and the same primary argument as, a
 *       history call whose tool result (matched by tool_call_id) contains, case-insensitively,
 *       "command not found", "no such file or directory", "permission denied", "file exists" or
 *       "invalid argument". Primary argument: the string value of "path", else "file_path", else
 *       "filename"; else, for a shell-like call (arguments with a "command" or "cmd" member that
 *       is a string, or an array whose first element is a string), the first white-space
 *       separated word of the command.
 *   line_repeat [N = 4, 0 or 2..64]
 *       over a window of the last 8 KiB of content outside fenced code: a completed line whose
 *       trimmed length is over 15 characters and that holds a letter, digit or non-ASCII
 *       character, normalised (ASCII lower case, runs of white space as one space, trimmed),
 *       occurring N times among the window's completed lines; or, at each end of a word (a
 *       white-space byte after a non-white-space byte), the last 30 bytes before it (moved back
 *       to a character boundary), when they hold a letter, digit or non-ASCII character,
 *       occurring N times without overlap in the ASCII-lower-cased window. Fenced code (the
 *       ``` or ~~~ fence lines and the lines between them) never enters the window: repeated
 *       code is normal (GUARDS.md's look-alikes). Lines of symbols only (table separators,
 *       rules) are layout, not loops.
 *   sentence_loop [J = 0.55, 0 or a similarity in (0, 1]]
 *       sentences are cut at . ! ? : followed by white space, at a blank line, at a closing code
 *       fence, or at 1024 pending bytes; text inside fenced code (and the fence lines) is
 *       skipped. A sentence is normalised (ASCII lower case, every run of ASCII characters that
 *       are not letters or digits as one space, trimmed); one of at least 24 normalised
 *       characters and 3 words becomes the set of hashes of its word bigrams, is compared
 *       (Jaccard) with a ring of the last 16 such sentences, then enters the ring. It trips when
 *       it is at least J similar to 2 or more of them (the third near-repeat). A sentence still
 *       pending when the response ends is never checked (nothing is left to stop).
 *   unterminated_tool_call [N = 1024, 0 or 1..1000000]
 *       more than N tokens inside one open <tool_call> block.
 *   token_loop [R = 0 (off), 0 or 2..16; 3 when switched on]
 *       engine side, see guard_token_loop_check(); R is the number of repeats.
 * When one call trips several tool-loop guards the first in this order is reported:
 * permanent_failure, identical_call, repeated_call_history, name_run_cap, tool_call_cap.
 * Call identity is (name, canonical arguments) compared through a 128-bit hash of both; history
 * arguments are canonicalised with guard_json_canonical (arguments that are not valid JSON are
 * compared as written). Content verdicts do not depend on how the text is split into feeds.
 *
 * Configuration: struct guard_config holds the master switch and one value per guard, all set
 * from GUARDS.md by guard_config_init; guard_config_set parses "key = value" pairs of the worker's
 * flags and config file (key = the guard name); guard_config_override applies a request's
 * "guards" object, which may only lower or disable a value (token_loop excepted: GUARDS.md lets a
 * request enable it). With enabled == false (--no-guards) no guard runs, token_loop included, and
 * no request can turn one on.
 *
 * Memory: guard_new allocates everything the object needs (about 100 KiB); feeds never allocate
 * and cannot fail. Thread context: a guard object belongs to one thread (one response); the
 * config functions and the name tables are pure and safe from any thread.
 */
#ifndef GUARD_H
#define GUARD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cm_chat_msg;
struct json_object;

/* The guards, in the order of GUARDS.md's tables. guard_name() gives the stop_reason / config key /
 * metric label of each; the ids 0..GUARD_N-1 are the list of guards (e.g. to pre-create the
 * llm_guard_trips_total{guard} series). */
enum guard_id {
    GUARD_NONE = -1, /* "continue" */
    GUARD_NAME_RUN_CAP = 0,
    GUARD_IDENTICAL_CALL,
    GUARD_REPEATED_CALL_HISTORY,
    GUARD_TOOL_CALL_CAP,
    GUARD_PERMANENT_FAILURE,
    GUARD_LINE_REPEAT,
    GUARD_SENTENCE_LOOP,
    GUARD_UNTERMINATED_TOOL_CALL,
    GUARD_TOKEN_LOOP,
    GUARD_N /* number of guards */
};

/* Defaults (GUARDS.md) */
#define GUARD_DEFAULT_NAME_RUN_CAP 8
#define GUARD_DEFAULT_IDENTICAL_CALL 4
#define GUARD_DEFAULT_REPEATED_CALL_HISTORY 8
#define GUARD_DEFAULT_TOOL_CALL_CAP 12
#define GUARD_DEFAULT_PERMANENT_FAILURE 1
#define GUARD_DEFAULT_LINE_REPEAT 4
#define GUARD_DEFAULT_SENTENCE_LOOP 0.55
#define GUARD_DEFAULT_UNTERMINATED_TOOL_CALL 1024
#define GUARD_DEFAULT_TOKEN_LOOP 0
#define GUARD_TOKEN_LOOP_REPEATS 3 /* the repeat count when token_loop is switched on */

/* Fixed parts of the rules */
#define GUARD_LINE_WINDOW_BYTES 8192
#define GUARD_LINE_MIN_CHARS 16 /* trimmed length over 15 */
#define GUARD_PHRASE_BYTES 30
#define GUARD_SENTENCE_RING 16
#define GUARD_SENTENCE_MAX_BYTES 1024
#define GUARD_SENTENCE_MIN_CHARS 24
#define GUARD_SENTENCE_MIN_WORDS 3
#define GUARD_SENTENCE_MIN_HITS 2
#define GUARD_CALL_RING_MAX 64
#define GUARD_TOKEN_LOOP_MIN_PERIOD 2
#define GUARD_TOKEN_LOOP_MAX_PERIOD 64
#define GUARD_TOKEN_LOOP_EVERY 16
#define GUARD_TOKEN_LOOP_START 48

/* The configuration. value[GUARD_SENTENCE_LOOP] is a similarity in (0, 1]; every other value is
 * an integer count or ring size (see the top of this file for the valid ranges); 0 disables. */
struct guard_config {
    bool enabled; /* master switch; false (--no-guards): every guard off, token_loop included */
    double value[GUARD_N];
};

/* ---- Names ---- */

/* The stop_reason / config key / metric label of id ("name_run_cap", ...), or NULL for an id out
 * of range (GUARD_NONE included). Static strings. */
const char *guard_name(enum guard_id id);

/* The id of a guard name (exact, case-sensitive). Returns 0 and *out, or -ENOENT. */
int guard_from_name(const char *name, enum guard_id *out);

/* Whether id is a tool-loop guard (tool_loop_capped = true): name_run_cap, identical_call,
 * repeated_call_history, tool_call_cap, permanent_failure. False for GUARD_NONE. */
bool guard_is_tool_loop(enum guard_id id);

/* ---- Configuration ---- */

/* Sets c to the defaults of GUARDS.md with enabled = true. */
void guard_config_init(struct guard_config *c);

/* Whether guard id runs under c: c->enabled and its value is not 0. */
bool guard_config_active(const struct guard_config *c, enum guard_id id);

/* The value of guard id as an integer when it runs under c (guard_config_active), else 0: e.g.
 * the n_repeats the engine passes to guard_token_loop_check. For sentence_loop, use value[]. */
int guard_config_int(const struct guard_config *c, enum guard_id id);

/* Sets one value from the text of a flag or config-file value: key is a guard name (the worker's
 * --guard-<name> N flag uses the name with '-' for '_'; both spellings are accepted), value an
 * integer ("8", "0") or, for sentence_loop, a decimal number ("0.55"); surrounding white space is
 * ignored. The key "guards" with value on/off/true/false/1/0 sets the master switch. On error c is
 * unchanged and, when err is not NULL, a message naming the key and value is written there
 * (NUL-terminated, truncated to err_len). Returns 0, -ENOENT (unknown key), -EINVAL (bad or
 * out-of-range value). Any thread. */
int guard_config_set(struct guard_config *c, const char *key, const char *value, char *err,
                     size_t err_len);

/* Applies a request's "guards" object (borrowed) to c, a copy of the server's configuration.
 * Each key must be a guard name and each value a number (an integer except for sentence_loop) or
 * false (= 0). A value may only lower the server's value or disable the guard (0); raising it, or
 * giving a non-zero value to a guard that is off, is an error, except that token_loop may be
 * switched on by a request (GUARDS.md) when the master switch is on. With c->enabled false the
 * values are still validated but nothing can be turned on. Validation happens before anything is
 * changed: on error c is unchanged and a message for a 400 reply naming the key and the value
 * (e.g. "guards.name_run_cap: 9 is above the server's 8; a request may only lower or disable a
 * guard") is written to err. Returns 0 or -EINVAL (also when o is not an object). Any thread. */
int guard_config_override(struct guard_config *c, const struct json_object *o, char *err,
                          size_t err_len);

/* ---- The per-response object ---- */

struct guard;

/* Builds the guards of one response. cfg is copied. history[0..n_history) is the request's
 * messages (borrowed for the call only; NULL when n_history is 0): the assistant messages'
 * tool_calls (in order) seed repeated_call_history, and the role "tool" messages whose
 * tool_call_id names one of those calls and whose content holds a failure phrase seed
 * permanent_failure. Returns 0 and *out, -EINVAL (NULL cfg/out, n_history < 0, NULL history with
 * n_history > 0), -ENOMEM. */
int guard_new(const struct guard_config *cfg, const struct cm_chat_msg *history, int n_history,
              struct guard **out);

/* NULL is a no-op. */
void guard_free(struct guard *g);

/* Content text[0..n) (valid UTF-8, any split; text may be NULL when n is 0): line_repeat and
 * sentence_loop. Returns GUARD_NONE or the guard that tripped (this feed or earlier). */
enum guard_id guard_feed_text(struct guard *g, const char *text, size_t n);

/* One completed valid tool call of this response: name (NUL-terminated) and its canonical
 * arguments args[0..args_len) (guard_toolcall's CALL_END text; borrowed). The tool-loop guards.
 * Returns GUARD_NONE or the guard that tripped; on a trip by this call, the call must not be
 * emitted. */
enum guard_id guard_feed_call(struct guard *g, const char *name, const char *args, size_t args_len);

/* The number of tokens generated so far inside the currently open <tool_call> block (the caller
 * counts from the opener; 0 when no block is open): unterminated_tool_call. Returns GUARD_NONE or
 * the guard that tripped. */
enum guard_id guard_feed_call_tokens(struct guard *g, int n_tokens);

/* The guard that tripped, or GUARD_NONE. */
enum guard_id guard_tripped(const struct guard *g);

/* ---- token_loop (engine side) ---- */

/* Whether the output token ids[0..n) end in a block of period 2..64 tokens repeated n_repeats
 * times in a row. The check runs only at n >= 48 and n a multiple of 16 (call it after every
 * output token; it returns false in between); n_repeats < 2 (token_loop off) always gives false.
 * Pure; at most about 2100 * (n_repeats - 1) comparisons; any thread. */
bool guard_token_loop_check(const int32_t *ids, int n, int n_repeats);

#endif

/*
 * cm_wire: the engine <-> worker wire protocol: frames, an incremental frame reader for
 * non-blocking sockets, an output buffer, and an encoder and a strict decoder for every message.
 * No sockets are opened and no threads are started here; nothing is logged.
 *
 * ---- Frames ----
 * A SOCK_STREAM Unix socket carries frames back to back. Each frame is a 24-byte header followed by
 * `len` payload bytes. All integers little-endian:
 *
 *   off  size  field
 *     0   u32  magic    0x574D4C4C, the bytes "LLMW"
 *     4   u16  version  CM_WIRE_VERSION (1)
 *     6   u16  type     enum cm_wire_type (1..10)
 *     8   u32  flags    none are defined in version 1: must be 0
 *    12   u32  len      payload bytes, <= the receiver's max_payload
 *    16   u64  req_id   request id (see "Conversation")
 *    24        payload
 *
 * A reader checks the header before waiting for the payload: a wrong magic (detected from the first
 * byte that differs), version, type or non-zero flags is -EPROTO; len over max_payload is
 * -EMSGSIZE, decided from the header alone. max_payload is per endpoint (default
 * CM_WIRE_DEFAULT_MAX_PAYLOAD, settable between CM_WIRE_MIN_MAX_PAYLOAD and
 * CM_WIRE_MAX_MAX_PAYLOAD; the engine's --max-frame-bytes sets it and MODEL_INFO tells the worker,
 * whose encoder then refuses larger SUBMITs with -EMSGSIZE).
 *
 * ---- Payloads ----
 *   type            dir     encoding
 *   1  HELLO        w->e    JSON {"version": 1, "client": "llm-fcgi/0.1"}
 *   2  MODEL_INFO   e->w    JSON, see struct cm_wire_model_info
 *   3  SUBMIT       w->e    JSON, see struct cm_wire_submit
 *   4  ACCEPTED     e->w    binary: u32 prompt_tokens, u32 cached_tokens (exactly 8 bytes)
 *   5  TOKEN        e->w    binary: i32 id, u32 flags (CM_WIRE_TOKEN_*), f32 logprob, u16 n_top,
 *                           u16 text_len, n_top x (i32 id, f32 logprob), text_len text bytes
 *                           (exactly 16 + 8 n_top + text_len bytes), then with the flag
 *                           CM_WIRE_TOKEN_TOP_TEXT n_top x (u16 len, len bytes): the text of
 *                           each alternative
 *   6  DONE         e->w    JSON {"finish": "eos", "guard": "", "usage": {"prompt_tokens": 9,
 *                           "completion_tokens": 4, "cached_tokens": 0}, "timings": {"queue_ms":
 *                           0.1, "prefill_ms": 3.2, "decode_ms": 40.5}}
 *   7  ERROR        e->w    JSON {"code": "EAGAIN", "message": "queue full",
 *                           "retry_after_ms": 1000}
 *   8  CANCEL       w->e    JSON {"reason": "name_run_cap"}
 *   9  STATS        w->e    empty
 *   10 STATS_REPLY  e->w    JSON object (free-form counters and gauges)
 *
 * JSON payloads are one UTF-8 object (no NUL byte, nesting at most CM_WIRE_JSON_DEPTH, nothing
 * after it). Unknown fields are ignored; null counts as absent; a known field of the wrong type,
 * out of range or over a cap is -EINVAL with a message naming the field; a payload that is not a
 * JSON object (or, for binary payloads, whose length does not match) is -EPROTO. Integers must be
 * JSON integers (2.0 is not an integer); floats accept integers. Values beyond 64 bits saturate in
 * json-c before they are range-checked, so "seed" cannot tell 2^64 from 2^64-1. Floats are written
 * with the fewest digits (at most 9) that read back as the identical float; doubles with 17.
 * Strings are valid UTF-8 without NUL (lone-surrogate escapes arrive as U+FFFD). Names (guard,
 * cancel reason) are 1..64 bytes of [A-Za-z0-9_.:-]. Decoding the JSON tree costs json-c memory of
 * up to ~90 bytes per payload byte in the worst case (an array of one-digit ids), transiently,
 * inside the decode call.
 *
 * ---- Conversation ----
 * The worker opens a connection and sends HELLO (req_id 0); the engine answers MODEL_INFO (req_id
 * 0) or ERROR and closes. Then SUBMIT(req_id) -> ACCEPTED, TOKEN..., DONE; a rejected SUBMIT gets
 * one ERROR (EAGAIN queue full, E2BIG prompt longer than the context, EINVAL bad parameter) and no
 * DONE. CANCEL(req_id) may come at any time after SUBMIT; a DONE (finish cancelled unless another
 * finish was already sent) follows. A closed connection is a cancel. STATS (req_id 0) ->
 * STATS_REPLY at any time after HELLO. A frame the receiver rejects is answered with ERROR (EPROTO,
 * EMSGSIZE or EINVAL) and the connection is closed. The codec itself does not enforce this order or
 * the direction of a type (cm_wire_type_dir tells it); the engine and the worker do.
 *
 * ---- Ownership and threads ----
 * A reader and a buffer belong to one thread; every function is reentrant. Decoders write *out only
 * on success. Decoded structs with heap members (model_info, submit, stats_reply) are released with
 * their _fini; the others hold their strings inline and need no cleanup. Structs given to encoders
 * are borrowed and not modified. A frame's payload pointer borrows the reader's buffer.
 */
#ifndef CM_WIRE_H
#define CM_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/cm_chat.h"

struct json_object;

/* ---- Constants and caps ---- */

#define CM_WIRE_MAGIC 0x574D4C4Cu /* "LLMW" */
#define CM_WIRE_VERSION 1
#define CM_WIRE_HEADER_BYTES 24
#define CM_WIRE_DEFAULT_MAX_PAYLOAD (1u << 20)
#define CM_WIRE_MIN_MAX_PAYLOAD (16u << 10)
#define CM_WIRE_MAX_MAX_PAYLOAD (64u << 20)
#define CM_WIRE_JSON_DEPTH 16
#define CM_WIRE_ERR_LEN 160 /* a size that fits every decode message */

#define CM_WIRE_MAX_NAME 64            /* guard names, cancel reasons, client names */
#define CM_WIRE_MAX_MESSAGE 1024       /* ERROR message bytes */
#define CM_WIRE_MAX_MODEL_ID 256       /* MODEL_INFO model bytes */
#define CM_WIRE_MAX_SPECIAL_TEXT 128   /* MODEL_INFO special token text bytes */
#define CM_WIRE_MAX_SYSTEM (64u << 10) /* MODEL_INFO default_system bytes */
#define CM_WIRE_MAX_TOKEN_TEXT 1024    /* TOKEN text bytes */
#define CM_WIRE_MAX_TOP_LOGPROBS 20
#define CM_WIRE_MAX_STOP_IDS 64
#define CM_WIRE_MAX_LOGIT_BIAS 1024
#define CM_WIRE_MAX_PROMPT_IDS (1u << 20)
#define CM_WIRE_MAX_VOCAB (1 << 24) /* bound for token ids, n_vocab, n_ctx, max_tokens, top_k */
#define CM_WIRE_MAX_DEADLINE_MS (7u * 24 * 3600 * 1000)
#define CM_WIRE_MAX_PRIORITY 1000 /* priority in [-1000, 1000], higher first */
#define CM_WIRE_MAX_LOGIT_BIAS_ABS 100.0f
#define CM_WIRE_MAX_TOKEN_LOOP 16 /* SUBMIT token_loop repeats: 0 (off) or 2..16 (guard.h) */

enum cm_wire_type {
    CM_WIRE_HELLO = 1,
    CM_WIRE_MODEL_INFO = 2,
    CM_WIRE_SUBMIT = 3,
    CM_WIRE_ACCEPTED = 4,
    CM_WIRE_TOKEN = 5,
    CM_WIRE_DONE = 6,
    CM_WIRE_ERROR = 7,
    CM_WIRE_CANCEL = 8,
    CM_WIRE_STATS = 9,
    CM_WIRE_STATS_REPLY = 10,
};
#define CM_WIRE_TYPE_MAX 10

enum cm_wire_dir {
    CM_WIRE_DIR_NONE = 0, /* unknown type */
    CM_WIRE_TO_ENGINE = 1,
    CM_WIRE_TO_WORKER = 2,
};

enum cm_wire_finish {
    CM_WIRE_FINISH_EOS = 0,
    CM_WIRE_FINISH_LENGTH = 1,     /* max_tokens or the context is full */
    CM_WIRE_FINISH_STOP_TOKEN = 2, /* a token of stop_ids */
    CM_WIRE_FINISH_CANCELLED = 3,  /* CANCEL, a closed connection or shutdown */
    CM_WIRE_FINISH_DEADLINE = 4,
    CM_WIRE_FINISH_ERROR = 5,
};
#define CM_WIRE_FINISH_MAX 5

/* ---- Names ---- */

/* "HELLO", "SUBMIT", ...; "UNKNOWN" for any other value. Never NULL. */
const char *cm_wire_type_name(unsigned type);

/* Which side receives a type: CM_WIRE_TO_ENGINE, CM_WIRE_TO_WORKER, or CM_WIRE_DIR_NONE. */
enum cm_wire_dir cm_wire_type_dir(unsigned type);

/* "eos", "length", "stop_token", "cancelled", "deadline", "error"; "unknown" for other values.
 * cm_wire_finish_parse returns 0 or -EINVAL (NULL or unknown name). */
const char *cm_wire_finish_name(enum cm_wire_finish f);
int cm_wire_finish_parse(const char *name, enum cm_wire_finish *out);

/* ERROR codes travel as errno names. cm_wire_errno_name takes a negative (or positive) errno and
 * returns "EAGAIN", "E2BIG", ... or NULL when the value is not in the protocol's table (EAGAIN,
 * E2BIG, EPROTO, EMSGSIZE, EINVAL, ENOMEM, ECANCELED, ETIMEDOUT, ESHUTDOWN, EBUSY, ENOSPC, EIO,
 * EOPNOTSUPP, ERANGE, EBADMSG, ENOENT, EEXIST, EPERM, EACCES, ECONNRESET, EPIPE, EOVERFLOW, EDOM,
 * ENOSYS, ENOBUFS). cm_wire_errno_parse writes the negative errno; returns 0 or -EINVAL. */
const char *cm_wire_errno_name(int err);
int cm_wire_errno_parse(const char *name, int *out);

/* ---- Frame header ---- */

struct cm_wire_header {
    uint16_t version;
    uint16_t type;
    uint32_t flags;
    uint32_t len; /* payload bytes */
    uint64_t req_id;
};

/* Writes the 24 header bytes (magic included) for h, without checking it. */
void cm_wire_header_pack(const struct cm_wire_header *h, uint8_t out[CM_WIRE_HEADER_BYTES]);

/* Checks the first n bytes of a frame. Returns 1 and fills *out when n >= 24 and the header is
 * valid; 0 when n < 24 and the bytes so far agree with the magic; -EPROTO (magic, version, type or
 * flags) or -EMSGSIZE (len > max_payload). */
int cm_wire_header_check(const uint8_t *p, size_t n, uint32_t max_payload,
                         struct cm_wire_header *out);

/* A complete frame from the reader. payload points into the reader's buffer (see below). */
struct cm_wire_frame {
    uint16_t type;
    uint32_t flags;
    uint64_t req_id;
    uint32_t len;
    const uint8_t *payload; /* len bytes; NULL when len is 0 */
};

/* ---- Output buffer ---- */

/* Encoders append whole frames to data[len]; bytes [0, off) were already written out. The caller
 * bounds the buffer (cm_wire_buf_pending) and pauses its producer when it is over its limit. */
struct cm_wire_buf {
    uint8_t *data;
    size_t len;
    size_t off;
    size_t cap;
    uint32_t max_payload; /* encoders refuse larger payloads with -EMSGSIZE */
};

/* max_payload 0 means CM_WIRE_DEFAULT_MAX_PAYLOAD. Returns 0 or -EINVAL (outside
 * [CM_WIRE_MIN_MAX_PAYLOAD, CM_WIRE_MAX_MAX_PAYLOAD]). Allocates nothing. */
int cm_wire_buf_init(struct cm_wire_buf *b, uint32_t max_payload);
void cm_wire_buf_fini(struct cm_wire_buf *b);

/* Bytes encoded but not yet written out, and where they start (valid until the next append). */
size_t cm_wire_buf_pending(const struct cm_wire_buf *b);
const uint8_t *cm_wire_buf_head(const struct cm_wire_buf *b);

/* Marks n <= pending bytes as written (for callers that send by other means). */
void cm_wire_buf_consume(struct cm_wire_buf *b, size_t n);

/* Writes pending bytes to fd (send with MSG_NOSIGNAL on sockets, write otherwise), retrying EINTR,
 * until done or the fd would block. Returns the bytes written (0 when none were pending), or a
 * negative errno when nothing could be written (-EAGAIN: try again when writable; -EPIPE etc.). */
ssize_t cm_wire_buf_write_fd(struct cm_wire_buf *b, int fd);

/* ---- Reader ---- */

/* Bytes arrive by cm_wire_reader_feed or cm_wire_reader_read_fd; cm_wire_reader_next cuts frames.
 * The buffer grows on demand to at most 24 + max_payload bytes for read_fd (feed appends whatever
 * it is given) and shrinks back when drained. Errors are sticky: after one, next returns it again.
 */
struct cm_wire_reader {
    uint8_t *buf;
    size_t cap;
    size_t start; /* first unconsumed byte */
    size_t end;   /* one past the last byte received */
    uint32_t max_payload;
    int err;
};

/* max_payload as for cm_wire_buf_init. Returns 0 or -EINVAL. Allocates nothing. */
int cm_wire_reader_init(struct cm_wire_reader *r, uint32_t max_payload);
void cm_wire_reader_fini(struct cm_wire_reader *r);

/* Appends n bytes. Returns 0, -ENOMEM, or the sticky error. Invalidates earlier frame payloads. */
int cm_wire_reader_feed(struct cm_wire_reader *r, const void *data, size_t n);

/* One read(2) from fd into the buffer, at most what fits in 24 + max_payload bytes. Returns the
 * bytes read, 0 at end of file, -EAGAIN when nothing is available, -ENOBUFS when whole frames fill
 * the buffer (call next first), -ENOMEM, another negative errno from read, or the sticky error.
 * Retries EINTR. Invalidates earlier frame payloads. */
ssize_t cm_wire_reader_read_fd(struct cm_wire_reader *r, int fd);

/* Cuts the next frame: returns 1 and fills *out, 0 when more bytes are needed, or -EPROTO /
 * -EMSGSIZE (see cm_wire_header_check; sticky). out->payload stays valid until the next feed,
 * read_fd or fini; further next calls do not move it. */
int cm_wire_reader_next(struct cm_wire_reader *r, struct cm_wire_frame *out);

/* Bytes received but not yet cut into frames (a non-zero value at end of file is a truncated
 * frame). */
size_t cm_wire_reader_buffered(const struct cm_wire_reader *r);

/* ---- Messages ----
 * Every encoder validates its message exactly as the decoder does (-EINVAL, nothing appended; the
 * _validate functions give the message), then appends one frame with flags 0. Encoders return 0,
 * -EINVAL, -EMSGSIZE (payload over b->max_payload) or -ENOMEM; on failure b is unchanged.
 * Decoders take a frame of their type and return 0, -EINVAL (frame of another type; a field's
 * type, range or cap), -EPROTO (payload not of the message's encoding) or -ENOMEM, with a
 * NUL-terminated message in err (err_len bytes, may be NULL) naming the field. */

/* Appends a frame with any known type and a raw payload (len 0 allowed, payload may then be NULL).
 * Returns 0, -EINVAL (unknown type), -EMSGSIZE or -ENOMEM. */
int cm_wire_encode_frame(struct cm_wire_buf *b, enum cm_wire_type type, uint64_t req_id,
                         const void *payload, size_t len);

/* HELLO. version 1..65535; client 0..64 printable ASCII bytes. */
struct cm_wire_hello {
    uint16_t version;
    char client[CM_WIRE_MAX_NAME + 1];
};
int cm_wire_encode_hello(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_hello *m);
int cm_wire_decode_hello(const struct cm_wire_frame *f, struct cm_wire_hello *out, char *err,
                         size_t err_len);

/* MODEL_INFO. JSON: {"model": "...", "n_ctx": 8192, "n_vocab": 49152, "chat_family": "chatml",
 * "default_system": "..." (or absent), "special": {"bos": {"id": 1, "text": "<|im_start|>"},
 * "eos": {...}, "eot": {...}} (each optional), "capabilities": ["logprobs", ...],
 * "max_payload": 1048576}. Required: model (1..256 bytes), n_ctx and n_vocab
 * (1..CM_WIRE_MAX_VOCAB), max_payload (CM_WIRE_MIN_MAX_PAYLOAD..CM_WIRE_MAX_MAX_PAYLOAD).
 * chat_family is a cm_chat family name ("chatml", "llama3", "llama2"); an unknown or absent name
 * decodes as "unknown" (a newer engine may know families this worker does not). Special ids in [0,
 * n_vocab) or -1 (none, text then ""); unknown capability names are ignored. */
#define CM_WIRE_CAP_LOGPROBS (1u << 0)     /* "logprobs" */
#define CM_WIRE_CAP_PROMPT_IDS (1u << 1)   /* "prompt_ids" */
#define CM_WIRE_CAP_LOGIT_BIAS (1u << 2)   /* "logit_bias" */
#define CM_WIRE_CAP_PREFIX_CACHE (1u << 3) /* "prefix_cache" */
#define CM_WIRE_CAP_SPILL (1u << 4)        /* "spill" */

struct cm_wire_special {
    int32_t id; /* -1: none */
    char text[CM_WIRE_MAX_SPECIAL_TEXT + 1];
};

struct cm_wire_model_info {
    char model[CM_WIRE_MAX_MODEL_ID + 1];
    uint32_t n_ctx;
    uint32_t n_vocab;
    enum cm_chat_family chat_family;
    char *default_system; /* NULL: none; malloc'ed when decoded, borrowed when encoded */
    struct cm_wire_special bos, eos, eot;
    uint32_t caps; /* CM_WIRE_CAP_* */
    uint32_t max_payload;
};

/* Zeroes *m, sets the special ids to -1, chat_family unknown, max_payload the default. */
void cm_wire_model_info_init(struct cm_wire_model_info *m);
/* Frees default_system (decoded structs only) and re-inits. */
void cm_wire_model_info_fini(struct cm_wire_model_info *m);
int cm_wire_model_info_validate(const struct cm_wire_model_info *m, char *err, size_t err_len);
int cm_wire_encode_model_info(struct cm_wire_buf *b, uint64_t req_id,
                              const struct cm_wire_model_info *m);
int cm_wire_decode_model_info(const struct cm_wire_frame *f, struct cm_wire_model_info *out,
                              char *err, size_t err_len);

/* SUBMIT. JSON fields (defaults in brackets; exactly one of prompt / prompt_ids):
 *   "prompt": string (0..payload bytes of UTF-8)  |  "prompt_ids": [int >= 0, ...] (1..2^20)
 *   "max_tokens": 1..CM_WIRE_MAX_VOCAB (required)
 *   "temperature" [1] finite >= 0 (0: greedy); "top_k" [0] 0..CM_WIRE_MAX_VOCAB (0: off);
 *   "top_p" [1] in (0, 1]; "min_p" [0] in [0, 1]; "repetition_penalty" [1] finite > 0;
 *   "repeat_last_n" [64] 0..CM_WIRE_MAX_VOCAB; "presence_penalty", "frequency_penalty" [0] finite;
 *   "seed" [absent: the engine picks one] 0..2^64-1;
 *   "logit_bias" [{}] {"<id>": bias, ...}: ids written in decimal without sign or leading zeros,
 *       < CM_WIRE_MAX_VOCAB, bias finite in [-100, 100], at most CM_WIRE_MAX_LOGIT_BIAS, no id
 *       twice (the encoder rejects duplicates; JSON objects cannot carry them);
 *   "stop_ids" [[]] ids, at most CM_WIRE_MAX_STOP_IDS;
 *   "logprobs" [false]; "top_logprobs" [0] 0..20, non-zero only with logprobs;
 *   "deadline_ms" [0: none] 0..CM_WIRE_MAX_DEADLINE_MS, relative to the engine receiving SUBMIT;
 *   "priority" [0] -1000..1000, higher first; "add_special" [true] add BOS etc. when tokenizing
 *   the prompt; "parse_special" [false] match special-token text in the prompt;
 *   "token_loop" [0: off] 0 or 2..CM_WIRE_MAX_TOKEN_LOOP: the engine-side token_loop guard
 *       (GUARDS.md, guard_token_loop_check) with this many repeats; the worker sends its
 *       configured value (guard_config_int(cfg, GUARD_TOKEN_LOOP)). When the output ends in a
 *       block repeated that many times the engine finishes the sequence exactly like a CANCEL
 *       with reason "token_loop": DONE finish "cancelled", guard "token_loop", KV freed.
 * Floats must also fit a float. Token ids are only checked against CM_WIRE_MAX_VOCAB here; the
 * engine checks them against its vocabulary. */
struct cm_wire_logit_bias {
    int32_t id;
    float bias;
};

struct cm_wire_sampling {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    float repetition_penalty;
    int32_t repeat_last_n;
    float presence_penalty;
    float frequency_penalty;
    bool has_seed;
    uint64_t seed;
    uint32_t n_logit_bias;
    struct cm_wire_logit_bias *logit_bias; /* (n_logit_bias) */
};

struct cm_wire_submit {
    char *prompt;          /* NULL when prompt_ids are given; NUL-terminated */
    size_t prompt_len;     /* bytes, without the NUL */
    int32_t *prompt_ids;   /* (n_prompt_ids); NULL when prompt is given */
    uint32_t n_prompt_ids; /* 0 when prompt is given */
    uint32_t max_tokens;
    struct cm_wire_sampling sampling;
    uint32_t n_stop_ids;
    int32_t *stop_ids; /* (n_stop_ids) */
    bool logprobs;
    int32_t top_logprobs;
    uint32_t deadline_ms;
    int32_t priority;
    bool add_special;
    bool parse_special;
    int32_t token_loop; /* 0: off; else the repeats, 2..CM_WIRE_MAX_TOKEN_LOOP */
};

/* Sets every field to its default (no prompt, max_tokens 0: the caller must set both). */
void cm_wire_submit_init(struct cm_wire_submit *s);
/* For decoded structs (their arrays and prompt are malloc'ed): frees them and re-inits. */
void cm_wire_submit_fini(struct cm_wire_submit *s);
int cm_wire_submit_validate(const struct cm_wire_submit *s, char *err, size_t err_len);
int cm_wire_encode_submit(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_submit *s);
int cm_wire_decode_submit(const struct cm_wire_frame *f, struct cm_wire_submit *out, char *err,
                          size_t err_len);

/* ACCEPTED. cached_tokens <= prompt_tokens. */
struct cm_wire_accepted {
    uint32_t prompt_tokens;
    uint32_t cached_tokens;
};
int cm_wire_encode_accepted(struct cm_wire_buf *b, uint64_t req_id,
                            const struct cm_wire_accepted *m);
int cm_wire_decode_accepted(const struct cm_wire_frame *f, struct cm_wire_accepted *out, char *err,
                            size_t err_len);

/* TOKEN. id and top ids in [0, CM_WIRE_MAX_VOCAB); logprobs not NaN nor +inf (-inf allowed);
 * logprob and the top alternatives only with CM_WIRE_TOKEN_LOGPROB (otherwise logprob is 0 and
 * n_top 0); n_top 0..20; text is the token's raw bytes (possibly a partial UTF-8 sequence, possibly
 * containing NUL), kept NUL-terminated for convenience. Unknown flag bits are -EINVAL. */
#define CM_WIRE_TOKEN_LOGPROB (1u << 0) /* logprob and top alternatives are present */
#define CM_WIRE_TOKEN_SPECIAL (1u << 1) /* a control token (EOS...): not user-visible text */
/* The text of each top alternative follows the token's text: n_top x (u16 len, len bytes), in
 * all at most CM_WIRE_MAX_TOP_TEXT bytes of text. Only with CM_WIRE_TOKEN_LOGPROB. */
#define CM_WIRE_TOKEN_TOP_TEXT (1u << 2)
#define CM_WIRE_TOKEN_FLAGS_ALL                                                                    \
    (CM_WIRE_TOKEN_LOGPROB | CM_WIRE_TOKEN_SPECIAL | CM_WIRE_TOKEN_TOP_TEXT)
#define CM_WIRE_MAX_TOP_TEXT 4096

struct cm_wire_token {
    int32_t id;
    uint32_t flags;
    float logprob;
    uint32_t n_top;
    int32_t top_ids[CM_WIRE_MAX_TOP_LOGPROBS];
    float top_logprobs[CM_WIRE_MAX_TOP_LOGPROBS];
    /* With CM_WIRE_TOKEN_TOP_TEXT: alternative k's text is top_text[top_off[k] ..][top_len[k]]
     * (not NUL-terminated); top_off[k] + top_len[k] <= CM_WIRE_MAX_TOP_TEXT. */
    uint16_t top_off[CM_WIRE_MAX_TOP_LOGPROBS];
    uint16_t top_len[CM_WIRE_MAX_TOP_LOGPROBS];
    char top_text[CM_WIRE_MAX_TOP_TEXT];
    uint32_t text_len;
    char text[CM_WIRE_MAX_TOKEN_TEXT + 1];
};
int cm_wire_encode_token(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_token *m);
int cm_wire_decode_token(const struct cm_wire_frame *f, struct cm_wire_token *out, char *err,
                         size_t err_len);

/* DONE. finish is required; guard is "" or a name, non-empty only with CM_WIRE_FINISH_CANCELLED
 * (the CANCEL reason: a guard name, "client_disconnect" or "shutdown"); usage counts (optional,
 * default 0) with cached_tokens <= prompt_tokens; timings (optional, default 0) finite and >= 0. */
struct cm_wire_done {
    enum cm_wire_finish finish;
    char guard[CM_WIRE_MAX_NAME + 1];
    uint32_t prompt_tokens;
    uint32_t completion_tokens;
    uint32_t cached_tokens;
    double queue_ms;
    double prefill_ms;
    double decode_ms;
};
int cm_wire_encode_done(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_done *m);
int cm_wire_decode_done(const struct cm_wire_frame *f, struct cm_wire_done *out, char *err,
                        size_t err_len);

/* ERROR. code: a negative errno from the cm_wire_errno_name table (required); message 0..1024
 * bytes of UTF-8; retry_after_ms (optional, default 0) 0..CM_WIRE_MAX_DEADLINE_MS. */
struct cm_wire_error {
    int code;
    uint32_t retry_after_ms;
    char message[CM_WIRE_MAX_MESSAGE + 1];
};
int cm_wire_encode_error(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_error *m);
int cm_wire_decode_error(const struct cm_wire_frame *f, struct cm_wire_error *out, char *err,
                         size_t err_len);

/* CANCEL. reason: a name (required, non-empty). */
#define CM_WIRE_CANCEL_CLIENT_DISCONNECT "client_disconnect"
#define CM_WIRE_CANCEL_SHUTDOWN "shutdown"
struct cm_wire_cancel {
    char reason[CM_WIRE_MAX_NAME + 1];
};
int cm_wire_encode_cancel(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_cancel *m);
int cm_wire_decode_cancel(const struct cm_wire_frame *f, struct cm_wire_cancel *out, char *err,
                          size_t err_len);

/* STATS: an empty payload (any other length is -EPROTO). */
int cm_wire_encode_stats(struct cm_wire_buf *b, uint64_t req_id);
int cm_wire_decode_stats(const struct cm_wire_frame *f, char *err, size_t err_len);

/* STATS_REPLY: any JSON object. Encode borrows obj (json-c caches its serialization in it); the
 * decoded obj is owned by the struct (released by cm_wire_stats_reply_fini, or take it with
 * json_object_get before). */
struct cm_wire_stats_reply {
    struct json_object *obj;
};
void cm_wire_stats_reply_fini(struct cm_wire_stats_reply *m);
int cm_wire_encode_stats_reply(struct cm_wire_buf *b, uint64_t req_id, struct json_object *obj);
int cm_wire_decode_stats_reply(const struct cm_wire_frame *f, struct cm_wire_stats_reply *out,
                               char *err, size_t err_len);

#endif

/*
 * fuzz_wire: libFuzzer harness for the wire protocol (common/cm_wire). The first input byte picks
 * a mode:
 *   bit 7 clear: the rest is a byte stream fed to a reader (max payload CM_WIRE_MIN_MAX_PAYLOAD) in
 *                chunks of (byte & 0x7f) bytes (0: all at once); every complete frame is decoded
 *                with the decoder of its type, until the reader reports an error.
 *   bit 7 set:   the rest is the payload of one frame of type 1 + (byte & 0x7f) % 10, decoded
 *                directly (reaches the JSON decoders without a valid header first).
 * Every message that decodes is encoded again, decoded and encoded once more: both encodings must
 * succeed and be identical (the encoder accepts all the decoder accepts, and the round trip is
 * stable). Anything else is abort(). ASan/UBSan and LeakSanitizer watch memory.
 * Seeds (tests/fuzz/corpus/wire/): stream-*: conversations written by the encoder (HELLO,
 * MODEL_INFO, SUBMIT with text and with ids, ACCEPTED, TOKENs with and without logprobs, DONE,
 * ERROR, CANCEL, STATS, STATS_REPLY); payload-*: single payloads in payload mode.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "common/cm_wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
die(const char *what, const struct cm_wire_frame *f, int rc)
{
    fprintf(stderr, "fuzz_wire: %s (type %s, len %u, rc %d)\n", what, cm_wire_type_name(f->type),
            f->len, rc);
    abort();
}

/* Decodes f and encodes the message into b. Returns the decoder's result (0: encoded). */
static int
decode_encode(const struct cm_wire_frame *f, struct cm_wire_buf *b)
{
    char err[CM_WIRE_ERR_LEN];
    int rc = 0, enc = 0;
    err[0] = '\0';
    switch (f->type) {
    case CM_WIRE_HELLO: {
        struct cm_wire_hello m;
        if ((rc = cm_wire_decode_hello(f, &m, err, sizeof(err))) == 0)
            enc = cm_wire_encode_hello(b, f->req_id, &m);
        break;
    }
    case CM_WIRE_MODEL_INFO: {
        struct cm_wire_model_info m;
        if ((rc = cm_wire_decode_model_info(f, &m, err, sizeof(err))) == 0) {
            enc = cm_wire_encode_model_info(b, f->req_id, &m);
            cm_wire_model_info_fini(&m);
        }
        break;
    }
    case CM_WIRE_SUBMIT: {
        struct cm_wire_submit m;
        if ((rc = cm_wire_decode_submit(f, &m, err, sizeof(err))) == 0) {
            enc = cm_wire_encode_submit(b, f->req_id, &m);
            cm_wire_submit_fini(&m);
        }
        break;
    }
    case CM_WIRE_ACCEPTED: {
        struct cm_wire_accepted m;
        if ((rc = cm_wire_decode_accepted(f, &m, err, sizeof(err))) == 0)
            enc = cm_wire_encode_accepted(b, f->req_id, &m);
        break;
    }
    case CM_WIRE_TOKEN: {
        static struct cm_wire_token m;
        if ((rc = cm_wire_decode_token(f, &m, err, sizeof(err))) == 0)
            enc = cm_wire_encode_token(b, f->req_id, &m);
        break;
    }
    case CM_WIRE_DONE: {
        struct cm_wire_done m;
        if ((rc = cm_wire_decode_done(f, &m, err, sizeof(err))) == 0)
            enc = cm_wire_encode_done(b, f->req_id, &m);
        break;
    }
    case CM_WIRE_ERROR: {
        struct cm_wire_error m;
        if ((rc = cm_wire_decode_error(f, &m, err, sizeof(err))) == 0)
            enc = cm_wire_encode_error(b, f->req_id, &m);
        break;
    }
    case CM_WIRE_CANCEL: {
        struct cm_wire_cancel m;
        if ((rc = cm_wire_decode_cancel(f, &m, err, sizeof(err))) == 0)
            enc = cm_wire_encode_cancel(b, f->req_id, &m);
        break;
    }
    case CM_WIRE_STATS:
        if ((rc = cm_wire_decode_stats(f, err, sizeof(err))) == 0)
            enc = cm_wire_encode_stats(b, f->req_id);
        break;
    case CM_WIRE_STATS_REPLY: {
        struct cm_wire_stats_reply m = {NULL};
        if ((rc = cm_wire_decode_stats_reply(f, &m, err, sizeof(err))) == 0) {
            enc = cm_wire_encode_stats_reply(b, f->req_id, m.obj);
            cm_wire_stats_reply_fini(&m);
        }
        break;
    }
    default:
        die("the reader passed an unknown type", f, 0);
    }
    if (rc < 0 && (err[0] == '\0' || strlen(err) >= sizeof(err)))
        die("a rejection without a message", f, rc);
    if (rc < 0 && rc != -EINVAL && rc != -EPROTO && rc != -ENOMEM)
        die("an unexpected decoder error", f, rc);
    if (rc == 0 && enc != 0)
        die("the encoder refused a decoded message", f, enc);
    return rc;
}

/* The frame that b holds from offset off, cut by a reader as large as the encoder's cap. */
static struct cm_wire_frame
frame_at(const struct cm_wire_buf *b, size_t off)
{
    struct cm_wire_header h;
    struct cm_wire_frame f;
    const uint8_t *p = cm_wire_buf_head(b) + off;
    if (cm_wire_header_check(p, cm_wire_buf_pending(b) - off, b->max_payload, &h) != 1)
        abort();
    f.type = h.type;
    f.flags = h.flags;
    f.req_id = h.req_id;
    f.len = h.len;
    f.payload = h.len ? p + CM_WIRE_HEADER_BYTES : NULL;
    if (CM_WIRE_HEADER_BYTES + (size_t)h.len != cm_wire_buf_pending(b) - off)
        abort();
    return f;
}

static void
check_frame(const struct cm_wire_frame *f)
{
    struct cm_wire_buf b1, b2;
    if (cm_wire_buf_init(&b1, CM_WIRE_MAX_MAX_PAYLOAD) < 0 ||
        cm_wire_buf_init(&b2, CM_WIRE_MAX_MAX_PAYLOAD) < 0)
        abort();
    if (decode_encode(f, &b1) == 0) {
        struct cm_wire_frame f1 = frame_at(&b1, 0);
        if (decode_encode(&f1, &b2) != 0)
            die("a re-encoded message does not decode", f, 0);
        if (cm_wire_buf_pending(&b1) != cm_wire_buf_pending(&b2) ||
            memcmp(cm_wire_buf_head(&b1), cm_wire_buf_head(&b2), cm_wire_buf_pending(&b1)) != 0)
            die("encode(decode(encode(decode(x)))) differs from encode(decode(x))", f, 0);
    }
    cm_wire_buf_fini(&b1);
    cm_wire_buf_fini(&b2);
}

static void
stream_mode(const uint8_t *data, size_t size, size_t chunk)
{
    struct cm_wire_reader r;
    struct cm_wire_frame f;
    if (cm_wire_reader_init(&r, CM_WIRE_MIN_MAX_PAYLOAD) < 0)
        abort();
    if (chunk == 0)
        chunk = size;
    int rc = 0;
    for (size_t pos = 0; pos < size && rc >= 0; pos += chunk) {
        size_t n = size - pos < chunk ? size - pos : chunk;
        rc = cm_wire_reader_feed(&r, data + pos, n);
        if (rc < 0)
            break;
        while ((rc = cm_wire_reader_next(&r, &f)) == 1) {
            if (f.len > CM_WIRE_MIN_MAX_PAYLOAD || f.flags != 0 ||
                cm_wire_type_dir(f.type) == CM_WIRE_DIR_NONE)
                die("the reader passed a frame it should refuse", &f, 0);
            check_frame(&f);
        }
        if (rc < 0 && rc != -EPROTO && rc != -EMSGSIZE)
            die("an unexpected reader error", &f, rc);
    }
    cm_wire_reader_fini(&r);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    uint8_t mode = data[0];
    data++;
    size--;
    if (mode & 0x80) {
        if (size > CM_WIRE_MAX_MAX_PAYLOAD)
            return 0;
        struct cm_wire_frame f = {
            .type = (uint16_t)(1 + (mode & 0x7f) % CM_WIRE_TYPE_MAX),
            .flags = 0,
            .req_id = 42,
            .len = (uint32_t)size,
            .payload = size ? data : NULL,
        };
        check_frame(&f);
    } else {
        stream_mode(data, size, mode & 0x7f);
    }
    return 0;
}

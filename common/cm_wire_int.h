/*
 * cm_wire_int: helpers shared by the two halves of the wire module: cm_wire.c (names, header,
 * output buffer, reader) and cm_wire_msg.c (the message codecs). Not part of the contract.
 */
#ifndef CM_WIRE_INT_H
#define CM_WIRE_INT_H

#include <stdint.h>
#include <string.h>

#include "common/cm_wire.h"

/* ---- Little-endian helpers ---- */

static inline void
put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void
put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void
put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void
put_f32(uint8_t *p, float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    put_u32(p, u);
}

static inline uint16_t
get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t
get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t
get_u64(const uint8_t *p)
{
    return (uint64_t)get_u32(p) | ((uint64_t)get_u32(p + 4) << 32);
}

static inline float
get_f32(const uint8_t *p)
{
    uint32_t u = get_u32(p);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Appends a header for a frame of len payload bytes and reserves the payload; the caller writes len
 * bytes at *payload. Returns 0, -EMSGSIZE (len over b->max_payload) or -ENOMEM (b unchanged). */
int cm_wire_buf_begin_frame(struct cm_wire_buf *b, enum cm_wire_type type, uint64_t req_id,
                            size_t len, uint8_t **payload);

#endif

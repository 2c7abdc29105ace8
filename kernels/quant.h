/*
 * quant: the weight block layouts of GGUF files, shared by the CPU kernels (and later CUDA).
 *
 * Type ids are the GGUF/ggml tensor type numbers, so a tensor's type field maps directly onto
 * enum kern_dtype. Each quantized type stores a row of n elements as n / block_elems blocks laid
 * out back to back; every layout below is fixed by the file format and checked with a
 * static_assert. fp16 fields are raw IEEE half bits (convert with cm_fp16_to_f32). Dequantization
 * of block j of a row gives elements [j*block_elems, (j+1)*block_elems).
 */
#ifndef KERN_QUANT_H
#define KERN_QUANT_H

#include <assert.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum kern_dtype {
    KERN_DTYPE_F32 = 0,
    KERN_DTYPE_F16 = 1,
    KERN_DTYPE_Q4_0 = 2,
    KERN_DTYPE_Q4_1 = 3,
    KERN_DTYPE_Q5_0 = 6,
    KERN_DTYPE_Q5_1 = 7,
    KERN_DTYPE_Q8_0 = 8,
    KERN_DTYPE_Q8_1 = 9,
    KERN_DTYPE_Q2_K = 10,
    KERN_DTYPE_Q3_K = 11,
    KERN_DTYPE_Q4_K = 12,
    KERN_DTYPE_Q5_K = 13,
    KERN_DTYPE_Q6_K = 14,
    KERN_DTYPE_Q8_K = 15,
    KERN_DTYPE_BF16 = 30,
    KERN_DTYPE_COUNT = 40, /* ids at or above this are unknown */
};

#define KERN_QK 32    /* elements per block of the 32-element types */
#define KERN_QK_K 256 /* elements per super-block of the K-quants */
#define KERN_K_SCALE_SIZE 12

/* Q4_0: x = d * (q - 8), q in 0..15; low nibbles are elements 0..15, high nibbles 16..31. */
struct kern_block_q4_0 {
    uint16_t d;
    uint8_t qs[KERN_QK / 2];
};
static_assert(sizeof(struct kern_block_q4_0) == 18, "q4_0 block");

/* Q4_1: x = d * q + m, q in 0..15; nibble order as Q4_0. */
struct kern_block_q4_1 {
    uint16_t d;
    uint16_t m;
    uint8_t qs[KERN_QK / 2];
};
static_assert(sizeof(struct kern_block_q4_1) == 20, "q4_1 block");

/* Q5_0: x = d * (q - 16), q = nibble | (bit j of qh) << 4, element j (high nibbles: j = 16..31). */
struct kern_block_q5_0 {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[KERN_QK / 2];
};
static_assert(sizeof(struct kern_block_q5_0) == 22, "q5_0 block");

/* Q5_1: x = d * q + m, q as Q5_0. */
struct kern_block_q5_1 {
    uint16_t d;
    uint16_t m;
    uint8_t qh[4];
    uint8_t qs[KERN_QK / 2];
};
static_assert(sizeof(struct kern_block_q5_1) == 24, "q5_1 block");

/* Q8_0: x = d * q. */
struct kern_block_q8_0 {
    uint16_t d;
    int8_t qs[KERN_QK];
};
static_assert(sizeof(struct kern_block_q8_0) == 34, "q8_0 block");

/*
 * Q4_K: 8 sub-blocks of 32; x = d * sc[j] * q - dmin * mn[j], with 6-bit sc/mn packed in scales[12]
 * (j < 4: sc = scales[j] & 63, mn = scales[j+4] & 63; j >= 4: sc = (scales[j+4] & 0xF) |
 * ((scales[j-4] >> 6) << 4), mn = (scales[j+4] >> 4) | ((scales[j] >> 6) << 4)). qs holds
 * 64-element groups: 32 bytes, low nibbles sub-block 2g, high nibbles sub-block 2g+1.
 */
struct kern_block_q4_k {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[KERN_K_SCALE_SIZE];
    uint8_t qs[KERN_QK_K / 2];
};
static_assert(sizeof(struct kern_block_q4_k) == 144, "q4_k block");

/* Q5_K: as Q4_K plus a fifth bit per element: bit (2g) / (2g+1) of qh[l] for element l of group g.
 */
struct kern_block_q5_k {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[KERN_K_SCALE_SIZE];
    uint8_t qh[KERN_QK_K / 8];
    uint8_t qs[KERN_QK_K / 2];
};
static_assert(sizeof(struct kern_block_q5_k) == 176, "q5_k block");

/* Q6_K: 16 sub-blocks of 16; x = d * scales[j] * (q - 32), q = 4 low bits in ql | 2 high bits in
 * qh. */
struct kern_block_q6_k {
    uint8_t ql[KERN_QK_K / 2];
    uint8_t qh[KERN_QK_K / 4];
    int8_t scales[KERN_QK_K / 16];
    uint16_t d;
};
static_assert(sizeof(struct kern_block_q6_k) == 210, "q6_k block");

/* Per-type facts. name is the ggml spelling ("q4_1"). supported: the kernels can compute with it.
 */
struct kern_dtype_traits {
    const char *name;
    int block_elems;
    int block_bytes;
    bool supported;
};

/* Traits of a type id, or NULL when the id is unknown (including ids of removed ggml types). */
const struct kern_dtype_traits *kern_dtype_traits(uint32_t type);

/* Bytes of a row of n elements; 0 if n is not a multiple of the block size or the type is unknown.
 */
size_t kern_row_bytes(uint32_t type, int64_t n);

#endif

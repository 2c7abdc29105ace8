/*
 * cpu_int: internals shared by the CPU kernels (kernels/quant.c, kernels/cpu/) and their tests.
 *
 * Each ISA (scalar reference, AVX2, AVX-512) provides one struct kern_cpu_isa_ops: a table of
 * per-type operations (struct kern_cpu_type_ops, indexed by enum kern_dtype) plus the activation
 * quantizer. Tables are filled at compile time; the SIMD files are compiled with their ISA's flags
 * and only called after run-time detection. An entry left NULL in a SIMD table falls back to the
 * reference entry (kern_cpu_type_ops resolves this once per call).
 *
 * Quantized matmuls see weights in a "canonical" form per scale unit of 32 elements (16 for Q6_K):
 * unsigned bytes qc, a scale d and a min m, with x = d * (qc - off) + m. off is fixed per type
 * (Q4_0: 8, Q5_0: 16, Q8_0: 128 with qc = q ^ 0x80, Q6_K: 32, else 0) and m is 0 for the offset
 * types. The activation side is described in matmul.c (the spec at the top of that file).
 */
#ifndef KERN_CPU_INT_H
#define KERN_CPU_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kern.h"

/* ---- Reference dequantizers (kernels/quant.c) ---- */

void kern_cpu_dequant_f32_ref(const void *src, float *dst, int64_t n);
void kern_cpu_dequant_f16_ref(const void *src, float *dst, int64_t n);
void kern_cpu_dequant_bf16_ref(const void *src, float *dst, int64_t n);
void kern_cpu_dequant_q4_0_ref(const void *src, float *dst, int64_t n);
void kern_cpu_dequant_q4_1_ref(const void *src, float *dst, int64_t n);
void kern_cpu_dequant_q5_0_ref(const void *src, float *dst, int64_t n);
void kern_cpu_dequant_q5_1_ref(const void *src, float *dst, int64_t n);
void kern_cpu_dequant_q8_0_ref(const void *src, float *dst, int64_t n);
void kern_cpu_dequant_q4_k_ref(const void *src, float *dst, int64_t n);
void kern_cpu_dequant_q5_k_ref(const void *src, float *dst, int64_t n);
void kern_cpu_dequant_q6_k_ref(const void *src, float *dst, int64_t n);

/* The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block. */
void kern_cpu_k_scale_min(const uint8_t scales[KERN_K_SCALE_SIZE], int j, uint8_t *sc, uint8_t *mn);

/* ---- Quantized activations ---- */

/*
 * The activations of one matmul call, quantized once (layout documented in matmul.c). Arrays are
 * token-major. For float weight types only x is set.
 */
struct kern_cpu_act {
    int n_tok;
    int64_t n_in;
    int unit;        /* elements per scale unit: 32, or 16 for Q6_K */
    int64_t n_units; /* n_in / unit */
    int off;         /* the weight type's offset (see above) */
    const float *x;  /* (n_tok, n_in) f32, float weight types */
    int8_t *q;       /* (n_tok, n_in) */
    float *d;        /* (n_tok, n_units) activation scale of each unit's block */
    float *s;        /* (n_tok, n_units) d * sum of q over the unit */
    int32_t *corr;   /* (n_tok, n_units) -off * sum of q over the unit */
    int32_t *dcorr;  /* (n_tok, n_in / 4) -off * sum of q over each group of 4, or NULL when the
                        kernel does not use it (kern_cpu_type_ops.dcorr) */
    uint8_t *prep;   /* (n_tok, prep_stride) a small-batch kernel's own layout, or NULL */
    size_t prep_stride;
};

/* Quantizes the activation rows [t0, t1) of a into their slots (x is the f32 input, n_in per row).
 * blk is 32 (the 32-element weight types) or 256 (K-quants). Results are bit-identical for every
 * ISA. */
typedef void (*kern_cpu_act_quant_fn)(const float *x, struct kern_cpu_act *a, int blk, int t0,
                                      int t1);

void kern_cpu_act_quant_ref(const float *x, struct kern_cpu_act *a, int blk, int t0, int t1);

/* ---- Matmul work ---- */

/* One matmul call as seen by a kernel: rows [r0, r1) of w against all tokens of act. */
struct kern_cpu_mm {
    const struct kern_matrix *w;
    const struct kern_cpu_act *act;
    float *y; /* (n_tok, n_out) */
    int n_tok;
};

/* Per-thread scratch handed to the kernels: at least kern_cpu_mm_scratch_bytes(). 64-byte aligned.
 */
size_t kern_cpu_mm_scratch_bytes(int64_t n_in);

/* Computes y for rows [r0, r1) and every token. */
typedef void (*kern_cpu_rows_fn)(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1,
                                 void *scratch);

/* Converts one weight row to canonical form: qc[n] bytes, d and m per unit. */
typedef void (*kern_cpu_canon_fn)(const void *row, int64_t n, uint8_t *qc, float *d, float *m);

struct kern_cpu_type_ops {
    void (*dequant)(const void *src, float *dst, int64_t n);
    kern_cpu_canon_fn canon;
    kern_cpu_rows_fn rows;        /* small batches (n_tok < batch_min) or every batch */
    kern_cpu_rows_fn rows_batch;  /* large batches; NULL: rows */
    kern_cpu_rows_fn rows_packed; /* small batches from w->packed (kern_matrix_repack); or NULL */
    /* Optional re-layout of quantized activations for rows: bytes per token (64-aligned) and the
     * conversion of tokens [t0, t1) into act->prep. Set together with rows. */
    size_t (*prep_bytes)(int64_t n_in);
    void (*prep)(struct kern_cpu_act *a, int t0, int t1);
    bool dcorr;  /* rows reads act->dcorr (offset types) */
    int unit;    /* canonical scale unit (0: float type) */
    int act_blk; /* activation quantization block: 32 or 256 (0: f32) */
    int off;     /* canonical offset */
    bool has_min;
};

struct kern_cpu_isa_ops {
    enum kern_isa isa;
    const struct kern_cpu_type_ops *types; /* KERN_DTYPE_COUNT entries */
    kern_cpu_act_quant_fn act_quant;
    int batch_min; /* n_tok from which rows_batch is used */
    int row_align; /* rows per chunk handed to a kernel are a multiple of this (except the end) */
};

extern const struct kern_cpu_isa_ops kern_cpu_isa_ref;
extern const struct kern_cpu_isa_ops kern_cpu_isa_avx2;
extern const struct kern_cpu_isa_ops kern_cpu_isa_avx512;

/* The ops of the current ISA for a type, with NULL entries filled from the reference table.
 * Returns NULL when the type is unsupported. Stable until kern_cpu_set_isa. */
const struct kern_cpu_type_ops *kern_cpu_type_ops(enum kern_dtype type);

/* The ops of a given ISA (the tests compare them); same rules. */
const struct kern_cpu_type_ops *kern_cpu_type_ops_isa(enum kern_isa isa, enum kern_dtype type);

const struct kern_cpu_isa_ops *kern_cpu_isa_ops(enum kern_isa isa);

/* ---- Packed decode layout (pack.c, read by the AVX-512 rows_packed kernels) ----
 *
 * Rows in groups of KERN_PACK_ROWS = 16 (the last group padded with zero rows), group g at
 * g * kern_cpu_pack_group_bytes(), one sequential stream: its nb = n_in / 32 blocks one after the
 * other, kern_cpu_pack_block_bytes() apart. A block holds the quant vectors: Q4_0/Q4_1 four of 64
 * bytes, dword l of vector i = nibble bytes 4i..4i+3 of row l's block (low nibble element 4i + e,
 * high nibble element 16 + 4i + e); Q8_0 eight, dword l of vector k = quants 4k..4k+3 of row l's
 * block xor 0x80 (the canonical qc). Then 32 bytes of fp16 scales d (row l at 2l), then for Q4_1
 * 32 bytes of fp16 mins m. */
#define KERN_PACK_ROWS 16

/* Bytes of one packed block of 16 rows, or 0 when the type has no packed layout. */
size_t kern_cpu_pack_block_bytes(enum kern_dtype type);

/* Bytes of one packed group of 16 rows, or 0 when the type has no packed layout. */
size_t kern_cpu_pack_group_bytes(enum kern_dtype type, int64_t n_in);

/* ---- Pool scratch (pool.c) ---- */

/* A 64-byte aligned buffer of at least bytes owned by the pool, grown as needed (contents are not
 * kept). Returns 0 or -ENOMEM (the old buffer stays valid). Only the pool's driving thread. */
int kern_cpu_pool_scratch(struct kern_pool *pool, size_t bytes, void **out);

/* Workers currently asleep on the futex (tests use it to reach the sleeping state). */
int kern_cpu_pool_n_sleeping(struct kern_pool *pool);

/* ---- Reference canonical forms and kernels (dot_ref.c) ---- */

void kern_cpu_canon_q4_0_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m);
void kern_cpu_canon_q4_1_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m);
void kern_cpu_canon_q5_0_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m);
void kern_cpu_canon_q5_1_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m);
void kern_cpu_canon_q8_0_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m);
void kern_cpu_canon_q4_k_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m);
void kern_cpu_canon_q5_k_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m);
void kern_cpu_canon_q6_k_ref(const void *row, int64_t n, uint8_t *qc, float *d, float *m);

/* Quantized weights: canonical form then the integer dot per unit (the definition of the result).
 */
void kern_cpu_rows_quant_ref(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1, void *scratch);
/* Float weights: dequantized row, f32 products summed in order. */
void kern_cpu_rows_float_ref(const struct kern_cpu_mm *mm, int64_t r0, int64_t r1, void *scratch);

#endif

/*
 * pack: kern_matrix_repack, the load-time re-layout of Q4_0 / Q4_1 / Q8_0 weights into groups of
 * 16 interleaved rows for the AVX-512 decode kernels (layout in cpu_int.h).
 *
 * With rows on the 16 dword lanes a decode kernel does one vpdpbusd for 16 rows x 4 elements with
 * the activation dword broadcast, reads each group as one sequential stream, and the 16 outputs of
 * a group leave the canonical tree of matmul.c in one vector: no per-row lane merges or horizontal
 * sums. The layout is plain bytes, built once here in portable C; the f32 order of the kernels
 * reading it is that of the AVX-512 batch kernel, so results do not depend on the packing.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_int.h"
#include "kernels/kern.h"

/* Quant bytes per block and row in the packed layout (0: no packed layout). */
static int
pack_quant_bytes(enum kern_dtype type)
{
    switch (type) {
    case KERN_DTYPE_Q4_0:
    case KERN_DTYPE_Q4_1:
        return 16;
    case KERN_DTYPE_Q8_0:
        return 32;
    default:
        return 0;
    }
}

size_t
kern_cpu_pack_block_bytes(enum kern_dtype type)
{
    int qb = pack_quant_bytes(type);
    if (!qb)
        return 0;
    return (size_t)qb * KERN_PACK_ROWS + (type == KERN_DTYPE_Q4_1 ? 64 : 32);
}

size_t
kern_cpu_pack_group_bytes(enum kern_dtype type, int64_t n_in)
{
    size_t bb = kern_cpu_pack_block_bytes(type);
    if (!bb || n_in % 32)
        return 0;
    return ((size_t)(n_in / 32) * bb + 63) & ~(size_t)63; /* groups start on cache lines */
}

/* Packs the 16 rows starting at row r0 (rows past n_out stay zero) into group g. */
static void
pack_group(const struct kern_matrix *w, int64_t r0, uint8_t *g)
{
    const int qb = pack_quant_bytes(w->type);
    const int q8 = w->type == KERN_DTYPE_Q8_0, q41 = w->type == KERN_DTYPE_Q4_1;
    const int qoff = q41 ? 4 : 2; /* the quants follow d (and m) */
    const int64_t nb = w->n_in / 32;
    const int64_t bstride = (int64_t)kern_cpu_pack_block_bytes(w->type);
    for (int l = 0; l < KERN_PACK_ROWS && r0 + l < w->n_out; l++) {
        const uint8_t *row = (const uint8_t *)w->data + (r0 + l) * (int64_t)w->row_bytes;
        int bs = (int)(w->row_bytes / (size_t)nb);
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bs;
            uint8_t *qv = g + b * bstride, *dv = qv + qb * KERN_PACK_ROWS, *mv = dv + 32;
            for (int k = 0; k < qb / 4; k++)
                for (int e = 0; e < 4; e++) {
                    uint8_t v = blk[qoff + 4 * k + e];
                    qv[64 * k + 4 * l + e] = q8 ? (uint8_t)(v ^ 0x80) : v;
                }
            memcpy(dv + 2 * l, blk, 2);
            if (q41)
                memcpy(mv + 2 * l, blk + 2, 2);
        }
    }
}

int
kern_matrix_repack(struct kern_matrix *w)
{
    if (!w || kern_matrix_check(w) < 0)
        return -EINVAL;
    size_t gb = kern_cpu_pack_group_bytes(w->type, w->n_in);
    if (!gb || kern_cpu_best_isa() < KERN_ISA_AVX512)
        return 0;
    int64_t n_groups = (w->n_out + KERN_PACK_ROWS - 1) / KERN_PACK_ROWS;
    size_t bytes = gb * (size_t)n_groups;
    void *p = NULL;
    if (posix_memalign(&p, 64, (bytes + 63) & ~(size_t)63))
        return -ENOMEM;
    memset(p, 0, bytes);
    for (int64_t g = 0; g < n_groups; g++)
        pack_group(w, g * KERN_PACK_ROWS, (uint8_t *)p + (size_t)g * gb);
    kern_matrix_unpack(w);
    w->packed = p;
    return 1;
}

void
kern_matrix_unpack(struct kern_matrix *w)
{
    if (!w)
        return;
    free((void *)w->packed);
    w->packed = NULL;
}

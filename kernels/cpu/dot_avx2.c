/*
 * dot_avx2: the avx2 kernels of the CPU backend (work in progress: entries left NULL fall back to
 * the reference kernels).
 */
#include "kernels/cpu/cpu_int.h"

static const struct kern_cpu_type_ops avx2_types[KERN_DTYPE_COUNT];

const struct kern_cpu_isa_ops kern_cpu_isa_avx2 = {
    .isa = KERN_ISA_AVX2,
    .types = avx2_types,
    .act_quant = kern_cpu_act_quant_ref,
    .batch_min = 1 << 30,
    .row_align = 1,
};

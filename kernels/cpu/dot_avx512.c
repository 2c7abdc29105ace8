/*
 * dot_avx512: the avx512 kernels of the CPU backend (work in progress: entries left NULL fall back to
 * the reference kernels).
 */
#include "kernels/cpu/cpu_int.h"

static const struct kern_cpu_type_ops avx512_types[KERN_DTYPE_COUNT];

const struct kern_cpu_isa_ops kern_cpu_isa_avx512 = {
    .isa = KERN_ISA_AVX512,
    .types = avx512_types,
    .act_quant = kern_cpu_act_quant_ref,
    .batch_min = 1 << 30,
    .row_align = 1,
};

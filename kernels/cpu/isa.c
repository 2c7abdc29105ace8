/*
 * isa: run-time selection of the CPU kernels' instruction set and the merged per-type tables.
 *
 * The current ISA is the best one the CPU supports, or LLM_ISA=scalar|avx2|avx512 when set and
 * supported, or what kern_cpu_set_isa forced. Per-ISA tables may leave entries NULL; the merged
 * tables built here fill them from the reference table, so callers never test for NULL.
 */
#include <cpuid.h>
#include <errno.h>
#include <stdbool.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu_int.h"

static _Atomic int current_isa = -1;
static pthread_once_t merge_once = PTHREAD_ONCE_INIT;
static struct kern_cpu_type_ops merged[3][KERN_DTYPE_COUNT];

static const struct kern_cpu_isa_ops *const isa_tables[3] = {
    &kern_cpu_isa_ref,
    &kern_cpu_isa_avx2,
    &kern_cpu_isa_avx512,
};

/* F16C from CPUID leaf 1 (not every compiler's __builtin_cpu_supports knows it). */
static bool
has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}

enum kern_isa
kern_cpu_best_isa(void)
{
    __builtin_cpu_init();
    bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        return KERN_ISA_AVX512;
    return avx2 ? KERN_ISA_AVX2 : KERN_ISA_SCALAR;
}

const char *
kern_isa_name(enum kern_isa isa)
{
    switch (isa) {
    case KERN_ISA_SCALAR:
        return "scalar";
    case KERN_ISA_AVX2:
        return "avx2";
    case KERN_ISA_AVX512:
        return "avx512";
    }
    return "unknown";
}

static int
isa_from_env(enum kern_isa best)
{
    const char *s = getenv("LLM_ISA");
    if (!s || !*s)
        return best;
    for (int i = KERN_ISA_SCALAR; i <= KERN_ISA_AVX512; i++)
        if (!strcmp(s, kern_isa_name((enum kern_isa)i)) && i <= (int)best)
            return i;
    return best;
}

enum kern_isa
kern_cpu_isa(void)
{
    int isa = atomic_load_explicit(&current_isa, memory_order_relaxed);
    if (isa < 0) {
        isa = isa_from_env(kern_cpu_best_isa());
        atomic_store_explicit(&current_isa, isa, memory_order_relaxed);
    }
    return (enum kern_isa)isa;
}

int
kern_cpu_set_isa(enum kern_isa isa)
{
    if ((int)isa < KERN_ISA_SCALAR || isa > KERN_ISA_AVX512 || isa > kern_cpu_best_isa())
        return -ENOTSUP;
    atomic_store_explicit(&current_isa, (int)isa, memory_order_relaxed);
    return 0;
}

/* Fills NULL entries of each SIMD table from the reference table. */
static void
merge_tables(void)
{
    const struct kern_cpu_type_ops *ref = kern_cpu_isa_ref.types;
    for (int i = 0; i < 3; i++) {
        for (int t = 0; t < KERN_DTYPE_COUNT; t++) {
            struct kern_cpu_type_ops o = isa_tables[i]->types[t];
            const struct kern_cpu_type_ops *r = &ref[t];
            if (!r->dequant) {
                memset(&merged[i][t], 0, sizeof(o));
                continue;
            }
            if (!o.dequant)
                o.dequant = r->dequant;
            if (!o.canon)
                o.canon = r->canon;
            if (!o.rows) {
                o.rows = r->rows;
                o.prep_bytes = NULL;
                o.prep = NULL;
                o.dcorr = false;
            }
            if (!o.rows_batch)
                o.rows_batch = o.rows;
            o.unit = r->unit;
            o.act_blk = r->act_blk;
            o.off = r->off;
            o.has_min = r->has_min;
            merged[i][t] = o;
        }
    }
}

const struct kern_cpu_isa_ops *
kern_cpu_isa_ops(enum kern_isa isa)
{
    if ((int)isa < KERN_ISA_SCALAR || isa > KERN_ISA_AVX512)
        return NULL;
    return isa_tables[isa];
}

const struct kern_cpu_type_ops *
kern_cpu_type_ops_isa(enum kern_isa isa, enum kern_dtype type)
{
    if ((int)isa < KERN_ISA_SCALAR || isa > KERN_ISA_AVX512 || (unsigned)type >= KERN_DTYPE_COUNT)
        return NULL;
    pthread_once(&merge_once, merge_tables);
    const struct kern_cpu_type_ops *o = &merged[isa][type];
    return o->dequant ? o : NULL;
}

const struct kern_cpu_type_ops *
kern_cpu_type_ops(enum kern_dtype type)
{
    return kern_cpu_type_ops_isa(kern_cpu_isa(), type);
}

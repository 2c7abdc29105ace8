/*
 * ops: the element-wise f32 kernels (RMSNorm, SwiGLU, add, softmax). They run once per token row
 * on vectors of model width, far from the matmul hot path, so they are plain C that the compiler
 * may vectorize; sums use double precision. SwiGLU's exp has an AVX-512 version (attn_avx512.c).
 */
#include <math.h>

#include "kernels/cpu/attn_int.h"
#include "kernels/kern.h"

void
kern_rmsnorm(float *out, const float *x, const float *w, int n, float eps)
{
    double ss = 0.0;
    for (int i = 0; i < n; i++)
        ss += (double)x[i] * (double)x[i];
    float scale = (float)(1.0 / sqrt(ss / (n > 0 ? n : 1) + (double)eps));
    for (int i = 0; i < n; i++)
        out[i] = x[i] * scale * w[i];
}

void
kern_swiglu(float *out, const float *gate, const float *up, int n)
{
    /* 1536 expf calls per layer and token were ~2% of decode, on the critical path */
    if (kern_cpu_isa() == KERN_ISA_AVX512) {
        kern_swiglu_avx512(out, gate, up, n);
        return;
    }
    for (int i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void
kern_add(float *y, const float *x, int n)
{
    for (int i = 0; i < n; i++)
        y[i] += x[i];
}

float
kern_softmax(float *x, int n)
{
    if (n <= 0)
        return -INFINITY;
    float mx = x[0];
    for (int i = 1; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++)
        x[i] *= inv;
    return mx;
}

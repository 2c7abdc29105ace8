/*
 * core: device probe, the context (stream + cuBLAS handle), memory and copies, weight upload,
 * the status checks every other .cu file uses, and a device bandwidth measurement.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_int.cuh"

extern "C" {
#include "common/cm_log.h"
}

/* ---- Status checks ---- */

static int
errno_of(cudaError_t e)
{
    switch (e) {
    case cudaSuccess:
        return 0;
    case cudaErrorMemoryAllocation:
        return -ENOMEM;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
        return -ENODEV;
    case cudaErrorInvalidValue:
        return -EINVAL;
    default:
        return -EIO;
    }
}

/* The last error logged, so that a sticky error reported by every later call is logged once. */
static int last_logged;

int
kc_status(cudaError_t e, const char *expr, const char *file, int line)
{
    if (e == cudaSuccess)
        return 0;
    if (__atomic_exchange_n(&last_logged, (int)e, __ATOMIC_RELAXED) != (int)e)
        cm_log_write(CM_LOG_ERROR, file, line, "cuda: %s failed: %s (%d)", expr,
                     cudaGetErrorString(e), (int)e);
    return errno_of(e);
}

int
kc_blas_status(cublasStatus_t s, const char *expr, const char *file, int line)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return 0;
    int code = 100000 + (int)s;
    if (__atomic_exchange_n(&last_logged, code, __ATOMIC_RELAXED) != code)
        cm_log_write(CM_LOG_ERROR, file, line, "cublas: %s failed: %s (%d)", expr,
                     cublasGetStatusString(s), (int)s);
    return s == CUBLAS_STATUS_ALLOC_FAILED ? -ENOMEM : -EIO;
}

/* ---- Device and context ---- */

int
kern_cuda_probe(char *name, size_t n)
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) {
        (void)cudaGetLastError(); /* clear it: "no device" is an answer here, not an error */
        return -ENODEV;
    }
    if (name && n > 0) {
        cudaDeviceProp prop;
        if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
            (void)cudaGetLastError();
            return -ENODEV;
        }
        snprintf(name, n, "%s", prop.name);
    }
    return 0;
}

int
kern_cuda_new(struct kern_cuda **out)
{
    int rc = kern_cuda_probe(NULL, 0);
    if (rc < 0)
        return rc;
    struct kern_cuda *c = (struct kern_cuda *)calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    c->device = 0;
    if ((rc = KC_CUDA(cudaSetDevice(0))) < 0 ||
        (rc = KC_CUDA(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking))) < 0)
        goto fail;
    if ((rc = KC_BLAS(cublasCreate(&c->blas))) < 0)
        goto fail;
    if ((rc = KC_BLAS(cublasSetStream(c->blas, c->stream))) < 0)
        goto fail;
    *out = c;
    return 0;
fail:
    kern_cuda_free(c);
    return rc;
}

void
kern_cuda_free(struct kern_cuda *c)
{
    if (!c)
        return;
    if (c->stream)
        (void)KC_CUDA(cudaStreamSynchronize(c->stream));
    if (c->blas)
        (void)KC_BLAS(cublasDestroy(c->blas));
    (void)KC_CUDA(cudaFree(c->x16));
    (void)KC_CUDA(cudaFree(c->w16));
    if (c->stream)
        (void)KC_CUDA(cudaStreamDestroy(c->stream));
    free(c);
}

int
kern_cuda_sync(struct kern_cuda *c)
{
    return KC_CUDA(cudaStreamSynchronize(c->stream));
}

int
kc_scratch(struct kern_cuda *c, void **buf, size_t *have, size_t bytes)
{
    if (*have >= bytes)
        return 0;
    int rc = KC_CUDA(cudaStreamSynchronize(c->stream));
    if (rc < 0)
        return rc;
    (void)KC_CUDA(cudaFree(*buf));
    *buf = NULL;
    *have = 0;
    if ((rc = KC_CUDA(cudaMalloc(buf, bytes))) < 0) {
        *buf = NULL;
        return rc;
    }
    *have = bytes;
    return 0;
}

/* ---- Memory ---- */

int
kern_cuda_alloc(struct kern_cuda *c, size_t bytes, void **out)
{
    (void)c;
    if (bytes == 0)
        return -EINVAL;
    void *p = NULL;
    int rc = KC_CUDA(cudaMalloc(&p, bytes));
    if (rc < 0)
        return rc;
    *out = p;
    return 0;
}

void
kern_cuda_dfree(struct kern_cuda *c, void *dev)
{
    if (!dev)
        return;
    if (c)
        (void)KC_CUDA(cudaStreamSynchronize(c->stream));
    (void)KC_CUDA(cudaFree(dev));
}

int
kern_cuda_host_alloc(size_t bytes, void **out)
{
    void *p = NULL;
    int rc = KC_CUDA(cudaMallocHost(&p, bytes));
    if (rc < 0)
        return rc;
    *out = p;
    return 0;
}

void
kern_cuda_host_free(void *host)
{
    if (host)
        (void)KC_CUDA(cudaFreeHost(host));
}

int
kern_cuda_upload(struct kern_cuda *c, void *dev, const void *host, size_t bytes)
{
    if (bytes == 0)
        return 0;
    return KC_CUDA(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, c->stream));
}

int
kern_cuda_download(struct kern_cuda *c, void *host, const void *dev, size_t bytes)
{
    if (bytes == 0)
        return 0;
    int rc = KC_CUDA(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, c->stream));
    /* The caller reads host next: wait whether or not host is page-locked. */
    return rc < 0 ? rc : kern_cuda_sync(c);
}

int
kern_cuda_copy(struct kern_cuda *c, void *dev_dst, const void *dev_src, size_t bytes)
{
    if (bytes == 0)
        return 0;
    return KC_CUDA(cudaMemcpyAsync(dev_dst, dev_src, bytes, cudaMemcpyDeviceToDevice, c->stream));
}

int
kern_cuda_memset0(struct kern_cuda *c, void *dev, size_t bytes)
{
    return KC_CUDA(cudaMemsetAsync(dev, 0, bytes, c->stream));
}

double
kern_cuda_measure_bw(struct kern_cuda *c, size_t bytes, int reps)
{
    void *a = NULL, *b = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    double best = 0;
    if (KC_CUDA(cudaMalloc(&a, bytes)) < 0 || KC_CUDA(cudaMalloc(&b, bytes)) < 0 ||
        KC_CUDA(cudaMemsetAsync(a, 1, bytes, c->stream)) < 0 || KC_CUDA(cudaEventCreate(&e0)) < 0 ||
        KC_CUDA(cudaEventCreate(&e1)) < 0)
        goto out;
    for (int r = 0; r < reps + 1; r++) { /* the first copy is a warm-up */
        float ms = 0;
        if (KC_CUDA(cudaEventRecord(e0, c->stream)) < 0 ||
            KC_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, c->stream)) < 0 ||
            KC_CUDA(cudaEventRecord(e1, c->stream)) < 0 || KC_CUDA(cudaEventSynchronize(e1)) < 0 ||
            KC_CUDA(cudaEventElapsedTime(&ms, e0, e1)) < 0)
            goto out;
        double gbs = 2.0 * (double)bytes / ((double)ms * 1e-3) / 1e9;
        if (r > 0 && gbs > best)
            best = gbs;
    }
out:
    if (e0)
        (void)KC_CUDA(cudaEventDestroy(e0));
    if (e1)
        (void)KC_CUDA(cudaEventDestroy(e1));
    (void)KC_CUDA(cudaFree(a));
    (void)KC_CUDA(cudaFree(b));
    return best;
}

/* ---- Weights ---- */

int
kern_cuda_type_supported(enum kern_dtype type)
{
    switch (type) {
    case KERN_DTYPE_F32:
    case KERN_DTYPE_F16:
    case KERN_DTYPE_BF16:
    case KERN_DTYPE_Q4_0:
    case KERN_DTYPE_Q4_1:
    case KERN_DTYPE_Q5_0:
    case KERN_DTYPE_Q5_1:
    case KERN_DTYPE_Q8_0:
    case KERN_DTYPE_Q4_K:
    case KERN_DTYPE_Q5_K:
    case KERN_DTYPE_Q6_K:
        return 1;
    default:
        return 0;
    }
}

int
kc_matrix_ok(const struct kern_cuda_matrix *w)
{
    if (!w || !w->data || w->n_in <= 0 || w->n_out <= 0 || w->n_in % 32 ||
        w->n_in > (INT64_C(1) << 30) || w->n_out > INT32_MAX)
        return -EINVAL;
    if (!kern_cuda_type_supported(w->type))
        return -ENOTSUP;
    if (w->row_bytes != kern_row_bytes((uint32_t)w->type, w->n_in))
        return -EINVAL;
    return 0;
}

int
kern_cuda_matrix_upload(struct kern_cuda *c, const struct kern_matrix *w,
                        struct kern_cuda_matrix *out)
{
    int rc = kern_matrix_check(w);
    if (rc < 0)
        return rc;
    if (!kern_cuda_type_supported(w->type) || w->n_in % 32)
        return -ENOTSUP;
    size_t bytes = w->row_bytes * (size_t)w->n_out;
    void *dev = NULL;
    if ((rc = kern_cuda_alloc(c, bytes, &dev)) < 0)
        return rc;
    /* Synchronous copy: the source is usually the mmapped file, which stays mapped anyway. */
    if ((rc = KC_CUDA(cudaMemcpy(dev, w->data, bytes, cudaMemcpyHostToDevice))) < 0) {
        (void)KC_CUDA(cudaFree(dev));
        return rc;
    }
    out->type = w->type;
    out->n_in = w->n_in;
    out->n_out = w->n_out;
    out->row_bytes = w->row_bytes;
    out->data = dev;
    return 0;
}

void
kern_cuda_matrix_free(struct kern_cuda *c, struct kern_cuda_matrix *w)
{
    if (!w || !w->data)
        return;
    kern_cuda_dfree(c, w->data);
    memset(w, 0, sizeof(*w));
}

/*
 * pool: the persistent compute threads behind kern_pool_run.
 *
 * A run hands out the iths 0..nth-1 of one task through the atomic word `work` = (generation << 32
 * | next ith). The caller writes the task (fn, ctx), resets `done`, stores the new work word
 * (release) and bumps the futex word `gen`. The caller takes ith 0, then every thread, the caller
 * included, claims the next ith with a CAS (acquire) until none is left, runs it and bumps `done`
 * (release); the caller returns when done == nth. So each ith runs exactly once per run, usually on
 * its own thread; when a worker has lost its core (other processes on the machine) the caller runs
 * its share instead of waiting for it to be scheduled. A worker touches fn/ctx only after a
 * successful claim, and the caller does not rewrite them before every claimed ith is done, so the
 * task fields need no atomics. The generation in the work word makes a CAS against the word of an
 * earlier run fail; a claim always reads the task published with the word it claimed from.
 *
 * Idle workers spin on gen for about SPIN_NS, then sleep on a futex on gen. The sleeper count is
 * raised before the last look at gen and read by the publisher after bumping gen (both seq_cst),
 * so either the worker sees the new generation or the publisher sees the sleeper and wakes it.
 */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/cm_util.h"
#include "kernels/cpu/cpu_int.h"
#include "kernels/kern.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_NS 50000 /* how long an idle worker spins before sleeping */
#define MAX_THREADS 256

struct pool_worker {
    struct kern_pool *pool;
};

struct kern_pool {
    int n_threads;
    pthread_t *threads;          /* (n_threads - 1) */
    struct pool_worker *workers; /* (n_threads - 1) */
    int n_started;

    _Atomic uint64_t work;  /* run generation << 32 | next ith to claim */
    _Atomic uint32_t gen;   /* futex word: bumped once per published task and at shutdown */
    _Atomic int n_sleeping; /* workers in (or about to enter) futex_wait */
    _Atomic int done;       /* iths finished in the current run */
    _Atomic bool stop;

    kern_task_fn fn; /* the current task, stable while a generation runs */
    void *ctx;

    void *scratch; /* kernel scratch, 64-byte aligned (kern_cpu_pool_scratch) */
    size_t scratch_bytes;
};

static long
futex(_Atomic uint32_t *addr, int op, uint32_t val)
{
    return syscall(SYS_futex, (uint32_t *)addr, op, val, NULL, NULL, 0);
}

/* Waits until gen differs from seen; returns the new generation. */
static uint32_t
wait_generation(struct kern_pool *pool, uint32_t seen)
{
    uint64_t t0 = 0;
    for (unsigned i = 0;; i++) {
        uint32_t g = atomic_load_explicit(&pool->gen, memory_order_acquire);
        if (g != seen)
            return g;
        cpu_relax();
        if ((i & 255) != 255)
            continue;
        uint64_t now = cm_now_ns();
        if (!t0) {
            t0 = now;
            continue;
        }
        if (now - t0 < SPIN_NS)
            continue;
        atomic_fetch_add_explicit(&pool->n_sleeping, 1, memory_order_seq_cst);
        while (atomic_load_explicit(&pool->gen, memory_order_seq_cst) == seen)
            futex(&pool->gen, FUTEX_WAIT_PRIVATE, seen);
        atomic_fetch_sub_explicit(&pool->n_sleeping, 1, memory_order_seq_cst);
        t0 = 0;
    }
}

/* Claims and runs iths of the current run until none is left. */
static void
run_claims(struct kern_pool *pool)
{
    uint64_t w = atomic_load_explicit(&pool->work, memory_order_acquire);
    while ((uint32_t)w < (uint32_t)pool->n_threads) {
        if (!atomic_compare_exchange_weak_explicit(&pool->work, &w, w + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        pool->fn(pool->ctx, (int)(uint32_t)w, pool->n_threads);
        atomic_fetch_add_explicit(&pool->done, 1, memory_order_release);
        w = atomic_load_explicit(&pool->work, memory_order_acquire);
    }
}

static void *
worker_main(void *arg)
{
    struct kern_pool *pool = ((struct pool_worker *)arg)->pool;
    uint32_t seen = 0;
    for (;;) {
        seen = wait_generation(pool, seen);
        if (atomic_load_explicit(&pool->stop, memory_order_acquire))
            break;
        run_claims(pool);
    }
    return NULL;
}

static void
publish(struct kern_pool *pool)
{
    atomic_fetch_add_explicit(&pool->gen, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&pool->n_sleeping, memory_order_seq_cst) > 0)
        futex(&pool->gen, FUTEX_WAKE_PRIVATE, INT_MAX);
}

static void
stop_workers(struct kern_pool *pool)
{
    atomic_store_explicit(&pool->stop, true, memory_order_release);
    publish(pool);
    for (int i = 0; i < pool->n_started; i++)
        pthread_join(pool->threads[i], NULL);
    pool->n_started = 0;
}

int
kern_pool_new(int n_threads, struct kern_pool **out)
{
    int rc = 0;
    struct kern_pool *pool = NULL;
    if (n_threads < 1 || n_threads > MAX_THREADS)
        return -EINVAL;
    pool = calloc(1, sizeof(*pool));
    if (!pool)
        return -ENOMEM;
    pool->n_threads = n_threads;
    atomic_init(&pool->work, (uint64_t)n_threads); /* generation 0: nothing to claim */
    atomic_init(&pool->gen, 0);
    atomic_init(&pool->n_sleeping, 0);
    atomic_init(&pool->done, 0);
    atomic_init(&pool->stop, false);
    if (n_threads > 1) {
        pool->threads = calloc((size_t)n_threads - 1, sizeof(*pool->threads));
        pool->workers = calloc((size_t)n_threads - 1, sizeof(*pool->workers));
        if (!pool->threads || !pool->workers) {
            rc = -ENOMEM;
            goto out;
        }
    }
    for (int i = 0; i < n_threads - 1; i++) {
        pool->workers[i].pool = pool;
        int err = pthread_create(&pool->threads[i], NULL, worker_main, &pool->workers[i]);
        if (err) {
            rc = err == EAGAIN ? -EAGAIN : -ENOMEM;
            goto out;
        }
        pool->n_started++;
    }
    *out = pool;
    pool = NULL;
out:
    kern_pool_free(pool);
    return rc;
}

void
kern_pool_free(struct kern_pool *pool)
{
    if (!pool)
        return;
    stop_workers(pool);
    free(pool->threads);
    free(pool->workers);
    free(pool->scratch);
    free(pool);
}

int
kern_pool_n_threads(const struct kern_pool *pool)
{
    return pool->n_threads;
}

void
kern_pool_run(struct kern_pool *pool, kern_task_fn fn, void *ctx)
{
    int n_workers = pool->n_threads - 1;
    if (n_workers == 0) {
        fn(ctx, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    uint64_t g = (atomic_load_explicit(&pool->work, memory_order_relaxed) >> 32) + 1;
    atomic_store_explicit(&pool->work, g << 32 | 1, memory_order_release);
    publish(pool);
    fn(ctx, 0, pool->n_threads);
    atomic_fetch_add_explicit(&pool->done, 1, memory_order_release);
    run_claims(pool);
    for (unsigned i = 0; atomic_load_explicit(&pool->done, memory_order_acquire) < n_workers + 1;
         i++) {
        cpu_relax();
        if ((i & 4095) == 4095)
            sched_yield(); /* a worker lost its core: let it run */
    }
}

int
kern_cpu_pool_scratch(struct kern_pool *pool, size_t bytes, void **out)
{
    if (bytes > pool->scratch_bytes) {
        size_t n = (bytes + 4095) & ~(size_t)4095;
        void *p = NULL;
        if (posix_memalign(&p, 64, n))
            return -ENOMEM;
        free(pool->scratch);
        pool->scratch = p;
        pool->scratch_bytes = n;
    }
    *out = pool->scratch;
    return 0;
}

int
kern_cpu_pool_n_sleeping(struct kern_pool *pool)
{
    return atomic_load_explicit(&pool->n_sleeping, memory_order_seq_cst);
}

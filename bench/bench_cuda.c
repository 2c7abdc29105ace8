/*
 * bench_cuda: the CUDA backend's benchmark (contract in bench_cuda.h).
 */
#include "bench/bench_cuda.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cm_util.h"
#include "engine/gguf.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/model_cuda.h"

#define BATCH_PROMPT 128
#define BATCH_STEPS 64
#define MAX_SEQS 128

static const int batch_sizes[] = {8, 32, 128};
#define N_BATCH_SIZES 3

static uint64_t
next_rand(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double
median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* n_tokens random tokens: in one prefill (pp) or one at a time (tg); tok/s, 0 on failure. */
static double
run_single(struct eng_cuda_fwd *f, struct eng_kv *kv, int n_vocab, int n_tokens, bool prefill,
           float *logits)
{
    int32_t *toks = cm_xmalloc((size_t)n_tokens * sizeof(*toks));
    uint64_t s = prefill ? 0x1234567 : 0x7654321;
    for (int i = 0; i < n_tokens; i++)
        toks[i] = (int32_t)(next_rand(&s) % (uint64_t)n_vocab);
    kv->n_past = 0;
    int rc = 0;
    uint64_t t0 = cm_now_ns();
    if (prefill)
        rc = eng_cuda_forward(f, kv, toks, n_tokens, logits, false);
    for (int i = 0; !prefill && i < n_tokens && rc == 0; i++)
        rc = eng_cuda_forward(f, kv, &toks[i], 1, logits, false);
    double sec = (double)(cm_now_ns() - t0) / 1e9;
    free(toks);
    return rc < 0 ? 0 : n_tokens / sec;
}

/* n_seqs sequences prefilled with BATCH_PROMPT tokens each (untimed), then BATCH_STEPS decode
 * steps of one token per sequence in one batch; aggregate tok/s, 0 on failure. */
static double
run_batched(struct eng_cuda_fwd *f, struct eng_kv_pool *kv, int n_vocab, int n_seqs, float *logits)
{
    int n_ctx = BATCH_PROMPT + BATCH_STEPS + 1,
        n_batch = BATCH_PROMPT > n_seqs ? BATCH_PROMPT : n_seqs;
    struct eng_kv_seq *seqs = cm_xcalloc((size_t)n_seqs, sizeof(*seqs));
    struct eng_kv_seq **bseqs = cm_xcalloc((size_t)n_batch, sizeof(*bseqs));
    int32_t *toks = cm_xcalloc((size_t)n_batch, sizeof(*toks));
    int32_t *pos = cm_xcalloc((size_t)n_batch, sizeof(*pos));
    int32_t *idx = cm_xcalloc((size_t)n_batch, sizeof(*idx));
    uint64_t rng = 0x5eed;
    double tps = 0;
    for (int s = 0; s < n_seqs; s++)
        eng_kv_seq_init(&seqs[s]);
    for (int s = 0; s < n_seqs; s++) {
        if (eng_kv_seq_reserve(kv, &seqs[s], n_ctx) < 0)
            goto out;
        for (int i = 0; i < BATCH_PROMPT; i++) {
            toks[i] = (int32_t)(next_rand(&rng) % (uint64_t)n_vocab);
            pos[i] = i;
            bseqs[i] = &seqs[s];
        }
        idx[0] = BATCH_PROMPT - 1;
        struct eng_batch b = {BATCH_PROMPT, toks, pos, bseqs, 1, idx};
        if (eng_cuda_forward_batch(f, &b, logits) < 0)
            goto out;
    }
    uint64_t t0 = cm_now_ns();
    for (int step = 0; step < BATCH_STEPS; step++) {
        for (int s = 0; s < n_seqs; s++) {
            toks[s] = (int32_t)(next_rand(&rng) % (uint64_t)n_vocab);
            pos[s] = BATCH_PROMPT + step;
            bseqs[s] = &seqs[s];
            idx[s] = s;
        }
        struct eng_batch b = {n_seqs, toks, pos, bseqs, n_seqs, idx};
        if (eng_cuda_forward_batch(f, &b, logits) < 0)
            goto out;
    }
    tps = (double)n_seqs * BATCH_STEPS / ((double)(cm_now_ns() - t0) / 1e9);
out:
    for (int s = 0; s < n_seqs; s++)
        eng_kv_seq_fini(kv, &seqs[s]);
    free(seqs);
    free(bseqs);
    free(toks);
    free(pos);
    free(idx);
    return tps;
}

static void
write_json(const char *path, const char *label, const char *device, const struct eng_model *m,
           double bw, int n_pp, double pp, int n_tg, double tg, size_t wbytes, const double *agg)
{
    FILE *f = fopen(path, "a");
    if (!f) {
        perror(path);
        return;
    }
    /* label, device and model name are printed as given: callers pass plain text. */
    fprintf(f,
            "{\"timestamp\":%lld,\"label\":\"%s\",\"backend\":\"cuda\",\"device\":\"%s\","
            "\"model\":\"%s\",\"bandwidth_gbs\":%.2f,\"pp\":%d,\"pp_tps\":%.2f,\"tg\":%d,"
            "\"tg_tps\":%.2f,\"weight_bytes\":%zu,\"tg_floor_fraction\":%.4f",
            (long long)time(NULL), label, device, m->name, bw, n_pp, pp, n_tg, tg, wbytes,
            bw > 0 ? tg / (bw * 1e9 / (double)wbytes) : 0.0);
    for (int i = 0; i < N_BATCH_SIZES; i++)
        fprintf(f, ",\"batched_b%d_tps\":%.2f", batch_sizes[i], agg[i]);
    fprintf(f, "}\n");
    fclose(f);
}

int
bench_cuda_run(const char *model, int n_pp, int n_tg, int reps, const char *json, const char *label)
{
    char device[256], err[ENG_GGUF_ERR_LEN] = "";
    if (eng_cuda_available(device, sizeof(device)) < 0) {
        fprintf(stderr, "llm-bench: --backend cuda: %s\n", device);
        return 2;
    }
    int ret = 1;
    struct eng_gguf *g = NULL;
    struct eng_model *m = NULL;
    struct eng_cuda_fwd *f = NULL;
    struct eng_kv *kv = NULL;
    struct eng_kv_pool *pool = NULL;
    float *logits = NULL;
    double *pp = cm_xcalloc((size_t)reps, sizeof(double));
    double *tg = cm_xcalloc((size_t)reps, sizeof(double));
    double agg[N_BATCH_SIZES] = {0};
    if (eng_gguf_open(model, &g, err, sizeof(err)) < 0 ||
        eng_model_load(g, &m, err, sizeof(err)) < 0) {
        fprintf(stderr, "llm-bench: %s: %s\n", model, err);
        goto out;
    }
    const struct eng_hparams *hp = &m->hp;
    int n_ctx = n_pp > n_tg ? n_pp : n_tg;
    n_ctx = (n_ctx > BATCH_PROMPT + BATCH_STEPS ? n_ctx : BATCH_PROMPT + BATCH_STEPS) + 1;
    int n_batch = n_pp > 512 ? n_pp : 512;
    int n_blocks = MAX_SEQS * eng_kv_blocks_for(n_ctx);
    int rc;
    if ((rc = eng_cuda_fwd_new(m, n_batch, n_ctx, n_blocks, &f)) < 0 ||
        (rc = eng_kv_new(m, n_ctx, &kv)) < 0 ||
        (rc = eng_kv_pool_new(hp->n_layer, hp->n_head_kv * hp->head_dim, n_blocks, &pool)) < 0 ||
        !(logits = malloc((size_t)MAX_SEQS * (size_t)hp->n_vocab * sizeof(float)))) {
        fprintf(stderr, "llm-bench: cannot set up the CUDA engine: %s\n",
                rc < 0 ? strerror(-rc) : "out of memory");
        goto out;
    }
    run_single(f, kv, hp->n_vocab, 4, false, logits); /* warm-up */
    for (int r = 0; r < reps; r++) {
        pp[r] = run_single(f, kv, hp->n_vocab, n_pp, true, logits);
        tg[r] = run_single(f, kv, hp->n_vocab, n_tg, false, logits);
    }
    double bw = eng_cuda_measure_bw(f, (size_t)1 << 30, 5);
    double pp_med = median(pp, reps), tg_med = median(tg, reps);
    size_t wbytes = eng_model_weight_bytes(m);
    double floor_tps = bw > 0 ? bw * 1e9 / (double)wbytes : 0;
    printf("backend: cuda, device: %s\n", device);
    printf("model: %s (%.1f MiB of weights read per token)\n", m->name, (double)wbytes / (1 << 20));
    printf("device memory bandwidth (d2d copy): %.1f GB/s\n", bw);
    printf("pp%d: %.1f tok/s\n", n_pp, pp_med);
    printf("tg%d: %.1f tok/s (bandwidth floor %.1f tok/s: %.0f%% of it)\n", n_tg, tg_med, floor_tps,
           floor_tps > 0 ? 100.0 * tg_med / floor_tps : 0.0);
    for (int i = 0; i < N_BATCH_SIZES; i++) {
        agg[i] = run_batched(f, pool, hp->n_vocab, batch_sizes[i], logits);
        printf("batched decode B=%d: %.1f tok/s aggregate (%.0f%% of B x the floor per step)\n",
               batch_sizes[i], agg[i],
               floor_tps > 0 ? 100.0 * agg[i] / (batch_sizes[i] * floor_tps) : 0.0);
    }
    if (json)
        write_json(json, label, device, m, bw, n_pp, pp_med, n_tg, tg_med, wbytes, agg);
    ret = 0;
out:
    free(pp);
    free(tg);
    free(logits);
    eng_kv_pool_free(pool);
    eng_kv_free(kv);
    eng_cuda_fwd_free(f);
    eng_model_free(m);
    eng_gguf_close(g);
    return ret;
}

/*
 * llm-bench: engine benchmarks that print figures and ratios (never pass or fail on time).
 *
 * Single sequence, like llama-bench: pp (prompt processing of N random tokens in one batch into an
 * empty cache) and tg (N tokens generated one at a time from an empty cache), each repeated and
 * reported as the median; plus the memory read bandwidth measured in the same run with the same
 * threads, and tg as a fraction of the bandwidth floor (weight bytes read per token / bandwidth).
 * With --json FILE the results are appended as one JSON object per line.
 */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench_cuda.h"
#include "bench/bench_load.h"
#include "common/cm_util.h"
#include "engine/gguf.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "kernels/kern.h"

/* ---- Memory bandwidth ---- */

struct bw_task {
    const uint64_t *buf;
    size_t n_words;
    uint64_t sink[64];
};

/* 16-byte vector loads (the baseline ISA), four independent accumulators. */
typedef uint64_t bw_vec __attribute__((vector_size(16)));

static void
bw_read(void *ctx, int ith, int nth)
{
    struct bw_task *t = ctx;
    size_t per = t->n_words / (size_t)nth / 8 * 8;
    const bw_vec *p = (const bw_vec *)(t->buf + per * (size_t)ith);
    bw_vec a0 = {0, 0}, a1 = {0, 0}, a2 = {0, 0}, a3 = {0, 0};
    for (size_t i = 0; i + 4 <= per / 2; i += 4) {
        a0 += p[i];
        a1 += p[i + 1];
        a2 += p[i + 2];
        a3 += p[i + 3];
    }
    bw_vec a = a0 ^ a1 ^ a2 ^ a3;
    t->sink[ith % 64] = a[0] ^ a[1];
}

/* Best of reps passes over a buffer much larger than the caches, in GB/s. */
static double
measure_bandwidth(struct kern_pool *pool, size_t bytes, int reps)
{
    struct bw_task t = {0};
    uint64_t *buf = malloc(bytes);
    if (!buf)
        return 0;
    for (size_t i = 0; i < bytes / 8; i++)
        buf[i] = i * 0x9e3779b97f4a7c15ull;
    t.buf = buf;
    t.n_words = bytes / 8;
    double best = 0;
    for (int r = 0; r < reps; r++) {
        uint64_t t0 = cm_now_ns();
        kern_pool_run(pool, bw_read, &t);
        double s = (double)(cm_now_ns() - t0) / 1e9;
        double gbs = (double)bytes / s / 1e9;
        if (gbs > best)
            best = gbs;
    }
    free(buf);
    return best;
}

/* ---- Engine runs ---- */

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double
median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static uint64_t
next_rand(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* pp: n_tokens random tokens in one batch into an empty cache; returns tok/s. */
static double
run_pp(struct eng_fwd *fwd, struct eng_kv *kv, const struct eng_model *m, int n_tokens,
       float *logits)
{
    int32_t *toks = cm_xmalloc((size_t)n_tokens * sizeof(*toks));
    uint64_t s = 0x1234567;
    for (int i = 0; i < n_tokens; i++)
        toks[i] = (int32_t)(next_rand(&s) % (uint64_t)m->hp.n_vocab);
    kv->n_past = 0;
    uint64_t t0 = cm_now_ns();
    int rc = eng_forward(fwd, kv, toks, n_tokens, logits, false);
    double sec = (double)(cm_now_ns() - t0) / 1e9;
    free(toks);
    return rc < 0 ? 0 : n_tokens / sec;
}

/* tg: n_tokens single-token steps from an empty cache; returns tok/s. */
static double
run_tg(struct eng_fwd *fwd, struct eng_kv *kv, const struct eng_model *m, int n_tokens,
       float *logits)
{
    uint64_t s = 0x7654321;
    kv->n_past = 0;
    uint64_t t0 = cm_now_ns();
    for (int i = 0; i < n_tokens; i++) {
        int32_t tok = (int32_t)(next_rand(&s) % (uint64_t)m->hp.n_vocab);
        if (eng_forward(fwd, kv, &tok, 1, logits, false) < 0)
            return 0;
    }
    double sec = (double)(cm_now_ns() - t0) / 1e9;
    return n_tokens / sec;
}

/* Writes s as a JSON string body (quotes, backslashes and control bytes escaped). */
static void
json_str(FILE *f, const char *s)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
}

/*
 * Batched decode: n_seqs sequences, each with a prompt of n_prompt random tokens prefilled first
 * (not timed), then n_steps forward passes of one token per sequence, all sequences in one batch.
 * Returns the aggregate generated tokens per second.
 */
static double
run_batched(const struct eng_model *m, struct kern_pool *pool, int n_seqs, int n_prompt,
            int n_steps)
{
    const struct eng_hparams *hp = &m->hp;
    int n_ctx = n_prompt + n_steps + 1;
    int n_batch = n_prompt > n_seqs ? n_prompt : n_seqs;
    struct eng_fwd *fwd = NULL;
    struct eng_kv_pool *kv = NULL;
    double tps = 0;
    int blocks = n_seqs * eng_kv_blocks_for(n_ctx);
    struct eng_kv_seq *seqs = cm_xcalloc((size_t)n_seqs, sizeof(*seqs));
    struct eng_kv_seq **bseqs = cm_xcalloc((size_t)n_batch, sizeof(*bseqs));
    int32_t *toks = cm_xcalloc((size_t)n_batch, sizeof(*toks));
    int32_t *pos = cm_xcalloc((size_t)n_batch, sizeof(*pos));
    int32_t *idx = cm_xcalloc((size_t)n_batch, sizeof(*idx));
    float *logits = malloc((size_t)n_seqs * (size_t)hp->n_vocab * sizeof(float));
    if (!logits || eng_fwd_new(m, pool, n_batch, n_ctx, &fwd) < 0 ||
        eng_kv_pool_new(hp->n_layer, hp->n_head_kv * hp->head_dim, blocks, &kv) < 0)
        goto out;
    uint64_t rng = 0x5eed;
    for (int s = 0; s < n_seqs; s++) {
        eng_kv_seq_init(&seqs[s]);
        if (eng_kv_seq_reserve(kv, &seqs[s], n_ctx) < 0)
            goto out;
        for (int i = 0; i < n_prompt; i++) {
            toks[i] = (int32_t)(next_rand(&rng) % (uint64_t)hp->n_vocab);
            pos[i] = i;
            bseqs[i] = &seqs[s];
        }
        idx[0] = n_prompt - 1;
        struct eng_batch b = {n_prompt, toks, pos, bseqs, 1, idx};
        if (eng_forward_batch(fwd, kv, &b, logits) < 0)
            goto out;
    }
    uint64_t t0 = cm_now_ns();
    for (int step = 0; step < n_steps; step++) {
        for (int s = 0; s < n_seqs; s++) {
            toks[s] = (int32_t)(next_rand(&rng) % (uint64_t)hp->n_vocab);
            pos[s] = n_prompt + step;
            bseqs[s] = &seqs[s];
            idx[s] = s;
        }
        struct eng_batch b = {n_seqs, toks, pos, bseqs, n_seqs, idx};
        if (eng_forward_batch(fwd, kv, &b, logits) < 0)
            goto out;
    }
    tps = (double)n_seqs * n_steps / ((double)(cm_now_ns() - t0) / 1e9);
out:
    for (int s = 0; s < n_seqs && kv; s++)
        eng_kv_seq_fini(kv, &seqs[s]);
    eng_kv_pool_free(kv);
    eng_fwd_free(fwd);
    free(seqs);
    free(bseqs);
    free(toks);
    free(pos);
    free(idx);
    free(logits);
    return tps;
}

static void
usage(FILE *f)
{
    fprintf(f, "usage: llm-bench -m MODEL [-t THREADS] [--pp N] [--tg N] [--reps N] "
               "[--bw-mb MB] [--json FILE] [--label TEXT]\n"
               "  -m, --model FILE   GGUF model\n"
               "  -t, --threads N    compute threads (default: online CPUs)\n"
               "      --pp N         prompt tokens for the prompt-processing test (default 512)\n"
               "      --tg N         tokens for the generation test (default 128)\n"
               "      --reps N       repetitions; the median is reported (default 3)\n"
               "      --bw-mb MB     buffer for the bandwidth test (default 1024, at least 64)\n"
               "      --json FILE    append the results as one JSON line\n"
               "      --label TEXT   a label stored in the JSON line (e.g. the git commit)\n"
               "      --batched      also aggregate decode tok/s of 1..32 sequences at once\n"
               "      --backend B    cpu (default) or cuda: pp, tg, aggregate at 8/32/128\n"
               "                     (128-token prompts, 64 decode steps)\n"
               "End-to-end load (BENCH.md item 3; no model is loaded here):\n"
               "      --load TARGET  http://HOST:PORT (OpenAI server) or unix:PATH (llm-engine\n"
               "                     socket); repeat to compare, up to 4 (ratios: first / others)\n"
               "      --clients LIST concurrent streaming clients, e.g. 1,8,32 (default)\n"
               "      --rounds R     requests per client, one after the other (2)\n"
               "      --prompt-words N  ~words per prompt (245: ~250 tokens)\n"
               "      --gen N        completion tokens per request, EOS suppressed (128)\n"
               "      --engine-socket PATH  read the EOS/EOT ids to suppress from this engine\n");
}

/* ---- End-to-end load (--load) ---- */

#define MAX_TARGETS 4

struct load_mode {
    const char *targets[MAX_TARGETS];
    int n_targets;
    const char *clients; /* "1,8,32" */
    const char *engine_socket;
    int rounds, prompt_words, gen;
};

/* Each client count runs every target in turn (A B A B across counts keeps drift alike); the
 * first target is "ours", ratios are ours / each other target. */
static int
run_load_mode(const struct load_mode *lm, const char *json, const char *label)
{
    int32_t ban[2];
    int n_ban = 0;
    if (lm->engine_socket) {
        int rc = bench_load_engine_ban_ids(lm->engine_socket, ban, &n_ban);
        if (rc < 0) {
            fprintf(stderr, "llm-bench: %s: cannot read MODEL_INFO: %s\n", lm->engine_socket,
                    strerror(-rc));
            return 1;
        }
    }
    FILE *jf = json ? fopen(json, "a") : NULL;
    char list[128];
    snprintf(list, sizeof(list), "%s", lm->clients);
    for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        int n = atoi(tok);
        if (n < 1)
            continue;
        double tps[MAX_TARGETS] = {0};
        int shorts[MAX_TARGETS] = {0};
        for (int t = 0; t < lm->n_targets; t++) {
            struct bench_load_opts o = {.target = lm->targets[t],
                                        .clients = n,
                                        .rounds = lm->rounds,
                                        .prompt_words = lm->prompt_words,
                                        .gen = lm->gen,
                                        .ban = ban,
                                        .n_ban = n_ban,
                                        .timeout_s = 600};
            struct bench_load_result r;
            int rc = bench_load_run(&o, &r);
            if (rc < 0) {
                fprintf(stderr, "llm-bench: load %s: %s\n", lm->targets[t], strerror(-rc));
                continue;
            }
            tps[t] = r.tok_s;
            printf("load %s clients=%d: %.1f tok/s aggregate, TTFT p50 %.0f ms p99 %.0f ms, "
                   "inter-token p50 %.1f ms p99 %.1f ms, prompt %.0f tokens, ok %d errors %d "
                   "(%ld tokens in %.2f s)\n",
                   lm->targets[t], n, r.tok_s, r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms,
                   r.itl_p99_ms, r.ok ? (double)r.prompt_tokens / r.ok : 0.0, r.ok, r.errors,
                   r.completion_tokens, r.wall_s);
            if (r.short_reqs > 0) {
                printf("  %d of %d requests ended before %d tokens (", r.short_reqs, r.ok,
                       lm->gen);
                for (int w = 0; w < r.n_why; w++)
                    printf("%s%s %d", w ? ", " : "", r.why[w].name, r.why[w].n);
                if (r.why_other)
                    printf(", other %d", r.why_other);
                printf("): this run did less work than asked; compare only runs without "
                       "short requests\n");
            }
            shorts[t] = r.short_reqs;
            fflush(stdout);
            if (jf)
                fprintf(jf,
                        "{\"timestamp\":%lld,\"label\":\"%s\",\"bench\":\"load\",\"target\":\"%s\","
                        "\"clients\":%d,\"ok\":%d,\"errors\":%d,\"tok_s\":%.2f,"
                        "\"ttft_p50_ms\":%.1f,\"ttft_p99_ms\":%.1f,\"itl_p50_ms\":%.2f,"
                        "\"itl_p99_ms\":%.2f,\"gen\":%d,\"completion_tokens\":%ld,"
                        "\"wall_s\":%.3f,\"short\":%d}\n",
                        (long long)time(NULL), label, lm->targets[t], n, r.ok, r.errors, r.tok_s,
                        r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms, lm->gen,
                        r.completion_tokens, r.wall_s, r.short_reqs);
        }
        for (int t = 1; t < lm->n_targets; t++)
            if (tps[t] > 0)
                printf("ratio clients=%d: %s / %s = %.2fx%s\n", n, lm->targets[0],
                       lm->targets[t], tps[0] / tps[t],
                       shorts[0] || shorts[t] ? " (unequal work: short requests above)" : "");
    }
    if (jf)
        fclose(jf);
    return 0;
}

int
main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"model", required_argument, 0, 'm'},
        {"threads", required_argument, 0, 't'},
        {"pp", required_argument, 0, 'p'},
        {"tg", required_argument, 0, 'g'},
        {"reps", required_argument, 0, 'r'},
        {"bw-mb", required_argument, 0, 'b'},
        {"json", required_argument, 0, 'j'},
        {"label", required_argument, 0, 'l'},
        {"batched", no_argument, 0, 'B'},
        {"load", required_argument, 0, 'L'},
        {"clients", required_argument, 0, 'C'},
        {"rounds", required_argument, 0, 'R'},
        {"prompt-words", required_argument, 0, 'W'},
        {"gen", required_argument, 0, 'G'},
        {"engine-socket", required_argument, 0, 'E'},
        {"backend", required_argument, 0, 'K'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *model = NULL, *json = NULL, *label = "";
    bool batched = false, cuda = false;
    struct load_mode lm = {.clients = "1,8,32", .rounds = 2, .prompt_words = 245, .gen = 128};
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int n_threads = ncpu > 0 ? (int)ncpu : 1, n_pp = 512, n_tg = 128, reps = 3, bw_mb = 1024;
    const char *prog = "llm-bench";
    int c;
    while ((c = getopt_long(argc, argv, "m:t:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 't':
            if (cm_parse_int_arg(prog, "--threads", optarg, 1, 256, &n_threads) < 0)
                return 2;
            break;
        case 'p':
            if (cm_parse_int_arg(prog, "--pp", optarg, 1, 1 << 20, &n_pp) < 0)
                return 2;
            break;
        case 'g':
            if (cm_parse_int_arg(prog, "--tg", optarg, 1, 1 << 20, &n_tg) < 0)
                return 2;
            break;
        case 'r':
            if (cm_parse_int_arg(prog, "--reps", optarg, 1, 100, &reps) < 0)
                return 2;
            break;
        case 'b':
            if (cm_parse_int_arg(prog, "--bw-mb", optarg, 64, 1 << 20, &bw_mb) < 0)
                return 2;
            break;
        case 'j':
            json = optarg;
            break;
        case 'l':
            label = optarg;
            break;
        case 'B':
            batched = true;
            break;
        case 'L':
            if (lm.n_targets == MAX_TARGETS) {
                fprintf(stderr, "%s: at most %d --load targets\n", prog, MAX_TARGETS);
                return 2;
            }
            lm.targets[lm.n_targets++] = optarg;
            break;
        case 'C':
            lm.clients = optarg;
            break;
        case 'R':
            if (cm_parse_int_arg(prog, "--rounds", optarg, 1, 1 << 20, &lm.rounds) < 0)
                return 2;
            break;
        case 'W':
            if (cm_parse_int_arg(prog, "--prompt-words", optarg, 1, 1 << 20, &lm.prompt_words) < 0)
                return 2;
            break;
        case 'G':
            if (cm_parse_int_arg(prog, "--gen", optarg, 1, 1 << 20, &lm.gen) < 0)
                return 2;
            break;
        case 'E':
            lm.engine_socket = optarg;
            break;
        case 'K': /* --backend cpu|cuda */
            if (strcmp(optarg, "cpu") != 0 && strcmp(optarg, "cuda") != 0) {
                fprintf(stderr, "%s: --backend must be cpu or cuda, got '%s'\n", prog, optarg);
                return 2;
            }
            cuda = strcmp(optarg, "cuda") == 0;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (lm.n_targets > 0)
        return run_load_mode(&lm, json, label);
    if (!model) {
        fprintf(stderr, "%s: -m MODEL is required (or --load TARGET)\n", prog);
        usage(stderr);
        return 2;
    }
    if (cuda)
        return bench_cuda_run(model, n_pp, n_tg, reps, json, label);

    int ret = 1;
    char err[ENG_GGUF_ERR_LEN] = "";
    struct eng_gguf *g = NULL;
    struct eng_model *m = NULL;
    struct kern_pool *pool = NULL;
    struct eng_fwd *fwd = NULL;
    struct eng_kv *kv = NULL;
    float *logits = NULL;
    int n_ctx = (n_pp > n_tg ? n_pp : n_tg) + 1;
    if (eng_gguf_open(model, &g, err, sizeof(err)) < 0 ||
        eng_model_load(g, &m, err, sizeof(err)) < 0) {
        fprintf(stderr, "llm-bench: %s: %s\n", model, err);
        goto out;
    }
    if (kern_pool_new(n_threads, &pool) < 0 || eng_fwd_new(m, pool, 512, n_ctx, &fwd) < 0 ||
        eng_kv_new(m, n_ctx, &kv) < 0 ||
        !(logits = malloc((size_t)m->hp.n_vocab * sizeof(float)))) {
        fprintf(stderr, "llm-bench: cannot allocate the engine\n");
        goto out;
    }

    double *pp = cm_xcalloc((size_t)reps, sizeof(double));
    double *tg = cm_xcalloc((size_t)reps, sizeof(double));
    double *bw = cm_xcalloc((size_t)reps, sizeof(double));
    /* Warm-up: fault in the weights and wake the pool. */
    run_tg(fwd, kv, m, 4, logits);
    /* Alternate the three measurements so drift in the machine affects each alike. */
    for (int r = 0; r < reps; r++) {
        bw[r] = measure_bandwidth(pool, (size_t)bw_mb << 20, 2);
        pp[r] = run_pp(fwd, kv, m, n_pp, logits);
        tg[r] = run_tg(fwd, kv, m, n_tg, logits);
    }
    double pp_med = median(pp, reps), tg_med = median(tg, reps), bw_med = median(bw, reps);
    size_t wbytes = eng_model_weight_bytes(m);
    double floor_tps = bw_med * 1e9 / (double)wbytes;

    printf("model: %s (%.1f MiB of weights read per token), %d threads, ISA %s\n", m->name,
           (double)wbytes / (1 << 20), n_threads, kern_isa_name(kern_cpu_isa()));
    printf("memory read bandwidth: %.1f GB/s\n", bw_med);
    printf("pp%d: %.1f tok/s\n", n_pp, pp_med);
    printf("tg%d: %.1f tok/s (bandwidth floor %.1f tok/s: %.0f%% of it)\n", n_tg, tg_med, floor_tps,
           100.0 * tg_med / floor_tps);
    static const int batch_sizes[] = {1, 2, 4, 8, 16, 32};
    double agg[6] = {0};
    if (batched) {
        for (int i = 0; i < 6; i++) {
            agg[i] = run_batched(m, pool, batch_sizes[i], 128, 64);
            printf("batched decode B=%d: %.1f tok/s aggregate\n", batch_sizes[i], agg[i]);
        }
    }
    if (json) {
        FILE *f = fopen(json, "a");
        if (!f) {
            fprintf(stderr, "llm-bench: %s: %s\n", json, strerror(errno));
        } else {
            char host[128] = "";
            gethostname(host, sizeof(host) - 1);
            fprintf(f, "{\"timestamp\":%lld,\"label\":\"", (long long)time(NULL));
            json_str(f, label);
            fprintf(f, "\",\"host\":\"");
            json_str(f, host);
            fprintf(f, "\",\"model\":\"");
            json_str(f, m->name);
            fprintf(f,
                    "\",\"threads\":%d,\"isa\":\"%s\",\"bandwidth_gbs\":%.2f,\"pp\":%d,"
                    "\"pp_tps\":%.2f,\"tg\":%d,\"tg_tps\":%.2f,\"weight_bytes\":%zu,"
                    "\"tg_floor_fraction\":%.4f",
                    n_threads, kern_isa_name(kern_cpu_isa()), bw_med, n_pp, pp_med, n_tg, tg_med,
                    wbytes, tg_med / floor_tps);
            for (int i = 0; batched && i < 6; i++)
                fprintf(f, ",\"batched_b%d_tps\":%.2f", batch_sizes[i], agg[i]);
            fprintf(f, "}\n");
            fclose(f);
        }
    }
    free(pp);
    free(tg);
    free(bw);
    ret = 0;
out:
    free(logits);
    eng_kv_free(kv);
    eng_fwd_free(fwd);
    kern_pool_free(pool);
    eng_model_free(m);
    eng_gguf_close(g);
    return ret;
}

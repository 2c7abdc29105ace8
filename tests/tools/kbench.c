/*
 * kbench: micro-benchmark of kern_matmul per ISA on SmolLM2-135M shapes.
 *
 * For each weight type, shape (n_in x n_out), batch (n_tok) and ISA it prints the time per call,
 * the weight bandwidth (GB/s, the figure that matters for n_tok = 1) and the integer/float
 * throughput (GOP/s = 2 * n_in * n_out * n_tok per second, the figure for large batches). Weights
 * are spread over copies totalling more than the last-level cache, and calls rotate through them,
 * so decode figures come from memory as in a real forward pass (--hot: one copy, cache-resident).
 *
 * --model instead runs the matmuls of one SmolLM2-135M forward pass (30 layers of Q4_1 q, k, v, o,
 * gate, up, down with their own weights, then the 49152 x 576 Q8_0 head) for n_tok 1 and 512 and
 * prints the matmul-only time per pass and the tokens per second it allows.
 *
 * --pack repacks every matrix first (kern_matrix_repack, the engine's load-time layout for decode).
 *
 * usage: kbench [-t threads] [-T seconds] [--hot] [--pack] [--types q4_1,q8_0] [--ntok 1,512]
 *               [--isa avx512]
 *        kbench --model [--pack] [-t threads] [--isa avx512]
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_util.h"
#include "kernels/kern.h"

struct shape {
    int64_t n_in, n_out;
};

static const struct shape shapes[] = {{576, 576}, {576, 1536}, {1536, 576}, {576, 49152}};

static enum kern_dtype
type_by_name(const char *s)
{
    for (uint32_t t = 0; t < KERN_DTYPE_COUNT; t++) {
        const struct kern_dtype_traits *tr = kern_dtype_traits(t);
        if (tr && tr->supported && !strcmp(tr->name, s))
            return (enum kern_dtype)t;
    }
    return KERN_DTYPE_COUNT;
}

static int pack; /* --pack */

static void
maybe_pack(struct kern_matrix *m)
{
    if (pack && kern_matrix_repack(m) < 0) {
        fprintf(stderr, "kbench: kern_matrix_repack failed\n");
        exit(1);
    }
}

static uint64_t rng_state = 88172645463325252ull;

static float
frand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)(rng_state >> 40) / 16777216.0f - 0.5f;
}

/* Times kern_matmul on n_copies matrices in turn; returns the best of several rounds, in ns per
 * call. */
static double
bench_one(struct kern_pool *pool, struct kern_matrix *m, int n_copies, const float *x, int n_tok,
          float *y, double seconds)
{
    double best = 1e30;
    uint64_t t_end = cm_now_ns() + (uint64_t)(seconds * 1e9);
    int rounds = 0;
    while (rounds < 3 || cm_now_ns() < t_end) {
        uint64_t t0 = cm_now_ns();
        for (int c = 0; c < n_copies; c++)
            if (kern_matmul(pool, &m[c], x, n_tok, y)) {
                fprintf(stderr, "kbench: kern_matmul failed\n");
                exit(1);
            }
        double per = (double)(cm_now_ns() - t0) / n_copies;
        best = per < best ? per : best;
        rounds++;
    }
    return best;
}

static int
parse_list(const char *s, char out[][16], int max)
{
    int n = 0;
    while (*s && n < max) {
        size_t len = strcspn(s, ",");
        snprintf(out[n++], 16, "%.*s", (int)len, s);
        s += len + (s[len] == ',');
    }
    return n;
}

/* ---- The matmuls of one SmolLM2-135M forward pass ---- */

struct model_mat {
    struct kern_matrix m;
    uint8_t *data;
};

static int
model_mats(struct model_mat *mats, int *n_mats)
{
    static const int64_t layer[7][2] = {{576, 576},  {576, 192},  {576, 192}, {576, 576},
                                        {576, 1536}, {576, 1536}, {1536, 576}};
    float *row = malloc(sizeof(float) * 1536);
    if (!row)
        return -1;
    int n = 0;
    for (int l = 0; l <= 30; l++) {
        for (int k = 0; k < (l < 30 ? 7 : 1); k++) {
            enum kern_dtype t = l < 30 ? KERN_DTYPE_Q4_1 : KERN_DTYPE_Q8_0;
            int64_t n_in = l < 30 ? layer[k][0] : 576, n_out = l < 30 ? layer[k][1] : 49152;
            size_t rb = kern_row_bytes((uint32_t)t, n_in);
            uint8_t *data = malloc(rb * (size_t)n_out);
            if (!data)
                return -1;
            for (int64_t o = 0; o < n_out; o++) {
                for (int64_t i = 0; i < n_in; i++)
                    row[i] = frand();
                kern_quantize_row(t, row, data + o * (int64_t)rb, n_in);
            }
            mats[n].data = data;
            mats[n].m = (struct kern_matrix){
                .type = t, .n_in = n_in, .n_out = n_out, .row_bytes = rb, .data = data};
            maybe_pack(&mats[n++].m);
        }
    }
    free(row);
    *n_mats = n;
    return 0;
}

static int
run_model(struct kern_pool *pool, int only_isa)
{
    struct model_mat mats[7 * 30 + 1];
    int n_mats = 0;
    if (model_mats(mats, &n_mats))
        return 1;
    size_t bytes = 0;
    double macs = 0.0;
    for (int i = 0; i < n_mats; i++) {
        bytes += mats[i].m.row_bytes * (size_t)mats[i].m.n_out;
        macs += (double)mats[i].m.n_in * (double)mats[i].m.n_out;
    }
    printf("kbench --model: SmolLM2-135M matmuls, %d matrices, %.1f MiB, threads=%d\n", n_mats,
           (double)bytes / (1 << 20), kern_pool_n_threads(pool));
    static const int ntoks[2] = {1, 512};
    for (int k = 0; k < 2; k++) {
        int n_tok = ntoks[k];
        float *x = malloc(sizeof(float) * 1536 * (size_t)n_tok);
        float *y = malloc(sizeof(float) * 49152 * (size_t)n_tok);
        if (!x || !y)
            return 1;
        for (int64_t i = 0; i < 1536 * (int64_t)n_tok; i++)
            x[i] = frand();
        for (int isa = KERN_ISA_AVX2; isa <= (int)kern_cpu_best_isa(); isa++) {
            if (only_isa >= 0 && isa != only_isa)
                continue;
            kern_cpu_set_isa((enum kern_isa)isa);
            double best = 1e30;
            for (int rep = 0; rep < (n_tok == 1 ? 20 : 3); rep++) {
                uint64_t t0 = cm_now_ns();
                for (int i = 0; i < n_mats; i++)
                    if (kern_matmul(pool, &mats[i].m, x, n_tok, y))
                        return 1;
                double ns = (double)(cm_now_ns() - t0);
                best = ns < best ? ns : best;
            }
            printf("n_tok=%-4d %-7s %9.3f ms/pass %9.1f tok/s %8.2f GB/s %8.1f GOP/s\n", n_tok,
                   kern_isa_name((enum kern_isa)isa), best / 1e6, n_tok * 1e9 / best,
                   (double)bytes / best, 2.0 * macs * n_tok / best);
        }
        free(x);
        free(y);
    }
    for (int i = 0; i < n_mats; i++) {
        kern_matrix_unpack(&mats[i].m);
        free(mats[i].data);
    }
    return 0;
}

int
main(int argc, char **argv)
{
    int n_threads = 2, hot = 0, only_isa = -1, model = 0;
    double seconds = 0.3;
    char types[8][16] = {"q4_1", "q8_0"};
    int n_types = 2;
    int ntoks[8] = {1, 512}, n_ntok = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            n_threads = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "-T") && i + 1 < argc) {
            seconds = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--isa") && i + 1 < argc) {
            i++;
            for (int k = KERN_ISA_SCALAR; k <= KERN_ISA_AVX512; k++)
                if (!strcmp(argv[i], kern_isa_name((enum kern_isa)k)))
                    only_isa = k;
        } else if (!strcmp(argv[i], "--model")) {
            model = 1;
        } else if (!strcmp(argv[i], "--pack")) {
            pack = 1;
        } else if (!strcmp(argv[i], "--hot")) {
            hot = 1;
        } else if (!strcmp(argv[i], "--types") && i + 1 < argc) {
            n_types = parse_list(argv[++i], types, 8);
        } else if (!strcmp(argv[i], "--ntok") && i + 1 < argc) {
            char l[8][16];
            n_ntok = parse_list(argv[++i], l, 8);
            for (int k = 0; k < n_ntok; k++)
                ntoks[k] = atoi(l[k]);
        } else {
            fprintf(stderr, "usage: kbench [-t threads] [-T seconds] [--hot] [--pack] "
                            "[--types q4_1,q8_0] [--ntok 1,512] [--isa scalar|avx2|avx512]\n");
            return 2;
        }
    }
    struct kern_pool *pool = NULL;
    if (kern_pool_new(n_threads, &pool)) {
        fprintf(stderr, "kbench: cannot start %d threads\n", n_threads);
        return 1;
    }
    if (model) {
        int rc = run_model(pool, only_isa);
        kern_pool_free(pool);
        return rc;
    }
    printf("kbench: threads=%d best_isa=%s %s\n", n_threads, kern_isa_name(kern_cpu_best_isa()),
           hot ? "hot (cache-resident weights)" : "cold (weights rotate through > 128 MiB)");
    printf("%-5s %-11s %5s %-7s %10s %9s %9s\n", "type", "shape", "n_tok", "isa", "us/call", "GB/s",
           "GOP/s");
    for (int ti = 0; ti < n_types; ti++) {
        enum kern_dtype t = type_by_name(types[ti]);
        if (t == KERN_DTYPE_COUNT) {
            fprintf(stderr, "kbench: unknown type %s\n", types[ti]);
            return 2;
        }
        for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
            struct shape sh = shapes[si];
            size_t rb = kern_row_bytes((uint32_t)t, sh.n_in), bytes = rb * (size_t)sh.n_out;
            if (!rb)
                continue; /* n_in not a multiple of the block (K-quants: 256) */
            int n_copies = hot ? 1 : (int)((128u << 20) / bytes + 1);
            struct kern_matrix *m = calloc((size_t)n_copies, sizeof(*m));
            uint8_t *data = malloc(bytes * (size_t)n_copies);
            float *row = malloc(sizeof(float) * (size_t)sh.n_in);
            if (!m || !data || !row)
                return 1;
            for (int64_t o = 0; o < sh.n_out; o++) {
                for (int64_t k = 0; k < sh.n_in; k++)
                    row[k] = frand();
                kern_quantize_row(t, row, data + o * (int64_t)rb, sh.n_in);
            }
            for (int c = 0; c < n_copies; c++) {
                if (c)
                    memcpy(data + bytes * (size_t)c, data, bytes);
                m[c] = (struct kern_matrix){.type = t,
                                            .n_in = sh.n_in,
                                            .n_out = sh.n_out,
                                            .row_bytes = rb,
                                            .data = data + bytes * (size_t)c};
                maybe_pack(&m[c]);
            }
            for (int k = 0; k < n_ntok; k++) {
                int n_tok = ntoks[k];
                float *x = malloc(sizeof(float) * (size_t)(sh.n_in * n_tok));
                float *y = malloc(sizeof(float) * (size_t)(sh.n_out * n_tok));
                if (!x || !y)
                    return 1;
                for (int64_t i = 0; i < sh.n_in * n_tok; i++)
                    x[i] = frand();
                for (int isa = KERN_ISA_SCALAR; isa <= (int)kern_cpu_best_isa(); isa++) {
                    if (only_isa >= 0 && isa != only_isa)
                        continue;
                    kern_cpu_set_isa((enum kern_isa)isa);
                    /* the scalar kernels are slow: one short round for large batches */
                    double secs = isa == KERN_ISA_SCALAR && n_tok > 8 ? 0.0 : seconds;
                    int copies = isa == KERN_ISA_SCALAR && n_tok > 8 ? 1 : n_copies;
                    double ns = bench_one(pool, m, copies, x, n_tok, y, secs);
                    char shs[16];
                    snprintf(shs, sizeof(shs), "%lldx%lld", (long long)sh.n_in,
                             (long long)sh.n_out);
                    printf("%-5s %-11s %5d %-7s %10.1f %9.2f %9.1f\n", types[ti], shs, n_tok,
                           kern_isa_name((enum kern_isa)isa), ns / 1e3, (double)bytes / ns,
                           2.0 * (double)sh.n_in * (double)sh.n_out * n_tok / ns);
                    fflush(stdout);
                }
                free(x);
                free(y);
            }
            for (int c = 0; c < n_copies; c++)
                kern_matrix_unpack(&m[c]);
            free(m);
            free(data);
            free(row);
        }
    }
    kern_pool_free(pool);
    return 0;
}

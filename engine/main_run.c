/*
 * llm-run: offline generation on a GGUF model, for trying and testing the engine without HTTP.
 * Prints the completion on stdout as it is generated, then prefill and decode speed on stderr.
 * Exit codes: 0 success, 1 a runtime error (bad model file, prompt too long), 2 bad usage.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_chat.h"
#include "common/cm_log.h"
#include "common/cm_util.h"
#include "engine/gguf.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/model_cuda.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "kernels/kern.h"

#define N_BATCH 512

struct opts {
    const char *model;
    const char *prompt;
    const char *prompt_ids;
    const char *system;
    const char *dump_logits;
    const char *inspect;
    int n_predict;
    int n_threads;
    int n_ctx;
    bool chat;
    bool print_ids;
    bool no_stats;
    bool ignore_eos;
    bool cuda; /* --backend cuda */
    struct eng_sampler_params sp;
};

static void
usage(FILE *f)
{
    fprintf(f,
            "usage: llm-run -m MODEL (-p PROMPT | --prompt-ids ID,ID,...) [options]\n"
            "       llm-run --inspect FILE\n"
            "\n"
            "Generates a completion with the llm-fcgi engine on the CPU, without a server.\n"
            "The completion goes to stdout as it is generated; prefill and decode speed to "
            "stderr.\n"
            "\n"
            "  -m, --model FILE          GGUF model file\n"
            "  -p, --prompt TEXT         prompt text (special tokens such as <|im_start|> are "
            "parsed)\n"
            "      --prompt-ids LIST     prompt as comma-separated token ids instead of text\n"
            "  -n, --n-predict N         tokens to generate (default 128; 0 evaluates the "
            "prompt only)\n"
            "      --chat                wrap the prompt in the model's chat template as a user "
            "message\n"
            "      --system TEXT         system message for --chat (default: the template's "
            "own)\n"
            "      --temp T              temperature (default 0.8; 0 is greedy)\n"
            "      --seed S              sampler seed (default 0)\n"
            "      --top-k K             keep the K most likely tokens (default 40; 0 off)\n"
            "      --top-p P             nucleus sampling (default 0.95; 1 off)\n"
            "      --min-p P             drop tokens below P x the top probability (default "
            "0.05; 0 off)\n"
            "      --repeat-penalty R    repetition penalty over the last 64 tokens (default 1, "
            "off)\n"
            "      --presence-penalty X  OpenAI presence penalty (default 0)\n"
            "      --frequency-penalty X OpenAI frequency penalty (default 0)\n"
            "      --ignore-eos          keep generating past end-of-generation tokens\n"
            "  -t, --threads N           compute threads (default: online CPUs)\n"
            "      --backend cpu|cuda    compute backend (default cpu; cuda: make cuda, a GPU)\n"
            "  -c, --ctx N               context size in tokens (default: the model's, at most "
            "4096)\n"
            "      --print-ids           print generated token ids (one line) instead of text\n"
            "      --dump-logits FILE    write the prompt's logits, float32 [n_prompt][n_vocab]\n"
            "      --no-stats            do not print speed figures\n"
            "      --inspect FILE        print a GGUF file's metadata and tensor table, then exit\n"
            "  -h, --help                this text\n");
}

enum {
    OPT_PROMPT_IDS = 1000,
    OPT_CHAT,
    OPT_SYSTEM,
    OPT_TEMP,
    OPT_SEED,
    OPT_TOP_K,
    OPT_TOP_P,
    OPT_MIN_P,
    OPT_REPEAT,
    OPT_PRESENCE,
    OPT_FREQUENCY,
    OPT_IGNORE_EOS,
    OPT_PRINT_IDS,
    OPT_DUMP_LOGITS,
    OPT_NO_STATS,
    OPT_INSPECT,
    OPT_BACKEND,
};

static int
parse_int(const char *s, const char *what, long lo, long hi, int *out)
{
    return cm_parse_int_arg("llm-run", what, s, lo, hi, out);
}

static int
parse_float(const char *s, const char *what, float *out)
{
    char *end = NULL;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || v != v) {
        fprintf(stderr, "llm-run: %s must be a number, got '%s'\n", what, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* Returns 0 to run, 1 when --help was printed, -1 on bad usage. */
static int
parse_args(int argc, char **argv, struct opts *o)
{
    static const struct option longopts[] = {
        {"model", required_argument, 0, 'm'},
        {"prompt", required_argument, 0, 'p'},
        {"prompt-ids", required_argument, 0, OPT_PROMPT_IDS},
        {"n-predict", required_argument, 0, 'n'},
        {"chat", no_argument, 0, OPT_CHAT},
        {"system", required_argument, 0, OPT_SYSTEM},
        {"temp", required_argument, 0, OPT_TEMP},
        {"seed", required_argument, 0, OPT_SEED},
        {"top-k", required_argument, 0, OPT_TOP_K},
        {"top-p", required_argument, 0, OPT_TOP_P},
        {"min-p", required_argument, 0, OPT_MIN_P},
        {"repeat-penalty", required_argument, 0, OPT_REPEAT},
        {"presence-penalty", required_argument, 0, OPT_PRESENCE},
        {"frequency-penalty", required_argument, 0, OPT_FREQUENCY},
        {"ignore-eos", no_argument, 0, OPT_IGNORE_EOS},
        {"threads", required_argument, 0, 't'},
        {"ctx", required_argument, 0, 'c'},
        {"print-ids", no_argument, 0, OPT_PRINT_IDS},
        {"dump-logits", required_argument, 0, OPT_DUMP_LOGITS},
        {"no-stats", no_argument, 0, OPT_NO_STATS},
        {"inspect", required_argument, 0, OPT_INSPECT},
        {"backend", required_argument, 0, OPT_BACKEND},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    eng_sampler_params_default(&o->sp);
    o->sp.temperature = 0.8f;
    o->sp.top_k = 40;
    o->sp.top_p = 0.95f;
    o->sp.min_p = 0.05f;
    o->sp.repeat_last_n = 64;
    o->n_predict = 128;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    o->n_threads = ncpu > 0 ? (int)ncpu : 1;
    int c, seed = 0;
    while ((c = getopt_long(argc, argv, "m:p:n:t:c:h", longopts, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case 'm':
            o->model = optarg;
            break;
        case 'p':
            o->prompt = optarg;
            break;
        case OPT_PROMPT_IDS:
            o->prompt_ids = optarg;
            break;
        case 'n':
            rc = parse_int(optarg, "-n", 0, 1 << 20, &o->n_predict);
            break;
        case OPT_CHAT:
            o->chat = true;
            break;
        case OPT_SYSTEM:
            o->system = optarg;
            break;
        case OPT_TEMP:
            rc = parse_float(optarg, "--temp", &o->sp.temperature);
            break;
        case OPT_SEED:
            rc = parse_int(optarg, "--seed", 0, INT_MAX, &seed);
            o->sp.seed = (uint64_t)seed;
            break;
        case OPT_TOP_K:
            rc = parse_int(optarg, "--top-k", 0, 1 << 24, &o->sp.top_k);
            break;
        case OPT_TOP_P:
            rc = parse_float(optarg, "--top-p", &o->sp.top_p);
            break;
        case OPT_MIN_P:
            rc = parse_float(optarg, "--min-p", &o->sp.min_p);
            break;
        case OPT_REPEAT:
            rc = parse_float(optarg, "--repeat-penalty", &o->sp.repetition_penalty);
            break;
        case OPT_PRESENCE:
            rc = parse_float(optarg, "--presence-penalty", &o->sp.presence_penalty);
            break;
        case OPT_FREQUENCY:
            rc = parse_float(optarg, "--frequency-penalty", &o->sp.frequency_penalty);
            break;
        case OPT_IGNORE_EOS:
            o->ignore_eos = true;
            break;
        case 't':
            rc = parse_int(optarg, "--threads", 1, 256, &o->n_threads);
            break;
        case 'c':
            rc = parse_int(optarg, "--ctx", 1, 1 << 20, &o->n_ctx);
            break;
        case OPT_PRINT_IDS:
            o->print_ids = true;
            break;
        case OPT_DUMP_LOGITS:
            o->dump_logits = optarg;
            break;
        case OPT_NO_STATS:
            o->no_stats = true;
            break;
        case OPT_INSPECT:
            o->inspect = optarg;
            break;
        case OPT_BACKEND:
            if (strcmp(optarg, "cpu") != 0 && strcmp(optarg, "cuda") != 0) {
                fprintf(stderr, "llm-run: --backend must be cpu or cuda, got '%s'\n", optarg);
                rc = -1;
            }
            o->cuda = strcmp(optarg, "cuda") == 0;
            break;
        case 'h':
            usage(stdout);
            return 1;
        default:
            return -1;
        }
        if (rc < 0)
            return -1;
    }
    if (optind < argc) {
        fprintf(stderr, "llm-run: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (o->inspect)
        return 0;
    if (!o->model) {
        fprintf(stderr, "llm-run: -m MODEL is required (see --help)\n");
        return -1;
    }
    if (!o->prompt == !o->prompt_ids) {
        fprintf(stderr, "llm-run: give exactly one of -p PROMPT and --prompt-ids\n");
        return -1;
    }
    if (o->chat && o->prompt_ids) {
        fprintf(stderr, "llm-run: --chat needs a text prompt (-p)\n");
        return -1;
    }
    return 0;
}

static int
inspect(const char *path)
{
    struct eng_gguf *g = NULL;
    char err[ENG_GGUF_ERR_LEN];
    int rc = eng_gguf_open(path, &g, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "llm-run: %s: %s\n", path, err);
        return 1;
    }
    eng_gguf_print(g, stdout);
    eng_gguf_close(g);
    return 0;
}

/* Parses "1,2,3" into ids checked against the vocabulary. */
static int
parse_ids(const char *s, int n_vocab, int32_t **out, int *n_out)
{
    int cap = 16, n = 0;
    int32_t *ids = cm_xmalloc((size_t)cap * sizeof(*ids));
    const char *p = s;
    while (*p) {
        char *end = NULL;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < 0 || v >= n_vocab || (*end && *end != ',')) {
            fprintf(stderr, "llm-run: --prompt-ids: bad token id near '%.20s' (vocabulary %d)\n", p,
                    n_vocab);
            free(ids);
            return -1;
        }
        if (n == cap) {
            cap *= 2;
            ids = cm_xrealloc(ids, (size_t)cap * sizeof(*ids));
        }
        ids[n++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (n == 0) {
        fprintf(stderr, "llm-run: --prompt-ids is empty\n");
        free(ids);
        return -1;
    }
    *out = ids;
    *n_out = n;
    return 0;
}

/* Renders the chat template around the prompt; returns a malloc'ed string or NULL. */
static char *
render_chat(const struct eng_gguf *g, const struct opts *o)
{
    struct eng_gguf_str tmpl = {0, ""};
    if (eng_gguf_get_str(g, "tokenizer.chat_template", &tmpl) < 0) {
        fprintf(stderr, "llm-run: the model has no chat template; use a plain prompt\n");
        return NULL;
    }
    enum cm_chat_family fam = cm_chat_detect(tmpl.data, (size_t)tmpl.len);
    if (fam == CM_CHAT_UNKNOWN) {
        fprintf(stderr, "llm-run: the model's chat template is of an unknown family\n");
        return NULL;
    }
    char *dflt = NULL;
    if (!o->system && cm_chat_default_system(tmpl.data, (size_t)tmpl.len, &dflt) < 0)
        dflt = NULL;
    struct cm_chat_msg msgs[2];
    int n = 0;
    if (o->system)
        msgs[n++] = (struct cm_chat_msg){.role = "system", .content = o->system};
    msgs[n++] = (struct cm_chat_msg){.role = "user", .content = o->prompt};
    char *text = NULL;
    if (cm_chat_render(fam, dflt, msgs, n, true, &text) < 0) {
        fprintf(stderr, "llm-run: rendering the chat template failed\n");
        text = NULL;
    }
    free(dflt);
    return text;
}

static int
write_logits(const char *path, const float *logits, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "llm-run: %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t w = fwrite(logits, sizeof(float), n, f);
    if (fclose(f) != 0 || w != n) {
        fprintf(stderr, "llm-run: %s: write failed\n", path);
        return -1;
    }
    return 0;
}

/* Streams token text to stdout, holding back an incomplete UTF-8 tail. */
struct out_text {
    char buf[64];
    size_t len;
};

static void
out_text_put(struct out_text *o, const char *bytes, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (o->len == sizeof(o->buf)) {
            fwrite(o->buf, 1, o->len, stdout);
            o->len = 0;
        }
        o->buf[o->len++] = bytes[i];
    }
    size_t ok = eng_tok_utf8_complete(o->buf, o->len);
    fwrite(o->buf, 1, ok, stdout);
    memmove(o->buf, o->buf + ok, o->len - ok);
    o->len -= ok;
    fflush(stdout);
}

/* The forward pass of the chosen backend (exactly one of fwd and cfwd is set). */
static int
run_forward(struct eng_fwd *fwd, struct eng_cuda_fwd *cfwd, struct eng_kv *kv,
            const int32_t *tokens, int n_tokens, float *logits, bool all_logits)
{
    if (cfwd)
        return eng_cuda_forward(cfwd, kv, tokens, n_tokens, logits, all_logits);
    return eng_forward(fwd, kv, tokens, n_tokens, logits, all_logits);
}

static int
generate(const struct opts *o, const struct eng_model *m, const struct eng_tok *tok,
         const int32_t *prompt, int n_prompt)
{
    int ret = 1, rc;
    struct kern_pool *pool = NULL;
    struct eng_fwd *fwd = NULL;
    struct eng_cuda_fwd *cfwd = NULL;
    struct eng_kv *kv = NULL;
    struct eng_sampler *smp = NULL;
    float *logits = NULL;
    int32_t *out_ids = NULL;
    const int n_vocab = m->hp.n_vocab;
    int n_ctx = o->n_ctx ? o->n_ctx : (m->hp.n_ctx_train < 4096 ? m->hp.n_ctx_train : 4096);

    if (n_prompt + o->n_predict > n_ctx) {
        fprintf(stderr,
                "llm-run: the prompt (%d tokens) plus -n %d exceeds the context of %d tokens\n",
                n_prompt, o->n_predict, n_ctx);
        goto out;
    }
    if ((rc = kern_pool_new(o->n_threads, &pool)) < 0 ||
        (!o->cuda && (rc = eng_fwd_new(m, pool, N_BATCH, n_ctx, &fwd)) < 0) ||
        (o->cuda &&
         (rc = eng_cuda_fwd_new(m, N_BATCH, n_ctx, eng_kv_blocks_for(n_ctx), &cfwd)) < 0) ||
        (rc = eng_kv_new(m, n_ctx, &kv)) < 0) {
        fprintf(stderr, "llm-run: cannot allocate the engine: %s\n", strerror(-rc));
        goto out;
    }
    if ((rc = eng_sampler_new(&o->sp, n_vocab, &smp)) < 0) {
        fprintf(stderr, "llm-run: invalid sampling parameters\n");
        goto out;
    }
    size_t n_logit_rows = o->dump_logits ? (size_t)n_prompt : 1;
    logits = malloc(n_logit_rows * (size_t)n_vocab * sizeof(float));
    out_ids = malloc(((size_t)o->n_predict + 1) * sizeof(*out_ids));
    if (!logits || !out_ids) {
        fprintf(stderr, "llm-run: out of memory\n");
        goto out;
    }

    uint64_t t0 = cm_now_ns();
    if ((rc = run_forward(fwd, cfwd, kv, prompt, n_prompt, logits, o->dump_logits != NULL)) < 0) {
        fprintf(stderr, "llm-run: prompt evaluation failed: %s\n", strerror(-rc));
        goto out;
    }
    uint64_t t1 = cm_now_ns();
    if (o->dump_logits) {
        if (write_logits(o->dump_logits, logits, n_logit_rows * (size_t)n_vocab) < 0)
            goto out;
        /* Sampling continues from the last prompt position's logits. */
        memmove(logits, logits + (n_logit_rows - 1) * (size_t)n_vocab,
                (size_t)n_vocab * sizeof(float));
    }

    struct out_text text = {.len = 0};
    int n_gen = 0;
    uint64_t t_dec0 = cm_now_ns();
    while (n_gen < o->n_predict) {
        struct eng_sample s;
        eng_sampler_sample(smp, logits, out_ids, n_gen, &s);
        if (!o->ignore_eos && eng_tok_is_eog(tok, s.id))
            break;
        out_ids[n_gen++] = s.id;
        if (!o->print_ids) {
            const char *piece = NULL;
            size_t len = eng_tok_piece(tok, s.id, false, &piece);
            out_text_put(&text, piece, len);
        }
        if (n_gen == o->n_predict)
            break;
        if ((rc = run_forward(fwd, cfwd, kv, &s.id, 1, logits, false)) < 0) {
            fprintf(stderr, "llm-run: decode failed: %s\n", strerror(-rc));
            goto out;
        }
    }
    uint64_t t_dec1 = cm_now_ns();
    if (o->print_ids) {
        for (int i = 0; i < n_gen; i++)
            printf("%s%d", i ? " " : "", out_ids[i]);
        printf("\n");
    } else {
        fwrite(text.buf, 1, text.len, stdout);
        printf("\n");
    }
    fflush(stdout);
    if (!o->no_stats) {
        double pf_s = (double)(t1 - t0) / 1e9, dec_s = (double)(t_dec1 - t_dec0) / 1e9;
        fprintf(stderr, "prefill: %d tokens, %.1f tok/s\n", n_prompt,
                pf_s > 0 ? n_prompt / pf_s : 0.0);
        /* The decode figure counts forward passes: the first token came from the prefill. */
        int n_steps = n_gen > 0 ? n_gen - (n_gen == o->n_predict ? 1 : 0) : 0;
        fprintf(stderr, "decode: %d tokens, %.1f tok/s\n", n_gen,
                dec_s > 0 && n_steps > 0 ? n_steps / dec_s : 0.0);
    }
    ret = 0;
out:
    free(out_ids);
    free(logits);
    eng_sampler_free(smp);
    eng_kv_free(kv);
    eng_fwd_free(fwd);
    eng_cuda_fwd_free(cfwd);
    kern_pool_free(pool);
    return ret;
}

int
main(int argc, char **argv)
{
    struct opts o = {0};
    int prc = parse_args(argc, argv, &o);
    if (prc != 0)
        return prc > 0 ? 0 : 2;
    cm_log_set_level(CM_LOG_WARN);
    if (o.inspect)
        return inspect(o.inspect);
    char cuda_msg[256];
    if (o.cuda && eng_cuda_available(cuda_msg, sizeof(cuda_msg)) < 0) {
        fprintf(stderr, "llm-run: --backend cuda: %s\n", cuda_msg);
        return 2;
    }

    int ret = 1;
    struct eng_gguf *g = NULL;
    struct eng_model *m = NULL;
    struct eng_tok *tok = NULL;
    int32_t *ids = NULL;
    int n_ids = 0;
    char *chat = NULL;
    char err[ENG_GGUF_ERR_LEN] = "";

    if (eng_gguf_open(o.model, &g, err, sizeof(err)) < 0 ||
        eng_model_load(g, &m, err, sizeof(err)) < 0 || eng_tok_new(g, &tok, err, sizeof(err)) < 0) {
        fprintf(stderr, "llm-run: %s: %s\n", o.model, err);
        goto out;
    }
    if (o.prompt_ids) {
        if (parse_ids(o.prompt_ids, m->hp.n_vocab, &ids, &n_ids) < 0) {
            ret = 2;
            goto out;
        }
    } else {
        const char *text = o.prompt;
        if (o.chat && !(text = chat = render_chat(g, &o)))
            goto out;
        if (eng_tok_encode(tok, text, strlen(text), eng_tok_add_bos(tok), true, &ids, &n_ids) < 0) {
            fprintf(stderr, "llm-run: tokenization failed\n");
            goto out;
        }
        if (n_ids == 0) {
            fprintf(stderr, "llm-run: the prompt is empty\n");
            goto out;
        }
    }
    ret = generate(&o, m, tok, ids, n_ids);
out:
    free(chat);
    free(ids);
    eng_tok_free(tok);
    eng_model_free(m);
    eng_gguf_close(g);
    return ret;
}

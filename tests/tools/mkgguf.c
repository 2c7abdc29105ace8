/*
 * mkgguf: writes a tiny llama-family GGUF model with random weights, for tests (no downloads).
 *
 * The model is complete: llama or qwen2 hyper-parameters, every tensor a loader needs under the
 * standard GGUF names, and a byte-level BPE tokenizer ("gpt2", pre "gpt-2") whose 256 byte tokens,
 * four merges and three ChatML control tokens work end to end, plus a ChatML chat template.
 * Weights come from a seeded splitmix64 stream per tensor (same options, same file) with std
 * 1/sqrt(row length), so activations stay O(1) through the layers. --corrupt KIND writes one of a
 * set of bad files instead (see usage()); the first ten are broken GGUF, the last three are valid
 * GGUF but a wrong model, which the model loader has to reject.
 *
 * --degenerate KIND --vocab-from MODEL.gguf writes a deterministic degenerate model instead: the
 * tokenizer.* metadata (vocabulary, merges, special tokens, chat template) of MODEL, tiny
 * dimensions, and weights chosen so that the real forward pass emits a fixed sequence forever and
 * never EOS, whatever the prompt: PREFIX once, then CYCLE again and again (KIND names a built-in
 * pair, see degen_kinds; --degenerate-text CYCLE and --degenerate-prefix PREFIX give others). How:
 * PREFIX and CYCLE are cut into tokens of MODEL's vocabulary that are all distinct (any cut whose
 * pieces concatenate to the text, found by a longest-first search, so the decoded text is exact);
 * graph token i gets slot i, every other token slot S-1. The embedding of a token is the one-hot
 * of its slot, every attention and FFN matrix is zero (the residual stream keeps the one-hot), the
 * norms are 1, and output row u holds DEGEN_LOGIT / sqrt(dim) in column k when u follows slot k:
 * the next token is next(current) with a logit of DEGEN_LOGIT against 0 for every other token
 * (greedy and temperature sampling alike; penalties and logit_bias cannot overturn it). The cycle's
 * last token is followed by its first; slot S-1 (a prompt ending in a token outside the graph) by
 * the first token of PREFIX (or CYCLE). A prompt that ends in a graph token continues after it.
 * The token that is exactly "\n" is used only as the last token of CYCLE (a ChatML generation
 * prompt ends in it, so chat requests start at the beginning). Besides OUT, OUT.json describes the
 * model for tests: {"kind", "prefix", "cycle", "prefix_ids", "cycle_ids", "logit", "order"} (and
 * "attention_margin" for second order).
 * Limit: the next token depends on the current one only, so the text must have a cut into
 * distinct tokens; with SmolLM2's vocabulary a whole tool call (two "tool_call" tags, many '"')
 * has none. Kinds marked second-order (toolcall) lift that limit with a real one-layer circuit:
 *
 * Second order: the next token depends on (previous, current). The cut only needs distinct
 * pairs of neighbours (and a first token that occurs once). Rules: (any, g0) -> g1, then
 * (g[j-1], g[j]) -> g[j+1] along PREFIX + CYCLE with the wrap to CYCLE's start (plus the pair
 * across the wrap when there is a PREFIX); a prompt whose last two tokens match no rule gets g0,
 * so any prompt starts at the beginning. One layer, one head of size n_embd, residual layout:
 * dim 0 a constant 1; CUR, the one-hot of the current token's slot (distinct graph tokens, then
 * one slot for every other token); PREV, written by attention; STATE, one dim per rule, written by
 * the FFN. The embedding is e0 + CUR, so every residual has the same norm at each stage (2, 3,
 * then 4 or 3) and the RMSNorm factors r0, r1, r2 are known. Attention is a previous-token head
 * aimed by RoPE: q and k read only dim 0; k's pair i is (B, 0), q's pair i is A*(cos t_i, -sin t_i)
 * (one step back), so the score at distance d is A*B/sqrt(hd) * sum_i cos(t_i*(d-1)), largest at
 * d = 1 for every pair at once; the scale is chosen, and then checked on the quantized weights
 * for d = 0..ctx, so that softmax leaves less than e^-40 of weight anywhere else (the margin is
 * printed). Position 0 attends to itself (then prev = cur: no rule but the first-order one).
 * v = CUR, W_o writes it to PREV. FFN unit r (rule r = (p, c)): gate = up = G*(prev_p + cur_c -
 * 1) (for "any": the sum of all PREV slots, which is 1): G on a match, exactly 0 when one of the
 * two matches, -G when none, so silu(gate)*up is G*silu(G), 0 or ~0; the down projection writes 1
 * to STATE r. Output row t: DEGEN_LOGIT / r2 on each STATE r whose rule yields t, and
 * DEGEN_LOGIT / 2 / r2 on dim 0 for g0: logits 400 for the next token, 200 for g0 (the default),
 * 0 for the rest. All coefficients of a row share one magnitude where a row mixes them, so Q8_0
 * stores them exactly up to its f16 scale.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-c/json.h>

#include "common/cm_util.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "kernels/kern.h"
#include "kernels/quant.h"

#define MK_ALIGN 32
#define MK_MAX_TENSORS 1024
#define MK_N_BYTE_TOKENS 256
#define DEGEN_LOGIT 400.0f   /* the next token's logit; every other token's is 0 */
#define DEGEN_MAX_GRAPH 1024 /* tokens in PREFIX + CYCLE */
#define DEGEN_SEARCH_STEPS 2000000
#define DEGEN_GATE 16.0f   /* second order: FFN gate and up on a rule's match */
#define DEGEN_ATTN_LEAK 40 /* second order: attention weight off the previous token < e^-this */

struct mk_opts {
    const char *out;
    enum kern_dtype type;
    const char *arch;
    int layers, dim, heads, kv_heads, ffn, ctx;
    int vocab; /* 0: the minimal vocabulary; more pads it with <unused_N> control tokens */
    uint64_t seed;
    bool tied;
    uint32_t version;
    const char *corrupt;
    const char *degen_kind;   /* --degenerate */
    const char *degen_text;   /* the cycle */
    const char *degen_prefix; /* emitted once before the cycle */
    const char *vocab_from;   /* --vocab-from */
    int degen_order;          /* --degenerate-order: 0 the kind's (custom text: 1) */
};

/* A second-order rule: (previous token's slot, current token's slot) -> next token. */
struct degen_rule {
    int prev; /* a slot, or -1: any previous token */
    int cur;
    int32_t next;
};

/* What the degenerate model emits: graph[0..n_prefix) once, then graph[n_prefix..n) forever. */
struct mk_degen {
    struct eng_gguf *src;
    struct eng_tok *tok;
    int32_t graph[DEGEN_MAX_GRAPH];
    int n, n_prefix;
    int n_slots;      /* first order: n + 1, second: distinct graph tokens + 1; the last slot is
                         every token outside the graph */
    int32_t *slot_of; /* (n_vocab) */
    int order;        /* 1 or 2 */
    /* second order: the rules and the circuit (see the top of this file) */
    struct degen_rule rules[DEGEN_MAX_GRAPH + 1];
    int n_rules;
    int o_cur, o_prev, o_state; /* offsets of the residual blocks */
    float r0, r1, r2;           /* RMSNorm factors before attention, FFN, output */
    float qk;                   /* A = B */
    double attn_margin;         /* smallest score gap to the previous token, d = 0..ctx */
    int attn_margin_at;
};

struct mk_tensor {
    char name[64];
    uint32_t n_dims;
    uint64_t ne[2];
    enum kern_dtype type;
    float mean, std; /* weights are mean + std * (uniform with unit variance) */
    int fill;        /* FILL_RANDOM, or a degenerate model's embedding / output */
    uint64_t offset; /* in the data section */
    uint64_t n_bytes;
    size_t info_pos; /* where its tensor-info record starts in the info buffer */
};

enum {
    FILL_RANDOM = 0,
    FILL_DEGEN_EMBD,
    FILL_DEGEN_OUT,
    FILL_DEGEN_Q, /* second order: layer 0's matrices */
    FILL_DEGEN_K,
    FILL_DEGEN_V,
    FILL_DEGEN_O,
    FILL_DEGEN_GATE, /* gate and up are the same */
    FILL_DEGEN_DOWN,
};

struct mk_buf {
    uint8_t *p;
    size_t len, cap;
};

struct mk_model {
    struct mk_tensor t[MK_MAX_TENSORS];
    int n_tensors;
    char **tokens;
    int n_tokens;
    struct mk_buf kv, info;
    uint64_t n_kv;
    size_t first_key_pos; /* offset of the first key's length in kv */
    uint64_t data_bytes;
    struct mk_degen *degen; /* NULL: random weights */
};

/* ---- Byte buffer ---- */

static void
buf_put(struct mk_buf *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 256;
        b->p = cm_xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void
buf_u32(struct mk_buf *b, uint32_t v)
{
    buf_put(b, &v, 4);
}

static void
buf_u64(struct mk_buf *b, uint64_t v)
{
    buf_put(b, &v, 8);
}

static void
buf_str(struct mk_buf *b, const char *s)
{
    buf_u64(b, strlen(s));
    buf_put(b, s, strlen(s));
}

static void
patch_u32(struct mk_buf *b, size_t pos, uint32_t v)
{
    memcpy(b->p + pos, &v, 4);
}

static void
patch_u64(struct mk_buf *b, size_t pos, uint64_t v)
{
    memcpy(b->p + pos, &v, 8);
}

/* ---- Metadata ---- */

enum { VT_U32 = 4, VT_I32 = 5, VT_F32 = 6, VT_BOOL = 7, VT_STRING = 8, VT_ARRAY = 9 };

static void
kv_key(struct mk_model *m, const char *key, uint32_t vtype)
{
    if (m->n_kv == 0)
        m->first_key_pos = m->kv.len;
    buf_str(&m->kv, key);
    buf_u32(&m->kv, vtype);
    m->n_kv++;
}

static void
kv_u32(struct mk_model *m, const char *key, uint32_t v)
{
    kv_key(m, key, VT_U32);
    buf_u32(&m->kv, v);
}

static void
kv_f32(struct mk_model *m, const char *key, float v)
{
    kv_key(m, key, VT_F32);
    buf_put(&m->kv, &v, 4);
}

static void
kv_bool(struct mk_model *m, const char *key, bool v)
{
    uint8_t b = v;
    kv_key(m, key, VT_BOOL);
    buf_put(&m->kv, &b, 1);
}

static void
kv_str(struct mk_model *m, const char *key, const char *v)
{
    kv_key(m, key, VT_STRING);
    buf_str(&m->kv, v);
}

static void
kv_arr_str(struct mk_model *m, const char *key, char *const *v, int n)
{
    kv_key(m, key, VT_ARRAY);
    buf_u32(&m->kv, VT_STRING);
    buf_u64(&m->kv, (uint64_t)n);
    for (int i = 0; i < n; i++)
        buf_str(&m->kv, v[i]);
}

static void
kv_arr_i32(struct mk_model *m, const char *key, const int32_t *v, int n)
{
    kv_key(m, key, VT_ARRAY);
    buf_u32(&m->kv, VT_I32);
    buf_u64(&m->kv, (uint64_t)n);
    buf_put(&m->kv, v, (size_t)n * 4);
}

static void
kv_archf(struct mk_model *m, const struct mk_opts *o, const char *suffix, uint32_t v)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", o->arch, suffix);
    kv_u32(m, key, v);
}

/* ---- Tokenizer: GPT-2 byte-level BPE ---- */

static const char *const merge_tokens[] = {"\xc4\xa0t", "he", "\xc4\xa0the", "in"};
static const char *const merges[] = {"\xc4\xa0 t", "h e", "\xc4\xa0t he", "i n"};
static const char *const special_tokens[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
#define N_MERGES 4
#define N_SPECIAL 3

static const char chatml_template[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\\n' "
    "}}{% endif %}";

/* The code point GPT-2's byte-level BPE uses for byte b: printable Latin-1 bytes stand for
 * themselves, the others are moved, in byte order, to 256 and up. */
static uint32_t
byte_to_codepoint(int b)
{
    int n = 0;
    for (int x = 0; x < 256; x++) {
        bool printable = (x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || (x >= 0xae);
        if (x == b)
            return printable ? (uint32_t)x : (uint32_t)(256 + n);
        if (!printable)
            n++;
    }
    return 0;
}

static char *
utf8_of(uint32_t cp)
{
    char *s = cm_xmalloc(4);
    if (cp < 0x80) {
        s[0] = (char)cp;
        s[1] = 0;
    } else {
        s[0] = (char)(0xc0 | (cp >> 6));
        s[1] = (char)(0x80 | (cp & 0x3f));
        s[2] = 0;
    }
    return s;
}

static void
build_vocab(struct mk_model *m, int n_vocab)
{
    int n_base = MK_N_BYTE_TOKENS + N_MERGES + N_SPECIAL;
    m->n_tokens = n_vocab > n_base ? n_vocab : n_base;
    m->tokens = cm_xcalloc((size_t)m->n_tokens, sizeof(char *));
    for (int b = 0; b < MK_N_BYTE_TOKENS; b++)
        m->tokens[b] = utf8_of(byte_to_codepoint(b));
    for (int i = 0; i < N_MERGES; i++)
        m->tokens[MK_N_BYTE_TOKENS + i] = cm_xstrdup(merge_tokens[i]);
    for (int i = 0; i < N_SPECIAL; i++)
        m->tokens[MK_N_BYTE_TOKENS + N_MERGES + i] = cm_xstrdup(special_tokens[i]);
    for (int i = n_base; i < m->n_tokens; i++) {
        char name[32];
        snprintf(name, sizeof(name), "<unused_%d>", i - n_base);
        m->tokens[i] = cm_xstrdup(name);
    }
}

static void
write_metadata(struct mk_model *m, const struct mk_opts *o)
{
    int32_t *types = cm_xcalloc((size_t)m->n_tokens, sizeof(*types));
    int first_special = MK_N_BYTE_TOKENS + N_MERGES;
    uint32_t vocab_meta = (uint32_t)m->n_tokens;
    char key[128];
    if (o->corrupt && strcmp(o->corrupt, "vocab") == 0)
        vocab_meta += 5;
    kv_str(m, "general.architecture", o->arch);
    kv_str(m, "general.name", "mkgguf tiny test model");
    kv_u32(m, "general.alignment", MK_ALIGN);
    kv_archf(m, o, "context_length", (uint32_t)o->ctx);
    kv_archf(m, o, "embedding_length", (uint32_t)o->dim);
    kv_archf(m, o, "block_count", (uint32_t)o->layers);
    kv_archf(m, o, "feed_forward_length", (uint32_t)o->ffn);
    kv_archf(m, o, "attention.head_count", (uint32_t)o->heads);
    kv_archf(m, o, "attention.head_count_kv", (uint32_t)o->kv_heads);
    kv_archf(m, o, "rope.dimension_count", (uint32_t)(o->dim / o->heads));
    kv_archf(m, o, "vocab_size", vocab_meta);
    snprintf(key, sizeof(key), "%s.rope.freq_base", o->arch);
    kv_f32(m, key, 10000.0f);
    snprintf(key, sizeof(key), "%s.attention.layer_norm_rms_epsilon", o->arch);
    kv_f32(m, key, 1e-5f);

    kv_str(m, "tokenizer.ggml.model", "gpt2");
    kv_str(m, "tokenizer.ggml.pre", "gpt-2");
    kv_arr_str(m, "tokenizer.ggml.tokens", m->tokens, m->n_tokens);
    for (int i = 0; i < m->n_tokens; i++)
        types[i] = i >= first_special ? 3 : 1; /* 3: control, 1: normal */
    kv_arr_i32(m, "tokenizer.ggml.token_type", types, m->n_tokens);
    kv_arr_str(m, "tokenizer.ggml.merges", (char *const *)merges, N_MERGES);
    kv_u32(m, "tokenizer.ggml.bos_token_id", (uint32_t)first_special);     /* <|endoftext|> */
    kv_u32(m, "tokenizer.ggml.eos_token_id", (uint32_t)first_special + 2); /* <|im_end|> */
    kv_u32(m, "tokenizer.ggml.padding_token_id", (uint32_t)first_special); /* <|endoftext|> */
    kv_bool(m, "tokenizer.ggml.add_bos_token", false);
    kv_str(m, "tokenizer.chat_template", chatml_template);
    free(types);
}

/* ---- Degenerate models: metadata from another GGUF ---- */

static size_t
vtype_size(enum eng_gguf_vtype t)
{
    switch (t) {
    case ENG_GGUF_U8:
    case ENG_GGUF_I8:
    case ENG_GGUF_BOOL:
        return 1;
    case ENG_GGUF_U16:
    case ENG_GGUF_I16:
        return 2;
    case ENG_GGUF_U32:
    case ENG_GGUF_I32:
    case ENG_GGUF_F32:
        return 4;
    default:
        return 8;
    }
}

/* Appends one key/value of a validated GGUF file as it was. */
static void
kv_copy(struct mk_model *m, const struct eng_gguf_kv *kv)
{
    char key[256];
    snprintf(key, sizeof(key), "%.*s", (int)kv->key.len, kv->key.data);
    kv_key(m, key, (uint32_t)kv->type);
    if (kv->type == ENG_GGUF_STRING) {
        buf_u64(&m->kv, kv->v.str.len);
        buf_put(&m->kv, kv->v.str.data, (size_t)kv->v.str.len);
    } else if (kv->type == ENG_GGUF_ARRAY) {
        const struct eng_gguf_arr *a = &kv->v.arr;
        buf_u32(&m->kv, (uint32_t)a->type);
        buf_u64(&m->kv, a->n);
        for (uint64_t i = 0; a->type == ENG_GGUF_STRING && i < a->n; i++) {
            buf_u64(&m->kv, a->strs[i].len);
            buf_put(&m->kv, a->strs[i].data, (size_t)a->strs[i].len);
        }
        if (a->type != ENG_GGUF_STRING)
            buf_put(&m->kv, a->data, (size_t)a->n * vtype_size(a->type));
    } else if (kv->type == ENG_GGUF_F32) {
        float f = (float)kv->v.f64;
        buf_put(&m->kv, &f, 4);
    } else if (kv->type == ENG_GGUF_F64) {
        buf_put(&m->kv, &kv->v.f64, 8);
    } else if (kv->type == ENG_GGUF_I8 || kv->type == ENG_GGUF_I16 || kv->type == ENG_GGUF_I32 ||
               kv->type == ENG_GGUF_I64) {
        buf_put(&m->kv, &kv->v.i64, vtype_size(kv->type)); /* little-endian: the low bytes */
    } else {
        buf_put(&m->kv, &kv->v.u64, vtype_size(kv->type));
    }
}

static void
write_metadata_degen(struct mk_model *m, const struct mk_opts *o)
{
    char key[128], name[96];
    snprintf(name, sizeof(name), "mkgguf degenerate %s", o->degen_kind ? o->degen_kind : "custom");
    kv_str(m, "general.architecture", o->arch);
    kv_str(m, "general.name", name);
    kv_u32(m, "general.alignment", MK_ALIGN);
    kv_archf(m, o, "context_length", (uint32_t)o->ctx);
    kv_archf(m, o, "embedding_length", (uint32_t)o->dim);
    kv_archf(m, o, "block_count", (uint32_t)o->layers);
    kv_archf(m, o, "feed_forward_length", (uint32_t)o->ffn);
    kv_archf(m, o, "attention.head_count", (uint32_t)o->heads);
    kv_archf(m, o, "attention.head_count_kv", (uint32_t)o->kv_heads);
    kv_archf(m, o, "rope.dimension_count", (uint32_t)(o->dim / o->heads));
    kv_archf(m, o, "vocab_size", (uint32_t)m->n_tokens);
    snprintf(key, sizeof(key), "%s.rope.freq_base", o->arch);
    kv_f32(m, key, 10000.0f);
    snprintf(key, sizeof(key), "%s.attention.layer_norm_rms_epsilon", o->arch);
    kv_f32(m, key, 1e-5f);
    const struct eng_gguf *g = m->degen->src;
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const struct eng_gguf_kv *kv = &g->kv[i];
        if (kv->key.len > 10 && memcmp(kv->key.data, "tokenizer.", 10) == 0)
            kv_copy(m, kv);
    }
}

/* The built-in degenerate outputs. */
static const struct {
    const char *kind, *prefix, *cycle;
    int order; /* 1: next(current); 2: next(previous, current) */
} degen_kinds[] = {
    /* the same sentence, no line break: sentence_loop (the third) before line_repeat (the 4th) */
    {"sentence", "", "I will run the same build command again to see whether it works now. ", 1},
    /* the same line, no sentence end: line_repeat (sentence_loop cuts only at 1024 bytes) */
    {"line", "", "retry the build with the same flags and options\n", 1},
    /* a period of 16 tokens, no sentence end, no line: token_loop trips at 48 tokens (3
     * periods), before line_repeat's 30-byte phrase can occur a 4th time (after 52) */
    {"tokens", "",
     " time people year way day man thing woman life child world school state family student"
     " group",
     1},
    /* a tool call that opens a JSON string and never closes it: unterminated_tool_call */
    {"unterminated", "<tool_call>{\"", "lorem ipsum dolor sit amet ", 1},
    /* the same complete tool call again and again (second order): the tool-loop guards */
    {"toolcall", "",
     "<tool_call>{\"name\":\"bash\",\"arguments\":{\"command\":\"which cargo\"}}</tool_call>", 2},
};

struct degen_search {
    int order;
    const char *text;
    size_t len, boundary; /* the prefix ends at boundary: no token crosses it */
    int n_vocab;
    const char **piece;
    size_t *piece_len;
    uint8_t *usable, *used;
    int32_t **cand; /* (len) per position: the usable ids whose piece starts there, longest first */
    int *n_cand;
    int32_t *path;
    int n_path;
    long steps;
};

/* Second order: may id follow the path? The first token occurs once, every pair of neighbours
 * once. */
static bool
degen_pair_ok(const struct degen_search *d, int32_t id)
{
    int n = d->n_path;
    if (n > 0 && id == d->path[0])
        return false;
    for (int j = 1; j < n; j++) {
        if (d->path[j - 1] == d->path[n - 1] && d->path[j] == id)
            return false;
    }
    return true;
}

/* Second order, a complete cut: with a prefix, the pair across the wrap (last token, first of
 * the cycle) is one more rule, which must be new too. */
static bool
degen_wrap_ok(const struct degen_search *d)
{
    int n = d->n_path, np = 0;
    size_t at = 0;
    while (np < n && at < d->boundary)
        at += d->piece_len[d->path[np++]];
    if (n < 2 || np == 0)
        return n >= 2;
    for (int j = 1; j < n; j++) {
        if (d->path[j - 1] == d->path[n - 1] && d->path[j] == d->path[np])
            return false;
    }
    return true;
}

/* Depth-first, longest piece first: a cut of text[at..] into unused tokens (first order) or
 * into tokens with distinct pairs of neighbours (second order). */
static bool
degen_cut(struct degen_search *d, size_t at)
{
    if (at == d->len)
        return d->order == 1 || degen_wrap_ok(d);
    if (++d->steps > DEGEN_SEARCH_STEPS || d->n_path == DEGEN_MAX_GRAPH)
        return false;
    for (int c = 0; c < d->n_cand[at]; c++) {
        int32_t id = d->cand[at][c];
        if (d->order == 1 ? d->used[id] != 0 : !degen_pair_ok(d, id))
            continue;
        d->used[id] = 1;
        d->path[d->n_path++] = id;
        if (degen_cut(d, at + d->piece_len[id]))
            return true;
        d->n_path--;
        d->used[id] = 0;
    }
    return false;
}

/* Fills cand[at]: usable ids whose piece matches text at `at` without crossing the prefix's end;
 * "\n" alone only as the very last token (see the top of this file). */
static void
degen_candidates(struct degen_search *d, size_t at)
{
    size_t limit = at < d->boundary ? d->boundary : d->len;
    int32_t *c = cm_xmalloc((size_t)d->n_vocab * sizeof(int32_t));
    int n = 0;
    for (int id = 0; id < d->n_vocab; id++) {
        size_t want = d->piece_len[id];
        if (!d->usable[id] || want > limit - at || memcmp(d->piece[id], d->text + at, want) != 0)
            continue;
        if (want == 1 && d->text[at] == '\n' && at + 1 != d->len)
            continue;
        int j = n++;
        while (j > 0 && d->piece_len[c[j - 1]] < want) { /* longest first, stable */
            c[j] = c[j - 1];
            j--;
        }
        c[j] = id;
    }
    d->cand[at] = c;
    d->n_cand[at] = n;
}

/* The graph position that follows position i: the wrap goes to the cycle's start. */
static int
degen_after(const struct mk_degen *dg, int i)
{
    return i + 1 < dg->n ? i + 1 : dg->n_prefix;
}

/* Second order: slots (distinct graph tokens in order of appearance, then "other") and rules
 * (see the top of this file); degen_cut made every rule's key unique. */
static void
degen_rules(struct mk_degen *dg, int n_vocab)
{
    int k = 0;
    for (int id = 0; id < n_vocab; id++)
        dg->slot_of[id] = -1;
    for (int i = 0; i < dg->n; i++) {
        if (dg->slot_of[dg->graph[i]] < 0)
            dg->slot_of[dg->graph[i]] = k++;
    }
    for (int id = 0; id < n_vocab; id++) {
        if (dg->slot_of[id] < 0)
            dg->slot_of[id] = k;
    }
    dg->n_slots = k + 1;
    dg->n_rules = 0;
    for (int i = 0; i < dg->n; i++) {
        struct degen_rule *r = &dg->rules[dg->n_rules++];
        r->prev = i == 0 ? -1 : dg->slot_of[dg->graph[i - 1]];
        r->cur = dg->slot_of[dg->graph[i]];
        r->next = dg->graph[degen_after(dg, i)];
    }
    if (dg->n_prefix > 0) { /* the pair across the wrap */
        struct degen_rule *r = &dg->rules[dg->n_rules++];
        r->prev = dg->slot_of[dg->graph[dg->n - 1]];
        r->cur = dg->slot_of[dg->graph[dg->n_prefix]];
        r->next = dg->graph[degen_after(dg, dg->n_prefix)];
    }
}

static int
degen_build(struct mk_degen *dg, const char *prefix, const char *cycle)
{
    int n_vocab = eng_tok_n_vocab(dg->tok);
    struct degen_search d = {
        .order = dg->order, .len = strlen(prefix) + strlen(cycle), .boundary = strlen(prefix)};
    char *text = cm_xmalloc(d.len + 1);
    snprintf(text, d.len + 1, "%s%s", prefix, cycle);
    d.text = text;
    d.n_vocab = n_vocab;
    d.piece = cm_xcalloc((size_t)n_vocab, sizeof(*d.piece));
    d.piece_len = cm_xcalloc((size_t)n_vocab, sizeof(*d.piece_len));
    d.usable = cm_xcalloc((size_t)n_vocab, 1);
    d.used = cm_xcalloc((size_t)n_vocab, 1);
    d.path = dg->graph;
    for (int id = 0; id < n_vocab; id++) {
        d.piece_len[id] = eng_tok_piece(dg->tok, id, false, &d.piece[id]);
        d.usable[id] = d.piece_len[id] > 0 && d.piece_len[id] <= d.len &&
                       !eng_tok_is_eog(dg->tok, id) && id != eng_tok_bos(dg->tok) &&
                       id != eng_tok_eos(dg->tok);
    }
    d.cand = cm_xcalloc(d.len + 1, sizeof(*d.cand));
    d.n_cand = cm_xcalloc(d.len + 1, sizeof(*d.n_cand));
    for (size_t at = 0; at < d.len; at++)
        degen_candidates(&d, at);
    int rc = 0;
    if (strlen(cycle) == 0 || !degen_cut(&d, 0)) {
        fprintf(stderr, "mkgguf: no cut of the degenerate text into distinct %s (%ld steps)\n",
                d.order == 1 ? "tokens" : "pairs of neighbours", d.steps);
        rc = -EINVAL;
    } else {
        dg->n = d.n_path;
        for (int i = 0; i < d.n_path; i++) {
            size_t at = 0;
            for (int j = 0; j < i; j++)
                at += d.piece_len[dg->graph[j]];
            if (at == d.boundary)
                dg->n_prefix = i;
        }
        if (d.boundary == 0)
            dg->n_prefix = 0;
        dg->slot_of = cm_xmalloc((size_t)n_vocab * sizeof(*dg->slot_of));
        if (dg->order == 2) {
            degen_rules(dg, n_vocab);
        } else {
            dg->n_slots = dg->n + 1;
            for (int id = 0; id < n_vocab; id++)
                dg->slot_of[id] = dg->n; /* outside the graph */
            for (int i = 0; i < dg->n; i++)
                dg->slot_of[dg->graph[i]] = i;
        }
    }
    for (size_t at = 0; at < d.len; at++)
        free(d.cand[at]);
    free(d.cand);
    free(d.n_cand);
    free(text);
    free(d.piece);
    free(d.piece_len);
    free(d.usable);
    free(d.used);
    return rc;
}

static int encode_row(enum kern_dtype type, const float *src, void *dst, int64_t n);

/* The token that follows slot k. */
static int32_t
degen_next(const struct mk_degen *dg, int k)
{
    if (k == dg->n)
        return dg->graph[0];
    return k + 1 < dg->n ? dg->graph[k + 1] : dg->graph[dg->n_prefix];
}

static struct json_object *
json_ids(const int32_t *ids, int n)
{
    struct json_object *a = json_object_new_array();
    for (int i = 0; i < n; i++)
        json_object_array_add(a, json_object_new_int(ids[i]));
    return a;
}

/* OUT.json: what the model emits, for tests. */
static int
degen_describe(const struct mk_degen *dg, const struct mk_opts *o, const char *prefix,
               const char *cycle)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s.json", o->out);
    struct json_object *j = json_object_new_object();
    json_object_object_add(j, "kind", json_object_new_string(o->degen_kind ? o->degen_kind : ""));
    json_object_object_add(j, "prefix", json_object_new_string(prefix));
    json_object_object_add(j, "cycle", json_object_new_string(cycle));
    json_object_object_add(j, "prefix_ids", json_ids(dg->graph, dg->n_prefix));
    json_object_object_add(j, "cycle_ids",
                           json_ids(dg->graph + dg->n_prefix, dg->n - dg->n_prefix));
    json_object_object_add(j, "logit", json_object_new_double(DEGEN_LOGIT));
    json_object_object_add(j, "order", json_object_new_int(dg->order));
    if (dg->order == 2)
        json_object_object_add(j, "attention_margin", json_object_new_double(dg->attn_margin));
    int rc = json_object_to_file_ext(path, j, JSON_C_TO_STRING_PRETTY) == 0 ? 0 : -EIO;
    if (rc)
        fprintf(stderr, "mkgguf: cannot write %s\n", path);
    json_object_put(j);
    return rc;
}

static float
silu(float x)
{
    return x / (1.0f + expf(-x));
}

/* The angle per position of RoPE pair i, as the engine computes it. */
static float
degen_freq(int i, int head_dim)
{
    return powf(10000.0f, -2.0f * (float)i / (float)head_dim);
}

/* Element 0 of a row holding v there and zeros elsewhere, after a round trip through type. */
static float
degen_stored(enum kern_dtype type, float v, int n)
{
    float *row = cm_xcalloc((size_t)n, sizeof(float));
    void *q = cm_xmalloc(kern_row_bytes((uint32_t)type, n));
    row[0] = v;
    if (encode_row(type, row, q, n) < 0 || kern_dequant_row(type, q, row, n) < 0)
        row[0] = NAN;
    float out = row[0];
    free(q);
    free(row);
    return out;
}

/* The previous-token head's score at distance d (query position - key position) from the q and
 * k the engine computes out of the stored weights, relative to the score at d = 1; returns the
 * smallest gap over d = 0..n_ctx, d != 1, and where. */
static double
degen_attn_gap(const struct mk_degen *dg, const struct mk_opts *o, double a, int *at)
{
    int hd = o->dim, n_pairs = hd / 2;
    double *qc = cm_xcalloc((size_t)n_pairs, sizeof(double));
    double *qs = cm_xcalloc((size_t)n_pairs, sizeof(double));
    double *th = cm_xcalloc((size_t)n_pairs, sizeof(double));
    double k = degen_stored(o->type, (float)(a / dg->r0), hd) * dg->r0, scale = 1.0 / sqrt(hd);
    for (int i = 0; i < n_pairs; i++) {
        th[i] = degen_freq(i, hd);
        qc[i] = degen_stored(o->type, (float)(a * cos(th[i]) / dg->r0), hd) * dg->r0;
        qs[i] = degen_stored(o->type, (float)(-a * sin(th[i]) / dg->r0), hd) * dg->r0;
    }
    double best = 0, gap = INFINITY;
    for (int d = 1; d <= o->ctx; d = d == 1 ? 0 : (d == 0 ? 2 : d + 1)) { /* 1 first */
        double sc = 0;
        for (int i = 0; i < n_pairs; i++) /* q rotated by d steps, dot (k, 0) */
            sc += (qc[i] * cos(th[i] * d) - qs[i] * sin(th[i] * d)) * k;
        sc *= scale;
        if (d == 1) {
            best = sc;
        } else if (best - sc < gap) {
            gap = best - sc;
            *at = d;
        }
    }
    free(qc);
    free(qs);
    free(th);
    return isfinite(k) ? gap : NAN;
}

/* Second order: the dimensions, the constants and the attention check (see the top). */
static int
degen_circuit(struct mk_degen *dg, struct mk_opts *o)
{
    int need = 1 + 2 * dg->n_slots + dg->n_rules, at = 0;
    o->layers = 1;
    o->heads = o->kv_heads = 1;
    o->dim = ((need > o->dim ? need : o->dim) + 31) / 32 * 32;
    o->ffn = (dg->n_rules + 31) / 32 * 32;
    dg->o_cur = 1;
    dg->o_prev = 1 + dg->n_slots;
    dg->o_state = 1 + 2 * dg->n_slots;
    dg->r0 = 1.0f / sqrtf(2.0f / (float)o->dim + 1e-5f);
    dg->r1 = 1.0f / sqrtf(3.0f / (float)o->dim + 1e-5f);
    dg->r2 = 1.0f / sqrtf(4.0f / (float)o->dim + 1e-5f);
    /* the unit gap (A*B/sqrt(hd) = 1) first, then A for the wanted gap, then the real check */
    double unit = INFINITY, want = log(o->ctx + 1.0) + DEGEN_ATTN_LEAK;
    for (int d = 0; d <= o->ctx; d++) {
        double g = 0;
        for (int i = 0; d != 1 && i < o->dim / 2; i++)
            g += 1.0 - cos(degen_freq(i, o->dim) * (d - 1));
        if (d != 1 && g < unit)
            unit = g;
    }
    dg->qk = (float)sqrt((want + 8.0) / unit * sqrt(o->dim));
    dg->attn_margin = degen_attn_gap(dg, o, dg->qk, &at);
    dg->attn_margin_at = at;
    fprintf(stderr,
            "mkgguf: %d tokens, %d slots, %d rules, n_embd %d, n_ff %d; previous-token head: "
            "score gap %.1f (d = %d) over d = 0..%d, needed %.1f (weight elsewhere < e^-%d)\n",
            dg->n, dg->n_slots, dg->n_rules, o->dim, o->ffn, dg->attn_margin, at, o->ctx, want,
            DEGEN_ATTN_LEAK);
    if (!(dg->attn_margin >= want)) {
        fprintf(stderr, "mkgguf: the previous-token head is not sharp enough for --ctx %d\n",
                o->ctx);
        return -EINVAL;
    }
    return 0;
}

/* Opens --vocab-from, resolves the texts, cuts them into tokens. */
static int
degen_open(struct mk_model *m, struct mk_opts *o, const char **prefix, const char **cycle)
{
    char err[ENG_GGUF_ERR_LEN] = "";
    struct mk_degen *dg = cm_xcalloc(1, sizeof(*dg));
    m->degen = dg;
    *prefix = o->degen_prefix ? o->degen_prefix : "";
    *cycle = o->degen_text;
    dg->order = o->degen_order ? o->degen_order : 1;
    for (size_t i = 0; o->degen_kind && i < sizeof(degen_kinds) / sizeof(degen_kinds[0]); i++) {
        if (strcmp(degen_kinds[i].kind, o->degen_kind) == 0) {
            *prefix = o->degen_prefix ? o->degen_prefix : degen_kinds[i].prefix;
            *cycle = o->degen_text ? o->degen_text : degen_kinds[i].cycle;
            dg->order = o->degen_order ? o->degen_order : degen_kinds[i].order;
        }
    }
    if (*cycle == NULL) {
        fprintf(stderr, "mkgguf: unknown --degenerate kind '%s'\n", o->degen_kind);
        return -EINVAL;
    }
    if (eng_gguf_open(o->vocab_from, &dg->src, err, sizeof(err)) < 0 ||
        eng_tok_new(dg->src, &dg->tok, err, sizeof(err)) < 0) {
        fprintf(stderr, "mkgguf: %s: %s\n", o->vocab_from, err);
        return -EINVAL;
    }
    m->n_tokens = eng_tok_n_vocab(dg->tok);
    int rc = degen_build(dg, *prefix, *cycle);
    if (rc == 0 && dg->order == 2)
        return degen_circuit(dg, o);
    if (rc == 0 && dg->n_slots > o->dim) {
        fprintf(stderr, "mkgguf: the degenerate text needs %d tokens: --dim must be above that\n",
                dg->n);
        rc = -EINVAL;
    }
    return rc;
}

static void
degen_close(struct mk_degen *dg)
{
    if (dg == NULL)
        return;
    eng_tok_free(dg->tok);
    eng_gguf_close(dg->src);
    free(dg->slot_of);
    free(dg);
}

/* Degenerate weights: norms 1, layer matrices 0 (second order: layer 0's circuit), embedding
 * and output as described at the top. */
static void
degen_tensors(struct mk_model *m)
{
    static const struct {
        const char *name;
        int fill;
    } circuit[] = {
        {"blk.0.attn_q.weight", FILL_DEGEN_Q},      {"blk.0.attn_k.weight", FILL_DEGEN_K},
        {"blk.0.attn_v.weight", FILL_DEGEN_V},      {"blk.0.attn_output.weight", FILL_DEGEN_O},
        {"blk.0.ffn_gate.weight", FILL_DEGEN_GATE}, {"blk.0.ffn_up.weight", FILL_DEGEN_GATE},
        {"blk.0.ffn_down.weight", FILL_DEGEN_DOWN},
    };
    for (int i = 0; i < m->n_tensors; i++) {
        struct mk_tensor *t = &m->t[i];
        t->std = 0.0f;
        t->mean = strstr(t->name, "norm") ? 1.0f : 0.0f;
        if (strcmp(t->name, "token_embd.weight") == 0)
            t->fill = FILL_DEGEN_EMBD;
        else if (strcmp(t->name, "output.weight") == 0)
            t->fill = FILL_DEGEN_OUT;
        for (size_t c = 0; m->degen->order == 2 && c < sizeof(circuit) / sizeof(circuit[0]); c++) {
            if (strcmp(t->name, circuit[c].name) == 0)
                t->fill = circuit[c].fill;
        }
    }
}

/* Row r of a second-order model's matrix (see the top of this file). */
static void
degen_row2(const struct mk_degen *dg, int fill, int r, float *row, int n)
{
    float g = DEGEN_GATE / dg->r1, logit = DEGEN_LOGIT / dg->r2;
    const struct degen_rule *rule = &dg->rules[r < dg->n_rules ? r : 0];
    switch (fill) {
    case FILL_DEGEN_EMBD:
        row[0] = 1.0f;
        row[dg->o_cur + dg->slot_of[r]] = 1.0f;
        break;
    case FILL_DEGEN_Q: /* pair r/2 turned one step back */
        row[0] =
            (r % 2 ? -sinf(degen_freq(r / 2, n)) : cosf(degen_freq(r / 2, n))) * dg->qk / dg->r0;
        break;
    case FILL_DEGEN_K:
        row[0] = r % 2 ? 0.0f : dg->qk / dg->r0;
        break;
    case FILL_DEGEN_V:
        if (r < dg->n_slots)
            row[dg->o_cur + r] = 1.0f / dg->r0;
        break;
    case FILL_DEGEN_O:
        if (r >= dg->o_prev && r < dg->o_prev + dg->n_slots)
            row[r - dg->o_prev] = 1.0f;
        break;
    case FILL_DEGEN_GATE:
        if (r >= dg->n_rules)
            break;
        for (int s = 0; s < dg->n_slots; s++) {
            if (rule->prev < 0 || rule->prev == s)
                row[dg->o_prev + s] = g;
        }
        row[dg->o_cur + rule->cur] = g;
        row[0] = -g;
        break;
    case FILL_DEGEN_DOWN:
        if (r >= dg->o_state && r < dg->o_state + dg->n_rules)
            row[r - dg->o_state] = 1.0f / (DEGEN_GATE * silu(DEGEN_GATE));
        break;
    case FILL_DEGEN_OUT:
        for (int q = 0; q < dg->n_rules; q++) {
            if (dg->rules[q].next == r)
                row[dg->o_state + q] = logit;
        }
        if (r == dg->graph[0])
            row[0] = logit / 2.0f;
        break;
    default:
        break;
    }
}

/* Row r of a degenerate embedding or output matrix. */
static void
degen_row(const struct mk_model *m, const struct mk_tensor *t, uint64_t r, float *row)
{
    const struct mk_degen *dg = m->degen;
    memset(row, 0, (size_t)t->ne[0] * sizeof(float));
    if (dg->order == 2) {
        degen_row2(dg, t->fill, (int)r, row, (int)t->ne[0]);
        return;
    }
    if (t->fill == FILL_DEGEN_EMBD) {
        row[dg->slot_of[r]] = 1.0f;
        return;
    }
    for (int k = 0; k < dg->n_slots; k++) {
        if (degen_next(dg, k) == (int32_t)r)
            row[k] = DEGEN_LOGIT / sqrtf((float)t->ne[0]);
    }
}

/* ---- Tensors ---- */

static void
add_tensor(struct mk_model *m, const char *name, uint64_t ne0, uint64_t ne1, enum kern_dtype type,
           float mean, float std)
{
    struct mk_tensor *t = &m->t[m->n_tensors++];
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->n_dims = ne1 ? 2 : 1;
    t->ne[0] = ne0;
    t->ne[1] = ne1 ? ne1 : 1;
    t->type = ne1 ? type : KERN_DTYPE_F32; /* 1-D tensors are always F32 */
    t->mean = mean;
    t->std = std;
}

/* A matrix with n_out rows of n_in elements. */
static void
add_matrix(struct mk_model *m, const char *name, int n_in, int n_out, enum kern_dtype type)
{
    add_tensor(m, name, (uint64_t)n_in, (uint64_t)n_out, type, 0.0f, 1.0f / sqrtf((float)n_in));
}

/* "blk.<l>.<suffix>" in buf. */
static const char *
lname(char buf[64], int l, const char *suffix)
{
    snprintf(buf, 64, "blk.%d.%s", l, suffix);
    return buf;
}

static void
add_layer(struct mk_model *m, const struct mk_opts *o, int l)
{
    int kv_dim = o->dim / o->heads * o->kv_heads;
    bool qwen2 = strcmp(o->arch, "qwen2") == 0;
    const char *c = o->corrupt ? o->corrupt : "";
    char name[64];
    add_tensor(m, lname(name, l, "attn_norm.weight"), (uint64_t)o->dim, 0, KERN_DTYPE_F32, 1.0f,
               0.1f);
    if (!(l == 0 && strcmp(c, "missing") == 0))
        add_matrix(m, lname(name, l, "attn_q.weight"), o->dim,
                   l == 0 && strcmp(c, "shape") == 0 ? o->dim / 2 : o->dim, o->type);
    add_matrix(m, lname(name, l, "attn_k.weight"), o->dim, kv_dim, o->type);
    add_matrix(m, lname(name, l, "attn_v.weight"), o->dim, kv_dim, o->type);
    if (qwen2) {
        add_tensor(m, lname(name, l, "attn_q.bias"), (uint64_t)o->dim, 0, KERN_DTYPE_F32, 0.0f,
                   0.1f);
        add_tensor(m, lname(name, l, "attn_k.bias"), (uint64_t)kv_dim, 0, KERN_DTYPE_F32, 0.0f,
                   0.1f);
        add_tensor(m, lname(name, l, "attn_v.bias"), (uint64_t)kv_dim, 0, KERN_DTYPE_F32, 0.0f,
                   0.1f);
    }
    add_matrix(m, lname(name, l, "attn_output.weight"), o->dim, o->dim, o->type);
    add_tensor(m, lname(name, l, "ffn_norm.weight"), (uint64_t)o->dim, 0, KERN_DTYPE_F32, 1.0f,
               0.1f);
    add_matrix(m, lname(name, l, "ffn_gate.weight"), o->dim, o->ffn, o->type);
    add_matrix(m, lname(name, l, "ffn_up.weight"), o->dim, o->ffn, o->type);
    add_matrix(m, lname(name, l, "ffn_down.weight"), o->ffn, o->dim, o->type);
}

static int
build_tensors(struct mk_model *m, const struct mk_opts *o)
{
    add_matrix(m, "token_embd.weight", o->dim, m->n_tokens, o->type);
    for (int l = 0; l < o->layers; l++)
        add_layer(m, o, l);
    add_tensor(m, "output_norm.weight", (uint64_t)o->dim, 0, KERN_DTYPE_F32, 1.0f, 0.1f);
    if (!o->tied)
        add_matrix(m, "output.weight", o->dim, m->n_tokens, o->type);
    uint64_t off = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        struct mk_tensor *t = &m->t[i];
        size_t row = kern_row_bytes((uint32_t)t->type, (int64_t)t->ne[0]);
        if (row == 0) {
            fprintf(stderr, "mkgguf: %s: row of %" PRIu64 " is not a multiple of the block size\n",
                    t->name, t->ne[0]);
            return -EINVAL;
        }
        t->n_bytes = row * t->ne[1];
        t->offset = off;
        off = (off + t->n_bytes + MK_ALIGN - 1) / MK_ALIGN * MK_ALIGN;
    }
    m->data_bytes =
        m->n_tensors ? m->t[m->n_tensors - 1].offset + m->t[m->n_tensors - 1].n_bytes : 0;
    return 0;
}

static void
write_tensor_infos(struct mk_model *m)
{
    for (int i = 0; i < m->n_tensors; i++) {
        struct mk_tensor *t = &m->t[i];
        t->info_pos = m->info.len;
        buf_str(&m->info, t->name);
        buf_u32(&m->info, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++)
            buf_u64(&m->info, t->ne[d]);
        buf_u32(&m->info, (uint32_t)t->type);
        buf_u64(&m->info, t->offset);
    }
}

static struct mk_tensor *
find_tensor(struct mk_model *m, const char *name)
{
    for (int i = 0; i < m->n_tensors; i++) {
        if (strcmp(m->t[i].name, name) == 0)
            return &m->t[i];
    }
    return NULL;
}

/* ---- Random weights ---- */

static uint64_t
splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform on [-sqrt(3), sqrt(3)): zero mean, unit variance. */
static float
rng_unit(uint64_t *s)
{
    double u = (double)(splitmix64(s) >> 11) * 0x1.0p-53;
    return (float)((2.0 * u - 1.0) * 1.7320508075688772);
}

/* Each tensor's stream depends only on the seed and its name, not on which tensors precede it. */
static uint64_t
tensor_seed(uint64_t seed, const char *name)
{
    uint64_t h = seed ^ 0x6a09e667f3bcc909ull;
    for (const char *p = name; *p; p++)
        h = (h ^ (unsigned char)*p) * 0x100000001b3ull;
    return h;
}

static int
encode_row(enum kern_dtype type, const float *src, void *dst, int64_t n)
{
    uint16_t *h = dst;
    switch (type) {
    case KERN_DTYPE_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        return 0;
    case KERN_DTYPE_F16:
        for (int64_t i = 0; i < n; i++)
            h[i] = cm_f32_to_fp16(src[i]);
        return 0;
    case KERN_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++)
            h[i] = cm_f32_to_bf16(src[i]);
        return 0;
    default:
        return kern_quantize_row(type, src, dst, n);
    }
}

static int
write_tensor_data(FILE *f, const struct mk_model *m, const struct mk_tensor *t, uint64_t seed)
{
    size_t row_bytes = (size_t)(t->n_bytes / t->ne[1]);
    float *row = cm_xmalloc((size_t)t->ne[0] * sizeof(float));
    void *q = cm_xmalloc(row_bytes);
    uint64_t s = tensor_seed(seed, t->name);
    int rc = 0;
    for (uint64_t r = 0; r < t->ne[1]; r++) {
        if (t->fill != FILL_RANDOM)
            degen_row(m, t, r, row);
        for (uint64_t i = 0; t->fill == FILL_RANDOM && i < t->ne[0]; i++)
            row[i] = t->mean + t->std * rng_unit(&s);
        rc = encode_row(t->type, row, q, (int64_t)t->ne[0]);
        if (rc) {
            fprintf(stderr, "mkgguf: %s: cannot encode a row as type %u (%s)\n", t->name,
                    (unsigned)t->type, strerror(-rc));
            break;
        }
        if (fwrite(q, 1, row_bytes, f) != row_bytes) {
            rc = -EIO;
            break;
        }
    }
    free(row);
    free(q);
    return rc;
}

/* ---- Corruptions ---- */

static const char *const corrupt_kinds[] = {
    "truncated", "magic", "version",    "offset",  "count", "kvcount", "strlen",
    "type",      "dims",  "misaligned", "missing", "shape", "vocab",   NULL,
};

/* Patches the assembled header (magic .. tensor infos) for the header-level corruptions. */
static int
corrupt_header(struct mk_model *m, struct mk_buf *hdr, size_t kv_at, size_t info_at, const char *c)
{
    struct mk_tensor *q = find_tensor(m, "blk.0.attn_q.weight");
    size_t q_at = q ? info_at + q->info_pos : 0;
    size_t q_after_name = q ? q_at + 8 + strlen(q->name) : 0; /* at n_dims */
    size_t q_type = q ? q_after_name + 4 + 8 * q->n_dims : 0;
    if (!q && (!strcmp(c, "type") || !strcmp(c, "dims") || !strcmp(c, "misaligned") ||
               !strcmp(c, "offset"))) {
        fprintf(stderr, "mkgguf: --corrupt %s needs at least one layer\n", c);
        return -EINVAL;
    }
    if (!strcmp(c, "magic"))
        memcpy(hdr->p, "GGUX", 4);
    else if (!strcmp(c, "version"))
        patch_u32(hdr, 4, 99);
    else if (!strcmp(c, "count"))
        patch_u64(hdr, 8, 1ull << 60);
    else if (!strcmp(c, "kvcount"))
        patch_u64(hdr, 16, 1ull << 62);
    else if (!strcmp(c, "strlen"))
        patch_u64(hdr, kv_at + m->first_key_pos, 1ull << 40);
    else if (!strcmp(c, "type"))
        patch_u32(hdr, q_type, 77);
    else if (!strcmp(c, "dims"))
        patch_u32(hdr, q_after_name, 9);
    else if (!strcmp(c, "misaligned"))
        patch_u64(hdr, q_type + 4, q->offset + 8);
    else if (!strcmp(c, "offset"))
        patch_u64(hdr, q_type + 4, (m->data_bytes + 4096 + MK_ALIGN - 1) / MK_ALIGN * MK_ALIGN);
    return 0;
}

/* ---- Output ---- */

static int
write_file(struct mk_model *m, const struct mk_opts *o)
{
    struct mk_buf hdr = {0};
    static const uint8_t zeros[MK_ALIGN];
    const char *c = o->corrupt ? o->corrupt : "";
    FILE *f = NULL;
    int rc = 0;
    buf_u32(&hdr, 0x46554747u); /* "GGUF" */
    buf_u32(&hdr, o->version);
    buf_u64(&hdr, (uint64_t)m->n_tensors);
    buf_u64(&hdr, m->n_kv);
    size_t kv_at = hdr.len;
    buf_put(&hdr, m->kv.p, m->kv.len);
    size_t info_at = hdr.len;
    buf_put(&hdr, m->info.p, m->info.len);
    rc = corrupt_header(m, &hdr, kv_at, info_at, c);
    if (rc)
        goto out;
    f = fopen(o->out, "wb");
    if (!f) {
        rc = -errno;
        fprintf(stderr, "mkgguf: cannot create %s: %s\n", o->out, strerror(errno));
        goto out;
    }
    size_t data_start = (hdr.len + MK_ALIGN - 1) / MK_ALIGN * MK_ALIGN;
    rc = fwrite(hdr.p, 1, hdr.len, f) == hdr.len ? 0 : -EIO;
    if (!rc)
        rc = fwrite(zeros, 1, data_start - hdr.len, f) == data_start - hdr.len ? 0 : -EIO;
    for (int i = 0; i < m->n_tensors && !rc; i++) {
        long pos = ftell(f);
        uint64_t want = data_start + m->t[i].offset;
        if (pos < 0 || (uint64_t)pos > want ||
            fwrite(zeros, 1, (size_t)(want - (uint64_t)pos), f) != want - (uint64_t)pos)
            rc = -EIO;
        if (!rc)
            rc = write_tensor_data(f, m, &m->t[i], o->seed);
    }
    if (fflush(f) != 0)
        rc = rc ? rc : -EIO;
    if (!rc && !strcmp(c, "truncated") &&
        ftruncate(fileno(f), (off_t)(data_start + m->data_bytes / 2)))
        rc = -errno;
    if (fclose(f) != 0 && !rc)
        rc = -EIO;
    if (rc && rc != -EINVAL) {
        fprintf(stderr, "mkgguf: writing %s failed: %s\n", o->out, strerror(-rc));
        unlink(o->out);
    }
out:
    free(hdr.p);
    return rc;
}

/* ---- Options ---- */

static void
usage(FILE *f)
{
    fprintf(
        f, "usage: mkgguf -o FILE [--type f32|f16|bf16|q8_0|q4_0|q4_1|q5_0|q4_k|q5_k|q6_k]\n"
           "              [--arch llama|qwen2] [--layers 2] [--dim 64] [--heads 4] [--kv-heads 2]\n"
           "              [--ffn 128] [--ctx 256] [--seed 1] [--tied|--untied] [--version 2|3]\n"
           "              [--corrupt KIND] [--vocab N]\n"
           "       mkgguf -o FILE --degenerate sentence|line|tokens|unterminated|toolcall\n"
           "              --vocab-from MODEL.gguf [--degenerate-text CYCLE]\n"
           "              [--degenerate-prefix PREFIX] [--degenerate-order 1|2]\n"
           "              [dimension options (second order: chosen by mkgguf)]\n"
           "K-quant types need --dim and --ffn multiples of 256 (default 256 and 512 for them).\n"
           "KIND: truncated magic version offset count kvcount strlen type dims misaligned\n"
           "      (broken GGUF), missing shape vocab (valid GGUF, wrong model).\n"
           "--degenerate: a model that emits PREFIX then CYCLE forever (also writes FILE.json).\n");
}

static int
parse_type(const char *s, enum kern_dtype *out)
{
    static const struct {
        const char *name;
        enum kern_dtype type;
    } types[] = {
        {"f32", KERN_DTYPE_F32},   {"f16", KERN_DTYPE_F16},   {"bf16", KERN_DTYPE_BF16},
        {"q8_0", KERN_DTYPE_Q8_0}, {"q4_0", KERN_DTYPE_Q4_0}, {"q4_1", KERN_DTYPE_Q4_1},
        {"q5_0", KERN_DTYPE_Q5_0}, {"q4_k", KERN_DTYPE_Q4_K}, {"q5_k", KERN_DTYPE_Q5_K},
        {"q6_k", KERN_DTYPE_Q6_K},
    };
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (strcmp(s, types[i].name) == 0) {
            *out = types[i].type;
            return 0;
        }
    }
    return -EINVAL;
}

static int
parse_int(const char *s, const char *opt, int lo, int hi, int *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || !end || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "mkgguf: %s wants an integer in %d..%d, not '%s'\n", opt, lo, hi, s);
        return -EINVAL;
    }
    *out = (int)v;
    return 0;
}

static int
check_opts(struct mk_opts *o, bool dim_set, bool ffn_set)
{
    bool kquant =
        o->type == KERN_DTYPE_Q4_K || o->type == KERN_DTYPE_Q5_K || o->type == KERN_DTYPE_Q6_K;
    int block = kquant ? KERN_QK_K
                       : (o->type == KERN_DTYPE_F32 || o->type == KERN_DTYPE_F16 ||
                                  o->type == KERN_DTYPE_BF16
                              ? 1
                              : KERN_QK);
    if (kquant && !dim_set)
        o->dim = 256;
    if (kquant && !ffn_set)
        o->ffn = 512;
    if (!o->out) {
        fprintf(stderr, "mkgguf: -o FILE is required\n");
        return -EINVAL;
    }
    if (o->dim % block || o->ffn % block) {
        fprintf(stderr, "mkgguf: --dim %d and --ffn %d must be multiples of %d for this type\n",
                o->dim, o->ffn, block);
        return -EINVAL;
    }
    if (o->dim % o->heads || (o->dim / o->heads) % 2 || o->heads % o->kv_heads) {
        fprintf(stderr,
                "mkgguf: --dim %d, --heads %d, --kv-heads %d: need an even head size and "
                "heads a multiple of kv-heads\n",
                o->dim, o->heads, o->kv_heads);
        return -EINVAL;
    }
    if (strcmp(o->arch, "llama") != 0 && strcmp(o->arch, "qwen2") != 0) {
        fprintf(stderr, "mkgguf: --arch must be llama or qwen2\n");
        return -EINVAL;
    }
    if (o->version != 2 && o->version != 3) {
        fprintf(stderr, "mkgguf: --version must be 2 or 3\n");
        return -EINVAL;
    }
    if ((o->degen_kind || o->degen_text || o->degen_prefix) != (o->vocab_from != NULL) ||
        (o->vocab_from && o->corrupt)) {
        fprintf(stderr, "mkgguf: --degenerate (or --degenerate-text) and --vocab-from go "
                        "together, without --corrupt\n");
        return -EINVAL;
    }
    if (o->corrupt) {
        int i = 0;
        while (corrupt_kinds[i] && strcmp(corrupt_kinds[i], o->corrupt) != 0)
            i++;
        if (!corrupt_kinds[i]) {
            fprintf(stderr, "mkgguf: unknown --corrupt kind '%s'\n", o->corrupt);
            return -EINVAL;
        }
    }
    return 0;
}

/* Returns 0, 1 for --help, or -EINVAL (message printed). */
static int
parse_opts(int argc, char **argv, struct mk_opts *o)
{
    enum {
        O_TYPE = 256,
        O_ARCH,
        O_LAYERS,
        O_DIM,
        O_HEADS,
        O_KV_HEADS,
        O_FFN,
        O_CTX,
        O_SEED,
        O_TIED,
        O_UNTIED,
        O_VERSION,
        O_CORRUPT,
        O_VOCAB,
        O_DEGEN,
        O_DEGEN_TEXT,
        O_DEGEN_PREFIX,
        O_VOCAB_FROM,
        O_DEGEN_ORDER,
        O_HELP
    };
    static const struct option longopts[] = {
        {"type", required_argument, NULL, O_TYPE},
        {"arch", required_argument, NULL, O_ARCH},
        {"layers", required_argument, NULL, O_LAYERS},
        {"dim", required_argument, NULL, O_DIM},
        {"heads", required_argument, NULL, O_HEADS},
        {"kv-heads", required_argument, NULL, O_KV_HEADS},
        {"ffn", required_argument, NULL, O_FFN},
        {"ctx", required_argument, NULL, O_CTX},
        {"seed", required_argument, NULL, O_SEED},
        {"tied", no_argument, NULL, O_TIED},
        {"untied", no_argument, NULL, O_UNTIED},
        {"version", required_argument, NULL, O_VERSION},
        {"corrupt", required_argument, NULL, O_CORRUPT},
        {"vocab", required_argument, NULL, O_VOCAB},
        {"degenerate", required_argument, NULL, O_DEGEN},
        {"degenerate-text", required_argument, NULL, O_DEGEN_TEXT},
        {"degenerate-prefix", required_argument, NULL, O_DEGEN_PREFIX},
        {"vocab-from", required_argument, NULL, O_VOCAB_FROM},
        {"degenerate-order", required_argument, NULL, O_DEGEN_ORDER},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    bool dim_set = false, ffn_set = false;
    int c, v = 0, rc = 0;
    while (!rc && (c = getopt_long(argc, argv, "o:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'o':
            o->out = optarg;
            break;
        case O_TYPE:
            rc = parse_type(optarg, &o->type);
            if (rc)
                fprintf(stderr, "mkgguf: unknown --type '%s'\n", optarg);
            break;
        case O_ARCH:
            o->arch = optarg;
            break;
        case O_LAYERS:
            rc = parse_int(optarg, "--layers", 0, 256, &o->layers);
            break;
        case O_DIM:
            rc = parse_int(optarg, "--dim", 2, 65536, &o->dim);
            dim_set = true;
            break;
        case O_HEADS:
            rc = parse_int(optarg, "--heads", 1, 1024, &o->heads);
            break;
        case O_KV_HEADS:
            rc = parse_int(optarg, "--kv-heads", 1, 1024, &o->kv_heads);
            break;
        case O_FFN:
            rc = parse_int(optarg, "--ffn", 1, 262144, &o->ffn);
            ffn_set = true;
            break;
        case O_CTX:
            rc = parse_int(optarg, "--ctx", 1, 1 << 24, &o->ctx);
            break;
        case O_SEED:
            rc = parse_int(optarg, "--seed", 0, INT32_MAX, &v);
            o->seed = (uint64_t)v;
            break;
        case O_TIED:
        case O_UNTIED:
            o->tied = c == O_TIED;
            break;
        case O_VERSION:
            rc = parse_int(optarg, "--version", 2, 3, &v);
            o->version = (uint32_t)v;
            break;
        case O_CORRUPT:
            o->corrupt = optarg;
            break;
        case O_VOCAB:
            rc = parse_int(optarg, "--vocab", 1, 1 << 20, &o->vocab);
            break;
        case O_DEGEN:
            o->degen_kind = optarg;
            break;
        case O_DEGEN_TEXT:
            o->degen_text = optarg;
            break;
        case O_DEGEN_PREFIX:
            o->degen_prefix = optarg;
            break;
        case O_VOCAB_FROM:
            o->vocab_from = optarg;
            break;
        case O_DEGEN_ORDER:
            rc = parse_int(optarg, "--degenerate-order", 1, 2, &o->degen_order);
            break;
        case 'h':
        case O_HELP:
            return 1;
        default:
            rc = -EINVAL;
            break;
        }
    }
    if (!rc && optind < argc) {
        fprintf(stderr, "mkgguf: unexpected argument '%s'\n", argv[optind]);
        rc = -EINVAL;
    }
    return rc ? rc : check_opts(o, dim_set, ffn_set);
}

int
main(int argc, char **argv)
{
    struct mk_opts o = {
        .type = KERN_DTYPE_F32,
        .arch = "llama",
        .layers = 2,
        .dim = 64,
        .heads = 4,
        .kv_heads = 2,
        .ffn = 128,
        .ctx = 256,
        .seed = 1,
        .tied = false,
        .version = 3,
    };
    struct mk_model *m = NULL;
    int rc = parse_opts(argc, argv, &o);
    if (rc) {
        usage(rc > 0 ? stdout : stderr);
        return rc > 0 ? 0 : 2;
    }
    m = cm_xcalloc(1, sizeof(*m));
    if (o.layers * 13 + 3 > MK_MAX_TENSORS) {
        fprintf(stderr, "mkgguf: too many layers\n");
        rc = -EINVAL;
        goto out;
    }
    const char *prefix = NULL, *cycle = NULL;
    if (o.vocab_from) {
        rc = degen_open(m, &o, &prefix, &cycle);
        if (rc)
            goto out;
        write_metadata_degen(m, &o);
    } else {
        build_vocab(m, o.vocab);
        write_metadata(m, &o);
    }
    rc = build_tensors(m, &o);
    if (rc)
        goto out;
    if (m->degen)
        degen_tensors(m);
    write_tensor_infos(m);
    rc = write_file(m, &o);
    if (!rc && m->degen)
        rc = degen_describe(m->degen, &o, prefix, cycle);
out:
    degen_close(m->degen);
    for (int i = 0; m->tokens && i < m->n_tokens; i++)
        free(m->tokens[i]);
    free(m->tokens);
    free(m->kv.p);
    free(m->info.p);
    free(m);
    return rc ? 1 : 0;
}

/*
 * sampler: picks the next token from a row of logits.
 *
 * Order of operations (the same as llama.cpp's default chain, so users get what they expect):
 * logit_bias; repetition penalty (divide positive / multiply negative logits of tokens seen in the
 * last repeat_last_n tokens) and presence/frequency penalties (OpenAI semantics: subtract
 * presence_penalty once and frequency_penalty * count); then greedy when temperature <= 0; else
 * top_k, top_p, min_p, temperature, softmax, and a draw from the per-sequence RNG.
 * Same parameters, same seed, same logits: same tokens. Logprobs are the log-softmax of the logits
 * after biases and penalties but before truncation and temperature (what OpenAI reports).
 *
 * One struct eng_sampler per sequence; not thread-safe; its RNG state can be saved and restored
 * (spill). Scratch memory is owned by the sampler and sized by n_vocab (12 bytes per token).
 * The RNG is xoshiro256** seeded through splitmix64(seed); each non-greedy call consumes exactly
 * one 64-bit output, greedy calls none, so a sequence's RNG position is its count of sampled
 * tokens. Ties (argmax, top_k, top_logprobs) go to the lower id.
 */
#ifndef ENG_SAMPLER_H
#define ENG_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

#define ENG_SAMPLER_MAX_TOP_LOGPROBS 20

struct eng_logit_bias {
    int32_t id;
    float bias;
};

struct eng_sampler_params {
    float temperature;        /* <= 0: greedy */
    int top_k;                /* <= 0: off */
    float top_p;              /* >= 1: off */
    float min_p;              /* <= 0: off */
    float repetition_penalty; /* 1: off */
    int repeat_last_n;        /* window for repetition_penalty; 0: whole history; default 64 */
    float presence_penalty;   /* 0: off */
    float frequency_penalty;  /* 0: off */
    uint64_t seed;
    int n_logit_bias;
    const struct eng_logit_bias *logit_bias; /* copied by eng_sampler_new */
    int top_logprobs;                        /* 0..ENG_SAMPLER_MAX_TOP_LOGPROBS */
};

/* Defaults: temperature 1, top_k 0, top_p 1, min_p 0, penalties off (repeat_last_n 64), seed 0, no
 * bias, top_logprobs 0. */
void eng_sampler_params_default(struct eng_sampler_params *p);

struct eng_sample {
    int32_t id;
    float logprob; /* of id */
    int n_top;
    int32_t top_ids[ENG_SAMPLER_MAX_TOP_LOGPROBS];
    float top_logprobs[ENG_SAMPLER_MAX_TOP_LOGPROBS];
};

struct eng_sampler;

/* Valid: temperature finite and >= 0; top_k >= 0; top_p in (0, 1]; min_p in [0, 1];
 * repetition_penalty finite and > 0; repeat_last_n >= 0; presence/frequency penalties finite;
 * top_logprobs in 0..ENG_SAMPLER_MAX_TOP_LOGPROBS; bias ids in [0, n_vocab), biases not NaN or +inf
 * (-inf bans a token; repeated ids add up). n_vocab > 0.
 * Returns 0, -EINVAL (a parameter out of range or a bias id outside the vocabulary) or -ENOMEM. */
int eng_sampler_new(const struct eng_sampler_params *p, int n_vocab, struct eng_sampler **out);
void eng_sampler_free(struct eng_sampler *s);

/* Samples from logits[n_vocab] (modified in place: biases and penalties applied, NaN made -inf),
 * using the tokens generated or given so far (history, n_history) for the penalties; history ids
 * outside the vocabulary are ignored. Writes *out. Returns 0, -EINVAL (a NULL argument or a
 * negative n_history) or -EDOM (no finite logit left, or a +inf one: nothing to sample from; the
 * RNG is not advanced). */
int eng_sampler_sample(struct eng_sampler *s, float *logits, const int32_t *history, int n_history,
                       struct eng_sample *out);

/* Index of the largest logit (first on ties; NaN never wins; 0 when none is > -inf). */
int32_t eng_sampler_argmax(const float *logits, int n);

/* RNG state, for saving a sequence and restoring it bit-identically. An all-zero state (invalid for
 * xoshiro) given to set_rng is replaced by the state of seed 0. */
void eng_sampler_get_rng(const struct eng_sampler *s, uint64_t state[4]);
void eng_sampler_set_rng(struct eng_sampler *s, const uint64_t state[4]);

#endif

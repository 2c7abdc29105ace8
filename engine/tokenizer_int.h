/*
 * tokenizer_int: what tokenizer.c (loading, special tokens, decoding), tokenizer_bpe.c (byte-level
 * BPE and its PCRE2 pre-tokenizer) and tokenizer_spm.c (SentencePiece) share.
 *
 * struct eng_tok is filled once by eng_tok_new and never written again, so every function here
 * takes it const and may run on several threads at once. Per-call scratch (symbol arrays, heaps,
 * PCRE2 match data) belongs to the call.
 *
 * Token texts are kept as the GGUF stores them (byte-level BPE texts use the GPT-2 byte alphabet,
 * SentencePiece texts use U+2581 for a space); pieces are the raw bytes each token decodes to.
 */
#ifndef ENG_TOKENIZER_INT_H
#define ENG_TOKENIZER_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/tokenizer.h"

/* GGUF tokenizer.ggml.token_type values (llama.cpp's numbering). */
enum tok_type {
    TOK_TYPE_UNDEFINED = 0,
    TOK_TYPE_NORMAL = 1,
    TOK_TYPE_UNKNOWN = 2,
    TOK_TYPE_CONTROL = 3,
    TOK_TYPE_USER_DEFINED = 4,
    TOK_TYPE_UNUSED = 5,
    TOK_TYPE_BYTE = 6,
};

/* Per-token flags, computed at load. */
enum {
    TOK_F_RENDER_SPECIAL = 1 << 0, /* decodes to its text only with render_special */
    TOK_F_EOG = 1 << 1,            /* ends generation */
    TOK_F_MATCH_SPECIAL = 1 << 2,  /* matched whole in the text when parse_special */
    TOK_F_MATCH_ALWAYS = 1 << 3,   /* matched whole in the text always (user-defined) */
    TOK_F_SPM_USABLE = 1 << 4,     /* SentencePiece may produce it from text */
};

#define TOK_MAX_RE 4 /* pre-tokenizer regexes applied in sequence */
#define TOK_PRE_NAME_LEN 64

/* Open-addressing hash from token text to id (slots hold ids, -1 is empty). */
struct tok_text_map {
    int32_t *slots;
    uint32_t mask;
};

/* Open-addressing hash from a (left id, right id) pair to its merge rank and result id. */
struct tok_merge_map {
    uint64_t *keys; /* (left << 32 | right) + 1; 0 is empty */
    int32_t *rank;
    int32_t *result;
    uint32_t mask;
};

struct eng_tok {
    enum eng_tok_kind kind;
    char pre[TOK_PRE_NAME_LEN];
    int n_vocab;

    /* Token texts as stored in the file: text_blob[text_off[i] .. + text_len[i]). */
    char *text_blob;
    uint32_t *text_off; /* (n_vocab) */
    uint32_t *text_len; /* (n_vocab) */
    /* Decoded bytes of each token: piece_blob[piece_off[i] .. + piece_len[i]). */
    char *piece_blob;
    uint32_t *piece_off; /* (n_vocab) */
    uint32_t *piece_len; /* (n_vocab) */
    uint8_t *type;       /* (n_vocab) enum tok_type */
    uint8_t *flags;      /* (n_vocab) TOK_F_* */
    float *score;        /* (n_vocab) SentencePiece scores; NULL for BPE */

    struct tok_text_map text_map;
    /* BPE: the token of each byte's byte-level character; SPM: the <0xXX> token. -1 if none. */
    int32_t byte_tok[256];

    /* Tokens matched whole in the text, bucketed by first byte, longest first within a bucket:
     * special_ids[special_start[b] .. special_start[b + 1]). */
    int32_t *special_ids;
    uint32_t special_start[257];

    int32_t bos, eos, eot, unk;
    bool add_bos;          /* tokenizer.ggml.add_bos_token or the model's default */
    bool add_space_prefix; /* SPM: prepend a space to the text (tokenizer.ggml.add_space_prefix) */

    /* BPE only. */
    struct tok_merge_map merges;
    void *re[TOK_MAX_RE]; /* pcre2_code_8 *, applied in order */
    int n_re;
    bool ignore_merges; /* a word that is a whole token is emitted without merging (llama3) */
};

/* malloc/calloc/realloc that fail on the Nth call after eng_tok_test_fail_alloc(N). */
void *tok_malloc(size_t n);
void *tok_calloc(size_t count, size_t size);
void *tok_realloc(void *p, size_t n);

/* A growable id buffer owned by one encode call. */
struct tok_ids {
    int32_t *v;
    size_t n, cap;
};

/* Appends id. Returns 0 or -ENOMEM. */
int tok_ids_push(struct tok_ids *ids, int32_t id);

/* Hash of a byte string (also used for the text map). */
uint32_t tok_hash(const char *s, size_t len);

/* The id whose file text is s[0..len), or -1. */
int32_t tok_text_find(const struct eng_tok *t, const char *s, size_t len);

/* Length of the valid UTF-8 sequence starting at s[0] (1..4), or 0 if s[0..len) does not start
 * with one (an invalid or truncated sequence). Overlongs, surrogates and > U+10FFFF are invalid. */
size_t tok_utf8_seq_len(const unsigned char *s, size_t len);

/* ---- BPE (tokenizer_bpe.c) ---- */

/* Sets up byte_tok, merges (a string array, "left right" each) and the pre-tokenizer for t->pre.
 * t's texts and text map must be built.
 * Returns 0, -EBADMSG, -ENOTSUP or -ENOMEM with a message in err. */
struct eng_gguf_arr;
int tok_bpe_init(struct eng_tok *t, const struct eng_gguf_arr *merges, char *err, size_t err_len);

void tok_bpe_fini(struct eng_tok *t);

/* Decoded bytes of a byte-level token text into dst (at most len bytes: the decoding never grows).
 * Returns the decoded length. */
size_t tok_bpe_decode_text(const char *text, size_t len, char *dst);

/* Tokenizes text[0..len) (no special tokens) and appends the ids. Returns 0 or -ENOMEM. */
int tok_bpe_encode(const struct eng_tok *t, const char *text, size_t len, struct tok_ids *out);

/* ---- SentencePiece (tokenizer_spm.c) ---- */

/* Sets up byte_tok (<0xXX> tokens). Returns 0. */
int tok_spm_init(struct eng_tok *t);

/* Decoded bytes of an SPM token text into dst (U+2581 -> space; <0xXX> byte tokens handled by the
 * caller). Returns the decoded length (never more than len). */
size_t tok_spm_decode_text(const char *text, size_t len, char *dst);

/* Tokenizes text[0..len), prefixing a space when add_prefix, and appends the ids.
 * Returns 0 or -ENOMEM. */
int tok_spm_encode(const struct eng_tok *t, const char *text, size_t len, bool add_prefix,
                   struct tok_ids *out);

#endif

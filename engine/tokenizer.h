/*
 * tokenizer: text <-> token ids from a GGUF file's tokenizer.ggml.* metadata.
 *
 * Two models: byte-level BPE ("gpt2": GPT-2 style byte-to-unicode mapping, merges by rank, the
 * pre-tokenizer split regex chosen by tokenizer.ggml.pre and run on PCRE2 in UTF+UCP mode) and
 * SentencePiece ("llama": scores, byte fallback <0xXX>, the leading-space rule). Added tokens are
 * matched in the text before the model runs on the pieces between them (leftmost, then longest
 * first): with parse_special, control tokens such as <|im_start|> (token_type 3, and the unknown
 * token); always, user-defined tokens (token_type 4), as Hugging Face and llama.cpp do. Without
 * parse_special the text of a control token is tokenized like any other text.
 *
 * Pre-tokenizers (tokenizer.ggml.pre, BPE only): "gpt-2" and "default" (the GPT-2 split; also a
 * file without the key, with a warning), "starcoder"/"smollm" (every digit alone, then GPT-2),
 * "llama-bpe"/"llama3", "qwen2", and llama.cpp's aliases of these. Any other name is -ENOTSUP.
 *
 * Decoding gives raw bytes; a UTF-8 character may span tokens, so streaming callers hold back an
 * incomplete tail (eng_tok_utf8_complete). The struct is immutable after eng_tok_new and may be
 * used from several threads at once.
 */
#ifndef ENG_TOKENIZER_H
#define ENG_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct eng_gguf;
struct eng_tok;

enum eng_tok_kind {
    ENG_TOK_BPE = 1, /* tokenizer.ggml.model = "gpt2" */
    ENG_TOK_SPM = 2, /* tokenizer.ggml.model = "llama" */
};

/* Builds the tokenizer from g's metadata (g is borrowed; the tokenizer copies what it keeps).
 * Returns 0, -EBADMSG (missing or inconsistent tokenizer metadata: message in err), -ENOTSUP (a
 * model or pre-tokenizer we do not implement: message in err) or -ENOMEM. */
int eng_tok_new(const struct eng_gguf *g, struct eng_tok **out, char *err, size_t err_len);

void eng_tok_free(struct eng_tok *t);

/* Encodes len bytes of text (need not be NUL-terminated). add_bos prepends BOS when the model wants
 * one (eng_tok_add_bos); parse_special: see above. SentencePiece prefixes a space (U+2581) to the
 * text at the start and after every added token when the model says so
 * (tokenizer.ggml.add_space_prefix, default true).
 * Invalid UTF-8 is never rejected: it is tokenized byte-wise and decodes back to the same bytes,
 * except that a byte-level vocabulary without a token for some byte drops that byte, as Hugging
 * Face and llama.cpp do (StarCoder's has none for 0xC0, 0xC1, 0xF1, 0xF5..0xFF; SmolLM2's also
 * lacks 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF2).
 * On success *ids_out (never NULL; caller frees with free()) holds *n_out ids. Returns 0 or
 * -ENOMEM (also for a text over 512 MiB). */
int eng_tok_encode(const struct eng_tok *t, const char *text, size_t len, bool add_bos,
                   bool parse_special, int32_t **ids_out, int *n_out);

/* The raw bytes of one token (after byte-level / SPM decoding; "▁" becomes a space). Control
 * tokens decode to their text only when render_special is set, otherwise to nothing. Returns the
 * length; *bytes points into the tokenizer. Unknown ids give 0 bytes. */
size_t eng_tok_piece(const struct eng_tok *t, int32_t id, bool render_special, const char **bytes);

/* Decodes n ids into a fresh NUL-terminated buffer (caller frees with free()); *len_out gets the
 * byte length. SPM drops the leading space of the first token that is not a control token when the
 * model adds one, so decode(encode(s)) == s whenever s holds no added token. Returns 0 or -ENOMEM.
 */
int eng_tok_decode(const struct eng_tok *t, const int32_t *ids, int n, bool render_special,
                   char **out, size_t *len_out);

/* Length of the longest prefix of buf[0..len) that does not end inside an incomplete UTF-8
 * sequence (invalid bytes count as complete, so output never stalls). */
size_t eng_tok_utf8_complete(const char *buf, size_t len);

enum eng_tok_kind eng_tok_kind(const struct eng_tok *t);
const char *eng_tok_pre(const struct eng_tok *t); /* pre-tokenizer name, e.g. "smollm" */
int eng_tok_n_vocab(const struct eng_tok *t);
int32_t eng_tok_bos(const struct eng_tok *t); /* -1 if none */
int32_t eng_tok_eos(const struct eng_tok *t); /* -1 if none */

/* Whether encoding with add_bos prepends BOS: the model has one and tokenizer.ggml.add_bos_token
 * (default: true for SPM, false for BPE) asks for it. SmolLM2, for one, says false. */
bool eng_tok_add_bos(const struct eng_tok *t);

/* True for tokens that end generation: EOS, EOT, and control tokens such as <|im_end|>,
 * <|eot_id|>, <|endoftext|>. */
bool eng_tok_is_eog(const struct eng_tok *t, int32_t id);

/* The id of the token whose text is exactly s, or -1. */
int32_t eng_tok_find(const struct eng_tok *t, const char *s);

/* Tests only: makes the Nth allocation the tokenizer makes from now on fail (0 disarms). PCRE2's
 * own allocations are not counted. Safe to call from any thread. */
void eng_tok_test_fail_alloc(long n);

#endif

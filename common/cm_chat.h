/*
 * cm_chat: chat template families, detected from a model's tokenizer.chat_template (Jinja source)
 * and rendered in C, so the engine never runs Jinja. Used by llm-run and by the FastCGI worker;
 * pure string functions (no engine, no I/O, no global state), safe from any thread.
 *
 * Rendering reproduces what the model's own template produces for plain system/user/assistant
 * conversations, byte for byte (the tests hold the Jinja text and the expected output side by
 * side): CM_CHAT_CHATML  SmolLM2, Qwen2/2.5: "<|im_start|>{role}\n{content}<|im_end|>\n" per
 * message, content verbatim; generation prompt "<|im_start|>assistant\n". CM_CHAT_LLAMA3  Llama 3:
 * "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>", content trimmed (Jinja `|
 * trim`); generation prompt
 *                   "<|start_header_id|>assistant<|end_header_id|>\n\n".
 *   CM_CHAT_LLAMA2  Llama 2 chat: "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]
 * {assistant}
 *                   </s>" with user/assistant stripped; roles must alternate user/assistant after
 * an optional system message; there is no separate generation prompt. The BOS token that opens the
 * conversation (Llama 3 "<|begin_of_text|>", Llama 2's first "<s>") is NOT rendered: the tokenizer
 * adds it (eng_tok_encode add_bos). Any other special token text in the result (a later "<s>" in
 * Llama 2) must be tokenized with special-token parsing. Role "developer" (OpenAI) is rendered as
 * "system". Trimming follows Python's str.strip(): ASCII and Unicode whitespace.
 *
 * Known gaps: Llama 3.1+ templates (they always emit a system header with "Cutting Knowledge Date")
 * are detected as CM_CHAT_LLAMA3 and rendered in the 3.0 form; Mistral "[INST]" templates without
 * "<<SYS>>" are CM_CHAT_UNKNOWN. Tools: issue 4.
 */
#ifndef CM_CHAT_H
#define CM_CHAT_H

#include <stdbool.h>
#include <stddef.h>

enum cm_chat_family {
    CM_CHAT_UNKNOWN = 0,
    CM_CHAT_CHATML = 1,
    CM_CHAT_LLAMA3 = 2,
    CM_CHAT_LLAMA2 = 3,
};

struct cm_chat_msg {
    const char *role;    /* "system", "developer", "user", "assistant", ... */
    const char *content; /* NUL-terminated UTF-8 */
    /* tool calls: issue 4 */
};

/* The family of a template from its Jinja source (len bytes, need not be NUL-terminated):
 * "<|im_start|>" ChatML, else "<|start_header_id|>" Llama 3, else "[INST]" with "<<SYS>>" Llama 2,
 * else CM_CHAT_UNKNOWN (also for NULL or empty). */
enum cm_chat_family cm_chat_detect(const char *tmpl, size_t len);

/* Stable lower-case name ("chatml", "llama3", "llama2", "unknown") for logs and the MODEL_INFO
 * frame, and the reverse. cm_chat_family_parse returns 0 or -EINVAL (unknown name). */
const char *cm_chat_family_name(enum cm_chat_family f);
int cm_chat_family_parse(const char *name, enum cm_chat_family *out);

/* The default system prompt a template injects when the conversation has none: the text of a
 * quoted string literal in the template that reads "<|im_start|>system\n{text}<|im_end|>..." or
 * "<|start_header_id|>system<|end_header_id|>\n\n{text}<|eot_id|>..." (Jinja escapes \n \t \r \\
 * \' \" decoded; the newlines may also be literal). The first such literal wins; the Jinja logic
 * around it is not evaluated. On success *out is a fresh NUL-terminated string (caller frees with
 * free()), or NULL when the template has none. Returns 0, -EINVAL (NULL out, or NULL tmpl with
 * len > 0) or -ENOMEM. */
int cm_chat_default_system(const char *tmpl, size_t len, char **out);

/* Renders n >= 1 messages in family f. default_system (may be NULL) is rendered as a system
 * message before msgs[0] when msgs[0] is not a system (or developer) message. add_generation_prompt
 * appends the assistant header (ignored by Llama 2, whose prompt already ends in "[/INST]").
 * On success *out is a fresh NUL-terminated string (caller frees with free()).
 * Returns 0, -EINVAL (unknown family, n < 1, NULL msgs/out, a NULL or empty role, NULL content, or
 * for Llama 2 roles that do not alternate user/assistant) or -ENOMEM. */
int cm_chat_render(enum cm_chat_family f, const char *default_system,
                   const struct cm_chat_msg *msgs, int n, bool add_generation_prompt, char **out);

#endif

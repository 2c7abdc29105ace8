/*
 * cm_chat: chat template families, detected from a model's tokenizer.chat_template (Jinja source)
 * and rendered in C, so the engine never runs Jinja. Used by llm-run and by the FastCGI worker;
 * pure string functions (no engine, no I/O, no global state), safe from any thread.
 *
 * Rendering reproduces what the model's own template produces for plain system/user/assistant
 * conversations, byte for byte (the tests hold the Jinja text and the expected output side by
 * side):
 *   CM_CHAT_CHATML  SmolLM2, Qwen2/2.5: "<|im_start|>{role}\n{content}<|im_end|>\n" per message,
 *                   content verbatim; generation prompt "<|im_start|>assistant\n".
 *   CM_CHAT_LLAMA3  Llama 3: "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
 *                   content trimmed (Jinja `| trim`); generation prompt
 *                   "<|start_header_id|>assistant<|end_header_id|>\n\n".
 *   CM_CHAT_LLAMA2  Llama 2 chat:
 *                   "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s>"
 *                   with user/assistant stripped; roles must alternate user/assistant after an
 *                   optional system message; there is no separate generation prompt.
 * The BOS token that opens the conversation (Llama 3 "<|begin_of_text|>", Llama 2's first "<s>")
 * is NOT rendered: the tokenizer adds it (eng_tok_encode add_bos). Any other special token text in
 * the result (a later "<s>" in Llama 2) must be tokenized with special-token parsing. Role
 * "developer" (OpenAI) is rendered as "system". Trimming follows Python's str.strip(): ASCII and
 * Unicode whitespace.
 *
 * Tools (cm_chat_render_ex with opts->tools_json, assistant tool_calls, role "tool" results)
 * follow the Hermes / Qwen2.5 format, which SmolLM2 and Qwen models know and guards/guard_toolcall
 * parses. The model is told to answer with
 *   <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>
 * CM_CHAT_CHATML (byte for byte what Qwen2.5's template renders through transformers):
 *   - the system turn is msgs[0] when that is a system/developer message, else default_system,
 *     else empty; "\n\n" + CM_CHAT_TOOLS_HEAD + per tool "\n" + its JSON + CM_CHAT_TOOLS_TAIL
 *     is appended to its text (without the leading "\n\n" when the text is empty);
 *   - an assistant message with tool calls: "<|im_start|>assistant", then "\n" + content when
 *     content is non-empty, then per call
 *     "\n<tool_call>\n{\"name\": \"NAME\", \"arguments\": ARGS}\n</tool_call>", then
 *     "<|im_end|>\n";
 *   - consecutive role "tool" messages form ONE user turn: "<|im_start|>user", per message
 *     "\n<tool_response>\n" + content + "\n</tool_response>", then "<|im_end|>\n".
 * CM_CHAT_LLAMA3 (Llama 3.0 has no tool format; this one is ours, in the same words):
 *   - the same text appended to the trimmed system header text; with tools a system header is
 *     always rendered;
 *   - assistant: trimmed content, then the same <tool_call> blocks, "\n"-separated;
 *   - each role "tool" message: "<|start_header_id|>ipython<|end_header_id|>\n\n" + trimmed
 *     content + "<|eot_id|>".
 * CM_CHAT_LLAMA2, CM_CHAT_UNKNOWN: no tool format; tools or assistant tool calls give -ENOTSUP
 * (Llama 2 renders role "tool" messages as its template does: nothing, at an assistant position).
 * JSON text (each tool definition, each call's arguments) is re-serialised the way Python's
 * json.dumps(ensure_ascii=False) writes it, which is what the reference template's `tojson`
 * does: one line, ", " and ": " separators, object keys in their given order, non-ASCII UTF-8 as
 * is; numbers are kept as written in the input. Arguments that are not valid JSON are embedded as
 * a JSON string (as `tojson` does with a string). Function names are JSON-escaped (the template
 * inserts them raw; the same for every valid OpenAI name). A call's id, a tool message's
 * tool_call_id and name are accepted and not rendered (the Qwen2.5 template renders neither).
 *
 * Known gaps: Llama 3.1+ templates (they always emit a system header with "Cutting Knowledge Date")
 * are detected as CM_CHAT_LLAMA3 and rendered in the 3.0 form, without their own tool format;
 * Mistral "[INST]" templates without "<<SYS>>" are CM_CHAT_UNKNOWN. JSON goes through json-c,
 * which accepts single-quoted strings (rendered double-quoted), clamps integers outside the 64-bit
 * range, and keeps numbers as written where json.dumps would reformat them (1e5, 1.50).
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

/* One function call made by an assistant message (OpenAI message.tool_calls[i]). */
struct cm_chat_tool_call {
    const char *id;        /* "call_..."; may be NULL (not rendered) */
    const char *name;      /* function name, non-NULL and non-empty */
    const char *arguments; /* JSON text of the arguments object; NULL is rendered as {} */
};

/* All strings NUL-terminated UTF-8, borrowed for the duration of the call. Fields after content
 * may be left zero (initialise with designated initialisers: -Wextra rejects a positional
 * {role, content}). */
struct cm_chat_msg {
    const char *role;    /* "system", "developer", "user", "assistant", "tool", ... */
    const char *content; /* NULL only for an assistant message with n_tool_calls > 0 */
    /* role "assistant" only: the calls it made (NULL/0: none), rendered after content */
    const struct cm_chat_tool_call *tool_calls;
    int n_tool_calls;
    /* role "tool" only (content is the result): the call answered and the function's name; both
     * may be NULL and are not rendered by any family */
    const char *tool_call_id;
    const char *name;
};

/* Rendering options; a zeroed struct renders like cm_chat_render(f, NULL, ..., false, ...). */
struct cm_chat_opts {
    const char *default_system; /* system text used when msgs[0] is not system/developer; NULL:
                                 * none (with tools: an empty system turn holds the tool text) */
    const char *tools_json;     /* JSON array of OpenAI tool definitions, each an object such as
                                 * {"type":"function","function":{"name","description","parameters"}},
                                 * rendered as given; NULL or "[]": no tools */
    bool add_generation_prompt; /* append the assistant header */
};

/* The fixed text around the tool definitions in the system turn (see the top of this file). */
#define CM_CHAT_TOOLS_HEAD                                                                         \
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "     \
    "provided with function signatures within <tools></tools> XML tags:\n<tools>"
#define CM_CHAT_TOOLS_TAIL                                                                         \
    "\n</tools>\n\nFor each function call, return a json object with function name and "           \
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "                 \
    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call>"

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

/* Whether family f has a tool format (CM_CHAT_CHATML, CM_CHAT_LLAMA3). */
bool cm_chat_supports_tools(enum cm_chat_family f);

/* Renders n >= 1 messages in family f with options o (NULL: all zero), as described at the top of
 * this file. default_system is rendered as a system message before msgs[0] when msgs[0] is not a
 * system (or developer) message. add_generation_prompt appends the assistant header (ignored by
 * Llama 2, whose prompt already ends in "[/INST]"). On success *out is a fresh NUL-terminated
 * string (caller frees with free()). Returns 0, or
 *   -EINVAL  unknown family (without tools), n < 1, NULL msgs/out, a NULL or empty role, NULL
 *            content (except an assistant message with tool calls), n_tool_calls < 0, or > 0
 *            with NULL tool_calls or on a role other than "assistant", a call with a NULL or
 *            empty name, tools_json that is not a JSON array of objects, Llama 2 roles that do
 *            not alternate user/assistant;
 *   -ENOTSUP tools (a non-empty array) or assistant tool calls for a family without a tool
 *            format (Llama 2, unknown): the worker answers 400;
 *   -ENOMEM. Pure function, any thread. */
int cm_chat_render_ex(enum cm_chat_family f, const struct cm_chat_opts *o,
                      const struct cm_chat_msg *msgs, int n, char **out);

/* The text the worker appends after the generation prompt to force a tool call: the exact start
 * of the block the system instructions ask for, so that prefix + model output parses as a
 * well-formed <tool_call> block.
 *   name NULL (tool_choice "required"): "<tool_call>\n{\"name\": \""
 *   a named function:                   "<tool_call>\n{\"name\": \"NAME\", \"arguments\": "
 * with NAME JSON-escaped. *out is a fresh string (caller frees with free()). Returns 0, -EINVAL
 * (NULL out, empty name), -ENOTSUP (family without a tool format) or -ENOMEM. Any thread. */
int cm_chat_tool_prefix(enum cm_chat_family f, const char *name, char **out);

/* cm_chat_render_ex with opts {default_system, no tools, add_generation_prompt}, kept for existing
 * callers. Renders n >= 1 messages in family f. default_system (may be NULL) is rendered as a
 * system message before msgs[0] when msgs[0] is not a system (or developer) message.
 * add_generation_prompt appends the assistant header (ignored by Llama 2, whose prompt already ends
 * in "[/INST]"). On success *out is a fresh NUL-terminated string (caller frees with free()).
 * Returns 0, -EINVAL (unknown family, n < 1, NULL msgs/out, a NULL or empty role, NULL content, or
 * for Llama 2 roles that do not alternate user/assistant), -ENOTSUP or -ENOMEM as
 * cm_chat_render_ex. */
int cm_chat_render(enum cm_chat_family f, const char *default_system,
                   const struct cm_chat_msg *msgs, int n, bool add_generation_prompt, char **out);

#endif

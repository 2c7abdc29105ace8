/*
 * Unit tests for common/cm_chat: family detection, default system prompt extraction and rendering.
 * The templates are the models' Jinja sources (SmolLM2's verbatim from its GGUF; Qwen2.5, Llama 3
 * and Llama 2 chat as published with those models). Every expected string was produced by rendering
 * that template with jinja2 (trim_blocks, lstrip_blocks, as transformers does), with the opening
 * BOS removed since the tokenizer adds it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_chat.h"

/* ---- The templates ---- */

/* SmolLM2-135M-Instruct, tokenizer.chat_template: the newlines inside its strings are real. */
static const char smollm2_tmpl[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
    "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|im_start|>assistant\n' }}{% endif %}";

/* Qwen2.5-Instruct: Jinja escapes (\n as backslash-n) inside its strings, a tools branch first. */
static const char qwen25_tmpl[] =
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user "
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML "
    "tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": "
    "<function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' "
    "}}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n";

/* Meta-Llama-3-8B-Instruct. */
static const char llama3_tmpl[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
    "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/* Llama-2-7b-chat-hf. */
static const char llama2_tmpl[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
    "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set "
    "system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] "
    "== 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != "
    "false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
    "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% "
    "endfor %}";

/* A Llama 3.1-style system header: a literal that is not a default system prompt. */
static const char llama31_fragment[] =
    "{{- bos_token }}{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}{{- system_message }}{{- \"<|eot_id|>\" }}";

/* ---- Helpers ---- */

/* A plain message (the tool fields zero). */
#define MSG(r, c)                                                                                  \
    {                                                                                              \
        .role = (r), .content = (c)                                                                \
    }

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

static void
expect_render(enum cm_chat_family f, const char *sys, const struct cm_chat_msg *msgs, int n,
              bool gen, const char *want)
{
    char *out = NULL;
    assert_int_equal(cm_chat_render(f, sys, msgs, n, gen, &out), 0);
    assert_non_null(out);
    assert_string_equal(out, want);
    free(out);
}

static char *
default_system(const char *tmpl)
{
    char *out = (char *)&out; /* must be overwritten */
    assert_int_equal(cm_chat_default_system(tmpl, strlen(tmpl), &out), 0);
    return out;
}

static const struct cm_chat_msg conv_hello[] = {MSG("user", "Hello")};
static const struct cm_chat_msg conv_multi[] = {
    MSG("system", "You are terse."),
    MSG("user", "Hi"),
    MSG("assistant", "Hello!"),
    MSG("user", "2+2?"),
};
static const struct cm_chat_msg conv_no_sys[] = {MSG("user", "Hi"), MSG("assistant", "Hello!")};
/* Whitespace: ASCII around the first, U+00A0 and U+3000 around the second, a lone tab. */
static const struct cm_chat_msg conv_spaces[] = {
    MSG("user", "  spaced out \n"),
    MSG("assistant", "\xc2\xa0ok\xe3\x80\x80"),
    MSG("user", "\t"),
};

#define SMOL_SYS "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
#define QWEN_SYS "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

/* ---- Detection ---- */

static void
test_chat_detect_families(void **state)
{
    (void)state;
    assert_int_equal(cm_chat_detect(smollm2_tmpl, strlen(smollm2_tmpl)), CM_CHAT_CHATML);
    assert_int_equal(cm_chat_detect(qwen25_tmpl, strlen(qwen25_tmpl)), CM_CHAT_CHATML);
    assert_int_equal(cm_chat_detect(llama3_tmpl, strlen(llama3_tmpl)), CM_CHAT_LLAMA3);
    assert_int_equal(cm_chat_detect(llama31_fragment, strlen(llama31_fragment)), CM_CHAT_LLAMA3);
    assert_int_equal(cm_chat_detect(llama2_tmpl, strlen(llama2_tmpl)), CM_CHAT_LLAMA2);

    /* Mistral-style [INST] without <<SYS>>, other formats, nothing. */
    const char *mistral = "{{ bos_token }}{% for message in messages %}{{ '[INST] ' + "
                          "message['content'] + ' [/INST]' }}{% endfor %}";
    assert_int_equal(cm_chat_detect(mistral, strlen(mistral)), CM_CHAT_UNKNOWN);
    const char *zephyr = "{{ '<|user|>\\n' + message['content'] + eos_token }}";
    assert_int_equal(cm_chat_detect(zephyr, strlen(zephyr)), CM_CHAT_UNKNOWN);
    assert_int_equal(cm_chat_detect("", 0), CM_CHAT_UNKNOWN);
    assert_int_equal(cm_chat_detect(NULL, 5), CM_CHAT_UNKNOWN);

    /* len is honoured: the marker past len is not seen, and no NUL is needed. */
    const char cut[] = {'a', '<', '|', 'i', 'm', '_', 's', 't', 'a', 'r', 't', '|', '>'};
    assert_int_equal(cm_chat_detect(cut, sizeof(cut)), CM_CHAT_CHATML);
    assert_int_equal(cm_chat_detect(cut, sizeof(cut) - 1), CM_CHAT_UNKNOWN);
}

static void
test_chat_family_names(void **state)
{
    (void)state;
    enum cm_chat_family f = CM_CHAT_UNKNOWN;
    const enum cm_chat_family all[] = {CM_CHAT_UNKNOWN, CM_CHAT_CHATML, CM_CHAT_LLAMA3,
                                       CM_CHAT_LLAMA2};
    for (int i = 0; i < N_OF(all); i++) {
        assert_int_equal(cm_chat_family_parse(cm_chat_family_name(all[i]), &f), 0);
        assert_int_equal(f, all[i]);
    }
    assert_string_equal(cm_chat_family_name(CM_CHAT_CHATML), "chatml");
    assert_string_equal(cm_chat_family_name((enum cm_chat_family)77), "unknown");
    assert_int_equal(cm_chat_family_parse("ChatML", &f), -EINVAL);
    assert_int_equal(cm_chat_family_parse(NULL, &f), -EINVAL);
}

/* ---- Default system prompt ---- */

static void
test_chat_default_system_extracted(void **state)
{
    (void)state;
    char *s = default_system(smollm2_tmpl); /* raw newlines */
    assert_non_null(s);
    assert_string_equal(s, SMOL_SYS);
    free(s);

    /* Escaped newlines; the tools-branch literal and the one that concatenates messages[0] are
     * skipped because they do not hold "<|im_end|>". */
    s = default_system(qwen25_tmpl);
    assert_non_null(s);
    assert_string_equal(s, QWEN_SYS);
    free(s);

    /* Escapes inside the text are decoded; the other quote style works. */
    const char *esc =
        "{{ \"<|im_start|>system\\nSay \\\"hi\\\"\\tand\\nit's fine\\\\<|im_end|>\\n\" }}";
    s = default_system(esc);
    assert_non_null(s);
    assert_string_equal(s, "Say \"hi\"\tand\nit's fine\\");
    free(s);

    /* A Llama 3 style literal. */
    const char *l3 = "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nBe brief.<|eot_id|>' }}";
    s = default_system(l3);
    assert_non_null(s);
    assert_string_equal(s, "Be brief.");
    free(s);

    /* An empty default is an empty string, not "none". */
    s = default_system("{{ '<|im_start|>system\\n<|im_end|>\\n' }}");
    assert_non_null(s);
    assert_string_equal(s, "");
    free(s);
}

static void
test_chat_default_system_absent(void **state)
{
    (void)state;
    assert_null(default_system(llama3_tmpl));
    assert_null(default_system(llama2_tmpl));
    assert_null(default_system(llama31_fragment));
    /* Not inside a quoted literal, unterminated literal, marker at the very start. */
    assert_null(default_system("<|im_start|>system\nText<|im_end|>"));
    assert_null(default_system("{{ '<|im_start|>system\\nText<|im_end|>"));
    assert_null(default_system("'<|im_start|>system\\nText"));
    /* After an escaped quote: inside some other literal. */
    assert_null(default_system("{{ 'a \\'<|im_start|>system\\nText<|im_end|>' }}"));
    assert_null(default_system(""));

    char *out = NULL;
    assert_int_equal(cm_chat_default_system(NULL, 0, &out), 0);
    assert_null(out);
    assert_int_equal(cm_chat_default_system(NULL, 3, &out), -EINVAL);
    assert_int_equal(cm_chat_default_system(smollm2_tmpl, 10, NULL), -EINVAL);
    /* len cuts the literal short: it is then unterminated. */
    assert_int_equal(cm_chat_default_system(smollm2_tmpl, 120, &out), 0);
    assert_null(out);
}

/* ---- ChatML ---- */

static void
test_chat_render_chatml_smollm2(void **state)
{
    (void)state;
    char *sys = default_system(smollm2_tmpl);
    expect_render(CM_CHAT_CHATML, sys, conv_hello, 1, true,
                  "<|im_start|>system\n" SMOL_SYS "<|im_end|>\n"
                  "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
    expect_render(CM_CHAT_CHATML, sys, conv_hello, 1, false,
                  "<|im_start|>system\n" SMOL_SYS
                  "<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n");
    /* A system message replaces the default. */
    expect_render(CM_CHAT_CHATML, sys, conv_multi, 4, true,
                  "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                  "<|im_start|>assistant\n");
    expect_render(CM_CHAT_CHATML, sys, conv_multi, 4, false,
                  "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n");
    expect_render(CM_CHAT_CHATML, sys, conv_no_sys, 2, true,
                  "<|im_start|>system\n" SMOL_SYS "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n");
    /* ChatML keeps content verbatim. */
    expect_render(CM_CHAT_CHATML, sys, conv_spaces, 3, false,
                  "<|im_start|>system\n" SMOL_SYS "<|im_end|>\n"
                  "<|im_start|>user\n  spaced out \n<|im_end|>\n"
                  "<|im_start|>assistant\n\xc2\xa0ok\xe3\x80\x80<|im_end|>\n"
                  "<|im_start|>user\n\t<|im_end|>\n");
    free(sys);
}

static void
test_chat_render_chatml_qwen(void **state)
{
    (void)state;
    char *sys = default_system(qwen25_tmpl);
    expect_render(CM_CHAT_CHATML, sys, conv_hello, 1, true,
                  "<|im_start|>system\n" QWEN_SYS "<|im_end|>\n"
                  "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
    expect_render(CM_CHAT_CHATML, sys, conv_multi, 4, false,
                  "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n");
    free(sys);

    /* No default system: nothing is injected. */
    expect_render(CM_CHAT_CHATML, NULL, conv_no_sys, 2, false,
                  "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n");
}

static void
test_chat_render_developer_is_system(void **state)
{
    (void)state;
    const struct cm_chat_msg dev[] = {MSG("developer", "Rules."), MSG("user", "Hi")};
    expect_render(CM_CHAT_CHATML, SMOL_SYS, dev, 2, true,
                  "<|im_start|>system\nRules.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\n");
    expect_render(CM_CHAT_LLAMA3, "unused", dev, 2, false,
                  "<|start_header_id|>system<|end_header_id|>\n\nRules.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
    expect_render(CM_CHAT_LLAMA2, NULL, dev, 2, false,
                  "[INST] <<SYS>>\nRules.\n<</SYS>>\n\nHi [/INST]");
}

/* ---- Llama 3 ---- */

static void
test_chat_render_llama3(void **state)
{
    (void)state;
    expect_render(CM_CHAT_LLAMA3, NULL, conv_hello, 1, true,
                  "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n");
    expect_render(CM_CHAT_LLAMA3, NULL, conv_hello, 1, false,
                  "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>");
    expect_render(CM_CHAT_LLAMA3, NULL, conv_multi, 4, true,
                  "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n");
    expect_render(CM_CHAT_LLAMA3, NULL, conv_no_sys, 2, false,
                  "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>");
    /* `| trim` removes ASCII and Unicode whitespace at both ends. */
    expect_render(CM_CHAT_LLAMA3, NULL, conv_spaces, 3, true,
                  "<|start_header_id|>user<|end_header_id|>\n\nspaced out<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n");
    /* Python's whitespace: U+2003, U+2028 and \x1f are, U+200B (zero width) is not. */
    const struct cm_chat_msg uni[] = {MSG("user", " \xe2\x80\x83"
                                                  "a b\xe2\x80\xa8\x1f"),
                                      MSG("assistant", "\xe2\x80\x8b x")};
    expect_render(CM_CHAT_LLAMA3, NULL, uni, 2, false,
                  "<|start_header_id|>user<|end_header_id|>\n\na b<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n\xe2\x80\x8b x<|eot_id|>");
    /* Bytes that are not valid UTF-8 are never whitespace (an overlong space, a lone byte). */
    const struct cm_chat_msg bad[] = {MSG("user", "\xc0\xa0x\x80")};
    expect_render(CM_CHAT_LLAMA3, NULL, bad, 1, false,
                  "<|start_header_id|>user<|end_header_id|>\n\n\xc0\xa0x\x80<|eot_id|>");
    /* A caller-given default system prompt gets its own header. */
    expect_render(CM_CHAT_LLAMA3, "Be brief.", conv_hello, 1, false,
                  "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>");
}

/* ---- Llama 2 ---- */

static void
test_chat_render_llama2(void **state)
{
    (void)state;
    /* Generation prompt or not: the same (the prompt ends in [/INST]). */
    expect_render(CM_CHAT_LLAMA2, NULL, conv_hello, 1, true, "[INST] Hello [/INST]");
    expect_render(CM_CHAT_LLAMA2, NULL, conv_hello, 1, false, "[INST] Hello [/INST]");
    /* Later turns carry their own <s>. */
    expect_render(CM_CHAT_LLAMA2, NULL, conv_multi, 4, true,
                  "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
                  "<s>[INST] 2+2? [/INST]");
    expect_render(CM_CHAT_LLAMA2, NULL, conv_no_sys, 2, false, "[INST] Hi [/INST] Hello! </s>");
    expect_render(CM_CHAT_LLAMA2, NULL, conv_spaces, 3, false,
                  "[INST] spaced out [/INST] ok </s><s>[INST]  [/INST]");

    /* strip() applies to system + user joined: leading user spaces stay, and an all-blank user
     * message strips back into the system block. */
    const struct cm_chat_msg lead[] = {MSG("system", "S"), MSG("user", "  x  ")};
    expect_render(CM_CHAT_LLAMA2, NULL, lead, 2, false,
                  "[INST] <<SYS>>\nS\n<</SYS>>\n\n  x [/INST]");
    const struct cm_chat_msg blank[] = {MSG("system", "S"), MSG("user", " ")};
    expect_render(CM_CHAT_LLAMA2, NULL, blank, 2, false, "[INST] <<SYS>>\nS\n<</SYS>> [/INST]");
    /* A default system prompt is folded in the same way. */
    expect_render(CM_CHAT_LLAMA2, "D", conv_hello, 1, false,
                  "[INST] <<SYS>>\nD\n<</SYS>>\n\nHello [/INST]");
    /* Only a system message: the template renders nothing. */
    expect_render(CM_CHAT_LLAMA2, NULL, conv_multi, 1, true, "");
}

static void
test_chat_render_llama2_alternation(void **state)
{
    (void)state;
    char *out = NULL;
    const struct cm_chat_msg starts_assistant[] = {MSG("assistant", "x")};
    const struct cm_chat_msg two_users[] = {MSG("user", "a"), MSG("user", "b")};
    const struct cm_chat_msg late_system[] = {MSG("user", "a"), MSG("assistant", "b"),
                                              MSG("system", "ignored"), MSG("user", "c")};
    assert_int_equal(cm_chat_render(CM_CHAT_LLAMA2, NULL, starts_assistant, 1, true, &out),
                     -EINVAL);
    assert_int_equal(cm_chat_render(CM_CHAT_LLAMA2, NULL, two_users, 2, true, &out), -EINVAL);
    assert_int_equal(cm_chat_render(CM_CHAT_LLAMA2, NULL, late_system, 4, true, &out), -EINVAL);
    assert_null(out);
    /* A role other than user at an odd index renders nothing, as in the template. */
    const struct cm_chat_msg odd_tool[] = {MSG("user", "a"), MSG("tool", "t")};
    expect_render(CM_CHAT_LLAMA2, NULL, odd_tool, 2, false, "[INST] a [/INST]");
}

/* ---- Errors ---- */

static void
test_chat_render_errors(void **state)
{
    (void)state;
    char *out = NULL;
    const struct cm_chat_msg null_content[] = {MSG("user", NULL)};
    const struct cm_chat_msg null_role[] = {MSG(NULL, "x")};
    const struct cm_chat_msg empty_role[] = {MSG("", "x")};
    assert_int_equal(cm_chat_render(CM_CHAT_UNKNOWN, NULL, conv_hello, 1, true, &out), -EINVAL);
    assert_int_equal(cm_chat_render((enum cm_chat_family)42, NULL, conv_hello, 1, true, &out),
                     -EINVAL);
    assert_int_equal(cm_chat_render(CM_CHAT_CHATML, NULL, null_content, 1, true, &out), -EINVAL);
    assert_int_equal(cm_chat_render(CM_CHAT_LLAMA3, NULL, null_role, 1, true, &out), -EINVAL);
    assert_int_equal(cm_chat_render(CM_CHAT_CHATML, NULL, empty_role, 1, true, &out), -EINVAL);
    assert_int_equal(cm_chat_render(CM_CHAT_CHATML, NULL, conv_hello, 0, true, &out), -EINVAL);
    assert_int_equal(cm_chat_render(CM_CHAT_CHATML, NULL, NULL, 1, true, &out), -EINVAL);
    assert_int_equal(cm_chat_render(CM_CHAT_CHATML, NULL, conv_hello, 1, true, NULL), -EINVAL);
    assert_null(out);
}

/* A long conversation grows the buffer many times; the result is exact. */
static void
test_chat_render_long(void **state)
{
    (void)state;
    enum { N = 300 };
    static struct cm_chat_msg msgs[N];
    static char text[5000];
    memset(text, 'x', sizeof(text) - 1);
    for (int i = 0; i < N; i++) {
        msgs[i].role = i % 2 ? "assistant" : "user";
        msgs[i].content = text;
    }
    char *out = NULL;
    assert_int_equal(cm_chat_render(CM_CHAT_CHATML, NULL, msgs, N, true, &out), 0);
    size_t per = strlen("<|im_start|>") + 1 + strlen(text) + strlen("<|im_end|>\n");
    size_t want = (N / 2) * (per + strlen("user")) + (N / 2) * (per + strlen("assistant")) +
                  strlen("<|im_start|>assistant\n");
    assert_int_equal(strlen(out), want);
    free(out);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_detect_families),
        cmocka_unit_test(test_chat_family_names),
        cmocka_unit_test(test_chat_default_system_extracted),
        cmocka_unit_test(test_chat_default_system_absent),
        cmocka_unit_test(test_chat_render_chatml_smollm2),
        cmocka_unit_test(test_chat_render_chatml_qwen),
        cmocka_unit_test(test_chat_render_developer_is_system),
        cmocka_unit_test(test_chat_render_llama3),
        cmocka_unit_test(test_chat_render_llama2),
        cmocka_unit_test(test_chat_render_llama2_alternation),
        cmocka_unit_test(test_chat_render_errors),
        cmocka_unit_test(test_chat_render_long),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

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

/* ---- Tools ---- */

/* Two OpenAI tool definitions, written compactly: the renderer re-serialises them the way the
 * template's tojson (Python json.dumps) does. A quote, a tab, "<=" and "&" (not HTML-escaped) and
 * non-ASCII text (kept as UTF-8). */
static const char tools_json[] =
    "[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"description\":\"Weather in "
    "a city, e.g. \\\"Zürich\\\"\",\"parameters\":{\"type\":\"object\",\"properties\":{\"city\":{"
    "\"type\":\"string\"},\"unit\":{\"type\":\"string\",\"enum\":[\"c\",\"f\"]}},\"required\":["
    "\"city\"]}}},\n {\"type\":\"function\",\"function\":{\"name\":\"add\",\"description\":\"a+b "
    "<= 10 & more\\ttab\",\"parameters\":{\"type\":\"object\",\"properties\":{\"a\":{\"type\":"
    "\"integer\"},\"b\":{\"type\":\"number\",\"default\":0.5}}}}}] ";

/* The system text that tools_json adds, as Qwen2.5's template renders it (from "# Tools"). */
#define TOOLS_TEXT                                                                                 \
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "     \
    "provided with function signatures within <tools></tools> XML tags:\n<tools>\n"                \
    "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": "         \
    "\"Weather in a city, e.g. \\\"Zürich\\\"\", \"parameters\": {\"type\": \"object\", "         \
    "\"properties\": {\"city\": {\"type\": \"string\"}, \"unit\": {\"type\": \"string\", "         \
    "\"enum\": [\"c\", \"f\"]}}, \"required\": [\"city\"]}}}\n"                                    \
    "{\"type\": \"function\", \"function\": {\"name\": \"add\", \"description\": \"a+b <= 10 & "   \
    "more\\ttab\", \"parameters\": {\"type\": \"object\", \"properties\": {\"a\": {\"type\": "     \
    "\"integer\"}, \"b\": {\"type\": \"number\", \"default\": 0.5}}}}}\n</tools>\n\n"              \
    "For each function call, return a json object with function name and arguments within "        \
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "  \
    "<args-json-object>}\n</tool_call>"

#define CALL_PARIS                                                                                 \
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
#define CALL_ZURICH                                                                                \
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"unit\": "   \
    "\"c\"}}\n</tool_call>"

/* Arguments as clients send them: compact, or with white space the rendering drops. */
static const struct cm_chat_tool_call calls_weather[] = {
    {.id = "call_1", .name = "get_weather", .arguments = "{\"city\":\"Paris\"}"},
    {.id = "call_2",
     .name = "get_weather",
     .arguments = " {\"city\" : \"Zürich\",\n \"unit\":\"c\"} "},
};

/* system, user, an assistant turn of two calls, their two results, a follow-up question. */
static const struct cm_chat_msg conv_tools[] = {
    MSG("system", "You are a weather bot."),
    MSG("user", "Weather in Paris and Zürich?"),
    {.role = "assistant", .content = "", .tool_calls = calls_weather, .n_tool_calls = 2},
    {.role = "tool", .content = "18°C, sunny", .tool_call_id = "call_1", .name = "get_weather"},
    {.role = "tool", .content = "{\"temp\": 11}", .tool_call_id = "call_2"},
    MSG("user", "Thanks! And 2+3?"),
};

static void
expect_render_ex(enum cm_chat_family f, const char *sys, const char *tools, bool gen,
                 const struct cm_chat_msg *msgs, int n, const char *want)
{
    const struct cm_chat_opts o = {
        .default_system = sys, .tools_json = tools, .add_generation_prompt = gen};
    char *out = NULL;
    assert_int_equal(cm_chat_render_ex(f, &o, msgs, n, &out), 0);
    assert_non_null(out);
    assert_string_equal(out, want);
    free(out);
}

static int
render_ex_rc(enum cm_chat_family f, const char *tools, const struct cm_chat_msg *msgs, int n)
{
    const struct cm_chat_opts o = {.tools_json = tools, .add_generation_prompt = true};
    char *out = NULL;
    int rc = cm_chat_render_ex(f, &o, msgs, n, &out);
    if (rc < 0)
        assert_null(out);
    free(out);
    return rc;
}

/* The expected text is what transformers' render_jinja_template (trim_blocks, lstrip_blocks, its
 * json.dumps tojson) gives for qwen25_tmpl and the same conversation, arguments as dicts. */
static void
test_chat_render_tools_chatml(void **state)
{
    (void)state;
    static const char want[] =
        "<|im_start|>system\nYou are a weather bot.\n\n" TOOLS_TEXT "<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Zürich?<|im_end|>\n"
        "<|im_start|>assistant\n" CALL_PARIS "\n" CALL_ZURICH "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response>\n"
        "<tool_response>\n{\"temp\": 11}\n</tool_response><|im_end|>\n"
        "<|im_start|>user\nThanks! And 2+3?<|im_end|>\n<|im_start|>assistant\n";
    char *sys = default_system(qwen25_tmpl);
    expect_render_ex(CM_CHAT_CHATML, sys, tools_json, true, conv_tools, N_OF(conv_tools), want);

    /* NULL content renders as empty content does. */
    struct cm_chat_msg null_content[N_OF(conv_tools)];
    memcpy(null_content, conv_tools, sizeof(conv_tools));
    null_content[2].content = NULL;
    expect_render_ex(CM_CHAT_CHATML, sys, tools_json, true, null_content, N_OF(conv_tools), want);

    /* No system message: the default one carries the tools. Content before a call, nested
     * arguments, a single tool result, a final answer. */
    static const struct cm_chat_tool_call add[] = {
        {.name = "add", .arguments = "{\"a\":2,\"b\":[1,{\"x\":null,\"y\":true}]}"}};
    const struct cm_chat_msg conv_add[] = {
        MSG("user", "Add 2 and 3"),
        {.role = "assistant", .content = "Let me add.", .tool_calls = add, .n_tool_calls = 1},
        MSG("tool", "5"),
        MSG("assistant", "It is 5."),
    };
    expect_render_ex(CM_CHAT_CHATML, sys, tools_json, false, conv_add, N_OF(conv_add),
                     "<|im_start|>system\n" QWEN_SYS "\n\n" TOOLS_TEXT "<|im_end|>\n"
                     "<|im_start|>user\nAdd 2 and 3<|im_end|>\n"
                     "<|im_start|>assistant\nLet me add.\n<tool_call>\n{\"name\": \"add\", "
                     "\"arguments\": {\"a\": 2, \"b\": [1, {\"x\": null, \"y\": true}]}}\n"
                     "</tool_call><|im_end|>\n"
                     "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
                     "<|im_start|>assistant\nIt is 5.<|im_end|>\n");

    /* Calls in the history without tools: arguments that are not JSON become a JSON string. */
    static const struct cm_chat_tool_call bad_args[] = {
        {.name = "add", .arguments = "{not json \"q\"\n"}};
    const struct cm_chat_msg conv_bad[] = {
        MSG("user", "x"),
        {.role = "assistant", .tool_calls = bad_args, .n_tool_calls = 1},
        MSG("tool", "err"),
    };
    expect_render_ex(CM_CHAT_CHATML, sys, NULL, false, conv_bad, N_OF(conv_bad),
                     "<|im_start|>system\n" QWEN_SYS "<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
                     "<|im_start|>assistant\n<tool_call>\n{\"name\": \"add\", \"arguments\": "
                     "\"{not json \\\"q\\\"\\n\"}\n</tool_call><|im_end|>\n"
                     "<|im_start|>user\n<tool_response>\nerr\n</tool_response><|im_end|>\n");
    free(sys);
}

static void
test_chat_render_tools_without_system(void **state)
{
    (void)state;
    /* No system message and no default: a system turn holding only the tool text. */
    expect_render_ex(CM_CHAT_CHATML, NULL, tools_json, true, conv_hello, 1,
                     "<|im_start|>system\n" TOOLS_TEXT "<|im_end|>\n"
                     "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
    expect_render_ex(CM_CHAT_LLAMA3, NULL, tools_json, false, conv_hello, 1,
                     "<|start_header_id|>system<|end_header_id|>\n\n" TOOLS_TEXT "<|eot_id|>"
                     "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>");
    /* The default system prompt, and an empty system message (no leading blank lines). */
    expect_render_ex(CM_CHAT_CHATML, SMOL_SYS, tools_json, false, conv_hello, 1,
                     "<|im_start|>system\n" SMOL_SYS "\n\n" TOOLS_TEXT "<|im_end|>\n"
                     "<|im_start|>user\nHello<|im_end|>\n");
    expect_render_ex(CM_CHAT_LLAMA3, "Be brief.", tools_json, false, conv_hello, 1,
                     "<|start_header_id|>system<|end_header_id|>\n\nBe brief.\n\n" TOOLS_TEXT
                     "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>");
    const struct cm_chat_msg empty_sys[] = {MSG("developer", ""), MSG("user", "Hi")};
    expect_render_ex(CM_CHAT_CHATML, SMOL_SYS, tools_json, false, empty_sys, 2,
                     "<|im_start|>system\n" TOOLS_TEXT "<|im_end|>\n"
                     "<|im_start|>user\nHi<|im_end|>\n");
    /* Llama 3 trims the system message; a blank one leaves the tool text alone. */
    const struct cm_chat_msg blank_sys[] = {MSG("system", " \n "), MSG("user", "Hi")};
    expect_render_ex(CM_CHAT_LLAMA3, NULL, tools_json, false, blank_sys, 2,
                     "<|start_header_id|>system<|end_header_id|>\n\n" TOOLS_TEXT "<|eot_id|>"
                     "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
    /* An empty array is no tools, for every family. */
    expect_render_ex(CM_CHAT_CHATML, SMOL_SYS, " [ ] ", true, conv_hello, 1,
                     "<|im_start|>system\n" SMOL_SYS "<|im_end|>\n"
                     "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n");
    expect_render_ex(CM_CHAT_LLAMA2, NULL, "[]", true, conv_hello, 1, "[INST] Hello [/INST]");
    /* No options at all: as cm_chat_render without a default or a generation prompt. */
    char *out = NULL;
    assert_int_equal(cm_chat_render_ex(CM_CHAT_CHATML, NULL, conv_hello, 1, &out), 0);
    assert_string_equal(out, "<|im_start|>user\nHello<|im_end|>\n");
    free(out);
}

/* Llama 3 has no reference tool template: the expected text follows cm_chat.h's description. */
static void
test_chat_render_tools_llama3(void **state)
{
    (void)state;
    expect_render_ex(
        CM_CHAT_LLAMA3, "unused", tools_json, true, conv_tools, N_OF(conv_tools),
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a weather bot.\n\n" TOOLS_TEXT
        "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris and "
        "Zürich?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n" CALL_PARIS "\n" CALL_ZURICH "<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\n18°C, sunny<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\n{\"temp\": 11}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nThanks! And 2+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n");
    /* Trimmed content before the calls, a trimmed tool result, no arguments as {}. */
    static const struct cm_chat_tool_call no_args[] = {{.name = "now"}};
    const struct cm_chat_msg conv[] = {
        MSG("user", "Time?"),
        {.role = "assistant", .content = " Checking. \n", .tool_calls = no_args, .n_tool_calls = 1},
        MSG("tool", "\n12:00\n"),
    };
    expect_render_ex(CM_CHAT_LLAMA3, NULL, NULL, false, conv, N_OF(conv),
                     "<|start_header_id|>user<|end_header_id|>\n\nTime?<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\nChecking.\n<tool_call>\n"
                     "{\"name\": \"now\", \"arguments\": {}}\n</tool_call><|eot_id|>"
                     "<|start_header_id|>ipython<|end_header_id|>\n\n12:00<|eot_id|>");
}

static void
expect_prefix(enum cm_chat_family f, const char *name, const char *want)
{
    char *out = NULL;
    assert_int_equal(cm_chat_tool_prefix(f, name, &out), 0);
    assert_string_equal(out, want);
    free(out);
}

static void
test_chat_tool_prefix(void **state)
{
    (void)state;
    for (enum cm_chat_family f = CM_CHAT_CHATML; f <= CM_CHAT_LLAMA3; f++) {
        expect_prefix(f, NULL, "<tool_call>\n{\"name\": \"");
        expect_prefix(f, "get_weather", "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": ");
        expect_prefix(f, "a\"b\\c\nd\x01\x1f\x7fé/",
                      "<tool_call>\n{\"name\": \"a\\\"b\\\\c\\nd\\u0001\\u001f\x7fé/\", "
                      "\"arguments\": ");
    }
    /* The prefix is exactly how a call in the history starts. */
    const struct cm_chat_opts o = {.tools_json = tools_json};
    char *text = NULL, *pre = NULL;
    assert_int_equal(cm_chat_render_ex(CM_CHAT_CHATML, &o, conv_tools, 3, &text), 0);
    assert_int_equal(cm_chat_tool_prefix(CM_CHAT_CHATML, "get_weather", &pre), 0);
    const char *at = strstr(text, "<|im_start|>assistant\n");
    assert_non_null(at);
    at += strlen("<|im_start|>assistant\n");
    assert_memory_equal(at, pre, strlen(pre));
    assert_string_equal(at + strlen(pre),
                        "{\"city\": \"Paris\"}}\n</tool_call>\n" CALL_ZURICH "<|im_end|>\n");
    free(text);
    free(pre);

    char *out = NULL;
    assert_int_equal(cm_chat_tool_prefix(CM_CHAT_LLAMA2, NULL, &out), -ENOTSUP);
    assert_int_equal(cm_chat_tool_prefix(CM_CHAT_UNKNOWN, "f", &out), -ENOTSUP);
    assert_int_equal(cm_chat_tool_prefix(CM_CHAT_CHATML, "", &out), -EINVAL);
    assert_int_equal(cm_chat_tool_prefix(CM_CHAT_CHATML, "f", NULL), -EINVAL);
    assert_null(out);
    assert_true(cm_chat_supports_tools(CM_CHAT_CHATML));
    assert_true(cm_chat_supports_tools(CM_CHAT_LLAMA3));
    assert_false(cm_chat_supports_tools(CM_CHAT_LLAMA2));
    assert_false(cm_chat_supports_tools(CM_CHAT_UNKNOWN));
}

static void
test_chat_render_tools_errors(void **state)
{
    (void)state;
    /* tools_json that is not a JSON array of objects. */
    static const char *const bad_tools[] = {
        "{}", "[1]", "[{}, null]", "[{}] x", "[{},", "not json", "", "null", "1", "[{}]]",
    };
    for (int i = 0; i < N_OF(bad_tools); i++) {
        assert_int_equal(render_ex_rc(CM_CHAT_CHATML, bad_tools[i], conv_hello, 1), -EINVAL);
        assert_int_equal(render_ex_rc(CM_CHAT_LLAMA3, bad_tools[i], conv_hello, 1), -EINVAL);
    }
    /* Families without a tool format: tools or calls in the history. */
    assert_int_equal(render_ex_rc(CM_CHAT_LLAMA2, tools_json, conv_hello, 1), -ENOTSUP);
    assert_int_equal(render_ex_rc(CM_CHAT_UNKNOWN, tools_json, conv_hello, 1), -ENOTSUP);
    assert_int_equal(render_ex_rc(CM_CHAT_LLAMA2, NULL, conv_tools + 1, 2), -ENOTSUP);
    assert_int_equal(render_ex_rc((enum cm_chat_family)42, tools_json, conv_hello, 1), -EINVAL);
    /* Messages that break the rules. */
    static const struct cm_chat_tool_call ok[] = {{.name = "f", .arguments = "{}"}};
    static const struct cm_chat_tool_call unnamed[] = {{.name = "", .arguments = "{}"}};
    static const struct cm_chat_tool_call null_name[] = {{.arguments = "{}"}};
    const struct cm_chat_msg tool_no_content[] = {MSG("user", "a"), MSG("tool", NULL)};
    const struct cm_chat_msg asst_no_content[] = {MSG("user", "a"), MSG("assistant", NULL)};
    const struct cm_chat_msg neg_calls[] = {
        {.role = "assistant", .content = "x", .tool_calls = ok, .n_tool_calls = -1}};
    const struct cm_chat_msg null_calls[] = {{.role = "assistant", .n_tool_calls = 1}};
    const struct cm_chat_msg user_calls[] = {
        {.role = "user", .content = "x", .tool_calls = ok, .n_tool_calls = 1}};
    const struct cm_chat_msg empty_name[] = {
        {.role = "assistant", .tool_calls = unnamed, .n_tool_calls = 1}};
    const struct cm_chat_msg no_name[] = {
        {.role = "assistant", .tool_calls = null_name, .n_tool_calls = 1}};
    for (enum cm_chat_family f = CM_CHAT_CHATML; f <= CM_CHAT_LLAMA3; f++) {
        assert_int_equal(render_ex_rc(f, tools_json, tool_no_content, 2), -EINVAL);
        assert_int_equal(render_ex_rc(f, tools_json, asst_no_content, 2), -EINVAL);
        assert_int_equal(render_ex_rc(f, NULL, neg_calls, 1), -EINVAL);
        assert_int_equal(render_ex_rc(f, NULL, null_calls, 1), -EINVAL);
        assert_int_equal(render_ex_rc(f, NULL, user_calls, 1), -EINVAL);
        assert_int_equal(render_ex_rc(f, NULL, empty_name, 1), -EINVAL);
        assert_int_equal(render_ex_rc(f, NULL, no_name, 1), -EINVAL);
    }
    /* The old entry point keeps rejecting NULL content. */
    char *out = NULL;
    assert_int_equal(cm_chat_render(CM_CHAT_CHATML, NULL, asst_no_content, 2, true, &out), -EINVAL);
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
        cmocka_unit_test(test_chat_render_tools_chatml),
        cmocka_unit_test(test_chat_render_tools_without_system),
        cmocka_unit_test(test_chat_render_tools_llama3),
        cmocka_unit_test(test_chat_tool_prefix),
        cmocka_unit_test(test_chat_render_tools_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

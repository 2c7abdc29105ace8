/*
 * Unit tests for fcgi/fcgi_conf: defaults, every flag, repeated and file API keys, bad values
 * (one clear error each), the config file with command-line precedence, --help naming every flag.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "fcgi/fcgi_conf.h"

#define ARGC(a) ((int)(sizeof(a) / sizeof((a)[0])))

static int
parse(int argc, const char **argv, struct fcgi_conf *c)
{
    FILE *devnull = fopen("/dev/null", "w");
    int rc = fcgi_conf_parse(argc, (char **)argv, devnull, c);
    fclose(devnull);
    return rc;
}

static char *
write_tmp(const char *content)
{
    char *path = strdup("/tmp/test_fcgi_conf_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, content, strlen(content)), (ssize_t)strlen(content));
    close(fd);
    return path;
}

static void
test_fcgi_conf_defaults(void **state)
{
    (void)state;
    const char *argv[] = {"llm-fcgi", "--engine", "/run/e.sock"};
    struct fcgi_conf c;
    assert_int_equal(parse(ARGC(argv), argv, &c), 0);
    assert_string_equal(c.engine_socket, "/run/e.sock");
    assert_int_equal(c.n_threads, 8);
    assert_null(c.listen);
    assert_int_equal(c.n_api_keys, 0);
    assert_int_equal(c.max_body_bytes, 4u << 20);
    assert_null(c.cors_origin);
    assert_null(c.base_path);
    assert_false(c.any_model_name);
    assert_null(c.model_name);
    assert_int_equal(c.request_timeout_s, 600);
    assert_int_equal(c.heartbeat_s, 15);
    assert_int_equal(c.default_max_tokens, 0);
    assert_null(c.dump_path);
    assert_int_equal(c.log_level, CM_LOG_INFO);
    fcgi_conf_fini(&c);
}

static void
test_fcgi_conf_every_flag(void **state)
{
    (void)state;
    const char *argv[] = {"llm-fcgi",
                          "-e",
                          "/e.sock",
                          "--threads=3",
                          "--listen",
                          "tcp:127.0.0.1:9000",
                          "--api-key",
                          "k1",
                          "--api-key",
                          "k2",
                          "--max-body-bytes",
                          "1000",
                          "--cors-origin",
                          "*",
                          "--base-path",
                          "/llm/",
                          "--any-model-name",
                          "--model-name",
                          "smol",
                          "--request-timeout",
                          "30",
                          "--heartbeat-seconds",
                          "5",
                          "--default-max-tokens",
                          "64",
                          "--dump",
                          "/tmp/d.jsonl",
                          "--log-level",
                          "debug"};
    struct fcgi_conf c;
    assert_int_equal(parse(ARGC(argv), argv, &c), 0);
    assert_string_equal(c.engine_socket, "/e.sock");
    assert_int_equal(c.n_threads, 3);
    assert_string_equal(c.listen, "tcp:127.0.0.1:9000");
    assert_int_equal(c.n_api_keys, 2);
    assert_string_equal(c.api_keys[0], "k1");
    assert_string_equal(c.api_keys[1], "k2");
    assert_int_equal(c.max_body_bytes, 1000);
    assert_string_equal(c.cors_origin, "*");
    assert_string_equal(c.base_path, "/llm");
    assert_true(c.any_model_name);
    assert_string_equal(c.model_name, "smol");
    assert_int_equal(c.request_timeout_s, 30);
    assert_int_equal(c.heartbeat_s, 5);
    assert_int_equal(c.default_max_tokens, 64);
    assert_string_equal(c.dump_path, "/tmp/d.jsonl");
    assert_int_equal(c.log_level, CM_LOG_DEBUG);
    fcgi_conf_fini(&c);
    assert_null(c.engine_socket);
}

static void
test_fcgi_conf_bad_values(void **state)
{
    (void)state;
    const char *cases[][3] = {
        {"--threads", "0", NULL},
        {"--threads", "x", NULL},
        {"--max-body-bytes", "-1", NULL},
        {"--listen", "0.0.0.0:80", NULL},
        {"--listen", "tcp:h:99999", NULL},
        {"--listen", "unix:rel", NULL},
        {"--base-path", "llm", NULL},
        {"--log-level", "loud", NULL},
        {"--request-timeout", "1e3", NULL},
        {"--api-key", "", NULL},
        {"--api-key-file", "/nonexistent/keys", NULL},
        {"--heartbeat-seconds", "-2", NULL},
        {"--bogus", "1", NULL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *argv[] = {"llm-fcgi", "--engine", "/e.sock", cases[i][0], cases[i][1]};
        struct fcgi_conf c;
        assert_int_equal(parse(ARGC(argv), argv, &c), -EINVAL);
        fcgi_conf_fini(&c);
    }
    /* --engine is required; stray arguments are refused. */
    const char *no_engine[] = {"llm-fcgi", "--threads", "2"};
    struct fcgi_conf c;
    assert_int_equal(parse(ARGC(no_engine), no_engine, &c), -EINVAL);
    fcgi_conf_fini(&c);
    const char *stray[] = {"llm-fcgi", "--engine", "/e", "extra"};
    assert_int_equal(parse(ARGC(stray), stray, &c), -EINVAL);
    fcgi_conf_fini(&c);
}

static void
test_fcgi_conf_api_key_file(void **state)
{
    (void)state;
    char *path = write_tmp("# keys\n\n  sk-one  \nsk-two\n# sk-commented\n\t\n");
    const char *argv[] = {"llm-fcgi", "--engine",       "/e", "--api-key",
                          "sk-cli",   "--api-key-file", path};
    struct fcgi_conf c;
    assert_int_equal(parse(ARGC(argv), argv, &c), 0);
    assert_int_equal(c.n_api_keys, 3);
    assert_string_equal(c.api_keys[0], "sk-cli");
    assert_string_equal(c.api_keys[1], "sk-one");
    assert_string_equal(c.api_keys[2], "sk-two");
    fcgi_conf_fini(&c);
    unlink(path);
    free(path);

    path = write_tmp("# only comments\n\n");
    const char *argv2[] = {"llm-fcgi", "--engine", "/e", "--api-key-file", path};
    assert_int_equal(parse(ARGC(argv2), argv2, &c), -EINVAL);
    fcgi_conf_fini(&c);
    unlink(path);
    free(path);
}

static void
test_fcgi_conf_config_file_and_precedence(void **state)
{
    (void)state;
    char *path = write_tmp("# llm-fcgi\nengine = /cfg.sock\nthreads = 4\nheartbeat-seconds=7\n"
                           "api-key = sk-file\nany-model-name\nmodel-name = from-file\n\n");
    const char *argv[] = {"llm-fcgi", "--threads",    "2",       "--config",
                          path,       "--model-name", "from-cli"};
    struct fcgi_conf c;
    assert_int_equal(parse(ARGC(argv), argv, &c), 0);
    assert_string_equal(c.engine_socket, "/cfg.sock");
    assert_int_equal(c.n_threads, 2);   /* the command line wins, wherever --config is */
    assert_int_equal(c.heartbeat_s, 7); /* from the file */
    assert_true(c.any_model_name);
    assert_string_equal(c.model_name, "from-cli");
    assert_int_equal(c.n_api_keys, 1);
    assert_string_equal(c.api_keys[0], "sk-file");
    fcgi_conf_fini(&c);
    unlink(path);
    free(path);

    const char *bad[] = {"unknown-key = 1\n", "threads = many\n", "threads\n", "config = /x\n",
                         "any-model-name = maybe\n"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        path = write_tmp(bad[i]);
        const char *a[] = {"llm-fcgi", "--engine", "/e", "--config", path};
        assert_int_equal(parse(ARGC(a), a, &c), -EINVAL);
        fcgi_conf_fini(&c);
        unlink(path);
        free(path);
    }
    const char *missing[] = {"llm-fcgi", "--engine", "/e", "--config=/nonexistent/llm.conf"};
    assert_int_equal(parse(ARGC(missing), missing, &c), -EINVAL);
    fcgi_conf_fini(&c);
}

static void
test_fcgi_conf_help_names_every_flag(void **state)
{
    (void)state;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    const char *argv[] = {"llm-fcgi", "--help"};
    struct fcgi_conf c;
    assert_int_equal(fcgi_conf_parse(ARGC(argv), (char **)argv, f, &c), 1);
    fcgi_conf_fini(&c);
    fclose(f);
    const char *flags[] = {"--engine",
                           "--threads",
                           "--listen",
                           "--api-key ",
                           "--api-key-file",
                           "--max-body-bytes",
                           "--cors-origin",
                           "--base-path",
                           "--any-model-name",
                           "--model-name",
                           "--request-timeout",
                           "--heartbeat-seconds",
                           "--default-max-tokens",
                           "--dump",
                           "--log-level",
                           "--config",
                           "--help",
                           "--version",
                           "--no-guards",
                           "--allow-request-guard-overrides",
                           "--guard-name-run-cap N  the N-th call in a row to the same function "
                           "(default 8)",
                           "--guard-identical-call",
                           "--guard-repeated-call-history",
                           "--guard-tool-call-cap N more than N calls in one response (default 12)",
                           "--guard-permanent-failure",
                           "--guard-line-repeat",
                           "--guard-sentence-loop",
                           "--guard-unterminated-tool-call",
                           "(default 1024)",
                           "--guard-token-loop",
                           "(default 0: off; 2..16)",
                           "(default 0.55; 0 or (0, 1])"};
    for (size_t i = 0; i < sizeof(flags) / sizeof(flags[0]); i++) {
        if (!strstr(buf, flags[i]))
            fail_msg("--help does not document %s", flags[i]);
    }
    assert_non_null(strstr(buf, "default 4194304"));
    free(buf);

    buf = NULL;
    f = open_memstream(&buf, &len);
    const char *ver[] = {"llm-fcgi", "--version"};
    assert_int_equal(fcgi_conf_parse(ARGC(ver), (char **)ver, f, &c), 1);
    fcgi_conf_fini(&c);
    fclose(f);
    assert_string_equal(buf, "llm-fcgi " FCGI_VERSION "\n");
    free(buf);
}

/* ---- Guards ---- */

static void
test_fcgi_conf_guards_default_on(void **state)
{
    (void)state;
    const char *argv[] = {"llm-fcgi", "--engine", "/e"};
    struct fcgi_conf c;
    assert_int_equal(parse(ARGC(argv), argv, &c), 0);
    struct guard_config d;
    guard_config_init(&d);
    assert_true(c.guards.enabled);
    for (int i = 0; i < GUARD_N; i++)
        assert_true(c.guards.value[i] == d.value[i]);
    assert_false(c.allow_guard_overrides);
    assert_int_equal(guard_config_int(&c.guards, GUARD_TOKEN_LOOP), 0);
    fcgi_conf_fini(&c);
}

static void
test_fcgi_conf_guard_flags_both_spellings(void **state)
{
    (void)state;
    const char *argv[] = {"llm-fcgi",
                          "--engine=/e",
                          "--guard-name-run-cap",
                          "3",
                          "--guard-identical_call=0",
                          "--guard-repeated-call-history=6",
                          "--guard-tool_call_cap",
                          "5",
                          "--guard-permanent-failure=0",
                          "--guard-line-repeat=2",
                          "--guard-sentence_loop=0.8",
                          "--guard-unterminated-tool-call=40",
                          "--guard-token-loop=4",
                          "--allow-request-guard-overrides"};
    struct fcgi_conf c;
    assert_int_equal(parse(ARGC(argv), argv, &c), 0);
    assert_true(c.guards.enabled);
    assert_true(c.guards.value[GUARD_NAME_RUN_CAP] == 3);
    assert_true(c.guards.value[GUARD_IDENTICAL_CALL] == 0);
    assert_false(guard_config_active(&c.guards, GUARD_IDENTICAL_CALL));
    assert_true(c.guards.value[GUARD_REPEATED_CALL_HISTORY] == 6);
    assert_true(c.guards.value[GUARD_TOOL_CALL_CAP] == 5);
    assert_true(c.guards.value[GUARD_PERMANENT_FAILURE] == 0);
    assert_true(c.guards.value[GUARD_LINE_REPEAT] == 2);
    assert_true(c.guards.value[GUARD_SENTENCE_LOOP] == 0.8);
    assert_true(c.guards.value[GUARD_UNTERMINATED_TOOL_CALL] == 40);
    assert_int_equal(guard_config_int(&c.guards, GUARD_TOKEN_LOOP), 4);
    assert_true(c.allow_guard_overrides);
    fcgi_conf_fini(&c);
}

static void
test_fcgi_conf_no_guards_disables_all(void **state)
{
    (void)state;
    const char *argv[] = {"llm-fcgi", "--engine=/e", "--guard-token-loop=3", "--no-guards"};
    struct fcgi_conf c;
    assert_int_equal(parse(ARGC(argv), argv, &c), 0);
    assert_false(c.guards.enabled);
    for (int i = 0; i < GUARD_N; i++)
        assert_false(guard_config_active(&c.guards, (enum guard_id)i));
    assert_int_equal(guard_config_int(&c.guards, GUARD_TOKEN_LOOP), 0);
    fcgi_conf_fini(&c);
}

static void
test_fcgi_conf_guard_bad_values(void **state)
{
    (void)state;
    const char *bad[][2] = {
        {"--guard-name-run-cap", "-1"},
        {"--guard-identical-call", "2"},
        {"--guard-repeated-call-history", "5"},
        {"--guard-sentence-loop", "1.5"},
        {"--guard-token-loop", "1"},
        {"--guard-token-loop", "17"},
        {"--guard-line-repeat", "x"},
        {"--guard-permanent-failure", "2"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *argv[] = {"llm-fcgi", "--engine=/e", bad[i][0], bad[i][1]};
        struct fcgi_conf c;
        if (parse(ARGC(argv), argv, &c) != -EINVAL)
            fail_msg("%s %s accepted", bad[i][0], bad[i][1]);
        fcgi_conf_fini(&c);
    }
}

static void
test_fcgi_conf_guard_config_file_keys(void **state)
{
    (void)state;
    char *path = write_tmp("guard-name-run-cap = 4\n"
                           "guard-line_repeat = 0\n"
                           "guard-token-loop = 3\n"
                           "allow-request-guard-overrides\n"
                           "no-guards = false\n");
    const char *argv[] = {"llm-fcgi", "--engine=/e", "--config", path, "--guard-name-run-cap=2"};
    struct fcgi_conf c;
    assert_int_equal(parse(ARGC(argv), argv, &c), 0);
    assert_true(c.guards.enabled);
    assert_true(c.guards.value[GUARD_NAME_RUN_CAP] == 2); /* the command line wins */
    assert_true(c.guards.value[GUARD_LINE_REPEAT] == 0);
    assert_int_equal(guard_config_int(&c.guards, GUARD_TOKEN_LOOP), 3);
    assert_true(c.allow_guard_overrides);
    fcgi_conf_fini(&c);
    unlink(path);
    free(path);

    path = write_tmp("no-guards\n");
    const char *argv2[] = {"llm-fcgi", "--engine=/e", "--config", path};
    assert_int_equal(parse(ARGC(argv2), argv2, &c), 0);
    assert_false(c.guards.enabled);
    fcgi_conf_fini(&c);
    unlink(path);
    free(path);

    path = write_tmp("guard-sentence-loop = 2\n");
    const char *argv3[] = {"llm-fcgi", "--engine=/e", "--config", path};
    assert_int_equal(parse(ARGC(argv3), argv3, &c), -EINVAL);
    fcgi_conf_fini(&c);
    unlink(path);
    free(path);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fcgi_conf_defaults),
        cmocka_unit_test(test_fcgi_conf_every_flag),
        cmocka_unit_test(test_fcgi_conf_bad_values),
        cmocka_unit_test(test_fcgi_conf_api_key_file),
        cmocka_unit_test(test_fcgi_conf_config_file_and_precedence),
        cmocka_unit_test(test_fcgi_conf_help_names_every_flag),
        cmocka_unit_test(test_fcgi_conf_guards_default_on),
        cmocka_unit_test(test_fcgi_conf_guard_flags_both_spellings),
        cmocka_unit_test(test_fcgi_conf_no_guards_disables_all),
        cmocka_unit_test(test_fcgi_conf_guard_bad_values),
        cmocka_unit_test(test_fcgi_conf_guard_config_file_keys),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * fcgi_conf: flags and the config file (see fcgi_conf.h). Both feed one setter, apply_opt, keyed
 * by the getopt id, so a config-file key and its flag cannot drift apart. Order: defaults, then the
 * config file, then the command line (which wins); --config itself is found by a first pass.
 */
#include "fcgi/fcgi_conf.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "common/cm_util.h"

#define PROG "llm-fcgi"

enum {
    OPT_ENGINE = 'e',
    OPT_THREADS = 't',
    OPT_LISTEN = 'l',
    OPT_HELP = 'h',
    OPT_VERSION = 'V',
    OPT_API_KEY = 1000,
    OPT_API_KEY_FILE,
    OPT_MAX_BODY,
    OPT_CORS,
    OPT_BASE_PATH,
    OPT_ANY_MODEL,
    OPT_MODEL_NAME,
    OPT_TIMEOUT,
    OPT_HEARTBEAT,
    OPT_DEFAULT_MAX_TOKENS,
    OPT_DUMP,
    OPT_LOG_LEVEL,
    OPT_CONFIG,
    OPT_NO_GUARDS,
    OPT_ALLOW_OVERRIDES,
    OPT_GUARD_BASE = 2000, /* OPT_GUARD_BASE + enum guard_id: --guard-<name> */
};

/* Both spellings of every --guard-<name> flag ("guard-name-run-cap", "guard-name_run_cap"). */
#define GUARD_OPT(dash, under, id)                                                                 \
    {"guard-" dash, required_argument, 0, OPT_GUARD_BASE + (id)},                                  \
    {                                                                                              \
        "guard-" under, required_argument, 0, OPT_GUARD_BASE + (id)                                \
    }

static const struct option longopts[] = {
    {"engine", required_argument, 0, OPT_ENGINE},
    {"threads", required_argument, 0, OPT_THREADS},
    {"listen", required_argument, 0, OPT_LISTEN},
    {"api-key", required_argument, 0, OPT_API_KEY},
    {"api-key-file", required_argument, 0, OPT_API_KEY_FILE},
    {"max-body-bytes", required_argument, 0, OPT_MAX_BODY},
    {"cors-origin", required_argument, 0, OPT_CORS},
    {"base-path", required_argument, 0, OPT_BASE_PATH},
    {"any-model-name", no_argument, 0, OPT_ANY_MODEL},
    {"model-name", required_argument, 0, OPT_MODEL_NAME},
    {"request-timeout", required_argument, 0, OPT_TIMEOUT},
    {"heartbeat-seconds", required_argument, 0, OPT_HEARTBEAT},
    {"default-max-tokens", required_argument, 0, OPT_DEFAULT_MAX_TOKENS},
    {"dump", required_argument, 0, OPT_DUMP},
    {"log-level", required_argument, 0, OPT_LOG_LEVEL},
    {"config", required_argument, 0, OPT_CONFIG},
    {"no-guards", no_argument, 0, OPT_NO_GUARDS},
    {"allow-request-guard-overrides", no_argument, 0, OPT_ALLOW_OVERRIDES},
    GUARD_OPT("name-run-cap", "name_run_cap", GUARD_NAME_RUN_CAP),
    GUARD_OPT("identical-call", "identical_call", GUARD_IDENTICAL_CALL),
    GUARD_OPT("repeated-call-history", "repeated_call_history", GUARD_REPEATED_CALL_HISTORY),
    GUARD_OPT("tool-call-cap", "tool_call_cap", GUARD_TOOL_CALL_CAP),
    GUARD_OPT("permanent-failure", "permanent_failure", GUARD_PERMANENT_FAILURE),
    GUARD_OPT("line-repeat", "line_repeat", GUARD_LINE_REPEAT),
    GUARD_OPT("sentence-loop", "sentence_loop", GUARD_SENTENCE_LOOP),
    GUARD_OPT("unterminated-tool-call", "unterminated_tool_call", GUARD_UNTERMINATED_TOOL_CALL),
    GUARD_OPT("token-loop", "token_loop", GUARD_TOKEN_LOOP),
    {"help", no_argument, 0, OPT_HELP},
    {"version", no_argument, 0, OPT_VERSION},
    {0, 0, 0, 0},
};

void
fcgi_conf_usage(FILE *f)
{
    fprintf(
        f,
        "usage: llm-fcgi --engine PATH [options]\n"
        "\n"
        "The llm-fcgi FastCGI worker: serves the OpenAI API (/v1/chat/completions,\n"
        "/v1/completions, /v1/models, /health, /metrics) for a web server, forwarding generations\n"
        "to llm-engine. The listening socket is fd 0 when it is a socket (spawn-fcgi, lighttpd\n"
        "bin-path, Apache mod_fcgid), else --listen.\n"
        "\n"
        "  -e, --engine PATH           llm-engine's Unix socket (required)\n"
        "  -t, --threads N             request threads, each running FCGX_Accept_r (default 8)\n"
        "  -l, --listen ADDR           unix:PATH (created mode 0660; a stale file is replaced, a\n"
        "                              live socket is an error) or tcp:HOST:PORT (HOST defaults\n"
        "                              to 127.0.0.1: tcp::9000); default: the socket on fd 0\n"
        "      --api-key KEY           accepted Bearer key (repeatable; default: no keys, no\n"
        "                              authentication). With keys, every path but /health and\n"
        "                              CORS preflights needs 'Authorization: Bearer KEY' (401)\n"
        "      --api-key-file FILE     keys, one per line ('#' comments and blank lines skipped)\n"
        "      --max-body-bytes N      largest request body, else 413 (default 4194304)\n"
        "      --cors-origin ORIGIN    send CORS headers for ORIGIN ('*' or a URL) and answer\n"
        "                              OPTIONS preflights (default: no CORS)\n"
        "      --base-path PREFIX      mount prefix stripped before routing, e.g. /llm\n"
        "                              (default: none)\n"
        "      --model-name NAME       model id served and listed (default: the engine's)\n"
        "      --any-model-name        accept any \"model\" in requests (default: must match)\n"
        "      --request-timeout SEC   bound of one generation, sent as the engine deadline\n"
        "                              (default 600; 0: none)\n"
        "      --heartbeat-seconds SEC ': keep-alive' SSE comment after SEC idle seconds\n"
        "                              (default 15; 0: never)\n"
        "      --default-max-tokens N  max_tokens when a request has none (default 0: up to\n"
        "                              the context)\n"
        "      --dump FILE             append JSON lines of requests and responses (mode 0600)\n"
        "                              (default: none)\n"
        "      --log-level L           debug, info, warn, error or off (default info)\n"
        "      --config FILE           'key = value' lines with the long flag names; flags on\n"
        "                              the command line win (default: none)\n"
        "\n"
        "Loop guards (GUARDS.md): a trip ends the response with finish_reason \"length\",\n"
        "stop_reason = the guard's name (tool_loop_capped for the tool-loop guards) and cancels\n"
        "the engine sequence. Each flag also takes '_' (--guard-name_run_cap); 0 disables one.\n"
        "      --guard-name-run-cap N  the N-th call in a row to the same function (default 8)\n"
        "      --guard-identical-call R  an identical call twice in a row, or 3 times among the\n"
        "                              last R calls (default 4; 0 or 3..64)\n"
        "      --guard-repeated-call-history R  over the conversation's calls: 5 identical in a\n"
        "                              row, or 6 among the last R (default 8; 0 or 6..64)\n"
        "      --guard-tool-call-cap N more than N calls in one response (default 12)\n"
        "      --guard-permanent-failure 0|1  a call the history shows failing for good\n"
        "                              (command not found, no such file, ...) (default 1)\n"
        "      --guard-line-repeat N   a line (or 30-byte phrase) N times in the last 8 KiB of\n"
        "                              content, fenced code exempt (default 4; 0 or 2..64)\n"
        "      --guard-sentence-loop J the third sentence at least J similar (word bigrams) to\n"
        "                              recent ones (default 0.55; 0 or (0, 1])\n"
        "      --guard-unterminated-tool-call N  more than N tokens in an open <tool_call>\n"
        "                              (default 1024)\n"
        "      --guard-token-loop R    engine side: the output ends in a block of 2..64 tokens\n"
        "                              repeated R times (default 0: off; 2..16)\n"
        "      --no-guards             disable every guard, token_loop included; requests\n"
        "                              cannot enable any\n"
        "      --allow-request-guard-overrides  a request's \"guards\" object may lower or\n"
        "                              disable guards for itself (default: off, and a request\n"
        "                              with a non-empty \"guards\" object gets a 400)\n"
        "  -h, --help                  this text\n"
        "  -V, --version               print the version\n");
}

static void
set_str(const char **field, const char *v)
{
    free((char *)*field);
    *field = v ? cm_xstrdup(v) : NULL;
}

static int
add_key(struct fcgi_conf *c, const char *key, size_t n)
{
    if (n == 0) {
        fprintf(stderr, PROG ": an API key must not be empty\n");
        return -EINVAL;
    }
    if (c->n_api_keys >= FCGI_MAX_API_KEYS) {
        fprintf(stderr, PROG ": more than %d API keys\n", FCGI_MAX_API_KEYS);
        return -EINVAL;
    }
    char *k = cm_xmalloc(n + 1);
    memcpy(k, key, n);
    k[n] = 0;
    c->api_keys[c->n_api_keys++] = k;
    return 0;
}

/* Trims white space at both ends in place; returns the start. */
static char *
trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        s[--n] = 0;
    return s;
}

static int
load_key_file(struct fcgi_conf *c, const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, PROG ": cannot open --api-key-file '%s': %s\n", path, strerror(errno));
        return -EINVAL;
    }
    char *line = NULL;
    size_t cap = 0;
    int rc = 0, n_keys = 0;
    while (rc == 0 && getline(&line, &cap, f) >= 0) {
        char *k = trim(line);
        if (!k[0] || k[0] == '#')
            continue;
        rc = add_key(c, k, strlen(k));
        n_keys++;
    }
    if (rc == 0 && ferror(f)) {
        fprintf(stderr, PROG ": cannot read --api-key-file '%s'\n", path);
        rc = -EINVAL;
    }
    if (rc == 0 && n_keys == 0) {
        fprintf(stderr, PROG ": --api-key-file '%s' has no keys\n", path);
        rc = -EINVAL;
    }
    free(line);
    fclose(f);
    return rc;
}

static int
check_listen(const char *v)
{
    if (strncmp(v, "unix:", 5) == 0 && v[5] == '/')
        return 0;
    if (strncmp(v, "tcp:", 4) == 0) {
        const char *colon = strrchr(v + 4, ':');
        int port = 0;
        if (colon && cm_parse_int_arg(PROG, "the --listen port", colon + 1, 1, 65535, &port) == 0)
            return 0;
        if (colon)
            return -EINVAL;
    }
    fprintf(stderr, PROG ": --listen must be unix:/ABSOLUTE/PATH or tcp:HOST:PORT, got '%s'\n", v);
    return -EINVAL;
}

static int
set_base_path(struct fcgi_conf *c, const char *v)
{
    if (v[0] != '/' || strpbrk(v, "?# \t")) {
        fprintf(stderr, PROG ": --base-path must start with '/', got '%s'\n", v);
        return -EINVAL;
    }
    size_t n = strlen(v);
    while (n > 0 && v[n - 1] == '/')
        n--;
    free((char *)c->base_path);
    c->base_path = NULL;
    if (n > 0) {
        char *p = cm_xmalloc(n + 1);
        memcpy(p, v, n);
        p[n] = 0;
        c->base_path = p;
    }
    return 0;
}

static int
parse_bool(const char *v, bool *out)
{
    if (!v || !v[0] || !strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "1")) {
        *out = true;
        return 0;
    }
    if (!strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "0")) {
        *out = false;
        return 0;
    }
    fprintf(stderr, PROG ": expected true or false, got '%s'\n", v);
    return -EINVAL;
}

static int
set_guard(struct fcgi_conf *c, int id, const char *v)
{
    char err[160];
    const char *name = guard_name((enum guard_id)(id - OPT_GUARD_BASE));
    if (!name || guard_config_set(&c->guards, name, v, err, sizeof(err)) < 0) {
        fprintf(stderr, PROG ": --guard-%s %s\n", name ? name : "?", name ? err : "unknown");
        return -EINVAL;
    }
    return 0;
}

static int
set_no_guards(struct fcgi_conf *c, const char *v)
{
    bool off = false;
    int rc = parse_bool(v, &off);
    if (rc == 0)
        c->guards.enabled = !off;
    return rc;
}

static int
apply_opt(struct fcgi_conf *c, int id, const char *v)
{
    int n = 0, rc = 0;
    switch (id) {
    case OPT_ENGINE:
        if (!v[0]) {
            fprintf(stderr, PROG ": --engine must not be empty\n");
            return -EINVAL;
        }
        set_str(&c->engine_socket, v);
        return 0;
    case OPT_THREADS:
        return cm_parse_int_arg(PROG, "--threads", v, 1, 1024, &c->n_threads);
    case OPT_LISTEN:
        rc = check_listen(v);
        if (rc == 0)
            set_str(&c->listen, v);
        return rc;
    case OPT_API_KEY:
        return add_key(c, v, strlen(v));
    case OPT_API_KEY_FILE:
        return load_key_file(c, v);
    case OPT_MAX_BODY:
        rc = cm_parse_int_arg(PROG, "--max-body-bytes", v, 1, 1 << 30, &n);
        if (rc == 0)
            c->max_body_bytes = (size_t)n;
        return rc;
    case OPT_CORS:
        if (!v[0] || strpbrk(v, "\r\n")) {
            fprintf(stderr, PROG ": --cors-origin must be '*' or an origin\n");
            return -EINVAL;
        }
        set_str(&c->cors_origin, v);
        return 0;
    case OPT_BASE_PATH:
        return set_base_path(c, v);
    case OPT_ANY_MODEL:
        return parse_bool(v, &c->any_model_name);
    case OPT_MODEL_NAME:
        if (!v[0] || strlen(v) > 256) {
            fprintf(stderr, PROG ": --model-name must be 1..256 bytes\n");
            return -EINVAL;
        }
        set_str(&c->model_name, v);
        return 0;
    case OPT_TIMEOUT:
        return cm_parse_int_arg(PROG, "--request-timeout", v, 0, 7 * 24 * 3600,
                                &c->request_timeout_s);
    case OPT_HEARTBEAT:
        return cm_parse_int_arg(PROG, "--heartbeat-seconds", v, 0, 3600, &c->heartbeat_s);
    case OPT_DEFAULT_MAX_TOKENS:
        return cm_parse_int_arg(PROG, "--default-max-tokens", v, 0, 1 << 24,
                                &c->default_max_tokens);
    case OPT_DUMP:
        set_str(&c->dump_path, v);
        return 0;
    case OPT_NO_GUARDS:
        return set_no_guards(c, v);
    case OPT_ALLOW_OVERRIDES:
        return parse_bool(v, &c->allow_guard_overrides);
    case OPT_LOG_LEVEL: {
        enum cm_log_level lv;
        if (cm_log_parse_level(v, &lv) < 0) {
            fprintf(stderr, PROG ": unknown --log-level '%s' (debug, info, warn, error, off)\n", v);
            return -EINVAL;
        }
        c->log_level = (int)lv;
        return 0;
    }
    default:
        if (id >= OPT_GUARD_BASE && id < OPT_GUARD_BASE + GUARD_N)
            return set_guard(c, id, v);
        return -EINVAL;
    }
}

/* ---- Config file ---- */

static int
apply_config_line(struct fcgi_conf *c, const char *path, int lineno, char *s)
{
    char *eq = strchr(s, '=');
    char *key = s, *val = NULL;
    if (eq) {
        *eq = 0;
        val = trim(eq + 1);
    }
    key = trim(key);
    for (const struct option *o = longopts; o->name; o++) {
        if (strcmp(o->name, key) != 0)
            continue;
        if (o->val == OPT_CONFIG || o->val == OPT_HELP || o->val == OPT_VERSION) {
            fprintf(stderr, PROG ": %s:%d: '%s' is for the command line only\n", path, lineno, key);
            return -EINVAL;
        }
        if (o->has_arg == required_argument && !val) {
            fprintf(stderr, PROG ": %s:%d: '%s' needs '= value'\n", path, lineno, key);
            return -EINVAL;
        }
        int rc = apply_opt(c, o->val, val ? val : "");
        if (rc < 0)
            fprintf(stderr, PROG ": (in %s:%d)\n", path, lineno);
        return rc;
    }
    fprintf(stderr, PROG ": %s:%d: unknown key '%s'\n", path, lineno, key);
    return -EINVAL;
}

static int
load_config(struct fcgi_conf *c, const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, PROG ": cannot open --config '%s': %s\n", path, strerror(errno));
        return -EINVAL;
    }
    char *line = NULL;
    size_t cap = 0;
    int rc = 0, lineno = 0;
    while (rc == 0 && getline(&line, &cap, f) >= 0) {
        lineno++;
        char *s = trim(line);
        if (!s[0] || s[0] == '#')
            continue;
        rc = apply_config_line(c, path, lineno, s);
    }
    free(line);
    fclose(f);
    return rc;
}

/* The value of the last --config on the command line, or NULL. */
static const char *
find_config(int argc, char **argv)
{
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--"))
            break;
        if (!strcmp(argv[i], "--config") && i + 1 < argc)
            path = argv[++i];
        else if (!strncmp(argv[i], "--config=", 9))
            path = argv[i] + 9;
    }
    return path;
}

/* ---- Entry points ---- */

static void
defaults(struct fcgi_conf *c)
{
    memset(c, 0, sizeof(*c));
    c->n_threads = 8;
    c->max_body_bytes = 4u << 20;
    c->request_timeout_s = 600;
    c->heartbeat_s = 15;
    c->log_level = CM_LOG_INFO;
    guard_config_init(&c->guards);
}

int
fcgi_conf_parse(int argc, char **argv, FILE *help_out, struct fcgi_conf *out)
{
    defaults(out);
    const char *cfg = find_config(argc, argv);
    if (cfg && load_config(out, cfg) < 0)
        return -EINVAL;
    optind = 0; /* GNU: full re-initialisation, so that repeated calls work */
    opterr = 1;
    int id;
    while ((id = getopt_long(argc, argv, "e:t:l:hV", longopts, NULL)) != -1) {
        switch (id) {
        case OPT_HELP:
            fcgi_conf_usage(help_out);
            return 1;
        case OPT_VERSION:
            fprintf(help_out, "llm-fcgi %s\n", FCGI_VERSION);
            return 1;
        case OPT_CONFIG:
            break; /* loaded above */
        case OPT_ANY_MODEL:
            out->any_model_name = true;
            break;
        case OPT_NO_GUARDS:
            out->guards.enabled = false;
            break;
        case OPT_ALLOW_OVERRIDES:
            out->allow_guard_overrides = true;
            break;
        case '?':
            return -EINVAL; /* getopt printed the reason */
        default:
            if (apply_opt(out, id, optarg) < 0)
                return -EINVAL;
        }
    }
    if (optind < argc) {
        fprintf(stderr, PROG ": unexpected argument '%s'\n", argv[optind]);
        return -EINVAL;
    }
    if (!out->engine_socket) {
        fprintf(stderr, PROG ": --engine PATH is required (see --help)\n");
        return -EINVAL;
    }
    return 0;
}

void
fcgi_conf_fini(struct fcgi_conf *c)
{
    free((char *)c->engine_socket);
    free((char *)c->listen);
    for (int i = 0; i < c->n_api_keys; i++)
        free((char *)c->api_keys[i]);
    free((char *)c->cors_origin);
    free((char *)c->base_path);
    free((char *)c->model_name);
    free((char *)c->dump_path);
    memset(c, 0, sizeof(*c));
}

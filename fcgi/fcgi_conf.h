/*
 * fcgi_conf: the worker's configuration from the command line and an optional config file, into
 * struct fcgi_conf (fcgi.h). Every string of a parsed conf is a heap copy owned by it and freed by
 * fcgi_conf_fini, so the conf outlives argv and the config file.
 *
 * Config file (--config FILE): one "key = value" per line, keys being the long flag names without
 * "--" (e.g. "threads = 4", "api-key-file = /etc/llm-fcgi/keys"); '#' starts a comment line; blank
 * lines are skipped; a flag without a value (any-model-name) takes true/false/yes/no/1/0 or no
 * value. Flags on the command line win over the file; API keys from both are all accepted.
 * API key file (--api-key-file FILE): one key per line, surrounding white space trimmed, '#'
 * comment lines and blank lines skipped. Keys are never printed, not even in error messages.
 * Guards (GUARDS.md): --guard-<name> N for each guard of guards/guard.h, the name written with '-'
 * or '_' (--guard-name-run-cap, --guard-name_run_cap; the config-file keys are the same), 0
 * disabling one; --no-guards clears the master switch (every guard off, token_loop included, and
 * no request can turn one on); --allow-request-guard-overrides lets a request's "guards" object
 * lower or disable guards for itself (without it a non-empty "guards" object is a 400).
 * Errors are one line on stderr: "llm-fcgi: ...".
 */
#ifndef FCGI_CONF_H
#define FCGI_CONF_H

#include <stdio.h>

#include "fcgi/fcgi.h"

#define FCGI_VERSION "0.1"

/* Parses argv (getopt_long; call from one thread) into *out, which it initialises with the
 * defaults first. --help and --version print to help_out (stdout in main) and return 1. Returns 0
 * (run), 1 (exit 0), or -EINVAL after printing the error (exit 2). *out must be released with
 * fcgi_conf_fini in every case. */
int fcgi_conf_parse(int argc, char **argv, FILE *help_out, struct fcgi_conf *out);

/* Frees the strings of c and zeroes it. */
void fcgi_conf_fini(struct fcgi_conf *c);

/* Prints the --help text (every flag with its default). */
void fcgi_conf_usage(FILE *f);

#endif

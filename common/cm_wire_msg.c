/*
 * cm_wire_msg: encoders, decoders and validators of the engine <-> worker messages (cm_wire.h).
 * JSON payloads go through json-c; TOKEN and ACCEPTED are fixed binary layouts.
 */
#include "common/cm_wire.h"
#include "common/cm_wire_int.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#define WIRE_JSON_FLAGS (JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE)
#define WIRE_MAX_CAPS 64 /* entries of MODEL_INFO "capabilities" */

static const char *const cap_names[] = {"logprobs", "prompt_ids", "logit_bias", "prefix_cache",
                                        "spill"};
#define N_CAPS (sizeof(cap_names) / sizeof(cap_names[0]))

/* ---- Validation helpers ---- */

static int __attribute__((format(printf, 4, 5)))
fail(char *err, size_t err_len, int rc, const char *fmt, ...)
{
    if (err != NULL && err_len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return rc;
}

/* Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF, and no NUL. */
static bool
utf8_valid(const char *s, size_t n)
{
    const uint8_t *p = (const uint8_t *)s;
    size_t i = 0;
    while (i < n) {
        uint8_t c = p[i];
        if (c < 0x80) {
            if (c == 0)
                return false;
            i++;
            continue;
        }
        size_t k;
        uint32_t cp, min;
        if ((c & 0xe0) == 0xc0) {
            k = 1, cp = c & 0x1f, min = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            k = 2, cp = c & 0x0f, min = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            k = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return false;
        }
        if (n - i <= k)
            return false;
        for (size_t j = 1; j <= k; j++) {
            if ((p[i + j] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (p[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += k + 1;
    }
    return true;
}

/* A guard name or cancel reason: [A-Za-z0-9_.:-]{0,64}. */
static bool
name_valid(const char *s, size_t n)
{
    if (n > CM_WIRE_MAX_NAME)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '_' || c == '.' || c == ':' || c == '-';
        if (!ok)
            return false;
    }
    return true;
}

static bool
printable_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] < 0x20 || s[i] > 0x7e)
            return false;
    }
    return true;
}

/* Length of an inline string field, or -1 when it is not NUL-terminated within its array. */
static long
inline_len(const char *s, size_t size)
{
    size_t n = strnlen(s, size);
    return n == size ? -1 : (long)n;
}

static bool
float_finite(float f)
{
    return isfinite(f) != 0;
}

/* ---- JSON helpers ---- */

/* Parses a payload that must be exactly one JSON object. */
static int
json_parse_object(const struct cm_wire_frame *f, const char *what, struct json_object **out,
                  char *err, size_t err_len)
{
    int rc = 0;
    struct json_tokener *tok = NULL;
    struct json_object *obj = NULL;
    if (f->len == 0 || f->payload == NULL) {
        rc = fail(err, err_len, -EPROTO, "%s: empty payload, expected a JSON object", what);
        goto out;
    }
    if (f->len > CM_WIRE_MAX_MAX_PAYLOAD) { /* not from a reader: json-c takes an int length */
        rc =
            fail(err, err_len, -EPROTO, "%s: payload over %u bytes", what, CM_WIRE_MAX_MAX_PAYLOAD);
        goto out;
    }
    if (memchr(f->payload, 0, f->len) != NULL) {
        rc = fail(err, err_len, -EPROTO, "%s: NUL byte in the JSON payload", what);
        goto out;
    }
    tok = json_tokener_new_ex(CM_WIRE_JSON_DEPTH);
    if (tok == NULL) {
        rc = fail(err, err_len, -ENOMEM, "%s: out of memory", what);
        goto out;
    }
    json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
    obj = json_tokener_parse_ex(tok, (const char *)f->payload, (int)f->len);
    enum json_tokener_error jerr = json_tokener_get_error(tok);
    if (obj == NULL || jerr != json_tokener_success) {
        const char *desc = jerr == json_tokener_continue  ? "truncated JSON"
                           : jerr == json_tokener_success ? "not a JSON object"
                                                          : json_tokener_error_desc(jerr);
        /* json-c reports allocation failures as a generic parse error; so does this. */
        rc = fail(err, err_len, -EPROTO, "%s: %s", what, desc);
        goto out;
    }
    if (json_tokener_get_parse_end(tok) != f->len) {
        rc = fail(err, err_len, -EPROTO, "%s: bytes after the JSON object", what);
        goto out;
    }
    if (!json_object_is_type(obj, json_type_object)) {
        rc = fail(err, err_len, -EPROTO, "%s: payload is not a JSON object", what);
        goto out;
    }
    *out = obj;
    obj = NULL;
out:
    json_object_put(obj);
    if (tok != NULL)
        json_tokener_free(tok);
    return rc;
}

/* Context for field getters: the message name for errors. Getters return 1 (present), 0 (absent
 * or null) or -EINVAL with a message naming the field. */
struct jctx {
    const char *what;
    char *err;
    size_t err_len;
};

static struct json_object *
jfield(struct json_object *o, const char *key)
{
    struct json_object *v = NULL;
    if (!json_object_object_get_ex(o, key, &v))
        return NULL;
    return v;
}

static int
jmissing(const struct jctx *c, const char *key)
{
    return fail(c->err, c->err_len, -EINVAL, "%s: missing '%s'", c->what, key);
}

static int
jrange_i(const struct jctx *c, struct json_object *v, const char *key, int64_t min, int64_t max,
         int64_t *out)
{
    if (!json_object_is_type(v, json_type_int))
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' must be an integer", c->what, key);
    int64_t x = json_object_get_int64(v);
    if (x < min || x > max)
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' out of range [%lld, %lld]", c->what, key,
                    (long long)min, (long long)max);
    *out = x;
    return 1;
}

static int
jint(const struct jctx *c, struct json_object *o, const char *key, int64_t min, int64_t max,
     int64_t *out)
{
    struct json_object *v = jfield(o, key);
    if (v == NULL)
        return 0;
    return jrange_i(c, v, key, min, max, out);
}

static int
ju32(const struct jctx *c, struct json_object *o, const char *key, uint32_t *out)
{
    int64_t x = 0;
    int rc = jint(c, o, key, 0, UINT32_MAX, &x);
    if (rc == 1)
        *out = (uint32_t)x;
    return rc;
}

static int
ji32(const struct jctx *c, struct json_object *o, const char *key, int32_t *out)
{
    int64_t x = 0;
    int rc = jint(c, o, key, INT32_MIN, INT32_MAX, &x);
    if (rc == 1)
        *out = (int32_t)x;
    return rc;
}

/* A finite number (integer or not); range checks are the validators'. */
static int
jdouble(const struct jctx *c, struct json_object *o, const char *key, double *out)
{
    struct json_object *v = jfield(o, key);
    if (v == NULL)
        return 0;
    if (!json_object_is_type(v, json_type_double) && !json_object_is_type(v, json_type_int))
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' must be a number", c->what, key);
    double d = json_object_get_double(v);
    if (!isfinite(d))
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' must be finite", c->what, key);
    *out = d;
    return 1;
}

static int
jfloat(const struct jctx *c, struct json_object *o, const char *key, float *out)
{
    double d = 0;
    int rc = jdouble(c, o, key, &d);
    if (rc == 1 && fabs(d) > FLT_MAX)
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' does not fit a float", c->what, key);
    if (rc == 1)
        *out = (float)d;
    return rc;
}

static int
jbool(const struct jctx *c, struct json_object *o, const char *key, bool *out)
{
    struct json_object *v = jfield(o, key);
    if (v == NULL)
        return 0;
    if (!json_object_is_type(v, json_type_boolean))
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' must be a boolean", c->what, key);
    *out = json_object_get_boolean(v) != 0;
    return 1;
}

/* A UTF-8 string without NUL of at most max bytes; *s borrows the JSON tree. name is the field's
 * name in messages. */
static int
jstring_v(const struct jctx *c, struct json_object *v, const char *name, size_t max, const char **s,
          size_t *len)
{
    if (!json_object_is_type(v, json_type_string))
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' must be a string", c->what, name);
    const char *p = json_object_get_string(v);
    size_t n = (size_t)json_object_get_string_len(v);
    if (n > max)
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' longer than %zu bytes", c->what, name,
                    max);
    if (!utf8_valid(p, n))
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' is not UTF-8 text without NUL", c->what,
                    name);
    *s = p;
    *len = n;
    return 1;
}

static int
jstring(const struct jctx *c, struct json_object *o, const char *key, size_t max, const char **s,
        size_t *len)
{
    struct json_object *v = jfield(o, key);
    if (v == NULL)
        return 0;
    return jstring_v(c, v, key, max, s, len);
}

/* Copies a string field into an inline array of size max + 1. */
static int
jstring_inline(const struct jctx *c, struct json_object *o, const char *key, size_t max, char *dst)
{
    const char *s = NULL;
    size_t n = 0;
    int rc = jstring(c, o, key, max, &s, &n);
    if (rc == 1) {
        memcpy(dst, s, n);
        dst[n] = '\0';
    }
    return rc;
}

static int
jobject(const struct jctx *c, struct json_object *o, const char *key, struct json_object **out)
{
    struct json_object *v = jfield(o, key);
    if (v == NULL)
        return 0;
    if (!json_object_is_type(v, json_type_object))
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' must be an object", c->what, key);
    *out = v;
    return 1;
}

/* An array of at most max token ids in [0, CM_WIRE_MAX_VOCAB), malloc'ed (NULL when empty). */
static int
jids(const struct jctx *c, struct json_object *o, const char *key, size_t max, int32_t **out,
     uint32_t *n_out)
{
    struct json_object *v = jfield(o, key);
    if (v == NULL)
        return 0;
    if (!json_object_is_type(v, json_type_array))
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' must be an array", c->what, key);
    size_t n = json_object_array_length(v);
    if (n > max)
        return fail(c->err, c->err_len, -EINVAL, "%s: '%s' has more than %zu entries", c->what, key,
                    max);
    int32_t *ids = NULL;
    if (n > 0) {
        ids = malloc(n * sizeof(*ids));
        if (ids == NULL)
            return fail(c->err, c->err_len, -ENOMEM, "%s: out of memory", c->what);
    }
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(v, i);
        if (!json_object_is_type(e, json_type_int) || json_object_get_int64(e) < 0 ||
            json_object_get_int64(e) >= CM_WIRE_MAX_VOCAB) {
            free(ids);
            return fail(c->err, c->err_len, -EINVAL,
                        "%s: '%s'[%zu] must be an integer token id in [0, %d)", c->what, key, i,
                        CM_WIRE_MAX_VOCAB);
        }
        ids[i] = (int32_t)json_object_get_int64(e);
    }
    *out = ids;
    *n_out = (uint32_t)n;
    return 1;
}

/* Serializes obj as one frame. Takes the reference to obj (json-c's refcount) in all cases. */
static int
json_emit(struct cm_wire_buf *b, enum cm_wire_type type, uint64_t req_id, struct json_object *obj)
{
    int rc = 0;
    if (obj == NULL)
        return -ENOMEM;
    size_t len = 0;
    const char *s = json_object_to_json_string_length(obj, WIRE_JSON_FLAGS, &len);
    if (s == NULL) {
        rc = -ENOMEM;
        goto out;
    }
    rc = cm_wire_encode_frame(b, type, req_id, s, len);
out:
    json_object_put(obj);
    return rc;
}

/* Builders. They record an allocation failure in *ok instead of failing one by one. */
static void
jadd(struct json_object *o, const char *key, struct json_object *v, bool *ok)
{
    if (o == NULL || v == NULL || json_object_object_add(o, key, v) != 0) {
        json_object_put(v);
        *ok = false;
    }
}

/* The shortest of 6..9 significant digits that the decoder (strtod, then a cast) reads back as the
 * same float: 0.7f is written "0.7", not "0.699999988". Zero loses its sign. */
static struct json_object *
jnew_float(float f)
{
    char s[32];
    if (f == 0)
        f = 0;
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(s, sizeof(s), "%.*g", prec, (double)f);
        if ((float)strtod(s, NULL) == f)
            break;
    }
    return json_object_new_double_s((double)f, s);
}

static struct json_object *
jnew_double(double d)
{
    char s[40];
    if (d == 0)
        d = 0;
    snprintf(s, sizeof(s), "%.17g", d);
    return json_object_new_double_s(d, s);
}

static struct json_object *
jnew_str(const char *s, size_t n)
{
    return json_object_new_string_len(s, (int)n);
}

static struct json_object *
jnew_ids(const int32_t *ids, uint32_t n, bool *ok)
{
    struct json_object *a = json_object_new_array_ext((int)n);
    if (a == NULL) {
        *ok = false;
        return NULL;
    }
    for (uint32_t i = 0; i < n; i++) {
        struct json_object *e = json_object_new_int64(ids[i]);
        if (e == NULL || json_object_array_add(a, e) != 0) {
            json_object_put(e);
            *ok = false;
        }
    }
    return a;
}

static int
check_type(const struct cm_wire_frame *f, enum cm_wire_type type, char *err, size_t err_len)
{
    if (f == NULL || f->type != type)
        return fail(err, err_len, -EINVAL, "expected a %s frame, got %s", cm_wire_type_name(type),
                    f ? cm_wire_type_name(f->type) : "none");
    if (f->len > 0 && f->payload == NULL)
        return fail(err, err_len, -EINVAL, "%s: payload missing", cm_wire_type_name(type));
    return 0;
}

/* ---- HELLO ---- */

static int
hello_validate(const struct cm_wire_hello *m, char *err, size_t err_len)
{
    long n = inline_len(m->client, sizeof(m->client));
    if (m->version < 1)
        return fail(err, err_len, -EINVAL, "hello: 'version' out of range [1, 65535]");
    if (n < 0 || !printable_ascii(m->client, (size_t)n))
        return fail(err, err_len, -EINVAL, "hello: 'client' must be printable ASCII");
    return 0;
}

int
cm_wire_encode_hello(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_hello *m)
{
    if (hello_validate(m, NULL, 0) < 0)
        return -EINVAL;
    bool ok = true;
    struct json_object *o = json_object_new_object();
    jadd(o, "version", json_object_new_int64(m->version), &ok);
    jadd(o, "client", jnew_str(m->client, strlen(m->client)), &ok);
    if (!ok) {
        json_object_put(o);
        return -ENOMEM;
    }
    return json_emit(b, CM_WIRE_HELLO, req_id, o);
}

int
cm_wire_decode_hello(const struct cm_wire_frame *f, struct cm_wire_hello *out, char *err,
                     size_t err_len)
{
    struct jctx c = {"hello", err, err_len};
    struct json_object *o = NULL;
    struct cm_wire_hello m;
    memset(&m, 0, sizeof(m));
    int64_t version = 0;
    int rc = check_type(f, CM_WIRE_HELLO, err, err_len);
    if (rc < 0)
        goto out;
    rc = json_parse_object(f, c.what, &o, err, err_len);
    if (rc < 0)
        goto out;
    rc = jint(&c, o, "version", 1, UINT16_MAX, &version);
    if (rc == 0)
        rc = jmissing(&c, "version");
    if (rc < 0)
        goto out;
    m.version = (uint16_t)version;
    rc = jstring_inline(&c, o, "client", CM_WIRE_MAX_NAME, m.client);
    if (rc < 0)
        goto out;
    rc = hello_validate(&m, err, err_len);
    if (rc < 0)
        goto out;
    *out = m;
out:
    json_object_put(o);
    return rc < 0 ? rc : 0;
}

/* ---- MODEL_INFO ---- */

void
cm_wire_model_info_init(struct cm_wire_model_info *m)
{
    memset(m, 0, sizeof(*m));
    m->chat_family = CM_CHAT_UNKNOWN;
    m->bos.id = m->eos.id = m->eot.id = -1;
    m->max_payload = CM_WIRE_DEFAULT_MAX_PAYLOAD;
}

void
cm_wire_model_info_fini(struct cm_wire_model_info *m)
{
    free(m->default_system);
    cm_wire_model_info_init(m);
}

static int
special_validate(const struct cm_wire_special *s, const char *name, uint32_t n_vocab, char *err,
                 size_t err_len)
{
    long n = inline_len(s->text, sizeof(s->text));
    if (s->id < -1 || (s->id >= 0 && (uint32_t)s->id >= n_vocab))
        return fail(err, err_len, -EINVAL, "model_info: 'special.%s.id' out of range [-1, %u)",
                    name, n_vocab);
    if (n < 0 || !utf8_valid(s->text, (size_t)n))
        return fail(err, err_len, -EINVAL, "model_info: 'special.%s.text' is not UTF-8 text", name);
    if (s->id == -1 && n > 0)
        return fail(err, err_len, -EINVAL, "model_info: 'special.%s.text' without an id", name);
    return 0;
}

int
cm_wire_model_info_validate(const struct cm_wire_model_info *m, char *err, size_t err_len)
{
    int rc = 0;
    long n = inline_len(m->model, sizeof(m->model));
    enum cm_chat_family fam;
    if (n <= 0 || !utf8_valid(m->model, (size_t)n))
        return fail(err, err_len, -EINVAL, "model_info: 'model' must be 1..%d bytes of UTF-8",
                    CM_WIRE_MAX_MODEL_ID);
    if (m->n_ctx < 1 || m->n_ctx > CM_WIRE_MAX_VOCAB)
        return fail(err, err_len, -EINVAL, "model_info: 'n_ctx' out of range [1, %d]",
                    CM_WIRE_MAX_VOCAB);
    if (m->n_vocab < 1 || m->n_vocab > CM_WIRE_MAX_VOCAB)
        return fail(err, err_len, -EINVAL, "model_info: 'n_vocab' out of range [1, %d]",
                    CM_WIRE_MAX_VOCAB);
    if (cm_chat_family_parse(cm_chat_family_name(m->chat_family), &fam) < 0 ||
        fam != m->chat_family)
        return fail(err, err_len, -EINVAL, "model_info: 'chat_family' unknown value %d",
                    (int)m->chat_family);
    if (m->default_system != NULL) {
        size_t len = strlen(m->default_system);
        if (len > CM_WIRE_MAX_SYSTEM || !utf8_valid(m->default_system, len))
            return fail(err, err_len, -EINVAL,
                        "model_info: 'default_system' must be at most %u bytes of UTF-8",
                        CM_WIRE_MAX_SYSTEM);
    }
    if ((rc = special_validate(&m->bos, "bos", m->n_vocab, err, err_len)) < 0 ||
        (rc = special_validate(&m->eos, "eos", m->n_vocab, err, err_len)) < 0 ||
        (rc = special_validate(&m->eot, "eot", m->n_vocab, err, err_len)) < 0)
        return rc;
    if (m->caps & ~((1u << N_CAPS) - 1))
        return fail(err, err_len, -EINVAL, "model_info: unknown capability bits 0x%x", m->caps);
    if (m->max_payload < CM_WIRE_MIN_MAX_PAYLOAD || m->max_payload > CM_WIRE_MAX_MAX_PAYLOAD)
        return fail(err, err_len, -EINVAL, "model_info: 'max_payload' out of range [%u, %u]",
                    CM_WIRE_MIN_MAX_PAYLOAD, CM_WIRE_MAX_MAX_PAYLOAD);
    return 0;
}

static struct json_object *
special_to_json(const struct cm_wire_special *s, bool *ok)
{
    struct json_object *o = json_object_new_object();
    jadd(o, "id", json_object_new_int64(s->id), ok);
    jadd(o, "text", jnew_str(s->text, strlen(s->text)), ok);
    if (o == NULL)
        *ok = false;
    return o;
}

int
cm_wire_encode_model_info(struct cm_wire_buf *b, uint64_t req_id,
                          const struct cm_wire_model_info *m)
{
    if (cm_wire_model_info_validate(m, NULL, 0) < 0)
        return -EINVAL;
    bool ok = true;
    struct json_object *o = json_object_new_object();
    jadd(o, "model", jnew_str(m->model, strlen(m->model)), &ok);
    jadd(o, "n_ctx", json_object_new_int64(m->n_ctx), &ok);
    jadd(o, "n_vocab", json_object_new_int64(m->n_vocab), &ok);
    const char *fam = cm_chat_family_name(m->chat_family);
    jadd(o, "chat_family", jnew_str(fam, strlen(fam)), &ok);
    if (m->default_system != NULL)
        jadd(o, "default_system", jnew_str(m->default_system, strlen(m->default_system)), &ok);
    struct json_object *sp = json_object_new_object();
    if (m->bos.id >= 0)
        jadd(sp, "bos", special_to_json(&m->bos, &ok), &ok);
    if (m->eos.id >= 0)
        jadd(sp, "eos", special_to_json(&m->eos, &ok), &ok);
    if (m->eot.id >= 0)
        jadd(sp, "eot", special_to_json(&m->eot, &ok), &ok);
    jadd(o, "special", sp, &ok);
    struct json_object *caps = json_object_new_array();
    for (size_t i = 0; i < N_CAPS; i++) {
        if (!(m->caps & (1u << i)))
            continue;
        struct json_object *e = json_object_new_string(cap_names[i]);
        if (caps == NULL || e == NULL || json_object_array_add(caps, e) != 0) {
            json_object_put(e);
            ok = false;
        }
    }
    jadd(o, "capabilities", caps, &ok);
    jadd(o, "max_payload", json_object_new_int64(m->max_payload), &ok);
    if (!ok) {
        json_object_put(o);
        return -ENOMEM;
    }
    return json_emit(b, CM_WIRE_MODEL_INFO, req_id, o);
}

static int
special_from_json(const struct jctx *c, struct json_object *sp, const char *name,
                  struct cm_wire_special *out)
{
    struct json_object *o = NULL;
    char key[32];
    int64_t id = -1;
    int rc = jobject(c, sp, name, &o);
    if (rc <= 0)
        return rc;
    snprintf(key, sizeof(key), "special.%s.id", name);
    struct json_object *v = jfield(o, "id");
    if (v == NULL)
        return jmissing(c, key);
    rc = jrange_i(c, v, key, -1, CM_WIRE_MAX_VOCAB - 1, &id);
    if (rc < 0)
        return rc;
    out->id = (int32_t)id;
    snprintf(key, sizeof(key), "special.%s.text", name);
    v = jfield(o, "text");
    if (v != NULL) {
        const char *s = NULL;
        size_t n = 0;
        rc = jstring_v(c, v, key, CM_WIRE_MAX_SPECIAL_TEXT, &s, &n);
        if (rc < 0)
            return rc;
        memcpy(out->text, s, n);
        out->text[n] = '\0';
    }
    return 1;
}

static int
caps_from_json(const struct jctx *c, struct json_object *o, uint32_t *caps)
{
    struct json_object *a = jfield(o, "capabilities");
    if (a == NULL)
        return 0;
    if (!json_object_is_type(a, json_type_array))
        return fail(c->err, c->err_len, -EINVAL, "%s: 'capabilities' must be an array", c->what);
    size_t n = json_object_array_length(a);
    if (n > WIRE_MAX_CAPS)
        return fail(c->err, c->err_len, -EINVAL, "%s: 'capabilities' has more than %d entries",
                    c->what, WIRE_MAX_CAPS);
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(a, i);
        if (!json_object_is_type(e, json_type_string))
            return fail(c->err, c->err_len, -EINVAL, "%s: 'capabilities'[%zu] must be a string",
                        c->what, i);
        for (size_t k = 0; k < N_CAPS; k++) {
            if (strcmp(json_object_get_string(e), cap_names[k]) == 0)
                *caps |= 1u << k;
        }
    }
    return 1;
}

/* Reads the fields of MODEL_INFO into m (default_system malloc'ed). */
static int
model_info_fields(const struct jctx *c, struct json_object *o, struct cm_wire_model_info *m)
{
    const char *s = NULL;
    size_t n = 0;
    int rc;
    if ((rc = jstring_inline(c, o, "model", CM_WIRE_MAX_MODEL_ID, m->model)) <= 0)
        return rc < 0 ? rc : jmissing(c, "model");
    if ((rc = ju32(c, o, "n_ctx", &m->n_ctx)) <= 0)
        return rc < 0 ? rc : jmissing(c, "n_ctx");
    if ((rc = ju32(c, o, "n_vocab", &m->n_vocab)) <= 0)
        return rc < 0 ? rc : jmissing(c, "n_vocab");
    if ((rc = ju32(c, o, "max_payload", &m->max_payload)) <= 0)
        return rc < 0 ? rc : jmissing(c, "max_payload");
    if ((rc = jstring(c, o, "chat_family", CM_WIRE_MAX_NAME, &s, &n)) < 0)
        return rc;
    if (rc == 1 && cm_chat_family_parse(s, &m->chat_family) < 0)
        m->chat_family = CM_CHAT_UNKNOWN;
    if ((rc = jstring(c, o, "default_system", CM_WIRE_MAX_SYSTEM, &s, &n)) < 0)
        return rc;
    if (rc == 1) {
        m->default_system = malloc(n + 1);
        if (m->default_system == NULL)
            return fail(c->err, c->err_len, -ENOMEM, "%s: out of memory", c->what);
        memcpy(m->default_system, s, n);
        m->default_system[n] = '\0';
    }
    struct json_object *sp = NULL;
    if ((rc = jobject(c, o, "special", &sp)) < 0)
        return rc;
    if (rc == 1 && ((rc = special_from_json(c, sp, "bos", &m->bos)) < 0 ||
                    (rc = special_from_json(c, sp, "eos", &m->eos)) < 0 ||
                    (rc = special_from_json(c, sp, "eot", &m->eot)) < 0))
        return rc;
    return caps_from_json(c, o, &m->caps);
}

int
cm_wire_decode_model_info(const struct cm_wire_frame *f, struct cm_wire_model_info *out, char *err,
                          size_t err_len)
{
    struct jctx c = {"model_info", err, err_len};
    struct json_object *o = NULL;
    struct cm_wire_model_info m;
    cm_wire_model_info_init(&m);
    int rc = check_type(f, CM_WIRE_MODEL_INFO, err, err_len);
    if (rc < 0)
        goto out;
    rc = json_parse_object(f, c.what, &o, err, err_len);
    if (rc < 0)
        goto out;
    rc = model_info_fields(&c, o, &m);
    if (rc < 0)
        goto out;
    rc = cm_wire_model_info_validate(&m, err, err_len);
    if (rc < 0)
        goto out;
    *out = m;
    cm_wire_model_info_init(&m);
out:
    cm_wire_model_info_fini(&m);
    json_object_put(o);
    return rc < 0 ? rc : 0;
}

/* ---- SUBMIT ---- */

void
cm_wire_submit_init(struct cm_wire_submit *s)
{
    memset(s, 0, sizeof(*s));
    s->sampling.temperature = 1.0f;
    s->sampling.top_p = 1.0f;
    s->sampling.repetition_penalty = 1.0f;
    s->sampling.repeat_last_n = 64;
    s->add_special = true;
}

void
cm_wire_submit_fini(struct cm_wire_submit *s)
{
    free(s->prompt);
    free(s->prompt_ids);
    free(s->stop_ids);
    free(s->sampling.logit_bias);
    cm_wire_submit_init(s);
}

static int
ids_validate(const int32_t *ids, uint32_t n, uint32_t max, const char *key, char *err,
             size_t err_len)
{
    if (n > max)
        return fail(err, err_len, -EINVAL, "submit: '%s' has more than %u entries", key, max);
    if (n > 0 && ids == NULL)
        return fail(err, err_len, -EINVAL, "submit: '%s' is NULL", key);
    for (uint32_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= CM_WIRE_MAX_VOCAB)
            return fail(err, err_len, -EINVAL, "submit: '%s'[%u] out of range [0, %d)", key, i,
                        CM_WIRE_MAX_VOCAB);
    }
    return 0;
}

static int
sampling_validate(const struct cm_wire_sampling *p, char *err, size_t err_len)
{
    if (!float_finite(p->temperature) || p->temperature < 0)
        return fail(err, err_len, -EINVAL, "submit: 'temperature' must be finite and >= 0");
    if (p->top_k < 0 || p->top_k > CM_WIRE_MAX_VOCAB)
        return fail(err, err_len, -EINVAL, "submit: 'top_k' out of range [0, %d]",
                    CM_WIRE_MAX_VOCAB);
    if (!(p->top_p > 0 && p->top_p <= 1))
        return fail(err, err_len, -EINVAL, "submit: 'top_p' must be in (0, 1]");
    if (!(p->min_p >= 0 && p->min_p <= 1))
        return fail(err, err_len, -EINVAL, "submit: 'min_p' must be in [0, 1]");
    if (!float_finite(p->repetition_penalty) || p->repetition_penalty <= 0)
        return fail(err, err_len, -EINVAL, "submit: 'repetition_penalty' must be finite and > 0");
    if (p->repeat_last_n < 0 || p->repeat_last_n > CM_WIRE_MAX_VOCAB)
        return fail(err, err_len, -EINVAL, "submit: 'repeat_last_n' out of range [0, %d]",
                    CM_WIRE_MAX_VOCAB);
    if (!float_finite(p->presence_penalty))
        return fail(err, err_len, -EINVAL, "submit: 'presence_penalty' must be finite");
    if (!float_finite(p->frequency_penalty))
        return fail(err, err_len, -EINVAL, "submit: 'frequency_penalty' must be finite");
    if (p->n_logit_bias > CM_WIRE_MAX_LOGIT_BIAS)
        return fail(err, err_len, -EINVAL, "submit: 'logit_bias' has more than %d entries",
                    CM_WIRE_MAX_LOGIT_BIAS);
    if (p->n_logit_bias > 0 && p->logit_bias == NULL)
        return fail(err, err_len, -EINVAL, "submit: 'logit_bias' is NULL");
    for (uint32_t i = 0; i < p->n_logit_bias; i++) {
        const struct cm_wire_logit_bias *e = &p->logit_bias[i];
        if (e->id < 0 || e->id >= CM_WIRE_MAX_VOCAB)
            return fail(err, err_len, -EINVAL, "submit: 'logit_bias' id %d out of range [0, %d)",
                        (int)e->id, CM_WIRE_MAX_VOCAB);
        if (!(e->bias >= -CM_WIRE_MAX_LOGIT_BIAS_ABS && e->bias <= CM_WIRE_MAX_LOGIT_BIAS_ABS))
            return fail(err, err_len, -EINVAL,
                        "submit: 'logit_bias' for id %d must be in [-100, 100]", (int)e->id);
    }
    return 0;
}

int
cm_wire_submit_validate(const struct cm_wire_submit *s, char *err, size_t err_len)
{
    int rc;
    if ((s->prompt == NULL) == (s->n_prompt_ids == 0))
        return fail(err, err_len, -EINVAL, "submit: exactly one of 'prompt' and 'prompt_ids'");
    if (s->prompt != NULL && !utf8_valid(s->prompt, s->prompt_len))
        return fail(err, err_len, -EINVAL, "submit: 'prompt' is not UTF-8 text without NUL");
    rc = ids_validate(s->prompt_ids, s->n_prompt_ids, CM_WIRE_MAX_PROMPT_IDS, "prompt_ids", err,
                      err_len);
    if (rc < 0)
        return rc;
    if (s->max_tokens < 1 || s->max_tokens > CM_WIRE_MAX_VOCAB)
        return fail(err, err_len, -EINVAL, "submit: 'max_tokens' out of range [1, %d]",
                    CM_WIRE_MAX_VOCAB);
    rc = sampling_validate(&s->sampling, err, err_len);
    if (rc < 0)
        return rc;
    rc = ids_validate(s->stop_ids, s->n_stop_ids, CM_WIRE_MAX_STOP_IDS, "stop_ids", err, err_len);
    if (rc < 0)
        return rc;
    if (s->top_logprobs < 0 || s->top_logprobs > CM_WIRE_MAX_TOP_LOGPROBS)
        return fail(err, err_len, -EINVAL, "submit: 'top_logprobs' out of range [0, %d]",
                    CM_WIRE_MAX_TOP_LOGPROBS);
    if (s->top_logprobs > 0 && !s->logprobs)
        return fail(err, err_len, -EINVAL, "submit: 'top_logprobs' needs 'logprobs'");
    if (s->deadline_ms > CM_WIRE_MAX_DEADLINE_MS)
        return fail(err, err_len, -EINVAL, "submit: 'deadline_ms' out of range [0, %u]",
                    CM_WIRE_MAX_DEADLINE_MS);
    if (s->priority < -CM_WIRE_MAX_PRIORITY || s->priority > CM_WIRE_MAX_PRIORITY)
        return fail(err, err_len, -EINVAL, "submit: 'priority' out of range [-%d, %d]",
                    CM_WIRE_MAX_PRIORITY, CM_WIRE_MAX_PRIORITY);
    if (s->token_loop != 0 && (s->token_loop < 2 || s->token_loop > CM_WIRE_MAX_TOKEN_LOOP))
        return fail(err, err_len, -EINVAL, "submit: 'token_loop' must be 0 or in [2, %d]",
                    CM_WIRE_MAX_TOKEN_LOOP);
    return 0;
}

static void
sampling_to_json(struct json_object *o, const struct cm_wire_sampling *p, bool *ok)
{
    jadd(o, "temperature", jnew_float(p->temperature), ok);
    jadd(o, "top_k", json_object_new_int64(p->top_k), ok);
    jadd(o, "top_p", jnew_float(p->top_p), ok);
    jadd(o, "min_p", jnew_float(p->min_p), ok);
    jadd(o, "repetition_penalty", jnew_float(p->repetition_penalty), ok);
    jadd(o, "repeat_last_n", json_object_new_int64(p->repeat_last_n), ok);
    jadd(o, "presence_penalty", jnew_float(p->presence_penalty), ok);
    jadd(o, "frequency_penalty", jnew_float(p->frequency_penalty), ok);
    if (p->has_seed)
        jadd(o, "seed", json_object_new_uint64(p->seed), ok);
    struct json_object *lb = json_object_new_object();
    for (uint32_t i = 0; i < p->n_logit_bias && lb != NULL; i++) {
        char key[16];
        snprintf(key, sizeof(key), "%d", (int)p->logit_bias[i].id);
        jadd(lb, key, jnew_float(p->logit_bias[i].bias), ok);
    }
    jadd(o, "logit_bias", lb, ok);
}

int
cm_wire_encode_submit(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_submit *s)
{
    if (cm_wire_submit_validate(s, NULL, 0) < 0)
        return -EINVAL;
    /* A JSON string is never shorter than its text: refuse before building a copy. */
    if (s->prompt != NULL && s->prompt_len > b->max_payload)
        return -EMSGSIZE;
    bool ok = true;
    struct json_object *o = json_object_new_object();
    if (s->prompt != NULL)
        jadd(o, "prompt", jnew_str(s->prompt, s->prompt_len), &ok);
    else
        jadd(o, "prompt_ids", jnew_ids(s->prompt_ids, s->n_prompt_ids, &ok), &ok);
    jadd(o, "max_tokens", json_object_new_int64(s->max_tokens), &ok);
    sampling_to_json(o, &s->sampling, &ok);
    jadd(o, "stop_ids", jnew_ids(s->stop_ids, s->n_stop_ids, &ok), &ok);
    jadd(o, "logprobs", json_object_new_boolean(s->logprobs), &ok);
    jadd(o, "top_logprobs", json_object_new_int64(s->top_logprobs), &ok);
    jadd(o, "deadline_ms", json_object_new_int64(s->deadline_ms), &ok);
    jadd(o, "priority", json_object_new_int64(s->priority), &ok);
    jadd(o, "add_special", json_object_new_boolean(s->add_special), &ok);
    jadd(o, "parse_special", json_object_new_boolean(s->parse_special), &ok);
    if (s->token_loop != 0)
        jadd(o, "token_loop", json_object_new_int64(s->token_loop), &ok);
    if (!ok) {
        json_object_put(o);
        return -ENOMEM;
    }
    struct json_object *lb = jfield(o, "logit_bias");
    if (lb != NULL && (uint32_t)json_object_object_length(lb) != s->sampling.n_logit_bias) {
        json_object_put(o);
        return -EINVAL; /* a repeated id: a JSON object cannot carry it */
    }
    return json_emit(b, CM_WIRE_SUBMIT, req_id, o);
}

/* "0" or [1-9][0-9]* below CM_WIRE_MAX_VOCAB. */
static int
parse_id_key(const char *k, int32_t *out)
{
    size_t n = strlen(k);
    if (n == 0 || n > 8 || (n > 1 && k[0] == '0'))
        return -EINVAL;
    int32_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (k[i] < '0' || k[i] > '9')
            return -EINVAL;
        v = v * 10 + (k[i] - '0');
    }
    if (v >= CM_WIRE_MAX_VOCAB)
        return -EINVAL;
    *out = v;
    return 0;
}

static int
logit_bias_from_json(const struct jctx *c, struct json_object *o, struct cm_wire_sampling *p)
{
    struct json_object *lb = NULL;
    int rc = jobject(c, o, "logit_bias", &lb);
    if (rc <= 0)
        return rc;
    size_t n = (size_t)json_object_object_length(lb);
    if (n > CM_WIRE_MAX_LOGIT_BIAS)
        return fail(c->err, c->err_len, -EINVAL, "%s: 'logit_bias' has more than %d entries",
                    c->what, CM_WIRE_MAX_LOGIT_BIAS);
    if (n == 0)
        return 1;
    p->logit_bias = malloc(n * sizeof(*p->logit_bias));
    if (p->logit_bias == NULL)
        return fail(c->err, c->err_len, -ENOMEM, "%s: out of memory", c->what);
    struct json_object_iterator it = json_object_iter_begin(lb);
    struct json_object_iterator end = json_object_iter_end(lb);
    for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it)) {
        const char *key = json_object_iter_peek_name(&it);
        struct json_object *v = json_object_iter_peek_value(&it);
        struct cm_wire_logit_bias *e = &p->logit_bias[p->n_logit_bias];
        if (parse_id_key(key, &e->id) < 0)
            return fail(c->err, c->err_len, -EINVAL,
                        "%s: 'logit_bias' key must be a token id in [0, %d)", c->what,
                        CM_WIRE_MAX_VOCAB);
        if (!json_object_is_type(v, json_type_double) && !json_object_is_type(v, json_type_int))
            return fail(c->err, c->err_len, -EINVAL, "%s: 'logit_bias' values must be numbers",
                        c->what);
        double d = json_object_get_double(v);
        if (!(d >= -CM_WIRE_MAX_LOGIT_BIAS_ABS && d <= CM_WIRE_MAX_LOGIT_BIAS_ABS))
            return fail(c->err, c->err_len, -EINVAL,
                        "%s: 'logit_bias' for id %d must be in [-100, 100]", c->what, (int)e->id);
        e->bias = (float)d;
        p->n_logit_bias++;
    }
    return 1;
}

static int
sampling_from_json(const struct jctx *c, struct json_object *o, struct cm_wire_sampling *p)
{
    int rc;
    struct json_object *v;
    if ((rc = jfloat(c, o, "temperature", &p->temperature)) < 0 ||
        (rc = ji32(c, o, "top_k", &p->top_k)) < 0 || (rc = jfloat(c, o, "top_p", &p->top_p)) < 0 ||
        (rc = jfloat(c, o, "min_p", &p->min_p)) < 0 ||
        (rc = jfloat(c, o, "repetition_penalty", &p->repetition_penalty)) < 0 ||
        (rc = ji32(c, o, "repeat_last_n", &p->repeat_last_n)) < 0 ||
        (rc = jfloat(c, o, "presence_penalty", &p->presence_penalty)) < 0 ||
        (rc = jfloat(c, o, "frequency_penalty", &p->frequency_penalty)) < 0)
        return rc;
    v = jfield(o, "seed");
    if (v != NULL) {
        /* json-c keeps integers above INT64_MAX as unsigned; negative ones read as 0 there. */
        if (!json_object_is_type(v, json_type_int) || json_object_get_int64(v) < 0)
            return fail(c->err, c->err_len, -EINVAL, "%s: 'seed' must be an integer in [0, 2^64)",
                        c->what);
        p->seed = json_object_get_uint64(v);
        p->has_seed = true;
    }
    return logit_bias_from_json(c, o, p);
}

static int
submit_fields(const struct jctx *c, struct json_object *o, struct cm_wire_submit *s)
{
    const char *prompt = NULL;
    size_t n = 0;
    int rc;
    if ((rc = jstring(c, o, "prompt", SIZE_MAX, &prompt, &n)) < 0)
        return rc;
    if (rc == 1) {
        s->prompt = malloc(n + 1);
        if (s->prompt == NULL)
            return fail(c->err, c->err_len, -ENOMEM, "%s: out of memory", c->what);
        memcpy(s->prompt, prompt, n);
        s->prompt[n] = '\0';
        s->prompt_len = n;
    }
    if ((rc = jids(c, o, "prompt_ids", CM_WIRE_MAX_PROMPT_IDS, &s->prompt_ids, &s->n_prompt_ids)) <
        0)
        return rc;
    if (s->prompt == NULL && s->n_prompt_ids == 0)
        return fail(c->err, c->err_len, -EINVAL, "%s: missing 'prompt' or 'prompt_ids'", c->what);
    if ((rc = ju32(c, o, "max_tokens", &s->max_tokens)) <= 0)
        return rc < 0 ? rc : jmissing(c, "max_tokens");
    if ((rc = sampling_from_json(c, o, &s->sampling)) < 0)
        return rc;
    if ((rc = jids(c, o, "stop_ids", CM_WIRE_MAX_STOP_IDS, &s->stop_ids, &s->n_stop_ids)) < 0 ||
        (rc = jbool(c, o, "logprobs", &s->logprobs)) < 0 ||
        (rc = ji32(c, o, "top_logprobs", &s->top_logprobs)) < 0 ||
        (rc = ju32(c, o, "deadline_ms", &s->deadline_ms)) < 0 ||
        (rc = ji32(c, o, "priority", &s->priority)) < 0 ||
        (rc = jbool(c, o, "add_special", &s->add_special)) < 0 ||
        (rc = jbool(c, o, "parse_special", &s->parse_special)) < 0 ||
        (rc = ji32(c, o, "token_loop", &s->token_loop)) < 0)
        return rc;
    return 0;
}

int
cm_wire_decode_submit(const struct cm_wire_frame *f, struct cm_wire_submit *out, char *err,
                      size_t err_len)
{
    struct jctx c = {"submit", err, err_len};
    struct json_object *o = NULL;
    struct cm_wire_submit s;
    cm_wire_submit_init(&s);
    int rc = check_type(f, CM_WIRE_SUBMIT, err, err_len);
    if (rc < 0)
        goto out;
    rc = json_parse_object(f, c.what, &o, err, err_len);
    if (rc < 0)
        goto out;
    rc = submit_fields(&c, o, &s);
    if (rc < 0)
        goto out;
    rc = cm_wire_submit_validate(&s, err, err_len);
    if (rc < 0)
        goto out;
    *out = s;
    cm_wire_submit_init(&s);
out:
    cm_wire_submit_fini(&s);
    json_object_put(o);
    return rc < 0 ? rc : 0;
}

/* ---- ACCEPTED ---- */

int
cm_wire_encode_accepted(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_accepted *m)
{
    uint8_t *p = NULL;
    if (m->cached_tokens > m->prompt_tokens)
        return -EINVAL;
    int rc = cm_wire_buf_begin_frame(b, CM_WIRE_ACCEPTED, req_id, 8, &p);
    if (rc < 0)
        return rc;
    put_u32(p, m->prompt_tokens);
    put_u32(p + 4, m->cached_tokens);
    return 0;
}

int
cm_wire_decode_accepted(const struct cm_wire_frame *f, struct cm_wire_accepted *out, char *err,
                        size_t err_len)
{
    int rc = check_type(f, CM_WIRE_ACCEPTED, err, err_len);
    if (rc < 0)
        return rc;
    if (f->len != 8)
        return fail(err, err_len, -EPROTO, "accepted: payload of %u bytes, expected 8", f->len);
    struct cm_wire_accepted m = {get_u32(f->payload), get_u32(f->payload + 4)};
    if (m.cached_tokens > m.prompt_tokens)
        return fail(err, err_len, -EINVAL, "accepted: 'cached_tokens' exceeds 'prompt_tokens'");
    *out = m;
    return 0;
}

/* ---- TOKEN ---- */

static bool
logprob_valid(float f)
{
    return !isnan(f) && f != INFINITY;
}

static int
token_validate(const struct cm_wire_token *m, char *err, size_t err_len)
{
    if (m->id < 0 || m->id >= CM_WIRE_MAX_VOCAB)
        return fail(err, err_len, -EINVAL, "token: 'id' out of range [0, %d)", CM_WIRE_MAX_VOCAB);
    if (m->flags & ~CM_WIRE_TOKEN_FLAGS_ALL)
        return fail(err, err_len, -EINVAL, "token: unknown 'flags' bits 0x%x", m->flags);
    if (m->n_top > CM_WIRE_MAX_TOP_LOGPROBS)
        return fail(err, err_len, -EINVAL, "token: 'n_top' out of range [0, %d]",
                    CM_WIRE_MAX_TOP_LOGPROBS);
    if (m->text_len > CM_WIRE_MAX_TOKEN_TEXT)
        return fail(err, err_len, -EINVAL, "token: 'text_len' over %d", CM_WIRE_MAX_TOKEN_TEXT);
    if (!(m->flags & CM_WIRE_TOKEN_LOGPROB)) {
        if (m->flags & CM_WIRE_TOKEN_TOP_TEXT)
            return fail(err, err_len, -EINVAL, "token: top text without logprobs");
        if (m->logprob != 0 || m->n_top != 0)
            return fail(err, err_len, -EINVAL, "token: 'logprob' or 'n_top' without the flag");
        return 0;
    }
    if (!logprob_valid(m->logprob))
        return fail(err, err_len, -EINVAL, "token: 'logprob' is NaN or +inf");
    for (uint32_t i = 0; i < m->n_top; i++) {
        if (m->top_ids[i] < 0 || m->top_ids[i] >= CM_WIRE_MAX_VOCAB)
            return fail(err, err_len, -EINVAL, "token: 'top_ids'[%u] out of range", i);
        if (!logprob_valid(m->top_logprobs[i]))
            return fail(err, err_len, -EINVAL, "token: 'top_logprobs'[%u] is NaN or +inf", i);
        if ((m->flags & CM_WIRE_TOKEN_TOP_TEXT) &&
            (uint32_t)m->top_off[i] + m->top_len[i] > CM_WIRE_MAX_TOP_TEXT)
            return fail(err, err_len, -EINVAL, "token: top text %u out of range", i);
    }
    return 0;
}

/* Bytes of the alternatives' texts on the wire (2 + len each), 0 without the flag. */
static size_t
token_top_text_bytes(const struct cm_wire_token *m)
{
    size_t n = 0;
    if (!(m->flags & CM_WIRE_TOKEN_TOP_TEXT))
        return 0;
    for (uint32_t i = 0; i < m->n_top; i++)
        n += 2 + (size_t)m->top_len[i];
    return n;
}

int
cm_wire_encode_token(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_token *m)
{
    uint8_t *p = NULL;
    if (token_validate(m, NULL, 0) < 0)
        return -EINVAL;
    size_t top_bytes = token_top_text_bytes(m);
    size_t tot = 0;
    for (uint32_t i = 0; top_bytes && i < m->n_top; i++)
        tot += m->top_len[i];
    if (tot > CM_WIRE_MAX_TOP_TEXT)
        return -EINVAL;
    size_t len = 16 + 8 * (size_t)m->n_top + m->text_len + top_bytes;
    int rc = cm_wire_buf_begin_frame(b, CM_WIRE_TOKEN, req_id, len, &p);
    if (rc < 0)
        return rc;
    put_u32(p, (uint32_t)m->id);
    put_u32(p + 4, m->flags);
    put_f32(p + 8, m->logprob);
    put_u16(p + 12, (uint16_t)m->n_top);
    put_u16(p + 14, (uint16_t)m->text_len);
    p += 16;
    for (uint32_t i = 0; i < m->n_top; i++, p += 8) {
        put_u32(p, (uint32_t)m->top_ids[i]);
        put_f32(p + 4, m->top_logprobs[i]);
    }
    memcpy(p, m->text, m->text_len);
    p += m->text_len;
    for (uint32_t i = 0; top_bytes && i < m->n_top; i++) {
        put_u16(p, m->top_len[i]);
        memcpy(p + 2, m->top_text + m->top_off[i], m->top_len[i]);
        p += 2 + m->top_len[i];
    }
    return 0;
}

int
cm_wire_decode_token(const struct cm_wire_frame *f, struct cm_wire_token *out, char *err,
                     size_t err_len)
{
    int rc = check_type(f, CM_WIRE_TOKEN, err, err_len);
    if (rc < 0)
        return rc;
    if (f->len < 16)
        return fail(err, err_len, -EPROTO, "token: payload of %u bytes, under 16", f->len);
    const uint8_t *p = f->payload;
    uint32_t n_top = get_u16(p + 12), text_len = get_u16(p + 14);
    if (n_top > CM_WIRE_MAX_TOP_LOGPROBS)
        return fail(err, err_len, -EINVAL, "token: 'n_top' %u over %d", n_top,
                    CM_WIRE_MAX_TOP_LOGPROBS);
    if (text_len > CM_WIRE_MAX_TOKEN_TEXT)
        return fail(err, err_len, -EINVAL, "token: 'text_len' %u over %d", text_len,
                    CM_WIRE_MAX_TOKEN_TEXT);
    uint32_t flags = get_u32(p + 4), fixed = 16 + 8 * n_top + text_len;
    bool top_text = (flags & CM_WIRE_TOKEN_TOP_TEXT) != 0;
    if (top_text ? f->len < fixed : f->len != fixed)
        return fail(err, err_len, -EPROTO, "token: payload of %u bytes, expected %u", f->len,
                    fixed);
    struct cm_wire_token m;
    m.id = (int32_t)get_u32(p);
    m.flags = flags;
    m.logprob = get_f32(p + 8);
    m.n_top = n_top;
    m.text_len = text_len;
    p += 16;
    for (uint32_t i = 0; i < n_top; i++, p += 8) {
        m.top_ids[i] = (int32_t)get_u32(p);
        m.top_logprobs[i] = get_f32(p + 4);
    }
    memcpy(m.text, p, text_len);
    m.text[text_len] = '\0';
    p += text_len;
    if (top_text) {
        const uint8_t *end = f->payload + f->len;
        uint32_t off = 0;
        for (uint32_t i = 0; i < n_top; i++) {
            if (end - p < 2)
                return fail(err, err_len, -EPROTO, "token: top text %u truncated", i);
            uint32_t l = get_u16(p);
            p += 2;
            if ((uint32_t)(end - p) < l || off + l > CM_WIRE_MAX_TOP_TEXT)
                return fail(err, err_len, -EPROTO, "token: top text %u truncated or too long", i);
            memcpy(m.top_text + off, p, l);
            m.top_off[i] = (uint16_t)off;
            m.top_len[i] = (uint16_t)l;
            off += l;
            p += l;
        }
        if (p != end)
            return fail(err, err_len, -EPROTO, "token: %zu bytes after the top texts",
                        (size_t)(end - p));
    }
    rc = token_validate(&m, err, err_len);
    if (rc < 0)
        return rc;
    if (top_text) {
        memcpy(out, &m, sizeof(m));
        return 0;
    }
    /* The text arrays are mostly unused: copy only up to the text's NUL. */
    memcpy(out, &m, offsetof(struct cm_wire_token, top_off));
    memcpy(&out->text_len, &m.text_len,
           offsetof(struct cm_wire_token, text) - offsetof(struct cm_wire_token, text_len) +
               text_len + 1);
    return 0;
}

/* ---- DONE ---- */

static int
done_validate(const struct cm_wire_done *m, char *err, size_t err_len)
{
    long n = inline_len(m->guard, sizeof(m->guard));
    if ((int)m->finish < 0 || (int)m->finish > CM_WIRE_FINISH_MAX)
        return fail(err, err_len, -EINVAL, "done: unknown 'finish' %d", (int)m->finish);
    if (n < 0 || !name_valid(m->guard, (size_t)n))
        return fail(err, err_len, -EINVAL, "done: 'guard' must be a name of [A-Za-z0-9_.:-]");
    if (n > 0 && m->finish != CM_WIRE_FINISH_CANCELLED)
        return fail(err, err_len, -EINVAL, "done: 'guard' set but 'finish' is not cancelled");
    if (m->cached_tokens > m->prompt_tokens)
        return fail(err, err_len, -EINVAL, "done: 'cached_tokens' exceeds 'prompt_tokens'");
    if (!(m->queue_ms >= 0 && m->queue_ms < INFINITY) ||
        !(m->prefill_ms >= 0 && m->prefill_ms < INFINITY) ||
        !(m->decode_ms >= 0 && m->decode_ms < INFINITY))
        return fail(err, err_len, -EINVAL, "done: 'timings' must be finite and >= 0");
    return 0;
}

int
cm_wire_encode_done(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_done *m)
{
    if (done_validate(m, NULL, 0) < 0)
        return -EINVAL;
    bool ok = true;
    const char *fin = cm_wire_finish_name(m->finish);
    struct json_object *o = json_object_new_object();
    jadd(o, "finish", jnew_str(fin, strlen(fin)), &ok);
    jadd(o, "guard", jnew_str(m->guard, strlen(m->guard)), &ok);
    struct json_object *u = json_object_new_object();
    jadd(u, "prompt_tokens", json_object_new_int64(m->prompt_tokens), &ok);
    jadd(u, "completion_tokens", json_object_new_int64(m->completion_tokens), &ok);
    jadd(u, "cached_tokens", json_object_new_int64(m->cached_tokens), &ok);
    jadd(o, "usage", u, &ok);
    struct json_object *t = json_object_new_object();
    jadd(t, "queue_ms", jnew_double(m->queue_ms), &ok);
    jadd(t, "prefill_ms", jnew_double(m->prefill_ms), &ok);
    jadd(t, "decode_ms", jnew_double(m->decode_ms), &ok);
    jadd(o, "timings", t, &ok);
    if (!ok) {
        json_object_put(o);
        return -ENOMEM;
    }
    return json_emit(b, CM_WIRE_DONE, req_id, o);
}

static int
done_fields(const struct jctx *c, struct json_object *o, struct cm_wire_done *m)
{
    char fin[CM_WIRE_MAX_NAME + 1];
    struct json_object *u = NULL, *t = NULL;
    int rc = jstring_inline(c, o, "finish", CM_WIRE_MAX_NAME, fin);
    if (rc <= 0)
        return rc < 0 ? rc : jmissing(c, "finish");
    if (cm_wire_finish_parse(fin, &m->finish) < 0)
        return fail(c->err, c->err_len, -EINVAL, "%s: unknown 'finish'", c->what);
    if ((rc = jstring_inline(c, o, "guard", CM_WIRE_MAX_NAME, m->guard)) < 0)
        return rc;
    if ((rc = jobject(c, o, "usage", &u)) < 0)
        return rc;
    if (rc == 1 && ((rc = ju32(c, u, "prompt_tokens", &m->prompt_tokens)) < 0 ||
                    (rc = ju32(c, u, "completion_tokens", &m->completion_tokens)) < 0 ||
                    (rc = ju32(c, u, "cached_tokens", &m->cached_tokens)) < 0))
        return rc;
    if ((rc = jobject(c, o, "timings", &t)) < 0)
        return rc;
    if (rc == 1 && ((rc = jdouble(c, t, "queue_ms", &m->queue_ms)) < 0 ||
                    (rc = jdouble(c, t, "prefill_ms", &m->prefill_ms)) < 0 ||
                    (rc = jdouble(c, t, "decode_ms", &m->decode_ms)) < 0))
        return rc;
    return 0;
}

int
cm_wire_decode_done(const struct cm_wire_frame *f, struct cm_wire_done *out, char *err,
                    size_t err_len)
{
    struct jctx c = {"done", err, err_len};
    struct json_object *o = NULL;
    struct cm_wire_done m;
    memset(&m, 0, sizeof(m));
    int rc = check_type(f, CM_WIRE_DONE, err, err_len);
    if (rc < 0)
        goto out;
    rc = json_parse_object(f, c.what, &o, err, err_len);
    if (rc < 0)
        goto out;
    rc = done_fields(&c, o, &m);
    if (rc < 0)
        goto out;
    rc = done_validate(&m, err, err_len);
    if (rc < 0)
        goto out;
    *out = m;
out:
    json_object_put(o);
    return rc < 0 ? rc : 0;
}

/* ---- ERROR ---- */

static int
error_validate(const struct cm_wire_error *m, char *err, size_t err_len)
{
    long n = inline_len(m->message, sizeof(m->message));
    if (m->code >= 0 || cm_wire_errno_name(m->code) == NULL)
        return fail(err, err_len, -EINVAL, "error: 'code' %d is not a protocol errno", m->code);
    if (n < 0 || !utf8_valid(m->message, (size_t)n))
        return fail(err, err_len, -EINVAL, "error: 'message' is not UTF-8 text");
    if (m->retry_after_ms > CM_WIRE_MAX_DEADLINE_MS)
        return fail(err, err_len, -EINVAL, "error: 'retry_after_ms' out of range [0, %u]",
                    CM_WIRE_MAX_DEADLINE_MS);
    return 0;
}

int
cm_wire_encode_error(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_error *m)
{
    if (error_validate(m, NULL, 0) < 0)
        return -EINVAL;
    bool ok = true;
    const char *code = cm_wire_errno_name(m->code);
    struct json_object *o = json_object_new_object();
    jadd(o, "code", jnew_str(code, strlen(code)), &ok);
    jadd(o, "message", jnew_str(m->message, strlen(m->message)), &ok);
    jadd(o, "retry_after_ms", json_object_new_int64(m->retry_after_ms), &ok);
    if (!ok) {
        json_object_put(o);
        return -ENOMEM;
    }
    return json_emit(b, CM_WIRE_ERROR, req_id, o);
}

int
cm_wire_decode_error(const struct cm_wire_frame *f, struct cm_wire_error *out, char *err,
                     size_t err_len)
{
    struct jctx c = {"error", err, err_len};
    struct json_object *o = NULL;
    struct cm_wire_error m;
    char code[CM_WIRE_MAX_NAME + 1];
    memset(&m, 0, sizeof(m));
    int rc = check_type(f, CM_WIRE_ERROR, err, err_len);
    if (rc < 0)
        goto out;
    rc = json_parse_object(f, c.what, &o, err, err_len);
    if (rc < 0)
        goto out;
    rc = jstring_inline(&c, o, "code", CM_WIRE_MAX_NAME, code);
    if (rc == 0)
        rc = jmissing(&c, "code");
    if (rc < 0)
        goto out;
    if (cm_wire_errno_parse(code, &m.code) < 0) {
        rc = fail(err, err_len, -EINVAL, "error: 'code' is not a protocol errno name");
        goto out;
    }
    if ((rc = jstring_inline(&c, o, "message", CM_WIRE_MAX_MESSAGE, m.message)) < 0 ||
        (rc = ju32(&c, o, "retry_after_ms", &m.retry_after_ms)) < 0)
        goto out;
    rc = error_validate(&m, err, err_len);
    if (rc < 0)
        goto out;
    *out = m;
out:
    json_object_put(o);
    return rc < 0 ? rc : 0;
}

/* ---- CANCEL ---- */

static int
cancel_validate(const struct cm_wire_cancel *m, char *err, size_t err_len)
{
    long n = inline_len(m->reason, sizeof(m->reason));
    if (n <= 0 || !name_valid(m->reason, (size_t)n))
        return fail(err, err_len, -EINVAL,
                    "cancel: 'reason' must be 1..%d bytes of [A-Za-z0-9_.:-]", CM_WIRE_MAX_NAME);
    return 0;
}

int
cm_wire_encode_cancel(struct cm_wire_buf *b, uint64_t req_id, const struct cm_wire_cancel *m)
{
    if (cancel_validate(m, NULL, 0) < 0)
        return -EINVAL;
    bool ok = true;
    struct json_object *o = json_object_new_object();
    jadd(o, "reason", jnew_str(m->reason, strlen(m->reason)), &ok);
    if (!ok) {
        json_object_put(o);
        return -ENOMEM;
    }
    return json_emit(b, CM_WIRE_CANCEL, req_id, o);
}

int
cm_wire_decode_cancel(const struct cm_wire_frame *f, struct cm_wire_cancel *out, char *err,
                      size_t err_len)
{
    struct jctx c = {"cancel", err, err_len};
    struct json_object *o = NULL;
    struct cm_wire_cancel m;
    memset(&m, 0, sizeof(m));
    int rc = check_type(f, CM_WIRE_CANCEL, err, err_len);
    if (rc < 0)
        goto out;
    rc = json_parse_object(f, c.what, &o, err, err_len);
    if (rc < 0)
        goto out;
    rc = jstring_inline(&c, o, "reason", CM_WIRE_MAX_NAME, m.reason);
    if (rc == 0)
        rc = jmissing(&c, "reason");
    if (rc < 0)
        goto out;
    rc = cancel_validate(&m, err, err_len);
    if (rc < 0)
        goto out;
    *out = m;
out:
    json_object_put(o);
    return rc < 0 ? rc : 0;
}

/* ---- STATS / STATS_REPLY ---- */

int
cm_wire_encode_stats(struct cm_wire_buf *b, uint64_t req_id)
{
    return cm_wire_encode_frame(b, CM_WIRE_STATS, req_id, NULL, 0);
}

int
cm_wire_decode_stats(const struct cm_wire_frame *f, char *err, size_t err_len)
{
    int rc = check_type(f, CM_WIRE_STATS, err, err_len);
    if (rc < 0)
        return rc;
    if (f->len != 0)
        return fail(err, err_len, -EPROTO, "stats: payload of %u bytes, expected none", f->len);
    return 0;
}

void
cm_wire_stats_reply_fini(struct cm_wire_stats_reply *m)
{
    json_object_put(m->obj);
    m->obj = NULL;
}

int
cm_wire_encode_stats_reply(struct cm_wire_buf *b, uint64_t req_id, struct json_object *obj)
{
    if (obj == NULL || !json_object_is_type(obj, json_type_object))
        return -EINVAL;
    /* json_emit drops one reference: take one for it, the caller keeps its own. */
    return json_emit(b, CM_WIRE_STATS_REPLY, req_id, json_object_get(obj));
}

int
cm_wire_decode_stats_reply(const struct cm_wire_frame *f, struct cm_wire_stats_reply *out,
                           char *err, size_t err_len)
{
    struct json_object *o = NULL;
    int rc = check_type(f, CM_WIRE_STATS_REPLY, err, err_len);
    if (rc < 0)
        return rc;
    rc = json_parse_object(f, "stats_reply", &o, err, err_len);
    if (rc < 0)
        return rc;
    out->obj = o;
    return 0;
}

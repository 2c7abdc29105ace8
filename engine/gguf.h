/*
 * gguf: a validating reader of GGUF v2/v3 model files over a read-only mmap.
 *
 * File layout (all little-endian):
 *   u32 magic "GGUF" (0x46554747), u32 version (2 or 3), u64 n_tensors, u64 n_kv,
 *   n_kv x { string key, u32 value_type, value },
 *   n_tensors x { string name, u32 n_dims (1..4), u64 ne[n_dims], u32 type, u64 offset },
 *   padding to `general.alignment` (u32, default 32, a power of two), then the tensor data section;
 *   each tensor's data starts at data_section + offset, offset a multiple of the alignment.
 *   string = u64 length + bytes (no NUL); array value = u32 element type + u64 count + elements.
 *
 * eng_gguf_open validates everything before anything is used: magic, version (v1 and big-endian
 * files are rejected), counts against the file size, every string and array length, value types
 * (no arrays of arrays; bools 0 or 1), unique keys and tensor names, general.alignment (a u32 power
 * of two), tensor dims (1..4 dims, each >= 1, product without overflow), tensor types known and
 * supported by the kernels, row sizes divisible by the block size, offsets aligned, and every
 * tensor's bytes inside the file (tensors may overlap). A bad file is one error message naming the
 * problem and -EBADMSG; nothing asserts or crashes on file contents.
 *
 * Ownership: struct eng_gguf owns the mapping and the tables. Every pointer it hands out (strings,
 * arrays, tensor data) points into the mapping or its tables and is valid until eng_gguf_close.
 * Strings are not NUL-terminated: use the length. Read-only after open: safe from any thread.
 */
#ifndef ENG_GGUF_H
#define ENG_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kernels/quant.h"

#define ENG_GGUF_MAGIC 0x46554747u
#define ENG_GGUF_MAX_DIMS 4
#define ENG_GGUF_ERR_LEN 256

enum eng_gguf_vtype {
    ENG_GGUF_U8 = 0,
    ENG_GGUF_I8 = 1,
    ENG_GGUF_U16 = 2,
    ENG_GGUF_I16 = 3,
    ENG_GGUF_U32 = 4,
    ENG_GGUF_I32 = 5,
    ENG_GGUF_F32 = 6,
    ENG_GGUF_BOOL = 7,
    ENG_GGUF_STRING = 8,
    ENG_GGUF_ARRAY = 9,
    ENG_GGUF_U64 = 10,
    ENG_GGUF_I64 = 11,
    ENG_GGUF_F64 = 12,
};

struct eng_gguf_str {
    uint64_t len;
    const char *data; /* not NUL-terminated */
};

/* An array value. For numeric elements, data points at n packed little-endian elements (possibly
 * unaligned: read with memcpy or the accessors). For strings, strs holds the n strings. */
struct eng_gguf_arr {
    enum eng_gguf_vtype type;
    uint64_t n;
    const void *data;
    const struct eng_gguf_str *strs; /* type == ENG_GGUF_STRING only */
};

struct eng_gguf_kv {
    struct eng_gguf_str key;
    enum eng_gguf_vtype type;
    union {
        uint64_t u64; /* U8, U16, U32, U64, BOOL */
        int64_t i64;  /* I8, I16, I32, I64 */
        double f64;   /* F32, F64 */
        struct eng_gguf_str str;
        struct eng_gguf_arr arr;
    } v;
};

struct eng_gguf_tensor {
    struct eng_gguf_str name;
    uint32_t n_dims;
    uint64_t ne[ENG_GGUF_MAX_DIMS]; /* ne[0] is the row length (fastest); unused dims are 1 */
    enum kern_dtype type;
    uint64_t offset;  /* relative to the data section */
    uint64_t n_bytes; /* validated to lie inside the file */
    const void *data;
};

struct eng_gguf {
    uint32_t version;
    uint32_t alignment;
    uint64_t n_kv;
    struct eng_gguf_kv *kv;
    uint64_t n_tensors;
    struct eng_gguf_tensor *tensors;
    const uint8_t *base; /* start of the file */
    size_t size;
    /* private */
    void *map;
    void *priv;
};

/*
 * Opens and validates path. On success *out owns the mapping. On failure returns a negative errno
 * (-ENOENT, -EACCES, ... from open/mmap; -EBADMSG for an invalid file; -ENOMEM) and, when err is
 * not NULL, writes a one-line message naming the problem (e.g. "bad GGUF file: tensor
 * 'blk.3.attn_q.weight' data [offset 123456, 73728 bytes] runs past the end of the file (98000
 * bytes, data section at byte 6112)"; OS errors: "cannot open PATH: No such file or directory").
 * Names from the file are quoted with non-printable bytes escaped and cut after 64 characters.
 */
int eng_gguf_open(const char *path, struct eng_gguf **out, char *err, size_t err_len);

/* Validates a file image already in memory (the fuzzer's entry point). buf is borrowed and must
 * outlive the result. Same return values as eng_gguf_open. */
int eng_gguf_parse(const void *buf, size_t len, struct eng_gguf **out, char *err, size_t err_len);

/* Unmaps and frees. NULL is a no-op. */
void eng_gguf_close(struct eng_gguf *g);

/* ---- Lookups: NULL / -ENOENT when absent ---- */

const struct eng_gguf_kv *eng_gguf_find(const struct eng_gguf *g, const char *key);
const struct eng_gguf_tensor *eng_gguf_find_tensor(const struct eng_gguf *g, const char *name);

/* Typed getters. Integers of any width and signedness convert when the value fits; a value of
 * another type or out of range is -EBADMSG. Missing key: -ENOENT. *out is written on success only.
 * get_f32 takes F32/F64 (finite values beyond float range: -EBADMSG) and also any integer. */
int eng_gguf_get_u32(const struct eng_gguf *g, const char *key, uint32_t *out);
int eng_gguf_get_i64(const struct eng_gguf *g, const char *key, int64_t *out);
int eng_gguf_get_f32(const struct eng_gguf *g, const char *key, float *out);
int eng_gguf_get_bool(const struct eng_gguf *g, const char *key, bool *out);
int eng_gguf_get_str(const struct eng_gguf *g, const char *key, struct eng_gguf_str *out);
int eng_gguf_get_arr(const struct eng_gguf *g, const char *key, struct eng_gguf_arr *out);

/* Element i of a numeric array as i64 (integer and bool arrays; u64 above INT64_MAX clamps) / f32
 * (float and integer arrays). An index out of range or an array of another type gives 0. */
int64_t eng_gguf_arr_i64(const struct eng_gguf_arr *a, uint64_t i);
float eng_gguf_arr_f32(const struct eng_gguf_arr *a, uint64_t i);

/* Compares a GGUF string with a C string. */
bool eng_gguf_str_eq(struct eng_gguf_str s, const char *c);

const char *eng_gguf_vtype_name(enum eng_gguf_vtype t);

/* Prints the header, every key/value (arrays abbreviated to their first elements) and the tensor
 * table (name, type, shape, offset, bytes) to f. Used by `llm-run --inspect`. */
void eng_gguf_print(const struct eng_gguf *g, FILE *f);

/* Testing only (fault injection): the nth allocation made by this module from now on fails
 * (n = 1: the next one); 0 disables. Not thread-safe. */
void eng_gguf_test_fail_alloc(long n);

#endif

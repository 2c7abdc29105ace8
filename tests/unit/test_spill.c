/*
 * Unit tests for spill/: the file format round trip, detection of every truncation and every
 * single-bit flip, fault injection over
 * every I/O call of a spill and a restore (fail the Nth call with ENOSPC or EIO, or make it short,
 * for every N: a clean error, no temp or final file left, no descriptor leaked, and a good file
 * still written and read afterwards), the budget and the start-up removal of stale files. Files go
 * to a fresh directory under /tmp per test.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "spill/spill.h"

#define N_LAYER 2
#define KV_DIM 8
#define BLOCK 16
#define N_POS 40 /* 3 blocks, the last one partly used */
#define N_BLOCKS 3
#define BLOCK_FLOATS (N_LAYER * BLOCK * KV_DIM)

/* ---- Fixtures ---- */

/* The posix ops with fsync and directory fsync as no-ops: the fault layer still counts and fails
 * those calls, and the hundreds of files the fault loops write do not wait for the disk
 * (test_spill_round_trip runs the real ones). */
static int
nop_fsync(void *ctx, int fd)
{
    (void)ctx;
    (void)fd;
    return 0;
}

static int
nop_fsync_dir(void *ctx, const char *d)
{
    (void)ctx;
    (void)d;
    return 0;
}

static struct spill_io_ops fast_ops;

static const struct spill_io_ops *
fast(void)
{
    fast_ops = *spill_io_posix();
    fast_ops.fsync = nop_fsync;
    fast_ops.fsync_dir = nop_fsync_dir;
    return &fast_ops;
}

struct fake_kv {
    float k[N_BLOCKS][BLOCK_FLOATS];
    float v[N_BLOCKS][BLOCK_FLOATS];
};

static void *
fake_block(void *ctx, int kind, int i)
{
    struct fake_kv *f = ctx;
    if (i < 0 || i >= N_BLOCKS)
        return NULL;
    return kind == 0 ? (void *)f->k[i] : (void *)f->v[i];
}

static void
fake_fill(struct fake_kv *f, uint32_t seed)
{
    for (int b = 0; b < N_BLOCKS; b++)
        for (int j = 0; j < BLOCK_FLOATS; j++) {
            seed = seed * 1664525u + 1013904223u;
            f->k[b][j] = (float)(int32_t)seed / 65536.0f;
            seed = seed * 1664525u + 1013904223u;
            f->v[b][j] = (float)(int32_t)seed / 65536.0f;
        }
}

static const int32_t tokens[] = {1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233};
static const struct spill_bias biases[] = {{7, -1.5f}, {9, 2.25f}};
static const int32_t stops[] = {4, 6};

static struct spill_kv_shape
shape(void)
{
    return (struct spill_kv_shape){SPILL_KV_F32, N_LAYER, KV_DIM, BLOCK, N_POS};
}

static struct spill_state
state(uint64_t key)
{
    struct spill_state st = {
        .req_id = 1000 + key,
        .key = key,
        .rng = {0x1111, 0x2222, 0x3333, 0x4444},
        .sampling = {0.7f, 40, 0.9f, 0.05f, 1.1f, 64, 0.25f, -0.5f, 42, 3},
        .max_tokens = 100,
        .logprobs = 1,
        .token_loop = 4,
        .priority = -2,
        .n_prompt = 8,
        .n_generated = 4,
        .tokens = tokens,
        .n_logit_bias = 2,
        .logit_bias = biases,
        .n_stop = 2,
        .stop = stops,
        .kv = shape(),
    };
    return st;
}

static struct spill_expect
expect(void)
{
    return (struct spill_expect){shape(), 64, 64}; /* n_positions exactly N_POS */
}

static char dir[64];

static int
setup(void **state_)
{
    (void)state_;
    snprintf(dir, sizeof(dir), "/tmp/test_spill.XXXXXX");
    assert_non_null(mkdtemp(dir));
    return 0;
}

static int
count_entries(const char *d)
{
    DIR *dp = opendir(d);
    if (!dp)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dp)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    closedir(dp);
    return n;
}

static int
teardown(void **state_)
{
    (void)state_;
    DIR *dp = opendir(dir);
    if (dp) {
        struct dirent *e;
        char p[512];
        while ((e = readdir(dp)) != NULL) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
            unlink(p);
        }
        closedir(dp);
    }
    rmdir(dir);
    return 0;
}

static int
count_fds(void)
{
    return count_entries("/proc/self/fd");
}

static void
file_path(char *buf, size_t n, uint64_t key)
{
    snprintf(buf, n, "%s/spill-%ld-%llu.kv", dir, (long)getpid(), (unsigned long long)key);
}

static uint8_t *
slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)len + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    *n = (size_t)len;
    return b;
}

static void
spew(const char *path, const uint8_t *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (n)
        assert_int_equal(fwrite(b, 1, n, f), n);
    fclose(f);
}

/* Reads key back and checks state and blocks against what was written. */
static void
check_read(struct spill_store *s, uint64_t key, const struct fake_kv *want)
{
    struct fake_kv *got = calloc(1, sizeof(*got));
    struct spill_kv_io io = {got, fake_block};
    struct spill_expect e = expect();
    struct spill_state *st = NULL;
    assert_int_equal(spill_read(s, key, &e, &io, &st), 0);
    struct spill_state w = state(key);
    assert_int_equal(st->req_id, w.req_id);
    assert_int_equal(st->key, key);
    assert_memory_equal(st->rng, w.rng, sizeof(w.rng));
    assert_true(st->sampling.temperature == w.sampling.temperature);
    assert_int_equal(st->sampling.top_k, w.sampling.top_k);
    assert_true(st->sampling.top_p == w.sampling.top_p);
    assert_true(st->sampling.min_p == w.sampling.min_p);
    assert_true(st->sampling.repetition_penalty == w.sampling.repetition_penalty);
    assert_int_equal(st->sampling.repeat_last_n, w.sampling.repeat_last_n);
    assert_true(st->sampling.presence_penalty == w.sampling.presence_penalty);
    assert_true(st->sampling.frequency_penalty == w.sampling.frequency_penalty);
    assert_int_equal(st->sampling.seed, w.sampling.seed);
    assert_int_equal(st->sampling.top_logprobs, w.sampling.top_logprobs);
    assert_int_equal(st->max_tokens, 100);
    assert_int_equal(st->logprobs, 1);
    assert_int_equal(st->token_loop, 4);
    assert_int_equal(st->priority, -2);
    assert_int_equal(st->n_prompt, 8);
    assert_int_equal(st->n_generated, 4);
    assert_memory_equal(st->tokens, tokens, sizeof(tokens));
    assert_int_equal(st->n_logit_bias, 2);
    assert_memory_equal(st->logit_bias, biases, sizeof(biases));
    assert_int_equal(st->n_stop, 2);
    assert_memory_equal(st->stop, stops, sizeof(stops));
    assert_memory_equal(&st->kv, &w.kv, sizeof(w.kv));
    assert_memory_equal(got, want, sizeof(*got));
    spill_state_free(st);
    free(got);
}

/* ---- Tests ---- */

static void
test_spill_crc32c(void **state_)
{
    (void)state_;
    assert_int_equal(spill_crc32c(0, "123456789", 9), 0xe3069283u);
    assert_int_equal(spill_crc32c_sw(0, "123456789", 9), 0xe3069283u);
    uint8_t buf[1031];
    for (size_t i = 0; i < sizeof(buf); i++)
        buf[i] = (uint8_t)(i * 131 + 7);
    for (size_t off = 0; off < 9; off++)
        for (size_t n = 0; n + off <= sizeof(buf); n += 37) {
            assert_int_equal(spill_crc32c(0, buf + off, n), spill_crc32c_sw(0, buf + off, n));
            /* Incremental equals one-shot. */
            uint32_t c = spill_crc32c(0, buf + off, n / 3);
            c = spill_crc32c(c, buf + off + n / 3, n - n / 3);
            assert_int_equal(c, spill_crc32c_sw(0, buf + off, n));
        }
}

static void
test_spill_round_trip(void **state_)
{
    (void)state_;
    struct spill_store *s = NULL;
    struct fake_kv *kv = calloc(1, sizeof(*kv));
    fake_fill(kv, 1);
    struct spill_kv_io io = {kv, fake_block};
    assert_int_equal(spill_store_open(dir, 0, 0xabcdef, NULL, &s), 0);
    struct spill_state st = state(7);
    assert_int_equal(spill_write(s, &st, &io), 0);
    assert_int_equal(spill_write(s, &st, &io), -EEXIST);
    assert_int_equal(spill_store_n_files(s), 1);
    assert_int_equal(spill_store_bytes(s), spill_file_bytes(&st));
    assert_int_equal(spill_file_bytes(&st), SPILL_FIXED_BYTES + 4 * 12 + 8 * 2 + 4 * 2 +
                                                2 * N_BLOCKS * BLOCK_FLOATS * 4 + 4);
    char p[256];
    file_path(p, sizeof(p), 7);
    struct stat sb;
    assert_int_equal(stat(p, &sb), 0);
    assert_int_equal((uint64_t)sb.st_size, spill_file_bytes(&st));
    assert_int_equal(count_entries(dir), 1); /* no temp file */
    check_read(s, 7, kv);
    check_read(s, 7, kv); /* reading does not consume */
    /* A shape the caller does not expect. */
    struct spill_expect e = expect();
    e.kv.kv_dim = KV_DIM * 2;
    struct spill_state *out = NULL;
    assert_int_equal(spill_read(s, 7, &e, NULL, &out), -EBADMSG);
    e = expect();
    e.max_positions = N_POS - 1;
    e.kv.n_positions = 0;
    assert_int_equal(spill_read(s, 7, &e, NULL, &out), -EBADMSG);
    e = expect();
    e.kv.n_positions = N_POS - 1;
    assert_int_equal(spill_read(s, 7, &e, NULL, &out), -EBADMSG);
    assert_null(out);
    /* kv NULL: validated and discarded. */
    e = expect();
    assert_int_equal(spill_read(s, 7, &e, NULL, &out), 0);
    spill_state_free(out);
    assert_int_equal(spill_read(s, 8, &e, NULL, &out), -ENOENT);
    assert_int_equal(spill_remove(s, 7), 0);
    assert_int_equal(spill_remove(s, 7), -ENOENT);
    assert_int_equal(spill_store_n_files(s), 0);
    assert_int_equal(spill_store_bytes(s), 0);
    assert_int_equal(count_entries(dir), 0);
    /* Close removes what the store still holds. */
    assert_int_equal(spill_write(s, &st, &io), 0);
    spill_store_close(s);
    assert_int_equal(count_entries(dir), 0);
    free(kv);
}

static void
test_spill_rejects_bad_state(void **state_)
{
    (void)state_;
    struct spill_store *s = NULL;
    struct fake_kv *kv = calloc(1, sizeof(*kv));
    struct spill_kv_io io = {kv, fake_block};
    assert_int_equal(spill_store_open(dir, 0, 1, NULL, &s), 0);
    struct spill_state st = state(1);
    st.kv.dtype = 9;
    assert_int_equal(spill_write(s, &st, &io), -EINVAL);
    st = state(1);
    st.kv.n_positions = 0;
    assert_int_equal(spill_write(s, &st, &io), -EINVAL);
    st = state(1);
    st.n_stop = -1;
    assert_int_equal(spill_write(s, &st, &io), -EINVAL);
    st = state(1);
    st.kv.n_positions = N_POS + BLOCK; /* a 4th block the source does not have */
    assert_int_equal(spill_write(s, &st, &io), -EINVAL);
    assert_int_equal(count_entries(dir), 0);
    spill_store_close(s);
    free(kv);
}

static void
test_spill_truncated_every_length(void **state_)
{
    (void)state_;
    struct spill_store *s = NULL;
    struct fake_kv *kv = calloc(1, sizeof(*kv));
    fake_fill(kv, 2);
    struct spill_kv_io io = {kv, fake_block};
    assert_int_equal(spill_store_open(dir, 0, 5, NULL, &s), 0);
    struct spill_state st = state(3);
    assert_int_equal(spill_write(s, &st, &io), 0);
    char p[256];
    file_path(p, sizeof(p), 3);
    size_t n = 0;
    uint8_t *good = slurp(p, &n);
    struct spill_expect e = expect();
    struct fake_kv *dst = calloc(1, sizeof(*dst));
    struct spill_kv_io dio = {dst, fake_block};
    /* Shrink and regrow in place: truncating to zero and rewriting makes ext4 flush on close. */
    int fd = open(p, O_RDWR);
    assert_true(fd >= 0);
    for (size_t len = n; len-- > 0;) {
        assert_int_equal(ftruncate(fd, (off_t)len), 0);
        struct spill_state *out = NULL;
        assert_int_equal(spill_read(s, 3, &e, &dio, &out), -EBADMSG);
        assert_null(out);
    }
    assert_int_equal(pwrite(fd, good, n, 0), (ssize_t)n);
    close(fd);
    check_read(s, 3, kv);
    /* Trailing bytes are as bad as missing ones. */
    good[n] = 0;
    spew(p, good, n + 1);
    struct spill_state *out = NULL;
    assert_int_equal(spill_read(s, 3, &e, &dio, &out), -EBADMSG);
    spew(p, good, n);
    check_read(s, 3, kv);
    spill_store_close(s);
    free(good);
    free(kv);
    free(dst);
}

static void
test_spill_bit_flip_every_bit(void **state_)
{
    (void)state_;
    struct spill_store *s = NULL;
    struct fake_kv *kv = calloc(1, sizeof(*kv));
    fake_fill(kv, 3);
    struct spill_kv_io io = {kv, fake_block};
    assert_int_equal(spill_store_open(dir, 0, 5, NULL, &s), 0);
    struct spill_state st = state(4);
    assert_int_equal(spill_write(s, &st, &io), 0);
    char p[256];
    file_path(p, sizeof(p), 4);
    size_t n = 0;
    uint8_t *good = slurp(p, &n);
    struct spill_expect e = expect();
    struct fake_kv *dst = calloc(1, sizeof(*dst));
    struct spill_kv_io dio = {dst, fake_block};
    int fd = open(p, O_WRONLY);
    assert_true(fd >= 0);
    for (size_t i = 0; i < n; i++)
        for (int bit = 0; bit < 8; bit++) {
            uint8_t b = good[i] ^ (uint8_t)(1u << bit);
            assert_int_equal(pwrite(fd, &b, 1, (off_t)i), 1);
            struct spill_state *out = NULL;
            int rc = spill_read(s, 4, &e, &dio, &out);
            if (rc != -EBADMSG)
                fail_msg("flip of byte %zu bit %d not detected: rc=%d", i, bit, rc);
            assert_int_equal(pwrite(fd, &good[i], 1, (off_t)i), 1);
        }
    close(fd);
    check_read(s, 4, kv);
    spill_store_close(s);
    free(good);
    free(kv);
    free(dst);
}

/* One spill_write under a fault; returns the rc and checks the invariants of a failure. */
static int
faulty_write(struct spill_store *s, struct spill_fault *f, uint64_t key, const struct fake_kv *kv)
{
    struct spill_kv_io io = {(void *)kv, fake_block};
    struct spill_state st = state(key);
    int fds = count_fds();
    int files = spill_store_n_files(s);
    int rc = spill_write(s, &st, &io);
    assert_int_equal(count_fds(), fds);
    if (rc < 0) {
        assert_int_equal(spill_store_n_files(s), files);
        assert_int_equal(count_entries(dir), files); /* neither temp nor final left */
    } else {
        assert_int_equal(spill_store_n_files(s), files + 1);
    }
    (void)f;
    return rc;
}

static void
test_spill_write_faults_every_call(void **state_)
{
    (void)state_;
    static const enum spill_op ops[] = {SPILL_OP_OPEN,  SPILL_OP_WRITE,  SPILL_OP_FSYNC,
                                        SPILL_OP_CLOSE, SPILL_OP_RENAME, SPILL_OP_FSYNC_DIR,
                                        SPILL_OP_ANY};
    static const int errs[] = {ENOSPC, EIO};
    struct fake_kv *kv = calloc(1, sizeof(*kv));
    fake_fill(kv, 4);
    struct spill_fault f;
    spill_fault_init(&f, fast(), SPILL_OP_WRITE, 0, 0, false, false);
    struct spill_store *s = NULL;
    assert_int_equal(spill_store_open(dir, 0, 9, &f.ops, &s), 0);
    int n_cases = 0;
    for (size_t o = 0; o < sizeof(ops) / sizeof(ops[0]); o++)
        for (size_t e = 0; e < 2; e++)
            for (int sticky = 0; sticky < (ops[o] == SPILL_OP_ANY ? 1 : 2); sticky++)
                for (long n = 1;; n++) {
                    spill_fault_init(&f, fast(), ops[o], n, errs[e], sticky, false);
                    int rc = faulty_write(s, &f, 11, kv);
                    if (f.n_injected == 0) {
                        assert_int_equal(rc, 0); /* N past the last call: done */
                        f.fail_at = 0;
                        assert_int_equal(spill_remove(s, 11), 0);
                        break;
                    }
                    n_cases++;
                    /* unlink is never failed here (ANY is not sticky), so the clean-up succeeds. */
                    if (rc != -errs[e])
                        fail_msg("op %s call %ld err %d: rc=%d", spill_op_name(ops[o]), n, errs[e],
                                 rc);
                    /* Afterwards a good file is written and read back. */
                    f.fail_at = 0;
                    assert_int_equal(faulty_write(s, &f, 12, kv), 0);
                    check_read(s, 12, kv);
                    assert_int_equal(spill_remove(s, 12), 0);
                }
    assert_true(n_cases > 20);
    spill_store_close(s);
    assert_int_equal(count_entries(dir), 0);
    free(kv);
}

static void
test_spill_short_writes(void **state_)
{
    (void)state_;
    struct fake_kv *kv = calloc(1, sizeof(*kv));
    fake_fill(kv, 5);
    struct spill_fault f;
    spill_fault_init(&f, fast(), SPILL_OP_WRITE, 0, 0, false, false);
    struct spill_store *s = NULL;
    assert_int_equal(spill_store_open(dir, 0, 9, &f.ops, &s), 0);
    for (int sticky = 0; sticky < 2; sticky++)
        for (long n = 1;; n++) {
            /* A short write is not an error: the writer goes on and the file is whole. */
            spill_fault_init(&f, fast(), SPILL_OP_WRITE, n, EIO, sticky, true);
            assert_int_equal(faulty_write(s, &f, 21, kv), 0);
            long injected = f.n_injected;
            f.fail_at = 0;
            f.n_injected = injected;
            check_read(s, 21, kv);
            assert_int_equal(spill_remove(s, 21), 0);
            if (f.n_injected == 0)
                break;
        }
    /* A short write followed by a full disk: the clean error. */
    for (long n = 1; n < 8; n++) {
        struct spill_fault g;
        spill_fault_init(&g, fast(), SPILL_OP_WRITE, n, ENOSPC, false, true);
        spill_fault_init(&f, &g.ops, SPILL_OP_WRITE, n + 1, ENOSPC, true, false);
        assert_int_equal(faulty_write(s, &f, 22, kv), -ENOSPC);
    }
    spill_store_close(s);
    free(kv);
}

static void
test_spill_read_faults_every_call(void **state_)
{
    (void)state_;
    static const enum spill_op ops[] = {SPILL_OP_OPEN, SPILL_OP_READ, SPILL_OP_CLOSE};
    static const int errs[] = {ENOSPC, EIO};
    struct fake_kv *kv = calloc(1, sizeof(*kv));
    fake_fill(kv, 6);
    struct fake_kv *dst = calloc(1, sizeof(*dst));
    struct spill_kv_io dio = {dst, fake_block};
    struct spill_fault f;
    spill_fault_init(&f, fast(), SPILL_OP_READ, 0, 0, false, false);
    struct spill_store *s = NULL;
    assert_int_equal(spill_store_open(dir, 0, 9, &f.ops, &s), 0);
    assert_int_equal(faulty_write(s, &f, 31, kv), 0);
    struct spill_expect e = expect();
    int n_cases = 0;
    for (size_t o = 0; o < sizeof(ops) / sizeof(ops[0]); o++)
        for (size_t k = 0; k < 2; k++)
            for (long n = 1;; n++) {
                spill_fault_init(&f, fast(), ops[o], n, errs[k], false, false);
                int fds = count_fds();
                struct spill_state *out = NULL;
                int rc = spill_read(s, 31, &e, &dio, &out);
                assert_int_equal(count_fds(), fds);
                if (f.n_injected == 0) {
                    assert_int_equal(rc, 0);
                    spill_state_free(out);
                    break;
                }
                n_cases++;
                /* A failed close after a complete read loses nothing. */
                if (ops[o] == SPILL_OP_CLOSE) {
                    assert_int_equal(rc, 0);
                    spill_state_free(out);
                    continue;
                }
                assert_int_equal(rc, -errs[k]);
                assert_null(out);
                f.fail_at = 0;
                check_read(s, 31, kv); /* the file is still good */
            }
    assert_true(n_cases > 10);
    spill_store_close(s);
    free(kv);
    free(dst);
}

static void
test_spill_budget(void **state_)
{
    (void)state_;
    struct fake_kv *kv = calloc(1, sizeof(*kv));
    struct spill_kv_io io = {kv, fake_block};
    struct spill_state st = state(1);
    uint64_t one = spill_file_bytes(&st);
    struct spill_store *s = NULL;
    assert_int_equal(spill_store_open(dir, 2 * one + one / 2, 9, NULL, &s), 0);
    assert_int_equal(spill_write(s, &st, &io), 0);
    st.key = 2;
    assert_int_equal(spill_write(s, &st, &io), 0);
    st.key = 3;
    assert_int_equal(spill_write(s, &st, &io), -EDQUOT);
    assert_int_equal(count_entries(dir), 2);
    assert_int_equal(spill_remove(s, 1), 0);
    assert_int_equal(spill_write(s, &st, &io), 0);
    assert_int_equal(spill_store_bytes(s), 2 * one);
    spill_store_close(s);
    assert_int_equal(count_entries(dir), 0);
    free(kv);
}

static int
alive_4242(void *ctx, long pid)
{
    (void)ctx;
    return pid == 4242;
}

static void
touch(const char *name, const uint8_t *b, size_t n)
{
    char p[512];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    spew(p, b, n);
}

static void
test_spill_stale_files_removed(void **state_)
{
    (void)state_;
    /* A real file of "this" pid's previous life, to have a valid header among the stale ones. */
    struct fake_kv *kv = calloc(1, sizeof(*kv));
    struct spill_kv_io io = {kv, fake_block};
    struct spill_store *s = NULL;
    assert_int_equal(spill_store_open(dir, 0, 9, NULL, &s), 0);
    struct spill_state st = state(5);
    assert_int_equal(spill_write(s, &st, &io), 0);
    char p[256];
    file_path(p, sizeof(p), 5);
    size_t n = 0;
    uint8_t *good = slurp(p, &n);
    spill_store_close(s);
    touch("spill-1234-5.kv", good, n);
    touch("spill-1234-6.kv.tmp", good, 100);
    touch("spill-4242-7.kv", good, n); /* a live engine's */
    touch("other.txt", good, 3);
    touch("spill-1234-8.kvx", good, 3); /* not ours */
    char own[64];
    snprintf(own, sizeof(own), "spill-%ld-9.kv", (long)getpid());
    touch(own, (const uint8_t *)"junk", 4);
    struct spill_io_ops ops = *spill_io_posix();
    ops.pid_alive = alive_4242;
    assert_int_equal(spill_store_open(dir, 0, 9, &ops, &s), 0);
    assert_int_equal(spill_store_n_stale(s), 3);
    assert_int_equal(count_entries(dir), 3);
    struct stat sb;
    snprintf(p, sizeof(p), "%s/spill-4242-7.kv", dir);
    assert_int_equal(stat(p, &sb), 0);
    spill_store_close(s);
    assert_int_equal(count_entries(dir), 3); /* close touches only its own files */
    /* A missing parent is an error, not a crash. */
    assert_int_equal(spill_store_open("/nonexistent-dir/x/y", 0, 9, NULL, &s), -ENOENT);
    /* A list failure too. */
    struct spill_fault f;
    spill_fault_init(&f, fast(), SPILL_OP_LIST, 1, EIO, false, false);
    assert_int_equal(spill_store_open(dir, 0, 9, &f.ops, &s), -EIO);
    free(good);
    free(kv);
}

static void
test_spill_fault_parse(void **state_)
{
    (void)state_;
    struct spill_fault f;
    assert_int_equal(spill_fault_parse(&f, NULL, "write:3:ENOSPC"), 0);
    assert_int_equal(f.op, SPILL_OP_WRITE);
    assert_int_equal(f.fail_at, 3);
    assert_int_equal(f.err, ENOSPC);
    assert_false(f.sticky);
    assert_int_equal(spill_fault_parse(&f, NULL, "read:1:EIO:sticky"), 0);
    assert_int_equal(f.op, SPILL_OP_READ);
    assert_true(f.sticky);
    assert_int_equal(spill_fault_parse(&f, NULL, "any:2:5:short"), 0);
    assert_int_equal(f.op, SPILL_OP_ANY);
    assert_int_equal(f.err, 5);
    assert_true(f.short_write);
    const char *bad[] = {"",
                         "write",
                         "write:0:EIO",
                         "wrote:1:EIO",
                         "write:1:EBOGUS",
                         "write:1:EIO:often",
                         "write:1:EIO:sticky:x",
                         "write:x:EIO"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(spill_fault_parse(&f, NULL, bad[i]), -EINVAL);
}

int
main(void)
{
    cm_log_set_level(CM_LOG_OFF);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spill_crc32c),
        cmocka_unit_test_setup_teardown(test_spill_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_spill_rejects_bad_state, setup, teardown),
        cmocka_unit_test_setup_teardown(test_spill_truncated_every_length, setup, teardown),
        cmocka_unit_test_setup_teardown(test_spill_bit_flip_every_bit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_spill_write_faults_every_call, setup, teardown),
        cmocka_unit_test_setup_teardown(test_spill_short_writes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_spill_read_faults_every_call, setup, teardown),
        cmocka_unit_test_setup_teardown(test_spill_budget, setup, teardown),
        cmocka_unit_test_setup_teardown(test_spill_stale_files_removed, setup, teardown),
        cmocka_unit_test(test_spill_fault_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

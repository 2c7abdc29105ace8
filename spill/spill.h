/*
 * spill: one sequence's state on disk, so that the scheduler can free its KV blocks under memory
 * pressure and bring it back later, bit for bit.
 *
 * A struct spill_store owns one spill directory (--spill-dir) for one engine process: it writes,
 * reads and removes the files of that process, keeps their byte count against a budget
 * (--spill-max-mb) and, when opened, removes the stale files an earlier (dead) engine left there.
 * Every file operation goes through a struct spill_io_ops, the seam where tests (and the engine's
 * hidden fault flag) inject ENOSPC, EIO and short writes. The module knows nothing of the engine:
 * the caller describes the state (struct spill_state) and hands out its KV blocks through a
 * callback (struct spill_kv_io).
 *
 * Names: a file is DIR/spill-PID-KEY.kv, written first as DIR/spill-PID-KEY.kv.tmp and renamed
 * once complete and fsynced (then the directory is fsynced), so a half-written file never carries
 * the final name. PID is the writing process, KEY the caller's key (the scheduler's sequence id).
 * At spill_store_open, files of either form whose PID is not a live process (or is this process:
 * a previous holder of the pid is dead) are logged and removed; files of other live engines
 * sharing the directory are left alone.
 *
 * File format, version 1. All integers little-endian, floats IEEE-754 binary32 bit patterns;
 * i32/u32/u64/f32 as named. Fixed header (SPILL_FIXED_BYTES = 168 bytes):
 *   off size
 *     0   8  magic "LLMSPILL"
 *     8   4  u32 version (1)
 *    12   4  u32 header_bytes: fixed header + variable part (where the K data starts)
 *    16   8  u64 model fingerprint (the engine's hash of the GGUF's metadata and tensor table)
 *    24   8  u64 request id (the wire id)
 *    32   8  u64 key (the scheduler's sequence id; must match the name)
 *    40  32  u64 rng[4] (the sampler's xoshiro256** state)
 *    72   4  f32 temperature        76  4 i32 top_k          80  4 f32 top_p
 *    84   4  f32 min_p              88  4 f32 repetition_penalty
 *    92   4  i32 repeat_last_n      96  4 f32 presence_penalty
 *   100   4  f32 frequency_penalty 104  8 u64 seed          112  4 i32 top_logprobs
 *   116   4  i32 max_tokens        120  4 i32 logprobs (0/1) 124  4 i32 token_loop
 *   128   4  i32 priority          132  4 i32 n_prompt      136  4 i32 n_generated
 *   140   4  i32 n_logit_bias      144  4 i32 n_stop
 *   148   4  u32 kv dtype (SPILL_KV_F32)
 *   152   4  i32 n_layer           156  4 i32 kv_dim         160  4 i32 block_tokens
 *   164   4  i32 n_positions (KV positions held; n_blocks = ceil(n_positions / block_tokens))
 * Variable part: i32 tokens[n_prompt + n_generated] (prompt, then generated), then
 * (i32 id, f32 bias)[n_logit_bias], then i32 stop[n_stop].
 * Then K: for each block i in 0..n_blocks-1, block_bytes = n_layer * block_tokens * kv_dim *
 * dtype_size bytes laid out (n_layer, block_tokens, kv_dim); then V likewise. Rows past
 * n_positions in the last block are whatever the cache held (never read before written).
 * Then u32 CRC32C (Castagnoli, reflected, init and xorout 0xffffffff) of every byte before it.
 * Nothing follows.
 *
 * Threads: a store is used by one thread at a time (the engine loop). Not async: spill_write and
 * spill_read block on the disk.
 */
#ifndef SPILL_H
#define SPILL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define SPILL_MAGIC "LLMSPILL"
#define SPILL_VERSION 1u
#define SPILL_FIXED_BYTES 168u
#define SPILL_KV_F32 0u

/* ---- The I/O seam ---- */

/* Every call returns >= 0 on success or a negative errno. open returns a descriptor; write and
 * read return the byte count (a short count is legal; read returns 0 at end of file); list calls
 * fn(arg, name) for each entry of dir (stopping when fn returns non-zero, whose value it returns);
 * pid_alive returns 1 when process pid exists, 0 when not. ctx is borrowed. */
struct spill_io_ops {
    void *ctx;
    int (*open)(void *ctx, const char *path, int flags, mode_t mode);
    ssize_t (*write)(void *ctx, int fd, const void *buf, size_t n);
    ssize_t (*read)(void *ctx, int fd, void *buf, size_t n);
    int (*fsync)(void *ctx, int fd);
    int (*close)(void *ctx, int fd);
    int (*rename)(void *ctx, const char *from, const char *to);
    int (*unlink)(void *ctx, const char *path);
    int (*fsync_dir)(void *ctx, const char *dir);
    int (*mkdir)(void *ctx, const char *dir, mode_t mode);
    int (*list)(void *ctx, const char *dir, int (*fn)(void *arg, const char *name), void *arg);
    int (*pid_alive)(void *ctx, long pid);
};

/* The real thing (POSIX calls, EINTR retried). Static storage; thread-safe. */
const struct spill_io_ops *spill_io_posix(void);

/* Fault injection over another ops table (tests, and the engine's LLM_ENGINE_SPILL_FAULT): the
 * fail_at-th call (1-based, counted from spill_fault_init) of kind op, or of any kind with
 * SPILL_OP_ANY, fails with -err; with sticky, every later call of that kind fails too (a full
 * disk stays full). With short_write a failing write writes half its bytes (a one-byte write goes
 * through whole) and returns that count instead of failing (the next call runs normally unless
 * sticky). Give &f->ops to the store; f must outlive it. */
enum spill_op {
    SPILL_OP_OPEN,
    SPILL_OP_WRITE,
    SPILL_OP_READ,
    SPILL_OP_FSYNC,
    SPILL_OP_CLOSE,
    SPILL_OP_RENAME,
    SPILL_OP_UNLINK,
    SPILL_OP_FSYNC_DIR,
    SPILL_OP_MKDIR,
    SPILL_OP_LIST,
    SPILL_OP_COUNT,
    SPILL_OP_ANY = SPILL_OP_COUNT,
};

struct spill_fault {
    struct spill_io_ops ops; /* the faulty table */
    const struct spill_io_ops *base;
    enum spill_op op;
    long fail_at; /* 0: never */
    int err;      /* positive errno */
    bool sticky;
    bool short_write;
    long calls[SPILL_OP_COUNT + 1]; /* calls seen per kind; [SPILL_OP_ANY] all of them */
    long n_injected;
};

void spill_fault_init(struct spill_fault *f, const struct spill_io_ops *base, enum spill_op op,
                      long fail_at, int err, bool sticky, bool short_write);

/* Parses "OP:N:ERRNO[:sticky|:short]" (OP one of open write read fsync close rename unlink
 * fsync_dir mkdir list any; ERRNO a name such as ENOSPC or EIO, or a number) into f over base.
 * Returns 0 or -EINVAL. */
int spill_fault_parse(struct spill_fault *f, const struct spill_io_ops *base, const char *spec);

/* "open", "write", ... ("any" for SPILL_OP_ANY, "?" otherwise). */
const char *spill_op_name(enum spill_op op);

/* ---- State ---- */

struct spill_bias {
    int32_t id;
    float bias;
};

struct spill_sampling {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    float repetition_penalty;
    int32_t repeat_last_n;
    float presence_penalty;
    float frequency_penalty;
    uint64_t seed;
    int32_t top_logprobs;
};

struct spill_kv_shape {
    uint32_t dtype; /* SPILL_KV_F32 */
    int32_t n_layer;
    int32_t kv_dim;
    int32_t block_tokens;
    int32_t n_positions; /* positions held; the blocks are ceil(n_positions / block_tokens) */
};

/* What a file holds besides the KV data. From spill_read the arrays live in the same allocation
 * as the struct (free it with spill_state_free); for spill_write they are borrowed. */
struct spill_state {
    uint64_t req_id;
    uint64_t key;
    uint64_t rng[4];
    struct spill_sampling sampling;
    int32_t max_tokens;
    int32_t logprobs;
    int32_t token_loop;
    int32_t priority;
    int32_t n_prompt;
    int32_t n_generated;
    const int32_t *tokens; /* (n_prompt + n_generated) */
    int32_t n_logit_bias;
    const struct spill_bias *logit_bias; /* (n_logit_bias) */
    int32_t n_stop;
    const int32_t *stop; /* (n_stop) */
    struct spill_kv_shape kv;
};

void spill_state_free(struct spill_state *st);

/* The KV blocks: block(ctx, kind, i) is block i (0-based, in position order) of K (kind 0) or
 * V (kind 1), spill_block_bytes(shape) bytes. Read from by spill_write, written to by
 * spill_read. */
struct spill_kv_io {
    void *ctx;
    void *(*block)(void *ctx, int kind, int i);
};

static inline int
spill_n_blocks(const struct spill_kv_shape *kv)
{
    return kv->block_tokens > 0 ? (kv->n_positions + kv->block_tokens - 1) / kv->block_tokens : 0;
}

/* Bytes of one K (or V) block; 0 for an invalid shape. */
size_t spill_block_bytes(const struct spill_kv_shape *kv);

/* Bytes of the whole file for st; 0 when st is invalid. */
uint64_t spill_file_bytes(const struct spill_state *st);

/* ---- The store ---- */

struct spill_store;

/* Opens dir (created 0700 if missing, its parent must exist) for this process with a budget of
 * max_bytes (0: no limit) and the model fingerprint, through ops (borrowed, NULL: posix), and
 * removes stale files (see the top). Returns 0, -ENOMEM, or the negative errno of mkdir/list
 * (e.g. -ENOTDIR, -EACCES). */
int spill_store_open(const char *dir, uint64_t max_bytes, uint64_t fingerprint,
                     const struct spill_io_ops *ops, struct spill_store **out);

/* Removes the files this store still holds and frees it. NULL is a no-op. */
void spill_store_close(struct spill_store *s);

/* Writes st (st->key names the file) and the blocks of kv: temp file, write, fsync, close, rename,
 * directory fsync. Returns 0 and counts the file against the budget, or a negative errno with no
 * file (temp or final) left behind: -EDQUOT (the file would take the store over its budget;
 * nothing was touched), -EEXIST (the store already holds key), -EINVAL (a bad state), -ENOMEM,
 * or the I/O error (-ENOSPC, -EIO, ...; a write that makes no progress is -EIO). */
int spill_write(struct spill_store *s, const struct spill_state *st, const struct spill_kv_io *kv);

/* What spill_read accepts: the file's shape must equal kv, n_positions included when
 * kv.n_positions > 0 (else any of 1..max_positions); the tokens at most max_tokens_total. */
struct spill_expect {
    struct spill_kv_shape kv;
    int32_t max_positions;
    int32_t max_tokens_total;
};

/* Reads the file of key: validates magic, version, fingerprint, key, shape and counts before
 * reading on, streams the K and V data into kv's blocks (kv NULL: read and discard), then checks
 * the CRC and that nothing follows. Returns 0 and *out (caller frees with spill_state_free), or
 * -EBADMSG (a bad, truncated or corrupt file: the blocks handed out may hold garbage), -ENOENT
 * (the store holds no such key), -ENOMEM, or the I/O error. Does not remove the file. */
int spill_read(struct spill_store *s, uint64_t key, const struct spill_expect *exp,
               const struct spill_kv_io *kv, struct spill_state **out);

/* Removes the file of key and its budget share. Returns 0, -ENOENT (not held) or the unlink
 * error (the store forgets the file anyway). */
int spill_remove(struct spill_store *s, uint64_t key);

/* Files held and their bytes. */
int spill_store_n_files(const struct spill_store *s);
uint64_t spill_store_bytes(const struct spill_store *s);
/* Stale files removed at open. */
int spill_store_n_stale(const struct spill_store *s);

/* ---- Checksums ---- */

/* CRC32C update: crc = spill_crc32c(crc, p, n), starting from 0 (the init/xorout are inside). Uses
 * SSE4.2 when the CPU has it. spill_crc32c_sw is the table version, for tests. */
uint32_t spill_crc32c(uint32_t crc, const void *p, size_t n);
uint32_t spill_crc32c_sw(uint32_t crc, const void *p, size_t n);

/* FNV-1a 64 update (h = 0 starts a new hash), for model fingerprints. */
uint64_t spill_hash64(uint64_t h, const void *p, size_t n);

#endif

/*
 * tokenizer_spm: SentencePiece BPE (tokenizer.ggml.model = "llama").
 *
 * The text (with a space prepended when the caller asks) has its spaces replaced by U+2581 and is
 * cut into characters (an invalid UTF-8 byte is a character of its own). Then, repeatedly, the
 * adjacent pair whose concatenation is the vocabulary piece with the highest score is merged (the
 * leftmost on a tie). A final symbol that is not a piece falls back to its bytes as <0xXX> tokens.
 * Only normal and user-defined pieces take part: control, unknown, unused and byte tokens are never
 * produced from text (as in SentencePiece itself).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer_int.h"

#define SPM_SPACE "\xe2\x96\x81" /* U+2581 LOWER ONE EIGHTH BLOCK */

int
tok_spm_init(struct eng_tok *t)
{
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof(name), "<0x%02X>", b);
        int32_t id = tok_text_find(t, name, 6);
        t->byte_tok[b] = id >= 0 && t->type[id] == TOK_TYPE_BYTE ? id : -1;
    }
    return 0;
}

size_t
tok_spm_decode_text(const char *text, size_t len, char *dst)
{
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        if (i + 3 <= len && memcmp(text + i, SPM_SPACE, 3) == 0) {
            dst[o++] = ' ';
            i += 3;
        } else {
            dst[o++] = text[i++];
        }
    }
    return o;
}

struct spm_sym {
    uint32_t start, len; /* bytes of the escaped text; len 0 once merged into its left neighbour */
    int32_t prev, next;
};

struct spm_cand {
    float score;
    int32_t left, right;
    uint32_t len; /* the two symbols' combined length when queued */
};

struct spm_ctx {
    const struct eng_tok *t;
    const char *text; /* the escaped text */
    struct spm_sym *sym;
    struct spm_cand *heap; /* a binary max-heap by (score, then leftmost) */
    size_t n_heap, heap_cap;
};

static bool
cand_before(const struct spm_cand *a, const struct spm_cand *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static int32_t
usable_piece(const struct eng_tok *t, const char *s, size_t len)
{
    int32_t id = tok_text_find(t, s, len);
    return id >= 0 && (t->flags[id] & TOK_F_SPM_USABLE) ? id : -1;
}

static int
heap_push(struct spm_ctx *c, struct spm_cand e)
{
    if (c->n_heap == c->heap_cap) {
        size_t cap = c->heap_cap ? 2 * c->heap_cap : 128;
        struct spm_cand *heap = tok_realloc(c->heap, cap * sizeof(*heap));
        if (!heap)
            return -ENOMEM;
        c->heap = heap;
        c->heap_cap = cap;
    }
    size_t i = c->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_before(&e, &c->heap[p]))
            break;
        c->heap[i] = c->heap[p];
        i = p;
    }
    c->heap[i] = e;
    return 0;
}

static struct spm_cand
heap_pop(struct spm_ctx *c)
{
    struct spm_cand top = c->heap[0];
    struct spm_cand last = c->heap[--c->n_heap];
    size_t i = 0, n = c->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const struct spm_cand *best = &last;
        if (l < n && cand_before(&c->heap[l], best)) {
            m = l;
            best = &c->heap[l];
        }
        if (r < n && cand_before(&c->heap[r], best))
            m = r;
        if (m == i)
            break;
        c->heap[i] = c->heap[m];
        i = m;
    }
    if (n > 0)
        c->heap[i] = last;
    return top;
}

static int
try_pair(struct spm_ctx *c, int32_t left, int32_t right)
{
    if (left < 0 || right < 0)
        return 0;
    const struct spm_sym *l = &c->sym[left], *r = &c->sym[right];
    uint32_t len = l->len + r->len;
    int32_t id = usable_piece(c->t, c->text + l->start, len);
    if (id < 0)
        return 0;
    return heap_push(c, (struct spm_cand){c->t->score[id], left, right, len});
}

static int
merge_all(struct spm_ctx *c, size_t n_sym)
{
    int rc = 0;
    for (size_t i = 0; i + 1 < n_sym && rc == 0; i++)
        rc = try_pair(c, (int32_t)i, (int32_t)i + 1);
    while (rc == 0 && c->n_heap > 0) {
        struct spm_cand e = heap_pop(c);
        struct spm_sym *l = &c->sym[e.left], *r = &c->sym[e.right];
        /* Stale: one side was merged away or grew since the pair was queued. */
        if (l->len == 0 || r->len == 0 || l->len + r->len != e.len)
            continue;
        l->len += r->len;
        r->len = 0;
        l->next = r->next;
        if (r->next >= 0)
            c->sym[r->next].prev = e.left;
        rc = try_pair(c, l->prev, e.left);
        if (rc == 0)
            rc = try_pair(c, e.left, l->next);
    }
    return rc;
}

static int
emit(const struct spm_ctx *c, struct tok_ids *out)
{
    const struct eng_tok *t = c->t;
    int rc = 0;
    for (int32_t i = 0; i >= 0 && rc == 0; i = c->sym[i].next) {
        const struct spm_sym *s = &c->sym[i];
        int32_t id = usable_piece(t, c->text + s->start, s->len);
        if (id >= 0) {
            rc = tok_ids_push(out, id);
            continue;
        }
        for (uint32_t j = 0; j < s->len && rc == 0; j++) {
            int32_t b = t->byte_tok[(unsigned char)c->text[s->start + j]];
            if (b < 0)
                b = t->unk;
            if (b >= 0)
                rc = tok_ids_push(out, b);
        }
    }
    return rc;
}

int
tok_spm_encode(const struct eng_tok *t, const char *text, size_t len, bool add_prefix,
               struct tok_ids *out)
{
    int rc = 0;
    struct spm_ctx c = {.t = t};
    char *esc = NULL;
    if (len == 0)
        return 0;
    esc = tok_malloc(3 * len + 3);
    c.sym = tok_malloc((len + 1) * sizeof(*c.sym));
    if (!esc || !c.sym) {
        rc = -ENOMEM;
        goto out;
    }
    size_t n = 0;
    if (add_prefix) {
        memcpy(esc, SPM_SPACE, 3);
        n = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(esc + n, SPM_SPACE, 3);
            n += 3;
        } else {
            esc[n++] = text[i];
        }
    }
    c.text = esc;
    size_t n_sym = 0;
    for (size_t i = 0; i < n; n_sym++) {
        size_t cl = tok_utf8_seq_len((const unsigned char *)esc + i, n - i);
        if (cl == 0)
            cl = 1;
        c.sym[n_sym] =
            (struct spm_sym){(uint32_t)i, (uint32_t)cl, (int32_t)n_sym - 1, (int32_t)n_sym + 1};
        i += cl;
    }
    c.sym[n_sym - 1].next = -1;
    rc = merge_all(&c, n_sym);
    if (rc == 0)
        rc = emit(&c, out);
out:
    free(esc);
    free(c.sym);
    free(c.heap);
    return rc;
}

"""ref_llama: an independent numpy forward pass of llama-family GGUF models (llama, qwen2).

It reads the file with the `gguf` package (GGUFReader; weights dequantized once with
gguf.quants.dequantize and cached as float32) and computes the logits of every position of a
prompt, or a greedy continuation. It shares no code with the C engine: the tests compare the two.

Modes:
  "f32": dequantized weights, float32 activations.
  "q8":  what the engine's CPU kernels compute. Before each matmul whose weight is a block-quantized
         type, the activation row is quantized per block (32 elements for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0,
         256 for the K-quants): amax = max|x|, id = 127/amax (0 when amax is 0), q = rint(x*id)
         (round half to even, float32 arithmetic) clamped to [-127, 127], d = amax/127 (float32), and
         the matmul sees d*q. F32/F16/BF16 weights see the float32 activations.

Layer by layer (pre-norm transformer):
  h = embedding[ids]
  per layer: x = rmsnorm(h) * attn_norm; q,k,v = x Wq, x Wk, x Wv (+ biases for qwen2);
             RoPE on q and k; causal grouped-query attention with scale 1/sqrt(head_dim);
             h += attn Wo; x = rmsnorm(h) * ffn_norm; h += (silu(x Wgate) * (x Wup)) Wdown
  logits = (rmsnorm(h) * output_norm) Wout   (Wout = output.weight, or token_embd.weight if tied)
RoPE: "llama" files rotate adjacent pairs (x[2i], x[2i+1]) (the converter permutes Q/K so this
matches the original model), "qwen2" rotates halves (x[i], x[i + n_rot/2]); pair i turns by
pos * theta^(-2i/n_rot), theta = {arch}.rope.freq_base, n_rot = {arch}.rope.dimension_count.

Matmuls accumulate in float32 BLAS by default; accum="f64" does them in float64 (slower; used to
check that the float32 accumulation is not what the tests measure).
"""

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

F32 = np.float32

# Weight types whose matmul quantizes the activations, and the activation block size.
_ACT_BLOCK = {
    QT.Q4_0: 32, QT.Q4_1: 32, QT.Q5_0: 32, QT.Q5_1: 32, QT.Q8_0: 32,
    QT.Q2_K: 256, QT.Q3_K: 256, QT.Q4_K: 256, QT.Q5_K: 256, QT.Q6_K: 256,
}
_FLOAT_TYPES = {QT.F32, QT.F16, QT.BF16}


def quantize_act(x, block):
    """Returns d*q: x (float32, last dim a multiple of block) rounded as the engine's 8-bit
    activation blocks."""
    x = np.ascontiguousarray(x, dtype=F32)
    shape = x.shape
    xb = x.reshape(-1, block)
    amax = np.max(np.abs(xb), axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, F32(127.0) / amax, F32(0.0)).astype(F32)
    q = np.clip(np.rint(xb * inv), F32(-127.0), F32(127.0)).astype(F32)
    d = (amax / F32(127.0)).astype(F32)
    return (d * q).astype(F32).reshape(shape)


def rmsnorm(x, w, eps):
    x = x.astype(F32)
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ms + eps)).astype(F32)) * w


def silu(x):
    return x / (F32(1.0) + np.exp(-x))


def softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


class Weight:
    """One weight matrix: float32 (n_out, n_in) plus the GGUF type it came from."""

    def __init__(self, mat, qtype):
        self.mat = mat
        self.qtype = qtype
        self.act_block = _ACT_BLOCK.get(qtype)
        self._mat64 = None

    def apply(self, x, mode, accum):
        """x: (n_tok, n_in) float32 -> (n_tok, n_out) float32."""
        if mode == "q8" and self.act_block is not None:
            x = quantize_act(x, self.act_block)
        elif mode == "q8" and self.qtype not in _FLOAT_TYPES:
            raise NotImplementedError(f"q8 mode: no activation rule for {self.qtype.name}")
        if accum == "f64":
            if self._mat64 is None:
                self._mat64 = self.mat.astype(np.float64)
            return (x.astype(np.float64) @ self._mat64.T).astype(F32)
        return (x @ self.mat.T).astype(F32)


class RefModel:
    """A llama-family model read from a GGUF file. mode: "q8" or "f32"; accum: "f32" or "f64"."""

    def __init__(self, path, mode="q8", accum="f32"):
        if mode not in ("q8", "f32"):
            raise ValueError(f"mode must be q8 or f32, not {mode!r}")
        self.mode = mode
        self.accum = accum
        self.reader = gguf.GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._cache = {}
        self._read_hparams()

    # ---- Metadata ----

    def meta(self, key, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            if default is None:
                raise KeyError(f"GGUF metadata {key} missing")
            return default
        return f.contents()

    def _read_hparams(self):
        arch = self.meta("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise NotImplementedError(f"architecture {arch}")
        self.arch = arch
        self.n_embd = int(self.meta(f"{arch}.embedding_length"))
        self.n_layer = int(self.meta(f"{arch}.block_count"))
        self.n_head = int(self.meta(f"{arch}.attention.head_count"))
        self.n_head_kv = int(self.meta(f"{arch}.attention.head_count_kv", self.n_head))
        self.head_dim = self.n_embd // self.n_head
        self.n_rot = int(self.meta(f"{arch}.rope.dimension_count", self.head_dim))
        self.theta = float(self.meta(f"{arch}.rope.freq_base", 10000.0))
        self.eps = float(self.meta(f"{arch}.attention.layer_norm_rms_epsilon"))
        self.neox = arch == "qwen2"
        emb = self.tensors["token_embd.weight"]
        self.n_vocab = int(emb.shape[1])
        self.tied = "output.weight" not in self.tensors
        eos = self.reader.fields.get("tokenizer.ggml.eos_token_id")
        self.eos = int(eos.contents()) if eos is not None else -1
        self.eot = set()
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                    "tokenizer.ggml.eom_token_id"):
            f = self.reader.fields.get(key)
            if f is not None:
                self.eot.add(int(f.contents()))

    # ---- Weights (dequantized once, cached) ----

    def weight(self, name):
        w = self._cache.get(name)
        if w is None:
            t = self.tensors[name]
            n_in, n_out = int(t.shape[0]), int(t.shape[1])
            mat = dequantize(t.data, t.tensor_type).astype(F32).reshape(n_out, n_in)
            w = Weight(np.ascontiguousarray(mat), t.tensor_type)
            self._cache[name] = w
        return w

    def vec(self, name):
        v = self._cache.get(name)
        if v is None:
            t = self.tensors.get(name)
            if t is None:
                return None
            v = dequantize(t.data, t.tensor_type).astype(F32).reshape(-1)
            self._cache[name] = v
        return v

    def _mm(self, name, x):
        return self.weight(name).apply(x, self.mode, self.accum)

    # ---- Pieces of the forward pass ----

    def _rope(self, x, pos):
        """x: (n_tok, n_heads, head_dim) rotated in place by positions pos (n_tok)."""
        half = self.n_rot // 2
        i = np.arange(half, dtype=np.float64)
        freq = self.theta ** (-2.0 * i / self.n_rot)
        ang = np.asarray(pos, dtype=np.float64)[:, None] * freq[None, :]
        cos = np.cos(ang).astype(F32)[:, None, :]
        sin = np.sin(ang).astype(F32)[:, None, :]
        if self.neox:
            a = x[:, :, :half].copy()
            b = x[:, :, half:self.n_rot].copy()
            x[:, :, :half] = a * cos - b * sin
            x[:, :, half:self.n_rot] = a * sin + b * cos
        else:
            a = x[:, :, 0:self.n_rot:2].copy()
            b = x[:, :, 1:self.n_rot:2].copy()
            x[:, :, 0:self.n_rot:2] = a * cos - b * sin
            x[:, :, 1:self.n_rot:2] = a * sin + b * cos
        return x

    def _attention(self, q, k, v, pos0):
        """q: (n_tok, n_head, hd) at positions pos0..; k, v: (n_ctx, n_head_kv, hd) for positions
        0..n_ctx-1 (n_ctx = pos0 + n_tok). Returns (n_tok, n_head * hd)."""
        n_tok, n_ctx = q.shape[0], k.shape[0]
        group = self.n_head // self.n_head_kv
        scale = F32(1.0 / np.sqrt(self.head_dim))
        kk = np.repeat(k, group, axis=1).transpose(1, 2, 0)  # (n_head, hd, n_ctx)
        vv = np.repeat(v, group, axis=1).transpose(1, 0, 2)  # (n_head, n_ctx, hd)
        s = np.matmul(q.transpose(1, 0, 2), kk) * scale      # (n_head, n_tok, n_ctx)
        qpos = pos0 + np.arange(n_tok)[:, None]
        mask = np.arange(n_ctx)[None, :] > qpos
        s = np.where(mask[None, :, :], F32(-np.inf), s)
        p = softmax(s.astype(F32))
        out = np.matmul(p, vv)                               # (n_head, n_tok, hd)
        return out.transpose(1, 0, 2).reshape(n_tok, self.n_head * self.head_dim).astype(F32)

    def _layer(self, il, h, cache, pos0):
        pre = f"blk.{il}."
        n_tok = h.shape[0]
        hd = self.head_dim
        x = rmsnorm(h, self.vec(pre + "attn_norm.weight"), self.eps)
        q = self._mm(pre + "attn_q.weight", x)
        k = self._mm(pre + "attn_k.weight", x)
        v = self._mm(pre + "attn_v.weight", x)
        for name, t in (("attn_q.bias", q), ("attn_k.bias", k), ("attn_v.bias", v)):
            b = self.vec(pre + name)
            if b is not None:
                t += b
        pos = pos0 + np.arange(n_tok)
        q = self._rope(q.reshape(n_tok, self.n_head, hd), pos)
        k = self._rope(k.reshape(n_tok, self.n_head_kv, hd), pos)
        v = v.reshape(n_tok, self.n_head_kv, hd)
        if cache is not None:
            ck, cv = cache[il]
            k = np.concatenate([ck, k]) if ck is not None else k
            v = np.concatenate([cv, v]) if cv is not None else v
            cache[il] = (k, v)
        att = self._attention(q, k, v, pos0)
        h = h + self._mm(pre + "attn_output.weight", att)
        x = rmsnorm(h, self.vec(pre + "ffn_norm.weight"), self.eps)
        g = self._mm(pre + "ffn_gate.weight", x)
        u = self._mm(pre + "ffn_up.weight", x)
        h = h + self._mm(pre + "ffn_down.weight", (silu(g) * u).astype(F32))
        return h.astype(F32)

    # ---- Public ----

    def new_cache(self):
        return [(None, None) for _ in range(self.n_layer)]

    def forward(self, ids, cache=None, pos0=0):
        """Logits (n_tok, n_vocab) float32 for token ids at positions pos0.. . With a cache (from
        new_cache), the tokens' K and V are appended to it and earlier entries are attended to."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("ids must be a non-empty 1-D sequence")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ValueError("token id outside the vocabulary")
        h = self.weight("token_embd.weight").mat[ids].astype(F32)
        for il in range(self.n_layer):
            h = self._layer(il, h, cache, pos0)
        x = rmsnorm(h, self.vec("output_norm.weight"), self.eps)
        head = "token_embd.weight" if self.tied else "output.weight"
        return self._mm(head, x)

    def logits(self, ids):
        """Logits of every position of the prompt ids: (len(ids), n_vocab) float32."""
        return self.forward(ids)

    def greedy(self, ids, n, stop_at_eos=True):
        """Greedy continuation of up to n ids (argmax, lowest id on ties) with a KV cache. Stops
        after an end-of-generation id when stop_at_eos (that id is included)."""
        cache = self.new_cache()
        logits = self.forward(ids, cache, 0)[-1]
        pos = len(ids)
        out = []
        for _ in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if stop_at_eos and tok in self.eot:
                break
            logits = self.forward([tok], cache, pos)[-1]
            pos += 1
        return out


def rel_err(ours, ref):
    """Per-position relative error ||ours - ref|| / ||ref|| (rows of 2-D arrays)."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)

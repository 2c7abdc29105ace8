"""Bad model files: llm-run rejects each with one line on stderr and exit 1, and never crashes.

Files come from $BUILD/tests/tools/mkgguf: a valid tiny model, and `--corrupt KIND` variants.
The structural kinds are broken GGUF and must fail `llm-run --inspect FILE` (the GGUF reader);
"missing", "shape" and "vocab" are valid GGUF but a wrong model and must fail a model load
(`llm-run -m FILE -p hi -n 1`). A failure means: exit status 1 (not a signal), exactly one line on
stderr of the form "llm-run: FILE: <message>", the message naming the problem, and no sanitizer
report (these tests also run under `make asan`).
"""

import os
import re

import numpy as np
import pytest

from conftest import BUILD, run_bin

MKGGUF = BUILD / "tests" / "tools" / "mkgguf"

SANITIZER_RE = re.compile(r"AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|"
                          r"ThreadSanitizer|runtime error:|MemorySanitizer")

Q = r"blk\.0\.attn_q\.weight"

# kind -> patterns the error message must contain (re.search each)
STRUCTURAL = {
    "truncated": [r"bad GGUF file", r"data \[offset \d+, \d+ bytes\] runs past the end of the file"],
    "magic": [r"bad GGUF file", r"bad magic"],
    "version": [r"bad GGUF file", r"version 99"],
    "offset": [rf"tensor '{Q}' data \[offset \d+, \d+ bytes\] runs past the end of the file"],
    "count": [r"tensor count 1152921504606846976 is more than a file of \d+ bytes can hold"],
    "kvcount": [r"key/value count 4611686018427387904 is more than a file of \d+ bytes can hold"],
    "strlen": [r"key length 1099511627776 at byte \d+ runs past the end of the file"],
    "type": [rf"tensor '{Q}' has unknown type 77"],
    "dims": [rf"tensor '{Q}' has 9 dimensions"],
    "misaligned": [rf"tensor '{Q}': offset \d+ is not a multiple of the alignment 32"],
}

MODEL_LEVEL = {
    "missing": [Q, r"missing"],
    "shape": [Q, r"shape"],
    "vocab": [r"vocab"],
}


def run_gen(llm_run, *args):
    """Runs a generation; the random tiny model may emit bytes that are not UTF-8."""
    r = run_bin(llm_run, *args, binary=True)
    r.out = r.out.decode("utf-8", errors="replace")
    r.err = r.err.decode("utf-8", errors="replace")
    return r


def mkgguf(path, *args):
    if not os.access(MKGGUF, os.X_OK):
        pytest.fail(f"{MKGGUF} is missing: build it first (make all)")
    r = run_bin(MKGGUF, "-o", path, *args)
    assert r.rc == 0, r
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("badmodel")
    out = {"valid": mkgguf(d / "valid.gguf")}
    for kind in list(STRUCTURAL) + list(MODEL_LEVEL):
        out[kind] = mkgguf(d / f"{kind}.gguf", "--corrupt", kind)
    return out


def assert_one_line_error(r, path, patterns):
    assert r.rc == 1, r  # a negative rc is a signal
    assert not SANITIZER_RE.search(r.err), r
    lines = r.err.strip("\n").split("\n")
    assert len(lines) == 1, f"want one line on stderr:\n{r}"
    prefix = f"llm-run: {path}: "
    assert lines[0].startswith(prefix), r
    for p in patterns:
        assert re.search(p, lines[0]), f"message lacks /{p}/: {lines[0]!r}"


# ---- Broken GGUF: --inspect ----

@pytest.mark.parametrize("kind", list(STRUCTURAL))
def test_badmodel_inspect_rejects(kind, files, llm_run):
    r = run_bin(llm_run, "--inspect", files[kind])
    assert_one_line_error(r, files[kind], STRUCTURAL[kind])
    assert r.out == "", r


@pytest.mark.parametrize("kind", list(STRUCTURAL))
def test_badmodel_load_rejects(kind, files, llm_run):
    """The same files given to -m fail the same way, before any model code runs."""
    r = run_gen(llm_run, "-m", files[kind], "-p", "hi", "-n", "1")
    assert_one_line_error(r, files[kind], STRUCTURAL[kind])


def test_badmodel_inspect_os_errors(llm_run, tmp_path):
    missing = tmp_path / "nope.gguf"
    r = run_bin(llm_run, "--inspect", missing)
    assert_one_line_error(r, missing, [r"No such file or directory", re.escape(str(missing))])
    r = run_bin(llm_run, "--inspect", tmp_path)
    assert_one_line_error(r, tmp_path, [r"Is a directory"])
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    r = run_bin(llm_run, "--inspect", empty)
    assert_one_line_error(r, empty, [r"0 bytes, too small"])


# ---- Valid files: --inspect prints the tensor table ----

def expected_tensors(layers, arch, tied):
    names = ["token_embd.weight"]
    for i in range(layers):
        layer = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight"]
        if arch == "qwen2":
            layer += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
        layer += ["attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                  "ffn_down.weight"]
        names += [f"blk.{i}.{n}" for n in layer]
    names.append("output_norm.weight")
    if not tied:
        names.append("output.weight")
    return names


@pytest.mark.parametrize("qtype,arch,version,tied,layers,dim,ffn", [
    ("f32", "llama", 3, False, 2, 64, 128),
    ("q8_0", "qwen2", 2, True, 1, 64, 128),
    ("q4_k", "llama", 3, True, 2, 256, 512),
    ("q5_0", "qwen2", 3, False, 3, 96, 160),
])
def test_badmodel_inspect_valid_prints_tensor_table(qtype, arch, version, tied, layers, dim, ffn,
                                                    llm_run, tmp_path):
    path = mkgguf(tmp_path / "m.gguf", "--type", qtype, "--arch", arch, "--version", str(version),
                  "--tied" if tied else "--untied", "--layers", str(layers), "--dim", str(dim),
                  "--ffn", str(ffn))
    r = run_bin(llm_run, "--inspect", path)
    assert r.rc == 0, r
    assert not SANITIZER_RE.search(r.err), r
    assert re.search(rf"^GGUF v{version}: {path.stat().st_size} bytes, \d+ key/values, "
                     rf"\d+ tensors, alignment 32$", r.out, re.M), r.out[:500]
    assert re.search(rf"^\s+general\.architecture\s+string\s+\"{arch}\"$", r.out, re.M)
    assert re.search(r"^\s+tokenizer\.ggml\.tokens\s+array\s+\[string x 263\] ", r.out, re.M)
    names = expected_tensors(layers, arch, tied)
    rows = re.findall(r"^  (\S+)\s+(\S+)\s+\[([0-9, ]+)\]\s+(\d+)\s+(\d+)$", r.out, re.M)
    assert [row[0] for row in rows] == names
    by_name = {row[0]: row for row in rows}
    q = by_name["blk.0.attn_q.weight"]
    assert q[1].lower() == qtype and q[2] == f"{dim}, {dim}"
    assert by_name["blk.0.attn_norm.weight"][1:3] == ("f32", str(dim))
    assert by_name["token_embd.weight"][2] == f"{dim}, 263"
    assert all(int(row[3]) % 32 == 0 for row in rows)
    assert re.search(rf"^total: {len(names)} tensors, ", r.out, re.M)


# ---- Wrong models: a model load rejects them ----

@pytest.fixture(scope="module")
def loads_models(files, llm_run):
    """llm-run must load the valid tiny model, or the wrong-model tests below prove nothing."""
    r = run_gen(llm_run, "-m", files["valid"], "-p", "hi", "-n", "1", "--no-stats")
    if r.rc != 0:
        pytest.skip(f"llm-run cannot load the valid tiny model yet (rc {r.rc}: "
                    f"{r.err.strip()[:200]}); a wrong model cannot be told from a broken loader")
    return True


def test_badmodel_valid_model_loads(files, llm_run):
    r = run_gen(llm_run, "-m", files["valid"], "-p", "hi", "-n", "1", "--no-stats")
    assert r.rc == 0, r
    assert not SANITIZER_RE.search(r.err), r


@pytest.mark.parametrize("kind", list(MODEL_LEVEL))
def test_badmodel_wrong_model_rejected_on_load(kind, files, llm_run, loads_models):
    r = run_bin(llm_run, "--inspect", files[kind])
    assert r.rc == 0, f"{kind} should be valid GGUF:\n{r}"
    r = run_gen(llm_run, "-m", files[kind], "-p", "hi", "-n", "1")
    assert_one_line_error(r, files[kind], MODEL_LEVEL[kind])


# ---- The generator itself ----

def test_mkgguf_is_deterministic(tmp_path):
    a = mkgguf(tmp_path / "a.gguf", "--type", "q4_0", "--seed", "5").read_bytes()
    b = mkgguf(tmp_path / "b.gguf", "--type", "q4_0", "--seed", "5").read_bytes()
    c = mkgguf(tmp_path / "c.gguf", "--type", "q4_0", "--seed", "6").read_bytes()
    assert a == b
    assert a != c and len(a) == len(c)


@pytest.mark.parametrize("args", [
    ["--type", "q4_k", "--dim", "64"],
    ["--type", "q6_k", "--ffn", "128"],
    ["--type", "q2_k"],
    ["--heads", "3"],
    ["--kv-heads", "3"],
    ["--version", "1"],
    ["--corrupt", "bogus"],
    ["--arch", "gpt2"],
])
def test_mkgguf_rejects_bad_options(args, tmp_path):
    out = tmp_path / "x.gguf"
    r = run_bin(MKGGUF, "-o", out, *args)
    assert r.rc == 2, r
    assert r.err.strip()
    assert not out.exists()


# Relative RMS error of each type against the same weights written as f32 (by gguf-py, an
# independent reader and dequantizer).
TYPE_TOL = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2, "q6_k": 3e-2, "q5_0": 6e-2, "q5_k": 6e-2,
            "q4_0": 0.12, "q4_1": 0.12, "q4_k": 0.12}


@pytest.mark.parametrize("qtype", list(TYPE_TOL))
def test_mkgguf_weights_match_f32_through_gguf_py(qtype, tmp_path):
    import gguf
    from gguf.quants import dequantize

    kq = qtype.endswith("_k")
    dims = ["--dim", "256", "--ffn", "512"] if kq else []
    ref_path = mkgguf(tmp_path / "f32.gguf", "--type", "f32", "--seed", "3", *dims)
    q_path = mkgguf(tmp_path / "q.gguf", "--type", qtype, "--seed", "3", *dims)
    ref = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(ref_path).tensors}
    tensors = gguf.GGUFReader(q_path).tensors
    assert [t.name for t in tensors] == list(ref)
    for t in tensors:
        d = dequantize(t.data, t.tensor_type).reshape(ref[t.name].shape)
        err = np.sqrt(np.mean((d - ref[t.name]) ** 2) / np.mean(ref[t.name] ** 2))
        assert err < TYPE_TOL[qtype], (t.name, err)
        if t.name == "blk.0.attn_q.weight":
            assert t.tensor_type.name.lower() == qtype
            # std 1/sqrt(row length): activations stay O(1) through the layers
            assert abs(np.std(ref[t.name]) * np.sqrt(ref[t.name].shape[-1]) - 1) < 0.05


def test_mkgguf_tokenizer_is_consistent(files):
    """The vocabulary and merges form a working byte-level BPE (checked with HF tokenizers)."""
    from conftest import hf_tokenizer_from_gguf

    tok = hf_tokenizer_from_gguf(files["valid"])
    enc = tok.encode("the cat in the hat<|im_end|>", add_special_tokens=False)
    assert enc.tokens == ["t", "he", "\u0120", "c", "a", "t", "\u0120", "in", "\u0120the", "\u0120",
                          "h", "a", "t", "<|im_end|>"]
    assert enc.ids[-1] == 262
    assert tok.decode(enc.ids, skip_special_tokens=False) == "the cat in the hat<|im_end|>"
    # every byte round-trips
    raw = bytes(range(256)).decode("latin-1")
    assert tok.decode(tok.encode(raw, add_special_tokens=False).ids) == raw

"""llm-run's command line, and tiny generated models of every weight type against the reference.

The CLI contract: `llm-run -m MODEL (-p PROMPT | --prompt-ids 1,2,3) [options]`, `--inspect FILE`,
`--help`; the completion on stdout, "prefill: N tokens, X tok/s" and "decode: N tokens, Y tok/s"
on stderr; exit 1 with one line on stderr for a runtime error, exit 2 for bad usage.
"""

import os
import re

import numpy as np
import pytest

import ref_llama
from conftest import BUILD, chatml, flags_missing_from, ids_arg, read_logits, run_bin

FLAGS = ["-m", "-p", "--prompt-ids", "-n", "--temp", "--seed", "--top-k", "--top-p", "--min-p",
         "--chat", "--system", "--threads", "--ctx", "--print-ids", "--dump-logits",
         "--no-stats", "--inspect", "--help"]

STATS_RE = {
    "prefill": re.compile(r"^prefill: (\d+) tokens, ([0-9.]+) tok/s$", re.M),
    "decode": re.compile(r"^decode: (\d+) tokens, ([0-9.]+) tok/s$", re.M),
}


# ---- Usage ----

def test_llm_run_help_lists_every_flag(llm_run):
    r = run_bin(llm_run, "--help")
    assert r.rc == 0, r
    missing = flags_missing_from(r.out, FLAGS)
    assert not missing, f"--help does not mention {missing}"


@pytest.mark.parametrize("args", [
    ["--bogus"],
    ["-m", "x.gguf", "-p", "hi", "-n", "abc"],
    ["-m", "x.gguf", "-p", "hi", "--temp", "warm"],
    ["-m", "x.gguf", "-p", "hi", "--threads", "0"],
    ["-p", "hi"],
    ["-m", "x.gguf"],
    ["-m", "x.gguf", "-p", "hi", "--prompt-ids", "1,2"],
    ["-m", "x.gguf", "-p", "hi", "stray"],
], ids=["unknown", "n_not_int", "temp_not_num", "threads_zero", "no_model", "no_prompt",
        "two_prompts", "stray_arg"])
def test_llm_run_bad_usage_exits_2(llm_run, args):
    r = run_bin(llm_run, *args)
    assert r.rc == 2, r
    assert r.err.strip(), "no message on stderr"
    assert r.out == ""


def test_llm_run_bad_prompt_ids_exit_2(llm_run, model_path):
    for bad in ("1,x,3", "99999999", "-1", ""):
        r = run_bin(llm_run, "-m", model_path, "--prompt-ids", bad, "-n", "1")
        assert r.rc == 2, (bad, r)
        assert r.err.strip()


def test_llm_run_missing_model_exits_1_with_one_line(llm_run, tmp_path):
    r = run_bin(llm_run, "-m", tmp_path / "nope.gguf", "-p", "hi", "-n", "4")
    assert r.rc == 1, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r
    assert "nope.gguf" in lines[0]


def test_llm_run_not_a_gguf_exits_1(llm_run, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    r = run_bin(llm_run, "-m", bad, "-p", "hi", "-n", "4")
    assert r.rc == 1, r
    assert len(r.err.strip().splitlines()) == 1, r


def test_llm_run_inspect_prints_tensors(llm_run, model_path):
    r = run_bin(llm_run, "--inspect", model_path)
    assert r.rc == 0, r
    assert "llama.block_count" in r.out
    assert "blk.29.ffn_down.weight" in r.out


# ---- Generation on the default model ----

def test_llm_run_greedy_completes_capital(llm_run, model_path):
    r = run_bin(llm_run, "-m", model_path, "-p", "The capital of France is", "-n", "8",
                "--temp", "0")
    assert r.rc == 0, r
    assert "Paris" in r.out, r
    pre = STATS_RE["prefill"].search(r.err)
    dec = STATS_RE["decode"].search(r.err)
    assert pre and dec, r
    assert int(pre.group(1)) == 5  # "The capital of France is" is 5 tokens
    assert int(dec.group(1)) == 8
    assert float(pre.group(2)) > 0 and float(dec.group(2)) > 0


def test_llm_run_no_stats_is_silent(llm_run, model_path):
    r = run_bin(llm_run, "-m", model_path, "-p", "Hello", "-n", "2", "--temp", "0",
                "--no-stats")
    assert r.rc == 0, r
    assert r.err == ""


def test_llm_run_text_matches_print_ids(llm_run, model_path, tokenizer):
    args = ["-m", model_path, "-p", "Once upon a time", "-n", "24", "--temp", "0", "--no-stats"]
    text = run_bin(llm_run, *args)
    ids = run_bin(llm_run, *args, "--print-ids")
    assert text.rc == 0 and ids.rc == 0, (text, ids)
    decoded = tokenizer.decode([int(t) for t in ids.out.split()])
    assert text.out.rstrip("\n") == decoded


def test_llm_run_seed_reproducible(llm_run, model_path):
    def sample(seed):
        r = run_bin(llm_run, "-m", model_path, "-p", "My favourite animal is", "-n", "32",
                    "--temp", "0.8", "--seed", seed, "--print-ids", "--no-stats")
        assert r.rc == 0, r
        return r.out

    first = sample(42)
    assert sample(42) == first
    # Another seed gives another text (four tries: a single collision is possible in principle).
    assert any(sample(s) != first for s in (43, 44, 45, 46))


def test_llm_run_chat_uses_template(llm_run, model_path, tokenizer):
    question = "What is the largest ocean on Earth?"
    chat = run_bin(llm_run, "-m", model_path, "--chat", "-p", question, "-n", "16", "--temp", "0",
                   "--print-ids", "--no-stats")
    assert chat.rc == 0, chat
    # The same prompt rendered by hand with the model's ChatML template and default system text.
    ids = tokenizer.encode(chatml(question))
    plain = run_bin(llm_run, "-m", model_path, "--prompt-ids", ids_arg(ids), "-n", "16",
                    "--temp", "0", "--print-ids", "--no-stats")
    assert plain.rc == 0, plain
    assert chat.out == plain.out
    assert "Pacific" in tokenizer.decode([int(t) for t in chat.out.split()])


def test_llm_run_chat_system(llm_run, model_path, tokenizer):
    system = "You are a pirate. Answer like a pirate."
    q = "Who are you?"
    chat = run_bin(llm_run, "-m", model_path, "--chat", "--system", system, "-p", q, "-n", "8",
                   "--temp", "0", "--print-ids", "--no-stats")
    ids = tokenizer.encode(chatml(q, system=system))
    plain = run_bin(llm_run, "-m", model_path, "--prompt-ids", ids_arg(ids), "-n", "8",
                    "--temp", "0", "--print-ids", "--no-stats")
    assert chat.rc == 0 and plain.rc == 0, (chat, plain)
    assert chat.out == plain.out


def test_llm_run_context_overflow_exits_1(llm_run, model_path):
    r = run_bin(llm_run, "-m", model_path, "-p", "one two three four five six", "-n", "16",
                "--ctx", "8")
    assert r.rc == 1, r
    assert len(r.err.strip().splitlines()) == 1, r


def test_llm_run_threads_do_not_change_greedy(llm_run, model_path):
    outs = []
    for t in ("1", "2"):
        r = run_bin(llm_run, "-m", model_path, "-p", "The three primary colours are", "-n", "16",
                    "--temp", "0", "--threads", t, "--print-ids", "--no-stats")
        assert r.rc == 0, r
        outs.append(r.out)
    assert outs[0] == outs[1]


# ---- Tiny models of every weight type ----
# Random-weight models from mkgguf (2 layers): the build makes tiny-TYPE.gguf for every type; the
# qwen2 ones (attention biases, NEOX RoPE, untied output) are made here.

TINY_MODELS = {
    "f32": [], "f16": [], "bf16": [], "q8_0": [], "q4_0": [], "q4_1": [], "q5_0": [],
    "q4_k": [], "q5_k": [], "q6_k": [],
    "qwen2-f32": ["--arch", "qwen2", "--type", "f32", "--untied"],
    "qwen2-q4_1": ["--arch", "qwen2", "--type", "q4_1", "--untied"],
    "qwen2-q6_k": ["--arch", "qwen2", "--type", "q6_k"],
}

# These small models amplify rounding differences much less than the real one, so the engine must
# match ref_llama's q8 mode (with float64 matmul accumulation, closest to the engine's exact integer
# block sums) tightly. Observed per-position maxima, engine (scalar, AVX2 and AVX-512 kernels) vs
# the reference: float types <= 9e-7, quantized types <= 3.4e-7, apart from one flipped position
# (1.4e-3, q4_k, scalar kernels).
TINY_TIGHT = {"f32": 5e-6, "f16": 5e-6, "bf16": 5e-6}
TINY_TIGHT_QUANT = 2e-6
# A rounding flip in an 8-bit activation block (a one-ulp difference in summation order moving
# x * 127/amax across .5) changes one position by up to ~2e-2; it is isolated to that position.
# At most TINY_MAX_FLIPS of the 24 positions may exceed the tight bound, and none TINY_LOOSE.
TINY_MAX_FLIPS = 2
TINY_LOOSE = 0.1
TINY_N_PROMPT = 24
TINY_N_GEN = 8


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Path of a tiny model: the one the build generated, else made here with mkgguf."""
    made = {}

    def get(name):
        args = TINY_MODELS[name]
        path = BUILD / "tests" / "models" / f"tiny-{name}.gguf"
        if not args and path.is_file():
            return path
        if name not in made:
            mkgguf = BUILD / "tests" / "tools" / "mkgguf"
            if not os.access(mkgguf, os.X_OK):
                pytest.fail(f"{mkgguf} is missing: build it first (make all)")
            out = tmp_path_factory.mktemp("tiny") / f"tiny-{name}.gguf"
            r = run_bin(mkgguf, "-o", out, *(args or ["--type", name]), "--seed", "7")
            assert r.rc == 0, r
            made[name] = out
        return made[name]

    return get


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_matches_reference(name, tiny_model, llm_run, tmp_path):
    path = tiny_model(name)
    ref = ref_llama.RefModel(str(path), "q8", accum="f64")
    ids = np.random.default_rng(1234).integers(0, ref.n_vocab, size=TINY_N_PROMPT).tolist()
    dump = tmp_path / "logits.f32"
    r = run_bin(llm_run, "-m", path, "--prompt-ids", ids_arg(ids), "-n", TINY_N_GEN,
                "--temp", "0", "--ignore-eos", "--dump-logits", dump, "--print-ids",
                "--no-stats")
    assert r.rc == 0, r
    ours = read_logits(dump, ref.n_vocab)
    assert ours.shape == (len(ids), ref.n_vocab)
    want = ref.logits(ids)
    err = ref_llama.rel_err(ours, want)
    tight = TINY_TIGHT.get(name.split("-")[-1], TINY_TIGHT_QUANT)
    flips = np.nonzero(err >= tight)[0]
    print(f"tiny {name}: rel err max {err.max():.2e} median {np.median(err):.2e}, "
          f"{flips.size} positions over {tight:.0e}")
    assert flips.size <= TINY_MAX_FLIPS, np.array2string(err, precision=2)
    assert err.max() < TINY_LOOSE, np.array2string(err, precision=2)
    # Where the logits agree tightly, so does the argmax (barring an exact tie).
    for i in range(len(ids)):
        if err[i] < tight:
            top = np.sort(want[i])[-2:]
            assert ours[i].argmax() == want[i].argmax() or top[1] - top[0] < 1e-4, i
    # The generated ids follow the reference's argmax (teacher-forced), near-ties aside.
    gen = [int(t) for t in r.out.split()]
    assert len(gen) == TINY_N_GEN
    steps = ref.logits(ids + gen)[len(ids) - 1:-1]
    for i, tok in enumerate(gen):
        assert steps[i].max() - steps[i][tok] < 1e-3, (i, tok, int(steps[i].argmax()))

"""The engine's logits and greedy output against the numpy reference (ref_llama.py).

llm-run evaluates each prompt (given as token ids) and dumps the logits of every position; the
reference computes the same in two modes: q8 (the engine's 8-bit activation blocks, bit for bit in
the spec) and f32 (plain float32 activations).

Why the bounds are statistical: quantizing activations to 8 bits makes the forward pass
discontinuous. A one-ulp difference anywhere (the order of a float sum) can move x * 127/amax
across .5; that changes one quantized value by a whole step, which on this model (activation
outliers make d = amax/127 large) is a visible perturbation, and 30 layers amplify it. Measured on
the default model: perturbing the input embedding of a single token by 1e-7 relative moves its
logits by up to 0.5%; the reference run with float32 and with float64 matmul accumulation (the same
arithmetic otherwise) differs by up to 30% relative at a position (mean per prompt 2.7-5.0%) and
disagrees on top-1 at 10 of 316 positions, all with a top-2 margin under 0.3. No two
implementations agree bit for bit, so against the q8 reference the engine is statistically as close
as the reference is to itself, and the f32 reference is about as close. (The tiny 2-layer models in
test_llm_run.py are far less chaotic and are matched to ~1e-6 there.)

What still fails a wrong engine: the mean error per prompt (a RoPE theta of 1e4 instead of 1e5
gives a mean of 0.21 on the longer prompts, NEOX instead of adjacent-pair RoPE 0.66-0.78, a wrong
attention scale ~1.0), and top-1 agreement at every position whose reference top-2 margin exceeds
NEAR_TIE_MARGIN (the margins move by 0.16 standard deviation, at most 0.63, between the two
reference variants).
"""


import numpy as np
import pytest

import ref_llama
from conftest import ROOT, chatml, hf_tokenizer_from_gguf, ids_arg, read_logits, run_bin

# ---- Prompts: plain, chat, code, non-English; 1 to ~110 tokens ----

PROMPTS = {
    "one_token": "Hello",
    "capital": "The capital of France is",
    "chat": chatml("Explain in two sentences why the sky is blue."),
    "code": ("def fibonacci(n):\n"
             "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
             "    if n < 2:\n"
             "        return n\n"
             "    a, b = 0, 1\n"
             "    for _ in range(n - 1):\n"
             "        a, b = b, a + b\n"
             "    return b\n\n"
             "def is_prime(n):\n"),
    "french": ("La tour Eiffel a été construite pour l'Exposition universelle de 1889 à Paris. "
               "Aujourd'hui, elle est l'un des monuments les plus visités du monde, et"),
    "mixed_scripts": "Привет, мир! 你好，世界！ Γειά σου κόσμε. The word for 'peace' in Japanese is",
    "long": ("Photosynthesis is the process by which green plants, algae and some bacteria convert "
             "light energy into chemical energy. During this process, carbon dioxide and water are "
             "combined, using the energy of sunlight absorbed by chlorophyll, to produce glucose "
             "and oxygen. The oxygen is released into the atmosphere, while the glucose is used "
             "by the plant for growth and energy storage. Scientists have long studied this "
             "process because it is the foundation of almost every food chain on Earth, and "
             "because understanding it could help us design better solar cells. In summary,"),
}

# Prompts whose greedy continuation is compared token for token (64 tokens).
GREEDY_PROMPTS = ["capital", "chat", "code", "french", "long"]
N_GREEDY = 64

# ---- Bounds (measured, then set with margin; see the module docstring) ----
# Observed with the scalar, AVX2 and AVX-512 kernels (LLM_ISA), over all prompts and positions.
# Engine vs q8 reference: max per position 0.244, mean per prompt <= 0.050.
Q8_REL_MAX = 0.6
Q8_REL_MEAN_MAX = 0.15
# Engine vs f32 reference: max 0.272, mean per prompt <= 0.053, top-1 agreement >= 0.978.
F32_REL_MAX = 0.6
F32_REL_MEAN_MAX = 0.15
F32_TOP1_MIN = 0.95
# A position is a near-tie when the reference's top-2 logit margin is below this (logit units).
NEAR_TIE_MARGIN = 1.0
# Of all positions, the fraction where top-1 differs (near-ties only). Observed: engine 5 to 7 of
# 316 (<= 2.2%); the reference against itself with float64 accumulation 10 of 316 (3.2%).
Q8_TIE_DISAGREE_MAX = 0.06


@pytest.mark.parametrize("vocab", ["gpt-2", "starcoder"])
def test_prompt_tokenizer_matches_golden(vocab):
    """The test prompts' tokenizer reproduces the golden ids of tests/data/tokenizer (starcoder is
    the pre-tokenizer family of SmolLM2's "smollm")."""
    base = ROOT / "tests" / "data" / "tokenizer" / f"ggml-vocab-{vocab}.gguf"
    tok = hf_tokenizer_from_gguf(base)
    texts = base.with_name(base.name + ".inp").read_bytes().split(b"\n__ggml_vocab_test__\n")[:-1]
    want = base.with_name(base.name + ".out").read_text().split("\n")
    assert len(texts) > 40
    for text, line in zip(texts, want):
        got = tok.encode(text.decode("utf-8"), add_special_tokens=False).ids
        assert got == [int(t) for t in line.split()], text


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    ids = {name: tokenizer.encode(text) for name, text in PROMPTS.items()}
    assert len(ids["one_token"]) == 1
    assert max(len(v) for v in ids.values()) >= 100
    return ids


@pytest.fixture(scope="module")
def engine_logits(llm_run, model_path, prompt_ids, ref_q8, tmp_path_factory):
    """Logits of every prompt from llm-run --dump-logits, evaluated once per module."""
    out = {}
    d = tmp_path_factory.mktemp("logits")
    for name, ids in prompt_ids.items():
        f = d / f"{name}.f32"
        r = run_bin(llm_run, "-m", model_path, "--prompt-ids", ids_arg(ids), "-n", "0",
                    "--dump-logits", f, "--no-stats")
        assert r.rc == 0, r
        lg = read_logits(f, ref_q8.n_vocab)
        assert lg.shape == (len(ids), ref_q8.n_vocab), name
        assert np.all(np.isfinite(lg)), name
        out[name] = lg
    return out


@pytest.fixture(scope="module")
def ref_logits_q8(ref_q8, prompt_ids):
    return {name: ref_q8.logits(ids) for name, ids in prompt_ids.items()}


@pytest.fixture(scope="module")
def ref_logits_f32(ref_f32, prompt_ids):
    return {name: ref_f32.logits(ids) for name, ids in prompt_ids.items()}


def top2_margin(logits):
    s = np.sort(logits, axis=-1)
    return s[:, -1] - s[:, -2]


def report(tag, name, err, agree):
    print(f"{tag} {name}: n={err.size} rel_err max {err.max():.4f} mean {err.mean():.4f} "
          f"top1 {agree.mean():.3f}")


@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_q8_match_reference(name, engine_logits, ref_logits_q8):
    ours, ref = engine_logits[name], ref_logits_q8[name]
    err = ref_llama.rel_err(ours, ref)
    agree = ours.argmax(-1) == ref.argmax(-1)
    report("q8", name, err, agree)
    assert err.max() < Q8_REL_MAX, f"{name}: rel err per position {np.round(err, 4)}"
    assert err.mean() < Q8_REL_MEAN_MAX, f"{name}: rel err per position {np.round(err, 4)}"
    wide = top2_margin(ref) >= NEAR_TIE_MARGIN
    bad = np.nonzero(~agree & wide)[0]
    assert bad.size == 0, f"{name}: top-1 differs at positions {bad.tolist()} (not near-ties)"


def test_logits_q8_near_ties_rare(engine_logits, ref_logits_q8):
    n = 0
    disagree = 0
    for name in PROMPTS:
        ours, ref = engine_logits[name], ref_logits_q8[name]
        n += len(ref)
        disagree += int(np.sum(ours.argmax(-1) != ref.argmax(-1)))
    print(f"q8 top-1 disagreements: {disagree} of {n} positions")
    assert disagree <= Q8_TIE_DISAGREE_MAX * n


def test_logits_f32_close_to_reference(engine_logits, ref_logits_f32):
    errs, agrees = [], []
    for name in PROMPTS:
        ours, ref = engine_logits[name], ref_logits_f32[name]
        err = ref_llama.rel_err(ours, ref)
        agree = ours.argmax(-1) == ref.argmax(-1)
        report("f32", name, err, agree)
        assert err.mean() < F32_REL_MEAN_MAX, name
        errs.append(err)
        agrees.append(agree)
    err = np.concatenate(errs)
    rate = np.concatenate(agrees).mean()
    print(f"f32 overall: rel err max {err.max():.4f}, top-1 agreement {rate:.3f}")
    assert err.max() < F32_REL_MAX
    assert rate >= F32_TOP1_MIN


def check_greedy_path(ref, prompt, got, margin):
    """Teacher-forces the engine's greedy ids through the reference. At every step the engine's
    token must be the reference's argmax, or within `margin` logits of it (a near-tie, where the
    two implementations may legitimately part ways). Returns (steps identical to the reference's
    argmax, index of the first step that is a near-tie choice or None)."""
    logits = ref.logits(list(prompt) + list(got))[len(prompt) - 1:-1]
    first_tie = None
    same = 0
    for i, tok in enumerate(got):
        best = int(np.argmax(logits[i]))
        gap = float(logits[i][best] - logits[i][tok])
        assert gap < margin, (f"step {i}: engine chose {tok}, reference {best} "
                              f"(reference logit gap {gap:.3f} >= {margin})")
        if tok == best:
            same += 1
        elif first_tie is None:
            first_tie = i
    return same, first_tie


@pytest.mark.parametrize("name", GREEDY_PROMPTS)
def test_greedy_matches_reference(name, llm_run, model_path, prompt_ids, ref_q8):
    ids = prompt_ids[name]
    r = run_bin(llm_run, "-m", model_path, "--prompt-ids", ids_arg(ids), "-n", N_GREEDY,
                "--temp", "0", "--ignore-eos", "--print-ids", "--no-stats")
    assert r.rc == 0, r
    got = [int(t) for t in r.out.split()]
    assert len(got) == N_GREEDY, r
    same, first_tie = check_greedy_path(ref_q8, ids, got, NEAR_TIE_MARGIN)
    want = ref_q8.greedy(ids, N_GREEDY, stop_at_eos=False)
    n_prefix = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), N_GREEDY)
    print(f"greedy {name}: {same}/{N_GREEDY} steps are the reference's argmax; identical to the "
          f"reference's own greedy run for {n_prefix} tokens; first near-tie choice {first_tie}")

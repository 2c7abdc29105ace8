"""The engine's tokenizer against Hugging Face, on the corpus in tokenizer_strings.py.

The engine side is $BUILD/tests/tools/tokenize (tests/tools/tokenize.c): inputs on stdin, each ended
by a NUL byte; one line of ids per input; --decode makes it check decode(encode(s)) == s itself.
Every vocabulary in VOCABS runs every string with special-token parsing off and on: the ids must
equal HF's, and decode(encode(s)) must give s back wherever HF's does.

The reference is Hugging Face's own code, sharing nothing with the C tokenizer:
  * the tokenizer metadata is read from the GGUF with the `gguf` package, under the key names
    transformers' GGUF loader uses (GGUF_TOKENIZER_MAPPING);
  * transformers' GGUF-to-tokenizers converter (convert_gguf_tokenizer: the vocabulary, the merges,
    the added tokens from token_type 3 and 4, and the split regex it knows for the pre-tokenizer
    name) builds a `tokenizers.Tokenizer`, which encodes (Rust BPE, Oniguruma regexes);
  * transformers' own file reader imports torch, which we do not install; the converter does not.
Where transformers 5.23's converter does not rebuild the model's own tokenizer.json, we complete it
with the HF components that file has, and nothing else:
  * "starcoder", "smollm" and their family: SmolLM2's and StarCoder's tokenizer.json pre-tokenize
    with Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)];
    the converter leaves out the Digits step (it then fails llama.cpp's starcoder vectors on
    "ied 4 ½ months", see test_reference_matches_golden);
  * "llama3"/"llama-bpe" family: Llama 3's tokenizer.json sets ignore_merges=true on its BPE model;
  * SentencePiece ("llama"): Llama 2's tokenizer.json normalizes with Prepend("▁") + Replace(" ",
    "▁") and has no pre-tokenizer; transformers 5 builds a Metaspace(prepend_scheme="first") instead,
    which drops the extra "▁" of text that starts with a space.
test_reference_matches_golden checks the reference against llama.cpp's golden vectors first, so a
reference that drifts fails there rather than in the comparison.

Env: BUILD (default build), MODEL (default models/default.gguf; the tests on it skip if it is absent).
"""

import functools
import os
import subprocess
from pathlib import Path

import gguf
import pytest
from tokenizers import normalizers, pre_tokenizers
from transformers.integrations.gguf import gguf_tokenizer_mapping as hf_gguf

from tokenizer_strings import SPECIAL_STRINGS, STRINGS

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("BUILD", "build"))
MODEL = Path(os.environ.get("MODEL", "models/default.gguf"))
TOOL = (BUILD if BUILD.is_absolute() else ROOT / BUILD) / "tests" / "tools" / "tokenize"
GOLDEN = ROOT / "tests" / "data" / "tokenizer"

DIGIT_PRES = {"starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva"}
IGNORE_MERGES_PRES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                      "midm-2.0", "lfm2"}


# ---- The reference ----

def read_tokenizer_dict(path):
    """(architecture, tokenizer_dict) as transformers' get_gguf_tokenizer builds them."""
    reader = gguf.GGUFReader(str(path))
    tdict = {}
    for key, name in hf_gguf.GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        field = reader.get_field("tokenizer." + key)
        if field is not None:
            tdict[name] = field.contents()
    return reader.get_field("general.architecture").contents(), tdict


def hf_reference(path):
    arch, tdict = read_tokenizer_dict(path)
    tok, _ = hf_gguf.convert_gguf_tokenizer(arch, tdict)
    kind, pre = tdict.get("tokenizer_type"), tdict.get("pre_tokenizer_type")
    if kind == "gpt2" and pre in DIGIT_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if kind == "gpt2" and pre in IGNORE_MERGES_PRES:
        tok.model.ignore_merges = True
    if kind == "llama":
        steps = [normalizers.Replace(" ", "\u2581")]
        if tdict.get("add_prefix_space", True):
            steps.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = None
    return tok


def hf_encode(tok, strings, special):
    tok.encode_special_tokens = not special
    return [tok.encode(s, add_special_tokens=False).ids for s in strings]


# ---- The engine ----

def engine_encode(path, strings, special=False, decode=True):
    """Ids per string; with decode, also asserts decode(encode(s)) == s for every string."""
    if not TOOL.exists():
        pytest.fail(f"{TOOL} is not built (make {TOOL.relative_to(ROOT)})")
    args = [str(TOOL), "-m", str(path)] + (["--special"] if special else []) + (
        ["--decode"] if decode else [])
    data = b"".join(s.encode("utf-8") + b"\0" for s in strings)
    r = subprocess.run(args, input=data, capture_output=True, timeout=300)
    assert r.returncode == 0, f"tokenize exited {r.returncode}: {r.stderr.decode(errors='replace')}"
    lines = r.stdout.decode().split("\n")
    assert len(lines) == len(strings) + 1 and lines[-1] == ""
    return [[int(x) for x in line.split()] for line in lines[:-1]]


def mismatches(strings, got, want):
    bad = [f"  {s!r}\n    engine {g}\n    hf     {w}"
           for s, g, w in zip(strings, got, want) if g != w]
    return f"{len(bad)} of {len(strings)} differ:\n" + "\n".join(bad[:10]) if bad else ""


# ---- Vocabularies under test ----

@functools.lru_cache(maxsize=None)
def read_fields(path):
    """Every metadata value of a GGUF file (GGUFReader takes seconds on a 50k vocabulary)."""
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def write_variant(src, dst, pre=None, added=()):
    """A copy of src's tokenizer with another pre-tokenizer name and extra added tokens
    ((text, token_type) pairs appended to the vocabulary)."""
    get = read_fields(src).get
    model = get("tokenizer.ggml.model")
    w = gguf.GGUFWriter(str(dst), get("general.architecture"))
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre or get("tokenizer.ggml.pre"))
    w.add_token_list(list(get("tokenizer.ggml.tokens")) + [t for t, _ in added])
    w.add_token_types(list(get("tokenizer.ggml.token_type")) + [ty for _, ty in added])
    if model == "gpt2":
        w.add_token_merges(list(get("tokenizer.ggml.merges")))
    else:
        w.add_token_scores(list(get("tokenizer.ggml.scores")) + [0.0] * len(added))
    for key, add in [("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unknown_token_id", w.add_unk_token_id)]:
        if get("tokenizer.ggml." + key) is not None:
            add(get("tokenizer.ggml." + key))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


CHAT_ADDED = [("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4), ("</think>", 4),
              ("<tool_call>", 4), ("</tool_call>", 4)]
# Normal tokens no merge reaches (GPT-2's own vocabulary has none): only ignore_merges (llama3)
# emits them, for the word "qzxqzxqzx" of the corpus. "\u0120" is the byte-level space.
UNREACHABLE = [("qzxqzxqzx", 1), ("\u0120qzxqzxqzx", 1)]

VOCABS = ["model", "gpt-2", "starcoder", "llama-spm", "gpt-2+llama-bpe", "gpt-2+qwen2",
          "gpt-2+added", "llama-spm+added"]


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    made = {}

    def path_of(name):
        if name == "model":
            p = MODEL if MODEL.is_absolute() else ROOT / MODEL
            if not p.exists():
                pytest.skip(f"model {p} not present (make model)")
            return p
        if name in ("gpt-2", "starcoder", "llama-spm"):
            return GOLDEN / f"ggml-vocab-{name}.gguf"
        if name not in made:
            base, _, variant = name.partition("+")
            src = GOLDEN / f"ggml-vocab-{base}.gguf"
            dst = tmp_path_factory.mktemp("vocab") / f"{name}.gguf"
            added = CHAT_ADDED + (UNREACHABLE if base == "gpt-2" else [])
            made[name] = write_variant(src, dst, pre=None if variant == "added" else variant,
                                       added=added)
        return made[name]

    return path_of


@pytest.fixture(scope="module")
def reference():
    cache = {}

    def ref_of(path):
        if path not in cache:
            cache[path] = hf_reference(path)
        return cache[path]

    return ref_of


# ---- Tests ----

@pytest.mark.parametrize("name", ["gpt-2", "starcoder", "llama-spm"])
def test_reference_matches_golden(name, reference):
    """The reference reproduces llama.cpp's vectors, so the two references agree."""
    path = GOLDEN / f"ggml-vocab-{name}.gguf"
    inputs = (GOLDEN / f"ggml-vocab-{name}.gguf.inp").read_bytes().split(
        b"\n__ggml_vocab_test__\n")[:-1]
    want = [[int(x) for x in line.split()]
            for line in (GOLDEN / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")[:len(inputs)]]
    strings = [s.decode("utf-8") for s in inputs]
    assert len(strings) == 46
    got = hf_encode(reference(path), strings, special=False)
    assert got == want, mismatches(strings, got, want)


@pytest.mark.parametrize("name", VOCABS)
@pytest.mark.parametrize("special", [False, True], ids=["plain", "special"])
def test_tokenizer_matches_hf(name, special, vocab_path, reference):
    """The same ids as HF, with control-token text parsed (HF's default) or not (HF:
    encode_special_tokens)."""
    path = vocab_path(name)
    strings = STRINGS + SPECIAL_STRINGS
    got = engine_encode(path, strings, special=special, decode=False)
    want = hf_encode(reference(path), strings, special=special)
    assert got == want, mismatches(strings, got, want)


@pytest.mark.parametrize("name", VOCABS)
@pytest.mark.parametrize("special", [False, True], ids=["plain", "special"])
def test_tokenizer_roundtrip(name, special, vocab_path, reference):
    """decode(encode(s)) == s (the tool checks it) for every string HF round-trips too. Those HF
    does not: text with a byte the vocabulary has no token for (dropped by both), and for SPM text
    after an added token (both prefix a space to it)."""
    path = vocab_path(name)
    tok = reference(path)
    strings = STRINGS + SPECIAL_STRINGS
    ids = hf_encode(tok, strings, special=special)
    exact = [s for s, i in zip(strings, ids) if tok.decode(i, skip_special_tokens=False) == s]
    assert len(exact) >= 0.9 * len(strings), f"HF round-trips only {len(exact)} strings"
    engine_encode(path, exact, special=special, decode=True)


def test_tokenizer_model_chatml_tokens(vocab_path, reference):
    """On the default model the ChatML markers are single control tokens, and only when parsed."""
    path = vocab_path("model")
    got = engine_encode(path, ["<|im_start|>user\nHi<|im_end|>"], special=True)[0]
    plain = engine_encode(path, ["<|im_start|>"], special=False)[0]
    ref = reference(path)
    start, end = ref.token_to_id("<|im_start|>"), ref.token_to_id("<|im_end|>")
    assert got[0] == start and got[-1] == end and start not in got[1:-1]
    assert len(plain) > 1 and start not in plain

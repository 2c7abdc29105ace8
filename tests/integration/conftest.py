"""Shared fixtures of the integration tests.

Environment (set by tests/run.sh): BUILD (the build directory, default build), MODEL (the default
model, default models/default.gguf). Tests that need the model skip when the file is absent; tests
that need a binary fail when it is missing (the build is part of `make test`).

Token ids of test prompts come from a Hugging Face `tokenizers` BPE built from the GGUF's own
vocabulary and merges (not from the engine's tokenizer, so a tokenizer bug cannot hide a forward
pass bug or the other way round).
"""

import os

# The reference's BLAS uses one core: the machine has two and other work shares it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import ref_llama  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("BUILD", "build"))
if not BUILD.is_absolute():
    BUILD = ROOT / BUILD
MODEL = pathlib.Path(os.environ.get("MODEL", "models/default.gguf"))
if not MODEL.is_absolute():
    MODEL = ROOT / MODEL

# Per-call limit for the binaries: generous for the sanitizer builds, still bounded.
RUN_TIMEOUT_S = float(os.environ.get("LLM_TEST_TIMEOUT", "600"))


class Result:
    def __init__(self, proc):
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def __repr__(self):
        return f"rc={self.rc}\nstdout:\n{self.out[-2000:]!r}\nstderr:\n{self.err[-2000:]!r}"


def run_bin(path, *args, timeout=RUN_TIMEOUT_S, binary=False):
    """Runs a program with stdin closed; returns a Result with rc, out, err (str, or bytes when
    binary)."""
    proc = subprocess.run([str(path), *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)
    if not binary:
        # Generated text may end inside a UTF-8 character: decode leniently.
        proc.stdout = proc.stdout.decode("utf-8", errors="replace")
        proc.stderr = proc.stderr.decode("utf-8", errors="replace")
    return Result(proc)


def built(path):
    """path (a binary of `make all`), or the test fails saying it is missing."""
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it first (make all)")
    return path


def flags_missing_from(text, flags):
    """The flags of a --help list that the text does not mention as whole words."""
    return [f for f in flags if not re.search(rf"(^|[\s,]){re.escape(f)}\b", text, re.M)]


@pytest.fixture(scope="session")
def build_dir():
    return BUILD


@pytest.fixture(scope="session")
def llm_run():
    return built(BUILD / "llm-run")


@pytest.fixture(scope="session")
def model_path():
    if not MODEL.is_file():
        pytest.skip(f"model {MODEL} absent (make model)")
    return MODEL


@pytest.fixture(scope="session")
def ref_q8(model_path):
    return ref_llama.RefModel(str(model_path), "q8")


@pytest.fixture(scope="session")
def ref_f32(model_path):
    return ref_llama.RefModel(str(model_path), "f32")


# ---- Tokenizer for test prompts ----

def hf_tokenizer_from_gguf(path):
    """A `tokenizers` byte-level BPE equal to the GGUF's gpt2-type tokenizer (checked against the
    golden vectors of tests/data/tokenizer by test_hf_tokenizer_matches_golden)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    fields = gguf.GGUFReader(str(path)).fields
    kind = fields["tokenizer.ggml.model"].contents()
    if kind != "gpt2":
        raise NotImplementedError(f"tokenizer model {kind}")
    pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else "default"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder"):
        # GPT-2's split plus every digit on its own.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt-2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        raise NotImplementedError(f"pre-tokenizer {pre}")
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched as whole pieces.
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (3, 4)]
    tok.add_special_tokens(special)
    return tok


class PromptTokenizer:
    def __init__(self, path):
        self.tok = hf_tokenizer_from_gguf(path)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="session")
def tokenizer(model_path):
    return PromptTokenizer(model_path)


def ids_arg(ids):
    return ",".join(str(int(i)) for i in ids)


def read_logits(path, n_vocab):
    data = np.fromfile(path, dtype="<f4")
    if data.size % n_vocab:
        raise AssertionError(f"{path}: {data.size} floats is not a multiple of n_vocab {n_vocab}")
    return data.reshape(-1, n_vocab)


def chatml(user, system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"):
    """The SmolLM2 chat template rendered by hand for one user turn (ChatML)."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


# ---- The HTTP stack (llm-engine + llm-fcgi under spawn-fcgi + lighttpd), tests/integration/stack.py ----

def _require_tool(name):
    """A web server or FastCGI tool from Debian's packages (scripts/setup.sh installs them).
    Missing under CI is a failure; on a developer machine a skip that says what to install."""
    import shutil
    if shutil.which(name) is None and not os.path.exists(name):
        msg = f"{name} is not installed (scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def fcgi_bin():
    path = built(BUILD / "llm-fcgi")
    for tool in ("spawn-fcgi", "lighttpd"):
        _require_tool(tool)
    return path


@pytest.fixture(scope="session")
def require_tool():
    return _require_tool


@pytest.fixture(scope="session")
def api_stack(fcgi_bin, model_path):
    """The default stack for the whole session: one engine, 2 worker processes x 8 threads
    under spawn-fcgi, lighttpd from examples/lighttpd.conf. Tests must leave it as they found it
    (no engine restarts or killed workers here: those tests build their own with make_stack)."""
    from stack import Stack
    # Requests may lower guards (tests that measure streaming switch the content guards off).
    s = Stack(name="api", worker_flags=["--allow-request-guard-overrides"]).start()
    yield s
    s.stop()


@pytest.fixture
def make_stack(fcgi_bin, model_path):
    """A factory of stacks for one test (own engine flags, worker flags, processes); each is
    stopped and checked (exit statuses, no process left behind) at teardown."""
    from stack import Stack
    made = []

    def make(**kw):
        s = Stack(**kw)
        made.append(s)
        return s.start()

    yield make
    for s in made:
        s.stop()


@pytest.fixture(scope="session")
def model_id(api_stack):
    from stack import request
    r = request(api_stack.url, "GET", "/v1/models")
    assert r.status == 200, r
    return r.json()["data"][0]["id"]

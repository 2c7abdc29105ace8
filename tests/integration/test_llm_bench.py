"""llm-bench's command line: `--help` names every flag, and a bad value exits 2 with one line
that names the flag (through the shared cm_parse_int_arg), before any model is loaded. And its
end-to-end load against a real engine: requests that end before --gen tokens are reported with
their reason, since tok/s then counts less work than was asked."""

import re
import tempfile

import pytest

from conftest import BUILD, built, flags_missing_from, run_bin

FLAGS = ["-m", "--model", "-t", "--threads", "--pp", "--tg", "--reps", "--bw-mb", "--json",
         "--label", "--batched", "--backend", "--load", "--clients", "--rounds",
         "--prompt-words", "--gen", "--engine-socket"]


@pytest.fixture(scope="module")
def llm_bench():
    return built(BUILD / "llm-bench")


def test_llm_bench_help_lists_every_flag(llm_bench):
    r = run_bin(llm_bench, "--help")
    assert r.rc == 0, r
    missing = flags_missing_from(r.out, FLAGS)
    assert not missing, f"--help does not mention {missing}"


# The model path does not exist: every one of these must be refused before it is opened.
@pytest.mark.parametrize("args, says", [
    (["-t", "0"], "--threads must be an integer in [1, 256], got '0'"),
    (["--pp", "12x"], "--pp must be an integer"),
    (["--tg", "-1"], "--tg must be an integer"),
    (["--reps", "101"], "--reps must be an integer in [1, 100], got '101'"),
    (["--bw-mb", "63"], "--bw-mb must be an integer in [64, "),
    (["--backend", "gpu"], "--backend must be cpu or cuda, got 'gpu'"),
    (["--load", "unix:/x", "--rounds", "0"], "--rounds must be an integer"),
    (["--load", "unix:/x", "--prompt-words", "abc"], "--prompt-words must be an integer"),
    (["--load", "unix:/x", "--gen", ""], "--gen must be an integer"),
    (["--load", "a", "--load", "b", "--load", "c", "--load", "d", "--load", "e"],
     "at most 4 --load targets"),
], ids=["threads", "pp", "tg", "reps", "bw_mb", "backend", "rounds", "prompt_words", "gen",
        "targets"])
def test_llm_bench_bad_value_exits_2_naming_it(llm_bench, args, says):
    r = run_bin(llm_bench, "-m", "/nonexistent/model.gguf", *args)
    assert r.rc == 2, r
    assert says in r.err, r.err
    assert r.out == "", r.out


def test_llm_bench_without_model_exits_2(llm_bench):
    r = run_bin(llm_bench)
    assert r.rc == 2, r
    assert "-m MODEL is required" in r.err, r.err


# ---- The load against a real engine: short requests are reported, never silently counted ----

@pytest.fixture
def small_ctx_engine(model_path):
    """llm-engine with a 48-token context: a ~25-token prompt then ends generation by the context
    (finish "length") long before 64 tokens."""
    from engine_util import Engine
    with tempfile.TemporaryDirectory(prefix="llm-bl-") as d:
        e = Engine(BUILD / "llm-engine", model_path, d, "-c", "48").start()
        try:
            yield e
        finally:
            assert e.stop() == 0, e.stderr()[-3000:]


def load(llm_bench, eng, gen):
    sock = f"unix:{eng.socket}"
    r = run_bin(llm_bench, "--load", sock, "--engine-socket", str(eng.socket), "--clients", "2",
                "--rounds", "1", "--prompt-words", "20", "--gen", str(gen))
    assert r.rc == 0, r
    line = next((ln for ln in r.out.splitlines() if ln.startswith(f"load {sock} ")), None)
    assert line is not None, r.out
    m = re.search(r"ok (\d+) errors (\d+) \((\d+) tokens in [\d.]+ s\)", line)
    assert m, line
    return r.out, [int(g) for g in m.groups()]


def test_llm_bench_load_reports_requests_that_ended_short(llm_bench, small_ctx_engine):
    out, (ok, errors, tokens) = load(llm_bench, small_ctx_engine, 64)
    assert (ok, errors) == (2, 0), out
    assert 0 < tokens < 2 * 64, out
    assert "2 of 2 requests ended before 64 tokens (length 2)" in out, out


def test_llm_bench_load_full_requests_are_not_short(llm_bench, small_ctx_engine):
    out, (ok, errors, tokens) = load(llm_bench, small_ctx_engine, 4)
    assert (ok, errors, tokens) == (2, 0, 8), out
    assert "ended before" not in out, out

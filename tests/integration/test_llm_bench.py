"""llm-bench's command line: `--help` names every flag, and a bad value exits 2 with one line
that names the flag (through the shared cm_parse_int_arg), before any model is loaded."""

import os
import re

import pytest

from conftest import BUILD, run_bin

FLAGS = ["-m", "--model", "-t", "--threads", "--pp", "--tg", "--reps", "--bw-mb", "--json",
         "--label", "--batched", "--backend", "--load", "--clients", "--rounds",
         "--prompt-words", "--gen", "--engine-socket"]


@pytest.fixture(scope="module")
def llm_bench():
    path = BUILD / "llm-bench"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it first (make all)")
    return path


def test_llm_bench_help_lists_every_flag(llm_bench):
    r = run_bin(llm_bench, "--help")
    assert r.rc == 0, r
    missing = [f for f in FLAGS if not re.search(rf"(^|[\s,]){re.escape(f)}\b", r.out, re.M)]
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

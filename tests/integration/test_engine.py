"""llm-engine, the scheduler daemon, through its wire protocol (common/cm_wire.h) with the real
default model: batching exactness, cancellation in every state, disconnect storms, backpressure
from a reader that never reads, malformed frames, queue and context limits, the socket file, the
shutdown on SIGTERM, and the STATS counters.

Every test starts its own engine on a socket in its temporary directory (engine_util.Engine) with
small settings, and talks to it from Python (engine_util.Conn) or through the C client
$BUILD/tests/tools/engine_client. At teardown each engine gets SIGTERM and must exit 0 with no
sanitizer report. Waits are bounded polls (STATS round trips), never fixed sleeps; no assertion
compares wall-clock time.
"""

import concurrent.futures
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import tempfile
import time

import pytest

from conftest import BUILD, built, run_bin
from engine_util import (ACCEPTED, CANCEL, DONE, ERROR, HELLO, HEADER_BYTES, MODEL_INFO,
                         SLOWDOWN, STATS, SUBMIT, TOKEN, Closed, Conn, Engine, Result, eog_bias,
                         pack_frame, pack_header, scaled, settled, wait_stats)

ENGINE = BUILD / "llm-engine"
CLIENT = BUILD / "tests" / "tools" / "engine_client"

SANITIZER_RE = re.compile(r"AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|"
                          r"ThreadSanitizer|runtime error:")

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "Three primary colors are",
    "The quick brown fox",
    "In 1969, the first astronauts",
    "Water boils at a temperature of",
    "My favourite recipe for bread starts with",
]

# Small settings: the KV pool of 64 MiB holds 91 blocks (1456 positions) of SmolLM2-135M.
SMALL = ["--kv-cache-mb", "64", "--max-seqs", "8", "--max-batch-tokens", "128",
         "--log-level", "warn"]

# A prompt of about a thousand tokens.
LONG_PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 110)


# ---- Fixtures ----

@pytest.fixture(scope="session")
def engine_bin():
    return built(ENGINE)


@pytest.fixture(scope="session")
def client_bin():
    return built(CLIENT)


@pytest.fixture
def sock_dir():
    # Unix socket paths are limited to 107 bytes: a short directory of our own, not tmp_path.
    with tempfile.TemporaryDirectory(prefix="llm-eng-") as d:
        yield d


@pytest.fixture
def engines(engine_bin, model_path, sock_dir):
    """start(*flags, wait=True, **kw) starts an engine; at teardown every engine still running gets
    SIGTERM and each must have exited 0 without a sanitizer report."""
    started = []

    def start(*flags, wait=True, **kw):
        e = Engine(engine_bin, model_path, os.path.join(sock_dir, f"e{len(started)}"), *flags,
                   **kw)
        started.append(e)
        return e.start(wait)

    yield start
    problems = []
    for e in started:
        if e.proc is None:
            continue
        try:
            rc = e.stop(timeout=scaled(30))
        except AssertionError as exc:
            problems.append(str(exc))
            continue
        err = e.stderr()
        if e.expect_rc is not None and rc != e.expect_rc:
            problems.append(f"engine exited {rc}, expected {e.expect_rc}:\n{err[-3000:]}")
        if SANITIZER_RE.search(err):
            problems.append(f"sanitizer report:\n{err[-6000:]}")
    if problems:
        pytest.fail("\n".join(problems))


def run_client(client_bin, sock, *args, timeout=None):
    """Runs engine_client --json; returns (Result, {req: object}, stats or None)."""
    r = run_bin(client_bin, "--socket", sock, "--json", *args,
                timeout=scaled(300) if timeout is None else timeout)
    reqs, stats = {}, None
    for line in r.out.splitlines():
        o = json.loads(line)
        if "stats" in o:
            stats = o["stats"]
        else:
            reqs[o["req"]] = o
    return r, reqs, stats


def alone(conn, prompt, max_tokens, req_id=1, **params):
    """One request run to its end on conn; returns the Result."""
    conn.submit(req_id, prompt, max_tokens=max_tokens, **params)
    r = conn.read_request(req_id)
    assert r.done is not None, r
    return r


def _first_diff(a, b):
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def cancels(s, reason):
    return s["cancels"].get(reason, 0)


def check_usage(r):
    """DONE's usage against what arrived: every sampled token but an EOS / stop token is a TOKEN."""
    u = r.done["usage"]
    extra = 1 if r.done["finish"] in ("eos", "stop_token") else 0
    assert u["completion_tokens"] == len(r.tokens) + extra, r
    if r.accepted is not None:
        assert u["prompt_tokens"] == r.accepted["prompt_tokens"], r


def check_usage_dict(b):
    """The same for a request line of engine_client --json."""
    extra = 1 if b["finish"] in ("eos", "stop_token") else 0
    assert b["usage"]["completion_tokens"] == len(b["ids"]) + extra, b


# ---- The client tool ----

def test_engine_client_help_and_usage(client_bin):
    r = run_bin(client_bin, "--help")
    assert r.rc == 0, r
    for flag in ("--socket", "--prompt", "--prompt-ids", "-n", "--temp", "--seed", "--concurrency",
                 "--requests", "--cancel-after", "--disconnect-after", "--no-read", "--stats",
                 "--json"):
        assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", r.out, re.M), flag
    for args in (["--prompt", "hi"], ["--socket", "x", "--prompt-ids", "1,,2"],
                 ["--socket", "x", "-n", "0", "--prompt", "hi"], ["--socket", "x", "--bogus"],
                 ["--socket", "x", "--prompt", "a", "--cancel-after", "1",
                  "--disconnect-after", "1"]):
        r = run_bin(client_bin, *args)
        assert r.rc == 2, (args, r)
        assert r.err.strip(), args


def test_engine_client_reports_connect_failure(client_bin, sock_dir):
    r, reqs, _ = run_client(client_bin, os.path.join(sock_dir, "absent.sock"), "--prompt", "hi")
    assert r.rc == 1, r
    assert reqs[1]["error"]["code"] == "CLIENT", r
    assert "connect" in reqs[1]["error"]["message"], r


# ---- Batching is exact ----

def test_engine_concurrent_greedy_matches_alone(engines, client_bin, tokenizer):
    e = engines(*SMALL)
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    r, solo, _ = run_client(client_bin, e.socket, *prompts, "-n", "32", "--concurrency", "1")
    assert r.rc == 0, r
    with e.connect() as sc:
        s0 = sc.stats()
        r, batch, _ = run_client(client_bin, e.socket, *prompts, "-n", "32", "--concurrency", "8")
        assert r.rc == 0, r
        s1 = sc.stats()
    assert sorted(solo) == sorted(batch) == list(range(1, 9))
    for a in solo.values():
        assert a["finish"] in ("length", "eos") and a["ids"], a
        # TOKEN frames carry the token's text: it decodes like the ids.
        ref = tokenizer.decode(a["ids"])
        if "\ufffd" not in ref and "\ufffd" not in a["text"]:
            assert a["text"] == ref, (a["text"], ref)
    # The 8 really ran together: more than one decode token per forward pass on average.
    ticks = s1["ticks"] - s0["ticks"]
    decode = s1["decode_tokens"] - s0["decode_tokens"]
    assert decode == sum(len(b["ids"]) - 1 + (b["finish"] == "eos") for b in batch.values())
    assert decode >= 2 * ticks, f"{decode} decode tokens in {ticks} ticks: not batched"
    for b in batch.values():
        assert b["finish"] in ("length", "eos") and b["ids"], b
        check_usage_dict(b)
    differ = [i for i in solo if batch[i]["ids"] != solo[i]["ids"]]
    assert not differ, ("batched differs from alone for " +
                        "; ".join(f"request {i} ({PROMPTS[i - 1]!r}) from token "
                                  f"{_first_diff(solo[i]['ids'], batch[i]['ids'])}"
                                  for i in differ))
    for i in solo:
        a, b = solo[i], batch[i]
        assert b["text"] == a["text"] and b["finish"] == a["finish"], (a, b)
        assert b["usage"] == a["usage"], (a, b)


def test_engine_multiple_submits_on_one_connection(engines):
    e = engines(*SMALL)
    with e.connect() as c:
        ref = {i: alone(c, PROMPTS[i], 20, req_id=100 + i).ids for i in range(3)}
        for i in range(3):
            c.submit(10 + i, PROMPTS[i], max_tokens=20)
        res = {10 + i: Result(10 + i) for i in range(3)}
        while not all(r.ended for r in res.values()):
            f = c.recv()
            assert f.req_id in res, f
            res[f.req_id].add(f)
        for i in range(3):
            r = res[10 + i]
            assert r.done is not None, r
            check_usage(r)
            assert r.ids == ref[i], (i, r.ids, ref[i])


# ---- Cancellation frees every block, in every state ----

def test_engine_cancel_while_queued(engines):
    e = engines("--max-seqs", "1", "--max-batch-tokens", "64", "--kv-cache-mb", "64",
                "--log-level", "warn")
    with e.connect() as sc, e.connect() as a, e.connect() as b:
        a.submit(1, PROMPTS[0], max_tokens=1000, logit_bias=eog_bias(a.info))
        ra = a.read_request(1, until=lambda r: len(r.tokens) >= 1)
        b.submit(7, PROMPTS[1], max_tokens=8)
        wait_stats(sc, lambda s: s["queued"] == 1 and s["running"] == 1, "b queued behind a")
        b.cancel(7, "test_queued")
        rb = b.read_request(7)
        assert rb.done is not None, rb
        assert rb.done["finish"] == "cancelled" and rb.done["guard"] == "test_queued", rb
        assert rb.tokens == [] and rb.done["usage"]["completion_tokens"] == 0, rb
        s = wait_stats(sc, lambda s: s["queued"] == 0, "queue empty after the cancel")
        assert s["running"] == 1 and cancels(s, "test_queued") == 1, s
        a.cancel(1, "test_cleanup")
        a.read_request(1, result=ra)
        assert ra.done["finish"] == "cancelled" and ra.done["guard"] == "test_cleanup", ra
        check_usage(ra)
        # Both connections are still open: the cancels, not a disconnect, freed the blocks.
        s = wait_stats(sc, settled, "everything freed")
        assert s["connections"] == 3, s


def test_engine_cancel_during_prefill(engines):
    e = engines("--max-seqs", "2", "--max-batch-tokens", "16", "--kv-cache-mb", "64",
                "--log-level", "warn")
    with e.connect() as sc, e.connect() as c:
        c.submit(1, LONG_PROMPT, max_tokens=4)
        r = c.read_request(1, until=lambda r: r.accepted is not None)
        n_prompt = r.accepted["prompt_tokens"]
        assert n_prompt > 500, r  # about 60 ticks of prefill at 16 tokens a tick
        c.cancel(1, "test_prefill")
        c.read_request(1, result=r)
        assert r.done is not None, r
        assert r.done["finish"] == "cancelled" and r.done["guard"] == "test_prefill", r
        assert r.tokens == [] and r.done["usage"]["completion_tokens"] == 0, \
            f"the prefill of {n_prompt} tokens finished before the cancel took effect: {r}"
        s = wait_stats(sc, settled, "blocks freed after a cancel in prefill")
        assert cancels(s, "test_prefill") == 1, s
        assert s["prefill_tokens"] < n_prompt, s
        assert s["connections"] == 2, s
        # The connection stays usable.
        r2 = alone(c, PROMPTS[0], 4, req_id=2)
        assert r2.done["finish"] in ("length", "eos"), r2


def test_engine_cancel_while_decoding(engines):
    e = engines(*SMALL)
    with e.connect() as sc, e.connect() as c:
        c.submit(1, PROMPTS[2], max_tokens=500, logit_bias=eog_bias(c.info))
        r = c.read_request(1, until=lambda r: len(r.tokens) >= 5)
        c.cancel(1, "test_decode")
        c.read_request(1, result=r)
        assert r.done["finish"] == "cancelled" and r.done["guard"] == "test_decode", r
        assert 5 <= len(r.tokens) < 500, r
        check_usage(r)
        s = wait_stats(sc, settled, "blocks freed after a cancel in decode")
        assert cancels(s, "test_decode") == 1 and s["connections"] == 2, s
        # A CANCEL for a request that already ended changes nothing and gets nothing.
        c.cancel(1, "late")
        r2 = alone(c, PROMPTS[3], 6, req_id=2)
        assert r2.done["finish"] in ("length", "eos"), r2
        assert cancels(sc.stats(), "late") == 0


def test_engine_client_cancel_after_k_tokens(engines, client_bin):
    e = engines(*SMALL)
    r, reqs, stats = run_client(client_bin, e.socket, "--prompt", PROMPTS[4], "-n", "300",
                                "--ignore-eos", "--cancel-after", "3", "--cancel-reason",
                                "guard_x", "--requests", "2", "--concurrency", "2", "--stats")
    assert r.rc == 0, r
    for o in reqs.values():
        assert o["finish"] == "cancelled" and o["guard"] == "guard_x", o
        assert 3 <= len(o["ids"]) < 300 and o["usage"]["completion_tokens"] == len(o["ids"]), o
    assert stats["cancels"].get("guard_x") == 2, stats
    with e.connect() as sc:
        wait_stats(sc, lambda s: settled(s, connections=1), "blocks freed")


def test_engine_client_no_read_disconnect_and_load_modes(engines, client_bin):
    e = engines(*SMALL)
    # --no-read holds the request without reading, then drains it.
    r, reqs, _ = run_client(client_bin, e.socket, "--prompt", PROMPTS[0], "-n", "20",
                            "--ignore-eos", "--no-read", "--hold-ms", "200")
    assert r.rc == 0, r
    assert reqs[1]["finish"] == "length" and len(reqs[1]["ids"]) == 20, reqs
    # --disconnect-after closes mid-stream: the engine cancels with client_disconnect.
    r, reqs, _ = run_client(client_bin, e.socket, "--prompt", PROMPTS[1], "-n", "200",
                            "--ignore-eos", "--disconnect-after", "3")
    assert r.rc == 0, r
    assert reqs[1]["disconnected"] and len(reqs[1]["ids"]) == 3 and reqs[1]["finish"] is None, reqs
    with e.connect() as sc:
        s = wait_stats(sc, lambda s: settled(s, connections=1), "the disconnect cancelled")
        assert cancels(s, "client_disconnect") == 1, s
    # Load mode: no per-request output, one summary line with the aggregate rate.
    r = run_bin(client_bin, "--socket", e.socket, "--prompt", PROMPTS[2], "--prompt", PROMPTS[3],
                "-n", "16", "--ignore-eos", "-c", "4", "-r", "8", "-q")
    assert r.rc == 0 and r.out == "", r
    m = re.search(r"^summary: requests=8 ok=8 errors=0 completion_tokens=128 wall_s=([0-9.]+) "
                  r"tok_s=([0-9.]+) ", r.err, re.M)
    assert m and float(m.group(2)) > 0, r


def test_engine_stop_token_and_seed(engines):
    e = engines(*SMALL)
    with e.connect() as c:
        ref = alone(c, PROMPTS[1], 12)
        stop = ref.ids[3]
        k = ref.ids.index(stop)
        r = alone(c, PROMPTS[1], 12, req_id=2, stop_ids=[stop])
        assert r.done["finish"] == "stop_token" and r.ids == ref.ids[:k], (ref, r)
        check_usage(r)
        # Same seed, same sample; the seed matters.
        runs = [alone(c, PROMPTS[2], 24, req_id=10 + i, temperature=1.0, seed=seed).ids
                for i, seed in enumerate((7, 7, 8))]
        assert runs[0] == runs[1], runs
        assert runs[0] != runs[2], runs


# ---- Disconnects at random points leak nothing ----

def _chaos_client(path, seed, info):
    """One client that does something and disconnects at a random point; returns what it did."""
    rng = random.Random(seed)
    action = rng.choice(["before_hello", "partial_header", "hello_no_read", "after_hello",
                         "pipelined_submit", "after_submit", "after_accepted", "mid_stream",
                         "cancel_and_close", "complete", "two_submits_mid_stream"])
    n = rng.randint(2, 12)
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": n, "temperature": 0}
    c = Conn(path)
    try:
        if action == "before_hello":
            return action
        if action == "partial_header":
            c.send(pack_frame(HELLO, 0, {"version": 1})[:rng.randint(1, HEADER_BYTES - 1)])
            return action
        if action == "hello_no_read":
            c.send_frame(HELLO, 0, {"version": 1})
            return action
        if action == "pipelined_submit":
            c.send(pack_frame(HELLO, 0, {"version": 1}) + pack_frame(SUBMIT, 1, body))
            return action
        c.hello()
        if action == "after_hello":
            return action
        c.send_frame(SUBMIT, 1, body)
        if action == "after_submit":
            return action
        if action == "two_submits_mid_stream":
            c.send_frame(SUBMIT, 2, dict(body, prompt=rng.choice(PROMPTS)))
        k = rng.randint(1, n - 1)
        got = 0
        while True:
            f = c.recv()
            if f.type == ACCEPTED and action == "after_accepted":
                return action
            if f.type == TOKEN:
                got += 1
                if got >= k and action in ("mid_stream", "two_submits_mid_stream"):
                    return action
                if got >= k and action == "cancel_and_close":
                    c.cancel(1, "chaos")
                    return action
            if f.type in (DONE, ERROR) and f.req_id == 1:
                return action + ("" if f.type == DONE else "_error")
    except (Closed, BrokenPipeError, ConnectionResetError):
        return action + "_closed_by_engine"
    finally:
        c.close()


def test_engine_random_disconnects_leak_nothing(engines):
    e = engines("--kv-cache-mb", "64", "--max-seqs", "8", "--max-batch-tokens", "64",
                "--max-queue", "256", "--log-level", "warn")
    with e.connect() as sc:
        wait_stats(sc, lambda s: s["connections"] == 1, "only the stats connection")
        fds_before = e.fd_count()
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            actions = list(pool.map(lambda i: _chaos_client(e.socket, 1234 + i, e.info),
                                    range(200)))
        assert e.proc.poll() is None, "the engine died"
        s = wait_stats(sc, lambda s: settled(s, connections=1),
                       "all 200 clients gone and every block free")
        fds_after = e.fd_count()
    closed_early = [a for a in actions if a.endswith("_closed_by_engine")]
    assert not closed_early, f"the engine closed healthy connections: {closed_early}"
    assert fds_after == fds_before, f"descriptors: {fds_before} before, {fds_after} after"
    assert s["requests_submitted"] == s["requests_finished"], s
    assert s["kv_blocks_used"] == 0 and s["paused"] == 0, s
    assert cancels(s, "client_disconnect") > 0, (s, sorted(set(actions)))
    # The engine still serves.
    with e.connect() as c:
        r = alone(c, PROMPTS[0], 4)
        assert r.done["finish"] in ("length", "eos"), r


# ---- A reader that never reads ----

def test_engine_slow_reader_does_not_slow_others(engines):
    flags = ("--kv-cache-mb", "128", "--max-seqs", "8", "--max-batch-tokens", "128",
             "--out-buffer-kb", "1", "--log-level", "warn")
    n = 32
    prompts = PROMPTS[:3]
    # The stall limit must outlast the window in which the others run. That window is not a
    # constant (a sanitizer build, a loaded machine), so it is sized from this machine's own
    # speed: the references run one after another on a first engine, and the limit is four times
    # that (the window runs them together), never under 4 s scaled.
    r0 = engines(*flags)
    with r0.connect() as c:
        t0 = time.monotonic()
        ref = [alone(c, p, n, req_id=i + 1) for i, p in enumerate(prompts)]
        t_ref = time.monotonic() - t0
    r0.stop()
    stall_ms = int(max(scaled(4000), 4000 * t_ref))
    e = engines(*flags, "--max-stall-ms", str(stall_ms))
    with e.connect() as sc, e.connect() as stuck:
        stuck.submit(1, PROMPTS[5], max_tokens=2000, logit_bias=eog_bias(stuck.info))
        # It fills the socket buffer, then its output buffer: paused, still holding its blocks.
        s0 = wait_stats(sc, lambda s: s["paused"] == 1, "the stuck reader paused")
        assert s0["running"] == 1 and s0["kv_blocks_used"] > 0, s0
        normal = [e.connect() for _ in prompts]
        for i, (c, p) in enumerate(zip(normal, prompts)):
            c.submit(i + 1, p, max_tokens=n)
        got = [c.read_request(i + 1) for i, c in enumerate(normal)]
        s1 = sc.stats()
        for c in normal:
            c.close()
        assert all(r.done is not None for r in got), got
        assert s1["paused"] == 1 and cancels(s1, "slow_reader") == 0, \
            f"the stuck reader was cancelled within the window: raise --max-stall-ms: {s1}"
        # Tick accounting over the window: only the normal clients' work was computed...
        comp = [r.done["usage"]["completion_tokens"] for r in got]
        prompt = [r.done["usage"]["prompt_tokens"] for r in got]
        d = {k: s1[k] - s0[k] for k in ("ticks", "decode_tokens", "batch_tokens",
                                        "generated_tokens")}
        assert d["generated_tokens"] == sum(comp), (d, comp)
        assert d["decode_tokens"] == sum(c - 1 for c in comp), (d, comp)
        assert d["batch_tokens"] == sum(prompt) + sum(c - 1 for c in comp), (d, comp, prompt)
        # ...and the normal clients were decoded together in every tick: each needs one prefill
        # tick and c - 1 decode ticks; their submits arrive within a tick or so of each other.
        bound = max(comp) + len(got)
        assert d["ticks"] <= bound, \
            (f"{d['decode_tokens']} decode tokens in {d['ticks']} ticks: fewer than "
             f"{d['decode_tokens'] / bound:.2f} per tick while the stuck reader was paused", d)
        # The stuck reader is cancelled after --max-stall-ms, and its blocks come back.
        s2 = wait_stats(sc, lambda s: cancels(s, "slow_reader") == 1 and settled(s),
                        "the stuck reader cancelled", timeout=scaled(60) + stall_ms / 1000)
        assert s2["finished_by"]["cancelled"] == s0["finished_by"]["cancelled"] + 1, s2
        # Reading now, it finds its tokens and a DONE naming the reason.
        r = stuck.read_request(1)
        assert r.done is not None, r
        assert r.done["finish"] == "cancelled" and r.done["guard"] == "slow_reader", r
        check_usage(r)
    # The normal clients were not starved: each ran to its end (max_tokens or EOS).
    for a, b in zip(ref, got):
        assert b.done is not None and b.done["finish"] in ("length", "eos"), (a, b)
        check_usage(b)
    # And exactly the tokens they get alone (the kernels are batch-invariant, see
    # test_engine_concurrent_greedy_matches_alone).
    for a, b in zip(ref, got):
        assert b.ids == a.ids, (a, b)


# ---- Malformed frames ----

def _hello_bytes():
    return pack_frame(HELLO, 0, {"version": 1})


MALFORMED = {
    # name: (bytes sent, accepted ERROR codes)
    "bad_magic": (pack_frame(HELLO, 0, {"version": 1}, magic=0x4C4C4D58), {"EPROTO"}),
    "bad_version": (pack_frame(HELLO, 0, {"version": 1}, version=2), {"EPROTO"}),
    "unknown_type": (_hello_bytes() + pack_frame(77, 1, b"{}"), {"EPROTO"}),
    "type_zero": (_hello_bytes() + pack_frame(0, 1, b""), {"EPROTO"}),
    "nonzero_flags": (_hello_bytes() + pack_frame(STATS, 0, b"", flags=4), {"EPROTO"}),
    "engine_to_worker_type": (_hello_bytes() + pack_frame(TOKEN, 1, bytes(16)), {"EPROTO"}),
    "oversize_len": (_hello_bytes() + pack_header(SUBMIT, 1, 65537), {"EMSGSIZE"}),
    "huge_len": (_hello_bytes() + pack_header(SUBMIT, 1, 0xFFFFFFFF), {"EMSGSIZE"}),
    "oversize_before_hello": (pack_header(HELLO, 0, 1 << 30), {"EMSGSIZE"}),
    "submit_before_hello": (pack_frame(SUBMIT, 1, {"prompt": "hi", "max_tokens": 2}),
                            {"EPROTO"}),
    "hello_twice": (_hello_bytes() + _hello_bytes(), {"EPROTO"}),
    "hello_not_json": (pack_frame(HELLO, 0, b"hello"), {"EPROTO"}),
    "submit_invalid_json": (_hello_bytes() + pack_frame(SUBMIT, 1, b'{"prompt": "hi", "max_'),
                            {"EPROTO"}),
    "submit_not_object": (_hello_bytes() + pack_frame(SUBMIT, 1, b"[1, 2]"), {"EPROTO"}),
    "submit_trailing_garbage": (_hello_bytes() +
                                pack_frame(SUBMIT, 1, b'{"prompt": "hi", "max_tokens": 2} x'),
                                {"EPROTO"}),
    "submit_too_deep": (_hello_bytes() +
                        pack_frame(SUBMIT, 1, b'{"prompt": "hi", "max_tokens": 2, "x": ' +
                                   b"[" * 40 + b"]" * 40 + b"}"), {"EPROTO", "EINVAL"}),
    "submit_bad_utf8": (_hello_bytes() +
                        pack_frame(SUBMIT, 1, b'{"prompt": "\xff\xfe", "max_tokens": 2}'),
                        {"EPROTO", "EINVAL"}),
    "submit_max_tokens_zero": (_hello_bytes() +
                               pack_frame(SUBMIT, 1, {"prompt": "hi", "max_tokens": 0}),
                               {"EINVAL"}),
    "submit_no_max_tokens": (_hello_bytes() + pack_frame(SUBMIT, 1, {"prompt": "hi"}),
                             {"EINVAL"}),
    "submit_prompt_wrong_type": (_hello_bytes() +
                                 pack_frame(SUBMIT, 1, {"prompt": 5, "max_tokens": 2}),
                                 {"EINVAL"}),
    "submit_two_prompts": (_hello_bytes() +
                           pack_frame(SUBMIT, 1, {"prompt": "hi", "prompt_ids": [1],
                                                  "max_tokens": 2}), {"EINVAL"}),
    "submit_bad_temperature": (_hello_bytes() +
                               pack_frame(SUBMIT, 1, {"prompt": "hi", "max_tokens": 2,
                                                      "temperature": -1}), {"EINVAL"}),
    "submit_bad_top_p": (_hello_bytes() +
                         pack_frame(SUBMIT, 1, {"prompt": "hi", "max_tokens": 2, "top_p": 0}),
                         {"EINVAL"}),
    "cancel_bad_reason": (_hello_bytes() + pack_frame(CANCEL, 1, {"reason": "no spaces!"}),
                          {"EINVAL", "EPROTO"}),
    "stats_with_payload": (_hello_bytes() + pack_frame(STATS, 0, b"{}"), {"EPROTO"}),
}


def _expect_error_then_close(path, data, codes):
    with Conn(path) as c:
        try:
            c.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before all was sent: the ERROR is still readable
        frames = c.wait_closed()
    frames = [f for f in frames if f.type != MODEL_INFO]
    assert len(frames) == 1 and frames[0].type == ERROR, frames
    err = frames[0].json()
    assert err["code"] in codes, err
    assert err.get("message"), err
    return err


@pytest.mark.parametrize("name", list(MALFORMED))
def test_engine_malformed_frame_closes_only_its_connection(engines, name):
    e = engines(*SMALL, "--max-frame-bytes", "65536")
    assert e.info["max_payload"] == 65536
    with e.connect() as sc, e.connect() as c:
        ref = alone(c, PROMPTS[0], 24, req_id=1)
        c.submit(2, PROMPTS[0], max_tokens=24)
        r = c.read_request(2, until=lambda r: len(r.tokens) >= 1)
        data, codes = MALFORMED[name]
        _expect_error_then_close(e.socket, data, codes)
        c.read_request(2, result=r)
        assert r.ids == ref.ids, (ref, r)
        s = wait_stats(sc, lambda s: settled(s, connections=2), "the bad connection closed")
        assert s["requests_submitted"] == s["requests_finished"] == 2, s


def test_engine_truncated_frames_then_close(engines):
    e = engines(*SMALL)
    with e.connect() as sc, e.connect() as c:
        c.submit(1, PROMPTS[1], max_tokens=24)
        r = c.read_request(1, until=lambda r: len(r.tokens) >= 1)
        cuts = [_hello_bytes()[:10],  # half a header
                _hello_bytes()[:HEADER_BYTES + 3],  # header, part of the payload
                _hello_bytes() + pack_frame(SUBMIT, 1, {"prompt": "hi", "max_tokens": 4})[:30],
                _hello_bytes() + pack_header(SUBMIT, 1, 100) + b"{" * 10]
        for data in cuts:
            with Conn(e.socket) as bad:
                bad.send(data)
                bad.sock.shutdown(socket.SHUT_WR)
                frames = bad.wait_closed()
                assert all(f.type in (MODEL_INFO, ERROR) for f in frames), frames
        c.read_request(1, result=r)
        assert r.done is not None and r.done["finish"] in ("length", "eos"), r
        wait_stats(sc, lambda s: settled(s, connections=2), "the truncated connections closed")


def test_engine_submit_over_max_frame_bytes(engines):
    e = engines(*SMALL, "--max-frame-bytes", "16384")
    assert e.info["max_payload"] == 16384
    body = json.dumps({"prompt": "x" * 20000, "max_tokens": 2}).encode()
    err = _expect_error_then_close(e.socket, _hello_bytes() + pack_frame(SUBMIT, 1, body),
                                   {"EMSGSIZE"})
    assert err


# ---- Limits ----

def test_engine_full_queue_answers_eagain(engines):
    e = engines("--max-seqs", "1", "--max-queue", "1", "--max-batch-tokens", "64",
                "--kv-cache-mb", "64", "--log-level", "warn")
    with e.connect() as sc, e.connect() as a, e.connect() as b, e.connect() as c:
        a.submit(1, PROMPTS[0], max_tokens=1000, logit_bias=eog_bias(a.info))
        ra = a.read_request(1, until=lambda r: len(r.tokens) >= 1)
        b.submit(1, PROMPTS[1], max_tokens=4)
        wait_stats(sc, lambda s: s["queued"] == 1, "b queued")
        c.submit(1, PROMPTS[2], max_tokens=4)
        rc = c.read_request(1)
        assert rc.error is not None and rc.done is None, rc
        assert rc.error["code"] == "EAGAIN" and rc.error.get("retry_after_ms", 0) > 0, rc
        s = sc.stats()
        assert s["requests_rejected_full"] == 1 and s["queued"] == 1, s
        a.cancel(1, "done_with_a")
        a.read_request(1, result=ra)
        assert ra.done["finish"] == "cancelled", ra
        rb = b.read_request(1)
        assert rb.done["finish"] in ("length", "eos"), rb
        # EAGAIN is not a protocol error: the same connection may retry.
        r2 = alone(c, PROMPTS[2], 4, req_id=2)
        assert r2.done["finish"] in ("length", "eos"), r2
        wait_stats(sc, lambda s: settled(s, connections=4), "all freed")


def test_engine_prompt_longer_than_context_is_e2big(engines):
    e = engines(*SMALL, "--ctx", "64")
    assert e.info["n_ctx"] == 64
    with e.connect() as sc, e.connect() as c:
        for rid, kw in ((1, {"prompt_ids": [504] * 64}), (2, {"prompt_ids": [504] * 1000}),
                        (3, {"prompt": LONG_PROMPT})):
            c.submit(rid, max_tokens=4, **kw)
            r = c.read_request(rid)
            assert r.error is not None and r.error["code"] == "E2BIG" and r.done is None, r
        # The connection stays usable; a prompt of n_ctx - 1 fits and gets one token.
        r = alone(c, None, 10, req_id=4, prompt_ids=[504] * 63)
        assert r.done["finish"] == "length" and len(r.tokens) == 1, r
        s = wait_stats(sc, settled, "all freed")
        assert s["requests_submitted"] == s["requests_finished"] == 1, s


def test_engine_prompt_larger_than_kv_pool_is_e2big(engines):
    e = engines("--kv-cache-mb", "2", "--max-seqs", "2", "--max-batch-tokens", "64",
                "--log-level", "warn")
    with e.connect() as c:
        total = c.stats()["kv_blocks_total"]
        assert 0 < total * 16 < e.info["n_ctx"]
        c.submit(1, None, max_tokens=2, prompt_ids=[504] * (total * 16 + 1))
        r = c.read_request(1)
        assert r.error is not None and r.error["code"] == "E2BIG", r


def test_engine_deadline_finishes_request(engines):
    e = engines(*SMALL)
    with e.connect() as sc, e.connect() as c:
        c.submit(1, PROMPTS[0], max_tokens=1000, logit_bias=eog_bias(c.info), deadline_ms=300)
        r = c.read_request(1)
        assert r.done is not None and r.done["finish"] == "deadline", r
        assert len(r.tokens) < 1000, r
        wait_stats(sc, settled, "freed after the deadline")


def test_engine_logprobs_when_asked(engines):
    e = engines(*SMALL)
    with e.connect() as c:
        r = alone(c, PROMPTS[0], 6, logprobs=True, top_logprobs=3)
        for t in r.tokens:
            assert t["flags"] & 1 and len(t["top"]) == 3, t
            assert t["top"][0][0] == t["id"] and t["top"][0][1] == pytest.approx(t["logprob"]), t
            # Each alternative comes with its text; the sampled one's is the token's own.
            assert t["flags"] & 4 and len(t["top_text"]) == 3, t
            assert t["top_text"][0] == t["text"] or t["flags"] & 2, t
            assert all(len(x) > 0 for x in t["top_text"]), t
        r = alone(c, PROMPTS[0], 6, req_id=2)
        assert all(t["top"] == [] for t in r.tokens), r


# ---- The socket file ----

def test_engine_second_engine_on_live_socket_exits_1(engines):
    e1 = engines(*SMALL)
    e2 = engines(*SMALL, socket_path=e1.socket, wait=False)
    e2.expect_rc = 1
    rc = e2.proc.wait(timeout=scaled(60))
    assert rc == 1, e2.stderr()
    lines = [l for l in e2.stderr().splitlines() if l.startswith("llm-engine:")]
    assert len(lines) == 1 and str(e1.socket) in lines[0], e2.stderr()
    assert not SANITIZER_RE.search(e2.stderr())
    # The first engine keeps its socket.
    assert stat.S_ISSOCK(os.stat(e1.socket).st_mode)
    with e1.connect() as c:
        assert alone(c, PROMPTS[0], 3).done["finish"] in ("length", "eos")


def test_engine_replaces_stale_socket_with_mode_0660(engines, sock_dir):
    path = os.path.join(sock_dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    e = engines(*SMALL, socket_path=path, umask=0)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o660, oct(mode)
    with e.connect() as c:
        assert alone(c, PROMPTS[0], 3).done["finish"] in ("length", "eos")


def test_engine_refuses_path_that_is_not_a_socket(engines, sock_dir):
    path = os.path.join(sock_dir, "regular")
    with open(path, "w") as f:
        f.write("keep me\n")
    e = engines(*SMALL, socket_path=path, wait=False)
    e.expect_rc = 1
    assert e.proc.wait(timeout=scaled(60)) == 1, e.stderr()
    with open(path) as f:
        assert f.read() == "keep me\n"


# ---- Shutdown ----

def test_engine_sigterm_lets_running_request_finish(engines):
    e = engines(*SMALL, "--grace-seconds", str(int(scaled(30))))
    with e.connect() as c:
        c.submit(1, PROMPTS[0], max_tokens=150, logit_bias=eog_bias(c.info))
        r = c.read_request(1, until=lambda r: len(r.tokens) >= 1)
        e.proc.send_signal(signal.SIGTERM)
        # It stops accepting while the request still runs (bounded polling; a full backlog
        # counts as still accepting).
        for _ in range(int(500 * SLOWDOWN)):
            try:
                Conn(e.socket, timeout=scaled(5)).close()
            except (FileNotFoundError, ConnectionRefusedError):
                break
            except BlockingIOError:
                pass
            time.sleep(0.01)  # pacing between connection attempts
        else:
            raise AssertionError("the engine still accepts connections after SIGTERM")
        assert e.proc.poll() is None, "the engine exited before its request finished"
        c.read_request(1, result=r)
        assert r.done is not None and r.done["finish"] == "length", r
        assert len(r.tokens) == 150, r
    assert e.stop() == 0, e.stderr()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_engine_signal_cancels_after_grace(engines, sig):
    e = engines("--kv-cache-mb", "128", "--max-seqs", "4", "--max-batch-tokens", "64",
                "--grace-seconds", "1", "--log-level", "warn")
    with e.connect() as c:
        c.submit(1, PROMPTS[1], max_tokens=5000, logit_bias=eog_bias(c.info))
        r = c.read_request(1, until=lambda r: len(r.tokens) >= 2)
        e.proc.send_signal(sig)
        c.read_request(1, result=r)
        assert r.done is not None, r
        assert r.done["finish"] == "cancelled" and r.done["guard"] == "shutdown", r
        check_usage(r)
    assert e.stop(timeout=scaled(60)) == 0, e.stderr()


def test_engine_sigterm_with_stuck_reader_exits(engines):
    """A reader that never reads must not keep the engine from exiting after the grace period."""
    e = engines("--kv-cache-mb", "128", "--max-seqs", "4", "--max-batch-tokens", "64",
                "--out-buffer-kb", "1", "--grace-seconds", "1", "--log-level", "warn")
    stuck = e.connect()
    try:
        stuck.submit(1, PROMPTS[5], max_tokens=2000, logit_bias=eog_bias(stuck.info))
        with e.connect() as sc:
            wait_stats(sc, lambda s: s["paused"] == 1, "the stuck reader paused")
        e.proc.send_signal(signal.SIGTERM)
        try:
            rc = e.proc.wait(timeout=scaled(15))
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, ("the engine did not exit within 15 s of SIGTERM (grace 1 s) while a "
                         "client that does not read held a connection open")
    finally:
        stuck.close()


# ---- STATS ----

def test_engine_stats_counters_add_up(engines, client_bin):
    e = engines(*SMALL)
    prompts = [a for p in PROMPTS[:4] for a in ("--prompt", p)]
    r1, reqs, _ = run_client(client_bin, e.socket, *prompts, "-n", "12", "--requests", "12",
                             "--concurrency", "4")
    assert r1.rc == 0, r1
    r2, cancelled, stats = run_client(client_bin, e.socket, "--prompt", PROMPTS[5], "-n", "40",
                                      "--ignore-eos", "--cancel-after", "2", "--requests", "2",
                                      "--concurrency", "2", "--stats")
    assert r2.rc == 0, r2
    allr = list(reqs.values()) + list(cancelled.values())
    s = stats
    for k in ("requests_submitted", "requests_finished", "requests_rejected_full",
              "prompt_tokens", "generated_tokens", "running", "queued", "paused",
              "kv_blocks_used", "kv_blocks_total", "ticks", "batch_tokens", "decode_tokens",
              "connections", "cancels", "finished_by", "ttft_ms", "itl_ms"):
        assert k in s, k
    assert s["requests_submitted"] == s["requests_finished"] == 14, s
    assert sum(s["finished_by"].values()) == 14, s
    assert s["finished_by"]["cancelled"] == 2 and s["cancels"].get("client_cancel") == 2, s
    assert s["finished_by"]["length"] + s["finished_by"]["eos"] == 12, s
    comp = [o["usage"]["completion_tokens"] for o in allr]
    assert s["generated_tokens"] == sum(comp), (s, comp)
    assert s["prompt_tokens"] == sum(o["usage"]["prompt_tokens"] for o in allr), s
    assert s["requests_rejected_full"] == 0 and s["kv_blocks_total"] > 0, s
    assert s["connections"] == 1, s  # the stats connection itself
    assert s["ticks"] <= s["batch_tokens"] and s["decode_tokens"] <= s["batch_tokens"], s
    if s.get("preemptions", 0) == 0 and "prefill_tokens" in s:
        assert s["batch_tokens"] == s["prefill_tokens"] + s["decode_tokens"], s
        assert s["prefill_tokens"] == s["prompt_tokens"], s
    # Histograms: one TTFT per request with a token, one ITL per later token.
    n_first = sum(1 for c in comp if c > 0)
    assert s["ttft_ms"]["count"] == n_first, s["ttft_ms"]
    assert s["itl_ms"]["count"] == sum(c - 1 for c in comp if c > 0), (s["itl_ms"], comp)
    for h in (s["ttft_ms"], s["itl_ms"]):
        counts = [b[1] for b in h["buckets"]]
        assert counts == sorted(counts) and counts[-1] == h["count"], h
        les = [b[0] for b in h["buckets"][:-1]]
        assert les == sorted(les), h
        assert h["sum"] > 0, h


def test_engine_default_prefill_steps_are_256_tokens(engines):
    """Without --max-batch-tokens a long prompt is prefilled in 256-token steps on the CPU (a
    smaller step lowers TTFT and inter-token stalls under concurrency at the same throughput,
    bench/NOTES.md); the value given on the command line still wins."""
    prompt = " ".join(f"word{i}" for i in range(300))
    for flags, step in (((), 256), (("--max-batch-tokens", "512"), 512)):
        e = engines(*flags)
        with e.connect() as c:
            s0 = c.stats()
            r = alone(c, prompt, 1)
            s1 = c.stats()
        n = r.accepted["prompt_tokens"]
        assert n > 512, n
        assert s1["ticks"] - s0["ticks"] == -(-n // step), (n, step, s0, s1)
        assert s1["batch_tokens"] - s0["batch_tokens"] == n, (s0, s1)
        e.stop()

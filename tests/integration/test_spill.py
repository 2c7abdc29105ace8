"""Spill to disk (issue 6) end to end: llm-engine with a KV cache deliberately too small for its
load preempts sequences by writing their KV cache to --spill-dir and restores them later.

Every greedy output must equal the same request's output from an engine with enough KV (the forward
pass is batch-invariant, so an uninterrupted run is the reference); spills and restores must have
been counted; a cancel or a closed connection while a sequence is on disk deletes its file; with
LLM_ENGINE_SPILL_FAULT making spill I/O fail, the engine falls back to recompute and the outputs
are still exact. At the end the spill directory is empty and the engine holds no KV blocks.
"""

import os
import struct
import tempfile

import pytest

from conftest import BUILD
from engine_util import DONE, ERROR, Engine, Result, eog_bias, scaled, settled, wait_stats

ENGINE = BUILD / "llm-engine"

N_REQ = 16
MAX_TOKENS = 100
PROMPTS = [f"Story {i}: Once upon a time, in a village by the {w}, there lived a"
           for i, w in enumerate(["sea", "river", "forest", "mountain"] * 4)]
# 30 layers x 16 positions x 192 floats x 2 (K, V) x 4 bytes = 720 KiB a block: 14 MiB is 19
# blocks, a third of what 16 sequences of ~130 positions need at once.
SMALL = ["--kv-cache-mb", "14", "--max-seqs", "16", "--max-batch-tokens", "128",
         "--log-level", "warn"]
ROOMY = ["--kv-cache-mb", "128", "--max-seqs", "16", "--max-batch-tokens", "128",
         "--log-level", "warn"]


@pytest.fixture
def tmp_dir():
    # Unix socket paths are limited to 107 bytes: a short directory of our own.
    with tempfile.TemporaryDirectory(prefix="llm-spill-") as d:
        yield d


def run_all(conn, n=N_REQ, max_tokens=MAX_TOKENS, first_id=1):
    """Submits n requests at once on conn and reads until each has ended; returns {id: Result}."""
    bias = eog_bias(conn.info)
    res = {}
    for i in range(n):
        rid = first_id + i
        conn.submit(rid, PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, logit_bias=bias)
        res[rid] = Result(rid)
    while not all(r.ended for r in res.values()):
        f = conn.recv(scaled(120))
        res[f.req_id].add(f)
    return res


@pytest.fixture(scope="module")
def reference(model_path):
    """The outputs of an engine with enough KV for all 16 at once (no preemption)."""
    with tempfile.TemporaryDirectory(prefix="llm-spill-ref-") as d:
        e = Engine(ENGINE, model_path, d, *ROOMY, "--spill-dir", "none").start()
        try:
            with e.connect() as c:
                res = run_all(c)
                s = c.stats()
            assert s["preemptions"] == 0, s
            assert all(r.done and r.done["finish"] == "length" for r in res.values()), res
            return {rid: r.ids for rid, r in res.items()}
        finally:
            assert e.stop() == 0, e.stderr()[-3000:]


def start(model_path, d, *flags, env=None):
    spill = os.path.join(d, "spill")
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        e = Engine(ENGINE, model_path, d, *SMALL, "--spill-dir", spill, *flags).start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return e, spill


def finish(e, spill, conn):
    s = wait_stats(conn, lambda s: settled(s) and s["spill_on_disk"] == 0, "settled")
    assert os.listdir(spill) == [], os.listdir(spill)
    assert s["spill_disk_bytes"] == 0, s
    return s


def test_spill_small_kv_outputs_match_uninterrupted_run(model_path, tmp_dir, reference):
    e, spill = start(model_path, tmp_dir)
    try:
        with e.connect() as c:
            res = run_all(c)
            for rid, r in res.items():
                assert r.done is not None and r.done["finish"] == "length", r
                assert r.ids == reference[rid], f"request {rid} differs after spill/restore"
            s = finish(e, spill, c)
        assert s["spills"] > 0 and s["restores"] > 0, s
        assert s["restores"] + s["restore_failures"] == s["spills"], s
        assert s["recompute_fallbacks"] == 0, s
        assert s["spill_bytes"] > 0 and s["spill_ms"]["count"] == s["spills"], s
        assert s["restore_ms"]["count"] == s["restores"], s
    finally:
        assert e.stop() == 0, e.stderr()[-3000:]


def on_disk_req_ids(spill):
    """Request ids of the spill files now in the directory (the header's u64 at offset 24)."""
    ids = []
    for name in os.listdir(spill):
        if not name.endswith(".kv"):
            continue
        try:
            with open(os.path.join(spill, name), "rb") as f:
                head = f.read(32)
        except FileNotFoundError:
            continue  # restored meanwhile
        if len(head) == 32 and head[:8] == b"LLMSPILL":
            ids.append(struct.unpack_from("<Q", head, 24)[0])
    return ids


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_spill_cancel_while_on_disk_deletes_file(model_path, tmp_dir, how):
    e, spill = start(model_path, tmp_dir)
    try:
        with e.connect() as sc:
            bias = eog_bias(sc.info)
            # One connection per request; long generations keep the cache full, so spilled
            # sequences wait on disk until someone finishes.
            conns = {}
            for i in range(N_REQ):
                rid = 100 + i
                conns[rid] = e.connect()
                conns[rid].submit(rid, PROMPTS[i], max_tokens=400, logit_bias=bias)
            hit = False
            for _ in range(20):
                s = wait_stats(sc, lambda s: [i for i in on_disk_req_ids(spill) if i in conns],
                               "a live request on disk")
                rid = [i for i in on_disk_req_ids(spill) if i in conns]
                if not rid:
                    continue  # restored between the two listings
                rid = rid[0]
                deleted = sc.stats()["spill_deleted"]
                c = conns.pop(rid)
                if how == "cancel":
                    c.cancel(rid, "client")
                    r = c.read_request(rid, timeout=scaled(60))
                    assert r.done is not None and r.done["finish"] == "cancelled", r
                c.close()
                s = wait_stats(sc, lambda s: s["requests_finished"] >= N_REQ - len(conns) and
                               s["running"] + s["queued"] <= len(conns), "the victim finished")
                if s["spill_deleted"] > deleted:
                    hit = True  # otherwise it was restored just before: try another
                    assert rid not in on_disk_req_ids(spill)
                    break
            assert hit, "no cancel reached a sequence on disk"
            for c in conns.values():
                c.close()
            s = finish(e, spill, sc)
            assert s["finished_by"]["cancelled"] >= 1 and s["spill_deleted"] >= 1, s
    finally:
        assert e.stop() == 0, e.stderr()[-3000:]


@pytest.mark.parametrize("fault", ["write:3:ENOSPC", "fsync:2:EIO", "rename:1:EIO",
                                   "read:2:EIO", "write:2:EIO:short"])
def test_spill_faults_fall_back_to_recompute(model_path, tmp_dir, reference, fault):
    e, spill = start(model_path, tmp_dir, env={"LLM_ENGINE_SPILL_FAULT": fault})
    try:
        with e.connect() as c:
            res = run_all(c, n=8)  # still four times what the cache holds
            for rid, r in res.items():
                assert r.done is not None and r.done["finish"] == "length", r
                assert r.ids == reference[rid], f"request {rid} differs with fault {fault}"
            s = finish(e, spill, c)
        if fault.endswith(":short"):
            assert s["recompute_fallbacks"] == 0 and s["restores"] > 0, s  # a short write is not
        else:
            assert s["recompute_fallbacks"] >= 1, s
        if fault.startswith("read"):
            assert s["restore_failures"] >= 1, s
        elif not fault.endswith(":short"):
            assert s["spill_failures"] >= 1, s
    finally:
        assert e.stop() == 0, e.stderr()[-3000:]


def test_spill_stale_files_removed_at_start(model_path, tmp_dir):
    spill = os.path.join(tmp_dir, "spill")
    os.makedirs(spill)
    # A dead engine's files: pid 1 is never an engine that left them here, but it is alive, so
    # use a pid far beyond pid_max instead.
    for name in ("spill-999999999-3.kv", "spill-999999999-4.kv.tmp"):
        with open(os.path.join(spill, name), "wb") as f:
            f.write(b"LLMSPILL" + b"\0" * 200)
    with open(os.path.join(spill, "unrelated.txt"), "wb") as f:
        f.write(b"x")
    e, _ = start(model_path, tmp_dir, "--log-level", "info")
    try:
        assert sorted(os.listdir(spill)) == ["unrelated.txt"]
        assert "stale spill file removed" in e.stderr(), e.stderr()[-3000:]
    finally:
        assert e.stop() == 0, e.stderr()[-3000:]

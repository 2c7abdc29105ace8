#!/usr/bin/env python3
"""Fault and soak test (issue 9, `make soak`): the real stack on loopback (llm-engine with a KV
cache small enough to spill to disk, llm-fcgi under spawn-fcgi -F 3 with --api-key, lighttpd from
examples/lighttpd.conf; tests/integration/stack.py) under CLIENTS concurrent clients, in waves.

Each client sends PER_CLIENT requests one after the other, its kinds drawn from a seeded mix:
streaming and non-streaming chat, completions, tool calls (tools + tool_choice "required" or a
named function, streaming and not), cancels (a stream left after its first content event),
disconnects (a stream left right after its headers, a non-streaming request left before its
answer), a long prompt being prefilled while three other streams are opened and left at once,
malformed bodies (bad JSON, invalid UTF-8, NUL bytes, deep nesting, wrong types: exactly 400),
a valid body sent one byte at a time (200), a body abandoned half-way, an oversized body
(exactly 413) and wrong or missing API keys (exactly 401).

Wave 1 also injects the process faults: once a quarter of its requests have ended, one worker
process is killed (SIGKILL); once half have ended, the engine is restarted (SIGTERM, then a new one
on the same socket and spill directory). Waves 2 and 3 are the same mix without process faults:
wave 2 warms the new engine up, and the RSS after wave 2 is compared with the RSS after wave 3
(steady memory growth).

The killed worker's capacity: spawn-fcgi does not respawn, so the test runs 3 worker processes
and the 2 survivors keep serving on the shared socket; everything after the kill (the rest of
wave 1, waves 2 and 3, the final checks) is served by the survivors alone. A deployment that
wants the capacity back runs its workers under a supervisor (lighttpd bin-path, systemd
Restart=). Only requests in flight at the moment of the kill may end without a clean error
(a stream cut without [DONE], or lighttpd's own 5xx page), at most --threads of them (the killed
process's request threads); a cut anywhere else is a failure.

Outcomes (each request gets exactly one):
  ok_stream      a stream with role chunk, one final chunk (stop/length/tool_calls), [DONE] last
  ok_json        a complete chat.completion / text_completion object with consistent usage
  err_stream     an SSE error event, then a final chunk, then [DONE] (e.g. the engine restarted)
  err_http_N     status N >= 400 with an OpenAI error body (e.g. 503 while the engine restarts)
  expected_N     an expected-error case that got exactly its status N with an OpenAI error body
  left           the client left on purpose (cancel, disconnect, abandoned body)
  cut_by_kill    in flight on the killed worker (see above)
  BAD_*          everything else: a hang (bounded timeouts), a truncated stream, a malformed
                 chunk, a wrong status, a non-OpenAI error body, ... Any BAD fails the run.

After each wave: the engine settles to running 0, queued 0, kv_blocks_used 0, spill_on_disk 0,
and the spill directory holds no files. Leaks checked at the end: descriptors of the engine and
of each surviving worker equal to their counts after wave 1; RSS growth from wave 2 to wave 3
within RSS_TOL_MB + RSS_TOL_PCT; then /health and a streaming and a non-streaming chat answer
normally. Prints counts by outcome, faults injected and leaks; exits 1 on any failure.
"""

import argparse
import collections
import concurrent.futures
import http.client
import json
import os
import pathlib
import random
import signal
import socket
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
os.environ.setdefault("ENGINE_THREADS", "2")

from engine_util import SLOWDOWN, scaled  # noqa: E402
from stack import Stack, Stream, eog_bias, request  # noqa: E402

KEY = "sk-soak-4d1c9a77e0b2"
MAX_BODY = 65536
RSS_TOL_MB = 8.0
RSS_TOL_PCT = 3.0

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

# kind -> weight in the mix
MIX = {
    "chat_stream": 18, "chat_json": 12, "completion": 6, "tool_json": 6, "tool_stream": 5,
    "cancel_stream": 7, "disconnect_early": 4, "disconnect_json": 4, "long_prefill": 3,
    "malformed": 9, "slow_body": 4, "slow_abandon": 2, "oversized": 4, "wrong_key": 6,
}

LONG_PROMPT = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(30))


class Bad(Exception):
    """A request outcome that breaks the contract."""


class Soak:
    def __init__(self, args):
        self.a = args
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.outcomes = collections.Counter()
        self.by_kind = collections.defaultdict(collections.Counter)
        self.by_wave = collections.defaultdict(collections.Counter)
        self.bad = []
        self.faults = collections.Counter()
        self.error_messages = collections.Counter()
        self.wave_no = 0
        self.active = {}  # request number -> kind
        self.ended = 0
        self.next_rid = 0
        self.kill_set = None
        self.cut_by_kill = 0
        self.stack = None
        self.model = None
        self.bias = None

    # ---- stack ----

    def start(self):
        d_flags = ["--kv-cache-mb", str(self.a.kv_mb), "--max-seqs", "16",
                   "--max-batch-tokens", "256", "--grace-seconds", "3", "--log-level", "warn"]
        self.stack = Stack(name="soak", processes=self.a.processes, threads=self.a.threads,
                           worker_flags=["--api-key", KEY, "--max-body-bytes", str(MAX_BODY),
                                         "--request-timeout", "300"],
                           engine_flags=d_flags)
        spill = self.stack.dir / "spill"
        self.spill_dir = spill
        self.stack.engine_flags += ["--spill-dir", str(spill)]
        self.stack.start()
        r = request(self.stack.url, "GET", "/v1/models", headers=self.auth())
        if r.status != 200:
            raise Bad(f"/v1/models: {r}")
        self.model = r.json()["data"][0]["id"]
        self.bias = eog_bias(self.stack.info)

    def auth(self, key=KEY):
        return {"Authorization": f"Bearer {key}"}

    # ---- bookkeeping ----

    def begin(self, kind):
        with self.lock:
            self.next_rid += 1
            rid = self.next_rid
            self.active[rid] = kind
        return rid

    def end(self, rid, kind, outcome, detail=""):
        with self.cond:
            self.active.pop(rid, None)
            if outcome.startswith("CUT"):
                if self.kill_set is not None and rid in self.kill_set and \
                        self.cut_by_kill < self.a.threads:
                    outcome = "cut_by_kill"
                    self.cut_by_kill += 1
                else:
                    outcome = "BAD_" + outcome[4:]
            self.outcomes[outcome] += 1
            self.by_wave[self.wave_no][outcome] += 1
            self.by_kind[kind][outcome] += 1
            if outcome.startswith("BAD"):
                self.bad.append(f"#{rid} {kind}: {outcome} {detail}"[:600])
            self.ended += 1
            self.cond.notify_all()

    def run_one(self, kind, fn, *args):
        rid = self.begin(kind)
        try:
            outcome, detail = fn(rid, *args)
        except Bad as e:
            outcome, detail = "BAD_contract", str(e)
        except socket.timeout as e:
            outcome, detail = "BAD_hang", repr(e)
        except (http.client.IncompleteRead, http.client.RemoteDisconnected,
                ConnectionError) as e:
            outcome, detail = "CUT_connection", repr(e)
        except Exception as e:  # noqa: BLE001: any other failure is a BAD outcome, reported
            outcome, detail = "BAD_exception", repr(e)
        self.end(rid, kind, outcome, detail)

    # ---- bodies ----

    def chat(self, content, max_tokens=None, **kw):
        b = {"model": self.model, "messages": [{"role": "user", "content": content}],
             "max_tokens": max_tokens or self.a.max_tokens, "temperature": 0.7, "seed": 1}
        b.update(kw)
        return b

    def tool_body(self, named, stream):
        choice = ({"type": "function", "function": {"name": "get_weather"}} if named
                  else "required")
        return self.chat("What is the weather in Paris right now?", max_tokens=40, tools=TOOLS,
                         tool_choice=choice, stream=stream)

    # ---- response checks ----

    def check_error_body(self, r):
        ctype = r.headers.get("content-type", "")
        if not ctype.startswith("application/json"):
            return False
        try:
            body = json.loads(r.body)
        except ValueError:
            return False
        err = body.get("error") if isinstance(body, dict) else None
        return (isinstance(err, dict) and set(body) == {"error"} and
                all(k in err for k in ("message", "type", "param", "code")) and
                isinstance(err["message"], str) and err["message"])

    in_restart = False

    def classify_http_error(self, r, expected=None, json_ok=False):
        """A non-200 response: clean (OpenAI body) or not; expected: the exact status wanted."""
        clean = self.check_error_body(r)
        if expected is not None:
            if r.status == expected and clean:
                return f"expected_{expected}", ""
            if r.status == 503 and clean and expected == 400 and self.in_restart and \
                    json_ok:
                # Well-formed JSON is validated against the engine's MODEL_INFO: while the
                # engine restarts (and the workers back off) it may be a 503 instead.
                return "err_http_503", "expected-400 case while the engine restarts"
            return "BAD_status", f"wanted {expected}: {r!r}"
        if clean:
            msg = json.loads(r.body)["error"]["message"]
            with self.lock:
                self.error_messages[(r.status, msg[:80])] += 1
            return f"err_http_{r.status}", ""
        if r.status >= 500:
            return "CUT_non_openai_5xx", repr(r)
        return "BAD_error_body", repr(r)

    def check_json(self, r, want_obj):
        if r.status != 200:
            return self.classify_http_error(r)
        try:
            o = json.loads(r.body)
        except ValueError:
            return "CUT_truncated_json", repr(r)
        if o.get("object") != want_obj or not o.get("choices"):
            raise Bad(f"not a complete {want_obj}: {r!r}")
        ch = o["choices"][0]
        if ch.get("finish_reason") not in ("stop", "length", "tool_calls"):
            raise Bad(f"finish_reason: {r!r}")
        if ch.get("stop_reason") not in (None, "stop_string"):
            raise Bad(f"a cut passed off as a success: {r!r}")
        u = o.get("usage") or {}
        if u.get("total_tokens") != u.get("prompt_tokens", -1) + u.get("completion_tokens", -1):
            raise Bad(f"usage: {r!r}")
        if want_obj == "chat.completion":
            msg = ch.get("message") or {}
            for tc in msg.get("tool_calls") or []:
                json.loads(tc["function"]["arguments"])  # must be JSON
                with self.lock:
                    self.faults["tool_calls_returned"] += 1
            if ch["finish_reason"] == "tool_calls" and not msg.get("tool_calls"):
                raise Bad(f"tool_calls without calls: {r!r}")
        elif not isinstance(ch.get("text"), str):
            raise Bad(f"no text: {r!r}")
        return "ok_json", ""

    def read_stream(self, s):
        """Reads a whole stream; returns an outcome."""
        raw = []
        for kind, text in s.events():
            if kind == "data":
                if raw and raw[-1] == "[DONE]":
                    raise Bad(f"data after [DONE]: {text!r}")
                raw.append(text)
            elif kind == "other":
                raise Bad(f"not SSE: {text!r}")
        if not raw or raw[-1] != "[DONE]":
            return "CUT_stream_without_done", repr(raw[-2:])
        chunks = [json.loads(t) for t in raw[:-1]]
        errors = [i for i, c in enumerate(chunks) if "error" in c]
        finals = [i for i, c in enumerate(chunks)
                  if c.get("choices") and c["choices"][0].get("finish_reason")]
        if len(finals) != 1:
            raise Bad(f"{len(finals)} final chunks: {raw[-4:]}")
        if any(c.get("choices") for c in chunks[finals[0] + 1:]):
            raise Bad(f"choices after the final chunk: {raw[-4:]}")
        if errors:
            if len(errors) != 1 or errors[0] > finals[0]:
                raise Bad(f"error event not before the final chunk: {raw[-4:]}")
            return "err_stream", ""
        if chunks[0]["choices"][0]["delta"].get("role") != "assistant":
            raise Bad(f"first chunk: {raw[:1]}")
        fin = chunks[finals[0]]["choices"][0]
        if fin["finish_reason"] not in ("stop", "length", "tool_calls"):
            raise Bad(f"finish_reason: {fin}")
        if fin.get("stop_reason") not in (None, "stop_string"):
            raise Bad(f"a cut passed off as a success: {fin}")
        if len({c["id"] for c in chunks}) != 1:
            raise Bad("ids differ")
        args = collections.defaultdict(str)
        for c in chunks:
            for tc in (c["choices"][0]["delta"].get("tool_calls") or [] if c["choices"] else []):
                args[tc["index"]] += (tc.get("function") or {}).get("arguments") or ""
        for a in args.values():
            json.loads(a)
        if args:
            with self.lock:
                self.faults["tool_calls_returned"] += len(args)
        return "ok_stream", ""

    def stream(self, path, body, headers=None):
        return Stream(self.stack.url, path, dict(body, stream=True),
                      headers=headers or self.auth(), timeout=self.a.timeout)

    def post(self, path, body, headers=None):
        h = dict(self.auth() if headers is None else headers)
        return request(self.stack.url, "POST", path, body, headers=h, timeout=self.a.timeout)

    # ---- request kinds: each returns (outcome, detail) ----

    def k_chat_stream(self, rid, i):
        s = self.stream("/v1/chat/completions",
                        self.chat(f"Tell me one fact about the number {i}.",
                                  stream_options={"include_usage": True}))
        try:
            if s.status != 200:
                return self.classify_http_error(s_response(s))
            return self.read_stream(s)
        finally:
            s.close()

    def k_chat_json(self, rid, i):
        r = self.post("/v1/chat/completions", self.chat(f"Name a colour and the number {i}."))
        return self.check_json(r, "chat.completion")

    def k_completion(self, rid, i):
        body = {"model": self.model, "prompt": f"The number {i} is", "max_tokens":
                self.a.max_tokens}
        if i % 2:
            s = self.stream("/v1/completions", body)
            try:
                if s.status != 200:
                    return self.classify_http_error(s_response(s))
                return self.read_completion_stream(s)
            finally:
                s.close()
        return self.check_json(self.post("/v1/completions", body), "text_completion")

    def read_completion_stream(self, s):
        raw = [t for k, t in s.events() if k == "data"]
        if not raw or raw[-1] != "[DONE]" or raw.count("[DONE]") != 1:
            return "CUT_stream_without_done", repr(raw[-2:])
        chunks = [json.loads(t) for t in raw[:-1]]
        finals = [c for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")]
        if len(finals) != 1:
            raise Bad(f"{len(finals)} final chunks: {raw[-4:]}")
        if any("error" in c for c in chunks):
            return "err_stream", ""
        if finals[0]["choices"][0].get("stop_reason") not in (None, "stop_string"):
            raise Bad(f"a cut passed off as a success: {finals[0]}")
        return "ok_stream", ""

    def k_tool_json(self, rid, i):
        r = self.post("/v1/chat/completions", self.tool_body(i % 2 == 0, False))
        return self.check_json(r, "chat.completion")

    def k_tool_stream(self, rid, i):
        s = self.stream("/v1/chat/completions", self.tool_body(i % 2 == 1, True))
        try:
            if s.status != 200:
                return self.classify_http_error(s_response(s))
            return self.read_stream(s)
        finally:
            s.close()

    def k_cancel_stream(self, rid, i):
        s = self.stream("/v1/chat/completions",
                        self.chat(f"Count from {i} upwards in words.", max_tokens=400,
                                  logit_bias=self.bias))
        try:
            if s.status != 200:
                return self.classify_http_error(s_response(s))
            for kind, text in s.events():
                if kind == "data" and '"content"' in text:
                    self.fault("cancel_mid_stream")
                    return "left", ""
                if kind == "data" and text == "[DONE]":
                    raise Bad("ended before any content")
                if kind == "data" and '"error"' in text:
                    return "err_stream", "error event before content (cancelled early)"
            return "CUT_stream_without_done", "ended before any content"
        finally:
            s.close()

    def k_disconnect_early(self, rid, i):
        s = self.stream("/v1/chat/completions",
                        self.chat(f"Write a poem about {i} cats.", max_tokens=400,
                                  logit_bias=self.bias))
        s.close()
        self.fault("disconnect_after_headers")
        return "left", ""

    def k_disconnect_json(self, rid, i):
        port = int(self.stack.url.rsplit(":", 1)[1])
        body = json.dumps(self.chat(f"Describe the number {i} at length.", max_tokens=400,
                                    logit_bias=self.bias)).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=self.a.timeout) as c:
            c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nConnection: close\r\n"
                      b"Authorization: Bearer " + KEY.encode() + b"\r\n" +
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            # The fault itself: leave while the answer is being generated (no answer awaited).
            time.sleep(0.05 + (i % 5) * 0.05)
        self.fault("disconnect_non_streaming")
        return "left", ""

    def k_long_prefill(self, rid, i):
        """A long prompt streamed while three other streams are opened and left at once."""
        s = self.stream("/v1/chat/completions",
                        self.chat(f"{LONG_PROMPT} Which item number mentions {i}?",
                                  max_tokens=8))
        try:
            if s.status != 200:
                return self.classify_http_error(s_response(s))
            with concurrent.futures.ThreadPoolExecutor(3) as ex:
                list(ex.map(lambda j: self.run_one("cancel_during_prefill",
                                                   self.k_disconnect_early, i * 10 + j),
                            range(3)))
            self.fault("cancels_during_long_prefill", 3)
            return self.read_stream(s)
        finally:
            s.close()

    MALFORMED = [
        (b"{not json", None), (b"", None), (b"[]", None), (b'{"model": 5}', None),
        (b'{"messages": "hi"}', None), (b"\xff\xfe{\"a\": 1}", None), (b'{"a": "\x00"}', None),
        (b"[" * 5000 + b"]" * 5000, None),
        (None, {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
        (None, {"messages": [{"role": "wizard", "content": "x"}]}),
        (None, {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
        (None, {"messages": [{"role": "user", "content": "x"}], "n": 2}),
    ]
    # Not in the list: a JSON escape of a lone surrogate ("\udcff") is accepted, decoded by
    # json-c as U+FFFD (well-formed UTF-8 afterwards), so it is not a malformed body.

    def k_malformed(self, rid, i):
        raw, obj = self.MALFORMED[i % len(self.MALFORMED)]
        if obj is not None:
            obj = dict(obj, model=self.model)
            raw = json.dumps(obj).encode()
        r = self.post("/v1/chat/completions", raw,
                      headers=dict(self.auth(), **{"Content-Type": "application/json"}))
        self.fault("malformed_body")
        try:
            json.loads(raw)
            json_ok = True
        except ValueError:
            json_ok = False
        return self.classify_http_error(r, expected=400, json_ok=json_ok)

    def slow_send(self, body, upto, i):
        port = int(self.stack.url.rsplit(":", 1)[1])
        c = socket.create_connection(("127.0.0.1", port), timeout=self.a.timeout)
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nConnection: close\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\n" +
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
        for k in range(upto):
            c.sendall(body[k:k + 1])
            time.sleep(0.004)  # the fault itself: a client sending a byte every few ms
        return c

    def k_slow_body(self, rid, i):
        body = json.dumps(self.chat(f"Say hello {i}.")).encode()
        c = self.slow_send(body, len(body), i)
        try:
            resp = http.client.HTTPResponse(c)
            resp.begin()
            data = resp.read()
            r = Response_(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            c.close()
        self.fault("slow_body_byte_at_a_time")
        return self.check_json(r, "chat.completion")

    def k_slow_abandon(self, rid, i):
        body = json.dumps(self.chat(f"Say goodbye {i}.")).encode()
        c = self.slow_send(body, len(body) // 2, i)
        c.close()
        self.fault("slow_body_abandoned")
        return "left", ""

    def k_oversized(self, rid, i):
        body = self.chat("y" * (MAX_BODY + 1000 * (1 + i % 50)))
        try:
            r = self.post("/v1/chat/completions", body)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Bad(f"oversized body: connection broken instead of a 413: {e!r}")
        self.fault("oversized_body")
        return self.classify_http_error(r, expected=413)

    def k_wrong_key(self, rid, i):
        variants = [self.auth("sk-wrong"), self.auth(KEY + "x"), self.auth(KEY[:-1]), {},
                    {"Authorization": KEY}, {"Authorization": "Basic " + KEY}]
        h = variants[i % len(variants)]
        if i % 3 == 0:
            s = Stream(self.stack.url, "/v1/chat/completions",
                       self.chat("hi", stream=True), headers=h, timeout=self.a.timeout)
            try:
                r = s_response(s)
            finally:
                s.close()
        else:
            r = self.post("/v1/chat/completions", self.chat("hi"), headers=h)
        self.fault("wrong_api_key")
        return self.classify_http_error(r, expected=401)

    def fault(self, name, n=1):
        with self.lock:
            self.faults[name] += n

    # ---- waves ----

    def plan(self, wave):
        rng = random.Random(self.a.seed)  # the same plan every wave: identical waves
        kinds, weights = zip(*MIX.items())
        return [[rng.choices(kinds, weights)[0] for _ in range(self.a.per_client)]
                for _ in range(self.a.clients)]

    def client(self, plan, c):
        for j, kind in enumerate(plan):
            self.run_one(kind, getattr(self, "k_" + kind), c * 100 + j)

    def wave(self, n, faults):
        plans = self.plan(n)
        self.wave_no = n
        total = sum(len(p) for p in plans)
        t0 = time.monotonic()
        with self.lock:
            start_ended = self.ended
        ctl = None
        if faults:
            ctl = threading.Thread(target=self.process_faults, args=(start_ended, total))
            ctl.start()
        with concurrent.futures.ThreadPoolExecutor(self.a.clients) as ex:
            futs = [ex.submit(self.client, p, c) for c, p in enumerate(plans)]
            done, pending = concurrent.futures.wait(futs, timeout=self.a.wave_timeout)
            if pending:
                self.bad.append(f"wave {n}: {len(pending)} clients still running after "
                                f"{self.a.wave_timeout} s (hang)")
                os._exit(self.report_now(1))
            for f in done:
                f.result()
        if ctl is not None:
            ctl.join()
            if self.ctl_error:
                raise self.ctl_error
        dt = time.monotonic() - t0
        st = self.settle(f"after wave {n}")
        print(f"wave {n}: {total} planned requests in {dt:.1f} s; engine spills={st['spills']} "
              f"restores={st['restores']} preemptions={st.get('preemptions')}", flush=True)
        return st, dt

    ctl_error = None

    def process_faults(self, start, total):
        try:
            self.wait_ended(start + total // 4)
            with self.lock:
                self.kill_set = set(self.active)
            victim = self.stack.workers.alive()[0]
            status = self.stack.workers.kill(victim, signal.SIGKILL)
            if not os.WIFSIGNALED(status):
                raise AssertionError(f"worker {victim}: {status}")
            self.killed = victim
            self.fault("worker_killed")
            print(f"fault: worker {victim} killed with {len(self.kill_set)} requests in flight "
                  "(all workers)", flush=True)
            self.wait_ended(start + total // 2)
            old = self.stack.stats()
            self.spills_before_restart = old["spills"]
            self.in_restart = True  # until recover() sees every worker serving again
            rc = self.stack.restart_engine()
            if rc != 0:
                raise AssertionError(f"old engine exit {rc}")
            self.fault("engine_restarted")
            print(f"fault: engine restarted (old engine: spills={old['spills']}, exit {rc})",
                  flush=True)
        except BaseException as e:  # noqa: BLE001: re-raised in the main thread
            self.ctl_error = e

    def recover(self):
        """After the engine restart the workers back off (100 ms doubling to 1 s) and answer 503
        "the engine is unavailable" with Retry-After until their next connect attempt. A client
        honours Retry-After: so does this probe, until 2 x processes requests in a row succeed
        (every surviving worker has reconnected). Bounded; reports how long it took."""
        t0 = time.monotonic()
        in_a_row, n503, tries = 0, 0, 0
        while in_a_row < 2 * self.a.processes:
            tries += 1
            if tries > 200:
                self.bad.append(f"no recovery after the engine restart ({n503} 503s)")
                return
            r = self.post("/v1/chat/completions", self.chat("Hi", max_tokens=2))
            if r.status == 200:
                in_a_row += 1
                continue
            if r.status != 503 or not self.check_error_body(r):
                self.bad.append(f"recovery probe: {r!r}")
                return
            in_a_row = 0
            n503 += 1
            time.sleep(min(float(r.headers.get("retry-after", "1")), 1.0))  # Retry-After
        self.in_restart = False
        self.recovery = (time.monotonic() - t0, n503)
        print(f"recovered: {2 * self.a.processes} requests in a row served after {n503} 503s "
              f"with Retry-After, {self.recovery[0]:.1f} s after wave 1", flush=True)

    recovery = None

    def wait_ended(self, n):
        deadline = time.monotonic() + self.a.wave_timeout
        with self.cond:
            while self.ended < n:
                if not self.cond.wait(timeout=max(0.1, deadline - time.monotonic())):
                    if time.monotonic() > deadline:
                        raise AssertionError(f"only {self.ended} of {n} requests ended")

    def settle(self, what):
        from stack import wait_until
        st = wait_until(self.stack, lambda s: s["running"] == 0 and s["queued"] == 0 and
                        s["kv_blocks_used"] == 0 and s.get("spill_on_disk", 0) == 0,
                        f"engine settled {what}", timeout=scaled(120))
        files = [p for p in self.spill_dir.rglob("*") if p.is_file()] \
            if self.spill_dir.exists() else []
        if files:
            self.leaks["spill_files"] += len(files)
            self.bad.append(f"{what}: spill files left: {files[:5]}")
        return st

    # ---- measurements ----

    def procs(self):
        out = {"engine": self.stack.engine.pid}
        for pid in self.stack.workers.alive():
            out[f"worker {pid}"] = pid
        return out

    def snapshot(self):
        """fds and RSS of each process. The engine's count excludes its client connections
        (read in the same STATS round trip that holds one of them open): a worker's engine
        connection closing a moment late is not a leak, a descriptor held for nothing is."""
        snap = {}
        with self.stack.engine.connect() as c:
            conns = c.stats()["connections"]
            for name, pid in self.procs().items():
                with open(f"/proc/{pid}/status") as f:
                    rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                snap[name] = {"fds": fds - (conns if name == "engine" else 0), "rss_kb": rss}
        return snap

    def final_checks(self):
        ok = 0
        h = request(self.stack.url, "GET", "/health", timeout=self.a.timeout)
        ok += h.status == 200
        s = self.stream("/v1/chat/completions", self.chat("Say hi.", max_tokens=8))
        try:
            ok += s.status == 200 and self.read_stream(s)[0] == "ok_stream"
        finally:
            s.close()
        r = self.post("/v1/chat/completions", self.chat("Say hi.", max_tokens=8))
        ok += self.check_json(r, "chat.completion")[0] == "ok_json"
        if ok != 3:
            self.bad.append(f"the server does not answer normally afterwards ({ok}/3 checks)")
        return ok

    leaks = collections.Counter()

    def report_now(self, rc):
        print(json.dumps({"outcomes": dict(self.outcomes), "bad": self.bad[:40]}, indent=1))
        return rc

    def run(self):
        t0 = time.monotonic()
        self.start()
        print(f"stack up: {self.stack.dir}; {self.a.clients} clients x {self.a.per_client} "
              f"requests a wave, {self.a.processes} workers x {self.a.threads} threads, "
              f"kv {self.a.kv_mb} MiB", flush=True)
        self.wave(1, faults=True)
        self.recover()
        base = self.snapshot()
        self.wave(2, faults=False)
        mid = self.snapshot()
        st3, _ = self.wave(3, faults=False)
        end = self.snapshot()
        # A worker thread may still be closing the FastCGI connection of a request whose client
        # left: poll (bounded) for the counts to come back before calling a difference a leak.
        for _ in range(int(scaled(200))):
            if all(n not in end or end[n]["fds"] == base[n]["fds"] for n in base):
                break
            time.sleep(0.05)  # pacing between /proc reads
            end = self.snapshot()
        # descriptors: equal to the counts after wave 1 (every process the same as then)
        for name in base:
            if name not in end:
                self.bad.append(f"{name} died during waves 2-3")
                continue
            d = end[name]["fds"] - base[name]["fds"]
            if d > 0:  # fewer than after wave 1: a connection was still closing then
                self.leaks["descriptors"] += max(d, 0)
                self.bad.append(f"{name}: fds {base[name]['fds']} -> {mid[name]['fds']} -> "
                                f"{end[name]['fds']}")
        for name in mid:
            a, b = mid[name]["rss_kb"] / 1024, end[name]["rss_kb"] / 1024
            # ASan/TSan hold freed memory in quarantine and shadow: RSS says nothing there.
            if b - a > RSS_TOL_MB + a * RSS_TOL_PCT / 100 and SLOWDOWN == 1:
                self.leaks["rss_growth"] += 1
                self.bad.append(f"{name}: RSS {a:.1f} -> {b:.1f} MiB over a second identical wave")
        self.final_checks()
        st = self.stack.stats()
        if st["spills"] + getattr(self, "spills_before_restart", 0) == 0:
            self.bad.append("no spill to disk happened: the KV cache is not small enough")
        wall = time.monotonic() - t0
        self.print_report(base, mid, end, st, wall)
        return 1 if self.bad else 0

    def print_report(self, base, mid, end, st, wall):
        print("\n==== soak report ====")
        print("requests by outcome:")
        for k, v in sorted(self.outcomes.items()):
            print(f"  {k:24s} {v}")
        print(f"  {'total':24s} {sum(self.outcomes.values())}")
        print("by kind:")
        for kind, c in sorted(self.by_kind.items()):
            print(f"  {kind:22s} " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())))
        print("by wave:")
        for w, c in sorted(self.by_wave.items()):
            print(f"  wave {w}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())))
        print("HTTP errors by message:")
        for (code, msg), v in sorted(self.error_messages.items()):
            print(f"  {code} {msg!r}: {v}")
        print("faults injected:")
        for k, v in sorted(self.faults.items()):
            print(f"  {k:28s} {v}")
        print(f"engine (after the restart): spills={st['spills']} restores={st['restores']} "
              f"spill_failures={st['spill_failures']} preemptions={st.get('preemptions')} "
              f"kv_blocks_total={st['kv_blocks_total']}; before the restart: "
              f"spills={getattr(self, 'spills_before_restart', '?')}")
        print("descriptors and RSS (after wave 1 / after wave 2 / after wave 3):")
        for name in end:
            print(f"  {name:16s} fds {base.get(name, {}).get('fds')}/{mid[name]['fds']}/"
                  f"{end[name]['fds']}  RSS MiB {base.get(name, {}).get('rss_kb', 0) / 1024:.1f}/"
                  f"{mid[name]['rss_kb'] / 1024:.1f}/{end[name]['rss_kb'] / 1024:.1f}")
        print(f"leaks: kv_blocks_used={st['kv_blocks_used']} running={st['running']} "
              f"queued={st['queued']} spill_files={self.leaks['spill_files']} "
              f"descriptors={self.leaks['descriptors']} rss_growth={self.leaks['rss_growth']} "
              f"(tolerance {RSS_TOL_MB} MiB + {RSS_TOL_PCT}%)")
        print(f"wall time: {wall:.1f} s")
        if self.bad:
            print(f"FAILED: {len(self.bad)} problems")
            for b in self.bad[:40]:
                print("  " + b)
        else:
            print("PASSED")


class Response_:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self):
        return f"HTTP {self.status} {self.headers} {self.body[:600]!r}"


def s_response(s):
    """A Stream whose status is not 200, read whole as a Response_."""
    return Response_(s.status, s.headers, s.resp.read())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--per-client", type=int, default=4, help="requests per client per wave")
    p.add_argument("--processes", type=int, default=3, help="worker processes (spawn-fcgi -F)")
    p.add_argument("--threads", type=int, default=12, help="threads per worker process")
    p.add_argument("--kv-mb", type=int, default=24, help="engine KV cache (small: spills)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--timeout", type=float, default=scaled(180), help="per-request socket timeout")
    p.add_argument("--wave-timeout", type=float, default=scaled(400))
    a = p.parse_args()
    soak = Soak(a)
    rc = 1
    try:
        rc = soak.run()
    finally:
        if soak.stack is not None:
            try:
                soak.stack.stop()
            except AssertionError as e:
                print(f"FAILED: stack stop: {str(e)[:3000]}")
                rc = 1
    sys.exit(rc)


if __name__ == "__main__":
    main()

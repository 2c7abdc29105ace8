"""Loop guards end to end (GUARDS.md, issue 5): deterministic degenerate models (a real GGUF whose
real forward pass emits PREFIX once and then CYCLE forever, never EOS; built by
tests/tools/mkgguf --degenerate into BUILD/tests/models/degenerate-KIND.gguf with a .json beside it
that names the cycle's token ids) served by the real llm-engine and llm-fcgi behind lighttpd.

For each guard, streaming and not: the response ends with finish_reason "length", stop_reason =
the guard, tool_loop_capped for the tool-loop guards, usage and [DONE]; the engine really stopped
the sequence: its generated-token counter grew by exactly the response's completion_tokens and
does not move afterwards, the trip point (known from the cycle) is within SLACK_TOKENS of
completion_tokens, the sequence is no longer running and its KV blocks are free
(kv_blocks_used 0), and the engine counted the trip (guard_trips, finished_by cancelled). The
content guards also on /v1/completions. The OpenAI SDK in an agent loop (tool calls run by a fake
executor, results appended, next request) stops on finish_reason "length" by the guard, not by
its bound. A legitimately long answer of the real default model trips nothing.
"""

import json
import os
import pathlib

import openai
import pytest

from engine_util import scaled
from stack import BUILD, Stream, read_sse, request

MODELS = pathlib.Path(os.environ.get("DEGEN_MODELS", BUILD / "tests" / "models"))
# Tokens the engine may generate between the token that trips a worker guard and the CANCEL
# taking effect: the worker's reaction is one frame round trip, and the engine finishes a
# cancelled sequence at the top of its next emit step. Measured with the tiny degenerate models
# on 2 cores: 0..5 tokens idle, 0..28 while other builds ran (printed by each case with -s); the
# bound leaves room for a loaded machine. That the sequence stops (not runs on to max_tokens) is
# asserted exactly: the counter equals usage and does not move afterwards.
SLACK_TOKENS = 32
# The engine's context for the degenerate models (whatever they declare): room for the 1024
# tokens of unterminated_tool_call after a prompt with tools.
ENGINE_FLAGS = ["--ctx", "2048"]

SHELL_TOOL = [{"type": "function", "function": {
    "name": "bash", "description": "Run a shell command",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                   "required": ["command"]}}}]

TOOL_LOOP = {"name_run_cap", "identical_call", "repeated_call_history", "tool_call_cap",
             "permanent_failure"}


def degen_model(kind):
    path = MODELS / f"degenerate-{kind}.gguf"
    if not path.is_file():
        # (toolcall, the model of the tool-loop guards, is mkgguf's second-order kind: its next
        # token depends on the previous two, so its cycle may repeat tokens)
        msg = f"{path} is missing (the degenerate test models are built by make)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path, json.loads(path.with_name(path.name + ".json").read_text())


class DegenStacks:
    """One stack per degenerate model for the module (engine + 2 workers + lighttpd)."""

    WORKER_FLAGS = {"tokens": ["--guard-token-loop", "3"]}

    def __init__(self, make_stack_cls):
        self.cls = make_stack_cls
        self.stacks = {}

    def get(self, kind):
        if kind not in self.stacks:
            path, meta = degen_model(kind)
            flags = ["--allow-request-guard-overrides", *self.WORKER_FLAGS.get(kind, [])]
            s = self.cls(name=f"g{kind[:4]}", model=path, worker_flags=flags, processes=1,
                         threads=4, engine_flags=ENGINE_FLAGS).start()
            self.stacks[kind] = (s, meta)
        return self.stacks[kind]

    def stop(self):
        for s, _ in self.stacks.values():
            s.stop()


@pytest.fixture(scope="module")
def degen(fcgi_bin):
    from stack import Stack
    d = DegenStacks(Stack)
    yield d
    d.stop()


NO_CONTENT_GUARDS = {"line_repeat": 0, "sentence_loop": 0}

# (id, model kind, endpoint, guard, cycles (or tokens) up to the trip, extra body)
CASES = [
    ("identical_call", "toolcall", "chat", "identical_call", 2, {"tools": SHELL_TOOL}),
    ("repeated_call_history", "toolcall", "chat", "repeated_call_history", 5,
     {"tools": SHELL_TOOL, "guards": {"identical_call": 0}}),
    ("name_run_cap", "toolcall", "chat", "name_run_cap", 8,
     {"tools": SHELL_TOOL, "guards": {"identical_call": 0, "repeated_call_history": 0}}),
    ("tool_call_cap", "toolcall", "chat", "tool_call_cap", 4,
     {"tools": SHELL_TOOL, "guards": {"identical_call": 0, "repeated_call_history": 0,
                                      "name_run_cap": 0, "tool_call_cap": 3}}),
    ("permanent_failure", "toolcall", "chat", "permanent_failure", 1, {"tools": SHELL_TOOL}),
    ("sentence_loop", "sentence", "chat", "sentence_loop", 3, {}),
    ("sentence_loop_completions", "sentence", "completions", "sentence_loop", 3, {}),
    ("line_repeat", "line", "chat", "line_repeat", 4, {}),
    ("line_repeat_completions", "line", "completions", "line_repeat", 4, {}),
    ("unterminated_tool_call", "unterminated", "chat", "unterminated_tool_call", None,
     {"tools": SHELL_TOOL}),
    # the content guards off for these requests: only the engine-side detector is left
    ("token_loop", "tokens", "chat", "token_loop", None, {"guards": NO_CONTENT_GUARDS}),
    ("token_loop_completions", "tokens", "completions", "token_loop", None,
     {"guards": NO_CONTENT_GUARDS}),
]

FAILED_HISTORY = [
    {"role": "user", "content": "Build the project."},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "bash", "arguments": json.dumps({"command": "which cargo"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sh: 1: cargo: command not found"},
]


def body_for(case_id, endpoint, extra, model_id):
    body = {"model": model_id, "temperature": 0, **extra}
    if endpoint == "chat":
        body["messages"] = (list(FAILED_HISTORY) if case_id == "permanent_failure"
                            else [{"role": "user", "content": "Build the project."}])
    else:
        body["prompt"] = "Build the project."
    return body


def trip_tokens(guard, meta, cycles):
    """The completion token count at which the guard trips (the end of that cycle)."""
    n_prefix, n_cycle = len(meta["prefix_ids"]), len(meta["cycle_ids"])
    if guard == "unterminated_tool_call":
        return 1024 + n_prefix  # counted from the opener, within the prefix
    if guard == "token_loop":
        return 48  # 3 repeats of the cycle are there by 48 tokens; checked every 16 from 48
    return n_prefix + cycles * n_cycle


def engine_stats(s):
    st = s.stats()
    return st, st["generated_tokens"]


def check_engine_stopped(s, before, usage, guard, trip):
    after, gen_after = engine_stats(s)
    again, gen_again = engine_stats(s)
    generated = gen_after - before["generated_tokens"]
    ct = usage["completion_tokens"]
    assert generated == ct, (generated, usage)  # the engine made exactly what usage reports
    assert gen_again == gen_after, "the sequence still generates after the response ended"
    assert again["running"] == 0 and again["queued"] == 0, again
    assert again["kv_blocks_used"] == 0, again
    lag = ct - trip
    print(f"{guard}: trip at {trip} tokens, engine stopped at {ct} (lag {lag})")
    assert -len_tolerance(guard) <= lag <= SLACK_TOKENS, (guard, trip, usage)
    assert after["guard_trips"][guard] == before["guard_trips"][guard] + 1, (before, after)
    assert after["finished_by"]["cancelled"] == before["finished_by"]["cancelled"] + 1, after


def len_tolerance(guard):
    # A worker guard trips on the token that completes the offending piece, which may be a few
    # tokens before the end of its cycle (a sentence cut at ". " within the last tokens).
    return 16


def finish_fields(choice, guard):
    assert choice["finish_reason"] == "length", choice
    assert choice.get("stop_reason") == guard, choice
    if guard in TOOL_LOOP:
        assert choice.get("tool_loop_capped") is True, choice
    else:
        assert not choice.get("tool_loop_capped"), choice


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_guard_trip_ends_response_and_engine_sequence(degen, case, stream):
    case_id, kind, endpoint, guard, cycles, extra = case
    s, meta = degen.get(kind)
    model_id = request(s.url, "GET", "/v1/models").json()["data"][0]["id"]
    body = body_for(case_id, endpoint, extra, model_id)
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    trip = trip_tokens(guard, meta, cycles)
    before = s.stats()
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
        st = Stream(s.url, path, body, timeout=scaled(120))
        assert st.status == 200, st.resp.read()[:2000]
        try:
            chunks, done, raw = read_sse(st)
        finally:
            st.close()
        assert done and raw[-1] == "[DONE]", raw[-3:]
        finals = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
        assert len(finals) == 1, finals
        finish_fields(finals[0]["choices"][0], guard)
        assert chunks[-1]["choices"] == [] and "usage" in chunks[-1], chunks[-1]
        usage = chunks[-1]["usage"]
        calls = [tc for c in chunks if c["choices"]
                 for tc in (c["choices"][0].get("delta") or {}).get("tool_calls") or []
                 if tc.get("id")]
    else:
        r = request(s.url, "POST", path, body)
        assert r.status == 200, r
        o = r.json()
        finish_fields(o["choices"][0], guard)
        usage = o["usage"]
        calls = (o["choices"][0].get("message") or {}).get("tool_calls") or []
    # calls already streamed stay streamed; the one that tripped is not emitted
    if guard in TOOL_LOOP:
        assert len(calls) == cycles - 1, calls
        for c in calls:
            assert c["function"]["name"] == "bash", c
    elif endpoint == "chat":
        assert calls == [], calls
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0, usage
    check_engine_stopped(s, before, usage, guard, trip)


def test_guard_log_line_and_metrics(degen):
    """One WARN line per trip with the request id and the guard name; the engine's trips on
    /metrics as llm_guard_trips_total{guard="..."}."""
    s, _ = degen.get("line")
    model_id = request(s.url, "GET", "/v1/models").json()["data"][0]["id"]
    n_before = s.workers.log_text().count("guard=line_repeat")
    r = request(s.url, "POST", "/v1/completions", {"model": model_id, "prompt": "x"})
    assert r.status == 200 and r.json()["choices"][0]["stop_reason"] == "line_repeat", r
    log = s.workers.log_text()
    lines = [ln for ln in log.splitlines() if "guard tripped" in ln and "guard=line_repeat" in ln]
    assert len(lines) == n_before + 1, log[-2000:]
    assert " WARN " in lines[-1] and "req=" in lines[-1], lines[-1]
    m = request(s.url, "GET", "/metrics")
    assert m.status == 200, m
    samples = [ln for ln in m.body.decode().splitlines()
               if ln.startswith('llm_guard_trips_total{guard="line_repeat"}')]
    assert samples and float(samples[0].split()[-1]) >= 1, m.body[-3000:]


def test_no_guards_runs_to_max_tokens(degen, make_stack):
    """--no-guards really disables them all (token_loop included): the degenerate stream runs
    to max_tokens."""
    path, meta = degen_model("tokens")
    s = make_stack(name="gnog", model=path, processes=1, threads=2, engine_flags=ENGINE_FLAGS,
                   worker_flags=["--no-guards", "--guard-token-loop", "3"])
    model_id = request(s.url, "GET", "/v1/models").json()["data"][0]["id"]
    for p, body in (("/v1/completions", {"prompt": "x"}),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = request(s.url, "POST", p, {"model": model_id, "max_tokens": 200, **body})
        assert r.status == 200, r
        c = r.json()["choices"][0]
        assert c["finish_reason"] == "length" and "stop_reason" not in c, c
        assert r.json()["usage"]["completion_tokens"] == 200, r
    st = s.stats()
    assert all(v == 0 for v in st["guard_trips"].values()), st


def test_request_guards_without_permission_is_400(degen, make_stack):
    path, _ = degen_model("line")
    s = make_stack(name="gnoov", model=path, processes=1, threads=2, engine_flags=ENGINE_FLAGS)
    model_id = request(s.url, "GET", "/v1/models").json()["data"][0]["id"]
    r = request(s.url, "POST", "/v1/completions",
                {"model": model_id, "prompt": "x", "guards": {"line_repeat": 0}})
    assert r.status == 400, r
    assert r.json()["error"]["param"] == "guards", r
    assert s.stats()["requests_submitted"] == 0


def test_request_guard_override_errors_name_the_key(degen):
    s, _ = degen.get("line")
    model_id = request(s.url, "GET", "/v1/models").json()["data"][0]["id"]
    for guards, param in (({"line_repeat": 9}, "guards.line_repeat"),
                          ({"nope": 1}, "guards.nope"),
                          ({"sentence_loop": "high"}, "guards.sentence_loop")):
        r = request(s.url, "POST", "/v1/completions",
                    {"model": model_id, "prompt": "x", "guards": guards})
        assert r.status == 400, r
        assert r.json()["error"]["param"] == param, r


# ---- The OpenAI SDK in an agent loop ----

def agent_loop(client, model_id, executor, max_tokens, bound=20):
    """Runs the returned tool calls with executor, appends the results, sends the next request;
    returns (iterations, last choice)."""
    messages = [{"role": "user", "content": "Build the project."}]
    for i in range(1, bound + 1):
        resp = client.chat.completions.create(model=model_id, messages=messages,
                                              tools=SHELL_TOOL, temperature=0,
                                              max_tokens=max_tokens)
        choice = resp.choices[0]
        if choice.finish_reason == "length":
            return i, choice
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls, choice
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls]})
        for c in calls:
            messages.append({"role": "tool", "tool_call_id": c.id,
                             "content": executor(c.function.name,
                                                 json.loads(c.function.arguments))})
    raise AssertionError(f"the agent loop ran {bound} iterations: no guard stopped it")


@pytest.mark.parametrize("failing", [False, True], ids=["succeeds", "command_not_found"])
def test_sdk_agent_loop_stops_on_length(degen, failing):
    s, meta = degen.get("toolcall")
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0,
                           timeout=scaled(120))
    model_id = client.models.list().data[0].id
    ran = []

    def executor(name, args):
        ran.append((name, args))
        assert name == "bash", name
        word = args["command"].split()[0]
        return f"sh: 1: {word}: command not found" if failing else "/usr/bin/cargo"

    # max_tokens = one cycle: each response is exactly one call (finish "tool_calls"), until a
    # guard that reads the history cuts it
    n, choice = agent_loop(client, model_id, executor, max_tokens=len(meta["cycle_ids"]))
    extra = choice.model_extra or {}
    assert extra.get("tool_loop_capped") is True, choice
    if failing:
        assert (n, extra.get("stop_reason")) == (2, "permanent_failure"), (n, choice)
    else:
        # 4 calls in the history, the 5th identical one in a row trips
        assert (n, extra.get("stop_reason")) == (5, "repeated_call_history"), (n, choice)
    assert choice.message.tool_calls in (None, []), choice
    assert len(ran) == n - 1, ran


# ---- The real model: a long legitimate answer trips nothing ----

# SmolLM2-135M writes this list (30 numbered lines, many "N. Anjeerinaam": short lines that
# differ by their number) and stops by itself after ~280 tokens. Markdown tables are not here: at
# temperature 0 it repeats the same rows forever, and line_repeat rightly cuts that.
@pytest.mark.parametrize("prompt", [
    "Write a numbered list of 30 different fruits, one per line.",
], ids=["numbered_list"])
def test_long_legitimate_answer_trips_nothing(api_stack, model_id, prompt):
    before = api_stack.stats()["guard_trips"]
    r = request(api_stack.url, "POST", "/v1/chat/completions",
                {"model": model_id, "messages": [{"role": "user", "content": prompt}],
                 "max_tokens": 400, "temperature": 0})
    assert r.status == 200, r
    c = r.json()["choices"][0]
    assert c["finish_reason"] in ("stop", "length"), c
    assert "stop_reason" not in c and "tool_loop_capped" not in c, c
    assert r.json()["usage"]["completion_tokens"] > 200, r
    assert api_stack.stats()["guard_trips"] == before


# ---- A guard trip on a sequence that was spilled to disk and restored ----

def test_guard_trip_after_spill_and_restore(degen, make_stack, tmp_path):
    """GUARDS.md and issue 6: with a KV cache far too small for the load, sequences are spilled
    to disk and restored before their guard trips; the worker's CANCEL still reaches the restored
    sequence (re-bound by request id): every response ends by the guard, the engine generated
    exactly what usage reports, and nothing is left running, in KV or on disk."""
    import concurrent.futures
    path, meta = degen_model("line")
    spill = tmp_path / "spill"
    spill.mkdir()
    repeats = 12  # line_repeat trips at the 12th identical line: late enough to spill first
    s = make_stack(name="gspill", model=path, processes=1, threads=24,
                   engine_flags=[*ENGINE_FLAGS, "--kv-cache-mb", "1", "--spill-dir", str(spill)],
                   worker_flags=["--guard-line-repeat", str(repeats),
                                 "--guard-sentence-loop", "0"])
    st0 = s.stats()
    n_blocks = st0["kv_blocks_total"]
    model_id = request(s.url, "GET", "/v1/models").json()["data"][0]["id"]
    trip = trip_tokens("line_repeat", meta, repeats)
    # Short prompts: admission (prompt + watermark) lets many sequences in, and their growth up
    # to the trip point needs about twice the cache, so the scheduler must preempt (spill).
    words = " ".join(f"w{i}" for i in range(12))
    n_req = 24
    need = n_req * ((40 + trip) // 16 + 1)
    assert need > 2 * n_blocks, (need, n_blocks)

    def one(i):
        return request(s.url, "POST", "/v1/completions",
                       {"model": model_id, "prompt": f"{i} {words}", "temperature": 0},
                       timeout=scaled(300))

    with concurrent.futures.ThreadPoolExecutor(n_req) as pool:
        results = list(pool.map(one, range(n_req)))
    total = 0
    for r in results:
        assert r.status == 200, r
        o = r.json()
        finish_fields(o["choices"][0], "line_repeat")
        ct = o["usage"]["completion_tokens"]
        assert trip - len_tolerance("line_repeat") <= ct <= trip + SLACK_TOKENS, (trip, o["usage"])
        total += ct
    st = s.stats()
    print({k: st[k] for k in ("kv_blocks_total", "spills", "restores", "preemptions")})
    assert st["spills"] > st0["spills"] and st["restores"] > st0["restores"], st
    assert st["generated_tokens"] - st0["generated_tokens"] == total, (st, total)
    assert st["guard_trips"]["line_repeat"] - st0["guard_trips"]["line_repeat"] == n_req, st
    assert st["running"] == 0 and st["queued"] == 0 and st["kv_blocks_used"] == 0, st
    assert st["spill_on_disk"] == 0, st
    assert not any(spill.rglob("*")) or all(p.is_dir() for p in spill.rglob("*")), \
        list(spill.rglob("*"))

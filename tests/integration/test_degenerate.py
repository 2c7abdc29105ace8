"""The deterministic degenerate models (tests/tools/mkgguf --degenerate, built by `make all` as
$BUILD/tests/models/degenerate-<kind>.gguf with a <model>.json description) served by the real
llm-engine: whatever the prompt, greedy or sampled, each emits its prefix once and then its cycle
forever, never EOS, so a generation ends with finish "length" at max_tokens. And the engine side of
the guards on them: the token_loop guard (SUBMIT "token_loop") ends a looping sequence with DONE
cancelled / guard token_loop at the first check that sees the loop, its KV blocks free again, and
STATS "guard_trips" counts it, as well as CANCEL frames that name a guard.

The toolcall model is second order (its next token depends on the previous and the current one,
through a previous-token attention head and an FFN that matches the pair): its cycle repeats
tokens ('{"', '":"', '_', '>'), so a prompt that ends inside the cycle continues correctly only
when the model really reads the previous token; its attention is aimed by RoPE at distance 1,
also far into a long prompt.

Waits are bounded STATS polls; nothing compares wall-clock time.
"""

import json
import os
import re
import tempfile

import pytest

from conftest import BUILD, chatml
from engine_util import Engine, scaled, wait_stats

ENGINE = BUILD / "llm-engine"
MODELS = BUILD / "tests" / "models"
KINDS = ["sentence", "line", "tokens", "unterminated", "toolcall"]
# What the second-order toolcall model repeats: test_guards.py's FAILED_HISTORY holds this call.
TOOLCALL = '<tool_call>{"name":"bash","arguments":{"command":"which cargo"}}</tool_call>'
GUARD_NAMES = ["name_run_cap", "identical_call", "repeated_call_history", "tool_call_cap",
               "permanent_failure", "line_repeat", "sentence_loop", "unterminated_tool_call",
               "token_loop"]
FLAGS = ["--kv-cache-mb", "8", "--max-seqs", "4", "--max-batch-tokens", "256",
         "--log-level", "warn"]


def degenerate(kind):
    path = MODELS / f"degenerate-{kind}.gguf"
    if not path.exists():
        pytest.fail(f"{path} is missing: `make all` builds it when {os.environ.get('MODEL')} "
                    "(the default model) is present")
    desc = json.loads(path.with_name(path.name + ".json").read_text())
    return path, desc


def expected(desc, n):
    """The first n ids the model emits after a prompt ending outside its graph."""
    seq = list(desc["prefix_ids"])
    while len(seq) < n:
        seq += desc["cycle_ids"]
    return seq[:n]


@pytest.fixture
def engine_for():
    started = []
    with tempfile.TemporaryDirectory(prefix="llm-dg-") as d:
        def start(kind, *flags):
            path, desc = degenerate(kind)
            e = Engine(ENGINE, path, os.path.join(d, f"e{len(started)}"), *FLAGS, *flags)
            started.append(e)
            e.start()
            return e, desc

        yield start
        for e in started:
            rc = e.stop(timeout=scaled(30))
            assert rc == 0, f"engine exited {rc}:\n{e.stderr()[-3000:]}"


def generate(conn, req_id, n, **params):
    conn.submit(req_id, max_tokens=n, **params)
    r = conn.read_request(req_id, timeout=scaled(60))
    assert r.error is None, r.error
    return r


@pytest.mark.parametrize("kind", KINDS)
def test_degenerate_cycle_forever(engine_for, kind):
    e, desc = engine_for(kind)
    text = (desc["prefix"] + desc["cycle"] * 4).encode()
    n = len(desc["prefix_ids"]) + 3 * len(desc["cycle_ids"]) + 5
    want = expected(desc, n)
    with e.connect() as c:
        prompts = [dict(prompt=chatml("Please check whether cargo is installed."),
                        parse_special=True),
                   dict(prompt="The capital of France is"),
                   dict(prompt_ids=[1, 2, 3, 4])]
        samplers = [dict(temperature=0),
                    dict(temperature=1.0, seed=7),
                    dict(temperature=1.5, top_k=0, top_p=1.0, seed=11)]
        req = 0
        for p in prompts:
            for s in samplers:
                req += 1
                r = generate(c, req, n, **p, **s)
                assert r.ids == want, (p, s, r.text)
                assert text.startswith(r.text)
                assert r.done["finish"] == "length", r.done
                assert r.done["usage"]["completion_tokens"] == n
        # Long: still the cycle, never an end-of-generation token.
        long_n = 600
        r = generate(c, 100, long_n, prompt="Hello")
        assert r.ids == expected(desc, long_n)
        assert r.done["finish"] == "length"
        s = c.stats()
        assert s["finished_by"]["eos"] == 0
        assert s["kv_blocks_used"] == 0


def test_degenerate_chat_starts_at_prefix(engine_for):
    """A ChatML generation prompt ends in "\\n", which the unterminated model's graph does not
    hold: the response opens the tool call."""
    e, desc = engine_for("unterminated")
    with e.connect() as c:
        r = generate(c, 1, 12, prompt=chatml("list the files"), parse_special=True)
        assert r.text.startswith(b'<tool_call>{"lorem ipsum')


def test_degenerate_token_loop_trips(engine_for):
    e, desc = engine_for("tokens")
    period = len(desc["cycle_ids"])
    assert 2 <= period <= 16  # 3 periods fit in the first check at 48 tokens
    with e.connect() as c:
        # Off (the default): runs to max_tokens.
        r = generate(c, 1, 200, prompt="Go on:")
        assert r.done["finish"] == "length" and r.done["guard"] == ""
        assert r.done["usage"]["completion_tokens"] == 200
        # On: the check at 48 tokens sees 3 repeats; the sequence ends there, in that tick.
        r = generate(c, 2, 2000, prompt="Go on:", token_loop=3)
        assert r.done["finish"] == "cancelled", r.done
        assert r.done["guard"] == "token_loop"
        assert r.done["usage"]["completion_tokens"] == 48
        assert r.ids == expected(desc, 48)
        s = wait_stats(c, lambda s: s["running"] == 0 and s["queued"] == 0, "idle")
        assert s["kv_blocks_used"] == 0
        assert s["generated_tokens"] == 200 + 48
        assert s["cancels"].get("token_loop") == 1
        assert set(s["guard_trips"]) == set(GUARD_NAMES)
        assert s["guard_trips"]["token_loop"] == 1
        assert sum(s["guard_trips"].values()) == 1
        # With more repeats asked for, the first check that sees them (64 tokens for 4 x 16).
        r = generate(c, 3, 2000, prompt="Go on:", token_loop=4)
        assert r.done["guard"] == "token_loop"
        assert r.done["usage"]["completion_tokens"] == -(-4 * period // 16) * 16
        assert c.stats()["guard_trips"]["token_loop"] == 2
    warns = re.findall(r"guard trip req=(\d+) .*guard=token_loop", e.stderr())
    assert warns == ["2", "3"], e.stderr()[-2000:]


def test_degenerate_guard_cancel_counted(engine_for):
    """A worker's CANCEL naming a guard frees the sequence and counts a trip of that guard; other
    cancel reasons count none."""
    e, desc = engine_for("sentence")
    with e.connect() as c:
        c.submit(1, prompt="Hi", max_tokens=4000)
        c.read_request(1, until=lambda r: len(r.tokens) >= 5, timeout=scaled(60))
        c.cancel(1, "sentence_loop")
        r = c.read_request(1, timeout=scaled(60))
        assert r.done["finish"] == "cancelled" and r.done["guard"] == "sentence_loop"
        c.submit(2, prompt="Hi", max_tokens=4000)
        c.read_request(2, until=lambda r: len(r.tokens) >= 5, timeout=scaled(60))
        c.cancel(2, "client_disconnect")
        r = c.read_request(2, timeout=scaled(60))
        assert r.done["guard"] == "client_disconnect"
        s = wait_stats(c, lambda s: s["running"] == 0, "idle")
        assert s["kv_blocks_used"] == 0
        assert s["guard_trips"]["sentence_loop"] == 1
        assert sum(s["guard_trips"].values()) == 1


# ---- The second-order toolcall model ----

SAMPLERS = [dict(temperature=0), dict(temperature=1.0, seed=7),
            dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0, seed=11)]


def test_toolcall_model_describes_its_call():
    _, desc = degenerate("toolcall")
    assert desc["order"] == 2 and desc["prefix_ids"] == []
    assert desc["cycle"] == TOOLCALL
    inner = json.loads(TOOLCALL[len("<tool_call>"):-len("</tool_call>")])
    assert inner == {"name": "bash", "arguments": {"command": "which cargo"}}
    cycle = desc["cycle_ids"]
    # tokens repeat within the cycle: no first-order model can emit it
    assert len(set(cycle)) < len(cycle)
    # but each (previous, current) pair occurs once, the first token once
    pairs = [(cycle[j - 1], cycle[j]) for j in range(len(cycle))]
    assert len(set(pairs)) == len(pairs) and cycle.count(cycle[0]) == 1


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["greedy", "t1", "t1.5"])
def test_toolcall_cycle_for_hundreds_of_tokens(engine_for, sampler):
    e, desc = engine_for("toolcall")
    n = 520  # 20 calls
    want = expected(desc, n)
    prompts = [dict(prompt=chatml("Please check whether cargo is installed."), parse_special=True),
               dict(prompt="The capital of France is"),
               dict(prompt_ids=[1, 2, 3, 4]),
               dict(prompt="x")]
    with e.connect() as c:
        for i, p in enumerate(prompts):
            r = generate(c, i + 1, n, **p, **sampler)
            assert r.ids == want, (p, r.text[:300])
            assert r.text == (TOOLCALL * 20).encode()
            assert r.done["finish"] == "length", r.done
            assert r.done["usage"]["completion_tokens"] == n
        s = c.stats()
        assert s["finished_by"]["eos"] == 0
        assert s["kv_blocks_used"] == 0


def test_toolcall_reads_the_previous_token(engine_for):
    """A prompt ending anywhere inside the cycle continues from there: where the current token
    occurs twice in the cycle ('{"' then 'name' or 'command'), only the previous token tells."""
    e, desc = engine_for("toolcall")
    cycle = desc["cycle_ids"]
    n_cycle = len(cycle)
    with e.connect() as c:
        for j in range(n_cycle):
            r = generate(c, j + 1, 2 * n_cycle, prompt_ids=[17] + cycle[:j + 1])
            want = (cycle[j + 1:] + cycle * 3)[:2 * n_cycle]
            assert r.ids == want, (j, r.text)
        # the same last token after a token outside the cycle: back to the start
        r = generate(c, 100, n_cycle, prompt_ids=[17, cycle[5]])
        assert r.ids == cycle


def test_toolcall_previous_token_head_over_a_long_prompt(engine_for):
    """3000 prompt tokens (pseudo-random, none from the cycle): the head still picks distance 1
    out of thousands of earlier positions, during prefill and decode."""
    e, desc = engine_for("toolcall")
    in_cycle = set(desc["cycle_ids"])
    ids, x = [], 12345
    while len(ids) < 3000:
        x = (x * 1103515245 + 12345) % (1 << 31)
        t = 100 + x % 40000
        if t not in in_cycle:
            ids.append(t)
    with e.connect() as c:
        r = generate(c, 1, 500, prompt_ids=ids, temperature=0)
        assert r.ids == expected(desc, 500)
        # and inside the cycle after the long prompt: (previous, current) still read right
        cycle = desc["cycle_ids"]
        r = generate(c, 2, 100, prompt_ids=ids + cycle[:13], temperature=0)
        assert r.ids == (cycle[13:] + cycle * 5)[:100]

"""Scale-out and failover: two engine+worker pairs (each its own llm-engine socket and its own
llm-fcgi on TCP, as two hosts would be) behind one front web server rendered from
examples/lighttpd-multi.conf (and nginx-multi.conf, apache-multi.conf).

Under load (several concurrent streams spread over both pairs) one pair is stopped, by SIGTERM
(an operator taking a host out) or SIGKILL (a host lost). Then:
- every stream in flight ends within bounded time, each either complete (one [DONE], all of its
  max_tokens tokens, finish_reason "length" and no stop_reason) or a clean failure: an HTTP error
  status, an error event, a final chunk whose stop_reason names the cause, or a body cut without
  [DONE]. Never a hang (every read has a timeout) and never a short stream passed off as
  complete. After SIGKILL every stream that was on the lost pair fails and every other completes.
- every new request after the stopped pair stopped accepting connections succeeds on the other
  pair (20 sequential streaming requests, each 200 with [DONE]); the surviving engine counts them.
Synchronisation is by polling engine STATS and the stopped pair's port, each bounded.
"""

import http.client
import json
import signal
import threading

import pytest

from engine_util import scaled
from stack import Stream, eog_bias, request

N_STREAMS = 4
STREAM_TOKENS = 160
NEW_REQUESTS = 20


@pytest.fixture
def make_multi(fcgi_bin, model_path):
    """A factory of MultiStacks for one test, each stopped and checked at teardown."""
    from stack import MultiStack
    made = []

    def make(**kw):
        s = MultiStack(**kw)
        made.append(s)
        return s.start()

    yield make
    for s in made:
        s.stop()


def chat(model_id, content, max_tokens, **kw):
    body = {"model": model_id, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update(kw)
    return body


class Load:
    """One streaming request read on its own thread. started is set at its first content event
    (or at its end); outcome is ("complete", n) or ("failed", why) once the thread ends."""

    def __init__(self, url, body):
        self.url = url
        self.body = body
        self.started = threading.Event()
        self.outcome = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            self.outcome = self.read()
        except (http.client.HTTPException, OSError, ValueError) as e:
            # A cut chunked body, a reset connection: the client sees the end as a failure.
            self.outcome = ("failed", f"cut: {e!r}")
        finally:
            self.started.set()

    def read(self):
        st = Stream(self.url, "/v1/chat/completions", self.body, timeout=scaled(60))
        try:
            if st.status != 200:
                return ("failed", f"HTTP {st.status}")
            raw = []
            for kind, text in st.events():
                if kind != "data":
                    continue
                raw.append(text)
                if '"content"' in text:
                    self.started.set()
            return classify(raw, self.body["max_tokens"])
        finally:
            st.close()


def classify(raw, max_tokens):
    """("complete", tokens) for a stream that finished for real, ("failed", why) for one that
    tells its client it did not; raises AssertionError for one that passes a failure off as a
    success (a short stream with [DONE] and nothing naming a cause)."""
    if "[DONE]" not in raw:
        return ("failed", "cut: no [DONE]")
    assert raw[-1] == "[DONE]" and raw.count("[DONE]") == 1, raw[-3:]
    chunks = [json.loads(t) for t in raw[:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    if errors:
        return ("failed", f"error event: {errors[0].get('message')}")
    finals = [c["choices"][0] for c in chunks
              if c.get("choices") and c["choices"][0].get("finish_reason")]
    assert len(finals) == 1, raw[-4:]
    if finals[0].get("stop_reason"):
        return ("failed", f"stop_reason {finals[0]['stop_reason']}")
    tokens = chunks[-1]["usage"]["completion_tokens"]
    assert finals[0]["finish_reason"] == "length" and tokens == max_tokens, \
        f"a short stream passed off as complete: {finals[0]}, {tokens} tokens"
    return ("complete", tokens)


def wait_stats(pair, pred, what, timeout=None):
    from engine_util import wait_stats as ws
    with pair.engine.connect() as c:
        return ws(c, pred, what, timeout)


def failover_under_load(s, web, model_id, sig):
    a, b = s.pairs
    bias = eog_bias(a.engine.info)
    loads = [Load(web.url, chat(model_id, f"Tell story number {i}.", STREAM_TOKENS,
                                logit_bias=bias))
             for i in range(N_STREAMS)]
    for ld in loads:
        assert ld.started.wait(scaled(120)), "a stream did not start"
    assert all(ld.outcome is None for ld in loads), [ld.outcome for ld in loads]
    # Both pairs are carrying streams (the front server spread them); record how many are on a.
    on_a = a.stats()["running"]
    on_b = b.stats()["running"]
    assert on_a >= 1 and on_b >= 1 and on_a + on_b == N_STREAMS, (on_a, on_b)
    b_before = b.stats()["requests_finished"]

    statuses, engine_rc = a.stop(sig)
    a.workers.wait_refusing()

    # Every new request now succeeds, on b.
    for i in range(NEW_REQUESTS):
        st = Stream(web.url, "/v1/chat/completions",
                    chat(model_id, f"Say hello {i}.", 4, logit_bias=bias), timeout=scaled(60))
        try:
            assert st.status == 200, (i, st.status, st.resp.read()[:500])
            raw = [t for k, t in st.events() if k == "data"]
        finally:
            st.close()
        assert classify(raw, 4) == ("complete", 4), (i, raw[-3:])

    for ld in loads:
        ld.thread.join(scaled(120))
        assert not ld.thread.is_alive(), "a stream hung"
    outcomes = [ld.outcome for ld in loads]
    failed = [o for o in outcomes if o[0] == "failed"]
    done = [o for o in outcomes if o[0] == "complete"]
    assert len(done) >= on_b, outcomes  # b's streams are untouched
    if sig == signal.SIGKILL:
        assert len(failed) == on_a, outcomes  # nothing on a lost host can finish
    wait_stats(b, lambda st: st["requests_finished"] >= b_before + NEW_REQUESTS + on_b,
               "b served the new requests and its streams")
    print(f"\n{web.name} {sig.name}: streams on a={on_a} b={on_b}; outcomes {outcomes}; "
          f"a's workers {statuses}, engine rc {engine_rc}")
    return outcomes


def test_lighttpd_host_lost_sigkill(make_multi):
    s = make_multi(name="fk")
    web = s.add_lighttpd_multi()
    model_id = request(web.url, "GET", "/v1/models").json()["data"][0]["id"]
    failover_under_load(s, web, model_id, signal.SIGKILL)


def test_lighttpd_pair_stopped_sigterm(make_multi):
    s = make_multi(name="ft", engine_flags=["--grace-seconds", "1"])
    web = s.add_lighttpd_multi()
    model_id = request(web.url, "GET", "/v1/models").json()["data"][0]["id"]
    failover_under_load(s, web, model_id, signal.SIGTERM)


def test_nginx_host_lost_sigkill(make_multi, require_tool):
    require_tool("nginx")
    s = make_multi(name="fn")
    web = s.add_nginx_multi()
    model_id = request(web.url, "GET", "/v1/models").json()["data"][0]["id"]
    failover_under_load(s, web, model_id, signal.SIGKILL)


def test_apache_balancer_host_lost_sigkill(make_multi, require_tool):
    require_tool("apache2")
    require_tool("/usr/lib/apache2/modules/mod_proxy_balancer.so")
    s = make_multi(name="fa")
    web = s.add_apache_multi()
    model_id = request(web.url, "GET", "/v1/models").json()["data"][0]["id"]
    failover_under_load(s, web, model_id, signal.SIGKILL)


def test_nginx_moves_requests_off_a_pair_whose_engine_is_down(make_multi, require_tool):
    # The worker of pair a stays up but its engine is gone: it answers 503, and nginx
    # (fastcgi_next_upstream http_503 non_idempotent) sends each request on to pair b.
    require_tool("nginx")
    s = make_multi(name="fe")
    web = s.add_nginx_multi()
    a, b = s.pairs
    model_id = request(web.url, "GET", "/v1/models").json()["data"][0]["id"]
    a.stopped = signal.SIGKILL
    a.engine.stop(signal.SIGKILL)
    before = b.stats()["requests_finished"]
    for i in range(NEW_REQUESTS):
        r = request(web.url, "POST", "/v1/chat/completions",
                    {"model": model_id, "max_tokens": 2,
                     "messages": [{"role": "user", "content": f"Hi {i}"}]}, timeout=scaled(60))
        assert r.status == 200, (i, r)
    assert b.stats()["requests_finished"] == before + NEW_REQUESTS
    assert a.workers.alive() == a.workers.pids  # the worker itself never went down

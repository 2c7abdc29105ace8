"""Streaming through the real stack (lighttpd, llm-fcgi under spawn-fcgi, llm-engine): each SSE
event reaches the client while the engine is still generating (checked against the engine's
generated-token counter at the arrival of events, not against a clock), 32 concurrent streams all
end with one correct [DONE], a client that leaves (streaming or not) frees its sequence, a killed
worker frees its sequence while the others go on serving, the engine restarted under load gives
503s and then service comes back without restarting the workers, and SIGTERM to the workers lets
in-flight streams finish before they exit 0.
"""

import concurrent.futures
import http.client
import json
import os
import signal
import threading


from engine_util import scaled
from stack import Stream, read_sse, request, status_text, wait_until, watch_stream

MAX_LAG = 24  # tokens generated beyond those received; buffering of 4 KiB or more exceeds it


def chat(model_id, content="Count from one to one hundred in words.", **kw):
    body = {"model": model_id, "messages": [{"role": "user", "content": content}],
            "max_tokens": 16, "temperature": 0}
    body.update(kw)
    return body


def idle(st):
    return st["running"] == 0 and st["queued"] == 0 and st["kv_blocks_used"] == 0


def check_stream(chunks, done, raw, max_tokens=None):
    assert done and raw[-1] == "[DONE]" and raw.count("[DONE]") == 1, raw[-3:]
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", chunks[0]
    finals = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(finals) == 1, raw
    assert finals[0] is [c for c in chunks if c["choices"]][-1], raw
    assert len({c["id"] for c in chunks}) == 1, raw
    return finals[0]["choices"][0]["finish_reason"]


def test_events_reach_the_client_while_the_engine_generates(api_stack, model_id):
    wait_until(api_stack, idle, "engine idle")
    # EOS banned for 160 tokens makes the small model repeat itself: the content guards would
    # (rightly) cut it, and this test is about event timing, so they are off for this request.
    body = chat(model_id, max_tokens=160, logit_bias=bias(api_stack),
                stream_options={"include_usage": True},
                guards={"line_repeat": 0, "sentence_loop": 0})
    chunks, done, raw, lags, headers = watch_stream(api_stack, api_stack.url, body)
    assert headers["content-type"].startswith("text/event-stream"), headers
    assert headers.get("cache-control") == "no-cache", headers
    assert headers.get("x-accel-buffering") == "no", headers
    check_stream(chunks, done, raw)
    assert chunks[-1]["usage"]["completion_tokens"] == 160, chunks[-1]
    n_content = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    # One event per token or close to it (only UTF-8 assembly may merge tokens).
    assert n_content >= 120, n_content
    assert set(lags) == {1, 2, 4, 8, 16, 32, 64}, lags
    # The counter is live (a counter updated only at the end would read below the events).
    assert min(lags.values()) >= 0, lags
    assert max(lags.values()) <= MAX_LAG, f"tokens generated beyond those received: {lags}"


def bias(stack):
    from stack import eog_bias
    return eog_bias(stack.info)


def _one_stream(url, model_id, i):
    s = Stream(url, "/v1/chat/completions",
               chat(model_id, content=f"Say something about the number {i}.", max_tokens=12,
                    stream=True, stream_options={"include_usage": True}))
    assert s.status == 200, s.status
    chunks, done, raw = read_sse(s)
    finish = check_stream(chunks, done, raw)
    usage = chunks[-1]["usage"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return finish, usage, text


def test_32_concurrent_streams_all_finish_with_done(api_stack, model_id):
    before = api_stack.stats()
    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(lambda i: _one_stream(api_stack.url, model_id, i), range(32)))
    for finish, usage, text in results:
        assert finish in ("stop", "length")
        assert 0 < usage["completion_tokens"] <= 12
        assert (finish == "length") == (usage["completion_tokens"] == 12)
    after = wait_until(api_stack, idle, "all 32 freed")
    assert after["requests_finished"] - before["requests_finished"] == 32, (before, after)
    assert after["generated_tokens"] - before["generated_tokens"] == \
        sum(u["completion_tokens"] for _, u, _ in results)


def test_client_leaving_a_stream_frees_its_sequence(api_stack, model_id):
    wait_until(api_stack, idle, "engine idle")
    before = api_stack.stats()
    s = Stream(api_stack.url, "/v1/chat/completions",
               chat(model_id, max_tokens=4000, stream=True, logit_bias=bias(api_stack)))
    assert s.status == 200
    seen = 0
    for kind, text in s.events():
        if kind == "data" and '"content"' in text:
            seen += 1
            if seen == 3:
                break
    assert api_stack.stats()["running"] == 1
    s.close()
    after = wait_until(api_stack, idle, "sequence freed after the disconnect", timeout=scaled(30))
    assert after["finished_by"]["cancelled"] == before["finished_by"]["cancelled"] + 1, after
    # Cancelled long before its 4000 tokens.
    assert after["generated_tokens"] - before["generated_tokens"] < 2000, (before, after)


def test_client_leaving_a_non_streaming_request_frees_its_sequence(api_stack, model_id):
    import socket
    wait_until(api_stack, idle, "engine idle")
    before = api_stack.stats()
    port = int(api_stack.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=scaled(60))
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps(chat(model_id, max_tokens=4000, logit_bias=bias(api_stack))),
                 headers={"Content-Type": "application/json"})
    wait_until(api_stack, lambda st: st["running"] == 1, "request running")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    after = wait_until(api_stack, idle, "sequence freed after the disconnect", timeout=scaled(30))
    assert after["finished_by"]["cancelled"] == before["finished_by"]["cancelled"] + 1, after
    assert after["generated_tokens"] - before["generated_tokens"] < 2000, (before, after)


def test_killed_worker_frees_its_sequence_and_the_others_serve(make_stack, model_id):
    # Two worker groups of one process each on one engine, each behind its own lighttpd, so that
    # the process holding the stream is known.
    s = make_stack(name="kill", processes=1, threads=4)
    other = s.add_workers("other", processes=1, threads=4)
    other_web = s.add_lighttpd(other)
    st = Stream(s.url, "/v1/chat/completions",
                chat(model_id, max_tokens=4000, stream=True, logit_bias=bias(s)))
    events = st.events()
    next(e for e in events if e[0] == "data" and '"content"' in e[1])
    status = s.workers.kill(sig=signal.SIGKILL)
    assert os.WIFSIGNALED(status), status_text(status)
    rest = []
    try:
        rest = [t for k, t in events if k == "data"]
    except (http.client.HTTPException, OSError):
        pass  # a cut chunked body is one way for the client to see the end
    st.close()
    assert "[DONE]" not in rest  # a cut stream is told apart from a finished one
    wait_until(s, idle, "sequence of the killed worker freed", timeout=scaled(30))
    # The other worker serves.
    for _ in range(4):
        r = request(other_web.url, "POST", "/v1/chat/completions", chat(model_id, max_tokens=4))
        assert r.status == 200, r


def test_engine_restart_under_load_gives_503_then_recovers(make_stack, model_id):
    s = make_stack(name="rs", processes=2, threads=4)
    pids = list(s.workers.alive())
    stop = threading.Event()
    statuses = []
    lock = threading.Lock()

    def load(i):
        while not stop.is_set():
            try:
                r = request(s.url, "POST", "/v1/chat/completions",
                            chat(model_id, content=f"Hello {i}", max_tokens=6),
                            timeout=scaled(60))
                with lock:
                    statuses.append((r.status, r.headers.get("retry-after")))
            except OSError as e:
                with lock:
                    statuses.append((repr(e), None))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(s, lambda st: st["requests_finished"] >= 8, "load running")
        s.stop_engine()
        # While the engine is down every request is a 503 with Retry-After.
        r = request(s.url, "POST", "/v1/chat/completions", chat(model_id, max_tokens=2))
        assert r.status == 503 and int(r.headers.get("retry-after", "0")) >= 1, r
        s.start_engine()
        s.wait_health()
        # Service comes back for the load too.
        wait_until(s, lambda st: st["requests_finished"] >= 8, "load served by the new engine")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=scaled(120))
    codes = [c for c, _ in statuses]
    assert set(codes) <= {200, 503}, codes
    assert all(ra and int(ra) >= 1 for c, ra in statuses if c == 503), statuses
    assert codes[-1] == 200, codes[-10:]
    # The same worker processes, all alive: no restart was needed.
    assert s.workers.alive() == pids
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] != "Z"
    for _ in range(6):
        r = request(s.url, "POST", "/v1/chat/completions", chat(model_id, max_tokens=2))
        assert r.status == 200, r


def test_sigterm_drains_in_flight_streams(make_stack, model_id):
    s = make_stack(name="drain", processes=2, threads=4)
    n = 3
    streams = [Stream(s.url, "/v1/chat/completions",
                      chat(model_id, content=f"Story {i}", max_tokens=48, stream=True,
                           logit_bias=bias(s), stream_options={"include_usage": True}))
               for i in range(n)]
    its = [st.events() for st in streams]
    for it in its:
        next(e for e in it if e[0] == "data" and '"content"' in e[1])
    pids = list(s.workers.alive())
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    # Every stream still ends normally with all its tokens.
    for it in its:
        chunks, raw = [], []
        for kind, text in it:
            if kind == "data":
                raw.append(text)
                if text != "[DONE]":
                    chunks.append(json.loads(text))
        assert raw and raw[-1] == "[DONE]", raw[-3:]
        assert chunks[-1]["usage"]["completion_tokens"] == 48, chunks[-1]
        finals = [c["choices"][0]["finish_reason"] for c in chunks
                  if c["choices"] and c["choices"][0].get("finish_reason")]
        assert finals == ["length"], finals
    for st in streams:
        st.close()
    # Then every worker exits 0.
    for pid in pids:
        status = s.workers.wait(pid, scaled(60))
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status_text(status)
    wait_until(s, idle, "all freed")

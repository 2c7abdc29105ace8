"""The example configurations of examples/ with the web servers from Debian's packages: nginx
(examples/nginx.conf), Apache with mod_proxy_fcgi and with mod_fcgid (examples/apache.conf, both
variants) and lighttpd starting the workers itself (examples/lighttpd-bin-path.conf), each run in
the foreground on a free loopback port with its configuration rendered from the example.

Each serves a streaming chat completion whose events arrive while the engine is still generating
(the engine's generated-token counter at the arrival of events, as in test_api_stream.py), with
[DONE] last, and passes the Authorization header through (the workers run with --api-key).
Missing servers fail under CI (CI=true) and skip elsewhere.
"""

import os

import pytest

from stack import check_error, eog_bias, request, wait_until, watch_stream

KEY = "sk-webserver-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_LAG = 24


@pytest.fixture(scope="module")
def keyed(api_stack):
    """Workers with an API key on the session's engine (one group for every server here)."""
    return api_stack.add_workers("ws", ["--api-key", KEY], processes=2, threads=4)


def idle(st):
    return st["running"] == 0 and st["queued"] == 0 and st["kv_blocks_used"] == 0


def serve_stream(stack, web, model_id, max_tokens=96):
    auth = AUTH
    # The key travels through the server: no key is a 401 from the worker, the key works.
    check_error(request(web.url, "POST", "/v1/chat/completions",
                        {"model": model_id, "messages": [{"role": "user", "content": "Hi"}]}),
                401, "authentication_error")
    wait_until(stack, idle, "engine idle")
    body = {"model": model_id, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from one to fifty in words."}],
            "logit_bias": eog_bias(stack.info), "stream_options": {"include_usage": True}}
    chunks, done, raw, lags, headers = watch_stream(stack, web.url, body, headers=auth,
                                                    checkpoints=(1, 2, 4, 8, 16, 32))
    assert headers["content-type"].startswith("text/event-stream"), headers
    assert done and raw[-1] == "[DONE]" and raw.count("[DONE]") == 1, raw[-3:]
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", chunks[0]
    assert chunks[-1]["usage"]["completion_tokens"] == max_tokens, chunks[-1]
    finals = [c["choices"][0]["finish_reason"] for c in chunks
              if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finals == ["length"], finals
    assert set(lags) == {1, 2, 4, 8, 16, 32}, lags
    assert min(lags.values()) >= 0, lags
    assert max(lags.values()) <= MAX_LAG, f"{web.name}: tokens generated beyond received {lags}"
    # Non-streaming and the other endpoints go through too.
    r = request(web.url, "GET", "/v1/models", headers=auth)
    assert r.status == 200 and r.json()["data"][0]["id"] == model_id, r
    whole = {k: v for k, v in body.items() if k != "stream_options"}
    r = request(web.url, "POST", "/v1/chat/completions", dict(whole, max_tokens=4), headers=auth)
    assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 4, r
    check_error(request(web.url, "GET", "/v1/nope", headers=auth), 404, "not_found_error")


def test_nginx_streams(api_stack, keyed, model_id, require_tool):
    require_tool("nginx")
    web = api_stack.add_nginx(keyed, headers=AUTH)
    serve_stream(api_stack, web, model_id)


def test_apache_mod_proxy_fcgi_streams(api_stack, keyed, model_id, require_tool):
    require_tool("apache2")
    require_tool("/usr/lib/apache2/modules/mod_proxy_fcgi.so")
    web = api_stack.add_apache(keyed, headers=AUTH)
    serve_stream(api_stack, web, model_id)


def test_apache_mod_fcgid_streams(api_stack, model_id, require_tool):
    require_tool("apache2")
    require_tool("/usr/lib/apache2/modules/mod_fcgid.so")
    web = api_stack.add_apache(fcgid=(["--api-key", KEY], 2), headers=AUTH)
    serve_stream(api_stack, web, model_id)


def test_lighttpd_bin_path_streams(api_stack, model_id, require_tool):
    require_tool("lighttpd")
    web = api_stack.add_lighttpd(bin_path=(["--api-key", KEY], 2, 4), headers=AUTH)
    serve_stream(api_stack, web, model_id)
    # lighttpd started the workers: they are its children and go away with it (checked when
    # the stack stops: no process mentioning the stack's directory may be left).
    kids = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == web.proc.pid]
    assert len(kids) == 2, kids


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None

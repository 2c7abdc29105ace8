"""Every error row of API.md through the real stack (lighttpd in front of llm-fcgi under
spawn-fcgi): 400 with the param named (bad JSON, missing and wrong-typed fields, out-of-range
values, n > 1, response_format, a prompt longer than the context), 401 with --api-key and
--api-key-file, 404 (path, model), 405, 413, 429 with Retry-After when the engine queue is full,
503 when the engine is down, and the error body shape {"error": {message, type, param, code}} of
each. CORS preflight with --cors-origin.
"""

import json
import re
import threading

import openai
import pytest

from engine_util import scaled
from stack import Stream, check_error, eog_bias, request, wait_until

KEY = "sk-test-0123456789abcdef"
FILE_KEY = "sk-from-file-fedcba9876543210"
ORIGIN = "https://app.example.test"
SMALL_BODY = 65536


def chat(model_id, **kw):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2, "temperature": 0}
    body.update(kw)
    return body


def post(url, body, path="/v1/chat/completions", headers=None):
    return request(url, "POST", path, body, headers=headers)


# ---- 400 ----

def test_bad_json_is_400(api_stack):
    for raw in (b"{not json", b'{"model": "x", "messages": [', b"", b"[1,2,3]", b"\x00\xff\xfe"):
        r = post(api_stack.url, raw, headers={"Content-Type": "application/json"})
        check_error(r, 400, "invalid_request_error")


@pytest.mark.parametrize("field,value,param", [
    ("messages", None, "messages"),
    ("messages", "hello", "messages"),
    ("messages", [{"role": "wizard", "content": "x"}], "messages"),
    ("max_tokens", "ten", "max_tokens"),
    ("max_tokens", -1, "max_tokens"),
    ("temperature", "hot", "temperature"),
    ("temperature", 7.5, "temperature"),
    ("top_p", 1.5, "top_p"),
    ("stream", "yes", "stream"),
    ("stop", ["a", "b", "c", "d", "e"], "stop"),
    ("top_logprobs", 50, "top_logprobs"),
    ("seed", "abc", "seed"),
    ("tool_choice", "sometimes", "tool_choice"),
], ids=lambda v: str(v)[:20])
def test_wrong_field_is_400_naming_param(api_stack, model_id, field, value, param):
    body = chat(model_id)
    if value is None:
        del body[field]
    else:
        body[field] = value
    if field == "top_logprobs":
        body["logprobs"] = True
    err = check_error(post(api_stack.url, body), 400, "invalid_request_error")
    # The param names the field, or a part of it ("messages[0].role").
    assert err["param"] == param or re.match(re.escape(param) + r"[.\[]", err["param"] or ""), err


def test_completions_missing_prompt_is_400(api_stack, model_id):
    r = post(api_stack.url, {"model": model_id, "max_tokens": 2}, path="/v1/completions")
    check_error(r, 400, "invalid_request_error", param="prompt")


def test_n_above_one_is_400(api_stack, model_id):
    check_error(post(api_stack.url, chat(model_id, n=2)), 400, "invalid_request_error", param="n")
    # n = 1 is fine.
    assert post(api_stack.url, chat(model_id, n=1)).status == 200


@pytest.mark.parametrize("fmt", [{"type": "json_object"},
                                 {"type": "json_schema",
                                  "json_schema": {"name": "x", "schema": {"type": "object"}}}])
def test_response_format_is_400(api_stack, model_id, fmt):
    check_error(post(api_stack.url, chat(model_id, response_format=fmt)), 400,
                "invalid_request_error", param="response_format")


def test_prompt_longer_than_context_is_400(api_stack, model_id):
    n_ctx = api_stack.info["n_ctx"]
    long = "hello " * (n_ctx + 100)  # one token per word and more words than the context
    err = check_error(post(api_stack.url, chat(model_id, messages=[{"role": "user",
                                                                   "content": long}])),
                      400, "invalid_request_error", code="context_length_exceeded")
    assert "/" not in err["message"], err  # no paths leak
    # The same through the SDK: a BadRequestError.
    client = openai.OpenAI(base_url=api_stack.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=model_id, prompt=long, max_tokens=2)
    assert ei.value.code == "context_length_exceeded"


def test_unknown_fields_are_ignored(api_stack, model_id):
    r = post(api_stack.url, chat(model_id, some_future_field={"a": 1}, user="u-1"))
    assert r.status == 200, r


# ---- 404, 405 ----

@pytest.mark.parametrize("method,path", [("GET", "/v1/nope"), ("POST", "/v1/chat"),
                                         ("GET", "/"), ("POST", "/v2/chat/completions")])
def test_unknown_path_is_404(api_stack, method, path):
    check_error(request(api_stack.url, method, path, b"{}" if method == "POST" else None),
                404, "not_found_error")


def test_unknown_model_is_404(api_stack, model_id):
    err = check_error(post(api_stack.url, chat(model_id, model="no-such-model")), 404,
                      "not_found_error")
    assert err["param"] in ("model", None), err
    r = post(api_stack.url, {"model": "no-such-model", "prompt": "x", "max_tokens": 1},
             path="/v1/completions")
    check_error(r, 404, "not_found_error")


@pytest.mark.parametrize("method,path", [("GET", "/v1/chat/completions"),
                                         ("PUT", "/v1/completions"),
                                         ("POST", "/v1/models"),
                                         ("DELETE", "/health")])
def test_wrong_method_is_405(api_stack, method, path):
    check_error(request(api_stack.url, method, path, b"{}" if method in ("POST", "PUT") else None),
                405, "invalid_request_error")


# ---- 413 ----

def test_body_over_default_limit_is_413(api_stack, model_id):
    body = json.dumps(chat(model_id, messages=[{"role": "user", "content": "x" * (5 << 20)}]))
    check_error(post(api_stack.url, body.encode(), headers={"Content-Type": "application/json"}),
                413, "invalid_request_error")


# ---- A second worker group with keys, a small body limit and CORS ----

@pytest.fixture(scope="module")
def locked(api_stack):
    """Workers with --api-key, --api-key-file, --max-body-bytes and --cors-origin, behind their own
    lighttpd, on the session's engine."""
    key_file = api_stack.dir / "keys"
    key_file.write_text(f"# comment lines and blank lines are not keys\n\n{FILE_KEY}\n")
    key_file.chmod(0o644)
    w = api_stack.add_workers("locked", ["--api-key", KEY, "--api-key-file", key_file,
                                         "--max-body-bytes", SMALL_BODY, "--cors-origin", ORIGIN],
                              processes=1, threads=4)
    return api_stack.add_lighttpd(w)  # /health needs no key


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_api_key_missing_or_wrong_is_401(locked, model_id):
    for headers in ({}, bearer("sk-wrong"), bearer(KEY + "x"), bearer(KEY[:-1]),
                    {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = post(locked.url, chat(model_id), headers=headers)
        check_error(r, 401, "authentication_error")
    check_error(request(locked.url, "GET", "/v1/models"), 401, "authentication_error")


def test_api_key_right_key_works(locked, model_id):
    for key in (KEY, FILE_KEY):
        r = post(locked.url, chat(model_id), headers=bearer(key))
        assert r.status == 200, r
        assert request(locked.url, "GET", "/v1/models", headers=bearer(key)).status == 200
    client = openai.OpenAI(base_url=locked.url + "/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(**chat(model_id)).choices[0].message.content is not None
    bad = openai.OpenAI(base_url=locked.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**chat(model_id))


def test_body_over_max_body_bytes_is_413(locked, model_id):
    big = chat(model_id, messages=[{"role": "user", "content": "x" * (SMALL_BODY + 10)}])
    check_error(post(locked.url, big, headers=bearer(KEY)), 413, "invalid_request_error")
    # Just under the limit is accepted (and answered).
    ok = chat(model_id, messages=[{"role": "user", "content": "x " * 1000}])
    assert post(locked.url, ok, headers=bearer(KEY)).status == 200


def test_cors_preflight_and_headers(locked, model_id):
    r = request(locked.url, "OPTIONS", "/v1/chat/completions",
                headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status in (200, 204), r
    assert r.headers.get("access-control-allow-origin") == ORIGIN, r
    assert "POST" in r.headers.get("access-control-allow-methods", ""), r
    assert "authorization" in r.headers.get("access-control-allow-headers", "").lower(), r
    r = post(locked.url, chat(model_id), headers=dict(bearer(KEY), Origin=ORIGIN))
    assert r.status == 200 and r.headers.get("access-control-allow-origin") == ORIGIN, r


# ---- 429 / 503 ----

def test_full_engine_queue_is_429_with_retry_after(make_stack, model_id):
    s = make_stack(name="q", engine_flags=["--max-seqs", "1", "--max-queue", "1",
                                           "--log-level", "warn"], processes=1, threads=4)
    # A: a long generation holding the only sequence slot.
    a = Stream(s.url, "/v1/chat/completions",
               chat(model_id, max_tokens=4000, stream=True, logit_bias=eog_bias(s.info)))
    assert a.status == 200
    events = a.events()
    next(e for e in events if e[0] == "data" and '"content"' in e[1])
    wait_until(s, lambda st: st["running"] == 1, "A running")
    # B: queued behind A.
    got_b = {}
    tb = threading.Thread(target=lambda: got_b.setdefault("r", post(s.url, chat(model_id))))
    tb.start()
    wait_until(s, lambda st: st["queued"] == 1, "B queued")
    # C: no room left.
    r = post(s.url, chat(model_id))
    err = check_error(r, 429, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1, r
    assert err["code"] in ("rate_limit_exceeded", None), err
    # A leaves: B runs and succeeds.
    a.close()
    tb.join(timeout=scaled(120))
    assert got_b["r"].status == 200, got_b
    wait_until(s, lambda st: st["running"] == 0 and st["kv_blocks_used"] == 0, "all freed")


def test_engine_down_is_503_then_recovers(make_stack, model_id):
    s = make_stack(name="down", processes=1, threads=2)
    s.stop_engine()
    r = request(s.url, "GET", "/health")
    check_error(r, 503, "server_error")
    r = post(s.url, chat(model_id))
    check_error(r, 503, "server_error")
    assert int(r.headers.get("retry-after", "0")) >= 1, r
    s.start_engine()
    s.wait_health()
    assert post(s.url, chat(model_id)).status == 200

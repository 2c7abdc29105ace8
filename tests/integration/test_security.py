"""Security properties of the real stack (issue 9): API keys never reach a log (right and wrong
keys, --api-key and --api-key-file; worker, engine and lighttpd logs, and the --dump file); no
prompt text in the logs at the default level (a unique marker in chat and completions prompts,
stop strings, tool definitions, and in bodies that are refused); --dump created 0600 under a
permissive umask; the engine socket 0660 in the directory the operator chose; the request body
limit (413, also for a chunked upload); response size bounds (max_tokens capped by the context; a
huge logit_bias or stop list refused); no client-controlled file paths (a "model" with ../ or an
absolute path is a 404 that names no server path).
"""

import json
import os
import socket
import stat
import tempfile

import pytest

from conftest import BUILD
from engine_util import Engine, scaled
from stack import Stream, check_error, eog_bias, read_sse, request

KEY = "sk-sec-8f3a1c6e9d2b47a0"
FILE_KEY = "sk-secfile-71b4e2c9a05d"
WRONG = "sk-wrongsec-5e9c0a3f1b7d"
MARKER = "zq7MARKERvx4"  # in prompts only; must never appear in a log


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def chat(model, content, **kw):
    b = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
         "temperature": 0}
    b.update(kw)
    return b


def all_logs(stack):
    """Every log the stack wrote: workers, engines (also restarted ones), web servers."""
    text = stack.worker_logs()
    for w in stack.webs:
        for p in w.logs:
            if p.exists():
                text += p.read_text(errors="replace")
    for e in [stack.engine, *stack.old_engines]:
        text += e.stderr()
    return text


def make_locked(make_stack, level=None):
    """A stack whose workers take a key from --api-key and one from --api-key-file, writing
    --dump, at the default log level (or level, for the workers and the engine)."""
    flags = [] if level is None else ["--log-level", level]
    s = make_stack(name="sec", processes=1, threads=4, engine_flags=flags)
    key_file = s.dir / "keys"
    key_file.write_text(f"# keys\n{FILE_KEY}\n")
    key_file.chmod(0o600)
    dump = s.dir / "dump.jsonl"
    w = s.add_workers("locked", ["--api-key", KEY, "--api-key-file", key_file, "--dump", dump,
                                 *flags], processes=1, threads=4)
    web = s.add_lighttpd(w)
    models = request(web.url, "GET", "/v1/models", headers=bearer(KEY))
    assert models.status == 200, models
    return s, web, models.json()["data"][0]["id"], dump


@pytest.fixture
def locked(make_stack):
    return make_locked(make_stack)


@pytest.mark.parametrize("level", [None, "debug"])
def test_api_keys_never_logged(make_stack, level):
    """At the default level and at debug: a key is never logged, at any level."""
    s, web, model, dump = make_locked(make_stack, level)
    for key in (KEY, FILE_KEY):
        r = request(web.url, "POST", "/v1/chat/completions", chat(model, "Hi"),
                    headers=bearer(key))
        assert r.status == 200, r
        st = Stream(web.url, "/v1/chat/completions", chat(model, "Hi", stream=True),
                    headers=bearer(key))
        assert st.status == 200
        assert read_sse(st)[1]
        st.close()
    for h in (bearer(WRONG), bearer(KEY + "x"), bearer(KEY[:-1]), {"Authorization": KEY},
              {"Authorization": f"Basic {WRONG}"}, {"X-Api-Key": WRONG}):
        check_error(request(web.url, "POST", "/v1/chat/completions", chat(model, "Hi"),
                            headers=h), 401, "authentication_error")
        check_error(request(web.url, "GET", "/v1/models", headers=h), 401)
    logs = all_logs(s) + dump.read_text(errors="replace")
    assert "status=401" in logs or "401" in logs, "the 401s were not logged at all"
    for secret in (KEY, FILE_KEY, WRONG, KEY[:12], FILE_KEY[:12], WRONG[:12]):
        assert secret not in logs, f"{secret!r} appears in a log"


def test_no_prompt_text_in_logs_at_default_level(locked):
    s, web, model, dump = locked
    h = bearer(KEY)
    tools = [{"type": "function", "function": {
        "name": "lookup", "description": f"Looks up {MARKER}",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    bodies = [
        ("/v1/chat/completions", chat(model, f"Please repeat {MARKER} twice.", max_tokens=12)),
        ("/v1/chat/completions", chat(model, f"Say {MARKER}.", stream=True, stop=[MARKER])),
        ("/v1/chat/completions", chat(model, f"Look up {MARKER}.", tools=tools,
                                      tool_choice="required", max_tokens=24)),
        ("/v1/completions", {"model": model, "prompt": f"{MARKER} {MARKER}", "max_tokens": 8}),
        ("/v1/completions", {"model": model, "prompt": f"The {MARKER} is", "max_tokens": 8,
                             "stream": True}),
    ]
    for path, body in bodies:
        if body.get("stream"):
            st = Stream(web.url, path, body, headers=h)
            assert st.status == 200
            _, done, _ = read_sse(st)
            st.close()
            assert done
        else:
            r = request(web.url, "POST", path, body, headers=h)
            assert r.status == 200, r
    # Refused bodies carrying the marker: bad JSON, a wrong type, an unknown model, too long.
    refused = [
        (f'{{"model": "{model}", "messages": [{{"role": "user", "content": "{MARKER}'.encode(),
         400),
        (chat(model, MARKER, temperature=MARKER), 400),
        (chat(MARKER, "hi"), 404),
        (chat(model, (MARKER + " ") * 3000), 400),
    ]
    for body, status in refused:
        r = request(web.url, "POST", "/v1/chat/completions", body,
                    headers=dict(h, **{"Content-Type": "application/json"}))
        check_error(r, status)
    logs = all_logs(s)
    assert "path=/v1/completions" in logs, "the requests were not logged at all"
    assert MARKER not in logs
    # The --dump file is where request text goes (mode 0600, see below).
    assert MARKER in dump.read_text()


def test_dump_file_is_0600_under_a_permissive_umask(make_stack):
    s = make_stack(name="dmp", processes=1, threads=2)
    dump = s.dir / "dump-umask.jsonl"
    old = os.umask(0)
    try:
        w = s.add_workers("dumper", ["--dump", dump], processes=1, threads=2)
    finally:
        os.umask(old)
    web = s.add_lighttpd(w)
    model = request(web.url, "GET", "/v1/models").json()["data"][0]["id"]
    assert request(web.url, "POST", "/v1/chat/completions", chat(model, "Hi")).status == 200
    st = os.stat(dump)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert dump.read_text().strip(), "nothing dumped"


def test_engine_socket_is_0660_in_the_chosen_directory(model_path):
    with tempfile.TemporaryDirectory(prefix="llm-sec-") as d:
        chosen = os.path.join(d, "run", "llm")
        os.makedirs(chosen, mode=0o750)
        sock = os.path.join(chosen, "engine.sock")
        e = Engine(BUILD / "llm-engine", model_path, d, "--log-level", "warn",
                   socket_path=sock, umask=0)
        e.start()
        try:
            st = os.stat(sock)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
            # Nothing else appeared in the directory, and nothing outside it.
            assert os.listdir(chosen) == ["engine.sock"]
            assert e.stats()["running"] == 0
        finally:
            assert e.stop() == 0, e.stderr()[-2000:]
        assert not os.path.exists(sock), "socket left behind after a clean stop"


def chunked_post(url, path, body, headers):
    """POST with Transfer-Encoding: chunked (no Content-Length); returns (status, body)."""
    import http.client
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=scaled(60))
    try:
        conn.putrequest("POST", path)
        for k, v in dict(headers, **{"Content-Type": "application/json",
                                     "Transfer-Encoding": "chunked"}).items():
            conn.putheader(k, v)
        conn.endheaders()
        step = 16384
        for i in range(0, len(body), step):
            part = body[i:i + step]
            conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        conn.send(b"0\r\n\r\n")
        r = conn.getresponse()
        return r.status, r.headers.get("content-type", ""), r.read()
    finally:
        conn.close()


def test_body_limit_is_413_also_chunked(make_stack):
    s = make_stack(name="lim", processes=1, threads=2, worker_flags=["--max-body-bytes", "4096"])
    model = request(s.url, "GET", "/v1/models").json()["data"][0]["id"]
    big = json.dumps(chat(model, "x" * 5000)).encode()
    check_error(request(s.url, "POST", "/v1/chat/completions", big,
                        headers={"Content-Type": "application/json"}), 413,
                "invalid_request_error")
    status, ctype, body = chunked_post(s.url, "/v1/chat/completions", big, {})
    assert status == 413 and ctype.startswith("application/json"), (status, body[:300])
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    # Under the limit, chunked too, is served.
    small = json.dumps(chat(model, "Hi")).encode()
    status, _, body = chunked_post(s.url, "/v1/chat/completions", small, {})
    assert status == 200, body[:300]


def test_response_bounds(make_stack):
    """max_tokens far beyond the context is capped by the context (finish length); a huge
    logit_bias or stop list is refused before it reaches the engine."""
    s = make_stack(name="bnd", processes=1, threads=2, engine_flags=["--ctx", "96"])
    model = request(s.url, "GET", "/v1/models").json()["data"][0]["id"]
    r = request(s.url, "POST", "/v1/chat/completions",
                chat(model, "Hi", max_tokens=10**9, logit_bias=eog_bias(s.info)))
    if r.status == 200:
        o = r.json()
        u = o["usage"]
        assert u["prompt_tokens"] + u["completion_tokens"] <= 96, o
        assert o["choices"][0]["finish_reason"] == "length", o
    else:
        check_error(r, 400, "invalid_request_error", param="max_tokens")
    # No max_tokens at all: bounded by the context as well.
    r = request(s.url, "POST", "/v1/completions",
                {"model": model, "prompt": "Once", "logit_bias": eog_bias(s.info)})
    assert r.status == 200, r
    u = r.json()["usage"]
    assert u["prompt_tokens"] + u["completion_tokens"] <= 96, r
    huge_bias = {str(i): 1 for i in range(40000)}
    check_error(request(s.url, "POST", "/v1/chat/completions",
                        chat(model, "Hi", logit_bias=huge_bias)), 400, "invalid_request_error",
                param="logit_bias")
    check_error(request(s.url, "POST", "/v1/chat/completions",
                        chat(model, "Hi", stop=[f"s{i}" for i in range(1000)])), 400,
                "invalid_request_error", param="stop")
    check_error(request(s.url, "POST", "/v1/chat/completions",
                        chat(model, "Hi", stop=["x" * 100000])), 400, "invalid_request_error",
                param="stop[0]")
    assert s.stats()["running"] == 0


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "..", "models/../x",
                                  "file:///etc/passwd", "%2e%2e%2fetc%2fpasswd",
                                  "default.gguf", "../default.gguf"])
def test_model_field_is_never_a_path(api_stack, name):
    r = request(api_stack.url, "POST", "/v1/chat/completions", chat(name, "Hi"))
    err = check_error(r, 404, "not_found_error")
    for leak in (str(api_stack.dir), str(api_stack.model), "passwd:", "root:x:0"):
        assert leak not in json.dumps(err), err
    r = request(api_stack.url, "GET", f"/v1/models/{name}")
    assert r.status in (404, 400), r
    assert b"root:x:0" not in r.body and str(api_stack.model).encode() not in r.body


@pytest.mark.parametrize("path", ["/v1/../../etc/passwd", "/v1/chat/../../../etc/passwd",
                                  "/..%2f..%2fetc%2fpasswd", "/v1/models/..%2f..%2fetc%2fpasswd"])
def test_url_paths_reach_no_file(api_stack, path):
    # A raw request line, so that no client library normalises the path.
    port = int(api_stack.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(30)) as c:
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            b = c.recv(65536)
            if not b:
                break
            data += b
    status = int(data.split(b" ", 2)[1])
    assert status in (400, 404), data[:500]
    assert b"root:x:0" not in data and str(api_stack.dir).encode() not in data

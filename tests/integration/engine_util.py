"""Helpers for the llm-engine integration tests: the wire protocol of common/cm_wire.h written
again in Python (independently of the C codec, so a codec bug cannot hide an engine bug), a client
connection, and an engine process on a temporary socket.

Frames: a 24-byte little-endian header "<IHHIIQ" (magic 0x574D4C4C, version 1, type, flags, payload
length, request id) and the payload. JSON payloads for HELLO, MODEL_INFO, SUBMIT, DONE, ERROR,
CANCEL and STATS_REPLY; binary ACCEPTED (u32 prompt_tokens, u32 cached_tokens) and TOKEN (i32 id,
u32 flags, f32 logprob, u16 n_top, u16 text_len, n_top x (i32, f32), text bytes).

Waiting: nothing here sleeps for a fixed time to let something happen. Readiness and settling are
polled with a bounded number of tries (each try is a round trip to the engine, or a short wait on
a socket), and every wait has a deadline scaled by LLM_TEST_SLOWDOWN (set it for sanitizer
builds; it defaults to 4 when BUILD names an asan or tsan build).
"""

import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import time

MAGIC = 0x574D4C4C
VERSION = 1
HEADER = struct.Struct("<IHHIIQ")
HEADER_BYTES = HEADER.size  # 24

HELLO, MODEL_INFO, SUBMIT, ACCEPTED, TOKEN, DONE, ERROR, CANCEL, STATS, STATS_REPLY = range(1, 11)
TYPE_NAMES = {HELLO: "HELLO", MODEL_INFO: "MODEL_INFO", SUBMIT: "SUBMIT", ACCEPTED: "ACCEPTED",
              TOKEN: "TOKEN", DONE: "DONE", ERROR: "ERROR", CANCEL: "CANCEL", STATS: "STATS",
              STATS_REPLY: "STATS_REPLY"}

TOKEN_FIXED = struct.Struct("<iIfHH")  # 16 bytes


def _slowdown():
    env = os.environ.get("LLM_TEST_SLOWDOWN")
    if env:
        return float(env)
    build = os.environ.get("BUILD", "build")
    return 4.0 if ("asan" in build or "tsan" in build) else 1.0


SLOWDOWN = _slowdown()


def scaled(seconds):
    return seconds * SLOWDOWN


# ---- Frames ----

def pack_header(type_, req_id=0, length=0, magic=MAGIC, version=VERSION, flags=0):
    return HEADER.pack(magic, version, type_, flags, length, req_id)


def pack_frame(type_, req_id=0, payload=b"", **kw):
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload).encode()
    return pack_header(type_, req_id, len(payload), **kw) + payload


class Frame:
    def __init__(self, type_, flags, req_id, payload):
        self.type = type_
        self.flags = flags
        self.req_id = req_id
        self.payload = payload

    @property
    def name(self):
        return TYPE_NAMES.get(self.type, f"type{self.type}")

    def json(self):
        return json.loads(self.payload.decode("utf-8"))

    def __repr__(self):
        return f"Frame({self.name}, req={self.req_id}, {self.payload[:200]!r})"


def decode_accepted(payload):
    assert len(payload) == 8, f"ACCEPTED payload of {len(payload)} bytes"
    prompt_tokens, cached_tokens = struct.unpack("<II", payload)
    return {"prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens}


TOKEN_TOP_TEXT = 1 << 2  # cm_wire.h CM_WIRE_TOKEN_TOP_TEXT


def decode_token(payload):
    assert len(payload) >= TOKEN_FIXED.size, f"TOKEN payload of {len(payload)} bytes"
    id_, flags, logprob, n_top, text_len = TOKEN_FIXED.unpack_from(payload)
    off = TOKEN_FIXED.size
    top = [struct.unpack_from("<if", payload, off + 8 * i) for i in range(n_top)]
    off += 8 * n_top
    text = payload[off:off + text_len]
    off += text_len
    top_text = []
    if flags & TOKEN_TOP_TEXT:  # n_top x (u16 len, bytes)
        for _ in range(n_top):
            (n,) = struct.unpack_from("<H", payload, off)
            top_text.append(payload[off + 2:off + 2 + n])
            off += 2 + n
    assert len(payload) == off, "TOKEN payload length does not match its counts"
    return {"id": id_, "flags": flags, "logprob": logprob, "top": top, "text": text,
            "top_text": top_text}


# ---- A connection ----

class Closed(Exception):
    """The engine closed the connection."""


class Conn:
    """One client connection. recv() returns whole frames; EOF raises Closed."""

    def __init__(self, path, timeout=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(scaled(30) if timeout is None else timeout)
        self.sock.connect(str(path))
        self.buf = bytearray()
        self.eof = False
        self.info = None

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def send_frame(self, type_, req_id=0, payload=b"", **kw):
        self.send(pack_frame(type_, req_id, payload, **kw))

    def _fill(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        self.buf += data

    def recv(self, timeout=None):
        """The next frame; raises Closed at end of file, socket.timeout after timeout seconds."""
        timeout = scaled(60) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= HEADER_BYTES:
                magic, version, type_, flags, length, req_id = HEADER.unpack_from(self.buf)
                assert magic == MAGIC and version == VERSION, f"bad frame header {self.buf[:24]!r}"
                if len(self.buf) >= HEADER_BYTES + length:
                    payload = bytes(self.buf[HEADER_BYTES:HEADER_BYTES + length])
                    del self.buf[:HEADER_BYTES + length]
                    return Frame(type_, flags, req_id, payload)
            if self.eof:
                raise Closed(f"end of file with {len(self.buf)} bytes of a partial frame"
                             if self.buf else "end of file")
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"no frame within {timeout:.1f} s")
            self._fill(left)

    def wait_closed(self, timeout=None):
        """Reads frames until the engine closes; returns them."""
        frames = []
        try:
            while True:
                frames.append(self.recv(timeout))
        except Closed:
            return frames

    def hello(self, version=VERSION, client="engine-tests"):
        self.send_frame(HELLO, 0, {"version": version, "client": client})
        f = self.recv()
        assert f.type == MODEL_INFO and f.req_id == 0, f
        self.info = f.json()
        return self.info

    def submit(self, req_id, prompt=None, prompt_ids=None, max_tokens=16, **params):
        body = {"max_tokens": max_tokens, "temperature": 0}
        if prompt is not None:
            body["prompt"] = prompt
        if prompt_ids is not None:
            body["prompt_ids"] = list(prompt_ids)
        body.update(params)
        self.send_frame(SUBMIT, req_id, body)

    def cancel(self, req_id, reason):
        self.send_frame(CANCEL, req_id, {"reason": reason})

    def stats(self):
        self.send_frame(STATS, 0)
        while True:
            f = self.recv()
            if f.type == STATS_REPLY:
                return f.json()
            assert f.type in (TOKEN, ACCEPTED, DONE), f"unexpected {f} while waiting for STATS"

    def read_request(self, req_id, result=None, until=None, timeout=None):
        """Reads frames of req_id into a Result until DONE or ERROR (or until(result) is true).
        Frames of other requests are an error."""
        r = result if result is not None else Result(req_id)
        while not r.ended and not (until and until(r)):
            f = self.recv(timeout)
            assert f.req_id == req_id, f"frame for another request: {f}"
            r.add(f)
        return r


class Result:
    """What one request received."""

    def __init__(self, req_id):
        self.req_id = req_id
        self.accepted = None
        self.tokens = []
        self.done = None
        self.error = None
        self.frames_after_end = []

    @property
    def ended(self):
        return self.done is not None or self.error is not None

    @property
    def ids(self):
        return [t["id"] for t in self.tokens]

    @property
    def text(self):
        return b"".join(t["text"] for t in self.tokens)

    def add(self, f):
        if self.ended:
            self.frames_after_end.append(f)
        elif f.type == ACCEPTED:
            assert self.accepted is None and not self.tokens, f"ACCEPTED out of order: {f}"
            self.accepted = decode_accepted(f.payload)
        elif f.type == TOKEN:
            self.tokens.append(decode_token(f.payload))
        elif f.type == DONE:
            self.done = f.json()
        elif f.type == ERROR:
            self.error = f.json()
        else:
            raise AssertionError(f"unexpected frame {f}")

    def __repr__(self):
        return (f"Result(req={self.req_id}, accepted={self.accepted}, n_tokens={len(self.tokens)}, "
                f"done={self.done}, error={self.error})")


def eog_bias(info):
    """logit_bias that keeps the model from ending (for fixed-length generations)."""
    ids = {info["special"][k]["id"] for k in ("eos", "eot")
           if k in info.get("special", {}) and info["special"][k]["id"] >= 0}
    return {str(i): -100 for i in sorted(ids)}


# ---- An engine process ----

class Engine:
    """llm-engine on a socket in a temporary directory. stop() sends a signal and returns the
    exit status; kill() is for clean-up after a failure."""

    def __init__(self, binary, model, tmp_dir, *flags, threads=None, socket_path=None,
                 umask=None):
        self.binary = pathlib.Path(binary)
        self.dir = pathlib.Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = pathlib.Path(socket_path) if socket_path else self.dir / "engine.sock"
        threads = threads or int(os.environ.get("ENGINE_THREADS", "1"))
        self.args = [str(self.binary), "-m", str(model), "--socket", str(self.socket),
                     "--threads", str(threads), *map(str, flags)]
        self.err_path = self.dir / f"engine-{id(self)}.stderr"
        self.umask = umask
        self.proc = None
        self.rc = None
        self.expect_rc = 0  # what the test fixture expects at teardown

    def start(self, wait=True):
        self.err_file = open(self.err_path, "wb")
        umask = self.umask
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.err_file,
                                     preexec_fn=None if umask is None else lambda: os.umask(umask))
        self.err_file.close()  # the child has its own descriptor
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self):
        return self.proc.pid

    def stderr(self):
        return self.err_path.read_bytes().decode("utf-8", errors="replace")

    def wait_ready(self, tries=None):
        """Polls connect + HELLO until MODEL_INFO arrives (bounded tries)."""
        tries = tries or int(2000 * SLOWDOWN)
        last = None
        for _ in range(tries):
            if self.proc.poll() is not None:
                raise AssertionError(f"engine exited with {self.proc.returncode} before ready:\n"
                                     f"{self.stderr()[-3000:]}")
            try:
                with Conn(self.socket, timeout=scaled(10)) as c:
                    self.info = c.hello()
                    return self.info
            except (FileNotFoundError, ConnectionRefusedError) as e:
                last = e
                # Not listening yet: wait a moment on the process itself, not a fixed sleep.
                try:
                    self.proc.wait(timeout=0.01)
                except subprocess.TimeoutExpired:
                    pass
        raise AssertionError(f"engine not ready after {tries} tries ({last}):\n"
                             f"{self.stderr()[-3000:]}")

    def connect(self, hello=True):
        c = Conn(self.socket)
        if hello:
            c.hello()
        return c

    def stats(self):
        with self.connect() as c:
            return c.stats()

    def fd_count(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, sig=signal.SIGTERM, timeout=None):
        timeout = scaled(60) if timeout is None else timeout
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"engine did not exit within {timeout} s of signal {sig}:\n"
                                 f"{self.stderr()[-3000:]}")
        return self.rc

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_stats(conn, pred, what, timeout=None, interval=0.02):
    """Polls STATS on conn until pred(stats) holds; returns those stats. Each try is a round trip,
    paced by a short interval; the number of tries is bounded by the deadline. Fails with the last
    stats."""
    deadline = time.monotonic() + (scaled(60) if timeout is None else timeout)
    tries = 0
    while True:
        s = conn.stats()
        tries += 1
        if pred(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached after {tries} STATS polls; last: "
                                 f"{json.dumps(s, sort_keys=True)}")
        time.sleep(interval)  # pacing between polls (the engine may be idle), not a wait for it


def settled(s, connections=None):
    ok = s["kv_blocks_used"] == 0 and s["running"] == 0 and s["queued"] == 0
    if connections is not None:
        ok = ok and s["connections"] == connections
    return ok

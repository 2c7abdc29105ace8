"""The real serving stack on loopback, for the HTTP API tests: llm-engine, llm-fcgi workers under
spawn-fcgi (P processes x T threads sharing one Unix socket) and web servers in front of them:
lighttpd by default, with a configuration rendered from examples/lighttpd.conf (the file
`make run` renders too), or Apache and nginx from examples/apache.conf and examples/nginx.conf.

Everything lives in one short temporary directory (Unix socket paths are limited to 107 bytes)
with free loopback ports. The test process makes itself a child subreaper, so workers that
spawn-fcgi forks (and that outlive it) stay its children: stop() reaps each of them, reports
their exit statuses, and fails when any process that mentions the stack's directory on its command
line is still alive afterwards (no orphans).

Waiting: readiness is GET /health polled a bounded number of times, paced by a short wait on the
web server process (not a sleep standing in for synchronisation); deadlines scale with
engine_util.SLOWDOWN for sanitizer builds.

When the tests run as root, Apache and nginx drop their children to nobody, and mod_fcgid starts
workers as nobody: the stack's directory is then world-searchable and its sockets are mode 0666
(loopback test sockets in a private temporary directory, never a deployment setting).
"""

import ctypes
import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from engine_util import Engine, SLOWDOWN, scaled

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("BUILD", "build"))
if not BUILD.is_absolute():
    BUILD = ROOT / BUILD
MODEL = pathlib.Path(os.environ.get("MODEL", "models/default.gguf"))
if not MODEL.is_absolute():
    MODEL = ROOT / MODEL
EXAMPLES = ROOT / "examples"
FCGI_BIN = BUILD / "llm-fcgi"
ENGINE_BIN = BUILD / "llm-engine"

IS_ROOT = os.geteuid() == 0
SANITIZER_RE = re.compile(r"AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|"
                          r"ThreadSanitizer|runtime error:")

# The literal values in examples/*.conf that a rendering replaces.
EX_RUN_DIR = "/run/llm-fcgi"
EX_STATE_DIR = "/var/lib/llm-fcgi"
EX_LOG_DIR = "/var/log/llm-fcgi"
EX_FCGI_BIN = "/usr/local/bin/llm-fcgi"
EX_PORT = "8080"


def render_example(name, replacements, port):
    """examples/NAME with each literal key of replacements replaced (each must occur: a renamed
    setting in the example must fail the tests, not be skipped silently) and the port 8080
    replaced by port (unless port is None)."""
    text = (EXAMPLES / name).read_text()
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"examples/{name} no longer contains {old!r}")
        text = text.replace(old, str(new))
    if port is None:
        return text
    text, n = re.subn(r"\b8080\b", str(port), text)
    if not n:
        raise AssertionError(f"examples/{name} no longer contains the port 8080")
    return text


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_subreaper():
    """Orphans of our children (spawn-fcgi's workers) are re-parented to this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def reap(pid, timeout):
    """Waits (bounded) for pid to exit. Returns its wait status when it was our child, -1 when it
    exited but was not; raises TimeoutError while it still runs at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                return status
        except ChildProcessError:
            if _proc_state(pid) in (None, "Z", "X"):
                return -1
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} still running after {timeout:.0f} s")
        time.sleep(0.01)  # pacing between polls of the process table


def status_text(status):
    if status == -1:
        return "exited (not our child)"
    if os.WIFEXITED(status):
        return f"exit {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {status}"


def pids_mentioning(text):
    """Live processes (not zombies) whose command line contains text."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmd and _proc_state(entry) not in (None, "Z", "X"):
            found.append((int(entry), cmd.strip()))
    return found


# ---- HTTP helpers ----

class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # dict, lower-case names
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"HTTP {self.status} {self.headers} {self.body[:1500]!r}"


def request(url, method, path, body=None, headers=None, timeout=None):
    """One HTTP/1.1 request; body: dict/list (sent as JSON), bytes or str."""
    m = re.match(r"http://([^:/]+):(\d+)", url)
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)),
                                      timeout=scaled(120) if timeout is None else timeout)
    hdrs = {"Connection": "close"}
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        hdrs["Content-Type"] = "application/json"
    if isinstance(body, str):
        body = body.encode()
    hdrs.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


class Stream:
    """A streaming POST read event by event. events() yields ("data", text) for each `data:`
    line and ("comment", text) for each `:` line, as each arrives."""

    def __init__(self, url, path, body, headers=None, timeout=None):
        m = re.match(r"http://([^:/]+):(\d+)", url)
        self.conn = http.client.HTTPConnection(m.group(1), int(m.group(2)),
                                               timeout=scaled(120) if timeout is None else timeout)
        hdrs = {"Content-Type": "application/json", "Connection": "close",
                "Accept": "text/event-stream"}
        hdrs.update(headers or {})
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers=hdrs)
        self.sock = self.conn.sock  # getresponse() hands it to the response (Connection: close)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}

    def events(self):
        while True:
            line = self.resp.readline()
            if not line:
                return
            line = line.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                yield "data", line[5:].lstrip(" ")
            elif line.startswith(":"):
                yield "comment", line[1:].strip()
            elif line:
                yield "other", line

    def close(self):
        """Leaves at once: the socket is closed under the response (a client disconnect)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.resp.close()
        self.conn.close()


def read_sse(stream):
    """Every data payload of a stream until its end: (chunks as dicts, saw_done, raw list)."""
    chunks, raw, done = [], [], False
    for kind, text in stream.events():
        if kind != "data":
            continue
        raw.append(text)
        if done:
            raise AssertionError(f"data after [DONE]: {text!r}")
        if text == "[DONE]":
            done = True
        else:
            chunks.append(json.loads(text))
    return chunks, done, raw


# ---- Processes ----

class Workers:
    """P llm-fcgi processes under spawn-fcgi on one Unix socket, T request threads each. Their
    stderr (spawn-fcgi closes it) goes to a log file through a shell that execs the worker."""

    def __init__(self, stack, name, flags=(), processes=2, threads=8):
        self.stack = stack
        self.name = name
        self.socket = stack.dir / f"{name}.sock"
        self.pidfile = stack.dir / f"{name}.pid"
        self.log = stack.dir / f"{name}.log"
        self.flags = [str(f) for f in flags]
        self.processes = processes
        self.threads = threads
        self.pids = []
        self.statuses = {}  # pid -> wait status, once reaped

    def command(self):
        return [str(FCGI_BIN), "--engine", str(self.stack.engine_socket),
                "--threads", str(self.threads), *self.flags]

    def start(self):
        mode = "0666" if IS_ROOT else "0660"
        args = ["spawn-fcgi", "-s", str(self.socket), "-M", mode, "-F", str(self.processes),
                "-P", str(self.pidfile), "--", "/bin/sh", "-c",
                'exec "$0" "$@" 2>>"$LLM_FCGI_LOG"', *self.command()]
        env = dict(os.environ, LLM_FCGI_LOG=str(self.log))
        r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=scaled(30),
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise AssertionError(f"spawn-fcgi failed ({r.returncode}): {r.stderr}\n{self.log_text()}")
        self.pids = [int(p) for p in self.pidfile.read_text().split()]
        if len(self.pids) != self.processes:
            raise AssertionError(f"spawn-fcgi started {self.pids}, wanted {self.processes}")
        return self

    def log_text(self):
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self):
        return [p for p in self.pids if p not in self.statuses]

    def send_signal(self, pid, sig):
        os.kill(pid, sig)

    def wait(self, pid, timeout=None):
        """Reaps pid (bounded); returns its wait status."""
        if pid not in self.statuses:
            self.statuses[pid] = reap(pid, scaled(60) if timeout is None else timeout)
        return self.statuses[pid]

    def kill(self, pid=None, sig=signal.SIGKILL):
        pid = self.alive()[0] if pid is None else pid
        os.kill(pid, sig)
        return self.wait(pid)

    def stop(self, sig=signal.SIGTERM, timeout=None):
        """Signals every live worker, reaps them all; returns {pid: wait status}."""
        timeout = scaled(60) if timeout is None else timeout
        mine = self.alive()
        for pid in mine:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        problems = []
        for pid in mine:
            try:
                self.wait(pid, timeout)
            except TimeoutError as e:
                problems.append(str(e))
                os.kill(pid, signal.SIGKILL)
                self.wait(pid, scaled(10))
        if problems:
            raise AssertionError(f"workers {self.name}: {problems}\n{self.log_text()[-3000:]}")
        return {pid: self.statuses[pid] for pid in mine}


class WebServer:
    """A web server in the foreground (a Popen), its rendered configuration and logs."""

    def __init__(self, name, args, port, logs, conf):
        self.name = name
        self.args = args
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.logs = logs
        self.conf = conf
        self.proc = None
        self.headers = {}

    def start(self, env=None):
        self.out = open(self.logs[0], "ab")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT, env=env)
        self.out.close()
        return self

    def log_text(self):
        out = []
        for p in self.logs:
            try:
                out.append(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:])
            except FileNotFoundError:
                pass
        return "\n".join(out)

    def stop(self, sig=signal.SIGTERM, timeout=None):
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=scaled(30) if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not stop on {sig}:\n{self.log_text()}")


class Stack:
    """Engine + worker groups + web servers. The usual use:

        s = Stack(engine_flags=[...]).start()      # engine, workers "w" under spawn-fcgi, lighttpd
        s.url                                      # http://127.0.0.1:PORT of that lighttpd
        s.stats()                                  # engine STATS
        s.stop()                                   # everything, checked
    """

    def __init__(self, engine_flags=(), worker_flags=(), processes=2, threads=8, web=True,
                 name="st", model=None):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix=f"llm-{name}-", dir="/tmp"))
        if IS_ROOT:
            os.chmod(self.dir, 0o755)  # Apache/nginx children and mod_fcgid workers are nobody
        self.engine_flags = list(engine_flags)
        self.model = pathlib.Path(model) if model is not None else MODEL  # the GGUF served
        self.engine_socket = self.dir / "engine.sock"
        self.engine = None
        self.old_engines = []
        self.groups = []
        self.webs = []
        self.web = None
        self.worker_flags = worker_flags
        self.processes = processes
        self.threads = threads
        self.want_web = web
        self.workers = None

    # -- start --

    def start(self):
        become_subreaper()
        try:
            self.start_engine()
            self.workers = self.add_workers("w", self.worker_flags, self.processes, self.threads)
            if self.want_web:
                self.web = self.add_lighttpd(self.workers)
        except BaseException:
            self.stop(check=False)
            raise
        return self

    @property
    def url(self):
        return self.web.url

    def start_engine(self, flags=None):
        if not os.access(ENGINE_BIN, os.X_OK):
            raise AssertionError(f"{ENGINE_BIN} is missing: build it first (make all)")
        self.engine = Engine(ENGINE_BIN, self.model, self.dir, *(self.engine_flags if flags is None
                                                              else flags),
                             socket_path=self.engine_socket)
        self.engine.start()
        if IS_ROOT:
            os.chmod(self.engine_socket, 0o666)  # mod_fcgid workers run as nobody
        return self.engine

    def stop_engine(self):
        rc = self.engine.stop()
        self.old_engines.append(self.engine)
        return rc

    def restart_engine(self, flags=None):
        rc = self.stop_engine()
        self.start_engine(flags)
        return rc

    def stats(self):
        return self.engine.stats()

    @property
    def info(self):
        return self.engine.info

    def add_workers(self, name, flags=(), processes=2, threads=8):
        if not os.access(FCGI_BIN, os.X_OK):
            raise AssertionError(f"{FCGI_BIN} is missing: build it first (make all)")
        w = Workers(self, name, flags, processes, threads)
        self.groups.append(w)
        return w.start()

    def _dirs(self, name):
        d = self.dir / name
        d.mkdir()
        return d

    def add_lighttpd(self, workers=None, bin_path=None, wait=True, headers=None):
        """lighttpd from examples/lighttpd.conf in front of workers (a Workers); or, with
        bin_path=(flags, processes, threads), examples/lighttpd-bin-path.conf, lighttpd starting
        the workers itself."""
        port = free_port()
        d = self._dirs(f"lighttpd-{port}")
        (d / "htdocs").mkdir()
        sock = workers.socket if workers is not None else d / "bin.sock"
        common = {EX_RUN_DIR + "/llm-fcgi.sock": sock, EX_STATE_DIR: d, EX_LOG_DIR: d}
        (d / "lighttpd.conf").write_text(render_example("lighttpd.conf", common, port))
        conf = d / "lighttpd.conf"
        if bin_path is not None:
            flags, processes, threads = bin_path
            cmd = " ".join([str(FCGI_BIN), "--engine", str(self.engine_socket), "--threads",
                            str(threads), *map(str, flags)])
            rep = {f"{EX_FCGI_BIN} --engine {EX_RUN_DIR}/engine.sock --threads 8": cmd,
                   '"max-procs" => 2': f'"max-procs" => {processes}',
                   '( "PATH" )': '( "PATH", "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS" )',
                   EX_RUN_DIR + "/llm-fcgi.sock": sock}
            conf = d / "lighttpd-bin-path.conf"
            conf.write_text(render_example("lighttpd-bin-path.conf", rep, None))
        web = WebServer("lighttpd", ["lighttpd", "-D", "-f", str(conf)], port,
                        [d / "stdout.log", d / "lighttpd-error.log"], conf)
        return self._start_web(web, wait, headers)

    def add_nginx(self, workers, wait=True, headers=None):
        port = free_port()
        d = self._dirs(f"nginx-{port}")
        site = render_example("nginx.conf", {EX_RUN_DIR + "/llm-fcgi.sock": workers.socket}, port)
        (d / "site.conf").write_text(site)
        shutil.copy("/etc/nginx/fastcgi_params", d / "fastcgi_params")
        user = "user nobody nogroup;\n" if IS_ROOT else ""
        temp = "".join(f"    {k}_temp_path {d}/tmp-{k};\n"
                       for k in ("client_body", "fastcgi", "proxy", "uwsgi", "scgi"))
        (d / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\n"
            f"error_log {d}/error.log warn;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n    access_log off;\n{temp}    include {d}/site.conf;\n}}\n")
        web = WebServer("nginx", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], port,
                        [d / "stdout.log", d / "error.log"], d / "nginx.conf")
        return self._start_web(web, wait, headers)

    def add_apache(self, workers=None, fcgid=None, wait=True, headers=None):
        """Apache from examples/apache.conf: mod_proxy_fcgi in front of workers, or with
        fcgid=(flags, max_processes) the mod_fcgid variant (Apache starts the workers)."""
        port = free_port()
        d = self._dirs(f"apache-{port}")
        rep = {EX_STATE_DIR: d}
        if workers is not None:
            rep[EX_RUN_DIR + "/llm-fcgi.sock"] = workers.socket
        if fcgid is not None:
            flags, max_procs = fcgid
            cmd = " ".join([str(FCGI_BIN), "--engine", str(self.engine_socket),
                            "--threads", "1", *map(str, flags)])
            rep[f"{EX_FCGI_BIN} --engine {EX_RUN_DIR}/engine.sock --threads 1"] = cmd
            rep["FcgidMaxProcessesPerClass 8"] = f"FcgidMaxProcessesPerClass {max_procs}"
            (d / "fcgid").mkdir()
            if IS_ROOT:
                shutil.chown(d / "fcgid", "nobody", "nogroup")
        (d / "site.conf").write_text(render_example("apache.conf", rep, port))
        mods = ["mpm_event", "authz_core", "proxy", "proxy_fcgi", "fcgid", "env"]
        load = "".join(f"LoadModule {m}_module /usr/lib/apache2/modules/mod_{m}.so\n"
                       for m in mods)
        user = "User nobody\nGroup nogroup\n" if IS_ROOT else ""
        (d / "httpd.conf").write_text(
            f"ServerRoot {d}\nServerName 127.0.0.1\nPidFile {d}/httpd.pid\n"
            f"DefaultRuntimeDir {d}\nErrorLog {d}/error.log\nLogLevel warn\n"
            f"Mutex file:{d}\n{user}{load}Include {d}/site.conf\n")
        args = ["apache2", "-DFOREGROUND", "-f", str(d / "httpd.conf")]
        if fcgid is not None:
            args.insert(1, "-DLLM_FCGID")
        web = WebServer("apache-fcgid" if fcgid else "apache", args, port,
                        [d / "stdout.log", d / "error.log"], d / "httpd.conf")
        return self._start_web(web, wait, headers)

    def _start_web(self, web, wait, headers):
        """headers: what /health needs through this server (an API key)."""
        web.headers = headers or {}
        self.webs.append(web)
        web.start()
        if wait:
            self.wait_health(web)
        return web

    def wait_health(self, web=None, tries=None):
        """Polls GET /health through web until 200 (bounded)."""
        web = web or self.web
        tries = tries or int(1500 * SLOWDOWN)
        last = None
        for _ in range(tries):
            if web.proc.poll() is not None:
                raise AssertionError(f"{web.name} exited with {web.proc.returncode}:\n"
                                     f"{web.log_text()}\n{self.worker_logs()}")
            try:
                last = request(web.url, "GET", "/health", headers=web.headers,
                               timeout=scaled(10))
                if last.status == 200:
                    return last
            except (ConnectionError, OSError) as e:
                last = e
            try:
                web.proc.wait(timeout=0.02)  # pacing: the server may still be starting
            except subprocess.TimeoutExpired:
                pass
        raise AssertionError(f"{web.name}: /health not 200 after {tries} tries: {last}\n"
                             f"{web.log_text()}\n{self.worker_logs()}")

    def worker_logs(self):
        return "\n".join(f"--- workers {g.name}:\n{g.log_text()[-3000:]}" for g in self.groups)

    def diagnostics(self):
        parts = [self.worker_logs()]
        parts += [w.log_text() for w in self.webs]
        if self.engine:
            parts.append("--- engine:\n" + self.engine.stderr()[-3000:])
        return "\n".join(parts)

    # -- stop --

    def stop(self, check=True):
        """Stops the web servers, the workers (SIGTERM: they drain and must exit 0) and the
        engine; fails when a process is left behind or a sanitizer reported something."""
        problems = []
        for web in reversed(self.webs):
            try:
                web.stop()
            except AssertionError as e:
                problems.append(str(e))
        for g in self.groups:
            try:
                statuses = g.stop()
            except AssertionError as e:
                problems.append(str(e))
                continue
            bad = {p: status_text(s) for p, s in statuses.items()
                   if not (s == -1 or (os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0))}
            if bad and check:
                problems.append(f"workers {g.name} did not exit 0: {bad}")
        if self.engine is not None:
            try:
                rc = self.engine.stop()
                if rc != 0 and check:
                    problems.append(f"engine exit {rc}")
            except AssertionError as e:
                problems.append(str(e))
        # Workers that a web server started (lighttpd bin-path, mod_fcgid) got SIGTERM from it
        # and may still be finishing: each gets a bounded wait before it counts as left behind.
        left = []
        for pid, cmd in pids_mentioning(str(self.dir)):
            try:
                reap(pid, scaled(30))
            except TimeoutError:
                left.append((pid, cmd))
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if left:
            problems.append(f"processes left behind: {left}")
        logs = self.diagnostics()
        for e in self.old_engines:
            logs += e.stderr()
        if SANITIZER_RE.search(logs):
            problems.append("sanitizer report in the logs")
        if problems and check:
            raise AssertionError("stack stop: " + "; ".join(problems) + "\n" + logs[-6000:])
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- Shared checks ----

def eog_bias(info):
    """logit_bias (string token ids) that keeps the model from ending: fixed-length generations."""
    ids = {info["special"][k]["id"] for k in ("eos", "eot")
           if k in info.get("special", {}) and info["special"][k]["id"] >= 0}
    return {str(i): -100 for i in sorted(ids)}


def check_error(r, status, type_=None, param=None, code=None):
    """r is an OpenAI error response: status, the body shape, and optionally type/param/code."""
    assert r.status == status, r
    assert r.headers.get("content-type", "").startswith("application/json"), r
    body = r.json()
    assert set(body) == {"error"}, r
    err = body["error"]
    for k in ("message", "type", "param", "code"):
        assert k in err, f"error body without {k}: {r}"
    assert isinstance(err["message"], str) and err["message"], r
    assert isinstance(err["type"], str), r
    if type_ is not None:
        assert err["type"] == type_, r
    if param is not None:
        assert err["param"] == param, r
    if code is not None:
        assert err["code"] == code, r
    return err


def watch_stream(stack, url, body, headers=None, checkpoints=(1, 2, 4, 8, 16, 32, 64)):
    """Streams body (stream: true) through url and, at the arrival of the content events numbered
    in checkpoints, reads the engine's generated-token counter. Returns (chunks, saw_done, raw,
    lags) where lags[k] = tokens the engine had generated for this request when content event k
    arrived, minus k. A server that buffers the response shows lags near max_tokens."""
    base = stack.stats()["generated_tokens"]
    s = Stream(url, "/v1/chat/completions" if "messages" in body else "/v1/completions",
               dict(body, stream=True), headers=headers)
    assert s.status == 200, (s.status, s.resp.read()[:2000])
    chunks, raw, done, lags, n_content = [], [], False, {}, 0
    try:
        for kind, text in s.events():
            if kind != "data":
                continue
            raw.append(text)
            assert not done, f"data after [DONE]: {text!r}"
            if text == "[DONE]":
                done = True
                continue
            c = json.loads(text)
            chunks.append(c)
            ch = c.get("choices") or []
            if ch and (ch[0].get("delta", {}).get("content") or ch[0].get("text")):
                n_content += 1
                if n_content in checkpoints:
                    lags[n_content] = stack.stats()["generated_tokens"] - base - n_content
    finally:
        s.close()
    return chunks, done, raw, lags, s.headers


def wait_until(stack, pred, what, timeout=None):
    """Polls the engine's STATS until pred(stats) (bounded); returns those stats."""
    from engine_util import wait_stats
    with stack.engine.connect() as c:
        return wait_stats(c, pred, what, timeout)


# ---- Several engine+worker pairs behind one front server (examples/*-multi.conf) ----

class TcpWorkers(Workers):
    """llm-fcgi processes under spawn-fcgi on TCP 127.0.0.1:PORT (`spawn-fcgi -a 127.0.0.1 -p
    PORT`), connected to their own pair's engine socket: a host of a multi-host deployment."""

    def __init__(self, stack, name, engine_socket, flags=(), processes=1, threads=8):
        super().__init__(stack, name, flags, processes, threads)
        self.engine_socket = engine_socket
        self.socket = None
        self.port = free_port()

    def command(self):
        return [str(FCGI_BIN), "--engine", str(self.engine_socket),
                "--threads", str(self.threads), *self.flags]

    def start(self):
        args = ["spawn-fcgi", "-a", "127.0.0.1", "-p", str(self.port), "-F", str(self.processes),
                "-P", str(self.pidfile), "--", "/bin/sh", "-c",
                'exec "$0" "$@" 2>>"$LLM_FCGI_LOG"', *self.command()]
        env = dict(os.environ, LLM_FCGI_LOG=str(self.log))
        r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=scaled(30),
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise AssertionError(f"spawn-fcgi failed ({r.returncode}): {r.stderr}\n{self.log_text()}")
        self.pids = [int(p) for p in self.pidfile.read_text().split()]
        if len(self.pids) != self.processes:
            raise AssertionError(f"spawn-fcgi started {self.pids}, wanted {self.processes}")
        return self

    def accepting(self):
        """Whether something accepts connections on the port now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=scaled(5)):
                return True
        except ConnectionRefusedError:
            return False

    def wait_refusing(self, timeout=None):
        """Polls (bounded) until the port refuses connections: no worker accepts any more."""
        deadline = time.monotonic() + (scaled(30) if timeout is None else timeout)
        while self.accepting():
            if time.monotonic() > deadline:
                raise AssertionError(f"workers {self.name}: port {self.port} still accepts")
            alive = self.alive()
            if alive:
                try:
                    self.wait(alive[0], 0.02)  # pacing: a short wait on a worker's exit
                except TimeoutError:
                    pass
            else:
                time.sleep(0.02)  # pacing between connection attempts (no worker left)


class Pair:
    """One host of a multi-host deployment, on loopback: its own llm-engine on its own Unix socket
    and its own llm-fcgi workers on TCP (TcpWorkers). stop() takes the whole pair down the way an
    operator (SIGTERM) or a host loss (SIGKILL) would."""

    def __init__(self, stack, name, engine_flags=(), worker_flags=(), processes=1, threads=8):
        self.stack = stack
        self.name = name
        self.dir = stack.dir / name
        self.dir.mkdir()
        if IS_ROOT:
            os.chmod(self.dir, 0o755)
        self.engine_socket = self.dir / "engine.sock"
        self.engine = Engine(ENGINE_BIN, MODEL, self.dir, *engine_flags,
                             socket_path=self.engine_socket)
        self.workers = TcpWorkers(stack, name, self.engine_socket, worker_flags, processes,
                                  threads)
        self.stopped = None  # the signal stop() sent, once it did

    @property
    def port(self):
        return self.workers.port

    def start(self):
        self.engine.start()
        self.stack.groups.append(self.workers)
        self.workers.start()
        return self

    def stats(self):
        return self.engine.stats()

    def stop(self, sig=signal.SIGTERM, timeout=None):
        """Sends sig to every worker and to the engine at once, then reaps them all (bounded).
        Returns (worker wait statuses by pid, engine exit code)."""
        timeout = scaled(60) if timeout is None else timeout
        self.stopped = sig
        mine = self.workers.alive()
        for pid in mine:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        self.engine.proc.send_signal(sig)
        statuses = {pid: self.workers.wait(pid, timeout) for pid in mine}
        try:
            self.engine.rc = self.engine.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.engine.kill()
            raise AssertionError(f"engine {self.name} did not exit within {timeout} s of {sig}:\n"
                                 f"{self.engine.stderr()[-3000:]}")
        return statuses, self.engine.rc


class MultiStack(Stack):
    """N pairs (engine + workers on TCP each) behind front web servers rendered from
    examples/lighttpd-multi.conf, nginx-multi.conf and apache-multi.conf:

        s = MultiStack(pairs=2).start()          # pairs "a", "b"; no front server yet
        web = s.add_lighttpd_multi()             # lighttpd balancing every pair
        s.pairs[0].stop(signal.SIGKILL)          # a host lost
        s.stop()                                 # the rest, checked as Stack.stop does

    There is no single engine: s.engine is None; each pair has its own (pair.stats())."""

    def __init__(self, pairs=2, engine_flags=(), worker_flags=(), processes=1, threads=8,
                 name="mp"):
        super().__init__(engine_flags, worker_flags, processes, threads, web=False, name=name)
        self.n_pairs = pairs
        self.pairs = []

    def start(self):
        become_subreaper()
        try:
            for i in range(self.n_pairs):
                self.add_pair(chr(ord("a") + i))
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def add_pair(self, name, engine_flags=None, worker_flags=None, processes=None, threads=None):
        if not os.access(ENGINE_BIN, os.X_OK) or not os.access(FCGI_BIN, os.X_OK):
            raise AssertionError(f"{ENGINE_BIN} or {FCGI_BIN} is missing: build it first")
        p = Pair(self, name, self.engine_flags if engine_flags is None else engine_flags,
                 self.worker_flags if worker_flags is None else worker_flags,
                 self.processes if processes is None else processes,
                 self.threads if threads is None else threads)
        self.pairs.append(p)
        return p.start()

    def _multi_replacements(self, pairs, fmt):
        """Backend k of the example (port 9001 + k) -> pairs[k]'s port, each written as fmt."""
        if len(pairs) != 2:
            raise AssertionError("the -multi examples list two backends")
        return {fmt.format(9001 + k): fmt.format(p.port) for k, p in enumerate(pairs)}

    def add_lighttpd_multi(self, pairs=None, wait=True, headers=None):
        pairs = self.pairs if pairs is None else pairs
        port = free_port()
        d = self._dirs(f"lighttpd-{port}")
        (d / "htdocs").mkdir()
        common = {EX_RUN_DIR + "/llm-fcgi.sock": d / "unused.sock", EX_STATE_DIR: d,
                  EX_LOG_DIR: d}
        (d / "lighttpd.conf").write_text(render_example("lighttpd.conf", common, port))
        conf = d / "lighttpd-multi.conf"
        conf.write_text(render_example("lighttpd-multi.conf",
                                       self._multi_replacements(pairs, '"port" => {}'), None))
        web = WebServer("lighttpd-multi", ["lighttpd", "-D", "-f", str(conf)], port,
                        [d / "stdout.log", d / "lighttpd-error.log"], conf)
        return self._start_web(web, wait, headers)

    def add_nginx_multi(self, pairs=None, wait=True, headers=None):
        pairs = self.pairs if pairs is None else pairs
        port = free_port()
        d = self._dirs(f"nginx-{port}")
        site = render_example("nginx-multi.conf",
                              self._multi_replacements(pairs, "127.0.0.1:{}"), port)
        (d / "site.conf").write_text(site)
        shutil.copy("/etc/nginx/fastcgi_params", d / "fastcgi_params")
        user = "user nobody nogroup;\n" if IS_ROOT else ""
        temp = "".join(f"    {k}_temp_path {d}/tmp-{k};\n"
                       for k in ("client_body", "fastcgi", "proxy", "uwsgi", "scgi"))
        (d / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\n"
            f"error_log {d}/error.log warn;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n    access_log off;\n{temp}    include {d}/site.conf;\n}}\n")
        web = WebServer("nginx-multi", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")],
                        port, [d / "stdout.log", d / "error.log"], d / "nginx.conf")
        return self._start_web(web, wait, headers)

    def add_apache_multi(self, pairs=None, wait=True, headers=None):
        pairs = self.pairs if pairs is None else pairs
        port = free_port()
        d = self._dirs(f"apache-{port}")
        site = render_example("apache-multi.conf",
                              self._multi_replacements(pairs, "fcgi://127.0.0.1:{}"), port)
        (d / "site.conf").write_text(site)
        mods = ["mpm_event", "authz_core", "proxy", "proxy_fcgi", "proxy_balancer",
                "slotmem_shm", "lbmethod_byrequests", "lbmethod_bybusyness", "env"]
        load = "".join(f"LoadModule {m}_module /usr/lib/apache2/modules/mod_{m}.so\n"
                       for m in mods)
        user = "User nobody\nGroup nogroup\n" if IS_ROOT else ""
        (d / "httpd.conf").write_text(
            f"ServerRoot {d}\nServerName 127.0.0.1\nPidFile {d}/httpd.pid\n"
            f"DefaultRuntimeDir {d}\nErrorLog {d}/error.log\nLogLevel warn\n"
            f"Mutex file:{d}\n{user}{load}Include {d}/site.conf\n")
        web = WebServer("apache-multi", ["apache2", "-DFOREGROUND", "-f", str(d / "httpd.conf")],
                        port, [d / "stdout.log", d / "error.log"], d / "httpd.conf")
        return self._start_web(web, wait, headers)

    def diagnostics(self):
        parts = [super().diagnostics()]
        parts += [f"--- engine {p.name}:\n" + p.engine.stderr()[-3000:] for p in self.pairs]
        return "\n".join(parts)

    def stop(self, check=True):
        """The front servers, then each pair not stopped by the test (workers must exit 0 on
        SIGTERM, then the engine, exit 0), then Stack.stop's checks (no process left behind, no
        sanitizer report)."""
        problems = []
        for web in reversed(self.webs):
            try:
                web.stop()
            except AssertionError as e:
                problems.append(str(e))
        for p in self.pairs:
            try:
                if p.stopped is None:
                    statuses = p.workers.stop()
                    bad = {pid: status_text(s) for pid, s in statuses.items()
                           if not (s == -1 or (os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0))}
                    if bad:
                        problems.append(f"workers {p.name} did not exit 0: {bad}")
                if p.engine.proc is not None:
                    rc = p.engine.stop()
                    if rc != 0 and p.stopped is None:
                        problems.append(f"engine {p.name} exit {rc}")
            except AssertionError as e:
                problems.append(str(e))
        logs = self.diagnostics()[-6000:] if problems else ""
        try:
            super().stop(check)
        except AssertionError as e:
            problems.append(str(e))
        if problems and check:
            raise AssertionError("multi-stack stop: " + "; ".join(problems) + "\n" + logs)

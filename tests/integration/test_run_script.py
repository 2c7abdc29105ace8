"""`make run` and `make stop` (scripts/run.sh and scripts/stop.sh) on this build, in a private run
directory and port: run.sh returns only once every worker serves (it starts the workers after the
engine listens, so none of them begins in backoff answering 503), and stop.sh leaves nothing
running. The README promises both.

The test process makes itself a child subreaper that does not reap the daemons run.sh leaves
behind, as PID 1 of a container without an init does: stop.sh must count an exited but unreaped
process (a zombie) as stopped, not wait 30 s for it and SIGKILL it."""

import concurrent.futures
import ctypes
import os
import re
import subprocess
import time

from conftest import BUILD, ROOT
from engine_util import scaled
from stack import free_port, request

PROCS = 2
PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on):
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0, ctypes.get_errno()


def _pids(path):
    with open(path) as f:
        return [int(p) for p in f.read().split()]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its parent) is not running.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_run_script_serves_from_every_worker_at_once_and_stop_ends_all(fcgi_bin, model_path,
                                                                       tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    port = free_port()
    env = dict(os.environ, BUILD=str(BUILD), MODEL=str(model_path), RUN_DIR=str(run_dir),
               PORT=str(port), PROCS=str(PROCS), THREADS="4", ENGINE_FLAGS="--threads 1")
    _set_subreaper(True)
    pids = {}
    try:
        run = subprocess.run(["scripts/run.sh"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=scaled(180))
        assert run.returncode == 0, (run.stdout, run.stderr)
        url = f"http://127.0.0.1:{port}"
        assert f"serving on {url}" in run.stdout, run.stdout
        pids = {name: _pids(run_dir / f"{name}.pid") for name in ("engine", "llm-fcgi",
                                                                  "lighttpd")}
        assert len(pids["llm-fcgi"]) == PROCS, pids

        # Every worker reached the engine when it started (none began in backoff).
        log = run_dir / "llm-fcgi.log"
        deadline = time.monotonic() + scaled(30)
        while log.read_text().count(" ready ") < PROCS and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert text.count(" ready ") == PROCS, text
        assert "not reachable" not in text, text
        assert len(re.findall(r"engine connected", text)) == PROCS, text

        # Right away, many at once (so that both workers answer): every request served.
        def models(_):
            return request(url, "GET", "/v1/models").status

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            codes = list(pool.map(models, range(64)))
        assert codes == [200] * 64, codes
        r = request(url, "POST", "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status == 200, r
        assert r.json()["usage"]["completion_tokens"] >= 1, r
    finally:
        try:
            stop = subprocess.run(["scripts/stop.sh"], cwd=ROOT, env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=scaled(120))
            # stop.sh waits for each process to end; what is left is at most a zombie.
            left = [p for ps in pids.values() for p in ps if _alive(p)]
        finally:
            _set_subreaper(False)
            for p in (p for ps in pids.values() for p in ps):
                try:
                    os.waitpid(p, os.WNOHANG)  # ours now that run.sh has exited
                except ChildProcessError:
                    pass
    assert stop.returncode == 0, (stop.stdout, stop.stderr)
    assert not left, (left, stop.stdout, stop.stderr)
    for name in ("engine.sock", "llm-fcgi.sock", "engine.pid", "llm-fcgi.pid", "lighttpd.pid"):
        assert not (run_dir / name).exists(), name

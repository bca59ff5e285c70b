"""Real input: patch every worker of Debian's nginx (a stripped PIE exporting its functions in ``.dynsym``)
100 times in a row while ``wrk`` loads it.

The test starts its own nginx (not the Debian service) from a configuration in ``tmp_path``: ``daemon off``,
a master and two workers, listening on a free port of 127.0.0.1, no access log, every path in ``tmp_path``.
It serves a static file of random bytes, ``return 200 "hello\\n"`` at ``/hello`` and ``stub_status``. The patch
replaces two exported functions on the request path, each calling the original through
``HOTPATCH_ORIGINAL``: ``ngx_http_send_header`` (every response's headers) with a pass-through, and
``ngx_http_send_response`` (what ``return`` calls) with one that turns a 200 into ``202 Accepted``, so the
switch is visible from outside.

Two ``wrk`` processes (one on the static file, one on ``/hello``; bounded by ``-d``, interrupted once the
cycles end) and a client of our own (bounded in requests and time) run while the patch is applied to each
worker of this nginx, by PID (children of our master; never ``--exe``, which would touch any nginx of the
machine), and reverted, 100 times through ``hotpatch.attach(pid)``. After every apply ``/hello`` must answer
202, after every revert 200. At the end: no socket error and no non-2xx/3xx response in either wrk report,
every reply our client saw was 200 or 202 with the right body (the static file byte for byte), both seen,
the master and the same two workers alive and untraced with no patch recorded, no alert in nginx's error log,
and a graceful stop (SIGQUIT) ends the master with status 0 and its workers with it. All traffic goes to
127.0.0.1 only; every process started is stopped by PID, the workers included, even when the test fails.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import hotpatch
from conftest import Procs, assert_running, assert_runs_stripped, free_port, run_cli

HOST = "127.0.0.1"
WORKERS = 2
CYCLES = 100
CYCLES_MAX_S = 70.0  # bound on the cycles' time
WRK_MAX_S = 85  # wrk's -d: a bound; it is interrupted (SIGINT: it then reports) once the cycles end
WRK_TIMEOUT_S = 5  # wrk's --timeout: a request slower than this counts as a socket error
PROBE_MAX_REQUESTS = 20_000  # bounds on our own client
PROBE_MAX_S = 90.0
STATIC_SIZE = 16_384
HELLO = b"hello\n"
PATCH_NAME = "nginx-accepted"
PATCH_SOURCE = """\
/* Replacements for nginx 1.22's ngx_http_send_header (every response's headers: a pass-through to the
 * original) and ngx_http_send_response (the `return CODE "text"` directive: 200 becomes 202 Accepted). */
#include <stdint.h>
#include <hotpatch.h>

typedef intptr_t ngx_int_t;
typedef uintptr_t ngx_uint_t;

ngx_int_t ngx_http_send_header(void *r);
ngx_int_t ngx_http_send_response(void *r, ngx_uint_t status, void *ct, void *cv);

ngx_int_t ngx_http_send_header(void *r)
{
    return HOTPATCH_ORIGINAL(ngx_http_send_header)(r);
}

ngx_int_t ngx_http_send_response(void *r, ngx_uint_t status, void *ct, void *cv)
{
    if (status == 200)
        status = 202;
    return HOTPATCH_ORIGINAL(ngx_http_send_response)(r, status, ct, cv);
}
"""
CONFIG = """\
daemon off;
master_process on;
worker_processes {workers};
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 512; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {host}:{port};
        root {prefix}/html;
        location = /hello {{ return 200 "hello\\n"; }}
        location = /nginx_status {{ stub_status; }}
    }}
}}
"""


def _tools() -> dict[str, str]:
    """Paths of nginx and wrk; skip the test when one is missing."""
    found = {name: shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin") for name in ("nginx", "wrk")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install nginx wrk; CI does)")
    return {name: str(path) for name, path in found.items()}


def _start_time(pid: int) -> int | None:
    """Process ``pid``'s start time (clock ticks after boot), which tells it from a later one with its PID;
    None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else int(fields[19])


def _children(pid: int) -> list[int]:
    """The PIDs of the processes whose parent is ``pid`` (nginx's workers: all of the master's children)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                ppid = next(line for line in f if line.startswith("PPid:")).split()[1]
        except (OSError, StopIteration):
            continue
        if int(ppid) == pid:
            out.append(int(name))
    return sorted(out)


def _get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET ``path`` from 127.0.0.1:``port`` on a connection of its own (no proxy): (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Nginx:
    """Our nginx: its master (a child of this process), port and prefix, and every worker seen (PID -> start
    time), so that they can be stopped by PID even after the master is gone."""

    def __init__(self, master: subprocess.Popen[bytes], port: int, prefix: Path) -> None:
        self.master, self.port, self.prefix = master, port, prefix
        self.seen: dict[int, int] = {}

    def workers(self) -> list[int]:
        """The master's children now (remembered in :attr:`seen`)."""
        pids = _children(self.master.pid)
        for pid in pids:
            start = _start_time(pid)
            if start is not None:
                self.seen.setdefault(pid, start)
        return pids

    def alive_seen(self) -> list[int]:
        """The workers ever seen that still run (same PID and start time)."""
        return [pid for pid, start in self.seen.items() if _start_time(pid) == start]

    def error_log(self) -> str:
        """nginx's error log so far."""
        try:
            return (self.prefix / "error.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGQUIT, timeout: float = 15.0) -> list[int]:
        """Stop this nginx: ``sig`` to the master (SIGQUIT: graceful), SIGKILL if it has not ended within
        ``timeout``; then SIGKILL every worker seen that still runs. Returns those workers (none after a clean
        stop). Safe to call again."""
        if self.master.poll() is None:
            self.workers()  # the workers of the moment, in case the master has to be killed
            os.kill(self.master.pid, sig)
            try:
                self.master.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.master.pid, signal.SIGKILL)
                self.master.wait(timeout=10)
        deadline = time.monotonic() + 5
        left = self.alive_seen()
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = self.alive_seen()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left


def _start_nginx(procs: Procs, nginx: str, prefix: Path) -> Nginx:
    """Write the configuration and the static file, start nginx on a free 127.0.0.1 port (retried if the port
    is taken meanwhile) and wait until ``/hello`` answers and both workers run."""
    (prefix / "html").mkdir()
    (prefix / "html" / "data.bin").write_bytes(os.urandom(STATIC_SIZE))
    user = "user root;  # workers read tmp_path, which only root may enter" if os.geteuid() == 0 else ""
    for _attempt in range(5):
        port = free_port(HOST)
        conf = prefix / "nginx.conf"
        conf.write_text(CONFIG.format(workers=WORKERS, user=user, prefix=prefix, host=HOST, port=port))
        master = procs.start(nginx, "-e", prefix / "error.log", "-p", prefix, "-c", conf, stdout=subprocess.DEVNULL)
        ng = Nginx(master, port, prefix)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and master.poll() is None:
            try:
                status, body = _get(port, "/hello", timeout=2)
            except OSError:
                time.sleep(0.05)
                continue
            workers = ng.workers()
            if (status, body) == (200, HELLO) and len(workers) == WORKERS:
                return ng
            time.sleep(0.05)
        ng.stop(signal.SIGTERM)
    pytest.fail(f"nginx did not start on 127.0.0.1 (5 attempts); error log:\n{ng.error_log()[-2000:]}")


def _build_patch(nginx: str, master_pid: int, out_dir: Path) -> Path:
    """Build the patch against the nginx file the master maps (same build-id; Debian's stripped PIE: only
    its ``.dynsym`` names)."""
    nginx_file = os.path.realpath(nginx)
    assert_runs_stripped(master_pid, nginx_file)
    src = out_dir / "accepted.c"
    src.write_text(PATCH_SOURCE)
    patch = out_dir / f"{PATCH_NAME}.hp"
    res = run_cli("build", src, "--target", nginx_file, "-o", patch, "--name", PATCH_NAME, "--version", "1")
    assert res.returncode == 0, res.stderr
    assert "ngx_http_send_header" in res.stdout and "ngx_http_send_response" in res.stdout, res.stdout
    return patch


class Prober(threading.Thread):
    """Our own client: ``/hello`` and the static file in turn, each on a connection of its own, until stopped
    (at most PROBE_MAX_REQUESTS requests and PROBE_MAX_S seconds). Counts ``/hello``'s statuses; a wrong
    status or body of either, or any error, is kept for the test to report."""

    def __init__(self, port: int, static: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.static = port, static
        self.stop_event = threading.Event()
        self.hello: dict[int, int] = {}
        self.static_ok = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        """Request until stopped or a bound is reached; stop at the first error."""
        deadline = time.monotonic() + PROBE_MAX_S
        try:
            for _ in range(PROBE_MAX_REQUESTS // 2):
                if self.stop_event.is_set() or time.monotonic() > deadline:
                    return
                status, body = _get(self.port, "/hello")
                assert status in (200, 202) and body == HELLO, f"/hello answered {status} {body!r}"
                self.hello[status] = self.hello.get(status, 0) + 1
                status, body = _get(self.port, "/data.bin")
                assert status == 200 and body == self.static, f"/data.bin answered {status}, {len(body)} bytes"
                self.static_ok += 1
                time.sleep(0.002)  # leave the CPUs to wrk, nginx and hotpatch
        except BaseException as e:
            self.error = e


def _wrk(procs: Procs, wrk: str, port: int, path: str) -> subprocess.Popen[bytes]:
    """Start wrk (one thread, 16 connections) on ``path`` for at most WRK_MAX_S seconds."""
    url = f"http://{HOST}:{port}{path}"
    return procs.start(wrk, "-t1", "-c16", f"-d{WRK_MAX_S}s", f"--timeout={WRK_TIMEOUT_S}s", "--latency", url)


def _wait_load_started(ng: Nginx, prober: Prober, timeout: float = 20.0) -> None:
    """Wait until wrk's 32 connections are open (stub_status counts them beside its own request) and our
    client has had answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = _get(ng.port, "/nginx_status")
        m = re.search(rb"Active connections: (\d+)", body)
        assert status == 200 and m is not None, body
        if int(m.group(1)) >= 33 and prober.static_ok:
            return
        time.sleep(0.02)
    pytest.fail(f"the load did not start within {timeout} s (our client: {prober.error!r})")


def _interrupt(wrk: subprocess.Popen[bytes]) -> None:
    """SIGINT to wrk if it still runs: it stops and prints its report."""
    if wrk.poll() is None:
        os.kill(wrk.pid, signal.SIGINT)


def _wrk_report(wrk: subprocess.Popen[bytes], path: str) -> int:
    """Check the report of an interrupted wrk: exit status 0, no socket error, no non-2xx/3xx response.
    Returns the number of requests it made."""
    try:
        out, err = wrk.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"wrk on {path} did not stop within 30 s of SIGINT")
    text = (out + err).decode(errors="replace")
    assert wrk.returncode == 0, f"wrk on {path} exited {wrk.returncode}:\n{text}"
    assert "Socket errors" not in text, f"wrk on {path}:\n{text}"
    assert "Non-2xx or 3xx responses" not in text, f"wrk on {path}:\n{text}"
    m = re.search(r"(\d+) requests in ", text)
    assert m is not None, f"no report from wrk on {path}:\n{text}"
    return int(m.group(1))


@contextlib.contextmanager
def _stopped_at_exit(ng: Nginx) -> Iterator[Nginx]:
    """Stop ``ng`` (master, then every worker seen) when the block ends, even by an exception."""
    try:
        yield ng
    finally:
        ng.stop()


def test_patch_nginx_workers_100_cycles_under_wrk(procs: Procs, tmp_path: Path) -> None:
    """100 apply/revert cycles on both workers of a running nginx under wrk: every cycle switches /hello
    between 200 and 202, no request fails or sees a wrong body, and nginx ends alive, untraced and unpatched,
    then stops cleanly."""
    tools = _tools()
    ng = _start_nginx(procs, tools["nginx"], tmp_path)
    with _stopped_at_exit(ng):
        workers = ng.workers()
        for pid in (ng.master.pid, *workers):
            assert_running(pid)
        patch = _build_patch(tools["nginx"], ng.master.pid, tmp_path)
        static = (tmp_path / "html" / "data.bin").read_bytes()

        loads = {path: _wrk(procs, tools["wrk"], ng.port, path) for path in ("/data.bin", "/hello")}
        prober = Prober(ng.port, static)
        cycle, step = 0, "before the cycles"
        try:
            prober.start()
            _wait_load_started(ng, prober)
            deadline = time.monotonic() + CYCLES_MAX_S
            with contextlib.ExitStack() as stack:
                targets = [stack.enter_context(hotpatch.attach(pid)) for pid in workers]
                for cycle in range(CYCLES):
                    assert time.monotonic() < deadline, f"only {cycle} cycles within {CYCLES_MAX_S} s"
                    for t in targets:
                        step = f"apply to worker {t.pid}"
                        rep = t.apply(str(patch))
                        assert sorted(s for s, _ in rep.sites) == ["ngx_http_send_header", "ngx_http_send_response"]
                    step = "GET /hello after apply"
                    assert _get(ng.port, "/hello") == (202, HELLO), f"cycle {cycle}: /hello after apply"
                    for t in targets:
                        step = f"revert on worker {t.pid}"
                        t.revert(PATCH_NAME)
                    step = "GET /hello after revert"
                    assert _get(ng.port, "/hello") == (200, HELLO), f"cycle {cycle}: /hello after revert"
                step = "after the cycles"
                assert all(w.poll() is None for w in loads.values()), "a wrk ended before the cycles did"
                assert prober.is_alive(), "our client ended before the cycles did"
                assert [t.status().patches for t in targets] == [()] * WORKERS
        except Exception as e:
            gone = [pid for pid in (ng.master.pid, *workers) if _start_time(pid) is None]
            if not gone:
                raise
            log = ng.error_log()[-2000:]
            raise AssertionError(f"nginx PIDs {gone} ended in cycle {cycle}, {step}; error log:\n{log}") from e
        finally:
            prober.stop_event.set()
            prober.join(timeout=30)
            for w in loads.values():
                _interrupt(w)

        requests = {path: _wrk_report(w, path) for path, w in loads.items()}
        assert not prober.is_alive() and prober.error is None, f"our client: {prober.error!r}"
        assert prober.hello.get(200, 0) > 0 and prober.hello.get(202, 0) > 0, prober.hello
        assert prober.static_ok > 0
        assert all(n > 0 for n in requests.values()), requests
        assert _get(ng.port, "/data.bin") == (200, static)
        assert _get(ng.port, "/hello") == (200, HELLO)

        assert ng.workers() == workers, f"the workers changed: {workers} -> {ng.workers()}"
        for pid in (ng.master.pid, *workers):
            assert_running(pid)
        log = ng.error_log()
        bad = [line for line in log.splitlines() if re.search(r"\[(alert|crit|emerg)\]|exited on signal", line)]
        assert not bad, "\n".join(bad[-20:])

        left = ng.stop()
        assert ng.master.returncode == 0, f"nginx's master exited {ng.master.returncode}"
        assert left == [], f"workers {left} outlived the master"

"""Every process of a program (issue 4): ``apply --exe`` patches a pre-forking server's parent and its 8 workers
in parallel, parent first, while loopback clients keep it busy with no error; a worker forked after the patch
inherits it with its own record; a process gone midway is reported, not a failure."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.api import ApplyOptions
from hotpatch.every import apply_one, run_all

WORKERS = 8
CLIENTS = 4
LOAD_S = 60.0  # the longest the load may run (it stops as soon as the test is done with it)


class Load:
    """CLIENTS threads asking the server compute(n) over fresh loopback connections (50 requests each), until
    stopped or LOAD_S; every answer must be n + 1 (old) or n + 100 (new)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.seen: dict[int, int] = {1: 0, 100: 0}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def run(self, k: int) -> None:
        deadline = time.monotonic() + LOAD_S
        n = k * 1_000_000
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
                    f = conn.makefile("rw")
                    for _ in range(50):
                        n += 1
                        f.write(f"{n}\n")
                        f.flush()
                        got = int(f.readline()) - n
                        with self.lock:
                            if got in self.seen:
                                self.seen[got] += 1
                            else:
                                self.errors.append(f"compute({n}) = {n + got}")
            except (OSError, ValueError) as e:
                with self.lock:
                    self.errors.append(f"{type(e).__name__}: {e}")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def count(self, delta: int) -> int:
        with self.lock:
            return self.seen[delta]


def applied(pid: int) -> list[str]:
    """The names of the patches ``status`` finds applied in ``pid``."""
    st = json.loads(run_cli("status", "--pid", pid, "--json").stdout)
    return [p["name"] for p in st["patches"] if p["state"] == "applied"]


def test_prefork_server_under_load(tmp_path: Path, procs: Procs) -> None:
    exe = compile_program(TARGETS / "forkserver.c", tmp_path / "forkserver")
    patch = tmp_path / "fix.hp"
    assert run_cli("build", TARGETS / "forkserver_patch.c", "--target", exe, "-o", patch).returncode == 0
    server = procs.start(exe, str(WORKERS), stdin=subprocess.PIPE)
    assert server.stdin is not None
    port = int(wait_for_line(server, lambda s: s.startswith("port")).split()[1])
    workers = [int(wait_for_line(server, lambda s: s.startswith("worker")).split()[1]) for _ in range(WORKERS)]
    load = Load(port)
    try:
        deadline = time.monotonic() + 10
        while load.count(1) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        res = run_cli("apply", "--exe", exe, patch, "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        doc = json.loads(res.stdout)
        by_pid = {r["pid"]: r for r in doc["results"]}
        assert sorted(by_pid) == sorted([server.pid, *workers])
        assert {r["outcome"] for r in doc["results"]} == {"applied"}, doc["results"]
        assert by_pid[server.pid]["wave"] == 0 and {by_pid[w]["wave"] for w in workers} == {1}
        assert all(by_pid[server.pid]["finished"] <= by_pid[w]["started"] for w in workers)  # parent first
        assert doc["summary"] == {"processes": WORKERS + 1, "applied": WORKERS + 1}
        before = load.count(100)
        deadline = time.monotonic() + 10
        while load.count(100) < before + 200 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        load.finish()
    assert load.errors == [], load.errors[:5]
    assert load.count(1) >= 200 and load.count(100) >= 200, load.seen
    for pid in [server.pid, *workers]:
        assert applied(pid) == ["fix"]
        assert_running(pid)

    # a worker forked after the patch inherits it, with a record of its own: reverting the parent alone
    # leaves the worker's record (and code) as they are
    server.stdin.write(b"spawn\n")
    server.stdin.flush()
    late = int(wait_for_line(server, lambda s: s.startswith("worker")).split()[1])
    assert applied(late) == ["fix"]
    assert run_cli("revert", "--pid", server.pid, "fix").returncode == 0
    assert applied(server.pid) == [] and applied(late) == ["fix"]
    res = run_cli("revert", "--exe", exe, "--all")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert f"PID {server.pid} (parent" in res.stdout and "not-applied" in lines[0], lines[0]
    assert lines[-1] == f"{WORKERS + 2} processes: 1 not-applied, {WORKERS + 1} reverted", lines[-1]
    for pid in [server.pid, *workers, late]:
        assert applied(pid) == []
        assert_running(pid)


def test_gone_process_reported(tmp_path: Path, procs: Procs) -> None:
    """A process that exits between being chosen and being patched is ``exited``; the others are patched."""
    exe = compile_program(TARGETS / "forkserver.c", tmp_path / "forkserver")
    patch = tmp_path / "fix.hp"
    assert run_cli("build", TARGETS / "forkserver_patch.c", "--target", exe, "-o", patch).returncode == 0
    server = procs.start(exe, "1", stdin=subprocess.PIPE)
    wait_for_line(server, lambda s: s.startswith("port"))
    worker = int(wait_for_line(server, lambda s: s.startswith("worker")).split()[1])
    short = procs.start("true")
    short.wait()
    results = run_all([server.pid, worker, short.pid], partial(apply_one, str(patch), ApplyOptions()))
    outcome = {r.pid: r.outcome for r in results}
    assert outcome == {server.pid: "applied", worker: "applied", short.pid: "exited"}, results
    assert all(r.ok for r in results)
    assert_running(server.pid)

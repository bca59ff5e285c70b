"""``hotpatch agent`` (issue 5): a repository served by ``python -m http.server`` on 127.0.0.1; the agent
applies a published patch to 50 running processes and to one started afterwards, moves them all to v2,
reverts them when v2 is withdrawn, and, killed with SIGKILL mid-apply and started again, still brings every
process to the repository's state. Its audit log has a JSON line per action; its metrics are served on
loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from test_versions import ask

PROCESSES = 50
INTERVAL_S = 1.0
CONVERGE_S = 120.0  # bound for every wait on the agent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], bool], timeout: float = CONVERGE_S) -> float:
    """Poll ``check`` every 0.2 s; returns the seconds it took, fails the test after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - start


class Fleet:
    """The repository, its HTTP server, the hotpatch home of this host, 50 calc targets and the agent."""

    def __init__(self, tmp: Path, procs: Procs) -> None:
        self.tmp, self.procs = tmp, procs
        self.env = {**os.environ, "HOTPATCH_HOME": str(tmp / "home")}
        self.repo = tmp / "repo"
        # a build-id of its own: --all and the agent look at every process of the machine
        self.exe = compile_program(TARGETS / "calc.c", tmp / "calc", f"-Wl,--build-id=0x{uuid.uuid4().hex}")
        self.cli("repo", "init", self.repo)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = procs.start(
            sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(self.repo / "public"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until("the HTTP server", self.serving, 20)
        self.cli("update", "--repo", self.url, "--root", self.repo / "public" / "metadata" / "1.root.json")
        self.targets = [self.start() for _ in range(PROCESSES)]
        self.audit = tmp / "audit.log"
        self.metrics = f"127.0.0.1:{free_port()}"
        self.agent: subprocess.Popen[bytes] | None = None

    def serving(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/metadata/timestamp.json", timeout=2):
                return True
        except OSError:
            return False

    def cli(self, *args: str | Path) -> str:
        res = run_cli(*args, env=self.env)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    def start(self) -> subprocess.Popen[bytes]:
        proc = self.procs.start(self.exe, stdin=subprocess.PIPE)
        wait_for_line(proc, lambda s: s.startswith("ready"))
        return proc

    def publish(self, add: int, version: int) -> None:
        src = self.tmp / f"fix{version}.c"
        src.write_text(f"long compute(long x) {{ return x + {add}; }}\n")
        out = self.tmp / f"fix{version}.hp"
        self.cli("build", src, "--target", self.exe, "-o", out, "--name", "fix", "--version", version)
        self.cli("repo", "add", self.repo, out)

    def start_agent(self) -> None:
        args = ["agent", "--repo", self.url, "--interval", str(INTERVAL_S), "--audit", self.audit]
        self.agent = self.procs.start(
            sys.executable, "-m", "hotpatch", *map(str, args), "--metrics", self.metrics, env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def all_answer(self, value: int) -> bool:
        return all(ask(p, 5) == value for p in self.targets)

    def audit_lines(self) -> list[dict[str, object]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]


def test_agent_keeps_processes_in_line(tmp_path: Path, procs: Procs) -> None:
    fleet = Fleet(tmp_path, procs)
    # a process patched by hand (no repository): the agent must never touch its patch
    other = compile_program(TARGETS / "statics.c", tmp_path / "statics")
    manual = tmp_path / "manual.hp"
    untrusted = {**os.environ, "HOTPATCH_HOME": str(tmp_path / "untrusted-home")}
    assert run_cli("build", TARGETS / "statics_patch.c", "--target", other, "-o", manual, env=untrusted).returncode == 0
    bystander = procs.start(other, stdin=subprocess.PIPE)
    wait_for_line(bystander, lambda s: s.startswith("ready"))
    assert run_cli("apply", "--pid", bystander.pid, manual, env=untrusted).returncode == 0
    fleet.start_agent()
    fleet.publish(100, 1)
    took = wait_until("v1 on every process", lambda: fleet.all_answer(105))
    late = fleet.start()  # started after the patch was published
    fleet.targets.append(late)
    late_took = wait_until("v1 on the late process", lambda: ask(late, 5) == 105, 3 * INTERVAL_S + 30)
    fleet.publish(200, 2)
    wait_until("v2 on every process", lambda: fleet.all_answer(205))
    fleet.cli("repo", "remove", fleet.repo, "fix")
    wait_until("every process reverted", lambda: fleet.all_answer(6))

    with urllib.request.urlopen(f"http://{fleet.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "hotpatch_agent_rounds_total" in text and "hotpatch_agent_actions_total" in text, text[:500]

    def counted(action: str) -> int:
        return [a["action"] for a in fleet.audit_lines()].count(action)

    # the round's audit lines are written once its last process is done
    wait_until("the audit lines", lambda: counted("reverted") >= PROCESSES + 1, 30)
    assert fleet.audit_lines()[0]["action"] == "start"
    assert counted("applied") >= PROCESSES + 1 and counted("upgraded") >= PROCESSES + 1
    st = json.loads(run_cli("status", "--pid", bystander.pid, "--json", env=untrusted).stdout)
    assert [(p["name"], p["state"], p["origin"]) for p in st["patches"]] == [("manual", "applied", "")]
    assert all(a.get("pid") != bystander.pid for a in fleet.audit_lines())
    for p in [*fleet.targets, bystander]:
        assert_running(p.pid)
    print(f"v1 on {PROCESSES} processes in {took:.1f} s; on the late one in {late_took:.1f} s")


def test_agent_killed_mid_apply(tmp_path: Path, procs: Procs) -> None:
    fleet = Fleet(tmp_path, procs)
    fleet.publish(100, 1)
    fleet.start_agent()
    assert fleet.agent is not None
    wait_until("a first apply", lambda: any(a["action"] == "applied" for a in fleet.audit_lines()), 60)
    os.kill(fleet.agent.pid, signal.SIGKILL)  # its worker processes may be mid-apply: they go on or die alone
    fleet.agent.wait()
    fleet.start_agent()
    wait_until("v1 on every process after the restart", lambda: fleet.all_answer(105))
    for p in fleet.targets:
        assert_running(p.pid)

"""Threads created and ending while hotpatch commits (DESIGN.md §5 "thread creation races", research §3.1).

``targets/churn.c`` keeps creating short-lived threads that call ``compute`` (the patched function) while two
more threads call it in a tight loop, so a ``clone`` is under way at any moment of a stop-the-world. A thread
that appears after the world was stopped but is not seized would run free through a half-written site, or be
left out of the check for threads inside the overwritten bytes. Stop-the-world ends its stop by comparing the
process's thread count (``Threads:`` in /proc/PID/status) with the threads it holds, and rescans
/proc/PID/task when they differ; this test holds it to that under churn, for protocols B and R (R seizes every
thread too).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import hotpatch
from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line

CYCLES = {"stop-the-world": 300, "rolling": 120}
LETTER = {"stop-the-world": "B", "rolling": "R"}


@pytest.mark.parametrize("protocol", sorted(CYCLES))
def test_apply_revert_while_threads_come_and_go(tmp_path: Path, procs: Procs, protocol: str) -> None:
    """Apply/revert cycles while threads are created and exit all the time: every operation succeeds, no
    thread ever computes a wrong value, new threads are patched too, and the target ends untraced."""
    exe = compile_program(TARGETS / "churn.c", tmp_path / "churn")
    src = tmp_path / "churn_patch.c"
    src.write_text("int compute(int x) { return 3 * x + 2; }\n")
    patch = tmp_path / "churn_patch.hp"
    res = run_cli("build", src, "--target", exe, "-o", patch, "--name", "churn")
    assert res.returncode == 0, res.stderr
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.strip() == "ready")
    with hotpatch.attach(proc.pid) as target:
        for cycle in range(CYCLES[protocol]):
            report = target.apply(str(patch), protocol)
            assert report.protocol == LETTER[protocol], (cycle, report.protocol)
            assert proc.poll() is None, f"target died in cycle {cycle}"
            target.revert("churn", protocol)
    assert_running(proc.pid)
    assert proc.stdin is not None
    proc.stdin.close()
    line = wait_for_line(proc, lambda s: s.startswith(("stats", "WRONG")))
    assert line.startswith("stats"), line
    assert int(line.split("=")[1]) > 100, line  # threads really came and went meanwhile
    assert proc.wait(timeout=10) == 0

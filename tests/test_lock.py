"""One hotpatch at a time per target (``hotpatch.lock``), and no lock file left behind.

Before: every PID ever patched left ``/tmp/hotpatch-PID.lock`` (thousands after a test run)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.lock import lock_path, target_lock

PID = 2**22 + 17  # above any pid_max: the lock only names a PID, no process is touched


def test_lockers_exclude_each_other_and_leave_no_file() -> None:
    """8 threads × 40 takes of the same lock (each its own open file, as separate processes have): never two
    inside at once, and the file is gone afterwards."""
    inside, overlaps, takes = [0], [0], [0]
    guard = threading.Lock()

    def work() -> None:
        for _ in range(40):
            with target_lock(PID, timeout_s=30):
                with guard:
                    inside[0] += 1
                    overlaps[0] += inside[0] > 1
                    takes[0] += 1
                time.sleep(0.0005)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert takes[0] == 320 and overlaps[0] == 0
    assert not os.path.exists(lock_path(PID))


def test_cli_waits_for_the_holder_and_cleans_up(tmp_path: Path, procs: Procs) -> None:
    """A command started while the lock is held waits, then works once it is released; afterwards no lock file
    names the target."""
    exe = compile_program(TARGETS / "faults.c", tmp_path / "faults")
    (tmp_path / "fix.c").write_text("long compute(long x) { return 2 * x + 2; }\n")
    patch = tmp_path / "fix.hp"
    assert run_cli("build", tmp_path / "fix.c", "--target", exe, "-o", patch, "--name", "fix").returncode == 0
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))
    with target_lock(proc.pid, timeout_s=5):
        cli = procs.start(sys.executable, "-m", "hotpatch", "apply", "--pid", str(proc.pid), str(patch))
        time.sleep(1.0)
        assert cli.poll() is None, "apply did not wait for the lock"
    assert cli.wait(timeout=60) == 0
    assert not os.path.exists(lock_path(proc.pid))
    assert run_cli("revert", "--pid", proc.pid, "--all").returncode == 0
    assert not os.path.exists(lock_path(proc.pid))
    assert_running(proc.pid)

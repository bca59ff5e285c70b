"""A thread stopped inside the overwritten bytes, and patch memory kept while a thread runs in it.

The target's reader thread is blocked in read(2) on a ``syscall`` instruction that lies inside the 5 bytes
the jump overwrites. Apply must move it into the trampoline (so its read restarts there and completes with
the original code); later calls go to the replacement. Revert while the thread sleeps inside the replacement
must keep the patch's memory mapped (status says so), and a later command unmaps it once the thread left.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

import hotpatch
from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, thread_states, wait_for_line
from hotpatch.errors import TargetError


def _blocked_in_read(pid: int) -> bool:
    for tid in Path(f"/proc/{pid}/task").iterdir():
        if int(tid.name) != pid and (tid / "syscall").read_text().split()[0] == "0":
            return True
    return False


def test_thread_in_overwritten_syscall_is_moved_and_memory_kept(tmp_path: Path, procs: Procs) -> None:
    """The blocked thread completes its read through the trampoline; revert keeps then frees the memory."""
    exe = compile_program(TARGETS / "inside_read.c", tmp_path / "inside_read")
    patch = tmp_path / "fix.hp"
    res = run_cli("build", TARGETS / "inside_read_patch.c", "--target", exe, "-o", patch, "--name", "fix")
    assert res.returncode == 0, res.stderr
    proc = procs.start(exe, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    wait_for_line(proc, lambda s: s.startswith("ready"))
    deadline = time.monotonic() + 5
    while not _blocked_in_read(proc.pid):
        assert time.monotonic() < deadline, "the reader thread never blocked in read"
        time.sleep(0.01)

    with hotpatch.attach(proc.pid) as target:
        report = target.apply(str(patch))
        assert report.moved == 1, "the thread blocked on the overwritten syscall was not moved"
        assert_running(proc.pid)
        # the pending read restarts in the trampoline and completes with the original code
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        assert wait_for_line(proc, lambda s: s.startswith("read:")).strip() == "read: hello"
        # the next call goes to the replacement
        assert wait_for_line(proc, lambda s: s.startswith("read:")).strip() == "read: patched"
        # revert while the thread sleeps inside the replacement: memory is kept
        time.sleep(0.1)
        reps = target.revert("fix")
        assert reps[0].retained, "patch memory was unmapped although a thread was inside it"
        assert target.status().retained
        assert_running(proc.pid)
        # the thread finishes the replacement once more, then calls the original raw_read again
        assert wait_for_line(proc, lambda s: s.startswith("read:")).strip() == "read: patched"
    while not _blocked_in_read(proc.pid):
        time.sleep(0.01)
    out = run_cli("status", "--pid", proc.pid)
    assert "kept mapped" in out.stdout
    # the next command frees it, as no thread is in it any more (the reader blocks in the original)
    region = reps[0].retained[0]
    again = run_cli("apply", "--pid", proc.pid, patch)
    assert again.returncode == 0, again.stderr
    assert f"{region[0]:x}-" not in Path(f"/proc/{proc.pid}/maps").read_text(), "retained region never unmapped"
    # the reader was blocked in the original again, so the new apply moved it into the new trampoline;
    # revert now must keep that trampoline until the read completes
    rep = run_cli("revert", "--pid", proc.pid, "--all")
    assert rep.returncode == 0 and "kept" in rep.stdout, rep.stdout + rep.stderr
    proc.stdin.write(b"bye\n")
    proc.stdin.flush()
    assert wait_for_line(proc, lambda s: s.startswith("read:")).strip() == "read: bye"
    while not _blocked_in_read(proc.pid):
        time.sleep(0.01)
    assert run_cli("revert", "--pid", proc.pid, "--all").returncode == 0
    out = run_cli("status", "--pid", proc.pid)
    assert "kept mapped" not in out.stdout and "no patch applied" in out.stdout, out.stdout
    proc.stdin.write(b"again\n")
    proc.stdin.flush()
    assert wait_for_line(proc, lambda s: s.startswith("read:")).strip() == "read: again"
    assert_running(proc.pid)


def test_a_thread_that_cannot_stop_is_not_left_stopped(tmp_path: Path, procs: Procs) -> None:
    """A thread waiting for its vfork child (a killable-only sleep that PTRACE_INTERRUPT does not end) cannot
    stop for 6 s: apply fails with one clear error after STOP_TIMEOUT_S, changes nothing, and — the API
    caller being still alive as the tracer — that thread must not stop later with nobody to resume it: the
    release waits for its stop and detaches it."""
    exe = compile_program(TARGETS / "vfork_wait.c", tmp_path / "vfork_wait", "-pthread")
    (tmp_path / "fix.c").write_text("long compute(long x) { return x * 3 + 2; }\n")
    patch = tmp_path / "fix.hp"
    res = run_cli("build", tmp_path / "fix.c", "--target", exe, "-o", patch, "--name", "fix")
    assert res.returncode == 0, res.stderr
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))
    deadline = time.monotonic() + 5
    while "D" not in thread_states(proc.pid):
        assert time.monotonic() < deadline, "the vfork parent never waited for its child"
        time.sleep(0.01)
    with hotpatch.attach(proc.pid) as target:
        with pytest.raises(TargetError, match="did not stop within"):
            target.apply(str(patch), "stop-the-world")
        assert target.status().patches == ()
        deadline = time.monotonic() + 10
        while "D" in thread_states(proc.pid):  # until the vfork child exits
            assert time.monotonic() < deadline, "the vfork parent still waits"
            time.sleep(0.01)
        time.sleep(0.2)
        assert_running(proc.pid)  # not stopped by the interrupt sent while it could not stop
        assert target.apply(str(patch), "stop-the-world").protocol == "B"  # and it works once the thread can stop
    assert_running(proc.pid)

"""A tracer thread's exit releases the target (``hotpatch.process.tracer``).

The target (``targets/signals.c``) has three threads calling ``compute`` in loops and counts the real-time
signals it handles. A :class:`LiveWorld` made with ``exit_detaches`` on a thread of ``run_as_tracer`` stops every
thread and is never released by the code: when ``run_as_tracer`` returns, the kernel must already have
detached them all (no thread stopped, none traced), a failure midway must do the same, signals raised while the
threads were held must be handled, and a job-control stop must stay in place.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TARGETS, Procs, assert_running, compile_program, thread_states, wait_for_line
from hotpatch.process import ptrace
from hotpatch.process.live import LiveWorld
from hotpatch.process.tracer import run_as_tracer

THREADS = 4  # main + 3 workers
ROUNDS = 50


@pytest.fixture
def target(procs: Procs, tmp_path: Path) -> subprocess.Popen[bytes]:
    exe = compile_program(TARGETS / "signals.c", tmp_path / "signals")
    p = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(p, lambda line: line.startswith("ready"))
    return p


def handled(p: subprocess.Popen[bytes]) -> int:
    """The number of signals the target has handled so far."""
    assert p.stdin is not None
    p.stdin.write(b"\n")
    p.stdin.flush()
    return int(wait_for_line(p, lambda line: line.startswith("handled")).split()[1])


def hold_all(pid: int, then: str = "return") -> int:
    """Seize and stop every thread of ``pid`` with a World that relies on its thread's exit; never release it.
    ``then``: "return" the number of threads stopped, "raise" a RuntimeError, or "signal" each thread with
    SIGRTMIN while it is stopped."""
    world = LiveWorld(pid, exit_detaches=True)  # (not boosted: the exit waits for a CPU like any thread)
    assert world.exit_detaches
    world.seize()
    for tid in list(world.threads):
        world.stop_one(tid)  # and not resumed
    assert all(th.stopped for th in world.threads.values())
    if then == "raise":
        raise RuntimeError("failed with every thread stopped")
    if then == "signal":
        for tid in world.threads:
            ptrace.tgkill(pid, tid, signal.SIGRTMIN)
    return len(world.threads)


def test_the_exit_resumes_every_stopped_thread(target: subprocess.Popen[bytes]) -> None:
    for _ in range(ROUNDS):  # each seizes at once what the last one held: it must be released by then
        assert run_as_tracer(lambda: hold_all(target.pid)) == THREADS
    assert_running(target.pid)  # at once: run_as_tracer returns once its thread has left the kernel
    for tid in os.listdir(f"/proc/{target.pid}/task"):
        with open(f"/proc/{target.pid}/task/{tid}/status") as f:
            assert "TracerPid:\t0\n" in f.read(), f"thread {tid} is still traced"
    assert handled(target) == 0  # and it answers


def test_a_failure_with_every_thread_stopped_still_releases_them(target: subprocess.Popen[bytes]) -> None:
    with pytest.raises(RuntimeError, match="every thread stopped"):
        run_as_tracer(lambda: hold_all(target.pid, "raise"))
    assert_running(target.pid)


def test_signals_raised_while_held_are_handled(target: subprocess.Popen[bytes]) -> None:
    run_as_tracer(lambda: hold_all(target.pid, "signal"))
    assert_running(target.pid)
    deadline = time.monotonic() + 10
    while (n := handled(target)) < THREADS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert n == THREADS  # one per thread: none lost, none doubled


def test_a_job_control_stop_is_kept(target: subprocess.Popen[bytes]) -> None:
    os.kill(target.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while set(thread_states(target.pid)) != {"T"}:
        assert time.monotonic() < deadline, thread_states(target.pid)
        time.sleep(0.01)
    assert run_as_tracer(lambda: hold_all(target.pid)) == THREADS
    # still stopped by SIGSTOP, as before (a thread woken from its ptrace-stop re-enters the group-stop on its
    # own, kernel/ptrace.c __ptrace_unlink: it may be seen running for a moment)
    time.sleep(0.2)
    assert set(thread_states(target.pid)) == {"T"}
    os.kill(target.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while any(s in "Tt" for s in thread_states(target.pid)):
        assert time.monotonic() < deadline, thread_states(target.pid)
        time.sleep(0.01)
    assert_running(target.pid)
    assert handled(target) == 0

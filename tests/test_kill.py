"""SIGKILL of ``hotpatch apply`` / ``revert`` never harms the target (DESIGN.md §5 "Tracer death", §6 inv. 1, 4, 5).

Random points. The target (``targets/kill_target.c``) has four threads calling ``compute`` in a tight loop
and checking every result (the old 3x+1 or the patched 3x+2; anything else ends it with exit status 3). A
normal apply is measured first: its duration, and when the tool holds the target. There are two kinds of
hold: a short stop of the main thread alone for injected system calls (mmap, mprotect, ...), and the commit,
where every thread is stopped (a worker thread's ``TracerPid`` is a thread of the tool). ``hotpatch apply`` is then
started again and again and SIGKILLed, by PID, either at a fraction of the measured duration after its
start, or a given number of microseconds into the commit or after it (busy-waiting on ``time.perf_counter``
for sub-millisecond precision). Kills land anywhere, injected-system-call holds included
(``test_sigkill_during_injected_syscall`` also hits those deterministically).

After every kill: the target runs, no thread stopped, no tracer; ``hotpatch status --pid PID --json`` shows
the patch ``applied`` or not in force (absent or ``reverted``), never ``partial``, and agrees with the bytes
of ``compute`` in ``/proc/PID/mem`` (the original ones, or a whole ``jmp rel32`` into executable memory
followed by the original bytes); ``hotpatch revert --all`` (when applied) or ``hotpatch apply`` (when not)
succeeds. The same is done for kills during ``revert``. At the end the target reports the results its
threads saw: old and new ones, and (it is still running) no wrong one.

Exact points. A small script runs the CLI with one internal function wrapped so that the process SIGKILLs
itself right after it (fault injection on a real process; nothing is mocked): right after the site bytes
are written, with a thread blocked in a system call inside the overwritten bytes (``targets/kill_blocked.c``),
and right after the tool redirected a thread for an injected system call or resumed it into the call.

Protocol A (no stop). ``targets/kill_ready.c`` is built with ``hotpatch cflags``, so its ``compute`` is a
hotpatch-ready (patchable-entry) site that ``auto`` writes with protocol A: a thread of the target runs the
commit program, which needs no tool to finish. The tool is SIGKILLed right after it launched that program,
and at other exact points (before it picked the program's thread, with that thread stopped, after the program
ended, after its pages were unmapped; during revert too) and at timed points. Then: the target runs, no thread
stopped, no tracer; the code settles fully old or fully new (the program completes on its own; never a
half-written padding or key); every worker's calls begun after that return the matching value; ``status``
agrees; apply and revert then work, with protocol A.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

import hotpatch
from conftest import INJECTOR_SETUP, TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.process.memory import Memory
from hotpatch.process.threads import tracing_process
from hotpatch.x86 import stub

PATCH_SOURCE = "int compute(int x) { return 3 * x + 2; }\n"
PATCH_NAME = "kill_patch"
JUMP_LEN = 5
TIME_FRACTIONS = (0.05, 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.87, 0.93, 0.98)
COMMIT_POINTS = 12  # kills spread over the commit hold
AFTER_COMMIT = (0.0, 0.0001, 0.0005)  # kills this many seconds after the commit released the threads
REVERT_FRACTIONS = (0.4, 0.8, 0.95)
REVERT_COMMIT_POINTS = 3
REVERT_AFTER_COMMIT = (0.0,)

# Runs `hotpatch ARGV[2:]` with the function named by ARGV[1] ("package.module.function" or
# "package.module.Class:method") wrapped so that the process SIGKILLs itself right after its first call
# (which it starts HOTPATCH_TEST_DELAY_S seconds late when that is set).
FAULT_SCRIPT = """\
import importlib, os, signal, sys, time
where = sys.argv[1]
module, _, attr = where.rpartition(".")
owner_name, _, method = attr.partition(":")
mod = importlib.import_module(module)
owner = getattr(mod, owner_name) if method else mod
name = method or owner_name
original = getattr(owner, name)
def then_die(*args, **kwargs):
    time.sleep(float(os.environ.get("HOTPATCH_TEST_DELAY_S", "0")))
    result = original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, name, then_die)
from hotpatch.cli import main
sys.argv = ["hotpatch", *sys.argv[2:]]
main()
"""


# -- helpers ---------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A running target: process, address of the patched function and its original bytes."""

    proc: subprocess.Popen[bytes]
    function: int
    original: bytes

    @property
    def pid(self) -> int:
        """The target's PID."""
        return self.proc.pid


def function_bytes(path: Path, name: str) -> bytes:
    """The bytes of function ``name`` in the ELF file ``path`` (from its .symtab)."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        text = elf.get_section_by_name(".text")
        assert symtab is not None and text is not None
        sym = symtab.get_symbol_by_name(name)[0]
        value, size = int(sym["st_value"]), int(sym["st_size"])
        start = int(text["sh_addr"])
        assert start <= value < start + int(text["sh_size"])
        f.seek(int(text["sh_offset"]) + value - start)
        return f.read(size)


def a_worker(pid: int) -> int:
    """The TID of a thread other than the main one."""
    return next(int(t) for t in sorted(os.listdir(f"/proc/{pid}/task")) if int(t) != pid)


def target_failure(t: Target) -> str:
    """Why the target is gone: its exit status and the end of its output (e.g. a WRONG line)."""
    assert t.proc.stdout is not None
    rest = t.proc.stdout.read().decode(errors="replace") if t.proc.poll() is not None else ""
    return f"target exited with status {t.proc.returncode}: {rest.strip()[-300:]}"


def wait_running(t: Target, timeout: float = 2.0) -> None:
    """The target is alive, untraced, with no stopped thread (allowing the kernel a moment to finish
    detaching a killed tracer)."""
    deadline = time.monotonic() + timeout
    while True:
        assert t.proc.poll() is None, target_failure(t)
        try:
            assert_running(t.pid)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def read_code(t: Target) -> bytes:
    """The current bytes of the patched function in the target."""
    with open(f"/proc/{t.pid}/mem", "rb") as mem:
        mem.seek(t.function)
        return mem.read(len(t.original))


def executable_ranges(pid: int) -> list[tuple[int, int]]:
    """The executable mappings of ``pid`` as (start, end)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if fields[1][2] == "x":
                lo, hi = fields[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def code_state(t: Target) -> str:
    """``original``, or ``jump`` (a whole ``jmp rel32`` into executable memory, the rest untouched); fails
    on anything else."""
    code = read_code(t)
    if code == t.original:
        return "original"
    assert code[JUMP_LEN:] == t.original[JUMP_LEN:], f"bytes after the jump changed: {code.hex()}"
    assert code[0] == 0xE9, f"neither the original bytes nor a jump: {code.hex()}"
    dest = t.function + JUMP_LEN + int.from_bytes(code[1:JUMP_LEN], "little", signed=True)
    assert any(lo <= dest < hi for lo, hi in executable_ranges(t.pid)), f"jump to non-executable {dest:#x}"
    return "jump"


def status_state(t: Target) -> str:
    """``applied`` or ``absent`` according to ``hotpatch status --json``; fails on ``partial``."""
    res = run_cli("status", "--pid", t.pid, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    states = [p["state"] for p in doc["patches"]]
    assert all(p["name"] == PATCH_NAME for p in doc["patches"]), doc
    assert all(s in ("applied", "reverted") for s in states), doc
    return "applied" if "applied" in states else "absent"


def check_consistent(t: Target) -> str:
    """The target runs untraced, and status and bytes agree; returns ``applied`` or ``absent``."""
    wait_running(t)
    st = status_state(t)
    code = code_state(t)
    assert (st, code) in (("applied", "jump"), ("absent", "original")), f"status {st} but code {code}"
    wait_running(t)
    return st


def explain(e: AssertionError, t: Target, what: str) -> None:
    """Add ``what`` to a failure, and why the target is gone when it is (a tool error such as ESRCH is often
    only the first sign of a target that died)."""
    e.add_note(what)
    if t.proc.poll() is not None:
        e.add_note(target_failure(t))


def cli_ok(*args: object) -> str:
    """Run the CLI, which must succeed; returns its stdout."""
    res = run_cli(*args)
    assert res.returncode == 0, f"hotpatch {' '.join(map(str, args))}: {res.stderr.strip()}"
    return res.stdout


def api_state(t: Target) -> str:
    """``applied`` or ``absent`` read in-process through :func:`hotpatch.attach` (a quicker second look)."""
    with hotpatch.attach(t.pid) as h:
        states = [p.state for p in h.status().patches]
    assert "partial" not in states, states
    return "applied" if "applied" in states else "absent"


def spin_until(deadline: float) -> None:
    """Busy-wait until ``time.perf_counter()`` reaches ``deadline`` (sub-millisecond precision)."""
    while time.perf_counter() < deadline:
        pass


@dataclass
class Timing:
    """A normal run of the tool: total seconds, and the commit hold (seconds from start, length)."""

    total: float
    commit_start: float
    commit_length: float


def run_watched(procs: Procs, t: Target, args: list[str], watched: int | None = None) -> Timing:
    """Run ``hotpatch ARGS`` to its end, watching when thread ``watched`` (default: a worker) of the target
    is traced by it."""
    worker = watched or a_worker(t.pid)
    p = procs.start(sys.executable, "-m", "hotpatch", *args, stdout=subprocess.DEVNULL)
    t0 = time.perf_counter()
    start = end = 0.0
    while p.poll() is None:
        held = tracing_process(t.pid, worker) == p.pid
        now = time.perf_counter() - t0
        if held and not start:
            start = now
        if held:
            end = now
    total = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr.read().decode() if p.stderr else ""
    return Timing(total, start, max(end - start, 20e-6))


def kill_tool(procs: Procs, t: Target, args: list[str], point: tuple[str, float], watched: int | None = None) -> bool:
    """Start ``hotpatch ARGS`` and SIGKILL it at ``point``: ("time", seconds after its start), ("commit",
    seconds after it stopped every thread) or ("after", seconds after the commit released them). Returns True
    when the kill landed before the tool finished. The commit is seen as thread ``watched`` (default: a
    worker) being traced by the tool."""
    mode, delay = point
    worker = watched or a_worker(t.pid)
    p = procs.start(sys.executable, "-m", "hotpatch", *args, stdout=subprocess.DEVNULL)
    t0 = time.perf_counter()
    if mode == "time":
        spin_until(t0 + delay)
    else:
        while p.poll() is None and tracing_process(t.pid, worker) != p.pid:
            pass
        while mode == "after" and p.poll() is None and tracing_process(t.pid, worker) == p.pid:
            pass
        spin_until(time.perf_counter() + delay)
    killed = p.poll() is None
    if killed:
        os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    return killed and p.returncode == -signal.SIGKILL


def kill_points(
    normal: list[Timing], fractions: tuple[float, ...], commit_points: int, after: tuple[float, ...]
) -> list[tuple[str, float]]:
    """Fractions of the median duration, delays spread evenly over the median commit hold, and delays after
    the commit."""
    total = statistics.median(n.total for n in normal)
    hold = statistics.median(n.commit_length for n in normal)
    points = [("time", f * total) for f in fractions]
    points += [("commit", hold * i / commit_points) for i in range(commit_points)]
    points += [("after", d) for d in after]
    return points


def start_compute_target(tmp_path: Path, procs: Procs) -> tuple[Target, Path]:
    """kill_target running with its four checking threads, and the patch file for it."""
    exe = compile_program(TARGETS / "kill_target.c", tmp_path / "kill_target")
    src = tmp_path / "kill_patch.c"
    src.write_text(PATCH_SOURCE)
    patch = tmp_path / "kill_patch.hp"
    cli_ok("build", src, "--target", exe, "-o", patch, "--name", PATCH_NAME)
    proc = procs.start(exe, stdin=subprocess.PIPE)
    line = wait_for_line(proc, lambda s: s.startswith("addr compute "))
    wait_for_line(proc, lambda s: s.strip() == "ready")
    t = Target(proc, int(line.split()[2], 16), function_bytes(exe, "compute"))
    assert read_code(t) == t.original
    return t, patch


def finish(t: Target) -> None:
    """Ask the target what its threads saw (old and new results, no wrong one) and let it exit 0."""
    assert t.proc.poll() is None, target_failure(t)
    assert t.proc.stdin is not None
    t.proc.stdin.write(b"stats\n")
    t.proc.stdin.flush()
    line = wait_for_line(t.proc, lambda s: s.startswith(("stats", "WRONG")))
    assert line.startswith("stats"), line
    counts = dict(kv.split("=") for kv in line.split()[1:])
    assert int(counts["old"]) > 0 and int(counts["new"]) > 0, line
    t.proc.stdin.close()
    assert t.proc.wait(timeout=10) == 0, target_failure(t)


# -- random points ---------------------------------------------------------------------------------------


def test_sigkill_during_apply(tmp_path: Path, procs: Procs) -> None:
    """SIGKILL of apply at 25 points (10 fractions of its duration, 12 into its commit, 3 after): the target runs
    untraced, status is applied or not in force (never partial) and agrees with the bytes, the next revert or
    apply works, and no thread ever computed a wrong value."""
    t, patch = start_compute_target(tmp_path, procs)
    apply_args = ["apply", "--pid", str(t.pid), str(patch)]
    normal = []
    for _ in range(3):
        normal.append(run_watched(procs, t, apply_args, watched=t.pid))
        assert check_consistent(t) == "applied"
        cli_ok("revert", "--pid", t.pid, "--all")
        assert check_consistent(t) == "absent"

    seen = {"applied": 0, "absent": 0, "finished": 0}
    for point in kill_points(normal, TIME_FRACTIONS, COMMIT_POINTS, AFTER_COMMIT):
        try:
            killed = kill_tool(procs, t, apply_args, point)
            state = check_consistent(t)
            seen[state if killed else "finished"] += 1
            if state == "applied":  # revert works after the kill
                cli_ok("revert", "--pid", t.pid, "--all")
                assert code_state(t) == "original" and api_state(t) == "absent"
            else:  # apply works after the kill; then back to the start, in-process
                cli_ok(*apply_args)
                assert code_state(t) == "jump" and api_state(t) == "applied"
                with hotpatch.attach(t.pid) as h:
                    h.revert(None)
                assert code_state(t) == "original"
            wait_running(t)
        except AssertionError as e:
            explain(e, t, f"after SIGKILL of apply at {point}")
            raise
    assert seen["applied"] and seen["absent"], f"kills never landed on both sides of the commit: {seen}"
    finish(t)


def test_sigkill_during_revert(tmp_path: Path, procs: Procs) -> None:
    """SIGKILL of revert at a few points (fractions of its duration, into its commit): the target runs on,
    status is applied or absent and agrees with the bytes, and a second revert works."""
    t, patch = start_compute_target(tmp_path, procs)
    revert_args = ["revert", "--pid", str(t.pid), "--all"]
    normal = []
    for _ in range(2):
        cli_ok("apply", "--pid", t.pid, patch)
        normal.append(run_watched(procs, t, revert_args))
        assert check_consistent(t) == "absent"
    for point in kill_points(normal, REVERT_FRACTIONS, REVERT_COMMIT_POINTS, REVERT_AFTER_COMMIT):
        try:
            cli_ok("apply", "--pid", t.pid, patch)
            kill_tool(procs, t, revert_args, point)
            if check_consistent(t) == "applied":
                cli_ok(*revert_args)
            assert check_consistent(t) == "absent"
        except AssertionError as e:
            explain(e, t, f"after SIGKILL of revert at {point}")
            raise
    finish(t)


# -- exact points ----------------------------------------------------------------------------------------


def run_and_die_after(procs: Procs, tmp_path: Path, where: str, *args: object) -> None:
    """Run ``hotpatch ARGS`` so that it SIGKILLs itself right after the first call of ``where``; it must
    die that way (not finish)."""
    script = tmp_path / "die_after.py"
    script.write_text(FAULT_SCRIPT)
    p = procs.start(sys.executable, script, where, *map(str, args))
    _, err = p.communicate(timeout=60)
    if p.returncode != -signal.SIGKILL:  # not an AssertionError: the xfail below must not swallow it
        pytest.fail(f"{where} was never called: exit {p.returncode}, {err.decode()}")


def blocked_in_pause(pid: int, tid: int, timeout: float = 5.0) -> None:
    """Wait until thread ``tid`` is blocked in pause(2) (/proc/PID/task/TID/syscall starts with 34)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            if f.read().split()[0] == "34":
                return
        assert time.monotonic() < deadline, f"thread {tid} never blocked in pause"
        time.sleep(0.005)


def test_sigkill_after_site_write_with_thread_inside(tmp_path: Path, procs: Procs) -> None:
    """The tool dies right after writing the jump while a thread is blocked in a syscall inside the overwritten
    bytes: that thread was already moved into the trampoline, so it wakes up right, and the patch works."""
    exe = compile_program(TARGETS / "kill_blocked.c", tmp_path / "kill_blocked")
    src = tmp_path / "kill_blocked_patch.c"
    src.write_text("#include <unistd.h>\nint wait_here(void) { return pause() + 100; }\n")
    patch = tmp_path / "kill_blocked_patch.hp"
    cli_ok("build", src, "--target", exe, "-o", patch, "--name", PATCH_NAME)
    proc = procs.start(exe, stdin=subprocess.PIPE)
    info: dict[str, int] = {}

    def seen(line: str) -> bool:
        if line.startswith(("addr ", "waiter ")):
            info[line.split()[0]] = int(line.split()[-1], 0)
        return line.strip() == "ready"

    wait_for_line(proc, seen)
    t = Target(proc, info["addr"], function_bytes(exe, "wait_here"))
    waiter = info["waiter"]
    blocked_in_pause(t.pid, waiter)  # inside wait_here's first bytes

    run_and_die_after(procs, tmp_path, "hotpatch.transaction.Transaction:_write_all", "apply", "--pid", t.pid, patch)
    assert check_consistent(t) == "applied"

    def wake() -> str:
        blocked_in_pause(t.pid, waiter)  # else the signal could come between two pauses and wake nothing
        os.kill(t.pid, signal.SIGUSR1)  # blocked in every thread but the waiter
        watchdog = threading.Timer(20, os.kill, (t.pid, signal.SIGKILL))  # a lost wake-up must not hang
        watchdog.start()
        try:
            return wait_for_line(proc, lambda s: s.startswith("woke")).strip()
        finally:
            watchdog.cancel()

    assert wake() == "woke -4"  # the pause it was blocked in, finished through the trampoline
    assert wake() == "woke 99"  # the next call went to the replacement
    wait_running(t)
    cli_ok("revert", "--pid", t.pid, "--all")
    assert check_consistent(t) == "absent"
    assert wake() == "woke 99"  # leaves the replacement it was blocked in
    assert wake() == "woke -4"  # and calls the original again
    wait_running(t)


def test_sigkill_while_the_commit_program_runs(tmp_path: Path, procs: Procs) -> None:
    """The tool dies right after pointing a thread of the target at the commit program (DESIGN.md §5): the
    program needs no tracer. Protocol R's program, armed with ``EB FE`` at the site, waits for a go that never
    comes and puts the site back by itself. Threads reaching the site spin meanwhile, none is stopped, and
    ``status`` waits for the program's end instead of seeing a partial patch."""
    t, patch = start_compute_target(tmp_path, procs)
    run_and_die_after(procs, tmp_path, "hotpatch.livecommit.LiveCommit:_launch", "apply", "--pid", t.pid, patch)
    deadline = time.monotonic() + 2
    while read_code(t)[:2] != b"\xeb\xfe":
        assert time.monotonic() < deadline, f"the program never armed: {read_code(t).hex()}"
        time.sleep(0.001)
    assert check_consistent(t) == "absent"  # waits for the program to give up
    cli_ok("apply", "--pid", t.pid, patch)
    assert check_consistent(t) == "applied"
    cli_ok("revert", "--pid", t.pid, "--all")
    assert check_consistent(t) == "absent"
    finish(t)


@pytest.mark.parametrize("where", ["hotpatch.process.ptrace.set_regs", "hotpatch.process.ptrace.syscall"])
def test_sigkill_during_injected_syscall(tmp_path: Path, procs: Procs, where: str) -> None:
    """The tool dies while a thread runs an injected system call (right after its registers were redirected,
    or right after the single-step was requested): the target must run on unharmed and untraced."""
    t, patch = start_compute_target(tmp_path, procs)
    run_and_die_after(procs, tmp_path, where, "apply", "--pid", t.pid, patch)
    time.sleep(0.2)
    check_consistent(t)
    cli_ok("apply", "--pid", t.pid, patch)
    cli_ok("revert", "--pid", t.pid, "--all")
    finish(t)


# Runs `hotpatch ARGV[2:]` with hotpatch.process.ptrace.syscall_op wrapped so that its first call first
# SIGKILLs the target, PID ARGV[1], and waits until the kernel has begun to take it down.
TARGET_DIES_SCRIPT = """\
import os, signal, sys, time
from hotpatch.process import ptrace
pid = int(sys.argv[1])
original = ptrace.syscall_op
def target_dies(tid):
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    return original(tid)
ptrace.syscall_op = target_dies
from hotpatch.cli import main
sys.argv = ["hotpatch", *sys.argv[2:]]
main()
"""


def test_target_killed_during_injected_syscall(tmp_path: Path, procs: Procs) -> None:
    """The target is SIGKILLed (by someone else) while a thread of it sits in an injected system call's stop:
    the tool ends with one line naming that, not an internal error (ptrace answers ESRCH for a tracee that a
    SIGKILL woke, kernel/ptrace.c ``ptrace_freeze_traced``)."""
    t, patch = start_compute_target(tmp_path, procs)
    script = tmp_path / "target_dies.py"
    script.write_text(TARGET_DIES_SCRIPT)
    res = subprocess.run(
        [sys.executable, script, str(t.pid), "apply", "--pid", str(t.pid), patch],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0], res.stderr
    assert f"PID {t.pid}" in lines[0] and ("killed" in lines[0] or "exited" in lines[0]), lines[0]
    assert t.proc.wait(timeout=10) == -signal.SIGKILL


def test_repeated_kills_during_injection_leave_room_for_the_stub(tmp_path: Path, procs: Procs) -> None:
    """Each kill mid-injection leaves the stub in a module's padding; the next runs must reuse that room
    rather than run out of padding after a few kills (the target maps only a handful of modules)."""
    t, patch = start_compute_target(tmp_path, procs)
    for _ in range(8):
        run_and_die_after(procs, tmp_path, "hotpatch.process.ptrace.syscall", "apply", "--pid", t.pid, patch)
        wait_running(t)
    cli_ok("apply", "--pid", t.pid, patch)
    cli_ok("revert", "--pid", t.pid, "--all")
    finish(t)


# Injects poll(NULL, 0, ARGV[3] ms) into thread ARGV[2] of PID ARGV[1] through the syscall stub and SIGKILLs
# itself while the thread sleeps in that call: the thread goes on sleeping inside the stub the tool leaves.
# Prints the stub address first.
STUB_SLEEP_SCRIPT = (
    """\
import os, signal, sys, threading
from hotpatch.process import remote
from hotpatch.process.maps import read_maps
from hotpatch.process.memory import Memory
from hotpatch.process.threads import World
pid, tid, ms = map(int, sys.argv[1:4])
"""
    + INJECTOR_SETUP
    + """\
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
inject(7, 0, 0, ms)  # poll
"""
)
POLL_MS = 4000


def in_poll(pid: int, tid: int) -> bool:
    """Thread ``tid`` is blocked in poll(2) (/proc/PID/task/TID/syscall starts with 7), or in the
    restart_syscall (219) that resumes it after a ptrace stop interrupted it."""
    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
        return f.read().split()[0] in ("7", "219")


def test_a_stub_left_with_a_thread_inside_is_not_reused(tmp_path: Path, procs: Procs) -> None:
    """A killed tool leaves a thread asleep in an injected call, inside the stub: the next command must not
    write its own stub there (the thread would come back through another thread's registers, or through the
    zeros of an erased stub). Before the fix the target died of SIGSEGV once the poll returned."""
    t, patch = start_compute_target(tmp_path, procs)
    worker = a_worker(t.pid)
    script = tmp_path / "stub_sleep.py"
    script.write_text(STUB_SLEEP_SCRIPT)
    tool = procs.start(sys.executable, script, str(t.pid), str(worker), str(POLL_MS))
    out, err = tool.communicate(timeout=30)
    assert tool.returncode == -signal.SIGKILL, (out, err)
    area = int(out.split()[0], 16)
    assert in_poll(t.pid, worker)
    with Memory(t.pid) as mem:
        assert mem.read(area, len(stub.SIGNATURE)) == stub.SIGNATURE  # left behind, the worker inside
    cli_ok("apply", "--pid", t.pid, patch)
    assert in_poll(t.pid, worker), "the apply took longer than the poll: nothing was tested"
    deadline = time.monotonic() + POLL_MS / 1000 + 5
    while in_poll(t.pid, worker):
        assert time.monotonic() < deadline, "the worker never left its poll"
        time.sleep(0.05)
    time.sleep(0.2)  # it runs the stub's restore code and goes back to its loop
    wait_running(t)
    cli_ok("revert", "--pid", t.pid, "--all")
    finish(t)


# -- protocol A (a hotpatch-ready target) ----------------------------------------------------------------

READY_PATCH_SOURCE = """\
#include <hotpatch.h>
long compute(long x);
long compute(long x) { return HOTPATCH_ORIGINAL(compute)(x) + 1; }
"""
READY_PAD = 14  # NOPs before the entry of a function built with -fpatchable-function-entry=16,14
SHORT_JUMP = b"\xeb\xf9"  # jmp entry-5 (DESIGN.md §4)
SETTLE_S = 0.02


class ReadyTarget(Target):
    """kill_ready running: ``function`` is the entry of ``compute``; ``original`` its bytes from READY_PAD
    before the entry to its end (the padding the patch writes into, then the function)."""


@pytest.fixture(scope="module")
def ready_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """kill_ready built with ``hotpatch cflags``, and the patch file for it (built once for the module)."""
    tmp = tmp_path_factory.mktemp("ready")
    flags = run_cli("cflags").stdout.split()
    assert flags, "hotpatch cflags printed nothing"
    exe = compile_program(TARGETS / "kill_ready.c", tmp / "kill_ready", *flags)
    src = tmp / "ready_patch.c"
    src.write_text(READY_PATCH_SOURCE)
    patch = tmp / "ready_patch.hp"
    cli_ok("build", src, "--target", exe, "-o", patch, "--name", PATCH_NAME)
    return exe, patch


def start_ready_target(ready_build: tuple[Path, Path], procs: Procs) -> tuple[ReadyTarget, Path]:
    """kill_ready running with its four checking threads, and its patch file."""
    exe, patch = ready_build
    code = function_bytes(exe, "compute")
    with open(exe, "rb") as f:  # the padding before the entry, from the file
        elf = ELFFile(f)
        sym = elf.get_section_by_name(".symtab").get_symbol_by_name("compute")[0]  # type: ignore[union-attr]
        text = elf.get_section_by_name(".text")
        assert text is not None
        f.seek(int(text["sh_offset"]) + int(sym["st_value"]) - int(text["sh_addr"]) - READY_PAD)
        pad = f.read(READY_PAD)
    assert pad == b"\x90" * READY_PAD and code[:2] == b"\x90\x90", "not a patchable-entry layout"
    proc = procs.start(exe, stdin=subprocess.PIPE)
    line = wait_for_line(proc, lambda s: s.startswith("addr compute "))
    wait_for_line(proc, lambda s: s.strip() == "ready")
    t = ReadyTarget(proc, int(line.split()[2], 16), pad + code)
    assert ready_code(t) == t.original
    return t, patch


def ready_code(t: ReadyTarget) -> bytes:
    """The target's bytes of ``compute``, its padding included."""
    with open(f"/proc/{t.pid}/mem", "rb") as mem:
        mem.seek(t.function - READY_PAD)
        return mem.read(len(t.original))


def ready_code_state(t: ReadyTarget) -> str:
    """``original`` (the entry's two NOPs; the padding original, or a retained ``E9`` into executable memory
    no thread can reach any more) or ``jump`` (``EB F9`` at the entry, ``E9 rel32`` into executable memory
    in the padding); everything else untouched. Fails on anything else (a torn key, a
    half-written padding under a short jump)."""
    code, orig, e = ready_code(t), t.original, READY_PAD
    assert code[: e - JUMP_LEN] == orig[: e - JUMP_LEN], f"padding changed before entry-5: {code.hex()}"
    assert code[e + 2 :] == orig[e + 2 :], f"bytes after the key changed: {code.hex()}"
    pad, key = code[e - JUMP_LEN : e], code[e : e + 2]
    if pad != orig[e - JUMP_LEN : e]:
        assert pad[0] == 0xE9, f"padding neither original nor a jump: {code.hex()}"
        dest = t.function + int.from_bytes(pad[1:], "little", signed=True)
        assert any(lo <= dest < hi for lo, hi in executable_ranges(t.pid)), f"jump to non-executable {dest:#x}"
    if key == orig[e : e + 2]:
        return "original"
    assert key == SHORT_JUMP and pad[0] == 0xE9, f"neither the original key nor a short jump: {code.hex()}"
    return "jump"


def main_in_read(pid: int) -> bool:
    """True when the main thread is blocked in read(2) (/proc/PID/task/PID/syscall starts with 0)."""
    with open(f"/proc/{pid}/task/{pid}/syscall") as f:
        return f.read().split()[0] == "0"


def settle(t: ReadyTarget, timeout: float = 5.0) -> None:
    """Wait until a commit program a killed tool left running has ended on its own: the main thread (the
    only one asleep, so the one hotpatch runs the program in) is back in its read(2) and the code of
    ``compute`` did not change for SETTLE_S. (The program's first commit in a process registers for
    membarrier first, which can take tens of milliseconds on a loaded machine.)"""
    deadline = time.monotonic() + timeout
    before = ready_code(t)
    while True:
        was_reading = main_in_read(t.pid)
        time.sleep(SETTLE_S)
        now = ready_code(t)
        if now == before and was_reading and main_in_read(t.pid):
            return
        assert time.monotonic() < deadline, f"the program never ended: code of compute {now.hex()}"
        before = now


def probe(t: ReadyTarget) -> list[tuple[int, int]]:
    """Per worker: (calls made, 1 when its last result was the patched one)."""
    assert t.proc.poll() is None, target_failure(t)
    assert t.proc.stdin is not None
    t.proc.stdin.write(b"probe\n")
    t.proc.stdin.flush()
    line = wait_for_line(t.proc, lambda s: s.startswith(("probe", "WRONG")))
    assert line.startswith("probe"), line
    return [(int(c), int(k)) for c, k in (w.split(":") for w in line.split()[1:])]


def ready_behaviour(t: ReadyTarget, timeout: float = 5.0) -> str:
    """``old`` or ``new``: what every worker's calls begun after now return (a worker counts once it made two
    more calls: its latest then started after this look); fails when the workers disagree."""
    first = probe(t)
    deadline = time.monotonic() + timeout
    while True:
        now = probe(t)
        if all(c >= c0 + 2 for (c, _), (c0, _) in zip(now, first, strict=True)):
            break
        assert time.monotonic() < deadline, f"workers made no calls: {first} then {now}"
        time.sleep(0.005)
    kinds = {k for _, k in now}
    assert len(kinds) == 1, f"workers disagree on compute: {now}"
    return "new" if kinds == {1} else "old"


def ready_check_consistent(t: ReadyTarget, cli: bool = False) -> str:
    """After the code settled: the target runs untraced, the code is fully old or new, the workers get the
    matching value, and status (``hotpatch status`` when ``cli``, else the same in-process: quicker) agrees;
    returns ``applied`` or ``absent``."""
    wait_running(t)
    settle(t)
    code = ready_code_state(t)
    st = status_state(t) if cli else api_state(t)
    assert (st, code) in (("applied", "jump"), ("absent", "original")), f"status {st} but code {code}"
    assert ready_behaviour(t) == {"jump": "new", "original": "old"}[code]
    assert ready_code_state(t) == code
    wait_running(t)
    return st


def cli_protocol_a(*args: object) -> None:
    """Run an apply or revert that must succeed with protocol A."""
    out = cli_ok(*args)
    assert "protocol A" in out, f"hotpatch {' '.join(map(str, args))}: {out.strip()}"


def api_apply(t: ReadyTarget, patch: Path) -> None:
    """Apply in-process; it must succeed with protocol A."""
    with hotpatch.attach(t.pid) as h:
        assert h.apply(str(patch)).protocol == "A"


def api_revert(t: ReadyTarget) -> None:
    """Revert everything in-process; it must succeed with protocol A."""
    with hotpatch.attach(t.pid) as h:
        assert [r.protocol for r in h.revert(None)] == ["A"]


def ready_round_trip(t: ReadyTarget, patch: Path, state: str) -> None:
    """From ``state``, revert (the command line) and apply (in-process) with protocol A, each checked, and
    end with nothing applied."""
    if state == "applied":
        cli_protocol_a("revert", "--pid", t.pid, "--all")
        assert ready_check_consistent(t) == "absent"
        api_apply(t, patch)
    else:
        cli_protocol_a("apply", "--pid", t.pid, patch)
    assert ready_check_consistent(t) == "applied"
    api_revert(t)
    assert ready_check_consistent(t) == "absent"


READY_POINTS = [  # (command, function after whose first call the tool dies, the state the target ends in)
    ("apply", "hotpatch.livecommit.LiveCommit:_launch", "applied"),  # the program runs on its own
    ("apply", "hotpatch.process.live.LiveWorld:seize_thread", "absent"),  # A seizes the program's thread alone
    ("apply", "hotpatch.livecommit.LiveCommit:_runner", "absent"),  # the program's thread stopped, not launched
    ("apply", "hotpatch.livecommit.LiveCommit:_follow", "applied"),  # program done, its pages still mapped
    ("apply", "hotpatch.livecommit.LiveCommit:_unmap", "applied"),  # program done, the record not updated
    ("revert", "hotpatch.livecommit.LiveCommit:_launch", "absent"),
    ("revert", "hotpatch.livecommit.LiveCommit:_follow", "absent"),
]


@pytest.mark.parametrize(
    ("command", "where", "expected"),
    READY_POINTS,
    ids=[f"{c}-{w.rpartition('.')[2].replace(':', '.')}" for c, w, _ in READY_POINTS],
)
def test_sigkill_of_no_stop_commit(
    ready_build: tuple[Path, Path], tmp_path: Path, procs: Procs, command: str, where: str, expected: str
) -> None:
    """Protocol A on a hotpatch-ready target: the tool dies right after it launched the commit program in a
    thread of the target (or at another exact point). The program completes on its own: the target runs
    untraced, the code is fully old or fully new as the point implies, every worker gets the matching value,
    status agrees, and apply and revert then work with protocol A; no thread ever saw a wrong value."""
    t, patch = start_ready_target(ready_build, procs)
    if command == "revert":
        api_apply(t, patch)
        assert ready_check_consistent(t) == "applied"
        args: list[object] = ["revert", "--pid", t.pid, "--all"]
    else:
        args = ["apply", "--pid", t.pid, patch]
    run_and_die_after(procs, tmp_path, where, *args)
    assert ready_check_consistent(t, cli=True) == expected
    ready_round_trip(t, patch, expected)
    finish(t)


READY_FRACTIONS = (0.5, 0.8, 0.9, 0.95, 0.98)
READY_COMMIT_POINTS = 5  # kills spread over the time the main thread is traced (injections, commit)
READY_AFTER = (0.0, 0.0005)


def test_sigkill_of_no_stop_apply_at_timed_points(ready_build: tuple[Path, Path], procs: Procs) -> None:
    """Protocol A on a hotpatch-ready target: SIGKILL of apply at 12 timed points (fractions of its
    duration, into the windows where the main thread — the one injections and the commit program use; A
    traces no other — is traced, after them): each time the code settles fully old
    or fully new with the matching behaviour and status, never partial, and the next revert or apply works
    with protocol A."""
    t, patch = start_ready_target(ready_build, procs)
    apply_args = ["apply", "--pid", str(t.pid), str(patch)]
    normal = []
    for _ in range(3):
        normal.append(run_watched(procs, t, apply_args, watched=t.pid))
        assert ready_check_consistent(t, cli=True) == "applied"
        api_revert(t)
        assert ready_check_consistent(t) == "absent"
    seen = {"applied": 0, "absent": 0, "finished": 0}
    outcomes = []
    for point in kill_points(normal, READY_FRACTIONS, READY_COMMIT_POINTS, READY_AFTER):
        try:
            killed = kill_tool(procs, t, apply_args, point, watched=t.pid)
            state = ready_check_consistent(t)
            seen[state if killed else "finished"] += 1
            outcomes.append((point[0], round(point[1] * 1e3, 2), state if killed else "finished"))
            if state == "absent":  # apply works after the kill
                api_apply(t, patch)
                assert ready_check_consistent(t) == "applied"
            api_revert(t)  # revert works after the kill (or the apply)
            assert ready_code_state(t) == "original" and ready_behaviour(t) == "old"
        except AssertionError as e:
            explain(e, t, f"after SIGKILL of apply at {point}")
            raise
    assert seen["applied"] and seen["absent"], f"kills never landed on both sides of the commit: {outcomes}"
    print(f"kills of a protocol A apply (kind, ms, outcome): {outcomes}")
    finish(t)


def test_command_waiting_for_the_lock_when_a_no_stop_apply_is_killed(
    ready_build: tuple[Path, Path], tmp_path: Path, procs: Procs
) -> None:
    """A revert waiting for the lock while an apply launches protocol A's program and is SIGKILLed at once:
    the revert runs before the program's first store (its membarrier registration takes ms), when the code
    still looks untouched. It must wait for the program (a thread's RIP is in its page) and then see the
    patch applied — not drop the record and free the patch's memory, after which the program wrote jumps
    into nothing (the target died of SIGSEGV or hung on `EB F9` over restored NOPs: 5 of 5 runs before
    ``livecommit.settle_programs``)."""
    t, patch = start_ready_target(ready_build, procs)
    script = tmp_path / "die_after.py"
    script.write_text(FAULT_SCRIPT)
    tool1 = procs.start(
        sys.executable,
        script,
        "hotpatch.livecommit.LiveCommit:_launch",
        "apply",
        "--pid",
        t.pid,
        patch,
        env={**os.environ, "HOTPATCH_TEST_DELAY_S": "1.0"},
    )
    deadline = time.monotonic() + 30
    while tracing_process(t.pid) != tool1.pid:  # tool 1 holds the lock and the seized threads, before _launch
        assert tool1.poll() is None and time.monotonic() < deadline, "tool 1 never reached the commit"
        time.sleep(0.01)
    out = cli_ok("revert", "--pid", t.pid, "--all")  # waits for the lock, runs the moment tool 1 dies
    assert tool1.wait(timeout=30) == -signal.SIGKILL
    assert "reverted" in out and "protocol A" in out, out
    assert ready_check_consistent(t, cli=True) == "absent"
    ready_round_trip(t, patch, "absent")
    finish(t)

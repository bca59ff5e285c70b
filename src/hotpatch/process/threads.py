"""Seizing, stopping and releasing every thread of a target (protocol B's mechanics, DESIGN.md §4).

Follows research §3.1: ``PTRACE_SEIZE`` every tid of ``/proc/PID/task`` with ``PTRACE_O_TRACECLONE``,
rescanning until a scan finds nothing new; ``PTRACE_INTERRUPT`` each; wait for each stop. A thread that
reports a signal-delivery-stop instead keeps that signal, which is re-injected when it is released
(``PTRACE_DETACH`` with the signal), so no signal is lost. A group-stop is left in place. Threads created
meanwhile arrive through ``PTRACE_EVENT_CLONE`` and are stopped too. ``PTRACE_O_EXITKILL`` is never set, so
if the tool dies the kernel detaches every thread and the target runs on (ptrace(2), "PTRACE_SEIZE").
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Final

from ..errors import TargetError
from . import ptrace, tracer
from .ptrace import PtraceError, Regs

GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
ERESTART_CODES = frozenset({-512, -513, -514, -516})  # ERESTARTSYS/NOINTR/NOHAND/_RESTARTBLOCK
STOP_TIMEOUT_S = 2.0
RELEASE_TIMEOUT_S = 60.0
BATCH_BOOST_MIN = 8  # threads to stop at once from which the interrupts are sent at SCHED_FIFO
"""How long :meth:`World.release` waits for a thread it interrupted to stop, so as to detach it: a thread
that cannot stop now (in a killable-only sleep such as a vfork parent's, or starved of CPU) still takes the
interrupt's stop later, and with the tracer alive (an API caller) nobody would resume it."""

USER32_CS: Final = 0x23  # __USER32_CS: a thread running 32-bit code (arch/x86/include/asm/segment.h)
USER_CS: Final = 0x33  # __USER_CS: 64-bit code


class Thread:
    """One seized thread. ``regs`` is valid while it is stopped (``dirty``: changed, to be written back);
    ``signal`` is re-injected on release; ``extra_signals`` are re-raised with tgkill on release."""

    __slots__ = ("dirty", "extra_signals", "group_stop", "regs", "signal", "stopped", "tid")

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.stopped = False
        self.signal = 0
        self.group_stop = False
        self.regs: Regs | None = None
        self.dirty = False
        self.extra_signals: list[int] = []

    @property
    def in_syscall(self) -> bool:
        """True when the thread was stopped inside a system call that the kernel will restart or finish."""
        assert self.regs is not None
        return self.regs.orig_rax != 0xFFFF_FFFF_FFFF_FFFF

    @property
    def restarting(self) -> bool:
        """True when the kernel will rewind RIP by 2 to restart the syscall on resume (research §4.3)."""
        assert self.regs is not None
        rax = self.regs.rax - (1 << 64) if self.regs.rax >= 1 << 63 else self.regs.rax
        return self.in_syscall and rax in ERESTART_CODES

    @property
    def word(self) -> int:
        """The stopped thread's word in bytes: 4 when it runs 32-bit code (``cs`` = USER32_CS), else 8."""
        assert self.regs is not None
        return 4 if self.regs.cs & 0xFFFF == USER32_CS else 8

    @property
    def next_pcs(self) -> tuple[int, ...]:
        """Where the stopped thread executes next: RIP, and RIP - 2 as well when it is :attr:`restarting`."""
        assert self.regs is not None
        rip = self.regs.rip
        return (rip, rip - 2) if self.restarting else (rip,)


def list_tids(pid: int) -> list[int]:
    """The thread ids of ``pid`` from /proc/PID/task. Raises TargetError when the process is gone."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise TargetError(f"no process with PID {pid}") from None


def _status_number(path: str, field: str) -> int:
    """The number after ``field`` (e.g. ``"TracerPid:"``) in the proc(5) status file ``path``; 0 when absent or
    the file is gone."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tracer_of(pid: int, tid: int | None = None) -> int:
    """TracerPid of thread ``tid`` (default: the main thread) of ``pid`` (proc(5)); 0 when untraced or gone."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    return _status_number(path, "TracerPid:")


def tracing_process(pid: int, tid: int | None = None) -> int:
    """The PID of the process one of whose threads traces thread ``tid`` (default: the main thread) of
    ``pid``: TracerPid names the tracing *thread* (proc(5); fs/proc/array.c prints ``task_pid_nr_ns`` of
    the tracer), and hotpatch traces from a thread of its own (:mod:`hotpatch.process.tracer`). 0 when
    untraced or gone."""
    tracer = tracer_of(pid, tid)
    return _status_number(f"/proc/{tracer}/status", "Tgid:") if tracer else 0


def thread_state(pid: int, tid: int) -> str:
    """The scheduler state letter of thread ``tid`` (proc(5), /proc/PID/task/TID/stat: R running, S sleeping,
    D disk sleep, T/t stopped, Z zombie); ``X`` when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def thread_count(pid: int) -> int:
    """The number of threads of ``pid`` (``Threads:`` of /proc/PID/status, proc(5): ``signal->nr_threads``,
    which counts a traced thread until its tracer reaps it); 0 when the process is gone."""
    return _status_number(f"/proc/{pid}/status", "Threads:")


def is_zombie(pid: int, tid: int) -> bool:
    """True when thread ``tid`` of ``pid`` is a zombie or gone."""
    return thread_state(pid, tid) in ("Z", "X")


class World:
    """All threads of one target, seized for the lifetime of the object.

    ``seize()`` attaches without stopping; ``stop()`` stops every thread and reads its registers;
    ``release()`` detaches all, re-injecting kept signals. With ``exit_detaches`` on a thread made by
    :func:`hotpatch.process.tracer.run_as_tracer` (and the first such World there), ``release()`` only writes
    registers back and leaves the detaching to the thread's exit; elsewhere the flag is ignored.
    Raises TargetError when the target is gone, not traceable, or a thread cannot be stopped in time.
    """

    def __init__(self, pid: int, exit_detaches: bool = False) -> None:
        self.pid = pid
        self.exit_detaches = exit_detaches and tracer.claim_exit()
        self.threads: dict[int, Thread] = {}
        self.longest_stop_us = 0.0  # the longest window in which threads were stopped, in µs
        self._stopped_at: float | None = None
        self._old_mask: set[int | signal.Signals] | None = None
        self._old_sched: tuple[int, int] | None = None

    # -- attach -------------------------------------------------------------------------------------
    def seize(self) -> None:
        """Seize every thread, rescanning /proc/PID/task until a scan adds none (research §3.1)."""
        self._block()
        while True:
            new = [t for t in list_tids(self.pid) if t not in self.threads]
            if not new:
                break
            for tid in new:
                self._seize_one(tid)
        if not self.threads:
            raise TargetError(f"PID {self.pid} has no live thread to trace")

    def seize_thread(self, tid: int) -> None:
        """Seize one thread only (for injecting syscalls while the others run on)."""
        self._block()
        self._seize_one(tid)
        if tid not in self.threads:
            raise TargetError(f"thread {tid} of PID {self.pid} is gone")

    @property
    def seize_options(self) -> int:
        """The ``PTRACE_SEIZE`` options every thread gets (ptrace(2)): clone events, syscall-stops marked."""
        return ptrace.PTRACE_O_TRACECLONE | ptrace.PTRACE_O_TRACESYSGOOD

    def _seize_one(self, tid: int) -> None:
        try:
            ptrace.seize(tid, self.seize_options)
        except PtraceError as e:
            if e.errno == errno.ESRCH or is_zombie(self.pid, tid):
                return
            if e.errno == errno.EPERM and tracer_of(self.pid, tid) in (os.getpid(), threading.get_native_id()):
                # already ours: cloned by a thread seized with PTRACE_O_TRACECLONE, its PTRACE_EVENT_CLONE
                # not read yet (threads come and go while we scan /proc/PID/task)
                self.threads[tid] = Thread(tid)
                return
            if e.errno == errno.EPERM:
                tracer = tracer_of(self.pid)
                if tracer and tracer != os.getpid():
                    raise TargetError(f"PID {self.pid} is already traced by PID {tracer}") from None
                raise TargetError(f"not permitted to trace PID {self.pid} (ptrace: Operation not permitted)") from None
            raise TargetError(f"cannot trace thread {tid} of PID {self.pid}: {e.strerror}") from None
        self.threads[tid] = Thread(tid)

    # -- stop ---------------------------------------------------------------------------------------
    def stop(self, tids: list[int] | None = None) -> None:
        """Interrupt the given (default: all) seized threads and wait until each is stopped.

        Newly cloned threads are stopped too. With every thread (default), the stop is complete when the
        process's thread count (``Threads:``, proc(5)) equals the threads held, all stopped: no clone can be
        under way then. Otherwise ``/proc/PID/task`` is rescanned and any thread not yet seized is seized and
        stopped (a clone that was under way when its parent was seized, research §3.1). A thread that reports
        a stop inside ``clone()`` is let finish it and stopped again. Raises TargetError on timeout (after
        releasing nothing: the caller's context manager releases) or when the process exits.
        """
        want = list(self.threads) if tids is None else tids
        if self._stopped_at is None:
            self._stopped_at = time.perf_counter()
        # Many threads: the interrupts go out back to back at SCHED_FIFO (threads they wake do not preempt the
        # loop), then the CPUs are left to the threads to reach their stops, and the tool is boosted again once
        # all are stopped (bench_pause.py --protocol stop-the-world --threads 512, 2 runs each, noisy: 10.0-10.3
        # ms per thread against 10.5-12.4 ms when boosting throughout or only once all are stopped).
        many = len(want) > BATCH_BOOST_MIN and self._old_sched is None  # (a caller's boost is kept)
        if many:
            self.boost()
        for tid in want:
            th = self.threads.get(tid)
            if th is None or th.stopped:
                continue
            try:
                ptrace.interrupt(tid)
            except PtraceError as e:
                if e.errno != errno.ESRCH:
                    raise
        if many:
            self._unboost()
        for tid in want:
            if tid in self.threads:
                self._wait_stopped(tid)
        if tids is None:
            while True:
                pending = [t for t, th in self.threads.items() if not th.stopped]
                if pending:
                    self.stop(pending)
                elif thread_count(self.pid) == len(self.threads):
                    break  # every thread of the process is one of ours, stopped (cheaper than a rescan)
                else:
                    self.seize()  # one made by a clone that was under way when its parent was seized
                    if all(th.stopped for th in self.threads.values()):
                        break
        if not self.threads:
            raise TargetError(f"PID {self.pid} exited")
        # Boosted only now: the interrupted threads need the CPUs to reach their stops (a SCHED_FIFO tool
        # polling for them would keep one of them); from here on nothing of the target competes with the tool.
        self.boost()

    def _wait_stopped(self, tid: int, timeout: float = STOP_TIMEOUT_S) -> None:
        th = self.threads[tid]
        deadline = time.monotonic() + timeout
        while not th.stopped and tid in self.threads:  # (its exit status removes it)
            try:
                status = ptrace.wait_until(tid, deadline)
            except ChildProcessError:
                self.threads.pop(tid, None)
                return
            if status is None:
                raise TargetError(f"thread {tid} of PID {self.pid} did not stop within {timeout:g} s")
            self._on_status(th, status)

    def _on_status(self, th: Thread, status: int) -> None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            del self.threads[th.tid]
            return
        sig = os.WSTOPSIG(status)
        event = ptrace.stop_event(status)
        if event == ptrace.PTRACE_EVENT_CLONE:
            child = ptrace.event_msg(th.tid)
            if child not in self.threads:
                self.threads[child] = Thread(child)
            # A stop inside clone(): the call is not finished, so its registers are no place to inject a system
            # call into (the next syscall-exit stop would be clone's) nor a RIP to judge. It also consumed our
            # interrupt ("any trap clears pending STOP trap", kernel/signal.c ptrace_stop): let clone() return
            # and ask again.
            try:
                ptrace.cont(th.tid)
                ptrace.interrupt(th.tid)
            except PtraceError:
                pass  # it died: its exit status comes next
            return
        elif event == ptrace.PTRACE_EVENT_STOP:
            th.group_stop = sig in GROUP_STOP_SIGNALS
        elif event == 0:
            # signal-delivery-stop: keep the signal, re-inject it on release (research §3.1)
            th.signal = sig
        th.stopped = True
        th.regs = ptrace.get_regs(th.tid)
        th.dirty = False

    # -- registers ----------------------------------------------------------------------------------
    def set_regs(self, tid: int, regs: Regs) -> None:
        """Replace a stopped thread's registers; written back when it is resumed or released."""
        th = self.threads[tid]
        th.regs = regs
        th.dirty = True

    def stopped_threads(self) -> Iterator[Thread]:
        """Every thread currently stopped (all of them after :meth:`stop`)."""
        return (th for th in self.threads.values() if th.stopped)

    # -- release ------------------------------------------------------------------------------------
    def _flush(self, th: Thread) -> None:
        if th.dirty and th.regs is not None:
            ptrace.set_regs(th.tid, th.regs)
            th.dirty = False

    def release(self) -> None:
        """Detach from every thread, delivering kept signals; never raises for threads that vanished. A thread
        still running is interrupted and waited for (up to RELEASE_TIMEOUT_S), as PTRACE_DETACH needs a stop.
        With ``exit_detaches``, registers are written back and only threads with a kept signal are detached
        here (the signal of their stop may no longer be the one kept); the rest go when the tracer thread
        exits, which also keeps the tool's SCHED_FIFO boost until then."""
        for th in list(self.threads.values()):
            try:
                if th.stopped:
                    self._flush(th)
                    if th.signal or not self.exit_detaches:
                        ptrace.detach(th.tid, th.signal)
                elif not self.exit_detaches:
                    # a running tracee must be stopped before PTRACE_DETACH
                    ptrace.interrupt(th.tid)
                    self._wait_stopped(th.tid, RELEASE_TIMEOUT_S)
                    if th.tid in self.threads:
                        ptrace.detach(th.tid, th.signal)
            except (PtraceError, TargetError):
                # gone: reap its exit if it is a zombie still traced by us, or its thread group is never
                # reaped while we live (an in-process caller that is also its parent would wait forever)
                with contextlib.suppress(ChildProcessError):
                    ptrace.poll_tid(th.tid)
            self._after_release(th)
        self.threads.clear()
        self._running()
        if self._old_mask is not None:
            ptrace.restore_sigmask(self._old_mask)
            self._old_mask = None

    # -- the tool's own scheduling ------------------------------------------------------------------
    def _block(self) -> None:
        if self._old_mask is None:
            self._old_mask = ptrace.block_sigchld()

    def boost(self) -> None:
        """Run the tool as SCHED_FIFO while target threads are stopped, when allowed (root or
        CAP_SYS_NICE): the stop window then does not wait behind the target's runnable threads (research §7.1
        measured its latencies with SCHED_FIFO). Without the permission nothing changes; a second call does
        nothing."""
        if self._old_sched is not None:
            return
        try:
            old = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            self._old_sched = old
        except OSError:
            self._old_sched = None

    def _unboost(self) -> None:
        """Back to the scheduling policy :meth:`boost` replaced (nothing if not boosted)."""
        if self._old_sched is not None:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, self._old_sched[0], os.sched_param(self._old_sched[1]))
            self._old_sched = None

    def _running(self) -> None:
        """Every thread runs again (or will, at the tracer thread's exit): close the stop window, drop the
        boost (kept to the exit with ``exit_detaches``)."""
        if self._stopped_at is not None:
            self.longest_stop_us = max(self.longest_stop_us, (time.perf_counter() - self._stopped_at) * 1e6)
            self._stopped_at = None
        if not self.exit_detaches:
            self._unboost()

    def _after_release(self, th: Thread) -> None:
        for sig in th.extra_signals:
            ptrace.tgkill(self.pid, th.tid, sig)
        th.extra_signals.clear()
        th.signal = 0

"""Every thread seized and left running: the mechanics of protocols A and R (DESIGN.md §4, research §0 "A").

:class:`LiveWorld` seizes every thread of the target with ``PTRACE_SEIZE`` (no stop, ``PTRACE_O_TRACECLONE``,
never ``EXITKILL``) and then only reacts to what the threads report:

* a signal-delivery-stop: the signal is re-injected at once (``PTRACE_CONT`` with it), so a signal
  flood only costs each thread one tracer round trip per signal;
* ``PTRACE_EVENT_CLONE``: the new thread is traced automatically and let go at its first stop; the parent's
  stop inside ``clone()`` is no place to look at a thread, so one asked to stop there is let finish the call
  and interrupted again;
* a group-stop (SIGSTOP…): left stopped, detached as it is.

A thread is stopped only when asked (:meth:`stop_one`), one at a time, and each stop's length — from the
moment the tracer sees it stopped to its resumption; a thread waiting for a CPU stops only when it gets one —
is kept per thread in ``longest_by_tid``, the number of its stops in ``stops_by_tid``. To leave,
:meth:`detach_all` stops each thread alone just long enough for ``PTRACE_DETACH`` (which needs a stopped
tracee, ptrace(2)) — unless the world was made with ``exit_detaches`` on a tracer thread
(:mod:`hotpatch.process.tracer`), whose exit detaches every thread with none stopped.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from ..errors import TargetError
from . import ptrace
from .maps import read_maps
from .memory import Memory
from .ptrace import PtraceError
from .stackview import ThreadView, look
from .threads import GROUP_STOP_SIGNALS, Thread, World
from .tracer import run_as_tracer

SPIN_S = 0.0002  # seconds polling the one awaited thread before sleeping on SIGCHLD
LIVE_STOP_TIMEOUT_S = 10.0
"""How long :meth:`LiveWorld.stop_one` waits for one thread's stop. Longer than protocol B's STOP_TIMEOUT_S:
no other thread is held meanwhile, and a nice-19 thread on a saturated machine can wait seconds for a CPU
(measured under load 10-130 while tests ran: 2 s was not always enough)."""


class LiveWorld(World):
    """All threads of ``pid`` seized and running; ``longest_by_tid`` holds, per thread, the longest stop (µs)
    this object asked for. ``exit_detaches``: as for :class:`World`. Raises TargetError as :class:`World` does."""

    def __init__(self, pid: int, exit_detaches: bool = False) -> None:
        super().__init__(pid, exit_detaches)
        self.longest_by_tid: dict[int, float] = {}  # tid -> its longest stop (µs)
        self.stops_by_tid: dict[int, int] = {}  # tid -> how many times stop_one stopped it
        self.samples_by_tid: dict[int, int] = {}  # tid -> how many times it was looked at through a perf sample
        self._wanted: dict[int, float] = {}  # tid -> perf_counter() when its stop was seen (0: asked, not seen)
        self.on_fork: Callable[[int], None] | None = None
        """Set before :meth:`seize`: threads are seized with ``PTRACE_O_TRACEFORK`` too, and this is called with
        the PID of each child a thread forks (attached to this tracer and starting in a ptrace-stop; the
        callback must release it and never raise), after the forking thread was let go."""

    @property
    def seize_options(self) -> int:
        """:attr:`World.seize_options`, plus ``PTRACE_O_TRACEFORK`` when :attr:`on_fork` is set."""
        return super().seize_options | (ptrace.PTRACE_O_TRACEFORK if self.on_fork else 0)

    # -- events -------------------------------------------------------------------------------------
    def pump(self) -> None:
        """Handle every status the running threads have reported."""
        for tid in list(self.threads):
            th = self.threads.get(tid)
            while th is not None and not th.stopped:
                try:
                    status = ptrace.poll_tid(tid)
                except ChildProcessError:
                    self.threads.pop(tid, None)
                    break
                if status is None:
                    break
                self._on_live_status(th, status)

    def _on_live_status(self, th: Thread, status: int) -> None:
        tid = th.tid
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.threads.pop(tid, None)
            return
        sig = os.WSTOPSIG(status)
        event = ptrace.stop_event(status)
        try:
            if event == ptrace.PTRACE_EVENT_STOP:
                if tid in self._wanted:
                    self._mark_stopped(th)
                elif sig in GROUP_STOP_SIGNALS:
                    th.group_stop = True
                    self._mark_stopped(th)
                else:  # a new thread's first stop, or a late interrupt: let it run
                    ptrace.cont(tid)
            elif event == 0:
                if tid in self._wanted:  # stopped anyway: inspect it now, deliver the signal on resume
                    th.signal = sig
                    self._mark_stopped(th)
                else:
                    ptrace.cont(tid, sig)
            else:  # an event stop inside a system call (clone, fork): no place to inject or judge a RIP
                child = ptrace.event_msg(tid) if event in (ptrace.PTRACE_EVENT_CLONE, ptrace.PTRACE_EVENT_FORK) else 0
                if event == ptrace.PTRACE_EVENT_CLONE:
                    self.threads.setdefault(child, Thread(child))
                ptrace.cont(tid)
                if tid in self._wanted:
                    # this stop consumed our PTRACE_INTERRUPT ("any trap clears pending STOP trap",
                    # kernel/signal.c ptrace_stop): ask again, for a stop once the call has returned
                    ptrace.interrupt(tid)
                if event == ptrace.PTRACE_EVENT_FORK and self.on_fork is not None:
                    self.on_fork(child)
        except PtraceError:
            self.threads.pop(tid, None)  # it died meanwhile

    def _mark_stopped(self, th: Thread) -> None:
        if th.tid in self._wanted:
            self._wanted[th.tid] = time.perf_counter()
        th.stopped = True
        th.regs = ptrace.get_regs(th.tid)
        th.dirty = False

    # -- one thread at a time -----------------------------------------------------------------------
    def stop_one(self, tid: int) -> Thread | None:
        """Interrupt thread ``tid`` alone and wait for its stop (the others' events are served meanwhile).

        Returns the stopped thread, or None when it exited. Raises TargetError when it does not stop within
        LIVE_STOP_TIMEOUT_S.
        """
        th = self.threads.get(tid)
        if th is None:
            return None
        if th.stopped:
            return th
        self._wanted[tid] = 0.0
        self.stops_by_tid[tid] = self.stops_by_tid.get(tid, 0) + 1
        try:
            ptrace.interrupt(tid)
        except PtraceError:
            self.threads.pop(tid, None)
            self._wanted.pop(tid, None)
            return None
        deadline = time.monotonic() + LIVE_STOP_TIMEOUT_S
        spin_until = time.monotonic() + SPIN_S
        while tid in self.threads and not th.stopped:
            try:
                status = ptrace.poll_tid(tid)
            except ChildProcessError:
                self.threads.pop(tid, None)
                break
            if status is not None:
                self._on_live_status(th, status)
                continue
            now = time.monotonic()
            if now < spin_until:
                continue
            self.pump()
            if now > deadline:
                raise TargetError(f"thread {tid} of PID {self.pid} did not stop within {LIVE_STOP_TIMEOUT_S:g} s")
            signal.sigtimedwait([signal.SIGCHLD], 0.001)
        if tid not in self.threads:
            self._wanted.pop(tid, None)
            return None
        return th

    def resume_one(self, tid: int) -> None:
        """Let a thread stopped by :meth:`stop_one` run again (with its registers written back and a signal
        it reported re-injected); its stop length is accounted in ``longest_by_tid``."""
        th = self.threads.get(tid)
        started = self._wanted.pop(tid, None)
        if th is None or not th.stopped or th.group_stop:
            return
        try:
            self._flush(th)
            ptrace.cont(tid, th.signal)
        except PtraceError:
            self.threads.pop(tid, None)
        th.stopped = False
        self._after_release(th)
        self._stopped_for(th.tid, started)

    def _stopped_for(self, tid: int, started: float | None) -> None:
        """Account the stop of ``tid`` that was first seen at ``started`` (perf_counter) and ends now."""
        if started:
            us = (time.perf_counter() - started) * 1e6
            self.longest_by_tid[tid] = max(us, self.longest_by_tid.get(tid, 0.0))

    # -- many threads -----------------------------------------------------------------------------
    def visit(self, tids: list[int], fn: Callable[[Thread], None], detach: bool = False) -> None:
        """Stop the threads ``tids`` one at a time, call ``fn`` on each and let it go at once (resume, or
        ``PTRACE_DETACH`` when ``detach``): no two threads are ever stopped together (protocol R's rule,
        DESIGN.md §4), each only for ``fn``. Threads that vanish are skipped. Raises TargetError when a thread
        does not stop within LIVE_STOP_TIMEOUT_S."""
        for tid in tids:
            th = self.stop_one(tid)
            if th is not None:
                fn(th)
                self._let_go(th, detach)

    def _let_go(self, th: Thread, detach: bool) -> None:
        """Resume a stopped thread, or detach it (with a signal it reported re-injected)."""
        if not detach:
            self.resume_one(th.tid)
            return
        started = self._wanted.pop(th.tid, None)
        try:
            self._flush(th)
            ptrace.detach(th.tid, th.signal)
        except PtraceError:
            pass
        self._after_release(th)
        self._stopped_for(th.tid, started)
        self.threads.pop(th.tid, None)

    def detach_all(self) -> None:
        """Detach every thread (``PTRACE_DETACH`` needs a stopped tracee: each is stopped alone and detached
        at once); never raises for threads that vanished. With ``exit_detaches`` no thread is stopped: the
        tracer thread's exit detaches them all."""
        if self.exit_detaches:
            self.release()  # registers written back, kept signals delivered; the exit does the rest
            return
        for _ in range(100):
            self.pump()
            if not self.threads:
                break
            try:
                self.visit(list(self.threads), lambda th: None, detach=True)
            except TargetError:
                break
        self.release()  # whatever is left (a thread that would not stop); restores the tool's signal mask

    @property
    def longest_one_us(self) -> float:
        """The longest single-thread stop so far, in µs (0 when none)."""
        return max(self.longest_by_tid.values(), default=0.0)


def thread_views(pid: int, mem: Memory) -> dict[int, ThreadView]:
    """Per thread of ``pid`` (tid → :class:`~hotpatch.process.stackview.ThreadView`), what can bring it
    into code: where it executes next (RIP, and RIP - 2 when the kernel will restart its system call there,
    research §4.3) and its used stack (words of its own width). Each thread is stopped alone for the look, on
    a tracer thread (:mod:`hotpatch.process.tracer`). Raises TargetError as :meth:`LiveWorld.seize` does."""
    maps = read_maps(pid)

    def visit() -> dict[int, ThreadView]:
        out: dict[int, ThreadView] = {}
        world = LiveWorld(pid, exit_detaches=True)
        try:
            world.seize()
            world.visit(list(world.threads), lambda th: out.__setitem__(th.tid, look(mem, maps, th, th.word)))
            return out
        finally:
            world.detach_all()

    return run_as_tracer(visit)

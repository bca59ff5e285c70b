"""``--consistency stack``: switch a patch only when no thread has a replaced function on its stack.

This is the Linux kernel livepatch consistency model (``Documentation/livepatch/livepatch.rst``,
"Consistency model"): a task may switch to the new functions only when none of the patched functions is on
its stack, so no thread ever returns from a new function into old code of the same patch or the other way
round. libpulp waits per library; here the test is per function: only the replaced functions' own bytes
(and, when upgrading, the older version's code) count.

A thread *has a function on its stack* when its RIP or any word of its stack lies inside the function
``(entry, entry + size]`` (:meth:`hotpatch.process.stackview.ThreadView.touches`): a thread standing on the
entry has not entered yet, a return address equal to ``entry + size`` follows a final call. A stack word is a
conservative test: a stale pointer into the function keeps the patch waiting until ``--timeout``, it never
lets it through.

How: first wait, with no thread stopped (perf samples and ``/proc``, :func:`hotpatch.inuse.views`), until a
look at every thread finds none inside; then commit with protocol B, checking every stopped thread's stack
again before the first byte is written (the only moment no thread can enter a function between the check and
the switch); a thread found inside then releases the world untouched and the wait goes on, up to the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

from .errors import TargetError
from .inuse import views
from .process.live import LiveWorld
from .process.maps import read_maps
from .process.memory import Memory
from .process.stackview import ThreadView
from .process.tracer import run_as_tracer

POLL_S = 0.01  # between two looks at the threads while a replaced function is on some stack


class Watched(NamedTuple):
    """A replaced function's code: ``start`` (its entry), ``end`` (entry + size, bytes) and its ``name``."""

    start: int
    end: int
    name: str


class StackBusy(TargetError):
    """A thread has a replaced function on its stack (``tid``, ``name``); nothing was written."""

    def __init__(self, tid: int, name: str) -> None:
        super().__init__(f"thread {tid} has {name} on its stack")
        self.tid, self.name = tid, name


class ConsistencyTimeout(TargetError):
    """``--timeout`` passed with a replaced function still on some thread's stack; nothing was written."""


def busy(view: ThreadView, functions: Sequence[Watched]) -> Watched | None:
    """The first function of ``functions`` the thread of ``view`` has on its stack (or runs), else None."""
    return next((f for f in functions if view.touches(f.start, f.end + 1)), None)


def wait_clear(pid: int, mem: Memory, functions: Sequence[Watched], deadline: float, word: int) -> None:
    """Return once one look at every thread of ``pid`` finds none with a function of ``functions`` on its
    stack (no thread stopped where perf samples or /proc suffice). Raises ConsistencyTimeout naming a thread
    and the function when ``deadline`` (time.monotonic()) passes first, TargetError when ``pid`` cannot be
    traced."""
    run_as_tracer(lambda: _wait(pid, mem, functions, deadline, word))


def _wait(pid: int, mem: Memory, functions: Sequence[Watched], deadline: float, word: int) -> None:
    world = LiveWorld(pid, exit_detaches=True)
    try:
        world.seize()
        while True:
            maps = read_maps(pid)
            found = None
            for tid, view in views(world, mem, maps, sorted(world.threads), word).items():
                hit = busy(view, functions) if view is not None else None
                if hit is not None:
                    found = StackBusy(tid, hit.name)
                    break
            if found is None:
                return
            if time.monotonic() > deadline:
                raise timeout(found)
            time.sleep(POLL_S)
    finally:
        world.detach_all()


def timeout(last: StackBusy) -> ConsistencyTimeout:
    """The error for a deadline passed while ``last`` was true."""
    return ConsistencyTimeout(
        f"--consistency stack: timed out; {last} (nothing was written; retry later or raise --timeout)"
    )

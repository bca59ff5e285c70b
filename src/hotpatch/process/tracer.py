"""A thread of its own for each seizure of a target, released by that thread's exit.

ptrace ties a tracee to the *thread* that attached it (kernel/ptrace.c ``ptrace_check_attach``: ``child->parent
== current``), and when that thread exits the kernel detaches every tracee it still has in one pass
(kernel/exit.c ``exit_notify`` → ``forget_original_parent`` → kernel/ptrace.c ``exit_ptrace``): a tracee in a
ptrace-stop is woken, a pending ``PTRACE_INTERRUPT`` is dropped, a group-stop is kept (``__ptrace_unlink``),
and the signal of a signal-delivery-stop is still delivered (``ptrace_stop`` returns the ``exit_code`` nobody
changed). :func:`run_as_tracer` runs a seizure on such a thread; the :class:`~hotpatch.process.threads.World`
made there with ``exit_detaches=True`` then skips ``PTRACE_DETACH``, which needs a stopped tracee (ptrace(2)):
protocols A and R no longer stop every thread once more just to leave it, and protocol B's 512 threads resume
in one kernel loop instead of 512 system calls. If the tool's own code fails midway, the exit still releases
every thread.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_local = threading.local()
EXIT_WAIT_S = 5.0  # how long run_as_tracer waits for its thread to be gone from the kernel
EXIT_POLL_S = 0.00002
HELD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE, signal.SIGCHLD})
"""Blocked in the calling thread while the tracer thread runs (which inherits the mask, pthread_sigmask(3)):
a Ctrl-C cannot leave the caller while its tracer holds the target, and the SIGCHLD of each ptrace-stop stays
pending for the tracer's ``sigtimedwait`` instead of being discarded by another thread (SIGCHLD's default
action is to ignore it)."""


def run_as_tracer(fn: Callable[[], T], name: str = "hotpatch-tracer") -> T:
    """Run ``fn()`` on a new thread and return its result (or raise its exception) once that thread has
    exited, i.e. once the kernel has detached every tracee it attached. The termination signals and SIGCHLD
    are blocked meanwhile (HELD_SIGNALS) and delivered afterwards.

    Only one :class:`~hotpatch.process.threads.World` per call may rely on the exit (:func:`claim_exit`).
    """
    outcome: list[tuple[bool, object]] = []

    def body() -> None:
        _local.exit_unclaimed = True
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # re-raised in the caller
            outcome.append((False, e))

    old = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        worker = threading.Thread(target=body, name=name)
        worker.start()
        worker.join()
        _wait_gone(worker.native_id)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]


def _wait_gone(tid: int | None) -> None:
    """Wait until thread ``tid`` of this process has left the kernel's task list (at most EXIT_WAIT_S).

    ``Thread.join`` returns when Python is done with the thread, before the kernel has run its exit; the
    tracees are detached in ``exit_notify``, and the thread leaves /proc/self/task only afterwards, when it
    is released (kernel/exit.c ``release_task``, right after ``exit_notify`` for a thread nobody waits for)."""
    deadline = time.monotonic() + EXIT_WAIT_S
    while tid is not None and os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
        time.sleep(EXIT_POLL_S)


def claim_exit() -> bool:
    """True (once per tracer thread) when the calling thread was made by :func:`run_as_tracer`: its exit will
    detach whatever the caller seizes from now on. False on any other thread, and on later calls."""
    if getattr(_local, "exit_unclaimed", False):
        _local.exit_unclaimed = False
        return True
    return False

"""A thin ctypes layer over ptrace(2) and waitpid(2) for x86-64 tracees.

Only what hotpatch needs: ``PTRACE_SEIZE`` (never ``PTRACE_ATTACH``, never ``PTRACE_O_EXITKILL``, so a killed
tracer leaves the target running: ptrace(2), "PTRACE_SEIZE"; research §3.1), ``PTRACE_INTERRUPT``, register
access, ``PTRACE_CONT``/``SINGLESTEP``/``DETACH`` with a signal to re-inject, and event messages.

Request numbers and the layout of ``struct user_regs_struct`` come from the kernel's
``include/uapi/linux/ptrace.h`` and ``arch/x86/include/asm/user_64.h``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
from typing import Final

PTRACE_PEEKDATA: Final = 2
PTRACE_CONT: Final = 7
PTRACE_GETREGS: Final = 12
PTRACE_SETREGS: Final = 13
PTRACE_DETACH: Final = 17
PTRACE_SETOPTIONS: Final = 0x4200
PTRACE_GETEVENTMSG: Final = 0x4201
PTRACE_SYSCALL: Final = 24
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_GET_SYSCALL_INFO: Final = 0x420E

PTRACE_O_TRACESYSGOOD: Final = 0x1
PTRACE_O_TRACEFORK: Final = 0x2
PTRACE_O_TRACECLONE: Final = 0x8
SYSCALL_STOP: Final = 0x85  # SIGTRAP | 0x80: a syscall-stop under PTRACE_O_TRACESYSGOOD
SYSCALL_INFO_ENTRY, SYSCALL_INFO_EXIT = 1, 2
PTRACE_EVENT_FORK: Final = 1
PTRACE_EVENT_CLONE: Final = 3
PTRACE_EVENT_STOP: Final = 128

WALL: Final = 0x40000000  # __WALL: wait for clone children (threads) too
# seconds of polling before sleeping in wait_until; none with one usable CPU, where polling (possibly at
# SCHED_FIFO, see threads.World) would keep the awaited thread from running
SPIN_S: Final = 0.0003 if len(os.sched_getaffinity(0)) > 1 else 0.0

_libc = ctypes.CDLL(None, use_errno=True)  # the process's global namespace, which holds libc
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_tgkill = _libc.syscall
_tgkill.restype = ctypes.c_long


_REGISTER_NAMES = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
    "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip


class Regs(ctypes.Structure):
    """``struct user_regs_struct`` of x86-64 (27 × u64, arch/x86/include/asm/user_64.h)."""

    _fields_ = [(name, ctypes.c_uint64) for name in _REGISTER_NAMES]

    r15: int
    r14: int
    r13: int
    r12: int
    rbp: int
    rbx: int
    r11: int
    r10: int
    r9: int
    r8: int
    rax: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    orig_rax: int
    rip: int
    cs: int
    eflags: int
    rsp: int
    ss: int
    fs_base: int
    gs_base: int
    ds: int
    es: int
    fs: int
    gs: int

    def copy(self) -> Regs:
        """Return an independent copy of these registers."""
        out = Regs()
        ctypes.pointer(out)[0] = self
        return out


class PtraceError(OSError):
    """A ptrace request failed; ``errno`` says why (ESRCH: thread gone, EPERM: not allowed)."""


def _call(request: int, tid: int, addr: int = 0, data: object = 0) -> int:
    # ``data``: an int or a ``ctypes.byref`` (cast(pointer()) costs 3 µs a call; a stop-the-world of 512
    # threads makes thousands of these calls while every thread waits)
    ctypes.set_errno(0)
    res = int(_ptrace(request, tid, addr, data))
    if res == -1:
        err = ctypes.get_errno()
        if err:
            raise PtraceError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
    return res


def seize(tid: int, options: int = PTRACE_O_TRACECLONE | PTRACE_O_TRACESYSGOOD) -> None:
    """Attach to thread ``tid`` without stopping it (``PTRACE_SEIZE``).

    Raises PtraceError (EPERM: not permitted or already traced; ESRCH: no such thread).
    """
    _call(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    """Ask a seized thread to stop (``PTRACE_INTERRUPT``); the stop is reported by waitpid."""
    _call(PTRACE_INTERRUPT, tid)


def cont(tid: int, sig: int = 0) -> None:
    """Resume a stopped tracee, delivering ``sig`` if it is in a signal-delivery-stop."""
    _call(PTRACE_CONT, tid, 0, sig)


def syscall(tid: int, sig: int = 0) -> None:
    """Resume a stopped tracee until its next syscall-entry or syscall-exit stop (``PTRACE_SYSCALL``)."""
    _call(PTRACE_SYSCALL, tid, 0, sig)


def syscall_op(tid: int) -> int:
    """At a syscall-stop, ``SYSCALL_INFO_ENTRY`` or ``SYSCALL_INFO_EXIT`` (``PTRACE_GET_SYSCALL_INFO``, Linux
    5.3; ``struct ptrace_syscall_info.op`` is its first byte)."""
    buf = ctypes.create_string_buffer(88)
    _call(PTRACE_GET_SYSCALL_INFO, tid, len(buf), ctypes.byref(buf))
    return buf.raw[0]


def detach(tid: int, sig: int = 0) -> None:
    """Detach from a stopped tracee and let it run, delivering ``sig`` from a signal-delivery-stop."""
    _call(PTRACE_DETACH, tid, 0, sig)


def get_regs(tid: int) -> Regs:
    """Read the general-purpose registers of a stopped tracee."""
    regs = Regs()
    _call(PTRACE_GETREGS, tid, 0, ctypes.byref(regs))
    return regs


def set_regs(tid: int, regs: Regs) -> None:
    """Write the general-purpose registers of a stopped tracee."""
    _call(PTRACE_SETREGS, tid, 0, ctypes.byref(regs))


def event_msg(tid: int) -> int:
    """``PTRACE_GETEVENTMSG``: for a clone event, the new thread's tid; for a fork event, the child's PID."""
    msg = ctypes.c_ulong()
    _call(PTRACE_GETEVENTMSG, tid, 0, ctypes.byref(msg))
    return int(msg.value)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread (used to re-raise a signal taken from a tracee while injecting)."""
    if _tgkill(234, tgid, tid, sig) != 0:  # __NR_tgkill on x86-64
        err = ctypes.get_errno()
        if err != errno.ESRCH:
            raise PtraceError(err, f"tgkill({tgid}, {tid}, {sig}): {os.strerror(err)}")


def poll_tid(tid: int) -> int | None:
    """waitpid(tid, __WALL | WNOHANG) for one tracee thread; its status, or None if nothing is ready.

    Waiting per thread (not ``waitpid(-1)``) never reaps an unrelated child of the calling process.
    Raises ChildProcessError when ``tid`` is not (or no longer) a tracee or child.
    """
    got, status = os.waitpid(tid, WALL | os.WNOHANG)
    if got == 0:
        return None
    return status


def wait_until(tid: int, deadline: float) -> int | None:
    """Wait for the next status of tracee ``tid`` until ``time.monotonic()`` reaches ``deadline``.

    Polls for ``SPIN_S`` (a ptrace round trip is usually shorter: waking from a signal wait costs more than
    that here), then sleeps in ``sigtimedwait(SIGCHLD)`` between polls, so a long wait leaves the CPU to the
    threads it waits for (the kernel sends the tracer SIGCHLD at every ptrace-stop: kernel/signal.c,
    ``do_notify_parent_cldstop``). The caller must block SIGCHLD (:func:`block_sigchld`) before the request
    that causes the stop, so the signal stays pending. Returns the status, or None on timeout. Raises
    ChildProcessError when ``tid`` is no longer a tracee.
    """
    spin_until = time.monotonic() + SPIN_S
    while True:
        status = poll_tid(tid)
        if status is not None:
            return status
        now = time.monotonic()
        if now < spin_until:
            continue
        if now >= deadline:
            return None
        signal.sigtimedwait([signal.SIGCHLD], min(deadline - now, 0.005))


def block_sigchld() -> set[int | signal.Signals]:
    """Block SIGCHLD in the calling thread (so ptrace-stop notifications queue up); returns the old mask."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})


def restore_sigmask(old: set[int | signal.Signals]) -> None:
    """Restore a signal mask saved by :func:`block_sigchld` (a queued SIGCHLD is then discarded: ignored)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, old)


def stop_event(status: int) -> int:
    """The ``PTRACE_EVENT_*`` number in a waitpid status (0 for a plain signal stop)."""
    return (status >> 16) & 0xFF

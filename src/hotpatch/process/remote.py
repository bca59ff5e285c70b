"""Raw system calls injected into a stopped thread of the target.

The thread's registers are saved, RIP is pointed at an existing ``syscall`` instruction (``0F 05``, found in
the vDSO or another executable mapping), ``orig_rax`` is set to -1 so the kernel's restart logic leaves RIP
alone, one ``PTRACE_SINGLESTEP`` runs the call, and the saved registers are put back, so a syscall the thread
was blocked in restarts as if nothing happened (research §4.1 and §4.3; CRIU's ``parasite_setup_regs``).
No libc function ever runs in the target (DESIGN.md §5, "Deadlock").
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Final

from ..errors import TargetError
from . import ptrace
from .maps import Mapping
from .memory import Memory
from .threads import Thread, World

SYS_CLOSE: Final = 3
SYS_MMAP: Final = 9
SYS_MPROTECT: Final = 10
SYS_MUNMAP: Final = 11
SYS_FTRUNCATE: Final = 77
SYS_MEMFD_CREATE: Final = 319

PROT_READ: Final = 1
PROT_WRITE: Final = 2
PROT_EXEC: Final = 4
MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_ANONYMOUS: Final = 0x20
MAP_FIXED_NOREPLACE: Final = 0x100000
MFD_CLOEXEC: Final = 1

STEP_TIMEOUT_S = 2.0


def find_syscall_insn(maps: list[Mapping], mem: Memory) -> int:
    """Address of a ``0F 05`` byte pair in an executable mapping, the vDSO first (it is small).

    Raises TargetError when the target has no such bytes in any readable executable mapping.
    """
    ordered = sorted((m for m in maps if m.executable), key=lambda m: (m.path != "[vdso]", m.end - m.start))
    for m in ordered:
        if m.path == "[vsyscall]":
            continue
        data = mem.try_read(m.start, min(m.end - m.start, 1 << 22))
        if data is None:
            continue
        at = data.find(b"\x0f\x05")
        if at >= 0:
            return m.start + at
    raise TargetError("the target has no syscall instruction to borrow for injected system calls")


class SyscallError(OSError):
    """An injected system call returned ``-errno``."""


class Injector:
    """Runs raw syscalls on one stopped thread of a seized :class:`World`.

    ``thread`` must be stopped and not in a group-stop. Registers are restored after every call.
    Each call costs one ptrace round trip (~13 µs measured here, research §4.1).
    """

    def __init__(self, world: World, syscall_insn: int, thread: Thread | None = None) -> None:
        self.world = world
        self.insn = syscall_insn
        th = thread or self.pick_thread(world)
        self.thread = th
        if th.signal:  # a single-step would swallow it: re-raise it on release instead
            th.extra_signals.append(th.signal)
            th.signal = 0

    @staticmethod
    def pick_thread(world: World) -> Thread:
        """A stopped thread fit for injection (not in a group-stop), the main thread when possible."""
        cands = [t for t in world.stopped_threads() if not t.group_stop]
        if not cands:
            raise TargetError(f"PID {world.pid} is stopped by job control (SIGSTOP); resume it first")
        cands.sort(key=lambda t: t.tid != world.pid)
        return cands[0]

    def __call__(self, nr: int, *args: int) -> int:
        """Run syscall ``nr`` with up to six integer ``args``; return its result (>= 0).

        Raises SyscallError(errno) when the kernel returns an error, TargetError if the thread vanished.
        """
        th = self.thread
        assert th.regs is not None
        saved = th.regs.copy()
        regs = saved.copy()
        a = [*args, 0, 0, 0, 0, 0, 0]
        regs.rax, regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9 = nr, *a[:6]
        regs.rip = self.insn
        regs.orig_rax = 0xFFFF_FFFF_FFFF_FFFF
        regs.eflags &= ~0x100  # TF
        try:
            ptrace.set_regs(th.tid, regs)
            result = self._step()
        finally:
            self.world.set_regs(th.tid, saved)
            try:
                ptrace.set_regs(th.tid, saved)
                th.dirty = False
            except ptrace.PtraceError:
                pass
        if result < 0 and result > -4096:
            raise SyscallError(-result, f"syscall {nr}: {os.strerror(-result)}")
        return result

    def _step(self) -> int:
        th = self.thread
        deadline = time.monotonic() + STEP_TIMEOUT_S
        ptrace.singlestep(th.tid)
        while True:
            try:
                status = ptrace.wait_until(th.tid, deadline)
            except ChildProcessError:
                raise TargetError(f"PID {self.world.pid} exited during an injected system call") from None
            if status is None:
                raise TargetError(f"an injected system call in thread {th.tid} did not return in time")
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                del self.world.threads[th.tid]
                raise TargetError(f"PID {self.world.pid} exited during an injected system call")
            regs = ptrace.get_regs(th.tid)
            sig = os.WSTOPSIG(status)
            if ptrace.stop_event(status) == 0 and sig != signal.SIGTRAP:
                th.extra_signals.append(sig)  # arrived meanwhile: re-raised on release
            if regs.rip == self.insn + 2:
                value = regs.rax
                return value - (1 << 64) if value >= 1 << 63 else value
            ptrace.singlestep(th.tid)  # an interrupt or signal stop came first: step again


def mmap_fixed(inject: Injector, addr: int, size: int, prot: int, flags: int = 0, fd: int = -1) -> int:
    """``mmap`` exactly at ``addr`` with MAP_FIXED_NOREPLACE; returns ``addr``.

    Raises SyscallError(EEXIST) when the range is taken, and unmaps a result at any other address (old
    kernels ignore the flag, research §5).
    """
    kind = flags or (MAP_PRIVATE | MAP_ANONYMOUS)
    got = inject(SYS_MMAP, addr, size, prot, kind | MAP_FIXED_NOREPLACE, fd & 0xFFFF_FFFF_FFFF_FFFF, 0)
    if got != addr:
        inject(SYS_MUNMAP, got, size)
        raise SyscallError(errno.EEXIST, "mmap placed the mapping elsewhere")
    return got

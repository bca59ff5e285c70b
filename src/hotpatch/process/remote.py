"""Raw system calls injected into a stopped thread of the target.

The thread's registers are saved and a stub is written into never-executed bytes of an executable mapping (the
zero padding after a module's executable segment, in the last page of its mapping): a ``syscall`` followed by
code that restores the saved registers and jumps back (:mod:`hotpatch.x86.stub`). The thread's RIP is pointed
at the stub with the call's number and arguments in its registers and ``orig_rax`` = -1 (so the kernel's
restart logic leaves RIP alone), and ``PTRACE_SYSCALL`` runs it to its syscall-exit stop, where the result is
read. At the end the tracer restores the registers itself, applying the syscall restart by hand (research
§4.3). If the tool is killed at any moment, the kernel detaches the thread and it runs through the stub back to
where it was: an injection never leaves a thread with foreign registers or a trap flag (DESIGN.md §5, "Tracer
death"). No libc function ever runs in the target (DESIGN.md §5, "Deadlock"); CRIU's parasite and libpulp
inject the same way, with the trap-based return this design avoids.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from ..elf.image import PT_LOAD, open_elf
from ..errors import HotpatchError, TargetError
from ..x86 import stub as x86stub
from . import ptrace
from .maps import Mapping, mapped_file, page_up
from .memory import Memory
from .threads import Thread, World, is_zombie, list_tids, thread_state

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

CALL_TIMEOUT_S = 2.0


def find_stub_area(pid: int, maps: list[Mapping], mem: Memory) -> int:
    """An address of ``STUB_SIZE`` never-executed, zero bytes in an executable mapping of the target.

    They lie after the end of a module's executable PT_LOAD, in the last page of its mapping: the file's
    padding up to the page boundary (System V gABI, "Program Loading"), executable but not code. A stub left
    there by a killed hotpatch counts as free. The executable is tried first, then the other modules. Raises
    TargetError when no module has such room.
    """
    for m in sorted((m for m in maps if m.executable and m.path.startswith("/")), key=lambda m: m.start):
        try:
            img = open_elf(mapped_file(pid, m))
        except HotpatchError:
            continue
        try:
            for seg in img.segments:
                end_off = seg.offset + seg.filesz
                if seg.type != PT_LOAD or not seg.flags & 1 or not m.offset < end_off <= m.offset + m.end - m.start:
                    continue
                start = m.start + (end_off - m.offset)
                start = (start + 15) & ~15
                fits = page_up(start) == m.end and m.end - start >= x86stub.STUB_SIZE
                if fits and _free_for_stub(mem.try_read(start, x86stub.STUB_SIZE)):
                    return start
        finally:
            img.close()
    raise TargetError("the target has no executable padding to hold hotpatch's syscall stub")


def _free_for_stub(data: bytes | None) -> bool:
    """Zero padding, or the stub a killed hotpatch left there (its thread ran through it long ago)."""
    return data is not None and (data == bytes(len(data)) or data.startswith(x86stub.SIGNATURE))


class SyscallError(OSError):
    """An injected system call returned ``-errno``."""


class Injector:
    """Runs raw syscalls on one stopped thread of a seized :class:`World`, through the stub at ``stub_area``.

    ``thread`` must be stopped and not in a group-stop. Each call costs two ptrace round trips (entry and
    exit stops). Call :meth:`close` before the world is released: it puts the thread back and erases the stub.
    """

    def __init__(self, world: World, mem: Memory, stub_area: int, thread: Thread | None = None) -> None:
        self.world = world
        self.mem = mem
        self.stub = stub_area
        th = thread or self.pick_thread(world)
        self.thread = th
        if th.signal:  # resuming would swallow it: re-raise it on release instead
            th.extra_signals.append(th.signal)
            th.signal = 0
        assert th.regs is not None
        self.saved = th.regs.copy()
        mem.write(stub_area, x86stub.build(self.saved))
        self._closed = False

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
        regs = self.saved.copy()
        a = [*args, 0, 0, 0, 0, 0, 0]
        regs.rax, regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9 = nr, *a[:6]
        regs.rip = self.stub
        regs.orig_rax = 0xFFFF_FFFF_FFFF_FFFF
        regs.eflags &= ~0x100  # TF
        ptrace.set_regs(self.thread.tid, regs)
        result = self._run()
        if -4096 < result < 0:
            raise SyscallError(-result, f"syscall {nr}: {os.strerror(-result)}")
        return result

    def _run(self) -> int:
        th = self.thread
        deadline = time.monotonic() + CALL_TIMEOUT_S
        ptrace.syscall(th.tid)
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
            sig = os.WSTOPSIG(status)
            if sig == ptrace.SYSCALL_STOP and ptrace.syscall_op(th.tid) == ptrace.SYSCALL_INFO_EXIT:
                value = ptrace.get_regs(th.tid).rax
                return value - (1 << 64) if value >= 1 << 63 else value
            if ptrace.stop_event(status) == 0 and sig not in (signal.SIGTRAP, ptrace.SYSCALL_STOP):
                th.extra_signals.append(sig)  # arrived meanwhile: re-raised on release
            ptrace.syscall(th.tid)  # the entry stop, or an interrupt or signal stop: go on

    def close(self) -> None:
        """Put the thread back where it was (with the kernel's syscall restart done by hand: it now sits at a
        syscall-exit stop, where the kernel would not restart the call it was interrupted in) and erase the
        stub. Idempotent; best effort if the target is gone."""
        if self._closed:
            return
        self._closed = True
        final = self.saved.copy()
        final.rip, final.rax = x86stub.resume_point(self.saved)
        final.orig_rax = 0xFFFF_FFFF_FFFF_FFFF
        try:
            ptrace.set_regs(self.thread.tid, final)
            self.world.set_regs(self.thread.tid, final)
            self.thread.dirty = False
            self.mem.write(self.stub, bytes(x86stub.STUB_SIZE))
        except (ptrace.PtraceError, HotpatchError):
            pass


@contextmanager
def injection(pid: int, mem: Memory, stub_area: int, stops_us: list[float]) -> Iterator[Injector]:
    """One thread of ``pid`` stopped for injected syscalls through the stub at ``stub_area``; the others
    run on. The length of the stop window (µs) is appended to ``stops_us``.

    A thread asleep in a system call (``epoll_wait``, ``futex``, ``read``…) is chosen first, the main thread
    among equals: it was not running anyway, so stopping it costs the target the least (research §4.4); its
    system call is restarted afterwards. Raises TargetError when no thread can be used (already traced by
    another tracer, all stopped by job control, gone).
    """
    world = World(pid)
    inject: Injector | None = None
    tids = list_tids(pid)
    states = {tid: thread_state(pid, tid) for tid in tids}
    tids.sort(key=lambda tid: (states[tid] != "S", tid != pid))
    try:
        for tid in tids:
            try:
                world.seize_thread(tid)
            except TargetError:
                if tid == pid and is_zombie(pid, tid):
                    continue  # the main thread has exited: inject through another one
                raise  # e.g. already traced by another tracer: refuse before changing anything
            world.stop([tid])
            if tid in world.threads and not world.threads[tid].group_stop:
                break
            world.release()
        inject = Injector(world, mem, stub_area)
        yield inject
    finally:
        if inject is not None:
            inject.close()
        world.release()
        stops_us.append(world.longest_stop_us)


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

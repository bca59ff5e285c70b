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

The injector is arch-aware (:class:`Arch`): a thread running 64-bit code gets the ``syscall`` stub and the
x86-64 convention (``rax`` = number, ``rdi``, ``rsi``, ``rdx``, ``r10``, ``r8``, ``r9``); a thread of an i386
process gets the ``int $0x80`` stub (:mod:`hotpatch.x86.stub32`) and the i386 convention (``eax`` = number,
``ebx``, ``ecx``, ``edx``, ``esi``, ``edi``, ``ebp``). The numbers differ too: callers take them from
:attr:`Injector.sys` (a :class:`Syscalls`) rather than from the x86-64 ``SYS_*`` constants.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final, NamedTuple

from ..elf.image import PT_LOAD, open_elf
from ..errors import HotpatchError, TargetError
from ..x86 import stub as x86stub
from ..x86 import stub32
from . import ptrace
from .live import thread_views
from .maps import USER_TOP, Mapping, mapped_file, page_up
from .memory import Memory
from .threads import USER32_CS, USER_CS, Thread, World, is_zombie, list_tids, thread_state


class Syscalls(NamedTuple):
    """The numbers of the system calls hotpatch injects, for one ABI.

    ``mmap`` is the call that takes ``(addr, length, prot, flags, fd, offset)``: x86-64 ``mmap`` (offset in
    bytes) or i386 ``mmap2`` (offset in units of ``mmap_offset_unit`` = 4096 bytes; the old i386 ``mmap``,
    90, takes a pointer to its arguments). Use :meth:`Injector.mmap`, which converts the offset.
    """

    abi: str
    close: int
    mmap: int
    mmap_offset_unit: int
    munmap: int
    mprotect: int
    ftruncate: int
    memfd_create: int
    membarrier: int


# arch/x86/entry/syscalls/syscall_64.tbl
X86_64_SYSCALLS: Final = Syscalls(
    "x86_64", close=3, mmap=9, mmap_offset_unit=1, munmap=11, mprotect=10, ftruncate=77, memfd_create=319,
    membarrier=324,
)  # fmt: skip
# arch/x86/entry/syscalls/syscall_32.tbl
I386_SYSCALLS: Final = Syscalls(
    "i386", close=6, mmap=192, mmap_offset_unit=4096, munmap=91, mprotect=125, ftruncate=93, memfd_create=356,
    membarrier=375,
)  # fmt: skip


PROT_READ: Final = 1
PROT_WRITE: Final = 2
PROT_EXEC: Final = 4
MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_ANONYMOUS: Final = 0x20
MAP_FIXED_NOREPLACE: Final = 0x100000
MFD_CLOEXEC: Final = 1  # the same flag values on i386 and x86-64 (include/uapi/asm-generic/mman-common.h)

CALL_TIMEOUT_S = 2.0


class Arch(NamedTuple):
    """How to inject a system call into a thread running ``bitness``-bit code.

    ``sys``: the syscall numbers; ``call_regs``: the ``ptrace.Regs`` fields of the number and arguments 1–6;
    ``stub_size``/``signature``: the stub's length in bytes and its first bytes; ``build_stub(saved,
    address)``: the stub at ``address`` that returns to ``saved``; ``resume_point(saved)``: ``(rip, rax)``
    with the syscall restart applied; ``user_top``: the end of the user address space in bytes (x86-64 with
    4-level paging: ``maps.USER_TOP``; a compat task: ``IA32_PAGE_OFFSET`` = 0xFFFFE000,
    ``arch/x86/include/asm/page_64_types.h``).
    """

    bitness: int
    sys: Syscalls
    call_regs: tuple[str, ...]
    stub_size: int
    signature: bytes
    build_stub: Callable[[ptrace.Regs, int], bytes]
    resume_point: Callable[[ptrace.Regs], tuple[int, int]]
    user_top: int

    @property
    def mask(self) -> int:
        """All ones in a register of this width."""
        return (1 << self.bitness) - 1

    def result(self, raw: int) -> int:
        """The value of a syscall from ``rax`` at its exit stop: >= 0, or -errno (-4095..-1) on failure."""
        value = raw & self.mask
        return value - (self.mask + 1) if value > self.mask - 4095 else value


ARCHES: Final = {
    64: Arch(
        64, X86_64_SYSCALLS, ("rax", "rdi", "rsi", "rdx", "r10", "r8", "r9"), x86stub.STUB_SIZE, x86stub.SIGNATURE,
        lambda saved, _address: x86stub.build(saved), x86stub.resume_point, USER_TOP,
    ),
    32: Arch(
        32, I386_SYSCALLS, ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp"), stub32.STUB_SIZE, stub32.SIGNATURE,
        stub32.build, stub32.resume_point, 0xFFFF_E000,
    ),
}  # fmt: skip
STUB_ROOM: Final = max(a.stub_size for a in ARCHES.values())  # bytes find_stub_area reserves: any stub fits


def process_bitness(pid: int) -> int:
    """64 or 32: the ELF class of ``/proc/PID/exe`` (byte ``e_ident[EI_CLASS]``: 2 = ELFCLASS64, 1 =
    ELFCLASS32). Raises TargetError when the process is gone, unreadable, or its executable is not ELF."""
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            head = f.read(5)
    except OSError as e:
        raise TargetError(f"cannot read the executable of PID {pid}: {e.strerror}") from None
    if head[:4] != b"\x7fELF" or head[4:5] not in (b"\x01", b"\x02"):
        raise TargetError(f"the executable of PID {pid} is not an ELF file")
    return 64 if head[4] == 2 else 32


def thread_bitness(regs: ptrace.Regs) -> int | None:
    """64 or 32 from a stopped thread's code segment selector (``cs``), None for an unknown selector."""
    return {USER_CS: 64, USER32_CS: 32}.get(regs.cs & 0xFFFF)


def arch_of(pid: int) -> Arch:
    """The :class:`Arch` of process ``pid`` (from its executable's ELF class). Raises TargetError."""
    return ARCHES[process_bitness(pid)]


def find_stub_area(pid: int, maps: list[Mapping], mem: Memory) -> int:
    """An address of ``STUB_ROOM`` never-executed, zero bytes in an executable mapping of the target (room
    for the stub of either bitness, so one area serves 64-bit and 32-bit threads alike).

    They lie after the end of a module's executable PT_LOAD, in the last page of its mapping: the file's
    padding up to the page boundary (System V gABI, "Program Loading"), executable but not code. A stub left
    there by a killed hotpatch counts as free once no thread runs in it (:func:`threads_inside`: the thread
    it was injected into may still sit in its system call, or be preempted in its restore code; writing a
    new stub there would send that thread back with another thread's registers). The executable is tried
    first, then the other modules; ELF64 and ELF32 modules alike. Raises TargetError when no module has
    such room.
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
                fits = page_up(start) == m.end and m.end - start >= STUB_ROOM
                data = mem.try_read(start, STUB_ROOM) if fits else None
                if data == bytes(STUB_ROOM) or (_left_stub(data) and not threads_inside(pid, mem, start, STUB_ROOM)):
                    return start
        finally:
            img.close()
    raise TargetError("the target has no executable padding to hold hotpatch's syscall stub")


def _left_stub(data: bytes | None) -> bool:
    """The bytes of a stub a killed hotpatch left (it starts with a stub's signature)."""
    return data is not None and any(data.startswith(a.signature) for a in ARCHES.values())


def threads_inside(pid: int, mem: Memory, addr: int, size: int) -> bool:
    """True when a thread of ``pid`` executes next inside ``[addr, addr + size)`` or can come back there: its
    RIP, or a word of its stack, such as the saved RIP of a signal delivered in a stub's restore code
    (:func:`~hotpatch.process.live.thread_views`: each thread stopped alone). Raises TargetError as
    :meth:`LiveWorld.seize` does."""
    return any(v.touches(addr - 1, addr + size) for v in thread_views(pid, mem).values())


class SyscallError(OSError):
    """An injected system call returned ``-errno``."""


class Injector:
    """Runs raw syscalls on one stopped thread of a seized :class:`World`, through the stub at ``stub_area``.

    ``thread`` must be stopped and not in a group-stop. ``bitness`` (64 or 32) picks the stub and calling
    convention (:class:`Arch`); by default it is the mode of the code the thread runs (its ``cs``), else the
    executable's ELF class. Each call costs two ptrace round trips (entry and exit stops). Call :meth:`close`
    before the world is released: it puts the thread back and erases the stub. ``arch`` is the chosen
    :class:`Arch`. Raises TargetError when the bitness cannot be told, ValueError for a ``bitness`` other
    than 64 or 32.
    """

    def __init__(
        self, world: World, mem: Memory, stub_area: int, thread: Thread | None = None, bitness: int | None = None
    ) -> None:
        self.world = world
        self.mem = mem
        self.stub = stub_area
        th = thread or self.pick_thread(world)
        self.thread = th
        assert th.regs is not None
        mode = bitness or thread_bitness(th.regs) or process_bitness(world.pid)
        if mode not in ARCHES:
            raise ValueError(f"bitness must be 64 or 32, not {mode}")
        self.arch: Arch = ARCHES[mode]
        if th.signal:  # resuming would swallow it: re-raise it on release instead
            th.extra_signals.append(th.signal)
            th.signal = 0
        self.saved = th.regs.copy()
        mem.write(stub_area, self.arch.build_stub(self.saved, stub_area))
        self._closed = False

    @property
    def sys(self) -> Syscalls:
        """The syscall numbers of the thread's ABI (``inject(inject.sys.mprotect, addr, size, prot)``)."""
        return self.arch.sys

    @property
    def bitness(self) -> int:
        """64 or 32: the mode of the code the injecting thread runs."""
        return self.arch.bitness

    @staticmethod
    def pick_thread(world: World) -> Thread:
        """A stopped thread fit for injection (not in a group-stop), the main thread when possible."""
        cands = [t for t in world.stopped_threads() if not t.group_stop]
        if not cands:
            raise TargetError(f"PID {world.pid} is stopped by job control (SIGSTOP); resume it first")
        cands.sort(key=lambda t: t.tid != world.pid)
        return cands[0]

    def __call__(self, nr: int, *args: int) -> int:
        """Run syscall ``nr`` (a number of :attr:`sys`) with up to six integer ``args`` (negative ones in
        two's complement at the thread's width); return its result (>= 0, unsigned: an i386 address above
        2 GiB stays positive).

        Raises SyscallError(errno) when the kernel returns an error, TargetError if the thread vanished.
        """
        if len(args) > 6:
            raise ValueError(f"a system call takes at most 6 arguments, not {len(args)}")
        regs = self.saved.copy()
        values = [nr, *args, *[0] * (6 - len(args))]
        for name, value in zip(self.arch.call_regs, values, strict=True):
            setattr(regs, name, value & self.arch.mask)
        regs.rip = self.stub
        regs.orig_rax = 0xFFFF_FFFF_FFFF_FFFF
        regs.eflags &= ~0x100  # TF
        ptrace.set_regs(self.thread.tid, regs)
        result = self.arch.result(self._run())
        if result < 0:
            names = [k for k, v in self.arch.sys._asdict().items() if v == nr and k != "mmap_offset_unit"]
            name = names[0] if names else f"syscall {nr}"
            raise SyscallError(-result, f"{name}: {os.strerror(-result)}")
        return result

    def mmap(self, addr: int, size: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
        """``mmap`` (x86-64) or ``mmap2`` (i386) with a byte ``offset``; returns the mapping's address.

        Raises ValueError for an ``offset`` that is not a multiple of the page size on i386, SyscallError as
        :meth:`__call__`.
        """
        unit = self.sys.mmap_offset_unit
        if offset % unit:
            raise ValueError(f"mmap2 needs an offset in whole {unit}-byte pages, not {offset:#x}")
        return self(self.sys.mmap, addr, size, prot, flags, fd, offset // unit)

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
            try:
                if sig == ptrace.SYSCALL_STOP and ptrace.syscall_op(th.tid) == ptrace.SYSCALL_INFO_EXIT:
                    return int(ptrace.get_regs(th.tid).rax)  # raw: Arch.result decodes it
                if ptrace.stop_event(status) == 0 and sig != ptrace.SYSCALL_STOP:
                    th.extra_signals.append(sig)  # arrived meanwhile (SIGTRAP too): re-raised on release
                ptrace.syscall(th.tid)  # the entry stop, or an interrupt or signal stop: go on
            except ptrace.PtraceError as e:
                # ESRCH on a tracee that just reported a stop: a SIGKILL woke it (the process is exiting)
                if e.errno != errno.ESRCH:
                    raise
                raise TargetError(
                    f"PID {self.world.pid} was killed during an injected system call (thread {th.tid}: "
                    f"state {thread_state(self.world.pid, th.tid)})"
                ) from None

    def close(self) -> None:
        """Put the thread back where it was (with the kernel's syscall restart done by hand: it now sits at a
        syscall-exit stop, where the kernel would not restart the call it was interrupted in) and erase the
        stub. Idempotent; best effort if the target is gone."""
        if self._closed:
            return
        self._closed = True
        final = self.saved.copy()
        final.rip, final.rax = self.arch.resume_point(self.saved)
        final.orig_rax = 0xFFFF_FFFF_FFFF_FFFF
        try:
            ptrace.set_regs(self.thread.tid, final)
            self.world.set_regs(self.thread.tid, final)
            self.thread.dirty = False
            self.mem.write(self.stub, bytes(self.arch.stub_size))
        except (ptrace.PtraceError, HotpatchError):
            pass


@contextmanager
def injection(
    pid: int, mem: Memory, stub_area: int, stops_us: list[float], bitness: int | None = None
) -> Iterator[Injector]:
    """One thread of ``pid`` stopped for injected syscalls through the stub at ``stub_area``; the others
    run on. The length of the stop window (µs) is appended to ``stops_us``. ``bitness``: as for
    :class:`Injector` (default: the thread's own mode).

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
        inject = Injector(world, mem, stub_area, bitness=bitness)
        yield inject
    finally:
        if inject is not None:
            inject.close()
        world.release()
        stops_us.append(world.longest_stop_us)


def mmap_fixed(inject: Injector, addr: int, size: int, prot: int, flags: int = 0, fd: int = -1) -> int:
    """``mmap`` (``mmap2`` on i386) exactly at ``addr`` with MAP_FIXED_NOREPLACE; returns ``addr``.

    Raises SyscallError(EEXIST) when the range is taken, SyscallError(ENOMEM) when it does not fit in the
    thread's address space (an i386 process ends at ``Arch.user_top``), and unmaps a result at any other
    address (old kernels ignore the flag, research §5; MAP_FIXED_NOREPLACE is 0x100000 on i386 too,
    ``include/uapi/asm-generic/mman-common.h``).
    """
    if addr < 0 or addr + size > inject.arch.user_top:
        raise SyscallError(errno.ENOMEM, f"{size} bytes at {addr:#x} lie outside the target's address space")
    kind = flags or (MAP_PRIVATE | MAP_ANONYMOUS)
    got = inject.mmap(addr, size, prot, kind | MAP_FIXED_NOREPLACE, fd, 0)
    if got != addr:
        inject(inject.sys.munmap, got, size)
        raise SyscallError(errno.EEXIST, "mmap placed the mapping elsewhere")
    return got

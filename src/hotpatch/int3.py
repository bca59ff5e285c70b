"""Protocols A (no stop) and R (rolling): the kernel's int3 protocol, driven from outside (DESIGN.md §4).

For every change, the *key* is the instruction threads enter through. The steps (research §1.3, §0 "A"):

1. ``CC`` at byte 0 of every key (1-byte writes: the only writes atomic from outside, research §2.3); sync.
   From now on a thread reaching a key traps; :class:`~hotpatch.process.live.LiveWorld` sends it where the
   new code sends it (``SiteChange.trap_to``).
2. Protocol R only (changes with ``span``): threads are looked at one at a time until each has been seen with
   no RIP (or syscall-restart RIP - 2) and no stack word strictly inside ``(key, key + span)``; no two are
   stopped by us at once. A thread found inside runs on and is looked at again.
3. Every other differing byte (the tail of the key, the padding's ``E9 rel32``); sync.
4. The new byte 0 of every key; sync.

"Sync" is ``membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`` injected into one thread (an asleep one
when there is one), which serialises every CPU running the target (research §1.6). The process registers for
it once (about 13 ms, RCU grace period): the first sync of a commit comes before any byte is written, and
registers on ``EPERM``, so the registration is never inside the window. If anything fails after step 1, the
same protocol puts the old bytes back (threads trapping then go to ``trap_back``), so a commit is all or
nothing (invariant 3). Catchable signals are blocked in the tool while the window is open.
"""

from __future__ import annotations

import bisect
import errno
import time
from collections.abc import Callable, Sequence
from contextlib import suppress

from .errors import HotpatchError, TargetError
from .process.live import LiveWorld
from .process.maps import Mapping, read_maps
from .process.memory import Memory
from .process.ptrace import Regs
from .process.remote import Injector, SyscallError
from .process.threads import Thread, thread_state
from .transaction import STACK_SCAN_LIMIT, CommitReport, SiteChange, check_bytes, signals_blocked

SYS_MEMBARRIER = 324  # arch/x86/entry/syscalls/syscall_64.tbl
MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE = 1 << 5  # include/uapi/linux/membarrier.h
MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE = 1 << 6
INT3 = b"\xcc"
ROLLING_TIMEOUT_S = 2.0  # how long protocol R waits for every thread to leave the overwritten bytes
WATCH_ROUNDS = 20  # looks per busy thread when checking whether memory is still in use


class RollingTimeout(TargetError):
    """Protocol R saw a thread stay inside the bytes to overwrite for ROLLING_TIMEOUT_S (nothing changed)."""


class Syncer:
    """Injects ``membarrier(SYNC_CORE)`` into one thread of a :class:`LiveWorld` (research §1.6).

    The thread is chosen once: asleep in a system call first, the main thread among equals. Each sync stops
    it alone for the injected call. Raises TargetError when no thread can run it (all gone or stopped by job
    control) or membarrier is unavailable (kernel without ``CONFIG_MEMBARRIER``).
    """

    def __init__(self, world: LiveWorld, mem: Memory, stub_area: int) -> None:
        self.world, self.mem, self.stub = world, mem, stub_area
        self.count = 0
        self._tid = 0

    def _pick(self, avoid: set[int]) -> int:
        tids = sorted(self.world.threads, key=lambda t: (thread_state(self.world.pid, t) != "S", t != self.world.pid))
        for tid in tids:
            if not self.world.threads[tid].group_stop and tid not in avoid:
                return tid
        if avoid and len(avoid) < len(self.world.threads):
            return next(t for t in tids if not self.world.threads[t].group_stop)
        raise TargetError(f"PID {self.world.pid} has no thread able to run membarrier (stopped by job control?)")

    def sync(self) -> None:
        """Serialise every CPU running the target; registers the process on first use."""
        th: Thread | None = None
        avoid: set[int] = set()
        for _ in range(16):
            if self._tid not in self.world.threads or self._tid in avoid:
                self._tid = self._pick(avoid)
            th = self.world.stop_one(self._tid)
            if th is None:
                continue
            assert th.regs is not None
            if th.regs.rip not in self.world.traps:
                break
            # it hit an armed int3 and has the SIGTRAP pending: let it take it (and be redirected)
            self.world.resume_one(th.tid)
            avoid.add(th.tid)
            th = None
        if th is None:
            raise TargetError(f"PID {self.world.pid} has no thread left to run membarrier")
        inject = Injector(self.world, self.mem, self.stub, th)
        try:
            try:
                inject(SYS_MEMBARRIER, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0)
            except SyscallError as e:
                if e.errno != errno.EPERM:
                    raise TargetError(f"membarrier(SYNC_CORE) failed in PID {self.world.pid}: {e.strerror}") from None
                inject(SYS_MEMBARRIER, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0)
                inject(SYS_MEMBARRIER, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0)
        finally:
            inject.close()
            self.world.resume_one(th.tid)
        self.count += 1


def _runs(old: bytes, new: bytes, skip: int) -> list[tuple[int, bytes]]:
    """The contiguous runs (offset, bytes) where ``new`` differs from ``old``, byte ``skip`` left out."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(new):
        if i == skip or old[i] == new[i]:
            i += 1
            continue
        j = i
        while j < len(new) and j != skip and old[j] != new[j]:
            j += 1
        out.append((i, new[i:j]))
        i = j
    return out


class Int3Commit:
    """One commit of ``changes`` with the int3 protocol; see the module docstring.

    ``watch``: regions (addr, bytes) to check, after the commit, for threads still using them (RIP or a stack
    word inside), one thread at a time — for deciding whether memory may be freed.
    """

    def __init__(self, pid: int, mem: Memory, stub_area: int, changes: Sequence[SiteChange]) -> None:
        self.pid, self.mem, self.stub = pid, mem, stub_area
        self.changes = list(changes)

    def run(self, watch: Sequence[tuple[int, int]] = ()) -> CommitReport:
        """Apply every change. Raises MismatchError when a site's bytes differ from the expected ones
        (nothing written), SiteError/TargetError when protocol R cannot see every thread leave the
        overwritten bytes in time or the target cannot be traced (the old bytes are back in both cases)."""
        report = CommitReport()
        world = LiveWorld(self.pid)
        maps = read_maps(self.pid)
        started = time.perf_counter()
        with signals_blocked():
            try:
                world.seize()
                world.boost()
                report.threads = len(world.threads)
                syncer = Syncer(world, self.mem, self.stub)
                syncer.sync()  # registers for SYNC_CORE (once per process) before the window opens
                check_bytes(self.mem, self.changes)
                self._commit(world, syncer, maps)
                if watch:
                    report.busy = _watch_pass(world, self.mem, maps, watch)
                report.moved = world.trapped
            finally:
                world.detach_all()
        report.pause_us = world.longest_one_us
        report.window_us = (time.perf_counter() - started) * 1e6
        return report

    def _commit(self, world: LiveWorld, syncer: Syncer, maps: list[Mapping]) -> None:
        for c in self.changes:
            world.traps[c.key + 1] = c.trap_to
        armed: list[SiteChange] = []
        try:
            for c in self.changes:
                armed.append(c)
                self.mem.write(c.key, INT3)
            syncer.sync()
            checked = [(c.key, c.key + c.span) for c in self.changes if c.span]
            if checked:
                _rolling(world, self.mem, maps, checked)
            self._write(self.changes, new=True)
            syncer.sync()
            for c in self.changes:
                self.mem.write(c.key, c.new[c.key - c.address : c.key - c.address + 1])
            syncer.sync()
        except BaseException:
            self._rollback(world, syncer, armed)
            raise

    def _write(self, changes: Sequence[SiteChange], new: bool) -> None:
        for c in changes:
            old, to = (c.expected, c.new) if new else (c.new, c.expected)
            # bytes that differ from what is there now; the key's byte 0 (now int3) is written last
            for off, data in _runs(old, to, c.key - c.address):
                self.mem.write(c.address + off, data)
            if not new:  # the tail may be half new: write all of it back
                off = c.key - c.address + 1
                self.mem.write(c.address + off, to[off:])

    def _rollback(self, world: LiveWorld, syncer: Syncer, armed: Sequence[SiteChange]) -> None:
        """Put the expected bytes back with the same protocol (best effort: the target may be gone)."""
        for c in armed:
            world.traps[c.key + 1] = c.trap_back
        with suppress(HotpatchError):
            for c in armed:
                self.mem.write(c.key, INT3)
            with suppress(HotpatchError):
                syncer.sync()
            self._write(armed, new=False)
            with suppress(HotpatchError):
                syncer.sync()
        for c in armed:  # never leave an int3 behind, even if the syncs failed
            with suppress(HotpatchError):
                self.mem.write(c.key, c.expected[c.key - c.address : c.key - c.address + 1])
        with suppress(HotpatchError):
            syncer.sync()


def _stack_words(mem: Memory, maps: list[Mapping], regs: Regs, restarting: bool = False) -> list[int]:
    """The sorted RIP and stack words (RSP up to the end of its mapping, at most STACK_SCAN_LIMIT bytes) of a
    stopped thread with registers ``regs``, with RIP - 2 when a syscall restart will rewind it (research
    §4.3)."""
    rsp = regs.rsp
    i = bisect.bisect_right([m.start for m in maps], rsp) - 1
    data = b""
    if i >= 0 and maps[i].start <= rsp < maps[i].end:
        start = rsp & ~7
        data = mem.try_read(start, min(maps[i].end, start + STACK_SCAN_LIMIT) - start) or b""
    words = [*memoryview(data[: len(data) & ~7]).cast("Q").tolist(), regs.rip]
    if restarting:
        words.append(regs.rip - 2)
    return sorted(words)


def _thread_words(mem: Memory, maps: list[Mapping], th: Thread) -> list[int]:
    assert th.regs is not None
    return _stack_words(mem, maps, th.regs, th.restarting)


def _hits(words: list[int], lo: int, hi: int) -> bool:
    """True when a value of the sorted ``words`` lies in ``(lo, hi)`` (``lo`` excluded)."""
    i = bisect.bisect_right(words, lo)
    return i < len(words) and words[i] < hi


def _rolling(world: LiveWorld, mem: Memory, maps: list[Mapping], ranges: list[tuple[int, int]]) -> None:
    """Protocol R's check: every thread seen once with nothing in any ``(key, key + span)`` of ``ranges``.

    Threads created after the int3 was armed cannot be inside (they could only enter through it). Raises
    TargetError when some thread stays inside for ROLLING_TIMEOUT_S.
    """
    pending = {t for t in world.threads if not world.threads[t].group_stop}

    def clear(words: list[int]) -> bool:
        return not any(_hits(words, lo, hi) for lo, hi in ranges)

    def on_trap(tid: int, regs: Regs) -> None:
        # a thread that just trapped and was redirected is looked at where it stands: no extra stop
        if tid in pending and clear(_stack_words(mem, maps, regs)):
            pending.discard(tid)

    deadline = time.monotonic() + ROLLING_TIMEOUT_S
    world.trap_hook = on_trap
    try:
        _rolling_rounds(world, mem, maps, pending, clear, deadline)
    finally:
        world.trap_hook = None


def _rolling_rounds(
    world: LiveWorld,
    mem: Memory,
    maps: list[Mapping],
    pending: set[int],
    clear: Callable[[list[int]], bool],
    deadline: float,
) -> None:
    """Look at the ``pending`` threads one at a time until each was seen ``clear``; raises RollingTimeout."""
    while pending:
        for tid in sorted(pending):
            if tid not in pending:
                continue  # seen clear at a trap meanwhile
            th = world.stop_one(tid)
            if th is None:
                pending.discard(tid)
                continue
            words = _thread_words(mem, maps, th)
            world.resume_one(tid)
            if clear(words):
                pending.discard(tid)
        if pending:
            if time.monotonic() > deadline:
                raise RollingTimeout(
                    f"thread {min(pending)} of PID {world.pid} stayed inside the bytes to overwrite for "
                    f"{ROLLING_TIMEOUT_S:g} s; nothing was changed"
                )
            time.sleep(0.001)


def _watch_pass(
    world: LiveWorld, mem: Memory, maps: list[Mapping], watch: Sequence[tuple[int, int]]
) -> set[tuple[int, int]]:
    """The regions of ``watch`` some thread still uses (RIP or stack word inside); a busy thread is looked at
    again, up to WATCH_ROUNDS times. The new code is in place and synced, so a thread seen clear can never
    enter them again."""
    busy_by: dict[int, set[tuple[int, int]]] = {}

    def look(th: Thread) -> None:
        words = _thread_words(mem, maps, th)
        hit = {(a, n) for a, n in watch if _hits(words, a - 1, a + n)}
        if hit:
            busy_by[th.tid] = hit
        else:
            busy_by.pop(th.tid, None)

    pending = list(world.threads)
    for _ in range(WATCH_ROUNDS):
        world.visit(pending, look)
        pending = [t for t in busy_by if t in world.threads]
        if not pending:
            break
        time.sleep(0.0005)
    return set().union(*(busy_by[t] for t in pending)) if pending else set()

"""Transactions in the Detours sense: begin, add site changes, commit all-or-nothing (DESIGN.md §2, §4 B).

``commit`` runs protocol B (stop the world): every thread is seized and interrupted (:mod:`.process.threads`),
the bytes at every site are checked against what the change expects (invariant 2), a thread whose RIP lies
inside the bytes being overwritten is moved to the matching place in the trampoline (Detours'
``DetourTransactionCommit``; research §3.3), including the syscall-restart case where ``RIP-2`` is inside
(research §4.3), every change is written with one ``pwrite`` each, and the threads are released. If anything
fails after the first write, every written byte is restored before the threads run again (invariant 3).
Catchable signals are blocked in the tool while the threads are stopped, so Ctrl-C cannot split a commit.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from .errors import HotpatchError, MismatchError, SiteError
from .process.maps import Mapping, read_maps
from .process.memory import Memory
from .process.threads import Thread, World

STACK_SCAN_LIMIT = 1 << 20  # bytes of stack scanned per thread for return addresses


@dataclass(frozen=True)
class SiteChange:
    """Replace ``expected`` by ``new`` at ``address`` (same length).

    ``rip_map`` maps every instruction boundary strictly inside the overwritten instructions
    ``(address, address + span)`` (and the end) to where a thread stopped there must continue; an empty map
    means no thread can be inside (the old bytes are a single instruction). ``label`` names it in errors.
    """

    address: int
    expected: bytes
    new: bytes
    label: str
    span: int = 0
    rip_map: dict[int, int] = field(default_factory=dict)


@dataclass
class CommitReport:
    """What a commit did: ``pause_us`` (µs from the first interrupt to the last release), ``threads``
    stopped, threads ``moved`` out of overwritten bytes, and watched regions found ``busy`` (a RIP or a
    stack word inside them)."""

    pause_us: float = 0.0
    threads: int = 0
    moved: int = 0
    busy: set[tuple[int, int]] = field(default_factory=set)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE, signal.SIGALRM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Transaction:
    """A set of site changes in one target, applied all-or-nothing by :meth:`commit`.

    ``Transaction(pid, mem)`` begins it; :meth:`add` queues changes; :meth:`commit` writes them with every
    thread stopped. ``watch`` regions ``(addr, size)`` are checked for threads executing in them (RIP or any
    stack word) while the world is stopped, for deciding whether memory may be unmapped.
    """

    def __init__(self, pid: int, mem: Memory) -> None:
        self.pid = pid
        self.mem = mem
        self.changes: list[SiteChange] = []

    def add(self, change: SiteChange) -> None:
        """Queue one change. Raises SiteError when it overlaps a queued one."""
        for c in self.changes:
            if c.address < change.address + len(change.new) and change.address < c.address + len(c.new):
                raise SiteError(f"{change.label} overlaps {c.label}")
        self.changes.append(change)

    def commit(self, watch: Sequence[tuple[int, int]] = ()) -> CommitReport:
        """Apply every queued change under protocol B. Raises MismatchError when a site's bytes differ from
        the expected ones (nothing written), TargetError when the target cannot be stopped or exits."""
        report = CommitReport()
        maps = read_maps(self.pid) if watch else []
        world = World(self.pid)
        with _signals_blocked():
            try:
                world.seize()
                t0 = time.perf_counter()
                world.stop()
                report.threads = len(world.threads)
                self._check_bytes()
                moves = self._plan_moves(world)
                self._write_all()
                for th, rip in moves:
                    assert th.regs is not None
                    regs = th.regs.copy()
                    regs.rip = rip
                    world.set_regs(th.tid, regs)
                report.moved = len(moves)
                if watch:
                    report.busy = self._busy(world, watch, maps)
            finally:
                world.release()
                if report.threads:
                    report.pause_us = (time.perf_counter() - t0) * 1e6
        return report

    def _check_bytes(self) -> None:
        for c in self.changes:
            now = self.mem.read(c.address, len(c.expected))
            if now != c.expected:
                raise MismatchError(
                    f"{c.label}: the bytes at {c.address:#x} are {now.hex()}, expected {c.expected.hex()} "
                    "(changed by something else?)"
                )

    def _plan_moves(self, world: World) -> list[tuple[Thread, int]]:
        moves = []
        for th in world.stopped_threads():
            assert th.regs is not None
            rip = th.regs.rip
            for c in self.changes:
                inside = c.address < rip < c.address + c.span
                # a syscall restart rewinds RIP by 2 onto the `syscall` instruction (research §4.3)
                rewound = th.restarting and c.address <= rip - 2 < c.address + c.span
                if not (inside or rewound):
                    continue
                if rip not in c.rip_map:
                    raise SiteError(
                        f"{c.label}: thread {th.tid} is stopped at {rip:#x}, not on an instruction "
                        "boundary of the overwritten bytes"
                    )
                moves.append((th, c.rip_map[rip]))
        return moves

    def _write_all(self) -> None:
        written: list[SiteChange] = []
        try:
            for c in self.changes:
                self.mem.write(c.address, c.new)
                written.append(c)
        except HotpatchError:
            for c in reversed(written):
                with suppress(HotpatchError):
                    self.mem.write(c.address, c.expected)
            raise

    def _busy(self, world: World, watch: Sequence[tuple[int, int]], maps: list[Mapping]) -> set[tuple[int, int]]:
        """Regions of ``watch`` that a stopped thread's RIP or a word of its stack points into (``maps``
        read just before the stop locates each stack)."""
        busy: set[tuple[int, int]] = set()
        for th in world.stopped_threads():
            assert th.regs is not None
            values = [th.regs.rip, *self._stack_words(maps, th.regs.rsp)]
            for addr, size in watch:
                if any(addr <= v < addr + size for v in values):
                    busy.add((addr, size))
        return busy

    def _stack_words(self, maps: list[Mapping], rsp: int) -> list[int]:
        region = next((m for m in maps if m.start <= rsp < m.end), None)
        if region is None:
            return []
        end = min(region.end, rsp + STACK_SCAN_LIMIT)
        start = rsp & ~7
        data = self.mem.try_read(start, end - start)
        if not data:
            return []
        return list(memoryview(data).cast("Q"))


def scan_busy(pid: int, mem: Memory, watch: Sequence[tuple[int, int]]) -> CommitReport:
    """Stop the world only to find which ``watch`` regions are in use (an empty transaction)."""
    if not watch:
        return CommitReport()
    return Transaction(pid, mem).commit(watch)

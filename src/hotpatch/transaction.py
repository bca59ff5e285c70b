"""Transactions in the Detours sense: begin, add site changes, commit all-or-nothing (DESIGN.md §2, §4 B).

``commit`` runs protocol B (stop the world): every thread is seized and interrupted (:mod:`.process.threads`),
the bytes at every site are checked against what the change expects (invariant 2), a thread whose RIP lies
inside the bytes being overwritten is moved to the matching place in the trampoline (Detours'
``DetourTransactionCommit``; research §3.3), including the syscall-restart case where ``RIP-2`` is inside
(research §4.3) — before any byte is written, so a SIGKILL of the tool never resumes a thread inside a new
jump —, every change is written with one ``pwrite`` each, and the threads are released. If anything
fails after the first write, every written byte is restored before the threads run again (invariant 3).
Whether memory to free is still in use is checked after the release, with the threads running
(:func:`.inuse.watch_pass`): reading 512 stacks with the world stopped took longer than the commit.
Catchable signals are blocked in the tool while the threads are stopped, so Ctrl-C cannot split a commit.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingOf
from collections.abc import Sequence
from contextlib import suppress
from types import MappingProxyType
from typing import NamedTuple

from .consistency import StackBusy, Watched, busy
from .errors import HotpatchError, MismatchError, SiteError
from .inuse import watch_pass
from .process import ptrace
from .process.live import LiveWorld
from .process.maps import Mapping, read_maps
from .process.memory import Memory
from .process.stackview import look
from .process.threads import Thread, World
from .process.tracer import run_as_tracer


class SiteChange(NamedTuple):
    """Replace ``expected`` by ``new`` at ``address`` (same length).

    ``rip_map`` maps every instruction boundary strictly inside the overwritten instructions
    ``(key, key + span)`` (and the end) to where a thread stopped there must continue; an empty map and
    ``span`` 0 mean no thread can be inside (the old bytes are a single instruction, or never executed).
    ``label`` names it in errors. ``key_address`` is the instruction threads enter the change through
    (default ``address``; after the padding for short-jump sites): protocols A and R (:mod:`hotpatch.livecommit`)
    make it the last word written. ``word``: the change is one aligned data word (a vtable slot), written by
    protocols A and R with one store (:class:`hotpatch.x86.selfloop.Edit`).
    """

    address: int
    expected: bytes
    new: bytes
    label: str
    span: int = 0
    rip_map: MappingOf[int, int] = MappingProxyType({})
    key_address: int | None = None
    word: bool = False

    @property
    def key(self) -> int:
        """The address of the key instruction (``key_address``, else ``address``)."""
        return self.address if self.key_address is None else self.key_address


class CommitReport:
    """What a commit did: ``pause_us`` (the longest time any thread was stopped, µs; under protocol B, from the first
    interrupt to the last release), ``threads`` traced, threads ``moved`` out of overwritten bytes (B; 0 under A and R,
    which stop no thread inside), watched regions found ``busy`` (a RIP or a stack word inside them), ``window_us`` the
    whole commit's length (µs) and the ``protocol`` used. ``check_stop_us``: the longest time one thread was stopped
    other than the one borrowed to run the commit (A and R: protocol R's check and the watch, a thread stopped alone
    where no perf sample could be had; B: ``pause_us``), µs; ``check_stops``: how many stops those were (A and R:
    counted per stop, a thread asleep in the kernel being looked at without one; B: one per thread of the world's stop,
    the watch after it not counted); ``check_samples``: the threads looked at through a perf sample, with no stop (A and
    R, :mod:`hotpatch.process.sampling`)."""

    __slots__ = (
        "busy",
        "check_samples",
        "check_stop_us",
        "check_stops",
        "moved",
        "pause_us",
        "protocol",
        "threads",
        "window_us",
    )

    def __init__(self, protocol: str = "B") -> None:
        self.pause_us = 0.0
        self.check_stop_us = 0.0
        self.check_stops = 0
        self.check_samples = 0
        self.window_us = 0.0
        self.threads = 0
        self.moved = 0
        self.protocol = protocol
        self.busy: set[tuple[int, int]] = set()


def check_bytes(mem: Memory, changes: Sequence[SiteChange]) -> None:
    """Invariant 2: every change's ``expected`` bytes are in the target now. Raises MismatchError naming
    the first site that differs (nothing has been written)."""
    for c in changes:
        now = mem.read(c.address, len(c.expected))
        if now != c.expected:
            raise MismatchError(
                f"{c.label}: the bytes at {c.address:#x} are {now.hex()}, expected {c.expected.hex()} "
                "(changed by something else?)"
            )


class ChangeSet:
    """Queued site changes that do not overlap (the ``add`` half of a transaction)."""

    def __init__(self) -> None:
        self.changes: list[SiteChange] = []

    def add(self, change: SiteChange) -> None:
        """Queue one change. Raises SiteError when it overlaps a queued one."""
        for c in self.changes:
            if c.address < change.address + len(change.new) and change.address < c.address + len(c.new):
                raise SiteError(f"{change.label} overlaps {c.label}")
        self.changes.append(change)


class Transaction(ChangeSet):
    """A set of site changes in one target, applied all-or-nothing by :meth:`commit`.

    ``Transaction(pid, mem, bitness)`` begins it; :meth:`add` queues changes; :meth:`commit` writes them with
    every thread stopped. ``watch`` regions ``(addr, size)`` are checked for threads executing in them (RIP or
    any stack word: 8 bytes, 4 in an i386 target of ``bitness`` 32) while the world is stopped, for deciding
    whether memory may be unmapped.
    """

    def __init__(self, pid: int, mem: Memory, bitness: int = 64) -> None:
        super().__init__()
        self.pid = pid
        self.mem = mem
        self.word = bitness // 8

    def commit(self, watch: Sequence[tuple[int, int]] = (), clear: Sequence[Watched] = ()) -> CommitReport:
        """Apply every queued change under protocol B. Raises MismatchError when a site's bytes differ from
        the expected ones (nothing written), TargetError when the target cannot be stopped or exits, StackBusy
        when a stopped thread has a function of ``clear`` on its stack (``--consistency stack``,
        :mod:`hotpatch.consistency`; nothing written, every thread released where it was).

        The stop runs on a tracer thread (:mod:`hotpatch.process.tracer`): the threads resume when it exits, in
        one pass of the kernel; ``pause_us`` ends when its work ends, before that exit. The watch, on another
        tracer thread, follows."""
        maps = read_maps(self.pid) if clear else []
        report = run_as_tracer(lambda: self._commit_stopped(clear, maps))
        if watch:
            report.busy = run_as_tracer(lambda: self._watch(watch))
        return report

    def _commit_stopped(self, clear: Sequence[Watched] = (), maps: list[Mapping] | None = None) -> CommitReport:
        report = CommitReport()
        world = World(self.pid, exit_detaches=True)
        try:  # (Ctrl-C and the other termination signals are held by run_as_tracer)
            world.seize()
            world.stop()
            report.threads = report.check_stops = len(world.threads)
            self._check_bytes()
            for th in world.stopped_threads() if clear else ():
                hit = busy(look(self.mem, maps or [], th, self.word), clear)
                if hit is not None:
                    raise StackBusy(th.tid, hit.name)
            moves = self._plan_moves(world)
            # Move threads out of the overwritten bytes before writing them, and set their registers at
            # once: the trampoline runs the same instructions, so a moved thread is right whether or not the
            # write follows, even if the tool is SIGKILLed in between (the kernel then lets it run on).
            before = {th.tid: th.regs.copy() for th, _ in moves if th.regs is not None}
            for th, rip in moves:
                assert th.regs is not None
                regs = th.regs.copy()
                regs.rip = rip
                world.set_regs(th.tid, regs)
                ptrace.set_regs(th.tid, regs)
            try:
                self._write_all()
            except BaseException:
                for tid, regs in before.items():  # nothing stays written: back to where they were
                    world.set_regs(tid, regs)
                raise
            report.moved = len(moves)
        finally:
            world.release()
            report.pause_us = report.check_stop_us = world.longest_stop_us
        return report

    def _watch(self, watch: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
        """The regions of ``watch`` still in use, each thread looked at on its own (the new code is written)."""
        live = LiveWorld(self.pid, exit_detaches=True)
        try:
            live.seize()
            return watch_pass(live, self.mem, read_maps(self.pid), watch, self.word)
        finally:
            live.detach_all()

    def _check_bytes(self) -> None:
        check_bytes(self.mem, self.changes)

    def _plan_moves(self, world: World) -> list[tuple[Thread, int]]:
        moves: list[tuple[Thread, int]] = []
        spans = [c for c in self.changes if c.span]
        if not spans:
            return moves
        # one bounds test per thread (this runs with every thread stopped: 512 threads, 0.1 ms)
        low, high = min(c.key for c in spans), max(c.key + c.span for c in spans) + 2
        for th in world.stopped_threads():
            assert th.regs is not None
            rip = th.regs.rip
            if not low < rip < high:
                continue
            for c in spans:
                inside = c.key < rip < c.key + c.span
                # a syscall restart rewinds RIP by 2 onto the `syscall` instruction (research §4.3)
                rewound = th.restarting and c.key <= rip - 2 < c.key + c.span
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

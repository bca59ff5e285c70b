"""Protocols A (no stop) and R (rolling): a commit made by a thread of the target (DESIGN.md §4, §5).

The stores are made by :mod:`hotpatch.x86.selfloop`'s program, run by one thread of the target (asleep in a
system call when there is one), so a SIGKILL of the tool at any point never leaves a trap or a half-made change
behind: the program ends on its own. Steps:

1. All threads are seized and left running (:class:`~hotpatch.process.live.LiveWorld`) — under protocol A
   with no memory to watch, only the one that will run the program: no other thread is touched at all. One
   thread, whose registers and stack are clear of the bytes to overwrite, maps a code page and a data page
   (two injected system calls), and is pointed at the program. Threads are only ever stopped one at a time.
2. The program puts ``EB FE`` at every key and syncs (``membarrier`` SYNC_CORE, registered once per process
   before anything is written). A thread reaching a key now spins there for the rest of the window.
3. Protocol R only (changes with ``span``): the tool looks at the threads (:func:`~hotpatch.inuse.views`: in
   place when asleep, through a perf sample when running, stopped alone only where neither works; no two are
   ever stopped by us at once) until each has been seen with no RIP (or syscall-restart RIP - 2) and no stack
   word strictly inside ``(key, key + span)``. Then it writes the go flag (or abort, after ROLLING_TIMEOUT_S).
4. The program writes the other bytes, syncs, writes each key's new first word, syncs, and returns its
   thread to what it was doing. The tool unmaps the two pages once that thread has left them.

Each commit runs on a thread of its own whose exit detaches every seized thread (:mod:`hotpatch.process.tracer`):
leaving costs no stop, and the tool's catchable termination signals are held while it runs.
"""

from __future__ import annotations

import itertools
import os
import struct
import time
from collections.abc import Callable, Sequence
from contextlib import suppress

from .errors import HotpatchError, SiteError, TargetError
from .forkfix import await_forks, in_fork, settle_child
from .inuse import views, watch_pass
from .process import remote
from .process.live import LiveWorld, thread_views
from .process.maps import Mapping, read_maps
from .process.memory import Memory
from .process.ptrace import Regs
from .process.remote import Injector
from .process.stackview import ThreadView, look
from .process.threads import Thread, list_tids, thread_state
from .process.tracer import run_as_tracer
from .transaction import CommitReport, SiteChange, check_bytes
from .x86 import selfloop, stub

ROLLING_TIMEOUT_S = 2.0  # how long protocol R waits for every thread to leave the overwritten bytes
PROGRAM_WAIT_S = 3  # how long the program waits for the tool's go before it undoes the self-loops itself
PROGRAM_TIMEOUT_S = 10.0  # how long the tool waits for the program to end
POLL_S = 0.0002


class RollingTimeout(TargetError):
    """Protocol R saw a thread stay inside the bytes to overwrite for ROLLING_TIMEOUT_S (nothing changed)."""


def wait_settled(mem: Memory, keys: Sequence[int]) -> None:
    """Wait until no address of ``keys`` holds a self-loop: a commit program left running by a tool that
    was killed ends (or undoes itself) within PROGRAM_WAIT_S. Raises TargetError if one is still there after
    twice that."""
    deadline = time.monotonic() + 2 * PROGRAM_WAIT_S
    while True:
        busy = [k for k in keys if mem.try_read(k, 2) == selfloop.SELF_LOOP]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise TargetError(f"a commit is still running in the target (self-loop at {busy[0]:#x})")
        time.sleep(0.001)


def _left_programs(mem: Memory, maps: list[Mapping]) -> list[int]:
    """The code pages of commit programs not known to have ended: the last page of an anonymous ``r-x``
    mapping directly followed by an anonymous ``rw-`` page holding ``selfloop.MAGIC`` whose ``D_STATE`` is not
    final (the kernel may merge either page with a neighbour of the same kind)."""
    out = []
    for code, data in itertools.pairwise(maps):
        if code.path or data.path or code.perms[:3] != "r-x" or data.perms[:3] != "rw-" or data.start != code.end:
            continue
        head = mem.try_read(data.start, selfloop.DATA_SIZE)
        magic = head[selfloop.D_MAGIC : selfloop.D_MAGIC + len(selfloop.MAGIC)] if head else b""
        if head and magic == selfloop.MAGIC and head[selfloop.D_STATE] not in selfloop.FINAL:
            out.append(code.end - selfloop.PAGE)
    return out


def settle_programs(pid: int, mem: Memory, maps: list[Mapping]) -> None:
    """Wait for every commit program a killed tool left in ``pid`` to end, before anything is read from the
    code or the record: between its launch and its first store (a membarrier registration can take ms), the
    sites still look untouched, and a command that freed the patch's memory then would let the program
    write jumps into nothing.

    A program is running iff a thread's RIP is in its code page (the tool points the thread there before it
    lets it go; the program publishes its outcome before it leaves), or a word of its stack is (a signal
    handler run after the program unblocked signals, which returns into it: :func:`left_program`); threads
    are looked at one at a time.
    One no thread is in never ran, and never will: it is marked ABANDONED. Raises TargetError when a running
    one does not end within PROGRAM_TIMEOUT_S."""
    pending = _left_programs(mem, maps)
    if not pending:
        return
    seen = thread_views(pid, mem).values()
    live = {a for a in pending if any(v.touches(a - 1, a + selfloop.PAGE) for v in seen)}
    deadline = time.monotonic() + PROGRAM_TIMEOUT_S
    for area in pending:
        state = area + selfloop.PAGE + selfloop.D_STATE
        if area not in live:
            mem.write(state, bytes([selfloop.ABANDONED]))
            continue
        while mem.read(state, 1)[0] not in selfloop.FINAL:
            if time.monotonic() > deadline:
                raise TargetError(f"a commit left by a killed hotpatch still runs in PID {pid} (program at {area:#x})")
            time.sleep(0.001)


def _prot(maps: list[Mapping], page: int) -> int:
    for m in maps:
        if m.start <= page < m.end:
            return sum(bit for ch, bit in zip(m.perms[:3], (1, 2, 4), strict=True) if ch != "-")
    raise TargetError(f"no mapping holds the code at {page:#x}")


class LiveCommit:
    """One commit of ``changes`` with the world running; see the module docstring.

    ``watch``: regions (addr, bytes) to check, after the commit, for threads still using them (RIP or a stack word
    inside), as protocol R's check looks at them — for deciding whether memory may be freed. ``bitness``: the target's
    (64, or 32 for i386: 4-byte stack words, a 32-bit program).
    """

    def __init__(self, pid: int, mem: Memory, stub_area: int, changes: Sequence[SiteChange], bitness: int = 64) -> None:
        self.pid, self.mem, self.stub = pid, mem, stub_area
        self.bitness, self.word = bitness, bitness // 8
        self.changes = list(changes)
        self._runner_tid = 0  # the thread borrowed to run the program (0: none yet)
        self.edits = [selfloop.Edit(c.address, c.expected, c.new, c.key, c.word) for c in self.changes]
        self.loops = any(selfloop.needs_loop(e) for e in self.edits)  # some key spins on EB FE meanwhile
        self._prot: dict[int, int] = {}  # page -> its protection before the program (PROT_* bits)
        self._area = 0  # the program's two pages, once mapped
        for c in self.changes:
            if c.word:
                if c.address % self.word or len(c.new) != self.word:
                    raise SiteError(f"{c.label}: {c.address:#x} is not an aligned {self.word}-byte word")
            elif not selfloop.key_fits(c.key):
                raise SiteError(f"{c.label}: the key at {c.key:#x} ends a cache line; no atomic 2-byte store")

    def run(self, watch: Sequence[tuple[int, int]] = ()) -> CommitReport:
        """Apply every change. Raises MismatchError when a site's bytes differ from the expected ones
        (nothing written), RollingTimeout when protocol R cannot see every thread leave the overwritten bytes
        in time, TargetError when the target cannot be traced or the program fails (the old bytes are back
        in every case). The work runs on a tracer thread (:mod:`hotpatch.process.tracer`), whose exit detaches
        every thread without stopping it."""
        return run_as_tracer(lambda: self._run(watch))

    def _run(self, watch: Sequence[tuple[int, int]]) -> CommitReport:
        report = CommitReport()
        world = LiveWorld(self.pid, exit_detaches=True)
        maps = read_maps(self.pid)
        started = time.perf_counter()
        try:  # (Ctrl-C and the other termination signals are held by run_as_tracer)
            if watch or self.loops or any(c.span for c in self.changes):
                # R's check or the watch looks at every thread; a child forked while a key spins is settled
                world.on_fork = self._settle_child
                world.seize()
            world.boost()  # (protocol A with short jumps alone and nothing to watch traces the program's thread alone)
            check_bytes(self.mem, self.changes)
            forks = self.loops and world.on_fork is not None  # a child may have copied a self-loop
            out_of_fork: set[int] = set()
            try:
                self._commit(world, maps)
                if watch:  # its looks also show who is out of fork()

                    def seen(tid: int, view: ThreadView | None) -> None:
                        if view is None or not in_fork(view, self.mem):
                            out_of_fork.add(tid)

                    report.busy = watch_pass(world, self.mem, maps, watch, self.word, seen if forks else None)
            finally:
                if forks:
                    with suppress(HotpatchError):
                        await_forks(world, self.mem, maps, self.word, out_of_fork)
            report.threads = len(world.threads)
        finally:
            world.detach_all()
        report.pause_us = world.longest_one_us
        report.check_stop_us = max((us for t, us in world.longest_by_tid.items() if t != self._runner_tid), default=0.0)
        report.check_stops = sum(n for t, n in world.stops_by_tid.items() if t != self._runner_tid)
        report.check_samples = sum(n for t, n in world.samples_by_tid.items() if t != self._runner_tid)
        report.window_us = (time.perf_counter() - started) * 1e6
        return report

    def _commit(self, world: LiveWorld, maps: list[Mapping]) -> None:
        if not self.changes:  # a revert that only frees retired memory
            return
        ranges = [(c.key, c.key + c.span) for c in self.changes if c.span]
        th = self._runner(world, maps, ranges)
        self._runner_tid = th.tid
        inject = Injector(world, self.mem, self.stub, th)
        try:
            # The program's page is mapped read+execute at once and written through /proc/PID/mem (which needs no
            # write permission); only the data page is made writable: no page ever goes from writable to
            # executable, which a policy forbidding mprotect(PROT_EXEC) (seccomp, SELinux execmod) refuses.
            area = inject.mmap(
                0, 2 * selfloop.PAGE, remote.PROT_READ | remote.PROT_EXEC, remote.MAP_PRIVATE | remote.MAP_ANONYMOUS
            )
            self._area, data = area, area + selfloop.PAGE
            inject(inject.sys.mprotect, data, selfloop.PAGE, remote.PROT_READ | remote.PROT_WRITE)
            resume = inject.saved.copy()
            resume.rip, resume.rax = inject.arch.resume_point(inject.saved)
            resume.orig_rax = 2**64 - 1
            prot = self._prot = {page: _prot(maps, page) for page in selfloop.pages_of(self.edits)}
            wait = PROGRAM_WAIT_S if ranges else None
            self.mem.write(area, selfloop.build(area, self.edits, prot, resume, wait, self.bitness))
            self.mem.write(data, selfloop.data_page(self.bitness))
        except remote.SyscallError as e:
            if self._area:
                with suppress(HotpatchError, OSError):
                    inject(inject.sys.munmap, self._area, 2 * selfloop.PAGE)
                self._area = 0
            raise TargetError(f"cannot set up the commit in PID {self.pid}: {e.strerror}") from None
        finally:
            inject.close()
        self._launch(world, th, resume, area)
        try:
            outcome = self._follow(world, maps, data, ranges)
            err = struct.unpack("<i", self.mem.read(data + selfloop.D_ERR, 4))[0]  # read before the unmap
        finally:
            self._unmap(world, th.tid, area)
        if outcome == selfloop.FAILED:
            raise TargetError(f"the commit in PID {self.pid} could not start: {os.strerror(-err)}")

    def _settle_child(self, child: int) -> None:
        """LiveWorld.on_fork: settle a child forked meanwhile (:func:`hotpatch.forkfix.settle_child`)."""
        settle_child(child, self.edits, self._prot, self.stub, self._area)

    def _launch(self, world: LiveWorld, th: Thread, resume: Regs, area: int) -> None:
        """Point the stopped thread ``th`` at the program at ``area`` and let it run (from here on, the
        program ends without the tool). Its stack is below the interrupted code's red zone."""
        regs = resume.copy()
        regs.rip = area
        regs.rsp = (resume.rsp - 2 * stub.RED_ZONE) & ~15
        world.set_regs(th.tid, regs)
        world.resume_one(th.tid)

    def _runner(self, world: LiveWorld, maps: list[Mapping], ranges: list[tuple[int, int]]) -> Thread:
        """A stopped thread to run the program: asleep first, the main thread among equals, with no RIP and
        no stack word inside ``ranges`` (it is not looked at again). A thread not yet seized is seized here
        (protocol A seizes no other)."""
        tids = list(world.threads) or list_tids(world.pid)
        tids.sort(key=lambda t: (thread_state(world.pid, t) != "S", t != world.pid))
        for tid in tids:
            if tid not in world.threads:
                try:
                    world.seize_thread(tid)
                except TargetError:
                    if os.path.exists(f"/proc/{world.pid}/task/{tid}"):
                        raise  # e.g. traced by another tool: refused before anything changed
                    continue  # it exited
            if world.threads[tid].group_stop:
                continue
            th = world.stop_one(tid)
            if th is None:
                continue
            assert th.regs is not None
            view = look(self.mem, maps, th, self.word)
            if remote.thread_bitness(th.regs) == self.bitness and not any(view.touches(lo, hi) for lo, hi in ranges):
                return th
            world.resume_one(tid)
        raise TargetError(f"PID {world.pid} has no thread able to make the change (stopped by job control?)")

    def _state(self, data: int) -> int:
        return int(self.mem.read(data + selfloop.D_STATE, 1)[0])

    def _wait_state(self, world: LiveWorld, data: int, until: set[int]) -> int:
        deadline = time.monotonic() + PROGRAM_TIMEOUT_S
        while True:
            world.pump()
            state = self._state(data)
            if state in until:
                return state
            if time.monotonic() > deadline:
                raise TargetError(f"the commit in PID {world.pid} did not end in time (a thread stopped?)")
            time.sleep(POLL_S)

    def _follow(self, world: LiveWorld, maps: list[Mapping], data: int, ranges: list[tuple[int, int]]) -> int:
        """Drive the program to its end; returns its final D_STATE. Raises RollingTimeout (after the
        program undid the self-loops)."""
        ends = {selfloop.DONE, selfloop.ABORTED, selfloop.FAILED}
        if not ranges:
            return self._wait_state(world, data, ends)
        state = self._wait_state(world, data, ends | {selfloop.ARMED})
        if state != selfloop.ARMED:
            return state
        try:
            _rolling(world, self.mem, maps, ranges, self.word)
        except BaseException:
            self.mem.write(data + selfloop.D_GO, bytes([selfloop.GO_ABORT]))
            with suppress(HotpatchError):
                self._wait_state(world, data, ends)
            raise
        self.mem.write(data + selfloop.D_GO, bytes([selfloop.GO_COMMIT]))
        state = self._wait_state(world, data, ends)
        if state == selfloop.ABORTED:
            raise TargetError(f"the commit in PID {world.pid} gave up waiting for the tool; nothing changed")
        return state

    def _unmap(self, world: LiveWorld, tid: int, area: int) -> None:
        """Unmap the program's pages once its thread has left them for good (:func:`unmap_program`)."""
        unmap_program(world, self.mem, self.stub, tid, area, self.word)


def unmap_program(
    world: LiveWorld, mem: Memory, stub_area: int, tid: int, area: int, word: int, looks: int = 200
) -> bool:
    """Unmap the commit program's two pages at ``area`` (``2 * selfloop.PAGE`` bytes) through seized thread
    ``tid``, the one that ran it, once :func:`left_program` says it can never run them again; it is stopped
    alone for each look (at most ``looks``, POLL_S apart) and resumed. Best effort: returns True when they
    were unmapped, False when the thread is gone, or still in them after every look (they stay mapped: a few
    KiB kept rather than a crash), or the munmap failed (``stub_area``: the injection stub's room)."""
    maps = read_maps(world.pid)
    for _ in range(looks):
        th = world.stop_one(tid) if tid in world.threads else None
        if th is None:
            return False
        try:
            if left_program(mem, maps, th, area, word):
                inject = Injector(world, mem, stub_area, th)
                try:
                    inject(inject.sys.munmap, area, 2 * selfloop.PAGE)
                    return True
                finally:
                    inject.close()
        except (HotpatchError, OSError):
            return False
        finally:
            if tid in world.threads:
                world.resume_one(tid)
        time.sleep(POLL_S)
    return False


def left_program(mem: Memory, maps: list[Mapping], th: Thread, area: int, word: int) -> bool:
    """True when the stopped thread ``th`` can never again run the program's code page at ``area``: neither
    its RIP (nor RIP - 2 of a syscall restart) nor any ``word``-byte word of its stack (up to
    ``stackview.STACK_SCAN_LIMIT`` bytes above RSP, on whichever stack RSP is: an alternate signal stack too) lies
    in the page.

    RIP alone is not enough: the program unblocks signals before its last instructions, so a signal can be
    delivered there, and while its handler runs RIP is outside the page but the signal frame on the stack
    holds the saved RIP inside it (``struct rt_sigframe``'s ``uc_mcontext``, arch/x86/kernel/signal_64.c);
    ``rt_sigreturn`` would jump back into an unmapped page (SIGSEGV). The program itself pushes no address
    of its page (it makes no ``call``), so only such a frame can put one there."""
    return not look(mem, maps, th, word).touches(area - 1, area + selfloop.PAGE)


def _rolling(world: LiveWorld, mem: Memory, maps: list[Mapping], ranges: list[tuple[int, int]], word: int) -> None:
    """Protocol R's check: every thread seen once with nothing in any ``(key, key + span)`` of ``ranges``.

    Threads created after the self-loops were synced cannot be inside (they could only enter through a key).
    Raises RollingTimeout when some thread stays inside for ROLLING_TIMEOUT_S.
    """
    pending = {t for t in world.threads if not world.threads[t].group_stop}

    def clear(view: ThreadView) -> bool:
        return not any(view.touches(lo, hi) for lo, hi in ranges)

    _rolling_rounds(world, mem, maps, pending, clear, time.monotonic() + ROLLING_TIMEOUT_S, word)


def _rolling_rounds(
    world: LiveWorld,
    mem: Memory,
    maps: list[Mapping],
    pending: set[int],
    clear: Callable[[ThreadView], bool],
    deadline: float,
    word: int,
) -> None:
    """Look at the ``pending`` threads (:func:`~hotpatch.inuse.views`) until each was seen ``clear``; raises
    RollingTimeout."""
    while pending:
        for tid, view in views(world, mem, maps, sorted(pending), word).items():
            if view is None or clear(view):
                pending.discard(tid)
        if pending:
            if time.monotonic() > deadline:
                raise RollingTimeout(
                    f"thread {min(pending)} of PID {world.pid} stayed inside the bytes to overwrite for "
                    f"{ROLLING_TIMEOUT_S:g} s; nothing was changed"
                )
            time.sleep(0.001)

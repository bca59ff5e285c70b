"""Is code in use? A thread's RIP and stack words against address ranges (DESIGN.md §4 R, §5 freeing memory).

A thread uses a range of code when its RIP, the RIP a syscall restart will rewind it to (RIP - 2, research
§4.3), or any word of its stack (a return address, a signal frame's saved RIP) lies inside. Threads are looked
at one at a time with the others running (:class:`~hotpatch.process.live.LiveWorld`), so this costs each
thread one short stop and never stops two at once — and a thread asleep in the kernel no stop at all
(:func:`look_asleep`).
"""

from __future__ import annotations

import bisect
import struct
import time
from collections.abc import Sequence
from typing import NamedTuple

from .process.live import LiveWorld
from .process.maps import Mapping
from .process.memory import Memory
from .process.threads import Thread

STACK_SCAN_LIMIT = 1 << 20  # bytes of stack scanned per thread for return addresses
WATCH_S = 0.05  # how long a busy thread is looked at again when checking whether memory is still in use


def stack_words(data: bytes, word: int) -> list[int]:
    """The ``word``-byte (8, or 4 for i386) little-endian values of ``data``, a stack read from an aligned
    address (a trailing partial word is ignored)."""
    return memoryview(data[: len(data) - len(data) % word]).cast("Q" if word == 8 else "I").tolist()


class ThreadView(NamedTuple):
    """What of a stopped thread can point into code: ``pcs`` (RIP, and RIP - 2 when a syscall restart will
    rewind it, research §4.3) and ``stack`` (its used stack, read from a ``word``-aligned RSP)."""

    pcs: tuple[int, ...]
    stack: bytes
    word: int

    def touches(self, lo: int, hi: int) -> bool:
        """True when a pc or a ``word``-byte stack word lies in ``(lo, hi)`` (both excluded).

        Runs while the thread is stopped, over KiBs of stack (glibc puts the thread's TLS and ``struct
        pthread`` above its stack): for a range inside one 4 GiB block, only the words whose upper half is
        that block's are decoded, found with ``bytes.find``; the rest never reach Python.
        """
        if hi - lo <= 1:
            return False
        if any(lo < pc < hi for pc in self.pcs):
            return True
        data, word = self.stack, self.word
        if word != 8 or (lo + 1) >> 32 != (hi - 1) >> 32:
            return any(lo < w < hi for w in stack_words(data, word))
        tag = struct.pack("<I", (lo + 1) >> 32)
        i = data.find(tag, 4)
        while i != -1:
            if i % 8 == 4 and i + 4 <= len(data):
                value = int.from_bytes(data[i - 4 : i + 4], "little")
                if lo < value < hi:
                    return True
            i = data.find(tag, i + 1)
        return False


def _stack(mem: Memory, maps: list[Mapping], rsp: int, word: int) -> bytes:
    """The stack from ``rsp`` up to the end of the mapping holding it (at most STACK_SCAN_LIMIT bytes; ``maps``
    sorted by address, as /proc/PID/maps is); empty when no mapping holds it."""
    i = bisect.bisect_right([m.start for m in maps], rsp) - 1
    if i >= 0 and maps[i].start <= rsp < maps[i].end:
        start = rsp & -word
        return mem.try_read(start, min(maps[i].end, start + STACK_SCAN_LIMIT) - start) or b""
    return b""


def look(mem: Memory, maps: list[Mapping], th: Thread, word: int) -> ThreadView:
    """The :class:`ThreadView` of the stopped thread ``th`` (its stack: :func:`_stack`)."""
    assert th.regs is not None
    return ThreadView(th.next_pcs, _stack(mem, maps, th.regs.rsp, word), word)


def _blocked_at(pid: int, tid: int) -> tuple[str, int] | None:
    """``(syscall line, voluntary context switches)`` of a thread blocked in the kernel, None when it runs or
    is gone. proc(5) /proc/PID/task/TID/syscall gives "NR args… SP PC" (or "-1 SP PC" when blocked outside a
    system call) only while the task stays off the CPU (kernel/ptrace.c ``task_current_syscall``), else
    "running"; the switch count is proc(5) status ``voluntary_ctxt_switches``."""
    base = f"/proc/{pid}/task/{tid}/"
    try:
        with open(base + "status", encoding="ascii", errors="replace") as f:
            switches = next((int(ln.split()[1]) for ln in f if ln.startswith("voluntary_ctxt_switches:")), -1)
        with open(base + "syscall", encoding="ascii") as f:
            line = f.read().strip()
    except (OSError, ValueError):
        return None
    return None if line.startswith("running") or switches < 0 else (line, switches)


def look_asleep(mem: Memory, maps: list[Mapping], pid: int, tid: int, word: int) -> ThreadView | None:
    """The :class:`ThreadView` of thread ``tid`` taken without stopping it, when it stays blocked in the kernel
    throughout; None when it runs (or ran meanwhile): stop it and :func:`look` instead.

    Its user registers cannot change while it is blocked, nor its stack (only it writes there). Before and
    after the stack read, its syscall line and voluntary switch count must be equal: to run user code in
    between it must have left the CPU again (count + 1) or be seen running. ``pcs`` are PC and PC - 2 (a
    syscall restart's rewind, research §4.3, counted whether or not one will happen)."""
    before = _blocked_at(pid, tid)
    if before is None:
        return None
    fields = before[0].split()
    sp, pc = int(fields[-2], 16), int(fields[-1], 16)
    data = _stack(mem, maps, sp, word)
    if _blocked_at(pid, tid) != before:
        return None
    return ThreadView((pc, pc - 2) if fields[0] != "-1" else (pc,), data, word)


def view_of(world: LiveWorld, mem: Memory, maps: list[Mapping], tid: int, word: int) -> ThreadView | None:
    """The :class:`ThreadView` of seized thread ``tid``: taken asleep (:func:`look_asleep`), else with the
    thread stopped alone for the register and stack read and resumed at once. None when it is gone."""
    view = look_asleep(mem, maps, world.pid, tid, word)
    if view is not None:
        return view
    th = world.stop_one(tid)
    if th is None:
        return None
    view = look(mem, maps, th, word)
    world.resume_one(tid)
    return view


def watch_pass(
    world: LiveWorld, mem: Memory, maps: list[Mapping], watch: Sequence[tuple[int, int]], word: int
) -> set[tuple[int, int]]:
    """The regions ``(addr, bytes)`` of ``watch`` some seized thread of ``world`` still uses (RIP or stack word
    inside); a busy thread is looked at again every 0.5 ms for up to WATCH_S (a preempted thread may stand on
    a jump a while). Call it once the new code is in place and synced: a thread seen clear can then never
    enter the regions again."""
    busy_by: dict[int, set[tuple[int, int]]] = {}
    pending = list(world.threads)
    deadline = time.monotonic() + WATCH_S
    while True:
        for tid in pending:  # read while stopped (or asleep), judged once it runs again
            view = view_of(world, mem, maps, tid, word)
            if view is None:
                busy_by.pop(tid, None)
                continue
            hit = {(a, n) for a, n in watch if view.touches(a - 1, a + n)}
            if hit:
                busy_by[tid] = hit
            else:
                busy_by.pop(tid, None)
        pending = [t for t in busy_by if t in world.threads]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.0005)
    return set().union(*(busy_by[t] for t in pending)) if pending else set()

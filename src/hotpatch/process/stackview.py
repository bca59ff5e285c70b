"""What of a stopped thread can point into code: its next instructions and the words of its stack.

A thread can come back to an address through its RIP, a return address, or a signal frame's saved RIP
(``struct rt_sigframe``, arch/x86/kernel/signal_64.c): all of these are words on the stack it runs on, so the
used stack, from RSP to the end of the mapping holding it (at most ``STACK_SCAN_LIMIT`` bytes), is read and
searched. Used by :mod:`hotpatch.inuse` (memory still in use, threads inside overwritten bytes) and by
:mod:`hotpatch.process.remote` (a stub left by a killed tool).
"""

from __future__ import annotations

import bisect
import struct
from typing import NamedTuple

from .maps import Mapping
from .memory import Memory
from .threads import Thread

STACK_SCAN_LIMIT = 1 << 20  # bytes of stack scanned per thread for return addresses


def stack_words(data: bytes, word: int) -> list[int]:
    """The ``word``-byte (8, or 4 for i386) little-endian values of ``data``, a stack read from an aligned
    address (a trailing partial word is ignored)."""
    return memoryview(data[: len(data) - len(data) % word]).cast("Q" if word == 8 else "I").tolist()


class ThreadView(NamedTuple):
    """What of a stopped thread can point into code: ``pcs`` (RIP, and RIP - 2 when a syscall restart will
    rewind it, research §4.3) and ``stack`` (its used stack, read from a ``word``-aligned RSP); ``syscall``:
    for a thread seen asleep, the proc(5) /proc/PID/task/TID/syscall line's fields (number and six
    arguments, hex), else empty."""

    pcs: tuple[int, ...]
    stack: bytes
    word: int
    syscall: tuple[str, ...] = ()

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


def stack_span(maps: list[Mapping], rsp: int, word: int) -> tuple[int, int]:
    """``(start, end)``: the stack to scan, from ``rsp`` rounded down to a word up to the end of the mapping
    holding it, at most STACK_SCAN_LIMIT bytes (``maps`` sorted by address, as /proc/PID/maps is); empty
    (start == end) when no mapping holds it."""
    i = bisect.bisect_right([m.start for m in maps], rsp) - 1
    if i >= 0 and maps[i].start <= rsp < maps[i].end:
        start = rsp & -word
        return start, min(maps[i].end, start + STACK_SCAN_LIMIT)
    return rsp, rsp


def read_stack(mem: Memory, maps: list[Mapping], rsp: int, word: int) -> bytes:
    """The stack of :func:`stack_span`, read from the target (empty when no mapping holds ``rsp``)."""
    start, end = stack_span(maps, rsp, word)
    return (mem.try_read(start, end - start) or b"") if end > start else b""


def look(mem: Memory, maps: list[Mapping], th: Thread, word: int) -> ThreadView:
    """The :class:`ThreadView` of the stopped thread ``th`` (its stack: :func:`read_stack`)."""
    assert th.regs is not None
    return ThreadView(th.next_pcs, read_stack(mem, maps, th.regs.rsp, word), word)

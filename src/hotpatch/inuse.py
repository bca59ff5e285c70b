"""Is code in use? A thread's RIP and stack words against address ranges (DESIGN.md §4 R, §5 freeing memory).

A thread uses a range of code when its RIP, the RIP a syscall restart will rewind it to (RIP - 2, research
§4.3), or any word of its stack (a return address, a signal frame's saved RIP) lies inside. Threads are looked
at one at a time with the others running (:class:`~hotpatch.process.live.LiveWorld`), so this costs each
thread one short stop and never stops two at once.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence

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


def thread_words(mem: Memory, maps: list[Mapping], th: Thread, word: int) -> list[int]:
    """The sorted RIP and ``word``-byte stack words (RSP up to the end of its mapping, at most
    STACK_SCAN_LIMIT bytes) of the stopped thread ``th``, with RIP - 2 when a syscall restart will rewind it
    (research §4.3). ``maps`` must be sorted by address (as /proc/PID/maps is)."""
    regs = th.regs
    assert regs is not None
    rsp = regs.rsp
    i = bisect.bisect_right([m.start for m in maps], rsp) - 1
    data = b""
    if i >= 0 and maps[i].start <= rsp < maps[i].end:
        start = rsp & -word
        data = mem.try_read(start, min(maps[i].end, start + STACK_SCAN_LIMIT) - start) or b""
    words = [*stack_words(data, word), regs.rip]
    if th.restarting:
        words.append(regs.rip - 2)
    return sorted(words)


def hits(words: list[int], lo: int, hi: int) -> bool:
    """True when a value of the sorted ``words`` lies in ``(lo, hi)`` (``lo`` excluded)."""
    i = bisect.bisect_right(words, lo)
    return i < len(words) and words[i] < hi


def watch_pass(
    world: LiveWorld, mem: Memory, maps: list[Mapping], watch: Sequence[tuple[int, int]], word: int
) -> set[tuple[int, int]]:
    """The regions ``(addr, bytes)`` of ``watch`` some seized thread of ``world`` still uses (RIP or stack word
    inside); a busy thread is looked at again every 0.5 ms for up to WATCH_S (a preempted thread may stand on
    a jump a while). Call it once the new code is in place and synced: a thread seen clear can then never
    enter the regions again."""
    busy_by: dict[int, set[tuple[int, int]]] = {}

    def look(th: Thread) -> None:
        words = thread_words(mem, maps, th, word)
        hit = {(a, n) for a, n in watch if hits(words, a - 1, a + n)}
        if hit:
            busy_by[th.tid] = hit
        else:
            busy_by.pop(th.tid, None)

    pending = list(world.threads)
    deadline = time.monotonic() + WATCH_S
    while True:
        world.visit(pending, look)
        pending = [t for t in busy_by if t in world.threads]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.0005)
    return set().union(*(busy_by[t] for t in pending)) if pending else set()

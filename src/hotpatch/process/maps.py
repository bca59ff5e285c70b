"""The target's address space as ``/proc/PID/maps`` shows it (proc(5), "/proc/pid/maps").

Also finds free gaps within ±2 GiB of a set of addresses, the reach of a ``jmp rel32`` (research §5,
Detours' ``detour_alloc_region_from_lo/hi``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ..errors import TargetError

PAGE = 4096
REL32_REACH = (1 << 31) - 1
MMAP_MIN_ADDR = 0x10000  # vm.mmap_min_addr's usual value; never map below it
USER_TOP = 0x7FFF_FFFF_F000  # end of the x86-64 user address space with 4-level paging


class Mapping(NamedTuple):
    """One line of /proc/PID/maps: ``[start, end)`` in bytes, permissions like ``r-xp``, file offset, path."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def executable(self) -> bool:
        """True when the mapping has the ``x`` permission."""
        return self.perms[2] == "x"


def read_maps(pid: int) -> list[Mapping]:
    """Parse ``/proc/PID/maps``. Raises TargetError when the process is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise TargetError(f"no process with PID {pid}") from None
    except PermissionError:
        raise TargetError(f"not permitted to read the memory map of PID {pid}") from None
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        lo, hi = parts[0].split("-")
        out.append(
            Mapping(
                start=int(lo, 16),
                end=int(hi, 16),
                perms=parts[1],
                offset=int(parts[2], 16),
                inode=int(parts[4]),
                path=parts[5] if len(parts) > 5 else "",
            )
        )
    return out


def mapped_file(pid: int, m: Mapping) -> str:
    """A path that opens the file behind mapping ``m`` as the target sees it: ``/proc/PID/root/<path>``, or
    ``/proc/PID/map_files/<range>`` when the file was deleted or replaced on disk (proc(5)), so a package
    upgrade never makes hotpatch read the new file for the old mapping."""
    path = m.path.removesuffix(" (deleted)")
    rooted = f"/proc/{pid}/root{path}"
    if not m.path.endswith(" (deleted)") and os.path.exists(rooted):
        return rooted
    return f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"


def page_down(addr: int) -> int:
    """Round ``addr`` down to a page boundary (4 KiB)."""
    return addr & ~(PAGE - 1)


def page_up(addr: int) -> int:
    """Round ``addr`` up to a page boundary (4 KiB)."""
    return (addr + PAGE - 1) & ~(PAGE - 1)


def gap_candidates(
    maps: Sequence[Mapping], near: Iterable[int], size: int, guard: int = PAGE, top: int = USER_TOP
) -> list[int]:
    """Start addresses of free ranges of ``size`` bytes from which every address in ``near`` is in rel32 reach.

    Each candidate keeps ``guard`` bytes free on both sides and ends at or below ``top`` (the end of the user
    address space: ``USER_TOP``, or 0xFFFFE000 for an i386 process). Sorted nearest first (distance to the
    middle of ``near``). The caller maps with ``MAP_FIXED_NOREPLACE`` and checks the result, as another thread of
    the target may map the same range meanwhile (research §5).
    """
    points = sorted(near)
    lo_need = points[-1] - REL32_REACH + 5  # the region must start at or above this
    hi_need = points[0] + REL32_REACH - 5  # ... and end at or below this
    mid = (points[0] + points[-1]) // 2
    spans = sorted((m.start, m.end) for m in maps if m.start < top)
    cands: list[int] = []
    prev_end = MMAP_MIN_ADDR
    for start, end in [*spans, (top, top)]:
        gap_lo, gap_hi = page_up(prev_end + guard), page_down(start - guard)
        prev_end = max(prev_end, end)
        lo, hi = max(gap_lo, page_up(lo_need)), min(gap_hi, page_down(hi_need))
        if hi - lo < size:
            continue
        # the end of the gap that lies closest to the sites
        cands.append(page_down(hi - size) if hi <= mid else lo)
    cands.sort(key=lambda a: abs(a - mid))
    return cands

"""Trampolines: the overwritten instructions relocated elsewhere, plus a jump back (DESIGN.md §2).

Each instruction is re-encoded by iced-x86's BlockEncoder at its new address, which fixes RIP-relative operands
and relative branches (a short ``jcc`` becomes a near one when needed; DESIGN.md §7). Encoding them one at a time
gives the map from every original instruction boundary to its trampoline address, which moves a stopped
thread's RIP out of the overwritten bytes (Detours' ``detour_align_from_target``; research §3.3).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import SiteError
from .encode import ENDBR64, jmp_rel32
from .prologue import Prologue

MAX_TRAMPOLINE = 64  # bytes reserved per trampoline: endbr64 + up to 15-byte insns grown + jmp


class Trampoline(NamedTuple):
    """Relocated code for one site. ``address``: where it is placed (its entry, called by
    ``HOTPATCH_ORIGINAL``); ``code``: its bytes; ``rip_map``: original address -> trampoline address for every
    instruction boundary in ``[site, site + length]`` (the last one maps to the jump back)."""

    address: int
    code: bytes
    rip_map: dict[int, int]


def build(prologue: Prologue, address: int) -> Trampoline:
    """Relocate ``prologue`` to ``address``. Raises SiteError when an instruction cannot be re-encoded
    (e.g. a RIP-relative operand out of ±2 GiB reach of ``address``).

    A prologue without RIP-relative operands or relative branches is copied verbatim (no decoder needed).
    """
    out = bytearray(ENDBR64 if prologue.endbr else b"")
    rip_map: dict[int, int] = {}
    if not prologue.position_dependent:
        at = prologue.site
        for n in prologue.lengths:
            rip_map[at] = address + len(out) + (at - prologue.site)
            at += n
        out += prologue.original
    else:
        for ins in prologue.instructions or _decode(prologue):
            rip_map[ins.ip] = address + len(out)
            out += _reencode(ins, address + len(out))
    end = prologue.site + prologue.length
    rip_map[end] = address + len(out)
    out += jmp_rel32(address + len(out), end)
    if len(out) > MAX_TRAMPOLINE:
        raise SiteError(f"the trampoline for the site at {prologue.site:#x} would be {len(out)} bytes")
    return Trampoline(address, bytes(out), rip_map)


def _decode(prologue: Prologue) -> list[Any]:
    import iced_x86 as iced

    return list(iced.Decoder(64, prologue.original, ip=prologue.site))


def _reencode(ins: Any, address: int) -> bytes:
    import iced_x86 as iced

    enc = iced.BlockEncoder(64)
    enc.add(ins)
    try:
        return bytes(enc.encode(address))
    except ValueError as e:
        raise SiteError(f"cannot relocate '{ins}' at {ins.ip:#x} into a trampoline: {e}") from None

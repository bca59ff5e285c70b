"""Trampolines: the overwritten instructions relocated elsewhere, plus a jump back (DESIGN.md §2).

Each instruction is re-encoded by iced-x86's BlockEncoder at its new address, which fixes RIP-relative operands
and relative branches (a short ``jcc`` becomes a near one when needed; DESIGN.md §7). Encoding them one at a time
gives the map from every original instruction boundary to its trampoline address, which moves a stopped
thread's RIP out of the overwritten bytes (Detours' ``detour_align_from_target``; research §3.3).

Trampolines for i386 targets (``bitness`` 32) are encoded as 32-bit code: ``BlockEncoder(32)`` (there is no
RIP-relative addressing, only relative branches to fix), ``endbr32`` (``F3 0F 1E FB``) when the function
starts with one, and a jump back that wraps modulo 2**32 (:func:`hotpatch.x86.encode.jmp_rel32`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import SiteError
from .encode import ENDBR32, ENDBR64, jmp_rel32
from .prologue import Prologue

MAX_TRAMPOLINE = 64  # bytes reserved per trampoline: endbr64 + up to 15-byte insns grown + jmp


class Trampoline(NamedTuple):
    """Relocated code for one site. ``address``: where it is placed (its entry, called by
    ``HOTPATCH_ORIGINAL``); ``code``: its bytes; ``rip_map``: original address -> trampoline address for every
    instruction boundary in ``[site, site + length]`` (the last one maps to the jump back)."""

    address: int
    code: bytes
    rip_map: dict[int, int]


def build(prologue: Prologue, address: int, bitness: int = 64) -> Trampoline:
    """Relocate ``prologue`` (analysed as ``bitness``-bit code: 64, or 32 for i386) to ``address``. Raises
    SiteError when an instruction cannot be re-encoded (e.g. a RIP-relative operand out of ±2 GiB reach of
    ``address``), or when the trampoline would exceed MAX_TRAMPOLINE bytes.

    A prologue without RIP-relative operands or relative branches is copied verbatim (no decoder needed).
    """
    if bitness not in (64, 32):
        raise ValueError(f"bitness must be 64 or 32, not {bitness}")
    out = bytearray((ENDBR64 if bitness == 64 else ENDBR32) if prologue.endbr else b"")
    rip_map: dict[int, int] = {}
    if not prologue.position_dependent:
        at = prologue.site
        for n in prologue.lengths:
            rip_map[at] = address + len(out) + (at - prologue.site)
            at += n
        out += prologue.original
    else:
        for ins in prologue.instructions or _decode(prologue, bitness):
            rip_map[ins.ip] = address + len(out)
            out += _reencode(ins, address + len(out), bitness)
    end = prologue.site + prologue.length
    rip_map[end] = address + len(out)
    out += jmp_rel32(address + len(out), end, bitness)
    if len(out) > MAX_TRAMPOLINE:
        raise SiteError(f"the trampoline for the site at {prologue.site:#x} would be {len(out)} bytes")
    return Trampoline(address, bytes(out), rip_map)


def _decode(prologue: Prologue, bitness: int) -> list[Any]:
    import iced_x86 as iced

    return list(iced.Decoder(bitness, prologue.original, ip=prologue.site))


def _reencode(ins: Any, address: int, bitness: int) -> bytes:
    import iced_x86 as iced

    enc = iced.BlockEncoder(bitness)
    enc.add(ins)
    try:
        return bytes(enc.encode(address))
    except ValueError as e:
        raise SiteError(f"cannot relocate '{ins}' at {ins.ip:#x} into a trampoline: {e}") from None

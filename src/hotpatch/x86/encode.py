"""Encoding the jumps a redirect is made of.

``E9 rel32`` is "JMP rel32: jump near, relative, displacement relative to next instruction" (Intel SDM Vol. 2A,
JMP; seed 004's table; seed 001 works an example: a jump at 0x00476c79 to 0x12345678 is ``e9 fa e9 ec 11``).
"""

from __future__ import annotations

import struct

from ..errors import SiteError

JMP_REL32_LEN = 5
JMP_REL8_LEN = 2
ENDBR64 = bytes.fromhex("f30f1efa")
ENDBR32 = bytes.fromhex("f30f1efb")


def rel32(src: int, dst: int, length: int = JMP_REL32_LEN) -> int:
    """Displacement of a ``length``-byte relative branch at ``src`` to ``dst``.

    Raises SiteError when ``dst`` is out of the ±2 GiB reach of a rel32.
    """
    disp = dst - (src + length)
    if not -(1 << 31) <= disp < (1 << 31):
        raise SiteError(f"jump from {src:#x} to {dst:#x} is beyond the ±2 GiB reach of rel32")
    return disp


def jmp_rel32(src: int, dst: int, bitness: int = 64) -> bytes:
    """The 5 bytes ``E9 rel32`` of a jump at address ``src`` to ``dst``.

    In 32-bit code (``bitness`` 32) EIP wraps modulo 2**32, so every target is in reach (seed 001's example).
    Raises SiteError when a 64-bit ``dst`` is beyond ±2 GiB.
    """
    if bitness == 32:
        return b"\xe9" + struct.pack("<I", (dst - (src + JMP_REL32_LEN)) & 0xFFFF_FFFF)
    return b"\xe9" + struct.pack("<i", rel32(src, dst))


def jmp_rel8(src: int, dst: int) -> bytes:
    """The 2 bytes ``EB rel8`` of a short jump at ``src`` to ``dst`` (Intel SDM Vol. 2A, JMP: "EB cb, jump
    short, RIP = RIP + 8-bit displacement sign extended"). Seed 001: ``EB F9`` jumps back 7 bytes, from the
    entry into the 5 bytes of padding before it. Raises SiteError when ``dst`` is beyond -128..127."""
    disp = dst - (src + JMP_REL8_LEN)
    if not -128 <= disp < 128:
        raise SiteError(f"short jump from {src:#x} to {dst:#x} is beyond the -128..127 reach of rel8")
    return b"\xeb" + struct.pack("<b", disp)

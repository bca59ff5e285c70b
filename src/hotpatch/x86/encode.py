"""Encoding the jumps a redirect is made of.

``E9 rel32`` is "JMP rel32: jump near, relative, displacement relative to next instruction" (Intel SDM Vol. 2A,
JMP; seed 004's table; seed 001 works an example: a jump at 0x00476c79 to 0x12345678 is ``e9 fa e9 ec 11``).
"""

from __future__ import annotations

import struct

from ..errors import SiteError

JMP_REL32_LEN = 5
ENDBR64 = bytes.fromhex("f30f1efa")


def rel32(src: int, dst: int, length: int = JMP_REL32_LEN) -> int:
    """Displacement of a ``length``-byte relative branch at ``src`` to ``dst``.

    Raises SiteError when ``dst`` is out of the ±2 GiB reach of a rel32.
    """
    disp = dst - (src + length)
    if not -(1 << 31) <= disp < (1 << 31):
        raise SiteError(f"jump from {src:#x} to {dst:#x} is beyond the ±2 GiB reach of rel32")
    return disp


def jmp_rel32(src: int, dst: int) -> bytes:
    """The 5 bytes ``E9 rel32`` of a jump at address ``src`` to ``dst``."""
    return b"\xe9" + struct.pack("<i", rel32(src, dst))

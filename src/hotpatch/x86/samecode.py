"""Whether two functions are the same code at two addresses (a compiler clone that is a whole copy).

Two byte strings are the same function when they decode (iced-x86) to the same instructions one for one, where
a relative branch that stays inside its function lands at the same offset from the start in both, one that
leaves it lands at the same address, and a RIP-relative operand addresses the same memory; every other
instruction has the same bytes. Such a copy behaves as the original for any caller and has the same calling
convention, so its entry may be sent to the original's replacement (Intel SDM Vol. 2 for the encodings).
"""

from __future__ import annotations

from typing import Any


def _key(ins: Any, start: int, size: int, data: bytes) -> tuple[Any, ...]:
    import iced_x86 as iced

    if ins.op0_kind in (iced.OpKind.NEAR_BRANCH16, iced.OpKind.NEAR_BRANCH32, iced.OpKind.NEAR_BRANCH64):
        target = ins.near_branch_target
        inside = start <= target < start + size
        return ins.code, ins.len, "in" if inside else "out", target - start if inside else target
    if ins.is_ip_rel_memory_operand:
        return ins.code, ins.len, "mem", ins.ip_rel_memory_address
    return ins.code, ins.len, "bytes", data[ins.ip - start : ins.ip - start + ins.len]


def same_code(a: bytes, a_at: int, b: bytes, b_at: int, bitness: int = 64) -> bool:
    """True when the function ``a`` at ``a_at`` and ``b`` at ``b_at`` (their whole bytes) are the same code
    (module docstring); False for different lengths, an undecodable instruction, or any difference."""
    import iced_x86 as iced

    if len(a) != len(b) or not a:
        return False
    da, db = iced.Decoder(bitness, a, ip=a_at), iced.Decoder(bitness, b, ip=b_at)
    for ia, ib in zip(da, db, strict=True):
        if ia.code == iced.Code.INVALID or _key(ia, a_at, len(a), a) != _key(ib, b_at, len(b), b):
            return False
    return True

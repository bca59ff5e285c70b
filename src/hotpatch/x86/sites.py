"""Site classes: how a function's entry can be redirected, from best to worst (DESIGN.md §4 table).

Hotpatch-ready and opportunistic sites get a *short jump* ``EB rel8`` over one instruction of at least 2
bytes (the *key*), into a long ``E9 rel32`` written in 5 never-executed bytes just before the entry (seed 001:
``mov edi,edi`` becomes ``EB F9``, the 5 bytes before hold ``E9 rel32``). They are written with protocol A
(no stop; :mod:`hotpatch.livecommit`). Ordinary sites get the 5-byte jump over the first instructions
(:mod:`.prologue`), written with protocol R (rolling) or B (stop the world).

Classes, checked in this order:

* ``ms-x86``: i386 entry ``8B FF`` (``mov edi,edi``) with 5 bytes of ``CC`` or ``90`` padding before (seed 001,
  seed 002; gcc ``-m32`` ``ms_hook_prologue`` emits 16 bytes of ``CC`` then ``8B FF``).
* ``ms-hook-prologue``: x86-64 entry ``48 8D A4 24 00 00 00 00`` (``lea 0(%rsp),%rsp``, gcc's
  ``ms_hook_prologue`` on x86-64) after 32 bytes of ``CC``; and Windows x64 (MS x64 hotpatch ABI: "the first
  instruction … two-byte instruction (or bigger)", Raymond Chen 2022) with ``CC`` padding.
* ``patchable-entry``: gcc ``-fpatchable-function-entry=N,M`` (M >= 5): M single-byte NOPs before the entry,
  ``90 90`` at the entry, or after ``endbr64``. A thread may sit between the two NOPs, so the short jump's
  displacement byte is executed alone: ``F9`` (stc) at the entry, ``F5`` (cmc) after ``endbr64`` — both
  harmless, unlike ``F4`` (hlt) or ``F0`` (lock) (DESIGN.md §4).
* ``opportunistic``: any other function whose key instruction is >= 2 bytes and whose 5 bytes before the
  entry are never executed: ``CC`` padding (running into it would trap, so no code path does), or alignment
  NOPs after an instruction that never falls through (``ret``, ``jmp``, ``ud2``, ``int3``, ``hlt``) at the end
  of the previous function.
* ``ordinary``: the 5-byte jump of :func:`hotpatch.x86.prologue.analyze` (refusals are raised from there).

The key is the instruction after ``endbr64`` when it is >= 2 bytes and nothing in the function branches to
it, so ``endbr64`` stays the landing pad of indirect calls (research §6); otherwise the entry itself.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

from ..errors import SiteError
from .encode import ENDBR32, ENDBR64, JMP_REL8_LEN, JMP_REL32_LEN
from .prologue import Prologue, analyze, check_branch_targets

MS_X86: Final = "ms-x86"
MS_HOOK_PROLOGUE: Final = "ms-hook-prologue"
PATCHABLE_ENTRY: Final = "patchable-entry"
OPPORTUNISTIC: Final = "opportunistic"
ORDINARY: Final = "ordinary"
CLASSES: Final = (MS_X86, MS_HOOK_PROLOGUE, PATCHABLE_ENTRY, OPPORTUNISTIC, ORDINARY)
READY_CLASSES: Final = frozenset({MS_X86, MS_HOOK_PROLOGUE, PATCHABLE_ENTRY, OPPORTUNISTIC})
IFUNC: Final = "ifunc"  # not a site: an IFUNC's resolver in a manifest; apply patches its implementation
VTABLE_SLOT: Final = "vtable-slot"  # not code: a vtable word redirected with its function (elf/vtables.py)
GOT_SLOT: Final = "got-slot"  # not code: a GOT word of a module importing the function (--via got, gotplan.py)
DATA_CLASSES: Final = frozenset({VTABLE_SLOT, GOT_SLOT})  # records of words stored whole, with no key

PROTOCOL_A: Final = "A"  # no stop (livecommit.py)
PROTOCOL_R: Final = "R"  # self-loop + rolling per-thread check
PROTOCOL_B: Final = "B"  # stop the world

MOV_EDI_EDI: Final = b"\x8b\xff"
LEA_RSP_0: Final = bytes.fromhex("488da42400000000")
PAD_LEN: Final = JMP_REL32_LEN


class Site(NamedTuple):
    """One function's site. ``klass``: one of CLASSES; ``protocol``: the best protocol it allows (A or R);
    ``prologue``: the instruction(s) the redirect replaces (the key for A classes, the 5-byte span for
    ordinary), what a trampoline re-runs; ``pad``: address of the ``E9 rel32`` (entry - 5) for A classes,
    None for ordinary; ``padding``: the 5 bytes there now."""

    klass: str
    protocol: str
    prologue: Prologue
    pad: int | None = None
    padding: bytes = b""

    @property
    def key(self) -> int:
        """The address of the instruction threads enter through (its first word is written last)."""
        return self.prologue.site

    @property
    def short_jump_disp(self) -> int:
        """The displacement byte of the short jump (the byte a thread between two entry NOPs executes)."""
        assert self.pad is not None
        return (self.pad - (self.key + JMP_REL8_LEN)) & 0xFF


def _decode_one(code: bytes, ip: int, bitness: int) -> Any:
    import iced_x86 as iced

    ins = iced.Decoder(bitness, code, ip=ip).decode()
    return None if ins.code == iced.Code.INVALID else ins


def _is_filler(ins: Any) -> bool:
    import iced_x86 as iced

    return ins.mnemonic in (iced.Mnemonic.NOP, iced.Mnemonic.INT3)


def _never_falls_through(ins: Any) -> bool:
    import iced_x86 as iced

    if ins.mnemonic in (iced.Mnemonic.UD2, iced.Mnemonic.INT3, iced.Mnemonic.HLT):
        return True
    return ins.flow_control in (
        iced.FlowControl.RETURN,
        iced.FlowControl.UNCONDITIONAL_BRANCH,
        iced.FlowControl.INDIRECT_BRANCH,
    )


def padding_is_dead(entry: int, before: bytes, prev: tuple[int, bytes] | None, bitness: int = 64) -> bool:
    """True when the ``PAD_LEN`` bytes before ``entry`` are never executed.

    ``before``: the bytes just before ``entry``; ``prev``: (start address, bytes) of the previous function's
    code range (symbol or ``.eh_frame`` FDE), ending at or before ``entry - PAD_LEN``, or None when unknown.
    ``CC`` padding is dead by itself; other padding needs ``prev``: its last instruction never falls
    through and everything from its end to ``entry`` decodes as NOPs or ``int3``.
    """
    if len(before) >= PAD_LEN and before[-PAD_LEN:] == b"\xcc" * PAD_LEN:
        return True
    if prev is None:
        return False
    start, code = prev
    end = start + len(code)
    gap = entry - end
    if gap < PAD_LEN or gap > len(before):
        return False
    import iced_x86 as iced

    last = None
    for ins in iced.Decoder(bitness, code, ip=start):
        if ins.code == iced.Code.INVALID:
            return False
        last = ins
    if last is None or last.next_ip != end or not _never_falls_through(last):
        return False
    filler = before[len(before) - gap :]
    for ins in iced.Decoder(bitness, filler, ip=end):
        if ins.code == iced.Code.INVALID or not _is_filler(ins):
            return False
    return True


def _key_offset(code: bytes, entry: int, bitness: int) -> int:
    """0, or 4 when the function starts with ``endbr64``/``endbr32`` followed by a >= 2-byte instruction that
    no branch of the function targets."""
    endbr = ENDBR64 if bitness == 64 else ENDBR32
    if not code.startswith(endbr):
        return 0
    nxt = _decode_one(code[len(endbr) :], entry + len(endbr), bitness)
    if nxt is None or nxt.len < JMP_REL8_LEN:
        return 0
    try:
        check_branch_targets("", entry, code, entry + len(endbr), nxt.len, bitness)
    except SiteError:
        return 0
    return len(endbr)


def _key_prologue(symbol: str, entry: int, code: bytes, off: int, length: int, bitness: int) -> Prologue:
    """The key (``length`` bytes at ``entry + off``, whole instructions) as a Prologue for the trampoline."""
    import iced_x86 as iced

    key = entry + off
    if off + max(length, JMP_REL8_LEN) > len(code):
        raise SiteError(f"{symbol} is {len(code)} bytes long, too short for a short jump")
    insns = []
    for ins in iced.Decoder(bitness, code[off : off + length], ip=key):
        if ins.code == iced.Code.INVALID:
            raise SiteError(f"{symbol}: invalid instruction at {ins.ip:#x}")
        insns.append(ins)
    check_branch_targets(symbol, entry, code, key, length, bitness)
    dependent = any(i.is_ip_rel_memory_operand or i.is_jmp_short_or_near or i.is_jcc_short_or_near for i in insns)
    lengths = tuple(i.len for i in insns)
    return Prologue(entry, key, length, code[off : off + length], lengths, dependent, tuple(insns))


def classify(
    symbol: str,
    entry: int,
    code: bytes,
    before: bytes,
    bitness: int = 64,
    prev: tuple[int, bytes] | None = None,
) -> Site:
    """Classify the function ``symbol`` at ``entry``.

    ``code``: its bytes (the whole body, for the branch-target checks); ``before``: up to 16 bytes just
    before ``entry`` (fewer at the start of a section); ``bitness``: 64 or 32; ``prev``: the previous
    function's range as :func:`padding_is_dead` takes it. Returns the best :class:`Site`. Raises SiteError
    with the reason when the function cannot be patched at all.
    """
    pad = entry - PAD_LEN
    padding = before[-PAD_LEN:] if len(before) >= PAD_LEN else b""
    cc_pad = padding == b"\xcc" * PAD_LEN
    nop_pad = padding == b"\x90" * PAD_LEN
    ready: tuple[str, int, int] | None = None  # class, key offset, key length
    if bitness == 32 and code[:2] == MOV_EDI_EDI and (cc_pad or nop_pad):
        ready = (MS_X86, 0, 2)
    elif bitness == 64 and code[:8] == LEA_RSP_0 and cc_pad:
        ready = (MS_HOOK_PROLOGUE, 0, 8)
    else:
        endbr = ENDBR64 if bitness == 64 else ENDBR32
        off = len(endbr) if code.startswith(endbr) else 0
        pfe_dead = before.endswith(b"\x90" * 14) or padding_is_dead(entry, before, prev, bitness)
        if code[off : off + 2] == b"\x90\x90" and nop_pad and pfe_dead:
            ready = (PATCHABLE_ENTRY, off, 2)
        elif padding and padding_is_dead(entry, before, prev, bitness):
            off = _key_offset(code, entry, bitness)
            first = _decode_one(code[off:], entry + off, bitness)
            if first is not None and first.len >= JMP_REL8_LEN:
                ready = (OPPORTUNISTIC, off, first.len)
    if ready is not None:
        klass, off, length = ready
        try:
            pro = _key_prologue(symbol, entry, code, off, length, bitness)
        except SiteError:
            pro = None
        if pro is not None:
            return Site(klass, PROTOCOL_A, pro, pad, padding)
    return Site(ORDINARY, PROTOCOL_R, analyze(symbol, entry, code, bitness))

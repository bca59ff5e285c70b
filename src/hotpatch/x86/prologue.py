"""Site analysis: which instructions a 5-byte ``jmp rel32`` at a function's entry overwrites, and whether
that is safe.

Rules (DESIGN.md §4 "ordinary" sites and §5 "Prologues"; research §3.3 and §6):

* A function that starts with ``endbr64`` is patched just after it, so the entry keeps its landing pad for
  indirect branches (CET IBT, research §6).
* The overwritten instructions are the whole instructions that cover 5 bytes from the site.
* Refused: a function shorter than site + 5 bytes (the jump would corrupt the next one); an instruction that
  does not decode; a ``call`` among the overwritten instructions (a thread inside the callee would return into
  the middle of the jump); a direct branch anywhere in the function whose target lies strictly inside the
  overwritten bytes, or on a site after ``endbr64`` (a loop head there would enter the replacement mid-way);
  ``xbegin`` (transactional aborts land at a relative address).

Indirect branches through jump tables cannot be seen by a linear sweep; gcc does not emit jump-table targets in
the first bytes of a function, and DESIGN.md measured 0.1–0.4% of functions with any branch target there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import SiteError
from .encode import ENDBR32, ENDBR64, JMP_REL32_LEN


class Prologue(NamedTuple):
    """The analysed start of one function.

    ``entry``: the function's address; ``site``: where the jump goes (entry, or entry+4 after ``endbr64``);
    ``length``: bytes of the whole instructions overwritten (>= 5); ``original``: those bytes;
    ``lengths``: the length of each of those instructions; ``position_dependent``: True when one of them has a
    RIP-relative operand or a relative branch, so a trampoline must re-encode it; ``instructions``: the
    decoded iced-x86 instructions at their real addresses (empty when rebuilt from a manifest).
    """

    entry: int
    site: int
    length: int
    original: bytes
    lengths: tuple[int, ...]
    position_dependent: bool
    instructions: tuple[Any, ...] = ()

    @staticmethod
    def from_manifest(
        entry: int,
        code: bytes,
        site_offset: int,
        lengths: tuple[int, ...],
        position_dependent: bool,
        min_length: int = JMP_REL32_LEN,
    ) -> Prologue:
        """The prologue ``analyze`` (or, for a short-jump site's key, ``hotpatch.x86.sites``; ``min_length``
        2) found at build time, for ``code`` whose hash matched the manifest (same bytes, so the same
        analysis) — no decoder is loaded on this path. Raises SiteError when the description does not fit."""
        length = sum(lengths)
        if site_offset not in (0, len(ENDBR64)) or length < min_length or site_offset + length > len(code):
            raise SiteError("the manifest's prologue description does not fit the function")
        original = code[site_offset : site_offset + length]
        return Prologue(entry, entry + site_offset, length, original, lengths, position_dependent)

    @property
    def endbr(self) -> bool:
        """True when the function starts with ``endbr64`` and the site follows it."""
        return self.site != self.entry


def analyze(symbol: str, entry: int, code: bytes, bitness: int = 64) -> Prologue:
    """Analyse the function ``symbol`` whose bytes ``code`` (its whole body) live at address ``entry``, in
    ``bitness``-bit code (64, or 32 for i386).

    Raises SiteError naming the symbol and the reason when the site cannot be patched safely.
    """
    import iced_x86 as iced

    calls = {iced.FlowControl.CALL, iced.FlowControl.INDIRECT_CALL}
    site_off = len(ENDBR64) if code.startswith(ENDBR64 if bitness == 64 else ENDBR32) else 0
    if len(code) < site_off + JMP_REL32_LEN:
        raise SiteError(
            f"{symbol} is {len(code)} bytes long, too short for a {JMP_REL32_LEN}-byte jump"
            + (" after endbr64" if site_off else "")
        )
    site = entry + site_off
    decoder = iced.Decoder(bitness, code[site_off:], ip=site)
    covered: list[iced.Instruction] = []
    length = 0
    while length < JMP_REL32_LEN:
        ins = decoder.decode()
        if ins.code == iced.Code.INVALID:
            raise SiteError(f"{symbol}: invalid instruction at {site + length:#x}")
        # `syscall` counts as a call for iced-x86, but pushes no return address: it is copied verbatim
        if ins.flow_control in calls and ins.mnemonic != iced.Mnemonic.SYSCALL:
            raise SiteError(f"{symbol}: a call at {ins.ip:#x} lies in the first {JMP_REL32_LEN} bytes")
        if ins.flow_control == iced.FlowControl.XBEGIN_XABORT_XEND:
            raise SiteError(f"{symbol}: a transactional-memory instruction lies in the first bytes")
        covered.append(ins)
        length += ins.len
    if site_off + length > len(code):
        raise SiteError(f"{symbol}: its first instructions run past the end of the function")
    check_branch_targets(symbol, entry, code, site, length, bitness)
    dependent = any(ins.is_ip_rel_memory_operand or _near_branch(ins) for ins in covered)
    original = code[site_off : site_off + length]
    return Prologue(entry, site, length, original, tuple(i.len for i in covered), dependent, tuple(covered))


def _near_branch(ins: Any) -> bool:
    import iced_x86 as iced

    return ins.op0_kind in (iced.OpKind.NEAR_BRANCH16, iced.OpKind.NEAR_BRANCH32, iced.OpKind.NEAR_BRANCH64)


def check_branch_targets(symbol: str, entry: int, code: bytes, site: int, length: int, bitness: int = 64) -> None:
    """Refuse when a direct branch of the function lands strictly inside ``(site, site + length)``, or on the
    site itself when the site is not the entry (a loop back to just after ``endbr64`` would run the
    replacement in the middle of the function; a branch to the entry is a tail call and rightly goes there).

    Raises SiteError naming the branch.
    """
    import iced_x86 as iced

    for ins in iced.Decoder(bitness, code, ip=entry):
        if _near_branch(ins):
            target = ins.near_branch_target
            if site < target < site + length or (target == site != entry):
                raise SiteError(
                    f"{symbol}: the instruction at {ins.ip:#x} branches to {target:#x}, inside the "
                    f"{length} bytes the jump would overwrite"
                )

"""Planning a patch's sites in one target: verify the bytes, analyse the prologues, place trampolines.

For every function of the manifest the planner reads the function's bytes from the target, puts back the
original bytes of any site an older version of the same patch owns, and compares the SHA-256 with the
manifest (DESIGN.md §6 invariant 2: wrong build, or changed by something else, is refused before any
write). Short-jump classes (:mod:`.x86.sites`) also have the 5 bytes of padding before the entry checked
against the manifest. The site analysis done at build time with the whole target file (class, key,
lengths) is reused once the hash proved the bytes are the same; an untrusted one is redone here as an
ordinary site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

from .errors import MismatchError, SiteError
from .modules import Module
from .patch.manifest import Function
from .process.memory import Memory
from .state import Record, SiteRecord
from .x86 import prologue as x86prologue
from .x86 import sites
from .x86 import trampoline as x86trampoline
from .x86.encode import JMP_REL8_LEN, JMP_REL32_LEN, jmp_rel8, jmp_rel32


class SitePlan(NamedTuple):
    """One function to redirect: its manifest entry, the analysed ``prologue`` (the key instruction for
    short-jump classes, the 5-byte span for ordinary sites) and the ``current`` bytes of the site's region
    (the original ones, or an older version's jumps when upgrading). Short-jump classes also carry ``pad``
    (entry - 5, where the ``E9 rel32`` goes), the original ``padding`` there and ``lead`` (the bytes from the
    entry to the key: ``endbr64`` or nothing). ``bitness``: the target's code, 64 or 32 (i386)."""

    function: Function
    prologue: x86prologue.Prologue
    current: bytes
    klass: str = sites.ORDINARY
    pad: int | None = None
    padding: bytes = b""
    lead: bytes = b""
    bitness: int = 64
    implementation: str = ""  # for an IFUNC, the name of the implementation the target bound (hotpatch.ifunc)

    @property
    def address(self) -> int:
        """Start of the bytes the redirect writes: the padding, or the site."""
        return self.prologue.site if self.pad is None else self.pad

    @property
    def original(self) -> bytes:
        """The target's own bytes over the redirect's region (what revert puts back)."""
        if self.pad is None:
            return self.prologue.original[:JMP_REL32_LEN]
        return self.padding + self.lead + self.prologue.original[:JMP_REL8_LEN]

    @property
    def upgrading(self) -> bool:
        """True when an older version's jump is at the site now."""
        return self.current != self.original


class PlacedSite(NamedTuple):
    """A site with its replacement and trampoline addresses fixed: the new bytes are known."""

    plan: SitePlan
    replacement: int
    trampoline: x86trampoline.Trampoline

    @property
    def new(self) -> bytes:
        """``E9 rel32`` to the replacement at the site; for short-jump classes, ``E9 rel32`` in the padding,
        the lead, and ``EB rel8`` at the key (seed 001)."""
        pro = self.plan.prologue
        if self.plan.pad is None:
            return jmp_rel32(pro.site, self.replacement, self.plan.bitness)
        pad = self.plan.pad
        return jmp_rel32(pad, self.replacement, self.plan.bitness) + self.plan.lead + jmp_rel8(pro.site, pad)


def _original_code(
    mem: Memory,
    entry: int,
    size: int,
    owned: dict[int, tuple[str, SiteRecord]],
    retired: list[list[Any]],
    name: str,
    symbol: str,
) -> tuple[bytes, bytes, SiteRecord | None]:
    """The function's bytes and the 5 bytes before it as the target had them before any version of patch
    ``name`` (its records' original bytes put back), and the record owning the function's site, if any.
    Raises SiteError when another patch owns it."""
    lo = entry - sites.PAD_LEN
    code = bytearray(mem.read(lo, size + sites.PAD_LEN))
    for r in retired:  # a reverted short-jump site's padding still holding its E9: ours, original below
        if len(r) > 2 and r[0] == lo:
            code[: sites.PAD_LEN] = bytes.fromhex(r[2])[: sites.PAD_LEN]
    mine = None
    for site, (owner, rec) in owned.items():
        if rec.entry != entry and not lo <= site < entry + size:
            continue
        if owner != name:
            raise SiteError(f"{symbol} is already patched by patch '{owner}'; revert it first")
        orig = bytes.fromhex(rec.original)
        start = max(site, lo)
        code[start - lo : start - lo + len(orig)] = orig[start - site :][: lo + len(code) - start]
        mine = rec
    return bytes(code[sites.PAD_LEN :]), bytes(code[: sites.PAD_LEN]), mine


def plan_sites(
    mem: Memory,
    module: Module,
    functions: tuple[Function, ...],
    record: Record,
    name: str,
    bitness: int = 64,
    resolve_ifunc: Callable[[Function], tuple[Function, str]] | None = None,
) -> list[SitePlan]:
    """Check and analyse every function of a patch called ``name`` in ``module`` of a ``bitness``-bit target.
    An IFUNC's resolver (class ``ifunc``) is checked, then replaced by the implementation the target bound,
    given by ``resolve_ifunc`` (:func:`hotpatch.ifunc.implementation`).

    Raises MismatchError when a function's bytes (or, for a short-jump class, the padding before it) differ
    from the manifest, SiteError when a site is owned by another patch or cannot be patched safely.
    """
    owned = {s.site: (p.name, s) for p in record.patches for s in p.sites if s.klass not in sites.DATA_CLASSES}
    plans = []
    for f in functions:
        implementation = ""
        if f.klass == sites.IFUNC:
            resolver = mem.read(module.bias + f.value, f.size)
            if hashlib.sha256(resolver).hexdigest() != f.sha256:
                raise MismatchError(
                    f"the resolver of IFUNC {f.symbol} in {module.path} differs from the one the patch was built "
                    "against"
                )
            if resolve_ifunc is None:
                raise SiteError(f"{f.symbol} is an IFUNC; its implementation cannot be found here")
            f, implementation = resolve_ifunc(f)
        entry = module.bias + f.value
        code, padding, mine = _original_code(mem, entry, f.size, owned, record.retired, name, f.symbol)
        if hashlib.sha256(code).hexdigest() != f.sha256:
            raise MismatchError(
                f"the bytes of {f.symbol} at {entry:#x} in {module.path} differ from the ones the patch was "
                "built against (another build, or changed by something else)"
            )
        ready = f.analysis_trusted and f.klass in sites.READY_CLASSES
        if ready and padding.hex() != f.padding:
            raise MismatchError(
                f"the 5 bytes before {f.symbol} at {entry:#x} are {padding.hex()}, the patch expects {f.padding} "
                "(changed by something else?)"
            )
        if f.analysis_trusted:
            least = JMP_REL8_LEN if ready else JMP_REL32_LEN
            pro = x86prologue.Prologue.from_manifest(entry, code, f.site_offset, f.lengths, f.position_dependent, least)
        else:
            pro = x86prologue.analyze(f.symbol, entry, code, bitness)
        if ready:
            pad = entry - sites.PAD_LEN
            plan = SitePlan(f, pro, b"", f.klass, pad, padding, code[: f.site_offset], bitness)
        else:
            plan = SitePlan(f, pro, b"", bitness=bitness)
        current = plan.original
        if mine is not None:
            if mine.site != plan.address or len(bytes.fromhex(mine.new)) != len(current):
                raise SiteError(
                    f"{f.symbol}: the applied version redirects it another way; revert patch '{name}' first"
                )
            current = mem.read(plan.address, len(current))
        elif plan.pad is not None:  # a retired padding's E9 is still there: it is replaced as one instruction
            current = mem.read(plan.pad, sites.PAD_LEN) + current[sites.PAD_LEN :]
        plans.append(plan._replace(current=current, implementation=implementation))
    return plans


def place(plans: list[SitePlan], replacements: dict[str, int], tramp_area: int) -> list[PlacedSite]:
    """Fix each site's replacement address and build its trampoline at ``tramp_area + i * 64``.

    Raises SiteError when a trampoline cannot be built there (RIP-relative reach).
    """
    out = []
    for i, plan in enumerate(plans):
        tramp = x86trampoline.build(plan.prologue, tramp_area + i * x86trampoline.MAX_TRAMPOLINE, plan.bitness)
        f = plan.function
        out.append(PlacedSite(plan, replacements[f.replacement or f.symbol], tramp))
    return out


class SlotPlan(NamedTuple):
    """One vtable word of ``function`` to redirect with it: its runtime ``address``, the ``current`` word there
    (the entry's address, or an older version's replacement when upgrading) and the ``original`` one (the
    function's entry address; little-endian words of the target's width)."""

    function: Function
    address: int
    current: bytes
    original: bytes


def plan_slots(
    mem: Memory, module: Module, functions: tuple[Function, ...], record: Record, name: str, bitness: int = 64
) -> list[SlotPlan]:
    """The vtable slots of the ``functions`` of patch ``name`` in ``module`` (:attr:`Function.slots`), each
    checked to hold the function's entry address, or the replacement an older version of the same patch put
    there. Raises SiteError for a slot another patch owns or that is not an aligned word, MismatchError for a
    slot holding anything else (nothing is written)."""
    word = bitness // 8
    owned = {s.site: p.name for p in record.patches for s in p.sites if s.klass == sites.VTABLE_SLOT}
    mine = {s.site: s for p in record.patches if p.name == name for s in p.sites if s.klass == sites.VTABLE_SLOT}
    out = []
    for f in functions:
        original = ((module.bias + f.value) % (1 << bitness)).to_bytes(word, "little")
        for slot in f.slots:
            address = module.bias + slot
            if address % word:
                raise SiteError(f"{f.symbol}: its vtable slot at {address:#x} is not an aligned {word}-byte word")
            if owned.get(address, name) != name:
                raise SiteError(f"{f.symbol}: its vtable slot at {address:#x} is patched by patch '{owned[address]}'")
            current = mem.read(address, word)
            rec = mine.get(address)
            if current != original and (rec is None or current.hex() != rec.new):
                raise MismatchError(
                    f"the vtable slot of {f.symbol} at {address:#x} in {module.path} holds {current[::-1].hex()}, "
                    f"not the function's address {original[::-1].hex()} (changed by something else?)"
                )
            out.append(SlotPlan(f, address, current, original))
    return out

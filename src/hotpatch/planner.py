"""Planning a patch's sites in one target: verify the bytes, analyse the prologues, place trampolines.

For every function of the manifest the planner reads the function's bytes from the target, puts back the
original bytes of any site an older version of the same patch owns, and compares the SHA-256 with the
manifest (DESIGN.md §6 invariant 2: wrong build, or changed by something else, is refused before any
write). It then analyses the prologue (:mod:`.x86.prologue`); the site class of this issue is "ordinary"
and its protocol B (DESIGN.md §4).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from .errors import MismatchError, SiteError
from .modules import Module
from .patch.manifest import Function
from .process.memory import Memory
from .state import Record
from .x86 import prologue as x86prologue
from .x86 import trampoline as x86trampoline
from .x86.encode import JMP_REL32_LEN, jmp_rel32


class SitePlan(NamedTuple):
    """One function to redirect: its manifest entry, analysed prologue, and ``current`` bytes at the site
    (the original ones, or an older version's jump when upgrading)."""

    function: Function
    prologue: x86prologue.Prologue
    current: bytes

    @property
    def original(self) -> bytes:
        """The function's own bytes at the site (what revert puts back)."""
        return self.prologue.original[:JMP_REL32_LEN]

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
        """The ``E9 rel32`` jump to the replacement."""
        return jmp_rel32(self.plan.prologue.site, self.replacement)


def plan_sites(
    mem: Memory, module: Module, functions: tuple[Function, ...], record: Record, name: str
) -> list[SitePlan]:
    """Check and analyse every function of a patch called ``name`` in ``module``.

    Raises MismatchError when a function's bytes differ from the manifest, SiteError when a site is owned by
    another patch or cannot be patched safely.
    """
    owned = {s.site: (p.name, s) for p in record.patches for s in p.sites}
    plans = []
    for f in functions:
        entry = module.bias + f.value
        code = bytearray(mem.read(entry, f.size))
        current = b""
        for site, (owner, rec) in owned.items():
            if entry <= site < entry + f.size:
                if owner != name:
                    raise SiteError(f"{f.symbol} is already patched by patch '{owner}'; revert it first")
                off = site - entry
                current = bytes(code[off : off + JMP_REL32_LEN])
                code[off : off + JMP_REL32_LEN] = bytes.fromhex(rec.original)
        if hashlib.sha256(code).hexdigest() != f.sha256:
            raise MismatchError(
                f"the bytes of {f.symbol} at {entry:#x} in {module.path} differ from the ones the patch was "
                "built against (another build, or changed by something else)"
            )
        if f.analysis_trusted:
            pro = x86prologue.Prologue.from_manifest(entry, bytes(code), f.site_offset, f.lengths, f.position_dependent)
        else:
            pro = x86prologue.analyze(f.symbol, entry, bytes(code))
        plans.append(SitePlan(f, pro, current or pro.original[:JMP_REL32_LEN]))
    return plans


def place(plans: list[SitePlan], replacements: dict[str, int], tramp_area: int) -> list[PlacedSite]:
    """Fix each site's replacement address and build its trampoline at ``tramp_area + i * 64``.

    Raises SiteError when a trampoline cannot be built there (RIP-relative reach).
    """
    out = []
    for i, plan in enumerate(plans):
        tramp = x86trampoline.build(plan.prologue, tramp_area + i * x86trampoline.MAX_TRAMPOLINE)
        out.append(PlacedSite(plan, replacements[plan.function.symbol], tramp))
    return out

"""A replaced function's manifest entry, decided with the whole module file at hand.

``build`` describes each function it replaces; ``apply`` describes the implementation an IFUNC resolved to in
the target (:mod:`hotpatch.ifunc`) the same way. The description is the function's bytes' SHA-256, its site
class and analysis (:func:`hotpatch.scan.classify_symbol`: the class needs the bytes before the entry and the
end of the function before it), bound together by :func:`hotpatch.patch.manifest.analysis_digest`.
"""

from __future__ import annotations

import hashlib

from ..elf.image import ElfImage, Symbol
from ..x86 import prologue
from ..x86.sites import ORDINARY, PROTOCOL_R, READY_CLASSES, Site
from .manifest import Function, analysis_digest


def describe(
    image: ElfImage,
    ranges: list[tuple[int, int]],
    name: str,
    sym: Symbol,
    label: str,
    ordinary_sites: bool = False,
    slots: tuple[int, ...] = (),
) -> Function:
    """The manifest entry of function ``name`` defined by ``sym`` (link-time ``value``, ``size`` > 0 bytes) in
    ``image``, with ``ranges`` (:func:`hotpatch.elf.ranges.function_ranges`); ``label`` names it in errors;
    ``ordinary_sites`` forces an ordinary site (a 5-byte jump at the entry); ``slots``: its vtable slots.
    Raises SiteError when it cannot be patched, PatchFileError when its bytes are not in the file."""
    from ..scan import classify_symbol

    code = image.read_vaddr(sym.value, sym.size)
    if ordinary_sites:
        site = Site(ORDINARY, PROTOCOL_R, prologue.analyze(label, sym.value, code, image.bitness))
    else:
        site = classify_symbol(image, ranges, label, sym)
    pro = site.prologue
    sha = hashlib.sha256(code).hexdigest()
    padding = site.padding.hex() if site.klass in READY_CLASSES else ""
    desc = (pro.site - pro.entry, pro.lengths, pro.position_dependent)
    digest = analysis_digest(sha, *desc, site.klass, padding)
    return Function(name, sym.value, sym.size, sha, *desc, digest, site.klass, padding, slots)

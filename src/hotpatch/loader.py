"""Loading a patch's shared object into a target without ``dlopen`` (DESIGN.md §5 "Deadlock").

The loader lays the patch's PT_LOAD segments out in one image at a chosen base address, applies the dynamic
relocations itself (System V x86-64 psABI §4.4.1: RELATIVE = B + A, 64 = S + A, GLOB_DAT/JUMP_SLOT = S, in
8-byte words; i386 psABI "Relocation Types": R_386_RELATIVE = B + A, R_386_32 = S + A, R_386_PC32 =
S + A - P, R_386_GLOB_DAT/R_386_JMP_SLOT = S, in 4-byte words, A being the implicit addend at the place),
and returns the image with the protection of each page range. Symbols the patch defines resolve to the patch
(like ``-Bsymbolic``); undefined ones through :meth:`ModuleSet.resolve`; relocations inside the
``hotpatch_original`` section (``HOTPATCH_ORIGINAL``) resolve to the trampoline of the named function.
Mapping, writing and protecting happen in :mod:`hotpatch.api`, with injected raw syscalls.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import NamedTuple

from .errors import PatchFileError, SymbolError
from .patch.bundle import (
    R_386_32,
    R_386_GLOB_DAT,
    R_386_JMP_SLOT,
    R_386_NONE,
    R_386_PC32,
    R_386_RELATIVE,
    R_X86_64_64,
    R_X86_64_GLOB_DAT,
    R_X86_64_JUMP_SLOT,
    R_X86_64_NONE,
    R_X86_64_RELATIVE,
    PatchBinary,
)
from .process.maps import PAGE, page_down, page_up


class _Calc(enum.Enum):
    """What a relocation stores (psABI notation: B base, S symbol, A addend, P place)."""

    NONE = "none"
    RELATIVE = "B + A"
    ABSOLUTE = "S + A"
    SYMBOL = "S"
    PC_RELATIVE = "S + A - P"


# patch arch -> (struct format of the relocated word, relocation type -> what it stores)
_RELOCATIONS: dict[str, tuple[str, dict[int, _Calc]]] = {
    "x86_64": (
        "<Q",
        {
            R_X86_64_NONE: _Calc.NONE,
            R_X86_64_RELATIVE: _Calc.RELATIVE,
            R_X86_64_64: _Calc.ABSOLUTE,
            R_X86_64_GLOB_DAT: _Calc.SYMBOL,
            R_X86_64_JUMP_SLOT: _Calc.SYMBOL,
        },
    ),
    "i386": (
        "<I",
        {
            R_386_NONE: _Calc.NONE,
            R_386_RELATIVE: _Calc.RELATIVE,
            R_386_32: _Calc.ABSOLUTE,
            R_386_PC32: _Calc.PC_RELATIVE,
            R_386_GLOB_DAT: _Calc.SYMBOL,
            R_386_JMP_SLOT: _Calc.SYMBOL,
        },
    ),
}


class Layout(NamedTuple):
    """Where a patch goes: ``span`` bytes of segments from link-time ``min_vaddr``, then ``extra`` bytes
    (trampolines). ``size`` is the whole region in bytes, page-aligned."""

    min_vaddr: int
    span: int
    extra: int

    @property
    def size(self) -> int:
        """Region size in bytes."""
        return self.span + page_up(self.extra)

    @staticmethod
    def of(binary: PatchBinary, extra: int) -> Layout:
        """The layout of ``binary`` with ``extra`` bytes after its segments."""
        lo = page_down(min(s.vaddr for s in binary.segments))
        hi = page_up(max(s.vaddr + s.memsz for s in binary.segments))
        return Layout(lo, hi - lo, extra)


class LoadedImage(NamedTuple):
    """The bytes of the region (segments only; the trampoline area is written separately), and the
    protections ``(address, size, PROT_*)`` to apply after writing."""

    region: int
    image: bytes
    protections: list[tuple[int, int, int]]


def load(
    binary: PatchBinary,
    layout: Layout,
    region: int,
    resolve: Callable[[str], int],
    originals: dict[str, int],
) -> LoadedImage:
    """Relocate ``binary`` (an x86-64 or i386 patch) for the region at address ``region``.

    ``resolve(name)`` gives the runtime address of an undefined symbol (raises SymbolError);
    ``originals`` maps a replaced symbol to its trampoline address. Each relocated word is 8 bytes (x86-64) or
    4 bytes (i386), stored modulo 2**64 or 2**32. Raises PatchFileError for a relocation outside the image or
    of a type the patch's architecture does not have, SymbolError for an unresolvable symbol or a
    HOTPATCH_ORIGINAL of a function the patch does not replace.
    """
    base = region - layout.min_vaddr
    image = bytearray(layout.span)
    for seg in binary.segments:
        off = seg.vaddr - layout.min_vaddr
        image[off : off + len(seg.data)] = seg.data
    fmt, calcs = _RELOCATIONS[binary.arch]
    word = struct.calcsize(fmt)
    mask = (1 << (8 * word)) - 1
    by_value = {s.value: s.name for s in binary.symbols.values() if s.kind == "func"}
    lo, hi = binary.original_slots
    for rel in binary.relocations:
        calc = calcs.get(rel.type)
        if calc is None:
            raise PatchFileError(f"{binary.where} needs relocation type {rel.type}, which hotpatch does not apply")
        if calc is _Calc.NONE:
            continue
        off = rel.offset - layout.min_vaddr
        if not 0 <= off <= len(image) - word:
            raise PatchFileError(f"{binary.where} is corrupt: a relocation at {rel.offset:#x} is outside the image")
        if lo <= rel.offset < hi:
            name = rel.symbol or by_value.get(rel.addend, "")
            if name not in originals:
                raise SymbolError(f"HOTPATCH_ORIGINAL({name or '?'}) names a function this patch does not replace")
            value = originals[name]
        elif calc is _Calc.RELATIVE:
            value = base + rel.addend
        else:
            sym_addr = _symbol_address(rel.symbol, base + rel.defined.value if rel.defined else None, resolve)
            if calc is _Calc.ABSOLUTE:
                value = sym_addr + rel.addend
            elif calc is _Calc.PC_RELATIVE:
                value = sym_addr + rel.addend - (base + rel.offset)
            else:
                value = sym_addr
        struct.pack_into(fmt, image, off, value & mask)
    return LoadedImage(region, bytes(image), _protections(binary, layout, region))


def _symbol_address(name: str, defined_at: int | None, resolve: Callable[[str], int]) -> int:
    """S: ``defined_at`` when the patch defines the symbol, else ``resolve(name)``; a weak undefined symbol
    (``name`` starting with ``?``) that nothing defines is 0. Raises SymbolError from ``resolve``."""
    if defined_at is not None:
        return defined_at
    if name.startswith("?"):
        try:
            return resolve(name[1:])
        except SymbolError:
            return 0  # weak undefined
    return resolve(name)


def _protections(binary: PatchBinary, layout: Layout, region: int) -> list[tuple[int, int, int]]:
    """Per-page protection of the segments, merged into runs ``(address, size, PROT_*)``.

    Patches are linked ``-z noseparate-code -z norelro`` (see :mod:`hotpatch.patch.build`): one R+X segment
    and one R+W segment, so mapping one takes two injected syscalls (mmap, mprotect). A RELRO range would
    cost a third in the stop of the injecting thread; the patch's GOT stays writable instead, as in any
    binary linked without ``-z relro``.
    """
    base = region - layout.min_vaddr
    pages: dict[int, int] = {}
    for seg in binary.segments:
        for p in range(page_down(seg.vaddr), page_up(seg.vaddr + seg.memsz), PAGE):
            pages[p] = pages.get(p, 0) | seg.prot
    out: list[tuple[int, int, int]] = []
    for p in sorted(pages):
        addr, prot = base + p, pages[p]
        if out and out[-1][0] + out[-1][1] == addr and out[-1][2] == prot:
            out[-1] = (out[-1][0], out[-1][1] + PAGE, prot)
        else:
            out.append((addr, PAGE, prot))
    return out

"""The vtable slots that hold a virtual function's address in a module file.

A C++ virtual call loads the function's address from the object's vtable (Itanium C++ ABI §2.5, "Virtual
Table Layout"); g++ also devirtualises calls *speculatively*, comparing the slot with the function's address
and running an inlined copy of its body when they are equal. Redirecting the function's entry alone leaves
that inlined copy in use; changing the slot as well sends both kinds of call to the replacement.

Vtables are the objects named ``_ZTV<type>`` (Itanium C++ ABI §5.1.5, "vtable for T") in ``.dynsym`` or
``.symtab``, or in the module's separate debug file when it is stripped. In a position-independent module
their words are filled at load time by dynamic relocations (System V psABI: ``R_X86_64_RELATIVE``/
``R_386_RELATIVE``, B + A; ``R_X86_64_64``/``R_386_32``, S + A, for a function the module exports); in a
fixed-address executable (``ET_EXEC``) the words are in the file. A word of a vtable equal to the function's
link-time address is one of its slots. (Relocation type numbers are the same in both psABIs: RELATIVE 8,
64/32 1.) A stripped module without a debug file names no vtable: its slots are then not found, and only the
entry is redirected.
"""

from __future__ import annotations

from .image import ET_DYN, ElfImage, Rela, Symbol

R_RELATIVE, R_ABSOLUTE = 8, 1
VTABLE_PREFIX = "_ZTV"


def _word_at(image: ElfImage, place: int, rel: Rela | None) -> int | None:
    """The link-time value the word at ``place`` holds once loaded (bias not added), or None when it does not
    hold a module-relative address (an imported symbol, another relocation type, a constant of a PIC
    module)."""
    if rel is None:
        if image.type == ET_DYN:
            return None  # no relocation: a constant (offset-to-top), not an address
        return int.from_bytes(image.read_vaddr(place, image.bitness // 8), "little")
    if rel.type == R_RELATIVE:
        return rel.addend
    if rel.type == R_ABSOLUTE and rel.sym:
        _, sym, _ = image.dynamic_symbol_by_index(rel.sym)
        return None if sym is None else sym.value + rel.addend
    return None


def vtable_symbols(*images: ElfImage) -> list[Symbol]:
    """The vtable objects (``_ZTV…``, with a size) the images name: a module, and its separate debug file
    (a stripped executable keeps none in ``.dynsym``)."""
    found: dict[str, Symbol] = {}
    for img in images:
        for s in img.defined_symbols(VTABLE_PREFIX):
            if s.kind == "object" and s.size:
                found.setdefault(s.name, s)
    return list(found.values())


def vtable_slots(image: ElfImage, values: set[int], vtables: list[Symbol] | None = None) -> dict[int, list[int]]:
    """For each link-time function address of ``values``, the link-time addresses of the vtable words of
    ``image`` that hold it (sorted; absent when none); ``vtables``: the vtable objects to look in (default:
    :func:`vtable_symbols` of ``image``). Raises PatchFileError for a corrupt file."""
    vtables = vtable_symbols(image) if vtables is None else vtables
    if not vtables or not values:
        return {}
    word = image.bitness // 8
    relocs = {r.offset: r for r in image.dynamic_relocations()} if image.type == ET_DYN else {}
    out: dict[int, set[int]] = {}
    for vt in vtables:
        for place in range(vt.value, vt.value + vt.size - word + 1, word):
            value = _word_at(image, place, relocs.get(place))
            if value in values:
                out.setdefault(value, set()).add(place)
    return {v: sorted(p) for v, p in out.items()}

"""Reading a patch file: the shared object, its loadable segments, relocations, symbols and manifest.

A patch file is one ELF shared object (``ET_DYN``; x86-64 ELF64, or i386 ELF32 for 32-bit targets) with the
manifest in the section ``.hotpatch.manifest`` (see :mod:`hotpatch.patch.manifest`), whose ``arch`` names the
same machine. Relocation types handled are those the loader applies (DESIGN.md §5 "Deadlock": RELATIVE,
GLOB_DAT, JUMP_SLOT, 64; System V x86-64 psABI §4.4.1; on i386 RELATIVE, GLOB_DAT, JMP_SLOT, 32 and PC32,
i386 psABI "Relocation Types", with implicit addends read from the place).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from ..elf.image import ET_DYN, STB_WEAK, ElfImage, Symbol
from ..errors import PatchFileError
from . import signature
from .manifest import SECTION, Manifest

R_X86_64_NONE = 0
R_X86_64_64 = 1
R_X86_64_GLOB_DAT = 6
R_X86_64_JUMP_SLOT = 7
R_X86_64_RELATIVE = 8
SUPPORTED_RELOCATIONS = {R_X86_64_NONE, R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_RELATIVE}
R_386_NONE = 0
R_386_32 = 1
R_386_PC32 = 2
R_386_GLOB_DAT = 6
R_386_JMP_SLOT = 7
R_386_RELATIVE = 8
SUPPORTED_RELOCATIONS_I386 = {R_386_NONE, R_386_32, R_386_PC32, R_386_GLOB_DAT, R_386_JMP_SLOT, R_386_RELATIVE}
# machine (ElfImage.machine, Manifest.arch) -> (ELF class, relocation types the loader applies)
ARCHES = {"x86_64": (64, SUPPORTED_RELOCATIONS), "i386": (32, SUPPORTED_RELOCATIONS_I386)}
ORIGINAL_SECTION = "hotpatch_original"  # written by HOTPATCH_ORIGINAL in include/hotpatch.h


class Segment(NamedTuple):
    """A PT_LOAD: link-time ``vaddr``, ``memsz``/``filesz`` in bytes, its file ``data``, ``prot`` bits (PROT_*)."""

    vaddr: int
    memsz: int
    data: bytes
    prot: int


class Relocation(NamedTuple):
    """A dynamic relocation: ``offset`` (link-time address it patches), ``type``, ``symbol`` name (or "")
    with its definition in the patch (or None), and ``addend``."""

    offset: int
    type: int
    symbol: str
    defined: Symbol | None
    addend: int


class PatchBinary:
    """The shared object inside a patch file (or the freshly linked one during ``build``).

    ``arch`` is ``x86_64`` or ``i386`` and ``bitness`` 64 or 32 (its ELF class). Raises PatchFileError when
    the bytes are not a usable x86-64 ELF64 or i386 ELF32 little-endian shared object.
    """

    def __init__(self, data: bytes, where: str) -> None:
        self.where = where
        self.data = data
        self.image = ElfImage(data, where)
        img = self.image
        if img.machine not in ARCHES:
            raise PatchFileError(f"{where} is a patch for {img.machine} (ELF{img.elfclass}), not for x86_64 or i386")
        elfclass, self._supported = ARCHES[img.machine]
        if img.elfclass != elfclass or data[5] != 1:
            raise PatchFileError(
                f"{where} is corrupt (its ELF class/data bytes are not {elfclass}-bit little-endian for {img.machine})"
            )
        self.arch: str = img.machine
        self.bitness: int = img.elfclass
        if img.type != ET_DYN:
            raise PatchFileError(f"{where} is not a shared object")
        self.segments = [
            Segment(
                vaddr=seg.vaddr,
                memsz=seg.memsz,
                data=img.segment_data(seg),
                prot=(1 if seg.flags & 4 else 0) | (2 if seg.flags & 2 else 0) | (4 if seg.flags & 1 else 0),
            )
            for seg in img.loads
        ]
        if not self.segments:
            raise PatchFileError(f"{where} has no loadable segment")
        for seg in self.segments:
            if len(seg.data) > seg.memsz:
                raise PatchFileError(f"{where} is corrupt (segment file size exceeds memory size)")
        self.symbols: dict[str, Symbol] = {
            name: sym for name, sym, _ in img.dynamic_symbols() if name and sym is not None
        }
        self.relocations = self._relocations()
        sec = img.section(ORIGINAL_SECTION)
        self.original_slots = (sec.addr, sec.addr + sec.size) if sec else (0, 0)
        init = img.section(".init_array")
        self.has_constructors = init is not None and init.size > 0

    def _relocations(self) -> list[Relocation]:
        out: list[Relocation] = []
        for rel in self.image.dynamic_relocations():
            if rel.type not in self._supported:
                raise PatchFileError(
                    f"{self.where} needs relocation type {rel.type}, which hotpatch does not apply "
                    "(thread-local storage or IFUNC in a patch is not supported)"
                )
            name, defined = "", None
            if rel.sym:
                name, defined, binding = self.image.dynamic_symbol_by_index(rel.sym)
                if defined is None and binding == STB_WEAK:
                    name = "?" + name  # weak undefined: may resolve to 0
            out.append(Relocation(rel.offset, rel.type, name, defined, rel.addend))
        return out

    @property
    def content_sha256(self) -> str:
        """SHA-256 over the file bytes of every PT_LOAD, in order: all the loader maps or reads. The ELF
        header is left out (adding the manifest section changes its section-header fields)."""
        h = hashlib.sha256()
        skip = self.image.ehsize
        for i, seg in enumerate(self.segments):
            h.update(seg.data[skip:] if i == 0 and self.image.loads[0].offset == 0 else seg.data)
        return h.hexdigest()

    def section(self, name: str) -> bytes | None:
        """The raw contents of section ``name``, or None."""
        sec = self.image.section(name)
        return None if sec is None else self.image.section_data(sec)


class PatchFile(PatchBinary):
    """A patch file as ``apply`` reads it: the shared object plus its validated manifest, and ``signed``: its
    ELF bytes and the Ed25519 signature it may carry (:mod:`.signature`).

    Raises PatchFileError when the file is missing, corrupt, truncated, for another architecture, lacks a
    manifest, or its loadable content does not match the manifest's hash.
    """

    def __init__(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise PatchFileError(f"cannot read patch file {path}: {e.strerror}") from None
        if data[:4] != b"\x7fELF":
            raise PatchFileError(f"{path} is not a patch file (not an ELF shared object)")
        self.signed = signature.split(data, path)  # the ELF bytes, and the signature a repository added
        super().__init__(self.signed.elf, path)
        raw = self.section(SECTION)
        if raw is None:
            raise PatchFileError(f"{path} has no hotpatch manifest (section {SECTION}); build it with 'hotpatch build'")
        self.manifest = Manifest.from_json(raw, path)
        if self.manifest.arch not in ARCHES:
            raise PatchFileError(f"{path} is a patch for {self.manifest.arch}, not for x86_64 or i386")
        if self.manifest.arch != self.arch:
            raise PatchFileError(
                f"{path} is a patch for {self.arch} (ELF{self.bitness}), not for {self.manifest.arch} as its "
                "manifest says"
            )
        if self.manifest.content_sha256 != self.content_sha256:
            raise PatchFileError(f"{path} is corrupt: its code does not match the hash in its manifest")
        missing = [f.replacement or f.symbol for f in self.manifest.functions]
        missing = [name for name in missing if name not in self.symbols]
        if missing:  # the section headers that locate .dynsym are outside the content hash
            raise PatchFileError(f"{path} is corrupt: it does not define {', '.join(missing)}, named in its manifest")

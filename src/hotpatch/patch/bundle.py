"""Reading a patch file: the shared object, its loadable segments, relocations, symbols and manifest.

A patch file is one ELF shared object (x86-64, ``ET_DYN``) with the manifest in the section
``.hotpatch.manifest`` (see :mod:`hotpatch.patch.manifest`). Relocation types handled are those the loader
applies (DESIGN.md §5 "Deadlock": RELATIVE, GLOB_DAT, JUMP_SLOT, 64; System V x86-64 psABI §4.4.1).
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from typing import Any

from elftools.common.exceptions import ELFError, ELFParseError

from ..elf.image import ElfImage, Symbol, _symbol
from ..errors import PatchFileError
from .manifest import SECTION, Manifest

R_X86_64_NONE = 0
R_X86_64_64 = 1
R_X86_64_GLOB_DAT = 6
R_X86_64_JUMP_SLOT = 7
R_X86_64_RELATIVE = 8
SUPPORTED_RELOCATIONS = {R_X86_64_NONE, R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_RELATIVE}
ORIGINAL_SECTION = "hotpatch_original"  # written by HOTPATCH_ORIGINAL in include/hotpatch.h


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD: link-time ``vaddr``, ``memsz``/``filesz`` in bytes, its file ``data``, ``prot`` bits (PROT_*)."""

    vaddr: int
    memsz: int
    data: bytes
    prot: int


@dataclass(frozen=True)
class Relocation:
    """A dynamic relocation: ``offset`` (link-time address it patches), ``type``, ``symbol`` name (or "")
    with its definition in the patch (or None), and ``addend``."""

    offset: int
    type: int
    symbol: str
    defined: Symbol | None
    addend: int


@dataclass(frozen=True)
class RelroRange:
    """The PT_GNU_RELRO range ``[start, end)`` (link-time), made read-only after relocation."""

    start: int
    end: int


class PatchBinary:
    """The shared object inside a patch file (or the freshly linked one during ``build``).

    Raises PatchFileError when the bytes are not a usable x86-64 shared object.
    """

    def __init__(self, data: bytes, where: str) -> None:
        self.where = where
        self.data = data
        try:
            self.image = ElfImage(io.BytesIO(data), where)
            self._parse()
        except PatchFileError:
            raise
        except (ELFError, ELFParseError, struct.error, ValueError, EOFError, KeyError, AttributeError, TypeError) as e:
            raise PatchFileError(f"{where} is corrupt or truncated ({type(e).__name__}: {e})") from None

    def _parse(self) -> None:
        img = self.image
        if img.machine != "EM_X86_64" or img.elfclass != 64:
            arch = {"EM_386": "i386", "EM_AARCH64": "aarch64", "EM_ARM": "arm"}.get(img.machine, img.machine)
            raise PatchFileError(f"{self.where} is a patch for {arch} (ELF{img.elfclass}), not for x86_64")
        if img.elf["e_type"] != "ET_DYN":
            raise PatchFileError(f"{self.where} is not a shared object")
        self.segments = [
            Segment(
                vaddr=int(s["p_vaddr"]),
                memsz=int(s["p_memsz"]),
                data=s.data(),
                prot=(1 if s["p_flags"] & 4 else 0) | (2 if s["p_flags"] & 2 else 0) | (4 if s["p_flags"] & 1 else 0),
            )
            for s in img.loads
        ]
        if not self.segments:
            raise PatchFileError(f"{self.where} has no loadable segment")
        for seg in self.segments:
            if len(seg.data) > seg.memsz:
                raise PatchFileError(f"{self.where} is corrupt (segment file size exceeds memory size)")
        relro = next(iter(img.elf.iter_segments("PT_GNU_RELRO")), None)
        self.relro = RelroRange(int(relro["p_vaddr"]), int(relro["p_vaddr"]) + int(relro["p_memsz"])) if relro else None
        self.symbols: dict[str, Symbol] = {}
        dynsym = img.elf.get_section_by_name(".dynsym")
        if dynsym is not None:
            for sym in dynsym.iter_symbols():
                if sym.name and sym["st_shndx"] != "SHN_UNDEF":
                    self.symbols[sym.name] = _symbol(sym)
        self.relocations = self._relocations(dynsym)
        sec = img.elf.get_section_by_name(ORIGINAL_SECTION)
        self.original_slots = (int(sec["sh_addr"]), int(sec["sh_addr"]) + int(sec["sh_size"])) if sec else (0, 0)
        init = img.elf.get_section_by_name(".init_array")
        self.has_constructors = init is not None and int(init["sh_size"]) > 0

    def _relocations(self, dynsym: Any) -> list[Relocation]:
        out: list[Relocation] = []
        for sec in self.image.elf.iter_sections():
            if sec["sh_type"] != "SHT_RELA":
                continue
            if sec["sh_flags"] & 2 == 0:  # not SHF_ALLOC: a static relocation section, not ours
                continue
            for rel in sec.iter_relocations():
                rtype, index = int(rel["r_info_type"]), int(rel["r_info_sym"])
                if rtype not in SUPPORTED_RELOCATIONS:
                    raise PatchFileError(
                        f"{self.where} needs relocation type {rtype}, which hotpatch does not apply "
                        "(thread-local storage or IFUNC in a patch is not supported)"
                    )
                name, defined = "", None
                if index:
                    sym = dynsym.get_symbol(index)
                    name = sym.name
                    if sym["st_shndx"] != "SHN_UNDEF":
                        defined = _symbol(sym)
                    elif sym["st_info"]["bind"] == "STB_WEAK":
                        name = "?" + name  # weak undefined: may resolve to 0
                out.append(Relocation(int(rel["r_offset"]), rtype, name, defined, int(rel["r_addend"])))
        return out

    @property
    def content_sha256(self) -> str:
        """SHA-256 over the file bytes of every PT_LOAD, in order: all the loader maps or reads. The ELF
        header is left out (adding the manifest section changes its section-header fields)."""
        h = hashlib.sha256()
        skip = int(self.image.elf["e_ehsize"])
        for i, seg in enumerate(self.segments):
            h.update(seg.data[skip:] if i == 0 and self._first_offset == 0 else seg.data)
        return h.hexdigest()

    @property
    def _first_offset(self) -> int:
        return int(self.image.loads[0]["p_offset"])

    def section(self, name: str) -> bytes | None:
        """The raw contents of section ``name``, or None."""
        sec = self.image.elf.get_section_by_name(name)
        return None if sec is None else bytes(sec.data())


class PatchFile(PatchBinary):
    """A patch file as ``apply`` reads it: the shared object plus its validated manifest.

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
        super().__init__(data, path)
        raw = self.section(SECTION)
        if raw is None:
            raise PatchFileError(f"{path} has no hotpatch manifest (section {SECTION}); build it with 'hotpatch build'")
        self.manifest = Manifest.from_json(raw, path)
        if self.manifest.arch != "x86_64":
            raise PatchFileError(f"{path} is a patch for {self.manifest.arch}, not for x86_64")
        if self.manifest.content_sha256 != self.content_sha256:
            raise PatchFileError(f"{path} is corrupt: its code does not match the hash in its manifest")

"""Reading ELF files with pyelftools: build-id, loadable segments, and symbol look-up.

Symbol look-up goes through ``.gnu.hash`` when present (one chain walk, not a scan of 3,000 symbols), then
``.symtab`` when the file has one. Of several definitions of one name (symbol versions, e.g. libc's
``memcpy@GLIBC_2.2.5`` and ``memcpy@@GLIBC_2.14``) the default version wins, as ld.so does for an
unversioned reference (ELF gABI "Symbol Versioning"; the hidden bit 0x8000 of ``.gnu.version``).
Layouts: System V gABI, and https://flapenguin.me/elf-dt-gnu-hash for ``.gnu.hash``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from typing import IO, Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.hash import GNUHashTable

from ..errors import PatchFileError

STT_FUNC = "STT_FUNC"
STT_GNU_IFUNC = "STT_LOOS"  # pyelftools names type 10 STT_LOOS


@dataclass(frozen=True)
class Symbol:
    """A defined symbol: ``value`` is its link-time address (add the load bias), ``size`` in bytes."""

    name: str
    value: int
    size: int
    kind: str  # "func", "object", "ifunc", "tls", "other"
    binding: str  # "global", "weak", "local"
    section: int


def _kind(st_type: str) -> str:
    return {
        "STT_FUNC": "func",
        "STT_OBJECT": "object",
        "STT_LOOS": "ifunc",
        "STT_GNU_IFUNC": "ifunc",
        "STT_TLS": "tls",
    }.get(st_type, "other")


def _symbol(sym: Any) -> Symbol:
    return Symbol(
        name=sym.name,
        value=int(sym["st_value"]),
        size=int(sym["st_size"]),
        kind=_kind(sym["st_info"]["type"]),
        binding=str(sym["st_info"]["bind"]).removeprefix("STB_").lower(),
        section=sym["st_shndx"] if isinstance(sym["st_shndx"], int) else -1,
    )


class ElfImage:
    """An ELF file opened for reading. Raises PatchFileError (via :func:`open_elf`) when it is not ELF.

    The file object stays open for the lifetime of the image; call :meth:`close`.
    """

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.name = name
        self._stream = stream
        self.elf = ELFFile(stream)

    def close(self) -> None:
        """Close the underlying file."""
        self._stream.close()

    @property
    def machine(self) -> str:
        """``e_machine`` as pyelftools names it, e.g. ``EM_X86_64`` or ``EM_386``."""
        return str(self.elf["e_machine"])

    @property
    def elfclass(self) -> int:
        """32 or 64."""
        return int(self.elf.elfclass)

    @cached_property
    def build_id(self) -> str | None:
        """The GNU build-id as lowercase hex (``.note.gnu.build-id`` or any PT_NOTE), or None."""
        for sec in self.elf.iter_sections():
            if sec["sh_type"] == "SHT_NOTE":
                for note in sec.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"])
        for seg in self.elf.iter_segments("PT_NOTE"):
            for note in seg.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return str(note["n_desc"])
        return None

    @cached_property
    def loads(self) -> list[Any]:
        """The PT_LOAD program headers, in file order."""
        return list(self.elf.iter_segments("PT_LOAD"))

    def load_bias(self, file_offset: int, map_start: int) -> int:
        """Load bias given that file page ``file_offset`` is mapped at ``map_start`` (System V gABI, "Program
        Loading": a PT_LOAD's page of offset ``p_offset & ~4095`` lands at ``bias + (p_vaddr & ~4095)``).

        Raises PatchFileError when no PT_LOAD covers that file offset.
        """
        for seg in self.loads:
            off, vaddr = int(seg["p_offset"]), int(seg["p_vaddr"])
            if off & ~4095 <= file_offset < off + int(seg["p_filesz"]) or off & ~4095 == file_offset:
                return map_start - ((vaddr & ~4095) + (file_offset - (off & ~4095)))
        raise PatchFileError(f"{self.name}: no loadable segment at file offset {file_offset:#x}")

    # -- symbols ------------------------------------------------------------------------------------
    @cached_property
    def _dynsym(self) -> Any:
        return self.elf.get_section_by_name(".dynsym")

    @cached_property
    def _versym(self) -> Any:
        return self.elf.get_section_by_name(".gnu.version")

    @cached_property
    def _gnu_hash(self) -> GNUHashTable | None:
        sec = self.elf.get_section_by_name(".gnu.hash")
        if sec is None or self._dynsym is None:
            return None
        return GNUHashTable(self.elf, sec["sh_offset"], self._dynsym)

    @cached_property
    def _symtab_index(self) -> dict[str, Symbol]:
        sec = self.elf.get_section_by_name(".symtab")
        out: dict[str, Symbol] = {}
        if sec is None:
            return out
        for sym in sec.iter_symbols():
            if sym["st_shndx"] == "SHN_UNDEF" or not sym.name:
                continue
            s = _symbol(sym)
            # prefer a global definition over a local one of the same name
            if s.name not in out or out[s.name].binding == "local":
                out[s.name] = s
        return out

    @property
    def has_symtab(self) -> bool:
        """True when the file has a ``.symtab`` (it is not stripped)."""
        return self.elf.get_section_by_name(".symtab") is not None

    def dynamic_symbol(self, name: str) -> Symbol | None:
        """The defined ``.dynsym`` symbol ``name`` (default version), via ``.gnu.hash``; None if absent."""
        table = self._gnu_hash
        if table is None:
            if self._dynsym is None:
                return None
            return self._scan_dynsym(name)
        params = table.params
        h = GNUHashTable.gnu_hash(name)
        if not table._matches_bloom(h):
            return None
        idx = params["buckets"][h % params["nbuckets"]]
        if idx < params["symoffset"]:
            return None
        best: Symbol | None = None
        stream = self.elf.stream
        while True:
            stream.seek(table._chain_pos + (idx - params["symoffset"]) * 4)
            cur = struct.unpack("<I", stream.read(4))[0]
            if cur | 1 == h | 1:
                sym = self._dynsym.get_symbol(idx)
                if sym.name == name and sym["st_shndx"] != "SHN_UNDEF":
                    s = _symbol(sym)
                    if not self._hidden_version(idx):
                        return s
                    best = best or s
            if cur & 1:
                return best
            idx += 1

    def _hidden_version(self, idx: int) -> bool:
        if self._versym is None:
            return False
        return bool(_versym_raw(self._versym, idx) & 0x8000)

    def _scan_dynsym(self, name: str) -> Symbol | None:
        for sym in self._dynsym.iter_symbols():
            if sym.name == name and sym["st_shndx"] != "SHN_UNDEF":
                return _symbol(sym)
        return None

    def symbol(self, name: str) -> Symbol | None:
        """``name`` from ``.dynsym`` first, then ``.symtab``; None when neither defines it."""
        return self.dynamic_symbol(name) or self._symtab_index.get(name)

    def function_symbols(self) -> dict[str, Symbol]:
        """Every defined function (and IFUNC) symbol of ``.dynsym`` and ``.symtab`` by name."""
        out: dict[str, Symbol] = {}
        if self._dynsym is not None:
            for sym in self._dynsym.iter_symbols():
                if sym["st_shndx"] != "SHN_UNDEF" and sym.name:
                    s = _symbol(sym)
                    if s.kind in ("func", "ifunc"):
                        out.setdefault(s.name, s)
        for name, s in self._symtab_index.items():
            if s.kind in ("func", "ifunc"):
                out.setdefault(name, s)
        return out

    def import_slots(self, name: str) -> list[int]:
        """Link-time addresses of the GOT slots (GLOB_DAT, JUMP_SLOT, 64 relocations) that import ``name``."""
        index = self._imports_index
        return index.get(name, [])

    @cached_property
    def _imports_index(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        dynsym = self._dynsym
        if dynsym is None:
            return out
        for sec in self.elf.iter_sections():
            if sec["sh_type"] != "SHT_RELA" or not sec["sh_flags"] & 2:
                continue
            for rel in sec.iter_relocations():
                if int(rel["r_info_type"]) in (1, 6, 7) and rel["r_info_sym"]:
                    sym = dynsym.get_symbol(int(rel["r_info_sym"]))
                    out.setdefault(sym.name, []).append(int(rel["r_offset"]))
        return out

    def read_vaddr(self, vaddr: int, size: int) -> bytes:
        """Bytes of the file image at link-time address ``vaddr`` (zeros past a segment's file size)."""
        for seg in self.loads:
            lo = int(seg["p_vaddr"])
            if lo <= vaddr and vaddr + size <= lo + int(seg["p_memsz"]):
                rel = vaddr - lo
                data: bytes = seg.data()[rel : rel + size]
                return data + bytes(size - len(data))
        raise PatchFileError(f"{self.name}: address {vaddr:#x} (+{size}) is not inside a loadable segment")


def _versym_raw(versym: Any, idx: int) -> int:
    stream = versym.stream
    stream.seek(versym["sh_offset"] + idx * 2)
    return int(struct.unpack("<H", stream.read(2))[0])


def open_elf(path: str, what: str = "file") -> ElfImage:
    """Open ``path`` as an ELF image. Raises PatchFileError naming ``what`` when it is missing or not ELF."""
    try:
        stream = open(path, "rb")  # noqa: SIM115 - owned by the ElfImage
    except OSError as e:
        raise PatchFileError(f"cannot open {what} {path}: {e.strerror}") from None
    try:
        return ElfImage(stream, path)
    except (ELFError, struct.error, ValueError, EOFError) as e:
        stream.close()
        raise PatchFileError(f"{what} {path} is not a valid ELF file ({e})") from None

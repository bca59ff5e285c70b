"""A small reader of little-endian ELF files, 64-bit and 32-bit: headers, build-id, symbols, dynamic relocations.

hotpatch reads ELF on every ``apply`` (the patch and the target's modules), so this reader is part of the
loader: it maps the file and unpacks only the structures it needs, with no import cost (pyelftools, the
design's first choice, takes ~50 ms to import, 40% of the apply budget; it stays as a second opinion in
the tests). Layouts: System V gABI (ELF header, program and section headers, ``Elf64_Sym``, ``Elf64_Rela``,
notes, and their ELFCLASS32 forms ``Elf32_Ehdr``/``Elf32_Phdr``/``Elf32_Shdr``/``Elf32_Sym``/``Elf32_Rel``,
whose fields are 4 bytes wide and, for program headers and symbols, in another order; glibc ``elf.h``), the
GNU ``.gnu.hash`` table (https://flapenguin.me/elf-dt-gnu-hash; its Bloom words are ELFCLASS-sized), and
symbol versioning (the hidden bit 0x8000 of ``.gnu.version``: of several definitions of one name, the default
version wins, as ld.so does for an unversioned reference). i386 objects (``EM_386``) carry SHT_REL
relocations, whose addend is not in the entry but is the word at the place (i386 psABI, "Relocation
Types"); :meth:`ElfImage.dynamic_relocations` reads it from the file.

Every malformed or truncated file raises PatchFileError naming it; nothing here raises struct.error.
"""

from __future__ import annotations

import mmap
import struct
from functools import cached_property
from typing import NamedTuple

from ..errors import PatchFileError

EM_NAMES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv"}
ET_DYN = 3
PT_LOAD, PT_NOTE = 1, 4
SHT_SYMTAB, SHT_RELA, SHT_NOTE, SHT_REL, SHT_DYNSYM = 2, 4, 7, 9, 11
SHF_ALLOC = 2
NT_GNU_BUILD_ID = 3
STT_OBJECT, STT_FUNC, STT_TLS, STT_GNU_IFUNC = 1, 2, 6, 10
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
SHN_UNDEF = 0
PAGE = 4096


class _Layout(NamedTuple):
    """The on-disk structures of one ELF class (System V gABI; glibc ``elf.h``). ``ehdr`` starts after
    ``e_ident`` (16 bytes); ``word``: bytes in an address (the ``.gnu.hash`` Bloom word); ``rel_shift``:
    ``r_info >> rel_shift`` is the symbol index, the rest of ``r_info`` the type (ELF64_R_SYM/ELF32_R_SYM)."""

    ehdr: struct.Struct
    phdr: struct.Struct
    shdr: struct.Struct
    sym: struct.Struct
    rela: struct.Struct
    rel: struct.Struct
    word: int
    rel_shift: int


_ELF64 = _Layout(
    ehdr=struct.Struct("<HHIQQQIHHHHHH"),
    phdr=struct.Struct("<IIQQQQQQ"),  # type, flags, offset, vaddr, paddr, filesz, memsz, align
    shdr=struct.Struct("<IIQQQQIIQQ"),
    sym=struct.Struct("<IBBHQQ"),  # name, info, other, shndx, value, size
    rela=struct.Struct("<QQq"),
    rel=struct.Struct("<QQ"),
    word=8,
    rel_shift=32,
)
_ELF32 = _Layout(
    ehdr=struct.Struct("<HHIIIIIHHHHHH"),
    phdr=struct.Struct("<IIIIIIII"),  # type, offset, vaddr, paddr, filesz, memsz, flags, align
    shdr=struct.Struct("<IIIIIIIIII"),
    sym=struct.Struct("<IIIBBH"),  # name, value, size, info, other, shndx
    rela=struct.Struct("<IIi"),
    rel=struct.Struct("<II"),
    word=4,
    rel_shift=8,
)


class Symbol(NamedTuple):
    """A defined symbol: ``value`` is its link-time address (add the load bias), ``size`` in bytes,
    ``kind`` one of func/object/ifunc/tls/other, ``binding`` global/weak/local, ``section`` its index."""

    name: str
    value: int
    size: int
    kind: str
    binding: str
    section: int


class Segment(NamedTuple):
    """A program header (``Elf64_Phdr`` or ``Elf32_Phdr``; offsets, addresses and sizes in bytes)."""

    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int


class Section(NamedTuple):
    """A section header (``Elf64_Shdr`` or ``Elf32_Shdr``) with its resolved name."""

    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int


class Rela(NamedTuple):
    """A relocation: ``offset`` (link-time address of the place), ``type``, symbol index ``sym``, ``addend``.

    From an SHT_RELA entry (``Elf64_Rela``/``Elf32_Rela``) the addend is the entry's; from an SHT_REL entry
    (``Elf32_Rel``, i386) it is the implicit addend, the signed word at the place in the file image (4 bytes
    in ELFCLASS32, 8 in ELFCLASS64), and ``implicit`` is True. A place in ``.bss`` reads as 0.
    """

    offset: int
    type: int
    sym: int
    addend: int
    implicit: bool = False


_KINDS = {STT_OBJECT: "object", STT_FUNC: "func", STT_TLS: "tls", STT_GNU_IFUNC: "ifunc"}
_BINDINGS = {STB_LOCAL: "local", STB_GLOBAL: "global", STB_WEAK: "weak"}


class ElfImage:
    """An ELF file's bytes (a ``bytes`` object or a read-only mmap) with parsed headers.

    ``machine`` and ``elfclass`` are always available; everything else requires a little-endian ELF64 or
    ELF32 file (``e_ident[EI_CLASS]`` 2 or 1, ``EI_DATA`` 1) and raises PatchFileError otherwise. Call
    :meth:`close` to release a mapped file.
    """

    def __init__(self, data: bytes | mmap.mmap, name: str) -> None:
        self.name = name
        self.data = data
        if len(data) < 64 or data[:4] != b"\x7fELF":
            raise PatchFileError(f"{name} is not an ELF file")
        self.elfclass = 64 if data[4] == 2 else 32
        self.machine_id = int.from_bytes(data[18:20], "little")
        self._layout = _ELF64 if self.elfclass == 64 else _ELF32
        if data[4] in (1, 2) and data[5] == 1:
            (
                self.type,
                _,
                _,
                _,
                self.phoff,
                self.shoff,
                _,
                self.ehsize,
                self.phentsize,
                self.phnum,
                self.shentsize,
                self.shnum,
                self.shstrndx,
            ) = self._layout.ehdr.unpack_from(data, 16)

    @property
    def machine(self) -> str:
        """The architecture: ``x86_64``, ``i386``, … (or ``EM_<n>``)."""
        return EM_NAMES.get(self.machine_id, f"EM_{self.machine_id}")

    @property
    def bitness(self) -> int:
        """64 for an ELFCLASS64 file, 32 for an ELFCLASS32 one (i386): the width of its addresses in bits."""
        return self.elfclass

    def close(self) -> None:
        """Release the file mapping (a ``bytes`` image needs nothing)."""
        if isinstance(self.data, mmap.mmap):
            self.data.close()

    def _need_le(self) -> None:
        if self.data[4] not in (1, 2) or self.data[5] != 1:
            raise PatchFileError(f"{self.name} is not a 64-bit or 32-bit little-endian ELF file")

    def _unpack(self, st: struct.Struct, off: int) -> tuple[int, ...]:
        if off < 0 or off + st.size > len(self.data):
            raise PatchFileError(f"{self.name} is corrupt or truncated (a structure at {off:#x} is past its end)")
        return st.unpack_from(self.data, off)

    def bytes_at(self, off: int, size: int) -> bytes:
        """``size`` bytes at file offset ``off``. Raises PatchFileError past the end of the file."""
        if off < 0 or size < 0 or off + size > len(self.data):
            raise PatchFileError(f"{self.name} is corrupt or truncated ({size} bytes at {off:#x} are past its end)")
        return bytes(self.data[off : off + size])

    # -- headers ------------------------------------------------------------------------------------
    @cached_property
    def segments(self) -> list[Segment]:
        """Every program header."""
        self._need_le()
        out = []
        for i in range(self.phnum):
            raw = self._unpack(self._layout.phdr, self.phoff + i * self.phentsize)
            if self.elfclass == 64:
                ptype, flags, off, vaddr, _, filesz, memsz, _ = raw
            else:
                ptype, off, vaddr, _, filesz, memsz, flags, _ = raw
            out.append(Segment(ptype, flags, off, vaddr, filesz, memsz))
        return out

    @cached_property
    def loads(self) -> list[Segment]:
        """The PT_LOAD program headers, in file order."""
        return [s for s in self.segments if s.type == PT_LOAD]

    @cached_property
    def sections(self) -> list[Section]:
        """Every section header, with names from ``.shstrtab`` (empty when the file has none)."""
        self._need_le()
        if self.shoff == 0 or self.shnum == 0:
            return []
        raw = [self._unpack(self._layout.shdr, self.shoff + i * self.shentsize) for i in range(self.shnum)]
        if self.shstrndx >= len(raw):
            raise PatchFileError(f"{self.name} is corrupt (bad section name table index)")
        strtab = raw[self.shstrndx]
        names = self.bytes_at(strtab[4], strtab[5])
        out = []
        for name_off, stype, flags, addr, off, size, link, _, _, entsize in raw:
            end = names.find(b"\0", name_off)
            name = names[name_off:end].decode(errors="replace")
            out.append(Section(name, stype, flags, addr, off, size, link, entsize))
        return out

    def section(self, name: str) -> Section | None:
        """The first section called ``name``, or None."""
        return next((s for s in self.sections if s.name == name), None)

    def section_data(self, sec: Section) -> bytes:
        """The contents of a section (empty for SHT_NOBITS)."""
        return b"" if sec.type == 8 else self.bytes_at(sec.offset, sec.size)

    def segment_data(self, seg: Segment) -> bytes:
        """The file bytes of a segment (``filesz`` of them)."""
        return self.bytes_at(seg.offset, seg.filesz)

    @cached_property
    def build_id(self) -> str | None:
        """The GNU build-id as lowercase hex (from PT_NOTE or SHT_NOTE), or None."""
        areas = [(s.offset, s.filesz) for s in self.segments if s.type == PT_NOTE]
        if not areas:
            areas = [(s.offset, s.size) for s in self.sections if s.type == SHT_NOTE]
        for off, size in areas:
            pos, end = off, off + size
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.bytes_at(pos, 12))
                name_at = pos + 12
                desc_at = name_at + ((namesz + 3) & ~3)
                if ntype == NT_GNU_BUILD_ID and self.bytes_at(name_at, namesz).rstrip(b"\0") == b"GNU":
                    return self.bytes_at(desc_at, descsz).hex()
                pos = desc_at + ((descsz + 3) & ~3)
        return None

    def load_bias(self, file_offset: int, map_start: int) -> int:
        """Load bias given that file page ``file_offset`` is mapped at ``map_start`` (System V gABI,
        "Program Loading": a PT_LOAD's page of offset ``p_offset & ~4095`` lands at
        ``bias + (p_vaddr & ~4095)``). Raises PatchFileError when no PT_LOAD covers that file offset."""
        for seg in self.loads:
            page_off = seg.offset & ~(PAGE - 1)
            if page_off <= file_offset < seg.offset + max(seg.filesz, 1):
                return map_start - ((seg.vaddr & ~(PAGE - 1)) + (file_offset - page_off))
        raise PatchFileError(f"{self.name}: no loadable segment at file offset {file_offset:#x}")

    def read_vaddr(self, vaddr: int, size: int) -> bytes:
        """Bytes of the file image at link-time address ``vaddr`` (zeros past a segment's file size)."""
        for seg in self.loads:
            if seg.vaddr <= vaddr and vaddr + size <= seg.vaddr + seg.memsz:
                rel = vaddr - seg.vaddr
                have = max(0, min(size, seg.filesz - rel))
                return self.bytes_at(seg.offset + rel, have) + bytes(size - have)
        raise PatchFileError(f"{self.name}: address {vaddr:#x} (+{size}) is not inside a loadable segment")

    # -- symbols ------------------------------------------------------------------------------------
    def _table(self, stype: int) -> tuple[Section, bytes] | None:
        sec = next((s for s in self.sections if s.type == stype), None)
        if sec is None or sec.link >= len(self.sections):
            return None
        return sec, self.section_data(self.sections[sec.link])

    @cached_property
    def _dynsym(self) -> tuple[Section, bytes] | None:
        return self._table(SHT_DYNSYM)

    def _raw_symbol(self, sec: Section, idx: int) -> tuple[int, int, int, int, int]:
        """``(st_name, st_info, st_shndx, st_value, st_size)`` of entry ``idx`` of symbol table ``sec``."""
        raw = self._unpack(self._layout.sym, sec.offset + idx * self._layout.sym.size)
        if self.elfclass == 64:
            name_off, info, _, shndx, value, size = raw
        else:
            name_off, value, size, info, _, shndx = raw
        return name_off, info, shndx, value, size

    def _symbol_count(self, sec: Section) -> int:
        return sec.size // self._layout.sym.size

    def _symbol_at(self, table: tuple[Section, bytes], idx: int) -> tuple[str, Symbol | None]:
        sec, strtab = table
        name_off, info, shndx, value, size = self._raw_symbol(sec, idx)
        end = strtab.find(b"\0", name_off)
        name = strtab[name_off : end if end >= 0 else len(strtab)].decode(errors="replace")
        if shndx == SHN_UNDEF:
            return name, None
        return name, Symbol(
            name, value, size, _KINDS.get(info & 0xF, "other"), _BINDINGS.get(info >> 4, "other"), shndx
        )

    def dynamic_symbols(self) -> list[tuple[str, Symbol | None, int]]:
        """Every ``.dynsym`` entry: ``(name, definition or None when undefined, st_info binding)``."""
        table = self._dynsym
        if table is None:
            return []
        out = []
        for i in range(1, self._symbol_count(table[0])):
            name, sym = self._symbol_at(table, i)
            out.append((name, sym, self._raw_symbol(table[0], i)[1] >> 4))
        return out

    def dynamic_symbol_by_index(self, idx: int) -> tuple[str, Symbol | None, int]:
        """``.dynsym`` entry ``idx`` as ``(name, definition or None, binding)``."""
        table = self._dynsym
        if table is None or not 0 <= idx < self._symbol_count(table[0]):
            raise PatchFileError(f"{self.name} is corrupt (symbol index {idx} out of range)")
        name, sym = self._symbol_at(table, idx)
        return name, sym, self._raw_symbol(table[0], idx)[1] >> 4

    @cached_property
    def _gnu_hash(self) -> tuple[int, int, int, int, int] | None:
        sec = self.section(".gnu.hash")
        if sec is None or self._dynsym is None:
            return None
        nbuckets, symoffset, bloom_size, _ = struct.unpack_from("<IIII", self.bytes_at(sec.offset, 16))
        buckets = sec.offset + 16 + bloom_size * self._layout.word
        chains = buckets + nbuckets * 4
        return nbuckets, symoffset, buckets, chains, sec.offset

    @cached_property
    def _versym(self) -> Section | None:
        return self.section(".gnu.version")

    def dynamic_symbol(self, name: str) -> Symbol | None:
        """The defined ``.dynsym`` symbol ``name`` (default version), via ``.gnu.hash``; None if absent."""
        gh = self._gnu_hash
        table = self._dynsym
        if table is None:
            return None
        if gh is None:
            return next((s for n, s, _ in self.dynamic_symbols() if n == name and s is not None), None)
        nbuckets, symoffset, buckets, chains, _ = gh
        if nbuckets == 0:
            return None
        h = 5381
        for c in name.encode():
            h = (h * 33 + c) & 0xFFFFFFFF
        (idx,) = struct.unpack_from("<I", self.bytes_at(buckets + (h % nbuckets) * 4, 4))
        if idx < symoffset:
            return None
        best: Symbol | None = None
        while True:
            (cur,) = struct.unpack_from("<I", self.bytes_at(chains + (idx - symoffset) * 4, 4))
            if cur | 1 == h | 1:
                sname, sym = self._symbol_at(table, idx)
                if sname == name and sym is not None:
                    if not self._hidden(idx):
                        return sym
                    best = best or sym
            if cur & 1:
                return best
            idx += 1

    def _hidden(self, idx: int) -> bool:
        vs = self._versym
        if vs is None:
            return False
        return bool(int.from_bytes(self.bytes_at(vs.offset + idx * 2, 2), "little") & 0x8000)

    @cached_property
    def _symtab_index(self) -> dict[str, Symbol]:
        return self._symtab_scan[0]

    @cached_property
    def _symtab_scan(self) -> tuple[dict[str, Symbol], frozenset[str]]:
        """``.symtab`` by name (a global definition over local ones), and the names only local symbols define,
        at two or more addresses (``static`` objects of the same name in several translation units)."""
        table = self._table(SHT_SYMTAB)
        out: dict[str, Symbol] = {}
        locals_at: dict[str, set[int]] = {}
        if table is None:
            return out, frozenset()
        for i in range(1, self._symbol_count(table[0])):
            name, sym = self._symbol_at(table, i)
            if sym is None or not name:
                continue
            if sym.binding == "local":
                locals_at.setdefault(name, set()).add(sym.value)
            if name not in out or out[name].binding == "local":
                out[name] = sym
        ambiguous = frozenset(n for n, at in locals_at.items() if len(at) > 1 and out[n].binding == "local")
        return out, ambiguous

    def ambiguous_locals(self) -> frozenset[str]:
        """Names that only ``static`` (local) symbols of ``.symtab`` define, at more than one address: a patch
        naming one cannot be bound without guessing."""
        return self._symtab_scan[1]

    @property
    def has_symtab(self) -> bool:
        """True when the file has a ``.symtab`` (it is not stripped)."""
        return any(s.type == SHT_SYMTAB for s in self.sections)

    def symbol(self, name: str) -> Symbol | None:
        """``name`` from ``.dynsym`` first, then ``.symtab``; None when neither defines it."""
        return self.dynamic_symbol(name) or self._symtab_index.get(name)

    def symtab_symbol(self, name: str) -> Symbol | None:
        """``name`` from ``.symtab`` alone (a separate debug file's ``.dynsym`` is SHT_NOBITS); None when it
        does not define it."""
        return self._symtab_index.get(name)

    def function_symbols(self) -> dict[str, Symbol]:
        """Every defined function (and IFUNC) symbol of ``.dynsym`` and ``.symtab`` by name."""
        out: dict[str, Symbol] = {}
        for name, sym, _ in self.dynamic_symbols():
            if sym is not None and name and sym.kind in ("func", "ifunc"):
                out.setdefault(name, sym)
        for name, sym in self._symtab_index.items():
            if sym.kind in ("func", "ifunc"):
                out.setdefault(name, sym)
        return out

    def defined_symbols(self, prefix: str = "") -> list[Symbol]:
        """Every defined symbol of ``.dynsym`` and ``.symtab`` whose name starts with ``prefix``, once per
        name (``.dynsym``'s first), in no particular order."""
        out: dict[str, Symbol] = {}
        for name, sym, _ in self.dynamic_symbols():
            if sym is not None and name.startswith(prefix):
                out.setdefault(name, sym)
        for name, sym in self._symtab_index.items():
            if name.startswith(prefix):
                out.setdefault(name, sym)
        return list(out.values())

    # -- relocations --------------------------------------------------------------------------------
    def dynamic_relocations(self) -> list[Rela]:
        """Every relocation of the allocated SHT_RELA and SHT_REL sections (``.rela.dyn``/``.rela.plt``;
        ``.rel.dyn``/``.rel.plt`` on i386), in section order.

        An SHT_REL entry's addend is read from the place (see :class:`Rela`). Raises PatchFileError when such
        a place lies outside every PT_LOAD, or a table runs past the end of the file.
        """
        lay = self._layout
        mask = (1 << lay.rel_shift) - 1
        out = []
        for sec in self.sections:
            if sec.type not in (SHT_RELA, SHT_REL) or not sec.flags & SHF_ALLOC:
                continue
            st = lay.rela if sec.type == SHT_RELA else lay.rel
            for i in range(sec.size // st.size):
                off, info, *explicit = self._unpack(st, sec.offset + i * st.size)
                if explicit:
                    out.append(Rela(off, info & mask, info >> lay.rel_shift, explicit[0]))
                else:
                    out.append(Rela(off, info & mask, info >> lay.rel_shift, self._implicit_addend(off), True))
        return out

    def _implicit_addend(self, place: int) -> int:
        """The signed address-sized word at link-time address ``place`` (an SHT_REL entry's addend)."""
        try:
            raw = self.read_vaddr(place, self._layout.word)
        except PatchFileError:
            raise PatchFileError(
                f"{self.name} is corrupt (a relocation at {place:#x} is outside every loadable segment)"
            ) from None
        return int.from_bytes(raw, "little", signed=True)

    def import_slots(self, name: str) -> list[int]:
        """Link-time addresses of the GOT slots that import ``name``: R_X86_64_64, GLOB_DAT, JUMP_SLOT, and on
        i386 R_386_32, R_386_GLOB_DAT, R_386_JMP_SLOT (the same numbers 1, 6, 7 in both psABIs)."""
        return self._imports_index.get(name, [])

    @cached_property
    def _imports_index(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for rel in self.dynamic_relocations():
            if rel.type in (1, 6, 7) and rel.sym:
                out.setdefault(self.dynamic_symbol_by_index(rel.sym)[0], []).append(rel.offset)
        return out


def open_elf(path: str, what: str = "file") -> ElfImage:
    """Map ``path`` read-only as an ELF image. Raises PatchFileError naming ``what`` when it is missing,
    empty or not ELF."""
    try:
        with open(path, "rb") as f:
            try:
                data: bytes | mmap.mmap = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            except ValueError:  # empty file
                data = b""
    except OSError as e:
        raise PatchFileError(f"cannot open {what} {path}: {e.strerror}") from None
    try:
        return ElfImage(data, path)
    except PatchFileError:
        if isinstance(data, mmap.mmap):
            data.close()
        raise PatchFileError(f"{what} {path} is not an ELF file") from None

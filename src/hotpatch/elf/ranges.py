"""Where the code of an ELF file's functions begins and ends, from its symbols and its ``.eh_frame``.

Stripped distribution binaries keep only ``.dynsym``, so their static functions have no symbol; but every
function that can be unwound through has an FDE in ``.eh_frame``, whose ``pc_begin``/``pc_range`` bound it.
Site analysis needs those ends: the bytes between the end of one function and the entry of the next are
never executed when the first ends in ``ret``/``jmp`` (:func:`hotpatch.x86.sites.padding_is_dead`).

Layouts: Linux Standard Base Core specification, "Exception Frames" (``.eh_frame``: CIE and FDE records,
the augmentation string and data, the ``DW_EH_PE_*`` pointer encodings) and ".eh_frame_hdr" (the sorted
binary-search table of ``(initial location, FDE address)`` pairs), located through the ``PT_GNU_EH_FRAME``
program header or the section of that name; DWARF 4 §6.4.1 for the CIE fields and version 4's extra bytes.

Nothing here raises on a malformed ``.eh_frame``: parsing stops at the first record it cannot read and what
was read so far is kept.
"""

from __future__ import annotations

import bisect
import struct
from typing import NamedTuple

from ..errors import HotpatchError
from .image import ElfImage, Symbol

PT_GNU_EH_FRAME = 0x6474E550
PF_X = 1
_CODE_KINDS = ("func", "ifunc")

# DW_EH_PE_* (LSB Core, "DWARF Exception Header Encoding"): low nibble the format, high nibble the application
DW_EH_PE_ABSPTR, DW_EH_PE_ULEB128, DW_EH_PE_UDATA2, DW_EH_PE_UDATA4, DW_EH_PE_UDATA8 = 0x00, 0x01, 0x02, 0x03, 0x04
DW_EH_PE_SLEB128, DW_EH_PE_SDATA2, DW_EH_PE_SDATA4, DW_EH_PE_SDATA8 = 0x09, 0x0A, 0x0B, 0x0C
DW_EH_PE_PCREL, DW_EH_PE_TEXTREL, DW_EH_PE_DATAREL, DW_EH_PE_FUNCREL, DW_EH_PE_ALIGNED = 0x10, 0x20, 0x30, 0x40, 0x50
DW_EH_PE_INDIRECT = 0x80
DW_EH_PE_OMIT = 0xFF

_FIXED = {
    DW_EH_PE_UDATA2: struct.Struct("<H"),
    DW_EH_PE_UDATA4: struct.Struct("<I"),
    DW_EH_PE_UDATA8: struct.Struct("<Q"),
    DW_EH_PE_SDATA2: struct.Struct("<h"),
    DW_EH_PE_SDATA4: struct.Struct("<i"),
    DW_EH_PE_SDATA8: struct.Struct("<q"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class EhFrameError(ValueError):
    """A record of ``.eh_frame``/``.eh_frame_hdr`` cannot be read (caught inside this module)."""


class Blob(NamedTuple):
    """Bytes ``data`` that live at link-time address ``addr``; ``addr_size`` is 4 (ELF32) or 8 (ELF64)."""

    data: bytes
    addr: int
    addr_size: int


def uleb128(data: bytes, pos: int) -> tuple[int, int]:
    """An unsigned LEB128 at ``data[pos]``: (value, position after it). Raises EhFrameError past the end."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise EhFrameError("LEB128 past the end")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def sleb128(data: bytes, pos: int) -> tuple[int, int]:
    """A signed LEB128 at ``data[pos]``: (value, position after it). Raises EhFrameError past the end."""
    start = pos
    value, pos = uleb128(data, pos)
    bits = 7 * (pos - start)
    if data[pos - 1] & 0x40:
        value -= 1 << bits
    return value, pos


def read_encoded(blob: Blob, pos: int, enc: int, datarel: int | None = None) -> tuple[int | None, int]:
    """The pointer encoded as ``enc`` (a ``DW_EH_PE_*`` byte) at ``blob.data[pos]``: (value, position after).

    Formats: absptr (``blob.addr_size`` bytes), uleb128, udata2/4/8, sleb128, sdata2/4/8. Applications:
    none, pcrel (relative to the field's own address), datarel (relative to ``datarel``: the start of
    ``.eh_frame_hdr`` in that section, the GOT in ``.eh_frame``), aligned (absptr at the next multiple of the
    address size). The value is None — the bytes are still skipped — for ``omit``, for textrel/funcrel and
    datarel without a base, and for indirect pointers (the address of the value, not the value).
    Raises EhFrameError on an unknown format or past the end of the data.
    """
    if enc == DW_EH_PE_OMIT:
        return None, pos
    fmt, app = enc & 0x0F, enc & 0x70
    if app == DW_EH_PE_ALIGNED:
        pos += -(blob.addr + pos) % blob.addr_size
        fmt, app = DW_EH_PE_ABSPTR, 0
    field = blob.addr + pos
    if fmt == DW_EH_PE_ABSPTR:
        fmt = DW_EH_PE_UDATA8 if blob.addr_size == 8 else DW_EH_PE_UDATA4
    if fmt == DW_EH_PE_ULEB128:
        value, pos = uleb128(blob.data, pos)
    elif fmt == DW_EH_PE_SLEB128:
        value, pos = sleb128(blob.data, pos)
    elif fmt in _FIXED:
        st = _FIXED[fmt]
        if pos < 0 or pos + st.size > len(blob.data):
            raise EhFrameError("encoded pointer past the end")
        (value,) = st.unpack_from(blob.data, pos)
        pos += st.size
    else:
        raise EhFrameError(f"unknown pointer format {fmt:#x}")
    if enc & DW_EH_PE_INDIRECT:
        return None, pos
    if app == DW_EH_PE_PCREL:
        value += field
    elif app == DW_EH_PE_DATAREL and datarel is not None:
        value += datarel
    elif app != 0:
        return None, pos
    return value & ((1 << (8 * blob.addr_size)) - 1), pos


def _u32(blob: Blob, pos: int) -> int:
    if pos < 0 or pos + 4 > len(blob.data):
        raise EhFrameError("record past the end")
    return int(_U32.unpack_from(blob.data, pos)[0])


def _record(blob: Blob, pos: int) -> tuple[int, int, int]:
    """The record (CIE or FDE) at ``pos``: (position of its CIE id/pointer field, end, that field's value).
    A zero length (the terminator) gives end == pos."""
    length = _u32(blob, pos)
    body = pos + 4
    if length == 0xFFFFFFFF:  # 64-bit DWARF: an 8-byte length follows
        if body + 8 > len(blob.data):
            raise EhFrameError("record past the end")
        length = int(_U64.unpack_from(blob.data, body)[0])
        body += 8
    if length == 0:
        return body, pos, 0
    end = body + length
    if end > len(blob.data):
        raise EhFrameError("record past the end")
    return body, end, _u32(blob, body)


def _cie_fde_encoding(blob: Blob, pos: int) -> int | None:
    """The FDE pointer encoding of the CIE at ``pos`` (its augmentation "R", absptr without it), or None
    when its augmentation is one this reader does not know (then its FDEs cannot be read)."""
    body, end, cie_id = _record(blob, pos)
    if end == pos or cie_id != 0:
        raise EhFrameError(f"no CIE at {blob.addr + pos:#x}")
    p = body + 4
    version = blob.data[p]
    nul = blob.data.find(b"\0", p + 1, end)
    if nul < 0:
        raise EhFrameError("unterminated augmentation string")
    aug = blob.data[p + 1 : nul].decode("latin-1")
    p = nul + 1
    if aug.startswith("eh"):  # old gcc: the address of exception data, no FDE encoding
        p += blob.addr_size
        aug = aug[2:]
    if version >= 4:
        p += 2  # address_size, segment_selector_size
    _, p = uleb128(blob.data, p)  # code alignment factor
    _, p = sleb128(blob.data, p)  # data alignment factor
    p = p + 1 if version == 1 else uleb128(blob.data, p)[1]  # return address register
    if not aug:
        return DW_EH_PE_ABSPTR
    if not aug.startswith("z"):
        return None
    _, p = uleb128(blob.data, p)  # augmentation data length
    for ch in aug[1:]:
        if ch == "R":
            return blob.data[p]
        if ch == "L":
            p += 1
        elif ch == "P":
            _, p = read_encoded(blob, p + 1, blob.data[p])
        elif ch not in "SB":
            return None
    return DW_EH_PE_ABSPTR


class _FdeReader:
    """Reads FDEs of one blob of ``.eh_frame`` bytes, caching each CIE's FDE pointer encoding."""

    def __init__(self, blob: Blob, datarel: int | None) -> None:
        self.blob = blob
        self.datarel = datarel
        self.cies: dict[int, int | None] = {}

    def fde(self, pos: int) -> tuple[tuple[int, int] | None, int]:
        """The record at ``pos``: ((pc_begin, pc_end) when it is an FDE of a non-empty range, else None),
        position of the next record (== pos at the terminator)."""
        body, end, cie_ptr = _record(self.blob, pos)
        if end == pos or cie_ptr == 0:
            return None, end
        cie = body - cie_ptr
        if cie not in self.cies:
            self.cies[cie] = _cie_fde_encoding(self.blob, cie)
        enc = self.cies[cie]
        if enc is None:
            return None, end
        begin, p = read_encoded(self.blob, body + 4, enc, self.datarel)
        size, _ = read_encoded(self.blob, p, enc & 0x0F)
        # no size, or one past the end of the address space (a negative signed size wraps there)
        if begin is None or not size or begin + size >= 1 << (8 * self.blob.addr_size):
            return None, end
        return (begin, begin + size), end


def _blob_at(img: ElfImage, vaddr: int) -> Blob | None:
    """The file bytes of the PT_LOAD that holds ``vaddr``, or None."""
    for seg in img.loads:
        if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
            return Blob(img.segment_data(seg), seg.vaddr, img.elfclass // 8)
    return None


def _got_base(img: ElfImage) -> int | None:
    """The base of datarel pointers in ``.eh_frame`` (the GOT, as i386's ``%ebx`` holds it), or None."""
    sec = img.section(".got.plt") or img.section(".got")
    return sec.addr if sec is not None else None


def _fdes_from_hdr(img: ElfImage, out: list[tuple[int, int]]) -> bool:
    """Append the FDE ranges listed by ``.eh_frame_hdr`` to ``out``; False when there is no usable table."""
    hdr_addr = next((s.vaddr for s in img.segments if s.type == PT_GNU_EH_FRAME), None)
    if hdr_addr is None:
        sec = img.section(".eh_frame_hdr")
        hdr_addr = sec.addr if sec is not None else None
    hdr = _blob_at(img, hdr_addr) if hdr_addr is not None else None
    if hdr is None or hdr_addr is None:
        return False
    base = hdr_addr - hdr.addr
    data = hdr.data
    if base + 4 > len(data) or data[base] != 1:
        return False
    ptr_enc, count_enc, table_enc = data[base + 1], data[base + 2], data[base + 3]
    eh_frame, p = read_encoded(hdr, base + 4, ptr_enc, hdr_addr)
    count, p = read_encoded(hdr, p, count_enc, hdr_addr)
    if eh_frame is None or count is None or table_enc == DW_EH_PE_OMIT:
        return False
    frames = _blob_at(img, eh_frame)
    if frames is None:
        return False
    reader = _FdeReader(frames, _got_base(img))
    for _ in range(count):
        _, p = read_encoded(hdr, p, table_enc, hdr_addr)
        fde, p = read_encoded(hdr, p, table_enc, hdr_addr)
        if fde is None:
            raise EhFrameError("unreadable .eh_frame_hdr table entry")
        rng, _ = reader.fde(fde - frames.addr)
        if rng is not None:
            out.append(rng)
    return True


def _fdes_by_walk(img: ElfImage, out: list[tuple[int, int]]) -> None:
    """Append the ranges of every FDE of the ``.eh_frame`` section, read in order up to its terminator."""
    sec = img.section(".eh_frame")
    if sec is None or sec.type == 8:
        return
    reader = _FdeReader(Blob(img.section_data(sec), sec.addr, img.elfclass // 8), _got_base(img))
    pos = 0
    while pos < sec.size:
        rng, nxt = reader.fde(pos)
        if nxt == pos:
            return
        if rng is not None:
            out.append(rng)
        pos = nxt


def eh_frame_ranges(img: ElfImage) -> list[tuple[int, int]]:
    """The ``(pc_begin, pc_begin + pc_range)`` link-time ranges of the FDEs of ``img``'s ``.eh_frame``, in
    the order found: through the ``.eh_frame_hdr`` table when the file has one, else by walking the
    ``.eh_frame`` section. Never raises on a malformed section: returns the ranges read before the fault."""
    out: list[tuple[int, int]] = []
    try:
        if not _fdes_from_hdr(img, out):
            _fdes_by_walk(img, out)
    except (EhFrameError, HotpatchError, IndexError):
        pass
    return out


def code_symbols(img: ElfImage) -> list[tuple[str, Symbol]]:
    """Every defined FUNC/IFUNC symbol of ``img`` as ``(name, symbol)``, de-duplicated by (name, address):
    all of ``.dynsym`` (older symbol versions of a name too, e.g. glibc's ``memcpy@GLIBC_2.2.5``), and
    ``.symtab`` as :meth:`ElfImage.function_symbols` gives it (one definition per name)."""
    found = {(n, s.value): s for n, s, _ in img.dynamic_symbols() if s is not None and n and s.kind in _CODE_KINDS}
    for n, s in img.function_symbols().items():
        found.setdefault((n, s.value), s)
    return [(n, s) for (n, _), s in found.items()]


class CodeRanges(list[tuple[int, int]]):
    """A sorted list of ``(start, end)`` ranges that also keeps them ordered by end, for
    :func:`previous_range`. Treat it as read-only: the index is built once."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        super().__init__(ranges)
        self.by_end = sorted((end, start) for start, end in ranges)


def function_ranges(img: ElfImage) -> list[tuple[int, int]]:
    """Sorted, de-duplicated ``(start, end)`` link-time address ranges (end exclusive, bytes) of the code of
    ``img``: every FUNC/IFUNC symbol of ``.dynsym`` and ``.symtab`` with a size, and every FDE of
    ``.eh_frame`` (:func:`eh_frame_ranges`). Ranges not inside one executable PT_LOAD are dropped (a file
    with no PT_LOAD keeps them all). Raises PatchFileError only when the file's headers cannot be read.
    """
    found = {(s.value, s.value + s.size) for _, s in code_symbols(img) if s.size > 0}
    found.update(eh_frame_ranges(img))
    if img.loads:
        code = [(s.vaddr, s.vaddr + s.memsz) for s in img.loads if s.flags & PF_X]
        found = {r for r in found if any(lo <= r[0] < r[1] <= hi for lo, hi in code)}
    return CodeRanges(sorted(found))


def previous_range(ranges: list[tuple[int, int]], entry: int, max_gap: int = 16) -> tuple[int, int] | None:
    """The range of ``ranges`` that ends closest before ``entry``: ``end <= entry`` and ``entry - end <=
    max_gap`` (bytes); of several ending there, the shortest. None when no range ends that close.
    ``ranges``: as :func:`function_ranges` returns them (any list of ranges works, indexed on each call)."""
    by_end = ranges.by_end if isinstance(ranges, CodeRanges) else sorted((e, s) for s, e in ranges)
    i = bisect.bisect_right(by_end, (entry, entry)) - 1
    if i < 0:
        return None
    end, start = by_end[i]
    if entry - end > max_gap:
        return None
    return start, end

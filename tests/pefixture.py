"""Minimal valid PE32 (i386) and PE32+ (AMD64) DLL images, assembled with struct for the tests of
``hotpatch scan`` (no Windows binary and no mingw on the test machines).

Layout (Microsoft PE/COFF specification): the MS-DOS header with ``e_lfanew`` at 0x3C; the signature
``PE\\0\\0``; the COFF file header; the optional header (magic 0x10B for PE32, 0x20B for PE32+; "Optional
Header Windows-Specific Fields") with 16 data directories; the section table; then the sections, aligned to
0x200 in the file and 0x1000 in memory:

* ``.text``: the functions, each after its own padding bytes;
* ``.rdata``: the export directory ("The .edata Section": directory table, export address table, name
  pointer table, ordinal table, names; a forwarder is an address inside the directory pointing to
  ``DLL.Name``), a word a data export points to, and the UNWIND_INFO records of ``.pdata``;
* ``.pdata`` (PE32+ only, "The .pdata Section"): one RUNTIME_FUNCTION (begin, end, unwind info RVA) per
  function, sorted; a chained fragment's UNWIND_INFO has flag UNW_FLAG_CHAININFO and the RUNTIME_FUNCTION
  of its function after it ("x64 exception handling", "Chained unwind info structures").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

FILE_ALIGN = 0x200
SECTION_ALIGN = 0x1000
MACHINE_I386, MACHINE_AMD64 = 0x014C, 0x8664
SCN_CODE, SCN_DATA = 0x60000020, 0x40000040  # code|execute|read ; initialized data|read
UNW_FLAG_CHAININFO = 0x4
DLL_NAME = "fixture.dll"


@dataclass(frozen=True)
class Fn:
    """One function of the fixture's ``.text``: ``pad`` bytes are placed just before ``code``. ``exported``:
    its ``label`` is an export name; ``pdata`` (PE32+): it has a RUNTIME_FUNCTION covering ``code``;
    ``chained_to``: that RUNTIME_FUNCTION is a fragment of the function labelled so."""

    label: str
    code: bytes
    pad: bytes = b""
    exported: bool = True
    pdata: bool = True
    chained_to: str | None = None


@dataclass
class PeImage:
    """The image bytes and the virtual address (image base + RVA) of each function by label."""

    data: bytes
    image_base: int
    addresses: dict[str, int] = field(default_factory=dict)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _exports(base_rva: int, targets: dict[str, int | str]) -> bytes:
    """The export directory at ``base_rva``: ``targets`` maps each name to an RVA, or to ``"DLL.Name"`` for
    a forwarder (its string lands inside the directory, which is what makes it one). Names sorted,
    ordinals in that order, ordinal base 1."""
    names = sorted(targets)
    count = len(names)
    eat = base_rva + 40
    npt = eat + 4 * count
    ot = npt + 4 * count
    strings = bytearray()

    def string(s: str) -> int:
        off = ot + 2 * count + len(strings)
        strings.extend(s.encode() + b"\0")
        return off

    dll = string(DLL_NAME)
    name_rvas = [string(n) for n in names]
    addresses = [t if isinstance(t, int) else string(t) for t in (targets[n] for n in names)]
    head = struct.pack("<IIHHIIIIIII", 0, 0, 0, 0, dll, 1, count, count, eat, npt, ot)
    return (
        head
        + struct.pack(f"<{count}I", *addresses)
        + struct.pack(f"<{count}I", *name_rvas)
        + struct.pack(f"<{count}H", *range(count))
        + bytes(strings)
    )


def _pdata(fns: list[Fn], where: dict[str, tuple[int, int]], rdata: bytearray, rdata_rva: int) -> bytes:
    """RUNTIME_FUNCTIONs of the functions with ``pdata``, sorted; their UNWIND_INFO appended to ``rdata``:
    version 1 with no codes, or for a fragment UNW_FLAG_CHAININFO and its function's RUNTIME_FUNCTION."""
    unwind: dict[str, int] = {}
    for fn in sorted(fns, key=lambda f: f.chained_to is not None):  # parents first
        if not fn.pdata:
            continue
        rdata += bytes(-len(rdata) % 4)
        unwind[fn.label] = rdata_rva + len(rdata)
        if fn.chained_to is None:
            rdata += bytes([1, 0, 0, 0])
        else:
            parent = fn.chained_to
            rdata += bytes([1 | UNW_FLAG_CHAININFO << 3, 0, 0, 0])
            rdata += struct.pack("<III", *where[parent], unwind[parent])
    return b"".join(
        struct.pack("<III", *where[label], u) for label, u in sorted(unwind.items(), key=lambda i: where[i[0]])
    )


def build_pe(fns: list[Fn], bits: int, forwarders: dict[str, str] | None = None) -> PeImage:
    """Assemble a DLL for ``bits`` 32 (PE32, i386) or 64 (PE32+, AMD64) holding ``fns`` in order."""
    pe32_plus = bits == 64
    image_base = 0x180000000 if pe32_plus else 0x10000000
    text_rva = SECTION_ALIGN
    text = bytearray()
    where: dict[str, tuple[int, int]] = {}  # label -> (rva, end rva)
    for fn in fns:
        text += fn.pad
        where[fn.label] = (text_rva + len(text), text_rva + len(text) + len(fn.code))
        text += fn.code
    rdata_rva = text_rva + _align(len(text), SECTION_ALIGN)

    targets: dict[str, int | str] = {fn.label: where[fn.label][0] for fn in fns if fn.exported}
    targets.update(forwarders or {})
    targets["DataWord"] = 0  # a data export, pointing into .rdata (placed once the directory's size is known)
    export_size = len(_exports(rdata_rva, targets))
    data_rva = _align(rdata_rva + export_size, 8)
    targets["DataWord"] = data_rva
    rdata = bytearray(_exports(rdata_rva, targets).ljust(data_rva - rdata_rva, b"\0") + struct.pack("<I", 0x1234))
    pdata = _pdata(fns, where, rdata, rdata_rva) if pe32_plus else b""
    pdata_rva = rdata_rva + _align(len(rdata), SECTION_ALIGN)

    sections = [(b".text", text_rva, bytes(text), SCN_CODE), (b".rdata", rdata_rva, bytes(rdata), SCN_DATA)]
    if pe32_plus:
        sections.append((b".pdata", pdata_rva, bytes(pdata), SCN_DATA))
    size_of_image = sections[-1][1] + _align(len(sections[-1][2]), SECTION_ALIGN)

    opt_size = (112 if pe32_plus else 96) + 16 * 8
    headers_size = _align(0x40 + 4 + 20 + opt_size + 40 * len(sections), FILE_ALIGN)
    directories = [(0, 0)] * 16
    directories[0] = (rdata_rva, export_size)
    if pe32_plus:
        directories[3] = (pdata_rva, len(pdata))

    raw_offsets = []
    pos = headers_size
    for _, _, data, _ in sections:
        raw_offsets.append(pos)
        pos += _align(len(data), FILE_ALIGN)

    ptr = "Q" if pe32_plus else "I"
    magic = 0x20B if pe32_plus else 0x10B
    entry = where[fns[0].label][0]  # a DLL's DllMain; any code address will do here
    standard = struct.pack("<HBBIIIII", magic, 14, 0, _align(len(text), FILE_ALIGN), 0, 0, entry, text_rva)
    if not pe32_plus:
        standard += struct.pack("<I", rdata_rva)  # BaseOfData
    windows = struct.pack(
        f"<{ptr}IIHHHHHHIIIIHH{ptr}{ptr}{ptr}{ptr}II",
        image_base,
        SECTION_ALIGN,
        FILE_ALIGN,
        6,
        0,
        0,
        0,
        6,
        0,
        0,
        size_of_image,
        headers_size,
        0,
        2,  # IMAGE_SUBSYSTEM_WINDOWS_GUI
        0x0140 if not pe32_plus else 0x0160,  # DYNAMIC_BASE|NX_COMPAT (+HIGH_ENTROPY_VA)
        0x100000,
        0x1000,
        0x100000,
        0x1000,
        0,
        16,
    )
    optional = standard + windows + b"".join(struct.pack("<II", *d) for d in directories)
    assert len(optional) == opt_size
    characteristics = 0x2022 if pe32_plus else 0x2102  # EXECUTABLE_IMAGE|DLL (+LARGE_ADDRESS_AWARE / 32BIT)
    coff = struct.pack(
        "<HHIIIHH", MACHINE_AMD64 if pe32_plus else MACHINE_I386, len(sections), 0, 0, 0, opt_size, characteristics
    )
    table = b"".join(
        struct.pack("<8sIIIIIIHHI", name, len(data), rva, _align(len(data), FILE_ALIGN), off, 0, 0, 0, 0, flags)
        for (name, rva, data, flags), off in zip(sections, raw_offsets, strict=True)
    )
    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    dos[0x3C:0x40] = struct.pack("<I", 0x40)
    image = bytearray((bytes(dos) + b"PE\0\0" + coff + optional + table).ljust(headers_size, b"\0"))
    for (_, _, data, _), off in zip(sections, raw_offsets, strict=True):
        assert len(image) == off
        image += data.ljust(_align(len(data), FILE_ALIGN), b"\0")
    return PeImage(bytes(image), image_base, {label: image_base + rva for label, (rva, _) in where.items()})

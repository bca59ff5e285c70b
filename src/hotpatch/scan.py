"""``hotpatch scan``: how every function of a program or library file could be patched (DESIGN.md §4).

Each function is classified by :func:`hotpatch.x86.sites.classify` into a site class and the best protocol it
allows: A (no pause) for the hotpatch-ready classes, R (a per-thread blip) for ordinary sites, or ``-`` with
the reason when it cannot be patched at all. The totals give the shares of the three and of each reason.

Files: ELF executables and shared objects for x86-64 and i386 (functions: the FUNC/IFUNC symbols of
``.dynsym`` and ``.symtab``, code ranges from :func:`hotpatch.elf.ranges.function_ranges`), and Windows PE
images, PE32 (i386) and PE32+ (AMD64), read with ``pefile`` (functions: the exports, and for PE32+ every
RUNTIME_FUNCTION of the exception directory; Microsoft PE/COFF specification, "Export Directory Table",
"The .pdata Section"; the x64 UNWIND_INFO flag UNW_FLAG_CHAININFO marks a fragment of another function).
"""

from __future__ import annotations

import bisect
import functools
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple

from .elf.image import ElfImage, Symbol, open_elf
from .elf.ranges import PF_X, CodeRanges, code_symbols, function_ranges, previous_range
from .errors import HotpatchError, PatchFileError, SiteError
from .x86 import sites

BEFORE_LEN: Final = 16  # bytes before an entry that classify looks at
PE_GUESS_MAX: Final = 16 * 1024  # longest body assumed for a PE function whose end is unknown
NOT_PATCHABLE: Final = "-"

TOO_SHORT: Final = "too short"
CALL: Final = "call in the first bytes"
BRANCH: Final = "branch into the first bytes"
INVALID: Final = "invalid instruction"
OTHER: Final = "other"
REASON_KINDS: Final = (TOO_SHORT, CALL, BRANCH, INVALID, OTHER)
# words of the SiteError messages of hotpatch.x86.prologue / sites, by kind
_REASON_WORDS: Final = (
    (TOO_SHORT, ("too short", "past the end of the function")),
    (CALL, ("a call at",)),
    (BRANCH, ("branches to",)),
    (INVALID, ("invalid instruction",)),
)

ELF_BITNESS: Final = {"x86_64": 64, "i386": 32}
PE_MACHINES: Final = {0x014C: ("i386", 32), 0x8664: ("x86_64", 64)}  # IMAGE_FILE_MACHINE_I386 / _AMD64
IMAGE_SCN_MEM_EXECUTE: Final = 0x20000000
UNW_FLAG_CHAININFO: Final = 0x4


def reason_kind(reason: str) -> str:
    """The kind (one of REASON_KINDS) of a refusal message of :func:`hotpatch.x86.sites.classify`."""
    return next((kind for kind, words in _REASON_WORDS if any(w in reason for w in words)), OTHER)


class FunctionRow(NamedTuple):
    """One function of a scan: ``names`` (the first is the one shown), link-time ``address``, site class
    (None when not patchable), protocol ("A", "R" or "-"), refusal ``reason`` (None when patchable) and the
    :class:`~hotpatch.x86.sites.Site` itself (None when not patchable)."""

    names: tuple[str, ...]
    address: int
    klass: str | None
    protocol: str
    reason: str | None
    site: sites.Site | None

    @property
    def name(self) -> str:
        """The name shown for the function."""
        return self.names[0]

    def as_dict(self) -> dict[str, Any]:
        """``{"name", "address", "class", "protocol", "reason"}`` (plus ``aliases`` when it has several)."""
        out: dict[str, Any] = {
            "name": self.name,
            "address": self.address,
            "class": self.klass,
            "protocol": self.protocol,
            "reason": self.reason,
        }
        if len(self.names) > 1:
            out["aliases"] = list(self.names[1:])
        return out


def _row(names: tuple[str, ...], address: int, analyse: Callable[[], sites.Site]) -> FunctionRow:
    """Run ``analyse`` and make its row; a HotpatchError (SiteError, unreadable bytes) becomes the reason."""
    try:
        site = analyse()
    except HotpatchError as e:
        return FunctionRow(names, address, None, NOT_PATCHABLE, str(e), None)
    return FunctionRow(names, address, site.klass, site.protocol, None, site)


def _share(count: int, total: int) -> dict[str, float | int]:
    return {"count": count, "share": 100.0 * count / total if total else 0.0}


class FileScan(NamedTuple):
    """The scan of one file: ``format`` "elf" or "pe", ``machine`` "x86_64" or "i386", one row per function
    address, sorted by address."""

    path: str
    format: str
    machine: str
    functions: list[FunctionRow]

    def totals(self) -> dict[str, Any]:
        """Counts and shares (percent of all functions, float): ``{"functions": n, "no_pause": {count,
        share}, "rolling": {...}, "not_patchable": {count, share, "reasons": {kind: {count, share}}},
        "classes": {class: count}}``."""
        n = len(self.functions)
        protocols = Counter(f.protocol for f in self.functions)
        kinds = Counter(reason_kind(f.reason) for f in self.functions if f.reason is not None)
        classes = Counter(f.klass for f in self.functions if f.klass is not None)
        return {
            "functions": n,
            "no_pause": _share(protocols[sites.PROTOCOL_A], n),
            "rolling": _share(protocols[sites.PROTOCOL_R], n),
            "not_patchable": {
                **_share(protocols[NOT_PATCHABLE], n),
                "reasons": {kind: _share(kinds[kind], n) for kind in REASON_KINDS},
            },
            "classes": {klass: classes[klass] for klass in sites.CLASSES},
        }

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape: ``{"path", "format", "machine", "functions": [...], "totals": {...}}``."""
        return {
            "path": self.path,
            "format": self.format,
            "machine": self.machine,
            "functions": [f.as_dict() for f in self.functions],
            "totals": self.totals(),
        }

    def report(self, functions: bool = False) -> list[str]:
        """Human-readable lines: with ``functions`` one per function (address, name, class, protocol,
        reason), then the totals with shares to one decimal."""
        out = [f"{self.path}: {self.format} {self.machine}, {len(self.functions)} functions"]
        if functions:
            width = min(48, max((len(f.name) for f in self.functions), default=0))
            for f in self.functions:
                out.append(
                    f"  {f.address:#014x}  {f.name:<{width}}  {f.klass or '-':<16}  {f.protocol}"
                    + (f"  {f.reason}" if f.reason else "")
                )
        t = self.totals()

        def line(label: str, part: dict[str, Any], indent: int = 2) -> str:
            return f"{' ' * indent}{label:<{34 - indent}}{part['count']:>7}  {part['share']:5.1f}%"

        out.append(line("patchable with no pause (A)", t["no_pause"]))
        out.append(line("patchable, per-thread blip (R)", t["rolling"]))
        out.append(line("not patchable", t["not_patchable"]))
        out.extend(line(kind, part, 4) for kind, part in t["not_patchable"]["reasons"].items() if part["count"])
        out.append("  classes: " + ", ".join(f"{k} {v}" for k, v in t["classes"].items()))
        return out


# -- ELF ----------------------------------------------------------------------------------------------------


def elf_bitness(img: ElfImage) -> int:
    """64 for an EM_X86_64 file, 32 for EM_386. Raises PatchFileError for any other machine."""
    bits = ELF_BITNESS.get(img.machine)
    if bits is None:
        raise PatchFileError(f"{img.name}: unsupported machine {img.machine} (x86-64 and i386 code only)")
    return bits


def _segment_start(img: ElfImage, vaddr: int) -> int:
    """The start of the PT_LOAD holding ``vaddr`` (``vaddr`` itself when none does)."""
    return next((s.vaddr for s in img.loads if s.vaddr <= vaddr < s.vaddr + s.memsz), vaddr)


def classify_symbol(img: ElfImage, ranges: list[tuple[int, int]], name: str, sym: Symbol) -> sites.Site:
    """The site of the function ``name`` defined by ``sym`` in ``img``: its ``sym.size`` bytes, up to
    ``BEFORE_LEN`` bytes before it (fewer at the start of its segment) and the code of the range of
    ``ranges`` (:func:`hotpatch.elf.ranges.function_ranges`) that ends just before it, given to
    :func:`hotpatch.x86.sites.classify` as 64- or 32-bit code after the file's machine.

    Raises SiteError when the function cannot be patched, PatchFileError when its bytes are not in the file
    or the machine is neither x86-64 nor i386.
    """
    bitness = elf_bitness(img)
    entry = sym.value
    code = img.read_vaddr(entry, sym.size)
    lo = max(entry - BEFORE_LEN, _segment_start(img, entry))
    before = img.read_vaddr(lo, entry - lo)
    prev_range = previous_range(ranges, entry)
    prev = None
    if prev_range is not None:
        try:
            prev = (prev_range[0], img.read_vaddr(prev_range[0], prev_range[1] - prev_range[0]))
        except PatchFileError:
            prev = None
    return sites.classify(name, entry, code, before, bitness, prev)


def _name_order(name: str, local: bool = False) -> tuple[bool, int, str]:
    """Sort key choosing the name shown for an address: global before local, fewer leading underscores."""
    return local, len(name) - len(name.lstrip("_")), name


def _open_elf_for_scan(path: str) -> ElfImage:
    """``path`` as an ElfImage whose headers were read. Raises PatchFileError (closing it) for another
    machine, a class or byte order the reader does not handle, or a file with no PT_LOAD."""
    img = open_elf(path)
    try:
        elf_bitness(img)
        if not img.loads:
            raise PatchFileError(f"{path} has no loadable segments (an object file? scan reads programs and libraries)")
    except PatchFileError:
        img.close()
        raise
    return img


def scan_elf(path: str) -> FileScan:
    """Scan every function symbol of the ELF file ``path``, one row per address (aliases together).
    Raises PatchFileError when the file cannot be read or is for another machine."""
    img = _open_elf_for_scan(path)
    try:
        ranges = function_ranges(img)
        spans = [(s.vaddr, s.vaddr + s.memsz) for s in img.loads if s.flags & PF_X]
        groups: dict[int, list[tuple[str, Symbol]]] = {}
        for name, sym in code_symbols(img):
            if any(lo <= sym.value < hi for lo, hi in spans):
                groups.setdefault(sym.value, []).append((name, sym))
        rows = []
        for addr in sorted(groups):
            named = sorted(groups[addr], key=lambda ns: _name_order(ns[0], ns[1].binding == "local"))
            names = tuple(n for n, _ in named)
            sym = max((s for _, s in named), key=lambda s: s.size)
            if sym.size == 0:
                sym = sym._replace(size=_range_end(ranges, addr) - addr)
            rows.append(_row(names, addr, functools.partial(_classify_sized, img, ranges, names[0], sym)))
        return FileScan(path, "elf", img.machine, rows)
    finally:
        img.close()


def _range_end(ranges: list[tuple[int, int]], start: int) -> int:
    """The end of the longest range of ``ranges`` (sorted) that starts at ``start``; ``start`` when none."""
    i = bisect.bisect_right(ranges, (start, 1 << 64)) - 1
    return ranges[i][1] if i >= 0 and ranges[i][0] == start else start


def _classify_sized(img: ElfImage, ranges: list[tuple[int, int]], name: str, sym: Symbol) -> sites.Site:
    if sym.size == 0:
        raise SiteError(f"{name}: size unknown (no symbol size and no .eh_frame entry)")
    return classify_symbol(img, ranges, name, sym)


# -- PE -----------------------------------------------------------------------------------------------------


class _PeCode(NamedTuple):
    """One executable section of a PE image: its bytes (virtual size, zero-filled) at virtual address ``va``."""

    va: int
    data: bytes

    @property
    def end(self) -> int:
        return self.va + len(self.data)

    def read(self, lo: int, hi: int) -> bytes:
        return self.data[lo - self.va : hi - self.va]


class _PeFunctions(NamedTuple):
    """What a PE image says about its functions (virtual addresses): entry -> names, entry -> end (from
    .pdata), every .pdata range (chained fragments too)."""

    names: dict[int, list[str]]
    ends: dict[int, int]
    ranges: CodeRanges


def _load_pe(path: str, data: bytes) -> Any:
    import pefile

    try:
        pe = pefile.PE(data=data, fast_load=True)
        pe.parse_data_directories(
            directories=[
                pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXPORT"],
                pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_EXCEPTION"],
            ]
        )
    except pefile.PEFormatError as e:
        raise PatchFileError(f"{path} is not a valid PE file: {getattr(e, 'value', e)}") from None
    return pe


def _pe_code(pe: Any) -> list[_PeCode]:
    """The executable sections (IMAGE_SCN_MEM_EXECUTE) of ``pe``, at their virtual addresses."""
    base = pe.OPTIONAL_HEADER.ImageBase
    out = []
    for s in pe.sections:
        if s.Characteristics & IMAGE_SCN_MEM_EXECUTE:
            size = s.Misc_VirtualSize or s.SizeOfRawData
            out.append(_PeCode(base + s.VirtualAddress, s.get_data()[:size].ljust(size, b"\0")))
    return sorted(out)


def _pe_functions(pe: Any, code: list[_PeCode]) -> _PeFunctions:
    """Exports (not forwarded, inside executable sections; unnamed ones as ``#ordinal``) and the .pdata
    RUNTIME_FUNCTIONs (entries of the chained fragments of a function excepted)."""
    base = pe.OPTIONAL_HEADER.ImageBase
    names: dict[int, list[str]] = {}

    def inside(va: int) -> bool:
        return any(c.va <= va < c.end for c in code)

    exports = getattr(pe, "DIRECTORY_ENTRY_EXPORT", None)
    for sym in exports.symbols if exports is not None else ():
        va = base + sym.address
        if sym.forwarder is None and inside(va):
            names.setdefault(va, []).append(sym.name.decode(errors="replace") if sym.name else f"#{sym.ordinal}")
    ends: dict[int, int] = {}
    ranges = []
    for entry in getattr(pe, "DIRECTORY_ENTRY_EXCEPTION", None) or ():
        rf = entry.struct
        lo, hi = base + rf.BeginAddress, base + rf.EndAddress
        if hi <= lo or not inside(lo):
            continue
        ranges.append((lo, hi))
        chained = rf.UnwindData & 1 or (entry.unwindinfo is not None and entry.unwindinfo.Flags & UNW_FLAG_CHAININFO)
        if not chained:
            ends[lo] = max(hi, ends.get(lo, hi))
            names.setdefault(lo, [])
    return _PeFunctions(names, ends, CodeRanges(sorted(set(ranges))))


def _pe_body(fns: _PeFunctions, sec: _PeCode, starts: list[int], entry: int) -> bytes:
    """The function's bytes: to its .pdata end, else to the next known function (at most PE_GUESS_MAX bytes,
    trailing ``CC`` padding dropped)."""
    if entry in fns.ends:
        return sec.read(entry, min(fns.ends[entry], sec.end))
    i = bisect.bisect_right(starts, entry)
    nxt = starts[i] if i < len(starts) else sec.end
    return sec.read(entry, min(nxt, sec.end, entry + PE_GUESS_MAX)).rstrip(b"\xcc")


def scan_pe(path: str, data: bytes) -> FileScan:
    """Scan the functions of the PE image ``data`` (read from ``path``): exports and, for PE32+, .pdata.
    The previous function's range comes from .pdata (none for PE32, where only ``CC`` padding is dead).
    Raises PatchFileError for a malformed PE or a machine other than I386/AMD64."""
    pe = _load_pe(path, data)
    arch = PE_MACHINES.get(pe.FILE_HEADER.Machine)
    if arch is None:
        raise PatchFileError(f"{path}: unsupported PE machine {pe.FILE_HEADER.Machine:#x} (I386 and AMD64 only)")
    machine, bitness = arch
    code = _pe_code(pe)
    fns = _pe_functions(pe, code)
    starts = sorted(set(fns.names) | {lo for lo, _ in fns.ranges})  # where a body of unknown size must stop
    rows = []
    for entry in sorted(fns.names):
        sec = next(c for c in code if c.va <= entry < c.end)
        names = tuple(sorted(fns.names[entry], key=_name_order)) or (f"sub_{entry:x}",)
        rows.append(_row(names, entry, functools.partial(_classify_pe, fns, sec, starts, names[0], entry, bitness)))
    return FileScan(path, "pe", machine, rows)


def _classify_pe(fns: _PeFunctions, sec: _PeCode, starts: list[int], name: str, entry: int, bitness: int) -> sites.Site:
    code = _pe_body(fns, sec, starts, entry)
    before = sec.read(max(sec.va, entry - BEFORE_LEN), entry)
    prev_range = previous_range(fns.ranges, entry)
    prev = None
    if prev_range is not None and sec.va <= prev_range[0] and prev_range[1] <= sec.end:
        prev = (prev_range[0], sec.read(*prev_range))
    return sites.classify(name, entry, code, before, bitness, prev)


# -- any file -----------------------------------------------------------------------------------------------


def scan_file(path: str) -> FileScan:
    """Scan the ELF or PE file ``path``. Raises PatchFileError when it cannot be read, is neither ELF nor
    PE, or is for a machine other than x86-64/i386."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            data = f.read() if magic[:2] == b"MZ" else b""
    except OSError as e:
        raise PatchFileError(f"cannot open {path}: {e.strerror}") from None
    if magic == b"\x7fELF":
        return scan_elf(path)
    if magic[:2] == b"MZ":
        return scan_pe(path, magic + data)
    raise PatchFileError(f"{path} is neither an ELF nor a PE file")


def scan_files(paths: Iterable[str]) -> list[FileScan]:
    """Scan each file in turn (see :func:`scan_file`); the first unreadable one raises PatchFileError."""
    return [scan_file(p) for p in paths]

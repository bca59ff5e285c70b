"""``hotpatch scan`` and the code-range reader under it (:mod:`hotpatch.scan`, :mod:`hotpatch.elf.ranges`).

ELF: ``targets/scan_sites.c`` is built with gcc at test time, as a shared library without start files so its
functions are exactly the ones it defines: one per site class (gcc's ``ms_hook_prologue`` and
``patchable_function_entry(16,14)``, with and without ``-fcf-protection``; hand-written functions after a
``ret`` and NOP padding) and one per refusal. ``.eh_frame`` is checked against readelf (and pyelftools on
libc) for every pointer encoding gcc can be made to emit, through ``.eh_frame_hdr`` and without it.
PE: images assembled by ``pefixture.py`` (PE32 and PE32+), which pefile must parse.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import TARGETS, compile_program, run_cli
from hotpatch.elf.image import ElfImage, open_elf
from hotpatch.elf.ranges import (
    DW_EH_PE_ALIGNED,
    DW_EH_PE_DATAREL,
    DW_EH_PE_INDIRECT,
    DW_EH_PE_OMIT,
    DW_EH_PE_PCREL,
    DW_EH_PE_SDATA2,
    DW_EH_PE_SDATA4,
    DW_EH_PE_SDATA8,
    DW_EH_PE_SLEB128,
    DW_EH_PE_TEXTREL,
    DW_EH_PE_UDATA2,
    DW_EH_PE_UDATA4,
    DW_EH_PE_UDATA8,
    DW_EH_PE_ULEB128,
    Blob,
    EhFrameError,
    eh_frame_ranges,
    function_ranges,
    previous_range,
    read_encoded,
)
from hotpatch.scan import FileScan, classify_symbol, reason_kind, scan_file
from pefixture import Fn, build_pe

LIBC = Path("/usr/lib/x86_64-linux-gnu/libc.so.6")
NOSTART = ("-nostartfiles", "-g0")
CC, NOP = b"\xcc", b"\x90"

# name -> (class, protocol, reason kind) in the unstripped x86-64 build, either -fcf-protection
EXPECTED_64 = {
    "hook_fn": ("ms-hook-prologue", "A", None),
    "pfe_fn": ("patchable-entry", "A", None),
    "opp_fn": ("opportunistic", "A", None),
    "opp_nocfi_fn": ("opportunistic", "A", None),
    "after_call_fn": ("ordinary", "R", None),
    "plain_fn": ("ordinary", "R", None),
    "tiny_fn": (None, "-", "too short"),
    "call_first_fn": (None, "-", "call in the first bytes"),
    "branchy_fn": (None, "-", "branch into the first bytes"),
    "invalid_fn": (None, "-", "invalid instruction"),
    "xbegin_fn": (None, "-", "other"),
}
EXPORTS_64 = {*EXPECTED_64, "pick"}


def cli_json(*args: str | Path) -> dict[str, Any]:
    """``hotpatch scan --json ARGS``; it must succeed."""
    res = run_cli("scan", "--json", *args)
    assert res.returncode == 0, res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The functions of a one-file scan document by name and by alias."""
    (f,) = doc["files"]
    out = {}
    for fn in f["functions"]:
        for name in [fn["name"], *fn.get("aliases", [])]:
            out[name] = fn
    return out


def rows(scan: FileScan) -> dict[str, Any]:
    """The rows of a scan by name (and alias)."""
    return {name: row for row in scan.functions for name in row.names}


def assert_totals_consistent(f: dict[str, Any]) -> None:
    """The totals of one file document agree with its functions, and the three shares add up to 100%."""
    fns, t = f["functions"], f["totals"]
    assert t["functions"] == len(fns)
    assert t["no_pause"]["count"] == sum(x["protocol"] == "A" for x in fns)
    assert t["rolling"]["count"] == sum(x["protocol"] == "R" for x in fns)
    assert t["not_patchable"]["count"] == sum(x["protocol"] == "-" for x in fns)
    reasons = {k: v["count"] for k, v in t["not_patchable"]["reasons"].items()}
    assert sum(reasons.values()) == t["not_patchable"]["count"]
    assert sum(t["classes"].values()) == t["no_pause"]["count"] + t["rolling"]["count"]
    if fns:
        assert sum(t[k]["share"] for k in ("no_pause", "rolling", "not_patchable")) == pytest.approx(100.0)


@pytest.fixture(scope="module")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``scan_sites.c`` as an x86-64 shared library: ``none`` and ``cet`` (-fcf-protection), and ``strip``
    (``none`` stripped of .symtab)."""
    top = tmp_path_factory.mktemp("scan")
    out = {
        "none": compile_program(
            TARGETS / "scan_sites.c", top / "none.so", *NOSTART, "-fcf-protection=none", shared=True
        ),
        "cet": compile_program(TARGETS / "scan_sites.c", top / "cet.so", *NOSTART, "-fcf-protection", shared=True),
    }
    out["strip"] = top / "strip.so"
    subprocess.run(["strip", "--strip-all", "-o", out["strip"], out["none"]], check=True)
    return out


# -- ELF x86-64: every class and refusal ----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["none", "cet"])
def test_elf_classes(libs: dict[str, Path], variant: str) -> None:
    """Every function of the library gets its expected class, protocol and kind of refusal, through the CLI."""
    doc = cli_json(libs[variant])
    (f,) = doc["files"]
    assert (f["format"], f["machine"], f["path"]) == ("elf", "x86_64", str(libs[variant]))
    fns = by_name(doc)
    for name, (klass, protocol, kind) in EXPECTED_64.items():
        fn = fns[name]
        assert (fn["class"], fn["protocol"]) == (klass, protocol), fn
        assert (reason_kind(fn["reason"]) if fn["reason"] else None) == kind, fn
        assert set(fn) >= {"name", "address", "class", "protocol", "reason"}
    # the IFUNC is listed at its resolver, an ordinary function to scan
    assert "pick" in fns and fns["pick"]["protocol"] in ("A", "R")
    assert_totals_consistent(f)


@pytest.mark.parametrize(("variant", "pfe_key", "pfe_disp"), [("none", 0, 0xF9), ("cet", 4, 0xF5)])
def test_short_jump_displacements(libs: dict[str, Path], variant: str, pfe_key: int, pfe_disp: int) -> None:
    """The key and the displacement byte a thread between two entry NOPs would execute: F9 (stc) at the
    entry, F5 (cmc) after endbr64 — never F4 (hlt) or F0 (lock)."""
    scan = scan_file(str(libs[variant]))
    r = rows(scan)
    img = open_elf(str(libs[variant]))
    try:
        hook, pfe, opp = r["hook_fn"].site, r["pfe_fn"].site, r["opp_fn"].site
        assert hook is not None and pfe is not None and opp is not None
        assert img.read_vaddr(hook.key, 8) == bytes.fromhex("488da42400000000")
        assert hook.key == r["hook_fn"].address and hook.short_jump_disp == 0xF9
        assert img.read_vaddr(r["hook_fn"].address - 32, 32) == CC * 32
        assert pfe.key - r["pfe_fn"].address == pfe_key and pfe.short_jump_disp == pfe_disp
        assert img.read_vaddr(pfe.key, 2) == NOP * 2
        assert img.read_vaddr(r["pfe_fn"].address - 14, 14) == NOP * 14
        assert pfe.pad == r["pfe_fn"].address - 5
        assert opp.key == r["opp_fn"].address and opp.short_jump_disp == 0xF9 and opp.prologue.length == 3
    finally:
        img.close()


def test_stripped_library_keeps_fde_ranges(libs: dict[str, Path]) -> None:
    """Stripped of .symtab, the local function before ``opp_fn`` is still known from its FDE, so ``opp_fn``
    stays opportunistic; the one before ``opp_nocfi_fn`` has no FDE, so that one becomes ordinary. Only the
    exports are listed, and the totals are exactly those of the expected classes."""
    doc = cli_json(libs["strip"])
    fns = by_name(doc)
    assert set(fns) == EXPORTS_64
    assert (fns["opp_fn"]["class"], fns["opp_fn"]["protocol"]) == ("opportunistic", "A")
    assert (fns["opp_nocfi_fn"]["class"], fns["opp_nocfi_fn"]["protocol"]) == ("ordinary", "R")
    t = doc["files"][0]["totals"]
    pick_a = fns["pick"]["protocol"] == "A"
    assert t["functions"] == 12
    assert t["no_pause"]["count"] == 3 + pick_a  # hook_fn, pfe_fn, opp_fn (+ pick's resolver)
    assert t["rolling"]["count"] == 3 + (not pick_a)  # opp_nocfi_fn, after_call_fn, plain_fn
    assert t["not_patchable"]["count"] == 5
    assert {k: v["count"] for k, v in t["not_patchable"]["reasons"].items()} == {
        "too short": 1,
        "call in the first bytes": 1,
        "branch into the first bytes": 1,
        "invalid instruction": 1,
        "other": 1,
    }
    assert t["classes"]["ms-hook-prologue"] == 1 and t["classes"]["patchable-entry"] == 1
    assert t["no_pause"]["share"] == pytest.approx(100 * t["no_pause"]["count"] / 12)
    assert_totals_consistent(doc["files"][0])


def test_classify_symbol_is_what_scan_uses(libs: dict[str, Path]) -> None:
    """``classify_symbol`` (the entry point ``hotpatch build`` uses) gives the site the scan reports."""
    img = open_elf(str(libs["none"]))
    try:
        ranges = function_ranges(img)
        r = rows(scan_file(str(libs["none"])))
        for name in ("hook_fn", "pfe_fn", "opp_fn", "plain_fn"):
            sym = img.symbol(name)
            assert sym is not None
            assert classify_symbol(img, ranges, name, sym) == r[name].site
    finally:
        img.close()


def test_text_report(libs: dict[str, Path]) -> None:
    """Without --json: one line per function with --functions, then the totals with one decimal."""
    res = run_cli("scan", "--functions", libs["strip"])
    assert res.returncode == 0 and res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[0] == f"{libs['strip']}: elf x86_64, 12 functions"
    fn_lines = [ln for ln in lines if re.match(r"  0x[0-9a-f]+  ", ln)]
    assert len(fn_lines) == 12
    assert re.search(r"tiny_fn\s+-\s+-\s+tiny_fn is 1 bytes long", res.stdout)
    assert re.search(r"hook_fn\s+ms-hook-prologue\s+A$", res.stdout, re.M)
    assert re.search(r"^  not patchable\s+5\s+41\.7%$", res.stdout, re.M)
    assert re.search(r"^    too short\s+1\s+8\.3%$", res.stdout, re.M)
    short = run_cli("scan", libs["strip"])
    assert short.returncode == 0 and not re.search(r"  0x[0-9a-f]+  ", short.stdout)


def test_several_files_in_one_document(libs: dict[str, Path]) -> None:
    """Several FILEs give one JSON document with one entry each, in order."""
    doc = cli_json(libs["none"], libs["strip"])
    assert [f["path"] for f in doc["files"]] == [str(libs["none"]), str(libs["strip"])]


# -- ELF i386 -------------------------------------------------------------------------------------------------


def compile_m32(tmp_path: Path, name: str, *flags: str) -> Path:
    """``scan_sites.c`` built with ``-m32`` (its C functions only); skip without gcc-multilib."""
    out = tmp_path / name
    res = subprocess.run(
        ["gcc", "-m32", "-O2", "-shared", "-fPIC", *NOSTART, *flags, str(TARGETS / "scan_sites.c"), "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"gcc -m32 does not work here: {res.stderr.strip()[:200]}")
    return out


@pytest.mark.parametrize(
    ("flag", "pfe_key", "pfe_disp"), [("-fcf-protection=none", 0, 0xF9), ("-fcf-protection", 4, 0xF5)]
)
def test_i386_elf(tmp_path: Path, flag: str, pfe_key: int, pfe_disp: int) -> None:
    """An i386 library: gcc's ``ms_hook_prologue`` is ``mov edi,edi`` after CC padding (ms-x86, EB F9), and
    the patchable entry works after ``endbr32`` too."""
    lib = compile_m32(tmp_path, "lib32.so", flag)
    doc = cli_json(lib)
    assert doc["files"][0]["machine"] == "i386"
    fns = by_name(doc)
    assert (fns["hook_fn"]["class"], fns["hook_fn"]["protocol"]) == ("ms-x86", "A")
    assert (fns["pfe_fn"]["class"], fns["pfe_fn"]["protocol"]) == ("patchable-entry", "A")
    r = rows(scan_file(str(lib)))
    hook, pfe = r["hook_fn"].site, r["pfe_fn"].site
    assert hook is not None and pfe is not None
    assert hook.prologue.original == b"\x8b\xff" and hook.short_jump_disp == 0xF9
    assert pfe.key - r["pfe_fn"].address == pfe_key and pfe.short_jump_disp == pfe_disp
    assert_totals_consistent(doc["files"][0])


# -- .eh_frame ------------------------------------------------------------------------------------------------

SMALL_C = """
static int s1(int x) { return x * 7 + 3; }
int g1(int x) { return s1(x) + 1; }
int g2(int x) { return x ? g1(x - 1) : 0; }
int main(int c, char **v) { (void)v; return g2(c); }
"""


def readelf_fdes(path: Path) -> tuple[list[tuple[int, int]], set[str]]:
    """The FDE ranges of ``path`` as readelf decodes them, and its CIEs' FDE pointer encodings (hex; "00",
    absptr, for a CIE without augmentation)."""
    out = subprocess.run(["readelf", "-wf", str(path)], capture_output=True, text=True, check=True).stdout
    fdes = sorted((int(a, 16), int(b, 16)) for a, b in re.findall(r"FDE cie=\S+ pc=([0-9a-f]+)\.\.([0-9a-f]+)", out))
    encodings = set(re.findall(r"Augmentation data:\s+([0-9a-f]{2})\b", out))
    if re.search(r'Augmentation:\s+""', out):
        encodings.add("00")
    return fdes, encodings


# (flags, a CIE FDE-pointer encoding the build must contain: gcc -fno-dwarf2-cfi-asm emits its own choice)
EH_VARIANTS = [
    pytest.param(("-fPIE", "-pie"), "1b", id="pcrel-sdata4"),
    pytest.param(("-fno-dwarf2-cfi-asm", "-fno-pic", "-no-pie"), "03", id="udata4"),
    pytest.param(("-fno-dwarf2-cfi-asm", "-mcmodel=large", "-fPIC", "-pie"), "1c", id="pcrel-sdata8"),
    pytest.param(("-fno-dwarf2-cfi-asm", "-mcmodel=large", "-fno-pic", "-no-pie"), "00", id="absptr"),
    pytest.param(("-Wl,--no-eh-frame-hdr",), "1b", id="walk-without-hdr"),
    pytest.param(("-m32", "-fno-dwarf2-cfi-asm", "-fno-pic", "-no-pie"), "00", id="i386-absptr"),
    pytest.param(("-m32", "-fPIE", "-pie"), "1b", id="i386-pcrel"),
]


@pytest.mark.parametrize(("flags", "encoding"), EH_VARIANTS)
def test_eh_frame_matches_readelf(tmp_path: Path, flags: tuple[str, ...], encoding: str) -> None:
    """Every FDE range agrees with readelf's, for each pointer encoding and with or without .eh_frame_hdr."""
    src = tmp_path / "small.c"
    src.write_text(SMALL_C)
    out = tmp_path / "small"
    res = subprocess.run(["gcc", "-O2", *flags, str(src), "-o", str(out)], capture_output=True, text=True, check=False)
    if res.returncode != 0 and "-m32" in flags:
        pytest.skip(f"gcc -m32 does not work here: {res.stderr.strip()[:200]}")
    assert res.returncode == 0, res.stderr
    expected, encodings = readelf_fdes(out)
    assert encoding in encodings
    img = open_elf(str(out))
    try:
        has_hdr = any(s.type == 0x6474E550 for s in img.segments)
        assert has_hdr == ("-Wl,--no-eh-frame-hdr" not in flags)
        mine = eh_frame_ranges(img)
        assert sorted(mine) == expected and len(expected) >= 4
        ranges = function_ranges(img)
        g1 = img.symbol("g1")
        assert g1 is not None and (g1.value, g1.value + g1.size) in ranges
        assert ranges == sorted(set(ranges))
    finally:
        img.close()


@pytest.mark.skipif(not LIBC.exists(), reason="no Debian libc here")
def test_eh_frame_of_libc_matches_pyelftools() -> None:
    """libc's FDEs as pyelftools' (slow) CFI parser reads them."""
    from elftools.dwarf.callframe import FDE
    from elftools.elf.elffile import ELFFile

    with LIBC.open("rb") as f:
        entries = ELFFile(f).get_dwarf_info().EH_CFI_entries()
        ref = sorted(
            (e.header["initial_location"], e.header["initial_location"] + e.header["address_range"])
            for e in entries
            if isinstance(e, FDE)
        )
    img = open_elf(str(LIBC))
    try:
        assert sorted(eh_frame_ranges(img)) == ref and len(ref) > 1000
    finally:
        img.close()


def test_malformed_eh_frame_returns_what_was_read(libs: dict[str, Path]) -> None:
    """A damaged .eh_frame raises nothing: the ranges before the damage are kept; a damaged .eh_frame_hdr
    falls back to walking .eh_frame."""
    data = libs["none"].read_bytes()
    img = ElfImage(data, "x")
    good = eh_frame_ranges(img)
    frames, hdr = img.section(".eh_frame"), img.section(".eh_frame_hdr")
    assert frames is not None and hdr is not None and len(good) >= 4

    bad_hdr = bytearray(data)
    bad_hdr[hdr.offset] = 7  # unknown version: walk .eh_frame instead
    assert sorted(eh_frame_ranges(ElfImage(bytes(bad_hdr), "x"))) == sorted(good)

    for cut in (frames.size // 2, 8, 0):
        broken = bytearray(data)
        broken[frames.offset + cut : frames.offset + frames.size] = b"\xff" * (frames.size - cut)
        got = eh_frame_ranges(ElfImage(bytes(broken), "x"))
        assert set(got) <= set(good)
    assert eh_frame_ranges(ElfImage(bytes(broken), "x")) == []


def test_read_encoded_formats() -> None:
    """Each DW_EH_PE format and application of the LSB's table, at a made-up address."""
    addr = 0x1000

    def dec(raw: bytes, enc: int, datarel: int | None = None, size: int = 8) -> tuple[int | None, int]:
        return read_encoded(Blob(raw, addr, size), 0, enc, datarel)

    assert dec(bytes.fromhex("f0ffffff"), DW_EH_PE_PCREL | DW_EH_PE_SDATA4) == (addr - 16, 4)
    assert dec(bytes.fromhex("10000000"), DW_EH_PE_UDATA4) == (0x10, 4)
    assert dec((0x123456789).to_bytes(8, "little"), 0) == (0x123456789, 8)  # absptr, ELF64
    assert dec((0x12345678).to_bytes(4, "little"), 0, size=4) == (0x12345678, 4)  # absptr, ELF32
    assert dec((-2).to_bytes(8, "little", signed=True), DW_EH_PE_PCREL | DW_EH_PE_SDATA8) == (addr - 2, 8)
    assert dec((5).to_bytes(8, "little"), DW_EH_PE_UDATA8 | DW_EH_PE_DATAREL, 0x4000) == (0x4005, 8)
    assert dec((-8).to_bytes(4, "little", signed=True), DW_EH_PE_SDATA4 | DW_EH_PE_DATAREL, 0x4000) == (0x3FF8, 4)
    assert dec(b"\xfe\xff", DW_EH_PE_SDATA2) == ((1 << 64) - 2, 2)  # wraps to the address width
    assert dec(b"\xfe\xff", DW_EH_PE_UDATA2) == (0xFFFE, 2)
    assert dec(b"\xe5\x8e\x26", DW_EH_PE_ULEB128) == (624485, 3)
    assert dec(b"\x7f", DW_EH_PE_SLEB128 | DW_EH_PE_PCREL) == (addr - 1, 1)
    assert read_encoded(Blob(bytes(4) + (7).to_bytes(8, "little"), 0x1004, 8), 0, DW_EH_PE_ALIGNED) == (7, 12)
    assert dec(b"", DW_EH_PE_OMIT) == (None, 0)
    assert dec(bytes(4), DW_EH_PE_INDIRECT | DW_EH_PE_PCREL | DW_EH_PE_SDATA4) == (None, 4)
    assert dec(bytes(4), DW_EH_PE_TEXTREL | DW_EH_PE_UDATA4) == (None, 4)
    assert dec(bytes(4), DW_EH_PE_DATAREL | DW_EH_PE_UDATA4) == (None, 4)  # no base known
    with pytest.raises(EhFrameError):
        dec(bytes(2), DW_EH_PE_UDATA4)
    with pytest.raises(EhFrameError):
        dec(bytes(8), 0x07)


def test_previous_range() -> None:
    """The range ending closest before an entry, within max_gap; the shortest of those ending together."""
    ranges = [(0x100, 0x140), (0x130, 0x140), (0x150, 0x1A0), (0x1A0, 0x1B3)]
    assert previous_range(ranges, 0x150) == (0x130, 0x140)
    assert previous_range(ranges, 0x1A0) == (0x150, 0x1A0)  # gap 0 is still the previous range
    assert previous_range(ranges, 0x1C3) == (0x1A0, 0x1B3)
    assert previous_range(ranges, 0x1C4) is None
    assert previous_range(ranges, 0x1C4, max_gap=32) == (0x1A0, 0x1B3)
    assert previous_range(ranges, 0x100) is None
    assert previous_range([], 0x100) is None


def test_function_ranges_symbols_and_fdes(libs: dict[str, Path]) -> None:
    """Unstripped, a local without an FDE is a range through .symtab; stripped, only the FDE ones remain."""
    full, stripped = open_elf(str(libs["none"])), open_elf(str(libs["strip"]))
    try:
        syms = full.function_symbols()
        nocfi, cfi = syms["nocfi_prev"], syms["after_ret_prev"]
        assert (nocfi.value, nocfi.value + nocfi.size) in function_ranges(full)
        assert (cfi.value, cfi.value + cfi.size) in function_ranges(stripped)
        assert (nocfi.value, nocfi.value + nocfi.size) not in function_ranges(stripped)
    finally:
        full.close()
        stripped.close()


# -- libc -----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not LIBC.exists(), reason="no Debian libc here")
def test_libc_json() -> None:
    """Debian's libc: shares add up to 100%, totals agree with the rows, well-known exports get a class."""
    doc = cli_json(LIBC)
    f = doc["files"][0]
    assert (f["format"], f["machine"]) == ("elf", "x86_64")
    assert f["totals"]["functions"] > 1500
    assert_totals_consistent(f)
    fns = by_name(doc)
    for name in ("malloc", "printf", "strlen"):
        assert fns[name]["class"] is not None and fns[name]["protocol"] in ("A", "R"), fns[name]
    assert f["totals"]["no_pause"]["count"] > 0 and f["totals"]["classes"]["opportunistic"] > 0


# -- PE --------------------------------------------------------------------------------------------------------

# i386: mov edi,edi after CC padding; push ebp; mov ebp,esp; mov eax,[ebp+8]; inc eax; pop ebp; ret
HOT32 = bytes.fromhex("8bff 55 8bec 8b4508 40 5d c3")
PLAIN32 = bytes.fromhex("55 8bec 8b4508 83c002 5d c3")
OPP32 = bytes.fromhex("83ec0c 8b442410 83c40c c3")  # sub esp,12 first (3 bytes)
CALL32 = bytes.fromhex("e800000000 58 c3")  # call $+5; pop eax; ret
PE32_FNS = [
    Fn("HotFn", HOT32, CC * 16),
    Fn("HotNopFn", HOT32, NOP * 5),
    Fn("PlainFn", PLAIN32),  # right after a ret: the bytes before it are code
    Fn("OppFn", OPP32, CC * 6),
    Fn("CallFn", CALL32),
    Fn("TinyFn", b"\xc3", CC * 4),
    Fn("LastFn", HOT32, CC * 4),
]
PE32_EXPECTED = {
    "HotFn": ("ms-x86", "A", None),
    "HotNopFn": ("ms-x86", "A", None),
    "PlainFn": ("ordinary", "R", None),
    "OppFn": ("opportunistic", "A", None),
    "CallFn": (None, "-", "call in the first bytes"),
    "TinyFn": (None, "-", "too short"),
    "LastFn": ("ordinary", "R", None),  # 4 bytes of CC before: not the 5 padding bytes ms-x86 needs
}

# x64
MOV_RSP8 = bytes.fromhex("48895c2408 4883ec20 4883c420 c3")  # mov [rsp+8],rbx; sub/add rsp,32; ret
LEA64 = bytes.fromhex("488da42400000000 8d4101 c3")  # lea rsp,[rsp+0]; lea eax,[rcx+1]; ret
PUSH64 = bytes.fromhex("53 4883ec20 8bc1 4883c420 5b c3")  # push rbx first (1 byte)
PE64_FNS = [
    Fn("HotFn", MOV_RSP8, CC * 16),
    Fn("LeaFn", LEA64, CC * 16),
    Fn("PushFn", PUSH64, CC * 6),
    Fn("TinyFn", b"\xc3", CC * 6),
    Fn("internal", bytes.fromhex("8d4105 c3"), NOP * 7, exported=False),  # after TinyFn's ret: opportunistic
    Fn("LeafFn", bytes.fromhex("8d4107 c3"), CC * 8, pdata=False),  # a leaf: export only, no .pdata
    Fn("fragment", bytes.fromhex("83c001 c3"), CC * 4, exported=False, chained_to="HotFn"),
    Fn("NextFn", bytes.fromhex("8bc1 ffc0 c3"), NOP * 9),  # after the fragment's ret
    Fn("CallFn", bytes.fromhex("e800000000 58 c3")),
]
PE64_EXPECTED = {
    "HotFn": ("opportunistic", "A", None),
    "LeaFn": ("ms-hook-prologue", "A", None),
    "PushFn": ("ordinary", "R", None),
    "TinyFn": (None, "-", "too short"),
    "internal": ("opportunistic", "A", None),
    "LeafFn": ("opportunistic", "A", None),
    "NextFn": ("opportunistic", "A", None),
    "CallFn": (None, "-", "call in the first bytes"),
}
FORWARDERS = {"Forwarded": "KERNEL32.Sleep"}


@pytest.mark.parametrize(
    ("bits", "fns", "expected"), [(32, PE32_FNS, PE32_EXPECTED), (64, PE64_FNS, PE64_EXPECTED)], ids=["pe32", "pe32+"]
)
def test_pe(tmp_path: Path, bits: int, fns: list[Fn], expected: dict[str, Any]) -> None:
    """A PE32 / PE32+ DLL: pefile parses it; exports (not the forwarded one, not the data one) and .pdata
    functions (not the chained fragment) are classified as expected; the short jumps are EB F9."""
    import pefile

    img = build_pe(fns, bits, FORWARDERS)
    pe = pefile.PE(data=img.data)
    assert pe.FILE_HEADER.Machine == (0x8664 if bits == 64 else 0x14C)
    assert {s.name for s in pe.DIRECTORY_ENTRY_EXPORT.symbols} >= {b"HotFn", b"Forwarded", b"DataWord"}
    assert hasattr(pe, "DIRECTORY_ENTRY_EXCEPTION") == (bits == 64)
    path = tmp_path / f"fixture{bits}.dll"
    path.write_bytes(img.data)

    doc = cli_json(path)
    f = doc["files"][0]
    assert (f["format"], f["machine"]) == ("pe", "x86_64" if bits == 64 else "i386")
    got = {fn["address"]: fn for fn in f["functions"]}
    assert set(got) == {img.addresses[label] for label in expected}  # no fragment, no forwarder, no data
    for label, (klass, protocol, kind) in expected.items():
        fn = got[img.addresses[label]]
        want_name = f"sub_{img.addresses[label]:x}" if label == "internal" else label
        assert fn["name"] == want_name
        assert (fn["class"], fn["protocol"]) == (klass, protocol), fn
        assert (reason_kind(fn["reason"]) if fn["reason"] else None) == kind, fn
    assert_totals_consistent(f)
    for row in scan_file(str(path)).functions:
        if row.site is not None and row.site.pad is not None:
            assert row.site.short_jump_disp == 0xF9


def test_pe_unsupported_machine(tmp_path: Path) -> None:
    """A PE for another machine (ARM64 here) is refused in one line."""
    data = bytearray(build_pe(PE64_FNS, 64).data)
    data[0x44:0x46] = (0xAA64).to_bytes(2, "little")
    path = tmp_path / "arm64.dll"
    path.write_bytes(data)
    assert_one_line_error(path, "unsupported PE machine 0xaa64")


# -- bad input --------------------------------------------------------------------------------------------------


def assert_one_line_error(path: str | Path, words: str, *extra: str) -> None:
    """``hotpatch scan [EXTRA] PATH`` fails with exit 1, nothing on stdout and one line naming the problem."""
    for args in ((*extra, path), ("--json", *extra, path)):
        res = run_cli("scan", *args)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert res.stdout == ""
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("hotpatch: error: "), res.stderr
        assert words in lines[0] and "internal error" not in lines[0], lines[0]


def test_bad_inputs(tmp_path: Path, libs: dict[str, Path]) -> None:
    """Missing file, directory, text, empty file, truncated PE, an object file, an ELF for another machine:
    one line each, exit 1; a good file before a bad one does not change that."""
    assert_one_line_error(tmp_path / "missing", "No such file or directory")
    assert_one_line_error(tmp_path, "Is a directory")
    (tmp_path / "text").write_text("hello\n")
    assert_one_line_error(tmp_path / "text", "neither an ELF nor a PE file")
    (tmp_path / "empty").write_bytes(b"")
    assert_one_line_error(tmp_path / "empty", "neither an ELF nor a PE file")
    (tmp_path / "trunc.exe").write_bytes(b"MZ\0\0")
    assert_one_line_error(tmp_path / "trunc.exe", "not a valid PE file")
    obj = tmp_path / "small.o"
    (tmp_path / "small.c").write_text(SMALL_C)
    subprocess.run(["gcc", "-c", str(tmp_path / "small.c"), "-o", str(obj)], check=True)
    assert_one_line_error(obj, "no loadable segments")
    arm = bytearray(libs["none"].read_bytes())
    arm[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64
    (tmp_path / "arm.so").write_bytes(arm)
    assert_one_line_error(tmp_path / "arm.so", "unsupported machine aarch64")
    assert_one_line_error(tmp_path / "missing", "missing", str(libs["none"]))


def test_no_files_is_usage_error() -> None:
    """``hotpatch scan`` with no FILE is a usage error (click's exit 2), one line."""
    res = run_cli("scan")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and res.stderr.startswith("hotpatch: error:")

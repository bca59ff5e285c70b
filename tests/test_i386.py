"""The layers under patching i386 (``gcc -m32``) processes from the 64-bit tool.

* seed 001's jumps (``E9 rel32`` into the padding, ``EB F9`` at the entry) and 32-bit wrap-around;
* the ELF32 reader (:mod:`hotpatch.elf.image`) against pyelftools and ``readelf`` on a PIE, a shared library
  and the system's 32-bit libc: headers, segments, sections, symbols, GNU hash lookup, build-id, SHT_REL
  relocations with implicit addends;
* 32-bit trampolines (:mod:`hotpatch.x86.trampoline`) decoded back with iced-x86;
* the ``int $0x80`` stub (:mod:`hotpatch.x86.stub32`) and the arch-aware injector
  (:mod:`hotpatch.process.remote`) on a live multi-threaded i386 process (``targets/i386_threads.c``): every
  syscall hotpatch injects, into a thread asleep in ``read`` (restarted with ``-ERESTARTSYS``), one in
  ``nanosleep`` (restarted through ``restart_syscall``) and one spinning in user code; and SIGKILL of the tool
  in the middle of an injected call, after which the thread must run through the stub back to where it was;
* the loader relocating ``-m32`` patches built by :mod:`hotpatch.patch.build` into that process
  (R_386_RELATIVE, 32, PC32, GLOB_DAT, HOTPATCH_ORIGINAL), checked against addresses the target prints itself.

Facts about a 32-bit tracee seen from a 64-bit tracer that these tests pin down (measured on Linux 6.x): the
registers come in the x86-64 ``user_regs_struct``; ``cs`` is 0x23; ``rax`` of an interrupted syscall is the
sign-extended -ERESTART* (``0xfffffffffffffe00``, ``0xfffffffffffffdfc``); ``orig_rax`` is the zero-extended
syscall number inside a call (3 for ``read``, 267 or 407 for ``clock_nanosleep``) and ``0xffffffffffffffff``
(sign-extended -1) outside one; an address result above 2 GiB is zero-extended, an error sign-extended.
Every process is real and reaped by the ``procs`` fixture, even on failure.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import iced_x86 as iced
import pytest
from elftools.elf.elffile import ELFFile

from conftest import INJECTOR_SETUP, TARGETS, Procs, assert_running, compile_program, wait_for_line
from hotpatch.elf.image import ElfImage, open_elf
from hotpatch.errors import PatchFileError
from hotpatch.loader import Layout, load
from hotpatch.modules import ModuleSet
from hotpatch.patch import build as patchbuild
from hotpatch.patch.bundle import PatchFile
from hotpatch.patch.manifest import SECTION
from hotpatch.process import ptrace, remote
from hotpatch.process.maps import gap_candidates, read_maps
from hotpatch.process.memory import Memory
from hotpatch.process.threads import World, tracer_of
from hotpatch.x86 import prologue, stub32, trampoline
from hotpatch.x86.encode import ENDBR32, jmp_rel8, jmp_rel32

SIGN_EXTENDED_MINUS_ONE = 0xFFFF_FFFF_FFFF_FFFF
ERESTARTSYS_64 = (-512) & SIGN_EXTENDED_MINUS_ONE
ERESTART_RESTARTBLOCK_64 = (-516) & SIGN_EXTENDED_MINUS_ONE
NR_READ_I386 = 3  # syscall_32.tbl
NR_GETPID_I386 = 20
NR_CLOCK_NANOSLEEP_I386 = (267, 407)  # clock_nanosleep, clock_nanosleep_time64
MEMBARRIER_CMD_QUERY = 0
MFD_NAME = b"hotpatch-i386-test"
PAGE = 4096


# -- seed 001 ----------------------------------------------------------------------------------------------


def test_seed_001_jumps() -> None:
    """Seed 001: the far jump in the padding of calc!SetRadix and the short jump at its entry."""
    assert jmp_rel32(0x00476C79, 0x12345678, bitness=32) == bytes.fromhex("e9 fa e9 ec 11")
    assert jmp_rel8(0x00476C7E, 0x00476C79) == bytes.fromhex("eb f9")


def test_jmp_rel32_wraps_in_32_bit_code() -> None:
    """EIP wraps modulo 2**32: a jump from near the top of the address space to near 0 is 5 bytes forward,
    and iced-x86 decodes it (32-bit) to the same target."""
    code = jmp_rel32(0xFFFF_F000, 0x1000, bitness=32)
    assert code == b"\xe9" + struct.pack("<I", 0x1FFB)
    assert iced.Decoder(32, code, ip=0xFFFF_F000).decode().near_branch_target == 0x1000


# -- the ELF32 reader ---------------------------------------------------------------------------------------

LIB_SOURCE = """
int lib_data = 7;
int *lib_ptr = &lib_data;
static int hidden_helper(int x) { return x * 3; }
int lib_add(int x) { return hidden_helper(x) + lib_data; }
int (*lib_fn)(int) = lib_add;
extern int puts(const char *);
int lib_say(void) { return puts("hi"); }
"""

_KIND = {"STT_FUNC": "func", "STT_OBJECT": "object", "STT_GNU_IFUNC": "ifunc", "STT_LOOS": "ifunc", "STT_TLS": "tls"}
_BIND = {"STB_LOCAL": "local", "STB_GLOBAL": "global", "STB_WEAK": "weak"}


@pytest.fixture(scope="module")
def elf32_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A -m32 PIE (the threads target) and a -m32 shared library, built once for this module."""
    tmp = tmp_path_factory.mktemp("elf32")
    lib_src = tmp / "lib32.c"
    lib_src.write_text(LIB_SOURCE)
    return {
        "pie": compile_program(TARGETS / "i386_threads.c", tmp / "threads32", "-m32", "-Wl,--build-id=sha1"),
        "lib": compile_program(lib_src, tmp / "lib32.so", "-m32", "-Wl,--build-id=sha1", shared=True),
    }


def _pyelf(path: Path) -> Iterator[ELFFile]:
    with open(path, "rb") as f:
        yield ELFFile(f)


@pytest.mark.parametrize("which", ["pie", "lib"])
def test_elf32_headers_segments_sections(elf32_files: dict[str, Path], which: str) -> None:
    """Class, machine, type, every program header and every section header agree with pyelftools."""
    path = elf32_files[which]
    img = open_elf(str(path))
    try:
        for ref in _pyelf(path):
            assert (img.bitness, img.elfclass, img.machine) == (32, 32, "i386")
            assert ref.elfclass == 32 and ref["e_machine"] == "EM_386" and img.type == 3  # ET_DYN
            assert img.ehsize == 52 and img.phentsize == 32 and img.shentsize == 40
            want_segments = [
                (s["p_offset"], s["p_vaddr"], s["p_filesz"], s["p_memsz"], s["p_flags"]) for s in ref.iter_segments()
            ]
            assert [(s.offset, s.vaddr, s.filesz, s.memsz, s.flags) for s in img.segments] == want_segments
            want_sections = [
                (s.name, s["sh_addr"], s["sh_offset"], s["sh_size"], s["sh_link"], s["sh_entsize"])
                for s in ref.iter_sections()
            ]
            got = [(s.name, s.addr, s.offset, s.size, s.link, s.entsize) for s in img.sections]
            assert got == want_sections
            for seg in img.loads:  # read_vaddr returns the file bytes, zeros past p_filesz
                data = img.read_vaddr(seg.vaddr, seg.memsz)
                assert data[: seg.filesz] == img.bytes_at(seg.offset, seg.filesz)
                assert data[seg.filesz :] == bytes(seg.memsz - seg.filesz)
    finally:
        img.close()


@pytest.mark.parametrize("which", ["pie", "lib"])
def test_elf32_build_id_matches_readelf(elf32_files: dict[str, Path], which: str) -> None:
    """The GNU build-id is the one ``readelf -n`` prints (and pyelftools reads)."""
    path = elf32_files[which]
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", out)
    assert match is not None, out
    img = open_elf(str(path))
    try:
        assert img.build_id == match.group(1)
    finally:
        img.close()
    for ref in _pyelf(path):
        notes = [n for sec in ref.iter_sections() if sec["sh_type"] == "SHT_NOTE" for n in sec.iter_notes()]
        assert match.group(1) in [n["n_desc"] for n in notes if n["n_type"] == "NT_GNU_BUILD_ID"]


def _check_symbols(img: ElfImage, ref: ELFFile) -> None:
    """Every .dynsym entry and every defined .symtab entry of ``img`` as pyelftools reads it."""
    dynsym = ref.get_section_by_name(".dynsym")
    assert dynsym is not None
    mine = img.dynamic_symbols()
    theirs = list(dynsym.iter_symbols())[1:]
    assert len(mine) == len(theirs)
    for (name, sym, binding), t in zip(mine, theirs, strict=True):
        assert name == t.name
        assert binding == {"STB_LOCAL": 0, "STB_GLOBAL": 1, "STB_WEAK": 2}.get(t["st_info"]["bind"], binding)
        if t["st_shndx"] == "SHN_UNDEF":
            assert sym is None, name
            continue
        assert sym is not None and (sym.value, sym.size) == (t["st_value"], t["st_size"]), name
        assert sym.kind == _KIND.get(t["st_info"]["type"], "other"), name
        assert sym.binding == _BIND.get(t["st_info"]["bind"], "other"), name
    symtab = ref.get_section_by_name(".symtab")
    if symtab is not None:
        funcs = img.function_symbols()
        for t in symtab.iter_symbols():
            if t.name and t["st_shndx"] != "SHN_UNDEF" and t["st_info"]["type"] == "STT_FUNC":
                assert t.name in funcs
                sym = img.symbol(t.name)
                assert sym is not None
                if t["st_info"]["bind"] != "STB_LOCAL":
                    assert (sym.value, sym.size) == (t["st_value"], t["st_size"]), t.name


def _check_gnu_hash(img: ElfImage, ref: ELFFile) -> int:
    """``dynamic_symbol`` (through ``.gnu.hash``) finds every defined name: the default version of it (the
    lowest-index definition whose ``.gnu.version`` entry lacks the hidden bit 0x8000, pyelftools keeps that
    bit), and nothing for a name that is not there. Returns how many names were looked up."""
    dynsym = ref.get_section_by_name(".dynsym")
    versym = ref.get_section_by_name(".gnu.version")
    defs: dict[str, list[tuple[bool, int, int]]] = {}
    for i, t in enumerate(dynsym.iter_symbols()):
        if i and t.name and t["st_shndx"] != "SHN_UNDEF":
            ndx = versym.get_symbol(i).entry["ndx"] if versym is not None else 0  # or a VER_NDX_* name
            hidden = isinstance(ndx, int) and bool(ndx & 0x8000)
            defs.setdefault(t.name, []).append((hidden, t["st_value"], t["st_size"]))
    for name, found in defs.items():
        want = sorted(found, key=lambda d: d[0])[0]  # stable: lowest index among the non-hidden first
        sym = img.dynamic_symbol(name)
        assert sym is not None and (sym.value, sym.size) == want[1:], name
    assert img.dynamic_symbol("no_such_symbol_hotpatch_i386") is None
    return len(defs)


@pytest.mark.parametrize("which", ["pie", "lib"])
def test_elf32_symbols_match_pyelftools(elf32_files: dict[str, Path], which: str) -> None:
    """.dynsym, .symtab and the GNU hash lookup agree with pyelftools on gcc -m32 output."""
    path = elf32_files[which]
    img = open_elf(str(path))
    try:
        for ref in _pyelf(path):
            _check_symbols(img, ref)
            _check_gnu_hash(img, ref)
        if which == "lib":
            add = img.symbol("lib_add")
            assert add is not None and add.kind == "func" and add.binding == "global"
            data = img.dynamic_symbol("lib_data")
            assert data is not None and data.kind == "object"
        else:
            compute = img.symbol("compute")  # a PIE's own function: .symtab only
            assert compute is not None and compute.kind == "func" and img.dynamic_symbol("compute") is None
    finally:
        img.close()


def test_elf32_gnu_hash_on_system_libc() -> None:
    """Every defined name of the system's 32-bit libc (thousands, 300+ with several versions) resolves to
    the definition ld.so would bind an unversioned reference to."""
    path = next((p for p in ("/usr/lib32/libc.so.6", "/lib/i386-linux-gnu/libc.so.6") if os.path.exists(p)), None)
    if path is None:
        pytest.skip("no 32-bit libc installed (gcc-multilib)")
    img = open_elf(path)
    try:
        for ref in _pyelf(Path(path)):
            assert _check_gnu_hash(img, ref) > 1000
    finally:
        img.close()


def _readelf_relocations(path: Path) -> list[tuple[int, str, str]]:
    """``(offset, type name, symbol name)`` of every dynamic relocation, from ``readelf -rW``."""
    out = subprocess.run(["readelf", "-rW", str(path)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and re.fullmatch(r"[0-9a-f]{8}", parts[0]) and parts[2].startswith("R_386_"):
            rows.append((int(parts[0], 16), parts[2], parts[4].split("@")[0] if len(parts) > 4 else ""))
    return rows


@pytest.mark.parametrize("which", ["pie", "lib"])
def test_elf32_rel_relocations(elf32_files: dict[str, Path], which: str) -> None:
    """.rel.dyn and .rel.plt entries: offsets, types and symbols as ``readelf -r`` lists them, and the implicit
    addend is the 4-byte word at the place as pyelftools reads the segment (R_386_RELATIVE's is an address
    inside the file)."""
    path = elf32_files[which]
    img = open_elf(str(path))
    try:
        rels = img.dynamic_relocations()
        types = {1: "R_386_32", 2: "R_386_PC32", 6: "R_386_GLOB_DAT", 7: "R_386_JUMP_SLOT", 8: "R_386_RELATIVE"}
        got = [
            (r.offset, types.get(r.type, str(r.type)), img.dynamic_symbol_by_index(r.sym)[0] if r.sym else "")
            for r in rels
        ]
        assert got == _readelf_relocations(path)
        assert all(r.implicit for r in rels) and {r.type for r in rels} >= {6, 8}
        for ref in _pyelf(path):
            for r in rels:
                seg = next(
                    s
                    for s in ref.iter_segments()
                    if s["p_type"] == "PT_LOAD" and s["p_vaddr"] <= r.offset < s["p_vaddr"] + s["p_memsz"]
                )
                data = seg.data() + bytes(seg["p_memsz"] - seg["p_filesz"])
                at = r.offset - seg["p_vaddr"]
                assert r.addend == struct.unpack_from("<i", data, at)[0]
            for r in rels:
                if r.type == 8:
                    assert any(s.vaddr <= r.addend < s.vaddr + s.memsz for s in img.loads)
        if which == "lib":  # lib_fn = lib_add, lib_ptr = &lib_data: R_386_32 against each symbol
            named = {img.dynamic_symbol_by_index(r.sym)[0]: r for r in rels if r.type == 1}
            assert {"lib_add", "lib_data"} <= set(named)
            assert img.import_slots("puts")  # a JUMP_SLOT (or GLOB_DAT) imports puts
    finally:
        img.close()


# -- 32-bit trampolines -------------------------------------------------------------------------------------

ENTRY32 = 0x0804_9000
# inc eax (40: a REX prefix in 64-bit code); test eax,eax; je +6 (to xor); mov eax,[esp+4]; inc eax; ret;
# xor eax,eax; ret. The jump overwrites the first three (5 bytes).
BRANCHY32 = bytes.fromhex("40 85c0 7406 8b442404 40 c3 31c0 c3")


@pytest.mark.parametrize("endbr", [False, True])
@pytest.mark.parametrize("where", [0x0804_A000, 0xF7F0_0000])
def test_trampoline_32(endbr: bool, where: int) -> None:
    """A 32-bit prologue with a short ``je`` is re-encoded as 32-bit code at a near and at a far (> 2 GiB
    away, reached by wrap-around) address: decoded back, every instruction computes the same target, the
    jump back lands after the overwritten bytes, and ``endbr32`` leads when the function has one."""
    code = (ENDBR32 if endbr else b"") + BRANCHY32
    pro = prologue.analyze("fn", ENTRY32, code, bitness=32)
    skip = len(ENDBR32) if endbr else 0
    assert pro.site == ENTRY32 + skip and pro.position_dependent and pro.endbr == endbr
    tramp = trampoline.build(pro, where, bitness=32)
    assert tramp.code.startswith(ENDBR32) == endbr
    decoded = list(iced.Decoder(32, tramp.code, ip=where))
    if endbr:
        assert decoded[0].mnemonic == iced.Mnemonic.ENDBR32
        decoded = decoded[1:]
    originals = list(iced.Decoder(32, pro.original, ip=pro.site))
    assert [i.mnemonic for i in originals] == [iced.Mnemonic.INC, iced.Mnemonic.TEST, iced.Mnemonic.JE]
    assert originals[2].near_branch_target == pro.site + 11 and pro.length == 5
    for mine, orig in zip(decoded, originals, strict=False):
        assert mine.mnemonic == orig.mnemonic
        if orig.flow_control == iced.FlowControl.CONDITIONAL_BRANCH:
            assert mine.near_branch_target == orig.near_branch_target
        assert tramp.rip_map[orig.ip] == mine.ip
    back = decoded[len(originals)]
    assert back.mnemonic == iced.Mnemonic.JMP and back.near_branch_target == pro.site + pro.length
    assert tramp.rip_map[pro.site + pro.length] == back.ip


def test_trampoline_32_verbatim_copy_wraps() -> None:
    """Position-independent 32-bit bytes are copied as they are, and the jump back wraps modulo 2**32."""
    code = bytes.fromhex("8b442404 8d440001 c3")  # mov eax,[esp+4]; lea eax,[eax+eax+1]; ret
    pro = prologue.analyze("fn", ENTRY32, code, bitness=32)
    assert not pro.position_dependent
    tramp = trampoline.build(pro, 0xFFFF_F000, bitness=32)
    assert tramp.code[:8] == code[:8]
    back = iced.Decoder(32, tramp.code[8:], ip=0xFFFF_F008).decode()
    assert back.near_branch_target == ENTRY32 + 8


# -- the int $0x80 stub --------------------------------------------------------------------------------------


def _regs(**values: int) -> ptrace.Regs:
    regs = ptrace.Regs()
    base = {"rax": 0x11, "rbx": 0x22, "rcx": 0x33, "rdx": 0x44, "rsi": 0x55, "rdi": 0x66, "rbp": 0x77}
    for name, value in {
        **base,
        "rip": 0x5655_6000,
        "eflags": 0x246,
        "orig_rax": SIGN_EXTENDED_MINUS_ONE,
        **values,
    }.items():
        setattr(regs, name, value)
    return regs


@pytest.mark.parametrize(
    ("rax", "orig_rax", "eip", "eax"),
    [
        (0x11, SIGN_EXTENDED_MINUS_ONE, 0x5655_6000, 0x11),  # not in a syscall
        (0xFFFF_FFFF, 0xFFFF_FFFF, 0x5655_6000, 0xFFFF_FFFF),  # -1 in eax, orig -1 zero-extended: no restart
        (ERESTARTSYS_64, 3, 0x5655_5FFE, 3),  # read interrupted: int $0x80 again
        (0xFFFF_FE00, 3, 0x5655_5FFE, 3),  # the same, zero-extended
        ((-513) & SIGN_EXTENDED_MINUS_ONE, 4, 0x5655_5FFE, 4),  # -ERESTARTNOINTR
        ((-514) & SIGN_EXTENDED_MINUS_ONE, 5, 0x5655_5FFE, 5),  # -ERESTARTNOHAND
        (ERESTART_RESTARTBLOCK_64, 407, 0x5655_5FFE, 0),  # nanosleep: restart_syscall is 0 on i386
        (ERESTARTSYS_64, SIGN_EXTENDED_MINUS_ONE, 0x5655_6000, ERESTARTSYS_64),  # orig -1: never restarted
    ],
)
def test_stub32_bytes(rax: int, orig_rax: int, eip: int, eax: int) -> None:
    """Decoded as 32-bit code, the stub is: int 0x80; push eflags without TF; popfd; mov of every register
    (eax holding the restart number when the kernel would restart); jmp to the resume point."""
    saved = _regs(rax=rax, orig_rax=orig_rax, eflags=0x246 | 0x100)  # ZF, IF, TF
    at = 0x5660_0300
    assert stub32.resume_point(saved)[0] == eip
    code = stub32.build(saved, at)
    assert len(code) == stub32.STUB_SIZE == 48 and code.startswith(stub32.SIGNATURE)
    ins = list(iced.Decoder(32, code, ip=at))
    assert [str(i) for i in ins[:3]] == ["int 80h", "push 246h", "popfd"]
    movs = {i.op0_register: i.immediate32 for i in ins[3:-1]}
    want = {
        iced.Register.EAX: eax & 0xFFFF_FFFF,
        iced.Register.EBX: 0x22,
        iced.Register.ECX: 0x33,
        iced.Register.EDX: 0x44,
        iced.Register.ESI: 0x55,
        iced.Register.EDI: 0x66,
        iced.Register.EBP: 0x77,
    }
    assert movs == want and all(i.mnemonic == iced.Mnemonic.MOV for i in ins[3:-1])
    assert ins[-1].mnemonic == iced.Mnemonic.JMP and ins[-1].near_branch_target == eip


def test_arch_tables() -> None:
    """The i386 numbers (syscall_32.tbl) and convention; the x86-64 constants are unchanged."""
    i386 = remote.ARCHES[32]
    assert i386.sys == remote.I386_SYSCALLS
    assert (i386.sys.mmap, i386.sys.munmap, i386.sys.mprotect, i386.sys.ftruncate) == (192, 91, 125, 93)
    assert (i386.sys.memfd_create, i386.sys.close, i386.sys.membarrier, i386.sys.mmap_offset_unit) == (
        356,
        6,
        375,
        4096,
    )
    assert i386.call_regs == ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp")
    x64 = remote.ARCHES[64].sys
    assert (x64.mmap, x64.munmap, x64.mprotect, x64.close, x64.ftruncate, x64.memfd_create) == (9, 11, 10, 3, 77, 319)
    assert i386.result(0xF7F0_0000) == 0xF7F0_0000  # an address above 2 GiB stays positive
    assert i386.result((-22) & SIGN_EXTENDED_MINUS_ONE) == -22 == i386.result(0xFFFF_FFEA)
    assert remote.ARCHES[64].result((-17) & SIGN_EXTENDED_MINUS_ONE) == -17


# -- a live i386 process ---------------------------------------------------------------------------------------


@dataclass
class Target32:
    """A running ``targets/i386_threads.c``: its thread ids by role and the addresses it printed."""

    proc: subprocess.Popen[bytes]
    tids: dict[str, list[int]] = field(default_factory=dict)
    addrs: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, procs: Procs, exe: Path) -> Target32:
        """Start ``exe`` and read its start-up lines up to ``ready``."""
        t = cls(procs.start(exe, stdin=subprocess.PIPE))
        while True:
            words = wait_for_line(t.proc, lambda _: True).split()
            if words == ["ready"]:
                return t
            if words[0] == "tid":
                t.tids.setdefault(words[1], []).append(int(words[2]))
            else:
                assert words[0] == "addr", words
                t.addrs[words[1]] = int(words[2], 16)

    @property
    def pid(self) -> int:
        """The target's PID."""
        return self.proc.pid

    def send(self, line: str) -> None:
        """Write one command line to the target's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()

    def ask(self, line: str, prefix: str) -> str:
        """Send ``line``; return the first output line starting with ``prefix`` (fail on an error line)."""
        self.send(line)
        got = wait_for_line(self.proc, lambda s: s.startswith(prefix) or "error" in s)
        assert "error" not in got, got
        return got.strip()

    def report(self) -> dict[str, int]:
        """``report``'s counters: bad, sleeps, n0, n1."""
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", self.ask("report", "report "))}

    def check_healthy(self) -> None:
        """Running, untraced, every thread working: the workers count on with no broken invariant, the
        sleeper wakes, the reader receives, main answers (so its read was restarted correctly)."""
        assert_running(self.pid)
        first = self.report()
        assert first["bad"] == 0, first
        time.sleep(0.7)  # > 2 sleeper periods
        second = self.report()
        assert second["bad"] == 0, second
        assert second["sleeps"] > first["sleeps"]
        assert second["n0"] > first["n0"] and second["n1"] > first["n1"]
        assert self.ask("send ping", "reader got") == "reader got ping"
        assert self.ask("call 4", "compute=") == "compute=13"


@pytest.fixture(scope="module")
def threads32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``targets/i386_threads.c`` built with gcc -m32 -pthread."""
    return compile_program(TARGETS / "i386_threads.c", tmp_path_factory.mktemp("t32") / "threads32", "-m32")


@pytest.fixture
def target32(procs: Procs, threads32: Path) -> Iterator[Target32]:
    """A started i386 target (reaped by ``procs``), after its threads went to sleep or spin."""
    t = Target32.start(procs, threads32)
    time.sleep(0.05)
    yield t


def _maps_line(pid: int, addr: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return next((line for line in f if int(line.split("-")[0], 16) == addr), "")


def test_find_stub_area_in_32_bit_module(target32: Target32) -> None:
    """The stub room is found after the executable PT_LOAD of the ELF32 executable, in its last page."""
    maps = read_maps(target32.pid)
    with Memory(target32.pid) as mem:
        area = remote.find_stub_area(target32.pid, maps, mem)
        assert mem.read(area, remote.STUB_ROOM) == bytes(remote.STUB_ROOM)
    m = next(m for m in maps if m.start <= area < m.end)
    assert m.executable and m.path == os.readlink(f"/proc/{target32.pid}/exe") and area < 1 << 32
    assert remote.process_bitness(target32.pid) == 32 and remote.arch_of(target32.pid).bitness == 32


def test_injected_syscalls_in_i386_process(target32: Target32) -> None:
    """Through the main thread, asleep in read(2) on its stdin pipe: mmap2 (anonymous, fixed, shared with a
    page offset), mprotect, munmap, memfd_create, ftruncate, close, membarrier and an error; the registers
    the 64-bit tracer saw are the measured 32-bit ones; afterwards every thread works and main's read
    restarted."""
    pid = target32.pid
    mem = Memory(pid)
    stops: list[float] = []
    try:
        area = remote.find_stub_area(pid, read_maps(pid), mem)
        with remote.injection(pid, mem, area, stops) as inject:
            saved = inject.saved
            assert inject.thread.tid == pid and inject.bitness == 32 and inject.sys is remote.I386_SYSCALLS
            assert (saved.cs, saved.rax, saved.orig_rax) == (remote.USER32_CS, ERESTARTSYS_64, NR_READ_I386)
            assert mem.read(saved.rip - 2, 2) == stub32.INT80  # the vDSO's int $0x80 before its landing pad
            assert "[vdso]" in _maps_line(pid, next(m.start for m in read_maps(pid) if m.start <= saved.rip < m.end))
            assert mem.read(area, len(stub32.SIGNATURE)) == stub32.SIGNATURE

            rw, anon = remote.PROT_READ | remote.PROT_WRITE, remote.MAP_PRIVATE | remote.MAP_ANONYMOUS
            addr = inject.mmap(0, 2 * PAGE, rw, anon)
            assert addr % PAGE == 0 and addr + 2 * PAGE <= 0xFFFF_E000
            assert _maps_line(pid, addr).split()[1] == "rw-p"
            mem.write(addr, b"i386")
            assert mem.read(addr, 4) == b"i386"
            assert inject(inject.sys.mprotect, addr, PAGE, remote.PROT_READ) == 0
            assert _maps_line(pid, addr).split()[1] == "r--p"
            with pytest.raises(remote.SyscallError) as exc:
                inject(inject.sys.mprotect, addr + 1, PAGE, remote.PROT_READ)
            assert exc.value.errno == errno.EINVAL
            with pytest.raises(remote.SyscallError) as exc:
                remote.mmap_fixed(inject, addr, PAGE, rw)  # taken: MAP_FIXED_NOREPLACE works on i386
            assert exc.value.errno == errno.EEXIST
            with pytest.raises(remote.SyscallError) as exc:
                remote.mmap_fixed(inject, 0xFFFF_F000, 2 * PAGE, rw)  # beyond a compat task's address space
            assert exc.value.errno == errno.ENOMEM
            assert inject(inject.sys.munmap, addr, 2 * PAGE) == 0
            assert _maps_line(pid, addr) == ""
            assert remote.mmap_fixed(inject, addr, PAGE, rw) == addr
            assert inject(inject.sys.munmap, addr, PAGE) == 0

            scratch = (saved.rsp - 512) & ~15  # below the thread's stack pointer, as state.create does
            mem.write(scratch, MFD_NAME + b"\0")
            fd = inject(inject.sys.memfd_create, scratch, remote.MFD_CLOEXEC)
            assert os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:" + MFD_NAME.decode())
            assert inject(inject.sys.ftruncate, fd, 2 * PAGE) == 0
            shared = inject.mmap(0, PAGE, rw, remote.MAP_SHARED, fd, PAGE)  # mmap2 takes the offset in pages
            line = _maps_line(pid, shared).split()
            assert line[1] == "rw-s" and int(line[2], 16) == PAGE and line[5].startswith("/memfd:" + MFD_NAME.decode())
            assert inject(inject.sys.close, fd) == 0
            assert not os.path.exists(f"/proc/{pid}/fd/{fd}")
            assert inject(inject.sys.munmap, shared, PAGE) == 0
            with pytest.raises(ValueError, match="whole 4096-byte pages"):
                inject.mmap(0, PAGE, rw, anon, -1, 100)
            assert inject(inject.sys.membarrier, MEMBARRIER_CMD_QUERY, 0, 0) > 0
            assert inject(NR_GETPID_I386) == pid
        assert mem.read(area, stub32.STUB_SIZE) == bytes(stub32.STUB_SIZE)  # the stub was erased
        assert len(stops) == 1
    finally:
        mem.close()
    target32.check_healthy()


@pytest.mark.parametrize("role", ["reader", "sleeper", "worker"])
def test_inject_into_each_thread_kind(target32: Target32, role: str) -> None:
    """An injection through a thread asleep in read(2) (-ERESTARTSYS), in nanosleep (-ERESTART_RESTARTBLOCK,
    resumed through restart_syscall, number 0 on i386) or spinning in user code (orig_rax -1): its call
    completes and the thread carries on as before."""
    pid, tid = target32.pid, target32.tids[role][0]
    mem = Memory(pid)
    world = World(pid)
    try:
        area = remote.find_stub_area(pid, read_maps(pid), mem)
        world.seize_thread(tid)
        world.stop([tid])
        inject = remote.Injector(world, mem, area, world.threads[tid])
        try:
            saved = inject.saved
            assert inject.bitness == 32 and saved.cs == remote.USER32_CS
            if role == "reader":
                assert (saved.rax, saved.orig_rax) == (ERESTARTSYS_64, NR_READ_I386)
            elif role == "sleeper":
                assert saved.rax == ERESTART_RESTARTBLOCK_64 and saved.orig_rax in NR_CLOCK_NANOSLEEP_I386
                assert stub32.resume_point(saved) == (saved.rip - 2, 0)
            else:
                assert saved.orig_rax == SIGN_EXTENDED_MINUS_ONE and stub32.resume_point(saved) == (
                    saved.rip,
                    saved.rax,
                )
            assert inject(NR_GETPID_I386) == pid
            addr = inject.mmap(0, PAGE, remote.PROT_READ, remote.MAP_PRIVATE | remote.MAP_ANONYMOUS)
            assert inject(inject.sys.munmap, addr, PAGE) == 0
        finally:
            inject.close()
    finally:
        world.release()
        mem.close()
    target32.check_healthy()


def test_injection_with_explicit_bitness(target32: Target32) -> None:
    """``bitness=32`` given explicitly picks the same stub; ``Injector.arch`` exposes the table."""
    pid = target32.pid
    with Memory(pid) as mem:
        area = remote.find_stub_area(pid, read_maps(pid), mem)
        with remote.injection(pid, mem, area, [], bitness=32) as inject:
            assert inject.arch is remote.ARCHES[32]
            assert inject(NR_GETPID_I386) == pid
    target32.check_healthy()


# Injects one mmap2 into thread ARGV[2] of PID ARGV[1] and SIGKILLs itself right after the first call of
# hotpatch.process.ptrace.ARGV[3]: set_regs (the thread points at the stub, not yet resumed) or syscall (it was
# resumed into the call). Prints the stub address first.
KILL_SCRIPT = (
    """\
import os, signal, sys
from hotpatch.process import ptrace, remote
from hotpatch.process.maps import read_maps
from hotpatch.process.memory import Memory
from hotpatch.process.threads import World
pid, tid, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
original = getattr(ptrace, where)
def then_die(*args, **kwargs):
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(ptrace, where, then_die)
"""
    + INJECTOR_SETUP
    + """\
inject.mmap(0, 4096, remote.PROT_READ, remote.MAP_PRIVATE | remote.MAP_ANONYMOUS)
print("not killed", flush=True)
"""
)


@pytest.mark.parametrize("where", ["set_regs", "syscall"])
@pytest.mark.parametrize("role", ["main", "sleeper", "worker"])
def test_sigkill_of_tool_mid_injection(tmp_path: Path, procs: Procs, target32: Target32, role: str, where: str) -> None:
    """The tool dies with the thread redirected to the stub (before or after it was resumed into the call):
    the kernel detaches it and it runs through ``int $0x80`` and the stub back to where it was, restarting
    the call it was interrupted in (read, nanosleep) or going on in user code. The stub left behind counts as
    free room for the next injection."""
    script = tmp_path / "kill_injector.py"
    script.write_text(KILL_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(remote.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    tool = procs.start(sys.executable, script, str(target32.pid), str(target32.tids[role][0]), where, env=env)
    out, err = tool.communicate(timeout=30)
    assert tool.returncode == -signal.SIGKILL, (out, err)
    area = int(out.split()[0], 16)
    deadline = time.monotonic() + 5
    while tracer_of(target32.pid, target32.tids[role][0]) and time.monotonic() < deadline:
        time.sleep(0.01)
    target32.check_healthy()
    with Memory(target32.pid) as mem:
        assert mem.read(area, len(stub32.SIGNATURE)) == stub32.SIGNATURE  # the stub the thread ran through
        assert remote.find_stub_area(target32.pid, read_maps(target32.pid), mem) == area


# -- the loader on -m32 patches -------------------------------------------------------------------------------

PIC_PATCH = """
#include <hotpatch.h>
#include <stdio.h>
extern int counter;
static int table[3] = {1, 2, 3};
int *table_ptr = &table[2];                         /* R_386_RELATIVE, implicit addend: &table[2] */
char *counter_bytes = (char *)&counter + 2;         /* R_386_32 counter, implicit addend 2 */
int (*printer)(const char *, ...) = printf;         /* R_386_32 printf */
int compute(int x);
int compute(int x) {                                /* GLOB_DAT counter, table_ptr; HOTPATCH_ORIGINAL slot */
    return HOTPATCH_ORIGINAL(compute)(x) + counter + *table_ptr + (printer != 0);
}
"""
NOPIC_PATCH = """
extern int counter;
extern int getpid(void);
int compute(int x);
int compute(int x) { return x + counter + getpid(); }   /* non-PIC: R_386_32 counter, R_386_PC32 getpid */
"""


@dataclass
class Mapped:
    """A patch loaded into the target: the file, its layout, the region and the relocated image."""

    patch: PatchFile
    layout: Layout
    region: int
    image: bytes
    protections: list[tuple[int, int, int]]


def _load_into(target: Target32, exe: Path, patch_path: Path, trampoline_at: int | None = None) -> Mapped:
    """Map, relocate and write ``patch_path`` into ``target`` the way ``apply`` does: a region near the module
    (MAP_FIXED_NOREPLACE through the injector), relocation in the tool, mprotect of the data pages, one
    write through /proc/PID/mem. Returns what was written."""
    pf = PatchFile(str(patch_path))
    assert (pf.arch, pf.bitness, pf.manifest.arch) == ("i386", 32, "i386")
    pid = target.pid
    maps = read_maps(pid)
    modules = ModuleSet(pid, maps)
    mem = Memory(pid)
    try:
        module = modules.find(pf.manifest.build_id, pf.manifest.file)
        assert module.path == os.readlink(f"/proc/{pid}/exe") == str(exe)
        layout = Layout.of(pf, trampoline.MAX_TRAMPOLINE)
        top = remote.arch_of(pid).user_top
        candidates = [
            c for c in gap_candidates(maps, [module.start, module.end], layout.size) if c + layout.size <= top
        ]
        assert candidates
        area = remote.find_stub_area(pid, maps, mem)
        rx = remote.PROT_READ | remote.PROT_EXEC
        with remote.injection(pid, mem, area, []) as inject:
            region = remote.mmap_fixed(inject, candidates[0], layout.size, rx)

            def read_word(addr: int) -> int:
                return int.from_bytes(mem.read(addr, 4), "little")

            originals = {"compute": trampoline_at if trampoline_at is not None else region + layout.span}
            img = load(pf, layout, region, lambda name: modules.resolve(name, module, read_word), originals)
            for addr, size, prot in img.protections:
                if prot != rx:
                    inject(inject.sys.mprotect, addr, size, prot)
        mem.write(region, img.image)
        assert mem.read(region, len(img.image)) == img.image
        return Mapped(pf, layout, region, img.image, img.protections)
    finally:
        mem.close()
        modules.close()


def _word(m: Mapped, link_addr: int) -> int:
    return int.from_bytes(m.image[link_addr - m.layout.min_vaddr :][:4], "little")


def _pyelf_relocations(path: Path) -> list[tuple[int, int, str]]:
    """(offset, type, symbol) of every dynamic relocation, read by pyelftools."""
    out = []
    for ref in _pyelf(path):
        dynsym = ref.get_section_by_name(".dynsym")
        for sec in ref.iter_sections():
            if sec["sh_type"] == "SHT_REL" and sec["sh_flags"] & 2:
                for r in sec.iter_relocations():
                    name = dynsym.get_symbol(r["r_info_sym"]).name if r["r_info_sym"] else ""
                    out.append((r["r_offset"], r["r_info_type"], name))
    return out


def test_build_and_load_pic_patch(tmp_path: Path, target32: Target32, threads32: Path) -> None:
    """A -fPIC patch for the i386 target: built with -m32 (manifest arch i386, site analysed as 32-bit code),
    mapped near the executable, relocated: R_386_RELATIVE = B + A (A read from the place), R_386_32 = S + A,
    GLOB_DAT = S, the HOTPATCH_ORIGINAL slot = the trampoline; every S checked against the address the
    target printed itself. Every other byte is the file's. The target runs on."""
    src = tmp_path / "fix.c"
    src.write_text(PIC_PATCH)
    out = tmp_path / "fix.hp"
    res = patchbuild.build([str(src)], str(threads32), str(out), version=3)
    assert res.manifest.arch == "i386" and [f.symbol for f in res.manifest.functions] == ["compute"]
    fn = res.manifest.functions[0]
    if fn.klass == "ordinary":  # the jump overwrites mov eax,[esp+4]; lea eax,[eax+eax*2+1]
        assert fn.lengths == (4, 4) and not fn.position_dependent
    with open(out, "rb") as f:
        assert ELFFile(f).elfclass == 32
    tramp = 0x5000_1234
    m = _load_into(target32, threads32, out, tramp)
    pf = m.patch
    base = m.region - m.layout.min_vaddr
    rels = _pyelf_relocations(out)
    assert {t for _, t, _ in rels} == {1, 6, 8}, rels
    seen = set()
    lo, hi = pf.original_slots
    for offset, rtype, name in rels:
        word = _word(m, offset)
        if lo <= offset < hi:
            assert word == tramp
            seen.add("original")
        elif rtype == 8:
            table = pf.image.read_vaddr(offset, 4)  # the implicit addend in the file: &table[2] at link time
            assert word == base + int.from_bytes(table, "little")
            seen.add("relative")
        elif name == "counter":
            want = target32.addrs["counter"] + (2 if rtype == 1 else 0)
            assert word == want, (hex(word), hex(want), rtype)
            seen.add(f"counter{rtype}")
        elif name == "printf":
            assert word == target32.addrs["printf"]
            seen.add("printf")
        elif name in pf.symbols:  # the patch's own symbols (table_ptr, compute) bind to the patch
            assert word == base + pf.symbols[name].value, name
            seen.add(f"own{rtype}")
    assert {"original", "relative", "counter1", "counter6", "printf"} <= seen, seen
    relocated = {off - m.layout.min_vaddr + i for off, _, _ in rels for i in range(4)}
    for seg in pf.segments:
        for i, byte in enumerate(seg.data):
            at = seg.vaddr - m.layout.min_vaddr + i
            if at not in relocated:
                assert m.image[at] == byte
    assert {_maps_line(target32.pid, a).split()[1] for a, _, _ in m.protections} == {"r-xp", "rw-p"}
    target32.check_healthy()


def test_load_nopic_patch_with_pc32(tmp_path: Path, target32: Target32, threads32: Path) -> None:
    """A non-PIC patch (``-fno-pic -fplt``): its text carries R_386_PC32 against getpid (S + A - P) and
    R_386_32 against counter. Decoded at its runtime address, the relocated ``call`` reaches the target's
    getpid and the ``counter`` operand is the target's counter."""
    src = tmp_path / "nopic.c"
    src.write_text(NOPIC_PATCH)
    out = tmp_path / "nopic.hp"
    patchbuild.build([str(src)], str(threads32), str(out), extra_flags=["-fno-pic", "-fplt"])
    rels = _pyelf_relocations(out)
    assert (2, "getpid") in {(t, n) for _, t, n in rels}, rels
    m = _load_into(target32, threads32, out)
    fn = m.patch.symbols["compute"]
    at = m.region - m.layout.min_vaddr + fn.value
    code = m.image[fn.value - m.layout.min_vaddr :][: fn.size]
    ins = list(iced.Decoder(32, code, ip=at))
    calls = [i for i in ins if i.mnemonic == iced.Mnemonic.CALL]
    assert [c.near_branch_target for c in calls] == [target32.addrs["getpid"]]
    mems = [
        i.memory_displacement
        for i in ins
        if i.op_count > 1
        and i.memory_base == iced.Register.NONE
        and any(i.op_kind(k) == iced.OpKind.MEMORY for k in range(i.op_count))
    ]
    assert target32.addrs["counter"] in mems
    with Memory(target32.pid) as mem:
        assert mem.read(at, len(code)) == code
    target32.check_healthy()


def test_bundle_rejects_mismatched_arch(tmp_path: Path, threads32: Path) -> None:
    """A patch whose manifest says x86_64 but whose object is i386 ELF32 is refused naming both."""
    src = tmp_path / "fix.c"
    src.write_text(NOPIC_PATCH.replace("getpid()", "1"))
    out = tmp_path / "fix.hp"
    patchbuild.build([str(src)], str(threads32), str(out))
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(PatchFile(str(out)).manifest._replace(arch="x86_64").to_json())
    bad = tmp_path / "bad.hp"
    subprocess.run(["objcopy", "--update-section", f"{SECTION}={manifest}", str(out), str(bad)], check=True)
    with pytest.raises(PatchFileError, match=r"bad.hp is a patch for i386 \(ELF32\), not for x86_64"):
        PatchFile(str(bad))

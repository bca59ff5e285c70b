"""The in-target commit program: code changes made by a thread of the target itself, with the self-loop.

Protocols A and R (DESIGN.md §4) change code while every other thread runs. Done from outside with ``int3``,
a ``CC`` still armed when the tool is SIGKILLed becomes a real SIGTRAP that kills the target (DESIGN.md §5,
"int3 and tracer death"). So the stores are made from inside: one thread of the target is pointed at this
program, which needs no tracer to finish; if the tool dies at any point after that, it still ends and puts the
thread back where it was. It is the handler-free "self-loop" variant of the research (§0 C.3, after HotSpot):

1. block every signal (``rt_sigprocmask``); make sure ``membarrier(PRIVATE_EXPEDITED_SYNC_CORE)`` works
   (registering once per process on ``EPERM``, research §1.6); ``mprotect`` the pages of the changes
   writable, keeping their other bits (code read+write+execute, a read-only GOT or vtable read+write: no
   data page is ever made executable, and a page writable already is left alone);
2. store ``EB FE`` (``jmp $``) over the first two bytes of every *key* (the instruction threads enter a
   change through) with bytes behind its first word to change (:func:`needs_loop`), each with one 2-byte
   store inside one cache line (data-atomic: Intel SDM Vol. 3A §9.1.1); sync. A thread that reaches such a
   key now spins there; none can enter the bytes behind it;
3. protocol R only: publish ``ARMED`` and wait for the tool's go (``COMMIT`` or ``ABORT``), at most
   ``wait_s`` seconds (then ``ABORT``: a dead tool never leaves the self-loops behind);
4. COMMIT: store every other new byte (the tail of the key, the padding's ``E9 rel32``) and every data word
   (a vtable slot: one aligned store each), sync, store each key's new first word, sync. ABORT: store each
   self-loop's old first word, sync (nothing else was written);
5. put the page protections back, the signal mask back, publish the outcome, and reload every register of
   the interrupted thread and jump back to it (:func:`hotpatch.x86.stub.build`'s restore code).

The data page (``DATA_SIZE`` bytes used) is laid out at the ``D_*`` offsets; the tool polls ``D_STATE`` and
writes ``D_GO`` through ``/proc/PID/mem``. Syscall numbers: ``arch/x86/entry/syscalls/syscall_64.tbl``;
encodings: Intel SDM Vol. 2.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from . import stub, stub32

PAGE = 4096
SELF_LOOP = b"\xeb\xfe"  # jmp $ (rel8 -2)
CACHE_LINE = 64

SIG_SETMASK = 2
CLOCK_MONOTONIC = 1
MEMBARRIER_SYNC_CORE = 1 << 5  # include/uapi/linux/membarrier.h
MEMBARRIER_REGISTER_SYNC_CORE = 1 << 6
EPERM = 1
PROT_WRITE = 2
NAP_NS = 50_000  # the wait loop's sleep between two looks at D_GO

# data page
D_STATE, D_GO, D_ERR, D_ALL, D_OLDMASK, D_NAP, D_START, D_NOW, D_MAGIC = 0, 4, 8, 16, 24, 32, 48, 64, 80
DATA_SIZE = 88
MAGIC = b"HPCOMMIT"  # at D_MAGIC: how another hotpatch finds a program a killed tool left (livecommit)
RUNNING, ARMED, DONE, ABORTED, FAILED, ABANDONED = 0, 1, 2, 3, 4, 5  # D_STATE values (ABANDONED: never ran)
FINAL = frozenset({DONE, ABORTED, FAILED, ABANDONED})
GO_COMMIT, GO_ABORT = 1, 2  # D_GO values

_REG = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7}
_REG.update({f"r{i}": i for i in range(8, 16)})


class Edit(NamedTuple):
    """One change: ``old`` bytes at ``address`` become ``new``; ``key`` (>= address, with at least two bytes
    of the change from it) is where threads enter. A ``word`` edit changes data, not code: ``new`` is one
    aligned word (8 bytes, 4 in i386 code: a vtable slot) stored with one data-atomic store (Intel SDM
    Vol. 3A §9.1.1), so a thread loading it sees the old or the new value; it has no key and no self-loop."""

    address: int
    old: bytes
    new: bytes
    key: int
    word: bool = False


def key_fits(key: int) -> bool:
    """True when a 2-byte store at ``key`` stays in one cache line (so it is one atomic data store)."""
    return key % CACHE_LINE != CACHE_LINE - 1


def needs_loop(e: Edit) -> bool:
    """True when bytes after the key's first word change: the key then spins on ``EB FE`` while they are
    written. A change of the first word alone (a short jump; the padding before it is never executed) is one
    store, so no self-loop: a thread standing between two 1-byte NOPs at ``key + 1`` must meet the short
    jump's harmless displacement (``F9`` stc, ``F5`` cmc, DESIGN.md §4), never ``FE``."""
    if e.word:
        return False
    k = e.key - e.address
    return e.old[k + 2 :] != e.new[k + 2 :]


def pages_of(edits: Sequence[Edit]) -> list[int]:
    """The sorted page addresses the ``edits`` touch."""
    out: set[int] = set()
    for e in edits:
        out.update(range(e.address & ~(PAGE - 1), e.address + len(e.new), PAGE))
    return sorted(out)


class _Sys(NamedTuple):
    """System call numbers and conventions of one bitness."""

    mprotect: int
    sigprocmask: int
    nanosleep: int
    clock_gettime: int
    membarrier: int
    args: tuple[str, ...]  # registers of arguments 1-4
    insn: bytes  # the system call instruction


_SYS = {
    64: _Sys(10, 14, 35, 228, 324, ("rdi", "rsi", "rdx", "r10"), b"\x0f\x05"),  # syscall_64.tbl; syscall
    32: _Sys(125, 175, 162, 265, 375, ("rbx", "rcx", "rdx", "rsi"), b"\xcd\x80"),  # syscall_32.tbl; int $0x80
}
# registers the program keeps across system calls: the error, the outcome, a scratch one
_ERR, _OUT, _TMP = {64: "r12", 32: "rdi"}, {64: "rbx", 32: "rbp"}, {64: "rbx", 32: "rcx"}


class _Asm:
    """A few x86 instructions of ``bitness``-bit code (64, or 32 for i386) with forward labels (rel32 jumps).
    Register names are the 64-bit ones; in 32-bit code they mean their low halves."""

    def __init__(self, bitness: int) -> None:
        self.bitness = bitness
        self.sys = _SYS[bitness]
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def emit(self, data: bytes) -> None:
        self.code += data

    def wide(self, data: bytes) -> None:
        """Emit ``data``, with REX.W first in 64-bit code (a 64-bit operand; 32-bit in i386 code)."""
        self.emit((b"\x48" if self.bitness == 64 else b"") + data)

    def mov(self, reg: str, value: int) -> None:
        n = _REG[reg]
        if self.bitness == 32:  # MOV r32, imm32: B8+rd id
            self.emit(bytes([0xB8 + n]) + struct.pack("<I", value & 0xFFFF_FFFF))
        else:  # MOV r64, imm64: REX.W(+B) B8+r io
            self.emit(bytes([0x49 if n >= 8 else 0x48, 0xB8 + (n & 7)]) + struct.pack("<Q", value & (2**64 - 1)))

    def syscall(self, nr: int, *args: int) -> None:
        for reg, value in zip(self.sys.args, args, strict=False):
            self.mov(reg, value)
        self.mov("rax", nr)
        self.emit(self.sys.insn)

    def store16(self, addr: int, value: bytes) -> None:
        self.mov("rax", addr)
        self.emit(b"\x66\xc7\x00" + value)  # mov word [rax], imm16

    def store8(self, addr: int, value: int) -> None:
        self.mov("rax", addr)
        self.emit(bytes([0xC6, 0x00, value]))  # mov byte [rax], imm8

    def store_word(self, addr: int, value: bytes) -> None:
        """One aligned store of ``value`` (8 bytes in 64-bit code, 4 in 32-bit code) at ``addr``."""
        self.mov("rax", addr)
        if self.bitness == 32:
            self.emit(b"\xc7\x00" + value)  # mov dword [eax], imm32
            return
        self.mov("rcx", int.from_bytes(value, "little"))  # (rcx: clobbered by every syscall anyway)
        self.emit(b"\x48\x89\x08")  # mov [rax], rcx

    def store_reg32(self, addr: int, reg: str) -> None:
        """mov dword [addr], reg (its low 32 bits)."""
        self.mov("rax", addr)
        n = _REG[reg]
        self.emit((b"\x44" if n >= 8 else b"") + bytes([0x89, (n & 7) << 3]))  # mov [rax], r32

    def error_from_rax(self) -> None:
        """mov err, rax: 89 /r with rax in ModRM.reg (REX.W, and REX.B for r8-r15, in 64-bit code)."""
        n = _REG[_ERR[self.bitness]]
        rex = bytes([0x48 | (n >> 3)]) if self.bitness == 64 else b""
        self.emit(rex + bytes([0x89, 0xC0 | (n & 7)]))

    def jump(self, opcode: bytes, label: str) -> None:
        self.emit(opcode)
        self.fixups.append((len(self.code), label))
        self.emit(b"\0\0\0\0")

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def done(self) -> bytes:
        for at, name in self.fixups:
            self.code[at : at + 4] = struct.pack("<i", self.labels[name] - (at + 4))
        return bytes(self.code)


JMP, JE, JNE, JS, JGE = b"\xe9", b"\x0f\x84", b"\x0f\x85", b"\x0f\x88", b"\x0f\x8d"


def _sync(a: _Asm) -> None:
    a.syscall(a.sys.membarrier, MEMBARRIER_SYNC_CORE, 0, 0)


def _first_words(a: _Asm, edits: Sequence[Edit], new: bool, outcome: int) -> None:
    """Store each key's new (or old) first word, sync, and go to the end with ``outcome``."""
    for e in edits:
        if e.word:
            continue
        k = e.key - e.address
        a.store16(e.key, (e.new if new else e.old)[k : k + 2])
    _sync(a)
    a.mov(_OUT[a.bitness], outcome)
    a.jump(JMP, "unprotect")


def _wait_for_go(a: _Asm, data: int, wait_s: int) -> None:
    """Protocol R: publish ARMED, then poll D_GO every NAP_NS until COMMIT (go to ``commit``), ABORT or
    ``wait_s`` seconds of CLOCK_MONOTONIC (go to ``abort``). The timespecs are the bitness's own
    (``struct timespec``: two longs)."""
    a.mov("rax", data + D_STATE)
    a.emit(b"\xc7\x00" + struct.pack("<I", ARMED))  # mov dword [rax], ARMED
    a.syscall(a.sys.clock_gettime, CLOCK_MONOTONIC, data + D_START)
    a.label("wait")
    a.mov("rax", data + D_GO)
    a.emit(b"\x8b\x00")  # mov eax, [rax]
    a.emit(bytes([0x83, 0xF8, GO_COMMIT]))  # cmp eax, imm8
    a.jump(JE, "commit")
    a.emit(bytes([0x83, 0xF8, GO_ABORT]))
    a.jump(JE, "abort")
    a.syscall(a.sys.nanosleep, data + D_NAP, 0)
    a.syscall(a.sys.clock_gettime, CLOCK_MONOTONIC, data + D_NOW)
    a.mov("rax", data + D_NOW)
    a.wide(b"\x8b\x00")  # mov rax, [rax]: tv_sec
    tmp = _REG[_TMP[a.bitness]]
    a.mov(_TMP[a.bitness], data + D_START)
    a.wide(bytes([0x2B, tmp]))  # sub rax, [tmp] (ModRM mod 00, reg rax, rm tmp: rbx or ecx, never rsp/rbp)
    a.wide(b"\x3d" + struct.pack("<i", wait_s))  # cmp rax, imm32
    a.jump(JGE, "abort")
    a.jump(JMP, "wait")


def build(
    area: int,
    edits: Sequence[Edit],
    prot: dict[int, int],
    resume: stub.Registers,
    wait_s: int | None,
    bitness: int = 64,
) -> bytes:
    """The program (< PAGE bytes for up to ~40 edits) for ``bitness``-bit code (64, or 32 for an i386
    target) at ``area``, with its data page at ``area + PAGE``.

    ``prot``: the protection (``PROT_*`` bits) to put back on each page of :func:`pages_of`; ``resume``: the
    registers the thread goes back to (syscall restart already applied, ``orig_rax`` = -1); ``wait_s``: None
    for protocol A, else protocol R's longest wait for the tool's go in seconds. Word edits are stored after the
    other bytes and before the keys' first words. Raises ValueError for a key whose 2-byte store would cross a
    cache line or with fewer than two bytes of its change after it, or a word edit that is not one aligned
    word.
    """
    for e in edits:
        k = e.key - e.address
        if e.word:
            if len(e.new) != bitness // 8 or e.address % len(e.new):
                raise ValueError(f"no aligned {bitness // 8}-byte store possible at {e.address:#x}")
        elif not key_fits(e.key) or not 0 <= k <= len(e.new) - 2:
            raise ValueError(f"no atomic 2-byte store possible at {e.key:#x}")
    data = area + PAGE
    a = _Asm(bitness)
    err, out = _ERR[bitness], _OUT[bitness]
    a.mov(err, 0)
    a.syscall(a.sys.sigprocmask, SIG_SETMASK, data + D_ALL, data + D_OLDMASK, 8)
    _sync(a)
    a.wide(b"\x83\xf8" + bytes([(-EPERM) & 0xFF]))  # cmp rax, -EPERM
    a.jump(JNE, "synced")
    a.syscall(a.sys.membarrier, MEMBARRIER_REGISTER_SYNC_CORE, 0, 0)
    _sync(a)
    a.label("synced")
    a.wide(b"\x85\xc0")  # test rax, rax
    a.jump(JS, "failed_early")
    for page, p in prot.items():
        if p & PROT_WRITE:
            continue  # writable data (a lazily bound GOT): nothing to change, nothing to put back
        a.syscall(a.sys.mprotect, page, PAGE, p | PROT_WRITE)
        a.wide(b"\x85\xc0")
        a.jump(JS, "failed")
    looped = [e for e in edits if needs_loop(e)]
    for e in looped:
        a.store16(e.key, SELF_LOOP)
    _sync(a)
    if wait_s is not None:
        _wait_for_go(a, data, wait_s)
    a.label("commit")
    for e in edits:
        if e.word:
            continue
        k = e.key - e.address
        for i, (old, new) in enumerate(zip(e.old, e.new, strict=True)):
            if old != new and not k <= i < k + 2:
                a.store8(e.address + i, new)
    for e in edits:
        if e.word:
            a.store_word(e.address, e.new)
    _sync(a)
    _first_words(a, edits, new=True, outcome=DONE)
    a.label("abort")
    _first_words(a, looped, new=False, outcome=ABORTED)
    a.label("failed")
    a.error_from_rax()
    a.mov(out, FAILED)
    a.label("unprotect")
    for page, p in prot.items():
        if p & PROT_WRITE:
            continue
        a.syscall(a.sys.mprotect, page, PAGE, p)
    a.jump(JMP, "out")
    a.label("failed_early")
    a.error_from_rax()
    a.mov(out, FAILED)
    a.label("out")
    a.syscall(a.sys.sigprocmask, SIG_SETMASK, data + D_OLDMASK, 0, 8)
    a.store_reg32(data + D_ERR, err)
    a.store_reg32(data + D_STATE, out)  # the outcome, published last
    if bitness == 64:
        a.mov("rsp", resume.rsp)
        a.emit(stub.build(resume)[len(stub.SYSCALL) :])
    else:
        a.emit(b"\xbc" + struct.pack("<I", resume.rsp & 0xFFFF_FFFF))  # mov esp, imm32
        here = area + len(a.code)
        a.emit(stub32.build(resume, here - len(stub32.INT80))[len(stub32.INT80) :])
    return a.done()


def data_page(bitness: int = 64) -> bytes:
    """The initial contents of the data page (``DATA_SIZE`` bytes) for ``bitness``-bit code: every signal in
    the mask to block, the nap's ``struct timespec`` (two ``long``)."""
    out = bytearray(DATA_SIZE)
    struct.pack_into("<Q", out, D_ALL, 2**64 - 1)
    struct.pack_into("<qq" if bitness == 64 else "<ii", out, D_NAP, 0, NAP_NS)
    out[D_MAGIC : D_MAGIC + len(MAGIC)] = MAGIC
    return bytes(out)

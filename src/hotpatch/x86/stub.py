"""The injection stub: a ``syscall`` followed by code that puts a thread back where it was, with no tracer.

hotpatch runs raw system calls in a stopped thread of the target (``mmap``, ``mprotect``, …). The thread's
RIP is pointed at this stub, the call's number and arguments are put in its registers, and the tracer follows
the call with ``PTRACE_SYSCALL``; normally it then puts the saved registers back itself and the rest of the
stub never runs. If the tool dies at any moment (SIGKILL), the kernel detaches the thread and it simply runs
on: through the ``syscall``, then the restore code, which reloads every general-purpose register and
``rflags`` from immediates and jumps back to the interrupted instruction. No trap flag, no ``int3``, no
return through the stack (so it also holds under a shadow stack; research §6).

A thread interrupted inside a restartable system call (``rax`` = -ERESTART*, research §4.3) resumes at
``rip - 2`` with ``rax`` = the call's number (``restart_syscall``, 219, for -ERESTART_RESTARTBLOCK), which is
what the kernel would have done (``arch/x86/kernel/signal.c``: ``arch_do_signal_or_restart``).

Encodings: Intel SDM Vol. 2 — ``REX.W B8+r io`` (MOV r64, imm64), ``68 id`` (PUSH imm32, sign-extended),
``9D`` (POPFQ), ``48 8D 64 24 disp8`` (LEA RSP, [RSP+disp8]), ``FF 25 00000000`` + 8-byte address (JMP
qword [RIP+0]), ``0F 05`` (SYSCALL).
"""

from __future__ import annotations

import struct
from typing import Protocol

SYSCALL = b"\x0f\x05"
NR_RESTART_SYSCALL = 219
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = -512, -513, -514, -516
# register -> (REX prefix, opcode) of MOV r64, imm64
_MOV_IMM64 = {
    "rax": (0x48, 0xB8), "rcx": (0x48, 0xB9), "rdx": (0x48, 0xBA), "rbx": (0x48, 0xBB),
    "rbp": (0x48, 0xBD), "rsi": (0x48, 0xBE), "rdi": (0x48, 0xBF),
    "r8": (0x49, 0xB8), "r9": (0x49, 0xB9), "r10": (0x49, 0xBA), "r11": (0x49, 0xBB),
    "r12": (0x49, 0xBC), "r13": (0x49, 0xBD), "r14": (0x49, 0xBE), "r15": (0x49, 0xBF),
}  # fmt: skip
SIGNATURE = SYSCALL + bytes([0x48, 0x8D, 0x64, 0x24, 0x80])  # how every stub starts
RED_ZONE = 128  # System V x86-64 psABI §3.2.2: below RSP, 128 bytes a leaf function may use
STUB_SIZE = 2 + 5 + 5 + 1 + 8 + 10 * len(_MOV_IMM64) + 14  # bytes


class Registers(Protocol):
    """The general-purpose registers of a stopped thread (``ptrace.Regs`` has this shape)."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rbp: int
    rsp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    eflags: int
    orig_rax: int


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def resume_point(regs: Registers) -> tuple[int, int]:
    """``(rip, rax)`` at which the interrupted thread must go on, applying the kernel's syscall restart."""
    rax = _signed(regs.rax)
    if _signed(regs.orig_rax) >= 0 and rax in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
        return regs.rip - 2, regs.orig_rax
    if _signed(regs.orig_rax) >= 0 and rax == ERESTART_RESTARTBLOCK:
        return regs.rip - 2, NR_RESTART_SYSCALL
    return regs.rip, regs.rax


def build(saved: Registers) -> bytes:
    """The stub (``STUB_SIZE`` bytes, position-independent) that returns a thread to the state ``saved``."""
    rip, rax = resume_point(saved)
    out = bytearray(SYSCALL)
    flags = saved.eflags & ~0x100 & 0xFFFF_FFFF  # never the trap flag
    out += bytes([0x48, 0x8D, 0x64, 0x24, 0x80])  # lea rsp, [rsp-128]: stay clear of the red zone
    out += b"\x68" + struct.pack("<I", flags & 0x7FFF_FFFF)  # push imm32 (rflags fits in 31 bits)
    out += b"\x9d"  # popfq: rsp back to rsp-128
    out += bytes([0x48, 0x8D, 0xA4, 0x24]) + struct.pack("<i", RED_ZONE)  # lea rsp, [rsp+128]
    values = {name: getattr(saved, name) for name in _MOV_IMM64}
    values["rax"] = rax
    for name, (rex, op) in _MOV_IMM64.items():
        out += bytes([rex, op]) + struct.pack("<Q", values[name] & 0xFFFF_FFFF_FFFF_FFFF)
    out += b"\xff\x25\x00\x00\x00\x00" + struct.pack("<Q", rip)  # jmp qword [rip+0]
    assert len(out) == STUB_SIZE, len(out)
    return bytes(out)

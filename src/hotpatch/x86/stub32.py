"""The i386 injection stub: ``int $0x80`` followed by code that puts a 32-bit thread back where it was.

The same design as :mod:`hotpatch.x86.stub`, for a thread running 32-bit code (an i386 process traced by the
64-bit tool): the tracer points EIP at this stub with the call's number and arguments in registers (i386
syscall ABI: ``eax`` = number, ``ebx``, ``ecx``, ``edx``, ``esi``, ``edi``, ``ebp`` = arguments 1–6, result
in ``eax``; ``arch/x86/entry/syscalls/syscall_32.tbl``, ``arch/x86/entry/entry_64_compat.S``) and follows
the call with ``PTRACE_SYSCALL``. If the tool dies at any moment, the thread runs on through ``int $0x80``,
then reloads ``eflags`` and every general-purpose register from immediates and jumps back to the interrupted
instruction with a relative jump. No trap flag, no ``int3``, no ``ret``. ``esp`` is never changed: the
``push``/``popfd`` pair that restores ``eflags`` leaves it as it was, and uses the 4 bytes below it, which
the i386 psABI gives no red zone to (a signal handler may overwrite them at any time).

A 64-bit tracer sees a 32-bit tracee through the x86-64 ``struct user_regs_struct``
(``arch/x86/include/asm/user_64.h``; ``PTRACE_GETREGS`` of a 64-bit tracer always uses it): ``rax`` holds
``eax`` and so on, ``cs`` is ``__USER32_CS`` (0x23, ``arch/x86/include/asm/segment.h``), and values the
kernel computed as ``long`` are sign-extended: a syscall interrupted by a signal shows ``rax`` =
``0xfffffffffffffe00`` (-ERESTARTSYS) and a thread outside any syscall ``orig_rax`` = ``0xffffffffffffffff``
(measured, see ``tests/test_i386.py``). This module therefore reads ``eax``/``orig_eax`` as the signed low
32 bits of ``rax``/``orig_rax``, which is right for either extension.

A thread interrupted inside a restartable system call (``eax`` = -ERESTART*) resumes at ``eip - 2`` (the
2-byte ``int $0x80``, ``CD 80``) with ``eax`` = its number, or ``restart_syscall`` (number 0 on i386) for
-ERESTART_RESTARTBLOCK: what the kernel does (``arch/x86/kernel/signal.c``, ``arch_do_signal_or_restart``;
``get_nr_restart_syscall`` gives ``__NR_ia32_restart_syscall`` to a compat task). A call made through the
vDSO's ``__kernel_vsyscall`` with ``sysenter`` is reported by the kernel as if it had been made with
``int $0x80`` at the vDSO's ``int80_landing_pad - 2`` (``arch/x86/entry/common.c``, ``do_fast_syscall_32``),
so the same rewind restarts it.

Encodings (Intel SDM Vol. 2, 32-bit operand size): ``CD 80`` (INT imm8), ``68 id`` (PUSH imm32), ``9D``
(POPFD), ``B8+rd id`` (MOV r32, imm32), ``E9 cd`` (JMP rel32; EIP wraps modulo 2**32, so every target is
in reach).
"""

from __future__ import annotations

import struct
from typing import Protocol

from .encode import jmp_rel32

INT80 = b"\xcd\x80"
NR_RESTART_SYSCALL = 0  # syscall_32.tbl: "0 i386 restart_syscall"
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = -512, -513, -514, -516
TRAP_FLAG = 0x100
MASK32 = 0xFFFF_FFFF
# register -> opcode of MOV r32, imm32 (B8+rd); esp is left alone (see the module docstring)
_MOV_IMM32 = {"rax": 0xB8, "rcx": 0xB9, "rdx": 0xBA, "rbx": 0xBB, "rbp": 0xBD, "rsi": 0xBE, "rdi": 0xBF}
SIGNATURE = INT80 + b"\x68"  # how every stub starts: int $0x80; push imm32
STUB_SIZE = len(INT80) + 5 + 1 + 5 * len(_MOV_IMM32) + 5  # 48 bytes


class Registers(Protocol):
    """The registers of a stopped 32-bit thread as a 64-bit tracer reads them (``ptrace.Regs`` has this
    shape): ``rax`` is ``eax`` and so on, possibly sign-extended (see the module docstring)."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rbp: int
    rip: int
    eflags: int
    orig_rax: int


def signed32(value: int) -> int:
    """The low 32 bits of ``value`` as a signed integer: ``eax`` from a zero- or sign-extended ``rax``."""
    low = value & MASK32
    return low - (1 << 32) if low >= 1 << 31 else low


def resume_point(regs: Registers) -> tuple[int, int]:
    """``(eip, eax)`` at which the interrupted 32-bit thread must go on, applying the kernel's syscall restart.

    Without a restart, ``(rip, rax)`` are returned unchanged (whatever their upper halves); with one,
    ``eip - 2`` and the call's number (or 0, ``restart_syscall``), both as unsigned 32-bit values.
    """
    eax, orig = signed32(regs.rax), signed32(regs.orig_rax)
    if orig >= 0 and eax in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
        return (regs.rip - len(INT80)) & MASK32, orig
    if orig >= 0 and eax == ERESTART_RESTARTBLOCK:
        return (regs.rip - len(INT80)) & MASK32, NR_RESTART_SYSCALL
    return regs.rip, regs.rax


def build(saved: Registers, address: int) -> bytes:
    """The stub (``STUB_SIZE`` bytes) placed at ``address`` that returns a thread to the state ``saved``.

    Position-dependent: its last instruction is a ``jmp rel32`` from ``address + STUB_SIZE - 5`` to the
    resume point. Raises nothing (every 32-bit target is in reach).
    """
    eip, eax = resume_point(saved)
    out = bytearray(INT80)
    out += b"\x68" + struct.pack("<I", saved.eflags & ~TRAP_FLAG & MASK32)  # push imm32: never the trap flag
    out += b"\x9d"  # popfd: esp back where it was
    values = {name: getattr(saved, name) for name in _MOV_IMM32}
    values["rax"] = eax
    for name, opcode in _MOV_IMM32.items():
        out += bytes([opcode]) + struct.pack("<I", values[name] & MASK32)
    out += jmp_rel32((address + len(out)) & MASK32, eip & MASK32, bitness=32)
    assert len(out) == STUB_SIZE, len(out)
    return bytes(out)

"""Unit tests of the x86 layer: prologue analysis (:mod:`hotpatch.x86.prologue`), trampolines
(:mod:`hotpatch.x86.trampoline`) and jump encoding (:mod:`hotpatch.x86.encode`). No process is needed: the
functions are byte strings placed at made-up addresses, and every trampoline is decoded back with iced-x86
to check that it computes the same absolute addresses as the original instructions.
"""

from __future__ import annotations

import iced_x86 as iced
import pytest

from hotpatch.errors import SiteError
from hotpatch.x86 import prologue, trampoline
from hotpatch.x86.encode import ENDBR64, jmp_rel32, rel32

ENTRY = 0x5555_5555_1000
GIB = 1 << 30


def h(text: str) -> bytes:
    """Bytes from a hex string with spaces."""
    return bytes.fromhex(text.replace(" ", ""))


def decode(code: bytes, ip: int) -> list[iced.Instruction]:
    """Every instruction of ``code`` placed at ``ip``."""
    return list(iced.Decoder(64, code, ip=ip))


def build_at(code: bytes, where: int, entry: int = ENTRY) -> tuple[prologue.Prologue, trampoline.Trampoline]:
    """Analyse ``code`` at ``entry`` and build its trampoline at ``where``."""
    pro = prologue.analyze("fn", entry, code)
    return pro, trampoline.build(pro, where)


# -- prologue: refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [h("c3"), h("31 c0 c3"), h("48 8d 47 01")],
    ids=["ret", "xor-ret", "4-bytes"],
)
def test_too_short_is_refused(code: bytes) -> None:
    """A function shorter than the 5-byte jump is refused with its name, its length and the reason."""
    with pytest.raises(SiteError) as exc:
        prologue.analyze("tiny", ENTRY, code)
    msg = str(exc.value)
    assert "tiny" in msg and f"{len(code)} bytes" in msg and "too short" in msg
    assert "\n" not in msg


def test_too_short_after_endbr64_is_refused() -> None:
    """After ``endbr64`` the jump needs 5 more bytes: 4 + 3 bytes is too short, and the message says why."""
    with pytest.raises(SiteError, match=r"tiny is 7 bytes long, too short .* after endbr64"):
        prologue.analyze("tiny", ENTRY, ENDBR64 + h("31 c0 c3"))


def test_exactly_five_bytes_is_accepted() -> None:
    """``lea rax,[rdi+1]; ret`` (4 + 1 bytes) is exactly long enough; both instructions are overwritten."""
    pro = prologue.analyze("inc", ENTRY, h("48 8d 47 01 c3"))
    assert (pro.site, pro.length, pro.original) == (ENTRY, 5, h("48 8d 47 01 c3"))
    assert [str(i) for i in pro.instructions] == ["lea rax,[rdi+1]", "ret"]


@pytest.mark.parametrize(
    ("code", "call_at"),
    [
        (h("e8 00 00 00 00 c3"), 0),  # call rel32 at the entry
        (h("55 ff d0 5d c3 90"), 1),  # push rbp; call rax
        (h("53 48 89 fb ff 15 00 00 00 00 5b c3"), 4),  # call [rip+0] starting inside the first 5 bytes
    ],
    ids=["call-rel32", "call-reg", "call-mem-at-4"],
)
def test_call_in_first_five_bytes_is_refused(code: bytes, call_at: int) -> None:
    """A call among the overwritten instructions is refused, naming the function and the call's address."""
    with pytest.raises(SiteError) as exc:
        prologue.analyze("caller", ENTRY, code)
    msg = str(exc.value)
    assert msg.startswith("caller: a call at") and f"{ENTRY + call_at:#x}" in msg and "first 5 bytes" in msg


def test_call_after_endbr64_site_is_refused() -> None:
    """The call check applies from the site after ``endbr64``."""
    with pytest.raises(SiteError, match=f"a call at {ENTRY + 4:#x}"):
        prologue.analyze("caller", ENTRY, ENDBR64 + h("e8 00 00 00 00 c3"))


def test_call_after_first_five_bytes_is_accepted() -> None:
    """push rbp; mov rbp,rsp; push rbx (5 bytes) then a call: the call is not overwritten, so it is fine."""
    code = h("55 48 89 e5 53 e8 00 00 00 00 5b 5d c3")
    pro = prologue.analyze("fn", ENTRY, code)
    assert pro.length == 5 and len(pro.instructions) == 3


# push rbp (0); mov rbp,rsp (1); push rbx (4); test edi,edi (5); jne rel8 (7, ends at 9); pop; pop; ret
LOOPY = "55 48 89 e5 53 85 ff 75 {rel:02x} 5b 5d c3"


@pytest.mark.parametrize("target_off", [1, 4])
def test_branch_target_inside_first_five_bytes_is_refused(target_off: int) -> None:
    """A direct branch anywhere in the function that lands strictly inside the overwritten bytes is refused,
    and the message names the branch, its target and the overwritten length."""
    code = h(LOOPY.format(rel=(target_off - 9) & 0xFF))
    with pytest.raises(SiteError) as exc:
        prologue.analyze("loopy", ENTRY, code)
    msg = str(exc.value)
    assert msg.startswith("loopy: the instruction at") and f"{ENTRY + 7:#x}" in msg
    assert f"branches to {ENTRY + target_off:#x}" in msg and "inside the 5 bytes" in msg


@pytest.mark.parametrize("target_off", [0, 5])
def test_branch_to_site_or_past_overwritten_bytes_is_accepted(target_off: int) -> None:
    """A branch to the site itself, or to the first byte after the overwritten instructions, is safe."""
    code = h(LOOPY.format(rel=(target_off - 9) & 0xFF))
    assert prologue.analyze("loopy", ENTRY, code).length == 5


def test_call_target_inside_first_five_bytes_is_refused() -> None:
    """A direct call (recursion into the middle of the prologue) counts as a branch target too."""
    # push rbp; mov rbp,rsp; push rbx; call entry+2 (at 5, ends at 10); pop rbx; pop rbp; ret
    code = h("55 48 89 e5 53 e8 f8 ff ff ff 5b 5d c3")
    with pytest.raises(SiteError, match=f"branches to {ENTRY + 2:#x}"):
        prologue.analyze("rec", ENTRY, code)


def test_branch_target_inside_after_endbr64() -> None:
    """With ``endbr64`` the forbidden range is ``[entry+4, entry+4+length)``: a branch to the entry is a
    tail call and fine; one to entry+4 (a loop head just after endbr64, which would enter the replacement in
    the middle of the function — accepted before issue 3) or entry+5 is refused."""
    # endbr64 (0); push rbp (4); mov rbp,rsp (5); push rbx (8); test edi,edi (9); jne rel8 (11, ends at 13)
    base = "f3 0f 1e fa 55 48 89 e5 53 85 ff 75 {rel:02x} 5b 5d c3"
    pro = prologue.analyze("f", ENTRY, h(base.format(rel=(0 - 13) & 0xFF)))
    assert pro.site == ENTRY + 4
    for target in (4, 5):
        with pytest.raises(SiteError, match=f"branches to {ENTRY + target:#x}"):
            prologue.analyze("f", ENTRY, h(base.format(rel=(target - 13) & 0xFF)))


def test_invalid_instruction_is_refused() -> None:
    """Bytes that do not decode in 64-bit mode (``push es``) are refused with their address."""
    with pytest.raises(SiteError, match=f"f: invalid instruction at {ENTRY:#x}"):
        prologue.analyze("f", ENTRY, h("06 90 90 90 90 c3"))


def test_instruction_cut_by_function_end_is_refused() -> None:
    """An overwritten instruction that runs past the function's last byte is refused, not silently used."""
    with pytest.raises(SiteError, match="f: "):
        prologue.analyze("f", ENTRY, h("90 48 8b 05 10 00"))


def test_xbegin_in_first_bytes_is_refused() -> None:
    """``xbegin`` (its abort path is relative to the instruction) is refused."""
    with pytest.raises(SiteError, match="transactional"):
        prologue.analyze("tx", ENTRY, h("c7 f8 00 00 00 00 c3"))


# -- prologue: endbr64 -------------------------------------------------------------------------------


def test_endbr64_site_is_after_it() -> None:
    """With ``endbr64`` first, the site is entry+4, the overwritten bytes exclude the endbr64 and the
    decoded instructions carry their real addresses."""
    code = ENDBR64 + h("48 8d 47 01 c3 cc cc")
    pro = prologue.analyze("f", ENTRY, code)
    assert pro.endbr
    assert (pro.entry, pro.site, pro.length) == (ENTRY, ENTRY + 4, 5)
    assert pro.original == h("48 8d 47 01 c3")
    assert [i.ip for i in pro.instructions] == [ENTRY + 4, ENTRY + 8]


def test_no_endbr64_site_is_entry() -> None:
    """Without ``endbr64`` the site is the entry; an ``endbr64`` later in the body does not count."""
    code = h("48 8d 47 01 c3") + ENDBR64
    pro = prologue.analyze("f", ENTRY, code)
    assert not pro.endbr and pro.site == ENTRY


def test_endbr64_trampoline_starts_with_endbr64() -> None:
    """The trampoline of an endbr64 site is itself a valid indirect-branch target (CET IBT): it starts with
    ``endbr64``; the site maps to the instruction after it, and the jump back goes to site+length."""
    where = ENTRY + 0x10_0000
    pro, tr = build_at(ENDBR64 + h("48 8d 47 01 c3 cc"), where)
    assert tr.address == where and tr.code.startswith(ENDBR64)
    insns = decode(tr.code, where)
    assert [str(i) for i in insns[1:3]] == ["lea rax,[rdi+1]", "ret"]
    assert tr.rip_map == {ENTRY + 4: where + 4, ENTRY + 8: where + 8, ENTRY + 9: where + 9}
    back = insns[-1]
    assert back.mnemonic == iced.Mnemonic.JMP and back.near_branch_target == pro.site + pro.length


# -- trampoline: relocation --------------------------------------------------------------------------


RIP_CASES = {
    # mov rax,[rip+0x10]; add rax,rdi; ret
    "mov-load": h("48 8b 05 10 00 00 00 48 01 f8 c3"),
    # lea rax,[rip-0x2000]; ret (negative displacement)
    "lea-neg": h("48 8d 05 00 e0 ff ff c3"),
    # cmp byte [rip+0x1234],0 : an immediate after the displacement changes the next-ip arithmetic
    "cmp-imm": h("80 3d 34 12 00 00 00 74 01 c3 c3"),
    # push rbx; mov eax,[rip+0x3ffffff0]: a second instruction; from 1 GiB below it needs 0x7ffffff0
    "second-insn": h("53 8b 05 f0 ff ff 3f 5b c3"),
    # movsd xmm0,[rip+0x40] (SSE, prefixes before the opcode)
    "sse": h("f2 0f 10 05 40 00 00 00 c3"),
}


@pytest.mark.parametrize("name", list(RIP_CASES))
@pytest.mark.parametrize("delta", [0x4000, -0x4000, GIB, -GIB], ids=["+16K", "-16K", "+1G", "-1G"])
def test_rip_relative_operand_keeps_its_absolute_address(name: str, delta: int) -> None:
    """Every RIP-relative memory operand in the overwritten bytes addresses the same absolute memory from
    the trampoline as from the original site (decoded with iced-x86), before or after the site."""
    code = RIP_CASES[name]
    where = ENTRY + delta
    pro, tr = build_at(code, where)
    orig = [i for i in pro.instructions if i.is_ip_rel_memory_operand]
    assert orig, "the case must have a RIP-relative operand in its first bytes"
    moved = [i for i in decode(tr.code, where) if i.is_ip_rel_memory_operand]
    assert [i.ip_rel_memory_address for i in moved] == [i.ip_rel_memory_address for i in orig]
    assert [i.mnemonic for i in moved] == [i.mnemonic for i in orig]
    assert all(i.ip != j.ip for i, j in zip(moved, orig, strict=True))


def test_rip_relative_out_of_reach_is_refused() -> None:
    """A RIP-relative operand that cannot reach its memory from the trampoline's place is a SiteError
    naming the instruction, not a silently wrong trampoline."""
    pro = prologue.analyze("far", ENTRY, RIP_CASES["mov-load"])
    with pytest.raises(SiteError, match=r"cannot relocate 'mov rax,\[.*\]' at " + f"{ENTRY:#x}"):
        trampoline.build(pro, ENTRY + 4 * GIB)


@pytest.mark.parametrize(
    ("code", "target_off"),
    [
        (h("85 ff 74 10 55 5d c3"), 0x14),  # test edi,edi; je short +0x10 (ends at 4); push rbp
        (h("85 ff 0f 85 00 01 00 00 c3"), 0x108),  # test; jne near +0x100
        (h("eb 10 90 90 90 90 90"), 0x12),  # jmp short +0x10 as the first instruction
        (h("e9 00 00 01 00 cc"), 0x10005),  # jmp rel32 (a tail call) as the first instruction
        (h("31 c0 e3 20 90 90 c3"), 0x24),  # xor eax,eax; jrcxz +0x20 (no near form exists)
    ],
    ids=["je-short", "jne-near", "jmp-short", "jmp-near", "jrcxz"],
)
@pytest.mark.parametrize("delta", [0x800, -0x800, GIB, -GIB], ids=["+2K", "-2K", "+1G", "-1G"])
def test_branch_keeps_its_target(code: bytes, target_off: int, delta: int) -> None:
    """A relative branch in the overwritten bytes still goes to the same absolute target from the
    trampoline (a short jcc grows to a near one as needed), and the jump back goes to site+length."""
    where = ENTRY + delta
    pro, tr = build_at(code, where)
    orig = [i for i in pro.instructions if i.flow_control != iced.FlowControl.NEXT]
    assert orig[0].near_branch_target == ENTRY + target_off
    insns = decode(tr.code, where)
    assert all(i.code != iced.Code.INVALID for i in insns)
    targets = {i.near_branch_target for i in insns if i.op0_kind in (iced.OpKind.NEAR_BRANCH64,)}
    assert ENTRY + target_off in targets
    assert insns[-1].mnemonic == iced.Mnemonic.JMP
    assert insns[-1].near_branch_target == pro.site + pro.length


def test_trampoline_executes_same_non_relative_bytes() -> None:
    """Instructions with no RIP-relative operand or branch are copied byte for byte."""
    code = h("55 48 89 e5 53 e8 00 00 00 00 5b 5d c3")
    _, tr = build_at(code, ENTRY + 0x1000)
    assert tr.code[:5] == code[:5]
    assert tr.code[5:] == jmp_rel32(ENTRY + 0x1000 + 5, ENTRY + 5)


# -- trampoline: rip_map -----------------------------------------------------------------------------


@pytest.mark.parametrize("endbr", [False, True], ids=["plain", "endbr64"])
def test_rip_map_covers_every_instruction_boundary(endbr: bool) -> None:
    """``rip_map`` maps every instruction boundary of ``[site, site+length]`` to the trampoline address of
    the same instruction (relocated instructions may change size), and the end to the jump back."""
    # test edi,edi; je short +0x10; mov rax,[rip+0x100]; ret   (covered: 2+2+7 = 11 bytes)
    body = h("85 ff 74 10 48 8b 05 00 01 00 00 c3")
    code = (ENDBR64 if endbr else b"") + body
    where = ENTRY + GIB
    pro, tr = build_at(code, where)
    assert pro.length == 11
    boundaries = [i.ip for i in pro.instructions] + [pro.site + pro.length]
    assert sorted(tr.rip_map) == boundaries
    insns = {i.ip: i for i in decode(tr.code, where)}
    for ins in pro.instructions:
        moved = insns[tr.rip_map[ins.ip]]  # the map points at an instruction start in the trampoline
        assert moved.mnemonic == ins.mnemonic
    values = [tr.rip_map[b] for b in boundaries]
    assert values == sorted(values) and values[0] == where + (4 if endbr else 0)
    back = insns[tr.rip_map[pro.site + pro.length]]
    assert back.mnemonic == iced.Mnemonic.JMP and back.near_branch_target == pro.site + pro.length
    assert tr.rip_map[pro.site + pro.length] + back.len == where + len(tr.code)
    # the short je (2 bytes) grew into a near one (6 bytes): the boundary after it moved accordingly
    assert tr.rip_map[pro.site + 4] - tr.rip_map[pro.site] == 2 + 6


def test_long_prologue_fits_reserved_slot() -> None:
    """A long prologue (endbr64; 4-byte insn; 11-byte RIP-relative compare with an immediate; jcc growing
    from 2 to 6 bytes) still fits in the MAX_TRAMPOLINE bytes reserved per site."""
    # endbr64; sub rsp,8 (4); cmp qword [rip+0x100],0x12345678 (11) -- covers 15 bytes
    code = ENDBR64 + h("48 83 ec 08 48 81 3d 00 01 00 00 78 56 34 12 74 02 c3 c3")
    pro, tr = build_at(code, ENTRY - GIB)
    assert pro.length == 15 and len(pro.instructions) == 2
    assert len(tr.code) == 4 + 15 + 5 <= trampoline.MAX_TRAMPOLINE


# -- encode ------------------------------------------------------------------------------------------


def test_jmp_rel32_seed_example() -> None:
    """Seed 001's worked example: a jump at 0x00476c79 to 0x12345678 is ``e9 fa e9 ec 11``."""
    assert jmp_rel32(0x00476C79, 0x12345678) == h("e9 fa e9 ec 11")


def test_rel32_reach() -> None:
    """The reach of rel32 is [-2 GiB, 2 GiB) from the end of the jump; beyond it is a SiteError."""
    assert rel32(ENTRY, ENTRY + 5 + (1 << 31) - 1) == (1 << 31) - 1
    assert rel32(ENTRY, ENTRY + 5 - (1 << 31)) == -(1 << 31)
    with pytest.raises(SiteError, match="beyond the ±2 GiB reach"):
        rel32(ENTRY, ENTRY + 5 + (1 << 31))
    with pytest.raises(SiteError, match="beyond the ±2 GiB reach"):
        jmp_rel32(ENTRY, ENTRY - 4 * GIB)

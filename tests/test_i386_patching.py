"""Patching i386 processes (``gcc -m32``) from the 64-bit tool, end to end, as seeds 001 and 002 describe.

``targets/protocols.c`` built with ``-m32`` has one function per i386 site class — ``ms_hook_prologue``
(``mov edi,edi`` after ``int3`` padding: class ms-x86), ``patchable_function_entry`` and ordinary ones —
called by 8 threads in tight loops that check every result is the old or the new value. The tests check the bytes in
memory against seed 001's encoding (``E9 rel32`` in the 5 bytes before the entry, ``EB F9`` over
``mov edi,edi``), and run apply/revert cycles with each protocol. Every process is real and reaped by the
``procs`` fixture, even on failure.
"""

from __future__ import annotations

import struct
import subprocess
import time
from pathlib import Path

import pytest

import hotpatch
from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.elf.image import open_elf
from hotpatch.errors import PatchFileError
from hotpatch.x86.encode import jmp_rel8, jmp_rel32
from test_protocols import check_alive, read_stats

CYCLES = {"no-stop": 200, "rolling": 100, "stop-the-world": 200}
WANT = {"no-stop": "A", "rolling": "R", "stop-the-world": "B"}
READY = "long f_ms(long x) { return x + 1001; }\nlong f_pfe(long x) { return x + 1002; }\n"
"""The i386 target's hotpatch-ready functions (its f_opp has no dead padding before it there: ordinary)."""


def build(tmp_path: Path, patch_src: str | None, name: str, *flags: str) -> tuple[Path, Path]:
    """The target (-m32 unless ``flags`` say otherwise; endbr32: -fcf-protection=full) and a patch of it from
    ``targets/patch_src``, or of its hotpatch-ready functions when None."""
    cflags = [*(flags or ["-m32"]), "-fcf-protection=full"]
    exe = compile_program(TARGETS / "protocols.c", tmp_path / f"prot{name}", *cflags)
    if patch_src is None:
        src = tmp_path / "ready.c"
        src.write_text(READY)
    else:
        src = TARGETS / patch_src
    patch = tmp_path / f"{name}.hp"
    res = run_cli("build", src, "--target", exe, "-o", patch, "--name", name)
    assert res.returncode == 0, res.stderr
    return exe, patch


def start(procs: Procs, exe: Path) -> subprocess.Popen[bytes]:
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda ln: ln.strip() == "ready")
    return proc


def read(pid: int, addr: int, n: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(addr)
        return f.read(n)


def test_ms_hook_prologue_bytes_are_the_seeds(tmp_path: Path, procs: Procs) -> None:
    """Protocol A on a 32-bit ``ms_hook_prologue`` function: ``E9 rel32`` (32-bit wrap-around arithmetic) to
    the replacement in the 5 ``CC`` before the entry, ``EB F9`` over ``8B FF``; the threads switch to the new
    value; revert gives back ``CC CC CC CC CC 8B FF``, the bytes of the file."""
    exe, patch = build(tmp_path, None, "ready32")
    proc = start(procs, exe)
    pid = proc.pid
    img = open_elf(str(exe))
    syms = img.function_symbols()
    with hotpatch.attach(pid) as target:
        assert target.bitness == 32
        rep = target.apply(str(patch))
        assert rep.protocol == "A"
        sites = {s.symbol: s for s in target.status().patches[0].sites}
        assert {k: (s.klass, s.protocol) for k, s in sites.items()} == {
            "f_ms": ("ms-x86", "A"),
            "f_pfe": ("patchable-entry", "A"),
        }
        ms = sites["f_ms"]
        assert img.read_vaddr(syms["f_ms"].value - 5, 7) == bytes.fromhex("cccccccccc8bff")
        live = read(pid, ms.entry - 5, 7)
        dest = (ms.entry + struct.unpack("<i", live[1:5])[0]) & 0xFFFF_FFFF
        assert live == jmp_rel32(ms.entry - 5, dest, bitness=32) + jmp_rel8(ms.entry, ms.entry - 5)
        assert live[5:] == bytes.fromhex("ebf9")
        assert dest < 2**32 and f"{dest:08x}" != f"{ms.entry:08x}"
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        region = [ln for ln in maps if int(ln.split("-")[0], 16) <= dest < int(ln.split()[0].split("-")[1], 16)]
        assert region and "x" in region[0].split()[1] and str(exe) not in region[0], hex(dest)
        new0 = read_stats(proc)[1]
        deadline = time.monotonic() + 10
        while (new1 := read_stats(proc)[1]) == new0:  # the threads now get the new values
            assert time.monotonic() < deadline, "no thread got a new value"
            time.sleep(0.01)
        assert new1 > new0
        reps = target.revert("ready32")
        assert reps[0].protocol == "A"
        assert target.status().patches == ()
        deadline = time.monotonic() + 10
        while any(read(pid, s.entry - 5, 1) == b"\xe9" for s in sites.values()):  # one a thread stood on:
            assert time.monotonic() < deadline, "a padding was never given back"  # freed by a later command
            target.revert()
            time.sleep(0.02)
        for sym, s in sites.items():
            assert read(pid, s.entry - 5, 7) == img.read_vaddr(syms[sym].value - 5, 7), sym
    check_alive(proc, "after apply/revert")
    assert_running(pid)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("protocol", ["no-stop", "rolling", "stop-the-world"])
def test_i386_cycles_under_load(tmp_path: Path, procs: Procs, protocol: str) -> None:
    """8 threads of a 32-bit process call every class of function while one protocol applies and reverts
    many times: no crash, no wrong value, both values seen, nothing left applied or stopped."""
    exe, patch = build(tmp_path, None if protocol == "no-stop" else "protocols_patch.c", "prot32")
    proc = start(procs, exe)
    with hotpatch.attach(proc.pid) as target:
        old0, new0 = read_stats(proc)
        for i in range(CYCLES[protocol]):
            assert target.apply(str(patch), protocol).protocol == WANT[protocol]
            assert target.revert("prot32", protocol)[0].protocol == WANT[protocol]
            if i % 50 == 0:
                check_alive(proc, f"after cycle {i}")
        check_alive(proc, "after the cycles")
        st = target.status()
        assert st.patches == ()
        old1, new1 = read_stats(proc)
    assert old1 > old0 and new1 > new0, (old0, new0, old1, new1)
    assert_running(proc.pid)
    assert proc.stdin is not None
    proc.stdin.write(b"quit\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0


def test_patch_for_the_other_bitness_is_refused(tmp_path: Path, procs: Procs) -> None:
    """A 64-bit patch offered to a 32-bit process: one clear error, nothing changed."""
    exe, _ = build(tmp_path, None, "ready32")
    _, patch64 = build(tmp_path, "protocols_ready_patch.c", "p64", "-m64")
    proc = start(procs, exe)
    maps = Path(f"/proc/{proc.pid}/maps").read_text().splitlines()
    base = min(int(ln.split("-")[0], 16) for ln in maps if str(exe) in ln)
    entry = base + open_elf(str(exe)).function_symbols()["f_ms"].value  # a PIE whose first segment is at 0
    before = (read(proc.pid, entry - 5, 16), Path(f"/proc/{proc.pid}/maps").read_text())
    with hotpatch.attach(proc.pid) as target, pytest.raises(PatchFileError, match=r"\(64-bit\) processes; PID"):
        target.apply(str(patch64))
    res = run_cli("apply", "--pid", proc.pid, patch64)
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "32-bit process" in res.stderr, res.stderr
    assert (read(proc.pid, entry - 5, 16), Path(f"/proc/{proc.pid}/maps").read_text()) == before
    check_alive(proc, "after the refused apply")
    assert_running(proc.pid)

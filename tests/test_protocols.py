"""Zero-pause patching (issue 3): every site class and every protocol under load (DESIGN.md §4, §6).

``targets/protocols.c`` runs 8 threads that call one function of each site class in tight loops and check
every result (old or new value; anything else exits 3 with "WRONG ..."). The tests apply and revert with the
Python API, each protocol many times, and check the bytes the seeds prescribe, the class and protocol that
``status`` reports, that the threads saw both values, and that the target runs on and is never left stopped.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

import hotpatch
from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.elf.image import open_elf

THREADS = 8
CYCLES = {"no-stop": 1000, "rolling": 300, "stop-the-world": 1000}
STATS = re.compile(r"stats old=(\d+) new=(\d+)")


def read_stats(proc: subprocess.Popen[bytes]) -> tuple[int, int]:
    """(old, new) values seen so far by the target's threads."""
    assert proc.stdin is not None
    proc.stdin.write(b"stats\n")
    proc.stdin.flush()
    m = STATS.match(wait_for_line(proc, lambda ln: ln.startswith("stats ")))
    assert m is not None
    return int(m.group(1)), int(m.group(2))


def check_alive(proc: subprocess.Popen[bytes], where: str) -> None:
    """Fail with the target's own message if it exited."""
    if proc.poll() is not None:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise AssertionError(f"target exited with {proc.returncode} {where}: {err}")


def build(tmp_path: Path, cf: str, patch_src: str, name: str) -> tuple[Path, Path]:
    """The target built with -fcf-protection=``cf`` and a patch of it from ``patch_src``."""
    exe = compile_program(TARGETS / "protocols.c", tmp_path / f"prot_{cf}", f"-fcf-protection={cf}")
    patch = tmp_path / f"{name}_{cf}.hp"
    res = run_cli("build", TARGETS / patch_src, "--target", exe, "-o", patch, "--name", name)
    assert res.returncode == 0, res.stderr
    return exe, patch


@pytest.mark.parametrize("cf", ["none", "full"])
def test_short_jump_bytes_are_the_seeds(tmp_path: Path, procs: Procs, cf: str) -> None:
    """Protocol A writes ``E9 rel32`` in the 5 bytes before the entry and ``EB F9`` at the entry (seed 001),
    or ``EB F5`` after endbr64 (DESIGN.md §4: F5 is cmc, harmless for a thread between two NOPs); revert
    puts the key back and, once no thread sits on it, the padding."""
    exe, patch = build(tmp_path, cf, "protocols_ready_patch.c", "ready")
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda ln: ln.strip() == "ready")
    mem = Path(f"/proc/{proc.pid}/mem")
    with hotpatch.attach(proc.pid) as target:
        rep = target.apply(str(patch))
        assert rep.protocol == "A"
        st = target.status()
        sites = {s.symbol: s for s in st.patches[0].sites}
        assert {k: s.klass for k, s in sites.items()} == {
            "f_ms": "ms-hook-prologue",
            "f_pfe": "patchable-entry",
            "f_opp": "opportunistic",
        }
        assert all(s.protocol == "A" for s in sites.values())
        maps = Path(f"/proc/{proc.pid}/maps").read_text().splitlines()
        with mem.open("rb") as f:
            for sym, s in sites.items():
                f.seek(s.entry - 5)
                data = f.read(16)
                assert data[0] == 0xE9, (sym, data.hex())
                dest = s.entry + struct.unpack("<i", data[1:5])[0]
                region = [ln for ln in maps if int(ln.split("-")[0], 16) <= dest < int(ln.split()[0].split("-")[1], 16)]
                assert region and "x" in region[0].split()[1] and str(exe) not in region[0], (sym, hex(dest))
                off = 4 if data[5:9] == bytes.fromhex("f30f1efa") else 0
                assert data[5 + off : 7 + off] == (b"\xeb\xf5" if off else b"\xeb\xf9"), (sym, data.hex())
        reps = target.revert("ready")
        assert reps[0].protocol == "A"
        assert target.status().patches == ()
        for _ in range(20):  # a padding a preempted thread still stood on is given back by a later command
            with mem.open("rb") as f:
                if all(f.seek(s.entry - 5) >= 0 and f.read(1) != b"\xe9" for s in sites.values()):
                    break
            target.revert()
            time.sleep(0.01)
    check_alive(proc, "after apply/revert")
    assert_running(proc.pid)
    img = open_elf(str(exe))
    syms = img.function_symbols()
    with mem.open("rb") as f:
        for sym, s in sites.items():
            f.seek(s.entry - 5)
            assert f.read(7) == img.read_vaddr(syms[sym].value - 5, 7), sym


@pytest.mark.timeout(900)
@pytest.mark.parametrize("protocol", ["no-stop", "rolling", "stop-the-world"])
def test_cycles_under_load(tmp_path: Path, procs: Procs, protocol: str) -> None:
    """8 threads call every class of function while one protocol applies and reverts many times: no crash,
    no wrong value, both values seen, nothing left applied or stopped, memory given back."""
    patch_src = "protocols_ready_patch.c" if protocol == "no-stop" else "protocols_patch.c"
    exe, patch = build(tmp_path, "full", patch_src, "prot")
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda ln: ln.strip() == "ready")
    want = {"no-stop": "A", "rolling": "R", "stop-the-world": "B"}[protocol]
    maps_before = Path(f"/proc/{proc.pid}/maps").read_text().count("\n")
    with hotpatch.attach(proc.pid) as target:
        old0, new0 = read_stats(proc)
        for i in range(CYCLES[protocol]):
            rep = target.apply(str(patch), protocol)
            assert rep.protocol == want
            reps = target.revert("prot", protocol)
            assert reps[0].protocol == want
            if i % 100 == 0:
                check_alive(proc, f"after cycle {i}")
        check_alive(proc, "after the cycles")
        st = target.status()
        assert st.patches == ()
        assert len(st.retained) <= THREADS, st.retained
        old1, new1 = read_stats(proc)
    assert old1 > old0 and new1 > new0, (old0, new0, old1, new1)
    assert_running(proc.pid)
    maps_after = Path(f"/proc/{proc.pid}/maps").read_text().count("\n")
    assert maps_after <= maps_before + THREADS + 1, (maps_before, maps_after)
    assert proc.stdin is not None
    proc.stdin.write(b"quit\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0


def test_no_stop_refuses_an_ordinary_site(tmp_path: Path, procs: Procs) -> None:
    """Forcing protocol A on a patch with an ordinary site is one clear error; nothing changes."""
    exe, patch = build(tmp_path, "none", "protocols_patch.c", "prot")
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda ln: ln.strip() == "ready")
    res = run_cli("apply", "--pid", str(proc.pid), "--protocol", "no-stop", patch)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "f_ord is an ordinary site" in res.stderr, res.stderr
    res = run_cli("status", "--pid", str(proc.pid))
    assert "no patch applied" in res.stdout
    check_alive(proc, "after the refused apply")
    assert_running(proc.pid)


def test_cflags_make_code_hotpatch_ready(tmp_path: Path, procs: Procs) -> None:
    """Code built with ``hotpatch cflags`` is patched with protocol A (patchable-entry sites)."""
    flags = run_cli("cflags").stdout.split()
    assert flags
    src = tmp_path / "plain.c"
    src.write_text(
        "#include <stdio.h>\n#include <unistd.h>\n"
        "__attribute__((noinline)) long work(long x) { return x * 3 + 1; }\n"
        'int main(void) { printf("ready\\n"); fflush(stdout); volatile long s = 0;\n'
        "  for (long i = 0;; i++) { long v = work(i); if (v != i * 3 + 1 && v != i * 3 + 7) return 3; s += v; }\n}\n"
    )
    exe = compile_program(src, tmp_path / "plain", *flags)
    fix = tmp_path / "fix.c"
    fix.write_text("long work(long x) { return x * 3 + 7; }\n")
    patch = tmp_path / "fix.hp"
    assert run_cli("build", fix, "--target", exe, "-o", patch, "--name", "fix").returncode == 0
    proc = procs.start(exe)
    wait_for_line(proc, lambda ln: ln.strip() == "ready")
    res = run_cli("apply", "--pid", str(proc.pid), patch)
    assert res.returncode == 0 and "protocol A" in res.stdout, res.stdout + res.stderr
    res = run_cli("status", "--pid", str(proc.pid))
    assert "class=patchable-entry protocol=A" in res.stdout, res.stdout
    assert run_cli("revert", "--pid", str(proc.pid), "fix").returncode == 0
    check_alive(proc, "after apply/revert")
    assert_running(proc.pid)

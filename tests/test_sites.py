"""Each site kind issue 2 handles, on real processes built with gcc at test time (issue 2, "Must show" 2).

The targets (``targets/sites.c``, ``targets/libsite.c`` + ``targets/libmain.c``) answer one line per number
written to their stdin with the results of their functions, so every check is a question and an answer.
Patches are built and applied through the CLI, as a user would; after every apply and revert the target must
be running, untraced, and its site bytes must be what the test expects (read through ``/proc/PID/mem``).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line

ENDBR64 = bytes.fromhex("f30f1efa")
REL32_REACH = 1 << 31


@dataclass
class Answering:
    """A started target that prints ``addr NAME 0xADDR`` lines and ``ready``, then answers each number."""

    proc: subprocess.Popen[bytes]
    addrs: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, procs: Procs, exe: Path, *args: str | Path) -> Answering:
        """Start ``exe`` (with ``args``) and read its function addresses up to ``ready``."""
        t = cls(procs.start(exe, *args, stdin=subprocess.PIPE))
        while True:
            line = wait_for_line(t.proc, lambda _: True).split()
            if line == ["ready"]:
                return t
            assert line[0] == "addr", line
            t.addrs[line[1]] = int(line[2], 16)

    @property
    def pid(self) -> int:
        """The target's PID."""
        return self.proc.pid

    def ask(self, line: str | int) -> dict[str, int]:
        """Send one line; return the ``key=value`` pairs of the answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()
        answer = wait_for_line(self.proc, lambda _: True)
        return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", answer)}


def peek(pid: int, addr: int, size: int) -> bytes:
    """``size`` bytes of the target's memory at ``addr``."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


def jump_target(pid: int, site: int) -> int:
    """The destination of the ``E9 rel32`` at ``site``."""
    code = peek(pid, site, 5)
    assert code[0] == 0xE9, f"no jmp rel32 at {site:#x}: {code.hex()}"
    return site + 5 + struct.unpack("<i", code[1:])[0]


def maps(pid: int) -> list[tuple[int, int, str, str]]:
    """``(start, end, perms, path)`` of every mapping of ``pid``."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def cli_ok(*args: str | Path) -> str:
    """Run the CLI; it must succeed. Returns its stdout."""
    res = run_cli(*args)
    assert res.returncode == 0, f"hotpatch {' '.join(map(str, args))}: {res.stderr}"
    return res.stdout


def build(src: str, target: Path, out: Path, *extra: str) -> Path:
    """Build the patch ``targets/SRC`` for ``target`` into ``out`` through the CLI."""
    cli_ok("build", TARGETS / src, "--target", target, "-o", out, *extra)
    return out


def status(pid: int) -> dict[str, Any]:
    """``hotpatch status --json`` of ``pid``."""
    st: dict[str, Any] = json.loads(cli_ok("status", "--pid", str(pid), "--json"))
    return st


def apply(t: Answering, patch: Path) -> dict[str, Any]:
    """Apply ``patch`` through the CLI; check the target runs on; return the applied patch's status."""
    out = cli_ok("apply", "--pid", str(t.pid), patch)
    assert out.startswith("applied: patch "), out
    assert_running(t.pid)
    patches = status(t.pid)["patches"]
    assert len(patches) == 1 and patches[0]["state"] == "applied", patches
    return patches[0]  # type: ignore[no-any-return]


def revert(t: Answering, name: str) -> None:
    """Revert ``name`` through the CLI; check the target runs on and no patch is left."""
    out = cli_ok("revert", "--pid", str(t.pid), name)
    assert out.startswith(f"reverted: patch {name} "), out
    assert_running(t.pid)
    assert status(t.pid)["patches"] == []


def site_of(patch: dict[str, Any], symbol: str) -> dict[str, Any]:
    """The status entry of ``symbol``'s site in an applied patch."""
    found = [s for s in patch["sites"] if s["symbol"] == symbol]
    assert len(found) == 1, patch["sites"]
    return found[0]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def sites_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``targets/sites.c`` built as gcc builds by default here: a PIE without CET instrumentation."""
    # no alignment padding: every function is an ordinary site (the 5-byte jump these tests check)
    return compile_program(TARGETS / "sites.c", tmp_path_factory.mktemp("sites") / "sites", "-falign-functions=1")


def is_pie(path: Path) -> bool:
    """True when ``path`` is an ET_DYN executable with a program interpreter (a PIE)."""
    data = path.read_bytes()
    return struct.unpack_from("<H", data, 16)[0] == 3 and b"/ld-linux-x86-64.so.2" in data


# -- a function in a PIE executable --------------------------------------------------------------------


def test_pie_function_replacement_mapped_near_executable(sites_exe: Path, tmp_path: Path, procs: Procs) -> None:
    """A function of a PIE is redirected by a jmp rel32 to a replacement mapped within ±2 GiB of the
    executable, far from the libraries where an ordinary mmap would put it; revert restores the bytes."""
    assert is_pie(sites_exe)
    patch = build("sites_patch.c", sites_exe, tmp_path / "plain.hp", "--name", "plain")
    t = Answering.start(procs, sites_exe)
    entry = t.addrs["plain"]
    original = peek(t.pid, entry, 16)
    assert t.ask(5)["plain"] == 16

    applied = apply(t, patch)
    site = site_of(applied, "plain")
    assert site["entry"] == site["site"] == entry
    assert t.ask(5)["plain"] == 5001 and t.ask(-3)["plain"] == -2999
    assert t.ask(5)["pair_a"] == 15  # the rest of the program is untouched

    dest = jump_target(t.pid, entry)
    mm = maps(t.pid)
    exe_maps = [m for m in mm if m[3] == str(sites_exe.resolve())]
    libc = [m for m in mm if "/libc.so" in m[3] or "/libc-" in m[3]]
    assert exe_maps and libc
    exe_lo, exe_hi = exe_maps[0][0], exe_maps[-1][1]
    # the premise: this PIE is out of rel32 reach of the libraries (the patch's usual place)
    assert min(abs(exe_lo - m[0]) for m in libc) > REL32_REACH
    holder = [m for m in mm if m[0] <= dest < m[1]]
    assert len(holder) == 1 and "x" in holder[0][2] and holder[0][3] == "", holder
    assert not exe_lo <= dest < exe_hi
    assert max(abs(dest - exe_lo), abs(dest - exe_hi)) < REL32_REACH
    assert min(abs(dest - m[0]) for m in libc) > REL32_REACH

    revert(t, "plain")
    assert peek(t.pid, entry, 16) == original
    assert t.ask(5)["plain"] == 16
    assert_running(t.pid)


# -- a function in a shared library --------------------------------------------------------------------


def test_shared_library_function(lib_program: tuple[Path, Path], tmp_path: Path, procs: Procs) -> None:
    """A function of a shared library (``--target libsite.so``) is redirected at its entry inside the
    library's mapping; the replacement calls the original, whose prologue loads a GOT entry RIP-relative,
    through HOTPATCH_ORIGINAL; revert restores it."""
    so, exe = lib_program
    patch = build("lib_patch.c", so, tmp_path / "lib.hp", "--name", "lib")
    t = Answering.start(procs, exe)
    entry = t.addrs["lib_compute"]
    original = peek(t.pid, entry, 16)
    assert t.ask(3) == {"lib_compute": 16, "calls": 1}

    applied = apply(t, patch)
    assert applied["module"] == str(so.resolve())
    assert site_of(applied, "lib_compute")["entry"] == entry
    so_maps = [m for m in maps(t.pid) if m[3] == str(so.resolve())]
    assert so_maps[0][0] <= entry < so_maps[-1][1]
    assert abs(jump_target(t.pid, entry) - entry) < REL32_REACH
    assert t.ask(4) == {"lib_compute": -23, "calls": 2}  # the original ran: it counted the call
    assert t.ask(5) == {"lib_compute": -32, "calls": 3}

    revert(t, "lib")
    assert peek(t.pid, entry, 16) == original
    assert t.ask(6) == {"lib_compute": 43, "calls": 4}
    assert_running(t.pid)


def test_library_patch_reads_copy_relocated_variable(
    lib_program: tuple[Path, Path], tmp_path: Path, procs: Procs
) -> None:
    """A library patch that reads the library's exported variable gets the copy the program really uses.
    The PIE refers to ``lib_calls``, so ld.so copies it into the executable and binds the library's own
    references there; resolving it to the library's unused definition would read 0."""
    so, exe = lib_program
    patch = build("lib_counter_patch.c", so, tmp_path / "counter.hp", "--name", "counter")
    t = Answering.start(procs, exe)
    assert t.ask(3) == {"lib_compute": 16, "calls": 1}

    apply(t, patch)
    assert t.ask(4) == {"lib_compute": 2_000_000 + 16 + 7, "calls": 2}
    assert t.ask(5) == {"lib_compute": 3_000_000 + 25 + 7, "calls": 3}

    revert(t, "counter")
    assert t.ask(6) == {"lib_compute": 43, "calls": 4}
    assert_running(t.pid)


# -- a function after endbr64 --------------------------------------------------------------------------


def test_site_after_endbr64(tmp_path: Path, procs: Procs) -> None:
    """With ``-fcf-protection`` the function starts with ``endbr64``: the jump is written at entry+4 and
    the endbr64 at the entry stays, so indirect calls still land on it; revert restores entry+4."""
    exe = compile_program(TARGETS / "sites.c", tmp_path / "sites-cet", "-fcf-protection", "-falign-functions=1")
    patch = build("sites_patch.c", exe, tmp_path / "plain.hp", "--name", "plain")
    t = Answering.start(procs, exe)
    entry = t.addrs["plain"]
    original = peek(t.pid, entry, 16)
    assert original.startswith(ENDBR64)

    applied = apply(t, patch)
    site = site_of(applied, "plain")
    assert (site["entry"], site["site"]) == (entry, entry + 4)
    now = peek(t.pid, entry, 16)
    assert now[:4] == ENDBR64
    assert now[4] == 0xE9 and now[9:] == original[9:]
    dest = jump_target(t.pid, entry + 4)
    assert [m[2][2] + m[3] for m in maps(t.pid) if m[0] <= dest < m[1]] == ["x"]  # anonymous, executable
    assert t.ask(7)["plain"] == 7001

    revert(t, "plain")
    assert peek(t.pid, entry, 16) == original
    assert t.ask(7)["plain"] == 22


# -- RIP-relative first instruction, called through HOTPATCH_ORIGINAL ------------------------------------


def test_rip_relative_prologue_through_original(sites_exe: Path, tmp_path: Path, procs: Procs) -> None:
    """``riprel`` starts with ``mov rax,[rip+riprel_base]``; its replacement calls the original through
    HOTPATCH_ORIGINAL. The results 2*(x + base) + 1, also after the program changes riprel_base, prove the
    trampoline's relocated load reads the program's variable."""
    patch = build("riprel_patch.c", sites_exe, tmp_path / "riprel.hp", "--name", "riprel")
    t = Answering.start(procs, sites_exe)
    entry = t.addrs["riprel"]
    original = peek(t.pid, entry, 16)
    assert original[:3] == bytes.fromhex("488b05")  # mov rax,[rip+disp32]
    assert t.ask(1)["riprel"] == 1 + 0x5EED

    applied = apply(t, patch)
    assert site_of(applied, "riprel")["site"] == entry
    assert t.ask(1)["riprel"] == 2 * (1 + 0x5EED) + 1
    assert t.ask("base 777") == {}
    assert t.ask(10)["riprel"] == 2 * (10 + 777) + 1
    assert t.ask(-800)["riprel"] == 2 * (-800 + 777) + 1

    revert(t, "riprel")
    assert peek(t.pid, entry, 16) == original
    assert t.ask(10)["riprel"] == 787


# -- a prologue that crosses a page boundary --------------------------------------------------------------


def test_prologue_across_page_boundary(sites_exe: Path, tmp_path: Path, procs: Procs) -> None:
    """``crosspage`` starts 2 bytes before a page boundary, so its first instruction and the 5-byte jump
    span two pages; apply writes both, the original still runs from its trampoline, revert restores both."""
    patch = build("crosspage_patch.c", sites_exe, tmp_path / "crosspage.hp", "--name", "crosspage", "--ordinary-sites")
    t = Answering.start(procs, sites_exe)
    entry = t.addrs["crosspage"]
    assert entry % 4096 > 4096 - 5, f"crosspage at {entry:#x} does not cross a page boundary"
    original = peek(t.pid, entry, 8)
    assert t.ask(6)["crosspage"] == 1240

    applied = apply(t, patch)
    assert site_of(applied, "crosspage")["site"] == entry
    assert peek(t.pid, entry, 1) == b"\xe9"
    assert peek(t.pid, entry + 5, 3) == original[5:]
    jump_target(t.pid, entry)
    assert t.ask(6)["crosspage"] == 6 - 1234

    revert(t, "crosspage")
    assert peek(t.pid, entry, 8) == original
    assert t.ask(6)["crosspage"] == 1240


# -- two functions in one patch -----------------------------------------------------------------------


def test_two_functions_in_one_patch(sites_exe: Path, tmp_path: Path, procs: Procs) -> None:
    """One patch replacing pair_a and pair_b switches both at once and its revert restores both; the
    other functions are untouched throughout."""
    patch = build("pair_patch.c", sites_exe, tmp_path / "pair.hp", "--name", "pair", "--ordinary-sites")
    t = Answering.start(procs, sites_exe)
    # each function's own bytes, up to the next one (the target is built with -falign-functions=1)
    starts = sorted(t.addrs.values())
    size = {n: min([b for b in starts if b > a] + [a + 16]) - a for n, a in t.addrs.items()}
    before = {name: peek(t.pid, t.addrs[name], size[name]) for name in t.addrs}
    assert t.ask(1) == {"plain": 4, "riprel": 0x5EEE, "crosspage": 1235, "pair_a": 11, "pair_b": 21}

    applied = apply(t, patch)
    assert sorted(s["symbol"] for s in applied["sites"]) == ["pair_a", "pair_b"]
    assert {s["symbol"]: s["site"] for s in applied["sites"]} == {n: t.addrs[n] for n in ("pair_a", "pair_b")}
    assert t.ask(1) == {"plain": 4, "riprel": 0x5EEE, "crosspage": 1235, "pair_a": 101, "pair_b": 201}
    for name in ("plain", "riprel", "crosspage"):
        assert peek(t.pid, t.addrs[name], size[name]) == before[name]

    revert(t, "pair")
    assert {name: peek(t.pid, t.addrs[name], size[name]) for name in t.addrs} == before
    assert t.ask(1) == {"plain": 4, "riprel": 0x5EEE, "crosspage": 1235, "pair_a": 11, "pair_b": 21}
    assert_running(t.pid)

"""Compiler clones (issue 4): gcc -O2 splits clones.c's scaled() by partial inlining, and main calls the clone
scaled.part.0 directly. A patch of scaled alone is refused (naming the clone) unless --allow-clones, and then
main indeed keeps the old code; a patch that replaces the clone too switches every call."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.elf.image import open_elf


def test_partial_inlining_clone(tmp_path: Path, procs: Procs) -> None:
    exe = compile_program(TARGETS / "clones.c", tmp_path / "clones")
    img = open_elf(str(exe))
    try:
        assert "scaled.part.0" in img.function_symbols(), "gcc did not split scaled(); the test needs the clone"
    finally:
        img.close()
    alone, both = tmp_path / "alone.hp", tmp_path / "both.hp"
    res = run_cli("build", TARGETS / "clones_patch.c", "--target", exe, "-o", alone)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "scaled.part.0 (partial inlining" in res.stderr and "--allow-clones" in res.stderr, res.stderr
    assert not alone.exists()
    res = run_cli("build", TARGETS / "clones_patch.c", "--target", exe, "-o", alone, "--allow-clones")
    assert res.returncode == 0 and "note: scaled.part.0 left alone" in res.stdout, res.stdout + res.stderr
    res = run_cli("build", TARGETS / "clones_part_patch.c", "--target", exe, "-o", both)
    assert res.returncode == 0 and "replaces scaled, scaled.part.0" in res.stdout, res.stdout + res.stderr

    proc = procs.start(exe, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wait_for_line(proc, lambda s: s.startswith("ready"))

    def ask(n: int) -> int:
        assert proc.stdin is not None
        proc.stdin.write(f"{n}\n".encode())
        proc.stdin.flush()
        return int(wait_for_line(proc, lambda s: s.strip().lstrip("-").isdigit()))

    assert (ask(5), ask(-3)) == (16, -1)
    assert run_cli("apply", "--pid", proc.pid, alone).returncode == 0
    assert ask(5) == 16  # main's calls go to the clone, which the patch left alone
    assert run_cli("revert", "--pid", proc.pid, "--all").returncode == 0
    assert run_cli("apply", "--pid", proc.pid, both).returncode == 0
    assert (ask(5), ask(-3)) == (115, -1)
    assert run_cli("revert", "--pid", proc.pid, "--all").returncode == 0
    assert ask(5) == 16
    assert_running(proc.pid)


def test_whole_copy_clone_follows(tmp_path: Path, procs: Procs) -> None:
    """A clone that is the same code as the function it copies (compute.clone.0) is redirected to the
    function's replacement as well, and the build says so; both switch, and both come back on revert."""
    exe = compile_program(TARGETS / "clone_copy.c", tmp_path / "clone_copy", "-fno-ipa-icf")
    patch = tmp_path / "copy.hp"
    res = run_cli("build", TARGETS / "clone_copy_patch.c", "--target", exe, "-o", patch)
    assert res.returncode == 0, res.stderr
    assert "replaces compute, compute.clone.0" in res.stdout, res.stdout
    assert "note: compute.clone.0 is a whole copy of compute: redirected to its replacement too" in res.stdout
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))

    def ask(n: int) -> list[int]:
        assert proc.stdin is not None
        proc.stdin.write(f"{n}\n".encode())
        proc.stdin.flush()
        return [int(v) for v in wait_for_line(proc, lambda s: s[:1].isdigit()).split()]

    assert ask(2) == [17, 17]
    assert run_cli("apply", "--pid", proc.pid, patch).returncode == 0
    assert ask(2) == [1014, 1014]
    assert run_cli("revert", "--pid", proc.pid, "--all").returncode == 0
    assert ask(2) == [17, 17]
    assert_running(proc.pid)

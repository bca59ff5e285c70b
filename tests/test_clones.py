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

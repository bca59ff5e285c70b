"""Statics and globals (issue 4): a patch uses the target's static counter and calls its static helper by name,
found in the module's ``.symtab`` or, for a stripped module, in its separate debug file (by build-id); a name
that cannot be bound is one clear line at apply and nothing changes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.elf.image import open_elf


def ask(proc: subprocess.Popen[bytes], n: int) -> tuple[int, int]:
    """(compute(n), calls) from the statics target."""
    assert proc.stdin is not None
    proc.stdin.write(f"{n}\n".encode())
    proc.stdin.flush()
    a, b = wait_for_line(proc, lambda s: s[:1].isdigit()).split()
    return int(a), int(b)


def split_debug(exe: Path, root: Path) -> None:
    """Move ``exe``'s symbols into ``root``/.build-id/xx/yyyy.debug and strip ``exe``, as a distribution does."""
    img = open_elf(str(exe))
    try:
        build_id = img.build_id
    finally:
        img.close()
    assert build_id
    debug = root / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"
    debug.parent.mkdir(parents=True)
    subprocess.run(["objcopy", "--only-keep-debug", str(exe), str(debug)], check=True)
    subprocess.run(["strip", "--strip-all", str(exe)], check=True)
    stripped = open_elf(str(exe))
    try:
        assert not stripped.has_symtab
    finally:
        stripped.close()


@pytest.mark.parametrize("layout", ["symtab", "debug-file"])
def test_static_counter_and_helper(tmp_path: Path, procs: Procs, layout: str) -> None:
    """The replacement adds 10 to the static counter per call and returns scale(x) + 1000; revert gives the
    original back, with the counter as the patch left it."""
    exe = compile_program(TARGETS / "statics.c", tmp_path / "statics")
    env = dict(os.environ)
    if layout == "debug-file":
        split_debug(exe, tmp_path / "debug")
        env["HOTPATCH_DEBUG_DIR"] = str(tmp_path / "debug")
    patch = tmp_path / "statics.hp"
    res = run_cli("build", TARGETS / "statics_patch.c", "--target", exe, "-o", patch, env=env)
    assert res.returncode == 0, res.stderr
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))
    assert ask(proc, 2) == (7, 1)
    if layout == "debug-file":  # without the debug file, `calls` and `scale` have no name in the target
        res = run_cli("apply", "--pid", proc.pid, patch)
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert "symbol calls is not defined" in res.stderr or "symbol scale is not defined" in res.stderr
        assert json.loads(run_cli("status", "--pid", proc.pid, "--json").stdout)["patches"] == []
        assert ask(proc, 2) == (7, 2)
    res = run_cli("apply", "--pid", proc.pid, patch, env=env)
    assert res.returncode == 0, res.stderr
    calls = ask(proc, 2)[1] - 10
    assert ask(proc, 4) == (1012, calls + 20)
    assert run_cli("revert", "--pid", proc.pid, "--all", env=env).returncode == 0
    assert ask(proc, 4) == (13, calls + 21)
    assert_running(proc.pid)


def test_ambiguous_static_refused(tmp_path: Path, procs: Procs) -> None:
    """Two translation units each with a static ``calls``: the patch's ``calls`` is refused, naming it."""
    exe = compile_program(TARGETS / "statics.c", tmp_path / "statics", str(TARGETS / "statics_other.c"))
    patch = tmp_path / "statics.hp"
    assert run_cli("build", TARGETS / "statics_patch.c", "--target", exe, "-o", patch).returncode == 0
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))
    res = run_cli("apply", "--pid", proc.pid, patch)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "calls names several static symbols" in res.stderr, res.stderr
    assert ask(proc, 2) == (7, 1)
    assert_running(proc.pid)

"""Patch versions (seed 004's rule): a newer version replaces an older one in one transaction; the same or
an older version is refused as "already up to date"; another patch may not take a site that one owns."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line


def ask(proc: subprocess.Popen[bytes], n: int) -> int:
    """Send ``n`` to the calc target and return its answer."""
    assert proc.stdin is not None
    proc.stdin.write(f"{n}\n".encode())
    proc.stdin.flush()
    return int(wait_for_line(proc, lambda s: s.strip().lstrip("-").isdigit()))


@pytest.fixture
def calc(tmp_path: Path, procs: Procs) -> tuple[subprocess.Popen[bytes], Path]:
    """A running calc target and its executable."""
    exe = compile_program(TARGETS / "calc.c", tmp_path / "calc")
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))
    return proc, exe


def make_patch(tmp_path: Path, exe: Path, add: int, version: int, name: str = "fix") -> Path:
    """Build a patch ``name`` version ``version`` whose compute returns x + ``add``."""
    src = tmp_path / f"{name}_v{version}.c"
    src.write_text(f"long compute(long x) {{ return x + {add}; }}\n")
    out = tmp_path / f"{name}_v{version}.hp"
    res = run_cli("build", src, "--target", exe, "-o", out, "--name", name, "--version", version)
    assert res.returncode == 0, res.stderr
    return out


def test_upgrade_refuse_older_and_revert(tmp_path: Path, calc: tuple[subprocess.Popen[bytes], Path]) -> None:
    """v1, then v2 (replaces v1), then v1 and v2 again (up to date), then v3, then revert."""
    proc, exe = calc
    v1, v2, v3 = (make_patch(tmp_path, exe, 10 * v, v) for v in (1, 2, 3))
    assert ask(proc, 5) == 6
    assert run_cli("apply", "--pid", proc.pid, v1).returncode == 0
    assert ask(proc, 5) == 15
    res = run_cli("apply", "--pid", proc.pid, v2)
    assert res.returncode == 0 and "upgraded from version 1" in res.stdout, res.stdout + res.stderr
    assert ask(proc, 5) == 25
    for older in (v1, v2):
        res = run_cli("apply", "--pid", proc.pid, older)
        assert res.returncode == 1
        assert res.stderr.count("\n") == 1 and "already up to date" in res.stderr, res.stderr
        assert ask(proc, 5) == 25
    assert run_cli("apply", "--pid", proc.pid, v3).returncode == 0
    assert ask(proc, 5) == 35
    st = json.loads(run_cli("status", "--pid", proc.pid, "--json").stdout)
    assert [(p["name"], p["version"], p["state"]) for p in st["patches"]] == [("fix", 3, "applied")]
    site = st["patches"][0]["sites"][0]
    assert site["symbol"] == "compute" and site["klass"] in ("opportunistic", "ordinary")
    # the protocol the last commit used: an upgrade replaces one instruction (the E9), so it is A
    assert site["protocol"] in ("A", "R")
    assert run_cli("revert", "--pid", proc.pid, "fix").returncode == 0
    assert ask(proc, 5) == 6
    assert json.loads(run_cli("status", "--pid", proc.pid, "--json").stdout)["patches"] == []
    assert_running(proc.pid)


def test_other_patch_may_not_take_an_owned_site(tmp_path: Path, calc: tuple[subprocess.Popen[bytes], Path]) -> None:
    """A second patch of another name replacing the same function is refused; the first stays in force."""
    proc, exe = calc
    first = make_patch(tmp_path, exe, 100, 1, name="first")
    second = make_patch(tmp_path, exe, 200, 1, name="second")
    assert run_cli("apply", "--pid", proc.pid, first).returncode == 0
    res = run_cli("apply", "--pid", proc.pid, second)
    assert res.returncode == 1 and "already patched by patch 'first'" in res.stderr, res.stderr
    assert ask(proc, 1) == 101
    res = run_cli("revert", "--pid", proc.pid, "second")
    assert res.returncode == 1 and "no patch named second" in res.stderr
    assert run_cli("revert", "--pid", proc.pid, "--all").returncode == 0
    assert ask(proc, 1) == 2
    assert_running(proc.pid)


def test_executable_replaced_on_disk(tmp_path: Path, procs: Procs) -> None:
    """A package upgrade replaces the program file while the old build runs: a patch for the running build
    is still applied (its module and padding are read through /proc/PID/map_files, not the new file)."""
    exe = compile_program(TARGETS / "calc.c", tmp_path / "calc")
    kept = tmp_path / "calc-old"
    kept.write_bytes(exe.read_bytes())
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))
    patch = make_patch(tmp_path, kept, 10, 1)
    new = compile_program(TARGETS / "calc.c", tmp_path / "calc-new", "-DUPGRADED", "-O1")
    new.replace(exe)  # the path now names another build
    assert "(deleted)" in Path(f"/proc/{proc.pid}/maps").read_text()
    res = run_cli("apply", "--pid", proc.pid, patch)
    assert res.returncode == 0, res.stderr
    assert ask(proc, 5) == 15
    assert run_cli("revert", "--pid", proc.pid, "fix").returncode == 0
    assert ask(proc, 5) == 6
    assert_running(proc.pid)

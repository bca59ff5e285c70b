"""``apply --via got`` (issue 4, seed 004's "dlopen patching" generalised): the calls of libmain to libsite.so's
lib_compute are redirected by swapping the GOT slots that import it, changing no code, in a target under a
seccomp policy that forbids making code writable (where a code patch fails cleanly)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli
from test_sites import Answering, build, peek


def test_got_redirect_under_noexec_policy(lib_program: tuple[Path, Path], tmp_path: Path, procs: Procs) -> None:
    so, exe = lib_program
    patch = build("lib_patch.c", so, tmp_path / "lib.hp", "--name", "lib")
    launcher = compile_program(TARGETS / "noexec_launch.c", tmp_path / "noexec_launch")
    t = Answering.start(procs, launcher, exe)
    entry = t.addrs["lib_compute"]
    code = peek(t.pid, entry, 16)
    assert t.ask(3) == {"lib_compute": 16, "calls": 1}

    res = run_cli("apply", "--pid", t.pid, patch)  # the code's pages cannot be made writable here
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "Operation not permitted" in res.stderr, res.stderr
    assert json.loads(run_cli("status", "--pid", t.pid, "--json").stdout)["patches"] == []
    assert t.ask(4) == {"lib_compute": 23, "calls": 2}

    res = run_cli("apply", "--pid", t.pid, patch, "--via", "got", "--importer", exe.name)
    assert res.returncode == 0, res.stderr
    assert re.search(rf"lib_compute in \d+ GOT slots? of {exe.name} ", res.stdout), res.stdout
    assert peek(t.pid, entry, 16) == code  # no byte of code changed
    assert t.ask(4) == {"lib_compute": -23, "calls": 3}  # the replacement, calling the original
    st = json.loads(run_cli("status", "--pid", t.pid, "--json").stdout)
    sites = st["patches"][0]["sites"]
    assert {(s["klass"], Path(s["importer"]).name) for s in sites} == {("got-slot", exe.name)}, sites
    assert st["patches"][0]["state"] == "applied"

    res = run_cli("revert", "--pid", t.pid, "lib")
    assert res.returncode == 0, res.stderr
    assert t.ask(6) == {"lib_compute": 43, "calls": 4}
    assert json.loads(run_cli("status", "--pid", t.pid, "--json").stdout)["patches"] == []
    assert_running(t.pid)


def test_got_needs_an_importer(lib_program: tuple[Path, Path], tmp_path: Path, procs: Procs) -> None:
    """``--importer`` naming a module that does not import the function: one line, nothing changed."""
    so, exe = lib_program
    patch = build("lib_patch.c", so, tmp_path / "lib.hp", "--name", "lib")
    t = Answering.start(procs, exe)
    res = run_cli("apply", "--pid", t.pid, patch, "--via", "got", "--importer", "libc.so.6")
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "lib_compute is not imported through a GOT slot by the modules libc.so.6" in res.stderr, res.stderr
    assert json.loads(run_cli("status", "--pid", t.pid, "--json").stdout)["patches"] == []
    assert t.ask(3) == {"lib_compute": 16, "calls": 1}
    assert_running(t.pid)

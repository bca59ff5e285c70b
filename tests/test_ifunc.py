"""IFUNC symbols (issue 4): patching libc's strlen patches the implementation the running process resolved,
and says which, named from libc's debug file (libc6-dbg) or, without one, by its offset (sized from
``.eh_frame``)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.elf.debugfile import debug_file_path
from hotpatch.elf.image import open_elf


def libc_of(pid: int) -> str:
    """The path of the libc.so.6 mapped in ``pid``."""
    with open(f"/proc/{pid}/maps") as maps:
        return next(line.split()[5] for line in maps if line.rstrip().endswith("/libc.so.6"))


@pytest.mark.parametrize("debug", ["debug-file", "no-debug-file"])
def test_strlen_implementation(tmp_path: Path, procs: Procs, debug: str) -> None:
    """strlen switches for the process (4242 for the probe string, the original for others: two threads
    check strlen("hello") == 5 meanwhile) and back on revert; apply and status name the implementation."""
    exe = compile_program(TARGETS / "ifunc_strlen.c", tmp_path / "ifunc_strlen")
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))
    env = {**os.environ, **({"HOTPATCH_DEBUG_DIR": str(tmp_path)} if debug == "no-debug-file" else {})}
    libc = libc_of(proc.pid)
    patch = tmp_path / "strlen.hp"
    res = run_cli("build", TARGETS / "ifunc_strlen_patch.c", "--target", libc, "-o", patch, env=env)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("replaces strlen"), res.stdout + res.stderr

    def ask() -> int:
        assert proc.stdin is not None
        proc.stdin.write(b"len\n")
        proc.stdin.flush()
        return int(wait_for_line(proc, lambda s: s.startswith(("len", "BAD"))).split()[1])

    assert ask() == 16
    res = run_cli("apply", "--pid", proc.pid, patch, env=env)
    assert res.returncode == 0, res.stderr
    assert "strlen (IFUNC: this process uses " in res.stdout, res.stdout
    impl = res.stdout.split("this process uses ")[1].split(")")[0]
    if debug == "no-debug-file":
        assert impl.startswith("libc.so.6+0x"), impl
    else:  # .ci/run installs libc6-dbg
        img = open_elf(libc)
        try:
            build_id = img.build_id
        finally:
            img.close()
        assert build_id and debug_file_path(build_id), "no debug file for libc (apt-get install libc6-dbg)"
        assert impl.startswith("__strlen_"), impl
    assert ask() == 4242
    st = json.loads(run_cli("status", "--pid", proc.pid, "--json", env=env).stdout)
    assert [s["implementation"] for s in st["patches"][0]["sites"]] == [impl]
    res = run_cli("revert", "--pid", proc.pid, "--all", env=env)
    assert res.returncode == 0, res.stderr
    assert ask() == 16
    assert_running(proc.pid)

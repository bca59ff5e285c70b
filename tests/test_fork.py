"""A target that forks all the time while its code is patched (hotpatch.forkfix).

fork() copies the address space as it stands: a child forked while protocol R's commit program holds
``EB FE`` at a key inherited the self-loop with no program to end it, and hung at its first call of the
function. ``targets/forker.c`` forks children in a loop, each calling the patched functions once; one that has
not exited 3 s after its fork makes the target print ``HUNG`` and exit 4.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import hotpatch
from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line

CYCLES = 100


def _forker(tmp_path: Path, procs: Procs, patch_src: str) -> tuple[subprocess.Popen[bytes], Path]:
    exe = compile_program(TARGETS / "forker.c", tmp_path / "forker")
    src = tmp_path / "patch.c"
    src.write_text(patch_src)
    patch = tmp_path / "patch.hp"
    res = run_cli("build", src, "--target", exe, "-o", patch, "--name", "fk")
    assert res.returncode == 0, res.stderr
    p = procs.start(exe, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    wait_for_line(p, lambda line: line.strip() == "ready")
    return p, patch


def _forks(p: subprocess.Popen[bytes]) -> int:
    assert p.stdin is not None
    p.stdin.write(b"stats\n")
    p.stdin.flush()
    return int(wait_for_line(p, lambda line: line.startswith("stats")).split("=")[1])


def test_children_forked_during_rolling_commits_never_hang(tmp_path: Path, procs: Procs) -> None:
    """100 rolling apply/revert cycles of compute (an ordinary site) while a thread forks in a loop: every
    child forked during a commit is settled before it runs (its copy finished or undone), none hangs."""
    p, patch = _forker(tmp_path, procs, "int compute(int x) { return 3 * x + 2; }\n")
    before = _forks(p)
    with hotpatch.attach(p.pid) as target:
        for i in range(CYCLES):
            assert target.apply(str(patch), "rolling").protocol == "R"
            target.revert("fk", "rolling")
            assert p.poll() is None, f"the target exited {p.returncode} at cycle {i} (4: a child hung)"
    time.sleep(3.5)  # a child forked during the last commit would be reported hung by now
    assert p.poll() is None, f"the target exited {p.returncode} (4: a child hung)"
    assert _forks(p) > before + CYCLES  # children were forked throughout
    assert_running(p.pid)

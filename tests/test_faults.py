"""Faults in the target's own resources (issue 6, fault injection): its address space full, and a seccomp
filter forbidding ``mprotect``. Each time, with every protocol: ``apply`` fails with one line naming the
cause and exit 1, the function's bytes are untouched, ``status`` says no patch is applied, the target's
threads (calling the function in tight loops, checking every result) run on untraced, and once the fault is
gone (the limit lifted) the same patch applies and reverts.

SIGKILL of the tool at timed and exact points is tests/test_kill.py; a target already traced is
tests/test_bad_input.py; threads created and exiting mid-apply are tests/test_churn.py.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli
from test_sites import Answering, peek

PROTOCOLS = ["auto", "rolling", "stop-the-world"]  # (no-stop needs a ready site: compute has none)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``targets/faults.c`` and a patch making its ``compute`` return 2x + 2: (program, patch file)."""
    top = tmp_path_factory.mktemp("faults")
    exe = compile_program(TARGETS / "faults.c", top / "faults")
    src = top / "fix.c"
    src.write_text("long compute(long x) { return 2 * x + 2; }\n")
    patch = top / "fix.hp"
    res = run_cli("build", src, "--target", exe, "-o", patch, "--name", "fix")
    assert res.returncode == 0, res.stderr
    return exe, patch


def refused_untouched(t: Answering, patch: Path, protocol: str, cause: str) -> None:
    """``apply`` fails with exit 1 and one line naming ``cause``; nothing of the target changed."""
    entry = t.addrs["compute"]
    code = peek(t.pid, entry, 16)
    res = run_cli("apply", "--pid", t.pid, patch, "--protocol", protocol)
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("hotpatch: error: "), res.stderr
    assert cause in res.stderr and "internal error" not in res.stderr, res.stderr
    assert peek(t.pid, entry, 16) == code
    assert json.loads(run_cli("status", "--pid", t.pid, "--json").stdout)["patches"] == []
    assert t.ask(5) == {"x": 5, "compute": 11}
    assert_running(t.pid)


def applies_and_reverts(t: Answering, patch: Path, protocol: str) -> None:
    """The patch applies (the new value) and reverts (the old one); the target runs untraced."""
    res = run_cli("apply", "--pid", t.pid, patch, "--protocol", protocol)
    assert res.returncode == 0, res.stderr
    assert t.ask(5) == {"x": 5, "compute": 12}
    res = run_cli("revert", "--pid", t.pid, "fix", "--protocol", protocol)
    assert res.returncode == 0, res.stderr
    assert t.ask(5) == {"x": 5, "compute": 11}
    assert_running(t.pid)


def limit_address_space(pid: int) -> int:
    """Set ``pid``'s RLIMIT_AS to its present size (proc(5) VmSize), so that any new mapping fails with
    ENOMEM; return the old soft limit (prlimit(2))."""
    with open(f"/proc/{pid}/status") as f:
        size = int(next(ln for ln in f if ln.startswith("VmSize:")).split()[1]) * 1024
    old, _ = resource.prlimit(pid, resource.RLIMIT_AS, (size, resource.RLIM_INFINITY))
    return old


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_address_space_full(built: tuple[Path, Path], procs: Procs, protocol: str) -> None:
    """mmap fails in the target (RLIMIT_AS), first for hotpatch's record (a target never patched), then, once
    the record exists, for the patch itself."""
    exe, patch = built
    t = Answering.start(procs, exe)
    old = limit_address_space(t.pid)
    refused_untouched(t, patch, protocol, "Cannot allocate memory")
    resource.prlimit(t.pid, resource.RLIMIT_AS, (old, resource.RLIM_INFINITY))
    applies_and_reverts(t, patch, protocol)  # the record now exists
    limit_address_space(t.pid)
    refused_untouched(t, patch, protocol, "Cannot allocate memory")
    resource.prlimit(t.pid, resource.RLIMIT_AS, (old, resource.RLIM_INFINITY))
    applies_and_reverts(t, patch, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mprotect_forbidden(built: tuple[Path, Path], procs: Procs, protocol: str) -> None:
    """The target forbids itself every mprotect (seccomp, SECCOMP_RET_ERRNO EPERM) after start-up: no page of
    it may change protection, and hotpatch's loader and commit need that. (Before: an internal error, a
    SyscallError of the loader's mprotect escaping.)"""
    exe, patch = built
    t = Answering.start(procs, exe, "no-mprotect")
    refused_untouched(t, patch, protocol, "mprotect: Operation not permitted")
    refused_untouched(t, patch, protocol, "mprotect: Operation not permitted")  # a second try: the same
    assert run_cli("revert", "--pid", t.pid, "--all").returncode == 0
    assert t.ask(7) == {"x": 7, "compute": 15}
    assert_running(t.pid)

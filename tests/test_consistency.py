"""``apply --consistency stack`` (issue 4): a patch switches only once no thread has a replaced function on its
stack; with ``--timeout`` it gives up cleanly and writes nothing."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.consistency import StackBusy, Watched
from hotpatch.elf.image import open_elf
from hotpatch.process.maps import read_maps
from hotpatch.process.memory import Memory
from hotpatch.transaction import SiteChange, Transaction


def code_bytes(pid: int, exe: Path) -> bytes:
    """The bytes of every executable mapping of ``exe`` in ``pid``."""
    out = b""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(exe) and "x" in fields[1]:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                mem.seek(lo)
                out += mem.read(hi - lo)
    return out


def test_waits_for_parked_thread_and_times_out_cleanly(tmp_path: Path, procs: Procs) -> None:
    """A thread sleeping 3 s inside parked(): ``--timeout 1`` gives up after about 1 s with one line naming
    the thread and the function, and the code, the record and the thread are untouched (it returns the old
    value). A thread parked 2 s: apply waits until it has left (it returns the old value), then the new code
    runs."""
    exe = compile_program(TARGETS / "parked.c", tmp_path / "parked")
    patch = tmp_path / "parked.hp"
    assert run_cli("build", TARGETS / "parked_patch.c", "--target", exe, "-o", patch).returncode == 0
    proc = procs.start(exe, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    wait_for_line(proc, lambda s: s.startswith("ready"))

    def send(line: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()

    before = code_bytes(proc.pid, exe)
    send("park 3")
    wait_for_line(proc, lambda s: s.startswith("parked"))
    t0 = time.monotonic()
    res = run_cli("apply", "--pid", proc.pid, patch, "--consistency", "stack", "--timeout", "1")
    took = time.monotonic() - t0
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and "timed out" in res.stderr and "has parked on its stack" in res.stderr
    assert "nothing was written" in res.stderr
    assert 1.0 <= took < 2.9, took  # gave up at the deadline, before the thread left
    assert code_bytes(proc.pid, exe) == before
    st = json.loads(run_cli("status", "--pid", proc.pid, "--json").stdout)
    assert st["patches"] == []
    assert wait_for_line(proc, lambda s: s.startswith("left"), timeout=5).split() == ["left", "4"]
    assert_running(proc.pid)

    send("park 2")
    wait_for_line(proc, lambda s: s.startswith("parked"))
    t0 = time.monotonic()
    res = run_cli("apply", "--pid", proc.pid, patch, "--consistency", "stack", "--timeout", "20")
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert took >= 1.5, took  # it waited for the thread to leave parked()
    assert wait_for_line(proc, lambda s: s.startswith("left")).split() == ["left", "3"]  # the old code, whole
    send("call")
    assert wait_for_line(proc, lambda s: s.startswith("value")).split() == ["value", "100"]
    assert_running(proc.pid)


def test_consistency_needs_stop_protocol(tmp_path: Path, procs: Procs) -> None:
    """``--consistency stack`` with a protocol that never stops the world is refused in one line."""
    exe = compile_program(TARGETS / "parked.c", tmp_path / "parked")
    patch = tmp_path / "parked.hp"
    assert run_cli("build", TARGETS / "parked_patch.c", "--target", exe, "-o", patch).returncode == 0
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda s: s.startswith("ready"))
    res = run_cli("apply", "--pid", proc.pid, patch, "--consistency", "stack", "--protocol", "rolling")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "--protocol auto" in res.stderr, res.stderr
    assert json.loads(run_cli("status", "--pid", proc.pid, "--json").stdout)["patches"] == []


def test_stopped_world_check_writes_nothing(tmp_path: Path, procs: Procs) -> None:
    """The check made with every thread stopped (the one that closes the race with the wait before it): a
    parked thread found inside makes the commit raise StackBusy before its first write, and releases every
    thread."""
    exe = compile_program(TARGETS / "parked.c", tmp_path / "parked")
    proc = procs.start(exe, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    wait_for_line(proc, lambda s: s.startswith("ready"))
    proc.stdin.write(b"park 3\n")
    proc.stdin.flush()
    wait_for_line(proc, lambda s: s.startswith("parked"))
    img = open_elf(str(exe))
    try:
        syms = img.function_symbols()
        bias = next(m.start - m.offset for m in read_maps(proc.pid) if m.path == str(exe) and m.offset == 0)
        parked, never = syms["parked"], syms["never_called"]
    finally:
        img.close()
    with Memory(proc.pid) as mem:
        site = bias + never.value
        old = mem.read(site, 5)
        txn = Transaction(proc.pid, mem)
        txn.add(SiteChange(site, old, b"\xcc" * 5, "never_called"))
        start = bias + parked.value
        with pytest.raises(StackBusy, match="has parked on its stack"):
            txn.commit(clear=[Watched(start, start + parked.size, "parked")])
        assert mem.read(site, 5) == old
    assert_running(proc.pid)
    assert wait_for_line(proc, lambda s: s.startswith("left"), timeout=5).split() == ["left", "4"]

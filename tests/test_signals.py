"""Signals arriving while hotpatch works are never lost (issue 2: "re-inject signals that arrive meanwhile").

Real-time signals queue instead of merging, so every one sent must be handled exactly once. The test sends
SIGRTMIN to the target at ~2 kHz, half of them at the thread hotpatch injects system calls through, while
applying and reverting a patch in a loop (every stop, injection and
commit of hotpatch happens during the flood), then compares the target's count with the number sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import hotpatch
from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.process.ptrace import tgkill


@pytest.mark.parametrize("protocol", ["auto", "rolling", "stop-the-world"])
def test_no_signal_lost_during_apply_and_revert(tmp_path: Path, procs: Procs, protocol: str) -> None:
    """2,000 queued signals during 40 apply/revert cycles with each protocol (auto: the int3 protocol A for
    the target's opportunistic site): all handled, no wrong value, target running, never left stopped."""
    exe = compile_program(TARGETS / "signals.c", tmp_path / "signals")
    src = tmp_path / "fix.c"
    src.write_text("long compute(long x) { return x + 1000; }\n")
    patch = tmp_path / "fix.hp"
    assert run_cli("build", src, "--target", exe, "-o", patch, "--name", "fix").returncode == 0
    proc = procs.start(exe, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    wait_for_line(proc, lambda s: s.startswith("ready"))
    sent = 0
    done = threading.Event()

    def flood() -> None:
        nonlocal sent
        deadline = time.monotonic() + 60
        while not done.is_set() and sent < 2000 and time.monotonic() < deadline:
            if sent % 2:
                os.kill(proc.pid, signal.SIGRTMIN)
            else:  # at the main thread, the one hotpatch injects through (it sleeps in read)
                tgkill(proc.pid, proc.pid, signal.SIGRTMIN)
            sent += 1
            time.sleep(0.0005)

    sender = threading.Thread(target=flood)
    sender.start()
    try:
        with hotpatch.attach(proc.pid) as target:
            for _ in range(40):
                rep = target.apply(str(patch), protocol)
                assert rep.protocol == {"auto": "A", "rolling": "R", "stop-the-world": "B"}[protocol]
                target.revert("fix", protocol)
    finally:
        sender.join(timeout=90)
        done.set()
    assert sent >= 500, f"the flood was too slow to overlap the cycles ({sent} signals)"
    deadline = time.monotonic() + 10
    while True:  # queued signals are handled shortly after the last one was sent
        proc.stdin.write(b"?\n")
        proc.stdin.flush()
        handled = int(wait_for_line(proc, lambda s: s.startswith("handled")).split()[1])
        if handled >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert handled == sent, f"{sent - handled} of {sent} signals were lost"
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    assert_running(proc.pid)

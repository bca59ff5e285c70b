"""Starting processes and always reaping them: shared by the tests (``conftest.procs``) and the benchmarks.

Every process started through :class:`Procs` is, at the end, killed by PID (SIGKILL) if still running and
waited for, whether the caller finished normally or failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


class Procs:
    """Starts processes (stdout and stderr to ``output`` unless given) and reaps them all in :meth:`reap`,
    which a ``with`` block calls on exit."""

    def __init__(self, output: int = subprocess.PIPE) -> None:
        self.output = output
        self.started: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reap()

    def start(self, *argv: str | Path, **kw: object) -> subprocess.Popen[bytes]:
        """Start ``argv``; it is registered for reaping."""
        kw.setdefault("stdout", self.output)
        kw.setdefault("stderr", self.output)
        p = subprocess.Popen([str(a) for a in argv], **kw)  # type: ignore[call-overload]
        self.started.append(p)
        return p

    def reap(self) -> None:
        """Kill (by PID) and wait for every started process still running; close their pipes."""
        for p in self.started:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            if p.poll() is None:  # threads still traced by this process (the API used in-process): reap them
                for tid in _tasks(p.pid):
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(tid, 0x40000000 | os.WNOHANG)  # __WALL
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()

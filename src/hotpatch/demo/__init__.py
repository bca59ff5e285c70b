"""``hotpatch demo``: build a small multithreaded C++ program, patch it live, revert, stop it.

Needs only gcc and g++. The program (``demo.cc``) prints, as in seed 004, ``Hello, from C function! 42`` and
``Hello, from C++ member function! 42``; the patch (``demo_patch.c``) makes both print ``Completely patched!
…``. The demo checks that the output really changed and changed back, and fails otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from ..errors import HotpatchError

ORIGINAL = ("Hello, from C function! 42", "Hello, from C++ member function! 42")
PATCHED = ("Completely patched! from C function! 42", "Completely patched! from C++ member function! 42")


class _Tail:
    """Echoes the program's output lines and keeps them, in a background thread."""

    def __init__(self, stream: object, echo: Callable[[str], None]) -> None:
        self.lines: list[str] = []
        self._stream = stream
        self._echo = echo
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for raw in self._stream:  # type: ignore[attr-defined]
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            self._echo(f"    program | {line}")

    def since(self, mark: int) -> list[str]:
        """Lines printed after the first ``mark`` lines."""
        return self.lines[mark:]


def _compile(src: Path, out: Path) -> None:
    res = subprocess.run(
        ["g++", "-O2", "-pthread", "-std=c++17", str(src), "-o", str(out)], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise HotpatchError(f"compiling the demo program failed: {res.stderr.strip().splitlines()[:1]}")


def _demangle(symbols: list[str]) -> list[str]:
    """C++ names as people read them (binutils' c++filt, installed with objcopy); unchanged on failure."""
    try:
        res = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return symbols
    names = res.stdout.splitlines()
    return names if len(names) == len(symbols) else symbols


def _expect(lines: list[str], wanted: tuple[str, ...], phase: str) -> None:
    for w in wanted:
        if w not in lines:
            raise HotpatchError(f"demo: expected '{w}' {phase}, the program printed {lines[-4:]}")


def run(seconds: float, echo: Callable[[str], None]) -> None:
    """Run the whole demo, printing through ``echo``. Raises HotpatchError when a step fails."""
    from ..api import attach
    from ..patch.build import build

    pkg = resources.files("hotpatch") / "demo"
    with tempfile.TemporaryDirectory(prefix="hotpatch-demo-") as tmp:
        work = Path(tmp)
        exe, patch = work / "demo", work / "demo.hp"
        echo("[demo] building the demo program: g++ -O2 -pthread demo.cc -o demo")
        _compile(Path(str(pkg / "demo.cc")), exe)
        proc = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            echo(f"[demo] started PID {proc.pid}")
            tail = _Tail(proc.stdout, echo)
            time.sleep(seconds)
            _expect(tail.lines, ORIGINAL, "before the patch")
            echo(f"[demo] hotpatch build demo_patch.c --target {exe.name} -o {patch.name}")
            res = build([str(pkg / "demo_patch.c")], str(exe), str(patch), name="demo-fix", version=1)
            echo(f"[demo]   replaces {', '.join(_demangle([f.symbol for f in res.manifest.functions]))}")
            with attach(proc.pid) as target:
                echo(f"[demo] hotpatch apply --pid {proc.pid} {patch.name}")
                rep = target.apply(str(patch))
                echo(
                    f"[demo]   applied: {len(rep.sites)} sites, {rep.threads} threads stopped for {rep.pause_us:.0f} µs"
                )
                mark = len(tail.lines)
                time.sleep(seconds)
                _expect(tail.since(mark), PATCHED, "after apply")
                for p in target.status().patches:
                    names = _demangle([s.symbol for s in p.sites])
                    echo(
                        f"[demo] hotpatch status --pid {proc.pid}: {p.name} version {p.version} {p.state}, "
                        + ", ".join(f"{n} at {s.site:#x}" for n, s in zip(names, p.sites, strict=True))
                    )
                echo(f"[demo] hotpatch revert --pid {proc.pid} demo-fix")
                target.revert("demo-fix")
                mark = len(tail.lines)
                time.sleep(seconds)
                _expect(tail.since(mark), ORIGINAL, "after revert")
            echo(f"[demo] stopping PID {proc.pid}")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=5)
            echo("[demo] done: the program was patched and restored while it ran")
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

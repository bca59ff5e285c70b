"""Helpers shared by the benchmark scripts: compiling targets, starting and reaping processes, reading a
target's memory, medians and Markdown tables.

Every process a benchmark starts goes through :class:`Procs`, which kills (by PID) and waits for each one
that is still running when the benchmark ends, whatever happened.
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from procs import Procs as _Procs


def command_line() -> str:
    """The command that runs this benchmark, as a user would type it."""
    script = os.path.relpath(sys.argv[0])
    return shlex.join(["python", script, *sys.argv[1:]])


def hotpatch_cmd() -> list[str]:
    """The ``hotpatch`` console script as a shell would find it (else ``python -m hotpatch``)."""
    exe = shutil.which("hotpatch")
    return [exe] if exe else [sys.executable, "-m", "hotpatch"]


def compile_c(source: str, out: Path, *flags: str) -> Path:
    """Write ``source`` next to ``out`` and compile it with ``gcc -O2 -pthread FLAGS``; exit on failure."""
    src = out.with_suffix(".c")
    src.write_text(source)
    cmd = ["gcc", "-O2", "-g0", "-pthread", *flags, str(src), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed:\n{res.stderr}")
    return out


def hotpatch_build(source: str, target: Path, out: Path, name: str) -> Path:
    """``hotpatch build`` of the C ``source`` for ``target`` into the patch file ``out``; exit on failure."""
    src = out.with_suffix(".c")
    src.write_text(source)
    cmd = [*hotpatch_cmd(), "build", str(src), "--target", str(target), "-o", str(out), "--name", name]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed:\n{res.stderr}")
    return out


def run_checked(cmd: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; exit the benchmark with its stderr when it fails."""
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} exited {res.returncode}:\n{res.stderr or res.stdout}")
    return res


def timed_run(cmd: Sequence[str], timeout: float = 60) -> float:
    """Wall time in seconds of running ``cmd`` to completion (exit on failure)."""
    t0 = time.perf_counter()
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} exited {res.returncode}:\n{res.stderr or res.stdout}")
    return elapsed


class Procs(_Procs):
    """:class:`procs.Procs` (tests/procs.py) with output discarded unless a caller asks for it."""

    def __init__(self) -> None:
        super().__init__(output=subprocess.DEVNULL)


def start_target(procs: Procs, exe: Path, *args: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """Start a benchmark target, which first prints one line ``addresses NAME=0xADDR ...`` (the runtime
    addresses of its functions, so no ELF reading is needed); return the process and those addresses."""
    proc = procs.start(exe, *args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    if not line or line[0] != "addresses":
        sys.exit(f"{exe} did not print its addresses (exit {proc.poll()})")
    return proc, {k: int(v, 16) for k, v in (item.split("=") for item in line[1:])}


def read_mem(pid: int, addr: int, n: int) -> bytes:
    """``n`` bytes of process ``pid`` at ``addr`` (through /proc/PID/mem)."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(n)


def median(xs: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return float(statistics.median(xs))


def ratio(x: float, base: float) -> str:
    """``x / base`` formatted as ``1.23×`` (``—`` when the base is 0)."""
    return f"{x / base:.2f}×" if base else "—"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing the machine (CPU model, CPUs, kernel) for the report."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    load = os.getloadavg()[0]
    return f"{model}, {os.cpu_count()} CPUs, Linux {os.uname().release}, load average {load:.2f}"

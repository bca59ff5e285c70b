"""Shared fixtures: build C/C++ programs with gcc at test time, start them, and always reap them.

Every process a test starts goes through ``procs.start``; at teardown each one still alive is killed by PID
(SIGKILL) and waited for, whether the test passed or failed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.elf.image import open_elf
from procs import Procs

__all__ = [
    "INJECTOR_SETUP",
    "TARGETS",
    "Procs",
    "assert_running",
    "assert_runs_stripped",
    "compile_program",
    "free_port",
    "run_cli",
    "thread_states",
    "wait_for_line",
]

TARGETS = Path(__file__).parent / "targets"
# hotpatch's home (trusted repository, verified cache) for the whole run: an empty one, so no test depends on
# what this machine trusts in /var/lib/hotpatch; the repository tests give each run_cli a home of their own
os.environ["HOTPATCH_HOME"] = tempfile.mkdtemp(prefix="hotpatch-home-")

# For scripts that inject into thread ``tid`` of ``pid`` (names they define, with remote, read_maps, Memory and
# World imported): finds the stub area and prints it, stops the thread, makes ``inject``.
INJECTOR_SETUP = """\
mem = Memory(pid)
area = remote.find_stub_area(pid, read_maps(pid), mem)
print(hex(area), flush=True)
world = World(pid)
world.seize_thread(tid)
world.stop([tid])
inject = remote.Injector(world, mem, area, world.threads[tid])
"""


def compile_program(src: Path, out: Path, *flags: str, shared: bool = False) -> Path:
    """Compile ``src`` (C or C++) with gcc/g++ into ``out``; fail the test with the compiler's message."""
    cxx = src.suffix in (".cc", ".cpp")
    cmd = ["g++" if cxx else "gcc", "-O2", "-g0", "-pthread", *flags]
    if shared:
        cmd += ["-shared", "-fPIC"]
    cmd += [str(src), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (a server given it may still lose a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Start processes for one test; all are killed and reaped afterwards."""
    ps = Procs()
    try:
        yield ps
    finally:
        ps.reap()


def run_cli(*args: str | Path, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hotpatch ARGS`` and return the completed process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "hotpatch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,
    )  # type: ignore[call-overload]


def wait_for_line(proc: subprocess.Popen[bytes], predicate: object, timeout: float = 10.0) -> str:
    """Read ``proc``'s stdout lines until ``predicate(line)`` holds; return that line."""
    assert proc.stdout is not None
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line:
            raise AssertionError(f"process {proc.pid} closed its output (exit {proc.poll()})")
        if predicate(line):
            return line
    raise AssertionError(f"no expected line from process {proc.pid} within {timeout} s")


def thread_states(pid: int) -> list[str]:
    """The scheduler state letter of every thread of ``pid`` (e.g. R, S, T, t)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            pass
    return out


def assert_running(pid: int) -> None:
    """The target is alive, not a zombie, no thread stopped or traced, and has no tracer."""
    assert os.path.exists(f"/proc/{pid}"), f"PID {pid} is gone"
    states = thread_states(pid)
    assert states and not any(s in "TtZX" for s in states), f"PID {pid} thread states {states}"
    with open(f"/proc/{pid}/status") as f:
        tracer = next(line for line in f if line.startswith("TracerPid:")).split()[1]
    assert tracer == "0", f"PID {pid} is still traced by {tracer}"


def assert_runs_stripped(pid: int, file: str) -> None:
    """Process ``pid`` runs ``file`` (same build-id: a patch built against the file fits the process), and the
    file is stripped (no ``.symtab``: a patch can only use its ``.dynsym`` names), as Debian ships its programs."""
    exe, built = open_elf(f"/proc/{pid}/exe", "module"), open_elf(file, "target")
    try:
        assert exe.build_id is not None and exe.build_id == built.build_id, f"PID {pid} does not run {file}"
        assert not built.has_symtab, f"expected a stripped {file}"
    finally:
        exe.close()
        built.close()


@pytest.fixture(scope="module")
def lib_program(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``targets/libsite.c`` built as ``libsite.so`` and ``targets/libmain.c`` (a PIE) linked against it:
    (library, program)."""
    top = tmp_path_factory.mktemp("lib")
    so = compile_program(TARGETS / "libsite.c", top / "libsite.so", "-falign-functions=1", shared=True)
    exe = compile_program(TARGETS / "libmain.c", top / "libmain", "-Wl,--no-as-needed", str(so), f"-Wl,-rpath,{top}")
    return so, exe

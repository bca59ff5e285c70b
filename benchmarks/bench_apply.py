"""``hotpatch apply`` end to end from the shell, beside gdb and Frida doing the same redirect.

Each tool redirects ``compute`` of a small running C program (PIE, -O2, one thread calling ``compute`` in a
loop) and is timed as a shell would run it (wall time of the whole subprocess):

* hotpatch: ``hotpatch apply --pid PID patch.hp``; apply and revert alternate, only apply is timed.
* gdb: ``gdb -p PID -batch -ex 'set {unsigned char[5]}ADDR = {0xe9, …}'``, the same 5-byte ``jmp rel32`` at
  the entry (to ``compute_alt``, an identical function in the program, so the target keeps running
  correctly); gdb writing the original bytes back alternates with it, untimed.
* Frida (``pip install frida`` is tried when it is missing; the row says so when that fails): ``python -c``
  attaching, ``Interceptor.replace(compute, compute_alt)``, detaching (as ANCHORS.md measured it; detaching
  unloads the agent, which reverts). A run after which the target died is counted, not timed.
* ``python -c pass``: the interpreter's own start-up on this machine, the floor of any Python CLI; and
  ``hotpatch.attach(pid).apply(path)`` in the benchmark's own process: the work without start-up.

Each tool gets its own target process. Figures are medians of ``--runs`` runs, with ratios against hotpatch.
Usage: ``python benchmarks/bench_apply.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    Procs,
    command_line,
    compile_c,
    hotpatch_build,
    hotpatch_cmd,
    machine,
    markdown_table,
    median,
    ratio,
    read_mem,
    run_checked,
    start_target,
    timed_run,
)

TARGET = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((noipa)) long compute(long x) { long y = x * 2654435761L; y ^= y >> 13; return y + 7; }
__attribute__((noipa)) long compute_alt(long x) { long y = x * 2654435761L; y ^= y >> 13; return y + 7; }
int main(void)
{
    volatile long sink = 0;
    printf("addresses compute=%p compute_alt=%p\n", (void *)compute, (void *)compute_alt);
    fflush(stdout);
    for (;;) {
        for (long i = 0; i < 1000; i++)
            sink += compute(i);
        usleep(1000);
    }
}
"""

PATCH = r"""
long compute(long x) { long y = x * 2654435761L; y ^= y >> 13; return y + 7; }
"""

FRIDA_SCRIPT = r"""
import sys, frida
pid, addr, alt, check = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
session = frida.attach(pid)
script = session.create_script(
    "Interceptor.replace(ptr('%s'), ptr('%s'));"
    "rpc.exports = { first: function () { return ptr('%s').readU8(); } };" % (addr, alt, addr))
script.load()
if check:
    print(script.exports_sync.first())
session.detach()
"""

GDB_BASE = ["gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off", "-iex", "set auto-load off"]


def gdb_write_cmd(pid: int, addr: int, data: bytes) -> list[str]:
    """gdb batch command writing ``data`` at ``addr`` of process ``pid``."""
    values = ", ".join(f"{b:#04x}" for b in data)
    return [*GDB_BASE, "-p", str(pid), "-ex", f"set {{unsigned char[{len(data)}]}}{addr:#x} = {{{values}}}"]


def jmp_rel32(site: int, dest: int) -> bytes:
    """``E9 rel32`` at ``site`` jumping to ``dest``."""
    return b"\xe9" + (dest - site - 5).to_bytes(4, "little", signed=True)


def frida_available() -> bool:
    """True when the frida Python package imports, after trying ``pip install frida`` once if it did not."""
    probe = [sys.executable, "-c", "import frida"]
    if subprocess.run(probe, capture_output=True, check=False, timeout=120).returncode == 0:
        return True
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "frida"], capture_output=True,
                       check=False, timeout=300)
    except subprocess.TimeoutExpired:
        return False
    return subprocess.run(probe, capture_output=True, check=False, timeout=120).returncode == 0


def main() -> None:
    """Build the target and the patch, time each tool ``--runs`` times, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=11, help="timed runs per tool (default 11)")
    args = ap.parse_args()
    hp = hotpatch_cmd()
    results: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmpdir, Procs() as procs:
        tmp = Path(tmpdir)
        exe = compile_c(TARGET, tmp / "target")
        patch = hotpatch_build(PATCH, exe, tmp / "patch.hp", "bench")

        # floor: the interpreter's start-up
        results["python -c pass"] = [timed_run([sys.executable, "-c", "pass"]) for _ in range(args.runs)]

        # hotpatch
        t, fns = start_target(procs, exe)
        addr = fns["compute"]
        original = read_mem(t.pid, addr, 5)
        times = []
        for _ in range(args.runs):
            times.append(timed_run([*hp, "apply", "--pid", str(t.pid), str(patch)]))
            if read_mem(t.pid, addr, 1) != b"\xe9":
                sys.exit("hotpatch apply did not write a jump at compute")
            run_checked([*hp, "revert", "--pid", str(t.pid), "bench"])
            if read_mem(t.pid, addr, 5) != original:
                sys.exit("hotpatch revert did not restore compute")
        results["hotpatch apply"] = times

        # the same through the Python API, in this process (no interpreter start-up, imports done)
        import hotpatch

        times = []
        with hotpatch.attach(t.pid) as target:
            for _ in range(args.runs):
                t0 = time.perf_counter()
                target.apply(str(patch))
                times.append(time.perf_counter() - t0)
                target.revert("bench")
        results["hotpatch API apply"] = times
        if t.poll() is not None:
            sys.exit("the hotpatch target died")

        # gdb
        if shutil.which("gdb"):
            t, fns = start_target(procs, exe)
            addr, alt = fns["compute"], fns["compute_alt"]
            original = read_mem(t.pid, addr, 5)
            jump = jmp_rel32(addr, alt)
            times = []
            for _ in range(args.runs):
                times.append(timed_run(gdb_write_cmd(t.pid, addr, jump)))
                if read_mem(t.pid, addr, 5) != jump:
                    sys.exit("gdb did not write the jump")
                run_checked(gdb_write_cmd(t.pid, addr, original))
            results["gdb batch write"] = times
            if t.poll() is not None:
                sys.exit("the gdb target died")
        else:
            notes["gdb batch write"] = "gdb: not installed here"

        # Frida: its detach reverts the replacement while the target calls the function (ANCHORS.md saw
        # that crash targets); a target that dies is counted, replaced, and the run is not timed
        if frida_available():
            times, crashes, attempts = [], [], 0
            while len(times) < args.runs and attempts < 3 * args.runs:
                attempts += 1
                if attempts == 1 or t.poll() is not None:
                    t, fns = start_target(procs, exe)
                    addr, alt = fns["compute"], fns["compute_alt"]
                    cmd = [sys.executable, "-c", FRIDA_SCRIPT, str(t.pid), hex(addr), hex(alt)]
                    if attempts == 1:
                        before = read_mem(t.pid, addr, 1)[0]
                        first = run_checked([*cmd, "1"], timeout=120).stdout.strip()
                        if first in ("", str(before)):
                            sys.exit(f"Frida did not change compute's first byte (reads {first})")
                t0 = time.perf_counter()
                res = subprocess.run([*cmd, "0"], capture_output=True, text=True, timeout=120, check=False)
                elapsed = time.perf_counter() - t0
                time.sleep(0.05)  # let a crash caused by the detach show
                if t.poll() is not None:
                    crashes.append(f"{t.returncode}")
                    continue
                if res.returncode != 0:
                    sys.exit(f"Frida failed on a live target:\n{res.stderr}")
                times.append(elapsed)
            results["frida Interceptor.replace"] = times
            if crashes:
                notes["frida crashes"] = (f"Frida killed its target in {len(crashes)} of {len(times) + len(crashes)} "
                                          f"runs (exit statuses {', '.join(sorted(set(crashes)))}); those runs are "
                                          "not timed")
        else:
            notes["frida Interceptor.replace"] = "frida: not installable here"

    base = median(results["hotpatch apply"])
    what = {
        "python -c pass": "interpreter start-up only (floor)",
        "hotpatch apply": "`hotpatch apply --pid PID patch.hp` (revert between runs, untimed)",
        "hotpatch API apply": "`hotpatch.attach(pid).apply(path)` in the benchmark's process",
        "gdb batch write": "`gdb -p PID -batch -ex 'set {unsigned char[5]}ADDR = {0xe9,…}'`",
        "frida Interceptor.replace": "`python -c` frida.attach + Interceptor.replace + detach",
    }
    rows: list[list[object]] = []
    tools = ("hotpatch apply", "gdb batch write", "frida Interceptor.replace", "hotpatch API apply",
             "python -c pass")
    for tool in tools:
        if tool in results:
            xs = results[tool]
            rows.append([tool, what[tool], f"{median(xs) * 1e3:.1f}", f"{min(xs) * 1e3:.1f}",
                         f"{max(xs) * 1e3:.1f}", ratio(median(xs), base)])
        else:
            rows.append([tool, notes[tool], "—", "—", "—", "—"])
    print(f"`{command_line()}`  \n{machine()}; {args.runs} runs per tool, wall time of the whole command\n")
    print(markdown_table(["tool", "what is timed", "median ms", "min ms", "max ms", "vs hotpatch"], rows))
    if "frida crashes" in notes:
        print(f"\n{notes['frida crashes']}.")


if __name__ == "__main__":
    main()

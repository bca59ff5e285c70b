"""Cost of a call through a patched site against a direct call (ns per call).

The target runs, on request (a line on its stdin), a timing loop of ``--calls`` calls of a ``noipa``
function ``work`` and prints the ns per call (CLOCK_MONOTONIC around the loop). It is measured in three
states, interleaved round by round so drift of this shared machine hits all three alike:

* unpatched: the direct call;
* patched, the replacement doing the same work itself: call → ``jmp rel32`` at the site → replacement;
* patched, the replacement calling ``HOTPATCH_ORIGINAL(work)(x)``: call → site jump → replacement →
  indirect call through the patch's slot → trampoline (the overwritten instructions, relocated) → jump back
  into ``work``.

Patches are applied and reverted with the Python API between measurements (never during one). The table
gives medians over rounds and the difference and ratio against the direct call.
Usage: ``python benchmarks/bench_call.py [--rounds N] [--calls N]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import Procs, command_line, compile_c, hotpatch_build, machine, markdown_table, median, ratio

TARGET = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noipa)) unsigned long work(unsigned long x)
{
    x ^= x >> 17;
    x *= 0x9E3779B97F4A7C15ul;
    return x ^ (x >> 29);
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(void)
{
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        long n = atol(line);
        unsigned long acc = 0;
        double t0 = now_ns();
        for (long i = 0; i < n; i++)
            acc += work((unsigned long)i);
        double t1 = now_ns();
        printf("%.4f %lu\n", (t1 - t0) / n, acc);
    }
    return 0;
}
"""

SAME_WORK = r"""
unsigned long work(unsigned long x)
{
    x ^= x >> 17;
    x *= 0x9E3779B97F4A7C15ul;
    return x ^ (x >> 29);
}
"""

VIA_ORIGINAL = r"""
#include <hotpatch.h>

unsigned long work(unsigned long x);

unsigned long work(unsigned long x)
{
    return HOTPATCH_ORIGINAL(work)(x);
}
"""


def measure(proc: subprocess.Popen[bytes], calls: int) -> tuple[float, int]:
    """Ask the target for one timing loop of ``calls`` calls; return (ns per call, checksum)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{calls}\n".encode())
    proc.stdin.flush()
    line = proc.stdout.readline().decode()
    if not line:
        sys.exit(f"the target exited (status {proc.poll()})")
    ns, acc = line.split()
    return float(ns), int(acc)


def main() -> None:
    """Build the target and the two patches, run the interleaved rounds, print the table."""
    import hotpatch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9, help="rounds, each measuring all three states (default 9)")
    ap.add_argument("--calls", type=int, default=50_000_000, help="calls per timing loop (default 5e7)")
    args = ap.parse_args()
    states = ("direct call (unpatched)", "patched: replacement does the work",
              "patched: replacement calls HOTPATCH_ORIGINAL")
    ns: dict[str, list[float]] = {s: [] for s in states}
    with tempfile.TemporaryDirectory(prefix="bench-call-") as tmpdir, Procs() as procs:
        tmp = Path(tmpdir)
        exe = compile_c(TARGET, tmp / "target")
        same = hotpatch_build(SAME_WORK, exe, tmp / "same.hp", "same")
        orig = hotpatch_build(VIA_ORIGINAL, exe, tmp / "orig.hp", "orig")
        proc = procs.start(exe, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            sys.exit("the target did not start")
        measure(proc, args.calls // 10)  # warm up
        checksum = None
        with hotpatch.attach(proc.pid) as target:
            for _ in range(args.rounds):
                for state, patch, name in ((states[0], None, None), (states[1], same, "same"),
                                           (states[2], orig, "orig")):
                    if patch is not None:
                        target.apply(str(patch))
                    try:
                        value, acc = measure(proc, args.calls)
                    finally:
                        if name is not None:
                            target.revert(name)
                    if checksum is None:
                        checksum = acc
                    elif acc != checksum:
                        sys.exit(f"{state}: the loop computed {acc}, the unpatched one {checksum}")
                    ns[state].append(value)

    base = median(ns[states[0]])
    print(f"`{command_line()}`  \n{machine()}; {args.rounds} rounds of {args.calls:,} calls per state, "
          "medians over rounds; every state computed the same checksum\n")
    rows = []
    for s in states:
        m = median(ns[s])
        rows.append([s, f"{m:.3f}", f"{min(ns[s]):.3f}", f"{m - base:+.3f}", ratio(m, base)])
    print(markdown_table(["call", "ns/call (median)", "ns/call (min)", "vs direct (ns)", "vs direct"], rows))


if __name__ == "__main__":
    main()

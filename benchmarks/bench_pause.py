"""The longest time any target thread is stopped during ``apply``, for 1 and 16 threads.

The target's threads each run a loop that calls ``compute`` (the function being patched), reads
CLOCK_MONOTONIC and keeps the largest gap between two iterations in a shared-memory slot. To keep 16 threads
from queueing on this machine's few CPUs, every thread spins for ``SPIN_US`` then sleeps ``SLEEP_US`` (timer
slack 1 ns); the gap across a sleep counts only its lateness beyond the requested time. A thread stopped by
ptrace cannot run or wake, so a stop of P µs shows as a gap of about P µs in every thread it hits.

On a shared VM the raw gap also holds time spent waiting for a CPU. So each iteration also computes its
*not-runnable* gap: wall time minus the thread's CPU time (CLOCK_THREAD_CPUTIME_ID) minus its run-queue wait
(``/proc/thread-self/schedstat``, field 2; a sample is retaken when that changed while it was read) minus the
requested sleep: the time the thread could not run at all, which is where a ptrace stop goes and CPU
contention does not (steal time of the hypervisor does).

Rounds alternate: *apply* (reset the slots, ``hotpatch.attach(pid).apply(patch)`` from this process, read
them), *baseline* (reset, keep this process busy as long as the apply took, read), then *revert* measured
like apply. The tables give, per thread count, the median over rounds of the largest gap of any thread (the
worst round in brackets) and hotpatch's own ``pause_us``; then gdb batch mode writing the same 5-byte jump,
measured the same way.

Usage: ``python benchmarks/bench_pause.py [--rounds N] [--gdb-rounds N] [--protocol P] [--ready] [--threads 1,16]``
(``--ready`` builds the target with ``hotpatch cflags``, so its site gets protocol A).
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import struct
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
)

MAX_THREADS = 64
SPIN_US = 20
SLEEP_US = 300
SHM_BYTES = 4096 * 4
# uint64 slots: [0] generation; per thread i: [1+i] max gap ns, [1+T+i] generation seen, [1+2T+i] iterations,
# [1+3T+i] max not-runnable gap ns (T = MAX_THREADS)
GAP, SEEN, ITERS, BLOCKED = (1 + k * MAX_THREADS for k in range(4))

TARGET = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

/* MAXT, SPIN_NS, SLEEP_NS and SHM_BYTES come from -D flags */
#define GAP (1)
#define SEEN (1 + MAXT)
#define ITERS (1 + 2 * MAXT)
#define BLOCKED (1 + 3 * MAXT)

static volatile uint64_t *shm;

__attribute__((noipa)) long compute(long x) { long y = x * 2654435761L; y ^= y >> 13; return y + 7; }
__attribute__((noipa)) long compute_alt(long x) { long y = x * 2654435761L; y ^= y >> 13; return y + 7; }

static uint64_t clk(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static uint64_t run_delay(int fd)    /* ns this thread waited on a run queue (schedstat field 2) */
{
    char buf[128];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = buf;
    while (*p && *p != ' ') p++;
    return strtoull(p, NULL, 10);
}

static void *worker(void *arg)
{
    long id = (long)arg;
    volatile long sink = 0;
    uint64_t gen = ~0ull, maxgap = 0, maxblk = 0, iters = 0, slept = 0;
    int fd = open("/proc/thread-self/schedstat", O_RDONLY);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    uint64_t prev = clk(CLOCK_MONOTONIC), pcpu = clk(CLOCK_THREAD_CPUTIME_ID), pdel = run_delay(fd);
    uint64_t burst = prev;
    for (;;) {
        sink += compute((long)iters);
        /* a consistent sample: retry when the thread waited for a CPU between the reads */
        uint64_t t, c, d, d2;
        do {
            d = run_delay(fd);
            t = clk(CLOCK_MONOTONIC);
            c = clk(CLOCK_THREAD_CPUTIME_ID);
            d2 = run_delay(fd);
        } while (d2 != d);
        int64_t gap = (int64_t)(t - prev - slept);
        int64_t blk = gap - (int64_t)(c - pcpu) - (int64_t)(d - pdel);
        prev = t; pcpu = c; pdel = d;
        if (slept) burst = t;
        slept = 0;
        uint64_t g = __atomic_load_n(&shm[0], __ATOMIC_ACQUIRE);
        if (g != gen) {
            gen = g;
            maxgap = maxblk = 0;
            __atomic_store_n(&shm[GAP + id], 0, __ATOMIC_RELAXED);
            __atomic_store_n(&shm[BLOCKED + id], 0, __ATOMIC_RELAXED);
            __atomic_store_n(&shm[SEEN + id], g, __ATOMIC_RELEASE);
        } else {
            if (gap > (int64_t)maxgap) {
                maxgap = gap;
                __atomic_store_n(&shm[GAP + id], maxgap, __ATOMIC_RELAXED);
            }
            if (blk > (int64_t)maxblk) {
                maxblk = blk;
                __atomic_store_n(&shm[BLOCKED + id], maxblk, __ATOMIC_RELAXED);
            }
        }
        __atomic_store_n(&shm[ITERS + id], ++iters, __ATOMIC_RELAXED);
        if (t - burst > SPIN_NS) {
            struct timespec req = {0, SLEEP_NS};
            nanosleep(&req, NULL);
            slept = SLEEP_NS;
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) return 2;
    int n = atoi(argv[1]);
    int fd = open(argv[2], O_RDWR);
    if (n < 1 || n > MAXT || fd < 0) return 2;
    shm = mmap(NULL, SHM_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (shm == MAP_FAILED) return 3;
    printf("addresses compute=%p compute_alt=%p\n", (void *)compute, (void *)compute_alt);
    fflush(stdout);
    pthread_t th;
    for (long i = 1; i < n; i++)
        pthread_create(&th, NULL, worker, (void *)i);
    worker((void *)0);
    return 0;
}
"""

PATCH = r"""
long compute(long x) { long y = x * 2654435761L; y ^= y >> 13; return y + 7; }
"""

GDB_BASE = ["gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off", "-iex", "set auto-load off"]


class Gaps:
    """The shared-memory slots of one target with ``threads`` threads."""

    def __init__(self, path: Path, threads: int) -> None:
        self.threads = threads
        self.fd = os.open(path, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, SHM_BYTES)
        self.gen = 0

    def close(self) -> None:
        """Unmap and close."""
        self.mm.close()
        os.close(self.fd)

    def _get(self, i: int) -> int:
        """The uint64 slot ``i``."""
        return int(struct.unpack_from("<Q", self.mm, 8 * i)[0])

    def reset(self, timeout: float = 5.0) -> None:
        """Start a new measurement: bump the generation and wait until every thread has seen it."""
        self.gen += 1
        struct.pack_into("<Q", self.mm, 0, self.gen)
        deadline = time.monotonic() + timeout
        while any(self._get(SEEN + i) != self.gen for i in range(self.threads)):
            if time.monotonic() > deadline:
                sys.exit("target threads did not acknowledge a reset (is the target running?)")
            time.sleep(0.0005)

    def read(self) -> tuple[float, float]:
        """(largest gap, largest not-runnable gap) of any thread since the last reset, in µs."""
        return (max(self._get(GAP + i) for i in range(self.threads)) / 1e3,
                max(self._get(BLOCKED + i) for i in range(self.threads)) / 1e3)


def spin(seconds: float) -> None:
    """Keep this process busy for ``seconds``, as the tool is during an apply (same CPU contention)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def gdb_write_cmd(pid: int, addr: int, data: bytes) -> list[str]:
    """gdb batch command writing ``data`` at ``addr`` of process ``pid``."""
    values = ", ".join(f"{b:#04x}" for b in data)
    return [*GDB_BASE, "-p", str(pid), "-ex", f"set {{unsigned char[{len(data)}]}}{addr:#x} = {{{values}}}"]


def measure(threads: int, rounds: int, gdb_rounds: int, tmp: Path, exe: Path, patch: Path,
            procs: Procs, protocol: str = "auto") -> dict[str, list[float]]:
    """Run the rounds against a fresh target with ``threads`` threads; return the series by name
    (``X`` raw gaps, ``X_blk`` not-runnable gaps, µs)."""
    import hotpatch

    # tmpfs when there is one: a shared page of a disk file can fault on writeback, a stall not ours
    shm = (Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp) / f"bench-pause-{os.getpid()}-{threads}"
    shm.write_bytes(b"\0" * SHM_BYTES)
    try:
        proc, fns = start_target(procs, exe, str(threads), str(shm))
        gaps = Gaps(shm, threads)
    finally:
        shm.unlink()  # both have it mapped or open; the name is no longer needed
    out: dict[str, list[float]] = {}

    def record(key: str) -> None:
        gap, blk = gaps.read()
        out.setdefault(key, []).append(gap)
        out.setdefault(f"{key}_blk", []).append(blk)

    try:
        time.sleep(0.2)
        gaps.reset()
        with hotpatch.attach(proc.pid) as target:
            for _ in range(rounds):
                gaps.reset()
                t0 = time.perf_counter()
                rep = target.apply(str(patch), protocol)
                window = time.perf_counter() - t0
                record("apply")
                out.setdefault("apply_pause", []).append(rep.pause_us)

                gaps.reset()
                spin(window)
                record("base")

                gaps.reset()
                reps = target.revert("bench", protocol)
                record("revert")
                out.setdefault("revert_pause", []).append(reps[0].pause_us)
        if shutil.which("gdb") and gdb_rounds:
            addr, alt = fns["compute"], fns["compute_alt"]
            jump = b"\xe9" + (alt - addr - 5).to_bytes(4, "little", signed=True)
            original = read_mem(proc.pid, addr, 5)
            for i in range(gdb_rounds):
                gaps.reset()
                t0 = time.perf_counter()
                run_checked(gdb_write_cmd(proc.pid, addr, jump if i % 2 == 0 else original))
                window = time.perf_counter() - t0
                record("gdb")
                gaps.reset()
                spin(window)
                record("gdb_base")
        if proc.poll() is not None:
            sys.exit(f"the {threads}-thread target died (exit {proc.returncode})")
    finally:
        gaps.close()
    return out


def cell(xs: list[float]) -> str:
    """``median [worst]`` in whole µs."""
    return f"{median(xs):.0f} [{max(xs):.0f}]"


def main() -> None:
    """Build the target and patch, measure 1 and 16 threads, print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="apply/revert rounds per thread count (default 15)")
    ap.add_argument("--gdb-rounds", type=int, default=4, help="gdb writes per thread count (default 4; 0: none)")
    ap.add_argument("--protocol", default="auto", help="hotpatch's --protocol (default auto)")
    ap.add_argument("--ready", action="store_true",
                    help="build the target with `hotpatch cflags` (protocol A sites) instead of plain -O2")
    ap.add_argument("--threads", default="1,16", help=f"thread counts, comma-separated, <= {MAX_THREADS}")
    args = ap.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    if any(not 1 <= n <= MAX_THREADS for n in counts):
        sys.exit(f"--threads: each count must be 1..{MAX_THREADS}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-pause-") as tmpdir, Procs() as procs:
        tmp = Path(tmpdir)
        ready = run_checked([*hotpatch_cmd(), "cflags"]).stdout.split() if args.ready else []
        exe = compile_c(TARGET, tmp / "target", f"-DMAXT={MAX_THREADS}", f"-DSPIN_NS={SPIN_US * 1000}LL",
                        f"-DSLEEP_NS={SLEEP_US * 1000}LL", f"-DSHM_BYTES={SHM_BYTES}", *ready)
        patch = hotpatch_build(PATCH, exe, tmp / "patch.hp", "bench")
        for n in counts:
            results[n] = measure(n, args.rounds, args.gdb_rounds, tmp, exe, patch, procs, args.protocol)

    print(f"`{command_line()}`  \n{machine()}; protocol {args.protocol}; {args.rounds} rounds per thread count; "
          f"threads spin "
          f"{SPIN_US} µs then sleep {SLEEP_US} µs; µs, median over rounds of the largest gap of any thread "
          "[worst round]\n")
    rows: list[list[object]] = []
    for n, r in results.items():
        rows.append([n, "raw gap", cell(r["base"]), cell(r["apply"]), ratio(median(r["apply"]), median(r["base"])),
                     cell(r["revert"]), "—"])
        rows.append([n, "not-runnable gap", cell(r["base_blk"]), cell(r["apply_blk"]),
                     ratio(median(r["apply_blk"]), median(r["base_blk"])), cell(r["revert_blk"]), "—"])
        rows.append([n, "hotpatch `pause_us`", "—", cell(r["apply_pause"]), "—", cell(r["revert_pause"]), "—"])
    headers = ["threads", "measure", "baseline (no patching)", "during apply", "apply vs baseline",
               "during revert", ""]
    print(markdown_table(headers[:-1], [row[:-1] for row in rows]))
    if any("gdb" in r for r in results.values()):
        print()
        rows = []
        for n, r in results.items():
            if "gdb" in r:
                rows.append([n, "raw gap", cell(r["gdb_base"]), cell(r["gdb"]), ratio(median(r["gdb"]),
                                                                                     median(r["apply"]))])
                rows.append([n, "not-runnable gap", cell(r["gdb_base_blk"]), cell(r["gdb_blk"]),
                             ratio(median(r["gdb_blk"]), median(r["apply_blk"]))])
        print(markdown_table(["threads", "measure", "baseline (no patching)", "during gdb batch write",
                              "gdb vs hotpatch apply"], rows))


if __name__ == "__main__":
    main()

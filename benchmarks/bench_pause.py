"""The longest time any target thread is stopped or held up during ``apply`` (and revert), per protocol.

The target's loop threads each run a loop that calls ``compute`` (the function being patched), reads
CLOCK_MONOTONIC and keeps the largest gap between two iterations in shared memory. So that many threads do
not queue on this machine's few CPUs, every thread spins for ``--spin-us`` then sleeps ``--sleep-us``
(timer slack 1 ns); the gap across a sleep counts only its lateness beyond the requested time. Per gap each
thread also computes (the schedstat run-queue wait is ``/proc/thread-self/schedstat`` field 2, a sample
retaken when it changed while it was read):

* *stalled*: the gap minus the run-queue wait: the time the thread could not get on with its work for
  another reason than waiting for a CPU: a ptrace stop, or spinning on a ``jmp $`` (protocols A and R park
  a thread that reaches a site being written there);
* *not-runnable*: the stalled gap minus the thread's CPU time (CLOCK_THREAD_CPUTIME_ID): the time it could
  not run at all, which is where a ptrace stop goes (and a hypervisor's steal time; CPU contention does not).

A stop that falls wholly inside a thread's sleep is not seen by that thread (it did not want to run); with
many threads some are always awake, so the largest gap of any thread still shows the longest stop.

Each not-runnable gap of at least ``--event-us`` is also logged with its window (the two iteration
timestamps around it, CLOCK_MONOTONIC, common to all threads, less the sleep the thread asked for in between:
the gap can only lie in the rest): *two threads not runnable at once* is the largest time that two threads'
not-runnable gaps provably overlap (two gaps of N1 and N2 µs inside windows whose union is U µs overlap at
least N1 + N2 - U µs), i.e. proof of two threads stopped together; protocol R promises none. The baseline
shows what the machine alone does (steal time of a shared VM overlaps too).

Rounds alternate: *apply* (reset the slots, ``hotpatch.attach(pid).apply(patch, protocol=P)`` from this
process, wait one sleep period so late wake-ups are seen, read them), *baseline* (reset, keep this process
busy as long as the apply took, the same wait, read), then *revert* measured like apply. The tables give,
per thread count, the median over rounds of the largest value of any thread (the worst round in brackets),
the same for the second most delayed thread (is it one thread or all?), and hotpatch's own ``pause_us``
(the longest stop its tracer saw) and ``check_stop_us`` (the longest stop of a thread other than the asleep one
it borrows: protocol R's one-at-a-time check, the watch of memory to free); then gdb batch mode writing the same
5-byte jump, measured the same way.

Shape of the target: by default its main thread waits in ``pthread_join`` (asleep, as a server's main thread
or an idle worker is) besides the loop threads, and hotpatch borrows that asleep thread for its injected system
calls and the in-target commit program of protocols A and R; ``--busy-main`` makes the main thread a loop
thread too (no thread is ever asleep for long, so the borrowed one is a loop thread and its gap shows the
borrowing). ``--floor`` also runs protocol B's bare ptrace calls from C (``FLOOR``), or R's with
``--protocol rolling``, against the same target: what this machine's kernel and hypervisor cost, whoever the
tracer is (the gaps the threads see, and the longest stop as the tracer sees it, against hotpatch's ``pause_us``
or ``check_stop_us``).

Protocols (issue 3): ``--ready --protocol no-stop`` (A: the target built with ``hotpatch cflags``, goal:
indistinguishable from the baseline); ``--protocol rolling`` (R, an ordinary site: each thread stopped
<= 100 µs, never two at once); ``--protocol stop-the-world --threads 512`` (B: the world stopped <= 5 ms).

Usage: ``python benchmarks/bench_pause.py [--rounds N] [--gdb-rounds N] [--protocol P] [--ready]
[--threads 1,16] [--busy-main] [--floor] [--spin-us N] [--sleep-us N] [--event-us N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

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

MAX_THREADS = 512
HEADER_WORDS = 8  # [0] generation
WORDS = 128  # uint64 words per thread (1 KiB: no two threads share a cache line)
EVENTS = 16  # not-runnable gaps logged per thread and measurement (the last EVENTS when there are more)
EV_WORDS = 5  # an event: its window as two pieces [s1, e1] and [s2, e2] (the requested sleep left out), ns
# per thread, word offsets: largest gap, generation seen, iterations, largest stalled gap, events logged, the
# largest not-runnable gap as an event, then EVENTS events
GAP, SEEN, ITERS, STALL, NEV, BLK = range(6)
EV = BLK + EV_WORDS
SHM_BYTES = -(-8 * (HEADER_WORDS + WORDS * MAX_THREADS) // 4096) * 4096
assert EV + EV_WORDS * EVENTS <= WORDS


def default_timing(threads: int) -> tuple[int, int]:
    """(spin µs, sleep µs) of each thread for ``threads`` threads, so that all of them together want about
    one CPU at most: 20 µs of spin and 300 µs of sleep up to 16 threads, 20 µs per thread of sleep up to 64;
    beyond, 5 µs of spin and 40 µs of sleep per thread (512 threads: 20 ms, ~25,000 wake-ups a second)."""
    if threads <= 64:
        return 20, max(300, 20 * threads)
    return 5, 40 * threads


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

/* MAXT, HDR, WORDS, EVENTS and SHM_BYTES come from -D flags; the word offsets match bench_pause.py.
 * An event is s1, e1, s2, e2, ns: a not-runnable gap of ns inside [s1, e1] + [s2, e2] (the sleep between
 * e1 and s2 was requested); the largest one sits at BLK. */
enum { GAP, SEEN, ITERS, STALL, NEV, BLK, EV = BLK + 5 };

static volatile uint64_t *shm;
static uint64_t spin_ns, sleep_ns, event_ns;

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

static void put(volatile uint64_t *me, int slot, uint64_t v) { __atomic_store_n(&me[slot], v, __ATOMIC_RELAXED); }

static void put_event(volatile uint64_t *ev, uint64_t s1, uint64_t e1, uint64_t s2, uint64_t e2, uint64_t ns)
{
    ev[0] = s1; ev[1] = e1; ev[2] = s2; ev[3] = e2; ev[4] = ns;
}

static void *worker(void *arg)
{
    long id = (long)arg;
    volatile uint64_t *me = shm + HDR + id * WORDS;
    volatile long sink = 0;
    uint64_t gen = ~0ull, maxgap = 0, maxblk = 0, maxstall = 0, iters = 0, slept = 0, nev = 0;
    int fd = open("/proc/thread-self/schedstat", O_RDONLY);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    uint64_t prev = clk(CLOCK_MONOTONIC), pcpu = clk(CLOCK_THREAD_CPUTIME_ID), pdel = run_delay(fd);
    uint64_t burst = prev, tsleep = prev;
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
        int64_t stall = gap - (int64_t)(d - pdel);
        int64_t blk = stall - (int64_t)(c - pcpu);
        /* where the not-runnable time can lie: [prev, t] less the requested sleep [tsleep, tsleep + slept] */
        uint64_t s1 = prev, e1 = slept ? tsleep : t, s2 = slept ? tsleep + slept : t, e2 = t;
        prev = t; pcpu = c; pdel = d;
        if (slept) burst = t;
        slept = 0;
        uint64_t g = __atomic_load_n(&shm[0], __ATOMIC_ACQUIRE);
        if (g != gen) {
            gen = g;
            maxgap = maxblk = maxstall = nev = 0;
            put(me, GAP, 0); put(me, BLK + 4, 0); put(me, STALL, 0); put(me, NEV, 0);
            __atomic_store_n(&me[SEEN], g, __ATOMIC_RELEASE);
        } else {
            if (gap > (int64_t)maxgap) {
                maxgap = gap;
                put(me, GAP, maxgap);
            }
            if (stall > (int64_t)maxstall) {
                maxstall = stall;
                put(me, STALL, maxstall);
            }
            if (blk > (int64_t)maxblk) {
                maxblk = blk;
                put_event(me + BLK, s1, e1, s2, e2, maxblk);
            }
            if (blk >= (int64_t)event_ns) {
                put_event(me + EV + 5 * (nev % EVENTS), s1, e1, s2, e2, (uint64_t)blk);
                __atomic_store_n(&me[NEV], ++nev, __ATOMIC_RELEASE);
            }
        }
        put(me, ITERS, ++iters);
        if (t - burst > spin_ns) {
            struct timespec req = {(time_t)(sleep_ns / 1000000000ull), (long)(sleep_ns % 1000000000ull)};
            tsleep = clk(CLOCK_MONOTONIC);
            nanosleep(&req, NULL);
            slept = sleep_ns;
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 7) return 2;
    int busy_main = atoi(argv[6]);   /* 1: the main thread is loop thread 0; 0: it waits, as a server's does */
    int n = atoi(argv[1]);
    int fd = open(argv[2], O_RDWR);
    spin_ns = strtoull(argv[3], NULL, 10);
    sleep_ns = strtoull(argv[4], NULL, 10);
    event_ns = strtoull(argv[5], NULL, 10);
    if (n < 1 || n > MAXT || fd < 0) return 2;
    shm = mmap(NULL, SHM_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (shm == MAP_FAILED) return 3;
    printf("addresses compute=%p compute_alt=%p\n", (void *)compute, (void *)compute_alt);
    fflush(stdout);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_t th, first = 0;
    for (long i = busy_main; i < n; i++) {
        if (pthread_create(&th, &attr, worker, (void *)i) != 0) return 4;
        if (i == busy_main) first = th;
    }
    if (busy_main)
        worker((void *)0);
    pthread_join(first, NULL);   /* never returns: asleep in futex_wait */
    return 0;
}
"""

# The floor of protocols B and R on this machine: the same ptrace calls, from C, at SCHED_FIFO when allowed,
# with nothing else done. PTRACE_SEIZE every thread (outside the window), then
# * argv[2] "world" (B): PTRACE_INTERRUPT all, waitpid each stop, PTRACE_GETREGS each, PTRACE_DETACH all;
# * argv[2] "rolling" (R): one thread at a time, PTRACE_INTERRUPT it, waitpid its stop, PTRACE_GETREGS, read its
#   stack from RSP to the end of its mapping (one pread of /proc/PID/mem, as hotpatch's inuse.look), PTRACE_CONT;
#   the exit detaches them all (kernel/ptrace.c exit_ptrace), no thread stopped again.
# Prints "window longest": the window (first interrupt to last detach or resume) and the longest time one thread
# was stopped as this tracer saw it (from waitpid's return to the resuming call's), µs: what hotpatch's
# pause_us (B) and check_stop_us (R) measure.
FLOOR = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static unsigned long starts[4096], ends[4096];
static int nmaps;
static char stack[1 << 20];

static void read_maps(const char *pid)
{
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%s/maps", pid);
    FILE *f = fopen(path, "r");
    if (!f) exit(4);
    while (nmaps < 4096 && fgets(line, sizeof line, f))
        if (sscanf(line, "%lx-%lx", &starts[nmaps], &ends[nmaps]) == 2) nmaps++;
    fclose(f);
}

static long stack_read(int mem, unsigned long rsp)
{
    for (int i = 0; i < nmaps; i++)
        if (starts[i] <= rsp && rsp < ends[i]) {
            unsigned long len = ends[i] - (rsp & ~7UL);
            return pread(mem, stack, len < sizeof stack ? len : sizeof stack, (off_t)(rsp & ~7UL));
        }
    return 0;
}

int main(int argc, char **argv)
{
    static int tids[8192];
    int n = 0, rolling = argc > 2 && !strcmp(argv[2], "rolling");
    char path[64];
    snprintf(path, sizeof path, "/proc/%s/task", argv[1]);
    DIR *d = opendir(path);
    if (!d) return 2;
    for (struct dirent *e; (e = readdir(d)) && n < 8192;)
        if (e->d_name[0] != '.') tids[n++] = atoi(e->d_name);
    closedir(d);
    for (int i = 0; i < n; i++)
        if (ptrace(PTRACE_SEIZE, tids[i], 0, 0)) return 3;
    read_maps(argv[1]);
    snprintf(path, sizeof path, "/proc/%s/mem", argv[1]);
    int mem = open(path, O_RDONLY);
    if (mem < 0) return 5;
    struct sched_param sp = {1};
    sched_setscheduler(0, SCHED_FIFO, &sp);   /* as hotpatch's World.boost; ignored without permission */
    struct user_regs_struct regs;
    double t0 = now(), longest = 0;
    if (rolling) {
        for (int i = 0; i < n; i++) {
            int st;
            ptrace(PTRACE_INTERRUPT, tids[i], 0, 0);
            waitpid(tids[i], &st, __WALL);
            double seen = now();
            ptrace(PTRACE_GETREGS, tids[i], 0, &regs);
            stack_read(mem, regs.rsp);
            ptrace(PTRACE_CONT, tids[i], 0, 0);
            if (now() - seen > longest) longest = now() - seen;
        }
    } else {
        double first = 0;
        for (int i = 0; i < n; i++) ptrace(PTRACE_INTERRUPT, tids[i], 0, 0);
        for (int i = 0; i < n; i++) { int st; waitpid(tids[i], &st, __WALL); if (!i) first = now(); }
        for (int i = 0; i < n; i++) ptrace(PTRACE_GETREGS, tids[i], 0, &regs);
        for (int i = 0; i < n; i++) ptrace(PTRACE_DETACH, tids[i], 0, 0);
        longest = now() - first;
    }
    printf("%.0f %.0f\n", now() - t0, longest);
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

    def _get(self, thread: int, slot: int) -> int:
        """The uint64 ``slot`` of ``thread``."""
        return int(struct.unpack_from("<Q", self.mm, 8 * (HEADER_WORDS + thread * WORDS + slot))[0])

    def reset(self, timeout: float = 10.0) -> None:
        """Start a new measurement: bump the generation and wait until every thread has seen it."""
        self.gen += 1
        struct.pack_into("<Q", self.mm, 0, self.gen)
        deadline = time.monotonic() + timeout
        pending = list(range(self.threads))
        while pending:
            pending = [i for i in pending if self._get(i, SEEN) != self.gen]
            if pending and time.monotonic() > deadline:
                sys.exit("target threads did not acknowledge a reset (is the target running?)")
            time.sleep(0.0005)

    def read(self) -> dict[str, float]:
        """Since the last reset, in µs: the largest raw, stalled and not-runnable gap of any thread
        (``gap``, ``stall``, ``blk``), the second largest not-runnable gap of a thread (``blk2``), and the
        largest provable overlap of two threads' not-runnable gaps (``overlap``)."""
        per = []
        events: set[Event] = set()
        for i in range(self.threads):
            words = struct.unpack_from(f"<{WORDS}Q", self.mm, 8 * (HEADER_WORDS + i * WORDS))
            per.append((words[GAP], words[STALL], words[BLK + 4]))
            for at in (BLK, *(EV + EV_WORDS * k for k in range(min(words[NEV], EVENTS)))):
                s1, e1, s2, e2, ns = words[at : at + EV_WORDS]
                if ns and s1 <= e1 <= s2 <= e2:
                    events.add(Event(s1, e2, ns, i, ((s1, e1), (s2, e2))))
        blks = sorted((p[2] for p in per), reverse=True)
        return {
            "gap": max(p[0] for p in per) / 1e3,
            "stall": max(p[1] for p in per) / 1e3,
            "blk": blks[0] / 1e3,
            "blk2": blks[1] / 1e3 if len(blks) > 1 else float("nan"),
            "overlap": provable_overlap(list(events)) / 1e3,
        }


class Event(NamedTuple):
    """A not-runnable gap of ``ns`` of thread ``thread``, somewhere inside the ``pieces`` (two intervals: the
    iteration's window less the sleep it asked for), which lie within [``start``, ``end``]."""

    start: int
    end: int
    ns: int
    thread: int
    pieces: tuple[tuple[int, int], ...]


def union_length(pieces: list[tuple[int, int]]) -> int:
    """Total length of the union of the intervals ``pieces``."""
    total, reach = 0, None
    for lo, hi in sorted(pieces):
        if reach is None or lo > reach:
            total += hi - lo
            reach = hi
        elif hi > reach:
            total += hi - reach
            reach = hi
    return total


def provable_overlap(events: list[Event]) -> int:
    """The largest time (ns) two threads were provably not runnable together: gaps of N1 and N2 ns inside
    windows whose union is U ns overlap at least N1 + N2 - U ns (pigeonhole)."""
    best = 0
    active: list[Event] = []
    for ev in sorted(events):
        active = [a for a in active if a.end > ev.start]
        for a in active:
            if a.thread != ev.thread and a.ns + ev.ns > best:
                best = max(best, a.ns + ev.ns - union_length([*a.pieces, *ev.pieces]))
        active.append(ev)
    return best


def spin(seconds: float) -> None:
    """Keep this process busy for ``seconds``, as the tool is during an apply (same CPU contention)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def gdb_write_cmd(pid: int, addr: int, data: bytes) -> list[str]:
    """gdb batch command writing ``data`` at ``addr`` of process ``pid``."""
    values = ", ".join(f"{b:#04x}" for b in data)
    return [*GDB_BASE, "-p", str(pid), "-ex", f"set {{unsigned char[{len(data)}]}}{addr:#x} = {{{values}}}"]


def measure(
    threads: int,
    timing: tuple[int, int],
    event_us: int,
    rounds: int,
    gdb_rounds: int,
    tmp: Path,
    exe: Path,
    patch: Path,
    procs: Procs,
    protocol: str = "auto",
    busy_main: bool = False,
    floor: Path | None = None,
) -> tuple[dict[str, list[float]], set[str], list[str]]:
    """Run the rounds against a fresh target with ``threads`` loop threads (plus a waiting main thread unless
    ``busy_main``); return the series by name (``X`` for each key of :meth:`Gaps.read` as ``X_key``, µs;
    ``X_pause``: hotpatch's pause_us; ``floor_window``: the C floor's window) and the protocols hotpatch
    reported, and the hotpatch errors (a failed apply's gaps are kept, its revert skipped). ``floor``: the
    compiled FLOOR program, run as many times as gdb (at least 5)."""
    import hotpatch
    from hotpatch.errors import HotpatchError

    spin_us, sleep_us = timing
    settle = sleep_us / 1e6 + 0.002  # a thread whose wake-up a stop delayed reports it when it wakes
    # tmpfs when there is one: a shared page of a disk file can fault on writeback, a stall not ours
    shm = (Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp) / f"bench-pause-{os.getpid()}-{threads}"
    shm.write_bytes(b"\0" * SHM_BYTES)
    try:
        proc, fns = start_target(
            procs,
            exe,
            str(threads),
            str(shm),
            str(spin_us * 1000),
            str(sleep_us * 1000),
            str(event_us * 1000),
            str(int(busy_main)),
        )
        gaps = Gaps(shm, threads)
    finally:
        shm.unlink()  # both have it mapped or open; the name is no longer needed
    out: dict[str, list[float]] = {}
    protocols: set[str] = set()
    errors: list[str] = []

    def record(key: str) -> None:
        time.sleep(settle)
        for name, value in gaps.read().items():
            out.setdefault(f"{key}_{name}", []).append(value)

    try:
        time.sleep(0.2 + 2 * sleep_us / 1e6)
        gaps.reset()
        with hotpatch.attach(proc.pid) as target:
            for _ in range(rounds):
                gaps.reset()
                t0 = time.perf_counter()
                try:
                    rep = target.apply(str(patch), protocol)
                except HotpatchError as e:  # counted; the threads' gaps of the attempt are kept
                    rep = None
                    errors.append(f"apply: {e}")
                window = time.perf_counter() - t0
                record("apply")
                out.setdefault("apply_ms", []).append(window * 1e3)
                if rep is not None:
                    out.setdefault("apply_pause", []).append(rep.pause_us)
                    out.setdefault("apply_check", []).append(rep.check_stop_us)
                    protocols.add(rep.protocol)

                gaps.reset()
                spin(window)
                record("base")
                if rep is None:
                    continue

                gaps.reset()
                t0 = time.perf_counter()
                try:
                    reps = target.revert("bench", protocol)
                except HotpatchError as e:
                    reps = []
                    errors.append(f"revert: {e}")
                out.setdefault("revert_ms", []).append((time.perf_counter() - t0) * 1e3)
                record("revert")
                if reps:
                    out.setdefault("revert_pause", []).append(reps[0].pause_us)
                    out.setdefault("revert_check", []).append(reps[0].check_stop_us)
                    protocols.add(reps[0].protocol)
                else:
                    with contextlib.suppress(HotpatchError):
                        target.revert(None, "stop-the-world")
        if shutil.which("gdb") and gdb_rounds:
            addr, alt = fns["compute"], fns["compute_alt"]
            jump = b"\xe9" + (alt - addr - 5).to_bytes(4, "little", signed=True)
            original = read_mem(proc.pid, addr, 5)
            for i in range(gdb_rounds):
                gaps.reset()
                t0 = time.perf_counter()
                run_checked(gdb_write_cmd(proc.pid, addr, jump if i % 2 == 0 else original), timeout=600)
                window = time.perf_counter() - t0
                record("gdb")
                gaps.reset()
                spin(window)
                record("gdb_base")
        for _ in range(max(gdb_rounds, 5) if floor else 0):
            gaps.reset()
            t0 = time.perf_counter()
            mode = "rolling" if protocol == "rolling" else "world"
            floor_window, floor_stop = map(float, run_checked([str(floor), str(proc.pid), mode]).stdout.split())
            out.setdefault("floor_window", []).append(floor_window)
            out.setdefault("floor_stop", []).append(floor_stop)
            window = time.perf_counter() - t0
            record("floor")
            gaps.reset()
            spin(window)
            record("floor_base")
        if proc.poll() is not None:
            sys.exit(f"the {threads}-thread target died (exit {proc.returncode})")
    finally:
        gaps.close()
    return out, protocols, errors


def cell(xs: list[float]) -> str:
    """``median [worst]`` in whole µs."""
    xs = [x for x in xs if x == x]  # no NaN (a 1-thread target has no second thread)
    return f"{median(xs):.0f} [{max(xs):.0f}]" if xs else "—"


def overlap_cell(xs: list[float]) -> str:
    """``median [worst]`` µs and the number of rounds with a provable overlap."""
    return f"{cell(xs)}, {sum(1 for x in xs if x > 0)}/{len(xs)} rounds"


def table_rows(n: int, r: dict[str, list[float]]) -> list[list[object]]:
    """The rows of the main table for ``n`` threads."""

    def row(label: str, key: str, fmt: Callable[[list[float]], str] = cell) -> list[object]:
        base, app, rev = r[f"base_{key}"], r[f"apply_{key}"], r.get(f"revert_{key}", [])
        vs = ratio(median(app), median(base)) if key != "overlap" else "—"
        return [n, label, fmt(base), fmt(app), vs, fmt(rev)]

    def ms(xs: list[float]) -> str:
        return f"{median(xs):.1f} [{max(xs):.1f}]" if xs else "—"

    rows = [
        row("raw gap", "gap"),
        row("stalled gap (raw minus run-queue wait)", "stall"),
        row("not-runnable gap", "blk"),
    ]
    if n > 1:
        rows.append(row("not-runnable gap, second thread", "blk2"))
        rows.append(row("two threads not runnable at once (provable µs)", "overlap", overlap_cell))
    rows.append([n, "hotpatch `pause_us`", "—", cell(r.get("apply_pause", [])), "—", cell(r.get("revert_pause", []))])
    rows.append(
        [
            n,
            "hotpatch `check_stop_us` (longest stop of a thread not borrowed)",
            "—",
            cell(r.get("apply_check", [])),
            "—",
            cell(r.get("revert_check", [])),
        ]
    )
    rows.append([n, "call time (ms)", "—", ms(r["apply_ms"]), "—", ms(r.get("revert_ms", []))])
    return rows


def main() -> None:
    """Build the target and patch, measure each thread count, print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="apply/revert rounds per thread count (default 15)")
    ap.add_argument("--gdb-rounds", type=int, default=4, help="gdb writes per thread count (default 4; 0: none)")
    ap.add_argument("--protocol", default="auto", help="hotpatch's --protocol (default auto)")
    ap.add_argument(
        "--ready",
        action="store_true",
        help="build the target with `hotpatch cflags` (protocol A sites) instead of plain -O2",
    )
    ap.add_argument("--threads", default="1,16", help=f"thread counts, comma-separated, <= {MAX_THREADS}")
    ap.add_argument(
        "--busy-main",
        action="store_true",
        help="the main thread is a loop thread too (default: it waits in pthread_join, as a server's main "
        "thread does, and hotpatch borrows it for its injected system calls)",
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also run protocol B's ptrace calls (R's with --protocol rolling) from C, the floor of this machine, "
        "against the same target",
    )
    ap.add_argument("--spin-us", type=int, help="µs each thread spins between sleeps (default: 20; 5 above 64 threads)")
    ap.add_argument(
        "--sleep-us", type=int, help="µs each thread sleeps (default: 300; 20 per thread above 16 threads, 40 above 64)"
    )
    ap.add_argument(
        "--event-us",
        type=int,
        default=10,
        help="log not-runnable gaps from this many µs for the overlap check (default 10)",
    )
    args = ap.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    if any(not 1 <= n <= MAX_THREADS for n in counts):
        sys.exit(f"--threads: each count must be 1..{MAX_THREADS}")
    timings = {}
    for n in counts:
        spin_us, sleep_us = default_timing(n)
        timings[n] = (
            spin_us if args.spin_us is None else args.spin_us,
            sleep_us if args.sleep_us is None else args.sleep_us,
        )
    results = {}
    errors: dict[int, list[str]] = {}
    used: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="bench-pause-") as tmpdir, Procs() as procs:
        tmp = Path(tmpdir)
        ready = run_checked([*hotpatch_cmd(), "cflags"]).stdout.split() if args.ready else []
        exe = compile_c(
            TARGET,
            tmp / "target",
            f"-DMAXT={MAX_THREADS}",
            f"-DHDR={HEADER_WORDS}",
            f"-DWORDS={WORDS}",
            f"-DEVENTS={EVENTS}",
            f"-DSHM_BYTES={SHM_BYTES}",
            *ready,
        )
        patch = hotpatch_build(PATCH, exe, tmp / "patch.hp", "bench")
        floor = compile_c(FLOOR, tmp / "floor") if args.floor else None
        for n in counts:
            results[n], protocols, errors[n] = measure(
                n,
                timings[n],
                args.event_us,
                args.rounds,
                args.gdb_rounds,
                tmp,
                exe,
                patch,
                procs,
                args.protocol,
                args.busy_main,
                floor,
            )
            used |= protocols

    timing_text = "; ".join(f"{n} threads: spin {s} µs, sleep {z} µs" for n, (s, z) in timings.items())
    print(
        f"`{command_line()}`  \n{machine()}; protocol {args.protocol} (reported: {', '.join(sorted(used))}); "
        f"{'hotpatch-ready target; ' if args.ready else ''}"
        f"{'every thread loops' if args.busy_main else 'loop threads plus a main thread waiting in pthread_join'}; "
        f"{args.rounds} rounds per thread count; {timing_text}; "
        "µs, median over rounds of the largest value of any thread [worst round]\n"
    )
    rows = [row for n, r in results.items() for row in table_rows(n, r)]
    print(
        markdown_table(
            ["threads", "measure", "baseline (no patching)", "during apply", "apply vs baseline", "during revert"], rows
        )
    )
    for n, errs in errors.items():
        if errs:
            print(
                f"\n{n} threads: {len(errs)} hotpatch errors in {args.rounds} rounds (the attempts' gaps are in the "
                "table): " + "; ".join(sorted(set(errs)))
            )
    if any("floor_window" in r for r in results.values()):
        rolling = args.protocol == "rolling"
        mine = "apply_check" if rolling else "apply_pause"  # what the C floor's longest stop measures
        print()
        rows = [
            [
                n,
                cell(r["floor_base_blk"]),
                cell(r["floor_blk"]),
                cell(r["apply_blk"]),
                ratio(median(r["apply_blk"]), median(r["floor_blk"])),
                cell(r["floor_stop"]),
                cell(r.get(mine, [])),
                ratio(median(r.get(mine, [])), median(r["floor_stop"])) if r.get(mine) else "—",
                cell(r["floor_window"]),
            ]
            for n, r in results.items()
            if "floor_window" in r
        ]
        print(
            markdown_table(
                [
                    "threads",
                    "baseline not-runnable gap",
                    f"not-runnable gap, {'R' if rolling else 'B'}'s ptrace calls from C",
                    "during hotpatch apply",
                    "hotpatch vs C",
                    "longest stop seen by the C tracer",
                    f"hotpatch `{'check_stop_us' if rolling else 'pause_us'}`",
                    "hotpatch vs C",
                    f"C window (first interrupt to last {'resume' if rolling else 'detach'})",
                ],
                rows,
            )
        )
    if any("gdb_gap" in r for r in results.values()):
        print()
        rows = []
        for n, r in results.items():
            if "gdb_gap" in r:
                for label, key in (("raw gap", "gap"), ("not-runnable gap", "blk")):
                    rows.append(
                        [
                            n,
                            label,
                            cell(r[f"gdb_base_{key}"]),
                            cell(r[f"gdb_{key}"]),
                            ratio(median(r[f"gdb_{key}"]), median(r[f"apply_{key}"])),
                        ]
                    )
        print(
            markdown_table(
                ["threads", "measure", "baseline (no patching)", "during gdb batch write", "gdb vs hotpatch apply"],
                rows,
            )
        )


if __name__ == "__main__":
    main()

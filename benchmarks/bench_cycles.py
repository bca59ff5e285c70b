"""Many apply/revert cycles of each protocol against 8 threads calling the patched functions in tight loops.

The target is the one of the 1,000-cycle test (``tests/targets/protocols.c``, built as
``tests/test_protocols.py`` builds it, ``-O2 -fcf-protection=full``): 8 threads (nice 19) call one function
of each site class (``ms_hook_prologue``, patchable entry, opportunistic, ordinary, and a function that falls
into the ordinary one) in tight loops and check every result; a value that is neither the old nor the new
one makes it print ``WRONG ...`` and exit 3. Protocol A (``no-stop``) applies
``tests/targets/protocols_ready_patch.c`` (the three short-jump sites); R (``rolling``) and B
(``stop-the-world``) apply ``tests/targets/protocols_patch.c`` (all four, the ordinary one included).

Per protocol, with a fresh target, ``hotpatch.attach(pid)`` applies and reverts the patch ``--cycles`` times
in this process (``apply(path, protocol=P)``, ``revert(name, protocol=P)``), checking that each report names
the protocol asked for. A hotpatch error is counted and the target brought back to no patch (revert
``--all`` under protocol B); a target that dies is counted as a *wrong value* (it printed ``WRONG``) or a
*crash* (anything else) and replaced by a new one. After every apply and every revert no thread of the target
may still be traced by this process (hotpatch's invariant: never leave a target stopped); one that is, is
counted (*threads left traced*, with the cycle and the operation) and detached here so that the run goes on.
At the end the target must have no patch applied, no thread stopped or traced, few mappings more than at the
start (memory given back), and exit 0 on ``quit``.

Baseline in the same run: the cycles run in segments of ``--segment-s`` seconds; before each segment and at
the end, the threads' call rate (calls per second, all threads, from the target's own counters) is measured
for ``--baseline-s`` seconds with this process idle, then while it spins (taking the CPU a tool takes, without
patching). The table gives the rate during the cycles against both, so drift of this shared machine over a
long run hits baseline and cycles alike.

The table gives per protocol the cycles done, cycles per second (time in cycles only), median, p99 and
worst apply and revert times and ``pause_us``, hotpatch errors, crashes and wrong values, the values seen
(old / new), the call rates, and the state at the end. ``--time-limit`` stops a protocol after that many
seconds (the table says how many cycles ran).

``--targets N`` runs each protocol's cycles against N such targets at once, each with its own tool (a forked
worker of this process, as N operators would), ``--cycles`` split between them: a protocol's time is mostly
spent waiting for nice-19 threads to be sampled, so N targets give nearly N times the cycles per second on
the same machine. The table then sums cycles, errors, deaths and values over the targets, gives the time of the
slowest, and the call rates per target (calls summed over targets, divided by seconds summed).

Usage: ``python benchmarks/bench_cycles.py [--cycles 1000] [--protocols no-stop,rolling,stop-the-world]
[--targets 1] [--time-limit S] [--segment-s 30] [--baseline-s 1] [--progress]``.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import re
import resource
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Procs, command_line, compile_c, hotpatch_build, machine, markdown_table, median

TARGETS = Path(__file__).resolve().parent.parent / "tests" / "targets"
THREADS = 8
WANT = {"no-stop": "A", "rolling": "R", "stop-the-world": "B"}
PATCH_SOURCE = {"no-stop": "protocols_ready_patch.c", "rolling": "protocols_patch.c",
                "stop-the-world": "protocols_patch.c"}
STATS = re.compile(r"stats old=(\d+) new=(\d+)")
PTRACE_DETACH, PTRACE_INTERRUPT, WALL = 17, 0x4207, 0x40000000
STATS_TIMEOUT_S = 30.0


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    return libc


def detach(tid: int) -> None:
    """PTRACE_DETACH a thread this process traces: at once when it is in a ptrace-stop, else after
    PTRACE_INTERRUPT and its stop (waited for at most 5 s)."""
    libc = _libc()
    if libc.ptrace(PTRACE_DETACH, tid, None, None) == 0:
        return
    libc.ptrace(PTRACE_INTERRUPT, tid, None, None)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(tid, WALL | os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            libc.ptrace(PTRACE_DETACH, tid, None, None)
            return
        time.sleep(0.001)


class Target:
    """One running ``protocols`` target: its stats and its health."""

    def __init__(self, procs: Procs, exe: Path) -> None:
        self.proc = procs.start(exe, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        line = self._line()
        if line.strip() != "ready":
            sys.exit(f"{exe} did not start (exit {self.proc.poll()}): {line!r}")
        self.maps0, self.rss0 = self.maps(), self.rss_kib()

    @property
    def pid(self) -> int:
        """The target's PID."""
        return self.proc.pid

    def _line(self) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], STATS_TIMEOUT_S)[0]:
            raise RuntimeError(f"the target did not answer within {STATS_TIMEOUT_S:g} s ({self.health()})")
        return self.proc.stdout.readline().decode(errors="replace")

    def traced_by_us(self) -> list[str]:
        """Threads of the target that this process still traces (after an operation returned: a defect),
        each as ``tid state``; they are detached here (this process is their tracer) so the run goes on."""
        left = []
        me = str(os.getpid())
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                    status = f.read()
            except OSError:
                continue
            if status.split("TracerPid:")[1].split()[0] == me:
                left.append(f"{tid} {status.split('State:')[1].splitlines()[0].strip()}")
                detach(int(tid))
        return left

    def stats(self) -> tuple[int, int]:
        """(old, new) values the threads have seen so far (updated every 1024 iterations of each)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stats\n")
        self.proc.stdin.flush()
        m = STATS.match(self._line())
        if m is None:
            raise RuntimeError(f"the target did not answer stats (exit {self.proc.poll()})")
        return int(m.group(1)), int(m.group(2))

    def calls(self, seconds: float, busy: bool = False) -> tuple[int, float]:
        """(calls of all threads, seconds) over about ``seconds``, this process idle or spinning (``busy``)."""
        o0, n0 = self.stats()
        t0 = time.perf_counter()
        if busy:
            while time.perf_counter() - t0 < seconds:
                pass
        else:
            time.sleep(seconds)
        o1, n1 = self.stats()
        return o1 + n1 - o0 - n0, time.perf_counter() - t0

    def maps(self) -> int:
        """Number of mappings of the target."""
        return Path(f"/proc/{self.pid}/maps").read_text().count("\n")

    def rss_kib(self) -> int:
        """The target's resident set size, KiB."""
        with open(f"/proc/{self.pid}/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])

    def alive(self) -> bool:
        """True while the target runs."""
        return self.proc.poll() is None

    def death(self) -> tuple[str, str]:
        """How the target ended: ``wrong`` (it printed WRONG) or ``crash`` (anything else), and its message."""
        err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
        return ("wrong" if "WRONG" in err else "crash"), f"exit status {self.proc.returncode} {err[:200]}"

    def health(self) -> str:
        """Empty when no thread is stopped or traced and nothing traces the target, else what is wrong."""
        states = []
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        with open(f"/proc/{self.pid}/status") as f:
            tracer = next(ln for ln in f if ln.startswith("TracerPid:")).split()[1]
        bad = [s for s in states if s in "TtZX"]
        return "" if not bad and tracer == "0" else f"thread states {bad}, tracer {tracer}"

    def quit(self) -> int | None:
        """Ask the target to exit; its exit status (None if it did not within 30 s)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"quit\n")
        self.proc.stdin.flush()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            return None


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of a non-empty list."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Rate:
    """Calls counted over seconds."""

    def __init__(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def add(self, calls: int, seconds: float) -> None:
        """Count ``calls`` made in ``seconds``."""
        self.calls += calls
        self.seconds += seconds

    def per_s(self) -> float:
        """Calls per second (NaN when nothing was counted)."""
        return self.calls / self.seconds if self.seconds else float("nan")


def run_protocol(protocol: str, exe: Path, patch: Path, procs: Procs, args: argparse.Namespace,
                 label: str) -> dict:
    """The cycles of one protocol against a fresh target, in segments of ``--segment-s`` seconds with the
    call-rate baselines between them; the figures for the table. ``label`` names it in progress lines."""
    import hotpatch
    from hotpatch.errors import HotpatchError

    want = WANT[protocol]
    tgt = Target(procs, exe)
    time.sleep(0.3)
    r: dict = {"errors": [], "deaths": [], "apply_ms": [], "revert_ms": [], "pause_us": [], "bad_protocol": 0,
               "seen_old": 0, "seen_new": 0, "left_traced": []}
    idle, busy, cycling = Rate(), Rate(), Rate()
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    done, wall = 0, 0.0
    handle = hotpatch.attach(tgt.pid)
    try:
        while True:
            for rate, spinning in ((idle, False), (busy, True)):
                rate.add(*tgt.calls(args.baseline_s, spinning))
            if done >= args.cycles or (deadline is not None and time.monotonic() >= deadline):
                break
            old0, new0 = tgt.stats()
            t_seg = time.perf_counter()
            seg_end = time.monotonic() + args.segment_s
            if deadline is not None:
                seg_end = min(seg_end, deadline)
            died = False
            while done < args.cycles and time.monotonic() < seg_end:
                try:
                    t0 = time.perf_counter()
                    rep = handle.apply(str(patch), protocol)
                    t1 = time.perf_counter()
                    if left := tgt.traced_by_us():
                        r["left_traced"].append(f"cycle {done}, after apply: {', '.join(left)}")
                    t1a = time.perf_counter()
                    reps = handle.revert("prot", protocol)
                    t2 = time.perf_counter()
                    if left := tgt.traced_by_us():
                        r["left_traced"].append(f"cycle {done}, after revert: {', '.join(left)}")
                    r["apply_ms"].append((t1 - t0) * 1e3)
                    r["revert_ms"].append((t2 - t1a) * 1e3)
                    r["pause_us"] += [rep.pause_us, reps[0].pause_us]
                    r["bad_protocol"] += (rep.protocol != want) + (reps[0].protocol != want)
                except HotpatchError as e:
                    if not tgt.alive():
                        died = True
                        break
                    r["errors"].append(f"cycle {done}: {e}")
                    if tgt.alive():
                        try:  # back to no patch
                            handle.revert(None, "stop-the-world")
                        except HotpatchError as e2:
                            r["errors"].append(f"cycle {done} (clean-up): {e2}")
                done += 1
                if done % 50 == 0 and not tgt.alive():
                    died = True
                    break
            seconds = time.perf_counter() - t_seg
            wall += seconds
            if died or not tgt.alive():  # counted and replaced; this segment's calls are lost
                r["deaths"].append((done, *tgt.death()))
                handle.close()
                tgt = Target(procs, exe)
                handle = hotpatch.attach(tgt.pid)
            else:
                old1, new1 = tgt.stats()
                cycling.add(old1 + new1 - old0 - new0, seconds)
                r["seen_old"] += old1 - old0
                r["seen_new"] += new1 - new0
            if args.progress:
                print(f"{label}: {done} cycles in {wall:.0f} s, {done / wall:.1f}/s, {len(r['errors'])} errors, "
                      f"{len(r['deaths'])} target deaths", file=sys.stderr, flush=True)
        r["wall_s"], r["cycles"] = wall, done
        st = handle.status()
        r["left_applied"], r["retained"] = len(st.patches), len(st.retained)
    finally:
        handle.close()
    r["rates"] = {name: (rate.calls, rate.seconds) for name, rate in
                  (("idle", idle), ("busy", busy), ("cycles", cycling))}
    r["health"] = [tgt.health()]
    r["maps"] = (tgt.maps0, tgt.maps())
    r["rss"] = (tgt.rss0, tgt.rss_kib())
    r["exit"] = [tgt.quit()]
    return r


def _worker(protocol: str, exe: Path, patch: Path, args: argparse.Namespace, label: str) -> dict:
    """One target's share of a protocol's cycles, in a forked worker with a tool and a reaper of its own."""
    with Procs() as procs:
        return run_protocol(protocol, exe, patch, procs, args, label)


def merge(parts: list[dict]) -> dict:
    """The figures of several targets run at once, as one: counts and lists summed, the time of the slowest,
    call rates as calls summed over seconds summed (a rate per target), mappings and RSS summed."""
    r: dict = {"wall_s": max(p["wall_s"] for p in parts), "rates": {}}
    for key in ("errors", "deaths", "apply_ms", "revert_ms", "pause_us", "left_traced", "health", "exit"):
        r[key] = [x for p in parts for x in p[key]]
    for key in ("bad_protocol", "seen_old", "seen_new", "cycles", "left_applied", "retained"):
        r[key] = sum(p[key] for p in parts)
    for key in ("maps", "rss"):
        r[key] = (sum(p[key][0] for p in parts), sum(p[key][1] for p in parts))
    for name in parts[0]["rates"]:
        r["rates"][name] = (sum(p["rates"][name][0] for p in parts), sum(p["rates"][name][1] for p in parts))
    return r


def run_targets(protocol: str, exe: Path, patch: Path, procs: Procs, args: argparse.Namespace) -> dict:
    """A protocol's cycles against ``--targets`` targets at once (one in this process when 1), merged."""
    if args.targets == 1:
        return run_protocol(protocol, exe, patch, procs, args, protocol)
    shares = [args.cycles // args.targets + (i < args.cycles % args.targets) for i in range(args.targets)]
    with multiprocessing.get_context("fork").Pool(args.targets) as pool:
        jobs = [pool.apply_async(_worker, (protocol, exe, patch, argparse.Namespace(**{**vars(args), "cycles": n}),
                                           f"{protocol}[{i}]")) for i, n in enumerate(shares)]
        return merge([job.get() for job in jobs])


def max_rss_mib() -> int:
    """The largest resident set of this process or of a worker it waited for, MiB."""
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) // 1024


def main() -> None:
    """Build the target and the patches, run each protocol, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000, help="apply/revert cycles per protocol (default 1000)")
    ap.add_argument("--protocols", default="no-stop,rolling,stop-the-world",
                    help="comma-separated (default: all three)")
    ap.add_argument("--targets", type=int, default=1,
                    help="targets cycled at once, each by its own worker; --cycles is split (default 1)")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="stop a protocol after this many seconds (default: none; the table gives the count)")
    ap.add_argument("--segment-s", type=float, default=30.0,
                    help="seconds of cycles between two call-rate baselines (default 30)")
    ap.add_argument("--baseline-s", type=float, default=1.0,
                    help="seconds of each call-rate baseline, idle and tool-busy (default 1)")
    ap.add_argument("--progress", action="store_true", help="print progress on stderr after each segment")
    args = ap.parse_args()
    protocols = args.protocols.split(",")
    if any(p not in WANT for p in protocols):
        sys.exit(f"--protocols: each one of {', '.join(WANT)}")
    if not 1 <= args.targets <= 16:
        sys.exit("--targets: from 1 to 16")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-cycles-") as tmpdir, Procs() as procs:
        tmp = Path(tmpdir)
        exe = compile_c((TARGETS / "protocols.c").read_text(), tmp / "protocols", "-fcf-protection=full")
        for p in protocols:
            src = PATCH_SOURCE[p]
            patch = hotpatch_build((TARGETS / src).read_text(), exe, tmp / f"{Path(src).stem}.hp", "prot")
            results[p] = run_targets(p, exe, patch, procs, args)

    print(f"`{command_line()}`  \n{machine()}; {THREADS} threads (nice 19) calling 5 functions in tight loops; "
          f"--cycles {args.cycles}, {args.targets} target{'s' * (args.targets > 1)} at once"
          f"{f', --time-limit {args.time_limit:g} s' if args.time_limit else ''}; "
          f"times median [p99, worst]; tool max RSS {max_rss_mib()} MiB"
          "\n")
    rows = []
    for p, r in results.items():
        n = r["cycles"]

        def ms(xs: list[float]) -> str:
            return f"{median(xs):.1f} [{pct(xs, 0.99):.1f}, {max(xs):.1f}]" if xs else "—"

        pause = r["pause_us"]
        idle, busy, cycling = (calls / sec if sec else float("nan") for calls, sec in r["rates"].values())
        rows.append([
            f"{p} ({WANT[p]})", f"{n:,}", f"{r['wall_s']:.0f}", f"{n / r['wall_s']:.1f}", ms(r["apply_ms"]),
            ms(r["revert_ms"]),
            f"{median(pause) / 1e3:.2f} [{pct(pause, 0.99) / 1e3:.2f}, {max(pause) / 1e3:.2f}]" if pause else "—",
            f"{len(r['errors'])}" + (f" ({r['bad_protocol']} wrong protocol)" if r["bad_protocol"] else ""),
            sum(kind == "crash" for _, kind, _ in r["deaths"]),
            sum(kind == "wrong" for _, kind, _ in r["deaths"]),
            len(r["left_traced"]),
            f"{r['seen_old']:,} / {r['seen_new']:,}",
            f"{idle / 1e6:.1f} / {busy / 1e6:.1f}",
            f"{cycling / 1e6:.1f} ({cycling / idle:.2f}× idle, {cycling / busy:.2f}× tool-busy)",
            f"{r['left_applied']} applied, {r['retained']} retained, maps {r['maps'][0]}→{r['maps'][1]}, "
            f"RSS {r['rss'][0] / 1024:.1f}→{r['rss'][1] / 1024:.1f} MiB, "
            f"{'; '.join(h for h in r['health'] if h) or 'running, untraced'}, "
            f"exit {', '.join(str(e) for e in r['exit'])}",
        ])
    print(markdown_table(["protocol", "cycles", "wall s", "cycles/s", "apply ms", "revert ms", "pause ms",
                          "hotpatch errors", "crashes", "wrong values", "threads left traced",
                          "values seen old / new",
                          "M calls/s per target, baseline: idle / tool-busy", "M calls/s per target during cycles",
                          "at the end"], rows))
    for p, r in results.items():
        deaths = [f"cycle {c}: target {kind}, {msg}" for c, kind, msg in r["deaths"][:10]]
        for line in r["errors"][:10] + deaths + r["left_traced"][:10]:
            print(f"- {p}: {line}")
        if len(r["left_traced"]) > 10:
            print(f"- {p}: … {len(r['left_traced']) - 10} more operations left a thread traced")
        if len(r["errors"]) > 10:
            print(f"- {p}: … {len(r['errors']) - 10} more errors")


if __name__ == "__main__":
    main()

"""Time from ``hotpatch repo add`` to every one of N processes patched by ``hotpatch agent`` (issue 5).

A repository is served by ``python -m http.server`` on 127.0.0.1; this host trusts it (a ``HOTPATCH_HOME`` in
the temporary directory); N copies of ``tests/targets/calc.c`` run; the agent polls every ``--interval``
seconds. Each round publishes version k of a patch (``repo add`` of a new version) and measures the time until
every process answers with version k's value (asked through its stdin). Baseline in the same run: ``hotpatch
apply --exe`` of the same version to the same processes, directly (in parallel, no repository), after the
agent is stopped (the file signed by ``repo add``, as this host requires). The table gives medians over
``--rounds``.

Usage: ``python benchmarks/bench_agent.py [--processes 100] [--interval 1] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import Procs, command_line, hotpatch_cmd, machine, markdown_table, median, ratio, run_checked

TARGETS = Path(__file__).resolve().parent.parent / "tests" / "targets"
WAIT_S = 300.0


def ask(proc: subprocess.Popen[bytes], n: int) -> int:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{n}\n".encode())
    proc.stdin.flush()
    return int(proc.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    os.environ["HOTPATCH_HOME"] = str(tmp / "home")
    hp = hotpatch_cmd()
    exe = tmp / "calc"
    run_checked(["gcc", "-O2", str(TARGETS / "calc.c"), "-o", str(exe)])
    repo = tmp / "repo"
    run_checked([*hp, "repo", "init", str(repo)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    agent_rows: list[float] = []
    direct_rows: list[float] = []
    with Procs() as procs:
        procs.start(sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(repo / "public"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/metadata/timestamp.json", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        run_checked([*hp, "update", "--repo", url, "--root", str(repo / "public" / "metadata" / "1.root.json")])
        targets = []
        for _ in range(args.processes):
            p = procs.start(exe, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert p.stdout is not None
            p.stdout.readline()  # ready
            targets.append(p)
        patches = []
        for k in range(1, 2 * args.rounds + 1):
            src = tmp / f"fix{k}.c"
            src.write_text(f"long compute(long x) {{ return x + {1000 * k}; }}\n")
            out = tmp / f"fix{k}.hp"
            run_checked(
                [*hp, "build", str(src), "--target", str(exe), "-o", str(out), "--name", "fix", "--version", str(k)]
            )
            patches.append(out)

        def all_at(k: int) -> bool:
            return all(ask(p, 5) == 5 + 1000 * k for p in targets)

        agent = procs.start(*hp, "agent", "--repo", url, "--interval", str(args.interval))
        for k in range(1, args.rounds + 1):
            start = time.monotonic()
            run_checked([*hp, "repo", "add", str(repo), str(patches[k - 1])])
            while not all_at(k):
                if time.monotonic() - start > WAIT_S:
                    sys.exit(f"version {k} not on every process within {WAIT_S} s")
                time.sleep(0.05)
            agent_rows.append(time.monotonic() - start)
        agent.terminate()
        agent.wait(timeout=120)
        for k in range(args.rounds + 1, 2 * args.rounds + 1):
            run_checked([*hp, "repo", "add", str(repo), str(patches[k - 1])])  # signed: this host requires it
            signed = repo / "public" / "targets" / f"fix-{k}.hp"
            start = time.monotonic()
            run_checked([*hp, "apply", "--exe", str(exe), str(signed)], timeout=WAIT_S)
            direct_rows.append(time.monotonic() - start)
            if not all_at(k):
                sys.exit(f"apply --exe left a process without version {k}")
    base = median(direct_rows)
    print(f"`{command_line()}`  \n{machine()}; {args.processes} processes, agent interval {args.interval} s\n")
    print(markdown_table(
        ["how", "rounds", "median s", "worst s", "against apply --exe"],
        [
            ["`repo add` → agent → every process patched", len(agent_rows), f"{median(agent_rows):.2f}",
             f"{max(agent_rows):.2f}", ratio(median(agent_rows), base)],
            ["`hotpatch apply --exe` (no repository)", len(direct_rows), f"{base:.2f}", f"{max(direct_rows):.2f}",
             "1.00×"],
        ],
    ))  # fmt: skip


if __name__ == "__main__":
    main()

"""``hotpatch agent``: keep every process of this host in line with a patch repository.

Every ``interval`` seconds the agent reads the repository through TUF (:func:`hotpatch.registry.client.update`:
the whole verification, every time) and then, for every process it may look at:

* a process mapping a module for whose build-id the repository publishes a patch gets the newest version of
  it, when it does not have that version already: applied, or upgraded in one transaction;
* a patch the repository's patches were applied with (its record names this repository as its origin,
  :func:`hotpatch.registry.client.repository_id`) and that the repository no longer publishes for that
  build is reverted. Patches applied by hand or from another repository are never touched.

Its state is the targets' own (their records, :mod:`hotpatch.state`) plus the verified cache: an agent killed at
any moment, even mid-apply, is simply started again (an apply cut short is rolled back or completed by the
next command, DESIGN.md §5). Processes started later are found at the next round. Work on processes runs in
parallel worker processes, parents before children (:mod:`hotpatch.every`).

Every action is one JSON line in the audit log (``--audit FILE``, default stderr): ``time``; ``action``, what
happened to a process (``applied``, ``upgraded``, ``reverted``, ``up-to-date``, ``not-applied``, ``exited``,
``failed``; the same in ``outcome``), or ``update`` (a repository that did not verify), ``start``, ``stop``;
``pid``; ``message``, with the patch names and versions. ``--metrics ADDR`` serves Prometheus text format
(prometheus_client) on a loopback address only.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
import time
from functools import partial
from typing import IO, Any

from ..errors import HotpatchError
from ..every import other_pids
from . import client

INTERVAL_S = 30.0


def _loopback(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) on a loopback address; raises HotpatchError otherwise."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        ok = bool(sep) and ipaddress.ip_address(host).is_loopback and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise HotpatchError(f"--metrics {addr}: give a loopback address and port, e.g. 127.0.0.1:9464")
    return host, int(port)


class Agent:
    """The reconciliation loop (see the module docstring). ``repo``: URL or directory (None: the last one);
    ``interval``: seconds between rounds; ``audit``: where the JSON lines go; ``metrics``: loopback
    ``HOST:PORT`` or None."""

    def __init__(self, repo: str | None, interval: float, audit: IO[str], metrics: str | None = None) -> None:
        self.repo, self.interval, self.audit = repo, interval, audit
        self.metrics = _loopback(metrics) if metrics else None
        self.stop = threading.Event()
        self.origin = client.repository_id()
        self.rounds = 0
        self._counters: Any = None

    def log(self, action: str, **fields: Any) -> None:
        """One audit line: time (UTC, ISO 8601), action, and ``fields``."""
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action, **fields}
        self.audit.write(json.dumps(doc, sort_keys=True) + "\n")
        self.audit.flush()
        if self._counters is not None:
            self._counters["actions"].labels(action, str(fields.get("outcome", ""))).inc()

    def _serve_metrics(self) -> None:
        from prometheus_client import Counter, Gauge, start_http_server

        assert self.metrics is not None
        start_http_server(self.metrics[1], addr=self.metrics[0])
        self._counters = {
            "actions": Counter("hotpatch_agent_actions", "Agent actions", ["action", "outcome"]),
            "rounds": Counter("hotpatch_agent_rounds", "Reconciliation rounds done"),
            "patched": Gauge("hotpatch_agent_patched_processes", "Processes with a repository patch applied"),
            "published": Gauge("hotpatch_agent_published_patches", "Patches the verified repository publishes"),
            "verified": Gauge("hotpatch_agent_last_verified_seconds", "Unix time of the last verified update"),
        }

    def run(self) -> None:
        """Reconcile every ``interval`` seconds until :attr:`stop` is set (or SIGTERM/SIGINT, by the caller)."""
        if self.metrics is not None:
            self._serve_metrics()
        while not self.stop.is_set():
            started = time.monotonic()
            self.reconcile()
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def reconcile(self) -> None:
        """One round: update through TUF, then apply, upgrade and revert as the repository says."""
        from ..every import ProcessResult, apply_repo_one, revert_one, run_all

        self.rounds += 1
        try:
            published = client.update(self.repo)
        except HotpatchError as e:
            self.log("update", outcome="failed", message=str(e))  # nothing is done from unverified data
            return
        if self._counters is not None:
            self._counters["rounds"].inc()
            self._counters["published"].set(len(published))
            self._counters["verified"].set(time.time())
        wanted = client.newest_for({p.build_id for p in published}, published)
        by_build: dict[str, dict[str, int]] = {}
        for p in wanted:
            by_build.setdefault(p.build_id, {})[p.name] = p.version
        to_apply, to_revert = self._plan(by_build, {p.file for p in wanted})
        results: list[ProcessResult] = []
        if to_revert:
            for name, pids in to_revert.items():
                results += [
                    r._replace(message=f"{name}: {r.message}") for r in run_all(pids, partial(revert_one, name, "auto"))
                ]
        if to_apply:
            from ..api import ApplyOptions

            pairs = [(p.build_id, p.path) for p in wanted]
            results += run_all(to_apply, partial(apply_repo_one, pairs, ApplyOptions(origin=self.origin)))
        for r in results:
            self.log(r.outcome, pid=r.pid, outcome=r.outcome, message=r.message)
        if self._counters is not None:
            self._counters["patched"].set(self._count_patched(by_build))

    def _plan(self, by_build: dict[str, dict[str, int]], files: set[str]) -> tuple[list[int], dict[str, list[int]]]:
        """The processes needing an apply or upgrade (they map a published module, by file name then
        build-id, without its newest patch version), and per patch name those needing a revert (applied, but
        not published for the build-id its record names)."""
        to_apply: list[int] = []
        to_revert: dict[str, list[int]] = {}
        for pid in other_pids():
            applied = _applied(pid)
            if applied is None:
                continue
            ids = client.build_ids_of(pid, files)
            want = {name: v for b in ids for name, v in by_build.get(b, {}).items()}
            if any(applied.get(name, (None, ""))[0] != v for name, v in want.items()):
                to_apply.append(pid)
            for name, (_, build_id, origin) in applied.items():
                if origin == self.origin and name not in by_build.get(build_id, {}):
                    to_revert.setdefault(name, []).append(pid)
        return to_apply, to_revert

    def _count_patched(self, by_build: dict[str, dict[str, int]]) -> int:
        count = 0
        for pid in other_pids():
            applied = _applied(pid) or {}
            count += any(name in by_build.get(build_id, {}) for name, (_, build_id, _) in applied.items())
        return count


def _applied(pid: int) -> dict[str, tuple[int, str, str]] | None:
    """The patches applied in ``pid`` (name -> (version, build-id, origin)) from its own record, read without
    stopping it; {} when it has no record; None when it cannot be read (gone, another user's)."""
    from .. import state as statemod
    from ..process.maps import read_maps
    from ..process.memory import Memory

    try:
        addr = statemod.find_region(read_maps(pid))
        if addr is None:
            return {}
        with Memory(pid) as mem:
            record = statemod.read(mem, addr)
            live = [p for p in record.patches if statemod.site_status(mem, p) != "reverted"]
            return {p.name: (p.version, p.build_id, p.origin) for p in live}
    except (HotpatchError, OSError):
        return None


def main(repo: str | None, interval: float, audit_path: str | None, metrics: str | None) -> None:
    """Run an agent until SIGTERM or SIGINT (the CLI's entry point)."""
    import signal

    audit: IO[str] = open(audit_path, "a", buffering=1) if audit_path else sys.stderr  # noqa: SIM115
    agent = Agent(repo, interval, audit, metrics)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    agent.log("start", repo=repo or "", interval=interval)
    try:
        agent.run()
    finally:
        agent.log("stop")
        if audit is not sys.stderr:
            audit.close()

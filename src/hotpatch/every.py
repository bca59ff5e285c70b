"""Every process of a program: find the processes that map a module, and apply or revert in all of them.

``hotpatch apply --exe PATH`` or ``--build-id ID`` patches every running process that has that module mapped
(an executable, or a library), in parallel, each in a worker process of its own (ptrace ties a tracee to one
thread, and each operation stops at most its own target's threads). Fork servers go parent first (DESIGN.md
§5, "fork() servers"): the processes are taken in waves by depth in the process tree, so a worker the parent
forks once it is patched inherits the patch and its record (``hotpatch.state``), and is then found up to date.
A process that exits midway is reported as such, not as a failure of the others.

Process discovery reads ``/proc/PID/maps`` only (proc(5)); a process whose maps cannot be read (another user's,
without privileges) is not a candidate.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import HotpatchError, TargetError, UpToDateError

if TYPE_CHECKING:
    from .api import ApplyOptions

MAX_WORKERS = 8  # targets patched at once (each is mostly waiting on its own threads, not on a CPU)


class ProcessResult(NamedTuple):
    """What happened in one process: ``outcome`` is ``applied``, ``upgraded``, ``up-to-date``, ``reverted``,
    ``not-applied`` (nothing to revert), ``exited`` (gone midway) or ``failed``; ``message`` the details (the
    error's line for ``failed``); ``wave``: its depth among the processes chosen (0: no chosen parent);
    ``started``/``finished``: wall-clock times (seconds since the epoch)."""

    pid: int
    ppid: int
    wave: int
    outcome: str
    message: str
    started: float
    finished: float

    @property
    def ok(self) -> bool:
        """False only for ``failed``."""
        return self.outcome != "failed"


def other_pids() -> list[int]:
    """Every PID of /proc but this process's own, sorted."""
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid())


def mapped_paths(pid: int) -> set[str]:
    """The files ``pid`` maps (as /proc/PID/maps names them); empty when they cannot be read."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {line.split(None, 5)[5].rstrip("\n") for line in f if line.count(" ") >= 5 and "/" in line}
    except OSError:
        return set()


def processes_mapping_file(path: str) -> list[int]:
    """PIDs of the processes (other than this one) that map the file ``path`` (symlinks resolved). Raises
    TargetError when ``path`` does not exist."""
    if not os.path.exists(path):
        raise TargetError(f"{path} does not exist")
    real = os.path.realpath(path)
    return [pid for pid in other_pids() if real in mapped_paths(pid)]


def processes_mapping_build(build_id: str) -> list[int]:
    """PIDs of the processes (other than this one) that map an ELF file with GNU build-id ``build_id``; each
    file is read once (by its path as the first process maps it, through that process's root)."""
    from .elf.image import open_elf

    ids: dict[str, str | None] = {}
    out = []
    for pid in other_pids():
        for path in mapped_paths(pid):
            if path not in ids:
                try:
                    img = open_elf(f"/proc/{pid}/root{path}", "module")
                    try:
                        ids[path] = img.build_id
                    finally:
                        img.close()
                except HotpatchError:
                    ids[path] = None
            if ids[path] == build_id:
                out.append(pid)
                break
    return out


def parent_of(pid: int) -> int:
    """The parent PID of ``pid`` (proc(5) /proc/PID/stat field 4), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def waves(pids: list[int]) -> list[list[int]]:
    """``pids`` grouped by depth in the process tree among themselves: parents before their children."""
    parents = {p: parent_of(p) for p in pids}
    depth: dict[int, int] = {}

    def depth_of(p: int, seen: frozenset[int] = frozenset()) -> int:
        if p not in depth:
            up = parents.get(p, 0)
            depth[p] = depth_of(up, seen | {p}) + 1 if up in parents and up not in seen else 0
        return depth[p]

    out: dict[int, list[int]] = {}
    for p in pids:
        out.setdefault(depth_of(p), []).append(p)
    return [sorted(out[d]) for d in sorted(out)]


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (no /proc entry, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _timed(op: Callable[[int], tuple[str, str]], pid: int) -> tuple[str, str, float, float]:
    started = time.time()
    try:
        outcome, message = op(pid)
    except UpToDateError as e:
        outcome, message = "up-to-date", str(e)
    except HotpatchError as e:
        outcome, message = ("exited", "exited during the operation") if gone(pid) else ("failed", str(e))
    except Exception as e:  # one target's surprise is not the others'
        outcome, message = "failed", f"internal error: {type(e).__name__}: {e}"
    return outcome, message, started, time.time()


def run_all(pids: list[int], op: Callable[[int], tuple[str, str]]) -> list[ProcessResult]:
    """Run ``op(pid) -> (outcome, message)`` for every PID, wave by wave (:func:`waves`), up to MAX_WORKERS at
    once in forked worker processes; ``op`` must be picklable (a module-level function or a partial of one).
    UpToDateError and HotpatchError become outcomes (``exited`` when the process is gone)."""
    results: list[ProcessResult] = []
    ctx = multiprocessing.get_context("fork")  # the CLI is single-threaded here; fork starts fastest
    with ProcessPoolExecutor(max_workers=min(MAX_WORKERS, max(1, len(pids))), mp_context=ctx) as pool:
        for depth, wave in enumerate(waves(pids)):
            done = list(pool.map(partial(_timed, op), wave))
            results += [ProcessResult(p, parent_of(p), depth, *r) for p, r in zip(wave, done, strict=True)]
    return results


def summary(results: list[ProcessResult]) -> dict[str, Any]:
    """Counts per outcome and the number of processes, for the CLI's last line and ``--json``."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return {"processes": len(results), **counts}


def apply_one(patch: str, options: ApplyOptions, pid: int) -> tuple[str, str]:
    """Apply the patch file ``patch`` to ``pid`` with ``options`` (:meth:`hotpatch.api.Target.apply`'s):
    ``applied`` or ``upgraded``, and the patch, protocol and longest stop."""
    from .api import attach
    from .patch.bundle import PatchFile

    with attach(pid) as target:
        rep = target.apply(PatchFile(patch), *options)
    outcome = "upgraded" if rep.replaced_version is not None else "applied"
    stop = f"protocol {rep.protocol}, longest stop {rep.pause_us:.0f} µs"
    return outcome, f"patch {rep.name} version {rep.version}, {stop}"


def revert_one(name: str | None, protocol: str, pid: int) -> tuple[str, str]:
    """Revert patch ``name`` (every patch when None) in ``pid``: ``reverted``, or ``not-applied`` when it has
    none."""
    from .api import attach
    from .errors import StateError

    try:
        with attach(pid) as target:
            reps = target.revert(name, protocol)
    except StateError as e:
        return "not-applied", str(e)
    if not reps:
        return "not-applied", "no patch applied"
    return "reverted", ", ".join(f"patch {r.name} version {r.version}" for r in reps)


def apply_repo_one(patches: list[tuple[str, str]], options: ApplyOptions, pid: int) -> tuple[str, str]:
    """Apply to ``pid`` the newest published version of each patch whose build-id it maps (``patches``:
    (build-id, verified file path) pairs, as :func:`hotpatch.registry.client.newest_for` chose them): each
    only when newer than the applied one. ``applied``/``upgraded`` when one was, else ``up-to-date``."""
    from .registry.client import build_ids_of

    mapped = build_ids_of(pid)
    done, outcome = [], "up-to-date"
    for build_id, path in patches:
        if build_id not in mapped:
            continue
        try:
            result, message = apply_one(path, options, pid)
        except UpToDateError:
            continue
        done.append(message)
        outcome = "upgraded" if result == "upgraded" or outcome == "upgraded" else "applied"
    if gone(pid):
        return "exited", "exited during the operation"
    return outcome, "; ".join(done) or "every published patch is applied"

"""Is code in use? A thread's RIP and stack words against address ranges (DESIGN.md §4 R, §5 freeing memory).

A thread uses a range of code when its RIP, the RIP a syscall restart will rewind it to (RIP - 2, research
§4.3), or any word of its stack (a return address, a signal frame's saved RIP) lies inside. :func:`views`
looks at threads with the others running (:class:`~hotpatch.process.live.LiveWorld`) and stops none where it
can: a thread asleep in the kernel is read in place (:func:`look_asleep`), a running one through one perf
sample (:mod:`hotpatch.process.sampling`, all of them at once). Only where neither works is a thread stopped,
one at a time, never two at once (:func:`view_of`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from .process.live import LiveWorld
from .process.maps import Mapping
from .process.memory import Memory
from .process.sampling import Sample, Sampler, SamplingUnavailable
from .process.stackview import ThreadView, look, read_stack, stack_span

WATCH_S = 0.05  # how long a busy thread is looked at again when checking whether memory is still in use
SAMPLE_RUN_NS = 5_000_000  # CPU time a thread may run after being armed with no sample before it is stopped
SAMPLE_WAIT_S = 10.0  # how long a thread that does not get a CPU is awaited (as LiveWorld.stop_one waits)
SAMPLE_WINDOW = 32  # threads armed for a sample at once (each event locks 1 + DATA_PAGES pages)
POLL_S = 0.0005  # between two looks at the armed events
ASLEEP_EVERY_S = 0.005  # how often an armed thread not sampled yet is checked for having gone to sleep


def _blocked_at(pid: int, tid: int) -> tuple[str, int] | None:
    """``(syscall line, voluntary context switches)`` of a thread blocked in the kernel, None when it runs or
    is gone. proc(5) /proc/PID/task/TID/syscall gives "NR args… SP PC" (or "-1 SP PC" when blocked outside a
    system call) only while the task stays off the CPU (kernel/ptrace.c ``task_current_syscall``), else
    "running"; the switch count is proc(5) status ``voluntary_ctxt_switches``."""
    base = f"/proc/{pid}/task/{tid}/"
    try:
        with open(base + "status", encoding="ascii", errors="replace") as f:
            switches = next((int(ln.split()[1]) for ln in f if ln.startswith("voluntary_ctxt_switches:")), -1)
        with open(base + "syscall", encoding="ascii") as f:
            line = f.read().strip()
    except (OSError, ValueError):
        return None
    return None if line.startswith("running") or switches < 0 else (line, switches)


def look_asleep(
    mem: Memory, maps: list[Mapping], pid: int, tid: int, word: int, stack: bool = True
) -> ThreadView | None:
    """The :class:`ThreadView` of thread ``tid`` taken without stopping it, when it stays blocked in the kernel
    throughout; None when it runs (or ran meanwhile): stop it and :func:`look` instead.

    Its user registers cannot change while it is blocked, nor its stack (only it writes there). Before and
    after the stack read, its syscall line and voluntary switch count must be equal: to run user code in
    between it must have left the CPU again (count + 1) or be seen running. ``pcs`` are PC and PC - 2 (a
    syscall restart's rewind, research §4.3, counted whether or not one will happen). Without ``stack`` the
    view's stack is left empty (nothing is read)."""
    before = _blocked_at(pid, tid)
    if before is None:
        return None
    fields = before[0].split()
    sp, pc = int(fields[-2], 16), int(fields[-1], 16)
    data = read_stack(mem, maps, sp, word) if stack else b""
    if _blocked_at(pid, tid) != before:
        return None
    return ThreadView((pc, pc - 2) if fields[0] != "-1" else (pc,), data, word, tuple(fields[:-2]))


def _from_sample(maps: list[Mapping], s: Sample, word: int, stack: bool = True) -> ThreadView | None:
    """The :class:`ThreadView` a perf sample gives: the same stack :func:`_stack` would read, from the
    sample's copy (none without ``stack``); None when the copy is shorter (a deeper stack, or a page the
    kernel could not read)."""
    if s.rip == 0:
        return None
    if not stack:
        return ThreadView((s.rip,), b"", word)
    start, end = stack_span(maps, s.rsp, word)
    if end <= start:
        return ThreadView((s.rip,), b"", word)
    skip = -s.rsp % word  # the copy starts at RSP itself: from the first whole word
    if end - s.rsp > len(s.stack):
        return None
    return ThreadView((s.rip,), s.stack[skip : end - s.rsp], word)


def _run_ns(pid: int, tid: int) -> int:
    """CPU time thread ``tid`` has run, ns: proc(5) /proc/PID/task/TID/schedstat, first field (0 when gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _sampled(
    world: LiveWorld,
    mem: Memory,
    maps: list[Mapping],
    tids: list[int],
    word: int,
    out: dict[int, ThreadView | None],
    stack: bool = True,
) -> list[int]:
    """Put into ``out`` the views of the running threads ``tids`` taken from one perf sample each (at most
    SAMPLE_WINDOW armed at once), or in place once asleep; the others' events are served meanwhile. Returns
    the threads left to stop: one that ran SAMPLE_RUN_NS of CPU time with no sample (busy in the kernel), or
    got no CPU for SAMPLE_WAIT_S (a stop waits for the CPU just as long; waiting is not given up earlier, as
    a starved thread would only be stopped after as long a wait again), a stack deeper than a sample holds,
    or all not yet seen when the kernel refuses perf events."""
    todo, left = list(reversed(tids)), []
    armed: dict[int, tuple[float, int]] = {}  # tid -> (when armed, its CPU time then, ns)
    try:
        with Sampler() as sampler:
            asleep_at = time.monotonic() + ASLEEP_EVERY_S
            while todo or armed:
                while todo and len(armed) < SAMPLE_WINDOW:
                    tid = todo.pop()
                    if sampler.add(tid):
                        armed[tid] = (time.monotonic(), _run_ns(world.pid, tid))
                    elif os.path.exists(f"/proc/{world.pid}/task/{tid}") and armed:
                        todo.append(tid)  # fds or locked memory used up: wait for the armed ones
                        break
                    else:
                        out[tid] = None  # gone
                world.pump()  # signal-delivery-stops, new threads: as while a thread is stopped
                for s in sampler.poll():
                    del armed[s.tid]
                    view = _from_sample(maps, s, word, stack)
                    if view is None:
                        left.append(s.tid)
                    else:
                        out[s.tid] = view
                        world.samples_by_tid[s.tid] = world.samples_by_tid.get(s.tid, 0) + 1
                now = time.monotonic()
                for tid, (since, ran) in list(armed.items()):
                    th, view, late = world.threads.get(tid), None, now - since > SAMPLE_WAIT_S
                    if th is not None and th.stopped:  # a group-stop (SIGSTOP) meanwhile: no sample will come
                        view = look(mem, maps, th, word)
                    elif th is not None and now >= asleep_at:
                        view = look_asleep(mem, maps, world.pid, tid, word, stack)
                        late = late or (view is None and _run_ns(world.pid, tid) - ran > SAMPLE_RUN_NS)
                    if th is None or view is not None or late:
                        sampler.drop(tid)
                        del armed[tid]
                        if view is not None or th is None:
                            out[tid] = view
                        else:
                            left.append(tid)
                if now >= asleep_at:
                    asleep_at = now + ASLEEP_EVERY_S
                if armed:
                    time.sleep(POLL_S)
    except SamplingUnavailable:
        return [t for t in tids if t not in out]
    return left


def views(
    world: LiveWorld, mem: Memory, maps: list[Mapping], tids: Sequence[int], word: int, stack: bool = True
) -> dict[int, ThreadView | None]:
    """The :class:`ThreadView` of each seized thread of ``tids``, each looked at once; None for one that is
    gone. A thread asleep in the kernel is looked at in place (:func:`look_asleep`), a running one through a
    perf sample (:mod:`hotpatch.process.sampling`): neither is stopped. A thread stopped already (a group-stop)
    is read as it is; one that gives no usable sample is stopped alone (:func:`view_of`). Without ``stack``
    only where a thread is (its PC, its system call when asleep) matters: no stack is read, and a sample whose
    stack copy is short is enough."""
    out: dict[int, ThreadView | None] = {}
    running = []
    for tid in tids:
        th = world.threads.get(tid)
        if th is None or th.stopped:
            out[tid] = look(mem, maps, th, word) if th is not None else None
            continue
        view = look_asleep(mem, maps, world.pid, tid, word, stack)
        if view is None:
            running.append(tid)
        else:
            out[tid] = view
    for tid in _sampled(world, mem, maps, running, word, out, stack) if running else []:
        out[tid] = view_of(world, mem, maps, tid, word)
    return out


def view_of(world: LiveWorld, mem: Memory, maps: list[Mapping], tid: int, word: int) -> ThreadView | None:
    """The :class:`ThreadView` of seized thread ``tid``: taken asleep (:func:`look_asleep`), else with the
    thread stopped alone for the register and stack read and resumed at once. None when it is gone."""
    view = look_asleep(mem, maps, world.pid, tid, word)
    if view is not None:
        return view
    th = world.stop_one(tid)
    if th is None:
        return None
    view = look(mem, maps, th, word)
    world.resume_one(tid)
    return view


def watch_pass(
    world: LiveWorld,
    mem: Memory,
    maps: list[Mapping],
    watch: Sequence[tuple[int, int]],
    word: int,
    seen: Callable[[int, ThreadView | None], None] | None = None,
) -> set[tuple[int, int]]:
    """The regions ``(addr, bytes)`` of ``watch`` some seized thread of ``world`` still uses (RIP or stack word
    inside); a busy thread is looked at again every 0.5 ms for up to WATCH_S (a preempted thread may stand on
    a jump a while). Call it once the new code is in place and synced: a thread seen clear can then never
    enter the regions again. ``seen`` is called with every look (tid, view; None: gone)."""
    busy_by: dict[int, set[tuple[int, int]]] = {}
    pending = list(world.threads)
    deadline = time.monotonic() + WATCH_S
    while True:
        for tid, view in views(world, mem, maps, pending, word).items():
            if seen is not None:
                seen(tid, view)
            if view is None:
                busy_by.pop(tid, None)
                continue
            hit = {(a, n) for a, n in watch if view.touches(a - 1, a + n)}
            if hit:
                busy_by[tid] = hit
            else:
                busy_by.pop(tid, None)
        pending = [t for t in busy_by if t in world.threads]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.0005)
    return set().union(*(busy_by[t] for t in pending)) if pending else set()

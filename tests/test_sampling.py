"""perf samples of running threads (hotpatch.process.sampling, hotpatch.inuse.views): what a sample shows
against what a stop shows, for spinning threads of a real target, with no thread stopped."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import TARGETS, Procs, assert_running, compile_program, wait_for_line
from hotpatch.inuse import _from_sample, views
from hotpatch.process.live import LiveWorld
from hotpatch.process.maps import read_maps
from hotpatch.process.memory import Memory
from hotpatch.process.sampling import STACK_DUMP, Sample, Sampler
from hotpatch.process.tracer import run_as_tracer
from test_inuse import start_sleepers, stopped_views


def _samples(tids: list[int]) -> dict[int, Sample]:
    got: dict[int, Sample] = {}
    deadline = time.monotonic() + 10
    with Sampler() as sampler:
        for tid in tids:
            assert sampler.add(tid)
        while len(got) < len(tids):
            assert time.monotonic() < deadline, f"no sample of {set(tids) - set(got)} within 10 s"
            got.update((s.tid, s) for s in sampler.poll())
            time.sleep(0.001)
    return got


def test_a_sample_shows_the_frames_a_stop_shows(tmp_path: Path, procs: Procs) -> None:
    """A spinning thread's sample: RIP in executable code, RSP in the thread's stack, and the stack copied up
    to its mapping's end, holding every return address into the executable or a library that a stop of the
    same thread shows (the frames below the spinning loop do not change while it spins)."""
    p, workers, _ = start_sleepers(tmp_path, procs, spin=True)
    time.sleep(0.2)  # every spinner in its loop, past its start-up calls
    with Memory(p.pid) as mem:
        maps = read_maps(p.pid)
        # a sample's copy can come back short (the kernel copies without faulting, and gives up where it may
        # not read): hotpatch then stops the thread; here the sample is taken again, up to 5 times
        samples: dict[int, Sample] = {}
        for _ in range(5):
            wanted = [t for t in workers if t not in samples]
            samples.update((t, s) for t, s in _samples(wanted).items() if _from_sample(maps, s, 8) is not None)
        code = [(m.start, m.end) for m in maps if "x" in m.perms and m.path]

        returns = {
            tid: [w for w in memoryview(view.stack).cast("Q") if any(a <= w < b for a, b in code)]
            for tid, view in stopped_views(p.pid, mem, maps, workers).items()
        }
    assert set(samples) == set(workers), f"threads {set(workers) - set(samples)}: 5 samples, each with a short stack"
    for tid in workers:
        s = samples[tid]
        assert any(a <= s.rip < b for a, b in code), f"thread {tid}: RIP {s.rip:#x} outside the code"
        view = _from_sample(maps, s, 8)
        assert view is not None
        stack = next(m for m in maps if m.start <= s.rsp < m.end)
        assert len(view.stack) == stack.end - s.rsp  # an 8-aligned RSP: the copy starts at it
        words = set(memoryview(view.stack).cast("Q").tolist())
        assert returns[tid] and set(returns[tid]) <= words, f"thread {tid}: frames missing from the sample"
    assert_running(p.pid)


def test_views_sample_running_threads_and_stop_none(tmp_path: Path, procs: Procs) -> None:
    """views() over spinning threads and an asleep one: the spinners are sampled, the asleep main thread is
    read in place; no stop at all."""
    p, workers, _ = start_sleepers(tmp_path, procs, spin=True)
    with Memory(p.pid) as mem:
        maps = read_maps(p.pid)

        def look_all() -> tuple[dict[int, bool], int, int]:
            world = LiveWorld(p.pid, exit_detaches=True)
            try:
                world.seize()
                seen = views(world, mem, maps, [p.pid, *workers], 8)
                looked = {t: v is not None for t, v in seen.items()}
                return looked, sum(world.samples_by_tid.values()), sum(world.stops_by_tid.values())
            finally:
                world.detach_all()

        seen, samples, stops = run_as_tracer(look_all)
    assert seen == dict.fromkeys([p.pid, *workers], True)
    assert (samples, stops) == (len(workers), 0)
    assert_running(p.pid)


def test_a_stack_deeper_than_a_sample_is_looked_at_with_a_stop(tmp_path: Path, procs: Procs) -> None:
    """A thread 128 KiB down a recursion gives a sample whose stack copy stops short of its mapping's end:
    views() stops it alone (a stop reads the whole stack) and samples the shallow one."""
    exe = compile_program(TARGETS / "deep_stack.c", tmp_path / "deep_stack")
    p = procs.start(exe)
    wait_for_line(p, lambda line: line.strip() == "ready")
    tasks = [t for t in Path(f"/proc/{p.pid}/task").iterdir() if int(t.name) != p.pid]
    deep = next(int(t.name) for t in tasks if (t / "comm").read_text().strip() == "deep")
    shallow = next(int(t.name) for t in tasks if int(t.name) != deep)
    with Memory(p.pid) as mem:
        maps = read_maps(p.pid)

        def look_all() -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
            world = LiveWorld(p.pid, exit_detaches=True)
            try:
                world.seize()
                seen = views(world, mem, maps, [deep, shallow], 8)
                sizes = {t: len(v.stack) for t, v in seen.items() if v is not None}
                return sizes, dict(world.samples_by_tid), dict(world.stops_by_tid)
            finally:
                world.detach_all()

        sizes, samples, stops = run_as_tracer(look_all)
    assert (samples, stops) == ({shallow: 1}, {deep: 1})
    assert sizes[deep] > 128 * 1024 > STACK_DUMP  # the whole stack, read during the stop
    assert_running(p.pid)

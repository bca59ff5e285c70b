"""``inuse``: how a thread is judged to use code.

``ThreadView.touches``: the fast scan of a stopped thread's stack agrees with a word-by-word check. The scan
only decodes the 8-byte words whose upper half is the range's (found with ``bytes.find``); these cases put that
upper half everywhere it could mislead: at unaligned offsets, in the trailing partial word, on the range's
exact bounds, and in ranges that cross a 4 GiB boundary (the word-by-word path).

``look_asleep``: a thread blocked in the kernel is seen as a stop would show it, without being stopped; a
running one is refused; a rolling apply (``targets/sleepers.c``) stops none of the sleeping threads.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hotpatch
from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.inuse import look_asleep
from hotpatch.process import sampling as sampling_mod
from hotpatch.process.live import LiveWorld
from hotpatch.process.maps import Mapping, read_maps
from hotpatch.process.memory import Memory
from hotpatch.process.stackview import ThreadView, look, stack_words
from hotpatch.process.tracer import run_as_tracer


def brute(view: ThreadView, lo: int, hi: int) -> bool:
    """Every pc and every aligned stack word, one by one."""
    return any(lo < v < hi for v in (*view.pcs, *stack_words(view.stack, view.word)))


def test_touches_agrees_with_a_word_by_word_check() -> None:
    rng = random.Random(3)
    base = 0x7F33_D282_0000
    for _ in range(3000):
        word = rng.choice((8, 8, 4))
        lo = base + rng.randrange(0, 1 << 16) if word == 8 else rng.randrange(0x1000, 0xFFFF_0000)
        hi = lo + rng.randrange(0, 64)
        if word == 8 and rng.random() < 0.1:  # a range across a 4 GiB boundary
            lo, hi = 0x5615_FFFF_FFF0, 0x5616_0000_0010
        values = []
        for _ in range(rng.randrange(0, 40)):
            pick = rng.random()
            if pick < 0.3:
                values.append(lo + rng.randrange(-2, hi - lo + 3))  # on and around the bounds
            elif pick < 0.6:
                values.append((lo & ~0xFFFF_FFFF) | rng.randrange(0, 1 << 32))  # same upper half
            else:
                values.append(rng.randrange(0, 1 << (8 * word)))
        fmt = "<Q" if word == 8 else "<I"
        data = b"".join(struct.pack(fmt, v & ((1 << (8 * word)) - 1)) for v in values)
        if rng.random() < 0.3:  # the upper half at an unaligned offset, and a trailing partial word
            data = data + struct.pack("<I", lo >> 32)[: rng.randrange(1, 5)]
        if rng.random() < 0.3 and len(data) > 8:
            cut = rng.randrange(1, len(data) - 4)
            data = data[:cut] + struct.pack("<I", (lo + 1) >> 32) + data[cut + 4 :]
        pcs = tuple(lo + rng.randrange(-1, 3) for _ in range(rng.randrange(1, 3)))
        view = ThreadView(pcs, data, word)
        assert view.touches(lo, hi) == brute(view, lo, hi), (hex(lo), hex(hi), word, data.hex(), pcs)


def test_touches_finds_a_return_address_deep_in_a_large_stack() -> None:
    lo, hi = 0x5615_DCC0_C000, 0x5615_DCC0_C005
    stack = bytearray(struct.pack("<Q", 0x7FFC_0000_1234) * 4096)
    struct.pack_into("<Q", stack, 8 * 4000, lo + 3)
    assert ThreadView((0x1000,), bytes(stack), 8).touches(lo, hi)
    struct.pack_into("<Q", stack, 8 * 4000, hi)  # the end is excluded
    assert not ThreadView((0x1000,), bytes(stack), 8).touches(lo, hi)


SLEEPERS = 4
SLEEPERS_PATCH = "int compute(int x) { return 3 * x + 2; }\n"


def start_sleepers(tmp_path: Path, procs: Procs, spin: bool = False) -> tuple[subprocess.Popen[bytes], list[int], Path]:
    """sleepers.c running with its 4 threads blocked in read(2) (or spinning, with ``spin``), their TIDs, and a
    patch for its compute."""
    exe = compile_program(TARGETS / "sleepers.c", tmp_path / "sleepers")
    src = tmp_path / "sleepers_patch.c"
    src.write_text(SLEEPERS_PATCH)
    patch = tmp_path / "sleepers_patch.hp"
    res = run_cli("build", src, "--target", exe, "-o", patch, "--name", "sleepers_patch")
    assert res.returncode == 0, res.stderr
    p = procs.start(exe, *(["spin"] if spin else []), stdin=subprocess.PIPE)
    wait_for_line(p, lambda line: line.strip() == "ready")
    workers = sorted(int(t.name) for t in Path(f"/proc/{p.pid}/task").iterdir() if int(t.name) != p.pid)
    assert len(workers) == SLEEPERS
    deadline = time.monotonic() + 10
    for tid in [] if spin else workers:
        while Path(f"/proc/{p.pid}/task/{tid}/syscall").read_text().split()[0] != "0":  # read(2)
            assert time.monotonic() < deadline, f"thread {tid} never blocked in read"
            time.sleep(0.01)
    return p, workers, patch


def stopped_views(pid: int, mem: Memory, maps: list[Mapping], tids: list[int]) -> dict[int, ThreadView]:
    """The :class:`ThreadView` of each of ``tids``, each stopped alone (a tracer thread, LiveWorld)."""

    def stop_and_look() -> dict[int, ThreadView]:
        world = LiveWorld(pid, exit_detaches=True)
        out = {}
        try:
            world.seize()
            for tid in tids:
                th = world.stop_one(tid)
                assert th is not None
                out[tid] = look(mem, maps, th, 8)
                world.resume_one(tid)
        finally:
            world.detach_all()
        return out

    return run_as_tracer(stop_and_look)


def compute(p: subprocess.Popen[bytes], x: int) -> int:
    """compute(x) in the target, called by its main thread."""
    assert p.stdin is not None
    p.stdin.write(f"{x}\n".encode())
    p.stdin.flush()
    return int(wait_for_line(p, lambda line: line.startswith("compute")).split()[1])


def test_look_asleep_sees_what_a_stop_shows(tmp_path: Path, procs: Procs) -> None:
    p, workers, _ = start_sleepers(tmp_path, procs)
    with Memory(p.pid) as mem:
        maps = read_maps(p.pid)
        asleep = {tid: look_asleep(mem, maps, p.pid, tid, 8) for tid in workers}

        stopped = stopped_views(p.pid, mem, maps, workers)
    for tid in workers:
        view = asleep[tid]
        assert view is not None, f"thread {tid}, asleep in read, was not seen asleep"
        # a stop interrupts read: RIP is after the syscall instruction, and the restart would rewind it by 2
        assert set(stopped[tid].pcs) <= set(view.pcs) and view.pcs[0] - 2 == view.pcs[1]
        assert view.stack == stopped[tid].stack  # the same stack, read from the same RSP
    assert_running(p.pid)


def test_look_asleep_refuses_a_running_thread(procs: Procs) -> None:
    p = procs.start(sys.executable, "-c", "print('ready', flush=True)\nwhile True: pass")
    wait_for_line(p, lambda line: line.strip() == "ready")
    with Memory(p.pid) as mem:
        maps = read_maps(p.pid)
        assert all(look_asleep(mem, maps, p.pid, p.pid, 8) is None for _ in range(200))


def test_a_rolling_apply_stops_no_sleeping_thread(tmp_path: Path, procs: Procs) -> None:
    """Before look_asleep every worker was stopped once by the rolling check (check_stop_us > 0)."""
    p, _, patch = start_sleepers(tmp_path, procs)
    assert compute(p, 5) == 16
    with hotpatch.attach(p.pid) as target:
        rep = target.apply(str(patch), "rolling")
        assert rep.protocol == "R"
        assert rep.check_stop_us == 0, f"a sleeping thread was stopped for {rep.check_stop_us:.0f} µs"
        assert compute(p, 5) == 17
        reps = target.revert("sleepers_patch", "rolling")
        assert reps[0].check_stop_us == 0  # the watch of the patch's memory: no stop either
    assert compute(p, 5) == 16
    assert_running(p.pid)


@pytest.mark.parametrize("sampling", [True, False], ids=["sampled", "stopped"])
def test_a_rolling_cycle_looks_at_each_running_thread_once_per_pass(
    tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch, sampling: bool
) -> None:
    """A rolling cycle looks at every running thread once per pass, through a perf sample, stopping none
    (``check_samples``), or — perf events turned off — stopping each alone (``check_stops``), the borrowed
    asleep thread aside. Apply: protocol R's check, then, its keys having spun on ``EB FE``, the wait to see
    every thread out of fork() (hotpatch.forkfix). Revert: the watch of the patch's memory, whose looks also
    serve the fork wait."""
    monkeypatch.setattr(sampling_mod, "ENABLED", sampling)
    p, workers, patch = start_sleepers(tmp_path, procs, spin=True)
    with hotpatch.attach(p.pid) as target:
        rep = target.apply(str(patch), "rolling")
        reps = [rep]
        assert rep.protocol == "R"
        assert compute(p, 5) == 17
        reps += target.revert("sleepers_patch", "rolling")
        assert reps[1].retained == []  # the memory was freed: nothing uses it
    for r, passes in zip(reps, (2, 1), strict=True):
        looked = (r.check_samples, r.check_stops) if sampling else (r.check_stops, r.check_samples)
        assert looked == (passes * len(workers), 0), f"{r.check_samples} samples, {r.check_stops} stops"
        assert (r.check_stop_us == 0) == sampling
    assert compute(p, 5) == 16
    assert_running(p.pid)

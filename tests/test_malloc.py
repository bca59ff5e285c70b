"""Threads in malloc/free tight loops: every apply and revert succeeds at the first try (DESIGN.md §4, §5).

``targets/malloc_loops.c``, built with ``hotpatch cflags``, runs four threads that malloc, calloc, realloc and
free blocks of 1 B to 224 KiB in tight loops (checking every block's contents and its
``malloc_usable_size``), and two threads calling the hotpatch-ready ``compute`` (checking every result). Three
patches are applied and reverted 50 times with protocol ``auto``, in a rotating order, while they run:

- ``exe_fix``: ``compute`` of the program (a patchable-entry site): protocol A;
- ``libc_a``: libc's own ``malloc`` and ``malloc_usable_size`` (opportunistic sites in Debian's libc): A;
- ``libc_r``: libc's ``free`` (an ordinary site) and ``calloc`` (opportunistic): R for the mix.

The libc replacements call ``HOTPATCH_ORIGINAL`` and count their calls into the program's exported
``hp_*`` counters; the patched ``malloc_usable_size`` adds 2^40, which the loops recognise. So while a thread of
the target runs the in-target commit program, others are inside malloc and free, hold arena locks, enter
the very functions being rewritten, and spin on the self-loop at their entry (``free``'s key under R).

Every apply and revert must succeed with no exception and report the protocol ``auto`` picks first (A or R,
never the B fallback); after each, the target runs, no thread stopped, no tracer. After each apply the
counters of every libc replacement grow (the patch is in force); after each revert that kept no region
mapped, they stand still (nothing can run the replacements any more). The loops never see a wrong value or
a damaged block, both old and new values are seen, and at the end nothing is applied and every patched
function's bytes in the target (padding included) are the original ones again.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import hotpatch
from conftest import TARGETS, Procs, assert_running, compile_program, run_cli, wait_for_line
from hotpatch.elf.image import open_elf

CYCLES = 50
MALLOC_THREADS, COMPUTE_THREADS = 4, 2
STATS = re.compile(
    r"stats "
    + " ".join(
        rf"{k}=(?P<{k}>\d+)"
        for k in (
            "steps",
            "usable_old",
            "usable_new",
            "compute_old",
            "compute_new",
            "hp_malloc",
            "hp_free",
            "hp_calloc",
        )
    )
)
WINDOW_S = 0.02  # how long the loops run between two looks at counters that must stand still
# (bytes before the entry, bytes from it) compared with the original at the end: the padding and the key
BEFORE, AFTER = 16, 16

EXE_FIX = """\
#include <hotpatch.h>
long compute(long x);
long compute(long x) { return HOTPATCH_ORIGINAL(compute)(x) + 6; }
"""
LIBC_A = """\
#include <stddef.h>
#include <hotpatch.h>
extern long hp_malloc_calls;
void *malloc(size_t n);
size_t malloc_usable_size(void *p);
void *malloc(size_t n) {
    __atomic_fetch_add(&hp_malloc_calls, 1, __ATOMIC_RELAXED);
    return HOTPATCH_ORIGINAL(malloc)(n);
}
size_t malloc_usable_size(void *p) { return HOTPATCH_ORIGINAL(malloc_usable_size)(p) + (1UL << 40); }
"""
LIBC_R = """\
#include <stddef.h>
#include <hotpatch.h>
extern long hp_free_calls, hp_calloc_calls;
void free(void *p);
void *calloc(size_t n, size_t size);
void free(void *p) {
    if (p)
        __atomic_fetch_add(&hp_free_calls, 1, __ATOMIC_RELAXED);
    HOTPATCH_ORIGINAL(free)(p);
}
void *calloc(size_t n, size_t size) {
    __atomic_fetch_add(&hp_calloc_calls, 1, __ATOMIC_RELAXED);
    return HOTPATCH_ORIGINAL(calloc)(n, size);
}
"""
# patch name -> (source, protocol auto must pick, the functions it replaces, the hp_* counters it feeds)
PATCHES = {
    "exe_fix": (EXE_FIX, "A", ("compute",), ()),
    "libc_a": (LIBC_A, "A", ("malloc", "malloc_usable_size"), ("hp_malloc",)),
    "libc_r": (LIBC_R, "R", ("free", "calloc"), ("hp_free", "hp_calloc")),
}
CLASSES = {  # the site classes the protocols above follow from (scan of Debian 12's libc 2.36)
    "compute": "patchable-entry",
    "malloc": "opportunistic",
    "malloc_usable_size": "opportunistic",
    "calloc": "opportunistic",
    "free": "ordinary",
}


def read_stats(proc: subprocess.Popen[bytes]) -> dict[str, int]:
    """The target's counters (see targets/malloc_loops.c); fails with its message if it exited."""
    check_alive(proc)
    assert proc.stdin is not None
    proc.stdin.write(b"stats\n")
    proc.stdin.flush()
    m = STATS.match(wait_for_line(proc, lambda ln: ln.startswith("stats ")))
    assert m is not None
    return {k: int(v) for k, v in m.groupdict().items()}


def check_alive(proc: subprocess.Popen[bytes]) -> None:
    """Fail with the target's own message (a WRONG line) if it exited."""
    if proc.poll() is not None:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise AssertionError(f"target exited with status {proc.returncode}: {err.strip()[-500:]}")


def wait_growth(proc: subprocess.Popen[bytes], counters: list[str], timeout: float = 5.0) -> None:
    """Wait until every counter of ``counters`` grew (the replacements feeding them run)."""
    before = read_stats(proc)
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.005)
        now = read_stats(proc)
        still = [c for c in counters if now[c] == before[c]]
        if not still:
            return
        assert time.monotonic() < deadline, f"applied, but {still} stand still: {now}"


def libc_of(pid: int) -> tuple[str, int]:
    """The path of the libc the target maps, and the address of its mapping at file offset 0."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith("/libc.so.6") and int(fields[2], 16) == 0:
            return fields[5], int(fields[0].split("-")[0], 16)
    raise AssertionError(f"PID {pid} maps no libc.so.6")


def function_addresses(pid: int, exe: Path, libc: str, libc_start: int) -> dict[str, int]:
    """The run-time entry of every patched function: ``compute`` in the program, the others in libc."""
    out = {}
    img = open_elf(libc)
    try:
        bias = img.load_bias(0, libc_start)
        for name in CLASSES:
            if name != "compute":
                sym = img.dynamic_symbol(name)
                assert sym is not None, name
                out[name] = bias + sym.value
    finally:
        img.close()
    exe_start = next(
        int(ln.split("-")[0], 16)
        for ln in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if ln.endswith(str(exe)) and int(ln.split()[2], 16) == 0
    )
    img = open_elf(str(exe))
    try:
        out["compute"] = img.load_bias(0, exe_start) + img.function_symbols()["compute"].value
    finally:
        img.close()
    return out


def code_around(pid: int, addrs: dict[str, int]) -> dict[str, bytes]:
    """The target's bytes from BEFORE before each function's entry to AFTER after it."""
    with open(f"/proc/{pid}/mem", "rb") as mem:
        return {name: (mem.seek(a - BEFORE), mem.read(BEFORE + AFTER))[1] for name, a in addrs.items()}


def test_apply_revert_with_threads_in_malloc_and_free(tmp_path: Path, procs: Procs) -> None:
    """50 apply/revert cycles of three patches (the program's ready ``compute``; libc's ``malloc``,
    ``malloc_usable_size``; libc's ``free`` and ``calloc``) with protocol auto, while 4 threads malloc/free in
    tight loops and 2 call ``compute``: each succeeds at the first try with protocol A or R as auto picks
    (no B fallback), the target runs and is never left stopped, each patch is in force when applied and out of
    force when reverted, no wrong value or damaged block, and the original bytes are back at the end."""
    flags = run_cli("cflags").stdout.split()
    assert flags, "hotpatch cflags printed nothing"
    exe = compile_program(TARGETS / "malloc_loops.c", tmp_path / "malloc_loops", *flags, "-rdynamic")
    proc = procs.start(exe, stdin=subprocess.PIPE)
    wait_for_line(proc, lambda ln: ln.strip() == "ready")
    pid = proc.pid
    libc, libc_start = libc_of(pid)
    patches = {}
    for name, (source, _, _, _) in PATCHES.items():
        src = tmp_path / f"{name}.c"
        src.write_text(source)
        patches[name] = tmp_path / f"{name}.hp"
        res = run_cli("build", src, "--target", exe if name == "exe_fix" else libc, "-o", patches[name], "--name", name)
        assert res.returncode == 0, f"build of {name} for {libc}: {res.stderr}"
    addrs = function_addresses(pid, exe, libc, libc_start)
    original = code_around(pid, addrs)

    names = list(PATCHES)
    pauses: dict[str, list[float]] = {"A": [], "R": []}
    frozen_checks = 0
    t0 = time.monotonic()
    with hotpatch.attach(pid) as target:
        first = read_stats(proc)
        for cycle in range(CYCLES):
            order = names[cycle % 3 :] + names[: cycle % 3]
            try:
                for name in order:
                    rep = target.apply(str(patches[name]))
                    want = PATCHES[name][1]
                    assert rep.protocol == want, f"apply {name}: protocol {rep.protocol}, auto picks {want} first"
                    pauses[want].append(rep.pause_us)
                    check_alive(proc)
                    assert_running(pid)
                wait_growth(proc, [c for name in names for c in PATCHES[name][3]])  # every libc replacement runs
                if cycle == 0:
                    st = target.status()
                    sites = {s.symbol: s for p in st.patches for s in p.sites}
                    assert {k: s.klass for k, s in sites.items()} == CLASSES, st
                    want_site = {f: proto for _, proto, fns, _ in PATCHES.values() for f in fns}
                    assert {k: s.protocol for k, s in sites.items()} == want_site, st
                    assert {k: s.entry for k, s in sites.items()} == addrs, st
                    assert all(p.state == "applied" for p in st.patches), st
                retained = False
                for name in reversed(order):
                    reps = target.revert(name)
                    assert [r.protocol for r in reps] == ["A"], f"revert {name}: {[r.protocol for r in reps]}"
                    retained = retained or any(r.retained for r in reps)
                    check_alive(proc)
                    assert_running(pid)
                if not retained:  # no thread was left inside a replacement: none can run one any more
                    after = read_stats(proc)
                    time.sleep(WINDOW_S)
                    later = read_stats(proc)
                    for counter in ("hp_malloc", "hp_free", "hp_calloc"):
                        assert later[counter] == after[counter], f"{counter} still grows after the revert"
                    frozen_checks += 1
            except AssertionError as e:
                e.add_note(f"in cycle {cycle} (order {order})")
                raise
        elapsed = time.monotonic() - t0
        for _ in range(20):  # a padding or region a thread still stood on is given back by a later command
            st = target.status()
            if not st.retained and code_around(pid, addrs) == original:
                break
            target.revert()
            time.sleep(0.01)
        assert st.patches == (), st
        assert len(st.retained) <= MALLOC_THREADS + COMPUTE_THREADS, st.retained
    last = read_stats(proc)
    assert_running(pid)
    for name, code in code_around(pid, addrs).items():
        assert code == original[name], f"{name}: {original[name].hex()} became {code.hex()}"
    assert frozen_checks >= CYCLES // 5, f"only {frozen_checks} reverts kept no region mapped"
    assert last["steps"] > first["steps"] and last["compute_old"] > first["compute_old"], (first, last)
    assert last["usable_old"] > first["usable_old"] and last["usable_new"] > 0, last
    assert last["compute_new"] > 0 and last["hp_malloc"] > 0 and last["hp_free"] > 0 and last["hp_calloc"] > 0, last
    print(
        f"{CYCLES} cycles in {elapsed:.1f} s; pause_us max A {max(pauses['A']):.0f}, R {max(pauses['R']):.0f}; "
        f"{last['steps']} malloc-loop steps; {frozen_checks} frozen checks"
    )
    assert proc.stdin is not None
    proc.stdin.write(b"quit\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0, proc.stderr.read().decode() if proc.stderr else ""

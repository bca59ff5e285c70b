"""A child forked while a live commit runs: finish or undo its copy of the changes (DESIGN.md §4, §5).

``fork()`` copies the address space as it is at that instant (kernel/fork.c ``dup_mm``). A child forked while
the commit program of protocol A or R is between its first and last store inherits a half-made change — an
``EB FE`` self-loop at a key, with no program in the child to ever end it: the child's first call of the
function spins for ever — and the code pages the program made writable. So while such a commit runs, every
thread is seized with ``PTRACE_O_TRACEFORK``: each child starts attached to the tool, in a ptrace-stop, before
it runs any code of its own (ptrace(2), "automatically attached"), and is settled here before it is let go:

* a key holding ``EB FE`` whose other bytes are all new gets its new first word (the change is complete, as
  in the parent: the child's only thread is inside ``fork()``, not in the bytes); otherwise the other bytes
  get their old values and the key its old first word (as the program's abort does);
* the pages of the changes get back the protections they had, and the program's two pages, which no thread of
  the child runs, are unmapped (two injected system calls).

The child's copy of the patch record then matches its code (``hotpatch status`` on it reconciles a record whose
sites hold the old bytes, as for a commit cut short).

The tracer's exit detaches whatever it traces, children not settled yet included, so the commit does not end
before every fork that may have copied a half-made change has been reported (:func:`await_forks`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence, Set
from contextlib import suppress

from .errors import HotpatchError
from .inuse import views
from .process.live import LiveWorld
from .process.maps import Mapping as MapEntry
from .process.memory import Memory
from .process.remote import Injector
from .process.stackview import ThreadView
from .process.threads import World
from .x86 import selfloop

FORK_WAIT_S = 2.0  # how long a thread asleep inside fork() is waited for once the program has ended
CLONE_VM = 0x100  # include/uapi/linux/sched.h: the child shares the address space (a thread, vfork, spawn)
# fork, clone, clone3 per ABI (arch/x86/entry/syscalls/syscall_64.tbl, syscall_32.tbl); vfork shares memory
FORK_CALLS = {8: {57: "fork", 56: "clone", 435: "clone3"}, 4: {2: "fork", 120: "clone", 435: "clone3"}}


def settle_edit(mem: Memory, e: selfloop.Edit) -> str:
    """Make the change ``e`` whole or undo it in a stopped single-threaded child (``mem``); returns what was
    done: ``"old"``, ``"new"`` (nothing to do), ``"finished"`` or ``"undone"``. A key without ``EB FE`` holds
    its old or new first word, and the bytes behind it match it (they are written only while it spins)."""
    cur = mem.read(e.address, len(e.new))
    if cur == e.old or (e.word and cur != e.new):  # (a word is stored whole: old or new, never between)
        return "old"
    if cur == e.new:
        return "new"
    k = e.key - e.address
    if cur[k : k + 2] != selfloop.SELF_LOOP:
        return "new" if cur[k : k + 2] == e.new[k : k + 2] else "old"
    if cur[:k] + cur[k + 2 :] == e.new[:k] + e.new[k + 2 :]:
        mem.write(e.key, e.new[k : k + 2])
        return "finished"
    mem.write(e.address, e.old[:k])
    mem.write(e.key + 2, e.old[k + 2 :])
    mem.write(e.key, e.old[k : k + 2])
    return "undone"


def settle_child(
    child: int, edits: Sequence[selfloop.Edit], prot: Mapping[int, int], stub_area: int, program: int
) -> list[str]:
    """Settle the child ``child`` (attached, in or about to enter its first ptrace-stop) as the module says and
    detach it; ``prot``: page -> the protection the pages of ``edits`` had (PROT_* bits); ``program``: the
    address of the commit program's two pages (0 when none was mapped yet), unmapped in the child when they are
    there (its data page holds ``selfloop.MAGIC``). Returns :func:`settle_edit`'s outcome per edit. Best
    effort, never raises: a child that exits meanwhile needs nothing (the tracer's exit detaches whatever is
    left)."""
    world = World(child)
    done: list[str] = []
    with suppress(HotpatchError, OSError):
        try:
            world.seize()  # the auto-attached child is already ours: adopted, not seized again
            world.stop()
            with Memory(child) as mem:
                done = [settle_edit(mem, e) for e in edits]
                inject = Injector(world, mem, stub_area)
                try:
                    for page, p in sorted(prot.items()):
                        inject(inject.sys.mprotect, page, selfloop.PAGE, p)
                    data = program + selfloop.PAGE + selfloop.D_MAGIC
                    if program and mem.try_read(data, len(selfloop.MAGIC)) == selfloop.MAGIC:
                        inject(inject.sys.munmap, program, 2 * selfloop.PAGE)
                finally:
                    inject.close()
        finally:
            world.release()
    return done


def in_fork(view: ThreadView, mem: Memory) -> bool:
    """True when the thread of ``view`` was seen asleep inside a system call that copies the address space:
    fork, or clone/clone3 without CLONE_VM (clone's flags are its first argument; clone3's the first word of
    the ``struct clone_args`` it points to, read from ``mem``)."""
    if not view.syscall or view.syscall[0] == "-1":
        return False
    name = FORK_CALLS[view.word].get(int(view.syscall[0]))
    if name is None:
        return False
    if name == "fork":
        return True
    arg = int(view.syscall[1], 16)
    flags = arg if name == "clone" else int.from_bytes(mem.try_read(arg, 8) or b"\0" * 8, "little")
    return not flags & CLONE_VM


def await_forks(
    world: LiveWorld, mem: Memory, maps: list[MapEntry], word: int, out_of_fork: Set[int] = frozenset()
) -> None:
    """Once the program's last store is made: look at every thread (:func:`hotpatch.inuse.views`, no stop
    where perf samples or /proc allow) until each is seen outside fork(), serving events meanwhile. A thread
    seen running user code has had its fork event served (it is raised before fork returns) and its child
    settled; so has a thread asleep elsewhere. ``out_of_fork``: threads already seen so since the last store
    (by the watch of memory to free). Gives up on a thread still inside fork() after FORK_WAIT_S."""
    pending = set(world.threads) - out_of_fork
    deadline = time.monotonic() + FORK_WAIT_S
    while pending and time.monotonic() < deadline:
        world.pump()  # a thread in its fork event stop looks asleep inside fork(): serve it
        for tid, view in views(world, mem, maps, sorted(pending), word, stack=False).items():
            if view is None or not in_fork(view, mem):
                pending.discard(tid)
        if pending:
            time.sleep(0.001)
    world.pump()

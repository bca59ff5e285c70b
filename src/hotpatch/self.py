"""In-process patching: ``hotpatch.self`` patches native code loaded in the calling Python process.

The libraries a Python program loads (ctypes, cffi, C extensions) are patched with the same patch files, the
same planning (:mod:`hotpatch.planner`), loader and trampolines as another process, but written from inside,
with the in-process rules of DESIGN.md §4 and research §1.5/§2.3:

* the pages of the changes are made writable with one ``mprotect`` each, and put back afterwards;
* bytes that no thread executes (the padding before a short-jump site) are written first, then
  ``membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`` (registered once per process);
* each live instruction is replaced by **one** aligned store: a 2-byte ``c_uint16`` inside one cache line for a
  short jump, or a ``c_uint64`` of the aligned 8-byte chunk holding the 5-byte jump (0 torn executions in 10⁶
  flips, research §1.5), then ``membarrier`` again; a vtable slot is one aligned word store. Never a ``memmove``
  on live code.

No thread of the process can be looked at from inside (that needs a tracer), so a change that a thread could
be *inside* of — several instructions overwritten by one jump, an ordinary site of protocol R or B — is
refused with a clear message: build the library with ``hotpatch cflags`` (short-jump sites), or patch it from
another process. Memory a reverted patch used is kept mapped (a thread may still run in it).

Use::

    import hotpatch.self
    me = hotpatch.self.attach()
    me.apply("fix.hp")            # a Report, as hotpatch.api.Target.apply's
    me.revert("fix")
    me.status()

or, for raw changes, :class:`Transaction` with :meth:`~Transaction.add` and :meth:`~Transaction.commit`, as
:class:`hotpatch.transaction.Transaction`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from . import api
from .errors import HotpatchError, PatchFileError, SiteError, StateError, TargetError, UpToDateError
from .ifunc import implementation as ifunc_implementation
from .loader import Layout, load
from .modules import ModuleSet
from .patch.bundle import PatchFile
from .patch.manifest import Function
from .planner import place, plan_sites, plan_slots
from .process.maps import PAGE, gap_candidates, page_down, read_maps
from .process.memory import Memory
from .registry.client import check_signature
from .state import Record
from .transaction import ChangeSet, CommitReport, SiteChange, check_bytes
from .x86.selfloop import MEMBARRIER_REGISTER_SYNC_CORE, MEMBARRIER_SYNC_CORE, key_fits
from .x86.trampoline import MAX_TRAMPOLINE

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
NR_MEMBARRIER = 324  # arch/x86/entry/syscalls/syscall_64.tbl
WORD = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_lock = threading.Lock()
_record = Record()  # this process's record: the patches applied through hotpatch.self
_registered = False


def _errno_error(what: str) -> TargetError:
    e = ctypes.get_errno()
    return TargetError(f"{what} failed in this process: {os.strerror(e)}")


def sync() -> None:
    """``membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`` (include/uapi/linux/membarrier.h): every CPU
    running a thread of this process serialises its instruction stream. Registered on first use."""
    global _registered
    if not _registered:
        if _libc.syscall(NR_MEMBARRIER, MEMBARRIER_REGISTER_SYNC_CORE, 0, 0) != 0:
            raise _errno_error("membarrier registration")
        _registered = True
    if _libc.syscall(NR_MEMBARRIER, MEMBARRIER_SYNC_CORE, 0, 0) != 0:
        raise _errno_error("membarrier")


def _protect(pages: dict[int, int], writable: bool) -> None:
    """Make each page of ``pages`` (page -> its PROT_* bits) writable, or give it its bits back."""
    for page, prot in pages.items():
        if prot & PROT_WRITE:
            continue
        if _libc.mprotect(page, PAGE, prot | PROT_WRITE if writable else prot) != 0:
            raise _errno_error("mprotect")


def _page_prots(addresses: Sequence[tuple[int, int]]) -> dict[int, int]:
    """The PROT_* bits of every page the ``(address, size)`` ranges touch, from /proc/self/maps."""
    maps = read_maps(os.getpid())
    out = {}
    for addr, size in addresses:
        for page in range(page_down(addr), addr + size, PAGE):
            m = next((m for m in maps if m.start <= page < m.end), None)
            if m is None:
                raise TargetError(f"no mapping of this process holds {page:#x}")
            out[page] = sum(bit for ch, bit in zip(m.perms[:3], (1, 2, 4), strict=True) if ch != "-")
    return out


class _Store:
    """How one change is written in-process: ``dead`` bytes nobody executes (address, byte), then at most one
    ``live`` aligned store (address, 2, 4 or 8 bytes) covering every byte of the live instruction that
    changes: a 2-byte store inside a cache line, else the aligned 8-byte chunk holding them, or the word of a
    data change (Intel SDM Vol. 3A §9.1.1; research §1.5). Raises SiteError when there is no such store, or
    when a thread could be inside the overwritten instructions."""

    def __init__(self, c: SiteChange) -> None:
        if any(c.key < a < c.key + c.span for a in c.rip_map):  # an instruction boundary inside the jump
            raise SiteError(
                f"{c.label}: the jump overwrites several instructions, and from inside the process no thread can be "
                "seen outside them; patch it from another process (hotpatch apply --pid), or build the library "
                "with `hotpatch cflags`"
            )
        before = c.key - c.address
        self.dead = [(c.address + i, c.new[i]) for i in range(before) if c.new[i] != c.expected[i]]
        changed = [c.address + i for i in range(before, len(c.new)) if c.new[i] != c.expected[i]]
        self.live: tuple[int, bytes] | None = None
        if c.word:
            if c.address % len(c.new) or len(c.new) not in (4, WORD):
                raise SiteError(f"{c.label}: {c.address:#x} is not an aligned word")
            self.live = (c.address, c.new)
            return
        if not changed:
            return
        lo, hi = changed[0], changed[-1] + 1
        if hi - lo <= 2 and key_fits(lo):
            start, size = lo, 2
        elif lo // WORD == (hi - 1) // WORD:
            start, size = lo & ~(WORD - 1), WORD
        else:
            raise SiteError(
                f"{c.label}: the bytes {lo:#x}..{hi:#x} cross an aligned 8-byte chunk: no single store can write "
                "them; patch it from another process (hotpatch apply --pid)"
            )
        window = bytearray(ctypes.string_at(start, size))
        for a in range(start, start + size):
            if c.address <= a < c.address + len(c.new):
                window[a - start] = c.new[a - c.address]
        self.live = (start, bytes(window))

    def store_live(self) -> None:
        """The one store of the live bytes (c_uint16, c_uint32 or c_uint64: one ``mov``)."""
        if self.live is None:
            return
        addr, data = self.live
        kind = {2: ctypes.c_uint16, 4: ctypes.c_uint32, WORD: ctypes.c_uint64}[len(data)]
        kind.from_address(addr).value = int.from_bytes(data, "little")


class Transaction(ChangeSet):
    """A set of site changes in this process, applied all-or-nothing by :meth:`commit` with the in-process
    rules (module docstring). ``add`` and ``commit`` as :class:`hotpatch.transaction.Transaction`'s."""

    def commit(self) -> CommitReport:
        """Write every change. Raises MismatchError when the bytes differ from the expected ones, SiteError
        when a change cannot be made with one store, TargetError when mprotect or membarrier fails (in every
        case before the first live store)."""
        started = time.perf_counter()
        with Memory(os.getpid()) as mem:
            check_bytes(mem, self.changes)
        stores = [_Store(c) for c in self.changes]
        pages = _page_prots([(c.address, len(c.new)) for c in self.changes])
        _protect(pages, writable=True)
        try:
            for s in stores:
                for addr, byte in s.dead:
                    ctypes.c_uint8.from_address(addr).value = byte
            sync()
            for s in stores:
                s.store_live()
            sync()
        finally:
            _protect(pages, writable=False)
        report = CommitReport("in-process")
        report.window_us = (time.perf_counter() - started) * 1e6
        return report


def _map_near(candidates: list[int], size: int) -> int:
    """mmap ``size`` bytes read+write at the first free candidate (MAP_FIXED_NOREPLACE); returns it."""
    for addr in candidates[:16]:
        got = _libc.mmap(addr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        if got == addr:
            return addr
        if got not in (None, ctypes.c_void_p(-1).value) and got is not None:
            _libc.munmap(ctypes.c_void_p(got), size)  # an older kernel ignored the flag: not where we asked
        elif ctypes.get_errno() != errno.EEXIST:
            raise _errno_error("mmap")
    raise TargetError("no free address range within ±2 GiB of the sites in this process")


class SelfTarget:
    """This process, opened for patching its native code (:func:`attach`): :meth:`apply`, :meth:`revert` and
    :meth:`status` behave as :class:`hotpatch.api.Target`'s, with the in-process rules."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        if ctypes.sizeof(ctypes.c_void_p) != 8:
            raise TargetError("hotpatch.self needs a 64-bit Python")

    def status(self) -> api.Status:
        """The patches applied through hotpatch.self, each with its state decided by the bytes at its sites."""
        from . import state as statemod

        with _lock, Memory(self.pid) as mem:
            patches = tuple(
                api.PatchStatus(
                    p.name,
                    p.version,
                    p.module,
                    p.applied_at,
                    statemod.site_status(mem, p),
                    tuple(api._site_status(s) for s in p.sites),
                )
                for p in _record.patches
            )
        return api.Status(self.pid, patches, tuple((r[0], r[1]) for r in _record.retired if len(r) == 2))

    def apply(self, patch: PatchFile | str) -> api.Report:
        """Apply a patch file (x86-64) to this process. Raises UpToDateError, MismatchError, SiteError (a change
        that cannot be made with one store), SymbolError, PatchFileError, TargetError; nothing changed then."""
        global _record
        pf = patch if isinstance(patch, PatchFile) else PatchFile(patch)
        check_signature(pf)
        man = pf.manifest
        if pf.bitness != 64:
            raise PatchFileError(f"{pf.where} is a patch for {man.arch}; this process is x86-64")
        with _lock, Memory(self.pid) as mem:
            old = _record.find(man.name)
            if old is not None and old.version >= man.version:
                raise UpToDateError(
                    f"patch {man.name} version {old.version} is already applied to this process; version "
                    f"{man.version} is already up to date"
                )
            maps = read_maps(self.pid)
            modules = ModuleSet(self.pid, maps)
            try:
                module = modules.find(man.build_id, man.file)

                def read_word(addr: int) -> int:
                    return int.from_bytes(mem.read(addr, WORD), "little")

                def resolve_ifunc(f: Function) -> tuple[Function, str]:
                    return ifunc_implementation(modules, module, f, read_word)

                plans = plan_sites(mem, module, man.functions, _record, man.name, 64, resolve_ifunc)
                slots = plan_slots(mem, module, man.functions, _record, man.name)
                layout = Layout.of(pf, MAX_TRAMPOLINE * len(plans))
                near = [p.prologue.site for p in plans] + [module.start, module.end]
                region = _map_near(gap_candidates(maps, near, layout.size), layout.size)
                try:
                    base = region - layout.min_vaddr
                    placed = place(plans, {s.name: base + s.value for s in pf.symbols.values()}, region + layout.span)
                    img = load(
                        pf,
                        layout,
                        region,
                        lambda n: modules.resolve(n, module, read_word),
                        {s.plan.function.symbol: s.trampoline.address for s in placed},
                    )
                    tramps = b"".join(s.trampoline.code.ljust(MAX_TRAMPOLINE, b"\xcc") for s in placed)
                    ctypes.memmove(region, img.image + tramps, len(img.image) + len(tramps))  # not live yet
                    if _libc.mprotect(region, layout.size, PROT_READ | PROT_EXEC) != 0:
                        raise _errno_error("mprotect")
                    for addr, size, prot in img.protections:
                        if prot != PROT_READ | PROT_EXEC and _libc.mprotect(addr, size, prot) != 0:
                            raise _errno_error("mprotect")
                    rec = api.build_record(man, module.path, region, layout.size, placed, slots)
                    txn = Transaction()
                    for c in api.redirect_changes(placed, slots, rec, old):
                        txn.add(c)
                    commit = txn.commit()
                except BaseException:
                    _libc.munmap(ctypes.c_void_p(region), layout.size)
                    raise
            finally:
                modules.close()
            kept = list(_record.retired) + (list(old.regions) if old is not None else [])
            _record = Record([p for p in _record.patches if p is not old] + [rec], kept)
        rep = api.report_of(rec, commit)
        rep.replaced_version = old.version if old is not None else None
        return rep

    def revert(self, name: str | None = None) -> list[api.Report]:
        """Revert patch ``name`` (every patch when None). Its memory stays mapped (a thread may still run in
        it: no thread can be seen from inside). Raises StateError when no such patch is applied."""
        global _record
        with _lock:
            if name is not None and _record.find(name) is None:
                raise StateError(f"no patch named {name} is applied to this process")
            victims = [p for p in _record.patches if name is None or p.name == name]
            txn = Transaction()
            for p in victims:
                for s in p.sites:
                    txn.add(api._restore(s))
            commit = txn.commit() if victims else CommitReport("in-process")
            retired: list[list[Any]] = list(_record.retired) + [list(r) for p in victims for r in p.regions]
            retired += [api._padding_entry(s) for p in victims for s in p.sites if s.key]
            _record = Record([p for p in _record.patches if p not in victims], retired)
        return [api.report_of(p, commit) for p in victims]


def attach() -> SelfTarget:
    """This process, for patching its own native code (see the module docstring)."""
    return SelfTarget()


def _forget_all() -> None:
    """Test helper: drop the record (after the libraries it described were unloaded)."""
    global _record
    with _lock:
        _record = Record()


__all__ = ["HotpatchError", "SelfTarget", "Transaction", "attach", "sync"]

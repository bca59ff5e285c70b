"""The Python API: ``hotpatch.attach(pid)`` returns a :class:`Target` with ``apply``, ``revert``, ``status``.

Apply, in three steps (DESIGN.md §3–§5):

1. *Plan*, with the target running: find the module by build-id, check every function's bytes, analyse
   prologues, choose a free range within ±2 GiB of the sites, resolve symbols, relocate the patch and build
   trampolines — all in the tool's memory.
2. *Load*, with one thread stopped for a few injected raw syscalls: ``mmap`` the range
   (``MAP_FIXED_NOREPLACE``), write the image through ``/proc/PID/mem``, ``mprotect`` it; then record the
   patch in the target's state (:mod:`.state`) with the target running.
3. *Commit* the redirects with a :class:`~hotpatch.transaction.Transaction` (protocol B).

If step 3 fails, the record and the mapping are removed again. Revert is the same transaction with the
original bytes; the patch's memory is unmapped only when no thread's RIP or stack points into it.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, NamedTuple

from . import state as statemod
from .consistency import StackBusy, Watched, wait_clear
from .consistency import timeout as consistency_timeout
from .elf.cxxnames import pretty
from .errors import HotpatchError, PatchFileError, SiteError, StateError, TargetError, UpToDateError
from .gotplan import GotPlan, plan_got
from .ifunc import implementation as ifunc_implementation
from .livecommit import LiveCommit, RollingTimeout, settle_programs, wait_settled
from .loader import Layout, load
from .lock import target_lock
from .modules import ModuleSet
from .patch.bundle import PatchFile
from .patch.manifest import Function, Manifest
from .planner import PlacedSite, SitePlan, SlotPlan, place, plan_sites, plan_slots
from .process import remote
from .process.maps import Mapping, gap_candidates, read_maps
from .process.memory import Memory
from .process.remote import Injector, SyscallError
from .registry.client import check_signature
from .state import PatchRecord, Record, SiteRecord
from .transaction import CommitReport, SiteChange, Transaction
from .x86.selfloop import SELF_LOOP
from .x86.sites import DATA_CLASSES, GOT_SLOT, PAD_LEN, VTABLE_SLOT
from .x86.trampoline import MAX_TRAMPOLINE

LOCK_TIMEOUT_S = 10.0
PROTOCOLS = {"auto": "auto", "no-stop": "A", "rolling": "R", "stop-the-world": "B"}
"""``--protocol`` names (DESIGN.md §4): auto picks per transaction — A when every site is a short-jump site
(or the change replaces one instruction), else R, falling back to B when R cannot see every thread leave."""


class SiteStatus(NamedTuple):
    """A site as ``status`` reports it: symbol, entry and site addresses, class, protocol, for an IFUNC the
    implementation redirected, for a GOT slot the importing module."""

    symbol: str
    entry: int
    site: int
    klass: str
    protocol: str
    implementation: str = ""
    importer: str = ""


class PatchStatus(NamedTuple):
    """An applied patch read from the target: ``state`` is ``applied``, ``partial`` or ``reverted``
    (decided by the bytes at its sites, :func:`hotpatch.state.site_status`)."""

    name: str
    version: int
    module: str
    applied_at: str
    state: str
    sites: tuple[SiteStatus, ...]
    origin: str = ""


class Status(NamedTuple):
    """Everything ``status`` knows: the patches and the regions kept mapped after revert (addr, bytes)."""

    pid: int
    patches: tuple[PatchStatus, ...]
    retained: tuple[tuple[int, int], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``status --json``)."""
        patches = [{**p._asdict(), "sites": [s._asdict() for s in p.sites]} for p in self.patches]
        return {"pid": self.pid, "patches": patches, "retained": [list(r) for r in self.retained]}


class ApplyOptions(NamedTuple):
    """How :meth:`Target.apply` works, in its parameters' order: ``protocol`` (a key of PROTOCOLS),
    ``consistency`` (none or stack), ``timeout_s`` (seconds), ``via`` (code or got), ``importers`` and
    ``origin`` (the repository a patch comes from, recorded in the target)."""

    protocol: str = "auto"
    consistency: str = "none"
    timeout_s: float = 30.0
    via: str = "code"
    importers: tuple[str, ...] = ()
    origin: str = ""


class Report:
    """What an apply or revert did: patch ``name`` and ``version``, ``sites`` (symbol, address) and vtable
    ``slots`` (symbol, address of the word; :mod:`hotpatch.elf.vtables`), the ``implementations`` redirected for
    IFUNC symbols (symbol -> implementation name, :mod:`hotpatch.ifunc`), the ``got`` slots redirected
    (symbol, slot address, importing module; :mod:`hotpatch.gotplan`), ``pause_us`` (the
    longest window in µs in which any target thread was stopped, over the commit and every injection), ``threads``
    stopped by the commit, threads ``moved`` out of overwritten bytes, regions ``retained`` (kept mapped: addr, bytes),
    for an upgrade the ``replaced_version``, the ``protocol`` the commit used (A, R or B; DESIGN.md §4), and
    ``check_stop_us``: the longest stop of a thread other than the one borrowed for injected system calls and the commit
    program (A, R: protocol R's check and the watch of memory to free, a thread stopped alone where no perf sample could
    be had; B: the world's stop), µs, ``check_stops``, how many stops those were, and ``check_samples``, how many
    threads were looked at through a perf sample instead, with no stop (:class:`hotpatch.transaction.CommitReport`)."""

    def __init__(
        self, name: str, version: int, sites: list[tuple[str, int]], pause_us: float, threads: int, moved: int
    ) -> None:
        self.name, self.version, self.sites = name, version, sites
        self.pause_us, self.threads, self.moved = pause_us, threads, moved
        self.retained: list[tuple[int, int]] = []
        self.replaced_version: int | None = None
        self.protocol = "B"
        self.check_stop_us = pause_us
        self.check_stops = threads
        self.check_samples = 0
        self.slots: list[tuple[str, int]] = []
        self.implementations: dict[str, str] = {}
        self.got: list[tuple[str, int, str]] = []


EM_386, EM_X86_64 = 3, 62  # ELF e_machine (System V gABI)


def _check_target(pid: int) -> int:
    """The bitness (64, or 32 for i386) of process ``pid``, from its executable's ELF header; raises
    TargetError when it is gone, is us, may not be traced, or is not x86."""
    if pid <= 0 or not os.path.isdir(f"/proc/{pid}"):
        raise TargetError(f"no process with PID {pid}")
    if pid == os.getpid():
        raise TargetError("hotpatch cannot patch its own process through ptrace")
    try:
        with open(f"/proc/{pid}/exe", "rb") as f:
            head = f.read(20)
    except PermissionError:
        raise TargetError(f"not permitted to trace PID {pid}") from None
    except OSError:
        raise TargetError(f"PID {pid} has no executable (a kernel thread or a zombie)") from None
    machine = int.from_bytes(head[18:20], "little")
    if head[:4] != b"\x7fELF" or (head[4], machine) not in ((2, EM_X86_64), (1, EM_386)):
        raise TargetError(f"PID {pid} is neither an x86-64 nor an i386 process")
    return 64 if machine == EM_X86_64 else 32


class Target:
    """A running process opened for patching. Use :func:`attach`; close with :meth:`close` or ``with``.

    ``bitness``: 64 for an x86-64 process, 32 for an i386 one (``gcc -m32``), patched the same way from this
    64-bit tool with 32-bit code and patches built for it. Raises TargetError when the process does not exist,
    is not x86, or may not be traced.
    """

    def __init__(self, pid: int) -> None:
        self.bitness = _check_target(pid)
        self.pid = pid
        self.mem = Memory(pid)
        self._stub_area: int | None = None
        self._stops_us: list[float] = []  # stop windows of the running operation (injections), in µs

    def close(self) -> None:
        """Release the handle on the target's memory."""
        self.mem.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with target_lock(self.pid, LOCK_TIMEOUT_S):
            self._stops_us = []
            yield

    def _maps(self) -> list[Mapping]:
        return read_maps(self.pid)

    @contextmanager
    def _injector(self, maps: list[Mapping] | None = None) -> Iterator[Injector]:
        """One thread stopped for injected syscalls (:func:`hotpatch.process.remote.injection`); its stop
        window is counted in the operation's ``pause_us``."""
        if self._stub_area is None:
            self._stub_area = remote.find_stub_area(self.pid, maps or self._maps(), self.mem)
        with remote.injection(self.pid, self.mem, self._stub_area, self._stops_us) as inject:
            yield inject

    def _record(self, maps: list[Mapping]) -> tuple[int | None, Record]:
        """The state mapping's address and record, once no commit program of a killed tool still runs."""
        settle_programs(self.pid, self.mem, maps)
        addr = statemod.find_region(maps)
        record = statemod.read(self.mem, addr)
        keys = [r[0] for r in record.retired if len(r) > 2 and not r[2].startswith(SELF_LOOP.hex())]
        for p in record.patches:
            for s in p.sites:
                if s.klass in DATA_CLASSES:
                    continue  # data, no key
                off = s.key_at - s.site
                if SELF_LOOP not in (bytes.fromhex(s.original)[off : off + 2], bytes.fromhex(s.new)[off : off + 2]):
                    keys.append(s.key_at)  # (a function that is itself `jmp $` is not a running commit)
        wait_settled(self.mem, keys)
        return addr, record

    # -- status -------------------------------------------------------------------------------------
    def status(self) -> Status:
        """The patches recorded in the target, each with its state decided by the bytes at its sites."""
        _, record = self._record(self._maps())
        out = []
        for p in record.patches:
            out.append(
                PatchStatus(
                    p.name,
                    p.version,
                    p.module,
                    p.applied_at,
                    statemod.site_status(self.mem, p),
                    tuple(_site_status(s) for s in p.sites),
                    p.origin,
                )
            )
        return Status(self.pid, tuple(out), tuple((r[0], r[1]) for r in record.retired if len(r) == 2))

    # -- apply --------------------------------------------------------------------------------------
    def apply(
        self,
        patch: PatchFile | str,
        protocol: str = "auto",
        consistency: str = "none",
        timeout_s: float = 30.0,
        via: str = "code",
        importers: tuple[str, ...] = (),
        origin: str = "",
    ) -> Report:
        """Apply a patch (a :class:`PatchFile` or its path); a newer version replaces an older one of the
        same name in one transaction. ``protocol``: a key of PROTOCOLS. ``consistency``: ``none``, or
        ``stack``: wait up to ``timeout_s`` seconds until no thread has a replaced function (or, when
        upgrading, the older version's code) on its stack, and switch then, with protocol B
        (:mod:`hotpatch.consistency`); ConsistencyTimeout when it never happens (nothing written). ``via``:
        ``code`` (redirect each function's entry), or ``got``: redirect the GOT slots of the modules importing
        them (those named in ``importers``, file names, when given) and change no code (:mod:`hotpatch.gotplan`).
        ``origin``: recorded with the patch (the repository it came from, :mod:`hotpatch.registry.agent`).

        Raises UpToDateError when the same or a newer version is applied; MismatchError for another build or
        changed bytes; SiteError, SymbolError, PatchFileError, TargetError as their names say. The target is
        unchanged whenever an error is raised.
        """
        if via not in ("code", "got"):
            raise HotpatchError(f"unknown redirection {via!r} (code or got)")
        if consistency not in ("none", "stack"):
            raise HotpatchError(f"unknown consistency model {consistency!r} (none or stack)")
        if consistency == "stack" and protocol not in ("auto", "stop-the-world"):
            raise HotpatchError("--consistency stack switches with every thread stopped: use --protocol auto")
        deadline = time.monotonic() + timeout_s
        pf = patch if isinstance(patch, PatchFile) else PatchFile(patch)
        check_signature(pf)
        man = pf.manifest
        if pf.bitness != self.bitness:
            raise PatchFileError(
                f"{pf.where} is a patch for {man.arch} ({pf.bitness}-bit) processes; PID {self.pid} is a "
                f"{self.bitness}-bit process"
            )
        with self._locked():
            maps = self._maps()
            state_addr, record = self._record(maps)
            record = self._reconcile(record, state_addr)
            old = record.find(man.name)
            if old is not None and old.version >= man.version:
                raise UpToDateError(
                    f"patch {man.name} version {old.version} is already applied to PID {self.pid}; "
                    f"version {man.version} is already up to date"
                )
            modules = ModuleSet(self.pid, maps)

            def read_word(addr: int) -> int:
                return int.from_bytes(self.mem.read(addr, self.bitness // 8), "little")

            try:
                module = modules.find(man.build_id, man.file)

                def resolve_ifunc(f: Function) -> tuple[Function, str]:
                    return ifunc_implementation(modules, module, f, read_word)

                _same_way(old, via)
                if via == "got":
                    plans, slots = [], []
                    got = plan_got(self.mem, modules, module, man.functions, record, man.name, self.bitness, importers)
                    code = [(g.definition, g.function.size, g.function.symbol) for g in got]
                else:
                    got = []
                    plans = plan_sites(self.mem, module, man.functions, record, man.name, self.bitness, resolve_ifunc)
                    slots = plan_slots(self.mem, module, man.functions, record, man.name, self.bitness)
                    code = [(p.prologue.entry, p.function.size, p.function.symbol) for p in plans]
                clear = _watched(code, old) if consistency == "stack" else []
                if clear:  # before anything is mapped: a timeout here leaves the target as it was
                    wait_clear(self.pid, self.mem, clear, deadline, self.bitness // 8)
                layout = Layout.of(pf, MAX_TRAMPOLINE * len(plans))
                sites = [p.prologue.site for p in plans]
                top = remote.ARCHES[self.bitness].user_top
                candidates = gap_candidates(maps, [*sites, module.start, module.end], layout.size, top=top)
                if not candidates:
                    raise TargetError(f"no free address range within ±2 GiB of {module.path} in PID {self.pid}")

                resolved: dict[str, int] = {}

                def resolve(name: str) -> int:
                    if name not in resolved:
                        resolved[name] = modules.resolve(name, module, read_word)
                    return resolved[name]

                definitions = {g.function.symbol: g.definition for g in got} if got else None
                region, placed, state_addr = self._load(
                    pf, layout, candidates, plans, resolve, maps, state_addr, definitions
                )
            finally:
                modules.close()
            assert state_addr is not None
            rec = build_record(man, module.path, region, layout.size, placed, slots, self.bitness)
            rec = rec._replace(origin=origin)
            base = region - layout.min_vaddr
            got_records = [_got_record(g, base + pf.symbols[g.function.symbol].value, self.bitness) for g in got]
            rec = rec._replace(sites=rec.sites + got_records)
            statemod.write(self.mem, state_addr, Record([*record.patches, rec], record.retired))
            changes = redirect_changes(placed, slots, rec, old)
            changes += [_got_change(g, r) for g, r in zip(got, got_records, strict=True)]
            pads = {s.plan.pad for s in placed}
            record = Record(record.patches, [r for r in record.retired if not (len(r) > 2 and r[0] in pads)])
            try:
                commit = self._commit(changes, record.retired, protocol, clear, deadline)
            except BaseException:
                self._undo_load(state_addr, record, region, layout.size)
                raise
            rec = rec._replace(sites=[s._replace(protocol=commit.protocol) for s in rec.sites])
            kept = self._free_unused(record.retired, commit.busy)
            if old is not None:
                kept.extend(old.regions)  # a thread may still run in the old version
            statemod.write(self.mem, state_addr, Record([p for p in record.patches if p is not old] + [rec], kept))
        report = self._report(rec, commit)
        report.replaced_version = old.version if old is not None else None
        return report

    def _load(
        self,
        pf: PatchFile,
        layout: Layout,
        candidates: list[int],
        plans: list[SitePlan],
        resolve: Callable[[str], int],
        maps: list[Mapping],
        state_addr: int | None,
        definitions: dict[str, int] | None = None,
    ) -> tuple[int, list[PlacedSite], int]:
        """Map the patch at the first free candidate address, write it, protect it; create the state
        mapping if needed. Returns (region, placed sites, state address).

        The image is relocated before any thread stops. One short stop of one thread maps the region
        read+execute and makes the data pages writable (patches are linked ``-z noseparate-code -z norelro``,
        so that is two syscalls); the bytes are then written with the target running, through
        ``/proc/PID/mem``, which needs no write permission. The first apply to a target creates the state
        mapping in a stop of its own, once every symbol has resolved. ``definitions``: where HOTPATCH_ORIGINAL
        leads when there are no trampolines (``--via got``: the functions themselves).
        """
        rx = remote.PROT_READ | remote.PROT_EXEC
        for region in candidates[:16]:
            tramp_area = region + layout.span
            replacements = {s.name: region - layout.min_vaddr + s.value for s in pf.symbols.values()}
            placed = place(plans, replacements, tramp_area)
            originals = {s.plan.function.symbol: s.trampoline.address for s in placed}
            img = load(pf, layout, region, resolve, originals if definitions is None else definitions)
            if state_addr is None:  # once per target, in a stop of its own, after load() resolved every symbol
                with self._injector(maps) as inject:
                    state_addr = statemod.create(inject, self.mem)
            with self._injector(maps) as inject:
                try:
                    remote.mmap_fixed(inject, region, layout.size, rx)
                except SyscallError as e:
                    if e.errno == errno.EEXIST:  # the target mapped it meanwhile: try the next gap
                        continue
                    raise TargetError(f"mmap in PID {self.pid} failed: {e.strerror}") from None
                try:
                    for addr, size, prot in img.protections:
                        if prot != rx:
                            inject(inject.sys.mprotect, addr, size, prot)
                except BaseException as e:
                    inject(inject.sys.munmap, region, layout.size)
                    if isinstance(e, SyscallError):  # e.g. a seccomp filter forbidding mprotect
                        raise TargetError(
                            f"cannot make the patch's data pages writable in PID {self.pid}: {e.strerror}"
                        ) from None
                    raise
            try:  # /proc/PID/mem writes need no write permission (FOLL_FORCE): the target runs meanwhile
                tramps = b"".join(s.trampoline.code.ljust(MAX_TRAMPOLINE, b"\xcc") for s in placed)
                self.mem.write(region, img.image + tramps)
            except BaseException:
                self._unmap([(region, layout.size)])
                raise
            return region, placed, state_addr
        raise TargetError(f"no free address range within ±2 GiB of the sites in PID {self.pid}")

    def _free_unused(self, retired: list[list[Any]], busy: set[tuple[int, int]]) -> list[list[Any]]:
        """Free the ``retired`` entries not in ``busy`` — unmap a region, give a padding its original bytes
        back (:class:`hotpatch.state.Record`) —; return the busy ones, to be kept in the record.

        A padding kept because a thread stands on its ``E9`` keeps the region that jump leads to as well."""
        busy = set(busy)
        for r in retired:
            if len(r) > 2 and (r[0], r[1]) in busy:
                with suppress(HotpatchError):
                    jump = self.mem.read(r[0], PAD_LEN)
                    if jump[0] == 0xE9:
                        dest = (r[0] + PAD_LEN + int.from_bytes(jump[1:], "little", signed=True)) % (1 << self.bitness)
                        busy |= {(a[0], a[1]) for a in retired if len(a) == 2 and a[0] <= dest < a[0] + a[1]}
        free = [r for r in retired if (r[0], r[1]) not in busy]
        for r in free:
            if len(r) > 2:
                with suppress(HotpatchError):
                    self.mem.write(r[0], bytes.fromhex(r[2]))
        self._unmap([(r[0], r[1]) for r in free if len(r) == 2])
        return [r for r in retired if (r[0], r[1]) in busy]

    def _stub(self) -> int:
        if self._stub_area is None:
            self._stub_area = remote.find_stub_area(self.pid, self._maps(), self.mem)
        return self._stub_area

    def _commit(
        self,
        changes: list[SiteChange],
        retired: list[list[Any]],
        protocol: str,
        clear: list[Watched] | None = None,
        deadline: float = 0.0,
    ) -> CommitReport:
        """Write ``changes`` all-or-nothing with the requested protocol (PROTOCOLS); the ``retired`` entries
        are checked for threads still using them on the way. With ``clear`` (``--consistency stack``), under
        protocol B once no thread has one of those functions on its stack, retried until ``deadline``
        (time.monotonic()). Raises SiteError when protocol A is forced on a site that needs R or B;
        ConsistencyTimeout; MismatchError, TargetError as the commits do."""
        proto = PROTOCOLS.get(protocol)
        if proto is None:
            raise HotpatchError(f"unknown protocol {protocol!r} (one of: {', '.join(PROTOCOLS)})")
        if clear:
            return self._commit_clear(changes, retired, clear, deadline)
        needs_check = [c for c in changes if c.span]
        if proto == "A" and needs_check:
            raise SiteError(
                f"{needs_check[0].label} is an ordinary site: it cannot be patched without stopping threads "
                "(use --protocol rolling or stop-the-world, or build the target with `hotpatch cflags`)"
            )
        if proto == "auto":
            proto = "R" if needs_check else "A"
        watch = [(r[0], r[1]) for r in retired]
        if proto in ("A", "R"):
            try:
                report = LiveCommit(self.pid, self.mem, self._stub(), changes, self.bitness).run(watch)
                report.protocol = proto
                return report
            except (RollingTimeout, SiteError):  # SiteError: a key whose 2-byte store would be torn
                if protocol != "auto":
                    raise
        txn = Transaction(self.pid, self.mem, self.bitness)
        for c in changes:
            txn.add(c)
        return txn.commit(watch=watch)

    def _commit_clear(
        self, changes: list[SiteChange], retired: list[list[Any]], clear: list[Watched], deadline: float
    ) -> CommitReport:
        """Protocol B with every stopped thread's stack checked against ``clear`` before the first write; a
        thread found inside releases the world untouched, and the wait (no thread stopped) goes on."""
        txn = Transaction(self.pid, self.mem, self.bitness)
        for c in changes:
            txn.add(c)
        while True:
            try:
                return txn.commit(watch=[(r[0], r[1]) for r in retired], clear=clear)
            except StackBusy as e:
                if time.monotonic() > deadline:
                    raise consistency_timeout(e) from None
            wait_clear(self.pid, self.mem, clear, deadline, self.bitness // 8)

    def _unmap(self, regions: list[tuple[int, int]]) -> None:
        """Unmap regions nothing runs in (best effort: the target may be gone)."""
        if not regions:
            return
        with suppress(HotpatchError), self._injector() as inject:
            for addr, size in regions:
                inject(inject.sys.munmap, addr, size)

    def _undo_load(self, state_addr: int, record: Record, region: int, size: int) -> None:
        """After a failed commit: put the record back and unmap the region (nothing ran in it)."""
        with suppress(HotpatchError):
            statemod.write(self.mem, state_addr, record)
        self._unmap([(region, size)])

    # -- revert -------------------------------------------------------------------------------------
    def revert(self, name: str | None = None, protocol: str = "auto") -> list[Report]:
        """Revert the patch called ``name``, or every patch when ``name`` is None (``--all``), with
        ``protocol`` (a key of PROTOCOLS; auto: A, each site's change being one instruction).

        Restores the original bytes with the same protocol as apply; unmaps the patch's memory when no
        thread's RIP or stack points into it, else keeps it (``status`` lists it) until a later command finds
        it free. Raises StateError when no such patch is applied; MismatchError when a site was changed by
        something else since.
        """
        with self._locked():
            maps = self._maps()
            state_addr, record = self._record(maps)
            record = self._reconcile(record, state_addr)
            if name is not None and record.find(name) is None:
                raise StateError(f"no patch named {name} is applied to PID {self.pid}")
            victims = [p for p in record.patches if name is None or p.name == name]
            if not victims and not record.retired:
                return []
            changes = [_restore(s) for p in victims for s in p.sites]
            retired = [list(r) for p in victims for r in p.regions] + record.retired
            retired += [_padding_entry(s) for p in victims for s in p.sites if s.key]
            commit = self._commit(changes, retired, protocol)
            assert state_addr is not None
            kept = self._free_unused(retired, commit.busy)
            statemod.write(self.mem, state_addr, Record([p for p in record.patches if p not in victims], kept))
        reports = []
        for p in victims:
            rep = self._report(p, commit)
            rep.retained = [(r[0], r[1]) for r in kept if r in p.regions]
            reports.append(rep)
        return reports

    # -- consistency --------------------------------------------------------------------------------
    def _reconcile(self, record: Record, state_addr: int | None) -> Record:
        """Drop records of patches that are not in force (a tool killed before or during a commit).

        A record whose sites all hold the original bytes is dropped and its memory retired; one with some
        sites written ("partial") is rolled back first. Returns the record to work from.
        """
        keep, retire, rollback = [], [], []
        for p in record.patches:
            st = statemod.site_status(self.mem, p)
            if st == "applied":
                keep.append(p)
            else:
                retire.append(p)
                if st == "partial":
                    rollback.append(p)
        if not retire or state_addr is None:
            return record
        if rollback:  # a tool killed mid-commit: put each site's key back, with everything stopped
            txn = Transaction(self.pid, self.mem, self.bitness)
            for p in rollback:
                for s in p.sites:
                    off, n = s.key_span
                    orig = bytes.fromhex(s.original)[off : off + n]
                    now = self.mem.read(s.site + off, n)
                    if now != orig:
                        txn.add(SiteChange(s.site + off, now, orig, s.symbol))
            txn.commit()
        pads = [_padding_entry(s) for p in retire for s in p.sites if s.key]
        fixed = Record(keep, record.retired + [r for p in retire for r in p.regions] + pads)
        statemod.write(self.mem, state_addr, fixed)
        return fixed

    def _report(self, rec: PatchRecord, commit: CommitReport) -> Report:
        rep = report_of(rec, commit)
        rep.pause_us = max([commit.pause_us, *self._stops_us])
        return rep


def report_of(rec: PatchRecord, commit: CommitReport) -> Report:
    """The :class:`Report` of the patch ``rec`` after ``commit`` (the pause: the commit's alone)."""
    rep = Report(
        rec.name,
        rec.version,
        [(s.symbol, s.key_at) for s in rec.sites if s.klass not in DATA_CLASSES],
        commit.pause_us,
        commit.threads,
        commit.moved,
    )
    rep.slots = [(s.symbol, s.site) for s in rec.sites if s.klass == VTABLE_SLOT]
    rep.got = [(s.symbol, s.site, s.importer) for s in rec.sites if s.klass == GOT_SLOT]
    rep.implementations = {s.symbol: s.implementation for s in rec.sites if s.implementation}
    rep.protocol = commit.protocol
    rep.check_stop_us = commit.check_stop_us
    rep.check_stops = commit.check_stops
    rep.check_samples = commit.check_samples
    return rep


def build_record(
    man: Manifest,
    module: str,
    region: int,
    size: int,
    placed: list[PlacedSite],
    slots: list[SlotPlan],
    bitness: int = 64,
) -> PatchRecord:
    """The record of patch ``man`` about to be applied to ``module`` (path), loaded at ``region`` (``size``
    bytes): its code sites, then its vtable slots."""
    by_symbol = {s.plan.function.symbol: s for s in placed}
    return PatchRecord(
        name=man.name,
        version=man.version,
        build_id=man.build_id,
        module=module,
        applied_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        regions=[[region, size]],
        sites=[_site_record(s) for s in placed]
        + [_slot_record(sp, by_symbol[sp.function.symbol], bitness) for sp in slots],
    )


def redirect_changes(
    placed: list[PlacedSite], slots: list[SlotPlan], rec: PatchRecord, old: PatchRecord | None
) -> list[SiteChange]:
    """The changes that redirect the code sites of ``placed`` (over the older version ``old``'s jumps when
    upgrading) and the vtable ``slots`` of the record ``rec`` (:func:`build_record`)."""
    replaced = {s.site: s for s in old.sites} if old is not None else {}
    changes = [c for s in placed for c in _redirect(s, replaced.get(s.plan.address))]
    by_site = {r.site: r for r in rec.sites if r.klass == VTABLE_SLOT}
    return changes + [_slot_change(sp, by_site[sp.address]) for sp in slots]


def _site_status(s: SiteRecord) -> SiteStatus:
    return SiteStatus(s.symbol, s.entry, s.site, s.klass, s.protocol, s.implementation, s.importer)


def _watched(code: list[tuple[int, int, str]], old: PatchRecord | None) -> list[Watched]:
    """The code ``--consistency stack`` waits for no thread to have on its stack: each replaced function
    ``(entry, size, symbol)`` of ``code``, and the regions of the older version an upgrade replaces."""
    out = [Watched(entry, entry + size, pretty(symbol)) for entry, size, symbol in code]
    if old is not None:
        out += [Watched(r[0], r[0] + r[1], f"code of patch {old.name} version {old.version}") for r in old.regions]
    return out


def _site_record(s: PlacedSite) -> SiteRecord:
    """What the state remembers of one redirected site."""
    short = s.plan.pad is not None
    return SiteRecord(
        symbol=s.plan.function.symbol,
        entry=s.plan.prologue.entry,
        site=s.plan.address,
        original=s.plan.original.hex(),
        new=s.new.hex(),
        replacement=s.replacement,
        trampoline=s.trampoline.address,
        klass=s.plan.klass,
        protocol="A" if short else "R",
        key=s.plan.prologue.site if short else 0,
        implementation=s.plan.implementation,
    )


def _redirect(s: PlacedSite, old: SiteRecord | None) -> list[SiteChange]:
    """The changes that redirect one site. Over an older version's jumps only the long jump's target
    changes (one instruction, the key is the jump itself);
    over the original instructions of an ordinary site, threads inside move to the trampoline (B) or are
    waited for (R); a short-jump site replaces one instruction, so no thread can be inside — but the padding
    of an earlier, reverted version may still hold its ``E9`` with a thread on it: that jump is then
    retargeted as an instruction of its own."""
    pro, plan, label = s.plan.prologue, s.plan, s.plan.function.symbol
    if plan.upgrading and plan.pad is not None and old is None:
        n = PAD_LEN
        stale = SiteChange(plan.pad, plan.current[:n], s.new[:n], label, 0, {}, plan.pad)
        rest = plan.address + n
        entry = SiteChange(rest, plan.current[n:], s.new[n:], label, 0, {}, pro.site)
        return [stale, entry]
    if plan.upgrading:
        key = plan.address
        if old is not None and old.key and len(bytes.fromhex(old.new)) == len(s.new):
            key = old.site  # the padding's E9: the short jump stays as it is
        return [SiteChange(plan.address, plan.current, s.new, label, 0, {}, key)]
    ordinary = plan.pad is None
    change = SiteChange(
        address=plan.address,
        expected=plan.current,
        new=s.new,
        label=label,
        span=pro.length if ordinary else 0,
        rip_map=s.trampoline.rip_map if ordinary else {},
        key_address=pro.site,
    )
    return [change]


def _restore(s: SiteRecord) -> SiteChange:
    """The change that reverts one site: its key back to the original bytes. A short-jump site's padding
    keeps its ``E9`` for now (:func:`_padding_entry`)."""
    off, n = s.key_span
    new, orig = bytes.fromhex(s.new)[off : off + n], bytes.fromhex(s.original)[off : off + n]
    return SiteChange(s.site + off, new, orig, s.symbol, 0, {}, s.key_at, s.klass in DATA_CLASSES)


def _slot_record(sp: SlotPlan, s: PlacedSite, bitness: int) -> SiteRecord:
    """What the state remembers of one redirected vtable slot: its word before (the entry's address) and
    after (the replacement's), as hex of the target's little-endian words."""
    new = (s.replacement % (1 << bitness)).to_bytes(bitness // 8, "little")
    entry = int.from_bytes(sp.original, "little")
    return SiteRecord(
        sp.function.symbol, entry, sp.address, sp.original.hex(), new.hex(), s.replacement, 0, VTABLE_SLOT
    )


def _got_record(g: GotPlan, replacement: int, bitness: int) -> SiteRecord:
    """What the state remembers of one redirected GOT slot: its word before and after, the importing module."""
    new = (replacement % (1 << bitness)).to_bytes(bitness // 8, "little")
    f = g.function
    return SiteRecord(
        f.symbol, g.definition, g.address, g.original.hex(), new.hex(), replacement, 0, GOT_SLOT, importer=g.importer
    )


def _got_change(g: GotPlan, r: SiteRecord) -> SiteChange:
    """The change that points one GOT slot at the replacement: one aligned word, stored whole."""
    return SiteChange(g.address, g.current, bytes.fromhex(r.new), f"GOT slot of {r.symbol}", word=True)


def _same_way(old: PatchRecord | None, via: str) -> None:
    """Raises SiteError when the applied version ``old`` redirects its functions the other way (code or GOT)."""
    if old is None or not old.sites:
        return
    old_via = "got" if all(s.klass == GOT_SLOT for s in old.sites) else "code"
    if old_via != via:
        raise SiteError(
            f"patch {old.name} version {old.version} is applied with --via {old_via}; revert it before applying "
            f"a version with --via {via}"
        )


def _slot_change(sp: SlotPlan, r: SiteRecord) -> SiteChange:
    """The change that points one vtable slot at the replacement: one aligned word, stored whole."""
    return SiteChange(sp.address, sp.current, bytes.fromhex(r.new), f"vtable slot of {r.symbol}", word=True)


def _padding_entry(s: SiteRecord) -> list[Any]:
    """The retired entry for a reverted short-jump site's padding: a thread may still sit on its ``E9``
    (it took the short jump just before), so the original bytes go back once none is there."""
    return [s.site, PAD_LEN, bytes.fromhex(s.original)[:PAD_LEN].hex()]


def attach(pid: int) -> Target:
    """Open the running process ``pid`` (x86-64 or i386) for patching. Raises TargetError (no such PID, not
    traceable, not x86)."""
    return Target(pid)

"""The record of applied patches, kept inside the target (DESIGN.md §2 "state", §6 invariant 5).

The record lives in a memfd mapping named ``hotpatch-state`` (``/memfd:hotpatch-state (deleted)`` in
``/proc/PID/maps``), created by injected raw syscalls on the first apply. The mapping is private
(``MAP_PRIVATE``): a child forked later gets its own copy of the record, as it gets its own copy of the patched
code (mm/memory.c copy-on-write), and a revert in the parent does not erase the child's record of code the child
still runs. It holds a header and two slots of
JSON; a writer fills the inactive slot and then flips the one-byte slot index with a single ``pwrite``, so a
tool killed at any moment leaves either the old or the new record, never a torn one.

The record says which sites each patch owns with their original and new bytes; whether a patch is in force
is always decided by comparing those bytes with the target's code (:func:`site_status`), so ``status`` tells
the truth even after the tool was killed between writing code and updating the record.
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

from .errors import StateError, TargetError
from .process.maps import Mapping
from .process.memory import Memory
from .process.remote import (
    MAP_PRIVATE,
    MFD_CLOEXEC,
    PROT_READ,
    PROT_WRITE,
    Injector,
)

NAME = b"hotpatch-state"
MAGIC = b"HPSTATE1"
SIZE = 1 << 20
HEADER = 4096
SLOT_SIZE = (SIZE - HEADER) // 2
ACTIVE_OFFSET = len(MAGIC)


class SiteRecord(NamedTuple):
    """One redirected site: function ``symbol`` at ``entry``; the bytes written start at ``site`` (the jump:
    entry or entry+4; for short-jump classes the padding at entry - 5); ``original``/``new``: hex bytes
    there before/after; ``replacement`` and ``trampoline`` addresses; ``klass`` and ``protocol`` (A, R, B)
    as DESIGN.md §4 names them; ``key``: the instruction threads enter through (0: ``site``)."""

    symbol: str
    entry: int
    site: int
    original: str
    new: str
    replacement: int
    trampoline: int
    klass: str = "ordinary"
    protocol: str = "B"
    key: int = 0
    implementation: str = ""  # an IFUNC's: the implementation redirected (hotpatch.ifunc)
    importer: str = ""  # a GOT slot's: the module whose slot it is (hotpatch.gotplan)

    @property
    def key_at(self) -> int:
        """The key's address (``key``, else ``site``)."""
        return self.key or self.site

    @property
    def key_span(self) -> tuple[int, int]:
        """(offset from ``site``, length) of the bytes that decide whether the redirect is in force: the
        short jump for short-jump classes (their padding is never executed once it is gone), else all."""
        if not self.key:
            return 0, len(self.new) // 2
        return self.key - self.site, 2


class PatchRecord(NamedTuple):
    """An applied patch: identity, target module, when (UTC ISO 8601), memory regions ``[addr, size]``
    mapped for it, its sites, and its ``origin``: the identity of the repository it came from
    (:func:`hotpatch.registry.client.repository_id`), empty for a patch applied from a file."""

    name: str
    version: int
    build_id: str
    module: str
    applied_at: str
    regions: list[list[int]]
    sites: list[SiteRecord]
    origin: str = ""

    @staticmethod
    def from_dict(doc: dict[str, Any]) -> PatchRecord:
        """Inverse of :meth:`as_dict`."""
        return PatchRecord(**{**doc, "sites": [SiteRecord(**s) for s in doc["sites"]]})

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, sites included."""
        return {**self._asdict(), "sites": [s._asdict() for s in self.sites]}


class Record:
    """The whole record: ``patches`` in force (or pending), and ``retired`` regions ``[addr, size]`` of
    reverted or replaced patches still mapped because a thread might be executing in them, or
    ``[addr, size, hex]``: padding of a reverted short-jump site still holding its ``E9 rel32`` (a thread may
    sit on it), to be given back its original bytes ``hex`` once no thread is there."""

    __slots__ = ("patches", "retired")

    def __init__(self, patches: list[PatchRecord] | None = None, retired: list[list[Any]] | None = None) -> None:
        self.patches: list[PatchRecord] = patches if patches is not None else []
        self.retired: list[list[Any]] = retired if retired is not None else []

    def find(self, name: str) -> PatchRecord | None:
        """The patch record called ``name``, or None."""
        return next((p for p in self.patches if p.name == name), None)

    def to_json(self) -> bytes:
        """Serialise for a slot."""
        doc = {"patches": [p.as_dict() for p in self.patches], "retired": self.retired}
        return json.dumps(doc, separators=(",", ":")).encode()

    @staticmethod
    def from_json(raw: bytes) -> Record:
        """Parse a slot; raises StateError when it is damaged."""
        try:
            doc = json.loads(raw)
            return Record([PatchRecord.from_dict(p) for p in doc["patches"]], [list(r) for r in doc["retired"]])
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"the hotpatch record inside the target is damaged ({e})") from None


def find_region(maps: list[Mapping]) -> int | None:
    """Address of the state mapping in ``maps``, or None when no patch was ever applied."""
    for m in maps:
        if m.path.startswith("/memfd:" + NAME.decode()):
            return m.start
    return None


def read(mem: Memory, addr: int | None) -> Record:
    """Read the record at ``addr`` (None: an empty record). Raises StateError when damaged."""
    if addr is None:
        return Record()
    header = mem.read(addr, HEADER)
    if header[: len(MAGIC)] == bytes(len(MAGIC)):
        return Record()  # created but never written
    if header[: len(MAGIC)] != MAGIC:
        raise StateError("the hotpatch record inside the target has a bad header")
    slot = header[ACTIVE_OFFSET] & 1
    base = addr + HEADER + slot * SLOT_SIZE
    (length,) = struct.unpack("<I", mem.read(base, 4))
    if length > SLOT_SIZE - 4:
        raise StateError("the hotpatch record inside the target is damaged (bad length)")
    return Record.from_json(mem.read(base + 4, length))


def write(mem: Memory, addr: int, record: Record) -> None:
    """Write ``record``: fill the inactive slot, then flip the active index with a 1-byte write.

    Raises StateError when the record does not fit in a slot (~510 KiB of JSON).
    """
    raw = record.to_json()
    if len(raw) > SLOT_SIZE - 4:
        raise StateError("too many patches applied: the record inside the target is full")
    header = mem.read(addr, len(MAGIC) + 1)
    active = header[ACTIVE_OFFSET] & 1 if header[: len(MAGIC)] == MAGIC else 1
    slot = active ^ 1
    mem.write(addr + HEADER + slot * SLOT_SIZE, struct.pack("<I", len(raw)) + raw)
    if header[: len(MAGIC)] != MAGIC:
        mem.write(addr, MAGIC)
    mem.write(addr + ACTIVE_OFFSET, bytes([slot]))


def create(inject: Injector, mem: Memory) -> int:
    """Create the state mapping in the target with injected syscalls; returns its address.

    The memfd's name is placed on the injecting thread's stack, below its 128-byte red zone (System V
    x86-64 psABI §3.2.2; i386 has none), which no code uses while the thread is stopped. The system call
    numbers are the injecting thread's (``inject.sys``: x86-64 or i386). The memfd is closed after mapping,
    so no descriptor is left behind. Raises TargetError when the kernel refuses (memfd_create needs Linux
    >= 3.17).
    """
    regs = inject.thread.regs
    assert regs is not None
    scratch = (regs.rsp - 512) & ~15
    mem.write(scratch, NAME + b"\0")
    try:
        fd = inject(inject.sys.memfd_create, scratch, MFD_CLOEXEC)
    except OSError as e:
        raise TargetError(f"cannot create the hotpatch record in the target: memfd_create: {e.strerror}") from None
    try:
        inject(inject.sys.ftruncate, fd, SIZE)
        addr = inject.mmap(0, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0)
    except OSError as e:
        raise TargetError(f"cannot map the hotpatch record in the target: {e.strerror}") from None
    finally:
        inject(inject.sys.close, fd)
    return addr


def site_status(mem: Memory, patch: PatchRecord) -> str:
    """``applied`` when every site holds its new bytes, ``reverted`` when every site holds its original
    bytes, ``partial`` otherwise (only after the tool died between two site writes)."""
    states = set()
    for s in patch.sites:
        new = bytes.fromhex(s.new)
        now = mem.read(s.site, len(new))
        off, n = s.key_span
        reverted = now[off : off + n] == bytes.fromhex(s.original)[off : off + n]
        states.add("applied" if now == new else "reverted" if reverted else "x")
    if states == {"applied"}:
        return "applied"
    if states == {"reverted"}:
        return "reverted"
    return "partial"

"""``apply --via got``: redirect the calls to a function through the GOT slots of the modules importing it.

A module calls a function of another module through its Global Offset Table: ``call *f@GOTPCREL(%rip)`` or a
PLT stub that jumps through ``f``'s ``.got.plt`` word (System V x86-64 psABI §5.2, "Procedure Linkage Table";
relocations GLOB_DAT, JUMP_SLOT, 64, :meth:`hotpatch.elf.image.ElfImage.import_slots`). Seed 004's "dlopen
patching" swaps such pointers; here every GOT word naming the function (or only those of the modules named by
``--importer``) gets the replacement's address, each with one aligned store made by a thread of the target
(:class:`hotpatch.x86.selfloop.Edit` ``word``), so a caller loads the old or the new address, never a mix.
No byte of code changes: it works where code may not be made writable (an ``mprotect`` policy forbidding
``PROT_EXEC`` with ``PROT_WRITE``: a read-only GOT page is made read+write only). Calls inside the defining
module that do not go through its GOT, and function pointers taken before, keep the old code.

A slot holds the definition's address once bound, or, bound lazily and not called yet, the address of its PLT
entry in the importing module; both are the original, put back by revert.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import NamedTuple

from .errors import HotpatchError, MismatchError, SiteError
from .modules import Module, ModuleSet
from .patch.manifest import Function
from .process.memory import Memory
from .state import Record
from .x86 import sites


class GotPlan(NamedTuple):
    """One GOT word to redirect: the ``function``, the slot's runtime ``address`` in module ``importer``, the
    word there now (``current``) and the one to put back on revert (``original``), little-endian words of the
    target's width, and the function's runtime ``definition``."""

    function: Function
    address: int
    current: bytes
    original: bytes
    importer: str
    definition: int  # where calls of the function land: what the replacement's HOTPATCH_ORIGINAL calls


def _definition(modules: ModuleSet, module: Module, f: Function, read_word: Callable[[int], int]) -> int:
    """The runtime address calls of ``f`` reach: its entry, or for an IFUNC the implementation bound."""
    if f.klass == sites.IFUNC:
        return modules.bound_ifunc(f.symbol, module, read_word)
    return module.bias + f.value


def plan_got(
    mem: Memory,
    modules: ModuleSet,
    module: Module,
    functions: tuple[Function, ...],
    record: Record,
    name: str,
    bitness: int,
    importers: tuple[str, ...] = (),
) -> list[GotPlan]:
    """The GOT slots of every function of patch ``name`` in every module importing it (only those whose file
    name is in ``importers``, when given). Each function's bytes are checked against the manifest first.

    Raises MismatchError for changed bytes or a slot bound elsewhere (another module's definition, an
    interposer), SiteError when no module imports a function through a GOT slot or another patch owns one."""
    word = bitness // 8
    owned = {s.site: (p.name, s) for p in record.patches for s in p.sites if s.klass == sites.GOT_SLOT}

    def read_word(addr: int) -> int:
        return int.from_bytes(mem.read(addr, word), "little")

    out = []
    for f in functions:
        if f.replacement:  # a compiler clone: a local copy no module imports
            continue
        code = mem.read(module.bias + f.value, f.size)
        if hashlib.sha256(code).hexdigest() != f.sha256:
            raise MismatchError(
                f"the bytes of {f.symbol} in {module.path} differ from the ones the patch was built against"
            )
        target = _definition(modules, module, f, read_word)
        found = 0
        for mod in modules.modules:
            if importers and os.path.basename(mod.path) not in importers:
                continue
            try:
                slots = mod.image.import_slots(f.symbol)
            except HotpatchError:
                continue
            for slot in slots:
                address = mod.bias + slot
                current = mem.read(address, word)
                value = int.from_bytes(current, "little")
                owner, rec = owned.get(address, (name, None))
                if owner != name:
                    raise SiteError(f"{f.symbol}: the GOT slot at {address:#x} is redirected by patch '{owner}'")
                if rec is not None and current.hex() == rec.new:
                    original = bytes.fromhex(rec.original)
                elif value == target or mod.start <= value < mod.end:  # bound, or still lazy (its PLT entry)
                    original = current
                else:
                    raise MismatchError(
                        f"the GOT slot of {f.symbol} at {address:#x} in {mod.path} holds {value:#x}, neither "
                        f"{f.symbol} in {module.path} nor a PLT entry (interposed by another module?)"
                    )
                out.append(GotPlan(f, address, current, original, mod.path, target))
                found += 1
        if not found:
            where = f"the modules {', '.join(importers)}" if importers else "any module"
            raise SiteError(f"{f.symbol} is not imported through a GOT slot by {where} of PID {modules.pid}")
    return out

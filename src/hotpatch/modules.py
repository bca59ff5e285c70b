"""The modules (ELF objects) mapped in a target, found by build-id, and symbol resolution across them.

A module's file is opened through ``/proc/PID/root/<path>`` (the target's view of the file system) or, when it
was deleted or replaced on disk, ``/proc/PID/map_files/<range>`` (proc(5)). Its load bias comes from the mapping
of its first file page (System V gABI, "Program Loading").

Symbol resolution order for a patch's undefined symbols (issue 2): the target module's ``.dynsym``, its
``.symtab``, its separate debug file's ``.symtab`` (static functions and variables of a stripped module,
:mod:`hotpatch.elf.debugfile`), then the executable, then every other module in address order (as ld.so's
global scope puts the executable first: a copy-relocated ``stdout`` lives there). A symbol the target module
exports is looked up in the executable first, as ld.so binds the module's own references to it there (copy
relocation, interposition).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .elf.debugfile import open_debug_file
from .elf.image import ElfImage, Symbol, open_elf
from .errors import HotpatchError, MismatchError, SymbolError
from .process.maps import Mapping, mapped_file


class Module:
    """One mapped ELF object: ``path`` as maps shows it, ``bias`` (bytes added to link-time addresses),
    ``start``/``end`` spanning its mappings, ``first`` its mapping of the lowest file offset, and ``file``, a
    path hotpatch can open."""

    __slots__ = ("_bias", "_debug", "_image", "end", "file", "first", "path", "start")

    def __init__(self, path: str, file: str, start: int, end: int, first: Mapping) -> None:
        self.path, self.file, self.start, self.end, self.first = path, file, start, end, first
        self._image: ElfImage | None = None
        self._bias: int | None = None
        self._debug: ElfImage | bool | None = False  # False: not looked for yet

    @property
    def image(self) -> ElfImage:
        """The module's ELF file (opened on first use). Raises PatchFileError when it cannot be read."""
        if self._image is None:
            self._image = open_elf(self.file, "module")
        return self._image

    @property
    def bias(self) -> int:
        """Load bias in bytes: runtime address = link-time address + bias."""
        if self._bias is None:
            self._bias = self.image.load_bias(self.first.offset, self.first.start)
        return self._bias

    @property
    def debug_image(self) -> ElfImage | None:
        """The module's separate debug file (:mod:`hotpatch.elf.debugfile`), or None when there is none."""
        if self._debug is False:
            build_id = self.image.build_id
            self._debug = open_debug_file(build_id) if build_id else None
        return self._debug if isinstance(self._debug, ElfImage) else None

    def static_symbol(self, name: str) -> Symbol | None:
        """``name`` from the module's own symbol tables, else from its debug file's ``.symtab``. Raises
        SymbolError when only ``static`` definitions at several addresses have that name (which one the patch
        means cannot be known)."""
        for img in (self.image, self.debug_image):
            if img is None:
                continue
            sym = img.symbol(name) if img is self.image else img.symtab_symbol(name)
            if sym is None:
                continue
            if sym.binding == "local" and name in img.ambiguous_locals():
                raise SymbolError(
                    f"{name} names several static symbols of {self.path} (one per source file); the patch cannot "
                    "say which"
                )
            return sym
        return None

    def function_at(self, value: int) -> Symbol | None:
        """The function symbol (module or debug file) whose link-time address is ``value``, preferring a global
        one; None when neither names it."""
        found = []
        for img in (self.image, self.debug_image):
            if img is not None:
                found += [s for s in img.function_symbols().values() if s.value == value and s.kind == "func"]
        found.sort(key=lambda s: (s.binding != "global", s.name.startswith("_"), s.name))
        return found[0] if found else None

    def close(self) -> None:
        """Close the module's file (and its debug file) if they were opened."""
        if self._image is not None:
            self._image.close()
            self._image = None
        if isinstance(self._debug, ElfImage):
            self._debug.close()
        self._debug = False


class ModuleSet:
    """Every file-backed ELF module of a target, from its ``/proc/PID/maps``."""

    def __init__(self, pid: int, maps: list[Mapping]) -> None:
        self.pid = pid
        exe = os.readlink(f"/proc/{pid}/exe") if os.path.exists(f"/proc/{pid}/exe") else ""
        by_path: dict[str, Module] = {}
        for m in maps:
            if m.inode == 0 or not m.path.startswith("/") or m.path.startswith("/memfd:"):
                continue
            mod = by_path.get(m.path)
            if mod is None:
                by_path[m.path] = Module(m.path, mapped_file(pid, m), m.start, m.end, m)
            else:
                mod.start, mod.end = min(mod.start, m.start), max(mod.end, m.end)
                if m.offset < mod.first.offset:
                    mod.first = m
        self.modules = sorted(by_path.values(), key=lambda mod: (mod.path != exe, mod.start))
        self.exe = next((mod for mod in self.modules if mod.path == exe), None)

    def close(self) -> None:
        """Close every opened module file."""
        for mod in self.modules:
            mod.close()

    def find(self, build_id: str, file_name: str) -> Module:
        """The module whose GNU build-id is ``build_id``; modules named ``file_name`` are tried first.

        Raises MismatchError when no mapped module has that build-id (another build of the program).
        """

        def named(mod: Module) -> bool:
            return os.path.basename(mod.path.removesuffix(" (deleted)")) == file_name

        ordered = sorted(self.modules, key=lambda mod: not named(mod))
        for mod in ordered:
            try:
                if mod.image.build_id == build_id:
                    return mod
            except HotpatchError:
                continue
        same_name = [mod.path for mod in self.modules if named(mod)]
        if same_name:
            raise MismatchError(
                f"the patch is for another build of {file_name}: PID {self.pid} maps {same_name[0]} "
                f"with a different build-id (patch wants {build_id})"
            )
        raise MismatchError(f"PID {self.pid} has no module with build-id {build_id} ({file_name} is not loaded)")

    def resolve(self, name: str, first: Module, read_word: Callable[[int], int]) -> int:
        """Runtime address of symbol ``name``: ``first``'s .dynsym, .symtab and debug file, then the executable,
        then the others. An IFUNC resolves to the implementation the target already bound (see
        :meth:`bound_ifunc`). ``read_word`` reads 8 bytes of target memory.

        Raises SymbolError when no module defines it.
        """
        order = [first, *(m for m in self.modules if m is not first)]
        if self.exe is not None and self.exe is not first and self._exported(first, name):
            # ld.so binds an exported symbol to the executable's definition first (a copy relocation of a
            # library variable, or an interposing function): that is the one the library itself uses
            order.remove(self.exe)
            order.insert(0, self.exe)
        for mod in order:
            try:
                sym = mod.static_symbol(name) if mod is first else mod.image.dynamic_symbol(name)
            except SymbolError:
                raise  # an ambiguous static name
            except HotpatchError:
                continue
            if sym is None or sym.kind == "tls":
                continue
            if sym.kind == "ifunc":
                return self.bound_ifunc(name, mod, read_word)
            return mod.bias + sym.value
        raise SymbolError(
            f"symbol {name} is not defined in PID {self.pid} (looked in {first.path} and "
            f"{len(self.modules) - 1} other modules)"
        )

    @staticmethod
    def _exported(mod: Module, name: str) -> bool:
        try:
            return mod.image.dynamic_symbol(name) is not None
        except HotpatchError:
            return False

    def bound_ifunc(self, name: str, definer: Module, read_word: Callable[[int], int]) -> int:
        """The implementation of IFUNC ``name`` that ld.so chose in this target: the value of a GOT slot
        of some module importing ``name`` that already points into ``definer`` (ld.so runs the resolver once
        per process; calling it ourselves would run code in the target). Raises SymbolError when no module
        has such a bound slot (e.g. only lazily bound ones)."""
        for mod in self.modules:
            if mod is definer:
                continue
            try:
                slots = mod.image.import_slots(name)
            except HotpatchError:
                continue
            for slot in slots:
                value = read_word(mod.bias + slot)
                if definer.start <= value < definer.end:
                    return value
        raise SymbolError(
            f"symbol {name} is an IFUNC in {definer.path} and no module of PID {self.pid} has bound it yet; "
            "hotpatch cannot pick its implementation"
        )

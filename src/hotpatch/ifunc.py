"""IFUNC symbols: patch the implementation the target resolved, not the resolver.

An IFUNC symbol (``STT_GNU_IFUNC``; libc's ``strlen``, ``memcpy`` …) names a resolver that ld.so runs once per
process to choose an implementation for this CPU (``__strlen_avx2``, ``__strlen_evex`` …), and binds every
reference to the address it returns (glibc ``elf/dl-runtime.c``, ``elf_ifunc_invoke``). Redirecting the
resolver changes nothing in a running process. So ``build`` records the resolver (its bytes' hash proves the
build) and ``apply`` finds the implementation this target bound — the value of a GOT slot of a module that
imports the symbol (:meth:`hotpatch.modules.ModuleSet.bound_ifunc`) — and describes it as build would a
function (:func:`hotpatch.patch.describe.describe`): its size from a symbol of the module or of its debug
file, else from its ``.eh_frame`` entry.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .elf.cxxnames import pretty
from .elf.image import Symbol
from .elf.ranges import function_ranges
from .errors import SiteError
from .modules import Module, ModuleSet
from .patch.describe import describe
from .patch.manifest import Function


def implementation(
    modules: ModuleSet, module: Module, f: Function, read_word: Callable[[int], int]
) -> tuple[Function, str]:
    """The manifest entry for the implementation of IFUNC ``f`` (a manifest entry of class ``ifunc``) that the
    target bound, and that implementation's name (its symbol, else ``<module>+<offset>``). Raises SymbolError
    when no module has bound it yet, SiteError when its size cannot be found or it cannot be patched."""
    runtime = modules.bound_ifunc(f.symbol, module, read_word)
    link = runtime - module.bias
    sym = module.function_at(link)
    ranges = function_ranges(module.image)
    name = sym.name if sym is not None else f"{os.path.basename(module.path)}+{link:#x}"
    size = sym.size if sym is not None else 0
    if not size:
        size = next((hi - lo for lo, hi in ranges if lo == link), 0)
    if not size:
        raise SiteError(
            f"{f.symbol} is an IFUNC; its implementation at {runtime:#x} ({name}) has no symbol or unwind entry "
            "giving its size"
        )
    label = f"{pretty(f.symbol)} (IFUNC implementation {name})"
    return describe(module.image, ranges, f.symbol, Symbol(name, link, size, "func", "local", 0), label), name

"""Compiler clones of a replaced function, found by their symbol names.

GCC copies functions under derived names (GCC internals, "Interprocedural analysis"; the suffixes are the
pass's): ``f.constprop.N`` (IPA-CP: specialised for constant arguments, which it no longer takes),
``f.isra.N`` (IPA-SRA: pointer arguments replaced by the values they point to), ``f.part.N`` (partial
inlining: callers run the head of ``f`` inline and call this part for the rest), ``f.lto_priv.N``,
``f.clone.N``, ``f.specialized.N``; ``f.cold`` (hot/cold splitting: the unlikely blocks of ``f``, entered
only from ``f`` itself); ``f.localalias`` (an alias of ``f`` at the same address).

A caller of a clone never passes through ``f``'s entry, so redirecting ``f`` alone leaves it on the old code;
and a clone has in general its own calling convention, so it cannot simply be sent to ``f``'s replacement. A
clone that is a whole copy of ``f`` (the same code, :func:`hotpatch.x86.samecode.same_code`) has ``f``'s
convention and is: it is redirected to ``f``'s replacement too. For the others ``build`` refuses a patch that
replaces ``f`` but not them, unless the patch replaces them too (a replacement with the clone's symbol,
``__asm__("f.part.0")``) or the user allows it (``--allow-clones``: callers of the clones may keep the old
code). ``.cold`` parts and ``.localalias`` aliases switch with ``f``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from ..elf.cxxnames import pretty
from ..errors import BuildError

_CLONE = re.compile(r"(\.(constprop|isra|part|lto_priv|clone|specialized)\.\d+)+(\.cold)?|\.cold|\.localalias")
_KINDS = {
    "constprop": "specialised for constant arguments",
    "isra": "arguments passed by value instead of by pointer",
    "part": "partial inlining: callers run the head inline and call this part",
    "lto_priv": "a link-time copy",
    "clone": "a copy",
    "specialized": "a specialised copy",
}


def clones_of(replaced: Iterable[str], symbols: Iterable[str]) -> dict[str, list[str]]:
    """For each name of ``replaced``, the names of ``symbols`` that are its compiler clones (sorted)."""
    wanted = set(replaced)
    out: dict[str, list[str]] = {}
    for sym in symbols:
        base, dot, rest = sym.partition(".")
        if dot and base in wanted and _CLONE.fullmatch(dot + rest):
            out.setdefault(base, []).append(sym)
    return {k: sorted(v) for k, v in out.items()}


def switches_with_parent(clone: str) -> bool:
    """True for a ``.cold`` part entered only from its parent's code, or a ``.localalias`` (same address)."""
    return clone.endswith(".localalias") or bool(re.search(r"^[^.]+\.cold$", clone))


def _kind(clone: str) -> str:
    m = re.search(r"\.(constprop|isra|part|lto_priv|clone|specialized)\.", clone)
    return _KINDS[m.group(1)] if m else "a part"


def check_clones(
    replaced: list[str], symbols: Iterable[str], target: str, allow: bool, whole: Callable[[str, str], bool]
) -> tuple[list[str], dict[str, str]]:
    """Notes on the clones of the ``replaced`` functions among the target's function ``symbols``, and the
    clones that are whole copies (``whole(base, clone)``), to be sent to their base's replacement (clone ->
    base). Raises BuildError naming the clones a patch leaves alone (their callers would keep the old code)
    unless ``allow``. A clone of a clone (``f.part.0.cold``, the cold part of a clone the patch replaces)
    needs nothing."""
    notes, missing = [], []
    copies: dict[str, str] = {}
    done = set(replaced)
    for base, clones in sorted(clones_of(replaced, symbols).items()):
        for c in clones:
            if c in done or switches_with_parent(c) or (c.endswith(".cold") and c[: -len(".cold")] in done):
                notes.append(f"{c} switches with {pretty(base)}" if c not in done else f"{c} is replaced too")
            elif whole(base, c):
                copies[c] = base
                notes.append(f"{c} is a whole copy of {pretty(base)}: redirected to its replacement too")
            else:
                missing.append((base, c))
    if missing and not allow:
        shown = "; ".join(f"{c} ({_kind(c)})" for _, c in missing)
        raise BuildError(
            f"{pretty(missing[0][0])} has compiler clones in {target} that its callers may call instead of it: "
            f'{shown}; replace them too (a function declared with __asm__("{missing[0][1]}")), or pass '
            "--allow-clones if their callers may keep the old code"
        )
    notes += [f"{c} left alone: its callers keep the old code (--allow-clones)" for _, c in missing]
    return notes, copies

"""C++ names: demangle symbols, and find a function by the name a person writes.

Symbols of C++ functions are mangled (Itanium C++ ABI, "Mangling": ``_ZN9DemoClass9say_helloEi…``). Users
write them as g++ prints them (``DemoClass::say_hello(int, std::string_view)``). Demangling is libstdc++'s
own ``abi::__cxa_demangle`` (through the ``cxxfilt`` package), the demangler g++'s ``c++filt`` uses; where
libstdc++ cannot be loaded, names stay mangled (still exact, only less readable).

A written name matches a symbol when, after :func:`canonical`, it equals the symbol's demangled name, or the
demangled name without its parameter list (``DemoClass::say_hello`` names every overload: ambiguous when
there are several). :func:`canonical` removes spaces and spells the standard library's typedefs the short
way (``std::basic_string_view<char, std::char_traits<char> >`` is ``std::string_view``, as <string_view>
declares), so either spelling matches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import cache
from typing import cast

from ..errors import SymbolError

# the demangler's spelling -> the typedef users write (C++17 [string.view.synop], [basic.string] synopsis,
# [iosfwd.syn]); std::__cxx11 is libstdc++'s inline namespace of the C++11 ABI
_TYPEDEFS = [
    ("std::__cxx11::", "std::"),
    ("std::basic_string<char, std::char_traits<char>, std::allocator<char> >", "std::string"),
    ("std::basic_string_view<char, std::char_traits<char> >", "std::string_view"),
    ("std::basic_ostream<char, std::char_traits<char> >", "std::ostream"),
    ("std::basic_istream<char, std::char_traits<char> >", "std::istream"),
]


@cache
def _demangler() -> Callable[[str], str] | None:
    try:
        import cxxfilt

        dem = cxxfilt.Demangler(cxxfilt.find_any_library("c"), cxxfilt.find_any_library("stdc++", "c++"))
    except Exception:  # no libstdc++ on this host: names stay mangled
        return None
    return cast("Callable[[str], str]", dem.demangle)


@cache
def demangle(symbol: str) -> str:
    """The demangled form of ``symbol`` (``DemoClass::say_hello(int, std::basic_string_view<…>)``); a C
    symbol, a name the demangler rejects, or any name when libstdc++ is missing comes back unchanged."""
    if not symbol.startswith("_Z"):
        return symbol
    dem = _demangler()
    if dem is None:
        return symbol
    try:
        return dem(symbol)
    except Exception:  # cxxfilt.InvalidName: not a valid mangled name
        return symbol


def canonical(name: str) -> str:
    """``name`` without spaces, with the standard typedefs' short spelling and ``()`` for ``(void)``."""
    out = re.sub(r"\s+", "", name)
    for long, short in _TYPEDEFS:
        out = out.replace(long.replace(" ", ""), short)
    return out.replace("(void)", "()")


def pretty(symbol: str) -> str:
    """``symbol`` as a person reads it: demangled, with the standard typedefs' short spelling
    (``DemoClass::say_hello(int, std::string_view)``)."""
    out = demangle(symbol)
    for long, short in _TYPEDEFS:
        out = out.replace(long, short)
    return out


def _without_parameters(demangled: str) -> str:
    """``A::f(int) const`` -> ``A::f`` (the parameter list is the last top-level parenthesised group)."""
    depth = 0
    for i in range(len(demangled) - 1, -1, -1):
        c = demangled[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                return demangled[:i]
    return demangled


def find_symbol(written: str, symbols: Iterable[str], where: str) -> str:
    """The symbol of ``symbols`` that ``written`` names: itself when it is one (a mangled or C name), else the
    one whose demangled name matches (see the module docstring). Raises SymbolError naming ``where`` when none
    matches, or when several do (the error lists them)."""
    names = list(symbols)
    if written in names:
        return written
    want = canonical(written)
    exact = [s for s in names if canonical(demangle(s)) == want]
    hits = exact or [s for s in names if canonical(_without_parameters(demangle(s))) == want]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise SymbolError(f"no function {written} in {where}")
    shown = "; ".join(demangle(s) for s in sorted(hits)[:5])
    raise SymbolError(f"{written} is ambiguous in {where}: {len(hits)} functions match ({shown})")

"""``hotpatch build``: compile replacement sources into one patch file.

The sources are compiled by the system gcc/g++ into a position-independent shared object, linked without
start files (hotpatch never runs a patch's constructors) and with ``-z now`` (every relocation is resolved by
hotpatch's loader at apply time). A function the sources define with the same symbol as a function of the
target file replaces it. The manifest (see :mod:`.manifest`) is added with ``objcopy --add-section``.

The patch's architecture follows the target file's: an x86-64 ELF64 target gives an x86-64 patch, an i386
ELF32 target (``gcc -m32``) one compiled and linked with ``-m32`` (gcc-multilib) whose manifest says
``arch: i386`` and whose sites are analysed as 32-bit code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from ..elf.cxxnames import find_symbol, pretty
from ..elf.debugfile import open_debug_file
from ..elf.image import ElfImage, Symbol, open_elf
from ..elf.vtables import vtable_slots, vtable_symbols
from ..errors import BuildError, HotpatchError
from ..x86.samecode import same_code
from ..x86.sites import IFUNC
from .bundle import PatchBinary
from .clones import check_clones
from .describe import describe
from .manifest import SECTION, Function, Manifest

CXX_SUFFIXES = {".cc", ".cpp", ".cxx", ".C", ".c++"}
COMPILE_FLAGS = ["-fPIC", "-O2", "-fno-plt", "-fvisibility=default", "-Wall"]
# -z noseparate-code -z norelro: headers, code and read-only data share one R+X segment, the rest is one R+W
# segment, so mapping a patch takes two injected syscalls (a shorter stop of the injecting thread).
LINK_FLAGS = [
    "-Wl,-z,noseparate-code",
    "-Wl,-z,norelro",
    "-shared",
    "-nostartfiles",
    "-Wl,-z,now",
    "-Wl,-z,noexecstack",
    "-Wl,--hash-style=gnu",
    "-Wl,--build-id=sha1",
]
# target machine (ElfImage.machine) -> (ELF class, extra gcc flags for compiling and linking)
TARGET_ARCHES = {"x86_64": (64, []), "i386": (32, ["-m32"])}


class BuildResult(NamedTuple):
    """What ``build`` wrote: the output path, its manifest, and notes for the user (compiler clones,
    :mod:`.clones`)."""

    path: str
    manifest: Manifest
    notes: tuple[str, ...] = ()


def include_dir() -> str:
    """The directory holding ``hotpatch.h`` inside the installed package."""
    return str(resources.files("hotpatch") / "include")


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} is not installed; hotpatch build needs it") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        first = next((ln for ln in detail if "error" in ln), detail[0] if detail else "")
        raise BuildError(f"{what} failed: {first}")


def build(
    sources: list[str],
    target: str,
    out: str,
    name: str | None = None,
    version: int = 1,
    extra_flags: list[str] | None = None,
    ordinary_sites: bool = False,
    functions: list[str] | None = None,
    allow_clones: bool = False,
) -> BuildResult:
    """Compile ``sources`` into the patch file ``out`` for the module file ``target``.

    ``name`` defaults to ``out``'s file name without its suffix; ``version`` is an integer >= 0.
    ``functions``: the target functions the patch must replace, mangled or as g++ prints them
    (``DemoClass::say_hello(int, std::string_view)``, :mod:`hotpatch.elf.cxxnames`); when given, the sources'
    other definitions that share a target symbol are not replacements. A replaced virtual function's vtable
    slots (:mod:`hotpatch.elf.vtables`) are recorded to be redirected with it. A replaced function with
    compiler clones the patch does not replace too is refused unless ``allow_clones`` (:mod:`.clones`).
    Raises BuildError for compiler failures, a target without build-id, or sources that replace nothing or
    not every function of ``functions``; SymbolError for a name of ``functions`` the target lacks or
    that names several functions; SiteError when a replaced function cannot be patched (too short, branch
    target in its first bytes).
    """
    if not sources:
        raise BuildError("no source file given")
    for src in sources:
        if not os.path.isfile(src):
            raise BuildError(f"source file {src} does not exist")
    if version < 0:
        raise BuildError(f"version must be >= 0, not {version}")
    pname = name or Path(out).name.split(".")[0]
    tgt = open_elf(target, "target file")
    try:
        if tgt.machine not in TARGET_ARCHES or tgt.elfclass != TARGET_ARCHES[tgt.machine][0]:
            raise BuildError(
                f"target file {target} is {tgt.machine} (ELF{tgt.elfclass}), hotpatch build supports x86_64 and "
                "i386 targets"
            )
        arch_flags = TARGET_ARCHES[tgt.machine][1]
        build_id = tgt.build_id
        if build_id is None:
            raise BuildError(f"target file {target} has no GNU build-id; it cannot be identified in a process")
        with tempfile.TemporaryDirectory(prefix="hotpatch-build-") as tmp:
            so = _compile_and_link(sources, tmp, extra_flags or [], arch_flags)
            binary = PatchBinary(Path(so).read_bytes(), so)
            if binary.arch != tgt.machine:
                raise BuildError(f"the compiler made a {binary.arch} object for the {tgt.machine} target {target}")
            if binary.has_constructors:
                raise BuildError("the sources have static constructors, which hotpatch does not run")
            notes: list[str] = []
            replaced = _replaced_functions(binary, tgt, target, ordinary_sites, functions, allow_clones, notes)
            manifest = Manifest(
                name=pname,
                version=version,
                arch=tgt.machine,
                build_id=build_id,
                file=Path(target).name,
                functions=replaced,
                content_sha256=binary.content_sha256,
            )
            manifest.validate(out)
            mpath = os.path.join(tmp, "manifest.json")
            Path(mpath).write_bytes(manifest.to_json())
            final = os.path.join(tmp, "patch.so")
            _run(
                [
                    "objcopy",
                    "--add-section",
                    f"{SECTION}={mpath}",
                    "--set-section-flags",
                    f"{SECTION}=readonly,contents",
                    so,
                    final,
                ],
                "objcopy",
            )
            shutil.copyfile(final, out)
    finally:
        tgt.close()
    return BuildResult(out, manifest, tuple(notes))


def _compile_and_link(sources: list[str], tmp: str, extra: list[str], arch_flags: list[str]) -> str:
    """Compile each source and link them into ``tmp``/patch-code.so; ``arch_flags`` (``-m32`` for i386) go to
    every compiler and linker call. Raises BuildError with the compiler's first error line."""
    cxx = any(Path(s).suffix in CXX_SUFFIXES for s in sources)
    objs = []
    for i, src in enumerate(sources):
        compiler = "g++" if Path(src).suffix in CXX_SUFFIXES else "gcc"
        obj = os.path.join(tmp, f"{i}.o")
        cmd = [compiler, *arch_flags, *COMPILE_FLAGS, "-I", include_dir(), *extra, "-c", src, "-o", obj]
        _run(cmd, f"compiling {src}")
        objs.append(obj)
    so = os.path.join(tmp, "patch-code.so")
    _run(["g++" if cxx else "gcc", *arch_flags, *LINK_FLAGS, "-o", so, *objs, "-lgcc"], "linking the patch")
    return so


def _chosen(binary: PatchBinary, target_funcs: dict[str, Symbol], target: str, wanted: list[str] | None) -> list[str]:
    """The target symbols the patch replaces: every function both define, or the ``wanted`` ones (mangled
    or demangled names, :func:`hotpatch.elf.cxxnames.find_symbol`), each of which the sources must define.

    By default a weak definition of the sources is not a replacement: g++ emits inline functions (a class's
    implicit destructor, templates) as weak copies in every object using them, not as fixes; ``wanted``
    may name one."""
    defined = {s.name for s in binary.symbols.values() if s.kind == "func"}
    if wanted is None:
        strong = {s.name for s in binary.symbols.values() if s.kind == "func" and s.binding == "global"}
        return sorted(strong & target_funcs.keys())
    out = []
    for name in wanted:
        sym = find_symbol(name, target_funcs, target)
        if sym not in defined:
            raise BuildError(f"the sources do not define {name} ({sym}); a replacement must have the same symbol")
        out.append(sym)
    return sorted(set(out))


def _replaced_functions(
    binary: PatchBinary,
    tgt_image: ElfImage,
    target: str,
    ordinary_sites: bool = False,
    wanted: list[str] | None = None,
    allow_clones: bool = False,
    notes: list[str] | None = None,
) -> tuple[Function, ...]:
    """The manifest entries of the target's functions the patch replaces (:func:`_chosen`), each with its
    site class and analysis decided here, with the whole target file at hand
    (:func:`hotpatch.scan.classify_symbol`), and its vtable slots; ``ordinary_sites`` forces the 5-byte jump
    of an ordinary site everywhere."""
    from ..elf.ranges import function_ranges

    target_funcs = tgt_image.function_symbols()
    build_id = tgt_image.build_id
    debug = open_debug_file(build_id) if build_id else None
    vtables = vtable_symbols(tgt_image)
    if debug is not None:  # a stripped target's functions and vtables are named by its separate debug file
        try:
            for n, sym in debug.function_symbols().items():
                target_funcs.setdefault(n, sym)
            vtables = vtable_symbols(tgt_image, debug)
        finally:
            debug.close()
    ranges = function_ranges(tgt_image)
    chosen = _chosen(binary, target_funcs, target, wanted)

    def whole(base: str, clone: str) -> bool:
        a, b = target_funcs[base], target_funcs[clone]
        if not a.size or a.size != b.size or "ifunc" in (a.kind, b.kind):
            return False
        code_a, code_b = tgt_image.read_vaddr(a.value, a.size), tgt_image.read_vaddr(b.value, b.size)
        return same_code(code_a, a.value, code_b, b.value, tgt_image.bitness)

    found, copies = check_clones(chosen, target_funcs, target, allow_clones, whole)
    if notes is not None:
        notes += found
    chosen = sorted([*chosen, *copies])
    slots = vtable_slots(tgt_image, {target_funcs[n].value for n in chosen}, vtables)
    out: list[Function] = []
    for name in chosen:
        orig = target_funcs[name]
        if orig.size == 0:
            raise BuildError(f"{pretty(name)} has no size in {target}'s symbol table; cannot check its bytes")
        if orig.kind == "ifunc":  # its resolver: the implementation is the one each target resolved (apply)
            sha = hashlib.sha256(tgt_image.read_vaddr(orig.value, orig.size)).hexdigest()
            out.append(Function(name, orig.value, orig.size, sha, klass=IFUNC))
            continue
        try:
            vt = tuple(slots.get(orig.value, ()))
            desc = describe(tgt_image, ranges, name, orig, pretty(name), ordinary_sites, vt)
            out.append(desc._replace(replacement=copies.get(name, "")))
        except HotpatchError as e:
            raise type(e)(f"cannot patch {target}: {e}") from None
    if not out:
        raise BuildError(f"the sources define no function of {target} (a replacement must have the same symbol)")
    return tuple(out)

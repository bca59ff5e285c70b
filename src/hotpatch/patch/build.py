"""``hotpatch build``: compile replacement sources into one patch file.

The sources are compiled by the system gcc/g++ into a position-independent shared object, linked without
start files (hotpatch never runs a patch's constructors) and with ``-z now`` (every relocation is resolved by
hotpatch's loader at apply time). A function the sources define with the same symbol as a function of the
target file replaces it. The manifest (see :mod:`.manifest`) is added with ``objcopy --add-section``.
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

from ..elf.image import ElfImage, open_elf
from ..errors import BuildError, HotpatchError
from ..x86 import prologue
from .bundle import PatchBinary
from .manifest import SECTION, Function, Manifest, analysis_digest

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


class BuildResult(NamedTuple):
    """What ``build`` wrote: the output path and its manifest."""

    path: str
    manifest: Manifest


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
) -> BuildResult:
    """Compile ``sources`` into the patch file ``out`` for the module file ``target``.

    ``name`` defaults to ``out``'s file name without its suffix; ``version`` is an integer >= 0.
    Raises BuildError for compiler failures, a target without build-id, or sources that replace nothing;
    SiteError when a replaced function cannot be patched (too short, branch target in its first bytes).
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
        if tgt.machine != "x86_64" or tgt.elfclass != 64:
            raise BuildError(f"target file {target} is {tgt.machine}, hotpatch build supports x86_64 targets")
        build_id = tgt.build_id
        if build_id is None:
            raise BuildError(f"target file {target} has no GNU build-id; it cannot be identified in a process")
        with tempfile.TemporaryDirectory(prefix="hotpatch-build-") as tmp:
            so = _compile_and_link(sources, tmp, extra_flags or [])
            binary = PatchBinary(Path(so).read_bytes(), so)
            if binary.has_constructors:
                raise BuildError("the sources have static constructors, which hotpatch does not run")
            functions = _replaced_functions(binary, tgt, target)
            manifest = Manifest(
                name=pname,
                version=version,
                arch="x86_64",
                build_id=build_id,
                file=Path(target).name,
                functions=functions,
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
    return BuildResult(out, manifest)


def _compile_and_link(sources: list[str], tmp: str, extra: list[str]) -> str:
    cxx = any(Path(s).suffix in CXX_SUFFIXES for s in sources)
    objs = []
    for i, src in enumerate(sources):
        compiler = "g++" if Path(src).suffix in CXX_SUFFIXES else "gcc"
        obj = os.path.join(tmp, f"{i}.o")
        _run([compiler, *COMPILE_FLAGS, "-I", include_dir(), *extra, "-c", src, "-o", obj], f"compiling {src}")
        objs.append(obj)
    so = os.path.join(tmp, "patch-code.so")
    _run(["g++" if cxx else "gcc", *LINK_FLAGS, "-o", so, *objs, "-lgcc"], "linking the patch")
    return so


def _replaced_functions(binary: PatchBinary, tgt_image: ElfImage, target: str) -> tuple[Function, ...]:
    target_funcs = tgt_image.function_symbols()
    out = []
    for sym in sorted(binary.symbols.values(), key=lambda s: s.name):
        if sym.kind != "func" or sym.name not in target_funcs:
            continue
        orig = target_funcs[sym.name]
        if orig.kind == "ifunc":
            raise BuildError(f"{sym.name} is an IFUNC in {target}; patching IFUNCs is not supported yet")
        if orig.size == 0:
            raise BuildError(f"{sym.name} has no size in {target}'s symbol table; cannot check its bytes")
        code = tgt_image.read_vaddr(orig.value, orig.size)
        try:
            pro = prologue.analyze(sym.name, orig.value, code)
        except HotpatchError as e:
            raise type(e)(f"cannot patch {target}: {e}") from None
        sha = hashlib.sha256(code).hexdigest()
        desc = (pro.site - pro.entry, pro.lengths, pro.position_dependent)
        out.append(Function(sym.name, orig.value, orig.size, sha, *desc, analysis_digest(sha, *desc)))
    if not out:
        raise BuildError(f"the sources define no function of {target} (a replacement must have the same symbol)")
    return tuple(out)

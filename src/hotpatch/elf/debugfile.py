"""Separate debug files, found by build-id.

Distributions strip ``.symtab`` from what they ship and put it, with the DWARF, in a separate file named after
the module's GNU build-id: ``/usr/lib/debug/.build-id/<first 2 hex digits>/<the rest>.debug`` (GDB manual,
"Separate Debug Files", the build-id method; Debian's ``*-dbg``/``*-dbgsym`` packages, e.g. ``libc6-dbg``).
``HOTPATCH_DEBUG_DIR`` replaces ``/usr/lib/debug`` (as GDB's ``debug-file-directory`` does). Its ``.symtab``
has the module's link-time addresses: static functions and variables, and the names of
IFUNC implementations (``__strlen_avx2``). Its allocated sections are SHT_NOBITS, so only ``.symtab`` is read.
"""

from __future__ import annotations

import os

from ..errors import HotpatchError
from .image import ElfImage, open_elf

DEBUG_DIR = "/usr/lib/debug"


def debug_file_path(build_id: str, root: str | None = None) -> str | None:
    """The path of the debug file of the module with GNU build-id ``build_id`` (hex) under ``root`` (default:
    ``$HOTPATCH_DEBUG_DIR``, else DEBUG_DIR), or None when there is none."""
    if len(build_id) < 3:
        return None
    root = root or os.environ.get("HOTPATCH_DEBUG_DIR") or DEBUG_DIR
    path = os.path.join(root, ".build-id", build_id[:2], build_id[2:] + ".debug")
    return path if os.path.isfile(path) else None


def open_debug_file(build_id: str, root: str | None = None) -> ElfImage | None:
    """The debug file of ``build_id`` opened, when one exists, is ELF, has a ``.symtab`` and carries the same
    build-id; else None (a debug file is optional, never an error)."""
    path = debug_file_path(build_id, root)
    if path is None:
        return None
    try:
        img = open_elf(path, "debug file")
    except HotpatchError:
        return None
    try:
        if img.has_symtab and img.build_id == build_id:
            return img
    except HotpatchError:
        pass
    img.close()
    return None

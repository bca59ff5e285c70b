"""The manifest of a patch: what it replaces, in which build, and its identity.

Stored as UTF-8 JSON in the ELF section ``.hotpatch.manifest`` of the patch file (a non-allocated section:
never mapped into a target). Fields follow seed 004's registry entries (symbol, version) plus what a safe
apply needs (target build-id, each function's size and the SHA-256 of its bytes in the target file).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, NamedTuple

from ..errors import PatchFileError

SECTION = ".hotpatch.manifest"
FORMAT = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class Function(NamedTuple):
    """A replaced function: its ``symbol``, link-time address ``value`` and ``size`` (bytes) in the target
    module, and ``sha256`` of those ``size`` bytes in the target file. The build-time site analysis
    (:func:`hotpatch.x86.prologue.analyze`) rides along: ``site_offset`` (0, or 4 after ``endbr64``), the
    ``lengths`` of the overwritten instructions, and whether they are ``position_dependent``; ``apply`` reuses
    it once the hash proved the bytes are the same. ``slots``: the link-time addresses of the vtable words that
    hold the function's address (:func:`hotpatch.elf.vtables.vtable_slots`), redirected with it.
    ``replacement``: the patch's function calls go to when it is not ``symbol`` (a compiler clone that is a whole
    copy of a replaced function, :mod:`hotpatch.patch.clones`)."""

    symbol: str
    value: int
    size: int
    sha256: str
    site_offset: int = 0
    lengths: tuple[int, ...] = ()
    position_dependent: bool = True
    analysis: str = ""  # analysis_digest() of the above as build wrote it
    klass: str = "ordinary"  # the site class (hotpatch.x86.sites), decided with the whole target file at hand
    padding: str = ""  # hex of the 5 bytes before the entry in the target file (short-jump classes only)
    slots: tuple[int, ...] = ()  # link-time addresses of the vtable words holding its address (elf.vtables)
    replacement: str = ""  # the patch's symbol calls go to, when not ``symbol`` (a clone: patch/clones.py)

    @property
    def analysis_trusted(self) -> bool:
        """True when the site description is the one ``build`` bound to ``sha256``; a damaged, hand-edited or
        older manifest is not trusted and ``apply`` analyses the function's bytes afresh (as an ordinary
        site: the other classes need the file around the function)."""
        return bool(self.lengths) and self.analysis == analysis_digest(
            self.sha256, self.site_offset, self.lengths, self.position_dependent, self.klass, self.padding
        )


def analysis_digest(
    sha256: str,
    site_offset: int,
    lengths: tuple[int, ...],
    position_dependent: bool,
    klass: str = "ordinary",
    padding: str = "",
) -> str:
    """SHA-256 binding a build-time site description to the hash of the function's bytes (the class and
    padding are bound only for short-jump classes, so ordinary digests of older builds stay valid)."""
    doc: list[Any] = [sha256, site_offset, list(lengths), position_dependent]
    if klass != "ordinary":
        doc += [klass, padding]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


class Manifest(NamedTuple):
    """Everything ``apply`` checks before it writes a byte.

    ``name``/``version``: the patch's identity (a newer version replaces an older one); ``build_id``/``file``:
    the target module; ``functions``: the replaced functions; ``content_sha256``: hash of the patch's
    loadable bytes, so a damaged file is refused.
    """

    name: str
    version: int
    arch: str
    build_id: str
    file: str
    functions: tuple[Function, ...]
    content_sha256: str

    def to_json(self) -> bytes:
        """Serialize (stable key order) for the manifest section."""
        doc = {**self._asdict(), "functions": [f._asdict() for f in self.functions], "format": FORMAT}
        return json.dumps(doc, sort_keys=True, indent=1).encode()

    @staticmethod
    def from_json(raw: bytes, where: str) -> Manifest:
        """Parse and validate; raises PatchFileError naming ``where`` and the bad field."""
        try:
            doc = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PatchFileError(f"{where}: the manifest is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise PatchFileError(f"{where}: the manifest is not a JSON object")
        if doc.get("format") != FORMAT:
            raise PatchFileError(f"{where}: unsupported manifest format {doc.get('format')!r}")
        try:
            funcs = tuple(
                Function(
                    **{
                        **_fields(f, Function),
                        "lengths": tuple(f.get("lengths", ())),
                        "slots": tuple(f.get("slots", ())),
                    }
                )
                for f in doc["functions"]
            )
            man = Manifest(**{**_fields(doc, Manifest), "functions": funcs})
        except (KeyError, TypeError) as e:
            raise PatchFileError(f"{where}: the manifest lacks or mistypes a field ({e})") from None
        man.validate(where)
        return man

    def validate(self, where: str) -> None:
        """Check field types and ranges; raises PatchFileError."""
        ok = (
            isinstance(self.name, str)
            and NAME_RE.match(self.name) is not None
            and isinstance(self.version, int)
            and not isinstance(self.version, bool)
            and self.version >= 0
            and isinstance(self.build_id, str)
            and re.fullmatch(r"[0-9a-f]{8,128}", self.build_id) is not None
            and isinstance(self.arch, str)
            and bool(self.functions)
            and all(
                isinstance(f.symbol, str)
                and f.symbol
                and isinstance(f.value, int)
                and isinstance(f.size, int)
                and f.size > 0
                and isinstance(f.sha256, str)
                and f.site_offset in (0, 4)
                and all(isinstance(n, int) and 0 < n <= 15 for n in f.lengths)
                and isinstance(f.position_dependent, bool)
                and isinstance(f.analysis, str)
                and isinstance(f.klass, str)
                and isinstance(f.padding, str)
                and re.fullmatch(r"([0-9a-f]{10})?", f.padding) is not None
                and all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in f.slots)
                and isinstance(f.replacement, str)
                for f in self.functions
            )
        )
        if not ok:
            raise PatchFileError(f"{where}: the manifest has an invalid field")


def _fields(doc: Any, cls: type[Function] | type[Manifest]) -> dict[str, Any]:
    """The fields of ``cls`` found in ``doc``; KeyError for a missing field without a default."""
    if not isinstance(doc, dict):
        raise TypeError("not an object")
    out = {}
    for name in cls._fields:
        if name in doc:
            out[name] = doc[name]
        elif name not in cls._field_defaults:
            raise KeyError(name)
    return out

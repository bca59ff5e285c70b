"""The Ed25519 signature a patch file carries, so a patch copied by hand is checked as one fetched through TUF.

Layout: the patch's ELF bytes, then a trailer ELF readers never look at (nothing in the ELF headers points past
the section headers): the UTF-8 JSON ``{"keyid": …, "sig": …}`` (securesystemslib's ``Signature``: the key's
TUF key id and the hex Ed25519 signature, RFC 8032) followed by 16 bytes, ``MAGIC`` and the JSON's length as
a little-endian u64. What is signed is the SHA-256 of the ELF bytes (every byte before the trailer), with the
domain prefix ``DOMAIN`` so the signature cannot stand for anything else a key signs.

Whether a signature is *required* is the caller's decision (:mod:`hotpatch.registry.trust`): a host that trusts
a repository accepts only patches signed by that repository's targets keys.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from typing import NamedTuple

from ..errors import PatchFileError

MAGIC = b"HPSIG001"
TRAILER = struct.Struct("<8sQ")
DOMAIN = b"hotpatch patch file v1\0"
MAX_JSON = 4096


class Signed(NamedTuple):
    """A patch file split: its ``elf`` bytes and, when it carries one, the ``keyid`` and hex ``sig``."""

    elf: bytes
    keyid: str = ""
    sig: str = ""


def split(data: bytes, where: str) -> Signed:
    """Separate the ELF bytes of a patch file from its signature trailer (absent: empty keyid). Raises
    PatchFileError for a damaged trailer."""
    if len(data) < TRAILER.size or data[-TRAILER.size : -TRAILER.size + len(MAGIC)] != MAGIC:
        return Signed(data)
    _, n = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    if not 0 < n <= MAX_JSON or n > len(data) - TRAILER.size:
        raise PatchFileError(f"{where}: its signature trailer is damaged")
    start = len(data) - TRAILER.size - n
    try:
        doc = json.loads(data[start : start + n].decode())
        keyid, sig = str(doc["keyid"]), str(doc["sig"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise PatchFileError(f"{where}: its signature trailer is damaged") from None
    return Signed(data[:start], keyid, sig)


def digest(elf: bytes) -> bytes:
    """What a patch signature signs: DOMAIN + SHA-256 of the ELF bytes."""
    return DOMAIN + hashlib.sha256(elf).digest()


def attach(elf: bytes, keyid: str, sig: str) -> bytes:
    """The ELF bytes with the signature trailer appended."""
    doc = json.dumps({"keyid": keyid, "sig": sig}, sort_keys=True).encode()
    return elf + doc + TRAILER.pack(MAGIC, len(doc))


def verify(s: Signed, where: str, trusted: Iterable[object]) -> str:
    """Check the signature of the patch file ``s`` (:func:`split`) against the ``trusted`` keys
    (securesystemslib ``Key`` objects); returns the signing key's id. Raises PatchFileError when the file is
    unsigned, signed by a key not trusted, or the signature does not match its bytes (a changed byte)."""
    from securesystemslib.exceptions import UnverifiedSignatureError
    from securesystemslib.signer import Key, Signature

    if not s.keyid:
        raise PatchFileError(f"{where} is not signed, and this host accepts only signed patches")
    keys = {k.keyid: k for k in trusted if isinstance(k, Key)}
    key = keys.get(s.keyid)
    if key is None:
        raise PatchFileError(f"{where} is signed by key {s.keyid[:16]}…, which this host does not trust")
    try:
        key.verify_signature(Signature(s.keyid, s.sig), digest(s.elf))
    except UnverifiedSignatureError:
        raise PatchFileError(f"{where}: its signature does not match its contents (changed after signing)") from None
    return s.keyid

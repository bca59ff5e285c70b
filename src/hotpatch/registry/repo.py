"""A signed patch repository on The Update Framework (python-tuf's Metadata API; TUF specification v1.0).

Seed 004 keeps its patches in a registry (``meta.json``: symbol, version, about, file) with "no checksum, no
auth". Here the registry is a TUF repository, so a client refuses tampered, rolled back, frozen or
mix-and-matched metadata and files. Layout of a repository directory ``DIR``::

    DIR/keys/{root,targets,snapshot,timestamp}.pem   private Ed25519 keys (0600), never published
    DIR/public/metadata/1.root.json, root.json, targets.json, snapshot.json, timestamp.json
    DIR/public/targets/<name>-<version>.hp           the patch files, each signed (patch/signature.py)

``DIR/public`` is what any static HTTP server publishes (``python -m http.server -d DIR/public``). Metadata is
not consistent-snapshot (plain names: a static server needs nothing more). A target's ``custom`` metadata
carries the patch's name, version, about text, target build-id, file and functions, signed with the targets
role. Expiry: root 365 days, targets 90, snapshot 30, timestamp 1 (``refresh`` re-signs the last two).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..errors import HotpatchError
from ..patch import signature
from ..patch.bundle import PatchFile

ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY_DAYS = {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 1}


class RepoError(HotpatchError):
    """A repository directory is missing, damaged, or refuses the request."""


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _signer(repo: Path, role: str) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    path = repo / "keys" / f"{role}.pem"
    try:
        return CryptoSigner(load_pem_private_key(path.read_bytes(), None))
    except OSError:
        raise RepoError(f"{repo} is not a hotpatch repository (no {role} key in {path.parent})") from None


def _meta(repo: Path) -> Path:
    return repo / "public" / "metadata"


def _load(repo: Path, role: str) -> Any:
    from tuf.api.metadata import Metadata

    try:
        return Metadata.from_file(str(_meta(repo) / f"{role}.json"))
    except (OSError, ValueError) as e:
        raise RepoError(f"{repo}: cannot read its {role} metadata ({e})") from None


def _store(repo: Path, role: str, md: Any, bump: bool = True, days: int | None = None) -> None:
    """Give ``md`` a new version (``bump``) and expiry, sign it with the role's key, and write it."""
    from tuf.api.serialization.json import JSONSerializer

    if bump:
        md.signed.version += 1
    md.signed.expires = _now() + timedelta(days=EXPIRY_DAYS[role] if days is None else days)
    md.signatures.clear()
    md.sign(_signer(repo, role))
    data = md.to_bytes(JSONSerializer(compact=False))
    if role == "root":
        _write(_meta(repo) / f"{md.signed.version}.root.json", data)
    _write(_meta(repo) / f"{role}.json", data)


def _write(path: Path, data: bytes) -> None:
    """Write atomically (a reader sees the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _publish(repo: Path, timestamp_days: int | None = None) -> None:
    """A new snapshot naming the current targets version, then a new timestamp naming that snapshot."""
    from tuf.api.metadata import MetaFile

    targets, snapshot, timestamp = _load(repo, "targets"), _load(repo, "snapshot"), _load(repo, "timestamp")
    snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
    _store(repo, "snapshot", snapshot)
    timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
    _store(repo, "timestamp", timestamp, days=timestamp_days)


def init(directory: str) -> Path:
    """Create a repository in ``directory`` (new or empty): one Ed25519 key per top-level role, version 1 of
    every role's metadata. Returns the path of ``1.root.json``, the file clients trust first. Raises
    RepoError when ``directory`` holds anything already."""
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

    repo = Path(directory)
    if repo.exists() and any(repo.iterdir()):
        raise RepoError(f"{repo} is not empty; a repository is created in a new or empty directory")
    (repo / "keys").mkdir(parents=True, mode=0o700, exist_ok=True)
    _meta(repo).mkdir(parents=True)
    (repo / "public" / "targets").mkdir()
    root = Root(expires=_now() + timedelta(days=EXPIRY_DAYS["root"]), consistent_snapshot=False)
    for role in ROLES:
        signer = CryptoSigner.generate_ed25519()
        pem = signer.private_bytes  # PKCS#8 PEM, unencrypted (the directory is 0700, the file 0600)
        fd = os.open(repo / "keys" / f"{role}.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        root.add_key(signer.public_key, role)
    _store(repo, "root", Metadata(root), bump=False)
    _store(repo, "targets", Metadata(Targets()), bump=False)
    _store(repo, "snapshot", Metadata(Snapshot(meta={"targets.json": MetaFile(version=1)})), bump=False)
    _store(repo, "timestamp", Metadata(Timestamp(snapshot_meta=MetaFile(version=1))), bump=False)
    return _meta(repo) / "1.root.json"


def target_path(name: str, version: int) -> str:
    """The TUF target path of version ``version`` of patch ``name``."""
    return f"{name}-{version}.hp"


def add(directory: str, patch: str, about: str = "") -> tuple[str, dict[str, Any]]:
    """Sign the patch file ``patch`` with the repository's targets key and publish it with its custom metadata
    (name, version, about, build_id, file, functions). Returns (target path, custom). Raises PatchFileError
    for a file that is not a patch, RepoError when that version of that patch is published already."""
    from tuf.api.metadata import TargetFile

    repo = Path(directory)
    pf = PatchFile(patch)
    elf, man = pf.signed.elf, pf.manifest
    targets = _load(repo, "targets")
    path = target_path(man.name, man.version)
    if path in targets.signed.targets:
        raise RepoError(f"version {man.version} of patch {man.name} is already in {repo}")
    signer = _signer(repo, "targets")
    sig = signer.sign(signature.digest(elf))
    data = signature.attach(elf, sig.keyid, sig.signature)
    custom = {
        "name": man.name,
        "version": man.version,
        "about": about,
        "build_id": man.build_id,
        "file": man.file,
        "functions": [f.symbol for f in man.functions],
    }
    _write(repo / "public" / "targets" / path, data)
    target = TargetFile.from_data(path, data, ["sha256"])
    target.unrecognized_fields["custom"] = {"hotpatch": custom}
    targets.signed.targets[path] = target
    _store(repo, "targets", targets)
    _publish(repo)
    return path, custom


def remove(directory: str, name: str) -> list[str]:
    """Withdraw every version of patch ``name``; returns the target paths removed. Raises RepoError when the
    repository has no such patch."""
    repo = Path(directory)
    targets = _load(repo, "targets")
    gone = [p for p, t in targets.signed.targets.items() if _custom(t).get("name") == name]
    if not gone:
        raise RepoError(f"{repo} has no patch named {name}")
    for p in gone:
        del targets.signed.targets[p]
    _store(repo, "targets", targets)
    _publish(repo)
    for p in gone:
        (repo / "public" / "targets" / p).unlink(missing_ok=True)
    return gone


def refresh(directory: str, timestamp_days: int | None = None) -> None:
    """Re-sign snapshot and timestamp with new versions and expiry (a timestamp expires after a day; run this
    daily, e.g. from cron). ``timestamp_days`` overrides the timestamp's lifetime (0: expired at once, for
    tests of expiry)."""
    _publish(Path(directory), timestamp_days)


def keys(directory: str) -> dict[str, list[str]]:
    """The key ids trusted for each top-level role, from the repository's root metadata."""
    root = _load(Path(directory), "root").signed
    return {role: list(root.roles[role].keyids) for role in ROLES}


def _custom(target: Any) -> dict[str, Any]:
    custom = target.unrecognized_fields.get("custom", {})
    hp = custom.get("hotpatch", {}) if isinstance(custom, dict) else {}
    return hp if isinstance(hp, dict) else {}


def published(directory: str) -> list[dict[str, Any]]:
    """The custom metadata of every published patch (the repository's own view, unverified: for ``repo``
    commands; clients verify through :mod:`hotpatch.registry.client`)."""
    targets = _load(Path(directory), "targets")
    return [_custom(t) for t in targets.signed.targets.values()]

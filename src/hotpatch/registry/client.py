"""The client side of a patch repository: trust, ``update`` through TUF, ``list``, and the keys patches must be
signed with on this host.

State lives under the hotpatch home (``$HOTPATCH_HOME``, default ``/var/lib/hotpatch``)::

    HOME/trust/root.json   the root metadata this host trusts first (given once with ``update --root``)
    HOME/repo              the repository's location (URL or directory), remembered from the last ``update``
    HOME/metadata/         TUF's verified metadata cache (ngclient)
    HOME/targets/          the patch files downloaded and verified

``update`` runs TUF's client workflow (python-tuf ``ngclient.Updater``, TUF specification §5): every role's
signatures against the keys and thresholds of the trusted root, versions never going back (rollback), expiry
(freeze), the snapshot and timestamp naming the versions and hashes of what they cover (mix-and-match), and
every patch file's length and SHA-256 (tamper). It reads the repository every time it runs: nothing is taken
from the cache unverified (seed 004's cache was never re-read).

Once a host trusts a repository, every patch ``apply`` reads — fetched or copied by hand — must carry a valid
signature by one of the repository's targets keys (:func:`signing_keys`, :mod:`hotpatch.patch.signature`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

from ..errors import HotpatchError
from ..patch import signature
from ..patch.bundle import PatchFile

DEFAULT_HOME = "/var/lib/hotpatch"


class RepoTrustError(HotpatchError):
    """The repository's metadata or files do not verify, or no trusted root is set up."""


class Published(NamedTuple):
    """A patch the repository publishes: its ``target`` path, ``name``, ``version``, target ``build_id`` and
    ``file``, ``functions`` and ``about`` text (the signed custom metadata), and ``path`` of the verified copy."""

    target: str
    name: str
    version: int
    build_id: str
    file: str
    functions: list[str]
    about: str
    path: str


def home() -> Path:
    """The hotpatch home directory (``$HOTPATCH_HOME``, else DEFAULT_HOME)."""
    return Path(os.environ.get("HOTPATCH_HOME") or DEFAULT_HOME)


def _fetcher_class() -> Any:
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import FetcherInterface

    class DirectoryFetcher(FetcherInterface):
        """Reads ``file://`` URLs: a repository in a local directory, verified exactly as one served by HTTP."""

        def _fetch(self, url: str) -> Iterator[bytes]:
            path = urlparse(url).path
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise DownloadHTTPError(f"{path} not found", 404) from None
            yield data

    return DirectoryFetcher


def _base(repo: str) -> tuple[str, Any]:
    """The repository's base URL and the fetcher for it: ``http(s)://`` through urllib3 (TUF's default), a
    directory (its ``public`` subdirectory when it is a repository made by ``repo init``) as ``file://``."""
    if urlparse(repo).scheme in ("http", "https"):
        return repo.rstrip("/"), None
    path = Path(repo)
    if (path / "public" / "metadata").is_dir():
        path = path / "public"
    if not (path / "metadata").is_dir():
        raise RepoTrustError(f"{repo} is neither an http(s) URL nor a repository directory")
    return "file://" + str(path.resolve()), _fetcher_class()()


def _updater(repo: str, trusted_root: bytes) -> Any:
    from tuf.ngclient import Updater

    h = home()
    for d in ("metadata", "targets"):
        (h / d).mkdir(parents=True, exist_ok=True)
    base, fetcher = _base(repo)
    return Updater(
        str(h / "metadata"),
        base + "/metadata/",
        str(h / "targets"),
        base + "/targets/",
        fetcher,
        bootstrap=trusted_root,
    )


def update(repo: str | None = None, root: str | None = None) -> list[Published]:
    """Refresh the verified copy of the repository ``repo`` (default: the one of the last update) and fetch
    every patch it publishes; ``root``: a root metadata file to trust from now on (needed the first time).
    Returns the patches. Raises RepoTrustError naming what did not verify (nothing is kept from it)."""
    from tuf.api import exceptions as tuf_errors

    h = home()
    trust = h / "trust" / "root.json"
    if root is not None:
        try:
            data = Path(root).read_bytes()
        except OSError as e:
            raise RepoTrustError(f"cannot read root metadata {root}: {e.strerror}") from None
        trust.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(h / "metadata", ignore_errors=True)  # a new trust anchor starts a new cache
        trust.write_bytes(data)
    if not trust.is_file():
        raise RepoTrustError(f"no trusted root in {trust.parent}; give the repository's 1.root.json with --root")
    if repo is None:
        try:
            repo = (h / "repo").read_text().strip()
        except OSError:
            raise RepoTrustError("no repository given (--repo) and none remembered from an earlier update") from None
    what = f"the repository {repo}"
    try:
        updater = _updater(repo, trust.read_bytes())
        updater.refresh()
        out = []
        for target in _targets(h).values():
            what = f"patch file {target} of {repo}"
            info = updater.get_targetinfo(target)
            if info is None:
                continue
            path = updater.find_cached_target(info) or updater.download_target(info)
            out.append(_published(target, info, path))
    except tuf_errors.RepositoryError as e:
        raise RepoTrustError(f"{what} did not verify: {type(e).__name__}: {e}") from None
    except (tuf_errors.DownloadError, OSError) as e:
        raise RepoTrustError(f"cannot read the repository {repo}: {e}") from None
    (h / "repo").write_text(repo + "\n")
    return out


def _targets(h: Path) -> dict[str, str]:
    """The target paths of the verified targets metadata ngclient keeps in the cache (path -> path)."""
    from tuf.api.metadata import Metadata, Targets

    md = Metadata[Targets].from_file(str(h / "metadata" / "targets.json"))
    return {p: p for p in md.signed.targets}


def _published(target: str, info: Any, path: str) -> Published:
    custom = info.unrecognized_fields.get("custom", {}).get("hotpatch", {})
    return Published(
        target,
        str(custom.get("name", "")),
        int(custom.get("version", 0)),
        str(custom.get("build_id", "")),
        str(custom.get("file", "")),
        [str(f) for f in custom.get("functions", [])],
        str(custom.get("about", "")),
        path,
    )


def cached() -> list[Published]:
    """The patches of the last successful ``update`` (read from the verified cache, no network). Raises
    RepoTrustError when there was none."""
    from tuf.api.metadata import Metadata, Targets
    from tuf.api.serialization import DeserializationError

    h = home()
    path = h / "metadata" / "targets.json"
    try:
        if not path.is_file():
            raise OSError
        md = Metadata[Targets].from_file(str(path))
    except (OSError, ValueError, DeserializationError):
        raise RepoTrustError(f"no repository has been read yet ({h}); run 'hotpatch update --repo …'") from None
    return [_published(p, t, str(h / "targets" / p)) for p, t in sorted(md.signed.targets.items())]


def signing_keys() -> list[Any] | None:
    """The keys patches must be signed with on this host: the targets keys of the newest verified root (or of
    the trusted root before any update); None when this host trusts no repository (signatures not required).
    Raises RepoTrustError when it trusts one whose root cannot be read (no patch is accepted then)."""
    from tuf.api.metadata import Metadata, Root

    h = home()
    from tuf.api.serialization import DeserializationError

    trust = h / "trust" / "root.json"
    if not trust.is_file():
        return None
    for path in (h / "metadata" / "root.json", trust):
        if not path.is_file():
            continue
        try:
            root = Metadata[Root].from_file(str(path)).signed
        except (OSError, ValueError, DeserializationError):
            continue
        return [root.keys[k] for k in root.roles["targets"].keyids]
    raise RepoTrustError(f"the trusted root metadata in {trust.parent} cannot be read; give it again with --root")


def check_signature(pf: PatchFile) -> None:
    """Refuse the patch file ``pf`` unless this host trusts no repository or it carries a valid signature by a
    trusted targets key. Raises PatchFileError."""
    keys = signing_keys()
    if keys is not None:
        signature.verify(pf.signed, pf.where, keys)


def repository_id() -> str:
    """The identity of the repository this host trusts: the first 16 hex digits of the SHA-256 of its trusted
    root metadata (HOME/trust/root.json); "" when it trusts none. Recorded with each patch the repository's
    patches are applied with, so the agent reverts only those."""
    import hashlib

    try:
        return hashlib.sha256((home() / "trust" / "root.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def newest_for(build_ids: set[str], patches: list[Published]) -> list[Published]:
    """For each patch name published for one of ``build_ids``, its newest version."""
    best: dict[tuple[str, str], Published] = {}
    for p in patches:
        key = (p.name, p.build_id)
        if p.build_id in build_ids and (key not in best or p.version > best[key].version):
            best[key] = p
    return sorted(best.values(), key=lambda p: (p.name, p.build_id))


_BUILD_IDS: dict[tuple[str, int, int, int], str | None] = {}  # (path, dev, inode, mtime) -> build-id


def build_ids_of(pid: int, names: set[str] | None = None) -> set[str]:
    """The GNU build-ids of the ELF files process ``pid`` maps (only those whose file name is in ``names``, when
    given); unreadable ones skipped. Each file's build-id is read once per (device, inode, mtime)."""
    from ..elf.image import open_elf
    from ..every import mapped_paths

    out: set[str] = set()
    paths = mapped_paths(pid)
    for path in paths:
        if names is not None and os.path.basename(path) not in names:
            continue
        real = f"/proc/{pid}/root{path}"
        try:
            st = os.stat(real)
        except OSError:
            continue
        key = (path, st.st_dev, st.st_ino, st.st_mtime_ns)
        if key not in _BUILD_IDS:
            try:
                img = open_elf(real, "module")
            except HotpatchError:
                _BUILD_IDS[key] = None
                continue
            try:
                _BUILD_IDS[key] = img.build_id
            except HotpatchError:
                _BUILD_IDS[key] = None
            finally:
                img.close()
        build_id = _BUILD_IDS[key]
        if build_id:
            out.add(build_id)
    return out

"""Errors raised by hotpatch.

Every error carries a one-line message that names the problem (DESIGN.md §6, invariant 6). The CLI prints
it as ``hotpatch: error: <message>`` and exits non-zero; nothing in the target has been changed when one of
these is raised before a commit, and a failed commit restores every byte it wrote (invariant 3).
"""

from __future__ import annotations


class HotpatchError(Exception):
    """Base of every error hotpatch reports to a user. ``str(err)`` is a single line."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class TargetError(HotpatchError):
    """The target process cannot be used: gone, not traceable, exited mid-way, wrong architecture."""


class PatchFileError(HotpatchError):
    """A patch file is unreadable, corrupt, truncated, or built for another architecture."""


class BuildError(HotpatchError):
    """``hotpatch build`` could not produce a patch (compiler error, unknown target, bad sources)."""


class MismatchError(HotpatchError):
    """The target is not the build the patch was made for, or a site's bytes differ from the manifest."""


class SiteError(HotpatchError):
    """A site cannot be patched safely: function too short, branch target or call in the overwritten bytes."""


class SymbolError(HotpatchError):
    """A symbol the patch needs cannot be resolved in the target."""


class StateError(HotpatchError):
    """The record of applied patches inside the target forbids the request (already up to date, unknown name)."""


class UpToDateError(StateError):
    """A patch with the same name and the same or a newer version is already applied (seed 004's rule)."""

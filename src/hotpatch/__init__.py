"""hotpatch: live-patch functions of running Linux x86-64 processes.

``hotpatch.attach(pid)`` opens a process and returns a :class:`~hotpatch.api.Target` with ``apply(patch)``,
``revert(name)`` and ``status()``; :class:`~hotpatch.transaction.Transaction` is the all-or-nothing set of
site changes underneath. The command line is ``hotpatch`` (:mod:`hotpatch.cli`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["HotpatchError", "PatchFile", "Target", "Transaction", "attach"]

if TYPE_CHECKING:
    from .api import Target, attach
    from .errors import HotpatchError
    from .patch.bundle import PatchFile
    from .transaction import Transaction


def __getattr__(name: str) -> Any:
    # lazy: `hotpatch --help` must not pay for importing pyelftools and iced-x86
    if name in ("attach", "Target"):
        from . import api

        return getattr(api, name)
    if name == "Transaction":
        from .transaction import Transaction

        return Transaction
    if name == "PatchFile":
        from .patch.bundle import PatchFile

        return PatchFile
    if name == "HotpatchError":
        from .errors import HotpatchError

        return HotpatchError
    raise AttributeError(name)

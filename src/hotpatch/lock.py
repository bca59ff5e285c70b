"""One hotpatch at a time per target: an exclusive ``flock(2)`` on ``$TMPDIR/hotpatch-PID.lock``.

The file is removed by the holder before it lets go, so lock files do not pile up (one per PID ever patched).
A waiter may then hold the lock of a file no longer at that path (it opened it before the removal): after
taking the lock it checks that the path still names the file it locked (same device and inode, ``fstat`` against
``stat``) and otherwise starts again with the file now there. A holder killed by SIGKILL leaves its file (the
kernel drops the lock); the next holder removes it.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from .errors import TargetError

POLL_S = 0.01  # between two tries of a lock held by another hotpatch


def lock_path(pid: int) -> str:
    """The lock file of target ``pid``: ``$TMPDIR`` (default /tmp) ``/hotpatch-PID.lock``."""
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hotpatch-{pid}.lock")


@contextmanager
def target_lock(pid: int, timeout_s: float) -> Iterator[None]:
    """Hold the lock of target ``pid`` for the ``with`` block, waiting up to ``timeout_s`` seconds for another
    hotpatch to finish. Raises TargetError when it does not within that time; OSError when the lock file
    cannot be created."""
    path = lock_path(pid)
    deadline = time.monotonic() + timeout_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TargetError(f"another hotpatch is working on PID {pid}") from None
                    time.sleep(POLL_S)
            mine = os.fstat(fd)
            try:
                there = os.stat(path)
                current = (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # the holder removed it while this one waited: take the file at the path now
    try:
        yield
    finally:
        with suppress(OSError):
            os.unlink(path)
        os.close(fd)

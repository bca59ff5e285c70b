"""Reading and writing a target's memory through ``/proc/PID/mem``.

``/proc/PID/mem`` writes use ``FOLL_FORCE``, so read-only text can be written (``fs/proc/base.c:mem_rw``).
Each ``write`` is one ``pwrite`` system call: it cannot be split by the death of the tool. A 1-byte write is
the only one that is atomic for a thread executing the bytes (research §2.1); wider writes are made only
while no thread can execute them.
"""

from __future__ import annotations

import errno
import os

from ..errors import TargetError


class Memory:
    """An open handle on ``/proc/PID/mem``. Raises TargetError on open or I/O failure."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TargetError(f"no process with PID {pid}") from None
        except PermissionError:
            raise TargetError(f"not permitted to access the memory of PID {pid} (ptrace access denied)") from None

    def read(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes at ``addr``. Raises TargetError if any of them is unmapped."""
        try:
            data = os.pread(self._fd, size, addr)
        except OSError as e:
            raise TargetError(f"cannot read {size} bytes at {addr:#x} in PID {self.pid}: {e.strerror}") from None
        if len(data) != size:
            raise TargetError(f"cannot read {size} bytes at {addr:#x} in PID {self.pid}: short read")
        return data

    def try_read(self, addr: int, size: int) -> bytes | None:
        """Like :meth:`read`, but None instead of an error (for scanning stacks)."""
        try:
            data = os.pread(self._fd, size, addr)
        except OSError:
            return None
        return data if len(data) == size else None

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr`` in one ``pwrite``. Raises TargetError on failure."""
        try:
            n = os.pwrite(self._fd, data, addr)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise TargetError(f"PID {self.pid} exited") from None
            raise TargetError(f"cannot write {len(data)} bytes at {addr:#x} in PID {self.pid}: {e.strerror}") from None
        if n != len(data):
            raise TargetError(f"short write of {len(data)} bytes at {addr:#x} in PID {self.pid}")

    def close(self) -> None:
        """Close the handle (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""A running thread's RIP, RSP and stack, taken without stopping it: one perf sample (perf_event_open(2)).

Each thread gets a task-clock software event (``PERF_TYPE_SOFTWARE``/``PERF_COUNT_SW_TASK_CLOCK``) counting
user space only (``exclude_kernel``), with ``PERF_SAMPLE_REGS_USER`` (SP and IP) and ``PERF_SAMPLE_STACK_USER``.
Its hrtimer fires while the thread runs on its own CPU; the interrupt handler copies the interrupted user RIP,
RSP and the stack above RSP into the event's ring buffer, a hit in kernel mode being skipped
(kernel/events/core.c ``perf_swevent_hrtimer``, ``perf_output_sample_ustack``). ``PERF_EVENT_IOC_REFRESH`` with 1
disables the event after that first sample (its ``event_limit``), so a thread is interrupted once, for the few
µs of the copy, and is never stopped. Where ptrace sees a thread at an instruction boundary, so does a sample:
the registers are those the thread resumes with.

Allowed where ptrace is (``ptrace_may_access``) and ``kernel.perf_event_paranoid`` ≤ 2 for an unprivileged
tool (Debian's default 3 admits only CAP_PERFMON); where it is not, :class:`SamplingUnavailable` is raised and
the caller stops the thread instead. ``HOTPATCH_SAMPLING=0`` in the environment turns sampling off.

Layouts: ``struct perf_event_attr``, ``struct perf_event_mmap_page`` and the ``PERF_RECORD_SAMPLE`` body from
include/uapi/linux/perf_event.h; register indices from arch/x86/include/uapi/asm/perf_regs.h.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from typing import NamedTuple

ENABLED = os.environ.get("HOTPATCH_SAMPLING", "1") != "0"
STACK_DUMP = 60000  # bytes of stack copied per sample (a record's size is a u16; a multiple of 8)
DATA_PAGES = 16  # ring buffer pages (a power of two holding one record of STACK_DUMP bytes)
PERIOD_NS = 20_000  # task-clock sample period: the thread runs this long after the event is armed

_SYS_PERF_EVENT_OPEN = 298  # x86-64 (arch/x86/entry/syscalls/syscall_64.tbl)
_PERF_FLAG_FD_CLOEXEC = 8
_PERF_TYPE_SOFTWARE, _PERF_COUNT_SW_TASK_CLOCK = 1, 1
_SAMPLE_IP, _SAMPLE_TID, _SAMPLE_REGS_USER, _SAMPLE_STACK_USER = 1 << 0, 1 << 1, 1 << 12, 1 << 13
_ATTR_DISABLED, _ATTR_EXCLUDE_KERNEL, _ATTR_EXCLUDE_HV = 1 << 0, 1 << 5, 1 << 6
_REG_SP, _REG_IP = 7, 8  # PERF_REG_X86_SP, PERF_REG_X86_IP (the same indices for 32-bit tasks)
_ATTR_SIZE = 96  # PERF_ATTR_SIZE_VER3: the first with sample_regs_user and sample_stack_user
_IOC_REFRESH = 0x2402  # _IO('$', 2)
_RECORD_SAMPLE = 9
_META_HEAD, _META_DATA_OFFSET, _META_DATA_SIZE = 1024, 1040, 1048  # struct perf_event_mmap_page
_UNAVAILABLE = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENODEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SamplingUnavailable(OSError):
    """perf events cannot sample this target (permissions, a kernel without them, HOTPATCH_SAMPLING=0)."""


class Sample(NamedTuple):
    """One thread at one instant in user mode: ``rip``, ``rsp`` and ``stack``, the bytes from ``rsp`` up as far
    as the kernel could copy them (at most STACK_DUMP; it stops at the first page it cannot read)."""

    tid: int
    rip: int
    rsp: int
    stack: bytes


def _attr() -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    sample_type = _SAMPLE_IP | _SAMPLE_TID | _SAMPLE_REGS_USER | _SAMPLE_STACK_USER
    flags = _ATTR_DISABLED | _ATTR_EXCLUDE_KERNEL | _ATTR_EXCLUDE_HV
    struct.pack_into(
        "<IIQQQQQI",
        buf,
        0,
        _PERF_TYPE_SOFTWARE,
        _ATTR_SIZE,
        _PERF_COUNT_SW_TASK_CLOCK,
        PERIOD_NS,
        sample_type,
        0,
        flags,
        1,
    )  # ... read_format, flags, wakeup_events
    struct.pack_into("<QI", buf, 80, (1 << _REG_SP) | (1 << _REG_IP), STACK_DUMP)
    return buf


def _parse(body: bytes) -> tuple[int, int, int, bytes] | None:
    """(tid, rip, rsp, stack) of a PERF_RECORD_SAMPLE body laid out for _attr's sample_type; None without
    user registers (abi 0)."""
    _ip, _pid, tid, abi = struct.unpack_from("<QIIQ", body, 0)
    if abi == 0:
        return None
    rsp, rip, size = struct.unpack_from("<QQQ", body, 24)  # regs in bit order: SP, IP
    if size == 0:
        return tid, rip, rsp, b""
    dyn = struct.unpack_from("<Q", body, 48 + size)[0]
    return tid, rip, rsp, bytes(body[48 : 48 + min(dyn, size)])


class _Event:
    __slots__ = ("buf", "fd", "tid")

    def __init__(self, tid: int, fd: int, buf: mmap.mmap) -> None:
        self.tid, self.fd, self.buf = tid, fd, buf

    def sample(self) -> Sample | None:
        """The first sample in the ring buffer, or None when none arrived yet."""
        head = struct.unpack_from("<Q", self.buf, _META_HEAD)[0]
        offset, size = struct.unpack_from("<QQ", self.buf, _META_DATA_OFFSET)
        pos = 0
        while pos + 8 <= head and pos < size:  # one record fits the buffer: no wrap-around before it
            kind, _misc, length = struct.unpack_from("<IHH", self.buf, offset + pos)
            if length < 8:
                return None
            if kind == _RECORD_SAMPLE:
                parsed = _parse(self.buf[offset + pos + 8 : offset + pos + length])
                return Sample(*parsed) if parsed else Sample(self.tid, 0, 0, b"")
            pos += length  # PERF_RECORD_THROTTLE and the like
        return None

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)


class Sampler:
    """Armed perf events, one per thread, each taking one :class:`Sample`. Use as a context manager (the
    events are closed on exit); a thread is armed with :meth:`add` and its sample collected by :meth:`poll`.

    ``len(sampler)``: the events still armed. Each costs (1 + DATA_PAGES) locked pages, so callers arm a
    window of threads at a time.
    """

    def __init__(self) -> None:
        self._events: dict[int, _Event] = {}
        self._attr = _attr()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._events)

    def add(self, tid: int) -> bool:
        """Arm a sample of thread ``tid``. False when it is gone, or when no more events can be opened or
        mapped now (fds or locked memory used up) while others are armed: wait for those. Raises
        SamplingUnavailable when the kernel refuses perf events here."""
        if not ENABLED:
            raise SamplingUnavailable(errno.EPERM, "HOTPATCH_SAMPLING=0")
        fd = _libc.syscall(_SYS_PERF_EVENT_OPEN, self._attr, tid, -1, -1, _PERF_FLAG_FD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            if err == errno.ESRCH or (err in (errno.EMFILE, errno.ENFILE) and self._events):
                return False
            raise SamplingUnavailable(err, f"perf_event_open: {os.strerror(err)}")
        try:
            buf = mmap.mmap(fd, (1 + DATA_PAGES) * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            if self._events:
                return False
            raise SamplingUnavailable(e.errno or errno.EPERM, f"perf ring buffer: {e.strerror}") from None
        if _libc.ioctl(fd, _IOC_REFRESH, 1) != 0:
            err = ctypes.get_errno()
            buf.close()
            os.close(fd)
            raise SamplingUnavailable(err, f"PERF_EVENT_IOC_REFRESH: {os.strerror(err)}")
        self._events[tid] = _Event(tid, fd, buf)
        return True

    def poll(self) -> list[Sample]:
        """The samples arrived since the last call (their events closed). A sample with ``rip`` 0 carried no
        user registers: look at that thread another way."""
        out = []
        for tid, ev in list(self._events.items()):
            s = ev.sample()
            if s is not None:
                out.append(s._replace(tid=tid))
                ev.close()
                del self._events[tid]
        return out

    def drop(self, tid: int) -> None:
        """Disarm the event of ``tid`` (gone, or looked at another way)."""
        ev = self._events.pop(tid, None)
        if ev is not None:
            ev.close()

    def close(self) -> None:
        """Disarm every event."""
        for tid in list(self._events):
            self.drop(tid)

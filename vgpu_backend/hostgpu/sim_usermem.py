"""The simulated kernel's view of user memory: ``copy_from_user``/``copy_to_user`` that
return EFAULT instead of crashing, and the process's mappings for the userptr check.

``copy_*_user`` use ``process_vm_readv``/``process_vm_writev`` on this very process, so
a bad pointer is an ``EFAULT`` from the kernel, never a segfault.  Where those calls
are forbidden (seccomp), the fallback checks the pointer against ``/proc/self/maps``
first.

The userptr check (what ``get_user_pages``/``hmm_range_fault`` would find),
:func:`first_uncovered`, parses ``/proc/self/maps`` once and tests every range against
it with numpy.  Reading that file costs ~0.3 ms, so a handful of ranges (a plain
userptr) is checked with the ``PROCMAP_QUERY`` ioctl on it instead (Linux 6.11+, one
~2 us call per VMA crossed), when the kernel has it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

import numpy as np
import numpy.typing as npt

__all__ = ["ProcessMaps", "copy_from_user", "copy_to_user", "first_uncovered",
           "query_first_uncovered"]

_libc = ctypes.CDLL(None, use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_readv = _libc.process_vm_readv
_writev = _libc.process_vm_writev
for _fn in (_readv, _writev):
    _fn.restype = ctypes.c_ssize_t
    _fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                    ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]

_use_process_vm = True

# struct procmap_query (include/uapi/linux/fs.h): size, query_flags, query_addr,
# vma_start, vma_end, vma_flags, ... 104 bytes; PROCMAP_QUERY = _IOWR('f', 17, ...)
_PROCMAP_QUERY_SIZE = 104
_PROCMAP_QUERY = (3 << 30) | (_PROCMAP_QUERY_SIZE << 16) | (ord("f") << 8) | 17
_PROCMAP_HEAD = struct.Struct("<QQQQQQ")
_VMA_READABLE = 0x1
_VMA_WRITABLE = 0x2
#: at most this many ranges are checked with PROCMAP_QUERY, more with the maps file
QUERY_MAX_RANGES = 16
_use_procmap_query = True


def _efault(what: str, addr: int, length: int) -> OSError:
    return OSError(errno.EFAULT, f"{what}: bad user address {addr:#x}+{length:#x}")


def _process_vm(fn: object, local: int, remote: int, length: int) -> bool:
    """One process_vm_{readv,writev} on ourselves; False when the call is forbidden."""
    global _use_process_vm
    liov = _Iovec(local, length)
    riov = _Iovec(remote, length)
    done = fn(os.getpid(), ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)  # type: ignore[operator]
    if done == length:
        return True
    err = ctypes.get_errno() if done < 0 else errno.EFAULT
    if err in (errno.ENOSYS, errno.EPERM):
        _use_process_vm = False
        return False
    raise _efault("process_vm", remote, length)


def copy_from_user(addr: int, length: int) -> bytes:
    """Read ``length`` bytes at user address ``addr``; ``OSError(EFAULT)`` if unmapped."""
    if length == 0:
        return b""
    if addr == 0:
        raise _efault("copy_from_user", addr, length)
    out = ctypes.create_string_buffer(length)
    if _use_process_vm and _process_vm(_readv, ctypes.addressof(out), addr, length):
        return out.raw
    if not ProcessMaps.read().covers_one(addr, length, write=False):
        raise _efault("copy_from_user", addr, length)
    return ctypes.string_at(addr, length)


def copy_to_user(addr: int, data: bytes) -> None:
    """Write ``data`` at user address ``addr``; ``OSError(EFAULT)`` if not writable."""
    if not data:
        return
    if addr == 0:
        raise _efault("copy_to_user", addr, len(data))
    src = ctypes.create_string_buffer(data, len(data))
    if _use_process_vm and _process_vm(_writev, ctypes.addressof(src), addr, len(data)):
        return
    if not ProcessMaps.read().covers_one(addr, len(data), write=True):
        raise _efault("copy_to_user", addr, len(data))
    ctypes.memmove(addr, src, len(data))


class ProcessMaps:
    """This process's accessible memory as merged, sorted intervals (one snapshot)."""

    __slots__ = ("_read", "_write")

    def __init__(self, starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64],
                 readable: npt.NDArray[np.bool_], writable: npt.NDArray[np.bool_]) -> None:
        self._read = self._merge(starts[readable], ends[readable])
        self._write = self._merge(starts[writable], ends[writable])

    @classmethod
    def read(cls) -> ProcessMaps:
        """Parse ``/proc/self/maps`` now."""
        fd = os.open("/proc/self/maps", os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(fd)
        # "start-end perms offset dev inode path" per line
        heads = [line.split(b" ", 2) for line in b"".join(chunks).splitlines()]
        bounds = b"-".join([h[0] for h in heads]).split(b"-")
        values = np.array([int(x, 16) for x in bounds], dtype=np.uint64).reshape(-1, 2)
        perms = np.frombuffer(b"".join([h[1] for h in heads]), dtype=np.uint8).reshape(-1, 4)
        user = values[:, 1] < np.uint64(1 << 63)  # [vsyscall] lies above user space
        starts = values[user, 0].astype(np.int64)
        ends = values[user, 1].astype(np.int64)
        perms = perms[user]
        return cls(starts, ends, perms[:, 0] == ord("r"), perms[:, 1] == ord("w"))

    @staticmethod
    def _merge(starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64]
               ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        if starts.size == 0:
            return starts, ends
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
        # a new interval begins where a mapping starts after everything before it ended
        reach = np.maximum.accumulate(ends)
        begin = np.ones(starts.size, dtype=bool)
        begin[1:] = starts[1:] > reach[:-1]
        idx = np.flatnonzero(begin)
        merged_ends = np.maximum.reduceat(ends, idx)
        return starts[idx], merged_ends

    def first_uncovered(self, starts: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64],
                        *, write: bool) -> int:
        """Index of the first range not entirely inside accessible (writable when
        ``write``) memory, or -1 when every range is covered (an empty range touches
        nothing: it is covered wherever it lies, as with ``PROCMAP_QUERY``)."""
        m_starts, m_ends = self._write if write else self._read
        if starts.size == 0:
            return -1
        if m_starts.size == 0:
            nonempty = np.flatnonzero(sizes > 0)
            return int(nonempty[0]) if nonempty.size else -1
        i = np.searchsorted(m_starts, starts, side="right") - 1
        inside = (sizes == 0) | ((i >= 0) & (starts + sizes <= m_ends[np.maximum(i, 0)]))
        bad = np.flatnonzero(~inside)
        return int(bad[0]) if bad.size else -1

    def covers_one(self, addr: int, length: int, *, write: bool) -> bool:
        """``[addr, addr+length)`` is entirely accessible."""
        return self.first_uncovered(np.array([addr], dtype=np.int64),
                                    np.array([length], dtype=np.int64), write=write) < 0


def query_first_uncovered(starts: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64], *,
                          write: bool) -> int | None:
    """:meth:`ProcessMaps.first_uncovered` through ``PROCMAP_QUERY``, one ioctl per VMA
    crossed; ``None`` when the kernel lacks the ioctl."""
    global _use_procmap_query
    need = _VMA_READABLE | (_VMA_WRITABLE if write else 0)
    fd = os.open("/proc/self/maps", os.O_RDONLY | os.O_CLOEXEC)
    try:
        arg = bytearray(_PROCMAP_QUERY_SIZE)
        for i, (start, size) in enumerate(zip(starts.tolist(), sizes.tolist(), strict=True)):
            addr, end = start, start + size
            while addr < end:
                _PROCMAP_HEAD.pack_into(arg, 0, _PROCMAP_QUERY_SIZE, 0, addr, 0, 0, 0)
                try:
                    fcntl.ioctl(fd, _PROCMAP_QUERY, arg, True)
                except OSError as e:
                    if e.errno == errno.ENOENT:  # no VMA contains addr
                        return i
                    if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                        _use_procmap_query = False
                        return None
                    raise
                *_, vma_end, vma_flags = _PROCMAP_HEAD.unpack_from(arg, 0)
                if vma_flags & need != need:
                    return i
                addr = vma_end
        return -1
    finally:
        os.close(fd)


def first_uncovered(starts: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64], *,
                    write: bool) -> int:
    """Index of the first range not entirely inside accessible (writable when ``write``)
    memory of this process, or -1."""
    if _use_procmap_query and starts.size <= QUERY_MAX_RANGES:
        got = query_first_uncovered(starts, sizes, write=write)
        if got is not None:
            return got
    return ProcessMaps.read().first_uncovered(starts, sizes, write=write)

"""This process's virtual memory through libc: mmap/munmap at fixed addresses, and
zero-copy numpy views of host addresses.

The alias userptr path reserves a contiguous range and maps guest-RAM file pages into
it; the batch probe needs a page-aligned scratch buffer; the compute engine and tests
look at host runs returned by :meth:`GpuMemory.resolve` through :func:`view`.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "PAGE_SIZE",
    "file_page_size",
    "map_anonymous",
    "map_file",
    "map_file_fixed",
    "reserve",
    "unmap",
    "view",
]

PAGE_SIZE: Final = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                  ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_fstatfs = _libc.fstatfs
_fstatfs.restype = ctypes.c_int
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_HUGETLBFS_MAGIC: Final = 0x958458F6  # <linux/magic.h>
_MAP_FAILED: Final = ctypes.c_void_p(-1).value
_MAP_NORESERVE: Final = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FIXED: Final = 0x10  # <sys/mman.h>, the same on every Linux architecture
_PROT_NONE: Final = 0


def _checked_mmap(addr: int | None, length: int, prot: int, flags: int, *, fd: int = -1,
                  offset: int = 0) -> int:
    result = _mmap(addr, length, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap(length={length:#x}, fd={fd}, offset={offset:#x}): "
                           f"{os.strerror(err)}")
    return int(result)


def reserve(length: int) -> int:
    """Reserve ``length`` bytes of address space (``PROT_NONE``, no memory)."""
    return _checked_mmap(None, length, _PROT_NONE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)


def map_anonymous(length: int) -> int:
    """A fresh read-write private anonymous mapping (page aligned, zero filled)."""
    return _checked_mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def map_file(length: int, fd: int, offset: int = 0, *, writable: bool = True) -> int:
    """Map ``fd`` at ``offset`` shared, anywhere; return the address."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return _checked_mmap(None, length, prot, mmap.MAP_SHARED, fd=fd, offset=offset)


def map_file_fixed(addr: int, length: int, fd: int, offset: int, *, writable: bool) -> None:
    """Map ``fd`` at ``offset`` shared at exactly ``addr`` (``MAP_FIXED``), replacing
    whatever was there (normally part of a :func:`reserve` reservation)."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    got = _checked_mmap(addr, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd=fd, offset=offset)
    if got != addr:  # pragma: no cover - MAP_FIXED either maps at addr or fails
        raise OSError(0, f"MAP_FIXED mapped at {got:#x}, not {addr:#x}")


def unmap(addr: int, length: int) -> None:
    """``munmap(addr, length)``."""
    if _munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap({addr:#x}, {length:#x}): {os.strerror(err)}")


def view(addr: int, length: int) -> npt.NDArray[np.uint8]:
    """A zero-copy, writable uint8 view of host memory ``[addr, addr+length)``.

    The caller guarantees the memory stays mapped while the view is used (for GPU runs:
    until the mapping is released or invalidated).
    """
    if length == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.ctypeslib.as_array((ctypes.c_ubyte * length).from_address(addr))


def file_page_size(fd: int) -> int:
    """The granule ``mmap`` maps ``fd`` in: the huge page size for a hugetlbfs file
    (a hugetlb memfd), else the base page size.  (``st_blksize`` is no guide: it is the
    preferred I/O size, 1 MiB on NFS for ordinary 4 KiB-mapped files.)"""
    # struct statfs starts with two words, f_type and f_bsize, on every Linux ABI
    buf = (ctypes.c_long * 32)()
    if _fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fstatfs({fd}): {os.strerror(err)}")
    if buf[0] & 0xFFFFFFFF == _HUGETLBFS_MAGIC:
        return int(buf[1])
    return PAGE_SIZE

"""Edges of the host-memory helpers, the OS transport and the simulated kernel's view
of user memory that the main transport tests do not pin (found by mutation testing)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import pathlib
from collections.abc import Iterator

import numpy as np
import pytest

from vgpu_backend.hostgpu import hostmem, sim_usermem
from vgpu_backend.hostgpu.sim_usermem import (
    QUERY_MAX_RANGES,
    ProcessMaps,
    copy_from_user,
    copy_to_user,
    first_uncovered,
    query_first_uncovered,
)
from vgpu_backend.hostgpu.transport import OsTransport

from .helpers import PAGE

I64 = np.ndarray[tuple[int], np.dtype[np.int64]]


def _arr(*values: int) -> I64:
    return np.array(values, dtype=np.int64)


def _maps_line(addr: int) -> str:
    """The ``/proc/self/maps`` line of the mapping that holds ``addr``."""
    for line in pathlib.Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= addr < end:
            return line
    raise AssertionError(f"no mapping holds {addr:#x}")


def _vm_flags(addr: int) -> list[str]:
    """The ``VmFlags`` of the mapping that holds ``addr`` (``/proc/self/smaps``)."""
    holds = False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            holds = start <= addr < end
        elif holds and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no VmFlags for {addr:#x}")


def _kernel_has_procmap_query() -> bool:
    """PROCMAP_QUERY exists on Linux 6.11 and later."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 11)


@pytest.fixture
def procmap_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip unless the kernel has PROCMAP_QUERY; re-enable it for the test."""
    if not _kernel_has_procmap_query():
        pytest.skip("this kernel has no PROCMAP_QUERY (Linux < 6.11)")
    monkeypatch.setattr(sim_usermem, "_use_procmap_query", True)


@pytest.fixture
def two_pages() -> Iterator[int]:
    """Page 0 read-write, page 1 unmapped (a hole right after it)."""
    two = hostmem.map_anonymous(2 * PAGE)
    hostmem.unmap(two + PAGE, PAGE)
    yield two
    hostmem.unmap(two, PAGE)


# --- hostmem -------------------------------------------------------------------------

def test_mmap_returning_null_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NULL result (``None`` through ctypes) is reported as ``OSError``, not returned."""
    def null_mmap(*args: object) -> None:
        ctypes.set_errno(errno.ENOMEM)

    monkeypatch.setattr(hostmem, "_mmap", null_mmap)
    with pytest.raises(OSError) as exc:
        hostmem.map_anonymous(PAGE)
    assert exc.value.errno == errno.ENOMEM


def test_map_anonymous_is_private_and_reserve_is_inaccessible() -> None:
    """``map_anonymous`` is a private read-write mapping; ``reserve`` a private
    ``PROT_NONE`` one."""
    anon = hostmem.map_anonymous(PAGE)
    res = hostmem.reserve(PAGE)
    try:
        assert _maps_line(anon).split()[1] == "rw-p"
        assert _maps_line(res).split()[1] == "---p"
        assert "nr" in _vm_flags(res)   # MAP_NORESERVE: no swap reserved
    finally:
        hostmem.unmap(anon, PAGE)
        hostmem.unmap(res, PAGE)


def test_map_file_honours_offset_and_read_only() -> None:
    """``map_file`` maps from ``offset``; ``writable=False`` gives a read-only mapping."""
    fd = os.memfd_create("map-file-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 2 * PAGE)
        os.pwrite(fd, b"second page", PAGE)
        addr = hostmem.map_file(PAGE, fd, PAGE, writable=False)
        try:
            assert hostmem.view(addr, 11).tobytes() == b"second page"
            maps = ProcessMaps.read()
            assert maps.covers_one(addr, PAGE, write=False)
            assert not maps.covers_one(addr, PAGE, write=True)
        finally:
            hostmem.unmap(addr, PAGE)
    finally:
        os.close(fd)


def test_unmap_and_file_page_size_report_errors() -> None:
    """A failing ``munmap`` or ``fstatfs`` raises ``OSError`` with its errno."""
    addr = hostmem.map_anonymous(PAGE)
    try:
        with pytest.raises(OSError) as exc:
            hostmem.unmap(addr + 1, PAGE)   # unaligned
        assert exc.value.errno == errno.EINVAL
    finally:
        hostmem.unmap(addr, PAGE)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as exc:
        hostmem.file_page_size(r)
    assert exc.value.errno == errno.EBADF


# --- OsTransport ---------------------------------------------------------------------

def test_os_open_is_read_write_close_on_exec_and_close_closes() -> None:
    """``open`` gives a read-write close-on-exec fd; ``close`` really closes it."""
    t = OsTransport()
    fd = t.open(os.devnull)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        t.close(fd)
    with pytest.raises(OSError) as exc:
        os.fstat(fd)
    assert exc.value.errno == errno.EBADF


def test_os_exists_and_list_dir(tmp_path: pathlib.Path) -> None:
    """``exists`` is true for plain files too; ``list_dir`` lists every entry."""
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text(name)
    t = OsTransport()
    assert t.exists(str(tmp_path / "a"))
    assert sorted(t.list_dir(str(tmp_path))) == ["a", "b", "c"]


def test_os_ioctl_without_argument_passes_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """``arg=None`` issues ``ioctl(fd, request, 0)``."""
    seen: list[tuple[object, ...]] = []
    monkeypatch.setattr(fcntl, "ioctl", lambda *a: seen.append(a))
    OsTransport().ioctl(5, 0x1234, None)
    assert seen == [(5, 0x1234, 0)]


# --- copy_*_user -----------------------------------------------------------------------

def test_short_copy_with_stale_errno_keeps_process_vm(monkeypatch: pytest.MonkeyPatch,
                                                       two_pages: int) -> None:
    """A short copy is EFAULT whatever errno happens to hold, and a bad address never
    turns process_vm_readv/writev off (only EPERM/ENOSYS from the call do)."""
    monkeypatch.setattr(sim_usermem, "_use_process_vm", True)
    ctypes.set_errno(errno.EPERM)   # stale: the short copy does not set errno
    with pytest.raises(OSError) as exc:
        copy_from_user(two_pages + PAGE - 4, 8)
    assert exc.value.errno == errno.EFAULT
    assert sim_usermem._use_process_vm
    with pytest.raises(OSError) as exc:
        copy_from_user(two_pages + PAGE, 8)   # entirely unmapped
    assert exc.value.errno == errno.EFAULT
    assert sim_usermem._use_process_vm


def test_empty_copies_never_fault() -> None:
    """Copying nothing succeeds at any address, even 0 (like the kernel's)."""
    assert copy_from_user(0, 0) == b""
    copy_to_user(0, b"")


# --- ProcessMaps ---------------------------------------------------------------------

def test_process_maps_sorts_and_merges_by_maximum_reach() -> None:
    """Mappings may come in any order; a merged interval ends at the furthest end of
    its mappings, not at the last one's; no ranges means nothing uncovered."""
    yes = np.ones(3, dtype=bool)
    # given out of order: [30, 31), [10, 20), [12, 14)
    maps = ProcessMaps(_arr(30, 10, 12) * PAGE, _arr(31, 20, 14) * PAGE, yes, yes)
    assert maps.first_uncovered(_arr(15) * PAGE, _arr(5) * PAGE, write=False) == -1
    assert maps.first_uncovered(_arr(30, 10) * PAGE, _arr(1, 10) * PAGE, write=True) == -1
    assert maps.first_uncovered(_arr(10, 20) * PAGE, _arr(10, 1) * PAGE, write=False) == 1
    assert maps.first_uncovered(_arr(), _arr(), write=False) == -1


# --- PROCMAP_QUERY -------------------------------------------------------------------

@pytest.mark.usefixtures("procmap_query")
def test_procmap_query_sees_holes_and_the_last_byte(two_pages: int) -> None:
    """With PROCMAP_QUERY: an address in no VMA is uncovered (not "no ioctl"), and a
    range one byte past the end of its VMA is uncovered."""
    starts = _arr(two_pages, two_pages, PAGE)
    assert query_first_uncovered(starts[:1], _arr(PAGE), write=True) == -1
    assert query_first_uncovered(starts[:2], _arr(PAGE, PAGE + 1), write=False) == 1
    assert query_first_uncovered(starts[2:], _arr(PAGE), write=False) == 0
    assert sim_usermem._use_procmap_query


@pytest.mark.usefixtures("procmap_query")
@pytest.mark.parametrize("count", [QUERY_MAX_RANGES, QUERY_MAX_RANGES + 1])
def test_first_uncovered_reads_the_maps_file_only_for_many_ranges(
        monkeypatch: pytest.MonkeyPatch, two_pages: int, count: int) -> None:
    """Up to ``QUERY_MAX_RANGES`` ranges are checked with PROCMAP_QUERY, more with one
    read of the maps file."""
    reads: list[int] = []
    real_read = ProcessMaps.read

    def counting_read() -> ProcessMaps:
        reads.append(1)
        return real_read()

    monkeypatch.setattr(ProcessMaps, "read", staticmethod(counting_read))
    starts = np.full(count, two_pages, dtype=np.int64)
    assert first_uncovered(starts, np.full(count, PAGE, np.int64), write=True) == -1
    assert len(reads) == (count > QUERY_MAX_RANGES)


@pytest.mark.parametrize("refusal", [errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP])
def test_procmap_query_refused_falls_back_to_the_maps_file(
        monkeypatch: pytest.MonkeyPatch, two_pages: int, refusal: int) -> None:
    """A kernel without PROCMAP_QUERY (ENOTTY, EINVAL, EOPNOTSUPP): ``None``, the query
    is not tried again, and :func:`first_uncovered` answers from the maps file."""
    calls: list[int] = []

    def refused(*args: object) -> None:
        calls.append(1)
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(sim_usermem, "_use_procmap_query", True)
    monkeypatch.setattr(fcntl, "ioctl", refused)
    starts = _arr(two_pages, two_pages)
    sizes = _arr(PAGE, 2 * PAGE)
    assert query_first_uncovered(starts, sizes, write=False) is None
    assert not sim_usermem._use_procmap_query
    monkeypatch.setattr(sim_usermem, "_use_procmap_query", True)
    assert first_uncovered(starts, sizes, write=False) == 1
    assert first_uncovered(starts[:1], sizes[:1], write=True) == -1
    assert not sim_usermem._use_procmap_query
    assert len(calls) == 2   # once per query_first_uncovered, then never again


def test_procmap_query_other_errors_propagate(monkeypatch: pytest.MonkeyPatch,
                                              two_pages: int) -> None:
    """An unexpected ioctl error is raised, not taken for an uncovered range."""
    def broken(*args: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(sim_usermem, "_use_procmap_query", True)
    monkeypatch.setattr(fcntl, "ioctl", broken)
    with pytest.raises(OSError) as exc:
        query_first_uncovered(_arr(two_pages), _arr(PAGE), write=False)
    assert exc.value.errno == errno.EIO
    assert sim_usermem._use_procmap_query

"""The OS transport and the host-memory helpers, on the real kernel."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import termios

import numpy as np
import pytest

from vgpu_backend.hostgpu import hostmem, sim_usermem
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.sim_usermem import (
    ProcessMaps,
    copy_from_user,
    copy_to_user,
    first_uncovered,
    query_first_uncovered,
)
from vgpu_backend.hostgpu.transport import OsTransport

from .helpers import PAGE


def test_os_ioctl_updates_the_buffer_in_place() -> None:
    t = OsTransport()
    r, w = os.pipe()
    try:
        os.write(w, b"12345")
        buf = bytearray(4)
        t.ioctl(r, termios.FIONREAD, buf)
        assert int.from_bytes(buf, "little") == 5
        with pytest.raises(OSError) as exc:   # a KFD request on a pipe
            t.ioctl(r, abi.AMDKFD_IOC_GET_VERSION, bytearray(8))
        assert exc.value.errno == errno.ENOTTY
        with pytest.raises(OSError) as exc:
            t.ioctl(r, abi.AMDKFD_IOC_CREATE_PROCESS, None)
        assert exc.value.errno == errno.ENOTTY
    finally:
        os.close(r)
        os.close(w)


def test_os_open_sysfs_and_close() -> None:
    t = OsTransport()
    fd = t.open(os.devnull)
    assert str(fd) in t.list_dir("/proc/self/fd")
    t.close(fd)
    assert t.read_text("/proc/sys/kernel/ostype") == "Linux\n"
    assert t.exists("/proc/self") and not t.exists("/dev/kfd-nope")
    with pytest.raises(FileNotFoundError):
        t.open("/dev/kfd-nope")
    assert t.gpu_memory(0, 0) is None


def test_reserve_and_map_file_fixed_alias_the_same_pages() -> None:
    fd = os.memfd_create("alias-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * PAGE)
    base = hostmem.map_file(4 * PAGE, fd)
    alias = hostmem.reserve(2 * PAGE)
    try:
        hostmem.map_file_fixed(alias, PAGE, fd, 3 * PAGE, writable=True)
        hostmem.map_file_fixed(alias + PAGE, PAGE, fd, 0, writable=False)
        hostmem.view(alias, PAGE)[:] = 7
        assert os.pread(fd, 1, 3 * PAGE) == b"\x07"
        hostmem.view(base, PAGE)[:] = 9
        assert hostmem.view(alias + PAGE, 1)[0] == 9
        maps = ProcessMaps.read()
        assert maps.covers_one(alias, 2 * PAGE, write=False)
        assert not maps.covers_one(alias, 2 * PAGE, write=True)
        with pytest.raises(OSError) as exc:
            hostmem.map_file_fixed(alias, PAGE, fd, 1, writable=True)  # unaligned offset
        assert exc.value.errno == errno.EINVAL
    finally:
        hostmem.unmap(alias, 2 * PAGE)
        hostmem.unmap(base, 4 * PAGE)
        os.close(fd)
    assert not ProcessMaps.read().covers_one(alias, PAGE, write=False)
    assert hostmem.view(0, 0).size == 0


@pytest.mark.parametrize("refusal", [0, errno.EPERM, errno.ENOSYS],
                         ids=["process_vm", "seccomp EPERM", "ENOSYS"])
def test_copy_user_reports_efault_instead_of_crashing(monkeypatch: pytest.MonkeyPatch,
                                                      refusal: int) -> None:
    """Copies to and from user memory: the bytes, or EFAULT for an address that is
    unmapped, PROT_NONE or (to write) read-only.  Where process_vm_readv/writev are
    refused (seccomp: EPERM; no such call: ENOSYS) the maps file decides the same, and
    the refused calls are not tried again."""
    calls: list[int] = []
    if refusal:
        def refused(*args: object) -> int:
            calls.append(refusal)
            ctypes.set_errno(refusal)
            return -1

        monkeypatch.setattr(sim_usermem, "_readv", refused)
        monkeypatch.setattr(sim_usermem, "_writev", refused)
        monkeypatch.setattr(sim_usermem, "_use_process_vm", True)
    buf = ctypes.create_string_buffer(b"kernel reads this", 32)
    addr = ctypes.addressof(buf)
    assert copy_from_user(addr, 6) == b"kernel"
    assert sim_usermem._use_process_vm is not bool(refusal)
    copy_to_user(addr, b"KERNEL")
    assert buf.value == b"KERNEL reads this"
    assert copy_from_user(addr, 0) == b""
    reserved = hostmem.reserve(PAGE)  # mapped but PROT_NONE
    readonly = hostmem.map_anonymous(PAGE)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(readonly), PAGE, mmap.PROT_READ) == 0
    try:
        for bad in (0, PAGE, reserved):
            with pytest.raises(OSError) as exc:
                copy_from_user(bad, 8)
            assert exc.value.errno == errno.EFAULT
            with pytest.raises(OSError) as exc:
                copy_to_user(bad, b"x")
            assert exc.value.errno == errno.EFAULT
        assert copy_from_user(readonly, 4) == bytes(4)
        with pytest.raises(OSError) as exc:  # readable is not writable
            copy_to_user(readonly, b"x")
        assert exc.value.errno == errno.EFAULT
    finally:
        hostmem.unmap(reserved, PAGE)
        hostmem.unmap(readonly, PAGE)
    assert calls == ([refusal] if refusal else [])


def test_copy_user_with_process_vm_refuses_a_range_running_into_a_hole() -> None:
    """A copy that starts in mapped memory and runs past its end is EFAULT, not a
    short copy (process_vm_readv copies the mapped part and stops)."""
    two = hostmem.map_anonymous(2 * PAGE)
    hostmem.unmap(two + PAGE, PAGE)
    try:
        assert copy_from_user(two + PAGE - 4, 4) == bytes(4)
        for copy in (lambda: copy_from_user(two + PAGE - 4, 8),
                     lambda: copy_to_user(two + PAGE - 4, bytes(8))):
            with pytest.raises(OSError) as exc:
                copy()
            assert exc.value.errno == errno.EFAULT
    finally:
        hostmem.unmap(two, PAGE)


def test_process_maps_merges_adjacent_mappings() -> None:
    three = hostmem.map_anonymous(3 * PAGE)
    hostmem.unmap(three + 2 * PAGE, PAGE)
    libc = ctypes.CDLL(None, use_errno=True)
    # page 1 read-only: two VMAs side by side, then a hole
    assert libc.mprotect(ctypes.c_void_p(three + PAGE), PAGE, mmap.PROT_READ) == 0
    try:
        maps = ProcessMaps.read()
        starts = np.array([three, three, three + PAGE], dtype=np.int64)
        sizes = np.array([2 * PAGE, 3 * PAGE, PAGE], dtype=np.int64)
        assert maps.first_uncovered(starts, sizes, write=False) == 1   # the hole
        assert maps.first_uncovered(starts[[0, 2]], sizes[[0, 2]], write=False) == -1
        assert maps.first_uncovered(starts[[0, 2]], sizes[[0, 2]], write=True) == 0
        assert maps.covers_one(three, PAGE, write=True)
    finally:
        hostmem.unmap(three, 2 * PAGE)


def test_procmap_query_agrees_with_the_maps_file() -> None:
    four = hostmem.map_anonymous(4 * PAGE)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(four + PAGE), PAGE, mmap.PROT_READ) == 0
    assert libc.mprotect(ctypes.c_void_p(four + 2 * PAGE), PAGE, 0) == 0  # PROT_NONE
    hostmem.unmap(four + 3 * PAGE, PAGE)
    cases = [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (3, 1), (0, 4)]  # (page, count)
    try:
        maps = ProcessMaps.read()
        for write in (False, True):
            for page, count in cases:
                starts = np.array([four, four + page * PAGE], dtype=np.int64)
                sizes = np.array([PAGE, count * PAGE], dtype=np.int64)
                expected = maps.first_uncovered(starts, sizes, write=write)
                got = query_first_uncovered(starts, sizes, write=write)
                if got is None:
                    pytest.skip("this kernel has no PROCMAP_QUERY (Linux < 6.11)")
                assert got == expected, (page, count, write)
                assert first_uncovered(starts, sizes, write=write) == expected
        many = np.full(40, four, dtype=np.int64)   # beyond QUERY_MAX_RANGES: maps file
        assert first_uncovered(many, np.full(40, PAGE, np.int64), write=True) == -1
    finally:
        hostmem.unmap(four, 3 * PAGE)


def test_ranges_below_the_lowest_mapping_are_uncovered() -> None:
    """Page 1 is below every mapping (``mmap_min_addr``): both checks report it."""
    starts = np.array([PAGE], dtype=np.int64)
    sizes = np.array([PAGE], dtype=np.int64)
    assert ProcessMaps.read().first_uncovered(starts, sizes, write=False) == 0
    got = query_first_uncovered(starts, sizes, write=False)
    assert got in (0, None)  # None: no PROCMAP_QUERY on this kernel


def test_process_maps_intervals_from_given_mappings() -> None:
    """Merging is by reach (a mapping inside an earlier one does not end the interval),
    coverage starts at the first mapping, and no writable mapping covers nothing."""
    def arr(*values: int) -> np.ndarray[tuple[int], np.dtype[np.int64]]:
        return np.array(values, dtype=np.int64) * PAGE

    yes = np.array([True, True, True])
    # [10, 20) holds [12, 14); [20, 22) continues it: one interval [10, 22)
    maps = ProcessMaps(arr(10, 12, 20), arr(20, 14, 22), yes, ~yes)
    assert maps.first_uncovered(arr(10, 15, 9), arr(12, 7, 1), write=False) == 2
    assert maps.first_uncovered(arr(10, 15), arr(12, 7), write=False) == -1
    assert maps.first_uncovered(arr(10), arr(1), write=True) == 0


def test_an_empty_range_is_covered_wherever_it_lies() -> None:
    """A range of 0 bytes touches no memory: covered in a gap, below every mapping and
    where nothing is writable, by the maps file as by PROCMAP_QUERY."""
    def arr(*values: int) -> np.ndarray[tuple[int], np.dtype[np.int64]]:
        return np.array(values, dtype=np.int64) * PAGE

    yes = np.array([True])
    maps = ProcessMaps(arr(10), arr(20), yes, ~yes)
    for write in (False, True):
        assert maps.first_uncovered(arr(30, 5), arr(0, 0), write=write) == -1
        assert maps.first_uncovered(arr(30, 5, 30), arr(0, 0, 1), write=write) == 2
    gap = hostmem.reserve(PAGE)
    hostmem.unmap(gap, PAGE)  # an address in no mapping
    starts, sizes = np.array([gap], np.int64), np.array([0], np.int64)
    assert ProcessMaps.read().first_uncovered(starts, sizes, write=True) == -1
    assert query_first_uncovered(starts, sizes, write=True) in (-1, None)  # None: < 6.11

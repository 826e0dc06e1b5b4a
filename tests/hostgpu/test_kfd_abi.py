"""The KFD UAPI declarations against the numbers in userptr-kfd-uapi.md §3.2-§3.4, §4.2."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.wire import encode, layout
from vgpu_backend.hostgpu import kfd_abi as abi

# §3.2, "ioctl numbers (x86-64/arm64 _IOC encoding ...)"
IOCTLS = [
    (abi.AMDKFD_IOC_GET_VERSION, 0x80084B01, 0x01, 8),
    (abi.AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, 0xC0104B14, 0x14, 16),
    (abi.AMDKFD_IOC_ACQUIRE_VM, 0x40084B15, 0x15, 8),
    (abi.AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, 0xC0284B16, 0x16, 40),
    (abi.AMDKFD_IOC_FREE_MEMORY_OF_GPU, 0x40084B17, 0x17, 8),
    (abi.AMDKFD_IOC_MAP_MEMORY_TO_GPU, 0xC0184B18, 0x18, 24),
    (abi.AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU, 0xC0184B19, 0x19, 24),
    (abi.AMDKFD_IOC_AVAILABLE_MEMORY, 0xC0104B23, 0x23, 16),
    (abi.AMDKFD_IOC_CREATE_PROCESS, 0x00004B27, 0x27, 0),
]


@pytest.mark.parametrize(("computed", "documented", "nr", "size"), IOCTLS)
def test_ioctl_numbers(computed: int, documented: int, nr: int, size: int) -> None:
    assert computed == documented
    assert abi.ioc_nr(computed) == nr
    assert abi.ioc_size(computed) == size
    assert abi.ioc_type(computed) == ord("K")


def test_ioctl_directions() -> None:
    assert abi.ioc_dir(abi.AMDKFD_IOC_GET_VERSION) == abi.IOC_READ
    assert abi.ioc_dir(abi.AMDKFD_IOC_ACQUIRE_VM) == abi.IOC_WRITE
    assert abi.ioc_dir(abi.AMDKFD_IOC_MAP_MEMORY_TO_GPU) == abi.IOC_READ | abi.IOC_WRITE
    assert abi.ioc_dir(abi.AMDKFD_IOC_CREATE_PROCESS) == abi.IOC_NONE
    with pytest.raises(ValueError, match="does not fit"):
        abi.ioc(abi.IOC_READ, ord("K"), 1, 1 << 14)


# §3.3 / §4.2 struct layouts: (record class, size, {field: offset})
LAYOUTS = [
    (abi.GetVersionArgs, 8, {"major_version": 0, "minor_version": 4}),
    (abi.AcquireVmArgs, 8, {"drm_fd": 0, "gpu_id": 4}),
    (abi.AllocMemoryOfGpuArgs, 40, {"va_addr": 0, "size": 8, "handle": 16,
                                    "mmap_offset": 24, "gpu_id": 32, "flags": 36}),
    (abi.FreeMemoryOfGpuArgs, 8, {"handle": 0}),
    (abi.MapMemoryToGpuArgs, 24, {"handle": 0, "device_ids_array_ptr": 8,
                                  "n_devices": 16, "n_success": 20}),
    (abi.UnmapMemoryFromGpuArgs, 24, {"handle": 0, "device_ids_array_ptr": 8,
                                      "n_devices": 16, "n_success": 20}),
    (abi.GetProcessAperturesNewArgs, 16, {"kfd_process_device_apertures_ptr": 0,
                                          "num_of_nodes": 8, "pad": 12}),
    (abi.ProcessDeviceApertures, 56, {"lds_base": 0, "lds_limit": 8, "scratch_base": 16,
                                      "scratch_limit": 24, "gpuvm_base": 32,
                                      "gpuvm_limit": 40, "gpu_id": 48, "pad": 52}),
    (abi.GetAvailableMemoryArgs, 16, {"available": 0, "gpu_id": 8, "pad": 12}),
    (abi.UserptrRange, 16, {"start": 0, "size": 8}),
    (abi.UserptrRangesHeader, 8, {"num_ranges": 0, "reserved": 4}),
]


@pytest.mark.parametrize(("record", "size", "offsets"), LAYOUTS,
                         ids=[r[0].__name__ for r in LAYOUTS])
def test_struct_layouts(record: type, size: int, offsets: dict[str, int]) -> None:
    lay = layout(record)
    assert lay.size == size
    assert lay.dtype.itemsize == size
    assert tuple(offsets) == lay.names
    fields = lay.dtype.fields
    assert fields is not None
    assert {n: fields[n][1] for n in lay.names} == offsets
    assert lay.c_name in (record.__doc__ or "")


def test_alloc_args_bytes() -> None:
    args = abi.AllocMemoryOfGpuArgs(va_addr=0x1122334455667788, size=0x2000, handle=0,
                                    mmap_offset=0x7F0000001000, gpu_id=0xABCD,
                                    flags=abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR
                                    | abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR_BATCH)
    raw = encode(args)
    assert raw == bytes.fromhex("8877665544332211" "0020000000000000" "0000000000000000"
                                "00100000007f0000" "cdab0000" "04004000")
    assert layout(abi.AllocMemoryOfGpuArgs).compiled.parse(raw).flags == 0x400004
    assert bytes(abi.pack(args)) == raw


def test_flags() -> None:
    assert abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR == 4
    assert abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR_BATCH == 0x400000
    assert abi.KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE == 0x80000000
    assert abi.KFD_IOC_ALLOC_MEM_FLAGS_CONTIGUOUS == 1 << 23
    assert abi.KFD_IOC_ALLOC_MEM_FLAGS_NO_SUBSTITUTE == 1 << 28


def test_handles_encode_gpu_id() -> None:
    handle = abi.make_handle(0x5A3C, 7)
    assert handle == 0x00005A3C_00000007
    assert abi.handle_gpu_id(handle) == 0x5A3C


def test_ranges_data_bytes() -> None:
    data = abi.UserptrRangesData(np.array([0x1000, 0x7000], dtype=np.uint64),
                                 np.array([0x2000, 0x1000], dtype=np.uint64))
    assert len(data) == 2
    assert data.nbytes == 8 + 2 * 16
    assert data.address % 8 == 0
    assert data.buffer.tobytes() == (
        (2).to_bytes(4, "little") + bytes(4)
        + (0x1000).to_bytes(8, "little") + (0x2000).to_bytes(8, "little")
        + (0x7000).to_bytes(8, "little") + (0x1000).to_bytes(8, "little"))
    reserved = abi.UserptrRangesData(np.zeros(1, np.uint64), np.zeros(1, np.uint64),
                                     reserved=5)
    assert reserved.buffer[4] == 5
    with pytest.raises(ValueError, match="differ"):
        abi.UserptrRangesData(np.zeros(2, np.uint64), np.zeros(1, np.uint64))


#: ``KFD_IOC_ALLOC_MEM_FLAGS_*`` as the reference (userptr-kfd-uapi.md section 3.4,
#: from kfd_ioctl.h) lists them: type bits, attribute bits, and the proposed batch bit
DOCUMENTED_ALLOC_FLAGS = {
    "VRAM": 1 << 0, "GTT": 1 << 1, "USERPTR": 1 << 2, "DOORBELL": 1 << 3,
    "MMIO_REMAP": 1 << 4, "WRITABLE": 1 << 31, "EXECUTABLE": 1 << 30, "PUBLIC": 1 << 29,
    "NO_SUBSTITUTE": 1 << 28, "AQL_QUEUE_MEM": 1 << 27, "COHERENT": 1 << 26,
    "UNCACHED": 1 << 25, "EXT_COHERENT": 1 << 24, "CONTIGUOUS": 1 << 23,
    "USERPTR_BATCH": 1 << 22,
}


@pytest.mark.parametrize(("name", "value"), DOCUMENTED_ALLOC_FLAGS.items())
def test_every_alloc_flag_matches_the_reference(name: str, value: int) -> None:
    assert getattr(abi, f"KFD_IOC_ALLOC_MEM_FLAGS_{name}") == value

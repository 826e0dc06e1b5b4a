"""USERPTR_RDONLY blobs: the GPU reads them; any write through them faults at the
written buffer's address before anything is written, and the guest pages stay as they
were."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest

from protocol.compute import Kernel, Status, buffer_arg, f32_arg, u64_arg
from protocol.virtio_gpu_codes import Resp
from tests.userptr.compute_stream import copy_cmd, dispatch, fill_cmd, signal_cmd
from tests.userptr.vm import Blob, ComputeContext, Vm

PAGE = 4096


@pytest.fixture
def vm(shared_vm: Vm) -> Vm:
    """The tests of this module share one back-end (each uses its own context)."""
    return shared_vm


#: a command writing to ``ro`` (+ offset) while reading ``rw``; the offset written at
WRITES: dict[str, Callable[[int, int], tuple[bytes, int]]] = {
    "FILL": lambda ro, rw: (fill_cmd(ro + 100, 400, 1), ro + 100),
    "SIGNAL": lambda ro, rw: (signal_cmd(ro + 64, 1), ro + 64),
    "COPY into it": lambda ro, rw: (copy_cmd(ro + 3, rw, 500), ro + 3),
    "FILL_U32": lambda ro, rw: (dispatch(Kernel.FILL_U32, buffer_arg(ro), u64_arg(10),
                                         u64_arg(9)), ro),
    "COPY kernel": lambda ro, rw: (dispatch(Kernel.COPY, buffer_arg(ro + 8), buffer_arg(rw),
                                            u64_arg(64)), ro + 8),
    "VADD dst": lambda ro, rw: (dispatch(Kernel.VADD_F32, buffer_arg(ro), buffer_arg(rw),
                                         buffer_arg(rw), u64_arg(16)), ro),
    "SAXPY y": lambda ro, rw: (dispatch(Kernel.SAXPY_F32, buffer_arg(ro + 16), buffer_arg(rw),
                                        u64_arg(16), f32_arg(2.0)), ro + 16),
    "REDUCE out": lambda ro, rw: (dispatch(Kernel.REDUCE_SUM_F32, buffer_arg(rw), u64_arg(16),
                                           buffer_arg(ro + 4)), ro + 4),
    "MATMUL c": lambda ro, rw: (dispatch(Kernel.MATMUL_F32, buffer_arg(ro), buffer_arg(rw),
                                         buffer_arg(rw), u64_arg(2), u64_arg(2),
                                         u64_arg(2)), ro),
}


def setup(vm: Vm) -> tuple[ComputeContext, Blob, Blob, int, int]:
    """A context with a RDONLY blob and a writable one, both mapped."""
    ctx = vm.compute_context()
    ro, rw = ctx.blob(2 * PAGE, readonly=True), ctx.blob(2 * PAGE)
    va_ro, va_rw = ctx.map(ro, rw)
    return ctx, ro, rw, va_ro, va_rw


@pytest.mark.parametrize("case", list(WRITES))
def test_write_faults(vm: Vm, case: str) -> None:
    """The write faults at the address written; neither blob changes."""
    ctx, ro, rw, va_ro, va_rw = setup(vm)
    before = ro.buffer.read(vm.ram), rw.buffer.read(vm.ram)
    command, address = WRITES[case](va_ro, va_rw)
    done = ctx.run([command])
    done.response.expect(Resp.ERR_UNSPEC)
    assert done.results.status == Status.FAULT
    assert done.results.header.fault_address == address
    assert (ro.buffer.read(vm.ram), rw.buffer.read(vm.ram)) == before


def test_reads_work(vm: Vm) -> None:
    """CHECKSUM of it, COPY from it, SAXPY with it as x."""
    ctx, ro, rw, va_ro, va_rw = setup(vm)
    done = ctx.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va_ro), u64_arg(2 * PAGE)),
                    copy_cmd(va_rw, va_ro + 5, 3000)])
    done.response.expect(Resp.OK_NODATA)
    assert done.results.values()[0] == zlib.crc32(ro.buffer.read(vm.ram))
    assert rw.buffer.read(vm.ram, 3000) == ro.buffer.read(vm.ram, 3000, 5)


def test_partial_stream(vm: Vm) -> None:
    """[write rw, write ro, write rw]: the first write lands, the fault stops the rest."""
    ctx, ro, rw, va_ro, va_rw = setup(vm)
    ro_before, rw_before = ro.buffer.read(vm.ram), rw.buffer.read(vm.ram)
    done = ctx.run([fill_cmd(va_rw, 8, 0x11111111), fill_cmd(va_ro, 8, 0x22222222),
                    fill_cmd(va_rw + 8, 8, 0x33333333)])
    assert done.results.statuses() == [Status.OK, Status.FAULT, Status.NOT_RUN]
    assert ro.buffer.read(vm.ram) == ro_before
    assert rw.buffer.read(vm.ram) == b"\x11" * 8 + rw_before[8:]

"""Compute contexts from the guest: capset discovery, USERPTR buffers, SUBMIT_3D streams.

Streams and result records are ``protocol.compute``'s; results land in a USERPTR blob
made of this program's own memory, so they are read without any transfer command.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Final

from guest_tests.userspace.gpu import DEFAULT_TIMEOUT, GpuResponse, Pending, UserptrBlob, VirtioGpu
from guest_tests.userspace.pinned import PinnedBuffer
from protocol.capsets import USERPTR_CAPSET_MAGIC, UserptrCapset
from protocol.compute import (
    COMPUTE_CAPSET_MAGIC,
    RESULT_MAGIC,
    CmdResult,
    ComputeCapsetHeader,
    Dispatch,
    Kernel,
    KernelArg,
    KernelDescriptor,
    MapResource,
    Op,
    ResultHeader,
    Status,
    encode_command,
    encode_stream,
)
from protocol.wire import decode, layout

__all__ = ["ComputeContext", "DeviceCapsets", "RunResult", "discover_capsets", "dispatch"]

_RESULT_HEADER: Final = layout(ResultHeader).size
_CMD_RESULT: Final = layout(CmdResult).size
_F64: Final = struct.Struct("<d")
_U64: Final = struct.Struct("<Q")


@dataclass(frozen=True)
class DeviceCapsets:
    """The capsets this project's device publishes, found by their magic."""

    raw: dict[int, bytes]
    userptr_id: int | None = None
    userptr: UserptrCapset | None = None
    compute_id: int | None = None
    compute: ComputeCapsetHeader | None = None
    kernels: tuple[KernelDescriptor, ...] = ()


def discover_capsets(gpu: VirtioGpu) -> DeviceCapsets:
    """Read every capset and decode the userptr and compute ones."""
    raw = gpu.capsets()
    found = DeviceCapsets(raw)
    for capset_id, data in raw.items():
        magic = int.from_bytes(data[:4], "little") if len(data) >= 4 else 0
        if magic == USERPTR_CAPSET_MAGIC and len(data) >= layout(UserptrCapset).size:
            found = replace(found, userptr_id=capset_id, userptr=decode(UserptrCapset, data))
        elif magic == COMPUTE_CAPSET_MAGIC and len(data) >= layout(ComputeCapsetHeader).size:
            head = decode(ComputeCapsetHeader, data)
            size = layout(KernelDescriptor).size
            kernels = tuple(decode(KernelDescriptor, data, head.size + i * size)
                            for i in range(head.num_kernels)
                            if head.size + (i + 1) * size <= len(data))
            found = replace(found, compute_id=capset_id, compute=head, kernels=kernels)
    return found


def dispatch(kernel: Kernel, *args: KernelArg, cmd_id: int = 0) -> bytes:
    """One DISPATCH command."""
    return encode_command(Op.DISPATCH, Dispatch(int(kernel), len(args)), cmd_id, args)


@dataclass(frozen=True)
class RunResult:
    """A completed submission: the fence response and the result records."""

    response: GpuResponse
    header: ResultHeader
    commands: list[CmdResult] = field(default_factory=list)

    @property
    def status(self) -> Status:
        """The submission's status."""
        return Status(self.header.status)

    def value(self, index: int) -> int:
        """Command ``index``'s result value (MAP: GPU VA, CHECKSUM: CRC-32, ...)."""
        return self.commands[index].value

    def float_value(self, index: int) -> float:
        """Command ``index``'s value as the float64 REDUCE_SUM returns."""
        return float(_F64.unpack(_U64.pack(self.value(index)))[0])


class ComputeContext:
    """A compute context with a result blob in this program's memory."""

    def __init__(self, gpu: VirtioGpu, capset_id: int, name: str = "compute",
                 result_bytes: int = 64 * 1024) -> None:
        self.gpu = gpu
        self.ctx_id = gpu.create_context(name, capset_id)
        self.blobs: list[UserptrBlob] = []
        self.result_buffer = PinnedBuffer(result_bytes)
        try:
            self.result_blob = self.register(self.result_buffer)
        except BaseException:
            gpu.destroy_context(self.ctx_id)
            self.result_buffer.close()
            raise
        self.vas: dict[int, int] = {}
        self.last_fence_id: int | None = None

    def register(self, buffer: PinnedBuffer, *, readonly: bool = False) -> UserptrBlob:
        """``buffer`` as a USERPTR HOST3D_GUEST blob of this context."""
        blob = self.gpu.register_userptr(buffer, ctx_id=self.ctx_id, readonly=readonly)
        self.blobs.append(blob)
        return blob

    def map(self, *blobs: UserptrBlob) -> list[int]:
        """MAP_RESOURCE each blob; returns the GPU VA of each buffer's first byte."""
        commands = [encode_command(Op.MAP_RESOURCE, MapResource(b.resource_id), i)
                    for i, b in enumerate(blobs)]
        result = self.run(commands)
        if result.status != Status.OK:
            raise RuntimeError(f"MAP_RESOURCE failed: {result.status.name} at command "
                               f"{result.header.failed_index}")
        vas = []
        for index, blob in enumerate(blobs):
            self.vas[blob.resource_id] = result.value(index)
            vas.append(result.value(index) + blob.buffer.offset)  # the offset is not sent
        return vas

    def start(self, commands: list[bytes], *, ring_idx: int | None = None,
              result_offset: int = 0, fenced: bool = True) -> Pending:
        """Queue a stream whose results go to ``result_offset`` of the result blob."""
        size = _RESULT_HEADER + len(commands) * _CMD_RESULT
        self.result_buffer.data[result_offset:result_offset + size] = 0
        stream = encode_stream(commands, self.result_blob.resource_id, result_offset)
        self.last_fence_id = self.gpu.new_fence() if fenced else None
        return self.gpu.submit_3d(self.ctx_id, stream, ring_idx=ring_idx,
                                  fence_id=self.last_fence_id)

    def results(self, count: int, result_offset: int = 0) -> tuple[ResultHeader, list[CmdResult]]:
        """The result records at ``result_offset``, read from this program's memory."""
        data = self.result_buffer.data[
            result_offset:result_offset + _RESULT_HEADER + count * _CMD_RESULT].tobytes()
        header = decode(ResultHeader, data)
        return header, [decode(CmdResult, data, _RESULT_HEADER + i * _CMD_RESULT)
                        for i in range(count)]

    def finish(self, pending: Pending, count: int, result_offset: int = 0,
               timeout: float = DEFAULT_TIMEOUT) -> RunResult:
        """Wait for a started stream; checks that results were written."""
        response = self.gpu.wait(pending, timeout)
        header, commands = self.results(count, result_offset)
        if header.magic != RESULT_MAGIC:
            raise RuntimeError(f"no results at offset {result_offset} after the fence "
                               f"({response.name})")
        return RunResult(response, header, commands)

    def run(self, commands: list[bytes], *, ring_idx: int | None = None,
            result_offset: int = 0, timeout: float = DEFAULT_TIMEOUT) -> RunResult:
        """Submit fenced and wait for the fence; results from the result blob."""
        pending = self.start(commands, ring_idx=ring_idx, result_offset=result_offset)
        return self.finish(pending, len(commands), result_offset, timeout)

    def close(self) -> None:
        """Unref every blob, destroy the context, release the result buffer (after a device
        reset the device holds none of them any more)."""
        if self.gpu.arena is not None:
            for blob in self.blobs:
                if blob.resource_id in self.gpu.userptrs:
                    self.gpu.unref(blob.resource_id)
            self.gpu.destroy_context(self.ctx_id)
        self.result_buffer.close()

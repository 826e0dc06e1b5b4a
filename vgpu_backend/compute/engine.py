"""Executes a compute stream for one context on the simulated GPU.

A context sees only the GPU virtual ranges of the resources mapped into it
(MAP_RESOURCE); every buffer argument must lie inside one of them, and is resolved
through the host GPU's page table, which refuses writes to read-only (USERPTR_RDONLY)
pages.  All buffers of a command are checked before the command touches memory, so a
faulting command leaves guest memory as it was.  Execution stops at the first failure.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.compute import (
    RESULT_MAGIC,
    CmdResult,
    Command,
    CopyCmd,
    Dispatch,
    FillCmd,
    Kernel,
    MapResource,
    Op,
    ResultHeader,
    SignalCmd,
    Status,
    UnmapResource,
)
from protocol.wire import encode
from vgpu_backend.compute import kernels
from vgpu_backend.compute.buffers import Buffer
from vgpu_backend.compute.kernels import KernelStats
from vgpu_backend.hostgpu.base import GpuFault, GpuMapping, GpuMemory

__all__ = ["ContextVm", "Engine", "Mapping", "Outcome", "ResultTarget"]

log = logging.getLogger(__name__)

_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")
_MAX_DIM = 1 << 20


@dataclass(frozen=True, slots=True)
class Mapping:
    """A resource mapped into a context: its GPU virtual range."""

    resource_id: int
    gpu_va: int
    size: int
    readonly: bool
    #: the host GPU mapping behind it (checked at run time: it may have been released)
    host: GpuMapping | None = None


@dataclass(slots=True)
class ContextVm:
    """A context's view of GPU virtual memory: the resources mapped into it."""

    ctx_id: int
    mappings: dict[int, Mapping] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def find(self, va: int, size: int) -> Mapping | None:
        """The mapping containing all of ``[va, va+size)``."""
        with self.lock:
            for m in self.mappings.values():
                if m.gpu_va <= va and va + size <= m.gpu_va + m.size:
                    return m
        return None


@dataclass(frozen=True, slots=True)
class ResultTarget:
    """Where results go: a GPU virtual range of a resource mapped for writing."""

    gpu_va: int
    size: int


@dataclass(slots=True)
class Outcome:
    """What a submission did."""

    status: Status = Status.OK
    failed_index: int = 0xFFFFFFFF
    completed: int = 0
    fault_address: int = 0
    elapsed_ns: int = 0
    results: list[CmdResult] = field(default_factory=list)
    stats: KernelStats = field(default_factory=KernelStats)
    message: str = ""


class _Failure(Exception):
    def __init__(self, status: Status, message: str, address: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.address = address


class Engine:
    """Runs streams against a page table (thread-safe; one call per job)."""

    def __init__(self, memory: GpuMemory, *, job_timeout: float = float("inf"),
                 max_staging: int = 1 << 62) -> None:
        self._memory = memory
        self._job_timeout = job_timeout
        self._max_staging = max_staging
        self._ops: dict[Op, Callable[[ContextVm, Command, Any, KernelStats], int]] = {
            Op.MAP_RESOURCE: self._map, Op.UNMAP_RESOURCE: self._unmap,
            Op.DISPATCH: self._dispatch, Op.FILL: self._fill, Op.COPY: self._copy,
            Op.SIGNAL: self._signal,
        }

    def run(self, vm: ContextVm, commands: list[Command], prepared: dict[int, Mapping],
            target: ResultTarget | None, cancel: threading.Event | None = None) -> Outcome:
        """Execute ``commands`` in order; ``prepared`` holds the mappings the loop thread
        resolved for MAP_RESOURCE commands (by command index).  A set ``cancel`` stops
        the work at the next piece (status ABORTED)."""
        outcome = Outcome()
        outcome.stats.cancel = cancel
        outcome.stats.deadline = time.monotonic() + self._job_timeout
        outcome.stats.max_staging = self._max_staging
        start = time.perf_counter_ns()
        for cmd in commands:
            try:
                if cancel is not None and cancel.is_set():
                    raise kernels.Cancelled
                value = self._execute(vm, cmd, prepared.get(cmd.index), outcome.stats)
            except kernels.Cancelled as stop:
                fail = _Failure(Status.ABORTED, f"ran longer than {self._job_timeout:g} s"
                                if isinstance(stop, kernels.OverTime)
                                else "cancelled (device reset or disconnect)")
                outcome.status, outcome.failed_index, outcome.message = \
                    fail.status, cmd.index, str(fail)
                outcome.results.append(CmdResult(cmd.cmd_id, Status.ABORTED, 0))
                outcome.results.extend(CmdResult(c.cmd_id, Status.NOT_RUN, 0)
                                       for c in commands[cmd.index + 1:])
                break
            except _Failure as fail:
                outcome.status, outcome.failed_index = fail.status, cmd.index
                outcome.fault_address, outcome.message = fail.address, str(fail)
                outcome.results.append(CmdResult(cmd.cmd_id, fail.status, fail.address))
                outcome.results.extend(CmdResult(c.cmd_id, Status.NOT_RUN, 0)
                                       for c in commands[cmd.index + 1:])
                break
            outcome.results.append(CmdResult(cmd.cmd_id, Status.OK, value))
            outcome.completed += 1
        outcome.elapsed_ns = time.perf_counter_ns() - start
        stats = outcome.stats
        log.debug("context %d: %d of %d commands in %.3f ms, %d bytes touched, %d staged "
                  "(kernel scratch for pieces that are not host-contiguous)", vm.ctx_id,
                  outcome.completed, len(commands), outcome.elapsed_ns / 1e6,
                  stats.bytes_touched, stats.staged_bytes)
        if target is not None and not (cancel is not None and cancel.is_set()):
            self._write_results(vm, target, outcome)
        return outcome

    def _execute(self, vm: ContextVm, cmd: Command, prepared: Mapping | None,
                 stats: KernelStats) -> int:
        """One command.  Operands a kernel would have to stage whole beyond the staging
        limit (MATMUL's, an aliased COPY's source) are an invalid argument."""
        try:
            return self._ops[cmd.op](vm, cmd, prepared, stats)
        except kernels.TooLarge as err:
            raise _Failure(Status.INVALID_ARGUMENT, str(err)) from None

    def _write_results(self, vm: ContextVm, target: ResultTarget, outcome: Outcome) -> None:
        blob = encode(ResultHeader(RESULT_MAGIC, outcome.status, outcome.failed_index,
                                   outcome.completed, outcome.fault_address,
                                   outcome.elapsed_ns)) + b"".join(
            encode(r) for r in outcome.results)
        try:
            runs = self._memory.resolve_arrays(target.gpu_va, len(blob), write=True)
        except GpuFault as err:
            log.warning("context %d: cannot write results: %s", vm.ctx_id, err)
            return
        Buffer(target.gpu_va, len(blob), *runs).scatter(np.frombuffer(blob, np.uint8))

    # --- buffers -------------------------------------------------------------------

    def _buffer(self, vm: ContextVm, va: int, size: int, *, write: bool,
                align: int = 4) -> Buffer:
        if va % align:
            raise _Failure(Status.INVALID_ARGUMENT, f"GPU VA {va:#x} not {align}-aligned", va)
        mapping = vm.find(va, max(size, 1))
        if mapping is None:
            raise _Failure(Status.FAULT, f"[{va:#x}, +{size:#x}) is not mapped in context "
                           f"{vm.ctx_id}", va)
        if mapping.host is not None and mapping.host.invalidated:
            raise _Failure(Status.FAULT, f"resource {mapping.resource_id} at {va:#x} was "
                           "released", va)
        if write and mapping.readonly:
            raise _Failure(Status.FAULT, f"write to read-only resource "
                           f"{mapping.resource_id} at {va:#x}", va)
        try:
            addr, length = self._memory.resolve_arrays(va, size, write=write)
        except GpuFault as fault:
            raise _Failure(Status.FAULT, str(fault), fault.address) from None
        return Buffer(va, size, addr, length)

    # --- stream commands -------------------------------------------------------------

    def _map(self, vm: ContextVm, cmd: Command, prepared: Mapping | None,
             stats: KernelStats) -> int:
        body = cmd.body
        if not isinstance(body, MapResource):
            raise _Failure(Status.INVALID_COMMAND, "command body mismatch")
        if prepared is None or (prepared.host is not None and prepared.host.invalidated):
            raise _Failure(Status.INVALID_RESOURCE, f"resource {body.resource_id} cannot "
                           "be mapped (any more)")
        with vm.lock:
            vm.mappings[prepared.resource_id] = prepared
        return prepared.gpu_va

    def _unmap(self, vm: ContextVm, cmd: Command, prepared: Mapping | None,
               stats: KernelStats) -> int:
        body = cmd.body
        if not isinstance(body, UnmapResource):
            raise _Failure(Status.INVALID_COMMAND, "command body mismatch")
        with vm.lock:
            if vm.mappings.pop(body.resource_id, None) is None:
                raise _Failure(Status.INVALID_RESOURCE,
                               f"resource {body.resource_id} is not mapped")
        return 0

    def _fill(self, vm: ContextVm, cmd: Command, prepared: Mapping | None,
              stats: KernelStats) -> int:
        body = cmd.body
        if not isinstance(body, FillCmd):
            raise _Failure(Status.INVALID_COMMAND, "command body mismatch")
        if body.size % 4:
            raise _Failure(Status.INVALID_ARGUMENT, f"FILL of {body.size} bytes")
        kernels.fill_u32(self._buffer(vm, body.va, body.size, write=True), body.size // 4,
                         body.pattern, stats)
        return body.size

    def _copy(self, vm: ContextVm, cmd: Command, prepared: Mapping | None,
              stats: KernelStats) -> int:
        body = cmd.body
        if not isinstance(body, CopyCmd):
            raise _Failure(Status.INVALID_COMMAND, "command body mismatch")
        src = self._buffer(vm, body.src, body.size, write=False, align=1)
        dst = self._buffer(vm, body.dst, body.size, write=True, align=1)
        kernels.copy(dst, src, body.size, stats)
        return body.size

    def _signal(self, vm: ContextVm, cmd: Command, prepared: Mapping | None,
                stats: KernelStats) -> int:
        body = cmd.body
        if not isinstance(body, SignalCmd):
            raise _Failure(Status.INVALID_COMMAND, "command body mismatch")
        target = self._buffer(vm, body.va, 8, write=True, align=8)
        target.scatter(np.frombuffer(_U64.pack(body.value), np.uint8))
        return body.value

    def _dispatch(self, vm: ContextVm, cmd: Command, prepared: Mapping | None,
                  stats: KernelStats) -> int:
        body = cmd.body
        if not isinstance(body, Dispatch):
            raise _Failure(Status.INVALID_COMMAND, "command body mismatch")
        kernel = Kernel(body.kernel_id)
        arg = cmd.arg_value

        def count(i: int, limit: int = 1 << 40) -> int:
            value = int(arg(i))
            if value > limit:
                raise _Failure(Status.INVALID_ARGUMENT, f"argument {i} = {value} is too large")
            return value

        if kernel is Kernel.FILL_U32:
            n = count(1)
            kernels.fill_u32(self._buffer(vm, int(arg(0)), 4 * n, write=True), n,
                             int(arg(2)), stats)
            return n
        if kernel is Kernel.COPY:
            n = count(2)
            src = self._buffer(vm, int(arg(1)), n, write=False, align=1)
            dst = self._buffer(vm, int(arg(0)), n, write=True, align=1)
            kernels.copy(dst, src, n, stats)
            return n
        if kernel is Kernel.VADD_F32:
            n = count(3)
            a = self._buffer(vm, int(arg(1)), 4 * n, write=False)
            b = self._buffer(vm, int(arg(2)), 4 * n, write=False)
            kernels.vadd_f32(self._buffer(vm, int(arg(0)), 4 * n, write=True), a, b, n, stats)
            return n
        if kernel is Kernel.SAXPY_F32:
            n = count(2)
            x = self._buffer(vm, int(arg(1)), 4 * n, write=False)
            y = self._buffer(vm, int(arg(0)), 4 * n, write=True)
            kernels.saxpy_f32(y, x, n, float(arg(3)), stats)
            return n
        if kernel is Kernel.REDUCE_SUM_F32:
            n = count(1)
            x = self._buffer(vm, int(arg(0)), 4 * n, write=False)
            out = self._buffer(vm, int(arg(2)), 4, write=True)
            total = kernels.reduce_sum_f32(x, n, out, stats)
            return int(_U64.unpack(_F64.pack(total))[0])
        if kernel is Kernel.MATMUL_F32:
            m, n, k = count(3, _MAX_DIM), count(4, _MAX_DIM), count(5, _MAX_DIM)
            a = self._buffer(vm, int(arg(1)), 4 * m * k, write=False)
            b = self._buffer(vm, int(arg(2)), 4 * k * n, write=False)
            c = self._buffer(vm, int(arg(0)), 4 * m * n, write=True)
            kernels.matmul_f32(c, a, b, m, n, k, stats)
            return m * n
        if kernel is Kernel.CHECKSUM_CRC32:
            n = count(1)
            return kernels.checksum_crc32(self._buffer(vm, int(arg(0)), n, write=False,
                                                       align=1), n, stats)
        raise _Failure(Status.INVALID_COMMAND, f"kernel {kernel.name}")  # pragma: no cover

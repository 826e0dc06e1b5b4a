"""Guest side of the compute stream: commands by name, and the result record decoded."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.compute import (
    CmdResult,
    CopyCmd,
    Dispatch,
    FillCmd,
    Kernel,
    KernelArg,
    MapResource,
    Op,
    ResultHeader,
    SignalCmd,
    Status,
    UnmapResource,
    encode_command,
)
from protocol.wire import decode, layout

__all__ = ["CMD_RESULT_SIZE", "RESULT_HEADER_SIZE", "SubmissionResults", "copy_cmd",
           "dispatch", "fill_cmd", "map_cmd", "results_size", "signal_cmd", "unmap_cmd"]

RESULT_HEADER_SIZE = layout(ResultHeader).size
CMD_RESULT_SIZE = layout(CmdResult).size


def map_cmd(resource_id: int, cmd_id: int = 0) -> bytes:
    """MAP_RESOURCE (its result value is the GPU VA)."""
    return encode_command(Op.MAP_RESOURCE, MapResource(resource_id), cmd_id)


def unmap_cmd(resource_id: int, cmd_id: int = 0) -> bytes:
    """UNMAP_RESOURCE."""
    return encode_command(Op.UNMAP_RESOURCE, UnmapResource(resource_id), cmd_id)


def dispatch(kernel: Kernel, *args: KernelArg, cmd_id: int = 0) -> bytes:
    """DISPATCH of ``kernel`` with typed arguments."""
    return encode_command(Op.DISPATCH, Dispatch(kernel, len(args)), cmd_id, args)


def fill_cmd(va: int, size: int, pattern: int, cmd_id: int = 0) -> bytes:
    """FILL ``size`` bytes at ``va`` with a 32-bit pattern."""
    return encode_command(Op.FILL, FillCmd(va, size, pattern), cmd_id)


def copy_cmd(dst: int, src: int, size: int, cmd_id: int = 0) -> bytes:
    """COPY (memmove) in GPU virtual space."""
    return encode_command(Op.COPY, CopyCmd(dst, src, size), cmd_id)


def signal_cmd(va: int, value: int, cmd_id: int = 0) -> bytes:
    """SIGNAL: store a u64 at ``va``."""
    return encode_command(Op.SIGNAL, SignalCmd(va, value), cmd_id)


def results_size(count: int) -> int:
    """Bytes of the result record of a ``count``-command stream."""
    return RESULT_HEADER_SIZE + count * CMD_RESULT_SIZE


@dataclass(frozen=True, slots=True)
class SubmissionResults:
    """A decoded result record."""

    header: ResultHeader
    commands: list[CmdResult]

    @classmethod
    def decode(cls, raw: bytes, count: int) -> SubmissionResults:
        """Decode the header and ``count`` command results."""
        head = decode(ResultHeader, raw)
        cmds = [decode(CmdResult, raw, RESULT_HEADER_SIZE + i * CMD_RESULT_SIZE)
                for i in range(count)]
        return cls(head, cmds)

    @property
    def status(self) -> Status:
        """The submission's status."""
        return Status(self.header.status)

    def statuses(self) -> list[Status]:
        """Each command's status."""
        return [Status(c.status) for c in self.commands]

    def values(self) -> list[int]:
        """Each command's result value."""
        return [c.value for c in self.commands]

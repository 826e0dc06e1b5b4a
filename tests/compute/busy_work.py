"""Long-running compute work to observe fence ordering with: CRC-32s over a big blob."""

from __future__ import annotations

from protocol.compute import Kernel, buffer_arg, u64_arg
from tests.userptr.compute_stream import dispatch
from tests.userptr.vm import ComputeContext

__all__ = ["BIG", "BusyBlob"]

MiB = 1 << 20
#: the blob the busy work reads
BIG = 4 * MiB


class BusyBlob:
    """A big mapped blob in ``ctx`` to run many checksums over."""

    def __init__(self, ctx: ComputeContext) -> None:
        self.blob = ctx.blob(BIG)
        (self.va,) = ctx.map(self.blob)

    def work(self, repeats: int) -> list[bytes]:
        """``repeats`` CRC-32s over the whole blob (about 10 ms each on an idle core)."""
        return [dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(self.va), u64_arg(BIG))] * repeats

"""The least Python that answers a batch of RESOURCE_CREATE_2D / RESOURCE_UNREF chains.

Each chain is one INDIRECT descriptor whose table holds the command and the response
buffer, as Linux builds them.  The ring side is whole-batch numpy work (heads,
descriptors, tables, headers, answers, used entries gathered or written at once); only
the images are a Python loop: ``np.zeros`` and a dict, as the device allocates them.
Nothing is checked -- not the ring, the ids, the formats, the sizes, a budget -- and
nothing else is served.  Not a device: the floor a Python device's cost sits above,
measured in process by ``bench_device.py`` and end to end by ``bench_2d.py``'s
``floor`` back-end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocol.virtio_gpu import CTRL_HDR_SIZE, CtrlHdr, ResourceCreate2d
from protocol.virtio_gpu_codes import Cmd, Resp
from protocol.virtqueue import VirtqDesc, VirtqUsedElem
from protocol.wire import layout

__all__ = ["Ring", "serve_batch"]

_DESC = layout(VirtqDesc).dtype
_HDR = layout(CtrlHdr).dtype
_USED = layout(VirtqUsedElem).dtype
#: CREATE_2D's body; UNREF's starts with the resource id too (the rest is unused)
_BODY = layout(ResourceCreate2d).dtype
_HDR_BYTES = np.arange(CTRL_HDR_SIZE, dtype=np.uint64)
_BODY_BYTES = CTRL_HDR_SIZE + np.arange(_BODY.itemsize, dtype=np.uint64)
_PAIR = np.array([0, 1], dtype=np.uint64)
_CREATE = int(Cmd.RESOURCE_CREATE_2D)


@dataclass(frozen=True)
class Ring:
    """A split ring of ``num`` entries as numpy views of guest RAM."""

    num: int
    #: the descriptor table
    desc: npt.NDArray[np.void]
    #: ``struct vring_avail`` as u16: flags, idx, ring[num], used_event
    avail: npt.NDArray[np.uint16]
    #: ``struct vring_used``'s idx (one u16)
    used_idx: npt.NDArray[np.uint16]
    #: its ring of ``num`` used elements
    used_ring: npt.NDArray[np.void]
    #: ``avail_event`` after it (one u16, read by a driver with EVENT_IDX)
    avail_event: npt.NDArray[np.uint16]

    def heads(self, first_avail: int, count: int) -> npt.NDArray[np.uint16]:
        """The ``count`` heads made available from ring index ``first_avail``."""
        return self.avail[2 + (first_avail + np.arange(count)) % self.num]

    @classmethod
    def over(cls, ram: npt.NDArray[np.uint8], num: int, desc: int, avail: int,
             used: int) -> Ring:
        """The ring whose parts start at the byte offsets ``desc``, ``avail`` and
        ``used`` of ``ram``."""
        return cls(num, ram[desc:desc + 16 * num].view(_DESC),
                   ram[avail:avail + 6 + 2 * num].view("<u2"),
                   ram[used + 2:used + 4].view("<u2"),
                   ram[used + 4:used + 4 + 8 * num].view(_USED),
                   ram[used + 4 + 8 * num:used + 6 + 8 * num].view("<u2"))


def serve_batch(ram: npt.NDArray[np.uint8], ring: Ring, heads: npt.NDArray[np.uint16],
                first_used: int, images: dict[int, npt.NDArray[np.uint8]]) -> None:
    """Answer the chains of ``heads`` (see :meth:`Ring.heads`), using used-ring entries
    from ``first_used``; guest-physical addresses are byte offsets of ``ram`` (its
    tables 16-byte aligned)."""
    count = len(heads)
    pairs = ram.view(_DESC)[(ring.desc["addr"][heads] >> 4)[:, None] + _PAIR]
    cmd_at, resp_at = pairs["addr"][:, 0], pairs["addr"][:, 1]
    kinds = ram[cmd_at[:, None] + _HDR_BYTES].view(_HDR)[:, 0]["type"].tolist()
    bodies = ram[cmd_at[:, None] + _BODY_BYTES].view(_BODY)[:, 0].tolist()
    resps = np.full(count, Resp.OK_NODATA, dtype=np.uint32)
    for i, (kind, (rid, _fmt, width, height)) in enumerate(zip(kinds, bodies, strict=True)):
        if kind == _CREATE:
            images[rid] = np.zeros((height, width * 4), np.uint8)
        elif images.pop(rid, None) is None:
            resps[i] = Resp.ERR_INVALID_RESOURCE_ID
    answers = np.zeros(count, _HDR)
    answers["type"] = resps
    ram[resp_at[:, None] + _HDR_BYTES] = answers.view(np.uint8).reshape(count, -1)
    slots = (first_used + np.arange(count)) % ring.num
    ring.used_ring["id"][slots] = heads
    ring.used_ring["len"][slots] = CTRL_HDR_SIZE
    ring.used_idx[0] = (first_used + count) & 0xFFFF

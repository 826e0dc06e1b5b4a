"""What differs between the QEMU versions the simulator plays (protocol doc §1-§3, §8)."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.display import DisplayFeature
from protocol.virtio_gpu_codes import Feature

__all__ = ["FLAVOURS", "QEMU_7_2", "QEMU_10", "QemuFlavour"]

#: transport bits QEMU offers the guest whatever the back-end says (q35 >= 7.2 machine)
TRANSPORT_FEATURES = (Feature.RING_INDIRECT_DESC | Feature.RING_EVENT_IDX | Feature.VERSION_1
                      | Feature.RING_RESET)


@dataclass(frozen=True, slots=True)
class QemuFlavour:
    """Behaviour of one QEMU version as a vhost-user-gpu front-end."""

    name: str
    #: ``VHOST_USER_PROTOCOL_FEATURE_MASK``: protocol bits QEMU knows
    protocol_mask: int
    #: SET_VRING_KICK/CALL/ERR/ENABLE carry NEED_REPLY when REPLY_ACK is negotiated
    need_reply_on_vring: bool
    #: GET_FEATURES sent after SET_VRING_ENABLE as a barrier when REPLY_ACK is missing
    sync_after_enable: bool
    #: the display socket's GET_PROTOCOL_FEATURES reply
    display_features: int
    #: QEMU answers the display socket's GET_EDID
    answers_edid: bool
    #: GPU feature bits passed from the back-end's offer to the guest
    passthrough: int

    def guest_features(self, backend_offer: int) -> int:
        """Features a Linux guest sees (and acks) behind this QEMU."""
        return int(TRANSPORT_FEATURES) | (backend_offer & self.passthrough)


QEMU_7_2 = QemuFlavour(
    name="7.2",
    protocol_mask=(1 << 17) - 1,
    need_reply_on_vring=False,
    sync_after_enable=False,
    display_features=0,
    answers_edid=False,
    passthrough=int(Feature.VIRGL | Feature.EDID),
)

QEMU_10 = QemuFlavour(
    name="10.x",
    protocol_mask=(1 << 20) - 1,
    need_reply_on_vring=True,
    sync_after_enable=True,
    display_features=int(DisplayFeature.EDID | DisplayFeature.DMABUF2),
    answers_edid=True,
    passthrough=int(Feature.VIRGL | Feature.EDID | Feature.RESOURCE_UUID),
)

FLAVOURS = {f.name: f for f in (QEMU_7_2, QEMU_10)}

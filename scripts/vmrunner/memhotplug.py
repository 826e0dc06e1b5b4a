"""The guest's memory hotplug requests: a pc-dimm of shared memfd memory plugged in and
out over QMP while the VM runs.

QEMU hands guest RAM that appears at run time to a vhost-user back-end as ADD_MEM_REG
(REM_MEM_REG when it goes), with the rings live.  The guest asks for a DIMM, onlines
it, puts a USERPTR buffer in it and has the host GPU use it; then it offlines the
memory and asks for the DIMM to be removed (QEMU finishes the removal once the guest
has ejected it).

Requests (control channel):

* ``hotplug-memory size=MIB`` -> ``ok id=dimmN addr=0x... size=BYTES``;
* ``unplug-memory id=dimmN`` -> ``ok`` once QEMU no longer lists the DIMM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

from qemu.qmp import QMPClient

from .control import parse_fields
from .qemu import HOTPLUG_MAX_MIB, HOTPLUG_SLOTS, qmp_execute

UNPLUG_TIMEOUT = 30.0


class MemoryHotplug:
    """Serves ``hotplug-memory`` and ``unplug-memory`` over a QMP connection."""

    def __init__(self, qmp: QMPClient, poll_interval: float = 0.1,
                 unplug_timeout: float = UNPLUG_TIMEOUT) -> None:
        self.qmp = qmp
        self.poll_interval, self.unplug_timeout = poll_interval, unplug_timeout
        self._numbers = itertools.count(1)
        self.plugged: dict[str, int] = {}  # DIMM id -> bytes

    async def _dimms(self) -> dict[str, dict[str, Any]]:
        devices = await qmp_execute(self.qmp, "query-memory-devices")
        return {d["data"]["id"]: d["data"] for d in devices if d.get("type") == "dimm"}

    async def plug(self, args: str) -> str:
        """Add a memfd backend and a pc-dimm on it; answer with its guest address."""
        try:
            mib = int(parse_fields(args).get("size", ""))
        except ValueError:
            return f"error bad hotplug-memory request {args!r} (size=MIB)"
        room = HOTPLUG_MAX_MIB - sum(self.plugged.values()) // (1 << 20)
        if not (0 < mib <= room and mib % 128 == 0):  # x86 memory blocks are 128 MiB
            return f"error size must be a multiple of 128 MiB up to {room} MiB"
        if len(self.plugged) >= HOTPLUG_SLOTS:
            return f"error all {HOTPLUG_SLOTS} DIMM slots are in use"
        number = next(self._numbers)
        dimm, backend = f"dimm{number}", f"hotmem{number}"
        try:
            await qmp_execute(self.qmp, "object-add", {
                "qom-type": "memory-backend-memfd", "id": backend, "size": mib << 20,
                "share": True})
            try:
                await qmp_execute(self.qmp, "device_add", {"driver": "pc-dimm", "id": dimm,
                                                   "memdev": backend})
            except Exception:
                with contextlib.suppress(Exception):  # in use if device_add took effect
                    await qmp_execute(self.qmp, "object-del", {"id": backend})
                raise
        except Exception as error:  # QMP errors and timeouts go back to the guest
            return f"error hotplug failed: {error!r}"
        self.plugged[dimm] = mib << 20  # from here on, unplug-memory can remove it
        try:
            data = (await self._dimms())[dimm]
        except Exception as error:
            return f"error {dimm} was added but cannot be found: {error!r}"
        return f"ok id={dimm} addr={data['addr']:#x} size={data['size']}"

    async def unplug(self, args: str) -> str:
        """Ask QEMU to remove the DIMM, wait until the guest has ejected it, drop its
        memory backend."""
        dimm = parse_fields(args).get("id", "")
        if dimm not in self.plugged:
            return f"error no plugged DIMM {dimm!r}"
        try:
            await qmp_execute(self.qmp, "device_del", {"id": dimm})
            deadline = time.monotonic() + self.unplug_timeout
            while dimm in await self._dimms():
                if time.monotonic() > deadline:
                    return (f"error {dimm} still present after {self.unplug_timeout:g} s "
                            "(did the guest offline its memory?)")
                await asyncio.sleep(self.poll_interval)
            await qmp_execute(self.qmp, "object-del", {"id": dimm.replace("dimm", "hotmem")})
        except Exception as error:
            return f"error unplug failed: {error!r}"
        del self.plugged[dimm]
        return "ok"

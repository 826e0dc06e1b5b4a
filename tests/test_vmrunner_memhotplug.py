"""The runner's memory hotplug requests, with QEMU's QMP played by a fake machine."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from qemu.qmp import QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from vmrunner.memhotplug import MemoryHotplug
from vmrunner.qemu import HOTPLUG_MAX_MIB, HOTPLUG_SLOTS, VmLayout, qemu_command

BASE = 0x1_0000_0000


class FakeMachine:
    """Memory backends and pc-dimms; a DIMM asked to go stays listed for ``eject_polls``
    queries (the guest ejecting it), or for ever when ``eject_polls`` is None."""

    def __init__(self, eject_polls: int | None = 2, fail: str = "") -> None:
        self.backends: dict[str, int] = {}
        self.dimms: dict[str, tuple[str, int]] = {}  # id -> (memdev, addr)
        self.leaving: dict[str, int] = {}
        self.eject_polls, self.fail = eject_polls, fail
        self.commands: list[str] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.commands.append(command)
        args = arguments or {}
        if command == self.fail:
            raise RuntimeError(f"{command} refused")
        if command == "object-add":
            assert args["qom-type"] == "memory-backend-memfd" and args["share"] is True
            self.backends[args["id"]] = args["size"]
        elif command == "object-del":
            assert not any(memdev == args["id"] for memdev, _ in self.dimms.values())
            del self.backends[args["id"]]
        elif command == "device_add":
            assert args["driver"] == "pc-dimm"
            addr = BASE + sum(self.backends[m] for m, _ in self.dimms.values())
            self.dimms[args["id"]] = (args["memdev"], addr)
        elif command == "device_del":
            self.leaving[args["id"]] = self.eject_polls if self.eject_polls is not None else -1
        elif command == "query-memory-devices":
            for dimm, polls in list(self.leaving.items()):
                if polls == 0:
                    del self.dimms[dimm], self.leaving[dimm]
                elif polls > 0:
                    self.leaving[dimm] = polls - 1
            return [{"type": "dimm", "data": {"id": dimm, "memdev": memdev, "addr": addr,
                                              "size": self.backends[memdev]}}
                    for dimm, (memdev, addr) in self.dimms.items()]
        return {}


def serve(machine: FakeMachine, *requests: str) -> list[str]:
    hotplug = MemoryHotplug(cast(QMPClient, machine), poll_interval=0.001)

    async def run() -> list[str]:
        replies = []
        for request in requests:
            verb, _, args = request.partition(" ")
            handler = hotplug.plug if verb == "hotplug-memory" else hotplug.unplug
            replies.append(await handler(args))
        return replies
    return asyncio.run(run())


def test_a_dimm_is_plugged_and_unplugged() -> None:
    machine = FakeMachine()
    replies = serve(machine, "hotplug-memory size=256", "hotplug-memory size=128",
                    "unplug-memory id=dimm1", "unplug-memory id=dimm2")
    assert replies == [f"ok id=dimm1 addr={BASE:#x} size={256 << 20}",
                       f"ok id=dimm2 addr={BASE + (256 << 20):#x} size={128 << 20}",
                       "ok", "ok"]
    assert machine.backends == {} and machine.dimms == {}


@pytest.mark.parametrize("request_", ["hotplug-memory size=0", "hotplug-memory size=100",
                                      "hotplug-memory size=x", "hotplug-memory",
                                      f"hotplug-memory size={HOTPLUG_MAX_MIB + 128}",
                                      "unplug-memory id=dimm1", "unplug-memory id=../x"])
def test_bad_requests_touch_nothing(request_: str) -> None:
    machine = FakeMachine()
    [reply] = serve(machine, request_)
    assert reply.startswith("error ") and machine.commands == []


def test_the_slots_and_the_room_are_bounded() -> None:
    machine = FakeMachine()
    requests = ["hotplug-memory size=128"] * (HOTPLUG_SLOTS + 1)
    replies = serve(machine, *requests)
    assert all(r.startswith("ok ") for r in replies[:HOTPLUG_SLOTS])
    assert replies[-1] == f"error all {HOTPLUG_SLOTS} DIMM slots are in use"
    replies = serve(FakeMachine(), f"hotplug-memory size={HOTPLUG_MAX_MIB - 128}",
                    "hotplug-memory size=256")
    assert replies[1] == "error size must be a multiple of 128 MiB up to 128 MiB"


def test_a_refused_dimm_gives_its_memory_back() -> None:
    machine = FakeMachine(fail="device_add")
    [reply] = serve(machine, "hotplug-memory size=128")
    assert reply == "error hotplug failed: RuntimeError('device_add refused')"
    assert machine.backends == {}


def test_a_dimm_added_but_not_listed_can_still_be_unplugged() -> None:
    machine = FakeMachine()
    hotplug = MemoryHotplug(cast(QMPClient, machine), poll_interval=0.001)

    async def run() -> tuple[str, str]:
        real = machine.execute

        async def lookup_fails(command: str, arguments: dict[str, Any] | None = None) -> Any:
            if command == "query-memory-devices" and not machine.leaving:
                raise TimeoutError()
            return await real(command, arguments)

        machine.execute = lookup_fails  # type: ignore[method-assign]
        return await hotplug.plug("size=128"), await hotplug.unplug("id=dimm1")

    plugged, unplugged = asyncio.run(run())
    assert plugged == "error dimm1 was added but cannot be found: TimeoutError()"
    assert unplugged == "ok" and machine.dimms == {} and machine.backends == {}


def test_a_dimm_the_guest_keeps_is_reported_and_kept() -> None:
    machine = FakeMachine(eject_polls=None)
    hotplug = MemoryHotplug(cast(QMPClient, machine), poll_interval=0.001,
                            unplug_timeout=0.05)

    async def run() -> str:
        await hotplug.plug("size=128")
        return await hotplug.unplug("id=dimm1")

    reply = asyncio.run(run())
    assert reply.startswith("error dimm1 still present after 0.05 s")
    assert "dimm1" in machine.dimms and "hotmem1" in machine.backends  # not pulled away
    assert hotplug.plugged == {"dimm1": 128 << 20}


def test_the_machine_has_room_for_the_dimms(tmp_path: Path) -> None:
    layout = VmLayout(kernel_image=tmp_path / "k", initramfs=tmp_path / "i", cmdline="",
                      gpu_sockets=(tmp_path / "g",), control_socket=tmp_path / "c",
                      qmp_socket=tmp_path / "q", serial_log=tmp_path / "s", memory_mib=1024)
    argv = qemu_command(layout)
    assert argv[argv.index("-m") + 1] == \
        f"1024M,slots={HOTPLUG_SLOTS},maxmem={1024 + HOTPLUG_MAX_MIB}M"

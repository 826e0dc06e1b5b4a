"""The runner's ``pause`` request: QMP stop, a wait, QMP cont, with QEMU played by a fake."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from qemu.qmp import QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from vmrunner.vmpause import VmPauser


class FakeVm:
    """QMP stop/cont/query-status on a run state; a command can be made to fail, and
    ``stop`` or ``cont`` can be made to leave the state as it was."""

    def __init__(self, fail: str = "", inert: str = "", lost: str = "") -> None:
        self.running = True
        self.commands: list[str] = []
        self.fail, self.inert, self.lost = fail, inert, lost

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert arguments is None  # stop, cont and query-status take none
        self.commands.append(command)
        if command == self.fail:
            raise RuntimeError(f"{command} refused")
        if command == "query-status":
            return {"running": self.running, "status": "running" if self.running else "paused"}
        if command != self.inert:
            self.running = command == "cont"
        if command == self.lost:
            raise TimeoutError()  # it took effect; the reply did not come
        return {}


def ask(vm: FakeVm, args: str) -> str:
    return asyncio.run(VmPauser(cast(QMPClient, vm)).handle_request(args))


def test_pause_stops_waits_and_continues() -> None:
    vm = FakeVm()
    reply = ask(vm, "seconds=0.2")
    assert vm.commands == ["stop", "query-status", "cont", "query-status"]
    assert vm.running
    status, _, paused = reply.partition("=")
    assert status == "ok paused" and 0.2 <= float(paused) < 5


def test_default_pause_is_half_a_second() -> None:
    reply = ask(FakeVm(), "")
    assert reply.startswith("ok paused=") and float(reply.partition("=")[2]) >= 0.5


@pytest.mark.parametrize("args", ["seconds=x", "seconds=nan", "seconds=-1", "seconds=10.5",
                                  "seconds=inf"])
def test_bad_requests_touch_nothing(args: str) -> None:
    vm = FakeVm()
    assert ask(vm, args).startswith("error ") and vm.commands == []


def test_a_refused_stop_is_answered() -> None:
    vm = FakeVm(fail="stop")
    assert ask(vm, "seconds=0") == "error stop failed: RuntimeError('stop refused')"
    assert vm.commands == ["stop", "query-status"] and vm.running


def test_a_stop_whose_reply_is_lost_is_undone() -> None:
    """The guest would stay frozen (and never time out its request) otherwise."""
    vm = FakeVm(lost="stop")
    assert ask(vm, "seconds=0") == "error stop failed: TimeoutError()"
    assert vm.commands == ["stop", "query-status", "cont"] and vm.running


@pytest.mark.parametrize("fail, inert, expected", [
    ("query-status", "",
     "error query-status after stop failed: RuntimeError('query-status refused')"),
    ("", "stop", "error the VM still runs after stop"),
    ("", "cont", "error the VM does not run after cont"),
    ("cont", "", "error cont failed (the VM stays stopped): RuntimeError('cont refused')"),
])
def test_cont_is_always_attempted_once_stopped(fail: str, inert: str, expected: str) -> None:
    vm = FakeVm(fail=fail, inert=inert)
    assert ask(vm, "seconds=0") == expected
    assert vm.commands[0] == "stop" and "cont" in vm.commands
    assert vm.running == (fail != "cont" and inert != "cont")


def test_a_failed_status_after_cont_is_answered() -> None:
    vm = FakeVm()
    calls = 0
    execute = vm.execute

    async def status_fails_second_time(command: str,
                                       arguments: dict[str, Any] | None = None) -> Any:
        nonlocal calls
        calls += command == "query-status"
        if calls == 2:
            raise RuntimeError("monitor gone")
        return await execute(command, arguments)

    vm.execute = status_fails_second_time  # type: ignore[method-assign]
    assert ask(vm, "seconds=0") == ("error query-status after cont failed: "
                                    "RuntimeError('monitor gone')")
    assert vm.running

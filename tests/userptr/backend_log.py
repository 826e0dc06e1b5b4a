"""What the back-end's debug log says about userptr registrations."""

from __future__ import annotations

import re

from tests.userptr.vm import Vm

__all__ = ["DEBUG", "registered_path"]

DEBUG = ("--log-level", "debug")
_REGISTERED = re.compile(r"resource (\d+): userptr of (\d+) bytes in (\d+) ranges at GPU VA "
                         r"0x[0-9a-f]+ \(([a-z-]+)\)")


def registered_path(vm: Vm, resource_id: int) -> str:
    """The host path the back-end logged for a userptr blob (needs ``DEBUG``)."""
    vm.s.backend.wait_stderr(f"resource {resource_id}: userptr of", 5.0)
    for match in _REGISTERED.finditer(vm.s.backend.stderr):
        if int(match.group(1)) == resource_id:
            return match.group(4)
    raise AssertionError(f"no registration of resource {resource_id} in the log")

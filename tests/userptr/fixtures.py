"""Fixtures that start our back-end with a chosen command line and drive it.

``start_vm(*extra_args, **SessionConfig fields)`` starts ``python3 -m vgpu_backend``
with the extra arguments and returns a :class:`Vm` at DRIVER_OK.  At teardown of a
passed test every VM is disconnected and its back-end must exit 0 (its shutdown leak
check passed: no host GPU mapping, guest memory or fd left) with no display-protocol
violation; after a failed test the processes are killed.

``vm_pool`` (module scope) keeps one VM per command line and configuration for the
tests of a module that only add state (fresh ids, their own contexts); ``shared_vm`` is
its default VM.  At the end of the module they must exit 0 likewise, unless a test of
the module failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import fields

import pytest

from tests.frontend.backend_process import OURS_COMMAND, BackendProcess
from tests.frontend.session import Session, SessionConfig, close_sessions
from tests.userptr.vm import Vm

__all__ = ["VmFactory", "VmPool", "shared_vm", "start_vm", "vm", "vm_pool"]

VmFactory = Callable[..., Vm]
_CONFIG_FIELDS = frozenset(f.name for f in fields(SessionConfig))


@pytest.fixture
def start_vm(request: pytest.FixtureRequest) -> Iterator[VmFactory]:
    """Factory of started VMs on our back-end (see the module docstring)."""
    sessions: list[Session] = []

    def factory(*args: str, **config: object) -> Vm:
        return _start(args, config, sessions)

    yield factory
    report = getattr(request.node, "report_call", None)
    _close_all(sessions, passed=report is not None and report.passed)


def _start(args: tuple[str, ...], config: dict[str, object],
           sessions: list[Session]) -> Vm:
    unknown = set(config) - _CONFIG_FIELDS
    if unknown:
        raise TypeError(f"unknown SessionConfig fields {unknown}")
    process = BackendProcess([*OURS_COMMAND, *args], name="ours")
    session = Session(process, SessionConfig(**config))  # type: ignore[arg-type]
    sessions.append(session)
    session.realize()
    session.probe()
    session.driver_ok()
    return Vm(session)


def _close_all(sessions: list[Session], *, passed: bool) -> None:
    """Disconnect every session; when ``passed``, each back-end must exit 0."""
    problems = close_sessions(sessions, passed=passed)
    if problems:
        pytest.fail("; ".join(problems))


class VmPool:
    """VMs shared by the tests of one module, one per command line and configuration
    (for tests that only add state with fresh ids and check the device keeps serving)."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self._vms: dict[tuple[tuple[str, ...], tuple[tuple[str, object], ...]], Vm] = {}

    def get(self, *args: str, **config: object) -> Vm:
        """The pool's VM for this command line and configuration (started on first use)."""
        key = (args, tuple(sorted(config.items())))
        found = self._vms.get(key)
        if found is None or found.s.closed or not found.s.backend.alive():
            found = self._vms[key] = _start(args, config, self.sessions)
        return found


@pytest.fixture(scope="module")
def vm_pool(request: pytest.FixtureRequest) -> Iterator[VmPool]:
    """Module-wide VMs; at the end of the module each must exit 0 unless a test of the
    module failed (then they are killed)."""
    failed_before = request.session.testsfailed
    pool = VmPool()
    yield pool
    _close_all(pool.sessions, passed=request.session.testsfailed == failed_before)


@pytest.fixture
def vm(start_vm: VmFactory) -> Vm:
    """A VM on our back-end with default options."""
    return start_vm()


@pytest.fixture
def shared_vm(vm_pool: VmPool) -> Vm:
    """The module's VM with default options (for tests that only add state)."""
    return vm_pool.get()

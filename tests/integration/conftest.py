"""Fixtures that start a real back-end process and drive it with the simulator.

``backend`` is parametrised over "ours" (``python3 -m vgpu_backend``) and "reference"
(QEMU's C ``vhost-user-gpu``); ``--backend`` narrows it.  ``flavour`` defaults to QEMU
10.x; tests that care take both with ``@pytest.mark.parametrize("flavour", FLAVOUR_NAMES,
indirect=True)``.  Every session is closed at teardown: the back-end must exit 0 after
the disconnect and QEMU must not have seen a display-protocol violation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from protocol.virtio_gpu_codes import Feature
from tests.frontend.backend_process import OURS_COMMAND, BackendProcess
from tests.frontend.flavour import FLAVOURS, QEMU_7_2, QEMU_10, QemuFlavour
from tests.frontend.session import Session, SessionConfig, close_sessions

REPO_ROOT = Path(__file__).resolve().parents[2]
FLAVOUR_NAMES = [QEMU_7_2.name, QEMU_10.name]


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Which back-end a test drives and how to start it."""

    name: str
    command: tuple[str, ...]

    @property
    def is_ours(self) -> bool:
        """The back-end under development."""
        return self.name == "ours"

    def require_ours(self, reason: str) -> None:
        """Skip on the reference back-end, naming what it does differently."""
        if not self.is_ours:
            pytest.skip(f"reference back-end: {reason}")

    def start(self, *, fd_mode: bool = False, num_scanouts: int = 1,
              extra_args: Sequence[str] = ()) -> BackendProcess:
        """Start the process (``--fd`` instead of ``--socket-path`` with ``fd_mode``;
        ``extra_args`` after the command's own).

        Ours must be told QEMU's ``max_outputs``; the reference always allows 16.
        """
        command = [*self.command, *extra_args]
        if self.is_ours and num_scanouts != 1:
            command += ["--max-outputs", str(num_scanouts)]
        if fd_mode:
            at = command.index("--socket-path")
            command[at:at + 2] = ["--fd", "{fd}"]
        return BackendProcess(command, name=self.name)


@pytest.fixture(params=["ours", "reference"])
def backend(request: pytest.FixtureRequest) -> BackendSpec:
    """The back-end under test."""
    name: str = request.param
    chosen = request.config.getoption("--backend") or ["ours", "reference"]
    if name not in chosen:
        pytest.skip(f"--backend {' '.join(chosen)} excludes {name}")
    if name == "ours":
        if not (REPO_ROOT / "vgpu_backend" / "__main__.py").exists():
            pytest.skip("our back-end has no vgpu_backend/__main__.py yet")
        return BackendSpec(name, tuple(OURS_COMMAND))
    binary = str(request.config.getoption("--reference-binary"))
    if not os.access(binary, os.X_OK):
        pytest.skip(f"reference back-end {binary} is not installed")
    return BackendSpec(name, (binary, "--socket-path", "{socket}"))


@pytest.fixture
def flavour(request: pytest.FixtureRequest) -> QemuFlavour:
    """The QEMU version played (QEMU 10.x unless parametrised)."""
    return FLAVOURS[getattr(request, "param", QEMU_10.name)]


SessionFactory = Callable[..., Session]


@pytest.fixture
def open_session(request: pytest.FixtureRequest, backend: BackendSpec,
                 flavour: QemuFlavour) -> Iterator[SessionFactory]:
    """Factory: ``open_session(start=True, fd_mode=False, backend_args=(), **SessionConfig
    fields)`` (``backend_args``: more options for the back-end's command line).

    With ``start`` the session is realized, probed and at DRIVER_OK.  Against the
    reference with the 7.2 flavour the guest does not ack EDID: the 10.x reference exits
    when EDID is acked but QEMU's display protocol lacks EDID (as with a real QEMU 7.2).
    """
    sessions: list[Session] = []
    config_names = {f.name for f in fields(SessionConfig)}

    def factory(*, start: bool = True, fd_mode: bool = False, backend_args: Sequence[str] = (),
                **overrides: Any) -> Session:
        unknown = set(overrides) - config_names
        if unknown:
            raise TypeError(f"unknown SessionConfig fields {unknown}")
        overrides.setdefault("flavour", flavour)
        if not backend.is_ours and overrides["flavour"] is QEMU_7_2:
            overrides["drop_guest_features"] = (overrides.get("drop_guest_features", 0)
                                                | Feature.EDID)
        process = backend.start(fd_mode=fd_mode,
                                num_scanouts=int(overrides.get("num_scanouts", 1)),
                                extra_args=backend_args)
        session = Session(process, SessionConfig(**overrides))
        sessions.append(session)
        if start:
            session.realize()
            session.probe()
            session.driver_ok()
        return session

    yield factory
    call_report = getattr(request.node, "report_call", None)
    problems = close_sessions(sessions,
                              passed=call_report is not None and call_report.passed)
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def session(open_session: SessionFactory) -> Session:
    """A started session with default settings."""
    return open_session()

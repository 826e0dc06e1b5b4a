"""Test-wide options: which back-ends the integration tests drive."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.frontend.backend_process import REFERENCE_BINARY


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--backend`` and ``--reference-binary``."""
    group = parser.getgroup("vgpu-backend")
    group.addoption("--backend", action="append", choices=("ours", "reference"),
                    help="back-end(s) the integration tests drive (default: both)")
    group.addoption("--reference-binary", default=REFERENCE_BINARY,
                    help="QEMU's C vhost-user-gpu back-end (default %(default)s)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect integration tests for back-ends ``--backend`` did not choose."""
    chosen = config.getoption("--backend")
    if not chosen:
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("backend") if callspec is not None else None
        (drop if name is not None and name not in chosen else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's report on the item (session teardown looks at it)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report

"""The documents render: README.rst and CONTRIBUTING.rst are valid reStructuredText
(a malformed table silently loses its rows on PyPI and in most viewers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from docutils.core import publish_doctree
from docutils.utils import SystemMessage

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["README.rst", "CONTRIBUTING.rst"])
def test_document_renders_without_warnings(name: str) -> None:
    text = (ROOT / name).read_text()
    try:
        publish_doctree(text, source_path=str(ROOT / name),
                        settings_overrides={"halt_level": 2, "report_level": 2,
                                            "warning_stream": False})
    except SystemMessage as problem:
        pytest.fail(f"{name}: {problem}")


def test_readme_starts_with_the_two_commands() -> None:
    """The first code block: set up and run the demo; set up and run the tests."""
    text = (ROOT / "README.rst").read_text()
    block = text.split(".. code-block:: sh", 1)[1].strip().splitlines()
    commands = [line.split("#")[0].strip() for line in block[:2]]
    assert commands == ["sh scripts/demo.sh", "sh scripts/test.sh"]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert [line for line in ci_lines if line in commands] == commands[::-1]

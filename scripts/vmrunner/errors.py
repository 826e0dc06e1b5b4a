"""Exceptions and process exit codes of the VM runner."""

from __future__ import annotations

# 0-5 are the guest pytest's own exit codes, passed through unchanged.
EXIT_HARNESS_ERROR = 10  # the VM, a back-end or the guest init failed
EXIT_CONSOLE_CHECK_FAILED = 11  # console-check ran but the pixels were wrong
EXIT_TIMEOUT = 124  # same convention as coreutils timeout(1)


class HarnessError(Exception):
    """The runner could not do its job (not a test failure)."""

    exit_code = EXIT_HARNESS_ERROR


class HarnessTimeout(HarnessError):
    """A phase did not finish within its time limit."""

    exit_code = EXIT_TIMEOUT

"""The `test` and `console-check` commands of scripts/vm.py."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from .artifacts import GuestArtifacts, prepare_artifacts
from .console_check import check_console, parse_geometry
from .control import parse_fields
from .errors import EXIT_CONSOLE_CHECK_FAILED, EXIT_HARNESS_ERROR, HarnessError
from .junit import read_junit, summarize
from .processes import tail
from .screendump import parse_ppm
from .session import PhaseClock, SessionOptions, VmSession

CONSOLE_SETTLE_TIMEOUT = 15.0  # how long the display may lag behind the guest's writes
# Guest kernel lines worth a look even when the tests pass (lockups, oopses, driver errors).
KERNEL_TROUBLE_RE = re.compile(r"BUG:|WARNING:|Oops|soft lockup|stall|Call Trace|\*ERROR\*|"
                               r"Kernel panic")


def _prepare(options: SessionOptions, clock: PhaseClock,
             kernel_package: str | None) -> GuestArtifacts:
    with clock.phase("artifacts (build/cache check)"):
        root_kind = options.guest_root if options.mode in ("test", "demo") else "none"
        artifacts = prepare_artifacts(root_kind, kernel_package)
    built = ", ".join(artifacts.built) or "nothing, all cached"
    print(f"vm: kernel {artifacts.kernel.release} ({artifacts.kernel.package_version}), "
          f"{artifacts.kernel.image.name}; built: {built}", flush=True)
    return artifacts


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    """asyncio.run that turns SIGTERM into cancellation, so every child gets cleaned up."""
    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coroutine
        except asyncio.CancelledError:
            print("vm: terminated (SIGTERM); QEMU and the back-ends were stopped", file=sys.stderr)
            return 128 + signal.SIGTERM
    return asyncio.run(main())


def _print_guest_boot(event_fields: dict[str, str]) -> None:
    start, modules = event_fields.get("start"), event_fields.get("modules")
    if start and modules:
        print(f"vm: guest uptime at init {float(start):.2f} s, modules loaded after "
              f"{float(modules) - float(start):.2f} s more", flush=True)


def print_kernel_trouble(serial_log: Path, limit: int = 20) -> None:
    """Print the guest kernel's error lines from the serial log, if any."""
    text = serial_log.read_bytes().decode(errors="replace") if serial_log.exists() else ""
    trouble = [line for line in text.splitlines() if KERNEL_TROUBLE_RE.search(line)]
    if trouble:
        print(f"vm: the guest kernel reported ({len(trouble)} lines, see {serial_log}):")
        for line in trouble[:limit]:
            print(f"  {line[:200]}")


def _pytest_output(serial_log: Path) -> str:
    text = serial_log.read_bytes().decode(errors="replace") if serial_log.exists() else ""
    begin = text.find("vgpu-init: event pytest-start")
    end = text.find("vgpu-init: event pytest-exit", max(begin, 0))
    return text[begin:end if end >= 0 else None] if begin >= 0 else tail(serial_log)


def run_test(options: SessionOptions, pytest_args: list[str],
             kernel_package: str | None = None) -> int:
    """Boot the guest root, run guest_tests/ with pytest, return pytest's exit code."""
    clock = PhaseClock()
    try:
        artifacts = _prepare(options, clock, kernel_package)
    except HarnessError as error:
        print(f"vm: ERROR: {error}", file=sys.stderr)
        return error.exit_code
    return _run(_test(options, artifacts, clock, pytest_args))


async def _test(options: SessionOptions, artifacts: GuestArtifacts, clock: PhaseClock,
                pytest_args: list[str]) -> int:
    session = VmSession(options, artifacts, clock)
    session.write_guest_env(pytest_args, options.per_test_timeout)
    exit_file = session.results / "exit-code"
    exit_file.unlink(missing_ok=True)
    try:
        with clock.phase("back-end start"):
            await session.start_backends()
        with clock.phase("QEMU start to guest init"):
            await session.start_qemu()
            init = await session.expect("init", options.boot_timeout)
        _print_guest_boot(init.fields)
        with clock.phase("guest init to pytest start"):
            await session.expect("pytest-start", options.boot_timeout)
        with clock.phase("tests"):
            finished = await session.expect("pytest-exit", options.timeout)
        problems = await session.shutdown()
    except HarnessError as error:
        print(f"vm: ERROR: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    finally:
        await session.close()

    if not exit_file.exists():
        print(f"vm: ERROR: the guest wrote no {exit_file}", file=sys.stderr)
        return EXIT_HARNESS_ERROR
    code = int(exit_file.read_text().strip())
    if str(code) != finished.fields.get("rc"):
        print(f"vm: warning: exit-code file says {code}, the guest event said "
              f"{finished.fields.get('rc')}", file=sys.stderr)
    junit = session.results / "junit.xml"
    if code != 0 and not options.show_console:
        print(f"--- guest pytest output (from {session.serial_log}) ---\n"
              f"{_pytest_output(session.serial_log)}")
    print_kernel_trouble(session.serial_log)
    if junit.exists():
        print(summarize(read_junit(junit)))
    print(f"vm: phases:\n{clock.report()}")
    print(f"vm: results and logs in {session.results}")
    for problem in problems:
        print(f"vm: ERROR: {problem}", file=sys.stderr)
    if problems and code == 0:
        return EXIT_HARNESS_ERROR
    return code


class ConsoleJudge:
    """Answers the guest's `console-ready` request by checking screendumps."""

    def __init__(self, session: VmSession, screenshot: Path | None) -> None:
        self.session = session
        self.screenshot = screenshot
        self.failures: list[str] | None = None
        self.attempts = 0

    async def handle(self, args: str) -> str:
        """Screendump until the picture matches or CONSOLE_SETTLE_TIMEOUT passes."""
        dumper = self.session.screendumper
        assert dumper is not None
        try:
            geometry = parse_geometry(parse_fields(args))
        except ValueError as error:
            self.failures = [f"bad console-ready request: {error}"]
            return f"error {error}"
        print(f"vm: guest console: {geometry}", flush=True)
        deadline = time.monotonic() + CONSOLE_SETTLE_TIMEOUT
        ppm = dumper.directory / "console.ppm"
        while True:
            self.attempts += 1
            await dumper.dump(ppm)
            self.failures = check_console(parse_ppm(ppm.read_bytes()), geometry)
            if not self.failures or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        png = await dumper.dump(dumper.directory / "console.png", fmt="png")
        if self.screenshot is not None:
            self.screenshot.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, self.screenshot)
        return "ok pass" if not self.failures else f"ok fail {len(self.failures)}"


def run_console_check(options: SessionOptions, screenshot: Path | None,
                      kernel_package: str | None = None) -> int:
    """Boot the initramfs only and check the fbcon console and a /dev/fb0 pattern."""
    clock = PhaseClock()
    try:
        artifacts = _prepare(options, clock, kernel_package)
    except HarnessError as error:
        print(f"vm: ERROR: {error}", file=sys.stderr)
        return error.exit_code
    return _run(_console_check(options, artifacts, clock, screenshot))


async def _console_check(options: SessionOptions, artifacts: GuestArtifacts, clock: PhaseClock,
                         screenshot: Path | None) -> int:
    session = VmSession(options, artifacts, clock)
    judge = ConsoleJudge(session, screenshot)
    session.control.handlers["console-ready"] = judge.handle
    try:
        with clock.phase("back-end start"):
            await session.start_backends()
        with clock.phase("QEMU start to guest init"):
            await session.start_qemu()
            init = await session.expect("init", options.boot_timeout)
        _print_guest_boot(init.fields)
        with clock.phase("console check"):
            await session.expect("poweroff", options.boot_timeout)
        problems = await session.shutdown()
    except HarnessError as error:
        print(f"vm: ERROR: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    finally:
        await session.close()

    print_kernel_trouble(session.serial_log)
    print(f"vm: phases:\n{clock.report()}")
    print(f"vm: screendumps and logs in {session.results}")
    for problem in problems:
        print(f"vm: ERROR: {problem}", file=sys.stderr)
    if judge.failures is None:
        print("vm: ERROR: the guest never asked for the console check", file=sys.stderr)
        return EXIT_HARNESS_ERROR
    if judge.failures:
        print(f"vm: console check FAILED after {judge.attempts} screendump(s):", file=sys.stderr)
        for failure in judge.failures[:30]:
            print(f"  {failure}", file=sys.stderr)
        return EXIT_CONSOLE_CHECK_FAILED
    print(f"vm: console check passed ({judge.attempts} screendump(s))")
    return EXIT_HARNESS_ERROR if problems else 0

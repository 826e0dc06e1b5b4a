"""The `demo` command of scripts/vm.py: boot with the userspace GPU, run guest_tests.demo.

The guest init runs ``python3 -m guest_tests.demo ARGS`` in the guest root
(``vgpu.mode=demo``); its exit status comes back through the exit-code file and its
output is streamed from the serial log while it runs.  At the end the demo asks for a
screendump of the console, which shows its summary (``--screenshot`` saves it).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

from .commands import _prepare, _print_guest_boot, _run, print_kernel_trouble
from .errors import EXIT_HARNESS_ERROR, HarnessError
from .session import PhaseClock, SessionOptions, VmSession

__all__ = ["run_demo"]

DEMO_START = "vgpu-init: event pytest-start"
DEMO_END = "vgpu-init: event pytest-exit"
BOOT_HEARTBEAT = 10.0  # seconds between "still booting" lines
#: guest_tests.demo's exit statuses
DEMO_RESULTS = {0: "PASSED", 1: "FAILED", 2: "refused its arguments",
                77: "NOT SUPPORTED by this back-end (no USERPTR)"}


async def _stream_demo(serial_log: Path) -> None:
    """Print the guest console from the demo's start on, line by line."""
    offset, started, pending = 0, False, ""
    while True:
        try:
            with serial_log.open("rb") as log:
                log.seek(offset)
                chunk = log.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        pending += chunk.decode(errors="replace")
        *lines, pending = pending.split("\n")
        for raw in lines:
            line = raw.rstrip("\r")
            if DEMO_START in line:
                started = True
            elif DEMO_END in line:
                return
            elif started:
                print(f"guest| {line}", flush=True)
        await asyncio.sleep(0.2)


async def _heartbeat(what: str) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(BOOT_HEARTBEAT)
        print(f"vm: {what} ({time.monotonic() - started:.0f} s so far)", flush=True)


def run_demo(options: SessionOptions, demo_args: list[str],
             kernel_package: str | None = None, screenshot: Path | None = None) -> int:
    """Boot with the userspace GPU and run the demo; its exit status (0 = verified)."""
    clock = PhaseClock()
    try:
        artifacts = _prepare(options, clock, kernel_package)
    except HarnessError as error:
        print(f"vm: ERROR: {error}", file=sys.stderr)
        return error.exit_code

    async def demo() -> int:
        session = VmSession(options, artifacts, clock)
        session.write_guest_env(demo_args)
        exit_file = session.results / "exit-code"
        exit_file.unlink(missing_ok=True)
        stream: asyncio.Task[None] | None = None
        try:
            print(f"vm: starting the back-ends ({options.backend.name}) and QEMU (TCG)",
                  flush=True)
            with clock.phase("back-end start"):
                await session.start_backends()
            beat = asyncio.create_task(_heartbeat("the guest kernel is booting"))
            try:
                with clock.phase("QEMU start to guest init"):
                    await session.start_qemu()
                    init = await session.expect("init", options.boot_timeout)
                _print_guest_boot(init.fields)
                with clock.phase("guest init to demo start"):
                    await session.expect("pytest-start", options.boot_timeout)
            finally:
                beat.cancel()
            print("vm: the demo runs in the guest; its output follows", flush=True)
            stream = asyncio.create_task(_stream_demo(session.serial_log))
            with clock.phase("demo"):
                await session.expect("pytest-exit", options.timeout)
            await asyncio.wait_for(stream, 5.0)  # the rest of the output
            problems = await session.shutdown()
        except HarnessError as error:
            print(f"vm: ERROR: {error}", file=sys.stderr, flush=True)
            return error.exit_code
        finally:
            if stream is not None:
                stream.cancel()
            await session.close()
        print_kernel_trouble(session.serial_log)
        print(f"vm: phases:\n{clock.report()}\nvm: logs in {session.results}")
        for problem in problems:
            print(f"vm: ERROR: {problem}", file=sys.stderr)
        if not exit_file.exists():
            print(f"vm: ERROR: the guest wrote no {exit_file}", file=sys.stderr)
            return EXIT_HARNESS_ERROR
        code = int(exit_file.read_text().strip())
        print(f"vm: demo {DEMO_RESULTS.get(code, f'ended with status {code}')}")
        shot = session.results / "screendumps" / "demo.png"
        if screenshot is not None:
            if shot.exists():
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, screenshot)
                print(f"vm: screenshot of the guest console saved as {screenshot}")
            else:
                print(f"vm: ERROR: the guest took no screenshot ({shot})", file=sys.stderr)
                return EXIT_HARNESS_ERROR if code == 0 else code
        return EXIT_HARNESS_ERROR if problems and code == 0 else code

    return _run(demo())

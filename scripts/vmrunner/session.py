"""One VM run: back-ends, QEMU, QMP and the control channel, with phase timing and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient

from .artifacts import GuestArtifacts
from .backend import REPO_ROOT, BackendSpec, start_backend
from .control import ControlServer, GuestEvent
from .errors import HarnessError, HarnessTimeout
from .hugepages import HugePageReservation
from .memhotplug import MemoryHotplug
from .processes import ManagedProcess, tail
from .qemu import USERSPACE_GPU_PCI, Share, VmLayout, find_qemu, kernel_cmdline, qemu_command
from .screencheck import ScreenChecker
from .screendump import Screendumper, connect_qmp
from .vmpause import VmPauser

BACKEND_LISTEN_TIMEOUT = 30.0
QMP_CONNECT_TIMEOUT = 30.0
EXIT_RACE_GRACE = 1.0  # a back-end exits right after QEMU: wait this long for QEMU's exit too
RUNNER_FATAL = "runner-fatal"  # synthetic event: a watcher saw the run cannot succeed
GUEST_ROOT_MOUNT = "/newroot"  # where guest_tests/boot/init mounts the guest root
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # as the init's
#: exits 0 when the guest root's python3 can load pytest-timeout (without importing pytest)
TIMEOUT_PLUGIN_PROBE = ('import importlib.util, sys; '
                        'sys.exit(importlib.util.find_spec("pytest_timeout") is None)')
KFD_DEVICE = Path("/dev/kfd")  # what our back-end's --gpu auto looks for
LOG_LIMITS = {"qemu.log": 16 * 2**20, "serial.log": 64 * 2**20}  # runaway-output guard


@dataclass(frozen=True)
class SessionOptions:
    """How to boot: the guest mode, the back-end, the devices and every time limit."""

    mode: str  # "test" (root + pytest), "demo" (root + the demo) or "console" (initramfs)
    backend: BackendSpec
    results_dir: Path
    second_gpu: bool = False
    guest_root: str = "host"
    boot_timeout: float = 180.0
    timeout: float = 900.0
    #: pytest-timeout's --timeout in the guest (test mode, where the plugin exists; 0: none)
    per_test_timeout: float = 300.0
    shutdown_timeout: float = 60.0
    memory_mib: int = 2048
    smp: int = 1
    hugepages: int = 64
    host_hugetlb: bool = False
    gpu_device: str = "vhost-user-gpu-pci"
    heads: int = 1
    extra_cmdline: str = ""
    show_console: bool = False


class PhaseClock:
    """Wall time of each named phase, printed as each one ends."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (recorded even when it raises)."""
        started = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - started
            self.phases.append((name, elapsed))
            print(f"vm: {name}: {elapsed:.1f} s", flush=True)

    def report(self) -> str:
        """All phases and their total, one per line."""
        lines = [f"  {name:<30} {seconds:7.1f} s" for name, seconds in self.phases]
        lines.append(f"  {'total':<30} {sum(s for _, s in self.phases):7.1f} s")
        return "\n".join(lines)


class VmSession:
    """Owns every process and socket of one run; close() always leaves nothing behind."""

    def __init__(self, options: SessionOptions, artifacts: GuestArtifacts,
                 clock: PhaseClock) -> None:
        self.options = options
        self.artifacts = artifacts
        self.clock = clock
        self.results = options.results_dir
        self.results.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="vgpu-vm-"))
        self.events: asyncio.Queue[GuestEvent] = asyncio.Queue()
        self.control = ControlServer(self.workdir / "control.sock", self.events,
                                     self.results / "control.log")
        self.backends: list[ManagedProcess] = []
        self.qemu: ManagedProcess | None = None
        self.qmp: QMPClient | None = None
        self.screendumper: Screendumper | None = None
        self.deadline = time.monotonic() + options.timeout
        self.serial_log = self.results / "serial.log"
        self._tasks: list[asyncio.Task[None]] = []
        self._huge_pages: HugePageReservation | None = None

    def layout(self) -> VmLayout:
        """The QEMU layout for these options."""
        opts = self.options
        gpu_count = 2 if opts.second_gpu else 1
        shares: tuple[Share, ...] = ()
        if opts.mode in ("test", "demo"):
            shares = (Share("results", self.results, readonly=False),
                      Share("project", REPO_ROOT, readonly=True))
            if opts.guest_root == "host":
                shares += (Share("hostroot", Path("/"), readonly=True),)
        userspace = USERSPACE_GPU_PCI if opts.second_gpu else None
        return VmLayout(
            kernel_image=self.artifacts.kernel.image, initramfs=self.artifacts.initramfs,
            cmdline=kernel_cmdline(opts.mode, opts.guest_root, userspace, opts.hugepages,
                                   opts.extra_cmdline),
            gpu_sockets=tuple(self.workdir / f"gpu{i}.sock" for i in range(gpu_count)),
            control_socket=self.control.socket_path, qmp_socket=self.workdir / "qmp.sock",
            serial_log=self.serial_log, shares=shares,
            root_image=self.artifacts.root_image if opts.mode in ("test", "demo") else None,
            memory_mib=opts.memory_mib, smp=opts.smp, host_hugetlb=opts.host_hugetlb,
            gpu_device=opts.gpu_device, heads=opts.heads)

    def write_guest_env(self, args: list[str], per_test_timeout: float = 0.0) -> None:
        """What the guest init sources from the results share: the back-end's name and
        the arguments of the guest program (pytest, or the demo).

        A `per_test_timeout` > 0 puts ``--timeout=S`` before `args` if the guest root's
        python3 has pytest-timeout, which the init finds out after mounting the root.
        """
        quoted = " ".join(shlex.quote(arg) for arg in args)
        script = f"VGPU_BACKEND={shlex.quote(self.options.backend.name)}\nset -- {quoted}\n"
        if per_test_timeout > 0:
            seconds = f"{per_test_timeout:g}"
            probe = (f"chroot {GUEST_ROOT_MOUNT} /usr/bin/env -i PATH={GUEST_PATH} "
                     f"python3 -c {shlex.quote(TIMEOUT_PLUGIN_PROBE)}")
            script += (f"if {probe} 2>/dev/null; then\n"
                       f"    set -- --timeout={seconds} \"$@\"\n"
                       f"    echo 'vgpu-init: per-test timeout {seconds} s (pytest-timeout)'\n"
                       "else\n"
                       "    echo 'vgpu-init: no pytest-timeout in the guest root, so no "
                       "per-test timeout (scripts/setup-host.sh installs it)'\n"
                       "fi\n")
        (self.results / "guest-env.sh").write_text(script)
        (self.results / "host.json").write_text(json.dumps(self.host_facts()))

    def host_facts(self) -> dict[str, str]:
        """What the guest tests may expect of the host side: for our back-end with its
        defaults, the host GPU it picks (``--gpu auto``: /dev/kfd if present, else the
        simulated KFD); "unknown" for other back-ends and custom commands; and the
        outputs of the guest's GPU (``heads``)."""
        host_gpu = "unknown"
        if self.options.backend.name == "ours":
            host_gpu = "kfd" if KFD_DEVICE.exists() else "sim"
        return {"backend": self.options.backend.name, "host_gpu": host_gpu,
                "heads": str(self.options.heads)}

    def _watch(self, process: ManagedProcess) -> None:
        async def report_exit() -> None:
            await process.wait()
            await self.events.put(GuestEvent(RUNNER_FATAL, text=process.describe_exit()))
        self._tasks.append(asyncio.create_task(report_exit()))

    async def _guard_log_sizes(self) -> None:
        """A dead vhost-user peer makes QEMU log an error per main-loop turn (~1 MB/s)."""
        while True:
            await asyncio.sleep(1.0)
            for name, limit in LOG_LIMITS.items():
                path = self.results / name
                if path.exists() and path.stat().st_size > limit:
                    await self.events.put(GuestEvent(
                        RUNNER_FATAL, text=f"{path} grew past {limit // 2**20} MiB (runaway "
                                           "output; a lost vhost-user connection does this)"))
                    return

    async def _echo_serial(self) -> None:
        offset = 0
        while True:
            try:
                with self.serial_log.open("rb") as log:
                    log.seek(offset)
                    chunk = log.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                print(chunk.decode(errors="replace"), end="", flush=True)
            await asyncio.sleep(0.2)

    async def start_backends(self) -> None:
        """Start one back-end per GPU and wait until each listens on its socket."""
        starts = [start_backend(self.options.backend, index, socket,
                                self.results / f"backend-{index}.log", BACKEND_LISTEN_TIMEOUT,
                                heads=self.options.heads if index == 0 else 1)
                  for index, socket in enumerate(self.layout().gpu_sockets)]
        results = await asyncio.gather(*starts, return_exceptions=True)
        for result in results:
            if isinstance(result, ManagedProcess):
                self.backends.append(result)
                self._watch(result)
        for result in results:
            if isinstance(result, HarnessError):
                raise result
            if isinstance(result, BaseException):
                raise HarnessError(f"a back-end failed to start: {result!r}") from result

    async def start_qemu(self) -> None:
        """Listen on the control socket, start QEMU (it connects to it), connect to QMP."""
        layout = self.layout()
        if layout.host_hugetlb and self._huge_pages is None:
            self._huge_pages = HugePageReservation(layout.memory_mib)
        await self.control.start()
        # runs `qemu -version`: off the loop, which serves the back-ends meanwhile
        argv = qemu_command(layout, await asyncio.to_thread(find_qemu))
        (self.results / "qemu-command.txt").write_text(shlex.join(argv) + "\n")
        self.qemu = ManagedProcess("QEMU", argv, self.results / "qemu.log")
        self.serial_log.unlink(missing_ok=True)
        await self.qemu.spawn()
        self._watch(self.qemu)
        self._tasks.append(asyncio.create_task(self._guard_log_sizes()))
        if self.options.show_console:
            self._tasks.append(asyncio.create_task(self._echo_serial()))
        qemu = self.qemu
        limit = self.remaining(min(QMP_CONNECT_TIMEOUT, self.options.boot_timeout))
        try:
            self.qmp = await connect_qmp(layout.qmp_socket, limit,
                                         lambda: qemu.returncode is not None)
        except HarnessError as error:
            raise type(error)(f"{error}\n{self.diagnostics()}") from error
        self.screendumper = Screendumper(self.qmp, self.results / "screendumps")
        self.control.handlers["screendump"] = self.screendumper.handle_request
        self.control.handlers["screencheck"] = ScreenChecker(self.screendumper).handle_request
        self.control.handlers["pause"] = VmPauser(self.qmp).handle_request
        hotplug = MemoryHotplug(self.qmp)
        self.control.handlers["hotplug-memory"] = hotplug.plug
        self.control.handlers["unplug-memory"] = hotplug.unplug

    def remaining(self, limit: float) -> float:
        """`limit` capped by what is left of the overall timeout."""
        return max(0.0, min(limit, self.deadline - time.monotonic()))

    async def expect(self, name: str, limit: float) -> GuestEvent:
        """Wait for guest event `name`; a guest error, a process exit or a timeout raise."""
        timeout = self.remaining(limit)
        what = "overall timeout" if timeout < limit else "time limit"
        end = time.monotonic() + timeout
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), max(0.0, end - time.monotonic()))
            except TimeoutError:
                raise HarnessTimeout(f"guest sent no '{name}' within {timeout:.0f} s ({what})\n"
                                     + self.diagnostics()) from None
            if event.name == name:
                return event
            if event.name == "error":
                raise HarnessError(f"guest init failed: {event.text}\n" + self.diagnostics())
            if event.name == RUNNER_FATAL:
                raise HarnessError(f"{await self._fatal_cause(event)} while waiting for the "
                                   f"guest's '{name}'\n" + self.diagnostics())

    async def _fatal_cause(self, event: GuestEvent) -> str:
        """The event's text and every process exit, QEMU's first: a back-end exits (0) as
        soon as QEMU is gone, so a QEMU crash may reach the queue second."""
        if self.qemu is not None and self.qemu.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.qemu.wait()), EXIT_RACE_GRACE)
        exits = [process.describe_exit() for process in [self.qemu, *self.backends]
                 if process is not None and process.returncode is not None]
        return "; ".join(exits if event.text in exits else [event.text, *exits])

    async def shutdown(self) -> list[str]:
        """Wait for QEMU and then each back-end to exit on their own; problems as text."""
        problems = []
        assert self.qemu is not None
        with self.clock.phase("shutdown"):
            if self.qmp is not None:
                with contextlib.suppress(Exception):  # QEMU may be gone already
                    await asyncio.wait_for(self.qmp.disconnect(), 5)
                self.qmp = None
            code = await self.qemu.stop(self.remaining(self.options.shutdown_timeout))
            if code != 0 or self.qemu.stopped_by:
                problems.append(f"{self.qemu.describe_exit()}\n--- qemu.log ---\n"
                                f"{tail(self.qemu.log_path)}")
            for backend in self.backends:
                code = await backend.stop(self.remaining(self.options.shutdown_timeout))
                if code != 0 or backend.stopped_by:
                    problems.append(f"{backend.describe_exit()} after QEMU disconnected "
                                    f"(the convention is to exit 0)\n--- {backend.log_path} ---"
                                    f"\n{tail(backend.log_path)}")
        return problems

    def diagnostics(self) -> str:
        """Tails of the serial console, QEMU and back-end logs."""
        parts = [f"--- {self.serial_log} (tail) ---\n{tail(self.serial_log)}"]
        if self.qemu is not None:
            parts.append(f"--- {self.qemu.log_path} (tail) ---\n{tail(self.qemu.log_path, 20)}")
        for backend in self.backends:
            parts.append(f"--- {backend.log_path} (tail) ---\n{tail(backend.log_path)}")
        return "\n".join(parts)

    async def close(self) -> None:
        """Kill whatever still runs, close sockets, remove the socket directory."""
        for task in self._tasks:
            task.cancel()
        if self.qmp is not None:
            # QEMU may already be gone; then there is nothing left to release.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5)
        for process in [self.qemu, *self.backends]:
            if process is not None and process.returncode is None:
                await process.stop(0, term_wait=3)
        await self.control.close()
        if self._huge_pages is not None:
            self._huge_pages.release()
        shutil.rmtree(self.workdir, ignore_errors=True)

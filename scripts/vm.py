#!/usr/bin/env python3
"""Boot a TCG guest with vhost-user-gpu and run the in-guest tests or the console check.

Run ``python3 scripts/vm.py --help`` for the commands; ``scripts/setup-host.sh`` installs
what they need on a Debian 12 host.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vmrunner.artifacts import cache_dir, prepare_artifacts
from vmrunner.backend import (
    DEFAULT_PRESET,
    PRESETS,
    REFERENCE_BACKEND,
    backend_spec,
)
from vmrunner.commands import run_console_check, run_test
from vmrunner.demo import run_demo
from vmrunner.errors import (
    EXIT_CONSOLE_CHECK_FAILED,
    EXIT_HARNESS_ERROR,
    EXIT_TIMEOUT,
    HarnessError,
)
from vmrunner.qemu import GPU_DEVICES, USERSPACE_GPU_PCI
from vmrunner.rootfs import ROOT_KINDS
from vmrunner.session import SessionOptions

#: --timeout without the option: the guest suite runs ~1 min, boot takes 5-50 s under TCG
DEFAULT_TIMEOUT = 900.0
#: the demo's guest program allows itself 300 s per kernel
DEMO_TIMEOUT = 1800.0

DESCRIPTION = f"""\
Boot a Linux 6.1 guest under QEMU 10 (TCG) with a vhost-user-gpu-pci device served by the
back-end under test, and run checks inside it.

commands:
  test           boot the guest root and run `pytest guest_tests/` in it (as root, from this
                 checkout shared read-only), with the userspace-driver GPU unless
                 --no-second-gpu; exits with the guest pytest's exit code
  console-check  boot only the busybox initramfs; the guest draws text on the fbcon console
                 and a pattern into /dev/fb0, the host checks a screendump pixel by pixel
  demo           boot with the userspace-driver GPU and run guest_tests/demo.py: a guest
                 program registers its own memory as a USERPTR blob, the host engine runs
                 saxpy and a matrix multiply on it, the guest verifies; exits 0 if verified
  artifacts      build or check the cached guest kernel, initramfs and root image

back-ends (the device under test; each listens on --socket-path and exits when QEMU leaves):
  --backend ours        python3 -m vgpu_backend --socket-path {{socket}}   (from the repo root;
                        the default of every command)
  --backend reference   {REFERENCE_BACKEND} --socket-path {{socket}}
  --backend-cmd 'CMD'   any command line containing {{socket}}, e.g.
                        'python3 -m vgpu_backend --socket-path {{socket}} --log-level debug'
  --backend-arg=ARG     one more argument for the preset, e.g. --backend-arg=--poll-max-us=500

exit codes:
  0-5   the guest pytest's own
  {EXIT_HARNESS_ERROR}    harness error: boot, back-end or guest init failed, or a back-end did
        not exit 0 after QEMU disconnected
  {EXIT_CONSOLE_CHECK_FAILED}    console-check ran and the screen was wrong
  {EXIT_TIMEOUT}   a time limit passed (the tails of the serial and back-end logs are printed)

time limits: --timeout bounds the whole run (default {DEFAULT_TIMEOUT:.0f} s, for the demo
{DEMO_TIMEOUT:.0f} s); `test` also gives each guest test --per-test-timeout through
pytest-timeout when the guest root has it (python3-pytest-timeout: a test that hangs fails
with "Timeout", the others still run).

Every run keeps serial.log, backend-N.log, qemu.log, qemu-command.txt, control.log,
screendumps/ and junit.xml in its results directory.

environment: VGPU_CACHE_DIR (artifact cache, default ~/.cache/vgpu-backend),
VGPU_RESULTS_DIR (parent of per-run results directories, default /tmp/vgpu-results).

examples:
  python3 scripts/vm.py test -- -k smoke -x
  python3 scripts/vm.py test --backend reference --timeout 600
  python3 scripts/vm.py console-check --backend reference --screenshot console.png
  python3 scripts/vm.py demo --size-mib 64
"""


def _number(kind: type[int] | type[float], least: float) -> Callable[[str], int | float]:
    """An argparse type: a number of ``kind`` at least ``least`` (finite)."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a {'whole ' if kind is int else ''}number: {text!r}") from None
        if not least <= value < math.inf:
            raise argparse.ArgumentTypeError(f"{text} is below {least:g}" if value < least
                                             else f"{text} is not finite")
        return value
    return parse


_SECONDS, _POSITIVE = _number(float, 0.001), _number(int, 1)


def _backend_template(text: str) -> str:
    """--backend-cmd: a command line ``backend_spec`` takes (with the socket
    placeholder)."""
    try:
        backend_spec(None, text)
    except HarnessError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--backend-cmd ")) from None
    return text


def _add_vm_options(parser: argparse.ArgumentParser, timeout: float = DEFAULT_TIMEOUT) -> None:
    vm = parser.add_argument_group("virtual machine")
    vm.add_argument("--backend", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                    help="back-end preset (default: %(default)s)")
    vm.add_argument("--backend-cmd", metavar="TEMPLATE", type=_backend_template,
                    help="back-end command line with {socket}; overrides --backend")
    vm.add_argument("--backend-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for the preset's command line (repeatable; "
                         "write --backend-arg=--poll-max-us=500); not with --backend-cmd")
    vm.add_argument("--results-dir", type=Path,
                    help="where logs, screendumps and junit.xml go "
                         "(default: $VGPU_RESULTS_DIR/COMMAND-TIME)")
    vm.add_argument("--boot-timeout", type=_SECONDS, default=180.0, metavar="S",
                    help="limit for QEMU start to guest init and for init to pytest/console "
                         "start (default: %(default)s)")
    vm.add_argument("--timeout", type=_SECONDS, default=timeout, metavar="S",
                    help="limit for the whole VM run from back-end start (default: %(default)s)")
    vm.add_argument("--shutdown-timeout", type=_SECONDS, default=60.0, metavar="S",
                    help="limit for QEMU and the back-ends to exit (default: %(default)s)")
    vm.add_argument("--memory", type=_POSITIVE, default=2048, metavar="MIB",
                    help="guest RAM, memfd-backed and shared (default: %(default)s)")
    vm.add_argument("--smp", type=_POSITIVE, default=1, help="guest vCPUs (default: %(default)s)")
    vm.add_argument("--hugepages", type=_number(int, 0), default=64,
                    help="2 MiB hugepages reserved on the guest kernel command line "
                         "(default: %(default)s)")
    vm.add_argument("--host-hugetlb", action="store_true",
                    help="guest RAM on the host's 2 MiB huge pages (memory-backend-memfd,"
                         "hugetlb=on; vm.nr_hugepages is raised for the run as root)")
    vm.add_argument("--gpu-device", choices=GPU_DEVICES, default=GPU_DEVICES[0],
                    help="QEMU's device for the guest's GPU: the PCI display device, or "
                         "the VGA-class one libvirt uses for a primary video device "
                         "(default: %(default)s; a second GPU is always the PCI one)")
    vm.add_argument("--heads", type=int, choices=range(1, 17), default=1, metavar="N",
                    help="outputs of the guest's GPU: QEMU's max_outputs, and the 'ours' "
                         "preset's --max-outputs (a --backend-cmd passes it itself; "
                         "default: %(default)s)")
    vm.add_argument("--append", default="", metavar="ARGS",
                    help="extra guest kernel command line")
    vm.add_argument("--kernel-package", metavar="NAME",
                    help="Debian kernel package (default: newest linux-image-6.1.0-N-amd64)")
    vm.add_argument("--show-console", action="store_true",
                    help="echo the guest serial console while it runs")


def build_parser() -> argparse.ArgumentParser:
    """The vm.py argument parser."""
    parser = argparse.ArgumentParser(
        prog="vm.py", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    test = commands.add_parser(
        "test", help="run guest_tests/ with pytest inside the guest",
        usage="vm.py test [options] [-- PYTEST ARGS]",
        description="Boot the guest root and run `python3 -m pytest guest_tests/ -v "
                    "--junitxml=RESULTS/junit.xml [--timeout=S] [PYTEST ARGS]` in it (the "
                    "--timeout of --per-test-timeout if the guest has pytest-timeout).  Guest "
                    "environment: "
                    "VGPU_BACKEND (ours|reference|custom), VGPU_RESULTS_DIR, VGPU_PROJECT_DIR, "
                    "VGPU_CONTROL_PORT, VGPU_USERSPACE_PCI (with the second GPU).")
    _add_vm_options(test)
    test.add_argument("--second-gpu", action=argparse.BooleanOptionalAction, default=True,
                      help=f"a second vhost-user-gpu-pci at {USERSPACE_GPU_PCI}, with its own "
                           "back-end, kept away from the guest's virtio driver for the "
                           "userspace-driver and USERPTR tests (VGPU_USERSPACE_PCI); "
                           "--no-second-gpu skips those tests (default: on)")
    test.add_argument("--per-test-timeout", type=_number(float, 0), default=300.0, metavar="S",
                      help="pytest-timeout's --timeout for each guest test, passed only when "
                           "the guest root has pytest-timeout; 0: none (default: %(default)s)")
    test.add_argument("--guest-root", choices=ROOT_KINDS, default="host",
                      help="host: this host's / read-only over 9p (default; needs Debian's "
                           "python3-numpy/pytest); image: a debootstrap ext4 image over "
                           "virtio-blk")

    console = commands.add_parser(
        "console-check", help="check the fbcon console and /dev/fb0 through a screendump",
        description="Boot only the initramfs; pass if the screendump shows the guest's "
                    "console text and framebuffer pattern exactly.")
    _add_vm_options(console)
    console.add_argument("--screenshot", type=Path, metavar="PNG",
                         help="also save the checked screen as this PNG")

    demo = commands.add_parser(
        "demo", help="run the USERPTR zero-copy demo in the guest",
        description="Boot the guest root with a second, driver-less vhost-user-gpu-pci and "
                    "run `python3 -m guest_tests.demo` against it (via pytest's plugin hook, "
                    "since the guest init starts pytest), streaming its output.  Exit status: "
                    "0 verified, 1 verification failed (or the demo failed), 2 bad demo "
                    "arguments, 77 the back-end cannot run it (no USERPTR), 10 harness error, "
                    "124 timeout.")
    _add_vm_options(demo, timeout=DEMO_TIMEOUT)
    demo.add_argument("--size-mib", type=_POSITIVE, default=128, metavar="N",
                      help="the guest program's buffer (default: %(default)s)")
    demo.add_argument("--matmul", type=_POSITIVE, default=768, metavar="N",
                      help="N x N x N float32 matrix multiply (default: %(default)s)")
    demo.add_argument("--saxpy-rounds", type=_POSITIVE, default=8, metavar="N",
                      help="saxpy passes over the vectors (default: %(default)s)")
    demo.add_argument("--screenshot", type=Path, metavar="PNG",
                      help="save the guest screen at the end of the demo (its summary is "
                           "on the console) as this PNG")
    demo.add_argument("--no-thp", action="store_true",
                      help="4 KiB pages only in the guest buffer (many scattered mem entries)")

    artifacts = commands.add_parser("artifacts", help="build or check the cached guest artifacts")
    artifacts.add_argument("--guest-root", choices=(*ROOT_KINDS, "none"), default="host")
    artifacts.add_argument("--kernel-package", metavar="NAME")
    for command in (test, console, demo, artifacts):  # usage errors show its usage
        command.set_defaults(command_parser=command)
    return parser


def _results_dir(args: argparse.Namespace) -> Path:
    if args.results_dir is not None:
        return Path(args.results_dir).resolve()
    base = Path(os.environ.get("VGPU_RESULTS_DIR") or "/tmp/vgpu-results")
    return base / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _options(args: argparse.Namespace, mode: str) -> SessionOptions:
    return SessionOptions(
        mode=mode, backend=backend_spec(args.backend, args.backend_cmd, args.backend_arg),
        results_dir=_results_dir(args),
        second_gpu=getattr(args, "second_gpu", False) or args.command == "demo",
        guest_root=getattr(args, "guest_root", "host"), boot_timeout=args.boot_timeout,
        timeout=args.timeout, per_test_timeout=getattr(args, "per_test_timeout", 0.0),
        shutdown_timeout=args.shutdown_timeout,
        memory_mib=args.memory, smp=args.smp, hugepages=args.hugepages,
        host_hugetlb=args.host_hugetlb, gpu_device=args.gpu_device, heads=args.heads,
        extra_cmdline=args.append,
        show_console=args.show_console)


def main(argv: list[str]) -> int:
    """Parse `argv` (without the program name) and run the command."""
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = build_parser().parse_args(argv)
    if extra and args.command != "test":
        args.command_parser.error("only `test` takes extra pytest arguments after --")
    if hasattr(args, "backend"):  # a bad combination is a usage error, as a bad value
        try:
            backend_spec(args.backend, args.backend_cmd, args.backend_arg)
        except HarnessError as err:
            args.command_parser.error(str(err))
    try:
        if args.command == "artifacts":
            started = time.monotonic()
            built = prepare_artifacts(args.guest_root, args.kernel_package)
            print(f"cache: {cache_dir()}\nkernel: {built.kernel.image}\n"
                  f"initramfs: {built.initramfs}\nroot image: {built.root_image}\n"
                  f"built: {', '.join(built.built) or 'nothing'} "
                  f"in {time.monotonic() - started:.1f} s")
            return 0
        if args.command == "test":
            return run_test(_options(args, "test"), extra, args.kernel_package)
        if args.command == "demo":
            demo_args = [f"--size-mib={args.size_mib}", f"--matmul={args.matmul}",
                         f"--saxpy-rounds={args.saxpy_rounds}"]
            if args.no_thp:
                demo_args.append("--no-thp")
            return run_demo(_options(args, "demo"), demo_args, args.kernel_package,
                            args.screenshot)
        return run_console_check(_options(args, "console"), args.screenshot,
                                 args.kernel_package)
    except HarnessError as error:
        print(f"vm: ERROR: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("vm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

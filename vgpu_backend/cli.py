"""``vgpu-backend``: the command line (QEMU's "Backend program conventions")."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from protocol.capsets import DEFAULT_COMPUTE_CAPSET, DEFAULT_USERPTR_CAPSET
from protocol.limits import CliLimit, Limits, cli_fields
from vgpu_backend import __version__
from vgpu_backend.config import (
    BackendConfig,
    ConfigError,
    build_config,
    check_socket_path,
    listening_socket,
)
from vgpu_backend.device_state import UserptrProtocol
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.log_limit import RepeatLimiter
from vgpu_backend.runtime import Backend

__all__ = ["CAPABILITIES", "main", "parser"]

log = logging.getLogger("vgpu_backend")

#: ``--print-capabilities`` output (``VHostUserBackendCapabilities`` for type "gpu";
#: we support neither --render-node nor --virgl)
CAPABILITIES = {"type": "gpu", "features": []}
#: exit status when the shutdown leak check finds something still allocated (EX_SOFTWARE)
EXIT_LEAK = 70


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(
        prog="vgpu-backend", allow_abbrev=False,  # an option added later must not
        # change what an abbreviation in a launcher's command line meant
        description="QEMU vhost-user-gpu back-end with zero-copy USERPTR blobs.  QEMU "
                    "(>= 10.0): -machine q35 -m 2G "
                    "-object memory-backend-memfd,id=mem,size=2G,share=on "
                    "-numa node,memdev=mem -chardev socket,id=vgpu,path=PATH "
                    "-device vhost-user-gpu-pci,chardev=vgpu -vga none",
        epilog="exit status: 0 QEMU disconnected, or SIGTERM/SIGINT; 1 cannot start "
               "(socket path, host GPU); 2 bad options; 70 something was still "
               "allocated at the end (see the log)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    conn = p.add_argument_group("connection (exactly one)")
    conn.add_argument("--socket-path", metavar="PATH",
                      help="listen on this unix socket for one QEMU connection")
    conn.add_argument("--fd", type=int, metavar="FD",
                      help="serve a unix socket inherited as FD: a connected one "
                           "(libvirt), or a listening one (one connection is accepted)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the back-end capabilities as JSON and exit")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="(default: info)")
    dev = p.add_argument_group("device")
    dev.add_argument("--max-outputs", type=int, default=1, metavar="N",
                     help="scanouts; must match the max_outputs property of QEMU's "
                          "device (default: 1)")
    dev.add_argument("--default-mode", default="1280x800", metavar="WxH",
                     help="mode reported when QEMU's display does not answer "
                          "(default: 1280x800)")
    dev.add_argument("--no-edid", dest="edid", action="store_false",
                     help="do not offer VIRTIO_GPU_F_EDID (QEMU's device then needs "
                          "edid=off)")
    dev.add_argument("--no-blob", dest="blob", action="store_false",
                     help="do not serve blob resources (implies --userptr-protocol off)")
    dev.add_argument("--no-compute", dest="compute", action="store_false",
                     help="do not offer compute contexts")
    dev.add_argument("--userptr-protocol", default=None,
                     choices=[p.value for p in UserptrProtocol],
                     help="USERPTR guest protocol generation: v5 (default, safe: no "
                          "feature bit, userptr whenever blob is served), v3 (offers "
                          "feature bit 5 as RESOURCE_USERPTR; only for guests built from "
                          "the v3 series, never with Linux >= 7.2 where bit 5 is "
                          "BLOB_ALIGNMENT; QEMU's vhost-user-gpu-pci does not forward "
                          "the bit to the guest), off (the default with --no-blob); "
                          "naming v3 or v5 refuses to start on a host GPU without "
                          "USERPTR (context isolation)")
    dev.add_argument("--userptr-capset-id", type=_integer, metavar="ID",
                     help=f"capset id of the userptr capset, 10..63 (default "
                          f"{DEFAULT_USERPTR_CAPSET})")
    dev.add_argument("--compute-capset-id", type=_integer, metavar="ID",
                     help=f"capset id (= context type) of the compute capset, 10..63 "
                          f"(default {DEFAULT_COMPUTE_CAPSET})")
    gpu = p.add_argument_group("host GPU")
    gpu.add_argument("--gpu", choices=["auto", "kfd", "sim"],
                     help="auto: /dev/kfd if present, else the simulated KFD (default)")
    gpu.add_argument("--gpu-ids", type=_integer_list,
                     metavar="ID,...", help="KFD gpu_ids to map userptr buffers on "
                                            "(default: all)")
    gpu.add_argument("--kfd-isolation", choices=["vm", "context"],
                     help="vm: one KFD process for the VM (default); context: one "
                          "secondary KFD process per virtio-gpu context (KFD >= 1.19; "
                          "USERPTR blobs are refused in this mode, see README)")
    gpu.add_argument("--userptr-host-path",
                     choices=["auto", "batch", "alias", "per-range"],
                     help="how scattered ranges become one GPU buffer (default auto: "
                          "batch if the kernel supports it, else alias, and per-range "
                          "for what alias cannot map, such as hugetlb guest RAM)")
    gpu.add_argument("--sim-gpus", type=int, metavar="N",
                     help="number of simulated GPUs (default 1)")
    gpu.add_argument("--sim-kfd-minor", type=int, metavar="N",
                     help="KFD minor version the simulated kernel reports (default 19)")
    gpu.add_argument("--sim-fault", action="append", default=[],
                     metavar="IOCTL:ERRNO[:COUNT[:AFTER[:DEVICE]]]",
                     help="make the simulated KFD fail an ioctl (testing), e.g. "
                          "MAP_MEMORY_TO_GPU:EINTR or ALLOC_MEMORY_OF_GPU:ENOMEM:1:2; "
                          "armed after the start-up probes; repeatable")
    gpu.add_argument("--sim-pre-batch", action="store_true",
                     help="simulate a kernel without the batch-userptr series (the "
                          "alias/per-range fallbacks are used)")
    perf = p.add_argument_group("performance")
    perf.add_argument("--poll-max-us", type=int, default=0, metavar="US",
                      help="busy-poll up to US microseconds for the next event before "
                           "sleeping, adapted to the guest's pace as QEMU's poll-max-ns "
                           "(lower latency for a busy guest, CPU time for it; 0, the "
                           "default: never poll)")
    lim = p.add_argument_group("limits")
    for limit in cli_fields():
        lim.add_argument(f"--{limit.option}", dest=limit.name, type=_option_type(limit),
                         metavar=limit.metavar, help=limit.help)
    return p


def _integer(text: str) -> int:
    """A decimal or 0x-prefixed integer."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an integer (decimal or 0x...): {text!r}") from None


def _integer_list(text: str) -> list[int]:
    """Comma-separated integers."""
    return [_integer(item) for item in text.split(",")]


def _option_type(limit: CliLimit) -> Callable[[str], int | float]:
    """``limit.parse`` with its own message in argparse's error (the option and why)."""
    def parse(text: str) -> int | float:
        try:
            return limit.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _configure_logging(level: str, limits: Limits) -> RepeatLimiter | None:
    """Log to stderr at ``level``; below debug, each line of code at most
    ``limits.log_rate`` lines a second (see :mod:`vgpu_backend.log_limit`)."""
    root = logging.getLogger()
    # logging set up by a host program (main() in process): basicConfig changes
    # nothing, and no limiter goes on its handlers
    set_up = bool(root.handlers)
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if set_up or level.lower() == "debug":
        return None
    limiter = RepeatLimiter(limits.log_rate, limits.log_burst_seconds)
    root.handlers[0].addFilter(limiter)  # the stderr handler basicConfig made
    return limiter


def main(argv: Sequence[str] | None = None) -> int:
    """Run the back-end; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if "--print-capabilities" in argv:  # QEMU's convention: other options are ignored
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    args = parser().parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as err:
        print(f"vgpu-backend: {err}", file=sys.stderr)
        return 2
    limiter = _configure_logging(config.log_level, config.limits)
    try:
        return run(config)
    finally:
        if limiter is not None:
            limiter.report(log)


def run(config: BackendConfig) -> int:
    """Serve one front-end connection, then exit 0 (1: start-up failure; 70: something
    was still allocated at the end, see the log).  SIGTERM and SIGINT stop it cleanly
    from here on, also while the host GPU opens."""
    loop = EventLoop(config.poll_max_us / 1e6)
    for signum in (signal.SIGTERM, signal.SIGINT):  # also before loop.run() starts
        signal.signal(signum, lambda *_: loop.shutdown())
    try:
        if config.socket_path is not None:  # a bad path fails before the host GPU opens;
            check_socket_path(config.socket_path)  # the socket appears once all is ready
        backend = Backend(loop, config)
    except ConfigError as err:
        log.error("%s", err)
        loop.close()
        return 1
    try:
        sock = _front_end_socket(config)
    except ConfigError as err:
        log.error("%s", err)
        backend.close()
        loop.close()
        return 1
    try:
        if config.socket_path is not None:
            backend.listen(sock, owned_path=config.socket_path)
        elif sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            backend.listen(sock)  # an inherited listening socket: not ours to remove
        else:  # an inherited connected socket (libvirt)
            log.info("serving the connected socket --fd %d", config.fd)
            backend.serve(sock)
        loop.run()
    finally:
        backend.close()
        loop.close()
    return EXIT_LEAK if backend.leaks else 0


def _front_end_socket(config: BackendConfig) -> socket.socket:
    """The socket to QEMU: listening on ``--socket-path``, or the one ``--fd`` names."""
    if config.socket_path is not None:
        return listening_socket(config.socket_path)
    assert config.fd is not None  # build_config requires one of them
    return socket.socket(fileno=config.fd)

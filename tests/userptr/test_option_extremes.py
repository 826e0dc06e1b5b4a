"""Every limit option at the largest value it accepts: the back-end starts and serves
a guest as usual (display, a 2D frame, a USERPTR blob checksummed by a compute job),
then exits 0.  An operator's "no limit" (``--display-timeout 1e300``) once crashed
the event loop at the first display request: epoll cannot wait that long."""

from __future__ import annotations

import zlib

import pytest

from protocol.compute import Kernel, buffer_arg, u64_arg
from protocol.limits import CliLimit, cli_fields
from protocol.virtio_gpu_codes import Resp
from tests.userptr.compute_stream import dispatch
from tests.userptr.fixtures import VmFactory
from vgpu_backend.cli import parser
from vgpu_backend.config import ConfigError, build_config

#: candidates per kind of value, largest first
LADDERS = {"N": [str(10 ** 30), str(2 ** 32 - 1)],
           "BYTES": ["1000000000T", "16000000T", str(2 ** 32 - 1)],
           "SECONDS": ["1e300", "1e7"]}


def largest_accepted(limit: CliLimit) -> str:
    """The first value of the option's ladder that the configuration accepts."""
    for value in LADDERS[limit.metavar]:
        try:
            build_config(parser().parse_args(["--socket-path", "s", f"--{limit.option}",
                                              value]))
        except ConfigError:
            continue
        return value
    raise AssertionError(f"--{limit.option} accepts none of {LADDERS[limit.metavar]}")


@pytest.mark.parametrize("limit", cli_fields(), ids=lambda limit: limit.option)
def test_the_largest_accepted_value_keeps_the_backend_serving(start_vm: VmFactory,
                                                              limit: CliLimit) -> None:
    vm = start_vm(f"--{limit.option}", largest_accepted(limit))
    gpu = vm.s.gpu
    gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    image = gpu.create_image(64, 48)
    gpu.show(image)
    ctx = vm.compute_context()
    blob = ctx.blob(3 * 4096)
    (va,) = ctx.map(blob)
    done = ctx.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(3 * 4096))])
    done.response.expect(Resp.OK_NODATA)
    assert done.results.values()[0] == zlib.crc32(blob.buffer.read(vm.ram))
    vm.s.sync_display()

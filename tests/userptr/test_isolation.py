"""``--kfd-isolation context``: USERPTR blobs are refused with ERR_UNSPEC (the kernel
refuses USERPTR on secondary KFD processes), the reason is logged once, the device
keeps serving everything else."""

from __future__ import annotations

from protocol.virtio_gpu_codes import BlobFlag, BlobMem, Resp
from tests.frontend.guest_ram import PAGE_SIZE
from tests.userptr import guest_commands as gc
from tests.userptr.fixtures import VmFactory
from tests.userptr.guest_buffer import scattered_buffer

REFUSAL_LOG = "USERPTR blobs are refused"


def test_userptr_refused_with_context_isolation(start_vm: VmFactory) -> None:
    """Plain and RDONLY userptr blobs: ERR_UNSPEC, id left free, reason logged once."""
    vm = start_vm("--kfd-isolation", "context")
    for flags in (BlobFlag.USE_USERPTR, BlobFlag.USE_USERPTR | BlobFlag.USERPTR_RDONLY):
        buf = scattered_buffer(vm.ram, 3 * PAGE_SIZE)
        rid = vm.new_resource_id()
        vm.create_blob(rid, buf.entries, buf.size, blob_mem=BlobMem.GUEST, flags=int(flags)
                       ).expect(Resp.ERR_UNSPEC)
        vm.create_blob(rid, buf.entries, buf.size, blob_mem=BlobMem.GUEST, flags=0
                       ).expect(Resp.OK_NODATA)
        vm.still_serving()
    assert vm.s.backend.wait_stderr(REFUSAL_LOG)
    assert vm.s.backend.stderr.count(REFUSAL_LOG) == 1


def test_other_blobs_and_framebuffers_still_work(start_vm: VmFactory) -> None:
    """A non-userptr GUEST blob is still served as a framebuffer."""
    vm = start_vm("--kfd-isolation", "context")
    buf = scattered_buffer(vm.ram, 16 * 16 * 4)
    rid = vm.new_resource_id()
    vm.create_blob(rid, buf.entries, buf.size, blob_mem=BlobMem.GUEST, flags=0
                   ).expect(Resp.OK_NODATA)
    vm.run(gc.set_scanout_blob(0, rid, fmt=2, fb_width=16, fb_height=16, stride=64)
           ).expect(Resp.OK_NODATA)
    vm.s.sync_display()
    assert vm.s.console.surface(0).shape == (16, 16, 4)

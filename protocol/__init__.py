"""Sans-IO protocol core of vgpu-backend.

Pure encoders, decoders and state machines over bytes and fd numbers for vhost-user,
the vhost-user-gpu display socket, virtio-gpu and split virtqueues.  Nothing in this
package performs I/O: it never imports socket, mmap, select, selectors, asyncio, fcntl,
os or ``vgpu_backend`` (``tests/test_sans_io.py`` enforces this).
"""

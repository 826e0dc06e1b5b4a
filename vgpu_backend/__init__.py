"""vgpu-backend: a QEMU vhost-user-gpu device back-end with zero-copy USERPTR blobs."""

__version__ = "0.1.0"

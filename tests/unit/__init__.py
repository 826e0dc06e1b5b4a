"""Unit tests of the back-end's pure components (in-process, no QEMU)."""

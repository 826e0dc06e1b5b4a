"""USERPTR and blob resources, driven through the front-end simulator against the real
back-end process (our back-end only: QEMU's reference has no USERPTR or compute)."""

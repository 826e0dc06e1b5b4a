"""Host-side VM runner: builds the guest artifacts, starts back-ends and QEMU, runs the guest.

Entry point: ``scripts/vm.py``.  Modules: ``kernel``/``initramfs``/``rootfs``/``artifacts``
(guest artifacts, cached), ``backend`` and ``qemu`` (processes), ``control`` (the guest's
request channel), ``session`` (one VM run with phase timing and timeouts), ``console_check``
and ``junit`` (what a run is judged by).
"""

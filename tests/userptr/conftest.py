"""Fixtures: ``start_vm``, ``vm``, ``shared_vm``, ``vm_pool`` (:mod:`tests.userptr.fixtures`)."""

from tests.userptr.fixtures import shared_vm, start_vm, vm, vm_pool

__all__ = ["shared_vm", "start_vm", "vm", "vm_pool"]

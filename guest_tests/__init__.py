"""Tests that run inside the scripts/vm.py guest (a package, so its modules have unique names)."""

"""The capset id rules of :mod:`protocol.capsets` as literal numbers: the guest ABI and
the Linux limits they follow, so a changed constant cannot go unnoticed by tests that
only refer to it by name."""

from __future__ import annotations

from protocol.capsets import (
    DEFAULT_COMPUTE_CAPSET,
    DEFAULT_USERPTR_CAPSET,
    MAX_CAPSET_ID,
    RESERVED_CAPSET_IDS,
)


def test_capset_id_constants_are_the_documented_numbers() -> None:
    """Pins MAX_CAPSET_ID (Linux's 63), the reserved ids 1..9 and the defaults 28/29."""
    assert MAX_CAPSET_ID == 63
    assert frozenset(range(1, 10)) == RESERVED_CAPSET_IDS
    assert (DEFAULT_USERPTR_CAPSET, DEFAULT_COMPUTE_CAPSET) == (28, 29)


def test_default_capset_ids_fit_every_guest() -> None:
    """Pins that the defaults are free ids that Linux 6.1's ``1 << id`` on an int keeps."""
    for capset_id in (DEFAULT_USERPTR_CAPSET, DEFAULT_COMPUTE_CAPSET):
        assert capset_id not in RESERVED_CAPSET_IDS
        assert 10 <= capset_id <= 31

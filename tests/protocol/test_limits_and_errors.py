"""``protocol.limits`` validation and the error hierarchy."""

from __future__ import annotations

from dataclasses import fields

import pytest

from protocol.errors import (
    DisplayProtocolError,
    FrontendProtocolError,
    GuestProtocolError,
    StateError,
    VgpuError,
)
from protocol.limits import DEFAULT_LIMITS, Limits, cli_fields
from protocol.virtio_gpu_codes import Resp


def test_defaults_match_the_documented_peer_values() -> None:
    assert DEFAULT_LIMITS.max_backing_entries == 16384  # QEMU's cap
    assert DEFAULT_LIMITS.max_scanouts == 16
    assert DEFAULT_LIMITS.max_fds_per_message == 8
    assert DEFAULT_LIMITS.max_hostmem == 256 * 1024 * 1024


@pytest.mark.parametrize("field_name", [f.name for f in fields(Limits)])
@pytest.mark.parametrize("bad", [0, -1])
def test_every_limit_must_be_positive(field_name: str, bad: int) -> None:
    with pytest.raises(ValueError, match=field_name):
        Limits(**{field_name: bad})


@pytest.mark.parametrize("overrides", [
    {"max_backing_entries": 1 << 32}, {"max_userptr_entries": 1 << 32}, {"max_scanouts": 17}])
def test_limits_that_do_not_fit_the_protocol_are_refused(overrides: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Limits(**overrides)


def test_limits_are_frozen() -> None:
    with pytest.raises(AttributeError):
        DEFAULT_LIMITS.max_resources = 1  # type: ignore[misc]


def test_cli_fields_name_real_fields_with_their_types() -> None:
    names = {f.name: f for f in fields(Limits)}
    entries = cli_fields()
    assert entries, "some limits must be overridable"
    options = [option for _, option, _, _ in entries]
    assert len(set(options)) == len(options)
    for name, option, help_text, kind in entries:
        assert name in names
        assert option == option.lower() and " " not in option
        assert f"default {names[name].default}" in help_text
        assert kind is type(names[name].default)
    assert ("display_reply_timeout", "display-timeout") in {(n, o) for n, o, _, _ in entries}


def test_error_hierarchy() -> None:
    for cls in (GuestProtocolError, FrontendProtocolError, DisplayProtocolError, StateError):
        assert issubclass(cls, VgpuError)
    err = GuestProtocolError("bad rect")
    assert err.resp_code is Resp.ERR_INVALID_PARAMETER and not err.ring_fatal
    assert str(err) == "bad rect [ERR_INVALID_PARAMETER]"
    fatal = GuestProtocolError("loop", Resp.ERR_UNSPEC, ring_fatal=True)
    assert fatal.ring_fatal and fatal.resp_code is Resp.ERR_UNSPEC
    assert FrontendProtocolError("x", (3, 4)).fds == (3, 4)
    state = StateError("not now", "STOPPED", ("RUNNING",))
    assert (state.state, state.required) == ("STOPPED", ("RUNNING",))

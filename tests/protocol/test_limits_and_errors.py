"""``protocol.limits`` validation and the error hierarchy."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import (
    DisplayProtocolError,
    FrontendProtocolError,
    GuestProtocolError,
    StateError,
    VgpuError,
)
from protocol.limits import (
    DEFAULT_LIMITS,
    GiB,
    KiB,
    Limits,
    MiB,
    TiB,
    cli_fields,
    format_size,
    parse_size,
)
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
    options = [limit.option for limit in entries]
    assert len(set(options)) == len(options)
    for limit in entries:
        default = names[limit.name].default
        assert limit.option == limit.option.lower() and " " not in limit.option
        assert limit.metavar in ("N", "BYTES", "SECONDS")
        shown = limit.help.rsplit("(default ", 1)[1].rstrip(")")
        assert limit.parse(shown.removesuffix(" s").replace(" ", "")) == default
        assert type(limit.parse(str(default))) is type(default)
    kinds = {limit.option: limit.metavar for limit in entries}
    assert (kinds["display-timeout"], kinds["max-hostmem"], kinds["max-resources"]) == (
        "SECONDS", "BYTES", "N")
    assert "(default 256 MiB)" in next(e.help for e in entries if e.option == "max-hostmem")


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("0", 0), ("64k", 64 * KiB), ("64K", 64 * KiB), ("256M", 256 * MiB),
    ("256MiB", 256 * MiB), ("16G", 16 * GiB), ("16 GB", 16 * GiB), ("1.5G", 3 * GiB // 2),
    ("2T", 2 * TiB), (" 8m ", 8 * MiB), ("0.5K", 512)])
def test_sizes_as_operators_write_them(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1", "1e9", "0x10", "1.1", "0.3K", "1.5P",
                                  "16 G B", "1,024", "nan", "inf"])
def test_sizes_that_are_not_whole_bytes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text)):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 64))
def test_a_formatted_size_parses_back(size: int) -> None:
    shown = format_size(size)
    assert parse_size(shown) == size
    number = shown.split()[0]
    assert number == str(size) or int(number) < size  # the largest unit that divides it


def test_sizes_show_in_the_largest_unit_that_divides_them() -> None:
    assert [format_size(n) for n in (0, 1000, 1024, 1536, 3 * MiB, 16 * GiB, TiB + GiB)] == [
        "0", "1000", "1 KiB", "1536", "3 MiB", "16 GiB", "1025 GiB"]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_limits_must_be_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        Limits(display_reply_timeout=bad)


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

"""The shortcuts of the prepare phase parse exactly what the rules of §2 parse: tables of the
valid 22 and 53 values, field 60 parsed once per value, and a track checked without building it."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcodec import subfields
from cardcodec.crypto import Suite
from cardcodec.errors import CodecError
from cardcodec.subfields import EntryMode, MessageData, SecurityControl, Track2


def entry_mode_by_rule(value: str) -> EntryMode | None:
    """Field 22 as §2 words it: `0`, then `1` keyed or `2` swipe, then `1` PIN or `2` none."""
    if len(value) != 3 or value[0] != "0" or value[1] not in "12" or value[2] not in "12":
        return None
    return EntryMode(keyed=value[1] == "1", pin_entered=value[2] == "1")


def security_control_by_rule(value: str) -> SecurityControl | None:
    """Field 53 as §2 words it: PIN digit 0/2, suite 6/4, track digit 0/1, thirteen zeros."""
    suites = {"6": Suite.TDES, "4": Suite.SM4}
    if len(value) != 16 or value[0] not in "02" or value[1] not in suites:
        return None
    if value[2] not in "01" or value[3:] != "0" * 13:
        return None
    return SecurityControl(value[0] == "2", suites[value[1]], value[2] == "1")


@pytest.mark.parametrize("length", [2, 3, 4])
def test_entry_mode_parses_what_the_rule_allows_and_nothing_else(length: int) -> None:
    """Every short string over the digits near the valid ones parses as the rule says."""
    for chars in itertools.product("0123a", repeat=length):
        value = "".join(chars)
        expected = entry_mode_by_rule(value)
        if expected is None:
            with pytest.raises(CodecError):
                EntryMode.parse(value)
        else:
            assert EntryMode.parse(value) == expected


def test_security_control_parses_what_the_rule_allows_and_nothing_else() -> None:
    """Every first three digits, with the zero tail and with a tail that is not zero."""
    for head in itertools.product("0123456789", repeat=3):
        for tail in ("0" * 13, "0" * 12 + "1", "1" + "0" * 12, "0" * 12):
            value = "".join(head) + tail
            expected = security_control_by_rule(value)
            if expected is None:
                with pytest.raises(CodecError) as caught:
                    SecurityControl.parse(value)
                assert caught.value.field == 53
            else:
                assert SecurityControl.parse(value) == expected


def test_message_data_is_parsed_once_per_value_and_refused_every_time() -> None:
    """A value parsed again is the same (immutable) result; a bad value is never remembered."""
    first = MessageData.parse("22000001000200")
    assert MessageData.parse("22000001000200") is first
    for _ in range(2):
        with pytest.raises(CodecError):
            MessageData.parse("22000001000202")
    assert "22000001000202" not in subfields._MESSAGE_DATA


def test_message_data_cache_is_bounded() -> None:
    """Random batches cannot grow the cache past its bound; values still parse right."""
    for batch in range(subfields._MESSAGE_DATA_SIZE + 10):
        value = f"22{batch:06d}000200"
        assert MessageData.parse(value).batch == f"{batch:06d}"
    assert len(subfields._MESSAGE_DATA) <= subfields._MESSAGE_DATA_SIZE


@given(st.text("0123456789DA", max_size=40))
def test_track_check_refuses_exactly_what_parse_refuses(value: str) -> None:
    """`Track2.check` and `Track2.parse` agree on every value, with the same reason."""
    try:
        Track2.parse(value)
    except CodecError as error:
        with pytest.raises(CodecError) as caught:
            Track2.check(value)
        assert caught.value.reason == error.reason
        assert caught.value.field == 35
    else:
        Track2.check(value)

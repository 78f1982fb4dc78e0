"""Typed views of the structured fields: each parses what it formats and refuses bad shapes."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcodec.crypto import Suite
from cardcodec.errors import CodecError
from cardcodec.subfields import (
    Balance,
    EntryMode,
    MessageData,
    OriginalData,
    PointsInfo,
    SecurityControl,
    SettlementTotals,
    Totals,
    Track2,
    UploadRecord,
    format_upload,
    format_upload_end,
    parse_operator,
    parse_upload,
    parse_upload_end,
)

digits = st.text(string.digits, min_size=1, max_size=1)


def test_entry_mode_swipe_keyed_pin() -> None:
    """022 swipe without PIN, 021 swipe with PIN, 012 keyed without PIN."""
    assert EntryMode.parse("022") == EntryMode(keyed=False, pin_entered=False)
    assert EntryMode.parse("021") == EntryMode(keyed=False, pin_entered=True)
    assert EntryMode.parse("012").keyed
    for bad in ("032", "020", "123", "02"):
        with pytest.raises(CodecError):
            EntryMode.parse(bad)


@given(st.booleans(), st.sampled_from(list(Suite)), st.booleans())
def test_security_control_round_trips(pin: bool, suite: Suite, track: bool) -> None:
    """Field 53 formats and parses back for every combination."""
    control = SecurityControl(pin, suite, track)
    assert SecurityControl.parse(control.format()) == control


@pytest.mark.parametrize(
    "bad", ["1600000000000000", "0500000000000000", "0620000000000000", "0600000000000001", "06"]
)
def test_security_control_refuses_out_of_range_digits(bad: str) -> None:
    """Only 0/2, 6/4, 0/1 and thirteen zeros are allowed."""
    with pytest.raises(CodecError) as caught:
        SecurityControl.parse(bad)
    assert caught.value.field == 53


def test_message_data_management_and_financial() -> None:
    """60 has 11 digits for management, 14 for financial messages, 60.6 0 or 1."""
    assert MessageData.parse("00000001004") == MessageData("00", "000001", "004")
    financial = MessageData.parse("22000001000201")
    assert financial.financial
    assert financial.partial_supported is True
    assert MessageData.parse(financial.format()) == financial
    assert financial.with_batch("000002").batch == "000002"
    for bad in ("0000000100", "22000001000202", "220000010002001"):
        with pytest.raises(CodecError):
            MessageData.parse(bad)


def test_original_data_with_and_without_date() -> None:
    """61 is batch + trace, plus MMDD for refunds."""
    assert OriginalData.parse("000001000042") == OriginalData("000001", "000042")
    refund = OriginalData("000001", "000042", "1115")
    assert OriginalData.parse(refund.format()) == refund
    with pytest.raises(CodecError):
        OriginalData.parse("0000010000421")


@given(
    st.integers(0, 10**12 - 1),
    st.integers(0, 999),
    st.integers(0, 10**12 - 1),
    st.integers(0, 999),
    st.integers(0, 2),
)
def test_settlement_totals_round_trip(
    debit: int, debits: int, credit: int, credits: int, result: int
) -> None:
    """48 of the 0500/0510: 62 digits, foreign half zeros, result digit."""
    totals = SettlementTotals(Totals(debit, debits, credit, credits), result)
    text = totals.format()
    assert len(text) == 62
    assert text[31:] == "0" * 31
    assert SettlementTotals.parse(text) == totals


def test_settlement_totals_refuse_overflow() -> None:
    """A count of 1000 does not fit n3."""
    with pytest.raises(CodecError):
        SettlementTotals(Totals(0, 1000, 0, 0)).format()


def test_upload_records_round_trip_and_bounds() -> None:
    """0320 field 48: count n2 then 1-8 records of 40 digits; card right-aligned in n20."""
    records = tuple(UploadRecord(f"{i:06d}", "6688000000000000014", 100 * i) for i in range(1, 9))
    text = format_upload(records)
    assert len(text) == 2 + 8 * 40
    assert text[10:30] == "06688000000000000014"
    assert parse_upload(text) == records
    with pytest.raises(CodecError):
        format_upload(())
    with pytest.raises(CodecError):
        parse_upload("03" + text[2:42])
    assert parse_upload_end(format_upload_end(17)) == 17


@pytest.mark.parametrize(
    ("trace", "card"),
    [
        ("000000", "06688000000000000014"),  # no trace is 000000 (field 11)
        ("000001", "66880000000000000148"),  # 20 significant digits: no card has them
        ("000001", "00000000006688000001"),  # 10: none has so few
        ("000001", "00000000000000000000"),  # no card at all
    ],
)
def test_an_upload_record_without_a_trace_or_a_card_number_is_refused(
    trace: str, card: str
) -> None:
    """The records are the terminal's view of its batch, kept for reconciliation: one that
    names no trace or no card number a terminal could have read is a format error (`30`),
    not a record for the pack to list."""
    text = "01" + "00" + trace + card + "000000000100"
    with pytest.raises(CodecError, match=r"trace|card number") as refused:
        parse_upload(text)
    assert refused.value.field == 48


def test_upload_record_repr_masks_the_card() -> None:
    """A record printed in a log shows the card masked."""
    record = UploadRecord("000001", "6688000000000000014", 1)
    assert "6688000000000000014" not in repr(record)


def test_balance_and_points_info() -> None:
    """54 and 63 of an answer have exact shapes."""
    assert Balance(187200).format() == "9002156C000000187200"
    assert Balance.parse("9002156C000000187200") == Balance(187200)
    info = PointsInfo(6400, 93600, 1000, 12800)
    assert len(info.format()) == 39
    assert PointsInfo.parse(info.format()) == info
    with pytest.raises(CodecError):
        Balance.parse("9002156D000000187200")
    with pytest.raises(CodecError):
        PointsInfo.parse("VIP" + "0" * 35)
    assert parse_operator("01 ") == "01 "
    with pytest.raises(CodecError):
        parse_operator("0001")


def test_track2_parts() -> None:
    """Track 2 is card, D, YYMM, service code and 10 discretionary digits."""
    track = Track2.parse("6688001234567890124D28121010000012345")
    assert track == Track2("6688001234567890124", "2812", "101", "0000012345")
    assert track.format() == "6688001234567890124D28121010000012345"
    assert "6688001234567890124" not in repr(track)
    for bad in (
        "6688001234567890124D2812101000001234",
        "6688001234567890124281210100000123456",
        "6688001234567890124D2812101000001234A",
        "D28121010000012345",
    ):
        with pytest.raises(CodecError) as caught:
            Track2.parse(bad)
        assert caught.value.field == 35
        assert bad not in str(caught.value)

"""Clearing's arithmetic and layouts on hand-worked figures: fees, signs, rounding, positions."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, time
from pathlib import Path

import pytest

from clearing.layout import (
    Detail,
    Header,
    LayoutError,
    MerchantRecord,
    Trailer,
    format_detail,
    format_header,
    format_merchant,
    format_trailer,
    number,
    parse_detail,
    signed,
)
from clearing.money import (
    Totals,
    average_fee_above,
    entry_sign,
    merchant_fee_fen,
    rounding_gain_fen,
)
from clearing.period import Month, month_begins, month_ends, refuse_unfinished
from clearing.reconcile.rules import basis_points_text
from gateway.clock import SHANGHAI
from gateway.config import load_config
from gateway.errors import BadInput
from gateway.points import convert, partial_conversion

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
ELEVEN_PM = time(23, 0)


@pytest.mark.parametrize(
    ("settled", "fee_bp", "fee"),
    [
        (11520, 80, 92),  # 92.16 rounds down
        (125, 40, 1),  # exactly 0.5 rounds up
        (124, 40, 0),  # 0.496 rounds down
        (-125, 40, -1),  # a refund's half rounds away from zero: the fee given back is 1
        (-4500, 80, -36),
        (1899, 60, 11),  # 11.394
        (0, 80, 0),
        (3333, 80, 27),  # 26.664 rounds up
    ],
)
def test_merchant_fee_rounds_half_up_on_the_unsigned_amount(
    settled: int, fee_bp: int, fee: int
) -> None:
    """round_half_up(|D| x fee_bp / 10000) with the entry's sign."""
    assert merchant_fee_fen(settled, fee_bp) == fee


def test_fees_refuse_anything_but_integers() -> None:
    """A float amount or rate never reaches the fee arithmetic."""
    with pytest.raises(TypeError):
        merchant_fee_fen(100.0, 80)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fee_bp"):
        merchant_fee_fen(100, 10001)


def test_rounding_gain_takes_the_entry_sign() -> None:
    """2P - |D|: +1 for an odd redemption, -1 for a refund that returns a point over its fen."""
    assert rounding_gain_fen(1, 950, 1899) == 1
    assert rounding_gain_fen(1, 5760, 11520) == 0
    assert rounding_gain_fen(-1, 475, -949) == -1


def test_entry_sign_comes_from_the_type() -> None:
    """Redemptions +, refunds and voids -, reversals by their amount; a 0 fen refund is -."""
    assert entry_sign("22", 100) == 1
    assert entry_sign("25", 0) == -1
    assert entry_sign("23", -100) == -1
    assert entry_sign("04", 100) == 1
    assert entry_sign("04", -100) == -1


def test_average_fee_limit_is_compared_in_integers() -> None:
    """Exactly 1% is allowed, one fen more is not; fees with nothing settled are above."""
    assert not average_fee_above(100, 10000)
    assert average_fee_above(101, 10000)
    assert average_fee_above(1, 0)
    assert not average_fee_above(0, 0)
    assert not average_fee_above(-1, 0)


def test_a_month_of_net_refunds_is_held_to_the_same_rate() -> None:
    """Both sums negative: fees / settled is the rate given back, against the same 1%."""
    assert not average_fee_above(-100, -10000)  # exactly 1%
    assert average_fee_above(-101, -10000)  # one fen more given back than 1% allows
    assert not average_fee_above(0, -10000)
    assert average_fee_above(1, -10000)  # a fee kept on a month of net refunds
    assert basis_points_text(-200, -10000) == "200.00 bp"
    assert basis_points_text(200, -10000) == "-200.00 bp"


def test_partial_approval_and_discount_conversions_by_hand() -> None:
    """A' from 150 points under 3%: floor(300 x 10000 / 9700) = 309, D = 300, P = 150."""
    partial = partial_conversion(150, 300)
    assert (partial.amount_fen, partial.settled_fen, partial.points) == (309, 300, 150)
    discounted = convert(1999, 500)
    assert (discounted.settled_fen, discounted.points) == (1899, 950)


def test_totals_keep_types_apart_and_net_is_settled_less_fees() -> None:
    """Merchant record figures: redemptions vs others, fees, net, points both ways."""
    totals = Totals()
    totals.add("22", 1, 11520, 5760, 92)
    totals.add("25", -1, -949, 475, -6)
    totals.add("04", 1, 300, 150, 2)
    assert (totals.redemption_count, totals.redemptions_fen) == (1, 11520)
    assert (totals.other_count, totals.others_fen) == (2, -649)
    assert (totals.settled_fen, totals.fees_fen, totals.net_fen) == (10871, 88, 10783)
    assert (totals.points_given, totals.points_returned) == (5910, 475)
    assert totals.rounding_gain_fen == -1  # 0 + (-(950 - 949)) + (300 - 300)


def test_signed_amounts_and_numbers_never_cut() -> None:
    """Zero is +; a value too wide for its field is refused rather than truncated."""
    assert signed(0) == "+000000000000000"
    assert signed(-4500) == "-000000000004500"
    assert signed(10**15 - 1) == "+999999999999999"
    with pytest.raises(LayoutError):
        signed(10**15)
    with pytest.raises(LayoutError):
        number(-1, 6)
    with pytest.raises(LayoutError):
        number(1_000_000, 6)


DETAIL = Detail(
    sequence=7,
    merchant_id="898310048990001",
    terminal_id="10000001",
    business_date=date(2026, 12, 1),
    local_time=datetime(2026, 11, 30, 15, 30, 5, 999999, tzinfo=UTC),  # 23:30:05 in Shanghai
    entry_type="25",
    batch=2,
    trace=31,
    rrn="000000000123",
    card_masked="668800*********0124",
    list_amount_fen=5000,
    discount_bp=1000,
    settled_fen=-4500,
    points=2250,
    fee_fen=-36,
    net_fen=-4464,
    original_rrn="000000000077",
)


def _at(record: str, first: int, last: int) -> str:
    """The spec's 1-based, inclusive positions."""
    return record[first - 1 : last]


def test_detail_record_positions_are_the_spec() -> None:
    """Every field of a `D` record where §6 puts it, times on the Shanghai clock."""
    record = format_detail(DETAIL)
    assert len(record) == 200
    expected = {
        (1, 1): "D",
        (2, 9): "00000007",
        (10, 24): "898310048990001",
        (25, 32): "10000001",
        (33, 40): "20261201",
        (41, 54): "20261130233005",
        (55, 56): "25",
        (57, 62): "000002",
        (63, 68): "000031",
        (69, 80): "000000000123",
        (81, 99): "668800*********0124",
        (100, 111): "000000005000",
        (112, 115): "1000",
        (116, 131): "-000000000004500",
        (132, 141): "0000002250",
        (142, 157): "-000000000000036",
        (158, 173): "-000000000004464",
        (174, 185): "000000000077",
        (186, 200): " " * 15,
    }
    for (first, last), value in expected.items():
        assert _at(record, first, last) == value, (first, last)


def test_detail_reads_back_as_written() -> None:
    """parse(format(d)) is d, to the second."""
    faults: list[str] = []
    parsed = parse_detail(format_detail(DETAIL), faults)
    assert faults == []
    assert parsed == DETAIL._replace(local_time=DETAIL.local_time.replace(microsecond=0))


def test_a_redemption_detail_has_no_original_rrn() -> None:
    """Type 22: positions 174-185 are spaces."""
    record = format_detail(DETAIL._replace(entry_type="22", original_rrn=None, settled_fen=4500))
    assert _at(record, 174, 200) == " " * 27


def test_a_detail_that_does_not_fit_is_refused() -> None:
    """A negative count, a wide amount or a long id: LayoutError, never a shifted record."""
    for bad in (
        DETAIL._replace(points=-1),
        DETAIL._replace(settled_fen=-(10**15)),
        DETAIL._replace(merchant_id="8983100489900011"),
        DETAIL._replace(entry_type="2"),
    ):
        with pytest.raises(LayoutError):
            format_detail(bad)


def test_header_merchant_and_trailer_positions_are_the_spec() -> None:
    """H, M and T records field by field."""
    header = format_header(
        Header(
            "CMCCVIP00000001",
            "ACQ000000000001",
            "202611",
            "001",
            datetime(2026, 12, 1, 1, 0, tzinfo=UTC),
        )
    )
    assert (_at(header, 1, 9), _at(header, 10, 24), _at(header, 25, 39)) == (
        "HVIPSET01",
        "CMCCVIP00000001",
        "ACQ000000000001",
    )
    assert (_at(header, 40, 45), _at(header, 46, 48), _at(header, 49, 62)) == (
        "202611",
        "001",
        "20261201090000",
    )
    assert _at(header, 63, 200) == " " * 138
    merchant = format_merchant(MerchantRecord("898310048990001", 5, 27154, 0, 0, 217, 26937, 80))
    assert _at(merchant, 1, 16) == "M898310048990001"
    assert _at(merchant, 17, 24) == "00000005"
    assert _at(merchant, 25, 40) == "+000000000027154"
    assert _at(merchant, 41, 64) == "00000000+000000000000000"
    assert _at(merchant, 65, 96) == "+000000000000217+000000000026937"
    assert _at(merchant, 97, 100) == "0080"
    assert _at(merchant, 101, 200) == " " * 100
    trailer = format_trailer(Trailer(6, 2, 28104, 222, 27882, "ab" * 32))
    assert _at(trailer, 1, 17) == "T0000000600000002"
    assert _at(trailer, 18, 65) == "+000000000028104+000000000000222+000000000027882"
    assert _at(trailer, 66, 129) == "ab" * 32
    assert _at(trailer, 130, 200) == " " * 71


def test_month_ends_at_the_cutoff_of_its_last_business_date() -> None:
    """With a 23:00 cut-off November runs from 31 Oct 23:00 to 30 Nov 23:00 (Shanghai)."""
    november = Month(2026, 11)
    assert month_begins(november, SHANGHAI, ELEVEN_PM) == datetime(
        2026, 10, 31, 23, 0, tzinfo=SHANGHAI
    )
    assert month_ends(november, SHANGHAI, ELEVEN_PM) == datetime(
        2026, 11, 30, 23, 0, tzinfo=SHANGHAI
    )
    assert month_ends(november, SHANGHAI, time(0, 0)) == datetime(
        2026, 12, 1, 0, 0, tzinfo=SHANGHAI
    )


def test_an_unfinished_month_is_refused() -> None:
    """One second before the last business date ends: BadInput (exit 2); at the end: fine."""
    november = Month(2026, 11)
    end = datetime(2026, 11, 30, 23, 0, tzinfo=SHANGHAI)
    with pytest.raises(BadInput, match="not over"):
        refuse_unfinished(november, end.replace(second=0, minute=59, hour=22), SHANGHAI, ELEVEN_PM)
    refuse_unfinished(november, end, SHANGHAI, ELEVEN_PM)


@pytest.mark.parametrize("text", ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-00"])
def test_a_malformed_month_is_bad_input(text: str) -> None:
    """--month must be YYYY-MM."""
    with pytest.raises(BadInput, match="--month"):
        Month.parse(text)


def test_config_refuses_a_fee_above_the_bank_card_fee(tmp_path: Path) -> None:
    """fee_bp above bank_card_fee_bp is refused at load, naming the merchant and the key."""
    text = DEMO.read_text(encoding="utf-8").replace("fee_bp = 80\n", "fee_bp = 101\n", 1)
    path = tmp_path / "fees.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BadInput, match=r"merchants\[0\] \(898310048990001\)\.fee_bp: 101 is above"):
        load_config(path)
    equal = DEMO.read_text(encoding="utf-8").replace("fee_bp = 80\n", "fee_bp = 100\n", 1)
    path.write_text(equal, encoding="utf-8")
    config = load_config(path)
    assert dataclasses.replace(config.merchants[0]).fee_bp == 100


def test_average_fee_is_shown_in_basis_points_computed_in_integers() -> None:
    """222 fen of fees on 28104 fen settled: 78.99 bp, truncated, never a float."""
    assert basis_points_text(222, 28104) == "78.99 bp"
    assert basis_points_text(-5, 10000) == "-5.00 bp"
    assert basis_points_text(100, 10000) == "100.00 bp"
    assert basis_points_text(1, 0) == "n/a"
    assert basis_points_text(0, -10000) == "0.00 bp"

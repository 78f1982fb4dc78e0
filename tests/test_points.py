"""Money into points and back: the roundings of points-and-clearing.md §1 and §3."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.points import (
    POINT_VALUE_FEN,
    Conversion,
    convert,
    partial_conversion,
    points_for,
    refund_share,
    rounding_gain_fen,
    settled_fen,
)

MAX_AMOUNT_FEN = 999_999_999_999  # field 4, n12

amounts = st.integers(min_value=0, max_value=MAX_AMOUNT_FEN)
positive_amounts = st.integers(min_value=1, max_value=MAX_AMOUNT_FEN)
discounts = st.integers(min_value=0, max_value=9999)
points_balances = st.integers(min_value=0, max_value=MAX_AMOUNT_FEN)


def reference_settled(amount_fen: int, discount_bp: int) -> int:
    """round_half_up of the exact rational, computed independently with Fraction."""
    exact = Fraction(amount_fen * (10000 - discount_bp), 10000)
    return int(exact + Fraction(1, 2)) if exact >= 0 else 0


# --- settled amount -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount_fen", "discount_bp", "expected"),
    [
        (0, 0, 0),
        (1, 0, 1),
        (1, 4999, 1),  # 0.5001 rounds up
        (1, 5000, 1),  # exactly 0.5: half up
        (1, 5001, 0),  # 0.4999 rounds down
        (1, 9999, 0),
        (3, 5000, 2),  # 1.5: half up
        (5, 5000, 3),  # 2.5: half up, not to even
        (12800, 0, 12800),
        (12801, 1000, 11521),  # 11520.9
        (12805, 1000, 11525),  # 11524.5: half up
        (4999, 9999, 0),  # 0.4999
        (5000, 9999, 1),  # 0.5
        (10000, 9999, 1),
        (MAX_AMOUNT_FEN, 0, MAX_AMOUNT_FEN),
        (MAX_AMOUNT_FEN, 9999, 100_000_000),  # 99999999.9999
        (MAX_AMOUNT_FEN, 5000, 500_000_000_000),  # 499999999999.5
    ],
)
def test_settled_fen_rounds_half_up(amount_fen: int, discount_bp: int, expected: int) -> None:
    """D = round_half_up(A x (10000 - d) / 10000) at 0, 1 fen, the n12 maximum and the half."""
    assert settled_fen(amount_fen, discount_bp) == expected


@given(amounts, discounts)
def test_settled_fen_matches_exact_rational_rounding(amount_fen: int, discount_bp: int) -> None:
    """The integer formula equals half-up rounding of the exact fraction for any A and d."""
    assert settled_fen(amount_fen, discount_bp) == reference_settled(amount_fen, discount_bp)


@given(amounts, discounts)
def test_settled_never_exceeds_the_list_amount(amount_fen: int, discount_bp: int) -> None:
    """A discount never raises what the merchant is settled."""
    assert 0 <= settled_fen(amount_fen, discount_bp) <= amount_fen


# --- points -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settled", "expected"),
    [
        (0, 0),
        (1, 1),
        (2, 1),
        (3, 2),
        (12800, 6400),
        (12801, 6401),
        (MAX_AMOUNT_FEN, 500_000_000_000),
    ],
)
def test_points_for_rounds_up(settled: int, expected: int) -> None:
    """P = ceil(D / 2): an odd fen costs a whole point."""
    assert points_for(settled) == expected


@given(amounts, discounts)
def test_rounding_gain_is_zero_or_one_fen(amount_fen: int, discount_bp: int) -> None:
    """2P - D is 0 or 1 fen for every conversion."""
    conversion = convert(amount_fen, discount_bp)
    assert conversion.points * POINT_VALUE_FEN - conversion.settled_fen in (0, 1)
    assert rounding_gain_fen(conversion.points, conversion.settled_fen) in (0, 1)


def test_convert_gold_card_example() -> None:
    """12800 fen with no rule costs 6400 points (the operations.md scenario)."""
    assert convert(12800, 0) == Conversion(12800, 0, 12800, 6400)


def test_convert_odd_fen_under_discount() -> None:
    """12801 fen at 10% is settled 11521 fen for 5761 points, a 1 fen rounding gain."""
    conversion = convert(12801, 1000)
    assert conversion == Conversion(12801, 1000, 11521, 5761)
    assert rounding_gain_fen(conversion.points, conversion.settled_fen) == 1


def test_convert_tiny_amount_under_big_discount_settles_zero() -> None:
    """A tiny amount under a big discount settles 0 fen for 0 points (the gateway answers 13)."""
    assert convert(1, 9999) == Conversion(1, 9999, 0, 0)


def test_conversion_refuses_inconsistent_figures() -> None:
    """A Conversion whose D or P does not follow from A and d is refused on construction."""
    with pytest.raises(ValueError, match="settled_fen"):
        Conversion(12800, 0, 12799, 6400)
    with pytest.raises(ValueError, match="points"):
        Conversion(12800, 0, 12800, 6401)


# --- argument checks ----------------------------------------------------------------------


@pytest.mark.parametrize("discount_bp", [-1, 10000, 12000])
def test_discount_outside_range_is_refused(discount_bp: int) -> None:
    """A discount outside 0-9999 is a ValueError naming discount_bp."""
    with pytest.raises(ValueError, match="discount_bp"):
        settled_fen(100, discount_bp)
    with pytest.raises(ValueError, match="discount_bp"):
        partial_conversion(100, discount_bp)


def test_negative_arguments_are_refused_by_name() -> None:
    """Negative amounts, settled amounts and points are ValueErrors naming the argument."""
    with pytest.raises(ValueError, match="amount_fen"):
        convert(-1, 0)
    with pytest.raises(ValueError, match="settled_fen"):
        points_for(-1)
    with pytest.raises(ValueError, match="spendable_points"):
        partial_conversion(-1, 0)
    with pytest.raises(ValueError, match="points"):
        rounding_gain_fen(-1, 0)


def test_floats_and_bools_are_refused() -> None:
    """Money is integers only: a float or a bool is a TypeError naming the argument."""
    with pytest.raises(TypeError, match="amount_fen"):
        convert(12.5, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="discount_bp"):
        convert(100, True)


# --- partial approval ---------------------------------------------------------------------


def test_partial_conversion_known_example() -> None:
    """1000 points at 10% cover A' = floor(2000 x 10000 / 9000) = 2222 fen, D 2000, P 1000."""
    assert partial_conversion(1000, 1000) == Conversion(2222, 1000, 2000, 1000)


def test_partial_conversion_where_rounding_leaves_a_point() -> None:
    """1 point at 33.33% covers A' = floor(20000 / 6667) = 2 fen, settled 1 fen for 1 point."""
    assert partial_conversion(1, 3333) == Conversion(2, 3333, 1, 1)


def test_partial_conversion_of_no_points_is_zero() -> None:
    """No spendable points cover nothing."""
    assert partial_conversion(0, 500) == Conversion(0, 500, 0, 0)


@given(points_balances, discounts)
def test_partial_conversion_never_spends_more_than_the_balance(
    spendable_points: int, discount_bp: int
) -> None:
    """P <= B for every balance and discount, and A' is the spec's floor."""
    conversion = partial_conversion(spendable_points, discount_bp)
    assert conversion.points <= spendable_points
    covered = 2 * spendable_points * 10000
    assert conversion.amount_fen * (10000 - discount_bp) <= covered
    assert (conversion.amount_fen + 1) * (10000 - discount_bp) > covered


@given(positive_amounts, discounts, points_balances)
def test_partial_amount_is_below_a_requested_amount_it_replaces(
    amount_fen: int, discount_bp: int, spendable_points: int
) -> None:
    """When B does not cover A, A' < A, so A' fits in field 4 wherever A did."""
    if convert(amount_fen, discount_bp).points > spendable_points:
        assert partial_conversion(spendable_points, discount_bp).amount_fen < amount_fen


# --- refunds ------------------------------------------------------------------------------


def test_refund_of_the_whole_returns_everything() -> None:
    """A refund of the whole list amount returns all of P and claws back all of D."""
    original = convert(12801, 1000)
    assert refund_share(original, 12801, 0, 0, 0) == (5761, 11521)


def test_refund_shares_floor_and_the_last_takes_the_rest() -> None:
    """Partial refunds floor their shares; the one that completes A takes what is left."""
    original = convert(10001, 0)  # D 10001, P 5001
    first = refund_share(original, 3333, 0, 0, 0)
    assert first == (5001 * 3333 // 10001, 3333)
    second = refund_share(original, 6668, 3333, first[0], first[1])
    assert second == (5001 - first[0], 10001 - 3333)


def test_refund_over_what_is_left_is_refused() -> None:
    """A refund beyond the list amount still unrefunded is a ValueError."""
    original = convert(10000, 0)
    with pytest.raises(ValueError, match="left"):
        refund_share(original, 10001, 0, 0, 0)
    with pytest.raises(ValueError, match="left"):
        refund_share(original, 2, 9999, 4999, 9999)


def test_refund_of_nothing_is_refused() -> None:
    """A refund of 0 fen is a ValueError naming refund_fen."""
    with pytest.raises(ValueError, match="refund_fen"):
        refund_share(convert(10000, 0), 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("before", "name"),
    [
        ((-1, 0, 0), "refunded_fen_before"),
        ((10001, 0, 0), "refunded_fen_before"),
        ((0, 5001, 0), "points_returned_before"),
        ((0, 0, 10001), "fen_clawed_before"),
    ],
)
def test_refund_history_out_of_range_is_refused(before: tuple[int, int, int], name: str) -> None:
    """Earlier refund totals that are negative or beyond the original are refused by name."""
    with pytest.raises(ValueError, match=name):
        refund_share(convert(10000, 0), 1, *before)


@st.composite
def refund_splits(draw: st.DrawFn) -> tuple[Conversion, list[int]]:
    """An original conversion and a split of its whole list amount into refunds."""
    amount_fen = draw(st.integers(min_value=1, max_value=MAX_AMOUNT_FEN))
    original = convert(amount_fen, draw(discounts))
    cuts = draw(st.lists(st.integers(min_value=1, max_value=amount_fen), max_size=8))
    edges = sorted({0, amount_fen, *cuts})
    return original, [high - low for low, high in itertools.pairwise(edges)]


@given(refund_splits())
def test_refund_shares_sum_exactly_to_points_and_settled(
    case: tuple[Conversion, list[int]],
) -> None:
    """Over any split of A, the points returned sum to P and the fen clawed back to D."""
    original, parts = case
    refunded = returned = clawed = 0
    for part in parts:
        points, fen = refund_share(original, part, refunded, returned, clawed)
        assert points >= 0
        assert fen >= 0
        refunded, returned, clawed = refunded + part, returned + points, clawed + fen
    assert (refunded, returned, clawed) == (
        original.amount_fen,
        original.points,
        original.settled_fen,
    )

"""Money into points and back (points-and-clearing.md §1 and §3), in integers only.

Every conversion between a list amount in fen, the settled amount the merchant is paid and the
points the member gives up happens here, each with its one rounding rule, so that the decision,
the ledger and clearing cannot disagree by a fen or a point.
"""

from __future__ import annotations

from dataclasses import dataclass

POINT_VALUE_FEN = 2
BP_WHOLE = 10000
MAX_DISCOUNT_BP = BP_WHOLE - 1
# The most points a card may hold: field 63 of an answer carries the points used and the
# spendable balance as n10 (and field 54 their cash value, 2 fen a point, as n12).
MAX_CARD_POINTS = 9_999_999_999


def _check_int(name: str, value: int, low: int = 0, high: int | None = None) -> None:
    """Refuse a non-integer (floats and bools included) or an out-of-range argument."""
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high}, got {value}")


def _check_discount(discount_bp: int) -> None:
    _check_int("discount_bp", discount_bp, 0, MAX_DISCOUNT_BP)


def settled_fen(amount_fen: int, discount_bp: int) -> int:
    """D = round_half_up(A x (10000 - d) / 10000): what the merchant is settled."""
    _check_int("amount_fen", amount_fen)
    _check_discount(discount_bp)
    return (amount_fen * (BP_WHOLE - discount_bp) + BP_WHOLE // 2) // BP_WHOLE


def points_for(settled_fen: int) -> int:
    """P = ceil(D / 2): the points worth at least the settled amount."""
    _check_int("settled_fen", settled_fen)
    return -(-settled_fen // POINT_VALUE_FEN)


def rounding_gain_fen(points: int, settled_fen: int) -> int:
    """2P - D: what the points given up are worth above the settled amount (0 or 1 fen)."""
    _check_int("points", points)
    _check_int("settled_fen", settled_fen)
    return points * POINT_VALUE_FEN - settled_fen


@dataclass(frozen=True)
class Conversion:
    """A list amount A under a discount d, with the settled amount D and points P it gives.

    The figures are checked against each other on construction, so a Conversion read back
    from storage with inconsistent figures is refused rather than settled.
    """

    amount_fen: int
    discount_bp: int
    settled_fen: int
    points: int

    def __post_init__(self) -> None:
        expected_settled = settled_fen(self.amount_fen, self.discount_bp)
        if self.settled_fen != expected_settled:
            raise ValueError(
                f"settled_fen {self.settled_fen} does not follow from amount_fen and "
                f"discount_bp (expected {expected_settled})"
            )
        if self.points != points_for(self.settled_fen):
            raise ValueError(f"points {self.points} does not follow from settled_fen")


def convert(amount_fen: int, discount_bp: int) -> Conversion:
    """The conversion of a list amount under a discount."""
    settled = settled_fen(amount_fen, discount_bp)
    return Conversion(amount_fen, discount_bp, settled, points_for(settled))


def partial_conversion(spendable_points: int, discount_bp: int) -> Conversion:
    """The largest list amount A' that B spendable points cover, and its conversion.

    D' = 2B, A' = floor(D' x 10000 / (10000 - d)), then D and P from A' as in `convert`.
    Since A' x (10000 - d) <= D' x 10000, D rounds to at most D' and P <= B. When B does not
    cover the requested amount A, A' < A, so A' fits wherever A did.
    """
    _check_int("spendable_points", spendable_points)
    _check_discount(discount_bp)
    covered_fen = spendable_points * POINT_VALUE_FEN
    amount_fen = covered_fen * BP_WHOLE // (BP_WHOLE - discount_bp)
    return convert(amount_fen, discount_bp)


def _check_refund_history(
    original: Conversion,
    refunded_fen_before: int,
    points_returned_before: int,
    fen_clawed_before: int,
) -> None:
    _check_int("refunded_fen_before", refunded_fen_before, 0, original.amount_fen)
    _check_int("points_returned_before", points_returned_before, 0, original.points)
    _check_int("fen_clawed_before", fen_clawed_before, 0, original.settled_fen)


def refund_share(
    original: Conversion,
    refund_fen: int,
    refunded_fen_before: int,
    points_returned_before: int,
    fen_clawed_before: int,
) -> tuple[int, int]:
    """The points returned and fen clawed back for a refund of R fen of an original (A, D, P).

    floor(P x R / A) and floor(D x R / A); the refund that brings the refunded total to A
    returns whatever is left of P and D, so the shares of any split add up to P and D exactly.
    A refund of more than is left is a ValueError.
    """
    _check_int("refund_fen", refund_fen, 1)
    _check_refund_history(original, refunded_fen_before, points_returned_before, fen_clawed_before)
    left_fen = original.amount_fen - refunded_fen_before
    if refund_fen > left_fen:
        raise ValueError(f"refund_fen {refund_fen} is more than the {left_fen} fen left")
    if refund_fen == left_fen:
        return (
            original.points - points_returned_before,
            original.settled_fen - fen_clawed_before,
        )
    return (
        original.points * refund_fen // original.amount_fen,
        original.settled_fen * refund_fen // original.amount_fen,
    )

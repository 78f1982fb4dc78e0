"""The money of one settlement entry and of a month, in integer fen (points-and-clearing.md §5).

Each rule that rounds or signs an amount has one function here, so the settlement file, the
statements, `verify` and the reconciliation pack apply the same rule and never drift by a fen:
the merchant fee rounds half up on the unsigned settled amount and then takes the entry's
sign (a refund gives the fee back); the rounding gain is 2P - |D| with the entry's sign; the
month's average fee is compared with 1% by cross-multiplying, never by dividing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clearing.layout import Detail
from gateway.points import BP_WHOLE, POINT_VALUE_FEN

# The month's average fee above this many basis points is a reconciliation exception.
AVERAGE_FEE_LIMIT_BP = 100
REDEMPTION = "22"
REFUND = "25"
VOID = "23"
REVERSAL = "04"


def merchant_fee_fen(settled_fen: int, fee_bp: int) -> int:
    """round_half_up(|D| x fee_bp / 10000), with the sign of D."""
    if type(settled_fen) is not int or type(fee_bp) is not int:
        raise TypeError("fees are computed on integers only")
    if not 0 <= fee_bp <= BP_WHOLE:
        raise ValueError(f"fee_bp {fee_bp} is outside 0-{BP_WHOLE}")
    unsigned = (abs(settled_fen) * fee_bp + BP_WHOLE // 2) // BP_WHOLE
    return -unsigned if settled_fen < 0 else unsigned


def entry_sign(entry_type: str, settled_fen: int) -> int:
    """The sign of an entry: + for a redemption, - for a refund or a void, and for a
    reversal the sign of its settled amount (never 0: no redemption settles 0 fen). A
    refund that claws back 0 fen is still a refund, so the type decides, not the amount."""
    if entry_type == REDEMPTION:
        return 1
    if entry_type in (REFUND, VOID):
        return -1
    return -1 if settled_fen < 0 else 1


def rounding_gain_fen(sign: int, points: int, settled_fen: int) -> int:
    """(2P - |D|) with the entry's sign: what the points are worth above the money."""
    return sign * (POINT_VALUE_FEN * points - abs(settled_fen))


def average_fee_above(
    fees_fen: int, settled_fen: int, limit_bp: int = AVERAGE_FEE_LIMIT_BP
) -> bool:
    """Whether fees / settled is above limit_bp / 10000, in integers.

    A month of net refunds has both sums negative, and their ratio is the rate as in any
    other month: fees given back at more than the limit are above it. A positive fee with
    nothing settled, or with less than nothing, is above it too: the ratio is not defined, or
    negative, yet the network kept fees on money that went back (docs/clearing.md).
    """
    if settled_fen < 0:  # dividing by a negative sum turns the inequality round
        return fees_fen > 0 or fees_fen * BP_WHOLE < settled_fen * limit_bp
    if settled_fen == 0:
        return fees_fen > 0
    return fees_fen * BP_WHOLE > settled_fen * limit_bp


@dataclass
class Totals:
    """Running totals of signed entries: what a merchant record, the trailer and the
    statements carry. Counts and settled amounts are kept per entry type."""

    counts: dict[str, int] = field(default_factory=dict)
    settled_by_type: dict[str, int] = field(default_factory=dict)
    fees_fen: int = 0
    points_given: int = 0
    points_returned: int = 0
    rounding_gain_fen: int = 0

    def count_of(self, *entry_types: str) -> int:
        return sum(self.counts.get(entry_type, 0) for entry_type in entry_types)

    def settled_of(self, *entry_types: str) -> int:
        return sum(self.settled_by_type.get(entry_type, 0) for entry_type in entry_types)

    @property
    def redemption_count(self) -> int:
        return self.count_of(REDEMPTION)

    @property
    def redemptions_fen(self) -> int:
        return self.settled_of(REDEMPTION)

    @property
    def other_count(self) -> int:
        return self.count - self.redemption_count

    @property
    def others_fen(self) -> int:
        return self.settled_fen - self.redemptions_fen

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    @property
    def settled_fen(self) -> int:
        return sum(self.settled_by_type.values())

    @property
    def net_fen(self) -> int:
        return self.settled_fen - self.fees_fen

    def add(self, entry_type: str, sign: int, settled_fen: int, points: int, fee_fen: int) -> None:
        """Add one entry: its signed settled amount and fee, and its points on the side its
        sign says (given up for +, returned for -)."""
        self.counts[entry_type] = self.counts.get(entry_type, 0) + 1
        self.settled_by_type[entry_type] = self.settled_by_type.get(entry_type, 0) + settled_fen
        self.fees_fen += fee_fen
        if sign > 0:
            self.points_given += points
        else:
            self.points_returned += points
        self.rounding_gain_fen += rounding_gain_fen(sign, points, settled_fen)

    def add_detail(self, detail: Detail) -> None:
        sign = entry_sign(detail.entry_type, detail.settled_fen)
        self.add(detail.entry_type, sign, detail.settled_fen, detail.points, detail.fee_fen)

    def merge(self, other: Totals) -> None:
        for entry_type, count in other.counts.items():
            self.counts[entry_type] = self.counts.get(entry_type, 0) + count
        for entry_type, fen in other.settled_by_type.items():
            self.settled_by_type[entry_type] = self.settled_by_type.get(entry_type, 0) + fen
        self.fees_fen += other.fees_fen
        self.points_given += other.points_given
        self.points_returned += other.points_returned
        self.rounding_gain_fen += other.rounding_gain_fen

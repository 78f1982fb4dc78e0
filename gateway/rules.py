"""A merchant's discount rules and the choice of the one that applies (points-and-clearing.md §1).

The discount decides how many points a swipe costs, so the choice must be the same wherever it
is made: pure, with days and hours read on the local clock and validity dates on the business
date, largest discount first and ties broken by rule id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time

TIERS = ("diamond", "gold", "silver", "vip", "standard")
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_DISCOUNT_BP = 9999
# The end of a window that runs to midnight, written "24:00" in a config ("18:00-24:00").
END_OF_DAY = time.max


@dataclass(frozen=True)
class Rule:
    """One discount rule; a condition that is None (or 0 for the amount) always holds.

    `days` uses 0 for Monday; `hours` is (start included, end excluded), never across
    midnight; an end of `END_OF_DAY` runs to midnight.
    """

    id: str
    discount_bp: int
    tiers: frozenset[str] | None
    days: frozenset[int] | None
    hours: tuple[time, time] | None
    valid_from: date | None
    valid_to: date | None
    min_amount_fen: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.discount_bp <= MAX_DISCOUNT_BP:
            raise ValueError(f"rule {self.id}: discount_bp outside 0-{MAX_DISCOUNT_BP}")
        if self.days is not None and not self.days <= frozenset(range(7)):
            raise ValueError(f"rule {self.id}: days must be 0 (Monday) to 6 (Sunday)")
        if self.hours is not None and not self.hours[0] < self.hours[1]:
            raise ValueError(f"rule {self.id}: hours must start before they end")
        if self.valid_from and self.valid_to and self.valid_from > self.valid_to:
            raise ValueError(f"rule {self.id}: valid_from is after valid_to")
        if self.min_amount_fen < 0:
            raise ValueError(f"rule {self.id}: min_amount_fen is negative")

    def applies(self, *, tier: str, local: datetime, business_date: date, amount_fen: int) -> bool:
        """Whether every condition of the rule holds for a swipe."""
        wall = local.time().replace(tzinfo=None)
        return (
            (self.tiers is None or tier in self.tiers)
            and (self.days is None or local.weekday() in self.days)
            and (self.hours is None or _within(wall, *self.hours))
            and (self.valid_from is None or self.valid_from <= business_date)
            and (self.valid_to is None or business_date <= self.valid_to)
            and amount_fen >= self.min_amount_fen
        )


def choose_rule(
    rules: Iterable[Rule], *, tier: str, local: datetime, business_date: date, amount_fen: int
) -> Rule | None:
    """Of the rules that apply, the largest discount; on a tie the first id; none: None."""
    applying = [
        rule
        for rule in rules
        if rule.applies(tier=tier, local=local, business_date=business_date, amount_fen=amount_fen)
    ]
    if not applying:
        return None
    return min(applying, key=lambda rule: (-rule.discount_bp, rule.id))


def _within(wall: time, start: time, end: time) -> bool:
    """Start included, end excluded; an end of `END_OF_DAY` ("24:00") takes in the day's
    last minute as well."""
    return start <= wall and (wall < end or end == END_OF_DAY)

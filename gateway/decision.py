"""The authorisation decision as pure functions: snapshots and the clock in, a decline or an
approval out, in the precedence order of pos-8583.md §6.

Nothing here reads the database, the network or the clock: the handler gathers a card
snapshot, the merchant's config, the spendable points and today's redeemed points, and these
functions say what the answer is and what must change (a PIN try counted or reset).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime

from cardcodec.cards import card_number_problem
from gateway.clock import card_expired
from gateway.config import MerchantConfig, PlanSettings
from gateway.points import Conversion, convert, partial_conversion
from gateway.responses import Decline
from gateway.rules import Rule, choose_rule


@dataclass(frozen=True, init=False)
class CardSnapshot:
    """What a decision needs to know of a card, read inside the request's transaction."""

    number: str
    expiry_yymm: str
    tier: str
    status: str
    enrolled: bool
    pin_hmac: bytes | None
    wrong_pin_count: int
    pin_locked: bool

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(  # noqa: PLR0917 (the fields, in order, as the dataclass's own)
        self,
        number: str,
        expiry_yymm: str,
        tier: str,
        status: str,
        enrolled: bool,
        pin_hmac: bytes | None,
        wrong_pin_count: int,
        pin_locked: bool,
    ) -> None:
        object.__setattr__(self, "number", number)
        object.__setattr__(self, "expiry_yymm", expiry_yymm)
        object.__setattr__(self, "tier", tier)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "enrolled", enrolled)
        object.__setattr__(self, "pin_hmac", pin_hmac)
        object.__setattr__(self, "wrong_pin_count", wrong_pin_count)
        object.__setattr__(self, "pin_locked", pin_locked)

    def __repr__(self) -> str:
        return f"CardSnapshot(status={self.status!r}, tier={self.tier!r}, ...)"

    @property
    def needs_pin(self) -> bool:
        return self.pin_hmac is not None


class PinEntry(enum.Enum):
    """What the terminal sent for a PIN."""

    NONE = "none"
    INVALID_BLOCK = "invalid block"  # did not decrypt to a valid format 0 block: `99`
    ENTERED = "entered"


class PinEffect(enum.Enum):
    """What a decision does to the card's run of wrong PINs."""

    NONE = "none"
    WRONG = "wrong"  # one more wrong try; the third locks
    RIGHT = "right"  # the run is reset


_STATUS_DECLINES = {
    "closed": Decline.CARD_UNKNOWN,
    "lost": Decline.CARD_LOST,
    "stolen": Decline.CARD_STOLEN,
    "blocked": Decline.CARD_BLOCKED,
}


def card_decline(
    card: CardSnapshot | None,
    *,
    presented_number: str,
    presented_expiry: str,
    prefixes: tuple[str, ...],
    local: datetime,
    needs_enrolment: bool,
) -> Decline | None:
    """`14`, `41`, `43`, `62`, `54`, `57` for the card a terminal presented, in that order."""
    if card is None or card_number_problem(presented_number, prefixes) is not None:
        return Decline.CARD_UNKNOWN
    if presented_expiry != card.expiry_yymm:
        return Decline.CARD_UNKNOWN  # a track or field 14 that disagrees with the record
    status = _STATUS_DECLINES.get(card.status)
    if status is not None:
        return status
    if card_expired(card.expiry_yymm, local):
        return Decline.CARD_EXPIRED
    if needs_enrolment and not card.enrolled:
        return Decline.NOT_ENROLLED
    return None


def keyed_entry_decline(keyed: bool, pin: PinEntry, card: CardSnapshot | None) -> Decline | None:
    """Keyed entry is for cards with a PIN, with that PIN; otherwise `12` (§4.4, §8). A
    number the ledger has no card for is no card with a PIN: `12`, which §6 ranks before
    `14` (and which tells a prober keying numbers no more than it tells of a real card
    without a PIN)."""
    if not keyed:
        return None
    if pin is PinEntry.NONE or card is None or not card.needs_pin:
        return Decline.NOT_SUPPORTED
    return None


def pin_decision(
    card: CardSnapshot, pin: PinEntry, entered_matches: Callable[[], bool]
) -> tuple[Decline | None, PinEffect]:
    """`99`, `75`, `55` for a card that needs a PIN (§5.3); a card without one ignores a
    valid block, and answers one that is not `A0` (`Decline.PIN_BLOCK_UNSOUND`): a terminal
    makes a valid block under its PIK whatever the card, so one that is not was not made by
    the terminal, and the MAC, an XOR of the message's blocks (§5.1), does not tell.

    `entered_matches` is asked only when a valid PIN block was sent for an unlocked card.
    """
    if not card.needs_pin:
        unsound = pin is PinEntry.INVALID_BLOCK
        return (Decline.PIN_BLOCK_UNSOUND if unsound else None), PinEffect.NONE
    if pin is PinEntry.NONE:
        return Decline.NO_PIN, PinEffect.NONE
    if pin is PinEntry.INVALID_BLOCK:
        return Decline.PIN_BLOCK, PinEffect.NONE
    if card.pin_locked:
        return Decline.PIN_LOCKED, PinEffect.NONE
    if not entered_matches():
        return Decline.WRONG_PIN, PinEffect.WRONG
    return None, PinEffect.RIGHT


@dataclass(frozen=True, init=False)
class Priced:
    """A requested amount priced under the merchant's rules: the full conversion and the rule."""

    conversion: Conversion
    rule: Rule | None

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(self, conversion: Conversion, rule: Rule | None) -> None:
        object.__setattr__(self, "conversion", conversion)
        object.__setattr__(self, "rule", rule)


def price(
    merchant: MerchantConfig, *, tier: str, local: datetime, business_date: date, amount_fen: int
) -> Priced:
    """The discount that applies (largest, ties by rule id) and the conversion of A."""
    rule = choose_rule(
        merchant.rules, tier=tier, local=local, business_date=business_date, amount_fen=amount_fen
    )
    return Priced(convert(amount_fen, rule.discount_bp if rule else 0), rule)


@dataclass(frozen=True, init=False)
class Approval:
    """An approved redemption: what is taken (A or A'), and `partial` for a `10`."""

    conversion: Conversion
    rule: Rule | None
    partial: bool

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(self, conversion: Conversion, rule: Rule | None, partial: bool) -> None:
        object.__setattr__(self, "conversion", conversion)
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "partial", partial)


def amount_decline(amount_fen: int, priced: Priced | None) -> Decline | None:
    """`13`: a zero amount, or one whose settled amount rounds to 0 fen."""
    if amount_fen <= 0 or (priced is not None and priced.conversion.settled_fen <= 0):
        return Decline.BAD_AMOUNT
    return None


def redemption_decision(
    priced: Priced,
    *,
    merchant: MerchantConfig,
    plan: PlanSettings,
    spendable_points: int,
    redeemed_today_points: int,
    partial_supported: bool,
) -> Approval | Decline:
    """`61` for a limit, then `51`, `10` or an approval (§1, §4.4 of the protocol)."""
    conversion = priced.conversion
    if conversion.amount_fen > merchant.max_amount_fen:
        return Decline.OVER_LIMIT
    day_limit = plan.max_points_per_card_day
    if day_limit and redeemed_today_points + conversion.points > day_limit:
        return Decline.OVER_LIMIT
    if conversion.points <= spendable_points:
        return Approval(conversion, priced.rule, partial=False)
    if partial_supported and merchant.allow_partial and spendable_points > 0:
        partial = partial_conversion(spendable_points, conversion.discount_bp)
        if partial.settled_fen > 0:
            return Approval(partial, priced.rule, partial=True)
    return Decline.NOT_ENOUGH_POINTS


def refund_window_decline(original: date, refund: date, window_days: int) -> Decline | None:
    """`22` past the merchant's refund window, counted in calendar days of business dates."""
    if (refund - original).days > window_days:
        return Decline.NOT_ALLOWED
    return None

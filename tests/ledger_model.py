"""An in-memory model of the points ledger, for the state machine to check the real one against.

The model is deliberately naive: lists and dicts, no journal, no database. It keeps only what
points-and-clearing.md §3 says a card's lots must look like after each operation, so that any
disagreement with the real ledger points at one of them being wrong. It shares the calendar
rules (`gateway.clock`) and the refund share (`gateway.points`) with the gateway, because those
have their own tests; the spending, restoring and expiring are its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime

from gateway.clock import SHANGHAI, current_year_expires_on, lot_expired, lot_expires_on
from gateway.points import Conversion, refund_share

EXPIRY_YEARS = 1


@dataclass
class Lot:
    index: int  # creation order, the same order as the real ledger's lot ids
    card: str
    earned_on: date
    expires_on: date
    original: int
    remaining: int
    booked: int = 0  # points the expiry job took from it

    def spending_key(self) -> tuple[date, date, int]:
        return (self.expires_on, self.earned_on, self.index)


class State(enum.Enum):
    APPROVED = "approved"
    VOIDED = "voided"
    REVERSED = "reversed"


@dataclass
class Redemption:
    card: str
    conversion: Conversion
    state: State = State.APPROVED
    refunded_fen: int = 0
    points_returned: int = 0
    fen_clawed: int = 0
    held: dict[int, int] = field(default_factory=dict)  # origin lot index -> points


@dataclass
class Void:
    redemption: Redemption
    state: State = State.APPROVED
    credited: dict[int, int] = field(default_factory=dict)  # lot index -> points put in
    booked_before: dict[int, int] = field(default_factory=dict)  # those lots' bookings then


@dataclass
class LedgerModel:
    lots: list[Lot] = field(default_factory=list)
    refs: set[str] = field(default_factory=set)

    # --- queries --------------------------------------------------------------------------

    def lots_of(self, card: str) -> list[tuple[date, int, int]]:
        """(expires_on, original, remaining) in spending order, as the real ledger lists them."""
        mine = sorted((lot for lot in self.lots if lot.card == card), key=Lot.spending_key)
        return [(lot.expires_on, lot.original, lot.remaining) for lot in mine]

    def ledger_points(self, card: str) -> int:
        return sum(lot.remaining for lot in self.lots if lot.card == card)

    def spendable_points(self, card: str, now: datetime) -> int:
        return sum(lot.remaining for lot in self._spendable(card, now))

    def _spendable(self, card: str, now: datetime) -> list[Lot]:
        local = now.astimezone(SHANGHAI)
        mine = [
            lot
            for lot in self.lots
            if lot.card == card and lot.remaining > 0 and not lot_expired(lot.expires_on, local)
        ]
        return sorted(mine, key=Lot.spending_key)

    # --- changes --------------------------------------------------------------------------

    def accrue(self, card: str, earned_on: date, points: int, ref: str) -> bool:
        """False when the ref was applied before."""
        if ref in self.refs:
            return False
        self.refs.add(ref)
        expires_on = lot_expires_on(earned_on, EXPIRY_YEARS)
        self.lots.append(Lot(len(self.lots), card, earned_on, expires_on, points, points))
        return True

    def redeem(self, card: str, conversion: Conversion, now: datetime) -> Redemption | None:
        """None when the card's spendable points do not cover the conversion."""
        if self.spendable_points(card, now) < conversion.points:
            return None
        redemption = Redemption(card, conversion)
        self._take(redemption, conversion.points, now)
        return redemption

    def _take(self, redemption: Redemption, points: int, now: datetime) -> None:
        left = points
        for lot in self._spendable(redemption.card, now):
            amount = min(lot.remaining, left)
            lot.remaining -= amount
            redemption.held[lot.index] = redemption.held.get(lot.index, 0) + amount
            left -= amount
            if left == 0:
                return
        raise AssertionError("model took more than was spendable")

    def void(self, redemption: Redemption, now: datetime) -> Void | None:
        if not self._undoable(redemption):
            return None
        credited = self._give_back(redemption, dict(redemption.held), now)
        redemption.state = State.VOIDED
        booked = {index: self.lots[index].booked for index in credited}
        return Void(redemption, credited=credited, booked_before=booked)

    def reverse_redemption(self, redemption: Redemption, now: datetime) -> bool:
        if not self._undoable(redemption):
            return False
        self._give_back(redemption, dict(redemption.held), now)
        redemption.state = State.REVERSED
        return True

    def reverse_void(self, void: Void, now: datetime) -> str:
        """'undone', 'stands' (the card no longer holds the points) or 'nothing'."""
        if void.state is not State.APPROVED:
            return "nothing"
        redemption = void.redemption
        points = redemption.conversion.points
        # First from the lots the void put them in, as much as each still holds (expired or
        # not), then what was spent from them since from the spendable lots; points of them
        # the expiry job booked are no longer the card's: the void stands.
        own = {i: min(p, self.lots[i].remaining) for i, p in void.credited.items()}
        for index, put_in in void.credited.items():
            booked = self.lots[index].booked - void.booked_before[index]
            if min(put_in - own[index], booked) > 0:
                return "stands"
        spendable = sum(
            lot.remaining - own.get(lot.index, 0) for lot in self._spendable(redemption.card, now)
        )
        if sum(own.values()) + spendable < points:
            return "stands"
        for index, share in own.items():
            self.lots[index].remaining -= share
            if share:
                redemption.held[index] = redemption.held.get(index, 0) + share
        if points - sum(own.values()):
            self._take(redemption, points - sum(own.values()), now)
        redemption.state = State.APPROVED
        void.state = State.REVERSED
        return "undone"

    def refund(
        self, redemption: Redemption, refund_fen: int, now: datetime
    ) -> tuple[int, int] | None:
        """(points, fen) returned, or None when the refund is not allowed."""
        left = redemption.conversion.amount_fen - redemption.refunded_fen
        if redemption.state is not State.APPROVED or not 0 < refund_fen <= left:
            return None
        points, fen = refund_share(
            redemption.conversion,
            refund_fen,
            redemption.refunded_fen,
            redemption.points_returned,
            redemption.fen_clawed,
        )
        redemption.refunded_fen += refund_fen
        redemption.points_returned += points
        redemption.fen_clawed += fen
        shares: dict[int, int] = {}
        remaining = points
        for index in sorted(
            redemption.held, key=lambda i: self.lots[i].spending_key(), reverse=True
        ):
            share = min(redemption.held[index], remaining)
            if share:
                shares[index] = share
                remaining -= share
        self._give_back(redemption, shares, now)
        return points, fen

    def expire(self, as_of: date) -> int:
        booked = 0
        for lot in self.lots:
            if lot.expires_on < as_of and lot.remaining > 0:
                booked += lot.remaining
                lot.booked += lot.remaining
                lot.remaining = 0
        return booked

    def _undoable(self, redemption: Redemption) -> bool:
        return redemption.state is State.APPROVED and redemption.refunded_fen == 0

    def _give_back(
        self, redemption: Redemption, shares: dict[int, int], now: datetime
    ) -> dict[int, int]:
        """Points back to their lots; those of expired lots into one new lot. Where they went:
        lot index -> points."""
        local = now.astimezone(SHANGHAI)
        into_new = 0
        credited: dict[int, int] = {}
        for index, points in sorted(shares.items()):
            redemption.held[index] -= points
            if redemption.held[index] == 0:
                del redemption.held[index]
            lot = self.lots[index]
            if lot_expired(lot.expires_on, local):
                into_new += points
            else:
                lot.remaining += points
                credited[index] = credited.get(index, 0) + points
        if into_new:
            today = local.date()
            expires_on = current_year_expires_on(today)
            new = Lot(len(self.lots), redemption.card, today, expires_on, into_new, into_new)
            self.lots.append(new)
            credited[new.index] = into_new
        return credited

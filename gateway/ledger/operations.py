"""The ledger operations: what may happen to a card's points, each as one database change.

Every function takes an open `Session` (from `db.unit_of_work`) and never commits, so a caller
can put an operation, the authorisation it answers and the request log entry into one commit,
or several requests into one group commit. Each operation locks the card it touches first
(`SELECT ... FOR UPDATE` on PostgreSQL; SQLite's unit of work holds the write lock) and only
then reads the card's lots, so two operations on one card never interleave.

Business outcomes (not enough points, an original that can no longer be voided, a refund over
what is left) are returned as values; exceptions mean bad input from a person (`BadInput`),
a caller's programming error (`ValueError`, `LookupError`) or books that disagree with
themselves (`LedgerError`), and the unit of work rolls back.

The points side follows points-and-clearing.md §3: spend earliest-expiring lots first (then
the oldest), never an expired lot; voids and reversals put back exactly what was taken, lot by
lot; refunds return the proportional share of `gateway.points.refund_share`, latest-expiring
lots first; points whose lot has expired meanwhile go into a new lot that expires at the end of
the current points year.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cardcodec.cards import mask_card_number
from gateway.clock import SHANGHAI, lot_expired, lot_expires_on
from gateway.errors import BadInput
from gateway.ledger.journal import (
    LedgerError,
    LotChange,
    Moment,
    Returned,
    card_transfer,
    give_back,
    held_by_redemption,
    lock_card,
    lock_lots,
    next_rrn,
    record_movement,
    spendable_lots,
    sum_of,
    system_account_id,
    take,
)
from gateway.ledger.models import (
    Account,
    AccountKind,
    Authorisation,
    AuthorisationKind,
    AuthorisationState,
    Card,
    CardStatus,
    JournalEntry,
    JournalTransaction,
    LotMovement,
    LotOrigin,
    PointLot,
    RequestClass,
    Terminal,
    TransactionKind,
)
from gateway.points import MAX_CARD_POINTS, Conversion, refund_share

APPROVED_CODES = ("00", "10")
PIN_TRIES_TO_LOCK = 3


class Decline(enum.Enum):
    """Why the ledger refused an operation; the caller maps it to a response code."""

    CARD_UNKNOWN = "card_unknown"
    NOT_ENOUGH_POINTS = "not_enough_points"
    NO_POINTS = "no_points"
    ORIGINAL_NOT_ALLOWED = "original_not_allowed"
    OVER_WHAT_IS_LEFT = "over_what_is_left"


@dataclass(frozen=True)
class Declined:
    reason: Decline


@dataclass(frozen=True)
class Swipe:
    """The request identity and time of a terminal's financial message, and the merchant it
    was decided for: the one the deciding gateway's config gives the terminal, whose rules
    and fee it applied. A request is recorded under that merchant even when another
    process's config has since moved the terminal in the ledger (a rolling restart onto a
    new config), so the money goes to the merchant the terminal named and the rules were
    the ones that merchant gave."""

    terminal_id: str
    batch_number: int
    trace: int
    when: Moment
    merchant_id: str

    def key(self, request_class: RequestClass) -> str:
        """The journal idempotency key: one per request identity (pos-8583.md §7)."""
        return (
            f"pos:{self.terminal_id}:{self.batch_number:06d}:{self.trace:06d}:{request_class.value}"
        )


@dataclass(frozen=True)
class Redeemed:
    authorisation_id: int
    rrn: str
    transaction_id: int
    lots: tuple[LotChange, ...]
    spendable_points_after: int


@dataclass(frozen=True)
class Restored:
    """A void or reversal of a redemption: every point it held is back."""

    authorisation_id: int
    rrn: str
    transaction_id: int
    points: int
    returned: Returned
    spendable_points_after: int


@dataclass(frozen=True)
class Refunded:
    authorisation_id: int
    rrn: str
    transaction_id: int | None
    points: int
    fen_clawed: int
    returned: Returned
    spendable_points_after: int


class ReversalEffect(enum.Enum):
    """What a reversal did to its original (pos-8583.md §4.6)."""

    REDEMPTION_UNDONE = "redemption_undone"
    VOID_UNDONE = "void_undone"
    VOID_STANDS = "void_stands"  # the card no longer holds the points: an exception
    NOTHING_TO_UNDO = "nothing_to_undo"  # declined, already voided, reversed or refunded


@dataclass(frozen=True)
class Reversed:
    authorisation_id: int
    rrn: str
    effect: ReversalEffect
    transaction_id: int | None
    points: int
    lots: tuple[LotChange, ...]
    returned: Returned | None
    spendable_points_after: int


@dataclass(frozen=True)
class Accrued:
    lot_id: int
    transaction_id: int
    expires_on: date


@dataclass(frozen=True)
class AccrualSkipped:
    """The source_ref was applied before (by this or an earlier feed); nothing changed."""

    source_ref: str


@dataclass(frozen=True)
class ExpiryRun:
    lots: int
    points: int
    cards: int


@dataclass(frozen=True)
class Balances:
    ledger_points: int
    spendable_points: int


class Enrolment(enum.Enum):
    ENROLLED = "enrolled"
    ALREADY_ENROLLED = "already_enrolled"
    NOT_ENOUGH_POINTS = "not_enough_points"


@dataclass(frozen=True)
class PinState:
    wrong_pin_count: int
    locked: bool


# --- balances -----------------------------------------------------------------------------


def balances(session: Session, card_number: str, at: datetime) -> Balances:
    """Ledger balance (every lot's remaining points, expired-not-yet-booked included) and
    spendable balance (unexpired lots only) at an instant."""
    local = at.astimezone(SHANGHAI)
    query = select(PointLot.expires_on, PointLot.remaining_points).where(
        PointLot.card_number == card_number, PointLot.remaining_points > 0
    )
    ledger = spendable = 0
    for expires_on, remaining in session.execute(query):
        ledger += remaining
        if not lot_expired(expires_on, local):
            spendable += remaining
    return Balances(ledger, spendable)


def spendable_points(session: Session, card_number: str, at: datetime) -> int:
    """The points a card can spend at an instant (what `51`, partial approval and 54/63 use)."""
    return balances(session, card_number, at).spendable_points


def points_redeemed_on(session: Session, card_number: str, business_date: date) -> int:
    """Points of a card's approved redemptions of a business date, not voided or reversed
    (the plan's daily limit counts these)."""
    query = select(sum_of(Authorisation.points)).where(
        Authorisation.card_number == card_number,
        Authorisation.kind == AuthorisationKind.REDEMPTION,
        Authorisation.state == AuthorisationState.APPROVED,
        Authorisation.business_date == business_date,
    )
    return int(session.scalar(query) or 0)


# --- redemption and what undoes it --------------------------------------------------------


def redeem(
    session: Session,
    swipe: Swipe,
    card_number: str,
    conversion: Conversion,
    *,
    requested_amount_fen: int,
    rule_id: str | None,
    fee_bp: int,
    auth_code: str,
    response_code: str = "00",
) -> Redeemed | Declined:
    """Take `conversion.points` from the card and record the approved redemption.

    `conversion` is what was approved: (A, d, D, P), or (A', d, D, P) after a partial
    approval (`response_code` "10"). Journal: card -> redemption.
    """
    if response_code not in APPROVED_CODES:
        raise ValueError("a redemption is recorded by redeem() only when approved")
    card = lock_card(session, card_number)
    if card is None:
        return Declined(Decline.CARD_UNKNOWN)
    if conversion.points <= 0:
        return Declined(Decline.NO_POINTS)
    lots = spendable_lots(session, card_number, swipe.when.local)
    available = sum(lot.remaining_points for lot in lots)
    if available < conversion.points:
        return Declined(Decline.NOT_ENOUGH_POINTS)
    authorisation = _new_authorisation(
        session, swipe, AuthorisationKind.REDEMPTION, card_number, response_code
    )
    authorisation.auth_code = auth_code
    authorisation.requested_amount_fen = requested_amount_fen
    _copy_conversion(authorisation, conversion)
    authorisation.rule_id = rule_id
    authorisation.fee_bp = fee_bp
    session.flush()
    transaction = card_transfer(
        session,
        key=swipe.key(RequestClass.REQUEST),
        kind=TransactionKind.REDEMPTION,
        when=swipe.when,
        card_number=card_number,
        system=AccountKind.REDEMPTION,
        points_to_card=-conversion.points,
    )
    authorisation.journal_transaction_id = transaction.id
    taken = take(session, lots, conversion.points, transaction.id, authorisation.id)
    return Redeemed(
        authorisation.id,
        authorisation.rrn,
        transaction.id,
        taken,
        available - conversion.points,
    )


def void(
    session: Session, swipe: Swipe, original_id: int, *, auth_code: str
) -> Restored | Declined:
    """Void an approved redemption whole: every point back, lot by lot. Journal: redemption ->
    card. The protocol's own checks (same terminal, open batch, amount) are the caller's."""
    original = _lock_authorisation(session, original_id)
    if not _undoable(original):
        return Declined(Decline.ORIGINAL_NOT_ALLOWED)
    authorisation = _new_authorisation(
        session, swipe, AuthorisationKind.VOID, original.card_number, "00", original=original
    )
    authorisation.auth_code = auth_code
    restored = _restore_redemption(
        session,
        swipe,
        request_class=RequestClass.REQUEST,
        kind=TransactionKind.VOID,
        original=original,
        authorisation=authorisation,
    )
    original.state = AuthorisationState.VOIDED
    return restored


def reverse(session: Session, swipe: Swipe, original_id: int) -> Reversed:
    """Undo a redemption or a void that the terminal got no valid answer for (pos-8583 §4.6).

    A redemption: its points come back as a void's would. A void: its points are taken again
    if the card still holds them, first from the lots the void put them in (`_reverse_void`),
    else the void stands (`VOID_STANDS`, a reconciliation exception). Anything else changes
    nothing. The reversal is recorded (answered `00`) in every case; `swipe` is the
    reversal's own identity (the original's terminal, batch and trace, reversal class).
    """
    original = _lock_authorisation(session, original_id)
    authorisation = _new_authorisation(
        session, swipe, AuthorisationKind.REVERSAL, original.card_number, "00", original=original
    )
    if original.kind is AuthorisationKind.REDEMPTION and _undoable(original):
        restored = _restore_redemption(
            session,
            swipe,
            request_class=RequestClass.REVERSAL,
            kind=TransactionKind.REVERSAL,
            original=original,
            authorisation=authorisation,
        )
        original.state = AuthorisationState.REVERSED
        return Reversed(
            authorisation.id,
            authorisation.rrn,
            ReversalEffect.REDEMPTION_UNDONE,
            restored.transaction_id,
            restored.points,
            (),
            restored.returned,
            restored.spendable_points_after,
        )
    if original.kind is AuthorisationKind.VOID and original.state is AuthorisationState.APPROVED:
        return _reverse_void(session, swipe, original, authorisation)
    return _reversal_without_effect(session, authorisation, ReversalEffect.NOTHING_TO_UNDO, swipe)


def refund(
    session: Session, swipe: Swipe, original_id: int, refund_fen: int, *, auth_code: str
) -> Refunded | Declined:
    """Refund R fen of an approved redemption (A, D, P): floor(P x R / A) points back and
    floor(D x R / A) fen clawed back, the refund that reaches A taking what is left; the
    points go back to the lots they came from, latest-expiring first. Journal: redemption ->
    card. The refund window and the merchant check are the caller's."""
    original = _lock_authorisation(session, original_id)
    if original.kind is not AuthorisationKind.REDEMPTION or original.state is not (
        AuthorisationState.APPROVED
    ):
        return Declined(Decline.ORIGINAL_NOT_ALLOWED)
    if not 0 < refund_fen <= original.amount_fen - original.refunded_fen:
        return Declined(Decline.OVER_WHAT_IS_LEFT)
    points, fen = refund_share(
        _conversion_of(original),
        refund_fen,
        original.refunded_fen,
        original.points_returned,
        original.fen_clawed,
    )
    card_number = _card_of(original)
    authorisation = _new_authorisation(
        session, swipe, AuthorisationKind.REFUND, card_number, "00", original=original
    )
    authorisation.auth_code = auth_code
    authorisation.requested_amount_fen = refund_fen
    authorisation.amount_fen = refund_fen
    authorisation.settled_fen = fen
    authorisation.points = points
    original.refunded_fen += refund_fen
    original.points_returned += points
    original.fen_clawed += fen
    transaction_id, returned = _return_refund_points(session, swipe, original, points)
    authorisation.journal_transaction_id = transaction_id
    return Refunded(
        authorisation.id,
        authorisation.rrn,
        transaction_id,
        points,
        fen,
        returned,
        spendable_points(session, card_number, swipe.when.at),
    )


def _return_refund_points(
    session: Session, swipe: Swipe, original: Authorisation, points: int
) -> tuple[int | None, Returned]:
    """Post and place a refund's points; a refund worth no points posts nothing."""
    if points == 0:
        return None, Returned((), None)
    card_number = _card_of(original)
    transaction = card_transfer(
        session,
        key=swipe.key(RequestClass.REQUEST),
        kind=TransactionKind.REFUND,
        when=swipe.when,
        card_number=card_number,
        system=AccountKind.REDEMPTION,
        points_to_card=points,
    )
    returned = give_back(
        session,
        transaction=transaction,
        card_number=card_number,
        shares=_latest_expiring_first(session, original, points),
        redemption_id=original.id,
        when=swipe.when,
    )
    return transaction.id, returned


def _restore_redemption(
    session: Session,
    swipe: Swipe,
    *,
    request_class: RequestClass,
    kind: TransactionKind,
    original: Authorisation,
    authorisation: Authorisation,
) -> Restored:
    card_number = _card_of(original)
    held = held_by_redemption(session, original.id)
    points = sum(held.values())
    if points != original.points - original.points_returned:
        raise LedgerError(f"redemption {original.id} holds {points} points, not its own")
    lots = {lot.id: lot for lot in lock_lots(session, card_number, held)}
    shares = [(lots[lot_id], held[lot_id]) for lot_id in sorted(held)]
    transaction = card_transfer(
        session,
        key=swipe.key(request_class),
        kind=kind,
        when=swipe.when,
        card_number=card_number,
        system=AccountKind.REDEMPTION,
        points_to_card=points,
    )
    authorisation.journal_transaction_id = transaction.id
    returned = give_back(
        session,
        transaction=transaction,
        card_number=card_number,
        shares=shares,
        redemption_id=original.id,
        when=swipe.when,
    )
    return Restored(
        authorisation.id,
        authorisation.rrn,
        transaction.id,
        points,
        returned,
        spendable_points(session, card_number, swipe.when.at),
    )


def _reverse_void(
    session: Session, swipe: Swipe, void_: Authorisation, authorisation: Authorisation
) -> Reversed:
    """Take a void's points again if the card still holds them (pos-8583 §4.6), undoing the
    void lot by lot (points-and-clearing §3): first from the lots the void put them in, as
    much as each still holds, an expired lot the expiry job has not booked included (the
    card's ledger balance holds it); then what was spent from those lots since, in spending
    order. Points of them the expiry job has booked since are no longer the card's, nor are
    those spent if its spendable lots fall short: the void stands. Taken from spending order
    alone, a void whose lot expired at midnight before its reversal left the void's points
    to expire and took as many again from the card's later lots."""
    card_number = _card_of(void_)
    redemption = _lock_authorisation(session, _original_of(void_))
    own, booked = _still_held(session, card_number, void_)
    from_own = sum(share for _, share in own)
    lots = spendable_lots(session, card_number, swipe.when.local)
    in_own = {lot.id: share for lot, share in own}
    available = sum(lot.remaining_points - in_own.get(lot.id, 0) for lot in lots)
    if booked or from_own + available < void_.points:
        authorisation.exception = ReversalEffect.VOID_STANDS.value
        return _reversal_without_effect(session, authorisation, ReversalEffect.VOID_STANDS, swipe)
    transaction = card_transfer(
        session,
        key=swipe.key(RequestClass.REVERSAL),
        kind=TransactionKind.VOID_REVERSAL,
        when=swipe.when,
        card_number=card_number,
        system=AccountKind.REDEMPTION,
        points_to_card=-void_.points,
    )
    authorisation.journal_transaction_id = transaction.id
    taken: tuple[LotChange, ...] = ()
    for lot, share in own:
        taken += take(session, [lot], share, transaction.id, redemption.id)
    taken += take(session, lots, void_.points - from_own, transaction.id, redemption.id)
    void_.state = AuthorisationState.REVERSED
    redemption.state = AuthorisationState.APPROVED
    return Reversed(
        authorisation.id,
        authorisation.rrn,
        ReversalEffect.VOID_UNDONE,
        transaction.id,
        void_.points,
        taken,
        None,
        sum(lot.remaining_points for lot in lots),
    )


def _still_held(
    session: Session, card_number: str, void_: Authorisation
) -> tuple[list[tuple[PointLot, int]], int]:
    """The lots a void put points in, locked, each with as many of those points as it still
    holds, in spending order; and how many of them the expiry job has booked since (of a
    lot's points no longer there, as many as it booked from the lot after the void)."""
    query = (
        select(LotMovement.lot_id, sum_of(LotMovement.points))
        .where(
            LotMovement.transaction_id == void_.journal_transaction_id,
            LotMovement.points > 0,
        )
        .group_by(LotMovement.lot_id)
    )
    credited = {lot_id: int(points) for lot_id, points in session.execute(query)}
    expired = (
        select(LotMovement.lot_id, sum_of(LotMovement.points))
        .join(JournalTransaction, JournalTransaction.id == LotMovement.transaction_id)
        .where(
            LotMovement.lot_id.in_(list(credited)),
            LotMovement.transaction_id > void_.journal_transaction_id,
            JournalTransaction.kind == TransactionKind.EXPIRY,
        )
        .group_by(LotMovement.lot_id)
    )
    booked_since = {lot_id: -int(points) for lot_id, points in session.execute(expired)}
    shares = []
    booked = 0
    for lot in lock_lots(session, card_number, credited):
        held = min(credited[lot.id], lot.remaining_points)
        booked += min(credited[lot.id] - held, booked_since.get(lot.id, 0))
        if held > 0:
            shares.append((lot, held))
    return shares, booked


def _reversal_without_effect(
    session: Session, authorisation: Authorisation, effect: ReversalEffect, swipe: Swipe
) -> Reversed:
    authorisation.points = 0
    card = authorisation.card_number
    spendable = spendable_points(session, card, swipe.when.at) if card else 0
    return Reversed(authorisation.id, authorisation.rrn, effect, None, 0, (), None, spendable)


def _latest_expiring_first(
    session: Session, original: Authorisation, points: int
) -> list[tuple[PointLot, int]]:
    held = held_by_redemption(session, original.id)
    lots = lock_lots(session, _card_of(original), held)
    shares = []
    left = points
    for lot in sorted(lots, key=lambda lot: (lot.expires_on, lot.earned_on, lot.id), reverse=True):
        share = min(held[lot.id], left)
        if share:
            shares.append((lot, share))
            left -= share
    if left:
        raise LedgerError(f"redemption {original.id} holds fewer points than a refund returns")
    return shares


def _undoable(original: Authorisation) -> bool:
    """An approved redemption with nothing refunded: what a void or reversal can undo."""
    return (
        original.kind is AuthorisationKind.REDEMPTION
        and original.state is AuthorisationState.APPROVED
        and original.refunded_fen == 0
    )


def _lock_authorisation(session: Session, authorisation_id: int) -> Authorisation:
    """The authorisation, locked after its card: every operation locks a card before any
    authorisation of it, so two operations on one card cannot deadlock."""
    found = session.get(Authorisation, authorisation_id)
    if found is None:
        raise LookupError(f"no authorisation {authorisation_id}")
    if found.card_number is not None:
        lock_card(session, found.card_number)
    locked = session.get(
        Authorisation, authorisation_id, with_for_update=True, populate_existing=True
    )
    if locked is None:
        raise LookupError(f"no authorisation {authorisation_id}")
    return locked


def _card_of(authorisation: Authorisation) -> str:
    if authorisation.card_number is None:
        raise LedgerError(f"authorisation {authorisation.id} has no card")
    return authorisation.card_number


def _original_of(authorisation: Authorisation) -> int:
    if authorisation.original_id is None:
        raise LedgerError(f"authorisation {authorisation.id} has no original")
    return authorisation.original_id


def _conversion_of(authorisation: Authorisation) -> Conversion:
    return Conversion(
        authorisation.amount_fen,
        authorisation.discount_bp,
        authorisation.settled_fen,
        authorisation.points,
    )


def _copy_conversion(authorisation: Authorisation, conversion: Conversion) -> None:
    authorisation.amount_fen = conversion.amount_fen
    authorisation.discount_bp = conversion.discount_bp
    authorisation.settled_fen = conversion.settled_fen
    authorisation.points = conversion.points


def _new_authorisation(
    session: Session,
    swipe: Swipe,
    kind: AuthorisationKind,
    card_number: str | None,
    response_code: str,
    *,
    original: Authorisation | None = None,
) -> Authorisation:
    """An approved authorisation row with a new RRN; voids and reversals copy the original's
    figures (A, d, D, P and the fee in force) and its merchant, whose sale they take back."""
    terminal = session.get(Terminal, swipe.terminal_id)
    if terminal is None:
        raise LookupError(f"terminal {swipe.terminal_id} is not known")
    authorisation = Authorisation(
        rrn=next_rrn(session, swipe.when.at),
        kind=kind,
        terminal_id=terminal.id,
        merchant_id=swipe.merchant_id if original is None else original.merchant_id,
        batch_number=swipe.batch_number,
        trace=swipe.trace,
        card_number=card_number,
        response_code=response_code,
        local_time=swipe.when.at,
        business_date=swipe.when.business_date,
        state=AuthorisationState.APPROVED,
        refunded_fen=0,
        points_returned=0,
        fen_clawed=0,
        amount_fen=0,
        discount_bp=0,
        settled_fen=0,
        points=0,
        fee_bp=0,
    )
    if original is not None:
        authorisation.original_id = original.id
        authorisation.requested_amount_fen = original.amount_fen
        _copy_conversion(authorisation, _conversion_of(original))
        authorisation.rule_id = original.rule_id
        authorisation.fee_bp = original.fee_bp
    session.add(authorisation)
    session.flush()
    return authorisation


# --- accrual and expiry -------------------------------------------------------------------


def accrue(
    session: Session,
    card_number: str,
    earned_on: date,
    points: int,
    source_ref: str,
    *,
    when: Moment,
    expiry_years: int,
) -> Accrued | AccrualSkipped:
    """A new lot of `points` earned on `earned_on`, applied at most once per `source_ref`
    ever. Journal: accrual -> card. An unknown card or points not positive is `BadInput`;
    so is an accrual that would take the card past `MAX_CARD_POINTS`, counting what its
    approved redemptions may give back."""
    line = AccrualLine(card_number, earned_on, points, source_ref)
    return accrue_many(session, [line], when=when, expiry_years=expiry_years)[0]


@dataclass(frozen=True)
class AccrualLine:
    """One accrual of a batch (`accrue_many`)."""

    card_number: str
    earned_on: date
    points: int
    source_ref: str


def accrue_many(
    session: Session,
    lines: Sequence[AccrualLine],
    *,
    when: Moment,
    expiry_years: int,
) -> list[Accrued | AccrualSkipped]:
    """`accrue` for each line, in order, with what is the same for every line looked up
    once: the cards locked together (in card-number order, as every writer locks them),
    the source_refs applied before, each card's balance and what may come back to it, and
    the accounts; then the journal transactions, the lots and their movements each written
    in one flush. A feed's batch of 200 lines cost about 11 statements and 3 flushes a line
    (about 475 ms of CPU under the write lock, while a serving gateway waited). A line
    `accrue` would refuse is `BadInput` the same way, and nothing of the batch is written
    (the caller's unit of work is rolled back)."""
    for line in lines:
        if type(line.points) is not int or line.points <= 0:
            raise BadInput(f"accrual {line.source_ref}: points must be a positive integer")
        if not line.source_ref:
            raise BadInput("an accrual needs a source_ref")
    numbers = sorted({line.card_number for line in lines})
    locked = session.scalars(
        select(Card.number).where(Card.number.in_(numbers)).order_by(Card.number).with_for_update()
    )
    known = set(locked)
    for line in lines:
        if line.card_number not in known:
            raise BadInput(f"accrual {line.source_ref}: unknown card")
    applied = accruals_applied(session, {line.source_ref for line in lines})
    held = _points_held(session, numbers)
    coming = _points_to_come_back(session, numbers)
    totals = {number: held.get(number, 0) + coming.get(number, 0) for number in numbers}
    account_rows = session.execute(
        select(Account.card_number, Account.id).where(Account.card_number.in_(numbers))
    )
    accounts = {number: account for number, account in account_rows}  # a Result has keys()
    system = system_account_id(session, AccountKind.ACCRUAL)
    # Per line: the skip, or the index of the lot it makes (filled in once it has its ids).
    planned: list[AccrualSkipped | int] = []
    applying: list[tuple[AccrualLine, JournalTransaction]] = []
    for line in lines:
        if line.source_ref in applied:
            planned.append(AccrualSkipped(line.source_ref))
            continue
        applied.add(line.source_ref)  # a second line of the batch with the same ref is skipped
        number = line.card_number
        if totals[number] + line.points > MAX_CARD_POINTS:
            back_points = coming.get(number, 0)
            shown = line.source_ref.replace(number, mask_card_number(number))  # config lots
            back = (
                f" and {back_points} more its approved redemptions may give back"
                if back_points
                else ""
            )
            raise BadInput(
                f"accrual {shown}: the card would hold {held.get(number, 0) + line.points}"
                f" points{back}, more than the {MAX_CARD_POINTS} an answer can carry"
            )
        totals[number] += line.points
        held[number] = held.get(number, 0) + line.points
        planned.append(len(applying))
        transaction = JournalTransaction(
            idempotency_key=f"accrual:{line.source_ref}",
            kind=TransactionKind.ACCRUAL,
            created_at=when.at,
            business_date=when.business_date,
            card_number=number,
        )
        applying.append((line, transaction))
    if not applying:
        return [outcome for outcome in planned if isinstance(outcome, AccrualSkipped)]
    session.add_all([transaction for _, transaction in applying])
    session.flush()
    lots = []
    for line, transaction in applying:
        card_account = accounts[line.card_number]
        session.add_all(
            [
                JournalEntry(
                    transaction_id=transaction.id, account_id=card_account, points=line.points
                ),
                JournalEntry(transaction_id=transaction.id, account_id=system, points=-line.points),
            ]
        )
        lots.append(
            PointLot(
                card_number=line.card_number,
                origin=LotOrigin.ACCRUAL,
                earned_on=line.earned_on,
                expires_on=lot_expires_on(line.earned_on, expiry_years),
                original_points=line.points,
                remaining_points=line.points,
                source_ref=line.source_ref,
                created_by_transaction_id=transaction.id,
            )
        )
    session.add_all(lots)
    session.flush()
    for (line, transaction), lot in zip(applying, lots, strict=True):
        record_movement(session, transaction.id, lot.id, line.points)
    return [
        outcome
        if isinstance(outcome, AccrualSkipped)
        else Accrued(lots[outcome].id, applying[outcome][1].id, lots[outcome].expires_on)
        for outcome in planned
    ]


def _points_held(session: Session, numbers: Collection[str]) -> dict[str, int]:
    """Each card's ledger balance: what is left in its lots, expired or not (cards without
    lots left out)."""
    query = (
        select(PointLot.card_number, func.sum(PointLot.remaining_points))
        .where(PointLot.card_number.in_(numbers))
        .group_by(PointLot.card_number)
    )
    return {number: int(points or 0) for number, points in session.execute(query)}


def _points_to_come_back(session: Session, numbers: Collection[str]) -> dict[str, int]:
    """What each card's approved redemptions could still give back (void, reversal or
    refunds): their points less what refunds already returned. An accrual counts them, so
    that no later give-back takes the balance past what field 63 can carry."""
    query = (
        select(
            Authorisation.card_number,
            func.sum(Authorisation.points - Authorisation.points_returned),
        )
        .where(
            Authorisation.card_number.in_(numbers),
            Authorisation.kind == AuthorisationKind.REDEMPTION,
            Authorisation.state == AuthorisationState.APPROVED,
        )
        .group_by(Authorisation.card_number)
    )
    rows = session.execute(query)
    return {number: int(points or 0) for number, points in rows if number is not None}


def accrual_bases(session: Session, numbers: Collection[str]) -> dict[str, int]:
    """For each card, what `accrue` adds an accrual to before comparing with
    `MAX_CARD_POINTS`: the points its lots hold and what its approved redemptions could
    still give back; two grouped statements for all of them (the caller bounds `numbers`)."""
    if not numbers:
        return {}
    held = _points_held(session, numbers)
    coming = _points_to_come_back(session, numbers)
    return {number: held.get(number, 0) + coming.get(number, 0) for number in numbers}


def accruals_applied(session: Session, source_refs: Collection[str]) -> set[str]:
    """Which of these accrual source_refs a lot already carries (`accrue` skips them)."""
    query = select(PointLot.source_ref).where(
        PointLot.origin == LotOrigin.ACCRUAL, PointLot.source_ref.in_(source_refs)
    )
    return set(session.scalars(query))


def refuse_unbegun(as_of: date, now: datetime) -> None:
    """`BadInput` for an expiry date whose 00:00 (local) is still to come."""
    if datetime.combine(as_of, time(0), SHANGHAI) > now:
        raise BadInput(f"expiry as of {as_of.isoformat()}: that date has not begun yet")


def expire(session: Session, as_of: date, *, when: Moment) -> ExpiryRun:
    """Book every lot that expired before `as_of` 00:00 local: its remaining points go from
    the card to the expiry account, one transaction per lot (key `expiry:lot:<id>`). Running
    it again for the same date changes nothing. A date whose 00:00 is still to come is
    `BadInput`: its lots have not expired yet.

    A lot can hold points again after its expiry was booked: a void or refund decided at an
    instant before the expiry (read before it waited for the card's lock, which this job
    held) gives its points back to it. The next run books those too, under the key
    `expiry:lot:<id>:<n>` for the lot's n-th booking, rather than failing on the first's key
    for every card."""
    refuse_unbegun(as_of, when.at)
    return expire_cards(session, cards_due_for_expiry(session, as_of), as_of, when=when)


def cards_due_for_expiry(session: Session, as_of: date) -> list[str]:
    """The cards holding points in a lot that expired before `as_of` 00:00 local."""
    query = (
        select(PointLot.card_number)
        .where(PointLot.expires_on < as_of, PointLot.remaining_points > 0)
        .distinct()
        .order_by(PointLot.card_number)
    )
    return list(session.scalars(query))


def expire_cards(
    session: Session, card_numbers: Collection[str], as_of: date, *, when: Moment
) -> ExpiryRun:
    """`expire` for these cards only, each locked while its lots are booked: the command
    books a few cards to a transaction, so that a serving gateway waits for one batch at
    most, never for the whole run."""
    lots = points = cards = 0
    for card_number in card_numbers:
        lock_card(session, card_number)
        due = [lot for lot in lock_lots(session, card_number) if lot.expires_on < as_of]
        for lot in due:
            points += _book_expiry(session, lot, when)
        lots += len(due)
        cards += 1 if due else 0
    return ExpiryRun(lots, points, cards)


def _book_expiry(session: Session, lot: PointLot, when: Moment) -> int:
    amount = lot.remaining_points
    transaction = card_transfer(
        session,
        key=_expiry_key(session, lot),
        kind=TransactionKind.EXPIRY,
        when=when,
        card_number=lot.card_number,
        system=AccountKind.EXPIRY,
        points_to_card=-amount,
    )
    lot.remaining_points = 0
    record_movement(session, transaction.id, lot.id, -amount)
    return amount


def _expiry_key(session: Session, lot: PointLot) -> str:
    """`expiry:lot:<id>` for a lot's first booking, `expiry:lot:<id>:<n>` for its n-th (the
    card is locked, so n is the same for any run that could race this one)."""
    first = f"expiry:lot:{lot.id}"
    keys = JournalTransaction.idempotency_key
    # Nearly every lot is booked once: its key looked up exactly, through the keys' unique
    # index. (Counted with the prefix for every lot, each lookup read the whole journal, and
    # a run of 20,000 lots held the ledger for a minute and a half.)
    if session.scalar(select(keys).where(keys == first)) is None:
        return first
    booked = session.scalar(
        select(func.count())
        .select_from(JournalTransaction)
        .where((keys == first) | keys.startswith(f"{first}:", autoescape=True))
    )
    return f"{first}:{(booked or 1) + 1}"


# --- cards --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardDetails:
    """A card as a config or import file gives it; never its points."""

    number: str
    expiry_yymm: str
    tier: str
    status: CardStatus
    enrolled: bool
    pin_hmac: bytes | None = None


def upsert_card(session: Session, details: CardDetails, at: datetime) -> bool:
    """Create the card (with its account) or update everything but its points; True if new.

    A PIN HMAC that changes resets the wrong-PIN count and unlocks the PIN; `enrolled`
    recorded as true for the first time takes `at` as the enrolment time.
    """
    card = lock_card(session, details.number)
    if card is None:
        session.add(
            Card(
                number=details.number,
                expiry_yymm=details.expiry_yymm,
                tier=details.tier,
                status=details.status,
                enrolled=details.enrolled,
                enrolled_at=at if details.enrolled else None,
                pin_hmac=details.pin_hmac,
                wrong_pin_count=0,
                pin_locked=False,
            )
        )
        session.flush()  # the account refers to the card: the card's row must exist first
        session.add(Account(kind=AccountKind.CARD, card_number=details.number))
        session.flush()
        return True
    card.expiry_yymm = details.expiry_yymm
    card.tier = details.tier
    card.status = details.status
    if details.enrolled and not card.enrolled:
        card.enrolled_at = at
    card.enrolled = details.enrolled
    if details.pin_hmac != card.pin_hmac:
        card.pin_hmac = details.pin_hmac
        card.wrong_pin_count = 0
        card.pin_locked = False
    session.flush()
    return False


def find_card(session: Session, number: str) -> Card | None:
    """The card as stored (no lock): for showing it and for the decision's snapshot."""
    return session.get(Card, number)


def card_lots(session: Session, number: str) -> list[PointLot]:
    """Every lot of a card, empty ones included, in spending order."""
    query = (
        select(PointLot)
        .where(PointLot.card_number == number)
        .order_by(PointLot.expires_on, PointLot.earned_on, PointLot.id)
    )
    return list(session.scalars(query))


def enrol(session: Session, number: str, at: datetime, *, qualify_points: int) -> Enrolment:
    """Enrol a card in the plan: it needs more than `qualify_points` spendable points."""
    card = _card_for_command(session, number)
    if card.enrolled:
        return Enrolment.ALREADY_ENROLLED
    if spendable_points(session, number, at) <= qualify_points:
        return Enrolment.NOT_ENOUGH_POINTS
    card.enrolled = True
    card.enrolled_at = at
    return Enrolment.ENROLLED


def set_status(session: Session, number: str, status: CardStatus) -> CardStatus:
    """Set a card's status; returns the status it had."""
    card = _card_for_command(session, number)
    before = card.status
    card.status = status
    return before


def block(session: Session, number: str) -> CardStatus:
    """Block a card (`62`); returns the status it had."""
    return set_status(session, number, CardStatus.BLOCKED)


def unblock(session: Session, number: str) -> bool:
    """A blocked card becomes active again; any other status stays. True if it changed."""
    card = _card_for_command(session, number)
    if card.status is not CardStatus.BLOCKED:
        return False
    card.status = CardStatus.ACTIVE
    return True


def record_wrong_pin(session: Session, number: str) -> PinState:
    """Count a wrong PIN; the third in a row locks the PIN (pos-8583.md §5.3)."""
    card = _card_for_command(session, number)
    card.wrong_pin_count += 1
    if card.wrong_pin_count >= PIN_TRIES_TO_LOCK:
        card.pin_locked = True
    return PinState(card.wrong_pin_count, card.pin_locked)


def reset_pin_tries(session: Session, number: str) -> PinState:
    """A right PIN: the run of wrong ones starts again (a locked PIN stays locked)."""
    card = _card_for_command(session, number)
    card.wrong_pin_count = 0
    return PinState(0, card.pin_locked)


def unlock_pin(session: Session, number: str) -> PinState:
    """`vipgate cards unlock`: the PIN works again and the count starts from zero."""
    card = _card_for_command(session, number)
    card.wrong_pin_count = 0
    card.pin_locked = False
    return PinState(0, False)


def _card_for_command(session: Session, number: str) -> Card:
    card = lock_card(session, number)
    if card is None:
        raise BadInput("unknown card")
    return card


def journal_transaction(session: Session, key: str) -> JournalTransaction | None:
    """The transaction applied under an idempotency key, if any."""
    query = select(JournalTransaction).where(JournalTransaction.idempotency_key == key)
    return session.scalars(query).one_or_none()

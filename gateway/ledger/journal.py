"""The ledger's bookkeeping primitives: locks, journal postings, lot takes and lot returns.

Every operation in `operations.py` is built from these, so the rules that keep the books right
live in one place each: a posting's entries sum to zero, every change of a lot is a movement
of the transaction that made it, points are spent earliest-expiring first and never from an
expired lot, and points going back to a lot that has expired meanwhile go into a new lot.
Nothing here commits; nothing here decides whether a request is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import BigInteger, ColumnElement, cast, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from cardcodec.cards import mask_card_data
from gateway.clock import SHANGHAI, current_year_expires_on, lot_expired
from gateway.ledger.models import (
    Account,
    AccountKind,
    Card,
    JournalEntry,
    JournalTransaction,
    LotMovement,
    LotOrigin,
    PointLot,
    RrnAllocation,
    TransactionKind,
)

RRN_DIGITS = 12


class LedgerError(RuntimeError):
    """The books disagree with themselves; the unit of work must roll back."""


@dataclass(frozen=True)
class Moment:
    """When a change happens: the instant (timezone-aware) and its business date."""

    at: datetime
    business_date: date

    def __post_init__(self) -> None:
        if self.at.tzinfo is None or self.at.utcoffset() is None:
            raise ValueError("Moment.at must be timezone-aware")

    @property
    def local(self) -> datetime:
        """The instant on the gateway's clock (Asia/Shanghai), which decides lot expiry."""
        return self.at.astimezone(SHANGHAI)


@dataclass(frozen=True)
class LotChange:
    """Points that left or entered one lot (`points` always positive; the result says which)."""

    lot_id: int
    points: int
    expires_on: date


@dataclass(frozen=True)
class Returned:
    """Where returned points went: back into their lots, and the new lot for expired ones."""

    into_lots: tuple[LotChange, ...]
    new_lot: LotChange | None

    @property
    def points(self) -> int:
        extra = self.new_lot.points if self.new_lot else 0
        return sum(change.points for change in self.into_lots) + extra


def sum_of(column: InstrumentedAttribute[int] | ColumnElement[int]) -> ColumnElement[int]:
    """SUM as a 64-bit integer, 0 when there are no rows (PostgreSQL's SUM of BIGINT is
    NUMERIC, which the driver would hand back as a Decimal)."""
    return cast(func.coalesce(func.sum(column), 0), BigInteger)


def lock_card(session: Session, number: str) -> Card | None:
    """The card, locked against every other writer until the unit of work ends.

    On PostgreSQL this is the row lock that serialises everything done to one card; on
    SQLite the unit of work already holds the database's write lock.
    """
    query = (
        select(Card)
        .where(Card.number == number)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return session.scalars(query).one_or_none()


def lock_lots(
    session: Session, card_number: str, ids: Iterable[int] | None = None
) -> list[PointLot]:
    """The card's lots that still hold points (or the given lots), locked, in spending order."""
    query = select(PointLot).where(PointLot.card_number == card_number)
    query = (
        query.where(PointLot.id.in_(list(ids)))
        if ids is not None
        else query.where(PointLot.remaining_points > 0)
    )
    query = query.order_by(PointLot.expires_on, PointLot.earned_on, PointLot.id)
    return list(session.scalars(query.with_for_update().execution_options(populate_existing=True)))


def spendable_lots(session: Session, card_number: str, local: datetime) -> list[PointLot]:
    """The card's unexpired lots with points, in spending order (earliest-expiring, oldest)."""
    return [
        lot for lot in lock_lots(session, card_number) if not lot_expired(lot.expires_on, local)
    ]


def system_account_id(session: Session, kind: AccountKind) -> int:
    """The id of a system account (made by the first migration)."""
    if kind is AccountKind.CARD:
        raise ValueError("a card account is not a system account")
    query = select(Account.id).where(Account.kind == kind, Account.card_number.is_(None))
    return session.scalars(query).one()


def card_account_id(session: Session, card_number: str) -> int:
    query = select(Account.id).where(Account.card_number == card_number)
    return session.scalars(query).one()


def post(
    session: Session,
    *,
    key: str,
    kind: TransactionKind,
    when: Moment,
    card_number: str | None,
    legs: Sequence[tuple[int, int]],
) -> JournalTransaction:
    """A journal transaction with its entries (account id, signed points); they must sum to 0."""
    if sum(points for _, points in legs) != 0 or any(points == 0 for _, points in legs):
        shown = mask_card_data(key, shortest=16)  # a key may hold a card number
        raise LedgerError(f"unbalanced or empty legs for transaction {shown}")
    transaction = JournalTransaction(
        idempotency_key=key,
        kind=kind,
        created_at=when.at,
        business_date=when.business_date,
        card_number=card_number,
    )
    session.add(transaction)
    session.flush()
    session.add_all(
        JournalEntry(transaction_id=transaction.id, account_id=account, points=points)
        for account, points in legs
    )
    return transaction


def card_transfer(
    session: Session,
    *,
    key: str,
    kind: TransactionKind,
    when: Moment,
    card_number: str,
    system: AccountKind,
    points_to_card: int,
) -> JournalTransaction:
    """A posting between a card and one system account: positive points go to the card."""
    card_account = card_account_id(session, card_number)
    other = system_account_id(session, system)
    legs = [(card_account, points_to_card), (other, -points_to_card)]
    return post(session, key=key, kind=kind, when=when, card_number=card_number, legs=legs)


def take(
    session: Session,
    lots: Sequence[PointLot],
    points: int,
    transaction_id: int,
    redemption_id: int | None,
) -> tuple[LotChange, ...]:
    """Take points from lots in the order given; the caller has checked that they suffice."""
    left = points
    taken = []
    for lot in lots:
        if left == 0:
            break
        amount = min(lot.remaining_points, left)
        if amount == 0:
            continue
        lot.remaining_points -= amount
        left -= amount
        session.add(
            LotMovement(
                transaction_id=transaction_id,
                lot_id=lot.id,
                points=-amount,
                redemption_id=redemption_id,
                origin_lot_id=lot.id,
            )
        )
        taken.append(LotChange(lot.id, amount, lot.expires_on))
    if left:
        raise LedgerError("the lots given hold fewer points than were to be taken")
    return tuple(taken)


def held_by_redemption(session: Session, redemption_id: int) -> dict[int, int]:
    """Points a redemption still holds, by the lot they were taken from (origin lot id)."""
    query = (
        select(LotMovement.origin_lot_id, sum_of(LotMovement.points))
        .where(LotMovement.redemption_id == redemption_id)
        .group_by(LotMovement.origin_lot_id)
    )
    held: dict[int, int] = {}
    for origin, total in session.execute(query):
        if origin is None or total > 0:
            raise LedgerError(f"redemption {redemption_id} has more points back than it took")
        if total < 0:
            held[origin] = -total
    return held


def give_back(
    session: Session,
    *,
    transaction: JournalTransaction,
    card_number: str,
    shares: Sequence[tuple[PointLot, int]],
    redemption_id: int,
    when: Moment,
) -> Returned:
    """Return points to the lots they came from; those of expired lots go into one new lot.

    The new lot expires at the end of the current points year (points-and-clearing.md §3).
    """
    into: list[LotChange] = []
    expired: list[tuple[PointLot, int]] = []
    for lot, points in shares:
        if lot_expired(lot.expires_on, when.local):
            expired.append((lot, points))
            continue
        lot.remaining_points += points
        _movement(
            session,
            transaction_id=transaction.id,
            lot_id=lot.id,
            points=points,
            redemption_id=redemption_id,
            origin_lot_id=lot.id,
        )
        into.append(LotChange(lot.id, points, lot.expires_on))
    new_lot = None
    if expired:
        lot = _new_restore_lot(session, transaction, card_number, sum(p for _, p in expired), when)
        for origin, points in expired:
            _movement(
                session,
                transaction_id=transaction.id,
                lot_id=lot.id,
                points=points,
                redemption_id=redemption_id,
                origin_lot_id=origin.id,
            )
        new_lot = LotChange(lot.id, lot.original_points, lot.expires_on)
    return Returned(tuple(into), new_lot)


def _new_restore_lot(
    session: Session,
    transaction: JournalTransaction,
    card_number: str,
    points: int,
    when: Moment,
) -> PointLot:
    local_date = when.local.date()
    lot = PointLot(
        card_number=card_number,
        origin=LotOrigin.RESTORE,
        earned_on=local_date,
        expires_on=current_year_expires_on(local_date),
        original_points=points,
        remaining_points=points,
        source_ref=transaction.idempotency_key,
        created_by_transaction_id=transaction.id,
    )
    session.add(lot)
    session.flush()
    return lot


def _movement(
    session: Session,
    *,
    transaction_id: int,
    lot_id: int,
    points: int,
    redemption_id: int | None,
    origin_lot_id: int | None,
) -> None:
    session.add(
        LotMovement(
            transaction_id=transaction_id,
            lot_id=lot_id,
            points=points,
            redemption_id=redemption_id,
            origin_lot_id=origin_lot_id,
        )
    )


def record_movement(session: Session, transaction_id: int, lot_id: int, points: int) -> None:
    """A movement outside any redemption (an accrual creating a lot, an expiry emptying one)."""
    _movement(
        session,
        transaction_id=transaction_id,
        lot_id=lot_id,
        points=points,
        redemption_id=None,
        origin_lot_id=None,
    )


def next_rrn(session: Session, at: datetime | None = None) -> str:
    """A new retrieval reference number, 12 digits, never handed out before.

    On SQLite an allocation rolled back with its unit of work may be handed out again (it was
    never committed); a caller that must answer with an RRN after a rollback (a `96`) takes
    one in a unit of work of its own.
    """
    allocation = RrnAllocation(allocated_at=at or datetime.now(UTC))
    session.add(allocation)
    session.flush()
    rrn = f"{allocation.id:0{RRN_DIGITS}d}"
    if len(rrn) != RRN_DIGITS:
        raise LedgerError("the RRN sequence is exhausted")
    return rrn

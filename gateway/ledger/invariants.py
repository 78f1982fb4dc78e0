"""The ledger invariants of points-and-clearing.md §3, checked from the stored rows alone.

`vipgate ledger check`, the reconciliation pack and the tests all ask the same question: do the
books agree with themselves? Each check recomputes one figure two independent ways (the journal
and the lots, the lots and their movements, a redemption and what undid it) and reports every
disagreement it finds rather than stopping at the first, so one run shows the whole damage.
Subjects name rows by id (account, lot, transaction), never by card number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Select, and_, case, func, not_, or_, select, text, union
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, aliased

from cardcodec.cards import mask_card_data
from gateway.ledger.db import reading
from gateway.ledger.journal import sum_of
from gateway.ledger.models import (
    BATCH_COUNTED,
    Account,
    AccountKind,
    Authorisation,
    AuthorisationKind,
    AuthorisationState,
    BatchItemCount,
    JournalEntry,
    JournalTransaction,
    LotMovement,
    LotOrigin,
    PointLot,
)


@dataclass(frozen=True)
class Violation:
    """One broken invariant: which rule, which row, and the figures that disagree."""

    rule: str
    subject: str
    detail: str


# At most this many of SQLite's own findings are listed: one damaged page can give thousands.
STORAGE_FAULTS_LISTED = 20


def storage_faults(engine: Engine) -> list[Violation]:
    """SQLite's own check of the ledger file (`PRAGMA integrity_check`: every page, every
    index against its table), on a snapshot that takes no write lock, so a serving gateway
    goes on committing meanwhile. The invariants read rows through the indexes: on a
    damaged file they can pass over what they cannot see, or stop with SQLite's error. None
    on PostgreSQL, whose pages the server checks as it reads them."""
    if engine.dialect.name != "sqlite":
        return []
    try:
        with reading(engine) as connection:
            found = (
                connection.exec_driver_sql(f"PRAGMA integrity_check({STORAGE_FAULTS_LISTED})")
                .scalars()
                .all()
            )
    except DatabaseError as error:  # damage that stops the check itself
        found = [str(error.orig).splitlines()[0] if error.orig is not None else str(error)]
    return [
        Violation("storage_sound", "ledger file", str(finding))
        for finding in found
        if finding != "ok"
    ]


def _totals(session: Session, query: Select[Any, int]) -> dict[Any, int]:
    """A two-column query (key, integer total) as a dict."""
    return {key: int(total) for key, total in session.execute(query)}


def check_invariants(session: Session) -> list[Violation]:
    """Every violation found, in a stable order; an empty list means the ledger is sound."""
    found: list[Violation] = []
    for check in CHECKS:
        found.extend(check(session))
    return found


def _unbalanced_transactions(session: Session) -> Iterator[Violation]:
    """Each transaction's entries sum to zero, and every transaction has entries."""
    sums = (
        select(
            JournalTransaction.id,
            sum_of(JournalEntry.points),
            func.count(JournalEntry.id),
        )
        .outerjoin(JournalEntry, JournalEntry.transaction_id == JournalTransaction.id)
        .group_by(JournalTransaction.id)
        .order_by(JournalTransaction.id)
    )
    for transaction_id, total, count in session.execute(sums):
        if count == 0:
            yield Violation("journal.empty", f"transaction {transaction_id}", "no entries")
        elif total != 0:
            yield Violation(
                "journal.unbalanced", f"transaction {transaction_id}", f"entries sum to {total}"
            )


def _journal_total(session: Session) -> Iterator[Violation]:
    """The whole journal sums to zero."""
    total = session.scalar(select(sum_of(JournalEntry.points)))
    if total:
        yield Violation("journal.total", "journal", f"all entries sum to {total}")


def _card_balances(session: Session) -> Iterator[Violation]:
    """Each card account's balance equals the sum of its lots, and neither is negative."""
    entries = _totals(
        session,
        (
            select(Account.card_number, sum_of(JournalEntry.points))
            .join(JournalEntry, JournalEntry.account_id == Account.id)
            .where(Account.kind == AccountKind.CARD)
            .group_by(Account.card_number)
        ),
    )
    lots: dict[str | None, int] = _totals(
        session,
        (
            select(PointLot.card_number, sum_of(PointLot.remaining_points)).group_by(
                PointLot.card_number
            )
        ),
    )
    accounts: dict[str | None, int] = _totals(
        session, (select(Account.card_number, Account.id).where(Account.kind == AccountKind.CARD))
    )
    for card_number in sorted(set(entries) | set(lots), key=str):
        subject = f"account {accounts.get(card_number, '?')}"
        balance, in_lots = int(entries.get(card_number) or 0), int(lots.get(card_number) or 0)
        if balance != in_lots:
            yield Violation(
                "card.balance_vs_lots", subject, f"balance {balance}, lots hold {in_lots}"
            )
        if balance < 0:
            yield Violation("card.negative", subject, f"balance {balance}")


def _lot_bounds(session: Session) -> Iterator[Violation]:
    """No lot is negative or holds more than it was made with."""
    query = (
        select(PointLot.id, PointLot.original_points, PointLot.remaining_points)
        .where(
            (PointLot.remaining_points < 0)
            | (PointLot.remaining_points > PointLot.original_points)
            | (PointLot.original_points <= 0)
        )
        .order_by(PointLot.id)
    )
    for lot_id, original, remaining in session.execute(query):
        yield Violation(
            "lot.bounds", f"lot {lot_id}", f"remaining {remaining} of original {original}"
        )


def _lot_movements(session: Session) -> Iterator[Violation]:
    """Each lot's remaining points are the sum of its movements (its creation included)."""
    moved = _totals(
        session,
        (select(LotMovement.lot_id, sum_of(LotMovement.points)).group_by(LotMovement.lot_id)),
    )
    for lot_id, remaining in session.execute(
        select(PointLot.id, PointLot.remaining_points).order_by(PointLot.id)
    ):
        total = int(moved.get(lot_id) or 0)
        if total != remaining:
            yield Violation(
                "lot.movements", f"lot {lot_id}", f"remaining {remaining}, movements sum {total}"
            )


def _movements_match_entries(session: Session) -> Iterator[Violation]:
    """In each transaction, the lots moved exactly what the card accounts' entries say.

    Compared in the database, so only the transactions that disagree come back: the check
    runs in bounded memory however large the journal is.
    """
    moved = (
        select(LotMovement.transaction_id.label("id"), sum_of(LotMovement.points).label("points"))
        .group_by(LotMovement.transaction_id)
        .subquery()
    )
    booked = (
        select(JournalEntry.transaction_id.label("id"), sum_of(JournalEntry.points).label("points"))
        .join(Account, Account.id == JournalEntry.account_id)
        .where(Account.kind == AccountKind.CARD)
        .group_by(JournalEntry.transaction_id)
        .subquery()
    )
    ids = union(select(moved.c.id), select(booked.c.id)).subquery()
    lots = func.coalesce(moved.c.points, 0)
    card = func.coalesce(booked.c.points, 0)
    query = (
        select(ids.c.id, lots, card)
        .outerjoin(moved, moved.c.id == ids.c.id)
        .outerjoin(booked, booked.c.id == ids.c.id)
        .where(lots != card)
        .order_by(ids.c.id)
    )
    for transaction_id, lots_moved, card_entries in session.execute(query):
        yield Violation(
            "transaction.movements",
            f"transaction {transaction_id}",
            f"lots moved {int(lots_moved)}, card entries {int(card_entries)}",
        )


def _applied_once(session: Session) -> Iterator[Violation]:
    """No idempotency key, accrual source_ref or journal transaction is used twice."""
    duplicates = [
        ("journal.key_twice", JournalTransaction.idempotency_key, None),
        ("accrual.ref_twice", PointLot.source_ref, PointLot.origin == LotOrigin.ACCRUAL),
        ("authorisation.transaction_twice", Authorisation.journal_transaction_id, None),
    ]
    for rule, column, condition in duplicates:
        query = select(column, func.count()).where(column.is_not(None)).group_by(column)
        if condition is not None:
            query = query.where(condition)
        for value, count in session.execute(query.having(func.count() > 1).order_by(column)):
            # A key or reference may hold a card number (`accrual:config:<number>:0`).
            shown = mask_card_data(str(value), shortest=16)
            yield Violation(rule, f"{column.key} {shown}", f"applied {count} times")


def _redemptions_hold_their_points(session: Session) -> Iterator[Violation]:
    """A redemption holds, lot by lot, what it took less what went back: all of P less the
    refunded points while approved, nothing once voided or reversed.

    Compared in the database, so only the redemptions that break a rule come back.
    """
    held = (
        select(LotMovement.redemption_id.label("id"), (-sum_of(LotMovement.points)).label("points"))
        .where(LotMovement.redemption_id.is_not(None))
        .group_by(LotMovement.redemption_id)
        .subquery()
    )
    holds = func.coalesce(held.c.points, 0)
    expected = case(
        (
            Authorisation.state == AuthorisationState.APPROVED,
            Authorisation.points - Authorisation.points_returned,
        ),
        else_=0,
    )
    refunds_fit = and_(
        Authorisation.points_returned.between(0, Authorisation.points),
        Authorisation.refunded_fen.between(0, Authorisation.amount_fen),
        Authorisation.fen_clawed.between(0, Authorisation.settled_fen),
    )
    query = (
        select(Authorisation.id, holds, expected, refunds_fit)
        .outerjoin(held, held.c.id == Authorisation.id)
        .where(
            Authorisation.kind == AuthorisationKind.REDEMPTION,
            Authorisation.state != AuthorisationState.DECLINED,
            or_(holds != expected, not_(refunds_fit)),
        )
        .order_by(Authorisation.id)
    )
    for authorisation_id, holding, owed, fits in session.execute(query):
        if int(holding) != int(owed):
            yield Violation(
                "redemption.holding",
                f"authorisation {authorisation_id}",
                f"holds {int(holding)} points, expected {int(owed)}",
            )
        if not fits:
            yield Violation(
                "redemption.refunds", f"authorisation {authorisation_id}", "refunds exceed original"
            )


def _redemption_figures(session: Session) -> Iterator[Violation]:
    """A redemption's figures follow from its amount and discount (points-and-clearing.md
    §1): D = A x (10000 - d) / 10000 rounded half up, P = D / 2 rounded up. Clearing settles
    D, so a D changed by hand would move money no points account for.

    Compared in the database, in integers (every figure is at least 0)."""
    settled = (Authorisation.amount_fen * (10000 - Authorisation.discount_bp) * 2 + 10000) // 20000
    points = (Authorisation.settled_fen + 1) // 2
    query = (
        select(Authorisation.id, Authorisation.settled_fen, settled, Authorisation.points, points)
        .where(
            Authorisation.kind == AuthorisationKind.REDEMPTION,
            Authorisation.state != AuthorisationState.DECLINED,
            or_(Authorisation.settled_fen != settled, Authorisation.points != points),
        )
        .order_by(Authorisation.id)
    )
    for authorisation_id, stored_fen, fen, stored_points, owed in session.execute(query):
        yield Violation(
            "redemption.figures",
            f"authorisation {authorisation_id}",
            f"D {int(stored_fen)} and P {int(stored_points)}, expected {int(fen)} and {int(owed)}",
        )


def _refunds_add_up(session: Session) -> Iterator[Violation]:
    """A redemption's running refund totals (refunded fen, points returned, fen clawed back)
    are the sums of its approved refunds' figures: clearing reads the refunds, the next
    refund's share reads the totals."""
    refund = aliased(Authorisation)
    sums = (
        select(
            refund.original_id.label("id"),
            sum_of(refund.amount_fen).label("fen"),
            sum_of(refund.points).label("points"),
            sum_of(refund.settled_fen).label("clawed"),
        )
        .where(refund.kind == AuthorisationKind.REFUND, refund.response_code == "00")
        .group_by(refund.original_id)
        .subquery()
    )
    fen, points, clawed = (func.coalesce(c, 0) for c in (sums.c.fen, sums.c.points, sums.c.clawed))
    query = (
        select(
            Authorisation.id,
            Authorisation.refunded_fen,
            fen,
            Authorisation.points_returned,
            points,
            Authorisation.fen_clawed,
            clawed,
        )
        .outerjoin(sums, sums.c.id == Authorisation.id)
        .where(
            Authorisation.kind == AuthorisationKind.REDEMPTION,
            or_(
                Authorisation.refunded_fen != fen,
                Authorisation.points_returned != points,
                Authorisation.fen_clawed != clawed,
            ),
        )
        .order_by(Authorisation.id)
    )
    for row in session.execute(query):
        authorisation_id, *figures = (int(value) for value in row)
        kept_fen, summed_fen, kept_points, summed_points, kept_clawed, summed_clawed = figures
        yield Violation(
            "redemption.refund_totals",
            f"authorisation {authorisation_id}",
            f"refunded {kept_fen} fen, {kept_points} points, {kept_clawed} fen clawed; its"
            f" refunds sum to {summed_fen}, {summed_points}, {summed_clawed}",
        )


def _batch_item_counts(session: Session) -> Iterator[Violation]:
    """The counts the 999-per-batch limit reads (kept by triggers) are the batches' counted
    authorisations, terminal by terminal, batch by batch, kind by kind.

    Compared in the database (a full outer join), so only the counts that disagree come back,
    however many batches the ledger holds."""
    key = (Authorisation.terminal_id, Authorisation.batch_number, Authorisation.kind)
    found = (
        select(*key, func.count().label("rows"))
        .where(text(BATCH_COUNTED))
        .group_by(*key)
        .subquery()
    )
    kept = BatchItemCount
    same = and_(
        found.c.terminal_id == kept.terminal_id,
        found.c.batch_number == kept.batch_number,
        found.c.kind == kept.kind,
    )
    counted, stored = func.coalesce(found.c.rows, 0), func.coalesce(kept.items, 0)
    place = (
        func.coalesce(found.c.terminal_id, kept.terminal_id),
        func.coalesce(found.c.batch_number, kept.batch_number),
        func.coalesce(found.c.kind, kept.kind),
    )
    query = (
        select(*place, counted, stored)
        .select_from(found)
        .join(kept, same, full=True)
        .where(counted != stored)
        .order_by(*place)
    )
    for terminal_id, batch_number, kind, rows, items in session.execute(query):
        yield Violation(
            "batch.item_count",
            f"terminal {terminal_id} batch {int(batch_number):06d} {kind.value}",
            f"counted {int(items)}, authorisations {int(rows)}",
        )


CHECKS: tuple[Callable[[Session], Iterator[Violation]], ...] = (
    _unbalanced_transactions,
    _journal_total,
    _card_balances,
    _lot_bounds,
    _lot_movements,
    _movements_match_entries,
    _applied_once,
    _redemptions_hold_their_points,
    _redemption_figures,
    _refunds_add_up,
    _batch_item_counts,
)

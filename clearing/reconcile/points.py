"""Third way: the points ledger against the money (points-and-clearing.md §7).

Points given up minus points returned in the month, as the double-entry journal books them on
the redemption account, must equal what the month's authorisations say, and the part of it
that reached the settlement file must equal the file's points. What did not reach the file is
shown, not hidden: redemptions undone before the close and the voids and reversals that
undid them (accounted for without an entry), and anything not accounted for yet. The ledger
invariants of §3 are checked by the ledger's own module; each violation is an exception.

The month's authorisations are summed in SQL, grouped by how the closes accounted for them,
so a month of a million entries costs a few aggregate queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import ColumnElement, and_, case, or_, select
from sqlalchemy.orm import Session, aliased

from clearing.models import SettledItem
from clearing.period import Month
from clearing.reconcile.findings import Finding, FindingList
from gateway.ledger.invariants import check_invariants
from gateway.ledger.journal import sum_of
from gateway.ledger.models import (
    Account,
    AccountKind,
    Authorisation,
    AuthorisationKind,
    AuthorisationState,
    JournalEntry,
    JournalTransaction,
    TransactionKind,
)

APPROVED_CODES = ("00", "10")
POINT_MOVING_KINDS = (
    TransactionKind.REDEMPTION,
    TransactionKind.VOID,
    TransactionKind.REFUND,
    TransactionKind.REVERSAL,
    TransactionKind.VOID_REVERSAL,
)


def moves_money() -> ColumnElement[bool]:
    """An authorisation that changes what a merchant is settled: an approved redemption or
    refund, or a void or reversal that moved points (one that did not is no settlement
    matter: a void that could not be taken back, a reversal of nothing)."""
    return or_(
        and_(
            Authorisation.kind == AuthorisationKind.REDEMPTION,
            Authorisation.response_code.in_(APPROVED_CODES),
            Authorisation.state != AuthorisationState.DECLINED,
        ),
        and_(
            Authorisation.kind == AuthorisationKind.REFUND,
            Authorisation.response_code == "00",
            Authorisation.state != AuthorisationState.DECLINED,
        ),
        and_(
            Authorisation.kind.in_([AuthorisationKind.VOID, AuthorisationKind.REVERSAL]),
            Authorisation.journal_transaction_id.is_not(None),
        ),
    )


@dataclass(frozen=True)
class PointsBalance:
    """The month's points, booked and accounted for."""

    journal: int  # given up minus returned, as the journal books it
    authorisations: int  # the same from the authorisations
    in_file: int  # of which in the month's settlement file (by the authorisations)
    without_entry: int  # of which accounted for without an entry (undone before a close)
    not_accounted: int  # of which no close has accounted for yet
    file: int  # given up minus returned, as the file says

    @property
    def balanced(self) -> bool:
        return self.journal == self.authorisations and self.in_file == self.file


def journal_points(session: Session, first: date, last: date) -> int:
    """Points given up minus returned over the business dates, from the journal alone."""
    query = (
        select(sum_of(JournalEntry.points))
        .join(JournalTransaction, JournalTransaction.id == JournalEntry.transaction_id)
        .join(Account, Account.id == JournalEntry.account_id)
        .where(
            Account.kind == AccountKind.REDEMPTION,
            JournalTransaction.kind.in_(POINT_MOVING_KINDS),
            JournalTransaction.business_date >= first,
            JournalTransaction.business_date <= last,
        )
    )
    return int(session.scalar(query) or 0)


def authorisation_points(
    session: Session, first: date, last: date, month_key: str
) -> dict[str, int]:
    """The month's authorisations' signed points, by how they were accounted for:
    'entry' (in this month's file), 'none' (without an entry), 'pending' (not yet)."""
    original = aliased(Authorisation)
    signed = case(
        (Authorisation.kind == AuthorisationKind.REDEMPTION, Authorisation.points),
        (
            Authorisation.kind.in_([AuthorisationKind.REFUND, AuthorisationKind.VOID]),
            -Authorisation.points,
        ),
        (original.kind == AuthorisationKind.VOID, Authorisation.points),
        else_=-Authorisation.points,
    )
    status = case(
        (SettledItem.authorisation_id.is_(None), "pending"),
        (and_(SettledItem.entry_type.is_not(None), SettledItem.month == month_key), "entry"),
        (SettledItem.entry_type.is_not(None), "elsewhere"),
        else_="none",
    )
    query = (
        select(status, sum_of(signed))
        .select_from(Authorisation)
        .outerjoin(original, original.id == Authorisation.original_id)
        .outerjoin(SettledItem, SettledItem.authorisation_id == Authorisation.id)
        .where(
            moves_money(), Authorisation.business_date >= first, Authorisation.business_date <= last
        )
        .group_by(status)
    )
    return {key: int(total) for key, total in session.execute(query)}


def check_points(
    session: Session, month: Month, *, file_points: int, findings: FindingList
) -> PointsBalance:
    """The month's points three ways, and the ledger invariants; exceptions into `findings`."""
    by_status = authorisation_points(session, month.first_date, month.last_date, month.key)
    balance = PointsBalance(
        journal=journal_points(session, month.first_date, month.last_date),
        authorisations=sum(by_status.values()),
        in_file=by_status.get("entry", 0),
        without_entry=by_status.get("none", 0),
        not_accounted=by_status.get("pending", 0),
        file=file_points,
    )
    if balance.journal != balance.authorisations:
        findings.add(
            Finding(
                "journal points differ from the authorisations'",
                first_fen=None,
                detail=f"journal {balance.journal} points, authorisations {balance.authorisations}",
            )
        )
    if balance.in_file != balance.file:
        findings.add(
            Finding(
                "points in the file differ from the entries'",
                detail=f"entries {balance.in_file} points, file {balance.file}",
            )
        )
    if by_status.get("elsewhere"):
        findings.add(
            Finding(
                "entries of this month's business dates in another month's file",
                detail=f"{by_status['elsewhere']} points",
            )
        )
    for violation in check_invariants(session):
        findings.add(
            Finding(
                f"ledger invariant {violation.rule}",
                detail=f"{violation.subject}: {violation.detail}",
            )
        )
    return balance


@dataclass(frozen=True)
class PointsRollForward:
    """The cards' points over the month's business dates: what they held before it, what
    each kind of journal transaction added or took, and what they held after it (the
    operator's liability); opening plus the movements is closing."""

    opening: int
    movements: tuple[tuple[str, int], ...]  # (transaction kind, signed points on cards)
    closing: int


def points_roll_forward(session: Session, month: Month) -> PointsRollForward:
    """Sums of the card accounts' journal entries, by the transactions' business dates."""
    on_cards = (
        select(JournalTransaction.kind, sum_of(JournalEntry.points))
        .join(JournalTransaction, JournalTransaction.id == JournalEntry.transaction_id)
        .join(Account, Account.id == JournalEntry.account_id)
        .where(Account.kind == AccountKind.CARD)
    )
    opening = session.execute(
        select(sum_of(JournalEntry.points))
        .join(JournalTransaction, JournalTransaction.id == JournalEntry.transaction_id)
        .join(Account, Account.id == JournalEntry.account_id)
        .where(
            Account.kind == AccountKind.CARD, JournalTransaction.business_date < month.first_date
        )
    ).scalar_one()
    rows = session.execute(
        on_cards.where(
            JournalTransaction.business_date >= month.first_date,
            JournalTransaction.business_date <= month.last_date,
        )
        .group_by(JournalTransaction.kind)
        .order_by(JournalTransaction.kind)
    )
    movements = tuple((kind.value, int(points)) for kind, points in rows)
    opening = int(opening or 0)
    return PointsRollForward(opening, movements, opening + sum(p for _, p in movements))

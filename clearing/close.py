"""Closing a month: deciding, once, which authorisations its settlement file carries.

points-and-clearing.md §5: an approved redemption not voided or reversed is an entry of +D
(`22`), a refund an entry of -D_r (`25`); a void or a reversal leaves no entry, unless its
original's month was already closed when it happened, and then it is an entry of its own
month (`23`, `04`). "Already closed when it happened" is decided here by what the close of
the original's month saw rather than by comparing clocks: that close accounted for the
redemption in the state it found and for every void and reversal of it that existed then
(`SettledItem` rows without an entry). A void or reversal it did not see is still
unaccounted, and the close of the month it belongs to turns it into an entry. A reversal
that undid a void puts the redemption back, so its `04` entry is +D; a void that could not be
taken back, a reversal for a closed batch or of nothing moved no money and is no item at all.

Over all closed months each redemption's entries therefore add up to what it finally is:
+D while it stands, nothing once undone. The close is a handful of INSERT ... SELECT
statements, so a month of a million entries closes without passing through Python; on
PostgreSQL they share one REPEATABLE READ snapshot, on SQLite the unit of work's write lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, tzinfo
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    and_,
    case,
    exists,
    func,
    insert,
    literal,
    null,
    select,
)
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from clearing.layout import file_name
from clearing.models import ClosedMonth, ClosedMonthMerchant, SettledItem
from clearing.period import Month, month_begins, month_ends
from gateway.config import MAX_FEE_BP
from gateway.errors import BadInput
from gateway.ledger.models import (
    Authorisation,
    AuthorisationKind,
    AuthorisationState,
    Merchant,
    TerminalEnabledChange,
)

APPROVED_CODES = ("00", "10")
# (authorisation id, month, entry type or NULL, sign): a `SettledItem` row to insert.
ItemRows = Select[Any, Any, Any, Any]


@dataclass(frozen=True)
class CloseSettings:
    """What a close takes from the configuration, recorded with it."""

    sender_id: str
    receiver_id: str
    terminal_fee_fen: int
    timezone: tzinfo
    cutoff: time


def closed_month(session: Session, month: Month) -> ClosedMonth | None:
    return session.get(ClosedMonth, month.key)


def close_month(
    session: Session, month: Month, settings: CloseSettings, now: datetime
) -> ClosedMonth:
    """Close the month (account for its authorisations) unless it is closed already."""
    existing = closed_month(session, month)
    if existing is not None:
        return existing
    _refuse_unsettleable_rates(session)
    begins = month_begins(month, settings.timezone, settings.cutoff)
    ends = month_ends(month, settings.timezone, settings.cutoff)
    closed = ClosedMonth(
        month=month.key,
        closed_at=now,
        sender_id=settings.sender_id,
        receiver_id=settings.receiver_id,
        terminal_count=len(terminals_for_fee(session, month, begins, ends)),
        terminal_fee_fen=settings.terminal_fee_fen,
        file_name=file_name(settings.receiver_id, month.compact),
        file_sha256=None,
    )
    session.add(closed)
    session.flush()
    rows = _month_rows(session, month)
    for statement in (
        _redemptions(month, rows),
        _seen_undoings(month, rows),
        _refunds(month, rows),
        _late_undoings(month, rows),
    ):
        session.execute(
            insert(SettledItem).from_select(
                ["authorisation_id", "month", "entry_type", "sign"], statement
            )
        )
    session.execute(
        insert(ClosedMonthMerchant).from_select(
            ["month", "merchant_id", "fee_bp", "bank_card_fee_bp"],
            select(
                literal(month.key, String), Merchant.id, Merchant.fee_bp, Merchant.bank_card_fee_bp
            ),
        )
    )
    session.flush()
    return closed


def refuse_unclosable(session: Session, month: Month) -> None:
    """`BadInput` when the month is still to close and its close would be refused (a rate the
    file cannot carry); a month closed already is not closed again, so it is never refused."""
    if closed_month(session, month) is None:
        _refuse_unsettleable_rates(session)


def _refuse_unsettleable_rates(session: Session) -> None:
    """The close records each merchant's rate for the file's merchant record, whose 4 digits
    stop at 9999 bp. The config refuses more; a ledger loaded before it did may still hold
    such a rate, and a close recording it could never be written: refuse it before closing."""
    query = select(Merchant.id, Merchant.fee_bp).where(Merchant.fee_bp > MAX_FEE_BP)
    found = session.execute(query.order_by(Merchant.id).limit(1)).first()
    if found is not None:
        raise BadInput(
            f"merchant {found.id}: fee_bp {found.fee_bp} is outside 0-{MAX_FEE_BP}, which the"
            " settlement file carries; load a config with a lower rate (the month stays open)"
        )


def _unaccounted() -> ColumnElement[bool]:
    return ~exists().where(SettledItem.authorisation_id == Authorisation.id)


def _in_month(
    column: ColumnElement[date] | InstrumentedAttribute[date], month: Month
) -> ColumnElement[bool]:
    return and_(column >= month.first_date, column <= month.last_date)


@dataclass(frozen=True)
class _MonthRows:
    """Where the month's authorisations are: their business dates, and the range of ids
    they fall in. The id range says nothing the dates do not, but ids grow with time, so it
    lets SQLite read the month as one stretch of the table instead of a million index
    lookups (five times faster for a month of a million)."""

    first_id: int
    last_id: int
    month: Month

    def condition(self) -> ColumnElement[bool]:
        return and_(
            Authorisation.id >= self.first_id,
            Authorisation.id <= self.last_id,
            _in_month(Authorisation.business_date, self.month),
        )


def _month_rows(session: Session, month: Month) -> _MonthRows:
    query = select(func.min(Authorisation.id), func.max(Authorisation.id)).where(
        _in_month(Authorisation.business_date, month)
    )
    first_id, last_id = session.execute(query).one()
    if first_id is None:
        return _MonthRows(1, 0, month)  # no authorisation: an empty range
    return _MonthRows(first_id, last_id, month)


def _redemptions(month: Month, rows: _MonthRows) -> ItemRows:
    """The month's approved redemptions: `22` while they stand, no entry once undone."""
    stands = Authorisation.state == AuthorisationState.APPROVED
    return select(
        Authorisation.id,
        literal(month.key, String),
        case((stands, literal("22", String)), else_=null()),
        case((stands, 1), else_=0),
    ).where(
        Authorisation.kind == AuthorisationKind.REDEMPTION,
        Authorisation.response_code.in_(APPROVED_CODES),
        Authorisation.state != AuthorisationState.DECLINED,
        rows.condition(),
        _unaccounted(),
    )


def _refunds(month: Month, rows: _MonthRows) -> ItemRows:
    """The month's refunds: `25`, -D_r each."""
    return select(
        Authorisation.id, literal(month.key, String), literal("25", String), literal(-1)
    ).where(
        Authorisation.kind == AuthorisationKind.REFUND,
        Authorisation.response_code == "00",
        Authorisation.state != AuthorisationState.DECLINED,
        rows.condition(),
        _unaccounted(),
    )


@dataclass(frozen=True)
class _Root:
    """The redemption at the root of a void or reversal: a void's original; a reversal's
    original when that is a redemption, else (a reversal of a void) the void's original."""

    undid_void: ColumnElement[bool]
    id: ColumnElement[int]
    business_date: ColumnElement[date]


def _undoings() -> tuple[_Root, Callable[..., ItemRows]]:
    """The root of a void or reversal, and a function that selects the given columns from
    the voids and reversals that moved points and are not accounted for yet (the caller
    adds the conditions on the root)."""
    original = aliased(Authorisation)
    root_of_void = aliased(Authorisation)
    undid_void = original.kind == AuthorisationKind.VOID
    root = _Root(
        undid_void,
        case((undid_void, root_of_void.id), else_=original.id),
        case((undid_void, root_of_void.business_date), else_=original.business_date),
    )

    def selecting(*columns: ColumnElement[Any]) -> ItemRows:
        return (
            select(*columns)
            .select_from(Authorisation)
            .join(original, original.id == Authorisation.original_id)
            .outerjoin(root_of_void, root_of_void.id == original.original_id)
            .where(
                Authorisation.kind.in_([AuthorisationKind.VOID, AuthorisationKind.REVERSAL]),
                Authorisation.journal_transaction_id.is_not(None),
                _unaccounted(),
            )
        )

    return root, selecting


def _seen_undoings(month: Month, rows: _MonthRows) -> ItemRows:
    """Every void and reversal of the month's redemptions that exists at the close: the
    redemption's state already reflects it, so it is accounted for without an entry."""
    root, selecting = _undoings()
    # An undoing comes after its redemption, so its id is above the month's first.
    return selecting(Authorisation.id, literal(month.key, String), null(), literal(0)).where(
        _in_month(root.business_date, month), Authorisation.id >= rows.first_id
    )


def _late_undoings(month: Month, rows: _MonthRows) -> ItemRows:
    """The month's voids and reversals of a redemption an earlier close already accounted
    for: `23` (-D) for a void, `04` for a reversal (-D, or +D when it undid a void)."""
    root, selecting = _undoings()
    is_void = Authorisation.kind == AuthorisationKind.VOID
    reinstates = and_(Authorisation.kind == AuthorisationKind.REVERSAL, root.undid_void)
    return selecting(
        Authorisation.id,
        literal(month.key, String),
        case((is_void, literal("23", String)), else_=literal("04", String)),
        case((reinstates, 1), else_=-1),
    ).where(
        rows.condition(),
        exists().where(SettledItem.authorisation_id == root.id),
    )


ENABLED = "enabled by the history"
SERVED = "requests served in the month, the history saying disabled"


def terminals_for_fee(
    session: Session, month: Month, begins: datetime, ends: datetime
) -> dict[str, str]:
    """The terminals the month's terminal fee is paid for, each with why: enabled at any
    moment of the month by its history (§5), or, though the history says otherwise, served
    in the month by a gateway: a request of it recorded in the ledger, approved or declined
    there. A gateway decides with its own config and declines a disabled terminal (`58`)
    before the ledger, recording nothing; the history is what the configs loaded into the
    ledger said, and a gateway still serving an older config (a rolling restart, a command
    run with another `--config`) served a terminal the history may call disabled. A
    terminal that was served was enabled."""
    counted = dict.fromkeys(enabled_terminals(session, begins, ends), ENABLED)
    served = (
        select(Authorisation.terminal_id)
        .where(
            Authorisation.business_date >= month.first_date,
            Authorisation.business_date <= month.last_date,
        )
        .distinct()
    )
    for terminal_id in session.scalars(served):
        counted.setdefault(terminal_id, SERVED)
    return dict(sorted(counted.items()))


def enabled_terminals(session: Session, begins: datetime, ends: datetime) -> list[str]:
    """The terminals enabled at any moment of [begins, ends), from their enable history:
    enabled when the span began (by their last change before it), or enabled by a change
    within it."""
    query = (
        select(
            TerminalEnabledChange.terminal_id,
            TerminalEnabledChange.enabled,
            TerminalEnabledChange.changed_at,
        )
        .where(TerminalEnabledChange.changed_at < ends)
        .order_by(
            TerminalEnabledChange.terminal_id,
            TerminalEnabledChange.changed_at,
            TerminalEnabledChange.id,
        )
    )
    enabled_before: dict[str, bool] = {}
    counted: set[str] = set()
    for terminal_id, enabled, changed_at in session.execute(query):
        if changed_at <= begins:
            enabled_before[terminal_id] = enabled
        elif enabled:
            counted.add(terminal_id)
    counted.update(terminal for terminal, enabled in enabled_before.items() if enabled)
    return sorted(counted)

"""The gateway's records beside the points: merchants, terminals, batches, requests, reversals.

These rows carry no points, but clearing and reconciliation are computed from them: the fee in
force, which terminals were enabled in a month (from the append-only histories kept here),
each batch's totals on both sides, and the answers a repeated request must get again. As in
`operations.py`, every function takes an open `Session` and never commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, select
from sqlalchemy.orm import Session

from gateway.ledger.journal import next_rrn, sum_of
from gateway.ledger.models import (
    Authorisation,
    AuthorisationKind,
    AuthorisationState,
    BatchResult,
    KeySuite,
    LoggedRequest,
    Merchant,
    MerchantActiveChange,
    RequestClass,
    ReversalTombstone,
    Terminal,
    TerminalBatch,
    TerminalEnabledChange,
    UploadedRecord,
)
from gateway.ledger.operations import APPROVED_CODES, Swipe

LAST_BATCH_NUMBER = 999999


# --- merchants and terminals --------------------------------------------------------------


@dataclass(frozen=True)
class MerchantDetails:
    id: str
    name: str
    active: bool
    fee_bp: int
    bank_card_fee_bp: int
    allow_partial: bool
    refund_window_days: int
    max_amount_fen: int
    rules: Sequence[dict[str, Any]]


def upsert_merchant(session: Session, details: MerchantDetails, at: datetime) -> bool:
    """Create or update a merchant; a new merchant or a change of `active` is appended to
    its history with `at`. True if the merchant is new."""
    # FOR NO KEY UPDATE: the gateway's inserts that refer to this row (FOR KEY SHARE) go on.
    merchant = session.get(Merchant, details.id, with_for_update={"key_share": True})
    created = merchant is None
    if merchant is None:
        merchant = Merchant(id=details.id)
        session.add(merchant)
    changed = created or merchant.active != details.active
    merchant.name = details.name
    merchant.active = details.active
    merchant.fee_bp = details.fee_bp
    merchant.bank_card_fee_bp = details.bank_card_fee_bp
    merchant.allow_partial = details.allow_partial
    merchant.refund_window_days = details.refund_window_days
    merchant.max_amount_fen = details.max_amount_fen
    merchant.rules = [dict(rule) for rule in details.rules]
    session.flush()
    if changed:
        change = MerchantActiveChange(merchant_id=details.id, active=details.active, changed_at=at)
        session.add(change)
        session.flush()
    return created


@dataclass(frozen=True)
class TerminalDetails:
    id: str
    merchant_id: str
    enabled: bool
    suite: KeySuite
    tmk_encrypted: bytes  # encrypted under the master key by the caller


def upsert_terminal(session: Session, details: TerminalDetails, at: datetime) -> bool:
    """Create or update a terminal; a new terminal opens batch 000001, and a new terminal or
    a change of `enabled` is appended to its history with `at`. True if the terminal is new."""
    # FOR NO KEY UPDATE: the gateway's inserts that refer to this row (FOR KEY SHARE) go on.
    terminal = session.get(Terminal, details.id, with_for_update={"key_share": True})
    created = terminal is None
    if terminal is None:
        terminal = Terminal(id=details.id, open_batch_number=1)
        session.add(terminal)
    changed = created or terminal.enabled != details.enabled
    terminal.merchant_id = details.merchant_id
    terminal.enabled = details.enabled
    terminal.suite = details.suite
    terminal.tmk_encrypted = details.tmk_encrypted
    session.flush()
    if created:
        session.add(TerminalBatch(terminal_id=details.id, batch_number=1, opened_at=at))
    if changed:
        session.add(
            TerminalEnabledChange(terminal_id=details.id, enabled=details.enabled, changed_at=at)
        )
    session.flush()
    return created


# --- authorisations without a ledger effect -------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    authorisation_id: int
    rrn: str


def record_authorisation(
    session: Session,
    swipe: Swipe,
    kind: AuthorisationKind,
    *,
    card_number: str | None,
    requested_amount_fen: int | None,
    response_code: str,
    original_id: int | None = None,
    exception: str | None = None,
) -> Recorded:
    """Record an answer that moved no points: a decline (state `declined`), a balance
    inquiry, or a reversal for a closed batch (`exception` names the reconciliation case).
    Approved redemptions, voids, refunds and reversals are recorded by their operations."""
    terminal = session.get(Terminal, swipe.terminal_id)
    if terminal is None:
        raise LookupError(f"terminal {swipe.terminal_id} is not known")
    approved = response_code in APPROVED_CODES
    authorisation = Authorisation(
        rrn=next_rrn(session, swipe.when.at),
        kind=kind,
        terminal_id=terminal.id,
        merchant_id=swipe.merchant_id,
        batch_number=swipe.batch_number,
        trace=swipe.trace,
        card_number=card_number,
        requested_amount_fen=requested_amount_fen,
        amount_fen=0,
        discount_bp=0,
        settled_fen=0,
        points=0,
        fee_bp=0,
        response_code=response_code,
        local_time=swipe.when.at,
        business_date=swipe.when.business_date,
        original_id=original_id,
        state=AuthorisationState.APPROVED if approved else AuthorisationState.DECLINED,
        refunded_fen=0,
        points_returned=0,
        fen_clawed=0,
        exception=exception,
    )
    session.add(authorisation)
    session.flush()
    return Recorded(authorisation.id, authorisation.rrn)


def find_by_rrn(session: Session, rrn: str) -> Authorisation | None:
    """The authorisation a void or refund names by its RRN (field 37)."""
    return session.scalars(select(Authorisation).where(Authorisation.rrn == rrn)).one_or_none()


def find_reversal_original(
    session: Session, terminal_id: str, batch_number: int, trace: int
) -> Authorisation | None:
    """The redemption or void a reversal names: same terminal, batch (60.2) and trace."""
    query = select(Authorisation).where(
        Authorisation.terminal_id == terminal_id,
        Authorisation.batch_number == batch_number,
        Authorisation.trace == trace,
        Authorisation.kind.in_([AuthorisationKind.REDEMPTION, AuthorisationKind.VOID]),
    )
    return session.scalars(query.order_by(Authorisation.id.desc())).first()


def reversal_original_card(
    session: Session, terminal_id: str, batch_number: int, trace: int
) -> str | None:
    """The card of the original `find_reversal_original` finds, read without loading it."""
    query = select(Authorisation.card_number).where(
        Authorisation.terminal_id == terminal_id,
        Authorisation.batch_number == batch_number,
        Authorisation.trace == trace,
        Authorisation.kind.in_([AuthorisationKind.REDEMPTION, AuthorisationKind.VOID]),
    )
    return session.scalars(query.order_by(Authorisation.id.desc()).limit(1)).first()


def remember_reversal(session: Session, swipe: Swipe, amount_fen: int) -> ReversalTombstone:
    """A reversal whose original is unknown: remembered, so the original gets `94` later."""
    tombstone = ReversalTombstone(
        terminal_id=swipe.terminal_id,
        batch_number=swipe.batch_number,
        trace=swipe.trace,
        amount_fen=amount_fen,
        received_at=swipe.when.at,
    )
    session.add(tombstone)
    session.flush()
    return tombstone


def find_tombstone(
    session: Session, terminal_id: str, batch_number: int, trace: int
) -> ReversalTombstone | None:
    query = select(ReversalTombstone).where(
        ReversalTombstone.terminal_id == terminal_id,
        ReversalTombstone.batch_number == batch_number,
        ReversalTombstone.trace == trace,
    )
    return session.scalars(query).one_or_none()


# --- the request log (idempotency) ----------------------------------------------------------


@dataclass(frozen=True)
class RequestIdentity:
    """What identifies a request for idempotency: terminal + batch + trace + class."""

    terminal_id: str
    batch_number: int
    trace: int
    request_class: RequestClass


def find_request(session: Session, identity: RequestIdentity) -> LoggedRequest | None:
    """The logged request with this identity; compare its `digest` to decide between the
    stored answer (same request) and `94` (a different one)."""
    query = select(LoggedRequest).where(
        LoggedRequest.terminal_id == identity.terminal_id,
        LoggedRequest.batch_number == identity.batch_number,
        LoggedRequest.trace == identity.trace,
        LoggedRequest.request_class == identity.request_class,
    )
    return session.scalars(query).one_or_none()


def log_request(
    session: Session,
    identity: RequestIdentity,
    digest: bytes,
    answer: dict[str, str],
    at: datetime,
) -> LoggedRequest:
    """Log a request with the answer it got (field number -> value, as the caller encodes
    it); the identity is unique in the database, so a race to log it twice fails the commit."""
    logged = LoggedRequest(
        terminal_id=identity.terminal_id,
        batch_number=identity.batch_number,
        trace=identity.trace,
        request_class=identity.request_class,
        digest=digest,
        answer=dict(answer),
        recorded_at=at,
    )
    session.add(logged)
    session.flush()
    return logged


# --- batches ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchTotals:
    """Field 48's figures for one side of a batch (pos-8583.md §4.7)."""

    debit_fen: int
    debit_count: int
    credit_fen: int
    credit_count: int


def open_batch(session: Session, terminal_id: str) -> TerminalBatch:
    """The terminal's open batch."""
    query = select(TerminalBatch).where(
        TerminalBatch.terminal_id == terminal_id, TerminalBatch.closed_at.is_(None)
    )
    return session.scalars(query.order_by(TerminalBatch.id.desc())).one()


def latest_batch(session: Session, terminal_id: str, batch_number: int) -> TerminalBatch | None:
    """The most recent batch of a terminal with that number."""
    query = select(TerminalBatch).where(
        TerminalBatch.terminal_id == terminal_id, TerminalBatch.batch_number == batch_number
    )
    return session.scalars(query.order_by(TerminalBatch.id.desc())).first()


def gateway_totals(session: Session, terminal_id: str, batch_number: int) -> BatchTotals:
    """The gateway's totals: debits are the batch's redemptions answered `00`/`10` (voided
    ones included, reversed ones not); credits its approved voids and its refunds."""
    in_batch = (
        Authorisation.terminal_id == terminal_id,
        Authorisation.batch_number == batch_number,
        Authorisation.response_code.in_(APPROVED_CODES),
        Authorisation.state != AuthorisationState.REVERSED,
    )
    is_debit = Authorisation.kind == AuthorisationKind.REDEMPTION
    is_credit = Authorisation.kind.in_([AuthorisationKind.VOID, AuthorisationKind.REFUND])
    debit = case((is_debit, Authorisation.amount_fen), else_=0)
    credit = case((is_credit, Authorisation.amount_fen), else_=0)
    query = select(
        sum_of(debit),
        sum_of(case((is_debit, 1), else_=0)),
        sum_of(credit),
        sum_of(case((is_credit, 1), else_=0)),
    ).where(*in_batch)
    row = session.execute(query).one()
    return BatchTotals(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


@dataclass(frozen=True)
class ClosedBatch:
    batch_id: int
    result: BatchResult
    gateway: BatchTotals
    next_batch_number: int


def close_batch(
    session: Session,
    terminal_id: str,
    terminal_totals: BatchTotals,
    answer: dict[str, str],
    at: datetime,
) -> ClosedBatch:
    """Settle the terminal's open batch (0500): keep both sides' totals and the 0510 answer,
    close it whatever the result, and open the next (after 999999 comes 000001).

    The terminal's row is locked FOR NO KEY UPDATE (PostgreSQL): only a column that no key
    holds changes. A full FOR UPDATE would conflict with the KEY SHARE lock every row naming
    the terminal takes through its foreign key, and two groups settling each other's
    terminals after writing for them deadlocked."""
    terminal = session.get(Terminal, terminal_id, with_for_update={"key_share": True})
    if terminal is None:
        raise LookupError(f"terminal {terminal_id} is not known")
    batch = open_batch(session, terminal_id)
    ours = gateway_totals(session, terminal_id, batch.batch_number)
    result = BatchResult.BALANCED if ours == terminal_totals else BatchResult.UNBALANCED
    batch.closed_at = at
    batch.terminal_debit_fen = terminal_totals.debit_fen
    batch.terminal_debit_count = terminal_totals.debit_count
    batch.terminal_credit_fen = terminal_totals.credit_fen
    batch.terminal_credit_count = terminal_totals.credit_count
    batch.gateway_debit_fen = ours.debit_fen
    batch.gateway_debit_count = ours.debit_count
    batch.gateway_credit_fen = ours.credit_fen
    batch.gateway_credit_count = ours.credit_count
    batch.result = result
    batch.answer = dict(answer)
    following = 1 if batch.batch_number == LAST_BATCH_NUMBER else batch.batch_number + 1
    terminal.open_batch_number = following
    session.add(TerminalBatch(terminal_id=terminal_id, batch_number=following, opened_at=at))
    session.flush()
    return ClosedBatch(batch.id, result, ours, following)


@dataclass(frozen=True)
class UploadLine:
    """One record of a 0320 batch upload."""

    trace: int
    card_number: str
    amount_fen: int


def record_upload(
    session: Session, batch_id: int, lines: Sequence[UploadLine], at: datetime
) -> None:
    """Keep uploaded records as the terminal's view of a settled batch."""
    session.add_all(
        UploadedRecord(
            batch_id=batch_id,
            trace=line.trace,
            card_number=line.card_number,
            amount_fen=line.amount_fen,
            received_at=at,
        )
        for line in lines
    )
    session.flush()


def end_upload(session: Session, batch_id: int, total_records: int, at: datetime) -> None:
    """The end of a batch upload (0320 with 60.3 `202` or `207`) and the count it gave."""
    batch = session.get(TerminalBatch, batch_id, with_for_update=True)
    if batch is None:
        raise LookupError(f"no batch {batch_id}")
    batch.upload_ended_at = at
    batch.upload_total_records = total_records

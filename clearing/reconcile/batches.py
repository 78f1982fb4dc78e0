"""First way of three: what the terminals said against the gateway's journal, batch by batch.

Each batch a terminal settled in the month (0500, pos-8583.md §4.7) carries both sides'
totals: the terminal's and the gateway's at that moment. The pack shows every such batch,
balanced or not; an unbalanced one is an exception, and so is a batch whose gateway totals,
recomputed now from the authorisations, differ from those stored when it closed (the journal
changed under a settled batch). Where the terminal uploaded its records (0320), they are
matched with the journal's by trace: records on one side only, or with another amount or
card, are exceptions. Batches still open that hold the month's transactions are listed too,
so that nothing in the month is left unexplained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from clearing.reconcile.findings import Finding, FindingList, masked
from gateway.ledger.models import (
    Authorisation,
    AuthorisationKind,
    AuthorisationState,
    BatchResult,
    TerminalBatch,
    UploadedRecord,
)
from gateway.ledger.records import BatchTotals, gateway_totals

APPROVED_CODES = ("00", "10")
COUNTED_KINDS = (AuthorisationKind.REDEMPTION, AuthorisationKind.VOID, AuthorisationKind.REFUND)


@dataclass(frozen=True)
class BatchLine:
    """One settled batch as the pack shows it."""

    terminal_id: str
    batch_number: int
    closed_at: datetime | None
    balanced: bool
    terminal: BatchTotals | None
    gateway: BatchTotals
    uploaded_records: int | None


def _totals(
    fen: int | None, count: int | None, credit: int | None, credits: int | None
) -> BatchTotals:
    return BatchTotals(fen or 0, count or 0, credit or 0, credits or 0)


def _describe(side: str, totals: BatchTotals) -> str:
    return (
        f"{side}: {totals.debit_count} debits {totals.debit_fen} fen, "
        f"{totals.credit_count} credits {totals.credit_fen} fen"
    )


def check_settled_batches(
    session: Session,
    begins: datetime,
    ends: datetime,
    batches: FindingList,
    uploads: FindingList,
) -> list[BatchLine]:
    """Every batch closed in [begins, ends): both sides' totals, and its upload if any."""
    query = (
        select(TerminalBatch)
        .where(TerminalBatch.closed_at >= begins, TerminalBatch.closed_at < ends)
        .order_by(TerminalBatch.terminal_id, TerminalBatch.closed_at, TerminalBatch.id)
    )
    return [_check_batch(session, batch, batches, uploads) for batch in session.scalars(query)]


def _check_batch(
    session: Session, batch: TerminalBatch, batches: FindingList, uploads: FindingList
) -> BatchLine:
    terminal = _totals(
        batch.terminal_debit_fen,
        batch.terminal_debit_count,
        batch.terminal_credit_fen,
        batch.terminal_credit_count,
    )
    stored = _totals(
        batch.gateway_debit_fen,
        batch.gateway_debit_count,
        batch.gateway_credit_fen,
        batch.gateway_credit_count,
    )
    now = gateway_totals(session, batch.terminal_id, batch.batch_number)
    balanced = batch.result is BatchResult.BALANCED and terminal == stored
    if not balanced:
        batches.add(
            Finding(
                "batch not balanced",
                terminal=batch.terminal_id,
                batch=batch.batch_number,
                first_fen=terminal.debit_fen - terminal.credit_fen,
                second_fen=stored.debit_fen - stored.credit_fen,
                detail=f"{_describe('terminal', terminal)}; {_describe('gateway', stored)}",
            )
        )
    if now != stored:
        batches.add(
            Finding(
                "journal changed after the batch was settled",
                terminal=batch.terminal_id,
                batch=batch.batch_number,
                first_fen=stored.debit_fen - stored.credit_fen,
                second_fen=now.debit_fen - now.credit_fen,
                detail=f"{_describe('at settlement', stored)}; {_describe('now', now)}",
            )
        )
    uploaded = _check_upload(session, batch, uploads)
    return BatchLine(
        batch.terminal_id, batch.batch_number, batch.closed_at, balanced, terminal, stored, uploaded
    )


@dataclass(frozen=True)
class _JournalRecord:
    kind: AuthorisationKind
    rrn: str
    card_number: str | None
    amount_fen: int


def _journal_records(
    session: Session, terminal_id: str, batch_number: int
) -> dict[int, _JournalRecord]:
    """The batch's authorisations that count in its totals, by trace (at most 1998)."""
    query = select(
        Authorisation.trace,
        Authorisation.kind,
        Authorisation.rrn,
        Authorisation.card_number,
        Authorisation.amount_fen,
    ).where(
        Authorisation.terminal_id == terminal_id,
        Authorisation.batch_number == batch_number,
        Authorisation.kind.in_(COUNTED_KINDS),
        Authorisation.response_code.in_(APPROVED_CODES),
        Authorisation.state != AuthorisationState.REVERSED,
    )
    return {
        trace: _JournalRecord(kind, rrn, card, amount)
        for trace, kind, rrn, card, amount in session.execute(query)
    }


def _same_card(uploaded: str, journal: str | None) -> bool:
    return journal is not None and uploaded.lstrip("0") == journal.lstrip("0")


def _check_upload(session: Session, batch: TerminalBatch, uploads: FindingList) -> int | None:
    """Match a batch's uploaded records with the journal by trace; None without an upload."""
    records = list(
        session.scalars(
            select(UploadedRecord)
            .where(UploadedRecord.batch_id == batch.id)
            .order_by(UploadedRecord.trace, UploadedRecord.id)
        )
    )
    if not records and batch.upload_ended_at is None:
        return None

    def found(problem: str, **fields: Any) -> None:
        uploads.add(
            Finding(problem, terminal=batch.terminal_id, batch=batch.batch_number, **fields)
        )

    journal = _journal_records(session, batch.terminal_id, batch.batch_number)
    seen: set[int] = set()
    for record in records:
        if record.trace in seen:
            found("uploaded twice", trace=record.trace, card=masked(record.card_number))
            continue
        seen.add(record.trace)
        _match_record(record, journal.get(record.trace), found)
    for trace, ours in sorted(journal.items()):
        if trace not in seen:
            found(
                "in the journal, not uploaded by the terminal",
                trace=trace,
                card=masked(ours.card_number),
                rrn=ours.rrn,
                second_fen=ours.amount_fen,
                detail=ours.kind.value,
            )
    declared = batch.upload_total_records
    if declared is not None and declared != len(records):
        found(
            "end of upload counts another number of records",
            detail=f"declared {declared}, received {len(records)}",
        )
    return len(records)


def _match_record(
    record: UploadedRecord, ours: _JournalRecord | None, found: Callable[..., None]
) -> None:
    card = masked(record.card_number)
    if ours is None:
        found(
            "uploaded by the terminal, not in the journal",
            trace=record.trace,
            card=card,
            first_fen=record.amount_fen,
        )
    elif record.amount_fen != ours.amount_fen or not _same_card(
        record.card_number, ours.card_number
    ):
        found(
            "uploaded with another amount or card",
            trace=record.trace,
            card=card,
            rrn=ours.rrn,
            first_fen=record.amount_fen,
            second_fen=ours.amount_fen,
            detail=f"journal: {ours.kind.value} of card {masked(ours.card_number)}",
        )


@dataclass(frozen=True)
class OpenBatchLine:
    terminal_id: str
    batch_number: int
    transactions: int
    first_business_date: date


def open_batches(session: Session, first: date, last: date) -> list[OpenBatchLine]:
    """Batches still open that hold approved transactions of the month's business dates."""
    query = (
        select(
            Authorisation.terminal_id,
            Authorisation.batch_number,
            func.count(),
            func.min(Authorisation.business_date),
        )
        .join(
            TerminalBatch,
            (TerminalBatch.terminal_id == Authorisation.terminal_id)
            & (TerminalBatch.batch_number == Authorisation.batch_number)
            & TerminalBatch.closed_at.is_(None),
        )
        .where(
            Authorisation.business_date >= first,
            Authorisation.business_date <= last,
            Authorisation.kind.in_(COUNTED_KINDS),
            Authorisation.response_code.in_(APPROVED_CODES),
        )
        .group_by(Authorisation.terminal_id, Authorisation.batch_number)
        .order_by(Authorisation.terminal_id, Authorisation.batch_number)
    )
    return [OpenBatchLine(*row) for row in session.execute(query)]

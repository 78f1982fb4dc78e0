"""Writing a closed month's settlement file (points-and-clearing.md §6) in one streaming pass.

The header, then every detail as the cursor yields it, then one merchant record per merchant
with entries, then the trailer with the SHA-256 of every byte before it. Totals are kept as
the details go by, per merchant (a merchant's count is bounded by the config, a month's
entries are not), and the file goes to a hidden partial name first, so a crash never leaves a
half file under the real name. Whatever else wants the details (the merchants' statements)
gets them from the same pass through a `DetailSink`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from clearing.entries import details
from clearing.layout import (
    SEQUENCE,
    Detail,
    Header,
    MerchantRecord,
    Trailer,
    format_detail,
    format_header,
    format_merchant,
    format_trailer,
)
from clearing.models import ClosedMonth, ClosedMonthMerchant
from clearing.money import Totals

# Lines gathered before one write and one hash update: a few hundred kilobytes.
LINES_PER_WRITE = 2000


class DetailSink(Protocol):
    """Something else written from the same pass over the details."""

    def detail(self, detail: Detail, record: str) -> None: ...

    def merchant(self, record: MerchantRecord, totals: Totals) -> None: ...


@dataclass
class WrittenFile:
    """A settlement file as written: where, its whole-file SHA-256 and its figures."""

    path: Path
    sha256: str
    trailer: Trailer
    totals: Totals
    merchants: dict[str, Totals] = field(default_factory=dict)


class _Lines:
    """Buffers records and feeds the trailer's hash and the whole file's hash as it writes."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.before_trailer = hashlib.sha256()
        self.whole = hashlib.sha256()
        self.pending: list[str] = []

    def add(self, record: str) -> None:
        self.pending.append(record)
        if len(self.pending) >= LINES_PER_WRITE:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        chunk = ("\n".join(self.pending) + "\n").encode("ascii")
        self.pending.clear()
        self.file.write(chunk)
        self.before_trailer.update(chunk)
        self.whole.update(chunk)

    def finish(self, trailer_record: str) -> None:
        self.flush()
        chunk = (trailer_record + "\n").encode("ascii")
        self.file.write(chunk)
        self.whole.update(chunk)


def partial_path(path: Path) -> Path:
    """Where a file is written before it is complete (hidden, beside its real name)."""
    return path.with_name(f".{path.name}.partial")


def write_settlement(
    session: Session, closed: ClosedMonth, path: Path, sinks: Iterable[DetailSink] = ()
) -> WrittenFile:
    """Write a closed month's file to `partial_path(path)` (the caller moves it into place)."""
    header = Header(
        sender_id=closed.sender_id,
        receiver_id=closed.receiver_id,
        month=closed.month.replace("-", ""),
        sequence=SEQUENCE,
        created=closed.closed_at,
    )
    query = select(ClosedMonthMerchant.merchant_id, ClosedMonthMerchant.fee_bp).where(
        ClosedMonthMerchant.month == closed.month
    )
    fee_rates = {merchant_id: fee_bp for merchant_id, fee_bp in session.execute(query)}
    entries = details(session, closed.month)
    return write_file(partial_path(path), header, entries, fee_rates, sinks=sinks, final_path=path)


def write_file(
    target: Path,
    header: Header,
    entries: Iterable[Detail],
    fee_rates: Mapping[str, int],
    *,
    sinks: Iterable[DetailSink] = (),
    final_path: Path | None = None,
) -> WrittenFile:
    """Write a settlement file to `target` from details in §6's order (any iterable: the
    database cursor, or a list in the tests); `fee_rates` are the merchants' rates at the
    close, for the merchant records."""
    sinks = tuple(sinks)
    per_merchant: dict[str, Totals] = {}
    with target.open("wb") as file:
        lines = _Lines(file)
        lines.add(format_header(header))
        for detail in entries:
            record = format_detail(detail)
            lines.add(record)
            totals = per_merchant.get(detail.merchant_id)
            if totals is None:
                totals = per_merchant[detail.merchant_id] = Totals()
            totals.add_detail(detail)
            for sink in sinks:
                sink.detail(detail, record)
        month_totals = _merchant_records(per_merchant, fee_rates, lines, sinks)
        lines.flush()
        trailer = Trailer(
            detail_count=month_totals.count,
            merchant_count=len(per_merchant),
            settled_fen=month_totals.settled_fen,
            fees_fen=month_totals.fees_fen,
            net_fen=month_totals.net_fen,
            sha256=lines.before_trailer.hexdigest(),
        )
        lines.finish(format_trailer(trailer))
    path = final_path or target
    return WrittenFile(path, lines.whole.hexdigest(), trailer, month_totals, per_merchant)


def _merchant_records(
    per_merchant: dict[str, Totals],
    fee_rates: Mapping[str, int],
    lines: _Lines,
    sinks: tuple[DetailSink, ...],
) -> Totals:
    """One merchant record per merchant with entries, by merchant id; the month's totals."""
    month_totals = Totals()
    for merchant_id in sorted(per_merchant):
        totals = per_merchant[merchant_id]
        record = MerchantRecord(
            merchant_id=merchant_id,
            redemption_count=totals.redemption_count,
            redemptions_fen=totals.redemptions_fen,
            other_count=totals.other_count,
            others_fen=totals.others_fen,
            fees_fen=totals.fees_fen,
            net_fen=totals.net_fen,
            fee_bp=fee_rates[merchant_id],
        )
        lines.add(format_merchant(record))
        for sink in sinks:
            sink.merchant(record, totals)
        month_totals.merge(totals)
    return month_totals

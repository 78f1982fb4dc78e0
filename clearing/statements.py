"""The month's statements (points-and-clearing.md §7): one for the operator, one per merchant.

The operator statement is what the operator owes the network and why: gross redemptions,
refunds and corrections, net consumption, the fees the network keeps, the terminal usage
fees, the total due and the rounding gain. A merchant's statement lists its entries as the
settlement file does (card numbers masked) and ends with its totals, the same figures as its
merchant record. Both are CSV, figures in integer fen and points with the unit in the name.

The merchant statements are written in the settlement file's one pass over the details (the
details arrive grouped by merchant, so one statement file is open at a time).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from clearing.layout import Detail, MerchantRecord
from clearing.models import ClosedMonth
from clearing.money import REDEMPTION, REFUND, REVERSAL, VOID, Totals
from gateway.clock import SHANGHAI

MERCHANT_COLUMNS = (
    "merchant_id",
    "sequence",
    "business_date",
    "local_time",
    "terminal_id",
    "batch",
    "trace",
    "type",
    "rrn",
    "card",
    "list_amount_fen",
    "discount_bp",
    "settled_fen",
    "points",
    "fee_fen",
    "net_fen",
    "original_rrn",
)
TOTAL_ROW = "total"


def operator_statement_name(month_compact: str) -> str:
    return f"operator_statement_{month_compact}.csv"


def merchant_statement_name(month_compact: str, merchant_id: str) -> str:
    return f"merchant_statement_{month_compact}_{merchant_id}.csv"


@dataclass(frozen=True)
class OperatorFigures:
    """The operator statement's figures, from the month's totals and its terminal fees."""

    totals: Totals
    terminal_count: int
    terminal_fee_fen: int

    @property
    def terminal_fees_fen(self) -> int:
        return self.terminal_count * self.terminal_fee_fen

    @property
    def total_due_fen(self) -> int:
        """What the operator owes the network: the signed settled amounts plus terminal fees."""
        return self.totals.settled_fen + self.terminal_fees_fen

    def rows(self) -> list[tuple[str, int]]:
        totals = self.totals
        return [
            ("redemption_count", totals.count_of(REDEMPTION)),
            ("gross_redemptions_fen", totals.settled_of(REDEMPTION)),
            ("refund_count", totals.count_of(REFUND)),
            ("refunds_fen", totals.settled_of(REFUND)),
            ("closed_month_void_count", totals.count_of(VOID)),
            ("closed_month_voids_fen", totals.settled_of(VOID)),
            ("closed_month_reversal_count", totals.count_of(REVERSAL)),
            ("closed_month_reversals_fen", totals.settled_of(REVERSAL)),
            ("net_consumption_fen", totals.settled_fen),
            ("fees_kept_by_network_fen", totals.fees_fen),
            ("net_paid_to_merchants_fen", totals.net_fen),
            ("terminal_count", self.terminal_count),
            ("terminal_fee_fen_per_month", self.terminal_fee_fen),
            ("terminal_fees_fen", self.terminal_fees_fen),
            ("total_due_to_network_fen", self.total_due_fen),
            ("points_given_up", totals.points_given),
            ("points_returned", totals.points_returned),
            ("rounding_gain_fen", totals.rounding_gain_fen),
        ]


def write_operator_statement(
    path: Path, closed: ClosedMonth, figures: OperatorFigures, file_sha256: str
) -> None:
    with path.open("w", encoding="ascii", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(("figure", "value"))
        writer.writerow(("month", closed.month))
        writer.writerow(("sender_id", closed.sender_id))
        writer.writerow(("receiver_id", closed.receiver_id))
        writer.writerow(("closed_at", closed.closed_at.astimezone(SHANGHAI).isoformat()))
        writer.writerow(("settlement_file", closed.file_name))
        writer.writerow(("settlement_file_sha256", file_sha256))
        writer.writerows(figures.rows())


# A statement line; the fields are ids, digits and masked card numbers, none of which CSV
# would quote, so one template writes the line (a month can have a million).
_LINE = "%s,%d,%s,%s,%s,%06d,%06d,%s,%s,%s,%d,%d,%d,%d,%d,%d,%s\n"


def detail_line(detail: Detail, record: str) -> str:
    """A detail as a statement line; the local time is taken from the record as written."""
    d = detail
    stamp = record[40:54]
    return _LINE % (
        d.merchant_id,
        d.sequence,
        record[32:36] + "-" + record[36:38] + "-" + record[38:40],
        f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[8:10]}:{stamp[10:12]}:{stamp[12:]}",
        d.terminal_id,
        d.batch,
        d.trace,
        d.entry_type,
        d.rrn,
        d.card_masked,
        d.list_amount_fen,
        d.discount_bp,
        d.settled_fen,
        d.points,
        d.fee_fen,
        d.net_fen,
        d.original_rrn or "",
    )


class MerchantStatements:
    """A `DetailSink` writing one CSV per merchant into a folder."""

    def __init__(self, folder: Path, month_compact: str) -> None:
        self.folder = folder
        self.month_compact = month_compact
        self.written: list[Path] = []
        self._merchant: str | None = None
        self._file: IO[str] | None = None

    def path(self, merchant_id: str) -> Path:
        return self.folder / merchant_statement_name(self.month_compact, merchant_id)

    def _open(self, merchant_id: str, mode: str) -> IO[str]:
        self._close()
        path = self.path(merchant_id)
        file = self._file = path.open(mode, encoding="ascii", newline="")
        if mode == "w":
            file.write(",".join(MERCHANT_COLUMNS) + "\n")
            self.written.append(path)
        self._merchant = merchant_id
        return file

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._merchant = None

    def detail(self, detail: Detail, record: str) -> None:
        file = self._file
        if file is None or detail.merchant_id != self._merchant:
            file = self._open(detail.merchant_id, "w")
        file.write(detail_line(detail, record))

    def merchant(self, record: MerchantRecord, totals: Totals) -> None:
        self._open(record.merchant_id, "a").write(total_line(record.merchant_id, totals))
        self._close()

    def finish(self, merchant_ids: Iterable[str]) -> None:
        """Statements of nothing for merchants without entries this month."""
        self._close()
        for merchant_id in merchant_ids:
            if self.path(merchant_id) not in self.written:
                self._open(merchant_id, "w").write(total_line(merchant_id, Totals()))
                self._close()


def total_line(merchant_id: str, totals: Totals) -> str:
    """A statement's last line: `total` for the sequence, the entry count in the type
    column, the totals in the money columns (points: given up minus returned)."""
    points = totals.points_given - totals.points_returned
    return (
        f"{merchant_id},{TOTAL_ROW},,,,,,{totals.count} entries,,,,,"
        f"{totals.settled_fen},{points},{totals.fees_fen},{totals.net_fen},\n"
    )

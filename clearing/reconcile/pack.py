"""What one reconciliation pack found: the figures its page shows and the lists it counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from clearing.models import ClosedMonth
from clearing.period import Month
from clearing.reconcile.batches import BatchLine, OpenBatchLine
from clearing.reconcile.findings import Finding, FindingList
from clearing.reconcile.journal_file import DailyVolume, FileCheck
from clearing.reconcile.points import PointsBalance, PointsRollForward
from clearing.reconcile.rules import FeeCheck
from clearing.statements import OperatorFigures

LISTS = (
    ("batches", "Terminal batches against the journal", "terminal_fen", "gateway_fen"),
    ("uploads", "Uploaded records against the journal", "terminal_fen", "gateway_fen"),
    ("settlement", "The journal against the settlement file", "ledger_fen", "file_fen"),
    ("points", "Points against money, and the ledger invariants", "first_fen", "second_fen"),
    ("fees", "Fee rules", "first_fen", "second_fen"),
    (
        "protocol",
        "Reversals of closed batches and voids that stand",
        "requested_fen",
        "original_fen",
    ),
)


@dataclass
class Pack:
    """Everything the page shows and the verdict counts."""

    month: Month
    out: Path
    generated_at: datetime
    closed: ClosedMonth
    lists: dict[str, FindingList]
    batches: list[BatchLine] = field(default_factory=list)
    open_batches: list[OpenBatchLine] = field(default_factory=list)
    file_check: FileCheck | None = None
    waiting: list[Finding] = field(default_factory=list)
    points: PointsBalance | None = None
    roll_forward: PointsRollForward | None = None
    fees: FeeCheck | None = None
    figures: OperatorFigures | None = None
    daily: list[DailyVolume] = field(default_factory=list)
    page: Path | None = None

    @property
    def exception_count(self) -> int:
        return sum(findings.count for findings in self.lists.values())

    @property
    def verdict(self) -> str:
        count = self.exception_count
        return "RECONCILED" if count == 0 else f"EXCEPTIONS: {count}"

    def summary_lines(self) -> list[str]:
        lines = [f"reconcile {self.month.key}: {self.page}"]
        for findings in self.lists.values():
            noun = "exception" if findings.count == 1 else "exceptions"
            lines.append(f"  {findings.title}: {findings.count} {noun} ({findings.path.name})")
        return lines

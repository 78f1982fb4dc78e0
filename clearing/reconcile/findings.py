"""Exception lists of the reconciliation pack: each one a CSV written as findings arrive.

An auditor needs every exception, and each must say where to look: terminal, batch, trace,
the card (masked, first 6 and last 4) and the amounts on both sides. A month can in principle
produce many (a ledger that disagrees with its file everywhere), so a list writes each row to
its CSV at once and keeps only the first rows in memory for the HTML page; its count is
always exact.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from cardcodec.cards import mask_card_number

if TYPE_CHECKING:
    import _csv

ROWS_SHOWN = 200


@dataclass(frozen=True)
class Finding:
    """One exception: where it is and what disagrees."""

    problem: str
    terminal: str = ""
    batch: int | None = None
    trace: int | None = None
    card: str = ""  # masked
    rrn: str = ""
    first_fen: int | None = None
    second_fen: int | None = None
    detail: str = ""

    def cells(self) -> tuple[str, ...]:
        return (
            self.problem,
            self.terminal,
            "" if self.batch is None else f"{self.batch:06d}",
            "" if self.trace is None else f"{self.trace:06d}",
            self.card,
            self.rrn,
            "" if self.first_fen is None else str(self.first_fen),
            "" if self.second_fen is None else str(self.second_fen),
            self.detail,
        )


def masked(card_number: str | None) -> str:
    """A card number as the pack shows it: first 6 and last 4 (an upload's zero fill off)."""
    if not card_number:
        return ""
    digits = card_number.lstrip("0") if len(card_number) > 19 else card_number
    return mask_card_number(digits)


@dataclass
class FindingList:
    """One list of exceptions, with what its two amount columns mean."""

    name: str
    title: str
    first_label: str
    second_label: str
    folder: Path
    shown: list[Finding] = field(default_factory=list)
    count: int = 0
    _file: IO[str] | None = None
    _writer: _csv.Writer | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return (
            "problem",
            "terminal",
            "batch",
            "trace",
            "card",
            "rrn",
            self.first_label,
            self.second_label,
            "detail",
        )

    @property
    def path(self) -> Path:
        return self.folder / f"exceptions_{self.name}.csv"

    def _opened(self) -> _csv.Writer:
        """The CSV writer, the file made (with its header) on first use."""
        if self._writer is None:
            self._file = self.path.open("w", encoding="utf-8", newline="")
            self._writer = csv.writer(self._file, lineterminator="\n")
            self._writer.writerow(self.columns)
        return self._writer

    def add(self, finding: Finding) -> None:
        self._opened().writerow(finding.cells())
        self.count += 1
        if len(self.shown) < ROWS_SHOWN:
            self.shown.append(finding)

    def close(self) -> None:
        """Finish the CSV (a list without exceptions still gets its header line)."""
        self._opened()
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None

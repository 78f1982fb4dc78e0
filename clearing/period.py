"""The clearing period: one calendar month of business dates, and the instants that bound it.

Clearing settles business dates, not calendar days (points-and-clearing.md §4-§5): with a
23:00 cut-off, 31 January 23:30 local belongs to 1 February, so January's last business date
ends at 31 January 23:00 and only then may January be cleared. Which terminals were enabled
"at any moment of the month" is asked over the same span of instants. The arithmetic lives
here so that `clear`, `reconcile` and the tests cannot disagree about where a month begins.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo

from gateway.errors import BadInput

_MONTH_RE = re.compile(r"([0-9]{4})-([0-9]{2})")
MIDNIGHT = time(0, 0)
FIRST_YEAR, LAST_YEAR = 1970, 9998  # the months `--month` names


@dataclass(frozen=True, order=True)
class Month:
    """A calendar month, named `YYYY-MM` on the command line and `YYYYMM` in the file."""

    year: int
    month: int

    def __post_init__(self) -> None:
        if not (1 <= self.month <= 12 and 1 <= self.year <= 9999):
            raise ValueError(f"no month {self.year:04d}-{self.month:02d}")

    @classmethod
    def parse(cls, text: str, option: str = "--month") -> Month:
        """`YYYY-MM`, or `BadInput` naming the option."""
        match = _MONTH_RE.fullmatch(text)
        if match is None or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1:
            raise BadInput(f"{option}: {text[:20]!r} is not a month YYYY-MM")
        if not FIRST_YEAR <= int(match[1]) <= LAST_YEAR:
            # A month's business dates reach a day beyond it, which the calendar's ends lack.
            raise BadInput(f"{option}: {text} is outside {FIRST_YEAR}-01 to {LAST_YEAR}-12")
        return cls(int(match[1]), int(match[2]))

    @property
    def key(self) -> str:
        """`YYYY-MM`: how the ledger names a closed month."""
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def compact(self) -> str:
        """`YYYYMM`: how the settlement file names it."""
        return f"{self.year:04d}{self.month:02d}"

    @property
    def first_date(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def last_date(self) -> date:
        return date(self.year, self.month, calendar.monthrange(self.year, self.month)[1])

    def contains(self, business_date: date) -> bool:
        return (business_date.year, business_date.month) == (self.year, self.month)


def business_date_begins(business_date: date, tz: tzinfo, cutoff: time) -> datetime:
    """The first instant of a business date: the cut-off of the day before (00:00 when the
    cut-off is midnight, the calendar date)."""
    if cutoff == MIDNIGHT:
        return datetime.combine(business_date, MIDNIGHT, tz)
    return datetime.combine(business_date - timedelta(days=1), cutoff, tz)


def month_begins(month: Month, tz: tzinfo, cutoff: time) -> datetime:
    """The first instant of the month's first business date."""
    return business_date_begins(month.first_date, tz, cutoff)


def month_ends(month: Month, tz: tzinfo, cutoff: time) -> datetime:
    """The instant the month's last business date ends (the next one begins)."""
    return business_date_begins(month.last_date + timedelta(days=1), tz, cutoff)


def refuse_unfinished(month: Month, now: datetime, tz: tzinfo, cutoff: time) -> None:
    """`BadInput` (exit 2) until the month's last business date has ended."""
    ends = month_ends(month, tz, cutoff)
    if now < ends:
        raise BadInput(
            f"--month {month.key}: the month is not over: its last business date "
            f"{month.last_date.isoformat()} ends at {ends.astimezone(tz).isoformat()}"
        )

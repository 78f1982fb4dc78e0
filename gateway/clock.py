"""The gateway's clock and the calendar rules that hang off it (points-and-clearing.md §3-§4).

Every decision that depends on time (business date, lot and card expiry, rule days and hours)
asks a `Clock` for the instant and then one of the pure functions below for the date. Keeping
the clock injectable lets tests and rehearsals (`vipgate serve --clock`) fix or shift time
without touching the system clock, and keeping the calendar rules here gives each one a single
owner.
"""

from __future__ import annotations

import calendar
import functools
import time as _time
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Protocol
from zoneinfo import ZoneInfo

SHANGHAI = ZoneInfo("Asia/Shanghai")

POINTS_YEAR_END_MONTH = 11
POINTS_YEAR_END_DAY = 30
MIDNIGHT = time(0, 0)


class Clock(Protocol):
    """Where the gateway reads the current instant."""

    def now(self) -> datetime:
        """The current instant, timezone-aware."""
        ...


def _require_aware(instant: datetime, name: str) -> None:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


class SystemClock:
    """The machine's clock, read in a given time zone."""

    def __init__(self, tz: tzinfo = SHANGHAI) -> None:
        self._tz = tz

    def now(self) -> datetime:
        return datetime.now(self._tz)


class StartedClock:
    """A clock that starts at a given instant and then runs forward in real time.

    It counts elapsed time on a monotonic source, so a change of the system clock while the
    gateway runs does not move it.
    """

    def __init__(self, start: datetime, monotonic: Callable[[], float] = _time.monotonic) -> None:
        _require_aware(start, "start")
        self._start = start
        self._monotonic = monotonic
        self._started_at = monotonic()

    def now(self) -> datetime:
        elapsed = self._monotonic() - self._started_at
        return self._start + timedelta(seconds=elapsed)


class FixedClock:
    """A clock that stands still until told to move; for tests."""

    def __init__(self, instant: datetime) -> None:
        _require_aware(instant, "instant")
        self._instant = instant

    def now(self) -> datetime:
        return self._instant

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward (or back, with a negative delta)."""
        self._instant = self._instant + delta


def business_date(local: datetime, cutoff: time) -> date:
    """The business date of a local instant: at or after the cut-off it is the next date."""
    wall = local.time().replace(tzinfo=None)
    if cutoff != MIDNIGHT and wall >= cutoff:
        return local.date() + timedelta(days=1)
    return local.date()


def points_year_of(d: date) -> int:
    """The points year (1 December - 30 November) of a date, named by the year it ends in."""
    return d.year + 1 if d.month == 12 else d.year


def _points_year_end(points_year: int) -> date:
    return date(points_year, POINTS_YEAR_END_MONTH, POINTS_YEAR_END_DAY)


def lot_expires_on(earned_on: date, expiry_years: int) -> date:
    """The last day of a lot: 30 November of the points year `expiry_years` after its own."""
    if expiry_years < 0:
        raise ValueError("expiry_years must not be negative")
    return _points_year_end(points_year_of(earned_on) + expiry_years)


def current_year_expires_on(local_date: date) -> date:
    """The last day of the points year a date belongs to (for points returned to expired lots)."""
    return _points_year_end(points_year_of(local_date))


def lot_expired(expires_on: date, local: datetime) -> bool:
    """Whether a lot is expired at a local instant: it lives until 23:59:59 of its last day."""
    return local.date() > expires_on


@functools.lru_cache(maxsize=1200)  # every YYMM of 2000-2099; asked for every card request
def expiry_last_day(expiry_yymm: str) -> date:
    """The last day of a card's expiry month, given as YYMM (years 2000-2099)."""
    if len(expiry_yymm) != 4 or not expiry_yymm.isascii() or not expiry_yymm.isdigit():
        raise ValueError("expiry must be four digits YYMM")
    year = 2000 + int(expiry_yymm[:2])
    month = int(expiry_yymm[2:])
    if not 1 <= month <= 12:
        raise ValueError("expiry month must be 01-12")
    return date(year, month, calendar.monthrange(year, month)[1])


def card_expired(expiry_yymm: str, local: datetime) -> bool:
    """Whether a card is expired at a local instant: it is good through the last day of YYMM."""
    return local.date() > expiry_last_day(expiry_yymm)

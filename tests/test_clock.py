"""Clocks, the business date and the calendar rules of points-and-clearing.md §3-§4."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.clock import (
    SHANGHAI,
    FixedClock,
    StartedClock,
    SystemClock,
    business_date,
    card_expired,
    current_year_expires_on,
    expiry_last_day,
    lot_expired,
    lot_expires_on,
    points_year_of,
)

CUTOFF = time(23, 0)


def local(*fields: int) -> datetime:
    """A Shanghai wall-clock instant from datetime's positional fields."""
    return datetime(*fields).replace(tzinfo=SHANGHAI)  # type: ignore[arg-type]


# --- clocks -------------------------------------------------------------------------------


def test_system_clock_is_aware_in_its_zone() -> None:
    """SystemClock reads the machine's time in the zone it was given."""
    now = SystemClock(SHANGHAI).now()
    assert now.tzinfo is SHANGHAI
    assert now.utcoffset() == timedelta(hours=8)


def test_started_clock_starts_at_its_instant_and_runs_forward() -> None:
    """StartedClock reports its start, then start plus the monotonic time elapsed since."""
    ticks = iter([100.0, 100.0, 161.5])
    clock = StartedClock(local(2026, 3, 1, 12, 0), monotonic=lambda: next(ticks))
    assert clock.now() == local(2026, 3, 1, 12, 0)
    assert clock.now() == local(2026, 3, 1, 12, 1, 1, 500000)


def test_started_clock_refuses_a_naive_start() -> None:
    """A start without a time zone is refused: local dates would be ambiguous."""
    with pytest.raises(ValueError, match="start"):
        StartedClock(datetime(2026, 3, 1, 12, 0))


def test_fixed_clock_stands_still_until_advanced() -> None:
    """FixedClock returns the same instant until advance() moves it."""
    clock = FixedClock(local(2026, 3, 1, 22, 59))
    assert clock.now() == clock.now() == local(2026, 3, 1, 22, 59)
    clock.advance(timedelta(minutes=2))
    assert clock.now() == local(2026, 3, 1, 23, 1)


def test_fixed_clock_refuses_a_naive_instant() -> None:
    """FixedClock refuses an instant without a time zone."""
    with pytest.raises(ValueError, match="instant"):
        FixedClock(datetime(2026, 3, 1))


# --- business date ------------------------------------------------------------------------


def test_business_date_before_cutoff_is_the_calendar_date() -> None:
    """One microsecond before the cut-off still belongs to the calendar date."""
    assert business_date(local(2026, 3, 1, 22, 59, 59, 999999), CUTOFF) == date(2026, 3, 1)


def test_business_date_at_cutoff_is_the_next_date() -> None:
    """At exactly the cut-off the business date moves to the next date."""
    assert business_date(local(2026, 3, 1, 23, 0), CUTOFF) == date(2026, 3, 2)


def test_business_date_after_cutoff_until_midnight_is_the_next_date() -> None:
    """The last instant before midnight belongs to the next date too."""
    assert business_date(local(2026, 3, 1, 23, 59, 59, 999999), CUTOFF) == date(2026, 3, 2)


def test_business_date_after_midnight_is_the_calendar_date() -> None:
    """Midnight and after belong to the calendar date (the next date already began at 23:00)."""
    assert business_date(local(2026, 3, 2, 0, 0), CUTOFF) == date(2026, 3, 2)


def test_business_date_crosses_the_year_and_month_at_cutoff() -> None:
    """31 December at the cut-off is 1 January of the next year."""
    assert business_date(local(2026, 12, 31, 23, 0), CUTOFF) == date(2027, 1, 1)
    assert business_date(local(2028, 2, 28, 23, 30), CUTOFF) == date(2028, 2, 29)


def test_business_date_with_midnight_cutoff_is_always_the_calendar_date() -> None:
    """A cut-off of 00:00 means the calendar date, at both ends of the day."""
    assert business_date(local(2026, 3, 1, 0, 0), time(0, 0)) == date(2026, 3, 1)
    assert business_date(local(2026, 3, 1, 23, 59, 59), time(0, 0)) == date(2026, 3, 1)


def test_business_date_with_an_early_evening_cutoff() -> None:
    """Any cut-off works the same way: 18:30 moves 18:30 onwards to the next date."""
    assert business_date(local(2026, 3, 1, 18, 29, 59), time(18, 30)) == date(2026, 3, 1)
    assert business_date(local(2026, 3, 1, 18, 30), time(18, 30)) == date(2026, 3, 2)


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 30)))
def test_business_date_is_the_date_or_the_next(naive: datetime) -> None:
    """The business date is always the local date or the day after it."""
    moment = naive.replace(tzinfo=SHANGHAI)
    result = business_date(moment, CUTOFF)
    assert result - moment.date() in (timedelta(0), timedelta(days=1))
    assert (result != moment.date()) == (moment.time() >= CUTOFF)


# --- points year and lots -----------------------------------------------------------------


def test_points_year_ends_on_30_november() -> None:
    """30 November belongs to the points year named by its own year."""
    assert points_year_of(date(2026, 11, 30)) == 2026


def test_points_year_starts_on_1_december() -> None:
    """1 December starts the points year named by the next calendar year."""
    assert points_year_of(date(2026, 12, 1)) == 2027
    assert points_year_of(date(2026, 12, 31)) == 2027
    assert points_year_of(date(2027, 1, 1)) == 2027


def test_lot_expiry_known_examples() -> None:
    """Earned 2026-03-01 expires 2027-11-30; earned 2026-12-05 expires 2028-11-30 (one year)."""
    assert lot_expires_on(date(2026, 3, 1), 1) == date(2027, 11, 30)
    assert lot_expires_on(date(2026, 12, 5), 1) == date(2028, 11, 30)


def test_lot_expiry_at_the_points_year_edges() -> None:
    """A lot earned on 30 November expires a year before one earned the next day."""
    assert lot_expires_on(date(2026, 11, 30), 1) == date(2027, 11, 30)
    assert lot_expires_on(date(2026, 12, 1), 1) == date(2028, 11, 30)


def test_lot_expiry_counts_the_configured_years() -> None:
    """expiry_years moves the expiry by whole points years."""
    assert lot_expires_on(date(2026, 3, 1), 3) == date(2029, 11, 30)


def test_lot_expiry_refuses_negative_years() -> None:
    """A negative number of years is a ValueError naming the argument."""
    with pytest.raises(ValueError, match="expiry_years"):
        lot_expires_on(date(2026, 3, 1), -1)


def test_current_year_expiry_at_the_edges() -> None:
    """Returned points of expired lots last until the end of the current points year."""
    assert current_year_expires_on(date(2026, 11, 30)) == date(2026, 11, 30)
    assert current_year_expires_on(date(2026, 12, 1)) == date(2027, 11, 30)
    assert current_year_expires_on(date(2027, 6, 15)) == date(2027, 11, 30)


def test_lot_lives_through_its_last_second() -> None:
    """A lot is still good at 23:59:59.999999 local on its expiry date."""
    assert not lot_expired(date(2027, 11, 30), local(2027, 11, 30, 23, 59, 59, 999999))


def test_lot_expires_at_midnight_after_its_last_day() -> None:
    """A lot is expired from 00:00 local on the day after its expiry date."""
    assert lot_expired(date(2027, 11, 30), local(2027, 12, 1, 0, 0))


def test_lot_expiry_reads_the_local_date_not_utc() -> None:
    """The local (Shanghai) date decides: 16:00 UTC on 30 Nov is already 1 Dec in Shanghai."""
    utc_instant = datetime(2027, 11, 30, 16, 0, tzinfo=UTC)
    assert lot_expired(date(2027, 11, 30), utc_instant.astimezone(SHANGHAI))


# --- card expiry --------------------------------------------------------------------------


def test_card_good_through_the_last_day_of_its_month() -> None:
    """A card expiring 2812 is good until 2028-12-31 23:59:59 local."""
    assert not card_expired("2812", local(2028, 12, 31, 23, 59, 59))
    assert card_expired("2812", local(2029, 1, 1, 0, 0))


def test_card_expiry_knows_leap_februaries() -> None:
    """2802 ends on 29 February 2028 (a leap year); 2702 on 28 February 2027."""
    assert not card_expired("2802", local(2028, 2, 29, 12, 0))
    assert card_expired("2802", local(2028, 3, 1, 0, 0))
    assert card_expired("2702", local(2027, 3, 1, 0, 0))
    assert expiry_last_day("2702") == date(2027, 2, 28)


@pytest.mark.parametrize("bad", ["2813", "2800", "28a1", "281", "28123", "", "２８１２"])
def test_card_expiry_refuses_a_malformed_yymm(bad: str) -> None:
    """An expiry that is not four ASCII digits with a month 01-12 is a ValueError."""
    with pytest.raises(ValueError, match="expiry"):
        card_expired(bad, local(2026, 1, 1))

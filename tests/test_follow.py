"""`gateway.follow.Switches` on its own: when it looks at the ledger, what it says when it
cannot, and what it follows when it can."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine
from structlog.testing import capture_logs

from gateway.clock import FixedClock
from gateway.follow import Switches
from gateway.ledger import make_engine, migrate, records, unit_of_work
from tests.conftest import MERCHANT_ID, START, TERMINAL_ID, merchant_details, terminal_details
from tests.gateway_harness import demo_config


def switches_for(engine: Engine, clock: FixedClock, tmp_path: Path) -> Switches:
    """The demo config's terminal and merchant under the ledger test ids, enabled and active."""
    config = demo_config(tmp_path, "sqlite://")
    terminal = next(t for t in config.terminals if t.id == TERMINAL_ID)
    merchant = next(m for m in config.merchants if m.id == MERCHANT_ID)
    return Switches(engine, clock, {TERMINAL_ID: terminal}, {MERCHANT_ID: merchant})


def test_a_ledger_that_cannot_be_read_is_said_once_and_followed_when_it_can(
    tmp_path: Path,
) -> None:
    """No ledger at all yet: the known switches stay, one warning for the whole spell, no
    look from a group whose sessions could not be read, and once the ledger is there, the
    next look follows it and says so."""
    folder = tmp_path / "ledger"
    engine = make_engine(f"sqlite:///{folder / 'ledger.db'}")
    clock = FixedClock(START)
    switches = switches_for(engine, clock, tmp_path)
    with capture_logs() as logs:
        for _ in range(3):
            terminals, _ = switches.current()
            assert terminals[TERMINAL_ID].enabled
            clock.advance(timedelta(seconds=2))
    assert [entry["event"] for entry in logs] == ["switches_not_read"]
    folder.mkdir()
    migrate(engine)
    with unit_of_work(engine) as session:
        records.upsert_merchant(session, merchant_details(active=False), START)
        records.upsert_terminal(session, terminal_details(enabled=False), START)
    with capture_logs() as logs:
        terminals, merchants = switches.current(reachable=False)  # no look
        assert terminals[TERMINAL_ID].enabled and merchants[MERCHANT_ID].active
        terminals, merchants = switches.current()
    assert not terminals[TERMINAL_ID].enabled and not merchants[MERCHANT_ID].active
    assert [entry["event"] for entry in logs] == [
        "switches_read_again",
        "terminal_enabled_followed",
        "merchant_active_followed",
    ]
    engine.dispose()


def test_the_ledger_is_looked_at_once_per_interval(tmp_path: Path, ledger_engine: Engine) -> None:
    """A change in the ledger is followed from the first look 2 s or more after the last one
    (the clock going back counts as due), not before."""
    with unit_of_work(ledger_engine) as session:
        records.upsert_merchant(session, merchant_details(), START)
        records.upsert_terminal(session, terminal_details(), START)
    clock = FixedClock(START)
    switches = switches_for(ledger_engine, clock, tmp_path)
    assert switches.current()[0][TERMINAL_ID].enabled
    with unit_of_work(ledger_engine) as session:
        records.upsert_terminal(session, terminal_details(enabled=False), START)
    clock.advance(timedelta(seconds=1.999))
    assert switches.current()[0][TERMINAL_ID].enabled
    clock.advance(timedelta(milliseconds=1))
    assert not switches.current()[0][TERMINAL_ID].enabled
    with unit_of_work(ledger_engine) as session:
        records.upsert_terminal(session, terminal_details(), START)
    clock.advance(timedelta(seconds=-1))  # set back: a look is due
    assert switches.current()[0][TERMINAL_ID].enabled

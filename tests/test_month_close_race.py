"""A month's close and the gateway's last requests of that month: every item is accounted for
by the close, or changes nothing (`96`), never left out of every file.

A group reads its instant once, before its transaction; just before the cut-off of a month's
last day it may then wait (for a lock, for the disk) while `clear` closes the month. Its items
would carry a business date of a closed month, which no later close takes."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import pytest

from clearing.clear import Cleared, clear
from clearing.layout import parse_detail
from clearing.period import Month
from gateway.clock import SHANGHAI
from gateway.errors import BadInput
from gateway.ledger import unit_of_work
from gateway.ledger.invariants import check_invariants
from gateway.ledger.models import Authorisation
from gateway.server import _refuse_clock_before_ledger
from tests.gateway_harness import DIAMOND, Harness, decided_and_held_open, demo_config
from tests.spec_terminal import parse

NOVEMBER = Month(2026, 11)


def shanghai(day: int, hour: int, minute: int, second: int, month: int = 11) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=SHANGHAI)


def settled_rrns(cleared: Cleared) -> list[str]:
    lines = cleared.settlement.path.read_text(encoding="ascii").splitlines()
    return [parse_detail(line, []).rrn for line in lines if line.startswith("D")]


def authorisations(harness: Harness) -> int:
    with unit_of_work(harness.engine) as session:
        return session.query(Authorisation).count()


def test_a_request_whose_month_closed_meanwhile_changes_nothing(
    tmp_path: Path, ledger_url: str
) -> None:
    """Prepared at 22:59:59 on 30 November (business date 30 November), decided after
    November was closed: `96` and nothing written. Sent again, it is December's."""
    harness = Harness(demo_config(tmp_path, ledger_url), start=shanghai(30, 22, 0, 0))
    terminal = harness.signed_on()
    harness.clock.advance(shanghai(30, 22, 59, 59) - harness.clock.now())
    request = terminal.financial(
        "0200", "000000", "22", terminal.card_fields(DIAMOND, "2906"), amount_fen=1000
    )
    gateway = harness.gateway
    with gateway.holding_connection():
        prepared = gateway.prepare_group([request])
    before = authorisations(harness)
    harness.clock.advance(shanghai(30, 23, 0, 5) - harness.clock.now())
    cleared = clear(harness.engine, harness.config, NOVEMBER, tmp_path / "nov", harness.clock.now())
    with gateway.holding_connection():
        [reply] = gateway.decide_prepared(prepared)
    answer = terminal.check(request, finish_payload(reply))
    assert answer.code == "96"
    assert authorisations(harness) == before
    assert settled_rrns(cleared) == []
    terminal.trace -= 1  # the same sale, sent again
    again = terminal.financial(
        "0200", "000000", "22", terminal.card_fields(DIAMOND, "2906"), amount_fen=1000
    )
    assert harness.send(terminal, again).code == "00"  # business date 1 December
    with unit_of_work(harness.engine) as session:
        assert check_invariants(session) == []
    harness.engine.dispose()


def test_the_close_waits_for_a_transaction_under_way(tmp_path: Path, ledger_url: str) -> None:
    """A redemption of 30 November still in its transaction when `clear` begins: the close
    waits for it (PostgreSQL: the close's lock; SQLite: the write lock) and settles it."""
    harness = Harness(demo_config(tmp_path, ledger_url), start=shanghai(30, 22, 0, 0))
    terminal = harness.signed_on()
    harness.clock.advance(shanghai(30, 22, 59, 59) - harness.clock.now())
    answers: dict[str, bytes | None] = {}
    request = terminal.financial(
        "0200", "000000", "22", terminal.card_fields(DIAMOND, "2906"), amount_fen=1000
    )
    results: dict[str, Cleared] = {}
    at = shanghai(30, 23, 0, 5)
    out = tmp_path / "nov"
    closing = threading.Thread(
        target=lambda: results.__setitem__(
            "nov", clear(harness.engine, harness.config, NOVEMBER, out, at)
        )
    )
    with decided_and_held_open(harness.gateway, request, answers, "redemption"):
        closing.start()
        closing.join(1.0)
        assert closing.is_alive()  # waiting for the redemption's transaction
    closing.join(60)
    answer = parse(answers["redemption"] or b"")[1]
    assert answer[39] == "00"
    assert settled_rrns(results["nov"]) == [answer[37]]
    harness.engine.dispose()


def test_a_gateway_whose_clock_is_behind_the_close_adds_nothing_to_the_month(
    tmp_path: Path, ledger_url: str
) -> None:
    """`clear` closed November by its own clock (another host's, ahead of this gateway's),
    while this gateway's clock still reads 30 November 22:00: its redemption is `96` and
    writes nothing, since no file would ever carry it. Both backends."""
    harness = Harness(demo_config(tmp_path, ledger_url), start=shanghai(30, 22, 0, 0))
    terminal = harness.signed_on()
    cleared = clear(harness.engine, harness.config, NOVEMBER, tmp_path / "nov",
                    shanghai(1, 9, 0, 0, month=12))  # fmt: skip
    before = authorisations(harness)
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "96"
    assert authorisations(harness) == before
    assert settled_rrns(cleared) == []
    with unit_of_work(harness.engine) as session:
        assert check_invariants(session) == []
    harness.engine.dispose()


def test_a_clock_start_in_a_closed_month_is_refused(tmp_path: Path, ledger_url: str) -> None:
    """`serve --clock` into November, or before it, once November is closed: refused, since
    every request would be `96`; the first business date of December is accepted."""
    harness = Harness(demo_config(tmp_path, ledger_url), start=shanghai(29, 10, 0, 0))
    clear(harness.engine, harness.config, NOVEMBER, tmp_path / "nov", shanghai(1, 9, 0, 0, 12))
    harness.engine.dispose()
    for start in (shanghai(30, 22, 0, 0), shanghai(30, 22, 59, 59)):
        with pytest.raises(BadInput) as refused:
            _refuse_clock_before_ledger(harness.config, start)
        assert str(refused.value) == (
            "--clock: clearing has closed 2026-11; the clock's start is in business date"
            " 2026-11-30, which may no longer be added to"
        )
    _refuse_clock_before_ledger(harness.config, shanghai(30, 23, 0, 0))  # 1 December's


def finish_payload(reply: object) -> bytes:
    from gateway.handler import finish  # noqa: PLC0415

    payload = finish(reply).payload  # type: ignore[arg-type]
    assert payload is not None
    return payload

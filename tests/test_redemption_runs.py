"""Runs of redemptions in a group (`Transactions.redeem_run`) answer and write exactly what the
same requests get one at a time, on both backends.

The same requests go through two gateways on fresh ledgers: once as groups, where consecutive
redemptions share one read and one write per table, and once one by one, which never forms a
run. Every answer (field 64 aside: each ledger signs its terminals on with its own keys) and
every ledger row must be equal, ids, RRNs and authorisation codes included.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

import pytest
from sqlalchemy import MetaData, select

from gateway.config import Config
from gateway.handler import Gateway
from gateway.ledger import operations, unit_of_work
from gateway.ledger.hotpath import HotLedger
from tests import pg
from tests.conftest import NATIVE, FreshUrl, moment
from tests.gateway_harness import (
    BLOCKED,
    DIAMOND,
    EXPIRY,
    FEW_POINTS,
    GOLD_PIN,
    NOT_ENROLLED,
    Harness,
    demo_config,
)
from tests.spec_terminal import SpecTerminal, parse

# Tables compared row by row, and the columns that differ for reasons other than the path
# (the request digest covers the PIN block, enciphered under each ledger's own keys).
TABLES = (
    "authorisations",
    "journal_transactions",
    "journal_entries",
    "point_lots",
    "lot_movements",
    "rrn_allocations",
    "cards",
    "request_log",
)
IGNORED = {"request_log": {"digest"}}

Scenario = Callable[[dict[str, SpecTerminal]], list[list[bytes]]]


def counting_random() -> Callable[[int], bytes]:
    """Authorisation codes in the order they are asked for, the same for both gateways."""
    counter = itertools.count(1)
    return lambda size: next(counter).to_bytes(size, "big")


def gateway_of(harness: Harness) -> Gateway:
    return Gateway(
        config=harness.config,
        engine=harness.engine,
        clock=harness.clock,
        security=harness.security,
        random_bytes=counting_random(),
    )


def redemption(
    terminal: SpecTerminal, card: str, amount_fen: int, *, pin: str | None = None, **flags: bool
) -> bytes:
    fields = terminal.card_fields(card, EXPIRY.get(card, "2812"), pin=pin)
    return terminal.financial("0200", "000000", "22", fields, amount_fen=amount_fen, **flags)


def mixed(terminals: dict[str, SpecTerminal]) -> list[list[bytes]]:
    """Runs broken by every kind of request a run hands back: declines, a wrong PIN and the
    right one after it, an exact repeat, a reused identity, another kind of request."""
    t1, t2, t3 = terminals["10000001"], terminals["10000002"], terminals["20000001"]
    first = redemption(t1, DIAMOND, 1000)
    group = [
        first,
        redemption(t2, DIAMOND, 2000),
        redemption(t3, GOLD_PIN, 500, pin="123456"),
        redemption(t1, FEW_POINTS, 200),  # 100 of its 150 points
        redemption(t2, FEW_POINTS, 200),  # 51: 50 left
        redemption(t1, FEW_POINTS, 200, partial=True),  # 10: the last 50
        redemption(t3, GOLD_PIN, 700, pin="000000"),  # 55, and a wrong try recorded
        redemption(t3, GOLD_PIN, 800, pin="123456"),  # approved, the tries reset
        first,  # the stored answer
    ]
    t2.trace -= 1
    group += [
        redemption(t2, DIAMOND, 900),  # 94: the identity of the DIAMOND 2000 above
        redemption(t1, NOT_ENROLLED, 100),
        redemption(t2, BLOCKED, 100),
        redemption(t2, DIAMOND, 3000),
        t1.financial("0200", "310000", "01", t1.card_fields(DIAMOND, EXPIRY[DIAMOND])),
        redemption(t1, DIAMOND, 100),
        redemption(t3, DIAMOND, 4000),
        redemption(t1, DIAMOND, 0),  # 13
        redemption(t1, DIAMOND, 150),
    ]
    later = [redemption(terminal, DIAMOND, 700) for terminal in (t1, t2, t3, t1, t2, t3)]
    return [group, later]


def many(terminals: dict[str, SpecTerminal]) -> list[list[bytes]]:
    """Full groups of approvals on two cards until one runs short of points."""
    ring = itertools.cycle(terminals.values())
    cards = itertools.cycle((DIAMOND, GOLD_PIN))
    groups = []
    for _ in range(4):
        group = []
        for _ in range(30):
            terminal, card = next(ring), next(cards)
            pin = "123456" if card == GOLD_PIN else None
            group.append(redemption(terminal, card, 3000, pin=pin, partial=True))
        groups.append(group)
    return groups


def play(
    config: Config, scenario: Scenario, *, together: bool
) -> tuple[list[dict[int, Any]], dict[str, list[tuple[Any, ...]]]]:
    """The answers' fields (64 aside) and the ledger's rows after the scenario."""
    harness = Harness(config)
    try:
        later_lots(harness)
        terminals = {tid: harness.signed_on(tid) for tid in ("10000001", "10000002", "20000001")}
        gateway = gateway_of(harness)
        answers = []
        for group in scenario(terminals):
            if together:
                replies = gateway.handle_group(group)
            else:
                replies = [gateway.handle(payload) for payload in group]
            for reply in replies:
                assert reply.payload is not None
                fields = parse(reply.payload)[1]
                fields.pop(64, None)
                answers.append(fields)
        return answers, rows(harness)
    finally:
        harness.engine.dispose()


def later_lots(harness: Harness) -> None:
    """A lot expiring a year after the demo's on each card the scenarios spend most, so
    that the order lots are spent in (earliest expiry first) shows in the rows."""
    now = harness.clock.now()
    with unit_of_work(harness.engine) as session:
        for card in (DIAMOND, GOLD_PIN):
            operations.accrue(session, card, date(2026, 6, 1), 5000, f"test:later:{card}",
                              when=moment(now), expiry_years=2)  # fmt: skip


def rows(harness: Harness) -> dict[str, list[tuple[Any, ...]]]:
    metadata = MetaData()
    metadata.reflect(harness.engine, only=TABLES)
    found = {}
    with harness.engine.connect() as connection:
        for name in TABLES:
            table = metadata.tables[name]
            columns = [c for c in table.columns if c.name not in IGNORED.get(name, set())]
            order = list(table.primary_key.columns)
            found[name] = [
                tuple(row) for row in connection.execute(select(*columns).order_by(*order))
            ]
    return found


_numbers = itertools.count(1)


@pytest.fixture
def new_ledger(ledger_backend: str, request: pytest.FixtureRequest) -> FreshUrl:
    """Fresh ledger databases whose sequences start afresh too, so ids and RRNs compare
    (the shared PostgreSQL ledger is emptied between tests, its sequences go on)."""
    if ledger_backend == "sqlite":
        fresh: FreshUrl = request.getfixturevalue("fresh_ledger_url")
        return fresh
    server: pg.PgServer = request.getfixturevalue("postgres_server")
    return lambda: server.create_database(f"runs_{next(_numbers)}")


@pytest.fixture
def write_groups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int] | None]:
    """The size of every run written together; None on the native build, whose compiled
    callers do not see a patched `HotLedger` (the runs are compared all the same)."""
    if NATIVE:
        yield None
        return
    sizes: list[int] = []
    original = HotLedger.write_group

    def counted(self: HotLedger, planned: Any) -> list[str]:
        sizes.append(len(planned))
        return original(self, planned)

    monkeypatch.setattr(HotLedger, "write_group", counted)
    yield sizes


@pytest.mark.parametrize("scenario", [mixed, many], ids=["mixed", "many"])
@pytest.mark.parametrize("daily_limit", [0, 5000], ids=["no-daily-limit", "daily-limit"])
def test_runs_answer_and_write_what_one_by_one_does(
    tmp_path: Any,
    new_ledger: FreshUrl,
    write_groups: list[int] | None,
    scenario: Scenario,
    daily_limit: int,
) -> None:
    config = demo_config(tmp_path, new_ledger())
    plan = dataclasses.replace(config.plan, max_points_per_card_day=daily_limit)
    config = dataclasses.replace(config, plan=plan)
    one_by_one = play(config, scenario, together=False)
    assert write_groups in ([], None)  # one request at a time never makes a run
    config = demo_config_on(config, new_ledger())
    together = play(config, scenario, together=True)
    assert write_groups is None or max(write_groups) >= 3  # runs were written together
    if scenario is mixed:  # every way a run ends was met
        assert {"00", "10", "13", "51", "55", "57", "94"} <= {a[39] for a in together[0]}
    assert together[0] == one_by_one[0]
    for table in TABLES:
        assert together[1][table] == one_by_one[1][table], table


def demo_config_on(config: Config, database: str) -> Config:
    """The same config on another (fresh) ledger database."""
    return dataclasses.replace(
        config, gateway=dataclasses.replace(config.gateway, database=database)
    )


def test_a_run_ends_at_the_first_request_it_cannot_answer(
    tmp_path: Any, fresh_ledger_url: FreshUrl, write_groups: list[int] | None
) -> None:
    """Approvals before a decline go together; the decline and the run after it follow."""
    harness = Harness(demo_config(tmp_path, fresh_ledger_url()))
    try:
        terminal = harness.signed_on()
        group = [redemption(terminal, DIAMOND, 1000) for _ in range(3)]
        group.append(redemption(terminal, NOT_ENROLLED, 1000))
        group += [redemption(terminal, DIAMOND, 1000) for _ in range(2)]
        codes = [parse(r.payload or b"")[1][39] for r in harness.gateway.handle_group(group)]
        assert codes == ["00", "00", "00", "57", "00", "00"]
        assert write_groups in ([3, 2], None)  # None: the native build, not counted
    finally:
        harness.engine.dispose()

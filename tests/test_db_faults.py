"""Database faults (issue 7): while the ledger is unreachable every request that needs it is
answered 96 and nothing changes; when it comes back the same gateway goes on, no restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ledger import unit_of_work
from gateway.ledger.invariants import check_invariants
from tests import pg
from tests.gateway_harness import DIAMOND, Harness, demo_config


@pytest.fixture
def outage_server() -> Iterator[pg.PgServer]:
    """A PostgreSQL of this test's own, since the test stops it."""
    reason = pg.missing_binaries()
    if reason is not None:
        pytest.skip(reason)
    server = pg.start()
    try:
        yield server
    finally:
        pg.stop(server)


def test_an_outage_answers_96_changes_nothing_and_the_gateway_recovers(
    tmp_path: Path, outage_server: pg.PgServer
) -> None:
    """Ledger down: 96 with an RRN and no MAC, nothing taken; ledger back: approvals again."""
    url = outage_server.create_database("outage")
    harness = Harness(demo_config(tmp_path, url))
    terminal = harness.signed_on()
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"

    pg.pause(outage_server)
    _, during = harness.redeem(terminal, DIAMOND, 1000)
    assert during.code == "96"
    assert 64 not in during.fields
    assert len(during.text(37)) == 12

    pg.resume(outage_server)
    _, after = harness.redeem(terminal, DIAMOND, 1000)
    assert after.code == "00"
    assert after.balance == 50000 - 2 * 500  # the 96 took nothing
    with unit_of_work(harness.engine) as session:
        assert check_invariants(session) == []
    harness.engine.dispose()

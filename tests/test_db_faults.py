"""Database faults (issue 7): while the ledger is unreachable every request that needs it is
answered 96 and nothing changes; when it comes back the same gateway goes on, no restart."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import structlog
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from gateway.ledger import db, unit_of_work
from gateway.ledger.db import CommitOutcomeUnknownError
from gateway.ledger.invariants import check_invariants
from tests import pg
from tests.conftest import moment, skip_without
from tests.gateway_harness import DIAMOND, Harness, demo_config
from tests.spec_terminal import parse


@pytest.fixture
def outage_server() -> Iterator[pg.PgServer]:
    """A PostgreSQL of this test's own, since the test stops it."""
    skip_without(pg.missing_binaries())
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
    terminal, second = harness.signed_on(), harness.signed_on("20000001")
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"

    pg.pause(outage_server)
    with capture_logs() as logged:
        _, during = harness.redeem(terminal, DIAMOND, 1000)
        harness.redeem(terminal, DIAMOND, 1000)
    assert during.code == "96"
    # Said once (then every 10 s while it lasts), as an error an operator's alert can match.
    [unreachable] = [line for line in logged if line["event"] == "ledger_unreachable"]
    assert unreachable["log_level"] == "error" and unreachable["failed_reads"] == 1
    assert 64 not in during.fields
    assert len(during.text(37)) == 12

    # A group's requests share one instant: each 96 still gets an RRN of its own.
    group = [
        sender.financial("0200", "000000", "22", sender.card_fields(DIAMOND, "2906"), amount_fen=1)
        for sender in (terminal, second, terminal)
    ]
    replies = harness.gateway.handle_group(group)
    answers = [parse(reply.payload or b"") for reply in replies]
    assert [fields[39] for _, fields, _, _ in answers] == ["96"] * 3
    rrns = [str(fields[37]) for _, fields, _, _ in answers] + [during.text(37)]
    assert len(set(rrns)) == 4 and all(len(r) == 12 and r[0] == "9" for r in rrns)

    pg.resume(outage_server)
    with capture_logs() as logged:
        _, after = harness.redeem(terminal, DIAMOND, 1000)
    assert after.code == "00"
    [again] = [line for line in logged if line["event"] == "ledger_reachable_again"]
    assert again["failed_reads"] >= 2
    assert after.balance == 50000 - 2 * 500  # the 96 took nothing
    with unit_of_work(harness.engine) as session:
        assert check_invariants(session) == []
    harness.engine.dispose()


def test_a_commit_that_lost_its_link_is_told_apart_from_a_rollback() -> None:
    """A COMMIT whose link broke (SQLAlchemy's disconnect) may have gone through: its own
    error. Any other failure of the COMMIT is a rollback, raised as it was."""

    def broken(invalidated: bool) -> None:
        raise OperationalError("COMMIT", {}, Exception("gone"), connection_invalidated=invalidated)

    with pytest.raises(CommitOutcomeUnknownError):
        db._commit(lambda: broken(True))
    with pytest.raises(OperationalError) as raised:
        db._commit(lambda: broken(False))
    assert not isinstance(raised.value, CommitOutcomeUnknownError)


@pytest.mark.parametrize("reachable", [True, False])
def test_a_redemption_whose_commit_lost_its_link_is_never_answered_96(
    tmp_path: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch, reachable: bool
) -> None:
    """The COMMIT went through but its reply was lost: `96` ("nothing changed") would be
    false. With the ledger reachable again, the request log answers from what was committed
    (00, the points taken once); without it, no answer (the terminal reverses, §4.6)."""
    harness = Harness(demo_config(tmp_path, ledger_url))
    terminal = harness.signed_on()
    real_commit = db._commit
    commits = {"lost": 0}

    def committed_then_lost(commit):  # type: ignore[no-untyped-def]
        if commits["lost"] == 1 and not reachable:
            raise OperationalError("COMMIT", {}, Exception("the server is gone"))
        real_commit(commit)
        if commits["lost"] == 0:
            commits["lost"] = 1
            raise CommitOutcomeUnknownError("the link broke during COMMIT")

    card = terminal.card_fields(DIAMOND, "2906")
    request = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
    monkeypatch.setattr(db, "_commit", committed_then_lost)
    [reply] = harness.gateway.handle_group([request])
    monkeypatch.setattr(db, "_commit", real_commit)
    if reachable:
        assert reply.payload is not None
        assert parse(reply.payload)[1][39] == "00"
    else:
        assert reply.payload is None
        assert reply.event["reason"] == "ledger outcome unknown"
    _, after = harness.redeem(terminal, DIAMOND, 1000)
    assert (after.code, after.balance) == ("00", 50000 - 2 * 500)  # the first was taken once
    with unit_of_work(harness.engine) as session:
        assert check_invariants(session) == []
    harness.engine.dispose()


def test_a_ledger_held_past_the_lock_wait_answers_the_group_96_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process held the ledger's lock past the wait (a long import or clearing run):
    nothing of the group was written, and each request is answered `96` at once, not run
    again alone to wait as long once more (a terminal gives up at 60 s, §1). The log says
    why."""
    harness = Harness(demo_config(tmp_path))
    terminal = harness.signed_on()
    requests = []
    for _ in range(3):
        fields = terminal.card_fields(DIAMOND, "2906")
        requests.append(terminal.financial("0200", "000000", "22", fields, amount_fen=1000))
    waits = []

    @contextlib.contextmanager
    def held(_engine: object) -> Iterator[object]:
        waits.append(1)
        raise OperationalError(
            "BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked")
        )
        yield  # pragma: no cover

    monkeypatch.setattr("gateway.handler.unit_of_work", held)
    with structlog.testing.capture_logs() as logs:
        replies = harness.gateway.handle_group(requests)
    assert waits == [1]
    assert [parse(reply.payload)[1][39] for reply in replies if reply.payload] == ["96"] * 3
    [busy] = [line for line in logs if line["event"] == "ledger_busy"]
    assert (busy["requests"], busy["terminals"], busy["error"]) == (
        3,
        ["10000001"],
        "OperationalError",
    )
    monkeypatch.undo()
    with unit_of_work(harness.engine) as session:
        assert check_invariants(session) == []
    harness.engine.dispose()


def test_fallback_rrns_of_two_workers_at_one_instant_differ() -> None:
    """During an outage every worker answers `96` with an RRN it makes itself: the workers
    of one gateway, at the same instant, give different ones, each 12 digits, 9 first, and
    each worker's keep rising within the instant; the year's last moment still fits."""
    from gateway.clock import SHANGHAI  # noqa: PLC0415
    from gateway.handler import _FallbackRrns  # noqa: PLC0415

    at = moment(datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=SHANGHAI))
    given: list[str] = []
    for worker in (1, 2):
        rrns = _FallbackRrns()
        rrns.slot = worker
        given += [rrns.next(at) for _ in range(3)]
    assert len(set(given)) == 6
    assert all(len(rrn) == 12 and rrn[0] == "9" for rrn in given)
    assert given[:3] == sorted(given[:3])


class _DriverError(Exception):
    def __init__(self, *, sqlite_errorcode: int | None = None, sqlstate: str | None = None):
        super().__init__("driver error")
        if sqlite_errorcode is not None:
            self.sqlite_errorcode = sqlite_errorcode
        if sqlstate is not None:
            self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("driver", "fault"),
    [
        (_DriverError(sqlite_errorcode=11), "damaged"),  # SQLITE_CORRUPT
        (_DriverError(sqlite_errorcode=26), "damaged"),  # SQLITE_NOTADB
        (_DriverError(sqlite_errorcode=13), "full"),  # SQLITE_FULL
        (_DriverError(sqlite_errorcode=10 | 3 << 8), "io"),  # SQLITE_IOERR_WRITE
        (_DriverError(sqlite_errorcode=8), "read-only"),  # SQLITE_READONLY
        (_DriverError(sqlite_errorcode=5), None),  # SQLITE_BUSY: the lock's, not the file's
        (_DriverError(sqlstate="53100"), "server-full"),  # disk_full
        (_DriverError(sqlstate="58030"), "server-io"),  # io_error
        (_DriverError(sqlstate="25006"), "server-read-only"),  # a standby, say
        (_DriverError(sqlstate="40P01"), None),  # a deadlock
        (_DriverError(), None),
    ],
)
def test_storage_faults_are_told_by_the_drivers_code(
    driver: _DriverError, fault: str | None
) -> None:
    """Which storage fault a driver error is, by SQLite's primary result code or
    PostgreSQL's SQLSTATE, as the command line reports it (one line, what to do)."""
    error = OperationalError("statement", None, driver)
    assert db.storage_fault(error) == fault
    assert fault is None or fault in db.STORAGE_FAULTS

"""PostgreSQL commits that give their locks back before the WAL is flushed
(`gateway/ledger/db.py`, `sync_after_release`, `_WalFlush`), and the server's ledger worker
that answers a group only after a flush on a connection open before the group began."""

from __future__ import annotations

import itertools
import select
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from twisted.internet.defer import Deferred

from gateway.handler import Reply
from gateway.ledger import db, make_engine, unit_of_work
from gateway.ledger.db import CommitOutcomeUnknownError, sync_after_release
from gateway.server import GroupWorker
from tests import pg

NAMES = itertools.count()


@pytest.fixture
def engine(postgres_server: pg.PgServer) -> Iterator[Engine]:
    url = postgres_server.create_database(f"walflush_{next(NAMES)}")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE notes (id serial PRIMARY KEY, body text)"))
    try:
        yield engine
    finally:
        engine.dispose()
        flush = db._LOG_SYNCS.pop(engine, None)
        if isinstance(flush, db._WalFlush):
            flush._close()


def write(engine: Engine, body: str = "x") -> None:
    with unit_of_work(engine) as session:
        session.execute(text("INSERT INTO notes (body) VALUES (:body)"), {"body": body})


def notes(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT body FROM notes ORDER BY id")).scalars())


def flushing(engine: Engine) -> db._WalFlush:
    flush = db._LOG_SYNCS[engine]
    assert isinstance(flush, db._WalFlush)
    return flush


def cut(engine: Engine) -> None:
    """End the flush connection's backend, as a PostgreSQL restart would end it."""
    pid = flushing(engine)._driver.info.backend_pid
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


def test_serving_commits_are_asynchronous_and_flushed_before_the_unit_of_work_returns(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_after_release(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SHOW synchronous_commit")).scalar_one() == "off"
    events: list[str] = []
    event.listen(engine, "commit", lambda _connection: events.append("committed"))
    confirm = db._WalFlush.confirm

    def confirmed(flush: db._WalFlush, generation: int) -> None:
        confirm(flush, generation)
        events.append("flushed")

    monkeypatch.setattr(db._WalFlush, "confirm", confirmed)
    write(engine)
    events.append("returned")
    assert events == ["committed", "flushed", "returned"]
    assert flushing(engine)._driver.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_a_lost_flush_connection_confirms_nothing_committed_before_it_was_back(
    engine: Engine,
) -> None:
    sync_after_release(engine)
    write(engine, "before")
    with (
        pytest.raises(CommitOutcomeUnknownError, match="WAL flush failed"),
        unit_of_work(engine) as session,
    ):
        session.execute(text("INSERT INTO notes (body) VALUES ('unconfirmed')"))
        cut(engine)  # after this unit of work took its ticket
    write(engine, "after")  # the flush connection is opened again before this one began
    assert notes(engine) == ["before", "unconfirmed", "after"]


def test_a_flush_connection_the_server_ended_is_opened_again_before_the_next_unit(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ended the idle flush connection (a restart quicker than the idle ping's
    0.5 s) and said so: the next unit of work sees that without a round trip and opens it
    again before it begins, so its answers are given."""
    monkeypatch.setattr(db, "FLUSH_PING_AFTER_S", 3600.0)  # only what the server said counts
    sync_after_release(engine)
    write(engine, "before")
    ended = flushing(engine)._driver
    cut(engine)
    watch = select.poll()
    watch.register(ended.fileno(), select.POLLIN)
    assert watch.poll(10_000), "the server did not close the connection"
    write(engine, "after")
    assert flushing(engine)._driver is not ended
    assert notes(engine) == ["before", "after"]


def test_a_ticket_from_before_the_connection_was_opened_again_is_refused(
    engine: Engine,
) -> None:
    sync_after_release(engine)
    flush = flushing(engine)
    ticket = flush.ticket()
    flush._close()
    flush.ticket()  # opened again, for the units of work that begin now
    with pytest.raises(CommitOutcomeUnknownError, match="lost after that commit"):
        ticket()


class Reactor:
    def __init__(self) -> None:
        self.delivered: list[bytes | None] = []

    def callFromThread(self, function: Any, deferreds: Any, replies: Any) -> None:
        self.delivered += [reply.payload for reply in replies]
        function(deferreds, replies)


def test_the_worker_gives_no_answer_whose_flush_failed_and_goes_on(engine: Engine) -> None:
    sync_after_release(engine)

    def decide(payloads: list[bytes]) -> list[Reply]:
        with unit_of_work(engine) as session:
            for payload in payloads:
                session.execute(
                    text("INSERT INTO notes (body) VALUES (:b)"), {"b": payload.decode()}
                )
        if payloads == [b"second"]:
            cut(engine)  # the flush after this commit finds its connection gone
        return [Reply(payload, {"event": "answered"}) for payload in payloads]

    reactor = Reactor()
    worker = GroupWorker(decide, reactor)
    worker.start()
    answers: list[Deferred[Reply]] = []
    try:
        for payload in (b"first", b"second", b"third"):
            answers.append(worker.submit(payload))
            while not answers[-1].called:
                time.sleep(0.001)
    finally:
        worker.stop()
    # "second" committed, but its flush failed: its link closes, not a `00` it may not keep.
    assert reactor.delivered == [b"first", None, b"third"]
    assert notes(engine) == ["first", "second", "third"]


def test_after_a_postgresql_restart_the_first_commits_are_confirmed() -> None:
    """The flush connection died with the server; it is found gone before the next unit of
    work begins and opened again, so the first commits after the restart are answered."""
    server = pg.start()
    try:
        engine = make_engine(server.create_database("restarted"))
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE notes (id serial PRIMARY KEY, body text)"))
        sync_after_release(engine)
        write(engine, "before")
        pg.pause(server)
        time.sleep(db.FLUSH_PING_AFTER_S)
        pg.resume(server)
        write(engine, "after")
        assert notes(engine) == ["before", "after"]
        flushing(engine)._close()
        engine.dispose()
    finally:
        pg.stop(server)


def test_the_flush_puts_the_wal_on_disk_past_the_commit_and_nothing_else_does() -> None:
    """With the WAL writer slowed to 10 s, the WAL is not flushed past an asynchronous
    commit until its flush runs, and is once it returned. (A transaction that writes no WAL
    before its commit record, one that only takes an id, is not waited for: that is what
    the flush must not be.)"""
    server = pg.start()
    try:
        with server.admin() as admin:
            admin.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
            admin.execute("SELECT pg_reload_conf()")
        engine = make_engine(server.create_database("slow_wal"))
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE notes (id serial PRIMARY KEY, body text)"))
        sync_after_release(engine)
        with server.admin() as probe:

            def flushed_past(lsn: str) -> bool:
                row = probe.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (lsn,))
                return bool(row.fetchone()[0])  # type: ignore[index]

            for attempt in range(3):
                with db.deferring_log_syncs():
                    write(engine, f"note {attempt}")
                row = probe.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
                assert row is not None
                committed = str(row[0])
                assert not flushed_past(committed)  # the commit did not wait for the disk
                for ticket in db.take_owed_log_syncs():
                    ticket()
                assert flushed_past(committed)
        flushing(engine)._close()
        engine.dispose()
    finally:
        pg.stop(server)

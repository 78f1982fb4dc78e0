"""PostgreSQL: the ledger thread's reads between units of work (the sessions, the switches)
go on a reading connection it keeps, in autocommit (`db._held_reader`): one round trip a read
instead of the pool's ping, BEGIN, the statement and ROLLBACK."""

from __future__ import annotations

import itertools
import select
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine, text

from gateway.ledger import db, make_engine
from gateway.ledger.db import holding_connection, reading_driver
from tests import pg

NAMES = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[pg.PgServer]:
    """A server of this module's own, which a test restarts."""
    started = pg.start()
    try:
        yield started
    finally:
        pg.stop(started)


@pytest.fixture
def engine(server: pg.PgServer) -> Iterator[Engine]:
    engine = make_engine(server.create_database(f"reader_{next(NAMES)}"))
    try:
        yield engine
    finally:
        engine.dispose()


def read_one(engine: Engine) -> tuple[psycopg.Connection[object], int]:
    with reading_driver(engine) as driver:
        row = driver.execute("SELECT 1").fetchone()
    assert isinstance(driver, psycopg.Connection)
    return driver, int(row[0])


def cut(engine: Engine, driver: psycopg.Connection[object]) -> None:
    """End a connection's backend, as a PostgreSQL restart would end it."""
    with engine.connect() as connection:
        connection.execute(
            text("SELECT pg_terminate_backend(:pid)"), {"pid": driver.info.backend_pid}
        )


def test_reads_share_one_connection_in_autocommit_until_the_hold_ends(engine: Engine) -> None:
    with holding_connection(engine):
        first, _ = read_one(engine)
        second, _ = read_one(engine)
        assert second is first
        assert first.autocommit
        assert first.info.transaction_status == TransactionStatus.IDLE  # nothing left open
        assert engine.pool.checkedout() == 1
    assert first.closed  # not handed back to the pool in autocommit
    assert engine.pool.checkedout() == 0
    outside, _ = read_one(engine)  # without a hold: from the pool, as before
    assert outside is not first and not outside.autocommit


def test_a_read_that_fails_gives_its_connection_up(engine: Engine) -> None:
    """The read fails (for the sessions' read: `96`, nothing changed), and its connection is
    given up: the next read works on a new one."""
    with holding_connection(engine):
        first, _ = read_one(engine)
        with pytest.raises(psycopg.Error), reading_driver(engine) as driver:
            driver.execute("SELECT no_such_column FROM no_such_table")
        again, value = read_one(engine)
        assert again is not first and value == 1
        assert first.closed


def test_a_connection_the_server_ended_is_replaced_before_the_read(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ended the connection (a restart quicker than the idle ping's 0.5 s, or
    `pg_terminate_backend`) and said so: the next read sees that without a round trip,
    pings, and reads on a new connection, instead of failing a group with `96`."""
    monkeypatch.setattr(db, "READER_PING_AFTER_S", 3600.0)  # only what the server said counts
    with holding_connection(engine):
        first, _ = read_one(engine)
        cut(engine, first)
        watch = select.poll()
        watch.register(first.fileno(), select.POLLIN)
        assert watch.poll(10_000), "the server did not close the connection"
        again, value = read_one(engine)
        assert again is not first and value == 1


def test_a_connection_idle_across_a_restart_is_pinged_and_replaced(
    server: pg.PgServer, engine: Engine
) -> None:
    """PostgreSQL restarted while the thread had nothing to read: the first read after it
    works, as it did when each read took a pinged connection from the pool."""
    with holding_connection(engine):
        first, _ = read_one(engine)
        pg.pause(server)
        pg.resume(server)
        time.sleep(db.READER_PING_AFTER_S + 0.1)
        again, value = read_one(engine)
        assert again is not first and value == 1

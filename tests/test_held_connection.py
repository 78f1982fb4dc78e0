"""A thread that holds a connection (`db.holding_connection`, the server's ledger thread):
its units of work share one connection, yet each is its own transaction that commits, or
rolls back, and gives SQLite's write lock back at its end, exactly as without it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from gateway.ledger import db, make_engine, unit_of_work
from gateway.ledger.db import holding_connection, reading_driver, sync_after_release
from gateway.server import GroupWorker
from tests.conftest import empty_postgres_ledger
from tests.test_ledger_writer_lock import lock_file_is_free
from tests.test_log_sync import Journal


def driver_of(session: Any) -> Any:
    return session.connection().connection.driver_connection


def notes(engine: Engine) -> list[str]:
    """What another connection (another process's, say) sees as committed."""
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT body FROM notes ORDER BY id")).scalars())


def test_units_of_work_share_the_connection_and_each_commits(
    engine: Engine, tmp_path: Path
) -> None:
    drivers = []
    with holding_connection(engine):
        for body in ("one", "two"):
            with unit_of_work(engine) as session:
                session.execute(text("INSERT INTO notes (body) VALUES (:body)"), {"body": body})
                drivers.append(driver_of(session))
            assert notes(engine) == ["one", "two"][: len(drivers)]  # committed, seen elsewhere
            assert lock_file_is_free(tmp_path / "ledger.db.writer-lock")  # given back
        assert engine.pool.checkedout() == 1  # kept between them
    assert drivers[0] is drivers[1]
    assert engine.pool.checkedout() == 0  # back in the pool when the block ends


def test_a_unit_of_work_that_fails_rolls_back_and_gives_the_connection_back(
    engine: Engine, tmp_path: Path
) -> None:
    with holding_connection(engine):
        with unit_of_work(engine) as session:
            session.execute(text("INSERT INTO notes (body) VALUES ('kept')"))
        with pytest.raises(RuntimeError), unit_of_work(engine) as session:
            session.execute(text("INSERT INTO notes (body) VALUES ('lost')"))
            raise RuntimeError("declined halfway")
        assert notes(engine) == ["kept"]
        assert lock_file_is_free(tmp_path / "ledger.db.writer-lock")
        assert engine.pool.checkedout() == 0  # back in the pool (rolled back there)
        with unit_of_work(engine) as session:  # the next one takes one again
            session.execute(text("INSERT INTO notes (body) VALUES ('after')"))
        assert engine.pool.checkedout() == 1
    assert notes(engine) == ["kept", "after"]


def test_a_flush_that_fails_rolls_the_whole_unit_back(engine: Engine) -> None:
    """The ORM session joins the connection's transaction: the rows written before the
    failing statement go too."""
    with holding_connection(engine):
        with unit_of_work(engine) as session:
            session.execute(text("CREATE UNIQUE INDEX notes_body ON notes (body)"))
            session.execute(text("INSERT INTO notes (body) VALUES ('once')"))
        with pytest.raises(Exception, match="UNIQUE"), unit_of_work(engine) as session:
            session.execute(text("INSERT INTO notes (body) VALUES ('first')"))
            session.execute(text("INSERT INTO notes (body) VALUES ('once')"))
    assert notes(engine) == ["once"]


class _Base(DeclarativeBase):
    pass


class _Note(_Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


def test_objects_only_added_are_written(engine: Engine) -> None:
    """The unit of work commits the ORM session only when it was used: an object added and
    never flushed (nothing read through the session) counts as use."""
    with holding_connection(engine):
        with unit_of_work(engine) as session:
            session.add(_Note(body="added"))
        with unit_of_work(engine) as session:
            session.execute(text("INSERT INTO notes (body) VALUES ('executed')"))
    assert notes(engine) == ["added", "executed"]


def test_other_threads_are_not_affected(engine: Engine) -> None:
    seen: list[Any] = []

    def elsewhere() -> None:
        with unit_of_work(engine) as session:
            seen.append(driver_of(session))

    with holding_connection(engine):
        with unit_of_work(engine) as session:
            held = driver_of(session)
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(10)
    assert seen and seen[0] is not held


def test_a_nested_block_keeps_the_outer_connection(engine: Engine) -> None:
    with holding_connection(engine):
        with unit_of_work(engine) as session:
            outer = driver_of(session)
        with holding_connection(engine), unit_of_work(engine) as session:
            assert driver_of(session) is outer
        assert engine.pool.checkedout() == 1  # the inner block gave nothing back
    assert engine.pool.checkedout() == 0


def test_reads_between_units_use_the_held_connection(engine: Engine) -> None:
    """On SQLite a second connection would find its pages stale after every commit."""
    with holding_connection(engine):
        with unit_of_work(engine) as session:
            session.execute(text("INSERT INTO notes (body) VALUES ('x')"))
            held = driver_of(session)
        with reading_driver(engine) as driver:
            assert driver is held
            assert driver.execute("SELECT count(*) FROM notes").fetchone()[0] == 1
        assert not held.in_transaction  # the read left no transaction open


def test_the_log_is_still_synced_after_the_lock_is_given_back(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_after_release(engine)
    journal = Journal(monkeypatch)
    with holding_connection(engine):
        for _ in range(2):
            with unit_of_work(engine) as session:
                session.execute(text("INSERT INTO notes (body) VALUES ('x')"))
            journal.events.append("returned")
    assert journal.events == ["released", "synced", "returned"] * 2
    assert journal.synced_inodes == [(tmp_path / "ledger.db-wal").stat().st_ino] * 2


def test_the_ledger_thread_holds_its_connection(engine: Engine) -> None:
    """`GroupWorker` decides every group inside `hold`, on one thread."""
    drivers: list[Any] = []

    def decide(payloads: list[bytes]) -> list[Any]:
        with unit_of_work(engine) as session:
            drivers.append(driver_of(session))
        return [None] * len(payloads)

    class Reactor:
        def callFromThread(self, function: Any, *args: Any) -> None:
            function(*args)

    monkey = pytest.MonkeyPatch()
    monkey.setattr("gateway.server.finish", lambda answer: answer)
    try:
        worker = GroupWorker(decide, Reactor(), hold=lambda: holding_connection(engine))
        worker.start()
        for payload in (b"a", b"b"):
            answer = worker.submit(payload)
            while not answer.called:
                threading.Event().wait(0.01)
        worker.stop()
    finally:
        monkey.undo()
    assert len(drivers) == 2 and drivers[0] is drivers[1]
    assert engine.pool.checkedout() == 0


def test_without_the_block_each_unit_of_work_uses_the_pool(engine: Engine) -> None:
    with unit_of_work(engine) as session:
        session.execute(text("SELECT 1"))
        assert engine.pool.checkedout() == 1
    assert engine.pool.checkedout() == 0
    assert getattr(db._THREAD, "held", {}) == {}


def test_a_unit_of_work_inside_another_takes_a_connection_of_its_own(
    postgres_ledger: str,
) -> None:
    """As without the block (on PostgreSQL, where two transactions of one thread can both
    write; on SQLite the inner one would wait for the outer's write lock)."""
    engine = make_engine(empty_postgres_ledger(postgres_ledger))
    try:
        with holding_connection(engine), unit_of_work(engine) as outer:
            held = driver_of(outer)
            with unit_of_work(engine) as inner:
                assert driver_of(inner) is not held
                assert inner.execute(text("SELECT 1")).scalar_one() == 1
            assert outer.execute(text("SELECT 2")).scalar_one() == 2
    finally:
        engine.dispose()

"""The checkpoint thread of `vipgate serve` on SQLite (gateway/ledger/checkpoints.py)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from gateway.ledger import checkpoints, make_engine, unit_of_work
from gateway.ledger.checkpoints import BACKSTOP_PAGES, RESTART_PAGES, Checkpointer
from tests.test_ledger_writer_lock import lock_file_is_free


def write(engine: Engine, rows: int) -> None:
    with unit_of_work(engine) as session:
        for _ in range(rows):
            session.execute(text("INSERT INTO notes (body) VALUES (:body)"), {"body": "x" * 500})


def test_a_checkpoint_copies_the_log_back(engine: Engine) -> None:
    write(engine, 200)
    checkpointer = Checkpointer(engine)
    busy, pages, copied = checkpointer.checkpoint()
    assert busy == 0
    assert pages > 0 and copied == pages


def test_serving_connections_keep_only_the_backstop(engine: Engine) -> None:
    checkpointer = Checkpointer(engine, interval_s=60)
    checkpointer.start()
    try:
        with engine.connect() as connection:
            pages = connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
        assert pages == BACKSTOP_PAGES
    finally:
        checkpointer.stop()


def test_the_log_is_started_over_well_before_the_backstop() -> None:
    """The backstop's checkpoint runs inside a commit, under the write lock: the thread's
    start-over must come first, with room for what is committed while it copies."""
    assert RESTART_PAGES * 3 // 2 <= BACKSTOP_PAGES


def test_the_thread_checkpoints_what_commits_leave(engine: Engine, tmp_path: Path) -> None:
    """Commits leave their pages in the log (the backstop is far off), so the database file
    grows only when the thread copies them back."""
    database = tmp_path / "ledger.db"
    checkpointer = Checkpointer(engine, interval_s=0.01)
    checkpointer.start()
    try:
        before = database.stat().st_size
        write(engine, 400)  # about 200 KB of rows
        deadline = time.monotonic() + 10
        while database.stat().st_size < before + 100_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert database.stat().st_size >= before + 100_000
    finally:
        checkpointer.stop()
    assert checkpointer.failures == 0


def test_a_failing_checkpoint_is_counted_and_the_thread_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = Checkpointer(engine, interval_s=0.01)
    real = checkpointer.checkpoint
    calls = 0

    def flaky() -> tuple[int, int, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real()

    monkeypatch.setattr(checkpointer, "checkpoint", flaky)
    checkpointer.start()
    try:
        deadline = time.monotonic() + 10
        while checkpointer.checkpoints < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        checkpointer.stop()
    assert checkpointer.failures == 1
    assert checkpointer.checkpoints >= 2


def test_only_sqlite_has_a_log_to_checkpoint() -> None:
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(ValueError, match="SQLite"):
        Checkpointer(engine)


def log_salts(database: Path) -> bytes:
    """The log header's salts (bytes 16-23): new every time a writer starts the log over
    from its beginning, the same while commits are appended."""
    return (database.parent / (database.name + "-wal")).read_bytes()[16:24]


def test_a_long_log_is_copied_to_the_end_in_the_writers_queue_and_started_over(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As under steady load, a commit lands after each copy made outside the writers' queue;
    the last copy is made in the queue, so nothing is left uncopied and the next writer
    starts the log from its beginning."""
    database = tmp_path / "ledger.db"
    lock_file = tmp_path / "ledger.db.writer-lock"
    copies: list[bool] = []  # whether each copy was made in the writers' queue
    passive = checkpoints._passive

    def copy_then_commit(driver: Any) -> tuple[int, int, int]:
        copies.append(not lock_file_is_free(lock_file))
        copied = passive(driver)
        if not copies[-1]:
            write(engine, 5)  # another writer's commit
        return copied

    monkeypatch.setattr(checkpoints, "_passive", copy_then_commit)
    checkpointer = Checkpointer(engine, restart_pages=20)
    write(engine, 200)
    appended = log_salts(database)
    write(engine, 1)
    assert log_salts(database) == appended  # nothing copied yet: the commit is appended
    busy, pages, copied = checkpointer.checkpoint()
    assert copies == [False, False, True]
    assert (busy, copied) == (0, pages)  # the commits after the first copies too
    assert checkpointer.restarts == 1
    assert lock_file_is_free(lock_file)  # given back
    before = log_salts(database)
    write(engine, 1)
    assert log_salts(database) != before


def test_a_short_log_is_only_copied(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    passive = checkpoints._passive

    def counted(driver: Any) -> tuple[int, int, int]:
        nonlocal calls
        calls += 1
        return passive(driver)

    monkeypatch.setattr(checkpoints, "_passive", counted)
    write(engine, 20)
    checkpointer = Checkpointer(engine, restart_pages=10_000)
    busy, pages, copied = checkpointer.checkpoint()
    assert (busy, copied) == (0, pages)
    assert calls == 1 and checkpointer.restarts == 0

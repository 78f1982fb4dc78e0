"""The checkpoint thread of `vipgate serve` on SQLite (gateway/ledger/checkpoints.py)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from gateway.ledger import make_engine, unit_of_work
from gateway.ledger.checkpoints import BACKSTOP_PAGES, Checkpointer


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

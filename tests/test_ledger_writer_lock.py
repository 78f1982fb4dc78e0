"""SQLite's writers queue on a lock file beside the database (looked at again every
millisecond, not in SQLite's sleep-and-retry), and a snapshot read (`reading`) waits for
nobody."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from sqlalchemy import text

from gateway.ledger import make_engine, migrate, unit_of_work
from gateway.ledger.db import _WriterLock, reading


def lock_file_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_a_writer_holds_the_lock_file_and_the_next_one_starts_after_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    first, second = make_engine(url), make_engine(url)  # as two processes would
    migrate(first)
    lock_file = tmp_path / "ledger.db.writer-lock"
    holding = threading.Event()
    started: list[float] = []

    def other_writer() -> None:
        holding.wait()
        with unit_of_work(second) as session:
            session.execute(text("SELECT count(*) FROM cards"))  # BEGIN IMMEDIATE: the lock
            started.append(time.monotonic())

    thread = threading.Thread(target=other_writer)
    thread.start()
    with unit_of_work(first) as session:
        session.execute(text("SELECT count(*) FROM cards"))
        assert not lock_file_is_free(lock_file)
        holding.set()
        time.sleep(0.2)
        assert not started
        released = time.monotonic()
    thread.join(10)
    assert started and started[0] >= released
    assert lock_file_is_free(lock_file)  # given back with the connection
    first.dispose()
    second.dispose()


def test_a_snapshot_read_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    with unit_of_work(engine) as session:
        session.execute(text("SELECT count(*) FROM cards"))
        done = threading.Event()

        def read() -> None:
            with reading(engine) as connection:
                connection.execute(text("SELECT count(*) FROM cards")).all()
            done.set()

        thread = threading.Thread(target=read)
        thread.start()
        assert done.wait(5), "the read waited for the writer"
        thread.join()
    engine.dispose()


def test_a_writer_lock_never_given_back_leaves_the_decision_to_sqlite(tmp_path: Path) -> None:
    """A holder that never lets go is waited for up to the timeout, then the writer goes on
    without the lock file and SQLite's busy timeout applies, as it did before."""
    path = tmp_path / "ledger.db.writer-lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    lock = _WriterLock(path)
    started = time.monotonic()
    lock.acquire(timeout_ms=200)
    waited = time.monotonic() - started
    assert 0.2 <= waited < 5
    assert not lock_file_is_free(path)  # still the holder's
    lock.release()  # not held: nothing to give back
    fcntl.flock(holder, fcntl.LOCK_UN)
    lock.acquire(timeout_ms=200)
    assert not lock_file_is_free(path)
    lock.release()
    assert lock_file_is_free(path)
    lock.close()
    os.close(holder)

"""SQLite commits that give the write lock back before the log is synced
(`gateway/ledger/db.py`, `sync_after_release`), and the server's ledger worker that answers a
group only after that sync (`gateway/server.py`, `GroupWorker`)."""

from __future__ import annotations

import os
import resource
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, NoReturn

import pytest
from sqlalchemy import Engine, text

from gateway.handler import Reply
from gateway.ledger import db, make_engine, unit_of_work
from gateway.ledger.db import (
    EXIT_LOG_SYNC_FAILED,
    deferring_log_syncs,
    reading,
    reading_driver,
    settle_log_syncs,
    sync_after_release,
    take_owed_log_syncs,
)
from gateway.server import GroupWorker, _serving_ledger

ROOT = Path(__file__).resolve().parents[1]


class Journal:
    """What happened, in order: writer lock given back, log syncs (with the file synced)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[str] = []
        self.synced_inodes: list[int] = []
        release = db._WriterLock.release
        fdatasync = os.fdatasync

        def released(lock: Any) -> None:
            if lock._held:
                self.events.append("released")
            release(lock)

        def synced(descriptor: int) -> None:
            self.synced_inodes.append(os.fstat(descriptor).st_ino)
            self.events.append("synced")
            fdatasync(descriptor)

        monkeypatch.setattr(db._WriterLock, "release", released)
        monkeypatch.setattr(db.os, "fdatasync", synced)


def write(engine: Engine, journal: Journal | None = None) -> None:
    with unit_of_work(engine) as session:
        session.execute(text("INSERT INTO notes (body) VALUES ('x')"))
    if journal is not None:
        journal.events.append("returned")


def synchronous(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("PRAGMA synchronous").scalar_one())


def test_by_default_sqlite_syncs_inside_the_commit(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(monkeypatch)
    write(engine, journal)
    assert synchronous(engine) == 2  # FULL
    assert "synced" not in journal.events  # SQLite's own sync, not ours


def test_the_lock_is_given_back_then_the_log_synced_then_the_unit_of_work_returns(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_after_release(engine)
    journal = Journal(monkeypatch)
    write(engine, journal)
    assert journal.events == ["released", "synced", "returned"]
    assert journal.synced_inodes == [(tmp_path / "ledger.db-wal").stat().st_ino]
    assert synchronous(engine) == 1  # NORMAL: the commit itself does not sync


def test_a_unit_of_work_that_fails_syncs_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_after_release(engine)
    journal = Journal(monkeypatch)
    with pytest.raises(RuntimeError), unit_of_work(engine) as session:
        session.execute(text("INSERT INTO notes (body) VALUES ('x')"))
        raise RuntimeError("declined halfway")
    assert "synced" not in journal.events
    assert take_owed_log_syncs() == []


def read_through_sqlalchemy(engine: Engine) -> int:
    with reading(engine) as connection:
        return int(connection.execute(text("SELECT count(*) FROM notes")).scalar_one())


def read_on_the_driver(engine: Engine) -> int:
    with reading_driver(engine) as driver:
        return int(driver.execute("SELECT count(*) FROM notes").fetchone()[0])


@pytest.mark.parametrize("read", [read_through_sqlalchemy, read_on_the_driver])
def test_a_read_owes_a_sync_before_anything_is_answered_from_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, read: Any
) -> None:
    """A snapshot may have seen another connection's commit whose log is not synced yet."""
    sync_after_release(engine)
    journal = Journal(monkeypatch)
    assert read(engine) == 0
    assert journal.events == []
    settle_log_syncs()
    assert journal.events == ["synced"]
    settle_log_syncs()  # owed once, synced once
    assert journal.events == ["synced"]


def test_a_deferring_thread_hands_its_syncs_over(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_after_release(engine)
    journal = Journal(monkeypatch)
    with deferring_log_syncs():
        write(engine, journal)
        write(engine, journal)
        settle_log_syncs()  # deferred: still nothing
        assert journal.events == ["released", "returned", "released", "returned"]
        owed = take_owed_log_syncs()
    assert len(owed) == 1  # one log, however many commits
    assert take_owed_log_syncs() == []
    owed[0]()
    assert journal.events[-1] == "synced"
    write(engine, journal)  # no longer deferring: synced before it returns
    assert journal.events[-3:] == ["released", "synced", "returned"]


def test_with_no_log_there_is_nothing_to_sync(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last connection to close checkpoints the log into the synced database file and
    removes it."""
    sync_after_release(engine)
    write(engine)
    engine.dispose()
    assert not (tmp_path / "ledger.db-wal").exists()
    journal = Journal(monkeypatch)
    db._LOG_SYNCS[engine]()
    assert journal.events == []


class StoppedError(Exception):
    """What `FailureHook` raises where the default hook would end the process."""


class FailureHook:
    """A failure hook for `sync_after_release` that keeps each failure and stops the unit of
    work (`StoppedError`) instead of the process."""

    def __init__(self) -> None:
        self.failures: list[OSError] = []

    def __call__(self, error: OSError) -> NoReturn:
        self.failures.append(error)
        raise StoppedError


def test_a_failed_sync_goes_to_the_failure_hook(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = FailureHook()

    def broken(_descriptor: int) -> None:
        raise OSError(5, "Input/output error")

    sync_after_release(engine, on_failure=stop)
    monkeypatch.setattr(db.os, "fdatasync", broken)
    with pytest.raises(StoppedError):
        write(engine)
    assert [error.errno for error in stop.failures] == [5]


def _removed(tmp_path: Path) -> None:
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)


def _renamed_over(tmp_path: Path) -> None:
    other = tmp_path / "backup.db"
    sqlite3.connect(other).close()
    other.replace(tmp_path / "ledger.db")


def _log_removed(tmp_path: Path) -> None:
    (tmp_path / "ledger.db-wal").unlink()


@pytest.mark.parametrize("fault", [_removed, _renamed_over, _log_removed])
def test_a_ledger_file_removed_or_replaced_while_open_is_a_failed_sync(
    engine: Engine, tmp_path: Path, fault: Any
) -> None:
    """`rm ledger.db*` or a backup renamed over the ledger while the gateway has it open:
    its connections go on writing to files no path names, so each commit would be answered
    and lost at the next start. The sync says so instead (by default the process ends, exit
    74), naming the file, and nothing more is answered."""
    stop = FailureHook()
    sync_after_release(engine, on_failure=stop)
    write(engine)
    held = engine.connect()  # connections open, as the serving gateway always has
    engine.connect().close()  # the next write's, pooled, open on the file
    try:
        fault(tmp_path)
        with pytest.raises(StoppedError):
            write(engine)
    finally:
        held.close()
    [failure] = stop.failures
    assert "ledger.db" in str(failure.filename)
    assert "while the ledger was open" in str(failure.strerror)


def test_a_process_out_of_descriptors_still_syncs_the_log(engine: Engine) -> None:
    """A flood of terminal connections can take every descriptor the process may have: the
    log's sync needs none of its own (it holds the log's), so the commits are synced and
    answered. It opened the log for every sync: EMFILE, taken for a failed disk, ended the
    gateway with exit 74, which a service manager does not restart."""
    stop = FailureHook()
    sync_after_release(engine, on_failure=stop)
    held = engine.connect()  # as the serving gateway holds one
    write(engine)  # the log's descriptor taken
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spent: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        with pytest.raises(OSError, match="Too many open files"):
            while True:
                spent.append(os.open(os.devnull, os.O_RDONLY))
        db._LOG_SYNCS[engine]()  # as after a commit
    finally:
        for descriptor in spent:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        held.close()
    assert stop.failures == []


def test_by_default_a_failed_sync_ends_the_process(tmp_path: Path) -> None:
    """Commits whose durability is unknown are visible: nothing more may be answered."""
    script = textwrap.dedent(
        f"""
        import os
        from sqlalchemy import text
        from gateway.ledger import make_engine, unit_of_work
        from gateway.ledger.db import sync_after_release
        engine = make_engine("sqlite:///{tmp_path / "ledger.db"}")
        with unit_of_work(engine) as session:
            session.execute(text("CREATE TABLE notes (body TEXT)"))
        sync_after_release(engine)
        def broken(descriptor):
            raise OSError(5, "Input/output error")
        os.fdatasync = broken
        with unit_of_work(engine) as session:
            session.execute(text("INSERT INTO notes VALUES ('x')"))
        print("answered")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_LOG_SYNC_FAILED
    assert "answered" not in result.stdout
    assert "could not be synced (Input/output error)" in result.stderr


def test_only_a_sqlite_file_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = make_engine("sqlite:///:memory:")
    sync_after_release(memory)
    assert memory not in db._LOG_SYNCS
    assert synchronous(memory) == 2


class Reactor:
    """callFromThread records which requests it delivers, then runs the delivery at once."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def callFromThread(self, function: Any, deferreds: Any, replies: Any) -> None:
        self.events += [f"delivered {reply.payload.decode()}" for reply in replies]
        function(deferreds, replies)


def deciding(engine: Engine, events: list[str]) -> Any:
    def decide(payloads: list[bytes]) -> list[Reply]:
        with unit_of_work(engine) as session:
            session.execute(text("INSERT INTO notes (body) VALUES ('x')"))
        events.extend(f"decided {payload.decode()}" for payload in payloads)
        return [Reply(payload, {"event": "answered"}) for payload in payloads]

    return decide


def test_the_worker_answers_a_group_only_after_its_commit_is_synced(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_after_release(engine)
    journal = Journal(monkeypatch)
    worker = GroupWorker(deciding(engine, journal.events), Reactor(journal.events))
    worker.start()
    answer = worker.submit(b"one")
    worker.stop()
    assert answer.called
    assert journal.events == ["released", "decided one", "synced", "delivered one"]


def test_the_ledger_thread_goes_on_while_the_log_syncs(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync_after_release(engine)
    events: list[str] = []
    gate = threading.Event()
    syncing = threading.Event()
    fdatasync = os.fdatasync

    def slow_sync(descriptor: int) -> None:
        events.append("synced")
        syncing.set()
        gate.wait(10)
        fdatasync(descriptor)

    monkeypatch.setattr(db.os, "fdatasync", slow_sync)
    worker = GroupWorker(deciding(engine, events), Reactor(events))
    worker.start()
    first = worker.submit(b"first")
    assert syncing.wait(10)
    second = worker.submit(b"second")
    waited = threading.Event()
    while "decided second" not in events and not waited.wait(0.01):
        pass
    # The second group is decided (it may read the first's commit) while the first's sync
    # is under way, and neither is answered until a sync that began after it was decided.
    assert "decided second" in events
    assert not first.called and not second.called
    gate.set()
    worker.stop()
    assert first.called and second.called
    for name in ("first", "second"):
        decided = events.index(f"decided {name}")
        delivered = events.index(f"delivered {name}")
        assert "synced" in events[decided:delivered], events


def test_vipgate_serve_serves_sqlite_this_way(engine: Engine) -> None:
    checkpointer = _serving_ledger(engine)
    assert checkpointer is not None
    try:
        assert engine in db._LOG_SYNCS
        assert synchronous(engine) == 1
    finally:
        checkpointer.stop()

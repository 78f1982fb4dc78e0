"""Engines, sessions and units of work that behave the same on SQLite and PostgreSQL.

The ledger's safety rests on two things the database must give: a change is durable when its
commit returns, and two writers to one card never interleave. SQLite gives both only when told
(WAL with synchronous=FULL, and transactions that take the write lock at BEGIN IMMEDIATE rather
than at their first write, which pysqlite's own transaction handling cannot do); PostgreSQL
gives them with row locks (`SELECT ... FOR UPDATE`, taken by the operations themselves on the
card and its lots). Everything that opens a connection to the ledger goes through here.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_POOL_SIZE = 5
POSTGRES_MAX_OVERFLOW = 10
POSTGRES_POOL_TIMEOUT_S = 30
POSTGRES_CONNECT_TIMEOUT_S = 10

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine for `sqlite:///PATH` or `postgresql+psycopg://...`; anything else is refused."""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(url)
    if backend == "postgresql":
        return _postgres_engine(url)
    raise ValueError(f"unsupported database backend {backend!r}: use sqlite or postgresql")


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite: it would BEGIN late (deferred) and
        # not at all before SELECTs, so a read-then-write could race another writer.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get(_READ_ONLY):
            # A snapshot read (WAL): it neither takes nor waits for the write lock.
            connection.exec_driver_sql("BEGIN DEFERRED")
            return
        # The write lock is taken here, so two units of work on one file run one after the
        # other (the second waits up to the busy timeout) instead of failing at commit.
        writer_lock = connection.connection.info.get(_WRITER_LOCK)
        if writer_lock is not None:
            writer_lock.acquire()
        try:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            if writer_lock is not None:
                writer_lock.release()
            raise

    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        _queue_writers(engine, Path(database))
    return engine


_WRITER_LOCK = "vipgate.writer_lock"
_READ_ONLY = "vipgate_read_only"


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads only: on SQLite its transaction is a snapshot that does not
    take the write lock, so it runs while another unit of work writes or commits."""
    with engine.connect() as connection:
        yield connection.execution_options(**{_READ_ONLY: True})


class _WriterLock:
    """A queue in front of SQLite's write lock, shared by every process on the file.

    SQLite makes a writer that finds the file locked sleep and retry (1, 2, 5, 10 ... 100 ms),
    so with several gateway processes on one file a waiting group could sleep long after the
    lock was free. An exclusive `flock` on a file beside the database is taken before
    `BEGIN IMMEDIATE` and given back when the connection returns to the pool: a waiter looks
    again within a millisecond of the lock being free. The kernel drops the lock of a process
    that dies. Connections that do not take it (another program) still meet SQLite's
    own lock and busy timeout, as before."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._held = False

    def acquire(self, timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
        """Wait for the lock, looking again every millisecond at most. After `timeout_ms`
        the caller goes on without it and SQLite's own busy timeout decides, so a holder that
        never lets go costs what it always did (an error after the busy timeout), not a hang."""
        if self._held:
            return
        deadline = time.monotonic_ns() + timeout_ms * 1_000_000
        pause = 0.0001
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic_ns() >= deadline:
                    return
                time.sleep(pause)
                pause = min(2 * pause, 0.001)
                continue
            self._held = True
            return

    def release(self) -> None:
        if self._held:
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


def _queue_writers(engine: Engine, database: Path) -> None:
    path = database.with_name(database.name + ".writer-lock")

    @event.listens_for(engine, "connect")
    def _open(_dbapi_connection: Any, record: Any) -> None:
        record.info[_WRITER_LOCK] = _WriterLock(path)

    @event.listens_for(engine, "checkin")
    def _release(_dbapi_connection: Any, record: Any) -> None:
        lock = record.info.get(_WRITER_LOCK) if record is not None else None
        if lock is not None:
            lock.release()

    @event.listens_for(engine, "close")
    def _close(_dbapi_connection: Any, record: Any) -> None:
        lock = record.info.pop(_WRITER_LOCK, None)
        if lock is not None:
            lock.close()


def _postgres_engine(url: str) -> Engine:
    return create_engine(
        url,
        pool_size=POSTGRES_POOL_SIZE,
        max_overflow=POSTGRES_MAX_OVERFLOW,
        pool_timeout=POSTGRES_POOL_TIMEOUT_S,
        pool_pre_ping=True,
        connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
    )


def new_session(engine: Engine) -> Session:
    """A session whose objects stay readable after commit (results outlive the unit of work)."""
    return Session(engine, expire_on_commit=False, autoflush=True)


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Session]:
    """One database transaction: begun on entry, committed on a clean exit, else rolled back.

    Ledger operations take the yielded session and never commit, so several of them (a
    redemption, its authorisation record and the request log entry) commit together, and
    a group of requests can later share one commit.
    """
    session = new_session(engine)
    try:
        with session.begin():
            yield session
    finally:
        session.close()


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the ledger schema up to `revision` (default: the newest), in one transaction."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

"""Engines, sessions and units of work that behave the same on SQLite and PostgreSQL.

The ledger's safety rests on two things the database must give: a change is durable when its
unit of work returns, and two writers to one card never interleave. SQLite gives both only when
told (WAL with synchronous=FULL, or NORMAL with the log synced by `unit_of_work` itself, see
`sync_after_release`; and transactions that take the write lock at BEGIN IMMEDIATE rather than
at their first write, which pysqlite's own transaction handling cannot do); PostgreSQL
gives them with row locks (`SELECT ... FOR UPDATE`, taken by the operations themselves on the
card and its lots). Everything that opens a connection to the ledger goes through here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn
from weakref import WeakKeyDictionary

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection

SQLITE_BUSY_TIMEOUT_MS = 30_000
# A serving gateway waits less: twice this (the lock file's queue, then SQLite's own) stays
# well inside the 60 s a terminal waits for its answer (pos-8583.md §1), so a group held up by
# another process (a clearing run) is answered `96` while the terminal still listens.
SERVING_BUSY_TIMEOUT_MS = 12_000
POSTGRES_POOL_SIZE = 5
POSTGRES_MAX_OVERFLOW = 10
POSTGRES_POOL_TIMEOUT_S = 30
POSTGRES_CONNECT_TIMEOUT_S = 10
# libpq's options for every PostgreSQL connection, unless the database URL names them
# (`?tcp_user_timeout=20000`). A server whose host stops answering (a crash, a cable, a
# failover) drops packets rather than refusing them, and the kernel would retransmit for
# minutes while a ledger thread waits on its socket: data the server has not acknowledged
# for `tcp_user_timeout` ms ends the link, and an idle link is probed after
# `keepalives_idle` s, every `keepalives_interval` s, given up after `keepalives_count`
# probes unanswered. A server that is only slow still acknowledges at once (its kernel
# does), so a long statement is not cut short.
# A failure of the link itself (no answer from the server) that took this long was a wait
# for one of those timeouts, not a refusal: the server's host is silent, and trying again at
# once would only wait as long again (`link_lost`).
LINK_LOST_AFTER_S = 1.0
# After such a failure the WAL flush connection is not opened again for this long: every unit
# of work takes a ticket, and each would otherwise wait a `connect_timeout` for it.
FLUSH_REOPEN_AFTER_S = 5.0
POSTGRES_LINK_OPTIONS: dict[str, int] = {
    "connect_timeout": POSTGRES_CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, *, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> Engine:
    """An engine for `sqlite:///PATH` or `postgresql+psycopg://...`; anything else is refused.
    On SQLite a writer waits up to `busy_timeout_ms` in the lock file's queue, then as long
    again for SQLite's own lock."""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(url, busy_timeout_ms)
    if backend == "postgresql":
        return _postgres_engine(url)
    raise ValueError(f"unsupported database backend {backend!r}: use sqlite or postgresql")


def _sqlite_engine(url: str, busy_timeout_ms: int) -> Engine:
    database = make_url(url).database or ""
    on_file = database not in ("", ":memory:") and not database.startswith("file:")
    options: dict[str, Any] = {}
    if on_file:
        # The connection given back last is handed out first. A connection whose database
        # another connection changed since its last transaction starts the next one with an
        # empty page cache, and handing connections out in turn (the default) made that the
        # rule for the ledger thread rather than the exception.
        options["pool_use_lifo"] = True
    engine = create_engine(
        url,
        connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
        **options,
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
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
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
        pooled = connection.connection
        writer_lock = pooled.info.get(_WRITER_LOCK)
        if writer_lock is not None:
            writer_lock.acquire(busy_timeout_ms)
        try:
            # On the driver's connection: SQLAlchemy's execution machinery around one fixed
            # statement cost every unit of work about 25 us. Its errors become SQLAlchemy's,
            # as they would have been (`OperationalError` for a lock not had in time).
            try:
                pooled.driver_connection.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise DBAPIError.instance(
                    "BEGIN IMMEDIATE", None, error, sqlite3.Error, hide_parameters=True
                ) from error
        except BaseException:
            if writer_lock is not None:
                writer_lock.release()
            raise

    if on_file:
        _queue_writers(engine, Path(database))
    return engine


_WRITER_LOCK = "vipgate.writer_lock"
# How long a waiting writer sleeps at most before it looks at the lock again. With two serving
# processes the lock changes hands about 90 times a second each; at 1 ms a hand-over left the
# lock idle for about half of that, at 0.2 ms the throughput was about 6% higher (7 runs of
# each, alternated), for no more CPU per request.
LOCK_LOOK_MAX_S = 0.0002
_READ_ONLY = "vipgate_read_only"
_JOINED_CONNECTION = "vipgate.joined_connection"


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads only: on SQLite its transaction is a snapshot that does not
    take the write lock, so it runs while another unit of work writes or commits.

    With `sync_after_release`, the snapshot may have seen a commit whose log is not synced
    yet: the thread owes a sync (`settle_log_syncs`) before it answers from what it read."""
    ticket = _ticket(engine)
    with engine.connect() as connection:
        yield connection.execution_options(**{_READ_ONLY: True})
    _owe(ticket)


@contextmanager
def reading_driver(engine: Engine) -> Iterator[Any]:
    """The driver's own connection, for one read statement on a path too hot for SQLAlchemy's
    execution machinery: on SQLite the statement runs alone, outside any transaction, so it
    reads a snapshot and takes no write lock; on PostgreSQL the pool rolls its transaction
    back when the connection goes back. Errors are the driver's (`engine.dialect.loaded_dbapi.
    Error`). The thread owes a sync afterwards, as after `reading`.

    On SQLite, a thread that holds a connection (`holding_connection`) reads on it, between
    its units of work: a second connection would find its page cache stale after every
    commit of the first, and read those pages again. On PostgreSQL such a thread keeps a
    second connection for its reads, in autocommit (`_held_reader`): one round trip a read,
    where a connection taken from the pool for it cost four (the pool's ping, BEGIN, the
    statement, and the ROLLBACK as it went back)."""
    ticket = _ticket(engine)
    held: dict[Engine, Connection | None] | None = getattr(_THREAD, "held", None)
    if held is not None and engine in held and engine.dialect.name == "postgresql":
        with _held_reader(engine) as driver:
            yield driver
        _owe(ticket)
        return
    connection = held.get(engine) if held is not None and engine.dialect.name == "sqlite" else None
    if connection is not None and not connection.closed and not _in_transaction(connection):
        yield connection.connection.driver_connection
    else:
        raw = engine.raw_connection()
        try:
            yield raw.driver_connection
        finally:
            raw.close()
    _owe(ticket)


@contextmanager
def _held_reader(engine: Engine) -> Iterator[Any]:
    """The holding thread's reading connection on a PostgreSQL engine, in autocommit: each
    statement its own snapshot, as a read in a transaction of its own was. Taken from the
    pool (pinged) when there is none; idle for `READER_PING_AFTER_S`, or told something by
    the server meanwhile (`_has_word`), it is asked whether it is still there first (a
    PostgreSQL restart ends it, and the group's read would fail where the pool's ping would
    have taken another); one whose read failed is given up (invalidated), and the next read
    takes another."""
    readers: dict[Engine, _Reader] = _THREAD.__dict__.setdefault("readers", {})
    reader = readers.get(engine)
    now = time.monotonic()
    if reader is not None and (
        now - reader.used > READER_PING_AFTER_S or _has_word(reader.connection.driver_connection)
    ):
        try:
            reader.connection.driver_connection.execute("SELECT 1")  # type: ignore[union-attr]
        except engine.dialect.loaded_dbapi.Error:
            del readers[engine]
            reader.connection.invalidate()
            reader = None
            if link_lost(time.monotonic() - now):
                raise  # a silent server: a new connection would wait as long again
    if reader is None:
        connection = engine.raw_connection()
        try:
            connection.driver_connection.autocommit = True  # type: ignore[union-attr]
        except BaseException:
            connection.invalidate()
            raise
        reader = readers[engine] = _Reader(connection)
    reader.used = now
    try:
        yield reader.connection.driver_connection
    except BaseException:
        readers.pop(engine, None)
        reader.connection.invalidate()
        raise


def _has_word(driver: Any) -> bool:
    """Whether the server sent something to an idle driver connection, without a round
    trip: a server that stops (a restart, `pg_terminate_backend`) says so and closes the
    socket, however soon it is back. Then the connection is pinged before it is counted on
    (`_held_reader`, `_WalFlush.ticket`)."""
    try:
        fileno = driver.fileno()
    except Exception:  # closed: the ping says so
        return True
    watch = select.poll()
    watch.register(fileno, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(watch.poll(0))


# A held reading connection idle this long is pinged before a read (`_held_reader`), as the
# flush connection is before a commit counts on it (`FLUSH_PING_AFTER_S`); so is one the
# server sent something to meanwhile (`_has_word`).
READER_PING_AFTER_S = 0.5


@dataclass
class _Reader:
    connection: PoolProxiedConnection
    used: float = 0.0


def _close_held_reader(engine: Engine) -> None:
    """The holding thread's reading connection given up when its hold ends (not back to the
    pool: other users of the pool expect a connection that is not in autocommit)."""
    readers: dict[Engine, _Reader] | None = getattr(_THREAD, "readers", None)
    reader = None if readers is None else readers.pop(engine, None)
    if reader is not None:
        reader.connection.invalidate()


class _WriterLock:
    """A queue in front of SQLite's write lock, shared by every process on the file.

    SQLite makes a writer that finds the file locked sleep and retry (1, 2, 5, 10 ... 100 ms),
    so with several gateway processes on one file a waiting group could sleep long after the
    lock was free. An exclusive `flock` on a file beside the database is taken before
    `BEGIN IMMEDIATE` and given back when the connection returns to the pool: a waiter looks
    again within `LOCK_LOOK_MAX_S` (0.2 ms) of the lock being free. The kernel drops the lock
    of a process that dies. Connections that do not take it (another program) still meet
    SQLite's own lock and busy timeout, as before."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._held = False

    def acquire(self, timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
        """Wait for the lock, looking again every `LOCK_LOOK_MAX_S` at most. After `timeout_ms`
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
                pause = min(2 * pause, LOCK_LOOK_MAX_S)
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


def sync_after_release(
    engine: Engine, on_failure: Callable[[OSError], NoReturn] | None = None
) -> None:
    """Commit without syncing, give the write lock back, then sync the log: for a serving
    SQLite engine, where the lock is what every group of every process queues for.

    With synchronous=FULL, SQLite syncs the write-ahead log inside the commit, so the write
    lock is held while the disk works, and the next group (of this process or another) waits
    for that sync. From here on this engine's connections commit with synchronous=NORMAL, and
    `unit_of_work` syncs the log itself (`fdatasync`) after the connection (and with it the
    lock) is given back, and before it returns (`settle_log_syncs`). So:
    - a unit of work still returns only when its commit is on disk, exactly as with FULL
      (unless its thread defers the sync, `deferring_log_syncs`: the server's ledger thread
      then hands it to a thread that syncs before any answer leaves);
    - the next group writes while the disk syncs the last one;
    - a group that read a commit not yet synced returns after a sync that began after that
      read: the log is one file, written in order, so that sync covers the commit too. Nothing
      that depends on a commit is answered before the commit is on disk;
    - checkpoints with NORMAL sync the log before copying it and the database file after, so
      a commit the checkpoint copied is on disk whatever happens to the log afterwards.

    A failed sync leaves commits visible whose durability is unknown, and the kernel may not
    report the failure twice; `on_failure` (by default: say so on stderr and end the process
    at once, exit 74) must not return, so that nothing more is answered from that state.

    On PostgreSQL the same, with the server's WAL for the log (`_WalFlush`): the engine's
    connections commit with `synchronous_commit = off`, so a group's COMMIT returns, and its
    row locks are given back, before the WAL is flushed; the flush is a commit of its own,
    durable, on a connection of its own, which PostgreSQL returns only once the WAL is
    flushed past it, and so past every commit before it (and on a synchronous standby too,
    when one is named). A flush that fails raises `CommitOutcomeUnknownError` instead of
    ending the process (a PostgreSQL restart must not stop the gateway): those commits'
    answers are not given.

    Elsewhere (`:memory:`, a SQLite URI) this changes nothing."""
    if engine.dialect.name == "postgresql":
        _LOG_SYNCS[engine] = _WalFlush(engine)
        event.listen(engine, "connect", _commit_asynchronously)
        engine.dispose()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return
    if database.startswith("file:"):
        return
    engine.dispose()  # connections already open were told FULL; none is open from here
    _LOG_SYNCS[engine] = _LogSync(engine, Path(database), on_failure or _end_process)
    event.listen(engine, "connect", _commit_without_sync)


class _LogSync:
    """`fdatasync` of a SQLite database's write-ahead log (`PATH-wal`), once the database
    file at PATH is seen to be still the one the engine opened.

    A database file removed or replaced while the engine's connections have it open (`rm`,
    a backup renamed over it) leaves them writing to a file no path names: each commit would
    go on being answered, and be lost at the next start. So is a log removed while any
    connection is open (SQLite removes it only when the last one closes). Either is a failed
    sync (`on_failure`)."""

    def __init__(
        self, engine: Engine, database: Path, on_failure: Callable[[OSError], NoReturn]
    ) -> None:
        self.path = database.with_name(database.name + "-wal")
        self._database = database
        self._identity = _file_identity(os.stat(database))
        self._on_failure = on_failure
        self._open = 0  # the engine's connections open now
        self._counting = threading.Lock()
        # The log's descriptor, held from one sync to the next: a sync then needs no new
        # descriptor, which a process out of them (a flood of connections) could not have;
        # opened again only when the log at the path is another file (SQLite made it anew).
        self._descriptor: int | None = None
        self._held: tuple[int, int] | None = None
        self._syncing = threading.Lock()
        event.listen(engine, "connect", self._opened)
        event.listen(engine, "close", self._closed)
        event.listen(engine, "close_detached", self._closed)

    def _opened(self, _dbapi_connection: Any, _record: Any) -> None:
        with self._counting:
            self._open += 1

    def _closed(self, _dbapi_connection: Any, _record: Any = None) -> None:
        with self._counting:
            self._open -= 1
            last = self._open == 0
        if last:  # SQLite removes the log as the last connection closes: let it go
            with self._syncing:
                self._let_go()

    def __call__(self) -> None:
        with self._syncing:
            try:
                if _file_identity(os.stat(self._database)) != self._identity:
                    self._on_failure(_gone(self._database, "replaced"))
                descriptor = self._log_descriptor()
            except FileNotFoundError as error:
                if self._open > 0 or error.filename != str(self.path):
                    self._on_failure(_gone(Path(str(error.filename)), "removed"))
                # No log and no connection: the last one to close checkpointed the log into
                # the database file, synced that file, and removed it. Every commit is there.
                self._let_go()
                return
            except OSError as error:
                self._on_failure(error)
            try:
                os.fdatasync(descriptor)
            except OSError as error:
                self._on_failure(error)

    def _log_descriptor(self) -> int:
        """The held descriptor of the log at `path`, opened again if that is another file."""
        at_path = _file_identity(os.stat(self.path))
        if self._descriptor is not None and at_path == self._held:
            return self._descriptor
        self._let_go()
        descriptor = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._descriptor, self._held = descriptor, _file_identity(os.fstat(descriptor))
        return descriptor

    def _let_go(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = self._held = None

    def ticket(self) -> _LogSync:
        """What a commit made from now on owes: the log's sync (any later one covers it)."""
        return self


# The flush: a transaction that writes a record to the WAL (a logical decoding message, which
# any role may write and every decoder that did not ask for them skips) and commits with
# `synchronous_commit = on`. A transaction that wrote nothing to the WAL before its commit
# record (one that only took an id, say) is committed without waiting for the flush.
FLUSH_STATEMENT = "SELECT pg_logical_emit_message(true, 'vipgate-flush', '')"

# A flush connection idle this long is asked whether it is still there before a commit
# counts on it (after an outage it is gone, and the first answers after would be lost).
FLUSH_PING_AFTER_S = 0.5


class _WalFlush:
    """PostgreSQL's WAL flushed past every commit made so far, on a connection of its own.

    The flush is a transaction that writes to the WAL and commits with `synchronous_commit =
    on` (`FLUSH_STATEMENT`): the server answers once the WAL is on disk up to its commit
    record, which comes after the commit record of every transaction committed before it.
    That holds only within one run of the server, and a connection lives no longer than
    that run: so a commit is confirmed only by a flush on the connection that was open
    before it began (`ticket`, taken then). One that began while this connection was
    broken, or before it was opened again, may have been lost in a crash and is never
    confirmed."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._driver: Any = None
        self._generation = 0  # how many times the connection was opened
        self._used_at = 0.0  # monotonic: when the connection last answered
        self._silent_until = 0.0  # monotonic: no connection opened before then
        # A server away now (a worker replaced during an outage) is tried again by the first
        # ticket: the process starts, and answers `96` until the server is back.
        self._open_quietly()

    def ticket(self) -> _FlushTicket:
        """What a commit made from now on owes: a flush on the connection open now (opened
        again here if it was lost: taken before the commit begins, so it is in time)."""
        if (
            self._driver is None
            or time.monotonic() - self._used_at > FLUSH_PING_AFTER_S
            or (not self._lock.locked() and _has_word(self._driver))
        ):
            # Lost, idle a while (an outage, a quiet night), or the server said something
            # while no flush was running (a restart ends the connection and says so, however
            # soon the server is back): is it still there? A flush on a connection a restart
            # ended would fail the next answers. Only then the lock: under load a flush holds
            # it while the disk works, and the ledger thread must not wait for that to begin
            # its next group.
            with self._lock:
                if self._driver is not None:
                    began = time.monotonic()
                    try:
                        self._driver.execute("SELECT 1")
                        self._used_at = time.monotonic()
                    except Exception:
                        self._close()
                        self._silent_if_slow(began)
                if self._driver is None and time.monotonic() >= self._silent_until:
                    self._open_quietly()
        # The generation first: a connection closed after this read fails the flush, and one
        # opened after it has a generation of its own, so the ticket never vouches too much.
        generation = self._generation
        return _FlushTicket(self, generation if self._driver is not None else -1)

    def confirm(self, generation: int) -> None:
        with self._lock:
            if self._driver is None or generation != self._generation:
                raise CommitOutcomeUnknownError(
                    "the ledger's WAL flush connection was lost after that commit"
                )
            try:
                self._driver.execute(FLUSH_STATEMENT)
                self._used_at = time.monotonic()
            except Exception as error:
                self._close()
                reason = f"the ledger's WAL flush failed: {error}"
                raise CommitOutcomeUnknownError(reason) from error

    def _open(self) -> None:
        connection = self._engine.raw_connection()
        driver: Any = connection.driver_connection
        connection.detach()  # ours for good, never handed to a unit of work
        driver.rollback()  # whatever the pool began (its ping)
        driver.autocommit = True
        driver.execute("SET synchronous_commit = on")
        self._driver = driver
        self._generation += 1
        self._used_at = time.monotonic()

    def _open_quietly(self) -> None:
        began = time.monotonic()
        try:
            self._open()
        except Exception:  # the server is still away: the next flush tries again
            self._driver = None
            self._silent_if_slow(began)

    def _silent_if_slow(self, began: float) -> None:
        """After a failure that waited out a link timeout (a silent server host), open no
        connection for `FLUSH_REOPEN_AFTER_S`: the units of work's tickets meanwhile vouch for
        nothing (their answers are not given, as after any lost flush connection) rather
        than each waiting for a connection. A refusal (a restart) fails at once, and the
        next ticket tries again."""
        now = time.monotonic()
        if link_lost(now - began):
            self._silent_until = now + FLUSH_REOPEN_AFTER_S

    def _close(self) -> None:
        driver, self._driver = self._driver, None
        with contextlib.suppress(Exception):  # already broken
            driver.close()


class _FlushTicket:
    """A commit's claim on `_WalFlush`: equal claims share one flush."""

    __slots__ = ("flush", "generation")

    def __init__(self, flush: _WalFlush, generation: int) -> None:
        self.flush = flush
        self.generation = generation

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _FlushTicket)
            and other.flush is self.flush
            and other.generation == self.generation
        )

    def __hash__(self) -> int:
        return hash((id(self.flush), self.generation))

    def __call__(self) -> None:
        self.flush.confirm(self.generation)


def _commit_asynchronously(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("SET synchronous_commit = off")
    dbapi_connection.commit()  # a SET inside a transaction rolled back would not stay


_LOG_SYNCS: WeakKeyDictionary[Engine, _LogSync | _WalFlush] = WeakKeyDictionary()
_THREAD = threading.local()


def _ticket(engine: Engine) -> Callable[[], None] | None:
    """What a unit of work (or a read) starting now will owe once done, taken before it
    begins: a WAL flush confirms a commit only if its connection was open before that commit
    (`_WalFlush`)."""
    log_sync = _LOG_SYNCS.get(engine)
    return None if log_sync is None else log_sync.ticket()


def _owe(ticket: Callable[[], None] | None) -> None:
    if ticket is not None:
        _THREAD.__dict__.setdefault("owed", set()).add(ticket)


def settle_log_syncs() -> None:
    """Sync every log this thread read or wrote since its last sync, now; unless the thread
    defers its syncs (`deferring_log_syncs`), when they wait for `take_owed_log_syncs`."""
    if getattr(_THREAD, "deferring", False):
        return
    for log_sync in take_owed_log_syncs():
        log_sync()


def take_owed_log_syncs() -> list[Callable[[], None]]:
    """The log syncs this thread owes, which it no longer owes: the caller runs them (in
    any thread) before anything read or written since is answered."""
    owed = _THREAD.__dict__.pop("owed", None)
    return list(owed) if owed else []


@contextmanager
def deferring_log_syncs() -> Iterator[None]:
    """Units of work on this thread return without syncing the log (`sync_after_release`):
    the server's ledger thread goes on to the next group while another thread syncs and
    then answers (`take_owed_log_syncs`)."""
    _THREAD.deferring = True
    try:
        yield
    finally:
        _THREAD.deferring = False


def _commit_without_sync(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def _file_identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _gone(path: Path, how: str) -> OSError:
    return OSError(errno.ESTALE, f"{path} was {how} while the ledger was open", str(path))


def _end_process(error: OSError) -> NoReturn:
    # structlog is not imported here: the engine module stays free of the logging set-up.
    message = f"vipgate: the ledger's log could not be synced ({error.strerror}); stopping\n"
    os.write(2, message.encode())
    os._exit(EXIT_LOG_SYNC_FAILED)


# The exit status of a process stopped by a failed log sync (EX_IOERR).
EXIT_LOG_SYNC_FAILED = 74


def _postgres_engine(url: str) -> Engine:
    named = make_url(url).query
    return create_engine(
        url,
        pool_size=POSTGRES_POOL_SIZE,
        max_overflow=POSTGRES_MAX_OVERFLOW,
        pool_timeout=POSTGRES_POOL_TIMEOUT_S,
        pool_pre_ping=True,
        # (SQLAlchemy lets `connect_args` override the URL's own options: the URL's win here.)
        connect_args={k: v for k, v in POSTGRES_LINK_OPTIONS.items() if k not in named},
    )


def new_session(engine: Engine) -> Session:
    """A session whose objects stay readable after commit (results outlive the unit of work)."""
    return Session(engine, expire_on_commit=False, autoflush=True)


class CommitOutcomeUnknownError(SQLAlchemyError):
    """The link to the database broke during COMMIT: the transaction may have committed or
    not, and only a later read can tell. Not a rollback: whoever would answer "nothing
    changed" must not."""


def _commit(commit: Callable[[], None]) -> None:
    try:
        commit()
    except DBAPIError as error:
        if error.connection_invalidated:
            raise CommitOutcomeUnknownError(f"the link broke during COMMIT: {error}") from error
        raise


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Session]:
    """One database transaction: begun on entry, committed on a clean exit, else rolled back.

    Ledger operations take the yielded session and never commit, so several of them (a
    redemption, its authorisation record and the request log entry) commit together, and
    a group of requests can later share one commit. In a thread that holds a connection
    (`holding_connection`), the transaction runs on that connection.
    """
    ticket = _ticket(engine)
    held: dict[Engine, Connection | None] | None = getattr(_THREAD, "held", None)
    if held is not None and engine in held and not _in_transaction(held[engine]):
        # (A unit of work inside another takes a connection of its own, as without the block.)
        with _on_held_connection(engine, held) as session:
            yield session
    else:
        session = new_session(engine)
        try:
            session.begin()
            yield session
            session.flush()  # the statements' errors here, before the COMMIT's
            _commit(session.commit)
        finally:
            session.close()  # rolls back what was not committed
    # With `sync_after_release`: the log is synced after the lock is given back.
    _owe(ticket)
    settle_log_syncs()


@contextmanager
def holding_connection(engine: Engine) -> Iterator[None]:
    """This thread's units of work on `engine` share one connection, kept out of the pool
    until the block ends: for the server's ledger thread, which runs one after another.

    Checking a connection out of the pool, wrapping it and building an ORM session's
    transaction around it, then handing it all back, cost each unit of work about 0.1 ms,
    as much as the SQL of a redemption; a group of a few requests paid it every time. Each
    unit of work is still its own transaction (on SQLite its own `BEGIN IMMEDIATE`, write
    lock and commit), and the write lock is given back at its end, as before. A unit of
    work that fails gives the connection back (the pool rolls it back, or discards it if it
    broke), and the next one takes a fresh one."""
    held: dict[Engine, Connection | None] = _THREAD.__dict__.setdefault("held", {})
    if engine in held:  # already held further up this thread
        yield
        return
    held[engine] = None  # taken from the pool by the first unit of work
    try:
        yield
    finally:
        connection = held.pop(engine, None)
        if connection is not None:
            connection.close()
        _close_held_reader(engine)


@contextmanager
def _on_held_connection(engine: Engine, held: dict[Engine, Connection | None]) -> Iterator[Session]:
    connection = held[engine]
    if connection is None or connection.closed or connection.invalidated:
        connection = held[engine] = engine.connect()
    committed = False
    try:
        transaction = connection.begin()  # on SQLite: the write lock, BEGIN IMMEDIATE
        # The session joins the connection's transaction: its commit flushes (and runs its
        # before_commit hooks) but leaves committing to the transaction; its rollback, after
        # a failed flush, rolls the transaction back.
        session = Session(bind=connection, expire_on_commit=False, autoflush=True)
        session.info[_JOINED_CONNECTION] = connection
        try:
            yield session
            if session.in_transaction():  # the ORM was used (an add begins it too)
                session.commit()  # flush, and run its before_commit hooks
            _commit(transaction.commit)
            committed = True
        finally:
            session.close()
    finally:
        if committed:
            _release_writer_lock(connection)
        else:
            held[engine] = None
            connection.close()  # rolled back on its way into the pool, the lock given back


def joined_connection(session: Session) -> Connection | None:
    """The connection whose transaction `session` joined, when `unit_of_work` ran on a held
    one: the driver-level ledger works on it without beginning the ORM's own transaction,
    whose commit costs a unit of work about 60 us when the ORM did nothing. None otherwise."""
    connection: Connection | None = session.info.get(_JOINED_CONNECTION)
    return connection


def _in_transaction(connection: Connection | None) -> bool:
    return connection is not None and not connection.closed and connection.in_transaction()


def _release_writer_lock(connection: Connection) -> None:
    lock = writers_queue(connection.connection)
    if lock is not None:
        lock.release()


def writers_queue(connection: PoolProxiedConnection) -> _WriterLock | None:
    """The queue of a pooled connection to a SQLite file that its writers wait in before
    `BEGIN IMMEDIATE` (`_WriterLock`); None for any other database."""
    lock: _WriterLock | None = connection.info.get(_WRITER_LOCK)
    return lock


def link_lost(waited_s: float) -> bool:
    """Whether a failure of the link to the database that took `waited_s` was a wait for the
    link's timeouts (`POSTGRES_LINK_OPTIONS`): the server's host is silent. A refused or
    reset connection fails at once."""
    return waited_s >= LINK_LOST_AFTER_S


def ledger_busy(error: BaseException) -> bool:
    """Whether a driver error says another process held the ledger's lock for longer than
    this one would wait: SQLite's "database is locked" once the busy timeout has run out, or
    PostgreSQL's lock_not_available (55P03) under a `lock_timeout`."""
    orig = getattr(error, "orig", error)
    return "database is locked" in str(orig) or getattr(orig, "sqlstate", None) == "55P03"


# What a driver error says of the ledger's storage, and what to do: by SQLite's primary
# result code, or PostgreSQL's SQLSTATE (the server's disk full; its files unreadable).
STORAGE_FAULTS: Final = {
    "damaged": (
        "the ledger file is damaged",
        "run `vipgate ledger check`, and restore the ledger from a backup",
    ),
    "full": ("the disk is full", "free space on its disk and run the command again"),
    "io": (
        "the ledger file could not be read or written",
        "check its disk, then run the command again",
    ),
    "read-only": (
        "the ledger file cannot be written",
        "check the file's and its folder's owner and mode, then run the command again",
    ),
    "server-full": (
        "the database server's disk is full",
        "free space on the server's disk and run the command again",
    ),
    "server-io": (
        "the database server could not read or write its files",
        "check the server's disk and log, then run the command again",
    ),
    "server-read-only": (
        "the database is read-only (a standby, or read-only transactions by default)",
        "point the config's database (or --db) at the primary",
    ),
}
_SQLITE_FAULTS: Final = {11: "damaged", 26: "damaged", 13: "full", 10: "io", 8: "read-only"}
_POSTGRESQL_FAULTS: Final = {
    "53100": "server-full",
    "58030": "server-io",
    "25006": "server-read-only",
}


def storage_fault(error: BaseException) -> str | None:
    """Which of `STORAGE_FAULTS` a driver error is (SQLite: damaged, disk full, I/O error,
    read-only; PostgreSQL: the server's disk full, an I/O error, read-only), or None."""
    orig = getattr(error, "orig", error)
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _SQLITE_FAULTS.get(code & 0xFF)
    return _POSTGRESQL_FAULTS.get(str(getattr(orig, "sqlstate", None)))


def deadlocked(error: BaseException) -> bool:
    """PostgreSQL chose this transaction to break a deadlock or a serialisation conflict: it
    was rolled back whole, and running it again is the remedy."""
    return getattr(getattr(error, "orig", error), "sqlstate", None) in ("40P01", "40001")


# On SQLite a writer waits its turn in the lock file's queue, then SQLite's own busy timeout:
# twice the timeout in all.
LEDGER_WAIT_S = 2 * SQLITE_BUSY_TIMEOUT_MS // 1000
LEDGER_BUSY = (
    f"database: busy: another process held the ledger's lock for over {LEDGER_WAIT_S} s"
    " (a clearing run, say); the work that waited was rolled back; run the command again"
)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the ledger schema up to `revision` (default: the newest), in one transaction."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

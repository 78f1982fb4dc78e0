"""SQLite's write-ahead log copied back into the database file by a thread of its own.

With WAL, a commit appends pages to the log, and from time to time the log is copied back into
the database file (a checkpoint). By default SQLite runs that copy inside the commit that finds
the log past 1,000 pages: that commit, and every request of its group, waits for the copy and
for the database file's `fsync`. Measured on the gateway's 2-core machine at 1,000
redemptions/s offered, one process: p50 9-22 ms with those checkpoints, 6-12.5 ms without.

While `vipgate serve` runs, `Checkpointer` does the copying every `interval_s` on a thread of
its own, with PASSIVE checkpoints: they copy what no reader still needs and never wait for or
block a writer. The serving connections keep an automatic checkpoint only as a backstop
(`BACKSTOP_PAGES`), so the log stays bounded if the thread ever stops. Durability is unchanged:
a commit is durable when its log pages are synced, before any checkpoint (by SQLite inside the
commit with synchronous=FULL, or right after it by `unit_of_work`, see `sync_after_release`),
and a checkpoint syncs the log before it copies and the database file after.

Copying the log back is not enough to keep it short: SQLite writes the log from its beginning
again only when a writer begins and finds every frame copied. Under steady load a commit always
lands while a PASSIVE checkpoint copies and syncs, so that never happened: the log grew to the
backstop, whose checkpoint ran inside a commit, under the write lock. Measured at 2,000
redemptions/s offered, a group took 10-12 ms instead of 1.6 ms every 0.65 s, and the groups
queued behind it pushed about 2% of the answers past 10 ms. So once the log holds
`RESTART_PAGES`, the thread copies once more (what was committed during its first copy), then
takes the writers' queue (`db.writers_queue`, which every gateway writer waits in before
`BEGIN IMMEDIATE`) and copies the last few frames with no writer in the way. The next writer
starts the log over.

Holding the queue is the one moment writers wait for a checkpoint, and it is not short: the
database file's sync of the pages copied last, scattered over the file, took 2-8.5 ms at
2,000 redemptions/s, and the group waiting behind it took up to 9.5 ms instead of 1.6 ms. So
the log is started over rarely: `RESTART_PAGES` is about 190 MB, every 3 s or so at 2,000/s.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import structlog
from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError

from gateway.ledger.db import writers_queue

log = structlog.get_logger("vipgate.ledger")

# Pages in the log before a serving connection checkpoints by itself (SQLite's default is
# 1,000): about 330 MB with 4 KiB pages, reached only if the checkpoint thread falls behind.
BACKSTOP_PAGES = 80_000
CHECKPOINT_INTERVAL_S = 0.1
# Pages in the log from which a checkpoint has the next writer start the log over: about
# 190 MB with 4 KiB pages; at 2,000 redemptions/s offered, about every 3 s. Each start-over
# holds writers back for a few milliseconds (above); at 6,000 pages (every 0.43 s) 4-6% of
# the answers at 2,000/s took over 10 ms, at 48,000 pages 1.6-2.8%.
RESTART_PAGES = 48_000


class Checkpointer:
    """A thread that checkpoints a SQLite engine's database every `interval_s` (PASSIVE)."""

    def __init__(
        self,
        engine: Engine,
        interval_s: float = CHECKPOINT_INTERVAL_S,
        restart_pages: int = RESTART_PAGES,
    ) -> None:
        if engine.dialect.name != "sqlite":
            raise ValueError("only a SQLite database has a write-ahead log to checkpoint")
        self._engine = engine
        self._interval_s = interval_s
        self._restart_pages = restart_pages
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoints", daemon=True)
        self.checkpoints = 0  # checkpoints run, for tests and curiosity
        self.restarts = 0  # checkpoints that left the log to be started over
        self.failures = 0

    def start(self) -> None:
        """Leave checkpoints to this thread: serving connections opened from now on keep
        only the backstop, and those already open are closed (the pool opens new ones)."""
        event.listen(self._engine, "connect", _backstop_only)
        self._engine.dispose()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join()

    def checkpoint(self) -> tuple[int, int, int]:
        """A PASSIVE checkpoint: (busy, pages in the log, pages copied), as SQLite says. With
        `RESTART_PAGES` or more in the log, all of it copied, two more: one to catch up, one
        in the writers' queue, after which the next writer starts the log over."""
        connection = self._engine.raw_connection()
        try:
            driver: Any = connection.driver_connection
            row = _passive(driver)
            writers = writers_queue(connection)
            if writers is not None and row[0] == 0 and row[1] >= self._restart_pages:
                _passive(driver)
                writers.acquire()  # given back below, or by the pool if that fails
                try:
                    row = _passive(driver)
                finally:
                    writers.release()
                if row[0] == 0 and row[1] == row[2]:
                    self.restarts += 1
        finally:
            connection.close()
        self.checkpoints += 1
        return row

    def _loop(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self.checkpoint()
            except (SQLAlchemyError, sqlite3.Error) as error:
                # The backstop keeps the log bounded; say so once in a while, not every tick.
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.warning("checkpoint_failed", error=str(error), failures=self.failures)


def _passive(driver: Any) -> tuple[int, int, int]:
    busy, pages, copied = driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(busy), int(pages), int(copied)


def _backstop_only(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")

"""Terminal sessions: the working keys a sign-on issues, and how long they live (§4.1, §5.2).

A terminal is signed on from its 0810 until it signs off, signs on again, or the key lifetime
runs out; a failed sign-on leaves any earlier keys as they were. The keys are in the ledger
(`terminal_sessions`, sealed by the security module), written in the request's own ledger
transaction, so they are durable exactly when the 0810 is, and any process, or the same one
after a restart, carries the terminal on (issue 8).

Reading them must cost the hot path almost nothing: a group of requests reads the rows of all
its terminals with one prebuilt statement, and unsealed keys are kept per process under
(terminal, generation). A generation names one sign-on and is never reused, so a cached copy is
used only while the row read for this group still has its generation: keys the ledger no longer
holds (signed off, or on again through another process) are never used. The clock is injected
so that lifetimes are tested without waiting.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import bindparam, delete, insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session as OrmSession

from cardcodec.crypto import Suite
from gateway.clock import Clock
from gateway.ledger.db import reading_driver
from gateway.ledger.models import KeySuite, TerminalSession
from gateway.security import IssuedKeys, KeyHandle, SecurityModule, SecurityModuleError

log = structlog.get_logger("vipgate.sessions")

# While the ledger cannot be read, `ledger_unreachable` is logged again this often.
UNREACHABLE_EVERY_S = 10.0

# Per group one read, on the driver's connection (SQLAlchemy's execution of a compiled
# statement cost more than the read itself); whether the keys still live is compared by the
# database: reading `expires_at` itself would cost more than the rest of the row (SQLite keeps
# it as text, parsed in Python). The statement's text is the same for any number of terminals.
_READ_SQLITE = (
    "SELECT terminal_id, generation, suite, keys_sealed, expires_at > ? FROM terminal_sessions"
    " WHERE terminal_id IN (SELECT value FROM json_each(?))"
)
_READ_POSTGRES = (
    "SELECT terminal_id, generation, suite, keys_sealed, expires_at > %s FROM terminal_sessions"
    " WHERE terminal_id = ANY(%s)"
)
# Per sign-on one delete and one insert, per sign-off a delete.
_END = delete(TerminalSession).where(TerminalSession.terminal_id == bindparam("terminal"))
_START = insert(TerminalSession).returning(TerminalSession.generation)


@dataclass(frozen=True)
class Session:
    """A signed-on terminal's keys (a handle of the security module) from one sign-on."""

    terminal_id: str
    suite: Suite
    keys: KeyHandle
    generation: int

    @property
    def has_tdk(self) -> bool:
        return self.keys.has_tdk


@dataclass(frozen=True)
class SessionView:
    """The sessions of one group's terminals as the ledger held them when the group began.

    `available` is False when the ledger could not be read: then no request can be checked,
    and one that needs keys is answered `96` rather than told it is not signed on.
    """

    sessions: dict[str, Session]
    available: bool = True

    def get(self, terminal_id: str) -> Session | None:
        return self.sessions.get(terminal_id)


UNAVAILABLE = SessionView({}, available=False)

# What a process keeps of a terminal's sign-on: its generation and its `Session` (None when the
# keys did not open); every group that reads the row with this generation shares the `Session`.
_Entry = tuple[int, Session | None]


class Sessions:
    """Sessions in the ledger, with this process's cache of the keys it has unsealed."""

    def __init__(
        self, engine: Engine, clock: Clock, lifetime: timedelta, security: SecurityModule
    ) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._clock = clock
        self._lifetime = lifetime
        self._security = security
        self._lock = threading.Lock()
        # One entry a terminal, see `_Entry`.
        self._cache: dict[str, _Entry] = {}
        # Reads failed since the last that worked (the ledger unreachable: every request of
        # those groups is answered `96`), when the first failed, and when that was last said.
        self._failed_reads = 0
        self._failing_since = 0.0
        self._said_at = 0.0

    def _unreachable(self, error: BaseException) -> None:
        """Say that the ledger cannot be read: at once, then every `UNREACHABLE_EVERY_S`
        while it lasts (a group a moment would otherwise log a line each)."""
        now = time.monotonic()
        self._failed_reads += 1
        if self._failed_reads == 1:
            self._failing_since = now
        elif now - self._said_at < UNREACHABLE_EVERY_S:
            return
        self._said_at = now
        orig = getattr(error, "orig", None) or error
        log.error(
            "ledger_unreachable",
            failed_reads=self._failed_reads,
            for_s=round(now - self._failing_since, 1),
            error=type(orig).__name__,
            sqlstate=getattr(orig, "sqlstate", None),
        )

    def _reachable_again(self) -> None:
        log.warning(
            "ledger_reachable_again",
            failed_reads=self._failed_reads,
            for_s=round(time.monotonic() - self._failing_since, 1),
        )
        self._failed_reads = 0

    def view(self, terminal_ids: Iterable[str]) -> SessionView:
        """The current sessions of these terminals, with one query; expired ones left out."""
        wanted = sorted(set(terminal_ids))
        if not wanted:
            return SessionView({})
        now = self._clock.now()
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("the clock gave a naive datetime; it must carry a time zone")
        try:
            with reading_driver(self._engine) as driver:
                if self._postgres:
                    rows = driver.execute(_READ_POSTGRES, (now, wanted)).fetchall()
                else:
                    # As SQLAlchemy stores a UtcDateTime on SQLite: UTC, as text.
                    stored = now.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
                    rows = driver.execute(_READ_SQLITE, (stored, json.dumps(wanted))).fetchall()
        except (SQLAlchemyError, self._driver_error) as error:
            self._unreachable(error)
            return UNAVAILABLE
        if self._failed_reads:
            self._reachable_again()
        with self._lock:  # once for the group, not once a row
            known = [self._cache.get(row[0]) for row in rows]
        sessions: dict[str, Session] = {}
        for (terminal_id, generation, suite, sealed, live), cached in zip(rows, known, strict=True):
            if cached is not None and cached[0] == generation:
                session = cached[1]
            else:
                session = self._open(terminal_id, generation, Suite(suite), bytes(sealed))
            if session is not None and live:
                sessions[terminal_id] = session
        if len(rows) < len(wanted):  # terminal_id is unique: every row is a wanted terminal
            for gone in set(wanted) - {row[0] for row in rows}:
                self._forget(gone)
        return SessionView(sessions)

    def sign_on(
        self, orm: OrmSession, terminal_id: str, issued: IssuedKeys, at: datetime
    ) -> Callable[[], None]:
        """Replace the terminal's session inside the caller's transaction; what to run once
        that transaction has committed (remember the keys without unsealing them again)."""
        orm.execute(_END, {"terminal": terminal_id})
        generation = orm.execute(
            _START,
            {
                "terminal_id": terminal_id,
                "suite": KeySuite(issued.handle.suite.value),
                "keys_sealed": issued.sealed,
                "signed_on_at": at,
                "expires_at": at + self._lifetime,
            },
        ).scalar_one()
        return lambda: self._remember(terminal_id, generation, issued.handle)

    def sign_off(self, orm: OrmSession, terminal_id: str) -> Callable[[], None]:
        """End the terminal's session inside the caller's transaction; forget the keys after."""
        orm.execute(_END, {"terminal": terminal_id})
        return lambda: self._forget(terminal_id)

    def _open(
        self, terminal_id: str, generation: int, suite: Suite, sealed: bytes
    ) -> Session | None:
        """The session of a sign-on whose keys this process has not unsealed yet: unsealed
        once (and a row that does not open is remembered as such, and logged)."""
        try:
            keys = self._security.open_keys(terminal_id, suite, sealed)
        except SecurityModuleError:
            log.error("session_keys_unreadable", terminal=terminal_id, generation=generation)
            self._keep(terminal_id, generation, None)
            return None
        session = Session(terminal_id, keys.suite, keys, generation)
        self._keep(terminal_id, generation, session)
        return session

    def _remember(self, terminal_id: str, generation: int, keys: KeyHandle) -> None:
        """A sign-on's keys once its transaction has committed, without unsealing them."""
        self._keep(terminal_id, generation, Session(terminal_id, keys.suite, keys, generation))

    def _keep(self, terminal_id: str, generation: int, session: Session | None) -> None:
        with self._lock:
            before = self._cache.get(terminal_id)
            self._cache[terminal_id] = (generation, session)
        if before is not None and before[0] != generation:
            self._retire(before[1])

    def _forget(self, terminal_id: str) -> None:
        with self._lock:
            before = self._cache.pop(terminal_id, None)
        if before is not None:
            self._retire(before[1])

    def _retire(self, session: Session | None) -> None:
        """Keys no sign-on of the terminal holds any more: the module lets go of them."""
        if session is not None:
            self._security.retire_keys(session.keys)

    def cached(self) -> int:
        """How many terminals' keys this process holds unsealed (for tests and metrics)."""
        with self._lock:
            return sum(1 for _, session in self._cache.values() if session is not None)

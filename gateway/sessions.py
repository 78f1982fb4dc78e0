"""Terminal sessions: the working keys a sign-on issues, and how long they live (§4.1, §5.2).

A terminal is signed on from its 0810 until it signs off, signs on again, or the key lifetime
runs out. A failed sign-on leaves any earlier keys as they were. The keys live in memory only;
the clock is injected so that lifetimes are tested without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cardcodec.crypto import Suite, WorkingKeys
from gateway.clock import Clock


@dataclass(frozen=True)
class Session:
    """A signed-on terminal's keys and when they stop being valid."""

    terminal_id: str
    suite: Suite
    keys: WorkingKeys
    signed_on_at: datetime
    expires_at: datetime

    @property
    def has_tdk(self) -> bool:
        return self.keys.tdk is not None


class Sessions:
    """The current session of each terminal, with the key lifetime enforced on every read."""

    def __init__(self, clock: Clock, lifetime: timedelta) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._sessions: dict[str, Session] = {}

    def sign_on(self, terminal_id: str, suite: Suite, keys: WorkingKeys) -> Session:
        now = self._clock.now()
        session = Session(terminal_id, suite, keys, now, now + self._lifetime)
        self._sessions[terminal_id] = session
        return session

    def sign_off(self, terminal_id: str) -> None:
        self._sessions.pop(terminal_id, None)

    def current(self, terminal_id: str) -> Session | None:
        """The terminal's session, or None when it is not signed on (never, off, expired)."""
        session = self._sessions.get(terminal_id)
        if session is None:
            return None
        if self._clock.now() >= session.expires_at:
            del self._sessions[terminal_id]
            return None
        return session

    def __len__(self) -> int:
        return len(self._sessions)

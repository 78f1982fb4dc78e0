"""A serving gateway follows two switches from the ledger: a terminal's `enabled` and a
merchant's `active`.

A gateway decides with the config it started with: rules, fees, limits, a terminal's merchant
and suite change by restart (docs/deployment.md). The two switches are different: they are what
an operator turns off to stop a terminal or a merchant now, and the config that turns one off
may be loaded by another process (`vipgate ledger load`, or another instance of a rolling
restart) while this one serves. So every `FOLLOW_EVERY_S` of the gateway's clock, before a
group's checks, the gateway asks the ledger how many rows each switch's history holds (every
change of a switch appends one, in the transaction that makes it; the histories are append-only,
so a count that changed is a change, even one committed out of id order). Only when a count
changed does it read the switches of every terminal and merchant again.

A switch changed in the ledger is therefore obeyed within `FOLLOW_EVERY_S` (plus one group) by
every gateway on that ledger; a request decided in between is recorded as served, and clearing
charges the terminal's fee for it (`clearing.close`, SERVED). A terminal or merchant the ledger
knows and this gateway's config does not stays unknown here (this process has no TMK for it),
and one the ledger lacks keeps its config's value. A failed read keeps what was known and is
tried again at the next interval; the sessions' read of the same group reports an unreachable
ledger (`ledger_unreachable`); a group whose read of the sessions failed does not look.

A look is one query of two counts (well under a millisecond); after a change, every
terminal's and merchant's switch is read again: about 2 ms for 1,000 terminals, and 80-100 ms
on the ledger thread for 100,000, once per change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.clock import Clock
from gateway.config import MerchantConfig, TerminalConfig
from gateway.ledger.db import reading_driver

log = structlog.get_logger("vipgate.follow")

FOLLOW_EVERY_S = 2.0

_COUNTS = (
    "SELECT (SELECT count(*) FROM terminal_enabled_history),"
    " (SELECT count(*) FROM merchant_active_history)"
)
_TERMINALS = "SELECT id, enabled FROM terminals"
_MERCHANTS = "SELECT id, active FROM merchants"

_Item = TypeVar("_Item", TerminalConfig, MerchantConfig)


class Switches:
    """The terminals and merchants a gateway checks requests against (`current`), their
    switches as the ledger last said."""

    def __init__(
        self,
        engine: Engine,
        clock: Clock,
        terminals: Mapping[str, TerminalConfig],
        merchants: Mapping[str, MerchantConfig],
        every: timedelta = timedelta(seconds=FOLLOW_EVERY_S),
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._every = every
        self._terminals = dict(terminals)
        self._merchants = dict(merchants)
        self._counts: tuple[int, int] | None = None
        self._looked: datetime | None = None
        self._failing = False
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error

    def current(
        self, *, reachable: bool = True
    ) -> tuple[dict[str, TerminalConfig], dict[str, MerchantConfig]]:
        """The terminals and merchants by id, after a look at the ledger when one is due (the
        first call looks at once). The dictionaries are replaced, never changed in place, so
        a group keeps one view of them. Not `reachable` (the group's read of the sessions
        failed just now): no look, which would only wait for the same outage again."""
        now = self._clock.now()
        looked = self._looked
        if reachable and (looked is None or now - looked >= self._every or now < looked):
            self._looked = now
            self._look()
        return self._terminals, self._merchants

    def _look(self) -> None:
        try:
            with reading_driver(self._engine) as driver:
                counts = _pair(driver.execute(_COUNTS).fetchone())
                if counts == self._counts:
                    return
                enabled = {str(i): bool(on) for i, on in driver.execute(_TERMINALS).fetchall()}
                active = {str(i): bool(on) for i, on in driver.execute(_MERCHANTS).fetchall()}
        except (SQLAlchemyError, self._driver_error) as error:
            # Kept as known, and looked at again at the next interval. Said once a failing
            # spell (an outage is also logged by the sessions' read, `ledger_unreachable`).
            if not self._failing:
                self._failing = True
                log.warning("switches_not_read", error=type(error).__name__)
            return
        if self._failing:
            self._failing = False
            log.info("switches_read_again")
        self._terminals = _followed(self._terminals, enabled, "enabled", "terminal")
        self._merchants = _followed(self._merchants, active, "active", "merchant")
        self._counts = counts


def _pair(row: Any) -> tuple[int, int]:
    return int(row[0]), int(row[1])


def _followed(
    known: dict[str, _Item], ledger: Mapping[str, bool], switch: str, what: str
) -> dict[str, _Item]:
    """`known` with each switch the ledger holds; each change logged."""
    changed = dict(known)
    for key, item in known.items():
        value = ledger.get(key)
        if value is not None and value != getattr(item, switch):
            changed[key] = dataclasses.replace(item, **{switch: value})  # type: ignore[arg-type]
            log.info(f"{what}_{switch}_followed", **{what: key, switch: value})
    return changed

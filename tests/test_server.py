"""`vipgate serve` wiring: the --clock and --listen rules of operations.md."""

from __future__ import annotations

import gc
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from gateway import server
from gateway.clock import SHANGHAI
from gateway.commands.serve import parse_listen
from gateway.errors import BadInput
from tests.gateway_harness import DEMO


def test_clock_earlier_than_the_ledger_is_refused(tmp_path: Path) -> None:
    """--clock before transactions already in the database: refused, nothing served."""
    config = tmp_path / "demo.toml"
    shutil.copy(DEMO, config)
    database = f"sqlite:///{tmp_path / 'ledger.db'}"
    server.wire(config, database, None).engine.dispose()  # accrues the demo lots now
    with pytest.raises(BadInput, match="--clock"):
        server.wire(config, database, datetime(2020, 1, 1, tzinfo=SHANGHAI))
    later = server.wire(config, database, datetime(2099, 1, 1, tzinfo=SHANGHAI))
    assert later.clock.now().year == 2099
    later.engine.dispose()


@pytest.mark.parametrize("text", ["2026-11-22T10:00:00", "tomorrow"])
def test_clock_needs_an_iso_instant_with_offset(text: str) -> None:
    """A bare local time or anything not ISO 8601 is refused."""
    with pytest.raises(BadInput):
        server.parse_clock(text)


def test_listen_is_host_and_port() -> None:
    """--listen HOST:PORT; anything else is refused."""
    assert parse_listen("127.0.0.1:8583") == ("127.0.0.1", 8583)
    assert parse_listen("[::1]:8583") == ("::1", 8583)  # as the config's listen
    for bad in ("8583", "host:", "host:99999", ":1"):
        with pytest.raises(BadInput):
            parse_listen(bad)


def test_serving_leaves_start_up_objects_out_of_the_collector() -> None:
    """Before the reactor runs: start-up's objects frozen (full collections no longer walk
    them) and the young generation collected less often than Python's default."""
    threshold = gc.get_threshold()
    try:
        server._settle_garbage_collector()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == server.YOUNG_OBJECTS_BEFORE_COLLECTION
        assert gc.get_threshold()[1:] == threshold[1:]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)

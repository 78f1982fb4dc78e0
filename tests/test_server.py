"""`vipgate serve` wiring: the --clock and --listen rules of operations.md."""

from __future__ import annotations

import gc
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from gateway import server
from gateway.clock import SHANGHAI
from gateway.commands.serve import parse_listen
from gateway.errors import BadInput
from gateway.ledger.db import SERVING_BUSY_TIMEOUT_MS, SQLITE_BUSY_TIMEOUT_MS
from tests.gateway_harness import DEMO
from tests.test_gateway_e2e import VIPGATE


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


def test_a_serving_gateway_waits_for_the_ledger_less_than_a_terminal_waits(
    tmp_path: Path,
) -> None:
    """A group held up by another process's lock (a clearing run) must get its `96` while the
    terminal still listens (60 s, §1): the serving engine waits 12 s in the lock file's queue
    and 12 s for SQLite's own lock, where a command waits 30 s for each."""
    config = tmp_path / "demo.toml"
    shutil.copy(DEMO, config)
    wiring = server.wire(config, f"sqlite:///{tmp_path / 'ledger.db'}", None)
    try:
        with wiring.engine.connect() as connection:
            waited = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
        assert waited == SERVING_BUSY_TIMEOUT_MS == 12_000
        assert 2 * SERVING_BUSY_TIMEOUT_MS < 60_000 <= 2 * SQLITE_BUSY_TIMEOUT_MS
    finally:
        wiring.engine.dispose()


@pytest.mark.parametrize("text", ["2026-11-22T10:00:00", "tomorrow"])
def test_clock_needs_an_iso_instant_with_offset(text: str) -> None:
    """A bare local time or anything not ISO 8601 is refused."""
    with pytest.raises(BadInput):
        server.parse_clock(text)


@pytest.mark.parametrize(
    "text",
    [
        "9999-12-31T23:30:00+08:00",
        "0001-01-01T00:00:00+08:00",
        "1999-12-31T23:59:59+08:00",
        "2100-01-01T00:00:00+08:00",
    ],
)
def test_a_clock_outside_the_years_expiry_dates_name_is_refused(text: str, tmp_path: Path) -> None:
    """A rehearsal clock at the calendar's edge: one line naming `--clock`, exit 2, and no
    ledger made. At 9999-12-31 23:30 (the business date past the calendar's end) `serve`
    stopped with an OverflowError traceback and left an empty ledger file behind."""
    config = tmp_path / "demo.toml"
    shutil.copy(DEMO, config)
    database = tmp_path / "ledger.db"
    arguments = ["--config", str(config), "--db", f"sqlite:///{database}", "--clock", text]
    result = subprocess.run(  # a clock taken would serve: the timeout fails the test
        [str(VIPGATE), "serve", "--listen", "127.0.0.1:0", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"vipgate: error: --clock: {text!r} is outside the years 2000-2099, the ones a card's"
        " expiry (YYMM) can name\n"
    )
    assert not database.exists()


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

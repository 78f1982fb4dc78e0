"""A PostgreSQL host that goes silent ends the ledger's links within seconds, not minutes.

A crashed or cut-off host drops packets rather than refusing them; without TCP keepalives and
a user timeout the kernel retransmits for many minutes while a ledger thread waits on its
socket, and every terminal of that gateway waits with it. `db.POSTGRES_LINK_OPTIONS` sets
them on every connection unless the database URL names its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine

from gateway.ledger import db
from tests import link_loss, pg

ROOT = Path(__file__).resolve().parents[1]


def _parameters(engine: Engine) -> dict[str, str]:
    raw = engine.raw_connection()
    try:
        info = raw.driver_connection.info  # type: ignore[union-attr]
        return dict(info.get_parameters())
    finally:
        raw.close()


def test_every_connection_carries_the_link_options(postgres_ledger: str) -> None:
    engine = db.make_engine(postgres_ledger)
    try:
        given = _parameters(engine)
    finally:
        engine.dispose()
    assert {name: given.get(name) for name in db.POSTGRES_LINK_OPTIONS} == {
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_idle": "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": "10000",
    }


def test_the_database_url_s_own_options_win(postgres_ledger: str) -> None:
    engine = db.make_engine(f"{postgres_ledger}?tcp_user_timeout=30000&connect_timeout=4")
    try:
        given = _parameters(engine)
    finally:
        engine.dispose()
    assert given["tcp_user_timeout"] == "30000"
    assert given["connect_timeout"] == "4"
    assert given["keepalives_idle"] == "10"  # the options the URL does not name


def test_a_silent_server_host_ends_every_kind_of_wait_within_seconds() -> None:
    """In network namespaces of the test's own (`tests/link_loss.py`): the ledger's engine,
    then `vipgate serve`, against a PostgreSQL whose host stops answering."""
    if pg.missing_binaries() is not None:
        pytest.skip(pg.missing_binaries() or "")
    if os.geteuid() != 0 or not all(map(shutil.which, ("unshare", "nsenter", "ip"))):
        pytest.skip("network namespaces need root, unshare, nsenter and ip")
    completed = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-m", "tests.link_loss"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        check=False,
    )
    if completed.returncode == link_loss.CANNOT:
        pytest.skip(completed.stderr.strip())
    assert completed.returncode == 0, completed.stderr
    cases = json.loads(completed.stdout.strip().splitlines()[-1])
    served = cases.pop("served")
    grouped = cases.pop("group")
    assert set(cases) == {
        "statement_into_silence",
        "answer_from_silence",
        "connecting_into_silence",
    }
    shortest = link_loss.SHORT["tcp_user_timeout"] / 1000 - 0.5
    for name, ended in cases.items():
        assert ended["outcome"] == "OperationalError", (name, ended)
        # Ended by the timeouts, not refused at once, and long before the kernel's minutes.
        assert shortest <= ended["seconds"] <= 8, (name, ended)
    # A group whose transaction meets the silence is answered `96` after one timeout, not
    # one (or three) more for each request run again alone; so is the next group, whose
    # sessions' read meets it (the flush connection's ping, then the reader's).
    one = link_loss.SHORT["tcp_user_timeout"] / 1000
    assert grouped["warm_codes"] == ["00"] * 3
    assert grouped["group_codes"] == ["96"] * link_loss.GROUP
    assert grouped["group_seconds"] <= 2 * one, grouped
    assert grouped["next_group_codes"] == ["96"] * link_loss.GROUP
    assert grouped["next_group_seconds"] <= 3 * one, grouped
    # `vipgate serve`: a redemption sent into the silence is answered `96` in seconds, and
    # the gateway approves again once the host speaks.
    assert (served["before"], served["in_silence"], served["after"]) == ("00", "96", "00")
    assert served["in_silence_seconds"] <= 2 * one, served
    assert served["serving"]

"""A group's read of the sessions: one `Session` per sign-on shared by every group that reads
the same generation, expiry decided by the stored time, and a new sign-on a new `Session`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.sessions import Sessions
from tests.gateway_harness import Harness, demo_config


@pytest.fixture
def harness(tmp_path: Path, ledger_url: str) -> Iterator[Harness]:
    harness = Harness(demo_config(tmp_path, ledger_url))
    yield harness
    harness.engine.dispose()


def reader(harness: Harness) -> Sessions:
    """Another process's view of the ledger: it never saw the sign-ons."""
    lifetime = harness.config.gateway.key_lifetime
    return Sessions(harness.engine, harness.clock, lifetime, harness.security)


def test_groups_share_the_session_of_one_sign_on(harness: Harness) -> None:
    """Two groups reading the same generation get the same `Session`; the keys opened once."""
    harness.signed_on("10000001")
    sessions = reader(harness)
    first = sessions.view(["10000001", "20000001"]).get("10000001")
    second = sessions.view(["10000001"]).get("10000001")
    assert first is not None and second is first
    assert sessions.view(["20000001"]).get("20000001") is None
    assert sessions.cached() == 1


def test_an_expired_session_is_left_out_by_its_stored_time(harness: Harness) -> None:
    """Live one microsecond before the stored expiry, left out at it; the keys stay cached
    (the row still holds them) until a new sign-on replaces them with a new `Session`."""
    harness.signed_on("10000001")
    sessions = reader(harness)
    before = sessions.view(["10000001"]).get("10000001")
    assert before is not None
    lifetime = harness.config.gateway.key_lifetime
    harness.clock.advance(lifetime - timedelta(microseconds=1))
    assert sessions.view(["10000001"]).get("10000001") is before
    harness.clock.advance(timedelta(microseconds=1))
    assert sessions.view(["10000001"]).get("10000001") is None
    assert sessions.cached() == 1
    harness.signed_on("10000001")
    after = sessions.view(["10000001"]).get("10000001")
    assert after is not None and after is not before
    assert after.generation > before.generation

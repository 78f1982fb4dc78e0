"""Hostile input over loopback against a real `vipgate serve`: a short campaign of
`tests/hostile_campaign.py` (random bytes, mutated, glued, zero, huge and truncated frames,
slow senders, a few hundred idle connections, one connection too many, a frame flood) while an
honest terminal redeems; `make test-hostile` runs the long one."""

from __future__ import annotations

import pytest

from tests.hostile_campaign import CampaignSettings, Figures, raise_open_files_limit, run_campaign

SHORT = CampaignSettings(
    duration_s=18,
    examples_per_round=150,
    idle_connections=300,
    slow_senders=3,
    idle_timeout_s=3,
)


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Figures:
    raise_open_files_limit()
    return run_campaign(tmp_path_factory.mktemp("hostile"), SHORT)


def test_the_gateway_never_dies(figures: Figures) -> None:
    """Whatever arrives, the process stays up and exits 0 on SIGTERM."""
    assert figures.inputs >= 300
    assert figures.crashes == 0


def test_the_honest_terminal_is_answered_correctly_and_quickly(figures: Figures) -> None:
    """Every honest answer checks out (MTI, TPDU, ids, MAC, code) with p99 under 500 ms."""
    assert figures.wrong_answers == []
    assert figures.honest_approved >= 50
    assert figures.percentile_ms(0.99) < 500


def test_only_the_honest_approvals_changed_the_ledger(figures: Figures) -> None:
    """Card points, approvals and journal moved by exactly what the honest terminal was told;
    no hostile frame was approved; the invariants hold."""
    assert figures.hostile_approvals == 0
    assert figures.ledger_problems == []


def test_the_gateway_log_holds_no_card_data(figures: Figures) -> None:
    """After every hostile input, the log still shows no full number, track or key."""
    assert figures.log_leaks == []


def test_idle_and_slow_connections_are_closed_by_the_idle_timeout(figures: Figures) -> None:
    """Silent connections and one-byte-a-second senders are closed by the gateway."""
    assert figures.idle_opened >= SHORT.idle_connections
    assert figures.idle_closed_by_gateway == figures.idle_opened
    assert figures.slow_closed_by_gateway == SHORT.slow_senders


def test_the_address_and_rate_bounds_close_connections(figures: Figures) -> None:
    """The connection after 64 from one address, and a frame flood, are closed."""
    assert figures.per_address_refused
    assert figures.flood_closed

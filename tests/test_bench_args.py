"""`make bench-gateway` refuses bad figures before it starts anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import pg
from tests.bench_gateway import Figures, verdicts

TOP = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("option", "value"),
    [("--cards", "0"), ("--terminals", "0"), ("--duration", "0"), ("--rate", "-1")],
)
def test_bad_figures_are_refused_with_exit_2(option: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench_gateway", "--backend", "sqlite", option, value],
        check=False,
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "must be positive" in result.stderr
    assert "starting the gateway" not in result.stdout


def figures(closed_per_s: float, open_per_s: float = 2000, open_p99_ms: float = 5.0) -> Figures:
    return Figures(closed_per_s, 1.0, 9.0, open_per_s, 1.0, open_p99_ms, 0.05, 0.1)


def test_the_verdicts_name_each_target_and_the_best_run() -> None:
    runs = {1: figures(3000, open_p99_ms=4.0), 2: figures(5200, open_p99_ms=12.0)}
    assert verdicts("sqlite", runs, None, 2000) == [
        "  target 5,000 approved redemptions/s: best 5,200/s (`--workers 2`): met",
        "  target p99 under 10 ms at 2,000/s offered: best p99 4.0 ms (`--workers 1`): met",
    ]
    slow = {1: figures(4999, open_p99_ms=10.0)}
    assert [line.rsplit(": ", 1)[1] for line in verdicts("sqlite", slow, None, 2000)] == [
        "not met",
        "not met",
    ]


def test_a_p99_counts_only_from_a_run_that_kept_up_with_2000_per_s() -> None:
    behind = {2: figures(5000, open_per_s=1900, open_p99_ms=3.0)}
    assert verdicts("sqlite", behind, None, 2000)[1].endswith(
        "not met (no run kept up with the rate)"
    )
    assert verdicts("sqlite", behind, None, 1000)[1].endswith(
        "not measured (the open loop offered 1,000/s)"
    )


def test_postgresql_is_held_to_pgbench_of_the_same_run() -> None:
    runs = {1: figures(2500), 2: figures(3100), 4: figures(2000)}
    assert verdicts("postgresql", runs, "3000.5", 2000) == [
        "  target at least pgbench -N's TPS (3,000): best 3,100/s (`--workers 2`): met"
    ]
    assert verdicts("postgresql", runs, "3100.5", 2000)[0].endswith(": not met")
    assert verdicts("postgresql", runs, "?", 2000)[0].endswith("pgbench gave no figure")


def test_a_durable_server_syncs_its_commits_and_the_test_server_does_not(
    postgres_server: pg.PgServer,
) -> None:
    # The bench compares the gateway with pgbench on a server that syncs every commit: a
    # setting changed after start (ALTER SYSTEM) would be outranked by the command line.
    with pytest.raises(RuntimeError, match="fsync = off"):
        pg.check_durable(postgres_server)
    durable = pg.start(durable=True)
    try:
        pg.check_durable(durable)
        assert pg.setting(durable, "full_page_writes") == "on"
    finally:
        pg.stop(durable)

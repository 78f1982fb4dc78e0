"""The deployment of docs/deployment.md, short: HAProxy (mode tcp, round robin, health checks)
over two `vipgate serve` on one PostgreSQL, the simulator's load through it, one gateway
killed mid-load; the other carries on and the ledger holds every approval (the long run is
`make test-deploy`, tests/deploy_campaign.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from gateway.config import load_config
from tests import pg
from tests.conftest import skip_without
from tests.deploy_campaign import missing_haproxy, run_deployment

DURATION_S = 6.0
RATE_PER_S = 60.0


@pytest.mark.postgres
def test_one_gateway_killed_behind_haproxy_the_other_carries_on(
    postgres_server: pg.PgServer, tmp_path: Path
) -> None:
    """SIGKILL to one gateway (with its two workers) under load: approvals continue through
    the other, `vipgate ledger check` is clean, every approval read is in the journal."""
    skip_without(missing_haproxy())
    figures = run_deployment(
        postgres_server, tmp_path, duration_s=DURATION_S, rate_per_s=RATE_PER_S, kills=1
    )
    report = "\n".join(figures.lines())
    assert figures.problems == [], report
    assert figures.kills and figures.approvals > 0, report
    assert figures.after_last_kill > 0, report


DEPLOY = Path(__file__).resolve().parents[1] / "config" / "deploy"


def test_the_example_gateway_config_loads_and_fits_behind_haproxy() -> None:
    """config/deploy/gateway.toml is a valid config; its per-address bound admits the many
    terminals that all come from HAProxy's one address, and its idle time-out is shorter
    than HAProxy's client and server time-outs."""
    config = load_config(DEPLOY / "gateway.toml")
    assert config.gateway.max_connections_per_address >= 1000
    timeouts = re.findall(r"timeout (?:client|server) (\d+)s", (DEPLOY / "haproxy.cfg").read_text())
    assert len(timeouts) == 2
    assert all(int(t) > config.gateway.idle_timeout_s for t in timeouts)


def test_the_example_haproxy_config_is_valid() -> None:
    """`haproxy -c` accepts config/deploy/haproxy.cfg as shipped."""
    skip_without(missing_haproxy())
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_example_haproxy_config_declares_the_socket_the_roll_drains_through() -> None:
    """The roll's drain command (docs/deployment.md) talks to an admin socket that the
    shipped file itself declares: copied over Debian's default file, which declared it, it
    left the socket undeclared and the drain failing."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    [socket_path] = re.findall(r"\| socat stdio (\S+?)`", docs)
    declared = re.findall(
        r"^\s*stats socket (\S+) .*\blevel admin\b", (DEPLOY / "haproxy.cfg").read_text(), re.M
    )
    assert declared == [socket_path]

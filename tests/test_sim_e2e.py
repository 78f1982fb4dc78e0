"""End to end: `vipgate serve` as its own process (fresh SQLite ledger, clock at the shipped
scenarios' Saturday noon) driven by `vipgate sim run`, `sim load` and `sim replay` over
loopback TCP; then SIGTERM, a clean exit, and a log without a full card number."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli import main
from tests.gateway_harness import DEMO
from tests.test_gateway_e2e import VIPGATE, free_port

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "simulators" / "scenarios").glob("*.toml"))
MERCHANT_DAY = ROOT / "simulators" / "scenarios" / "merchant-day.toml"
CLOCK = "2026-06-06T12:00:00+08:00"  # what the shipped scenarios expect
FULL_CARD = re.compile(r"(?<!\d)6688\d{15}(?!\d)")
START_TIMEOUT_S = 60


@dataclass
class Gateway:
    """One `vipgate serve` process, its config copy and its log file."""

    process: subprocess.Popen[bytes]
    config: Path
    log: Path
    target: str

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture
def start_gateway(tmp_path: Path, sqlite_template: Path) -> Iterator[Callable[[str], Gateway]]:
    """Start gateways on fresh copies of the demo config and of a migrated SQLite ledger;
    each is stopped (and must exit 0) at the end. The log goes to a file, so that a busy
    gateway never blocks on a full pipe."""
    started: list[Gateway] = []

    def start(name: str) -> Gateway:
        folder = tmp_path / name
        folder.mkdir()
        config = folder / "demo.toml"
        shutil.copy(DEMO, config)
        database = folder / "ledger.db"
        shutil.copyfile(sqlite_template, database)
        log = folder / "serve.log"
        target = f"127.0.0.1:{free_port()}"
        command = [str(VIPGATE), "serve", "--config", str(config), "--db", f"sqlite:///{database}"]
        command += ["--listen", target, "--clock", CLOCK]
        with log.open("wb") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        gateway = Gateway(process, config, log, target)
        started.append(gateway)
        deadline = time.monotonic() + START_TIMEOUT_S
        while b'"listening"' not in log.read_bytes():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the gateway did not start listening"
            time.sleep(0.05)
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            assert gateway.stop() == 0, gateway.log.read_text()
        assert FULL_CARD.search(gateway.log.read_text()) is None, "a full card number in a log"


def sim(gateway: Gateway, *argv: str) -> int:
    return main(["sim", *argv, "--config", str(gateway.config), "--target", gateway.target])


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[path.stem for path in SCENARIOS])
def test_each_shipped_scenario_passes_against_a_fresh_gateway(
    start_gateway: Callable[[str], Gateway], scenario: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vipgate sim run` of every file in simulators/scenarios/ exits 0 on its own fresh
    database, every step passing."""
    gateway = start_gateway("gateway")
    assert sim(gateway, "run", str(scenario)) == 0, capsys.readouterr().out
    assert re.search(r"(\d+) steps: \1 passed, 0 failed\n$", capsys.readouterr().out)


def test_a_short_load_balances_every_settlement(
    start_gateway: Callable[[str], Gateway], capsys: pytest.CaptureFixture[str]
) -> None:
    """2 terminals, 20/s, 3 s, --json: every terminal's 0510 balanced, only the codes a day
    on the demo cards gives (approved, partial, not enough points)."""
    gateway = start_gateway("gateway")
    argv = ["--terminals", "2", "--rate", "20", "--duration", "3", "--json"]
    assert sim(gateway, "load", *argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["balanced"] is True and summary["unbalanced_terminals"] == []
    assert [s["result"] for s in summary["settlements"]] == ["balanced", "balanced"]
    assert set(summary["codes"]) <= {"00", "10", "51"}
    assert summary["refused"] == 0 and summary["no_answer"] == 0 and summary["failures"] == []
    assert 20 <= summary["sent"] <= 75  # 60 planned, plus sign-ons and settlements
    assert summary["kinds"]["redemption"]["00"] > 0
    assert summary["latency_ms"]["max"] >= summary["latency_ms"]["p50"] > 0


def test_a_recorded_scenario_replays_without_difference_on_a_second_fresh_gateway(
    start_gateway: Callable[[str], Gateway], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Record the merchant's day on one gateway, replay it on another started with the same
    clock and database state: every answer as recorded."""
    log = tmp_path / "day.jsonl"
    recorded = start_gateway("recorded")
    assert sim(recorded, "run", str(MERCHANT_DAY), "--record", str(log)) == 0
    capsys.readouterr()
    replayed = start_gateway("replayed")
    assert sim(replayed, "replay", str(log)) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.endswith(" 0 differ\n")

"""End to end: `vipgate serve` as its own process (fresh SQLite ledger, the config and clock
each shipped scenario names) driven by `vipgate sim run`, `sim load` and `sim replay` over
loopback TCP; then SIGTERM, a clean exit, and a log without a full card number. And the
shipped scenarios, read together, rehearse every response code a terminal can provoke."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.responses import APPROVAL_CODES, RESPONSE_CODES, Decline, response_code
from simulators.scenario import load_scenario
from tests.gateway_harness import DEMO
from tests.test_gateway_e2e import VIPGATE, free_port

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_DIR = ROOT / "simulators" / "scenarios"
# Every shipped scenario: the demo's at the top, the rehearsal config's in rehearsal/.
SCENARIOS = sorted(SCENARIO_DIR.rglob("*.toml"))
MERCHANT_DAY = SCENARIO_DIR / "merchant-day.toml"
CLOCK = "2026-06-06T12:00:00+08:00"  # what the shipped scenarios expect
# Every code of pos-8583.md §6, as the gateway's one table has them, but 96: a ledger failure,
# which no terminal can provoke.
UNPROVOKABLE: Final = frozenset({response_code(Decline.SYSTEM)})
PROVOKABLE_CODES: Final = (frozenset(RESPONSE_CODES.values()) | APPROVAL_CODES) - UNPROVOKABLE
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


def scenario_needs(path: Path) -> tuple[Path, str]:
    """The config (a file of config/) and the clock a shipped scenario names at top level."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return ROOT / data["config"], data["clock"].isoformat()


@pytest.fixture
def start_gateway(tmp_path: Path, sqlite_template: Path) -> Iterator[Callable[..., Gateway]]:
    """Start gateways on fresh copies of a config (the demo's unless told) and of a migrated
    SQLite ledger, at a clock (the shipped scenarios' unless told); each is stopped (and must
    exit 0) at the end. The log goes to a file, so that a busy gateway never blocks on a full
    pipe."""
    started: list[Gateway] = []

    def start(name: str, source: Path = DEMO, clock: str = CLOCK) -> Gateway:
        folder = tmp_path / name
        folder.mkdir()
        config = folder / source.name
        shutil.copy(source, config)
        database = folder / "ledger.db"
        shutil.copyfile(sqlite_template, database)
        log = folder / "serve.log"
        target = f"127.0.0.1:{free_port()}"
        command = [str(VIPGATE), "serve", "--config", str(config), "--db", f"sqlite:///{database}"]
        command += ["--listen", target, "--clock", clock]
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


@pytest.mark.parametrize(
    "scenario", SCENARIOS, ids=[str(p.relative_to(SCENARIO_DIR)) for p in SCENARIOS]
)
def test_each_shipped_scenario_passes_against_a_fresh_gateway(
    start_gateway: Callable[..., Gateway], scenario: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vipgate sim run` of every file in simulators/scenarios/ (rehearsal/ too) exits 0 on
    its own fresh database, with the config and clock the scenario names, every step passing
    (the key-lifetime rehearsal really waits past the rehearsal config's 5 s keys)."""
    config, clock = scenario_needs(scenario)
    gateway = start_gateway("gateway", config, clock)
    assert sim(gateway, "run", str(scenario)) == 0, capsys.readouterr().out
    assert re.search(r"(\d+) steps: \1 passed, 0 failed\n$", capsys.readouterr().out)


def test_the_shipped_scenarios_together_rehearse_every_code_a_terminal_can_provoke() -> None:
    """The `expect.code` values of all shipped scenarios, each parsed against the config it
    names, cover every response code of §6 but 96, and nothing else; a key-lifetime step waits
    past the rehearsal config's key lifetime and expects A0 with sign on again."""
    codes: set[str] = set()
    expired_keys: list[str] = []  # the codes expected after waiting past the key lifetime
    for path in SCENARIOS:
        config_path, _ = scenario_needs(path)
        config = load_config(config_path)
        lifetime_s = config.gateway.key_lifetime.total_seconds()
        for step in load_scenario(path, config).steps:
            if step.expect.code is not None:
                codes.add(step.expect.code)
            if step.wait_s is not None and step.wait_s > lifetime_s and step.expect.sign_on_again:
                expired_keys.append(str(step.expect.code))
    assert codes == PROVOKABLE_CODES, sorted(codes ^ PROVOKABLE_CODES)
    assert "A0" in expired_keys


def test_a_short_load_balances_every_settlement(
    start_gateway: Callable[..., Gateway], capsys: pytest.CaptureFixture[str]
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
    start_gateway: Callable[..., Gateway], tmp_path: Path, capsys: pytest.CaptureFixture[str]
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

"""`vipgate sim run|load|replay` from the command line, against the real gateway core behind
a loopback listener: exit statuses 0/1/2, refusals before any traffic, the default target,
recording then replay, the JSON summary and the progress line."""

from __future__ import annotations

import io
import json
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cardcodec.errors import CodecError
from cardcodec.frame import FrameSplitter, add_length
from cardcodec.subfields import Totals
from gateway.cli import main
from gateway.commands.sim import PlainProgress, RichProgress, parse_target
from gateway.errors import BadInput
from simulators.load import Snapshot
from simulators.recording import read_recording
from simulators.terminal import Terminal
from tests.gateway_harness import DEMO, Harness, demo_config
from tests.test_sim_load import SATURDAY_NOON

ROOT = Path(__file__).resolve().parents[1]
MERCHANT_DAY = ROOT / "simulators" / "scenarios" / "merchant-day.toml"
FULL_CARD = re.compile(r"(?<!\d)6688\d{15}(?!\d)")


class HarnessServer:
    """A fresh in-process gateway (demo config, Saturday noon) on a loopback port. `delay_s`
    gives, for a request's payload, the seconds to wait before handling it (the other links
    go on meanwhile)."""

    def __init__(self, folder: Path, delay_s: Callable[[bytes], float] | None = None) -> None:
        folder.mkdir()
        self.harness = Harness(demo_config(folder), SATURDAY_NOON)
        self.lock = threading.Lock()
        self.connections = 0
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server.connections += 1
                splitter = FrameSplitter()
                while data := self.request.recv(4096):
                    try:
                        payloads = splitter.feed(data)
                    except CodecError:
                        return
                    for payload in payloads:
                        if delay_s is not None:
                            time.sleep(delay_s(payload))
                        with server.lock:
                            answer = server.harness.raw(payload)
                        if answer is None:
                            return
                        self.request.sendall(add_length(answer))

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def target(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[HarnessServer]]:
    """Two fresh gateways, for recording on one and replaying on the other."""
    servers = [HarnessServer(tmp_path / name) for name in ("first", "second")]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A copy of the demo config (terminals, keys, cards) the commands read."""
    path = tmp_path / "demo.toml"
    path.write_text(DEMO.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def sim(config: Path, *argv: str) -> int:
    return main(["sim", *argv, "--config", str(config)])


# --- sim run ------------------------------------------------------------------------------


def test_sim_run_plays_a_shipped_scenario_and_exits_0(
    gateways: list[HarnessServer], config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every step passes against a fresh gateway at the scenario's clock; cards masked."""
    assert sim(config, "run", str(MERCHANT_DAY), "--target", gateways[0].target) == 0
    out = capsys.readouterr().out
    assert out.endswith("25 steps: 25 passed, 0 failed\n")
    assert "668800*********0124" in out and FULL_CARD.search(out) is None


def test_sim_run_exits_1_on_a_mismatch_naming_it(
    gateways: list[HarnessServer], config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A step whose answer differs from `expect`: the report says why, exit 1."""
    scenario = tmp_path / "wrong.toml"
    scenario.write_text(
        '[[step]]\nterminal = "10000001"\ndo = "sign_on"\nexpect = { code = "A7" }\n',
        encoding="utf-8",
    )
    assert sim(config, "run", str(scenario), "--target", gateways[0].target) == 1
    captured = capsys.readouterr()
    assert "! code: expected A7, got 00" in captured.out
    assert f"vipgate: scenario {scenario}: 1 of 1 steps failed" in captured.err


def test_a_bad_scenario_is_refused_before_any_traffic(
    gateways: list[HarnessServer], config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 with the step and the key named, the card masked; the gateway saw nothing."""
    scenario = tmp_path / "bad.toml"
    scenario.write_text(
        '[[step]]\nterminal = "10000001"\ndo = "sign_on"\n'
        '[[step]]\nterminal = "10000001"\ndo = "redeem"\ncard = "6688001234567890124"\n'
        'amount_fen = "ten"\n',
        encoding="utf-8",
    )
    assert sim(config, "run", str(scenario), "--target", gateways[0].target) == 2
    err = capsys.readouterr().err
    assert "step 2 (redeem): amount_fen: must be an integer, not a string" in err
    assert gateways[0].connections == 0


@pytest.mark.parametrize("target", ["nowhere", "host:", ":8583", "host:99999"])
def test_a_malformed_target_is_refused(config: Path, target: str) -> None:
    """--target must be HOST:PORT."""
    with pytest.raises(BadInput, match="--target"):
        parse_target(target)
    assert sim(config, "run", str(MERCHANT_DAY), "--target", target) == 2


def test_an_unreachable_gateway_is_refused_with_exit_2(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening: one line saying where, exit 2, for each command."""
    target = closed_port()
    assert sim(config, "run", str(MERCHANT_DAY), "--target", target) == 2
    error = capsys.readouterr().err
    assert f"cannot connect to the gateway at {target}" in error
    assert "--target HOST:PORT" in error
    argv = ["--terminals", "1", "--rate", "1", "--duration", "1", "--target", target]
    assert sim(config, "load", *argv) == 2


def test_the_default_target_is_the_configs_listen(
    gateways: list[HarnessServer], config: Path
) -> None:
    """Without --target the config's gateway.listen is used."""
    text = config.read_text(encoding="utf-8")
    config.write_text(
        text.replace('listen = "127.0.0.1:8583"', f'listen = "{gateways[0].target}"'),
        encoding="utf-8",
    )
    assert sim(config, "run", str(MERCHANT_DAY)) == 0


# --- record and replay ----------------------------------------------------------------------


def test_a_recorded_run_replays_the_same_on_a_fresh_gateway_and_not_on_the_same(
    gateways: list[HarnessServer],
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """sim run --record, then sim replay: no difference on a fresh gateway (exit 0); on the
    gateway that already took the day, the differing answers are listed (exit 1)."""
    log = tmp_path / "day.jsonl"
    first, second = gateways
    assert (
        sim(config, "run", str(MERCHANT_DAY), "--target", first.target, "--record", str(log)) == 0
    )
    frames = read_recording(log)
    assert [frame.direction for frame in frames[:2]] == ["out", "in"]
    capsys.readouterr()
    assert sim(config, "replay", str(log), "--target", second.target) == 0
    out = capsys.readouterr().out
    assert out.endswith("26 requests replayed: 26 answered as recorded, 0 differ\n")
    assert sim(config, "replay", str(log), "--target", first.target) == 1
    captured = capsys.readouterr()
    assert "! field 63: recorded" in captured.out and FULL_CARD.search(captured.out) is None
    assert "answers differ from the recording" in captured.err


def test_replay_refuses_a_log_it_cannot_replay_before_any_traffic(
    gateways: list[HarnessServer],
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A recording of a terminal the config lacks, or a gateway's log: exit 2, no traffic."""
    log = tmp_path / "day.jsonl"
    assert (
        sim(config, "run", str(MERCHANT_DAY), "--target", gateways[0].target, "--record", str(log))
        == 0
    )
    lines = log.read_text(encoding="utf-8").splitlines()
    other = tmp_path / "other.jsonl"
    other.write_text(lines[0].replace('"10000001"', '"10000009"') + "\n", encoding="utf-8")
    target = gateways[1].target
    assert sim(config, "replay", str(other), "--target", target) == 2
    assert "terminal '10000009' is not a terminal of the config" in capsys.readouterr().err
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text(lines[1].replace('"in"', '"out"') + "\n", encoding="utf-8")
    assert sim(config, "replay", str(swapped), "--target", target) == 2
    assert "replay takes a simulator's recording" in capsys.readouterr().err
    assert gateways[1].connections == 0


# --- sim load -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--terminals", "4", "--rate", "10", "--duration", "1"], "the config has 3 terminals"),
        (["--terminals", "1", "--rate", "0", "--duration", "1"], "--rate: 0 is outside"),
        (["--terminals", "1", "--rate", "10", "--duration", "nan"], "--duration: nan"),
        (["--terminals", "1", "--rate", "1", "--duration", "1", "--timeout", "-1"], "--timeout"),
        (  # more than the gateway lets a terminal send: its links would be closed
            ["--terminals", "2", "--rate", "120", "--duration", "1"],
            "--rate 120: 60 requests/s for each of 2 terminals, above the 50 frames/s a terminal"
            " may send (max_frames_per_second_per_terminal in ",
        ),
    ],
)
def test_sim_load_refuses_nonsense_with_exit_2(
    config: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Counts, rates, durations and time-outs are checked before any connection."""
    assert sim(config, "load", *argv, "--target", closed_port()) == 2
    assert message in capsys.readouterr().err


def test_sim_load_json_summary_and_progress_on_stderr(
    gateways: list[HarnessServer], config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json: one JSON object on stdout, every settlement balanced; the progress line goes
    to stderr, rewritten with a carriage return."""
    argv = ["--terminals", "2", "--rate", "40", "--duration", "1.5", "--seed", "3"]
    assert sim(config, "load", *argv, "--json", "--target", gateways[0].target) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["balanced"] is True and summary["terminals"] == ["10000001", "10000002"]
    assert set(summary["codes"]) <= {"00", "10", "51"}
    assert summary["seed"] == 3 and 20 < summary["sent"] <= 70
    assert captured.err.startswith("\rload ") and captured.err.endswith("\n")
    assert FULL_CARD.search(captured.out + captured.err) is None


def test_sim_load_exits_1_naming_the_terminals_that_did_not_balance(
    gateways: list[HarnessServer],
    config: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 0510 with result 2: the text summary says so and the command exits 1."""
    monkeypatch.setattr(Terminal, "totals", lambda self: Totals(100, 1, 0, 0))
    argv = ["--terminals", "1", "--rate", "20", "--duration", "0.5"]
    assert sim(config, "load", *argv, "--target", gateways[0].target) == 1
    captured = capsys.readouterr()
    assert "settlement   10000001 batch 000001: unbalanced, batch uploaded" in captured.out
    assert "vipgate: settlement check: not balanced at 10000001" in captured.err


def test_sim_load_records_when_asked(
    gateways: list[HarnessServer], config: Path, tmp_path: Path
) -> None:
    """--record on a load writes the traffic log, every frame of every terminal."""
    log = tmp_path / "load.jsonl"
    argv = ["--terminals", "3", "--rate", "30", "--duration", "0.5", "--record", str(log)]
    assert sim(config, "load", *argv, "--target", gateways[0].target) == 0
    frames = read_recording(log)
    assert {frame.terminal for frame in frames} == {"10000001", "10000002", "20000001"}


# --- the progress line ----------------------------------------------------------------------


def test_plain_progress_rewrites_one_line_at_most_once_per_interval() -> None:
    """Carriage return, padded over a longer previous line, then a newline at the end."""
    stream = io.StringIO()
    progress = PlainProgress(stream, interval_s=3600)
    progress.update(Snapshot(1.0, 10.0, 10, 9, 1, 0, 0))
    progress.update(Snapshot(2.0, 10.0, 20, 18, 2, 0, 0))
    progress.close()
    assert stream.getvalue() == "\r" + Snapshot(1.0, 10.0, 10, 9, 1, 0, 0).line() + "\n"


def test_rich_progress_starts_updates_and_stops(capsys: pytest.CaptureFixture[str]) -> None:
    """The terminal display (rich) takes the same snapshots."""
    progress = RichProgress(10.0)
    progress.update(Snapshot(1.0, 10.0, 10, 9, 1, 0, 0))
    progress.close()
    assert "load 1.0/10 s" in capsys.readouterr().err

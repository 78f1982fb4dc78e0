"""Card numbers a scenario or a recording carries in free text (a description, a step's name,
a saved name, an unknown key, a file's name) reach no output of `vipgate sim` in full, and what
a track adds after the number never does: reports, error lines and the load's summary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from simulators.load import LoadPlan, LoadSummary, TerminalStats
from simulators.replay import ReplayReport
from tests.gateway_harness import DEMO
from tests.test_sim_commands import FULL_CARD, HarnessServer

CARD = "6688000000000000014"
MASKED = "668800*********0014"
TRACK_TAIL = "=2812101"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HarnessServer]:
    gateway = HarnessServer(tmp_path / "gateway")
    yield gateway
    gateway.stop()


def sim(server: HarnessServer, *argv: str) -> int:
    return main(["sim", *argv, "--config", str(DEMO), "--target", server.target])


def shown(capsys: pytest.CaptureFixture[str]) -> str:
    """Everything the command printed, stdout and stderr; never a full card or a track."""
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert FULL_CARD.search(text) is None, text
    assert TRACK_TAIL not in text, text
    return text


FREE_TEXT = f"""\
description = "complaint about card {CARD} track {CARD}{TRACK_TAIL}0000"
config = "config/demo {CARD}.toml"
[[step]]
terminal = "10000001"
do = "echo"
name = "customer {CARD} said ;{CARD}{TRACK_TAIL}?"
[[step]]
terminal = "10000001"
do = "redeem"
card = "{CARD}"
amount_fen = 100
save = "{CARD}"
[[step]]
terminal = "10000001"
do = "void"
original = "{CARD}"
"""


def test_sim_run_masks_a_card_number_in_the_description_config_names_and_messages(
    server: HarnessServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The description, the config's name and a step's name are shown masked, a track in them
    hidden; a saved name that is a card number is masked in the play-time message of the void
    whose original was never sent (the redemption failed before sending: no sign-on)."""
    scenario = tmp_path / "free-text.toml"
    scenario.write_text(FREE_TEXT, encoding="utf-8")
    assert sim(server, "run", str(scenario)) == 1
    text = shown(capsys)
    hidden = "*" * len(f"{TRACK_TAIL}0000")
    assert f"complaint about card {MASKED} track {MASKED}{hidden}\n" in text
    assert f"--config config/demo {MASKED}.toml" in text
    hidden = "*" * len(TRACK_TAIL)
    assert f"step   1 PASS 10000001 echo  customer {MASKED} said ;{MASKED}{hidden}?\n" in text
    assert f"! its original '{MASKED}' was never sent" in text


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        (
            f'[[step]]\nterminal = "10000001"\ndo = "echo"\n{CARD} = 1\n',
            f"step 1 (echo): {MASKED}: unknown key for echo",
        ),
        (
            f'[[step]]\nterminal = "10000001"\ndo = "echo"\n"{CARD}{TRACK_TAIL}" = 1\n',
            f"step 1 (echo): {MASKED}********: unknown key for echo",
        ),
        (
            f'"{CARD}" = 1\n[[step]]\nterminal = "10000001"\ndo = "echo"\n',
            f"{MASKED}: unknown key",
        ),
    ],
)
def test_a_card_number_as_an_unknown_key_is_masked_in_the_refusal(
    server: HarnessServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    scenario: str,
    message: str,
) -> None:
    """A key of a step or of the top level that is a card number (or a track) is refused
    (exit 2) naming it masked."""
    path = tmp_path / "key.toml"
    path.write_text(scenario, encoding="utf-8")
    assert sim(server, "run", str(path)) == 2
    assert message in shown(capsys)


def test_a_card_number_in_a_scenarios_file_name_is_masked_in_its_refusal(
    server: HarnessServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scenario named after a complaint's card: the refusal names the file masked."""
    path = tmp_path / f"complaint-{CARD}.toml"
    path.write_text("[[step]]\n", encoding="utf-8")
    assert sim(server, "run", str(path)) == 2
    assert f"complaint-{MASKED}.toml: step 1: do: missing" in shown(capsys)


def test_a_card_number_as_a_recordings_unknown_key_is_masked_in_the_refusal(
    server: HarnessServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sim replay` of a log line with a card number as its key: exit 2, the key masked."""
    log = tmp_path / "card-key.jsonl"
    log.write_text(json.dumps({CARD: "x"}) + "\n", encoding="utf-8")
    assert sim(server, "replay", str(log)) == 2
    assert f"line 1: unknown key '{MASKED}'" in shown(capsys)


def test_a_replay_report_masks_a_card_number_in_the_recordings_name() -> None:
    """The report's head names the recording, a card number in its name masked."""
    text = ReplayReport(f"complaint-{CARD}.jsonl", []).render()
    assert text.startswith(f"replay of complaint-{MASKED}.jsonl: 0 requests")


def test_the_load_summary_masks_a_card_number_in_a_terminals_failure() -> None:
    """A failure's text is shown masked in the text summary, the JSON and the check's line."""
    stats = TerminalStats("10000001", error=f"terminal 10000001: ValueError: {CARD}{TRACK_TAIL}")
    summary = LoadSummary("127.0.0.1:1", LoadPlan(1, 1.0, 1.0, seed=1), 1.0, (stats,))
    for text in (summary.render(), json.dumps(summary.to_json()), "; ".join(summary.failures)):
        assert f"ValueError: {MASKED}********" in text
        assert FULL_CARD.search(text) is None and TRACK_TAIL not in text

"""Replays (issue 7): a captured valid request sent again later never moves points twice, and
an approved answer replayed to a terminal is refused by it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from cardcodec.message import decode_frame
from gateway.config import load_config
from simulators.terminal import BadAnswerError, CardEntry, Terminal
from tests.gateway_harness import DEMO, DIAMOND, Harness, demo_config


@pytest.fixture
def harness(tmp_path: Path, ledger_url: str) -> Harness:
    return Harness(demo_config(tmp_path, ledger_url))


def balance_after(harness: Harness, terminal_id: str = "10000001") -> int:
    """The card's spendable points, asked by a fresh terminal session."""
    terminal = harness.signed_on(terminal_id)
    fields = terminal.card_fields(DIAMOND, "2906")
    answer = harness.send(terminal, terminal.financial("0200", "310000", "01", fields))
    return answer.balance


def test_replay_within_the_session_gets_the_stored_answer(harness: Harness) -> None:
    """Sent again (from anywhere: the gateway does not look at addresses) with a valid MAC,
    the same request gets its stored answer and takes nothing more."""
    terminal = harness.signed_on()
    request, first = harness.redeem(terminal, DIAMOND, 1000)
    again = harness.send(terminal, request)
    assert again.fields == first.fields
    assert balance_after(harness, "10000002") == 50000 - 500


def test_replay_after_the_batch_closed_takes_nothing(harness: Harness) -> None:
    """After settlement the captured request is answered from the log: nothing moves."""
    terminal = harness.signed_on()
    request, _ = harness.redeem(terminal, DIAMOND, 1000)
    totals = f"{1000:012d}{1:03d}{0:012d}{0:03d}0" + "0" * 31
    fields = {11: terminal.next_trace(), **terminal.ids(), 48: totals, 49: "156"}
    fields.update({60: f"00{terminal.batch}201", 63: "01 "})
    assert harness.send(terminal, terminal.signed("0500", fields)).code == "00"
    assert harness.send(terminal, request).code == "00"  # the stored answer
    assert balance_after(harness, "10000002") == 50000 - 500


@pytest.mark.parametrize("later", [timedelta(hours=25), timedelta(minutes=5)])
def test_replay_under_old_keys_is_a0(harness: Harness, later: timedelta) -> None:
    """After the key lifetime, or once the terminal signed on again, the captured request's
    MAC no longer verifies: A0 and nothing moves."""
    terminal = harness.signed_on()
    request, _ = harness.redeem(terminal, DIAMOND, 1000)
    harness.clock.advance(later)
    harness.signed_on()  # the terminal's new session: new keys
    answer = harness.raw(request)
    assert answer is not None
    assert decode_frame(len(answer).to_bytes(2, "big") + answer).fields[39] == "A0"
    assert balance_after(harness, "10000002") == 50000 - 500


def test_an_approved_answer_replayed_to_a_terminal_is_refused(harness: Harness) -> None:
    """A terminal matches each answer to its own request (MTI, trace, MAC): an old approval
    replayed to it is not taken for the answer to its next purchase."""
    config = load_config(DEMO)
    terminal_config = next(t for t in config.terminals if t.id == "10000001")
    terminal = Terminal.from_config(terminal_config)
    sign_on = terminal.sign_on()
    answer = harness.gateway.handle(sign_on.frame[2:]).payload
    assert answer is not None
    terminal.receive(sign_on, len(answer).to_bytes(2, "big") + answer)
    card = CardEntry(DIAMOND, "2906")
    first = terminal.redemption(card, 1000)
    approved = harness.gateway.handle(first.frame[2:]).payload
    assert approved is not None
    old_answer = len(approved).to_bytes(2, "big") + approved
    terminal.receive(first, old_answer)
    second = terminal.redemption(card, 1000)
    with pytest.raises(BadAnswerError):
        terminal.receive(second, old_answer)

"""Replay: a recorded request rebuilt under fresh keys (MAC, track, PIN block), the recording
paired into requests and answers, answers compared field by field, and whole recordings
played again against the real gateway core in process."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cardcodec import crypto
from cardcodec.crypto import Suite, WorkingKeys, generate_working_keys
from cardcodec.frame import LENGTH_BYTES
from cardcodec.message import Message, decode_frame, encode_frame, mac_input, received_mac
from cardcodec.subfields import SecurityControl
from gateway.errors import BadInput
from simulators.connection import corrupt_mac
from simulators.recording import Direction, RecordedFrame, Recorder, iter_recording
from simulators.replay import (
    Recording,
    ReplayReport,
    compare_answers,
    load_recording,
    pair_recording,
    replay,
)
from simulators.scenario import load_scenario, run_scenario
from simulators.terminal import CardEntry, Terminal, TerminalError
from tests.test_sim_load import CONFIG, gateway_links

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "simulators" / "scenarios").glob("*.toml"))
GOLD = CardEntry("6688000000000000014", "2812")  # PIN 123456
DIAMOND = CardEntry("6688001234567890124", "2906")  # no PIN
PINS = {GOLD.number: "123456"}
FULL_CARD = re.compile(r"(?<!\d)6688\d{15}(?!\d)")


def terminal_with_keys(terminal_id: str = "10000001", *, tdk: bool = True) -> Terminal:
    """A terminal of the demo config holding fresh random working keys, as after a sign-on."""
    config = next(t for t in CONFIG.terminals if t.id == terminal_id)
    terminal = Terminal.from_config(config)
    terminal.keys = generate_working_keys(terminal.suite, tdk)
    return terminal


def keys_of(terminal: Terminal) -> WorkingKeys:
    assert terminal.keys is not None
    return terminal.keys


# --- rebuilding one request -----------------------------------------------------------------


@pytest.mark.parametrize("terminal_id", ["10000001", "10000002"], ids=["3des", "sm4"])
def test_rebuilt_request_keeps_every_field_but_moves_track_and_mac_to_the_new_keys(
    terminal_id: str,
) -> None:
    """Same fields and envelope; the track decrypts under the new TDK to the recorded clear
    track; the MAC verifies under the new MAK."""
    recorded_by, replaying = terminal_with_keys(terminal_id), terminal_with_keys(terminal_id)
    recorded = recorded_by.redemption(DIAMOND, 4321, encrypt_track=True, partial=True)
    rebuilt = replaying.rebuild(recorded.frame, recorded_keys=recorded_by.keys)
    old, new = recorded.message, decode_frame(rebuilt.request.frame)
    assert rebuilt.notes == () and not rebuilt.recorded_mac_wrong
    assert (new.mti, new.tpdu, new.header) == (old.mti, old.tpdu, old.header)
    assert {n: v for n, v in new.fields.items() if n not in (35, 64)} == {
        n: v for n, v in old.fields.items() if n not in (35, 64)
    }
    suite, new_keys = replaying.suite, keys_of(replaying)
    assert new_keys.tdk is not None
    assert crypto.decrypt_track(suite, new_keys.tdk, new.text(35)) == DIAMOND.track2()
    payload = rebuilt.request.frame[LENGTH_BYTES:]
    assert crypto.verify_mac(suite, new_keys.mak, mac_input(payload), received_mac(payload))
    assert rebuilt.request.kind is recorded.kind and rebuilt.request.card == DIAMOND


def test_without_a_tdk_the_track_goes_clear_and_field_53_says_so() -> None:
    """A session without a TDK sends the recorded track decrypted, 53 digit 3 = 0."""
    recorded_by, replaying = terminal_with_keys(), terminal_with_keys(tdk=False)
    recorded = recorded_by.balance(DIAMOND, encrypt_track=True)
    rebuilt = replaying.rebuild(recorded.frame, recorded_keys=recorded_by.keys)
    message = rebuilt.request.message
    assert message.text(35) == DIAMOND.track2()
    assert not SecurityControl.parse(message.text(53)).track_encrypted
    assert rebuilt.notes == ("track sent in clear: this session has no TDK",)


def test_without_the_recorded_keys_an_encrypted_track_goes_as_recorded() -> None:
    """The recorded TDK unknown: the track cannot be read and is sent as it was, said so."""
    recorded_by, replaying = terminal_with_keys(), terminal_with_keys()
    recorded = recorded_by.redemption(DIAMOND, 100, encrypt_track=True)
    rebuilt = replaying.rebuild(recorded.frame)
    assert rebuilt.request.message.text(35) == recorded.message.text(35)
    assert rebuilt.notes == ("track sent as recorded: the recorded session's TDK is unknown",)


@pytest.mark.parametrize("terminal_id", ["10000001", "10000002"], ids=["3des", "sm4"])
def test_the_cards_own_pin_is_sent_under_the_new_pik(terminal_id: str) -> None:
    """A recorded block that is the config PIN's block: the new block is that PIN's block
    under the new PIK, and nothing needs saying."""
    recorded_by, replaying = terminal_with_keys(terminal_id), terminal_with_keys(terminal_id)
    recorded = recorded_by.redemption(GOLD, 1000, pin="123456")
    rebuilt = replaying.rebuild(recorded.frame, recorded_keys=recorded_by.keys, pins=PINS)
    field = 52 if replaying.suite is Suite.TDES else 62
    block = rebuilt.request.message.binary(field)
    pin = crypto.decrypt_pin(replaying.suite, keys_of(replaying).pik, block, GOLD.number)
    assert pin == "123456" and rebuilt.notes == ()


def test_a_wrong_pin_stays_a_wrong_pin_without_being_decrypted() -> None:
    """A recorded block that is not the card's PIN is replaced by the block of another wrong
    PIN under the new PIK, so the gateway still answers 55; the report says so."""
    recorded_by, replaying = terminal_with_keys(), terminal_with_keys()
    recorded = recorded_by.redemption(GOLD, 1000, pin="654321")
    rebuilt = replaying.rebuild(recorded.frame, recorded_keys=recorded_by.keys, pins=PINS)
    block = rebuilt.request.message.binary(52)
    pin = crypto.decrypt_pin(replaying.suite, keys_of(replaying).pik, block, GOLD.number)
    assert pin != "123456" and len(pin) == 6
    assert rebuilt.notes == ("the recorded PIN was not the card's: a PIN as wrong is sent instead",)


def test_a_pin_the_config_does_not_know_is_sent_as_recorded_and_said_so() -> None:
    """Without the card's PIN the block cannot be moved: the recorded block, re-MAC'd."""
    recorded_by, replaying = terminal_with_keys(), terminal_with_keys()
    recorded = recorded_by.redemption(GOLD, 1000, pin="123456")
    rebuilt = replaying.rebuild(recorded.frame, recorded_keys=recorded_by.keys, pins={})
    assert rebuilt.request.message.binary(52) == recorded.message.binary(52)
    assert rebuilt.notes[0].startswith("PIN block sent as recorded (re-MAC'd)")


def test_a_wrong_recorded_mac_is_reported_so_the_replay_can_repeat_it() -> None:
    """recorded_mac_wrong only when the recorded MAC fails under the recorded MAK."""
    recorded_by, replaying = terminal_with_keys(), terminal_with_keys()
    recorded = recorded_by.redemption(DIAMOND, 100)
    right = replaying.rebuild(recorded.frame, recorded_keys=recorded_by.keys)
    wrong = replaying.rebuild(corrupt_mac(recorded.frame), recorded_keys=recorded_by.keys)
    assert not right.recorded_mac_wrong and wrong.recorded_mac_wrong
    assert right.request.frame == wrong.request.frame


def test_replacements_and_unmaced_requests() -> None:
    """`replace` changes the named fields before the MAC; a sign-on goes byte for byte."""
    recorded_by, replaying = terminal_with_keys(), Terminal.from_config(CONFIG.terminals[0])
    sign_on = recorded_by.sign_on(tdk=True)
    assert replaying.rebuild(sign_on.frame).request.frame == sign_on.frame
    replaying.keys = generate_working_keys(Suite.TDES, True)
    recorded = recorded_by.redemption(DIAMOND, 100)
    data = recorded.message.text(60)
    moved = data[:2] + "000007" + data[8:]
    rebuilt = replaying.rebuild(recorded.frame, replace={60: moved})
    assert rebuilt.request.batch == "000007"


def test_a_frame_that_is_no_request_is_refused() -> None:
    """An answer (or anything classify does not know) cannot be rebuilt."""
    terminal = terminal_with_keys()
    answer = encode_frame(Message("0810", {11: "000001", 41: "10000001", 60: "00000001003"}))
    with pytest.raises(TerminalError, match="not a request of the profile"):
        terminal.rebuild(answer)


# --- pairing the recording ------------------------------------------------------------------


def frame(mti: str, trace: str, terminal: str = "10000001") -> bytes:
    data = "00000001201" if mti[:2] == "05" else "00000001301"
    fields = {11: trace, 41: terminal, 42: "898310048990001", 60: data}
    return encode_frame(Message(mti, fields))


def records(*items: tuple[Direction, bytes, str]) -> list[RecordedFrame]:
    when = datetime(2026, 6, 6, 4, tzinfo=UTC)
    return [RecordedFrame(when, direction, terminal, data) for direction, data, terminal in items]


def test_answers_pair_with_their_requests_by_mti_and_trace() -> None:
    """In order; a repeat pairs each copy with its answer; a request with no answer before
    the next one gets none; a cut frame gets none; a stray answer is counted."""
    a, b, c = frame("0820", "000001"), frame("0820", "000002"), frame("0500", "000003")
    recording = pair_recording(
        records(
            ("out", a, "10000001"),
            ("out", a, "10000001"),  # repeat
            ("in", frame("0830", "000001"), "10000001"),
            ("in", frame("0830", "000001"), "10000001"),
            ("out", b, "10000001"),  # no answer (timed out)
            ("out", c[:9], "10000001"),  # cut
            ("out", c, "10000001"),
            ("in", frame("0830", "000009"), "10000001"),  # stray
            ("in", frame("0510", "000003"), "10000001"),
        ),
        "log",
    )
    answered = [e.answer is not None for e in recording.exchanges]
    assert answered == [True, True, False, False, True]
    assert [e.cut for e in recording.exchanges] == [False, False, False, True, False]
    assert recording.stray_answers == 1
    assert recording.exchanges[4].answer == frame("0510", "000003")


def test_terminals_are_paired_apart() -> None:
    """Answers of one terminal never pair with another's requests."""
    recording = pair_recording(
        records(
            ("out", frame("0820", "000001"), "10000001"),
            ("out", frame("0820", "000001", "10000002"), "10000002"),
            ("in", frame("0830", "000001", "10000002"), "10000002"),
            ("in", frame("0830", "000001"), "10000001"),
        ),
        "log",
    )
    assert [(e.terminal, e.answer is not None) for e in recording.exchanges] == [
        ("10000001", True),
        ("10000002", True),
    ]
    assert recording.exchanges[1].answer == frame("0830", "000001", "10000002")


def test_a_gateways_log_is_not_a_simulator_recording() -> None:
    """A frame sent that is an answer: refused, naming the frame."""
    with pytest.raises(BadInput, match="frame 1: sent frame is an answer \\(MTI 0830\\)"):
        pair_recording(records(("out", frame("0830", "000001"), "10000001")), "log")


def test_recordings_of_unknown_terminals_or_without_requests_are_refused(tmp_path: Path) -> None:
    """Checked against the config before anything is sent."""
    log = tmp_path / "log.jsonl"
    line = RecordedFrame(datetime.now(UTC), "out", "99999999", frame("0820", "000001"))
    log.write_text(line.to_json())
    with pytest.raises(BadInput) as refused:
        load_recording(log, CONFIG)
    assert str(refused.value) == (
        f"{log}: frame 1: terminal '99999999' is not a terminal of the config"
    )
    log.write_text("\n")
    with pytest.raises(BadInput, match="no request to replay"):
        load_recording(log, CONFIG)


def test_frames_of_no_terminal_in_a_gateways_recording_are_left_out_and_counted(
    tmp_path: Path,
) -> None:
    """`serve --record` writes terminal "" for a frame whose field 41 it could not read
    (a hostile one); the rest of the recording replays, and the frames left out are noted."""
    log = tmp_path / "log.jsonl"
    lines = [
        RecordedFrame(datetime.now(UTC), "out", "", bytes.fromhex("0006600000000002")),
        RecordedFrame(datetime.now(UTC), "out", "10000001", frame("0820", "000001")),
    ]
    log.write_text("\n".join(line.to_json() for line in lines) + "\n")
    recording = load_recording(log, CONFIG)
    assert [e.terminal for e in recording.exchanges] == ["10000001"]
    assert recording.unattributed == 1
    report = ReplayReport(str(log), [], recording.stray_answers, recording.unattributed)
    assert "note: 1 recorded frames named no terminal" in report.render()


# --- comparing answers ----------------------------------------------------------------------


def answer(**fields: str) -> bytes:
    base = {11: "000001", 12: "120000", 13: "0606", 37: "000000000001", 39: "00"}
    base |= {41: "10000001", 42: "898310048990001", 60: "22000001000201"}
    base |= {int(name[1:]): value for name, value in fields.items()}
    return encode_frame(Message("0210", base))


def test_fields_that_must_differ_are_not_compared() -> None:
    """12, 13, 15, 37, 38 (and 62, 64, the header) differ freely; 39 does not."""
    recorded = answer()
    assert compare_answers(recorded, answer(f12="235959", f13="0607", f37="000000000999")) == []
    assert compare_answers(recorded, answer(f39="51")) == ["field 39: recorded 00, got 51"]
    assert compare_answers(recorded, None) == ["answer: recorded one, got none"]


def test_differences_mask_card_numbers_and_follow_the_batch_map() -> None:
    """Field 2 is shown masked; a recorded 60.2 mapped to the replay's batch is equal."""
    recorded = answer(f2=GOLD.number)
    lines = compare_answers(recorded, answer(f2=DIAMOND.number))
    assert lines == ["field 2: recorded 668800*********0014, got 668800*********0124"]
    moved = answer(f60="22000002000201")
    assert compare_answers(answer(), moved) == [
        "field 60: recorded 22000001000201, got 22000002000201"
    ]
    assert compare_answers(answer(), moved, {"000001": "000002"}) == []


# --- whole recordings against the gateway core ------------------------------------------------


def record_scenario(tmp_path: Path, path: Path) -> Recording:
    """Play a shipped scenario on a fresh in-process gateway and pair what was recorded."""
    stream = io.StringIO()
    _, connect = gateway_links(tmp_path, "recorded", Recorder(stream))
    scenario = load_scenario(path, CONFIG)
    report = run_scenario(scenario, CONFIG, connect)
    assert report.failed == 0, report.render()
    frames = list(iter_recording(stream.getvalue().splitlines(), "recording"))
    return pair_recording(frames, "recording")


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_a_recording_replayed_on_a_fresh_gateway_is_answered_the_same(
    tmp_path: Path, path: Path
) -> None:
    """Encrypted tracks, PINs right and wrong, keyed cards, a lost answer and its reversal,
    voids, refunds across terminals, a corrupted MAC, settlement and upload: all the same."""
    recording = record_scenario(tmp_path, path)
    _, connect = gateway_links(tmp_path, "replayed")
    report = replay(recording, CONFIG, connect)
    assert report.differing == [], report.render()
    assert len(report.exchanges) == len(recording.exchanges)
    notes = {note for exchange in report.exchanges for note in exchange.notes}
    assert not any(note.startswith("PIN block sent as recorded") for note in notes)


UNSUPPORTED = """
clock = 2026-06-06T12:00:00+08:00
config = "config/demo.toml"

[[step]]
terminal = "10000001"
do = "sign_on"
expect = { code = "00" }

[[step]]
terminal = "10000001"
do = "redeem"
card = "6688001234567890124"
amount_fen = 1000
omit_field = 3
expect = { code = "12" }

[[step]]
terminal = "10000001"
do = "balance"
card = "6688001234567890124"
omit_field = 3
corrupt_mac = true
expect = { code = "A0" }
"""


def test_a_request_of_no_kind_is_mac_d_again_and_answered_the_same(tmp_path: Path) -> None:
    """A redemption without field 3 is no request of the profile (`12`, after the MAC): the
    replay MACs it under the new session's keys, and a recorded wrong MAC stays wrong."""
    path = tmp_path / "unsupported.toml"
    path.write_text(UNSUPPORTED, encoding="utf-8")
    recording = record_scenario(tmp_path, path)
    _, connect = gateway_links(tmp_path, "replayed")
    report = replay(recording, CONFIG, connect)
    assert report.differing == [], report.render()
    assert [e.sent for e in report.exchanges][1:] == [
        "0200 (no request of the profile, MAC'd again)"
    ] * 2


def test_a_gateway_with_another_batch_open_gets_requests_in_its_batch(tmp_path: Path) -> None:
    """The replay adopts the batch the gateway opened (here 000002) for 60.2 and 61."""
    recording = record_scenario(tmp_path, ROOT / "simulators" / "scenarios" / "merchant-day.toml")
    _, connect = gateway_links(tmp_path, "replayed")
    link = connect()
    terminal = Terminal.from_config(CONFIG.terminals[0])
    for build in (terminal.sign_on, terminal.settlement):
        request = build()
        answer = link.exchange(request.frame).answer
        assert answer is not None
        terminal.receive(request, answer)
    assert terminal.batch == "000002"
    report = replay(recording, CONFIG, connect)
    assert report.differing == [], report.render()
    financial = [
        e.sent
        for e in report.exchanges
        if e.recorded.terminal == "10000001" and e.sent.startswith("0200 redemption")
    ]
    assert financial and all("batch 000002" in line for line in financial)


def test_replaying_on_a_gateway_that_already_saw_it_reports_the_differences(
    tmp_path: Path,
) -> None:
    """The same gateway again: balances and declines differ, each named, cards masked."""
    stream = io.StringIO()
    _, connect = gateway_links(tmp_path, "once", Recorder(stream))
    path = ROOT / "simulators" / "scenarios" / "merchant-day.toml"
    assert run_scenario(load_scenario(path, CONFIG), CONFIG, connect).failed == 0
    frames = list(iter_recording(stream.getvalue().splitlines(), "recording"))
    report = replay(pair_recording(frames, "recording"), CONFIG, connect)
    text = report.render()
    assert report.differing and "! field 63: recorded VIP" in text
    assert text.splitlines()[-1].endswith(f"{len(report.differing)} differ")
    assert FULL_CARD.search(text) is None

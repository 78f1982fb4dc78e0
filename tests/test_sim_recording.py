"""The simulator's traffic log: JSON lines that read back as written, card data only in the
frame as it was on the wire, and bad lines refused with their place."""

from __future__ import annotations

import io
import json
import os
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import BadInput
from simulators.recording import (
    FileRecorder,
    RecordedFrame,
    Recorder,
    iter_recording,
    read_recording,
)
from tests.vectors import suite_cases

CASE = suite_cases()[0]
CARD_NUMBER = CASE.card_number
INSTANT = datetime(2026, 6, 6, 4, 0, 0, 123000, tzinfo=UTC)


def fixed_clock() -> datetime:
    return INSTANT


def test_records_read_back_as_written(tmp_path: Path) -> None:
    """A file of out and in frames reads back to the same records, in order. The file, whose
    frames hold card data, is made readable by its owner only."""
    path = tmp_path / "traffic.jsonl"
    request, answer = CASE.frame("redemption_frame"), CASE.frame("redemption_response_frame")
    with FileRecorder(path, fixed_clock) as recorder:
        written = [
            recorder.record("out", "10000001", request),
            recorder.record("in", "10000001", answer),
        ]
    assert read_recording(path) == written
    assert [r.frame for r in written] == [request, answer]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_log_that_existed_with_a_wider_mode_is_made_owner_only(tmp_path: Path) -> None:
    """A file made beforehand readable by others (0644) is appended to and made 0600."""
    path = tmp_path / "traffic.jsonl"
    path.write_text("")
    path.chmod(0o644)
    with FileRecorder(path, fixed_clock) as recorder:
        recorder.record("out", "10000001", CASE.frame("redemption_frame"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(read_recording(path)) == 1


def test_a_symbolic_link_or_a_folder_is_refused_and_nothing_written(tmp_path: Path) -> None:
    """A link planted where the log is to go is not followed; a folder is not a log."""
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("")
    link = tmp_path / "traffic.jsonl"
    link.symlink_to(elsewhere)
    with pytest.raises(BadInput) as refused:
        FileRecorder(link, fixed_clock)
    assert str(refused.value) == f"{link}: cannot open for recording: a symbolic link"
    assert elsewhere.read_text() == ""
    with pytest.raises(BadInput) as refused:
        FileRecorder(tmp_path, fixed_clock)
    assert str(refused.value).startswith(f"{tmp_path}: cannot open for recording: ")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_log_another_user_owns_is_refused_and_keeps_its_mode(tmp_path: Path) -> None:
    """Run as root, `fchmod` succeeds on anyone's file, and its owner could widen the mode
    again and read the frames: a file another user made where the log is to go is refused,
    untouched."""
    path = tmp_path / "traffic.jsonl"
    path.write_text("")
    path.chmod(0o666)
    os.chown(path, 65534, 65534)
    with pytest.raises(BadInput) as refused:
        FileRecorder(path, fixed_clock)
    assert str(refused.value) == (
        f"{path}: cannot open for recording: owned by user 65534, not by this one (0)"
    )
    assert (stat.S_IMODE(path.stat().st_mode), path.read_text()) == (0o666, "")


def test_each_record_is_one_json_line_with_the_wire_frame_in_hex() -> None:
    """One line per frame: time with offset, direction, terminal, upper-case hex of the frame."""
    stream = io.StringIO()
    Recorder(stream, fixed_clock).record("out", "10000001", CASE.frame("redemption_frame"))
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line) == {
        "time": "2026-06-06T04:00:00.123+00:00",
        "direction": "out",
        "terminal": "10000001",
        "frame": CASE.data["redemption_frame"],
    }


@pytest.mark.parametrize(
    "name", ["redemption_frame", "redemption_encrypted_track_frame", "redemption_with_pin_frame"]
)
def test_card_number_appears_only_inside_the_frame_as_sent(name: str) -> None:
    """No key but the frame holds card data, and the frame is exactly the wire bytes."""
    stream = io.StringIO()
    frame = CASE.frame(name)
    Recorder(stream, fixed_clock).record("out", "10000001", frame)
    record = json.loads(stream.getvalue())
    for key, value in record.items():
        if key != "frame":
            assert CARD_NUMBER not in str(value)
            assert CARD_NUMBER[-10:] not in str(value)
    assert record["frame"] == frame.hex().upper()


def test_repr_of_a_record_shows_no_frame_bytes() -> None:
    """A record's repr gives its size, not its bytes."""
    record = RecordedFrame(INSTANT, "out", "10000001", CASE.frame("redemption_frame"))
    assert CARD_NUMBER not in repr(record)
    assert "109 bytes" in repr(record)  # LEN 0x006B + 2


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "not a JSON object"),
        ("[1, 2]", "not a JSON object"),
        ('{"time": "x", "direction": "out", "terminal": "1", "frame": "00"}', "time"),
        (
            '{"time": "2026-06-06T04:00:00", "direction": "out", "terminal": "1", "frame": "00"}',
            "UTC offset",
        ),
        (
            '{"time": "2026-06-06T04:00:00+00:00", "direction": "up", "terminal": "1", '
            '"frame": "00"}',
            "direction",
        ),
        (
            '{"time": "2026-06-06T04:00:00+00:00", "direction": "in", "terminal": "1", '
            '"frame": "6688001234567890124Z"}',
            "frame is not hex",
        ),
        (
            '{"time": "2026-06-06T04:00:00+00:00", "direction": "in", "terminal": "1", '
            '"frame": "00", "card": "6688001234567890124"}',
            "unknown key",
        ),
        ('{"time": "2026-06-06T04:00:00+00:00", "direction": "in", "frame": "00"}', "terminal"),
        ("[" * 2500 + "]" * 2500, "not a JSON object"),  # nested past the parser's depth
        ('"' + "0" * 6000 + '"', "longer than a recorded frame's line can be"),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(line: str, problem: str) -> None:
    """A bad line is a BadInput naming the source and line, never repeating card data."""
    good = (
        '{"time": "2026-06-06T04:00:00+00:00", "direction": "in", "terminal": "1", "frame": "00"}'
    )
    lines = ["", good, line]
    with pytest.raises(BadInput, match=problem) as refused:
        list(iter_recording(lines, "log.jsonl"))
    assert "log.jsonl: line 3" in str(refused.value)
    assert CARD_NUMBER not in str(refused.value)


def test_missing_file_is_bad_input(tmp_path: Path) -> None:
    """Reading a log that does not exist is a BadInput naming the file."""
    with pytest.raises(BadInput, match="cannot read"):
        read_recording(tmp_path / "missing.jsonl")


@given(
    frames=st.lists(
        st.tuples(
            st.sampled_from(["in", "out"]),
            st.text("0123456789", min_size=0, max_size=8),
            st.binary(min_size=1, max_size=300),
            st.datetimes(
                min_value=datetime(2000, 1, 1),
                max_value=datetime(2100, 1, 1),
                timezones=st.sampled_from([UTC, timezone(timedelta(hours=8))]),
            ),
        ),
        max_size=10,
    )
)
def test_any_records_round_trip(frames: list[tuple[str, str, bytes, datetime]]) -> None:
    """Any frames, terminals and instants (to the millisecond) read back unchanged."""
    stream = io.StringIO()
    written = []
    for direction, terminal, frame, instant in frames:
        at = instant.replace(microsecond=instant.microsecond // 1000 * 1000)
        recorder = Recorder(stream, lambda at=at: at)
        written.append(recorder.record("in" if direction == "in" else "out", terminal, frame))
    assert list(iter_recording(stream.getvalue().splitlines(), "mem")) == written


def test_a_recording_the_disk_refuses_names_its_file(tmp_path: Path) -> None:
    """A write error names no file: the recorder's names the recording, so `vipgate sim run
    --record` on a full disk says which file it could not write (it blamed standard output,
    and silenced it, the scenario's report with it)."""

    class Full(io.StringIO):
        def write(self, _text: str) -> int:
            raise OSError(28, "No space left on device")

    recorder = Recorder(Full(), name=str(tmp_path / "day.jsonl"))
    with pytest.raises(OSError) as raised:
        recorder.record("out", "10000001", b"\x00\x01a")
    assert (raised.value.errno, raised.value.filename) == (28, str(tmp_path / "day.jsonl"))

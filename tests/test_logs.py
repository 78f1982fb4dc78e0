"""Log lines: JSON, card numbers masked, and a group's lines written together."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog

from gateway import logs, workers


@pytest.fixture(autouse=True)
def _libraries_left_as_they_were() -> Iterator[None]:
    """`logs.configure` sends the libraries' warnings to the gateway's lines from then on
    (a root logging handler): gone again after each test here."""
    before = list(logging.getLogger().handlers)
    yield
    for handler in logging.getLogger().handlers:
        if handler not in before:
            logging.getLogger().removeHandler(handler)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    saved = structlog.get_config()
    written = io.StringIO()
    logs.configure(written)
    try:
        yield written
    finally:
        structlog.configure(**saved)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_is_written_as_it_is_logged_with_the_card_masked(stream: io.StringIO) -> None:
    structlog.get_logger("t").info("answered", card="6688001234567890124", pin="1234")
    (line,) = lines(stream)
    assert line["event"] == "answered"
    assert line["card"] == "668800*********0124"
    assert line["pin"] == "<hidden>"


def test_a_line_carries_its_level_and_the_instant_in_utc_to_the_microsecond(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The date and time of day are formatted once a second; the microseconds every line,
    with their zeros, and the next second formats anew."""
    at = 1_795_426_200_000_000_000  # 2026-11-23T09:30:00Z in ns
    instants = iter([at + 999, at + 123_456_000, at + 1_000_005_000])
    monkeypatch.setattr(logs, "_now_ns", lambda: next(instants))
    monkeypatch.setattr(logs, "_second", logs._Second())
    for _ in range(3):
        structlog.get_logger("t").warning("late", seconds=0.5)
    assert [(line["timestamp"], line["level"]) for line in lines(stream)] == [
        ("2026-11-23T09:30:00.000000Z", "warning"),
        ("2026-11-23T09:30:00.123456Z", "warning"),
        ("2026-11-23T09:30:01.000005Z", "warning"),
    ]
    assert datetime.fromisoformat("2026-11-23T09:30:00.123456Z").timestamp() == 1_795_426_200.123456


def test_tracks_and_objects_holding_card_data_go_out_masked(stream: io.StringIO) -> None:
    """A track's tail is hidden with its number masked, and an object (an exception, whose
    repr would be written after masking) goes out as its text, masked."""
    track = "6688001234567890124D28121011234567890"
    error = ValueError(f"no such card {track}")
    structlog.get_logger("t").warning("odd", detail=f"track {track}", error=error, n=3)
    (line,) = lines(stream)
    hidden = "668800*********0124" + "*" * 18
    assert line["detail"] == f"track {hidden}"
    assert line["error"] == f"no such card {hidden}"
    assert line["n"] == 3
    assert "1234567890124" not in stream.getvalue()


def test_card_numbers_and_secrets_inside_lists_and_dicts_go_out_masked(
    stream: io.StringIO,
) -> None:
    """A value that is a list, tuple or dict is masked through: card numbers at any depth,
    bytes by their length, and a secret's key hidden wherever it is."""
    card = "6688001234567890124"
    structlog.get_logger("t").info(
        "many",
        cards=[card, (card, b"\x01\x02")],
        nested={"card": card, "pin": "1234", "inner": [{"tmk": "00" * 16}]},
    )
    (line,) = lines(stream)
    masked = "668800*********0124"
    assert line["cards"] == [masked, [masked, "<2 bytes>"]]
    assert line["nested"] == {"card": masked, "pin": "<hidden>", "inner": [{"tmk": "<hidden>"}]}
    assert "1234567890124" not in stream.getvalue() and "00" * 16 not in stream.getvalue()


def test_lines_logged_together_are_written_when_the_block_ends(stream: io.StringIO) -> None:
    log = structlog.get_logger("t")
    with logs.together():
        log.info("first", card="6688001234567890124")
        with logs.together():
            log.info("second")
        assert stream.getvalue() == ""  # the inner block writes with the outer one
        log.info("third")
        assert stream.getvalue() == ""
    assert [line["event"] for line in lines(stream)] == ["first", "second", "third"]
    assert lines(stream)[0]["card"] == "668800*********0124"


def test_another_threads_lines_are_not_held(stream: io.StringIO) -> None:
    log = structlog.get_logger("t")
    with logs.together():
        log.info("held")
        worker = threading.Thread(target=lambda: log.info("elsewhere"))
        worker.start()
        worker.join()
        assert [line["event"] for line in lines(stream)] == ["elsewhere"]
    assert [line["event"] for line in lines(stream)] == ["elsewhere", "held"]


def test_lines_held_when_the_block_fails_are_still_written(stream: io.StringIO) -> None:
    with pytest.raises(RuntimeError), logs.together():
        structlog.get_logger("t").error("before_the_failure")
        raise RuntimeError
    assert [line["event"] for line in lines(stream)] == ["before_the_failure"]


class _Writes(io.StringIO):
    """A stream that keeps what each flush sent on, as a file descriptor would see writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        return super().write(text)

    def flush(self) -> None:
        if self._pending:
            self.writes.append(self._pending)
            self._pending = ""


def test_lines_held_together_go_out_whole_and_a_pipes_worth_to_a_write() -> None:
    """Several processes share one stdout: a write that a pipe might split, or that ends
    inside a line, would let another process's line into the middle of one of ours."""
    saved = structlog.get_config()
    written = _Writes()
    logs.configure(written)
    try:
        log = structlog.get_logger("t")
        with logs.together():
            for n in range(60):
                log.info("answered", terminal=f"T{n:07d}", note="x" * 90)
            log.info("long", note="y" * (logs.PIPE_BUF + 100))
            log.info("after")
    finally:
        structlog.configure(**saved)
    # about 16 KB of short lines: a few writes, neither one a line nor one for them all
    assert 4 <= len(written.writes) <= 8
    for text in written.writes:
        assert text.endswith("\n")
        if text.count("\n") > 1:
            assert len(text.encode()) <= logs.PIPE_BUF
    (long_write,) = [text for text in written.writes if len(text) > logs.PIPE_BUF]
    assert json.loads(long_write)["event"] == "long"  # alone, whole
    events = [json.loads(line)["event"] for line in "".join(written.writes).splitlines()]
    assert events == ["answered"] * 60 + ["long", "after"]


def test_a_line_with_text_beyond_ascii_is_measured_in_bytes() -> None:
    wide = "\u4e2d" * 1000  # three bytes each in UTF-8
    chunks = list(logs._chunks([wide, wide]))  # 3,001 bytes each with its newline
    assert chunks == [wide + "\n", wide + "\n"]
    narrow = "a" * 2000  # two of them, with their newlines, fit one write
    assert list(logs._chunks([narrow, narrow])) == [f"{narrow}\n{narrow}\n"]


def test_worker_processes_log_through_lines_that_hold_a_groups_lines() -> None:
    saved = structlog.get_config()
    try:
        workers._whole_line_writes()
        assert isinstance(structlog.get_config()["logger_factory"](), logs.Lines)
    finally:
        structlog.configure(**saved)


def test_a_stream_that_can_no_longer_be_written_is_pointed_at_nothing() -> None:
    """The log's pipe loses its reader (or its terminal hangs up): the failed line and every
    later one go to /dev/null, and logging raises nothing. A drain begins with a log line:
    raised there, it was cut short, committed approvals unanswered."""
    reader, writer = os.pipe()
    stream = os.fdopen(writer, "w", encoding="utf-8")
    saved = structlog.get_config()
    logs.configure(stream)
    try:
        log = structlog.get_logger("t")
        log.info("before")
        assert json.loads(os.read(reader, 4096))["event"] == "before"
        os.close(reader)  # the reader goes away
        log.info("stopping")  # EPIPE: no exception
        with logs.together():
            log.info("answered")
        log.info("stopped")
        assert os.readlink(f"/proc/self/fd/{writer}") == os.devnull
    finally:
        structlog.configure(**saved)
        stream.close()


def _fill(descriptor: int) -> None:
    """A non-blocking pipe filled to the brim with empty lines."""
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(descriptor, b"\n" * 4096)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(descriptor, b"\n")


def _drain(descriptor: int) -> bytes:
    read = b""
    with contextlib.suppress(BlockingIOError):
        while True:
            read += os.read(descriptor, 65536)
    return read


def test_lines_a_full_stream_refuses_are_counted_and_the_rest_stay_whole_json() -> None:
    """A stream that takes nothing for a while (a full disk, a quota; here a full pipe, as a
    slow reader leaves it): the lines it refuses are dropped, the stream is kept, and the
    first chunk written again begins with how many (`log_lines_dropped`), counted across
    every refusal. A line it took only the start of is ended before the next, so every
    later line is whole JSON. (The first refusal gave the stream up for good; then the
    count was of the last refusal only, and a cut line ran into the next.)"""
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    os.set_blocking(reader, False)
    stream = os.fdopen(writer, "w", encoding="utf-8")
    saved = structlog.get_config()
    logs.configure(stream)
    try:
        log = structlog.get_logger("t")
        _fill(writer)
        log.info("answered", n=1)
        with logs.together():
            log.info("answered", n=2)
            log.info("answered", n=3)
        _drain(reader)
        _fill(writer)
        os.read(reader, 4096)  # a page of room: the start of the next line only
        log.info("answered", n=4, note="x" * 6000)  # longer than a pipe writes at once
        written = _drain(reader)
        log.info("answered", n=5)
        log.info("answered", n=6)
        written += _drain(reader)
        assert os.readlink(f"/proc/self/fd/{writer}").startswith("pipe:")  # kept
    finally:
        structlog.configure(**saved)
        stream.close()
        os.close(reader)
    said, cut, *whole = [line for line in written.decode().split("\n") if line.strip()]
    assert (json.loads(said)["event"], json.loads(said)["lines"]) == ("log_lines_dropped", 3)
    assert cut.startswith('{"n": 4, "note": "xxx') and not cut.endswith("}")  # its start only
    parsed = [json.loads(line) for line in whole]  # ended, the next lines are whole again
    assert [line["event"] for line in parsed] == ["log_lines_dropped", "answered", "answered"]
    assert (parsed[0]["lines"], parsed[0]["level"]) == (1, "warning")  # the cut one
    assert [line["n"] for line in parsed[1:]] == [5, 6]


def test_a_librarys_own_warning_is_a_json_line_masked_like_the_rest(
    stream: io.StringIO,
) -> None:
    """psycopg says on its own logger that it dropped a pipeline when PostgreSQL went away:
    a JSON line among the gateway's (`library_said`), card numbers masked; it was plain text
    on stderr. (The record is handed to the gateway's handler directly: pytest's own capture
    of the logging module would keep the unmasked text.)"""
    root = logging.getLogger()
    [forwarded] = [handler for handler in root.handlers if type(handler).__name__ == "_Forwarded"]
    assert forwarded.level == logging.WARNING
    record = logging.LogRecord(
        "psycopg",
        logging.WARNING,
        __file__,
        1,
        "error ignored terminating %s: %s",
        ("<psycopg.Pipeline [BAD]>", "6688001234567890124"),
        None,
    )
    forwarded.handle(record)
    [line] = lines(stream)
    assert (line["event"], line["level"], line["library"]) == (
        "library_said",
        "warning",
        "psycopg",
    )
    assert line["said"] == "error ignored terminating <psycopg.Pipeline [BAD]>: 668800*********0124"

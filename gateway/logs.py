"""Structured logs: one JSON object per line on stdout, with card data kept out (STYLE.md).

The last processor before rendering masks anything that looks like a card number (13-19
digits) in every value, and drops keys that may carry track data, PIN blocks or keys. It runs
on every line, so a careless `log.info(card=...)` still prints only the first 6 and last 4.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import structlog

from cardcodec.cards import mask_card_data

SECRET_KEYS = frozenset(
    {"track", "track2", "pin", "pin_block", "key", "keys", "tmk", "pik", "mak", "tdk", "frame"}
)


def _mask_text(text: str) -> str:
    if len(text) < 13:  # too short to hold a card number: most values, on every line
        return text
    return mask_card_data(text)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: ("<hidden>" if k in SECRET_KEYS else _clean(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Anything else (an exception, a date, ...) would be rendered by its repr after this step,
    # unmasked: it goes out as its text, masked.
    return _mask_text(str(value))


_PLAIN = frozenset({int, float, bool, type(None)})  # values that cannot hold card data


def protect_card_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask card numbers and hide secrets in every value of a log line."""
    if not SECRET_KEYS.isdisjoint(event_dict):
        for key in SECRET_KEYS.intersection(event_dict):
            event_dict[key] = "<hidden>"
    for key, value in event_dict.items():
        kind = value.__class__
        if kind is str:
            if len(value) >= 13 and key not in SECRET_KEYS:  # shorter: no card number
                event_dict[key] = _mask_text(value)
        elif kind not in _PLAIN and key not in SECRET_KEYS:
            event_dict[key] = _clean(value)
    return event_dict


class _Second(threading.local):
    second = -1
    text = ""


_second = _Second()
_now_ns = time.time_ns  # the wall clock, replaced in tests


def add_timestamp(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The wall-clock instant in UTC, ISO 8601 to the microsecond (`2026-11-23T09:30:00.000000Z`).

    Every answer logs a line, so the date and time of day are formatted once a second (per
    thread) and only the microseconds each time: a third of structlog's `TimeStamper`."""
    second, nanoseconds = divmod(_now_ns(), 1_000_000_000)
    cached = _second
    if cached.second != second:
        cached.text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        cached.second = second
    event_dict["timestamp"] = f"{cached.text}{nanoseconds // 1000:06d}Z"
    return event_dict


# One encoder made once: `json.dumps` with any option builds a new one for every line. The
# values reach it already cleaned (`protect_card_data`) into JSON's own types; `str` is a
# last resort that can only print text the masking has seen.
_encode = json.JSONEncoder(default=str).encode


def render_json(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    """The line as one JSON object."""
    return _encode(event_dict)


def configure(stream: TextIO = sys.stdout, level: int = logging.INFO) -> None:
    """JSON lines on `stream`: time, level, event and the line's own keys."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            protect_card_data,
            # after the masking, which it need not go through: the clock holds no card data
            add_timestamp,
            render_json,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lines_to(stream),
        cache_logger_on_first_use=False,
    )
    _libraries_log_here()


class _Forwarded(logging.Handler):
    """A library's own log record (Python's `logging`: psycopg's, SQLAlchemy's) as one of
    the gateway's JSON lines, `library_said`, masked like any other: by default Python
    wrote it to stderr as plain text, the one line of the log no reader could parse."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            said = record.getMessage()
        except Exception:  # a record whose arguments do not fit its message
            said = str(record.msg)
        structlog.get_logger(record.name).log(
            record.levelno, "library_said", library=record.name, said=said
        )


def _libraries_log_here() -> None:
    """Warnings and errors of the libraries go to the JSON lines (`_Forwarded`), once."""
    root = logging.getLogger()
    if not any(isinstance(handler, _Forwarded) for handler in root.handlers):
        root.addHandler(_Forwarded(logging.WARNING))
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)


def lines_to(stream: TextIO) -> Callable[..., Lines]:
    """structlog's logger factory for `Lines` on `stream`."""
    return lambda *_args: Lines(stream)


class _Held(threading.local):
    lines: list[tuple[TextIO, str]] | None = None


_held = _Held()
_writing = threading.Lock()
# Bytes a pipe writes in one piece (POSIX's PIPE_BUF, 4,096 on Linux); a chunk of lines is
# at most this, and well within the 8 KiB buffer of a text stream, which writes it at once.
PIPE_BUF = 4096


class Lines:
    """structlog's logger: each line written and flushed as it comes, except the lines a
    thread logs inside `together()`, which are written at its end, several to a write.

    Several processes may share one stdout (`vipgate serve --workers N`, whose lines go to
    one file, pipe or journal), so every write is whole lines, and at most `PIPE_BUF` bytes
    unless one line alone is longer: a pipe takes a write of that size in one piece, so two
    processes' lines never interleave within a line. (A line longer than that goes in a write
    of its own, as any logger would write it.)"""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        held = _held.lines
        if held is not None:
            held.append((self._stream, message))
        else:
            _write([(self._stream, message)])

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


@contextmanager
def together() -> Iterator[None]:
    """Hold this thread's log lines until the block ends, then write them at once: the
    server answers a group of requests in one go, and one write instead of one per answer
    leaves the interpreter lock fewer times. Nested blocks write with the outermost."""
    if _held.lines is not None:
        yield
        return
    lines: list[tuple[TextIO, str]] = []
    _held.lines = lines
    try:
        yield
    finally:
        _held.lines = None
        _write(lines)


def _write(lines: list[tuple[TextIO, str]]) -> None:
    streams: dict[int, tuple[TextIO, list[str]]] = {}
    for stream, line in lines:
        streams.setdefault(id(stream), (stream, []))[1].append(line)
    with _writing:
        for stream, logged in streams.values():
            _write_lines(stream, logged)


def _write_lines(stream: TextIO, logged: list[str]) -> None:
    """The lines, in chunks (`_chunks`); lines a stream refuses for now are counted, and the
    first chunk that goes out again begins with the count (`log_lines_dropped`)."""
    unsaid = _dropped.pop(id(stream), 0)  # lines dropped before, not said yet
    texts = [_dropped_line(unsaid), *logged] if unsaid else logged
    lost = 0
    for index, chunk in enumerate(_chunks(texts)):
        notice = 1 if unsaid and index == 0 else 0  # the count's own line leads the first
        try:
            _put(stream, chunk)
        except _Refused as refused:
            if refused.gone:  # never again: see `_lost`
                _lost(stream)
                return
            # Full for now (a disk out of space, a quota, a non-blocking pipe full): the
            # lines not written are dropped and counted; the count's own line, if it went
            # out whole (the chunk's first), has said what it had to say.
            if notice and refused.unwritten_lines < chunk.count("\n"):
                unsaid = 0
                notice = 0
            lost += refused.unwritten_lines - notice
            continue
        if notice:
            unsaid = 0
    if unsaid or lost:
        _dropped[id(stream)] = unsaid + lost


class _Refused(Exception):  # noqa: N818 (what a stream did, not a program error)
    """A chunk a stream did not take whole: how many of its lines did not go out, and
    whether the stream is gone for good (`_STREAM_GONE`)."""

    def __init__(self, unwritten_lines: int, gone: bool) -> None:
        super().__init__(unwritten_lines)
        self.unwritten_lines = unwritten_lines
        self.gone = gone


def _put(stream: TextIO, chunk: str) -> None:
    """One chunk onto the stream. A stream with a descriptor (standard output) is written
    with `os.write`, which says how much went out: a line a full disk cut short is ended
    (a newline) before the next chunk, so every later line is whole JSON again; Python's
    buffer, which drops or keeps a failed write's bytes as it may, is not in the way."""
    try:
        descriptor = stream.fileno()
    except (OSError, ValueError, AttributeError):  # a test's stream: all or nothing
        try:
            stream.write(chunk)
            stream.flush()
        except OSError as error:
            raise _Refused(chunk.count("\n"), error.errno in _STREAM_GONE) from None
        return
    lines = chunk.encode(getattr(stream, "encoding", None) or "utf-8", "backslashreplace")
    ending = b"\n" if _cut.get(descriptor) else b""  # the line cut short before, ended
    data = ending + lines
    written = 0
    try:
        stream.flush()  # anything the stream itself holds goes first (nothing, here)
        while written < len(data):
            written += os.write(descriptor, data[written:])
    except OSError as error:
        if written:
            _cut[descriptor] = data[written - 1] != _NEWLINE
        unwritten = lines[max(written - len(ending), 0) :].count(b"\n")
        raise _Refused(unwritten, error.errno in _STREAM_GONE) from None
    _cut[descriptor] = False


# The errors of a stream that will never take a line again: its pipe's reader gone, its
# terminal hung up, its descriptor closed. Any other (ENOSPC, EDQUOT, EFBIG, EAGAIN) may pass.
_STREAM_GONE: Final = frozenset({errno.EPIPE, errno.EIO, errno.EBADF, errno.ENXIO})
_NEWLINE: Final = ord("\n")
# Lines a stream could not take for now, by stream, until one goes out again.
_dropped: dict[int, int] = {}
# Descriptors whose last write ended inside a line (a full disk took part of a chunk).
_cut: dict[int, bool] = {}


def _lost(stream: TextIO) -> None:
    """The log's stream can no longer be written: the operator's terminal hung up (EIO), or
    the reader of its pipe went away (EPIPE). Logging must never stop the gateway from
    answering (its drain starts with a log line, and a drain cut short leaves committed
    approvals unanswered): the stream's descriptor is pointed at /dev/null, so this and every
    later line, and the interpreter's own flush at exit, are written to nothing and succeed.
    There is nowhere left to say so; the ledger keeps the record of every request."""
    try:
        descriptor = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # no descriptor (a test's stream), or none to be had
        return
    try:
        os.dup2(null, descriptor)
    finally:
        os.close(null)
    with contextlib.suppress(OSError):
        stream.flush()  # what the failed write left in the buffer, to nothing


def _dropped_line(count: int) -> str:
    event: dict[str, Any] = {"lines": count, "event": "log_lines_dropped", "level": "warning"}
    return render_json(None, "", add_timestamp(None, "", event))


def _chunks(texts: list[str]) -> Iterator[str]:
    """The lines, each with its newline, in as few pieces as `PIPE_BUF` allows (see `Lines`)."""
    piece: list[str] = []
    size = 0
    for text in texts:
        length = (len(text) if text.isascii() else len(text.encode())) + 1
        if piece and size + length > PIPE_BUF:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(text + "\n")
        size += length
    if piece:
        yield "".join(piece)

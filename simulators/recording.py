"""The traffic log of `--record FILE` (operations.md, issue 5): one JSON object per line.

Each record is one frame as it went over the wire:

    {"time": "2026-06-06T04:00:00.123+00:00", "direction": "out", "terminal": "10000001",
     "frame": "006B6000030000..."}

`direction` is `out` for what a terminal sent and `in` for what it received; `frame` is the
whole frame in upper-case hex, its 2-byte length included, exactly as sent (a track encrypted
or in clear as it was, a corrupted MAC corrupted, half a frame when the link was cut in the
middle). The frame is the only place card data appears: no other key carries a card number,
so a log can be searched and shared by terminal and time without exposing more than the wire
did. `vipgate sim replay` reads the log back with `read_recording`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, TextIO

from cardcodec.cards import mask_card_data
from gateway.errors import BadInput
from simulators.terminal import FREE_TEXT_CARD_DIGITS

Direction = Literal["in", "out"]
DIRECTIONS: Final = ("in", "out")
KEYS: Final = ("time", "direction", "terminal", "frame")
MAX_TERMINAL_ID_CHARS: Final = 8
MAX_FRAME_BYTES: Final = 2 + 2048  # LEN plus the largest payload a peer may send (§1)
# A line of the log: the frame in hex and four short values, with room to spare.
MAX_LINE_CHARS: Final = 2 * MAX_FRAME_BYTES + 1024


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, repr=False)
class RecordedFrame:
    """One line of a traffic log."""

    time: datetime
    direction: Direction
    terminal: str
    frame: bytes

    def __repr__(self) -> str:
        return (
            f"RecordedFrame({self.time.isoformat()}, {self.direction}, {self.terminal!r}, "
            f"{len(self.frame)} bytes)"
        )

    def to_json(self) -> str:
        """The record as one JSON line (without the newline)."""
        return json.dumps(
            {
                "time": self.time.isoformat(timespec="milliseconds"),
                "direction": self.direction,
                "terminal": self.terminal,
                "frame": self.frame.hex().upper(),
            },
            separators=(", ", ": "),
        )


class Recorder:
    """Appends records to a text stream, one line each, flushed at once.

    Several terminals (threads) may share one recorder; a lock keeps their lines whole.
    """

    def __init__(
        self, stream: TextIO, clock: Callable[[], datetime] = _utc_now, name: str | None = None
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._lock = threading.Lock()
        self._name = name  # the file's, for an error that names none (a full disk's)

    def record(self, direction: Direction, terminal: str, frame: bytes) -> RecordedFrame:
        entry = RecordedFrame(self._clock(), direction, terminal, bytes(frame))
        line = entry.to_json() + "\n"
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except OSError as error:
                if self._name is None or error.filename is not None or error.errno is None:
                    raise
                raise OSError(error.errno, error.strerror, self._name) from None
        return entry


class FileRecorder(Recorder):
    """A recorder that owns the file it appends to; close it (or use `with`) when done.

    The frames carry card numbers, tracks, PIN blocks and the working keys' cryptograms: the
    file is readable by its owner only (mode 0600), one that existed with a wider mode
    included. It must be a regular file, and not a symbolic link (one planted where the log
    is to go would send the frames elsewhere), owned by this process's user: its owner can
    always change its mode back, so a file another user planted is never adopted (root's
    `fchmod` would succeed on it)."""

    def __init__(self, path: Path, clock: Callable[[], datetime] = _utc_now) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        try:
            descriptor = os.open(path, flags, 0o600)
        except OSError as error:
            reason = "a symbolic link" if error.errno == errno.ELOOP else error.strerror
            raise BadInput(f"{path}: cannot open for recording: {reason}") from None
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise BadInput(f"{path}: cannot open for recording: not a regular file")
            if status.st_uid != os.geteuid():
                raise BadInput(
                    f"{path}: cannot open for recording: owned by user {status.st_uid}, not"
                    f" by this one ({os.geteuid()})"
                )
            os.fchmod(descriptor, 0o600)
            self._file = os.fdopen(descriptor, "a", encoding="utf-8")
        except OSError as error:
            os.close(descriptor)
            raise BadInput(f"{path}: cannot open for recording: {error.strerror}") from None
        except BaseException:
            os.close(descriptor)
            raise
        super().__init__(self._file, clock, name=str(path))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FileRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _field(place: str, data: dict[str, object], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise BadInput(f"{place}: {key} must be a string")
    return value


def parse_record(line: str, place: str) -> RecordedFrame:
    """One log line; a bad one is a `BadInput` naming `place` and the key, never a frame."""
    if len(line) > MAX_LINE_CHARS:
        raise BadInput(f"{place}: longer than a recorded frame's line can be ({MAX_LINE_CHARS})")
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, RecursionError):  # nested past the parser's depth
        raise BadInput(f"{place}: not a JSON object") from None
    if not isinstance(data, dict):
        raise BadInput(f"{place}: not a JSON object")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        key = mask_card_data(unknown[0], shortest=FREE_TEXT_CARD_DIGITS)
        raise BadInput(f"{place}: unknown key {key!r}")
    try:
        time = datetime.fromisoformat(_field(place, data, "time"))
    except ValueError:
        raise BadInput(f"{place}: time is not an ISO 8601 instant") from None
    if time.tzinfo is None:
        raise BadInput(f"{place}: time has no UTC offset")
    direction = _field(place, data, "direction")
    if direction not in DIRECTIONS:
        raise BadInput(f"{place}: direction must be 'in' or 'out'")
    terminal = _field(place, data, "terminal")
    if len(terminal) > MAX_TERMINAL_ID_CHARS or not terminal.isprintable():
        raise BadInput(f"{place}: terminal must be up to 8 printable characters")
    try:
        frame = bytes.fromhex(_field(place, data, "frame"))
    except ValueError:
        raise BadInput(f"{place}: frame is not hex") from None
    if not 0 < len(frame) <= MAX_FRAME_BYTES:
        raise BadInput(f"{place}: frame must be 1 to {MAX_FRAME_BYTES} bytes")
    return RecordedFrame(time, "in" if direction == "in" else "out", terminal, frame)


def iter_recording(lines: Iterable[str], source: str) -> Iterator[RecordedFrame]:
    """The records of a log's lines, in order; blank lines are skipped."""
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield parse_record(line, f"{source}: line {number}")


def read_recording(path: Path) -> list[RecordedFrame]:
    """A whole log file; any bad line is a `BadInput` naming the file and line."""
    try:
        with path.open(encoding="utf-8") as handle:
            return list(iter_recording(handle, str(path)))
    except OSError as error:
        raise BadInput(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text") from None

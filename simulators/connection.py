"""A terminal's TCP link to the gateway: send a frame, wait for its answer, inject faults.

Blocking sockets with time-outs are enough for a terminal, which has one request in flight at
a time. Answers are cut from the byte stream with `cardcodec.frame.FrameSplitter`, so several
frames in one read and one frame a byte at a time both work. The fault hooks let a rehearsal
lose an answer, corrupt a MAC, send a request twice or cut the link in the middle of a frame;
what happens next (the reversal of §4.6) is the terminal's business, not the link's.

After a time-out, a broken stream or a cut, the link is closed: an answer arriving later must
never be taken for the answer to the next request. The caller opens a new one.
"""

from __future__ import annotations

import select
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Final, Protocol

from cardcodec.errors import CodecError
from cardcodec.frame import LENGTH_BYTES, FrameSplitter, add_length
from cardcodec.message import MAC_BYTES, has_mac
from simulators.recording import Direction, Recorder

DEFAULT_ANSWER_TIMEOUT_S: Final = 60.0  # §1: a terminal gives up on an answer after 60 s
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
READ_BYTES: Final = 4096


@dataclass(frozen=True)
class Faults:
    """What to do wrong on one exchange.

    `drop_answer`: read the answer and discard it, as if it never came. `corrupt_mac`: change
    the request's MAC before sending. `repeat`: send the request twice and read both answers.
    `disconnect`: send half the frame and close the link.
    """

    drop_answer: bool = False
    corrupt_mac: bool = False
    repeat: bool = False
    disconnect: bool = False

    def __post_init__(self) -> None:
        if self.disconnect and (self.drop_answer or self.repeat):
            raise ValueError("disconnect leaves no answer to drop or repeat")

    @property
    def names(self) -> tuple[str, ...]:
        flags = ("drop_answer", "corrupt_mac", "repeat", "disconnect")
        return tuple(name for name in flags if getattr(self, name))


NO_FAULTS: Final = Faults()


@dataclass(frozen=True)
class Exchange:
    """What went over the link for one request.

    `sent` and `answers` are whole frames (LEN included) as on the wire; `answer` is the one
    the terminal gets, None when it got none (dropped, timed out, link closed or cut).
    """

    sent: tuple[bytes, ...]
    answers: tuple[bytes, ...]
    dropped: bool = False
    disconnected: bool = False
    timed_out: bool = False
    problem: str | None = None  # why the link broke, when it did

    @property
    def answer(self) -> bytes | None:
        if self.dropped or not self.answers:
            return None
        return self.answers[0]


class Link(Protocol):
    """What a scenario needs of a link; `Connection` is the real one, tests may fake it."""

    @property
    def closed(self) -> bool: ...

    def exchange(
        self, frame: bytes, faults: Faults = NO_FAULTS, terminal: str = ""
    ) -> Exchange: ...

    def close(self) -> None: ...


class LinkClosedError(Exception):
    """The peer closed the link, or its byte stream cannot be framed."""


def corrupt_mac(frame: bytes) -> bytes:
    """The frame with the last character of its MAC changed; unchanged without a MAC."""
    if not has_mac(frame[LENGTH_BYTES:]) or len(frame) < LENGTH_BYTES + MAC_BYTES:
        return frame
    replacement = b"0" if frame[-1:] != b"0" else b"1"
    return frame[:-1] + replacement


class Connection:
    """A blocking TCP link to the gateway with an answer time-out and fault hooks."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        answer_timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S,
        recorder: Recorder | None = None,
    ) -> None:
        if not answer_timeout_s > 0:
            raise ValueError("answer time-out must be positive")
        self._sock = sock
        self._answer_timeout_s = answer_timeout_s
        self._recorder = recorder
        self._splitter = FrameSplitter()
        self._ready: deque[bytes] = deque()
        self._closed = False

    @classmethod
    def open(
        cls,
        target: tuple[str, int],
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        answer_timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S,
        recorder: Recorder | None = None,
    ) -> Connection:
        """Connect to HOST:PORT; `OSError` when the gateway cannot be reached."""
        sock = socket.create_connection(target, timeout=connect_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, answer_timeout_s=answer_timeout_s, recorder=recorder)

    @property
    def closed(self) -> bool:
        """Whether the link can carry no more requests: this end closed it, or the gateway
        did while it stood idle (a gateway stopping or restarting, its idle time-out). A
        closed link is closed here too, so the next step opens a new one rather than send
        into one it would find broken."""
        if not self._closed and not self._ready and self._closed_by_gateway():
            self.close()
        return self._closed

    def _closed_by_gateway(self) -> bool:
        """Whether the gateway's end of the link is closed (a read would find its end, or a
        reset), without waiting: the gateway sends nothing unasked, so an idle link that
        can be read has been closed."""
        poller = select.poll()  # not select(): a load's links may number past 1024
        poller.register(self._sock, select.POLLIN)
        if not poller.poll(0):
            return False
        try:
            return not self._sock.recv(1, socket.MSG_PEEK)
        except OSError:  # reset by the gateway
            return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record(self, direction: Direction, terminal: str, frame: bytes) -> None:
        if self._recorder is not None:
            self._recorder.record(direction, terminal, frame)

    def send(self, frame: bytes, terminal: str = "") -> None:
        """Send bytes as they are (a whole frame, or part of one)."""
        self._sock.sendall(frame)
        self._record("out", terminal, frame)

    def receive(self, terminal: str = "") -> bytes | None:
        """The next whole frame (LEN included), or None when none came within the time-out.

        `LinkClosedError` when the peer closed the link or sent a length the profile refuses.
        """
        deadline = time.monotonic() + self._answer_timeout_s
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(READ_BYTES)
            except TimeoutError:
                return None
            if not data:
                raise LinkClosedError("the gateway closed the link")
            try:
                self._ready.extend(add_length(p) for p in self._splitter.feed(data))
            except CodecError as error:
                raise LinkClosedError(f"answer stream cannot be framed ({error})") from None
        frame = self._ready.popleft()
        self._record("in", terminal, frame)
        return frame

    def exchange(self, frame: bytes, faults: Faults = NO_FAULTS, terminal: str = "") -> Exchange:
        """Send a request and wait for its answer, doing what `faults` asks.

        Never raises for what the peer does: a time-out, a closed link or a broken stream come
        back in the `Exchange` (and close this link). `OSError` only when this link was
        already closed.
        """
        if self._closed:
            raise OSError("the link is closed")
        wire = corrupt_mac(frame) if faults.corrupt_mac else frame
        if faults.disconnect:
            return self._cut(wire, terminal)
        copies = 2 if faults.repeat else 1
        sent: list[bytes] = []
        answers: list[bytes] = []
        try:
            for _ in range(copies):
                self.send(wire, terminal)
                sent.append(wire)
            for _ in range(copies):
                answer = self.receive(terminal)
                if answer is None:
                    self.close()
                    return Exchange(tuple(sent), tuple(answers), timed_out=True)
                answers.append(answer)
        except (OSError, LinkClosedError) as error:
            self.close()
            return Exchange(tuple(sent), tuple(answers), problem=str(error))
        return Exchange(tuple(sent), tuple(answers), dropped=faults.drop_answer)

    def _cut(self, frame: bytes, terminal: str) -> Exchange:
        """Send the length and about half of the rest, then close."""
        part = frame[: max(LENGTH_BYTES + 1, len(frame) // 2)]
        try:
            self.send(part, terminal)
        except OSError as error:
            self.close()
            return Exchange((), (), disconnected=True, problem=str(error))
        self.close()
        return Exchange((part,), (), disconnected=True)

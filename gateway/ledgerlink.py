"""The link between a front process and the ledger process (`vipgate serve --workers N` on
SQLite, gateway/workers.py).

SQLite lets one connection write at a time. Several worker processes each writing the ledger
take turns at that lock, and each turn costs more than the work it protects: a process waits
for the lock, then finds its page cache stale (another process wrote since) and reads the
pages again. So on SQLite one process owns the ledger and the others, the fronts, only
answer terminals' TCP: they frame, meter and log, and forward each frame over this link. The
ledger process decides the frames from every front in the same groups (one commit for them
all), encodes the answers and sends them back.

The link is a Unix stream socket of the instance's own, in a folder only its user can enter.
Each message on it is an `Int32StringReceiver` string holding a batch:
- front to ledger: the frames a front's reactor read in one turn, each with the front's
  sequence number for it: a count (2 bytes), then per frame its number (4 bytes), its length
  (2 bytes) and its bytes, big-endian;
- ledger to front: the answers the ledger's reactor had in one turn, as `marshal` data: a
  list of (number, answer payload or None, log event). The event is what the front logs for
  the answer (the fields `Reply.event` has: strings, numbers, booleans), never key material.

Both ends are processes of one instance, forked by one parent; what crosses is what crossed
between the threads of one process before. Each end still checks what it reads (a
`LinkError` names the fault), and both ends bound their batches.
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import structlog
from twisted.internet.defer import Deferred
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from cardcodec.frame import MAX_FRAME_LENGTH
from gateway.handler import Reply

log = structlog.get_logger("vipgate.ledgerlink")

MAX_BATCH: Final = 256  # frames (or answers) in one message at most
_COUNT = struct.Struct(">H")
_ITEM = struct.Struct(">IH")
# The longest message: a full batch of the longest frames, or of answers with their events.
MAX_MESSAGE: Final = MAX_BATCH * (_ITEM.size + MAX_FRAME_LENGTH + 1024) + _COUNT.size
MAX_SEQUENCE: Final = 2**32 - 1
# A front's exit status when its link to the ledger process closed while serving (EX_TEMPFAIL):
# the ledger process's end is the failure, counted once, not each of its fronts.
EXIT_LINK_LOST: Final = 75
_EVENT_TYPES: Final = (str, int, float, bool, type(None))


class LinkError(Exception):
    """What one end read from the other does not have the link's shape."""


class LinkLostError(Exception):
    """The link to the ledger process closed with requests still waiting for answers."""


def encode_requests(items: Sequence[tuple[int, bytes]]) -> bytes:
    """A batch of (sequence number, frame) for the ledger process."""
    if not 0 < len(items) <= MAX_BATCH:
        raise LinkError(f"a batch holds 1-{MAX_BATCH} frames, not {len(items)}")
    parts = [_COUNT.pack(len(items))]
    for number, frame in items:
        if len(frame) > MAX_FRAME_LENGTH:
            raise LinkError(f"frame {number}: {len(frame)} bytes, over {MAX_FRAME_LENGTH}")
        parts.append(_ITEM.pack(number, len(frame)))
        parts.append(frame)
    return b"".join(parts)


def decode_requests(data: bytes) -> list[tuple[int, bytes]]:
    """The (sequence number, frame) pairs of a batch `encode_requests` wrote."""
    if len(data) < _COUNT.size:
        raise LinkError(f"a request batch of {len(data)} bytes has no count")
    (count,) = _COUNT.unpack_from(data)
    if not 0 < count <= MAX_BATCH:
        raise LinkError(f"a request batch claims {count} frames, outside 1-{MAX_BATCH}")
    items: list[tuple[int, bytes]] = []
    offset = _COUNT.size
    for index in range(count):
        if len(data) < offset + _ITEM.size:
            raise LinkError(f"request batch: frame {index + 1} of {count} is cut short")
        number, length = _ITEM.unpack_from(data, offset)
        offset += _ITEM.size
        if length > MAX_FRAME_LENGTH or len(data) < offset + length:
            raise LinkError(f"request batch: frame {index + 1} of {count} is cut short")
        items.append((number, data[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise LinkError(f"request batch: {len(data) - offset} bytes after its {count} frames")
    return items


def encode_answers(items: Sequence[tuple[int, Reply]]) -> bytes:
    """A batch of (sequence number, reply) for a front."""
    if not 0 < len(items) <= MAX_BATCH:
        raise LinkError(f"a batch holds 1-{MAX_BATCH} answers, not {len(items)}")
    return marshal.dumps([(number, reply.payload, _event(reply.event)) for number, reply in items])


def decode_answers(data: bytes) -> list[tuple[int, Reply]]:
    """The (sequence number, reply) pairs of a batch `encode_answers` wrote."""
    try:
        loaded = marshal.loads(data)  # noqa: S302 (from our own ledger process; shape checked)
    except (EOFError, ValueError, TypeError) as error:
        raise LinkError(f"an answer batch is not marshal data: {error}") from None
    if not isinstance(loaded, list) or not 0 < len(loaded) <= MAX_BATCH:
        raise LinkError(f"an answer batch must be a list of 1-{MAX_BATCH} answers")
    answers: list[tuple[int, Reply]] = []
    for index, item in enumerate(loaded):
        if not (
            isinstance(item, tuple)
            and len(item) == len(("number", "payload", "event"))
            and isinstance(item[0], int)
            and isinstance(item[1], bytes | None)
            and isinstance(item[2], dict)
        ):
            raise LinkError(f"answer batch: item {index + 1} is not (number, payload, event)")
        number, payload, event = item
        answers.append((number, Reply(payload, event)))
    return answers


def _event(event: dict[str, Any]) -> dict[str, Any]:
    """The log event as marshal carries it: anything but a plain value becomes its text."""
    if all(isinstance(value, _EVENT_TYPES) for value in event.values()):
        return event
    return {
        key: value if isinstance(value, _EVENT_TYPES) else str(value)
        for key, value in event.items()
    }


class _Batching(Int32StringReceiver):
    """Collects what is to be sent during one reactor turn and sends it as one message at
    the turn's end (`callLater(0)`), in batches of at most `MAX_BATCH`; hands each message
    received, once it parses, to `_received`."""

    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._outbox: list[Any] = []
        self._scheduled = False

    def _queue(self, item: Any) -> None:
        self._outbox.append(item)
        if not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self._send)

    def _send(self) -> None:
        self._scheduled = False
        outbox, self._outbox = self._outbox, []
        if self.transport is None or not self.connected:
            return
        for start in range(0, len(outbox), MAX_BATCH):
            self.sendString(self._encode(outbox[start : start + MAX_BATCH]))  # type: ignore[no-untyped-call]

    # Each end's codec, by direction: what it sends, and what it reads.
    _encode: Callable[[list[Any]], bytes]
    _decode: Callable[[bytes], list[Any]]

    def _received(self, items: list[Any]) -> None:
        raise NotImplementedError

    def stringReceived(self, string: bytes) -> None:
        """A message from the other end: its items, or the link closed if it does not parse."""
        try:
            items = self._decode(string)
        except LinkError as error:
            log.error("link_message_refused", reason=str(error))
            cast(Any, self.transport).loseConnection()
            return
        self._received(items)

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("link_message_too_long", length=length, limit=self.MAX_LENGTH)
        cast(Any, self.transport).loseConnection()


class FrontLink(_Batching):
    """A front's end: `submit` is the `Processor` its terminals' protocol calls. When the
    link closes, every request still waiting fails (its terminal's link closes, as when a
    worker fails) and `on_lost` is told, so that the front stops."""

    def __init__(self, reactor: Any, on_lost: Callable[[], None]) -> None:
        super().__init__(reactor)
        self._on_lost = on_lost
        self._next = 0
        self._waiting: dict[int, Deferred[Reply]] = {}
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, payload: bytes) -> Deferred[Reply]:
        deferred: Deferred[Reply] = Deferred()
        if self._closed or not self.connected:
            deferred.errback(LinkLostError("the link to the ledger process is closed"))
            return deferred
        self._next = self._next + 1 if self._next < MAX_SEQUENCE else 1
        self._waiting[self._next] = deferred
        self._queue((self._next, payload))
        return deferred

    _encode = staticmethod(encode_requests)
    _decode = staticmethod(decode_answers)

    def _received(self, answers: list[Any]) -> None:
        for number, reply in answers:
            deferred = self._waiting.pop(number, None)
            if deferred is None:
                log.error("link_answer_unexpected", number=number)
                continue
            deferred.callback(reply)

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(cast(Failure, reason))
        self._closed = True
        waiting, self._waiting = self._waiting, {}
        for deferred in waiting.values():
            deferred.errback(LinkLostError("the link to the ledger process closed"))
        self._on_lost()


class LedgerEnd(_Batching):
    """The ledger process's end of one front's link: each frame goes to `submit` (the group
    worker), each answer back to the front that sent the frame."""

    def __init__(self, reactor: Any, submit: Callable[[bytes], Deferred[Reply]]) -> None:
        super().__init__(reactor)
        self._submit = submit
        self.in_flight = 0

    _encode = staticmethod(encode_answers)
    _decode = staticmethod(decode_requests)

    def _received(self, requests: list[Any]) -> None:
        for number, frame in requests:
            self.in_flight += 1
            self._submit(frame).addBoth(self._answered, number)

    def _answered(self, reply: Reply | Failure, number: int) -> None:
        self.in_flight -= 1
        if isinstance(reply, Failure):  # the worker answers every frame; a bug otherwise
            log.error("link_answer_failed", error=reply.getErrorMessage())
            reply = Reply(None, {"event": "closed", "reason": "internal error"})
        self._queue((number, reply))


__all__ = [
    "EXIT_LINK_LOST",
    "MAX_BATCH",
    "FrontLink",
    "LedgerEnd",
    "LinkError",
    "LinkLostError",
    "decode_answers",
    "decode_requests",
    "encode_answers",
    "encode_requests",
]

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
- ledger to front: the answers of one group for that front, as `marshal` data: a list of
  (number, answer payload or None, log event). The event is what the front logs for the
  answer (the fields `Reply.event` has: strings, numbers, booleans), never key material.

A front's end (`FrontLink`) is a Twisted protocol on the front's reactor. The ledger
process's end (`LedgerHub`) has no reactor: a thread of its own reads every link, and the
ledger worker's log-sync thread writes the answers, so that the interpreter the ledger thread
needs spends no turn, `Deferred` or thread hand-over on a request.

Both ends are processes of one instance, forked by one parent; what crosses is what crossed
between the threads of one process before. Each end still checks what it reads (a
`LinkError` names the fault), and both ends bound their batches.
"""

from __future__ import annotations

import contextlib
import marshal
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import structlog
from twisted.internet.defer import Deferred
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from cardcodec.frame import MAX_FRAME_LENGTH
from gateway import logs
from gateway.handler import Reply

log = structlog.get_logger("vipgate.ledgerlink")

MAX_BATCH: Final = 256  # frames (or answers) in one message at most
_COUNT = struct.Struct(">H")
_ITEM = struct.Struct(">IH")
_LENGTH = struct.Struct(">I")  # before every message, as `Int32StringReceiver` frames them
# The longest message: a full batch of the longest frames, or of answers with their events.
MAX_MESSAGE: Final = MAX_BATCH * (_ITEM.size + MAX_FRAME_LENGTH + 1024) + _COUNT.size
MAX_SEQUENCE: Final = 2**32 - 1
READ_SIZE: Final = 256 * 1024  # bytes read from a link at a time
# A front that takes no answer for this long is stuck: its link is closed (it is replaced).
SEND_TIMEOUT_S: Final = 10.0
# Answers queued for one front at most; past it the front is stuck (a few seconds of answers
# at full load is a few megabytes).
MAX_QUEUED_BYTES: Final = 64 * 1024 * 1024
WRITING_LOOK_S: Final = 0.5  # how often the hub looks for stuck links while any has a queue
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


class FrontLink(Int32StringReceiver):
    """A front's end: `submit` is the `Processor` its terminals' protocol calls. The frames
    submitted during one reactor turn go as one message at the turn's end (`callLater(0)`),
    in batches of at most `MAX_BATCH`; each answer fires the request it answers. When the
    link closes, every request still waiting fails (its terminal's link closes, as when a
    worker fails) and `on_lost` is told, so that the front stops."""

    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, reactor: Any, on_lost: Callable[[], None]) -> None:
        self._reactor = reactor
        self._on_lost = on_lost
        self._outbox: list[tuple[int, bytes]] = []
        self._scheduled = False
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
        self._outbox.append((self._next, payload))
        if not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self._send)
        return deferred

    def _send(self) -> None:
        self._scheduled = False
        outbox, self._outbox = self._outbox, []
        if self.transport is None or not self.connected:
            return
        for start in range(0, len(outbox), MAX_BATCH):
            self.sendString(encode_requests(outbox[start : start + MAX_BATCH]))  # type: ignore[no-untyped-call]

    def stringReceived(self, string: bytes) -> None:
        """A message of answers, each to the request it answers; the link closes if the
        message does not parse."""
        try:
            answers = decode_answers(string)
        except LinkError as error:
            log.error("link_message_refused", reason=str(error))
            cast(Any, self.transport).loseConnection()
            return
        with logs.together():  # the message's answers log their lines, several to a write
            for number, reply in answers:
                deferred = self._waiting.pop(number, None)
                if deferred is None:
                    log.error("link_answer_unexpected", number=number)
                    continue
                deferred.callback(reply)

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("link_message_too_long", length=length, limit=self.MAX_LENGTH)
        cast(Any, self.transport).loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(cast(Failure, reason))
        self._closed = True
        waiting, self._waiting = self._waiting, {}
        for deferred in waiting.values():
            deferred.errback(LinkLostError("the link to the ledger process closed"))
        self._on_lost()


Route = tuple["_Link", int]  # where an answer goes: the link, and the front's number for it


class _Link:
    """One front's link, as the hub holds it: what was read of a message so far, the answers
    queued for it, and the lock that keeps a send, a flush and the link's closing apart (they
    happen on different threads)."""

    def __init__(
        self, sock: socket.socket, name: str, watch: Callable[[_Link], None] = lambda _: None
    ) -> None:
        self.sock = sock
        self.name = name
        self.buffer = bytearray()
        self.lock = threading.Lock()
        self.closed = False
        self.outgoing = bytearray()  # answers the socket has not taken yet, in order
        self.progress_at = 0.0  # monotonic: when the socket last took some of `outgoing`
        self._watch = watch  # asks the hub's thread to write the rest when the socket can

    def messages(self, data: bytes) -> list[bytes]:
        """The whole messages `data` completes; a `LinkError` for one over the limit."""
        self.buffer += data
        found: list[bytes] = []
        offset = 0
        while len(self.buffer) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self.buffer, offset)
            if length > MAX_MESSAGE:
                raise LinkError(f"a message of {length} bytes, over {MAX_MESSAGE}")
            if len(self.buffer) - offset - _LENGTH.size < length:
                break
            offset += _LENGTH.size
            found.append(bytes(self.buffer[offset : offset + length]))
            offset += length
        del self.buffer[:offset]
        return found

    def send(self, message: bytes) -> None:
        """One message to the front, without waiting: what the socket takes now is written,
        the rest is queued and written by the hub's thread as the socket drains (`flush`).
        So a front slow to read delays its own answers only, never another front's: the
        log-sync thread that sends every front's answers never blocks on one.

        A link whose queue has not moved for `SEND_TIMEOUT_S` (`overdue`), or holds more than
        `MAX_QUEUED_BYTES`, is stuck: it is shut down both ways, and its front, finding it
        closed, stops and is replaced. The hub's thread then reads the end of it and drops it:
        only that thread closes a link's socket, so its descriptor is never reused while still
        registered."""
        with self.lock:
            if self.closed:
                return
            waiting = bool(self.outgoing)  # the hub's thread is writing the queue: keep order
            self.outgoing += _LENGTH.pack(len(message)) + message
            if len(self.outgoing) > MAX_QUEUED_BYTES:
                self._fail(f"over {MAX_QUEUED_BYTES} bytes of answers waiting")
                return
            if waiting:
                return
            self.progress_at = time.monotonic()
            self._write()
            if not self.outgoing or self.closed:
                return
        self._watch(self)

    def flush(self) -> bool:
        """On the hub's thread, when the socket can take more: write what is queued; whether
        the queue is empty (or the link closed) now."""
        with self.lock:
            if not self.closed:
                self._write()
            return self.closed or not self.outgoing

    def overdue(self, now: float) -> bool:
        """On the hub's thread: whether the queue has not moved for `SEND_TIMEOUT_S`; such a
        link is failed (shut down) here."""
        with self.lock:
            if self.closed or not self.outgoing or now - self.progress_at <= SEND_TIMEOUT_S:
                return False
            self._fail("timed out")
            return True

    def _write(self) -> None:
        """As much of the queue as the socket takes now (the lock held)."""
        try:
            while self.outgoing:
                sent = self.sock.send(self.outgoing)
                del self.outgoing[:sent]
                self.progress_at = time.monotonic()
        except BlockingIOError:
            pass
        except OSError as error:
            self._fail(str(error))

    def _fail(self, reason: str) -> None:
        """No more sends (the lock held); the socket stays open until the hub drops it."""
        log.error("link_send_failed", link=self.name, reason=reason)
        self.closed = True
        self.outgoing.clear()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket (the hub's thread, or the hub once its thread has ended)."""
        with self.lock:
            self.closed = True
            self.sock.close()


class LedgerHub:
    """The ledger process's end of every front's link, without a reactor. Its thread accepts
    the fronts' links on the listening socket and reads their frames, each handed to `put`
    with its route (the link, and the front's number for it); `send_answers`, called on the
    ledger worker's log-sync thread once a group's commit is on disk, writes each answer to
    its link, one message per link. A reactor would add a turn, a `Deferred` and a thread
    hand-over to every request in the process whose interpreter the ledger thread needs.

    A link that sends what does not parse, or that closes, is closed alone: answers still due
    to it are dropped (its front has stopped), the other links go on."""

    def __init__(
        self,
        listening: socket.socket,
        put: Callable[[bytes, Route], None],
        on_failed: Callable[[], None] = lambda: None,
    ) -> None:
        self._listening = listening
        self._put = put
        self._on_failed = on_failed
        self._links: set[_Link] = set()
        self._accepted = 0
        self._stopping = False
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._to_watch: queue.SimpleQueue[_Link] = queue.SimpleQueue()  # links with a queue
        self._writing: set[_Link] = set()  # links registered for writing too
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._loop, name="ledger-links", daemon=True)
        self.failed: BaseException | None = None

    @property
    def links(self) -> int:
        return len(self._links)

    def start(self) -> None:
        self._selector.register(self._listening, selectors.EVENT_READ, None)
        self._selector.register(self._wake_read, selectors.EVENT_READ, self._wake_read)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and reading, and close every link: nothing more is `put`."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")
        if self._thread.ident is not None:
            self._thread.join()
        for link in list(self._links):
            link.close()
        self._links.clear()
        self._selector.close()
        self._listening.close()
        self._wake_read.close()
        self._wake_write.close()

    def send_answers(self, routes: Sequence[Route], replies: Sequence[Reply]) -> None:
        """Each reply to the link its request came on, in batches of at most `MAX_BATCH`."""
        by_link: dict[_Link, list[tuple[int, Reply]]] = {}
        for (link, number), reply in zip(routes, replies, strict=True):
            by_link.setdefault(link, []).append((number, reply))
        for link, items in by_link.items():
            for start in range(0, len(items), MAX_BATCH):
                link.send(encode_answers(items[start : start + MAX_BATCH]))

    def _watch(self, link: _Link) -> None:
        """From the log-sync thread: `link` has answers queued; the hub's thread writes them."""
        self._to_watch.put(link)
        with contextlib.suppress(OSError):  # a full wake socket: a wake is pending anyway
            self._wake_write.send(b"w")

    def _loop(self) -> None:
        try:
            while not self._stopping:
                timeout = WRITING_LOOK_S if self._writing else None
                for key, events in self._selector.select(timeout):
                    if key.data is None:
                        self._accept()
                    elif key.data is self._wake_read:
                        self._woken()
                    else:
                        self._ready(key.data, events)
                self._fail_overdue()
        except Exception as error:  # a bug: the process must not go on deaf to its fronts
            log.exception("ledger_links_failed")
            self.failed = error
            self._on_failed()

    def _woken(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_read.recv(4096):
                pass
        while not self._to_watch.empty():
            link = self._to_watch.get()
            if link in self._links and link not in self._writing:
                self._writing.add(link)
                self._selector.modify(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)

    def _ready(self, link: _Link, events: int) -> None:
        if events & selectors.EVENT_READ:
            self._read(link)
        if events & selectors.EVENT_WRITE and link in self._writing and link.flush():
            self._not_writing(link)

    def _not_writing(self, link: _Link) -> None:
        self._writing.discard(link)
        if link in self._links:
            self._selector.modify(link.sock, selectors.EVENT_READ, link)

    def _fail_overdue(self) -> None:
        """Links whose answers have not moved for `SEND_TIMEOUT_S` are shut down (their fronts
        are stuck); each is dropped when the hub reads the end of it."""
        if not self._writing:
            return
        now = time.monotonic()
        for link in list(self._writing):
            if link.overdue(now):
                self._not_writing(link)

    def _accept(self) -> None:
        try:
            sock, _ = self._listening.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)  # reads when readable; sends queue what the socket leaves
        self._accepted += 1
        link = _Link(sock, f"front-link-{self._accepted}", self._watch)
        self._links.add(link)
        self._selector.register(sock, selectors.EVENT_READ, link)

    def _read(self, link: _Link) -> None:
        if link not in self._links:
            return
        try:
            data = link.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as error:
            log.error("link_read_failed", link=link.name, reason=str(error))
            data = b""
        if not data:  # closed by the front, or unreadable
            self._drop(link)
            return
        try:
            batches = [decode_requests(message) for message in link.messages(data)]
        except LinkError as error:
            log.error("link_message_refused", link=link.name, reason=str(error))
            self._drop(link)
            return
        for batch in batches:
            for number, frame in batch:
                self._put(frame, (link, number))

    def _drop(self, link: _Link) -> None:
        self._selector.unregister(link.sock)
        self._links.discard(link)
        self._writing.discard(link)
        link.close()


__all__ = [
    "EXIT_LINK_LOST",
    "MAX_BATCH",
    "FrontLink",
    "LedgerHub",
    "LinkError",
    "LinkLostError",
    "Route",
    "decode_answers",
    "decode_requests",
    "encode_answers",
    "encode_requests",
]

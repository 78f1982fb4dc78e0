"""The Twisted shell: frames in, frames out, nothing else (pos-8583.md §1).

`TerminalProtocol` is an `Int16StringReceiver` with the profile's 2048-byte limit. Each frame
is handed to a `Processor` (a callable returning a Deferred of the answer); answers go back in
the order the requests arrived, whatever order they finish in. A connection idle for too long
or with too many requests awaiting an answer is closed; a frame that cannot be answered closes
it too. Nothing a connection sends can stop the gateway or touch another connection.

Two more bounds stand against hostile peers (docs/reliability.md, Hostile input): at most
`max_connections_per_address` open connections from one address (one more is closed at once),
and at most `max_frames_per_second_per_terminal` frames per terminal and address, and per
connection, token buckets on the injected reactor's clock. The protocol reads no field
itself: a connection's frames count against its own bucket, and against the terminal its last
answer named (field 41) once one has; a frame over either rate closes the connection
unprocessed. The address is part of the terminal's key so that a stranger who writes an
honest terminal's id into field 41 spends his own bucket, not the terminal's. Links not
named yet share their address's bucket, at `max_unnamed_frames_per_second_per_address`
(raised behind a load balancer, whose one address carries every terminal's new links).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import structlog
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int16StringReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from cardcodec.frame import MAX_FRAME_LENGTH
from gateway.handler import Reply

if TYPE_CHECKING:  # prometheus_client is imported only when metrics are on
    from gateway.metrics import CloseCause, Metrics

log = structlog.get_logger("vipgate.protocol")

Processor = Callable[[bytes], "Deferred[Reply]"]
# Where traffic goes when `vipgate serve --record` is on: (direction, terminal, frame), the
# direction seen from the terminal ("out" what it sent, "in" what it received).
TrafficRecorder = Callable[[Literal["in", "out"], str, bytes], object]
# Time on the reactor's clock, in seconds (Twisted's `seconds()` is fractional), and a frame
# allowance that refills continuously: neither is ever money or points.
Seconds = float
Allowance = float


@dataclass
class _Slot:
    """One request awaiting its answer, in arrival order."""

    started: Seconds
    request: bytes = b""
    received: Seconds = 0.0  # on the reactor's clock, for the latency metric
    reply: Reply | None = None
    done: bool = False


class TokenBucket:
    """`rate` tokens a second, at most `rate` kept (a burst of one second's worth)."""

    def __init__(self, rate: int, now: Seconds) -> None:
        self.rate = rate
        self.tokens: Allowance = rate
        self.updated = now

    def refill(self, now: Seconds) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.rate, self.tokens + elapsed * self.rate)
        self.updated = now

    def take(self, now: Seconds) -> bool:
        """Spend one token if there is one."""
        self.refill(now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def full(self, now: Seconds) -> bool:
        self.refill(now)
        return self.tokens >= self.rate


# Recordings that failed (`--record` on a full disk, say); said once, then every so many.
_record_failures: list[int] = [0]
RECORD_FAILURES_SAID_EVERY = 1000


def _record_failed(error: OSError) -> None:
    """The traffic log could not take a frame: said on the log (the first time and every
    `RECORD_FAILURES_SAID_EVERY` after), never in the answer's way. An answer held back by
    its recording left an approval committed and unanswered."""
    _record_failures[0] += 1
    count = _record_failures[0]
    if count == 1 or count % RECORD_FAILURES_SAID_EVERY == 0:
        log.error("record_failed", file=error.filename, error=error.strerror, failures=count)


class TerminalProtocol(Int16StringReceiver, TimeoutMixin):
    """One terminal connection."""

    MAX_LENGTH = MAX_FRAME_LENGTH

    def __init__(self, factory: TerminalFactory) -> None:
        self._factory = factory
        self._slots: deque[_Slot] = deque()
        self._closing = False
        self._stopping = False  # the gateway is stopping: no new frames, close once answered
        self._told_stopping = False  # `frame_after_stop` logged for this link
        self._budget: int | None = None  # frames still taken while the gateway drains
        self._closed: list[Deferred[None]] = []  # fired by connectionLost
        self._address = "?"
        self._counted = False  # in the per-address count (refused connections are not)
        self._terminal: str | None = None  # the terminal the last answer named
        self._own_rate: TokenBucket | None = None  # this connection's frames, whatever named
        # A bound the peer broke (`_refuse_from_now`): no frame is taken any more, and the link
        # closes for this cause once the answers it owes are written.
        self._refusing: CloseCause | None = None

    def connectionMade(self) -> None:
        # TimeoutMixin schedules through `callLater`: the injected reactor's, for fake clocks.
        self.callLater = self._factory.reactor.callLater  # type: ignore[method-assign,assignment]
        self._factory.connections += 1
        self._factory.open.add(self)
        self._address = self._peer()
        if not self._factory.admit(self._address):
            log.info("too_many_connections_closed", peer=self._address)
            self._close("too_many_connections")
            return
        self._counted = True
        now: Seconds = cast(Any, self._factory.reactor).seconds()
        self._own_rate = TokenBucket(self._factory.max_frames_per_second, now)
        if self._factory.metrics is not None:
            self._factory.metrics.connection_opened()
        self.setTimeout(self._factory.idle_timeout_s)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        self._closing = True  # answers still owed can no longer be written
        self._factory.open.discard(self)
        self._factory.connections -= 1
        closed, self._closed = self._closed, []
        for deferred in closed:
            deferred.callback(None)
        if self._counted:
            self._counted = False
            self._factory.release(self._address)
            if self._factory.metrics is not None:
                self._factory.metrics.connection_closed()

    def timeoutConnection(self) -> None:
        if self._closing:  # closed meanwhile, and the peer has not read what it was sent
            self.abort()
            return
        log.info("connection_idle_closed", peer=self._peer(), terminal=self._terminal)
        self._close("idle")

    def lengthLimitExceeded(self, length: int) -> None:
        log.info("frame_too_long_closed", peer=self._peer(), length=length)
        self._close("frame_too_long")

    def drain_from_now(self) -> None:
        """For a stopping gateway, at once: the link takes at most what fills its pending
        bound once more (`max_pending` less the requests it has in flight), then no frame.
        A terminal's requests sent before the signal but not yet read are taken (they are in
        flight for the terminal), and the drain still ends while a terminal keeps sending.
        A frame beyond that is read and not taken (logged once a link, `frame_after_stop`):
        it changes nothing, and its terminal sends it again or reverses it after the restart
        (§7). Reading goes on, so the link closes with its answers delivered rather than reset
        over unread bytes."""
        self._budget = max(self._factory.max_pending - len(self._slots), 0)

    def close_when_answered(self) -> Deferred[None]:
        """For a stopping gateway: take no more frames, and once every answer this link owes
        is written, close it; a Twisted `loseConnection` writes what is buffered first, where
        the reactor's shutdown would drop it. Fires when the link is closed."""
        closed: Deferred[None] = Deferred()
        if self.transport is None or self not in self._factory.open:
            closed.callback(None)
            return closed
        self._closed.append(closed)
        self._stopping = True
        if not self._slots:
            self._close("stopping")
        return closed

    def abort(self) -> None:
        """Cut the link now (a stopping gateway's last resort, for a peer that never reads)."""
        if self.transport is not None:
            cast(Any, self.transport).abortConnection()

    def stringReceived(self, string: bytes) -> None:
        if self._closing or self._refusing is not None:
            return
        if self._stopping or self._budget == 0:
            if not self._told_stopping:  # once a link: a busy terminal may send thousands
                self._told_stopping = True
                log.info("frame_after_stop", peer=self._peer(), terminal=self._terminal)
            return
        if self._budget is not None:
            self._budget -= 1
        if not string:  # §1: a LEN of 0 closes the link, before any frame behind it is taken
            log.info("frame_empty_closed", peer=self._peer())
            self._refuse_from_now("frame_empty")
            return
        if not self._within_rate():
            log.info("frame_rate_closed", peer=self._address, terminal=self._terminal)
            self._refuse_from_now("frame_rate")
            return
        self.resetTimeout()  # type: ignore[no-untyped-call]
        if len(self._slots) >= self._factory.max_pending:
            log.info("too_many_pending_closed", peer=self._peer(), terminal=self._terminal)
            self._refuse_from_now("too_many_pending")
            return
        slot = _Slot(time.perf_counter(), string if self._factory.record else b"")
        if self._factory.metrics is not None:
            slot.received = cast(Any, self._factory.reactor).seconds()
        self._slots.append(slot)
        deferred = self._factory.process(string)
        deferred.addCallback(self._answered, slot)
        deferred.addErrback(self._failed, slot)

    def _refuse_from_now(self, cause: CloseCause) -> None:
        """A bound the peer broke: this frame and every later one are not taken, and the
        link closes once the answers it owes are written. A request already taken may have
        been approved and committed: its answer is the terminal's, where closing at once would
        leave it a redemption to reverse."""
        self._refusing = cause
        if not self._slots:
            self._close(cause)

    def _within_rate(self) -> bool:
        """One frame of this connection's rate, then of its terminal's (`take_frame`): field
        41 is the sender's to write, so naming a new terminal in every frame, each with a full
        bucket of its own, must not lift the connection's rate."""
        now: Seconds = cast(Any, self._factory.reactor).seconds()
        if self._own_rate is not None and not self._own_rate.take(now):
            return False
        return self._factory.take_frame(self._terminal, self._address)

    def _answered(self, reply: Reply, slot: _Slot) -> None:
        terminal = reply.event.get("terminal")
        if isinstance(terminal, str) and terminal:
            self._terminal = terminal
        slot.reply = reply
        slot.done = True
        self._flush()

    def _failed(self, failure: Failure, slot: _Slot) -> None:
        log.error("processing_failed", error=failure.getErrorMessage())
        slot.reply = Reply(None, {"event": "closed", "reason": "processing failed"})
        slot.done = True
        self._flush()

    def _flush(self) -> None:
        while self._slots and self._slots[0].done:
            slot = self._slots.popleft()
            reply = slot.reply
            assert reply is not None  # done slots carry their reply
            latency_ms = round((time.perf_counter() - slot.started) * 1000, 3)
            written = not self._closing and reply.payload is not None
            event: dict[str, Any] = {"event": "answered", **reply.event, "latency_ms": latency_ms}
            if reply.payload is not None and not written:
                event["event"] = "not_sent"  # decided, but the link had closed
            elif reply.payload is None:  # the link closes instead: say whose it was
                event.setdefault("peer", self._peer())
                if not event.get("terminal"):
                    event["terminal"] = self._terminal
            log.info(**event)
            self._record(slot, reply, written)
            if written:
                self.sendString(reply.payload)  # type: ignore[no-untyped-call]
            self._measure(slot, event, written)
            if not self._closing and reply.payload is None:
                self._close("request")
        if not self._slots and not self._closing:
            if self._refusing is not None:
                self._close(self._refusing)
            elif self._stopping:
                self._close("stopping")

    def _measure(self, slot: _Slot, event: dict[str, Any], written: bool) -> None:
        """The outcome as logged: an answer decided after its link closed (`not_sent`) never
        reached the terminal, so it counts as `closed`, not as its field 39."""
        metrics = self._factory.metrics
        if metrics is not None:
            now: Seconds = cast(Any, self._factory.reactor).seconds()
            metrics.answered(event, now - slot.received if written else None)

    def _record(self, slot: _Slot, reply: Reply, written: bool) -> None:
        """The request as the terminal sent it, then its answer as the terminal received
        it: only an answer written to the link (one decided after the link closed never
        reached the terminal, which reverses that request)."""
        record = self._factory.record
        if record is None:
            return
        terminal = str(reply.event.get("terminal") or "")
        try:
            record("out", terminal, len(slot.request).to_bytes(2, "big") + slot.request)
            if written and reply.payload is not None:
                record("in", terminal, len(reply.payload).to_bytes(2, "big") + reply.payload)
        except OSError as error:  # a full disk under the recording: the answer goes all the same
            _record_failed(error)

    def _close(self, cause: CloseCause) -> None:
        if self._factory.metrics is not None and not self._closing:
            self._factory.metrics.link_closed(cause)
        self._closing = True
        if self.transport is not None:
            cast(Any, self.transport).loseConnection()

    def _peer(self) -> str:
        peer = cast(Any, self.transport).getPeer() if self.transport is not None else None
        return str(getattr(peer, "host", "?"))


# Buckets kept before the idle ones are dropped: bounds the memory a stream of new terminal
# ids or addresses can take (a dropped bucket was full, so dropping it forgives nothing).
MAX_BUCKETS = 10_000


class TerminalFactory(Factory):
    """Builds a protocol per connection, counts them per address and meters frames."""

    def __init__(
        self,
        process: Processor,
        reactor: IReactorTime,
        *,
        idle_timeout_s: Seconds,
        max_pending: int,
        record: TrafficRecorder | None = None,
        max_connections_per_address: int = 64,
        max_frames_per_second: int = 50,
        max_unnamed_frames_per_second: int = 50,
        metrics: Metrics | None = None,
    ) -> None:
        self.process = process
        self.metrics = metrics  # None: metrics off
        self.record = record
        self.reactor = reactor
        self.idle_timeout_s = idle_timeout_s
        self.max_pending = max_pending
        self.max_connections_per_address = max_connections_per_address
        self.max_frames_per_second = max_frames_per_second
        self.max_unnamed_frames_per_second = max_unnamed_frames_per_second
        self.connections = 0
        self.open: set[TerminalProtocol] = set()  # the links, for a stopping gateway to close
        self.per_address: dict[str, int] = {}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def buildProtocol(self, addr: Any) -> TerminalProtocol:
        return TerminalProtocol(self)

    def admit(self, address: str) -> bool:
        """Count a new connection from `address`, unless that address has its fill already."""
        count = self.per_address.get(address, 0)
        if count >= self.max_connections_per_address:
            return False
        self.per_address[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self.per_address.get(address, 0) - 1
        if count > 0:
            self.per_address[address] = count
        else:
            self.per_address.pop(address, None)

    def take_frame(self, terminal: str | None, address: str) -> bool:
        """Spend one frame of the terminal's rate, or, for a link no answer has named yet, of
        its address's unnamed links together (`max_unnamed_frames_per_second`): a peer that
        opens a link, writes and closes it, over and over, is held to that, where a bucket of
        each link's own would let it through. §1 lets a terminal open a link for every
        transaction, and behind a load balancer every terminal's new links come from its one
        address: that deployment raises the bound (docs/deployment.md)."""
        now: Seconds = cast(Any, self.reactor).seconds()
        key = (terminal or "", address)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._drop_full_buckets(now)
            rate = self.max_frames_per_second if terminal else self.max_unnamed_frames_per_second
            bucket = self._buckets[key] = TokenBucket(rate, now)
        return bucket.take(now)

    def _drop_full_buckets(self, now: Seconds) -> None:
        for key in [key for key, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[key]

    @property
    def buckets(self) -> int:
        return len(self._buckets)

"""The Twisted shell on fakes: framing, answer order, bounds and time-outs (pos-8583.md §1)."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.handler import Reply
from gateway.protocol import TerminalFactory, TerminalProtocol


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload


class Pending:
    """A processor whose answers the test releases by hand, in any order."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, Deferred[Reply]]] = []

    def __call__(self, payload: bytes) -> Deferred[Reply]:
        deferred: Deferred[Reply] = Deferred()
        self.calls.append((payload, deferred))
        return deferred

    def answer(self, index: int, payload: bytes | None = None) -> None:
        request, deferred = self.calls[index]
        deferred.callback(Reply(b"re:" + request if payload is None else payload))


def connect(
    process: object, *, idle: float = 300, max_pending: int = 32
) -> tuple[TerminalProtocol, StringTransport, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    factory = TerminalFactory(process, reactor, idle_timeout_s=idle, max_pending=max_pending)  # type: ignore[arg-type]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, reactor


def echo(payload: bytes) -> Deferred[Reply]:
    return succeed(Reply(b"re:" + payload))


def test_frames_arriving_one_byte_at_a_time_are_answered() -> None:
    """A frame fed byte by byte reaches the processor whole, once."""
    protocol, transport, _ = connect(echo)
    for byte in frame(b"hello"):
        protocol.dataReceived(bytes([byte]))
    assert transport.value() == frame(b"re:hello")


def test_glued_frames_are_answered_in_order() -> None:
    """Several frames in one read are answered one after the other."""
    protocol, transport, _ = connect(echo)
    protocol.dataReceived(frame(b"a") + frame(b"bb") + frame(b"ccc"))
    assert transport.value() == frame(b"re:a") + frame(b"re:bb") + frame(b"re:ccc")


def test_answers_go_back_in_arrival_order_whatever_finishes_first() -> None:
    """A later request that finishes first waits for the earlier one's answer."""
    pending = Pending()
    protocol, transport, _ = connect(pending)
    protocol.dataReceived(frame(b"first") + frame(b"second"))
    pending.answer(1)
    assert transport.value() == b""
    pending.answer(0)
    assert transport.value() == frame(b"re:first") + frame(b"re:second")


def test_frame_over_2048_bytes_closes_the_connection() -> None:
    """A LEN above the limit is not read: the link closes."""
    protocol, transport, _ = connect(echo)
    protocol.dataReceived((2049).to_bytes(2, "big") + b"\x60")
    assert transport.disconnecting


def test_unanswerable_request_closes_the_connection() -> None:
    """A reply without a payload (nothing could be read to answer) closes the link."""
    protocol, transport, _ = connect(lambda payload: succeed(Reply(None)))
    protocol.dataReceived(frame(b"x"))
    assert transport.disconnecting
    assert transport.value() == b""


def test_idle_connection_closes_after_the_timeout() -> None:
    """No frame for the idle time-out closes the link; a frame restarts the count."""
    protocol, transport, reactor = connect(echo, idle=300)
    reactor.advance(299)
    protocol.dataReceived(frame(b"x"))
    reactor.advance(299)
    assert not transport.disconnecting
    reactor.advance(2)
    assert transport.disconnecting


def test_too_many_pending_requests_close_the_connection() -> None:
    """More requests awaiting an answer than the bound closes the link."""
    pending = Pending()
    protocol, transport, _ = connect(pending, max_pending=2)
    protocol.dataReceived(frame(b"1") + frame(b"2"))
    assert not transport.disconnecting
    protocol.dataReceived(frame(b"3"))
    assert transport.disconnecting
    assert len(pending.calls) == 2


def test_processing_failure_closes_only_that_connection() -> None:
    """An unexpected error in processing closes the link rather than answering wrongly."""

    def broken(payload: bytes) -> Deferred[Reply]:
        deferred: Deferred[Reply] = Deferred()
        deferred.errback(RuntimeError("boom"))
        return deferred

    protocol, transport, _ = connect(broken)
    protocol.dataReceived(frame(b"x"))
    assert transport.disconnecting
    other, other_transport, _ = connect(echo)
    other.dataReceived(frame(b"y"))
    assert other_transport.value() == frame(b"re:y")


@pytest.mark.parametrize("count", [1, 5])
def test_connection_count_follows_connections(count: int) -> None:
    """The factory counts connected terminals (for metrics and draining)."""
    reactor = MemoryReactorClock()
    factory = TerminalFactory(echo, reactor, idle_timeout_s=300, max_pending=32)
    protocols = [factory.buildProtocol(None) for _ in range(count)]
    for protocol in protocols:
        protocol.makeConnection(StringTransport())
    assert factory.connections == count
    protocols[0].connectionLost(None)
    assert factory.connections == count - 1


def test_recording_keeps_each_request_and_answer_in_order() -> None:
    """With a recorder, every frame in and out is kept whole, request before answer."""
    records: list[tuple[str, str, bytes]] = []
    reactor = MemoryReactorClock()
    factory = TerminalFactory(
        lambda payload: succeed(Reply(b"re:" + payload, {"terminal": "10000001"})),
        reactor,
        idle_timeout_s=300,
        max_pending=32,
        record=lambda direction, terminal, data: records.append((direction, terminal, data)),
    )
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(frame(b"a") + frame(b"b"))
    assert records == [
        ("out", "10000001", frame(b"a")),
        ("in", "10000001", frame(b"re:a")),
        ("out", "10000001", frame(b"b")),
        ("in", "10000001", frame(b"re:b")),
    ]

"""The Twisted shell on fakes: framing, answer order, bounds and time-outs (pos-8583.md §1)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest
from structlog.testing import capture_logs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.config import Config
from gateway.handler import Gateway, Reply
from gateway.protocol import MAX_BUCKETS, TerminalFactory, TerminalProtocol
from gateway.server import GatewayServer


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


def test_a_stopping_gateway_closes_each_link_once_its_answers_are_written() -> None:
    """`close_when_answered`: frames after it are not taken; the answers owed are written,
    then the link closes (gracefully: what is buffered is written first)."""
    pending = Pending()
    protocol, transport, _ = connect(pending)
    protocol.dataReceived(frame(b"first") + frame(b"second"))
    closed = protocol.close_when_answered()
    protocol.dataReceived(frame(b"late"))
    assert len(pending.calls) == 2 and not transport.disconnecting
    pending.answer(0)
    assert not transport.disconnecting
    pending.answer(1)
    assert transport.value() == frame(b"re:first") + frame(b"re:second")
    assert transport.disconnecting and not closed.called
    protocol.connectionLost(None)
    assert closed.called


class HeldWorker:
    """A server's worker whose answers the test releases (`Pending`)."""

    def __init__(self) -> None:
        self.pending = Pending()
        self.stopped = False

    def start(self) -> None:
        pass

    def submit(self, payload: bytes) -> Deferred[Reply]:
        return self.pending(payload)

    def stop(self) -> None:
        self.stopped = True


def test_a_stopping_server_drains_while_a_terminal_keeps_sending() -> None:
    """SIGTERM with two requests in flight on a link whose pending bound is four: the link
    takes two more (sent before the signal, for all the gateway knows), then no frame (logged
    once), so the drain ends when those four are answered, and the worker stops; it does not
    wait for a moment with nothing in flight."""
    limits = SimpleNamespace(
        idle_timeout_s=300,
        max_pending_per_connection=4,
        max_connections_per_address=64,
        max_frames_per_second_per_terminal=1000,
        max_unnamed_frames_per_second=1000,
    )
    worker = HeldWorker()
    reactor = MemoryReactorClock()
    server = GatewayServer(
        cast(Gateway, SimpleNamespace()),
        reactor,
        cast(Config, SimpleNamespace(gateway=limits)),
        worker=worker,
    )
    protocol = server.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(frame(b"1") + frame(b"2"))
    stopped = server.stop()
    with capture_logs() as logged:
        for late in (b"3", b"4", b"5", b"6"):
            protocol.dataReceived(frame(late))
    assert [line["event"] for line in logged] == ["frame_after_stop"]
    assert [payload for payload, _ in worker.pending.calls] == [b"1", b"2", b"3", b"4"]
    for index in range(4):
        worker.pending.answer(index)
    reactor.advance(0)  # the links close on the next turn, once their answers are handed over
    assert transport.value() == b"".join(frame(b"re:" + n) for n in (b"1", b"2", b"3", b"4"))
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert worker.stopped and stopped.called


def test_an_answer_for_a_link_already_lost_is_logged_not_sent() -> None:
    """A terminal that closed its link before the answer: the answer is not written, and its
    log line says `not_sent`, not `answered`."""
    pending = Pending()
    protocol, transport, _ = connect(pending)
    protocol.dataReceived(frame(b"first"))
    protocol.connectionLost(None)
    with capture_logs() as logged:
        pending.answer(0)
    assert transport.value() == b""
    assert [line["event"] for line in logged] == ["not_sent"]


def test_a_len_of_0_closes_the_connection_before_the_frames_behind_it() -> None:
    """§1: LEN 0 closes the link; a request glued behind it in the same read is not taken
    (it would be decided, its points taken, with no link left to answer it on)."""
    pending = Pending()
    protocol, transport, _ = connect(pending)
    protocol.dataReceived(b"\x00\x00" + frame(b"redemption"))
    assert transport.disconnecting
    assert pending.calls == []


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
    """More requests awaiting an answer than the bound closes the link, once the answers
    of the requests it took are written: each may be an approval already committed."""
    pending = Pending()
    protocol, transport, _ = connect(pending, max_pending=2)
    protocol.dataReceived(frame(b"1") + frame(b"2"))
    assert not transport.disconnecting
    protocol.dataReceived(frame(b"3") + frame(b"4"))
    assert len(pending.calls) == 2
    pending.answer(0)
    assert not transport.disconnecting
    pending.answer(1)
    assert transport.disconnecting
    assert transport.value() == frame(b"re:1") + frame(b"re:2")


def test_a_link_closed_for_a_bound_that_never_reads_is_cut_at_the_idle_time() -> None:
    """The answers owed are written, then the link closes; a peer that never reads them
    keeps the socket only until the idle time-out, which then cuts it."""
    pending = Pending()
    protocol, transport, reactor = connect(pending, max_pending=1, idle=300)
    protocol.dataReceived(frame(b"1") + frame(b"2"))
    pending.answer(0)
    assert transport.disconnecting
    protocol.abort = lambda: setattr(transport, "aborted", True)  # type: ignore[method-assign]
    reactor.advance(301)
    assert getattr(transport, "aborted", False)


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


def test_a_recording_the_disk_refuses_costs_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --record` on a full disk: every answer is written all the same, and the log
    says the recording failed (once, not for every frame). An answer held back by its
    recording left a committed approval unanswered."""

    def full(_direction: str, _terminal: str, _data: bytes) -> None:
        raise OSError(28, "No space left on device", "/var/rec.jsonl")

    monkeypatch.setattr("gateway.protocol._record_failures", [0])

    factory = TerminalFactory(
        lambda payload: succeed(Reply(b"re:" + payload, {"terminal": "10000001"})),
        MemoryReactorClock(),
        idle_timeout_s=300,
        max_pending=32,
        record=full,
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    with capture_logs() as logs:
        protocol.dataReceived(frame(b"a") + frame(b"b"))
    assert transport.value() == frame(b"re:a") + frame(b"re:b")
    failed = [line for line in logs if line["event"] == "record_failed"]
    assert [(line["file"], line["error"], line["failures"]) for line in failed] == [
        ("/var/rec.jsonl", "No space left on device", 1)
    ]


def test_an_answer_that_never_left_is_not_recorded_as_received() -> None:
    """The link closed before the answer was decided: the request is recorded, its answer
    not, since the terminal never received it (it reverses that request)."""
    records: list[tuple[str, str, bytes]] = []
    pending = Pending()
    factory = TerminalFactory(
        pending,
        MemoryReactorClock(),
        idle_timeout_s=300,
        max_pending=32,
        record=lambda direction, terminal, data: records.append((direction, terminal, data)),
    )
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(frame(b"a"))
    protocol.connectionLost(None)
    pending.answer(0)
    assert [direction for direction, _, _ in records] == ["out"]


def hostile_factory(
    process: object = None, *, per_address: int = 64, rate: float = 50
) -> tuple[TerminalFactory, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    factory = TerminalFactory(
        process or echo,  # type: ignore[arg-type]
        reactor,
        idle_timeout_s=300,
        max_pending=32,
        max_connections_per_address=per_address,
        max_frames_per_second=rate,
    )
    return factory, reactor


def open_from(
    factory: TerminalFactory, host: str, port: int = 40000
) -> tuple[TerminalProtocol, StringTransport]:
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    return protocol, transport


def named(terminal: str) -> object:
    """A processor whose answers name `terminal`, as the handler's do from field 41."""
    return lambda payload: succeed(Reply(b"re:" + payload, {"terminal": terminal}))


def test_connection_over_the_per_address_bound_is_closed_at_once() -> None:
    """The connection after the bound from one address closes unread; other addresses pass."""
    factory, _ = hostile_factory(per_address=2)
    kept = [open_from(factory, "10.0.0.1", port) for port in (1, 2)]
    refused, refused_transport = open_from(factory, "10.0.0.1", 3)
    assert refused_transport.disconnecting
    assert not any(transport.disconnecting for _, transport in kept)
    refused.dataReceived(frame(b"x"))
    assert refused_transport.value() == b""
    _, other = open_from(factory, "10.0.0.2")
    assert not other.disconnecting


def test_a_closed_connection_frees_its_place_for_its_address() -> None:
    """Per-address counting follows connections lost, refused ones included."""
    factory, _ = hostile_factory(per_address=1)
    first, _ = open_from(factory, "10.0.0.1", 1)
    refused, _ = open_from(factory, "10.0.0.1", 2)
    refused.connectionLost(None)
    assert factory.per_address == {"10.0.0.1": 1}
    first.connectionLost(None)
    assert factory.per_address == {}
    assert factory.connections == 0
    _, again = open_from(factory, "10.0.0.1", 3)
    assert not again.disconnecting


def test_frames_over_the_rate_close_the_connection_unprocessed() -> None:
    """The frame beyond the terminal's bucket is not processed, nor any after it, and the
    link closes once the answers of the frames it took are written (approvals, maybe)."""
    pending = Pending()
    factory, reactor = hostile_factory(pending, rate=3)
    protocol, transport = open_from(factory, "10.0.0.1")
    protocol.dataReceived(frame(b"1") + frame(b"2") + frame(b"3"))
    assert not transport.disconnecting
    protocol.dataReceived(frame(b"4"))
    reactor.advance(5)  # the bucket refills: a refused link takes nothing all the same
    protocol.dataReceived(frame(b"5"))
    assert [payload for payload, _ in pending.calls] == [b"1", b"2", b"3"]
    for index in range(3):
        assert not transport.disconnecting
        pending.answer(index)
    assert transport.disconnecting
    assert transport.value() == frame(b"re:1") + frame(b"re:2") + frame(b"re:3")


def test_naming_a_new_terminal_in_every_frame_does_not_lift_the_rate() -> None:
    """Field 41 is the sender's to write: answers naming a new terminal each time (a full
    bucket each) still leave the connection its own rate, and it is closed past it."""
    names = iter(f"Z{number:07d}" for number in range(100))
    factory, _ = hostile_factory(
        lambda payload: succeed(Reply(b"re:" + payload, {"terminal": next(names)})), rate=3
    )
    protocol, transport = open_from(factory, "10.0.0.1")
    for _ in range(3):
        protocol.dataReceived(frame(b"x"))
    assert not transport.disconnecting
    protocol.dataReceived(frame(b"x"))
    assert transport.disconnecting
    assert transport.value() == frame(b"re:x") * 3


def test_the_rate_refills_on_the_reactor_clock() -> None:
    """At the bound rate, frame after frame, a terminal is never cut off."""
    factory, reactor = hostile_factory(named("10000001"), rate=5)
    protocol, transport = open_from(factory, "10.0.0.1")
    for _ in range(50):
        protocol.dataReceived(frame(b"x"))
        reactor.advance(0.2)
    assert not transport.disconnecting
    assert transport.value() == frame(b"re:x") * 50


def test_frames_count_per_terminal_across_its_connections() -> None:
    """Two connections of one terminal from one address share its bucket."""
    factory, _ = hostile_factory(named("10000001"), rate=3)
    first, first_transport = open_from(factory, "10.0.0.1", 1)
    second, second_transport = open_from(factory, "10.0.0.1", 2)
    first.dataReceived(frame(b"a"))  # counted on the address, then names the terminal
    second.dataReceived(frame(b"b"))
    first.dataReceived(frame(b"c") + frame(b"d"))  # two of the terminal's three
    second.dataReceived(frame(b"e"))  # the third (each connection is within its own three)
    assert not first_transport.disconnecting and not second_transport.disconnecting
    second.dataReceived(frame(b"f"))
    assert second_transport.disconnecting


def test_links_not_named_yet_share_their_addresses_own_bound() -> None:
    """A peer opening link after link from one address (each closed after a frame or so)
    is held to the address's bound for unnamed links, not one bucket per link; behind a load
    balancer, whose address carries every terminal's new links, the bound is raised."""
    reactor = MemoryReactorClock()

    def factory(unnamed: int) -> TerminalFactory:
        return TerminalFactory(
            named("10000001"),  # type: ignore[arg-type]
            reactor,
            idle_timeout_s=300,
            max_pending=32,
            max_frames_per_second=3,
            max_unnamed_frames_per_second=unnamed,
        )

    tight = factory(3)
    links = [open_from(tight, "10.0.0.1", port) for port in range(1, 6)]
    for protocol, _ in links:
        protocol.dataReceived(frame(b"first"))
    assert [transport.disconnecting for _, transport in links] == [False] * 3 + [True] * 2
    raised = factory(20)
    links = [open_from(raised, "10.0.0.1", port) for port in range(1, 11)]
    for protocol, _ in links:
        protocol.dataReceived(frame(b"sign-on"))
    assert not any(transport.disconnecting for _, transport in links)


def test_a_stranger_naming_a_terminal_spends_his_own_bucket() -> None:
    """Frames naming the honest terminal from another address do not cut the honest one off."""
    factory, reactor = hostile_factory(named("10000001"), rate=3)
    honest, honest_transport = open_from(factory, "10.0.0.1")
    honest.dataReceived(frame(b"sign-on"))
    stranger, stranger_transport = open_from(factory, "10.6.6.6")
    stranger.dataReceived(frame(b"1"))
    stranger.dataReceived(frame(b"2") + frame(b"3") + frame(b"4") + frame(b"5"))
    assert stranger_transport.disconnecting
    reactor.advance(1)
    honest.dataReceived(frame(b"redeem") + frame(b"redeem"))
    assert not honest_transport.disconnecting


def test_buckets_are_bounded_and_idle_ones_dropped() -> None:
    """A stream of new addresses never keeps more than MAX_BUCKETS buckets."""
    factory, reactor = hostile_factory()
    for number in range(MAX_BUCKETS + 10):
        address = f"10.{number // 65536}.{number // 256 % 256}.{number % 256}"
        protocol, _ = open_from(factory, address)
        protocol.dataReceived(frame(b"x"))
        protocol.connectionLost(None)
        reactor.advance(1)
    assert factory.buckets <= MAX_BUCKETS


def test_a_slow_sender_is_closed_by_the_idle_timeout() -> None:
    """Bytes that never complete a frame do not keep a connection open."""
    protocol, transport, reactor = connect(echo, idle=10)
    for byte in frame(b"a frame that takes its time")[:9]:
        protocol.dataReceived(bytes([byte]))
        reactor.advance(1)
    assert not transport.disconnecting
    reactor.advance(1)
    assert transport.disconnecting


def test_a_link_closed_instead_of_answering_is_logged_with_its_peer_and_terminal() -> None:
    """An operator reading `closed` (or `connection_idle_closed`) learns whose link it was:
    the peer, and the terminal its last answer named."""
    replies = iter(
        [
            Reply(b"re:sign-on", {"terminal": "10000001"}),
            Reply(None, {"event": "closed", "reason": "MTI"}),
        ]
    )
    factory, reactor = hostile_factory(lambda payload: succeed(next(replies)))
    protocol, transport = open_from(factory, "10.0.0.1", 4242)
    with capture_logs() as logs:
        protocol.dataReceived(frame(b"sign-on") + frame(b"junk"))
    assert transport.disconnecting
    [closed] = [line for line in logs if line["event"] == "closed"]
    assert (closed["reason"], closed["peer"], closed["terminal"]) == (
        "MTI",
        "10.0.0.1",
        "10000001",
    )
    _, idle_transport = open_from(factory, "10.0.0.2", 5)  # (the closed one times out too)
    with capture_logs() as logs:
        reactor.advance(301)
    assert idle_transport.disconnecting
    idled = [(line["peer"], line["terminal"]) for line in logs]
    assert ("10.0.0.2", None) in idled  # named by no answer yet


def test_a_terminal_fin_ends_its_link() -> None:
    """The protocol takes no half-close: a FIN ends the link (Twisted's `connectionLost`),
    and an answer owed is logged `not_sent` (the test above). TCP cannot tell a terminal
    that closed only its sending side from one that gave up and closed both; answering after
    the FIN logged and recorded as received answers the second kind never read."""
    protocol, _, _ = connect(Pending())
    assert not IHalfCloseableProtocol.providedBy(protocol)

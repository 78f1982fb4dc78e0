"""The link between a front and the ledger process (gateway/ledgerlink.py): batches that
round-trip, malformed batches refused with a `LinkError` naming the fault; the front on
Twisted fakes and the ledger process's hub on real Unix sockets: a reactor turn's frames go as
one message, answers reach the request they answer whatever their order, a link that sends
what does not parse is closed alone, and a closed link fails what waits on it."""

from __future__ import annotations

import marshal
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from cardcodec.frame import MAX_FRAME_LENGTH
from gateway import ledgerlink
from gateway.handler import Reply
from gateway.ledgerlink import (
    MAX_BATCH,
    MAX_MESSAGE,
    FrontLink,
    LedgerHub,
    LinkError,
    LinkLostError,
    Route,
    decode_answers,
    decode_requests,
    encode_answers,
    encode_requests,
)


def messages(transport: StringTransport) -> list[bytes]:
    """The Int32-framed messages written so far."""
    data, found = transport.value(), []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        found.append(data[4 : 4 + length])
        data = data[4 + length :]
    return found


def framed(message: bytes) -> bytes:
    return struct.pack(">I", len(message)) + message


def front() -> tuple[FrontLink, StringTransport, MemoryReactorClock, list[bool]]:
    reactor = MemoryReactorClock()
    lost: list[bool] = []
    link = FrontLink(reactor, lambda: lost.append(True))
    transport = StringTransport()
    link.makeConnection(transport)
    return link, transport, reactor, lost


def test_request_batches_round_trip() -> None:
    """Numbers and frames, empty and longest frames included, come back as they went."""
    items = [(1, b"\x60\x00"), (2**32 - 1, b""), (7, b"\xff" * MAX_FRAME_LENGTH)]
    assert decode_requests(encode_requests(items)) == items


def test_answer_batches_round_trip_and_odd_event_values_become_text() -> None:
    """Payloads (None closes the terminal's link) and events come back; a value marshal cannot
    carry is sent as its text rather than failing the batch."""
    items = [
        (3, Reply(b"answer", {"event": "answered", "code": "00", "repeated": True})),
        (4, Reply(None, {"event": "closed", "reason": "internal error"})),
        (5, Reply(b"x", {"event": "answered", "on": date(2026, 11, 22)})),
    ]
    decoded = decode_answers(encode_answers(items))
    assert decoded[:2] == items[:2]
    assert decoded[2][1].event == {"event": "answered", "on": "2026-11-22"}


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        (b"", "no count"),
        (b"\x00\x00", "claims 0 frames"),
        (struct.pack(">H", MAX_BATCH + 1), f"claims {MAX_BATCH + 1} frames"),
        (b"\x00\x01\x00\x00\x00\x01", "frame 1 of 1 is cut short"),
        (b"\x00\x01\x00\x00\x00\x01\x00\x05abc", "frame 1 of 1 is cut short"),
        (b"\x00\x01\x00\x00\x00\x01\x00\x01ab", "1 bytes after its 1 frames"),
    ],
)
def test_a_malformed_request_batch_is_refused_naming_the_fault(data: bytes, fault: str) -> None:
    with pytest.raises(LinkError, match=fault):
        decode_requests(data)


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        (b"\xff\x00", "not marshal data"),
        (marshal.dumps({"a": 1}), "list of 1-"),
        (marshal.dumps([]), "list of 1-"),
        (marshal.dumps([(1, "text", {})]), "item 1 is not"),
        (marshal.dumps([(1, b"", {}), (2, b"")]), "item 2 is not"),
    ],
)
def test_a_malformed_answer_batch_is_refused_naming_the_fault(data: bytes, fault: str) -> None:
    with pytest.raises(LinkError, match=fault):
        decode_answers(data)


def test_batches_out_of_bounds_are_not_written() -> None:
    """Empty, too many, or a frame over the profile's limit: refused before anything is sent."""
    with pytest.raises(LinkError, match="1-256 frames, not 0"):
        encode_requests([])
    with pytest.raises(LinkError, match=f"not {MAX_BATCH + 1}"):
        encode_requests([(n, b"") for n in range(MAX_BATCH + 1)])
    with pytest.raises(LinkError, match="frame 9"):
        encode_requests([(9, b"\x00" * (MAX_FRAME_LENGTH + 1))])
    with pytest.raises(LinkError, match="answers, not 0"):
        encode_answers([])


def test_a_front_sends_one_turns_frames_as_one_message_and_routes_answers_by_number() -> None:
    """Three submits in one reactor turn: one message at the turn's end; answers in another
    order reach the requests they answer."""
    link, transport, reactor, _ = front()
    deferreds = [link.submit(bytes([n])) for n in range(3)]
    assert transport.value() == b"", "nothing is sent before the turn ends"
    reactor.advance(0)
    [sent] = messages(transport)
    assert decode_requests(sent) == [(1, b"\x00"), (2, b"\x01"), (3, b"\x02")]
    got: list[Reply] = []
    for deferred in deferreds:
        deferred.addCallback(got.append)
    answers = [(3, Reply(b"c", {"n": 3})), (1, Reply(b"a", {"n": 1})), (2, Reply(None, {}))]
    link.dataReceived(framed(encode_answers(answers)))
    assert [reply.payload for reply in got] == [b"c", b"a", None]
    assert link.waiting == 0


def test_a_front_splits_a_large_turn_into_bounded_messages() -> None:
    link, transport, reactor, _ = front()
    for n in range(MAX_BATCH + 1):
        link.submit(bytes([n % 256]))
    reactor.advance(0)
    sizes = [len(decode_requests(message)) for message in messages(transport)]
    assert sizes == [MAX_BATCH, 1]


def test_an_answer_nobody_waits_for_is_logged_and_dropped() -> None:
    link, _, reactor, lost = front()
    waiting = link.submit(b"x")
    reactor.advance(0)
    with capture_logs() as logs:
        link.dataReceived(framed(encode_answers([(99, Reply(b"?", {}))])))
    assert [entry["event"] for entry in logs] == ["link_answer_unexpected"]
    assert not waiting.called and not lost


def test_a_malformed_answer_message_closes_the_link_and_fails_what_waits() -> None:
    """The front cannot trust the link after a bad message: it closes it, every waiting request
    fails with `LinkLostError`, and the front is told (it then stops)."""
    link, transport, reactor, lost = front()
    waiting = link.submit(b"x")
    reactor.advance(0)
    with capture_logs() as logs:
        link.dataReceived(framed(b"\xff\x00"))
    assert logs[0]["event"] == "link_message_refused" and transport.disconnecting
    link.connectionLost(Failure(ConnectionError("closed")))
    failures: list[Failure] = []
    waiting.addErrback(failures.append)
    assert failures[0].check(LinkLostError) and lost == [True]
    late: list[Failure] = []
    link.submit(b"y").addErrback(late.append)
    assert late[0].check(LinkLostError), "a closed link refuses new requests at once"


def test_an_answer_message_over_the_limit_closes_the_front_link() -> None:
    link, transport, _, _ = front()
    with capture_logs() as logs:
        link.dataReceived(struct.pack(">I", MAX_MESSAGE + 1))
    assert logs[0]["event"] == "link_message_too_long" and transport.disconnecting


class Hub:
    """A `LedgerHub` on a real Unix socket in a temporary folder, with the frames it puts
    collected, and fronts connected to it."""

    def __init__(self, folder: Path) -> None:
        self.listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path = str(folder / "ledger.sock")
        self.listening.bind(self.path)
        self.listening.listen(8)
        self.listening.setblocking(False)
        self.put: queue.SimpleQueue[tuple[bytes, Route]] = queue.SimpleQueue()
        self.failed: list[bool] = []
        self.hub = LedgerHub(
            self.listening,
            lambda frame, route: self.put.put((frame, route)),
            on_failed=lambda: self.failed.append(True),
        )
        self.hub.start()

    def front(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT_S)
        sock.connect(self.path)
        return sock

    def taken(self, count: int) -> list[tuple[bytes, Route]]:
        return [self.put.get(timeout=WAIT_S) for _ in range(count)]


WAIT_S = 5.0


def read_messages(sock: socket.socket, count: int = 1) -> list[bytes]:
    """`count` Int32-framed messages, as a front's `Int32StringReceiver` reads them."""
    data, found = b"", list[bytes]()
    while len(found) < count:
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = sock.recv(65536)
            assert chunk, "the link closed before a whole message came"
            data += chunk
        (length,) = struct.unpack(">I", data[:4])
        found.append(data[4 : 4 + length])
        data = data[4 + length :]
    assert not data, "no more than the messages expected"
    return found


def closed_by_hub(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    made = Hub(tmp_path)
    yield made
    made.hub.stop()


def test_the_hub_puts_every_frame_with_its_route_and_sends_answers_back_by_link(hub: Hub) -> None:
    """Two fronts' frames, split and glued across reads, reach `put` with their routes; the
    answers of one group go back to each front in one message, numbered as it numbered them."""
    first, second = hub.front(), hub.front()
    message = framed(encode_requests([(10, b"a"), (11, b"b")]))
    first.sendall(message[:5])
    time.sleep(0.05)
    first.sendall(message[5:] + framed(encode_requests([(12, b"c")])))
    second.sendall(framed(encode_requests([(7, b"z")])))
    taken = dict(hub.taken(4))
    assert set(taken) == {b"a", b"b", b"c", b"z"}
    assert [taken[frame][1] for frame in (b"a", b"b", b"c", b"z")] == [10, 11, 12, 7]
    assert taken[b"a"][0] is taken[b"c"][0] is not taken[b"z"][0]
    assert hub.hub.links == 2
    routes = [taken[b"z"], taken[b"b"], taken[b"a"]]
    replies = [Reply(b"Z", {"event": "answered"}), Reply(b"B", {}), Reply(None, {"n": 1})]
    hub.hub.send_answers(routes, replies)
    got = decode_answers(*read_messages(first))
    assert [(number, reply.payload) for number, reply in got] == [(11, b"B"), (10, None)]
    [(number, reply)] = decode_answers(*read_messages(second))
    assert (number, reply.payload, reply.event) == (7, b"Z", {"event": "answered"})


def test_the_hub_splits_many_answers_to_one_link_into_bounded_messages(hub: Hub) -> None:
    front = hub.front()
    front.sendall(framed(encode_requests([(1, b"x")])))
    [(_, route)] = hub.taken(1)
    link = route[0]
    routes = [(link, number) for number in range(MAX_BATCH + 3)]
    hub.hub.send_answers(routes, [Reply(b"", {})] * len(routes))
    sizes = [len(decode_answers(message)) for message in read_messages(front, 2)]
    assert sizes == [MAX_BATCH, 3]


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        (framed(b"\x00\x00"), "claims 0 frames"),
        (struct.pack(">I", MAX_MESSAGE + 1), f"over {MAX_MESSAGE}"),
    ],
)
def test_the_hub_closes_a_link_that_sends_what_does_not_parse(
    hub: Hub, data: bytes, fault: str
) -> None:
    """That link alone closes, naming the fault; answers still due to it are dropped; the
    other links go on."""
    bad, good = hub.front(), hub.front()
    good.sendall(framed(encode_requests([(1, b"g")])))
    [(_, good_route)] = hub.taken(1)
    bad.sendall(framed(encode_requests([(5, b"early")])))
    [(_, bad_route)] = hub.taken(1)
    with capture_logs() as logs:
        bad.sendall(data)
        assert closed_by_hub(bad)
    refused = [line for line in logs if line["event"] == "link_message_refused"]
    assert fault in refused[0]["reason"]
    hub.hub.send_answers([bad_route, good_route], [Reply(b"B", {}), Reply(b"G", {})])
    [(number, reply)] = decode_answers(*read_messages(good))
    assert (number, reply.payload) == (1, b"G")
    assert hub.hub.links == 1 and not hub.failed


def test_a_front_that_closes_its_link_is_forgotten(hub: Hub) -> None:
    front = hub.front()
    front.sendall(framed(encode_requests([(1, b"x")])))
    [(_, route)] = hub.taken(1)
    front.close()
    deadline = time.monotonic() + WAIT_S
    while hub.hub.links and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hub.hub.links == 0
    hub.hub.send_answers([route], [Reply(b"late", {})])  # dropped, no error


def test_stopping_the_hub_closes_its_links_and_its_socket(tmp_path: Path) -> None:
    made = Hub(tmp_path)
    front = made.front()
    front.sendall(framed(encode_requests([(1, b"x")])))
    made.taken(1)
    made.hub.stop()
    assert closed_by_hub(front)
    assert made.listening.fileno() == -1 and not made.failed


def test_a_bug_in_the_hub_is_logged_and_reported_so_the_process_stops(tmp_path: Path) -> None:
    """The ledger process must not go on deaf to its fronts: `on_failed` stops its reactor."""
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(tmp_path / "ledger.sock"))
    listening.listen(1)
    listening.setblocking(False)
    told = threading.Event()

    def put(frame: bytes, route: Route) -> None:
        raise RuntimeError("bug")

    hub = LedgerHub(listening, put, on_failed=told.set)
    with capture_logs() as logs:
        hub.start()
        front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        front.connect(str(tmp_path / "ledger.sock"))
        front.sendall(framed(encode_requests([(1, b"x")])))
        assert told.wait(WAIT_S)
    hub.stop()
    front.close()
    assert isinstance(hub.failed, RuntimeError)
    assert [line["event"] for line in logs] == ["ledger_links_failed"]


def big_answers(count: int) -> list[Reply]:
    """Answers of the longest frame, each its own bytes (identical ones would be written once,
    as a reference, by the link's encoding)."""
    return [Reply(os.urandom(MAX_FRAME_LENGTH), {}) for _ in range(count)]


def test_a_front_slow_to_read_delays_no_other_fronts_answers(hub: Hub) -> None:
    """Answers queue for a front that does not read (its socket full); another front's
    answers, sent after them on the same thread, arrive at once, and the slow front gets all
    of its own, in order, when it reads again."""
    slow, quick = hub.front(), hub.front()
    slow.sendall(framed(encode_requests([(1, b"s")])))
    quick.sendall(framed(encode_requests([(2, b"q")])))
    routes = dict(hub.taken(2))
    many = [(routes[b"s"][0], number) for number in range(MAX_BATCH)]
    for _ in range(8):  # about 4 MB: more than the socket's buffers hold
        hub.hub.send_answers(many, big_answers(len(many)))
    assert routes[b"s"][0].outgoing  # queued for the hub's thread to write
    started = time.monotonic()
    hub.hub.send_answers([routes[b"q"]], [Reply(b"answer", {})])
    [message] = read_messages(quick)
    assert time.monotonic() - started < 1.0
    assert decode_answers(message)[0][1].payload == b"answer"
    got = read_messages(slow, 8)
    assert [len(decode_answers(m)) for m in got] == [MAX_BATCH] * 8
    assert not hub.failed


def test_a_front_that_takes_no_answers_has_its_link_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stuck front must not hold its answers for ever: once its queue of answers has not
    moved for `SEND_TIMEOUT_S`, that link is closed and later answers to it are dropped at
    once. The sends themselves never wait."""
    monkeypatch.setattr(ledgerlink, "SEND_TIMEOUT_S", 0.2)
    made = Hub(tmp_path)
    try:
        stuck = made.front()
        stuck.sendall(framed(encode_requests([(1, b"x")])))
        [(_, route)] = made.taken(1)
        routes = [(route[0], number) for number in range(MAX_BATCH)]
        with capture_logs() as logs:
            started = time.monotonic()
            for _ in range(20):  # far more than the socket's buffers hold
                made.hub.send_answers(routes, big_answers(len(routes)))
            assert time.monotonic() - started < ledgerlink.SEND_TIMEOUT_S  # queued, not waited
            deadline = time.monotonic() + WAIT_S
            while not route[0].closed and time.monotonic() < deadline:
                time.sleep(0.01)
            made.hub.send_answers(routes[:1], big_answers(1))  # dropped: the link is closed
        assert route[0].closed and not route[0].outgoing
        assert [line["event"] for line in logs] == ["link_send_failed"]
        assert logs[0]["reason"] == "timed out"
        stuck.close()
        # The front that replaces it (its link may get the same descriptor) is served.
        deadline = time.monotonic() + WAIT_S
        while made.hub.links and time.monotonic() < deadline:
            time.sleep(0.01)  # the hub's thread drops the link it reads the end of
        assert made.hub.links == 0
        replacement = made.front()
        replacement.sendall(framed(encode_requests([(1, b"y")])))
        [(frame, _)] = made.taken(1)
        assert frame == b"y" and not made.failed
        replacement.close()
    finally:
        made.hub.stop()

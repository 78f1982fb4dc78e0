"""The link between a front and the ledger process (gateway/ledgerlink.py): batches that
round-trip, malformed batches refused with a `LinkError` naming the fault, and both ends on
Twisted fakes: a reactor turn's frames go as one message, answers reach the request they
answer whatever their order, and a closed link fails what waits on it."""

from __future__ import annotations

import marshal
import struct
from datetime import date

import pytest
from structlog.testing import capture_logs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from cardcodec.frame import MAX_FRAME_LENGTH
from gateway.handler import Reply
from gateway.ledgerlink import (
    MAX_BATCH,
    FrontLink,
    LedgerEnd,
    LinkError,
    LinkLostError,
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


def test_the_ledger_end_submits_each_frame_and_returns_each_answer_to_its_number() -> None:
    """A batch's frames go to the worker; answers (including a worker failure, which becomes
    a closing reply) go back in one message numbered as the front numbered them."""
    reactor = MemoryReactorClock()
    pending: dict[bytes, Deferred[Reply]] = {}

    def submit(frame: bytes) -> Deferred[Reply]:
        pending[frame] = Deferred()
        return pending[frame]

    end = LedgerEnd(reactor, submit)
    transport = StringTransport()
    end.makeConnection(transport)
    end.dataReceived(framed(encode_requests([(10, b"a"), (11, b"b")])))
    assert set(pending) == {b"a", b"b"} and end.in_flight == 2
    pending[b"b"].callback(Reply(b"B", {"event": "answered"}))
    with capture_logs() as logs:
        pending[b"a"].errback(RuntimeError("bug"))
    assert logs[0]["event"] == "link_answer_failed"
    reactor.advance(0)
    [message] = messages(transport)
    answers = decode_answers(message)
    assert [(number, reply.payload) for number, reply in answers] == [(11, b"B"), (10, None)]
    assert end.in_flight == 0


def test_the_ledger_end_closes_a_link_that_sends_a_malformed_batch() -> None:
    submitted: list[bytes] = []

    def submit(frame: bytes) -> Deferred[Reply]:
        submitted.append(frame)
        return succeed(Reply(b"", {}))

    end = LedgerEnd(MemoryReactorClock(), submit)
    transport = StringTransport()
    end.makeConnection(transport)
    with capture_logs() as logs:
        end.dataReceived(framed(b"\x00\x00"))
    assert logs[0]["event"] == "link_message_refused"
    assert transport.disconnecting and not submitted


def test_a_message_over_the_limit_closes_the_link() -> None:
    end = LedgerEnd(MemoryReactorClock(), lambda frame: fail(RuntimeError("unused")))
    transport = StringTransport()
    end.makeConnection(transport)
    with capture_logs() as logs:
        end.dataReceived(struct.pack(">I", end.MAX_LENGTH + 1))
    assert logs[0]["event"] == "link_message_too_long" and transport.disconnecting

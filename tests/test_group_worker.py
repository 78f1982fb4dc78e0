"""The ledger worker: one thread that takes, prepares and decides groups one at a time and in
arrival order; answers encoded on the reactor thread (or, for the ledger process's hub, handed
over on the log-sync thread), a failure closing only the links it concerns."""

from __future__ import annotations

import threading
import time
from typing import Any

from structlog.testing import capture_logs
from twisted.internet.defer import Deferred

from cardcodec.message import Message
from gateway.handler import Reply, Sealing
from gateway.server import GroupWorker, _deliver
from tests.test_metrics import ThreadReactor

ANSWERED = {"event": "answered"}


class Recorder:
    """A fake gateway: prepare and decide record what they saw and when."""

    def __init__(self, decide_time: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, tuple[bytes, ...]]] = []
        self.in_ledger = 0
        self.most_in_ledger = 0
        self.decide_time = decide_time
        self.prepared_during_ledger = False

    def prepare(self, payloads: list[bytes]) -> list[bytes]:
        with self.lock:
            if self.in_ledger:
                self.prepared_during_ledger = True
            self.events.append(("prepare", tuple(payloads)))
        return payloads

    def decide(self, payloads: list[bytes]) -> list[Reply]:
        with self.lock:
            self.in_ledger += 1
            self.most_in_ledger = max(self.most_in_ledger, self.in_ledger)
            self.events.append(("decide", tuple(payloads)))
        time.sleep(self.decide_time)
        with self.lock:
            self.in_ledger -= 1
        return [Reply(payload, ANSWERED) for payload in payloads]


def run(worker: GroupWorker, payloads: list[bytes], gap: float = 0.0) -> list[Deferred[Reply]]:
    answers = []
    worker.start()
    for payload in payloads:
        answers.append(worker.submit(payload))
        time.sleep(gap)
    worker.stop()
    return answers


def test_groups_enter_the_ledger_one_at_a_time_in_the_order_taken() -> None:
    """Many small groups: the decide calls never overlap, and the payloads reach the ledger
    exactly in the order they were submitted."""
    recorder = Recorder(decide_time=0.002)
    reactor = ThreadReactor()
    worker = GroupWorker(recorder.decide, reactor, prepare=recorder.prepare)
    payloads = [f"{n:04d}".encode() for n in range(300)]
    answers = run(worker, payloads, gap=0.0002)
    reactor.run_thread_calls()
    decided = [p for kind, group in recorder.events if kind == "decide" for p in group]
    assert decided == payloads
    assert recorder.most_in_ledger == 1
    assert all(answer.called for answer in answers)
    assert worker.requests == len(payloads)
    assert worker.groups > 1


def test_one_thread_prepares_then_decides_each_group_before_taking_the_next() -> None:
    """Preparing never overlaps deciding: with several processes on one SQLite file, the
    thread that holds the write lock does not share its interpreter with a second worker."""
    recorder = Recorder(decide_time=0.005)
    names: set[str] = set()

    def prepare(payloads: list[bytes]) -> list[bytes]:
        names.add(threading.current_thread().name)
        return recorder.prepare(payloads)

    worker = GroupWorker(recorder.decide, ThreadReactor(), prepare=prepare)
    run(worker, [f"{n:04d}".encode() for n in range(40)], gap=0.001)
    assert not recorder.prepared_during_ledger
    assert names == {"ledger-0"}
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["prepare", "decide"] * (len(kinds) // 2)
    assert len(kinds) > 2  # several groups


def test_a_failed_preparation_closes_its_group_and_the_next_groups_go_on() -> None:
    reactor = ThreadReactor()
    recorder = Recorder()

    def prepare(payloads: list[bytes]) -> list[bytes]:
        if b"bad" in payloads:
            raise RuntimeError("boom")
        return recorder.prepare(payloads)

    worker = GroupWorker(recorder.decide, reactor, prepare=prepare)
    worker.start()
    bad = worker.submit(b"bad")
    time.sleep(0.2)  # a group of its own
    good = worker.submit(b"good")
    worker.stop()
    reactor.run_thread_calls()
    replies: list[Reply] = []
    bad.addCallback(replies.append)
    good.addCallback(replies.append)
    assert replies[0].payload is None and replies[0].event["reason"] == "internal error"
    assert replies[1].payload == b"good"


def test_answers_are_encoded_on_delivery_and_one_bad_answer_closes_only_its_link() -> None:
    """`_deliver` (the reactor thread) encodes each `Sealing`; one that cannot be encoded is
    a closed link for that request alone."""

    def mac(_: bytes) -> bytes:
        raise RuntimeError("no MAC")

    good = Sealing(Message("0810", {11: "000001", 39: "00"}), ANSWERED, None)
    broken = Sealing(Message("0210", {11: "000002", 39: "00"}), ANSWERED, mac)
    deferreds: list[Deferred[Reply]] = [Deferred(), Deferred()]
    _deliver(deferreds, [good, broken])
    replies: list[Reply] = []
    for deferred in deferreds:
        deferred.addCallback(replies.append)
    assert replies[0].payload is not None and replies[0].payload[11:13] == bytes.fromhex("0810")
    assert replies[1].payload is None


def test_without_prepare_one_thread_decides_the_payloads() -> None:
    seen: list[Any] = []

    def decide(payloads: list[bytes]) -> list[Reply]:
        seen.append((threading.current_thread().name, payloads))
        return [Reply(p, ANSWERED) for p in payloads]

    worker = GroupWorker(decide, ThreadReactor())
    run(worker, [b"x", b"y"])
    assert {name for name, _ in seen} == {"ledger-0"}
    assert [p for _, group in seen for p in group] == [b"x", b"y"]


def test_put_frames_go_to_deliver_on_the_log_sync_thread_in_order_never_the_reactor() -> None:
    """The ledger process's hub puts frames with their routes; each decided group's routes
    and answers go to `deliver` on the log-sync thread, in the order the frames came."""
    reactor = ThreadReactor()
    recorder = Recorder(decide_time=0.001)
    delivered: list[tuple[str, list[Any], list[bytes | None]]] = []

    def deliver(sinks: Any, replies: Any) -> None:
        payloads = [reply.payload for reply in replies]
        delivered.append((threading.current_thread().name, list(sinks), payloads))

    worker = GroupWorker(recorder.decide, reactor, deliver=deliver)
    worker.start()
    for number in range(50):
        worker.put(f"{number:02d}".encode(), ("link", number))
        time.sleep(0.0002)
    worker.stop()
    assert not reactor.from_threads, "nothing for the reactor"
    assert {name for name, _, _ in delivered} == {"log-sync"}
    routes = [route for _, sinks, _ in delivered for route in sinks]
    assert routes == [("link", number) for number in range(50)]
    assert [p for _, _, payloads in delivered for p in payloads] == [
        f"{number:02d}".encode() for number in range(50)
    ]
    assert len(delivered) > 1


def test_a_delivery_that_fails_is_logged_and_the_next_groups_are_delivered() -> None:
    delivered: list[bytes | None] = []

    def deliver(sinks: Any, replies: Any) -> None:
        if any(reply.payload == b"bad" for reply in replies):
            raise RuntimeError("bug")
        delivered.extend(reply.payload for reply in replies)

    worker = GroupWorker(Recorder().decide, ThreadReactor(), deliver=deliver)
    worker.start()
    with capture_logs() as logs:
        worker.put(b"bad", None)
        time.sleep(0.2)  # a group of its own
        worker.put(b"good", None)
        worker.stop()
    assert delivered == [b"good"]
    assert [line["event"] for line in logs] == ["answers_not_delivered"]

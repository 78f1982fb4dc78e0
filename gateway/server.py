"""The one place that wires the real gateway together and runs it (`vipgate serve`).

Config, database, key store, clock, sessions, the synchronous `Gateway`, the ledger worker
whose threads do its blocking work in groups (group commit), and the listening port. SIGTERM or
SIGINT stops accepting, lets the requests in flight finish and be answered, then exits 0.
"""

from __future__ import annotations

import contextlib
import gc
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import structlog
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.protocol import Factory

from gateway import build, logs
from gateway.bootstrap import bootstrap, open_database, sqlite_ledger_to_make
from gateway.clock import Clock, StartedClock, business_date
from gateway.config import Config, load_config
from gateway.errors import BadInput
from gateway.handler import FAILED, Answer, Gateway, Reply, finish
from gateway.ledger import unit_of_work
from gateway.ledger.checkpoints import Checkpointer
from gateway.ledger.db import (
    SERVING_BUSY_TIMEOUT_MS,
    deferring_log_syncs,
    sync_after_release,
    take_owed_log_syncs,
)
from gateway.ledger.models import Authorisation, JournalTransaction
from gateway.ledgerlink import EXIT_LINK_LOST, FrontLink, LedgerHub
from gateway.protocol import TerminalFactory, TrafficRecorder

if TYPE_CHECKING:  # prometheus_client is imported only when metrics are on
    from gateway.metrics import Metrics

log = structlog.get_logger("vipgate.server")


MAX_GROUP = 64  # requests answered by one commit at most
# Seconds a stopping gateway waits for its links to take their last answers before cutting.
CLOSE_LINKS_S = 5.0


class GroupWorker:
    """The thread that does ledger work: it takes every request waiting (up to `MAX_GROUP`),
    prepares them (`prepare`: decoding, sessions, the checks before the ledger), decides them
    with one commit (`decide`), and hands the answers back to the reactor thread. The reactor
    never waits on the database. The thread runs inside `hold` (the gateway's
    `holding_connection`): its units of work share one connection.

    One ledger thread, not a pipeline of two: a second thread preparing the next group would
    only compete with the first for the interpreter lock. That competition is what counts
    with several processes on one SQLite file (`--workers`): the write lock is held while a
    group is decided, so every moment the deciding thread waits for the interpreter is a
    moment every other process waits for the lock. Groups are taken, prepared and decided in
    arrival order. Without `prepare`, `decide` gets the payloads.

    The log-sync thread waits for the disk instead: on SQLite (`sync_after_release`) a group's
    commit is synced after the write lock is given back, so the ledger thread hands the group
    over with the syncs it owes and goes on to the next group. The log-sync thread runs those
    syncs (one for every group waiting) and only then hands the answers to the reactor, in
    the order the groups were decided. It holds the interpreter lock only for moments."""

    def __init__(
        self,
        decide: Callable[[Any], Sequence[Answer]],
        reactor: Any,
        metrics: Metrics | None = None,
        *,
        prepare: Callable[[list[bytes]], Any] | None = None,
        hold: Callable[[], AbstractContextManager[None]] = nullcontext,
        deliver: Callable[[Sequence[Any], Sequence[Answer]], None] | None = None,
    ) -> None:
        self._decide = decide
        self._prepare = prepare
        self._hold = hold
        self._reactor = reactor
        self._metrics = metrics
        self._deliver = deliver or self._to_reactor
        self._queue: queue.SimpleQueue[tuple[bytes, Any] | None] = queue.SimpleQueue()
        self._decided: queue.SimpleQueue[_Decided | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="ledger-0", daemon=True)
        self._syncer = threading.Thread(target=self._sync_loop, name="log-sync", daemon=True)
        self.groups = 0
        self.requests = 0

    def start(self) -> None:
        self._syncer.start()
        self._thread.start()

    def submit(self, payload: bytes) -> Deferred[Reply]:
        """A frame whose answer fires the `Deferred` returned, on the reactor thread."""
        deferred: Deferred[Reply] = Deferred()
        self._queue.put((payload, deferred))
        return deferred

    def put(self, payload: bytes, sink: Any) -> None:
        """A frame from any thread, whose answer goes with `sink` to `deliver`."""
        self._queue.put((payload, sink))

    def _to_reactor(self, sinks: Sequence[Any], replies: Sequence[Answer]) -> None:
        self._reactor.callFromThread(_deliver, sinks, replies)

    def stop(self) -> None:
        """Finish what was submitted, then end the thread."""
        self._queue.put(None)
        if self._thread.ident is not None:  # started
            self._thread.join()
        if self._syncer.ident is not None:
            self._syncer.join()

    def _take(self) -> tuple[list[tuple[bytes, Any]], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        group = [first]
        while len(group) < MAX_GROUP:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return group, True
            group.append(item)
        return group, False

    def _loop(self) -> None:
        stopping = False
        try:
            with deferring_log_syncs(), self._hold():
                while not stopping:
                    group, stopping = self._take()
                    if not group:
                        continue
                    started = time.perf_counter()
                    replies = self._run([payload for payload, _ in group])
                    owed = take_owed_log_syncs()
                    self._decided.put(_Decided(group, replies, owed, started))
        finally:
            self._decided.put(None)

    def _sync_loop(self) -> None:
        """Every decided group in order: the log syncs it owes (with `sync_after_release`,
        its commit is not on disk until then), then its answers to the reactor. The groups
        waiting meanwhile share one sync, and the ledger thread is already on the next."""
        stopping = False
        while not stopping:
            first = self._decided.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    item = self._decided.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            if not self._synced(batch):
                continue
            for decided in batch:
                if self._metrics is not None:
                    elapsed = time.perf_counter() - decided.started
                    self._metrics.group_done(len(decided.group), elapsed)
                self.groups += 1
                self.requests += len(decided.group)
                try:
                    self._deliver([sink for _, sink in decided.group], decided.replies)
                except Exception:  # a bug: that group's answers are lost, the next ones go on
                    log.exception("answers_not_delivered", size=len(decided.group))

    def _synced(self, batch: list[_Decided]) -> bool:
        """Run the syncs the batch owes. One that fails (PostgreSQL's WAL flush, when the
        server went away: `CommitOutcomeUnknownError`) leaves its commits' durability
        unknown, so none of the batch's answers is given: their links close, and each
        terminal reverses what it sent or sends it again (§7), which is right whether the
        commit was kept or lost. (SQLite's own sync never returns from a failure.)"""
        try:
            for log_sync in {log_sync for decided in batch for log_sync in decided.owed}:
                log_sync()
        except SQLAlchemyError as error:
            log.error(
                "ledger_flush_failed",
                groups=len(batch),
                requests=sum(len(decided.group) for decided in batch),
                error=str(error),
            )
            for decided in batch:
                try:
                    self._deliver(
                        [sink for _, sink in decided.group], [FAILED] * len(decided.group)
                    )
                except Exception:
                    log.exception("answers_not_delivered", size=len(decided.group))
            return False
        return True

    def _run(self, payloads: list[bytes]) -> Sequence[Answer]:
        try:
            prepared = payloads if self._prepare is None else self._prepare(payloads)
            return self._decide(prepared)
        except Exception:  # a bug, not a decline: the links close, the gateway goes on
            log.exception("group_failed", size=len(payloads))
        return [FAILED] * len(payloads)


@dataclass(frozen=True)
class _Decided:
    """A group the ledger thread is done with, waiting for its log syncs."""

    group: list[tuple[bytes, Any]]  # each frame, and where its answer goes
    replies: Sequence[Answer]
    owed: list[Callable[[], None]]
    started: float


def _deliver(deferreds: Sequence[Deferred[Reply]], replies: Sequence[Answer]) -> None:
    """On the reactor thread: each answer encoded (and MAC'd) here, so that the ledger thread
    is already deciding the next group, then handed to its connection."""
    with logs.together():  # the group's log lines in one write
        for deferred, reply in zip(deferreds, _finished(replies), strict=True):
            deferred.callback(reply)


def _finished(replies: Sequence[Answer]) -> list[Reply]:
    """Each answer encoded and MAC'd; one that cannot be is a bug, not a decline: its link
    closes (`FAILED`) and the others are answered."""
    finished: list[Reply] = []
    for answer in replies:
        try:
            finished.append(finish(answer))
        except Exception:
            log.exception("answer_failed")
            finished.append(FAILED)
    return finished


class Worker(Protocol):
    """Where a server's frames go: the ledger worker of its own process (`GroupWorker`), or
    the link to the ledger process (`LinkWorker`)."""

    def start(self) -> None: ...

    def submit(self, payload: bytes) -> Deferred[Reply]: ...

    def stop(self) -> None: ...


class LinkWorker:
    """A front's worker: frames go over the link to the ledger process (gateway/ledgerlink.py).
    Stopping closes the link once the front has nothing in flight."""

    def __init__(self, link: FrontLink) -> None:
        self.link = link
        self.stopping = False

    def start(self) -> None:
        pass

    def submit(self, payload: bytes) -> Deferred[Reply]:
        return self.link.submit(payload)

    def stop(self) -> None:
        self.stopping = True
        if self.link.transport is not None:
            cast(Any, self.link.transport).loseConnection()


class GatewayServer:
    """Feeds frames from the reactor to the ledger worker, and drains on stop."""

    def __init__(
        self,
        gateway: Gateway,
        reactor: Any,
        config: Config,
        record: TrafficRecorder | None = None,
        metrics: Metrics | None = None,
        *,
        worker: Worker | None = None,
    ) -> None:
        self._reactor = reactor
        self._metrics = metrics  # None: `vipgate serve` without --metrics, nothing measured
        self._worker: Worker = worker or GroupWorker(
            gateway.decide_prepared,
            reactor,
            self._metrics,
            prepare=gateway.prepare_group,
            hold=gateway.holding_connection,
        )
        self._in_flight = 0
        self._drained: list[Deferred[None]] = []
        self._port: Any = None
        self.factory = TerminalFactory(
            self.process,
            reactor,
            idle_timeout_s=config.gateway.idle_timeout_s,
            max_pending=config.gateway.max_pending_per_connection,
            record=record,
            max_connections_per_address=config.gateway.max_connections_per_address,
            max_frames_per_second=config.gateway.max_frames_per_second_per_terminal,
            max_unnamed_frames_per_second=config.gateway.max_unnamed_frames_per_second,
            metrics=self._metrics,
        )

    def process(self, payload: bytes) -> Deferred[Reply]:
        self._in_flight += 1
        if self._metrics is not None:
            self._metrics.request_started()
        deferred = self._worker.submit(payload)
        deferred.addBoth(self._finished)
        return deferred

    def _finished(self, result: Any) -> Any:
        self._in_flight -= 1
        if self._metrics is not None:
            self._metrics.request_finished()
        if self._in_flight == 0:
            waiting, self._drained = self._drained, []
            for deferred in waiting:
                deferred.callback(None)
        return result

    def listen(self, host: str, port: int) -> Any:
        """Listen and start the ledger worker; returns the listening port. A port taken or a
        host that does not resolve is `BadInput` (exit 2), as with several workers."""
        try:
            self._port = self._reactor.listenTCP(port, self.factory, interface=host)
        except CannotListenError as error:
            reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
            raise BadInput(f"--listen: cannot listen on {host}:{port}: {reason}") from None
        self._worker.start()
        return self._port

    def adopt(self, listening: socket.socket) -> Any:
        """Start the ledger worker and accept on a socket another process bound and shares
        (`vipgate serve --workers N`, gateway/workers.py); returns the listening port."""
        self._worker.start()
        fileno, family = listening.fileno(), listening.family
        self._port = self._reactor.adoptStreamPort(fileno, family, self.factory)
        listening.close()  # the port holds its own duplicate of the descriptor
        return self._port

    def stop(self) -> Deferred[None]:
        """Stop accepting, take what each link has in flight and no more (`drain_from_now`),
        wait for the requests in flight, stop the ledger worker."""
        log.info("stopping", in_flight=self._in_flight)
        stopped = self._port.stopListening() if self._port is not None else None
        for link in list(self.factory.open):
            link.drain_from_now()
        drained: Deferred[None] = Deferred()
        if self._in_flight == 0:
            drained.callback(None)
        else:
            self._drained.append(drained)
        both: Deferred[Any] = drained
        if stopped is not None:
            both.addCallback(lambda _: stopped)
        both.addCallback(lambda _: self._close_links())
        both.addCallback(lambda _: self._stop_worker())
        return both

    def _close_links(self) -> Deferred[None]:
        """Close every terminal's link once its answers are written, within
        `CLOSE_LINKS_S` (then cut what is left). The reactor's shutdown would close them at
        once, dropping answers still in their write buffers: approvals already committed,
        which their terminals would then reverse. Starts on the next turn of the reactor, so
        that the last answers, decided as the drain ended, are handed to their links first."""
        done: Deferred[None] = Deferred()

        def close() -> None:
            links = list(self.factory.open)
            waiting = DeferredList([link.close_when_answered() for link in links])

            def cut_the_rest() -> None:
                for link in links:
                    link.abort()

            cut = self._reactor.callLater(CLOSE_LINKS_S, cut_the_rest)
            waiting.addCallback(lambda _: cut.cancel() if cut.active() else None)
            waiting.addCallback(lambda _: done.callback(None))

        self._reactor.callLater(0, close)
        return done

    def _stop_worker(self) -> None:
        self._worker.stop()
        if isinstance(self._worker, GroupWorker):
            log.info(
                "ledger_worker_stopped",
                groups=self._worker.groups,
                requests=self._worker.requests,
            )


@dataclass(frozen=True)
class Wiring:
    """The real things a gateway runs with."""

    config: Config
    engine: Engine
    clock: Clock
    gateway: Gateway


def parse_clock(text: str) -> datetime:
    """`--clock ISO8601`: an instant with its offset (a bare local time is refused)."""
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(f"--clock: {text!r} is not an ISO 8601 instant") from None
    if instant.tzinfo is None:
        raise BadInput(f"--clock: {text!r} has no UTC offset (e.g. 2026-11-22T10:00:00+08:00)")
    if not CLOCK_YEARS[0] <= instant.year <= CLOCK_YEARS[1]:
        raise BadInput(
            f"--clock: {text!r} is outside the years {CLOCK_YEARS[0]}-{CLOCK_YEARS[1]}, the"
            " ones a card's expiry (YYMM) can name"
        )
    return instant


# The years a `--clock` may start in: a card's expiry date names a year of this century
# (YYMM), and at the calendar's own ends a business date or a day beside it cannot be had.
CLOCK_YEARS = (2000, 2099)


def latest_transaction(engine: Engine) -> datetime | None:
    with unit_of_work(engine) as session:
        journal = session.scalar(select(func.max(JournalTransaction.created_at)))
        answered = session.scalar(select(func.max(Authorisation.local_time)))
    instants = [instant for instant in (journal, answered) if instant is not None]
    return max(instants) if instants else None


def latest_closed_month(engine: Engine) -> str | None:
    """The latest month ("YYYY-MM") clearing has closed, if any."""
    with unit_of_work(engine) as session:
        month = session.scalar(text("SELECT max(month) FROM clearing_months"))
    return str(month) if month is not None else None


def _refuse_clock_before_ledger(config: Config, clock_start: datetime) -> None:
    """`--clock` may not start before what the ledger holds: a transaction later than the
    start, or a month closed by clearing that the clock's business date has not left (its
    requests would all be `96`, the month being settled without them). A SQLite ledger not
    made yet holds neither, and is not made here: the config's load may still refuse."""
    if sqlite_ledger_to_make(config.gateway.database):
        return
    engine = open_database(config.gateway.database)
    try:
        latest = latest_transaction(engine)
        closed = latest_closed_month(engine)
    finally:
        engine.dispose()
    if latest is not None and latest > clock_start:
        raise BadInput(
            f"--clock: the database holds transactions up to {latest.isoformat()}, "
            "later than the clock's start"
        )
    local = clock_start.astimezone(config.gateway.timezone)
    day = business_date(local, config.gateway.cutoff)
    if closed is not None and f"{day.year:04d}-{day.month:02d}" <= closed:
        raise BadInput(
            f"--clock: clearing has closed {closed}; the clock's start is in business date"
            f" {day.isoformat()}, which may no longer be added to"
        )


def wire(config_path: Path, db_override: str | None, clock_start: datetime | None) -> Wiring:
    """Migrate, load the config into the ledger (as every command does) and build the gateway."""
    if clock_start is not None:
        _refuse_clock_before_ledger(load_config(config_path, db_override), clock_start)
    clock = StartedClock(clock_start) if clock_start is not None else None
    # A serving gateway waits for the ledger's lock less long than a command does.
    base = bootstrap(
        config_path,
        db_override,
        clock=clock,
        switches=True,  # serve loads its config whole: the switches with the rest
        busy_timeout_ms=SERVING_BUSY_TIMEOUT_MS,
    )
    log.info("config_loaded", summary=base.loaded.summary())
    for note in base.loaded.notes:
        log.warning("config_note", note=note)
    config = base.config
    gateway = Gateway(
        config=config,
        engine=base.engine,
        clock=base.clock,
        security=base.security,
    )
    return Wiring(config, base.engine, base.clock, gateway)


def run(
    wiring: Wiring,
    listen: tuple[str, int],
    reactor: Any,
    on_listening: Callable[[Any], None] | None = None,
    record: TrafficRecorder | None = None,
    *,
    adopt: socket.socket | None = None,
    metrics: Metrics | None = None,
) -> int:
    """Serve until the reactor stops (SIGTERM/SIGINT), draining in-flight requests first.

    With `adopt`, accept on that already listening socket instead of binding `listen`; with
    `metrics` (`vipgate serve --metrics`), measure into them.
    """
    _stop_on_signals(reactor)
    server = GatewayServer(wiring.gateway, reactor, wiring.config, record, metrics)
    port = server.listen(*listen) if adopt is None else server.adopt(adopt)
    _log_listening(port)
    reactor.addSystemEventTrigger("before", "shutdown", server.stop)
    if on_listening is not None:
        on_listening(port)
    return _serve_ledger_until_stopped(wiring, reactor)


def _serve_ledger_until_stopped(wiring: Wiring, reactor: Any) -> int:
    """Run the reactor of a process that writes the ledger, then close the ledger; exit 0."""
    checkpointer = _serving_ledger(wiring.engine)
    _settle_garbage_collector()
    reactor.run(installSignalHandlers=False)  # `_stop_on_signals`
    if checkpointer is not None:
        checkpointer.stop()
    wiring.engine.dispose()
    log.info("stopped")
    return 0


def _stop_on_signals(reactor: Any, stop: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT stop the reactor, once: from before the `listening` line until
    the process exits. Twisted's own handlers, installed only once the reactor runs, left a
    signal just before (or after, during the wind-down) to Python's default, which killed
    the process without its drain; and a second signal while the reactor stopped raised
    `ReactorNotRunning`, a traceback on stdout among the JSON lines. A SIGINT the process
    was started ignoring (a background job; a worker, whose parent forwards Ctrl-C as
    SIGTERM) stays ignored, as Twisted's handlers left it.

    SIGHUP (the operator's terminal or SSH session gone) drains as SIGTERM does: by default
    it killed the process mid-request, its committed approvals unanswered. One the process
    was started ignoring (`nohup`; a worker, whose parent forwards it) stays ignored."""

    def on_signal(_signum: int, _frame: Any) -> None:
        if stop is None:
            reactor.callFromThread(_stop_once, reactor)
        else:
            reactor.callFromThread(stop)

    signal.signal(signal.SIGTERM, on_signal)
    for signum in (signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, on_signal)


def _stop_once(reactor: Any) -> None:
    """Stop the reactor unless it is stopping already."""
    with contextlib.suppress(ReactorNotRunning):
        reactor.stop()


def _log_listening(port: Any) -> None:
    """The line that says where a process accepts terminals, and which build it runs."""
    address = port.getHost()
    log.info(
        "listening",
        host=getattr(address, "host", ""),
        port=getattr(address, "port", 0),
        build=build(),
    )


def run_front(
    wiring: Wiring,
    reactor: Any,
    *,
    adopt: socket.socket,
    ledger: socket.socket,
    metrics: Metrics | None = None,
) -> int:
    """A front (`vipgate serve --workers N` on SQLite, gateway/workers.py): accept terminals on
    `adopt` and forward their frames over `ledger`, a connected link to the ledger process.
    Drains as `run` does. If the link closes while serving (the ledger process ended), the
    front stops at once: its terminals' links close and the exit status is `EXIT_LINK_LOST`."""
    lost: list[bool] = []

    def on_lost() -> None:
        if not worker.stopping:
            log.error("ledger_link_lost")
            lost.append(True)
            if reactor.running:
                _stop_once(reactor)

    _stop_on_signals(reactor)
    link = FrontLink(reactor, on_lost)
    worker = LinkWorker(link)
    reactor.adoptStreamConnection(ledger.fileno(), ledger.family, _One(link))
    ledger.close()  # the connection holds its own duplicate of the descriptor
    server = GatewayServer(wiring.gateway, reactor, wiring.config, metrics=metrics, worker=worker)
    port = server.adopt(adopt)
    _log_listening(port)
    reactor.addSystemEventTrigger("before", "shutdown", server.stop)
    _settle_garbage_collector()
    reactor.run(installSignalHandlers=False)  # `_stop_on_signals`
    log.info("stopped")
    return EXIT_LINK_LOST if lost else 0


def run_ledger(
    wiring: Wiring, reactor: Any, *, adopt: socket.socket, metrics: Metrics | None = None
) -> int:
    """The ledger process (`vipgate serve --workers N` on SQLite, gateway/workers.py): accept
    the fronts' links on `adopt`, a listening Unix socket, and decide every front's frames in
    the same groups. The links are the `LedgerHub`'s, on a thread of its own, and the
    log-sync thread writes the answers; the reactor only waits for a stop. On SIGTERM (sent
    once every front has stopped): stop accepting links, decide what was submitted, exit 0
    (1 if the hub failed)."""
    hub: LedgerHub
    told: list[bool] = []

    def on_stop_signal() -> None:  # once: a second signal changes nothing
        if not told:
            told.append(True)
            _stop_after_fronts(reactor, hub)

    _stop_on_signals(reactor, on_stop_signal)

    def decide(prepared: Any) -> list[Reply]:
        # The answers are encoded and MAC'd here, on the ledger thread, not on the log-sync
        # thread: a group's encoding there held the interpreter lock while the ledger thread
        # came back from SQLite, and that wait cost the ledger thread more than the encoding.
        with logs.together():
            return _finished(wiring.gateway.decide_prepared(prepared))

    def send_answers(routes: Sequence[Any], replies: Sequence[Answer]) -> None:
        hub.send_answers(routes, [finish(reply) for reply in replies])  # Replies already

    worker = GroupWorker(
        decide,
        reactor,
        metrics,
        prepare=wiring.gateway.prepare_group,
        hold=wiring.gateway.holding_connection,
        deliver=send_answers,
    )
    hub = LedgerHub(
        adopt, worker.put, on_failed=lambda: reactor.callFromThread(_stop_once, reactor)
    )
    worker.start()
    hub.start()

    def stop() -> None:
        log.info("stopping", links=hub.links)
        hub.stop()
        worker.stop()
        log.info("ledger_worker_stopped", groups=worker.groups, requests=worker.requests)

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    log.info("ledger_listening", build=build())
    status = _serve_ledger_until_stopped(wiring, reactor)
    return 1 if hub.failed is not None else status


# How long a ledger process told to stop waits for its fronts to go first (their drains end
# within seconds; the parent itself tells it only once they have all exited).
FRONTS_GONE_WAIT_S = 30.0
FRONTS_GONE_POLL_S = 0.05


def _stop_after_fronts(reactor: Any, hub: LedgerHub, waited_s: float = 0.0) -> None:
    """A stop signal to the ledger process: stop once no front is linked to it, or after
    `FRONTS_GONE_WAIT_S`. The parent sends it once every front has exited, and it stops at
    once; a SIGTERM to the whole process group (`pkill vipgate`, a service manager without
    `KillMode=mixed`) reaches it with the fronts, which then drain: the requests they have
    in flight still need it. Stopping at once, it left each front its link gone mid-drain
    (exit 75), those requests unanswered."""
    if hub.links == 0 or waited_s >= FRONTS_GONE_WAIT_S:
        _stop_once(reactor)
        return
    if waited_s == 0.0:
        log.info("stopping_after_fronts", links=hub.links)
    reactor.callLater(
        FRONTS_GONE_POLL_S, _stop_after_fronts, reactor, hub, waited_s + FRONTS_GONE_POLL_S
    )


class _One(Factory):
    """The factory of one connection whose protocol is already built (a front's link)."""

    def __init__(self, protocol: FrontLink) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> FrontLink:
        return self._protocol


def _serving_ledger(engine: Engine) -> Checkpointer | None:
    """How the ledger is served: commits give their locks back before the log is on disk
    (`sync_after_release`; the ledger worker answers after the sync, or on PostgreSQL the
    WAL flush), and on SQLite a thread of its own checkpoints the log (`Checkpointer`,
    returned to be stopped)."""
    sync_after_release(engine)
    if engine.dialect.name != "sqlite":
        return None
    checkpointer = Checkpointer(engine)
    checkpointer.start()
    return checkpointer


# The cyclic collector's first threshold while serving: a request makes a few hundred objects
# that die young, and the default (700) ran a collection every couple of requests.
YOUNG_OBJECTS_BEFORE_COLLECTION = 10_000


def _settle_garbage_collector() -> None:
    """Before serving: what start-up made (config, SQLAlchemy and Twisted machinery) is
    moved out of the collector's sight, so the collections that serving causes no longer
    walk it (each full collection took about 50 ms, a stall every request of the moment
    waited out), and the young generation is collected less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_OBJECTS_BEFORE_COLLECTION, *gc.get_threshold()[1:])


__all__ = ["GatewayServer", "Wiring", "parse_clock", "run", "run_front", "run_ledger", "wire"]

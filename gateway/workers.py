"""`vipgate serve --workers N`: N worker processes answering terminals on one listening port.

One Python process answers terminals on about one core: the reactor, the framing, the MAC and
PIN work share one interpreter lock. More throughput on one host means more processes. The
parent does what must happen once (`server.wire`: the config checked, the database migrated,
the config loaded into the ledger), binds the listening socket, then forks N workers. Each
worker adopts the socket into its own reactor (`adoptStreamPort`); the kernel hands each new
connection to whichever worker accepts it first. A terminal keeps its connection, so it talks
to one worker until the link breaks.

What a worker does depends on the ledger's database:
- PostgreSQL: every worker answers terminals with its own database pool and its own ledger
  worker; the database serves their transactions side by side.
- SQLite, N > 1: SQLite has one writer at a time, and processes that take turns at its lock
  pay for each turn (docs/gateway.md, "The ledger process"). So worker 0 is the ledger
  process: it alone opens the ledger, and decides the frames of every other worker in the same
  groups. Workers 1..N-1 are fronts: they answer terminals' TCP (framing, bounds, logs,
  metrics) and forward each frame over a Unix socket the parent binds in a private folder
  (`LedgerSocket`, gateway/ledgerlink.py). A front whose link closes stops with status 75
  (`EXIT_LINK_LOST`) and is replaced at once: the ledger process's death is what counts
  against the restart budget. A replaced ledger process adopts the same socket, so the new
  fronts reach it. On stop, the fronts drain first and the ledger process is told last.

Fork rather than spawn, because the workers then inherit what the parent built once (config,
key store, clock, gateway) instead of migrating and loading again. That is safe only while the
parent holds no database connection, runs no thread and has no reactor: it disposes of the
engine's pool before the first fork, never starts a reactor (checked before every fork), and
only waits for its children, so forking again to replace a dead worker is as safe as the first.

Signals: SIGTERM, SIGINT or SIGHUP to the parent is forwarded as SIGTERM to every worker,
which drains as a single `vipgate serve` does (stop accepting, answer what is in flight) and
exits 0; the parent exits 0 when every worker did. Workers ignore SIGINT and SIGHUP, so a
Ctrl-C typed at a terminal, or the terminal's hang-up, which reach the whole process group, is
acted on once, through the parent. A worker that dies
unexpectedly is logged and replaced (at most `MAX_RESTARTS` in `RESTART_WINDOW_S`); the parent
then exits 1 when it stops, because a worker did not exit cleanly. A worker that stopped
because the disk failed to sync the ledger's log (exit 74) is not replaced: every worker is
stopped and the parent exits 74. On Linux a worker is told to stop when its parent dies, so an
orphan never keeps the port.

Metrics (`--metrics HOST:PORT`): the parent binds that port too and makes a folder where every
worker writes its series (prometheus_client's multiprocess mode); each worker adopts the port
and answers a scrape with the sum over all workers. When a worker is reaped its live gauges
are dropped (its counts stay); the folder is removed when the parent exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import structlog

from gateway import logs, server
from gateway.errors import BadInput
from gateway.handler import number_fallback_rrns
from gateway.ledger.db import EXIT_LOG_SYNC_FAILED
from gateway.ledgerlink import EXIT_LINK_LOST

if TYPE_CHECKING:  # prometheus_client is imported only when metrics are on
    from gateway.metrics import Metrics

log = structlog.get_logger("vipgate.workers")

MAX_WORKERS: Final = 64  # beyond this, more hosts, not more processes on one
LISTEN_BACKLOG: Final = 511  # connections the kernel queues while every worker is busy
POLL_S: Final = 0.05  # how often the parent looks for exited workers
STOP_TIMEOUT_S: Final = 60.0  # a worker still draining after this is killed
MAX_RESTARTS: Final = 5  # replacements of dead workers within RESTART_WINDOW_S, at most
RESTART_WINDOW_S: Final = 60.0
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h
LEDGER: Final = 0  # the worker number of the ledger process (SQLite, more than one worker)
LEDGER_SOCKET: Final = "ledger.sock"


def check_count(workers: int) -> int:
    """`--workers N`: refused (exit 2) unless 1 <= N <= MAX_WORKERS."""
    if not 1 <= workers <= MAX_WORKERS:
        raise BadInput(f"--workers: {workers} is outside 1-{MAX_WORKERS} worker processes")
    return workers


def bind(host: str, port: int, source: str = "--listen") -> socket.socket:
    """The listening socket the workers share, non-blocking as `adoptStreamPort` needs.
    `source` names where HOST:PORT came from, for the error: `--listen`, or the config's
    `gateway.listen`."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listening = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    except (OSError, UnicodeError) as error:  # UnicodeError: a name IDNA cannot encode
        reason = getattr(error, "strerror", None) or str(error)
        raise BadInput(f"{source}: cannot listen on {host}:{port}: {reason}") from None
    listening.setblocking(False)
    return listening


def serve(
    wiring: server.Wiring,
    listening: socket.socket,
    workers: int,
    shared: SharedMetrics | None = None,
) -> int:
    """Fork `workers` workers on `listening` (from `bind`) and supervise them until
    SIGTERM/SIGINT; the exit status. With `shared` (`--metrics HOST:PORT`, bound by the
    caller with `SharedMetrics.open` before the ledger was touched) the workers also serve
    the sum of their metrics; it is closed here. On SQLite one of the workers is the ledger
    process and the others are fronts."""
    check_count(workers)
    _whole_line_writes()
    # The workers open their own connections; none may be inherited from the parent's pool.
    wiring.engine.dispose()
    ledger: LedgerSocket | None = None
    try:
        if wiring.engine.dialect.name == "sqlite" and workers > 1:
            ledger = LedgerSocket.open()
        host, port = listening.getsockname()[:2]
        log.info(
            "workers_starting",
            workers=workers,
            host=host,
            port=port,
            pid=os.getpid(),
            ledger_process=ledger is not None,
        )
        return Supervisor(wiring, listening, workers, shared, ledger=ledger).run()
    finally:
        listening.close()
        if shared is not None:
            shared.close()
        if ledger is not None:
            ledger.close()


@dataclass(frozen=True)
class LedgerSocket:
    """On SQLite: where the fronts reach the ledger process, a Unix socket the parent binds
    in a folder of its own (mode 0700) before the first fork. The parent keeps it bound, so
    a replaced ledger process adopts the same socket and a replaced front connects to it."""

    listening: socket.socket
    directory: Path

    @classmethod
    def open(cls) -> LedgerSocket:
        folder = Path(tempfile.mkdtemp(prefix="vipgate-ledger-"))
        try:
            listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listening.bind(str(folder / LEDGER_SOCKET))
            listening.listen(LISTEN_BACKLOG)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        listening.setblocking(False)
        return cls(listening, folder)

    @property
    def path(self) -> str:
        return str(self.directory / LEDGER_SOCKET)

    def connect(self) -> socket.socket:
        """In a front: a link to the ledger process (queued until the ledger accepts it)."""
        link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            link.connect(self.path)
        except OSError:
            link.close()
            raise
        link.setblocking(False)
        return link

    def close(self) -> None:
        self.listening.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class SharedMetrics:
    """`--metrics` with several workers: the scrape socket the parent binds and every worker
    adopts, and the folder each worker writes its series to (gateway/metrics.py)."""

    listening: socket.socket
    directory: Path

    @classmethod
    def open(cls, host: str, port: int) -> SharedMetrics:
        """In the parent, before the first fork; a port that cannot be had is bad input."""
        from gateway import metrics  # noqa: PLC0415 (prometheus_client only when asked for)

        listening = metrics.bind(host, port)
        try:
            folder = Path(tempfile.mkdtemp(prefix="vipgate-metrics-"))
        except OSError:
            listening.close()
            raise
        return cls(listening, metrics.prepare_multiprocess(folder))

    def start_worker(self, reactor: Any) -> Metrics:
        """In a worker: its metrics, and scrapes answered on the shared port."""
        from gateway import metrics  # noqa: PLC0415

        return metrics.start_worker(reactor, self.listening)

    def worker_exited(self, pid: int) -> None:
        """In the parent: a reaped worker's live gauges no longer count; its counts stay."""
        from gateway import metrics  # noqa: PLC0415

        metrics.mark_worker_dead(pid, self.directory)

    def stop_accepting(self) -> None:
        """The workers hold their own copies of the port until they stop."""
        self.listening.close()

    def close(self) -> None:
        """When the parent exits: the series of this run go with it."""
        self.listening.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Supervisor:
    """The parent: forks the workers, forwards stop signals, replaces dead workers."""

    wiring: server.Wiring
    listening: socket.socket
    count: int
    metrics: SharedMetrics | None = None
    children: dict[int, int] = field(default_factory=dict)  # pid -> worker number
    stop_signal: int | None = None
    stop_deadline: float | None = None
    deaths: int = 0
    unclean_stops: int = 0
    restarts: deque[float] = field(default_factory=deque)
    log_sync_failed: bool = False
    ledger: LedgerSocket | None = None  # on SQLite: worker LEDGER owns the ledger
    ledger_told: bool = False  # the ledger process was told to stop, after every front

    def numbers(self) -> list[int]:
        """The workers' numbers: with a ledger process, LEDGER and the fronts 1..count-1."""
        if self.ledger is None:
            return list(range(1, self.count + 1))
        return [LEDGER, *range(1, self.count)]

    def run(self) -> int:
        previous = {
            signum: signal.signal(signum, self._on_stop_signal)
            for signum in STOP_SIGNALS
            if signum != signal.SIGHUP or signal.getsignal(signum) is not signal.SIG_IGN
        }  # a SIGHUP the parent was started ignoring (`nohup`) stays ignored
        try:
            for number in self.numbers():
                self._spawn(number)
            self._supervise()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self._exit_status()

    def _exit_status(self) -> int:
        clean = self.deaths == 0 and self.unclean_stops == 0
        if clean:
            log.info("workers_stopped", workers=self.count)
            return 0
        log.error(
            "workers_stopped_unclean",
            workers=self.count,
            died=self.deaths,
            unclean_stops=self.unclean_stops,
        )
        return EXIT_LOG_SYNC_FAILED if self.log_sync_failed else 1

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only noted here; the supervising loop forwards it within POLL_S.
        if self.stop_signal is None:
            self.stop_signal = signum

    def _spawn(self, number: int) -> None:
        """Fork worker `number`. Stop signals are held back across the fork, so that a worker
        is either in `children` when a stop is forwarded or has not been forked yet."""
        if "twisted.internet.reactor" in sys.modules:
            # A reactor made before the fork would be shared (its epoll set, its waker).
            raise RuntimeError("the parent of the workers must not install a reactor")
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _worker_main(
                    self.wiring, self.listening, self.metrics, number, os.getppid(), self.ledger
                )
            self.children[pid] = number
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        role = _role(number, self.ledger)
        log.info("worker_started", worker=number, pid=pid, role=role)

    def _supervise(self) -> None:
        while self.children:
            if self.stop_signal is not None and self.stop_deadline is None:
                self._forward_stop()
            if self.stop_deadline is not None and not self.ledger_told:
                self._stop_ledger_after_fronts()
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                self._kill_late_workers()
                time.sleep(POLL_S)
                continue
            number = self.children.pop(pid, None)
            if number is not None:
                self._reaped(number, pid, os.waitstatus_to_exitcode(status))

    def _forward_stop(self) -> None:
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "none"
        log.info(
            "stopping_workers",
            signal=name,
            workers=sorted(self.children.values()),
        )
        self.stop_deadline = time.monotonic() + STOP_TIMEOUT_S
        self.listening.close()  # the workers hold their own copies until they stop accepting
        if self.metrics is not None:
            self.metrics.stop_accepting()
        for pid, number in self.children.items():
            if self.ledger is None or number != LEDGER:
                _signal(pid, signal.SIGTERM)

    def _stop_ledger_after_fronts(self) -> None:
        """The ledger process stops last: once every front has drained, nothing more comes."""
        if any(number != LEDGER for number in self.children.values()):
            return
        self.ledger_told = True
        for pid in self.children:
            _signal(pid, signal.SIGTERM)

    def _kill_late_workers(self) -> None:
        if self.stop_deadline is None or time.monotonic() < self.stop_deadline:
            return
        for pid, number in self.children.items():
            log.error("worker_stop_timeout", worker=number, pid=pid, timeout_s=STOP_TIMEOUT_S)
            _signal(pid, signal.SIGKILL)
        self.stop_deadline = float("inf")  # killed once; now only reap them

    def _reaped(self, number: int, pid: int, code: int) -> None:
        """A worker ended: expected (stopping) or not (then replaced, within the budget)."""
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        if self.metrics is not None:
            self.metrics.worker_exited(pid)
        if self.stop_signal is not None:
            if code == 0:
                log.info("worker_exited", worker=number, pid=pid)
            else:
                self.unclean_stops += 1
                log.error("worker_stop_failed", worker=number, pid=pid, exit=how)
            return
        self.deaths += 1
        log.error("worker_died", worker=number, pid=pid, exit=how)
        if code == EXIT_LOG_SYNC_FAILED:
            # The disk failed to sync the ledger's log: a new worker would answer from commits
            # of unknown durability. Every worker stops, and so does the instance.
            log.error("ledger_log_sync_failed", worker=number, action="stopping every worker")
            self.log_sync_failed = True
            self.stop_signal = signal.SIGTERM
            return
        if code == EXIT_LINK_LOST:
            # A front whose ledger process ended: that death is counted against the budget
            # (and the ledger process replaced) once, not again for each of its fronts.
            self._spawn(number)
            return
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            log.error(
                "workers_failing",
                restarts=len(self.restarts),
                window_s=RESTART_WINDOW_S,
                action="stopping every worker",
            )
            self.stop_signal = signal.SIGTERM
            return
        self.restarts.append(now)
        self._spawn(number)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited already; the loop reaps it
        os.kill(pid, signum)


# --- in the worker ------------------------------------------------------------------------------


def _role(number: int, ledger: LedgerSocket | None) -> str:
    if ledger is None:
        return "worker"
    return "ledger" if number == LEDGER else "front"


def _worker_main(  # noqa: PLR0917 (one call, in `Supervisor._spawn`)
    wiring: server.Wiring,
    listening: socket.socket,
    metrics: SharedMetrics | None,
    number: int,
    parent: int,
    ledger: LedgerSocket | None = None,
) -> None:
    """A forked worker: serve on the shared socket until told to stop, then exit; never
    returns into the parent's code."""
    status = 1
    try:
        _become_worker(number, parent, _role(number, ledger))
        status = _serve_worker(wiring, listening, metrics, number, ledger)
    except BaseException:
        log.exception("worker_failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _become_worker(number: int, parent: int, role: str) -> None:
    """Signals as a worker needs them, its number on every log line, the parent watched."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards Ctrl-C as SIGTERM
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # and a hang-up, which reaches the group
    signal.signal(signal.SIGTERM, _early_stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _tag_log_lines(number, role)
    number_fallback_rrns(number)
    _stop_with_parent(parent)


_early_stop_requested: list[bool] = []


def _early_stop(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM before the reactor runs (it then installs its own handler): stop once it does."""
    _early_stop_requested.append(True)


def _serve_worker(
    wiring: server.Wiring,
    listening: socket.socket,
    metrics: SharedMetrics | None,
    number: int,
    ledger: LedgerSocket | None,
) -> int:
    # A fork-inherited pool must never be used: start from an empty one in this process.
    wiring.engine.dispose(close=False)
    from twisted.internet import reactor as installed  # noqa: PLC0415 (this process's own)

    reactor: Any = installed

    def stop_if_asked() -> None:
        if _early_stop_requested:
            reactor.stop()

    reactor.callWhenRunning(stop_if_asked)
    measured = metrics.start_worker(reactor) if metrics is not None else None
    if ledger is None:
        return server.run(wiring, ("", 0), reactor, adopt=listening, metrics=measured)
    if number == LEDGER:
        listening.close()  # terminals are the fronts' business
        return server.run_ledger(wiring, reactor, adopt=ledger.listening, metrics=measured)
    link = ledger.connect()
    ledger.listening.close()  # the ledger process's business
    return server.run_front(wiring, reactor, adopt=listening, ledger=link, metrics=measured)


def _whole_line_writes() -> None:
    """Several processes share one stdout: each log line must reach it whole, or two workers'
    lines can interleave (`print` writes the line and its newline apart). `logs.Lines`
    writes whole lines, a pipe's worth at most to a write, and writes the lines a group
    holds (`logs.together`) several to a write."""
    structlog.configure(logger_factory=logs.lines_to(sys.stdout))


def _tag_log_lines(number: int, role: str) -> None:
    """Every line a worker logs, from any thread, says which worker and process wrote it (and,
    with a ledger process, whether the worker is the ledger or a front)."""
    pid = os.getpid()

    def tag(
        _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("worker", number)
        event_dict.setdefault("pid", pid)
        if role != "worker":
            event_dict.setdefault("role", role)
        return event_dict

    processors = list(structlog.get_config()["processors"])
    structlog.configure(processors=[tag, *processors])


def _stop_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when the parent dies, so an orphan does not keep serving."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


__all__ = [
    "LEDGER",
    "MAX_WORKERS",
    "LedgerSocket",
    "SharedMetrics",
    "Supervisor",
    "bind",
    "check_count",
    "serve",
]

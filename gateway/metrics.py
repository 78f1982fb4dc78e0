"""Prometheus metrics for `vipgate serve --metrics HOST:PORT` (docs/gateway.md, Metrics).

Operators need rates, codes and latencies without reading the JSON log. One `Metrics` object
holds every series in a registry it is given; `server.run` hands it to the server, the ledger
worker and the protocol (or None, and then they do nothing at all: with metrics off the hot
path pays one `is None` test and this module, with prometheus_client, is never imported).

Label values come only from small fixed sets defined here (request kinds, request MTIs,
field 39 codes, the gateway's own reasons to close a link): a terminal controls none of them,
so neither card numbers nor anything a terminal writes can reach a label, and a hostile peer
cannot grow the number of series.

The endpoint is a twisted.web page on the same reactor as the terminals, so SIGTERM closes it
with everything else and no thread outlives the reactor. With `--workers N` the processes write
their series to files in a shared folder (prometheus_client's multiprocess mode) and the
workers serve their sum on a port the parent binds: `prepare_multiprocess`, `bind`,
`start_worker` and `mark_worker_dead` are the calls gateway/workers.py makes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    multiprocess,
    values,
)
from prometheus_client.exposition import choose_encoder
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from cardcodec.profile import FINANCIAL_MTIS, REQUESTS, Kind
from gateway.errors import BadInput
from gateway.responses import APPROVAL_CODES, RESPONSE_CODES

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# The label values a series may carry; anything else is counted under OTHER.
KINDS: Final = frozenset(kind.value for kind in Kind)
MTIS: Final = frozenset({profile.mti for profile in REQUESTS.values()} | FINANCIAL_MTIS)
CODES: Final = frozenset(RESPONSE_CODES.values()) | APPROVAL_CODES
NONE: Final = "none"  # a request the profile does not classify, or one answered by closing
OTHER: Final = "other"
CLOSED: Final = "closed"  # the code of a request answered by closing the link

# Why the gateway closed a link (the terminal closing its own is not counted here).
CloseCause = Literal[
    "idle",
    "frame_too_long",
    "frame_empty",
    "frame_rate",
    "too_many_pending",
    "too_many_connections",
    "request",
    "stopping",
]

# Seconds. Group commit puts a request's answer in the 5-300 ms range on this hardware
# (docs/gateway.md, Performance today); the buckets bracket that with room either side.
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Requests in one commit: powers of two up to the worker's bound of 64.
GROUP_SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Every series the gateway exports, and one method per thing that happens.

    Reactor thread: connections, link closes, requests in flight, answers. Ledger thread:
    groups. prometheus_client's values are thread-safe, so both may call at once.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "vipgate_requests",
            "Requests by kind, MTI and response code (field 39; 'closed': the link was closed "
            "instead of an answer)",
            ["kind", "mti", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "vipgate_request_latency_seconds",
            "Frame received to answer written, on the reactor's clock, by kind",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "vipgate_requests_in_flight",
            "Requests handed to the ledger worker and not answered yet",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.commit = Histogram(
            "vipgate_group_commit_seconds",
            "Time from taking a group to handing its answers on, commit and log sync included",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.group_size = Histogram(
            "vipgate_group_size",
            "Requests answered by one database commit (group commit)",
            buckets=GROUP_SIZE_BUCKETS,
            registry=registry,
        )
        self.connections = Gauge(
            "vipgate_connections",
            "Terminal connections open now (refused ones are not counted)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.links_closed = Counter(
            "vipgate_links_closed",
            "Links the gateway closed, by cause",
            ["cause"],
            registry=registry,
        )

    def connection_opened(self) -> None:
        self.connections.inc()

    def connection_closed(self) -> None:
        self.connections.dec()

    def link_closed(self, cause: CloseCause) -> None:
        self.links_closed.labels(cause=cause).inc()

    def request_started(self) -> None:
        self.in_flight.inc()

    def request_finished(self) -> None:
        self.in_flight.dec()

    def answered(self, event: Mapping[str, Any], latency_s: float | None) -> None:
        """One request's outcome (`Reply.event`); `latency_s` when its answer was written."""
        kind = NONE if event.get("kind") is None else _label(event.get("kind"), KINDS)
        if event.get("event") == "answered":
            mti, code = _label(event.get("mti"), MTIS), _label(event.get("code"), CODES)
        else:
            mti, code = NONE, CLOSED
        self.requests.labels(kind=kind, mti=mti, code=code).inc()
        if latency_s is not None:
            self.latency.labels(kind=kind).observe(max(0.0, latency_s))

    def group_done(self, size: int, seconds: float) -> None:
        """One group of the ledger worker: its size and the time its unit of work took."""
        self.group_size.observe(size)
        self.commit.observe(max(0.0, seconds))


def _label(value: object, allowed: frozenset[str]) -> str:
    return value if isinstance(value, str) and value in allowed else OTHER


def single_process_registry() -> CollectorRegistry:
    """A registry of the gateway's own, with the process's CPU, memory and GC series."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(GC_COLLECTOR)
    return registry


def parse_address(text: str) -> tuple[str, int]:
    """`--metrics HOST:PORT`."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise BadInput(f"--metrics: {text!r} is not HOST:PORT")
    return host, int(port)


def start(text: str) -> Metrics:
    """`vipgate serve --metrics HOST:PORT` with one process: its metrics, served on HOST:PORT
    from its reactor; the caller hands them to `server.run`.

    With `--workers N` the parent binds the port instead and each worker serves the sum
    (`prepare_multiprocess`, `bind`, `start_worker`; gateway/workers.py). The reactor is
    imported here, when it is needed (Twisted's standard)."""
    host, port = parse_address(text)
    from twisted.internet import reactor  # noqa: PLC0415

    registry = single_process_registry()
    serve(host, port, reactor, registry)
    return Metrics(registry)


# -- the endpoint ---------------------------------------------------------------------------


class MetricsPage(Resource):
    """Every path answers the registry in the text format the scraper asks for."""

    isLeaf = True  # noqa: N815 (twisted.web's name)

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:  # noqa: N802 (twisted.web's name)
        accept = request.getHeader("Accept") or ""
        encode, content_type = choose_encoder(accept)
        request.setHeader("Content-Type", content_type)  # type: ignore[no-untyped-call]
        return encode(self._registry)


# The scrape endpoint shares the terminals' reactor, so nothing a scraper sends may cost it
# more than a scrape: at most this many scrape connections at once (a scraper needs one), one
# request on each (answered, then closed: a pipelined flood is never read past its first
# request, nor its answers piled up unread), and a connection idle this long, or open this
# long at all, is closed. (Four clients that keep reconnecting can still hold every slot:
# the port belongs on a management address, docs/gateway.md.)
MAX_SCRAPE_CONNECTIONS: Final = 4
SCRAPE_IDLE_TIMEOUT_S: Final = 10
SCRAPE_CONNECTION_MAX_S: Final = 10  # open at most this long, however it trickles


class _OneScrapeChannel(HTTPChannel):
    """An HTTP connection for one scrape: its answer says `Connection: close`, and the
    connection closes once it is written; what the scraper sent after that request is not
    read. Counted by its site while open."""

    site: _ScrapeSite

    def checkPersistence(self, request: HTTPRequest, version: bytes) -> bool:  # noqa: N802
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        super().connectionMade()  # type: ignore[no-untyped-call]
        # However it trickles: a byte every few seconds restarts the idle timer, and four
        # such connections held every slot, every real scrape refused, for as long as
        # they went on.
        self._lifetime = self.callLater(  # type: ignore[no-untyped-call]
            SCRAPE_CONNECTION_MAX_S, self._expired
        )

    def _expired(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.site.open_connections -= 1
        if self._lifetime.active():
            self._lifetime.cancel()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class _ScrapeSite(Site):
    """No access log (a scrape every few seconds is not news, and the log is for terminals);
    at most `MAX_SCRAPE_CONNECTIONS` open, one scrape each."""

    # Plain HTTP/1.1 (HTTP/2 is only ever negotiated over TLS, which this port does not speak).
    protocol = _OneScrapeChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource, reactor: Any) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            resource, timeout=SCRAPE_IDLE_TIMEOUT_S, reactor=reactor
        )
        self.noisy = False
        self.open_connections = 0

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 (Twisted's name)
        if self.open_connections >= MAX_SCRAPE_CONNECTIONS:
            return None  # the connection is closed at once
        channel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        self.open_connections += 1
        return channel

    def log(self, request: HTTPRequest) -> None:
        return


def _site(registry: CollectorRegistry, reactor: Any) -> Site:
    return _ScrapeSite(MetricsPage(registry), reactor)


def _close_after_drain(reactor: Any, listening: Any) -> Any:
    """The port closes in the reactor's "during shutdown" phase, after the gateway's drain (a
    "before" trigger), so scrapes still work while the requests in flight finish."""
    reactor.addSystemEventTrigger("during", "shutdown", listening.stopListening)
    return listening


def serve(host: str, port: int, reactor: Any, registry: CollectorRegistry) -> Any:
    """Listen on HOST:PORT for scrapes; returns the listening port."""
    try:
        listening = reactor.listenTCP(port, _site(registry, reactor), interface=host)
    except CannotListenError as error:
        raise BadInput(f"--metrics: cannot listen on {host}:{port} ({error.socketError})") from None
    return _close_after_drain(reactor, listening)


def serve_on(listening: socket.socket, reactor: Any, registry: CollectorRegistry) -> Any:
    """Accept scrapes on a socket bound by another process (`bind`); returns the port."""
    port = reactor.adoptStreamPort(listening.fileno(), listening.family, _site(registry, reactor))
    listening.close()  # the port holds its own duplicate of the descriptor
    return _close_after_drain(reactor, port)


# -- several worker processes (prometheus_client's multiprocess mode) -------------------------
# The parent of `--workers N` runs no reactor and no thread (it forks). So it binds the metrics
# port and every worker adopts it, as they share the terminals' port: whichever worker accepts
# a scrape answers with the sum of every worker's files.


def prepare_multiprocess(directory: Path) -> Path:
    """In the parent, before the first worker is forked: the workers' series go to files in
    `directory` (made when missing; the files of an earlier run are removed, or their counts
    would be added to this run's).

    Sets PROMETHEUS_MULTIPROC_DIR. prometheus_client chooses where values live when it is
    imported; for workers forked from a parent that imported it already, it chooses again."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return directory


def bind(host: str, port: int) -> socket.socket:
    """In the parent: the metrics socket the workers share, non-blocking for `adoptStreamPort`.
    A port that cannot be had is bad input (exit 2), found before any worker starts."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listening = socket.create_server((host, port), family=family)
    except OSError as error:
        reason = error.strerror or str(error)
        raise BadInput(f"--metrics: cannot listen on {host}:{port}: {reason}") from None
    listening.setblocking(False)
    return listening


def start_worker(reactor: Any, listening: socket.socket) -> Metrics:
    """In a forked worker, before `server.run`: its metrics (written to the shared folder), for
    `server.run`; scrapes on the shared socket are answered with the sum over every worker."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        raise RuntimeError(f"{MULTIPROC_ENV} is not set: call prepare_multiprocess in the parent")
    if values.ValueClass is values.MutexValue:  # imported before the variable was set
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    metrics = Metrics(CollectorRegistry())
    serve_on(listening, reactor, multiprocess_registry(Path(directory)))
    return metrics


def multiprocess_registry(directory: Path) -> CollectorRegistry:
    """The sum of every process's files in `directory`."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return registry


def mark_worker_dead(pid: int, directory: Path) -> None:
    """In the parent, when a worker has exited: its live gauges (connections, in flight) stop
    counting; its counters and histograms stay in the sums."""
    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


__all__ = [
    "Metrics",
    "bind",
    "mark_worker_dead",
    "multiprocess_registry",
    "parse_address",
    "prepare_multiprocess",
    "serve",
    "serve_on",
    "start",
    "start_worker",
]

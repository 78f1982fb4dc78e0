"""Metrics (`vipgate serve --metrics HOST:PORT`): the series move as requests, declines, closed
links and connections happen, on fakes with a fresh registry per test; labels never carry card
numbers or terminal text; the multiprocess mode sums forked workers; and a real `vipgate serve`
answers a scrape over HTTP (with `--workers N`: tests/test_workers.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from gateway import metrics as gateway_metrics
from gateway.cli import main
from gateway.config import Config
from gateway.errors import BadInput
from gateway.handler import Gateway, Reply
from gateway.metrics import Metrics, MetricsPage, parse_address
from gateway.protocol import TerminalFactory, TerminalProtocol
from gateway.server import GatewayServer, GroupWorker
from tests.gateway_harness import DEMO, DIAMOND
from tests.spec_terminal import Link
from tests.test_gateway_e2e import VIPGATE, exchange, free_port, terminal_for

CARD = "6688001234567890124"
MASKED = "668800*********0124"  # as the handler writes it into an event


def answered(kind: str | None, mti: str, code: str, **extra: object) -> dict[str, object]:
    return {"event": "answered", "kind": kind, "mti": mti, "code": code, **extra}


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


class Pending:
    """A processor whose answers the test releases by hand."""

    def __init__(self) -> None:
        self.calls: list[Deferred[Reply]] = []

    def __call__(self, payload: bytes) -> Deferred[Reply]:
        deferred: Deferred[Reply] = Deferred()
        self.calls.append(deferred)
        return deferred


def connect(
    process: Callable[[bytes], Deferred[Reply]],
    metrics: Metrics | None,
    *,
    reactor: MemoryReactorClock | None = None,
    idle: float = 300,
    max_connections_per_address: int = 64,
) -> tuple[TerminalProtocol, StringTransport, MemoryReactorClock, TerminalFactory]:
    reactor = reactor or MemoryReactorClock()
    factory = TerminalFactory(
        process,
        reactor,
        idle_timeout_s=idle,
        max_pending=32,
        max_connections_per_address=max_connections_per_address,
        metrics=metrics,
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, reactor, factory


# -- the protocol's series ------------------------------------------------------------------


def test_an_approval_counts_by_kind_mti_code_and_times_on_the_reactor_clock(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Frame in at t, answer written at t + 0.04 s: one request, one latency of 0.04 s."""
    pending = Pending()
    protocol, transport, reactor, _ = connect(pending, metrics)
    protocol.dataReceived(frame(b"r"))
    reactor.advance(0.04)
    pending.calls[0].callback(Reply(b"ok", answered("redemption", "0200", "00", card=MASKED)))
    assert transport.value() == frame(b"ok")
    labels = {"kind": "redemption", "mti": "0200", "code": "00"}
    assert value(registry, "vipgate_requests_total", **labels) == 1
    latency = "vipgate_request_latency_seconds"
    assert value(registry, f"{latency}_count", kind="redemption") == 1
    assert value(registry, f"{latency}_sum", kind="redemption") == pytest.approx(0.04)
    assert value(registry, f"{latency}_bucket", kind="redemption", le="0.05") == 1
    assert value(registry, f"{latency}_bucket", kind="redemption", le="0.025") == 0


def test_declines_count_under_their_own_code(metrics: Metrics, registry: CollectorRegistry) -> None:
    """A `51` and an `A0` are separate series from the approvals."""
    protocol, _, _, _ = connect(
        lambda payload: succeed(Reply(b"no", answered("redemption", "0200", payload.decode()))),
        metrics,
    )
    protocol.dataReceived(frame(b"51") + frame(b"51") + frame(b"A0") + frame(b"00"))
    counts = {
        code: value(registry, "vipgate_requests_total", kind="redemption", mti="0200", code=code)
        for code in ("00", "51", "A0")
    }
    assert counts == {"00": 1, "51": 2, "A0": 1}


def test_a_request_answered_by_closing_counts_as_closed_and_no_latency(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """An unanswerable frame: code `closed`, a link closed for cause `request`, no latency."""
    reply = Reply(None, {"event": "closed", "reason": "unanswerable request"})
    protocol, transport, _, _ = connect(lambda payload: succeed(reply), metrics)
    protocol.dataReceived(frame(b"x"))
    assert transport.disconnecting
    closed = {"kind": "none", "mti": "none", "code": "closed"}
    assert value(registry, "vipgate_requests_total", **closed) == 1
    assert value(registry, "vipgate_links_closed_total", cause="request") == 1
    assert value(registry, "vipgate_request_latency_seconds_count", kind="none") == 0


def test_an_answer_decided_after_its_link_closed_counts_as_closed(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """An approval decided once the terminal had gone never reached it (logged `not_sent`;
    the terminal reverses the sale): it counts as `closed`, not `00`, with no latency."""
    pending = Pending()
    protocol, _, _, _ = connect(pending, metrics)
    protocol.dataReceived(frame(b"r"))
    protocol.connectionLost(None)
    pending.calls[0].callback(Reply(b"ok", answered("redemption", "0200", "00", card=MASKED)))
    assert value(registry, "vipgate_requests_total", kind="redemption", mti="0200", code="00") == 0
    closed = {"kind": "redemption", "mti": "none", "code": "closed"}
    assert value(registry, "vipgate_requests_total", **closed) == 1
    assert value(registry, "vipgate_request_latency_seconds_count", kind="redemption") == 0


def test_the_gateways_own_closes_count_by_cause(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Idle time-out and an over-long frame each count once under their cause."""
    _, idle_transport, reactor, _ = connect(Pending(), metrics, idle=10)
    reactor.advance(11)
    assert idle_transport.disconnecting
    protocol, _, _, _ = connect(Pending(), metrics)
    protocol.dataReceived((4000).to_bytes(2, "big"))
    assert value(registry, "vipgate_links_closed_total", cause="idle") == 1
    assert value(registry, "vipgate_links_closed_total", cause="frame_too_long") == 1


def test_connections_gauge_follows_open_and_lost_and_skips_refused(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Two admitted, one refused (over the per-address bound); then all lost: back to 0."""
    reactor = MemoryReactorClock()
    opened = [connect(Pending(), metrics, reactor=reactor, max_connections_per_address=2)]
    factory = opened[0][3]
    protocols = [opened[0][0]]
    for _ in range(2):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocols.append(protocol)
    assert value(registry, "vipgate_connections") == 2
    assert value(registry, "vipgate_links_closed_total", cause="too_many_connections") == 1
    for protocol in protocols:
        protocol.connectionLost(None)
    assert value(registry, "vipgate_connections") == 0


def test_labels_never_carry_card_numbers_or_terminal_values(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """An MTI, kind or code outside the profile's sets becomes `other`; the card and terminal
    in the event never reach the exposition."""
    event = answered("x" * 40, CARD[:4], CARD, terminal="EVIL<>\n", card=CARD)
    metrics.answered(event, 0.01)
    metrics.answered(answered(None, "0200", "12"), 0.01)
    text = generate_latest(registry).decode()
    assert CARD not in text and CARD[:4] + '"' not in text and "EVIL" not in text
    assert value(registry, "vipgate_requests_total", kind="other", mti="other", code="other") == 1
    assert value(registry, "vipgate_requests_total", kind="none", mti="0200", code="12") == 1


def test_without_metrics_the_protocol_answers_as_before() -> None:
    """Metrics off (None): frames are answered and nothing is measured."""
    protocol, transport, _, factory = connect(
        lambda payload: succeed(Reply(b"ok", answered("echo", "0820", "00"))), None
    )
    protocol.dataReceived(frame(b"e"))
    assert transport.value() == frame(b"ok")
    assert factory.metrics is None


# -- the ledger worker and the server ---------------------------------------------------------


class ThreadReactor(MemoryReactorClock):
    """A memory reactor that also takes calls from other threads, run when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.from_threads: list[tuple[Callable[..., object], tuple[Any, ...]]] = []

    def callFromThread(self, call: Callable[..., object], *args: Any) -> None:
        with self._lock:
            self.from_threads.append((call, args))

    def run_thread_calls(self) -> None:
        with self._lock:
            calls, self.from_threads = self.from_threads, []
        for call, args in calls:
            call(*args)


def test_group_worker_times_each_group_and_records_its_size(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Three requests waiting when the worker starts: one group of 3, one commit timed."""
    reactor = ThreadReactor()

    def handle_group(payloads: list[bytes]) -> list[Reply]:
        time.sleep(0.01)
        return [Reply(b"ok", answered("echo", "0820", "00")) for _ in payloads]

    worker = GroupWorker(handle_group, reactor, metrics)
    for payload in (b"a", b"b", b"c"):
        worker.submit(payload)
    worker.start()
    worker.stop()
    assert value(registry, "vipgate_group_size_count") == 1
    assert value(registry, "vipgate_group_size_sum") == 3
    assert value(registry, "vipgate_group_size_bucket", le="2.0") == 0
    assert value(registry, "vipgate_group_commit_seconds_count") == 1
    assert value(registry, "vipgate_group_commit_seconds_sum") >= 0.01


def test_a_failed_group_is_still_timed(metrics: Metrics, registry: CollectorRegistry) -> None:
    """A group whose unit of work raises counts its size and time like any other."""

    def broken(payloads: list[bytes]) -> list[Reply]:
        raise RuntimeError("boom")

    worker = GroupWorker(broken, ThreadReactor(), metrics)
    worker.submit(b"a")
    worker.start()
    worker.stop()
    assert value(registry, "vipgate_group_commit_seconds_count") == 1


def fake_config() -> Config:
    limits = SimpleNamespace(
        idle_timeout_s=300,
        max_pending_per_connection=32,
        max_connections_per_address=64,
        max_frames_per_second_per_terminal=50,
        max_unnamed_frames_per_second=50,
    )
    return cast(Config, SimpleNamespace(gateway=limits))


def test_server_counts_requests_in_flight_until_answered(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Two requests handed to the worker are in flight until their answers reach the reactor."""
    gateway = SimpleNamespace(
        prepare_group=lambda payloads: payloads,
        decide_prepared=lambda payloads: (
            [Reply(b"ok", answered("echo", "0820", "00"))] * len(payloads)
        ),
        holding_connection=nullcontext,
    )
    reactor = ThreadReactor()
    gatewayserver = GatewayServer(cast(Gateway, gateway), reactor, fake_config(), metrics=metrics)
    assert gatewayserver.factory.metrics is metrics
    answers = [gatewayserver.process(b"a"), gatewayserver.process(b"b")]
    assert value(registry, "vipgate_requests_in_flight") == 2
    gatewayserver.listen("127.0.0.1", 0)
    deadline = time.monotonic() + 10
    while len(reactor.from_threads) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    reactor.run_thread_calls()
    assert all(answer.called for answer in answers)
    assert value(registry, "vipgate_requests_in_flight") == 0
    gatewayserver.stop()


def test_server_measures_only_the_metrics_it_is_given(metrics: Metrics) -> None:
    """Metrics reach the server as an argument (`server.run(metrics=...)`), nothing
    process-wide: without them the protocol measures nothing."""
    gateway = cast(
        Gateway,
        SimpleNamespace(
            prepare_group=list, decide_prepared=lambda payloads: [], holding_connection=nullcontext
        ),
    )
    assert GatewayServer(gateway, MemoryReactorClock(), fake_config()).factory.metrics is None
    served = GatewayServer(gateway, MemoryReactorClock(), fake_config(), metrics=metrics)
    assert served.factory.metrics is metrics


# -- the endpoint ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["9100", "host:", "host:99999", ":1", "localhost:port"])
def test_metrics_address_is_host_and_port(text: str) -> None:
    """--metrics HOST:PORT; anything else is bad input naming --metrics."""
    with pytest.raises(BadInput, match="--metrics"):
        parse_address(text)
    assert parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)


def test_serve_refuses_a_bad_metrics_address_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`vipgate serve --metrics nonsense` exits 2 before anything is served."""
    assert main(["serve", "--config", str(DEMO), "--metrics", "nonsense"]) == 2
    assert "--metrics" in capsys.readouterr().err


def test_page_answers_the_registry_as_prometheus_text(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """GET renders the registry with Prometheus' content type."""
    metrics.answered(answered("sign-on", "0800", "00"), 0.002)
    request = DummyRequest([b"metrics"])
    body = MetricsPage(registry).render_GET(request)  # type: ignore[arg-type]
    assert b'vipgate_requests_total{code="00",kind="sign-on",mti="0800"} 1.0' in body
    content_type = request.responseHeaders.getRawHeaders(b"content-type")
    assert content_type is not None and content_type[0].startswith(b"text/plain")


def test_endpoint_listens_and_closes_after_the_drain(registry: CollectorRegistry) -> None:
    """The port is opened on the given interface and closed in the "during shutdown" phase,
    after the gateway's "before" drain."""
    reactor = MemoryReactorClock()
    gateway_metrics.serve("127.0.0.1", 9464, reactor, registry)
    port, _, _, interface = reactor.tcpServers[0]
    assert (port, interface) == (9464, "127.0.0.1")
    assert len(reactor.triggers["during"]["shutdown"]) == 1


def _scrape_site(registry: CollectorRegistry) -> tuple[Any, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    gateway_metrics.serve("127.0.0.1", 9464, reactor, registry)
    return reactor.tcpServers[0][1], reactor


def _scrape_connection(site: Any) -> tuple[Any, StringTransport]:
    channel = site.buildProtocol(None)
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n"


def test_a_pipelined_flood_of_scrapes_gets_one_answer_and_the_connection_closed(
    registry: CollectorRegistry,
) -> None:
    """The endpoint shares the terminals' reactor: a scraper that sends a thousand requests
    in one write and reads nothing gets one answer (`Connection: close`), and the rest is
    never read. Before, each was answered and its answer piled up unread, holding the
    reactor for seconds and the process's memory without bound."""
    site, _ = _scrape_site(registry)
    channel, transport = _scrape_connection(site)
    channel.dataReceived(SCRAPE * 1000)
    written = transport.value()
    assert written.count(b"HTTP/1.1 200") == 1
    assert b"\r\nConnection: close\r\n" in written
    assert transport.disconnecting


def test_scrape_connections_are_bounded_and_an_idle_one_is_closed(
    registry: CollectorRegistry,
) -> None:
    """At most `MAX_SCRAPE_CONNECTIONS` open at once (one more is closed at once, and can
    connect again once one has gone); one that sends nothing is closed after
    `SCRAPE_IDLE_TIMEOUT_S`."""
    site, reactor = _scrape_site(registry)
    held = [_scrape_connection(site) for _ in range(gateway_metrics.MAX_SCRAPE_CONNECTIONS)]
    assert site.buildProtocol(None) is None
    channel, transport = held[0]
    reactor.advance(gateway_metrics.SCRAPE_IDLE_TIMEOUT_S - 1)
    assert not transport.disconnecting
    reactor.advance(1)
    assert transport.disconnecting
    channel.connectionLost(Failure(ConnectionDone()))
    assert site.buildProtocol(None) is not None


def test_a_scrape_connection_that_trickles_is_closed_all_the_same(
    registry: CollectorRegistry,
) -> None:
    """A byte every few seconds restarts the idle timer, never finishing a request: the
    connection is cut `SCRAPE_CONNECTION_MAX_S` after it opened all the same, so four of them
    cannot hold every slot, and every real scrape refused, for as long as they go on."""
    site, reactor = _scrape_site(registry)
    channel, transport = _scrape_connection(site)
    for byte in b"GET /metr":
        channel.dataReceived(bytes([byte]))
        reactor.advance(1)
    assert not transport.disconnecting
    reactor.advance(gateway_metrics.SCRAPE_CONNECTION_MAX_S - 9)
    assert transport.disconnected  # aborted (the idle timer alone would wait on)
    channel.connectionLost(Failure(ConnectionDone()))
    assert site.open_connections == 0


def test_endpoint_port_in_use_is_bad_input(registry: CollectorRegistry) -> None:
    """A port that cannot be had is bad input naming --metrics (exit 2)."""

    class Busy(MemoryReactorClock):
        def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            raise CannotListenError(interface, port, OSError("in use"))

    with pytest.raises(BadInput, match="--metrics"):
        gateway_metrics.serve("127.0.0.1", 9464, Busy(), registry)


def test_a_busy_metrics_port_for_the_workers_is_bad_input() -> None:
    """The parent of `--workers N` binds the metrics port before forking: one already taken is
    bad input naming --metrics (exit 2)."""
    taken = gateway_metrics.bind("127.0.0.1", 0)
    try:
        with pytest.raises(BadInput, match="--metrics"):
            gateway_metrics.bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_metrics_port_is_refused_before_the_ledger_is_touched(
    tmp_path: Path, workers: str
) -> None:
    """`serve --metrics` on a port another program holds: exit 2, one line naming
    --metrics, and no ledger made or loaded, with one process as with several. With
    several, the port was bound only after the config's load, whose terminal and merchant
    switches every running instance follows."""
    config = tmp_path / "demo.toml"
    shutil.copy(DEMO, config)
    ledger = tmp_path / "ledger.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        command = [str(VIPGATE), "serve", "--config", str(config), "--workers", workers]
        command += ["--db", f"sqlite:///{ledger}", "--listen", f"127.0.0.1:{free_port()}"]
        command += ["--metrics", f"127.0.0.1:{busy}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"vipgate: error: --metrics: cannot listen on 127.0.0.1:{busy}")
    assert not ledger.exists()


# -- several worker processes -----------------------------------------------------------------

# Run in its own interpreter: multiprocess mode changes process-wide state (an environment
# variable, prometheus_client's value class). It makes gateway/workers.py's calls in their
# order: imports first, prepares the folder, binds, forks two workers that each record and
# serve the sum (tests/test_workers.py runs the real `vipgate serve --workers 2 --metrics`).
MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time, urllib.request
    from pathlib import Path
    from gateway import metrics

    directory = metrics.prepare_multiprocess(Path(sys.argv[1]))
    Path(sys.argv[1] + "-ready").mkdir()
    listening = metrics.bind("127.0.0.1", 0)
    port = listening.getsockname()[1]
    pids = []
    for number in range(2):
        pid = os.fork()
        if pid == 0:
            from twisted.internet import reactor
            mine = metrics.start_worker(reactor, listening)
            mine.connection_opened()
            mine.answered({"event": "answered", "kind": "redemption", "mti": "0200",
                           "code": "00"}, 0.01)
            # SIGTERM is the reactor's once it runs (before, it would kill the child).
            ready = Path(sys.argv[1] + "-ready") / str(os.getpid())
            reactor.callWhenRunning(ready.touch)
            reactor.run()
            os._exit(0)
        pids.append(pid)
    listening.close()

    def scrape():
        url = f"http://127.0.0.1:{port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    deadline = time.monotonic() + 20
    text = ""
    while time.monotonic() < deadline:
        try:
            text = scrape()
        except OSError:
            text = ""
        if 'vipgate_requests_total{code="00",kind="redemption",mti="0200"} 2.0' in text:
            break
        time.sleep(0.1)
    print("SCRAPE-WHILE-RUNNING")
    print(text)
    ready = Path(sys.argv[1] + "-ready")
    while time.monotonic() < deadline + 20 and len(list(ready.iterdir())) < 2:
        time.sleep(0.05)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        print("EXIT", os.waitstatus_to_exitcode(status))
        metrics.mark_worker_dead(pid, directory)
    summed = metrics.multiprocess_registry(directory)
    print("AFTER", summed.get_sample_value("vipgate_connections"),
          summed.get_sample_value("vipgate_requests_total",
                                  {"kind": "redemption", "mti": "0200", "code": "00"}))
    """
)


def test_forked_workers_serve_the_sum_of_every_worker(tmp_path: Path) -> None:
    """Two forked workers each record a redemption and a connection; a scrape of the shared
    port shows 2 of each; once they exit and are marked dead, the live gauge is gone and the
    counts stay."""
    script = tmp_path / "multiprocess.py"
    script.write_text(MULTIPROCESS_SCRIPT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != gateway_metrics.MULTIPROC_ENV}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "prom")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert 'vipgate_requests_total{code="00",kind="redemption",mti="0200"} 2.0' in out, out
    assert "vipgate_connections 2.0" in out
    assert out.count("EXIT 0") == 2
    assert "AFTER None 2.0" in out  # no live worker: no connections sample; the counts stay


# -- end to end -----------------------------------------------------------------------------


@pytest.fixture
def served_with_metrics(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """`vipgate serve --metrics` on a copy of the demo config and a SQLite ledger."""
    config = tmp_path / "demo.toml"
    shutil.copy(DEMO, config)
    port, metrics_port = free_port(), free_port()
    command = [str(VIPGATE), "serve", "--config", str(config)]
    command += ["--db", f"sqlite:///{tmp_path / 'ledger.db'}"]
    command += ["--listen", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{metrics_port}"]
    command += ["--clock", "2026-11-21T11:00:00+08:00"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if '"listening"' in line:
            break
    assert any('"listening"' in line for line in lines), "".join(lines)
    yield process, port, metrics_port
    if process.poll() is None:
        process.kill()
        process.wait()


def scrape(port: int) -> dict[str, float]:
    """The samples of one scrape, by their name and labels as written."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text: str = answer.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


def test_serve_with_metrics_answers_a_scrape_with_the_traffic_it_saw(
    served_with_metrics: tuple[subprocess.Popen[str], int, int],
) -> None:
    """A sign-on and a redemption over TCP, then a scrape: both counted by kind, MTI and code,
    both timed, one connection open, nothing in flight; SIGTERM still exits 0."""
    process, port, metrics_port = served_with_metrics
    link = Link("127.0.0.1", port)
    terminal = terminal_for("10000001")
    signed_on = exchange(link, terminal, terminal.sign_on(with_tdk=True))
    assert signed_on.code == "00"
    terminal.adopt_sign_on(signed_on)
    card = terminal.card_fields(DIAMOND, "2906", encrypt_track_data=True)
    request = terminal.financial("0200", "000000", "22", card, amount_fen=12800)
    assert exchange(link, terminal, request).code == "00"
    samples = scrape(metrics_port)
    assert samples['vipgate_requests_total{code="00",kind="sign-on",mti="0800"}'] == 1
    assert samples['vipgate_requests_total{code="00",kind="redemption",mti="0200"}'] == 1
    for kind in ("sign-on", "redemption"):
        assert samples[f'vipgate_request_latency_seconds_count{{kind="{kind}"}}'] == 1
        assert 0 < samples[f'vipgate_request_latency_seconds_sum{{kind="{kind}"}}'] < 10
    assert samples["vipgate_connections"] == 1
    assert samples["vipgate_requests_in_flight"] == 0
    assert samples["vipgate_group_size_sum"] == 2
    assert samples["vipgate_group_commit_seconds_count"] == samples["vipgate_group_size_count"]
    assert "process_cpu_seconds_total" in samples
    assert not any(DIAMOND in name for name in samples)
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=30) as flood:
        flood.sendall(SCRAPE * 200)  # pipelined: one answer, then the connection closes
        answered = b"".join(iter(lambda: flood.recv(65536), b""))
    assert answered.count(b"HTTP/1.1 200") == 1
    balance = terminal.financial("0200", "310000", "01", card)
    assert exchange(link, terminal, balance).code == "00"  # the terminal's link is served
    link.close()
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    assert process.returncode == 0

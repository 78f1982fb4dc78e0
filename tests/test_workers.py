"""`vipgate serve --workers N` as real processes on loopback: one port shared by the workers
that answer terminals (on PostgreSQL all N; on SQLite N - 1 fronts, the other worker being the
ledger process they forward to); SIGTERM drains them all and exits 0; a killed worker, front or
ledger process, is replaced and reported; a bad N is refused naming --workers; with
`--metrics` every scrape of the one metrics port answers the sum over the workers. Everything
the processes write is scanned for card data (tests/logscan.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.cli import main
from gateway.ledger.db import EXIT_LOG_SYNC_FAILED
from gateway.ledgerlink import EXIT_LINK_LOST
from gateway.metrics import MULTIPROC_ENV
from gateway.workers import MAX_WORKERS, Supervisor
from tests import pg
from tests.conftest import skip_without
from tests.gateway_harness import DEMO, DIAMOND, GOLD_PIN
from tests.logscan import LeakWatch
from tests.spec_terminal import Link
from tests.test_gateway_e2e import CTRL_C_AS_USUAL, VIPGATE, exchange, free_port, terminal_for
from tests.test_metrics import scrape

START_TIMEOUT_S = 60.0
WAIT_S = 20.0
SIGN_ONS = 'vipgate_requests_total{code="00",kind="sign-on",mti="0800"}'
SCRAPES = 8  # each is a fresh race between the workers for the metrics port


def answering(database: str, count: int) -> int:
    """How many of `--workers count` answer terminals: on SQLite one is the ledger process."""
    return count - 1 if database.startswith("sqlite") and count > 1 else count


def workers_for(database: str, answering_workers: int) -> int:
    """The `--workers` count that has `answering_workers` workers answering terminals."""
    return answering_workers + 1 if database.startswith("sqlite") else answering_workers


class Workers:
    """`vipgate serve --workers N` with its JSON log lines collected as they come; its
    temporary files (the metrics folder) under `tmp`."""

    def __init__(
        self, folder: Path, database: str, count: int, metrics_port: int | None = None
    ) -> None:
        self.answering = answering(database, count)
        self.ledger_process = self.answering != count
        config = folder / "demo.toml"
        shutil.copy(DEMO, config)
        self.port = free_port()
        self.metrics_port = metrics_port
        # Ctrl-C and a hang-up as a login session has them, whatever the test run inherited.
        command = [str(VIPGATE.parent / "python"), "-c", CTRL_C_AS_USUAL, "serve"]
        command += ["--config", str(config), "--db", database]
        command += ["--listen", f"127.0.0.1:{self.port}", "--workers", str(count)]
        command += ["--clock", "2026-11-21T11:00:00+08:00"]
        if metrics_port is not None:
            command += ["--metrics", f"127.0.0.1:{metrics_port}"]
        self.tmp = folder / "tmp"
        self.tmp.mkdir()
        env = {name: value for name, value in os.environ.items() if name != MULTIPROC_ENV}
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, "TMPDIR": str(self.tmp)},
            start_new_session=True,  # its own process group, as a login session's job is
        )
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.raw.append(line)
                if line.startswith("{"):
                    self.events.append(json.loads(line))

    def named(self, event: str) -> list[dict[str, Any]]:
        with self._lock:
            return [entry for entry in self.events if entry.get("event") == event]

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self._reader.join(timeout=5)
                pytest.fail("condition not met; the log:\n" + "".join(self.raw[-40:]))
            time.sleep(0.02)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)

    def output(self) -> str:
        with self._lock:
            return "".join(self.raw)

    def sign_on_at_each_worker(self) -> int:
        """A sign-on on a new connection answered by each worker that answers terminals, in
        turn: the others are stopped (SIGSTOP) meanwhile, so the connection can only be the
        one worker's. Which idle worker the kernel wakes first is not the test's business, and
        a worker that has logged `listening` may not be waiting on the port yet. The count of
        sign-ons."""
        pids = {entry["worker"]: entry["pid"] for entry in self.named("listening")}
        assert len(pids) == self.answering, f"listening: {pids}"
        for number in sorted(pids):
            others = [pid for worker, pid in pids.items() if worker != number]
            for pid in others:
                os.kill(pid, signal.SIGSTOP)
            try:
                link = Link("127.0.0.1", self.port)
                sign_on(link)
                link.close()
            finally:
                for pid in others:
                    os.kill(pid, signal.SIGCONT)
            self.wait_for(partial(self.has_answered, number))
        return len(pids)

    def has_answered(self, worker: int) -> bool:
        return any(entry["worker"] == worker for entry in self.named("answered"))

    def scrape_until(self, expected: Mapping[str, float]) -> dict[str, float]:
        """Scrape until the samples named in `expected` have those values (a closed link is
        counted when its worker notices); the last scrape."""
        assert self.metrics_port is not None
        samples: dict[str, float] = {}

        def matches() -> bool:
            nonlocal samples
            samples = scrape(self.metrics_port or 0)
            return all(samples.get(name) == value for name, value in expected.items())

        self.wait_for(matches)
        return samples


StartWorkers = Callable[..., Workers]


@pytest.fixture
def start_workers(tmp_path: Path, leak_watch: LeakWatch) -> Iterator[StartWorkers]:
    """Start `vipgate serve --workers N` and wait until every worker listens; at the end kill
    what still runs and hand everything it wrote to the scan for card data."""
    started: list[Workers] = []

    def start(database: str, count: int, metrics_port: int | None = None) -> Workers:
        served = Workers(tmp_path, database, count, metrics_port)
        started.append(served)
        ledgers = 1 if served.ledger_process else 0

        def listening() -> bool:
            fronts = len(served.named("listening")) >= served.answering
            return fronts and len(served.named("ledger_listening")) >= ledgers

        served.wait_for(listening, START_TIMEOUT_S)
        return served

    yield start
    for served in started:
        served.kill()
        leak_watch.text("vipgate serve --workers output", served.output())


@pytest.fixture
def two_workers(ledger_url: str, start_workers: StartWorkers) -> Workers:
    """Two workers answering terminals (on SQLite, with the ledger process: `--workers 3`)."""
    return start_workers(ledger_url, workers_for(ledger_url, 2))


def sign_on(link: Link, terminal_id: str = "10000001") -> None:
    terminal = terminal_for(terminal_id)
    request = terminal.sign_on()
    assert terminal.check(request, link.exchange(request)).code == "00"


def test_two_workers_share_the_port_answer_terminals_and_drain_on_sigterm(
    two_workers: Workers,
) -> None:
    """Connections reach both workers and each answers; SIGTERM to the parent: every worker
    drains (stops accepting, closes its links once nothing is in flight) and the parent exits 0."""
    pids = {entry["pid"] for entry in two_workers.named("listening")}
    assert len(pids) == 2 and os.getpid() not in pids
    two_workers.sign_on_at_each_worker()
    answering = {entry["worker"] for entry in two_workers.named("answered")}
    assert answering == {1, 2}, f"only worker(s) {answering} accepted connections"
    held = Link("127.0.0.1", two_workers.port)
    sign_on(held, "10000002")
    assert two_workers.stop() == 0
    assert held.socket.recv(100) == b"", "a drained worker closes its idle links"
    held.close()
    every = {0, 1, 2} if two_workers.ledger_process else {1, 2}
    assert {entry["worker"] for entry in two_workers.named("stopping")} == every
    assert {entry["worker"] for entry in two_workers.named("worker_exited")} == every
    assert len(two_workers.named("workers_stopped")) == 1
    if two_workers.ledger_process:  # the ledger process stops last, after every front
        exits = [entry["worker"] for entry in two_workers.named("worker_exited")]
        assert exits[-1] == 0


def test_a_hang_up_to_the_whole_group_drains_once_and_exits_0(
    tmp_path: Path, start_workers: StartWorkers
) -> None:
    """SIGHUP to the process group (the operator's terminal or SSH session gone: the kernel
    hangs up every process of the job): the workers ignore it, the parent forwards it once
    as SIGTERM, and every worker drains and exits 0. By default it killed every process at
    once, a worker mid-request with its committed approvals unanswered."""
    served = start_workers(f"sqlite:///{tmp_path / 'ledger.db'}", 2)
    link = Link("127.0.0.1", served.port)
    sign_on(link)
    os.killpg(served.process.pid, signal.SIGHUP)
    assert served.process.wait(timeout=60) == 0
    served.kill()  # joins the reader
    assert link.socket.recv(100) == b""
    link.close()
    assert {entry["worker"] for entry in served.named("worker_exited")} == {0, 1}
    assert len(served.named("workers_stopped")) == 1


def test_sigterm_to_the_whole_group_drains_the_fronts_before_the_ledger_process_stops(
    tmp_path: Path, start_workers: StartWorkers
) -> None:
    """SIGTERM to every process at once (`pkill vipgate`, a service manager without
    KillMode=mixed): the ledger process waits until its fronts have drained and let go of
    their links before it stops, so the requests they have in flight are decided and
    answered; every worker exits 0 and so does the parent. The ledger process stopped at
    once, and the fronts, finding their link gone mid-drain, closed their terminals' links
    and exited 75."""
    served = start_workers(f"sqlite:///{tmp_path / 'ledger.db'}", 3)
    links = [Link("127.0.0.1", served.port) for _ in range(4)]
    for link in links:
        sign_on(link)
    os.killpg(served.process.pid, signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    served.kill()  # joins the reader
    for link in links:
        assert link.socket.recv(100) == b""
        link.close()
    assert not served.named("worker_stop_failed")  # no front found its link gone (75)
    exits = [entry["worker"] for entry in served.named("worker_exited")]
    assert sorted(exits) == [0, 1, 2]


def test_the_ledger_process_answers_a_fronts_terminal_with_macd_answers(
    tmp_path: Path, start_workers: StartWorkers
) -> None:
    """SQLite, `--workers 2`: the ledger process and one front. A terminal's balance inquiry
    and redemption through the front come back decided, encoded and MAC'd by the ledger
    process (the terminal checks each answer's MAC), logged by the front."""
    served = start_workers(f"sqlite:///{tmp_path / 'ledger.db'}", 2)
    link = Link("127.0.0.1", served.port)
    terminal = terminal_for("10000001")
    signed_on = exchange(link, terminal, terminal.sign_on())
    terminal.adopt_sign_on(signed_on)
    pin_card = terminal.card_fields(GOLD_PIN, "2812", pin="123456")
    balance = exchange(link, terminal, terminal.financial("0200", "310000", "01", pin_card))
    assert (balance.code, balance.balance) == ("00", 100000)
    card = terminal.card_fields(DIAMOND, "2906")
    request = terminal.financial("0200", "000000", "22", card, amount_fen=12800)
    redemption = exchange(link, terminal, request)
    assert (redemption.code, redemption.points) == ("00", 5760)
    assert 64 in redemption.fields
    assert link.exchange(request) == redemption.payload, "a repeat gets the stored answer"
    link.close()
    assert served.stop() == 0
    answered = served.named("answered")
    assert [entry["code"] for entry in answered] == ["00"] * 4
    assert {entry["role"] for entry in answered} == {"front"}


def test_two_workers_serve_the_sum_of_their_metrics_on_one_port(
    ledger_url: str, start_workers: StartWorkers
) -> None:
    """`--workers 2 --metrics`: sign-ons answered by both workers; every scrape of the one
    metrics port, whichever worker takes it, counts all of them, the one link still open and
    nothing in flight; SIGTERM exits 0 and removes the workers' metrics folder."""
    served = start_workers(ledger_url, workers_for(ledger_url, 2), metrics_port=free_port())
    folders = list(served.tmp.glob("vipgate-metrics-*"))
    assert len(folders) == 1 and any(folders[0].glob("*.db")), "the workers write their series"
    sent = served.sign_on_at_each_worker()
    held = Link("127.0.0.1", served.port)
    sign_on(held, "10000002")
    sent += 1
    served.wait_for(lambda: len(served.named("answered")) == sent)
    per_worker = Counter(entry["worker"] for entry in served.named("answered"))
    assert set(per_worker) == {1, 2}, f"only worker(s) {set(per_worker)} answered"
    expected = {SIGN_ONS: sent, "vipgate_connections": 1, "vipgate_requests_in_flight": 0}
    served.scrape_until(expected)
    for _ in range(SCRAPES):
        samples = scrape(served.metrics_port or 0)
        assert {name: samples.get(name) for name in expected} == expected
        assert samples['vipgate_request_latency_seconds_count{kind="sign-on"}'] == sent
        assert samples["vipgate_group_size_sum"] == sent
    held.close()
    assert served.stop() == 0
    assert not folders[0].exists(), "the metrics folder goes when the parent exits"


def test_a_killed_worker_is_replaced_and_the_parent_exits_1(
    tmp_path: Path, start_workers: StartWorkers
) -> None:
    """SIGKILL to the worker holding a terminal's link: logged as died, a new worker listens,
    terminals still get answers; the metrics keep the dead worker's counts but not its open
    link; the parent's exit status then says a worker did not exit cleanly."""
    database = f"sqlite:///{tmp_path / 'ledger.db'}"
    served = start_workers(database, workers_for(database, 2), metrics_port=free_port())
    held = Link("127.0.0.1", served.port)
    sign_on(held)
    served.wait_for(lambda: len(served.named("answered")) == 1)
    victim = served.named("answered")[0]
    served.scrape_until({SIGN_ONS: 1, "vipgate_connections": 1})
    os.kill(victim["pid"], signal.SIGKILL)
    served.wait_for(lambda: len(served.named("listening")) == 3)
    died = served.named("worker_died")
    assert [(e["worker"], e["pid"], e["exit"]) for e in died] == [
        (victim["worker"], victim["pid"], "signal SIGKILL")
    ]
    held.close()
    served.scrape_until({SIGN_ONS: 1, "vipgate_connections": 0})
    for _ in range(4):
        link = Link("127.0.0.1", served.port)
        sign_on(link)
        link.close()
    served.scrape_until({SIGN_ONS: 5, "vipgate_connections": 0})
    assert served.stop() == 1
    assert served.named("workers_stopped_unclean")[0]["died"] == 1


def test_a_killed_ledger_process_is_replaced_and_its_fronts_start_again(
    tmp_path: Path, start_workers: StartWorkers
) -> None:
    """SQLite: SIGKILL to the ledger process. Each front notices its link closed, closes its
    terminals' links and exits 75; the parent replaces the ledger process and the fronts (only
    the ledger's death spends the restart budget), and terminals are answered again from the
    same ledger; the parent then exits 1."""
    served = start_workers(f"sqlite:///{tmp_path / 'ledger.db'}", 3)
    held = Link("127.0.0.1", served.port)
    sign_on(held)
    ledger = [e for e in served.named("worker_started") if e.get("role") == "ledger"]
    assert [entry["worker"] for entry in ledger] == [0]
    os.kill(ledger[0]["pid"], signal.SIGKILL)
    served.wait_for(lambda: len(served.named("ledger_link_lost")) == 2)
    assert held.socket.recv(100) == b"", "a front without its ledger closes its links"
    held.close()
    served.wait_for(
        lambda: len(served.named("ledger_listening")) == 2 and len(served.named("listening")) == 4
    )
    died = {(entry["worker"], entry["exit"]) for entry in served.named("worker_died")}
    assert died == {(0, "signal SIGKILL"), (1, "status 75"), (2, "status 75")}
    link = Link("127.0.0.1", served.port)
    sign_on(link, "10000002")
    link.close()
    assert served.stop() == 1
    assert served.named("workers_stopped_unclean")[0]["died"] == 3


@pytest.mark.parametrize("count", [0, -1, MAX_WORKERS + 1])
def test_a_worker_count_out_of_range_is_refused(
    count: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """--workers outside 1..MAX_WORKERS: exit 2, one line naming --workers, nothing served."""
    assert main(["serve", "--workers", str(count), "--config", "/nonexistent.toml"]) == 2
    error = capsys.readouterr().err
    assert "--workers" in error and str(count) in error


def test_record_with_several_workers_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One traffic log cannot be written by several processes: refused, naming --record."""
    record = tmp_path / "traffic.jsonl"
    assert main(["serve", "--workers", "2", "--record", str(record)]) == 2
    assert "--record" in capsys.readouterr().err
    assert not record.exists()


def test_a_worker_whose_log_sync_failed_is_not_replaced_and_every_worker_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exit 74 (`EXIT_LOG_SYNC_FAILED`): a new worker would answer from commits of unknown
    durability, so none is forked, the others are told to stop, and the parent exits 74."""
    supervisor = Supervisor(cast(Any, None), cast(Any, None), 2, children={11: 1, 12: 2})

    def no_fork(number: int) -> None:
        raise AssertionError(f"worker {number} was replaced")

    monkeypatch.setattr(supervisor, "_spawn", no_fork)
    supervisor._reaped(1, 10, EXIT_LOG_SYNC_FAILED)
    assert supervisor.stop_signal == signal.SIGTERM  # the loop forwards it to the others
    supervisor._reaped(2, 12, 0)  # the other worker drains and exits 0
    assert supervisor._exit_status() == EXIT_LOG_SYNC_FAILED


def test_a_front_that_lost_its_ledger_process_is_replaced_outside_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exit 75 (`EXIT_LINK_LOST`): the front is replaced at once, and only the ledger process's
    own death spends the restart budget, so a ledger crash never stops an instance of many
    fronts on its own; the exit status still says workers died."""
    supervisor = Supervisor(cast(Any, None), cast(Any, None), 8)
    forked: list[int] = []
    monkeypatch.setattr(supervisor, "_spawn", forked.append)
    supervisor._reaped(0, 10, -signal.SIGKILL)
    for front in range(1, 8):
        supervisor._reaped(front, 10 + front, EXIT_LINK_LOST)
    assert forked == list(range(8)) and supervisor.stop_signal is None
    assert len(supervisor.restarts) == 1
    assert supervisor._exit_status() == 1


def test_a_worker_that_died_otherwise_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor = Supervisor(cast(Any, None), cast(Any, None), 2)
    forked: list[int] = []
    monkeypatch.setattr(supervisor, "_spawn", forked.append)
    supervisor._reaped(1, 10, 1)
    assert forked == [1] and supervisor.stop_signal is None
    assert supervisor._exit_status() == 1


def test_a_worker_replaced_while_postgresql_is_away_starts_and_serves_when_it_returns(
    start_workers: StartWorkers,
) -> None:
    """PostgreSQL stopped (a restart, a failover), then a worker killed: its replacement
    starts without the server, the gateway answers `96` meanwhile, and both workers answer
    `00` once the server is back. The replacement used to stop at once (it opened its WAL
    flush connection at start), five times within a second, and the parent then stopped
    every worker and exited 1: one crash during an outage took the gateway off the air."""
    skip_without(pg.missing_binaries())
    server = pg.start()
    try:
        database = server.create_database("replaced")
        served = start_workers(database, 2)
        victim = served.named("listening")[0]
        pg.pause(server)
        os.kill(victim["pid"], signal.SIGKILL)
        served.wait_for(lambda: len(served.named("listening")) == 3)
        link = Link("127.0.0.1", served.port)
        terminal = terminal_for("10000001")
        assert exchange(link, terminal, terminal.sign_on()).code == "96"
        link.close()
        time.sleep(1.0)  # the replacement outlives its start
        assert served.named("worker_failed") == []
        assert served.process.poll() is None
        pg.resume(server)
        assert served.sign_on_at_each_worker() == 2
        assert served.stop() == 1  # a worker was killed
        assert served.named("workers_stopped_unclean")[0]["died"] == 1
    finally:
        pg.stop(server)

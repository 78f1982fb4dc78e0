"""`vipgate serve --workers N` as real processes on loopback: one port shared by N workers,
each answering terminals; SIGTERM drains them all and exits 0; a killed worker is replaced and
reported; a bad N is refused naming --workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.workers import MAX_WORKERS
from tests.gateway_harness import DEMO
from tests.spec_terminal import Link
from tests.test_gateway_e2e import VIPGATE, free_port, terminal_for

START_TIMEOUT_S = 60.0
WAIT_S = 20.0
MAX_CONNECTIONS = 60  # to see both workers accept; each new connection is a fresh race


class Workers:
    """`vipgate serve --workers N` with its JSON log lines collected as they come."""

    def __init__(self, folder: Path, database: str, count: int) -> None:
        config = folder / "demo.toml"
        shutil.copy(DEMO, config)
        self.port = free_port()
        command = [str(VIPGATE), "serve", "--config", str(config), "--db", database]
        command += ["--listen", f"127.0.0.1:{self.port}", "--workers", str(count)]
        command += ["--clock", "2026-11-21T11:00:00+08:00"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(lambda: len(self.named("listening")) >= count, START_TIMEOUT_S)

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


@pytest.fixture
def two_workers(tmp_path: Path, ledger_url: str) -> Iterator[Workers]:
    served = Workers(tmp_path, ledger_url, 2)
    yield served
    served.kill()


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
    for _ in range(MAX_CONNECTIONS):
        link = Link("127.0.0.1", two_workers.port)
        sign_on(link)
        link.close()
        answering = {entry["worker"] for entry in two_workers.named("answered")}
        if answering == {1, 2}:
            break
    assert answering == {1, 2}, f"only worker(s) {answering} accepted connections"
    held = Link("127.0.0.1", two_workers.port)
    sign_on(held, "10000002")
    assert two_workers.stop() == 0
    assert held.socket.recv(100) == b"", "a drained worker closes its idle links"
    held.close()
    assert {entry["worker"] for entry in two_workers.named("stopping")} == {1, 2}
    assert {entry["worker"] for entry in two_workers.named("worker_exited")} == {1, 2}
    assert len(two_workers.named("workers_stopped")) == 1


def test_a_killed_worker_is_replaced_and_the_parent_exits_1(tmp_path: Path) -> None:
    """SIGKILL to one worker: logged as died, a new worker listens, terminals still get
    answers; the parent's exit status then says a worker did not exit cleanly."""
    served = Workers(tmp_path, f"sqlite:///{tmp_path / 'ledger.db'}", 2)
    try:
        victim = served.named("worker_started")[0]
        os.kill(victim["pid"], signal.SIGKILL)
        served.wait_for(lambda: len(served.named("listening")) == 3)
        died = served.named("worker_died")
        assert [(e["worker"], e["pid"], e["exit"]) for e in died] == [
            (victim["worker"], victim["pid"], "signal SIGKILL")
        ]
        for _ in range(4):
            link = Link("127.0.0.1", served.port)
            sign_on(link)
            link.close()
        assert served.stop() == 1
        assert served.named("workers_stopped_unclean")[0]["died"] == 1
    finally:
        served.kill()


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

"""The deployment of docs/deployment.md, rehearsed: HAProxy in front of two gateways on one
PostgreSQL, the simulator's load through HAProxy, and a gateway killed (SIGKILL) mid-load.

What must hold when one gateway of two dies: the other carries on (terminals reconnect through
HAProxy, signing on again where the session was the dead gateway's, and reverse what went
unanswered), approvals continue after the kill, the ledger's invariants hold afterwards
(`vipgate ledger check`), and every approval a terminal was given is in the ledger with its
journal transaction. Each gateway runs as its own process group, so SIGKILL takes a gateway
with all of its `--workers` at once, as a host failure would.

The short run is tests/test_deployment.py (in `make test`); the long one is
`make test-deploy`: more load, and kills alternating between the gateways, each killed
gateway started again on its port so that HAProxy's health checks bring it back.

    python -m tests.deploy_campaign --duration 60 --kills 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from sqlalchemy import select

from gateway.config import load_config
from gateway.ledger import make_engine, unit_of_work
from gateway.ledger.models import Authorisation, AuthorisationState, JournalTransaction
from simulators.connection import NO_FAULTS, Connection, Exchange, Faults, Link
from simulators.load import LoadPlan, LoadSummary, run_load
from simulators.terminal import APPROVALS
from tests import pg
from tests.spec_terminal import parse

DEMO: Final = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
VIPGATE: Final = Path(sys.executable).with_name("vipgate")
HAPROXY: Final = "haproxy"
HAPROXY_PACKAGE: Final = "haproxy"  # Debian's package name
START_TIMEOUT_S: Final = 60.0
ANSWER_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 5.0
HEALTH_INTERVAL_MS: Final = 300
START_ATTEMPTS: Final = 5
SETTLE_S: Final = 1.0  # after a kill: approvals later than this show the survivor carried on
JOURNALLED_KINDS: Final = {"0210", "0230"}  # redemption and void answers (0210), refund (0230)


class DeploymentError(Exception):
    """The deployment could not be set up as planned."""


def missing_haproxy() -> str | None:
    """Why HAProxy cannot be run here, or None when it can."""
    if shutil.which(HAPROXY) is None:
        return f"haproxy is not installed (Debian package: {HAPROXY_PACKAGE}; .ci/run installs it)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise DeploymentError(f"{log.stem} exited ({process.returncode}): {tail}") from None
            time.sleep(0.05)
    raise DeploymentError(f"{log.stem} did not listen on {port} within {START_TIMEOUT_S:g} s")


# --- the processes ----------------------------------------------------------------------------


@dataclass
class Gateway:
    """One `vipgate serve` on its own port and in its own process group."""

    name: str
    folder: Path
    database: str
    workers: int
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    def start(self) -> None:
        command = [str(VIPGATE), "serve", "--config", str(self.folder / "demo.toml")]
        command += ["--db", self.database, "--listen", f"127.0.0.1:{self.port}"]
        command += ["--workers", str(self.workers)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_port(self.port, self.process, self.log)

    def kill(self) -> None:
        """SIGKILL to the gateway's whole process group: parent and workers at once."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


def haproxy_config(port: int, gateways: list[Gateway], folder: Path) -> str:
    """A TCP front end over the gateways, as config/deploy/haproxy.cfg has it, on test ports
    and with faster health checks so that a dead gateway is out within a second."""
    servers = "\n".join(
        f"    server {g.name} 127.0.0.1:{g.port} check" for g in gateways
    )  # fmt: skip
    return f"""global
    maxconn 4096
    pidfile {folder / "haproxy.pid"}

defaults
    mode tcp
    log stdout format raw local0
    option tcplog
    timeout connect 2s
    timeout client 330s
    timeout server 330s
    retries 3
    option redispatch

frontend terminals
    bind 127.0.0.1:{port}
    default_backend gateways

backend gateways
    balance roundrobin
    default-server inter {HEALTH_INTERVAL_MS}ms fall 2 rise 2 on-marked-down shutdown-sessions
{servers}
"""


@dataclass
class HAProxy:
    folder: Path
    gateways: list[Gateway]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.folder / "haproxy.cfg"
        config.write_text(haproxy_config(self.port, self.gateways, self.folder), encoding="utf-8")
        checked = subprocess.run(
            [HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, check=False
        )
        if checked.returncode != 0:
            raise DeploymentError(f"haproxy -c refused {config}: {checked.stdout}{checked.stderr}")
        log = self.folder / "haproxy.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_for_port(self.port, self.process, log)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- what the terminals were told -------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """An approval a terminal read: when, and what the ledger must hold for it."""

    at: float
    mti: str
    rrn: str
    terminal: str


@dataclass
class Answers:
    """Every answer the load's terminals read (not the dropped ones), from any thread."""

    approvals: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, answer: bytes, terminal: str) -> None:
        mti, fields, _, _ = parse(answer[2:])
        code, processing = fields.get(39), str(fields.get(3, ""))
        if mti not in JOURNALLED_KINDS or code not in APPROVALS or processing.startswith("31"):
            return  # not an approval, or a balance inquiry (nothing journalled)
        with self.lock:
            self.approvals.append(Seen(time.monotonic(), mti, str(fields[37]), terminal))


class NotingLink:
    """The load's link with every answer the terminal reads noted on the way."""

    def __init__(self, inner: Connection, answers: Answers) -> None:
        self._inner = inner
        self._answers = answers

    @property
    def closed(self) -> bool:
        return self._inner.closed

    def exchange(self, frame: bytes, faults: Faults = NO_FAULTS, terminal: str = "") -> Exchange:
        exchange = self._inner.exchange(frame, faults, terminal)
        if exchange.answer is not None:
            self._answers.note(exchange.answer, terminal)
        return exchange

    def close(self) -> None:
        self._inner.close()


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Figures:
    summary: LoadSummary
    kills: list[tuple[str, float]]  # gateway name, monotonic time of the SIGKILL
    chaos_errors: list[str]
    approvals: int
    after_last_kill: int
    missing: list[str]
    ledger_check: str
    ledger_check_status: int

    @property
    def problems(self) -> list[str]:
        found = list(self.missing) + [e for e in self.chaos_errors if not e.startswith("note:")]
        if self.ledger_check_status != 0:
            found.append(f"vipgate ledger check exited {self.ledger_check_status}")
        if self.after_last_kill == 0:
            found.append(f"no approval later than {SETTLE_S:g} s after the last kill")
        found += [f"terminal failed: {failure}" for failure in self.summary.failures]
        return found

    def lines(self) -> list[str]:
        summary = self.summary
        return [
            f"deployment: {len(summary.stats)} terminals through HAProxy, "
            f"{summary.sent} requests in {summary.elapsed_s:.1f} s "
            f"({summary.throughput_per_s:.0f}/s), {len(self.kills)} gateway kills",
            f"approvals    {self.approvals} read by terminals, {self.after_last_kill} of them "
            f"more than {SETTLE_S:g} s after the last kill, {len(self.missing)} missing "
            "from the ledger",
            "codes        " + ", ".join(f"{c} {n}" for c, n in summary.codes().items()),
            f"ledger check {self.ledger_check.strip()}",
            *(f"{e}" for e in self.chaos_errors if e.startswith("note:")),
            f"problems     {len(self.problems)}",
        ]


def run_deployment(
    server: pg.PgServer,
    folder: Path,
    *,
    duration_s: float,
    rate_per_s: float,
    kills: int,
    workers: tuple[int, int] = (2, 1),
    seed: int = 8,
) -> Figures:
    """Two gateways on one new database of `server`, HAProxy over them, the load through it,
    `kills` SIGKILLs spread over the load (alternating gateways; every kill but the last is
    followed by a restart), then the audit."""
    shutil.copy(DEMO, folder / "demo.toml")
    database = server.create_database(f"deploy_{os.getpid()}_{time.monotonic_ns() % 10**6}")
    # One after the other: the first start migrates and loads, the second finds it done.
    gateways = [Gateway(f"gateway{n + 1}", folder, database, w) for n, w in enumerate(workers)]
    haproxy = HAProxy(folder, gateways)
    try:
        for gateway in gateways:
            gateway.start()
        haproxy.start()
        answers = Answers()
        killed: list[tuple[str, float]] = []
        errors: list[str] = []
        chaos = threading.Thread(
            target=_kill_during, args=(gateways, kills, duration_s, killed, errors), daemon=True
        )
        plan = LoadPlan(3, rate_per_s, duration_s, answer_timeout_s=ANSWER_TIMEOUT_S, seed=seed)
        target = ("127.0.0.1", haproxy.port)

        def connect() -> Link:
            inner = Connection.open(
                target, connect_timeout_s=CONNECT_TIMEOUT_S, answer_timeout_s=ANSWER_TIMEOUT_S
            )
            return NotingLink(inner, answers)

        chaos.start()
        summary = run_load(
            load_config(folder / "demo.toml"), f"haproxy:{haproxy.port}", plan, connect
        )
        chaos.join(timeout=duration_s + 60)
    finally:
        haproxy.stop()
        for gateway in gateways:
            gateway.stop()
    return _audit(summary, (killed, errors), answers, database, folder)


def _kill_during(
    gateways: list[Gateway],
    kills: int,
    duration_s: float,
    killed: list[tuple[str, float]],
    errors: list[str],
) -> None:
    """SIGKILL at even intervals inside the load (alternating gateways), each killed gateway
    but the last started again; the last one stays dead so the survivor ends the load alone."""
    step = duration_s / (kills + 1)
    began = time.monotonic()
    try:
        for index in range(kills):
            # On a fixed schedule from the start, whatever the restarts took.
            time.sleep(max(0.0, began + step * (index + 1) - time.monotonic()))
            victim = gateways[index % len(gateways)]
            victim.kill()
            killed.append((victim.name, time.monotonic()))
            if index < kills - 1:
                time.sleep(min(step / 2, 2.0))  # HAProxy marks it down meanwhile
                _restart(victim, errors)
    except (DeploymentError, OSError) as error:
        errors.append(f"kill and restart: {error}")


def _restart(gateway: Gateway, errors: list[str]) -> None:
    """Start again, retrying as systemd's Restart=on-failure would: a start loads the config
    into the ledger while the other gateway serves, and on PostgreSQL that load can lose a
    deadlock to live traffic and exit 1 (noted; see docs/deployment.md)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            gateway.start()
            return
        except DeploymentError as error:
            if attempt == START_ATTEMPTS:
                raise
            first = next((line for line in str(error).splitlines() if "Error" in line), "")
            errors.append(f"note: {gateway.name} start {attempt} failed: {first.strip()[:160]}")


def _audit(
    summary: LoadSummary,
    chaos: tuple[list[tuple[str, float]], list[str]],
    answers: Answers,
    database: str,
    folder: Path,
) -> Figures:
    killed, chaos_errors = chaos
    missing: list[str] = []
    engine = make_engine(database)
    try:
        with unit_of_work(engine) as session:
            for seen in answers.approvals:
                row = session.scalar(select(Authorisation).where(Authorisation.rrn == seen.rrn))
                journal = (
                    session.get(JournalTransaction, row.journal_transaction_id)
                    if row is not None and row.journal_transaction_id is not None
                    else None
                )
                if row is None or journal is None or row.state is AuthorisationState.REVERSED:
                    state = "absent" if row is None else row.state.value
                    missing.append(
                        f"{seen.mti} rrn {seen.rrn} at terminal {seen.terminal} approved, "
                        f"{state} in the ledger, journal transaction "
                        f"{'found' if journal else 'missing'}"
                    )
    finally:
        engine.dispose()
    config = str(folder / "demo.toml")
    check = subprocess.run(
        [str(VIPGATE), "ledger", "check", "--config", config, "--db", database],
        capture_output=True,
        text=True,
        check=False,
    )
    last_kill = killed[-1][1] if killed else float("inf")
    return Figures(
        summary=summary,
        kills=killed,
        chaos_errors=chaos_errors,
        approvals=len(answers.approvals),
        after_last_kill=sum(1 for s in answers.approvals if s.at > last_kill + SETTLE_S),
        missing=missing,
        ledger_check=check.stdout + check.stderr,
        ledger_check_status=check.returncode,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.deploy_campaign", description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=150.0)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="worker processes per gateway")
    args = parser.parse_args(argv)
    for missing in (missing_haproxy(), pg.missing_binaries()):
        if missing:
            print(f"deployment campaign: skipped ({missing})")
            return 0
    server = pg.start(durable=True)  # as production runs it: commits synced to disk
    folder = Path(tempfile.mkdtemp(prefix="vipgate-deploy-"))
    try:
        pg.check_durable(server)
        figures = run_deployment(
            server,
            folder,
            duration_s=args.duration,
            rate_per_s=args.rate,
            kills=args.kills,
            workers=(args.workers, args.workers),
        )
    finally:
        pg.stop(server)
    for line in figures.lines():
        print(line)
    for problem in figures.problems:
        print(f"  {problem}")
    if figures.problems:
        print(f"logs kept in {folder}")
        return 1
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The crash-safety campaign: SIGKILL the gateway under load, restart it, reverse, audit.

A points gateway promises two things a crash must not break (pos-8583.md §4.6, §7): an
approval a terminal printed a slip for is durable, and a request the terminal never got an
answer for leaves no trace once the terminal has reversed it. This module tries to break both.

Per cycle: a fresh `vipgate serve` process starts on the same database; every terminal signs
on again and sends the reversal it owes (if any); the ledger is audited against what the
terminals were told; then the terminals send redemptions and voids from their own threads over
real loopback TCP, and at a random moment the gateway gets SIGKILL, so some requests are
answered, some in flight and some never read. After the last cycle one more start, recovery
and audit close the run.

The audit compares the database with a book the campaign keeps on the client side from the
answers alone: every approval received is there with its points, every reversed original is
absent or reversed, each card holds its initial points minus those of the approvals kept,
`check_invariants` finds nothing and no journal idempotency key appears twice. A missing
approval or a card holding more than expected is a loss; an effect left by a reversed request
or a card holding less than expected is a double.

    python -m tests.crash_campaign --cycles 20 --backend both
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from sqlalchemy import Engine, Select, func, select

from cardcodec.profile import Kind
from gateway.config import CardConfig, load_config
from gateway.ledger import make_engine, unit_of_work
from gateway.ledger.invariants import check_invariants
from gateway.ledger.models import (
    Authorisation,
    AuthorisationKind,
    AuthorisationState,
    JournalTransaction,
)
from gateway.ledger.operations import balances
from simulators.connection import Connection
from simulators.load import usable_cards, usable_terminals
from simulators.terminal import (
    APPROVALS,
    APPROVED,
    MAX_TRACE,
    BadAnswerError,
    CardEntry,
    Completed,
    Request,
    Result,
    Terminal,
)
from tests import pg
from tests.logscan import scan_folder

DEMO: Final = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
VIPGATE: Final = Path(sys.executable).with_name("vipgate")
CLOCK: Final = "2026-11-21T11:00:00+08:00"
CLOCK_AT: Final = datetime.fromisoformat(CLOCK)
START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
CONNECT_TIMEOUT_S: Final = 5.0
ANSWER_TIMEOUT_S: Final = 5.0
JOIN_TIMEOUT_S: Final = 2 * ANSWER_TIMEOUT_S + CONNECT_TIMEOUT_S
KILL_AFTER_S: Final = (0.02, 0.5)  # the random moment of the SIGKILL after the load starts
VOID_SHARE: Final = 0.2
AMOUNT_FEN: Final = (20, 400)  # small, so that 20 cycles never run a rich card dry
MAX_REVERSAL_TRIES: Final = 5
DEFAULT_TIME_LIMIT_S: Final = 1200.0

Key = tuple[str, str, str]  # terminal, batch, trace


class CampaignError(Exception):
    """The campaign could not run as planned (gateway did not start, time limit passed)."""


# --- the gateway as a process ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class GatewayProcess:
    """`vipgate serve` on a copy of the demo config; a new process, and port, per start."""

    def __init__(self, folder: Path, url: str) -> None:
        self.config = folder / "demo.toml"
        shutil.copy(DEMO, self.config)
        self.url = url
        self.log = folder / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.began = time.monotonic()

    def start(self) -> int:
        """Start and wait (bounded) until it listens; the port it listens on."""
        self.port = free_port()
        command = [str(VIPGATE), "serve", "--config", str(self.config), "--db", self.url]
        # The gateway's clock runs from its start and it refuses a start before what the
        # ledger holds: each start is set as far past CLOCK as the campaign has run, plus 1 s.
        clock = CLOCK_AT + timedelta(seconds=time.monotonic() - self.began + 1)
        command += ["--listen", f"127.0.0.1:{self.port}", "--clock", clock.isoformat()]
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with self.log.open("rb") as log:
                log.seek(offset)
                if b'"listening"' in log.read():
                    return self.port
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise CampaignError(f"vipgate serve exited ({self.process.returncode}): {tail}")
            time.sleep(0.02)
        self.kill()
        raise CampaignError(f"vipgate serve did not listen within {START_TIMEOUT_S:g} s")

    def kill(self) -> None:
        """SIGKILL: no clean-up, no flush, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> int | None:
        """SIGTERM and a bounded wait for the clean exit; its status."""
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


# --- what the terminals were told: the client-side book ----------------------------------------


@dataclass
class Kept:
    """A redemption a terminal got an approval for, and the void approved for it, if any."""

    completed: Completed
    card: str
    points: int
    rrn: str
    void_rrn: str | None = None


@dataclass
class Book:
    """Every approval received and every original reversed, from the answers alone."""

    initial_points: dict[str, int]
    kept: dict[Key, Kept] = field(default_factory=dict)
    reversed_originals: list[tuple[Key, Kind]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expected_points(self) -> dict[str, int]:
        expected = dict(self.initial_points)
        for kept in self.kept.values():
            if kept.void_rrn is None:
                expected[kept.card] -= kept.points
        return expected


@dataclass
class Figures:
    """What one backend's campaign counted."""

    backend: str
    cycles: int = 0
    requests: int = 0
    approvals: int = 0
    reversals: int = 0
    undone: int = 0
    absent: int = 0
    losses: int = 0
    doubles: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.backend}: {self.cycles} cycles survived, {self.requests} requests, "
            f"{self.approvals} approvals, {self.reversals} reversals ({self.undone} undid a "
            f"committed original, {self.absent} found none), {self.losses} losses, "
            f"{self.doubles} doubles, {len(self.problems)} problems, {self.seconds:.1f} s"
        )


def key_of(request: Request, terminal_id: str) -> Key:
    return (terminal_id, request.batch, request.trace)


# --- one terminal ---------------------------------------------------------------------------


class Driver:
    """One terminal of the campaign; it outlives the gateway processes, as a POS does."""

    def __init__(self, terminal: Terminal, cards: list[CardConfig], book: Book) -> None:
        self.terminal = terminal
        self.cards = cards
        self.book = book
        self.link: Connection | None = None
        self.sent = self.approvals = self.reversals = 0
        self.problems: list[str] = []

    @property
    def id(self) -> str:
        return self.terminal.terminal_id

    def exchange(self, request: Request) -> Result | None:
        """Send and read; None (and a reversal owed, for a redemption or void) without one."""
        if self.link is None or self.link.closed:
            self.terminal.no_answer(request)
            return None
        self.sent += 1
        answer = self.link.exchange(request.frame, terminal=self.id).answer
        if answer is None:
            self.terminal.no_answer(request)
            return None
        try:
            return self.terminal.receive(request, answer)
        except BadAnswerError as refused:
            self.problems.append(f"{self.id}: refused answer to {request.describe()}: {refused}")
            return None

    def recover(self, port: int) -> None:
        """Connect, sign on, send the reversal owed (§4.6); problems are noted, not raised."""
        self.link = Connection.open(
            ("127.0.0.1", port),
            connect_timeout_s=CONNECT_TIMEOUT_S,
            answer_timeout_s=ANSWER_TIMEOUT_S,
        )
        for _ in range(MAX_REVERSAL_TRIES):
            signed = self.exchange(self.terminal.sign_on())
            if signed is None or signed.code != APPROVED:
                self.problems.append(f"{self.id}: sign-on answered {signed}")
                return
            if self.terminal.pending_reversal is None:
                return
            self.reverse()
        if self.terminal.pending_reversal is not None:
            self.problems.append(f"{self.id}: reversal still owed after {MAX_REVERSAL_TRIES}")

    def reverse(self) -> None:
        pending = self.terminal.pending_reversal
        assert pending is not None
        result = self.exchange(self.terminal.reversal())
        if result is None:
            return
        self.reversals += 1
        if result.code == APPROVED:
            original = pending.original
            with self.book.lock:
                self.book.reversed_originals.append((key_of(original, self.id), original.kind))
        elif self.terminal.pending_reversal is None:
            self.problems.append(f"{self.id}: reversal answered {result.code}")

    def drive(self, stop: threading.Event, rng: random.Random) -> None:
        """Redemptions and some voids until the link breaks (the kill) or `stop`."""
        while not stop.is_set():
            kept = self.voidable(rng)
            if kept is not None:
                request = self.terminal.void(kept.completed)
            else:
                card = rng.choice(self.cards)
                entry = CardEntry(card.number, card.expiry_yymm)
                amount = rng.randint(*AMOUNT_FEN)
                request = self.terminal.redemption(entry, amount, pin=card.pin)
            result = self.exchange(request)
            if result is None:
                return
            self.book_answer(request, result, kept)

    def voidable(self, rng: random.Random) -> Kept | None:
        if rng.random() >= VOID_SHARE:
            return None
        with self.book.lock:
            mine = [
                kept
                for key, kept in self.book.kept.items()
                if key[0] == self.id and key[1] == self.terminal.batch and kept.void_rrn is None
            ]
        return rng.choice(mine) if mine else None

    def book_answer(self, request: Request, result: Result, kept: Kept | None) -> None:
        if result.code not in APPROVALS:
            return
        self.approvals += 1
        with self.book.lock:
            if kept is not None:
                kept.void_rrn = result.rrn
                return
            if result.rrn is None or result.points is None or request.card is None:
                self.problems.append(f"{self.id}: approval without RRN or points: {result}")
                return
            completed = Completed(request, result)
            entry = Kept(completed, request.card.number, result.points, result.rrn)
            self.book.kept[key_of(request, self.id)] = entry

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


# --- the audit --------------------------------------------------------------------------------


@dataclass
class Audit:
    losses: list[str] = field(default_factory=list)
    doubles: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    undone: int = 0  # reversed originals the gateway had committed: the reversal undid them
    absent: int = 0  # reversed originals the gateway never committed


def audit(engine: Engine, book: Book) -> Audit:
    """The ledger against the book; empty lists mean nothing lost, nothing doubled."""
    found = Audit()
    with unit_of_work(engine) as session:
        for kept in book.kept.values():
            problem = _kept_problem(session.scalar(_by_rrn(kept.rrn)), kept)
            if problem is None and kept.void_rrn is not None:
                void = session.scalar(_by_rrn(kept.void_rrn))
                if void is None or void.state is not AuthorisationState.APPROVED:
                    problem = f"void {kept.void_rrn} approved but {_state(void)} in the ledger"
            if problem is not None:
                found.losses.append(problem)
        for (terminal, batch, trace), kind in book.reversed_originals:
            query = select(Authorisation).where(
                Authorisation.terminal_id == terminal,
                Authorisation.batch_number == int(batch),
                Authorisation.trace == int(trace),
                Authorisation.kind == AuthorisationKind(kind.value),
            )
            rows = list(session.scalars(query))
            found.undone += any(row.state is AuthorisationState.REVERSED for row in rows)
            found.absent += not rows
            for row in rows:
                if row.state not in (AuthorisationState.REVERSED, AuthorisationState.DECLINED):
                    found.doubles.append(
                        f"{kind.value} {terminal}/{batch}/{trace} reversed but {_state(row)}"
                    )
        for card, expected in book.expected_points().items():
            held = balances(session, card, CLOCK_AT).ledger_points
            if held < expected:
                found.doubles.append(f"card {card[:6]}…{card[-4:]}: {held} points, {expected} due")
            elif held > expected:
                found.losses.append(f"card {card[:6]}…{card[-4:]}: {held} points, {expected} due")
        found.violations += [str(v) for v in check_invariants(session)]
        repeated = (
            select(JournalTransaction.idempotency_key)
            .group_by(JournalTransaction.idempotency_key)
            .having(func.count() > 1)
        )
        found.doubles += [f"idempotency key {k} twice" for k in session.scalars(repeated)]
    return found


def _by_rrn(rrn: str) -> Select[Authorisation]:
    return select(Authorisation).where(Authorisation.rrn == rrn)


def _state(row: Authorisation | None) -> str:
    return "absent" if row is None else f"{row.kind.value} {row.state.value}"


def _kept_problem(row: Authorisation | None, kept: Kept) -> str | None:
    want = AuthorisationState.APPROVED if kept.void_rrn is None else AuthorisationState.VOIDED
    if row is None or row.kind is not AuthorisationKind.REDEMPTION or row.state is not want:
        return f"redemption {kept.rrn} approved ({want.value}) but {_state(row)} in the ledger"
    if row.points != kept.points:
        return f"redemption {kept.rrn} took {row.points} points, the slip says {kept.points}"
    return None


# --- the campaign -----------------------------------------------------------------------------


def make_drivers(book_cards: list[CardConfig], book: Book, rng: random.Random) -> list[Driver]:
    config = load_config(DEMO)
    drivers = []
    for terminal_config in usable_terminals(config):
        terminal = Terminal.from_config(terminal_config)
        terminal.stan = rng.randint(1, MAX_TRACE // 2)
        drivers.append(Driver(terminal, book_cards, book))
    return drivers


def recover_and_audit(
    gateway: GatewayProcess, drivers: list[Driver], engine: Engine, book: Book
) -> Audit:
    port = gateway.start()
    for driver in drivers:
        driver.recover(port)
    return audit(engine, book)


def crash(drivers: list[Driver], gateway: GatewayProcess, rng: random.Random) -> None:
    """Load from every terminal's thread, SIGKILL at a random moment, wait for the threads."""
    stop = threading.Event()
    threads = [
        threading.Thread(target=d.drive, args=(stop, random.Random(rng.random())), daemon=True)
        for d in drivers
    ]
    for thread in threads:
        thread.start()
    time.sleep(rng.uniform(*KILL_AFTER_S))
    gateway.kill()
    stop.set()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
        if thread.is_alive():
            raise CampaignError("a terminal thread did not end after the kill")
    for driver in drivers:
        driver.close()


def run_campaign(
    url: str,
    cycles: int,
    *,
    backend: str,
    seed: int | None = None,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
) -> Figures:
    """`cycles` kill-restart-reverse-audit cycles of a gateway on the ledger at `url`."""
    began = time.monotonic()
    rng = random.Random(seed)
    config = load_config(DEMO)
    cards = [card for card in usable_cards(config) if sum(lot.points for lot in card.lots)]
    book = Book({card.number: sum(lot.points for lot in card.lots) for card in cards})
    drivers = make_drivers(cards, book, rng)
    figures = Figures(backend)
    engine = make_engine(url)
    folder = Path(tempfile.mkdtemp(prefix="vipgate-crash-"))
    gateway = GatewayProcess(folder, url)
    try:
        for cycle in range(cycles + 1):
            if time.monotonic() - began > time_limit_s:
                raise CampaignError(f"time limit of {time_limit_s:g} s passed in cycle {cycle}")
            found = recover_and_audit(gateway, drivers, engine, book)
            _count(figures, found, cycle)
            if cycle == cycles:
                gateway.stop()
                break
            crash(drivers, gateway, rng)
    finally:
        gateway.kill()
        engine.dispose()
        _tally(figures, drivers)
        figures.seconds = time.monotonic() - began
        # Every start's log, killed or not, must be free of card data (issue 7).
        figures.problems += [f"log: {leak}" for leak in scan_folder(folder)]
        shutil.rmtree(folder, ignore_errors=True)
    return figures


def _count(figures: Figures, found: Audit, cycle: int) -> None:
    figures.losses += len(found.losses)
    figures.doubles += len(found.doubles)
    figures.problems += [f"cycle {cycle}: {p}" for p in found.losses + found.doubles]
    figures.problems += [f"cycle {cycle}: invariant {v}" for v in found.violations]
    figures.undone, figures.absent = found.undone, found.absent
    if cycle > 0 and not (found.losses or found.doubles or found.violations):
        figures.cycles += 1


def _tally(figures: Figures, drivers: list[Driver]) -> None:
    for driver in drivers:
        figures.requests += driver.sent
        figures.approvals += driver.approvals
        figures.reversals += driver.reversals
        figures.problems += driver.problems


# --- backends ---------------------------------------------------------------------------------


@contextmanager
def sqlite_ledger() -> Iterator[str]:
    """A new SQLite file; `vipgate serve` migrates it on its first start."""
    folder = Path(tempfile.mkdtemp(prefix="vipgate-crash-sqlite-"))
    try:
        yield f"sqlite:///{folder / 'ledger.db'}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def postgresql_ledger() -> Iterator[str]:
    """A real PostgreSQL with durable commits (fsync on), and a new database on it."""
    missing = pg.missing_binaries()
    if missing:
        raise CampaignError(missing)
    server = pg.start(durable=True)
    try:
        try:
            pg.check_durable(server)  # a crash test without durable commits proves nothing
        except RuntimeError as error:
            raise CampaignError(str(error)) from error
        yield server.create_database("vipgate_crash")
    finally:
        pg.stop(server)


BACKENDS: Final = {"sqlite": sqlite_ledger, "postgresql": postgresql_ledger}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.crash_campaign", description=__doc__)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S)
    args = parser.parse_args(argv)
    names = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"crash campaign: {args.cycles} cycles per backend, seed {seed}", flush=True)
    failed = False
    for name in names:
        with BACKENDS[name]() as url:
            figures = run_campaign(
                url, args.cycles, backend=name, seed=seed, time_limit_s=args.time_limit
            )
        print(figures.line(), flush=True)
        for problem in figures.problems:
            print(f"  {problem}", flush=True)
        failed |= bool(figures.problems) or figures.cycles < args.cycles
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

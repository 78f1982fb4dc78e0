"""Hostile input over the network against a real `vipgate serve` (issue 7, Hostile input).

While an honest terminal signs on and redeems, Hypothesis throws random bytes, mutated valid
frames, zero and huge lengths, truncated and glued frames at the gateway from many loopback
source addresses; slow senders trickle a frame one byte a second; waves of idle connections
sit there; one address opens one connection too many and one connection floods frames. The
gateway must keep answering the honest terminal correctly and quickly, close what the bounds
say it closes, never die, and change the ledger only by the honest terminal's approvals.

`tests/test_hostile.py` runs a short campaign inside `make test`; `make test-hostile` (this
module's `main`) runs a long one and prints its figures. Only 127.0.0.0/8 is used: sources
spread over it so that thousands of connections stay within the per-address bound.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from gateway.ledger import make_engine, unit_of_work
from gateway.ledger.invariants import check_invariants
from gateway.ledger.models import Authorisation, AuthorisationKind, JournalTransaction, PointLot
from tests.gateway_harness import DEMO, DIAMOND, TMKS
from tests.logscan import scan_folder
from tests.spec_terminal import Answer, Link, SpecTerminal, parse

VIPGATE = Path(sys.executable).with_name("vipgate")
CLOCK = "2026-11-21T11:00:00+08:00"
HONEST_ID = "10000001"
HONEST_SOURCE = "127.0.0.1"
PER_ADDRESS_SOURCE = "127.2.0.1"
FLOOD_SOURCE = "127.4.0.1"
HONEST_AMOUNT_FEN = 10
HONEST_PAUSE_S = 0.05  # an honest terminal far below the frame-rate bound
# A batch holds 999 items (then 61) and the honest terminal does not settle: it paces itself
# to stay below that in one campaign.
HONEST_REDEMPTIONS = 900
# A hostile frame mutated into a sign-on of the honest terminal's id replaces its keys (a
# sign-on carries no MAC, §5.1), and the honest terminal's next request is then rightly `A0`.
# On a loaded machine the honest terminal is slow and several such sign-ons can land between
# its own sign-on and its request; it signs on again this many times before calling it wrong.
MAX_SIGN_ON_RETRIES = 20
REPLY_WAIT_S = 0.3  # how long a hostile connection waits for an answer or the close
REPLY_SETTLE_S = 0.05  # and how long after the last answer bytes


@dataclass(frozen=True)
class CampaignSettings:
    duration_s: float = 120
    examples_per_round: int = 200
    idle_connections: int = 3000
    slow_senders: int = 5
    idle_timeout_s: int = 5
    max_frames_per_second: int = 50
    max_connections_per_address: int = 64
    max_rounds: int = 1000


@dataclass
class Figures:
    inputs: int = 0
    connections: int = 0
    honest_requests: int = 0
    honest_approved: int = 0
    honest_points: int = 0
    honest_balance: int | None = None
    honest_latencies_ms: list[float] = field(default_factory=list)
    honest_sign_ons: int = 0
    honest_reconnects: int = 0
    wrong_answers: list[str] = field(default_factory=list)
    hostile_approvals: int = 0
    idle_opened: int = 0
    idle_closed_by_gateway: int = 0
    slow_closed_by_gateway: int = 0
    per_address_refused: bool = False
    flood_closed: bool = False
    crashes: int = 0
    ledger_problems: list[str] = field(default_factory=list)
    log_leaks: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, inputs: int = 0, connections: int = 0) -> None:
        with self.lock:
            self.inputs += inputs
            self.connections += connections

    def percentile_ms(self, share: float) -> float:
        ordered = sorted(self.honest_latencies_ms)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    def report(self) -> str:
        return "\n".join(
            [
                f"inputs tried:            {self.inputs}",
                f"connections opened:      {self.connections}",
                f"idle connections:        {self.idle_opened} "
                f"({self.idle_closed_by_gateway} closed by the idle time-out)",
                f"slow senders closed:     {self.slow_closed_by_gateway}",
                f"per-address bound held:  {self.per_address_refused}",
                f"frame flood closed:      {self.flood_closed}",
                f"honest requests:         {self.honest_requests} "
                f"({self.honest_approved} approved, {self.honest_sign_ons} sign-ons, "
                f"{self.honest_reconnects} reconnects)",
                f"honest latency:          p50 {self.percentile_ms(0.50):.1f} ms, "
                f"p99 {self.percentile_ms(0.99):.1f} ms",
                f"wrong honest answers:    {len(self.wrong_answers)}",
                f"hostile approvals:       {self.hostile_approvals}",
                f"ledger problems:         {len(self.ledger_problems)}",
                f"card data in the log:    {len(self.log_leaks)}",
                f"crashes:                 {self.crashes}",
            ]
        )


# --- the gateway under attack ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def raise_open_files_limit() -> int:
    """Lift the soft open-files limit to the hard one (inherited by the gateway)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def hostile_config(folder: Path, campaign: CampaignSettings) -> Path:
    """The demo config with the campaign's bounds in its [gateway] section."""
    text = DEMO.read_text(encoding="utf-8")
    text = re.sub(
        r"(?m)^idle_timeout_s = \d+.*$", f"idle_timeout_s = {campaign.idle_timeout_s}", text
    )
    bounds = (
        f"max_connections_per_address = {campaign.max_connections_per_address}\n"
        f"max_frames_per_second_per_terminal = {campaign.max_frames_per_second}\n"
    )
    text = text.replace("\n[issuer]", f"{bounds}\n[issuer]", 1)
    config = folder / "hostile.toml"
    config.write_text(text, encoding="utf-8")
    return config


@dataclass
class ServedGateway:
    process: subprocess.Popen[bytes]
    port: int
    database: str
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_gateway(folder: Path, campaign: CampaignSettings) -> ServedGateway:
    shutil.copytree(DEMO.parent, folder / "config", ignore=shutil.ignore_patterns("var"))
    config = hostile_config(folder / "config", campaign)
    port = free_port()
    database = f"sqlite:///{folder / 'hostile.db'}"
    log = folder / "gateway.log"
    command = [str(VIPGATE), "serve", "--config", str(config), "--db", database]
    command += ["--listen", f"127.0.0.1:{port}", "--clock", CLOCK]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    served = ServedGateway(process, port, database, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and served.alive():
        if b'"listening"' in log.read_bytes():
            return served
        time.sleep(0.05)
    served.stop()
    raise RuntimeError("vipgate serve did not start:\n" + log.read_text(errors="replace"))


# --- the ledger before and after -------------------------------------------------------------


@dataclass(frozen=True)
class LedgerSnapshot:
    points_by_card: dict[str, int]
    journal_transactions: int
    approved_redemptions: int


def snapshot(database: str) -> LedgerSnapshot:
    engine = make_engine(database)
    try:
        with unit_of_work(engine) as session:
            rows = session.execute(
                select(PointLot.card_number, func.sum(PointLot.remaining_points)).group_by(
                    PointLot.card_number
                )
            )
            points = {str(card): int(total) for card, total in rows}
            journal = session.scalar(select(func.count()).select_from(JournalTransaction)) or 0
            approved = session.scalar(
                select(func.count())
                .select_from(Authorisation)
                .where(
                    Authorisation.kind == AuthorisationKind.REDEMPTION,
                    Authorisation.response_code == "00",
                )
            )
        return LedgerSnapshot(points, journal, approved or 0)
    finally:
        engine.dispose()


def ledger_problems(database: str, before: LedgerSnapshot, figures: Figures) -> list[str]:
    """What differs from 'only the honest terminal's approvals changed the ledger'."""
    after = snapshot(database)
    problems = []
    expected = dict(before.points_by_card)
    expected[DIAMOND] = expected.get(DIAMOND, 0) - figures.honest_points
    if after.points_by_card != expected:
        problems.append(f"card points {after.points_by_card} != expected {expected}")
    if figures.honest_balance is not None and after.points_by_card.get(DIAMOND) != (
        figures.honest_balance
    ):
        problems.append("the diamond card's points differ from the last balance answered")
    approvals = after.approved_redemptions - before.approved_redemptions
    if approvals != figures.honest_approved:
        problems.append(f"{approvals} approved redemptions, {figures.honest_approved} answered")
    journal = after.journal_transactions - before.journal_transactions
    if journal != figures.honest_approved:
        problems.append(f"{journal} journal transactions, {figures.honest_approved} approvals")
    engine = make_engine(database)
    try:
        with unit_of_work(engine) as session:
            problems += [str(violation) for violation in check_invariants(session)]
    finally:
        engine.dispose()
    return problems


# --- the honest terminal ---------------------------------------------------------------------


def spec_terminal(terminal_id: str) -> SpecTerminal:
    merchant, suite, tmk = TMKS[terminal_id]
    return SpecTerminal(terminal_id, merchant, suite, bytes.fromhex(tmk))


class HonestTerminal(threading.Thread):
    """Signs on and redeems on one link, checks every answer, times every exchange."""

    def __init__(
        self, port: int, figures: Figures, stop: threading.Event, duration_s: float
    ) -> None:
        super().__init__(name="honest", daemon=True)
        self.port = port
        self.pause_s = max(HONEST_PAUSE_S, duration_s / HONEST_REDEMPTIONS)
        self.figures = figures
        self.stopping = stop
        self.terminal = spec_terminal(HONEST_ID)
        self.sent: list[bytes] = []  # answered requests, templates for the mutations
        self.link: Link | None = None

    def run(self) -> None:
        try:
            self.sign_on()
            for _ in range(HONEST_REDEMPTIONS):
                if self.stopping.is_set():
                    return
                self.redeem()
                self.stopping.wait(self.pause_s)
        except Exception as error:  # recorded and reported, never silently swallowed
            self.figures.wrong_answers.append(f"honest terminal stopped: {error!r}")
        finally:
            if self.link is not None:
                self.link.close()

    def exchange(self, request: bytes) -> Answer:
        for _ in range(3):
            if self.link is None:
                self.link = Link(HONEST_SOURCE, self.port)
            started = time.perf_counter()
            try:
                payload = self.link.exchange(request)
            except (ConnectionError, TimeoutError, OSError):
                self.link.close()
                self.link = None
                self.figures.honest_reconnects += 1
                continue
            self.figures.honest_latencies_ms.append((time.perf_counter() - started) * 1000)
            self.figures.honest_requests += 1
            answer = self.terminal.check(request, payload)
            self.sent.append(request)
            return answer
        raise ConnectionError("the honest terminal could not reach the gateway three times")

    def sign_on(self) -> None:
        answer = self.exchange(self.terminal.sign_on())
        self.figures.honest_sign_ons += 1
        if answer.code != "00":
            raise AssertionError(f"sign-on answered {answer.code}")
        self.terminal.adopt_sign_on(answer)

    def redeem(self) -> None:
        for _ in range(MAX_SIGN_ON_RETRIES):
            fields = self.terminal.card_fields(DIAMOND, "2906")
            request = self.terminal.financial(
                "0200", "000000", "22", fields, amount_fen=HONEST_AMOUNT_FEN
            )
            answer = self.exchange(request)
            if answer.code == "A0":  # keys replaced (a sign-on needs no MAC): sign on again
                self.sign_on()
                continue
            if answer.code != "00":
                self.figures.wrong_answers.append(f"redemption answered {answer.code}")
                return
            self.figures.honest_approved += 1
            self.figures.honest_points += answer.points
            self.figures.honest_balance = answer.balance
            return
        self.figures.wrong_answers.append("redemption kept getting A0")


# --- hostile inputs --------------------------------------------------------------------------


def forged_templates() -> list[bytes]:
    """Well-formed requests a stranger can build: a sign-on (no MAC needed) and requests
    MAC'd under keys the gateway never issued."""
    stranger = spec_terminal("20000001")
    stranger.mak = stranger.pik = bytes(range(16))
    fields = stranger.card_fields(DIAMOND, "2906")
    return [
        spec_terminal("10000002").sign_on(),
        stranger.financial("0200", "000000", "22", fields, amount_fen=12800),
        stranger.financial("0200", "310000", "01", fields),
        stranger.signed("0820", {11: stranger.next_trace(), **stranger.ids(), 60: "00000001301"}),
    ]


def framed(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload


@st.composite
def mutated(draw: st.DrawFn, templates: list[bytes]) -> bytes:
    payload = bytearray(draw(st.sampled_from(templates)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(payload) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip":
            payload[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            payload[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and len(payload) > 1:
            del payload[position]
        elif action == "cut" and position > 0:
            del payload[position:]
    return bytes(payload)


@st.composite
def hostile_bytes(draw: st.DrawFn, templates: list[bytes]) -> tuple[str, bytes]:
    """One connection's worth of hostile bytes and what kind they are."""
    kind = draw(
        st.sampled_from(
            ["random", "framed-random", "mutated", "glued", "zero", "huge", "truncated"]
        )
    )
    if kind == "random":
        return kind, draw(st.binary(min_size=1, max_size=300))
    if kind == "framed-random":
        return kind, framed(draw(st.binary(max_size=300)))
    if kind == "mutated":
        return kind, framed(draw(mutated(templates)))
    if kind == "glued":
        frames = draw(st.lists(mutated(templates), min_size=2, max_size=5))
        return kind, b"".join(framed(frame) for frame in frames)
    if kind == "zero":
        return kind, b"\x00\x00" + draw(st.binary(max_size=20))
    if kind == "huge":
        length = draw(st.integers(2049, 65535))
        return kind, length.to_bytes(2, "big") + draw(st.binary(max_size=200))
    whole = framed(draw(st.sampled_from(templates)))
    return kind, whole[: draw(st.integers(1, len(whole) - 1))]


def source_address(number: int, block: int) -> str:
    """The `number`th loopback source in 127.`block`.x.y."""
    return f"127.{block}.{number // 250 % 250}.{number % 250 + 1}"


def connect_from(source: str, port: int, timeout: float = 5.0) -> socket.socket:
    link = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    link.settimeout(timeout)
    link.bind((source, 0))
    link.connect(("127.0.0.1", port))
    return link


def read_until_closed(
    link: socket.socket, wait_s: float, settle_s: float | None = None
) -> tuple[bytes, bool]:
    """What arrives within `wait_s` (or `settle_s` after the last data), and whether the
    gateway closed the link."""
    received = b""
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        link.settimeout(left)
        try:
            chunk = link.recv(65536)
        except TimeoutError:
            return received, False
        except OSError:
            return received, True
        if not chunk:
            return received, True
        received += chunk
        if settle_s is not None:
            deadline = min(deadline, time.monotonic() + settle_s)
    return received, False


def hostile_approvals(received: bytes, honest_bodies: set[bytes], sent: bytes) -> int:
    """Approved financial answers to anything the honest terminal did not send itself."""
    approvals = 0
    offset = 0
    while offset + 2 <= len(received):
        length = int.from_bytes(received[offset : offset + 2], "big")
        payload = received[offset + 2 : offset + 2 + length]
        offset += 2 + length
        with contextlib.suppress(Exception):  # a partial answer is not an approval
            mti, fields, _, _ = parse(payload)
            if mti in ("0210", "0230") and fields.get(39) == "00":
                approvals += 0 if _sent_by_honest(sent, honest_bodies) else 1
    return approvals


def _sent_by_honest(sent: bytes, honest_bodies: set[bytes]) -> bool:
    # A copy of an honest request with only its TPDU or header changed is a repeat.
    return any(body in sent for body in honest_bodies)


def throw(port: int, source: str, data: bytes, chunks: int, wait_s: float) -> bytes:
    """Send `data` in `chunks` writes on a new connection; return what came back."""
    with connect_from(source, port) as link:
        step = max(1, len(data) // chunks)
        with contextlib.suppress(OSError):  # the gateway may close before the last write
            for start in range(0, len(data), step):
                link.sendall(data[start : start + step])
        received, _ = read_until_closed(link, wait_s, REPLY_SETTLE_S)
        return received


def fuzz_round(
    port: int, honest: HonestTerminal, figures: Figures, examples: int, deadline: float
) -> None:
    """One Hypothesis run of `examples` hostile connections (or fewer, at the deadline)."""
    # the honest sign-on stays among them: replayed, it replaces the honest terminal's keys
    templates = forged_templates() + honest.sent[:1] + honest.sent[-20:]
    honest_bodies = {request[11:] for request in honest.sent}

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(thrown=hostile_bytes(templates), chunks=st.integers(1, 4), source=st.integers(0, 9999))
    def one(thrown: tuple[str, bytes], chunks: int, source: int) -> None:
        if time.monotonic() > deadline:
            return
        kind, data = thrown
        # the gateway rightly waits for the rest of a truncated frame: no answer to wait for
        wait_s = 0.02 if kind == "truncated" else REPLY_WAIT_S
        try:
            received = throw(port, source_address(source, 3), data, chunks, wait_s)
        except OSError:
            received = b""
        figures.count(inputs=1, connections=1)
        figures.hostile_approvals += hostile_approvals(received, honest_bodies, data)

    one()


# --- slow senders, idle connections, the two bounds ------------------------------------------


def slow_sender(port: int, number: int, seconds: float, figures: Figures) -> None:
    """Trickle a frame one byte a second; the idle time-out must close the link first."""
    data = framed(forged_templates()[1])
    link = connect_from(source_address(number, 5), port)
    figures.count(inputs=1, connections=1)
    try:
        for byte in data[: int(seconds) + 1]:
            link.sendall(bytes([byte]))
            _, closed = read_until_closed(link, 1.0)
            if closed:
                with figures.lock:
                    figures.slow_closed_by_gateway += 1
                return
    except OSError:
        with figures.lock:
            figures.slow_closed_by_gateway += 1
    finally:
        link.close()


def idle_wave(port: int, count: int, wait_s: float, figures: Figures, per_address: int) -> None:
    """Open `count` silent connections (within the per-address bound) and see them closed."""
    links: list[socket.socket] = []
    try:
        for number in range(count):
            block = number // per_address
            with contextlib.suppress(OSError):
                links.append(connect_from(source_address(block, 1), port))
            if number % 25 == 24:
                time.sleep(0.01)  # stay within the listen backlog
        figures.count(connections=len(links))
        with figures.lock:
            figures.idle_opened += len(links)
        deadline = time.monotonic() + wait_s
        for link in links:
            _, closed = read_until_closed(link, max(0.01, deadline - time.monotonic()))
            if closed:
                with figures.lock:
                    figures.idle_closed_by_gateway += 1
    finally:
        for link in links:
            link.close()


def per_address_bound_holds(port: int, bound: int, figures: Figures) -> bool:
    """`bound` connections from one address stay open; the one after is closed at once."""
    links = [connect_from(PER_ADDRESS_SOURCE, port) for _ in range(bound + 1)]
    figures.count(inputs=1, connections=len(links))
    try:
        _, last_closed = read_until_closed(links[-1], 2.0)
        _, first_closed = read_until_closed(links[0], 0.05)
        return last_closed and not first_closed
    finally:
        for link in links:
            link.close()


def flood_is_closed(port: int, rate: int, figures: Figures) -> bool:
    """More frames at once than a second's allowance: the connection is closed."""
    frame = framed(forged_templates()[1])
    with connect_from(FLOOD_SOURCE, port) as link:
        figures.count(inputs=1, connections=1)
        with contextlib.suppress(OSError):
            link.sendall(frame * (rate * 2 + 10))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            _, closed = read_until_closed(link, 0.5)
            if closed:
                return True
    return False


# --- the campaign ----------------------------------------------------------------------------


@contextlib.contextmanager
def background(*threads: threading.Thread) -> Iterator[None]:
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for thread in threads:
            thread.join(timeout=60)


def idle_waves(port: int, campaign: CampaignSettings, figures: Figures, end: float) -> None:
    per_address = min(50, campaign.max_connections_per_address)
    for _ in range(campaign.max_rounds):
        if time.monotonic() >= end:
            return
        wait = campaign.idle_timeout_s + 10
        idle_wave(port, campaign.idle_connections, wait, figures, per_address)


def run_campaign(folder: Path, campaign: CampaignSettings) -> Figures:
    """Run everything against a fresh gateway; the figures carry every problem found."""
    figures = Figures()
    gateway = start_gateway(folder, campaign)
    try:
        before = snapshot(gateway.database)
        stop = threading.Event()
        honest = HonestTerminal(gateway.port, figures, stop, campaign.duration_s)
        end = time.monotonic() + campaign.duration_s
        slow_s = campaign.idle_timeout_s + 3
        side = [
            threading.Thread(target=idle_waves, args=(gateway.port, campaign, figures, end)),
            *[
                threading.Thread(target=slow_sender, args=(gateway.port, n, slow_s, figures))
                for n in range(campaign.slow_senders)
            ],
        ]
        with background(honest, *side):
            while not honest.sent and honest.is_alive():
                time.sleep(0.05)
            figures.per_address_refused = per_address_bound_holds(
                gateway.port, campaign.max_connections_per_address, figures
            )
            figures.flood_closed = flood_is_closed(
                gateway.port, campaign.max_frames_per_second, figures
            )
            for _ in range(campaign.max_rounds):
                if time.monotonic() >= end or not gateway.alive():
                    break
                fuzz_round(gateway.port, honest, figures, campaign.examples_per_round, end)
            stop.set()
        figures.crashes += 0 if gateway.alive() else 1
        if gateway.stop() != 0:
            figures.crashes += 0 if figures.crashes else 1
        figures.ledger_problems = ledger_problems(gateway.database, before, figures)
    finally:
        gateway.stop()
    # Hostile bytes in, and still no card data in the log (issue 7).
    figures.log_leaks = [str(leak) for leak in scan_folder(folder)]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", "120")))
    parser.add_argument("--idle", type=int, default=int(os.environ.get("IDLE", "3000")))
    parser.add_argument("--slow", type=int, default=5)
    parser.add_argument("--examples", type=int, default=200, help="inputs per Hypothesis round")
    parser.add_argument("--folder", type=Path, default=Path("build/hostile"))
    args = parser.parse_args(argv)
    limit = raise_open_files_limit()
    campaign = CampaignSettings(
        duration_s=args.duration,
        examples_per_round=args.examples,
        idle_connections=min(args.idle, max(100, limit // 2 - 200)),
        slow_senders=args.slow,
    )
    shutil.rmtree(args.folder, ignore_errors=True)
    args.folder.mkdir(parents=True)
    print(f"==> hostile campaign: {campaign} (open files limit {limit})", flush=True)
    figures = run_campaign(args.folder, campaign)
    print(figures.report())
    for problem in figures.wrong_answers[:10] + figures.ledger_problems[:10]:
        print(f"problem: {problem}")
    for leak in figures.log_leaks[:10]:
        print(f"problem: {leak}")
    failed = bool(
        figures.wrong_answers
        or figures.ledger_problems
        or figures.log_leaks
        or figures.crashes
        or figures.hostile_approvals
        or not figures.per_address_refused
        or not figures.flood_closed
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

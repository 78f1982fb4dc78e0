"""A gateway wired for tests: the demo config, a fresh ledger, a fixed clock, in process."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from cardcodec.profile import Kind
from gateway.clock import SHANGHAI, FixedClock
from gateway.config import Config, load_config
from gateway.handler import Gateway
from gateway.keystore import FileKeyStore
from gateway.ledger import make_engine, migrate, unit_of_work
from gateway.loader import load_into_ledger
from gateway.security import SecurityModule, SoftwareSecurityModule
from tests.spec_terminal import Answer, SpecTerminal

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
# A Saturday morning: the diamond weekend rule (10:00-22:00) applies, vip-lunch does not.
SATURDAY_11 = datetime(2026, 11, 21, 11, 0, tzinfo=SHANGHAI)

GOLD_PIN = "6688000000000000014"  # gold, PIN 123456, 100000 points, expiry 2812
DIAMOND = "6688001234567890124"  # diamond, no PIN, 50000 points, expiry 2906
NOT_ENROLLED = "6688000000000000022"
BLOCKED = "6688000000000000030"
FEW_POINTS = "6688000000000000048"  # vip, 150 points
EXPIRY = {GOLD_PIN: "2812", DIAMOND: "2906", NOT_ENROLLED: "2812", BLOCKED: "2812"}
EXPIRY[FEW_POINTS] = "2812"

TMKS = {
    "10000001": ("898310048990001", "3des", "FD32139FDCE66744281F7C0090707DF2"),
    "10000002": ("898310048990001", "sm4", "B23AB55B1B37B6FFB0EB41C61A13E6DF"),
    "20000001": ("898310058120002", "3des", "0123456789ABCDEFFEDCBA9876543210"),
}


def demo_config(tmp_path: Path, database: str | None = None) -> Config:
    config = load_config(DEMO, database or f"sqlite:///{tmp_path / 'gateway.db'}")
    issuer = dataclasses.replace(
        config.issuer,
        master_key=tmp_path / "master.key",
        signing_key=tmp_path / "issuer.pem",
    )
    return dataclasses.replace(config, issuer=issuer)


class Harness:
    """The real `Gateway` on a real ledger, called directly instead of over TCP."""

    def __init__(
        self, config: Config, start: datetime = SATURDAY_11, security: SecurityModule | None = None
    ) -> None:
        """The config loaded through `security`: by default the software module on the
        config's master key file (`self.keystore`)."""
        self.config = config
        self.clock = FixedClock(start)
        self.engine = make_engine(config.gateway.database)
        migrate(self.engine)
        self.keystore = FileKeyStore(config.issuer.master_key)
        self.security = security or SoftwareSecurityModule(self.keystore)
        with unit_of_work(self.engine) as session:
            load_into_ledger(session, config, self.security, start)
        self.gateway = self.new_gateway(self.security)

    def new_gateway(self, security: SecurityModule | None = None) -> Gateway:
        """Another gateway on the same ledger and keys, as a restarted or second process is:
        it shares nothing in memory with the first (its own key store, its own key cache).
        Another kind of module (a device every process shares) is used again as it is."""
        if security is None and isinstance(self.security, SoftwareSecurityModule):
            security = SoftwareSecurityModule(FileKeyStore(self.config.issuer.master_key))
        chosen = security or self.security
        return Gateway(config=self.config, engine=self.engine, clock=self.clock, security=chosen)

    def terminal(self, terminal_id: str = "10000001") -> SpecTerminal:
        merchant, suite, tmk = TMKS[terminal_id]
        return SpecTerminal(terminal_id, merchant, suite, bytes.fromhex(tmk))

    def raw(self, payload: bytes) -> bytes | None:
        return self.gateway.handle(payload).payload

    def send(self, terminal: SpecTerminal, payload: bytes) -> Answer:
        answer = self.raw(payload)
        assert answer is not None, "the gateway closed the link"
        return terminal.check(payload, answer)

    def signed_on(self, terminal_id: str = "10000001", with_tdk: bool = False) -> SpecTerminal:
        terminal = self.terminal(terminal_id)
        answer = self.send(terminal, terminal.sign_on(with_tdk))
        assert answer.code == "00"
        terminal.adopt_sign_on(answer)
        return terminal

    def redeem(
        self,
        terminal: SpecTerminal,
        card: str,
        amount_fen: int,
        *,
        pin: str | None = None,
        partial: bool = False,
        keyed: bool = False,
        encrypted: bool = False,
    ) -> tuple[bytes, Answer]:
        fields = terminal.card_fields(
            card, EXPIRY.get(card, "2812"), pin=pin, keyed=keyed, encrypt_track_data=encrypted
        )
        request = terminal.financial(
            "0200", "000000", "22", fields, amount_fen=amount_fen, partial=partial
        )
        return request, self.send(terminal, request)

    def void(
        self, terminal: SpecTerminal, card: str, original: Answer, original_trace: str, amount: int
    ) -> Answer:
        fields = terminal.card_fields(card, EXPIRY.get(card, "2812"))
        extra: dict[int, str | bytes] = {37: original.text(37), 61: terminal.batch + original_trace}
        request = terminal.financial("0200", "200000", "23", fields, amount_fen=amount, extra=extra)
        return self.send(terminal, request)

    def refund(
        self,
        terminal: SpecTerminal,
        card: str,
        original: Answer,
        original_batch_trace: str,
        amount: int,
    ) -> Answer:
        fields = terminal.card_fields(card, EXPIRY.get(card, "2812"))
        extra: dict[int, str | bytes] = {
            37: original.text(37),
            61: original_batch_trace + original.text(13),
        }
        request = terminal.financial("0220", "200000", "25", fields, amount_fen=amount, extra=extra)
        return self.send(terminal, request)


@contextlib.contextmanager
def decided_and_held_open(
    gateway: Gateway, payload: bytes, answers: dict[str, bytes | None], name: str
) -> Iterator[None]:
    """`gateway` decides `payload` (a redemption) on a thread of its own and keeps its
    transaction open (a slow commit, a stalled process) for the length of the block; its
    answer lands in `answers[name]` once the block has ended."""
    handlers = gateway._transactions._handlers
    decide = handlers[Kind.REDEMPTION]
    decided, go = threading.Event(), threading.Event()

    def held_open(orm: object, context: object) -> object:
        outcome = decide(orm, context)  # type: ignore[arg-type]
        decided.set()
        go.wait(30)
        return outcome

    handlers[Kind.REDEMPTION] = held_open  # type: ignore[assignment]
    deciding = threading.Thread(
        target=lambda: answers.__setitem__(name, gateway.handle(payload).payload)
    )
    deciding.start()
    try:
        assert decided.wait(30)
        yield
    finally:
        go.set()
        deciding.join(30)
        handlers[Kind.REDEMPTION] = decide

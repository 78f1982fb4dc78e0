"""Sessions in the ledger (issue 8): a terminal carries on across a restart or another process;
the keys are sealed, written with the sign-on's commit, removed with the sign-off's; one read per
group; unsealed once per sign-on per process; a cached copy never outlives its keys."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import event, select

from cardcodec import crypto
from cardcodec.crypto import Suite
from gateway import sessions as sessions_module
from gateway.handler import Gateway
from gateway.keystore import FileKeyStore
from gateway.ledger import unit_of_work
from gateway.ledger.models import KeySuite, TerminalSession
from gateway.security import KeyHandle, SoftwareSecurityModule
from tests.gateway_harness import DIAMOND, EXPIRY, GOLD_PIN, Harness, demo_config
from tests.spec_terminal import Answer, SpecTerminal, build


@pytest.fixture
def harness(tmp_path: Path, ledger_url: str) -> Iterator[Harness]:
    harness = Harness(demo_config(tmp_path, ledger_url))
    yield harness
    harness.engine.dispose()


class CountingModule(SoftwareSecurityModule):
    """The software module, counting how often stored keys are unsealed."""

    opened = 0

    def open_keys(self, terminal_id: str, suite: Suite, sealed: bytes) -> KeyHandle:
        self.opened += 1
        return super().open_keys(terminal_id, suite, sealed)


def send(gateway: Gateway, terminal: SpecTerminal, payload: bytes) -> Answer:
    answer = gateway.handle(payload).payload
    assert answer is not None, "the gateway closed the link"
    return terminal.check(payload, answer)


def redemption(terminal: SpecTerminal, card: str = DIAMOND, amount_fen: int = 1000) -> bytes:
    fields = terminal.card_fields(card, EXPIRY[card])
    return terminal.financial("0200", "000000", "22", fields, amount_fen=amount_fen)


def sign_on(gateway: Gateway, terminal: SpecTerminal, with_tdk: bool = False) -> None:
    answer = send(gateway, terminal, terminal.sign_on(with_tdk))
    assert answer.code == "00"
    terminal.adopt_sign_on(answer)


def sign_off(gateway: Gateway, terminal: SpecTerminal) -> Answer:
    fields = {11: terminal.next_trace(), **terminal.ids(), 60: f"00{terminal.batch}002"}
    return send(gateway, terminal, terminal.signed("0820", fields))


def stored(harness: Harness, terminal_id: str = "10000001") -> TerminalSession | None:
    with unit_of_work(harness.engine) as session:
        row = session.scalars(
            select(TerminalSession).where(TerminalSession.terminal_id == terminal_id)
        ).one_or_none()
        if row is not None:
            session.expunge(row)
        return row


def stale_copy(terminal: SpecTerminal) -> SpecTerminal:
    """The terminal as it was, keys included, with traces of its own (an attacker's capture)."""
    stale = copy.copy(terminal)
    stale.trace = 500000
    return stale


def test_a_restarted_gateway_carries_a_signed_on_terminal_on(harness: Harness) -> None:
    """After a restart (a new gateway, nothing shared in memory) the terminal's MAC is checked
    under its stored keys: approved without a new sign-on, and the answer MAC'd under them."""
    terminal = harness.signed_on("10000002", with_tdk=True)
    restarted = harness.new_gateway()
    fields = terminal.card_fields(GOLD_PIN, "2812", pin="123456", encrypt_track_data=True)
    request = terminal.financial("0200", "000000", "22", fields, amount_fen=1000)
    assert send(restarted, terminal, request).code == "00"


def test_the_row_holds_sealed_keys_and_the_lifetime(harness: Harness) -> None:
    """The sign-on's row: suite, keys sealed (no clear key in it), signed on now, expiring after
    the configured lifetime; a new sign-on replaces it under a new generation."""
    terminal = harness.signed_on(with_tdk=True)
    first = stored(harness)
    assert first is not None and first.suite is KeySuite.TDES
    assert terminal.tdk is not None
    for key in (terminal.pik, terminal.mak, terminal.tdk):
        assert key not in first.keys_sealed
    assert first.signed_on_at == harness.clock.now()
    assert first.expires_at - first.signed_on_at == harness.config.gateway.key_lifetime
    sign_on(harness.gateway, terminal)
    second = stored(harness)
    assert second is not None and second.generation > first.generation
    assert second.keys_sealed != first.keys_sealed


def test_sign_off_deletes_the_row_and_every_process_sees_it(harness: Harness) -> None:
    """A sign-off through one process removes the row; another process that had the keys
    cached refuses the old keys (A0) at once."""
    terminal = harness.signed_on()
    other = harness.new_gateway()
    assert send(other, terminal, redemption(terminal)).code == "00"  # other caches the keys
    stale = stale_copy(terminal)
    assert sign_off(harness.gateway, terminal).code == "00"
    assert stored(harness) is None
    answer = send(other, stale, redemption(stale))
    assert answer.code == "A0"
    assert answer.header.hex() == "603103310000"


def test_a_sign_on_through_another_process_retires_the_cached_keys(harness: Harness) -> None:
    """Process A has the keys of generation 1 cached; the terminal signs on again through B.
    A refuses a MAC under the old keys and accepts one under the new, without a restart."""
    first = harness.gateway
    terminal = harness.signed_on()
    assert send(first, terminal, redemption(terminal)).code == "00"
    stale = stale_copy(terminal)
    sign_on(harness.new_gateway(), terminal)
    assert send(first, stale, redemption(stale)).code == "A0"
    assert send(first, terminal, redemption(terminal)).code == "00"


def test_a_failed_sign_on_leaves_the_stored_keys(harness: Harness) -> None:
    """A sign-on answered A7 (suite mismatch) changes nothing: same row, old keys still work."""
    terminal = harness.signed_on()
    before = stored(harness)
    wrong_suite = stale_copy(terminal)
    wrong_suite.suite = "sm4"
    assert send(harness.gateway, wrong_suite, wrong_suite.sign_on()).code == "A7"
    after = stored(harness)
    assert before is not None and after is not None
    assert (after.generation, after.keys_sealed) == (before.generation, before.keys_sealed)
    assert send(harness.new_gateway(), terminal, redemption(terminal)).code == "00"


def test_keys_expire_by_the_stored_time_on_the_injected_clock(harness: Harness) -> None:
    """A process that never saw the sign-on honours the stored expiry: good one second before
    the end of the lifetime, A0 at its end."""
    terminal = harness.signed_on()
    lifetime = harness.config.gateway.key_lifetime
    harness.clock.advance(lifetime - timedelta(seconds=1))
    assert send(harness.new_gateway(), terminal, redemption(terminal)).code == "00"
    harness.clock.advance(timedelta(seconds=1))
    assert send(harness.new_gateway(), terminal, redemption(terminal)).code == "A0"


def test_keys_are_unsealed_once_per_sign_on_per_process(harness: Harness) -> None:
    """The process that issued the keys never unseals them; another unseals them once for any
    number of requests, and once more after the next sign-on."""
    issuing = CountingModule(harness.keystore)
    harness.gateway = harness.new_gateway(issuing)
    terminal = harness.signed_on()
    for _ in range(3):
        assert harness.redeem(terminal, DIAMOND, 100)[1].code == "00"
    assert issuing.opened == 0
    reading = CountingModule(FileKeyStore(harness.config.issuer.master_key))
    other = harness.new_gateway(reading)
    for _ in range(3):
        assert send(other, terminal, redemption(terminal, amount_fen=100)).code == "00"
    assert reading.opened == 1
    sign_on(harness.gateway, terminal)
    for _ in range(2):
        assert send(other, terminal, redemption(terminal, amount_fen=100)).code == "00"
    assert reading.opened == 2


def test_a_group_reads_its_sessions_with_one_query(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group of requests from two terminals reads `terminal_sessions` once, whatever its size,
    and writes it only for a sign-on. (The read goes to the driver's own connection, so it is
    counted there; SQLAlchemy's executions are counted by its event.)"""
    one, two = harness.signed_on("10000001"), harness.signed_on("20000001")
    group = [redemption(one, amount_fen=100) for _ in range(5)]
    group += [redemption(two, amount_fen=100) for _ in range(5)]
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if "terminal_sessions" in statement:
            statements.append(statement.split(maxsplit=1)[0].upper())

    class Counted:
        def __init__(self, driver: Any) -> None:
            self._driver = driver

        def execute(self, statement: str, *rest: Any) -> Any:
            seen(None, None, statement)
            return self._driver.execute(statement, *rest)

    driver_reads = sessions_module.reading_driver

    @contextmanager
    def counted(engine: Any) -> Iterator[Counted]:
        with driver_reads(engine) as driver:
            yield Counted(driver)

    monkeypatch.setattr(sessions_module, "reading_driver", counted)
    event.listen(harness.engine, "before_cursor_execute", seen)
    try:
        replies = harness.gateway.handle_group(group)
    finally:
        event.remove(harness.engine, "before_cursor_execute", seen)
    codes = [one.check(p, r.payload).code for p, r in zip(group[:5], replies[:5], strict=True)]
    codes += [two.check(p, r.payload).code for p, r in zip(group[5:], replies[5:], strict=True)]
    assert codes == ["00"] * 10
    assert statements == ["SELECT"]


def test_keys_that_do_not_open_are_not_a_session(harness: Harness, tmp_path: Path) -> None:
    """A process whose module cannot open the stored keys (another master key) treats the
    terminal as not signed on: A0 with sign on again, nothing else breaks."""
    terminal = harness.signed_on()
    foreign = SoftwareSecurityModule(FileKeyStore(tmp_path / "foreign.key"))
    answer = send(harness.new_gateway(foreign), terminal, redemption(terminal))
    assert answer.code == "A0"
    assert answer.header.hex() == "603103310000"


def test_a_tmk_that_does_not_open_answers_the_sign_on_96(harness: Harness, tmp_path: Path) -> None:
    """A sign-on whose TMK the module cannot open: 96, and the stored session stays."""
    terminal = harness.signed_on()
    before = stored(harness)
    foreign = SoftwareSecurityModule(FileKeyStore(tmp_path / "foreign.key"))
    answer = send(harness.new_gateway(foreign), terminal, terminal.sign_on())
    assert answer.code == "96"
    after = stored(harness)
    assert before is not None and after is not None and after.generation == before.generation


def test_an_echo_from_another_process_knows_the_terminal_is_signed_on(harness: Harness) -> None:
    """The echo's header digit comes from the stored session: 0 (no sign on again) when it is
    there, 3 after the sign-off."""
    terminal = harness.signed_on()
    echo = build("0820", {11: terminal.next_trace(), **terminal.ids(), 60: "00000001301"})
    assert send(harness.new_gateway(), terminal, echo).header.hex() == "603100310000"
    assert sign_off(harness.gateway, terminal).code == "00"
    echo = build("0820", {11: terminal.next_trace(), **terminal.ids(), 60: "00000001301"})
    assert send(harness.new_gateway(), terminal, echo).header.hex() == "603103310000"


class RetiringModule(SoftwareSecurityModule):
    """The software module, noting the MAKs of the keys it is told to retire."""

    def __init__(self, keystore: FileKeyStore) -> None:
        super().__init__(keystore)
        self.retired: list[bytes] = []

    def retire_keys(self, keys: KeyHandle) -> None:
        self.retired.append(cast(Any, keys).keys.mak)
        super().retire_keys(keys)


def test_keys_of_an_ended_sign_on_are_retired(harness: Harness) -> None:
    """A new sign-on retires the keys of the one before; a sign-off retires its keys; the
    keys in use are never retired."""
    module = RetiringModule(FileKeyStore(harness.config.issuer.master_key))
    gateway = harness.new_gateway(module)
    terminal = harness.terminal("10000001")
    sign_on(gateway, terminal)
    first = terminal.mak
    assert send(gateway, terminal, redemption(terminal, amount_fen=100)).code == "00"
    sign_on(gateway, terminal)
    assert module.retired == [first]
    assert send(gateway, terminal, redemption(terminal, amount_fen=100)).code == "00"
    second = terminal.mak
    assert sign_off(gateway, terminal).code == "00"
    assert module.retired == [first, second]


def test_a_retired_keys_cipher_contexts_are_gone_from_every_thread(harness: Harness) -> None:
    """The software module drops the contexts its MAC work built for the retired MAK, in the
    thread that built them too."""
    terminal = harness.signed_on("10000001")
    built = threading.Event()
    retired = threading.Event()
    held: list[bool] = []

    def answer_in_another_thread() -> None:
        mak = terminal.mak
        assert send(harness.gateway, terminal, redemption(terminal, amount_fen=100)).code == "00"
        held.append(any(key == mak for _, key in crypto._CONTEXTS.encryptors))
        built.set()
        retired.wait(10)
        held.append(any(key == mak for _, key in crypto._CONTEXTS.encryptors))

    thread = threading.Thread(target=answer_in_another_thread)
    thread.start()
    assert built.wait(10)
    old = terminal.mak
    sign_on(harness.gateway, terminal)
    assert terminal.mak != old
    retired.set()
    thread.join(10)
    assert held == [True, False]

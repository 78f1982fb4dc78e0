"""Two gateway processes on one PostgreSQL ledger never deadlock over a group's rows.

Two gateways on two engines (as two `--workers` processes have) decide a group each, on two
threads. A gate pauses each group at the start of one of its requests, so that both hold
what they took first before either goes on: each scenario is an interleaving in which the
rows were once taken in opposite orders. PostgreSQL broke each of them after
`deadlock_timeout` (1 s), the losing group ran again one request at a time, and its answers
came a second late. Now every group takes its terminals and cards first, in one order
(`HotLedger.lock_group`), so one group waits for the other instead: the gate of the group
that waits is never reached while the other stands at its own, which then goes on alone
after `GATE_S`.

The terminals of the last three scenarios have links to both processes at once, as a
terminal that reconnected to the other process while its old link's request was in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cardcodec.profile import Kind
from gateway.clock import SHANGHAI
from gateway.config import load_config
from gateway.handler import Gateway
from gateway.keystore import FileKeyStore
from gateway.ledger import make_engine
from gateway.ledger.hotpath import terminal_lock_key
from gateway.security import SoftwareSecurityModule
from tests import pg
from tests.bench_gateway import MERCHANT, card, write_config
from tests.gateway_harness import Harness, decided_and_held_open
from tests.spec_terminal import SpecTerminal, parse

START = datetime(2026, 11, 18, 10, 0, tzinfo=SHANGHAI)
EXPIRY = "3012"
X, Y, Z, W = (card(serial) for serial in (1, 2, 3, 4))  # in sorted order
GATE_S = 2.0  # how long a gated group waits for the other before going on alone
_databases = itertools.count(1)


class TwoProcesses:
    """A ledger with six signed-on terminals and four cards, and two gateways on it."""

    def __init__(self, server: pg.PgServer, folder: Path) -> None:
        keys = write_config(folder, terminals=6, cards=4)
        url = server.create_database(f"lock_order_{next(_databases)}")
        config = load_config(folder / "bench.toml", url)
        issuer = dataclasses.replace(
            config.issuer, master_key=folder / "master.key", signing_key=folder / "issuer.pem"
        )
        config = dataclasses.replace(config, issuer=issuer)
        self.harness = Harness(config, START)
        self.first = self.harness.gateway
        self.second = Gateway(
            config=config,
            engine=make_engine(url),
            clock=self.harness.clock,
            security=SoftwareSecurityModule(FileKeyStore(config.issuer.master_key)),
        )
        self.terminals: list[SpecTerminal] = []
        for terminal_id, tmk in keys.items():
            terminal = SpecTerminal(terminal_id, MERCHANT, "3des", tmk)
            answer = self.harness.send(terminal, terminal.sign_on())
            assert answer.code == "00"
            terminal.adopt_sign_on(answer)
            self.terminals.append(terminal)

    def close(self) -> None:
        self.harness.engine.dispose()
        self.second._engine.dispose()

    def redemption(self, terminal: int, number: str) -> bytes:
        spec = self.terminals[terminal]
        fields = spec.card_fields(number, EXPIRY)
        return spec.financial("0200", "000000", "22", fields, amount_fen=1000)

    def balance(self, terminal: int, number: str) -> bytes:
        spec = self.terminals[terminal]
        return spec.financial("0200", "310000", "01", spec.card_fields(number, EXPIRY))

    def reversal(self, terminal: int, original: bytes) -> bytes:
        """The 0400 of `original` (§4.6): its fields, without card data, PIN or MAC."""
        _, fields, _, _ = parse(original)
        for number in (26, 35, 52, 53, 62, 37, 64):
            fields.pop(number, None)
        fields[39] = "98"
        return self.terminals[terminal].signed("0400", fields)

    def settlement(self, terminal: int) -> bytes:
        """A 0500 with zero totals (the gateway's own may differ: unbalanced is an answer)."""
        spec = self.terminals[terminal]
        fields = {11: spec.next_trace(), **spec.ids(), 48: "0" * 62, 49: "156"}
        fields.update({60: f"00{spec.batch}201", 63: "01 "})
        return spec.signed("0500", fields)

    def approved_alone(self, payload: bytes) -> None:
        reply = self.first.handle(payload).payload
        assert reply is not None and parse(reply)[1][39] == "00"


@pytest.fixture
def world(postgres_server: pg.PgServer, tmp_path: Path) -> Iterator[TwoProcesses]:
    made = TwoProcesses(postgres_server, tmp_path)
    try:
        yield made
    finally:
        made.close()


def gate_both(world: TwoProcesses, kind: Kind, call: int) -> None:
    """Each gateway pauses before the `call`-th request of `kind` it decides, until the
    other reaches its own gate too, or for GATE_S."""
    meeting = threading.Barrier(2, timeout=GATE_S)
    for gateway in (world.first, world.second):
        handlers = gateway._transactions._handlers
        decide = handlers[kind]
        calls = itertools.count(1)

        def gated(
            orm: object,
            context: object,
            decide: Callable[..., object] = decide,
            calls: Iterator[int] = calls,
        ) -> object:
            if next(calls) == call:
                # Broken: the other group waits for this one's locks, so no cycle formed.
                with contextlib.suppress(threading.BrokenBarrierError):
                    meeting.wait()
            return decide(orm, context)

        handlers[kind] = gated  # type: ignore[assignment]


def codes_of_both(world: TwoProcesses, first: list[bytes], second: list[bytes]) -> list[str]:
    """Each group decided on a thread of its own; every answer's field 39, in order."""
    replies: dict[int, list[str]] = {}

    def decide(index: int, gateway: Gateway, group: list[bytes]) -> None:
        answers = gateway.handle_group(group)
        replies[index] = [str(parse(a.payload)[1][39]) if a.payload else "-" for a in answers]

    threads = [
        threading.Thread(target=decide, args=(0, world.first, first)),
        threading.Thread(target=decide, args=(1, world.second, second)),
    ]
    with capture_logs() as logs:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert [line for line in logs if line["event"] == "group_ran_alone"] == []
    return replies[0] + replies[1]


def decided_without_deadlock(
    world: TwoProcesses,
    server: pg.PgServer,
    gate: tuple[Kind, int],
    first: list[bytes],
    second: list[bytes],
) -> list[str]:
    """Both groups decided, each gated before the `gate[1]`-th request of kind `gate[0]`:
    their answers' codes, once PostgreSQL has been seen to break no deadlock."""
    before = deadlocks(server)
    gate_both(world, *gate)
    codes = codes_of_both(world, first, second)
    assert deadlocks(server) == before
    return codes


def deadlocks(server: pg.PgServer) -> int:
    log = (server.folder / "server.log").read_text(encoding="utf-8", errors="replace")
    return log.count("deadlock detected")


def test_reversals_lock_their_originals_cards_with_the_groups_others(
    world: TwoProcesses, postgres_server: pg.PgServer
) -> None:
    """Each group redeems on the card whose earlier redemption the other reverses: the
    reversal's card (its original's) used to be locked only when the reversal ran."""
    on_x, on_y = world.redemption(2, X), world.redemption(3, Y)
    world.approved_alone(on_x)
    world.approved_alone(on_y)
    first = [world.redemption(0, Y), world.reversal(2, on_x)]
    second = [world.redemption(1, X), world.reversal(3, on_y)]
    codes = decided_without_deadlock(world, postgres_server, (Kind.REVERSAL, 1), first, second)
    assert codes == ["00"] * 4


def test_batch_counts_of_terminals_on_both_processes(
    world: TwoProcesses, postgres_server: pg.PgServer
) -> None:
    """Balance inquiries of two terminals in opposite orders, on four cards: each updates
    its terminal's batch count row, which stays locked until the commit."""
    world.approved_alone(world.balance(0, X))
    world.approved_alone(world.balance(1, Y))
    first = [world.balance(0, X), world.balance(1, Y)]
    second = [world.balance(1, Z), world.balance(0, W)]
    codes = decided_without_deadlock(world, postgres_server, (Kind.BALANCE, 2), first, second)
    assert codes == ["00"] * 4


def test_settlements_of_terminals_on_both_processes(
    world: TwoProcesses, postgres_server: pg.PgServer
) -> None:
    """Each group redeems at the terminal the other settles: the settlement's lock on the
    terminal's row used to conflict with the key share lock every row naming it holds.
    Serialised, the later group's redemption names the batch the earlier one closed."""
    first = [world.redemption(0, X), world.settlement(1)]
    second = [world.redemption(1, Y), world.settlement(0)]
    codes = decided_without_deadlock(world, postgres_server, (Kind.SETTLEMENT, 1), first, second)
    # One group after the other: the later one's redemption names a batch just closed.
    assert sorted(codes) == ["00", "00", "00", "22"]


def test_reversals_sent_again_on_the_other_process(
    world: TwoProcesses, postgres_server: pg.PgServer
) -> None:
    """Two reversals of originals never received, each sent on both processes in opposite
    orders: the second insert of a tombstone's key waits for the first's commit."""
    one = world.reversal(0, world.redemption(0, X))
    two = world.reversal(1, world.redemption(1, Y))
    codes = decided_without_deadlock(
        world, postgres_server, (Kind.REVERSAL, 2), [one, two], [two, one]
    )
    assert codes == ["00"] * 4


def test_a_reversal_waits_for_its_original_still_in_the_other_process(
    world: TwoProcesses,
) -> None:
    """The terminal reconnected to the other process and sent the reversal there while its
    redemption's transaction was still open: alone in its group, the reversal waits for the
    terminal's lock, then finds the original committed and undoes it. Without the wait it
    found no original, answered 00 and left the points taken (§4.6)."""
    redemption = world.redemption(0, X)
    reversal = world.reversal(0, redemption)
    before = world.harness.send(world.terminals[0], world.balance(0, X)).balance
    answers: dict[str, bytes | None] = {}
    second = threading.Thread(
        target=lambda: answers.__setitem__("reversal", world.second.handle(reversal).payload)
    )
    with decided_and_held_open(world.first, redemption, answers, "redemption"):
        second.start()
        second.join(1.0)
        waited = second.is_alive()
    second.join(30)
    assert waited  # the reversal was not decided while its original's transaction was open
    codes = [parse(answers[name] or b"")[1][39] for name in ("redemption", "reversal")]
    assert codes == ["00", "00"]
    after = world.harness.send(world.terminals[0], world.balance(0, X)).balance
    assert after == before  # the points came back


def test_a_reversal_whose_original_commits_while_its_group_waits_locks_its_card_in_order(
    world: TwoProcesses, postgres_server: pg.PgServer
) -> None:
    """The reversal's group, on the second process, waits for its terminal's lock while the
    original is uncommitted on the first. Its original's card was read before that wait,
    found nowhere, and so not locked with the group's other card; the reversal then locked
    it when it ran, behind that other card. A third group holding the reversal's card and
    waiting for the other one deadlocked with it (a second in which neither answered, then
    `group_ran_alone`). The card is now read once the terminal's lock is held, and locked
    with the others, in order: the third group waits instead."""
    third = Gateway(
        config=world.harness.gateway._config,
        engine=make_engine(world.harness.engine.url),
        clock=world.harness.clock,
        security=world.second._security,
    )
    original = world.redemption(0, X)
    group = [world.redemption(1, Y), world.reversal(0, original)]
    other = [world.redemption(2, X), world.redemption(3, Y)]
    handlers = world.second._transactions._handlers
    reverse, go = handlers[Kind.REVERSAL], threading.Event()

    def gated(orm: object, context: object) -> object:
        go.wait(30)  # until the third group holds or waits for X
        return reverse(orm, context)  # type: ignore[arg-type]

    handlers[Kind.REVERSAL] = gated  # type: ignore[assignment]
    replies: dict[str, list[str]] = {}

    def decide(name: str, gateway: Gateway, payloads: list[bytes]) -> None:
        answers = gateway.handle_group(payloads)
        replies[name] = [str(parse(a.payload)[1][39]) if a.payload else "-" for a in answers]

    before = deadlocks(postgres_server)
    threads = [
        threading.Thread(target=decide, args=("group", world.second, group)),
        threading.Thread(target=decide, args=("other", third, other)),
    ]
    held: dict[str, bytes | None] = {}
    try:
        with capture_logs() as logs:
            with decided_and_held_open(world.first, original, held, "original"):
                threads[0].start()
                threads[0].join(0.5)  # waiting for terminal 0's lock
            time.sleep(0.5)  # the original committed: the group takes its cards
            threads[1].start()
            threads[1].join(0.5)  # the third group takes X, or waits for it
            go.set()
            for thread in threads:
                thread.join(30)
    finally:
        go.set()
        third._engine.dispose()
    assert [line for line in logs if line["event"] == "group_ran_alone"] == []
    assert deadlocks(postgres_server) == before
    assert parse(held["original"] or b"")[1][39] == "00"
    assert replies == {"group": ["00", "00"], "other": ["00", "00"]}


def test_a_reversal_run_alone_after_its_group_failed_waits_too(
    world: TwoProcesses, postgres_server: pg.PgServer
) -> None:
    """With a `lock_timeout` on the database, the reversal's wait for the terminal's lock
    fails its transaction, and it is run again alone (`Gateway._alone`). That run waits for
    the lock too, so while its original is uncommitted the answer is `96`, nothing changed,
    never `00` with the points kept; sent again once the original committed, it undoes it."""
    database = world.harness.engine.url.database
    with postgres_server.admin() as admin:
        admin.execute(f"ALTER DATABASE {database} SET lock_timeout = '300ms'")
    world.harness.engine.dispose()
    world.second._engine.dispose()
    redemption = world.redemption(0, X)
    reversal = world.reversal(0, redemption)
    before = world.harness.send(world.terminals[0], world.balance(0, X)).balance
    answers: dict[str, bytes | None] = {}
    with decided_and_held_open(world.first, redemption, answers, "redemption"):
        answers["reversal"] = world.second.handle(reversal).payload  # both tries time out
    codes = [parse(answers[name] or b"")[1][39] for name in ("redemption", "reversal")]
    assert codes == ["00", "96"]
    spent = world.harness.send(world.terminals[0], world.balance(0, X)).balance
    assert spent == before - 500  # the redemption stands, nothing was reversed
    again = world.second.handle(reversal).payload  # the terminal sends it again (§4.6)
    assert parse(again or b"")[1][39] == "00"
    assert world.harness.send(world.terminals[0], world.balance(0, X)).balance == before


def test_terminal_lock_keys_fit_a_bigint() -> None:
    """PostgreSQL's bigint range, and a key of its own for each of a thousand terminals."""
    keys = {terminal_lock_key(f"3{index:07d}") for index in range(1000)}
    assert len(keys) == 1000
    assert all(-(2**63) <= key < 2**63 for key in keys)

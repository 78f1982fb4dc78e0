"""Loading the config into the ledger, on both backends: an upsert by id that adds nothing the
second time, accrues config lots once through the journal, refuses a changed lot whole, keeps
the active/enabled history, encrypts TMKs and turns a changed PIN into an unlock."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.exc import IntegrityError

from gateway import bootstrap as bootstrap_module
from gateway.clock import SHANGHAI, FixedClock
from gateway.config import Config, load_config
from gateway.errors import BadInput
from gateway.keystore import FileKeyStore
from gateway.ledger import make_engine, migrate, operations, unit_of_work
from gateway.ledger.invariants import check_invariants
from gateway.ledger.models import (
    Base,
    Card,
    JournalTransaction,
    KeyCheck,
    Merchant,
    MerchantActiveChange,
    Terminal,
    TerminalEnabledChange,
    TransactionKind,
)
from gateway.loader import LoadReport, load_into_ledger, rule_from_json, rule_to_json
from gateway.rotation import rotate_master
from gateway.security import SoftwareSecurityModule
from tests.conftest import empty_postgres_ledger

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=SHANGHAI)
GOLD = "6688000000000000014"
DIAMOND = "6688001234567890124"
MERCHANT = "898310048990001"
TERMINAL = "10000001"
DEMO_TMK = bytes.fromhex("FD32139FDCE66744281F7C0090707DF2")
DEMO_CARDS = (
    GOLD,
    DIAMOND,
    "6688000000000000022",
    "6688000000000000030",
    "6688000000000000048",
)


def write_config(folder: Path, *replacements: tuple[str, str]) -> Config:
    """The demo config with each (old, new) replaced once, written into `folder` and loaded."""
    text = DEMO.read_text(encoding="utf-8")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vipgate.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


@pytest.fixture
def keystore(tmp_path: Path) -> FileKeyStore:
    return FileKeyStore(tmp_path / "keys" / "master.key")


def load(engine: Engine, config: Config, keystore: FileKeyStore, now: datetime = NOW) -> LoadReport:
    """Load through the software security module over `keystore`."""
    with unit_of_work(engine) as session:
        return load_into_ledger(session, config, SoftwareSecurityModule(keystore), now)


def row_counts(engine: Engine) -> dict[str, int]:
    """The number of rows in every ledger table."""
    with unit_of_work(engine) as session:
        return {
            table.name: session.scalar(select(func.count()).select_from(table)) or 0
            for table in Base.metadata.sorted_tables
        }


def test_first_load_creates_everything_and_accrues_lots_through_the_journal(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """Merchants, terminals and cards appear; each config lot is one accrual keyed config:N:i."""
    report = load(ledger_engine, write_config(tmp_path), keystore)
    assert (report.merchants, report.terminals, report.cards) == (2, 3, 5)
    assert (report.lots_accrued, report.points_accrued) == (6, 160150)
    with unit_of_work(ledger_engine) as session:
        keys = session.scalars(
            select(JournalTransaction.idempotency_key).where(
                JournalTransaction.kind == TransactionKind.ACCRUAL
            )
        ).all()
        assert sorted(keys) == sorted(
            [f"accrual:config:{GOLD}:0", f"accrual:config:{DIAMOND}:0"]
            + [f"accrual:config:{DIAMOND}:1"]
            + [f"accrual:config:{number}:0" for number in DEMO_CARDS[2:]]
        )
        assert operations.balances(session, DIAMOND, NOW) == operations.Balances(50000, 50000)
        assert check_invariants(session) == []
    assert not any(number in line for line in report.changes for number in DEMO_CARDS)


def test_loading_the_same_config_again_adds_nothing(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """A second load, later, changes no row and reports no change."""
    config = write_config(tmp_path)
    load(ledger_engine, config, keystore)
    before = row_counts(ledger_engine)
    report = load(ledger_engine, config, keystore, NOW + timedelta(days=3))
    assert report.changes == ()
    assert (report.lots_accrued, report.points_accrued) == (0, 0)
    assert row_counts(ledger_engine) == before


@pytest.mark.parametrize(
    "edit",
    [
        ("points = 100000", "points = 90000"),
        ('earned_on = "2026-03-01"', 'earned_on = "2026-03-02"'),
    ],
)
def test_changed_lot_is_refused_and_nothing_of_the_load_applied(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore, edit: tuple[str, str]
) -> None:
    """A lot whose figures changed after accrual is refused, naming the masked card and the lot
    index, and none of the load's other changes (a merchant, a terminal) is applied."""
    load(ledger_engine, write_config(tmp_path / "a"), keystore)
    before = row_counts(ledger_engine)
    changed = write_config(
        tmp_path / "b",
        edit,
        ("active = true", "active = false"),
        ("enabled = true", "enabled = false"),
    )
    with pytest.raises(BadInput, match=r"cards\[0\] \(668800\*{9}0014\)\.lots\[0\]") as raised:
        load(ledger_engine, changed, keystore)
    assert GOLD not in str(raised.value)
    assert row_counts(ledger_engine) == before
    with unit_of_work(ledger_engine) as session:
        merchant = session.get(Merchant, MERCHANT)
        terminal = session.get(Terminal, TERMINAL)
        assert merchant is not None and merchant.active
        assert terminal is not None and terminal.enabled


@pytest.mark.parametrize("earned_on", ["2026-11-23", "9999-12-31"])
def test_a_lot_earned_after_today_is_refused_and_nothing_applied(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore, earned_on: str
) -> None:
    """A config lot earned after the load's local date is refused as the accrual feed refuses
    it (the end of the calendar included), naming the masked card and the lot; an accrued
    lot is not looked at again, whatever the clock says later."""
    edit = ('earned_on = "2026-03-01"', f'earned_on = "{earned_on}"')
    config = write_config(tmp_path, edit)
    before = row_counts(ledger_engine)
    with pytest.raises(BadInput) as raised:
        load(ledger_engine, config, keystore)
    assert str(raised.value) == (
        f"{config.path}: cards[0] (668800*********0014).lots[0].earned_on: {earned_on} is after "
        "today (2026-11-22)"
    )
    assert row_counts(ledger_engine) == before
    load(ledger_engine, write_config(tmp_path / "ok"), keystore)
    earlier = datetime(2026, 1, 1, tzinfo=SHANGHAI)  # before the demo's lots were earned
    assert load(ledger_engine, write_config(tmp_path / "ok"), keystore, earlier).changes == ()


def test_every_change_of_active_and_enabled_is_recorded_with_its_time(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """History rows: the first value, each flip with its load time, and nothing for no change."""
    on = write_config(tmp_path / "on")
    off = write_config(
        tmp_path / "off", ("active = true", "active = false"), ("enabled = true", "enabled = false")
    )
    times = [NOW + timedelta(hours=hours) for hours in range(4)]
    load(ledger_engine, on, keystore, times[0])
    report = load(ledger_engine, off, keystore, times[1])
    load(ledger_engine, off, keystore, times[2])
    load(ledger_engine, on, keystore, times[3])
    assert f"merchant {MERCHANT}: active true -> false" in report.changes
    assert f"terminal {TERMINAL}: enabled true -> false" in report.changes
    expected = [(True, times[0]), (False, times[1]), (True, times[3])]
    with unit_of_work(ledger_engine) as session:
        merchant_history = session.execute(
            select(MerchantActiveChange.active, MerchantActiveChange.changed_at)
            .where(MerchantActiveChange.merchant_id == MERCHANT)
            .order_by(MerchantActiveChange.id)
        ).all()
        terminal_history = session.execute(
            select(TerminalEnabledChange.enabled, TerminalEnabledChange.changed_at)
            .where(TerminalEnabledChange.terminal_id == TERMINAL)
            .order_by(TerminalEnabledChange.id)
        ).all()
    assert [tuple(row) for row in merchant_history] == expected
    assert [tuple(row) for row in terminal_history] == expected


def test_a_load_without_switches_keeps_the_ledgers_and_says_so(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """A command's load (`switches=False`) with a config whose switches differ from the
    ledger's keeps the ledger's, writes no history, and says why in a note; the rest of the
    config is loaded. A merchant or terminal the ledger does not have yet takes the config's
    switch."""
    on = write_config(tmp_path / "on")
    off = write_config(
        tmp_path / "off", ("active = true", "active = false"), ("enabled = true", "enabled = false")
    )
    load(ledger_engine, off, keystore)
    before = row_counts(ledger_engine)
    renamed = write_config(
        tmp_path / "renamed",
        ('name = "Nanjing Road Department Store"', 'name = "Nanjing Road Store"'),
    )
    with unit_of_work(ledger_engine) as session:
        report = load_into_ledger(
            session, renamed, SoftwareSecurityModule(keystore), NOW, switches=False
        )
    assert report.changes == (
        f"merchant {MERCHANT}: name Nanjing Road Department Store -> Nanjing Road Store",
    )
    assert report.notes[:2] == (
        f"merchant {MERCHANT}: active stays false as the ledger has it (the config says true);"
        " only `vipgate ledger load` or `vipgate serve` with this config changes it",
        f"terminal {TERMINAL}: enabled stays false as the ledger has it (the config says true);"
        " only `vipgate ledger load` or `vipgate serve` with this config changes it",
    )
    assert row_counts(ledger_engine) == before  # no history row
    with unit_of_work(ledger_engine) as session:
        merchant = session.get(Merchant, MERCHANT)
        terminal = session.get(Terminal, TERMINAL)
        assert merchant is not None and not merchant.active
        assert merchant.name == "Nanjing Road Store"
        assert terminal is not None and not terminal.enabled
    switched = load(ledger_engine, on, keystore).changes  # `vipgate ledger load`'s way
    assert f"merchant {MERCHANT}: active false -> true" in switched
    assert f"terminal {TERMINAL}: enabled false -> true" in switched
    fresh = make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    migrate(fresh)
    with unit_of_work(fresh) as session:
        load_into_ledger(session, off, SoftwareSecurityModule(keystore), NOW, switches=False)
    with unit_of_work(fresh) as session:
        terminal = session.get(Terminal, TERMINAL)
        assert terminal is not None and not terminal.enabled  # new: the config's switch
    fresh.dispose()


COFFEE_TERMINAL = """[[terminals]]
id = "20000001"
merchant = "898310058120002"
enabled = true
suite = "3des"
tmk = "0123456789ABCDEFFEDCBA9876543210"
"""


def test_a_terminal_left_out_of_the_config_stays_and_the_load_says_its_fee_is_still_paid(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """A load is an upsert by id (operations.md): a terminal the ledger has and the config
    leaves out stays as it is, enabled, with its history. Its terminal fee is still paid
    (§5) though a gateway on that config answers it `97`, so every load says so, as a note,
    not a change; `enabled = false` in the config stops it."""
    full = write_config(tmp_path / "full")
    without = write_config(tmp_path / "without", (COFFEE_TERMINAL, ""))
    load(ledger_engine, full, keystore, NOW)
    report = load(ledger_engine, without, keystore, NOW + timedelta(hours=1))
    assert report.changes == ()
    assert report.notes == (
        "terminal 20000001: enabled in the ledger but not in the config; its terminal fee is"
        " still paid: list it with enabled = false to stop it",
    )
    with unit_of_work(ledger_engine) as session:
        terminal = session.get(Terminal, "20000001")
        assert terminal is not None and terminal.enabled
        history = session.scalars(
            select(TerminalEnabledChange.enabled).where(
                TerminalEnabledChange.terminal_id == "20000001"
            )
        ).all()
    assert history == [True]
    disabled = write_config(
        tmp_path / "disabled",
        (COFFEE_TERMINAL, COFFEE_TERMINAL.replace("enabled = true", "enabled = false")),
    )
    assert load(ledger_engine, disabled, keystore, NOW + timedelta(hours=2)).notes == ()


def test_changed_pin_in_the_config_unlocks_the_card(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """Reloading the same PIN leaves a locked PIN locked; a new PIN unlocks it and verifies."""
    load(ledger_engine, write_config(tmp_path / "a"), keystore)
    with unit_of_work(ledger_engine) as session:
        for _ in range(3):
            operations.record_wrong_pin(session, GOLD)
    load(ledger_engine, write_config(tmp_path / "a"), keystore)
    with unit_of_work(ledger_engine) as session:
        card = operations.find_card(session, GOLD)
        assert card is not None and card.pin_locked and card.wrong_pin_count == 3
    changed = write_config(tmp_path / "b", ('pin = "123456"', 'pin = "654321"'))
    report = load(ledger_engine, changed, keystore)
    assert any(
        line.endswith("PIN changed (PIN unlocked, wrong tries reset)") for line in report.changes
    )
    with unit_of_work(ledger_engine) as session:
        card = operations.find_card(session, GOLD)
        assert card is not None and card.pin_hmac is not None
        assert (card.pin_locked, card.wrong_pin_count) == (False, 0)
        assert keystore.pin_matches(GOLD, "654321", card.pin_hmac)
        assert not keystore.pin_matches(GOLD, "123456", card.pin_hmac)


def test_tmk_is_stored_encrypted_and_kept_while_unchanged(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """The row holds an encrypted TMK that decrypts to the config's; a reload keeps the blob;
    a changed TMK is encrypted anew."""
    load(ledger_engine, write_config(tmp_path / "a"), keystore)
    stored = _stored_tmk(ledger_engine)
    assert DEMO_TMK not in stored
    assert keystore.decrypt_tmk(TERMINAL, stored) == DEMO_TMK
    load(ledger_engine, write_config(tmp_path / "a"), keystore)
    assert _stored_tmk(ledger_engine) == stored
    new_tmk = "00112233445566778899AABBCCDDEEFF"
    changed = write_config(tmp_path / "b", ("FD32139FDCE66744281F7C0090707DF2", new_tmk))
    report = load(ledger_engine, changed, keystore)
    assert report.changes == (f"terminal {TERMINAL}: TMK changed",)
    assert keystore.decrypt_tmk(TERMINAL, _stored_tmk(ledger_engine)) == bytes.fromhex(new_tmk)


def test_a_load_with_another_master_key_is_refused_and_changes_nothing(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """A process whose master key (and so PIN key) is not the ledger's: a host given no key
    file, which makes its own, or only `master.key` after a rotation. Its load would seal
    the TMKs anew and rewrite every PIN reference, locking the other instances out; it is
    refused before it writes anything."""
    config = write_config(tmp_path)
    load(ledger_engine, config, keystore)
    stored = _stored_tmk(ledger_engine)
    references = _pin_references(ledger_engine)
    replacement = FileKeyStore(tmp_path / "other" / "master.key")
    with pytest.raises(BadInput) as refused:
        load(ledger_engine, config, replacement)
    assert "not the PIN key this ledger's PIN references were made with" in str(refused.value)
    assert _stored_tmk(ledger_engine) == stored
    assert _pin_references(ledger_engine) == references
    load(ledger_engine, config, FileKeyStore(keystore.path))  # the right key: loads


def test_after_a_rotation_a_host_given_only_the_new_master_key_is_refused(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """After `keys rotate-master` the PIN key file holds the PIN key sealed under the new
    master key; a host given the new master key without it would make another PIN key from
    it. Its load is refused; given both files, it loads."""
    config = write_config(tmp_path)
    load(ledger_engine, config, keystore)
    rotate_master(ledger_engine, SoftwareSecurityModule(keystore))
    other_host = tmp_path / "host-b"
    other_host.mkdir()
    shutil.copy(keystore.path, other_host / "master.key")
    with pytest.raises(BadInput):
        load(ledger_engine, config, FileKeyStore(other_host / "master.key"))
    shutil.copy(keystore.pin_path, other_host / "master.key.pin")
    load(ledger_engine, config, FileKeyStore(other_host / "master.key"))


def test_a_host_with_the_keys_from_before_a_rotation_is_refused_and_changes_nothing(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """Host B keeps the master key and PIN key files host A had before A's `keys
    rotate-master`: the same PIN key, so the PIN key's check passes, but not the master key
    the TMKs are now sealed under. B's load would seal every TMK anew under the old key and A
    could sign no terminal on; it is refused before it writes anything. A still loads."""
    config = write_config(tmp_path)
    load(ledger_engine, config, keystore)
    host_b = tmp_path / "host-b"
    host_b.mkdir()
    shutil.copy(keystore.path, host_b / "master.key")
    shutil.copy(keystore.pin_path, host_b / "master.key.pin")
    rotate_master(ledger_engine, SoftwareSecurityModule(keystore))
    stored = _stored_tmk(ledger_engine)
    with pytest.raises(BadInput) as refused:
        load(ledger_engine, config, FileKeyStore(host_b / "master.key"))
    assert "not the master key this ledger's terminal master keys are sealed under" in str(
        refused.value
    )
    assert _stored_tmk(ledger_engine) == stored
    assert keystore.decrypt_tmk(TERMINAL, stored) == DEMO_TMK
    assert load(ledger_engine, config, FileKeyStore(keystore.path)).changes == ()


def test_a_ledger_without_a_master_key_check_takes_none_from_a_key_that_opens_no_tmk(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """A ledger made before the master key had a check value gets one at its first load,
    unless none of its terminals' TMKs opens under that load's key: that key is not the
    ledger's, and the load is refused with nothing written."""
    config = write_config(tmp_path)
    load(ledger_engine, config, keystore)
    with unit_of_work(ledger_engine) as session:
        session.execute(delete(KeyCheck))
    stored = _stored_tmk(ledger_engine)
    with pytest.raises(BadInput, match="not the master key this ledger's terminal master keys"):
        load(ledger_engine, config, FileKeyStore(tmp_path / "other" / "master.key"))
    assert _key_checks(ledger_engine) == []
    assert _stored_tmk(ledger_engine) == stored
    load(ledger_engine, config, keystore)  # the ledger's key: the checks are stored
    assert _key_checks(ledger_engine) == ["master key", "pin key"]


def test_a_damaged_tmk_row_is_sealed_again_from_the_config(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """Under the ledger's own master key, a TMK row that does not open is damaged: the load
    seals the config's key in its place, and says so."""
    config = write_config(tmp_path)
    load(ledger_engine, config, keystore)
    with unit_of_work(ledger_engine) as session:
        terminal = session.get(Terminal, TERMINAL)
        assert terminal is not None
        terminal.tmk_encrypted = terminal.tmk_encrypted[:-1] + bytes(
            [terminal.tmk_encrypted[-1] ^ 1]
        )
    report = load(ledger_engine, config, keystore)
    assert report.changes == (
        f"terminal {TERMINAL}: TMK encrypted again (the stored one did not open: a damaged row)",
    )
    assert keystore.decrypt_tmk(TERMINAL, _stored_tmk(ledger_engine)) == DEMO_TMK


def _key_checks(engine: Engine) -> list[str]:
    with unit_of_work(engine) as session:
        return list(session.scalars(select(KeyCheck.name).order_by(KeyCheck.name)))


def _pin_references(engine: Engine) -> list[bytes | None]:
    with unit_of_work(engine) as session:
        return [card.pin_hmac for card in session.query(Card).order_by(Card.number)]


def _stored_tmk(engine: Engine) -> bytes:
    with unit_of_work(engine) as session:
        terminal = session.get(Terminal, TERMINAL)
        assert terminal is not None
        return terminal.tmk_encrypted


def test_enrolled_in_the_config_records_a_past_enrolment(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """`enrolled = true` enrols as it is (whatever the points), at the load's time."""
    load(ledger_engine, write_config(tmp_path), keystore)
    with unit_of_work(ledger_engine) as session:
        small = operations.find_card(session, "6688000000000000048")
        silver = operations.find_card(session, "6688000000000000022")
        assert small is not None and small.enrolled and small.enrolled_at == NOW
        assert silver is not None and not silver.enrolled and silver.enrolled_at is None


def test_a_config_without_cards_deletes_nothing(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """Cards, lots and balances loaded earlier stay when a later config no longer lists them."""
    load(ledger_engine, write_config(tmp_path / "a"), keystore)
    before = row_counts(ledger_engine)
    text = DEMO.read_text(encoding="utf-8")
    (tmp_path / "b").mkdir()
    path = tmp_path / "b" / "vipgate.toml"
    path.write_text(text[: text.index("[[cards]]")], encoding="utf-8")
    report = load(ledger_engine, load_config(path), keystore)
    assert report.changes == ()
    assert row_counts(ledger_engine) == before


def test_rules_are_stored_as_json_that_reads_back_as_the_same_rules(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore
) -> None:
    """The merchants.rules column holds the config's rules, and reading it back gives them."""
    config = write_config(tmp_path)
    load(ledger_engine, config, keystore)
    with unit_of_work(ledger_engine) as session:
        merchant = session.get(Merchant, MERCHANT)
        assert merchant is not None
        stored = [rule_from_json(data) for data in merchant.rules]
    assert tuple(stored) == config.merchants[0].rules
    assert merchant.rules[0] == {
        "id": "diamond-weekend",
        "discount_bp": 1000,
        "tiers": ["diamond"],
        "days": ["sat", "sun"],
        "hours": "10:00-22:00",
        "valid_from": "2026-01-01",
        "valid_to": "2030-12-31",
        "min_amount_fen": 10000,
    }
    every = config.merchants[1].rules[0]
    assert rule_from_json(rule_to_json(every)) == every


def test_a_load_that_deadlocks_with_a_serving_gateway_runs_again(
    tmp_path: Path, keystore: FileKeyStore, postgres_ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load locking cards in config order against a gateway group holding them in another
    order: PostgreSQL breaks the deadlock by failing the load, which then runs again.

    The failure is seen through the load's own judgement of it: pg_stat_database counts the
    deadlock only when the failed backend flushes its statistics, up to seconds later."""
    judged: list[bool] = []
    deadlocked = bootstrap_module.deadlocked

    def spy(error: BaseException) -> bool:
        judged.append(deadlocked(error))
        return judged[-1]

    monkeypatch.setattr(bootstrap_module, "deadlocked", spy)
    url = empty_postgres_ledger(postgres_ledger)
    config = write_config(tmp_path)
    engine = make_engine(url)
    first, second = config.cards[0].number, config.cards[1].number
    try:
        load(engine, config, keystore)
        gateway = engine.connect()
        transaction = gateway.begin()
        lock = text("SELECT number FROM cards WHERE number = :number FOR UPDATE")
        gateway.execute(lock, {"number": second})  # a group holds the second card
        loading = ThreadPoolExecutor(1).submit(
            bootstrap_module._load,
            engine,
            config,
            SoftwareSecurityModule(keystore),
            FixedClock(NOW),
        )
        _wait_for_lock_wait(engine)  # the load holds the first card and waits for the second
        gateway.execute(lock, {"number": first})  # ... while the group wants the first
        transaction.commit()
        gateway.close()
        report = loading.result(timeout=30)
        assert report.cards == len(config.cards)
        assert judged == [True]  # one deadlock, one run again
    finally:
        engine.dispose()


def test_what_fails_after_the_load_is_not_run_again_and_rolls_the_load_back(
    ledger_engine: Engine, tmp_path: Path, keystore: FileKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command's work in the load's unit of work (`wired_unit`) that meets an integrity
    error: the load ran once (only the load's own conflicts run it again) and is rolled
    back with the work."""
    runs: list[int] = []

    def counted(*args: object, **options: bool) -> LoadReport:
        runs.append(1)
        return load_into_ledger(*args, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(bootstrap_module, "load_into_ledger", counted)
    config = write_config(tmp_path)
    security = SoftwareSecurityModule(keystore)
    loaded = bootstrap_module._loaded(ledger_engine, config, security, FixedClock(NOW))
    with pytest.raises(IntegrityError), loaded as (session, report):
        assert report.cards == len(config.cards)
        session.execute(text("INSERT INTO merchants SELECT * FROM merchants"))
    assert runs == [1]
    assert row_counts(ledger_engine)["merchants"] == 0


def _wait_for_lock_wait(engine: Engine) -> None:
    query = text("SELECT count(*) FROM pg_locks WHERE NOT granted")
    deadline = time.monotonic() + 10
    with engine.connect() as connection:
        while connection.execute(query).scalar_one() == 0:
            assert time.monotonic() < deadline, "the load never waited for the card"
            time.sleep(0.02)

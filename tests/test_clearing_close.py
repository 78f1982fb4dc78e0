"""Closing a month on a real ledger (SQLite and PostgreSQL): which entries, with which figures,
and the same bytes on every run whatever happens to the ledger afterwards."""

from __future__ import annotations

import dataclasses
import threading
from datetime import datetime, time
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clearing import close as close_module
from clearing.clear import Cleared, clear
from clearing.layout import Detail, parse_detail, parse_merchant, parse_trailer
from clearing.models import ClosedMonth, SettledItem
from clearing.period import Month
from clearing.signing import load_private
from clearing.verify import verify_file
from gateway.clock import SHANGHAI
from gateway.config import Config, load_config
from gateway.errors import BadInput, CheckFailed
from gateway.ledger import operations, records, unit_of_work
from gateway.ledger.models import Authorisation, KeySuite, Merchant
from gateway.points import convert, partial_conversion
from tests.conftest import LedgerWorld

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
NOVEMBER = Month(2026, 11)
DECEMBER = Month(2026, 12)


def at(day: int, hour: int = 12, minute: int = 0, month: int = 11) -> datetime:
    year = 2027 if month == 13 else 2026
    return datetime(year, 1 if month == 13 else month, day, hour, minute, tzinfo=SHANGHAI)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The demo config with a cut-off of midnight (the ledger world's business dates are
    calendar dates) and a signing key of this test's own."""
    loaded = load_config(DEMO)
    gateway = dataclasses.replace(loaded.gateway, cutoff=time(0, 0))
    issuer = dataclasses.replace(loaded.issuer, signing_key=tmp_path / "issuer.pem")
    return dataclasses.replace(loaded, gateway=gateway, issuer=issuer)


def clear_at(world: LedgerWorld, config: Config, month: Month, out: Path, now: datetime) -> Cleared:
    return clear(world.engine, config, month, out, now)


def details_of(cleared: Cleared) -> list[Detail]:
    lines = cleared.settlement.path.read_text(encoding="ascii").splitlines()
    return [parse_detail(line, []) for line in lines if line.startswith("D")]


def redemption_id(result: operations.Redeemed | operations.Declined) -> int:
    assert isinstance(result, operations.Redeemed)
    return result.authorisation_id


def rrn_of(world: LedgerWorld, authorisation_id: int) -> str:
    with unit_of_work(world.engine) as session:
        found = session.get(Authorisation, authorisation_id)
        assert found is not None
        return found.rrn


def test_a_month_worked_by_hand(world: LedgerWorld, config: Config, tmp_path: Path) -> None:
    """Discount, partial approval, odd amount, a refund, a void: every figure by hand."""
    card = world.add_card(lots=[(at(1).date(), 100_000)])
    world.now = at(3)
    redemption_id(world.redeem_conversion(card, convert(12800, 1000)))  # D 11520, P 5760
    redemption_id(world.redeem_conversion(card, partial_conversion(150, 300)))  # A' 309, D 300
    odd = redemption_id(world.redeem_conversion(card, convert(1999, 500)))  # D 1899, P 950
    voided = redemption_id(world.redeem_conversion(card, convert(5000, 0)))
    assert isinstance(world.void(voided), operations.Restored)
    world.now = at(10)
    refund = world.refund(odd, 1000)  # floor(950 x 1000 / 1999) = 475, floor(1899 ...) = 949
    assert isinstance(refund, operations.Refunded)
    assert (refund.points, refund.fen_clawed) == (475, 949)
    cleared = clear_at(world, config, NOVEMBER, tmp_path / "out", at(1, 9, month=12))
    details = details_of(cleared)
    assert [(d.entry_type, d.settled_fen, d.points, d.fee_fen) for d in details] == [
        ("22", 11520, 5760, 92),  # 92.16
        ("22", 300, 150, 2),  # 2.4
        ("22", 1899, 950, 15),  # 15.192
        ("25", -949, 475, -8),  # 7.592 given back
    ]
    assert details[3].original_rrn == rrn_of(world, odd)
    assert (details[1].list_amount_fen, details[1].discount_bp) == (309, 300)
    lines = cleared.settlement.path.read_text(encoding="ascii").splitlines()
    merchant = parse_merchant(lines[-2], [])
    assert (merchant.redemption_count, merchant.redemptions_fen) == (3, 13719)
    assert (merchant.other_count, merchant.others_fen) == (1, -949)
    assert (merchant.fees_fen, merchant.net_fen, merchant.fee_bp) == (101, 12669, 80)
    trailer = parse_trailer(lines[-1], [])
    assert (trailer.detail_count, trailer.merchant_count) == (4, 1)
    assert (trailer.settled_fen, trailer.fees_fen, trailer.net_fen) == (12770, 101, 12669)
    assert cleared.figures.totals.rounding_gain_fen == 0 + 0 + 1 - 1
    assert cleared.figures.total_due_fen == 12770 + 3000  # one terminal enabled
    key = load_private(config.issuer.signing_key).public_key()
    assert verify_file(cleared.settlement.path, key).good


def test_refund_across_months(world: LedgerWorld, config: Config, tmp_path: Path) -> None:
    """A November redemption refunded in December: +D in November, -D_r in December."""
    card = world.add_card(lots=[(at(1).date(), 100_000)])
    world.now = at(20)
    original = redemption_id(world.redeem_conversion(card, convert(10000, 1000)))
    november = clear_at(world, config, NOVEMBER, tmp_path / "nov", at(1, 9, month=12))
    world.now = at(5, month=12)
    assert isinstance(world.refund(original, 2500), operations.Refunded)
    december = clear_at(world, config, DECEMBER, tmp_path / "dec", at(1, 9, month=13))
    assert [(d.entry_type, d.settled_fen) for d in details_of(november)] == [("22", 9000)]
    [refund] = details_of(december)
    assert (refund.entry_type, refund.settled_fen, refund.points, refund.fee_fen) == (
        "25",
        -2250,  # floor(9000 x 2500 / 10000)
        1125,
        -18,
    )
    assert refund.original_rrn == rrn_of(world, original)


def test_voids_before_and_after_the_close(
    world: LedgerWorld, config: Config, tmp_path: Path
) -> None:
    """Undone before the close: no entry anywhere. After: a `23` of -D in its own month."""
    card = world.add_card(lots=[(at(1).date(), 100_000)])
    world.now = at(30, 20)
    early = redemption_id(world.redeem_conversion(card, convert(4000, 0)))
    late = redemption_id(world.redeem_conversion(card, convert(6000, 0)))
    world.now = at(1, 0, 10, month=12)  # December's business date, November not closed yet
    assert isinstance(world.void(early), operations.Restored)
    november = clear_at(world, config, NOVEMBER, tmp_path / "nov", at(1, 0, 30, month=12))
    world.now = at(1, 1, 0, month=12)
    assert isinstance(world.void(late), operations.Restored)
    december = clear_at(world, config, DECEMBER, tmp_path / "dec", at(1, 9, month=13))
    assert [(d.entry_type, d.settled_fen, d.rrn) for d in details_of(november)] == [
        ("22", 6000, rrn_of(world, late))
    ]
    [void] = details_of(december)
    assert (void.entry_type, void.settled_fen, void.points, void.fee_fen, void.net_fen) == (
        "23",
        -6000,
        3000,
        -48,
        -5952,
    )
    assert void.original_rrn == rrn_of(world, late)


def test_a_void_committed_while_the_close_runs_is_accounted_once(
    world: LedgerWorld, config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close has read its rows when a void of one of them commits. On PostgreSQL the
    close's insert then finds the original changed since its snapshot (a serialisation
    failure) and closes again, seeing the void: no entry in either month. On SQLite the void
    waits for the close's write lock: `22` now and `23` in December. Either way the two
    months net to nothing and `clear` succeeds."""
    card = world.add_card(lots=[(at(1).date(), 100_000)])
    world.now = at(30, 20)
    original = redemption_id(world.redeem_conversion(card, convert(4000, 0)))
    world.now = at(1, 0, 10, month=12)
    read, go = threading.Event(), threading.Event()
    month_rows = close_module._month_rows

    def pausing(session: Session, month: Month) -> object:
        rows = month_rows(session, month)
        if not read.is_set():  # the first try only
            read.set()
            go.wait(30)
        return rows

    monkeypatch.setattr(close_module, "_month_rows", pausing)
    cleared: dict[str, Cleared] = {}
    closing = threading.Thread(
        target=lambda: cleared.__setitem__(
            "nov", clear_at(world, config, NOVEMBER, tmp_path / "nov", at(1, 0, 30, month=12))
        )
    )
    closing.start()
    assert read.wait(30)
    voiding = threading.Thread(target=lambda: world.void(original))
    voiding.start()
    voiding.join(2.0)
    go.set()
    closing.join(60)
    voiding.join(60)
    december = clear_at(world, config, DECEMBER, tmp_path / "dec", at(1, 9, month=13))
    entries = details_of(cleared["nov"]) + details_of(december)
    assert sum(entry.settled_fen for entry in entries) == 0
    assert [entry.entry_type for entry in entries] in ([], ["22", "23"])
    assert world.balances(card).spendable_points == 100_000


def test_two_runs_into_one_folder_take_turns(
    world: LedgerWorld, config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `clear` runs of one month into one --out at once share its working names; the
    second waits for the first, then writes the same bytes (and leaves nothing else)."""
    card = world.add_card(lots=[(at(1).date(), 100_000)])
    world.now = at(30, 20)
    redemption_id(world.redeem_conversion(card, convert(4000, 0)))
    inside, go = threading.Event(), threading.Event()
    month_rows = close_module._month_rows

    def pausing(session: Session, month: Month) -> object:
        inside.set()
        go.wait(30)
        return month_rows(session, month)

    monkeypatch.setattr(close_module, "_month_rows", pausing)
    out = tmp_path / "out"
    runs: list[Cleared] = []

    def run() -> None:
        runs.append(clear_at(world, config, NOVEMBER, out, at(1, 9, month=12)))

    first, second = threading.Thread(target=run), threading.Thread(target=run)
    first.start()
    assert inside.wait(30)
    second.start()
    second.join(1.0)  # (it waits, for the folder here, or for the close on the database)
    go.set()
    first.join(60)
    second.join(60)
    assert [cleared.closed_now for cleared in runs] == [True, False]
    assert runs[0].settlement.sha256 == runs[1].settlement.sha256
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(".")) == []
    key = load_private(config.issuer.signing_key).public_key()
    assert verify_file(runs[0].settlement.path, key).good


def test_reversals_after_the_close(world: LedgerWorld, config: Config, tmp_path: Path) -> None:
    """A reversal of a closed month's redemption is -D (`04`); one that undoes a void puts
    the redemption back, +D; a void and its reversal in one later month net to nothing."""
    card = world.add_card(lots=[(at(1).date(), 100_000)])
    world.now = at(30, 20)
    reversed_ = redemption_id(world.redeem_conversion(card, convert(1000, 0)))
    restored = redemption_id(world.redeem_conversion(card, convert(2000, 0)))
    round_trip = redemption_id(world.redeem_conversion(card, convert(3000, 0)))
    world.now = at(1, 0, 5, month=12)
    restored_void = world.void(restored)
    assert isinstance(restored_void, operations.Restored)
    november = clear_at(world, config, NOVEMBER, tmp_path / "nov", at(1, 0, 30, month=12))
    world.now = at(1, 1, 0, month=12)
    world.reverse(reversed_)
    world.reverse(restored_void.authorisation_id)
    round_trip_void = world.void(round_trip)
    assert isinstance(round_trip_void, operations.Restored)
    world.reverse(round_trip_void.authorisation_id)
    december = clear_at(world, config, DECEMBER, tmp_path / "dec", at(1, 9, month=13))
    assert sorted((d.entry_type, d.settled_fen) for d in details_of(november)) == [
        ("22", 1000),
        ("22", 3000),
    ]
    assert sorted((d.entry_type, d.settled_fen) for d in details_of(december)) == [
        ("04", -1000),
        ("04", 2000),
        ("04", 3000),
        ("23", -3000),
    ]
    assert december.settlement.trailer.settled_fen == 1000  # the restored 2000 less 1000


def test_running_clear_again_writes_the_same_bytes(
    world: LedgerWorld, config: Config, tmp_path: Path
) -> None:
    """After the close, a void of its redemption and another run: identical file and .sig."""
    card = world.add_card(lots=[(at(1).date(), 100_000)])
    world.now = at(30, 20)
    original = redemption_id(world.redeem_conversion(card, convert(4321, 500)))
    first = clear_at(world, config, NOVEMBER, tmp_path / "one", at(1, 0, 30, month=12))
    world.now = at(1, 1, month=12)
    assert isinstance(world.void(original), operations.Restored)
    second = clear_at(world, config, NOVEMBER, tmp_path / "two", at(9, 9, month=12))
    assert first.closed_now and not second.closed_now
    assert first.settlement.path.read_bytes() == second.settlement.path.read_bytes()
    assert first.signature.read_bytes() == second.signature.read_bytes()
    statements = [path.name for path in first.merchant_statements]
    for name in statements:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_a_ledger_changed_under_a_closed_month_is_a_fault(
    world: LedgerWorld, config: Config, tmp_path: Path
) -> None:
    """Edited figures of a closed month's entry: exit 1, and the written files stay."""
    card = world.add_card(lots=[(at(1).date(), 100_000)])
    world.now = at(15)
    original = redemption_id(world.redeem_conversion(card, convert(4000, 0)))
    out = tmp_path / "out"
    first = clear_at(world, config, NOVEMBER, out, at(1, 9, month=12))
    written = first.settlement.path.read_bytes()
    with unit_of_work(world.engine) as session:
        session.execute(
            update(Authorisation).where(Authorisation.id == original).values(settled_fen=3999)
        )
    with pytest.raises(CheckFailed, match="changed under a closed month"):
        clear_at(world, config, NOVEMBER, out, at(2, 9, month=12))
    assert first.settlement.path.read_bytes() == written
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(".")) == []


def test_an_unfinished_month_is_refused_and_nothing_closes(
    world: LedgerWorld, config: Config, tmp_path: Path
) -> None:
    """Before November's last business date ends: BadInput, and the month stays open."""
    with pytest.raises(BadInput, match="not over"):
        clear_at(world, config, NOVEMBER, tmp_path / "out", at(30, 23, 59))
    with unit_of_work(world.engine) as session:
        assert session.get(ClosedMonth, NOVEMBER.key) is None
        assert session.scalars(select(SettledItem)).all() == []


def test_a_merchant_rate_the_file_cannot_carry_is_refused_before_the_close(
    world: LedgerWorld, config: Config, tmp_path: Path
) -> None:
    """A fee of 10,000 bp (loaded before the config refused it) has no place in the merchant
    record's 4 digits: BadInput naming the merchant, and the month stays open, so a run after
    a lower rate is loaded closes and writes it."""
    card = world.add_card(lots=[(at(1).date(), 100_000)])
    world.now = at(15)
    world.redeem_conversion(card, convert(4000, 0))
    with unit_of_work(world.engine) as session:
        session.execute(update(Merchant).values(fee_bp=10000, bank_card_fee_bp=10000))
    with pytest.raises(BadInput, match=r"merchant \d{15}: fee_bp 10000 is outside 0-9999"):
        clear_at(world, config, NOVEMBER, tmp_path / "out", at(1, 9, month=12))
    with unit_of_work(world.engine) as session:
        assert session.get(ClosedMonth, NOVEMBER.key) is None
        assert session.scalars(select(SettledItem)).all() == []
        session.execute(update(Merchant).values(fee_bp=9999))
    cleared = clear_at(world, config, NOVEMBER, tmp_path / "out", at(1, 9, month=12))
    key = load_private(config.issuer.signing_key).public_key()
    assert verify_file(cleared.settlement.path, key).good


def test_a_month_without_entries_is_header_and_trailer(
    world: LedgerWorld, config: Config, tmp_path: Path
) -> None:
    """No entries: two records, zero totals written `+`."""
    cleared = clear_at(world, config, NOVEMBER, tmp_path / "out", at(1, 9, month=12))
    lines = cleared.settlement.path.read_text(encoding="ascii").splitlines()
    assert [line[0] for line in lines] == ["H", "T"]
    assert lines[1][1:65] == "00000000" + "00000000" + "+000000000000000" * 3


def test_terminal_fees_count_terminals_enabled_at_any_moment(
    world: LedgerWorld, config: Config, tmp_path: Path
) -> None:
    """From the enable history: enabled at the start or by a change within the month counts;
    disabled throughout, or created after the month, does not."""
    histories = {
        "20000001": [(at(1, month=10), False)],
        "20000002": [(at(1, month=10), False), (at(10), True), (at(11), False)],
        "20000003": [(at(1, month=10), True), (at(2), False)],
        "20000004": [(at(1, 1, month=12), True)],
    }
    for terminal_id, changes in histories.items():
        for when, enabled in changes:
            details = records.TerminalDetails(
                terminal_id, "898310048990001", enabled, KeySuite.TDES, b"\x01" * 32
            )
            with unit_of_work(world.engine) as session:
                records.upsert_terminal(session, details, when)
    assert world.now < at(1)  # the world's own terminal: enabled since March
    cleared = clear_at(world, config, NOVEMBER, tmp_path / "out", at(2, 9, month=12))
    assert cleared.closed.terminal_count == 3  # 10000001, 20000002, 20000003
    assert cleared.figures.terminal_fees_fen == 3 * 3000


def test_closing_twice_is_refused_by_the_database(world: LedgerWorld, config: Config) -> None:
    """An authorisation is accounted for once: a second item for it fails its primary key."""
    card = world.add_card(lots=[(at(1).date(), 100_000)])
    world.now = at(15)
    original = redemption_id(world.redeem_conversion(card, convert(4000, 0)))
    clear_at(world, config, NOVEMBER, Path(config.issuer.signing_key).parent / "o", at(2, month=12))
    with pytest.raises(IntegrityError), unit_of_work(world.engine) as session:
        session.add(SettledItem(authorisation_id=original, month=NOVEMBER.key, sign=0))

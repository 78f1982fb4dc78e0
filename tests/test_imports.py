"""The accrual feed and the card import, on both backends: good files apply in one go, a file
with bad lines is refused whole naming every one of them (card numbers masked), and a
source_ref applied by an earlier file is skipped and reported."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from gateway import imports
from gateway.commands import progress
from gateway.config import Config
from gateway.errors import BadInput
from gateway.imports import (
    CardImportReport,
    FeedReport,
    SkippedAccrual,
    apply_feed,
    import_cards,
    import_points,
    read_feed,
    refuse_bad_lines,
    shown,
)
from gateway.keystore import FileKeyStore
from gateway.ledger import operations, unit_of_work
from gateway.ledger.invariants import check_invariants
from gateway.ledger.models import CardStatus
from tests.test_loader import DEMO_CARDS, GOLD, NOW, load, row_counts, write_config

SAMPLES = Path(__file__).resolve().parents[1] / "config" / "samples"
CARDS_HEADER = "number,expiry,tier,status,enrolled"
FEED_HEADER = "card_number,earned_on,points,source_ref"
NEW_GOLD = "6688000000000001012"
NEW_SILVER = "6688000000000001194"
NEW_VIP = "6688000000000001277"
UNKNOWN = "6688000000000009999"  # Luhn-valid, never imported
LUHN_WRONG = "6688000000000001013"
OTHER_ISSUER = "4000000000000000006"
SAMPLE_CARDS = (NEW_GOLD, NEW_SILVER, NEW_VIP, UNKNOWN, "6688000000000001434")
EVERY_CARD = DEMO_CARDS + SAMPLE_CARDS + (LUHN_WRONG, OTHER_ISSUER)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return write_config(tmp_path / "config")


@pytest.fixture
def ledger(ledger_engine: Engine, config: Config, tmp_path: Path) -> Engine:
    """A ledger with the demo config loaded: merchants, terminals and the five demo cards."""
    load(ledger_engine, config, FileKeyStore(tmp_path / "master.key"))
    return ledger_engine


def csv_file(folder: Path, name: str, *lines: str) -> Path:
    path = folder / name
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def run_cards(engine: Engine, path: Path, config: Config) -> CardImportReport:
    with unit_of_work(engine) as session:
        return import_cards(session, path, config, NOW)


def run_feed(engine: Engine, path: Path, config: Config) -> FeedReport:
    with unit_of_work(engine) as session:
        return import_points(session, path, config, NOW)


def refused(engine: Engine, run: object, path: Path, config: Config) -> str:
    """The message of a refused import, after checking that the ledger did not change."""
    before = row_counts(engine)
    assert callable(run)
    with pytest.raises(BadInput) as raised:
        run(engine, path, config)
    assert row_counts(engine) == before
    message = str(raised.value)
    assert "\n" not in message
    assert not [number for number in EVERY_CARD if number in message]
    return message


def named_lines(message: str) -> list[int]:
    return [int(number) for number in re.findall(r"line (\d+):", message)]


# --- good files ------------------------------------------------------------------------------


def test_sample_files_apply_in_one_go(ledger: Engine, config: Config) -> None:
    """The sample cards and feed create three cards and four lots; the invariants hold."""
    cards = run_cards(ledger, SAMPLES / "cards.csv", config)
    assert (cards.new_cards, cards.updated_cards) == (3, 0)
    feed = run_feed(ledger, SAMPLES / "points.csv", config)
    assert (feed.applied_lots, feed.applied_points, feed.skipped) == (4, 47900, ())
    with unit_of_work(ledger) as session:
        assert operations.balances(session, NEW_SILVER, NOW).spendable_points == 4400
        lots = operations.card_lots(session, NEW_SILVER)
        assert [(lot.source_ref, lot.expires_on) for lot in lots] == [
            ("BILL-2026-06-0002", date(2027, 11, 30)),
            ("BILL-2026-07-0002", date(2027, 11, 30)),
        ]
        silver = operations.find_card(session, NEW_SILVER)
        assert silver is not None
        assert (silver.tier, silver.status, silver.enrolled) == ("silver", CardStatus.ACTIVE, False)
        assert check_invariants(session) == []


def test_card_import_updates_a_card_but_never_its_points_or_pin(
    ledger: Engine, config: Config, tmp_path: Path
) -> None:
    """An existing card gets the file's expiry, tier, status and enrolment; lots and PIN stay."""
    run_cards(ledger, SAMPLES / "cards.csv", config)
    run_feed(ledger, SAMPLES / "points.csv", config)
    with unit_of_work(ledger) as session:
        gold = operations.find_card(session, GOLD)
        assert gold is not None
        pin_hmac = gold.pin_hmac
    path = csv_file(
        tmp_path,
        "update.csv",
        CARDS_HEADER,
        f"{NEW_SILVER},3001,diamond,lost,true",
        f"{GOLD},2812,gold,active,TRUE",  # listed in the config, with the config's values
    )
    report = run_cards(ledger, path, config)
    assert (report.new_cards, report.updated_cards) == (0, 2)
    with unit_of_work(ledger) as session:
        silver = operations.find_card(session, NEW_SILVER)
        gold = operations.find_card(session, GOLD)
        assert silver is not None and gold is not None
        assert (silver.expiry_yymm, silver.tier, silver.status) == (
            "3001",
            "diamond",
            CardStatus.LOST,
        )
        assert silver.enrolled and silver.enrolled_at == NOW
        assert operations.balances(session, NEW_SILVER, NOW).ledger_points == 4400
        assert gold.pin_hmac == pin_hmac is not None
        assert operations.balances(session, GOLD, NOW).ledger_points == 100000


def test_refs_applied_by_an_earlier_file_are_skipped_and_reported(
    ledger: Engine, config: Config, tmp_path: Path
) -> None:
    """Sending a feed again applies nothing; a feed mixing old and new refs applies the new."""
    run_cards(ledger, SAMPLES / "cards.csv", config)
    run_feed(ledger, SAMPLES / "points.csv", config)
    again = run_feed(ledger, SAMPLES / "points.csv", config)
    assert (again.applied_lots, again.applied_points) == (0, 0)
    assert [item.line for item in again.skipped] == [2, 3, 4, 5]
    assert again.skipped_points == 47900
    mixed = csv_file(
        tmp_path,
        "mixed.csv",
        FEED_HEADER,
        f"{NEW_VIP},2026-08-31,700,BILL-2026-08-0001",
        f"{NEW_GOLD},2026-06-30,42000,BILL-2026-06-0001",
    )
    report = run_feed(ledger, mixed, config)
    assert (report.applied_lots, report.applied_points) == (1, 700)
    assert report.skipped == (SkippedAccrual(3, "BILL-2026-06-0001", 42000),)
    with unit_of_work(ledger) as session:
        assert operations.balances(session, NEW_GOLD, NOW).ledger_points == 42000
        assert check_invariants(session) == []


def test_byte_order_mark_and_blank_lines_are_not_data(
    ledger: Engine, config: Config, tmp_path: Path
) -> None:
    """A spreadsheet's UTF-8 byte order mark and blank lines are accepted and ignored."""
    path = tmp_path / "bom.csv"
    path.write_bytes(
        ("\ufeff" + CARDS_HEADER + "\n\n" + f"{NEW_GOLD},2912,gold,active,false\n\n").encode()
    )
    assert run_cards(ledger, path, config).new_cards == 1


# --- bad files -------------------------------------------------------------------------------


def test_bad_feed_names_every_bad_line_and_applies_nothing(
    ledger: Engine, config: Config, tmp_path: Path
) -> None:
    """Each kind of bad feed line is named, all in one message, and not one line is applied."""
    bad_lines = {
        3: (f"{UNKNOWN},2026-06-30,100,R3", "card 668800*********9999: unknown card"),
        4: (f"{LUHN_WRONG},2026-06-30,100,R4", "card 668800*********1013: Luhn check digit wrong"),
        5: (f"{OTHER_ISSUER},2026-06-30,100,R5", "card 400000*********0006: issuer prefix unknown"),
        6: (f"{GOLD[:-1]},2026-06-30,100,R6", "card 668800********0001: not 19 digits"),
        7: (f"{GOLD},2026-02-30,100,R7", 'earned_on "2026-02-30" is not a date YYYY-MM-DD'),
        8: (f"{GOLD},26-03-01,100,R8", 'earned_on "26-03-01" is not a date YYYY-MM-DD'),
        9: (f"{GOLD},2026-11-23,100,R9", "earned_on 2026-11-23 is after today (2026-11-22)"),
        10: (f"{GOLD},2026-06-30,0,R10", 'points "0" is not a positive integer'),
        11: (f"{GOLD},2026-06-30,-5,R11", 'points "-5" is not a positive integer'),
        12: (f"{GOLD},2026-06-30,12.5,R12", 'points "12.5" is not a positive integer'),
        13: (f"{GOLD},2026-06-30,1e3,R13", 'points "1e3" is not a positive integer'),
        14: (f"{GOLD},2026-06-30,100,R2", 'source_ref "R2" repeats line 2'),
        15: (f"{GOLD},2026-06-30,100,", "source_ref is empty"),
        16: (f"{GOLD},2026-06-30,100,config:x", 'source_ref "config:x": config: is kept'),
        17: (f"{GOLD},2026-06-30,100", "3 fields, expected 4"),
        18: (f"{GOLD},2026-06-30,10000000000,R18", 'points "10000000000" is above the largest lot'),
    }
    lines = [FEED_HEADER, f"{GOLD},2026-06-30,100,R2"]
    lines += [bad_lines[number][0] for number in sorted(bad_lines)]
    lines += [f"{GOLD},2026-06-30,100,R19"]
    path = csv_file(tmp_path, "feed.csv", *lines)
    message = refused(ledger, run_feed, path, config)
    assert message.startswith(f"{path} line 3: ")
    assert named_lines(message) == sorted(bad_lines)
    for _, expected in bad_lines.values():
        assert expected in message
    assert message.endswith(f"({len(bad_lines)} bad lines; nothing from the file was applied)")


def test_a_feed_that_would_take_a_card_past_what_an_answer_carries_applies_nothing(
    ledger: Engine, config: Config, tmp_path: Path
) -> None:
    """Field 63 carries a card's points as n10: lots that would take a card past 9,999,999,999
    points in all are refused, the accrual named, and nothing from the file is applied."""
    with unit_of_work(ledger) as session:
        held = operations.balances(session, GOLD, NOW).ledger_points
    path = csv_file(
        tmp_path,
        "feed.csv",
        FEED_HEADER,
        f"{GOLD},2026-06-30,100,R1",
        f"{GOLD},2026-06-30,{9_999_999_999 - held - 100},R2",
        f"{GOLD},2026-06-30,1,R3",
    )
    message = refused(ledger, run_feed, path, config)
    assert message == (
        f"{path} line 4: card 668800*********0014: with this line the card would hold"
        " 10000000000 points, counting the lines before it and what its approved redemptions"
        " may give back, more than the 9999999999 an answer can carry (1 bad line; nothing"
        " from the file was applied)"
    )
    path = csv_file(tmp_path, "fits.csv", *Path(path).read_text().splitlines()[:3])
    assert run_feed(ledger, path, config).applied_points == 9_999_999_999 - held


def test_a_card_past_the_cap_late_in_a_feed_applied_in_batches_refuses_the_whole_file(
    ledger: Engine, config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commands apply a feed a batch at a time: a line that would take a card past what
    an answer carries is found before the first batch, not in the batch that holds it, so
    nothing is applied; every such line is named, lines applied before do not count (they
    are skipped), and what the card's approved redemptions may give back does."""
    monkeypatch.setattr("gateway.imports.APPLY_LINES", 2)
    with unit_of_work(ledger) as session:
        held = operations.balances(session, GOLD, NOW).ledger_points
    applied = csv_file(tmp_path, "before.csv", FEED_HEADER, f"{GOLD},2026-06-30,500,OLD")
    run_feed(ledger, applied, config)
    room = 9_999_999_999 - held - 500
    lines = [f"{DEMO_CARDS[1]},2026-06-30,1,OTHER{n}" for n in range(5)]
    lines += [
        f"{GOLD},2026-06-30,500,OLD",  # applied before: skipped, so not counted again
        f"{GOLD},2026-06-30,{room},FILL",
        f"{GOLD},2026-06-30,1,OVER1",
        f"{GOLD},2026-06-30,2,OVER2",
    ]
    path = csv_file(tmp_path, "feed.csv", FEED_HEADER, *lines)

    def through_the_command(engine: Engine, path: Path, config: Config) -> FeedReport:
        feed = read_feed(path, config, NOW)
        with unit_of_work(engine) as session:
            refuse_bad_lines(session, feed)
        return apply_feed(engine, feed, config, NOW)

    message = refused(ledger, through_the_command, path, config)
    assert named_lines(message) == [9, 10]
    assert "would hold 10000000000 points" in message
    assert "would hold 10000000002 points" in message
    fits = csv_file(tmp_path, "fits.csv", *path.read_text().splitlines()[:8])
    report = through_the_command(ledger, fits, config)
    assert (report.applied_lots, report.applied_points) == (6, 5 + room)
    with unit_of_work(ledger) as session:
        assert operations.balances(session, GOLD, NOW).ledger_points == 9_999_999_999


def test_a_feed_overtaken_between_its_check_and_its_batches_says_what_was_applied(
    ledger: Engine, config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another feed for the same card applied after this one was checked can still take the
    card past the bound in a later batch: the error then says which lines stand (the batches
    before it), and the same file sent again, once fixed, skips them."""
    monkeypatch.setattr("gateway.imports.APPLY_LINES", 2)
    with unit_of_work(ledger) as session:
        held = operations.balances(session, GOLD, NOW).ledger_points
    lines = [f"{DEMO_CARDS[1]},2026-06-30,1,A{n}" for n in range(2)]
    lines += [f"{GOLD},2026-06-30,{9_999_999_999 - held},ALL"]
    path = csv_file(tmp_path, "feed.csv", FEED_HEADER, *lines)
    feed = read_feed(path, config, NOW)
    with unit_of_work(ledger) as session:
        refuse_bad_lines(session, feed)
    run_feed(ledger, csv_file(tmp_path, "other.csv", FEED_HEADER, f"{GOLD},2026-06-30,1,B"), config)
    with pytest.raises(BadInput) as raised:
        apply_feed(ledger, feed, config, NOW)
    message = str(raised.value)
    assert message.startswith(f"{path}: accrual ALL: the card would hold 10000000000 points")
    assert message.endswith(
        "(nothing from line 4 on was applied; the lines before it were, and the same file sent"
        " again skips them)"
    )
    assert GOLD not in message
    with unit_of_work(ledger) as session:
        assert operations.accruals_applied(session, ["A0", "A1", "ALL"]) == {"A0", "A1"}


def test_one_line_with_several_faults_names_each(
    ledger: Engine, config: Config, tmp_path: Path
) -> None:
    """A line bad in several fields is named once with every fault."""
    path = csv_file(tmp_path, "feed.csv", FEED_HEADER, f"{UNKNOWN},2026-13-01,x,R1")
    message = refused(ledger, run_feed, path, config)
    assert message == (
        f'{path} line 2: earned_on "2026-13-01" is not a date YYYY-MM-DD, points "x" is not a '
        "positive integer, card 668800*********9999: unknown card "
        "(1 bad line; nothing from the file was applied)"
    )


def test_bad_card_import_names_every_bad_line_and_applies_nothing(
    ledger: Engine, config: Config, tmp_path: Path
) -> None:
    """Each kind of bad card line is named, all in one message, and not one card is written."""
    bad_lines = {
        3: (f"{LUHN_WRONG},2912,gold,active,true", "card 668800*********1013: Luhn check digit"),
        4: (f"{OTHER_ISSUER},2912,gold,active,true", "card 400000*********0006: issuer prefix"),
        5: ("12345,2912,gold,active,true", "card *****: not 19 digits"),
        6: (f"{NEW_SILVER},2913,gold,active,true", 'expiry "2913" is not YYMM'),
        7: (f"{NEW_VIP},29-12,gold,active,true", 'expiry "29-12" is not YYMM'),
        8: (f"{UNKNOWN},2912,platinum,active,true", 'tier "platinum" is not one of diamond'),
        9: (f"{UNKNOWN[:-2]}81,2912,gold,frozen,true", 'status "frozen" is not one of active'),
        10: (f"{UNKNOWN[:-2]}73,2912,gold,active,yes", 'enrolled "yes" is not true or false'),
        11: (f"{NEW_GOLD},2912,gold,active,false", "card 668800*********1012 repeats line 2"),
        12: (f"{GOLD},2812,gold,blocked,true", "card 668800*********0014 is listed in"),
        13: (f"{NEW_GOLD},2912,gold,active", "4 fields, expected 5"),
    }
    lines = [CARDS_HEADER, f"{NEW_GOLD},2912,gold,active,true"]
    lines += [bad_lines[number][0] for number in sorted(bad_lines)]
    path = csv_file(tmp_path, "cards.csv", *lines)
    message = refused(ledger, run_cards, path, config)
    assert named_lines(message) == sorted(bad_lines)
    for _, expected in bad_lines.values():
        assert expected in message
    with unit_of_work(ledger) as session:
        assert operations.find_card(session, NEW_GOLD) is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty: the first line must be number,expiry,tier,status,enrolled"),
        ("number,expiry,tier,status\n", "line 1: the header must be exactly number,expiry"),
        ("Number,Expiry,Tier,Status,Enrolled\n", "line 1: the header must be exactly"),
        (f"{NEW_GOLD},2912,gold,active,true\n", "line 1: the header must be exactly"),
        (f'{CARDS_HEADER}\n"{NEW_GOLD},2912,gold,active,true\n', "not CSV"),
    ],
)
def test_a_card_file_without_its_exact_header_is_refused(
    ledger: Engine, config: Config, tmp_path: Path, content: str, expected: str
) -> None:
    """The header line must be exactly the documented one; a file that is not CSV is refused."""
    path = tmp_path / "cards.csv"
    path.write_text(content, encoding="utf-8")
    assert expected in refused(ledger, run_cards, path, config)


def test_a_file_that_is_not_utf8_is_refused_naming_the_line(
    ledger: Engine, config: Config, tmp_path: Path
) -> None:
    """Bytes that are not UTF-8 refuse the file, naming the line they are on."""
    path = tmp_path / "feed.csv"
    path.write_bytes(
        f"{FEED_HEADER}\n{GOLD},2026-06-30,100,R1\n{GOLD},2026-06-30,100,R\xe9\n".encode("latin-1")
    )
    assert refused(ledger, run_feed, path, config) == f"{path} line 3: not UTF-8 text"


def test_a_missing_file_is_bad_input(ledger: Engine, config: Config, tmp_path: Path) -> None:
    """A file that cannot be read is named in a one-line refusal."""
    path = tmp_path / "absent.csv"
    assert refused(ledger, run_feed, path, config).startswith(f"{path}: cannot read")


def test_card_numbers_in_other_columns_are_masked_in_messages(
    ledger: Engine, config: Config, tmp_path: Path
) -> None:
    """A reference built from a card number, or a shifted column, never shows the number."""
    path = csv_file(
        tmp_path,
        "feed.csv",
        FEED_HEADER,
        f"{GOLD},2026-06-30,100,BILL-{GOLD}",
        f"{GOLD},2026-06-30,100,BILL-{GOLD}",
        f"{GOLD},{GOLD},100,R3",
    )
    message = refused(ledger, run_feed, path, config)
    assert '"BILL-668800*********0014" repeats line 2' in message
    assert 'earned_on "668800*********0014" is not a date' in message
    spaced = csv_file(
        tmp_path,
        "cards.csv",
        CARDS_HEADER,
        f"{NEW_GOLD},2812,6688 0000 0000 0000 014,active,true",
        f"{NEW_SILVER},2812,silver,active,6688-0000-0000-0000-014",
    )
    message = refused(ledger, run_cards, spaced, config)
    assert "0000 0000" not in message and "0000-0000" not in message
    assert message.count("668800*********0014") == 2


def test_a_card_number_in_the_points_column_is_masked(
    ledger: Engine, config: Config, tmp_path: Path
) -> None:
    """Columns swapped so a card number stands as the points: above the largest lot, and
    the message shows it masked."""
    path = csv_file(tmp_path, "feed.csv", FEED_HEADER, f"{GOLD},2026-06-30,{GOLD},R1")
    message = refused(ledger, run_feed, path, config)
    assert '"668800*********0014" is above the largest lot' in message
    assert GOLD not in message


def test_shown_quotes_cuts_and_masks() -> None:
    """Quoted values are cut to 40 characters, escaped, and masked where they look like cards."""
    assert shown("gold") == '"gold"'
    assert shown(f"x{GOLD}y") == '"x668800*********0014y"'
    assert shown("a" * 50) == '"' + "a" * 37 + '..."'
    assert shown('say "hi"\n') == '"say \\"hi\\"\\n"'


def test_a_feed_is_applied_a_batch_to_a_transaction_and_a_stopped_one_finishes_when_sent_again(
    ledger: Engine, config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command applies a checked feed `APPLY_LINES` lines to a transaction: between two,
    another writer (a serving gateway) commits, where one transaction for the whole file
    would hold the ledger. Stopped after its first batch (a crash, Ctrl-C), the batch
    stands, and the same file sent again applies the rest and skips what was applied."""
    monkeypatch.setattr("gateway.imports.APPLY_LINES", 2)
    lines = [f"{GOLD},2026-03-0{day},{day * 10},bill-{day}" for day in range(1, 6)]
    path = csv_file(tmp_path, "feed.csv", FEED_HEADER, *lines)
    feed = read_feed(path, config, NOW)
    with unit_of_work(ledger) as session:
        refuse_bad_lines(session, feed)
    seen = []

    def between(done: int, total: int) -> None:
        seen.append((done, total))
        with unit_of_work(ledger) as session:  # another writer, between two batches
            operations.record_wrong_pin(session, GOLD)

    report = apply_feed(ledger, feed, config, NOW, between)
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert (report.applied_lots, report.applied_points) == (5, 150)

    second = csv_file(tmp_path, "again.csv", FEED_HEADER, *(f"{line}-b" for line in lines))

    def stop(done: int, _total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        apply_feed(ledger, read_feed(second, config, NOW), config, NOW, stop)
    again = apply_feed(ledger, read_feed(second, config, NOW), config, NOW)
    assert (again.applied_lots, again.applied_points) == (3, 120)
    assert [item.line for item in again.skipped] == [2, 3]
    with unit_of_work(ledger) as session:
        assert check_invariants(session) == []


def test_a_long_import_says_how_far_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    """A line on standard error every 10,000 lines of a file that long, and at its end."""
    for done in range(200, 25_001, 200):
        progress(done, 25_000)
    progress(200, 400)
    assert capsys.readouterr().err.splitlines() == [
        "10000 of 25000 lines done",
        "20000 of 25000 lines done",
        "25000 of 25000 lines done",
    ]


def test_a_batch_postgresql_rolled_back_to_break_a_deadlock_runs_again(
    ledger: Engine, config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway starting during an import locks cards in its own order, and PostgreSQL may
    roll one batch back to break the deadlock (40P01): that batch runs again, and the feed
    is applied once, whole."""
    path = csv_file(tmp_path, "feed.csv", FEED_HEADER, f"{GOLD},2026-03-01,10,bill-1")
    feed = read_feed(path, config, NOW)
    real = imports.unit_of_work
    attempts = []

    class DeadlockError(Exception):
        sqlstate = "40P01"

    @contextlib.contextmanager
    def first_deadlocks(engine: Engine) -> Iterator[Session]:
        attempts.append(1)
        with real(engine) as session:
            yield session
            if len(attempts) == 1:
                raise OperationalError("COMMIT", {}, DeadlockError())

    monkeypatch.setattr("gateway.imports.unit_of_work", first_deadlocks)
    report = apply_feed(ledger, feed, config, NOW)
    assert len(attempts) == 2
    assert (report.applied_lots, report.applied_points, report.skipped) == (1, 10, ())

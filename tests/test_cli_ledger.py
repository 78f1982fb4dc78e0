"""`vipgate cards|points|ledger` through `gateway.cli.main`, on a copy of the demo config and a
temporary SQLite database: the newcomer's path of issue 3, the exit statuses of operations.md,
and no full card number in anything the commands print."""

from __future__ import annotations

import argparse
import errno
import os
import resource
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from cardcodec.cards import luhn_check_digit
from gateway import bootstrap, imports
from gateway import cli as cli_module
from gateway.cli import main
from gateway.clock import Clock, FixedClock
from gateway.ledger import make_engine, operations, unit_of_work
from gateway.ledger.invariants import CHECKS
from tests.conftest import empty_postgres_ledger
from tests.damage import overwrite_first_page
from tests.test_imports import (
    EVERY_CARD,
    NEW_GOLD,
    NEW_SILVER,
    SAMPLE_CARDS,
    SAMPLES,
    UNKNOWN,
    csv_file,
)
from tests.test_loader import DEMO, GOLD, NOW

VIPGATE = Path(sys.executable).with_name("vipgate")
SILVER_IN_CONFIG = "6688000000000000022"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@dataclass(frozen=True)
class Cli:
    run: Callable[..., Result]
    config: Path
    db_url: str


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """`vipgate` on a copy of the demo config, a fresh SQLite ledger (migrated, nothing
    loaded: the commands that only read a ledger make none) and a clock fixed at NOW; every
    run checks that no full card number was printed."""
    folder = tmp_path / "config"
    folder.mkdir()
    config = folder / "demo.toml"
    shutil.copyfile(DEMO, config)
    db_url = f"sqlite:///{tmp_path / 'db' / 'ledger.db'}"
    bootstrap.open_database(db_url).dispose()

    def fixed_clock(_timezone: tzinfo) -> Clock:
        return FixedClock(NOW)

    monkeypatch.setattr(bootstrap, "system_clock", fixed_clock)

    def run(*args: str) -> Result:
        code = main([*args, "--config", str(config), "--db", db_url])
        captured = capsys.readouterr()
        printed = captured.out + captured.err
        assert not [number for number in EVERY_CARD if number in printed]
        return Result(code, captured.out, captured.err)

    return Cli(run, config, db_url)


def table_counts(db_url: str) -> dict[str, int]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            names = connection.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'table'")
            ).scalars()
            return {
                name: connection.execute(text(f'SELECT COUNT(*) FROM "{name}"')).scalar_one()
                for name in list(names)
            }
    finally:
        engine.dispose()


def one_error_line(result: Result) -> str:
    """The single line a refused command prints on stderr, without the `vipgate: ` prefix."""
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("vipgate: ")
    return lines[0]


# --- the newcomer's path ---------------------------------------------------------------------


def test_newcomer_imports_cards_and_points_sees_a_card_and_checks_the_ledger(cli: Cli) -> None:
    """Import the sample cards and feed, show a card, and `ledger check` exits 0."""
    cards = cli.run("cards", "import", str(SAMPLES / "cards.csv"))
    assert cards.code == 0
    assert f"{SAMPLES / 'cards.csv'}: 3 cards imported (3 new, 0 updated)" in cards.out
    points = cli.run("points", "import", str(SAMPLES / "points.csv"))
    assert (points.code, points.out) == (
        0,
        f"{SAMPLES / 'points.csv'}: 4 lots applied (47900 points)\n",
    )
    show = cli.run("cards", "show", NEW_SILVER)
    assert show.code == 0
    assert show.out.splitlines() == [
        "card 668800*********1194",
        "  tier: silver",
        "  status: active",
        "  enrolled: no",
        "  PIN: not required",
        "  expiry: 2812, good through 2028-12-31",
        "  ledger balance: 4400 points",
        "  spendable balance: 4400 points",
        "  lots (2, in spending order):",
        "    earned 2026-06-30, expires 2027-11-30, remaining 3600 of 3600",
        "    earned 2026-07-31, expires 2027-11-30, remaining 800 of 800",
    ]
    check = cli.run("ledger", "check")
    assert check.code == 0
    assert (
        check.out == f"ledger check: all {len(CHECKS)} invariant checks hold "
        "(8 cards, 10 lots, 10 journal transactions)\n"
    )


def test_the_first_command_reports_the_config_load_and_later_ones_stay_quiet(cli: Cli) -> None:
    """Loading the demo config is reported once, change by change, with card numbers masked;
    a check loads nothing."""
    assert cli.run("ledger", "check").out.startswith("ledger check: all")
    assert table_counts(cli.db_url)["cards"] == 0
    first = cli.run("ledger", "load")
    assert first.out.startswith(
        f"{cli.config}: 2 merchants, 3 terminals, 5 cards; 6 lots accrued (160150 points); "
        "16 changes\n  merchant 898310048990001: new\n"
    )
    assert "  card 668800*********0014: lot 0 accrued, 100000 points\n" in first.out
    second = cli.run("ledger", "load")
    assert second.out == (
        f"{cli.config}: 2 merchants, 3 terminals, 5 cards; 0 lots accrued (0 points); no change\n"
    )
    third = cli.run("ledger", "check")
    assert third.out.startswith(f"ledger check: all {len(CHECKS)} invariant checks hold")


def test_only_ledger_load_switches_a_terminal_the_other_commands_keep_the_ledgers(
    cli: Cli,
) -> None:
    """A stolen terminal disabled with `vipgate ledger load` of an edited config stays
    disabled when a card command runs with the older config file, which still says enabled:
    running gateways follow the switch from the ledger (`gateway.follow`), and a routine
    command must not switch it back on for all of them. The command says so; a deliberate
    `ledger load` of the older config does switch it back."""
    enabled = 'id = "20000001"\nmerchant = "898310058120002"\nenabled = true'
    content = cli.config.read_text(encoding="utf-8")
    assert enabled in content
    off = cli.config.with_name("off.toml")
    off.write_text(content.replace(enabled, enabled.replace("true", "false")), encoding="utf-8")
    assert main(["ledger", "load", "--config", str(off), "--db", cli.db_url]) == 0
    status = cli.run("cards", "import", str(SAMPLES / "cards.csv"))
    assert status.code == 0
    assert (
        f"{cli.config}: terminal 20000001: enabled stays false as the ledger has it (the config"
        " says true); only `vipgate ledger load` or `vipgate serve` with this config changes it"
    ) in status.out.splitlines()

    def enabled_in_ledger() -> bool:
        engine = make_engine(cli.db_url)
        try:
            with engine.connect() as connection:
                return bool(
                    connection.execute(
                        text("SELECT enabled FROM terminals WHERE id = '20000001'")
                    ).scalar_one()
                )
        finally:
            engine.dispose()

    assert not enabled_in_ledger()
    load = cli.run("ledger", "load")
    assert "  terminal 20000001: enabled false -> true" in load.out.splitlines()
    assert enabled_in_ledger()


def test_bad_csv_exits_2_names_every_bad_line_and_changes_nothing(cli: Cli) -> None:
    """The bad sample files are refused whole (exit 2) in one line naming each bad line."""
    cli.run("cards", "import", str(SAMPLES / "cards.csv"))
    before = table_counts(cli.db_url)
    shown_before = cli.run("cards", "show", NEW_GOLD).out
    cards = cli.run("cards", "import", str(SAMPLES / "cards-bad.csv"))
    assert cards.code == 2
    line = one_error_line(cards)
    for number in range(2, 7):
        assert f"line {number}: " in line
    assert line.endswith("(5 bad lines; nothing from the file was applied)")
    points = cli.run("points", "import", str(SAMPLES / "points-bad.csv"))
    assert points.code == 2
    line = one_error_line(points)
    assert [f"line {n}: " in line for n in range(2, 7)] == [True] * 5
    assert "card 668800*********9999: unknown card" in line
    assert (cards.out, points.out) == ("", "")
    assert table_counts(cli.db_url) == before
    assert cli.run("cards", "show", NEW_GOLD).out == shown_before


# --- exit statuses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("cards", "show"),
        ("cards", "enrol"),
        ("cards", "block"),
        ("cards", "unlock"),
        ("cards", "status", "{card}", "lost"),
    ],
)
def test_an_unknown_card_exits_2(cli: Cli, command: tuple[str, ...]) -> None:
    """Every card command refuses a card the ledger does not know, in one masked line, and
    changes nothing: the config load it began with is rolled back with it."""
    args = [part.format(card=UNKNOWN) for part in command]
    if "{card}" not in command:
        args.append(UNKNOWN)
    result = cli.run(*args)
    assert result.code == 2
    assert one_error_line(result) == "vipgate: error: card 668800*********9999: unknown card"
    assert result.out == ""
    counts = table_counts(cli.db_url)
    assert [counts[table] for table in ("merchants", "terminals", "cards", "point_lots")] == [0] * 4


@pytest.mark.parametrize(
    ("card", "reason"),
    [
        ("6688000000000000015", "card 668800*********0015: Luhn check digit wrong"),
        ("66880000000000000", "card 668800*******0000: not 19 digits"),
        ("abc", "card ***: not 19 digits"),
    ],
)
def test_a_malformed_card_exits_2_without_echoing_it(cli: Cli, card: str, reason: str) -> None:
    """A card argument that is no plan card number is refused before any lookup, masked."""
    result = cli.run("cards", "show", card)
    assert result.code == 2
    assert one_error_line(result) == f"vipgate: error: {reason}"


@pytest.mark.parametrize(
    ("as_of", "reason"),
    [
        ("2026-13-01", '--as-of: "2026-13-01" is not a date YYYY-MM-DD'),
        ("2026/11/01", '--as-of: "2026/11/01" is not a date YYYY-MM-DD'),
        ("2026-11-23", "expiry as of 2026-11-23: that date has not begun yet"),
    ],
)
def test_a_bad_expiry_date_exits_2(cli: Cli, as_of: str, reason: str) -> None:
    """`points expire` refuses a malformed date and one whose midnight is still to come,
    before the config is loaded: the ledger is left empty."""
    result = cli.run("points", "expire", "--as-of", as_of)
    assert result.code == 2
    assert one_error_line(result) == f"vipgate: error: {reason}"
    assert result.out == ""
    counts = table_counts(cli.db_url)
    assert [counts[table] for table in ("merchants", "terminals", "cards", "point_lots")] == [0] * 4


def test_a_bad_date_in_the_feed_exits_2(cli: Cli, tmp_path: Path) -> None:
    """A feed line with an impossible date is bad input, named by line."""
    path = csv_file(
        tmp_path, "feed.csv", "card_number,earned_on,points,source_ref", f"{GOLD},2026-02-29,5,R1"
    )
    result = cli.run("points", "import", str(path))
    assert result.code == 2
    assert 'line 2: earned_on "2026-02-29" is not a date YYYY-MM-DD' in one_error_line(result)


def test_an_unknown_status_is_a_usage_error(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    """`cards status` takes only the five card states: exit 2 with one line naming the
    argument, not the usage block."""
    with pytest.raises(SystemExit) as raised:
        cli.run("cards", "status", NEW_GOLD, "frozen")
    assert raised.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("vipgate cards status: error: argument status: invalid choice: ")
    assert NEW_GOLD not in line


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        (["bogus"], "vipgate: error: argument COMMAND: invalid choice: 'bogus'"),
        (["clear", "--month", "2026-06"], "vipgate clear: error: the following arguments"),
        (["sim", "load", "--terminals", "x"], "vipgate sim load: error: argument --terminals"),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], start: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(start)


# --- what each command does ----------------------------------------------------------------


def test_expire_books_expired_lots_once(cli: Cli, tmp_path: Path) -> None:
    """A lot earned in 2024 expired on 2025-11-30: the job books it, and again books nothing."""
    cli.run("cards", "import", str(SAMPLES / "cards.csv"))
    feed = csv_file(
        tmp_path,
        "old.csv",
        "card_number,earned_on,points,source_ref",
        f"{NEW_GOLD},2024-06-01,500,OLD-1",
    )
    assert cli.run("points", "import", str(feed)).code == 0
    shown = cli.run("cards", "show", NEW_GOLD).out
    assert "  ledger balance: 500 points\n  spendable balance: 0 points\n" in shown
    assert "remaining 500 of 500 (expired, not yet booked)" in shown
    first = cli.run("points", "expire", "--as-of", "2026-11-22")
    assert first.out == "expiry as of 2026-11-22: 1 lots booked (500 points) on 1 cards\n"
    again = cli.run("points", "expire", "--as-of", "2026-11-22")
    assert again.out == "expiry as of 2026-11-22: 0 lots booked (0 points) on 0 cards\n"
    assert "  ledger balance: 0 points\n" in cli.run("cards", "show", NEW_GOLD).out
    assert cli.run("ledger", "check").code == 0


def test_expiry_books_a_few_cards_to_a_transaction_and_a_stopped_run_finishes(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The expiry job books `EXPIRY_CARDS` cards to a transaction, pausing after each so
    that a serving gateway waiting for the ledger goes first: it held the whole ledger for
    its run (a minute and a half for 20,000 lots, no terminal answered meanwhile). Stopped
    in its second batch, the first stands, and a run again books the rest."""
    cli.run("cards", "import", str(SAMPLES / "cards.csv"))
    lines = [f"{card},2024-06-01,100,OLD-{index}" for index, card in enumerate(SAMPLE_CARDS[:3])]
    feed = csv_file(tmp_path, "old.csv", "card_number,earned_on,points,source_ref", *lines)
    assert cli.run("points", "import", str(feed)).code == 0
    monkeypatch.setattr("gateway.commands.points.EXPIRY_CARDS", 2)
    pauses: list[float] = []
    monkeypatch.setattr("gateway.imports.time.sleep", pauses.append)
    real = operations.expire_cards
    batches: list[list[str]] = []

    def stopped_in_the_second(session: Any, card_numbers: list[str], **kwargs: Any) -> Any:
        batches.append(list(card_numbers))
        if len(batches) == 2:
            raise KeyboardInterrupt
        return real(session, card_numbers, **kwargs)

    monkeypatch.setattr(operations, "expire_cards", stopped_in_the_second)
    assert cli.run("points", "expire", "--as-of", "2026-11-22").code == 130
    assert [len(batch) for batch in batches] == [2, 1]
    assert pauses == [imports.BATCH_PAUSE_S]  # after the one batch committed
    monkeypatch.setattr(operations, "expire_cards", real)
    again = cli.run("points", "expire", "--as-of", "2026-11-22")
    assert again.out == "expiry as of 2026-11-22: 1 lots booked (100 points) on 1 cards\n"
    assert cli.run("ledger", "check").code == 0


def test_enrol_needs_more_than_the_qualifying_points(cli: Cli) -> None:
    """Too few spendable points is exit 2 with the figures; enough enrols; twice is no change."""
    cli.run("cards", "import", str(SAMPLES / "cards.csv"))
    short = cli.run("cards", "enrol", NEW_SILVER)
    assert short.code == 2
    assert one_error_line(short) == (
        "vipgate: error: card 668800*********1194: 0 spendable points; enrolment needs more "
        "than 3500"
    )
    cli.run("points", "import", str(SAMPLES / "points.csv"))
    assert cli.run("cards", "enrol", NEW_SILVER).out == "card 668800*********1194: enrolled\n"
    again = cli.run("cards", "enrol", NEW_SILVER)
    assert (again.code, again.out) == (0, "card 668800*********1194: already enrolled\n")
    assert "  enrolled: yes, since 2026-11-22 12:00\n" in cli.run("cards", "show", NEW_SILVER).out


def test_block_and_status_change_a_card_and_say_what_it_was(cli: Cli) -> None:
    """`block` and `status` print the new and the previous status."""
    cli.run("cards", "import", str(SAMPLES / "cards.csv"))
    block = cli.run("cards", "block", NEW_GOLD)
    assert block.out == "card 668800*********1012: status blocked (was active)\n"
    assert (
        cli.run("cards", "block", NEW_GOLD).out
        == "card 668800*********1012: status already blocked\n"
    )
    lost = cli.run("cards", "status", NEW_GOLD, "lost")
    assert lost.out == "card 668800*********1012: status lost (was blocked)\n"
    assert "  status: lost\n" in cli.run("cards", "show", NEW_GOLD).out


def test_changes_the_config_would_undo_are_refused(cli: Cli) -> None:
    """A config card keeps the config's status and enrolment (every command loads the config),
    so changing them by command is refused with exit 2; the points rule still speaks first."""
    block = cli.run("cards", "block", GOLD)
    assert block.code == 2
    assert "card 668800*********0014 is listed in" in one_error_line(block)
    assert "with status = active" in block.err
    enrol = cli.run("cards", "enrol", SILVER_IN_CONFIG)
    assert "2000 spendable points; enrolment needs more than 3500" in one_error_line(enrol)
    assert (block.out, enrol.out) == ("", "")  # each refusal rolled its config load back
    same = cli.run("cards", "status", GOLD, "active")
    assert same.code == 0
    assert same.out.splitlines()[0].endswith("2 merchants, 3 terminals, 5 cards; 6 lots accrued"
    " (160150 points); 16 changes")  # fmt: skip
    assert same.out.splitlines()[-1] == "card 668800*********0014: status already active"


def test_unlock_clears_a_locked_pin(cli: Cli) -> None:
    """After three wrong PINs the card shows locked; `unlock` clears the lock and the count."""
    cli.run("ledger", "load")
    engine = make_engine(cli.db_url)
    try:
        with unit_of_work(engine) as session:
            for _ in range(3):
                operations.record_wrong_pin(session, GOLD)
    finally:
        engine.dispose()
    assert (
        "  PIN: required, locked (3 wrong tries in a row)\n" in cli.run("cards", "show", GOLD).out
    )
    unlock = cli.run("cards", "unlock", GOLD)
    assert unlock.out == "card 668800*********0014: PIN unlocked (locked after 3 wrong tries)\n"
    assert (
        "  PIN: required, not locked (0 wrong tries in a row)\n"
        in cli.run("cards", "show", GOLD).out
    )
    assert cli.run("cards", "unlock", "6688001234567890124").out == (
        "card 668800*********0124: needs no PIN; nothing to unlock\n"
    )


def test_ledger_check_exits_1_listing_every_violation(cli: Cli) -> None:
    """A lot edited behind the journal's back breaks two invariants; both are listed, exit 1."""
    cli.run("ledger", "load")
    engine = make_engine(cli.db_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE point_lots SET remaining_points = remaining_points - 1 WHERE id = 1")
            )
    finally:
        engine.dispose()
    result = cli.run("ledger", "check")
    assert result.code == 1
    assert result.out.splitlines() == [
        "card.balance_vs_lots: account 5: balance 100000, lots hold 99999",
        "lot.movements: lot 1: remaining 99999, movements sum 100000",
    ]
    assert one_error_line(result) == "vipgate: ledger check: 2 violations"


def _ledger_file(cli: Cli) -> Path:
    return Path(cli.db_url.removeprefix("sqlite:///"))


def test_ledger_check_lists_what_sqlites_integrity_check_finds_and_exits_1(cli: Cli) -> None:
    """An index that no longer matches its table (the invariants read through it, and saw
    nothing amiss): SQLite's own findings listed, exit 1, the invariants not run on it."""
    cli.run("ledger", "load")
    with sqlite3.connect(_ledger_file(cli)) as connection:
        connection.execute("PRAGMA writable_schema = ON")
        connection.execute(
            "UPDATE sqlite_master SET sql = 'CREATE INDEX ix_point_lots_card_number"
            " ON point_lots (earned_on)' WHERE name = 'ix_point_lots_card_number'"
        )
    connection.close()
    result = cli.run("ledger", "check")
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines and all(line.startswith("storage_sound: ledger file: ") for line in lines)
    assert "ix_point_lots_card_number" in result.out
    assert one_error_line(result) == (
        "vipgate: ledger check: the ledger file is damaged (SQLite's integrity check); the"
        " invariants were not checked: restore the ledger from a backup"
    )


def test_a_damaged_page_is_one_line_for_every_command_and_a_fault_for_ledger_check(
    cli: Cli,
) -> None:
    """The cards table's first page overwritten: `ledger check` lists SQLite's error and
    exits 1; a command that reads or writes the card says the file is damaged in one line
    and exits 2, where it printed a traceback (with the statement) and exited 1."""
    cli.run("ledger", "load")
    overwrite_first_page(_ledger_file(cli), "cards")
    check = cli.run("ledger", "check")
    assert check.code == 1
    assert check.out == "storage_sound: ledger file: database disk image is malformed\n"
    for command in (("cards", "show", GOLD), ("cards", "block", SILVER_IN_CONFIG)):
        result = cli.run(*command)
        assert result.code == 2, result.err
        assert one_error_line(result) == (
            "vipgate: error: database: the ledger file is damaged (database disk image is"
            " malformed); the command stopped: what was committed stands, the rest was rolled"
            " back; run `vipgate ledger check`, and restore the ledger from a backup"
        )


def test_damage_that_stops_the_ledger_opening_is_a_fault_for_ledger_check(cli: Cli) -> None:
    """A damaged page every command reads at its start (the migrations' own table):
    `ledger check` lists SQLite's finding and exits 1, as for damage it finds itself; a
    command that would use the ledger says it is damaged and exits 2."""
    cli.run("ledger", "load")
    overwrite_first_page(_ledger_file(cli), "alembic_version")
    check = cli.run("ledger", "check")
    assert check.code == 1
    assert check.out == "storage_sound: ledger file: database disk image is malformed\n"
    assert "vipgate: ledger check: the ledger file is damaged" in check.err
    show = cli.run("cards", "show", GOLD)
    assert show.code == 2
    assert one_error_line(show) == (
        "vipgate: error: database: cannot open it: the ledger file is damaged (database disk"
        " image is malformed); restore the ledger from a backup"
    )


@pytest.mark.parametrize("command", [("ledger", "load"), ("serve", "--listen", "127.0.0.1:0")])
def test_a_ledger_that_takes_no_write_is_refused_before_serving(
    cli: Cli, command: tuple[str, ...], tmp_path: Path
) -> None:
    """A ledger opened read-only (here by SQLite's `mode=ro`; a file its user may not write,
    or a PostgreSQL standby, alike): a command that loads the config says so in one line and
    exits 2, `serve` before it listens. A load that changed nothing wrote nothing, so `serve`
    listened and answered every request `96`, and went on so once the file was writable.
    The URI's file is SQLite's to open: no folder named `file:` is made where it runs."""
    cli.run("ledger", "load")
    database = _ledger_file(cli)
    read_only = f"sqlite:///file:{database}?mode=ro&uri=true"
    where = tmp_path / "elsewhere"
    where.mkdir()
    result = _vipgate_in(where, *command, "--config", str(cli.config), "--db", read_only)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "vipgate: error: database: the ledger file cannot be written (attempt to write a"
        " readonly database); check the file's and its folder's owner and mode, then run the"
        " command again\n"
    )
    assert '"listening"' not in result.stdout
    assert list(where.iterdir()) == []


def test_a_sqlite_uri_without_uri_true_is_refused(cli: Cli, tmp_path: Path) -> None:
    """`sqlite:///file:PATH` without `uri=true` is, to SQLite, a file in a folder named
    `file:` below the working folder: one line saying so, exit 2, nothing made."""
    where = tmp_path / "elsewhere"
    where.mkdir()
    url = f"sqlite:///file:{tmp_path / 'new' / 'ledger.db'}"
    result = _vipgate_in(where, "ledger", "load", "--config", str(cli.config), "--db", url)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "vipgate: error: database: a SQLite URI (sqlite:///file:...) needs ?uri=true, or else"
        " SQLite takes it for a file in a folder named 'file:'; name the file's path"
        " (sqlite:///PATH) or add uri=true\n"
    )
    assert list(where.iterdir()) == []
    assert not (tmp_path / "new").exists()


def test_a_reading_command_refuses_a_sqlite_uri_naming_no_file(cli: Cli, tmp_path: Path) -> None:
    """A command that only reads the ledger refuses a URI whose file is not there, as it
    refuses such a path: SQLite would make an empty ledger for it."""
    missing = tmp_path / "missing.db"
    url = f"sqlite:///file:{missing}?uri=true"
    result = _vipgate_in(tmp_path, "ledger", "check", "--config", str(cli.config), "--db", url)
    assert result.returncode == 2, result.stderr
    assert f"database: no ledger at {missing};" in result.stderr
    assert not missing.exists()


def _vipgate_in(
    folder: Path, *args: str, limited: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    """`vipgate ARGS` run as its own process in `folder`, its output captured; `limited`
    sets a resource limit in the child before it starts."""
    return subprocess.run(
        [str(VIPGATE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=folder,
        preexec_fn=limited,
    )


def _file_size_limit(limit: int) -> Callable[[], None]:
    def limited() -> None:  # in the child: a write past `limit` fails (EFBIG), no signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limited


def _open_files_limit(limit: int) -> Callable[[], None]:
    def limited() -> None:  # in the child: at most `limit` file descriptors
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return limited


def test_serve_without_descriptors_to_serve_is_one_line_and_exit_2(cli: Cli) -> None:
    """`serve` where the process may open too few files to serve (`ulimit -n 12`): one
    line with the limit and what to do, exit 2, before the ledger is touched. It was a
    traceback (EMFILE), or, a descriptor or two higher, a gateway that listened and then
    closed every connection."""
    arguments = ["--config", str(cli.config), "--db", cli.db_url, "--listen", "127.0.0.1:0"]
    result = _vipgate_in(cli.config.parent, "serve", *arguments, limited=_open_files_limit(12))
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "vipgate: error: ulimit -n: this process may open 12 files, and serving needs at"
        " least 32 (each terminal's connection holds one); raise the limit (LimitNOFILE= for"
        " a systemd service)\n"
    )
    assert result.stdout == ""


def test_a_command_out_of_descriptors_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Any command that runs out of file descriptors (EMFILE) says so in one line with the
    process's limit, exit 2, where it was a traceback."""

    def out_of_files(_args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    assert cli_module._run(out_of_files, argparse.Namespace()) == 2
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert capsys.readouterr().err == (
        f"vipgate: error: too many open files: this process may have {soft} (`ulimit -n`;"
        " LimitNOFILE= for a systemd service); raise the limit, then run the command again\n"
    )


def test_serve_with_few_descriptors_says_so_and_serves(cli: Cli) -> None:
    """Allowed 100 files, `serve` starts, warns that each connection holds one
    (`file_limit_low`, with the limit), and stops on SIGTERM as usual."""
    process = subprocess.Popen(
        [
            str(VIPGATE),
            "serve",
            "--config",
            str(cli.config),
            "--db",
            cli.db_url,
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_open_files_limit(100),  # noqa: PLW1509 (no thread in this test)
    )
    assert process.stdout is not None
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if '"listening"' in line:
                break
        process.send_signal(signal.SIGTERM)
        rest, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    warnings = [line for line in lines if '"file_limit_low"' in line]
    assert len(warnings) == 1
    assert '"limit": 100' in warnings[0]
    assert '"stopped"' in rest


def test_a_write_the_disk_refuses_is_one_line_and_exit_2(cli: Cli, tmp_path: Path) -> None:
    """A cards import whose writes the file system refuses past a size (as a full disk
    refuses them): one line naming the fault and what to do, exit 2, no traceback with the
    statement; the ledger still passes its check afterwards."""
    cli.run("ledger", "load")
    feed = tmp_path / "cards.csv"
    numbers = (f"668800{index:012d}" for index in range(100, 20_100))
    rows = (f"{number}{luhn_check_digit(number)},2812,gold,active,false" for number in numbers)
    feed.write_text("number,expiry,tier,status,enrolled\n" + "\n".join(rows) + "\n")
    arguments = [str(feed), "--config", str(cli.config), "--db", cli.db_url]
    result = _vipgate_in(
        tmp_path, "cards", "import", *arguments, limited=_file_size_limit(1_000_000)
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "vipgate: error: database: the ledger file could not be read or written (disk I/O"
        " error); the command stopped: what was committed stands, the rest was rolled back;"
        " check its disk, then run the command again\n"
    )
    assert cli.run("ledger", "check").code == 0


def test_a_master_key_open_to_others_exits_2_naming_it(cli: Cli) -> None:
    """A master key file others can read stops every command that uses it (each that loads
    the config) with exit 2, naming the file."""
    cli.run("ledger", "load")
    key = cli.config.parent / "var" / "master.key"
    key.chmod(0o644)
    result = cli.run("cards", "unlock", GOLD)
    assert result.code == 2
    assert one_error_line(result).startswith(f"vipgate: error: master key {key}: permissions 0644")


@pytest.mark.parametrize("removed", [("master.key", "master.key.pin"), ("master.key",)])
def test_missing_key_files_are_refused_and_not_made_anew(
    cli: Cli, removed: tuple[str, ...]
) -> None:
    """A ledger whose keys were made under key files this host no longer has: the command
    says the files are missing and makes none (made anew, they would only be refused as
    another key by the load, and left behind)."""
    cli.run("ledger", "load")
    folder = cli.config.parent / "var"
    for name in removed:
        (folder / name).unlink()
    result = cli.run("cards", "unlock", GOLD)
    assert result.code == 2
    line = one_error_line(result)
    assert line.startswith(f"vipgate: error: master key {folder / 'master.key'}: ")
    assert f"{folder / removed[-1]} missing" in line
    assert not any((folder / name).exists() for name in removed)
    # The commands that only read the ledger use no key: an audit host has none.
    assert cli.run("ledger", "check").code == 0
    assert cli.run("cards", "show", GOLD).code == 0
    assert not any((folder / name).exists() for name in removed)


def test_a_sqlite_ledger_made_by_a_command_is_its_owners_only(cli: Cli, tmp_path: Path) -> None:
    """The ledger holds card numbers: the folder and file a command makes for it are 0700
    and 0600 whatever the umask, and SQLite gives its log and shared-memory files the
    file's mode. A folder that existed keeps its own."""
    old = os.umask(0o022)
    try:
        assert cli.run("ledger", "load").code == 0
        folder = tmp_path / "db"
        made = [folder / "ledger.db", folder / "ledger.db-wal", folder / "ledger.db-shm"]
        connection = sqlite3.connect(made[0])  # the log and shared memory, while it is open
        try:
            assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert connection.execute("SELECT count(*) FROM cards").fetchone()[0] > 0
            modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in made}
        finally:
            connection.close()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert modes == dict.fromkeys(modes, 0o600)
        kept = tmp_path / "kept"
        kept.mkdir(mode=0o755)
        url = f"sqlite:///{kept / 'ledger.db'}"
        assert main(["ledger", "load", "--config", str(cli.config), "--db", url]) == 0
        assert stat.S_IMODE(kept.stat().st_mode) == 0o755
        assert stat.S_IMODE((kept / "ledger.db").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_sqlite_folder_that_cannot_be_made_is_named(
    cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--db` whose folder cannot be made (a file is in the way): exit 2, naming the folder."""
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    url = f"sqlite:///{blocker / 'ledger.db'}"
    assert main(["ledger", "load", "--config", str(cli.config), "--db", url]) == 2
    assert capsys.readouterr().err == (
        f"vipgate: error: database: cannot make its folder {blocker}: File exists\n"
    )


@pytest.mark.parametrize(
    "command",
    [
        ("ledger", "check"),
        ("cards", "show", "6688000000000000014"),
        ("clear", "--month", "2026-10", "--out", "OUT"),
        ("reconcile", "--month", "2026-10", "--out", "OUT"),
    ],
)
def test_a_command_that_reads_the_ledger_refuses_one_that_is_not_there(
    cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    """A mistyped `--db` for a command that only reads the ledger: exit 2, one line naming
    the path, and no ledger made. Made anew, an empty ledger passed every check, and would
    have been closed and reconciled as an empty month."""
    missing = tmp_path / "typo" / "ledger.db"
    arguments = [str(tmp_path / "out") if part == "OUT" else part for part in command]
    url = f"sqlite:///{missing}"
    assert main([*arguments, "--config", str(cli.config), "--db", url]) == 2
    assert capsys.readouterr().err == (
        f"vipgate: error: database: no ledger at {missing}; this command works on a ledger"
        " and makes none (check --db or the config's database)\n"
    )
    assert not missing.parent.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [("ledger", "load"), ("serve", "--clock", "CLOCK")])
def test_a_config_lot_after_today_is_refused_before_a_new_ledger_is_made(
    cli: Cli, tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A config lot earned after today, for a SQLite ledger not made yet: exit 2, the lot
    named, and no ledger file or folder left behind (a refused load changes nothing). For
    `serve --clock`, the clock's check of the ledger makes none either."""
    text = cli.config.read_text(encoding="utf-8")
    cli.config.write_text(text.replace('"2026-03-01"', '"2099-03-01"', 1), encoding="utf-8")
    missing = tmp_path / "new" / "ledger.db"
    arguments = [NOW.isoformat() if part == "CLOCK" else part for part in command]
    result = subprocess.run(
        [str(VIPGATE), *arguments, "--config", str(cli.config), "--db", f"sqlite:///{missing}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "cards[0] (668800*********0014).lots[0].earned_on: 2099-03-01 is after today (" in (
        result.stderr
    )
    assert not missing.parent.exists()


@pytest.mark.parametrize(
    ("number", "escaped"),
    [
        ("6688000000000000014\n", "\\n"),
        ("\x1b[2J6688000000000000014", "\\x1b"),
        ("\u202e6688000000000000014", "\\u202e"),  # a right-to-left override
    ],
)
def test_control_characters_in_an_argument_are_shown_escaped(
    cli: Cli, number: str, escaped: str
) -> None:
    """A card number with a newline or an escape sequence in it: the error is one line, the
    character written as an escape, so no terminal runs a sequence a file or argument held."""
    result = cli.run("cards", "show", number)
    assert result.code == 2
    line = one_error_line(result)
    assert escaped in line and "\x1b" not in line


def test_full_width_digits_are_no_month_and_an_empty_out_no_folder(
    cli: Cli, tmp_path: Path
) -> None:
    """`--month` takes ASCII digits only (a month closed by mistake cannot be reopened), and
    an empty `--out` is not the current folder."""
    out = str(tmp_path / "out")  # never the working folder, should the month be taken
    result = cli.run("clear", "--month", "\uff12\uff10\uff12\uff16-09", "--out", out)
    assert result.code == 2
    assert one_error_line(result).startswith("vipgate: error: --month: ")
    with pytest.raises(SystemExit) as stopped:
        cli.run("clear", "--month", "2026-09", "--out", "")
    assert stopped.value.code == 2


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sqlite://", "an in-memory SQLite database keeps nothing"),
        ("sqlite:///:memory:", "an in-memory SQLite database keeps nothing"),
        ("sqlite:///file::memory:?uri=true", "an in-memory SQLite database keeps nothing"),
        ("sqlite:///file:m1?mode=memory&cache=shared&uri=true", "an in-memory SQLite database"),
        ("NOT-A-DB", "cannot open it: file is not a database"),
    ],
)
def test_a_database_that_keeps_nothing_or_is_not_one_is_refused(
    cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, problem: str
) -> None:
    """An in-memory database would take an import and keep nothing; a file that is not a
    database (the config, say) is refused on one line, not with a traceback."""
    if url == "NOT-A-DB":
        url = f"sqlite:///{cli.config}"
    assert main(["ledger", "check", "--config", str(cli.config), "--db", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and problem in err, err


def test_ctrl_c_is_one_line_and_exit_130(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during a command: one line saying what stands, status 130, no traceback."""

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    assert cli.run("ledger", "load").code == 0
    monkeypatch.setattr("gateway.commands.ledger.check_invariants", interrupted)
    assert main(["ledger", "check", "--config", str(cli.config), "--db", cli.db_url]) == 130
    assert capsys.readouterr().err == (
        "vipgate: interrupted: what was committed stands, the rest was rolled back;"
        " run the command again to finish\n"
    )


def test_ledger_check_reads_one_snapshot_on_postgresql(
    tmp_path: Path, postgres_ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL every statement of the check reads one snapshot (REPEATABLE READ): a
    redemption a gateway commits between two of them cannot look like a broken invariant.
    Here a row committed on another connection after the check's first read is not seen by
    its later reads."""
    url = empty_postgres_ledger(postgres_ledger)
    config = tmp_path / "demo.toml"
    shutil.copyfile(DEMO, config)
    seen: list[tuple[str, int, int]] = []

    def checked(session: Any) -> list[object]:
        count = text("SELECT count(*) FROM key_checks")
        before = session.execute(count).scalar_one()  # the snapshot is taken here
        level = session.connection().exec_driver_sql("SHOW transaction_isolation").scalar()
        engine = make_engine(url)
        try:
            with engine.begin() as other:
                other.execute(text("INSERT INTO key_checks VALUES ('test', '\\x00'::bytea)"))
        finally:
            engine.dispose()
        seen.append((str(level), int(before), int(session.execute(count).scalar_one())))
        return []

    monkeypatch.setattr("gateway.commands.ledger.check_invariants", checked)
    assert main(["ledger", "check", "--config", str(config), "--db", url]) == 0
    # A check loads no config (so no key check values), and does not see the insert.
    assert seen == [("repeatable read", 0, 0)]


def test_a_ledger_held_past_the_busy_timeout_is_one_line_and_exit_2(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds SQLite's write lock longer than a command waits (30 s; 0.2 s
    here): the command says so in one line and exits 2, never 1 (which from `ledger check`
    would say a fault was found) and never with a traceback; nothing it began is kept."""
    assert cli.run("ledger", "check").code == 0
    monkeypatch.setattr("gateway.ledger.db.SQLITE_BUSY_TIMEOUT_MS", 200)
    holder = sqlite3.connect(cli.db_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        result = cli.run("ledger", "check")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.code == 2
    assert one_error_line(result).startswith("vipgate: error: database: busy: another process")
    assert cli.run("ledger", "check").code == 0


def test_a_feed_sent_again_names_twenty_skipped_lines_and_counts_the_rest(
    cli: Cli, tmp_path: Path
) -> None:
    """A feed sent again after a stop skips what it applied, perhaps thousands of lines: the
    report names twenty and counts the rest."""
    feed = tmp_path / "feed.csv"
    lines = [f"{GOLD},2026-06-01,10,bill-{number}" for number in range(25)]
    feed.write_text("card_number,earned_on,points,source_ref\n" + "\n".join(lines) + "\n")
    assert cli.run("points", "import", str(feed)).code == 0
    again = cli.run("points", "import", str(feed))
    assert again.code == 0
    report = again.out.splitlines()
    assert report[0] == f"{feed}: 0 lots applied (0 points)"
    assert report[1] == f"{feed}: 25 lines skipped, their source_ref applied before (250 points)"
    assert len([line for line in report if line.startswith("  line ")]) == 20
    assert report[-1] == "  and 5 more lines"


@pytest.mark.parametrize(
    "command",
    [
        ("cards", "block", GOLD),
        ("cards", "unlock", GOLD),
        ("cards", "status", GOLD, "lost"),
        ("cards", "enrol", GOLD),
        ("keys", "rotate-master"),
    ],
)
def test_a_command_with_no_use_for_a_new_ledger_makes_none(
    cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    """A card command or the master key's rotation with a mistyped `--db`: one line and
    exit 2, no ledger made, the key files as they were. Each made an empty ledger and
    loaded the config into it; the rotation then sealed that ledger's keys under a new
    master key and destroyed the old one, under which the real ledger's keys are sealed."""
    cli.run("ledger", "load")
    master = cli.config.parent / "var" / "master.key"
    keys = (master.read_bytes(), master.with_name("master.key.pin").read_bytes())
    typo = tmp_path / "db" / "ledgr.db"
    capsys.readouterr()
    assert main([*command, "--config", str(cli.config), "--db", f"sqlite:///{typo}"]) == 2
    assert capsys.readouterr().err == (
        f"vipgate: error: database: no ledger at {typo}; this command works on a ledger and"
        " makes none (check --db or the config's database)\n"
    )
    assert not typo.exists()
    assert (master.read_bytes(), master.with_name("master.key.pin").read_bytes()) == keys
    assert cli.run("ledger", "load").code == 0  # the real ledger's keys still open


@pytest.mark.parametrize("query", ["uri=true", "uri=true&vfs=memdb"])
def test_a_sqlite_uri_of_a_throwaway_database_is_refused(
    cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str], query: str
) -> None:
    """A URI naming no file (SQLite's private temporary database) or SQLite's memory VFS:
    refused as `:memory:` is. `ledger check` passed such an empty ledger, and `clear`
    signed a settlement file of nothing with the issuer's key."""
    names = [""] if "vfs" not in query else [str(tmp_path / "db" / "ledger.db")]
    for name in names:  # memdb even names the real ledger's file, and reads none of it
        url = f"sqlite:///file:{name}?{query}"
        assert main(["ledger", "check", "--config", str(cli.config), "--db", url]) == 2
        assert capsys.readouterr().err == (
            "vipgate: error: database: an in-memory SQLite database keeps nothing once the"
            " command ends; name a file (sqlite:///PATH)\n"
        )


def test_a_ledger_a_sqlite_uri_makes_is_its_owners_only(
    cli: Cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ledger made through a URI (SQLite's default mode, rwc) is 0600 in a 0700 folder
    whatever the umask, as one made through a path is: it holds card numbers."""
    made = tmp_path / "uri" / "ledger.db"
    previous = os.umask(0o022)
    try:
        url = f"sqlite:///file:{made}?uri=true"
        assert main(["ledger", "load", "--config", str(cli.config), "--db", url]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.parent.stat().st_mode) == 0o700

"""Shared fixtures: a fresh, migrated ledger database per test on SQLite and on PostgreSQL.

Every ledger test takes `ledger_engine` (or `ledger_url`, or `fresh_ledger_url` for several
databases in one test) and so runs twice, once per backend: the ledger's promise is that both
behave the same. SQLite migrates once per session into a template file and each test gets a
copy; PostgreSQL migrates one database once and each test gets it emptied of every row (a new
database per test would cost more than the test), which keeps the PostgreSQL suite to seconds.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import date, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from cardcodec.cards import luhn_check_digit
from gateway import build
from gateway.clock import SHANGHAI
from gateway.ledger import Moment, operations, records
from gateway.ledger.db import make_engine, migrate, unit_of_work
from gateway.ledger.invariants import Violation, check_invariants
from gateway.ledger.models import Authorisation, Base, CardStatus, KeySuite
from gateway.points import Conversion, convert
from tests import pg
from tests.logscan import Known, LeakWatch, describe, known_from_config, scan_sections

LEDGER_DATABASE = "vipgate_test"
CONFIGS = Path(__file__).resolve().parents[1] / "config"
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]

FreshUrl = Callable[[], str]

# `make test` runs the suite a second time on the native build (Makefile, docs/gateway.md).
# A test that replaces a method of a class that build compiles cannot reach the compiled
# callers, so it runs on the source only.
NATIVE = build() == "native"
source_only = pytest.mark.skipif(NATIVE, reason="patches a class the native build compiles")


def pytest_report_header() -> str:
    return f"vipgate build: {build()}"


def pytest_sessionstart(session: pytest.Session) -> None:
    """With VIPGATE_EXPECT_BUILD set, the run stops unless it tests that build: a native pass
    that found the source first would test the wrong thing and still pass."""
    expected = os.environ.get("VIPGATE_EXPECT_BUILD")
    if expected and build() != expected:
        raise pytest.UsageError(f"expected the {expected} build, found the {build()} build")


def skip_without(missing: str | None) -> None:
    """Skip a test that needs what this machine lacks (saying what), unless the run must have
    everything (`VIPGATE_REQUIRE_ALL=1`, as `.ci/run` sets): then it fails, so a CI machine
    without PostgreSQL or HAProxy cannot pass with those tests quietly left out."""
    if missing is None or not missing:
        return
    if os.environ.get("VIPGATE_REQUIRE_ALL") == "1":
        pytest.fail(f"{missing} (VIPGATE_REQUIRE_ALL=1: nothing may be skipped for it)")
    pytest.skip(missing)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[pg.PgServer]:
    """A PostgreSQL 15 server for the whole run; skipped (saying why) without the binaries."""
    skip_without(pg.missing_binaries())
    server = pg.start()
    try:
        yield server
    finally:
        pg.stop(server)


@pytest.fixture(scope="session")
def postgres_ledger(postgres_server: pg.PgServer) -> Iterator[str]:
    """The URL of the one migrated PostgreSQL database that the tests take turns to use."""
    url = postgres_server.create_database(LEDGER_DATABASE)
    engine = make_engine(url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    yield url


def empty_postgres_ledger(url: str) -> str:
    """Delete every row a test may have left, keeping the schema and the system accounts.

    Deleting is several times faster than CREATE DATABASE or TRUNCATE on tables this small.
    """
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                if table.name == "alembic_version":
                    continue
                query = table.delete()
                if table.name == "accounts":
                    query = query.where(table.c.card_number.is_not(None))
                connection.execute(query)
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that test databases are copied from."""
    path = tmp_path_factory.mktemp("ledger-template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        migrate(engine)
    finally:
        # Closing the last connection folds the WAL into the file, so a copy is complete.
        engine.dispose()
    assert not path.with_name(path.name + "-wal").exists()
    return path


_database_numbers = itertools.count(1)


@pytest.fixture(params=BACKENDS)
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """The backend under test: "sqlite" or "postgresql"."""
    backend: str = request.param
    return backend


@pytest.fixture
def fresh_ledger_url(
    ledger_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> FreshUrl:
    """A function that makes a new, empty, migrated ledger database and returns its URL."""
    if ledger_backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")

        def fresh_sqlite() -> str:
            path = tmp_path / f"ledger-{next(_database_numbers)}.db"
            shutil.copyfile(template, path)
            return f"sqlite:///{path}"

        return fresh_sqlite
    url: str = request.getfixturevalue("postgres_ledger")
    return lambda: empty_postgres_ledger(url)


@pytest.fixture
def ledger_url(fresh_ledger_url: FreshUrl) -> str:
    """The URL of a new, empty, migrated ledger database for this test."""
    return fresh_ledger_url()


@pytest.fixture
def ledger_engine(ledger_url: str) -> Iterator[Engine]:
    """An engine on this test's own ledger database, disposed afterwards."""
    engine = make_engine(ledger_url)
    try:
        yield engine
    finally:
        engine.dispose()


# --- a small world to run ledger operations in ---------------------------------------------

MERCHANT_ID = "898310048990001"
TERMINAL_ID = "10000001"
START = datetime(2026, 3, 10, 12, 0, tzinfo=SHANGHAI)
EXPIRY_YEARS = 1


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite file with one table, `notes`, for tests of the engine's own machinery
    (checkpoints, log syncs) rather than of the ledger."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    with unit_of_work(engine) as session:
        session.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"))
    yield engine
    engine.dispose()


def card_number(serial: int) -> str:
    """A 19-digit plan card number with a valid Luhn digit."""
    partial = f"668800{serial:012d}"
    return partial + luhn_check_digit(partial)


def moment(at: datetime) -> Moment:
    """A Moment whose business date is the local calendar date (a cut-off of 00:00)."""
    return Moment(at, at.astimezone(SHANGHAI).date())


class LedgerWorld:
    """One merchant, one terminal and helpers that run each operation in its own unit of work."""

    def __init__(self, engine: Engine, now: datetime = START, *, set_up: bool = True) -> None:
        self.engine = engine
        self.now = now
        self._traces = itertools.count(1)
        self._refs = itertools.count(1)
        if not set_up:
            return
        with unit_of_work(engine) as session:
            records.upsert_merchant(session, merchant_details(), now)
            records.upsert_terminal(session, terminal_details(), now)

    def swipe(self, trace: int | None = None, at: datetime | None = None) -> operations.Swipe:
        when = moment(at or self.now)
        return operations.Swipe(TERMINAL_ID, 1, trace or next(self._traces), when, MERCHANT_ID)

    def add_card(
        self, serial: int = 1, lots: Sequence[tuple[date, int]] = (), *, enrolled: bool = True
    ) -> str:
        number = card_number(serial)
        details = operations.CardDetails(number, "3012", "gold", CardStatus.ACTIVE, enrolled)
        with unit_of_work(self.engine) as session:
            operations.upsert_card(session, details, self.now)
        for earned_on, points in lots:
            self.accrue(number, earned_on, points)
        return number

    def accrue(
        self, number: str, earned_on: date, points: int, ref: str | None = None
    ) -> operations.Accrued | operations.AccrualSkipped:
        source_ref = ref or f"test:{next(self._refs)}"
        with unit_of_work(self.engine) as session:
            return operations.accrue(
                session,
                number,
                earned_on,
                points,
                source_ref,
                when=moment(self.now),
                expiry_years=EXPIRY_YEARS,
            )

    def redeem(
        self, number: str, points: int, *, amount_fen: int | None = None
    ) -> operations.Redeemed | operations.Declined:
        """A redemption without discount: A = D = 2P fen unless an odd A is asked for."""
        amount = amount_fen if amount_fen is not None else 2 * points
        return self.redeem_conversion(number, convert(amount, 0))

    def redeem_conversion(
        self, number: str, conversion: Conversion
    ) -> operations.Redeemed | operations.Declined:
        with unit_of_work(self.engine) as session:
            return operations.redeem(
                session,
                self.swipe(),
                number,
                conversion,
                requested_amount_fen=conversion.amount_fen,
                rule_id=None,
                fee_bp=80,
                auth_code="000001",
            )

    def void(self, original_id: int) -> operations.Restored | operations.Declined:
        with unit_of_work(self.engine) as session:
            return operations.void(session, self.swipe(), original_id, auth_code="000002")

    def refund(self, original_id: int, fen: int) -> operations.Refunded | operations.Declined:
        with unit_of_work(self.engine) as session:
            return operations.refund(session, self.swipe(), original_id, fen, auth_code="000003")

    def reverse(self, original_id: int) -> operations.Reversed:
        with unit_of_work(self.engine) as session:
            original = session.get(Authorisation, original_id)
            assert original is not None
            swipe = operations.Swipe(
                original.terminal_id,
                original.batch_number,
                original.trace,
                moment(self.now),
                original.merchant_id,
            )
            return operations.reverse(session, swipe, original_id)

    def expire(self, as_of: date) -> operations.ExpiryRun:
        with unit_of_work(self.engine) as session:
            return operations.expire(session, as_of, when=moment(self.now))

    def balances(self, number: str) -> operations.Balances:
        with unit_of_work(self.engine) as session:
            return operations.balances(session, number, self.now)

    def lots(self, number: str) -> list[tuple[date, int, int]]:
        """(expires_on, original, remaining) of every lot, in spending order."""
        with unit_of_work(self.engine) as session:
            return [
                (lot.expires_on, lot.original_points, lot.remaining_points)
                for lot in operations.card_lots(session, number)
            ]

    def violations(self) -> list[Violation]:
        with unit_of_work(self.engine) as session:
            return check_invariants(session)


def merchant_details(active: bool = True) -> records.MerchantDetails:
    return records.MerchantDetails(
        id=MERCHANT_ID,
        name="Test merchant",
        active=active,
        fee_bp=80,
        bank_card_fee_bp=100,
        allow_partial=True,
        refund_window_days=30,
        max_amount_fen=5_000_000,
        rules=[{"id": "all", "discount_bp": 0}],
    )


def terminal_details(enabled: bool = True) -> records.TerminalDetails:
    return records.TerminalDetails(
        id=TERMINAL_ID,
        merchant_id=MERCHANT_ID,
        enabled=enabled,
        suite=KeySuite.TDES,
        tmk_encrypted=b"\x01" * 32,
    )


@pytest.fixture
def world(ledger_engine: Engine) -> LedgerWorld:
    """A merchant and terminal in this test's fresh ledger, with the clock at START."""
    return LedgerWorld(ledger_engine)


# --- card data where a person reads it (issue 7) ----------------------------------------------

# The shipped configs' prefixes, cards and TMKs; a test's own configs and master key files under
# its tmp_path are added by the watch, and keys it learns (working keys, PIN blocks) by the test.
SHIPPED_SECRETS: Known = known_from_config(CONFIGS / "demo.toml") | known_from_config(
    CONFIGS / "rehearsal.toml"
)


@pytest.fixture(autouse=True)
def leak_watch(request: pytest.FixtureRequest) -> Iterator[LeakWatch]:
    """Every test ends with a scan for card data in the logs, statements and pack under its
    tmp_path, in what it read through `capsys` and in what a process fixture registered; a leak
    fails the test that produced it (tests/logscan.py says what counts)."""
    watch = LeakWatch(SHIPPED_SECRETS)
    if "tmp_path" in request.fixturenames:
        watch.folder(request.getfixturevalue("tmp_path"))
    yield watch
    leaks = watch.leaks()
    if leaks:
        pytest.fail(describe(leaks), pytrace=False)


@pytest.fixture
def capsys(capsys: pytest.CaptureFixture[str], leak_watch: LeakWatch) -> pytest.CaptureFixture[str]:
    """pytest's capsys, with all a test reads of the CLI's output and errors kept for the scan."""
    read = capsys.readouterr

    def readouterr() -> pytest.CaptureResult[str]:
        captured = read()
        leak_watch.text("stdout", captured.out)
        leak_watch.text("stderr", captured.err)
        return captured

    capsys.readouterr = readouterr  # type: ignore[method-assign]
    return capsys


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Output a test left unread (stdout, stderr, log records) is scanned too, phase by phase."""
    report = yield
    if report.passed:
        leaks = scan_sections(report.sections, report.when, SHIPPED_SECRETS)
        if leaks:
            report.outcome = "failed"
            report.longrepr = describe(leaks)
    return report

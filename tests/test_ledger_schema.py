"""The schema, engines and units of work: the same behaviour on SQLite and PostgreSQL."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, event, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from gateway.ledger import next_rrn
from gateway.ledger.db import make_engine, migrate, unit_of_work
from gateway.ledger.hotpath import _GroupSql, _Sql
from gateway.ledger.models import Account, AccountKind, Base, Card, CardStatus, RrnAllocation
from tests.conftest import LedgerWorld


def test_migrations_create_exactly_the_models(ledger_engine: Engine) -> None:
    """The migrated schema and the models agree, so autogenerate finds nothing to do."""
    with ledger_engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_migrate_again_changes_nothing(ledger_engine: Engine) -> None:
    """Migrating a migrated database is a no-op (the gateway migrates at every start)."""
    migrate(ledger_engine)
    with unit_of_work(ledger_engine) as session:
        kinds = session.scalars(select(Account.kind).order_by(Account.id)).all()
    assert kinds == [
        AccountKind.ACCRUAL,
        AccountKind.REDEMPTION,
        AccountKind.EXPIRY,
        AccountKind.ADJUSTMENT,
    ]


def test_a_second_system_account_of_a_kind_is_refused(ledger_engine: Engine) -> None:
    """System accounts are unique per kind in the database."""
    with pytest.raises(IntegrityError), unit_of_work(ledger_engine) as session:
        session.add(Account(kind=AccountKind.EXPIRY, card_number=None))


def test_instants_come_back_aware_and_equal(ledger_engine: Engine) -> None:
    """An instant stored with any offset reads back as the same instant, timezone-aware."""
    at = datetime(2026, 3, 10, 23, 30, 15, 123456, tzinfo=timezone(timedelta(hours=8)))
    with unit_of_work(ledger_engine) as session:
        session.add(
            Card(
                number="6688000000000000014",
                expiry_yymm="3012",
                tier="gold",
                status=CardStatus.ACTIVE,
                enrolled=True,
                enrolled_at=at,
                wrong_pin_count=0,
                pin_locked=False,
            )
        )
    with unit_of_work(ledger_engine) as session:
        card = session.get(Card, "6688000000000000014")
        assert card is not None and card.enrolled_at is not None
        assert card.enrolled_at == at
        assert card.enrolled_at.utcoffset() == timedelta(0)


def test_a_naive_instant_is_refused(ledger_engine: Engine) -> None:
    """A wall-clock time without a zone never reaches the database."""
    with pytest.raises(Exception, match="naive datetime"), unit_of_work(ledger_engine) as s:
        s.add(RrnAllocation(allocated_at=datetime(2026, 3, 10, 12, 0)))
        s.flush()


def test_rrns_are_twelve_digits_and_never_repeat(ledger_engine: Engine) -> None:
    """RRNs come from a sequence that both backends keep unique for all time."""
    at = datetime.now(UTC)
    with unit_of_work(ledger_engine) as session:
        first = [next_rrn(session, at) for _ in range(5)]
    with unit_of_work(ledger_engine) as session:
        second = next_rrn(session, at)
        session.execute(RrnAllocation.__table__.delete())
    with unit_of_work(ledger_engine) as session:
        third = next_rrn(session, at)
    rrns = [*first, second, third]
    assert all(len(rrn) == 12 and rrn.isdigit() for rrn in rrns)
    assert len(set(rrns)) == len(rrns)
    assert rrns == sorted(rrns)


def test_unit_of_work_rolls_back_on_error(world: LedgerWorld) -> None:
    """An exception inside a unit of work leaves nothing of it behind."""
    card = world.add_card(lots=[(date(2026, 1, 5), 100)])
    with pytest.raises(RuntimeError, match="boom"), unit_of_work(world.engine) as session:
        world_redeem = session.scalar(select(func.count()).select_from(Card))
        assert world_redeem == 1
        session.execute(text("DELETE FROM lot_movements"))
        raise RuntimeError("boom")
    assert world.violations() == []
    assert world.balances(card).ledger_points == 100


def test_sqlite_is_durable_and_checks_foreign_keys(tmp_path: Path) -> None:
    """SQLite runs in WAL mode with full synchronous commits, foreign keys and a busy timeout."""
    engine = make_engine(f"sqlite:///{tmp_path}/ledger.db")
    try:
        with engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    finally:
        engine.dispose()
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 2,
        "foreign_keys": 1,
        "busy_timeout": 30000,
    }


def test_sqlite_transactions_take_the_write_lock_at_begin(tmp_path: Path) -> None:
    """A unit of work holds SQLite's write lock from its start, even before it writes."""
    path = tmp_path / "ledger.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        with unit_of_work(engine) as session:
            session.execute(select(Card.number)).all()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


def test_a_write_lock_not_had_in_time_is_sqlalchemys_error_and_frees_the_queue(
    tmp_path: Path,
) -> None:
    """BEGIN IMMEDIATE runs on the driver's connection; when another program holds SQLite's
    write lock past the busy timeout, the caller still gets SQLAlchemy's `OperationalError`
    (what the gateway retries or answers `96` on), and the writer queue's lock is let go."""
    path = tmp_path / "ledger.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()
    event.listen(engine, "connect", lambda dbapi, _record: dbapi.execute("PRAGMA busy_timeout=50"))
    other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError, match="locked"), unit_of_work(engine) as session:
            session.connection()  # the unit of work's BEGIN IMMEDIATE
        queue = os.open(path.with_name(path.name + ".writer-lock"), os.O_RDWR)
        try:
            fcntl.flock(queue, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: no BlockingIOError
            fcntl.flock(queue, fcntl.LOCK_UN)
        finally:
            os.close(queue)
        other.execute("ROLLBACK")
        with unit_of_work(engine) as session:
            assert session.scalar(select(func.count()).select_from(Card)) == 0
    finally:
        other.close()
        engine.dispose()


def test_only_undoing_rows_are_indexed_by_their_original(tmp_path: Path) -> None:
    """The original-id index is partial (redemptions, inquiries and declines have none, and
    are most rows), and the look-up by original still reads it."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    try:
        with engine.connect() as connection:
            definition = connection.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'ix_authorisations_original_id'"
            ).scalar_one()
            plan = connection.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT id FROM authorisations WHERE original_id = 5"
            ).all()
        assert definition.endswith("WHERE original_id IS NOT NULL")
        assert "USING COVERING INDEX ix_authorisations_original_id" in plan[0][3]
    finally:
        engine.dispose()


def test_the_daily_limit_reads_one_card_and_one_date_from_the_index(tmp_path: Path) -> None:
    """Both of the daily limit's sums (one request, a group of them) find the card's rows of
    that business date by the (card_number, business_date) index, not by card alone: a card's
    older history is not read."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    single = _Sql(postgres=False).redeemed_on
    group = _GroupSql(postgres=False).redeemed_on
    try:
        with engine.connect() as connection:
            plans = [
                " ".join(
                    row[3]
                    for row in connection.exec_driver_sql(
                        f"EXPLAIN QUERY PLAN {statement}", parameters
                    ).all()
                )
                for statement, parameters in (
                    (single, ("6688000000000000011", "2026-11-18")),
                    (group, ('["6688000000000000011"]', "2026-11-18")),
                )
            ]
    finally:
        engine.dispose()
    for plan in plans:
        assert "INDEX ix_authorisations_card_day (card_number=? AND business_date=?)" in plan


def test_indexes_no_query_reads_are_gone(ledger_engine: Engine) -> None:
    """Revision 0007 dropped the indexes that only cost every redemption's commit a page."""
    with ledger_engine.connect() as connection:
        indexes = {
            index["name"]
            for table in (
                "authorisations",
                "journal_transactions",
                "journal_entries",
                "lot_movements",
            )
            for index in inspect(connection).get_indexes(table)
        }
    assert indexes.isdisjoint(
        {
            "ix_journal_transactions_card_number",
            "ix_journal_entries_account_id",
            "ix_lot_movements_lot_id",
            "ix_lot_movements_transaction_id",
            "ix_authorisations_merchant_id",
            "ix_authorisations_card_number",
        }
    )
    assert "ix_authorisations_card_day" in indexes


def test_unsupported_backend_is_refused() -> None:
    """Only SQLite and PostgreSQL are ledger backends."""
    with pytest.raises(ValueError, match="unsupported database backend"):
        make_engine("mysql://localhost/ledger")

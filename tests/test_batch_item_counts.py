"""The 999-per-batch counts (pos-8583.md §4.7) the database keeps beside `authorisations`.

Triggers keep `batch_item_counts` equal to the batch's counted rows (answered 00 or 10, not
reversed) whatever writes them; migration 0006 fills it from the rows already there. Every test
runs on SQLite and PostgreSQL, whose triggers are written differently.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, delete, insert, select, text, update

from gateway.ledger import records
from gateway.ledger.db import MIGRATIONS, make_engine, migrate, unit_of_work
from gateway.ledger.invariants import check_invariants
from gateway.ledger.models import (
    Authorisation,
    AuthorisationKind,
    AuthorisationState,
    BatchItemCount,
)
from tests import pg
from tests.conftest import (
    BACKENDS,
    MERCHANT_ID,
    START,
    TERMINAL_ID,
    LedgerWorld,
    merchant_details,
    terminal_details,
)

BEFORE = "0005_original_id_partial_index"
REDEMPTION = AuthorisationKind.REDEMPTION
REFUND = AuthorisationKind.REFUND
Counts = dict[tuple[str, int, str], int]


def authorisation(
    trace: int,
    *,
    batch: int = 1,
    kind: AuthorisationKind = REDEMPTION,
    code: str = "00",
    state: AuthorisationState = AuthorisationState.APPROVED,
    at: datetime = START,
) -> dict[str, Any]:
    return {
        "rrn": f"{trace:012d}",
        "kind": kind,
        "terminal_id": TERMINAL_ID,
        "merchant_id": MERCHANT_ID,
        "batch_number": batch,
        "trace": trace,
        "amount_fen": 100,
        "response_code": code,
        "local_time": at,
        "business_date": at.date(),
        "state": state,
    }


def kept(engine: Engine) -> Counts:
    """The counts as stored, without the rows that went down to zero."""
    with unit_of_work(engine) as session:
        rows = session.scalars(select(BatchItemCount)).all()
        return {(r.terminal_id, r.batch_number, r.kind.value): r.items for r in rows if r.items}


def write(engine: Engine, statement: Any, rows: list[dict[str, Any]] | None = None) -> None:
    with unit_of_work(engine) as session:
        session.execute(statement, rows) if rows else session.execute(statement)


def by_trace(trace: int) -> Any:
    return update(Authorisation).where(Authorisation.trace == trace)


def test_the_counts_follow_inserts_updates_and_deletes(world: LedgerWorld) -> None:
    """Each write that moves a row into, out of or across batches moves its count, and a
    write that leaves the row where it was counted changes nothing."""
    engine = world.engine
    approved, voided, reversed_ = (
        AuthorisationState.APPROVED,
        AuthorisationState.VOIDED,
        AuthorisationState.REVERSED,
    )
    rows = [authorisation(trace) for trace in (1, 2, 3)]
    rows += [authorisation(4, code="51", state=AuthorisationState.DECLINED)]
    rows += [authorisation(5, state=reversed_), authorisation(6, code="10")]
    write(engine, insert(Authorisation), rows)
    assert kept(engine) == {(TERMINAL_ID, 1, "redemption"): 4}

    steps: list[tuple[Any, Counts]] = [
        # A voided item still counts; a reversed one does not.
        (by_trace(1).values(state=voided), {(TERMINAL_ID, 1, "redemption"): 4}),
        (by_trace(2).values(state=reversed_), {(TERMINAL_ID, 1, "redemption"): 3}),
        (by_trace(5).values(state=approved), {(TERMINAL_ID, 1, "redemption"): 4}),
        (by_trace(3).values(batch_number=2), {(TERMINAL_ID, 1, "redemption"): 3,
                                              (TERMINAL_ID, 2, "redemption"): 1}),
        (by_trace(3).values(kind=REFUND), {(TERMINAL_ID, 1, "redemption"): 3,
                                           (TERMINAL_ID, 2, "refund"): 1}),
        (by_trace(6).values(response_code="96"), {(TERMINAL_ID, 1, "redemption"): 2,
                                                  (TERMINAL_ID, 2, "refund"): 1}),
        (by_trace(1).values(refunded_fen=50), {(TERMINAL_ID, 1, "redemption"): 2,
                                               (TERMINAL_ID, 2, "refund"): 1}),
        # One statement over many rows, counted and not: batch 1's rows go to batch 3.
        (update(Authorisation).where(Authorisation.batch_number == 1).values(batch_number=3),
         {(TERMINAL_ID, 3, "redemption"): 2, (TERMINAL_ID, 2, "refund"): 1}),
        (update(Authorisation).values(state=reversed_), {}),
        (update(Authorisation).values(state=approved), {(TERMINAL_ID, 3, "redemption"): 3,
                                                        (TERMINAL_ID, 2, "refund"): 1}),
        (delete(Authorisation).where(Authorisation.trace == 3),
         {(TERMINAL_ID, 3, "redemption"): 3}),
        (delete(Authorisation).where(Authorisation.trace == 4),
         {(TERMINAL_ID, 3, "redemption"): 3}),
        (delete(Authorisation), {}),
    ]  # fmt: skip
    for statement, expected in steps:
        write(engine, statement)
        assert kept(engine) == expected, str(statement)
    assert world.violations() == []


def test_the_ledgers_own_paths_keep_the_counts(world: LedgerWorld) -> None:
    """Redemptions, a void, a refund and a reversal through the operations: the counts are the
    rows the limit counts."""
    card = world.add_card(lots=[(START.date(), 10_000)])
    first, second, third = (world.redeem(card, points) for points in (100, 200, 300))
    world.void(first.authorisation_id)  # type: ignore[union-attr]
    world.refund(second.authorisation_id, 50)  # type: ignore[union-attr]
    world.reverse(third.authorisation_id)  # type: ignore[union-attr]
    with unit_of_work(world.engine) as session:
        counted = session.execute(
            select(Authorisation.kind, Authorisation.state, Authorisation.response_code)
        ).all()
    assert len(counted) >= 5
    counts = kept(world.engine)
    assert sum(counts.values()) == sum(
        1 for _, state, code in counted if code in ("00", "10") and state.value != "reversed"
    )
    assert counts[(TERMINAL_ID, 1, "redemption")] == 2  # the reversed one left
    assert world.violations() == []


def test_a_count_that_disagrees_with_the_rows_is_found(world: LedgerWorld) -> None:
    """The invariant check recounts the rows and names the terminal, batch and kind."""
    write(world.engine, insert(Authorisation), [authorisation(1), authorisation(2)])
    write(world.engine, update(BatchItemCount).values(items=BatchItemCount.items + 1))
    stray = {"terminal_id": TERMINAL_ID, "batch_number": 7, "kind": REFUND, "items": 2}
    write(world.engine, insert(BatchItemCount), [stray])  # a count with no rows behind it
    with unit_of_work(world.engine) as session:
        found = [v for v in check_invariants(session) if v.rule == "batch.item_count"]
    assert [(v.subject, v.detail) for v in found] == [
        (f"terminal {TERMINAL_ID} batch 000001 redemption", "counted 3, authorisations 2"),
        (f"terminal {TERMINAL_ID} batch 000007 refund", "counted 2, authorisations 0"),
    ]


@pytest.fixture(params=BACKENDS)
def unmigrated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database of the backend, not migrated: this test chooses the revision."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        server: pg.PgServer = request.getfixturevalue("postgres_server")
        url = server.create_database(f"vipgate_batch_counts_{len(tmp_path.name)}_{id(tmp_path)}")
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def test_the_migration_counts_the_rows_already_there_and_goes_back(unmigrated: Engine) -> None:
    """Upgraded from 0005 with items in two batches, the counts are the rows; the partial
    index goes. Downgraded, the index is back and the table and triggers are gone."""
    engine = unmigrated
    migrate(engine, BEFORE)
    with unit_of_work(engine) as session:
        records.upsert_merchant(session, merchant_details(), START)
        records.upsert_terminal(session, terminal_details(), START)
    rows = [authorisation(trace) for trace in range(1, 8)]
    rows += [authorisation(8, state=AuthorisationState.REVERSED)]
    rows += [authorisation(trace, batch=2, kind=REFUND) for trace in (9, 10)]
    write(engine, insert(Authorisation), rows)

    migrate(engine)
    assert kept(engine) == {(TERMINAL_ID, 1, "redemption"): 7, (TERMINAL_ID, 2, "refund"): 2}
    assert "ix_authorisations_batch_count" not in indexes(engine)
    write(engine, insert(Authorisation), [authorisation(11)])
    assert kept(engine)[(TERMINAL_ID, 1, "redemption")] == 8

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, BEFORE)
    assert "ix_authorisations_batch_count" in indexes(engine)
    write(engine, insert(Authorisation), [authorisation(12)])  # no trigger left to fire
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM authorisations")).scalar() == 12
        tables = connection.exec_driver_sql(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'batch_item_counts'"
            if engine.dialect.name == "postgresql"
            else "SELECT count(*) FROM sqlite_master WHERE name = 'batch_item_counts'"
        ).scalar()
    assert tables == 0


def indexes(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return {
            str(name)
            for (name,) in connection.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'authorisations'"
                if engine.dialect.name == "postgresql"
                else "SELECT name FROM sqlite_master WHERE tbl_name = 'authorisations'"
                " AND type = 'index'"
            )
        }

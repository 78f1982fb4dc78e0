"""PostgreSQL: a unit of work's held-back writes and its COMMIT go in one round trip
(`HotLedger._before_commit`), and a link that breaks during it is an unknown outcome."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway.ledger import make_engine, unit_of_work
from gateway.ledger.db import CommitOutcomeUnknownError, holding_connection
from gateway.ledger.hotpath import hot_ledger
from gateway.ledger.models import LoggedRequest, RequestClass
from gateway.ledger.records import RequestIdentity
from tests.conftest import START, TERMINAL_ID, LedgerWorld, empty_postgres_ledger


@pytest.fixture
def engine(postgres_ledger: str) -> Iterator[Engine]:
    engine = make_engine(empty_postgres_ledger(postgres_ledger))
    LedgerWorld(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def log_one(session: Session, trace: int, at: datetime = START) -> None:
    """A request log entry, held back until the commit (`HotLedger.log_requests`)."""
    identity = RequestIdentity(TERMINAL_ID, 1, trace, RequestClass.REQUEST)
    hot_ledger(session).log_requests([(identity, b"\x01" * 32, {"39": "00"}, at)])


def orm_row(trace: int, digest_byte: bytes) -> LoggedRequest:
    """A request log entry written through the ORM (flushed at the commit)."""
    return LoggedRequest(
        terminal_id=TERMINAL_ID,
        batch_number=1,
        trace=trace,
        request_class=RequestClass.REQUEST,
        digest=digest_byte * 32,
        answer={"39": "00"},
        recorded_at=START,
    )


def logged(engine: Engine) -> int:
    with unit_of_work(engine) as session:
        return int(session.scalar(select(func.count()).select_from(LoggedRequest)) or 0)


def driver_of(session: Session) -> psycopg.Connection[object]:
    driver = session.connection().connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver


def test_the_held_back_writes_carry_the_commit(engine: Engine) -> None:
    """When the hook that sends the held-back writes has run, the server has committed: the
    connection's own COMMIT has nothing left to send."""
    seen: list[TransactionStatus] = []
    with unit_of_work(engine) as session:
        log_one(session, 1)
        driver = driver_of(session)
        event.listen(
            session, "before_commit", lambda _: seen.append(driver.info.transaction_status)
        )
    assert seen == [TransactionStatus.IDLE]
    assert logged(engine) == 1


def test_orm_changes_left_to_flush_commit_with_the_held_back_writes(engine: Engine) -> None:
    """On the ledger thread's held connection the ORM flushes after the hook: with changes
    left to flush, the COMMIT stays the connection's, so the ORM's row and the held-back
    write commit together, or neither does."""
    seen: list[TransactionStatus] = []
    with holding_connection(engine), unit_of_work(engine) as session:
        log_one(session, 1)
        driver = driver_of(session)
        session.add(orm_row(2, b"\x02"))
        event.listen(
            session, "before_commit", lambda _: seen.append(driver.info.transaction_status)
        )
    assert seen == [TransactionStatus.INTRANS]
    assert logged(engine) == 2
    with (
        pytest.raises(IntegrityError, match="request_log"),
        holding_connection(engine),
        unit_of_work(engine) as session,
    ):
        log_one(session, 3)
        session.add(orm_row(2, b"\x03"))  # the same identity as trace 2: the flush fails
    assert logged(engine) == 2  # trace 3's held-back write rolled back with it


def test_a_link_broken_under_the_commit_is_an_unknown_outcome(engine: Engine) -> None:
    """The backend ends while the held-back writes and the COMMIT are on their way: the
    commit may or may not have happened, and whoever would answer "nothing changed" must
    not (`CommitOutcomeUnknownError`). Here nothing was committed, and the engine goes on."""
    with pytest.raises(CommitOutcomeUnknownError), unit_of_work(engine) as session:
        log_one(session, 1)
        pid = driver_of(session).info.backend_pid
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    assert logged(engine) == 0
    with unit_of_work(engine) as session:
        log_one(session, 1)
    assert logged(engine) == 1


def test_a_savepoint_released_does_not_commit_the_transaction(engine: Engine) -> None:
    """SQLAlchemy runs the hook at a savepoint's release too: the held-back writes go out
    there, but the COMMIT waits for the transaction's own end, so a failure after the
    savepoint still rolls everything back."""
    seen: list[TransactionStatus] = []
    with pytest.raises(RuntimeError), unit_of_work(engine) as session:
        log_one(session, 1)
        driver = driver_of(session)
        with session.begin_nested():
            log_one(session, 2)
        seen.append(driver.info.transaction_status)
        raise RuntimeError("after the savepoint")
    assert seen == [TransactionStatus.INTRANS]
    assert logged(engine) == 0

"""The driver-level hot path writes exactly what the ORM operations write, on both backends."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.ledger import operations, records
from gateway.ledger.db import holding_connection, unit_of_work
from gateway.ledger.hotpath import hot_ledger
from gateway.ledger.models import (
    Account,
    Authorisation,
    AuthorisationKind,
    JournalEntry,
    JournalTransaction,
    LotMovement,
    PointLot,
    RequestClass,
)
from gateway.ledger.operations import Declined, Redeemed
from gateway.ledger.records import RequestIdentity
from gateway.points import convert
from tests.conftest import LedgerWorld

EARLY = date(2025, 2, 1)  # expires 2026-11-30
LATE = date(2026, 1, 5)  # expires 2027-11-30
GONE = date(2024, 6, 1)  # expired 2025-11-30
LOTS = [(GONE, 500), (LATE, 100), (EARLY, 50)]


def hot_redeem(world: LedgerWorld, number: str, points: int) -> Redeemed | Declined:
    with unit_of_work(world.engine) as session:
        return hot_redeem_in(session, world, number, points)


def hot_redeem_in(
    session: Session, world: LedgerWorld, number: str, points: int
) -> Redeemed | Declined:
    conversion = convert(2 * points, 0)
    swipe = world.swipe()
    hot = hot_ledger(session)
    hot.prefetch_redemption(swipe, number, daily_limit=True)
    assert not hot.tombstone_exists(swipe.terminal_id, swipe.batch_number, swipe.trace)
    card = hot.lock_card(number)
    assert card is not None
    assert hot.points_redeemed_on(number, swipe.when.business_date) >= 0
    lots = hot.spendable_lots(number, swipe.when.local)
    return hot.redeem(
        swipe,
        (number, card[1]),
        lots,
        conversion,
        requested_amount_fen=conversion.amount_fen,
        rule_id=None,
        fee_bp=80,
        auth_code="000001",
        response_code="00",
    )


def written_for(world: LedgerWorld, number: str) -> dict[str, Any]:
    """Everything the ledger holds for a card, without ids, RRNs and traces."""
    with unit_of_work(world.engine) as session:
        authorisations = session.scalars(
            select(Authorisation).where(Authorisation.card_number == number)
        ).all()
        transactions = session.scalars(
            select(JournalTransaction).where(JournalTransaction.card_number == number)
        ).all()
        entries = session.execute(
            select(JournalEntry.points, Account.kind, Account.card_number.is_(None))
            .join(Account, Account.id == JournalEntry.account_id)
            .join(JournalTransaction, JournalTransaction.id == JournalEntry.transaction_id)
            .where(JournalTransaction.card_number == number)
            .order_by(JournalEntry.id)
        ).all()
        lots = session.execute(
            select(PointLot.expires_on, PointLot.remaining_points)
            .where(PointLot.card_number == number)
            .order_by(PointLot.id)
        ).all()
        movements = session.execute(
            select(LotMovement.points, PointLot.expires_on, LotMovement.redemption_id.is_(None))
            .join(PointLot, PointLot.id == LotMovement.lot_id)
            .where(PointLot.card_number == number)
            .order_by(LotMovement.id)
        ).all()
        return {
            "authorisations": [
                (
                    a.kind,
                    a.state,
                    a.auth_code,
                    a.requested_amount_fen,
                    a.amount_fen,
                    a.discount_bp,
                    a.settled_fen,
                    a.points,
                    a.fee_bp,
                    a.response_code,
                    a.local_time,
                    a.business_date,
                    a.journal_transaction_id is not None,
                    a.merchant_id,
                    a.terminal_id,
                    a.batch_number,
                )
                for a in authorisations
            ],
            "transactions": [(t.kind, t.created_at, t.business_date) for t in transactions],
            "entries": [tuple(row) for row in entries],
            "lots": [tuple(row) for row in lots],
            "movements": [tuple(row) for row in movements],
        }


def test_hot_redemption_writes_what_the_orm_redemption_writes(world: LedgerWorld) -> None:
    """Same card state, same redemption: identical authorisation, journal, lots and movements."""
    by_orm = world.add_card(1, LOTS)
    by_hot = world.add_card(2, LOTS)
    orm_outcome = world.redeem(by_orm, 120)
    hot_outcome = hot_redeem(world, by_hot, 120)
    assert isinstance(orm_outcome, Redeemed) and isinstance(hot_outcome, Redeemed)
    assert [(c.points, c.expires_on) for c in hot_outcome.lots] == [
        (c.points, c.expires_on) for c in orm_outcome.lots
    ]
    assert hot_outcome.spendable_points_after == orm_outcome.spendable_points_after == 30
    orm_rows, hot_rows = written_for(world, by_orm), written_for(world, by_hot)
    assert hot_rows == orm_rows
    assert hot_rows["lots"][-2:] == [(date(2027, 11, 30), 30), (date(2026, 11, 30), 0)]
    assert world.violations() == []


def test_on_a_held_connection_the_hot_path_writes_without_the_orms_transaction(
    world: LedgerWorld, ledger_backend: str
) -> None:
    """The ledger thread holds its connection (`db.holding_connection`). There the hot path
    works on the unit of work's connection without beginning the ORM session's transaction
    (on PostgreSQL it does, for the before_commit hook that sends its held-back writes), and
    the unit of work still commits what it wrote, or rolls it back."""
    by_orm = world.add_card(1, LOTS)
    by_hot = world.add_card(2, LOTS)
    lost = world.add_card(3, LOTS)
    before = written_for(world, lost)
    assert isinstance(world.redeem(by_orm, 120), Redeemed)
    swipe = world.swipe()
    identity = RequestIdentity(
        swipe.terminal_id, swipe.batch_number, swipe.trace, RequestClass.REQUEST
    )
    with holding_connection(world.engine):
        with unit_of_work(world.engine) as session:
            outcome = hot_redeem_in(session, world, by_hot, 120)
            # The last write, as a group's: on PostgreSQL held back until the commit.
            hot_ledger(session).log_request(identity, b"\x02" * 32, {"39": "00"}, swipe.when.at)
            assert session.in_transaction() is (ledger_backend == "postgresql")
        with pytest.raises(RuntimeError), unit_of_work(world.engine) as session:
            assert isinstance(hot_redeem_in(session, world, lost, 120), Redeemed)
            raise RuntimeError("the group failed after the redemption was written")
    assert isinstance(outcome, Redeemed)
    assert written_for(world, by_hot) == written_for(world, by_orm)
    assert written_for(world, lost) == before
    with unit_of_work(world.engine) as session:
        logged = records.find_request(session, identity)
        assert logged is not None and logged.answer == {"39": "00"}
    assert world.violations() == []


def test_orm_work_after_the_hot_path_commits_with_it(world: LedgerWorld) -> None:
    """A group whose hot redemption is followed by ORM work (a void, say) on a held
    connection: one transaction, both committed."""
    number = world.add_card(1, LOTS)
    with holding_connection(world.engine), unit_of_work(world.engine) as session:
        outcome = hot_redeem_in(session, world, number, 120)
        assert isinstance(outcome, Redeemed)
        original = session.get(Authorisation, outcome.authorisation_id)
        assert original is not None
        original.exception = "checked"  # a change only the ORM's flush writes
    with unit_of_work(world.engine) as session:
        again = session.get(Authorisation, outcome.authorisation_id)
        assert again is not None and again.exception == "checked"
    assert world.balances(number).spendable_points == 30


def test_hot_redemption_is_undone_by_the_orm_void(world: LedgerWorld) -> None:
    """A redemption written on the hot path is a normal original for a void: points go back."""
    number = world.add_card(1, LOTS)
    outcome = hot_redeem(world, number, 120)
    assert isinstance(outcome, Redeemed)
    restored = world.void(outcome.authorisation_id)
    assert isinstance(restored, operations.Restored)
    assert restored.points == 120
    assert world.balances(number).spendable_points == 150
    assert world.violations() == []


def test_hot_redemption_over_the_spendable_points_changes_nothing(world: LedgerWorld) -> None:
    """Expired points do not count; a redemption over the rest is declined with no trace."""
    number = world.add_card(1, LOTS)
    before = written_for(world, number)
    assert hot_redeem(world, number, 151) == Declined(operations.Decline.NOT_ENOUGH_POINTS)
    assert written_for(world, number) == before


def test_request_log_and_records_read_back_through_the_models(world: LedgerWorld) -> None:
    """Rows the hot path writes (instants, dates, JSON, bytes) read back unchanged via the ORM."""
    number = world.add_card(1, LOTS)
    swipe = world.swipe()
    identity = RequestIdentity(
        swipe.terminal_id, swipe.batch_number, swipe.trace, RequestClass.REQUEST
    )
    answer = {"39": "55", "37": "000000000009", "processing": "0"}
    with unit_of_work(world.engine) as session:
        hot = hot_ledger(session)
        assert hot.find_request(identity) is None
        recorded = hot.record_authorisation(
            swipe,
            AuthorisationKind.BALANCE,
            card_number=number,
            requested_amount_fen=None,
            response_code="55",
        )
        hot.log_request(identity, b"\x01" * 32, answer, swipe.when.at)
    with unit_of_work(world.engine) as session:
        logged = records.find_request(session, identity)
        assert logged is not None
        assert (logged.digest, logged.answer, logged.recorded_at) == (
            b"\x01" * 32,
            answer,
            swipe.when.at,
        )
        row = session.get(Authorisation, recorded.authorisation_id)
        assert row is not None
        assert (row.rrn, row.state.value, row.local_time, row.business_date) == (
            recorded.rrn,
            "declined",
            swipe.when.at,
            swipe.when.business_date,
        )
        again = hot_ledger(session).find_request(identity)
        assert again is not None and (again.digest, again.answer) == (b"\x01" * 32, answer)

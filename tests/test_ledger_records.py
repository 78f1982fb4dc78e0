"""Merchants, terminals, batches, the request log and reversal tombstones, on both backends."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gateway.ledger import records
from gateway.ledger.db import unit_of_work
from gateway.ledger.models import (
    AuthorisationKind,
    AuthorisationState,
    BatchResult,
    MerchantActiveChange,
    RequestClass,
    Terminal,
    TerminalEnabledChange,
)
from gateway.ledger.operations import Redeemed, Restored
from tests.conftest import (
    MERCHANT_ID,
    TERMINAL_ID,
    LedgerWorld,
    merchant_details,
    terminal_details,
)

EARNED = date(2026, 1, 5)


def test_every_change_of_active_and_enabled_is_kept(world: LedgerWorld) -> None:
    """Clearing charges terminal fees from the history, so every flip is recorded with its time."""
    later = world.now + timedelta(days=3)
    with unit_of_work(world.engine) as session:
        records.upsert_merchant(session, merchant_details(active=True), later)  # no change
        records.upsert_merchant(session, merchant_details(active=False), later)
        records.upsert_terminal(session, terminal_details(enabled=False), later)
        records.upsert_terminal(session, terminal_details(enabled=True), later + timedelta(1))
    with unit_of_work(world.engine) as session:
        merchant = session.execute(
            select(MerchantActiveChange.active, MerchantActiveChange.changed_at)
            .where(MerchantActiveChange.merchant_id == MERCHANT_ID)
            .order_by(MerchantActiveChange.id)
        ).all()
        terminal = session.scalars(
            select(TerminalEnabledChange.enabled)
            .where(TerminalEnabledChange.terminal_id == TERMINAL_ID)
            .order_by(TerminalEnabledChange.id)
        ).all()
    assert [(active, at) for active, at in merchant] == [(True, world.now), (False, later)]
    assert list(terminal) == [True, False, True]


def test_batch_totals_count_what_the_protocol_says(world: LedgerWorld) -> None:
    """Debits: redemptions answered 00/10, voided included, reversed not; credits: voids and
    refunds of the batch."""
    card = world.add_card(lots=[(EARNED, 10_000)])
    kept = world.redeem(card, 100)  # 200 fen
    voided = world.redeem(card, 50)  # 100 fen, then voided
    reversed_ = world.redeem(card, 25)  # 50 fen, then reversed
    assert isinstance(kept, Redeemed) and isinstance(voided, Redeemed)
    assert isinstance(reversed_, Redeemed)
    assert isinstance(world.void(voided.authorisation_id), Restored)
    world.reverse(reversed_.authorisation_id)
    world.refund(kept.authorisation_id, 30)
    with unit_of_work(world.engine) as session:
        records.record_authorisation(
            session,
            world.swipe(),
            AuthorisationKind.REDEMPTION,
            card_number=card,
            requested_amount_fen=999_999,
            response_code="51",
        )
        totals = records.gateway_totals(session, TERMINAL_ID, 1)
    assert totals == records.BatchTotals(300, 2, 130, 2)


def test_settlement_closes_the_batch_and_opens_the_next(world: LedgerWorld) -> None:
    """Balanced or not, the batch closes with both sides kept and the next number opens."""
    card = world.add_card(lots=[(EARNED, 1000)])
    world.redeem(card, 100)
    with unit_of_work(world.engine) as session:
        closed = records.close_batch(
            session, TERMINAL_ID, records.BatchTotals(200, 1, 0, 0), {"39": "00"}, world.now
        )
        assert (closed.result, closed.next_batch_number) == (BatchResult.BALANCED, 2)
        unbalanced = records.close_batch(
            session, TERMINAL_ID, records.BatchTotals(1, 1, 0, 0), {"39": "00"}, world.now
        )
        assert unbalanced.result is BatchResult.UNBALANCED
        assert records.open_batch(session, TERMINAL_ID).batch_number == 3
        first = records.latest_batch(session, TERMINAL_ID, 1)
        assert first is not None and first.answer == {"39": "00"}
        assert first.gateway_debit_fen == 200
        records.record_upload(session, first.id, [records.UploadLine(1, card, 200)], world.now)
        records.end_upload(session, first.id, 1, world.now)


def test_batch_numbers_wrap_after_999999(world: LedgerWorld) -> None:
    """After batch 999999 comes 000001."""
    with unit_of_work(world.engine) as session:
        batch = records.open_batch(session, TERMINAL_ID)
        batch.batch_number = 999_999
        terminal = session.get(Terminal, TERMINAL_ID)
        assert terminal is not None
        terminal.open_batch_number = 999_999
    with unit_of_work(world.engine) as session:
        closed = records.close_batch(
            session, TERMINAL_ID, records.BatchTotals(0, 0, 0, 0), {}, world.now
        )
    assert closed.next_batch_number == 1


def test_the_request_log_keeps_one_answer_per_identity(world: LedgerWorld) -> None:
    """A logged identity gives back its digest and answer; logging it again fails the commit."""
    identity = records.RequestIdentity(TERMINAL_ID, 1, 7, RequestClass.REQUEST)
    reversal = records.RequestIdentity(TERMINAL_ID, 1, 7, RequestClass.REVERSAL)
    with unit_of_work(world.engine) as session:
        records.log_request(session, identity, b"\x01" * 32, {"39": "00", "37": "1"}, world.now)
        records.log_request(session, reversal, b"\x02" * 32, {"39": "00"}, world.now)
    with unit_of_work(world.engine) as session:
        found = records.find_request(session, identity)
        assert found is not None
        assert (found.digest, found.answer) == (b"\x01" * 32, {"39": "00", "37": "1"})
    with pytest.raises(IntegrityError), unit_of_work(world.engine) as session:
        records.log_request(session, identity, b"\x03" * 32, {"39": "94"}, world.now)


def test_unknown_originals_of_reversals_are_remembered(world: LedgerWorld) -> None:
    """A reversal with no original leaves a tombstone found by terminal, batch and trace."""
    with unit_of_work(world.engine) as session:
        assert records.find_reversal_original(session, TERMINAL_ID, 1, 55) is None
        records.remember_reversal(session, world.swipe(55), 1234)
    with unit_of_work(world.engine) as session:
        tombstone = records.find_tombstone(session, TERMINAL_ID, 1, 55)
        assert tombstone is not None and tombstone.amount_fen == 1234
        assert records.find_tombstone(session, TERMINAL_ID, 1, 56) is None


def test_originals_are_found_by_rrn_and_by_trace(world: LedgerWorld) -> None:
    """Voids and refunds name their original by RRN; reversals by terminal, batch and trace."""
    card = world.add_card(lots=[(EARNED, 1000)])
    outcome = world.redeem(card, 10)
    assert isinstance(outcome, Redeemed)
    with unit_of_work(world.engine) as session:
        by_rrn = records.find_by_rrn(session, outcome.rrn)
        assert by_rrn is not None and by_rrn.id == outcome.authorisation_id
        by_trace = records.find_reversal_original(session, TERMINAL_ID, 1, by_rrn.trace)
        assert by_trace is not None and by_trace.id == outcome.authorisation_id
        declined = records.record_authorisation(
            session,
            world.swipe(),
            AuthorisationKind.BALANCE,
            card_number=card,
            requested_amount_fen=None,
            response_code="14",
        )
        row = records.find_by_rrn(session, declined.rrn)
        assert row is not None and row.state is AuthorisationState.DECLINED

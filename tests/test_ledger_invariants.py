"""The invariant check finds every kind of corruption, and nothing on a sound ledger."""

from __future__ import annotations

from datetime import date

import pytest
from sqlalchemy import select, update

from gateway.ledger.db import unit_of_work
from gateway.ledger.invariants import Violation, check_invariants
from gateway.ledger.models import (
    Account,
    AccountKind,
    Authorisation,
    JournalEntry,
    LotMovement,
    PointLot,
)
from gateway.ledger.operations import Redeemed
from tests.conftest import LedgerWorld

EARNED = date(2026, 1, 5)


def busy_card(world: LedgerWorld) -> tuple[str, int]:
    """A card with an accrual, a redemption and a partial refund; returns (card, redemption)."""
    card = world.add_card(lots=[(EARNED, 300), (date(2025, 2, 1), 50)])
    outcome = world.redeem(card, 120)
    assert isinstance(outcome, Redeemed)
    world.refund(outcome.authorisation_id, 60)
    return card, outcome.authorisation_id


def rules(violations: list[Violation]) -> set[str]:
    return {violation.rule for violation in violations}


def test_a_sound_ledger_has_no_violations(world: LedgerWorld) -> None:
    """Accruals, redemptions, refunds, voids and expiry leave every invariant holding."""
    busy_card(world)
    assert world.violations() == []


def test_a_lot_edited_in_place_is_found(world: LedgerWorld) -> None:
    """Points added to a lot without a journal entry break balance and movement checks."""
    card, _ = busy_card(world)
    with unit_of_work(world.engine) as session:
        session.execute(
            update(PointLot)
            .where(PointLot.card_number == card, PointLot.original_points == 300)
            .values(remaining_points=PointLot.remaining_points + 7)
        )
    found = world.violations()
    assert {"card.balance_vs_lots", "lot.movements"} <= rules(found)
    assert all(card not in violation.subject + violation.detail for violation in found)


def test_an_unbalanced_entry_is_found(world: LedgerWorld) -> None:
    """An entry changed alone unbalances its transaction and the whole journal."""
    card, _ = busy_card(world)
    with unit_of_work(world.engine) as session:
        account = session.scalars(select(Account.id).where(Account.card_number == card)).one()
        entry = session.scalars(
            select(JournalEntry).where(JournalEntry.account_id == account).limit(1)
        ).one()
        entry.points += 1
    assert {"journal.unbalanced", "journal.total", "card.balance_vs_lots"} <= rules(
        world.violations()
    )


def test_a_negative_card_balance_is_found(world: LedgerWorld) -> None:
    """A card account driven below zero by a balanced but impossible transfer is reported."""
    card, _ = busy_card(world)
    with unit_of_work(world.engine) as session:
        account = session.scalars(select(Account.id).where(Account.card_number == card)).one()
        adjustment = session.scalars(
            select(Account.id).where(Account.kind == AccountKind.ADJUSTMENT)
        ).one()
        credits = session.scalars(
            select(JournalEntry).where(JournalEntry.account_id == account, JournalEntry.points > 0)
        )
        for entry in credits:
            entry.account_id = adjustment
    assert {"card.negative", "card.balance_vs_lots"} <= rules(world.violations())


def test_a_movement_that_disagrees_with_the_redemption_is_found(world: LedgerWorld) -> None:
    """A redemption whose lot movements no longer match its points and refunds is reported."""
    _, redemption = busy_card(world)
    with unit_of_work(world.engine) as session:
        session.execute(
            update(LotMovement)
            .where(LotMovement.redemption_id == redemption, LotMovement.points < 0)
            .values(points=LotMovement.points - 1)
        )
    assert {"redemption.holding", "transaction.movements", "lot.movements"} <= rules(
        world.violations()
    )


def test_refund_totals_beyond_the_original_are_found(world: LedgerWorld) -> None:
    """Running totals over the original's figures are reported."""
    _, redemption = busy_card(world)
    with unit_of_work(world.engine) as session:
        session.execute(
            update(Authorisation)
            .where(Authorisation.id == redemption)
            .values(refunded_fen=Authorisation.amount_fen + 1)
        )
    assert "redemption.refunds" in rules(world.violations())


@pytest.mark.parametrize(
    ("edited", "rule"),
    [
        ("settled_fen", "redemption.figures"),  # D no longer what A and d give
        ("refund points", "redemption.refund_totals"),  # a refund's points not its total's
    ],
)
def test_a_redemptions_figures_changed_by_hand_are_found(
    world: LedgerWorld, edited: str, rule: str
) -> None:
    """A redemption's D edited (clearing would settle it), or one of its refunds' points
    edited (the running totals no longer add up): each is reported, naming the redemption."""
    _, redemption = busy_card(world)
    if edited == "settled_fen":
        change = update(Authorisation).where(Authorisation.id == redemption)
        change = change.values(settled_fen=Authorisation.settled_fen + 1)
    else:
        change = update(Authorisation).where(Authorisation.original_id == redemption)
        change = change.values(points=Authorisation.points + 1)
    with unit_of_work(world.engine) as session:
        session.execute(change)
    found = [v for v in world.violations() if v.rule == rule]
    assert [v.subject for v in found] == [f"authorisation {redemption}"]


def test_check_reports_every_violation_not_just_the_first(world: LedgerWorld) -> None:
    """Two corrupted lots on two cards give violations for both."""
    busy_card(world)
    other = world.add_card(2, lots=[(EARNED, 10)])
    with unit_of_work(world.engine) as session:
        session.execute(update(PointLot).values(remaining_points=0))
        found = check_invariants(session)
    subjects = {v.subject for v in found if v.rule == "card.balance_vs_lots"}
    assert len(subjects) == 2
    assert other not in repr(found)

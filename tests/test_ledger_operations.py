"""Ledger operations on both backends: spending order, restores, refunds, accrual, expiry, cards."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from gateway.clock import SHANGHAI
from gateway.errors import BadInput
from gateway.ledger import journal, operations
from gateway.ledger.db import make_engine, unit_of_work
from gateway.ledger.journal import LedgerError
from gateway.ledger.models import Authorisation, AuthorisationState, CardStatus, TransactionKind
from gateway.ledger.operations import (
    AccrualLine,
    AccrualSkipped,
    Accrued,
    Decline,
    Declined,
    Enrolment,
    Redeemed,
    Refunded,
    Restored,
    ReversalEffect,
)
from gateway.points import MAX_CARD_POINTS, convert
from tests.conftest import LedgerWorld, moment

# With one expiry year: earned in points year 2026 (Dec 2025 - Nov 2026) -> 2027-11-30;
# earned in points year 2025 -> 2026-11-30; earned in points year 2024 -> 2025-11-30.
LATE = date(2026, 1, 5)
EARLY = date(2025, 2, 1)
EARLY_TOO = date(2025, 6, 1)
GONE = date(2024, 6, 1)


def local(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=SHANGHAI)  # type: ignore[misc]


def redeemed(outcome: Redeemed | Declined) -> Redeemed:
    assert isinstance(outcome, Redeemed), outcome
    return outcome


def state_of(world: LedgerWorld, authorisation_id: int) -> Authorisation:
    with unit_of_work(world.engine) as session:
        found = session.get(Authorisation, authorisation_id)
        assert found is not None
        return found


# --- redeem -------------------------------------------------------------------------------


def test_redeem_takes_earliest_expiring_then_oldest_lot(world: LedgerWorld) -> None:
    """Spending order: earliest expiry first; between equal expiries, the lot earned first."""
    card = world.add_card(lots=[(LATE, 100), (EARLY_TOO, 30), (EARLY, 50)])
    outcome = redeemed(world.redeem(card, 70))
    assert [(lot.expires_on, lot.points) for lot in outcome.lots] == [
        (date(2026, 11, 30), 50),
        (date(2026, 11, 30), 20),
    ]
    assert world.lots(card) == [
        (date(2026, 11, 30), 50, 0),
        (date(2026, 11, 30), 30, 10),
        (date(2027, 11, 30), 100, 100),
    ]
    assert outcome.spendable_points_after == 110
    assert world.violations() == []


def test_redeem_never_spends_an_expired_lot(world: LedgerWorld) -> None:
    """An expired lot is not spent even though the expiry job has not booked it."""
    card = world.add_card(lots=[(GONE, 500), (LATE, 100)])
    assert world.balances(card) == operations.Balances(ledger_points=600, spendable_points=100)
    assert world.redeem(card, 101) == Declined(Decline.NOT_ENOUGH_POINTS)
    redeemed(world.redeem(card, 100))
    assert world.lots(card) == [(date(2025, 11, 30), 500, 500), (date(2027, 11, 30), 100, 0)]
    assert world.violations() == []


def test_a_lot_is_spendable_until_the_last_second_of_its_last_day(world: LedgerWorld) -> None:
    """A lot expiring 30 November lives through 23:59:59 local and no further."""
    card = world.add_card(lots=[(EARLY, 10)])
    world.now = local(2026, 11, 30, 23, 59, 59)
    assert world.balances(card).spendable_points == 10
    world.now = local(2026, 12, 1, 0, 0, 0)
    assert world.balances(card) == operations.Balances(ledger_points=10, spendable_points=0)
    assert world.redeem(card, 1) == Declined(Decline.NOT_ENOUGH_POINTS)


def test_redeem_declines_unknown_card_and_zero_points(world: LedgerWorld) -> None:
    """Declines are values: an unknown card, and a conversion worth no points."""
    card = world.add_card(lots=[(LATE, 10)])
    assert world.redeem("6688000000000009999", 5) == Declined(Decline.CARD_UNKNOWN)
    with unit_of_work(world.engine) as session:
        outcome = operations.redeem(
            session,
            world.swipe(),
            card,
            convert(1, 9999),
            requested_amount_fen=1,
            rule_id="big",
            fee_bp=80,
            auth_code="000001",
        )
    assert outcome == Declined(Decline.NO_POINTS)


def test_redeem_records_the_authorisation_and_a_unique_rrn(world: LedgerWorld) -> None:
    """The approved redemption keeps A, d, D, P, the rule and fee in force, and a 12-digit RRN."""
    card = world.add_card(lots=[(LATE, 10_000)])
    with unit_of_work(world.engine) as session:
        outcome = operations.redeem(
            session,
            world.swipe(),
            card,
            convert(12_345, 1000),
            requested_amount_fen=12_345,
            rule_id="gold-10",
            fee_bp=80,
            auth_code="123456",
        )
    first = redeemed(outcome)
    second = redeemed(world.redeem(card, 1))
    row = state_of(world, first.authorisation_id)
    assert (row.amount_fen, row.discount_bp, row.settled_fen, row.points) == (
        12345,
        1000,
        11111,
        5556,
    )
    assert (row.rule_id, row.fee_bp, row.auth_code, row.response_code) == (
        "gold-10",
        80,
        "123456",
        "00",
    )
    assert row.local_time.tzinfo is not None
    assert len(first.rrn) == 12 and first.rrn.isdigit() and first.rrn != second.rrn


def test_the_same_request_cannot_be_applied_twice(world: LedgerWorld) -> None:
    """The journal's idempotency key is unique in the database: a second apply fails whole."""
    card = world.add_card(lots=[(LATE, 100)])
    swipe = world.swipe()

    def apply() -> Redeemed | Declined:
        with unit_of_work(world.engine) as session:
            return operations.redeem(
                session,
                swipe,
                card,
                convert(20, 0),
                requested_amount_fen=20,
                rule_id=None,
                fee_bp=80,
                auth_code="1",
            )

    redeemed(apply())
    with pytest.raises(IntegrityError):
        apply()
    assert world.balances(card).spendable_points == 90
    assert world.violations() == []


# --- void and reversal --------------------------------------------------------------------


def test_void_puts_back_exactly_what_was_taken_lot_by_lot(world: LedgerWorld) -> None:
    """After a void every lot holds what it held before the redemption."""
    card = world.add_card(lots=[(EARLY, 50), (LATE, 100)])
    before = world.lots(card)
    outcome = redeemed(world.redeem(card, 120))
    voided = world.void(outcome.authorisation_id)
    assert isinstance(voided, Restored)
    assert voided.points == 120 and voided.returned.new_lot is None
    assert world.lots(card) == before
    assert state_of(world, outcome.authorisation_id).state is AuthorisationState.VOIDED
    assert world.void(outcome.authorisation_id) == Declined(Decline.ORIGINAL_NOT_ALLOWED)
    assert world.violations() == []


def test_void_after_the_lot_expired_restores_into_a_new_lot(world: LedgerWorld) -> None:
    """Points whose lot expired meanwhile come back in a lot ending with the current points year."""
    card = world.add_card(lots=[(EARLY, 50), (LATE, 100)])
    world.now = local(2026, 11, 20, 10, 0)
    outcome = redeemed(world.redeem(card, 80))
    world.now = local(2026, 12, 2, 9, 0)
    voided = world.void(outcome.authorisation_id)
    assert isinstance(voided, Restored)
    assert voided.returned.new_lot is not None
    assert (voided.returned.new_lot.points, voided.returned.new_lot.expires_on) == (
        50,
        date(2027, 11, 30),
    )
    assert [(c.points, c.expires_on) for c in voided.returned.into_lots] == [
        (30, date(2027, 11, 30))
    ]
    assert world.lots(card) == [
        (date(2026, 11, 30), 50, 0),
        (date(2027, 11, 30), 100, 100),
        (date(2027, 11, 30), 50, 50),
    ]
    assert world.balances(card).spendable_points == 150
    assert world.violations() == []


def test_reversal_of_a_redemption_restores_it_and_repeats_change_nothing(
    world: LedgerWorld,
) -> None:
    """A reversal undoes a redemption like a void; reversing again finds nothing to undo."""
    card = world.add_card(lots=[(LATE, 100)])
    outcome = redeemed(world.redeem(card, 60))
    first = world.reverse(outcome.authorisation_id)
    assert (first.effect, first.points) == (ReversalEffect.REDEMPTION_UNDONE, 60)
    assert state_of(world, outcome.authorisation_id).state is AuthorisationState.REVERSED
    again = world.reverse(outcome.authorisation_id)
    assert (again.effect, again.points) == (ReversalEffect.NOTHING_TO_UNDO, 0)
    assert world.balances(card).spendable_points == 100
    assert world.violations() == []


def test_reversal_of_a_void_takes_the_points_again(world: LedgerWorld) -> None:
    """A reversed void reinstates its redemption, which can then be refunded or voided."""
    card = world.add_card(lots=[(LATE, 100)])
    outcome = redeemed(world.redeem(card, 60))
    voided = world.void(outcome.authorisation_id)
    assert isinstance(voided, Restored)
    reversal = world.reverse(voided.authorisation_id)
    assert (reversal.effect, reversal.points) == (ReversalEffect.VOID_UNDONE, 60)
    assert world.balances(card).spendable_points == 40
    assert state_of(world, outcome.authorisation_id).state is AuthorisationState.APPROVED
    assert state_of(world, voided.authorisation_id).state is AuthorisationState.REVERSED
    assert isinstance(world.refund(outcome.authorisation_id, 120), Refunded)
    assert world.balances(card).spendable_points == 100
    assert world.violations() == []


def test_reversal_of_a_void_stands_when_the_points_are_gone(world: LedgerWorld) -> None:
    """If the card no longer holds the void's points, the void stands and says so."""
    card = world.add_card(lots=[(LATE, 100)])
    outcome = redeemed(world.redeem(card, 60))
    voided = world.void(outcome.authorisation_id)
    assert isinstance(voided, Restored)
    redeemed(world.redeem(card, 50))
    reversal = world.reverse(voided.authorisation_id)
    assert (reversal.effect, reversal.transaction_id) == (ReversalEffect.VOID_STANDS, None)
    assert state_of(world, reversal.authorisation_id).exception == "void_stands"
    assert state_of(world, voided.authorisation_id).state is AuthorisationState.APPROVED
    assert world.balances(card).spendable_points == 50
    assert world.violations() == []


@pytest.mark.parametrize("later_lot", [True, False])
def test_reversal_of_a_void_after_its_lot_expired_takes_the_points_from_that_lot(
    world: LedgerWorld, later_lot: bool
) -> None:
    """A void put its points back into a lot that expired at midnight, before the void's
    reversal: the reversal takes them from that lot (its points still the card's until the
    expiry job books them), as if the void had never been, and the job then books what the
    redemption left in it. Taken in spending order instead, they came out of the card's
    later lot, and the void's points expired besides: the member lost them twice. Without
    a later lot, the void is undone all the same (the card still holds its points)."""
    card = world.add_card(lots=[(EARLY, 100), (LATE, 1000)] if later_lot else [(EARLY, 100)])
    world.now = local(2026, 11, 30, 23, 59)
    outcome = redeemed(world.redeem(card, 60))
    voided = world.void(outcome.authorisation_id)
    assert isinstance(voided, Restored)
    world.now = local(2026, 12, 1, 0, 0, 30)
    reversal = world.reverse(voided.authorisation_id)
    assert (reversal.effect, reversal.points) == (ReversalEffect.VOID_UNDONE, 60)
    assert [(change.points, change.expires_on) for change in reversal.lots] == [
        (60, date(2026, 11, 30))
    ]
    assert state_of(world, outcome.authorisation_id).state is AuthorisationState.APPROVED
    assert world.expire(date(2026, 12, 1)).points == 40
    assert world.balances(card).spendable_points == (1000 if later_lot else 0)
    assert world.violations() == []


def test_reversal_of_a_void_whose_points_the_expiry_job_booked_lets_the_void_stand(
    world: LedgerWorld,
) -> None:
    """The same void and reversal with the expiry job run between them: the void's points
    have expired and been booked, so the card no longer holds them (§4.6) and the void
    stands, as a reconciliation exception. Taken from the card's later lot instead, the
    member would lose them twice, and the job's running before or after the reversal would
    change the card's balance (§3: the job's result does not depend on when it runs)."""
    card = world.add_card(lots=[(EARLY, 100), (LATE, 1000)])
    world.now = local(2026, 11, 30, 23, 59)
    outcome = redeemed(world.redeem(card, 60))
    voided = world.void(outcome.authorisation_id)
    assert isinstance(voided, Restored)
    world.now = local(2026, 12, 1, 0, 0, 30)
    assert world.expire(date(2026, 12, 1)).points == 100
    reversal = world.reverse(voided.authorisation_id)
    assert (reversal.effect, reversal.transaction_id) == (ReversalEffect.VOID_STANDS, None)
    assert state_of(world, reversal.authorisation_id).exception == "void_stands"
    assert state_of(world, outcome.authorisation_id).state is AuthorisationState.VOIDED
    assert world.balances(card) == operations.Balances(1000, 1000)
    assert world.violations() == []


def test_reversal_of_a_void_takes_what_its_lot_no_longer_holds_in_spending_order(
    world: LedgerWorld,
) -> None:
    """Points the void put back and the card has spent since are taken from its other lots,
    earliest-expiring first, once the void's own lot has given what it still holds."""
    card = world.add_card(lots=[(EARLY, 100), (LATE, 1000)])
    outcome = redeemed(world.redeem(card, 60))  # from the early lot
    voided = world.void(outcome.authorisation_id)
    assert isinstance(voided, Restored)
    redeemed(world.redeem(card, 80))  # the early lot keeps 20
    reversal = world.reverse(voided.authorisation_id)
    assert reversal.effect is ReversalEffect.VOID_UNDONE
    assert [(change.points, change.expires_on) for change in reversal.lots] == [
        (20, date(2026, 11, 30)),
        (40, date(2027, 11, 30)),
    ]
    assert world.balances(card).spendable_points == 1100 - 140
    assert world.violations() == []


def test_refunded_redemption_cannot_be_voided_or_reversed(world: LedgerWorld) -> None:
    """Once partly refunded, a redemption is neither voided nor undone by a reversal."""
    card = world.add_card(lots=[(LATE, 100)])
    outcome = redeemed(world.redeem(card, 50))
    assert isinstance(world.refund(outcome.authorisation_id, 10), Refunded)
    assert world.void(outcome.authorisation_id) == Declined(Decline.ORIGINAL_NOT_ALLOWED)
    assert world.reverse(outcome.authorisation_id).effect is ReversalEffect.NOTHING_TO_UNDO
    assert world.balances(card).spendable_points == 55


# --- refunds ------------------------------------------------------------------------------


def test_refunds_are_proportional_and_the_last_takes_the_remainder(world: LedgerWorld) -> None:
    """floor(P x R / A) and floor(D x R / A) each time; reaching A returns what is left."""
    card = world.add_card(lots=[(LATE, 10_000)])
    with unit_of_work(world.engine) as session:
        outcome = redeemed(
            operations.redeem(
                session, world.swipe(), card, convert(10_001, 1000),
                requested_amount_fen=10_001, rule_id="r", fee_bp=80, auth_code="1",
            )
        )  # fmt: skip
    original = state_of(world, outcome.authorisation_id)
    assert (original.settled_fen, original.points) == (9001, 4501)
    shares = []
    for fen in (3333, 3333, 3335):
        refunded = world.refund(outcome.authorisation_id, fen)
        assert isinstance(refunded, Refunded)
        shares.append((refunded.points, refunded.fen_clawed))
    assert shares == [(1500, 2999), (1500, 2999), (1501, 3003)]
    assert world.refund(outcome.authorisation_id, 1) == Declined(Decline.OVER_WHAT_IS_LEFT)
    final = state_of(world, outcome.authorisation_id)
    assert (final.refunded_fen, final.points_returned, final.fen_clawed) == (10_001, 4501, 9001)
    assert world.balances(card).spendable_points == 10_000
    assert world.violations() == []


def test_refund_over_what_is_left_or_of_a_voided_original_is_declined(world: LedgerWorld) -> None:
    """A refund beyond A, of 0 fen, or of a voided redemption changes nothing."""
    card = world.add_card(lots=[(LATE, 100)])
    outcome = redeemed(world.redeem(card, 50))
    assert world.refund(outcome.authorisation_id, 101) == Declined(Decline.OVER_WHAT_IS_LEFT)
    assert world.refund(outcome.authorisation_id, 0) == Declined(Decline.OVER_WHAT_IS_LEFT)
    assert isinstance(world.void(outcome.authorisation_id), Restored)
    assert world.refund(outcome.authorisation_id, 10) == Declined(Decline.ORIGINAL_NOT_ALLOWED)
    assert world.balances(card).spendable_points == 100


def test_refund_returns_to_the_latest_expiring_lots_first(world: LedgerWorld) -> None:
    """Returned points go back to the lots they came from, latest expiry first."""
    card = world.add_card(lots=[(EARLY, 30), (LATE, 100)])
    outcome = redeemed(world.redeem(card, 80))  # 30 from EARLY, 50 from LATE
    refunded = world.refund(outcome.authorisation_id, 80)  # half: 40 points
    assert isinstance(refunded, Refunded)
    assert [(c.expires_on, c.points) for c in refunded.returned.into_lots] == [
        (date(2027, 11, 30), 40)
    ]
    refunded = world.refund(outcome.authorisation_id, 80)  # the rest: 40 points
    assert isinstance(refunded, Refunded)
    assert [(c.expires_on, c.points) for c in refunded.returned.into_lots] == [
        (date(2027, 11, 30), 10),
        (date(2026, 11, 30), 30),
    ]
    assert world.lots(card) == [(date(2026, 11, 30), 30, 30), (date(2027, 11, 30), 100, 100)]
    assert world.violations() == []


def test_refund_after_the_lot_expired_goes_into_a_new_lot(world: LedgerWorld) -> None:
    """A refund's points whose lot has expired go into a lot ending this points year."""
    card = world.add_card(lots=[(EARLY, 40)])
    outcome = redeemed(world.redeem(card, 40))
    world.now = local(2027, 1, 15, 12, 0)
    refunded = world.refund(outcome.authorisation_id, 40)
    assert isinstance(refunded, Refunded)
    assert refunded.returned.new_lot is not None
    assert (refunded.returned.new_lot.points, refunded.returned.new_lot.expires_on) == (
        20,
        date(2027, 11, 30),
    )
    assert world.balances(card).spendable_points == 20
    assert world.violations() == []


def test_a_refund_worth_no_points_still_claws_back_nothing_and_counts(world: LedgerWorld) -> None:
    """A 1-fen refund of a big redemption returns 0 points and moves nothing in the journal."""
    card = world.add_card(lots=[(LATE, 1000)])
    outcome = redeemed(world.redeem(card, 500))
    refunded = world.refund(outcome.authorisation_id, 1)
    assert isinstance(refunded, Refunded)
    assert (refunded.points, refunded.fen_clawed, refunded.transaction_id) == (0, 1, None)
    assert state_of(world, outcome.authorisation_id).refunded_fen == 1
    assert world.violations() == []


# --- accrual and expiry -------------------------------------------------------------------


def test_accrual_applies_a_source_ref_once_ever(world: LedgerWorld) -> None:
    """A second accrual with the same source_ref, on any card, is skipped and reported."""
    card = world.add_card()
    other = world.add_card(2)
    first = world.accrue(card, LATE, 100, ref="bill:1")
    assert isinstance(first, Accrued) and first.expires_on == date(2027, 11, 30)
    assert world.accrue(card, LATE, 100, ref="bill:1") == AccrualSkipped("bill:1")
    assert world.accrue(other, LATE, 5, ref="bill:1") == AccrualSkipped("bill:1")
    assert world.balances(card).ledger_points == 100
    assert world.balances(other).ledger_points == 0
    assert world.violations() == []


def test_a_posting_refused_masks_a_card_number_in_its_key(world: LedgerWorld) -> None:
    """Journal keys may hold a card number (`accrual:config:<number>:0`): the error that
    names the key shows it masked."""
    card = world.add_card(lots=[(date(2026, 3, 1), 100)])
    key = f"accrual:config:{card}:0"
    with pytest.raises(LedgerError) as refused, unit_of_work(world.engine) as session:
        journal.post(
            session,
            key=key,
            kind=TransactionKind.ACCRUAL,
            when=moment(world.now),
            card_number=card,
            legs=[(journal.card_account_id(session, card), 5)],
        )
    assert str(refused.value) == (
        f"unbalanced or empty legs for transaction accrual:config:{card[:6]}*********{card[-4:]}:0"
    )


def test_the_feed_check_counts_the_base_accrue_bounds(world: LedgerWorld) -> None:
    """`accrual_bases` (what the feed check adds a file's lines to) is what `accrue` adds one
    accrual to: the lots' points and what approved redemptions may still give back (less
    what refunds returned; a voided redemption's points are back in a lot, counted once)."""
    card = world.add_card(lots=[(LATE, 10_000)])
    empty = world.add_card(serial=2)
    kept = redeemed(world.redeem(card, 3_000))
    voided = redeemed(world.redeem(card, 1_000))
    assert isinstance(world.void(voided.authorisation_id), operations.Restored)
    assert isinstance(world.refund(kept.authorisation_id, 2_000), Refunded)  # 1,000 points back
    with unit_of_work(world.engine) as session:
        bases = operations.accrual_bases(session, [card, empty])
        assert operations.accruals_applied(session, ["test:1", "never"]) == {"test:1"}
    assert bases == {card: 8_000 + 2_000, empty: 0}
    room = MAX_CARD_POINTS - bases[card]
    with pytest.raises(BadInput, match="would hold"):
        world.accrue(card, LATE, room + 1)
    assert isinstance(world.accrue(card, LATE, room), operations.Accrued)


def test_accrual_refuses_bad_input(world: LedgerWorld) -> None:
    """Unknown card or points not a positive integer are bad input, and change nothing."""
    card = world.add_card()
    with pytest.raises(BadInput, match="unknown card"):
        world.accrue("6688000000000009999", LATE, 10)
    for points in (0, -5):
        with pytest.raises(BadInput, match="positive integer"):
            world.accrue(card, LATE, points)
    assert world.balances(card).ledger_points == 0


def test_expiry_books_expired_lots_once(world: LedgerWorld) -> None:
    """The expiry job books lots that expired before D 00:00; running it again changes nothing."""
    card = world.add_card(lots=[(GONE, 70), (EARLY, 50), (LATE, 100)])
    world.now = local(2026, 12, 1, 8, 0)
    first = world.expire(date(2026, 12, 1))
    assert (first.lots, first.points, first.cards) == (2, 120, 1)
    assert world.balances(card) == operations.Balances(100, 100)
    again = world.expire(date(2026, 12, 1))
    assert (again.lots, again.points) == (0, 0)
    assert world.lots(card) == [
        (date(2025, 11, 30), 70, 0),
        (date(2026, 11, 30), 50, 0),
        (date(2027, 11, 30), 100, 100),
    ]
    assert world.violations() == []


def test_points_given_back_to_a_lot_after_its_expiry_was_booked_expire_at_the_next_run(
    world: LedgerWorld,
) -> None:
    """A void decided at 23:59:59 on the lot's last day (its instant read before it waited
    for the card, which the expiry job held) commits after the job booked the lot: its
    points go back into the lot, spendable at that instant. The next run books them under
    the lot's second key instead of failing on its first for every card; runs after it
    change nothing."""
    card = world.add_card(lots=[(EARLY, 50), (LATE, 100)])
    other = world.add_card(2, lots=[(EARLY, 20)])
    world.now = local(2026, 11, 30, 12, 0)
    outcome = redeemed(world.redeem(card, 30))
    world.now = local(2026, 12, 1, 0, 0, 1)
    assert world.expire(date(2026, 12, 1)).points == 20 + 20  # each card's early lot
    world.now = local(2026, 11, 30, 23, 59, 59)  # the void's instant, read before its wait
    voided = world.void(outcome.authorisation_id)
    assert isinstance(voided, Restored) and voided.returned.new_lot is None
    world.now = local(2026, 12, 1, 0, 5)
    again = world.expire(date(2026, 12, 1))
    assert (again.lots, again.points, again.cards) == (1, 30, 1)
    assert world.expire(date(2026, 12, 1)).points == 0
    world.now = local(2026, 12, 2, 0, 5)
    assert world.expire(date(2026, 12, 2)).points == 0
    assert world.lots(card)[0] == (date(2026, 11, 30), 50, 0)
    assert world.balances(card) == operations.Balances(100, 100)
    assert world.lots(other) == [(date(2026, 11, 30), 20, 0)]
    assert world.violations() == []


def test_expiry_as_of_the_last_day_books_nothing_of_that_day(world: LedgerWorld) -> None:
    """A lot expiring on 30 November is not booked by a run as of 30 November."""
    card = world.add_card(lots=[(EARLY, 50)])
    world.now = local(2026, 11, 30, 8, 0)
    assert world.expire(date(2026, 11, 30)).lots == 0
    assert world.balances(card).ledger_points == 50


def test_expiry_refuses_a_date_that_has_not_begun(world: LedgerWorld) -> None:
    """Booking lots as expired before they are would take spendable points."""
    world.add_card(lots=[(EARLY, 50)])
    world.now = local(2026, 11, 30, 23, 0)
    with pytest.raises(BadInput, match="has not begun"):
        world.expire(date(2026, 12, 1))


# --- cards --------------------------------------------------------------------------------


def test_enrolment_needs_more_than_the_qualifying_spendable_points(world: LedgerWorld) -> None:
    """3,500 spendable points are not enough, 3,501 are; expired points do not count."""
    card = world.add_card(lots=[(LATE, 3500), (GONE, 10_000)], enrolled=False)
    with unit_of_work(world.engine) as session:
        outcome = operations.enrol(session, card, world.now, qualify_points=3500)
    assert outcome is Enrolment.NOT_ENOUGH_POINTS
    world.accrue(card, LATE, 1)
    with unit_of_work(world.engine) as session:
        assert operations.enrol(session, card, world.now, qualify_points=3500) is (
            Enrolment.ENROLLED
        )
    with unit_of_work(world.engine) as session:
        assert operations.enrol(session, card, world.now, qualify_points=3500) is (
            Enrolment.ALREADY_ENROLLED
        )
        found = operations.find_card(session, card)
        assert found is not None and found.enrolled_at is not None


def test_block_unblock_and_status(world: LedgerWorld) -> None:
    """Block makes a card blocked; unblock only brings a blocked card back to active."""
    card = world.add_card()
    with unit_of_work(world.engine) as session:
        assert operations.block(session, card) is CardStatus.ACTIVE
        assert operations.unblock(session, card) is True
        assert operations.set_status(session, card, CardStatus.LOST) is CardStatus.ACTIVE
        assert operations.unblock(session, card) is False
        found = operations.find_card(session, card)
        assert found is not None and found.status is CardStatus.LOST
    with pytest.raises(BadInput, match="unknown card"), unit_of_work(world.engine) as session:
        operations.block(session, "6688000000000009999")


def test_three_wrong_pins_lock_until_unlocked(world: LedgerWorld) -> None:
    """The third wrong PIN in a row locks; a right PIN restarts the run; unlock clears all."""
    card = world.add_card()
    with unit_of_work(world.engine) as session:
        operations.record_wrong_pin(session, card)
        operations.record_wrong_pin(session, card)
        assert operations.reset_pin_tries(session, card) == operations.PinState(0, False)
        states = [operations.record_wrong_pin(session, card) for _ in range(3)]
    assert states[-1] == operations.PinState(3, True)
    assert states[-2] == operations.PinState(2, False)
    with unit_of_work(world.engine) as session:
        assert operations.unlock_pin(session, card) == operations.PinState(0, False)


def test_upsert_card_updates_everything_but_points(world: LedgerWorld) -> None:
    """Re-importing a card changes its details, unlocks a changed PIN, and never its points."""
    card = world.add_card(lots=[(LATE, 100)])
    with unit_of_work(world.engine) as session:
        with_pin = operations.CardDetails(card, "3012", "gold", CardStatus.ACTIVE, True, b"old")
        operations.upsert_card(session, with_pin, world.now)
        for _ in range(3):
            operations.record_wrong_pin(session, card)
    details = operations.CardDetails(card, "2912", "diamond", CardStatus.ACTIVE, True, b"new")
    with unit_of_work(world.engine) as session:
        assert operations.upsert_card(session, details, world.now) is False
        found = operations.find_card(session, card)
        assert found is not None
        assert (found.tier, found.expiry_yymm, found.pin_locked, found.pin_hmac) == (
            "diamond",
            "2912",
            False,
            b"new",
        )
    assert world.balances(card).ledger_points == 100


def test_points_redeemed_on_counts_approved_redemptions_only(world: LedgerWorld) -> None:
    """The daily limit counts approved redemptions of the business date, not voided ones."""
    card = world.add_card(lots=[(LATE, 1000)])
    redeemed(world.redeem(card, 100))
    voided = redeemed(world.redeem(card, 200))
    world.void(voided.authorisation_id)
    with unit_of_work(world.engine) as session:
        assert operations.points_redeemed_on(session, card, world.now.date()) == 100
        assert operations.points_redeemed_on(session, card, date(2026, 3, 11)) == 0


def test_a_batch_of_accruals_leaves_what_its_lines_one_by_one_leave(
    fresh_ledger_url: Callable[[], str],
) -> None:
    """`accrue_many` (a feed's batch: what every line shares looked up once, the rows
    written in a few flushes) against `accrue` line by line, on two equal ledgers: the same
    outcomes, lots, balances and journal, a ref applied before or repeated in the batch
    skipped, several lines for one card counted together against the cap."""
    batch = [
        ("a", 1, LATE, 100),
        ("b", 2, EARLY, 50),
        ("a", 1, LATE, 7),  # repeated in the batch: skipped
        ("c", 1, EARLY, 30),
        ("before", 2, LATE, 5),  # applied before the batch: skipped
        ("d", 2, LATE, 11),
    ]
    results = []
    for together in (False, True):
        engine = make_engine(fresh_ledger_url())
        world = LedgerWorld(engine)
        cards = {1: world.add_card(1), 2: world.add_card(2)}
        world.accrue(cards[2], LATE, 5, ref="before")
        lines = [AccrualLine(cards[c], day, points, ref) for ref, c, day, points in batch]
        with unit_of_work(engine) as session:
            when = moment(world.now)
            if together:
                outcomes = operations.accrue_many(session, lines, when=when, expiry_years=3)
            else:
                outcomes = [
                    operations.accrue(
                        session, line.card_number, line.earned_on, line.points, line.source_ref,
                        when=when, expiry_years=3,
                    )
                    for line in lines
                ]  # fmt: skip
        with unit_of_work(engine) as session:
            journal_rows = session.execute(
                text(
                    "SELECT t.idempotency_key, e.points FROM journal_transactions t"
                    " JOIN journal_entries e ON e.transaction_id = t.id ORDER BY t.id, e.id"
                )
            ).all()
        results.append(
            (
                [
                    (type(outcome).__name__, getattr(outcome, "expires_on", None))
                    for outcome in outcomes
                ],
                [world.lots(card) for card in cards.values()],
                [world.balances(card) for card in cards.values()],
                [tuple(row) for row in journal_rows],
            )
        )
        assert world.violations() == []
        engine.dispose()
    assert results[0] == results[1]
    kinds = [kind for kind, _ in results[1][0]]
    assert kinds == ["Accrued", "Accrued", "AccrualSkipped", "Accrued", "AccrualSkipped", "Accrued"]
    # The cap counts the batch's earlier lines for the card: one point over, refused whole.
    engine = make_engine(fresh_ledger_url())
    world = LedgerWorld(engine)
    card = world.add_card(1)
    half = MAX_CARD_POINTS // 2
    over = [AccrualLine(card, LATE, half, "x"), AccrualLine(card, LATE, half + 2, "y")]
    with pytest.raises(BadInput, match="more than the"), unit_of_work(engine) as session:
        operations.accrue_many(session, over, when=moment(world.now), expiry_years=3)
    assert world.balances(card).ledger_points == 0
    engine.dispose()

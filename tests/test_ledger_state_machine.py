"""Random sequences of ledger operations, across points-year ends, agree with a naive model.

Hypothesis drives accrue, redeem, void, refund, reverse and expire in any order while a fake
clock moves forward (often over a 30 November), on each backend; after every step each card's
balances and lots must match `tests/ledger_model.py` and every invariant must hold.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from gateway.clock import SHANGHAI
from gateway.ledger.db import make_engine
from gateway.ledger.operations import (
    AccrualSkipped,
    Accrued,
    Declined,
    Redeemed,
    Refunded,
    Restored,
    ReversalEffect,
)
from gateway.points import convert
from tests.conftest import START, FreshUrl, LedgerWorld
from tests.ledger_model import LedgerModel, Redemption, Void

CARDS = 2
EXAMPLES = 20
STEPS = 30

cards = st.integers(0, CARDS - 1)


class LedgerMachine(RuleBasedStateMachine):
    """Real ledger and model side by side; `fresh_url` gives each example its own database."""

    fresh_url: FreshUrl
    redemptions = Bundle("redemptions")
    voids = Bundle("voids")

    def __init__(self) -> None:
        super().__init__()
        self.engine = make_engine(self.fresh_url())
        self.world = LedgerWorld(self.engine, START)
        self.model = LedgerModel()
        self.cards = [self.world.add_card(serial + 1) for serial in range(CARDS)]
        self.ids: dict[int, int] = {}  # id(model object) -> authorisation id
        self.refs = 0

    def teardown(self) -> None:
        self.engine.dispose()

    @initialize(card=cards, points=st.integers(1, 3000))
    def start_with_points(self, card: int, points: int) -> None:
        self.accrue(card, 30, points, reuse_ref=False)

    @rule(
        card=cards,
        days_ago=st.integers(0, 900),
        points=st.integers(1, 3000),
        reuse_ref=st.booleans(),
    )
    def accrue(self, card: int, days_ago: int, points: int, reuse_ref: bool) -> None:
        if not reuse_ref or self.refs == 0:
            self.refs += 1
        ref = f"feed:{self.refs}"
        earned_on = self.world.now.date() - timedelta(days=days_ago)
        number = self.cards[card]
        outcome = self.world.accrue(number, earned_on, points, ref)
        applied = self.model.accrue(number, earned_on, points, ref)
        assert isinstance(outcome, Accrued if applied else AccrualSkipped)

    @rule(
        target=redemptions,
        card=cards,
        amount_fen=st.integers(1, 4000),
        discount_bp=st.sampled_from([0, 0, 500, 1250, 9999]),
    )
    def redeem(self, card: int, amount_fen: int, discount_bp: int) -> object:
        conversion = convert(amount_fen, discount_bp)
        if conversion.points == 0:
            return multiple()
        number = self.cards[card]
        outcome = self.world.redeem_conversion(number, conversion)
        expected = self.model.redeem(number, conversion, self.world.now)
        assert isinstance(outcome, Redeemed) == (expected is not None), outcome
        if not isinstance(outcome, Redeemed) or expected is None:
            return multiple()
        self.ids[id(expected)] = outcome.authorisation_id
        return expected

    @rule(target=voids, redemption=redemptions)
    def void(self, redemption: Redemption) -> object:
        outcome = self.world.void(self.ids[id(redemption)])
        expected = self.model.void(redemption, self.world.now)
        assert isinstance(outcome, Restored) == (expected is not None), outcome
        if not isinstance(outcome, Restored) or expected is None:
            return multiple()
        self.ids[id(expected)] = outcome.authorisation_id
        return expected

    @rule(redemption=redemptions, refund_fen=st.integers(0, 4000), whole=st.booleans())
    def refund(self, redemption: Redemption, refund_fen: int, whole: bool) -> None:
        if whole:
            refund_fen = redemption.conversion.amount_fen - redemption.refunded_fen
        outcome = self.world.refund(self.ids[id(redemption)], refund_fen)
        expected = self.model.refund(redemption, refund_fen, self.world.now)
        if expected is None:
            assert isinstance(outcome, Declined), outcome
        else:
            assert isinstance(outcome, Refunded), outcome
            assert (outcome.points, outcome.fen_clawed) == expected

    @rule(redemption=redemptions)
    def reverse_redemption(self, redemption: Redemption) -> None:
        outcome = self.world.reverse(self.ids[id(redemption)])
        undone = self.model.reverse_redemption(redemption, self.world.now)
        expected = ReversalEffect.REDEMPTION_UNDONE if undone else ReversalEffect.NOTHING_TO_UNDO
        assert outcome.effect is expected

    @rule(void=consumes(voids))
    def reverse_void(self, void: Void) -> None:
        outcome = self.world.reverse(self.ids[id(void)])
        expected = {
            "undone": ReversalEffect.VOID_UNDONE,
            "stands": ReversalEffect.VOID_STANDS,
            "nothing": ReversalEffect.NOTHING_TO_UNDO,
        }[self.model.reverse_void(void, self.world.now)]
        assert outcome.effect is expected

    @rule(days=st.integers(1, 150), hour=st.integers(0, 23))
    def advance_clock(self, days: int, hour: int) -> None:
        local = self.world.now.astimezone(SHANGHAI) + timedelta(days=days)
        self.world.now = local.replace(hour=hour, minute=30)

    @rule(days_back=st.integers(0, 400))
    def expire(self, days_back: int) -> None:
        as_of = self.world.now.astimezone(SHANGHAI).date() - timedelta(days=days_back)
        outcome = self.world.expire(as_of)
        assert outcome.points == self.model.expire(as_of)

    @invariant()
    def books_agree_with_the_model(self) -> None:
        for number in self.cards:
            balances = self.world.balances(number)
            assert balances.ledger_points == self.model.ledger_points(number)
            assert balances.spendable_points == self.model.spendable_points(number, self.world.now)
            assert self.world.lots(number) == self.model.lots_of(number)
        assert self.world.violations() == []


def test_random_operations_agree_with_the_model(fresh_ledger_url: FreshUrl) -> None:
    """Any sequence of operations leaves balances, lots and invariants as the model says."""
    bound = type(
        "BoundLedgerMachine", (LedgerMachine,), {"fresh_url": staticmethod(fresh_ledger_url)}
    )
    run_state_machine_as_test(
        bound,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )

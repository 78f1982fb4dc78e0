"""Two OS processes racing to spend one card's points can never take more than it has."""

from __future__ import annotations

import multiprocessing
from datetime import date
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from gateway.ledger import operations
from gateway.ledger.db import make_engine, unit_of_work
from gateway.ledger.operations import Decline, Declined, Redeemed
from gateway.points import convert
from tests.conftest import MERCHANT_ID, START, TERMINAL_ID, LedgerWorld, moment

WORKERS = 2
ROUNDS = 40
POINTS_EACH = 7
CARD_POINTS = 300  # 42 redemptions of 7 fit, with 6 points left over
JOIN_TIMEOUT_S = 120


def redeem_repeatedly(
    url: str, card: str, worker: int, barrier: Barrier, results: Queue[tuple[int, int]]
) -> None:
    """One process: wait for the other, then try ROUNDS redemptions as fast as it can."""
    engine = make_engine(url)
    approved = declined = 0
    barrier.wait()
    try:
        for round_number in range(ROUNDS):
            swipe = operations.Swipe(
                TERMINAL_ID, 1, worker * 1000 + round_number + 1, moment(START), MERCHANT_ID
            )
            with unit_of_work(engine) as session:
                outcome = operations.redeem(
                    session,
                    swipe,
                    card,
                    convert(2 * POINTS_EACH, 0),
                    requested_amount_fen=2 * POINTS_EACH,
                    rule_id=None,
                    fee_bp=80,
                    auth_code="000001",
                )
            if isinstance(outcome, Redeemed):
                approved += POINTS_EACH
            else:
                assert outcome == Declined(Decline.NOT_ENOUGH_POINTS)
                declined += 1
    finally:
        engine.dispose()
    results.put((approved, declined))


def test_two_processes_never_spend_more_than_the_card_holds(
    ledger_url: str, ledger_backend: str
) -> None:
    """Racing redemptions from two processes approve exactly what the card held, no more."""
    engine = make_engine(ledger_url)
    try:
        world = LedgerWorld(engine)
        card = world.add_card(lots=[(date(2026, 1, 5), 100), (date(2025, 5, 1), 200)])
    finally:
        engine.dispose()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    results = context.Queue()
    workers = [
        context.Process(target=redeem_repeatedly, args=(ledger_url, card, n, barrier, results))
        for n in range(WORKERS)
    ]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=JOIN_TIMEOUT_S) for _ in workers]
    for process in workers:
        process.join(JOIN_TIMEOUT_S)
        assert process.exitcode == 0, f"{ledger_backend} worker failed"
    approved = sum(points for points, _ in outcomes)
    assert approved == CARD_POINTS - CARD_POINTS % POINTS_EACH
    declined = sum(count for _, count in outcomes)
    assert declined == WORKERS * ROUNDS - CARD_POINTS // POINTS_EACH
    engine = make_engine(ledger_url)
    try:
        world = LedgerWorld(engine, set_up=False)
        assert world.balances(card).spendable_points == CARD_POINTS % POINTS_EACH
        assert world.violations() == []
    finally:
        engine.dispose()

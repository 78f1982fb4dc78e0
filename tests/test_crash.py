"""Crash safety, a small run: SIGKILL `vipgate serve` under load three times per backend and
find nothing lost and nothing doubled (the long campaign is `make test-crash`)."""

from __future__ import annotations

from sqlalchemy import Engine

from cardcodec.crypto import Suite, WorkingKeys
from cardcodec.profile import Kind
from simulators.terminal import CardEntry, Completed, Result, Terminal
from tests.crash_campaign import Book, Kept, audit, run_campaign
from tests.gateway_harness import DIAMOND, TMKS

CYCLES = 3
FORGED_RRN = "999999999999"


def test_kills_under_load_lose_nothing_and_double_nothing(ledger_url: str) -> None:
    """Three kill-restart-reverse cycles: every approval kept, every reversal left no trace."""
    figures = run_campaign(ledger_url, CYCLES, backend="test", seed=7, time_limit_s=60)
    assert figures.problems == [], figures.problems
    assert (figures.cycles, figures.losses, figures.doubles) == (CYCLES, 0, 0)
    assert figures.approvals > 0 and figures.reversals > 0


def test_the_audit_sees_a_lost_approval_and_points_taken_twice(ledger_engine: Engine) -> None:
    """The audit is not vacuous: a slip with no ledger row is a loss, missing points a double."""
    merchant, suite, tmk = TMKS["10000001"]
    terminal = Terminal("10000001", merchant, Suite(suite), bytes.fromhex(tmk))
    terminal.keys = WorkingKeys(bytes(16), bytes(16))  # only to build a request to forge
    request = terminal.redemption(CardEntry(DIAMOND, "2906"), 20)
    slip = Result(Kind.REDEMPTION, "0210", "00", request.trace, rrn=FORGED_RRN, points=10)
    book = Book({DIAMOND: 10})
    book.kept[("10000001", request.batch, request.trace)] = Kept(
        Completed(request, slip), DIAMOND, 10, FORGED_RRN
    )
    found = audit(ledger_engine, book)
    assert any(FORGED_RRN in loss for loss in found.losses), found
    book.kept.clear()
    found = audit(ledger_engine, book)
    assert (found.losses, len(found.doubles)) == ([], 1), found

"""`vipgate ledger check`: do the books agree with themselves (points-and-clearing.md §3)? And
`vipgate ledger load`: the config loaded into the ledger, as `serve` does at its start.

A check only reads: it does not load its config (run with another config than the gateway's,
it would otherwise write that config's terminals, cards and points into the ledger it
checks). Exit 0 only when every invariant holds; otherwise each violation is printed on its own line
and the command exits 1 (a check that ran and found a fault), so a script or a person can
act on the whole list at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy import Engine, func, select

from clearing.clear import snapshot_isolation
from gateway.bootstrap import wired
from gateway.errors import CheckFailed, LedgerDamaged
from gateway.ledger import unit_of_work
from gateway.ledger.invariants import CHECKS, Violation, check_invariants, storage_faults
from gateway.ledger.models import Card, JournalTransaction, PointLot


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    group = subparsers.add_parser("ledger", help="the points ledger")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    parser = actions.add_parser(
        "check", parents=[common], help="check every ledger invariant; exit 0 only when all hold"
    )
    parser.set_defaults(handler=check)
    parser = actions.add_parser(
        "load",
        parents=[common],
        help="load the config's merchants, terminals and cards into the ledger, as serve does",
    )
    parser.set_defaults(handler=load)


def load(args: argparse.Namespace) -> int:
    """The config loaded on purpose (commands that only read the ledger do not load it): a
    line of what it holds and one per change, or that nothing changed."""
    with wired(args.config, args.db, switches=True) as wiring:
        if not wiring.loaded.changed:
            print(f"{args.config}: {wiring.loaded.summary()}")
    return 0


def check(args: argparse.Namespace) -> int:
    try:
        violations, counts = _checked(args)
    except LedgerDamaged as damaged:  # its schema or header: it cannot even be opened
        _report([Violation("storage_sound", "ledger file", damaged.finding)])
        raise CheckFailed(_DAMAGED.format(command="ledger check", so=_NOT_CHECKED)) from None
    if violations:
        _report(violations)
        noun = "violation" if len(violations) == 1 else "violations"
        raise CheckFailed(f"ledger check: {len(violations)} {noun}")
    cards, lots, transactions = counts
    print(
        f"ledger check: all {len(CHECKS)} invariant checks hold "
        f"({cards} cards, {lots} lots, {transactions} journal transactions)"
    )
    return 0


def _checked(args: argparse.Namespace) -> tuple[list[Violation], list[int]]:
    """The invariants' violations, and the ledger's counts of cards, lots and journal
    transactions."""
    with wired(args.config, args.db, load=False) as wiring:
        # The invariants cannot be trusted on a damaged file, and may stop with its error.
        refuse_damaged_ledger(wiring.engine, "ledger check", _NOT_CHECKED)
        # The checks compare figures that separate statements read (the journal's and the
        # lots', say): on PostgreSQL, with a gateway committing meanwhile, they read one
        # snapshot (REPEATABLE READ), else a redemption committed between two of them looks
        # like a fault. SQLite's unit of work holds the write lock already.
        with unit_of_work(wiring.engine) as session:
            snapshot_isolation(session)
            violations = check_invariants(session)
            counts = [
                session.scalar(select(func.count()).select_from(model)) or 0
                for model in (Card, PointLot, JournalTransaction)
            ]
    return violations, counts


def _report(violations: list[Violation]) -> None:
    for violation in violations:
        print(f"{violation.rule}: {violation.subject}: {violation.detail}")


def refuse_damaged_ledger(engine: Engine, command: str, so: str) -> None:
    """On SQLite, SQLite's own check of the ledger file (`storage_faults`); a damaged file
    has what it found printed, a line each, and `CheckFailed` (exit 1) saying what `so`
    the `command` did not do."""
    damage = storage_faults(engine)
    if damage:
        _report(damage)
        raise CheckFailed(_DAMAGED.format(command=command, so=so))


_DAMAGED = (
    "{command}: the ledger file is damaged (SQLite's integrity check); {so}: restore the"
    " ledger from a backup"
)
_NOT_CHECKED = "the invariants were not checked"

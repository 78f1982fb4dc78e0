"""`vipgate points import FILE` and `vipgate points expire --as-of YYYY-MM-DD`.

The billing system's accrual feed comes in as a CSV, all or nothing (see `gateway.imports`);
the expiry job books, once, every lot that expired before a date. Both print what they did
in plain lines and change nothing on bad input (exit 2).
"""

from __future__ import annotations

import argparse
import functools
import re
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from gateway.bootstrap import wired
from gateway.clock import Clock
from gateway.commands import progress
from gateway.config import Config
from gateway.errors import BadInput
from gateway.imports import (
    CheckedFeed,
    apply_feed,
    in_transaction,
    read_feed,
    refuse_bad_lines,
    shown,
)
from gateway.ledger import Moment, operations, unit_of_work

SKIPPED_SHOWN = 20  # skipped lines named one by one; the rest are counted
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    group = subparsers.add_parser("points", help="accrual feed and expiry job")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    parser = actions.add_parser(
        "import",
        parents=[common],
        help="accrue a billing feed, a CSV file: card_number,earned_on,points,source_ref",
    )
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.set_defaults(handler=import_command)
    parser = actions.add_parser(
        "expire", parents=[common], help="book every lot that expired before a date"
    )
    parser.add_argument(
        "--as-of",
        required=True,
        metavar="YYYY-MM-DD",
        dest="as_of",
        help="book the lots that expired before 00:00 of this date (local clock)",
    )
    parser.set_defaults(handler=expire)


def import_command(args: argparse.Namespace) -> int:
    """The feed read and checked before the config load, its cards in the load's transaction
    (a bad line refuses the load with it), then applied a batch at a time."""
    read: list[CheckedFeed] = []

    def check(config: Config, clock: Clock) -> None:
        read.append(read_feed(args.file, config, clock.now()))

    def refuse(session: Session, _config: Config, _clock: Clock) -> None:
        refuse_bad_lines(session, read[0])

    with wired(args.config, args.db, check=check, refuse=refuse) as wiring:
        report = apply_feed(wiring.engine, read[0], wiring.config, wiring.now(), progress)
    print(f"{report.file}: {report.applied_lots} lots applied ({report.applied_points} points)")
    if report.skipped:
        print(
            f"{report.file}: {len(report.skipped)} lines skipped, their source_ref applied "
            f"before ({report.skipped_points} points)"
        )
        # A feed sent again after a stop skips what it applied: thousands of lines, perhaps.
        for item in report.skipped[:SKIPPED_SHOWN]:
            print(f"  line {item.line}: source_ref {shown(item.source_ref)} applied before")
        if len(report.skipped) > SKIPPED_SHOWN:
            print(f"  and {len(report.skipped) - SKIPPED_SHOWN} more lines")
    return 0


def expire(args: argparse.Namespace) -> int:
    as_of = parse_date(args.as_of, "--as-of")

    def check(_config: Config, clock: Clock) -> None:  # before the config load: refused, no change
        operations.refuse_unbegun(as_of, clock.now())

    with wired(args.config, args.db, check=check) as wiring:
        run = expire_in_batches(wiring.engine, as_of, wiring.moment())
    print(
        f"expiry as of {as_of}: {run.lots} lots booked ({run.points} points) on {run.cards} cards"
    )
    return 0


# Cards booked to a transaction by the expiry job: a serving gateway waits for one such batch
# at most (on SQLite the ledger has one writer; on PostgreSQL the batch holds its cards).
EXPIRY_CARDS = 100


def expire_in_batches(engine: Engine, as_of: date, when: Moment) -> operations.ExpiryRun:
    """`operations.expire`, `EXPIRY_CARDS` cards to a transaction. Stopped midway, the
    batches done stand, and a run again for the date books the rest (each lot's key is its
    own). A run held the whole ledger for its length: with 20,000 lots, a minute and more
    without an answer for any terminal (`96`s, then reversals)."""
    with unit_of_work(engine) as session:
        due = operations.cards_due_for_expiry(session, as_of)
    lots = points = cards = 0
    for start in range(0, len(due), EXPIRY_CARDS):
        batch = due[start : start + EXPIRY_CARDS]
        work = functools.partial(
            operations.expire_cards, card_numbers=batch, as_of=as_of, when=when
        )
        run = in_transaction(engine, work)
        lots, points, cards = lots + run.lots, points + run.points, cards + run.cards
        progress(min(start + EXPIRY_CARDS, len(due)), len(due), what="cards")
    return operations.ExpiryRun(lots, points, cards)


def parse_date(text: str, option: str) -> date:
    """A date YYYY-MM-DD from the command line, or `BadInput` naming the option."""
    if _DATE_RE.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise BadInput(f"{option}: {shown(text)} is not a date YYYY-MM-DD")

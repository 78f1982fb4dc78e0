"""`vipgate points import FILE` and `vipgate points expire --as-of YYYY-MM-DD`.

The billing system's accrual feed comes in as a CSV, all or nothing (see `gateway.imports`);
the expiry job books, once, every lot that expired before a date. Both print what they did
in plain lines and change nothing on bad input (exit 2).
"""

from __future__ import annotations

import argparse
import re
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from gateway.bootstrap import wired, wired_unit
from gateway.clock import Clock
from gateway.commands import progress
from gateway.config import Config
from gateway.errors import BadInput
from gateway.imports import CheckedFeed, apply_feed, read_feed, refuse_bad_lines, shown
from gateway.ledger import operations

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

    with wired_unit(args.config, args.db, check=check) as (wiring, session):
        run = operations.expire(session, as_of, when=wiring.moment())
    print(
        f"expiry as of {as_of}: {run.lots} lots booked ({run.points} points) on {run.cards} cards"
    )
    return 0


def parse_date(text: str, option: str) -> date:
    """A date YYYY-MM-DD from the command line, or `BadInput` naming the option."""
    if _DATE_RE.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise BadInput(f"{option}: {shown(text)} is not a date YYYY-MM-DD")

"""`vipgate cards import|show|enrol|block|unlock|status`: card management from the command line.

Each sub-command opens the ledger through `gateway.bootstrap` and does one thing in the unit
of work that loads the config (`wired_unit`: a refused command leaves the ledger as it was),
then prints it in plain lines; card numbers are masked in everything
it prints. An unknown or malformed card is bad input (exit 2), as is a change to a card the
config lists that the config would undo at its next load.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from cardcodec.cards import card_number_problem, mask_card_number
from gateway.bootstrap import Wiring, wired, wired_unit
from gateway.clock import Clock, card_expired, expiry_last_day, lot_expired
from gateway.commands import progress
from gateway.config import CARD_STATUSES, CardConfig, Config
from gateway.errors import BadInput
from gateway.imports import CardLine, apply_cards, parse_cards
from gateway.ledger import operations
from gateway.ledger.models import Card, CardStatus, LotOrigin, PointLot


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    group = subparsers.add_parser("cards", help="card management")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    parser = actions.add_parser(
        "import",
        parents=[common],
        help="create or update cards from a CSV file: number,expiry,tier,status,enrolled",
    )
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.set_defaults(handler=import_command)
    for name, handler, text in (
        ("show", show, "a card's state, balances and lots"),
        ("enrol", enrol, "enrol a card in the plan (needs more than plan.qualify_points)"),
        ("block", block, "block a card (redemptions get 62)"),
        ("unlock", unlock, "unlock a card's PIN after three wrong tries"),
    ):
        parser = actions.add_parser(name, parents=[common], help=text)
        parser.add_argument("card", metavar="CARD")
        parser.set_defaults(handler=handler)
    parser = actions.add_parser("status", parents=[common], help="set a card's status")
    parser.add_argument("card", metavar="CARD")
    parser.add_argument("status", choices=CARD_STATUSES)
    parser.set_defaults(handler=status)


def import_command(args: argparse.Namespace) -> int:
    """The file read and checked before the config load, then applied a batch at a time."""
    read: list[list[CardLine]] = []

    def check(config: Config, _clock: Clock) -> None:
        read.append(parse_cards(args.file, config))

    with wired(args.config, args.db, check=check) as wiring:
        report = apply_cards(wiring.engine, args.file, read[0], wiring.now(), progress)
    total = report.new_cards + report.updated_cards
    print(
        f"{report.file}: {total} cards imported "
        f"({report.new_cards} new, {report.updated_cards} updated)"
    )
    return 0


def show(args: argparse.Namespace) -> int:
    with wired_unit(args.config, args.db, load=False) as (wiring, session):
        card = known_card(session, wiring.config, args.card)
        lines = describe_card(session, card, wiring)
    for line in lines:
        print(line)
    return 0


def enrol(args: argparse.Namespace) -> int:
    with wired_unit(args.config, args.db, existing=True) as (wiring, session):
        card = known_card(session, wiring.config, args.card)
        qualify = wiring.config.plan.qualify_points
        outcome = operations.enrol(session, card.number, wiring.now(), qualify_points=qualify)
        if outcome is operations.Enrolment.NOT_ENOUGH_POINTS:
            spendable = operations.spendable_points(session, card.number, wiring.now())
            raise BadInput(
                f"{_masked(card.number)}: {spendable} spendable points; enrolment needs more "
                f"than {qualify}"
            )
        # Raised inside the unit of work, so the enrolment just made is rolled back.
        _refuse_config_override(wiring.config, card.number, "enrolled", True)
    if outcome is operations.Enrolment.ALREADY_ENROLLED:
        print(f"{_masked(card.number)}: already enrolled")
    else:
        print(f"{_masked(card.number)}: enrolled")
    return 0


def block(args: argparse.Namespace) -> int:
    return _set_status(args, CardStatus.BLOCKED)


def status(args: argparse.Namespace) -> int:
    return _set_status(args, CardStatus(args.status))


def _set_status(args: argparse.Namespace, new: CardStatus) -> int:
    with wired_unit(args.config, args.db, existing=True) as (wiring, session):
        card = known_card(session, wiring.config, args.card)
        _refuse_config_override(wiring.config, card.number, "status", new.value)
        before = operations.set_status(session, card.number, new)
    if before is new:
        print(f"{_masked(card.number)}: status already {new.value}")
    else:
        print(f"{_masked(card.number)}: status {new.value} (was {before.value})")
    return 0


def unlock(args: argparse.Namespace) -> int:
    with wired_unit(args.config, args.db, existing=True) as (wiring, session):
        card = known_card(session, wiring.config, args.card)
        was_locked, wrong_tries = card.pin_locked, card.wrong_pin_count
        operations.unlock_pin(session, card.number)
    if card.pin_hmac is None:
        print(f"{_masked(card.number)}: needs no PIN; nothing to unlock")
    elif was_locked:
        print(f"{_masked(card.number)}: PIN unlocked (locked after {wrong_tries} wrong tries)")
    else:
        print(f"{_masked(card.number)}: PIN was not locked; wrong tries reset from {wrong_tries}")
    return 0


# --- shared by the sub-commands ----------------------------------------------------------------


def known_card(session: Session, config: Config, text: str) -> Card:
    """The card a person named, or `BadInput` (a malformed number, or one the ledger lacks)."""
    problem = card_number_problem(text, config.issuer.card_prefixes)
    if problem is not None:
        raise BadInput(f"{_masked(text)}: {problem}")
    card = operations.find_card(session, text)
    if card is None:
        raise BadInput(f"{_masked(text)}: unknown card")
    return card


def _refuse_config_override(config: Config, number: str, field: str, value: object) -> None:
    """A card the config lists is set back to the config's values at every load (every
    command loads it first), so a change the config contradicts is refused, not undone later."""
    listed: CardConfig | None = next((c for c in config.cards if c.number == number), None)
    if listed is None or getattr(listed, field) == value:
        return
    said = str(getattr(listed, field)).lower()
    raise BadInput(
        f"{_masked(number)} is listed in {config.path} with {field} = {said}, which every "
        f"command loads again: change it there"
    )


def describe_card(session: Session, card: Card, wiring: Wiring) -> list[str]:
    """The lines `vipgate cards show` prints for a card."""
    now = wiring.now()
    local = now.astimezone(wiring.config.gateway.timezone)
    balances = operations.balances(session, card.number, now)
    expired = " (expired)" if card_expired(card.expiry_yymm, local) else ""
    lines = [
        _masked(card.number),
        f"  tier: {card.tier}",
        f"  status: {card.status.value}",
        f"  enrolled: {_enrolment(card, wiring)}",
        f"  PIN: {_pin(card)}",
        f"  expiry: {card.expiry_yymm}, good through {expiry_last_day(card.expiry_yymm)}{expired}",
        f"  ledger balance: {balances.ledger_points} points",
        f"  spendable balance: {balances.spendable_points} points",
    ]
    lots = operations.card_lots(session, card.number)
    lines.append(f"  lots ({len(lots)}, in spending order):" if lots else "  lots: none")
    lines.extend(f"    {_lot(lot, local)}" for lot in lots)
    return lines


def _enrolment(card: Card, wiring: Wiring) -> str:
    if not card.enrolled:
        return "no"
    if card.enrolled_at is None:
        return "yes"
    since: datetime = card.enrolled_at.astimezone(wiring.config.gateway.timezone)
    return f"yes, since {since:%Y-%m-%d %H:%M}"


def _pin(card: Card) -> str:
    if card.pin_hmac is None:
        return "not required"
    if card.pin_locked:
        return f"required, locked ({card.wrong_pin_count} wrong tries in a row)"
    tries = card.wrong_pin_count
    return f"required, not locked ({tries} wrong {'try' if tries == 1 else 'tries'} in a row)"


def _lot(lot: PointLot, local: datetime) -> str:
    kind = "returned points" if lot.origin is LotOrigin.RESTORE else "earned"
    state = ""
    if lot.remaining_points and lot_expired(lot.expires_on, local):
        state = " (expired, not yet booked)"
    return (
        f"{kind} {lot.earned_on}, expires {lot.expires_on}, "
        f"remaining {lot.remaining_points} of {lot.original_points}{state}"
    )


def _masked(number: str) -> str:
    return f"card {mask_card_number(number)}"

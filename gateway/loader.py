"""Loading a validated config into the ledger: an upsert by id that never deletes anything.

Every command loads the config before it runs, so loading must be safe to repeat: the same
config adds nothing the second time. Only `serve` and `ledger load` change the two switches
(a merchant's `active`, a terminal's `enabled`) of rows the ledger has (`switches`).
Merchants (with their rules), terminals (the TMK sealed by the security module) and demo
cards are created or updated in place; every change of a merchant's `active` or a
terminal's `enabled` goes into its history through the ledger's records API (clearing
charges terminal fees from it). A demo card's config lots are accrued through the journal
once each, as `config:<card number>:<index>`; a balance is never set. A lot whose figures
changed after it was accrued is refused before anything is written: the journal is never
edited, so a correction has to come as a new accrual.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, time
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session

from cardcodec.cards import mask_card_number
from gateway.clock import business_date
from gateway.config import CardConfig, Config, MerchantConfig, TerminalConfig
from gateway.errors import BadInput
from gateway.ledger import Moment, operations, records
from gateway.ledger.models import (
    Card,
    CardStatus,
    KeyCheck,
    KeySuite,
    LotOrigin,
    Merchant,
    PointLot,
    Terminal,
    TerminalSession,
)
from gateway.rules import DAY_NAMES, END_OF_DAY, Rule
from gateway.security import SecurityModule, SecurityModuleError

CONFIG_REF_PREFIX = "config:"


@dataclass(frozen=True)
class LoadReport:
    """What one load did: how many entries the config holds, and each change it made."""

    merchants: int
    terminals: int
    cards: int
    lots_accrued: int
    points_accrued: int
    changes: tuple[str, ...]
    notes: tuple[str, ...] = ()  # what the operator should know, though nothing changed

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def summary(self) -> str:
        """One plain line: the entries loaded and what changed."""
        loaded = (
            f"{self.merchants} merchants, {self.terminals} terminals, {self.cards} cards; "
            f"{self.lots_accrued} lots accrued ({self.points_accrued} points)"
        )
        return f"{loaded}; {len(self.changes)} changes" if self.changes else f"{loaded}; no change"


def moment_at(config: Config, now: datetime) -> Moment:
    """An instant with its business date under the config's time zone and cut-off."""
    local = now.astimezone(config.gateway.timezone)
    return Moment(now, business_date(local, config.gateway.cutoff))


def config_lot_ref(card_number: str, index: int) -> str:
    """The source_ref of a config lot: `config:<card number>:<index>` (index from 0)."""
    return f"{CONFIG_REF_PREFIX}{card_number}:{index}"


def load_into_ledger(
    session: Session,
    config: Config,
    security: SecurityModule,
    now: datetime,
    *,
    switches: bool = True,
) -> LoadReport:
    """Upsert the config's merchants, terminals and cards and accrue new config lots; TMKs
    are sealed and PIN references made by `security`.

    Without `switches`, a merchant's `active` and a terminal's `enabled` are set only for one
    the ledger does not have yet; one it has keeps the ledger's value, and where the config
    says otherwise a line says so (`KEPT_SWITCH`). Every serving gateway follows the two
    switches from the ledger within seconds (`gateway.follow`), so only `serve` and `vipgate
    ledger load` change them: a card or points command run with an older config file must
    not switch a terminal that was disabled (a stolen one) back on for every gateway.

    Runs in the caller's unit of work and raises `BadInput` before writing anything when a
    config lot differs from the lot accrued for it earlier, so a refused load changes nothing.
    """
    _refuse_changed_lots(session, config, now.astimezone(config.gateway.timezone).date())
    _refuse_another_pin_key(session, config, security)
    _refuse_another_master_key(session, config, security)
    changes: list[str] = []
    kept: list[str] = []
    for listed in config.merchants:
        merchant = listed if switches else _switch_kept(session, Merchant, listed, "active", kept)
        changes.extend(_load_merchant(session, merchant, now))
    for entry in config.terminals:
        terminal = entry if switches else _switch_kept(session, Terminal, entry, "enabled", kept)
        changes.extend(_load_terminal(session, terminal, security, now))
    when = moment_at(config, now)
    lots = points = 0
    for card in config.cards:
        changes.extend(_load_card(session, card, security, now))
        for index, accrued in _accrue_lots(session, card, when, config.plan.expiry_years):
            lots, points = lots + 1, points + accrued
            changes.append(f"{_card(card.number)}: lot {index} accrued, {accrued} points")
    return LoadReport(
        merchants=len(config.merchants),
        terminals=len(config.terminals),
        cards=len(config.cards),
        lots_accrued=lots,
        points_accrued=points,
        changes=tuple(changes),
        notes=tuple(kept + _unlisted(session, config)),
    )


# What a load without `switches` says of a switch the config would have changed.
KEPT_SWITCH = "{what}: {switch} stays {value} as the ledger has it (the config says {other});"
KEPT_SWITCH += " only `vipgate ledger load` or `vipgate serve` with this config changes it"


_Switched = TypeVar("_Switched", MerchantConfig, TerminalConfig)


def _switch_kept(
    session: Session,
    model: type[Merchant | Terminal],
    listed: _Switched,
    switch: str,
    kept: list[str],
) -> _Switched:
    """`listed` with its switch as the ledger's row has it (the config's for a new one); a
    line in `kept` when the two differ."""
    row = session.get(model, listed.id)
    if row is None:
        return listed
    value: bool = getattr(row, switch)
    if value != getattr(listed, switch):
        what = f"{'merchant' if model is Merchant else 'terminal'} {listed.id}"
        kept.append(
            KEPT_SWITCH.format(
                what=what, switch=switch, value=str(value).lower(), other=str(not value).lower()
            )
        )
    return replace(listed, **{switch: value})  # type: ignore[arg-type]


# --- refusals before any write ---------------------------------------------------------------


def refuse_lots_after_today(config: Config, now: datetime) -> None:
    """`BadInput` naming each config lot earned after today, for a ledger about to be made:
    refused before the ledger file is made, the load leaves nothing behind. (On a ledger
    that exists, `load_into_ledger` refuses only the lots it has not accrued yet.)"""
    today = now.astimezone(config.gateway.timezone).date()
    future = [
        _after_today(card_index, card.number, index, lot.earned_on, today)
        for card_index, card in enumerate(config.cards)
        for index, lot in enumerate(card.lots)
        if lot.earned_on > today
    ]
    if future:
        raise BadInput(f"{config.path}: " + "; ".join(future))


def _lot_place(card_index: int, card_number: str, index: int) -> str:
    return f"cards[{card_index}] ({mask_card_number(card_number)}).lots[{index}]"


def _after_today(card_index: int, card_number: str, index: int, earned: date, today: date) -> str:
    place = _lot_place(card_index, card_number, index)
    return f"{place}.earned_on: {earned} is after today ({today})"


def _refuse_changed_lots(session: Session, config: Config, today: date) -> None:
    """Every config lot accrued before must still say what it said then, and one to accrue
    now must not be earned after today (as in the accrual feed); name each that not."""
    problems, future = [], []
    for card_index, card in enumerate(config.cards):
        accrued = _accrued_config_lots(session, card.number)
        for index, lot in enumerate(card.lots):
            place = _lot_place(card_index, card.number, index)
            before = accrued.get(config_lot_ref(card.number, index))
            if before is None:
                if lot.earned_on > today:
                    future.append(
                        _after_today(card_index, card.number, index, lot.earned_on, today)
                    )
                continue
            if (before.original_points, before.earned_on) == (lot.points, lot.earned_on):
                continue
            problems.append(
                f"{place}: accrued as {before.original_points} points earned {before.earned_on},"
                f" now {lot.points} points earned {lot.earned_on}"
            )
    if problems:
        raise BadInput(
            f"{config.path}: "
            + "; ".join(problems)
            + " (an accrued lot is never changed: correct it with an accrual)"
        )
    if future:
        raise BadInput(f"{config.path}: " + "; ".join(future))


def _accrued_config_lots(session: Session, card_number: str) -> dict[str, PointLot]:
    prefix = config_lot_ref(card_number, 0)[:-1]
    return {
        lot.source_ref: lot
        for lot in operations.card_lots(session, card_number)
        if lot.origin is LotOrigin.ACCRUAL and lot.source_ref.startswith(prefix)
    }


# --- merchants and terminals -----------------------------------------------------------------


def _load_merchant(session: Session, merchant: MerchantConfig, now: datetime) -> list[str]:
    details = records.MerchantDetails(
        id=merchant.id,
        name=merchant.name,
        active=merchant.active,
        fee_bp=merchant.fee_bp,
        bank_card_fee_bp=merchant.bank_card_fee_bp,
        allow_partial=merchant.allow_partial,
        refund_window_days=merchant.refund_window_days,
        max_amount_fen=merchant.max_amount_fen,
        rules=[rule_to_json(rule) for rule in merchant.rules],
    )
    existing = session.get(Merchant, merchant.id)
    fields = {name: getattr(details, name) for name in _MERCHANT_FIELDS}
    before = None if existing is None else {name: getattr(existing, name) for name in fields}
    records.upsert_merchant(session, details, now)
    return _describe(f"merchant {merchant.id}", before, fields)


_MERCHANT_FIELDS = (
    "name",
    "active",
    "fee_bp",
    "bank_card_fee_bp",
    "allow_partial",
    "refund_window_days",
    "max_amount_fen",
    "rules",
)


def _load_terminal(
    session: Session, terminal: TerminalConfig, security: SecurityModule, now: datetime
) -> list[str]:
    existing = session.get(Terminal, terminal.id)
    encrypted, tmk_note = _sealed_tmk(existing, terminal, security)
    details = records.TerminalDetails(
        id=terminal.id,
        merchant_id=terminal.merchant,
        enabled=terminal.enabled,
        suite=KeySuite(terminal.suite.value),
        tmk_encrypted=encrypted,
    )
    fields: dict[str, object] = {
        "merchant": terminal.merchant,
        "enabled": terminal.enabled,
        "suite": terminal.suite.value,
    }
    before: dict[str, object] | None = None
    if existing is not None:
        before = {
            "merchant": existing.merchant_id,
            "enabled": existing.enabled,
            "suite": existing.suite.value,
        }
    records.upsert_terminal(session, details, now)
    changes = _describe(f"terminal {terminal.id}", before, fields)
    if tmk_note:
        changes.append(f"terminal {terminal.id}: {tmk_note}")
    suite_changed = before is not None and before["suite"] != fields["suite"]
    if tmk_note or suite_changed:
        changes += _end_session(session, terminal.id)
    return changes


def _unlisted(session: Session, config: Config) -> list[str]:
    """A line for each terminal the ledger has enabled and the config does not list. A load
    is an upsert by id (operations.md) and leaves it as it is, so its terminal fee is still
    paid (§5: enabled terminals), though a gateway on this config answers it `97`: the line
    says so, and that `enabled = false` in the config stops it."""
    listed = {terminal.id for terminal in config.terminals}
    enabled = session.scalars(
        select(Terminal.id).where(Terminal.enabled.is_(True)).order_by(Terminal.id)
    )
    return [
        f"terminal {terminal_id}: enabled in the ledger but not in the config; its terminal"
        " fee is still paid: list it with enabled = false to stop it"
        for terminal_id in enabled
        if terminal_id not in listed
    ]


def _end_session(session: Session, terminal_id: str) -> list[str]:
    """A terminal whose TMK or suite changed is signed off: its working keys came under the
    old TMK (one that may have leaked, the usual reason to change it) or are of the old
    suite. Every process sees the row gone at its next group, so the terminal is told to
    sign on again (`A0`), and gets keys under the new TMK."""
    ended = session.execute(
        delete(TerminalSession).where(TerminalSession.terminal_id == terminal_id)
    )
    if not cast(CursorResult[Any], ended).rowcount:
        return []
    return [
        f"terminal {terminal_id}: signed off (its working keys came under the old TMK or suite)"
    ]


# The check value of the PIN key: the reference of a PIN for a number no card has (no issuer
# prefix is all zeros). An HMAC of a known message, so it tells nothing of the key.
PIN_KEY_CHECK = ("0" * 19, "0000")


def _refuse_another_pin_key(session: Session, config: Config, security: SecurityModule) -> None:
    """`BadInput`, before anything is written, when this process's PIN key is not the one the
    ledger's PIN references were made with (migration 0008): its load would rewrite every
    card's reference, reset every card's wrong tries, and the instances with the right key
    would then refuse every right PIN. The first load stores the check value."""
    value = security.pin_reference(*PIN_KEY_CHECK)
    stored = session.get(KeyCheck, "pin key")
    if stored is None:
        session.add(KeyCheck(name="pin key", value=value))
        return
    if not hmac.compare_digest(stored.value, value):
        raise BadInput(
            f"PIN key {config.issuer.master_key}.pin: not the PIN key this ledger's PIN"
            " references were made with (another master key, or a PIN key file made anew):"
            " give this host the master key and PIN key files of the instances that serve"
            " this ledger (docs/deployment.md)"
        )


# The master key's check: a known key sealed as the TMK of an id no terminal has (terminal
# ids are 8 characters). Sealed, it tells nothing of the master key; `keys rotate-master`
# seals it again with the TMKs (`gateway.rotation`).
MASTER_KEY_CHECK_ID = "master key check"
MASTER_KEY_CHECK_TMK = bytes(range(16))


def master_key_opens(session: Session, security: SecurityModule) -> bool | None:
    """Whether this process's master key opens the ledger's master key check; None when the
    ledger has none yet."""
    stored = session.get(KeyCheck, "master key")
    if stored is None:
        return None
    try:
        return security.tmk_matches(MASTER_KEY_CHECK_ID, stored.value, MASTER_KEY_CHECK_TMK)
    except SecurityModuleError:
        return False


def _refuse_another_master_key(session: Session, config: Config, security: SecurityModule) -> None:
    """`BadInput`, before anything is written, when this process's master key is not the one
    the ledger's TMKs are sealed under: its load would seal every TMK anew under its own key,
    and the instances with the right one could then sign no terminal on. That happens to a
    host still holding the key from before a `keys rotate-master` made on another, even with
    the PIN key it had then (a rotation keeps the PIN key and seals it anew).

    The first load after the check came in (migration 0008's table) stores it, unless the
    ledger already has terminals and not one of their TMKs opens under this key."""
    opens = master_key_opens(session, security)
    if opens is None:
        terminals = list(session.scalars(select(Terminal)))
        if terminals and not any(_opens(security, terminal) for terminal in terminals):
            opens = False
        else:
            check = security.seal_tmk(MASTER_KEY_CHECK_ID, MASTER_KEY_CHECK_TMK)
            session.add(KeyCheck(name="master key", value=check))
            return
    if not opens:
        raise BadInput(
            f"master key {config.issuer.master_key}: not the master key this ledger's terminal"
            " master keys are sealed under (a key from before a rotation, or one made anew):"
            " give this host the master key and PIN key files of the instances that serve"
            " this ledger (docs/deployment.md)"
        )


def _opens(security: SecurityModule, terminal: Terminal) -> bool:
    try:
        security.tmk_matches(terminal.id, terminal.tmk_encrypted, bytes(16))
    except SecurityModuleError:
        return False
    return True


def _sealed_tmk(
    existing: Terminal | None, terminal: TerminalConfig, security: SecurityModule
) -> tuple[bytes, str | None]:
    """The stored TMK blob when it still holds the config's TMK, else a new one and why.

    Sealing uses a fresh nonce each time, so sealing an unchanged key again on every load
    would rewrite the row for nothing.
    """
    if existing is None:
        return security.seal_tmk(terminal.id, terminal.tmk), None
    try:
        unchanged = security.tmk_matches(terminal.id, existing.tmk_encrypted, terminal.tmk)
    except SecurityModuleError:
        # The master key is the ledger's (`_refuse_another_master_key`): this row's blob is
        # damaged, and the config's key replaces it.
        note = "TMK encrypted again (the stored one did not open: a damaged row)"
        return security.seal_tmk(terminal.id, terminal.tmk), note
    if unchanged:
        return existing.tmk_encrypted, None
    return security.seal_tmk(terminal.id, terminal.tmk), "TMK changed"


# --- cards and their lots --------------------------------------------------------------------


def _load_card(
    session: Session, card: CardConfig, security: SecurityModule, now: datetime
) -> list[str]:
    pin_hmac = None if card.pin is None else security.pin_reference(card.number, card.pin)
    details = operations.CardDetails(
        number=card.number,
        expiry_yymm=card.expiry_yymm,
        tier=card.tier,
        status=CardStatus(card.status),
        enrolled=card.enrolled,
        pin_hmac=pin_hmac,
    )
    existing = operations.find_card(session, card.number)
    before = None if existing is None else _card_fields(existing)
    after = {
        "expiry": card.expiry_yymm,
        "tier": card.tier,
        "status": card.status,
        "enrolled": card.enrolled,
    }
    operations.upsert_card(session, details, now)
    changes = _describe(_card(card.number), before, after)
    if existing is not None and before is not None and before["pin_hmac"] != pin_hmac:
        changes.append(f"{_card(card.number)}: {_pin_change(before['pin_hmac'], pin_hmac)}")
    return changes


def _card_fields(card: Card) -> dict[str, Any]:
    return {
        "expiry": card.expiry_yymm,
        "tier": card.tier,
        "status": card.status.value,
        "enrolled": card.enrolled,
        "pin_hmac": card.pin_hmac,
    }


def _pin_change(before: object, after: bytes | None) -> str:
    if after is None:
        return "PIN removed"
    if before is None:
        return "PIN set"
    return "PIN changed (PIN unlocked, wrong tries reset)"


def _accrue_lots(
    session: Session, card: CardConfig, when: Moment, expiry_years: int
) -> Iterable[tuple[int, int]]:
    """Accrue the card's config lots not accrued before; yields (index, points) of each new one."""
    for index, lot in enumerate(card.lots):
        outcome = operations.accrue(
            session,
            card.number,
            lot.earned_on,
            lot.points,
            config_lot_ref(card.number, index),
            when=when,
            expiry_years=expiry_years,
        )
        if isinstance(outcome, operations.Accrued):
            yield index, lot.points


# --- describing changes ----------------------------------------------------------------------


def _card(number: str) -> str:
    return f"card {mask_card_number(number)}"


def _describe(
    subject: str, before: Mapping[str, object] | None, after: Mapping[str, object]
) -> list[str]:
    """Plain lines for what an upsert changed: `new`, or `field old -> new` per field."""
    if before is None:
        return [f"{subject}: new"]
    lines = []
    for name, value in after.items():
        old = before[name]
        if old == value:
            continue
        if isinstance(value, list):
            lines.append(f"{subject}: {name} changed")
        else:
            lines.append(f"{subject}: {name} {_plain(old)} -> {_plain(value)}")
    return lines


def _plain(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- merchant rules as stored JSON -----------------------------------------------------------


def rule_to_json(rule: Rule) -> dict[str, Any]:
    """A rule in the words of the config file, for the merchants.rules JSON column."""
    data: dict[str, Any] = {"id": rule.id, "discount_bp": rule.discount_bp}
    if rule.tiers is not None:
        data["tiers"] = sorted(rule.tiers)
    if rule.days is not None:
        data["days"] = [DAY_NAMES[day] for day in sorted(rule.days)]
    if rule.hours is not None:
        start, end = rule.hours
        data["hours"] = f"{start:%H:%M}-" + ("24:00" if end == END_OF_DAY else f"{end:%H:%M}")
    if rule.valid_from is not None:
        data["valid_from"] = rule.valid_from.isoformat()
    if rule.valid_to is not None:
        data["valid_to"] = rule.valid_to.isoformat()
    data["min_amount_fen"] = rule.min_amount_fen
    return data


def rule_from_json(data: Mapping[str, Any]) -> Rule:
    """The rule `rule_to_json` stored."""
    tiers = data.get("tiers")
    days = data.get("days")
    hours = data.get("hours")
    valid_from = data.get("valid_from")
    valid_to = data.get("valid_to")
    return Rule(
        id=data["id"],
        discount_bp=data["discount_bp"],
        tiers=None if tiers is None else frozenset(tiers),
        days=None if days is None else frozenset(DAY_NAMES.index(day) for day in days),
        hours=None if hours is None else _hours(hours),
        valid_from=None if valid_from is None else date.fromisoformat(valid_from),
        valid_to=None if valid_to is None else date.fromisoformat(valid_to),
        min_amount_fen=data.get("min_amount_fen", 0),
    )


def _hours(text: str) -> tuple[time, time]:
    start, end = text.split("-")
    return time.fromisoformat(start), END_OF_DAY if end == "24:00" else time.fromisoformat(end)

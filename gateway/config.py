"""The gateway's TOML configuration (operations.md, Configuration), parsed and validated.

A config decides fees, discounts and keys, so a mistake in it costs money: every value is
checked here, once, before anything else sees it, and a bad one is refused with a one-line
`BadInput` that names the file and the place (`merchants[0] (898310048990001).rules[1]
(diamond-weekend).discount_bp`). Unknown keys are refused too, so a typo never silently falls
back to a default. Messages never repeat a terminal key, a PIN or a full card number.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cardcodec.cards import card_number_problem, mask_card_number, mask_quoted_value
from cardcodec.crypto import Suite, halves_differ
from gateway.clock import expiry_last_day
from gateway.errors import BadInput
from gateway.points import MAX_CARD_POINTS
from gateway.rules import DAY_NAMES, END_OF_DAY, MAX_DISCOUNT_BP, TIERS, Rule

CARD_STATUSES = ("active", "lost", "stolen", "blocked", "closed")
MERCHANT_ID_LENGTH = 15
INSTITUTION_ID_LENGTH = 15
TERMINAL_ID_LENGTH = 8
SCHEME_TIMEZONE = "Asia/Shanghai"
MAX_AMOUNT_FEN = 999_999_999_999  # field 4 is n12
MAX_POINTS = MAX_CARD_POINTS
BP_WHOLE = 10000
# The settlement file's merchant record carries the merchant's fee rate in 4 digits
# (points-and-clearing.md §6, positions 97-100): a rate of 100% cannot be settled.
MAX_FEE_BP = BP_WHOLE - 1
TMK_HEX_DIGITS = 32

_HH_MM = r"([01][0-9]|2[0-3]):([0-5][0-9])"
_TIME_RE = re.compile(_HH_MM)
_HOURS_RE = re.compile(f"{_HH_MM}-(?:{_HH_MM}|(24):(00))")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_LISTEN_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):([0-9]{1,5})")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_SQLITE_RE = re.compile(r"(sqlite(\+\w+)?:///)(.*)")
# The merchants.name column: a longer name is refused with the config, before any ledger is
# opened (or made).
MERCHANT_NAME_MAX_CHARS = 200
_RULE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,31}")
_TOML_TYPES = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    dict: "table",
    datetime: "date-time",
    date: "date",
    time: "time",
}
_MISSING: Any = object()
_SHOWN_CHARS = 40

# --- the settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewaySettings:
    """The `[gateway]` section: how the server listens, stores and keeps time."""

    listen: tuple[str, int]
    database: str
    timezone: ZoneInfo
    cutoff: time
    key_lifetime_h: int
    acquirer_institution: str
    idle_timeout_s: int
    max_pending_per_connection: int
    # Rehearsals only: a key lifetime in seconds that replaces key_lifetime_h, so that a
    # scenario can wait past it (operations.md lets the config grow; this key is optional).
    key_lifetime_s: int | None = None
    # Against hostile peers (docs/reliability.md, Hostile input): one more connection from an
    # address that has this many open is closed at once; a terminal sending more frames a
    # second than this (a token bucket per terminal and address) has its connection closed.
    max_connections_per_address: int = 64
    max_frames_per_second_per_terminal: int = 50
    # The frames a second an address's links may send before an answer names their terminal,
    # together; behind a load balancer every terminal's new links come from its one address.
    # Unset: the per-terminal bound, as before the key existed.
    max_unnamed_frames_per_second_per_address: int | None = None

    @property
    def max_unnamed_frames_per_second(self) -> int:
        unnamed = self.max_unnamed_frames_per_second_per_address
        return self.max_frames_per_second_per_terminal if unnamed is None else unnamed

    @property
    def key_lifetime(self) -> timedelta:
        if self.key_lifetime_s is not None:
            return timedelta(seconds=self.key_lifetime_s)
        return timedelta(hours=self.key_lifetime_h)


@dataclass(frozen=True)
class IssuerSettings:
    """The `[issuer]` section: who issues the cards and where its keys live."""

    id: str
    card_prefixes: tuple[str, ...]
    signing_key: Path
    master_key: Path


@dataclass(frozen=True)
class PlanSettings:
    """The `[plan]` section: enrolment, lot expiry and the daily points limit (0: none)."""

    qualify_points: int
    expiry_years: int
    max_points_per_card_day: int


@dataclass(frozen=True)
class ClearingSettings:
    """The `[clearing]` section: the receiver of the settlement file and the terminal fee."""

    acquirer_id: str
    terminal_fee_fen_per_month: int


@dataclass(frozen=True)
class MerchantConfig:
    """One `[[merchants]]` entry with its discount rules."""

    id: str
    name: str
    active: bool
    fee_bp: int
    bank_card_fee_bp: int
    allow_partial: bool
    refund_window_days: int
    max_amount_fen: int
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class TerminalConfig:
    """One `[[terminals]]` entry; the terminal master key stays out of the repr."""

    id: str
    merchant: str
    enabled: bool
    suite: Suite
    tmk: bytes = field(repr=False)


@dataclass(frozen=True)
class ConfigLot:
    """A lot of points a demo card is given once through the journal."""

    points: int
    earned_on: date


@dataclass(frozen=True, repr=False)
class CardConfig:
    """One `[[cards]]` entry, for demos and tests; the repr masks the number and hides the PIN."""

    number: str
    expiry_yymm: str
    tier: str
    status: str
    enrolled: bool
    pin: str | None
    lots: tuple[ConfigLot, ...]

    def __repr__(self) -> str:
        pin = "None" if self.pin is None else "'<hidden>'"
        return (
            f"CardConfig(number={mask_card_number(self.number)!r}, "
            f"expiry_yymm={self.expiry_yymm!r}, tier={self.tier!r}, status={self.status!r}, "
            f"enrolled={self.enrolled!r}, pin={pin}, lots={self.lots!r})"
        )


@dataclass(frozen=True)
class Config:
    """A whole validated config file."""

    path: Path
    gateway: GatewaySettings
    issuer: IssuerSettings
    plan: PlanSettings
    clearing: ClearingSettings
    merchants: tuple[MerchantConfig, ...]
    terminals: tuple[TerminalConfig, ...]
    cards: tuple[CardConfig, ...]


# --- reading one table with the place it came from -----------------------------------------


def _show(value: object) -> str:
    """A value as a message may show it: TOML-like, one line, cut short, a card number (a
    value put under the wrong key) masked: runs of 16 or more digits, so that a 15-digit
    merchant or institution id stays as it is; anything that looks like a key hidden."""
    if isinstance(value, str | bool):
        shown = mask_quoted_value(json.dumps(value), shortest=16)
    elif isinstance(value, int | date | time):
        shown = mask_quoted_value(str(value), shortest=16)
    else:
        return _type_name(value)
    return shown if len(shown) <= _SHOWN_CHARS else shown[: _SHOWN_CHARS - 4] + '..."'


def _type_name(value: object) -> str:
    """The TOML type of a value with its article: "an integer", "a string"."""
    name = type(value).__name__
    for python_type, toml_name in _TOML_TYPES.items():
        if isinstance(value, python_type):
            name = toml_name
            break
    return _with_article(name)


def _with_article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


class _Table:
    """One TOML table and its place in the file, with getters that name the place on failure."""

    def __init__(self, file: str, place: str, data: object, known: Iterable[str]) -> None:
        self.file = file
        self.place = place
        if not isinstance(data, dict):
            self.fail_here(f"must be a table, not {_type_name(data)}")
        self.data: dict[str, Any] = data
        allowed = frozenset(known)
        for key in data:
            if key not in allowed:
                self.fail_here(f"unknown key {_show(key)}")

    def where(self, key: str) -> str:
        return f"{self.place}.{key}" if self.place else key

    def fail_here(self, problem: str) -> NoReturn:
        prefix = f"{self.place}: " if self.place else ""
        raise BadInput(f"{self.file}: {prefix}{problem}")

    def fail(self, key: str, problem: str) -> NoReturn:
        raise BadInput(f"{self.file}: {self.where(key)}: {problem}")

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            self.fail(key, "missing (required)")
        return default

    def typed(self, key: str, kind: type[Any], default: Any = _MISSING) -> Any:
        """The value under key, which must be of the TOML type `kind` (bool is no integer)."""
        if key not in self.data and default is not _MISSING:
            return default
        value = self.raw(key)
        wrong = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if wrong or (kind is date and isinstance(value, datetime)):
            self.fail(key, f"must be {_with_article(_TOML_TYPES[kind])}, not {_type_name(value)}")
        return value

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self.typed(key, str, default)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        return self.typed(key, bool, default)

    def integer(
        self, key: str, default: Any = _MISSING, *, low: int = 0, high: int | None = None
    ) -> Any:
        value = self.typed(key, int, default)
        if value is None:
            return value
        if high is not None and not low <= value <= high:
            self.fail(key, f"{_show(value)} is outside {low}-{high}")
        if value < low:
            self.fail(key, f"{_show(value)} is below the minimum {low}")
        return value

    def strings(self, key: str) -> list[str] | None:
        """An optional non-empty array of strings; missing gives None."""
        values = self.typed(key, list, None)
        if values is None:
            return None
        if not values:
            self.fail(key, "is empty (leave the key out instead)")
        for index, value in enumerate(values):
            if not isinstance(value, str):
                self.fail(key, f"item {index} must be a string, not {_type_name(value)}")
        return list(values)

    def table(self, key: str, known: Iterable[str], *, required: bool = True) -> _Table:
        data = self.raw(key, _MISSING if required else {})
        return _Table(self.file, self.where(key), data, known)

    def tables(
        self, key: str, known: Iterable[str], *, label_key: str | None = "id"
    ) -> list[_Table]:
        """An optional array of tables, each placed as `key[i] (label)`.

        The label is the entry's id, or for cards its masked number, when it is a short
        printable string; otherwise the index alone places the entry.
        """
        items = self.typed(key, list, [])
        result = []
        for index, item in enumerate(items):
            label = None
            if label_key is not None and isinstance(item, dict):
                label = _label(item.get(label_key), label_key)
            place = f"{self.where(key)}[{index}]" + (f" ({label})" if label else "")
            result.append(_Table(self.file, place, item, known))
        return result


def _label(value: Any, label_key: str) -> str | None:
    if not isinstance(value, str) or not value.isprintable():
        return None
    if not 0 < len(value) <= _SHOWN_CHARS:
        return None
    if label_key == "number":
        return mask_card_number(value)
    return mask_quoted_value(value, shortest=16)  # a card number or key put in the id


# --- single values -------------------------------------------------------------------------


def _fixed_id(table: _Table, key: str, length: int) -> str:
    value: str = table.string(key)
    if len(value) != length or not (value.isascii() and value.isalnum()):
        table.fail(key, f"{_show(value)} must be {length} letters or digits")
    return value


def _choice(table: _Table, key: str, choices: Iterable[str], default: Any = _MISSING) -> str:
    value: str = table.string(key, default)
    allowed = tuple(choices)
    if value not in allowed:
        table.fail(key, f"{_show(value)} is not one of {', '.join(allowed)}")
    return value


def _parse_hh_mm(match: re.Match[str], first_group: int) -> time:
    return time(int(match[first_group]), int(match[first_group + 1]))


def _clock_time(table: _Table, key: str, default: str) -> time:
    text: str = table.string(key, default)
    match = _TIME_RE.fullmatch(text)
    if match is None:
        table.fail(key, f"{_show(text)} is not a time HH:MM")
    return _parse_hh_mm(match, 1)


def _hours(table: _Table, key: str) -> tuple[time, time] | None:
    text: str | None = table.string(key, None)
    if text is None:
        return None
    match = _HOURS_RE.fullmatch(text)
    if match is None:
        table.fail(key, f"{_show(text)} is not HH:MM-HH:MM (an end of 24:00 is midnight)")
    start = _parse_hh_mm(match, 1)
    end = END_OF_DAY if match[5] else _parse_hh_mm(match, 3)
    if not start < end:
        table.fail(key, f"{_show(text)} does not start before it ends (never across midnight)")
    return start, end


def _date(table: _Table, key: str, default: Any = _MISSING) -> Any:
    """A TOML local date or a "YYYY-MM-DD" string."""
    value = table.raw(key, default)
    if value is None or (isinstance(value, date) and not isinstance(value, datetime)):
        return value
    if isinstance(value, str) and _DATE_RE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    table.fail(key, f"{_show(value)} is not a date YYYY-MM-DD")


def _hex_key(table: _Table, key: str) -> bytes:
    """A key of 32 hex digits; the messages never show it."""
    value = table.raw(key)
    if not isinstance(value, str):
        table.fail(key, f"must be a string of {TMK_HEX_DIGITS} hex digits")
    if len(value) != TMK_HEX_DIGITS or not re.fullmatch(r"[0-9A-Fa-f]+", value):
        table.fail(key, f"must be {TMK_HEX_DIGITS} hex digits")
    return bytes.fromhex(value)


# --- [gateway], [issuer], [plan], [clearing] ------------------------------------------------


def _listen(table: _Table) -> tuple[str, int]:
    text: str = table.string("listen", "127.0.0.1:8583")
    match = _LISTEN_RE.fullmatch(text)
    if match is None or int(match[2]) > 65535:
        table.fail("listen", f"{_show(text)} is not HOST:PORT (port 0-65535)")
    return match[1].strip("[]"), int(match[2])


def resolve_database(url: str, folder: Path) -> str:
    """A SQLite URL with a relative path made absolute against `folder`; others unchanged."""
    match = _SQLITE_RE.fullmatch(url)
    if match is None:
        return url
    path, sep, query = match[3].partition("?")
    if path in ("", ":memory:") or path.startswith("/"):
        return url
    return f"{match[1]}{folder / path}{sep}{query}"


def _database(table: _Table, folder: Path) -> str:
    # The URL may hold a password, so the message does not repeat it.
    url: str = table.string("database", "sqlite:///var/vipgate.db")
    if not _URL_RE.match(url):
        table.fail("database", "is not a database URL such as sqlite:///var/vipgate.db")
    return resolve_database(url, folder)


def _timezone(table: _Table) -> ZoneInfo:
    """The gateway's clock, which the scheme fixes (points-and-clearing §4: lot and card
    expiry, business dates, the settlement file's times): the key may only say so."""
    name: str = table.string("timezone", SCHEME_TIMEZONE)
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        table.fail("timezone", f"{_show(name)} is not a known time zone")
    if name != SCHEME_TIMEZONE:
        table.fail("timezone", f"{_show(name)}: the scheme's clock is {SCHEME_TIMEZONE}, no other")
    return zone


def _gateway(root: _Table, folder: Path) -> GatewaySettings:
    table = root.table("gateway", GATEWAY_KEYS)
    institution: str = table.string("acquirer_institution")
    if not (1 <= len(institution) <= 11 and institution.isascii() and institution.isdigit()):
        table.fail("acquirer_institution", f"{_show(institution)} is not 1-11 digits")
    return GatewaySettings(
        listen=_listen(table),
        database=_database(table, folder),
        timezone=_timezone(table),
        cutoff=_clock_time(table, "cutoff", "23:00"),
        key_lifetime_h=table.integer("key_lifetime_h", 24, low=1, high=8760),
        acquirer_institution=institution,
        idle_timeout_s=table.integer("idle_timeout_s", 300, low=1, high=86400),
        max_pending_per_connection=table.integer(
            "max_pending_per_connection", 32, low=1, high=1024
        ),
        key_lifetime_s=table.integer("key_lifetime_s", None, low=1, high=8760 * 3600),
        max_connections_per_address=table.integer(
            "max_connections_per_address", 64, low=1, high=65535
        ),
        max_frames_per_second_per_terminal=table.integer(
            "max_frames_per_second_per_terminal", 50, low=1, high=100_000
        ),
        max_unnamed_frames_per_second_per_address=table.integer(
            "max_unnamed_frames_per_second_per_address", None, low=1, high=1_000_000
        ),
    )


def _prefixes(table: _Table) -> tuple[str, ...]:
    prefixes = table.strings("card_prefixes")
    if prefixes is None:
        table.fail("card_prefixes", "missing (required)")
    for prefix in prefixes:
        if not (1 <= len(prefix) <= 18 and prefix.isascii() and prefix.isdigit()):
            table.fail("card_prefixes", f"{_show(prefix)} is not 1-18 digits")
    return tuple(prefixes)


def _path(table: _Table, key: str, default: str, folder: Path) -> Path:
    text: str = table.string(key, default)
    if not text.strip():
        table.fail(key, "is empty")
    if not text.isprintable():
        table.fail(key, "must be a path of printable characters")
    return folder / text


def _issuer(root: _Table, folder: Path) -> IssuerSettings:
    table = root.table("issuer", ISSUER_KEYS)
    return IssuerSettings(
        id=_fixed_id(table, "id", INSTITUTION_ID_LENGTH),
        card_prefixes=_prefixes(table),
        signing_key=_path(table, "signing_key", "var/issuer-ed25519.pem", folder),
        master_key=_path(table, "master_key", "var/master.key", folder),
    )


def _plan(root: _Table) -> PlanSettings:
    table = root.table("plan", PLAN_KEYS, required=False)
    return PlanSettings(
        qualify_points=table.integer("qualify_points", 3500, high=MAX_POINTS),
        expiry_years=table.integer("expiry_years", 1, low=1, high=99),
        max_points_per_card_day=table.integer("max_points_per_card_day", 0, high=MAX_POINTS),
    )


def _clearing(root: _Table) -> ClearingSettings:
    table = root.table("clearing", CLEARING_KEYS)
    return ClearingSettings(
        acquirer_id=_fixed_id(table, "acquirer_id", INSTITUTION_ID_LENGTH),
        terminal_fee_fen_per_month=table.integer("terminal_fee_fen_per_month", high=MAX_AMOUNT_FEN),
    )


# --- [[merchants]] and their rules ----------------------------------------------------------


def _names(table: _Table, key: str, allowed: tuple[str, ...]) -> list[str] | None:
    values = table.strings(key)
    for value in values or ():
        if value not in allowed:
            table.fail(key, f"{_show(value)} is not one of {', '.join(allowed)}")
    return values


def _validity(table: _Table) -> tuple[date | None, date | None]:
    valid_from: date | None = _date(table, "valid_from", None)
    valid_to: date | None = _date(table, "valid_to", None)
    if valid_from and valid_to and valid_from > valid_to:
        table.fail("valid_from", f"{valid_from} is after valid_to {valid_to}")
    return valid_from, valid_to


def _rule(table: _Table) -> Rule:
    rule_id: str = table.string("id")
    if not _RULE_ID_RE.fullmatch(rule_id):
        table.fail("id", f"{_show(rule_id)} is not 1-32 letters, digits, '.', '_' or '-'")
    tiers = _names(table, "tiers", TIERS)
    days = _names(table, "days", DAY_NAMES)
    valid_from, valid_to = _validity(table)
    return Rule(
        id=rule_id,
        discount_bp=table.integer("discount_bp", high=MAX_DISCOUNT_BP),
        tiers=None if tiers is None else frozenset(tiers),
        days=None if days is None else frozenset(DAY_NAMES.index(day) for day in days),
        hours=_hours(table, "hours"),
        valid_from=valid_from,
        valid_to=valid_to,
        min_amount_fen=table.integer("min_amount_fen", 0, high=MAX_AMOUNT_FEN),
    )


def _refuse_duplicates(tables: list[_Table], values: list[str], key: str) -> None:
    first_place: dict[str, str] = {}
    for table, value in zip(tables, values, strict=True):
        if value in first_place:
            table.fail(key, f"duplicate of {first_place[value]}")
        first_place[value] = table.place


def _rules(merchant: _Table, max_amount_fen: int) -> tuple[Rule, ...]:
    """The merchant's rules; one whose minimum is above the merchant's largest amount could
    never apply (every such amount is declined) and is refused as the mistake it is."""
    tables = merchant.tables("rules", RULE_KEYS)
    rules = [_rule(table) for table in tables]
    _refuse_duplicates(tables, [rule.id for rule in rules], "id")
    for table, rule in zip(tables, rules, strict=True):
        if rule.min_amount_fen > max_amount_fen:
            table.fail(
                "min_amount_fen",
                f"{rule.min_amount_fen} is above the merchant's max_amount_fen"
                f" {max_amount_fen}: the rule could never apply",
            )
    return tuple(rules)


def _merchant(table: _Table) -> MerchantConfig:
    merchant_id = _fixed_id(table, "id", MERCHANT_ID_LENGTH)
    name: str = table.string("name")
    if not name.strip() or not name.isprintable():
        table.fail("name", "must be a non-empty line of text")
    if len(name) > MERCHANT_NAME_MAX_CHARS:
        table.fail("name", f"longer than {MERCHANT_NAME_MAX_CHARS} characters")
    fee_bp: int = table.integer("fee_bp", high=MAX_FEE_BP)
    bank_card_fee_bp: int = table.integer("bank_card_fee_bp", high=BP_WHOLE)
    if fee_bp > bank_card_fee_bp:
        table.fail("fee_bp", f"{fee_bp} is above bank_card_fee_bp {bank_card_fee_bp}")
    max_amount_fen: int = table.integer(
        "max_amount_fen", MAX_AMOUNT_FEN, low=1, high=MAX_AMOUNT_FEN
    )
    return MerchantConfig(
        id=merchant_id,
        name=name,
        active=table.boolean("active", True),
        fee_bp=fee_bp,
        bank_card_fee_bp=bank_card_fee_bp,
        allow_partial=table.boolean("allow_partial", False),
        refund_window_days=table.integer("refund_window_days", 30, high=3660),
        max_amount_fen=max_amount_fen,
        rules=_rules(table, max_amount_fen),
    )


def _merchants(root: _Table) -> tuple[MerchantConfig, ...]:
    tables = root.tables("merchants", MERCHANT_KEYS)
    merchants = [_merchant(table) for table in tables]
    _refuse_duplicates(tables, [merchant.id for merchant in merchants], "id")
    return tuple(merchants)


# --- [[terminals]] ---------------------------------------------------------------------------


def _terminal(table: _Table, merchant_ids: frozenset[str]) -> TerminalConfig:
    terminal_id = _fixed_id(table, "id", TERMINAL_ID_LENGTH)
    merchant: str = table.string("merchant")
    if merchant not in merchant_ids:
        table.fail("merchant", f"{_show(merchant)} is not a configured merchant")
    suite = Suite(_choice(table, "suite", [suite.value for suite in Suite]))
    tmk = _hex_key(table, "tmk")
    if suite is Suite.TDES and not halves_differ(tmk):
        table.fail("tmk", "the two halves of a 3DES key are equal but for parity (single DES)")
    return TerminalConfig(
        id=terminal_id,
        merchant=merchant,
        enabled=table.boolean("enabled", True),
        suite=suite,
        tmk=tmk,
    )


def _terminals(root: _Table, merchant_ids: frozenset[str]) -> tuple[TerminalConfig, ...]:
    tables = root.tables("terminals", TERMINAL_KEYS)
    terminals = [_terminal(table, merchant_ids) for table in tables]
    _refuse_duplicates(tables, [terminal.id for terminal in terminals], "id")
    _refuse_shared_tmks(tables, terminals)
    return tuple(terminals)


def _refuse_shared_tmks(tables: list[_Table], terminals: list[TerminalConfig]) -> None:
    """Each terminal has a master key of its own. Two sharing one could each read the
    working keys the other is sent at sign-on (field 62 is encrypted under the TMK), so
    either could compute the other's MACs and read its PIN blocks. Keys are compared without
    their parity bits, whatever the suite: 3DES ignores them, and an SM4 key that differs
    from a known key only there is 16 bits from known. The message names the other
    terminal, never the key."""
    first_place: dict[bytes, str] = {}
    for table, terminal in zip(tables, terminals, strict=True):
        key = bytes(byte & 0xFE for byte in terminal.tmk)
        if key in first_place:
            table.fail(
                "tmk",
                f"the same key as {first_place[key]}: every terminal needs a master key of its own",
            )
        first_place[key] = table.place


# --- [[cards]] -------------------------------------------------------------------------------


def _card_number(table: _Table, prefixes: tuple[str, ...]) -> str:
    number = table.raw("number")
    if not isinstance(number, str):
        table.fail("number", "must be a string of 19 digits (quoted)")
    problem = card_number_problem(number, prefixes)
    if problem is not None:
        table.fail("number", problem)
    return number


def _expiry(table: _Table) -> str:
    expiry: str = table.string("expiry")
    try:
        expiry_last_day(expiry)
    except ValueError:
        table.fail("expiry", f"{_show(expiry)} is not YYMM")
    return expiry


def _pin(table: _Table) -> str | None:
    pin = table.raw("pin", None)
    if pin is None:
        return None
    if not isinstance(pin, str):
        table.fail("pin", "must be a string of 4-12 digits (quoted)")
    if not (4 <= len(pin) <= 12 and pin.isascii() and pin.isdigit()):
        table.fail("pin", "must be 4-12 digits")
    return pin


def _lot(table: _Table) -> ConfigLot:
    return ConfigLot(
        points=table.integer("points", low=1, high=MAX_POINTS),
        earned_on=_date(table, "earned_on"),
    )


def _card(table: _Table, prefixes: tuple[str, ...]) -> CardConfig:
    return CardConfig(
        number=_card_number(table, prefixes),
        expiry_yymm=_expiry(table),
        tier=_choice(table, "tier", TIERS, "standard"),
        status=_choice(table, "status", CARD_STATUSES, "active"),
        enrolled=table.boolean("enrolled", False),
        pin=_pin(table),
        lots=tuple(_lot(lot) for lot in table.tables("lots", LOT_KEYS, label_key=None)),
    )


def _cards(root: _Table, prefixes: tuple[str, ...]) -> tuple[CardConfig, ...]:
    tables = root.tables("cards", CARD_KEYS, label_key="number")
    cards = [_card(table, prefixes) for table in tables]
    _refuse_duplicates(tables, [card.number for card in cards], "number")
    return tuple(cards)


# --- the file --------------------------------------------------------------------------------

TOP_KEYS = ("gateway", "issuer", "plan", "clearing", "merchants", "terminals", "cards")
GATEWAY_KEYS = (
    "listen",
    "database",
    "timezone",
    "cutoff",
    "key_lifetime_h",
    "key_lifetime_s",
    "acquirer_institution",
    "idle_timeout_s",
    "max_pending_per_connection",
    "max_connections_per_address",
    "max_frames_per_second_per_terminal",
    "max_unnamed_frames_per_second_per_address",
)
ISSUER_KEYS = ("id", "card_prefixes", "signing_key", "master_key")
PLAN_KEYS = ("qualify_points", "expiry_years", "max_points_per_card_day")
CLEARING_KEYS = ("acquirer_id", "terminal_fee_fen_per_month")
MERCHANT_KEYS = (
    "id",
    "name",
    "active",
    "fee_bp",
    "bank_card_fee_bp",
    "allow_partial",
    "refund_window_days",
    "max_amount_fen",
    "rules",
)
RULE_KEYS = (
    "id",
    "discount_bp",
    "tiers",
    "days",
    "hours",
    "valid_from",
    "valid_to",
    "min_amount_fen",
)
TERMINAL_KEYS = ("id", "merchant", "enabled", "suite", "tmk")
CARD_KEYS = ("number", "expiry", "tier", "status", "enrolled", "pin", "lots")
LOT_KEYS = ("points", "earned_on")


def _read_toml(path: Path) -> dict[str, Any]:
    file = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise BadInput(f"{file}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{file}: not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise BadInput(f"{file}: TOML syntax error: {error}") from None


def _database_override(url: str) -> str:
    if not _URL_RE.match(url):
        raise BadInput("--db: is not a database URL such as sqlite:///var/vipgate.db")
    return url


def load_config(path: Path, db_override: str | None = None) -> Config:
    """Read and validate a config file; any bad value is a BadInput naming file and place.

    Relative paths (keys, a SQLite database) are resolved against the config file's folder;
    `db_override` (the `--db` option) replaces the configured database as given.
    """
    root = _Table(str(path), "", _read_toml(path), TOP_KEYS)
    folder = path.resolve().parent
    gateway = _gateway(root, folder)
    if db_override is not None:
        gateway = replace(gateway, database=_database_override(db_override))
    issuer = _issuer(root, folder)
    plan = _plan(root)
    clearing = _clearing(root)
    merchants = _merchants(root)
    return Config(
        path=path,
        gateway=gateway,
        issuer=issuer,
        plan=plan,
        clearing=clearing,
        merchants=merchants,
        terminals=_terminals(root, frozenset(merchant.id for merchant in merchants)),
        cards=_cards(root, issuer.card_prefixes),
    )

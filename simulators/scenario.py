"""Scenario files for `vipgate sim run` (operations.md, Scenario files): parse, play, report.

A scenario is a list of `[[step]]` tables, each one request as one terminal of the config and
what must come back. Parsing checks every value before anything is sent, and a bad one is a
`BadInput` naming the file, the step and the key (a card number in it masked, a PIN never).

Besides the keys of operations.md a step may carry `name` (shown in the report), `expiry`
(YYMM, for a card the config does not list), `tdk` and `suite` on a sign-on, `encrypt_track`
on a swiped card, `trace` (the STAN to use, to rehearse duplicates), `reason` on a reverse,
`wait_s` (seconds to wait before sending: past the key lifetime, say) and two faults in the
request itself: `corrupt_pin` (`99`) and `omit_field` (`30`). A file may say at top level
which gateway `clock` and which `config` its expected values assume, give a `description`,
and list `extra_terminals`: terminals the simulator can play that the gateway does not know
(`97`).

Playing a scenario sends the steps in order, each terminal on its own link. A terminal that
owes a reversal (§4.6) sends it before the step's request, unless the step is a sign-on or the
reverse of that very transaction; nothing signs on implicitly. The report lists, for every
step, what was sent, what came back and why it failed, with card numbers masked.
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Final, NoReturn

from cardcodec.cards import mask_card_data, mask_card_number, mask_quoted_value
from cardcodec.crypto import Suite, halves_differ
from cardcodec.errors import CodecError
from cardcodec.message import decode_frame
from cardcodec.profile import RECORDED_MTIS
from gateway.config import Config, TerminalConfig, load_config
from gateway.errors import BadInput
from simulators.connection import NO_FAULTS, Connection, Exchange, Faults, Link
from simulators.recording import FileRecorder
from simulators.terminal import (
    FREE_TEXT_CARD_DIGITS,
    IDENTIFYING_FIELDS,
    MAX_AMOUNT_FEN,
    MAX_TRACE,
    REVERSAL_REASONS,
    BadAnswerError,
    CardEntry,
    Completed,
    Request,
    Result,
    Terminal,
    TerminalError,
    same_transaction,
)

ACTIONS: Final = (
    "sign_on",
    "sign_off",
    "echo",
    "balance",
    "redeem",
    "void",
    "refund",
    "reverse",
    "settle",
    "upload",
)
MAX_STEPS: Final = 10_000
MAX_WAIT_S: Final = 600
MAX_EXTRA_TERMINALS: Final = 100
FAULT_KEYS: Final = ("drop_answer", "corrupt_mac", "repeat", "disconnect")
# Faults in the request itself, applied to the request as built (the link's are FAULT_KEYS).
REQUEST_FAULT_KEYS: Final = ("corrupt_pin", "omit_field")
_COMMON: Final = frozenset({"terminal", "do", "name", "expect", "wait_s", *FAULT_KEYS})
_CARD_KEYS: Final = frozenset({"card", "expiry", "entry", "encrypt_track"})
_SENT: Final = frozenset({"trace", "omit_field"})  # for a request the step builds itself
KEYS_BY_ACTION: Final[dict[str, frozenset[str]]] = {
    "sign_on": _COMMON | _SENT | {"tdk", "suite"},
    "sign_off": _COMMON | _SENT,
    "echo": _COMMON | _SENT,
    "balance": _COMMON | _SENT | _CARD_KEYS | {"pin", "corrupt_pin"},
    "redeem": _COMMON
    | _SENT
    | _CARD_KEYS
    | {"pin", "corrupt_pin", "partial", "amount_fen", "save"},
    "void": _COMMON | _SENT | _CARD_KEYS | {"original", "amount_fen", "save"},
    "refund": _COMMON | _SENT | _CARD_KEYS | {"original", "amount_fen", "save"},
    "reverse": _COMMON | {"original", "reason"},
    "settle": _COMMON | _SENT,
    "upload": frozenset({"terminal", "do", "name", "expect", "wait_s"}),
}
_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "balance": ("card",),
    "redeem": ("card", "amount_fen"),
    "void": ("original",),
    "refund": ("original", "amount_fen"),
    "reverse": ("original",),
}
# Which saved steps each action may take as its original.
_ORIGINALS: Final = {"void": ("redeem",), "refund": ("redeem",), "reverse": ("redeem", "void")}
_UNMACED: Final = ("sign_on", "echo")
TOP_KEYS: Final = ("description", "clock", "config", "extra_terminals", "step")
EXTRA_TERMINAL_KEYS: Final = ("id", "merchant", "suite", "tmk")
SETTLEMENT_RESULTS: Final = ("balanced", "unbalanced")
SENT: Final = ">"
RECEIVED: Final = "<"
WAITED: Final = "~"
# A link idle for this share of the gateway's idle time-out is replaced before it is used
# again: the gateway closes idle links (§1), and a step after a long wait must not find its
# link closed under it.
IDLE_SHARE: Final = 0.9
_SAVE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
_CODE = re.compile(r"[0-9A-Z]{2}")


# --- the parsed scenario ------------------------------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """What a step's answer must say; None is not checked."""

    code: str | None = None
    points: int | None = None  # field 63: points used or returned
    balance: int | None = None  # field 63: spendable points after
    amount: int | None = None  # field 4, fen
    discount: int | None = None  # field 63, basis points
    cash_fen: int | None = None  # field 63: settled, or clawed back
    balance_fen: int | None = None  # field 54
    result: str | None = None  # a 0510's: "balanced" or "unbalanced"
    sign_on_again: bool | None = None  # header digit 3

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def problems(self, result: Result) -> list[str]:
        """One line per expectation the answer does not meet."""
        settled = None
        if result.balanced is not None:
            settled = SETTLEMENT_RESULTS[0] if result.balanced else SETTLEMENT_RESULTS[1]
        actual: dict[str, object] = {
            "code": result.code,
            "points": result.points,
            "balance": result.balance_points,
            "amount": result.amount_fen,
            "discount": result.discount_bp,
            "cash_fen": result.cash_fen,
            "balance_fen": result.balance_fen,
            "result": settled,
            "sign_on_again": result.sign_on_again,
        }
        problems = []
        for name, got in actual.items():
            wanted = getattr(self, name)
            if wanted is None or wanted == got:
                continue
            shown = "nothing (field absent)" if got is None else got
            problems.append(f"{name}: expected {wanted}, got {shown}")
        return problems


@dataclass(frozen=True, repr=False)
class Step:
    """One step, checked. `card` is resolved (expiry from the step or the config); for a
    void or refund without `card` the original's card is used, keyed when `entry` says so."""

    number: int
    terminal: str
    do: str
    name: str | None = None
    card: CardEntry | None = None
    entry: str | None = None
    amount_fen: int | None = None
    pin: str | None = None
    partial: bool = False
    tdk: bool = False
    suite: Suite | None = None
    encrypt_track: bool = False
    trace: int | None = None
    original: str | None = None
    reason: str | None = None
    save: str | None = None
    wait_s: int | None = None  # seconds to wait before sending anything
    corrupt_pin: bool = False  # a PIN block that decrypts to no valid block
    omit_field: int | None = None  # a field left out of the request
    faults: Faults = NO_FAULTS
    expect: Expectation = field(default_factory=Expectation)

    @property
    def label(self) -> str:
        return f"step {self.number} ({self.do})"

    @property
    def fault_names(self) -> tuple[str, ...]:
        """The faults of the step, link and request, as the report names them."""
        request: tuple[str, ...] = ("corrupt_pin",) if self.corrupt_pin else ()
        if self.omit_field is not None:
            request += (f"omit_field {self.omit_field}",)
        return self.faults.names + request

    def __repr__(self) -> str:
        return f"Step({self.label}, terminal={self.terminal!r})"


@dataclass(frozen=True)
class Scenario:
    source: str
    steps: tuple[Step, ...]
    description: str | None = None
    clock: datetime | None = None  # the gateway clock the expected values assume
    config: str | None = None  # the --config the expected values assume, as written
    # Terminals the simulator plays and the gateway does not know (to rehearse `97`).
    extra_terminals: tuple[TerminalConfig, ...] = ()


# --- parsing ------------------------------------------------------------------------------


_TYPE_NAMES: Final[dict[type, str]] = {
    bool: "a boolean",  # before int: a TOML boolean is no integer
    int: "an integer",
    str: "a string",
    dict: "a table",
    list: "an array",
    float: "a float",
    datetime: "a date-time",
}


def _type_name(value: object) -> str:
    """The TOML type of a value, with its article."""
    return next((n for t, n in _TYPE_NAMES.items() if isinstance(value, t)), type(value).__name__)


class _Place:
    """One table of the scenario file with getters that name the place on failure."""

    def __init__(self, source: str, where: str, data: dict[str, Any]) -> None:
        self.source = source
        self.where = where
        self.data = data

    def fail(self, key: str | None, problem: str) -> NoReturn:
        parts = [part for part in (self.source, self.where, key) if part]
        raise BadInput(mask_card_data(": ".join([*parts, problem]), shortest=FREE_TEXT_CARD_DIGITS))

    def typed(self, key: str, kind: type[Any]) -> Any:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(key, f"must be {_TYPE_NAMES[kind]}, not {_type_name(value)}")
        return value

    def integer(self, key: str, low: int, high: int) -> int | None:
        value: int | None = self.typed(key, int)
        if value is not None and not low <= value <= high:
            self.fail(key, f"{_quoted(value)} is outside {low}-{high}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str | None:
        value: str | None = self.typed(key, str)
        if value is not None and value not in choices:
            self.fail(key, f"{_quoted(value)} is not one of {', '.join(choices)}")
        return value

    def flag(self, key: str) -> bool:
        return bool(self.typed(key, bool))


def _card_number(place: _Place) -> str | None:
    number: str | None = place.typed("card", str)
    if number is not None and not (
        13 <= len(number) <= 19 and number.isascii() and number.isdigit()
    ):
        place.fail("card", f"{mask_card_number(number)!r} is not 13 to 19 digits")
    return number


def _expiry(place: _Place, number: str, config: Config) -> str:
    expiry: str | None = place.typed("expiry", str)
    if expiry is None:
        known = next((card for card in config.cards if card.number == number), None)
        if known is None:
            place.fail(
                "expiry", f"missing, and card {mask_card_number(number)} is not in the config"
            )
        return known.expiry_yymm
    if len(expiry) != 4 or not expiry.isdigit() or not 1 <= int(expiry[2:]) <= 12:
        place.fail("expiry", f"{_quoted(expiry)} is not YYMM")
    return expiry


def _quoted(value: object) -> str:
    """A value from the scenario as an error quotes it: `repr`, with a card number put under
    the wrong key masked (runs of 16 or more digits: a 15-digit merchant id stays) and
    anything that looks like a key hidden."""
    if isinstance(value, str):
        return repr(mask_quoted_value(value, shortest=FREE_TEXT_CARD_DIGITS))
    return mask_quoted_value(repr(value), shortest=FREE_TEXT_CARD_DIGITS)


def _card(place: _Place, config: Config) -> tuple[CardEntry | None, str | None]:
    number = _card_number(place)
    entry = place.choice("entry", ("swipe", "keyed"))
    if entry == "keyed" and place.flag("encrypt_track"):
        place.fail("encrypt_track", "a keyed card has no track to encrypt")
    if number is None:
        if "expiry" in place.data:
            place.fail("expiry", "given without card")
        return None, entry
    return CardEntry(number, _expiry(place, number, config), keyed=entry == "keyed"), entry


def _pin(place: _Place) -> str | None:
    pin: str | None = place.typed("pin", str)
    if pin is not None and not (4 <= len(pin) <= 12 and pin.isascii() and pin.isdigit()):
        place.fail("pin", "must be 4 to 12 digits")
    return pin


def _expectation(step: _Place, do: str) -> Expectation:
    data = step.data.get("expect")
    if data is None:
        return Expectation()
    if not isinstance(data, dict):
        step.fail("expect", f"must be a table, not {_type_name(data)}")
    place = _Place(step.source, f"{step.where}: expect", data)
    known = {f.name for f in fields(Expectation)}
    for key in data:
        if key not in known:
            place.fail(key, "unknown key")
    code: str | None = place.typed("code", str)
    if code is not None and not _CODE.fullmatch(code):
        place.fail("code", f"{_quoted(code)} is not a 2-character response code")
    if "result" in data and do != "settle":
        place.fail("result", "only a settle step has a settlement result")
    numbers = {
        key: place.integer(key, 0, MAX_AMOUNT_FEN)
        for key in ("points", "balance", "amount", "discount", "cash_fen", "balance_fen")
    }
    return Expectation(
        code=code,
        result=place.choice("result", SETTLEMENT_RESULTS),
        sign_on_again=place.typed("sign_on_again", bool),
        **numbers,
    )


def _faults(place: _Place, do: str, expect: Expectation) -> Faults:
    flags = {key: place.flag(key) for key in FAULT_KEYS}
    if flags["corrupt_mac"] and do in _UNMACED:
        place.fail("corrupt_mac", f"a {do} carries no MAC")
    if flags["disconnect"] and (flags["drop_answer"] or flags["repeat"]):
        place.fail("disconnect", "leaves no answer to drop or repeat")
    if flags["disconnect"] and not expect.empty:
        place.fail("expect", "a disconnected step gets no answer to check")
    return Faults(**flags)


def _corrupt_pin(place: _Place) -> bool:
    corrupt = place.flag("corrupt_pin")
    if corrupt and "pin" not in place.data:
        place.fail("corrupt_pin", "needs pin: it corrupts the block of the PIN entered")
    return corrupt


def _omit_field(place: _Place, faults: Faults) -> int | None:
    number = place.integer("omit_field", 2, 64)
    if number is None:
        return None
    if number in IDENTIFYING_FIELDS:
        kept = ", ".join(str(n) for n in sorted(IDENTIFYING_FIELDS))
        place.fail("omit_field", f"field {number} identifies the request ({kept} stay in)")
    if faults.drop_answer or faults.disconnect:
        place.fail(
            "omit_field",
            "not with drop_answer or disconnect: the reversal they owe "
            "would copy the malformed request",
        )
    return number


class _Parser:
    def __init__(
        self, source: str, config: Config, extra_terminals: tuple[TerminalConfig, ...] = ()
    ) -> None:
        self.source = source
        self.config = config
        self.terminals = {terminal.id for terminal in (*config.terminals, *extra_terminals)}
        self.saved: dict[str, Step] = {}

    def step(self, number: int, data: object) -> Step:
        where = f"step {number}"
        if not isinstance(data, dict):
            raise BadInput(f"{self.source}: {where}: must be a table, not {_type_name(data)}")
        place = _Place(self.source, where, data)
        do = place.choice("do", ACTIONS)
        if do is None:
            place.fail("do", f"missing (one of {', '.join(ACTIONS)})")
        place.where = f"{where} ({do})"
        for key in data:
            if key not in KEYS_BY_ACTION[do]:
                place.fail(key, f"unknown key for {do}")
        for key in _REQUIRED.get(do, ()):
            if key not in data:
                place.fail(key, "missing (required)")
        return self._build(number, do, place)

    def _build(self, number: int, do: str, place: _Place) -> Step:
        terminal = place.typed("terminal", str)
        if terminal is None:
            place.fail("terminal", "missing (required)")
        if terminal not in self.terminals:
            place.fail(
                "terminal",
                f"{_quoted(terminal)} is not a terminal of the config or of extra_terminals",
            )
        card, entry = _card(place, self.config)
        name: str | None = place.typed("name", str)
        suite = place.choice("suite", tuple(suite.value for suite in Suite))
        expect = _expectation(place, do)
        faults = _faults(place, do, expect)
        step = Step(
            number=number,
            terminal=terminal,
            do=do,
            name=name,
            card=card,
            entry=entry,
            amount_fen=place.integer("amount_fen", 0, MAX_AMOUNT_FEN),
            pin=_pin(place),
            partial=place.flag("partial"),
            tdk=place.flag("tdk"),
            suite=Suite(suite) if suite else None,
            encrypt_track=place.flag("encrypt_track"),
            trace=place.integer("trace", 1, MAX_TRACE),
            original=self._original(place, do, terminal),
            reason=place.choice("reason", REVERSAL_REASONS),
            save=self._save(place),
            wait_s=place.integer("wait_s", 1, MAX_WAIT_S),
            corrupt_pin=_corrupt_pin(place),
            omit_field=_omit_field(place, faults),
            faults=faults,
            expect=expect,
        )
        if step.save is not None:
            self.saved[step.save] = step
        return step

    def _original(self, place: _Place, do: str, terminal: str) -> str | None:
        name: str | None = place.typed("original", str)
        if name is None:
            return None
        original = self.saved.get(name)
        if original is None:
            place.fail("original", f"{_quoted(name)} is not saved by an earlier step")
        if original.do not in _ORIGINALS[do]:
            wanted = " or ".join(_ORIGINALS[do])
            place.fail("original", f"{_quoted(name)} is a {original.do}; a {do} takes a {wanted}")
        if do == "reverse" and original.terminal != terminal:
            place.fail("original", f"{_quoted(name)} was sent by terminal {original.terminal}")
        return name

    def _save(self, place: _Place) -> str | None:
        name: str | None = place.typed("save", str)
        if name is None:
            return None
        if not _SAVE_NAME.fullmatch(name):
            place.fail("save", "must be 1 to 32 letters, digits, '.', '_' or '-'")
        if name in self.saved:
            place.fail(
                "save", f"{_quoted(name)} is already saved by step {self.saved[name].number}"
            )
        return name


def _clock(place: _Place) -> datetime | None:
    value = place.data.get("clock")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            place.fail("clock", "is not an ISO 8601 instant")
    if not isinstance(value, datetime) or value.tzinfo is None:
        place.fail("clock", "must be a date-time with a UTC offset")
    return value


def _config_name(place: _Place) -> str | None:
    name: str | None = place.typed("config", str)
    if name is not None and not (name.strip() and name.isprintable()):
        place.fail("config", "must be a path, as given to --config")
    return name


def _fixed_text(place: _Place, key: str, length: int) -> str:
    value: str | None = place.typed(key, str)
    if value is None:
        place.fail(key, "missing (required)")
    if len(value) != length or not (value.isascii() and value.isalnum()):
        place.fail(key, f"{_quoted(value)} must be {length} letters or digits, as in the config")
    return value


def _tmk(place: _Place, suite: Suite) -> bytes:
    """The master key, checked as the config checks it; its value is never shown."""
    text: str | None = place.typed("tmk", str)
    if text is None:
        place.fail("tmk", "missing (required)")
    if len(text) != 32 or not all(char in "0123456789ABCDEFabcdef" for char in text):
        place.fail("tmk", "must be 32 hex digits (16 bytes)")
    tmk = bytes.fromhex(text)
    if suite is Suite.TDES and not halves_differ(tmk):
        place.fail("tmk", "the two halves of a 3DES key are equal but for parity (single DES)")
    return tmk


def _extra_terminal(place: _Place, taken: dict[str, str]) -> TerminalConfig:
    for key in place.data:
        if key not in EXTRA_TERMINAL_KEYS:
            place.fail(key, "unknown key")
    terminal_id = _fixed_text(place, "id", 8)
    if terminal_id in taken:
        place.fail("id", f"{_quoted(terminal_id)} is {taken[terminal_id]}")
    merchant = _fixed_text(place, "merchant", 15)
    suite_name = place.choice("suite", tuple(suite.value for suite in Suite))
    if suite_name is None:
        place.fail("suite", "missing (required)")
    suite = Suite(suite_name)
    return TerminalConfig(terminal_id, merchant, True, suite, _tmk(place, suite))


def _extra_terminals(top: _Place, config: Config) -> tuple[TerminalConfig, ...]:
    """`[[extra_terminals]]`: terminals the gateway must not know, so none of the config's."""
    tables = top.typed("extra_terminals", list)
    if tables is None:
        return ()
    if len(tables) > MAX_EXTRA_TERMINALS:
        top.fail("extra_terminals", f"more than {MAX_EXTRA_TERMINALS}")
    taken = {
        t.id: "a terminal of the config: an extra one must be unknown to the gateway"
        for t in config.terminals
    }
    extras = []
    for number, data in enumerate(tables, start=1):
        where = f"extra_terminals {number}"
        if not isinstance(data, dict):
            top.fail(where, f"must be a table, not {_type_name(data)}")
        extra = _extra_terminal(_Place(top.source, where, data), taken)
        taken[extra.id] = f"already extra terminal {number}"
        extras.append(extra)
    return tuple(extras)


def parse_scenario(data: dict[str, Any], config: Config, source: str) -> Scenario:
    """A scenario from its TOML tables; any bad value is a `BadInput` naming step and key."""
    top = _Place(source, "", data)
    for key in data:
        if key not in TOP_KEYS:
            top.fail(key, "unknown key")
    steps = top.typed("step", list)
    if not steps:
        top.fail("step", "no [[step]] tables")
    if len(steps) > MAX_STEPS:
        top.fail("step", f"more than {MAX_STEPS} steps")
    extras = _extra_terminals(top, config)
    parser = _Parser(source, config, extras)
    return Scenario(
        source=source,
        steps=tuple(parser.step(number, item) for number, item in enumerate(steps, start=1)),
        description=top.typed("description", str),
        clock=_clock(top),
        config=_config_name(top),
        extra_terminals=extras,
    )


def load_scenario(path: Path, config: Config) -> Scenario:
    """Read and check a scenario file against a config. A refusal masks any card number
    in it, and what a track adds: a path, a key or a name may hold one."""
    try:
        return _read_scenario(path, config)
    except BadInput as error:
        raise BadInput(mask_card_data(str(error), shortest=FREE_TEXT_CARD_DIGITS)) from None


def _read_scenario(path: Path, config: Config) -> Scenario:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise BadInput(f"{path}: cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise BadInput(f"{path}: TOML syntax error: {error}") from None
    return parse_scenario(data, config, str(path))


# --- the report ---------------------------------------------------------------------------


@dataclass
class StepReport:
    """What one step sent and what came back, in wire order, and why it failed (no problems
    when it passed)."""

    step: Step
    wire: list[tuple[str, str]] = field(default_factory=list)  # (">" sent | "<" received, line)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def sent(self) -> list[str]:
        return [line for direction, line in self.wire if direction == SENT]

    @property
    def received(self) -> list[str]:
        return [line for direction, line in self.wire if direction == RECEIVED]

    def render(self) -> list[str]:
        step = self.step
        title = (
            f"step {step.number:>3} {'PASS' if self.passed else 'FAIL'} {step.terminal} {step.do}"
        )
        lines = [title + (f"  {step.name}" if step.name else "")]
        lines += [f"      {direction} {line}" for direction, line in self.wire]
        lines += [f"      ! {line}" for line in self.problems]
        return lines


@dataclass
class Report:
    """Every step of one run; `failed` counts the steps that did not pass. `interrupted`
    is (steps played, steps of the file) when Ctrl-C stopped the run."""

    source: str
    steps: list[StepReport]
    clock: datetime | None = None
    description: str | None = None
    config: str | None = None
    interrupted: tuple[int, int] | None = None

    @property
    def failed(self) -> int:
        return sum(1 for step in self.steps if not step.passed)

    @property
    def interruption(self) -> str | None:
        """The line that says where Ctrl-C stopped the run; None when it ran to the end."""
        if self.interrupted is None:
            return None
        played, planned = self.interrupted
        return mask_card_data(
            f"scenario {self.source}: interrupted after {played} of {planned} steps;"
            " running it again starts from step 1",
            shortest=FREE_TEXT_CARD_DIGITS,
        )

    def render(self) -> str:
        """A readable text report. Every line is masked as a whole (the description, the
        config's name and a step's name are free text): card numbers appear masked, what a
        track adds hidden, and PINs and keys never appear."""
        return mask_card_data(self._text(), shortest=FREE_TEXT_CARD_DIGITS)

    def _text(self) -> str:
        head = f"scenario {self.source}"
        expects = []
        if self.clock is not None:
            expects.append(f"the gateway clock at {self.clock.isoformat()}")
        if self.config is not None:
            expects.append(f"--config {self.config}")
        if expects:
            head += f" (expects {' and '.join(expects)})"
        lines = [head] + ([self.description] if self.description else [])
        for step in self.steps:
            lines += step.render()
        passed = len(self.steps) - self.failed
        lines.append(f"{len(self.steps)} steps: {passed} passed, {self.failed} failed")
        return "\n".join(lines) + "\n"


# --- playing ------------------------------------------------------------------------------


def _cut_short(reports: list[StepReport]) -> None:
    """The step Ctrl-C stopped: left out of the report when it sent nothing, else failed
    with the reason."""
    last = reports[-1]
    if not last.sent:
        reports.pop()
    else:
        last.problems.append("interrupted (Ctrl-C)")


def _fault_note(step: Step) -> str:
    names = step.fault_names
    return f" [{', '.join(names)}]" if names else ""


def _no_answer_note(exchange: Exchange) -> str:
    if exchange.disconnected:
        return "(link cut in the middle of the frame: no answer)"
    if exchange.timed_out:
        return "(no answer in time)"
    return f"(link broke: {exchange.problem})"


def _second_answer(terminal: Terminal, request: Request, answers: tuple[bytes, ...]) -> str:
    """The report's line for the answer to a repeated frame, read without applying it."""
    if len(answers) < 2:
        return "(no answer)"
    try:
        return terminal.read(request, answers[1]).describe()
    except BadAnswerError as refused:
        return f"(refused: {refused.reason})"


# §7: the codes of the checks made before a request is recorded (format, terminal, MAC:
# §6's order up to `A0`, the suite's `A7`, and `12`, which §7 gives with `30`); the requests
# recorded are the profile's `RECORDED_MTIS`. `96` records nothing either.
UNRECORDED_CODES: Final = frozenset({"30", "12", "97", "03", "58", "A0", "A7"})


def _repeat_problem(request: Request, answers: tuple[bytes, ...]) -> str | None:
    """What is wrong with the answer to a repeated request (§7). A recorded request gets
    the same answer again, MAC aside. One refused before it was recorded is checked afresh:
    the same code again, with a new RRN and time. A request the gateway never records
    (sign-on, sign-off, echo) is handled afresh: any answer will do (a sign-off's repeat is
    `A0`, its keys being gone), and so will any answer after a `96`."""
    if len(answers) < 2:
        return "repeat: no answer to the second copy"
    try:
        first, second = (decode_frame(answer) for answer in answers[:2])
    except CodecError as error:
        return f"repeat: an answer does not decode ({error})"
    code, again = (m.text(39) if 39 in m.fields else None for m in (first, second))
    if request.mti not in RECORDED_MTIS or code == "96":
        return None
    if code in UNRECORDED_CODES:
        return None if again == code else f"repeat: the second answer's code is {again}, not {code}"
    numbers = sorted((set(first.fields) | set(second.fields)) - {64})
    differ = [n for n in numbers if first.fields.get(n) != second.fields.get(n)]
    if first.mti != second.mti:
        return "repeat: the second answer's MTI differs from the first's"
    if differ:
        shown = ", ".join(str(n) for n in differ)
        return f"repeat: the second answer differs from the first in field(s) {shown}"
    return None


class _Runner:
    def __init__(
        self,
        scenario: Scenario,
        config: Config,
        connect: Callable[[], Link],
        sleep: Callable[[float], None],
        monotonic: Callable[[], float],
    ) -> None:
        self.scenario = scenario
        self.connect = connect
        self.sleep = sleep
        self.monotonic = monotonic
        self.idle_limit_s = IDLE_SHARE * config.gateway.idle_timeout_s
        used = {step.terminal for step in scenario.steps}
        known = (*config.terminals, *scenario.extra_terminals)
        self.terminals = {t.id: Terminal.from_config(t) for t in known if t.id in used}
        self.links: dict[str, Link] = {}
        self.last_used: dict[str, float] = {}  # monotonic time of each link's last exchange
        self.saved: dict[str, Completed] = {}

    def run(self) -> Report:
        reports: list[StepReport] = []
        played = 0
        interrupted = None
        try:
            try:
                for step in self.scenario.steps:
                    reports.append(StepReport(step))
                    self.play(step, reports[-1])
                    played += 1
            except KeyboardInterrupt:  # Ctrl-C: no step more, but what is owed is reversed
                interrupted = (played, len(self.scenario.steps))
                if len(reports) > played:
                    _cut_short(reports)
            stopped = self._reverse_what_is_owed(reports, interrupted is not None)
            if stopped and interrupted is None:
                interrupted = (played, len(self.scenario.steps))
        finally:
            for link in self.links.values():
                link.close()
        scenario = self.scenario
        return Report(
            scenario.source,
            reports,
            scenario.clock,
            scenario.description,
            scenario.config,
            interrupted,
        )

    def play(self, step: Step, report: StepReport) -> None:
        terminal = self.terminals[step.terminal]
        if step.wait_s is not None:
            report.wire.append((WAITED, f"waited {step.wait_s} s"))
            self.sleep(step.wait_s)
        try:
            if self._reversal_first(step, terminal, report):
                self._action(step, terminal, report)
        except (TerminalError, ValueError, CodecError) as error:
            report.problems.append(str(error))

    def _reverse_what_is_owed(self, reports: list[StepReport], interrupted: bool) -> bool:
        """A terminal whose last answer never came (`drop_answer`, `disconnect` on its last
        step, Ctrl-C while it waited) reverses it before anything else (§4.6); with no step
        left, it does so now, shown under its last step. A reversal still owed after that
        fails that step: the points may still be taken for a sale the terminal took as
        failed. Ctrl-C here stops the sending (True); what is still owed is reported."""
        when = "when the run was interrupted" if interrupted else "at the end of the scenario"
        stopped = False
        for terminal_id, terminal in self.terminals.items():
            pending = terminal.pending_reversal
            if pending is None:
                continue
            report = next(r for r in reversed(reports) if r.step.terminal == terminal_id)
            result = None
            try:
                if not stopped:
                    reversal = terminal.reversal()
                    note = f" (owed {when})"
                    result = self._send(
                        report.step, terminal, reversal, report, NO_FAULTS, note=note
                    )
            except (TerminalError, ValueError, CodecError) as error:
                report.problems.append(str(error))
            except KeyboardInterrupt:
                stopped = True
            if terminal.pending_reversal is not None:
                answered = f" (answered {result.code})" if result else ""
                report.problems.append(
                    f"the reversal of trace {pending.original.trace} is still owed {when}{answered}"
                )
        return stopped

    def _link(self, terminal: str) -> Link:
        link = self.links.get(terminal)
        idle_s = self.monotonic() - self.last_used.get(terminal, self.monotonic())
        if link is not None and idle_s >= self.idle_limit_s:
            link.close()  # the gateway has closed it by now, or is about to
        if link is None or link.closed:
            link = self.links[terminal] = self.connect()
        return link

    def _reversal_first(self, step: Step, terminal: Terminal, report: StepReport) -> bool:
        """Send an owed reversal before the step (§4.6); False when it is still owed."""
        pending = terminal.pending_reversal
        if pending is None or step.do == "sign_on":
            return True
        original = self.saved.get(step.original or "") if step.do == "reverse" else None
        if original is not None and same_transaction(pending.original, original.request):
            return True  # the step is that very reversal
        result = self._send(step, terminal, terminal.reversal(), report, NO_FAULTS)
        if terminal.pending_reversal is not None:
            answered = f" (answered {result.code})" if result else ""
            report.problems.append(
                f"the reversal of trace {pending.original.trace} is still owed{answered}: "
                "the step was not sent"
            )
            return False
        return True

    def _action(self, step: Step, terminal: Terminal, report: StepReport) -> None:
        if step.do == "upload":
            result = self._upload(step, terminal, report)
        else:
            if step.trace is not None:
                terminal.stan = step.trace
            request = self._malformed(step, terminal, self._request(step, terminal))
            result = self._send(
                step, terminal, request, report, step.faults, note=_fault_note(step)
            )
            if step.save is not None:
                self.saved[step.save] = Completed(request, result)
        if result is not None:
            report.problems += step.expect.problems(result)
        elif not step.expect.empty:
            report.problems.append("no answer to check the expectations against")

    def _request(self, step: Step, terminal: Terminal) -> Request:
        original = None
        if step.original:
            original = self.saved.get(step.original)
            if original is None:  # its step failed before sending it
                raise TerminalError(f"its original {_quoted(step.original)} was never sent")
        if step.do == "sign_on":
            return terminal.sign_on(tdk=step.tdk, suite=step.suite)
        if step.do == "sign_off":
            return terminal.sign_off()
        if step.do == "echo":
            return terminal.echo()
        if step.do == "settle":
            return terminal.settlement()
        if step.do == "reverse" and original is not None:
            pending = terminal.pending_reversal
            if pending is None or not same_transaction(pending.original, original.request):
                terminal.give_up(original.request, step.reason)
            elif step.reason is not None and step.reason != pending.reason:
                raise TerminalError(
                    f"the reversal of trace {pending.original.trace} is owed with reason "
                    f"{pending.reason} already; with {step.reason} it would be another reversal"
                )
            return terminal.reversal()
        return self._card_request(step, terminal, original)

    def _malformed(self, step: Step, terminal: Terminal, request: Request) -> Request:
        """The request with the step's request faults: the PIN block, then a field left out."""
        if step.corrupt_pin:
            request = terminal.with_corrupt_pin(request)
        if step.omit_field is not None:
            request = terminal.without_field(request, step.omit_field)
        return request

    def _card_request(self, step: Step, terminal: Terminal, original: Completed | None) -> Request:
        encrypt = step.encrypt_track
        if step.do == "balance" and step.card is not None:
            return terminal.balance(step.card, pin=step.pin, encrypt_track=encrypt)
        if step.do == "redeem" and step.card is not None and step.amount_fen is not None:
            return terminal.redemption(
                step.card,
                step.amount_fen,
                pin=step.pin,
                encrypt_track=encrypt,
                partial=step.partial,
            )
        if original is None:
            raise TerminalError(f"{step.label} has nothing to act on")
        card = step.card
        if card is None and step.entry is not None and original.request.card is not None:
            known = original.request.card
            card = CardEntry(known.number, known.expiry_yymm, keyed=step.entry == "keyed")
        if step.do == "void":
            return terminal.void(
                original, card=card, amount_fen=step.amount_fen, encrypt_track=encrypt
            )
        if step.amount_fen is None:
            raise TerminalError(f"{step.label} has no amount")
        return terminal.refund(original, step.amount_fen, card=card, encrypt_track=encrypt)

    def _send(
        self,
        step: Step,
        terminal: Terminal,
        request: Request,
        report: StepReport,
        faults: Faults,
        *,
        note: str = "",
    ) -> Result | None:
        """Send one request and hand its answer to the terminal; the typed answer (a dropped
        one too, read but not applied), None when there was none to read. `note` names the
        faults in the report."""
        try:
            link = self._link(step.terminal)
        except OSError as error:
            report.problems.append(f"cannot connect to the gateway: {error}")
            return None
        report.wire.append((SENT, request.describe() + note))
        try:
            exchange = link.exchange(request.frame, faults, terminal.terminal_id)
        except KeyboardInterrupt:  # the request may have been taken: as if no answer came
            link.close()
            terminal.no_answer(request)
            report.wire.append((RECEIVED, "(interrupted before the answer came)"))
            raise
        self.last_used[step.terminal] = self.monotonic()
        if exchange.answer is None:
            terminal.no_answer(request)
            if not (faults.drop_answer or faults.disconnect):
                report.problems.append("no answer")
            return self._unanswered(terminal, request, exchange, report)
        try:
            result = terminal.receive(request, exchange.answer)
        except BadAnswerError as refused:
            report.wire.append((RECEIVED, f"(refused: {refused.reason})"))
            report.problems.append(f"answer refused: {refused.reason}")
            return None
        report.wire.append((RECEIVED, result.describe()))
        if faults.repeat:
            report.wire.append((SENT, "(the same frame again)"))
            report.wire.append((RECEIVED, _second_answer(terminal, request, exchange.answers)))
            problem = _repeat_problem(request, exchange.answers)
            if problem is not None:
                report.problems.append(problem)
        return result

    def _unanswered(
        self, terminal: Terminal, request: Request, exchange: Exchange, report: StepReport
    ) -> Result | None:
        result = None
        if exchange.dropped:
            try:
                result = terminal.read(request, exchange.answers[0])
                report.wire.append((RECEIVED, f"(dropped) {result.describe()}"))
            except BadAnswerError as refused:
                report.wire.append((RECEIVED, f"(dropped, and refused: {refused.reason})"))
        else:
            report.wire.append((RECEIVED, _no_answer_note(exchange)))
        pending = terminal.pending_reversal
        if pending is not None and same_transaction(pending.original, request):
            report.wire.append((RECEIVED, f"(a reversal is owed, reason {pending.reason})"))
        return result

    def _upload(self, step: Step, terminal: Terminal, report: StepReport) -> Result | None:
        """0320s with the settled batch's records, 8 at a time, then the end 0320."""
        settled = terminal.settled
        if settled is None:
            raise TerminalError(f"terminal {terminal.terminal_id} has settled no batch to upload")
        sent = 0
        for chunk in settled.chunks():
            result = self._send(step, terminal, terminal.batch_upload(chunk), report, NO_FAULTS)
            if result is None or result.code != "00":
                report.problems.append("batch upload stopped: a 0320 was not approved")
                return None
            sent += len(chunk)
        return self._send(step, terminal, terminal.upload_end(sent), report, NO_FAULTS)


def run_scenario(
    scenario: Scenario,
    config: Config,
    connect: Callable[[], Link],
    *,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> Report:
    """Play every step in order and report each; `connect` opens a link for a terminal.
    `sleep` waits a step's `wait_s`, and `monotonic` times how long each link stood idle
    (both replaceable, so that tests need not wait)."""
    return _Runner(scenario, config, connect, sleep, monotonic).run()


def run_scenario_file(
    path: Path, config_path: Path, target: tuple[str, int], record: Path | None
) -> Report:
    """`vipgate sim run`: load the config and scenario, play it against HOST:PORT, and
    record the traffic to `record` when given. BadInput for a bad config or scenario."""
    config = load_config(config_path)
    scenario = load_scenario(path, config)
    recorder = FileRecorder(record) if record is not None else None
    try:
        return run_scenario(scenario, config, lambda: Connection.open(target, recorder=recorder))
    finally:
        if recorder is not None:
            recorder.close()

"""The two CSV files people bring to the ledger: the billing accrual feed and the card import.

Both are all-or-nothing for bad input (points-and-clearing.md §3): every line is parsed and
checked before anything is written, and a file with any bad line is refused whole with one
`BadInput` that names every bad line, so the person fixing it sees the whole damage in one run
and a half applied feed never has to be untangled. The commands then apply a good file a
batch of lines to a transaction (`apply_feed`, `apply_cards`), so a serving gateway is never
held up for the whole file; `import_points` and `import_cards` apply one in the caller's
transaction. An accrual `source_ref` applied by an earlier file is skipped and reported,
which makes re-sending a feed harmless, a feed stopped midway included.

Messages never show a card number in full: the number column is masked, and any long run of
digits in another column (a shifted column, a reference built from a card number) is masked
the same way.
"""

from __future__ import annotations

import csv
import functools
import io
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from cardcodec.cards import card_number_problem, mask_card_data, mask_card_number
from gateway.clock import expiry_last_day
from gateway.config import CARD_STATUSES, MAX_POINTS, Config
from gateway.errors import BadInput
from gateway.ledger import operations, unit_of_work
from gateway.ledger.db import deadlocked
from gateway.ledger.models import Card, CardStatus
from gateway.loader import CONFIG_REF_PREFIX, moment_at
from gateway.points import MAX_CARD_POINTS
from gateway.rules import TIERS

FEED_HEADER = ("card_number", "earned_on", "points", "source_ref")
CARDS_HEADER = ("number", "expiry", "tier", "status", "enrolled")
MAX_FILE_BYTES = 128 * 1024 * 1024
MAX_LINES = 1_000_000
MAX_FIELD_CHARS = 200
# The journal's idempotency key is `accrual:<source_ref>` in a column of 120 characters.
MAX_SOURCE_REF_CHARS = 120 - len("accrual:")
LOOKUP_CHUNK = 500
# Lines applied in one transaction by the commands: on SQLite the ledger's one writer (a
# serving gateway) waits for one such batch at most (about a second), not for a whole file.
APPLY_LINES = 200
BOOLEANS = {"true": True, "false": False}

_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DIGITS_RE = re.compile(r"[0-9]+")
_SHOWN_CHARS = 40

Parsed = TypeVar("Parsed")


def shown(value: str) -> str:
    """A value from a file as a message may quote it: quoted, cut short, card-like runs masked."""
    masked = mask_card_data(value, shortest=12)
    if len(masked) > _SHOWN_CHARS:
        masked = masked[: _SHOWN_CHARS - 3] + "..."
    return '"' + masked.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


# --- reading a file into checked lines ------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    line: int
    fields: tuple[str, ...]


class _Problems:
    """Bad lines collected in file order, raised together as one message."""

    def __init__(self, file: str) -> None:
        self.file = file
        self._by_line: dict[int, list[str]] = {}

    def add(self, line: int, problem: str) -> None:
        self._by_line.setdefault(line, []).append(problem)

    def raise_if_any(self) -> None:
        if not self._by_line:
            return
        parts = [f"line {line}: {', '.join(self._by_line[line])}" for line in sorted(self._by_line)]
        count = len(parts)
        noun = "bad line" if count == 1 else "bad lines"
        raise BadInput(
            f"{self.file} {'; '.join(parts)} ({count} {noun}; nothing from the file was applied)"
        )


def _read_rows(path: Path, header: Sequence[str], problems: _Problems) -> list[_Row]:
    """The data rows of a UTF-8 CSV with exactly `header`; malformed rows go to `problems`."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        first = next(reader, None)
        if first is None:
            raise BadInput(f"{path} is empty: the first line must be {','.join(header)}")
        if tuple(first) != tuple(header):
            raise BadInput(
                f"{path} line 1: the header must be exactly {','.join(header)}, "
                f"not {shown(','.join(first))}"
            )
        rows = []
        for fields in reader:
            if reader.line_num > MAX_LINES:
                raise BadInput(f"{path}: more than {MAX_LINES} lines; split the file")
            if not fields:
                continue  # a blank line says nothing
            row = _Row(reader.line_num, tuple(fields))
            if _well_formed(row, header, problems):
                rows.append(row)
        return rows
    except csv.Error as error:
        raise BadInput(f"{path} line {reader.line_num}: not CSV ({error})") from None


def _read_text(path: Path) -> str:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise BadInput(f"{path}: cannot read: {error.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise BadInput(f"{path}: larger than {MAX_FILE_BYTES} bytes; split the file")
    try:
        return data.decode("utf-8-sig")  # a spreadsheet's byte order mark is not data
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise BadInput(f"{path} line {line}: not UTF-8 text") from None


def _well_formed(row: _Row, header: Sequence[str], problems: _Problems) -> bool:
    if len(row.fields) != len(header):
        problems.add(row.line, f"{len(row.fields)} fields, expected {len(header)}")
        return False
    for name, value in zip(header, row.fields, strict=True):
        if len(value) > MAX_FIELD_CHARS:
            problems.add(row.line, f"{name} longer than {MAX_FIELD_CHARS} characters")
            return False
    return True


def _field(
    row: _Row, index: int, name: str, parse: Callable[[str], Parsed], problems: _Problems
) -> Parsed | None:
    """One field parsed, or None with the reason (parse raises ValueError) added to problems."""
    try:
        return parse(row.fields[index])
    except ValueError as error:
        problems.add(row.line, f"{name} {error}")
        return None


def _card_number(prefixes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        problem = card_number_problem(value, prefixes)
        if problem is not None:
            raise ValueError(f"{mask_card_number(value)}: {problem}")
        return value

    return parse


def _refuse_repeats(
    rows: Iterable[tuple[int, str | None]], what: str, show: Callable[[str], str]
) -> Iterator[tuple[int, str]]:
    """(line, problem) for each value that appeared on an earlier line of the file."""
    first_line: dict[str, int] = {}
    for line, value in rows:
        if value is None:
            continue
        if value in first_line:
            yield line, f"{what} {show(value)} repeats line {first_line[value]}"
        else:
            first_line[value] = line


# --- the accrual feed ------------------------------------------------------------------------


@dataclass(frozen=True)
class Accrual:
    line: int
    card_number: str
    earned_on: date
    points: int
    source_ref: str


@dataclass(frozen=True)
class SkippedAccrual:
    """A line whose source_ref an earlier file applied: not applied again, not an error."""

    line: int
    source_ref: str
    points: int


@dataclass(frozen=True)
class FeedReport:
    file: str
    applied_lots: int
    applied_points: int
    skipped: tuple[SkippedAccrual, ...]

    @property
    def skipped_points(self) -> int:
        return sum(item.points for item in self.skipped)


def import_points(session: Session, path: Path, config: Config, now: datetime) -> FeedReport:
    """Check every line of an accrual feed, then accrue them all in the caller's transaction."""
    feed = read_feed(path, config, now)
    refuse_bad_lines(session, feed)
    return _accrued(feed, [_accrue(session, feed.accruals, config, now)])


@dataclass(frozen=True)
class CheckedFeed:
    """A feed read and checked as far as it can be without the ledger; `problems` holds what
    was found (not raised yet: `refuse_bad_lines` adds what needs the ledger and raises)."""

    path: Path
    accruals: list[Accrual]
    problems: _Problems
    numbers: list[tuple[int, str]]  # every line's card number that parsed, bad lines' too


def read_feed(path: Path, config: Config, now: datetime) -> CheckedFeed:
    """Every line of the feed parsed and checked (format, values, repeated source_refs),
    without the ledger; `BadInput` only for a file that cannot be read as a feed at all."""
    problems = _Problems(str(path))
    today = now.astimezone(config.gateway.timezone).date()
    parsed = []
    for row in _read_rows(path, FEED_HEADER, problems):
        number = _field(row, 0, "card", _card_number(config.issuer.card_prefixes), problems)
        earned_on = _field(row, 1, "earned_on", _earned_on(today), problems)
        points = _field(row, 2, "points", _points, problems)
        source_ref = _field(row, 3, "source_ref", _source_ref, problems)
        parsed.append((row.line, number, earned_on, points, source_ref))
    refs = ((line, ref) for line, *_, ref in parsed)
    for line, problem in _refuse_repeats(refs, "source_ref", shown):
        problems.add(line, problem)
    accruals = [
        Accrual(line, number, earned_on, points, ref)
        for line, number, earned_on, points, ref in parsed
        if number is not None and earned_on is not None and points is not None and ref
    ]
    numbers = [(line, number) for line, number, *_ in parsed if number is not None]
    return CheckedFeed(path, accruals, problems, numbers)


def refuse_bad_lines(session: Session, feed: CheckedFeed) -> None:
    """`BadInput` naming every bad line of the feed: those `read_feed` found, the lines of
    cards the ledger does not know, and the lines that would take a card past what an answer
    can carry (read in `session`, before anything is applied: the commands apply a feed a
    batch at a time, and a line refused there would leave the batches before it applied)."""
    known = _known_cards(session, {number for _, number in feed.numbers})
    for line, number in feed.numbers:
        if number not in known:
            feed.problems.add(line, f"card {mask_card_number(number)}: unknown card")
    _refuse_past_the_cap(session, feed, known)
    feed.problems.raise_if_any()


def _refuse_past_the_cap(session: Session, feed: CheckedFeed, known: set[str]) -> None:
    """Each line that, with the lines before it for the same card, would take the card past
    `MAX_CARD_POINTS` (the bound `operations.accrue` keeps), counting what the card holds and
    what its approved redemptions may give back; lines applied before are skipped, as the
    apply skips them."""
    accruals = [accrual for accrual in feed.accruals if accrual.card_number in known]
    in_file: dict[str, int] = {}
    for accrual in accruals:
        in_file[accrual.card_number] = in_file.get(accrual.card_number, 0) + accrual.points
    numbers = sorted(in_file)
    totals: dict[str, int] = {}
    for start in range(0, len(numbers), LOOKUP_CHUNK):
        totals.update(operations.accrual_bases(session, numbers[start : start + LOOKUP_CHUNK]))
    # Only a card the whole file would take past the bound needs its lines looked at one by
    # one, less those applied before (rarely any: a million refs are not read for nothing).
    over = {number for number in numbers if totals[number] + in_file[number] > MAX_CARD_POINTS}
    accruals = [accrual for accrual in accruals if accrual.card_number in over]
    refs = sorted({accrual.source_ref for accrual in accruals})
    applied: set[str] = set()
    for start in range(0, len(refs), LOOKUP_CHUNK):
        applied |= operations.accruals_applied(session, refs[start : start + LOOKUP_CHUNK])
    for accrual in accruals:
        if accrual.source_ref in applied:
            continue
        number = accrual.card_number
        totals[number] += accrual.points
        if totals[number] > MAX_CARD_POINTS:
            feed.problems.add(
                accrual.line,
                f"card {mask_card_number(number)}: with this line the card would hold"
                f" {totals[number]} points, counting the lines before it and what its"
                f" approved redemptions may give back, more than the {MAX_CARD_POINTS}"
                " an answer can carry",
            )


def apply_feed(
    engine: Engine,
    feed: CheckedFeed,
    config: Config,
    now: datetime,
    progress: Callable[[int, int], None] | None = None,
) -> FeedReport:
    """A checked feed applied `APPLY_LINES` lines to a transaction, so that a serving gateway
    waits for one batch at most, never for the whole file (a batch takes about 0.1 s of CPU:
    `operations.accrue_many`).
    Stopped midway (a crash, Ctrl-C), whole batches stand, and the same file sent again
    applies the rest: the lines applied are skipped by their source_ref. `progress` gets
    (lines done, lines in all) after each batch."""
    batches = []
    accruals = feed.accruals
    for start in range(0, len(accruals), APPLY_LINES):
        batch = accruals[start : start + APPLY_LINES]
        try:
            batches.append(
                in_transaction(
                    engine, functools.partial(_accrue, accruals=batch, config=config, now=now)
                )
            )
        except BadInput as error:
            # Checked before (`refuse_bad_lines`), so only a ledger changed since (another
            # feed for the same card, applied meanwhile): say what stands.
            if not batches:
                raise
            raise BadInput(
                f"{feed.path}: {error} (nothing from line {batch[0].line} on was applied;"
                f" the lines before it were, and the same file sent again skips them)"
            ) from error
        if progress is not None:
            progress(min(start + APPLY_LINES, len(accruals)), len(accruals))
    return _accrued(feed, batches)


_Accrued = tuple[int, int, list[SkippedAccrual]]
Done = TypeVar("Done")
BATCH_ATTEMPTS = 5


def in_transaction(engine: Engine, work: Callable[[Session], Done]) -> Done:
    """One batch in a transaction of its own, run again when PostgreSQL broke a deadlock by
    rolling it back (a gateway starting meanwhile locks cards in its own order); a batch is
    safe to run again, since nothing of it was committed.

    After it, a pause of `BATCH_PAUSE_S`, so that a serving gateway waiting for SQLite's
    write lock takes it before the next batch: it looks again every 0.2 ms, and the job,
    taking the lock back within microseconds, won it often enough that requests waited
    through several batches, not one."""
    for attempt in range(1, BATCH_ATTEMPTS + 1):
        try:
            with unit_of_work(engine) as session:
                done = work(session)
        except DBAPIError as error:
            if attempt == BATCH_ATTEMPTS or not deadlocked(error):
                raise
            continue
        time.sleep(BATCH_PAUSE_S)
        return done
    raise AssertionError("unreachable")


BATCH_PAUSE_S = 0.002


def _accrue(session: Session, accruals: list[Accrual], config: Config, now: datetime) -> _Accrued:
    """Accrue these lines in `session`: lots applied, their points, and the lines skipped."""
    when = moment_at(config, now)
    applied_lots = applied_points = 0
    skipped = []
    lines = [
        operations.AccrualLine(
            accrual.card_number, accrual.earned_on, accrual.points, accrual.source_ref
        )
        for accrual in accruals
    ]
    outcomes = operations.accrue_many(
        session, lines, when=when, expiry_years=config.plan.expiry_years
    )
    for accrual, outcome in zip(accruals, outcomes, strict=True):
        if isinstance(outcome, operations.AccrualSkipped):
            skipped.append(SkippedAccrual(accrual.line, accrual.source_ref, accrual.points))
        else:
            applied_lots += 1
            applied_points += accrual.points
    return applied_lots, applied_points, skipped


def _accrued(feed: CheckedFeed, batches: list[_Accrued]) -> FeedReport:
    lots = sum(batch[0] for batch in batches)
    points = sum(batch[1] for batch in batches)
    skipped = tuple(item for batch in batches for item in batch[2])
    return FeedReport(str(feed.path), lots, points, skipped)


def _earned_on(today: date) -> Callable[[str], date]:
    def parse(value: str) -> date:
        if not _DATE_RE.fullmatch(value):
            raise ValueError(f"{shown(value)} is not a date YYYY-MM-DD")
        try:
            earned_on = date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{shown(value)} is not a date YYYY-MM-DD") from None
        if earned_on > today:
            raise ValueError(f"{value} is after today ({today})")
        return earned_on

    return parse


def _points(value: str) -> int:
    if not _DIGITS_RE.fullmatch(value) or int(value) == 0:
        raise ValueError(f"{shown(value)} is not a positive integer")
    points = int(value)
    if points > MAX_POINTS:
        raise ValueError(f"{shown(value)} is above the largest lot, {MAX_POINTS}")
    return points


def _source_ref(value: str) -> str:
    if not value:
        raise ValueError("is empty")
    if value.strip() != value or not value.isprintable():
        raise ValueError(f"{shown(value)} must be printable, without spaces around it")
    if len(value) > MAX_SOURCE_REF_CHARS:
        raise ValueError(f"longer than {MAX_SOURCE_REF_CHARS} characters")
    if value.startswith(CONFIG_REF_PREFIX):
        raise ValueError(f"{shown(value)}: {CONFIG_REF_PREFIX} is kept for config lots")
    return value


def _known_cards(session: Session, numbers: set[str]) -> set[str]:
    """Which of the numbers the ledger knows, looked up a bounded chunk at a time."""
    ordered = sorted(numbers)
    known: set[str] = set()
    for start in range(0, len(ordered), LOOKUP_CHUNK):
        chunk = ordered[start : start + LOOKUP_CHUNK]
        known.update(session.scalars(select(Card.number).where(Card.number.in_(chunk))))
    return known


# --- the card import -------------------------------------------------------------------------


@dataclass(frozen=True)
class CardLine:
    line: int
    number: str
    expiry_yymm: str
    tier: str
    status: CardStatus
    enrolled: bool


@dataclass(frozen=True)
class CardImportReport:
    file: str
    new_cards: int
    updated_cards: int


def import_cards(session: Session, path: Path, config: Config, now: datetime) -> CardImportReport:
    """Check every line of a card import, then create or update the cards (never their points)
    in the caller's transaction.

    An existing card keeps its PIN (the file has no PIN column) and its points.
    """
    lines = parse_cards(path, config)
    new = _upsert_cards(session, lines, now)
    return CardImportReport(str(path), new, len(lines) - new)


def apply_cards(
    engine: Engine,
    path: Path,
    lines: list[CardLine],
    now: datetime,
    progress: Callable[[int, int], None] | None = None,
) -> CardImportReport:
    """Checked card lines (`parse_cards`) applied `APPLY_LINES` to a transaction, as
    `apply_feed` applies a feed; stopped midway, the same file sent again is applied whole
    (an upsert)."""
    new = 0
    for start in range(0, len(lines), APPLY_LINES):
        batch = lines[start : start + APPLY_LINES]
        new += in_transaction(engine, functools.partial(_upsert_cards, lines=batch, now=now))
        if progress is not None:
            progress(min(start + APPLY_LINES, len(lines)), len(lines))
    return CardImportReport(str(path), new, len(lines) - new)


def _upsert_cards(session: Session, lines: list[CardLine], now: datetime) -> int:
    """Create or update these cards in `session`; how many were new."""
    new = 0
    for card in lines:
        existing = operations.find_card(session, card.number)
        details = operations.CardDetails(
            number=card.number,
            expiry_yymm=card.expiry_yymm,
            tier=card.tier,
            status=card.status,
            enrolled=card.enrolled,
            pin_hmac=None if existing is None else existing.pin_hmac,
        )
        new += operations.upsert_card(session, details, now)
    return new


def parse_cards(path: Path, config: Config) -> list[CardLine]:
    """The import's lines, or `BadInput` naming every bad one.

    A card the config lists must say what the config says: every load of the config applies
    the config's values again, so an import that differs would be undone without a word.
    """
    problems = _Problems(str(path))
    parse_number = _card_number(config.issuer.card_prefixes)
    parsed = []
    numbers = []
    for row in _read_rows(path, CARDS_HEADER, problems):
        number = _field(row, 0, "card", parse_number, problems)
        expiry = _field(row, 1, "expiry", _expiry, problems)
        tier = _field(row, 2, "tier", _one_of(TIERS), problems)
        status = _field(row, 3, "status", _one_of(CARD_STATUSES), problems)
        enrolled = _field(row, 4, "enrolled", _boolean, problems)
        if number is not None:
            numbers.append((row.line, number))
        if number is None or expiry is None or tier is None or status is None or enrolled is None:
            continue
        card = CardLine(row.line, number, expiry, tier, CardStatus(status), enrolled)
        _check_listed(card, config, problems)
        parsed.append(card)
    for line, problem in _refuse_repeats(numbers, "card", mask_card_number):
        problems.add(line, problem)
    problems.raise_if_any()
    return parsed


def _check_listed(card: CardLine, config: Config, problems: _Problems) -> None:
    listed = next((entry for entry in config.cards if entry.number == card.number), None)
    if listed is None:
        return
    mine = (card.expiry_yymm, card.tier, card.status.value, card.enrolled)
    theirs = (listed.expiry_yymm, listed.tier, listed.status, listed.enrolled)
    if mine != theirs:
        problems.add(
            card.line,
            f"card {mask_card_number(card.number)} is listed in {config.path}, which every "
            "load applies again: change it there",
        )


def _expiry(value: str) -> str:
    try:
        expiry_last_day(value)
    except ValueError:
        raise ValueError(f"{shown(value)} is not YYMM") from None
    return value


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{shown(value)} is not one of {', '.join(choices)}")
        return value

    return parse


def _boolean(value: str) -> bool:
    try:
        return BOOLEANS[value.lower()]
    except KeyError:
        raise ValueError(f"{shown(value)} is not true or false") from None

"""The settlement file's four record layouts (points-and-clearing.md §6), both ways.

Writing and reading a record go through the same table of positions, so the file clearing
writes and the file `verify` reads cannot disagree about where a field is. Every record is
exactly 200 ASCII characters: numbers right-aligned and zero-filled, text left-aligned and
space-filled, signed amounts `+` or `-` and 15 digits (zero is `+`). Positions below are the
spec's, 1-based and inclusive.

Reading is strict and reports every field that is wrong, by position and name, rather than
stopping at the first: the acquirer reading `verify`'s output should see the whole damage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import NamedTuple

from gateway.clock import SHANGHAI

RECORD_LENGTH = 200
FORMAT_ID = "VIPSET01"
SEQUENCE = "001"
SIGNED_DIGITS = 15
MAX_SIGNED = 10**SIGNED_DIGITS - 1
ENTRY_TYPES = ("22", "25", "23", "04")
# Types that name an original: a refund, and the void or reversal of a closed month's entry.
TYPES_WITH_ORIGINAL = ("25", "23", "04")

_ID_RE = re.compile(r"[A-Za-z0-9]+ *")
_MASKED_RE = re.compile(r"[0-9]{6}\*+[0-9]{4} *|\*+[0-9]{4} *|\*+ *")


class LayoutError(ValueError):
    """A value that does not fit its field (a programming error when writing)."""


def number(value: int, width: int) -> str:
    """Right-aligned, zero-filled; a value that does not fit is refused, never cut."""
    if type(value) is not int or value < 0 or value >= 10**width:
        raise LayoutError(f"{value!r} does not fit {width} digits")
    return f"{value:0{width}d}"


def signed(value: int) -> str:
    """`+` or `-` and 15 digits; zero is `+000000000000000`."""
    if type(value) is not int or abs(value) > MAX_SIGNED:
        raise LayoutError(f"{value!r} does not fit a signed amount")
    return f"{'-' if value < 0 else '+'}{abs(value):015d}"


def text(value: str, width: int) -> str:
    """Left-aligned, space-filled ASCII; too long is refused, never cut."""
    if len(value) > width or not value.isascii():
        raise LayoutError(f"{value!r} does not fit {width} ASCII characters")
    return value.ljust(width)


def timestamp(instant: datetime) -> str:
    """YYYYMMDDhhmmss on the Asia/Shanghai clock (§6: times are Asia/Shanghai)."""
    local = instant.astimezone(SHANGHAI)
    # One number formatted once: a million details a month make this worth the arithmetic.
    day = (local.year * 100 + local.month) * 100 + local.day
    return f"{((day * 100 + local.hour) * 100 + local.minute) * 100 + local.second:014d}"


@dataclass(frozen=True)
class Header:
    sender_id: str
    receiver_id: str
    month: str  # YYYYMM
    sequence: str
    created: datetime


class Detail(NamedTuple):
    """One settlement entry as its detail record carries it (a tuple: a month has a million,
    and a tuple is the cheapest immutable record Python makes)."""

    sequence: int
    merchant_id: str
    terminal_id: str
    business_date: date
    local_time: datetime
    entry_type: str
    batch: int
    trace: int
    rrn: str
    card_masked: str
    list_amount_fen: int
    discount_bp: int
    settled_fen: int
    points: int
    fee_fen: int
    net_fen: int
    original_rrn: str | None

    def order_key(self) -> tuple[str, date, str, int, int, str]:
        """§6's order of details (merchant, business date, terminal, batch, trace), with the
        RRN last so that a void and its reversal under one trace still sort one way."""
        return (
            self.merchant_id,
            self.business_date,
            self.terminal_id,
            self.batch,
            self.trace,
            self.rrn,
        )


@dataclass(frozen=True)
class MerchantRecord:
    merchant_id: str
    redemption_count: int
    redemptions_fen: int
    other_count: int
    others_fen: int
    fees_fen: int
    net_fen: int
    fee_bp: int


@dataclass(frozen=True)
class Trailer:
    detail_count: int
    merchant_count: int
    settled_fen: int
    fees_fen: int
    net_fen: int
    sha256: str


def format_header(header: Header) -> str:
    return _exactly(
        "H"
        + FORMAT_ID
        + text(header.sender_id, 15)
        + text(header.receiver_id, 15)
        + header.month
        + header.sequence
        + timestamp(header.created)
    )


# Positions 1-185 of a detail (186-200 are spaces): one template, formatted once per detail.
_DETAIL = "D%08d%-15s%-8s%s%s%s%06d%06d%-12s%-19s%012d%04d%s%015d%010d%s%015d%s%015d%-12s"
_DETAIL_USED = 185


def format_detail(detail: Detail) -> str:
    """A detail record. It is the record written a million times a month, so it is one
    template; the bounds `number`, `signed` and `text` check field by field are checked on
    the result instead: every field is at least its width, so a value too wide for its field
    makes the record too long, and only a negative unsigned figure needs its own check."""
    d = detail
    settled, fee, net = d.settled_fen, d.fee_fen, d.net_fen
    record = _DETAIL % (
        d.sequence,
        d.merchant_id,
        d.terminal_id,
        day_text(d.business_date),
        timestamp(d.local_time),
        d.entry_type,
        d.batch,
        d.trace,
        d.rrn,
        d.card_masked,
        d.list_amount_fen,
        d.discount_bp,
        "-" if settled < 0 else "+",
        abs(settled),
        d.points,
        "-" if fee < 0 else "+",
        abs(fee),
        "-" if net < 0 else "+",
        abs(net),
        d.original_rrn or "",
    )
    unsigned = min(d.sequence, d.batch, d.trace, d.list_amount_fen, d.discount_bp, d.points)
    if len(record) != _DETAIL_USED or len(d.entry_type) != 2 or unsigned < 0:
        raise LayoutError(f"detail {d.sequence}: a figure does not fit its field")
    if not record.isascii():
        raise LayoutError(f"detail {d.sequence}: not ASCII")
    return record.ljust(RECORD_LENGTH)


_DAY_TEXT: dict[date, str] = {}


def day_text(day: date) -> str:
    """YYYYMMDD, remembered: a month has a few dozen business dates and a million details."""
    text_ = _DAY_TEXT.get(day)
    if text_ is None:
        if len(_DAY_TEXT) > 4096:
            _DAY_TEXT.clear()
        text_ = _DAY_TEXT[day] = f"{day.year:04d}{day.month:02d}{day.day:02d}"
    return text_


def format_merchant(record: MerchantRecord) -> str:
    return _exactly(
        "M"
        + text(record.merchant_id, 15)
        + number(record.redemption_count, 8)
        + signed(record.redemptions_fen)
        + number(record.other_count, 8)
        + signed(record.others_fen)
        + signed(record.fees_fen)
        + signed(record.net_fen)
        + number(record.fee_bp, 4)
    )


def format_trailer(trailer: Trailer) -> str:
    return _exactly(
        "T"
        + number(trailer.detail_count, 8)
        + number(trailer.merchant_count, 8)
        + signed(trailer.settled_fen)
        + signed(trailer.fees_fen)
        + signed(trailer.net_fen)
        + text(trailer.sha256, 64)
    )


def _exactly(record: str) -> str:
    if len(record) > RECORD_LENGTH:
        raise LayoutError(f"a {record[0]} record of {len(record)} characters")
    return record.ljust(RECORD_LENGTH)


# --- reading ---------------------------------------------------------------------------------


class FieldReader:
    """Reads the fields of one record by position, collecting a fault per bad field."""

    def __init__(self, record: str, faults: list[str]) -> None:
        self.record = record
        self.faults = faults

    def _take(self, start: int, end: int) -> str:
        return self.record[start - 1 : end]

    def fault(self, start: int, end: int, name: str, problem: str) -> None:
        self.faults.append(f"positions {start}-{end} ({name}): {problem}")

    def literal(self, start: int, end: int, name: str, expected: str) -> None:
        value = self._take(start, end)
        if value != expected:
            self.fault(start, end, name, f"{value!r}, expected {expected!r}")

    def digits(self, start: int, end: int, name: str) -> int:
        value = self._take(start, end)
        if not (value.isascii() and value.isdigit()):
            self.fault(start, end, name, f"{value!r} is not {end - start + 1} digits")
            return 0
        return int(value)

    def amount(self, start: int, end: int, name: str) -> int:
        value = self._take(start, end)
        digits = value[1:]
        if value[:1] not in ("+", "-") or not (digits.isascii() and digits.isdigit()):
            self.fault(start, end, name, f"{value!r} is not a sign and 15 digits")
            return 0
        if value == "-" + "0" * SIGNED_DIGITS:
            self.fault(start, end, name, "zero must be written with '+'")
        return -int(digits) if value[0] == "-" else int(digits)

    def ident(self, start: int, end: int, name: str) -> str:
        """Letters and digits, left-aligned, space-filled (ids)."""
        value = self._take(start, end)
        if not _ID_RE.fullmatch(value):
            self.fault(start, end, name, f"{value!r} is not left-aligned letters and digits")
        return value.rstrip(" ")

    def masked_card(self, start: int, end: int, name: str) -> str:
        value = self._take(start, end)
        if not _MASKED_RE.fullmatch(value):
            self.fault(start, end, name, "is not a masked card number (first 6, *, last 4)")
        return value.rstrip(" ")

    def day(self, start: int, end: int, name: str) -> date:
        value = self._take(start, end)
        if value.isascii() and value.isdigit():
            try:
                return date(int(value[:4]), int(value[4:6]), int(value[6:8]))
            except ValueError:
                pass
        self.fault(start, end, name, f"{value!r} is not a date YYYYMMDD")
        return date.min

    def instant(self, start: int, end: int, name: str) -> datetime:
        value = self._take(start, end)
        if value.isascii() and value.isdigit():
            try:
                return datetime(
                    int(value[:4]),
                    int(value[4:6]),
                    int(value[6:8]),
                    int(value[8:10]),
                    int(value[10:12]),
                    int(value[12:14]),
                    tzinfo=SHANGHAI,
                )
            except ValueError:
                pass
        self.fault(start, end, name, f"{value!r} is not a time YYYYMMDDhhmmss")
        return datetime.min.replace(tzinfo=SHANGHAI)

    def spaces(self, start: int, end: int = RECORD_LENGTH, name: str = "filler") -> None:
        value = self._take(start, end)
        if value.strip(" "):
            self.fault(start, end, name, "must be spaces")


def parse_header(record: str, faults: list[str]) -> Header:
    read = FieldReader(record, faults)
    read.literal(2, 9, "format", FORMAT_ID)
    sender = read.ident(10, 24, "sender")
    receiver = read.ident(25, 39, "receiver")
    month = record[39:45]
    if not re.fullmatch(r"[0-9]{4}(0[1-9]|1[0-2])", month):
        read.fault(40, 45, "month", f"{month!r} is not YYYYMM")
    sequence = record[45:48]
    if not (sequence.isascii() and sequence.isdigit()):
        read.fault(46, 48, "sequence", f"{sequence!r} is not 3 digits")
    created = read.instant(49, 62, "created")
    read.spaces(63)
    return Header(sender, receiver, month, sequence, created)


_FAST_DETAIL = re.compile(
    r"D([0-9]{8})([A-Za-z0-9][A-Za-z0-9 ]{14})([A-Za-z0-9][A-Za-z0-9 ]{7})([0-9]{8})"
    r"([0-9]{14})(22|25|23|04)([0-9]{6})([0-9]{6})([A-Za-z0-9][A-Za-z0-9 ]{11})"
    r"([0-9*][0-9* ]{18})([0-9]{12})([0-9]{4})([+-][0-9]{15})([0-9]{10})([+-][0-9]{15})"
    r"([+-][0-9]{15})([A-Za-z0-9 ]{12}) {15}"
)
_NEGATIVE_ZERO = "-" + "0" * SIGNED_DIGITS
_DAYS: dict[str, date] = {}
_MASKS: dict[str, bool] = {}


def parse_detail(record: str, faults: list[str]) -> Detail:
    """A detail record; every bad field is a fault in `faults` (the fast path reads a good
    record in one regular expression, anything it doubts goes the slow, field by field way
    that names each fault)."""
    detail = _parse_good_detail(record)
    return detail if detail is not None else _parse_detail_by_field(record, faults)


def _parse_good_detail(record: str) -> Detail | None:
    """A detail when every field is right, else None (no fault is recorded here)."""
    match = _FAST_DETAIL.fullmatch(record)
    if match is None:
        return None
    fields = match.groups()
    merchant, terminal, rrn, card = fields[1], fields[2], fields[8], fields[9]
    original, entry_type = fields[16], fields[5]
    if any(" " in value.rstrip(" ") for value in (merchant, terminal, rrn, card, original)):
        return None
    if (original == " " * 12) != (entry_type == "22"):
        return None
    if _NEGATIVE_ZERO in (fields[12], fields[14], fields[15]):
        return None
    valid_mask = _MASKS.get(card)
    if valid_mask is None:
        if len(_MASKS) > 100_000:
            _MASKS.clear()
        valid_mask = _MASKS[card] = _MASKED_RE.fullmatch(card) is not None
    day = _good_day(fields[3])
    local_time = _good_instant(fields[4])
    if day is None or local_time is None:
        return None
    if not valid_mask:
        return None
    return Detail(
        int(fields[0]),
        merchant.rstrip(" "),
        terminal.rstrip(" "),
        day,
        local_time,
        entry_type,
        int(fields[6]),
        int(fields[7]),
        rrn.rstrip(" "),
        card.rstrip(" "),
        int(fields[10]),
        int(fields[11]),
        int(fields[12]),
        int(fields[13]),
        int(fields[14]),
        int(fields[15]),
        original.rstrip(" ") or None,
    )


def _good_day(text_: str) -> date | None:
    """YYYYMMDD as a date (remembered: a month has few), or None."""
    day = _DAYS.get(text_)
    if day is None:
        try:
            day = _DAYS[text_] = date(int(text_[:4]), int(text_[4:6]), int(text_[6:]))
        except ValueError:
            return None
    return day


def _good_instant(stamp: str) -> datetime | None:
    """YYYYMMDDhhmmss on the Shanghai clock, or None."""
    try:
        return datetime(
            int(stamp[:4]),
            int(stamp[4:6]),
            int(stamp[6:8]),
            int(stamp[8:10]),
            int(stamp[10:12]),
            int(stamp[12:]),
            tzinfo=SHANGHAI,
        )
    except ValueError:
        return None


def _parse_detail_by_field(record: str, faults: list[str]) -> Detail:
    read = FieldReader(record, faults)
    entry_type = record[54:56]
    if entry_type not in ENTRY_TYPES:
        read.fault(55, 56, "type", f"{entry_type!r} is not one of {', '.join(ENTRY_TYPES)}")
    original = record[173:185]
    if entry_type in TYPES_WITH_ORIGINAL:
        original_rrn: str | None = read.ident(174, 185, "original RRN")
        if not original_rrn:
            read.fault(174, 185, "original RRN", f"missing for type {entry_type}")
    else:
        original_rrn = None
        if original.strip(" "):
            read.fault(174, 185, "original RRN", f"must be spaces for type {entry_type}")
    detail = Detail(
        sequence=read.digits(2, 9, "sequence"),
        merchant_id=read.ident(10, 24, "merchant"),
        terminal_id=read.ident(25, 32, "terminal"),
        business_date=read.day(33, 40, "business date"),
        local_time=read.instant(41, 54, "local time"),
        entry_type=entry_type,
        batch=read.digits(57, 62, "batch"),
        trace=read.digits(63, 68, "trace"),
        rrn=read.ident(69, 80, "RRN"),
        card_masked=read.masked_card(81, 99, "card number"),
        list_amount_fen=read.digits(100, 111, "list amount"),
        discount_bp=read.digits(112, 115, "discount bp"),
        settled_fen=read.amount(116, 131, "settled amount"),
        points=read.digits(132, 141, "points"),
        fee_fen=read.amount(142, 157, "fee"),
        net_fen=read.amount(158, 173, "net"),
        original_rrn=original_rrn,
    )
    read.spaces(186)
    return detail


def parse_merchant(record: str, faults: list[str]) -> MerchantRecord:
    read = FieldReader(record, faults)
    merchant = MerchantRecord(
        merchant_id=read.ident(2, 16, "merchant"),
        redemption_count=read.digits(17, 24, "redemption count"),
        redemptions_fen=read.amount(25, 40, "redemptions settled"),
        other_count=read.digits(41, 48, "other count"),
        others_fen=read.amount(49, 64, "others settled"),
        fees_fen=read.amount(65, 80, "fees"),
        net_fen=read.amount(81, 96, "net payable"),
        fee_bp=read.digits(97, 100, "fee bp"),
    )
    read.spaces(101)
    return merchant


def parse_trailer(record: str, faults: list[str]) -> Trailer:
    read = FieldReader(record, faults)
    digest = record[65:129]
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        read.fault(66, 129, "SHA-256", "is not 64 lower-case hex digits")
    trailer = Trailer(
        detail_count=read.digits(2, 9, "detail count"),
        merchant_count=read.digits(10, 17, "merchant count"),
        settled_fen=read.amount(18, 33, "total settled"),
        fees_fen=read.amount(34, 49, "total fees"),
        net_fen=read.amount(50, 65, "total net"),
        sha256=digest,
    )
    read.spaces(130)
    return trailer


def file_name(receiver_id: str, month_compact: str, sequence: str = SEQUENCE) -> str:
    """`VIPSETTLE_<acquirer id>_<YYYYMM>_<seq>.txt`."""
    return f"VIPSETTLE_{receiver_id}_{month_compact}_{sequence}.txt"


def signature_name(name: str) -> str:
    """The signature beside a file: `<name>.sig`, the file's whole name with `.sig` after it."""
    return f"{name}.sig"

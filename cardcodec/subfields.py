"""Typed views of the fields that carry structure: 22, 53, 60, 61, 48, 54, 63 and track 2.

Each view parses the field's string (as the codec gives it) and formats it back; a value that
does not fit raises `CodecError` naming the field, never the value.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from cardcodec.cards import mask_card_number
from cardcodec.crypto import Suite
from cardcodec.errors import CodecError


def _digits(value: str, field: int, length: int, what: str) -> str:
    if len(value) != length or not value.isdigit() or not value.isascii():
        raise CodecError(f"{what} must be {length} digits", field=field)
    return value


def _number(value: int, width: int, field: int, what: str) -> str:
    if not 0 <= value < 10**width:
        raise CodecError(f"{what} does not fit {width} digits", field=field)
    return f"{value:0{width}d}"


# ---------------------------------------------------------------------------------------------
# Field 3 and field 22


PROCESSING_REDEMPTION = "000000"
PROCESSING_VOID_REFUND = "200000"
PROCESSING_BALANCE = "310000"


@dataclass(frozen=True, slots=True)
class EntryMode:
    """Field 22: `02x` swipe or `01x` keyed; third digit `1` PIN entered, `2` no PIN."""

    keyed: bool
    pin_entered: bool

    @classmethod
    def parse(cls, value: str) -> EntryMode:
        known = _ENTRY_MODES.get(value)
        if known is not None:
            return known
        if len(value) != 3 or value[0] != "0" or value[1] not in "12" or value[2] not in "12":
            raise CodecError("entry mode must be 01x or 02x with x 1 or 2", field=22)
        return cls(keyed=value[1] == "1", pin_entered=value[2] == "1")

    def format(self) -> str:
        return "0" + ("1" if self.keyed else "2") + ("1" if self.pin_entered else "2")


# Every valid field 22, parsed once: the value of every card request is one of these four.
_ENTRY_MODES = {
    mode.format(): mode
    for mode in (EntryMode(keyed, pin) for keyed in (False, True) for pin in (False, True))
}


# ---------------------------------------------------------------------------------------------
# Field 53


_SUITE_DIGITS = {"6": Suite.TDES, "4": Suite.SM4}


@dataclass(frozen=True, slots=True)
class SecurityControl:
    """Field 53: PIN with card number (`2`) or none (`0`); suite `6` 3DES or `4` SM4;
    track encrypted `1` or not `0`; the other 13 digits `0`."""

    pin: bool
    suite: Suite
    track_encrypted: bool

    @classmethod
    def parse(cls, value: str) -> SecurityControl:
        known = _SECURITY_CONTROLS.get(value)
        if known is not None:
            return known
        _digits(value, 53, 16, "security control")
        suite = _SUITE_DIGITS.get(value[1])
        if value[0] not in "02" or suite is None or value[2] not in "01" or value[3:] != "0" * 13:
            raise CodecError("security control digits out of range", field=53)
        return cls(pin=value[0] == "2", suite=suite, track_encrypted=value[2] == "1")

    def format(self) -> str:
        suite_digit = "6" if self.suite is Suite.TDES else "4"
        pin_digit = "2" if self.pin else "0"
        return pin_digit + suite_digit + ("1" if self.track_encrypted else "0") + "0" * 13


# Every valid field 53, parsed once: the value of every card request is one of these eight.
_SECURITY_CONTROLS = {
    control.format(): control
    for control in (
        SecurityControl(pin, suite, encrypted)
        for pin in (False, True)
        for suite in Suite
        for encrypted in (False, True)
    )
}


# ---------------------------------------------------------------------------------------------
# Field 60


MSG_MANAGEMENT = "00"
MSG_BALANCE = "01"
MSG_REDEMPTION = "22"
MSG_VOID = "23"
MSG_REFUND = "25"

NMC_SIGN_ON_3DES = "003"
NMC_SIGN_ON_3DES_TDK = "004"
NMC_SIGN_ON_SM4 = "005"
NMC_SIGN_ON_SM4_TDK = "006"
NMC_SIGN_OFF = "002"
NMC_ECHO = "301"
NMC_SETTLEMENT = "201"
NMC_UPLOAD_END_UNBALANCED = "202"
NMC_UPLOAD_END_BALANCED = "207"
NMC_FINANCIAL = "000"

# Field 60 values parsed, bounded (the oldest goes when it is full): a terminal sends the same
# value with every request of a kind in a batch, and a request's 60 is read more than once.
# Only values that parse are kept; plain dict operations are atomic, so threads share it.
_MESSAGE_DATA_SIZE = 4096
_MESSAGE_DATA: dict[str, MessageData] = {}


@dataclass(frozen=True, slots=True)
class MessageData:
    """Field 60: 60.1 message type, 60.2 batch, 60.3 network management code, and for
    financial messages 60.4 read capability, 60.5 IC condition, 60.6 partial approval."""

    message_type: str
    batch: str
    management_code: str
    read_capability: str | None = None
    ic_condition: str | None = None
    partial_supported: bool | None = None

    @property
    def financial(self) -> bool:
        return self.read_capability is not None

    @classmethod
    def parse(cls, value: str) -> MessageData:
        known = _MESSAGE_DATA.get(value)
        if known is None:
            known = cls._parse(value)
            if len(_MESSAGE_DATA) >= _MESSAGE_DATA_SIZE:
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                    del _MESSAGE_DATA[next(iter(_MESSAGE_DATA))]  # the oldest, unless raced
            _MESSAGE_DATA[value] = known
        return known

    @classmethod
    def _parse(cls, value: str) -> MessageData:
        if len(value) not in (11, 14) or not value.isdigit():
            raise CodecError("message data must be 11 or 14 digits", field=60)
        head = cls(value[0:2], value[2:8], value[8:11])
        if len(value) == 11:
            return head
        if value[13] not in "01":
            raise CodecError("60.6 must be 0 or 1", field=60)
        return cls(head.message_type, head.batch, head.management_code, value[11], value[12],
                   value[13] == "1")  # fmt: skip

    def format(self) -> str:
        head = (
            _digits(self.message_type, 60, 2, "60.1")
            + _digits(self.batch, 60, 6, "60.2 batch")
            + _digits(self.management_code, 60, 3, "60.3")
        )
        if self.read_capability is None:
            return head
        rest = f"{self.read_capability}{self.ic_condition}{int(bool(self.partial_supported))}"
        return head + _digits(rest, 60, 3, "60.4-60.6")

    def with_batch(self, batch: str) -> MessageData:
        return MessageData(
            self.message_type,
            batch,
            self.management_code,
            self.read_capability,
            self.ic_condition,
            self.partial_supported,
        )


# ---------------------------------------------------------------------------------------------
# Field 61


@dataclass(frozen=True, slots=True)
class OriginalData:
    """Field 61: original batch n6 + original trace n6 (+ original date MMDD for refunds)."""

    batch: str
    trace: str
    date: str | None = None

    @classmethod
    def parse(cls, value: str) -> OriginalData:
        if len(value) not in (12, 16) or not value.isdigit():
            raise CodecError("original data must be 12 or 16 digits", field=61)
        return cls(value[0:6], value[6:12], value[12:16] or None)

    def format(self) -> str:
        text = _digits(self.batch, 61, 6, "61 batch") + _digits(self.trace, 61, 6, "61 trace")
        return text + (_digits(self.date, 61, 4, "61 date") if self.date is not None else "")


# ---------------------------------------------------------------------------------------------
# Field 48: settlement totals, batch upload records, end of upload


@dataclass(frozen=True, slots=True)
class Totals:
    """One half of the settlement totals: debits and credits, amounts in fen."""

    debit_fen: int
    debit_count: int
    credit_fen: int
    credit_count: int

    def format(self) -> str:
        return (
            _number(self.debit_fen, 12, 48, "debit amount")
            + _number(self.debit_count, 3, 48, "debit count")
            + _number(self.credit_fen, 12, 48, "credit amount")
            + _number(self.credit_count, 3, 48, "credit count")
        )

    @classmethod
    def parse(cls, value: str) -> Totals:
        return cls(int(value[0:12]), int(value[12:15]), int(value[15:27]), int(value[27:30]))


ZERO_TOTALS = Totals(0, 0, 0, 0)

RESULT_REQUEST = 0
RESULT_BALANCED = 1
RESULT_UNBALANCED = 2


@dataclass(frozen=True, slots=True)
class SettlementTotals:
    """Field 48 of the 0500/0510: totals n30 + result n1, then the same 31 digits for foreign
    cards (all zeros in this scheme)."""

    totals: Totals
    result: int = RESULT_REQUEST
    foreign: Totals = ZERO_TOTALS
    foreign_result: int = 0

    @classmethod
    def parse(cls, value: str) -> SettlementTotals:
        _digits(value, 48, 62, "settlement totals")
        return cls(Totals.parse(value[0:30]), int(value[30]), Totals.parse(value[31:61]),
                   int(value[61]))  # fmt: skip

    @classmethod
    def parse_request(cls, value: str) -> SettlementTotals:
        """A 0500's field 48: result `0`, and the 31 digits for foreign cards all zeros."""
        parsed = cls.parse(value)
        if parsed.result != RESULT_REQUEST:
            raise CodecError("the result digit of a settlement request must be 0", field=48)
        if value[31:] != "0" * 31:
            raise CodecError("the foreign cards' totals and result must be zeros", field=48)
        return parsed

    def format(self) -> str:
        return (
            self.totals.format()
            + _number(self.result, 1, 48, "result")
            + self.foreign.format()
            + _number(self.foreign_result, 1, 48, "foreign result")
        )


UPLOAD_RECORD_DIGITS = 40
MAX_UPLOAD_RECORDS = 8


@dataclass(frozen=True, slots=True)
class UploadRecord:
    """One record of a batch upload: `00` + trace n6 + card number n20 + amount n12."""

    trace: str
    card_number: str
    amount_fen: int

    def __repr__(self) -> str:
        masked = mask_card_number(self.card_number)
        return f"UploadRecord(trace={self.trace!r}, card={masked!r}, amount_fen={self.amount_fen})"

    def format(self) -> str:
        if not self.card_number.isdigit() or len(self.card_number) > 20:
            raise CodecError("upload card number must be up to 20 digits", field=48)
        return (
            "00"
            + _digits(self.trace, 48, 6, "upload trace")
            + self.card_number.rjust(20, "0")
            + _number(self.amount_fen, 12, 48, "upload amount")
        )


# A card number is 13-19 digits (right-aligned in the record's n20, zero-filled): a 20th
# significant digit, or none at all, is no card the terminal could have read.
MIN_UPLOAD_CARD_DIGITS = 13
MAX_UPLOAD_CARD_DIGITS = 19


def parse_upload(value: str) -> tuple[UploadRecord, ...]:
    """Field 48 of a 0320 with 60.3 `201`: count n2 (1-8) then the records."""
    if not value.isdigit() or len(value) < 2:
        raise CodecError("batch upload must be digits with a count", field=48)
    count = int(value[0:2])
    if not 1 <= count <= MAX_UPLOAD_RECORDS or len(value) != 2 + count * UPLOAD_RECORD_DIGITS:
        raise CodecError("batch upload count does not match its records", field=48)
    records = []
    for start in range(2, len(value), UPLOAD_RECORD_DIGITS):
        chunk = value[start : start + UPLOAD_RECORD_DIGITS]
        if chunk[0:2] != "00":
            raise CodecError("batch upload record must start with 00", field=48)
        if chunk[2:8] == "000000":  # a trace runs 000001-999999 (field 11)
            raise CodecError("batch upload record's trace must not be 000000", field=48)
        card = chunk[8:28].lstrip("0")
        if not MIN_UPLOAD_CARD_DIGITS <= len(card) <= MAX_UPLOAD_CARD_DIGITS:
            raise CodecError("batch upload record's card number must be 13 to 19 digits", field=48)
        records.append(UploadRecord(chunk[2:8], card, int(chunk[28:40])))
    return tuple(records)


def format_upload(records: tuple[UploadRecord, ...] | list[UploadRecord]) -> str:
    if not 1 <= len(records) <= MAX_UPLOAD_RECORDS:
        raise CodecError("batch upload carries 1 to 8 records", field=48)
    return f"{len(records):02d}" + "".join(record.format() for record in records)


def parse_upload_end(value: str) -> int:
    """Field 48 of the end 0320 (60.3 `202` or `207`): total records n4."""
    return int(_digits(value, 48, 4, "end of upload record count"))


def format_upload_end(total_records: int) -> str:
    return _number(total_records, 4, 48, "end of upload record count")


# ---------------------------------------------------------------------------------------------
# Field 54 and field 63 of responses


BALANCE_PREFIX = "9002156C"  # field 54's fixed head: 90, 02, currency 156, C


@dataclass(frozen=True, slots=True, init=False)
class Balance:
    """Field 54: `90` `02` `156` `C` + n12, the cash value of the spendable points in fen."""

    amount_fen: int

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(self, amount_fen: int) -> None:
        object.__setattr__(self, "amount_fen", amount_fen)

    @classmethod
    def parse(cls, value: str) -> Balance:
        digits = value[len(BALANCE_PREFIX) :]
        if not value.startswith(BALANCE_PREFIX) or len(digits) != 12 or not digits.isdigit():
            raise CodecError("balance must be 9002156C and 12 digits", field=54)
        return cls(int(digits))

    def format(self) -> str:
        return BALANCE_PREFIX + _number(self.amount_fen, 12, 54, "balance")


@dataclass(frozen=True, slots=True, init=False)
class PointsInfo:
    """Field 63 of a response: `VIP` + points used or returned n10 + spendable balance after
    n10 + discount bp n4 + cash value in fen n12 (39 characters)."""

    points: int
    balance_points: int
    discount_bp: int
    cash_fen: int

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(self, points: int, balance_points: int, discount_bp: int, cash_fen: int) -> None:
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "balance_points", balance_points)
        object.__setattr__(self, "discount_bp", discount_bp)
        object.__setattr__(self, "cash_fen", cash_fen)

    @classmethod
    def parse(cls, value: str) -> PointsInfo:
        digits = value[3:]
        if not value.startswith("VIP") or len(digits) != 36 or not digits.isdigit():
            raise CodecError("points data must be VIP and 36 digits", field=63)
        return cls(int(digits[0:10]), int(digits[10:20]), int(digits[20:24]), int(digits[24:36]))

    def format(self) -> str:
        return (
            "VIP"
            + _number(self.points, 10, 63, "points")
            + _number(self.balance_points, 10, 63, "balance")
            + _number(self.discount_bp, 4, 63, "discount")
            + _number(self.cash_fen, 12, 63, "cash value")
        )


def parse_operator(value: str) -> str:
    """Field 63 of a 0800 or 0500: the operator code, 3 characters."""
    if len(value) != 3:
        raise CodecError("operator code must be 3 characters", field=63)
    return value


# ---------------------------------------------------------------------------------------------
# Track 2


SEPARATOR = "D"
TRACK_TAIL_DIGITS = 4 + 3 + 10  # expiry, service code, discretionary data


@dataclass(frozen=True, slots=True, init=False)
class Track2:
    """Track 2 in clear: card number, `D`, expiry YYMM, service code (3), discretionary (10)."""

    card_number: str
    expiry_yymm: str
    service_code: str
    discretionary: str

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(
        self,
        card_number: str,
        expiry_yymm: str,
        service_code: str,
        discretionary: str,
    ) -> None:
        object.__setattr__(self, "card_number", card_number)
        object.__setattr__(self, "expiry_yymm", expiry_yymm)
        object.__setattr__(self, "service_code", service_code)
        object.__setattr__(self, "discretionary", discretionary)

    def __repr__(self) -> str:
        return f"Track2(card_number={mask_card_number(self.card_number)!r}, ...)"

    @classmethod
    def parse(cls, value: str) -> Track2:
        """Parse a clear (decrypted) track; checked only now, after decryption (§5.4)."""
        card, tail = _track_parts(value)
        return cls(card, tail[0:4], tail[4:7], tail[7:17])

    @staticmethod
    def check(value: str) -> None:
        """What `parse` refuses, without building the track: for a check that only needs to
        know that a clear track will parse later."""
        _track_parts(value)

    def format(self) -> str:
        tail = self.expiry_yymm + self.service_code + self.discretionary
        if not self.card_number.isdigit() or len(tail) != TRACK_TAIL_DIGITS or not tail.isdigit():
            raise CodecError("track 2 parts have the wrong shape", field=35)
        return self.card_number + SEPARATOR + tail


def _track_parts(value: str) -> tuple[str, str]:
    """A clear track's card number and the 17 digits after the separator, or `CodecError`."""
    card, separator, tail = value.partition(SEPARATOR)
    valid = (
        separator
        and 1 <= len(card) <= 19
        and card.isdigit()
        and len(tail) == TRACK_TAIL_DIGITS
        and tail.isdigit()
    )
    if not valid:
        raise CodecError("track 2 is not card number D YYMM service discretionary", field=35)
    return card, tail

"""The field table of the POS 8583 profile (pos-8583.md §2), as data.

One row per field: its format code, how its length is carried and its maximum. The pyiso8583
spec dict that walks the bytes is derived from this table; the codec's own checks (digits in
numeric fields, character classes in text fields) read the same rows. Nothing else in the
package knows a field's format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any


class Format(Enum):
    """The format codes of §2."""

    NUMERIC = "n"  # packed BCD, right-aligned when fixed, left-aligned when variable
    NUMERIC_LEFT = "n-left"  # packed BCD, left-aligned even when fixed (field 22 only)
    TRACK = "z"  # packed BCD with `D` as separator, left-aligned
    ALPHANUMERIC = "an"  # ASCII letters and digits
    PRINTABLE = "ans"  # ASCII letters, digits, space and specials
    BINARY = "b"  # raw bytes


class Length(Enum):
    """How a field's length is carried: not at all, or a 1- or 2-byte BCD prefix."""

    FIXED = 0
    LL = 1
    LLL = 2


@dataclass(frozen=True, slots=True)
class FieldDef:
    """One row of the profile's field table."""

    number: int
    name: str
    format: Format
    length: Length
    max_len: int  # digits for n/z fields, bytes for every other field

    @property
    def counts_digits(self) -> bool:
        return self.format in (Format.NUMERIC, Format.NUMERIC_LEFT, Format.TRACK)

    @property
    def is_text(self) -> bool:
        return self.format in (Format.ALPHANUMERIC, Format.PRINTABLE)


N, NL, Z, AN, ANS, B = (
    Format.NUMERIC,
    Format.NUMERIC_LEFT,
    Format.TRACK,
    Format.ALPHANUMERIC,
    Format.PRINTABLE,
    Format.BINARY,
)
FIXED, LL, LLL = Length.FIXED, Length.LL, Length.LLL

_TABLE = (
    FieldDef(2, "card number", N, LL, 19),
    FieldDef(3, "processing code", N, FIXED, 6),
    FieldDef(4, "amount", N, FIXED, 12),
    FieldDef(11, "trace number", N, FIXED, 6),
    FieldDef(12, "local time", N, FIXED, 6),
    FieldDef(13, "local date", N, FIXED, 4),
    FieldDef(14, "card expiry", N, FIXED, 4),
    FieldDef(15, "settlement date", N, FIXED, 4),
    FieldDef(22, "entry mode", NL, FIXED, 3),
    FieldDef(25, "condition code", N, FIXED, 2),
    FieldDef(26, "PIN capture code", N, FIXED, 2),
    FieldDef(32, "acquirer institution", N, LL, 11),
    FieldDef(35, "track 2", Z, LL, 37),
    FieldDef(37, "reference number", AN, FIXED, 12),
    FieldDef(38, "authorisation code", AN, FIXED, 6),
    FieldDef(39, "response code", AN, FIXED, 2),
    FieldDef(41, "terminal id", ANS, FIXED, 8),
    FieldDef(42, "merchant id", ANS, FIXED, 15),
    FieldDef(48, "additional data", N, LLL, 322),
    FieldDef(49, "currency", AN, FIXED, 3),
    FieldDef(52, "PIN block", B, FIXED, 8),
    FieldDef(53, "security control", N, FIXED, 16),
    FieldDef(54, "balance", AN, LLL, 20),
    FieldDef(60, "message data", N, LLL, 17),
    FieldDef(61, "original data", N, LLL, 29),
    FieldDef(62, "keys or SM4 PIN", B, LLL, 512),
    FieldDef(63, "operator or points", ANS, LLL, 163),
    FieldDef(64, "MAC", B, FIXED, 8),
)

FIELDS: Mapping[int, FieldDef] = MappingProxyType({row.number: row for row in _TABLE})

# Fields whose values are card data or secrets: never echoed in an error, never logged.
SENSITIVE_FIELDS = frozenset({2, 14, 35, 52, 62})


def _pyiso_field(row: FieldDef) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "data_enc": "b" if row.format not in (AN, ANS) else "ascii",
        "len_enc": "bcd",
        "len_type": row.length.value,
        "max_len": row.max_len,
        "desc": row.name,
    }
    if row.counts_digits:
        spec["len_count"] = "nibbles"
        # Right-aligned fixed numerics pad on the left; everything else is left-aligned.
        spec["left_pad" if row.format is N and row.length is FIXED else "right_pad"] = "0"
    return spec


def _pyiso_spec() -> dict[str, dict[str, Any]]:
    spec: dict[str, dict[str, Any]] = {
        "h": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 0, "desc": "none"},
        "t": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 2, "desc": "MTI"},
        "p": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 8, "desc": "bitmap"},
    }
    spec.update({str(number): _pyiso_field(row) for number, row in FIELDS.items()})
    return spec


# The pyiso8583 spec dict for the body of a message (MTI, bitmap, fields).
PYISO_SPEC: Mapping[str, Mapping[str, Any]] = MappingProxyType(_pyiso_spec())

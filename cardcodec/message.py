"""Messages of the POS profile: bytes <-> `Message`, walked from the pyiso8583 spec of `spec.py`.

The spec dict is the one description of the fields. At import it is compiled into one row per
field (its bit, the width of its BCD length prefix, its maximum, whether lengths count nibbles,
its pad and the check of its values), and the codec walks the bitmap over those rows with plain
slicing, `bytes.hex` and `binascii`; consecutive fixed-length fields read alike (packed digits,
or ASCII text) take one slice, and the steps for each bitmap are compiled once and cached. The
walk reads and writes exactly what pyiso8583's own per-field decoder and encoder do with the same
spec, refuses what they refuse with the same reasons, and adds the profile's rules: no bit 1, no
field outside the table, and an answer built from the fields read before the first bad one.
tests/test_codec_fast.py holds the walk to pyiso8583 byte for byte.

A `Message` is the envelope (TPDU, header), the MTI and a dict of fields: `str` for numeric,
track and text fields (digits as sent, pads removed), `bytes` for binary fields (52, 62, 64).
Decoding checks everything §2 asks of the bytes except track contents, which are checked after
decryption (§5.4); encoding checks the same of the values, so that the codec never sends what it
would refuse to receive. Every problem is a `CodecError` naming the place, never the value.
"""

from __future__ import annotations

import binascii
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar, cast

from cardcodec.errors import CodecError
from cardcodec.frame import (
    ENVELOPE_BYTES,
    HEADER_BYTES,
    LENGTH_BYTES,
    PROCESSING_OK,
    TPDU_BYTES,
    Header,
    Tpdu,
    add_length,
    check_length,
)
from cardcodec.spec import FIELDS, PYISO_SPEC, SENSITIVE_FIELDS, Format

FieldValue = str | bytes

MTI_BYTES = 2
BITMAP_BYTES = 8
MAC_FIELD = 64
MAC_BYTES = 8

# The MTIs of §4, requests and their responses; any other closes the link.
MESSAGE_TYPE_INDICATORS = frozenset(
    {"0800", "0810", "0820", "0830", "0200", "0210", "0220", "0230"}
    | {"0400", "0410", "0500", "0510", "0320", "0330"}
)

# Fields a `30` answer may echo from a request that failed to decode (never card data).
ECHOABLE_FIELDS = frozenset({3, 4, 11, 25, 41, 42, 49, 60, 61})


def _bit(number: int) -> int:
    return 1 << (64 - number)


KNOWN_FIELDS_MASK = sum(_bit(number) for number in FIELDS)
SECONDARY_BITMAP_BIT = _bit(1)
_MAC_BIT = _bit(MAC_FIELD)
_MTI_TO_BYTES = {mti: bytes.fromhex(mti) for mti in MESSAGE_TYPE_INDICATORS}
_MTI_BY_BYTES = {raw: mti for mti, raw in _MTI_TO_BYTES.items()}
_RESPONSE_MTI = {mti: f"{int(mti) + 10:04d}" for mti in MESSAGE_TYPE_INDICATORS}


@dataclass(slots=True, init=False)
class Message:
    """One ISO 8583 message of the profile with its envelope."""

    mti: str
    fields: dict[int, FieldValue] = field(default_factory=dict)
    tpdu: Tpdu = field(default_factory=Tpdu)
    header: Header = field(default_factory=Header)

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(
        self,
        mti: str,
        fields: dict[int, FieldValue] | None = None,
        tpdu: Tpdu | None = None,
        header: Header | None = None,
    ) -> None:
        self.mti = mti
        self.fields = {} if fields is None else fields
        self.tpdu = Tpdu() if tpdu is None else tpdu
        self.header = Header() if header is None else header

    def __repr__(self) -> str:
        shown = {n: ("<hidden>" if n in SENSITIVE_FIELDS else v) for n, v in self.fields.items()}
        return f"Message(mti={self.mti!r}, fields={shown!r})"

    def text(self, number: int) -> str:
        """A numeric or text field's value; `KeyError` when absent."""
        value = self.fields[number]
        if not isinstance(value, str):
            raise TypeError(f"field {number} is binary")
        return value

    def binary(self, number: int) -> bytes:
        """A binary field's value; `KeyError` when absent."""
        value = self.fields[number]
        if not isinstance(value, bytes):
            raise TypeError(f"field {number} is not binary")
        return value

    def reply(self, fields: dict[int, FieldValue], processing: str = PROCESSING_OK) -> Message:
        """The answer's envelope and MTI (request + 10) around the given fields."""
        mti = _RESPONSE_MTI.get(self.mti) or f"{int(self.mti) + 10:04d}"
        return Message(mti, fields, self.tpdu.swapped(), self.header.for_response(processing))


# ---------------------------------------------------------------------------------------------
# The field rows, compiled once from the pyiso8583 spec dict.
#
# Value checks, one per format, are C-level string predicates: non-ASCII text cannot get through
# in either direction (numeric data goes through hex, text through the ascii codec), so each
# predicate only has to separate the classes within ASCII.

_TEXT_CHECKS: dict[Format, Callable[[str], bool] | None] = {
    Format.NUMERIC: str.isdigit,
    Format.NUMERIC_LEFT: str.isdigit,
    Format.TRACK: None,  # contents are checked after decryption (§5.4); hex is the walk's
    Format.ALPHANUMERIC: str.isalnum,
    Format.PRINTABLE: str.isprintable,
}

# How a field's data is carried: packed nibbles read as hex digits (n, z), text in the spec's
# encoding (an, ans), or raw bytes kept as they are (b). Nibbles that must all be digits (n) are
# their own kind: `bytes.hex` writes digits the same in either case, so they skip the `upper`.
_HEX, _TEXT, _BINARY, _DIGITS = 0, 1, 2, 3


class _Row(NamedTuple):
    """One field as the walk needs it, derived from its pyiso8583 spec entry."""

    number: int
    bit: int
    kind: int  # _DIGITS, _HEX, _TEXT or _BINARY
    width: int  # bytes of the BCD length prefix; 0 when the field is fixed
    max_len: int  # the fixed length, or the largest a prefix may carry, in `unit`s
    nibbles: bool  # lengths count nibbles (packed BCD) rather than bytes
    unit: str  # "nibbles" or "bytes", as pyiso8583 words its reasons
    encoding: str  # the codec of a text field's bytes
    left_pad: str  # pad nibble of an odd-length value, on the left ("" for none)
    right_pad: str  # pad nibble of an odd-length value, on the right ("" for none)
    check: Callable[[str], bool] | None  # the value check of a non-binary field
    problem: str  # the reason given when the check fails
    prefixes: tuple[bytes, ...]  # the encoded length prefix of every length 0..max_len


def _compile_row(number: int, spec: Mapping[str, Any]) -> _Row:
    width = spec["len_type"]
    max_len = spec["max_len"]
    unit = spec.get("len_count", "bytes")
    data_enc = spec["data_enc"]
    if width not in (0, 1, 2) or (width and spec["len_enc"] != "bcd"):
        raise ValueError(f"field {number}: the walk knows fixed fields and BCD LL and LLL")
    if width and max_len >= 100**width:
        raise ValueError(f"field {number}: maximum does not fit the length prefix")
    binary = FIELDS[number].format is Format.BINARY
    if binary and (data_enc != "b" or unit != "bytes"):
        raise ValueError(f"field {number}: binary fields are raw bytes counted in bytes")
    check = None if binary else _TEXT_CHECKS[FIELDS[number].format]
    pads = spec.get("left_pad", "")[:1] + spec.get("right_pad", "")[:1]
    if binary:
        kind = _BINARY
    elif data_enc != "b":
        kind = _TEXT
    else:
        kind = _DIGITS if check is str.isdigit and (not pads or pads.isdigit()) else _HEX
    prefixes = tuple(
        binascii.a2b_hex(f"{length:0{2 * width}d}") if width else b""
        for length in range(max_len + 1)
    )
    return _Row(
        number=number,
        bit=_bit(number),
        kind=kind,
        width=width,
        max_len=max_len,
        nibbles=unit == "nibbles",
        unit=unit,
        encoding="" if data_enc == "b" else data_enc,
        left_pad=spec.get("left_pad", "")[:1],
        right_pad=spec.get("right_pad", "")[:1],
        check=check,
        problem=f"not {FIELDS[number].format.value} data",
        prefixes=prefixes,
    )


def _compile(spec: Mapping[str, Mapping[str, Any]]) -> dict[int, _Row]:
    envelope = {key: (spec[key]["data_enc"], spec[key]["max_len"]) for key in "htp"}
    if envelope != {"h": ("b", 0), "t": ("b", MTI_BYTES), "p": ("b", BITMAP_BYTES)}:
        raise ValueError("the walk knows a binary MTI and bitmap and no ISO header")
    return {number: _compile_row(number, spec[str(number)]) for number in sorted(FIELDS)}


_ROWS = _compile(PYISO_SPEC)
_ROW_LIST = tuple(_ROWS.values())  # in field order

# A value of every BCD byte (two digits), -1 for a byte with an A-F nibble.
_BCD = tuple(
    10 * (byte >> 4) + (byte & 15) if byte >> 4 < 10 and byte & 15 < 10 else -1
    for byte in range(256)
)

# Caches of immutable values, each bounded (the oldest entry goes when one is full) so that
# random bitmaps or envelopes cannot grow them; a miss costs one compile or one read. Terminals
# send few distinct bitmaps and each sends the same envelope every time. Plain dict operations
# are atomic, so the reactor and the ledger threads can share them.
_CACHE_SIZE = 4096
_LAYOUTS: dict[int, tuple[_Row | _Run, ...]] = {}  # the walk's steps for a bitmap
_DECODED_HEADS: dict[bytes, tuple[Tpdu, Header, str]] = {}  # TPDU, header and MTI read
_ENCODED_ENVELOPES: dict[tuple[Tpdu, Header], bytes] = {}  # TPDU and header written

_K = TypeVar("_K")
_V = TypeVar("_V")


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> _V:
    if len(cache) >= _CACHE_SIZE:
        with contextlib.suppress(KeyError, RuntimeError, StopIteration):
            del cache[next(iter(cache))]  # unless another thread changed the cache meanwhile
    cache[key] = value
    return value


class _Run(NamedTuple):
    """Consecutive fixed-length fields read as one: one slice, one `hex` or one `decode`."""

    rows: tuple[_Row, ...]
    size: int  # bytes
    upper: bool  # hex digits are upper-cased (a track among them)
    encoding: str  # the text fields' codec, or "" for nibbles
    # Per field: number, its value's slice of the run's text, its byte offset in the run, its
    # check and the reason when that fails, and its row when an odd count of nibbles is padded.
    members: tuple[tuple[int, int, int, int, Callable[[str], bool] | None, str, _Row | None], ...]


def _run_reading(row: _Row) -> str | None:
    """How a fixed field can share one read with its neighbours: "hex", a codec, or not."""
    if row.width or row.kind == _BINARY:
        return None
    if row.kind == _TEXT:
        return row.encoding if row.encoding == "ascii" and not row.nibbles else None
    return "hex"


def _run(rows: list[_Row]) -> _Run:
    members = []
    offset = 0
    hex_digits = _run_reading(rows[0]) == "hex"
    for row in rows:
        size = (row.max_len + 1) >> 1 if row.nibbles else row.max_len
        lo, hi = (2 * offset, 2 * (offset + size)) if hex_digits else (offset, offset + size)
        padded = row if hex_digits and row.nibbles and row.max_len & 1 else None
        members.append((row.number, lo, hi, offset, row.check, row.problem, padded))
        offset += size
    upper = any(row.kind == _HEX for row in rows)
    encoding = "" if hex_digits else rows[0].encoding
    return _Run(tuple(rows), offset, upper, encoding, tuple(members))


def _plan(rows: tuple[_Row, ...]) -> tuple[_Row | _Run, ...]:
    """The steps of a walk over `rows`: runs of fixed fields read alike, and single fields."""
    steps: list[_Row | _Run] = []
    group: list[_Row] = []
    for row in (*rows, None):
        reading = None if row is None else _run_reading(row)
        if group and (reading is None or reading != _run_reading(group[0])):
            steps.extend([_run(group)] if len(group) > 1 else group)
            group = []
        if row is not None and reading is not None:
            group.append(row)
        elif row is not None:
            steps.append(row)
    return tuple(steps)


def _layout(bits: int) -> tuple[_Row | _Run, ...]:
    steps = _LAYOUTS.get(bits)
    if steps is None:
        steps = _plan(tuple(row for row in _ROW_LIST if bits & row.bit))
        _remember(_LAYOUTS, bits, steps)
    return steps


# ---------------------------------------------------------------------------------------------
# Decoding

_HEAD_BYTES = ENVELOPE_BYTES + MTI_BYTES  # TPDU, header and MTI
_BODY_START = _HEAD_BYTES + BITMAP_BYTES  # the first field, in the payload


def decode_frame(frame: bytes) -> Message:
    """Decode a whole frame, its 2-byte length included."""
    if len(frame) < LENGTH_BYTES:
        raise CodecError("frame shorter than its length prefix", part="length", offset=0)
    length = int.from_bytes(frame[:LENGTH_BYTES], "big")
    check_length(length)
    if length != len(frame) - LENGTH_BYTES:
        raise CodecError(
            f"length says {length} bytes, {len(frame) - LENGTH_BYTES} follow",
            part="length",
            offset=0,
        )
    return decode_message(frame[LENGTH_BYTES:])


def _decode_head(head: bytes) -> tuple[Tpdu, Header, str]:
    """TPDU, header and MTI, checked in that order; remembered once they pass."""
    tpdu = Tpdu.decode(head[:TPDU_BYTES], LENGTH_BYTES)
    header = Header.decode(head[TPDU_BYTES:ENVELOPE_BYTES], LENGTH_BYTES + TPDU_BYTES)
    mti = _MTI_BY_BYTES.get(head[ENVELOPE_BYTES:])
    if mti is None:
        raise CodecError("MTI not in the profile", part="MTI", offset=LENGTH_BYTES + ENVELOPE_BYTES)
    return _remember(_DECODED_HEADS, head, (tpdu, header, mti))


def decode_message(payload: bytes) -> Message:
    """Decode a payload: the bytes after the length prefix (TPDU onwards)."""
    if payload.__class__ is not bytes:
        payload = bytes(payload)  # binary values are bytes, and the caches' keys hashable
    if len(payload) < _BODY_START:
        raise CodecError("frame too short for TPDU, header, MTI and bitmap", offset=LENGTH_BYTES)
    head = payload[:_HEAD_BYTES]
    tpdu, header, mti = _DECODED_HEADS.get(head) or _decode_head(head)
    envelope = Message(mti, {}, tpdu, header)
    bitmap = int.from_bytes(payload[_HEAD_BYTES:_BODY_START], "big")
    if bitmap & SECONDARY_BITMAP_BIT:
        raise CodecError(
            "bitmap bit 1 set (no secondary bitmap in this profile)",
            field=1,
            part="bitmap",
            offset=LENGTH_BYTES + ENVELOPE_BYTES + MTI_BYTES,
            partial=envelope,
        )
    unknown = bitmap & ~KNOWN_FIELDS_MASK
    first_unknown = 65
    if unknown:
        first_unknown = 65 - unknown.bit_length()
        bitmap &= ~((1 << (65 - first_unknown)) - 1)  # the fields before it are read
    fields: dict[int, FieldValue] = {}
    try:
        index, bad = _walk(payload, _LAYOUTS.get(bitmap) or _layout(bitmap), fields)
    except _UnreadableFieldError as error:
        envelope.fields = _echoable(fields)  # the fields read before the one that failed
        raise CodecError(
            error.reason, field=error.number, offset=LENGTH_BYTES + error.index, partial=envelope
        ) from None
    if unknown:
        envelope.fields = _echoable(fields)
        raise CodecError(
            f"bitmap bit {first_unknown} set for a field the profile does not have",
            field=first_unknown,
            part="bitmap",
            offset=LENGTH_BYTES + index,
            partial=envelope,
        )
    if index != len(payload):
        envelope.fields = _echoable(fields)
        raise CodecError("data after the last field", offset=LENGTH_BYTES + index, partial=envelope)
    if bad is not None:
        # A value that failed its check was framed all the same (a fixed length, or a
        # prefix that read), so the fields after it are where the walk found them: §7's
        # `30` needs 11, 41 and 42 to be readable, wherever the bad value is, and §4 echoes
        # 60 too. The bad value itself is not among `fields`.
        number, start, problem = bad
        envelope.fields = _echoable(fields)
        raise CodecError(problem, field=number, offset=LENGTH_BYTES + start, partial=envelope)
    envelope.fields = fields
    return envelope


class _UnreadableFieldError(Exception):
    """A field the walk cannot read: why, which, and where in the payload."""

    def __init__(self, reason: str, number: int, index: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.number = number
        self.index = index


def _walk(
    payload: bytes,
    steps: tuple[_Row | _Run, ...],
    fields: dict[int, FieldValue],
    index: int = _BODY_START,
    bad: tuple[int, int, str] | None = None,
) -> tuple[int, tuple[int, int, str] | None]:
    """Read the steps' fields into `fields`, as pyiso8583 reads them with the same spec.

    Values that fail their check are left out; the first of them is returned (field, offset,
    reason) with the index after the last field, for the caller to refuse once the bitmap and
    the length are known to be right.
    """
    size = len(payload)
    for row in steps:
        if isinstance(row, _Run):
            index, bad = _read_run(payload, row, fields, index, bad)
            continue
        number, _, kind, width, max_len, nibbles, unit, encoding, _, _, check, problem, _ = row
        start = index
        if width:
            length = _prefixed_length(payload, index, row)
            index += width
            if not length:  # no field of the profile is meaningful empty (field 62 too)
                if bad is None:
                    bad = (number, start, "empty")
                continue
        else:
            length = max_len
        end = index + ((length + 1) >> 1 if nibbles else length)
        if end > size:
            actual = (size - index) * (2 if nibbles else 1)
            raise _UnreadableFieldError(
                f"Field data is {actual} {unit}, expecting {length}", number, index
            )
        if kind in (_DIGITS, _HEX):
            value = payload[index:end].hex()
            if kind == _HEX:
                value = value.upper()
            if length & 1 and nibbles:
                unpadded = _unpad(value, row)
                if unpadded is None:  # framed all the same: the walk goes on after it
                    if bad is None:
                        bad = (number, index, _pad_problem(value, length))
                    index = end
                    continue
                value = unpadded
        elif kind == _TEXT:
            try:
                value = payload[index:end].decode(encoding)
            except ValueError:  # framed all the same (its length is known): the walk goes on
                if bad is None:
                    bad = (number, start, problem)
                index = end
                continue
        else:
            fields[number] = payload[index:end]
            index = end
            continue
        index = end
        if check is None or check(value):
            fields[number] = value
        elif bad is None:
            bad = (number, start, problem)
    return index, bad


def _read_run(
    payload: bytes,
    run: _Run,
    fields: dict[int, FieldValue],
    index: int,
    bad: tuple[int, int, str] | None,
) -> tuple[int, tuple[int, int, str] | None]:
    """A run of fixed fields from one slice; field by field when one is cut short or unreadable."""
    end = index + run.size
    text: str | None = None
    if end <= len(payload):
        if not run.encoding:
            text = payload[index:end].hex()
            if run.upper:
                text = text.upper()
        else:
            try:
                text = payload[index:end].decode(run.encoding)
            except ValueError:
                text = None
    if text is None:  # the single-field walk says which field, and why
        return _walk(payload, run.rows, fields, index, bad)
    for number, lo, hi, offset, check, problem, padded in run.members:
        value = text[lo:hi]
        if padded is not None:
            unpadded = _unpad(value, padded)
            if unpadded is None:
                if bad is None:
                    bad = (number, index + offset, _pad_problem(value, padded.max_len))
                continue
            value = unpadded
        if check is None or check(value):
            fields[number] = value
        elif bad is None:
            bad = (number, index + offset, problem)
    return end, bad


def _prefixed_length(payload: bytes, index: int, row: _Row) -> int:
    """The length a field's BCD prefix at `index` carries, checked against the maximum."""
    width = row.width
    if index + width > len(payload):
        reason = f"Field length is {len(payload) - index} bytes wide, expecting {width}"
        raise _UnreadableFieldError(reason, row.number, index)
    length = _BCD[payload[index]]
    if width == 2 and length >= 0:
        low = _BCD[payload[index + 1]]
        length = length * 100 + low if low >= 0 else -1
    if length < 0:
        raise _UnreadableFieldError(
            "Failed to decode field length, invalid BCD data", row.number, index
        )
    if length > row.max_len:
        reason = f"Field data is {length} {row.unit}, larger than maximum {row.max_len}"
        raise _UnreadableFieldError(reason, row.number, index)
    return length


def _unpad(value: str, row: _Row) -> str | None:
    """An odd count of nibbles without its pad nibble; None when the pad is not the spec's
    (a format error, §2, of a value whose extent is known all the same)."""
    if row.left_pad and value[:1] == row.left_pad:
        return value[1:]
    if row.right_pad and value[-1:] == row.right_pad:
        return value[:-1]
    return None


def _pad_problem(value: str, length: int) -> str:
    return f"Field data is {len(value)} nibbles, expecting {length}"


def _echoable(fields: dict[int, FieldValue]) -> dict[int, FieldValue]:
    """The fields a `30` answer may echo; binary fields are never among them."""
    return {n: v for n, v in fields.items() if n in ECHOABLE_FIELDS}


# ---------------------------------------------------------------------------------------------
# Encoding


class _EncodeRun(NamedTuple):
    """Consecutive fixed-length fields written as one: one `a2b_hex` or one `encode`."""

    numbers: tuple[int, ...]
    bitmap: int
    encoding: str  # the text fields' codec, or "" for nibbles
    # Per field: number, the length its value must have, its check, and its pad nibble with
    # whether it goes on the left ("" when the count of nibbles is even).
    members: tuple[tuple[int, int, Callable[[str], bool] | None, str, bool], ...]


_EncodeStep = tuple[int, ...] | _EncodeRun  # fields written one by one, or a run
_ENCODE_PLANS: dict[tuple[int | None, ...], tuple[_EncodeStep, ...]] = {}


def _encode_run(rows: list[_Row]) -> _EncodeRun:
    members = []
    for row in rows:
        pad = (row.left_pad or row.right_pad) if row.nibbles and row.max_len & 1 else ""
        members.append((row.number, row.max_len, row.check, pad, bool(row.left_pad)))
    encoding = "" if _run_reading(rows[0]) == "hex" else rows[0].encoding
    numbers = tuple(row.number for row in rows)
    return _EncodeRun(numbers, sum(row.bit for row in rows), encoding, tuple(members))


def _encode_plan(key: tuple[int | None, ...]) -> tuple[_EncodeStep, ...]:
    """The steps that write the fields named in `key` (the field left out, then the fields)."""
    skip = key[0]
    ordered: list[int] = sorted(cast(int, n) for n in key[1:] if skip is None or n != skip)
    if not all(number.__class__ is int and number in _ROWS for number in ordered):
        return (tuple(ordered),)  # the single-field path refuses what is not in the profile
    steps: list[_EncodeStep] = []
    group: list[_Row] = []
    singles: list[int] = []
    for number in (*ordered, None):
        row = None if number is None else _ROWS[number]
        reading = None if row is None else _run_reading(row)
        if reading == "hex" and row is not None and not row.nibbles:
            reading = None
        if group and reading != _run_reading(group[0]):
            if len(group) > 1:
                steps.extend(
                    [tuple(singles), _encode_run(group)] if singles else [_encode_run(group)]
                )
                singles = []
            else:
                singles.append(group[0].number)
            group = []
        if row is not None and reading is not None:
            group.append(row)
        elif row is not None:
            singles.append(row.number)
    if singles:
        steps.append(tuple(singles))
    plan = tuple(steps)
    return _remember(_ENCODE_PLANS, key, plan)


def _encode_fields(
    fields: dict[int, FieldValue], skip: int | None = None
) -> tuple[int, list[bytes]]:
    """The bitmap and the encoded fields, in field order; field `skip` is left out."""
    key = (skip, *fields)
    chunks: list[bytes] = []
    bitmap = 0
    for step in _ENCODE_PLANS.get(key) or _encode_plan(key):
        if not isinstance(step, _EncodeRun):
            bitmap |= _encode_numbers(fields, step, chunks)
            continue
        data = _write_run(fields, step)
        if data is None:  # field by field says which, and why
            bitmap |= _encode_numbers(fields, step.numbers, chunks)
        else:
            chunks.append(data)
            bitmap |= step.bitmap
    return bitmap, chunks


def _write_run(fields: dict[int, FieldValue], run: _EncodeRun) -> bytes | None:
    """A run's bytes, or None when a value is not right (the single-field path says why)."""
    parts: list[str] = []
    for number, length, check, pad, left in run.members:
        value = fields[number]
        if value.__class__ is not str or len(value) != length:
            return None
        if check is not None and not check(value):
            return None
        parts.append(value if not pad else pad + value if left else value + pad)
    text = "".join(parts)
    try:
        return text.encode(run.encoding) if run.encoding else binascii.a2b_hex(text)
    except ValueError:
        return None


def _encode_numbers(
    fields: dict[int, FieldValue], numbers: tuple[int, ...], chunks: list[bytes]
) -> int:
    """Write the fields one by one onto `chunks`; returns their bits.

    Each field is written as pyiso8583 writes it with the same spec, and refused with its
    reasons; the value checks of `_TEXT_CHECKS` come first.
    """
    bitmap = 0
    rows = _ROWS
    unhex = binascii.a2b_hex
    for number in numbers:
        row = rows.get(number)
        if row is None:
            raise CodecError("field not in the profile", field=number)
        _, bit, kind, width, max_len, nibbles, unit, encoding, lpad, rpad, check, problem, _ = row
        value = fields[number]
        if kind == _BINARY:
            if not isinstance(value, bytes):
                raise CodecError("binary field needs bytes", field=number)
            if width and not value:
                raise CodecError("empty", field=number)
            data = value
            length = len(data)
        elif not (isinstance(value, str) and value and (check is None or check(value))):
            raise CodecError(problem, field=number)
        elif kind == _TEXT:
            try:
                data = value.encode(encoding)
            except ValueError:
                raise CodecError("Failed to encode field, invalid data", field=number) from None
            length = 2 * len(data) if nibbles else len(data)
        else:
            length = len(value)
            padded = (lpad + value if lpad else value + rpad) if length & 1 and nibbles else value
            try:
                data = unhex(padded)
            except ValueError:
                raise _hex_error(row, padded) from None
            if not nibbles:
                length = len(data)
        if not width:
            if length != max_len:
                reason = f"Field data is {length} {unit}, expecting {max_len}"
                raise CodecError(reason, field=number)
            chunks.append(data)
        elif length > max_len:
            reason = f"Field data is {length} {unit}, larger than maximum {max_len}"
            raise CodecError(reason, field=number)
        else:
            chunks.append(row.prefixes[length] + data)
        bitmap |= bit
    return bitmap


def _hex_error(row: _Row, padded: str) -> CodecError:
    """Why a numeric or track value cannot be packed into nibbles."""
    if len(padded) & 1:
        reason = (
            "Failed to encode field, odd-length nibble data, specify pad"
            if row.nibbles
            else "Failed to encode field, odd-length hex data"
        )
    else:
        reason = "Failed to encode field, non-hex data"
    return CodecError(reason, field=row.number)


def _encode_envelope(message: Message) -> bytes:
    key = (message.tpdu, message.header)
    raw = _ENCODED_ENVELOPES.get(key)
    if raw is None:
        raw = message.tpdu.encode() + message.header.encode()
        _remember(_ENCODED_ENVELOPES, key, raw)
    return raw


def _mti_bytes(mti: str) -> bytes:
    raw = _MTI_TO_BYTES.get(mti)
    if raw is None:
        raise CodecError("MTI not in the profile", part="MTI")
    return raw


def encode_message(message: Message) -> bytes:
    """Encode a message to its payload (TPDU onwards), checking every value first."""
    mti = _mti_bytes(message.mti)
    bitmap, chunks = _encode_fields(message.fields)
    return b"".join((_encode_envelope(message), mti, bitmap.to_bytes(BITMAP_BYTES, "big"), *chunks))


def encode_frame(message: Message) -> bytes:
    """Encode a message to a whole frame, 2-byte length included."""
    return add_length(encode_message(message))


# ---------------------------------------------------------------------------------------------
# MAC (field 64): the input is the message from the MTI to the end of field 63, with bit 64 set
# in the bitmap. Field 64 is fixed-length and last, so on the wire it is the final 8 bytes.

MacFunction = Callable[[bytes], bytes]


def has_mac(payload: bytes) -> bool:
    """Whether bit 64 is set in the bitmap of an encoded payload."""
    return len(payload) >= _BODY_START and bool(payload[_BODY_START - 1] & 1)


def mac_input(payload: bytes) -> bytes:
    """The MAC input of an encoded payload that carries field 64 (the bytes as sent)."""
    if len(payload) < _BODY_START or not payload[_BODY_START - 1] & 1:
        raise CodecError("no MAC in the message", field=MAC_FIELD)
    return payload[ENVELOPE_BYTES:-MAC_BYTES]


def received_mac(payload: bytes) -> bytes:
    """The 8 bytes of field 64 of an encoded payload that carries it."""
    if len(payload) < _BODY_START or not payload[_BODY_START - 1] & 1:
        raise CodecError("no MAC in the message", field=MAC_FIELD)
    return payload[-MAC_BYTES:]


def encode_message_with_mac(message: Message, compute_mac: MacFunction) -> bytes:
    """Encode with field 64 computed over the encoded bytes; returns the payload."""
    mti = _mti_bytes(message.mti)
    bitmap, chunks = _encode_fields(message.fields, MAC_FIELD)
    signed = b"".join((mti, (bitmap | _MAC_BIT).to_bytes(BITMAP_BYTES, "big"), *chunks))
    envelope = _encode_envelope(message)
    mac = compute_mac(signed)
    if len(mac) != MAC_BYTES:
        raise CodecError("MAC must be 8 bytes", field=MAC_FIELD)
    return b"".join((envelope, signed, mac))


__all__ = [
    "HEADER_BYTES",
    "MESSAGE_TYPE_INDICATORS",
    "FieldValue",
    "Message",
    "decode_frame",
    "decode_message",
    "encode_frame",
    "encode_message",
    "encode_message_with_mac",
    "has_mac",
    "mac_input",
    "received_mac",
]

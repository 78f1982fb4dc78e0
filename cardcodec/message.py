"""Messages of the POS profile: bytes <-> `Message`, through the pyiso8583 spec of `spec.py`.

pyiso8583 encodes and decodes each field from the spec dict; the walk over the bitmap is done
here, because the profile's bitmap rules (no bit 1, no field outside the table, and an answer
built from the fields read before the first bad one) need it anyway, and doing it once keeps the
codec within a few microseconds of pyiso8583's own cost.

A `Message` is the envelope (TPDU, header), the MTI and a dict of fields: `str` for numeric,
track and text fields (digits as sent, pads removed), `bytes` for binary fields (52, 62, 64).
Decoding checks everything §2 asks of the bytes except track contents, which are checked after
decryption (§5.4); encoding checks the same of the values, so that the codec never sends what it
would refuse to receive. Every problem is a `CodecError` naming the place, never the value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from iso8583.decoder import DecodeError
from iso8583.decoder import _decode_field as decode_field
from iso8583.encoder import EncodeError
from iso8583.encoder import _encode_field as encode_field

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
_FIELD_BITS = tuple((number, _bit(number)) for number in sorted(FIELDS))
SECONDARY_BITMAP_BIT = _bit(1)


@dataclass(slots=True)
class Message:
    """One ISO 8583 message of the profile with its envelope."""

    mti: str
    fields: dict[int, FieldValue] = field(default_factory=dict)
    tpdu: Tpdu = field(default_factory=Tpdu)
    header: Header = field(default_factory=Header)

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
        mti = f"{int(self.mti) + 10:04d}"
        return Message(mti, fields, self.tpdu.swapped(), self.header.for_response(processing))


# ---------------------------------------------------------------------------------------------
# Field checks, one per format. They are C-level string predicates: non-ASCII text cannot get
# through pyiso8583 in either direction (numeric data goes through bytes.fromhex, text through
# the ascii codec), so each predicate only has to separate the classes within ASCII.

_TEXT_CHECKS: dict[Format, Callable[[str], bool] | None] = {
    Format.NUMERIC: str.isdigit,
    Format.NUMERIC_LEFT: str.isdigit,
    Format.TRACK: None,  # contents are checked after decryption (§5.4); hex is pyiso8583's
    Format.ALPHANUMERIC: str.isalnum,
    Format.PRINTABLE: str.isprintable,
}
_BINARY, _TEXT = True, False
# Per field key: (number, is binary, the check of a text value or None).
_ROWS: dict[str, tuple[int, bool, Callable[[str], bool] | None]] = {
    str(number): (
        number,
        row.format is Format.BINARY,
        None if row.format is Format.BINARY else _TEXT_CHECKS[row.format],
    )
    for number, row in FIELDS.items()
}
_KEYS: dict[int, str] = {number: str(number) for number in FIELDS}
_SPEC = dict(PYISO_SPEC)  # a plain dict: pyiso8583 looks fields up on every message


# ---------------------------------------------------------------------------------------------
# Decoding


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


def decode_message(payload: bytes) -> Message:
    """Decode a payload: the bytes after the length prefix (TPDU onwards)."""
    base = LENGTH_BYTES
    if len(payload) < ENVELOPE_BYTES + MTI_BYTES + BITMAP_BYTES:
        raise CodecError("frame too short for TPDU, header, MTI and bitmap", offset=base)
    tpdu = Tpdu.decode(payload[:TPDU_BYTES], base)
    header = Header.decode(payload[TPDU_BYTES:ENVELOPE_BYTES], base + TPDU_BYTES)
    body = payload[ENVELOPE_BYTES:]
    body_offset = base + ENVELOPE_BYTES
    mti = body[:MTI_BYTES].hex()
    if mti not in MESSAGE_TYPE_INDICATORS:
        raise CodecError("MTI not in the profile", part="MTI", offset=body_offset)
    envelope = Message(mti, {}, tpdu, header)
    bitmap = int.from_bytes(body[MTI_BYTES : MTI_BYTES + BITMAP_BYTES], "big")
    if bitmap & SECONDARY_BITMAP_BIT:
        raise CodecError(
            "bitmap bit 1 set (no secondary bitmap in this profile)",
            field=1,
            part="bitmap",
            offset=body_offset + MTI_BYTES,
            partial=envelope,
        )
    unknown = bitmap & ~KNOWN_FIELDS_MASK
    first_unknown = 65 - unknown.bit_length() if unknown else 65
    decoded: dict[str, str] = {}
    encoded: dict[str, dict[str, bytes]] = {}
    index = MTI_BYTES + BITMAP_BYTES
    try:
        for number, bit in _FIELD_BITS:
            if number > first_unknown:
                break
            if bitmap & bit:
                key = _KEYS[number]
                index = decode_field(body, decoded, encoded, index, key, _SPEC[key])
    except DecodeError as error:
        raise _decode_error(error, envelope, body_offset) from None
    if unknown:
        envelope.fields = _echoable(_safe_typed(decoded))
        raise CodecError(
            f"bitmap bit {first_unknown} set for a field the profile does not have",
            field=first_unknown,
            part="bitmap",
            offset=body_offset + index,
            partial=envelope,
        )
    if index != len(body):
        envelope.fields = _echoable(_safe_typed(decoded))
        raise CodecError("data after the last field", offset=body_offset + index, partial=envelope)
    envelope.fields = _typed_fields(decoded, encoded, body_offset, envelope)
    return envelope


def _typed_fields(
    decoded: dict[str, str],
    encoded: dict[str, dict[str, bytes]],
    body_offset: int,
    envelope: Message,
) -> dict[int, FieldValue]:
    fields: dict[int, FieldValue] = {}
    rows = _ROWS
    for key, value in decoded.items():
        number, binary, check = rows[key]
        if binary:
            fields[number] = encoded[key]["data"]
        elif value and (check is None or check(value)):
            fields[number] = value
        else:
            envelope.fields = _echoable(fields)
            problem = "empty" if not value else f"not {FIELDS[number].format.value} data"
            raise CodecError(
                problem,
                field=number,
                offset=body_offset + _field_offset(encoded, key),
                partial=envelope,
            )
    return fields


def _field_offset(encoded: dict[str, dict[str, bytes]], stop_key: str) -> int:
    """Byte offset of a field within the body (MTI onwards), from the encoded parts."""
    offset = MTI_BYTES + BITMAP_BYTES
    for key, parts in encoded.items():
        if key == stop_key:
            break
        offset += len(parts["len"]) + len(parts["data"])
    return offset


def _decode_error(error: DecodeError, envelope: Message, body_offset: int) -> CodecError:
    readable = {k: v for k, v in error.doc_dec.items() if k != error.field}
    envelope.fields = _echoable(_safe_typed(readable))
    return CodecError(
        error.msg, field=int(error.field), offset=body_offset + error.pos, partial=envelope
    )


def _safe_typed(decoded: dict[str, str]) -> dict[int, FieldValue]:
    """The text fields of a partial decode that passed their own checks."""
    fields: dict[int, FieldValue] = {}
    for key, value in decoded.items():
        number, binary, check = _ROWS[key]
        if not binary and value and (check is None or check(value)):
            fields[number] = value
    return fields


def _echoable(fields: dict[int, FieldValue]) -> dict[int, FieldValue]:
    return {n: v for n, v in fields.items() if n in ECHOABLE_FIELDS}


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_message(message: Message) -> bytes:
    """Encode a message to its payload (TPDU onwards), checking every value first."""
    if message.mti not in MESSAGE_TYPE_INDICATORS:
        raise CodecError("MTI not in the profile", part="MTI")
    document: dict[str, str] = {}
    parts: dict[str, dict[str, bytes]] = {}
    chunks: list[bytes] = []
    bitmap = 0
    rows, spec = _ROWS, _SPEC
    for number in sorted(message.fields):
        key = _KEYS.get(number)
        if key is None:
            raise CodecError("field not in the profile", field=number)
        value = message.fields[number]
        _, binary, check = rows[key]
        if binary:
            if not isinstance(value, bytes):
                raise CodecError("binary field needs bytes", field=number)
            document[key] = value.hex()
        elif isinstance(value, str) and value and (check is None or check(value)):
            document[key] = value
        else:
            raise CodecError(f"not {FIELDS[number].format.value} data", field=number)
        try:
            chunks.append(encode_field(document, parts, key, spec[key]))
        except EncodeError as error:
            raise CodecError(error.msg, field=number) from None
        bitmap |= _bit(number)
    return b"".join(
        (
            message.tpdu.encode(),
            message.header.encode(),
            bytes.fromhex(message.mti),
            bitmap.to_bytes(BITMAP_BYTES, "big"),
            *chunks,
        )
    )


def encode_frame(message: Message) -> bytes:
    """Encode a message to a whole frame, 2-byte length included."""
    return add_length(encode_message(message))


# ---------------------------------------------------------------------------------------------
# MAC (field 64): the input is the message from the MTI to the end of field 63, with bit 64 set
# in the bitmap. Field 64 is fixed-length and last, so on the wire it is the final 8 bytes.

MacFunction = Callable[[bytes], bytes]


def has_mac(payload: bytes) -> bool:
    """Whether bit 64 is set in the bitmap of an encoded payload."""
    last_bitmap_byte = ENVELOPE_BYTES + MTI_BYTES + BITMAP_BYTES - 1
    return len(payload) > last_bitmap_byte and bool(payload[last_bitmap_byte] & 1)


def mac_input(payload: bytes) -> bytes:
    """The MAC input of an encoded payload that carries field 64 (the bytes as sent)."""
    if not has_mac(payload):
        raise CodecError("no MAC in the message", field=MAC_FIELD)
    return payload[ENVELOPE_BYTES:-MAC_BYTES]


def received_mac(payload: bytes) -> bytes:
    """The 8 bytes of field 64 of an encoded payload that carries it."""
    if not has_mac(payload):
        raise CodecError("no MAC in the message", field=MAC_FIELD)
    return payload[-MAC_BYTES:]


def encode_message_with_mac(message: Message, compute_mac: MacFunction) -> bytes:
    """Encode with field 64 computed over the encoded bytes; returns the payload."""
    fields = dict(message.fields)
    fields[MAC_FIELD] = bytes(MAC_BYTES)
    unsigned = encode_message(Message(message.mti, fields, message.tpdu, message.header))
    mac = compute_mac(unsigned[ENVELOPE_BYTES:-MAC_BYTES])
    if len(mac) != MAC_BYTES:
        raise CodecError("MAC must be 8 bytes", field=MAC_FIELD)
    return unsigned[:-MAC_BYTES] + mac


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

"""The codec's own field walk against pyiso8583, which stays the reference.

`reference_decode_message` and `reference_encode_message` walk the same bitmap with pyiso8583's
per-field decoder and encoder over the same spec dict, plus the profile's checks (the codec as
it was before it compiled the spec). On random valid messages the codec must write the bytes
pyiso8583 writes and read back what pyiso8583 reads; on random bytes and random values it must
accept what the reference accepts and refuse what it refuses, with the same reason, field, part,
offset and partial message.
"""

from __future__ import annotations

import string
import threading
from collections.abc import Callable

import iso8583
from hypothesis import given, settings
from hypothesis import strategies as st
from iso8583.decoder import DecodeError
from iso8583.decoder import _decode_field as decode_field
from iso8583.encoder import EncodeError
from iso8583.encoder import _encode_field as encode_field

from cardcodec import crypto
from cardcodec import message as codec
from cardcodec.crypto import Suite, decrypt_ecb, encrypt_ecb, mac
from cardcodec.errors import CodecError
from cardcodec.frame import ENVELOPE_BYTES, LENGTH_BYTES, TPDU_BYTES, Header, Tpdu
from cardcodec.message import (
    BITMAP_BYTES,
    ECHOABLE_FIELDS,
    KNOWN_FIELDS_MASK,
    MESSAGE_TYPE_INDICATORS,
    MTI_BYTES,
    SECONDARY_BITMAP_BIT,
    FieldValue,
    Message,
    decode_message,
    encode_message,
    encode_message_with_mac,
)
from cardcodec.spec import FIELDS, PYISO_SPEC, Format, Length
from tests import strategies
from tests.vectors import suite_cases

SPEC = dict(PYISO_SPEC)
KEYS = {number: str(number) for number in FIELDS}
FIELD_BITS = tuple((number, 1 << (64 - number)) for number in sorted(FIELDS))
CHECKS: dict[Format, Callable[[str], bool] | None] = {
    Format.NUMERIC: str.isdigit,
    Format.NUMERIC_LEFT: str.isdigit,
    Format.TRACK: None,
    Format.ALPHANUMERIC: str.isalnum,
    Format.PRINTABLE: str.isprintable,
}
VECTOR_FRAMES = [
    case.frame(name) for case in suite_cases() for name in case.data if name.endswith("frame")
]


# ---------------------------------------------------------------------------------------------
# The reference: pyiso8583's per-field walk


def _check(number: int) -> Callable[[str], bool] | None:
    return CHECKS[FIELDS[number].format]


def _passes(number: int, value: str) -> bool:
    check = _check(number)
    return bool(value) and (check is None or check(value))


def _echoable(fields: dict[int, FieldValue]) -> dict[int, FieldValue]:
    return {n: v for n, v in fields.items() if n in ECHOABLE_FIELDS}


def _safe_typed(decoded: dict[str, str]) -> dict[int, FieldValue]:
    return {
        int(key): value
        for key, value in decoded.items()
        if FIELDS[int(key)].format is not Format.BINARY and _passes(int(key), value)
    }


def reference_decode_message(payload: bytes) -> Message:
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
    # A pad nibble that is not the spec's, in a field read whole: a bad value, not an
    # unreadable one (its extent is known), so the walk goes on, as for a failed check.
    bad_pads: dict[int, tuple[int, str]] = {}
    # Text whose bytes the field's codec refuses (a byte above 0x7F in an ans field): read
    # whole all the same, so a bad value too, refused as a failed check is.
    bad_texts: set[int] = set()
    try:
        for number, bit in FIELD_BITS:
            if number > first_unknown:
                break
            if bitmap & bit:
                key = KEYS[number]
                try:
                    index = decode_field(body, decoded, encoded, index, key, SPEC[key])
                except DecodeError as error:
                    if error.msg == "Failed to decode field, invalid data":
                        bad_texts.add(number)
                        index = error.pos + len(error.doc_enc[key]["data"])
                        continue
                    # A pad's field is whole when pyiso8583 raises (its decoded value
                    # holds the pad); a field cut short is not.
                    data = error.doc_enc[key]["data"]
                    if (
                        "nibbles, expecting" not in error.msg
                        or len(decoded[key]) != 2 * len(data)
                        or not data
                    ):
                        raise
                    bad_pads[number] = (body_offset + error.pos, error.msg)
                    del decoded[key]
                    index = error.pos + len(data)
    except DecodeError as error:
        readable = {k: v for k, v in error.doc_dec.items() if k != error.field}
        envelope.fields = _echoable(_safe_typed(readable))
        raise CodecError(
            error.msg, field=int(error.field), offset=body_offset + error.pos, partial=envelope
        ) from None
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
    fields: dict[int, FieldValue] = {}
    bad: tuple[int, int, str] | None = None  # the first bad value: field, offset, problem
    offset = MTI_BYTES + BITMAP_BYTES
    for number, bit in FIELD_BITS:
        key = KEYS[number]
        if not bitmap & bit or number > first_unknown:
            continue
        if number in bad_pads:
            if bad is None:
                bad = (number, *bad_pads[number])
            offset += len(encoded[key]["len"]) + len(encoded[key]["data"])
            continue
        if number in bad_texts:
            if bad is None:
                bad = (number, body_offset + offset, f"not {FIELDS[number].format.value} data")
            offset += len(encoded[key]["len"]) + len(encoded[key]["data"])
            continue
        value = decoded[key]
        binary = FIELDS[number].format is Format.BINARY
        if binary and encoded[key]["data"]:  # an empty field is refused, binary or not
            fields[number] = encoded[key]["data"]
        elif not binary and _passes(number, value):
            fields[number] = value
        elif bad is None:
            problem = "empty" if not value else f"not {FIELDS[number].format.value} data"
            bad = (number, body_offset + offset, problem)
        offset += len(encoded[key]["len"]) + len(encoded[key]["data"])
    if bad is not None:
        # What follows a bad value was framed all the same: kept for the `30` (§7).
        envelope.fields = _echoable(fields)
        raise CodecError(bad[2], field=bad[0], offset=bad[1], partial=envelope)
    envelope.fields = fields
    return envelope


def reference_encode_message(message: Message) -> bytes:
    if message.mti not in MESSAGE_TYPE_INDICATORS:
        raise CodecError("MTI not in the profile", part="MTI")
    document: dict[str, str] = {}
    parts: dict[str, dict[str, bytes]] = {}
    chunks: list[bytes] = []
    bitmap = 0
    for number in sorted(message.fields):
        key = KEYS.get(number)
        if key is None:
            raise CodecError("field not in the profile", field=number)
        value = message.fields[number]
        if FIELDS[number].format is Format.BINARY:
            if not isinstance(value, bytes):
                raise CodecError("binary field needs bytes", field=number)
            if not value and FIELDS[number].length is not Length.FIXED:
                raise CodecError("empty", field=number)
            document[key] = value.hex()
        elif isinstance(value, str) and _passes(number, value):
            document[key] = value
        else:
            raise CodecError(f"not {FIELDS[number].format.value} data", field=number)
        try:
            chunks.append(encode_field(document, parts, key, SPEC[key]))
        except EncodeError as error:
            raise CodecError(error.msg, field=number) from None
        bitmap |= 1 << (64 - number)
    return b"".join(
        (
            message.tpdu.encode(),
            message.header.encode(),
            bytes.fromhex(message.mti),
            bitmap.to_bytes(BITMAP_BYTES, "big"),
            *chunks,
        )
    )


def reference_encode_message_with_mac(
    message: Message, compute_mac: Callable[[bytes], bytes]
) -> bytes:
    fields = dict(message.fields)
    fields[64] = bytes(8)
    unsigned = reference_encode_message(Message(message.mti, fields, message.tpdu, message.header))
    signature = compute_mac(unsigned[ENVELOPE_BYTES:-8])
    if len(signature) != 8:
        raise CodecError("MAC must be 8 bytes", field=64)
    return unsigned[:-8] + signature


# ---------------------------------------------------------------------------------------------
# Comparing outcomes

Outcome = tuple[str, object]


def _outcome(function: Callable[[], object]) -> Outcome:
    try:
        result = function()
    except CodecError as error:
        partial = error.partial
        shown = (
            None if partial is None else (partial.mti, partial.fields, partial.tpdu, partial.header)
        )
        return "error", (type(error), str(error), error.field, error.part, error.offset, shown)
    return "ok", result


def assert_same_decode(payload: bytes) -> None:
    assert _outcome(lambda: decode_message(payload)) == _outcome(
        lambda: reference_decode_message(payload)
    )


def assert_same_encode(message: Message) -> None:
    assert _outcome(lambda: encode_message(message)) == _outcome(
        lambda: reference_encode_message(message)
    )


# ---------------------------------------------------------------------------------------------
# Valid messages: the same bytes as pyiso8583's public encode and decode


def _pyiso_document(message: Message) -> dict[str, str]:
    document = {"t": message.mti}
    for number, value in message.fields.items():
        document[str(number)] = value.hex() if isinstance(value, bytes) else value
    return document


@settings(max_examples=400)
@given(strategies.any_message())
def test_valid_messages_are_the_bytes_pyiso8583_writes_and_reads(message: Message) -> None:
    """The codec writes pyiso8583's bytes and reads back pyiso8583's values."""
    payload = encode_message(message)
    body, _ = iso8583.encode(_pyiso_document(message), SPEC)
    assert payload[ENVELOPE_BYTES:] == bytes(body)
    assert payload == reference_encode_message(message)
    decoded, encoded = iso8583.decode(payload[ENVELOPE_BYTES:], SPEC)
    fields = decode_message(payload).fields
    assert sorted(fields) == sorted(int(key) for key in decoded if key not in ("t", "p"))
    for number, value in fields.items():
        if isinstance(value, bytes):
            assert value == encoded[str(number)]["data"]
        else:
            assert value == decoded[str(number)]
    assert decode_message(payload) == reference_decode_message(payload)


@given(strategies.any_message(), st.binary(min_size=8, max_size=8))
def test_mac_is_placed_as_the_reference_places_it(message: Message, signature: bytes) -> None:
    """Field 64 over the same bytes, in the same place, whatever the message held in 64."""
    seen: list[bytes] = []
    seen_reference: list[bytes] = []

    def sign(data: bytes) -> bytes:
        seen.append(data)
        return signature

    def sign_reference(data: bytes) -> bytes:
        seen_reference.append(data)
        return signature

    fields = dict(message.fields)
    fields[64] = b"old"
    with_old = Message(message.mti, fields, message.tpdu, message.header)
    assert encode_message_with_mac(with_old, sign) == reference_encode_message_with_mac(
        with_old, sign_reference
    )
    assert seen == seen_reference


# ---------------------------------------------------------------------------------------------
# Invalid bytes: refused (or accepted) the same way


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """Valid payloads, from the vectors or generated, with bytes flipped, added or removed."""
    source = draw(
        st.one_of(
            st.sampled_from(VECTOR_FRAMES).map(lambda frame: frame[LENGTH_BYTES:]),
            strategies.any_message().map(encode_message),
        )
    )
    payload = bytearray(source)
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        position = draw(st.integers(0, len(payload)))
        if action == "flip" and position < len(payload):
            payload[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            payload.insert(position, draw(st.integers(0, 255)))
        elif action == "delete" and position < len(payload):
            del payload[position]
        elif action == "cut":
            del payload[position:]
    return bytes(payload)


@st.composite
def random_bodies(draw: st.DrawFn) -> bytes:
    """A valid envelope and MTI, a bitmap of mostly known fields, then random bytes."""
    numbers = draw(st.sets(st.sampled_from(sorted(FIELDS)) | st.integers(1, 64), max_size=12))
    bitmap = sum(1 << (64 - number) for number in numbers)
    mti = draw(st.sampled_from(sorted(MESSAGE_TYPE_INDICATORS)))
    envelope = bytes.fromhex("6000030000603100310000")
    return envelope + bytes.fromhex(mti) + bitmap.to_bytes(8, "big") + draw(st.binary(max_size=120))


@settings(max_examples=1500)
@given(mutated_payloads())
def test_mutated_payloads_decode_as_the_reference_decodes(payload: bytes) -> None:
    """Same message, or the same error with the same partial message."""
    assert_same_decode(payload)


@settings(max_examples=1500)
@given(random_bodies())
def test_random_bodies_decode_as_the_reference_decodes(payload: bytes) -> None:
    assert_same_decode(payload)


@settings(max_examples=300)
@given(st.binary(max_size=60))
def test_random_bytes_decode_as_the_reference_decodes(payload: bytes) -> None:
    assert_same_decode(payload)


def test_every_single_byte_change_of_the_vectors_decodes_as_the_reference() -> None:
    """Every byte of every vector frame set to a few telling values."""
    for frame in VECTOR_FRAMES:
        payload = frame[LENGTH_BYTES:]
        for position in range(len(payload)):
            for value in (0x00, 0x0A, 0x99, 0xA0, 0xFF, payload[position] ^ 0x01):
                changed = bytearray(payload)
                changed[position] = value
                assert_same_decode(bytes(changed))


# ---------------------------------------------------------------------------------------------
# Invalid values: refused the same way

_ODD_CHARACTERS = st.sampled_from(
    [*string.printable, "D", "d", "é", "١", "²", "\x00", "\x7f", "\u3000", "0", "0", "0"]
)
_ODD_TEXT = st.text(_ODD_CHARACTERS, max_size=40)


def _values() -> st.SearchStrategy[FieldValue]:
    return st.one_of(
        _ODD_TEXT,
        st.text(string.digits, max_size=40),
        st.text(string.hexdigits + "D", max_size=40),
        st.binary(max_size=40),
    )


@st.composite
def odd_messages(draw: st.DrawFn) -> Message:
    """Messages with fields from the table and beyond it, right or wrong in value and length."""
    message = draw(strategies.any_message())
    fields = dict(message.fields)
    for number in draw(st.lists(st.sampled_from(sorted(FIELDS)) | st.integers(0, 70), max_size=3)):
        value = draw(
            st.one_of(strategies.field_value(number), _values()) if number in FIELDS else _values()
        )
        fields[number] = value
    mti = draw(st.sampled_from([message.mti, message.mti, "0100", "02x0"]))
    return Message(mti, fields, message.tpdu, message.header)


@settings(max_examples=1500)
@given(odd_messages())
def test_odd_values_encode_as_the_reference_encodes(message: Message) -> None:
    """Same bytes, or the same error naming the same field."""
    assert_same_encode(message)


@settings(max_examples=300)
@given(odd_messages())
def test_odd_values_with_mac_encode_as_the_reference_encodes(message: Message) -> None:
    def sign(data: bytes) -> bytes:
        return data[:8].ljust(8, b"\x00")

    assert _outcome(lambda: encode_message_with_mac(message, sign)) == _outcome(
        lambda: reference_encode_message_with_mac(message, sign)
    )


@st.composite
def messages_with_odd_fixed_values(draw: st.DrawFn) -> Message:
    """Valid messages with a fixed-length value or two of the right length but maybe wrong."""
    message = draw(strategies.any_message())
    fields = dict(message.fields)
    fixed = sorted(
        number
        for number in fields
        if FIELDS[number].length is Length.FIXED and FIELDS[number].format is not Format.BINARY
    )
    for number in draw(st.lists(st.sampled_from(fixed), max_size=2)) if fixed else []:
        size = FIELDS[number].max_len
        fields[number] = draw(st.text(_ODD_CHARACTERS, min_size=size, max_size=size))
    return Message(message.mti, fields, message.tpdu, message.header)


@settings(max_examples=1500)
@given(messages_with_odd_fixed_values())
def test_odd_fixed_values_encode_as_the_reference_encodes(message: Message) -> None:
    """Values of the right length among their neighbours: the same bytes or the same error."""
    assert_same_encode(message)


def test_values_of_every_field_at_every_length_encode_as_the_reference() -> None:
    """Each field with values of each length from 0 to past its maximum, of each class."""
    for number, row in FIELDS.items():
        for length in range(row.max_len + 3):
            for value in ("7" * length, "D" * length, "a" * length, " " * length, b"\x01" * length):
                assert_same_encode(Message("0200", {number: value}))


# ---------------------------------------------------------------------------------------------
# The cipher contexts: one per key and thread, bounded, never printed


def _reference_ecb(suite: Suite, key: bytes, data: bytes, encrypt: bool) -> bytes:
    cipher = crypto._new_cipher(suite, key)
    context = cipher.encryptor() if encrypt else cipher.decryptor()
    return context.update(data) + context.finalize()


@given(
    st.sampled_from(list(Suite)),
    st.binary(min_size=16, max_size=16),
    st.integers(1, 4),
    st.data(),
)
def test_cached_contexts_give_what_fresh_contexts_give(
    suite: Suite, key: bytes, blocks: int, data: st.DataObject
) -> None:
    """A context used many times encrypts and decrypts as a fresh one does."""
    for _ in range(3):
        plain = data.draw(
            st.binary(min_size=blocks * suite.block_size, max_size=blocks * suite.block_size)
        )
        assert encrypt_ecb(suite, key, plain) == _reference_ecb(suite, key, plain, True)
        assert decrypt_ecb(suite, key, plain) == _reference_ecb(suite, key, plain, False)
        assert encrypt_ecb(suite, bytearray(key), plain) == _reference_ecb(suite, key, plain, True)


def test_context_caches_are_bounded_and_never_show_a_key() -> None:
    """More keys than the cache holds: it stays at its size, and its repr names no key."""
    size = crypto._CONTEXT_CACHE_SIZE
    keys = [index.to_bytes(16, "big") for index in range(size + 10)]
    for key in keys:
        encrypt_ecb(Suite.SM4, key, bytes(16))
    assert len(crypto._CONTEXTS.encryptors) == size
    shown = repr(crypto._CONTEXTS)
    assert all(key.hex() not in shown and repr(key) not in shown for key in keys[-20:])
    assert encrypt_ecb(Suite.SM4, keys[0], bytes(16)) == _reference_ecb(
        Suite.SM4, keys[0], bytes(16), True
    )


def test_threads_get_their_own_contexts() -> None:
    """MACs computed at once in several threads under one key all come out right."""
    key = bytes(range(16))
    inputs = [bytes([index]) * (index + 1) for index in range(64)]
    expected = {suite: [mac(suite, key, data) for data in inputs] for suite in Suite}
    crypto._CONTEXTS.clear()
    failures: list[str] = []

    def work() -> None:
        for _ in range(200):
            for suite in Suite:
                if [mac(suite, key, data) for data in inputs] != expected[suite]:
                    failures.append(suite.value)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_walk_caches_stay_bounded_and_right() -> None:
    """More distinct bitmaps and envelopes than the caches hold: bounded, and still right."""
    numbers = sorted(FIELDS)
    for index in range(codec._CACHE_SIZE + 50):
        bitmap = sum(1 << (64 - n) for bit, n in enumerate(numbers) if index >> bit & 1)
        envelope = bytes.fromhex(f"60{index:08X}603100310000")
        payload = envelope + b"\x02\x00" + bitmap.to_bytes(8, "big") + b"\x00" * 20
        assert_same_decode(payload)
    assert len(codec._LAYOUTS) <= codec._CACHE_SIZE
    assert len(codec._DECODED_HEADS) <= codec._CACHE_SIZE
    payload = VECTOR_FRAMES[0][LENGTH_BYTES:]
    assert decode_message(payload) == reference_decode_message(payload)

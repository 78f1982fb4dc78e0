"""Everything wrong with input is one `CodecError` naming the field and offset, never the value."""

from __future__ import annotations

import pytest

from cardcodec.errors import CodecError
from cardcodec.frame import FrameSplitter, add_length
from cardcodec.message import Message, decode_frame, decode_message, encode_message
from tests.spec_terminal import build
from tests.vectors import suite_cases

REDEMPTION = suite_cases()[0].frame("redemption_frame")
PAYLOAD = REDEMPTION[2:]
TRACK_OFFSET = 2 + 11 + 2 + 8 + 3 + 6 + 3 + 2 + 1  # LEN, TPDU+header, MTI, bitmap, 3 4 11 22 25
TRACK_HEX = "6688001234567890124D28121010000012345"


def frame_with(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload


def test_track_offset_constant_points_at_field_35() -> None:
    """The test's own offset arithmetic lands on the LL prefix of field 35 (37 digits)."""
    assert REDEMPTION[TRACK_OFFSET] == 0x37


def test_frame_shorter_than_its_length_is_refused() -> None:
    """A frame whose LEN promises more bytes than follow is refused at the length."""
    with pytest.raises(CodecError) as caught:
        decode_frame(REDEMPTION[:-1])
    assert caught.value.part == "length"


@pytest.mark.parametrize("cut", [0, 1, 5, 12, 14, 22, 30, len(PAYLOAD) - 1])
def test_truncated_payload_is_a_codec_error(cut: int) -> None:
    """A payload cut anywhere raises the codec's error, never another exception."""
    with pytest.raises(CodecError):
        decode_message(PAYLOAD[:cut])


def test_non_digit_nibble_in_numeric_field_names_field_and_offset() -> None:
    """An A-F nibble in field 4 is a format error at field 4's offset."""
    payload = bytearray(PAYLOAD)
    offset = 11 + 2 + 8 + 3  # field 4 starts after field 3
    payload[offset + 5] = 0x0A
    with pytest.raises(CodecError) as caught:
        decode_message(bytes(payload))
    assert caught.value.field == 4
    assert caught.value.offset == 2 + offset
    assert caught.value.partial is not None
    # Field 4 is fixed-length: what follows it reads, for a `30` that echoes 11, 41 and 42.
    assert 4 not in caught.value.partial.fields
    assert {3, 11, 41, 42} <= set(caught.value.partial.fields)


def test_f_pad_nibble_is_a_format_error() -> None:
    """Field 35's pad nibble must be 0; an F pad is refused."""
    frame = bytearray(REDEMPTION)
    pad_byte = TRACK_OFFSET + 1 + 18
    assert frame[pad_byte] == 0x50
    frame[pad_byte] = 0x5F
    with pytest.raises(CodecError) as caught:
        decode_frame(bytes(frame))
    assert caught.value.field == 35
    # Its prefix framed it: the fields after it read, for a `30` echoing 11, 41, 42 and 60.
    assert caught.value.partial is not None
    assert {11, 41, 42, 60} <= set(caught.value.partial.fields)
    assert 35 not in caught.value.partial.fields


def test_f_pad_in_field_22_is_a_format_error() -> None:
    """Field 22 is left-aligned with a 0 pad nibble on the right; F is refused."""
    frame = bytearray(REDEMPTION)
    offset = 2 + 11 + 2 + 8 + 3 + 6 + 3
    assert frame[offset : offset + 2] == b"\x02\x20"
    frame[offset + 1] = 0x2F
    with pytest.raises(CodecError) as caught:
        decode_frame(bytes(frame))
    assert caught.value.field == 22


def test_bitmap_bit_one_is_a_format_error() -> None:
    """Bit 1 (a secondary bitmap) does not exist in this profile."""
    frame = bytearray(REDEMPTION)
    frame[2 + 11 + 2] |= 0x80
    with pytest.raises(CodecError) as caught:
        decode_frame(bytes(frame))
    assert (caught.value.field, caught.value.part) == (1, "bitmap")


def test_unknown_field_bit_is_refused_with_the_fields_read_before_it() -> None:
    """A bit for a field outside the table is refused, keeping what came before it."""
    frame = bytearray(REDEMPTION)
    frame[2 + 11 + 2 + 4] |= 0x01  # bit 40: not a field of the profile
    with pytest.raises(CodecError) as caught:
        decode_frame(bytes(frame))
    error = caught.value
    assert error.field == 40
    assert error.partial is not None
    assert error.partial.mti == "0200"
    assert error.partial.fields == {3: "000000", 4: "000000012800", 11: "000042", 25: "00"}
    assert 35 not in error.partial.fields  # card data is never carried in an error


def test_partial_answerable_when_identity_fields_come_first() -> None:
    """A bad field after 41 and 42 still leaves 11, 41 and 42 readable for a 30 answer."""
    frame = bytearray(REDEMPTION)
    offset = len(REDEMPTION) - 8 - 9 - 8 - 3  # field 49 "156" before 53, 60, 64
    assert frame[offset : offset + 3] == b"156"
    frame[offset] = 0x00  # not alphanumeric
    with pytest.raises(CodecError) as caught:
        decode_frame(bytes(frame))
    partial = caught.value.partial
    assert partial is not None
    assert caught.value.field == 49
    assert {11, 41, 42} <= set(partial.fields)


def test_length_over_the_field_maximum_is_refused() -> None:
    """An LL of 38 digits for track 2 (max 37) is refused at field 35."""
    frame = bytearray(REDEMPTION)
    frame[TRACK_OFFSET] = 0x38
    with pytest.raises(CodecError) as caught:
        decode_frame(bytes(frame))
    assert caught.value.field == 35
    assert caught.value.offset == TRACK_OFFSET


def test_field_48_holds_eight_upload_records_and_no_more() -> None:
    """§4.7's longest field 48: a count and eight 40-digit records, 322 digits (n...322 LLL),
    built by the test terminal's own encoder; one digit more is refused at field 48."""
    record = "00" + "000001" + "6688001234567890124".zfill(20) + f"{1000:012d}"
    fields: dict[int, str | bytes] = {11: "000009", 41: "10000001", 42: "898310048990001"}
    fields[60] = "00000001201"
    longest = "08" + record * 8
    assert len(longest) == 322
    message = decode_frame(add_length(build("0320", {**fields, 48: longest})))
    assert message.fields[48] == longest
    with pytest.raises(CodecError) as caught:
        decode_frame(add_length(build("0320", {**fields, 48: longest + "0"})))
    assert caught.value.field == 48


def test_extra_bytes_after_the_last_field_are_refused() -> None:
    """Bytes left after the bitmap's last field are a format error."""
    with pytest.raises(CodecError):
        decode_frame(add_length(PAYLOAD + b"\x00"))


def test_unlisted_mti_is_refused_without_a_partial_answer() -> None:
    """An MTI the profile does not list closes the link: no partial message to answer."""
    payload = bytearray(PAYLOAD)
    payload[11:13] = b"\x01\x00"
    with pytest.raises(CodecError) as caught:
        decode_message(bytes(payload))
    assert caught.value.part == "MTI"
    assert caught.value.partial is None


def test_tpdu_must_start_with_60_and_header_must_be_bcd() -> None:
    """The TPDU id byte and the header's BCD digits are checked."""
    for index, value in ((0, 0x61), (6, 0xAF)):
        payload = bytearray(PAYLOAD)
        payload[index] = value
        with pytest.raises(CodecError):
            decode_message(bytes(payload))


@pytest.mark.parametrize("length", [0, 2049, 65535])
def test_frame_length_zero_or_over_2048_is_refused(length: int) -> None:
    """A LEN of 0 or above 2048 is refused by the splitter and by decode_frame."""
    with pytest.raises(CodecError):
        FrameSplitter().feed(length.to_bytes(2, "big") + b"\x60")
    with pytest.raises(CodecError):
        decode_frame(length.to_bytes(2, "big"))


def test_errors_never_carry_card_data() -> None:
    """No error message or repr contains the track's digits."""
    frame = bytearray(REDEMPTION)
    frame[TRACK_OFFSET] = 0x38
    with pytest.raises(CodecError) as caught:
        decode_frame(bytes(frame))
    assert "6688001234" not in str(caught.value)
    assert "6688001234" not in repr(caught.value.partial)
    message = decode_frame(REDEMPTION)
    assert TRACK_HEX not in repr(message)


@pytest.mark.parametrize(
    ("number", "value"),
    [(4, "12345678901A"), (4, "123"), (41, "1234567"), (49, "15!"), (63, "\x01"), (52, "00")],
)
def test_encoding_refuses_values_that_do_not_fit(number: int, value: str) -> None:
    """The codec never sends what it would refuse: wrong class, length or type."""
    with pytest.raises(CodecError) as caught:
        encode_message(Message("0200", {number: value}))
    assert caught.value.field == number
    assert value not in str(caught.value)


def test_encoding_refuses_fields_outside_the_table_and_unlisted_mti() -> None:
    """Field 5 is not in the profile; MTI 0100 is not either."""
    with pytest.raises(CodecError):
        encode_message(Message("0200", {5: "1"}))
    with pytest.raises(CodecError):
        encode_message(Message("0100", {}))


def _ending_with_empty(number: int, value: str | bytes, encoded: bytes) -> bytes:
    """A 0200 whose last field, `number` (`encoded` on the wire: its 2-byte length prefix
    and data), has a prefix of zero and no data."""
    fields: dict[int, str | bytes] = {11: "000123", 41: "10000001", 42: "898310048990001"}
    fields[number] = value
    payload = encode_message(Message("0200", fields))
    assert payload.endswith(encoded)
    return payload[: -len(encoded)] + bytes(2)


@pytest.mark.parametrize(
    ("number", "value", "encoded"),
    [
        (62, bytes(16), b"\x00\x16" + bytes(16)),
        (63, "01 ", b"\x00\x03" + b"01 "),
        (48, "12", b"\x00\x02\x12"),
    ],
)
def test_an_empty_variable_field_is_a_format_error_binary_or_not(
    number: int, value: str | bytes, encoded: bytes
) -> None:
    """A zero length prefix is refused for every variable field, field 62's bytes included:
    an answerable `30` (the identity fields come first), not an empty value."""
    payload = _ending_with_empty(number, value, encoded)
    with pytest.raises(CodecError) as caught:
        decode_message(payload)
    assert caught.value.field == number
    assert str(caught.value).endswith(": empty")
    assert caught.value.offset == len(payload)  # the frame's LEN (2) + the zero prefix's place
    assert caught.value.partial is not None
    assert {11, 41, 42} <= set(caught.value.partial.fields)


def test_encoding_refuses_an_empty_field_62() -> None:
    """The codec does not send what it refuses to read."""
    with pytest.raises(CodecError) as caught:
        encode_message(Message("0200", {11: "000123", 62: b""}))
    assert caught.value.field == 62


@pytest.mark.parametrize("number, value", [(37, "123456789012"), (39, "00")])
def test_a_byte_above_ascii_in_a_text_field_is_a_bad_value_not_a_break(
    number: int, value: str
) -> None:
    """A byte above 0x7F in a fixed text field before 41 (a void's 37, a reversal's 39) is
    a format error of that field: its length is known, so 41, 42 and 60 are still read, for
    the `30` §7 asks for. It stopped the walk, and the link was closed unanswered."""
    request = decode_message(PAYLOAD)
    fields = {3: "000000", 11: "000002", number: value, 41: request.fields[41]}
    fields |= {42: request.fields[42], 60: "22000001000"}
    payload = bytearray(encode_message(Message("0200", fields, request.tpdu, request.header)))
    at = bytes(payload).index(value.encode("ascii"))
    payload[at + len(value) - 1] = 0x80
    with pytest.raises(CodecError) as caught:
        decode_message(bytes(payload))
    assert (caught.value.field, caught.value.offset) == (number, 2 + at)
    assert str(caught.value) == f"field {number} at byte {2 + at}: not an data"
    partial = caught.value.partial
    assert partial is not None
    assert {11, 41, 42, 60} <= set(partial.fields)
    assert number not in partial.fields

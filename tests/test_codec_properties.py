"""Hypothesis properties of the codec: round trips for every kind of message, fuzzing, and
frames split at every byte or glued together."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cardcodec.errors import CodecError
from cardcodec.frame import FrameSplitter, add_length
from cardcodec.message import Message, decode_frame, encode_frame
from cardcodec.profile import Kind
from tests import strategies
from tests.vectors import suite_cases

VECTOR_FRAMES = [
    case.frame(name) for case in suite_cases() for name in case.data if name.endswith("frame")
]


@given(st.sampled_from(list(Kind)).flatmap(strategies.messages))
def test_every_request_kind_round_trips(message: Message) -> None:
    """encode -> decode gives the same request, and decode -> encode the same bytes."""
    frame = encode_frame(message)
    assert decode_frame(frame) == message
    assert encode_frame(decode_frame(frame)) == frame


@given(st.sampled_from(list(Kind)).flatmap(lambda kind: strategies.messages(kind, True)))
def test_every_answer_kind_round_trips(message: Message) -> None:
    """encode -> decode gives the same answer, and decode -> encode the same bytes."""
    frame = encode_frame(message)
    assert decode_frame(frame) == message
    assert encode_frame(decode_frame(frame)) == frame


def _decode_or_codec_error(frame: bytes) -> None:
    try:
        message = decode_frame(frame)
    except CodecError:
        return
    assert encode_frame(message) == frame  # what decodes is canonical


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_the_codec_error(data: bytes) -> None:
    """Random bytes either decode canonically or raise CodecError, nothing else."""
    _decode_or_codec_error(add_length(data) if data else b"\x00\x00")


@settings(max_examples=500)
@given(st.binary(min_size=13, max_size=13), st.binary(max_size=200))
def test_random_bodies_behind_a_valid_envelope_raise_only_the_codec_error(
    envelope: bytes, body: bytes
) -> None:
    """With a plausible TPDU and header the fuzz reaches the field walk."""
    payload = b"\x60" + envelope[1:11] + b"\x02\x00" + body
    _decode_or_codec_error(add_length(payload))


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(VECTOR_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        position = draw(st.integers(2, len(frame) - 1))
        if action == "flip":
            frame[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            frame.insert(position, draw(st.integers(0, 255)))
        elif len(frame) > 3:
            del frame[position]
    return add_length(bytes(frame[2:]))


@settings(max_examples=1000)
@given(mutated_frames())
def test_mutated_valid_frames_raise_only_the_codec_error(frame: bytes) -> None:
    """Flipped, inserted and deleted bytes in real frames never escape as other errors."""
    _decode_or_codec_error(frame)


def test_frames_split_at_every_byte_arrive_whole() -> None:
    """Each vector frame fed in two pieces, cut at every byte, comes out whole exactly once."""
    for frame in VECTOR_FRAMES:
        for cut in range(len(frame) + 1):
            splitter = FrameSplitter()
            payloads = splitter.feed(frame[:cut]) + splitter.feed(frame[cut:])
            assert payloads == [frame[2:]]
            assert splitter.pending == 0


def test_frames_fed_one_byte_at_a_time_and_glued_together() -> None:
    """All vector frames glued into one stream, fed a byte at a time, come out in order."""
    stream = b"".join(VECTOR_FRAMES)
    splitter = FrameSplitter()
    payloads = [p for i in range(len(stream)) for p in splitter.feed(stream[i : i + 1])]
    assert payloads == [frame[2:] for frame in VECTOR_FRAMES]
    glued = FrameSplitter().feed(stream)
    assert glued == payloads


@given(st.lists(strategies.any_message(), min_size=1, max_size=5), st.data())
def test_glued_generated_frames_split_anywhere_decode_in_order(
    messages: list[Message], data: st.DataObject
) -> None:
    """Several generated frames in one stream, cut at random points, decode in order."""
    stream = b"".join(encode_frame(message) for message in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    splitter = FrameSplitter()
    payloads: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        payloads += splitter.feed(stream[start:end])
    assert [decode_frame(add_length(p)) for p in payloads] == messages

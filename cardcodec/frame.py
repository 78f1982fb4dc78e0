"""The envelope around every message: 2-byte length, TPDU and the 6-byte header (§1).

The TPDU's addresses are swapped in a response; the header is echoed with its
processing-requirement digit set to `0`, or `3` when the terminal must sign on again.
`FrameSplitter` cuts a TCP byte stream into frames for clients that do not use Twisted's
`Int16StringReceiver` (the simulators, the tests).
"""

from __future__ import annotations

from typing import NamedTuple

from cardcodec.errors import CodecError

LENGTH_BYTES = 2
TPDU_BYTES = 5
HEADER_BYTES = 6
ENVELOPE_BYTES = TPDU_BYTES + HEADER_BYTES  # before the MTI, after the length
MAX_FRAME_LENGTH = 2048  # the largest LEN a peer may send (§1)
TPDU_ID = 0x60

PROCESSING_OK = "0"
PROCESSING_SIGN_ON_AGAIN = "3"


class Tpdu(NamedTuple):
    """`60` + destination address + source address, each address 2 bytes (4 hex digits)."""

    destination: str = "0003"
    source: str = "0000"

    def swapped(self) -> Tpdu:
        return Tpdu(destination=self.source, source=self.destination)

    def encode(self) -> bytes:
        try:
            raw = bytes.fromhex(self.destination + self.source)
        except ValueError:
            raw = b""
        if len(raw) != 4:
            raise CodecError("addresses must be 4 hex digits each", part="TPDU")
        return bytes((TPDU_ID,)) + raw

    @classmethod
    def decode(cls, raw: bytes, offset: int) -> Tpdu:
        if raw[0] != TPDU_ID:
            raise CodecError("TPDU does not start with 60", part="TPDU", offset=offset)
        return cls(destination=raw[1:3].hex().upper(), source=raw[3:5].hex().upper())


class Header(NamedTuple):
    """12 BCD digits: application type (2), software version (2), terminal status (1),
    processing requirement (1), reserved (6)."""

    application: str = "60"
    version: str = "31"
    status: str = "0"
    processing: str = PROCESSING_OK
    reserved: str = "310000"

    @property
    def digits(self) -> str:
        return self.application + self.version + self.status + self.processing + self.reserved

    def for_response(self, processing: str = PROCESSING_OK) -> Header:
        """The header echoed in an answer, with the processing-requirement digit set."""
        return Header(self.application, self.version, self.status, processing, self.reserved)

    def encode(self) -> bytes:
        digits = self.digits
        if len(digits) != 12 or not digits.isdigit():
            raise CodecError("header must be 12 BCD digits", part="header")
        return bytes.fromhex(digits)

    @classmethod
    def decode(cls, raw: bytes, offset: int) -> Header:
        digits = raw.hex()
        if not digits.isdigit():
            raise CodecError("header has a non-digit nibble", part="header", offset=offset)
        return cls(digits[0:2], digits[2:4], digits[4], digits[5], digits[6:12])


def check_length(length: int, offset: int = 0) -> None:
    """A LEN of 0 or above the maximum is refused (the link is closed)."""
    if length == 0 or length > MAX_FRAME_LENGTH:
        raise CodecError(
            f"length {length} is outside 1-{MAX_FRAME_LENGTH}", part="length", offset=offset
        )


def add_length(payload: bytes) -> bytes:
    """Prefix a payload (TPDU onwards) with its 2-byte big-endian length."""
    check_length(len(payload))
    return len(payload).to_bytes(LENGTH_BYTES, "big") + payload


class FrameSplitter:
    """Cuts a byte stream into payloads (TPDU onwards), however the bytes arrive.

    Several frames in one read and one frame a byte at a time both work. A bad LEN raises
    `CodecError`; the stream cannot be resynchronised after that, so the caller closes it.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0  # stream offset of the buffer's first byte, for error messages

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        payloads: list[bytes] = []
        while len(self._buffer) >= LENGTH_BYTES:
            length = int.from_bytes(self._buffer[:LENGTH_BYTES], "big")
            check_length(length, self._offset)
            end = LENGTH_BYTES + length
            if len(self._buffer) < end:
                break
            payloads.append(bytes(self._buffer[LENGTH_BYTES:end]))
            del self._buffer[:end]
            self._offset += end
        return payloads

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

"""The codec's one exception type for input that does not fit the profile.

A `CodecError` names where the problem is (the part of the frame, the field number and the byte
offset in the frame) and what kind of problem it is, but never the field's value: messages and
tracebacks may reach a log, and field values may be card numbers, tracks, PIN blocks or keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cardcodec.message import Message


class CodecError(ValueError):
    """Bytes or values that do not fit the POS 8583 profile (answered `30`, or the link closed).

    `field` is the ISO 8583 field number when the problem is inside a field, else None;
    `part` names the place ("length", "TPDU", "header", "MTI", "bitmap", "field 35", ...);
    `offset` is the byte offset from the start of the frame (its 2-byte length included),
    or -1 when the problem is in a value being encoded rather than in received bytes.
    `partial` is the message as far as it could be read before the problem (envelope, MTI and
    only the few fields that identify a request and are safe to echo, never card data), so
    that the gateway can still answer `30` when 11, 41 and 42 are among them; None when not
    even the MTI could be read.
    """

    def __init__(
        self,
        reason: str,
        *,
        field: int | None = None,
        part: str | None = None,
        offset: int = -1,
        partial: Message | None = None,
    ) -> None:
        self.reason = reason
        self.field = field
        self.part = part if part is not None else (f"field {field}" if field else "message")
        self.offset = offset
        self.partial = partial
        where = self.part if offset < 0 else f"{self.part} at byte {offset}"
        super().__init__(f"{where}: {reason}")


class PinBlockError(CodecError):
    """A PIN block that does not decrypt to a valid ISO 9564 format 0 block (answered `99`)."""

"""How answers are put together (pos-8583.md §4): the fields each one echoes and carries, the
reduced field set of a decline, and the form in which an answer is kept for repeats (§7).

Pure: the handler decides the response code and the figures; this module only arranges them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from types import MappingProxyType

from cardcodec.frame import PROCESSING_OK, PROCESSING_SIGN_ON_AGAIN
from cardcodec.message import FieldValue, Message
from cardcodec.profile import DECLINE_FIELDS, FINANCIAL_MTIS, RESPONSES, Kind
from cardcodec.spec import FIELDS, Format
from gateway.responses import APPROVAL_CODES

ECHOED = (3, 4, 11, 41, 42, 49, 60)
# Approved answers of these kinds carry no MAC (§5.1).
UNMACED_KINDS = frozenset({Kind.SIGN_ON, Kind.ECHO})
# The fields a decline of a management message keeps (its own set, reduced as §4 says).
MANAGEMENT_DECLINE = frozenset({11, 12, 13, 15, 32, 37, 39, 41, 42, 60})


@dataclass(frozen=True, init=False)
class Stamp:
    """The gateway's clock as an answer shows it: local time (12), date (13), business date
    (15), and the acquirer institution (32)."""

    local: datetime
    business_date: date
    acquirer: str

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(self, local: datetime, business_date: date, acquirer: str) -> None:
        object.__setattr__(self, "local", local)
        object.__setattr__(self, "business_date", business_date)
        object.__setattr__(self, "acquirer", acquirer)

    def fields(self) -> Mapping[int, FieldValue]:
        """12, 13, 15 and 32 (read-only: every answer of a group shares them)."""
        return _clock_fields(self)


@functools.lru_cache(maxsize=16)
def _clock_fields(stamp: Stamp) -> Mapping[int, FieldValue]:
    return MappingProxyType(
        {
            12: stamp.local.strftime("%H%M%S"),
            13: stamp.local.strftime("%m%d"),
            15: stamp.business_date.strftime("%m%d"),
            32: stamp.acquirer,
        }
    )


def answer(
    request: Message,
    kind: Kind | None,
    code: str,
    stamp: Stamp,
    extra: dict[int, FieldValue],
    *,
    sign_on_again: bool = False,
) -> Message:
    """The answer to `request`: echoed fields, the clock, 39, and the kind's own `extra`
    fields, reduced to the decline set when `code` is not an approval."""
    fields: dict[int, FieldValue] = {n: request.fields[n] for n in ECHOED if n in request.fields}
    fields.update(stamp.fields())
    fields.update(extra)
    fields[39] = code
    allowed = _allowed(request.mti, kind, code)
    kept = {n: v for n, v in fields.items() if n in allowed}
    processing = PROCESSING_SIGN_ON_AGAIN if sign_on_again else PROCESSING_OK
    return request.reply(kept, processing)


@functools.lru_cache(maxsize=512)  # a few MTIs, kinds and codes: the same sets every time
def _allowed(mti: str, kind: Kind | None, code: str) -> frozenset[int]:
    approved = code in APPROVAL_CODES
    if kind is None:
        return DECLINE_FIELDS if mti in FINANCIAL_MTIS else MANAGEMENT_DECLINE & _minimal(mti)
    carried = RESPONSES[kind].allowed() - {64}
    if approved:
        return carried
    if mti in FINANCIAL_MTIS:
        return DECLINE_FIELDS
    return carried & MANAGEMENT_DECLINE


def _minimal(mti: str) -> frozenset[int]:
    """For an unknown management combination: what every answer of that MTI carries."""
    if mti == "0800":
        return RESPONSES[Kind.SIGN_ON].allowed()
    if mti == "0500":
        return RESPONSES[Kind.SETTLEMENT].allowed()
    return frozenset({11, 12, 13, 39, 41, 42, 60})


def carries_mac(kind: Kind | None, code: str) -> bool:
    """Whether an answer is MAC'd: approvals (`00`, `10`) except the 0810 and the echo's."""
    return kind is not None and code in APPROVAL_CODES and kind not in UNMACED_KINDS


_KEYS = {number: str(number) for number in FIELDS}  # field numbers as the log's keys


def stored(message: Message) -> dict[str, str]:
    """An answer's fields in the form the request log keeps (binary fields in hex)."""
    kept = {_KEYS[n]: (v if isinstance(v, str) else v.hex()) for n, v in message.fields.items()}
    kept.pop("64", None)
    kept["processing"] = message.header.processing
    return kept


def restored(request: Message, kept: dict[str, str]) -> Message:
    """The stored answer to a repeated request, in a fresh envelope for this request."""
    fields: dict[int, FieldValue] = {}
    for key, value in kept.items():
        if key.isdigit():
            number = int(key)
            binary = FIELDS[number].format is Format.BINARY
            fields[number] = bytes.fromhex(value) if binary else value
    return request.reply(fields, kept.get("processing", PROCESSING_OK))

"""The format checks of a decoded request (`30`), before anything is looked up.

The codec has already checked each field's own format; these checks are the profile's rules
between fields and inside sub-fields: the field set of the request's kind (§4), the shape of
60, 61, 48 and 63, the fixed values of 25, 26 and 49, and field 53's agreement with 22, 26 and
the PIN block (§2). They return a short reason (never a value) or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cardcodec.crypto import Suite
from cardcodec.errors import CodecError
from cardcodec.message import Message
from cardcodec.profile import Kind, request_rule
from cardcodec.subfields import (
    EntryMode,
    MessageData,
    OriginalData,
    SecurityControl,
    SettlementTotals,
    Track2,
    parse_operator,
    parse_upload,
    parse_upload_end,
)

CURRENCY_CNY = "156"
CONDITION_NORMAL = "00"
PIN_CAPTURE_CODES = frozenset({"06", "12"})
REVERSAL_REASONS = frozenset({"98", "96", "A0", "06"})
FINANCIAL_KINDS = frozenset({Kind.BALANCE, Kind.REDEMPTION, Kind.VOID, Kind.REFUND})
CARD_KINDS = FINANCIAL_KINDS
PIN_KINDS = frozenset({Kind.BALANCE, Kind.REDEMPTION})
OPERATOR_KINDS = frozenset({Kind.SIGN_ON, Kind.SETTLEMENT})  # field 63: the operator code
ORIGINAL_KINDS = frozenset({Kind.VOID, Kind.REFUND})  # field 61: the original's batch and trace

# Field 48's shape by kind: each parser raises `CodecError` for a value that does not fit.
_FIELD_48_SHAPES: dict[Kind, Callable[[str], object]] = {
    Kind.SETTLEMENT: SettlementTotals.parse_request,
    Kind.UPLOAD: parse_upload,
    Kind.UPLOAD_END: parse_upload_end,
}
_PIN_BLOCK_FIELDS = {Suite.TDES: 52, Suite.SM4: 62}  # where each suite's PIN block goes (§5.3)


@dataclass(frozen=True, init=False)
class CardRequest:
    """The card-related parts of a balance, redemption, void or refund request."""

    entry: EntryMode
    control: SecurityControl
    pin_block: bytes | None

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(
        self,
        entry: EntryMode,
        control: SecurityControl,
        pin_block: bytes | None,
    ) -> None:
        object.__setattr__(self, "entry", entry)
        object.__setattr__(self, "control", control)
        object.__setattr__(self, "pin_block", pin_block)


def format_problem(message: Message, kind: Kind, data: MessageData) -> str | None:
    """Why the request breaks the profile (`30`), or None; no terminal or key is needed."""
    problem = request_rule(kind, data.message_type).problem(set(message.fields))
    if problem is not None:
        return problem
    try:
        return _value_problem(message, kind, data)
    except CodecError as error:
        return error.reason


def _value_problem(message: Message, kind: Kind, data: MessageData) -> str | None:
    # Kinds are compared through the named sets above and `reversal`: every `Kind.X` costs an
    # attribute look-up through the enum's metaclass, and this runs for every request.
    fields = message.fields
    reversal = kind is Kind.REVERSAL
    financial = reversal or kind in FINANCIAL_KINDS
    if data.financial != financial:
        return "field 60 has the wrong length for this message"
    if financial and fields.get(25) != CONDITION_NORMAL:
        return "field 25 must be 00"
    if 49 in fields and fields[49] != CURRENCY_CNY:
        return "field 49 must be 156"
    if kind in OPERATOR_KINDS:
        parse_operator(message.text(63))
    if reversal and fields[39] not in REVERSAL_REASONS:
        return "field 39 is not a reversal reason"
    if kind in ORIGINAL_KINDS or (reversal and 61 in fields):
        original = OriginalData.parse(message.text(61))
        if (original.date is not None) != (kind is Kind.REFUND):
            return "field 61 has the wrong length for this message"
    if reversal:
        entry = EntryMode.parse(message.text(22))
        if entry.keyed != (2 in fields):
            return "field 22 disagrees with the card fields"
    shape = _FIELD_48_SHAPES.get(kind)
    if shape is not None:
        shape(message.text(48))
    if kind in CARD_KINDS:
        return card_problem(message, kind)
    return None


def card_request(message: Message) -> CardRequest:
    """Fields 22, 53 and the PIN block; call after `format_problem` said None."""
    control = SecurityControl.parse(message.text(53))
    block = message.fields.get(_PIN_BLOCK_FIELDS[control.suite])
    return CardRequest(
        EntryMode.parse(message.text(22)), control, block if isinstance(block, bytes) else None
    )


def card_problem(message: Message, kind: Kind) -> str | None:
    """22, 53, 26 and the PIN block must say the same thing (§2)."""
    request = card_request(message)
    if request.entry.keyed != (2 in message.fields):
        return "field 22 disagrees with the card fields"
    pin_sent = 26 in message.fields
    if kind not in PIN_KINDS and pin_sent:
        return "a PIN is not sent with this message"
    says_pin = (request.control.pin, request.entry.pin_entered, pin_sent)
    if len(set(says_pin)) != 1:
        return "fields 22, 26 and 53 disagree about a PIN"
    if pin_sent and message.fields[26] not in PIN_CAPTURE_CODES:
        return "field 26 must be 06 or 12"
    if pin_sent and request.pin_block is None:
        return "the PIN block is not in the field of the suite field 53 names"
    if request.control.track_encrypted and 35 not in message.fields:
        return "field 53 says the track is encrypted but there is no track"
    if 35 in message.fields and not request.control.track_encrypted:
        Track2.check(message.text(35))  # parsed once the request has passed every check
    return None


def suite_problem(message: Message, kind: Kind, suite: Suite) -> str | None:
    """Field 53's digit 2 must name the terminal's suite (§2)."""
    if kind in CARD_KINDS and SecurityControl.parse(message.text(53)).suite is not suite:
        return "field 53 names another key suite than the terminal's"
    return None

"""Declines as values, in the precedence order of pos-8583.md §6, and the one table to field 39.

`Decline` lists them in §6's order, the order the checks are made in (`gateway/checks.py`,
`gateway/decision.py`), so the first that applies answers. The decision code returns these
values; only `RESPONSE_CODES` knows what goes on the wire.
"""

from __future__ import annotations

import enum


class Decline(enum.Enum):
    """Every reason a request is not approved, in the order of §6 (the first applicable wins)."""

    FORMAT = "format error"
    TERMINAL_UNKNOWN = "terminal unknown"
    MERCHANT = "merchant unknown, inactive or not the terminal's"
    TERMINAL_DISABLED = "terminal not enabled"
    MAC = "MAC error or not signed on"
    DUPLICATE = "duplicate"
    NOT_SUPPORTED = "transaction not supported"
    CARD_UNKNOWN = "card unknown, closed or invalid"
    CARD_LOST = "lost card"
    CARD_STOLEN = "stolen card"
    CARD_BLOCKED = "card blocked"
    CARD_EXPIRED = "card expired"
    NOT_ENROLLED = "card not enrolled"
    ORIGINAL_NOT_FOUND = "original not found"
    NOT_ALLOWED = "operation not allowed on that original or batch"
    AMOUNT_DIFFERS = "amount differs from the original"
    BAD_AMOUNT = "bad amount"
    PIN_BLOCK = "PIN block error"
    # A PIN block that is not a valid one, on a card without a PIN (docs/gateway.md, "A PIN
    # block the card does not need"): ranked where the PIN is decided, answered `A0`.
    PIN_BLOCK_UNSOUND = "PIN block not sound, on a card without a PIN"
    PIN_LOCKED = "PIN locked"
    WRONG_PIN = "wrong PIN"
    NO_PIN = "PIN required, none entered"
    OVER_LIMIT = "over a limit"
    NOT_ENOUGH_POINTS = "not enough points"
    SYSTEM = "system error"
    KEY_SUITE = "key suite mismatch"


RESPONSE_CODES: dict[Decline, str] = {
    Decline.FORMAT: "30",
    Decline.TERMINAL_UNKNOWN: "97",
    Decline.MERCHANT: "03",
    Decline.TERMINAL_DISABLED: "58",
    Decline.MAC: "A0",
    Decline.DUPLICATE: "94",
    Decline.NOT_SUPPORTED: "12",
    Decline.CARD_UNKNOWN: "14",
    Decline.CARD_LOST: "41",
    Decline.CARD_STOLEN: "43",
    Decline.CARD_BLOCKED: "62",
    Decline.CARD_EXPIRED: "54",
    Decline.NOT_ENROLLED: "57",
    Decline.ORIGINAL_NOT_FOUND: "25",
    Decline.NOT_ALLOWED: "22",
    Decline.AMOUNT_DIFFERS: "64",
    Decline.BAD_AMOUNT: "13",
    Decline.PIN_BLOCK: "99",
    Decline.PIN_BLOCK_UNSOUND: "A0",
    Decline.PIN_LOCKED: "75",
    Decline.WRONG_PIN: "55",
    Decline.NO_PIN: "55",
    Decline.OVER_LIMIT: "61",
    Decline.NOT_ENOUGH_POINTS: "51",
    Decline.SYSTEM: "96",
    Decline.KEY_SUITE: "A7",
}

APPROVED = "00"
PARTIAL = "10"
APPROVAL_CODES = frozenset({APPROVED, PARTIAL})


def response_code(decline: Decline) -> str:
    return RESPONSE_CODES[decline]

"""Which message is which, and which fields each one carries (pos-8583.md §3-§4), as data.

A request is classified by its MTI, field 3 and 60.1/60.3; each kind lists the fields it must
carry, the alternatives of which exactly one must be present (track 2 or card number + expiry)
and the groups that come all together or not at all (a PIN: 26 with 52 or 62). A request with
a missing field or one it does not list is a format error (`30`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from cardcodec.subfields import (
    MSG_BALANCE,
    MSG_MANAGEMENT,
    MSG_REDEMPTION,
    MSG_REFUND,
    MSG_VOID,
    NMC_ECHO,
    NMC_FINANCIAL,
    NMC_SETTLEMENT,
    NMC_SIGN_OFF,
    NMC_SIGN_ON_3DES,
    NMC_SIGN_ON_3DES_TDK,
    NMC_SIGN_ON_SM4,
    NMC_SIGN_ON_SM4_TDK,
    NMC_UPLOAD_END_BALANCED,
    NMC_UPLOAD_END_UNBALANCED,
    PROCESSING_BALANCE,
    PROCESSING_REDEMPTION,
    PROCESSING_VOID_REFUND,
)


class Kind(Enum):
    """The requests of §4."""

    # Members are singletons that compare by identity, so the identity hash is as good as
    # `Enum`'s (which hashes the name in Python) and costs nothing; kinds are looked up in
    # sets and dicts several times for every request.
    __hash__ = object.__hash__

    SIGN_ON = "sign-on"
    SIGN_OFF = "sign-off"
    ECHO = "echo"
    BALANCE = "balance"
    REDEMPTION = "redemption"
    VOID = "void"
    REFUND = "refund"
    REVERSAL = "reversal"
    SETTLEMENT = "settlement"
    UPLOAD = "batch upload"
    UPLOAD_END = "end of batch upload"


@dataclass(frozen=True)
class FieldRule:
    """The fields of one message: `required`, exactly one of `one_of` (when given), and at
    most one of `optional_one_of`, whole (a PIN is 26 with 52, or 26 with 62)."""

    required: frozenset[int]
    one_of: tuple[frozenset[int], ...] = ()
    optional_one_of: tuple[frozenset[int], ...] = ()
    # Derived once, since every request is checked against its rule: all the fields the
    # rule allows, and all those of `optional_one_of`.
    _allowed: frozenset[int] = field(init=False, repr=False, compare=False)
    _optional: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        optional = frozenset().union(*self.optional_one_of)
        object.__setattr__(self, "_optional", optional)
        object.__setattr__(self, "_allowed", self.required.union(*self.one_of, optional))

    def allowed(self) -> frozenset[int]:
        return self._allowed

    def problem(self, present: frozenset[int] | set[int]) -> str | None:
        """None when the fields fit; else which field is missing or not allowed."""
        if not self.required <= present:
            return f"field {min(self.required - present)} missing"
        if not present <= self._allowed:
            return f"field {min(present - self._allowed)} not allowed here"
        if self.one_of:
            chosen = [option for option in self.one_of if not option.isdisjoint(present)]
            if len(chosen) != 1 or not chosen[0] <= present:
                return "needs track 2 or card number with expiry, not both"
        optional = present & self._optional
        if optional and optional not in self.optional_one_of:
            wider = [group - optional for group in self.optional_one_of if optional < group]
            if wider:
                return f"field {min(min(missing) for missing in wider)} missing"
            return f"fields {', '.join(map(str, sorted(optional)))} do not go together"
        return None


def _fields(*numbers: int) -> frozenset[int]:
    return frozenset(numbers)


CARD_ENTRY = (_fields(35), _fields(2, 14))
PIN_GROUPS = (_fields(26, 52), _fields(26, 62))

_INQUIRY = _fields(3, 11, 22, 25, 41, 42, 49, 53, 60, 64)
_REVERSAL = _fields(3, 4, 11, 22, 25, 39, 41, 42, 49, 60, 64)


@dataclass(frozen=True)
class RequestProfile:
    kind: Kind
    mti: str
    rule: FieldRule
    processing_code: str | None = None
    message_type: str | None = None
    management_codes: frozenset[str] = field(default_factory=frozenset)


REQUESTS: dict[Kind, RequestProfile] = {
    profile.kind: profile
    for profile in (
        RequestProfile(
            Kind.SIGN_ON,
            "0800",
            FieldRule(_fields(11, 41, 42, 60, 63)),
            message_type=MSG_MANAGEMENT,
            management_codes=frozenset(
                {NMC_SIGN_ON_3DES, NMC_SIGN_ON_3DES_TDK, NMC_SIGN_ON_SM4, NMC_SIGN_ON_SM4_TDK}
            ),
        ),
        RequestProfile(
            Kind.SIGN_OFF,
            "0820",
            FieldRule(_fields(11, 41, 42, 60, 64)),
            message_type=MSG_MANAGEMENT,
            management_codes=frozenset({NMC_SIGN_OFF}),
        ),
        RequestProfile(
            Kind.ECHO,
            "0820",
            FieldRule(_fields(11, 41, 42, 60)),
            message_type=MSG_MANAGEMENT,
            management_codes=frozenset({NMC_ECHO}),
        ),
        RequestProfile(
            Kind.BALANCE,
            "0200",
            FieldRule(_INQUIRY, CARD_ENTRY, PIN_GROUPS),
            PROCESSING_BALANCE,
            MSG_BALANCE,
        ),
        RequestProfile(
            Kind.REDEMPTION,
            "0200",
            FieldRule(_INQUIRY | {4}, CARD_ENTRY, PIN_GROUPS),
            PROCESSING_REDEMPTION,
            MSG_REDEMPTION,
        ),
        RequestProfile(
            Kind.VOID,
            "0200",
            FieldRule(_INQUIRY | {4, 37, 61}, CARD_ENTRY),
            PROCESSING_VOID_REFUND,
            MSG_VOID,
        ),
        RequestProfile(
            Kind.REFUND,
            "0220",
            FieldRule(_INQUIRY | {4, 37, 61}, CARD_ENTRY),
            PROCESSING_VOID_REFUND,
            MSG_REFUND,
        ),
        RequestProfile(
            Kind.REVERSAL,
            "0400",
            # Of a redemption; a void's reversal also carries 61 (see `request_rule`).
            FieldRule(_REVERSAL, (), (_fields(2, 14),)),
        ),
        RequestProfile(
            Kind.SETTLEMENT,
            "0500",
            FieldRule(_fields(11, 41, 42, 48, 49, 60, 63, 64)),
            message_type=MSG_MANAGEMENT,
            management_codes=frozenset({NMC_SETTLEMENT}),
        ),
        RequestProfile(
            Kind.UPLOAD,
            "0320",
            FieldRule(_fields(11, 41, 42, 48, 60, 64)),
            message_type=MSG_MANAGEMENT,
            management_codes=frozenset({NMC_SETTLEMENT}),
        ),
        RequestProfile(
            Kind.UPLOAD_END,
            "0320",
            FieldRule(_fields(11, 41, 42, 48, 60, 64)),
            message_type=MSG_MANAGEMENT,
            management_codes=frozenset({NMC_UPLOAD_END_UNBALANCED, NMC_UPLOAD_END_BALANCED}),
        ),
    )
}

# The valid financial combinations of §3: (MTI, field 3, 60.1) -> kind.
FINANCIAL: dict[tuple[str, str, str], Kind] = {
    ("0200", PROCESSING_BALANCE, MSG_BALANCE): Kind.BALANCE,
    ("0200", PROCESSING_REDEMPTION, MSG_REDEMPTION): Kind.REDEMPTION,
    ("0200", PROCESSING_VOID_REFUND, MSG_VOID): Kind.VOID,
    ("0220", PROCESSING_VOID_REFUND, MSG_REFUND): Kind.REFUND,
    ("0400", PROCESSING_REDEMPTION, MSG_REDEMPTION): Kind.REVERSAL,
    ("0400", PROCESSING_VOID_REFUND, MSG_VOID): Kind.REVERSAL,
}
FINANCIAL_MTIS = frozenset({"0200", "0220", "0400"})
# §7: the requests recorded for idempotency (their repeats get the stored answer), once past
# the format, terminal and MAC checks.
RECORDED_MTIS = frozenset({"0200", "0220", "0320", "0400", "0500"})
# The MTIs a terminal sends (§4). A response MTI from a terminal is not a request: it closes
# the link, like an MTI the profile does not list (§1).
REQUEST_MTIS = frozenset(profile.mti for profile in REQUESTS.values())
_VOID_REVERSAL_RULE = FieldRule(_REVERSAL | {61}, (), (_fields(2, 14),))


def request_rule(kind: Kind, message_type: str) -> FieldRule:
    """The fields a request of that kind must carry; a reversal's depend on its 60.1."""
    if kind is Kind.REVERSAL and message_type == MSG_VOID:
        return _VOID_REVERSAL_RULE
    return REQUESTS[kind].rule


def classify(mti: str, processing_code: str | None, message_data: str | None) -> Kind | None:
    """The kind of a request, or None for a combination the profile does not support (`12`).

    `message_data` is field 60 as sent (None when absent); only 60.1 and 60.3 are read here.
    """
    if message_data is None or len(message_data) < 11:
        return None
    message_type, management_code = message_data[0:2], message_data[8:11]
    if mti in FINANCIAL_MTIS:
        if management_code != NMC_FINANCIAL or processing_code is None:
            return None
        return FINANCIAL.get((mti, processing_code, message_type))
    for profile in REQUESTS.values():
        if (
            profile.mti == mti
            and profile.message_type == message_type
            and management_code in profile.management_codes
        ):
            return profile.kind
    return None


# Responses (§4): the fields an answer carries.
DECLINE_FIELDS = _fields(3, 4, 11, 12, 13, 15, 32, 37, 39, 41, 42, 49, 60)
RESPONSES: dict[Kind, FieldRule] = {
    Kind.SIGN_ON: FieldRule(_fields(11, 12, 13, 15, 32, 37, 39, 41, 42, 60, 62)),
    Kind.SIGN_OFF: FieldRule(_fields(11, 12, 13, 39, 41, 42, 60), optional_one_of=(_fields(64),)),
    Kind.ECHO: FieldRule(_fields(11, 12, 13, 39, 41, 42, 60)),
    Kind.BALANCE: FieldRule(
        _fields(3, 11, 12, 13, 15, 32, 37, 39, 41, 42, 49, 54, 60, 63, 64),
        optional_one_of=(_fields(2),),
    ),
    Kind.REDEMPTION: FieldRule(
        _fields(3, 4, 11, 12, 13, 15, 32, 37, 38, 39, 41, 42, 49, 54, 60, 63, 64),
        optional_one_of=(_fields(2),),
    ),
    Kind.REVERSAL: FieldRule(_fields(3, 4, 11, 12, 13, 15, 32, 37, 39, 41, 42, 49, 60, 64)),
    Kind.SETTLEMENT: FieldRule(_fields(11, 12, 13, 15, 39, 41, 42, 48, 60, 64)),
    Kind.UPLOAD: FieldRule(_fields(11, 12, 13, 39, 41, 42, 60, 64)),
    Kind.UPLOAD_END: FieldRule(_fields(11, 12, 13, 39, 41, 42, 60, 64)),
}
RESPONSES[Kind.VOID] = RESPONSES[Kind.REDEMPTION]
RESPONSES[Kind.REFUND] = RESPONSES[Kind.REDEMPTION]

"""One POS terminal's state and messages (pos-8583.md §4-§5), without sockets.

A `Terminal` holds what a retrofitted POS keeps between transactions: its trace counter, the
batch the gateway opened for it, the working keys of its last sign-on, the local totals of the
open batch and the reversal it still owes. It builds each request of §4 as the frame to send
(MAC included) and reads each answer: the checks a terminal makes (MTI, TPDU, header, echoed
11/41/42, the MAC when the answer must carry one), then the state change the answer means.

The reversal rule of §4.6 lives here too: a redemption or void without a valid answer leaves a
pending reversal, and every builder except the sign-on refuses to build until it is sent.

For rehearsals, a terminal keeps its last working keys after a sign-off or an answer asking it
to sign on again (header digit `3`): it is then marked as not signed on, but can still send, so
that operators can see what the gateway answers to a terminal in that state.

For replays, `Terminal.rebuild` turns a request recorded in another session into the same
request under this session's keys: fresh MAC, the track re-encrypted under the new TDK (or sent
clear), and a PIN block carried over only by what the config knows of the card's PIN, never by
decrypting it; a corrupted PIN block is recognised by comparison and corrupted again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from cardcodec import crypto
from cardcodec.cards import mask_card_data, mask_card_number
from cardcodec.crypto import Suite, WorkingKeys
from cardcodec.errors import CodecError
from cardcodec.frame import (
    LENGTH_BYTES,
    PROCESSING_OK,
    PROCESSING_SIGN_ON_AGAIN,
    Header,
    Tpdu,
    add_length,
)
from cardcodec.message import (
    FieldValue,
    Message,
    decode_frame,
    encode_frame,
    encode_message_with_mac,
    has_mac,
    mac_input,
    received_mac,
)
from cardcodec.profile import Kind, classify, request_rule
from cardcodec.subfields import (
    MAX_UPLOAD_RECORDS,
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
    RESULT_BALANCED,
    RESULT_UNBALANCED,
    Balance,
    EntryMode,
    MessageData,
    OriginalData,
    PointsInfo,
    SecurityControl,
    SettlementTotals,
    Totals,
    Track2,
    UploadRecord,
    format_upload,
    format_upload_end,
)

if TYPE_CHECKING:
    from gateway.config import TerminalConfig

# Free text a person reads (a scenario's description or a step's name, a key or a name a file
# uses, an error's text) is masked from this many digits on: a plan card has 19, and a
# merchant id's 15 stay readable, as in the config's errors.
FREE_TEXT_CARD_DIGITS: Final = 16
APPROVED: Final = "00"
PARTIALLY_APPROVED: Final = "10"
APPROVALS: Final = frozenset({APPROVED, PARTIALLY_APPROVED})
# A reversal answered with one of these is still owed: sign on again (A0), try later (96).
_STILL_OWED_CODES: Final = frozenset({"A0", "96"})

# Reversal reasons (§4.6, field 39 of a 0400).
REASON_NO_ANSWER: Final = "98"
REASON_TERMINAL_FAILED: Final = "96"
REASON_BAD_MAC: Final = "A0"
REASON_OTHER: Final = "06"
REVERSAL_REASONS: Final = (REASON_NO_ANSWER, REASON_TERMINAL_FAILED, REASON_BAD_MAC, REASON_OTHER)

CURRENCY_CNY: Final = "156"
CONDITION_NORMAL: Final = "00"
PIN_CAPTURE_CODE: Final = "06"
READ_CAPABILITY_STRIPE: Final = "2"
IC_CONDITION_NONE: Final = "0"
DEFAULT_OPERATOR: Final = "01 "
SERVICE_CODE: Final = "101"
DISCRETIONARY_DATA: Final = "0000012345"
FIRST_BATCH: Final = "000001"
MAX_TRACE: Final = 999_999
MAX_BATCH: Final = 999_999
MAX_AMOUNT_FEN: Final = 999_999_999_999  # field 4 is n12

# Fields a reversal leaves out of its copy of the original (§4.6).
_NOT_IN_REVERSAL: Final = frozenset({26, 35, 52, 53, 62, 37, 64})
# Fields that identify a request: without 11, 41 or 42 the gateway cannot answer at all (§7),
# and 60 says what the request is; a rehearsal of a missing field leaves them in.
IDENTIFYING_FIELDS: Final = frozenset({11, 41, 42, 60})
MAC_FIELD: Final = 64
# A clear PIN block that is no ISO 9564 format 0 block for any card: its format nibble is F,
# and the card number's block starts with 0000, so the XOR of §5.3 keeps that F.
_CORRUPT_CLEAR_PIN_BLOCK: Final = b"\xff" * crypto.PIN_BLOCK_BYTES
# Answers that carry no MAC even when approved (§5.1).
_UNMACED_ANSWERS: Final = frozenset({Kind.SIGN_ON, Kind.ECHO})
_REVERSIBLE: Final = frozenset({Kind.REDEMPTION, Kind.VOID})
_SIGN_ON_CODES: Final = {
    (Suite.TDES, False): NMC_SIGN_ON_3DES,
    (Suite.TDES, True): NMC_SIGN_ON_3DES_TDK,
    (Suite.SM4, False): NMC_SIGN_ON_SM4,
    (Suite.SM4, True): NMC_SIGN_ON_SM4_TDK,
}


class TerminalError(Exception):
    """A request the terminal cannot build in its present state (no keys, no TDK, ...)."""


class NotSignedOnError(TerminalError):
    """The request needs working keys and the terminal has never had any."""


class ReversalPendingError(TerminalError):
    """A reversal is owed (§4.6): it must be sent before anything but a sign-on."""


class BadAnswerError(Exception):
    """An answer that fails the terminal's checks; `reversal_reason` is what a reversal of
    the request would carry in field 39 (`A0` for a bad MAC, `06` for anything else)."""

    def __init__(self, reason: str, reversal_reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reversal_reason = reversal_reason


def _check_amount(amount_fen: int) -> None:
    if type(amount_fen) is not int or not 0 <= amount_fen <= MAX_AMOUNT_FEN:
        raise ValueError(f"amount_fen must be an integer from 0 to {MAX_AMOUNT_FEN}")


def corrupt_pin_block(suite: Suite, pik: bytes) -> bytes:
    """A PIN block (field 52, or 62 for SM4) that decrypts under `pik` to no valid block, so
    that the gateway answers `99` (§5.3). It is made from no PIN, so a replay recognises it by
    comparing blocks under the recorded PIK, without decrypting anything."""
    padding = bytes(suite.block_size - crypto.PIN_BLOCK_BYTES)
    return crypto.encrypt_ecb(suite, pik, _CORRUPT_CLEAR_PIN_BLOCK + padding)


def next_batch(batch: str) -> str:
    """The batch after `batch`: batch + 1, and after 999999 comes 000001 (§4.7)."""
    number = int(batch)
    return f"{1 if number >= MAX_BATCH else number + 1:06d}"


@dataclass(frozen=True, repr=False)
class CardEntry:
    """How the card is presented: swiped (track 2 built from number and expiry) or keyed
    (fields 2 and 14). The simulator's track has service code 101 and fixed discretionary
    data."""

    number: str
    expiry_yymm: str
    keyed: bool = False

    def __post_init__(self) -> None:
        if not (13 <= len(self.number) <= 19 and self.number.isascii() and self.number.isdigit()):
            raise ValueError("card number must be 13 to 19 digits")
        expiry = self.expiry_yymm
        if len(expiry) != 4 or not expiry.isdigit() or not 1 <= int(expiry[2:]) <= 12:
            raise ValueError("card expiry must be YYMM")

    @property
    def masked(self) -> str:
        return mask_card_number(self.number)

    def __repr__(self) -> str:
        return f"CardEntry({self.masked!r}, keyed={self.keyed})"

    def track2(self) -> str:
        """Track 2 in clear: number, `D`, YYMM, service code, discretionary data."""
        return Track2(self.number, self.expiry_yymm, SERVICE_CODE, DISCRETIONARY_DATA).format()


@dataclass(frozen=True, repr=False)
class Request:
    """A request as built: its kind, the message, the frame to send (LEN included) and the
    card it carries (the original's, for a reversal)."""

    kind: Kind
    message: Message
    frame: bytes
    card: CardEntry | None = None

    @property
    def mti(self) -> str:
        return self.message.mti

    @property
    def trace(self) -> str:
        return self.message.text(11)

    @property
    def message_data(self) -> MessageData:
        return MessageData.parse(self.message.text(60))

    @property
    def batch(self) -> str:
        return self.message_data.batch

    @property
    def amount_fen(self) -> int | None:
        value = self.message.fields.get(4)
        return int(value) if isinstance(value, str) else None

    def __repr__(self) -> str:
        return f"Request({self.describe()!r})"

    def describe(self) -> str:
        """One line for a report: no PIN, no key, no track, the card masked. A request whose
        fields do not read (a hostile frame in a gateway's recording, say) is described by
        its trace and what is wrong with it, never by its bytes."""
        try:
            details = _request_details(self)
        except (CodecError, KeyError, ValueError) as error:
            reason = (
                mask_card_data(str(error))
                if isinstance(error, CodecError)
                else "a field missing or malformed"
            )
            details = [f"trace {self.trace}", f"(fields do not read: {reason})"]
        return " ".join([self.mti, self.kind.value, *details])


def _request_details(request: Request) -> list[str]:
    fields = request.message.fields
    data = request.message_data
    parts = [f"trace {request.trace}", f"batch {data.batch}"]
    if request.kind is Kind.SIGN_ON:
        parts.append(f"60.3 {data.management_code}")
    if request.kind is Kind.REVERSAL:
        parts.append(f"reason {request.message.text(39)}")
    if request.card is not None:
        parts.append(f"card {request.card.masked} {'keyed' if request.card.keyed else 'swiped'}")
    if 53 in fields and SecurityControl.parse(request.message.text(53)).track_encrypted:
        parts.append("track encrypted")
    if 26 in fields:
        parts.append("with PIN")
    if request.amount_fen is not None:
        parts.append(f"amount {request.amount_fen} fen")
    if data.partial_supported:
        parts.append("partial allowed")
    if 61 in fields:
        original = OriginalData.parse(request.message.text(61))
        parts.append(f"original {original.batch}/{original.trace}")
    if 37 in fields:
        parts.append(f"rrn {request.message.text(37)}")
    if 48 in fields:
        parts.append(_describe_48(request))
    return parts


def _describe_48(request: Request) -> str:
    value = request.message.text(48)
    if request.kind is Kind.SETTLEMENT:
        totals = SettlementTotals.parse(value).totals
        return _describe_totals(totals)
    if request.kind is Kind.UPLOAD_END:
        return f"{int(value)} records"
    return f"{int(value[:2])} records"


def _describe_totals(totals: Totals) -> str:
    return (
        f"debits {totals.debit_count}/{totals.debit_fen} fen "
        f"credits {totals.credit_count}/{totals.credit_fen} fen"
    )


@dataclass(frozen=True)
class Result:
    """What an answer says, typed. Optional parts are None when the answer lacks the field."""

    kind: Kind
    mti: str
    code: str
    trace: str
    sign_on_again: bool = False
    batch: str | None = None
    rrn: str | None = None
    auth_code: str | None = None
    amount_fen: int | None = None
    local_date: str | None = None  # field 13, MMDD
    business_date: str | None = None  # field 15, MMDD
    points: int | None = None  # field 63: used, or returned
    balance_points: int | None = None  # field 63: spendable after
    discount_bp: int | None = None
    cash_fen: int | None = None  # field 63: settled, or clawed back
    balance_fen: int | None = None  # field 54
    settlement: SettlementTotals | None = None  # field 48 of a 0510
    keys: WorkingKeys | None = field(default=None, repr=False, compare=False)

    @property
    def approved(self) -> bool:
        return self.code in APPROVALS

    @property
    def balanced(self) -> bool | None:
        """For a 0510: whether the gateway found the batch balanced."""
        return None if self.settlement is None else self.settlement.result == RESULT_BALANCED

    def describe(self) -> str:
        """One line for a report."""
        parts = [self.mti, self.code]
        named = (
            ("rrn", self.rrn),
            ("auth", self.auth_code),
            ("batch", self.batch if self.kind is Kind.SIGN_ON else None),
        )
        parts += [f"{name} {value}" for name, value in named if value is not None]
        numbers = (
            ("amount", self.amount_fen, " fen"),
            ("points", self.points, ""),
            ("balance", self.balance_points, " points"),
            ("discount", self.discount_bp, " bp"),
            ("cash", self.cash_fen, " fen"),
            ("balance", self.balance_fen, " fen"),
        )
        parts += [f"{name} {value}{unit}" for name, value, unit in numbers if value is not None]
        if self.settlement is not None:
            parts.append(_describe_totals(self.settlement.totals))
            parts.append("balanced" if self.balanced else "not balanced")
        if self.sign_on_again:
            parts.append("(sign on again)")
        return " ".join(parts)


@dataclass(frozen=True)
class Completed:
    """A request and its answer (None when none was received), kept to void, refund or
    reverse it later."""

    request: Request
    result: Result | None


@dataclass(frozen=True, repr=False)
class Rebuilt:
    """A recorded request rebuilt under the current keys (`Terminal.rebuild`).

    `notes` say what could not be carried over as recorded, in words (never a PIN, a key or a
    track); `recorded_mac_wrong` is True when the recorded MAC did not verify under the
    recorded MAK, so that a replay can corrupt the new one the same way."""

    request: Request
    notes: tuple[str, ...] = ()
    recorded_mac_wrong: bool = False

    def __repr__(self) -> str:
        return f"Rebuilt({self.request.describe()!r}, notes={self.notes!r})"


@dataclass(frozen=True)
class PendingReversal:
    """The request a reversal is owed for and the reason it will carry."""

    original: Request
    reason: str


@dataclass
class _BatchEntry:
    """One transaction of the open batch as the terminal counts it (§4.7)."""

    kind: Kind
    trace: str
    card_number: str
    amount_fen: int
    original_trace: str | None = None  # a void's redemption, in this batch
    voided: bool = False
    refunded: bool = False
    reversed: bool = False

    @property
    def counted(self) -> bool:
        return not self.reversed


@dataclass(frozen=True, repr=False)
class SettledBatch:
    """The batch the last 0510 closed: what a batch upload sends for it."""

    batch: str
    totals: Totals
    records: tuple[UploadRecord, ...]
    balanced: bool

    def chunks(self) -> list[tuple[UploadRecord, ...]]:
        """The records as the 0320s carry them, at most 8 each."""
        step = MAX_UPLOAD_RECORDS
        return [self.records[i : i + step] for i in range(0, len(self.records), step)]


class Terminal:
    """One terminal: identity, keys, trace counter, open batch and its totals."""

    def __init__(
        self,
        terminal_id: str,
        merchant_id: str,
        suite: Suite,
        tmk: bytes,
        *,
        batch: str = FIRST_BATCH,
        stan: int = 1,
        operator: str = DEFAULT_OPERATOR,
        tpdu: Tpdu | None = None,
        header: Header | None = None,
    ) -> None:
        if len(terminal_id) != 8 or len(merchant_id) != 15:
            raise ValueError("terminal id must be 8 characters and merchant id 15")
        if len(tmk) != crypto.KEY_BYTES:
            raise ValueError("terminal master key must be 16 bytes")
        if len(operator) != 3:
            raise ValueError("operator code must be 3 characters")
        self.terminal_id = terminal_id
        self.merchant_id = merchant_id
        self.suite = suite
        self._tmk = tmk
        self.operator = operator
        self.tpdu = tpdu if tpdu is not None else Tpdu()
        self.header = header if header is not None else Header()
        if len(batch) != 6 or not batch.isdigit():
            raise ValueError("batch must be 6 digits")
        self._batch = batch
        self._stan = 1
        self.stan = stan
        self.keys: WorkingKeys | None = None
        self.asked_tdk = False  # whether the sign-on that gave the keys asked for a TDK
        self.signed_on = False
        self.pending_reversal: PendingReversal | None = None
        # (batch, trace) of each transaction reversed, and the reason its 0400 carried.
        self._reversal_reasons: dict[tuple[str, str], str] = {}
        self.settled: SettledBatch | None = None
        self._entries: list[_BatchEntry] = []

    @classmethod
    def from_config(cls, terminal: TerminalConfig) -> Terminal:
        """A terminal with the id, merchant, suite and TMK of a config's `[[terminals]]`."""
        return cls(terminal.id, terminal.merchant, terminal.suite, terminal.tmk)

    def __repr__(self) -> str:
        return f"Terminal({self.terminal_id!r}, batch={self._batch!r}, stan={self._stan})"

    # --- state ---------------------------------------------------------------------------

    @property
    def stan(self) -> int:
        """The trace number the next new request will carry."""
        return self._stan

    @stan.setter
    def stan(self, value: int) -> None:
        if type(value) is not int or not 1 <= value <= MAX_TRACE:
            raise ValueError(f"trace number must be 1 to {MAX_TRACE}")
        self._stan = value

    @property
    def batch(self) -> str:
        """The open batch (60.2), as the last 0810 or 0510 left it."""
        return self._batch

    @property
    def has_tdk(self) -> bool:
        return self.keys is not None and self.keys.tdk is not None

    def totals(self) -> Totals:
        """The open batch's totals: approved redemptions (voided ones too) as debits, approved
        voids and refunds as credits, reversed ones nowhere."""
        debits = [e.amount_fen for e in self._counted() if e.kind is Kind.REDEMPTION]
        credits = [e.amount_fen for e in self._counted() if e.kind is not Kind.REDEMPTION]
        return Totals(sum(debits), len(debits), sum(credits), len(credits))

    def upload_records(self) -> tuple[UploadRecord, ...]:
        """The open batch's counted transactions as batch upload records."""
        return tuple(
            UploadRecord(entry.trace, entry.card_number, entry.amount_fen)
            for entry in self._counted()
        )

    def _counted(self) -> list[_BatchEntry]:
        return [entry for entry in self._entries if entry.counted]

    def _take_trace(self) -> str:
        trace = f"{self._stan:06d}"
        self._stan = 1 if self._stan >= MAX_TRACE else self._stan + 1
        return trace

    def _require_keys(self) -> WorkingKeys:
        if self.keys is None:
            raise NotSignedOnError(
                f"terminal {self.terminal_id} has no working keys: sign on first"
            )
        return self.keys

    def _require_no_reversal(self) -> None:
        if self.pending_reversal is not None:
            original = self.pending_reversal.original
            raise ReversalPendingError(
                f"terminal {self.terminal_id} owes a reversal of trace {original.trace}: "
                "send it first"
            )

    # --- building ------------------------------------------------------------------------

    def _message(self, mti: str, fields: dict[int, FieldValue]) -> Message:
        common: dict[int, FieldValue] = {41: self.terminal_id, 42: self.merchant_id}
        return Message(mti, {**fields, **common}, self.tpdu, self.header)

    def _finish(
        self, kind: Kind, message: Message, *, card: CardEntry | None = None, maced: bool = True
    ) -> Request:
        present = set(message.fields) | ({64} if maced else set())
        problem = request_rule(kind, message.text(60)[:2]).problem(present)
        if problem is not None:  # a builder bug: never send what the gateway must refuse
            raise RuntimeError(f"{kind.value} request is malformed: {problem}")
        if maced:
            keys = self._require_keys()
            payload = encode_message_with_mac(
                message, lambda data: crypto.mac(self.suite, keys.mak, data)
            )
            frame = add_length(payload)
        else:
            frame = encode_frame(message)
        return Request(kind, message, frame, card)

    def _management(self, code: str, batch: str | None = None) -> str:
        return MessageData(MSG_MANAGEMENT, batch or self._batch, code).format()

    def sign_on(self, *, tdk: bool = False, suite: Suite | None = None) -> Request:
        """0800: ask for PIK and MAK (and a TDK) of the terminal's suite, or of `suite` to
        rehearse a mismatch (`A7`). Allowed while a reversal is owed."""
        code = _SIGN_ON_CODES[(suite or self.suite, tdk)]
        fields: dict[int, FieldValue] = {
            11: self._take_trace(),
            60: self._management(code),
            63: self.operator,
        }
        return self._finish(Kind.SIGN_ON, self._message("0800", fields), maced=False)

    def sign_off(self) -> Request:
        """0820 with 60.3 `002`, MAC'd."""
        self._require_no_reversal()
        self._require_keys()
        fields: dict[int, FieldValue] = {11: self._take_trace(), 60: self._management(NMC_SIGN_OFF)}
        return self._finish(Kind.SIGN_OFF, self._message("0820", fields))

    def echo(self) -> Request:
        """0820 with 60.3 `301`; no MAC, no sign-on needed."""
        self._require_no_reversal()
        fields: dict[int, FieldValue] = {11: self._take_trace(), 60: self._management(NMC_ECHO)}
        return self._finish(Kind.ECHO, self._message("0820", fields), maced=False)

    def _card_fields(
        self, card: CardEntry, pin: str | None, encrypt_track: bool
    ) -> dict[int, FieldValue]:
        """22, 25, 35 or 2 + 14, 49, 53 and, with a PIN, 26 and 52 or 62."""
        keys = self._require_keys()
        fields: dict[int, FieldValue] = {25: CONDITION_NORMAL, 49: CURRENCY_CNY}
        if card.keyed:
            if encrypt_track:
                raise TerminalError("a keyed card has no track to encrypt")
            fields[2] = card.number
            fields[14] = card.expiry_yymm
        elif encrypt_track:
            if keys.tdk is None:
                raise TerminalError(
                    f"terminal {self.terminal_id} holds no TDK: sign on with a TDK first"
                )
            fields[35] = crypto.encrypt_track(self.suite, keys.tdk, card.track2())
        else:
            fields[35] = card.track2()
        if pin is not None:
            block = crypto.encrypt_pin(self.suite, keys.pik, pin, card.number)
            fields[26] = PIN_CAPTURE_CODE
            fields[52 if self.suite is Suite.TDES else 62] = block
        fields[22] = EntryMode(keyed=card.keyed, pin_entered=pin is not None).format()
        fields[53] = SecurityControl(pin is not None, self.suite, encrypt_track).format()
        return fields

    def _financial_data(self, message_type: str, partial: bool = False) -> str:
        return MessageData(
            message_type,
            self._batch,
            NMC_FINANCIAL,
            READ_CAPABILITY_STRIPE,
            IC_CONDITION_NONE,
            partial,
        ).format()

    def balance(
        self, card: CardEntry, *, pin: str | None = None, encrypt_track: bool = False
    ) -> Request:
        """0200 balance inquiry (3 `310000`, 60.1 `01`)."""
        self._require_no_reversal()
        fields = self._card_fields(card, pin, encrypt_track)
        fields |= {3: PROCESSING_BALANCE, 11: self._take_trace()}
        fields[60] = self._financial_data(MSG_BALANCE)
        return self._finish(Kind.BALANCE, self._message("0200", fields), card=card)

    def redemption(
        self,
        card: CardEntry,
        amount_fen: int,
        *,
        pin: str | None = None,
        encrypt_track: bool = False,
        partial: bool = False,
    ) -> Request:
        """0200 redemption (3 `000000`, 60.1 `22`); `partial` sets 60.6."""
        self._require_no_reversal()
        _check_amount(amount_fen)
        fields = self._card_fields(card, pin, encrypt_track)
        fields |= {3: PROCESSING_REDEMPTION, 4: f"{amount_fen:012d}", 11: self._take_trace()}
        fields[60] = self._financial_data(MSG_REDEMPTION, partial)
        return self._finish(Kind.REDEMPTION, self._message("0200", fields), card=card)

    def void(
        self,
        original: Completed,
        *,
        card: CardEntry | None = None,
        amount_fen: int | None = None,
        encrypt_track: bool = False,
    ) -> Request:
        """0200 void of a redemption: 4 the original's amount as answered (or `amount_fen`
        to rehearse a mismatch), 37 its RRN, 61 its batch and trace."""
        self._require_no_reversal()
        return self._void_or_refund(Kind.VOID, original, card, amount_fen, encrypt_track)

    def refund(
        self,
        original: Completed,
        amount_fen: int,
        *,
        card: CardEntry | None = None,
        encrypt_track: bool = False,
    ) -> Request:
        """0220 refund of `amount_fen` of a redemption: 37 its RRN, 61 its batch, trace and
        the date its answer gave in field 13."""
        self._require_no_reversal()
        return self._void_or_refund(Kind.REFUND, original, card, amount_fen, encrypt_track)

    def _void_or_refund(
        self,
        kind: Kind,
        original: Completed,
        card: CardEntry | None,
        amount_fen: int | None,
        encrypt_track: bool,
    ) -> Request:
        answer = original.result
        if original.request.kind is not Kind.REDEMPTION or answer is None or answer.rrn is None:
            raise TerminalError(f"a {kind.value} needs a redemption that was answered with an RRN")
        if amount_fen is None:
            amount_fen = answer.amount_fen  # A' after a partial approval
        if amount_fen is None:
            amount_fen = original.request.amount_fen
        if amount_fen is None:
            raise TerminalError(f"a {kind.value} needs the original's amount")
        _check_amount(amount_fen)
        date = None
        if kind is Kind.REFUND:
            if answer.local_date is None:
                raise TerminalError("a refund needs the original's date (field 13 of its answer)")
            date = answer.local_date
        card = card or original.request.card
        if card is None:
            raise TerminalError(f"a {kind.value} needs the card")
        fields = self._card_fields(card, None, encrypt_track)
        fields |= {
            3: PROCESSING_VOID_REFUND,
            4: f"{amount_fen:012d}",
            11: self._take_trace(),
            37: answer.rrn,
            61: OriginalData(original.request.batch, original.request.trace, date).format(),
        }
        fields[60] = self._financial_data(MSG_VOID if kind is Kind.VOID else MSG_REFUND)
        mti = "0200" if kind is Kind.VOID else "0220"
        return self._finish(kind, self._message(mti, fields), card=card)

    def reversal(self) -> Request:
        """0400 for the pending reversal: a copy of the original without 26, 35, 52, 53, 62
        and 37, with the reason in 39 and a MAC under the current MAK."""
        pending = self.pending_reversal
        if pending is None:
            raise TerminalError(f"terminal {self.terminal_id} owes no reversal")
        original = pending.original.message
        fields = {n: v for n, v in original.fields.items() if n not in _NOT_IN_REVERSAL}
        fields[39] = pending.reason
        message = Message("0400", fields, original.tpdu, original.header)
        return self._finish(Kind.REVERSAL, message, card=pending.original.card)

    def settlement(self) -> Request:
        """0500 for the open batch with the terminal's own totals in field 48."""
        self._require_no_reversal()
        fields: dict[int, FieldValue] = {
            11: self._take_trace(),
            48: SettlementTotals(self.totals()).format(),
            49: CURRENCY_CNY,
            60: self._management(NMC_SETTLEMENT),
            63: self.operator,
        }
        return self._finish(Kind.SETTLEMENT, self._message("0500", fields))

    def _settled(self) -> SettledBatch:
        if self.settled is None:
            raise TerminalError(f"terminal {self.terminal_id} has no settled batch to upload")
        return self.settled

    def batch_upload(self, records: Sequence[UploadRecord]) -> Request:
        """0320 (60.3 `201`) carrying 1 to 8 records of the batch just settled."""
        self._require_no_reversal()
        settled = self._settled()
        fields: dict[int, FieldValue] = {
            11: self._take_trace(),
            48: format_upload(list(records)),
            60: self._management(NMC_SETTLEMENT, settled.batch),
        }
        return self._finish(Kind.UPLOAD, self._message("0320", fields))

    def upload_end(self, total_records: int) -> Request:
        """The end 0320: 60.3 `207` after a balanced settlement, `202` after an unbalanced
        one, with the number of records uploaded."""
        self._require_no_reversal()
        settled = self._settled()
        code = NMC_UPLOAD_END_BALANCED if settled.balanced else NMC_UPLOAD_END_UNBALANCED
        fields: dict[int, FieldValue] = {
            11: self._take_trace(),
            48: format_upload_end(total_records),
            60: self._management(code, settled.batch),
        }
        return self._finish(Kind.UPLOAD_END, self._message("0320", fields))

    # --- rehearsing malformed requests --------------------------------------------------

    def without_field(self, request: Request, number: int) -> Request:
        """`request` without field `number`, MAC'd afresh when it carries a MAC (without one
        when `number` is 64), to rehearse a request missing a field (`30`, or `12` without
        field 3). Changes nothing in the terminal: the trace it took stays taken.

        `ValueError` for a field that identifies the request (11, 41, 42, 60);
        `TerminalError` when the request does not carry the field."""
        if number in IDENTIFYING_FIELDS:
            raise ValueError(f"field {number} identifies the request and cannot be left out")
        maced = has_mac(request.frame[LENGTH_BYTES:])
        carried = number in request.message.fields or (number == MAC_FIELD and maced)
        if not carried:
            raise TerminalError(f"the {request.kind.value} carries no field {number} to leave out")
        fields = {n: v for n, v in request.message.fields.items() if n != number}
        return self._remade(request, fields, maced=maced and number != MAC_FIELD)

    def with_corrupt_pin(self, request: Request) -> Request:
        """`request` with its PIN block replaced by one that decrypts to no valid block
        (`corrupt_pin_block`), MAC'd afresh: the gateway answers `99` for a card with a PIN.
        Changes nothing in the terminal. `TerminalError` when the request has no PIN block."""
        fields = dict(request.message.fields)
        number = next((n for n in (52, 62) if isinstance(fields.get(n), bytes)), None)
        if number is None or 26 not in fields:
            raise TerminalError(f"the {request.kind.value} carries no PIN block to corrupt")
        fields[number] = corrupt_pin_block(self.suite, self._require_keys().pik)
        return self._remade(request, fields, maced=has_mac(request.frame[LENGTH_BYTES:]))

    def _remade(self, request: Request, fields: dict[int, FieldValue], *, maced: bool) -> Request:
        """The request with other fields, in its own envelope, MAC'd under the current MAK
        when `maced`; the field rules of §4 are not checked (that is the point)."""
        old = request.message
        message = Message(old.mti, fields, old.tpdu, old.header)
        if not maced:
            return Request(request.kind, message, encode_frame(message), request.card)
        keys = self._require_keys()
        payload = encode_message_with_mac(
            message, lambda data: crypto.mac(self.suite, keys.mak, data)
        )
        return Request(request.kind, message, add_length(payload), request.card)

    # --- rebuilding a recorded request --------------------------------------------------

    def rebuild(
        self,
        frame: bytes,
        *,
        recorded_keys: WorkingKeys | None = None,
        pins: Mapping[str, str] | None = None,
        replace: Mapping[int, FieldValue] | None = None,
    ) -> Rebuilt:
        """The request recorded as `frame` (LEN included, as it went over the wire), rebuilt
        under this terminal's working keys; changes nothing in the terminal.

        Every field stays as recorded (trace, batch, amounts, field 48) except those given in
        `replace`, and: an encrypted track is decrypted with the recorded TDK and encrypted
        again under this session's TDK, or sent clear (53 digit 3 `0`) when this session has
        none; the MAC is computed afresh. `recorded_keys` are the working keys of the recorded
        session; without them an encrypted track cannot be read and goes as recorded.

        A PIN block is never decrypted. A recorded block equal to `corrupt_pin_block` under
        the recorded PIK is sent as the corrupted block under the new PIK (a `99` stays one).
        Otherwise, when `pins` (card number -> PIN, as the config knows them) has the card's
        PIN, the recorded block is compared with that PIN's block under the recorded PIK: the
        same, and the PIN's block under the new PIK is sent; different, and the block of a PIN
        known to be wrong is sent, so that a wrong-PIN attempt stays one. Otherwise the
        recorded block goes as it was (re-MAC'd), and `notes` say so.

        `CodecError` when the frame does not decode; `TerminalError` when it is no request
        of the profile, or needs keys this terminal does not have.
        """
        recorded = decode_frame(frame)
        fields = dict(recorded.fields)
        processing = fields.get(3)
        message_data = fields.get(60)
        kind = classify(
            recorded.mti,
            processing if isinstance(processing, str) else None,
            message_data if isinstance(message_data, str) else None,
        )
        if kind is None:
            raise TerminalError(f"recorded {recorded.mti} is not a request of the profile")
        fields.update(replace or {})
        maced = fields.pop(64, None) is not None
        notes: list[str] = []
        card = self._carry_track(fields, recorded_keys, notes)
        self._carry_pin(fields, card, recorded_keys, pins or {}, notes)
        message = Message(recorded.mti, fields, recorded.tpdu, recorded.header)
        if not maced:
            return Rebuilt(Request(kind, message, encode_frame(message), card), tuple(notes))
        keys = self._require_keys()
        payload = encode_message_with_mac(
            message, lambda data: crypto.mac(self.suite, keys.mak, data)
        )
        return Rebuilt(
            Request(kind, message, add_length(payload), card),
            tuple(notes),
            _mac_wrong(self.suite, frame[LENGTH_BYTES:], recorded_keys),
        )

    def remac(
        self,
        frame: bytes,
        *,
        recorded_keys: WorkingKeys | None = None,
        replace: Mapping[int, FieldValue] | None = None,
    ) -> tuple[bytes, bool]:
        """A recorded frame that is no request of the profile (the gateway answers it `12`
        after the MAC, reading nothing that needs keys), with `replace` applied and its MAC
        computed afresh under this terminal's MAK; and whether the recorded MAC was wrong
        under the recorded MAK. `CodecError` when it does not decode, `TerminalError` without
        keys."""
        recorded = decode_frame(frame)
        fields = dict(recorded.fields)
        fields.update(replace or {})
        fields.pop(64, None)
        keys = self._require_keys()
        message = Message(recorded.mti, fields, recorded.tpdu, recorded.header)
        payload = encode_message_with_mac(
            message, lambda data: crypto.mac(self.suite, keys.mak, data)
        )
        return add_length(payload), _mac_wrong(self.suite, frame[LENGTH_BYTES:], recorded_keys)

    def _carry_track(
        self,
        fields: dict[int, FieldValue],
        recorded_keys: WorkingKeys | None,
        notes: list[str],
    ) -> CardEntry | None:
        """Field 35 moved under this session's TDK; the card the request carries, when it
        can be read (keyed: 2 and 14; swiped: the track in clear)."""
        number, expiry, track = fields.get(2), fields.get(14), fields.get(35)
        if isinstance(number, str) and isinstance(expiry, str):
            return _card_entry(number, expiry, keyed=True)
        if not isinstance(track, str):
            return None
        security = fields.get(53)
        if isinstance(security, str) and security[2:3] == "1":
            recorded_tdk = recorded_keys.tdk if recorded_keys is not None else None
            if recorded_tdk is None:
                notes.append("track sent as recorded: the recorded session's TDK is unknown")
                return None
            track = crypto.decrypt_track(self.suite, recorded_tdk, track)
            tdk = self._require_keys().tdk
            if tdk is not None:
                fields[35] = crypto.encrypt_track(self.suite, tdk, track)
            else:
                fields[35] = track
                fields[53] = security[:2] + "0" + security[3:]
                notes.append("track sent in clear: this session has no TDK")
        try:
            parsed = Track2.parse(track)
        except CodecError:
            return None
        return _card_entry(parsed.card_number, parsed.expiry_yymm, keyed=False)

    def _carry_pin(
        self,
        fields: dict[int, FieldValue],
        card: CardEntry | None,
        recorded_keys: WorkingKeys | None,
        pins: Mapping[str, str],
        notes: list[str],
    ) -> None:
        """The PIN block (52, or 62 in an SM4 request) under this session's PIK, when what
        the config knows of the card's PIN allows it; see `rebuild`."""
        number = 52 if 52 in fields else 62 if 62 in fields else None
        if number is None:
            return
        block = fields[number]
        if recorded_keys is not None and block == corrupt_pin_block(self.suite, recorded_keys.pik):
            fields[number] = corrupt_pin_block(self.suite, self._require_keys().pik)
            notes.append("the recorded PIN block was a corrupted one: a corrupted one is sent")
            return
        pin = pins.get(card.number) if card is not None else None
        if card is None or pin is None or recorded_keys is None:
            notes.append(
                "PIN block sent as recorded (re-MAC'd): without the card's PIN it cannot be "
                "encrypted under the new PIK"
            )
            return
        if block != crypto.encrypt_pin(self.suite, recorded_keys.pik, pin, card.number):
            pin = _wrong_pin(pin)
            notes.append("the recorded PIN was not the card's: a PIN as wrong is sent instead")
        fields[number] = crypto.encrypt_pin(self.suite, self._require_keys().pik, pin, card.number)

    # --- answers -------------------------------------------------------------------------

    def read(self, request: Request, frame: bytes) -> Result:
        """Check an answer to `request` and type it, changing nothing.

        Raises `BadAnswerError` when the answer does not decode, does not belong to the
        request (MTI, TPDU, header, 11/41/42) or lacks a right MAC where §5.1 asks for one.
        """
        try:
            answer = decode_frame(frame)
        except CodecError as error:
            raise BadAnswerError(f"answer does not decode ({error})", REASON_OTHER) from None
        problem = _mismatch(request.message, answer)
        if problem is not None:
            raise BadAnswerError(problem, REASON_OTHER)
        code = answer.fields.get(39)
        if not isinstance(code, str) or len(code) != 2:
            raise BadAnswerError("answer has no response code (field 39)", REASON_OTHER)
        if code in APPROVALS and request.kind not in _UNMACED_ANSWERS:
            self._check_answer_mac(frame[LENGTH_BYTES:])
        try:
            return self._result(request, answer, code)
        except (CodecError, KeyError, TypeError, ValueError) as error:
            raise BadAnswerError(f"answer field is wrong ({error})", REASON_OTHER) from None

    def _check_answer_mac(self, payload: bytes) -> None:
        if not has_mac(payload):
            raise BadAnswerError("approved answer carries no MAC", REASON_BAD_MAC)
        if self.keys is None:
            raise BadAnswerError("no MAK to check the answer's MAC", REASON_BAD_MAC)
        if not crypto.verify_mac(
            self.suite, self.keys.mak, mac_input(payload), received_mac(payload)
        ):
            raise BadAnswerError("answer's MAC is wrong", REASON_BAD_MAC)

    def _result(self, request: Request, answer: Message, code: str) -> Result:
        kind = request.kind
        text = {n: v for n, v in answer.fields.items() if isinstance(v, str)}
        points = PointsInfo.parse(text[63]) if 63 in text else None
        keys = settlement = None
        if kind is Kind.SIGN_ON and code == APPROVED:
            keys = crypto.unwrap_working_keys(self.suite, self._tmk, answer.binary(62))
            if (keys.tdk is not None) != _asks_for_tdk(request):
                raise ValueError("field 62: a TDK came that was not asked for, or none that was")
        if kind is Kind.SETTLEMENT and code == APPROVED:
            settlement = SettlementTotals.parse(text[48])
            if settlement.result not in (RESULT_BALANCED, RESULT_UNBALANCED):
                raise ValueError("field 48: settlement result is neither 1 nor 2")
        return Result(
            kind=kind,
            mti=answer.mti,
            code=code,
            trace=text[11],
            sign_on_again=answer.header.processing == PROCESSING_SIGN_ON_AGAIN,
            batch=MessageData.parse(text[60]).batch if 60 in text else None,
            rrn=text.get(37),
            auth_code=text.get(38),
            amount_fen=int(text[4]) if 4 in text else None,
            local_date=text.get(13),
            business_date=text.get(15),
            points=points.points if points else None,
            balance_points=points.balance_points if points else None,
            discount_bp=points.discount_bp if points else None,
            cash_fen=points.cash_fen if points else None,
            balance_fen=Balance.parse(text[54]).amount_fen if 54 in text else None,
            settlement=settlement,
            keys=keys,
        )

    def receive(self, request: Request, frame: bytes) -> Result:
        """Read the answer to `request` and apply it to the terminal's state.

        A refused answer to a redemption or void leaves a pending reversal with the reason
        the refusal gives, then re-raises.
        """
        try:
            result = self.read(request, frame)
        except BadAnswerError as refused:
            if request.kind in _REVERSIBLE:
                self.give_up(request, refused.reversal_reason)
            raise
        self._apply(request, result)
        return result

    def no_answer(self, request: Request) -> None:
        """No answer came in time (or the link broke): a redemption or void is owed a
        reversal with reason `98`; other requests change nothing."""
        if request.kind in _REVERSIBLE:
            self.give_up(request, REASON_NO_ANSWER)

    def give_up(self, request: Request, reason: str | None = None) -> None:
        """Owe a reversal of a redemption or void (reason `98`, `96`, `A0` or `06`). Without
        a reason: the one its reversal carried before, if it was reversed (so that reversing
        it again repeats that 0400, §4.6), else `96`."""
        if request.kind not in _REVERSIBLE:
            raise TerminalError(
                f"a {request.kind.value} is never reversed (only redemptions and voids are)"
            )
        if reason is None:
            key = (request.batch, request.trace)
            reason = self._reversal_reasons.get(key, REASON_TERMINAL_FAILED)
        if reason not in REVERSAL_REASONS:
            raise ValueError(f"reversal reason must be one of {', '.join(REVERSAL_REASONS)}")
        pending = self.pending_reversal
        if pending is not None and same_transaction(pending.original, request):
            return  # already owed, with the reason first found
        self._require_no_reversal()
        self.pending_reversal = PendingReversal(request, reason)

    def _apply(self, request: Request, result: Result) -> None:
        if result.sign_on_again:
            self.signed_on = False
        kind = request.kind
        if kind is Kind.SIGN_ON and result.code == APPROVED:
            self.keys = result.keys
            self.asked_tdk = _asks_for_tdk(request)
            self.signed_on = True
            if result.batch is not None:
                self._batch = result.batch
        elif kind is Kind.SIGN_OFF and result.code == APPROVED:
            self.signed_on = False
        elif kind in (Kind.REDEMPTION, Kind.VOID, Kind.REFUND) and result.approved:
            self._book(request, result)
        elif kind is Kind.REVERSAL:
            self._reversal_answered(request, result)
        elif kind is Kind.SETTLEMENT and result.code == APPROVED:
            self._close_batch(request, result)

    def _find_entry(self, batch: str, trace: str) -> _BatchEntry | None:
        if batch != self._batch:
            return None
        return next((entry for entry in self._entries if entry.trace == trace), None)

    def _book(self, request: Request, result: Result) -> None:
        """Count an approved redemption (00 or 10, at the answered amount), void or refund
        (00 only) in the open batch."""
        kind = request.kind
        amount = result.amount_fen if result.amount_fen is not None else request.amount_fen
        if request.card is None or amount is None:
            raise RuntimeError(f"{kind.value} request without card or amount")
        if kind is not Kind.REDEMPTION and result.code != APPROVED:
            return
        entry = _BatchEntry(kind, request.trace, request.card.number, amount)
        if kind is not Kind.REDEMPTION:
            original = OriginalData.parse(request.message.text(61))
            target = self._find_entry(original.batch, original.trace)
            if target is not None and kind is Kind.VOID:
                target.voided = True
                entry.original_trace = target.trace
            elif target is not None:
                target.refunded = True
        self._entries.append(entry)

    def _reversal_answered(self, request: Request, result: Result) -> None:
        pending = self.pending_reversal
        if result.code in _STILL_OWED_CODES:
            return
        reason = request.message.fields.get(39)
        if isinstance(reason, str):
            self._reversal_reasons[(request.batch, request.trace)] = reason
        if pending is not None and same_transaction(pending.original, request):
            self.pending_reversal = None
        if result.code != APPROVED:
            return
        entry = self._find_entry(request.batch, request.trace)
        if entry is None or entry.voided or entry.refunded:
            return  # never counted, or the gateway leaves a voided or refunded one alone
        entry.reversed = True
        if entry.original_trace is not None:
            redemption = self._find_entry(self._batch, entry.original_trace)
            if redemption is not None:
                redemption.voided = False

    def _close_batch(self, request: Request, result: Result) -> None:
        """The 0510 closes the 0500's batch either way; the next one is batch + 1 (§4.7). A
        0500 sent again after its answer was lost and the terminal signed on meanwhile closes
        its own batch, not the one the sign-on moved the terminal to, which stays open."""
        closed = request.batch
        self.settled = SettledBatch(
            closed, self.totals(), self.upload_records(), bool(result.balanced)
        )
        if closed == self._batch:
            self._batch = next_batch(closed)
        self._entries = []


def _asks_for_tdk(sign_on: Request) -> bool:
    code = sign_on.message_data.management_code
    return code in (NMC_SIGN_ON_3DES_TDK, NMC_SIGN_ON_SM4_TDK)


def _card_entry(number: str, expiry: str, *, keyed: bool) -> CardEntry | None:
    """The card of a recorded request, or None when its number or expiry is malformed."""
    try:
        return CardEntry(number, expiry, keyed=keyed)
    except ValueError:
        return None


def _wrong_pin(pin: str) -> str:
    """A PIN of the same length that differs from `pin` in every digit."""
    return "".join(str((int(digit) + 1) % 10) for digit in pin)


def _mac_wrong(suite: Suite, payload: bytes, keys: WorkingKeys | None) -> bool:
    """Whether a recorded payload's MAC fails under the recorded MAK (False when unknown)."""
    if keys is None or not has_mac(payload):
        return False
    return not crypto.verify_mac(suite, keys.mak, mac_input(payload), received_mac(payload))


def same_transaction(left: Request, right: Request) -> bool:
    """Whether two requests are the same transaction: same batch and trace (§4.6)."""
    return left.batch == right.batch and left.trace == right.trace


def _mismatch(request: Message, answer: Message) -> str | None:
    """Why an answer does not belong to a request, or None."""
    expected_mti = f"{int(request.mti) + 10:04d}"
    if answer.mti != expected_mti:
        return f"answer MTI {answer.mti} is not {expected_mti}"
    if answer.tpdu != request.tpdu.swapped():
        return "answer TPDU does not swap the request's addresses"
    if answer.header.processing not in (PROCESSING_OK, PROCESSING_SIGN_ON_AGAIN):
        return "answer header's processing digit is neither 0 nor 3"
    if answer.header.for_response() != request.header.for_response():
        return "answer header does not echo the request's"
    for number in (11, 41, 42):
        if answer.fields.get(number) != request.fields.get(number):
            return f"answer field {number} does not echo the request's"
    return None

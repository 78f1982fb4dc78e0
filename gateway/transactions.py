"""What each kind of request does inside its ledger transaction (pos-8583.md §4).

Each handler gathers snapshots, asks the pure decision functions, applies the ledger change
through `gateway.ledger` and returns the answer; the caller commits, logs the request and only
then sends the answer. Declines are recorded as declined authorisations so that a later void or
refund naming them gets `25`.
"""

from __future__ import annotations

import functools
import itertools
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

import structlog
from sqlalchemy.orm import Session as OrmSession

from cardcodec.cards import card_number_problem, mask_card_number
from cardcodec.crypto import Suite
from cardcodec.errors import CodecError
from cardcodec.message import FieldValue, Message
from cardcodec.profile import FINANCIAL_MTIS, Kind
from cardcodec.subfields import (
    MSG_VOID,
    NMC_SIGN_ON_3DES_TDK,
    NMC_SIGN_ON_SM4_TDK,
    Balance,
    MessageData,
    OriginalData,
    PointsInfo,
    SettlementTotals,
    Totals,
    Track2,
    parse_upload,
    parse_upload_end,
)
from gateway import answers
from gateway.answers import Stamp
from gateway.config import Config, MerchantConfig, TerminalConfig
from gateway.decision import (
    Approval,
    CardSnapshot,
    PinEffect,
    PinEntry,
    amount_decline,
    card_decline,
    keyed_entry_decline,
    pin_decision,
    price,
    redemption_decision,
    refund_window_decline,
)
from gateway.ledger import Moment, next_rrn, records
from gateway.ledger import operations as ops
from gateway.ledger.hotpath import Lot, PlannedRedemption, hot_ledger, request_done
from gateway.ledger.models import (
    Authorisation,
    AuthorisationKind,
    AuthorisationState,
    RequestClass,
)
from gateway.ledger.models import Terminal as TerminalRow
from gateway.ledger.records import RequestIdentity
from gateway.points import Conversion
from gateway.responses import APPROVED, PARTIAL, Decline, response_code
from gateway.security import PinCheck, SecurityModule, SecurityModuleError
from gateway.sessions import Session, Sessions

log = structlog.get_logger("vipgate.gateway")

MAX_BATCH_ITEMS = 999
# Field 48's amounts are n12 (§4.7): a batch's debits, and its credits, add up to this at most.
# A request that would take them past it is refused (`61`, over a limit), as the 1,000th item
# is; settlement could not say the total, and the batch could never be settled.
MAX_BATCH_TOTAL_FEN = 10**12 - 1
TDK_SIGN_ONS = frozenset({NMC_SIGN_ON_3DES_TDK, NMC_SIGN_ON_SM4_TDK})
REVERSAL_MTI = "0400"
RECORDED_KINDS: dict[Kind | None, AuthorisationKind] = {
    Kind.BALANCE: AuthorisationKind.BALANCE,
    Kind.REDEMPTION: AuthorisationKind.REDEMPTION,
    Kind.VOID: AuthorisationKind.VOID,
    Kind.REFUND: AuthorisationKind.REFUND,
    Kind.REVERSAL: AuthorisationKind.REVERSAL,
}


@dataclass(frozen=True, init=False)
class Context:
    """A request that passed the first checks, with what they found. `kind` None: a
    combination the profile does not support, in a logged MTI: its answer is `12`, but its
    identity is looked up and recorded like any other's (§6: `94` comes first; §7, §8)."""

    message: Message
    kind: Kind | None
    data: MessageData
    terminal: TerminalConfig
    merchant: MerchantConfig
    session: Session | None
    track: Track2 | None
    moment: Moment

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(  # noqa: PLR0917 (the fields, in order, as the dataclass's own)
        self,
        message: Message,
        kind: Kind | None,
        data: MessageData,
        terminal: TerminalConfig,
        merchant: MerchantConfig,
        session: Session | None,
        track: Track2 | None,
        moment: Moment,
    ) -> None:
        object.__setattr__(self, "message", message)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "terminal", terminal)
        object.__setattr__(self, "merchant", merchant)
        object.__setattr__(self, "session", session)
        object.__setattr__(self, "track", track)
        object.__setattr__(self, "moment", moment)

    # Worked out once per request (a frozen dataclass keeps them in its own __dict__): the
    # decision and the writes ask for them several times.

    @functools.cached_property
    def swipe(self) -> ops.Swipe:
        return ops.Swipe(
            self.terminal.id, int(self.data.batch), self.trace, self.moment, self.merchant.id
        )

    @functools.cached_property
    def trace(self) -> int:
        return int(self.message.text(11))

    @functools.cached_property
    def amount_fen(self) -> int:
        return int(self.message.text(4))

    @functools.cached_property
    def identity(self) -> RequestIdentity:
        """The request's key in the request log (§7)."""
        request_class = (
            RequestClass.REVERSAL if self.message.mti == REVERSAL_MTI else RequestClass.REQUEST
        )
        return RequestIdentity(self.terminal.id, int(self.data.batch), self.trace, request_class)

    def presented_card(self) -> tuple[str, str]:
        """The card number and YYMM the terminal presented: track 2, or keyed 2 + 14."""
        return self._presented

    @functools.cached_property
    def _presented(self) -> tuple[str, str]:
        if self.track is not None:
            return self.track.card_number, self.track.expiry_yymm
        return self.message.text(2), self.message.text(14)


_PIN_ENTRIES = {
    None: PinEntry.NONE,
    PinCheck.BAD_BLOCK: PinEntry.INVALID_BLOCK,
    PinCheck.SOUND: PinEntry.ENTERED,
    PinCheck.MATCH: PinEntry.ENTERED,
    PinCheck.NO_MATCH: PinEntry.ENTERED,
}


class RedemptionReads(Protocol):
    """What a redemption's decision reads: `HotLedger` for one request, `GroupView` for a
    run of them."""

    def tombstone_exists(self, terminal_id: str, batch_number: int, trace: int) -> bool: ...

    def lock_card(self, number: str) -> tuple[CardSnapshot, int] | None: ...

    def open_batch(self, terminal_id: str) -> int: ...

    def batch_count(self, terminal_id: str, batch_number: int, kinds: Iterable[str]) -> int: ...

    def batch_debit_fen(self, terminal_id: str, batch_number: int) -> int | None: ...

    def points_redeemed_on(self, number: str, business_date: date) -> int: ...

    def spendable_lots(self, number: str, local: datetime) -> list[Lot]: ...


@dataclass(frozen=True, init=False)
class _Verdict:
    """An approved redemption before it is written: the card (number, account), the lots
    it takes from, and the approval."""

    card: tuple[str, int]
    lots: list[Lot]
    approval: Approval

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(self, card: tuple[str, int], lots: list[Lot], approval: Approval) -> None:
        object.__setattr__(self, "card", card)
        object.__setattr__(self, "lots", lots)
        object.__setattr__(self, "approval", approval)


class _OwnTransaction(Exception):  # noqa: N818 (a signal, not an error)
    """A request of a run that must go the one-request way."""


@dataclass(init=False)
class Outcome:
    """The answer, and what the caller does with it."""

    answer: Message
    card_number: str | None = None
    repeated: bool = False
    mac_session: Session | None = None  # the keys to MAC with when they end with this request
    after_commit: Callable[[], None] | None = None
    why: str | None = None  # a decline's reason, for the log (never a value)
    unrecorded: bool = False  # not logged (§7): its PIN block was not one (`_declined`)
    ends_session: bool = False  # its terminal's later requests of the group wait (`_declined`)

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(  # noqa: PLR0917 (the fields, in order, as the dataclass's own)
        self,
        answer: Message,
        card_number: str | None = None,
        repeated: bool = False,
        mac_session: Session | None = None,
        after_commit: Callable[[], None] | None = None,
        why: str | None = None,
        unrecorded: bool = False,
        ends_session: bool = False,
    ) -> None:
        self.answer = answer
        self.card_number = card_number
        self.repeated = repeated
        self.mac_session = mac_session
        self.after_commit = after_commit
        self.why = why
        self.unrecorded = unrecorded
        self.ends_session = ends_session


class Transactions:
    """The per-kind handlers, sharing the config, the sessions and the security module."""

    def __init__(
        self,
        config: Config,
        sessions: Sessions,
        security: SecurityModule,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._security = security
        self._random = random_bytes
        self._handlers: dict[Kind, Callable[[OrmSession, Context], Outcome]] = {
            Kind.SIGN_ON: self._sign_on,
            Kind.SIGN_OFF: self._sign_off,
            Kind.ECHO: self._echo,
            Kind.BALANCE: self._balance,
            Kind.REDEMPTION: self._redeem,
            Kind.VOID: self._void,
            Kind.REFUND: self._refund,
            Kind.REVERSAL: self._reverse,
            Kind.SETTLEMENT: self._settle,
            Kind.UPLOAD: self._upload,
            Kind.UPLOAD_END: self._upload_end,
        }

    def run(self, orm: OrmSession, context: Context) -> Outcome:
        if context.kind is None:
            return self._unsupported(orm, context)
        return self._handlers[context.kind](orm, context)

    def _unsupported(self, orm: OrmSession, context: Context) -> Outcome:
        """`12` for a combination the profile does not support; a financial answer carries
        an RRN as every financial answer does."""
        extra: dict[int, FieldValue] = {}
        if context.message.mti in FINANCIAL_MTIS:
            extra[37] = next_rrn(orm, context.moment.at)
        return Outcome(self._answer(context, response_code(Decline.NOT_SUPPORTED), extra))

    def prefetch(self, orm: OrmSession, context: Context, identity: RequestIdentity | None) -> None:
        """A redemption's reads, its request-log look-up included, sent ahead together (one
        round trip on PostgreSQL); other kinds read as they go."""
        if context.kind is Kind.REDEMPTION:
            number, _ = context.presented_card()
            hot_ledger(orm).prefetch_redemption(
                context.swipe,
                number,
                daily_limit=bool(self._config.plan.max_points_per_card_day),
                identity=identity,
            )

    @staticmethod
    def card_of(orm: OrmSession, context: Context) -> str | None:
        """The card a request will lock: the one it presents, or a reversal's original's
        (read under its terminal's lock, `HotLedger.lock_terminals`, so that an original
        committed by another process meanwhile is seen); None for the kinds that lock none."""
        if context.kind in CARD_KINDS:
            return context.presented_card()[0]
        if context.kind is Kind.REVERSAL:
            swipe = context.swipe
            return records.reversal_original_card(
                orm, swipe.terminal_id, swipe.batch_number, swipe.trace
            )
        return None

    @staticmethod
    def done(orm: OrmSession, context: Context) -> None:
        """Between two requests of a group (see `hotpath.request_done`)."""
        request_done(orm, terminals_changed=context.kind not in HOT_KINDS)

    # -- building answers --------------------------------------------------------------------

    def _stamp(self, context: Context) -> Stamp:
        moment = context.moment
        return Stamp(moment.local, moment.business_date, self._config.gateway.acquirer_institution)

    def _answer(
        self, context: Context, code: str, extra: dict[int, FieldValue], **flags: bool
    ) -> Message:
        return answers.answer(
            context.message, context.kind, code, self._stamp(context), extra, **flags
        )

    def _declined(
        self, orm: OrmSession, context: Context, decline: Decline, card: str | None = None
    ) -> Outcome:
        """A decline after the first checks: recorded (financial kinds) and answered.

        Not recorded when the request's PIN block is not a valid one (`_pin_block_unsound`),
        whatever the decline: the terminal did not make that block, so the request was
        altered on the way, its MAC made good by the block's free bytes (§5.1 XORs the
        blocks), and recording it would take its identity from the terminal's own request
        (`94`). On a card without a PIN that block is the decline (`A0`), and it also ends the
        terminal's session: every try at a block that happens to be valid then needs the
        terminal to sign on again, and a captured request under the new keys."""
        code = response_code(decline)
        extra: dict[int, FieldValue] = {}
        if decline is Decline.PIN_BLOCK_UNSOUND or self._pin_block_unsound(context):
            log.warning(
                "pin_block_unsound",
                terminal=context.terminal.id,
                card=None if card is None else mask_card_number(card),
                code=code,
            )
            extra[37] = next_rrn(orm, context.moment.at)
            if decline is not Decline.PIN_BLOCK_UNSOUND:
                answer = self._answer(context, code, extra)
                return Outcome(answer, card_number=card, why=decline.value, unrecorded=True)
            answer = self._answer(context, code, extra, sign_on_again=True)
            ended = self._sessions.sign_off(orm, context.terminal.id)
            return Outcome(
                answer,
                card_number=card,
                after_commit=ended,
                why=decline.value,
                unrecorded=True,
                ends_session=True,
            )
        recorded_kind = RECORDED_KINDS.get(context.kind)
        if recorded_kind is not None:
            requested = context.amount_fen if 4 in context.message.fields else None
            recorded = hot_ledger(orm).record_authorisation(
                context.swipe,
                recorded_kind,
                card_number=card,
                requested_amount_fen=requested,
                response_code=code,
            )
            extra[37] = recorded.rrn
        return Outcome(self._answer(context, code, extra), card_number=card, why=decline.value)

    def _approved_card_answer(
        self,
        context: Context,
        *,
        code: str,
        rrn: str,
        auth_code: str | None,
        info: PointsInfo,
        amount_fen: int | None = None,
    ) -> Message:
        extra: dict[int, FieldValue] = {
            37: rrn,
            54: Balance(2 * info.balance_points).format(),
            63: info.format(),
        }
        if auth_code is not None:
            extra[38] = auth_code
        if amount_fen is not None:
            extra[4] = f"{amount_fen:012d}"
        if 2 in context.message.fields:
            extra[2] = context.message.fields[2]
        return self._answer(context, code, extra)

    def _auth_code(self) -> str:
        return self._random(3).hex().upper()

    # -- management ------------------------------------------------------------------------

    def _sign_on(self, orm: OrmSession, context: Context) -> Outcome:
        """Fresh keys under the TMK the ledger keeps, and the session row in this transaction:
        the keys are durable exactly when the 0810 that carries them is. A TMK the security
        module cannot open is `96`, and the earlier keys stay."""
        terminal = context.terminal
        row = orm.get(TerminalRow, terminal.id)
        if row is None:
            raise LookupError(f"terminal {terminal.id} is not in the ledger")
        rrn = next_rrn(orm, context.moment.at)
        try:
            issued = self._security.issue_working_keys(
                terminal.id,
                terminal.suite,
                row.tmk_encrypted,
                with_tdk=context.data.management_code in TDK_SIGN_ONS,
            )
        except SecurityModuleError as error:  # names a file or a terminal, never a key
            log.error("sign_on_keys_failed", terminal=terminal.id, why=str(error))
            return Outcome(self._answer(context, response_code(Decline.SYSTEM), {37: rrn}))
        extra: dict[int, FieldValue] = {
            37: rrn,
            60: context.data.with_batch(f"{row.open_batch_number:06d}").format(),
            62: issued.field62,
        }
        answer = self._answer(context, APPROVED, extra)
        installed = self._sessions.sign_on(orm, terminal.id, issued, context.moment.at)
        return Outcome(answer, after_commit=installed)

    def _sign_off(self, orm: OrmSession, context: Context) -> Outcome:
        """The answer is MAC'd under the keys this transaction destroys."""
        answer = self._answer(context, APPROVED, {})
        forget = self._sessions.sign_off(orm, context.terminal.id)
        return Outcome(answer, mac_session=context.session, after_commit=forget)

    def _echo(self, orm: OrmSession, context: Context) -> Outcome:
        signed_on = context.session is not None
        return Outcome(self._answer(context, APPROVED, {}, sign_on_again=not signed_on))

    # -- the card: snapshot and PIN -----------------------------------------------------------

    def _card(self, orm: OrmSession, number: str) -> tuple[CardSnapshot | None, int]:
        """The card's snapshot, locked, and its journal account id (0 when unknown)."""
        found = hot_ledger(orm).lock_card(number)
        return found if found is not None else (None, 0)

    def _pin(self, context: Context, card: CardSnapshot) -> PinCheck | None:
        """What the PIN block says; for a card without a PIN, only whether it is a valid
        block (`pin_decision`); None when none was sent."""
        session, block = _pin_block(context)
        if session is None:
            return None
        return self._security.check_pin(session.keys, block, card.number, card.pin_hmac)

    def _pin_block_unsound(self, context: Context) -> bool:
        """Whether the request carries a PIN block that is not a valid one for the card it
        presents, under the session's PIK."""
        session, block = _pin_block(context)
        if session is None:
            return False
        number, _ = context.presented_card()
        try:
            checked = self._security.check_pin(session.keys, block, number, None)
        except (SecurityModuleError, CodecError):  # no PIK, or no card number to XOR with
            return False
        return checked is PinCheck.BAD_BLOCK

    def _pin_verdict(
        self, context: Context, card: CardSnapshot
    ) -> tuple[Decline | None, PinEffect]:
        try:
            checked = self._pin(context, card)
        except SecurityModuleError:  # the PIN key cannot be had: `96`, no try counted
            log.error("pin_check_failed", terminal=context.terminal.id)
            return Decline.SYSTEM, PinEffect.NONE
        return pin_decision(card, _PIN_ENTRIES[checked], lambda: checked is PinCheck.MATCH)

    def _pin_check(self, orm: OrmSession, context: Context, card: CardSnapshot) -> Decline | None:
        """The PIN's decision, its effect on the card's tries recorded through the ORM (the
        next `hot_ledger(orm)`, before any driver-level read of the card, flushes it)."""
        decline, effect = self._pin_verdict(context, card)
        if effect is PinEffect.WRONG:
            state = ops.record_wrong_pin(orm, card.number)
            if state.locked:
                log.warning(
                    "pin_locked",
                    terminal=context.terminal.id,
                    card=mask_card_number(card.number),
                    wrong_tries=state.wrong_pin_count,
                )
        elif effect is PinEffect.RIGHT and card.wrong_pin_count:
            ops.reset_pin_tries(orm, card.number)
        return decline

    def _pin_check_in_run(self, context: Context, card: CardSnapshot) -> Decline | None:
        """The PIN's decision for a request of a run, which records nothing: a PIN whose
        effect changes the card sends the request the one-request way."""
        decline, effect = self._pin_verdict(context, card)
        if effect is PinEffect.WRONG or (effect is PinEffect.RIGHT and card.wrong_pin_count):
            raise _OwnTransaction
        return decline

    def _card_checks(
        self, context: Context, card: CardSnapshot | None, *, needs_enrolment: bool
    ) -> Decline | None:
        number, expiry = context.presented_card()
        keyed = keyed_entry_decline(2 in context.message.fields, _pin_sent(context), card)
        return keyed or card_decline(
            card,
            presented_number=number,
            presented_expiry=expiry,
            prefixes=self._config.issuer.card_prefixes,
            local=context.moment.local,
            needs_enrolment=needs_enrolment,
        )

    # -- balance and redemption --------------------------------------------------------------

    def _balance(self, orm: OrmSession, context: Context) -> Outcome:
        number, _ = context.presented_card()
        card, _ = self._card(orm, number)
        decline = self._card_checks(context, card, needs_enrolment=False)
        if decline is None and int(context.data.batch) != _open_batch(orm, context.terminal.id):
            decline = Decline.NOT_ALLOWED  # §4.7, before the PIN: a wrong one is not counted
        if decline is None and card is not None:
            decline = self._pin_check(orm, context, card)
        if decline is not None or card is None:
            return self._declined(orm, context, decline or Decline.CARD_UNKNOWN, number)
        hot = hot_ledger(orm)
        lots = hot.spendable_lots(number, context.moment.local)
        spendable = sum(lot.remaining_points for lot in lots)
        recorded = hot.record_authorisation(
            context.swipe,
            AuthorisationKind.BALANCE,
            card_number=number,
            requested_amount_fen=None,
            response_code=APPROVED,
        )
        info = PointsInfo(0, spendable, 0, 0)
        answer = self._approved_card_answer(
            context, code=APPROVED, rrn=recorded.rrn, auth_code=None, info=info
        )
        return Outcome(answer, card_number=number)

    def _redeem(self, orm: OrmSession, context: Context) -> Outcome:
        number, _ = context.presented_card()
        verdict = self._redemption_verdict(
            context, hot_ledger(orm), lambda card: self._pin_check(orm, context, card)
        )
        if isinstance(verdict, Decline):
            return self._declined(orm, context, verdict, number)
        return self._apply_redemption(orm, context, verdict)

    def _redemption_verdict(
        self,
        context: Context,
        reads: RedemptionReads,
        pin_check: Callable[[CardSnapshot], Decline | None],
    ) -> _Verdict | Decline:
        """Everything a redemption decides before it writes, on `reads` (the unit of work's
        `HotLedger`, or a run's `GroupView`)."""
        swipe = context.swipe
        number, _ = context.presented_card()
        if reads.tombstone_exists(swipe.terminal_id, swipe.batch_number, swipe.trace):
            return Decline.DUPLICATE
        found = reads.lock_card(number)
        card, account_id = found if found is not None else (None, 0)
        decline = self._card_checks(context, card, needs_enrolment=True)
        if decline is not None or card is None:
            return decline or Decline.CARD_UNKNOWN
        lots: list[Lot] = []
        result = self._redemption_decision(context, card, lots, reads, pin_check)
        if isinstance(result, Decline):
            return result
        return _Verdict((number, account_id), lots, result)

    def _redemption_decision(
        self,
        context: Context,
        card: CardSnapshot,
        lots: list[Lot],
        reads: RedemptionReads,
        pin_check: Callable[[CardSnapshot], Decline | None],
    ) -> Approval | Decline:
        """The decision of §5 on the card's snapshot; `lots` receives the spendable lots
        read (and locked) for it, which the redemption then takes from."""
        if int(context.data.batch) != reads.open_batch(context.terminal.id):
            return Decline.NOT_ALLOWED
        amount = context.amount_fen
        moment = context.moment
        priced = None
        if amount > 0:
            priced = price(
                context.merchant,
                tier=card.tier,
                local=moment.local,
                business_date=moment.business_date,
                amount_fen=amount,
            )
        decline = amount_decline(amount, priced) or pin_check(card)
        if decline is not None or priced is None:
            return decline or Decline.BAD_AMOUNT
        batch = int(context.data.batch)
        count = reads.batch_count(context.terminal.id, batch, DEBIT_VALUES)
        if count >= MAX_BATCH_ITEMS:
            return Decline.OVER_LIMIT
        if (count + 1) * context.merchant.max_amount_fen > MAX_BATCH_TOTAL_FEN:
            # Only a merchant whose maximum is over a billion fen can get there: read the sum.
            taken = reads.batch_debit_fen(context.terminal.id, batch)
            if taken is None:
                raise _OwnTransaction
            if taken + amount > MAX_BATCH_TOTAL_FEN:
                return Decline.OVER_LIMIT
        redeemed_today = 0
        if self._config.plan.max_points_per_card_day:  # the query only when there is a limit
            redeemed_today = reads.points_redeemed_on(card.number, moment.business_date)
        lots.extend(reads.spendable_lots(card.number, moment.local))
        return redemption_decision(
            priced,
            merchant=context.merchant,
            plan=self._config.plan,
            spendable_points=sum(lot.remaining_points for lot in lots),
            redeemed_today_points=redeemed_today,
            partial_supported=bool(context.data.partial_supported),
        )

    def _apply_redemption(self, orm: OrmSession, context: Context, verdict: _Verdict) -> Outcome:
        number = verdict.card[0]
        approval = verdict.approval
        code = PARTIAL if approval.partial else APPROVED
        auth_code = self._auth_code()
        redeemed = hot_ledger(orm).redeem(
            context.swipe,
            verdict.card,
            verdict.lots,
            approval.conversion,
            requested_amount_fen=context.amount_fen,
            rule_id=approval.rule.id if approval.rule else None,
            fee_bp=context.merchant.fee_bp,
            auth_code=auth_code,
            response_code=code,
        )
        if isinstance(redeemed, ops.Declined):
            return self._declined(orm, context, Decline.NOT_ENOUGH_POINTS, number)
        answer = self._redeemed_answer(
            context,
            code,
            rrn=redeemed.rrn,
            auth_code=auth_code,
            conversion=approval.conversion,
            spendable_after=redeemed.spendable_points_after,
        )
        return Outcome(answer, card_number=number)

    def _redeemed_answer(
        self,
        context: Context,
        code: str,
        *,
        rrn: str,
        auth_code: str,
        conversion: Conversion,
        spendable_after: int,
    ) -> Message:
        info = PointsInfo(
            conversion.points, spendable_after, conversion.discount_bp, conversion.settled_fen
        )
        return self._approved_card_answer(
            context,
            code=code,
            rrn=rrn,
            auth_code=auth_code,
            info=info,
            amount_fen=conversion.amount_fen,
        )

    def redeem_run(
        self, orm: OrmSession, run: Sequence[tuple[Context, RequestIdentity]]
    ) -> list[Outcome]:
        """A run of redemptions (group commit's common case) with one read and one write per
        table: the outcomes of as many of its first requests as are approved, in order, each
        what the one-request path gives it. The first request not answered (a decline, a
        repeat, a PIN try to record, another business date) and those after it are the
        caller's to run one by one, after the run's request log (`HotLedger.log_requests`)."""
        day = run[0][0].moment.business_date
        run = list(itertools.takewhile(lambda item: item[0].moment.business_date == day, run))
        hot = hot_ledger(orm)
        view = hot.read_group(
            [(context.swipe, context.presented_card()[0], identity) for context, identity in run],
            daily_limit=bool(self._config.plan.max_points_per_card_day),
            business_date=day,
        )
        planned: list[tuple[Context, PlannedRedemption, Conversion]] = []
        for context, identity in run:
            if view.identity_taken(identity):
                break
            try:
                verdict = self._redemption_verdict(
                    context, view, functools.partial(self._pin_check_in_run, context)
                )
            except _OwnTransaction:
                break
            if isinstance(verdict, Decline):
                break
            approval = verdict.approval
            plan = view.plan(
                context.swipe,
                verdict.card,
                verdict.lots,
                approval.conversion,
                requested_amount_fen=context.amount_fen,
                rule_id=approval.rule.id if approval.rule else None,
                fee_bp=context.merchant.fee_bp,
                auth_code=self._auth_code,
                response_code=PARTIAL if approval.partial else APPROVED,
            )
            if isinstance(plan, ops.Declined):
                break
            view.claim(identity)
            planned.append((context, plan, approval.conversion))
        rrns = hot.write_group([plan for _, plan, _ in planned])
        outcomes = []
        for (context, plan, conversion), rrn in zip(planned, rrns, strict=True):
            answer = self._redeemed_answer(
                context,
                plan.response_code,
                rrn=rrn,
                auth_code=plan.auth_code,
                conversion=conversion,
                spendable_after=plan.spendable_points_after,
            )
            outcomes.append(Outcome(answer, card_number=plan.card[0]))
        return outcomes

    # -- void and refund -----------------------------------------------------------------------

    def _original(
        self, orm: OrmSession, context: Context, number: str, *, refund: bool
    ) -> Authorisation | Decline:
        """The redemption a void or refund names by RRN; 61 and the card must agree, and a
        refund's original must be the same merchant's (`25`). A void's original of another
        terminal is found here and refused by the void's own rules (`22`)."""
        original = records.find_by_rrn(orm, context.message.text(37))
        if (
            original is None
            or original.kind is not AuthorisationKind.REDEMPTION
            or original.state is AuthorisationState.DECLINED
            or original.card_number != number
            or (refund and original.merchant_id != context.merchant.id)
        ):
            return Decline.ORIGINAL_NOT_FOUND
        data = OriginalData.parse(context.message.text(61))
        expected = OriginalData(
            f"{original.batch_number:06d}",
            f"{original.trace:06d}",
            _local_mmdd(original, self._config) if refund else None,
        )
        if data != expected:
            return Decline.ORIGINAL_NOT_FOUND
        return original

    def _credit_checks(self, orm: OrmSession, context: Context) -> Decline | None:
        number, expiry = context.presented_card()
        card = ops.find_card(orm, number)
        prefixes = self._config.issuer.card_prefixes
        if card is None or card.expiry_yymm != expiry:
            return Decline.CARD_UNKNOWN
        if card_number_problem(number, prefixes) is not None:
            return Decline.CARD_UNKNOWN
        return None

    def _credited_original(
        self, orm: OrmSession, context: Context, *, refund: bool
    ) -> Authorisation | Decline:
        """The original a void or refund names, once every check of §4.5 passed."""
        number, _ = context.presented_card()
        decline = self._credit_checks(orm, context)
        if decline is not None:
            return decline
        original = self._original(orm, context, number, refund=refund)
        if isinstance(original, Decline):
            return original
        rules = self._refund_rules if refund else self._void_rules
        return rules(orm, context, original) or original

    def _void(self, orm: OrmSession, context: Context) -> Outcome:
        swipe = context.swipe
        number, _ = context.presented_card()
        if records.find_tombstone(orm, swipe.terminal_id, swipe.batch_number, swipe.trace):
            return self._declined(orm, context, Decline.DUPLICATE, number)
        original = self._credited_original(orm, context, refund=False)
        if isinstance(original, Decline):
            return self._declined(orm, context, original, number)
        auth_code = self._auth_code()
        restored = ops.void(orm, swipe, original.id, auth_code=auth_code)
        if isinstance(restored, ops.Declined):
            return self._declined(orm, context, Decline.NOT_ALLOWED, number)
        info = PointsInfo(
            restored.points, restored.spendable_points_after, original.discount_bp,
            original.settled_fen,
        )  # fmt: skip
        return self._credited(context, number, restored.rrn, auth_code, info)

    def _credited(
        self, context: Context, number: str, rrn: str, auth_code: str, info: PointsInfo
    ) -> Outcome:
        """The approved answer of a void or refund: 63 gives the points returned and the fen
        clawed back (§4.5)."""
        answer = self._approved_card_answer(
            context, code=APPROVED, rrn=rrn, auth_code=auth_code, info=info
        )
        return Outcome(answer, card_number=number)

    def _void_rules(
        self, orm: OrmSession, context: Context, original: Authorisation
    ) -> Decline | None:
        open_batch = _open_batch(orm, context.terminal.id)
        if (
            original.terminal_id != context.terminal.id
            or original.batch_number != open_batch
            or int(context.data.batch) != open_batch
            or original.state is not AuthorisationState.APPROVED
            or original.refunded_fen > 0
        ):
            return Decline.NOT_ALLOWED
        if context.amount_fen != original.amount_fen:
            return Decline.AMOUNT_DIFFERS
        return self._credit_limit(orm, context)

    def _credit_limit(self, orm: OrmSession, context: Context) -> Decline | None:
        hot, batch = hot_ledger(orm), int(context.data.batch)
        count = hot.batch_count(context.terminal.id, batch, CREDIT_VALUES)
        if count >= MAX_BATCH_ITEMS:
            return Decline.OVER_LIMIT
        if (count + 1) * context.merchant.max_amount_fen > MAX_BATCH_TOTAL_FEN:
            taken = hot.batch_credit_fen(context.terminal.id, batch)
            if taken + context.amount_fen > MAX_BATCH_TOTAL_FEN:
                return Decline.OVER_LIMIT
        return None

    def _refund(self, orm: OrmSession, context: Context) -> Outcome:
        number, _ = context.presented_card()
        original = self._credited_original(orm, context, refund=True)
        if isinstance(original, Decline):
            return self._declined(orm, context, original, number)
        auth_code = self._auth_code()
        refunded = ops.refund(
            orm, context.swipe, original.id, context.amount_fen, auth_code=auth_code
        )
        if isinstance(refunded, ops.Declined):
            # Checked again under the original's lock: a void or refund may have come first.
            decline = _REFUND_DECLINES.get(refunded.reason, Decline.NOT_ALLOWED)
            return self._declined(orm, context, decline, number)
        info = PointsInfo(
            refunded.points, refunded.spendable_points_after, original.discount_bp,
            refunded.fen_clawed,
        )  # fmt: skip
        return self._credited(context, number, refunded.rrn, auth_code, info)

    def _refund_rules(
        self, orm: OrmSession, context: Context, original: Authorisation
    ) -> Decline | None:
        if original.state is not AuthorisationState.APPROVED:
            return Decline.NOT_ALLOWED
        if int(context.data.batch) != _open_batch(orm, context.terminal.id):
            return Decline.NOT_ALLOWED
        window = refund_window_decline(
            original.business_date,
            context.moment.business_date,
            context.merchant.refund_window_days,
        )
        if window is not None:
            return window
        amount = context.amount_fen
        if amount <= 0 or amount > original.amount_fen - original.refunded_fen:
            return Decline.BAD_AMOUNT
        return self._credit_limit(orm, context)

    # -- reversal --------------------------------------------------------------------------------

    def _reverse(self, orm: OrmSession, context: Context) -> Outcome:
        swipe = context.swipe
        if swipe.batch_number != _open_batch(orm, context.terminal.id):
            recorded = records.record_authorisation(
                orm,
                swipe,
                AuthorisationKind.REVERSAL,
                card_number=None,
                requested_amount_fen=context.amount_fen,
                response_code=APPROVED,
                exception="reversal_closed_batch",
            )
            return Outcome(self._answer(context, APPROVED, {37: recorded.rrn}))
        wanted = (
            AuthorisationKind.VOID
            if context.data.message_type == MSG_VOID
            else AuthorisationKind.REDEMPTION
        )
        original = records.find_reversal_original(
            orm, swipe.terminal_id, swipe.batch_number, swipe.trace
        )
        if original is None or original.kind is not wanted:
            records.remember_reversal(orm, swipe, context.amount_fen)
            recorded = records.record_authorisation(
                orm,
                swipe,
                AuthorisationKind.REVERSAL,
                card_number=None,
                requested_amount_fen=context.amount_fen,
                response_code=APPROVED,
            )
            return Outcome(self._answer(context, APPROVED, {37: recorded.rrn}))
        requested = original.requested_amount_fen
        if context.amount_fen != (requested if requested is not None else original.amount_fen):
            return self._declined(orm, context, Decline.AMOUNT_DIFFERS, original.card_number)
        reversed_ = ops.reverse(orm, swipe, original.id)
        answer = self._answer(context, APPROVED, {37: reversed_.rrn})
        return Outcome(answer, card_number=original.card_number)

    # -- settlement and batch upload ---------------------------------------------------------------

    def _settle(self, orm: OrmSession, context: Context) -> Outcome:
        terminal_id = context.terminal.id
        batch = int(context.data.batch)
        open_batch = _open_batch(orm, terminal_id)
        if batch != open_batch:
            previous = records.latest_batch(orm, terminal_id, batch)
            just_closed = batch == _previous_batch(open_batch)
            if just_closed and previous is not None and previous.answer is not None:
                stored = previous.answer.get("48", "")
                return Outcome(self._answer(context, APPROVED, {48: stored}))
            return Outcome(
                self._answer(context, response_code(Decline.NOT_ALLOWED), {}),
                why="not the open batch",
            )
        sent = SettlementTotals.parse(context.message.text(48)).totals
        theirs = records.BatchTotals(
            sent.debit_fen, sent.debit_count, sent.credit_fen, sent.credit_count
        )
        ours = records.gateway_totals(orm, terminal_id, batch)
        result = 1 if ours == theirs else 2
        totals = Totals(ours.debit_fen, ours.debit_count, ours.credit_fen, ours.credit_count)
        field48 = SettlementTotals(totals, result).format()
        answer = self._answer(context, APPROVED, {48: field48})
        records.close_batch(orm, terminal_id, theirs, {"48": field48}, context.moment.at)
        # `00` either way (§4.7): the log says which.
        return Outcome(answer, why="balanced" if result == 1 else "not balanced")

    def _settled_batch(self, orm: OrmSession, context: Context) -> int | None:
        """The batch a 0320 uploads to: the one just settled (§4.7), else None (`22`)."""
        terminal_id, number = context.terminal.id, int(context.data.batch)
        if number != _previous_batch(_open_batch(orm, terminal_id)):
            return None
        batch = records.latest_batch(orm, terminal_id, number)
        if batch is None or batch.closed_at is None:
            return None
        return batch.id

    def _upload(self, orm: OrmSession, context: Context) -> Outcome:
        batch_id = self._settled_batch(orm, context)
        if batch_id is None:
            return Outcome(
                self._answer(context, response_code(Decline.NOT_ALLOWED), {}),
                why="not the batch just settled",
            )
        lines = [
            records.UploadLine(int(record.trace), record.card_number, record.amount_fen)
            for record in parse_upload(context.message.text(48))
        ]
        records.record_upload(orm, batch_id, lines, context.moment.at)
        return Outcome(self._answer(context, APPROVED, {}))

    def _upload_end(self, orm: OrmSession, context: Context) -> Outcome:
        batch_id = self._settled_batch(orm, context)
        if batch_id is None:
            return Outcome(
                self._answer(context, response_code(Decline.NOT_ALLOWED), {}),
                why="not the batch just settled",
            )
        total = parse_upload_end(context.message.text(48))
        records.end_upload(orm, batch_id, total, context.moment.at)
        return Outcome(self._answer(context, APPROVED, {}))


# The ledger's own refusals of a refund, as the answer gives them (§6).
_REFUND_DECLINES = {
    ops.Decline.ORIGINAL_NOT_ALLOWED: Decline.NOT_ALLOWED,  # voided or reversed meanwhile
    ops.Decline.OVER_WHAT_IS_LEFT: Decline.BAD_AMOUNT,
}
HOT_KINDS = frozenset({Kind.REDEMPTION, Kind.BALANCE})
CARD_KINDS = frozenset({Kind.REDEMPTION, Kind.BALANCE, Kind.VOID, Kind.REFUND})
DEBIT_VALUES = (AuthorisationKind.REDEMPTION.value,)
CREDIT_VALUES = (AuthorisationKind.VOID.value, AuthorisationKind.REFUND.value)


def _pin_sent(context: Context) -> PinEntry:
    return PinEntry.ENTERED if 26 in context.message.fields else PinEntry.NONE


def _pin_block(context: Context) -> tuple[Session | None, bytes]:
    """The session and the PIN block a request carries (52, or 62 under SM4); no session
    when it carries none (or its terminal is not signed on)."""
    session = context.session
    if 26 not in context.message.fields or session is None:
        return None, b""
    return session, context.message.binary(52 if session.suite is Suite.TDES else 62)


def _open_batch(orm: OrmSession, terminal_id: str) -> int:
    terminal = orm.get(TerminalRow, terminal_id)
    if terminal is None:
        raise LookupError(f"terminal {terminal_id} is not in the ledger")
    return terminal.open_batch_number


def _previous_batch(batch: int) -> int:
    return 999999 if batch == 1 else batch - 1


def _local_mmdd(original: Authorisation, config: Config) -> str:
    return original.local_time.astimezone(config.gateway.timezone).strftime("%m%d")

"""One request in, one answer out: the gateway's synchronous core.

`Gateway.handle` takes a payload as the Twisted protocol received it and returns the answer's
payload (or None: close the link). It runs the checks that need no database in the order of
§6 (format, terminal, merchant, enabled, key suite, MAC), then does everything else in one
ledger transaction: the idempotency look-up (§7), the kind's own decision and its ledger
change, the request log; the answer leaves only after that commit. A ledger failure answers
`96` with nothing changed. It is called on a worker thread, one request at a time.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session as OrmSession

from cardcodec.cards import mask_card_number
from cardcodec.crypto import Suite
from cardcodec.errors import CodecError
from cardcodec.frame import ENVELOPE_BYTES, LENGTH_BYTES
from cardcodec.message import (
    FieldValue,
    Message,
    decode_message,
    encode_message,
    encode_message_with_mac,
    has_mac,
    mac_input,
    received_mac,
)
from cardcodec.profile import FINANCIAL_MTIS, RECORDED_MTIS, REQUEST_MTIS, Kind, classify
from cardcodec.subfields import (
    NMC_SIGN_ON_3DES_TDK,
    NMC_SIGN_ON_SM4,
    NMC_SIGN_ON_SM4_TDK,
    MessageData,
    Track2,
)
from gateway import answers
from gateway.answers import Stamp
from gateway.checks import format_problem, suite_problem
from gateway.clock import Clock, business_date
from gateway.config import Config, MerchantConfig, TerminalConfig
from gateway.follow import Switches
from gateway.ledger import Moment, next_rrn, unit_of_work
from gateway.ledger.db import (
    CommitOutcomeUnknownError,
    holding_connection,
    ledger_busy,
    link_lost,
    settle_log_syncs,
)
from gateway.ledger.hotpath import RunReads, hot_ledger
from gateway.ledger.journal import RRN_DIGITS
from gateway.ledger.records import RequestIdentity
from gateway.responses import Decline, response_code
from gateway.security import SecurityModule
from gateway.sessions import UNAVAILABLE, Session, Sessions, SessionView
from gateway.transactions import Context, Outcome, Transactions

log = structlog.get_logger("vipgate.gateway")

LOGGED_MTIS = RECORDED_MTIS  # §7, the profile's
SIGN_ON_MTI = "0800"
SM4_SIGN_ONS = frozenset({NMC_SIGN_ON_SM4, NMC_SIGN_ON_SM4_TDK})
TDK_SIGN_ONS = frozenset({NMC_SIGN_ON_3DES_TDK, NMC_SIGN_ON_SM4_TDK})
ANSWER_MTIS_WITH_RRN = FINANCIAL_MTIS | {"0800"}
MIN_RUN = 2  # a shorter run of redemptions goes the one-request way
NO_TRACE = "000000"


@dataclass(init=False)
class Reply:
    """What goes back: the answer payload (None closes the link) and what the log line says."""

    payload: bytes | None
    event: dict[str, Any] = field(default_factory=dict)

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(self, payload: bytes | None, event: dict[str, Any] | None = None) -> None:
        self.payload = payload
        self.event = {} if event is None else event


@dataclass(frozen=True, init=False)
class Sealing:
    """A decided answer not encoded yet: `mac` computes field 64 (None: an answer without
    one). Encoding needs neither the ledger nor the group, so it can run on another thread."""

    answer: Message
    event: dict[str, Any]
    mac: Callable[[bytes], bytes] | None

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(
        self,
        answer: Message,
        event: dict[str, Any],
        mac: Callable[[bytes], bytes] | None,
    ) -> None:
        object.__setattr__(self, "answer", answer)
        object.__setattr__(self, "event", event)
        object.__setattr__(self, "mac", mac)

    def reply(self) -> Reply:
        if self.mac is None:
            return Reply(encode_message(self.answer), self.event)
        return Reply(encode_message_with_mac(self.answer, self.mac), self.event)


Answer = Reply | Sealing

# The answer to a request that met a bug rather than a decline: its link closes, and the
# other requests of its group are answered all the same.
FAILED = Reply(None, {"event": "closed", "reason": "internal error"})


@dataclass(frozen=True)
class PreparedGroup:
    """A group after `Gateway.prepare_group`: the answers already known (None where the
    ledger decides) and the requests for the ledger transaction, by position; then the
    requests that wait for this group's commit (`rest`, see `_session_cut`)."""

    replies: list[Answer | None]
    pending: list[_Pending]
    rest: Sequence[bytes] = ()


def finish(answer: Answer) -> Reply:
    """The reply to send: a `Sealing` encoded (and MAC'd), a `Reply` as it is."""
    return answer.reply() if isinstance(answer, Sealing) else answer


class DeclinedEarly(Exception):  # noqa: N818 (a decline, not a program error)
    """A request answered before the ledger transaction (a decline of §6's first checks)."""

    def __init__(
        self, decline: Decline, *, sign_on_again: bool = False, why: str | None = None
    ) -> None:
        super().__init__(decline.value)
        self.decline = decline
        self.sign_on_again = sign_on_again
        # What the log says of it, where the code alone does not tell (`A0`: not signed on,
        # no MAC or a MAC that does not verify; `30`: which field): never a field's value.
        self.why = why


@dataclass(init=False)
class Request:
    """A decoded request and what the first checks learnt about it."""

    message: Message
    payload: bytes
    kind: Kind | None
    data: MessageData | None
    terminal: TerminalConfig | None = None
    merchant: MerchantConfig | None = None
    session: Session | None = None
    track: Track2 | None = None
    sessions: SessionView = UNAVAILABLE  # the group's sessions, read when the group began

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(  # noqa: PLR0917 (the fields, in order, as the dataclass's own)
        self,
        message: Message,
        payload: bytes,
        kind: Kind | None,
        data: MessageData | None,
        terminal: TerminalConfig | None = None,
        merchant: MerchantConfig | None = None,
        session: Session | None = None,
        track: Track2 | None = None,
        sessions: SessionView = UNAVAILABLE,
    ) -> None:
        self.message = message
        self.payload = payload
        self.kind = kind
        self.data = data
        self.terminal = terminal
        self.merchant = merchant
        self.session = session
        self.track = track
        self.sessions = sessions

    @functools.cached_property
    def digest(self) -> bytes:
        """The request as compared for repeats (`_digest`)."""
        return _digest(self.payload)


# A request for the ledger transaction: its place in the group, the request, its context.
_Pending = tuple[int, Request, Context]


class Gateway:
    """The synchronous core: wired once with the real things, then fed payloads."""

    def __init__(
        self,
        *,
        config: Config,
        engine: Engine,
        clock: Clock,
        security: SecurityModule,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._config = config
        self._engine = engine
        self._clock = clock
        self._security = security
        self._sessions = Sessions(engine, clock, config.gateway.key_lifetime, security)
        self._switches = Switches(
            engine,
            clock,
            {t.id: t for t in config.terminals},
            {m.id: m for m in config.merchants},
        )
        self._terminals: dict[str, TerminalConfig] = {}
        self._merchants: dict[str, MerchantConfig] = {}
        self._silence_met = False  # a transaction's link was lost by a timeout (`_silent`)
        self._transactions = Transactions(config, self._sessions, security, random_bytes)

    # -- entry ---------------------------------------------------------------------------

    def handle(self, payload: bytes) -> Reply:
        """Answer one request (a group of one)."""
        return self.handle_group([payload])[0]

    def handle_group(self, payloads: Sequence[bytes]) -> list[Reply]:
        """Answer several requests with one ledger commit (group commit); see `decide_group`."""
        return [finish(answer) for answer in self.decide_group(payloads)]

    def decide_group(self, payloads: Sequence[bytes]) -> list[Answer]:
        """Decide several requests with one ledger commit (group commit): `prepare_group`,
        then `decide_prepared`.

        Requests that need the ledger run one after the other in one transaction; every answer
        is built only after that commit. If anything in the group fails, the group is rolled
        back and each request runs again in a transaction of its own, so one request's failure
        never costs another its answer.

        An answer is a `Reply`, or a `Sealing`: a decided answer whose encoding (and MAC)
        needs no ledger, which the server finishes (`finish`) on the reactor thread while the
        ledger thread goes on to the next group.
        """
        return self.decide_prepared(self.prepare_group(payloads))

    def holding_connection(self) -> AbstractContextManager[None]:
        """For the thread that decides every group: its units of work share one connection
        (`db.holding_connection`)."""
        return holding_connection(self._engine)

    def prepare_group(self, payloads: Sequence[bytes]) -> PreparedGroup:
        """Everything before the ledger transaction: decoding, the group's one read of the
        sessions (no write lock), the clock, and the checks of §6 that need no ledger (MAC
        included). The server runs it for one group while the previous group commits."""
        decoded = [_decode(payload) for payload in payloads]
        cut = _session_cut(decoded)
        payloads, rest, decoded = payloads[:cut], payloads[cut:], decoded[:cut]
        replies: list[Answer | None] = [None] * len(payloads)
        pending: list[_Pending] = []
        sessions = self._sessions.view(_terminal_ids(decoded))
        # A terminal's `enabled` and a merchant's `active` as the ledger says (`Switches`).
        self._terminals, self._merchants = self._switches.current(reachable=sessions.available)
        # One reading of the clock for the group: its requests are answered by one commit,
        # and they share the instant, the business date and the answer's time fields.
        moment = self._moment()
        for index, payload in enumerate(payloads):
            try:
                prepared = self._prepare(payload, decoded[index], sessions, moment)
            except Exception:  # a bug: this request's link closes, the group goes on
                log.exception("request_failed", terminal=_terminal_of(decoded[index]))
                prepared = FAILED
            if isinstance(prepared, Reply):
                replies[index] = prepared
            else:
                pending.append((index, *prepared))
        return PreparedGroup(replies, pending, rest)

    def decide_prepared(self, group: PreparedGroup) -> list[Answer]:
        """The ledger transaction of a prepared group, and every answer; then the requests
        that waited for its commit, as a group of their own."""
        replies = list(group.replies)
        if group.pending:
            answered, ended = self._in_ledger(group.pending)
            for index, reply in answered:
                replies[index] = reply
            if ended:  # checked with keys a sign-on or sign-off elsewhere has since ended
                again = self.decide_prepared(
                    self.prepare_group([request.payload for _, request, _ in ended])
                )
                for (index, _, _), reply in zip(ended, again, strict=True):
                    replies[index] = reply
        settle_log_syncs()  # a group whose answers rest on its read of the sessions alone
        answers = [reply if reply is not None else Reply(None) for reply in replies]
        if group.rest:
            # The first part is committed: a bug in the rest must not cost it its answers.
            try:
                answers.extend(self.decide_prepared(self.prepare_group(group.rest)))
            except Exception:
                log.exception("group_failed", size=len(group.rest))
                answers.extend([FAILED] * len(group.rest))
        return answers

    def _prepare(
        self, payload: bytes, decoded: Message | CodecError, sessions: SessionView, moment: Moment
    ) -> Reply | tuple[Request, Context]:
        """Run the checks that need no ledger transaction: an answer, or a ledger context."""
        # A ledger whose sessions could not be read is not asked for an RRN either: each
        # would be a unit of work of its own, waiting as long for the ledger once more.
        allocate = sessions.available
        if isinstance(decoded, CodecError):
            return self._undecodable(decoded, moment, allocate=allocate)
        request = Request(decoded, payload, None, None, sessions=sessions)
        try:
            self._first_checks(request)
            context = self._context(request, moment)
        except DeclinedEarly as rejected:
            return self._rejected(request, rejected, moment, allocate=allocate)
        except CodecError:  # a sub-field that does not fit its shape
            return self._rejected(request, DeclinedEarly(Decline.FORMAT), moment, allocate=allocate)
        if _runs_together(context, request):
            _work_out_early(request, context)
        return request, context

    def _moment(self) -> Moment:
        now = self._clock.now().astimezone(self._config.gateway.timezone)
        return Moment(now, business_date(now, self._config.gateway.cutoff))

    # -- the checks before the ledger (§6 order: 30, 97, 03, 58, A7, A0) ------------------

    def _first_checks(self, request: Request) -> None:
        message = request.message
        if not {11, 41, 42, 60} <= set(message.fields) or message.fields[11] == NO_TRACE:
            # a trace is 000001-999999 (§2)
            raise DeclinedEarly(Decline.FORMAT, why="field 11, 41, 42 or 60 missing, or trace 0")
        # 11 or 14 digits, whatever the kind (§3), else `30` (`CodecError`, see `_prepare`).
        request.data = MessageData.parse(message.text(60))
        request.kind = classify(message.mti, _text(message, 3), message.text(60))
        if request.kind is not None:
            problem = format_problem(message, request.kind, request.data)
            if problem is not None:
                raise DeclinedEarly(Decline.FORMAT, why=problem)
        self._terminal_checks(request)
        if request.kind is Kind.SIGN_ON or request.kind is Kind.ECHO:
            return
        if request.kind is None and message.mti == SIGN_ON_MTI:
            # An 0800 carries no MAC (§5.1) and one that is no sign-on needs no keys: `12`,
            # not `A0`, which would send a signed-on terminal to sign on again for nothing.
            # Header digit `3` as for an echo: only when the terminal is not signed on (§1).
            not_signed_on = request.session is None and request.sessions.available
            raise DeclinedEarly(Decline.NOT_SUPPORTED, sign_on_again=not_signed_on)
        self._session_checks(request)
        if request.kind is None and message.mti not in LOGGED_MTIS:
            raise DeclinedEarly(Decline.NOT_SUPPORTED)  # nothing to record: answered here

    def _terminal_checks(self, request: Request) -> None:
        message = request.message
        terminal = self._terminals.get(message.text(41))
        if terminal is None:
            raise DeclinedEarly(Decline.TERMINAL_UNKNOWN)
        request.terminal = terminal
        kind = request.kind
        problem = None if kind is None else suite_problem(message, kind, terminal.suite)
        if problem is not None:
            raise DeclinedEarly(Decline.FORMAT, why=problem)
        request.session = request.sessions.get(terminal.id)
        if request.session is not None and kind is not None:
            self._track_checks(request, request.session)
        merchant = self._merchants.get(message.text(42))
        if merchant is None:
            raise DeclinedEarly(Decline.MERCHANT, why="merchant unknown")
        if merchant.id != terminal.merchant:
            raise DeclinedEarly(Decline.MERCHANT, why="not the terminal's merchant")
        if not merchant.active:
            raise DeclinedEarly(Decline.MERCHANT, why="merchant inactive")
        request.merchant = merchant
        if not terminal.enabled:
            raise DeclinedEarly(Decline.TERMINAL_DISABLED)
        if kind is Kind.SIGN_ON and _sign_on_suite(request) is not terminal.suite:
            raise DeclinedEarly(Decline.KEY_SUITE)

    def _track_checks(self, request: Request, session: Session) -> None:
        """Checks that need the keys: 53's TDK digit and the decrypted track (§5.4, §8)."""
        message = request.message
        if 53 not in message.fields or 35 not in message.fields:
            return
        encrypted = message.text(53)[2] == "1"
        if encrypted and not session.has_tdk:
            raise DeclinedEarly(Decline.FORMAT, why="track encrypted, but no TDK at sign-on")
        track = message.text(35)
        try:
            if encrypted:
                track = self._security.decrypt_track(session.keys, track)
            request.track = Track2.parse(track)
        except CodecError:
            if encrypted and not self._mac_verifies(request, session):
                # Decrypted under keys the terminal does not hold (it missed a sign-on): the
                # bytes say nothing of its track. The MAC, over the track as sent (§5.1),
                # fails too, and `_session_checks` answers `A0` with the sign-on digit, after
                # the terminal and merchant checks that rank before it (§6).
                return
            raise DeclinedEarly(Decline.FORMAT, why="track 2 does not read") from None

    def _mac_verifies(self, request: Request, session: Session) -> bool:
        payload = request.payload
        return has_mac(payload) and self._security.verify_mac(
            session.keys, mac_input(payload), received_mac(payload)
        )

    def _session_checks(self, request: Request) -> None:
        """`A0` without keys or with a wrong MAC; `96` when the ledger that holds the keys
        could not be read, since the terminal may well be signed on."""
        session = request.session
        payload = request.payload
        if session is None and not request.sessions.available:
            raise DeclinedEarly(Decline.SYSTEM, why="the sessions could not be read")
        if session is None:
            raise DeclinedEarly(Decline.MAC, sign_on_again=True, why="not signed on")
        if not has_mac(payload):
            raise DeclinedEarly(Decline.MAC, sign_on_again=True, why="no MAC")
        if not self._mac_verifies(request, session):
            raise DeclinedEarly(Decline.MAC, sign_on_again=True, why="MAC does not verify")

    # -- the ledger transaction ------------------------------------------------------------

    def _context(self, request: Request, moment: Moment) -> Context:
        assert request.terminal is not None and request.merchant is not None  # first checks
        assert request.data is not None
        return Context(
            message=request.message,
            kind=request.kind,
            data=request.data,
            terminal=request.terminal,
            merchant=request.merchant,
            session=request.session,
            track=request.track,
            moment=moment,
        )

    def _in_ledger(
        self, pending: list[_Pending], *, unknown: bool = False
    ) -> tuple[list[tuple[int, Answer]], list[_Pending]]:
        """The group's ledger transaction: the answers of its requests, and the requests left
        out of it because the keys they were checked with had ended (`_keys_ended`).
        `unknown`: an earlier COMMIT of these requests may have gone through (`_alone`).

        A group whose link to the ledger was lost by a timeout (`link_lost`: the server's
        host went silent) is answered at once, every request as `_alone` would answer it
        having failed: each run again alone would wait out the timeouts once more, on the
        one ledger thread, and the group's answers, all given together, would come after
        the terminal's 60 s (§1)."""
        began = time.monotonic()
        try:
            with unit_of_work(self._engine) as session:
                self._lock_rows(session, pending)
                closed = self._month_closed_meanwhile(session, pending[0][2].moment)
                if not closed:
                    current, ended = self._keys_ended(session, pending)
                    current, outcomes, behind = self._outcomes(session, current)
                    ended += behind
            if closed:
                return [
                    (index, self._too_late(request, context)) for index, request, context in pending
                ], []
        except SQLAlchemyError as error:
            unknown = unknown or isinstance(error, CommitOutcomeUnknownError)
            if not unknown and ledger_busy(error):
                return self._busy(pending, error), []
            if self._silent(error, time.monotonic() - began):
                return [
                    (index, self._failed_alone(request, context.moment, error, unknown=unknown))
                    for index, request, context in pending
                ], []
            if len(pending) > 1:
                # The driver's message may name rows' keys; its class and SQLSTATE say enough.
                log.warning(
                    "group_ran_alone",
                    requests=len(pending),
                    error=type(getattr(error, "orig", None) or error).__name__,
                    sqlstate=getattr(getattr(error, "orig", None), "sqlstate", None),
                )
                answered: list[tuple[int, Answer]] = []
                left: list[_Pending] = []
                for number, item in enumerate(pending):
                    self._silence_met = False
                    answered_alone, left_alone = self._in_ledger([item], unknown=unknown)
                    answered += answered_alone
                    left += left_alone
                    if self._silence_met:
                        # Lost again, by a timeout: the rest are answered without trying.
                        for index, request, context in pending[number + 1 :]:
                            failed = self._failed_alone(
                                request, context.moment, error, unknown=unknown
                            )
                            answered.append((index, failed))
                        break
                return answered, left
            index, request, context = pending[0]
            answer = self._alone(request, context, unknown=unknown)
            return ([(index, answer)], []) if answer is not None else ([], pending)
        replies: list[tuple[int, Answer]] = []
        for (index, request, context), outcome in zip(current, outcomes, strict=True):
            if outcome.after_commit is not None:
                outcome.after_commit()
            replies.append((index, self._send(request, outcome, context.moment)))
        return replies, ended

    def _busy(self, pending: list[_Pending], error: SQLAlchemyError) -> list[tuple[int, Answer]]:
        """`96` for every request of a group that waited past the ledger's lock wait (another
        process held the lock: a long import or clearing run). Nothing of the group was
        written, and running each request again alone would wait as long once more: a
        request would be answered after the terminal's 60 s (§1), and a group's after
        several times that."""
        log.error(
            "ledger_busy",
            requests=len(pending),
            terminals=sorted({context.terminal.id for _, _, context in pending}),
            error=type(getattr(error, "orig", None) or error).__name__,
            sqlstate=getattr(getattr(error, "orig", None), "sqlstate", None),
        )
        busy = DeclinedEarly(Decline.SYSTEM)
        return [
            (index, self._rejected(request, busy, context.moment, allocate=False))
            for index, request, context in pending
        ]

    def _lock_rows(self, session: OrmSession, pending: list[_Pending]) -> None:
        """On PostgreSQL, the terminals' and cards' locks before anything is read
        (`HotLedger.lock_group`), for every transaction of requests, a group of one and a
        request run alone after its group failed included: a terminal that reconnected to
        another process may send a reversal there while its original is still uncommitted
        here. Without the wait the reversal would find no original, answer 00 and leave the
        points taken (§4.6). The month's and the sessions' reads that come next
        (`_month_closed_meanwhile`, `_keys_ended`) go with the locks, in one round trip."""
        hot = hot_ledger(session)
        if hot.locks_rows:
            contexts = [context for _, _, context in pending]
            terminals = [context.terminal.id for context in contexts]
            reversals = any(context.kind is Kind.REVERSAL for context in contexts)
            if reversals:  # their originals' cards are read under the terminals' locks
                hot.lock_terminals(terminals)
            cards = (self._transactions.card_of(session, context) for context in contexts)
            hot.lock_group(
                terminals,
                {card for card in cards if card},
                month=_month_of(contexts[0].moment),
                generations_of=sorted(_generations_used(pending)),
                run=self._first_run(pending),
                terminals_held=reversals,
            )

    def _first_run(self, pending: list[_Pending]) -> RunReads | None:
        """The reads of the run of redemptions the group begins with, if it begins with one
        (`_outcomes`, `Transactions.redeem_run`), for `HotLedger.lock_group` to send ahead."""
        run = []
        for _, request, context in pending:
            if not _runs_together(context, request):
                break
            run.append((context.swipe, context.presented_card()[0], context.identity))
        if len(run) < MIN_RUN:
            return None
        daily_limit = bool(self._config.plan.max_points_per_card_day)
        return RunReads(run, daily_limit, pending[0][2].moment.business_date)

    def _month_closed_meanwhile(self, session: OrmSession, moment: Moment) -> bool:
        """Whether clearing has closed the month of this group's business date: since the
        group read its instant (just before the cut-off of the month's last day, say, then
        waited for a lock), or while this gateway's clock is behind the one `clear` ran by
        (another host's, or a rehearsal's `--clock`). Its requests must then change nothing:
        the close has accounted for the month without them, and no later close takes that
        month's items. Asked of the ledger for every transaction, whatever this gateway's
        clock says, inside the transaction (on PostgreSQL after the close's lock)."""
        return hot_ledger(session).month_closed(_month_of(moment))

    def _too_late(self, request: Request, context: Context) -> Answer:
        """`96` for a request whose month closed meanwhile: nothing changed, and the terminal
        sends it again (a reversal) or the sale is swiped again, under a new instant."""
        log.warning("month_closed_meanwhile", terminal=context.terminal.id)
        return self._rejected(request, DeclinedEarly(Decline.SYSTEM), context.moment)

    def _keys_ended(
        self, session: OrmSession, pending: list[_Pending]
    ) -> tuple[list[_Pending], list[_Pending]]:
        """The requests whose keys are still the ledger's, and those whose keys are not.

        A group reads the sessions before its transaction (`prepare_group`), without the write
        lock; another process may commit a sign-on or sign-off of one of its terminals
        meanwhile (a terminal with links to two processes). Inside the transaction (on SQLite
        under the write lock, after every commit of every process before it) the group reads
        the generations again, and a request checked with keys that have ended since is left
        out, to be prepared again after the commit: as if it had come after that sign-on or
        sign-off, so `A0` unless it carries the new keys' MAC. One read per group."""
        used = _generations_used(pending)
        if not used:
            return pending, []
        held = hot_ledger(session).session_generations(sorted(used))
        gone = {
            terminal for terminal, generation in used.items() if held.get(terminal) != generation
        }
        if not gone:
            return pending, []
        log.info("keys_ended_meanwhile", terminals=sorted(gone))
        current: list[_Pending] = []
        ended: list[_Pending] = []
        for item in pending:
            keys = _checked_with(item[2])
            (ended if keys is not None and keys.terminal_id in gone else current).append(item)
        return current, ended

    def _outcomes(
        self, session: OrmSession, pending: list[_Pending]
    ) -> tuple[list[_Pending], list[Outcome], list[_Pending]]:
        """Every request of the group in order: runs of redemptions together
        (`Transactions.redeem_run`), the others, and whatever a run leaves, one by one. The
        requests run, their outcomes, and those left out: a request that ends its terminal's
        session (`Outcome.ends_session`) leaves that terminal's later requests (a sign-on's
        aside) to be prepared again after the commit, as `_keys_ended` does, and as each
        would be had it come in a group of its own (`A0`, or an echo's header digit `3`)."""
        run_ones: list[_Pending] = []
        outcomes: list[Outcome] = []
        left: list[_Pending] = []
        start = 0
        while start < len(pending):
            end = start
            while end < len(pending) and _runs_together(pending[end][2], pending[end][1]):
                end += 1
            if end - start >= MIN_RUN:
                done = self._run_together(session, pending[start:end])
                run_ones += pending[start : start + len(done)]
                outcomes += done
                start += len(done)
                if start == end:
                    continue
            item = pending[start]
            outcome = self._run(session, item[1], item[2])
            run_ones.append(item)
            outcomes.append(outcome)
            start += 1
            if outcome.ends_session:
                ended = item[2].terminal.id
                rest = pending[start:]
                pending = pending[:start] + [i for i in rest if not _behind_the_end(i, ended)]
                left += [i for i in rest if _behind_the_end(i, ended)]
        return run_ones, outcomes, left

    def _run_together(self, session: OrmSession, run: list[_Pending]) -> list[Outcome]:
        """A run of redemptions: the outcomes of its first requests, logged together."""
        identities = [(context, context.identity) for _, _, context in run]
        try:
            outcomes = self._transactions.redeem_run(session, identities)
        finally:
            self._transactions.done(session, run[0][2])
        entries = []
        for (_, request, context), (_, identity), outcome in zip(
            run,
            identities,
            outcomes,
            strict=False,  # the run's answered requests
        ):
            stored = answers.stored(outcome.answer)
            entries.append((identity, request.digest, stored, context.moment.at))
        hot_ledger(session).log_requests(entries)
        return outcomes

    def _alone(self, request: Request, context: Context, *, unknown: bool = False) -> Answer | None:
        """A request whose group failed, in a transaction of its own: once more if a twin
        logged the same identity meanwhile, else `96` with nothing changed. None when its
        keys have ended meanwhile (`_keys_ended`): it is to be prepared again.

        When a COMMIT of it lost its link (`unknown`), its transaction may have committed:
        run again, the request log answers a logged request from what was committed. If the
        ledger cannot be reached to tell, `96` ("nothing changed") could be false, so there is
        no answer: the link closes, and the terminal reverses (§4.6) or sends it again."""
        failure: SQLAlchemyError | None = None
        for attempt in (1, 2):
            began = time.monotonic()
            try:
                with unit_of_work(self._engine) as session:
                    self._lock_rows(session, [(0, request, context)])
                    if self._month_closed_meanwhile(session, context.moment):
                        closed = True
                    else:
                        closed = False
                        _, ended = self._keys_ended(session, [(0, request, context)])
                        if ended:
                            return None
                        outcome = self._run(session, request, context)
                if closed:
                    return self._too_late(request, context)
            except IntegrityError as error:
                failure = error
                if attempt == 2:
                    break
                continue
            except SQLAlchemyError as error:
                unknown = unknown or isinstance(error, CommitOutcomeUnknownError)
                failure = error
                self._silent(error, time.monotonic() - began)
                break
            if outcome.after_commit is not None:
                outcome.after_commit()
            return self._send(request, outcome, context.moment)
        return self._failed_alone(request, context.moment, failure, unknown=unknown)

    def _silent(self, error: SQLAlchemyError, waited_s: float) -> bool:
        """Whether a transaction's failure was the link to PostgreSQL lost by a timeout
        (`link_lost`): no answer from the server (no SQLSTATE), after waiting. Noted for the
        group's requests run alone (`_silence_met`)."""
        orig = getattr(error, "orig", None)
        silent = (
            self._engine.dialect.name == "postgresql"
            and not isinstance(error, IntegrityError)
            and getattr(orig, "sqlstate", None) is None
            and link_lost(waited_s)
        )
        if silent:
            self._silence_met = True
        return silent

    def _failed_alone(
        self,
        request: Request,
        moment: Moment,
        failure: SQLAlchemyError | None,
        *,
        unknown: bool,
    ) -> Reply:
        """The answer of a request whose transaction failed: none when its COMMIT may have
        gone through (the link closes), else `96` with nothing changed."""
        terminal = request.message.fields.get(41)
        if unknown:
            log.error("ledger_outcome_unknown", terminal=terminal)
            return Reply(
                None, {"event": "closed", "reason": "ledger outcome unknown", "terminal": terminal}
            )
        # The driver's message may name rows' keys (card numbers); its class and SQLSTATE,
        # and for SQLite's operational errors the message ("disk I/O error"), say enough.
        orig = getattr(failure, "orig", None) or failure
        log.error(
            "ledger_failed",
            terminal=terminal,
            error=type(orig).__name__,
            sqlstate=getattr(orig, "sqlstate", None),
            reason=str(orig).splitlines()[0] if _safe_reason(orig) else None,
        )
        return self._rejected(request, DeclinedEarly(Decline.SYSTEM), moment, allocate=False)

    def _run(self, session: OrmSession, request: Request, context: Context) -> Outcome:
        """One request inside the group's transaction: the request log, then the kind."""
        identity = context.identity if request.message.mti in LOGGED_MTIS else None
        try:
            return self._logged(session, request, context, identity)
        finally:
            self._transactions.done(session, context)

    def _logged(
        self,
        session: OrmSession,
        request: Request,
        context: Context,
        identity: RequestIdentity | None,
    ) -> Outcome:
        self._transactions.prefetch(session, context, identity)
        if identity is not None:
            previous = hot_ledger(session).find_request(identity)
            if previous is not None:
                return self._repeat(session, request, context, previous.digest, previous.answer)
        outcome = self._transactions.run(session, context)
        if identity is not None and not outcome.unrecorded:
            hot_ledger(session).log_request(
                identity,
                request.digest,
                answers.stored(outcome.answer),
                context.moment.at,
            )
        return outcome

    def _repeat(
        self,
        session: OrmSession,
        request: Request,
        context: Context,
        digest: bytes,
        kept: dict[str, str],
    ) -> Outcome:
        """The stored answer for the same request; `94` for another one with its identity
        (not recorded as an authorisation: the identity belongs to the first request)."""
        if digest == request.digest:
            return Outcome(answers.restored(request.message, kept), repeated=True)
        extra: dict[int, FieldValue] = {}
        if request.message.mti in ANSWER_MTIS_WITH_RRN:
            extra[37] = hot_ledger(session).next_rrn(context.moment.at)
        code = response_code(Decline.DUPLICATE)
        answer = answers.answer(
            request.message, request.kind, code, self._stamp(context.moment), extra
        )
        return Outcome(answer)

    # -- answers -----------------------------------------------------------------------------

    def _send(self, request: Request, outcome: Outcome, moment: Moment) -> Answer:
        answer = outcome.answer
        code = answer.text(39)
        event = self._event(request, code, outcome.card_number, outcome.repeated)
        if outcome.why is not None:
            event["why"] = outcome.why
        if answers.carries_mac(request.kind, code):
            # The keys the request's MAC was checked with (a repeat's answer too: §7's current
            # MAK), or those a sign-off ended; read from the ledger when the group began.
            keys = outcome.mac_session or request.session
            if keys is None:  # no keys to MAC with: the terminal signs on again
                return self._rejected(
                    request, DeclinedEarly(Decline.MAC, sign_on_again=True), moment
                )
            return Sealing(answer, event, _mac_with(self._security, keys))
        return Sealing(answer, event, None)

    def _rejected(
        self, request: Request, rejected: DeclinedEarly, moment: Moment, *, allocate: bool = True
    ) -> Reply:
        message = request.message
        if not {11, 41, 42}.issubset(message.fields):
            return Reply(None, {"event": "closed", "reason": "unanswerable request"})
        code = response_code(rejected.decline)
        stamp = self._stamp(moment)
        extra: dict[int, FieldValue] = {}
        if message.mti in ANSWER_MTIS_WITH_RRN:
            extra[37] = self._rrn(moment) if allocate else _fallback_rrn(moment)
        answer = answers.answer(
            message, request.kind, code, stamp, extra, sign_on_again=rejected.sign_on_again
        )
        event = self._event(request, code, None, False)
        if rejected.why is not None:
            event["why"] = rejected.why
        return Reply(encode_message(answer), event)

    def _undecodable(self, error: CodecError, moment: Moment, *, allocate: bool = True) -> Reply:
        partial = error.partial
        if partial is None or not {11, 41, 42}.issubset(partial.fields):
            return Reply(None, {"event": "closed", "reason": error.part})
        request = Request(partial, b"", None, None)
        rejected = DeclinedEarly(Decline.FORMAT, why=error.part)
        return self._rejected(request, rejected, moment, allocate=allocate)

    def _stamp(self, moment: Moment) -> Stamp:
        return Stamp(moment.local, moment.business_date, self._config.gateway.acquirer_institution)

    def _rrn(self, moment: Moment) -> str:
        try:
            with unit_of_work(self._engine) as session:
                return next_rrn(session, moment.at)
        except SQLAlchemyError:
            return _fallback_rrn(moment)

    def _event(
        self, request: Request, code: str, card: str | None, repeated: bool
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event": "answered",
            "terminal": request.message.fields.get(41),
            "mti": request.message.mti,
            "kind": request.kind.value if request.kind else None,
            "code": code,
            # What the terminal prints on its slip, to find the line by: trace and batch.
            "trace": request.message.fields.get(11),
            "batch": request.data.batch if request.data is not None else None,
        }
        if card is not None:
            event["card"] = mask_card_number(card)
        if repeated:
            event["repeated"] = True
        return event


def _text(message: Message, number: int) -> str | None:
    value = message.fields.get(number)
    return value if isinstance(value, str) else None


def _sign_on_suite(request: Request) -> Suite:
    code = request.data.management_code if request.data else ""
    return Suite.SM4 if code in SM4_SIGN_ONS else Suite.TDES


def _checked_with(context: Context) -> Session | None:
    """The session whose keys the request was checked with (MAC, PIN, track): every request
    that has one but a sign-on or an echo."""
    return None if context.kind in (Kind.SIGN_ON, Kind.ECHO) else context.session


def _behind_the_end(item: _Pending, terminal_id: str) -> bool:
    """Whether a request behind one that ended `terminal_id`'s session must wait for that
    commit: every request of that terminal but a sign-on, which needs no session (an echo's
    header digit says whether the terminal is signed on)."""
    context = item[2]
    return context.terminal.id == terminal_id and context.kind is not Kind.SIGN_ON


def _generations_used(pending: list[_Pending]) -> dict[str, int]:
    """The generation of the keys each terminal's requests were checked with."""
    used: dict[str, int] = {}
    for _, _, context in pending:
        keys = _checked_with(context)
        if keys is not None:
            used[keys.terminal_id] = keys.generation
    return used


def _month_of(moment: Moment) -> str:
    """The month ("YYYY-MM") of a moment's business date, as clearing closes it."""
    day = moment.business_date
    return f"{day.year:04d}-{day.month:02d}"


def _runs_together(context: Context, request: Request) -> bool:
    """A redemption, logged by its identity, can be part of a run (`_run_together`)."""
    return context.kind is Kind.REDEMPTION and request.message.mti in LOGGED_MTIS


def _work_out_early(request: Request, context: Context) -> None:
    """What a redemption's ledger work asks of its request and context, worked out before
    the group enters the ledger: with several processes on one SQLite file, every moment the
    group holds the write lock is a moment the others wait."""
    context.presented_card()
    _ = (context.swipe, context.amount_fen, context.identity, request.digest)


def _digest(payload: bytes) -> bytes:
    """The request as compared for repeats: everything after the header, field 64 left out."""
    body = payload[ENVELOPE_BYTES:-8] if has_mac(payload) else payload[ENVELOPE_BYTES:]
    return hashlib.sha256(body).digest()


def _mac_with(security: SecurityModule, session: Session) -> Callable[[bytes], bytes]:
    return lambda data: security.mac(session.keys, data)


def _decode(payload: bytes) -> Message | CodecError:
    """The request, or why it does not decode (answered by `_undecodable`). A message whose
    MTI is a response's (0210, 0810, ...) is not answered: its answer's MTI would not exist."""
    try:
        message = decode_message(payload)
    except CodecError as error:
        if error.partial is not None and error.partial.mti not in REQUEST_MTIS:
            return _not_a_request(error.partial.mti)
        return error
    if message.mti not in REQUEST_MTIS:
        return _not_a_request(message.mti)
    return message


def _not_a_request(mti: str) -> CodecError:
    return CodecError(
        f"MTI {mti} is not a request's", part="MTI", offset=LENGTH_BYTES + ENVELOPE_BYTES
    )


SESSION_MTIS = frozenset({"0800", "0820"})
SESSION_CHANGES = frozenset({Kind.SIGN_ON, Kind.SIGN_OFF})


def _session_cut(decoded: Sequence[Message | CodecError]) -> int:
    """Where a group ends: at the first request of a terminal that an earlier request of
    the group signs on or off, so that it waits for that commit and is checked against the
    session as the change left it. Its MAC was made with keys that change ended (or with
    new ones the group's read of the sessions does not have yet)."""
    changed: set[object] = set()
    for index, item in enumerate(decoded):
        if not isinstance(item, Message):
            continue
        terminal = item.fields.get(41)
        if terminal in changed:
            return index
        if item.mti in SESSION_MTIS:
            kind = classify(item.mti, _text(item, 3), _text(item, 60))
            if kind in SESSION_CHANGES:
                changed.add(terminal)
    return len(decoded)


def _terminal_ids(decoded: Sequence[Message | CodecError]) -> set[str]:
    """The terminals a group names in field 41, for its one read of the sessions."""
    named = (item.fields.get(41) for item in decoded if isinstance(item, Message))
    return {terminal for terminal in named if isinstance(terminal, str)}


def _terminal_of(item: Message | CodecError) -> FieldValue | None:
    """Field 41 of a decoded request, for a log line."""
    return item.fields.get(41) if isinstance(item, Message) else None


class _FallbackRrns:
    """RRNs when the ledger cannot allocate one (answer `96`): 9, then the centiseconds since
    the year began and the process's slot (its worker number's last digit), a range the
    ledger's sequence does not reach for decades. Each is above the last this process gave,
    so the requests of one group (one instant) get RRNs of their own, and the workers of one
    gateway, answering `96` at the same instant during an outage, give different ones (ten
    workers at most; instances on other hosts may still meet)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the reactor's thread and the ledger's both ask
        self._last = -1
        self.slot = 0

    def next(self, moment: Moment) -> str:
        start = moment.at.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        elapsed = moment.at - start
        centiseconds = (elapsed.days * 86_400 + elapsed.seconds) * 100
        wanted = (centiseconds + elapsed.microseconds // 10_000) * _FALLBACK_SLOTS + self.slot
        with self._lock:
            self._last = max(wanted, self._last + _FALLBACK_SLOTS) % _FALLBACK_SPAN
            return f"9{self._last:0{RRN_DIGITS - 1}d}"


_FALLBACK_SPAN = 10 ** (RRN_DIGITS - 1)
_FALLBACK_SLOTS = 10
_fallback_rrns = _FallbackRrns()


def number_fallback_rrns(worker: int) -> None:
    """This process is worker `worker` of a gateway: its fallback RRNs take that slot."""
    _fallback_rrns.slot = worker % _FALLBACK_SLOTS


def _fallback_rrn(moment: Moment) -> str:
    return _fallback_rrns.next(moment)


def _safe_reason(error: object) -> bool:
    """Whether a driver error's message may be logged: SQLite's operational errors ("database
    is locked", "disk I/O error", "database or disk is full") name no row's values, where an
    integrity error's or PostgreSQL's may (a card number in a key)."""
    return isinstance(error, sqlite3.OperationalError)

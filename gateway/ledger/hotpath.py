"""The requests terminals send most, on the database driver's own cursor.

A redemption through the ORM costs about 2 ms of Python in SQLAlchemy's unit of work, many
times what SQLite or PostgreSQL spend on it. This module does the same bookkeeping as
`operations.redeem`, `records.record_authorisation`, the request log and the look-ups around
them with fixed SQL on the DBAPI cursor of the unit of work's own connection, so it commits
(or rolls back) with everything else the group did through the ORM. The rules are the same
ones `journal` states: entries sum to zero, every lot change is a movement, lots are spent
earliest-expiring first and never once expired; the tests run both paths against one model.

The statements are written once, with `?` placeholders, and turned into each backend's form
(`%s` and `FOR UPDATE`/`RETURNING` on PostgreSQL). Values cross in the forms SQLAlchemy's
own types use, so rows written here read back through the models unchanged: on SQLite,
instants as naive UTC text with microseconds, dates as ISO text, JSON as text.

Nothing here commits, and nothing here decides whether a request is allowed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from gateway.clock import lot_expired
from gateway.decision import CardSnapshot
from gateway.ledger.db import CommitOutcomeUnknownError, joined_connection
from gateway.ledger.journal import RRN_DIGITS, LedgerError, LotChange, Moment
from gateway.ledger.models import AuthorisationKind, RequestClass
from gateway.ledger.operations import APPROVED_CODES, Decline, Declined, Redeemed, Swipe
from gateway.ledger.records import Recorded, RequestIdentity
from gateway.points import Conversion

_INFO_KEY = "vipgate.hotpath"


@dataclass(frozen=True, init=False)
class Lot:
    """A lot that still holds points, as spending needs it."""

    id: int
    expires_on: date
    remaining_points: int

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(self, id: int, expires_on: date, remaining_points: int) -> None:
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "expires_on", expires_on)
        object.__setattr__(self, "remaining_points", remaining_points)


@dataclass(frozen=True)
class LoggedAnswer:
    """What the request log kept for an identity: the request's digest and its answer."""

    digest: bytes
    answer: dict[str, str]


@dataclass(frozen=True, init=False)
class PlannedRedemption:
    """An approved redemption decided on a `GroupView`, written later with the rest of its
    run by `HotLedger.write_group`: the same rows `HotLedger.redeem` writes."""

    swipe: Swipe
    card: tuple[str, int]  # number, journal account id
    shares: tuple[tuple[Lot, int], ...]  # points taken from each lot, in spending order
    amounts: tuple[int, int, int]  # requested, A, d
    figures: tuple[str | None, int, int, int]  # rule, D, P, fee in force
    auth_code: str
    response_code: str
    spendable_points_after: int

    # Written out so that mypyc compiles it (docs/gateway.md, "The native build").
    def __init__(  # noqa: PLR0917 (the fields, in order, as the dataclass's own)
        self,
        swipe: Swipe,
        card: tuple[str, int],
        shares: tuple[tuple[Lot, int], ...],
        amounts: tuple[int, int, int],
        figures: tuple[str | None, int, int, int],
        auth_code: str,
        response_code: str,
        spendable_points_after: int,
    ) -> None:
        object.__setattr__(self, "swipe", swipe)
        object.__setattr__(self, "card", card)
        object.__setattr__(self, "shares", shares)
        object.__setattr__(self, "amounts", amounts)
        object.__setattr__(self, "figures", figures)
        object.__setattr__(self, "auth_code", auth_code)
        object.__setattr__(self, "response_code", response_code)
        object.__setattr__(self, "spendable_points_after", spendable_points_after)


class GroupView:
    """A run of redemptions' reads, made at once (`HotLedger.read_group`), answering what the
    one-request path asks of `HotLedger` as if the run's earlier redemptions were written.

    Only what a run of approved redemptions changes is followed (lots, batch counts, points
    redeemed today, identities); anything else ends the run and goes the one-request way."""

    def __init__(
        self,
        hot: HotLedger,
        business_date: date,
        *,
        logged: set[tuple[str, int, int, str]],
        tombstones: set[tuple[str, int, int]],
        cards: dict[str, tuple[CardSnapshot, int]],
        lots: dict[str, list[Lot]],
        batch_counts: dict[tuple[str, int], int],
        redeemed: dict[str, int],
    ) -> None:
        self._hot = hot
        self.business_date = business_date
        self._taken = logged
        self._tombstones = tombstones
        self._cards = cards
        self._lots = lots
        self._remaining = {lot.id: lot.remaining_points for held in lots.values() for lot in held}
        self._batch_counts = batch_counts
        self._redeemed = redeemed

    def identity_taken(self, identity: RequestIdentity) -> bool:
        """Logged before the run, or claimed by one of its requests."""
        return _identity_row(identity) in self._taken

    def claim(self, identity: RequestIdentity) -> None:
        self._taken.add(_identity_row(identity))

    def tombstone_exists(self, terminal_id: str, batch_number: int, trace: int) -> bool:
        return (terminal_id, batch_number, trace) in self._tombstones

    def lock_card(self, number: str) -> tuple[CardSnapshot, int] | None:
        return self._cards.get(number)

    def open_batch(self, terminal_id: str) -> int:
        return self._hot.open_batch(terminal_id)

    def batch_count(self, terminal_id: str, batch_number: int, kinds: Iterable[str]) -> int:
        if tuple(kinds) != (AuthorisationKind.REDEMPTION.value,):
            raise ValueError("a run of redemptions counts redemptions only")
        return self._batch_counts[(terminal_id, batch_number)]

    def batch_debit_fen(self, terminal_id: str, batch_number: int) -> int | None:
        """Not read for a run (only a merchant whose maximum amount is over a billion fen
        needs it): None, and the request goes the one-request way."""
        return None

    def points_redeemed_on(self, number: str, business_date: date) -> int:
        if business_date != self.business_date:
            raise ValueError(f"the run was read for {self.business_date}, not {business_date}")
        return self._redeemed.get(number, 0)

    def spendable_lots(self, number: str, local: datetime) -> list[Lot]:
        remaining = self._remaining
        return [
            Lot(lot.id, lot.expires_on, remaining[lot.id])
            for lot in self._lots.get(number, ())
            if remaining[lot.id] > 0 and not lot_expired(lot.expires_on, local)
        ]

    def plan(
        self,
        swipe: Swipe,
        card: tuple[str, int],
        lots: Sequence[Lot],
        conversion: Conversion,
        *,
        requested_amount_fen: int,
        rule_id: str | None,
        fee_bp: int,
        auth_code: Callable[[], str],
        response_code: str,
    ) -> PlannedRedemption | Declined:
        """As `HotLedger.redeem`, written later: the lots, counts and sums the run's next
        requests see change now. `auth_code` draws the authorisation code, only for a
        redemption that is planned (the one-request path draws one per redemption it writes)."""
        spent = _taking(lots, conversion.points, response_code)
        if isinstance(spent, Declined):
            return spent
        shares, available = spent
        points = conversion.points
        for lot, amount in shares:
            self._remaining[lot.id] -= amount
        place = (swipe.terminal_id, swipe.batch_number)
        self._batch_counts[place] = self._batch_counts.get(place, 0) + 1
        if swipe.when.business_date == self.business_date:
            self._redeemed[card[0]] = self._redeemed.get(card[0], 0) + points
        return PlannedRedemption(
            swipe,
            card,
            tuple(shares),
            (requested_amount_fen, conversion.amount_fen, conversion.discount_bp),
            (rule_id, conversion.settled_fen, points, fee_bp),
            auth_code(),
            response_code,
            available - points,
        )


@dataclass(frozen=True)
class RunReads:
    """What `read_group` reads for a run of redemptions: (swipe, card number, identity) of
    each, whether the daily limit applies, and their business date."""

    requests: Sequence[tuple[Swipe, str, RequestIdentity]]
    daily_limit: bool
    business_date: date

    def numbers(self) -> list[str]:
        return sorted({number for _, number, _ in self.requests})

    def terminals(self, known: Iterable[str]) -> list[str]:
        """The run's terminals not among `known`, sorted."""
        return sorted({swipe.terminal_id for swipe, _, _ in self.requests} - set(known))


class _Authorisation(NamedTuple):
    """The columns of an authorisation row that are not amounts."""

    kind: AuthorisationKind
    rrn: str
    auth_code: str | None
    card_number: str | None
    response_code: str
    state: str
    transaction_id: int | None


class _Sql:
    """The statements in one backend's dialect."""

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres
        lock = " FOR UPDATE" if postgres else ""
        returning = " RETURNING id" if postgres else ""

        def sql(text: str) -> str:
            return text.replace("?", "%s") if postgres else text

        self.find_request = sql(
            "SELECT digest, answer FROM request_log WHERE terminal_id = ? AND batch_number = ?"
            " AND trace = ? AND request_class = ?"
        )
        self.log_request = sql(
            "INSERT INTO request_log (terminal_id, batch_number, trace, request_class, digest,"
            " answer, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        self.tombstone = sql(
            "SELECT 1 FROM reversal_tombstones WHERE terminal_id = ? AND batch_number = ?"
            " AND trace = ?"
        )
        self.session_generations = "SELECT terminal_id, generation FROM terminal_sessions" + (
            " WHERE terminal_id = ANY(%s)"
            if postgres
            else " WHERE terminal_id IN (SELECT value FROM json_each(?))"
        )
        self.card = sql(
            "SELECT c.number, c.expiry_yymm, c.tier, c.status, c.enrolled, c.pin_hmac,"
            " c.wrong_pin_count, c.pin_locked, a.id FROM cards c"
            " JOIN accounts a ON a.card_number = c.number WHERE c.number = ?"
            + (" FOR UPDATE OF c" if postgres else "")
        )
        # PostgreSQL: one index probe per card, in the order of the (sorted) array, each row
        # locked as it is found. `number = ANY(...)` lets the planner read the whole table
        # instead, and it does while the table has no statistics yet, or a few thousand rows:
        # 1.4 ms against 0.16 ms for 29 cards of 2,000. Only PostgreSQL runs it (`lock_group`):
        # SQLite's unit of work holds the one write lock.
        self.lock_cards = (
            "SELECT c.number FROM unnest(%s::text[]) AS k(n)"
            " CROSS JOIN LATERAL (SELECT number FROM cards WHERE number = k.n FOR UPDATE) c"
            if postgres
            else "SELECT number FROM cards WHERE number IN (SELECT value FROM json_each(?))"
        )
        # The close's lock (`CLOSE_LOCK_KEY`), shared by every gateway transaction.
        self.lock_close_shared = "SELECT pg_advisory_xact_lock_shared(%s)" if postgres else ""
        self.month_closed = sql("SELECT 1 FROM clearing_months WHERE month = ?")
        # One lock after another, in the array's order (no sort: the keys come sorted).
        self.lock_terminals = (
            "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k" if postgres else ""
        )
        self.terminal = sql("SELECT merchant_id, open_batch_number FROM terminals WHERE id = ?")
        self.system_account = sql("SELECT id FROM accounts WHERE kind = ? AND card_number IS NULL")
        self.lots = sql(
            "SELECT id, expires_on, remaining_points FROM point_lots"
            " WHERE card_number = ? AND remaining_points > 0"
            " ORDER BY expires_on, earned_on, id" + lock
        )
        self.batch_count = sql(
            "SELECT coalesce((SELECT items FROM batch_item_counts WHERE terminal_id = ?"
            " AND batch_number = ? AND kind = ?), 0)"
        )
        # A batch's debits and credits as settlement adds them (`records.gateway_totals`).
        totals = (
            "SELECT coalesce(sum(amount_fen), 0) FROM authorisations WHERE terminal_id = ?"
            " AND batch_number = ? AND response_code IN ('00', '10') AND state <> 'reversed'"
        )
        self.batch_debit = sql(totals + " AND kind = 'redemption'")
        self.batch_credit = sql(totals + " AND kind IN ('void', 'refund')")
        self.redeemed_on = sql(
            "SELECT coalesce(sum(points), 0) FROM authorisations WHERE card_number = ?"
            " AND kind = 'redemption' AND state = 'approved' AND business_date = ?"
        )
        self.rrn = sql("INSERT INTO rrn_allocations (allocated_at) VALUES (?)" + returning)
        self.authorisation = sql(
            "INSERT INTO authorisations (rrn, kind, terminal_id, merchant_id, batch_number,"
            " trace, auth_code, card_number, requested_amount_fen, amount_fen, discount_bp,"
            " rule_id, settled_fen, points, fee_bp, response_code, local_time, business_date,"
            " original_id, state, refunded_fen, points_returned, fen_clawed,"
            " journal_transaction_id, exception)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, ?, ?)"
            + returning
        )
        self.transaction = sql(
            "INSERT INTO journal_transactions (idempotency_key, kind, created_at, business_date,"
            " card_number) VALUES (?, ?, ?, ?, ?)" + returning
        )
        self.entry = sql(
            "INSERT INTO journal_entries (transaction_id, account_id, points) VALUES (?, ?, ?)"
        )
        self.take = sql(
            "UPDATE point_lots SET remaining_points = remaining_points - ? WHERE id = ?"
            " AND remaining_points >= ?"
        )
        self.movement = sql(
            "INSERT INTO lot_movements (transaction_id, lot_id, points, redemption_id,"
            " origin_lot_id) VALUES (?, ?, ?, ?, ?)"
        )


_SQLITE = _Sql(postgres=False)
_POSTGRES = _Sql(postgres=True)


class _GroupSql:
    """The statements that read or write for a whole run of redemptions at once.

    SQLite takes the run's keys as one JSON array (`json_each`), PostgreSQL as arrays
    (`unnest`, `= ANY`); either way the statement's text does not depend on the run's length,
    so each is prepared once, and every look-up is driven from the keys into the same unique
    indexes the one-request statements use."""

    def __init__(self, postgres: bool) -> None:
        if postgres:
            identities = "unnest(%b::text[], %b::int[], %b::int[], %b::text[]) AS j(t, b, n, c)"
            places = "unnest(%b::text[], %b::int[], %b::int[]) AS j(t, b, n)"
            batches = "unnest(%b::text[], %b::int[]) AS j(t, b)"
            t, b, n, c = "j.t", "j.b", "j.n", "j.c"
            numbers = "= ANY(%b::text[])"
        else:
            identities = places = batches = "json_each(?) AS j"
            t, b, n, c = (f"json_extract(j.value, '$[{i}]')" for i in range(4))
            numbers = "IN (SELECT value FROM json_each(?))"
        self.logged = (
            f"SELECT r.terminal_id, r.batch_number, r.trace, r.request_class, r.digest, r.answer"
            f" FROM {identities} CROSS JOIN request_log r WHERE r.terminal_id = {t}"
            f" AND r.batch_number = {b} AND r.trace = {n} AND r.request_class = {c}"
        )
        self.tombstones = (
            f"SELECT r.terminal_id, r.batch_number, r.trace FROM {places}"
            f" CROSS JOIN reversal_tombstones r WHERE r.terminal_id = {t}"
            f" AND r.batch_number = {b} AND r.trace = {n}"
        )
        if postgres:
            # One index probe per card (see `_Sql.lock_cards`); a subquery that locks is
            # never merged into the outer query, so the planner cannot turn the probes back
            # into a scan of the table.
            self.cards = (
                "SELECT c.number, c.expiry_yymm, c.tier, c.status, c.enrolled, c.pin_hmac,"
                " c.wrong_pin_count, c.pin_locked, c.id FROM unnest(%b::text[]) AS k(n)"
                " CROSS JOIN LATERAL (SELECT c.number, c.expiry_yymm, c.tier, c.status,"
                " c.enrolled, c.pin_hmac, c.wrong_pin_count, c.pin_locked, a.id FROM cards c"
                " JOIN accounts a ON a.card_number = c.number WHERE c.number = k.n"
                " FOR UPDATE OF c) c"
            )
            self.lots = (
                "SELECT k.n, p.id, p.expires_on, p.remaining_points FROM unnest(%b::text[])"
                " AS k(n) CROSS JOIN LATERAL (SELECT id, expires_on, earned_on,"
                " remaining_points FROM point_lots WHERE card_number = k.n"
                " AND remaining_points > 0 FOR UPDATE) p"
                " ORDER BY k.n, p.expires_on, p.earned_on, p.id"
            )
        else:
            self.cards = (
                "SELECT c.number, c.expiry_yymm, c.tier, c.status, c.enrolled, c.pin_hmac,"
                " c.wrong_pin_count, c.pin_locked, a.id FROM cards c"
                f" JOIN accounts a ON a.card_number = c.number WHERE c.number {numbers}"
            )
            self.lots = (
                "SELECT card_number, id, expires_on, remaining_points FROM point_lots"
                f" WHERE card_number {numbers} AND remaining_points > 0"
                " ORDER BY card_number, expires_on, earned_on, id"
            )
        self.terminals = (
            # A join on the keys: the planner probes or hashes them, where `id = ANY(...)`
            # compares every row of the table with every key.
            "SELECT t.id, t.merchant_id, t.open_batch_number FROM unnest(%b::text[]) AS k(n)"
            " JOIN terminals t ON t.id = k.n"
            if postgres
            else f"SELECT id, merchant_id, open_batch_number FROM terminals WHERE id {numbers}"
        )
        self.batch_counts = (
            f"SELECT {t}, {b}, coalesce((SELECT c.items FROM batch_item_counts c"
            f" WHERE c.terminal_id = {t} AND c.batch_number = {b} AND c.kind = 'redemption'),"
            f" 0) FROM {batches}"
        )
        self.redeemed_on = (
            "SELECT card_number, sum(points) FROM authorisations"
            f" WHERE card_number {numbers} AND kind = 'redemption' AND state = 'approved'"
            f" AND business_date = {'%s' if postgres else '?'} GROUP BY card_number"
        )
        if postgres:
            # The sequence is looked up once per statement (an InitPlan), not once per id:
            # 148 us against 233 us for 30 ids.
            self.next_ids = {
                table: f"SELECT nextval((SELECT pg_get_serial_sequence('{table}', 'id')"
                "::regclass)) FROM generate_series(1, %s)"
                for table in ("rrn_allocations", "journal_transactions", "authorisations")
            }
        else:  # the unit of work holds SQLite's write lock: nobody else takes ids meanwhile
            # Each the highest id in use, as a value; `_new_ids` reads them in one statement.
            self.next_ids = {
                "rrn_allocations": "coalesce((SELECT seq FROM sqlite_sequence"
                " WHERE name = 'rrn_allocations'), 0)",
                "journal_transactions": "(SELECT coalesce(max(id), 0) FROM journal_transactions)",
                "authorisations": "(SELECT coalesce(max(id), 0) FROM authorisations)",
            }

        def sql(text: str) -> str:
            return text.replace("?", "%s") if postgres else text

        self.rrn = sql("INSERT INTO rrn_allocations (id, allocated_at) VALUES (?, ?)")
        self.transaction = sql(
            "INSERT INTO journal_transactions (id, idempotency_key, kind, created_at,"
            " business_date, card_number) VALUES (?, ?, 'redemption', ?, ?, ?)"
        )
        self.authorisation = sql(
            "INSERT INTO authorisations (id, rrn, kind, terminal_id, merchant_id, batch_number,"
            " trace, auth_code, card_number, requested_amount_fen, amount_fen, discount_bp,"
            " rule_id, settled_fen, points, fee_bp, response_code, local_time, business_date,"
            " original_id, state, refunded_fen, points_returned, fen_clawed,"
            " journal_transaction_id, exception)"
            " VALUES (?, ?, 'redemption', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL,"
            " 'approved', 0, 0, 0, ?, NULL)"
        )
        # PostgreSQL writes a run's rows of a table with one statement over one JSON array of
        # rows (`jsonb_array_elements`), not one execution per row: the server plans and runs
        # it once. Each takes the rows of the row-wise statement's parameters, columns in the
        # same order, as one text parameter made by `_rows_json`: the json module writes it
        # in C, where arrays as parameters cost psycopg a Python call per element.
        self.rows: dict[str, str] = {}
        if postgres:
            single = _Sql(postgres=True)
            rrn = _json_columns("bigint", "timestamptz")
            transaction = _json_columns("bigint", "text", "timestamptz", "date", "text")
            authorisation = _json_columns(
                "bigint", "text", "text", "text", "int", "int", "text", "text", "bigint",
                "bigint", "int", "text", "bigint", "bigint", "int", "text", "timestamptz",
                "date", "bigint",
            )  # fmt: skip
            request = _json_columns("text", "int", "int", "text", "bytea", "json", "timestamptz")
            self.rows = {
                self.rrn: f"INSERT INTO rrn_allocations (id, allocated_at) SELECT {rrn}"
                f"{_JSON_ROWS}",
                self.transaction: "INSERT INTO journal_transactions (id, idempotency_key, kind,"
                " created_at, business_date, card_number) SELECT {}, {}, 'redemption', {}, {},"
                " {}".format(*transaction.split(", "))
                + _JSON_ROWS,
                single.entry: "INSERT INTO journal_entries (transaction_id, account_id, points)"
                f" SELECT {_json_columns('bigint', 'bigint', 'bigint')}{_JSON_ROWS}",
                self.authorisation: "INSERT INTO authorisations (id, rrn, kind, terminal_id,"
                " merchant_id, batch_number, trace, auth_code, card_number,"
                " requested_amount_fen, amount_fen, discount_bp, rule_id, settled_fen, points,"
                " fee_bp, response_code, local_time, business_date, original_id, state,"
                " refunded_fen, points_returned, fen_clawed, journal_transaction_id, exception)"
                " SELECT {}, 'redemption', {}, NULL, 'approved', 0, 0, 0, {}, NULL".format(
                    *_split_columns(authorisation, 2, 18)
                )
                + _JSON_ROWS,
                single.take: "UPDATE point_lots p SET remaining_points = p.remaining_points - u.a"
                " FROM (SELECT (r->>0)::bigint AS a, (r->>1)::bigint AS id,"
                f" (r->>2)::bigint AS floor{_JSON_ROWS}) AS u"
                " WHERE p.id = u.id AND p.remaining_points >= u.floor",
                single.movement: "INSERT INTO lot_movements (transaction_id, lot_id, points,"
                " redemption_id, origin_lot_id)"
                f" SELECT {_json_columns(*['bigint'] * 5)}{_JSON_ROWS}",
                single.log_request: "INSERT INTO request_log (terminal_id, batch_number, trace,"
                f" request_class, digest, answer, recorded_at) SELECT {request}{_JSON_ROWS}",
            }


_JSON_ROWS = " FROM jsonb_array_elements(%s::jsonb) AS r"


def _json_columns(*types: str) -> str:
    """The columns of a row `r` of `_JSON_ROWS`, each cast to its type (bytea from hex, json
    from the text it was stored as)."""
    return ", ".join(
        f"decode(r->>{index}, 'hex')" if kind == "bytea" else f"(r->>{index})::{kind}"
        for index, kind in enumerate(types)
    )


def _split_columns(columns: str, *cuts: int) -> list[str]:
    """`_json_columns`'s text in runs, cut before each index of `cuts`, to put constants of
    the statement between them."""
    parts = columns.split(", ")
    bounds = [0, *cuts, len(parts)]
    return [", ".join(parts[a:b]) for a, b in itertools.pairwise(bounds)]


_GROUP_SQLITE = _GroupSql(postgres=False)
_GROUP_POSTGRES = _GroupSql(postgres=True)


class HotLedger:
    """The driver-level ledger of one unit of work (get it with `hot_ledger(session)`)."""

    def __init__(self, session: Session) -> None:
        connection = joined_connection(session)
        # On PostgreSQL the held-back writes go out in the ORM's before_commit hook, so the
        # session's own transaction is begun (and later committed) there.
        if connection is None or connection.dialect.name == "postgresql":
            connection = session.connection()
        postgres = connection.dialect.name == "postgresql"
        self._sql = _POSTGRES if postgres else _SQLITE
        self._group_sql = _GROUP_POSTGRES if postgres else _GROUP_SQLITE
        self._connection = connection
        self._driver: Any = cast(Any, connection.connection).driver_connection
        self._cursor: Any = self._driver.cursor()
        self._terminals: dict[str, tuple[str, int]] = {}
        self._system_accounts: dict[str, int] = {}
        self._prefetched: dict[tuple[str, tuple[Any, ...]], Any] = {}
        self._deferred: list[tuple[str, tuple[Any, ...]]] = []
        self._last_instant: tuple[datetime | None, Any] = (None, None)
        self._last_row_instant: tuple[datetime | None, Any] = (None, None)
        self._dbapi_error: type[Exception] = connection.dialect.loaded_dbapi.Error
        if self._sql.postgres:
            event.listen(session, "before_commit", self._before_commit)

    # -- talking to the driver ---------------------------------------------------------------

    @contextlib.contextmanager
    def _driver_errors(self, statement: str) -> Iterator[None]:
        """Driver errors as SQLAlchemy's own (`IntegrityError`, `OperationalError`, ...), so
        the unit of work's callers see what they see from the ORM: `96`, or a retry."""
        try:
            yield
        except self._dbapi_error as error:
            raise self._wrapped(statement, error) from error

    def _wrapped(self, statement: str, error: Exception) -> Exception:
        return DBAPIError.instance(statement, None, error, self._dbapi_error, hide_parameters=True)

    def _execute(self, statement: str, parameters: Sequence[Any], *, many: bool = False) -> Any:
        """Run one statement on the main cursor; on PostgreSQL the writes held back so far go
        first, in the same round trip. (Plain try/except rather than `_driver_errors`: this
        runs a dozen times per redemption.)"""
        cursor = self._cursor
        try:
            if self._deferred:
                with self._driver.pipeline():
                    self._send_deferred()
                    (cursor.executemany if many else cursor.execute)(statement, parameters)
            elif many:
                cursor.executemany(statement, parameters)
            else:
                cursor.execute(statement, parameters)
        except self._dbapi_error as error:
            raise self._wrapped(statement, error) from error
        return cursor

    def _send_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        writer = self._driver.cursor()
        for statement, parameters in deferred:
            writer.execute(statement, parameters)

    def _before_commit(self, session: Session) -> None:
        """The writes still held back go out before the commit (or fail it); with them the
        COMMIT itself, in the same round trip, when the ORM has nothing left to flush (it
        flushes after this hook). The driver then knows the transaction ended, and the
        connection's own commit sends nothing. A link that breaks during that round trip
        leaves the commit's outcome unknown (`CommitOutcomeUnknownError`), as it does during
        a COMMIT sent alone."""
        if not self._deferred:
            return
        # Not at a savepoint's release (SQLAlchemy calls this hook there too), and not with
        # ORM changes still to flush after it.
        committing = not (
            session.in_nested_transaction() or session.new or session.dirty or session.deleted
        )
        try:
            with self._driver.pipeline():
                self._send_deferred()
                if committing:
                    self._driver.cursor().execute("COMMIT")
        except self._dbapi_error as error:
            if committing and (self._driver.broken or self._driver.closed):
                # Given up, as SQLAlchemy gives up a connection it finds gone: the rollback
                # that follows then sends nothing, and cannot hide this error behind its own.
                self._connection.invalidate(error)
                raise CommitOutcomeUnknownError(
                    f"the link broke during COMMIT: {type(error).__name__}"
                ) from error
            raise self._wrapped("deferred writes", error) from error

    # -- reading ---------------------------------------------------------------------------

    def _rows(self, statement: str, parameters: tuple[Any, ...]) -> list[Any]:
        cursor = None
        if self._prefetched:
            cursor = self._prefetched.pop((statement, _hashable(parameters)), None)
        if cursor is None:
            cursor = self._execute(statement, parameters)
        try:
            return list(cursor.fetchall())
        except self._dbapi_error as error:
            raise self._wrapped(statement, error) from error

    def _one(self, statement: str, parameters: tuple[Any, ...]) -> Any:
        rows = self._rows(statement, parameters)
        return rows[0] if rows else None

    def prefetch_redemption(
        self,
        swipe: Swipe,
        number: str,
        *,
        daily_limit: bool,
        identity: RequestIdentity | None = None,
    ) -> None:
        """Send every read a redemption will make at once (PostgreSQL: one pipeline, one round
        trip; SQLite has no round trips to save, so nothing is sent ahead there). The reads
        then answer from what came back, in the order the decision asks for them."""
        if not self._sql.postgres:
            return
        self._prefetched.clear()
        reads: list[tuple[str, tuple[Any, ...]]] = [
            (self._sql.tombstone, (swipe.terminal_id, swipe.batch_number, swipe.trace)),
            (self._sql.card, (number,)),
            (self._sql.lots, (number,)),
            (self._sql.batch_count, (swipe.terminal_id, swipe.batch_number, "redemption")),
        ]
        if swipe.terminal_id not in self._terminals:
            reads.append((self._sql.terminal, (swipe.terminal_id,)))
        if daily_limit:
            reads.append((self._sql.redeemed_on, (number, swipe.when.business_date)))
        if identity is not None:
            reads.append((self._sql.find_request, _identity_row(identity)))
        with self._driver_errors("prefetch"), self._driver.pipeline():
            self._send_deferred()
            for statement, parameters in reads:
                cursor = self._driver.cursor()
                cursor.execute(statement, parameters)
                self._prefetched[(statement, parameters)] = cursor

    def find_request(self, identity: RequestIdentity) -> LoggedAnswer | None:
        row = self._one(self._sql.find_request, _identity_row(identity))
        if row is None:
            return None
        answer = row[1] if isinstance(row[1], dict) else json.loads(row[1])
        return LoggedAnswer(bytes(row[0]), answer)

    @property
    def locks_rows(self) -> bool:
        """Whether groups lock rows (PostgreSQL), so that `lock_group` has work to do; on
        SQLite the unit of work holds the one write lock."""
        return self._sql.postgres

    def lock_group(
        self,
        terminal_ids: Iterable[str],
        numbers: Iterable[str],
        *,
        month: str | None = None,
        generations_of: Sequence[str] = (),
        run: RunReads | None = None,
        terminals_held: bool = False,
    ) -> None:
        """Lock a group's terminals and cards at its start, in one order for every group
        (PostgreSQL; SQLite's unit of work holds the one write lock). With `terminals_held`,
        `lock_terminals` took the terminals' locks already, and only the cards' are taken.

        Each request locks its card as it runs, and rows keyed by its terminal (the batch's
        count, the request log, a reversal's tombstone, the terminal's row at settlement)
        as it writes them. Two gateway processes whose groups take the same ones in
        different orders would deadlock, and PostgreSQL would break it only after
        `deadlock_timeout` (1 s). Taking them all first, in sorted order, makes every group
        queue in the same order instead: the terminals as transaction-scoped advisory locks
        (`terminal_lock_key`; no row is written), then the cards' rows. A terminal is in
        two groups at once only when it has links to two processes.

        Groups of one request take them too: the terminal's lock is what makes a reversal on
        one process wait for its original still uncommitted on another (which it would not
        see, under READ COMMITTED, and would take for one never received).

        The reads every transaction makes next, after the locks, go in the same round trip:
        whether `month` is closed (`month_closed`) and the generations of `generations_of`
        (`session_generations`), and the reads of the group's first run of redemptions
        (`run`, `read_group`); those calls then answer from what came back. Every round trip
        here is time the group holds its cards' locks while another group waits. A run that
        turns out shorter (a request left out because its keys ended) reads again.

        Not sent ahead: the ids `write_group` takes from the sequences. How many the run
        needs is known only once it is decided, and ids taken and left unused would leave
        gaps in the RRNs that a run's requests, answered one by one, would not."""
        keys = sorted({terminal_lock_key(terminal_id) for terminal_id in terminal_ids})
        ordered = sorted(numbers)
        if self._sql.postgres:
            reads = [] if terminals_held else self._terminal_locks(keys)
            reads.append((self._sql.lock_cards, (ordered,)))
            ahead: list[tuple[str, tuple[Any, ...]]] = []
            if month is not None:
                ahead.append((self._sql.month_closed, (month,)))
            if generations_of:
                ahead.append((self._sql.session_generations, (list(generations_of),)))
            if run is not None:
                ahead += self._group_reads(run)
            cursors = self._send_all(reads + ahead)[len(reads) :]
            self._prefetched.clear()
            for (statement, parameters), cursor in zip(ahead, cursors, strict=True):
                self._prefetched[(statement, _hashable(parameters))] = cursor

    def lock_terminals(self, terminal_ids: Iterable[str]) -> None:
        """`lock_group`'s first locks alone, the close's and the terminals', for a group with
        a reversal: its original's card is known only once its terminal's lock is held. An
        original still uncommitted on another process holds that lock; read before, the
        original is not there, its card is not locked with the group's, and the reversal
        then locks it out of order, behind cards the group holds: another group holding it
        and waiting for one of those deadlocks with this one (PostgreSQL breaks it after
        `deadlock_timeout`, a second in which neither answers). Read after, the original is
        committed, or not sent yet (its terminal waits for this group). One round trip
        more, for groups with a reversal only."""
        if self._sql.postgres:
            keys = sorted({terminal_lock_key(terminal_id) for terminal_id in terminal_ids})
            self._send_all(self._terminal_locks(keys))

    def _terminal_locks(self, keys: list[int]) -> list[tuple[str, tuple[Any, ...]]]:
        return [
            # Shared: gateways never wait for each other on it, only for a month's close.
            (self._sql.lock_close_shared, (CLOSE_LOCK_KEY,)),
            (self._sql.lock_terminals, (keys,)),
        ]

    def month_closed(self, month: str) -> bool:
        """Whether clearing has closed the month ("YYYY-MM") whose business dates it settles."""
        return self._one(self._sql.month_closed, (month,)) is not None

    def tombstone_exists(self, terminal_id: str, batch_number: int, trace: int) -> bool:
        return self._one(self._sql.tombstone, (terminal_id, batch_number, trace)) is not None

    def lock_card(self, number: str) -> tuple[CardSnapshot, int] | None:
        """The card (locked on PostgreSQL) and its journal account id."""
        row = self._one(self._sql.card, (number,))
        if row is None:
            return None
        return _snapshot(row), int(row[8])

    def _terminal(self, terminal_id: str) -> tuple[str, int]:
        known = self._terminals.get(terminal_id)
        if known is None:
            row = self._one(self._sql.terminal, (terminal_id,))
            if row is None:
                raise LookupError(f"terminal {terminal_id} is not in the ledger")
            known = self._terminals[terminal_id] = (row[0], int(row[1]))
        return known

    def open_batch(self, terminal_id: str) -> int:
        """The terminal's open batch number. Read once per unit of work: only a settlement
        changes it, and settlements go through the ORM path, which starts a new one."""
        return self._terminal(terminal_id)[1]

    def session_generations(self, terminal_ids: Sequence[str]) -> dict[str, int]:
        """The generation of the sign-on the ledger holds now for each of these terminals
        that has one, read in this unit of work (on SQLite: under its write lock)."""
        rows = self._rows(self._sql.session_generations, self._keys(list(terminal_ids)))
        return {str(terminal_id): int(generation) for terminal_id, generation in rows}

    def request_done(self, *, terminals_changed: bool) -> None:
        """Between two requests of a group: reads sent ahead and not used are dropped, and
        after the ORM path (a settlement opens a new batch) terminals are read again."""
        self._prefetched.clear()
        if terminals_changed:
            self._terminals.clear()

    def batch_count(self, terminal_id: str, batch_number: int, kinds: Iterable[str]) -> int:
        """Approved, unreversed authorisations of these kinds in a batch (§4.7's counts)."""
        return sum(
            int(self._one(self._sql.batch_count, (terminal_id, batch_number, kind))[0])
            for kind in kinds
        )

    def batch_debit_fen(self, terminal_id: str, batch_number: int) -> int | None:
        """The batch's debit amount so far, as its settlement will add it (§4.7)."""
        return int(self._one(self._sql.batch_debit, (terminal_id, batch_number))[0])

    def batch_credit_fen(self, terminal_id: str, batch_number: int) -> int:
        """The batch's credit amount so far (voids and refunds), as settlement adds it."""
        return int(self._one(self._sql.batch_credit, (terminal_id, batch_number))[0])

    def points_redeemed_on(self, number: str, business_date: date) -> int:
        row = self._one(self._sql.redeemed_on, (number, self._date(business_date)))
        return int(row[0])

    def spendable_lots(self, number: str, local: datetime) -> list[Lot]:
        """The card's unexpired lots with points, locked, in spending order."""
        lots = []
        for lot_id, expires, remaining in self._rows(self._sql.lots, (number,)):
            expires_on = expires if isinstance(expires, date) else date.fromisoformat(expires)
            if not lot_expired(expires_on, local):
                lots.append(Lot(int(lot_id), expires_on, int(remaining)))
        return lots

    # -- writing ---------------------------------------------------------------------------

    def _insert(self, statement: str, parameters: tuple[Any, ...]) -> int:
        cursor = self._execute(statement, parameters)
        if self._sql.postgres:
            return int(cursor.fetchone()[0])
        return int(cursor.lastrowid)

    def next_rrn(self, at: datetime) -> str:
        """A new retrieval reference number, as `journal.next_rrn` allocates it."""
        rrn = f"{self._insert(self._sql.rrn, (self._instant(at),)):0{RRN_DIGITS}d}"
        if len(rrn) != RRN_DIGITS:
            raise LedgerError("the RRN sequence is exhausted")
        return rrn

    def log_request(
        self, identity: RequestIdentity, digest: bytes, answer: dict[str, str], at: datetime
    ) -> None:
        """As `records.log_request`; the identity's uniqueness fails the commit of a twin.

        On PostgreSQL the insert is held back and goes out with the next statement or before
        the commit, saving a round trip; every read of this unit of work comes after it."""
        parameters = (*_identity_row(identity), digest, self._json(answer), self._instant(at))
        if self._sql.postgres:
            self._deferred.append((self._sql.log_request, parameters))
        else:
            self._execute(self._sql.log_request, parameters)

    def record_authorisation(
        self,
        swipe: Swipe,
        kind: AuthorisationKind,
        *,
        card_number: str | None,
        requested_amount_fen: int | None,
        response_code: str,
    ) -> Recorded:
        """As `records.record_authorisation`: an answer that moved no points."""
        state = "approved" if response_code in APPROVED_CODES else "declined"
        rrn = self.next_rrn(swipe.when.at)
        row = _Authorisation(kind, rrn, None, card_number, response_code, state, None)
        return Recorded(self._authorisation(swipe, row, (requested_amount_fen, 0, 0)), rrn)

    def _authorisation(
        self,
        swipe: Swipe,
        row: _Authorisation,
        amounts: tuple[int | None, int, int],
        conversion: tuple[str | None, int, int, int] = (None, 0, 0, 0),
    ) -> int:
        """Insert an authorisation: `amounts` are (requested, A, d), `conversion` is
        (rule, D, P, fee in force)."""
        when = swipe.when
        self._terminal(swipe.terminal_id)  # known to the ledger
        return self._insert(
            self._sql.authorisation,
            (
                row.rrn,
                row.kind.value,
                swipe.terminal_id,
                swipe.merchant_id,
                swipe.batch_number,
                swipe.trace,
                row.auth_code,
                row.card_number,
                *amounts,
                *conversion,
                row.response_code,
                self._instant(when.at),
                self._date(when.business_date),
                None,
                row.state,
                row.transaction_id,
                None,
            ),
        )

    def redeem(
        self,
        swipe: Swipe,
        card: tuple[str, int],
        lots: Sequence[Lot],
        conversion: Conversion,
        *,
        requested_amount_fen: int,
        rule_id: str | None,
        fee_bp: int,
        auth_code: str,
        response_code: str,
    ) -> Redeemed | Declined:
        """As `operations.redeem`, on lots read (and locked) by `spendable_lots` in this unit
        of work: card -> redemption in the journal, points taken earliest-expiring first."""
        spent = _taking(lots, conversion.points, response_code)
        if isinstance(spent, Declined):
            return spent
        shares, available = spent
        number, account_id = card
        points = conversion.points
        amounts = (requested_amount_fen, conversion.amount_fen, conversion.discount_bp)
        figures = (rule_id, conversion.settled_fen, points, fee_bp)
        row = _Authorisation(
            AuthorisationKind.REDEMPTION, "", auth_code, number, response_code, "approved", None
        )
        if self._sql.postgres:
            authorisation_id, rrn, transaction_id = self._redeem_in_one(
                swipe, card, row, amounts + figures, shares
            )
        else:
            rrn = self.next_rrn(swipe.when.at)
            transaction_id = self._post(swipe, number, account_id, points)
            row = row._replace(rrn=rrn, transaction_id=transaction_id)
            authorisation_id = self._authorisation(swipe, row, amounts, figures)
            self._take(shares, transaction_id, authorisation_id)
        taken = tuple(LotChange(lot.id, amount, lot.expires_on) for lot, amount in shares)
        return Redeemed(authorisation_id, rrn, transaction_id, taken, available - points)

    def _post(self, swipe: Swipe, number: str, account_id: int, points: int) -> int:
        when: Moment = swipe.when
        transaction_id = self._insert(
            self._sql.transaction,
            (
                swipe.key(RequestClass.REQUEST),
                "redemption",
                self._instant(when.at),
                self._date(when.business_date),
                number,
            ),
        )
        other = self._system_account("redemption")
        legs = [(transaction_id, account_id, -points), (transaction_id, other, points)]
        self._execute(self._sql.entry, legs, many=True)
        return transaction_id

    def _take(
        self, shares: Sequence[tuple[Lot, int]], transaction_id: int, redemption_id: int
    ) -> None:
        for lot, amount in shares:
            if self._execute(self._sql.take, (amount, lot.id, amount)).rowcount != 1:
                raise LedgerError(f"lot {lot.id} changed under its lock")
        movements = [
            (transaction_id, lot.id, -amount, redemption_id, lot.id) for lot, amount in shares
        ]
        self._execute(self._sql.movement, movements, many=True)

    def _redeem_in_one(
        self,
        swipe: Swipe,
        card: tuple[str, int],
        row: _Authorisation,
        figures: tuple[int | None, int, int, str | None, int, int, int],
        shares: Sequence[tuple[Lot, int]],
    ) -> tuple[int, str, int]:
        """PostgreSQL: the RRN, the journal posting, the authorisation, the lot changes and
        their movements in one statement (one round trip), as the SQLite path writes them."""
        number, account_id = card
        when = swipe.when
        self._terminal(swipe.terminal_id)  # known to the ledger
        points = figures[5]
        parameters: list[Any] = [when.at, swipe.key(RequestClass.REQUEST), when.at]
        parameters += [when.business_date, number]
        parameters += [account_id, -points, self._system_account("redemption"), points]
        parameters += [swipe.terminal_id, swipe.merchant_id, swipe.batch_number, swipe.trace]
        parameters += [row.auth_code, number, *figures, row.response_code, when.at]
        parameters += [when.business_date]
        for lot, amount in shares:
            parameters += [lot.id, amount]
        statement = _redemption_statement(len(shares))
        cursor = self._execute(statement, tuple(parameters))
        with self._driver_errors(statement):
            authorisation_id, rrn, transaction_id, rrn_id, moved = cursor.fetchone()
        if rrn_id >= 10**RRN_DIGITS:
            raise LedgerError("the RRN sequence is exhausted")
        if moved != len(shares):
            raise LedgerError("a lot changed under its lock")
        return int(authorisation_id), str(rrn), int(transaction_id)

    def _system_account(self, kind: str) -> int:
        account = self._system_accounts.get(kind)
        if account is None:
            row = self._one(self._sql.system_account, (kind,))
            if row is None:
                raise LedgerError(f"the {kind} system account is missing")
            account = self._system_accounts[kind] = int(row[0])
        return account

    # -- a run of redemptions at once ------------------------------------------------------

    def read_group(
        self,
        requests: Sequence[tuple[Swipe, str, RequestIdentity]],
        *,
        daily_limit: bool,
        business_date: date,
    ) -> GroupView:
        """Everything a run of redemptions (swipe, card number, identity) reads, in one
        statement per table (PostgreSQL: all in one round trip, or none when `lock_group`
        sent them), cards and lots locked."""
        run = RunReads(requests, daily_limit, business_date)
        numbers = run.numbers()
        terminals = run.terminals(self._terminals)
        results = self._read_all(self._group_reads(run, numbers, terminals))
        if terminals:
            for terminal_id, merchant_id, open_batch in results.pop():
                self._terminals[terminal_id] = (merchant_id, int(open_batch))
        redeemed = {row[0]: int(row[1]) for row in results.pop()} if daily_limit else {}
        logged, tombstones, cards, lots, counts = results
        held: dict[str, list[Lot]] = {}
        for number, lot_id, expires, remaining in lots:
            expires_on = expires if isinstance(expires, date) else date.fromisoformat(expires)
            held.setdefault(number, []).append(Lot(int(lot_id), expires_on, int(remaining)))
        return GroupView(
            self,
            business_date,
            logged={(row[0], int(row[1]), int(row[2]), row[3]) for row in logged},
            tombstones={(row[0], int(row[1]), int(row[2])) for row in tombstones},
            cards={row[0]: (_snapshot(row), int(row[8])) for row in cards},
            lots=held,
            batch_counts={(row[0], int(row[1])): int(row[2]) for row in counts},
            redeemed=redeemed,
        )

    def _group_reads(
        self,
        run: RunReads,
        numbers: list[str] | None = None,
        terminals: list[str] | None = None,
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """`read_group`'s statements and their parameters."""
        sql = self._group_sql
        requests = run.requests
        numbers = run.numbers() if numbers is None else numbers
        terminals = run.terminals(self._terminals) if terminals is None else terminals
        identities = [_identity_row(identity) for _, _, identity in requests]
        places = [(s.terminal_id, s.batch_number, s.trace) for s, _, _ in requests]
        batches = sorted({(s.terminal_id, s.batch_number) for s, _, _ in requests})
        reads: list[tuple[str, tuple[Any, ...]]] = [
            (sql.logged, self._keys(identities)),
            (sql.tombstones, self._keys(places)),
            (sql.cards, self._keys(numbers)),
            (sql.lots, self._keys(numbers)),
            (sql.batch_counts, self._keys(batches)),
        ]
        if run.daily_limit:
            reads.append((sql.redeemed_on, (*self._keys(numbers), self._date(run.business_date))))
        if terminals:
            reads.append((sql.terminals, self._keys(terminals)))
        return reads

    def _keys(self, keys: Sequence[Any]) -> tuple[Any, ...]:
        """A run's keys as the group statements take them: one JSON array (SQLite) or one
        array per column (PostgreSQL)."""
        if not self._sql.postgres:
            return (json.dumps(keys),)
        if keys and isinstance(keys[0], tuple):
            return tuple(list(column) for column in zip(*keys, strict=True))
        return (list(keys),)

    def _read_all(self, reads: Sequence[tuple[str, tuple[Any, ...]]]) -> list[list[Any]]:
        """The rows of each read, in order; PostgreSQL sends them together, after the
        writes held back so far."""
        if not self._sql.postgres:
            return [list(self._execute(statement, p).fetchall()) for statement, p in reads]
        cursors = [self._prefetched.pop((s, _hashable(p)), None) for s, p in reads]
        if not all(cursor is not None for cursor in cursors):
            cursors = self._send_all(reads)
        with self._driver_errors("group reads"):
            return [list(cursor.fetchall()) for cursor in cursors]

    def _send_all(self, reads: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """PostgreSQL: the writes held back so far, then each read, in one round trip; a
        cursor per read, its rows fetched."""
        cursors = []
        with self._driver_errors("group reads"), self._driver.pipeline():
            self._send_deferred()
            for statement, parameters in reads:
                cursor = self._driver.cursor()
                cursor.execute(statement, parameters)
                cursors.append(cursor)
        return cursors

    def _new_ids(self, counts: dict[str, int]) -> dict[str, list[int]]:
        """Fresh ids for rows about to be inserted: from the sequences on PostgreSQL; on
        SQLite after the highest in use (the unit of work holds the write lock)."""
        tables = list(counts)
        statements = self._group_sql.next_ids
        if self._sql.postgres:
            reads = [(statements[table], (counts[table],)) for table in tables]
            return {
                table: [int(row[0]) for row in rows]
                for table, rows in zip(tables, self._read_all(reads), strict=True)
            }
        highest = self._execute("SELECT " + ", ".join(statements[t] for t in tables), ()).fetchone()
        return {
            table: list(range(int(base) + 1, int(base) + 1 + counts[table]))
            for table, base in zip(tables, highest, strict=True)
        }

    def write_group(self, planned: Sequence[PlannedRedemption]) -> list[str]:
        """Write a run of planned redemptions, one statement per table, exactly the rows
        `redeem` writes for each; their RRNs, in order."""
        if not planned:
            return []
        sql = self._group_sql
        count = len(planned)
        ids = self._new_ids(
            {"rrn_allocations": count, "journal_transactions": count, "authorisations": count}
        )
        system = self._system_account("redemption")
        rrn_rows, transactions, entries, authorisations, movements = [], [], [], [], []
        taken: dict[int, int] = {}
        rrns = []
        for plan, rrn_id, transaction_id, authorisation_id in zip(
            planned,
            ids["rrn_allocations"],
            ids["journal_transactions"],
            ids["authorisations"],
            strict=True,
        ):
            swipe = plan.swipe
            at = self._row_instant(swipe.when.at)
            day = swipe.when.business_date.isoformat()  # both backends take the text
            number, account_id = plan.card
            points = plan.figures[2]
            rrn = f"{rrn_id:0{RRN_DIGITS}d}"
            if len(rrn) != RRN_DIGITS:
                raise LedgerError("the RRN sequence is exhausted")
            rrns.append(rrn)
            rrn_rows.append((rrn_id, at))
            key = swipe.key(RequestClass.REQUEST)
            transactions.append((transaction_id, key, at, day, number))
            entries += [(transaction_id, account_id, -points), (transaction_id, system, points)]
            self._terminal(swipe.terminal_id)  # known to the ledger
            where = (swipe.terminal_id, swipe.merchant_id, swipe.batch_number, swipe.trace)
            row: tuple[Any, ...] = (authorisation_id, rrn, *where, plan.auth_code, number)
            row += plan.amounts
            row += (*plan.figures, plan.response_code, at, day, transaction_id)
            authorisations.append(row)
            for lot, amount in plan.shares:
                taken[lot.id] = taken.get(lot.id, 0) + amount
                movements.append((transaction_id, lot.id, -amount, authorisation_id, lot.id))
        writes: list[tuple[str, list[tuple[Any, ...]]]] = [
            (sql.rrn, rrn_rows),
            (sql.transaction, transactions),
            (self._sql.entry, entries),
            (sql.authorisation, authorisations),
            (self._sql.take, [(amount, lot_id, amount) for lot_id, amount in taken.items()]),
            (self._sql.movement, movements),
        ]
        changed = self._write_all(writes)[4]
        if changed != len(taken):
            raise LedgerError("a lot changed under its lock")
        return rrns

    def _write_all(self, writes: Sequence[tuple[str, list[tuple[Any, ...]]]]) -> list[int]:
        """Each statement over its rows; the rows each changed (PostgreSQL: one round trip)."""
        if not self._sql.postgres:
            return [self._execute(sql, rows, many=True).rowcount for sql, rows in writes]
        cursors = []
        statements = self._group_sql.rows
        with self._driver_errors("group writes"), self._driver.pipeline():
            self._send_deferred()
            for statement, rows in writes:
                cursor = self._driver.cursor()
                if rows:
                    cursor.execute(statements[statement], (_rows_json(rows),))
                cursors.append(cursor if rows else None)
        return [0 if cursor is None else cursor.rowcount for cursor in cursors]

    def log_requests(
        self, entries: Sequence[tuple[RequestIdentity, bytes, dict[str, str], datetime]]
    ) -> None:
        """`log_request` for a run's requests, in one statement (held back on PostgreSQL)."""
        if not entries:
            return
        if self._sql.postgres:  # one statement over a JSON array of rows, sent with the next
            texts = [
                (*_identity_row(identity), digest.hex(), json.dumps(answer), self._row_instant(at))
                for identity, digest, answer, at in entries
            ]
            statement = self._group_sql.rows[self._sql.log_request]
            self._deferred.append((statement, (_rows_json(texts),)))
            return
        rows = [
            (*_identity_row(identity), digest, self._json(answer), self._instant(at))
            for identity, digest, answer, at in entries
        ]
        self._execute(self._sql.log_request, rows, many=True)

    # -- values in the forms SQLAlchemy's types store ------------------------------------------

    def _instant(self, at: datetime) -> Any:
        if self._last_instant[0] is at:  # one request stores its instant several times
            return self._last_instant[1]
        _aware(at)
        stored: Any = at
        if not self._sql.postgres:
            stored = at.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
        self._last_instant = (at, stored)
        return stored

    def _row_instant(self, at: datetime) -> Any:
        """An instant as a group's rows carry it: `_instant`'s form on SQLite; on PostgreSQL
        ISO 8601 text with its offset, for `_rows_json`, which would otherwise call back into
        Python for every instant of every row."""
        if not self._sql.postgres:
            return self._instant(at)
        if self._last_row_instant[0] is at:
            return self._last_row_instant[1]
        text = _aware(at).isoformat()
        self._last_row_instant = (at, text)
        return text

    def _date(self, day: date) -> Any:
        return day if self._sql.postgres else day.isoformat()

    def _json(self, value: dict[str, str]) -> Any:
        if self._sql.postgres:
            from psycopg.types.json import Json  # noqa: PLC0415 (PostgreSQL only)

            return Json(value)
        return json.dumps(value)


# The advisory lock of a month's close on PostgreSQL: every gateway transaction holds it shared
# (`HotLedger.lock_group`), and `clear` takes it exclusively before its snapshot, so the close
# sees every transaction that began before it, and none begins during it.
CLOSE_LOCK_KEY = 0x76697063_6C6F7365  # "vipclose"


def terminal_lock_key(terminal_id: str) -> int:
    """The advisory lock key of a terminal (`HotLedger.lock_group`): 64 bits of its id's
    BLAKE2b digest, signed as PostgreSQL's bigint is. Two ids sharing a key only queue
    behind each other; the keys are taken in sorted order, so no cycle can form."""
    digest = hashlib.blake2b(terminal_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("a naive datetime cannot be stored; give it a time zone")
    return at


def _hashable(parameters: tuple[Any, ...]) -> tuple[Any, ...]:
    """A statement's parameters as a key of `HotLedger._prefetched` (arrays as tuples)."""
    return tuple(tuple(value) if isinstance(value, list) else value for value in parameters)


def _rows_json(rows: Sequence[tuple[Any, ...]]) -> str:
    """Rows as one JSON array of arrays, for a statement over `_JSON_ROWS`. The rows carry
    JSON's own types only: instants, dates and bytes come as text (`_row_instant`,
    `isoformat`, `hex`), so the encoder never calls back into Python."""
    return json.dumps(rows, separators=(",", ":"))


def _snapshot(row: Sequence[Any]) -> CardSnapshot:
    """A card row (number, expiry, tier, status, enrolled, PIN, tries, locked) as decided on."""
    return CardSnapshot(
        number=row[0],
        expiry_yymm=row[1],
        tier=row[2],
        status=row[3],
        enrolled=bool(row[4]),
        pin_hmac=bytes(row[5]) if row[5] is not None else None,
        wrong_pin_count=int(row[6]),
        pin_locked=bool(row[7]),
    )


def _identity_row(identity: RequestIdentity) -> tuple[str, int, int, str]:
    return (
        identity.terminal_id,
        identity.batch_number,
        identity.trace,
        identity.request_class.value,
    )


def _taking(
    lots: Sequence[Lot], points: int, response_code: str
) -> tuple[list[tuple[Lot, int]], int] | Declined:
    """What an approved redemption of `points` takes from each lot, and the points the lots
    held; or why it cannot be taken."""
    if response_code not in APPROVED_CODES:
        raise ValueError("a redemption is written only when approved")
    if points <= 0:
        return Declined(Decline.NO_POINTS)
    available = sum(lot.remaining_points for lot in lots)
    if available < points:
        return Declined(Decline.NOT_ENOUGH_POINTS)
    return _spend(lots, points), available


def _spend(lots: Sequence[Lot], points: int) -> list[tuple[Lot, int]]:
    """How many points to take from each lot, in the order given (the spending order)."""
    left = points
    shares = []
    for lot in lots:
        if left == 0:
            break
        amount = min(lot.remaining_points, left)
        if amount:
            shares.append((lot, amount))
            left -= amount
    if left:
        raise LedgerError("the lots given hold fewer points than were to be taken")
    return shares


@functools.cache
def _redemption_statement(lot_count: int) -> str:
    """The PostgreSQL statement of `HotLedger._redeem_in_one` for a number of lots taken.

    Data-modifying CTEs share one snapshot: the lots were locked by `spendable_lots`, and a
    lot whose points fell short of its share would not be updated, so the movements are
    counted and the caller refuses a count that differs."""
    lots = ", ".join(f"({n}, %s::bigint, %s::bigint)" for n in range(lot_count))
    return (
        "WITH r AS (INSERT INTO rrn_allocations (allocated_at) VALUES (%s) RETURNING id),"
        " t AS (INSERT INTO journal_transactions (idempotency_key, kind, created_at,"
        " business_date, card_number) VALUES (%s, 'redemption', %s, %s, %s) RETURNING id),"
        " e AS (INSERT INTO journal_entries (transaction_id, account_id, points)"
        " SELECT t.id, v.account_id, v.points FROM t,"
        " (VALUES (0, %s::bigint, %s::bigint), (1, %s::bigint, %s::bigint))"
        " AS v(n, account_id, points) ORDER BY v.n),"
        " a AS (INSERT INTO authorisations (rrn, kind, terminal_id, merchant_id, batch_number,"
        " trace, auth_code, card_number, requested_amount_fen, amount_fen, discount_bp,"
        " rule_id, settled_fen, points, fee_bp, response_code, local_time, business_date,"
        " original_id, state, refunded_fen, points_returned, fen_clawed,"
        " journal_transaction_id, exception)"
        " SELECT lpad(r.id::text, 12, '0'), 'redemption', %s::varchar, %s::varchar,"
        " %s::integer, %s::integer, %s::varchar, %s::varchar, %s::bigint, %s::bigint,"
        " %s::integer, %s::varchar, %s::bigint, %s::bigint, %s::integer, %s::varchar,"
        " %s::timestamptz, %s::date, NULL, 'approved', 0, 0, 0, t.id, NULL FROM r, t"
        " RETURNING id, rrn),"
        f" v(n, lot_id, amount) AS (VALUES {lots}),"
        " u AS (UPDATE point_lots p SET remaining_points = p.remaining_points - v.amount"
        " FROM v WHERE p.id = v.lot_id AND p.remaining_points >= v.amount RETURNING p.id),"
        " m AS (INSERT INTO lot_movements (transaction_id, lot_id, points, redemption_id,"
        " origin_lot_id) SELECT t.id, v.lot_id, -v.amount, a.id, v.lot_id"
        " FROM v JOIN u ON u.id = v.lot_id CROSS JOIN a CROSS JOIN t ORDER BY v.n"
        " RETURNING id)"
        " SELECT a.id, a.rrn, t.id, r.id, (SELECT count(*) FROM m) FROM a, r, t"
    )


def hot_ledger(session: Session) -> HotLedger:
    """The unit of work's driver-level ledger, made on first use and kept with the session.

    Pending ORM changes are flushed first, so the driver's statements see everything the
    unit of work did so far."""
    if session.new or session.dirty or session.deleted:
        session.flush()
    ledger = session.info.get(_INFO_KEY)
    if ledger is None:
        ledger = session.info[_INFO_KEY] = HotLedger(session)
    return ledger


def request_done(session: Session, *, terminals_changed: bool) -> None:
    """See `HotLedger.request_done`; nothing to do when the hot path was not used."""
    ledger = session.info.get(_INFO_KEY)
    if ledger is not None:
        ledger.request_done(terminals_changed=terminals_changed)


__all__ = [
    "CLOSE_LOCK_KEY",
    "GroupView",
    "HotLedger",
    "LoggedAnswer",
    "Lot",
    "PlannedRedemption",
    "hot_ledger",
    "request_done",
]

"""The ledger's tables, as SQLAlchemy 2 typed models.

One schema serves SQLite and PostgreSQL alike, so every column type here is one both backends
store exactly: integers (BIGINT) for points and fen, dates, timezone-aware instants kept in UTC
(`UtcDateTime`), short strings checked by constraints, bytes for digests and encrypted keys,
and JSON only for data the ledger never computes with (merchant rules, stored answers).

The schema is the contract the migrations create; `migrations/versions/` must agree with it,
and a test compares the two.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Identifiers that grow without bound are 64-bit on PostgreSQL; SQLite's rowid is 64-bit
# already and only an INTEGER PRIMARY KEY column is its rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware instant, stored in UTC and read back aware (UTC) on both backends.

    SQLite has no time zone type and would silently drop the offset; PostgreSQL's timestamptz
    keeps it. Refusing naive datetimes here keeps a local wall-clock time from ever being
    stored as if it were UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("a naive datetime cannot be stored; give it a time zone")
        in_utc = value.astimezone(UTC)
        return in_utc.replace(tzinfo=None) if dialect.name == "sqlite" else in_utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _enum(kind: type[enum.Enum]) -> Enum:
    """A string column limited to an enum's values, with a CHECK constraint on both backends."""
    return Enum(
        kind,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
        name=kind.__name__.lower(),
    )


class CardStatus(enum.Enum):
    ACTIVE = "active"
    LOST = "lost"
    STOLEN = "stolen"
    BLOCKED = "blocked"
    CLOSED = "closed"


class AccountKind(enum.Enum):
    CARD = "card"
    ACCRUAL = "accrual"
    REDEMPTION = "redemption"
    EXPIRY = "expiry"
    ADJUSTMENT = "adjustment"


class TransactionKind(enum.Enum):
    ACCRUAL = "accrual"
    REDEMPTION = "redemption"
    VOID = "void"
    REFUND = "refund"
    REVERSAL = "reversal"
    VOID_REVERSAL = "void_reversal"
    EXPIRY = "expiry"
    ADJUSTMENT = "adjustment"


class LotOrigin(enum.Enum):
    ACCRUAL = "accrual"
    RESTORE = "restore"


class AuthorisationKind(enum.Enum):
    REDEMPTION = "redemption"
    VOID = "void"
    REFUND = "refund"
    REVERSAL = "reversal"
    BALANCE = "balance"


class AuthorisationState(enum.Enum):
    APPROVED = "approved"
    VOIDED = "voided"
    REVERSED = "reversed"
    DECLINED = "declined"


class KeySuite(enum.Enum):
    TDES = "3des"
    SM4 = "sm4"


class BatchResult(enum.Enum):
    BALANCED = "balanced"
    UNBALANCED = "unbalanced"


class RequestClass(enum.Enum):
    REQUEST = "request"
    REVERSAL = "reversal"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Card(Base):
    """A VIP card. Its points are in its lots and its account; never a column here."""

    __tablename__ = "cards"

    number: Mapped[str] = mapped_column(String(19), primary_key=True)
    expiry_yymm: Mapped[str] = mapped_column(String(4))
    tier: Mapped[str] = mapped_column(String(16))
    status: Mapped[CardStatus] = mapped_column(_enum(CardStatus))
    enrolled: Mapped[bool] = mapped_column(Boolean, default=False)
    enrolled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # An HMAC of the PIN under the master key, computed by the caller; never the PIN.
    pin_hmac: Mapped[bytes | None] = mapped_column(LargeBinary(64))
    wrong_pin_count: Mapped[int] = mapped_column(Integer, default=0)
    pin_locked: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (CheckConstraint("wrong_pin_count >= 0", name="wrong_pin_count"),)


class Account(Base):
    """A journal account: one per card, plus the system accounts (accrual, redemption, ...)."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[AccountKind] = mapped_column(_enum(AccountKind))
    card_number: Mapped[str | None] = mapped_column(ForeignKey("cards.number"), unique=True)

    __table_args__ = (
        CheckConstraint(
            "(kind = 'card') = (card_number IS NOT NULL)", name="card_account_has_card"
        ),
        # At most one system account of each kind: card_number is NULL for all of them, so
        # the kind itself is made unique among them by this partial index.
        Index(
            "uq_accounts_system_kind",
            "kind",
            unique=True,
            sqlite_where=text("card_number IS NULL"),
            postgresql_where=text("card_number IS NULL"),
        ),
    )


class JournalTransaction(Base):
    """One atomic change of the points ledger; its entries sum to zero."""

    __tablename__ = "journal_transactions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(120), unique=True)
    kind: Mapped[TransactionKind] = mapped_column(_enum(TransactionKind))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    business_date: Mapped[date] = mapped_column(Date)
    card_number: Mapped[str | None] = mapped_column(ForeignKey("cards.number"))


class JournalEntry(Base):
    """One leg of a transaction: signed points on one account (credit +, debit -)."""

    __tablename__ = "journal_entries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    transaction_id: Mapped[int] = mapped_column(ForeignKey("journal_transactions.id"), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    points: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (CheckConstraint("points <> 0", name="points_nonzero"),)


class PointLot(Base):
    """Points a card received together, with one expiry date."""

    __tablename__ = "point_lots"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    card_number: Mapped[str] = mapped_column(ForeignKey("cards.number"), index=True)
    origin: Mapped[LotOrigin] = mapped_column(_enum(LotOrigin))
    earned_on: Mapped[date] = mapped_column(Date)
    expires_on: Mapped[date] = mapped_column(Date)
    original_points: Mapped[int] = mapped_column(BigInteger)
    remaining_points: Mapped[int] = mapped_column(BigInteger)
    # An accrual's source_ref from the billing feed (applied at most once ever), or for a lot
    # made to receive returned points, the idempotency key of the transaction that made it.
    source_ref: Mapped[str] = mapped_column(String(120))
    created_by_transaction_id: Mapped[int] = mapped_column(ForeignKey("journal_transactions.id"))

    __table_args__ = (
        UniqueConstraint("origin", "source_ref"),
        CheckConstraint("original_points > 0", name="original_positive"),
        CheckConstraint("remaining_points >= 0", name="remaining_not_negative"),
        CheckConstraint("remaining_points <= original_points", name="remaining_within_original"),
    )


class LotMovement(Base):
    """Points that entered (+) or left (-) one lot in one transaction.

    `origin_lot_id` is the lot the points were first taken from, for the movements of a
    redemption and everything that undoes it; it differs from `lot_id` only when points
    returned to an expired lot went into a new one. Together with `redemption_id` it tells,
    lot by lot, how many points a redemption still holds.
    """

    __tablename__ = "lot_movements"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    transaction_id: Mapped[int] = mapped_column(ForeignKey("journal_transactions.id"))
    lot_id: Mapped[int] = mapped_column(ForeignKey("point_lots.id"))
    points: Mapped[int] = mapped_column(BigInteger)
    redemption_id: Mapped[int | None] = mapped_column(ForeignKey("authorisations.id"), index=True)
    origin_lot_id: Mapped[int | None] = mapped_column(ForeignKey("point_lots.id"))

    __table_args__ = (CheckConstraint("points <> 0", name="points_nonzero"),)


class Merchant(Base):
    """A partner merchant, its fees, limits and discount rules (rules kept as config JSON)."""

    __tablename__ = "merchants"

    id: Mapped[str] = mapped_column(String(15), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    active: Mapped[bool] = mapped_column(Boolean)
    fee_bp: Mapped[int] = mapped_column(Integer)
    bank_card_fee_bp: Mapped[int] = mapped_column(Integer)
    allow_partial: Mapped[bool] = mapped_column(Boolean)
    refund_window_days: Mapped[int] = mapped_column(Integer)
    max_amount_fen: Mapped[int] = mapped_column(BigInteger)
    rules: Mapped[list[dict[str, Any]]] = mapped_column(JSON)

    __table_args__ = (
        CheckConstraint("fee_bp >= 0 AND fee_bp <= bank_card_fee_bp", name="fee_within_bank"),
    )


class MerchantActiveChange(Base):
    """Append-only: every value `merchants.active` took, from when."""

    __tablename__ = "merchant_active_history"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    merchant_id: Mapped[str] = mapped_column(ForeignKey("merchants.id"), index=True)
    active: Mapped[bool] = mapped_column(Boolean)
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Terminal(Base):
    """A POS terminal; its TMK is stored encrypted under the master key by the caller."""

    __tablename__ = "terminals"

    id: Mapped[str] = mapped_column(String(8), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(ForeignKey("merchants.id"), index=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    suite: Mapped[KeySuite] = mapped_column(_enum(KeySuite))
    tmk_encrypted: Mapped[bytes] = mapped_column(LargeBinary(256))
    open_batch_number: Mapped[int] = mapped_column(Integer, default=1)

    __table_args__ = (
        CheckConstraint(
            "open_batch_number >= 1 AND open_batch_number <= 999999", name="batch_range"
        ),
    )


class TerminalSession(Base):
    """A signed-on terminal's working keys, sealed under the master key (never clear here).

    In the database rather than in one process's memory, so that a terminal whose connection
    lands on another process, or on the same gateway after a restart, carries on (issue 8).
    A sign-on replaces the row, so `generation` (never reused, as `sqlite_autoincrement` and a
    PostgreSQL sequence guarantee) names one sign-on: a process may keep the keys it unsealed
    for (terminal, generation) and know from the generation alone whether they are still the
    terminal's keys. A sign-off deletes the row; the lifetime ends at `expires_at`.
    """

    __tablename__ = "terminal_sessions"

    generation: Mapped[int] = mapped_column(BigId, primary_key=True)
    terminal_id: Mapped[str] = mapped_column(ForeignKey("terminals.id"), unique=True)
    suite: Mapped[KeySuite] = mapped_column(_enum(KeySuite))
    keys_sealed: Mapped[bytes] = mapped_column(LargeBinary(256))
    signed_on_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = ({"sqlite_autoincrement": True},)


class TerminalEnabledChange(Base):
    """Append-only: every value `terminals.enabled` took, from when."""

    __tablename__ = "terminal_enabled_history"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    terminal_id: Mapped[str] = mapped_column(ForeignKey("terminals.id"), index=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime)


BATCH_COUNTED = "response_code IN ('00', '10') AND state <> 'reversed'"
HAS_ORIGINAL = "original_id IS NOT NULL"


class Authorisation(Base):
    """What the gateway answered to one financial request, with the figures clearing needs.

    For a redemption: amount_fen is A (or A' after a partial approval), settled_fen D, points
    P. For a void or reversal: the original's figures. For a refund: amount_fen is the
    refunded list amount, settled_fen the fen clawed back, points the points returned. The
    running totals (refunded_fen, points_returned, fen_clawed) live on the original.
    """

    __tablename__ = "authorisations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    rrn: Mapped[str] = mapped_column(String(12), unique=True)
    kind: Mapped[AuthorisationKind] = mapped_column(_enum(AuthorisationKind))
    terminal_id: Mapped[str] = mapped_column(ForeignKey("terminals.id"))
    merchant_id: Mapped[str] = mapped_column(ForeignKey("merchants.id"))
    batch_number: Mapped[int] = mapped_column(Integer)
    trace: Mapped[int] = mapped_column(Integer)
    auth_code: Mapped[str | None] = mapped_column(String(6))
    card_number: Mapped[str | None] = mapped_column(String(19))
    requested_amount_fen: Mapped[int | None] = mapped_column(BigInteger)
    amount_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    discount_bp: Mapped[int] = mapped_column(Integer, default=0)
    rule_id: Mapped[str | None] = mapped_column(String(64))
    settled_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    points: Mapped[int] = mapped_column(BigInteger, default=0)
    fee_bp: Mapped[int] = mapped_column(Integer, default=0)
    response_code: Mapped[str] = mapped_column(String(2))
    local_time: Mapped[datetime] = mapped_column(UtcDateTime)
    business_date: Mapped[date] = mapped_column(Date, index=True)
    original_id: Mapped[int | None] = mapped_column(ForeignKey("authorisations.id"))
    state: Mapped[AuthorisationState] = mapped_column(_enum(AuthorisationState))
    refunded_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    points_returned: Mapped[int] = mapped_column(BigInteger, default=0)
    fen_clawed: Mapped[int] = mapped_column(BigInteger, default=0)
    journal_transaction_id: Mapped[int | None] = mapped_column(
        ForeignKey("journal_transactions.id"), unique=True
    )
    # A case the reconciliation pack must list: a void that could not be taken back, a
    # reversal for a closed batch.
    exception: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        Index("ix_authorisations_terminal_batch_trace", "terminal_id", "batch_number", "trace"),
        # A card's redemptions of one business date (the plan's daily limit), and by its
        # first column a card's authorisations (migration 0007).
        Index("ix_authorisations_card_day", "card_number", "business_date"),
        # Voids, refunds and reversals by what they undo; the rows without one are left out.
        Index(
            "ix_authorisations_original_id",
            "original_id",
            sqlite_where=text(HAS_ORIGINAL),
            postgresql_where=text(HAS_ORIGINAL),
        ),
        CheckConstraint(
            "refunded_fen >= 0 AND points_returned >= 0 AND fen_clawed >= 0",
            name="running_totals_not_negative",
        ),
    )


class BatchItemCount(Base):
    """How many of a batch's authorisations of one kind §4.7's 999-per-batch limit counts.

    Kept by the database itself: triggers on `authorisations` (migration 0006) add to it or
    take from it whenever rows enter or leave `BATCH_COUNTED` (answered `00` or `10` and not
    reversed; a voided item still counts), on insert, update and delete alike, so every path
    that writes authorisations keeps it right. The limit's check reads one row instead of
    counting the batch's items. Never written by the application.
    """

    __tablename__ = "batch_item_counts"

    terminal_id: Mapped[str] = mapped_column(ForeignKey("terminals.id"), primary_key=True)
    batch_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[AuthorisationKind] = mapped_column(_enum(AuthorisationKind), primary_key=True)
    items: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        CheckConstraint("items >= 0", name="items_not_negative"),
        # On SQLite the rows live in the primary key's B-tree, so a count is one B-tree's write.
        {"sqlite_with_rowid": False},
    )


class ReversalTombstone(Base):
    """A reversal whose original the gateway never saw: that original is declined if it comes."""

    __tablename__ = "reversal_tombstones"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    terminal_id: Mapped[str] = mapped_column(ForeignKey("terminals.id"))
    batch_number: Mapped[int] = mapped_column(Integer)
    trace: Mapped[int] = mapped_column(Integer)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = (UniqueConstraint("terminal_id", "batch_number", "trace"),)


class TerminalBatch(Base):
    """A terminal's batch: open until its settlement (0500), then both sides' totals."""

    __tablename__ = "terminal_batches"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    terminal_id: Mapped[str] = mapped_column(ForeignKey("terminals.id"))
    batch_number: Mapped[int] = mapped_column(Integer)
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    terminal_debit_fen: Mapped[int | None] = mapped_column(BigInteger)
    terminal_debit_count: Mapped[int | None] = mapped_column(Integer)
    terminal_credit_fen: Mapped[int | None] = mapped_column(BigInteger)
    terminal_credit_count: Mapped[int | None] = mapped_column(Integer)
    gateway_debit_fen: Mapped[int | None] = mapped_column(BigInteger)
    gateway_debit_count: Mapped[int | None] = mapped_column(Integer)
    gateway_credit_fen: Mapped[int | None] = mapped_column(BigInteger)
    gateway_credit_count: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[BatchResult | None] = mapped_column(_enum(BatchResult))
    # The 0510 answer's fields, kept so that a repeated 0500 gets the same answer.
    answer: Mapped[dict[str, str] | None] = mapped_column(JSON)
    upload_ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    upload_total_records: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (Index("ix_terminal_batches_terminal_batch", "terminal_id", "batch_number"),)


class UploadedRecord(Base):
    """One record of a batch upload (0320): the terminal's own view of its batch."""

    __tablename__ = "uploaded_records"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("terminal_batches.id"), index=True)
    trace: Mapped[int] = mapped_column(Integer)
    card_number: Mapped[str] = mapped_column(String(20))
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class LoggedRequest(Base):
    """A request the gateway answered, so a repeat gets the same answer (pos-8583.md §7)."""

    __tablename__ = "request_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    terminal_id: Mapped[str] = mapped_column(ForeignKey("terminals.id"))
    batch_number: Mapped[int] = mapped_column(Integer)
    trace: Mapped[int] = mapped_column(Integer)
    request_class: Mapped[RequestClass] = mapped_column(_enum(RequestClass))
    # A digest of the request after the header with field 64 left out, computed by the caller.
    digest: Mapped[bytes] = mapped_column(LargeBinary(64))
    answer: Mapped[dict[str, str]] = mapped_column(JSON)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = (UniqueConstraint("terminal_id", "batch_number", "trace", "request_class"),)


class RrnAllocation(Base):
    """Retrieval reference numbers: each row's id is one RRN, never handed out again.

    An autoincrement key is a sequence on PostgreSQL (no lock held to commit) and, with
    AUTOINCREMENT, never reuses a committed id on SQLite.
    """

    __tablename__ = "rrn_allocations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    allocated_at: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = ({"sqlite_autoincrement": True},)


class KeyCheck(Base):
    """A check value of a key the ledger's rows were made with (migration 0008): the PIN key
    ("pin key"), whose HMACs the cards' PIN references are, and the master key ("master
    key"), a known key sealed under it as the TMKs are. A process with another key is
    refused before it writes anything (`gateway.loader`), rather than rewriting every PIN
    reference (and resetting every card's wrong tries) or sealing every TMK anew for the
    instances that have the right one."""

    __tablename__ = "key_checks"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary(32))

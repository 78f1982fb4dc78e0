"""The initial ledger schema: cards, lots, the double-entry journal, merchants, terminals,
authorisations and the records of batches, reversals and requests; and the system accounts.

The system accounts (accrual, redemption, expiry, adjustment) are rows every operation needs;
creating them here, once, keeps operations from racing to create them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

SYSTEM_ACCOUNT_KINDS = ("accrual", "redemption", "expiry", "adjustment")


def upgrade() -> None:
    op.create_table(
        "cards",
        sa.Column("number", sa.String(length=19), nullable=False),
        sa.Column("expiry_yymm", sa.String(length=4), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "active",
                "lost",
                "stolen",
                "blocked",
                "closed",
                name="cardstatus",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("enrolled", sa.Boolean(), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pin_hmac", sa.LargeBinary(length=64), nullable=True),
        sa.Column("wrong_pin_count", sa.Integer(), nullable=False),
        sa.Column("pin_locked", sa.Boolean(), nullable=False),
        sa.CheckConstraint("wrong_pin_count >= 0", name=op.f("ck_cards_wrong_pin_count")),
        sa.PrimaryKeyConstraint("number", name=op.f("pk_cards")),
    )
    op.create_table(
        "merchants",
        sa.Column("id", sa.String(length=15), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("fee_bp", sa.Integer(), nullable=False),
        sa.Column("bank_card_fee_bp", sa.Integer(), nullable=False),
        sa.Column("allow_partial", sa.Boolean(), nullable=False),
        sa.Column("refund_window_days", sa.Integer(), nullable=False),
        sa.Column("max_amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.CheckConstraint(
            "fee_bp >= 0 AND fee_bp <= bank_card_fee_bp", name=op.f("ck_merchants_fee_within_bank")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_merchants")),
    )
    op.create_table(
        "rrn_allocations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("allocated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rrn_allocations")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "accounts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "card",
                "accrual",
                "redemption",
                "expiry",
                "adjustment",
                name="accountkind",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("card_number", sa.String(length=19), nullable=True),
        sa.CheckConstraint(
            "(kind = 'card') = (card_number IS NOT NULL)",
            name=op.f("ck_accounts_card_account_has_card"),
        ),
        sa.ForeignKeyConstraint(
            ["card_number"], ["cards.number"], name=op.f("fk_accounts_card_number_cards")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("card_number", name=op.f("uq_accounts_card_number")),
    )
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.create_index(
            "uq_accounts_system_kind",
            ["kind"],
            unique=True,
            sqlite_where=sa.text("card_number IS NULL"),
            postgresql_where=sa.text("card_number IS NULL"),
        )

    op.create_table(
        "journal_transactions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("idempotency_key", sa.String(length=120), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "accrual",
                "redemption",
                "void",
                "refund",
                "reversal",
                "void_reversal",
                "expiry",
                "adjustment",
                name="transactionkind",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("card_number", sa.String(length=19), nullable=True),
        sa.ForeignKeyConstraint(
            ["card_number"],
            ["cards.number"],
            name=op.f("fk_journal_transactions_card_number_cards"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_journal_transactions")),
        sa.UniqueConstraint(
            "idempotency_key", name=op.f("uq_journal_transactions_idempotency_key")
        ),
    )
    with op.batch_alter_table("journal_transactions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_journal_transactions_card_number"), ["card_number"], unique=False
        )

    op.create_table(
        "merchant_active_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("merchant_id", sa.String(length=15), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["merchant_id"],
            ["merchants.id"],
            name=op.f("fk_merchant_active_history_merchant_id_merchants"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_merchant_active_history")),
    )
    with op.batch_alter_table("merchant_active_history", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_merchant_active_history_merchant_id"), ["merchant_id"], unique=False
        )

    op.create_table(
        "terminals",
        sa.Column("id", sa.String(length=8), nullable=False),
        sa.Column("merchant_id", sa.String(length=15), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column(
            "suite",
            sa.Enum(
                "3des", "sm4", name="keysuite", native_enum=False, create_constraint=True, length=16
            ),
            nullable=False,
        ),
        sa.Column("tmk_encrypted", sa.LargeBinary(length=256), nullable=False),
        sa.Column("open_batch_number", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "open_batch_number >= 1 AND open_batch_number <= 999999",
            name=op.f("ck_terminals_batch_range"),
        ),
        sa.ForeignKeyConstraint(
            ["merchant_id"], ["merchants.id"], name=op.f("fk_terminals_merchant_id_merchants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_terminals")),
    )
    with op.batch_alter_table("terminals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_terminals_merchant_id"), ["merchant_id"], unique=False)

    op.create_table(
        "authorisations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("rrn", sa.String(length=12), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "redemption",
                "void",
                "refund",
                "reversal",
                "balance",
                name="authorisationkind",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("terminal_id", sa.String(length=8), nullable=False),
        sa.Column("merchant_id", sa.String(length=15), nullable=False),
        sa.Column("batch_number", sa.Integer(), nullable=False),
        sa.Column("trace", sa.Integer(), nullable=False),
        sa.Column("auth_code", sa.String(length=6), nullable=True),
        sa.Column("card_number", sa.String(length=19), nullable=True),
        sa.Column("requested_amount_fen", sa.BigInteger(), nullable=True),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("discount_bp", sa.Integer(), nullable=False),
        sa.Column("rule_id", sa.String(length=64), nullable=True),
        sa.Column("settled_fen", sa.BigInteger(), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("fee_bp", sa.Integer(), nullable=False),
        sa.Column("response_code", sa.String(length=2), nullable=False),
        sa.Column("local_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column(
            "original_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "state",
            sa.Enum(
                "approved",
                "voided",
                "reversed",
                "declined",
                name="authorisationstate",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("refunded_fen", sa.BigInteger(), nullable=False),
        sa.Column("points_returned", sa.BigInteger(), nullable=False),
        sa.Column("fen_clawed", sa.BigInteger(), nullable=False),
        sa.Column(
            "journal_transaction_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        ),
        sa.Column("exception", sa.String(length=32), nullable=True),
        sa.CheckConstraint(
            "refunded_fen >= 0 AND points_returned >= 0 AND fen_clawed >= 0",
            name=op.f("ck_authorisations_running_totals_not_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["journal_transaction_id"],
            ["journal_transactions.id"],
            name=op.f("fk_authorisations_journal_transaction_id_journal_transactions"),
        ),
        sa.ForeignKeyConstraint(
            ["merchant_id"], ["merchants.id"], name=op.f("fk_authorisations_merchant_id_merchants")
        ),
        sa.ForeignKeyConstraint(
            ["original_id"],
            ["authorisations.id"],
            name=op.f("fk_authorisations_original_id_authorisations"),
        ),
        sa.ForeignKeyConstraint(
            ["terminal_id"], ["terminals.id"], name=op.f("fk_authorisations_terminal_id_terminals")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_authorisations")),
        sa.UniqueConstraint(
            "journal_transaction_id", name=op.f("uq_authorisations_journal_transaction_id")
        ),
        sa.UniqueConstraint("rrn", name=op.f("uq_authorisations_rrn")),
    )
    with op.batch_alter_table("authorisations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_authorisations_business_date"), ["business_date"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_authorisations_card_number"), ["card_number"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_authorisations_merchant_id"), ["merchant_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_authorisations_original_id"), ["original_id"], unique=False
        )
        batch_op.create_index(
            "ix_authorisations_terminal_batch_trace",
            ["terminal_id", "batch_number", "trace"],
            unique=False,
        )

    op.create_table(
        "journal_entries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "transaction_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "account_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("points <> 0", name=op.f("ck_journal_entries_points_nonzero")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_journal_entries_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["journal_transactions.id"],
            name=op.f("fk_journal_entries_transaction_id_journal_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_journal_entries")),
    )
    with op.batch_alter_table("journal_entries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_journal_entries_account_id"), ["account_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_journal_entries_transaction_id"), ["transaction_id"], unique=False
        )

    op.create_table(
        "point_lots",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("card_number", sa.String(length=19), nullable=False),
        sa.Column(
            "origin",
            sa.Enum(
                "accrual",
                "restore",
                name="lotorigin",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("earned_on", sa.Date(), nullable=False),
        sa.Column("expires_on", sa.Date(), nullable=False),
        sa.Column("original_points", sa.BigInteger(), nullable=False),
        sa.Column("remaining_points", sa.BigInteger(), nullable=False),
        sa.Column("source_ref", sa.String(length=120), nullable=False),
        sa.Column(
            "created_by_transaction_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.CheckConstraint("original_points > 0", name=op.f("ck_point_lots_original_positive")),
        sa.CheckConstraint(
            "remaining_points <= original_points",
            name=op.f("ck_point_lots_remaining_within_original"),
        ),
        sa.CheckConstraint(
            "remaining_points >= 0", name=op.f("ck_point_lots_remaining_not_negative")
        ),
        sa.ForeignKeyConstraint(
            ["card_number"], ["cards.number"], name=op.f("fk_point_lots_card_number_cards")
        ),
        sa.ForeignKeyConstraint(
            ["created_by_transaction_id"],
            ["journal_transactions.id"],
            name=op.f("fk_point_lots_created_by_transaction_id_journal_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_point_lots")),
        sa.UniqueConstraint("origin", "source_ref", name=op.f("uq_point_lots_origin_source_ref")),
    )
    with op.batch_alter_table("point_lots", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_point_lots_card_number"), ["card_number"], unique=False
        )

    op.create_table(
        "request_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("terminal_id", sa.String(length=8), nullable=False),
        sa.Column("batch_number", sa.Integer(), nullable=False),
        sa.Column("trace", sa.Integer(), nullable=False),
        sa.Column(
            "request_class",
            sa.Enum(
                "request",
                "reversal",
                name="requestclass",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("digest", sa.LargeBinary(length=64), nullable=False),
        sa.Column("answer", sa.JSON(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["terminal_id"], ["terminals.id"], name=op.f("fk_request_log_terminal_id_terminals")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_log")),
        sa.UniqueConstraint(
            "terminal_id",
            "batch_number",
            "trace",
            "request_class",
            name=op.f("uq_request_log_terminal_id_batch_number_trace_request_class"),
        ),
    )
    op.create_table(
        "reversal_tombstones",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("terminal_id", sa.String(length=8), nullable=False),
        sa.Column("batch_number", sa.Integer(), nullable=False),
        sa.Column("trace", sa.Integer(), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["terminal_id"],
            ["terminals.id"],
            name=op.f("fk_reversal_tombstones_terminal_id_terminals"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reversal_tombstones")),
        sa.UniqueConstraint(
            "terminal_id",
            "batch_number",
            "trace",
            name=op.f("uq_reversal_tombstones_terminal_id_batch_number_trace"),
        ),
    )
    op.create_table(
        "terminal_batches",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("terminal_id", sa.String(length=8), nullable=False),
        sa.Column("batch_number", sa.Integer(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("terminal_debit_fen", sa.BigInteger(), nullable=True),
        sa.Column("terminal_debit_count", sa.Integer(), nullable=True),
        sa.Column("terminal_credit_fen", sa.BigInteger(), nullable=True),
        sa.Column("terminal_credit_count", sa.Integer(), nullable=True),
        sa.Column("gateway_debit_fen", sa.BigInteger(), nullable=True),
        sa.Column("gateway_debit_count", sa.Integer(), nullable=True),
        sa.Column("gateway_credit_fen", sa.BigInteger(), nullable=True),
        sa.Column("gateway_credit_count", sa.Integer(), nullable=True),
        sa.Column(
            "result",
            sa.Enum(
                "balanced",
                "unbalanced",
                name="batchresult",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=True,
        ),
        sa.Column("answer", sa.JSON(), nullable=True),
        sa.Column("upload_ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("upload_total_records", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["terminal_id"],
            ["terminals.id"],
            name=op.f("fk_terminal_batches_terminal_id_terminals"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_terminal_batches")),
    )
    with op.batch_alter_table("terminal_batches", schema=None) as batch_op:
        batch_op.create_index(
            "ix_terminal_batches_terminal_batch", ["terminal_id", "batch_number"], unique=False
        )

    op.create_table(
        "terminal_enabled_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("terminal_id", sa.String(length=8), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["terminal_id"],
            ["terminals.id"],
            name=op.f("fk_terminal_enabled_history_terminal_id_terminals"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_terminal_enabled_history")),
    )
    with op.batch_alter_table("terminal_enabled_history", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_terminal_enabled_history_terminal_id"), ["terminal_id"], unique=False
        )

    op.create_table(
        "lot_movements",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "transaction_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("lot_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column(
            "redemption_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "origin_lot_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.CheckConstraint("points <> 0", name=op.f("ck_lot_movements_points_nonzero")),
        sa.ForeignKeyConstraint(
            ["lot_id"], ["point_lots.id"], name=op.f("fk_lot_movements_lot_id_point_lots")
        ),
        sa.ForeignKeyConstraint(
            ["origin_lot_id"],
            ["point_lots.id"],
            name=op.f("fk_lot_movements_origin_lot_id_point_lots"),
        ),
        sa.ForeignKeyConstraint(
            ["redemption_id"],
            ["authorisations.id"],
            name=op.f("fk_lot_movements_redemption_id_authorisations"),
        ),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["journal_transactions.id"],
            name=op.f("fk_lot_movements_transaction_id_journal_transactions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lot_movements")),
    )
    with op.batch_alter_table("lot_movements", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_lot_movements_lot_id"), ["lot_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_lot_movements_redemption_id"), ["redemption_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_lot_movements_transaction_id"), ["transaction_id"], unique=False
        )

    op.create_table(
        "uploaded_records",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("batch_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("trace", sa.Integer(), nullable=False),
        sa.Column("card_number", sa.String(length=20), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["terminal_batches.id"],
            name=op.f("fk_uploaded_records_batch_id_terminal_batches"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploaded_records")),
    )
    with op.batch_alter_table("uploaded_records", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_uploaded_records_batch_id"), ["batch_id"], unique=False
        )

    accounts = sa.table("accounts", sa.column("kind", sa.String))
    op.bulk_insert(accounts, [{"kind": kind} for kind in SYSTEM_ACCOUNT_KINDS])


def downgrade() -> None:
    with op.batch_alter_table("uploaded_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_uploaded_records_batch_id"))

    op.drop_table("uploaded_records")
    with op.batch_alter_table("lot_movements", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lot_movements_transaction_id"))
        batch_op.drop_index(batch_op.f("ix_lot_movements_redemption_id"))
        batch_op.drop_index(batch_op.f("ix_lot_movements_lot_id"))

    op.drop_table("lot_movements")
    with op.batch_alter_table("terminal_enabled_history", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_terminal_enabled_history_terminal_id"))

    op.drop_table("terminal_enabled_history")
    with op.batch_alter_table("terminal_batches", schema=None) as batch_op:
        batch_op.drop_index("ix_terminal_batches_terminal_batch")

    op.drop_table("terminal_batches")
    op.drop_table("reversal_tombstones")
    op.drop_table("request_log")
    with op.batch_alter_table("point_lots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_point_lots_card_number"))

    op.drop_table("point_lots")
    with op.batch_alter_table("journal_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_journal_entries_transaction_id"))
        batch_op.drop_index(batch_op.f("ix_journal_entries_account_id"))

    op.drop_table("journal_entries")
    with op.batch_alter_table("authorisations", schema=None) as batch_op:
        batch_op.drop_index("ix_authorisations_terminal_batch_trace")
        batch_op.drop_index(batch_op.f("ix_authorisations_original_id"))
        batch_op.drop_index(batch_op.f("ix_authorisations_merchant_id"))
        batch_op.drop_index(batch_op.f("ix_authorisations_card_number"))
        batch_op.drop_index(batch_op.f("ix_authorisations_business_date"))

    op.drop_table("authorisations")
    with op.batch_alter_table("terminals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_terminals_merchant_id"))

    op.drop_table("terminals")
    with op.batch_alter_table("merchant_active_history", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_merchant_active_history_merchant_id"))

    op.drop_table("merchant_active_history")
    with op.batch_alter_table("journal_transactions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_journal_transactions_card_number"))

    op.drop_table("journal_transactions")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_accounts_system_kind",
            sqlite_where=sa.text("card_number IS NULL"),
            postgresql_where=sa.text("card_number IS NULL"),
        )

    op.drop_table("accounts")
    op.drop_table("rrn_allocations")
    op.drop_table("merchants")
    op.drop_table("cards")

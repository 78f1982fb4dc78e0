"""Clearing's tables: closed months, the merchants' fee rates at each close, and the
authorisations each close accounted for (with an entry of the settlement file or without).

The models live in `clearing/models.py`, on the ledger's `Base`. Importing them here puts
them in `Base.metadata` in every process that migrates a ledger, so the schema comparison
(autogenerate, the schema test) always sees the tables this revision creates.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import clearing.models  # noqa: F401  (registers the tables on Base.metadata)

revision = "0002_clearing"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "clearing_months",
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sender_id", sa.String(length=15), nullable=False),
        sa.Column("receiver_id", sa.String(length=15), nullable=False),
        sa.Column("terminal_count", sa.Integer(), nullable=False),
        sa.Column("terminal_fee_fen", sa.BigInteger(), nullable=False),
        sa.Column("file_name", sa.String(length=64), nullable=False),
        sa.Column("file_sha256", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "terminal_count >= 0 AND terminal_fee_fen >= 0", name=op.f("ck_clearing_months_fees")
        ),
        sa.PrimaryKeyConstraint("month", name=op.f("pk_clearing_months")),
    )
    op.create_table(
        "clearing_month_merchants",
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("merchant_id", sa.String(length=15), nullable=False),
        sa.Column("fee_bp", sa.Integer(), nullable=False),
        sa.Column("bank_card_fee_bp", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["merchant_id"],
            ["merchants.id"],
            name=op.f("fk_clearing_month_merchants_merchant_id_merchants"),
        ),
        sa.ForeignKeyConstraint(
            ["month"],
            ["clearing_months.month"],
            name=op.f("fk_clearing_month_merchants_month_clearing_months"),
        ),
        sa.PrimaryKeyConstraint("month", "merchant_id", name=op.f("pk_clearing_month_merchants")),
    )
    op.create_table(
        "clearing_items",
        sa.Column("authorisation_id", BigId, nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("entry_type", sa.String(length=2), nullable=True),
        sa.Column("sign", sa.SmallInteger(), nullable=False),
        sa.CheckConstraint(
            "(entry_type IS NULL AND sign = 0) OR "
            "(entry_type IN ('22', '25', '23', '04') AND sign IN (-1, 1))",
            name=op.f("ck_clearing_items_entry_sign"),
        ),
        sa.ForeignKeyConstraint(
            ["authorisation_id"],
            ["authorisations.id"],
            name=op.f("fk_clearing_items_authorisation_id_authorisations"),
        ),
        sa.ForeignKeyConstraint(
            ["month"],
            ["clearing_months.month"],
            name=op.f("fk_clearing_items_month_clearing_months"),
        ),
        sa.PrimaryKeyConstraint("authorisation_id", name=op.f("pk_clearing_items")),
    )
    with op.batch_alter_table("clearing_items", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_clearing_items_month"), ["month"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("clearing_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_clearing_items_month"))
    op.drop_table("clearing_items")
    op.drop_table("clearing_month_merchants")
    op.drop_table("clearing_months")

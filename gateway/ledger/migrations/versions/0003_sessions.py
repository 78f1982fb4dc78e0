"""Terminal sessions in the ledger: each signed-on terminal's working keys, sealed under the
master key, with the sign-on's generation and the end of the key lifetime (issue 8).

Before this revision sessions lived in the serving process's memory; there is nothing to carry
over, so an upgrade starts with every terminal signed off, as a restart of the old gateway did.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_sessions"
down_revision: str | None = "0002_clearing"
branch_labels: str | None = None
depends_on: str | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "terminal_sessions",
        sa.Column("generation", BigId, nullable=False),
        sa.Column("terminal_id", sa.String(length=8), nullable=False),
        sa.Column(
            "suite",
            sa.Enum(
                "3des", "sm4", name="keysuite", native_enum=False, create_constraint=True, length=16
            ),
            nullable=False,
        ),
        sa.Column("keys_sealed", sa.LargeBinary(length=256), nullable=False),
        sa.Column("signed_on_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["terminal_id"],
            ["terminals.id"],
            name=op.f("fk_terminal_sessions_terminal_id_terminals"),
        ),
        sa.PrimaryKeyConstraint("generation", name=op.f("pk_terminal_sessions")),
        sa.UniqueConstraint("terminal_id", name=op.f("uq_terminal_sessions_terminal_id")),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("terminal_sessions")

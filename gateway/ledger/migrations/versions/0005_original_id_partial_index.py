"""The index of voids, refunds and reversals by the authorisation they undo: only their rows.

Redemptions, balance inquiries and declines have no original (`original_id` is NULL) and are
most of the table, yet the full index took an entry for each, and every redemption's commit
wrote a page of it. The look-ups by original (`original_id = ...`) imply `original_id IS NOT
NULL`, so SQLite and PostgreSQL both answer them from this partial index.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_original_id_partial_index"
down_revision: str | None = "0004_batch_count_index"
branch_labels: str | None = None
depends_on: str | None = None

NAME = "ix_authorisations_original_id"
PREDICATE = "original_id IS NOT NULL"


def upgrade() -> None:
    op.drop_index(NAME, table_name="authorisations")
    op.create_index(
        NAME,
        "authorisations",
        ["original_id"],
        unique=False,
        sqlite_where=sa.text(PREDICATE),
        postgresql_where=sa.text(PREDICATE),
    )


def downgrade() -> None:
    op.drop_index(NAME, table_name="authorisations")
    op.create_index(NAME, "authorisations", ["original_id"], unique=False)

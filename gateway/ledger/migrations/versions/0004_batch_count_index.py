"""An index that answers the 999-per-batch count (pos-8583.md §4.7) from the index alone.

Every redemption, void and refund counts its batch's approved, unreversed items of its kind.
The terminal/batch/trace index finds the batch's rows but must read each one to filter; this
partial index holds only the rows the count counts, keyed by terminal, batch and kind, so the
count reads at most 999 index entries and no table rows. Both SQLite and PostgreSQL support
partial indexes with the same predicate.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_batch_count_index"
down_revision: str | None = "0003_sessions"
branch_labels: str | None = None
depends_on: str | None = None

PREDICATE = "response_code IN ('00', '10') AND state <> 'reversed'"


def upgrade() -> None:
    op.create_index(
        "ix_authorisations_batch_count",
        "authorisations",
        ["terminal_id", "batch_number", "kind"],
        unique=False,
        sqlite_where=sa.text(PREDICATE),
        postgresql_where=sa.text(PREDICATE),
    )


def downgrade() -> None:
    op.drop_index("ix_authorisations_batch_count", table_name="authorisations")

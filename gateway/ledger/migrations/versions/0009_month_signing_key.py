"""The signing key each closed month was signed with (`clearing_months.signing_key_sha256`).

A month's clearing run may be run again, and must write the same bytes (points-and-clearing.md
§5), its `.sig` included. The ledger kept the file's SHA-256 but nothing of the key: a run
whose config named another key file (a new host without it, a moved path, a typo) made a new
key there, replaced the month's good `.sig` with one the acquirer cannot verify, and said "the
same bytes again". The SHA-256 of the raw Ed25519 public key is recorded by the run that
first signs the month; a later run with another key is refused before it writes anything,
and a run that finds no key file makes none once a month of the ledger has been signed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_month_signing_key"
down_revision: str | None = "0008_key_checks"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("clearing_months") as batch:
        batch.add_column(sa.Column("signing_key_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("clearing_months") as batch:
        batch.drop_column("signing_key_sha256")

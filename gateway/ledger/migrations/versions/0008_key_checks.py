"""Check values of the keys the ledger's rows were made with (`key_checks`).

The cards' PIN references are HMACs under the PIN key (the key store's `<master>.pin`). A
process that came up with another PIN key (a host given only `master.key` after a rotation,
or none at all, so that it made its own) saw every PIN of the config as changed: its config
load rewrote every card's reference and reset its wrong tries, and the instances with the
right key then refused every right PIN. The first load stores the PIN key's check value
here; a load whose key gives another value is refused before it writes anything.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_key_checks"
down_revision: str | None = "0007_indexes_the_queries_use"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "key_checks",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.LargeBinary(32), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("key_checks")

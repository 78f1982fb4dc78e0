"""Alembic's entry point for the ledger: runs on the connection `migrate` hands it.

There is no alembic.ini and no URL here: the gateway migrates the database it was configured
with, inside the transaction `migrate` opened, so a failed migration leaves nothing half done
(both backends have transactional DDL).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from gateway.ledger.models import Base


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters a table by copying it; batch mode lets later revisions do that.
        render_as_batch=True,
        compare_type=True,
    )
    context.run_migrations()


if context.is_offline_mode():  # pragma: no cover
    raise RuntimeError("the ledger is migrated online only, through gateway.ledger.db.migrate")
run_migrations(context.config.attributes["connection"])

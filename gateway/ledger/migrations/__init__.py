"""Alembic migrations of the ledger schema, run in-process by `gateway.ledger.db.migrate`."""

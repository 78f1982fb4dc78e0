"""A SQLite ledger file damaged on purpose, as a failing disk or a bad copy leaves one."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def overwrite_first_page(database: Path, table: str) -> None:
    """The first page of `table` overwritten with a byte pattern, after the log is copied
    into the file (so the damage is what every reader meets)."""
    with sqlite3.connect(database) as connection:
        (page,) = connection.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
        (size,) = connection.execute("PRAGMA page_size").fetchone()
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    with database.open("r+b") as ledger:
        ledger.seek((page - 1) * size)
        ledger.write(bytes([0xA5]) * size)

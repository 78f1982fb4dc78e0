"""Each batch's counted items in a table the database keeps, instead of counting them.

The 999-per-batch limit (pos-8583.md §4.7) counted a batch's approved, unreversed items of a
kind from a partial index (revision 0004) on every redemption, void and refund: a cost that
grew with the batch, about 0.12 us an item on SQLite, so about 100 us near the limit. This
revision keeps the count in `batch_item_counts`, one row per terminal, batch and kind:

- filled from the existing rows, with PostgreSQL's writers held off while it is filled;
- then kept by triggers on `authorisations` that add to a count when rows enter the counted
  set (answered `00` or `10`, not reversed) and take from it when rows leave it, on insert,
  update and delete, whichever path wrote the rows: row triggers on SQLite, statement
  triggers over the transition tables on PostgreSQL (one change per count per statement);
- so the check reads one row, and the partial index, one more B-tree every approval wrote,
  goes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_batch_item_counts"
down_revision: str | None = "0005_original_id_partial_index"
branch_labels: str | None = None
depends_on: str | None = None

INDEX = "ix_authorisations_batch_count"
KEY = ("terminal_id", "batch_number", "kind")
KINDS = ("redemption", "void", "refund", "reversal", "balance")
PREDICATE = "response_code IN ('00', '10') AND state <> 'reversed'"


def counted(row: str) -> str:
    """The 999 count's predicate on OLD or NEW (revision 0004's, unchanged)."""
    return f"{row}.response_code IN ('00', '10') AND {row}.state <> 'reversed'"


def same_key() -> str:
    return " AND ".join(f"OLD.{column} = NEW.{column}" for column in KEY)


def add_one(row: str) -> str:
    return (
        "INSERT INTO batch_item_counts (terminal_id, batch_number, kind, items)"
        f" VALUES ({row}.terminal_id, {row}.batch_number, {row}.kind, 1)"
        " ON CONFLICT (terminal_id, batch_number, kind)"
        " DO UPDATE SET items = batch_item_counts.items + 1"
    )


def take_one(row: str) -> str:
    return "UPDATE batch_item_counts SET items = items - 1 WHERE " + " AND ".join(
        f"{column} = {row}.{column}" for column in KEY
    )


# Only these columns decide whether and where a row is counted.
WATCHED = "terminal_id, batch_number, kind, response_code, state"

SQLITE_TRIGGERS = {
    "batch_item_counts_insert": (
        f"AFTER INSERT ON authorisations WHEN {counted('NEW')}",
        add_one("NEW"),
    ),
    "batch_item_counts_update_leave": (
        f"AFTER UPDATE OF {WATCHED} ON authorisations"
        f" WHEN ({counted('OLD')}) AND NOT ({counted('NEW')} AND {same_key()})",
        take_one("OLD"),
    ),
    "batch_item_counts_update_enter": (
        f"AFTER UPDATE OF {WATCHED} ON authorisations"
        f" WHEN ({counted('NEW')}) AND NOT ({counted('OLD')} AND {same_key()})",
        add_one("NEW"),
    ),
    "batch_item_counts_delete": (
        f"AFTER DELETE ON authorisations WHEN {counted('OLD')}",
        take_one("OLD"),
    ),
}

# PostgreSQL: statement-level triggers over the statement's transition tables, so a run's
# many-row INSERT adds to each count once, and the counts are changed in key order.
COLUMNS = ", ".join(KEY)
ADD = (
    f"INSERT INTO batch_item_counts ({COLUMNS}, items) SELECT {COLUMNS}, items FROM {{rows}}"
    f" WHERE items > 0 ORDER BY {COLUMNS} ON CONFLICT ({COLUMNS})"
    " DO UPDATE SET items = batch_item_counts.items + EXCLUDED.items"
)
TAKE = (
    "UPDATE batch_item_counts c SET items = c.items + d.items FROM {rows} WHERE d.items < 0 AND "
    + " AND ".join(f"c.{column} = d.{column}" for column in KEY)
)


def per_key(*sources: tuple[str, int]) -> str:
    """Each key's change in counted rows, from (transition table, +1 or -1) pairs."""
    moved = " UNION ALL ".join(
        f"SELECT {COLUMNS}, {sign} AS items FROM {table} WHERE {PREDICATE}"
        for table, sign in sources
    )
    return (
        f"(SELECT {COLUMNS}, sum(items)::int AS items FROM ({moved}) AS moved"
        f" GROUP BY {COLUMNS} HAVING sum(items) <> 0)"
    )


POSTGRES_FUNCTION = f"""
CREATE FUNCTION batch_item_counts_follow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {ADD.format(rows=per_key(("new_rows", 1)) + " AS d")};
    ELSIF TG_OP = 'DELETE' THEN
        {TAKE.format(rows=per_key(("old_rows", -1)) + " AS d")};
    ELSE
        {TAKE.format(rows=per_key(("new_rows", 1), ("old_rows", -1)) + " AS d")};
        {ADD.format(rows=per_key(("new_rows", 1), ("old_rows", -1)) + " AS d")};
    END IF;
    RETURN NULL;
END
$$
"""

POSTGRES_TRIGGERS = {
    "batch_item_counts_insert": "AFTER INSERT ON authorisations REFERENCING NEW TABLE AS new_rows",
    "batch_item_counts_update": (
        "AFTER UPDATE ON authorisations REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
    ),
    "batch_item_counts_delete": "AFTER DELETE ON authorisations REFERENCING OLD TABLE AS old_rows",
}


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "batch_item_counts",
        sa.Column("terminal_id", sa.String(length=8), nullable=False),
        sa.Column("batch_number", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                *KINDS,
                name="authorisationkind",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.CheckConstraint("items >= 0", name=op.f("ck_batch_item_counts_items_not_negative")),
        sa.ForeignKeyConstraint(
            ["terminal_id"],
            ["terminals.id"],
            name=op.f("fk_batch_item_counts_terminal_id_terminals"),
        ),
        sa.PrimaryKeyConstraint(*KEY, name=op.f("pk_batch_item_counts")),
        sqlite_with_rowid=False,
    )
    if postgres:
        # No authorisation may be written between the count and the trigger that follows it.
        op.execute("LOCK TABLE authorisations IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        "INSERT INTO batch_item_counts (terminal_id, batch_number, kind, items)"
        " SELECT terminal_id, batch_number, kind, count(*) FROM authorisations"
        f" WHERE {PREDICATE} GROUP BY terminal_id, batch_number, kind"
    )
    if postgres:
        op.execute(POSTGRES_FUNCTION)
        for name, when in POSTGRES_TRIGGERS.items():
            op.execute(
                f"CREATE TRIGGER {name} {when}"
                " FOR EACH STATEMENT EXECUTE FUNCTION batch_item_counts_follow()"
            )
    else:
        for name, (when, action) in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {when} BEGIN {action}; END")
    op.drop_index(INDEX, table_name="authorisations")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in POSTGRES_TRIGGERS:
            op.execute(f"DROP TRIGGER {name} ON authorisations")
        op.execute("DROP FUNCTION batch_item_counts_follow()")
    else:
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
    op.drop_table("batch_item_counts")
    op.create_index(
        INDEX,
        "authorisations",
        list(KEY),
        unique=False,
        sqlite_where=sa.text(PREDICATE),
        postgresql_where=sa.text(PREDICATE),
    )

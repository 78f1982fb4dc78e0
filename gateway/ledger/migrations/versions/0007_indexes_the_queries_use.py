"""Indexes for the queries the ledger runs, and no others.

Every approved redemption inserts a row into `authorisations`, `journal_transactions`, two into
`journal_entries` and one or more into `lot_movements`, and its commit writes a page of every
index on those rows. Five of them answered no query:

- `ix_journal_transactions_card_number`, `ix_journal_entries_account_id`,
  `ix_lot_movements_lot_id`, `ix_lot_movements_transaction_id`: the journal is read by card
  through its lots and authorisations, and by these columns only in whole-ledger totals
  (`vipgate ledger check`, the reconciliation pack), which read every row anyway. The card
  and lot indexes were also the costliest: their entries land on one page per card, so a
  group of N requests for N cards wrote N pages of each;
- `ix_authorisations_merchant_id`: clearing groups a month's items by merchant after
  finding them by month, never by merchant first.

Nothing deletes the rows those foreign keys point at (accounts, lots, journal transactions,
merchants), so no foreign-key check needs the indexes either.

And the plan's daily limit (`max_points_per_card_day`) summed a card's approved redemptions of
one business date by `ix_authorisations_card_number`, reading every authorisation the card
ever had to find that date's: a cost that grew with the card's history. The index on
(card_number, business_date) finds that date's rows alone, and by its first column still
serves every look-up by card.

Measured on SQLite, groups of 40 redemptions from 200 terminals and 20 cards, in one process:
the log pages a group's commit writes fell from about 139 to 86, and deciding a request from
about 207 to 170 us. Through `vipgate serve` (make bench-gateway) the approvals per second
did not change beyond the noise: the server's other work (the reactor's, the interpreter
lock's) hides it there.
"""

from __future__ import annotations

from alembic import op

revision = "0007_indexes_the_queries_use"
down_revision: str | None = "0006_batch_item_counts"
branch_labels: str | None = None
depends_on: str | None = None

CARD_DAY = "ix_authorisations_card_day"
UNUSED = (
    ("ix_journal_transactions_card_number", "journal_transactions", "card_number"),
    ("ix_journal_entries_account_id", "journal_entries", "account_id"),
    ("ix_lot_movements_lot_id", "lot_movements", "lot_id"),
    ("ix_lot_movements_transaction_id", "lot_movements", "transaction_id"),
    ("ix_authorisations_merchant_id", "authorisations", "merchant_id"),
)


def upgrade() -> None:
    op.create_index(CARD_DAY, "authorisations", ["card_number", "business_date"])
    op.drop_index("ix_authorisations_card_number", table_name="authorisations")
    for name, table, _column in UNUSED:
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    for name, table, column in UNUSED:
        op.create_index(name, table, [column])
    op.create_index("ix_authorisations_card_number", "authorisations", ["card_number"])
    op.drop_index(CARD_DAY, table_name="authorisations")

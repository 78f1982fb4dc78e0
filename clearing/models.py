"""The rows clearing keeps in the ledger database: closed months and what each close settled.

A month is closed by its first clearing run (points-and-clearing.md §5), and every later run
must write the same bytes. Recomputing the entries from the authorisations' current states
cannot promise that: a void or a reversal after the close changes a redemption's state. So the
close records, once, which authorisations it accounted for and how (`SettledItem`: an entry
of a given type and sign, or accounted for with no entry because it was undone before the
close), together with everything else the file depends on that may change later (the ids of
sender and receiver, the merchants' fee rates, the terminal fee). The file is then a pure
function of these rows and of the authorisations' figures, which are never edited.

`SettledItem` has the authorisation as its primary key, so the database itself refuses to
account for one authorisation twice, in one month or across months.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Integer, SmallInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from gateway.ledger.models import Base, UtcDateTime

ENTRY_TYPES = ("22", "25", "23", "04")


class ClosedMonth(Base):
    """A month whose clearing has run: when it closed and what its file must be."""

    __tablename__ = "clearing_months"

    # "YYYY-MM": the calendar month whose business dates it settles.
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    closed_at: Mapped[datetime] = mapped_column(UtcDateTime)
    sender_id: Mapped[str] = mapped_column(String(15))
    receiver_id: Mapped[str] = mapped_column(String(15))
    terminal_count: Mapped[int] = mapped_column(Integer)
    terminal_fee_fen: Mapped[int] = mapped_column(BigInteger)
    file_name: Mapped[str] = mapped_column(String(64))
    # SHA-256 of the whole file, lower-case hex; set by the run that first wrote it.
    file_sha256: Mapped[str | None] = mapped_column(String(64))
    # SHA-256 of the raw Ed25519 public key that signed the file, lower-case hex; set by the
    # run that first signed it (migration 0009), and every later run's key must match it.
    signing_key_sha256: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint("terminal_count >= 0 AND terminal_fee_fen >= 0", name="fees"),
    )


class ClosedMonthMerchant(Base):
    """A merchant's fee rate at a month's close (the merchant record's positions 97-100)."""

    __tablename__ = "clearing_month_merchants"

    month: Mapped[str] = mapped_column(ForeignKey("clearing_months.month"), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(ForeignKey("merchants.id"), primary_key=True)
    fee_bp: Mapped[int] = mapped_column(Integer)
    bank_card_fee_bp: Mapped[int] = mapped_column(Integer)


class SettledItem(Base):
    """One authorisation a close accounted for: with an entry of the file, or with none."""

    __tablename__ = "clearing_items"

    authorisation_id: Mapped[int] = mapped_column(ForeignKey("authorisations.id"), primary_key=True)
    month: Mapped[str] = mapped_column(ForeignKey("clearing_months.month"), index=True)
    # '22', '25', '23' or '04'; NULL: accounted for without an entry.
    entry_type: Mapped[str | None] = mapped_column(String(2))
    # +1 or -1 for an entry (the sign of its settled amount), 0 without one.
    sign: Mapped[int] = mapped_column(SmallInteger)

    __table_args__ = (
        CheckConstraint(
            "(entry_type IS NULL AND sign = 0) OR "
            "(entry_type IN ('22', '25', '23', '04') AND sign IN (-1, 1))",
            name="entry_sign",
        ),
    )

"""A closed month's settlement entries, read from the ledger in the file's order, one at a time.

The details are the bulk of the file (a million a month is the target), so they come from a
database cursor that fetches a bounded number of rows at a time (`yield_per`: a server-side
cursor on PostgreSQL, a stepped statement on SQLite) and are turned into `Detail`s as they are
written; nothing here holds the month in a list. The figures come from the authorisation each
`SettledItem` names (A, d, D, P and the fee rate in force when the original was authorised,
all copied onto voids, reversals and refunds by the ledger) and the sign the close decided.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, aliased

from cardcodec.cards import mask_card_number
from clearing.layout import Detail
from clearing.models import SettledItem
from clearing.money import merchant_fee_fen
from gateway.ledger.models import Authorisation

# Rows fetched from the cursor at a time: enough to amortise the round trips, few enough
# that memory does not depend on the month's size.
YIELD_ROWS = 5000


def entry_query(month_key: str, dialect: str) -> Select[*tuple[Any, ...]]:
    """The month's entries with every figure a detail needs, in §6's order.

    The order is by byte value, as `verify` compares: PostgreSQL is told so (`COLLATE "C"`),
    since a database created under another locale would sort letters differently; SQLite
    compares text bytewise already.
    """
    original = aliased(Authorisation)

    def bytewise(column: Any) -> Any:
        return column.collate("C") if dialect == "postgresql" else column

    return (
        select(
            Authorisation.merchant_id,
            Authorisation.terminal_id,
            Authorisation.business_date,
            Authorisation.local_time,
            SettledItem.entry_type,
            SettledItem.sign,
            Authorisation.batch_number,
            Authorisation.trace,
            Authorisation.rrn,
            Authorisation.card_number,
            Authorisation.amount_fen,
            Authorisation.discount_bp,
            Authorisation.settled_fen,
            Authorisation.points,
            Authorisation.fee_bp,
            original.rrn,
        )
        .join(Authorisation, Authorisation.id == SettledItem.authorisation_id)
        .outerjoin(original, original.id == Authorisation.original_id)
        .where(SettledItem.month == month_key, SettledItem.entry_type.is_not(None))
        .order_by(
            bytewise(Authorisation.merchant_id),
            Authorisation.business_date,
            bytewise(Authorisation.terminal_id),
            Authorisation.batch_number,
            Authorisation.trace,
            bytewise(Authorisation.rrn),
        )
        .execution_options(yield_per=YIELD_ROWS)
    )


def details(session: Session, month_key: str) -> Iterator[Detail]:
    """The month's details, numbered from 1, streamed from the cursor."""
    connection = session.connection()
    query = entry_query(month_key, connection.dialect.name)
    masked = _MaskedCards()
    for sequence, row in enumerate(connection.execute(query), start=1):
        (
            merchant_id,
            terminal_id,
            business_date,
            local_time,
            entry_type,
            sign,
            batch,
            trace,
            rrn,
            card_number,
            amount_fen,
            discount_bp,
            settled_fen,
            points,
            fee_bp,
            original_rrn,
        ) = row
        settled = sign * settled_fen
        fee = merchant_fee_fen(settled, fee_bp)
        yield Detail(
            sequence,
            merchant_id,
            terminal_id,
            business_date,
            local_time,
            entry_type,
            batch,
            trace,
            rrn,
            masked(card_number),
            amount_fen,
            discount_bp,
            settled,
            points,
            fee,
            settled - fee,
            original_rrn if entry_type != "22" else None,
        )


class _MaskedCards:
    """Card numbers masked once each: a month's entries come from far fewer cards."""

    LIMIT = 100_000

    def __init__(self) -> None:
        self.known: dict[str | None, str] = {}

    def __call__(self, card_number: str | None) -> str:
        masked = self.known.get(card_number)
        if masked is None:
            if len(self.known) >= self.LIMIT:
                self.known.clear()
            masked = self.known[card_number] = mask_card_number(card_number or "")
        return masked

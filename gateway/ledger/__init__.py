"""The points ledger: cards, lots, a double-entry journal and the gateway's records.

Every approval is a promise paid in points and, at the month's end, in money; this package is
where that promise is kept, on SQLite or PostgreSQL alike. The usual way in:

    engine = make_engine(url)
    migrate(engine)
    with unit_of_work(engine) as session:
        outcome = operations.redeem(session, swipe, card_number, conversion, ...)

`operations` changes points (redeem, void, reverse, refund, accrue, expire, enrol, card
state); `records` keeps merchants, terminals, batches, reversals and the request log;
`invariants.check_invariants` tells whether the books agree with themselves.
"""

from gateway.ledger.db import make_engine, migrate, new_session, unit_of_work
from gateway.ledger.journal import LedgerError, LotChange, Moment, Returned, next_rrn

__all__ = [
    "LedgerError",
    "LotChange",
    "Moment",
    "Returned",
    "make_engine",
    "migrate",
    "new_session",
    "next_rrn",
    "unit_of_work",
]

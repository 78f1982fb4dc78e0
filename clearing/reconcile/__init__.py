"""The auditors' reconciliation pack for a closed month (points-and-clearing.md §7).

Three ways, nothing left unexplained: the terminals' settlement totals and uploads against the
gateway's journal (`batches`), the journal against the settlement file (`journal_file`), the
points ledger against the money (`points`); then the fee rules and the protocol's own
exceptions (`rules`). Each way writes its exceptions to a CSV as it finds them; the pack ends
with an HTML page a person can read (`page`) and one verdict line: `RECONCILED`, or
`EXCEPTIONS: N` with N the number of exceptions over every list.

The pack reconciles the settlement file in its own folder: the file `clear` wrote there, or,
when the folder has none, the month's file written there now (the same bytes, as `clear`
promises). Every figure is read in one unit of work, so the three ways see one ledger.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from clearing import signing
from clearing.clear import clear, make_folder, snapshot_isolation
from clearing.models import ClosedMonth
from clearing.period import Month, month_begins, month_ends
from clearing.reconcile.batches import check_settled_batches, open_batches
from clearing.reconcile.findings import Finding, FindingList
from clearing.reconcile.journal_file import check_accounted, check_file, daily_volume
from clearing.reconcile.pack import LISTS, Pack
from clearing.reconcile.page import write_page
from clearing.reconcile.points import check_points, points_roll_forward
from clearing.reconcile.rules import check_fees, check_protocol
from clearing.statements import OperatorFigures
from gateway.config import Config
from gateway.errors import BadInput, CheckFailed
from gateway.ledger import unit_of_work


def refuse_unclosed(session: Session, month: Month) -> ClosedMonth:
    """The month's close, or `BadInput`: a pack is made of a closed month only."""
    closed = session.get(ClosedMonth, month.key)
    if closed is None:
        raise BadInput(
            f"--month {month.key}: the month is not closed; run vipgate clear --month "
            f"{month.key} first"
        )
    return closed


def reconcile(engine: Engine, config: Config, month: Month, out: Path, now: datetime) -> Pack:
    """Build the month's pack in `out`; the month must have been closed by `clear`."""
    with unit_of_work(engine) as session:
        closed = refuse_unclosed(session, month)
    # The issuer's own key, never one made here: a pack checked against a key made on the spot
    # would say RECONCILED over a signature the acquirer's public key rejects. Read before
    # `out` is made, so a refusal leaves no folder behind.
    key = signing.load_private(config.issuer.signing_key).public_key()
    make_folder(out)
    lists = {
        name: FindingList(name, title, first, second, out) for name, title, first, second in LISTS
    }
    pack = Pack(month, out, now, closed, lists)
    path = _settlement_file(engine, config, pack)
    tz, cutoff = config.gateway.timezone, config.gateway.cutoff
    span = (month_begins(month, tz, cutoff), month_ends(month, tz, cutoff))
    with unit_of_work(engine) as session:
        snapshot_isolation(session)
        pack.batches = check_settled_batches(session, *span, lists["batches"], lists["uploads"])
        pack.open_batches = open_batches(session, month.first_date, month.last_date)
        _journal_and_file(session, pack, path, key)
        check_protocol(session, month, lists["protocol"])
        pack.daily = daily_volume(session, month.key)
        sums = pack.file_check.merchants if pack.file_check else []
        totals = (sum(m.fees_fen for m in sums), sum(m.settled_fen for m in sums))
        pack.fees = check_fees(session, closed, totals, span, lists["fees"])
    for findings in lists.values():
        findings.close()
    pack.page = write_page(pack)
    return pack


def _settlement_file(engine: Engine, config: Config, pack: Pack) -> Path | None:
    """The file in the pack's folder, written there first when missing; None if it cannot
    be written as the month closed it (an exception)."""
    path = pack.out / pack.closed.file_name
    if path.exists():
        return path
    try:
        clear(engine, config, pack.month, pack.out, pack.generated_at)
    except CheckFailed as error:
        problem = "the month's file cannot be written again"
        pack.lists["settlement"].add(Finding(problem, detail=str(error)))
        return None
    return path


def _journal_and_file(
    session: Session, pack: Pack, path: Path | None, key: Ed25519PublicKey
) -> None:
    lists = pack.lists
    file_points = 0
    if path is not None:
        pack.file_check = check_file(session, pack.closed, path, key, lists["settlement"])
        totals = pack.file_check.verification.totals
        file_points = totals.points_given - totals.points_returned
        pack.figures = OperatorFigures(
            totals, pack.closed.terminal_count, pack.closed.terminal_fee_fen
        )
    closed_months = set(session.scalars(select(ClosedMonth.month)))
    pack.waiting = check_accounted(
        session, pack.month.first_date, pack.month.last_date, closed_months, lists["settlement"]
    )
    pack.points = check_points(
        session, pack.month, file_points=file_points, findings=lists["points"]
    )
    pack.roll_forward = points_roll_forward(session, pack.month)

"""Second way: the gateway's journal against the settlement file (points-and-clearing.md §7).

The file is checked as the acquirer checks it (structure, totals, SHA-256, signature), its
SHA-256 against the one recorded when the month closed, and then record by record against the
ledger: the details are regenerated from the authorisations in the file's order and compared
with the file's in the same pass (a merge of two sorted streams, so memory does not grow with
the month), which proves every entry is in the file exactly once with its figures. Totals are
then recomputed a second, independent way, in SQL (the fee rounding included), per merchant
and for the month. Finally every authorisation of the month that moves money must have been
accounted for by a close; one that was not is an exception, unless it waits for the close of
an earlier month that has not happened yet (then it is listed, not counted).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import and_, case, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from clearing.entries import details
from clearing.layout import Detail, timestamp
from clearing.models import ClosedMonth, SettledItem
from clearing.reconcile.findings import Finding, FindingList, masked
from clearing.reconcile.points import moves_money
from clearing.verify import Verification, verify_file
from gateway.ledger.journal import sum_of
from gateway.ledger.models import Authorisation, AuthorisationKind

KIND_OF_TYPE = {
    "22": AuthorisationKind.REDEMPTION,
    "25": AuthorisationKind.REFUND,
    "23": AuthorisationKind.VOID,
    "04": AuthorisationKind.REVERSAL,
}
DETAIL_FIELDS = (
    "sequence",
    "merchant_id",
    "terminal_id",
    "business_date",
    "entry_type",
    "batch",
    "trace",
    "rrn",
    "card_masked",
    "list_amount_fen",
    "discount_bp",
    "settled_fen",
    "points",
    "fee_fen",
    "net_fen",
    "original_rrn",
)


@dataclass(frozen=True)
class MerchantSums:
    """A merchant's entries summed in SQL: count, settled, fees (rounded per entry)."""

    merchant_id: str
    count: int
    settled_fen: int
    fees_fen: int


@dataclass
class FileCheck:
    path: Path
    verification: Verification
    recorded_sha256: str | None
    compared: int = 0
    merchants: list[MerchantSums] = field(default_factory=list)
    waiting: list[Finding] = field(default_factory=list)


class _Merge:
    """Compares the file's details, as `verify` reads them, with the ledger's, in order."""

    def __init__(self, expected: Iterator[Detail], findings: FindingList) -> None:
        self.expected = expected
        self.findings = findings
        self.next = next(expected, None)
        self.compared = 0

    def __call__(self, found: Detail) -> None:
        while self.next is not None and self.next.order_key() < found.order_key():
            self._missing(self.next)
            self.next = next(self.expected, None)
        ours = self.next
        if ours is None or ours.order_key() != found.order_key():
            self.findings.add(_about(found, "in the file, not an entry of the ledger", found))
            return
        self.compared += 1
        if not _same(ours, found):
            self.findings.add(
                _about(ours, "the file's figures differ", found, _differences(ours, found))
            )
        self.next = next(self.expected, None)

    def _missing(self, ours: Detail) -> None:
        self.findings.add(_about(ours, "an entry of the ledger missing from the file", None))

    def finish(self) -> None:
        while self.next is not None:
            self._missing(self.next)
            self.next = next(self.expected, None)


def _same(ours: Detail, found: Detail) -> bool:
    """Every field equal, the time to the second (the file carries no fractions)."""
    return (
        ours[:4] == found[:4]
        and ours[5:] == found[5:]
        and ours.local_time.replace(microsecond=0) == found.local_time
    )


def _differences(ours: Detail, found: Detail) -> str:
    names = [name for name in DETAIL_FIELDS if getattr(ours, name) != getattr(found, name)]
    if timestamp(ours.local_time) != timestamp(found.local_time):
        names.append("local_time")
    return "differs in " + ", ".join(names)


def _about(where: Detail, problem: str, found: Detail | None, detail: str = "") -> Finding:
    return Finding(
        problem,
        terminal=where.terminal_id,
        batch=where.batch,
        trace=where.trace,
        card=where.card_masked,
        rrn=where.rrn,
        first_fen=None if found is not None and found is where else where.settled_fen,
        second_fen=None if found is None else found.settled_fen,
        detail=detail or f"type {where.entry_type}, merchant {where.merchant_id}",
    )


def check_file(
    session: Session,
    closed: ClosedMonth,
    path: Path,
    public_key: Ed25519PublicKey,
    findings: FindingList,
) -> FileCheck:
    """The file against the ledger; every disagreement into `findings`."""
    merge = _Merge(details(session, closed.month), findings)
    verification = verify_file(path, public_key, on_detail=merge)
    merge.finish()
    for fault in verification.faults:
        findings.add(Finding("the file does not verify", detail=fault))
    for _ in range(verification.fault_count - len(verification.faults)):
        findings.add(Finding("the file does not verify", detail="(one more fault)"))
    if closed.file_sha256 is None:
        findings.add(Finding("no SHA-256 was recorded when the month closed"))
    elif verification.sha256 != closed.file_sha256:
        findings.add(
            Finding(
                "the file is not the one written when the month closed",
                detail=f"recorded {closed.file_sha256}, file {verification.sha256}",
            )
        )
    check = FileCheck(path, verification, closed.file_sha256, merge.compared)
    check.merchants = merchant_sums(session, closed.month)
    _compare_sums(check, findings)
    _check_items(session, closed, findings)
    return check


def merchant_sums(session: Session, month_key: str) -> list[MerchantSums]:
    """Each merchant's entries summed in SQL, the fee rounded half up per entry (integers)."""
    settled = SettledItem.sign * Authorisation.settled_fen
    # `//`: SQL integer division on both backends (SQLAlchemy renders `/` as true division).
    fee = SettledItem.sign * ((Authorisation.settled_fen * Authorisation.fee_bp + 5000) // 10000)
    query = (
        select(Authorisation.merchant_id, func.count(), sum_of(settled), sum_of(fee))
        .select_from(SettledItem)
        .join(Authorisation, Authorisation.id == SettledItem.authorisation_id)
        .where(SettledItem.month == month_key, SettledItem.entry_type.is_not(None))
        .group_by(Authorisation.merchant_id)
        .order_by(Authorisation.merchant_id)
    )
    return [MerchantSums(m, int(c), int(s), int(f)) for m, c, s, f in session.execute(query)]


def _compare_sums(check: FileCheck, findings: FindingList) -> None:
    """The SQL sums against the file's merchant records and trailer."""
    records = {record.merchant_id: record for record in check.verification.merchant_records}
    for sums in check.merchants:
        record = records.pop(sums.merchant_id, None)
        stated = None
        if record is not None:
            count = record.redemption_count + record.other_count
            stated = (count, record.redemptions_fen + record.others_fen, record.fees_fen)
        if stated != (sums.count, sums.settled_fen, sums.fees_fen):
            findings.add(
                Finding(
                    "a merchant's totals differ between the ledger and the file",
                    first_fen=sums.settled_fen,
                    second_fen=None if stated is None else stated[1],
                    detail=f"merchant {sums.merchant_id}: ledger {sums.count} entries, "
                    f"fees {sums.fees_fen} fen; file {stated}",
                )
            )
    for merchant_id in records:
        findings.add(Finding("a merchant record without entries in the ledger", detail=merchant_id))
    trailer = check.verification.trailer
    total = (
        sum(sums.count for sums in check.merchants),
        sum(sums.settled_fen for sums in check.merchants),
        sum(sums.fees_fen for sums in check.merchants),
    )
    if trailer is None or (trailer.detail_count, trailer.settled_fen, trailer.fees_fen) != total:
        findings.add(
            Finding(
                "the month's totals differ between the ledger and the file",
                first_fen=total[1],
                second_fen=None if trailer is None else trailer.settled_fen,
                detail=f"ledger {total[0]} entries, fees {total[2]} fen",
            )
        )


def _check_items(session: Session, closed: ClosedMonth, findings: FindingList) -> None:
    """What the close recorded against the authorisations it names."""
    wrong_kind = (
        select(Authorisation, SettledItem.entry_type)
        .join(SettledItem, SettledItem.authorisation_id == Authorisation.id)
        .where(SettledItem.month == closed.month, SettledItem.entry_type.is_not(None))
        .where(
            ~or_(
                *(
                    and_(SettledItem.entry_type == entry_type, Authorisation.kind == kind)
                    for entry_type, kind in KIND_OF_TYPE.items()
                )
            )
        )
    )
    for authorisation, entry_type in session.execute(wrong_kind):
        problem = f"a type {entry_type} entry for a {authorisation.kind.value}"
        findings.add(_finding_for(authorisation, problem))
    undoing = aliased(Authorisation)
    never_undone = (
        select(Authorisation)
        .join(SettledItem, SettledItem.authorisation_id == Authorisation.id)
        .where(
            SettledItem.month == closed.month,
            SettledItem.entry_type.is_(None),
            Authorisation.kind == AuthorisationKind.REDEMPTION,
            ~exists().where(
                undoing.original_id == Authorisation.id,
                undoing.kind.in_([AuthorisationKind.VOID, AuthorisationKind.REVERSAL]),
                undoing.journal_transaction_id.is_not(None),
            ),
        )
    )
    for authorisation in session.scalars(never_undone):
        findings.add(_finding_for(authorisation, "a redemption left out of the file, never undone"))


def _finding_for(authorisation: Authorisation, problem: str, detail: str = "") -> Finding:
    return Finding(
        problem,
        terminal=authorisation.terminal_id,
        batch=authorisation.batch_number,
        trace=authorisation.trace,
        card=masked(authorisation.card_number),
        rrn=authorisation.rrn,
        first_fen=authorisation.settled_fen,
        detail=detail or f"{authorisation.kind.value} of {authorisation.business_date}",
    )


def check_accounted(
    session: Session, first: date, last: date, closed_months: set[str], findings: FindingList
) -> list[Finding]:
    """The month's authorisations that move money but no close accounted for: an exception,
    unless a void or reversal whose redemption's month is not closed yet (returned, to be
    listed as waiting)."""
    original = aliased(Authorisation)
    root = aliased(Authorisation)
    root_date = case(
        (original.kind == AuthorisationKind.VOID, root.business_date), else_=original.business_date
    )
    query = (
        select(Authorisation, root_date)
        .outerjoin(original, original.id == Authorisation.original_id)
        .outerjoin(root, root.id == original.original_id)
        .where(
            moves_money(),
            Authorisation.business_date >= first,
            Authorisation.business_date <= last,
            ~exists().where(SettledItem.authorisation_id == Authorisation.id),
        )
        .order_by(
            Authorisation.terminal_id,
            Authorisation.batch_number,
            Authorisation.trace,
            Authorisation.id,
        )
    )
    waiting = []
    for authorisation, root_business_date in session.execute(query):
        undoing = authorisation.kind in (AuthorisationKind.VOID, AuthorisationKind.REVERSAL)
        if (
            undoing
            and root_business_date is not None
            and f"{root_business_date:%Y-%m}" not in closed_months
        ):
            waiting.append(
                _finding_for(
                    authorisation,
                    "waits for the close of its redemption's month",
                    f"redemption of {root_business_date}",
                )
            )
            continue
        findings.add(_finding_for(authorisation, "moves money but no close accounted for it"))
    return waiting


@dataclass(frozen=True)
class DailyVolume:
    """One business date of the month's entries: what pays merchants and what takes back."""

    business_date: date
    entries: int
    paid_fen: int
    taken_back_fen: int


def daily_volume(session: Session, month_key: str) -> list[DailyVolume]:
    """The month's entries per business date, summed in SQL."""
    paid = case((SettledItem.sign > 0, Authorisation.settled_fen), else_=0)
    taken = case((SettledItem.sign < 0, Authorisation.settled_fen), else_=0)
    query = (
        select(Authorisation.business_date, func.count(), sum_of(paid), sum_of(taken))
        .select_from(SettledItem)
        .join(Authorisation, Authorisation.id == SettledItem.authorisation_id)
        .where(SettledItem.month == month_key, SettledItem.entry_type.is_not(None))
        .group_by(Authorisation.business_date)
        .order_by(Authorisation.business_date)
    )
    return [DailyVolume(d, int(n), int(p), int(t)) for d, n, p, t in session.execute(query)]

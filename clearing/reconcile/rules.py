"""The fee rules of §5 and the protocol's own exceptions (pos-8583.md §4.6), for the pack.

Fees: no merchant may pay more on VIP cards than on bank cards (its fee_bp at most its
bank_card_fee_bp), neither in the rates recorded at the close nor in the rate each entry was
charged at; the month's average fee, fees over settled amounts for all merchants, may not be
above 1%; and the terminal fee must be paid for exactly the terminals enabled in the month.
All comparisons are integer cross-multiplications.

Protocol: a reversal for a batch already closed is answered `00` and changes nothing, and a
void whose points the card no longer holds cannot be reversed; the gateway marks both on the
authorisation (`exception`), and each is listed with the original it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from clearing.close import enabled_terminals
from clearing.models import ClosedMonth, ClosedMonthMerchant, SettledItem
from clearing.money import AVERAGE_FEE_LIMIT_BP, average_fee_above
from clearing.period import Month
from clearing.reconcile.findings import Finding, FindingList, masked
from gateway.ledger.journal import sum_of
from gateway.ledger.models import Authorisation, Merchant
from gateway.ledger.records import find_reversal_original

EXCEPTION_NAMES = {
    "reversal_closed_batch": "reversal for a closed batch: nothing changed",
    "void_stands": "void could not be taken back: the card no longer holds the points",
}


def basis_points_text(part: int, whole: int) -> str:
    """part / whole in basis points with two decimals, computed in integers ("80.00 bp");
    two negative sums (a month of net refunds) give a positive rate."""
    if whole == 0:
        return "n/a"
    hundredths = abs(part) * 1_000_000 // abs(whole)
    sign = "-" if part != 0 and (part < 0) != (whole < 0) else ""
    return f"{sign}{hundredths // 100}.{hundredths % 100:02d} bp"


@dataclass(frozen=True)
class MerchantFees:
    merchant_id: str
    name: str
    fee_bp: int
    bank_card_fee_bp: int


@dataclass(frozen=True)
class FeeCheck:
    merchants: list[MerchantFees]
    fees_fen: int
    settled_fen: int
    terminals_counted: int
    terminals_now: int

    @property
    def average(self) -> str:
        return basis_points_text(self.fees_fen, self.settled_fen)


def check_fees(
    session: Session,
    closed: ClosedMonth,
    totals: tuple[int, int],
    enabled_span: tuple[datetime, datetime],
    findings: FindingList,
) -> FeeCheck:
    """The fee rules for the month; `totals` is (fees, settled) from the ledger's sums."""
    query = (
        select(ClosedMonthMerchant, Merchant.name)
        .join(Merchant, Merchant.id == ClosedMonthMerchant.merchant_id)
        .where(ClosedMonthMerchant.month == closed.month)
        .order_by(ClosedMonthMerchant.merchant_id)
    )
    merchants = []
    for rate, name in session.execute(query):
        merchants.append(MerchantFees(rate.merchant_id, name, rate.fee_bp, rate.bank_card_fee_bp))
        if rate.fee_bp > rate.bank_card_fee_bp:
            findings.add(
                Finding(
                    "fee above the merchant's bank card fee",
                    detail=f"merchant {rate.merchant_id}: fee {rate.fee_bp} bp, "
                    f"bank cards {rate.bank_card_fee_bp} bp",
                )
            )
    _entries_above_bank(session, closed, findings)
    fees, settled = totals
    if average_fee_above(fees, settled):
        findings.add(
            Finding(
                f"average fee above {AVERAGE_FEE_LIMIT_BP} bp",
                first_fen=fees,
                second_fen=settled,
                detail=f"fees {fees} fen over settled {settled} fen: "
                f"{basis_points_text(fees, settled)}",
            )
        )
    begins, ends = enabled_span
    now = len(enabled_terminals(session, begins, ends))
    if now != closed.terminal_count:
        findings.add(
            Finding(
                "terminal fees paid for another number of terminals",
                detail=f"{closed.terminal_count} at the close, {now} enabled by the history now",
            )
        )
    return FeeCheck(merchants, fees, settled, closed.terminal_count, now)


def _entries_above_bank(session: Session, closed: ClosedMonth, findings: FindingList) -> None:
    """Entries charged at a rate above their merchant's bank card fee, per merchant."""
    query = (
        select(
            Authorisation.merchant_id,
            func.max(Authorisation.fee_bp),
            ClosedMonthMerchant.bank_card_fee_bp,
            func.count(),
            sum_of(SettledItem.sign * Authorisation.settled_fen),
        )
        .select_from(SettledItem)
        .join(Authorisation, Authorisation.id == SettledItem.authorisation_id)
        .join(
            ClosedMonthMerchant,
            (ClosedMonthMerchant.month == SettledItem.month)
            & (ClosedMonthMerchant.merchant_id == Authorisation.merchant_id),
        )
        .where(
            SettledItem.month == closed.month,
            SettledItem.entry_type.is_not(None),
            Authorisation.fee_bp > ClosedMonthMerchant.bank_card_fee_bp,
        )
        .group_by(Authorisation.merchant_id, ClosedMonthMerchant.bank_card_fee_bp)
        .order_by(Authorisation.merchant_id)
    )
    for merchant_id, highest, bank, count, settled in session.execute(query):
        findings.add(
            Finding(
                "entries charged above the merchant's bank card fee",
                first_fen=int(settled),
                detail=f"merchant {merchant_id}: {count} entries at up to {highest} bp, "
                f"bank cards {bank} bp",
            )
        )


def check_protocol(session: Session, month: Month, findings: FindingList) -> None:
    """The month's reversals of closed batches and voids that could not be taken back."""
    query = (
        select(Authorisation)
        .where(
            Authorisation.exception.is_not(None),
            Authorisation.business_date >= month.first_date,
            Authorisation.business_date <= month.last_date,
        )
        .order_by(Authorisation.terminal_id, Authorisation.batch_number, Authorisation.trace)
    )
    for reversal in session.scalars(query):
        card = reversal.card_number
        rrn = ""
        original_fen = None
        original = find_reversal_original(
            session, reversal.terminal_id, reversal.batch_number, reversal.trace
        )
        if original is not None and original.id != reversal.id:
            card = card or original.card_number
            rrn = original.rrn
            original_fen = original.amount_fen
        findings.add(
            Finding(
                EXCEPTION_NAMES.get(reversal.exception or "", reversal.exception or ""),
                terminal=reversal.terminal_id,
                batch=reversal.batch_number,
                trace=reversal.trace,
                card=masked(card),
                rrn=rrn,
                first_fen=reversal.requested_amount_fen,
                second_fen=original_fen,
                detail=f"reversal {reversal.rrn} on {reversal.business_date}"
                + (f", original {rrn}" if rrn else ", original not found"),
            )
        )

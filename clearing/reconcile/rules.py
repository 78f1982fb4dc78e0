"""The fee rules of §5 and the protocol's own exceptions (pos-8583.md §4.6), for the pack.

Fees: no merchant may pay more on VIP cards than on bank cards (its fee_bp at most its
bank_card_fee_bp), neither in the rates recorded at the close nor in the rate each entry was
charged at; the month's average fee, fees over settled amounts for all merchants, may not be
above 1%; and the terminal fee must be paid for exactly the terminals enabled in the month
(or served in it, `clearing.close.terminals_for_fee`). The pack shows what explains each fee:
the rates the entries were charged at, and each terminal paid for, with why.
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

from clearing.close import terminals_for_fee
from clearing.models import ClosedMonth, ClosedMonthMerchant, SettledItem
from clearing.money import AVERAGE_FEE_LIMIT_BP, average_fee_above
from clearing.period import Month
from clearing.reconcile.findings import Finding, FindingList, masked
from gateway.config import BP_WHOLE
from gateway.ledger.journal import sum_of
from gateway.ledger.models import Authorisation, Merchant, Terminal
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
class TerminalFee:
    """A terminal the month's terminal fee is paid for, its merchant now, and why."""

    terminal_id: str
    merchant_id: str
    why: str


@dataclass(frozen=True)
class RateCharged:
    """A merchant's entries of the month charged at one rate."""

    merchant_id: str
    fee_bp: int
    entries: int
    settled_fen: int
    fees_fen: int


@dataclass(frozen=True)
class FeeCheck:
    merchants: list[MerchantFees]
    fees_fen: int
    settled_fen: int
    terminals_counted: int
    terminals_now: int
    terminals: list[TerminalFee]
    rates: list[RateCharged]

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
    """The fee rules for the month; `totals` is (fees, settled) from the ledger's sums.
    Also what explains each fee: the rates the entries were charged at, and the terminals
    the terminal fee is paid for, each with why."""
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
    terminals = terminals_for_fee(session, Month.parse(closed.month), begins, ends)
    now = len(terminals)
    if now != closed.terminal_count:
        findings.add(
            Finding(
                "terminal fees paid for another number of terminals",
                detail=f"{closed.terminal_count} at the close, {now} by the ledger now",
            )
        )
    query_owners = select(Terminal.id, Terminal.merchant_id).where(Terminal.id.in_(list(terminals)))
    owners = {terminal: merchant for terminal, merchant in session.execute(query_owners)}
    paid_for = [
        TerminalFee(terminal, owners.get(terminal, ""), why) for terminal, why in terminals.items()
    ]
    rates = _rates_charged(session, closed)
    return FeeCheck(merchants, fees, settled, closed.terminal_count, now, paid_for, rates)


def _rates_charged(session: Session, closed: ClosedMonth) -> list[RateCharged]:
    """The month's entries grouped by merchant and the rate each was charged at (the one in
    force when its original was authorised, §5), with their fees as the file computes them:
    round half up on |D|, with the entry's sign. A rate that changed within the month, or
    since an original of an earlier month, shows here beside the rate at the close."""
    # `//`: SQL integer division on both backends (`/` would be true division).
    fee = (Authorisation.settled_fen * Authorisation.fee_bp + BP_WHOLE // 2) // BP_WHOLE
    query = (
        select(
            Authorisation.merchant_id,
            Authorisation.fee_bp,
            func.count(),
            sum_of(SettledItem.sign * Authorisation.settled_fen),
            sum_of(SettledItem.sign * fee),
        )
        .select_from(SettledItem)
        .join(Authorisation, Authorisation.id == SettledItem.authorisation_id)
        .where(SettledItem.month == closed.month, SettledItem.entry_type.is_not(None))
        .group_by(Authorisation.merchant_id, Authorisation.fee_bp)
        .order_by(Authorisation.merchant_id, Authorisation.fee_bp)
    )
    return [
        RateCharged(merchant_id, int(fee_bp), int(count), int(settled), int(fees))
        for merchant_id, fee_bp, count, settled, fees in session.execute(query)
    ]


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

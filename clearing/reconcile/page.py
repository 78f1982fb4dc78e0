"""The reconciliation pack as one self-contained HTML page for a person to read.

Everything is inline (styles, SVG charts) and nothing is fetched, so the page opens the same
from an auditor's laptop, an archive or a mail attachment years later. Every value is escaped
on the way in; card numbers are already masked in the findings. Figures are integer fen and
points as the files carry them; only the average fee is shown as basis points, computed in
integers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from html import escape
from pathlib import Path

from clearing.layout import signature_name
from clearing.reconcile.charts import Series, daily_chart, merchant_chart
from clearing.reconcile.findings import Finding, FindingList
from clearing.reconcile.journal_file import FileCheck
from clearing.reconcile.pack import Pack
from clearing.reconcile.rules import RateCharged
from gateway.clock import SHANGHAI

MERCHANTS_CHARTED = 20
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 72em; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #2f6f9f; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eef3f7; }
.verdict { font-size: 1.4em; font-weight: bold; padding: 0.4em 0.8em; display: inline-block; }
.good { background: #dcefd9; color: #1d5d1a; }
.bad { background: #f6d8d2; color: #8a1f0f; }
.note { color: #555; font-size: 0.9em; }
"""


def _cell(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="n">{value}</td>'
    return f"<td>{escape(str(value))}</td>"


def table(headings: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{escape(heading)}</th>" for heading in headings)
    body = "".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _finding_rows(findings: Iterable[Finding]) -> list[list[object]]:
    return [
        [
            f.problem,
            f.terminal,
            "" if f.batch is None else f"{f.batch:06d}",
            "" if f.trace is None else f"{f.trace:06d}",
            f.card,
            f.rrn,
            "" if f.first_fen is None else f.first_fen,
            "" if f.second_fen is None else f.second_fen,
            f.detail,
        ]
        for f in findings
    ]


def exceptions(findings: FindingList) -> str:
    title = f"<h3>Exceptions: {escape(findings.title)} ({findings.count})</h3>"
    if findings.count == 0:
        return f"{title}<p class='note'>None.</p>"
    more = findings.count - len(findings.shown)
    note = f"<p class='note'>{more} more in {escape(findings.path.name)}.</p>" if more else ""
    return title + table(findings.columns, _finding_rows(findings.shown)) + note


def _summary(pack: Pack) -> str:
    closed = pack.closed
    rows: list[list[object]] = [
        ["month", pack.month.key],
        ["closed at", closed.closed_at.astimezone(SHANGHAI).isoformat()],
        ["sender / receiver", f"{closed.sender_id} / {closed.receiver_id}"],
        ["settlement file", closed.file_name],
    ]
    if pack.figures is not None:
        rows.extend([name.replace("_", " "), value] for name, value in pack.figures.rows())
    return "<h2>Operator statement</h2>" + table(["figure", "value"], rows)


def _charts(pack: Pack) -> str:
    by_date = {line.business_date: line for line in pack.daily}
    dates = [
        pack.month.first_date + timedelta(days=offset) for offset in range(pack.month.last_date.day)
    ]
    daily = daily_chart(
        "Daily volume: settled per business date (fen)",
        [day.isoformat() for day in dates],
        Series("paid to merchants", [by_date[d].paid_fen if d in by_date else 0 for d in dates]),
        Series(
            "taken back (refunds, voids, reversals)",
            [by_date[d].taken_back_fen if d in by_date else 0 for d in dates],
        ),
    )
    sums = pack.file_check.merchants if pack.file_check else []
    top = sorted(sums, key=lambda sums: (-sums.settled_fen, sums.merchant_id))[:MERCHANTS_CHARTED]
    merchants = merchant_chart(
        "Per-merchant totals (fen)",
        [sums.merchant_id for sums in top],
        [
            Series("settled", [sums.settled_fen for sums in top]),
            Series("fees", [sums.fees_fen for sums in top]),
            Series("net", [sums.settled_fen - sums.fees_fen for sums in top]),
        ],
    )
    rows = [
        [line.business_date.isoformat(), line.entries, line.paid_fen, -line.taken_back_fen]
        for line in pack.daily
    ]
    return (
        "<h2>Charts</h2>"
        + daily
        + table(["business date", "entries", "paid fen", "taken back fen"], rows)
        + merchants
    )


def _terminals(pack: Pack) -> str:
    rows = []
    for line in pack.batches:
        terminal, gateway = line.terminal, line.gateway
        rows.append(
            [
                line.terminal_id,
                f"{line.batch_number:06d}",
                ""
                if line.closed_at is None
                else line.closed_at.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M"),
                "balanced" if line.balanced else "NOT BALANCED",
                f"{terminal.debit_count} / {terminal.debit_fen}" if terminal else "",
                f"{gateway.debit_count} / {gateway.debit_fen}",
                f"{terminal.credit_count} / {terminal.credit_fen}" if terminal else "",
                f"{gateway.credit_count} / {gateway.credit_fen}",
                "" if line.uploaded_records is None else line.uploaded_records,
            ]
        )
    headings = [
        "terminal",
        "batch",
        "settled at",
        "result",
        "terminal debits (n / fen)",
        "gateway debits (n / fen)",
        "terminal credits (n / fen)",
        "gateway credits (n / fen)",
        "uploaded records",
    ]
    opened = [
        [
            line.terminal_id,
            f"{line.batch_number:06d}",
            line.transactions,
            line.first_business_date.isoformat(),
        ]
        for line in pack.open_batches
    ]
    return (
        "<h2>1. Terminals against the journal</h2>"
        + f"<p>{len(pack.batches)} batches settled in the month.</p>"
        + table(headings, rows)
        + "<h3>Batches still open with the month's transactions</h3>"
        + (
            table(["terminal", "batch", "transactions", "from business date"], opened)
            if opened
            else "<p class='note'>None.</p>"
        )
        + exceptions(pack.lists["batches"])
        + exceptions(pack.lists["uploads"])
    )


MERCHANT_COMPARISON = (
    "merchant",
    "ledger entries",
    "file entries",
    "ledger settled fen",
    "file settled fen",
    "ledger fees fen",
    "file fees fen",
)


def _file_facts(check: FileCheck) -> list[list[object]]:
    verification = check.verification
    signature = "good" if verification.signature_good else "NOT GOOD"
    facts: list[list[object]] = [
        ["file", check.path.name],
        ["signature", f"{signature_name(check.path.name)}: {signature}"],
        ["SHA-256 of the file", verification.sha256],
        ["SHA-256 recorded at the close", check.recorded_sha256 or "none"],
        ["faults found by verify", verification.fault_count],
        ["details compared with the ledger", check.compared],
    ]
    trailer = verification.trailer
    if trailer is not None:
        counts = f"{trailer.detail_count} / {trailer.merchant_count}"
        money = f"{trailer.settled_fen} / {trailer.fees_fen} / {trailer.net_fen}"
        facts.append(["trailer: details / merchants", counts])
        facts.append(["trailer: settled / fees / net (fen)", money])
    return facts


def _merchant_comparison(check: FileCheck) -> list[list[object]]:
    """Each merchant: the ledger's SQL sums beside the file's merchant record."""
    records = {record.merchant_id: record for record in check.verification.merchant_records}
    rows: list[list[object]] = []
    for sums in check.merchants:
        record = records.get(sums.merchant_id)
        rows.append(
            [
                sums.merchant_id,
                sums.count,
                "" if record is None else record.redemption_count + record.other_count,
                sums.settled_fen,
                "" if record is None else record.redemptions_fen + record.others_fen,
                sums.fees_fen,
                "" if record is None else record.fees_fen,
            ]
        )
    return rows


def _file(pack: Pack) -> str:
    title = "<h2>2. The journal against the settlement file</h2>"
    check = pack.file_check
    if check is None:
        return title + "<p>No file.</p>" + exceptions(pack.lists["settlement"])
    waiting = ""
    if pack.waiting:
        headings = ["problem", "terminal", "batch", "trace", "card", "rrn", "settled fen", ""]
        waiting = "<h3>Waiting for an earlier month's close (not counted)</h3>" + table(
            [*headings, "detail"], _finding_rows(pack.waiting)
        )
    return (
        title
        + table(["", ""], _file_facts(check))
        + table(MERCHANT_COMPARISON, _merchant_comparison(check))
        + waiting
        + exceptions(pack.lists["settlement"])
    )


def _points(pack: Pack) -> str:
    balance = pack.points
    rows: list[list[object]] = []
    if balance is not None:
        rows = [
            ["points given up minus returned, by the journal", balance.journal],
            ["the same, by the month's authorisations", balance.authorisations],
            ["of which in the settlement file (entries)", balance.in_file],
            ["of which undone before a close (no entry)", balance.without_entry],
            ["of which not accounted for by any close yet", balance.not_accounted],
            ["points in the settlement file (given up minus returned)", balance.file],
        ]
    invariants = [f for f in pack.lists["points"].shown if f.problem.startswith("ledger invariant")]
    status = "hold" if not invariants and pack.lists["points"].count == 0 else "see the exceptions"
    roll = pack.roll_forward
    held: list[list[object]] = []
    if roll is not None:
        held = [
            ["held by the cards before the month", roll.opening],
            *(
                [f"{kind} (journal transactions of the month)", points]
                for kind, points in roll.movements
            ),
            ["held by the cards after the month", roll.closing],
        ]
    return (
        "<h2>3. Points against money</h2>"
        + table(["figure", "points"], rows)
        + "<h3>The cards' points over the month (by business date)</h3>"
        + table(["figure", "points"], held)
        + f"<p>Ledger invariants (points-and-clearing.md §3): {status}.</p>"
        + exceptions(pack.lists["points"])
    )


def _fees(pack: Pack) -> str:
    fees = pack.fees
    if fees is None:
        return ""
    rows = [[m.merchant_id, m.name, m.fee_bp, m.bank_card_fee_bp] for m in fees.merchants]
    at_close = {m.merchant_id: m.fee_bp for m in fees.merchants}

    def closing(rate: RateCharged) -> str:
        return "yes" if at_close.get(rate.merchant_id) == rate.fee_bp else "no"

    return (
        "<h2>4. Fee rules</h2>"
        + table(["merchant", "name", "fee bp at the close", "bank card fee bp"], rows)
        + table(
            ["figure", "value"],
            [
                ["fees (fen)", fees.fees_fen],
                ["settled (fen)", fees.settled_fen],
                ["average fee (limit 100 bp)", fees.average],
                ["terminals paid for at the close", fees.terminals_counted],
                ["terminals to pay for, by the ledger now", fees.terminals_now],
            ],
        )
        + "<h3>Rates the month's entries were charged at</h3>"
        + "<p>Each entry is charged at the rate in force when its original was authorised"
        " (points-and-clearing.md §5); the merchant record carries the rate at the close.</p>"
        + table(
            ["merchant", "fee bp", "entries", "settled fen", "fees fen", "the rate at the close"],
            [
                [r.merchant_id, r.fee_bp, r.entries, r.settled_fen, r.fees_fen, closing(r)]
                for r in fees.rates
            ],
        )
        + "<h3>Terminals the terminal fee is paid for</h3>"
        + table(
            ["terminal", "merchant now", "why"],
            [[t.terminal_id, t.merchant_id, t.why] for t in fees.terminals],
        )
        + exceptions(pack.lists["fees"])
    )


def render(pack: Pack) -> str:
    good = pack.exception_count == 0
    verdict = f'<p class="verdict {"good" if good else "bad"}">{escape(pack.verdict)}</p>'
    generated = pack.generated_at.astimezone(SHANGHAI).isoformat()
    body = (
        f"<h1>Reconciliation pack: {escape(pack.month.key)}</h1>"
        f"<p class='note'>Issuer {escape(pack.closed.sender_id)}, "
        f"generated {escape(generated)}.</p>"
        + verdict
        + _summary(pack)
        + _charts(pack)
        + _terminals(pack)
        + _file(pack)
        + _points(pack)
        + _fees(pack)
        + "<h2>5. Protocol exceptions</h2>"
        + exceptions(pack.lists["protocol"])
        + f"<h2>Verdict</h2>{verdict}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Reconciliation {escape(pack.month.key)}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def write_page(pack: Pack) -> Path:
    path = pack.out / f"reconcile_{pack.month.compact}.html"
    path.write_text(render(pack), encoding="utf-8")
    return path

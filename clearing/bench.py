"""`make bench-clearing`: how fast and in how much memory a month of N entries clears.

It fills a SQLite ledger with a month of N synthetic settlement entries (redemptions, and a
full refund for one in every hundred), consistent down to the journal and the lots so that
the reconciliation finds nothing to object to, then runs `vipgate clear` and `vipgate
reconcile` each in a process of its own and reports, for each, the wall time, entries per
second and the peak resident memory of that process (`os.wait4`'s rusage). Run it at two
sizes (N=100000 and the default N=1000000) to see that memory does not grow with N.

The fill writes rows with the DB-API directly (the ORM would take longer than what is being
measured); the merchants, terminals and cards come from a generated config loaded the way
every command loads one, so their histories and accounts are the gateway's own.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from cardcodec.cards import luhn_check_digit
from clearing.period import Month
from gateway.bootstrap import bootstrap
from gateway.clock import SHANGHAI
from gateway.points import convert

MERCHANTS = 20
TERMINALS_PER_MERCHANT = 5
CARDS = 200
CARD_POINTS = 900_000_000
REFUND_EVERY = 100
ROWS_PER_COMMIT = 50_000
DISCOUNTS_BP = (0, 300, 500, 1000)


def _merchant_id(index: int) -> str:
    return f"8983100{index:08d}"


def _terminal_id(merchant: int, index: int) -> str:
    return f"{merchant:04d}{index:04d}"


def _card(index: int) -> str:
    body = f"668800{index:012d}"
    return body + str(luhn_check_digit(body))


def write_config(folder: Path) -> Path:
    """A config with the bench's merchants, terminals and cards (one big lot each)."""
    lines = [
        "[gateway]",
        f'database = "sqlite:///{folder / "bench.db"}"',
        'acquirer_institution = "48020000"',
        "[issuer]",
        'id = "CMCCVIP00000001"',
        'card_prefixes = ["668800"]',
        'signing_key = "issuer-ed25519.pem"',
        'master_key = "master.key"',
        "[clearing]",
        'acquirer_id = "ACQ000000000001"',
        "terminal_fee_fen_per_month = 3000",
    ]
    for merchant in range(MERCHANTS):
        lines += [
            "[[merchants]]",
            f'id = "{_merchant_id(merchant)}"',
            f'name = "Bench merchant {merchant}"',
            f"fee_bp = {40 + merchant}",
            "bank_card_fee_bp = 100",
        ]
        for terminal in range(TERMINALS_PER_MERCHANT):
            lines += [
                "[[terminals]]",
                f'id = "{_terminal_id(merchant, terminal)}"',
                f'merchant = "{_merchant_id(merchant)}"',
                'suite = "sm4"',
                f'tmk = "{secrets.token_hex(16).upper()}"',
            ]
    for card in range(CARDS):
        lines += [
            "[[cards]]",
            f'number = "{_card(card)}"',
            'expiry = "3012"',
            'tier = "gold"',
            "enrolled = true",
            f'lots = [{{ points = {CARD_POINTS}, earned_on = "2026-01-01" }}]',
        ]
    path = folder / "bench.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class Ids:
    """The rows the fill refers to: accounts and lots by card."""

    redemption_account: int
    card_accounts: dict[str, int]
    lots: dict[str, int]


def _ids(connection: sqlite3.Connection) -> Ids:
    redemption = connection.execute("SELECT id FROM accounts WHERE kind = 'redemption'").fetchone()[
        0
    ]
    accounts = dict(
        connection.execute("SELECT card_number, id FROM accounts WHERE kind = 'card'").fetchall()
    )
    lots = dict(connection.execute("SELECT card_number, id FROM point_lots").fetchall())
    return Ids(redemption, accounts, lots)


def _stamp(instant: datetime) -> str:
    """An instant as the ledger stores it on SQLite: naive UTC text."""
    return instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass(frozen=True)
class Row:
    """One synthetic authorisation and what it moved."""

    kind: str
    card: str
    terminal: str
    merchant: str
    fee_bp: int
    trace: int
    business_date: date
    amount_fen: int
    discount_bp: int
    settled_fen: int
    points: int
    original: int | None


def _rows(month: Month, count: int) -> Iterator[Row]:
    """N authorisations: redemptions, and every hundredth a full refund of the one before."""
    days = month.last_date.day
    for index in range(1, count + 1):
        refund = index % REFUND_EVERY == 0
        source = index - 1 if refund else index
        merchant = source % MERCHANTS
        seed = source * 7919
        conversion = convert(100 + seed % 50_000, DISCOUNTS_BP[seed % len(DISCOUNTS_BP)])
        yield Row(
            kind="refund" if refund else "redemption",
            card=_card(source % CARDS),
            terminal=_terminal_id(merchant, source % TERMINALS_PER_MERCHANT),
            merchant=_merchant_id(merchant),
            fee_bp=40 + merchant,
            trace=index,
            business_date=month.first_date + timedelta(days=source % days),
            amount_fen=conversion.amount_fen,
            discount_bp=conversion.discount_bp,
            settled_fen=conversion.settled_fen,
            points=conversion.points,
            original=source if refund else None,
        )


def _statements(
    row: Row, index: int, first_transaction: int, ids: Ids
) -> dict[str, tuple[object, ...]]:
    """The rows one authorisation puts in each table."""
    transaction = first_transaction + index
    local = datetime.combine(row.business_date, datetime.min.time(), SHANGHAI) + timedelta(
        hours=12, seconds=index % 3600
    )
    refunded = row.kind == "redemption" and (index + 1) % REFUND_EVERY == 0
    sign = -1 if row.kind == "redemption" else 1  # points to the card
    redemption_id = row.original or index
    return {
        "journal_transactions": (
            transaction,
            f"bench:{index}",
            row.kind,
            _stamp(local),
            row.business_date.isoformat(),
            row.card,
        ),
        "card_entry": (transaction, ids.card_accounts[row.card], sign * row.points),
        "system_entry": (transaction, ids.redemption_account, -sign * row.points),
        "authorisations": (
            index,
            f"{index:012d}",
            row.kind,
            row.terminal,
            row.merchant,
            1 + (index - 1) // 999_999,
            1 + (index - 1) % 999_999,
            "000001",
            row.card,
            row.amount_fen,
            row.amount_fen,
            row.discount_bp,
            None,
            row.settled_fen,
            row.points,
            row.fee_bp,
            "00",
            _stamp(local),
            row.business_date.isoformat(),
            row.original,
            "approved",
            row.amount_fen if refunded else 0,
            row.points if refunded else 0,
            row.settled_fen if refunded else 0,
            transaction,
            None,
        ),
        "lot_movements": (
            transaction,
            ids.lots[row.card],
            sign * row.points,
            redemption_id,
            ids.lots[row.card],
        ),
    }


_ENTRY = "INSERT INTO journal_entries (transaction_id, account_id, points) VALUES (?, ?, ?)"
INSERTS = {
    "journal_transactions": "INSERT INTO journal_transactions (id, idempotency_key, kind, "
    "created_at, business_date, card_number) VALUES (?, ?, ?, ?, ?, ?)",
    "card_entry": _ENTRY,
    "system_entry": _ENTRY,
    "authorisations": "INSERT INTO authorisations (id, rrn, kind, terminal_id, merchant_id, "
    "batch_number, trace, auth_code, card_number, requested_amount_fen, amount_fen, discount_bp, "
    "rule_id, settled_fen, points, fee_bp, response_code, local_time, business_date, "
    "original_id, state, refunded_fen, points_returned, fen_clawed, journal_transaction_id, "
    "exception) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    "?, ?)",
    "lot_movements": "INSERT INTO lot_movements "
    "(transaction_id, lot_id, points, redemption_id, origin_lot_id) VALUES (?, ?, ?, ?, ?)",
}


def fill(database: Path, month: Month, count: int) -> None:
    """N entries of the month into the ledger, with their journal and lot movements."""
    connection = sqlite3.connect(database, isolation_level=None)
    try:
        connection.execute("PRAGMA synchronous=OFF")
        ids = _ids(connection)
        first_transaction = connection.execute(
            "SELECT coalesce(max(id), 0) FROM journal_transactions"
        ).fetchone()[0]
        taken: dict[str, int] = {}
        batch: dict[str, list[tuple[object, ...]]] = {table: [] for table in INSERTS}
        connection.execute("BEGIN")
        for index, row in enumerate(_rows(month, count), start=1):
            for table, values in _statements(row, index, first_transaction, ids).items():
                batch[table].append(values)
            delta = row.points if row.kind == "redemption" else -row.points
            taken[row.card] = taken.get(row.card, 0) + delta
            if index % ROWS_PER_COMMIT == 0:
                _flush(connection, batch)
        _flush(connection, batch)
        connection.executemany(
            "UPDATE point_lots SET remaining_points = remaining_points - ? WHERE id = ?",
            [(points, ids.lots[card]) for card, points in taken.items()],
        )
        connection.execute("COMMIT")
    finally:
        connection.close()


def _flush(connection: sqlite3.Connection, batch: dict[str, list[tuple[object, ...]]]) -> None:
    for table, rows in batch.items():
        connection.executemany(INSERTS[table], rows)
        rows.clear()


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_kib: int
    status: int
    last_line: str


def run_module(arguments: list[str]) -> Run:
    """Run `python -m MODULE ARGS` in its own process; its wall time and peak resident
    memory (this process's rusage of that child, from `os.wait4`)."""
    started = time.perf_counter()
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and our own command
        [sys.executable, "-m", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    output = process.stdout.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    lines = output.strip().splitlines() or [""]
    if process.returncode not in (0, 1):
        print(output, file=sys.stderr)
    # clear's line about the file, or reconcile's verdict (its last line)
    summary = next((line for line in lines if " details, " in line), lines[-1])
    return Run(seconds, usage.ru_maxrss, process.returncode, summary)


def bench_month(now: datetime) -> Month:
    """A month whose last business date ended: the one before last."""
    first = now.astimezone(SHANGHAI).date().replace(day=1)
    previous = first - timedelta(days=32)
    return Month(previous.year, previous.month)


def fill_month(folder: Path, count: int) -> Month:
    """A config and a ledger in `folder` holding a month of `count` entries."""
    month = bench_month(datetime.now(UTC))
    bootstrap(write_config(folder)).close()
    fill(folder / "bench.db", month, count)
    return month


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=int(os.environ.get("N", "1000000")))
    parser.add_argument("--keep", type=Path, help="keep the ledger and the files here")
    parser.add_argument("--fill-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fill_only is not None:
        fill_month(args.fill_only, args.n)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-clearing-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        # Each step in a process of its own: a child's peak memory counts its parent's
        # resident set at the fork, so this process stays small and does no work itself.
        started = time.perf_counter()
        filled = run_module(["clearing.bench", "--n", str(args.n), "--fill-only", str(folder)])
        if filled.status != 0:
            return 1
        month = bench_month(datetime.now(UTC))
        print(f"fill: {args.n} entries of {month.key} in {time.perf_counter() - started:.1f} s")
        out = folder / "out"
        common = ["--config", str(folder / "bench.toml"), "--month", month.key, "--out", str(out)]
        for command in ("clear", "reconcile"):
            run = run_module(["gateway.cli", command, *common])
            rate = args.n / run.seconds if run.seconds else 0
            print(
                f"{command}: {args.n} entries in {run.seconds:.1f} s, {rate:,.0f} entries/s, "
                f"peak memory {run.peak_kib / 1024:.0f} MB (exit {run.status})"
            )
            print(f"  {run.last_line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A month of real traffic through the real gateway on a fixed clock, then `vipgate clear`,
`verify` and `reconcile` from the command line, the file's figures checked against numbers
worked out here by hand (SQLite and PostgreSQL).

The month (November 2026, demo config, cut-off 23:00): redemptions with the weekend and
coffee discounts, a partial approval, a void, a redemption whose answer was lost and that the
terminal reversed, a refund, one batch settled unbalanced and uploaded with a record the
gateway never saw, a reversal for that closed batch, and transactions either side of the
last business date's cut-off. Then December: a void and a refund of November's redemptions.

`python -m tests.test_clearing_e2e DIR` plays the same month into DIR and leaves the pack
there (what `make screenshot-reconcile` photographs).
"""

from __future__ import annotations

import csv
import re
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from unittest.mock import patch

import pytest

from clearing.layout import Detail, parse_detail, parse_merchant, parse_trailer
from clearing.reconcile.charts import Series, daily_chart
from gateway.cli import main
from gateway.clock import SHANGHAI, FixedClock
from gateway.config import load_config
from tests.gateway_harness import DIAMOND, FEW_POINTS, GOLD_PIN, Harness
from tests.spec_terminal import Answer, SpecTerminal, parse

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
STORE = "898310048990001"
COFFEE = "898310058120002"
FILE = "VIPSETTLE_ACQ000000000001_202611_001.txt"


def shanghai(month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=SHANGHAI)


@dataclass
class Month:
    """The traffic played and what the test needs to find it again."""

    harness: Harness
    config: Path
    database: str | None
    rrn: dict[str, str] = field(default_factory=dict)
    trace: dict[str, str] = field(default_factory=dict)
    requests: dict[str, bytes] = field(default_factory=dict)
    terminals: dict[str, SpecTerminal] = field(default_factory=dict)

    def at(self, instant: datetime) -> None:
        self.harness.clock.advance(instant - self.harness.clock.now())

    def sign_on(self, terminal: SpecTerminal) -> SpecTerminal:
        terminal.adopt_sign_on(self.harness.send(terminal, terminal.sign_on()))
        return terminal

    def redeem(
        self, name: str, terminal: SpecTerminal, card: str, fen: int, **kw: object
    ) -> Answer:
        request, answer = self.harness.redeem(terminal, card, fen, **kw)  # type: ignore[arg-type]
        assert answer.code in ("00", "10"), (name, answer.code)
        self.rrn[name], self.trace[name] = answer.text(37), answer.text(11)
        self.requests[name] = request
        return answer

    def vipgate(self, *arguments: str, at: datetime) -> int:
        """`vipgate ARGS` on this month's config and database, its clock at `at`."""
        self.at(at)
        options = ["--config", str(self.config)]
        if self.database is not None:
            options += ["--db", self.database]
        with patch("gateway.bootstrap.system_clock", lambda _tz: FixedClock(at)):
            return main([arguments[0], *options, *arguments[1:]])


def reversal_of(terminal: SpecTerminal, request: bytes, reason: str = "98") -> bytes:
    """The 0400 a terminal sends for a request it got no answer to (pos-8583.md §4.6)."""
    _, fields, _, _ = parse(request)
    for number in (26, 35, 52, 53, 62, 37, 64):
        fields.pop(number, None)
    fields[39] = reason
    return terminal.signed("0400", fields)


def settle(month: Month, terminal: SpecTerminal, debits: tuple[int, int]) -> Answer:
    """0500 for the open batch with the terminal's own (here: wrong) debit totals."""
    totals = f"{debits[1]:012d}{debits[0]:03d}{0:012d}{0:03d}0" + "0" * 31
    fields: dict[int, str | bytes] = {11: terminal.next_trace(), **terminal.ids(), 48: totals}
    fields.update({49: "156", 60: f"00{terminal.batch}201", 63: "01 "})
    return month.harness.send(terminal, terminal.signed("0500", fields))


def upload(month: Month, terminal: SpecTerminal, records: list[tuple[str, str, int]]) -> None:
    """0320 with the records (trace, card, fen), then the end of upload after a 2 result."""
    body = "".join(f"00{trace}{card:0>20}{fen:012d}" for trace, card, fen in records)
    fields: dict[int, str | bytes] = {11: terminal.next_trace(), **terminal.ids()}
    fields.update({48: f"{len(records):02d}{body}", 60: f"00{terminal.batch}201"})
    assert month.harness.send(terminal, terminal.signed("0320", fields)).code == "00"
    end: dict[int, str | bytes] = {11: terminal.next_trace(), **terminal.ids()}
    end.update({48: f"{len(records):04d}", 60: f"00{terminal.batch}202"})
    assert month.harness.send(terminal, terminal.signed("0320", end)).code == "00"


def play_november(folder: Path, database: str | None = None) -> Month:
    """The month of traffic, into the ledger the config in `folder` names (or `database`)."""
    (folder / "var").mkdir(parents=True, exist_ok=True)  # the demo config's database folder
    config = folder / "demo.toml"
    shutil.copyfile(DEMO, config)
    harness = Harness(load_config(config, database), start=shanghai(11, 1, 11))
    month = Month(harness, config, database)
    store, coffee = harness.signed_on("10000001"), harness.signed_on("20000001")
    month.redeem("diamond", store, DIAMOND, 12800)  # Sunday 11:00: 10% -> 11520
    gold = month.redeem("gold", store, GOLD_PIN, 5000, pin="123456")
    assert harness.void(store, GOLD_PIN, gold, month.trace["gold"], 5000).code == "00"
    month.redeem("partial", store, FEW_POINTS, 1000, partial=True)  # 150 points: A' = 300
    month.redeem("coffee", coffee, DIAMOND, 1999)  # 5%: 1899
    month.at(shanghai(11, 3, 12))
    store = month.sign_on(store)
    second = harness.signed_on("10000002")
    month.redeem("gold2", second, GOLD_PIN, 3333, pin="123456")
    month.redeem("lost", second, DIAMOND, 2000)
    assert harness.send(second, reversal_of(second, month.requests["lost"])).code == "00"
    settled = settle(month, store, (2, 13100))
    assert settled.text(48)[30] == "2"  # not balanced
    upload(
        month,
        store,
        [
            (month.trace["diamond"], DIAMOND, 12800),
            (month.trace["partial"], FEW_POINTS, 300),
            ("000099", DIAMOND, 700),  # a record the gateway never saw
        ],
    )
    store = month.sign_on(store)  # batch 000002 now
    closed_batch = reversal_of(store, month.requests["diamond"], "96")
    assert harness.send(store, closed_batch).code == "00"
    month.at(shanghai(11, 5, 12))
    coffee = month.sign_on(coffee)
    refund = harness.refund(
        coffee, DIAMOND, _answer(month, "coffee"), "000001" + month.trace["coffee"], 1000
    )
    assert refund.code == "00" and (refund.points, refund.cash_fen) == (475, 949)
    month.rrn["refund"] = refund.text(37)
    month.at(shanghai(11, 10, 12))
    store = month.sign_on(store)
    month.redeem("big", store, DIAMOND, 10001)  # a Tuesday: no discount
    month.at(shanghai(11, 30, 22, 30))
    store = month.sign_on(store)
    month.redeem("late", store, DIAMOND, 2000)  # business date 30 November
    month.at(shanghai(11, 30, 23, 30))
    month.redeem("december", store, DIAMOND, 3000)  # business date 1 December
    month.terminals["store"] = store
    return month


def _answer(month: Month, name: str) -> Answer:
    """What a refund needs of its original's answer: its RRN (37) and date (13)."""
    fields: dict[int, str | bytes] = {37: month.rrn[name], 13: "1101"}
    return Answer("0210", fields, b"", b"", b"")


def play_december(month: Month) -> None:
    """After November closed: a void of its last redemption and a refund of another."""
    store = month.terminals["store"]
    month.at(shanghai(12, 1, 10))
    store = month.sign_on(store)
    late = _answer(month, "late")
    assert month.harness.void(store, DIAMOND, late, month.trace["late"], 2000).code == "00"
    month.at(shanghai(12, 2, 9))
    store = month.sign_on(store)
    big = _answer(month, "big")
    big.fields[13] = "1110"
    refund = month.harness.refund(store, DIAMOND, big, "000002" + month.trace["big"], 4000)
    assert refund.code == "00" and (refund.points, refund.cash_fen) == (2000, 4000)


def fee(settled: int, fee_bp: int) -> int:
    """The fee worked out here, on its own: half up on the unsigned amount, then the sign."""
    unsigned = (abs(settled) * fee_bp + 5000) // 10000
    return unsigned if settled >= 0 else -unsigned


def details(path: Path) -> list[Detail]:
    return [parse_detail(line, []) for line in path.read_text().splitlines() if line[0] == "D"]


class WellFormed(HTMLParser):
    """Every element closed in order; the void elements of HTML and SVG's self-closing ones."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link"})

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open.pop() != tag:
            self.problems.append(f"</{tag}> closes nothing open")


@pytest.fixture
def month(tmp_path: Path, ledger_url: str) -> Month:
    """November played through the gateway, on SQLite and on PostgreSQL."""
    return play_november(tmp_path / "gateway", ledger_url)


def test_a_month_cleared_verified_and_reconciled(
    month: Month, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file's every entry and total as worked out by hand; verify; the pack's exceptions."""
    out = tmp_path / "out"
    assert (
        month.vipgate("clear", "--month", "2026-11", "--out", str(out), at=shanghai(11, 30, 22, 59))
        == 2
    )
    assert "not over" in capsys.readouterr().err
    assert (
        month.vipgate("clear", "--month", "2026-11", "--out", str(out), at=shanghai(12, 1, 9)) == 0
    )
    written = (out / FILE).read_bytes()
    found = [
        (d.merchant_id, d.entry_type, d.rrn, d.settled_fen, d.points, d.fee_fen)
        for d in details(out / FILE)
    ]
    rrn = month.rrn
    assert found == [
        (STORE, "22", rrn["diamond"], 11520, 5760, fee(11520, 80)),
        (STORE, "22", rrn["partial"], 300, 150, fee(300, 80)),
        (STORE, "22", rrn["gold2"], 3333, 1667, fee(3333, 80)),
        (STORE, "22", rrn["big"], 10001, 5001, fee(10001, 80)),
        (STORE, "22", rrn["late"], 2000, 1000, fee(2000, 80)),
        (COFFEE, "22", rrn["coffee"], 1899, 950, fee(1899, 60)),
        (COFFEE, "25", rrn["refund"], -949, 475, fee(-949, 60)),
    ]
    lines = (out / FILE).read_text().splitlines()
    store, coffee = parse_merchant(lines[-3], []), parse_merchant(lines[-2], [])
    store_fees = fee(11520, 80) + fee(300, 80) + fee(3333, 80) + fee(10001, 80) + fee(2000, 80)
    assert (store.redemption_count, store.redemptions_fen, store.fees_fen) == (5, 27154, store_fees)
    assert store_fees == 92 + 2 + 27 + 80 + 16
    assert (coffee.others_fen, coffee.fees_fen, coffee.net_fen) == (-949, 11 - 6, 950 - 5)
    trailer = parse_trailer(lines[-1], [])
    assert (trailer.detail_count, trailer.merchant_count) == (7, 2)
    assert (trailer.settled_fen, trailer.fees_fen, trailer.net_fen) == (28104, 222, 27882)
    statement = dict(csv.reader((out / "operator_statement_202611.csv").open()))
    assert statement["terminal_fees_fen"] == str(3 * 3000)
    assert statement["total_due_to_network_fen"] == str(28104 + 9000)
    assert statement["rounding_gain_fen"] == str(0 + 0 + 1 + 1 + 0 + 1 - 1)
    assert (statement["points_given_up"], statement["points_returned"]) == ("14528", "475")
    capsys.readouterr()
    assert month.vipgate("verify", str(out / FILE), at=shanghai(12, 1, 10)) == 0
    play_december(month)
    assert (
        month.vipgate("clear", "--month", "2026-11", "--out", str(out), at=shanghai(12, 5, 9)) == 0
    )
    assert (out / FILE).read_bytes() == written
    capsys.readouterr()
    status = month.vipgate(
        "reconcile", "--month", "2026-11", "--out", str(out), at=shanghai(12, 5, 10)
    )
    assert capsys.readouterr().out.splitlines()[-1] == "EXCEPTIONS: 5"
    assert status == 1
    check_exceptions(out, month)
    check_page(out / "reconcile_202611.html")


def check_exceptions(out: Path, month: Month) -> None:
    """Each exception names terminal, batch, trace, masked card and amounts."""

    def rows(name: str) -> list[dict[str, str]]:
        return list(csv.DictReader((out / f"exceptions_{name}.csv").open()))

    [batch] = rows("batches")
    assert (batch["problem"], batch["terminal"], batch["batch"]) == (
        "batch not balanced",
        "10000001",
        "000001",
    )
    assert (batch["terminal_fen"], batch["gateway_fen"]) == (
        "13100",
        str(12800 + 5000 + 300 - 5000),
    )
    uploads = {
        (r["problem"], r["trace"], r["card"], r["terminal_fen"], r["gateway_fen"])
        for r in rows("uploads")
    }
    assert uploads == {
        (
            "uploaded by the terminal, not in the journal",
            "000099",
            "668800*********0124",
            "700",
            "",
        ),
        (
            "in the journal, not uploaded by the terminal",
            month.trace["gold"],
            "668800*********0014",
            "",
            "5000",
        ),
        (
            "in the journal, not uploaded by the terminal",
            f"{int(month.trace['gold']) + 1:06d}",
            "668800*********0014",
            "",
            "5000",
        ),
    }
    [protocol] = rows("protocol")
    assert protocol["problem"].startswith("reversal for a closed batch")
    assert (protocol["terminal"], protocol["batch"], protocol["trace"]) == (
        "10000001",
        "000001",
        month.trace["diamond"],
    )
    assert (protocol["card"], protocol["rrn"], protocol["requested_fen"]) == (
        "668800*********0124",
        month.rrn["diamond"],
        "12800",
    )
    for name in ("settlement", "points", "fees"):
        assert rows(name) == []
    for path in out.glob("*.csv"):
        text = path.read_text()
        assert DIAMOND not in text and GOLD_PIN not in text and FEW_POINTS not in text


def check_page(page: Path) -> None:
    """Well-formed, self-contained (no http(s) address), tables and two SVG charts."""
    html = page.read_text(encoding="utf-8")
    parser = WellFormed()
    parser.feed(html)
    parser.close()
    assert parser.problems == [] and parser.open == []
    assert "http://" not in html and "https://" not in html
    assert html.count("<svg") == 2 and "<table>" in html
    assert "EXCEPTIONS: 5" in html
    assert DIAMOND not in html and GOLD_PIN not in html
    assert _rows_after(html, "Terminals the terminal fee is paid for") == [
        ["10000001", "898310048990001", "enabled by the history"],
        ["10000002", "898310048990001", "enabled by the history"],
        ["20000001", "898310058120002", "enabled by the history"],
    ]
    rates = _rows_after(html, "Rates the month's entries were charged at")
    assert [(row[0], row[1], row[5]) for row in rates] == [
        ("898310048990001", "80", "yes"),
        ("898310058120002", "60", "yes"),
    ]
    assert sum(int(row[4]) for row in rates) == 222  # the trailer's fees
    # The roll-forward of the cards' points: the demo config's lots, then the month's
    # redemptions net of their voids and reversals (the statement's 14528 given up) and the
    # refunds (its 475 returned).
    held = _rows_after(html, "The cards' points over the month (by business date)")
    assert [(row[0].split(" ")[0], int(row[1])) for row in held] == [
        ("held", 0),
        ("accrual", 160150),
        ("redemption", -18028),
        ("refund", 475),
        ("reversal", 1000),
        ("void", 2500),
        ("held", 160150 - 14528 + 475),
    ]


def _rows_after(html: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after an <h3> heading, as cell texts."""
    start = html.index(f"<h3>{heading}</h3>")
    body = html[html.index("<tbody>", start) + 7 : html.index("</tbody>", start)]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in body.split("</tr>") if row]


def test_december_carries_the_corrections_and_reconciles(
    month: Month, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """November's void and refund made in December are December's entries; it reconciles."""
    out = tmp_path / "out"
    assert (
        month.vipgate("clear", "--month", "2026-11", "--out", str(out), at=shanghai(12, 1, 9)) == 0
    )
    play_december(month)
    assert (
        month.vipgate("clear", "--month", "2026-12", "--out", str(out), at=shanghai(12, 31, 23, 0))
        == 0
    )
    december = details(out / "VIPSETTLE_ACQ000000000001_202612_001.txt")
    assert [(d.entry_type, d.settled_fen, d.original_rrn) for d in december] == [
        ("22", 3000, None),
        ("23", -2000, month.rrn["late"]),
        ("25", -4000, month.rrn["big"]),
    ]
    capsys.readouterr()
    assert (
        month.vipgate(
            "reconcile", "--month", "2026-12", "--out", str(out), at=shanghai(12, 31, 23, 5)
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-1] == "RECONCILED"


def test_reconcile_before_clear_is_bad_input(
    month: Month, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A month not closed yet has nothing to reconcile: exit 2."""
    assert (
        month.vipgate(
            "reconcile", "--month", "2026-11", "--out", str(tmp_path), at=shanghai(12, 1, 9)
        )
        == 2
    )
    assert "run vipgate clear --month 2026-11 first" in capsys.readouterr().err


if __name__ == "__main__":
    target = Path(sys.argv[1]).resolve()
    shutil.rmtree(target, ignore_errors=True)
    played = play_november(target / "ledger")
    pack = target / "pack"
    played.vipgate("clear", "--month", "2026-11", "--out", str(pack), at=shanghai(12, 1, 9))
    play_december(played)
    played.vipgate("reconcile", "--month", "2026-11", "--out", str(pack), at=shanghai(12, 5, 10))
    print(pack / "reconcile_202611.html")


def test_the_daily_chart_labels_a_day_with_nothing_taken_back_0_fen() -> None:
    """What was taken back is drawn below the axis and labelled negative, but nothing is
    `0 fen`, not `-0 fen`."""
    svg = daily_chart(
        "daily", ["2026-11-01", "2026-11-02"], Series("paid", [100, 0]), Series("back", [0, 50])
    )
    assert "2026-11-01: 0 fen" in svg and "2026-11-02: -50 fen" in svg
    assert "-0 fen" not in svg

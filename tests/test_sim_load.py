"""The load generator against the real gateway core in process: options checked, the mix
sent, reversals after dropped answers, early settlement of a full batch, every settlement
balanced, and a summary (text and JSON) with no card number in it."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from cardcodec.frame import LENGTH_BYTES, add_length
from cardcodec.subfields import Totals
from gateway.clock import SHANGHAI
from gateway.config import load_config
from gateway.errors import BadInput
from simulators import load
from simulators.connection import NO_FAULTS, Exchange, Faults, Link, corrupt_mac
from simulators.load import (
    LoadPlan,
    LoadSummary,
    Mix,
    Snapshot,
    TerminalStats,
    choose_terminals,
    run_load,
)
from simulators.recording import Recorder
from simulators.terminal import Terminal
from tests.gateway_harness import DEMO, Harness, demo_config

CONFIG = load_config(DEMO)
SATURDAY_NOON = datetime(2026, 6, 6, 12, 0, tzinfo=SHANGHAI)
FULL_CARD = re.compile(r"(?<!\d)6688\d{15}(?!\d)")
EXPECTED_CODES = {"00", "10", "51"}


class InProcessLink:
    """A link straight into an in-process `Gateway`, with the faults and the recording of
    `Connection`. One lock for all links: the server handles one request at a time."""

    def __init__(
        self, harness: Harness, lock: threading.Lock, recorder: Recorder | None = None
    ) -> None:
        self.harness = harness
        self.lock = lock
        self.recorder = recorder
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def _record(self, direction: str, terminal: str, frame: bytes) -> None:
        if self.recorder is not None:
            self.recorder.record("out" if direction == "out" else "in", terminal, frame)

    def exchange(self, frame: bytes, faults: Faults = NO_FAULTS, terminal: str = "") -> Exchange:
        if self._closed:
            raise OSError("the link is closed")
        wire = corrupt_mac(frame) if faults.corrupt_mac else frame
        if faults.disconnect:
            part = wire[: max(LENGTH_BYTES + 1, len(wire) // 2)]
            self._record("out", terminal, part)
            self._closed = True
            return Exchange((part,), (), disconnected=True)
        copies = 2 if faults.repeat else 1
        for _ in range(copies):
            self._record("out", terminal, wire)
        answers = []
        for _ in range(copies):
            with self.lock:
                payload = self.harness.raw(wire[LENGTH_BYTES:])
            if payload is None:
                self._closed = True
                return Exchange((wire,) * copies, tuple(answers), problem="closed")
            answers.append(add_length(payload))
            self._record("in", terminal, answers[-1])
        return Exchange((wire,) * copies, tuple(answers), dropped=faults.drop_answer)


def gateway_links(
    tmp_path: Path, name: str = "gateway", recorder: Recorder | None = None
) -> tuple[Harness, Callable[[], Link]]:
    """A fresh in-process gateway on the demo config (Saturday noon) and a link factory."""
    folder = tmp_path / name
    folder.mkdir()
    harness = Harness(demo_config(folder), SATURDAY_NOON)
    lock = threading.Lock()
    return harness, lambda: InProcessLink(harness, lock, recorder)


def quick_load(
    tmp_path: Path, *, terminals: int = 3, mix: Mix = load.DAY_MIX, seed: int = 7
) -> LoadSummary:
    _, connect = gateway_links(tmp_path)
    plan = LoadPlan(terminals, 150.0, 1.0, 5.0, seed, mix)
    return run_load(CONFIG, "in-process", plan, connect)


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"terminals": 0}, "--terminals: 0 is not a positive count"),
        ({"rate_per_s": 0.0}, "--rate: 0 is outside"),
        ({"rate_per_s": -5.0}, "--rate: -5 is outside"),
        ({"rate_per_s": float("nan")}, "--rate: nan is outside"),
        ({"rate_per_s": float("inf")}, "--rate: inf is outside"),
        ({"rate_per_s": 20_000.0}, "--rate: 20000 is outside"),
        ({"duration_s": 0.0}, "--duration: 0 is outside"),
        ({"duration_s": 1e9}, "--duration: 1e+09 is outside"),
        ({"answer_timeout_s": 0.0}, "--timeout: 0 is outside"),
        ({"answer_timeout_s": 61.0}, "--timeout: 61 is outside"),
        ({"rate_per_s": 5000.0, "duration_s": 3600.0}, "--rate x --duration: 18000000"),
    ],
)
def test_nonsense_options_are_refused_naming_the_option(
    options: dict[str, float], message: str
) -> None:
    """Rates, durations and time-outs that are not positive, finite and bounded: exit 2."""
    values: dict[str, float] = {"terminals": 1, "rate_per_s": 10.0, "duration_s": 1.0}
    values |= options
    with pytest.raises(BadInput, match=re.escape(message)):
        LoadPlan(
            int(values["terminals"]),
            values["rate_per_s"],
            values["duration_s"],
            values.get("answer_timeout_s", 10.0),
        )


def test_more_terminals_than_the_config_has_are_refused_saying_how_many() -> None:
    """--terminals above the configured (enabled) terminals names how many there are."""
    assert [t.id for t in choose_terminals(CONFIG, 2)] == ["10000001", "10000002"]
    with pytest.raises(BadInput, match="4 asked, but the config has 3 terminals"):
        choose_terminals(CONFIG, 4)


def test_the_rate_is_spread_over_the_terminals() -> None:
    """Each of N terminals ticks every N / rate seconds."""
    assert LoadPlan(4, 20.0, 1.0).interval_s == pytest.approx(0.2)


# --- running ------------------------------------------------------------------------------


def test_a_day_mix_settles_balanced_on_every_terminal(tmp_path: Path) -> None:
    """Redemptions, inquiries, voids, refunds, dropped answers and their reversals; every
    terminal's 0510 says balanced and only expected codes come back."""
    summary = quick_load(tmp_path)
    kinds = summary.kinds()
    assert summary.unsettled == [] and summary.failures == []
    assert set(summary.codes()) <= EXPECTED_CODES
    assert {"sign-on", "redemption", "balance", "void", "refund", "reversal", "settlement"} <= set(
        kinds
    )
    dropped = kinds["redemption"].get("dropped", 0)
    assert dropped > 0 and kinds["reversal"] == {"00": dropped}
    assert kinds["sign-on"] == {"00": 3} and kinds["settlement"] == {"00": 3}
    assert summary.sent == sum(sum(counts.values()) for counts in kinds.values())
    assert 60 <= summary.sent <= 160  # 150 planned, plus sign-ons and settlements


def test_settlement_waits_for_the_whole_duration(tmp_path: Path) -> None:
    """At 1.25 frames a second for 1.5 s the last tick is at 0.8 s: the terminal settles when
    the duration has run, not then, so the summary's rates are over the time asked for."""
    _, connect = gateway_links(tmp_path)
    started = time.monotonic()
    summary = run_load(CONFIG, "in-process", LoadPlan(1, 1.25, 1.5, 5.0, 7), connect)
    assert time.monotonic() - started >= 1.5
    assert summary.unsettled == [] and summary.failures == []


def test_every_dropped_answer_is_followed_by_its_reversal(tmp_path: Path) -> None:
    """With only dropped redemptions, each is reversed and the batch is empty but balanced."""
    summary = quick_load(tmp_path, terminals=1, mix=Mix(0, 0, 0, 0, 100))
    kinds = summary.kinds()
    assert kinds["redemption"] == {"dropped": kinds["reversal"]["00"]}
    (settlement,) = summary.settlements
    assert settlement.balanced is True and not settlement.uploaded


def test_voids_and_refunds_act_on_the_terminals_own_approvals(tmp_path: Path) -> None:
    """A mix heavy in voids and refunds gets no 22 or 25: each acts on an approval of its
    own terminal that is still open to it, and credits balance at settlement."""
    summary = quick_load(tmp_path, mix=Mix(40, 0, 30, 30, 0))
    kinds = summary.kinds()
    assert kinds["void"].get("00", 0) > 0 and kinds["refund"].get("00", 0) > 0
    assert set(summary.codes()) <= EXPECTED_CODES
    assert summary.unsettled == []


def test_a_full_batch_is_settled_early_and_the_next_one_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the batch limit a terminal settles, adopts batch + 1 and goes on; every one of its
    settlements balances."""
    monkeypatch.setattr(load, "BATCH_LIMIT", 6)
    summary = quick_load(tmp_path, terminals=1, mix=Mix(100, 0, 0, 0, 0))
    batches = [settlement.batch for settlement in summary.settlements]
    assert len(batches) >= 3
    assert batches == [f"{n:06d}" for n in range(1, len(batches) + 1)]
    assert summary.unsettled == []


def test_an_unbalanced_settlement_is_uploaded_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Totals the gateway does not share: 0510 result 2, the batch uploaded, the terminal
    listed as not balanced."""
    monkeypatch.setattr(Terminal, "totals", lambda self: Totals(100, 1, 0, 0))
    summary = quick_load(tmp_path, terminals=2, mix=Mix(100, 0, 0, 0, 0))
    assert summary.unsettled == ["10000001", "10000002"]
    assert all(s.balanced is False and s.uploaded for s in summary.settlements)
    assert summary.kinds()["end of batch upload"] == {"00": 2}
    assert "settlement check: NOT balanced at 10000001, 10000002" in summary.render()


def test_a_gateway_that_cannot_be_reached_ends_the_terminal_with_a_reason() -> None:
    """Connections refused: the terminal gives up after a few tries, says why, never
    settles, and is listed."""

    def refuse() -> Link:
        raise ConnectionRefusedError(111, "Connection refused")

    plan = LoadPlan(1, 50.0, 0.5, 1.0, 1)
    summary = run_load(CONFIG, "nowhere", plan, refuse)
    assert summary.sent == 0
    assert summary.failures == [
        "terminal 10000001: cannot connect to the gateway (Connection refused)"
    ]
    assert summary.unsettled == ["10000001"]


# --- the summary --------------------------------------------------------------------------


def test_latency_percentiles_are_nearest_rank() -> None:
    """p50/p90/p99/max over 100 latencies of 1..100 ms."""
    stats = TerminalStats("10000001")
    stats.latencies_s.extend(n / 1000 for n in range(100, 0, -1))
    summary = LoadSummary("t", LoadPlan(1, 1.0, 1.0), 1.0, (stats,))
    assert summary.latency_ms() == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}


def test_summary_text_and_json_say_the_same_without_card_numbers(tmp_path: Path) -> None:
    """Duration, requests, throughput, latencies, counts per kind and code, settlements."""
    summary = quick_load(tmp_path)
    text = summary.render()
    data = json.loads(json.dumps(summary.to_json()))
    for heading in ("duration", "requests", "throughput", "latency", "kind", "settlement"):
        assert heading in text
    assert f"{data['sent']} sent" in text
    assert data["balanced"] is True and data["unbalanced_terminals"] == []
    assert set(data["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert data["kinds"]["redemption"]["00"] > 0
    assert [s["result"] for s in data["settlements"]] == ["balanced"] * 3
    assert FULL_CARD.search(text) is None and FULL_CARD.search(json.dumps(data)) is None


def test_progress_line_counts_without_card_data() -> None:
    """The progress line: elapsed of the duration, sent, rate, approved, declined."""
    line = Snapshot(2.0, 30.0, 40, 30, 8, 2, 0).line()
    assert line == (
        "load 2.0/30 s · 40 sent · 20.0/s · 30 approved · 8 declined · 2 dropped · 0 unanswered"
    )

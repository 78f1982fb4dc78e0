"""`vipgate sim load`: many terminals at a target rate with a day's mix, then settlement.

Each terminal of the load runs on its own thread, with its own connection and session, one
request in flight at a time: it signs on (asking for a TDK), then sends its share of the
target rate until the duration is up, then settles its batch (0500) and uploads it when the
gateway found it unbalanced. What it sends is a day's mix: mostly redemptions (swiped, some
tracks encrypted; cards with a PIN always with it, some of those keyed), some balance
inquiries, voids of the terminal's own recent approvals, refunds, and redemptions whose answer
is dropped, which the terminal's reversal rule (§4.6) turns into a reversal on the next tick.
A terminal whose batch would pass the 999-per-batch limit settles early and goes on.

The summary counts every request sent, by kind and response code, with latency percentiles,
and checks that every settlement came back balanced: the terminals' own totals and the
gateway's must agree whatever the mix did. Card numbers never appear in it.
"""

from __future__ import annotations

import math
import random
import secrets
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cardcodec.cards import mask_card_data
from cardcodec.profile import Kind
from gateway.config import CardConfig, Config, TerminalConfig
from gateway.errors import BadInput
from simulators.connection import NO_FAULTS, Faults, Link
from simulators.terminal import (
    APPROVED,
    FREE_TEXT_CARD_DIGITS,
    MAX_TRACE,
    BadAnswerError,
    CardEntry,
    Completed,
    Request,
    Result,
    Terminal,
    TerminalError,
)

MAX_RATE_PER_S: Final = 10_000.0
MAX_DURATION_S: Final = 24 * 3600.0
MAX_PLANNED_REQUESTS: Final = 1_000_000  # rate x duration: bounds the latencies kept
MAX_ANSWER_TIMEOUT_S: Final = 60.0  # §1: a terminal gives up after 60 s
DEFAULT_ANSWER_TIMEOUT_S: Final = 10.0
PROGRESS_INTERVAL_S: Final = 0.25
BATCH_LIMIT: Final = 999  # §4.7: debits, and credits, per batch
MAX_CONNECT_FAILURES: Final = 3  # in a row, before a terminal gives up
MAX_FINAL_REVERSAL_TRIES: Final = 3
REMEMBERED_SALES: Final = 64  # recent approvals a terminal may void or refund
MIN_AMOUNT_FEN: Final = 100
MAX_AMOUNT_FEN: Final = 1000
KEYED_SHARE: Final = 0.25  # of redemptions on cards with a PIN
ENCRYPTED_SHARE: Final = 0.5  # of swipes
PARTIAL_SHARE: Final = 0.2  # redemptions that allow a partial approval (60.6)
NO_ANSWER: Final = "no answer"
NOT_SENT: Final = "not sent"  # the gateway could not be reached for it
DROPPED: Final = "dropped"
REFUSED: Final = "refused"


@dataclass(frozen=True)
class Mix:
    """Shares of each action in percent (of the ticks not taken by a sign-on, an owed
    reversal or an early settlement). A void or refund with nothing to act on becomes a
    redemption."""

    redeem: int = 70
    balance: int = 10
    void: int = 8
    refund: int = 6
    drop: int = 6  # a redemption whose answer is dropped: a reversal follows

    def actions(self) -> tuple[list[str], list[int]]:
        names = ["redeem", "balance", "void", "refund", "drop"]
        return names, [getattr(self, name) for name in names]


DAY_MIX: Final = Mix()


def _number(option: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low < value <= high:
        raise BadInput(f"{option}: {value:g} is outside the range above {low:g} up to {high:g}")
    return value


@dataclass(frozen=True)
class LoadPlan:
    """What a load asks for, checked: refusals name the option (exit 2)."""

    terminals: int
    rate_per_s: float
    duration_s: float
    answer_timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S
    seed: int = field(default_factory=lambda: secrets.randbelow(2**31))
    mix: Mix = DAY_MIX

    def __post_init__(self) -> None:
        if self.terminals < 1:
            raise BadInput(f"--terminals: {self.terminals} is not a positive count")
        _number("--rate", self.rate_per_s, 0, MAX_RATE_PER_S)
        _number("--duration", self.duration_s, 0, MAX_DURATION_S)
        _number("--timeout", self.answer_timeout_s, 0, MAX_ANSWER_TIMEOUT_S)
        planned = self.rate_per_s * self.duration_s
        if planned > MAX_PLANNED_REQUESTS:
            raise BadInput(
                f"--rate x --duration: {planned:.0f} requests is more than one load sends "
                f"({MAX_PLANNED_REQUESTS}); split it"
            )

    @property
    def interval_s(self) -> float:
        """Time between two ticks of one terminal."""
        return self.terminals / self.rate_per_s


def usable_terminals(config: Config) -> list[TerminalConfig]:
    """The config's terminals that can sign on: enabled, of an active merchant."""
    active = {merchant.id for merchant in config.merchants if merchant.active}
    return [t for t in config.terminals if t.enabled and t.merchant in active]


def usable_cards(config: Config) -> list[CardConfig]:
    """The config's cards a redemption can be approved on: active and enrolled."""
    return [card for card in config.cards if card.status == "active" and card.enrolled]


def choose_terminals(config: Config, count: int) -> list[TerminalConfig]:
    terminals = usable_terminals(config)
    if count > len(terminals):
        raise BadInput(
            f"--terminals: {count} asked, but the config has {len(terminals)} terminals that "
            "can sign on (enabled, of an active merchant)"
        )
    return terminals[:count]


def _card_weights(cards: Sequence[CardConfig]) -> list[int]:
    """Cards are picked in proportion to the points the config gives them, each at least
    1/20 of the whole: a card with few points still comes up (partial approvals, 51)."""
    points = [sum(lot.points for lot in card.lots) for card in cards]
    floor = max(1, sum(points) // 20)
    return [max(floor, value) for value in points]


# --- what one terminal counts ---------------------------------------------------------------


@dataclass(frozen=True)
class Settlement:
    """One 0500 of the load and what its 0510 said (None: no 0510, or not approved)."""

    terminal: str
    batch: str
    code: str | None
    balanced: bool | None
    uploaded: bool = False

    def to_json(self) -> dict[str, Any]:
        result = {True: "balanced", False: "unbalanced", None: "no settlement"}[self.balanced]
        return {
            "terminal": self.terminal,
            "batch": self.batch,
            "code": self.code,
            "result": result,
            "uploaded": self.uploaded,
        }


@dataclass
class TerminalStats:
    """One terminal's counts. Its thread alone writes them; the progress line reads the
    plain integers while it runs, the summary everything once the thread has ended."""

    terminal: str
    sent: int = 0
    answered: int = 0
    approved: int = 0
    dropped: int = 0
    no_answer: int = 0
    refused: int = 0
    latencies_s: array[float] = field(default_factory=lambda: array("d"))
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, code)
    settlements: list[Settlement] = field(default_factory=list)
    error: str | None = None


@dataclass
class _Sale:
    """An approved redemption the terminal may still void or refund."""

    completed: Completed
    batch: str
    amount_fen: int
    refundable_fen: int
    voided: bool = False


class _LinkDownError(Exception):
    """The gateway could not be reached for this tick."""


class _Driver:
    """One terminal of the load: sign-on, its ticks, settlement."""

    def __init__(
        self,
        config: TerminalConfig,
        *,
        cards: Sequence[CardConfig],
        plan: LoadPlan,
        connect: Callable[[], Link],
        stop: threading.Event,
        rng: random.Random,
    ) -> None:
        self.terminal = Terminal.from_config(config)
        # A terminal keeps its trace counter; this one starts anywhere, so that a batch a
        # scenario left open is unlikely to hold its traces already (that would be 94).
        self.terminal.stan = rng.randint(1, MAX_TRACE)
        self.cards = cards
        self.card_weights = _card_weights(cards)
        self.plan = plan
        self.connect = connect
        self.stop = stop
        self.rng = rng
        self.stats = TerminalStats(config.id)
        self.link: Link | None = None
        self.connect_failures = 0
        self.sales: deque[_Sale] = deque(maxlen=REMEMBERED_SALES)
        self.actions, self.weights = plan.mix.actions()
        # Set when `run` has ended, settlement included. Not `Thread.is_alive`: after a join
        # that Ctrl-C interrupted, CPython 3.11 may say a thread still running is not alive.
        self.finished = threading.Event()

    # --- the run --------------------------------------------------------------------------

    def run(self, start: float, offset_s: float) -> None:
        deadline = start + self.plan.duration_s
        next_at = start + offset_s
        try:
            while not self.stop.is_set() and next_at < deadline:
                now = time.monotonic()
                if next_at > now and self.stop.wait(next_at - now):
                    break
                self._tick()
                next_at += self.plan.interval_s
                # A terminal that fell behind does not burst to catch up: at most one slot.
                next_at = max(next_at, time.monotonic() - self.plan.interval_s)
            # Settle when the duration has run, not at the last tick before it (at a low rate
            # that is seconds early, and the summary's rates would be over a shorter time).
            remaining = deadline - time.monotonic()
            if remaining > 0 and not self.stop.is_set():
                self.stop.wait(remaining)
            self._finish()
        except (_LinkDownError, TerminalError) as error:
            self.stats.error = str(error)
        except Exception as error:  # a bug: say so in the summary rather than die unseen
            self.stats.error = f"terminal {self.stats.terminal}: {type(error).__name__}: {error}"
        finally:
            if self.link is not None:
                self.link.close()
            self.finished.set()

    def _tick(self) -> None:
        terminal = self.terminal
        if not terminal.signed_on:
            self._send(terminal.sign_on(tdk=True))
        elif terminal.pending_reversal is not None:
            self._send(terminal.reversal())
        elif self._batch_full():
            self._settle()
        else:
            self._action(self.rng.choices(self.actions, self.weights)[0])

    def _action(self, action: str) -> None:
        """One action of the mix; a void or refund with nothing to act on redeems instead."""
        others = {"balance": self._balance, "void": self._void, "refund": self._refund}
        act = others.get(action)
        if act is None or not act():
            self._redeem(drop=action == "drop")

    def _finish(self) -> None:
        """Send an owed reversal, then settle (and upload when unbalanced)."""
        terminal = self.terminal
        for _ in range(MAX_FINAL_REVERSAL_TRIES):
            if not terminal.signed_on:
                self._send(terminal.sign_on(tdk=True))
            if terminal.pending_reversal is None:
                break
            self._send(terminal.reversal())
        if terminal.keys is None:
            raise TerminalError(f"terminal {terminal.terminal_id} never signed on")
        if terminal.pending_reversal is not None:
            raise TerminalError(f"terminal {terminal.terminal_id} still owes a reversal")
        self._settle()

    def _batch_full(self) -> bool:
        totals = self.terminal.totals()
        return max(totals.debit_count, totals.credit_count) >= BATCH_LIMIT - 1

    # --- the actions ----------------------------------------------------------------------

    def _card(self) -> tuple[CardEntry, str | None, bool]:
        """A card as presented, its PIN when it has one, and whether to encrypt the track."""
        card = self.rng.choices(self.cards, self.card_weights)[0]
        keyed = card.pin is not None and self.rng.random() < KEYED_SHARE
        encrypt = not keyed and self.terminal.has_tdk and self.rng.random() < ENCRYPTED_SHARE
        return CardEntry(card.number, card.expiry_yymm, keyed=keyed), card.pin, encrypt

    def _redeem(self, *, drop: bool) -> None:
        card, pin, encrypt = self._card()
        amount_fen = self.rng.randint(MIN_AMOUNT_FEN, MAX_AMOUNT_FEN)
        partial = self.rng.random() < PARTIAL_SHARE
        request = self.terminal.redemption(
            card, amount_fen, pin=pin, encrypt_track=encrypt, partial=partial
        )
        result = self._send(request, Faults(drop_answer=drop))
        if result is not None and result.approved:
            answered = result.amount_fen if result.amount_fen is not None else amount_fen
            sale = _Sale(Completed(request, result), request.batch, answered, answered)
            self.sales.append(sale)

    def _balance(self) -> bool:
        card, pin, encrypt = self._card()
        self._send(self.terminal.balance(card, pin=pin, encrypt_track=encrypt))
        return True

    def _void(self) -> bool:
        batch = self.terminal.batch
        candidates = [
            sale
            for sale in self.sales
            if sale.batch == batch and not sale.voided and sale.refundable_fen == sale.amount_fen
        ]
        if not candidates:
            return False
        sale = self.rng.choice(candidates)
        result = self._send(self.terminal.void(sale.completed))
        if result is not None and result.code == APPROVED:
            sale.voided = True
        return True

    def _refund(self) -> bool:
        candidates = [s for s in self.sales if not s.voided and s.refundable_fen > 0]
        if not candidates:
            return False
        sale = self.rng.choice(candidates)
        amount_fen = sale.refundable_fen
        if amount_fen >= 2 * MIN_AMOUNT_FEN and self.rng.random() < 0.5:
            amount_fen //= 2
        result = self._send(self.terminal.refund(sale.completed, amount_fen))
        if result is not None and result.code == APPROVED:
            sale.refundable_fen -= amount_fen
        return True

    def _settle(self) -> None:
        terminal = self.terminal
        batch = terminal.batch
        result = self._send(terminal.settlement())
        if result is None or result.code != APPROVED:
            code = result.code if result is not None else None
            self.stats.settlements.append(Settlement(terminal.terminal_id, batch, code, None))
            return
        uploaded = False
        if not result.balanced:
            uploaded = self._upload()
        self.stats.settlements.append(
            Settlement(terminal.terminal_id, batch, result.code, result.balanced, uploaded)
        )

    def _upload(self) -> bool:
        """0320s with the settled batch, 8 records each, then the end 0320."""
        settled = self.terminal.settled
        if settled is None:
            return False
        sent = 0
        for chunk in settled.chunks():
            result = self._send(self.terminal.batch_upload(chunk))
            if result is None or result.code != APPROVED:
                return False
            sent += len(chunk)
        result = self._send(self.terminal.upload_end(sent))
        return result is not None and result.code == APPROVED

    # --- the wire -------------------------------------------------------------------------

    def _link(self) -> Link:
        if self.link is None or self.link.closed:
            try:
                self.link = self.connect()
            except OSError as error:
                self.connect_failures += 1
                if self.connect_failures >= MAX_CONNECT_FAILURES:
                    raise _LinkDownError(
                        f"terminal {self.terminal.terminal_id}: cannot connect to the gateway "
                        f"({error.strerror or error})"
                    ) from None
                raise
            self.connect_failures = 0
        return self.link

    def _send(self, request: Request, faults: Faults = NO_FAULTS) -> Result | None:
        """One exchange, counted; the typed answer, or None when the terminal got none."""
        stats = self.stats
        kind = request.kind.value
        try:
            link = self._link()
        except OSError:
            self.terminal.no_answer(request)
            stats.codes[kind, NOT_SENT] += 1
            return None
        started = time.perf_counter()
        exchange = link.exchange(request.frame, faults, self.terminal.terminal_id)
        elapsed = time.perf_counter() - started
        stats.sent += 1
        if exchange.answers:
            stats.latencies_s.append(elapsed)
        if exchange.answer is None:
            self.terminal.no_answer(request)
            outcome = DROPPED if exchange.dropped else NO_ANSWER
            if exchange.dropped:
                stats.dropped += 1
            else:
                stats.no_answer += 1
            stats.codes[kind, outcome] += 1
            return None
        stats.answered += 1
        try:
            result = self.terminal.receive(request, exchange.answer)
        except BadAnswerError:
            stats.refused += 1
            stats.codes[kind, REFUSED] += 1
            return None
        stats.codes[kind, result.code] += 1
        if result.approved:
            stats.approved += 1
        return result


# --- the whole load ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What the progress line shows; no card data."""

    elapsed_s: float
    duration_s: float
    sent: int
    approved: int
    declined: int
    dropped: int
    no_answer: int

    def line(self) -> str:
        rate = self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
        shown = min(self.elapsed_s, self.duration_s)
        return (
            f"load {shown:.1f}/{self.duration_s:g} s · {self.sent} sent · {rate:.1f}/s · "
            f"{self.approved} approved · {self.declined} declined · {self.dropped} dropped · "
            f"{self.no_answer} unanswered"
        )


def _percentile(ordered: Sequence[float], percent: float) -> float:
    """Nearest rank; 0 for no values."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class LoadSummary:
    """The end of a load: counts, latencies, and the settlement check."""

    target: str
    plan: LoadPlan
    elapsed_s: float
    stats: tuple[TerminalStats, ...]

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.stats)

    @property
    def answered(self) -> int:
        return sum(s.answered for s in self.stats)

    @property
    def throughput_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self) -> dict[str, float]:
        ordered = sorted(value for s in self.stats for value in s.latencies_s)
        points = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
        return {name: round(1000 * _percentile(ordered, p), 3) for name, p in points.items()}

    def kinds(self) -> dict[str, dict[str, int]]:
        """Counts per message kind and response code (or no answer, dropped, refused)."""
        table: dict[str, Counter[str]] = {}
        for stats in self.stats:
            for (kind, code), count in stats.codes.items():
                table.setdefault(kind, Counter())[code] += count
        order = [kind.value for kind in Kind]
        return {k: dict(sorted(table[k].items())) for k in order if k in table}

    def codes(self) -> dict[str, int]:
        """Counts per response code over every answer the terminals read."""
        total: Counter[str] = Counter()
        for counts in self.kinds().values():
            total.update({c: n for c, n in counts.items() if c not in _OUTCOMES})
        return dict(sorted(total.items()))

    @property
    def settlements(self) -> list[Settlement]:
        return [settlement for s in self.stats for settlement in s.settlements]

    @property
    def unsettled(self) -> list[str]:
        """Terminals any of whose settlements did not come back balanced, or that never
        settled."""
        return [
            s.terminal
            for s in self.stats
            if not s.settlements or any(x.balanced is not True for x in s.settlements)
        ]

    @property
    def failures(self) -> list[str]:
        """Why terminals stopped, card numbers masked: an error's text may quote anything."""
        errors = [s.error for s in self.stats if s.error is not None]
        return [mask_card_data(error, shortest=FREE_TEXT_CARD_DIGITS) for error in errors]

    def to_json(self) -> dict[str, Any]:
        return {
            "target": mask_card_data(self.target, shortest=FREE_TEXT_CARD_DIGITS),
            "terminals": [s.terminal for s in self.stats],
            "rate_per_s": self.plan.rate_per_s,
            "duration_s": self.plan.duration_s,
            "seed": self.plan.seed,
            "elapsed_s": round(self.elapsed_s, 3),
            "sent": self.sent,
            "answered": self.answered,
            "dropped": sum(s.dropped for s in self.stats),
            "no_answer": sum(s.no_answer for s in self.stats),
            "refused": sum(s.refused for s in self.stats),
            "throughput_per_s": round(self.throughput_per_s, 2),
            "latency_ms": self.latency_ms(),
            "kinds": self.kinds(),
            "codes": self.codes(),
            "settlements": [settlement.to_json() for settlement in self.settlements],
            "balanced": not self.unsettled,
            "unbalanced_terminals": self.unsettled,
            "failures": self.failures,
        }

    def render(self) -> str:
        plan = self.plan
        latency = self.latency_ms()
        target = mask_card_data(self.target, shortest=FREE_TEXT_CARD_DIGITS)
        lines = [
            f"load on {target}: {len(self.stats)} terminals, {plan.rate_per_s:g}/s "
            f"for {plan.duration_s:g} s (seed {plan.seed})",
            f"duration     {self.elapsed_s:.2f} s",
            f"requests     {self.sent} sent, {self.answered} answered, "
            f"{sum(s.dropped for s in self.stats)} answers dropped, "
            f"{sum(s.no_answer for s in self.stats)} unanswered, "
            f"{sum(s.refused for s in self.stats)} refused",
            f"throughput   {self.throughput_per_s:.1f} requests/s",
            "latency      " + "  ".join(f"{k} {v:.1f} ms" for k, v in latency.items()),
            "",
            *_kind_table(self.kinds()),
            "",
            *self._settlement_lines(),
            *(f"failed: {failure}" for failure in self.failures),
        ]
        return "\n".join(lines) + "\n"

    def _settlement_lines(self) -> list[str]:
        lines = []
        for settlement in self.settlements:
            result = settlement.to_json()["result"]
            code = f" ({settlement.code})" if settlement.code not in (None, APPROVED) else ""
            upload = ", batch uploaded" if settlement.uploaded else ""
            lines.append(
                f"settlement   {settlement.terminal} batch {settlement.batch}: "
                f"{result}{code}{upload}"
            )
        unsettled = self.unsettled
        if unsettled:
            lines.append(f"settlement check: NOT balanced at {', '.join(unsettled)}")
        else:
            lines.append(f"settlement check: every terminal balanced ({len(self.stats)})")
        return lines


_OUTCOMES: Final = (DROPPED, NO_ANSWER, REFUSED, NOT_SENT)


def _kind_table(kinds: dict[str, dict[str, int]]) -> list[str]:
    """Kinds down, codes (then the outcomes without a code) across."""
    codes = sorted({c for counts in kinds.values() for c in counts if c not in _OUTCOMES})
    codes += [o for o in _OUTCOMES if any(o in counts for counts in kinds.values())]
    width = max([len(kind) for kind in kinds] + [len("kind")]) + 2
    columns = [max(len(code), 5) + 2 for code in codes]

    def row(name: str, cells: list[str]) -> str:
        shown = zip(cells, columns, strict=True)
        return (name.ljust(width) + "".join(cell.rjust(w) for cell, w in shown)).rstrip()

    rows = [row(kind, [str(counts.get(c, "")) for c in codes]) for kind, counts in kinds.items()]
    return [row("kind", codes), *rows]


def run_load(
    config: Config,
    target: str,
    plan: LoadPlan,
    connect: Callable[[], Link],
    on_progress: Callable[[Snapshot], None] | None = None,
) -> LoadSummary:
    """Run the load against the gateway `connect` reaches (one link per call) and summarise.

    Ctrl-C ends the sending early; the terminals still settle before the summary.
    """
    terminals = choose_terminals(config, plan.terminals)
    cards = usable_cards(config)
    if not cards:
        raise BadInput(f"{config.path}: no card that is active and enrolled to redeem with")
    stop = threading.Event()
    drivers = [
        _Driver(
            terminal,
            cards=cards,
            plan=plan,
            connect=connect,
            stop=stop,
            rng=random.Random(plan.seed + index),
        )
        for index, terminal in enumerate(terminals)
    ]
    start = time.monotonic()
    threads = [
        threading.Thread(
            target=driver.run,
            args=(start, index * plan.interval_s / len(drivers)),
            name=f"terminal-{driver.stats.terminal}",
            daemon=True,
        )
        for index, driver in enumerate(drivers)
    ]
    for thread in threads:
        thread.start()
    stats = [driver.stats for driver in drivers]
    finished = [driver.finished for driver in drivers]
    try:
        _wait(finished, lambda: _snapshot(stats, start, plan), on_progress)
    except KeyboardInterrupt:
        stop.set()
        _wait(finished, lambda: _snapshot(stats, start, plan), on_progress)
    return LoadSummary(target, plan, time.monotonic() - start, tuple(stats))


def _wait(
    finished: list[threading.Event],
    snapshot: Callable[[], Snapshot],
    on_progress: Callable[[Snapshot], None] | None,
) -> None:
    """Until every terminal has finished (its event set), the progress line each interval."""
    while running := [event for event in finished if not event.is_set()]:
        running[0].wait(PROGRESS_INTERVAL_S)
        if on_progress is not None:
            on_progress(snapshot())


def _snapshot(stats: list[TerminalStats], start: float, plan: LoadPlan) -> Snapshot:
    sent = sum(s.sent for s in stats)
    answered = sum(s.answered - s.refused for s in stats)
    approved = sum(s.approved for s in stats)
    return Snapshot(
        elapsed_s=time.monotonic() - start,
        duration_s=plan.duration_s,
        sent=sent,
        approved=approved,
        declined=answered - approved,
        dropped=sum(s.dropped for s in stats),
        no_answer=sum(s.no_answer for s in stats),
    )

"""Scenario files and the link under them: parsing refusals that name step and key, the runner
against a small in-memory gateway (reversals first, faults, waits, expectations, reports), every
shipped scenario against the real gateway core at its config and clock, and the TCP connection
against a loopback responder."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cardcodec.crypto import (
    Suite,
    WorkingKeys,
    decrypt_pin,
    decrypt_track,
    encrypt_pin,
    generate_working_keys,
    mac,
    verify_mac,
    wrap_working_keys,
)
from cardcodec.errors import PinBlockError
from cardcodec.frame import PROCESSING_OK, PROCESSING_SIGN_ON_AGAIN, FrameSplitter, add_length
from cardcodec.message import (
    FieldValue,
    Message,
    decode_frame,
    encode_frame,
    encode_message_with_mac,
    has_mac,
    mac_input,
    received_mac,
)
from cardcodec.profile import Kind, classify
from cardcodec.subfields import (
    RESULT_BALANCED,
    RESULT_UNBALANCED,
    Balance,
    MessageData,
    PointsInfo,
    SecurityControl,
    SettlementTotals,
    Totals,
    Track2,
)
from gateway.config import Config, load_config
from gateway.errors import BadInput
from simulators.connection import NO_FAULTS, Connection, Exchange, Faults, corrupt_mac
from simulators.recording import Recorder, read_recording
from simulators.scenario import (
    RECEIVED,
    SENT,
    Report,
    load_scenario,
    parse_scenario,
    run_scenario,
    run_scenario_file,
)
from simulators.terminal import CardEntry, Terminal, TerminalError, corrupt_pin_block
from tests.gateway_harness import Harness
from tests.test_sim_load import InProcessLink
from tests.vectors import suite_cases

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo.toml"
SCENARIOS = sorted((ROOT / "simulators" / "scenarios").glob("*.toml"))
# Every shipped scenario, those of scenarios/rehearsal/ (for config/rehearsal.toml) too.
SHIPPED = sorted((ROOT / "simulators" / "scenarios").rglob("*.toml"))
CONFIG = load_config(DEMO)
GOLD = "6688000000000000014"  # PIN 123456, 100000 points
DIAMOND = "6688001234567890124"  # no PIN, 50000 points
CASE = suite_cases()[2]  # case 1, 3DES: terminal 10000001's vector frames


# --- a small in-memory gateway --------------------------------------------------------------


FAKE_KEYS = WorkingKeys(
    pik=bytes.fromhex("97D2D784B27C3FB8D5C06B826867237C"),
    mak=bytes.fromhex("00E54078101F27557D624F87CA0020AB"),
    tdk=bytes.fromhex("E95522E5302C4567BC876719863743BC"),
)


@dataclass
class _Txn:
    terminal: str
    batch: str
    trace: str
    kind: Kind
    amount_fen: int
    points: int
    card: str
    original: _Txn | None = None
    reversed: bool = False
    voided: bool = False
    refunded_fen: int = 0


@dataclass
class FakeGateway:
    """Enough of a gateway to drive the simulator: keys, MACs, 1 point per 2 fen without
    discounts, partial approvals, voids, refunds, reversals, settlement. Not the real rules."""

    config: Config
    keys: dict[str, WorkingKeys] = field(default_factory=dict)
    batches: dict[str, str] = field(default_factory=dict)
    points: dict[str, int] = field(default_factory=dict)
    txns: dict[str, _Txn] = field(default_factory=dict)  # by RRN
    answers: dict[bytes, bytes] = field(default_factory=dict)  # stored, for repeats
    received: list[Message] = field(default_factory=list)
    differ_on_repeat: bool = False

    def __post_init__(self) -> None:
        for card in self.config.cards:
            self.points[card.number] = sum(lot.points for lot in card.lots)

    def suite(self, terminal: str) -> Suite:
        return next(t.suite for t in self.config.terminals if t.id == terminal)

    def handle(self, frame: bytes) -> bytes:
        request = decode_frame(frame)
        self.received.append(request)
        identity = frame[2:-8]
        if identity in self.answers and not self.differ_on_repeat:
            return self.answers[identity]
        answer = self._answer(request, frame)
        if request.mti in ("0200", "0220", "0400", "0500"):
            self.answers[identity] = answer
        return answer

    def _answer(self, request: Message, frame: bytes) -> bytes:
        terminal = request.text(41)
        if all(t.id != terminal for t in self.config.terminals):
            return self._reply(request, "97", {})
        processing = request.text(3) if 3 in request.fields else None
        kind = classify(request.mti, processing, request.text(60))
        if kind is Kind.SIGN_ON:
            return self._sign_on(request, terminal)
        keys = self.keys.get(terminal)
        if kind is Kind.ECHO:
            return self._reply(request, "00", {}, signed_on=keys is not None)
        payload = frame[2:]
        if (
            keys is None
            or not has_mac(payload)
            or not verify_mac(
                self.suite(terminal), keys.mak, mac_input(payload), received_mac(payload)
            )
        ):
            return self._reply(request, "A0", {}, signed_on=False)
        if kind is Kind.SIGN_OFF:
            del self.keys[terminal]
            return self._reply(request, "00", {}, mac_keys=keys)
        if kind is Kind.SETTLEMENT:
            return self._settle(request, terminal, keys)
        if kind in (Kind.UPLOAD, Kind.UPLOAD_END):
            return self._reply(request, "00", {}, mac_keys=keys)
        return self._financial(request, terminal, keys, kind)

    def _reply(
        self,
        request: Message,
        code: str,
        extra: dict[int, FieldValue],
        *,
        signed_on: bool = True,
        mac_keys: WorkingKeys | None = None,
    ) -> bytes:
        fields = {n: request.fields[n] for n in (11, 41, 42, 60) if n in request.fields}
        fields |= {12: "120000", 13: "0606", 39: code, **extra}
        processing = PROCESSING_OK if signed_on else PROCESSING_SIGN_ON_AGAIN
        reply = request.reply(fields, processing)
        if mac_keys is None:
            return encode_frame(reply)
        suite = self.suite(request.text(41))
        return add_length(encode_message_with_mac(reply, lambda d: mac(suite, mac_keys.mak, d)))

    def _sign_on(self, request: Message, terminal: str) -> bytes:
        data = MessageData.parse(request.text(60))
        suite = self.suite(terminal)
        asked = Suite.TDES if data.management_code in ("003", "004") else Suite.SM4
        if asked is not suite:
            return self._reply(request, "A7", {})
        tdk = FAKE_KEYS.tdk if data.management_code in ("004", "006") else None
        keys = self.keys[terminal] = WorkingKeys(FAKE_KEYS.pik, FAKE_KEYS.mak, tdk)
        tmk = next(t.tmk for t in self.config.terminals if t.id == terminal)
        batch = self.batches.setdefault(terminal, "000001")
        extra: dict[int, FieldValue] = {15: "0606", 32: "48020000", 37: self._rrn()}
        extra |= {60: data.with_batch(batch).format(), 62: wrap_working_keys(suite, tmk, keys)}
        return self._reply(request, "00", extra)

    def _rrn(self) -> str:
        return f"{len(self.txns) + 1 + len(self.received):012d}"

    def _card(self, request: Message, keys: WorkingKeys) -> str:
        if 2 in request.fields:
            return request.text(2)
        track = request.text(35)
        if SecurityControl.parse(request.text(53)).track_encrypted and keys.tdk is not None:
            track = decrypt_track(self.suite(request.text(41)), keys.tdk, track)
        return Track2.parse(track).card_number

    def _financial(self, request: Message, terminal: str, keys: WorkingKeys, kind: Kind) -> bytes:
        base: dict[int, FieldValue] = {3: request.text(3), 15: "0606", 32: "48020000", 49: "156"}
        if 4 in request.fields:
            base[4] = request.text(4)
        rrn = base[37] = self._rrn()
        if kind is Kind.REVERSAL:
            self._reverse(request, terminal)
            return self._reply(request, "00", base, mac_keys=keys)
        card = self._card(request, keys)
        code, txn, points = self._decide(request, terminal, kind, card)
        if code not in ("00", "10"):
            return self._reply(request, code, base)
        if txn is not None:
            self.txns[rrn] = txn
            base[4] = f"{txn.amount_fen:012d}"
        balance = self.points[card]
        base |= {38: "A1B2C3", 54: Balance(2 * balance).format()}
        cash_fen = 0 if kind is Kind.BALANCE else 2 * points
        base[63] = PointsInfo(points, balance, 0, cash_fen).format()
        return self._reply(request, code, base, mac_keys=keys)

    def _decide(
        self, request: Message, terminal: str, kind: Kind, card: str
    ) -> tuple[str, _Txn | None, int]:
        batch, trace = MessageData.parse(request.text(60)).batch, request.text(11)
        if kind is Kind.BALANCE:
            return "00", None, 0
        amount = int(request.text(4))
        if kind is Kind.REDEMPTION:
            wanted, held = -(-amount // 2), self.points[card]
            code = "00"
            if wanted > held:
                if not MessageData.parse(request.text(60)).partial_supported or held == 0:
                    return "51", None, 0
                code, amount, wanted = "10", 2 * held, held
            self.points[card] -= wanted
            return code, _Txn(terminal, batch, trace, kind, amount, wanted, card), wanted
        original = self.txns.get(request.text(37))
        if original is None or original.card != card:
            return "25", None, 0
        if kind is Kind.VOID:
            if amount != original.amount_fen:
                return "64", None, 0
            original.voided = True
            self.points[card] += original.points
            return (
                "00",
                _Txn(terminal, batch, trace, kind, amount, original.points, card, original),
                original.points,
            )
        if amount > original.amount_fen - original.refunded_fen:
            return "13", None, 0
        original.refunded_fen += amount
        returned = original.points * amount // original.amount_fen
        self.points[card] += returned
        return "00", _Txn(terminal, batch, trace, kind, amount, returned, card, original), returned

    def _reverse(self, request: Message, terminal: str) -> None:
        batch, trace = MessageData.parse(request.text(60)).batch, request.text(11)
        for txn in self.txns.values():
            if (txn.terminal, txn.batch, txn.trace) == (
                terminal,
                batch,
                trace,
            ) and not txn.reversed:
                txn.reversed = True
                self.points[txn.card] += txn.points if txn.kind is Kind.REDEMPTION else -txn.points

    def _settle(self, request: Message, terminal: str, keys: WorkingKeys) -> bytes:
        batch = MessageData.parse(request.text(60)).batch
        txns = [t for t in self.txns.values() if (t.terminal, t.batch) == (terminal, batch)]
        live = [t for t in txns if not t.reversed]
        debits = [t.amount_fen for t in live if t.kind is Kind.REDEMPTION]
        credits = [t.amount_fen for t in live if t.kind is not Kind.REDEMPTION]
        own = Totals(sum(debits), len(debits), sum(credits), len(credits))
        theirs = SettlementTotals.parse(request.text(48)).totals
        result = RESULT_BALANCED if own == theirs else RESULT_UNBALANCED
        self.batches[terminal] = f"{int(batch) + 1:06d}"
        extra: dict[int, FieldValue] = {15: "0606", 48: SettlementTotals(own, result).format()}
        return self._reply(request, "00", extra, mac_keys=keys)

    def sent_mtis(self) -> list[str]:
        return [message.mti for message in self.received]


class FakeLink:
    """A link straight into a FakeGateway, with the same fault semantics as Connection."""

    def __init__(self, gateway: FakeGateway, links: list[FakeLink]) -> None:
        self.gateway = gateway
        self._closed = False
        links.append(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def exchange(self, frame: bytes, faults: Faults = NO_FAULTS, terminal: str = "") -> Exchange:
        wire = corrupt_mac(frame) if faults.corrupt_mac else frame
        if faults.disconnect:
            self._closed = True
            return Exchange((wire[:20],), (), disconnected=True)
        copies = 2 if faults.repeat else 1
        answers = tuple(self.gateway.handle(wire) for _ in range(copies))
        return Exchange((wire,) * copies, answers, dropped=faults.drop_answer)


@dataclass
class Played:
    report: Report
    gateway: FakeGateway
    links: list[FakeLink]


def play(text: str, gateway: FakeGateway | None = None) -> Played:
    """Parse a scenario's TOML against the demo config and run it on a FakeGateway."""
    gateway = gateway or FakeGateway(CONFIG)
    links: list[FakeLink] = []
    scenario = parse_scenario(tomllib.loads(text), CONFIG, "test.toml")
    report = run_scenario(scenario, CONFIG, lambda: FakeLink(gateway, links))
    return Played(report, gateway, links)


SIGN_ON = """
[[step]]
terminal = "10000001"
do = "sign_on"
tdk = true
expect = { code = "00" }
"""


def step(**keys: Any) -> str:
    """One [[step]] table in TOML."""
    body = "\n".join(f"{key} = {_toml(value)}" for key, value in keys.items())
    return f"\n[[step]]\n{body}\n"


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def redeem_step(card: str = DIAMOND, amount_fen: int = 1000, **keys: Any) -> str:
    table = {"terminal": "10000001", "do": "redeem", "card": card, "amount_fen": amount_fen}
    return step(**(table | keys))


# --- the shipped scenarios -------------------------------------------------------------------


def named_config(path: Path) -> Path:
    """The config a shipped scenario names at top level (`config`, from the project root)."""
    name = tomllib.loads(path.read_text(encoding="utf-8"))["config"]
    return ROOT / name


def shipped_id(path: Path) -> str:
    return str(path.relative_to(ROOT / "simulators" / "scenarios"))


@pytest.mark.parametrize("path", SHIPPED, ids=shipped_id)
def test_shipped_scenarios_parse_against_the_config_they_name(path: Path) -> None:
    """Every file in simulators/scenarios/ (rehearsal/ too) names a config of config/ and a
    gateway clock, and is a valid scenario against that config."""
    config = named_config(path)
    assert config.parent == ROOT / "config" and config.is_file()
    scenario = load_scenario(path, load_config(config))
    assert scenario.steps and scenario.clock is not None
    assert scenario.config == str(config.relative_to(ROOT))


def test_top_level_scenarios_play_on_the_demo_config() -> None:
    """Only scenarios/rehearsal/ holds scenarios for another config than the demo's."""
    assert {named_config(path) for path in SCENARIOS} == {DEMO}


def test_the_shipped_scenarios_exist() -> None:
    """The merchant's day, the declines and the two rehearsals ship with the simulator."""
    assert {shipped_id(path) for path in SHIPPED} >= {
        "merchant-day.toml",
        "declines.toml",
        "rehearsal/declines.toml",
        "rehearsal/key-lifetime.toml",
    }


def test_declines_scenario_expects_every_decline_the_demo_can_produce() -> None:
    """declines.toml covers the codes the demo config can give, each at least once."""
    scenario = load_scenario(ROOT / "simulators" / "scenarios" / "declines.toml", CONFIG)
    codes = {s.expect.code for s in scenario.steps}
    assert codes >= {"A7", "14", "57", "62", "55", "12", "51", "61", "13", "64", "25", "22"}
    assert codes >= {"94", "A0", "30", "99"}


def harness_for(path: Path, tmp_path: Path) -> tuple[Harness, Config]:
    """The real gateway core, in process, on a fresh ledger loaded from the config the
    scenario names, its clock standing at the scenario's clock until a step waits."""
    folder = tmp_path / path.stem
    folder.mkdir()
    config = load_config(named_config(path), f"sqlite:///{folder / 'ledger.db'}")
    issuer = dataclasses.replace(
        config.issuer, master_key=folder / "master.key", signing_key=folder / "issuer.pem"
    )
    config = dataclasses.replace(config, issuer=issuer)
    clock = load_scenario(path, config).clock
    assert clock is not None
    return Harness(config, clock), config


@pytest.mark.parametrize("path", SHIPPED, ids=shipped_id)
def test_shipped_scenarios_pass_against_the_gateway_core_in_process(
    path: Path, tmp_path: Path
) -> None:
    """Every step of every shipped scenario passes against the real decision and ledger at
    its config and clock; a wait moves the gateway's clock instead of the test's."""
    harness, config = harness_for(path, tmp_path)
    lock = threading.Lock()
    waited: list[float] = []

    def wait(seconds: float) -> None:
        waited.append(seconds)
        harness.clock.advance(timedelta(seconds=seconds))

    scenario = load_scenario(path, config)
    report = run_scenario(scenario, config, lambda: InProcessLink(harness, lock), sleep=wait)
    assert report.failed == 0, report.render()
    assert waited == [s.wait_s for s in scenario.steps if s.wait_s is not None]


# --- parsing refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (step(terminal="10000001", do="fly"), "step 2: do: 'fly' is not one of"),
        (step(terminal="10000001", card=GOLD), "step 2: do: missing"),
        (
            step(terminal="10000001", do="redeem", card=DIAMOND),
            "step 2 (redeem): amount_fen: missing",
        ),
        (
            redeem_step(amount_fen="100"),
            "step 2 (redeem): amount_fen: must be an integer, not a string",
        ),  # type: ignore[arg-type]
        (redeem_step(amount_fen=True), "amount_fen: must be an integer, not a boolean"),  # type: ignore[arg-type]
        (redeem_step(amount_fen=-1), "step 2 (redeem): amount_fen: -1 is outside"),
        (redeem_step(amount=5), "step 2 (redeem): amount: unknown key for redeem"),
        (
            step(terminal="10000001", do="balance", amount_fen=5, card=GOLD),
            "balance): amount_fen: unknown key",
        ),
        (redeem_step(card="6688"), "step 2 (redeem): card: '****' is not 13 to 19 digits"),
        (redeem_step(card="66880000000000000998"), "card: '668800**********0998' is not 13"),
        (
            redeem_step(card="6688000000000000998"),
            "expiry: missing, and card 668800*********0998 is not in the config",
        ),
        (redeem_step(expiry="2813"), "step 2 (redeem): expiry: '2813' is not YYMM"),
        (
            redeem_step(expiry="6688000000000000998"),  # the card number in the wrong key
            "step 2 (redeem): expiry: '668800*********0998' is not YYMM",
        ),
        (
            redeem_step(expect={"code": "6688000000000000998"}),
            "expect: code: '668800*********0998' is not a 2-character",
        ),
        (redeem_step(pin="12ab"), "step 2 (redeem): pin: must be 4 to 12 digits"),
        (
            redeem_step(terminal="99999999"),
            "step 2 (redeem): terminal: '99999999' is not a terminal",
        ),
        (step(do="echo"), "step 2 (echo): terminal: missing"),
        (redeem_step(entry="tap"), "step 2 (redeem): entry: 'tap' is not one of swipe, keyed"),
        (
            redeem_step(entry="keyed", encrypt_track=True),
            "encrypt_track: a keyed card has no track",
        ),
        (redeem_step(partial="yes"), "step 2 (redeem): partial: must be a boolean"),
        (
            redeem_step(expect={"code": "0"}),
            "step 2 (redeem): expect: code: '0' is not a 2-character",
        ),
        (
            redeem_step(expect={"points_used": 1}),
            "step 2 (redeem): expect: points_used: unknown key",
        ),
        (redeem_step(expect={"points": -1}), "step 2 (redeem): expect: points: -1 is outside"),
        (redeem_step(expect={"result": "balanced"}), "expect: result: only a settle step"),
        (redeem_step(expect="00"), "step 2 (redeem): expect: must be a table, not a string"),
        (
            step(terminal="10000001", do="sign_on", corrupt_mac=True),
            "step 2 (sign_on): corrupt_mac: a sign_on carries no MAC",
        ),
        (redeem_step(disconnect=True, drop_answer=True), "disconnect: leaves no answer"),
        (
            redeem_step(disconnect=True, expect={"code": "00"}),
            "expect: a disconnected step gets no answer",
        ),
        (
            step(terminal="10000001", do="void", original="r9"),
            "step 2 (void): original: 'r9' is not saved by an earlier step",
        ),
        (
            step(terminal="10000001", do="reverse", original="r9", reason="00"),
            "original: 'r9' is not saved",
        ),
        (
            step(terminal="10000001", do="sign_on", trace=0),
            "step 2 (sign_on): trace: 0 is outside 1-999999",
        ),
        (
            step(terminal="10000001", do="sign_on", suite="aes"),
            "step 2 (sign_on): suite: 'aes' is not one of 3des, sm4",
        ),
        (
            step(terminal="10000001", do="upload", drop_answer=True),
            "step 2 (upload): drop_answer: unknown key for upload",
        ),
        (redeem_step(save="r 1"), "step 2 (redeem): save: must be 1 to 32 letters"),
        (
            step(terminal="10000001", do="void", original="r1", expiry="2812"),
            "expiry: given without card",
        ),
        ("\n[other]\n", "test.toml: other: unknown key"),
        (redeem_step(wait_s=0), "step 2 (redeem): wait_s: 0 is outside 1-600"),
        (redeem_step(wait_s=601), "step 2 (redeem): wait_s: 601 is outside 1-600"),
        (redeem_step(wait_s="6"), "step 2 (redeem): wait_s: must be an integer, not a string"),
        (redeem_step(wait_s=1.5), "step 2 (redeem): wait_s: must be an integer, not a float"),
        (
            redeem_step(corrupt_pin=True),
            "step 2 (redeem): corrupt_pin: needs pin: it corrupts the block of the PIN",
        ),
        (
            redeem_step(pin="123456", corrupt_pin=1),
            "step 2 (redeem): corrupt_pin: must be a boolean, not an integer",
        ),
        (
            step(terminal="10000001", do="sign_on", corrupt_pin=True),
            "step 2 (sign_on): corrupt_pin: unknown key for sign_on",
        ),
        (redeem_step(omit_field=1), "step 2 (redeem): omit_field: 1 is outside 2-64"),
        (redeem_step(omit_field=65), "step 2 (redeem): omit_field: 65 is outside 2-64"),
        (redeem_step(omit_field="25"), "omit_field: must be an integer, not a string"),
        (
            redeem_step(omit_field=41),
            "step 2 (redeem): omit_field: field 41 identifies the request (11, 41, 42, 60 stay in)",
        ),
        (redeem_step(omit_field=60), "omit_field: field 60 identifies the request"),
        (
            redeem_step(omit_field=25, drop_answer=True),
            "step 2 (redeem): omit_field: not with drop_answer or disconnect",
        ),
        (redeem_step(omit_field=25, disconnect=True), "omit_field: not with drop_answer"),
        (
            step(terminal="10000001", do="upload", omit_field=48),
            "step 2 (upload): omit_field: unknown key for upload",
        ),
        (
            redeem_step(terminal="99000001"),
            "terminal: '99000001' is not a terminal of the config or of extra_terminals",
        ),
    ],
)
def test_bad_steps_are_refused_naming_step_and_key(second: str, message: str) -> None:
    """Each bad value is one BadInput naming the file, the step, the key and what is wrong."""
    text = SIGN_ON + second
    with pytest.raises(BadInput) as refused:
        parse_scenario(tomllib.loads(text), CONFIG, "test.toml")
    assert str(refused.value).startswith("test.toml: ")
    assert message in str(refused.value)


VOID_V1 = step(terminal="10000001", do="void", original="r1", save="v1")
REFUND_V1 = step(terminal="10000001", do="refund", original="v1", amount_fen=1)
REVERSE_R1 = step(terminal="10000002", do="reverse", original="r1")
REASON_00 = step(terminal="10000001", do="reverse", original="r1", reason="00")
LOCAL_CLOCK = "\nclock = 2026-06-06T12:00:00\n" + SIGN_ON


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (redeem_step(save="r1") * 2, "step 2 (redeem): save: 'r1' is already saved by step 1"),
        (
            redeem_step(save="r1") + VOID_V1 + REFUND_V1,
            "step 3 (refund): original: 'v1' is a void; a refund takes a redeem",
        ),
        (
            redeem_step(save="r1") + REVERSE_R1,
            "step 2 (reverse): original: 'r1' was sent by terminal 10000001",
        ),
        (
            redeem_step(save="r1") + REASON_00,
            "step 2 (reverse): reason: '00' is not one of 98, 96, A0, 06",
        ),
        ("", "step: no [[step]] tables"),
        ("\nstep = 3\n", "test.toml: step: must be an array, not an integer"),
        (LOCAL_CLOCK, "clock: must be a date-time with a UTC offset"),
        ("\nstep = [1]\n", "step 1: must be a table, not an integer"),
    ],
)
def test_references_between_steps_are_checked(steps: str, message: str) -> None:
    """Saved names are unique, originals exist, are of the right kind and terminal."""
    with pytest.raises(BadInput, match=re.escape(message)):
        parse_scenario(tomllib.loads(steps), CONFIG, "test.toml")


EXTRA = {"id": "99000001", "merchant": "898310048990001", "suite": "3des"}
EXTRA_TMK = "2C1B4281ED510B76F43CF0635EFA7712"


def extra_terminal(**keys: Any) -> str:
    """One [[extra_terminals]] table in TOML."""
    body = "\n".join(f"{key} = {_toml(value)}" for key, value in keys.items())
    return f"\n[[extra_terminals]]\n{body}\n"


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ("config = 5\n", "test.toml: config: must be a string, not an integer"),
        ('config = " "\n', "test.toml: config: must be a path, as given to --config"),
        ('extra_terminals = "x"\n', "test.toml: extra_terminals: must be an array, not a string"),
        ("extra_terminals = [1]\n", "test.toml: extra_terminals 1: must be a table, not an int"),
        (
            extra_terminal(**(EXTRA | {"id": "10000001"}), tmk=EXTRA_TMK),
            "test.toml: extra_terminals 1: id: '10000001' is a terminal of the config: "
            "an extra one must be unknown to the gateway",
        ),
        (
            extra_terminal(**EXTRA, tmk=EXTRA_TMK) * 2,
            "test.toml: extra_terminals 2: id: '99000001' is already extra terminal 1",
        ),
        (
            extra_terminal(**(EXTRA | {"id": "9900001"}), tmk=EXTRA_TMK),
            "extra_terminals 1: id: '9900001' must be 8 letters or digits, as in the config",
        ),
        (
            extra_terminal(**(EXTRA | {"id": "99-0 01!"}), tmk=EXTRA_TMK),
            "extra_terminals 1: id: '99-0 01!' must be 8 letters or digits, as in the config",
        ),
        (
            extra_terminal(**(EXTRA | {"merchant": "89831004899000"}), tmk=EXTRA_TMK),
            "extra_terminals 1: merchant: '89831004899000' must be 15 letters or digits",
        ),
        (
            extra_terminal(**(EXTRA | {"suite": "aes"}), tmk=EXTRA_TMK),
            "extra_terminals 1: suite: 'aes' is not one of 3des, sm4",
        ),
        (  # the master key one line off: refused, only its length shown
            extra_terminal(**(EXTRA | {"merchant": EXTRA_TMK}), tmk=EXTRA_TMK),
            "extra_terminals 1: merchant: '<32 hex characters>' must be 15 letters or digits",
        ),
        (
            extra_terminal(id="99000001", merchant="898310048990001", tmk=EXTRA_TMK),
            "extra_terminals 1: suite: missing (required)",
        ),
        (extra_terminal(**EXTRA), "extra_terminals 1: tmk: missing (required)"),
        (
            extra_terminal(**EXTRA, tmk="2C1B4281ED510B76F43CF0635EFA77"),
            "extra_terminals 1: tmk: must be 32 hex digits (16 bytes)",
        ),
        (
            extra_terminal(**EXTRA, tmk="0123456789ABCDEF0123456789ABCDEF"),
            "extra_terminals 1: tmk: the two halves of a 3DES key are equal",
        ),
        (
            extra_terminal(**EXTRA, tmk="0123456789ABCDEF0022446688AACCEE"),
            "extra_terminals 1: tmk: the two halves of a 3DES key are equal but for parity",
        ),
        (
            extra_terminal(**EXTRA, tmk=EXTRA_TMK, enabled=False),
            "extra_terminals 1: enabled: unknown key",
        ),
        (
            "extra_terminals = [" + ", ".join(["{}"] * 101) + "]\n",
            "test.toml: extra_terminals: more than 100",
        ),
    ],
)
def test_bad_top_level_keys_are_refused_naming_table_and_key(top: str, message: str) -> None:
    """`config` and `[[extra_terminals]]` are checked like steps: one BadInput naming the
    table and the key, never a master key's value."""
    with pytest.raises(BadInput) as refused:
        parse_scenario(tomllib.loads(top + SIGN_ON), CONFIG, "test.toml")
    assert message in str(refused.value)
    assert "2C1B4281" not in str(refused.value) and "0123456789ABCDEF" not in str(refused.value)


def test_new_keys_parse_into_the_step_and_the_scenario() -> None:
    """wait_s (upload too), corrupt_pin, omit_field, config and an extra terminal."""
    text = (
        'config = "config/demo.toml"\n'
        + extra_terminal(**(EXTRA | {"suite": "sm4"}), tmk="00" * 16)
        + SIGN_ON
        + redeem_step(card=GOLD, pin="123456", corrupt_pin=True, wait_s=6)
        + redeem_step(omit_field=25, corrupt_mac=True, repeat=True)
        + step(terminal="10000001", do="upload", wait_s=600)
        + step(terminal="99000001", do="sign_on", expect={"code": "97"})
    )
    scenario = parse_scenario(tomllib.loads(text), CONFIG, "test.toml")
    assert scenario.config == "config/demo.toml"
    (extra,) = scenario.extra_terminals
    assert (extra.id, extra.merchant, extra.suite, extra.enabled) == (
        "99000001",
        "898310048990001",
        Suite.SM4,
        True,
    )
    assert "tmk" not in repr(extra) and "00" * 16 not in repr(scenario)
    redeem, omitted, upload = scenario.steps[1:4]
    assert (redeem.wait_s, redeem.corrupt_pin, redeem.fault_names) == (6, True, ("corrupt_pin",))
    assert omitted.fault_names == ("corrupt_mac", "repeat", "omit_field 25")
    assert (upload.wait_s, scenario.steps[0].wait_s) == (600, None)


def test_refusals_never_show_a_pin_or_a_whole_card_number() -> None:
    """A bad PIN is not repeated and a bad card number is masked."""
    for text in (
        redeem_step(pin="12x456"),
        redeem_step(card="66880000000000009981"),
        redeem_step(amount_fen=6688000000000000014),  # a card number one key off
        redeem_step(expect={"balance_fen": 6688000000000000014}),
    ):
        with pytest.raises(BadInput) as refused:
            parse_scenario(tomllib.loads(text), CONFIG, "test.toml")
        assert "12x456" not in str(refused.value)
        assert "66880000000000009981" not in str(refused.value)
        assert "6688000000000000014" not in str(refused.value)


def test_card_expiry_comes_from_the_config_unless_the_step_gives_one() -> None:
    """A config card takes its expiry from `[[cards]]`; an unknown card needs `expiry`."""
    text = redeem_step(card=GOLD) + redeem_step(card="6688000000000000998", expiry="3001")
    scenario = parse_scenario(tomllib.loads(text), CONFIG, "test.toml")
    cards = [s.card for s in scenario.steps]
    assert [c.expiry_yymm for c in cards if c is not None] == ["2812", "3001"]


# --- playing against the in-memory gateway ----------------------------------------------------


def test_a_short_day_passes_and_the_settlement_balances() -> None:
    """Sign on, balance, redeem, void, refund, partial, settle, upload, sign off: all pass."""
    text = (
        SIGN_ON
        + step(terminal="10000001", do="balance", card=GOLD, pin="123456", encrypt_track=True,
               expect={"code": "00", "balance": 100000, "balance_fen": 200000})
        + redeem_step(card=GOLD, amount_fen=12800, pin="123456", save="r1",
                      expect={"code": "00", "points": 6400, "balance": 93600, "amount": 12800})
        + redeem_step(amount_fen=3000, save="r2", entry="keyed")
        + step(terminal="10000001", do="void", original="r2", entry="swipe",
               expect={"code": "00", "points": 1500, "balance": 50000})
        + step(terminal="10000001", do="refund", original="r1", amount_fen=6400,
               expect={"code": "00", "points": 3200})
        + redeem_step(card="6688000000000000048", amount_fen=1000, partial=True,
                      expect={"code": "10", "amount": 300, "points": 150})
        + step(terminal="10000001", do="settle", expect={"code": "00", "result": "balanced"})
        + step(terminal="10000001", do="upload", expect={"code": "00"})
        + step(terminal="10000001", do="sign_off", expect={"code": "00"})
    )  # fmt: skip
    played = play(text)
    assert played.report.failed == 0, played.report.render()
    uploads = [m for m in played.gateway.received if m.mti == "0320"]
    assert [MessageData.parse(m.text(60)).management_code for m in uploads] == ["201", "207"]


def test_a_wrong_expectation_fails_the_step_with_the_reason() -> None:
    """An answer that differs from `expect` fails that step and says what differed."""
    played = play(SIGN_ON + redeem_step(amount_fen=10**6, expect={"code": "00", "points": 1}))
    assert played.report.failed == 1
    problems = played.report.steps[1].problems
    assert problems == [
        "code: expected 00, got 51",
        "points: expected 1, got nothing (field absent)",
    ]


def test_a_dropped_answer_makes_the_next_frame_a_reversal_98() -> None:
    """After a dropped answer, the next step's first frame is the 0400 (reason 98), then the
    step itself; the dropped answer is still checked against `expect`."""
    text = (
        SIGN_ON
        + redeem_step(amount_fen=3000, drop_answer=True, expect={"code": "00", "points": 1500})
        + step(terminal="10000001", do="balance", card=DIAMOND, expect={"balance": 50000})
    )
    played = play(text)
    assert played.report.failed == 0, played.report.render()
    assert played.gateway.sent_mtis() == ["0800", "0200", "0400", "0200"]
    reversal = played.gateway.received[2]
    assert reversal.fields[39] == "98"
    assert reversal.fields[11] == played.gateway.received[1].fields[11]
    assert "(a reversal is owed, reason 98)" in played.report.steps[1].received


def test_a_dropped_answer_on_the_last_step_is_reversed_before_the_run_ends() -> None:
    """With no step after it, the owed 0400 (reason 98) goes at the end, shown under the
    last step, and the points come back."""
    played = play(SIGN_ON + redeem_step(amount_fen=3000, drop_answer=True))
    assert played.report.failed == 0, played.report.render()
    assert played.gateway.sent_mtis() == ["0800", "0200", "0400"]
    assert played.gateway.received[2].fields[39] == "98"
    assert played.gateway.points[DIAMOND] == 50000
    assert "(owed at the end of the scenario)" in played.report.render()


def test_a_reverse_step_sends_the_owed_reversal_itself() -> None:
    """`do = reverse` of the transaction whose answer was lost sends exactly one 0400."""
    text = (
        SIGN_ON
        + redeem_step(amount_fen=3000, drop_answer=True, save="lost")
        + step(terminal="10000001", do="reverse", original="lost", expect={"code": "00"})
    )
    played = play(text)
    assert played.report.failed == 0, played.report.render()
    assert played.gateway.sent_mtis() == ["0800", "0200", "0400"]
    assert played.gateway.points[DIAMOND] == 50000


def test_a_reverse_step_of_an_answered_redemption_says_the_terminal_failed() -> None:
    """Reversing an answered redemption sends reason 96 (or the step's reason)."""
    text = (
        SIGN_ON
        + redeem_step(amount_fen=3000, save="r1")
        + step(terminal="10000001", do="reverse", original="r1", reason="06")
        + redeem_step(amount_fen=2000, save="r2")
        + step(terminal="10000001", do="reverse", original="r2")
    )
    played = play(text)
    reasons = [m.fields[39] for m in played.gateway.received if m.mti == "0400"]
    assert reasons == ["06", "96"]
    assert played.gateway.points[DIAMOND] == 50000


def test_reversing_a_transaction_again_repeats_its_0400() -> None:
    """A second `reverse` of a reversed transaction sends the same 0400, reason included
    (§4.6: a repeat changes nothing), not another reversal with the default reason."""
    text = (
        SIGN_ON
        + redeem_step(amount_fen=3000, drop_answer=True, save="lost")
        + step(terminal="10000001", do="reverse", original="lost", expect={"code": "00"})
        + step(terminal="10000001", do="reverse", original="lost", expect={"code": "00"})
    )
    played = play(text)
    assert played.report.failed == 0, played.report.render()
    first, again = [m for m in played.gateway.received if m.mti == "0400"]
    assert first.fields[39] == "98"
    assert {n: v for n, v in first.fields.items() if n != 64} == {
        n: v for n, v in again.fields.items() if n != 64
    }


def test_another_reason_for_a_reversal_already_owed_fails_the_step() -> None:
    """The reversal of a dropped answer is owed with reason 98; a `reverse` asking for 06
    would be another reversal of it: the step fails saying so, nothing is sent for it. The
    reversal owed (98) goes at the end of the run."""
    text = (
        SIGN_ON
        + redeem_step(amount_fen=3000, drop_answer=True, save="lost")
        + step(terminal="10000001", do="reverse", original="lost", reason="06")
    )
    played = play(text)
    assert played.report.steps[2].problems == [
        "the reversal of trace 000002 is owed with reason 98 already; with 06 it would be "
        "another reversal"
    ]
    assert played.gateway.sent_mtis() == ["0800", "0200", "0400"]
    assert played.gateway.received[2].fields[39] == "98"


def test_a_step_whose_original_was_never_sent_fails_and_the_report_goes_on() -> None:
    """A redemption refused before sending (no sign-on) leaves nothing to void: the void
    fails saying so, and the report lists both steps."""
    text = redeem_step(amount_fen=3000, save="r1") + step(
        terminal="10000001", do="void", original="r1"
    )
    played = play(text)
    assert played.report.failed == 2
    assert played.report.steps[1].problems == ["its original 'r1' was never sent"]
    assert played.gateway.sent_mtis() == []


def test_a_dropped_void_answer_is_reversed_with_field_61() -> None:
    """A void whose answer is lost is reversed before the next step, 61 kept, 37 dropped."""
    text = (
        SIGN_ON
        + redeem_step(amount_fen=3000, save="r1")
        + step(terminal="10000001", do="void", original="r1", drop_answer=True)
        + step(terminal="10000001", do="echo")
    )
    played = play(text)
    reversal = played.gateway.received[3]
    assert reversal.mti == "0400" and reversal.fields[60][:2] == "23"
    assert 61 in reversal.fields and 37 not in reversal.fields


def test_a_keyed_redemption_is_reversed_with_card_number_and_expiry() -> None:
    """The reversal of a keyed redemption carries 2 and 14 and no PIN."""
    text = (
        SIGN_ON
        + redeem_step(card=GOLD, pin="123456", entry="keyed", drop_answer=True)
        + step(terminal="10000001", do="echo")
    )
    reversal = play(text).gateway.received[2]
    assert (reversal.fields[2], reversal.fields[14]) == (GOLD, "2812")
    assert 26 not in reversal.fields and 52 not in reversal.fields


def test_a_corrupted_mac_is_answered_a0_with_sign_on_again() -> None:
    """corrupt_mac reaches the gateway with a wrong MAC; its A0 and header 3 pass `expect`."""
    text = SIGN_ON + redeem_step(corrupt_mac=True, expect={"code": "A0", "sign_on_again": True})
    played = play(text)
    assert played.report.failed == 0, played.report.render()
    assert played.gateway.points[DIAMOND] == 50000


def test_corrupt_pin_sends_a_block_that_decrypts_to_no_valid_block() -> None:
    """corrupt_pin: field 52 (3DES) or 62 (SM4) holds a block no PIN gives, under the PIK the
    sign-on issued, and the MAC is right for what is sent; the report names the fault."""
    sm4_sign_on = SIGN_ON.replace('"10000001"', '"10000002"').replace("true", "false")
    text = (
        SIGN_ON
        + sm4_sign_on
        + redeem_step(card=GOLD, pin="123456", corrupt_pin=True)
        + redeem_step(card=GOLD, pin="123456", corrupt_pin=True, terminal="10000002")
    )
    played = play(text)
    assert played.report.failed == 0, played.report.render()
    cases = ((2, 52, Suite.TDES), (3, 62, Suite.SM4))  # (received, PIN block field, suite)
    for index, number, suite in cases:
        message = played.gateway.received[index]
        block = message.fields[number]
        assert isinstance(block, bytes) and block == corrupt_pin_block(suite, FAKE_KEYS.pik)
        with pytest.raises(PinBlockError):
            decrypt_pin(suite, FAKE_KEYS.pik, block, GOLD)
        payload = encode_frame(message)[2:]
        assert verify_mac(suite, FAKE_KEYS.mak, mac_input(payload), received_mac(payload))
    assert "[corrupt_pin]" in played.report.steps[2].sent[0]


def test_omit_field_sends_the_request_without_it_maced_as_sent() -> None:
    """omit_field: the field is gone, everything else is as built, and the MAC covers what is
    sent (the fake gateway checks it, so the only fault the gateway sees is the gap)."""
    text = (
        SIGN_ON
        + redeem_step(omit_field=25, expect={"code": "00"})
        + step(terminal="10000001", do="settle", omit_field=49)
    )
    played = play(text)
    assert played.report.failed == 0, played.report.render()
    redemption, settlement = played.gateway.received[1:3]
    assert 25 not in redemption.fields and {4, 35, 60} <= set(redemption.fields)
    assert 49 not in settlement.fields and 48 in settlement.fields
    assert "[omit_field 25]" in played.report.steps[1].sent[0]


def test_omit_field_64_sends_no_mac_and_a_missing_field_fails_the_step() -> None:
    """Leaving out the MAC sends none (the fake answers A0); a field the request does not
    carry fails the step without sending, and the run goes on."""
    text = (
        SIGN_ON
        + redeem_step(omit_field=64, expect={"code": "A0"})
        + redeem_step(omit_field=52)
        + step(terminal="10000001", do="echo", expect={"code": "00"})
    )
    played = play(text)
    assert not has_mac(encode_frame(played.gateway.received[1])[2:])
    assert played.report.steps[1].passed
    assert played.report.steps[2].problems == ["the redemption carries no field 52 to leave out"]
    assert played.gateway.sent_mtis() == ["0800", "0200", "0820"]


def test_a_step_of_an_extra_terminal_is_played_as_that_terminal() -> None:
    """An extra terminal signs on with its own id and merchant; the gateway answers 97."""
    sign_on = step(terminal="99000001", do="sign_on", expect={"code": "97"})
    text = extra_terminal(**EXTRA, tmk=EXTRA_TMK) + sign_on
    played = play(text)
    assert played.report.failed == 0, played.report.render()
    (sign_on,) = played.gateway.received
    assert (sign_on.fields[41], sign_on.fields[42]) == ("99000001", "898310048990001")


class FakeTime:
    """A monotonic clock that only `sleep` moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


def play_timed(text: str, clock: FakeTime) -> Played:
    gateway = FakeGateway(CONFIG)
    links: list[FakeLink] = []
    scenario = parse_scenario(tomllib.loads(text), CONFIG, "test.toml")
    report = run_scenario(
        scenario,
        CONFIG,
        lambda: FakeLink(gateway, links),
        sleep=clock.sleep,
        monotonic=clock.monotonic,
    )
    return Played(report, gateway, links)


def test_wait_s_sleeps_before_anything_is_sent_and_the_report_says_so() -> None:
    """A step's wait comes before its own request and before a reversal the terminal owes."""
    clock = FakeTime()
    sent_before_wait: list[int] = []
    text = SIGN_ON + redeem_step(drop_answer=True) + redeem_step(wait_s=6, expect={"code": "00"})
    gateway = FakeGateway(CONFIG)
    links: list[FakeLink] = []

    def sleep(seconds: float) -> None:
        sent_before_wait.append(len(gateway.received))
        clock.sleep(seconds)

    scenario = parse_scenario(tomllib.loads(text), CONFIG, "test.toml")
    report = run_scenario(scenario, CONFIG, lambda: FakeLink(gateway, links), sleep=sleep)
    assert report.failed == 0, report.render()
    assert clock.sleeps == [6] and sent_before_wait == [2]
    assert gateway.sent_mtis() == ["0800", "0200", "0400", "0200"]
    assert report.steps[2].wire[0] == ("~", "waited 6 s")
    assert "      ~ waited 6 s" in report.render()


def test_a_link_idle_near_the_gateway_idle_time_out_is_replaced_before_use() -> None:
    """After a wait of 270 s or more (90 % of the demo's 300 s), every terminal's next step
    goes on a new link; after a shorter one the links stay."""
    second = SIGN_ON.replace('"10000001"', '"20000001"')
    echo_1 = step(terminal="10000001", do="echo", expect={"code": "00"})
    echo_2 = step(terminal="20000001", do="echo", expect={"code": "00"})
    short = step(terminal="10000001", do="echo", wait_s=200, expect={"code": "00"})
    long = step(terminal="10000001", do="echo", wait_s=270, expect={"code": "00"})
    played = play_timed(SIGN_ON + second + short + echo_2, FakeTime())
    assert played.report.failed == 0 and len(played.links) == 2
    played = play_timed(SIGN_ON + second + long + echo_2 + echo_1, FakeTime())
    assert played.report.failed == 0, played.report.render()
    assert len(played.links) == 4 and [link.closed for link in played.links[:2]] == [True] * 2


def test_a_disconnect_cuts_the_link_and_the_next_step_reverses_on_a_new_one() -> None:
    """A cut mid-frame leaves no answer; the next step opens a new link and reverses first."""
    text = SIGN_ON + redeem_step(disconnect=True) + step(terminal="10000001", do="echo")
    played = play(text)
    assert played.report.failed == 0, played.report.render()
    assert len(played.links) == 2 and played.links[0].closed
    assert played.gateway.sent_mtis() == ["0800", "0400", "0820"]


def test_a_repeated_request_must_get_the_same_answer() -> None:
    """`repeat` sends twice; the same answer twice passes, a different one fails the step."""
    text = SIGN_ON + redeem_step(repeat=True, expect={"code": "00"})
    same = play(text)
    assert same.report.failed == 0
    wire = same.report.steps[1].wire  # both frames and both answers, in wire order
    assert [direction for direction, _ in wire] == [SENT, RECEIVED, SENT, RECEIVED]
    assert wire[2][1] == "(the same frame again)" and wire[3][1] == wire[1][1]
    gateway = FakeGateway(CONFIG, differ_on_repeat=True)
    played = play(text, gateway)
    assert played.report.steps[1].problems == [
        "repeat: the second answer differs from the first in field(s) 37, 54, 63"
    ]
    assert played.gateway.sent_mtis() == ["0800", "0200", "0200"]


def test_a_repeat_of_what_the_gateway_does_not_record_is_checked_afresh() -> None:
    """§7 records only requests past the format, terminal and MAC checks: a repeated `A0`
    must be `A0` again, whatever its RRN; a repeated sign-off (never recorded, its keys
    gone) may get another answer."""
    text = (
        SIGN_ON
        + redeem_step(corrupt_mac=True, repeat=True, expect={"code": "A0"})
        + step(terminal="10000001", do="sign_off", repeat=True)
    )
    played = play(text, FakeGateway(CONFIG, differ_on_repeat=True))
    assert played.report.failed == 0, played.report.render()
    assert played.gateway.sent_mtis() == ["0800", "0200", "0200", "0820", "0820"]


def test_a_step_that_cannot_be_built_fails_and_the_run_goes_on() -> None:
    """Encrypting a track without a TDK fails that step only; nothing is sent for it."""
    text = (
        SIGN_ON.replace("tdk = true", "tdk = false")
        + redeem_step(encrypt_track=True)
        + step(terminal="10000001", do="echo", expect={"code": "00"})
    )
    played = play(text)
    assert played.report.failed == 1
    assert "holds no TDK" in played.report.steps[1].problems[0]
    assert played.gateway.sent_mtis() == ["0800", "0820"]


def test_an_unreachable_gateway_fails_each_step_saying_so() -> None:
    """When the link cannot be opened, the step fails with the reason and nothing is owed."""

    def refuse() -> FakeLink:
        raise ConnectionRefusedError(111, "Connection refused")

    scenario = parse_scenario(tomllib.loads(SIGN_ON), CONFIG, "test.toml")
    report = run_scenario(scenario, CONFIG, refuse)
    assert report.failed == 1
    assert report.steps[0].problems[0].startswith("cannot connect to the gateway")


def test_report_renders_every_step_with_cards_masked_and_no_pin() -> None:
    """The text report names each step and verdict, masks cards and never shows a PIN."""
    text = SIGN_ON + redeem_step(card=GOLD, pin="123456", amount_fen=10**7, expect={"code": "00"})
    rendered = play(text).report.render()
    assert "step   1 PASS 10000001 sign_on" in rendered
    assert "step   2 FAIL 10000001 redeem" in rendered
    assert "668800*********0014" in rendered
    assert GOLD not in rendered and "123456" not in rendered
    assert rendered.endswith("2 steps: 1 passed, 1 failed\n")


def test_a_rebuilt_corrupted_pin_block_is_corrupted_again_under_the_new_pik() -> None:
    """Replay: the simulator's corrupted block is recognised by comparison under the recorded
    PIK (never decrypted) and sent corrupted under the new one, so a 99 stays a 99."""
    config = next(t for t in CONFIG.terminals if t.id == "10000001")
    recorded, live = Terminal.from_config(config), Terminal.from_config(config)
    recorded.keys = generate_working_keys(Suite.TDES, False)
    live.keys = generate_working_keys(Suite.TDES, False)
    card = CardEntry(GOLD, "2812")
    request = recorded.with_corrupt_pin(recorded.redemption(card, 1000, pin="123456"))
    rebuilt = live.rebuild(request.frame, recorded_keys=recorded.keys, pins={GOLD: "123456"})
    assert rebuilt.request.message.fields[52] == corrupt_pin_block(Suite.TDES, live.keys.pik)
    assert rebuilt.notes == ("the recorded PIN block was a corrupted one: a corrupted one is sent",)
    right = recorded.redemption(card, 1000, pin="123456")
    rebuilt = live.rebuild(right.frame, recorded_keys=recorded.keys, pins={GOLD: "123456"})
    assert rebuilt.request.message.fields[52] == encrypt_pin(
        Suite.TDES, live.keys.pik, "123456", GOLD
    )


def test_without_field_keeps_the_identifying_fields() -> None:
    """11, 41, 42 and 60 cannot be left out: the gateway could not answer or classify."""
    terminal = Terminal.from_config(CONFIG.terminals[0])
    terminal.keys = generate_working_keys(Suite.TDES, False)
    request = terminal.redemption(CardEntry(DIAMOND, "2906"), 1000)
    for number in (11, 41, 42, 60):
        with pytest.raises(ValueError, match=f"field {number} identifies the request"):
            terminal.without_field(request, number)
    with pytest.raises(TerminalError, match="carries no field 26"):
        terminal.without_field(request, 26)
    with pytest.raises(TerminalError, match="carries no PIN block to corrupt"):
        terminal.with_corrupt_pin(request)


# --- the TCP connection against a loopback responder ------------------------------------------


Respond = Callable[[bytes], bytes | None]


class LoopbackServer:
    """A TCP server on 127.0.0.1 that hands each whole request frame to `respond` and sends
    back what it returns (one byte at a time when `dribble`), recording what it got."""

    def __init__(self, respond: Respond, *, dribble: bool = False) -> None:
        self.respond = respond
        self.dribble = dribble
        self.frames: list[bytes] = []
        self.leftovers: list[int] = []  # bytes of an unfinished frame when a peer closed
        self.closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target: tuple[str, int] = self._listener.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(peer,), daemon=True).start()

    def _serve(self, peer: socket.socket) -> None:
        splitter = FrameSplitter()
        with peer:
            while data := peer.recv(4096):
                for payload in splitter.feed(data):
                    frame = add_length(payload)
                    self.frames.append(frame)
                    answer = self.respond(frame)
                    if answer == b"close":
                        return
                    if answer:
                        self._send(peer, answer)
            self.leftovers.append(splitter.pending)
            self.closed.set()

    def _send(self, peer: socket.socket, answer: bytes) -> None:
        if not self.dribble:
            peer.sendall(answer)
            return
        for index in range(len(answer)):
            peer.sendall(answer[index : index + 1])

    def stop(self) -> None:
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., LoopbackServer]]:
    """Start loopback servers for a test and stop them afterwards."""
    servers: list[LoopbackServer] = []

    def start(respond: Respond, **options: Any) -> LoopbackServer:
        server = LoopbackServer(respond, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


REQUEST = CASE.frame("redemption_frame")
ANSWER = CASE.frame("redemption_response_frame")


def answer_always(frame: bytes) -> bytes:
    return ANSWER


@pytest.mark.parametrize("dribble", [False, True], ids=["whole", "byte-by-byte"])
def test_connection_sends_a_frame_and_reads_its_answer(
    serve: Callable[..., LoopbackServer], dribble: bool
) -> None:
    """The request arrives whole; the answer is read whole even when it comes a byte a time."""
    server = serve(answer_always, dribble=dribble)
    with Connection.open(server.target, answer_timeout_s=5) as link:
        exchange = link.exchange(REQUEST)
    assert server.frames == [REQUEST]
    assert exchange.answer == ANSWER and exchange.sent == (REQUEST,)


def test_a_link_the_server_closed_while_it_stood_idle_reads_as_closed(
    serve: Callable[..., LoopbackServer],
) -> None:
    """A link whose server closed it after an answer (a gateway stopping or restarting,
    its idle time-out) is `closed` before the next request, so a scenario's next step opens
    a new one: it sent into the old one, found it broken, and owed a reversal for a
    request no gateway saw. One still open, or with an answer waiting, is not."""
    answers = iter([ANSWER, b"close"])
    server = serve(lambda frame: next(answers))
    link = Connection.open(server.target, answer_timeout_s=5)
    assert link.exchange(REQUEST).answer == ANSWER
    assert not link.closed
    link.send(REQUEST)  # the server reads it and closes the link, answering nothing
    deadline = time.monotonic() + 5
    while not link.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link.closed
    glued = serve(lambda frame: ANSWER + ANSWER)
    with Connection.open(glued.target, answer_timeout_s=5) as waiting:
        assert waiting.exchange(REQUEST).answer == ANSWER
        assert not waiting.closed  # the second answer is there to be read


def test_connection_splits_several_answers_from_one_read(
    serve: Callable[..., LoopbackServer],
) -> None:
    """Two answers glued in one write come out as two frames, in order."""
    other = CASE.frame("sign_on_response_frame")
    server = serve(lambda frame: ANSWER + other)
    with Connection.open(server.target, answer_timeout_s=5) as link:
        assert link.exchange(REQUEST).answer == ANSWER
        assert link.receive() == other


def test_connection_drop_reads_the_answer_and_discards_it(
    serve: Callable[..., LoopbackServer],
) -> None:
    """drop_answer: the answer is read off the wire (kept for the report) but not given."""
    server = serve(answer_always)
    with Connection.open(server.target, answer_timeout_s=5) as link:
        exchange = link.exchange(REQUEST, Faults(drop_answer=True))
        assert (exchange.answer, exchange.answers, exchange.dropped) == (None, (ANSWER,), True)
        assert link.exchange(REQUEST).answer == ANSWER  # the stream is still in step


def test_connection_repeat_sends_twice_and_reads_both_answers(
    serve: Callable[..., LoopbackServer],
) -> None:
    """repeat: the same frame goes twice and both answers come back."""
    server = serve(answer_always)
    with Connection.open(server.target, answer_timeout_s=5) as link:
        exchange = link.exchange(REQUEST, Faults(repeat=True))
    assert server.frames == [REQUEST, REQUEST]
    assert exchange.answers == (ANSWER, ANSWER)


def test_connection_disconnect_sends_part_of_the_frame_and_closes(
    serve: Callable[..., LoopbackServer],
) -> None:
    """disconnect: the server gets an unfinished frame, then the link is closed."""
    server = serve(answer_always)
    link = Connection.open(server.target, answer_timeout_s=5)
    exchange = link.exchange(REQUEST, Faults(disconnect=True))
    assert exchange.disconnected and exchange.answer is None and link.closed
    assert server.closed.wait(5)
    assert server.frames == []
    assert 0 < server.leftovers[0] < len(REQUEST)
    with pytest.raises(OSError):
        link.exchange(REQUEST)


def test_connection_corrupts_only_the_mac(serve: Callable[..., LoopbackServer]) -> None:
    """corrupt_mac: the frame differs in its MAC only, and the MAC no longer verifies."""
    server = serve(answer_always)
    with Connection.open(server.target, answer_timeout_s=5) as link:
        link.exchange(REQUEST, Faults(corrupt_mac=True))
    (sent,) = server.frames
    assert sent[:-1] == REQUEST[:-1] and sent != REQUEST
    assert not verify_mac(CASE.suite, CASE.mak, mac_input(sent[2:]), received_mac(sent[2:]))


def test_connection_gives_up_after_its_time_out_and_closes(
    serve: Callable[..., LoopbackServer],
) -> None:
    """No answer within the time-out: timed out, no answer, link closed."""
    server = serve(lambda frame: None)
    link = Connection.open(server.target, answer_timeout_s=0.2)
    exchange = link.exchange(REQUEST)
    assert exchange.timed_out and exchange.answer is None and link.closed


def test_connection_reports_a_peer_that_closes(serve: Callable[..., LoopbackServer]) -> None:
    """The gateway closing the link is reported in the exchange, not raised."""
    server = serve(lambda frame: b"close")
    link = Connection.open(server.target, answer_timeout_s=5)
    exchange = link.exchange(REQUEST)
    assert exchange.answer is None and exchange.problem == "the gateway closed the link"
    assert link.closed


def test_connection_records_what_went_over_the_wire(
    serve: Callable[..., LoopbackServer],
) -> None:
    """With a recorder, each frame sent and received is one line, as on the wire."""
    server = serve(answer_always)
    stream = io.StringIO()
    with Connection.open(server.target, answer_timeout_s=5, recorder=Recorder(stream)) as link:
        link.exchange(REQUEST, Faults(corrupt_mac=True), terminal="10000001")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["direction"], r["terminal"]) for r in lines] == [
        ("out", "10000001"),
        ("in", "10000001"),
    ]
    assert bytes.fromhex(lines[0]["frame"]) == server.frames[0]
    assert bytes.fromhex(lines[1]["frame"]) == ANSWER


def test_run_scenario_file_plays_over_tcp_and_records(
    serve: Callable[..., LoopbackServer], tmp_path: Path
) -> None:
    """The entry point of `vipgate sim run`: config + scenario + target + record file."""
    gateway = FakeGateway(CONFIG)
    lock = threading.Lock()

    def respond(frame: bytes) -> bytes:
        with lock:
            return gateway.handle(frame)

    server = serve(respond)
    scenario = tmp_path / "day.toml"
    scenario.write_text(
        SIGN_ON
        + redeem_step(card=GOLD, pin="123456", amount_fen=12800, expect={"points": 6400})
        + redeem_step(drop_answer=True)
        + step(terminal="10000001", do="settle", expect={"result": "balanced"}),
        encoding="utf-8",
    )
    record = tmp_path / "traffic.jsonl"
    report = run_scenario_file(scenario, DEMO, server.target, record)
    assert report.failed == 0, report.render()
    frames = read_recording(record)
    assert [f.direction for f in frames] == ["out", "in"] * 5
    assert [decode_frame(f.frame).mti for f in frames[::2]] == [
        "0800",
        "0200",
        "0200",
        "0400",
        "0500",
    ]

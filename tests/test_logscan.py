"""The card-data scanner finds what it must and only that: a planted number, track or key fails
the scan; masked numbers, RRNs, traces, times and decimal fractions do not (issue 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.gateway_harness import DEMO, DIAMOND, GOLD_PIN, TMKS
from tests.logscan import (
    Known,
    LeakWatch,
    describe,
    known_from_config,
    known_from_key_files,
    luhn_valid,
    scan_folder,
    scan_sections,
    scan_text,
)
from tests.spec_terminal import pin_block

DEMO_KNOWN = known_from_config(DEMO)
VISA_TEST = "4111111111111111"  # a published test number: no configured prefix, 16 digits
MASTER_KEY = bytes(range(32))
KNOWN = DEMO_KNOWN.with_keys({"master key": MASTER_KEY})
MASKED_DIAMOND = "668800*********0124"


def log_line(**fields: object) -> str:
    return json.dumps({"timestamp": "2026-11-21T03:00:00.123456Z", "level": "info", **fields})


def kinds(text: str, known: Known = KNOWN) -> list[str]:
    return [leak.kind for leak in scan_text(text, known)]


def test_luhn_agrees_with_published_numbers() -> None:
    """The scanner's own Luhn check accepts the demo cards and a test Visa, rejects a typo."""
    assert all(luhn_valid(n) for n in (DIAMOND, GOLD_PIN, VISA_TEST))
    assert not luhn_valid(DIAMOND[:-1] + "5")


def test_the_demo_config_gives_its_prefix_cards_and_tmks() -> None:
    """What the config under test makes secret: its issuer prefix, card numbers and TMKs."""
    assert DEMO_KNOWN.prefixes == {"668800"}
    assert {DIAMOND, GOLD_PIN} <= DEMO_KNOWN.cards
    tmks = {key.hex().upper() for key in DEMO_KNOWN.keys.values()}
    assert tmks == {tmk for _, _, tmk in TMKS.values()}


@pytest.mark.parametrize(
    "planted",
    [
        log_line(event="answered", card=DIAMOND),
        log_line(event="oops", detail=f"bad card {GOLD_PIN[:-1]}{GOLD_PIN[-1]} refused"),
        f"Traceback: ValueError: unknown {VISA_TEST}",
        "frame 0200 6013 196688001234567890124 ...",  # a configured prefix glued to a length
    ],
    ids=["json-value", "message", "any-bank-card", "inside-a-digit-run"],
)
def test_a_planted_full_card_number_is_found(planted: str) -> None:
    """A full number anywhere in a line fails the scan, and the report shows it masked."""
    leaks = scan_text(planted, KNOWN, "gateway.log")
    assert [leak.kind for leak in leaks][:1] == ["card number"]
    assert DIAMOND not in describe(leaks) and VISA_TEST not in describe(leaks)


def test_an_unknown_card_with_the_issuer_prefix_is_found() -> None:
    """A card the test never configured is found by the prefix and the Luhn digit; a short
    one (13-15 digits) only by the prefix."""
    long_card, short_card = "6688009999999999998", "668800555555552"
    assert luhn_valid(long_card) and luhn_valid(short_card)
    prefix_only = Known(prefixes=frozenset({"668800"}))
    assert kinds(log_line(card=long_card), prefix_only) == ["card number"]
    assert kinds(log_line(card=short_card), prefix_only) == ["card number"]
    assert kinds(log_line(card=short_card), Known()) == []


@pytest.mark.parametrize(
    "track",
    [f"{DIAMOND}=29061010000000", f"{DIAMOND}D2906101000", f"37{DIAMOND}d29061010000000f"],
    ids=["ascii-equals", "bcd-separator", "hex-dump"],
)
def test_planted_track_2_data_is_found(track: str) -> None:
    """Track 2 (number, separator, YYMM, service code) is found, as text or as a hex dump."""
    assert "track 2 data of" in kinds(log_line(event="swipe", data=track))


def test_a_track_of_an_unknown_bank_card_is_found() -> None:
    """A track needs no configured prefix when its number is 16 digits or more."""
    assert set(kinds(f"track {VISA_TEST}=30121011234", Known())) == {
        "track 2 data of",
        "card number",
    }


@pytest.mark.parametrize(
    "spelling",
    [
        TMKS["10000001"][2],
        TMKS["10000002"][2].lower(),
        TMKS["20000001"][2][16:],  # one half of a double-length 3DES key
        MASTER_KEY.hex(),
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",  # the master key in base64
    ],
    ids=["tmk-hex", "tmk-lower", "tmk-half", "master-hex", "master-base64"],
)
def test_planted_key_material_is_found(spelling: str) -> None:
    """A known key in hex (either case, or one 3DES half) or base64 fails the scan."""
    leaks = scan_text(log_line(event="sign_on", detail=spelling), KNOWN)
    assert [leak.kind for leak in leaks] == ["key material:"]
    assert spelling not in describe(leaks)


def test_a_pin_block_and_a_working_key_the_test_holds_are_found() -> None:
    """Keys learned during a test (working keys, PIN blocks) are looked for once told."""
    pik = bytes.fromhex("0123456789ABCDEF1032547698BADCFE")
    block = pin_block("3des", pik, "123456", GOLD_PIN)
    known = KNOWN.with_keys({"PIK": pik, "PIN block": block})
    assert kinds(f"pin={block.hex().upper()}", known) == ["key material:"]
    assert kinds(f"pik={pik.hex()}", known) == ["key material:"]


def test_a_raw_master_key_in_a_file_is_found(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The master key file's bytes written raw into a log are found as well as its hex."""
    tmp_path = tmp_path_factory.mktemp("planted")  # not this test's own, which is swept
    (tmp_path / "master.key").write_bytes(MASTER_KEY)
    (tmp_path / "gateway.log").write_bytes(b"started\n" + MASTER_KEY + b"\n")
    leaks = scan_folder(tmp_path)
    assert "raw key" in [leak.kind for leak in leaks]
    assert known_from_key_files([tmp_path / "master.key"]).keys


@pytest.mark.parametrize(
    "clean",
    [
        log_line(event="answered", card=MASKED_DIAMOND, rrn="633012000017", trace="000017"),
        log_line(event="settled", field_61="0000010000051121", stan="000005"),
        log_line(event="closed", at="20261121110000", merchant="898310048990001"),
        log_line(event="tick")[:-1] + ', "seconds": 0.12345678901234569}',  # Luhn-valid
        "D00000001898310048990001100000012026112120261121110000220000010000056330120000176688"
        "00*********0124000000012800",
        f"terminal 10000001 signed on, key check value {TMKS['10000001'][2][:6]}",
    ],
    ids=["masked-rrn-trace", "batch-trace-date", "times-ids", "floats", "settlement", "kcv"],
)
def test_masked_numbers_rrns_and_times_are_not_leaks(clean: str) -> None:
    """What a person may read: masked numbers, RRNs, traces, times, ids, fractions, KCVs."""
    assert scan_text(clean, KNOWN) == []


def test_the_folder_scan_reads_logs_and_reports_but_not_inputs_or_recordings(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Configs, feeds and `--record` captures hold full numbers by design; reports may not."""
    tmp_path = tmp_path_factory.mktemp("planted")
    (tmp_path / "demo.toml").write_text(DEMO.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "points.csv").write_text(f"{DIAMOND},2026-11-01,100,a\n", encoding="ascii")
    (tmp_path / "traffic.jsonl").write_text(json.dumps({"frame": DIAMOND}), encoding="ascii")
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "reconcile_202611.html").write_text(f"<td>{MASKED_DIAMOND}</td>", encoding="ascii")
    assert scan_folder(tmp_path) == []
    (pack / "exceptions_batches.csv").write_text(f"10000001,{DIAMOND}\n", encoding="ascii")
    assert [leak.source for leak in scan_folder(tmp_path)] == [str(pack / "exceptions_batches.csv")]


def test_a_watch_scans_texts_with_keys_learned_after_them(tmp_path: Path) -> None:
    """A working key learned after a log line was read is still looked for in that line."""
    watch = LeakWatch(DEMO_KNOWN)
    mak = bytes.fromhex("3F1C5A77E2094B6D8E21C0F4A5B69D13")
    watch.text("stdout", f"mac key {mak.hex()}")
    log = tmp_path / "serve.log"
    log.write_text(log_line(event="answered", card=MASKED_DIAMOND), encoding="ascii")
    watch.file(log)
    assert watch.leaks() == []
    watch.keys(MAK=mak)
    assert [str(leak) for leak in watch.leaks()] == ["stdout:1: key material: MAK"]


def test_captured_output_is_scanned_per_phase() -> None:
    """The conftest hook's check: only the sections of the phase being reported are read."""
    sections = [
        ("Captured stdout setup", "ready\n"),
        ("Captured stderr call", f"error: card {DIAMOND} refused\n"),
        ("Captured log call", "INFO masked 668800*********0124"),
    ]
    assert scan_sections(sections, "setup", KNOWN) == []
    leaks = scan_sections(sections, "call", KNOWN)
    assert [(leak.source, leak.kind) for leak in leaks] == [("Captured stderr call", "card number")]


def test_every_test_has_a_watch_on_its_tmp_path(tmp_path: Path, leak_watch: LeakWatch) -> None:
    """The conftest's watch sweeps each test's tmp_path: a log written there is scanned."""
    log = tmp_path / "run" / "serve.log"
    log.parent.mkdir()
    log.write_text(log_line(event="answered", card=DIAMOND), encoding="ascii")
    assert [leak.kind for leak in leak_watch.leaks()] == ["card number"]
    log.unlink()  # else the planted number fails this test when it ends
    assert leak_watch.leaks() == []

"""Find card data in what a person reads: full card numbers, track 2 and known key material.

Issue 7: the card number is kept for clearing but masked in every log, report and error, and a
test scans every log line of the end-to-end suites for a full number, a track or a key. This
module is that scan, kept apart from the product's own masking (gateway/logs.py) so that a
mistake there is not repeated here: it has its own Luhn check and its own patterns.

What counts as a leak:
- a card number: a run of 13-19 digits that passes the Luhn check and either starts with a
  configured issuer prefix or is 16-19 digits long (any bank card); a configured prefix is also
  looked for inside longer digit runs (a hex dump glues a length to the number), and every
  card number the test knows is looked for anywhere;
- track 2: a Luhn-valid number, `=` or `D`, a YYMM expiry and a 3-digit service code;
- a key the test knows (TMKs of the config under test, the master key files, working keys,
  PIN blocks): its hex in either case, its base64, or, for a double-length key, either half.

What does not: a masked number (first 6 and last 4, `*` between), RRNs (12 digits), traces,
dates and times (they fail the length or the leading-digit rule), and decimal fractions
(`0.1234567890123456`), whose digits follow a point.
"""

from __future__ import annotations

import base64
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

MIN_CARD_DIGITS: Final = 13
MAX_CARD_DIGITS: Final = 19
ANY_BANK_CARD_FROM: Final = 16  # a Luhn-valid run this long is a card, whatever its prefix
MIN_KEY_BYTES: Final = 8
# A run of card length, not part of a longer run nor the fraction of a decimal number; no
# card number starts with 0.
_CARD_RUN = re.compile(r"(?<!\d)(?<!\d\.)[1-9]\d{12,18}(?!\d)")
_DIGIT_RUN = re.compile(r"\d{13,}")
_TRACK2 = re.compile(r"(\d{13,19})[=Dd]\d{2}(?:0[1-9]|1[0-2])\d{3}")

# Where clearing and the gateway write what a person reads; recordings (`--record`) are a wire
# capture, documented as holding the frames as sent, and inputs (configs, feeds) are not output.
SCANNED_NAMES: Final = (
    "*.log",
    "*.out",
    "*.err",
    "operator_statement_*.csv",
    "merchant_statement_*.csv",
    "exceptions_*.csv",
    "reconcile_*.html",
    "VIPSETTLE_*.txt",
)
MASTER_KEY_NAMES: Final = ("*.key", "*.key.next", "*.key.pin")


def luhn_valid(digits: str) -> bool:
    """True when the last digit is the Luhn check digit of the others."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def masked(number: str) -> str:
    """First 6 and last 4, for a failure message that must not repeat what it reports."""
    return number[:6] + "*" * (len(number) - 10) + number[-4:]


@dataclass(frozen=True)
class Known:
    """What a test knows to be secret: issuer prefixes, card numbers and keys by name."""

    prefixes: frozenset[str] = frozenset()
    cards: frozenset[str] = frozenset()
    keys: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))

    def __or__(self, other: Known) -> Known:
        return Known(
            self.prefixes | other.prefixes,
            self.cards | other.cards,
            MappingProxyType({**self.keys, **other.keys}),
        )

    def with_keys(self, keys: Mapping[str, bytes]) -> Known:
        return self | Known(keys=MappingProxyType(dict(keys)))


def known_from_config(path: Path) -> Known:
    """The prefixes, cards and TMKs of a vipgate TOML config; nothing if it does not parse."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return Known()
    issuer = data.get("issuer", {})
    prefixes = issuer.get("card_prefixes", []) if isinstance(issuer, dict) else []
    keys: dict[str, bytes] = {}
    for terminal in _tables(data.get("terminals")):
        try:
            keys[f"TMK of terminal {terminal.get('id')}"] = bytes.fromhex(str(terminal["tmk"]))
        except (KeyError, ValueError):
            continue
    cards = {str(card["number"]) for card in _tables(data.get("cards")) if "number" in card}
    return Known(
        frozenset(str(p) for p in prefixes if str(p).isdigit()),
        frozenset(c for c in cards if c.isdigit()),
        MappingProxyType(keys),
    )


def _tables(value: object) -> list[dict[str, object]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def known_from_key_files(paths: Iterable[Path]) -> Known:
    """The bytes of master key files (the master, its `.next` and the PIN key's `.pin`)."""
    keys = {}
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if len(data) >= MIN_KEY_BYTES:
            keys[f"key file {path.name}"] = data
    return Known(keys=MappingProxyType(keys))


@dataclass(frozen=True)
class Leak:
    """One piece of card data found; `shown` is safe to print (masked, or the key's name)."""

    source: str
    line: int
    kind: str
    shown: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.kind} {self.shown}"


Report = Callable[[int, str, str], None]


def scan_text(text: str, known: Known = Known(), source: str = "text") -> list[Leak]:
    """Every leak in `text`, each reported once, in order of place."""
    found: dict[tuple[int, str], Leak] = {}

    def report(at: int, kind: str, shown: str) -> None:
        line = text.count("\n", 0, at) + 1
        found.setdefault((at, kind), Leak(source, line, kind, shown))

    for match in _TRACK2.finditer(text):
        number = _track_number(match.group(1), known.prefixes)
        if number:
            report(match.start(1), "track 2 data of", masked(number))
    for match in _CARD_RUN.finditer(text):
        run = match.group(0)
        is_card = len(run) >= ANY_BANK_CARD_FROM or run.startswith(tuple(known.prefixes))
        if is_card and luhn_valid(run):
            report(match.start(), "card number", masked(run))
    for at, number in _prefixed_numbers(text, known.prefixes):
        report(at, "card number", masked(number))
    for card in known.cards:
        for at in _occurrences(text, card):
            report(at, "card number", masked(card))
    _scan_keys(text, known, report)
    return [found[place] for place in sorted(found)]


def _track_number(digits: str, prefixes: frozenset[str]) -> str | None:
    """The card number ending just before a track separator, if one ends there."""
    for length in range(MAX_CARD_DIGITS, MIN_CARD_DIGITS - 1, -1):
        candidate = digits[-length:]
        card_like = length >= ANY_BANK_CARD_FROM or candidate.startswith(tuple(prefixes))
        whole = len(candidate) == length and candidate[0] != "0"
        if whole and card_like and luhn_valid(candidate):
            return candidate
    return None


def _prefixed_numbers(text: str, prefixes: frozenset[str]) -> Iterable[tuple[int, str]]:
    """Numbers with a configured prefix inside longer digit runs (hex dumps, glued fields)."""
    if not prefixes:
        return
    for run in _DIGIT_RUN.finditer(text):
        digits = run.group(0)
        for prefix in prefixes:
            for at in _occurrences(digits, prefix):
                for length in range(MAX_CARD_DIGITS, MIN_CARD_DIGITS - 1, -1):
                    candidate = digits[at : at + length]
                    if len(candidate) == length and luhn_valid(candidate):
                        yield run.start() + at, candidate
                        break


def _occurrences(text: str, part: str) -> Iterable[int]:
    at = text.find(part)
    while at >= 0:
        yield at
        at = text.find(part, at + 1)


def _hex_forms(key: bytes) -> list[str]:
    """A key's hex (lower case; the text is searched lower-cased) and each half of a 3DES key."""
    forms = [key.hex()]
    if len(key) >= 2 * MIN_KEY_BYTES and len(key) % 2 == 0:
        half = len(key) // 2
        forms += [key[:half].hex(), key[half:].hex()]
    return forms


def _scan_keys(text: str, known: Known, report: Report) -> None:
    lowered = text.lower()
    for name, key in known.keys.items():
        if len(key) < MIN_KEY_BYTES:
            continue
        places = [lowered.find(form) for form in _hex_forms(key)]
        places.append(text.find(base64.b64encode(key).decode("ascii")))
        found = [at for at in places if at >= 0]
        if found:
            report(min(found), "key material:", name)


def scan_file(path: Path, known: Known = Known()) -> list[Leak]:
    """The leaks in a file read as text, and a known key written as raw bytes."""
    data = path.read_bytes()
    leaks = scan_text(data.decode("utf-8", errors="replace"), known, str(path))
    for name, key in known.keys.items():
        if len(key) >= MIN_KEY_BYTES and key in data:
            leaks.append(Leak(str(path), data.count(b"\n", 0, data.find(key)) + 1, "raw key", name))
    return leaks


def files_a_person_reads(folder: Path) -> list[Path]:
    """The logs, statements, reconciliation pack and settlement files under `folder`."""
    found = {path for pattern in SCANNED_NAMES for path in folder.rglob(pattern)}
    return sorted(path for path in found if path.is_file())


def known_in_folder(folder: Path) -> Known:
    """What the configs and master key files under `folder` make secret."""
    known = known_from_key_files(
        path for pattern in MASTER_KEY_NAMES for path in folder.rglob(pattern) if path.is_file()
    )
    for config in folder.rglob("*.toml"):
        known |= known_from_config(config)
    return known


def scan_folder(folder: Path, known: Known = Known()) -> list[Leak]:
    """Every leak in what a person reads under `folder`, knowing its configs and key files."""
    known |= known_in_folder(folder)
    return [leak for path in files_a_person_reads(folder) for leak in scan_file(path, known)]


def describe(leaks: Iterable[Leak]) -> str:
    return "card data where a person reads it:\n" + "\n".join(f"  {leak}" for leak in leaks)


class LeakWatch:
    """What one test has to scan when it ends: texts it read and files its processes wrote.

    Texts are kept and scanned at the end, so that a key learned later (a working key from a
    sign-on after the first log lines) is still looked for in everything.
    """

    def __init__(self, known: Known = Known()) -> None:
        self.known = known
        self._texts: list[tuple[str, str]] = []
        self._files: list[Path] = []
        self._folders: list[Path] = []

    def learn(self, known: Known) -> None:
        self.known |= known

    def keys(self, **keys: bytes) -> None:
        self.known = self.known.with_keys(keys)

    def text(self, source: str, text: str) -> None:
        if text:
            self._texts.append((source, text))

    def file(self, path: Path) -> None:
        self._files.append(path)

    def folder(self, path: Path) -> None:
        """Everything a person reads under `path` (see `SCANNED_NAMES`), as it is at the end."""
        self._folders.append(path)

    def leaks(self) -> list[Leak]:
        known = self.known
        for folder in self._folders:
            known |= known_in_folder(folder)
        files = {path for path in self._files if path.is_file()}
        files |= {path for folder in self._folders for path in files_a_person_reads(folder)}
        leaks = [leak for source, text in self._texts for leak in scan_text(text, known, source)]
        return leaks + [leak for path in sorted(files) for leak in scan_file(path, known)]


def scan_sections(sections: Iterable[tuple[str, str]], when: str, known: Known) -> list[Leak]:
    """The leaks in pytest's captured output of one phase (`Captured stdout call`, ...)."""
    return [
        leak
        for title, text in sections
        if title.startswith("Captured ") and title.endswith(f" {when}")
        for leak in scan_text(text, known, title)
    ]

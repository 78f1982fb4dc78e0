"""The TOML config of operations.md: the demo loads, and every bad value is refused by place."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from datetime import date, time, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcodec.crypto import Suite
from gateway.config import Config, load_config, resolve_database
from gateway.errors import BadInput
from gateway.loader import rule_from_json, rule_to_json
from gateway.rules import END_OF_DAY, Rule

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
DEMO_TEXT = DEMO.read_text(encoding="utf-8")
FILE = "config/demo.toml"
M0 = "merchants[0] (898310048990001)"
GOLD = "cards[0] (668800*********0014)"
SECRETS = (
    "FD32139FDCE66744281F7C0090707DF2",
    "B23AB55B1B37B6FFB0EB41C61A13E6DF",
    "0123456789ABCDEFFEDCBA9876543210",
    "123456",
    "6688000000000000014",
    "6688001234567890124",
)

Edit = Callable[..., Config]
Refuse = Callable[..., str]


@pytest.fixture
def edit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Edit:
    """Load the demo config with text replacements applied, as `config/demo.toml`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()

    def load(*replacements: tuple[str, str], db_override: str | None = None) -> Config:
        text = DEMO_TEXT
        for old, new in replacements:
            assert old in text, f"the demo config no longer contains {old!r}"
            text = text.replace(old, new, 1)
        Path(FILE).write_text(text, encoding="utf-8")
        return load_config(Path(FILE), db_override)

    return load


@pytest.fixture
def refuse(edit: Edit) -> Refuse:
    """The one-line message of the BadInput an edited demo config raises; never a secret."""

    def refused(*replacements: tuple[str, str]) -> str:
        with pytest.raises(BadInput) as caught:
            edit(*replacements)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"{FILE}: ")
        for secret in SECRETS:
            assert secret not in message
        return message

    return refused


# --- the demo ------------------------------------------------------------------------------


def test_demo_config_loads_with_its_settings() -> None:
    """config/demo.toml loads: two merchants, three terminals of both suites, five cards."""
    config = load_config(DEMO)
    assert config.gateway.listen == ("127.0.0.1", 8583)
    assert config.gateway.cutoff == time(23, 0)
    assert str(config.gateway.timezone) == "Asia/Shanghai"
    assert config.issuer.id == "CMCCVIP00000001"
    assert config.clearing.acquirer_id == "ACQ000000000001"
    assert [m.id for m in config.merchants] == ["898310048990001", "898310058120002"]
    assert [m.allow_partial for m in config.merchants] == [True, False]
    assert [t.id for t in config.terminals] == ["10000001", "10000002", "20000001"]
    assert {t.suite for t in config.terminals} == {Suite.TDES, Suite.SM4}
    assert len(config.cards) == 5


def test_demo_terminals_match_the_known_answer_vectors() -> None:
    """The first two demo terminals carry the TMKs of the shared vectors."""
    terminals = {t.id: t for t in load_config(DEMO).terminals}
    assert terminals["10000001"].tmk == bytes.fromhex("FD32139FDCE66744281F7C0090707DF2")
    assert terminals["10000001"].suite is Suite.TDES
    assert terminals["10000002"].tmk == bytes.fromhex("B23AB55B1B37B6FFB0EB41C61A13E6DF")
    assert terminals["10000002"].suite is Suite.SM4


def test_demo_cards_cover_the_newcomer_cases() -> None:
    """The demo has a gold card with a PIN, a diamond, one unenrolled, one blocked, one low."""
    cards = {c.number: c for c in load_config(DEMO).cards}
    gold = cards["6688000000000000014"]
    assert (gold.tier, gold.pin, gold.enrolled) == ("gold", "123456", True)
    assert [(lot.points, lot.earned_on) for lot in gold.lots] == [(100000, date(2026, 3, 1))]
    diamond = cards["6688001234567890124"]
    assert (diamond.tier, diamond.pin, diamond.enrolled) == ("diamond", None, True)
    assert any(not c.enrolled for c in cards.values())
    assert any(c.status == "blocked" for c in cards.values())
    assert any(0 < sum(lot.points for lot in c.lots) < 1000 for c in cards.values())


def test_demo_weekend_rule_is_parsed() -> None:
    """Day names, hours and validity dates become the Rule's typed fields (sat=5, sun=6)."""
    rule = load_config(DEMO).merchants[0].rules[0]
    assert rule == Rule(
        id="diamond-weekend",
        discount_bp=1000,
        tiers=frozenset({"diamond"}),
        days=frozenset({5, 6}),
        hours=(time(10, 0), time(22, 0)),
        valid_from=date(2026, 1, 1),
        valid_to=date(2030, 12, 31),
        min_amount_fen=10000,
    )


def test_relative_paths_resolve_against_the_config_folder() -> None:
    """The SQLite path and the key files are relative to the config file's folder."""
    config = load_config(DEMO)
    folder = DEMO.parent
    assert config.gateway.database == f"sqlite:///{folder / 'var' / 'vipgate.db'}"
    assert config.issuer.signing_key == folder / "var" / "issuer-ed25519.pem"
    assert config.issuer.master_key == folder / "var" / "master.key"


def test_db_override_replaces_the_configured_database(edit: Edit) -> None:
    """--db replaces the config's database URL as given."""
    config = edit(db_override="postgresql+psycopg://vip@localhost/vipgate")
    assert config.gateway.database == "postgresql+psycopg://vip@localhost/vipgate"


def test_db_override_that_is_no_url_is_refused(edit: Edit) -> None:
    """A --db value that is not a URL is a BadInput naming --db."""
    with pytest.raises(BadInput, match="--db"):
        edit(db_override="vipgate.db")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///var/x.db", "sqlite:////cfg/var/x.db"),
        ("sqlite:///var/x.db?timeout=5", "sqlite:////cfg/var/x.db?timeout=5"),
        ("sqlite+pysqlite:///x.db", "sqlite+pysqlite:////cfg/x.db"),
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite://", "sqlite://"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_resolve_database_only_touches_relative_sqlite_paths(url: str, expected: str) -> None:
    """Only a relative SQLite file path is made absolute; other URLs pass unchanged."""
    assert resolve_database(url, Path("/cfg")) == expected


def test_reprs_hide_keys_and_pins_and_mask_card_numbers() -> None:
    """Printing the whole config shows no TMK, no PIN and no full card number."""
    shown = repr(load_config(DEMO))
    for secret in SECRETS:
        assert secret not in shown
    assert "fd32139f" not in shown.lower()
    assert "668800*********0014" in shown


def test_missing_optional_sections_and_keys_take_the_documented_defaults(edit: Edit) -> None:
    """Without [plan] and the optional keys, the defaults of operations.md apply."""
    plan = (
        "[plan]\nqualify_points = 3500\nexpiry_years = 1\n"
        "max_points_per_card_day = 0               # no daily limit\n"
    )
    config = edit(
        (plan, ""),
        ('listen = "127.0.0.1:8583"\n', ""),
        ('cutoff = "23:00"                          # business date changes at 23:00 local\n', ""),
        ("key_lifetime_h = 24\n", ""),
        ("idle_timeout_s = 300\n", ""),
        ("max_pending_per_connection = 32\n", ""),
        ('  valid_to = "2030-12-31"\n', ""),
        ("  min_amount_fen = 10000\n", ""),
    )
    assert (config.plan.qualify_points, config.plan.expiry_years) == (3500, 1)
    assert config.plan.max_points_per_card_day == 0
    assert config.gateway.listen == ("127.0.0.1", 8583)
    assert config.gateway.cutoff == time(23, 0)
    assert config.gateway.key_lifetime_h == 24
    assert config.gateway.idle_timeout_s == 300
    assert config.gateway.max_pending_per_connection == 32
    rule = config.merchants[0].rules[0]
    assert (rule.valid_to, rule.min_amount_fen) == (None, 0)
    assert config.merchants[0].rules[1].days is None


def test_card_defaults_tier_status_and_enrolment(edit: Edit) -> None:
    """A card without tier, status, enrolled, PIN or lots is a standard, active, unenrolled card."""
    config = edit(
        ('tier = "gold"\nstatus = "active"\nenrolled = true\npin = "123456"\n', ""),
        ('lots = [{ points = 100000, earned_on = "2026-03-01" }]\n', ""),
    )
    card = config.cards[0]
    assert (card.tier, card.status, card.enrolled, card.pin, card.lots) == (
        "standard",
        "active",
        False,
        None,
        (),
    )


def test_toml_dates_are_accepted_as_well_as_strings(edit: Edit) -> None:
    """earned_on and valid_from may be TOML dates as well as "YYYY-MM-DD" strings."""
    config = edit(
        ('earned_on = "2026-03-01"', "earned_on = 2026-03-01"),
        ('valid_from = "2026-01-01"', "valid_from = 2026-01-01"),
    )
    assert config.cards[0].lots[0].earned_on == date(2026, 3, 1)
    assert config.merchants[0].rules[0].valid_from == date(2026, 1, 1)


def test_sm4_key_with_equal_halves_is_accepted(edit: Edit) -> None:
    """Equal halves weaken only 3DES; an SM4 key is one 128-bit key."""
    config = edit(("B23AB55B1B37B6FFB0EB41C61A13E6DF", "00112233445566770011223344556677"))
    assert config.terminals[1].tmk == bytes.fromhex("0011223344556677" * 2)


# --- refusals: every message names the file and the place -----------------------------------


def test_discount_outside_range_names_merchant_rule_and_key(refuse: Refuse) -> None:
    """A discount of 12000 bp is refused at merchants[0] (...).rules[0] (...).discount_bp."""
    message = refuse(("discount_bp = 1000", "discount_bp = 12000"))
    assert message == (
        f"{FILE}: {M0}.rules[0] (diamond-weekend).discount_bp: 12000 is outside 0-9999"
    )


def test_negative_discount_is_refused(refuse: Refuse) -> None:
    """A negative discount is refused at its place."""
    message = refuse(("discount_bp = 300", "discount_bp = -1"))
    assert message == f"{FILE}: {M0}.rules[1] (vip-lunch).discount_bp: -1 is outside 0-9999"


def test_a_rule_whose_minimum_is_above_the_merchants_largest_amount_is_refused(
    refuse: Refuse, edit: Edit
) -> None:
    """A rule's min_amount_fen above the merchant's max_amount_fen could never apply (every
    such amount is declined): refused at the rule. Equal to it, the rule applies to that
    amount alone, and loads."""
    message = refuse(("max_amount_fen = 5000000", "max_amount_fen = 9999"))
    assert message == (
        f"{FILE}: {M0}.rules[0] (diamond-weekend).min_amount_fen: 10000 is above the"
        " merchant's max_amount_fen 9999: the rule could never apply"
    )
    config = edit(("max_amount_fen = 5000000", "max_amount_fen = 10000"))
    assert config.merchants[0].rules[0].min_amount_fen == config.merchants[0].max_amount_fen


def test_fee_above_bank_card_fee_is_refused(refuse: Refuse) -> None:
    """A merchant's fee_bp above its bank_card_fee_bp is refused."""
    message = refuse(("\nfee_bp = 80\n", "\nfee_bp = 120\n"))
    assert message == f"{FILE}: {M0}.fee_bp: 120 is above bank_card_fee_bp 100"


@pytest.mark.parametrize(
    ("old", "new", "place"),
    [
        ('id = "898310048990001"\nname', 'id = "89831004899001"\nname', "merchants[0] ("),
        ('id = "CMCCVIP00000001"', 'id = "CMCCVIP0000001"', "issuer.id"),
        ('acquirer_id = "ACQ000000000001"', 'acquirer_id = "ACQ0000000000001"', "clearing"),
        ('id = "10000001"', 'id = "1000001"', "terminals[0] (1000001).id"),
        ('id = "10000001"', 'id = "1000-001"', "terminals[0] (1000-001).id"),
    ],
)
def test_ids_of_the_wrong_length_are_refused(
    refuse: Refuse, old: str, new: str, place: str
) -> None:
    """Merchant, issuer and acquirer ids must be 15 letters or digits, terminals 8."""
    message = refuse((old, new))
    assert place in message
    assert "letters or digits" in message


@pytest.mark.parametrize(
    ("old", "new", "place"),
    [
        ('tiers = ["diamond"]', 'tiers = ["platinum"]', f"{M0}.rules[0] (diamond-weekend).tiers"),
        ('days = ["sat", "sun"]', 'days = ["sat", "sunday"]', "rules[0] (diamond-weekend).days"),
        ('status = "blocked"', 'status = "frozen"', "cards[3] (668800*********0030).status"),
        ('tier = "gold"', 'tier = "platinum"', f"{GOLD}.tier"),
        ('suite = "sm4"', 'suite = "aes"', "terminals[1] (10000002).suite"),
    ],
)
def test_unknown_names_are_refused(refuse: Refuse, old: str, new: str, place: str) -> None:
    """Unknown tiers, days, card status and key suites are refused at their place."""
    message = refuse((old, new))
    assert f"{place}: " in message
    assert "is not one of" in message


def test_a_merchant_name_longer_than_its_column_is_refused_with_the_config(
    refuse: Refuse,
) -> None:
    """The ledger stores a merchant's name in 200 characters: a longer one is refused with
    the config, at its place, before any ledger is opened, let alone made."""
    message = refuse(
        ('name = "Nanjing Road Department Store"', f'name = "{"N" * 201}"'),
    )
    assert f"{M0}.name: longer than 200 characters" in message


@pytest.mark.parametrize(
    "hours", ["10-22", "10:00-24:01", "24:00-24:00", "10:0-22:00", "25:00-26:00", ""]
)
def test_hours_not_hh_mm_range_are_refused(refuse: Refuse, hours: str) -> None:
    """hours must be HH:MM-HH:MM on a 24-hour clock."""
    message = refuse(('hours = "10:00-22:00"', f'hours = "{hours}"'))
    assert f"{M0}.rules[0] (diamond-weekend).hours: " in message
    assert "is not HH:MM-HH:MM" in message


def test_hours_may_end_at_midnight_and_read_back_so(edit: Edit) -> None:
    """ "18:00-24:00" runs to midnight (END_OF_DAY), and the ledger's JSON keeps "24:00"."""
    config = edit(('hours = "10:00-22:00"', 'hours = "18:00-24:00"'))
    stored = config.merchants[0].rules[0]
    assert stored.hours == (time(18, 0), END_OF_DAY)
    assert rule_to_json(stored)["hours"] == "18:00-24:00"
    assert rule_from_json(rule_to_json(stored)) == stored


@pytest.mark.parametrize("hours", ["22:00-10:00", "10:00-10:00"])
def test_hours_that_do_not_start_before_they_end_are_refused(refuse: Refuse, hours: str) -> None:
    """A window must start before it ends (never across midnight, never empty)."""
    message = refuse(('hours = "10:00-22:00"', f'hours = "{hours}"'))
    assert f"{M0}.rules[0] (diamond-weekend).hours: " in message
    assert "does not start before it ends" in message


def test_valid_from_after_valid_to_is_refused(refuse: Refuse) -> None:
    """A rule valid from a date after its valid_to is refused."""
    message = refuse(('valid_to = "2030-12-31"', 'valid_to = "2025-12-31"'))
    assert message == (
        f"{FILE}: {M0}.rules[0] (diamond-weekend).valid_from: "
        "2026-01-01 is after valid_to 2025-12-31"
    )


@pytest.mark.parametrize("bad", ['"2026-02-30"', '"2026/01/01"', '"soon"', "2026-01-01T10:00:00"])
def test_bad_dates_are_refused(refuse: Refuse, bad: str) -> None:
    """A date that is not a real YYYY-MM-DD (or a TOML date-time) is refused."""
    message = refuse(('valid_from = "2026-01-01"', f"valid_from = {bad}"))
    assert f"{M0}.rules[0] (diamond-weekend).valid_from: " in message
    assert "is not a date YYYY-MM-DD" in message


def test_terminal_of_an_unconfigured_merchant_is_refused(refuse: Refuse) -> None:
    """A terminal whose merchant is not in the config is refused."""
    message = refuse(('merchant = "898310058120002"', 'merchant = "898310058120009"'))
    assert message == (
        f'{FILE}: terminals[2] (20000001).merchant: "898310058120009" is not a configured merchant'
    )


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'id = "898310058120002"',
            'id = "898310048990001"',
            f"merchants[1] (898310048990001).id: duplicate of {M0}",
        ),
        (
            'id = "20000001"',
            'id = "10000001"',
            "terminals[2] (10000001).id: duplicate of terminals[0] (10000001)",
        ),
        (
            'id = "vip-lunch"',
            'id = "diamond-weekend"',
            "rules[1] (diamond-weekend).id: duplicate of",
        ),
        (
            '"6688000000000000048"',
            '"6688000000000000014"',
            f"cards[4] (668800*********0014).number: duplicate of {GOLD}",
        ),
    ],
)
def test_duplicate_ids_are_refused(refuse: Refuse, old: str, new: str, expected: str) -> None:
    """Two merchants, terminals, rules of a merchant or cards with the same id are refused."""
    assert expected in refuse((old, new))


@pytest.mark.parametrize(
    ("old", "place", "key"),
    [
        # the same bytes, on the third terminal (3DES)
        (
            "0123456789ABCDEFFEDCBA9876543210",
            "terminals[2] (20000001)",
            "FD32139FDCE66744281F7C0090707DF2",
        ),
        # every parity bit flipped: the same 3DES key
        (
            "0123456789ABCDEFFEDCBA9876543210",
            "terminals[2] (20000001)",
            "FC33129EDDE76645291E7D0191717CF3",
        ),
        # the second terminal (SM4) with the first's (3DES) key
        (
            "B23AB55B1B37B6FFB0EB41C61A13E6DF",
            "terminals[1] (10000002)",
            "FD32139FDCE66744281F7C0090707DF2",
        ),
    ],
)
def test_a_master_key_two_terminals_share_is_refused(
    refuse: Refuse, old: str, place: str, key: str
) -> None:
    """A terminal whose TMK is another's, up to parity and whatever the suites, is refused,
    naming the terminal that has it first, never the key."""
    message = refuse((f'tmk = "{old}"', f'tmk = "{key}"'))
    assert message == (
        f"{FILE}: {place}.tmk: the same key as terminals[0] (10000001):"
        " every terminal needs a master key of its own"
    )
    assert "FD32139F" not in message and "FC33129E" not in message


@pytest.mark.parametrize(
    ("tmk", "problem"),
    [
        ('"FD32139FDCE66744281F7C0090707D"', "must be 32 hex digits"),
        ('"FD32139FDCE66744281F7C0090707DF2AA"', "must be 32 hex digits"),
        ('"FD32139FDCE66744281F7C0090707DG2"', "must be 32 hex digits"),
        ("12345", "must be a string of 32 hex digits"),
        ('"0123456789ABCDEF0123456789ABCDEF"', "two halves of a 3DES key are equal"),
        ('"0123456789ABCDEF0022446688AACCEE"', "equal but for parity (single DES)"),
    ],
)
def test_bad_terminal_master_keys_are_refused_without_showing_them(
    refuse: Refuse, tmk: str, problem: str
) -> None:
    """A TMK that is not 32 hex digits, or a 3DES TMK with equal halves, is refused unshown."""
    message = refuse(('tmk = "FD32139FDCE66744281F7C0090707DF2"', f"tmk = {tmk}"))
    assert message.startswith(f"{FILE}: terminals[0] (10000001).tmk: ")
    assert problem in message
    assert tmk.strip('"') not in message
    assert "0123456789ABCDEF" not in message


@pytest.mark.parametrize(
    ("place", "key"),
    [
        ('suite = "3des"', "FD32139FDCE66744281F7C0090707DF2"),
        ('suite = "3des"', "FD32 139F DCE6 6744 281F 7C00 9070 7DF2"),  # written in groups
        ('suite = "3des"', "FD:32:13:9F:DC:E6:67:44:28:1F:7C:00:90:70:7D:F2"),
        ('merchant = "898310048990001"', "FD32139FDCE66744281F7C0090707DF2"),
        ('suite = "3des"', "12345678901234567890123456789012"),  # a key of digits only
    ],
)
def test_a_key_put_under_another_key_is_not_repeated(refuse: Refuse, place: str, key: str) -> None:
    """A TMK written one line off (as the terminal's suite or merchant) is refused for that
    key, and the message shows only how long it was: never the key, nor part of it."""
    field = place.split(" = ", maxsplit=1)[0]
    message = refuse((place, f'{field} = "{key}"'))
    assert f".{field}: " in message
    assert "<32 hex characters>" in message
    assert key not in message and key[:6] not in message and key[-4:] not in message


@pytest.mark.parametrize(
    ("secret", "shown"),
    [
        ("FD32139FDCE66744281F7C0090707DF2", "<32 hex characters>"),
        ("6688000000000000014", "668800*********0014"),
    ],
)
def test_an_id_that_is_a_key_or_card_is_not_repeated_in_the_place(
    refuse: Refuse, secret: str, shown: str
) -> None:
    """A TMK or a card number pasted as a terminal's id is hidden in the place that names
    the entry as well as in the value."""
    message = refuse(('id = "20000001"', f'id = "{secret}"'))
    assert message.startswith(f"{FILE}: terminals[2] ({shown}).id: ")
    assert secret not in message and secret[:7] not in message


@pytest.mark.parametrize(
    ("number", "problem"),
    [
        ("6688000000000000015", "Luhn check digit wrong"),
        ("6688010000000000012", "issuer prefix unknown"),
        ("668800000000000001", "not 19 digits"),
        ("66880000000000000x4", "not 19 digits"),
    ],
)
def test_bad_card_numbers_are_refused_without_showing_them(
    refuse: Refuse, number: str, problem: str
) -> None:
    """A card number failing the Luhn, prefix or length check is refused, never shown in full."""
    message = refuse(('"6688000000000000014"', f'"{number}"'))
    assert message.startswith(f"{FILE}: cards[0] (")
    assert message.endswith(f".number: {problem}")
    assert number not in message


def test_card_number_as_toml_integer_is_refused(refuse: Refuse) -> None:
    """A card number written as a bare integer is refused (it must be a quoted string)."""
    message = refuse(('number = "6688000000000000014"', "number = 6688000000000000014"))
    assert message == f"{FILE}: cards[0].number: must be a string of 19 digits (quoted)"


@pytest.mark.parametrize("expiry", ["2813", "2800", "12/28", "281", "28120"])
def test_bad_card_expiry_is_refused(refuse: Refuse, expiry: str) -> None:
    """A card expiry that is not YYMM with a month 01-12 is refused."""
    message = refuse(('expiry = "2812"', f'expiry = "{expiry}"'))
    assert message == f'{FILE}: {GOLD}.expiry: "{expiry}" is not YYMM'


@pytest.mark.parametrize(
    ("pin", "problem"),
    [
        ('"123"', "must be 4-12 digits"),
        ('"1234567890123"', "must be 4-12 digits"),
        ('"12a456"', "must be 4-12 digits"),
        ('"12 456"', "must be 4-12 digits"),
        ("123456", "must be a string of 4-12 digits (quoted)"),
    ],
)
def test_bad_pins_are_refused_without_showing_them(refuse: Refuse, pin: str, problem: str) -> None:
    """A PIN that is not 4-12 digits is refused, and the message never contains it."""
    message = refuse(('pin = "123456"', f"pin = {pin}"))
    assert message == f"{FILE}: {GOLD}.pin: {problem}"
    assert pin.strip('"') not in message


@pytest.mark.parametrize(
    ("points", "problem"),
    [
        ("0", "0 is outside 1-9999999999"),
        ("-5", "-5 is outside 1-9999999999"),
        ("10000000000", "10000000000 is outside 1-9999999999"),
        ("1.5", "must be an integer, not a float"),
        ('"100"', "must be an integer, not a string"),
        ("true", "must be an integer, not a boolean"),
    ],
)
def test_lot_points_must_be_a_positive_integer(refuse: Refuse, points: str, problem: str) -> None:
    """Lot points that are not a positive integer are refused at the lot's place."""
    message = refuse(("points = 100000", f"points = {points}"))
    assert message == f"{FILE}: {GOLD}.lots[0].points: {problem}"


@pytest.mark.parametrize(
    ("anchor", "place"),
    [
        ("[gateway]\n", "gateway"),
        ("[issuer]\n", "issuer"),
        ("[plan]\n", "plan"),
        ("[clearing]\n", "clearing"),
        ('name = "Huangpu Coffee"\n', "merchants[1] (898310058120002)"),
        ("  discount_bp = 500\n", "merchants[1] (898310058120002).rules[0] (members-5pct)"),
        ('suite = "sm4"\n', "terminals[1] (10000002)"),
        ('tier = "silver"\n', "cards[2] (668800*********0022)"),
    ],
)
def test_unknown_keys_are_refused_in_every_section(refuse: Refuse, anchor: str, place: str) -> None:
    """A misspelt key is refused where it stands instead of silently taking a default."""
    message = refuse((anchor, f"{anchor}discout_bp = 5\n"))
    assert message == f'{FILE}: {place}: unknown key "discout_bp"'


def test_unknown_key_in_a_lot_is_refused(refuse: Refuse) -> None:
    """A lot with a key other than points and earned_on is refused."""
    message = refuse(("{ points = 150,", "{ point = 150,"))
    assert message == f'{FILE}: cards[4] (668800*********0048).lots[0]: unknown key "point"'


def test_unknown_top_level_section_is_refused(refuse: Refuse) -> None:
    """A misspelt section name is refused."""
    message = refuse(("[clearing]", "[clearings]"))
    assert message == f'{FILE}: unknown key "clearings"'


def test_toml_syntax_error_names_the_line(refuse: Refuse) -> None:
    """A TOML syntax error is refused with its line number."""
    message = refuse(('timezone = "Asia/Shanghai"', 'timezone = "Asia/Shanghai'))
    line = DEMO_TEXT[: DEMO_TEXT.index("timezone =")].count("\n") + 1
    assert message.startswith(f"{FILE}: TOML syntax error: ")
    assert f"line {line}" in message


def test_missing_file_is_refused(tmp_path: Path) -> None:
    """A config file that cannot be read is a BadInput naming it."""
    missing = tmp_path / "absent.toml"
    with pytest.raises(BadInput, match=r"absent\.toml: cannot read"):
        load_config(missing)


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    """A config file that is not UTF-8 is a BadInput naming it."""
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[gateway]\nname = "caf\xe9"\n')
    with pytest.raises(BadInput, match=r"latin\.toml: not UTF-8"):
        load_config(latin)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'acquirer_institution = "48020000"         # field 32\n',
            "",
            "gateway.acquirer_institution: missing (required)",
        ),
        ("  discount_bp = 500\n", "", "rules[0] (members-5pct).discount_bp: missing (required)"),
        (
            'tmk = "0123456789ABCDEFFEDCBA9876543210"\n',
            "",
            "terminals[2] (20000001).tmk: missing (required)",
        ),
        ('expiry = "2906"\n', "", "cards[1] (668800*********0124).expiry: missing (required)"),
    ],
)
def test_missing_required_keys_are_refused(
    refuse: Refuse, old: str, new: str, expected: str
) -> None:
    """Ids, keys, discounts and card expiries have no default: a missing one is refused."""
    assert refuse((old, new)).endswith(expected)


def test_section_that_is_not_a_table_is_refused(refuse: Refuse) -> None:
    """A section given as a plain value is refused naming it."""
    plan = (
        "[plan]\nqualify_points = 3500\nexpiry_years = 1\n"
        "max_points_per_card_day = 0               # no daily limit\n"
    )
    message = refuse(("[gateway]\n", "plan = 5\n[gateway]\n"), (plan, ""))
    assert message == f"{FILE}: plan: must be a table, not an integer"


def test_missing_required_section_is_refused(refuse: Refuse) -> None:
    """A config without [clearing] is refused naming the section."""
    clearing = 'acquirer_id = "ACQ000000000001"\nterminal_fee_fen_per_month = 3000\n'
    message = refuse(("[clearing]\n" + clearing, ""))
    assert message == f"{FILE}: clearing: missing (required)"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('cutoff = "23:00"', 'cutoff = "24:00"', 'gateway.cutoff: "24:00" is not a time HH:MM'),
        ('listen = "127.0.0.1:8583"', 'listen = "8583"', 'gateway.listen: "8583" is not HOST:PORT'),
        ('listen = "127.0.0.1:8583"', 'listen = "h:70000"', "is not HOST:PORT (port 0-65535)"),
        (
            'timezone = "Asia/Shanghai"',
            'timezone = "Mars/Olympus"',
            '"Mars/Olympus" is not a known time zone',
        ),
        (
            'timezone = "Asia/Shanghai"',
            'timezone = "Etc/GMT+12"',
            'gateway.timezone: "Etc/GMT+12": the scheme\'s clock is Asia/Shanghai, no other',
        ),
        (
            'database = "sqlite:///var/vipgate.db"',
            'database = "var/vipgate.db"',
            "gateway.database: is not a database URL",
        ),
        (
            'acquirer_institution = "48020000"',
            'acquirer_institution = "4802-000"',
            "is not 1-11 digits",
        ),
        (
            "key_lifetime_h = 24",
            "key_lifetime_h = 0",
            "gateway.key_lifetime_h: 0 is outside 1-8760",
        ),
        (
            "max_pending_per_connection = 32",
            "max_pending_per_connection = 0",
            "0 is outside 1-1024",
        ),
        ('card_prefixes = ["668800"]', "card_prefixes = []", "issuer.card_prefixes: is empty"),
        (
            'card_prefixes = ["668800"]',
            'card_prefixes = ["66-88"]',
            'issuer.card_prefixes: "66-88" is not 1-18 digits',
        ),
        ("expiry_years = 1", "expiry_years = 0", "plan.expiry_years: 0 is outside 1-99"),
        (
            'master_key = "var/master.key"',
            'master_key = "var/ma\\u0000ster.key"',
            "issuer.master_key: must be a path of printable characters",
        ),
        (
            "terminal_fee_fen_per_month = 3000",
            "terminal_fee_fen_per_month = -1",
            "-1 is outside 0-",
        ),
        (
            "allow_partial = true",
            'allow_partial = "yes"',
            f"{M0}.allow_partial: must be a boolean, not a string",
        ),
        (
            "max_amount_fen = 5000000",
            "max_amount_fen = 0",
            f"{M0}.max_amount_fen: 0 is outside 1-999999999999",
        ),
        (
            # a rate the settlement file's 4 digits cannot carry, even under the bank's rate
            "fee_bp = 80\nbank_card_fee_bp = 100",
            "fee_bp = 10000\nbank_card_fee_bp = 10000",
            f"{M0}.fee_bp: 10000 is outside 0-9999",
        ),
        (
            "bank_card_fee_bp = 100",
            "bank_card_fee_bp = 10001",
            "bank_card_fee_bp: 10001 is outside 0-10000",
        ),
        (
            'name = "Huangpu Coffee"',
            'name = "  "',
            "merchants[1] (898310058120002).name: must be a non-empty",
        ),
        (
            'id = "vip-lunch"',
            'id = "vip lunch"',
            'rules[1] (vip lunch).id: "vip lunch" is not 1-32 letters',
        ),
        ('tiers = ["vip"]', "tiers = []", "rules[1] (vip-lunch).tiers: is empty"),
        ("  min_amount_fen = 10000", "  min_amount_fen = -1", "min_amount_fen: -1 is outside 0-"),
        (
            "enabled = true",
            "enabled = 1",
            "terminals[0] (10000001).enabled: must be a boolean, not an integer",
        ),
        # a card number put under another key is quoted masked
        ('expiry = "2812"', 'expiry = "6688000000000000014"', '"668800*********0014" is not YYMM'),
        (
            "lots = [{ points = 100000,",
            "lots = [{ points = 6688000000000000014,",
            "668800*********0014 is outside 1-9999999999",
        ),
    ],
)
def test_other_bad_values_are_refused_by_place(
    refuse: Refuse, old: str, new: str, expected: str
) -> None:
    """Every other bad setting is refused with its place and what is wrong."""
    assert expected in refuse((old, new))


# --- secrets never reach a message ----------------------------------------------------------

SECRET_LIKE = st.text(alphabet="0123456789ABCDEFabcdefXYZ -", min_size=9, max_size=40)


def _message_for(replacement: tuple[str, str]) -> str | None:
    """The refusal message of the demo config with one replacement, or None when it loads."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "demo.toml"
        path.write_text(DEMO_TEXT.replace(*replacement, 1), encoding="utf-8")
        try:
            load_config(path)
        except BadInput as error:
            return str(error)
    return None


@given(SECRET_LIKE)
def test_no_tmk_value_ever_appears_in_a_message(tmk: str) -> None:
    """Whatever is written as a TMK, a refusal never repeats it."""
    message = _message_for(('"FD32139FDCE66744281F7C0090707DF2"', f'"{tmk}"'))
    assert message is None or tmk not in message


@given(SECRET_LIKE)
def test_no_pin_value_ever_appears_in_a_message(pin: str) -> None:
    """Whatever is written as a PIN, a refusal never repeats it."""
    message = _message_for(('pin = "123456"', f'pin = "{pin}"'))
    assert message is None or pin not in message


def test_key_lifetime_in_seconds_replaces_hours_for_rehearsals(tmp_path: Path) -> None:
    """[gateway] key_lifetime_s, when given, is the key lifetime; otherwise key_lifetime_h."""
    demo = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
    assert load_config(demo).gateway.key_lifetime == timedelta(hours=24)
    text = demo.read_text(encoding="utf-8").replace(
        "key_lifetime_h = 24", "key_lifetime_h = 24\nkey_lifetime_s = 5"
    )
    rehearsal = tmp_path / "rehearsal.toml"
    rehearsal.write_text(text, encoding="utf-8")
    assert load_config(rehearsal).gateway.key_lifetime == timedelta(seconds=5)


def test_the_unnamed_links_bound_defaults_to_the_per_terminal_bound(edit: Edit) -> None:
    """`max_unnamed_frames_per_second_per_address` unset: the per-terminal bound, as before
    the key existed (a config that raised that bound for many terminals behind one address
    keeps working); set, its own."""
    unset = edit(
        ("idle_timeout_s = 300", "idle_timeout_s = 300\nmax_frames_per_second_per_terminal = 700")
    )
    assert unset.gateway.max_unnamed_frames_per_second == 700
    own = edit(
        (
            "idle_timeout_s = 300",
            "idle_timeout_s = 300\nmax_unnamed_frames_per_second_per_address = 5000",
        )
    )
    assert own.gateway.max_unnamed_frames_per_second == 5000

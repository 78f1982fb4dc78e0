"""Processes whose configs differ, on one ledger: a gateway still serving the config it started
with while another process (a rolling restart's new instance, or a command given another
`--config`) has loaded a new one. The money must follow what each gateway decided."""

from __future__ import annotations

import dataclasses
from datetime import datetime, time, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from clearing.close import ENABLED, SERVED, terminals_for_fee
from clearing.period import Month, month_begins, month_ends
from gateway.clock import SHANGHAI
from gateway.config import Config, load_config
from gateway.ledger import unit_of_work
from gateway.ledger.models import Authorisation, AuthorisationKind, Terminal, TerminalSession
from gateway.loader import load_into_ledger
from tests.gateway_harness import DEMO, DIAMOND, FEW_POINTS, Harness, demo_config
from tests.spec_terminal import SpecTerminal

STORE = "898310048990001"  # terminal 10000001's merchant in the demo config
COFFEE = "898310058120002"


def moved_config(tmp_path: Path, database: str) -> Config:
    """The demo config with terminal 10000001 moved from the store to the coffee chain."""
    text = DEMO.read_text(encoding="utf-8")
    old = f'id = "10000001"\nmerchant = "{STORE}"'
    assert old in text
    folder = tmp_path / "moved"
    folder.mkdir()
    path = folder / "vipgate.toml"
    path.write_text(text.replace(old, f'id = "10000001"\nmerchant = "{COFFEE}"', 1), "utf-8")
    config = load_config(path, database)
    return dataclasses.replace(config, issuer=demo_config(tmp_path, database).issuer)


def test_a_sale_is_recorded_under_the_merchant_its_gateway_decided_for(
    tmp_path: Path, ledger_url: str
) -> None:
    """Another process loads a config that moves terminal 10000001 to the coffee chain. The
    gateway still serving the old config checks the terminal's requests against the store
    (field 42) and applies the store's rules and fee: the sale, and its void, are recorded
    under the store, whose statement pays for them; the ledger's terminal row says the coffee
    chain all the while."""
    harness = Harness(demo_config(tmp_path, ledger_url))
    with unit_of_work(harness.engine) as session:
        load_into_ledger(
            session, moved_config(tmp_path, ledger_url), harness.security, harness.clock.now()
        )
        terminal_row = session.get(Terminal, "10000001")
        assert terminal_row is not None and terminal_row.merchant_id == COFFEE
    terminal = harness.signed_on()
    _, sale = harness.redeem(terminal, DIAMOND, 10000)
    assert sale.code == "00"
    void = harness.void(terminal, DIAMOND, sale, sale.text(11), 10000)
    assert void.code == "00"
    with unit_of_work(harness.engine) as session:
        rows = session.execute(
            select(Authorisation.kind, Authorisation.merchant_id).order_by(Authorisation.id)
        ).all()
    assert rows == [(AuthorisationKind.REDEMPTION, STORE), (AuthorisationKind.VOID, STORE)]
    harness.engine.dispose()


def edited_config(tmp_path: Path, database: str, old: str, new: str) -> Config:
    """The demo config with `old` replaced by `new` once, and the harness's key files."""
    text = DEMO.read_text(encoding="utf-8")
    assert old in text
    folder = tmp_path / "edited"
    folder.mkdir(exist_ok=True)
    path = folder / "vipgate.toml"
    path.write_text(text.replace(old, new, 1), "utf-8")
    config = load_config(path, database)
    return dataclasses.replace(config, issuer=demo_config(tmp_path, database).issuer)


NEW_TMK = "00112233445566778899AABBCCDDEEFF"


@pytest.mark.parametrize(
    ("new", "suite", "old_keys_get"),
    [
        # a TMK changed (one that leaked): sign on again
        (f'suite = "3des"\ntmk = "{NEW_TMK}"', "3des", "A0"),
        # the suite changed with it: field 53 now names the wrong suite, a format error (§6
        # checks the format first)
        (f'suite = "sm4"\ntmk = "{NEW_TMK}"', "sm4", "30"),
    ],
)
def test_a_terminal_whose_tmk_or_suite_changes_is_signed_off(
    tmp_path: Path, ledger_url: str, new: str, suite: str, old_keys_get: str
) -> None:
    """Working keys sent under the old TMK end when a config load changes the TMK or the
    suite: whoever holds the old TMK could read them. The terminal is told to sign on again
    (`A0`) and gets keys under the new TMK."""
    harness = Harness(demo_config(tmp_path, ledger_url))
    old_keys = harness.signed_on()
    changed = edited_config(
        tmp_path, ledger_url, 'suite = "3des"\ntmk = "FD32139FDCE66744281F7C0090707DF2"', new
    )
    with unit_of_work(harness.engine) as session:
        report = load_into_ledger(session, changed, harness.security, harness.clock.now())
    assert "terminal 10000001: signed off (its working keys came under the old TMK or suite)" in (
        report.changes
    )
    harness.config = changed
    harness.gateway = harness.new_gateway()
    _, refused = harness.redeem(old_keys, DIAMOND, 1000)
    assert refused.code == old_keys_get
    with unit_of_work(harness.engine) as session:
        assert session.get(TerminalSession, "10000001") is None
    new_terminal = SpecTerminal("10000001", STORE, suite, bytes.fromhex(NEW_TMK))
    signed_on = harness.send(new_terminal, new_terminal.sign_on(False))
    assert signed_on.code == "00"
    new_terminal.adopt_sign_on(signed_on)
    assert harness.redeem(new_terminal, DIAMOND, 1000)[1].code == "00"
    harness.engine.dispose()


ENABLED_COFFEE = 'id = "20000001"\nmerchant = "898310058120002"\nenabled = true'
DISABLED_COFFEE = 'id = "20000001"\nmerchant = "898310058120002"\nenabled = false'


@pytest.mark.parametrize(
    ("card", "amount", "code"),
    [(DIAMOND, 1000, "00"), (FEW_POINTS, 100000, "51")],  # approved, or declined by the ledger
)
def test_a_terminal_served_while_the_history_says_disabled_is_paid_for(
    tmp_path: Path, ledger_url: str, card: str, amount: int, code: str
) -> None:
    """Another process disables terminal 20000001 a second before November's first business
    day begins (23:00 on 31 October). The gateway serving it last looked at the ledger's
    switches when the terminal signed on, 1.5 s before a sale at 23:00: it has not looked
    again yet (`FOLLOW_EVERY_S`), and serves the sale, approved or declined by the ledger.
    The ledger's history says disabled for all of November, yet the terminal was served
    there: the network is paid November's terminal fee for it, and the pack says why. The
    next look, 2 s after the last, stops the terminal (`58`)."""
    harness = Harness(
        demo_config(tmp_path, ledger_url),
        start=datetime(2026, 10, 31, 22, 59, 58, 500000, tzinfo=SHANGHAI),
    )
    coffee = harness.signed_on("20000001")
    harness.clock.advance(timedelta(seconds=1))  # 22:59:59.5, still October's business day
    disabled = edited_config(tmp_path, ledger_url, ENABLED_COFFEE, DISABLED_COFFEE)
    with unit_of_work(harness.engine) as session:
        load_into_ledger(session, disabled, harness.security, harness.clock.now())
    harness.clock.advance(timedelta(milliseconds=500))  # 23:00: 1 November's business day
    assert harness.redeem(coffee, card, amount)[1].code == code
    harness.clock.advance(timedelta(milliseconds=500))
    assert harness.redeem(coffee, card, amount)[1].code == "58"
    november = Month.parse("2026-11")
    span = (month_begins(november, SHANGHAI, time(23)), month_ends(november, SHANGHAI, time(23)))
    with unit_of_work(harness.engine) as session:
        paid_for = terminals_for_fee(session, november, *span)
    assert paid_for == {
        "10000001": ENABLED,
        "10000002": ENABLED,
        "20000001": SERVED,
    }
    harness.engine.dispose()


def test_a_serving_gateway_follows_the_ledgers_switches(tmp_path: Path, ledger_url: str) -> None:
    """Another process loads a config that disables terminal 20000001 and makes the store
    (10000001's merchant) inactive, then one that undoes both. The gateway, still serving the
    config it started with, answers as the ledger says from its next look (`FOLLOW_EVERY_S`)
    on: `58` and `03`, then `00` again. Its other settings stay its config's."""
    harness = Harness(demo_config(tmp_path, ledger_url))
    store, coffee = harness.signed_on("10000001"), harness.signed_on("20000001")
    active_store = 'id = "898310048990001"\nname = "Nanjing Road Department Store"\nactive = true'
    assert active_store in DEMO.read_text(encoding="utf-8")
    off = edited_config(tmp_path, ledger_url, ENABLED_COFFEE, DISABLED_COFFEE)
    off = _edited(off, tmp_path, ledger_url, active_store, active_store.replace("true", "false"))
    with unit_of_work(harness.engine) as session:
        load_into_ledger(session, off, harness.security, harness.clock.now())
    # within the interval: as before
    assert harness.redeem(store, DIAMOND, 1000)[1].code == "00"
    assert harness.redeem(coffee, DIAMOND, 1000)[1].code == "00"
    harness.clock.advance(timedelta(seconds=2))
    assert harness.redeem(store, DIAMOND, 1000)[1].code == "03"
    assert harness.redeem(coffee, DIAMOND, 1000)[1].code == "58"
    with unit_of_work(harness.engine) as session:
        load_into_ledger(
            session, demo_config(tmp_path, ledger_url), harness.security, harness.clock.now()
        )
    harness.clock.advance(timedelta(seconds=2))
    assert harness.redeem(store, DIAMOND, 1000)[1].code == "00"
    assert harness.redeem(coffee, DIAMOND, 1000)[1].code == "00"
    harness.engine.dispose()


def _edited(config: Config, tmp_path: Path, database: str, old: str, new: str) -> Config:
    """`config`'s file (written by `edited_config`) edited once more."""
    assert config.path is not None
    text = config.path.read_text(encoding="utf-8")
    assert old in text
    config.path.write_text(text.replace(old, new, 1), "utf-8")
    reloaded = load_config(config.path, database)
    return dataclasses.replace(reloaded, issuer=demo_config(tmp_path, database).issuer)

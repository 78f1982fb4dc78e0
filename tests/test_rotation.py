"""`vipgate keys rotate-master`: everything sealed under the old master key opens under the
new one, PINs still match, and a rotation stopped at any step finishes when run again."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway import cli
from gateway.bootstrap import open_database
from gateway.keystore import FileKeyStore, KeyStoreError
from gateway.ledger import unit_of_work
from gateway.ledger.models import Card, KeySuite, Merchant, Terminal, TerminalSession
from gateway.rotation import rotate_master
from gateway.security import SecurityModuleError, SoftwareSecurityModule
from tests.gateway_harness import DEMO, DIAMOND, GOLD_PIN, TMKS, Harness, demo_config


def software(master: Path) -> SoftwareSecurityModule:
    """The software security module on the master key file at `master`, as a command has it."""
    return SoftwareSecurityModule(FileKeyStore(master))


def stored(harness: Harness) -> tuple[dict[str, bytes], bytes]:
    with unit_of_work(harness.engine) as session:
        blobs = {t.id: t.tmk_encrypted for t in session.scalars(select(Terminal))}
        card = session.get(Card, GOLD_PIN)
        assert card is not None and card.pin_hmac is not None
        return blobs, card.pin_hmac


def assert_everything_opens(harness: Harness) -> None:
    """A fresh store on the same files opens every TMK and matches the stored PIN HMAC."""
    store = FileKeyStore(harness.config.issuer.master_key)
    blobs, pin_hmac = stored(harness)
    for terminal_id, blob in blobs.items():
        assert store.decrypt_tmk(terminal_id, blob).hex().upper() == TMKS[terminal_id][2]
    assert store.pin_matches(GOLD_PIN, "123456", pin_hmac)


@pytest.fixture
def harness(tmp_path: Path, ledger_url: str) -> Harness:
    return Harness(demo_config(tmp_path, ledger_url))


def test_rotation_seals_everything_under_a_new_key(harness: Harness) -> None:
    """After a rotation the master key differs, every TMK and PIN still works, and the old
    master key opens none of the new blobs."""
    master = harness.config.issuer.master_key
    old_key = master.read_bytes()
    shutil.copy(master, master.with_name("old.key"))
    rotation = rotate_master(harness.engine, software(master))
    assert rotation.terminals == 3
    assert master.read_bytes() != old_key
    assert not master.with_name("master.key.next").exists()
    assert_everything_opens(harness)
    old_store = FileKeyStore(master.with_name("old.key"))
    blobs, _ = stored(harness)
    with pytest.raises(KeyStoreError):
        old_store.decrypt_tmk("10000001", blobs["10000001"])


@pytest.mark.parametrize("stop_after", ["begin", "reseal"])
def test_a_rotation_stopped_midway_leaves_everything_readable_and_finishes_later(
    harness: Harness, stop_after: str
) -> None:
    """Stopped after the next key is made, or after the TMKs are sealed again: everything
    still opens, and running the rotation again completes it."""
    master = harness.config.issuer.master_key
    rotation = software(master).begin_rotation()
    if stop_after == "reseal":
        with unit_of_work(harness.engine) as session:
            for terminal in session.scalars(select(Terminal)):
                terminal.tmk_encrypted = rotation.reseal_tmk(terminal.id, terminal.tmk_encrypted)
    assert master.with_name("master.key.next").exists()
    assert_everything_opens(harness)
    rotate_master(harness.engine, software(master))
    assert not master.with_name("master.key.next").exists()
    assert_everything_opens(harness)


def test_the_command_rotates_and_the_gateway_still_checks_pins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vipgate keys rotate-master` exits 0; afterwards a PIN redemption is still approved."""
    config = tmp_path / "demo.toml"
    shutil.copy(DEMO, config)
    database = f"sqlite:///{tmp_path / 'ledger.db'}"
    assert cli.main(["ledger", "load", "--config", str(config), "--db", database]) == 0
    assert cli.main(["keys", "rotate-master", "--config", str(config), "--db", database]) == 0
    assert "3 terminal master keys" in capsys.readouterr().out
    assert cli.main(["keys", "rotate-master", "--config", str(config), "--db", database]) == 0
    rotated = demo_config(tmp_path, database)
    issuer = dataclasses.replace(rotated.issuer, master_key=tmp_path / "var" / "master.key")
    harness = Harness(dataclasses.replace(rotated, issuer=issuer))
    terminal = harness.signed_on()
    assert harness.redeem(terminal, GOLD_PIN, 1000, pin="123456")[1].code == "00"


def test_rotation_reseals_the_sessions_and_terminals_carry_on(harness: Harness) -> None:
    """A signed-on terminal's stored keys are sealed again under the new master key: the old
    key no longer opens them, and both the running gateway and a restarted one accept the
    terminal's MAC without a new sign-on."""
    master = harness.config.issuer.master_key
    terminal = harness.signed_on()
    with unit_of_work(harness.engine) as session:
        before = session.scalars(select(TerminalSession.keys_sealed)).one()
    shutil.copy(master, master.with_name("old.key"))
    rotation = rotate_master(harness.engine, software(master))
    assert rotation.sessions == 1
    with unit_of_work(harness.engine) as session:
        after = session.scalars(select(TerminalSession.keys_sealed)).one()
    assert after != before
    with pytest.raises(KeyStoreError):
        FileKeyStore(master.with_name("old.key")).open_session_keys("10000001", after)
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"
    harness.gateway = harness.new_gateway()
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"


def test_a_running_gateway_signs_on_under_the_rotated_key(harness: Harness) -> None:
    """A gateway started before a rotation seals a later sign-on's keys under the new master
    key, so a gateway started after it opens them."""
    harness.signed_on()
    rotate_master(harness.engine, software(harness.config.issuer.master_key))
    terminal = harness.signed_on()
    harness.gateway = harness.new_gateway()
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"


def test_a_session_that_does_not_open_stops_the_rotation_with_the_ledger_unchanged(
    harness: Harness,
) -> None:
    """A stored key the module cannot open is a `SecurityModuleError`: no row is sealed again,
    the old master key stays, and everything it sealed still opens."""
    master = harness.config.issuer.master_key
    harness.signed_on()
    with unit_of_work(harness.engine) as session:
        row = session.scalars(select(TerminalSession)).one()
        row.keys_sealed = row.keys_sealed[:-1] + bytes([row.keys_sealed[-1] ^ 1])
    blobs_before, _ = stored(harness)
    old_key = master.read_bytes()
    with pytest.raises(SecurityModuleError, match="terminal 10000001"):
        rotate_master(harness.engine, software(master))
    assert stored(harness)[0] == blobs_before
    assert master.read_bytes() == old_key
    assert_everything_opens(harness)
    # Given up: the next key removed. The PIN key file was never sealed under it.
    FileKeyStore(master).next_path.unlink()
    assert_everything_opens(harness)
    assert harness.keystore.pin_matches(GOLD_PIN, "123456", _reference(harness, GOLD_PIN))
    fresh = FileKeyStore(master)
    assert fresh.pin_matches(GOLD_PIN, "123456", _reference(harness, GOLD_PIN))


def _reference(harness: Harness, number: str) -> bytes:
    with unit_of_work(harness.engine) as session:
        card = session.get(Card, number)
        assert card is not None and card.pin_hmac is not None
        return card.pin_hmac


def test_a_refused_rotation_leaves_the_config_load_undone_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command loads the config and seals again in one unit of work: a stored session key
    that does not open is exit 2, and the merchant the config renamed keeps its old name."""
    config = tmp_path / "demo.toml"
    shutil.copy(DEMO, config)
    database = f"sqlite:///{tmp_path / 'ledger.db'}"
    command = ["keys", "rotate-master", "--config", str(config), "--db", database]
    assert cli.main(["ledger", "load", "--config", str(config), "--db", database]) == 0
    assert cli.main(command) == 0
    engine = open_database(database)
    try:
        with unit_of_work(engine) as session:
            # a stored session whose keys do not open (the config's load cannot repair it)
            at = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
            session.add(
                TerminalSession(
                    generation=1,
                    terminal_id="10000001",
                    suite=KeySuite.TDES,
                    keys_sealed=bytes(64),
                    signed_on_at=at,
                    expires_at=at + timedelta(hours=12),
                )
            )
        config.write_text(
            config.read_text().replace("Huangpu Coffee", "Huangpu Coffee and Tea"),
            encoding="utf-8",
        )
        capsys.readouterr()
        assert cli.main(command) == 2
        assert "nothing was sealed again" in capsys.readouterr().err
        with unit_of_work(engine) as session:
            names = set(session.scalars(select(Merchant.name)))
        assert "Huangpu Coffee" in names
        assert "Huangpu Coffee and Tea" not in names
    finally:
        engine.dispose()

"""The signing key and the `vipgate clear`, `verify` and `keys export-public` commands: what a
person sees, and the exit statuses operations.md promises."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select

from clearing import signing
from gateway.bootstrap import open_database
from gateway.cli import main
from gateway.clock import SHANGHAI, FixedClock
from gateway.errors import BadInput
from gateway.ledger import make_engine, unit_of_work
from gateway.ledger.models import Merchant
from tests.damage import overwrite_first_page

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
VIPGATE = Path(sys.executable).with_name("vipgate")


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo config in a folder of its own (its var/ with database and keys beside it),
    with the commands' clock at 1 December 2026 09:00 in Shanghai."""
    path = tmp_path / "demo.toml"
    shutil.copyfile(DEMO, path)
    set_clock(monkeypatch, datetime(2026, 12, 1, 9, 0, tzinfo=SHANGHAI))
    return path


def made_ledger(config_path: Path) -> None:
    """The config's ledger made, migrated and empty (`clear` and `reconcile` make none)."""
    open_database(f"sqlite:///{config_path.parent / 'var' / 'vipgate.db'}").dispose()


def set_clock(monkeypatch: pytest.MonkeyPatch, instant: datetime) -> None:
    monkeypatch.setattr("gateway.bootstrap.system_clock", lambda _tz: FixedClock(instant))


def test_the_signing_key_is_made_on_first_use_private_and_pkcs8(tmp_path: Path) -> None:
    """An unencrypted PKCS#8 PEM, mode 0600, the same key on every later load."""
    path = tmp_path / "keys" / "issuer.pem"
    key = signing.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text(encoding="ascii").startswith("-----BEGIN PRIVATE KEY-----\n")
    assert signing.public_pem(signing.load_or_create(path)) == signing.public_pem(key)


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    """Group- or world-readable: BadInput naming the file and the mode, never the key."""
    path = tmp_path / "issuer.pem"
    signing.load_or_create(path)
    os.chmod(path, 0o640)
    with pytest.raises(BadInput, match=r"permissions 0640") as raised:
        signing.load_private(path)
    assert "PRIVATE" not in str(raised.value)


def test_a_key_of_another_kind_is_refused(tmp_path: Path) -> None:
    """An EC key where the Ed25519 key should be: BadInput."""
    path = tmp_path / "issuer.pem"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    with pytest.raises(BadInput, match="not an Ed25519 key"):
        signing.load_private(path)


def test_keys_export_public_prints_the_issuer_public_key(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The PEM printed is the public half of the configured signing key (made if missing)."""
    assert main(["keys", "export-public", "--config", str(config_path)]) == 0
    printed = capsys.readouterr().out
    public = serialization.load_pem_public_key(printed.encode("ascii"))
    assert isinstance(public, Ed25519PublicKey)
    private = signing.load_private(config_path.parent / "var" / "issuer-ed25519.pem")
    assert signing.public_pem(private) == printed


def test_clear_refuses_an_unfinished_month_with_exit_2(
    config_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ten minutes before 30 November's business date ends (23:00): exit 2, one line, for
    `clear` and `reconcile`; refused before the config is loaded, so no ledger was made."""
    set_clock(monkeypatch, datetime(2026, 11, 30, 22, 50, tzinfo=SHANGHAI))
    out = config_path.parent / "out"
    for command in ("clear", "reconcile"):
        arguments = ["--config", str(config_path), "--month", "2026-11", "--out", str(out)]
        assert main([command, *arguments]) == 2
        captured = capsys.readouterr()
        error = captured.err.strip()
        assert error.startswith("vipgate: error: --month 2026-11: the month is not over")
        assert len(error.splitlines()) == 1
        assert captured.out == ""  # no config load reported
        assert not out.exists()
        assert not (config_path.parent / "var" / "vipgate.db").exists()


@pytest.mark.parametrize(
    ("month", "problem"),
    [
        ("2026-13", "'2026-13' is not a month YYYY-MM"),
        ("0001-01", "0001-01 is outside 1970-01 to 9998-12"),
        ("9999-12", "9999-12 is outside 1970-01 to 9998-12"),
    ],
)
def test_clear_refuses_a_malformed_month_with_exit_2(
    config_path: Path, capsys: pytest.CaptureFixture[str], month: str, problem: str
) -> None:
    """A month that is not YYYY-MM, or at the calendar's ends: exit 2, nothing made."""
    out = config_path.parent / "out"
    arguments = ["--config", str(config_path), "--month", month, "--out", str(out)]
    assert main(["clear", *arguments]) == 2
    assert capsys.readouterr().err == f"vipgate: error: --month: {problem}\n"
    assert not out.exists()
    assert not (config_path.parent / "var" / "issuer-ed25519.pem").exists()


def test_an_out_folder_that_cannot_be_written_closes_nothing(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where the run cannot write its statements, exit 2 before the month is closed; where
    the file itself cannot be written (a folder in its place), exit 2 with the month closed,
    and a run into a good folder writes the same bytes."""
    made_ledger(config_path)
    out = config_path.parent / "out"
    out.mkdir()
    (out / ".statements-202611.partial").write_text("in the way")
    arguments = ["--config", str(config_path), "--month", "2026-11"]
    assert main(["clear", *arguments, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"vipgate: error: --out {out}: cannot write in it")
    (out / ".statements-202611.partial").unlink()
    settlement = out / "VIPSETTLE_ACQ000000000001_202611_001.txt"
    settlement.mkdir()
    assert main(["clear", *arguments, "--out", str(out)]) == 2
    [error] = capsys.readouterr().err.splitlines()
    assert error.startswith(f"vipgate: error: --out {out}: cannot write ")
    assert error.endswith("(the month is closed; a run with a writable --out writes its files, "
                          "the same bytes)")  # fmt: skip
    assert sorted(path.name for path in out.iterdir()) == [settlement.name]
    good = config_path.parent / "good"
    assert main(["clear", *arguments, "--out", str(good)]) == 0
    assert "closed earlier" in capsys.readouterr().out
    assert main(["verify", "--config", str(config_path), str(good / settlement.name)]) == 0


def test_reconcile_into_a_file_is_bad_input(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out naming a file, not a folder: exit 2 and one line, as for clear."""
    made_ledger(config_path)
    arguments = ["--config", str(config_path), "--month", "2026-11"]
    assert main(["clear", *arguments, "--out", str(config_path.parent / "out")]) == 0
    capsys.readouterr()
    assert main(["reconcile", *arguments, "--out", str(config_path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"vipgate: error: --out {config_path}: cannot make the folder"
    )


def test_reconcile_of_a_month_not_closed_changes_nothing(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`reconcile` before `clear`: exit 2, one line, and the config load it began with rolled
    back, so the ledger holds nothing and the first `clear` reports the load."""
    made_ledger(config_path)
    arguments = ["--config", str(config_path), "--month", "2026-11"]
    out = config_path.parent / "out" / "deep"
    assert main(["reconcile", *arguments, "--out", str(out)]) == 2
    assert not out.parent.exists()  # nor a folder made for it
    captured = capsys.readouterr()
    assert captured.err == (
        "vipgate: error: --month 2026-11: the month is not closed; run vipgate clear --month"
        " 2026-11 first\n"
    )
    assert captured.out == ""
    assert _fees(config_path.parent / "var" / "vipgate.db") == {}
    assert main(["clear", *arguments, "--out", str(out)]) == 0
    assert str(config_path) not in capsys.readouterr().out  # `clear` loads no config either


def test_clear_takes_nothing_from_its_config_into_the_ledger(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The month's figures are the ledger's: `clear` run with a config whose fee differs
    from the rate the gateways loaded (and charged) changes no merchant's fee, so the close's
    M records say the rate the month was charged at; nor does it write the config's cards."""
    arguments = ["--config", str(config_path)]
    assert main(["ledger", "load", *arguments]) == 0
    text = config_path.read_text(encoding="utf-8")
    config_path.write_text(text.replace("fee_bp = 80\n", "fee_bp = 30\n", 1), encoding="utf-8")
    capsys.readouterr()
    out = config_path.parent / "out"
    assert main(["clear", *arguments, "--month", "2026-11", "--out", str(out)]) == 0
    assert "fee_bp" not in capsys.readouterr().out
    fees = _fees(config_path.parent / "var" / "vipgate.db")
    assert fees == {"898310048990001": 80, "898310058120002": 60}
    # A ledger `clear` finds empty stays empty: no demo merchants, terminals or cards.
    other = config_path.parent / "empty.db"
    open_database(f"sqlite:///{other}").dispose()
    empty = ["--config", str(DEMO), "--db", f"sqlite:///{other}", "--month", "2026-11"]
    assert main(["clear", *empty, "--out", str(config_path.parent / "out2")]) == 0
    assert _fees(other) == {}


def _fees(database: Path) -> dict[str, int]:
    """Each merchant of a SQLite ledger, with its fee rate."""
    engine = make_engine(f"sqlite:///{database}")
    try:
        with unit_of_work(engine) as session:
            return {m.id: m.fee_bp for m in session.scalars(select(Merchant))}
    finally:
        engine.dispose()


def test_an_out_that_cannot_be_made_is_refused_before_the_config_load(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`clear --out` naming a file: exit 2 before the config is loaded and the month closed,
    so no ledger was made."""
    arguments = ["--config", str(config_path), "--month", "2026-11", "--out", str(config_path)]
    assert main(["clear", *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"vipgate: error: --out {config_path}: cannot make the folder")
    assert captured.out == ""
    assert not (config_path.parent / "var" / "vipgate.db").exists()


def test_a_signing_key_that_is_not_one_is_refused_before_the_config_load(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`clear` with a signing key file that holds no key: exit 2 before the config is
    loaded (a fee changed in it is not taken into the ledger) and the month closed."""
    key = config_path.parent / "var" / "issuer-ed25519.pem"
    key.parent.mkdir()
    key.write_text("not a key\n")
    key.chmod(0o600)
    arguments = ["--config", str(config_path), "--month", "2026-11"]
    assert main(["clear", *arguments, "--out", str(config_path.parent / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"vipgate: error: signing key {key}: not an unencrypted PKCS#8 PEM private key\n"
    )
    assert not (config_path.parent / "var" / "vipgate.db").exists()
    assert not (config_path.parent / "out").exists()


@pytest.mark.parametrize("command", ["clear", "reconcile"])
def test_clear_and_reconcile_refuse_a_damaged_ledger_file_and_write_nothing(
    config_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Money leaves on the settlement file's figures: on a ledger file SQLite finds damaged,
    `clear` closes nothing and writes nothing (nor does `reconcile`), exit 1 with what
    SQLite found. Before, the figures were read past the damage as if it were not there."""
    assert main(["ledger", "load", "--config", str(config_path)]) == 0
    out = config_path.parent / "out"
    arguments = ["--config", str(config_path), "--month", "2026-11", "--out", str(out)]
    if command == "reconcile":  # of a month closed before the damage
        closed = str(config_path.parent / "closed")
        assert main(["clear", *arguments[:-1], closed]) == 0
    overwrite_first_page(config_path.parent / "var" / "vipgate.db", "journal_entries")
    capsys.readouterr()
    assert main([command, *arguments]) == 1
    captured = capsys.readouterr()
    assert captured.out == "storage_sound: ledger file: database disk image is malformed\n"
    done = "nothing was closed or written" if command == "clear" else "no pack was written"
    assert captured.err == (
        f"vipgate: {command}: the ledger file is damaged (SQLite's integrity check); {done}:"
        " restore the ledger from a backup\n"
    )
    assert not out.exists()


def test_output_a_full_disk_refuses_is_one_line_and_exit_2(
    config_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Standard output on a full disk (`> /dev/full`), and the page `reconcile` writes on
    one: one line naming what could not be written and why, exit 2 (it was a traceback and
    exit 1, which says a check found a fault)."""
    with open(os.devnull, "rb") as nothing, open("/dev/full", "wb") as full:
        printed = subprocess.run(
            [str(VIPGATE), "keys", "export-public", "--config", str(config_path)],
            stdin=nothing,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    assert printed.returncode == 2
    assert printed.stderr == (
        "vipgate: error: cannot write standard output: No space left on device; what was"
        " committed stands, and a file being written may be cut short: make room and run the"
        " command again\n"
    )
    made_ledger(config_path)
    out = config_path.parent / "out"

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # as a file's write says it

    arguments = ["--config", str(config_path), "--month", "2026-11", "--out", str(out)]
    assert main(["clear", *arguments]) == 0
    capsys.readouterr()
    monkeypatch.setattr("clearing.reconcile.write_page", full)
    assert main(["reconcile", *arguments]) == 2
    assert capsys.readouterr().err == (
        f"vipgate: error: cannot write {out}: No space left on device; what was committed"
        " stands, and a file being written may be cut short: make room and run the command"
        " again\n"
    )


def test_clear_then_verify_from_the_command_line(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty November cleared, verified with the default key and an exported one."""
    made_ledger(config_path)
    out = config_path.parent / "out"
    arguments = ["--config", str(config_path)]
    assert main(["clear", *arguments, "--month", "2026-11", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "month 2026-11 closed now, at 2026-12-01T09:00:00+08:00" in printed
    settlement = out / "VIPSETTLE_ACQ000000000001_202611_001.txt"
    assert (out / "VIPSETTLE_ACQ000000000001_202611_001.txt.sig").exists()
    assert main(["verify", *arguments, str(settlement)]) == 0
    assert "good: 0 details, 0 merchants" in capsys.readouterr().out
    assert main(["keys", "export-public", *arguments]) == 0
    pem = config_path.parent / "issuer.pub.pem"
    pem.write_text(capsys.readouterr().out, encoding="ascii")
    assert main(["verify", str(settlement), "--pubkey", str(pem)]) == 0
    assert main(["clear", *arguments, "--month", "2026-11", "--out", str(out)]) == 0
    assert "closed earlier, at 2026-12-01T09:00:00+08:00: the same bytes" in capsys.readouterr().out


def test_verify_names_each_fault_and_exits_1(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A changed byte, then a key that is not the issuer's: exit 1 with the faults printed."""
    made_ledger(config_path)
    out = config_path.parent / "out"
    arguments = ["--config", str(config_path)]
    assert main(["clear", *arguments, "--month", "2026-11", "--out", str(out)]) == 0
    settlement = out / "VIPSETTLE_ACQ000000000001_202611_001.txt"
    content = bytearray(settlement.read_bytes())
    content[12] = ord("X")  # inside the sender id: still a well-formed header
    settlement.write_bytes(bytes(content))
    capsys.readouterr()
    assert main(["verify", *arguments, str(settlement)]) == 1
    captured = capsys.readouterr()
    assert "line 2 (T record): the SHA-256 is not that of the bytes before the trailer" in (
        captured.out
    )
    assert "the signature does not verify" in captured.out
    assert captured.err.strip() == f"vipgate: verify: {settlement}: 2 faults"
    other = config_path.parent / "other.pem"
    other.write_text(signing.public_pem(Ed25519PrivateKey.generate()), encoding="ascii")
    assert main(["clear", *arguments, "--month", "2026-10", "--out", str(out)]) == 0
    october = out / "VIPSETTLE_ACQ000000000001_202610_001.txt"
    assert main(["verify", str(october), "--pubkey", str(other)]) == 1


def test_verify_of_a_missing_file_is_bad_input(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No such file, or a folder: exit 2."""
    assert main(["verify", "--config", str(config_path), str(config_path.parent / "no.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["verify", "--config", str(config_path), str(config_path.parent)]) == 2
    assert "a folder, not a settlement file" in capsys.readouterr().err


def test_reconcile_on_a_host_without_the_issuer_key_makes_none(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An audit host with the ledger but not the issuer's signing key: `reconcile` is refused
    with one line, and makes no key of its own (a pack checked against a key made on the spot
    said RECONCILED over a signature the acquirer's key rejects)."""
    made_ledger(config_path)
    arguments = ["--config", str(config_path), "--month", "2026-11"]
    assert main(["clear", *arguments, "--out", str(config_path.parent / "out")]) == 0
    key = config_path.parent / "var" / "issuer-ed25519.pem"
    key.unlink()
    capsys.readouterr()
    assert main(["reconcile", *arguments, "--out", str(config_path.parent / "pack")]) == 2
    assert capsys.readouterr().err.startswith(f"vipgate: error: signing key {key}: ")
    assert not key.exists()
    assert not (config_path.parent / "pack").exists()  # refused: no folder left behind


def test_a_signing_key_that_cannot_be_made_leaves_no_out_folder(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A signing key whose folder cannot be made (a file is in the way): `clear` is refused
    with one line (exit 2), closes nothing, and leaves no `--out` folder behind."""
    made_ledger(config_path)
    text = config_path.read_text(encoding="utf-8")
    (config_path.parent / "a-file").write_text("", encoding="utf-8")
    missing = config_path.parent / "a-file" / "issuer.pem"
    old = 'signing_key = "var/issuer-ed25519.pem"'
    assert old in text
    config_path.write_text(text.replace(old, f'signing_key = "{missing}"'), encoding="utf-8")
    out = config_path.parent / "out"
    arguments = ["--config", str(config_path), "--month", "2026-11", "--out", str(out)]
    assert main(["clear", *arguments]) == 2
    assert capsys.readouterr().err.startswith(f"vipgate: error: signing key {missing}: ")
    assert not out.exists()
    assert main(["reconcile", *arguments]) == 2  # the month was not closed
    assert "the month is not closed" in capsys.readouterr().err


def _signing_key_at(config_path: Path, key: Path) -> None:
    text = config_path.read_text(encoding="utf-8")
    old = 'signing_key = "var/issuer-ed25519.pem"'
    assert old in text
    config_path.write_text(text.replace(old, f'signing_key = "{key}"'), encoding="utf-8")


def test_a_closed_month_is_signed_again_by_its_own_key_alone(
    config_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A month cleared again with the config pointing at another key file (a moved path, a
    host without the key): refused in one line (exit 2), no key made, the month's `.sig`
    untouched. It made a key there, replaced the `.sig` with one the acquirer's public key
    rejects, and said "the same bytes again"."""
    made_ledger(config_path)
    out = config_path.parent / "out"
    arguments = ["--config", str(config_path), "--month", "2026-11", "--out", str(out)]
    assert main(["clear", *arguments]) == 0
    signature = out / "VIPSETTLE_ACQ000000000001_202611_001.txt.sig"
    signed = signature.read_bytes()
    first = signing.load_private(config_path.parent / "var" / "issuer-ed25519.pem")
    moved = config_path.parent / "var" / "issuer-moved.pem"
    _signing_key_at(config_path, moved)
    capsys.readouterr()
    assert main(["clear", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vipgate: error: signing key {moved}: no such file, and the ledger's")
    fingerprint = signing.key_sha256(first)
    assert f"(the latest, 2026-11, by the key whose public key has SHA-256 {fingerprint})" in err
    assert err.count("\n") == 1
    assert not moved.exists()
    assert signature.read_bytes() == signed
    other = Ed25519PrivateKey.generate()
    moved.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    moved.chmod(0o600)
    assert main(["clear", *arguments]) == 2
    assert capsys.readouterr().err == (
        f"vipgate: error: signing key {moved}: month 2026-11 was signed by another key"
        f" (public key SHA-256 {signing.key_sha256(first)}, this one's"
        f" {signing.key_sha256(other)}); a later run writes the same bytes, so only that key"
        " signs it again: point issuer.signing_key at it\n"
    )
    assert signature.read_bytes() == signed
    # A new month is the new key's to sign, once it was made on purpose.
    december = ["--config", str(config_path), "--month", "2026-12", "--out", str(out)]
    set_clock(monkeypatch, datetime(2027, 1, 2, 9, 0, tzinfo=SHANGHAI))
    assert main(["clear", *december]) == 0
    capsys.readouterr()
    december_file = out / "VIPSETTLE_ACQ000000000001_202612_001.txt"
    assert main(["verify", "--config", str(config_path), str(december_file)]) == 0


def test_a_month_signed_before_the_key_was_recorded_records_it(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A month closed by a version that recorded no signing key (its column empty): the
    next run records the key it signs with, and holds later runs to it."""
    made_ledger(config_path)
    out = config_path.parent / "out"
    arguments = ["--config", str(config_path), "--month", "2026-11", "--out", str(out)]
    assert main(["clear", *arguments]) == 0
    database = config_path.parent / "var" / "vipgate.db"
    engine = make_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE clearing_months SET signing_key_sha256 = NULL")
    # Another key (made on purpose for new months): its run would replace the month's .sig.
    signature = out / "VIPSETTLE_ACQ000000000001_202611_001.txt.sig"
    signed = signature.read_bytes()
    original = config_path.read_text(encoding="utf-8")
    moved = config_path.parent / "var" / "issuer-next.pem"
    signing.load_or_create(moved)
    _signing_key_at(config_path, moved)
    capsys.readouterr()
    assert main(["clear", *arguments]) == 2
    assert capsys.readouterr().err == (
        f"vipgate: error: signing key {moved}: month 2026-11 closed before its signing key was"
        f" recorded, and {signature} does not verify under this key; a later run writes the"
        " same bytes, so only the key that signed it signs it again: point"
        " issuer.signing_key at it\n"
    )
    assert signature.read_bytes() == signed
    config_path.write_text(original, encoding="utf-8")
    assert main(["clear", *arguments]) == 0
    assert signature.read_bytes() == signed
    key = signing.load_private(config_path.parent / "var" / "issuer-ed25519.pem")
    with engine.begin() as connection:
        recorded = connection.exec_driver_sql(
            "SELECT signing_key_sha256 FROM clearing_months"
        ).scalar_one()
    engine.dispose()
    assert recorded == signing.key_sha256(key)
    # Its key file gone (the month closed before the record): refused, no key made.
    engine = make_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE clearing_months SET signing_key_sha256 = NULL")
    engine.dispose()
    key_file = config_path.parent / "var" / "issuer-ed25519.pem"
    key_file.unlink()
    capsys.readouterr()
    assert main(["clear", *arguments]) == 2
    assert "(the latest, 2026-11, by the key the config named then); restore that key file" in (
        capsys.readouterr().err
    )
    assert not key_file.exists()
    assert signature.read_bytes() == signed


def test_clear_of_a_ledger_that_takes_no_write_is_refused_before_out_is_made(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ledger opened read-only (SQLite's `mode=ro` here; a PostgreSQL standby alike):
    one line and exit 2, and no `--out` left behind (it was made, then left empty)."""
    made_ledger(config_path)
    database = config_path.parent / "var" / "vipgate.db"
    out = config_path.parent / "out"
    read_only = f"sqlite:///file:{database}?mode=ro&uri=true"
    arguments = ["--config", str(config_path), "--db", read_only]
    assert main(["clear", *arguments, "--month", "2026-11", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "vipgate: error: database: the ledger file cannot be written (attempt to write a"
        " readonly database); check the file's and its folder's owner and mode, then run the"
        " command again\n"
    )
    assert not out.exists()

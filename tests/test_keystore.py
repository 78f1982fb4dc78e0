"""The file key store: TMKs encrypted at rest bound to their terminal, PIN HMACs, and a master
key file that is made private on first use and refused when it is not."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.errors import BadInput
from gateway.keystore import MASTER_KEY_BYTES, FileKeyStore, KeyStoreError

TMK = bytes.fromhex("FD32139FDCE66744281F7C0090707DF2")
CARD = "6688000000000000014"
PIN = "123456"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "nested" / "master.key"


@pytest.fixture
def store(key_path: Path) -> FileKeyStore:
    return FileKeyStore(key_path)


def test_tmk_round_trip(store: FileKeyStore) -> None:
    """A TMK encrypted for a terminal decrypts to the same bytes for that terminal."""
    encrypted = store.encrypt_tmk("10000001", TMK)
    assert store.decrypt_tmk("10000001", encrypted) == TMK


def test_encrypted_tmk_hides_the_key_and_differs_each_time(store: FileKeyStore) -> None:
    """The stored blob holds no TMK bytes, and a fresh nonce makes every encryption differ."""
    first = store.encrypt_tmk("10000001", TMK)
    second = store.encrypt_tmk("10000001", TMK)
    assert TMK not in first
    assert first != second
    assert len(first) == 1 + 4 + 12 + len(TMK) + 16  # format, key id, nonce, TMK, tag


def test_tmk_for_another_terminal_does_not_decrypt(store: FileKeyStore) -> None:
    """The terminal id is the associated data: a blob moved to another terminal is refused."""
    encrypted = store.encrypt_tmk("10000001", TMK)
    with pytest.raises(KeyStoreError, match="terminal 10000002") as raised:
        store.decrypt_tmk("10000002", encrypted)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_tampered_or_foreign_blob_does_not_decrypt(store: FileKeyStore, tmp_path: Path) -> None:
    """A flipped bit, a blob that is not ours, or one from another master key is refused."""
    encrypted = bytearray(store.encrypt_tmk("10000001", TMK))
    encrypted[-1] ^= 1
    with pytest.raises(KeyStoreError):
        store.decrypt_tmk("10000001", bytes(encrypted))
    for foreign in (b"\x03" + bytes(encrypted[1:]), bytes(encrypted[:32])):
        with pytest.raises(KeyStoreError, match="not an encrypted key"):
            store.decrypt_tmk("10000001", foreign)
    other = FileKeyStore(tmp_path / "other.key")
    with pytest.raises(KeyStoreError):
        other.decrypt_tmk("10000001", store.encrypt_tmk("10000001", TMK))


def test_master_key_file_is_created_private(store: FileKeyStore, key_path: Path) -> None:
    """First use creates the folder and 32 random bytes with mode 0600."""
    assert not key_path.exists()
    store.encrypt_tmk("10000001", TMK)
    mode = stat.S_IMODE(key_path.stat().st_mode)
    assert mode == 0o600
    assert len(key_path.read_bytes()) == MASTER_KEY_BYTES
    assert [p.name for p in key_path.parent.iterdir()] == ["master.key"]


def test_master_key_survives_a_restart(store: FileKeyStore, key_path: Path) -> None:
    """A second store on the same file (a restarted gateway) decrypts the first one's blobs."""
    encrypted = store.encrypt_tmk("10000001", TMK)
    again = FileKeyStore(key_path)
    assert again.decrypt_tmk("10000001", encrypted) == TMK
    assert again.pin_hmac(CARD, PIN) == store.pin_hmac(CARD, PIN)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620])
def test_master_key_open_to_group_or_others_is_refused(key_path: Path, mode: int) -> None:
    """A key file group or others can read or write is refused, naming the file."""
    key_path.parent.mkdir(parents=True)
    key_path.write_bytes(os.urandom(MASTER_KEY_BYTES))
    key_path.chmod(mode)
    with pytest.raises(BadInput, match=f"master key {key_path}: permissions 0{mode:o}"):
        FileKeyStore(key_path).pin_hmac(CARD, PIN)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_master_key_of_the_wrong_size_is_refused(key_path: Path, size: int) -> None:
    """A key file that is not exactly 32 bytes is refused, naming the file."""
    key_path.parent.mkdir(parents=True)
    key_path.write_bytes(b"k" * size)
    key_path.chmod(0o600)
    with pytest.raises(BadInput, match=f"master key {key_path}: must be exactly 32 bytes"):
        FileKeyStore(key_path).encrypt_tmk("10000001", TMK)


def test_master_key_that_is_not_a_file_is_refused(key_path: Path) -> None:
    """A folder where the key should be is refused, naming it."""
    key_path.mkdir(parents=True)
    with pytest.raises(BadInput, match=f"master key {key_path}: not a regular file"):
        FileKeyStore(key_path).encrypt_tmk("10000001", TMK)


def test_a_named_pipe_where_the_key_should_be_is_refused_at_once(key_path: Path) -> None:
    """A FIFO at the key's path is refused as not a regular file, without waiting: opened
    for reading as a file is, it held the command until a writer came (a gateway start that
    never started, and never said why)."""
    key_path.parent.mkdir(parents=True)
    os.mkfifo(key_path, 0o600)
    with pytest.raises(BadInput, match=f"master key {key_path}: not a regular file"):
        FileKeyStore(key_path).encrypt_tmk("10000001", TMK)


def test_master_key_behind_a_link_is_judged_by_its_file(tmp_path: Path) -> None:
    """A link to the key (a mounted secret) works when the file it names is private."""
    target = tmp_path / "secrets" / "master.key"
    FileKeyStore(target).pin_hmac(CARD, PIN)
    link = tmp_path / "master.key"
    link.symlink_to(target)
    assert FileKeyStore(link).pin_hmac(CARD, PIN) == FileKeyStore(target).pin_hmac(CARD, PIN)
    target.chmod(0o644)
    with pytest.raises(BadInput, match=f"master key {link}: permissions 0644"):
        FileKeyStore(link).pin_hmac(CARD, PIN)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_master_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A private key file another user owns (planted in a shared folder, or named by a link)
    is never adopted: it would let that user open every sealed TMK."""
    planted = tmp_path / "planted.key"
    planted.write_bytes(os.urandom(MASTER_KEY_BYTES))
    planted.chmod(0o600)
    os.chown(planted, 65534, 65534)
    link = tmp_path / "master.key"
    link.symlink_to(planted)
    for path in (planted, link):
        with pytest.raises(BadInput, match=f"master key {path}: owned by user 65534, not by"):
            FileKeyStore(path).pin_hmac(CARD, PIN)


def test_pin_hmac_verifies_only_the_right_pin_for_the_right_card(store: FileKeyStore) -> None:
    """The HMAC matches the PIN it was made from, on its card, and nothing else."""
    stored = store.pin_hmac(CARD, PIN)
    assert len(stored) == 32
    assert PIN.encode() not in stored
    assert store.pin_matches(CARD, PIN, stored)
    assert not store.pin_matches(CARD, "123457", stored)
    assert not store.pin_matches("6688001234567890124", PIN, stored)
    assert not store.pin_matches(CARD, PIN, stored[:-1] + bytes([stored[-1] ^ 1]))


def test_pin_hmac_differs_from_the_tmk_key_use(store: FileKeyStore, tmp_path: Path) -> None:
    """Another master key gives another PIN HMAC: the HMAC is keyed, not a plain hash."""
    other = FileKeyStore(tmp_path / "other.key")
    assert other.pin_hmac(CARD, PIN) != store.pin_hmac(CARD, PIN)


@pytest.mark.parametrize("pin", ["123", "1234567890123", "12a456", ""])
def test_malformed_pin_is_refused_without_echoing_it(store: FileKeyStore, pin: str) -> None:
    """A PIN that is not 4-12 digits is a programming error whose message hides the value."""
    with pytest.raises(ValueError, match="PIN must be 4-12 ASCII digits") as raised:
        store.pin_hmac(CARD, pin)
    assert pin == "" or pin not in str(raised.value)


def test_no_key_material_in_reprs(store: FileKeyStore, key_path: Path) -> None:
    """The store's repr names the file only; its derived keys print as <secret>."""
    store.encrypt_tmk("10000001", TMK)
    master = key_path.read_bytes()
    text = repr(store) + repr(vars(store))
    assert str(key_path) in text
    assert "<secret>" in text
    assert master.hex() not in text.lower()
    assert repr(master) not in text


def test_session_keys_round_trip_bound_to_their_terminal(store: FileKeyStore) -> None:
    """Working keys sealed for a terminal's session open for it only, and never as its TMK."""
    keys = bytes(range(32))
    sealed = store.seal_session_keys("10000001", keys)
    assert keys not in sealed
    assert store.open_session_keys("10000001", sealed) == keys
    with pytest.raises(KeyStoreError, match="terminal 10000002"):
        store.open_session_keys("10000002", sealed)
    with pytest.raises(KeyStoreError):
        store.decrypt_tmk("10000001", sealed)
    with pytest.raises(KeyStoreError):
        store.open_session_keys("10000001", store.encrypt_tmk("10000001", TMK))


def test_a_store_sees_a_rotation_made_by_another_process(key_path: Path) -> None:
    """A store loaded before another process rotated the master key opens the blobs sealed
    under the new key, and seals new ones under it, so that they outlive the old key."""
    running = FileKeyStore(key_path)
    old = running.seal_session_keys("10000001", bytes(32))
    rotating = FileKeyStore(key_path)
    rotating.begin_rotation()
    resealed = rotating.reseal_session_keys("10000001", old)
    during = running.seal_session_keys("10000001", bytes(32))
    rotating.finish_rotation()
    after = running.seal_session_keys("10000001", bytes(32))
    fresh = FileKeyStore(key_path)
    for sealed in (resealed, during, after):
        assert running.open_session_keys("10000001", sealed) == bytes(32)
        assert fresh.open_session_keys("10000001", sealed) == bytes(32)


def test_a_master_key_gone_while_serving_is_never_made_anew(key_path: Path) -> None:
    """The master key file moved away under a running store: sealing is refused with an
    error naming the file, and no new key is made in its place (one was: a terminal's
    working keys went under a key no other instance held, and no stored TMK opened under
    it); with the file given back, the store seals and opens as before."""
    running = FileKeyStore(key_path)
    before = running.seal_session_keys("10000001", bytes(32))
    aside = key_path.with_name("aside.key")
    key_path.rename(aside)
    with pytest.raises(KeyStoreError, match=f"master key {key_path}: .*not made anew"):
        running.seal_session_keys("10000001", bytes(32))
    with pytest.raises(KeyStoreError, match=f"master key {key_path}"):
        running.open_session_keys("10000001", before)
    assert not key_path.exists()
    aside.rename(key_path)
    after = running.seal_session_keys("10000001", bytes(32))
    for sealed in (before, after):
        assert FileKeyStore(key_path).open_session_keys("10000001", sealed) == bytes(32)

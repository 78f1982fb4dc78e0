"""The software security module: the known answers of the shared vectors through its interface,
keys that cross it only sealed or as opaque handles, and PIN checks that never return a PIN."""

from __future__ import annotations

import hmac
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select

from cardcodec.crypto import (
    Suite,
    WorkingKeys,
    decrypt_pin,
    decrypt_track,
    encrypt_ecb,
    encrypt_pin,
    generate_working_keys,
    mac,
    unwrap_working_keys,
    wrap_working_keys,
)
from cardcodec.errors import CodecError, PinBlockError
from gateway import keystore
from gateway.keystore import FileKeyStore
from gateway.ledger import unit_of_work
from gateway.ledger.models import Terminal
from gateway.loader import load_into_ledger
from gateway.rotation import rotate_master
from gateway.security import (
    IssuedKeys,
    KeyHandle,
    MasterKeyRotation,
    PinCheck,
    SecurityModule,
    SecurityModuleError,
    SoftwareSecurityModule,
)
from tests.gateway_harness import DIAMOND, GOLD_PIN, TMKS, Harness, demo_config
from tests.vectors import SuiteCase, suite_cases

TERMINAL = "10000001"
CASES = suite_cases()


def draws(*keys: bytes) -> Callable[[int], bytes]:
    """A random source that gives these keys in order (PIK, MAK, TDK as the module draws them)."""
    queue: Iterator[bytes] = iter(keys)
    return lambda size: next(queue)


@pytest.fixture
def store(tmp_path: Path) -> FileKeyStore:
    return FileKeyStore(tmp_path / "master.key")


def vector_module(store: FileKeyStore, case: SuiteCase) -> SoftwareSecurityModule:
    return SoftwareSecurityModule(store, draws(case.pik, case.mak, case.tdk))


def issued_handle(store: FileKeyStore, case: SuiteCase) -> tuple[SecurityModule, KeyHandle]:
    module = vector_module(store, case)
    sealed_tmk = store.encrypt_tmk(TERMINAL, case.tmk)
    issued = module.issue_working_keys(TERMINAL, case.suite, sealed_tmk, with_tdk=True)
    return module, issued.handle


def test_the_module_satisfies_the_interface(store: FileKeyStore) -> None:
    """The software module is a `SecurityModule` (checked by mypy here, as the gateway uses it)."""
    module: SecurityModule = SoftwareSecurityModule(store)
    assert "master.key" in repr(module)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_issued_field62_is_the_vectors_one(store: FileKeyStore, case: SuiteCase) -> None:
    """With the vectors' keys drawn, field 62 is byte for byte the published one."""
    module = vector_module(store, case)
    sealed_tmk = store.encrypt_tmk(TERMINAL, case.tmk)
    issued = module.issue_working_keys(TERMINAL, case.suite, sealed_tmk, with_tdk=True)
    assert issued.field62 == case.frame("field62_with_tdk")
    assert issued.handle.suite is case.suite and issued.handle.has_tdk


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_mac_and_verify_give_the_vectors_mac(store: FileKeyStore, case: SuiteCase) -> None:
    """The MAC of the published MAC input is the published field 64; one bit off fails."""
    module, keys = issued_handle(store, case)
    data = case.frame("redemption_mac_input")
    expected = case.data["redemption_field64_ascii"].encode("ascii")
    assert module.mac(keys, data) == expected
    assert module.verify_mac(keys, data, expected)
    assert not module.verify_mac(keys, data[:-1] + bytes([data[-1] ^ 1]), expected)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_track_decrypts_to_the_vectors_clear_track(store: FileKeyStore, case: SuiteCase) -> None:
    """An encrypted track 2 of the vectors decrypts to its clear form under the issued TDK."""
    module, keys = issued_handle(store, case)
    assert module.decrypt_track(keys, case.data["track2_encrypted"]) == case.data["track2_clear"]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_vector_pin_block_matches_only_its_pin(store: FileKeyStore, case: SuiteCase) -> None:
    """The vectors' PIN block: match against its card's PIN reference, no match against
    another."""
    module, keys = issued_handle(store, case)
    block = case.frame("pin_block_encrypted")
    right = module.pin_reference(case.card_number, case.pin)
    wrong = module.pin_reference(case.card_number, "999999")
    assert module.check_pin(keys, block, case.card_number, right) is PinCheck.MATCH
    assert module.check_pin(keys, block, case.card_number, wrong) is PinCheck.NO_MATCH


@pytest.mark.parametrize("suite", list(Suite))
def test_a_block_that_is_not_format_0_is_a_bad_block(store: FileKeyStore, suite: Suite) -> None:
    """A block that decrypts to garbage is BAD_BLOCK (a `99`), whatever the stored HMAC."""
    case = next(case for case in CASES if case.suite is suite)
    module, keys = issued_handle(store, case)
    garbage = encrypt_ecb(suite, case.pik, b"\xff" * suite.block_size)
    stored = store.pin_hmac(case.card_number, case.pin)
    assert module.check_pin(keys, garbage, case.card_number, stored) is PinCheck.BAD_BLOCK
    assert module.check_pin(keys, garbage, case.card_number, None) is PinCheck.BAD_BLOCK


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_without_a_pin_reference_a_valid_block_is_only_sound(
    store: FileKeyStore, case: SuiteCase
) -> None:
    """For a card without a PIN there is nothing to compare: a valid block is SOUND."""
    module, keys = issued_handle(store, case)
    block = case.frame("pin_block_encrypted")
    assert module.check_pin(keys, block, case.card_number, None) is PinCheck.SOUND


@pytest.mark.parametrize("with_tdk", [False, True])
def test_sealed_keys_reopen_and_hide_the_keys(store: FileKeyStore, with_tdk: bool) -> None:
    """The sealed form holds no clear key; opened again, it MACs and checks PINs as issued."""
    case = CASES[0]
    module = vector_module(store, case)
    sealed_tmk = store.encrypt_tmk(TERMINAL, case.tmk)
    issued = module.issue_working_keys(TERMINAL, case.suite, sealed_tmk, with_tdk=with_tdk)
    for key in (case.pik, case.mak, case.tdk):
        assert key not in issued.sealed
    opened = SoftwareSecurityModule(FileKeyStore(store.path)).open_keys(
        TERMINAL, case.suite, issued.sealed
    )
    assert opened.has_tdk is with_tdk
    data = case.frame("redemption_mac_input")
    assert module.mac(opened, data) == module.mac(issued.handle, data)
    block = encrypt_pin(case.suite, case.pik, case.pin, case.card_number)
    stored = store.pin_hmac(case.card_number, case.pin)
    assert module.check_pin(opened, block, case.card_number, stored) is PinCheck.MATCH


def test_sealed_keys_open_only_for_their_terminal_and_suite(store: FileKeyStore) -> None:
    """Working keys moved to another terminal's row, or read as the other suite, are refused;
    so is a sealed TMK passed off as working keys."""
    case = CASES[0]
    module = vector_module(store, case)
    sealed_tmk = store.encrypt_tmk(TERMINAL, case.tmk)
    issued = module.issue_working_keys(TERMINAL, case.suite, sealed_tmk, with_tdk=False)
    with pytest.raises(SecurityModuleError, match="terminal 10000002"):
        module.open_keys("10000002", case.suite, issued.sealed)
    with pytest.raises(SecurityModuleError, match="not for sm4"):
        module.open_keys(TERMINAL, Suite.SM4, issued.sealed)
    with pytest.raises(SecurityModuleError):
        module.open_keys(TERMINAL, case.suite, sealed_tmk)


def test_field62_unwraps_under_the_tmk_to_fresh_keys(store: FileKeyStore) -> None:
    """With the real random source, field 62 unwraps (KCVs checked) and differs each sign-on."""
    module = SoftwareSecurityModule(store)
    tmk = CASES[0].tmk
    sealed_tmk = store.encrypt_tmk(TERMINAL, tmk)
    first = module.issue_working_keys(TERMINAL, Suite.TDES, sealed_tmk, with_tdk=True)
    second = module.issue_working_keys(TERMINAL, Suite.TDES, sealed_tmk, with_tdk=True)
    assert len(first.field62) == 60
    keys = unwrap_working_keys(Suite.TDES, tmk, first.field62)
    assert keys != unwrap_working_keys(Suite.TDES, tmk, second.field62)


def test_a_tmk_that_does_not_open_is_a_module_error(store: FileKeyStore, tmp_path: Path) -> None:
    """A TMK sealed under another master key: a module error naming the terminal, no key."""
    other = FileKeyStore(tmp_path / "other.key")
    module = SoftwareSecurityModule(store)
    sealed = other.encrypt_tmk(TERMINAL, CASES[0].tmk)
    with pytest.raises(SecurityModuleError, match=f"terminal {TERMINAL}") as raised:
        module.issue_working_keys(TERMINAL, Suite.TDES, sealed, with_tdk=False)
    assert CASES[0].tmk.hex() not in str(raised.value).lower()


def test_a_master_key_gone_at_a_sign_on_is_a_module_error(store: FileKeyStore) -> None:
    """The master key file moved away while serving: the TMK still opens (the key is held),
    but the new working keys cannot be sealed: a module error naming the file (the sign-on
    is answered `96`), where a bare store error failed the group and closed the link."""
    module = SoftwareSecurityModule(store)
    sealed = store.encrypt_tmk(TERMINAL, CASES[0].tmk)
    store.path.rename(store.path.with_name("aside.key"))
    with pytest.raises(SecurityModuleError, match=f"master key {store.path}"):
        module.issue_working_keys(TERMINAL, Suite.TDES, sealed, with_tdk=False)


def test_a_rotation_finished_while_the_keys_are_read_is_seen_at_the_next_seal(
    store: FileKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process finishes a rotation between this store's read of the master key and
    its look for the next one: the store holds the old key, and its next seal reads the
    files again, so nothing is sealed under a key that is gone."""
    store.encrypt_tmk(TERMINAL, CASES[0].tmk)  # the key made, and the store loaded
    rotating = FileKeyStore(store.path)
    rotating.begin_rotation()
    fresh = FileKeyStore(store.path)
    real_read, real_read_or_create = keystore._read, keystore._read_or_create

    def read_then_finish(path: Path) -> Any:
        key = real_read(path)
        if path == store.path:
            rotating.finish_rotation()  # between the read and the look for `.next`
        return key

    monkeypatch.setattr(keystore, "_read_or_create", read_then_finish)
    fresh.encrypt_tmk(TERMINAL, CASES[0].tmk)  # loads: the old key, then the rotation ends
    monkeypatch.setattr(keystore, "_read_or_create", real_read_or_create)
    sealed = fresh.encrypt_tmk(TERMINAL, CASES[0].tmk)
    assert FileKeyStore(store.path).decrypt_tmk(TERMINAL, sealed) == CASES[0].tmk


def test_a_sealed_tmk_matches_only_its_key_and_terminal(store: FileKeyStore) -> None:
    """`seal_tmk` gives what the key store opens, without the key in it; `tmk_matches` says
    same or not and never returns the key; another terminal's blob is a module error."""
    module = SoftwareSecurityModule(store)
    tmk = CASES[0].tmk
    sealed = module.seal_tmk(TERMINAL, tmk)
    assert tmk not in sealed and store.decrypt_tmk(TERMINAL, sealed) == tmk
    assert module.tmk_matches(TERMINAL, sealed, tmk)
    assert not module.tmk_matches(TERMINAL, sealed, bytes(len(tmk)))
    with pytest.raises(SecurityModuleError, match="terminal 10000002") as raised:
        module.tmk_matches("10000002", sealed, tmk)
    assert tmk.hex() not in str(raised.value).lower()


def test_a_pin_reference_is_the_same_in_every_process(store: FileKeyStore) -> None:
    """The same card and PIN give the same reference from another module on the same key
    file (so a load tells an unchanged PIN), the HMAC earlier versions stored; another PIN
    gives another."""
    case = CASES[0]
    reference = SoftwareSecurityModule(store).pin_reference(case.card_number, case.pin)
    again = SoftwareSecurityModule(FileKeyStore(store.path))
    assert again.pin_reference(case.card_number, case.pin) == reference
    assert reference == store.pin_hmac(case.card_number, case.pin)
    assert again.pin_reference(case.card_number, "999999") != reference


def test_no_track_decryption_without_a_tdk(store: FileKeyStore) -> None:
    """Keys issued without a TDK refuse to decrypt a track (the gateway answers `30`)."""
    case = CASES[0]
    module = vector_module(store, case)
    sealed_tmk = store.encrypt_tmk(TERMINAL, case.tmk)
    keys = module.issue_working_keys(TERMINAL, case.suite, sealed_tmk, with_tdk=False).handle
    with pytest.raises(CodecError):
        module.decrypt_track(keys, case.data["track2_encrypted"])


def test_handles_never_show_their_keys_and_belong_to_their_module(store: FileKeyStore) -> None:
    """A handle's repr names the suite only; a handle the module did not make is refused."""
    module, keys = issued_handle(store, CASES[0])
    text = repr(keys) + repr(vars(keys)) if hasattr(keys, "__dict__") else repr(keys)
    for key in (CASES[0].pik, CASES[0].mak, CASES[0].tdk):
        assert key.hex() not in text.lower() and repr(key) not in text

    class Foreign:
        suite = Suite.TDES
        has_tdk = False

    with pytest.raises(TypeError):
        module.mac(Foreign(), b"data")


@dataclass(frozen=True)
class Slot:
    """The fake device's handle: a slot number; the keys stay inside the device."""

    number: int
    suite: Suite
    has_tdk: bool


class FakeHsm:
    """Another `SecurityModule`, as a hardware one would be, on no master key file at all:
    handles are slot numbers; TMKs, stored working keys and the PIN key live under the
    device's own local master keys (LMKs, by generation, so it can rotate them); and it
    records what the gateway asked of it."""

    def __init__(self) -> None:
        self._lmks = {1: AESGCM.generate_key(128)}
        self._newest = 1
        self._pin_key = os.urandom(32)
        self._slots: dict[int, WorkingKeys] = {}
        self.calls: Counter[str] = Counter()

    def seal(self, plain: bytes, label: str) -> bytes:
        nonce = os.urandom(12)
        body = AESGCM(self._lmks[self._newest]).encrypt(nonce, plain, label.encode())
        return bytes([self._newest]) + nonce + body

    def open(self, sealed: bytes, label: str) -> bytes:
        lmk = self._lmks.get(sealed[0])
        if lmk is None:
            raise SecurityModuleError(f"{label}: under an LMK the device no longer has")
        try:
            return AESGCM(lmk).decrypt(sealed[1:13], sealed[13:], label.encode())
        except InvalidTag:
            raise SecurityModuleError(f"{label}: does not open") from None

    def _load(self, suite: Suite, keys: WorkingKeys) -> Slot:
        number = len(self._slots) + 1
        self._slots[number] = keys
        return Slot(number, suite, keys.tdk is not None)

    def _keys(self, handle: KeyHandle) -> WorkingKeys:
        assert isinstance(handle, Slot)
        return self._slots[handle.number]

    def issue_working_keys(
        self, terminal_id: str, suite: Suite, sealed_tmk: bytes, *, with_tdk: bool
    ) -> IssuedKeys:
        self.calls["issue"] += 1
        tmk = self.open(sealed_tmk, f"tmk {terminal_id}")
        keys = generate_working_keys(suite, with_tdk)
        plain = keys.pik + keys.mak + (keys.tdk or b"")
        sealed = self.seal(plain, f"session {terminal_id}")
        return IssuedKeys(wrap_working_keys(suite, tmk, keys), sealed, self._load(suite, keys))

    def open_keys(self, terminal_id: str, suite: Suite, sealed: bytes) -> KeyHandle:
        self.calls["open"] += 1
        plain = self.open(sealed, f"session {terminal_id}")
        tdk = plain[32:] or None
        return self._load(suite, WorkingKeys(pik=plain[:16], mak=plain[16:32], tdk=tdk))

    def verify_mac(self, keys: KeyHandle, mac_input: bytes, received: bytes) -> bool:
        self.calls["verify_mac"] += 1
        return hmac.compare_digest(mac(keys.suite, self._keys(keys).mak, mac_input), received)

    def mac(self, keys: KeyHandle, mac_input: bytes) -> bytes:
        self.calls["mac"] += 1
        return mac(keys.suite, self._keys(keys).mak, mac_input)

    def decrypt_track(self, keys: KeyHandle, track: str) -> str:
        self.calls["decrypt_track"] += 1
        tdk = self._keys(keys).tdk
        assert tdk is not None
        return decrypt_track(keys.suite, tdk, track)

    def check_pin(
        self, keys: KeyHandle, block: bytes, card_number: str, pin_reference: bytes | None
    ) -> PinCheck:
        self.calls["check_pin"] += 1
        try:
            pin = decrypt_pin(keys.suite, self._keys(keys).pik, block, card_number)
        except PinBlockError:
            return PinCheck.BAD_BLOCK
        if pin_reference is None:
            return PinCheck.SOUND
        matches = hmac.compare_digest(self._reference(card_number, pin), pin_reference)
        return PinCheck.MATCH if matches else PinCheck.NO_MATCH

    def seal_tmk(self, terminal_id: str, tmk: bytes) -> bytes:
        self.calls["seal_tmk"] += 1
        return self.seal(tmk, f"tmk {terminal_id}")

    def tmk_matches(self, terminal_id: str, sealed_tmk: bytes, tmk: bytes) -> bool:
        self.calls["tmk_matches"] += 1
        return hmac.compare_digest(self.open(sealed_tmk, f"tmk {terminal_id}"), tmk)

    def pin_reference(self, card_number: str, pin: str) -> bytes:
        self.calls["pin_reference"] += 1
        return self._reference(card_number, pin)

    def _reference(self, card_number: str, pin: str) -> bytes:
        return hmac.digest(self._pin_key, f"{card_number}:{pin}".encode(), "sha256")

    def begin_rotation(self) -> MasterKeyRotation:
        self.calls["begin_rotation"] += 1
        if self._newest == min(self._lmks):
            self._newest += 1
            self._lmks[self._newest] = AESGCM.generate_key(128)
        return FakeRotation(self)

    def finish_rotation(self) -> None:
        self._lmks = {self._newest: self._lmks[self._newest]}


class FakeRotation:
    """The device's LMK change: keys translated from the old LMK to the new one."""

    def __init__(self, hsm: FakeHsm) -> None:
        self._hsm = hsm

    def reseal_tmk(self, terminal_id: str, sealed_tmk: bytes) -> bytes:
        self._hsm.calls["reseal_tmk"] += 1
        label = f"tmk {terminal_id}"
        return self._hsm.seal(self._hsm.open(sealed_tmk, label), label)

    def reseal_session_keys(self, terminal_id: str, sealed: bytes) -> bytes:
        self._hsm.calls["reseal_session_keys"] += 1
        label = f"session {terminal_id}"
        return self._hsm.seal(self._hsm.open(sealed, label), label)

    def finish(self) -> None:
        self._hsm.finish_rotation()


def hsm_harness(tmp_path: Path, ledger_url: str) -> tuple[Harness, FakeHsm]:
    """The demo config loaded into a fresh ledger through a fake HSM."""
    hsm = FakeHsm()
    return Harness(demo_config(tmp_path, ledger_url), security=hsm), hsm


def test_the_gateway_works_with_another_security_module(tmp_path: Path, ledger_url: str) -> None:
    """With a fake HSM in place of the software module the gateway signs on, checks MACs,
    decrypts tracks, checks PINs and MACs answers, all through the module's interface."""
    harness, hsm = hsm_harness(tmp_path, ledger_url)
    terminal = harness.signed_on(with_tdk=True)
    _, approved = harness.redeem(terminal, GOLD_PIN, 1000, pin="123456", encrypted=True)
    assert approved.code == "00" and 64 in approved.fields
    assert harness.redeem(terminal, GOLD_PIN, 1000, pin="654321")[1].code == "55"
    assert {"issue", "verify_mac", "mac", "decrypt_track", "check_pin"} <= set(hsm.calls)
    assert hsm.calls["open"] == 0
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"  # through another process:
    harness.gateway = harness.new_gateway(hsm)
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"
    assert hsm.calls["open"] == 1
    harness.engine.dispose()


def test_another_security_module_loads_the_config_and_rotates(
    tmp_path: Path, ledger_url: str
) -> None:
    """The fake HSM takes the whole job: it seals the TMKs and makes the PIN references of a
    config load, tells a second load that nothing changed, and rotates its master key with a
    terminal signed on, which carries on; the master key file is never made."""
    harness, hsm = hsm_harness(tmp_path, ledger_url)
    # Sealed: three TMKs and the master key's check; PIN references: the one card with a
    # PIN, and the PIN key's check value (loader).
    assert (hsm.calls["seal_tmk"], hsm.calls["pin_reference"]) == (4, 2)
    with unit_of_work(harness.engine) as session:
        again = load_into_ledger(session, harness.config, hsm, harness.clock.now())
    # Three TMKs and the master key's check compared.
    assert again.changes == () and hsm.calls["tmk_matches"] == 4
    terminal = harness.signed_on(with_tdk=True)
    with unit_of_work(harness.engine) as session:
        old_tmk = session.scalars(select(Terminal.tmk_encrypted).filter_by(id=TERMINAL)).one()

    rotation = rotate_master(harness.engine, hsm)

    assert (rotation.terminals, rotation.sessions) == (3, 1)
    with pytest.raises(SecurityModuleError):
        hsm.tmk_matches(TERMINAL, old_tmk, bytes.fromhex(TMKS[TERMINAL][2]))
    approved = harness.redeem(terminal, GOLD_PIN, 1000, pin="123456", encrypted=True)[1]
    assert approved.code == "00"
    harness.gateway = harness.new_gateway(hsm)
    assert harness.redeem(terminal, GOLD_PIN, 1000, pin="123456")[1].code == "00"
    assert harness.signed_on("10000002").terminal_id == "10000002"
    assert hsm.calls["open"] == 1
    assert not harness.config.issuer.master_key.exists()
    harness.engine.dispose()

"""The software security module: the known answers of the shared vectors through its interface,
keys that cross it only sealed or as opaque handles, and PIN checks that never return a PIN."""

from __future__ import annotations

import hmac
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
from gateway.keystore import FileKeyStore
from gateway.security import (
    IssuedKeys,
    KeyHandle,
    PinCheck,
    SecurityModule,
    SecurityModuleError,
    SoftwareSecurityModule,
)
from tests.gateway_harness import DIAMOND, GOLD_PIN, Harness, demo_config
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
    """The vectors' PIN block: match against its card's PIN HMAC, no match against another."""
    module, keys = issued_handle(store, case)
    block = case.frame("pin_block_encrypted")
    right = store.pin_hmac(case.card_number, case.pin)
    wrong = store.pin_hmac(case.card_number, "999999")
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
    """Another `SecurityModule`, as a hardware one would be: handles are slot numbers, stored
    keys are sealed under the device's own key (not the master key file), and it records what
    the gateway asked of it. It reads TMKs and PIN HMACs through the key store, as a device
    would hold them under its own key."""

    def __init__(self, keystore: FileKeyStore) -> None:
        self._keystore = keystore
        self._device_key = AESGCM(AESGCM.generate_key(128))
        self._slots: dict[int, WorkingKeys] = {}
        self.calls: Counter[str] = Counter()

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
        tmk = self._keystore.decrypt_tmk(terminal_id, sealed_tmk)
        keys = generate_working_keys(suite, with_tdk)
        nonce = os.urandom(12)
        plain = keys.pik + keys.mak + (keys.tdk or b"")
        sealed = nonce + self._device_key.encrypt(nonce, plain, terminal_id.encode())
        return IssuedKeys(wrap_working_keys(suite, tmk, keys), sealed, self._load(suite, keys))

    def open_keys(self, terminal_id: str, suite: Suite, sealed: bytes) -> KeyHandle:
        self.calls["open"] += 1
        plain = self._device_key.decrypt(sealed[:12], sealed[12:], terminal_id.encode())
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
        self, keys: KeyHandle, block: bytes, card_number: str, pin_hmac: bytes
    ) -> PinCheck:
        self.calls["check_pin"] += 1
        try:
            pin = decrypt_pin(keys.suite, self._keys(keys).pik, block, card_number)
        except PinBlockError:
            return PinCheck.BAD_BLOCK
        matches = self._keystore.pin_matches(card_number, pin, pin_hmac)
        return PinCheck.MATCH if matches else PinCheck.NO_MATCH


def test_the_gateway_works_with_another_security_module(tmp_path: Path, ledger_url: str) -> None:
    """With a fake HSM in place of the software module the gateway signs on, checks MACs,
    decrypts tracks, checks PINs and MACs answers, all through the module's interface."""
    harness = Harness(demo_config(tmp_path, ledger_url))
    hsm = FakeHsm(harness.keystore)
    harness.gateway = harness.new_gateway(hsm)
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

"""Every use of the master key behind one small interface, so a hardware module can replace it.

The gateway holds two kinds of secret at rest: terminal master keys (encrypted, because the
gateway must use them again) and card PINs (never stored, only an HMAC to compare against).
Both hang off one master key. `KeyStore` is all the rest of the gateway may ask of it: seal
and open a TMK, compute and check a PIN HMAC. `FileKeyStore` keeps the master key in a file
of 32 random bytes readable by its owner only; an HSM-backed store would implement the same
four methods and never let the key leave the module.

No key, TMK or PIN ever appears in a message, a repr or a traceback's exception chain: the
errors raised here name the file or the terminal, never a value, and are raised `from None`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.errors import BadInput
from gateway.secret_files import create_private_file, read_private_file

MASTER_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
# The first byte of a sealed TMK says how it was sealed, so a later scheme (a new master key,
# an HSM) can tell its own blobs from these.
SEALED_FORMAT = b"\x01"
TMK_LABEL = b"vipgate tmk"
PIN_LABEL = b"vipgate pin"
PIN_DIGITS = range(4, 13)


class KeyStoreError(Exception):
    """A sealed key that does not open under this master key (wrong key, or tampered)."""


class KeyStore(Protocol):
    """What the gateway may ask of the master key; nothing here hands the key out."""

    def encrypt_tmk(self, terminal_id: str, tmk: bytes) -> bytes:
        """The TMK encrypted for storage, bound to its terminal."""
        ...

    def decrypt_tmk(self, terminal_id: str, sealed: bytes) -> bytes:
        """The TMK of a sealed blob; `KeyStoreError` if it was not sealed for this terminal."""
        ...

    def pin_hmac(self, card_number: str, pin: str) -> bytes:
        """The value stored in place of a card's PIN."""
        ...

    def pin_matches(self, card_number: str, pin: str, expected: bytes) -> bool:
        """Whether a PIN entered for a card gives the stored HMAC (constant time)."""
        ...


class _Secret:
    """Key bytes that never show themselves in a repr, a log line or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"


def _derive(master: bytes, label: bytes) -> _Secret:
    """A 32-byte key for one purpose, so the TMK and PIN keys are independent of each other."""
    return _Secret(HKDF(hashes.SHA256(), MASTER_KEY_BYTES, salt=None, info=label).derive(master))


class FileKeyStore:
    """The master key in a file (made on first use, owner-only); derived keys in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmk_key: _Secret | None = None
        self._pin_key: _Secret | None = None

    def __repr__(self) -> str:
        return f"FileKeyStore(path={str(self.path)!r})"

    def encrypt_tmk(self, terminal_id: str, tmk: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        aead = AESGCM(self._keys()[0].reveal())
        return SEALED_FORMAT + nonce + aead.encrypt(nonce, tmk, _terminal_aad(terminal_id))

    def decrypt_tmk(self, terminal_id: str, sealed: bytes) -> bytes:
        if len(sealed) < 1 + NONCE_BYTES + TAG_BYTES or sealed[:1] != SEALED_FORMAT:
            raise KeyStoreError(
                f"terminal {terminal_id}: the stored TMK is not an encrypted key of this store"
            )
        nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        aead = AESGCM(self._keys()[0].reveal())
        try:
            return aead.decrypt(nonce, body, _terminal_aad(terminal_id))
        except InvalidTag:
            raise KeyStoreError(
                f"terminal {terminal_id}: the stored TMK does not open under the master key "
                f"{self.path} (another master key, or not sealed for this terminal)"
            ) from None

    def pin_hmac(self, card_number: str, pin: str) -> bytes:
        message = _pin_message(card_number, pin)
        return hmac.new(self._keys()[1].reveal(), message, hashlib.sha256).digest()

    def pin_matches(self, card_number: str, pin: str, expected: bytes) -> bool:
        return hmac.compare_digest(self.pin_hmac(card_number, pin), expected)

    def _keys(self) -> tuple[_Secret, _Secret]:
        """The derived keys, reading (or first making) the master key file once."""
        if self._tmk_key is None or self._pin_key is None:
            master = _read_or_create(self.path)
            self._tmk_key = _derive(master.reveal(), TMK_LABEL)
            self._pin_key = _derive(master.reveal(), PIN_LABEL)
        return self._tmk_key, self._pin_key


def _terminal_aad(terminal_id: str) -> bytes:
    return terminal_id.encode("ascii")


def _pin_message(card_number: str, pin: str) -> bytes:
    """Card number + PIN as bytes; both are checked so that the pair is never ambiguous."""
    if not (card_number.isascii() and card_number.isdigit()):
        raise ValueError("card number must be ASCII digits")
    if not (len(pin) in PIN_DIGITS and pin.isascii() and pin.isdigit()):
        raise ValueError("PIN must be 4-12 ASCII digits")
    return card_number.encode("ascii") + pin.encode("ascii")


# --- the master key file ------------------------------------------------------------------


def _read_or_create(path: Path) -> _Secret:
    if not path.exists():
        _create(path)
    return _read(path)


def _create(path: Path) -> None:
    """32 random bytes at `path`, owner-only, unless another process made the key first."""
    create_private_file(path, secrets.token_bytes(MASTER_KEY_BYTES), "master key")


def _read(path: Path) -> _Secret:
    """The master key, refused when the file is not a private 32-byte regular file."""
    data = read_private_file(path, "master key", MASTER_KEY_BYTES + 1)
    if len(data) != MASTER_KEY_BYTES:
        raise BadInput(f"master key {path}: must be exactly {MASTER_KEY_BYTES} bytes")
    return _Secret(data)

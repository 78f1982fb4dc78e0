"""The master key file and what is sealed under it: the key material the software security
module keeps at rest.

The gateway holds three kinds of secret at rest: terminal master keys and the working keys of
signed-on terminals (encrypted, because the gateway must use them again, from any process) and
card PINs (never stored, only an HMAC to compare against). All hang off one master key.
`FileKeyStore` keeps the master key in a file of 32 random bytes readable by its owner only,
and the PIN key sealed under it beside it. Only `gateway.security.SoftwareSecurityModule` uses
it: the rest of the gateway asks `SecurityModule`, which an HSM can implement without a file.

No key, TMK or PIN ever appears in a message, a repr or a traceback's exception chain: the
errors raised here name the file or the terminal, never a value, and are raised `from None`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.errors import BadInput
from gateway.secret_files import create_private_file, read_private_file, replace_private_file

MASTER_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_BYTES = 4
# The first byte of a sealed blob says how it was sealed. 1: under the key derived from the one
# master key; 2: followed by the id of the master key it was sealed under, so that during a
# rotation blobs of the old and the new master key can both be opened.
LEGACY_FORMAT = b"\x01"
SEALED_FORMAT = b"\x02"
TMK_LABEL = b"vipgate tmk"
# Associated data of a session's sealed working keys: never equal to a terminal id (the TMKs'),
# so a sealed TMK can never be opened as working keys or the other way round.
SESSION_AAD_PREFIX = b"vipgate session keys:"
PIN_LABEL = b"vipgate pin"
PIN_KEY_AAD = b"vipgate pin key"
PIN_DIGITS = range(4, 13)


class KeyStoreError(Exception):
    """A sealed key that does not open under this master key (wrong key, or tampered)."""


class _UnrecognisedError(KeyStoreError):
    """Bytes that are not a blob this store seals at all."""


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


class _Master:
    """One master key: its id (4 bytes of its SHA-256, which tell nothing of it) and the key
    it seals with."""

    def __init__(self, key: _Secret) -> None:
        self.id = hashlib.sha256(key.reveal()).digest()[:KEY_ID_BYTES]
        self.sealing = _derive(key.reveal(), TMK_LABEL)
        self.legacy_pin = _derive(key.reveal(), PIN_LABEL)

    def __repr__(self) -> str:
        return "<secret>"

    def seal(self, plain: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        body = AESGCM(self.sealing.reveal()).encrypt(nonce, plain, aad)
        return SEALED_FORMAT + self.id + nonce + body

    def open(self, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        return AESGCM(self.sealing.reveal()).decrypt(nonce, body, aad)


class FileKeyStore:
    """The master key in a file (made on first use, owner-only); the PIN key sealed under it in
    a file beside it (`<master>.pin`); during a rotation the next master key in `<master>.next`.

    Rotation (`begin_rotation`, `reseal_tmk` for each stored TMK, `finish_rotation`) can stop
    at any step and be run again: while `<master>.next` exists both keys open blobs and new
    blobs are sealed under the next one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._masters: dict[bytes, _Master] | None = None
        self._newest: _Master | None = None
        self._loaded_files: object = None  # `_files()` when loaded, or `_CHANGED_WHILE_READ`
        self._loaded_once = False
        self._pin_key: _Secret | None = None

    def __repr__(self) -> str:
        return f"FileKeyStore(path={str(self.path)!r})"

    @property
    def next_path(self) -> Path:
        return self.path.with_name(self.path.name + ".next")

    @property
    def pin_path(self) -> Path:
        return self.path.with_name(self.path.name + ".pin")

    # -- TMKs and PINs -------------------------------------------------------------------------

    def encrypt_tmk(self, terminal_id: str, tmk: bytes) -> bytes:
        return self._newest_master().seal(tmk, _terminal_aad(terminal_id))

    def decrypt_tmk(self, terminal_id: str, sealed: bytes) -> bytes:
        try:
            return self._open(sealed, _terminal_aad(terminal_id))
        except _UnrecognisedError:
            raise KeyStoreError(
                f"terminal {terminal_id}: the stored TMK is not an encrypted key of this store"
            ) from None
        except KeyStoreError:
            raise KeyStoreError(
                f"terminal {terminal_id}: the stored TMK does not open under the master key "
                f"{self.path} (another master key, or not sealed for this terminal)"
            ) from None

    def seal_session_keys(self, terminal_id: str, keys: bytes) -> bytes:
        return self._newest_master().seal(keys, _session_aad(terminal_id))

    def open_session_keys(self, terminal_id: str, sealed: bytes) -> bytes:
        try:
            return self._open(sealed, _session_aad(terminal_id))
        except KeyStoreError:
            raise KeyStoreError(
                f"terminal {terminal_id}: the session keys do not open under the master key "
                f"{self.path}"
            ) from None

    def pin_hmac(self, card_number: str, pin: str) -> bytes:
        message = _pin_message(card_number, pin)
        return hmac.new(self._pin().reveal(), message, hashlib.sha256).digest()

    def pin_matches(self, card_number: str, pin: str, expected: bytes) -> bool:
        return hmac.compare_digest(self.pin_hmac(card_number, pin), expected)

    # -- rotation ------------------------------------------------------------------------------

    @property
    def pin_next_path(self) -> Path:
        return self.path.with_name(self.path.name + ".pin.next")

    def begin_rotation(self) -> None:
        """Make the next master key (unless a rotation already began) and seal the PIN key
        under it, beside the PIN key file (`<master>.pin.next`), which stays sealed under the
        current key until `finish_rotation`: a rotation refused or given up (the next key
        removed) leaves the PIN key opening as before. From now on new blobs are sealed under
        the next key."""
        pin = self._pin()
        if not self.next_path.exists():
            create_private_file(self.next_path, secrets.token_bytes(MASTER_KEY_BYTES), "master key")
        self._masters = None
        replace_private_file(
            self.pin_next_path, self._newest_master().seal(pin.reveal(), PIN_KEY_AAD), "PIN key"
        )

    def reseal_tmk(self, terminal_id: str, sealed: bytes) -> bytes:
        """A stored TMK sealed again under the newest master key."""
        return self.encrypt_tmk(terminal_id, self.decrypt_tmk(terminal_id, sealed))

    def reseal_session_keys(self, terminal_id: str, sealed: bytes) -> bytes:
        """A session's stored working keys sealed again under the newest master key."""
        return self.seal_session_keys(terminal_id, self.open_session_keys(terminal_id, sealed))

    def finish_rotation(self) -> None:
        """The PIN key sealed under the next master key takes the PIN key file's place, then
        the next master key becomes the master key; the old one is gone. Stopped between the
        two, both keys are still there, and each file opens under one of them."""
        if self.pin_next_path.exists():
            os.replace(self.pin_next_path, self.pin_path)
        if self.next_path.exists():
            os.replace(self.next_path, self.path)
        self._masters = None

    # -- loading ---------------------------------------------------------------------------

    def _load(self) -> dict[bytes, _Master]:
        if self._masters is None:
            # The files as they are before they are read, and after: a rotation that
            # finishes while they are read (or the key made here) leaves the two different,
            # and then the next seal reads them again. (Taken after only, a rotation in
            # between matched the new files with the old key held, sealing under a key gone.)
            before = self._files()
            if not self._loaded_once:  # the first load: the key is made on first use
                current = _Master(_read_or_create(self.path))
            else:  # again, the files having changed: never a new key under running work
                current = _Master(self._read_again(self.path))
            masters = {current.id: current}
            self._newest = current
            if self.next_path.exists():
                following = _Master(self._read_again(self.next_path))
                masters[following.id] = following
                self._newest = following
            self._masters = masters
            self._loaded_once = True
            after = self._files()
            self._loaded_files = after if after == before else _CHANGED_WHILE_READ
        return self._masters

    def _files(self) -> tuple[object, object]:
        """What identifies the key files on disk: a rotation by another process changes it."""
        return (_identity(self.path), _identity(self.next_path))

    def _read_again(self, path: Path) -> _Secret:
        """A master key file read once more, after it changed on disk (a rotation by another
        process): a file gone or unreadable is a `KeyStoreError` naming it (the request that
        needed it is declined `96`), never a new key made in its place. A gateway that made
        one sealed a terminal's working keys under a key no other instance holds, and
        stopped opening every TMK the ledger had."""
        if not self._loaded_once:
            return _read(path)
        try:
            return _read(path)
        except BadInput as error:
            self._masters = None  # looked at again on the next use
            raise KeyStoreError(
                f"{error}; give it back (it is not made anew while serving)"
            ) from None

    def _newest_master(self) -> _Master:
        """The key new blobs are sealed under. Sealing is rare (a sign-on, a load), so the
        files are looked at each time: a running gateway must not keep sealing under a master
        key that another process's rotation is replacing."""
        if self._masters is not None and self._files() != self._loaded_files:
            self._masters = None
        self._load()
        assert self._newest is not None  # set by _load
        return self._newest

    def _open(self, sealed: bytes, aad: bytes) -> bytes:
        masters = self._load()
        header = 1 + KEY_ID_BYTES
        if sealed[:1] == SEALED_FORMAT and sealed[1:header] not in masters:
            # Sealed under a key this process has not read yet: another process rotated.
            self._masters = None
            masters = self._load()
        if sealed[:1] == LEGACY_FORMAT and len(sealed) >= 1 + NONCE_BYTES + TAG_BYTES:
            nonce, body, candidates = sealed[1:13], sealed[13:], list(masters.values())
        elif sealed[:1] == SEALED_FORMAT and len(sealed) >= header + NONCE_BYTES + TAG_BYTES:
            master = masters.get(sealed[1:header])
            nonce, body = sealed[header : header + NONCE_BYTES], sealed[header + NONCE_BYTES :]
            candidates = [master] if master is not None else []
        else:
            raise _UnrecognisedError("not a blob sealed by this store")
        for master in candidates:
            try:
                return master.open(nonce, body, aad)
            except InvalidTag:
                continue
        raise KeyStoreError("does not open under the master key")

    def _pin(self) -> _Secret:
        """The PIN key: sealed in its own file so that it outlives a master key rotation. Made
        on first use as the key earlier versions derived from the master key, so PIN HMACs
        stored before keep matching."""
        if self._pin_key is None:
            if not self.pin_path.exists():
                current = self._newest_master()
                sealed = current.seal(current.legacy_pin.reveal(), PIN_KEY_AAD)
                create_private_file(self.pin_path, sealed, "PIN key")
            sealed = read_private_file(self.pin_path, "PIN key", 256)
            try:
                self._pin_key = _Secret(self._open(sealed, PIN_KEY_AAD))
            except KeyStoreError:
                raise BadInput(
                    f"PIN key {self.pin_path}: does not open under the master key {self.path}"
                ) from None
        return self._pin_key


def _terminal_aad(terminal_id: str) -> bytes:
    return terminal_id.encode("ascii")


def _session_aad(terminal_id: str) -> bytes:
    return SESSION_AAD_PREFIX + terminal_id.encode("ascii")


def _identity(path: Path) -> object:
    """The file's inode and change time, or None when it does not exist."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return (status.st_ino, status.st_mtime_ns, status.st_size)


def _pin_message(card_number: str, pin: str) -> bytes:
    """Card number + PIN as bytes; both are checked so that the pair is never ambiguous."""
    if not (card_number.isascii() and card_number.isdigit()):
        raise ValueError("card number must be ASCII digits")
    if not (len(pin) in PIN_DIGITS and pin.isascii() and pin.isdigit()):
        raise ValueError("PIN must be 4-12 ASCII digits")
    return card_number.encode("ascii") + pin.encode("ascii")


# --- the master key file ------------------------------------------------------------------


# Never equal to `FileKeyStore._files()`: files that changed while they were read are read again.
_CHANGED_WHILE_READ = object()


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

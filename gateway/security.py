"""Every use of a working key or a TMK behind one small interface, so that a hardware security
module (HSM) can take its place (issue 7).

The gateway asks five things of keys while it serves: issue working keys at a sign-on, check a
request's MAC, MAC an answer, decrypt a track, and say whether a PIN block holds the card's PIN.
`SecurityModule` is exactly that, plus opening the working keys a sign-on stored. Keys cross it
only sealed (the TMK as the ledger keeps it, the working keys as the session table keeps them,
field 62 under the TMK) or as an opaque `KeyHandle`; a PIN never crosses it at all: the answer
is match, no match or bad block. An HSM implementation would hold its handles as keys under its
own local master key and do every operation inside the device.

`SoftwareSecurityModule` does the work in this process with `cardcodec.crypto` and seals what
it stores through the `KeyStore` (the master key file).
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cardcodec.crypto import (
    KEY_BYTES,
    Suite,
    WorkingKeys,
    decrypt_pin,
    decrypt_track,
    generate_working_keys,
    mac,
    verify_mac,
    wrap_working_keys,
)
from cardcodec.errors import CodecError, PinBlockError
from gateway.keystore import KeyStore, KeyStoreError

# The sealed working keys start with the suite they are for, so a row whose suite column was
# changed does not open as keys of the other suite.
_SUITE_TAGS = {Suite.TDES: b"T", Suite.SM4: b"S"}


class PinCheck(enum.Enum):
    """What a PIN block says about a card's PIN; the PIN itself never leaves the module."""

    MATCH = "match"
    NO_MATCH = "no match"
    BAD_BLOCK = "bad block"  # not a valid format 0 block under this PIK: `99`, not a try


class KeyHandle(Protocol):
    """A session's working keys as the module holds them: opaque to the gateway, which may only
    ask which suite they are for and whether there is a TDK (§5.4 needs to know)."""

    @property
    def suite(self) -> Suite: ...

    @property
    def has_tdk(self) -> bool: ...


@dataclass(frozen=True)
class IssuedKeys:
    """A sign-on's fresh working keys three ways: field 62 for the 0810 (under the TMK), sealed
    for the session table, and a handle for this process to use at once."""

    field62: bytes
    sealed: bytes
    handle: KeyHandle


class SecurityModuleError(Exception):
    """Sealed keys the module cannot open (another master key, tampered, another terminal)."""


class SecurityModule(Protocol):
    """All the key work the serving gateway does; nothing here returns a clear key or PIN."""

    def issue_working_keys(
        self, terminal_id: str, suite: Suite, sealed_tmk: bytes, *, with_tdk: bool
    ) -> IssuedKeys:
        """Fresh PIK, MAK (and TDK) for a sign-on, wrapped under the terminal's TMK."""
        ...

    def open_keys(self, terminal_id: str, suite: Suite, sealed: bytes) -> KeyHandle:
        """A handle on working keys stored at a sign-on; `SecurityModuleError` if they do not
        open for this terminal and suite."""
        ...

    def verify_mac(self, keys: KeyHandle, mac_input: bytes, received: bytes) -> bool:
        """Whether `received` is the MAC of `mac_input` under the session's MAK (§5.1)."""
        ...

    def mac(self, keys: KeyHandle, mac_input: bytes) -> bytes:
        """Field 64 for an answer under the session's MAK."""
        ...

    def decrypt_track(self, keys: KeyHandle, track: str) -> str:
        """Field 35 with its TDK-encrypted block decrypted (§5.4); `CodecError` when it cannot
        be (no TDK, too short, not hex)."""
        ...

    def check_pin(
        self, keys: KeyHandle, block: bytes, card_number: str, pin_hmac: bytes
    ) -> PinCheck:
        """Whether the PIN block, under the session's PIK, holds the PIN whose HMAC is stored
        for the card (§5.3)."""
        ...


@dataclass(frozen=True, repr=False)
class _SoftwareKeys:
    """The software module's handle: the clear keys, which never print."""

    suite: Suite
    keys: WorkingKeys

    @property
    def has_tdk(self) -> bool:
        return self.keys.tdk is not None

    def __repr__(self) -> str:
        return f"<working keys {self.suite.value}>"


class SoftwareSecurityModule:
    """The security module in this process: `cardcodec.crypto` for the card cryptography, the
    key store for the master key (TMKs, sealed working keys, PIN HMACs)."""

    def __init__(
        self, keystore: KeyStore, random_bytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> None:
        self._keystore = keystore
        self._random = random_bytes

    def __repr__(self) -> str:
        return f"SoftwareSecurityModule({self._keystore!r})"

    def issue_working_keys(
        self, terminal_id: str, suite: Suite, sealed_tmk: bytes, *, with_tdk: bool
    ) -> IssuedKeys:
        try:
            tmk = self._keystore.decrypt_tmk(terminal_id, sealed_tmk)
        except KeyStoreError as error:
            raise SecurityModuleError(str(error)) from None
        keys = generate_working_keys(suite, with_tdk, self._random)
        field62 = wrap_working_keys(suite, tmk, keys)
        sealed = self._keystore.seal_session_keys(terminal_id, _pack(suite, keys))
        return IssuedKeys(field62, sealed, _SoftwareKeys(suite, keys))

    def open_keys(self, terminal_id: str, suite: Suite, sealed: bytes) -> KeyHandle:
        try:
            plain = self._keystore.open_session_keys(terminal_id, sealed)
        except KeyStoreError as error:
            raise SecurityModuleError(str(error)) from None
        return _SoftwareKeys(suite, _unpack(terminal_id, suite, plain))

    def verify_mac(self, keys: KeyHandle, mac_input: bytes, received: bytes) -> bool:
        held = _held(keys)
        return verify_mac(held.suite, held.keys.mak, mac_input, received)

    def mac(self, keys: KeyHandle, mac_input: bytes) -> bytes:
        held = _held(keys)
        return mac(held.suite, held.keys.mak, mac_input)

    def decrypt_track(self, keys: KeyHandle, track: str) -> str:
        held = _held(keys)
        if held.keys.tdk is None:
            raise CodecError("no TDK for an encrypted track", field=35)
        return decrypt_track(held.suite, held.keys.tdk, track)

    def check_pin(
        self, keys: KeyHandle, block: bytes, card_number: str, pin_hmac: bytes
    ) -> PinCheck:
        held = _held(keys)
        try:
            pin = decrypt_pin(held.suite, held.keys.pik, block, card_number)
        except PinBlockError:
            return PinCheck.BAD_BLOCK
        if self._keystore.pin_matches(card_number, pin, pin_hmac):
            return PinCheck.MATCH
        return PinCheck.NO_MATCH


def _held(keys: KeyHandle) -> _SoftwareKeys:
    """The software module works only with its own handles (an HSM's would mean nothing)."""
    if not isinstance(keys, _SoftwareKeys):
        raise TypeError("a key handle of another security module")
    return keys


def _pack(suite: Suite, keys: WorkingKeys) -> bytes:
    return _SUITE_TAGS[suite] + keys.pik + keys.mak + (keys.tdk or b"")


def _unpack(terminal_id: str, suite: Suite, plain: bytes) -> WorkingKeys:
    body = plain[1:]
    if plain[:1] != _SUITE_TAGS[suite] or len(body) not in (2 * KEY_BYTES, 3 * KEY_BYTES):
        raise SecurityModuleError(
            f"terminal {terminal_id}: the session keys are not for {suite.value}"
        )
    tdk = body[2 * KEY_BYTES :] or None
    return WorkingKeys(pik=body[:KEY_BYTES], mak=body[KEY_BYTES : 2 * KEY_BYTES], tdk=tdk)

"""Every use of a key behind one small interface, so that a hardware security module (HSM) can
take its place (issue 7).

`SecurityModule` is everything the gateway asks of keys, in three parts:

- serving: issue working keys at a sign-on, open the working keys a sign-on stored, check a
  request's MAC, MAC an answer, decrypt a track, and say whether a PIN block holds the card's
  PIN;
- loading the config: seal a terminal's TMK for the ledger, say whether a stored sealed TMK is
  the config's (so an unchanged key is not rewritten), and make the reference stored in place
  of a card's PIN;
- rotating the master key (`begin_rotation`, then `MasterKeyRotation`): seal every stored TMK
  and session again under a new key.

What never leaves the module: the master key, working keys in clear (they cross only sealed for
the session table, wrapped under the TMK in field 62, or as an opaque `KeyHandle`), a TMK in
clear (the config's goes in to be sealed or compared; none comes out) and a PIN (the config's
goes in to make its reference; a PIN block's comes out only as match, no match or bad block).
An HSM implementation would hold its handles as keys under its own local master key and do
every operation inside the device.

`SoftwareSecurityModule` does the work in this process with `cardcodec.crypto` and keeps what
it stores sealed under the master key file (`gateway.keystore.FileKeyStore`).
"""

from __future__ import annotations

import enum
import hmac
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
    forget_keys,
    generate_working_keys,
    mac,
    verify_mac,
    wrap_working_keys,
)
from cardcodec.errors import CodecError, PinBlockError
from gateway.errors import BadInput
from gateway.keystore import FileKeyStore, KeyStoreError

# The sealed working keys start with the suite they are for, so a row whose suite column was
# changed does not open as keys of the other suite.
_SUITE_TAGS = {Suite.TDES: b"T", Suite.SM4: b"S"}


class PinCheck(enum.Enum):
    """What a PIN block says about a card's PIN; the PIN itself never leaves the module."""

    MATCH = "match"
    NO_MATCH = "no match"
    BAD_BLOCK = "bad block"  # not a valid format 0 block under this PIK: `99`, not a try
    SOUND = "sound"  # a valid block, for a card without a PIN (none to compare it with)


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


class MasterKeyRotation(Protocol):
    """A master key rotation under way, from `SecurityModule.begin_rotation` to `finish`.

    Until `finish` the old and the new master key both open what they sealed and everything
    newly sealed is under the new one, so a rotation stopped at any step leaves every stored
    key usable, and beginning again carries it on. PIN references are one-way and outlive a
    rotation: it never touches cards.
    """

    def reseal_tmk(self, terminal_id: str, sealed_tmk: bytes) -> bytes:
        """A stored TMK sealed again under the new master key; `SecurityModuleError` if it
        does not open."""
        ...

    def reseal_session_keys(self, terminal_id: str, sealed: bytes) -> bytes:
        """A stored session's working keys sealed again under the new master key;
        `SecurityModuleError` if they do not open."""
        ...

    def finish(self) -> None:
        """The new master key replaces the old one, which opens nothing from now on."""
        ...


class SecurityModule(Protocol):
    """All the key work of the gateway; nothing here returns a clear key or PIN."""

    # -- serving ---------------------------------------------------------------------------

    def issue_working_keys(
        self, terminal_id: str, suite: Suite, sealed_tmk: bytes, *, with_tdk: bool
    ) -> IssuedKeys:
        """Fresh PIK, MAK (and TDK) for a sign-on, wrapped under the terminal's TMK."""
        ...

    def open_keys(self, terminal_id: str, suite: Suite, sealed: bytes) -> KeyHandle:
        """A handle on working keys stored at a sign-on; `SecurityModuleError` if they do not
        open for this terminal and suite."""
        ...

    def retire_keys(self, keys: KeyHandle) -> None:
        """The session is over (signed on again, or off): let go of what the module keeps
        for these keys (a software module: its cipher contexts)."""
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
        self, keys: KeyHandle, block: bytes, card_number: str, pin_reference: bytes | None
    ) -> PinCheck:
        """Whether the PIN block, under the session's PIK, holds the PIN whose reference is
        stored for the card (§5.3); `SecurityModuleError` when the PIN key cannot be had
        (the request is then `96`). Without a reference (a card without a PIN), only whether
        the block is a valid one for that card: `SOUND` or `BAD_BLOCK`."""
        ...

    # -- loading the config ----------------------------------------------------------------

    def seal_tmk(self, terminal_id: str, tmk: bytes) -> bytes:
        """The config's TMK sealed for the ledger, bound to its terminal: what
        `issue_working_keys` takes."""
        ...

    def tmk_matches(self, terminal_id: str, sealed_tmk: bytes, tmk: bytes) -> bool:
        """Whether a stored sealed TMK is this TMK (a load keeps an unchanged key's row as it
        is); `SecurityModuleError` if it does not open. An HSM compares check values."""
        ...

    def pin_reference(self, card_number: str, pin: str) -> bytes:
        """What the ledger stores in place of a card's PIN, for `check_pin`. The same card and
        PIN always give the same bytes, so a load can tell a PIN that did not change (and
        leave its wrong tries alone)."""
        ...

    # -- rotating the master key -----------------------------------------------------------

    def begin_rotation(self) -> MasterKeyRotation:
        """Make the next master key (or take up the rotation already begun) and seal under
        it from now on."""
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
    master key file for what is kept at rest (TMKs, sealed working keys, the PIN key)."""

    def __init__(
        self, keystore: FileKeyStore, random_bytes: Callable[[int], bytes] = secrets.token_bytes
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
        try:
            sealed = self._keystore.seal_session_keys(terminal_id, _pack(suite, keys))
        except KeyStoreError as error:  # the master key file gone while serving, say
            raise SecurityModuleError(str(error)) from None
        return IssuedKeys(field62, sealed, _SoftwareKeys(suite, keys))

    def open_keys(self, terminal_id: str, suite: Suite, sealed: bytes) -> KeyHandle:
        try:
            plain = self._keystore.open_session_keys(terminal_id, sealed)
        except KeyStoreError as error:
            raise SecurityModuleError(str(error)) from None
        return _SoftwareKeys(suite, _unpack(terminal_id, suite, plain))

    def retire_keys(self, keys: KeyHandle) -> None:
        held = _held(keys)
        working = held.keys
        forget_keys(held.suite, [key for key in (working.pik, working.mak, working.tdk) if key])

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
        self, keys: KeyHandle, block: bytes, card_number: str, pin_reference: bytes | None
    ) -> PinCheck:
        held = _held(keys)
        try:
            pin = decrypt_pin(held.suite, held.keys.pik, block, card_number)
        except PinBlockError:
            return PinCheck.BAD_BLOCK
        if pin_reference is None:
            return PinCheck.SOUND
        try:
            matches = self._keystore.pin_matches(card_number, pin, pin_reference)
        except BadInput as error:  # the PIN key file: missing and not makeable, or not opening
            raise SecurityModuleError(str(error)) from None
        return PinCheck.MATCH if matches else PinCheck.NO_MATCH

    def seal_tmk(self, terminal_id: str, tmk: bytes) -> bytes:
        return self._keystore.encrypt_tmk(terminal_id, tmk)

    def tmk_matches(self, terminal_id: str, sealed_tmk: bytes, tmk: bytes) -> bool:
        try:
            stored = self._keystore.decrypt_tmk(terminal_id, sealed_tmk)
        except KeyStoreError as error:
            raise SecurityModuleError(str(error)) from None
        return hmac.compare_digest(stored, tmk)

    def pin_reference(self, card_number: str, pin: str) -> bytes:
        """An HMAC-SHA256 of card number and PIN under the PIN key."""
        return self._keystore.pin_hmac(card_number, pin)

    def begin_rotation(self) -> MasterKeyRotation:
        self._keystore.begin_rotation()
        return _FileRotation(self._keystore)


class _FileRotation:
    """A rotation of the master key file: `<master>.next` until `finish`."""

    def __init__(self, keystore: FileKeyStore) -> None:
        self._keystore = keystore

    def reseal_tmk(self, terminal_id: str, sealed_tmk: bytes) -> bytes:
        try:
            return self._keystore.reseal_tmk(terminal_id, sealed_tmk)
        except KeyStoreError as error:
            raise SecurityModuleError(str(error)) from None

    def reseal_session_keys(self, terminal_id: str, sealed: bytes) -> bytes:
        try:
            return self._keystore.reseal_session_keys(terminal_id, sealed)
        except KeyStoreError as error:
            raise SecurityModuleError(str(error)) from None

    def finish(self) -> None:
        self._keystore.finish_rotation()


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

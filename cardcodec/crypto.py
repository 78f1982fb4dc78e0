"""Card cryptography of the POS profile (pos-8583.md §5) for both key suites.

The gateway and the terminal simulators must agree bit for bit on the MAC, the working keys of
field 62, the PIN block and the track encryption, under 3DES and under SM4; this module is the
one place that does them, so that both sides share it and the known-answer vectors pin it.

Keys and PINs never appear in an error message or a repr: errors name the field and the kind of
problem only, as everything else in the codec does.
"""

from __future__ import annotations

import binascii
import enum
import hmac
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from cardcodec.errors import CodecError, PinBlockError


class Suite(enum.Enum):
    """A terminal's key suite; the value is the config's spelling."""

    TDES = "3des"
    SM4 = "sm4"

    # Members are singletons that compare by identity, so the identity hash is as good as
    # `Enum`'s (which hashes the name in Python) and costs nothing; a suite is part of the key
    # of every cipher context looked up.
    __hash__ = object.__hash__

    @property
    def block_size(self) -> int:
        return 8 if self is Suite.TDES else 16


_BLOCK_SIZES = {suite: suite.block_size for suite in Suite}
KEY_BYTES = 16
KCV_BYTES = 4
MAC_BYTES = 8
PIN_BLOCK_BYTES = 8
_WRAPPED_KEY_BYTES = KEY_BYTES + KCV_BYTES
_FIELD62_LENGTHS = (2 * _WRAPPED_KEY_BYTES, 3 * _WRAPPED_KEY_BYTES)
_MIN_PIN_DIGITS = 4
_MAX_PIN_DIGITS = 12
_MIN_CARD_DIGITS = 13
_MAX_CARD_DIGITS = 19
_HEX_DIGITS = frozenset("0123456789ABCDEFabcdef")
# A working RNG repeats a 3DES half once in 2**56 draws; a source that keeps doing it is broken.
_MAX_KEY_DRAWS = 8
# ECB contexts by key, per thread. ECB keeps no state between whole blocks, so one context
# serves every call with its key, and building one (key schedule and cipher context) costs more
# than the whole MAC. cryptography's contexts are not thread-safe, hence one cache per thread.
# Every signed-on terminal uses up to four keys (TMK, PIK, MAK, TDK); a cache only has to hold
# the busy ones, and when it is full the oldest context is dropped; retired keys' contexts are
# dropped at once (`forget_keys`). Keys are secrets: the caches are never printed, and their
# repr says how many contexts they hold, nothing more.
_CONTEXT_CACHE_SIZE = 2048


class _Caches:
    """One thread's two caches, kept in `_EVERY_THREAD` for as long as the thread lives."""

    __slots__ = ("__weakref__", "decryptors", "encryptors")

    def __init__(self) -> None:
        self.encryptors: dict[tuple[Suite, bytes], CipherContext] = {}
        self.decryptors: dict[tuple[Suite, bytes], CipherContext] = {}


# Every thread's caches, so that `forget_keys` reaches them all; a thread's go when it ends.
_EVERY_THREAD: weakref.WeakSet[_Caches] = weakref.WeakSet()
_EVERY_THREAD_LOCK = threading.Lock()


class _Contexts(threading.local):
    """One thread's ECB encryptor and decryptor contexts, by (suite, key)."""

    def __init__(self) -> None:
        caches = _Caches()
        with _EVERY_THREAD_LOCK:
            _EVERY_THREAD.add(caches)
        self._caches = caches  # the thread's only strong reference
        self.encryptors = caches.encryptors
        self.decryptors = caches.decryptors

    def __repr__(self) -> str:
        count = len(self.encryptors) + len(self.decryptors)
        return f"<cipher contexts: {count} in this thread>"

    def clear(self) -> None:
        self.encryptors.clear()
        self.decryptors.clear()


_CONTEXTS = _Contexts()


def forget_keys(suite: Suite, keys: Iterable[bytes]) -> None:
    """Drop the cipher contexts of these keys from every thread's caches: keys that are
    retired (a terminal signed on again, or off) should not stay in memory in key schedules
    until newer keys push them out. A thread that uses one of them again builds it anew."""
    entries = [(suite, bytes(key)) for key in keys]
    with _EVERY_THREAD_LOCK:
        every = list(_EVERY_THREAD)
    for caches in every:
        for entry in entries:
            caches.encryptors.pop(entry, None)
            caches.decryptors.pop(entry, None)


def _new_cipher(suite: Suite, key: bytes) -> Cipher[modes.ECB]:
    if suite is Suite.TDES:
        # K1 K2 K1: the 24-byte form avoids the 16-byte key deprecation and is the same cipher.
        return Cipher(TripleDES(key + key[:8]), modes.ECB())
    return Cipher(algorithms.SM4(key), modes.ECB())


def _checked_key(key: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise CodecError(f"key is not {KEY_BYTES} bytes", part="key")
    return key if key.__class__ is bytes else bytes(key)


def _remember(
    cache: dict[tuple[Suite, bytes], CipherContext],
    entry: tuple[Suite, bytes],
    context: CipherContext,
) -> CipherContext:
    if len(cache) >= _CONTEXT_CACHE_SIZE:
        # pop, not del: `forget_keys` in another thread may have dropped it meanwhile
        cache.pop(next(iter(cache)), None)
    cache[entry] = context
    return context


def _encryptor(suite: Suite, key: bytes) -> CipherContext:
    """This thread's ECB encryptor for the key: only whole blocks, and never finalized."""
    entry = (suite, _checked_key(key))
    cache = _CONTEXTS.encryptors
    context = cache.get(entry)
    if context is None:
        context = _remember(cache, entry, _new_cipher(*entry).encryptor())
    return context


def _decryptor(suite: Suite, key: bytes) -> CipherContext:
    """This thread's ECB decryptor for the key: only whole blocks, and never finalized."""
    entry = (suite, _checked_key(key))
    cache = _CONTEXTS.decryptors
    context = cache.get(entry)
    if context is None:
        context = _remember(cache, entry, _new_cipher(*entry).decryptor())
    return context


def _check_whole_blocks(suite: Suite, data: bytes) -> None:
    if len(data) % suite.block_size:
        raise CodecError(f"data is not a multiple of {suite.block_size} bytes", part="data")


def _xor(left: bytes, right: bytes) -> bytes:
    return (int.from_bytes(left, "big") ^ int.from_bytes(right, "big")).to_bytes(len(left), "big")


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def encrypt_ecb(suite: Suite, key: bytes, data: bytes) -> bytes:
    """ECB-encrypt whole blocks of `data` under a 16-byte key (3DES as K1 K2 K1, or SM4)."""
    encryptor = _encryptor(suite, key)
    _check_whole_blocks(suite, data)
    return encryptor.update(data)


def decrypt_ecb(suite: Suite, key: bytes, data: bytes) -> bytes:
    """ECB-decrypt whole blocks of `data` under a 16-byte key (3DES as K1 K2 K1, or SM4)."""
    decryptor = _decryptor(suite, key)
    _check_whole_blocks(suite, data)
    return decryptor.update(data)


def check_value(suite: Suite, key: bytes) -> bytes:
    """The key check value: the first 4 bytes of ENC(key, a block of zero bytes)."""
    return encrypt_ecb(suite, key, bytes(suite.block_size))[:KCV_BYTES]


# MAC (§5.1)


def _fold_plan(length: int, size: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    """How `length` bytes fold down to one `size`-byte block: the zero bits that pad them on
    the right to a power-of-two number of blocks, then the halvings (shift, mask)."""
    padded_bytes = size << (max(1, -(-length // size)) - 1).bit_length()
    bits = 8 * padded_bytes
    halvings = []
    while bits > 8 * size:
        bits >>= 1
        halvings.append((bits, (1 << bits) - 1))
    plan = (8 * (padded_bytes - length), tuple(halvings))
    _FOLD_PLANS[(length, size)] = plan  # one per length of MAC input (bounded by the frame)
    return plan


_FOLD_PLANS: dict[tuple[int, int], tuple[int, tuple[tuple[int, int], ...]]] = {}


def _xor_blocks(data: bytes, size: int) -> bytes:
    """All `size`-byte blocks of `data`, zero-padded on the right, XORed together.

    Zero blocks do not change an XOR, so the data is padded to a power-of-two number of blocks
    and folded in halves: log2(blocks) big-integer steps instead of one step per block.
    """
    pad_bits, halvings = _FOLD_PLANS.get((len(data), size)) or _fold_plan(len(data), size)
    folded = int.from_bytes(data, "big") << pad_bits
    for shift, mask in halvings:
        folded = (folded >> shift) ^ (folded & mask)
    return folded.to_bytes(size, "big")


def mac(suite: Suite, mak: bytes, mac_input: bytes) -> bytes:
    """The UnionPay ECB MAC of `mac_input` (MTI to end of field 63): field 64's 8 ASCII bytes."""
    if len(mak) != KEY_BYTES or mak.__class__ is not bytes:
        mak = _checked_key(mak)
    encryptor = _CONTEXTS.encryptors.get((suite, mak)) or _encryptor(suite, mak)
    size = _BLOCK_SIZES[suite]
    hex_folded = binascii.b2a_hex(_xor_blocks(mac_input, size)).upper()
    first = int.from_bytes(encryptor.update(hex_folded[:size]), "big")
    second = first ^ int.from_bytes(hex_folded[size:], "big")
    final = encryptor.update(second.to_bytes(size, "big"))
    return binascii.b2a_hex(final[: MAC_BYTES // 2]).upper()


def verify_mac(suite: Suite, mak: bytes, mac_input: bytes, received: bytes) -> bool:
    """Whether `received` is the MAC of `mac_input`, compared in constant time."""
    return hmac.compare_digest(mac(suite, mak, mac_input), received)


# Working keys (§5.2)


@dataclass(frozen=True, repr=False)
class WorkingKeys:
    """A terminal's session keys from one sign-on: PIK, MAK and, when asked for, TDK."""

    pik: bytes
    mak: bytes
    tdk: bytes | None = None

    def __post_init__(self) -> None:
        for key in (self.pik, self.mak, self.tdk):
            if key is not None and len(key) != KEY_BYTES:
                raise CodecError(f"working key is not {KEY_BYTES} bytes", part="key")

    def __repr__(self) -> str:
        tdk = "None" if self.tdk is None else "<hidden>"
        return f"WorkingKeys(pik=<hidden>, mak=<hidden>, tdk={tdk})"


def halves_differ(key: bytes) -> bool:
    """Whether a 3DES key's halves differ beyond their parity bits (else it is single DES)."""
    half = KEY_BYTES // 2
    return any((a ^ b) & 0xFE for a, b in zip(key[:half], key[half:], strict=True))


def _fresh_key(suite: Suite, random_bytes: Callable[[int], bytes]) -> bytes:
    for _ in range(_MAX_KEY_DRAWS):
        key = random_bytes(KEY_BYTES)
        if len(key) != KEY_BYTES:
            raise RuntimeError("random source gave the wrong number of bytes")
        if suite is not Suite.TDES or halves_differ(key):
            return key
    raise RuntimeError("random source keeps giving 3DES keys with equal halves")


def generate_working_keys(
    suite: Suite,
    with_tdk: bool,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> WorkingKeys:
    """Fresh random PIK, MAK and optionally TDK; 3DES keys get two different halves."""
    pik = _fresh_key(suite, random_bytes)
    mak = _fresh_key(suite, random_bytes)
    tdk = _fresh_key(suite, random_bytes) if with_tdk else None
    return WorkingKeys(pik=pik, mak=mak, tdk=tdk)


def wrap_working_keys(suite: Suite, tmk: bytes, keys: WorkingKeys) -> bytes:
    """Field 62 of the 0810: each key encrypted under the TMK followed by its clear key's KCV."""
    clear_keys = [keys.pik, keys.mak] if keys.tdk is None else [keys.pik, keys.mak, keys.tdk]
    return b"".join(encrypt_ecb(suite, tmk, key) + check_value(suite, key) for key in clear_keys)


def unwrap_working_keys(suite: Suite, tmk: bytes, field62: bytes) -> WorkingKeys:
    """The terminal's side of field 62: decrypt each key under the TMK and check its KCV."""
    if len(field62) not in _FIELD62_LENGTHS:
        raise CodecError("working keys are not 40 or 60 bytes", field=62)
    clear_keys: list[bytes] = []
    starts = range(0, len(field62), _WRAPPED_KEY_BYTES)
    for name, start in zip(("PIK", "MAK", "TDK"), starts, strict=False):
        key = decrypt_ecb(suite, tmk, field62[start : start + KEY_BYTES])
        kcv = field62[start + KEY_BYTES : start + _WRAPPED_KEY_BYTES]
        if not hmac.compare_digest(check_value(suite, key), kcv):
            raise CodecError(f"{name} check value does not match", field=62)
        clear_keys.append(key)
    tdk = clear_keys[2] if len(clear_keys) == 3 else None
    return WorkingKeys(pik=clear_keys[0], mak=clear_keys[1], tdk=tdk)


# PIN (§5.3)


def _pin_field(suite: Suite) -> int:
    return 52 if suite is Suite.TDES else 62


def _pan_block(card_number: str) -> bytes:
    """`0000` + the 12 right-most digits of the card number without its check digit."""
    if not (_MIN_CARD_DIGITS <= len(card_number) <= _MAX_CARD_DIGITS and _is_digits(card_number)):
        raise CodecError("card number is not 13 to 19 digits", part="card number")
    return bytes.fromhex("0000" + card_number[-13:-1])


def pin_block(pin: str, card_number: str) -> bytes:
    """The clear ISO 9564 format 0 PIN block (8 bytes) for a 4-12 digit PIN and a card number."""
    if not (_MIN_PIN_DIGITS <= len(pin) <= _MAX_PIN_DIGITS and _is_digits(pin)):
        raise CodecError("PIN is not 4 to 12 digits", part="PIN")
    pin_digits = f"0{len(pin):X}{pin}".ljust(2 * PIN_BLOCK_BYTES, "F")
    return _xor(bytes.fromhex(pin_digits), _pan_block(card_number))


def encrypt_pin(suite: Suite, pik: bytes, pin: str, card_number: str) -> bytes:
    """The PIN block as sent: 8 bytes for field 52 (3DES) or 16 bytes for field 62 (SM4)."""
    clear = pin_block(pin, card_number)
    return encrypt_ecb(suite, pik, clear + bytes(suite.block_size - PIN_BLOCK_BYTES))


def _pin_from_clear_block(clear: bytes, pan: bytes, field: int) -> str:
    digits = _xor(clear, pan).hex().upper()
    if digits[0] != "0":
        raise PinBlockError("PIN block is not format 0", field=field)
    length = int(digits[1], 16)
    if not _MIN_PIN_DIGITS <= length <= _MAX_PIN_DIGITS:
        raise PinBlockError("PIN length is not 4 to 12", field=field)
    pin = digits[2 : 2 + length]
    if not pin.isdigit():
        raise PinBlockError("PIN has a non-digit", field=field)
    if digits[2 + length :] != "F" * (2 * PIN_BLOCK_BYTES - 2 - length):
        raise PinBlockError("PIN block padding is not F", field=field)
    return pin


def decrypt_pin(suite: Suite, pik: bytes, block: bytes, card_number: str) -> str:
    """The PIN in a received PIN block; PinBlockError when the block is not a valid one."""
    field = _pin_field(suite)
    if len(block) != suite.block_size:
        raise PinBlockError(f"PIN block is not {suite.block_size} bytes", field=field)
    pan = _pan_block(card_number)
    clear = decrypt_ecb(suite, pik, block)
    if any(clear[PIN_BLOCK_BYTES:]):
        raise PinBlockError("PIN block tail is not zero", field=field)
    return _pin_from_clear_block(clear[:PIN_BLOCK_BYTES], pan, field)


# Track encryption (§5.4)


def _transform_track(
    suite: Suite, tdk: bytes, track: str, transform: Callable[[Suite, bytes, bytes], bytes]
) -> str:
    if not all(char in _HEX_DIGITS for char in track):
        raise CodecError("track is not hex nibbles", field=35)
    packed = bytearray.fromhex(track + "0" * (len(track) % 2))
    size = suite.block_size
    if len(packed) < size + 1:
        raise CodecError(f"track is shorter than {size + 1} packed bytes", field=35)
    end = len(packed) - 1
    packed[end - size : end] = transform(suite, tdk, bytes(packed[end - size : end]))
    return packed.hex().upper()[: len(track)]


def encrypt_track(suite: Suite, tdk: bytes, track: str) -> str:
    """Field 35's nibbles with the block before the last byte TDK-encrypted; same length."""
    return _transform_track(suite, tdk, track, encrypt_ecb)


def decrypt_track(suite: Suite, tdk: bytes, track: str) -> str:
    """Field 35's nibbles with the block before the last byte TDK-decrypted; same length."""
    return _transform_track(suite, tdk, track, decrypt_ecb)

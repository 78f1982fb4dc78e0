"""Ed25519 (RFC 8032, pure Ed25519) over a message read in chunks, for files of any size.

The settlement file is signed whole (§6), and a month of a million entries is a 200 MB file.
`cryptography` signs and verifies only a message held in memory, which would make clearing's
memory grow with the month. Pure Ed25519 reads its message in exactly two places, both
inside SHA-512: r = SHA-512(prefix || M) and k = SHA-512(R || A || M). So this module feeds M
to those hashes a chunk at a time and does the few curve operations itself, following RFC 8032
§5.1 (its reference code, in extended coordinates). The result is the standard signature:
byte for byte what `cryptography`/OpenSSL gives for the same key and message (Ed25519 is
deterministic), which the tests check, so any Ed25519 library verifies it.

Key generation, the key file and the public key stay with `cryptography`. The arithmetic here
is Python's big integers and is not constant-time: it is meant for a batch job signing one
file a month on the issuer's own machine, not for a signing service an attacker can time.
Verification follows OpenSSL's rules: S must be below the group order, A must decode to a
point, and the encoding of [S]B - [k]A must equal R byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
SIGNATURE_BYTES = 64
KEY_BYTES = 32

Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z


def _add(p: Point, q: Point) -> Point:
    a = (p[1] - p[0]) * (q[1] - q[0]) % P
    b = (p[1] + p[0]) * (q[1] + q[0]) % P
    c = 2 * p[3] * q[3] * D % P
    d = 2 * p[2] * q[2] % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _multiply(scalar: int, point: Point) -> Point:
    result: Point = (0, 1, 1, 0)
    while scalar > 0:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _recover_x(y: int, sign: int) -> int | None:
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P)
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P != 0:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P != 0:
        return None
    if (x & 1) != sign:
        x = P - x
    return x


_BASE_Y = 4 * pow(5, P - 2, P) % P


def _base_point() -> Point:
    x = _recover_x(_BASE_Y, 0)
    if x is None:  # pragma: no cover - the curve's own base point always decodes
        raise ArithmeticError("the Ed25519 base point does not decode")
    return (x, _BASE_Y, 1, x * _BASE_Y % P)


BASE = _base_point()


def _encode(point: Point) -> bytes:
    z_inverse = pow(point[2], P - 2, P)
    x = point[0] * z_inverse % P
    y = point[1] * z_inverse % P
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


def _decode(data: bytes) -> Point | None:
    if len(data) != KEY_BYTES:
        return None
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % P)


def _sha512_int(
    parts: Iterable[bytes], message: Callable[[], Iterable[bytes]]
) -> tuple[int, bytes]:
    """SHA-512 of the parts and the message, as an integer; and the message's own SHA-512,
    to tell whether two passes read the same bytes."""
    digest, witness = hashlib.sha512(), hashlib.sha512()
    for part in parts:
        digest.update(part)
    for chunk in message():
        digest.update(chunk)
        witness.update(chunk)
    return int.from_bytes(digest.digest(), "little"), witness.digest()


class MessageChangedError(ValueError):
    """The bytes to sign were not the same in both passes: nothing was signed."""


def sign(seed: bytes, public_key: bytes, message: Callable[[], Iterable[bytes]]) -> bytes:
    """The Ed25519 signature of the message that `message()` yields in chunks.

    `message` is called twice (the message is hashed twice), and must yield the same bytes
    both times: if it does not, `MessageChangedError`, and no signature. (A signature over the
    second bytes with the first bytes' nonce, beside an honest one, would give the private
    key away.) `seed` is the 32-byte private key, `public_key` its 32-byte public key.
    """
    if len(seed) != KEY_BYTES or len(public_key) != KEY_BYTES:
        raise ValueError("Ed25519 keys are 32 bytes")
    expanded = hashlib.sha512(seed).digest()
    scalar = int.from_bytes(expanded[:32], "little")
    scalar &= (1 << 254) - 8
    scalar |= 1 << 254
    nonce, first = _sha512_int([expanded[32:]], message)
    nonce %= L
    commitment = _encode(_multiply(nonce, BASE))
    challenge, second = _sha512_int([commitment, public_key], message)
    challenge %= L
    if first != second:
        raise MessageChangedError("the message changed between the two passes of its signing")
    response = (nonce + challenge * scalar) % L
    return commitment + int.to_bytes(response, 32, "little")


def verify(public_key: bytes, signature: bytes, message: Iterable[bytes]) -> bool:
    """Whether `signature` is the key's Ed25519 signature of the chunks of `message`."""
    digest = challenge_hash(public_key, signature)
    for chunk in message:
        digest.update(chunk)
    return verify_prehashed(public_key, signature, digest)


def challenge_hash(public_key: bytes, signature: bytes) -> hashlib._Hash:
    """SHA-512 primed with R || A: feed it the message, then give it to `verify_prehashed`.

    This lets a reader that streams the file for other checks hash it in the same pass.
    """
    digest = hashlib.sha512()
    digest.update(signature[:32])
    digest.update(public_key)
    return digest


def verify_prehashed(public_key: bytes, signature: bytes, digest: hashlib._Hash) -> bool:
    """`verify` with k's hash already fed the message (see `challenge_hash`)."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    point = _decode(public_key)
    commitment, response = signature[:32], int.from_bytes(signature[32:], "little")
    if point is None or response >= L:
        return False
    challenge = int.from_bytes(digest.digest(), "little") % L
    negated = ((P - point[0]) % P, point[1], point[2], (P - point[3]) % P)
    check = _add(_multiply(response, BASE), _multiply(challenge, negated))
    return _encode(check) == commitment

"""The issuer's Ed25519 signing key: made on first use, kept private, and its public half.

The acquirer trusts a settlement file because its signature verifies under the issuer's public
key, so the private key is the one thing clearing must never leak or silently replace. It is
an unencrypted PKCS#8 PEM (pos-8583.md §8) at the path the config names, created with mode
0600 through a private temporary file linked into place (two first runs agree on one key, no
reader sees half a key), and refused when group or others could read it. Messages name the
file, never key material.

Signing and verification stream the file (`clearing.ed25519`); everything else about the key
is `cryptography`'s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from clearing import ed25519
from gateway.errors import BadInput, CheckFailed
from gateway.secret_files import create_private_file, read_private_file

MAX_KEY_FILE_BYTES = 16 * 1024
CHUNK_BYTES = 1 << 20


def load_or_create(path: Path) -> Ed25519PrivateKey:
    """The signing key at `path`, made first when the file does not exist."""
    if not path.exists():
        _create(path)
    return load_private(path)


def _create(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    create_private_file(path, pem, "signing key")


def load_private(path: Path) -> Ed25519PrivateKey:
    """The signing key, refused unless a private regular file holding an Ed25519 PKCS#8 PEM."""
    data = read_private_file(path, "signing key", MAX_KEY_FILE_BYTES)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadInput(f"signing key {path}: not an unencrypted PKCS#8 PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(f"signing key {path}: not an Ed25519 key")
    return key


def key_sha256(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, lower-case hex: which key signed a month."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as a SubjectPublicKeyInfo PEM (what `keys export-public` prints)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public(path: Path) -> Ed25519PublicKey:
    """A public key PEM file, as `keys export-public` wrote it."""
    try:
        data = path.read_bytes()[:MAX_KEY_FILE_BYTES]
    except OSError as error:
        raise BadInput(f"public key {path}: cannot read it: {error.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise BadInput(f"public key {path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadInput(f"public key {path}: not an Ed25519 key")
    return key


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def file_chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes, a chunk at a time."""
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


def sign_file(key: Ed25519PrivateKey, path: Path) -> str:
    """The `.sig` content for a file: its Ed25519 signature, 128 lower-case hex, newline."""
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = raw_public(key.public_key())
    # One descriptor for both passes (not the path twice); `ed25519.sign` also checks that
    # they read the same bytes.
    with path.open("rb") as file:

        def message() -> Iterator[bytes]:
            file.seek(0)
            while chunk := file.read(CHUNK_BYTES):
                yield chunk

        try:
            signature = ed25519.sign(seed, public, message)
        except ed25519.MessageChangedError:
            raise CheckFailed(f"{path}: changed while it was being signed; not signed") from None
    return signature.hex() + "\n"

"""Files that hold secrets (the master key, the issuer's signing key): made once, owner-only.

A secret file is created through a private temporary file linked into place, so no reader
ever sees half a key and two processes starting together agree on one; it is read only when it
is a regular file (a link is judged by the file it names), owned by this process's user or
root, that neither group nor others can read. Messages name the file and the problem, never
its contents.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from gateway.errors import BadInput

OWNER_ONLY = 0o600
GROUP_OR_OTHER = 0o077


def create_private_file(path: Path, content: bytes, what: str) -> None:
    """Write `content` to `path` (mode 0600) unless another process made the file first."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_ONLY)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as error:
        raise BadInput(f"{what} {path}: cannot create it: {error.strerror}") from None


def read_private_file(path: Path, what: str, max_bytes: int) -> bytes:
    """At most `max_bytes` of `path`, refused unless a regular file that this process's user
    (or root) owns and only its owner can read. A link is judged by the file it names (a
    mounted secret), so a key another user planted, as a file or a link to theirs, is never
    adopted."""
    try:
        # Non-blocking: a named pipe put at the path would otherwise hold the open until a
        # writer came, and the command would hang before its "not a regular file".
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        raise BadInput(f"{what} {path}: cannot read it: {error.strerror}") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise BadInput(f"{what} {path}: not a regular file")
        if status.st_uid not in {os.geteuid(), 0}:
            raise BadInput(
                f"{what} {path}: owned by user {status.st_uid}, not by this one "
                f"({os.geteuid()}) or root"
            )
        if status.st_mode & GROUP_OR_OTHER:
            mode = stat.S_IMODE(status.st_mode)
            raise BadInput(
                f"{what} {path}: permissions {mode:04o} let group or others read it; chmod 600 it"
            )
        return os.read(descriptor, max_bytes)
    finally:
        os.close(descriptor)


def replace_private_file(path: Path, content: bytes, what: str) -> None:
    """Write `content` to `path` (mode 0600) in place of what it held, atomically."""
    try:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_ONLY)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as error:
        raise BadInput(f"{what} {path}: cannot write it: {error.strerror}") from None

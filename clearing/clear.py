"""`vipgate clear`: close a month if it is not closed yet, then write its file, signature and
statements, the same bytes on every run.

The order is chosen so that nothing wrong ever reaches the acquirer: the month is refused
while its last business date runs; the signing key is read (or made) before anything is
closed; the file and its signature are written under hidden partial names, read back (the
bytes on disk must hash as written, the signature must verify on them), compared with the
SHA-256 recorded by the first run, and only then moved to their real names. A later run
whose bytes differ from the first (the ledger changed under a closed month) is a fault
(exit 1) and leaves the files as they were.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from clearing import ed25519, signing
from clearing.close import CloseSettings, close_month, closed_month
from clearing.layout import signature_name
from clearing.models import ClosedMonth, ClosedMonthMerchant
from clearing.period import Month, refuse_unfinished
from clearing.settlement import WrittenFile, partial_path, write_settlement
from clearing.statements import (
    MerchantStatements,
    OperatorFigures,
    operator_statement_name,
    write_operator_statement,
)
from gateway.config import Config
from gateway.errors import BadInput, CheckFailed
from gateway.ledger import unit_of_work
from gateway.ledger.hotpath import CLOSE_LOCK_KEY

CLOSE_ATTEMPTS = 3


@dataclass
class Cleared:
    """What a `clear` run did and wrote."""

    closed: ClosedMonth
    closed_now: bool
    settlement: WrittenFile
    signature: Path
    operator_statement: Path
    figures: OperatorFigures
    merchant_statements: list[Path] = field(default_factory=list)


def close_settings(config: Config) -> CloseSettings:
    return CloseSettings(
        sender_id=config.issuer.id,
        receiver_id=config.clearing.acquirer_id,
        terminal_fee_fen=config.clearing.terminal_fee_fen_per_month,
        timezone=config.gateway.timezone,
        cutoff=config.gateway.cutoff,
    )


def snapshot_isolation(session: Session) -> None:
    """One snapshot for every statement of the unit of work: REPEATABLE READ on PostgreSQL
    (SQLite's unit of work already holds the database's write lock)."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def ensure_closed(
    engine: Engine, month: Month, config: Config, now: datetime
) -> tuple[ClosedMonth, bool]:
    """The month's close, made now if there is none; True when this call closed it."""
    with _gateways_held_off(engine):
        return _ensure_closed(engine, month, config, now)


@contextmanager
def _gateways_held_off(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, the close's lock (`CLOSE_LOCK_KEY`) held exclusively, on a connection of
    its own, before the close's snapshot is taken and until it has committed. Every gateway
    transaction holds it shared: the close waits for those under way, so its snapshot has
    them, and those that come later wait, then find the month closed (`96`, nothing
    changed). On SQLite the close's write lock does the same."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        driver = connection.connection.driver_connection
        assert driver is not None
        driver.autocommit = True
        driver.execute("SELECT pg_advisory_lock(%s)", (CLOSE_LOCK_KEY,))
        try:
            yield
        finally:
            driver.execute("SELECT pg_advisory_unlock(%s)", (CLOSE_LOCK_KEY,))
            driver.autocommit = False


def _ensure_closed(
    engine: Engine, month: Month, config: Config, now: datetime
) -> tuple[ClosedMonth, bool]:
    for attempt in range(1, CLOSE_ATTEMPTS + 1):
        try:
            with unit_of_work(engine) as session:
                snapshot_isolation(session)
                existing = closed_month(session, month)
                if existing is not None:
                    return existing, False
                return close_month(session, month, close_settings(config), now), True
        except IntegrityError:
            # Another run closed the month (or accounted an item) first: read its close.
            if attempt == CLOSE_ATTEMPTS:
                raise
        except OperationalError as error:
            # PostgreSQL: a write made outside the gateway (whose transactions the close's
            # lock holds off) updated an item this close accounts for after its snapshot (the
            # item's row lock, taken for the foreign key, finds it changed). Closing again,
            # on a snapshot that has it, is what the database asks for.
            if _sqlstate(error) not in _TRY_AGAIN or attempt == CLOSE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


# Serialisation failure and deadlock: the transaction is to be run again.
_TRY_AGAIN = frozenset({"40001", "40P01"})


def _sqlstate(error: OperationalError) -> str | None:
    sqlstate: str | None = getattr(error.orig, "sqlstate", None)
    return sqlstate


def clear(engine: Engine, config: Config, month: Month, out: Path, now: datetime) -> Cleared:
    """Refuse an unfinished month, close it if needed, and write everything into `out`."""
    refuse_unfinished(month, now, config.gateway.timezone, config.gateway.cutoff)
    key = _signing_key(engine, config.issuer.signing_key, month, out)  # refused: no `out` made
    make_folder(out)
    pending = _pending(out, month)
    with _writing_in(out):
        return _clear_into(engine, config, month, (out, pending), now=now, key=key)


def _signing_key(engine: Engine, path: Path, month: Month, out: Path) -> Ed25519PrivateKey:
    """The config's signing key, refused (nothing made) when it cannot sign this month as
    the ledger says it was signed: a month closed under another key is signed again by
    that key alone (its run writes the same bytes, `.sig` included), and a missing key file
    is made only while no month of the ledger has been signed (its "first use"). Made anew
    later (a host without the file, a moved path), it would sign files the acquirer cannot
    verify against the public key it holds."""
    with unit_of_work(engine) as session:
        # Every closed month was signed; one closed before the key was recorded (migration
        # 0009) by a key the ledger cannot name.
        signed = session.scalars(
            select(ClosedMonth).order_by(ClosedMonth.month.desc()).limit(1)
        ).first()
        this_month = session.get(ClosedMonth, month.key)
        recorded = None if this_month is None else this_month.signing_key_sha256
    if not path.exists() and not path.is_symlink():
        if signed is not None:
            which = (
                f"by the key whose public key has SHA-256 {signed.signing_key_sha256}"
                if signed.signing_key_sha256 is not None
                else "by the key the config named then"
            )
            raise BadInput(
                f"signing key {path}: no such file, and the ledger's months were signed"
                f" (the latest, {signed.month}, {which}); restore that key file. To sign new"
                " months with a new key, make it first (`vipgate keys export-public` makes"
                " the config's key when missing) and give its public key to the acquirer"
            )
        return signing.load_or_create(path)
    key = signing.load_private(path)
    if this_month is not None and recorded is None:
        _refuse_another_signer(key, path, month, out / this_month.file_name)
    if recorded is not None and recorded != signing.key_sha256(key):
        raise BadInput(
            f"signing key {path}: month {month.key} was signed by another key (public key"
            f" SHA-256 {recorded}, this one's {signing.key_sha256(key)}); a later run writes"
            " the same bytes, so only that key signs it again: point issuer.signing_key at it"
        )
    return key


def _refuse_another_signer(
    key: Ed25519PrivateKey, path: Path, month: Month, settlement: Path
) -> None:
    """A month closed before its signing key was recorded (migration 0009): the key that
    signed it is known only by its `.sig`. Where `--out` holds the month's file and `.sig`,
    one this key does not verify is refused (nothing written), rather than replaced by this
    key's and this key then recorded as the month's. Without them, the run's key is taken."""
    sig = settlement.with_name(signature_name(settlement.name))
    if not (settlement.is_file() and sig.is_file()):
        return
    try:
        signature = bytes.fromhex(sig.read_text(encoding="ascii").strip())
    except (ValueError, UnicodeDecodeError):
        signature = b""
    public = signing.raw_public(key.public_key())
    if len(signature) == 64 and ed25519.verify(public, signature, signing.file_chunks(settlement)):
        return
    raise BadInput(
        f"signing key {path}: month {month.key} closed before its signing key was recorded,"
        f" and {sig} does not verify under this key; a later run writes the same bytes, so"
        " only the key that signed it signs it again: point issuer.signing_key at it"
    )


@contextmanager
def _writing_in(out: Path) -> Iterator[None]:
    """One run at a time writes into `out`: the runs share its working names (`_pending`,
    the file's partial name), so a second run waits for the first (a lock on the folder
    itself, which leaves nothing in it), then writes the same bytes again."""
    descriptor = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # and with it the lock


def _clear_into(
    engine: Engine,
    config: Config,
    month: Month,
    folders: tuple[Path, Path],
    *,
    now: datetime,
    key: Ed25519PrivateKey,
) -> Cleared:
    """`clear`'s work once it has `out` to itself: `folders` are `out` and its `_pending`."""
    out, pending = folders
    try:
        _fresh_folder(pending, out)  # before the close: an --out that cannot be written
        closed, closed_now = ensure_closed(engine, month, config, now)  # closes nothing
        try:
            return _write(engine, month, (closed, closed_now), key, out)
        except OSError as error:
            where = error.filename or out
            raise BadInput(
                f"--out {out}: cannot write {where}: {error.strerror or error} (the month is"
                " closed; a run with a writable --out writes its files, the same bytes)"
            ) from None
    finally:
        shutil.rmtree(pending, ignore_errors=True)


def _write(
    engine: Engine,
    month: Month,
    close: tuple[ClosedMonth, bool],
    key: Ed25519PrivateKey,
    out: Path,
) -> Cleared:
    """The closed month's file, signature and statements, written as the module says (the
    statements first into `_pending`, made empty by the caller)."""
    closed, closed_now = close
    pending = _pending(out, month)
    path = out / closed.file_name
    partial = partial_path(path)
    partial_sig = partial.with_name(signature_name(partial.name))
    try:
        statements = MerchantStatements(pending, month.compact)
        with unit_of_work(engine) as session:
            written = write_settlement(session, closed, path, [statements])
            statements.finish(_merchants_at_close(session, closed))
        partial_sig.write_text(signing.sign_file(key, partial), encoding="ascii")
        _read_back(month, partial, partial_sig, key.public_key(), written.sha256)
        _record_or_compare(engine, month, written.sha256, signing.key_sha256(key))
        os.replace(partial, path)
        os.replace(partial_sig, path.with_name(signature_name(path.name)))
        merchant_statements = [
            Path(shutil.move(statement, out / statement.name)) for statement in statements.written
        ]
    finally:
        partial.unlink(missing_ok=True)
        partial_sig.unlink(missing_ok=True)
    figures = OperatorFigures(written.totals, closed.terminal_count, closed.terminal_fee_fen)
    operator = out / operator_statement_name(month.compact)
    write_operator_statement(operator, closed, figures, written.sha256)
    return Cleared(
        closed=closed,
        closed_now=closed_now,
        settlement=written,
        signature=path.with_name(signature_name(path.name)),
        operator_statement=operator,
        figures=figures,
        merchant_statements=merchant_statements,
    )


def _pending(out: Path, month: Month) -> Path:
    return out / f".statements-{month.compact}.partial"


def _fresh_folder(pending: Path, out: Path) -> None:
    shutil.rmtree(pending, ignore_errors=True)
    try:
        pending.mkdir()
    except OSError as error:
        raise BadInput(f"--out {out}: cannot write in it: {error.strerror}") from None


def folder_can_be_made(out: Path) -> None:
    """`BadInput` naming `--out` unless `make_folder` would succeed, checked without making
    anything: a refusal that comes later (a month not closed) must leave no folder behind."""
    there = out
    while not there.exists() and there.parent != there:
        there = there.parent  # the nearest folder that exists, where the first one is made
    if not there.is_dir():
        code = errno.EEXIST if there == out else errno.ENOTDIR
        raise BadInput(f"--out {out}: cannot make the folder: {os.strerror(code)}")
    if not os.access(there, os.W_OK | os.X_OK):
        if there == out:
            raise BadInput(f"--out {out}: cannot write in it")
        raise BadInput(f"--out {out}: cannot make the folder: {os.strerror(errno.EACCES)}")


def make_folder(out: Path) -> None:
    """`--out`, made if needed and writable, or `BadInput` naming it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(f"--out {out}: cannot make the folder: {error.strerror}") from None
    if not os.access(out, os.W_OK):
        raise BadInput(f"--out {out}: cannot write in it")


def _merchants_at_close(session: Session, closed: ClosedMonth) -> list[str]:
    query = (
        select(ClosedMonthMerchant.merchant_id)
        .where(ClosedMonthMerchant.month == closed.month)
        .order_by(ClosedMonthMerchant.merchant_id)
    )
    return list(session.scalars(query))


def _read_back(
    month: Month, path: Path, sig_path: Path, public_key: Ed25519PublicKey, sha256: str
) -> None:
    """Read the file back from disk: the bytes must be those written (their SHA-256) and the
    signature beside them must verify. The records themselves were checked field by field as
    they were formatted; the acquirer's full check is `verify`, which `reconcile` runs too."""
    signature = bytes.fromhex(sig_path.read_text(encoding="ascii"))
    public = signing.raw_public(public_key)
    challenge = ed25519.challenge_hash(public, signature)
    digest = hashlib.sha256()
    for chunk in signing.file_chunks(path):
        digest.update(chunk)
        challenge.update(chunk)
    if digest.hexdigest() != sha256:
        raise CheckFailed(f"clear {month.key}: the file read back is not the file written")
    if not ed25519.verify_prehashed(public, signature, challenge):
        raise CheckFailed(f"clear {month.key}: the signature does not verify on the file")


def _record_or_compare(engine: Engine, month: Month, sha256: str, key_sha256: str) -> None:
    """The first run records the file's SHA-256 and its signing key's; every later run must
    write the same file and sign it with the same key."""
    with unit_of_work(engine) as session:
        closed = session.get(ClosedMonth, month.key, with_for_update=True)
        if closed is None:  # pragma: no cover - closed above, and closes are never deleted
            raise CheckFailed(f"clear {month.key}: the month's close has disappeared")
        if closed.signing_key_sha256 is None:
            closed.signing_key_sha256 = key_sha256
        elif closed.signing_key_sha256 != key_sha256:  # a run beside this one signed it first
            raise BadInput(
                f"clear {month.key}: the month was signed by another key (public key SHA-256"
                f" {closed.signing_key_sha256}, this run's {key_sha256}); nothing was replaced"
            )
        if closed.file_sha256 is None:
            closed.file_sha256 = sha256
        elif closed.file_sha256 != sha256:
            raise CheckFailed(
                f"clear {month.key}: the file would differ from the one written when the month "
                f"closed (SHA-256 {closed.file_sha256}, now {sha256}): the ledger changed under "
                "a closed month; nothing was replaced"
            )

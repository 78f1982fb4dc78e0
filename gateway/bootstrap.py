"""The one place that wires the real things together for a command: config, database, keys, clock.

Every `vipgate` command starts the same way (operations.md): read and validate the config,
open the database it names (or `--db`), bring the schema up to date, and (unless it only
reads the ledger) load the config's merchants, terminals and demo cards into it. Doing that
here, once, means every command sees the same ledger and the rest of the code receives its
collaborators instead of building them, so tests hand in a fixed clock or another security
module without patching anything deeper.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from gateway.clock import Clock, SystemClock
from gateway.config import Config, load_config
from gateway.errors import BadInput, LedgerDamaged
from gateway.keystore import FileKeyStore
from gateway.ledger import Moment, make_engine, migrate, unit_of_work
from gateway.ledger.db import (
    LEDGER_BUSY,
    SQLITE_BUSY_TIMEOUT_MS,
    STORAGE_FAULTS,
    deadlocked,
    ledger_busy,
    storage_fault,
)
from gateway.ledger.models import KeyCheck
from gateway.loader import LoadReport, load_into_ledger, moment_at, refuse_lots_after_today
from gateway.security import SecurityModule, SoftwareSecurityModule

# Two commands loading the same new config at once on PostgreSQL can both try to insert the
# same merchant; the loser's second attempt finds the rows and changes nothing. A gateway
# starting beside one that serves can deadlock with it over cards; the load is the victim
# PostgreSQL picks (it waited first) and runs again.
LOAD_ATTEMPTS = 5
NOTHING_LOADED = LoadReport(
    merchants=0, terminals=0, cards=0, lots_accrued=0, points_accrued=0, changes=()
)


@dataclass(frozen=True)
class Wiring:
    """What a command works with; made by `bootstrap`, closed by `close`."""

    config: Config
    engine: Engine
    security: SecurityModule
    clock: Clock
    loaded: LoadReport

    def now(self) -> datetime:
        return self.clock.now()

    def moment(self) -> Moment:
        """Now, with its business date under the config's cut-off."""
        return moment_at(self.config, self.clock.now())

    def close(self) -> None:
        self.engine.dispose()


def system_clock(timezone: tzinfo) -> Clock:
    """The clock commands read; a test may replace this factory to fix the time."""
    return SystemClock(timezone)


# A command's own checks that need the config and the clock but not the ledger: run before
# the config is loaded into the ledger, so input they refuse changes nothing there.
Check = Callable[[Config, Clock], None]

# A command's checks of what the ledger holds: run in the config load's unit of work, after
# the load, so a refusal (raised) rolls the load back and the ledger is left as it was
# (what it returns is not used).
Refusal = Callable[[Session, Config, Clock], object]


def bootstrap(
    config_path: Path,
    db_override: str | None = None,
    *,
    clock: Clock | None = None,
    security: SecurityModule | None = None,
    check: Check | None = None,
    refuse: Refusal | None = None,
    load: bool = True,
    switches: bool = False,
    busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
) -> Wiring:
    """Read the config, run the command's `check`, open and migrate its database, and load
    the config into it, with the command's `refuse` in the load's transaction.

    Without a `clock`, the commands' clock (`system_clock`) in the config's time zone; without
    a `security` module, the software one on the master key file the config names. A command
    that only reads the ledger (`load=False`) does not load the config: run with another
    config than the gateway's (the default `config/demo.toml`, say), a check would otherwise
    write that config's merchants, terminals, cards and points into the ledger it checks.
    Only with `switches` (`serve`, `ledger load`) does the load change a terminal's `enabled`
    or a merchant's `active` that the ledger has (`load_into_ledger`).
    """
    config, chosen_clock, chosen_security, engine = _opened(
        config_path,
        db_override,
        clock,
        security,
        check,
        load=load,
        busy_timeout_ms=busy_timeout_ms,
    )
    try:
        if load:
            report = _load(engine, config, chosen_security, chosen_clock, refuse, switches=switches)
        else:
            report = NOTHING_LOADED
            if refuse is not None:
                with unit_of_work(engine) as session:
                    refuse(session, config, chosen_clock)
    except BaseException:
        engine.dispose()
        raise
    return Wiring(config, engine, chosen_security, chosen_clock, report)


@contextmanager
def wired(
    config_path: Path,
    db_override: str | None = None,
    *,
    say: Callable[[str], None] = print,
    check: Check | None = None,
    refuse: Refusal | None = None,
    load: bool = True,
    switches: bool = False,
) -> Iterator[Wiring]:
    """`bootstrap` (with the command's `check`, `refuse` and `load`) for the length of a
    command, with the database closed afterwards.

    When loading the config changed the ledger, `say` gets a line saying so and one line per
    change; a load that changed nothing stays quiet.
    """
    wiring = bootstrap(
        config_path, db_override, check=check, refuse=refuse, load=load, switches=switches
    )
    try:
        _announce(config_path, wiring.loaded, say)
        yield wiring
    finally:
        wiring.close()


@contextmanager
def wired_unit(
    config_path: Path,
    db_override: str | None = None,
    *,
    say: Callable[[str], None] = print,
    check: Check | None = None,
    load: bool = True,
    existing: bool = False,
) -> Iterator[tuple[Wiring, Session]]:
    """`wired`, for a command that does its work in one unit of work: the unit that loads the
    config, so the load commits with the command's work, or not at all. A command that
    refuses (raises) inside it, for an unknown card say, leaves the ledger as it found it.
    The load's lines go to `say` once the unit has committed. With `load=False` (a command
    that only reads the ledger) the unit loads nothing. With `existing`, a command that
    changes a ledger but has no use for a new one (a card's status, the master key's
    rotation) refuses a SQLite file that is not there rather than make one."""
    config, clock, security, engine = _opened(
        config_path, db_override, None, None, check, load=load, existing=existing
    )
    try:
        if not load:
            with unit_of_work(engine) as session:
                yield Wiring(config, engine, security, clock, NOTHING_LOADED), session
            return
        with _loaded(engine, config, security, clock) as (session, report):
            yield Wiring(config, engine, security, clock, report), session
        _announce(config_path, report, say)
    finally:
        engine.dispose()


def _opened(
    config_path: Path,
    db_override: str | None,
    clock: Clock | None,
    security: SecurityModule | None,
    check: Check | None,
    *,
    load: bool = True,
    existing: bool = False,
    busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
) -> tuple[Config, Clock, SecurityModule, Engine]:
    """The config read, the command's `check` run, the security module made and the database
    opened and migrated, in that order (`bootstrap`). A command that loads no config (`load`
    false) only reads the ledger: it uses no key, so missing key files are no reason to
    refuse it (an audit host has none), and it makes no ledger where none is."""
    config = load_config(config_path, db_override)
    chosen_clock = clock or system_clock(config.gateway.timezone)
    if check is not None:
        check(config, chosen_clock)
    chosen_security = security or SoftwareSecurityModule(FileKeyStore(config.issuer.master_key))
    existing = existing or not load
    if not existing and sqlite_ledger_to_make(config.gateway.database):
        refuse_lots_after_today(config, chosen_clock.now())
    engine = open_database(
        config.gateway.database, busy_timeout_ms=busy_timeout_ms, existing=existing
    )
    try:
        if load:
            refuse_unwritable(engine)
        if security is None and load:
            _refuse_key_files_made_anew(engine, config.issuer.master_key)
    except BaseException:
        engine.dispose()
        raise
    return config, chosen_clock, chosen_security, engine


def refuse_unwritable(engine: Engine) -> None:
    """`BadInput` unless the ledger takes a write: a command that loads the config writes to
    it. A load that changes nothing writes nothing, so a ledger opened read-only (a SQLite
    file its user may not write, a PostgreSQL standby) was found out only by the first
    request: `vipgate serve` listened and answered `96` to every one, and did not recover
    once the file was made writable (SQLite keeps a file it opened read-only so). One
    statement that changes nothing, rolled back."""
    try:
        with engine.connect() as connection, connection.begin() as transaction:
            connection.exec_driver_sql("UPDATE alembic_version SET version_num = version_num")
            transaction.rollback()
    except DBAPIError as error:
        fault = storage_fault(error)
        if fault is None:
            raise
        what, remedy = STORAGE_FAULTS[fault]
        raise BadInput(f"database: {what} ({_first_line(error.orig)}); {remedy}") from None


def sqlite_ledger_to_make(url: str) -> bool:
    """Whether `url` names a SQLite file that is not there yet (opening it makes it)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return False  # `open_database` names the fault
    if parsed.get_backend_name() != "sqlite" or _in_memory(parsed.database, parsed.query):
        return False
    database = parsed.database or ""
    if database.startswith("file:"):
        path = _uri_path(database) if _is_uri(parsed.query) else None
        creates = parsed.query.get("mode") in (None, "rwc")
        return path is not None and creates and not path.exists()
    return not Path(database).exists()


def _is_uri(query: Mapping[str, object]) -> bool:
    """Whether SQLAlchemy hands a `file:` database to SQLite as a URI (`?uri=true`)."""
    return str(query.get("uri", "")).lower() in ("true", "1")


def _uri_path(database: str) -> Path:
    """The file a SQLite URI names: `file:PATH`, `file:///PATH` or `file://localhost/PATH`,
    percent-escapes decoded (its query is SQLAlchemy's, apart from the database)."""
    parts = urlsplit(database)
    if parts.netloc not in ("", "localhost"):
        raise BadInput(
            f"database: a SQLite URI names a file on this host: {parts.netloc!r} is not"
            " (file:///PATH)"
        )
    return Path(unquote(parts.path))


def _in_memory(database: str | None, query: Mapping[str, object]) -> bool:
    """A SQLite URL whose database lives in memory or in a temporary file SQLite removes,
    however written: none, `:memory:`, or a URI `file::memory:`, with `mode=memory` or
    `vfs=memdb`, or naming no file (`file:?uri=true`: a private temporary database)."""
    name = database or ""
    return (
        name in ("", ":memory:")
        or name.startswith("file::memory:")
        or query.get("mode") == "memory"
        or query.get("vfs") == "memdb"
        or (name.startswith("file:") and urlsplit(name).path == "")
    )


def _refuse_key_files_made_anew(engine: Engine, master_key: Path) -> None:
    """`BadInput`, before a key file is made, when the software module's master key or PIN
    key file is missing and the ledger holds that key's check value (`key_checks`): its
    TMKs and PIN references were made under keys that exist elsewhere. Made anew here, the
    files would only be refused by the load (as another key), and left behind."""
    store = FileKeyStore(master_key)
    missing = [path for path in (store.path, store.pin_path) if not path.exists()]
    if not missing:
        return
    with unit_of_work(engine) as session:
        held = set(session.scalars(select(KeyCheck.name)))
    if held:
        names = " and ".join(str(path) for path in missing)
        raise BadInput(
            f"master key {store.path}: {names} missing, and this ledger's keys were made under"
            " files that exist: give this host the master key and PIN key files of the"
            " instances that serve this ledger (docs/deployment.md)"
        )


def _announce(config_path: Path, report: LoadReport, say: Callable[[str], None]) -> None:
    if report.changed:
        say(f"{config_path}: {report.summary()}")
        for change in report.changes:
            say(f"  {change}")
    for note in report.notes:
        say(f"{config_path}: {note}")


def open_database(
    url: str, *, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS, existing: bool = False
) -> Engine:
    """An engine on a migrated ledger; a SQLite file's folder is made when missing, unless
    the ledger must be there already (`existing`: a command that only reads it).

    A SQLite ledger holds card numbers: a folder or a file made here is its owner's only
    (0700, 0600; SQLite gives the file's `-wal` and `-shm` the file's mode). Ones that exist
    keep theirs. A command that only reads the ledger (`ledger check`, `clear`, `reconcile`,
    `cards show`) refuses a SQLite file that is not there: made anew, an empty ledger would
    pass every check, and close and reconcile an empty month, for a mistyped `--db`.

    A SQLite URI (`sqlite:///file:PATH?uri=true&mode=ro`, say) is opened as its `mode`
    says: its folder and file are made (0700, 0600) only where SQLite would make them (no
    `mode`, or `rwc`). Without `uri=true` SQLite would take `file:PATH` for a path in a
    folder named `file:`, so it is refused."""
    folder: Path | None = None
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and _in_memory(parsed.database, parsed.query):
            raise BadInput(
                "database: an in-memory SQLite database keeps nothing once the command ends;"
                " name a file (sqlite:///PATH)"
            )
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            uri = parsed.database.startswith("file:")
            if uri and not _is_uri(parsed.query):
                raise BadInput(
                    "database: a SQLite URI (sqlite:///file:...) needs ?uri=true, or else"
                    " SQLite takes it for a file in a folder named 'file:'; name the file's"
                    " path (sqlite:///PATH) or add uri=true"
                )
            database = _uri_path(parsed.database) if uri else Path(parsed.database)
            if existing and not database.exists():
                raise BadInput(
                    f"database: no ledger at {database}; this command works on a ledger and"
                    " makes none (check --db or the config's database)"
                )
            # A URI's `mode` says whether SQLite may make the file (rwc, its default): made
            # here first, as for a path, so that it is the owner's only whatever the umask.
            if not uri or parsed.query.get("mode") in (None, "rwc"):
                folder = database.parent
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                _make_owner_only(database)
        engine = make_engine(url, busy_timeout_ms=busy_timeout_ms)
    except (ArgumentError, ValueError) as error:
        # The URL may hold a password: name the problem, never the URL.
        raise BadInput(f"database: {_first_line(error)}") from None
    except OSError as error:
        # A SQLite file's folder: a path, no password.
        raise BadInput(f"database: cannot make its folder {folder}: {error.strerror}") from None
    # SQL errors would otherwise print their parameters (card numbers) in a traceback.
    engine.hide_parameters = True
    try:
        migrate(engine)
    except DBAPIError as error:  # OperationalError, or a file that is not a database
        engine.dispose()
        if ledger_busy(error):
            raise BadInput(LEDGER_BUSY) from None
        finding = _first_line(error.orig)
        if _corrupt(error):
            raise LedgerDamaged(
                f"database: cannot open it: the ledger file is damaged ({finding}); restore"
                " the ledger from a backup",
                finding,
            ) from None
        raise BadInput(f"database: cannot open it: {finding}") from None
    return engine


# SQLITE_CORRUPT: a damaged file. (A file that is no database at all, SQLITE_NOTADB, is more
# likely the wrong file, the config say, than a damaged ledger: bad input.)
_SQLITE_CORRUPT = 11


def _corrupt(error: DBAPIError) -> bool:
    code = getattr(error.orig, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_CORRUPT


def _make_owner_only(database: Path) -> None:
    """An empty file (an empty SQLite database) of mode 0600 where none is."""
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as error:
        raise BadInput(f"database: cannot make {database}: {error.strerror}") from None


def _load(
    engine: Engine,
    config: Config,
    security: SecurityModule,
    clock: Clock,
    refuse: Refusal | None = None,
    *,
    switches: bool = False,
) -> LoadReport:
    """The config loaded and committed, unless `refuse` raises after the load."""
    with _loaded(engine, config, security, clock, switches=switches) as (session, report):
        if refuse is not None:
            refuse(session, config, clock)
    return report


@contextmanager
def _loaded(
    engine: Engine,
    config: Config,
    security: SecurityModule,
    clock: Clock,
    *,
    switches: bool = False,
) -> Iterator[tuple[Session, LoadReport]]:
    """A unit of work that has loaded the config, for the caller to go on in; it commits when
    the caller's block ends cleanly, else the load is rolled back with the rest."""
    attempt = 1
    while True:
        loaded = False
        try:
            with unit_of_work(engine) as session:
                report = load_into_ledger(session, config, security, clock.now(), switches=switches)
                loaded = True
                yield session, report
            return
        except (IntegrityError, OperationalError) as error:
            # A twin process loaded the same rows first, or the load met a serving gateway's
            # group in a deadlock (cards locked in another order): the load runs again. What
            # fails after the load (the caller's work, the commit) is not the load's to retry.
            retry = isinstance(error, IntegrityError) or deadlocked(error)
            if loaded or not retry or attempt >= LOAD_ATTEMPTS:
                raise
            attempt += 1


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""A real PostgreSQL 15 server for the test run, started from the machine's own binaries.

The ledger must behave the same on PostgreSQL as on SQLite, and only a real server shows row
locks, isolation and types as production has them. The server lives in a temporary folder
(data, log and unix socket), listens on 127.0.0.1 on a free port, runs as a non-root user
(PostgreSQL refuses root), trusts local connections, and skips durability it does not need
for tests (fsync off). `stop` removes every trace of it.

`start(durable=True)` keeps PostgreSQL's own durable defaults instead (fsync, synchronous
commit and full-page writes on), as production runs it: for the bench and the crash and
deployment campaigns. Options on the server's command line outrank `ALTER SYSTEM`, so
durability is chosen when the server starts; `setting` reads what it runs with.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
import psycopg.sql

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "vipgate"
RUN_AS = "postgres"
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class PgServer:
    folder: Path
    port: int
    durable: bool = False
    host: str = "127.0.0.1"
    # The process whose network namespace the server runs in (`nsenter`), or None for ours.
    netns: int | None = None

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str) -> str:
        """A SQLAlchemy URL for one database of this server."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to the maintenance database, for CREATE/DROP DATABASE."""
        return psycopg.connect(
            host=self.host, port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        )

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create a database (copying `template` when given) and return its URL."""
        suffix = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
        with self.admin() as connection:
            connection.execute(f"CREATE DATABASE {name}{suffix}")  # type: ignore[arg-type]
        return self.url(name)


def missing_binaries() -> str | None:
    """Why the server cannot be started here, or None when it can."""
    needed = ("initdb", "pg_ctl", "postgres")
    absent = [name for name in needed if not (PG_BIN / name).exists()]
    if absent:
        return f"PostgreSQL 15 binaries not found in {PG_BIN} (missing: {', '.join(absent)})"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and runuser is missing, so PostgreSQL cannot drop root"
    return None


def _as_server_user(command: list[str], netns: int | None = None) -> list[str]:
    """PostgreSQL will not run as root: when we are root, run it as the postgres user; in
    the network namespace of process `netns` when given."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", RUN_AS, "--", *command]
    if netns is not None:
        command = ["nsenter", "-t", str(netns), "-n", "--", *command]
    return command


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start(*, durable: bool = False, host: str = "127.0.0.1", netns: int | None = None) -> PgServer:
    """initdb into a new temporary folder and start the server; the caller must `stop` it.
    With `durable`, commits are synced to disk (fsync, synchronous_commit and
    full_page_writes as PostgreSQL's defaults have them); without, they are not. The server
    listens on `host`, in the network namespace of process `netns` when given."""
    folder = Path(tempfile.mkdtemp(prefix="vipgate-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, RUN_AS, RUN_AS)
    server = PgServer(folder, _free_port(), durable, host, netns)
    try:
        _run(
            server,
            [
                str(PG_BIN / "initdb"),
                "-D", str(server.data),
                "-U", SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )  # fmt: skip
        if host != "127.0.0.1":  # initdb trusts loopback only: the subnet of `host` too
            with (server.data / "pg_hba.conf").open("a") as rules:
                rules.write("host all all samenet trust\n")
        _start_server(server)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return server


def _start_server(server: PgServer) -> None:
    options = f"-c listen_addresses={server.host} -p {server.port} -k {server.folder} "
    if not server.durable:
        options += "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    options += "-c max_connections=200"
    _run(
        server,
        [
            str(PG_BIN / "pg_ctl"),
            "-D", str(server.data),
            "-l", str(server.folder / "server.log"),
            "-o", options,
            "-t", str(START_TIMEOUT_S),
            "-w",
            "start",
        ]
    )  # fmt: skip


def setting(server: PgServer, name: str) -> str:
    """What the running server says of one setting (`SHOW name`)."""
    with server.admin() as connection:
        row = connection.execute(
            psycopg.sql.SQL("SHOW {}").format(psycopg.sql.Identifier(name))
        ).fetchone()
    return str(row[0]) if row else ""


def check_durable(server: PgServer) -> None:
    """Raise unless the server syncs its commits: a crash test or a bench of durable commits
    on a server that does not sync them proves nothing."""
    for name in ("fsync", "synchronous_commit", "full_page_writes"):
        value = setting(server, name)
        if value != "on":
            raise RuntimeError(f"PostgreSQL runs with {name} = {value}, not on")


def pause(server: PgServer) -> None:
    """Stop the server but keep its data, as an outage would (`resume` brings it back)."""
    _run(server, [str(PG_BIN / "pg_ctl"), "-D", str(server.data), "-m", "fast", "-w", "stop"])


def resume(server: PgServer) -> None:
    """Start a paused server again on the same data and port."""
    _start_server(server)


def stop(server: PgServer) -> None:
    """Stop the server (fast shutdown: open sessions are ended) and remove its folder."""
    try:
        _run(server, [str(PG_BIN / "pg_ctl"), "-D", str(server.data), "-m", "fast", "-w", "stop"])
    finally:
        shutil.rmtree(server.folder, ignore_errors=True)


def _run(server: PgServer, command: list[str]) -> None:
    completed = subprocess.run(
        _as_server_user(command, server.netns), capture_output=True, text=True, check=False, cwd="/"
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{Path(command[0]).name} failed ({completed.returncode}): "
            f"{completed.stdout}\n{completed.stderr}"
        )

"""A PostgreSQL server whose host goes silent, played in network namespaces of our own.

Run as root inside a new network namespace (`unshare --net -- python -m tests.link_loss`):
it links that namespace to a second one by a virtual Ethernet pair (nothing leaves the
machine, nothing touches the host's own interfaces), starts a real PostgreSQL in the second,
and connects to it with the ledger's own engine (`gateway.ledger.db.make_engine`). Then the
server's namespace drops everything it would send back (a blackhole route: its links stay
up), which is what a crashed or cut-off host looks like from the client's side: no reset,
no refusal, nothing. It prints one JSON object: for each case, the seconds until the
ledger's connection gave up, or null when it still waited at `GIVE_UP_S`; and what a
terminal of `vipgate serve` was answered before, during and after the silence.

The ledger's link options (`db.POSTGRES_LINK_OPTIONS`) are made shorter here, the same
options at a few seconds each, so the cases take seconds rather than the production values'
tens of seconds. Exit status 77: this machine cannot make the namespaces (the test skips).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text

from gateway.handler import finish
from gateway.ledger import db
from tests import pg
from tests.gateway_harness import DEMO, DIAMOND, EXPIRY, TMKS, Harness, demo_config
from tests.spec_terminal import Link, SpecTerminal

CANNOT = 77
GIVE_UP_S = 15.0
CLIENT, SERVER = "10.203.0.1", "10.203.0.2"
SHORT = {
    "connect_timeout": 2,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 2,
    "tcp_user_timeout": 2_000,
}


def _ip(*command: str, netns: int | None = None) -> None:
    prefix = ["nsenter", "-t", str(netns), "-n", "--"] if netns is not None else []
    subprocess.run([*prefix, "ip", *command], check=True, capture_output=True, text=True)


def _second_namespace() -> subprocess.Popen[bytes]:
    """A process holding a network namespace of its own, linked to ours by a veth pair."""
    own = os.readlink("/proc/self/ns/net")
    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "600"])
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{holder.pid}/ns/net") == own:
        if time.monotonic() > deadline:
            raise RuntimeError("the second namespace was not made")
        time.sleep(0.01)
    _ip("link", "set", "lo", "up")
    _ip("link", "add", "vgate", "type", "veth", "peer", "name", "vledger")
    _ip("link", "set", "vledger", "netns", str(holder.pid))
    _ip("addr", "add", f"{CLIENT}/30", "dev", "vgate")
    _ip("link", "set", "vgate", "up")
    for command in (
        ("link", "set", "lo", "up"),
        ("addr", "add", f"{SERVER}/30", "dev", "vledger"),
        ("link", "set", "vledger", "up"),
    ):
        _ip(*command, netns=holder.pid)
    return holder


def _timed(work: Callable[[], object]) -> dict[str, Any]:
    """Seconds until `work` raised or returned, on a thread of its own; null if still at it."""
    ended: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            work()
            ended["outcome"] = "returned"
        except Exception as error:  # what ended it is the finding
            ended["outcome"] = type(error).__name__
        ended["seconds"] = round(time.monotonic() - started, 2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(GIVE_UP_S)
    return ended if ended else {"outcome": "still waiting", "seconds": None}


def _cases(server: pg.PgServer) -> dict[str, dict[str, Any]]:
    silence = ("route", "add", "blackhole", f"{CLIENT}/32")
    speak = ("route", "del", "blackhole", f"{CLIENT}/32")
    engine = db.make_engine(server.url("postgres"))
    found: dict[str, dict[str, Any]] = {}
    # A connection whose wait did not end is left as it is: closing it would wait too.
    # A statement sent after the host went silent: unacknowledged data.
    connection = engine.connect()
    connection.execute(text("SELECT 1"))
    _ip(*silence, netns=server.netns)
    found["statement_into_silence"] = _timed(lambda: connection.execute(text("SELECT 1")))
    _ip(*speak, netns=server.netns)
    # A statement the server took (its kernel acknowledged it) before the host went silent:
    # the client only waits for an answer, with nothing unacknowledged.
    other = engine.connect()
    other.execute(text("SELECT 1"))
    threading.Timer(0.5, lambda: _ip(*silence, netns=server.netns)).start()
    found["answer_from_silence"] = _timed(lambda: other.execute(text("SELECT pg_sleep(1)")))
    # A new connection to the silent host.
    found["connecting_into_silence"] = _timed(engine.connect)
    _ip(*speak, netns=server.netns)
    return found


GROUP = 6  # requests in the group the host goes silent under


def _group(server: pg.PgServer) -> dict[str, Any]:
    """The ledger thread as the server runs it (a held connection, deferred flushes): a group
    of `GROUP` redemptions prepared while the host answers, decided once it has gone silent;
    then the next group, still in the silence. Seconds each took, and the codes."""
    url = server.create_database("grouped")
    folder = Path(tempfile.mkdtemp(prefix="vipgate-link-loss-"))
    harness = Harness(demo_config(folder, url))
    db.sync_after_release(harness.engine)
    gateway = harness.gateway
    terminals = [harness.signed_on(terminal_id) for terminal_id in TMKS]
    found: dict[str, Any] = {}

    def group(size: int) -> list[tuple[SpecTerminal, bytes]]:
        sent = []
        for number in range(size):
            terminal = terminals[number % len(terminals)]
            fields = terminal.card_fields(DIAMOND, EXPIRY[DIAMOND])
            request = terminal.financial("0200", "000000", "22", fields, amount_fen=100)
            sent.append((terminal, request))
        return sent

    def decided(sent: list[tuple[SpecTerminal, bytes]], name: str, *, silence: bool) -> None:
        started = time.monotonic()
        prepared = gateway.prepare_group([request for _, request in sent])
        if silence:  # after the sessions' read: the group's own transaction meets it
            _ip("route", "add", "blackhole", f"{CLIENT}/32", netns=server.netns)
            started = time.monotonic()
        answers = [finish(answer) for answer in gateway.decide_prepared(prepared)]
        with contextlib.suppress(Exception):  # a flush into the silence fails: no answers
            for owed in db.take_owed_log_syncs():
                owed()
        found[f"{name}_seconds"] = round(time.monotonic() - started, 2)
        found[f"{name}_codes"] = [
            terminal.check(request, answer.payload).code if answer.payload else "closed"
            for (terminal, request), answer in zip(sent, answers, strict=True)
        ]

    def ledger_thread() -> None:
        with db.holding_connection(harness.engine), db.deferring_log_syncs():
            decided(group(len(terminals)), "warm", silence=False)
            decided(group(GROUP), "group", silence=True)
            decided(group(GROUP), "next_group", silence=False)

    thread = threading.Thread(target=ledger_thread, daemon=True)
    thread.start()
    thread.join(GIVE_UP_S * 4)
    _ip("route", "flush", "type", "blackhole", netns=server.netns)
    shutil.rmtree(folder, ignore_errors=True)
    return found


def _served(server: pg.PgServer) -> dict[str, Any]:
    """`vipgate serve` on that server (the same options, shortened, in its database URL: a
    process of its own cannot be patched): a redemption approved, then one sent into the
    silence, then one after the server's host speaks again."""
    url = server.create_database("ledger") + "?" + "&".join(f"{k}={v}" for k, v in SHORT.items())
    folder = Path(tempfile.mkdtemp(prefix="vipgate-link-loss-"))
    config = folder / "demo.toml"
    shutil.copy(DEMO, config)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).with_name("vipgate")), "serve", "--config", str(config)]
    command += ["--db", url, "--listen", f"127.0.0.1:{port}"]
    command += ["--clock", "2026-11-21T11:00:00+08:00"]
    log = (folder / "serve.log").open("w")
    gateway = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    found: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while '"listening"' not in (folder / "serve.log").read_text():
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise RuntimeError(
                    "vipgate serve did not start: " + (folder / "serve.log").read_text()
                )
            time.sleep(0.1)
        merchant, suite, tmk = TMKS["10000001"]
        terminal = SpecTerminal("10000001", merchant, suite, bytes.fromhex(tmk))
        link = Link("127.0.0.1", port, timeout=GIVE_UP_S)
        terminal.adopt_sign_on(
            terminal.check(request := terminal.sign_on(), link.exchange(request))
        )

        def redeem() -> str:
            card = terminal.card_fields(DIAMOND, "2906")
            request = terminal.financial("0200", "000000", "22", card, amount_fen=100)
            return terminal.check(request, link.exchange(request)).code

        found["before"] = redeem()
        _ip("route", "add", "blackhole", f"{CLIENT}/32", netns=server.netns)
        started = time.monotonic()
        try:
            found["in_silence"] = redeem()
        except OSError as error:  # no answer at all within GIVE_UP_S
            found["in_silence"] = type(error).__name__
        found["in_silence_seconds"] = round(time.monotonic() - started, 2)
        _ip("route", "del", "blackhole", f"{CLIENT}/32", netns=server.netns)
        time.sleep(1)
        found["after"] = redeem()
        found["serving"] = gateway.poll() is None
        link.close()
    finally:
        gateway.terminate()
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
    return found


def main() -> None:
    if os.geteuid() != 0:
        print("link_loss: needs root for network namespaces", file=sys.stderr)
        sys.exit(CANNOT)
    try:
        holder = _second_namespace()
    except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
        print(f"link_loss: no namespaces here: {error}", file=sys.stderr)
        sys.exit(CANNOT)
    server: pg.PgServer | None = None
    try:
        server = pg.start(host=SERVER, netns=holder.pid)
        db.POSTGRES_LINK_OPTIONS.update(SHORT)
        found: dict[str, Any] = dict(_cases(server))
        found["group"] = _group(server)
        found["served"] = _served(server)
        print(json.dumps(found), flush=True)
    finally:
        if server is not None:
            _ip("route", "flush", "type", "blackhole", netns=holder.pid)
            pg.stop(server)
        holder.kill()
        holder.wait()
    # A thread still waiting on a silent socket must not keep the process.
    os._exit(0)


if __name__ == "__main__":
    main()

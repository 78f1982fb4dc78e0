"""`make bench-gateway`: approvals per second and latency over loopback, SQLite and PostgreSQL.

Starts `vipgate serve` as its own process on a generated config (many terminals, cards with
plenty of points), drives it with terminals written from the spec over real TCP, and prints:
- closed loop: every terminal sends its next redemption as soon as the last is answered, for
  the duration: approved redemptions per second, p50/p99 latency;
- open loop: redemptions offered at a fixed rate (default 2000/s) spread over the terminals:
  the rate achieved, p50/p99 latency;
- on PostgreSQL, pgbench -N TPS on the same server (fsync on) in the same run.
Client and server share the machine, as the targets say. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cardcodec.cards import luhn_check_digit
from tests import pg
from tests.spec_terminal import SpecTerminal, parse

ROOT = Path(__file__).resolve().parents[1]
MERCHANT = "898310048990001"
HEADER = """[gateway]
listen = "127.0.0.1:8583"
database = "sqlite:///var/bench.db"
acquirer_institution = "48020000"
max_pending_per_connection = 64
[issuer]
id = "CMCCVIP00000001"
card_prefixes = ["668800"]
signing_key = "var/issuer.pem"
master_key = "var/master.key"
[plan]
[clearing]
acquirer_id = "ACQ000000000001"
terminal_fee_fen_per_month = 3000
[[merchants]]
id = "898310048990001"
name = "Bench Store"
fee_bp = 80
bank_card_fee_bp = 100
max_amount_fen = 5000000
"""


def card(serial: int) -> str:
    partial = f"668800{serial:012d}"
    return partial + luhn_check_digit(partial)


def tmk() -> bytes:
    while True:
        key = secrets.token_bytes(16)
        if key[:8] != key[8:]:
            return key


def write_config(folder: Path, terminals: int, cards: int) -> dict[str, bytes]:
    keys = {f"3{index:07d}": tmk() for index in range(terminals)}
    parts = [HEADER]
    for terminal_id, key in keys.items():
        parts.append(
            f'[[terminals]]\nid = "{terminal_id}"\nmerchant = "{MERCHANT}"\n'
            f'suite = "3des"\ntmk = "{key.hex().upper()}"\n'
        )
    for serial in range(1, cards + 1):
        parts.append(
            f'[[cards]]\nnumber = "{card(serial)}"\nexpiry = "3012"\ntier = "gold"\n'
            'enrolled = true\nlots = [{ points = 100000000, earned_on = "2026-11-01" }]\n'
        )
    (folder / "bench.toml").write_text("\n".join(parts), encoding="utf-8")
    return keys


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_gateway(folder: Path, database: str, port: int) -> subprocess.Popen[bytes]:
    command = [str(Path(sys.executable).with_name("vipgate")), "serve"]
    command += ["--config", str(folder / "bench.toml"), "--db", database]
    command += ["--listen", f"127.0.0.1:{port}", "--clock", "2026-11-18T10:00:00+08:00"]
    log = (folder / "gateway.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("the gateway did not start; see " + str(folder)) from None
            time.sleep(0.2)
    raise RuntimeError("the gateway did not start listening in time")


class Client:
    """One terminal on its own connection."""

    def __init__(self, terminal: SpecTerminal, card_number: str) -> None:
        self.terminal = terminal
        self.card = card_number
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def connect(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        request = self.terminal.sign_on()
        answer = await self.exchange(request)
        self.terminal.adopt_sign_on(self.terminal.check(request, answer))

    async def exchange(self, payload: bytes) -> bytes:
        self.writer.write(len(payload).to_bytes(2, "big") + payload)
        length = int.from_bytes(await self.reader.readexactly(2), "big")
        return await self.reader.readexactly(length)

    def redemption(self) -> bytes:
        fields = self.terminal.card_fields(self.card, "3012")
        return self.terminal.financial("0200", "000000", "22", fields, amount_fen=100)

    async def redeem(self, latencies: list[float], codes: dict[str, int]) -> None:
        request = self.redemption()
        started = time.perf_counter()
        answer = await self.exchange(request)
        latencies.append(time.perf_counter() - started)
        code = str(parse(answer)[1][39])
        codes[code] = codes.get(code, 0) + 1


async def closed_loop(clients: list[Client], duration: float) -> tuple[list[float], dict[str, int]]:
    latencies: list[float] = []
    codes: dict[str, int] = {}
    stop = time.monotonic() + duration

    async def run(client: Client) -> None:
        while time.monotonic() < stop:
            await client.redeem(latencies, codes)

    await asyncio.gather(*(run(client) for client in clients))
    return latencies, codes


async def open_loop(
    clients: list[Client], rate: float, duration: float
) -> tuple[list[float], dict[str, int], float]:
    latencies: list[float] = []
    codes: dict[str, int] = {}
    per_client = rate / len(clients)
    started = time.monotonic()

    async def run(client: Client, offset: float) -> None:
        queue: asyncio.Queue[None] = asyncio.Queue()

        async def sender() -> None:
            while not queue.empty() or time.monotonic() - started < duration:
                await queue.get()
                await client.redeem(latencies, codes)

        task = asyncio.create_task(sender())
        count = 0
        while True:
            due = started + offset + count / per_client
            if due - started >= duration:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            queue.put_nowait(None)
            count += 1
        await asyncio.wait_for(task, timeout=duration + 60)

    spread = 1 / rate
    await asyncio.gather(*(run(c, i * spread) for i, c in enumerate(clients)))
    return latencies, codes, time.monotonic() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000 if ordered else 0.0


async def measure(port: int, keys: dict[str, bytes], args: argparse.Namespace) -> None:
    clients = [
        Client(SpecTerminal(terminal_id, MERCHANT, "3des", key), card(index % args.cards + 1))
        for index, (terminal_id, key) in enumerate(keys.items())
    ]
    for client in clients:
        await client.connect(port)
    latencies, codes = await closed_loop(clients, args.duration)
    approved = codes.get("00", 0)
    print(
        f"  closed loop, {len(clients)} terminals, {args.duration:.0f} s: "
        f"{approved / args.duration:,.0f} approved redemptions/s; "
        f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms; "
        f"codes {codes}"
    )
    latencies, codes, elapsed = await open_loop(clients, args.rate, args.duration)
    print(
        f"  open loop at {args.rate:,.0f}/s offered: {len(latencies) / elapsed:,.0f}/s achieved; "
        f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms; "
        f"codes {codes}"
    )


def pgbench_tps(server: pg.PgServer, seconds: int) -> str:
    server.create_database("pgbench")
    base = ["-h", "127.0.0.1", "-p", str(server.port), "-U", pg.SUPERUSER]
    initialise = ["pgbench", "-i", "-q", "-s", "10", *base, "pgbench"]
    subprocess.run(initialise, check=True, capture_output=True)
    result = subprocess.run(
        ["pgbench", "-N", "-c", "8", "-j", "2", "-T", str(seconds), *base, "pgbench"],
        check=True,
        capture_output=True,
        text=True,
    )
    match = re.search(r"tps = ([\d.]+)", result.stdout)
    return match.group(1) if match else "?"


def run_backend(backend: str, args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix=f"vipgate-bench-{backend}-"))
    (folder / "var").mkdir()
    keys = write_config(folder, args.terminals, args.cards)
    server: pg.PgServer | None = None
    try:
        if backend == "postgresql":
            server = pg.start()
            with server.admin() as admin:
                admin.execute("ALTER SYSTEM SET fsync = on")
                admin.execute("ALTER SYSTEM SET synchronous_commit = on")
                admin.execute("SELECT pg_reload_conf()")
            database = server.create_database("bench")
        else:
            database = f"sqlite:///{folder / 'var' / 'bench.db'}"
        port = free_port()
        print(f"{backend}: starting the gateway ({args.terminals} terminals, {args.cards} cards)")
        gateway = start_gateway(folder, database, port)
        try:
            asyncio.run(measure(port, keys, args))
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=60)
        if server is not None:
            print(f"  pgbench -N on the same server: {pgbench_tps(server, int(args.duration))} TPS")
    finally:
        if server is not None:
            pg.stop(server)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--terminals", type=int, default=int(os.environ.get("TERMINALS", "20")))
    parser.add_argument("--cards", type=int, default=20)
    parser.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", "10")))
    parser.add_argument("--rate", type=float, default=float(os.environ.get("RATE", "2000")))
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    for backend in backends:
        if backend == "postgresql" and pg.missing_binaries():
            print(f"postgresql: skipped ({pg.missing_binaries()})")
            continue
        run_backend(backend, args)


if __name__ == "__main__":
    main()

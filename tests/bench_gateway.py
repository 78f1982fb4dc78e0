"""`make bench-gateway`: approvals per second and latency over loopback, SQLite and PostgreSQL.

Starts `vipgate serve` as its own process on a generated config (many terminals, cards with
plenty of points), drives it with terminals written from the spec over real TCP, and prints:
- closed loop: every terminal sends its next redemption as soon as the last is answered, for
  the duration: approved redemptions per second, p50/p99 latency;
- open loop: redemptions offered at a fixed rate (default 2000/s) spread over the terminals:
  the rate achieved, p50/p99 latency;
- on PostgreSQL, the same for `vipgate serve --workers N` with N = 1, 2 and 4 (WORKERS may
  list others), then a table of the figures side by side with pgbench -N TPS on the same server
  (fsync on) in the same run: how far worker processes take the gateway towards what the
  database alone can commit.
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
from dataclasses import dataclass
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


def start_gateway(
    folder: Path, database: str, port: int, workers: int = 1
) -> subprocess.Popen[bytes]:
    command = [str(Path(sys.executable).with_name("vipgate")), "serve"]
    command += ["--config", str(folder / "bench.toml"), "--db", database]
    command += ["--listen", f"127.0.0.1:{port}", "--clock", "2026-11-18T10:00:00+08:00"]
    command += ["--workers", str(workers)]
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
        queue: asyncio.Queue[bool] = asyncio.Queue()

        async def sender() -> None:
            # Requests still queued when the duration is over are not sent: a gateway slower
            # than the offered rate shows as a lower rate achieved, not as a run that never ends.
            while await queue.get() and time.monotonic() - started < duration:
                await client.redeem(latencies, codes)

        task = asyncio.create_task(sender())
        count = 0
        while True:
            due = started + offset + count / per_client
            if due - started >= duration:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            queue.put_nowait(True)
            count += 1
        queue.put_nowait(False)
        await asyncio.wait_for(task, timeout=duration + 60)

    spread = 1 / rate
    await asyncio.gather(*(run(c, i * spread) for i, c in enumerate(clients)))
    return latencies, codes, time.monotonic() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000 if ordered else 0.0


@dataclass(frozen=True)
class Figures:
    """One gateway run: closed loop approvals/s and latency, open loop rate achieved."""

    closed_per_s: float
    closed_p50_ms: float
    closed_p99_ms: float
    open_per_s: float
    open_p50_ms: float
    open_p99_ms: float


async def measure(port: int, keys: dict[str, bytes], args: argparse.Namespace) -> Figures:
    clients = [
        Client(SpecTerminal(terminal_id, MERCHANT, "3des", key), card(index % args.cards + 1))
        for index, (terminal_id, key) in enumerate(keys.items())
    ]
    for client in clients:
        await client.connect(port)
    latencies, codes = await closed_loop(clients, args.duration)
    approved = codes.get("00", 0)
    closed = (approved / args.duration, percentile(latencies, 0.5), percentile(latencies, 0.99))
    print(
        f"  closed loop, {len(clients)} terminals, {args.duration:.0f} s: "
        f"{closed[0]:,.0f} approved redemptions/s; "
        f"p50 {closed[1]:.1f} ms, p99 {closed[2]:.1f} ms; "
        f"codes {codes}"
    )
    latencies, codes, elapsed = await open_loop(clients, args.rate, args.duration)
    opened = (len(latencies) / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99))
    print(
        f"  open loop at {args.rate:,.0f}/s offered: {opened[0]:,.0f}/s achieved; "
        f"p50 {opened[1]:.1f} ms, p99 {opened[2]:.1f} ms; "
        f"codes {codes}"
    )
    for client in clients:
        client.writer.close()
    return Figures(*closed, *opened)


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
        counts = args.workers if backend == "postgresql" else [1]
        figures: dict[int, Figures] = {}
        for workers in counts:
            # A new database per run: the same start for each, and the fixed --clock is
            # refused on a ledger holding later transactions.
            if server is not None:
                database = server.create_database(f"bench_{workers}_workers")
            else:
                database = f"sqlite:///{folder / 'var' / 'bench.db'}"
            figures[workers] = run_gateway(
                backend, folder, database, keys, workers=workers, args=args
            )
        if server is not None:
            tps = pgbench_tps(server, int(args.duration))
            print(f"  pgbench -N on the same server: {tps} TPS")
            print_table(figures, tps)
    finally:
        if server is not None:
            pg.stop(server)
        shutil.rmtree(folder, ignore_errors=True)


def run_gateway(
    backend: str,
    folder: Path,
    database: str,
    keys: dict[str, bytes],
    *,
    workers: int,
    args: argparse.Namespace,
) -> Figures:
    port = free_port()
    processes = f", {workers} worker processes" if workers > 1 else ""
    print(
        f"{backend}: starting the gateway ({args.terminals} terminals, {args.cards} cards"
        f"{processes})"
    )
    gateway = start_gateway(folder, database, port, workers)
    try:
        return asyncio.run(measure(port, keys, args))
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=60)


def print_table(figures: dict[int, Figures], tps: str) -> None:
    pgbench = f"{float(tps):,.0f}" if tps.replace(".", "", 1).isdigit() else tps
    print("  postgresql side by side (approved redemptions/s; latency p50/p99 ms):")
    print(
        f"  {'workers':>7}  {'closed loop':>11}  {'p50/p99':>13}  {'open loop':>9}  {'p50/p99':>13}"
    )
    for workers, f in figures.items():
        print(
            f"  {workers:>7}  {f.closed_per_s:>11,.0f}  "
            f"{f'{f.closed_p50_ms:.1f}/{f.closed_p99_ms:.1f}':>13}  {f.open_per_s:>9,.0f}  "
            f"{f'{f.open_p50_ms:.1f}/{f.open_p99_ms:.1f}':>13}"
        )
    print(f"  {'pgbench':>7}  {pgbench:>11} TPS (-N, 8 clients, fsync and synchronous_commit on)")


def worker_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or any(not 1 <= n <= 64 for n in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: worker counts 1-64, comma separated")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--terminals", type=int, default=int(os.environ.get("TERMINALS", "20")))
    parser.add_argument("--cards", type=int, default=20)
    parser.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", "10")))
    parser.add_argument("--rate", type=float, default=float(os.environ.get("RATE", "2000")))
    parser.add_argument(
        "--workers",
        type=worker_counts,
        default=worker_counts(os.environ.get("WORKERS", "1,2,4")),
        help="worker processes to measure on PostgreSQL, comma separated (default 1,2,4)",
    )
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    for backend in backends:
        if backend == "postgresql" and pg.missing_binaries():
            print(f"postgresql: skipped ({pg.missing_binaries()})")
            continue
        run_backend(backend, args)


if __name__ == "__main__":
    main()

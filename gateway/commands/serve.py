"""`vipgate serve`: migrate, load the config, serve terminals until SIGTERM/SIGINT.

`--workers N` (N > 1) serves from N forked worker processes on one port (gateway/workers.py);
the migration and the config load still happen once, here, before they start. `--metrics
HOST:PORT` is served by this process's reactor, or with `--workers N` by every worker on a port
the parent binds, each scrape answered with the sum over the workers (gateway/metrics.py).

`--record FILE` writes the traffic log in the simulators' format (`simulators.recording`), so a
recording made at the gateway reads like one made at a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway import logs, server, workers
from gateway.config import load_config
from gateway.errors import BadInput
from simulators.recording import FileRecorder

if TYPE_CHECKING:  # prometheus_client is imported only when metrics are on
    from gateway.metrics import Metrics

log = structlog.get_logger("vipgate.serve")


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("serve", parents=[common], help="serve terminals")
    parser.add_argument("--listen", metavar="HOST:PORT", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--metrics", metavar="HOST:PORT", default=None)
    parser.add_argument("--record", metavar="FILE", default=None)
    parser.add_argument("--clock", metavar="ISO8601", default=None)
    parser.set_defaults(handler=serve)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, or [IPv6]:PORT as in the config's `listen`."""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise BadInput(f"--listen: {text!r} is not HOST:PORT")
    return host, int(port)


# Below this many file descriptors a process says so when it starts: each terminal's
# connection holds one, and the service unit allows 65,536 (config/deploy/vipgate@.service).
# Below the fewest it refuses to start: its database, log, ports and links hold about 15.
FEW_DESCRIPTORS = 1024
FEWEST_DESCRIPTORS = 32


def _descriptors_checked() -> int | None:
    """The number of files the process may open when it is few (`FEW_DESCRIPTORS`), else
    None; too few to serve anything (`FEWEST_DESCRIPTORS`) is refused (exit 2) before the
    ledger is touched. Started with fewer, `serve` stopped with a traceback (EMFILE) or
    listened and then closed every connection it could not take."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= FEW_DESCRIPTORS:
        return None
    if soft < FEWEST_DESCRIPTORS:
        raise BadInput(
            f"ulimit -n: this process may open {soft} files, and serving needs at least"
            f" {FEWEST_DESCRIPTORS} (each terminal's connection holds one); raise the limit"
            " (LimitNOFILE= for a systemd service)"
        )
    return soft


def serve(args: argparse.Namespace) -> int:
    workers.check_count(args.workers)
    few = _descriptors_checked()
    if args.workers > 1 and args.record is not None:
        raise BadInput("--record: one traffic log needs one process; use it with --workers 1")
    measured: Metrics | None = None  # one process: its metrics, already served
    metrics_at: tuple[str, int] | None = None  # several: where the parent binds for the workers
    if args.metrics is not None:  # HOST:PORT checked first (exit 2)
        from gateway import metrics  # noqa: PLC0415 (prometheus_client only when asked for)

        if args.workers > 1:
            metrics_at = metrics.parse_address(args.metrics)
        else:
            measured = metrics.start(args.metrics)
    config = load_config(args.config, args.db)
    listen = parse_listen(args.listen) if args.listen else config.gateway.listen
    clock_start = server.parse_clock(args.clock) if args.clock else None
    # The ports and the traffic log are had before the ledger is touched: a port taken or a
    # log that cannot be opened is refused (exit 2) with the ledger as it was.
    source = "--listen" if args.listen else f"{args.config}: gateway.listen"
    listening = workers.bind(*listen, source)
    shared: workers.SharedMetrics | None = None
    try:
        if metrics_at is not None:
            shared = workers.SharedMetrics.open(*metrics_at)
        with _recording(args.record) as recorder:
            logs.configure()
            wiring = server.wire(args.config, args.db, clock_start)
            # How this gateway runs, for whoever reads its log: a rehearsal clock shifts
            # every business date while the log's own times stay the machine's, and a
            # recording holds card data.
            log.info(
                "serving_with",
                workers=args.workers,
                clock=None if clock_start is None else clock_start.isoformat(),
                metrics=args.metrics,
                record=args.record,
            )
            if few is not None:
                log.warning(
                    "file_limit_low",
                    limit=few,
                    advice="each terminal's connection holds a file descriptor: raise"
                    " `ulimit -n` (LimitNOFILE= for a systemd service)",
                )
            if args.workers > 1:
                return workers.serve(wiring, listening, args.workers, shared)
            # The reactor is imported when it is needed, never at module level (Twisted's
            # standard).
            from twisted.internet import reactor  # noqa: PLC0415

            record = recorder.record if recorder is not None else None
            return server.run(
                wiring, listen, reactor, record=record, adopt=listening, metrics=measured
            )
    finally:
        listening.close()  # (the reactor or the workers hold their own descriptors)
        if shared is not None:
            shared.close()  # (again, if the workers ran: closing it twice is harmless)


@contextlib.contextmanager
def _recording(path: str | None) -> Iterator[FileRecorder | None]:
    """`--record`'s traffic log, open for the command; a file made for it is removed again
    when the command is refused before serving."""
    if path is None:
        yield None
        return
    target = Path(path)
    existed = target.exists()
    recorder = FileRecorder(target)
    served = False
    try:
        with recorder:
            yield recorder
            served = True
    finally:
        if not served and not existed and target.exists() and target.stat().st_size == 0:
            target.unlink()

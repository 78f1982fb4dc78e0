"""`vipgate sim run|load|replay`: the terminal simulators from the command line.

The simulators are clients of the public protocol: they read the config for the terminals'
ids, keys and the demo cards, and talk to a gateway over TCP, never to its database (`--db`
is accepted, as by every command, and not used). The target is `--target HOST:PORT`, or the
config's `gateway.listen`; a gateway that cannot be reached is refused (exit 2) before
anything is sent, and so is a bad scenario, recording or option. A check that ran and found a
fault exits 1: a scenario mismatch, an unbalanced settlement, a replayed answer that differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any, Final, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gateway.cli import EXIT_INTERRUPTED, one_line
from gateway.config import Config, load_config
from gateway.errors import BadInput, CheckFailed
from simulators.connection import Connection
from simulators.load import (
    DEFAULT_ANSWER_TIMEOUT_S,
    PROGRESS_INTERVAL_S,
    LoadPlan,
    Snapshot,
    choose_terminals,
    run_load,
    usable_cards,
)
from simulators.recording import FileRecorder
from simulators.replay import load_recording, replay
from simulators.scenario import load_scenario, run_scenario_file

PROBE_TIMEOUT_S: Final = 5.0
PLAIN_PROGRESS_INTERVAL_S: Final = 1.0
BAR_WIDTH: Final = 20


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    group = subparsers.add_parser("sim", help="terminal simulators: scenarios, load, replay")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)

    run = actions.add_parser(
        "run", parents=[common], help="play a scenario file; exit 1 on any mismatch"
    )
    run.add_argument("scenario", metavar="SCENARIO", type=Path)
    _target_option(run)
    run.add_argument("--record", metavar="FILE", type=Path, help="append the traffic log here")
    run.set_defaults(handler=run_command)

    load = actions.add_parser(
        "load", parents=[common], help="N terminals at a rate for a duration, then settlement"
    )
    _target_option(load)
    load.add_argument(
        "--terminals", metavar="N", type=int, required=True, help="terminals of the config"
    )
    load.add_argument(
        "--rate", metavar="PER_S", type=float, required=True, help="requests/s, all terminals"
    )
    load.add_argument(
        "--duration", metavar="S", type=float, required=True, help="seconds before settlement"
    )
    _timeout_option(load)
    load.add_argument("--seed", type=int, help="seed of the mix, to repeat a load")
    load.add_argument("--record", metavar="FILE", type=Path, help="append the traffic log here")
    load.add_argument("--json", action="store_true", help="the summary as one JSON object")
    load.set_defaults(handler=load_command)

    again = actions.add_parser(
        "replay", parents=[common], help="send a recording's requests again; report differences"
    )
    again.add_argument("log", metavar="LOG", type=Path)
    _target_option(again)
    _timeout_option(again)
    again.set_defaults(handler=replay_command)


def _target_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", metavar="HOST:PORT", help="the gateway (default: the config's listen)"
    )


def _timeout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=DEFAULT_ANSWER_TIMEOUT_S,
        help=f"seconds to wait for each answer (default {DEFAULT_ANSWER_TIMEOUT_S:g})",
    )


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise BadInput(f"--target: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def reachable_target(args: argparse.Namespace, config: Config) -> tuple[str, int]:
    """The gateway to talk to, after one connection to it opened and closed."""
    target = parse_target(args.target) if args.target else config.gateway.listen
    try:
        socket.create_connection(target, timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise BadInput(
            f"cannot connect to the gateway at {_show(target)}: {reason} "
            "(is `vipgate serve` running there? One serving elsewhere: --target HOST:PORT)"
        ) from None
    return target


def _show(target: tuple[str, int]) -> str:
    return f"{target[0]}:{target[1]}"


# --- sim run --------------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    scenario = load_scenario(args.scenario, config)  # refused (exit 2) before any traffic
    target = reachable_target(args, config)
    report = run_scenario_file(args.scenario, args.config, target, args.record)
    print(report.render(), end="")
    if report.interruption is not None:
        # Not the generic message of an interrupted command: nothing was rolled back, and
        # running the scenario again plays it from step 1; the report of what was played
        # comes first.
        sys.stdout.flush()
        print(f"vipgate: {one_line(report.interruption)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if report.failed:
        raise CheckFailed(
            f"scenario {args.scenario}: {report.failed} of {len(scenario.steps)} steps failed"
        )
    return 0


# --- sim load -------------------------------------------------------------------------------


def load_command(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    plan = LoadPlan(args.terminals, args.rate, args.duration, args.timeout)
    if args.seed is not None:
        plan = dataclasses.replace(plan, seed=args.seed)
    choose_terminals(config, plan.terminals)
    _refuse_a_rate_the_gateway_closes(args.config, config, plan)
    if not usable_cards(config):
        raise BadInput(f"{args.config}: no card that is active and enrolled to redeem with")
    target = reachable_target(args, config)
    recorder = FileRecorder(args.record) if args.record is not None else None
    progress = _progress_line(sys.stderr, plan.duration_s)
    try:
        summary = run_load(
            config,
            _show(target),
            plan,
            lambda: Connection.open(
                target, answer_timeout_s=plan.answer_timeout_s, recorder=recorder
            ),
            progress.update,
        )
    finally:
        progress.close()
        if recorder is not None:
            recorder.close()
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(summary.render(), end="")
    if summary.unsettled:
        raise CheckFailed(
            f"settlement check: not balanced at {', '.join(summary.unsettled)}"
            + "".join(f"; {failure}" for failure in summary.failures)
        )
    return 0


def _refuse_a_rate_the_gateway_closes(path: Path, config: Config, plan: LoadPlan) -> None:
    """Each terminal's share of the rate must be within what the gateway lets a terminal send
    (`max_frames_per_second_per_terminal`): above it the gateway closes the terminal's link,
    and the load would measure that rather than the gateway."""
    limit = config.gateway.max_frames_per_second_per_terminal
    share = plan.rate_per_s / plan.terminals
    if share > limit:
        raise BadInput(
            f"--rate {plan.rate_per_s:g}: {share:g} requests/s for each of {plan.terminals}"
            f" terminals, above the {limit} frames/s a terminal may send"
            f" (max_frames_per_second_per_terminal in {path}); give more --terminals or a"
            " lower --rate"
        )


class PlainProgress:
    """The progress line rewritten in place with a carriage return, at most once a second:
    for a stderr that is no terminal (a log keeps each version)."""

    def __init__(self, stream: TextIO, interval_s: float = PLAIN_PROGRESS_INTERVAL_S) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self.last = float("-inf")
        self.width = 0

    def update(self, snapshot: Snapshot) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return
        self.last = now
        line = snapshot.line()
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = max(self.width, len(line))

    def close(self) -> None:
        if self.width:
            self.stream.write("\n")
            self.stream.flush()


class RichProgress:
    """The progress line with a bar, redrawn by rich a few times a second on a terminal."""

    def __init__(self, duration_s: float) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=BAR_WIDTH),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            refresh_per_second=1 / PROGRESS_INTERVAL_S,
        )
        self.task = self.progress.add_task("load starting", total=duration_s)
        self.progress.start()
        self.duration_s = duration_s

    def update(self, snapshot: Snapshot) -> None:
        done = min(snapshot.elapsed_s, self.duration_s)
        # Cut the text to leave room for the bar and the time, which rich would drop first.
        room = max(20, self.progress.console.width - BAR_WIDTH - 12)
        line = snapshot.line()
        text = line if len(line) <= room else line[: room - 1] + "…"
        self.progress.update(self.task, completed=done, description=text)

    def close(self) -> None:
        self.progress.stop()


def _progress_line(stream: TextIO, duration_s: float) -> PlainProgress | RichProgress:
    return RichProgress(duration_s) if stream.isatty() else PlainProgress(stream)


# --- sim replay -----------------------------------------------------------------------------


def replay_command(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    recording = load_recording(args.log, config)  # refused (exit 2) before any traffic
    if not 0 < args.timeout <= 60:
        raise BadInput(f"--timeout: {args.timeout:g} is outside the range above 0 up to 60")
    target = reachable_target(args, config)
    report = replay(
        recording,
        config,
        lambda: Connection.open(target, answer_timeout_s=args.timeout),
    )
    print(report.render(), end="")
    if report.differing:
        raise CheckFailed(
            f"replay of {args.log}: {len(report.differing)} of {len(report.exchanges)} "
            "answers differ from the recording"
        )
    return 0

"""End to end: `vipgate serve` as its own process on loopback, on SQLite and PostgreSQL,
with the spec terminal over real TCP; then SIGTERM, a clean exit, and logs without card data."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulators.recording import read_recording
from tests.gateway_harness import DEMO, DIAMOND, GOLD_PIN, TMKS
from tests.logscan import LeakWatch
from tests.spec_terminal import Answer, Link, SpecTerminal, build

VIPGATE = Path(sys.executable).with_name("vipgate")
# `vipgate` with Ctrl-C's and a hang-up's default handling: a process started in the
# background by a non-interactive shell (a CI runner, `cmd &`) inherits SIGINT ignored, and
# one under `nohup` SIGHUP, and the gateway keeps an inherited ignore, so the signal would
# do nothing.
CTRL_C_AS_USUAL = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.signal(signal.SIGHUP, signal.SIG_DFL); "
    "from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
)
FULL_CARD = re.compile(r"(?<!\d)6688\d{15}(?!\d)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Served:
    process: subprocess.Popen[str]
    port: int
    lines: list[str]
    recording: Path

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=30)
        self.lines += out.splitlines()
        return self.process.returncode


@pytest.fixture
def served(tmp_path: Path, ledger_url: str, leak_watch: LeakWatch) -> Iterator[Served]:
    """`vipgate serve` on a copy of the demo config, its ledger on the backend under test."""
    config = tmp_path / "demo.toml"
    shutil.copy(DEMO, config)
    port = free_port()
    # Ctrl-C as an operator's shell leaves it, whatever a background test run inherited.
    command = [str(VIPGATE.parent / "python"), "-c", CTRL_C_AS_USUAL, "serve"]
    command += ["--config", str(config), "--db", ledger_url]
    command += ["--listen", f"127.0.0.1:{port}", "--clock", "2026-11-21T11:00:00+08:00"]
    recording = tmp_path / "traffic.jsonl"
    command += ["--record", str(recording)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ)
    )
    lines: list[str] = []
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if '"listening"' in line:
            break
    else:
        process.kill()
    assert any('"listening"' in line for line in lines), "".join(lines)
    serving = Served(process, port, lines, recording)
    yield serving
    if process.poll() is None:
        process.kill()
        process.wait()
    if not process.stdout.closed:
        lines += process.stdout.readlines()
    leak_watch.text("vipgate serve output", "\n".join(lines))


def exchange(link: Link, terminal: SpecTerminal, request: bytes) -> Answer:
    return terminal.check(request, link.exchange(request))


def terminal_for(terminal_id: str) -> SpecTerminal:
    merchant, suite, tmk = TMKS[terminal_id]
    return SpecTerminal(terminal_id, merchant, suite, bytes.fromhex(tmk))


def test_the_log_says_how_the_gateway_runs(served: Served) -> None:
    """Before it listens the gateway says how it runs: its rehearsal clock (the log's own
    times stay the machine's), its processes, metrics and the recording of card data."""
    [line] = [json.loads(line) for line in served.lines if '"serving_with"' in line]
    assert (line["clock"], line["workers"], line["metrics"], line["record"]) == (
        "2026-11-21T11:00:00+08:00",
        1,
        None,
        str(served.recording),
    )


def test_a_merchant_day_over_tcp_then_sigterm(served: Served, leak_watch: LeakWatch) -> None:
    """Sign on, balance, redeem with a discount, void, refund, settle; then a clean stop."""
    link = Link("127.0.0.1", served.port)
    terminal = terminal_for("10000001")
    signed_on = exchange(link, terminal, terminal.sign_on(with_tdk=True))
    assert signed_on.code == "00"
    terminal.adopt_sign_on(signed_on)
    assert terminal.tdk is not None
    leak_watch.keys(PIK=terminal.pik, MAK=terminal.mak, TDK=terminal.tdk)
    pin_card = terminal.card_fields(GOLD_PIN, "2812", pin="123456")
    assert isinstance(pin_card[52], bytes)
    leak_watch.keys(PIN_block=pin_card[52])
    balance = exchange(link, terminal, terminal.financial("0200", "310000", "01", pin_card))
    assert (balance.code, balance.balance) == ("00", 100000)
    card = terminal.card_fields(DIAMOND, "2906", encrypt_track_data=True)
    redemption_request = terminal.financial("0200", "000000", "22", card, amount_fen=12800)
    redemption = exchange(link, terminal, redemption_request)
    assert (redemption.code, redemption.points, redemption.discount_bp) == ("00", 5760, 1000)
    void_extra: dict[int, str | bytes] = {37: redemption.text(37)}
    void_extra[61] = "000001" + redemption.text(11)
    void = exchange(
        link,
        terminal,
        terminal.financial("0200", "200000", "23", card, amount_fen=12800, extra=void_extra),
    )
    assert (void.code, void.balance) == ("00", 50000)
    second = exchange(
        link, terminal, terminal.financial("0200", "000000", "22", card, amount_fen=20000)
    )
    refund_extra: dict[int, str | bytes] = {
        37: second.text(37),
        61: "000001" + second.text(11) + second.text(13),
    }
    refund = exchange(
        link,
        terminal,
        terminal.financial("0220", "200000", "25", card, amount_fen=5000, extra=refund_extra),
    )
    assert (refund.code, refund.points) == ("00", 2250)
    # debits: the two redemptions (voided one included); credits: the void and the refund
    totals = f"{32800:012d}{2:03d}{17800:012d}{2:03d}0" + "0" * 31
    settle_fields: dict[int, str | bytes] = {11: terminal.next_trace(), **terminal.ids()}
    settle_fields.update({48: totals, 49: "156", 60: "00000001201", 63: "01 "})
    settled = exchange(link, terminal, terminal.signed("0500", settle_fields))
    assert (settled.code, settled.text(48)[30]) == ("00", "1")
    link.close()
    assert served.stop() == 0
    log = "".join(served.lines)
    assert FULL_CARD.search(log) is None, "a full card number reached the log"
    answered = [json.loads(line) for line in served.lines if '"answered"' in line]
    assert {entry["code"] for entry in answered} == {"00"}
    assert any(entry.get("card") == "668800*********0124" for entry in answered)


def test_many_connections_and_a_garbage_one_do_not_disturb_each_other(served: Served) -> None:
    """A connection sending garbage is closed; the others keep being answered."""
    garbage = socket.create_connection(("127.0.0.1", served.port))
    garbage.sendall(b"\x00\x05hello")
    links = [Link("127.0.0.1", served.port) for _ in range(3)]
    for terminal_id, link in zip(("10000001", "10000002", "20000001"), links, strict=True):
        terminal = terminal_for(terminal_id)
        answer = exchange(link, terminal, terminal.sign_on())
        assert answer.code == "00"
    assert garbage.recv(100) == b""
    garbage.close()
    for link in links:
        link.close()
    assert served.stop() == 0
    recorded = read_recording(served.recording)
    signs_on = [r for r in recorded if r.frame[13:15] == b"\x08\x00"]
    answers = [r for r in recorded if r.frame[13:15] == b"\x08\x10"]
    assert len(signs_on) == len(answers) == 3
    assert {r.direction for r in signs_on} == {"out"}
    assert {r.terminal for r in answers} == {"10000001", "10000002", "20000001"}


def test_sigterm_answers_every_request_in_flight(served: Served) -> None:
    """SIGTERM with 60 redemptions in flight on three links: every one is answered before its
    link closes (an approval committed but never sent would be reversed), then exit 0."""
    links = []
    for terminal_id in ("10000001", "10000002", "20000001"):
        terminal, link = terminal_for(terminal_id), Link("127.0.0.1", served.port)
        terminal.adopt_sign_on(exchange(link, terminal, terminal.sign_on()))
        links.append((terminal, link))
    sent = []
    for terminal, link in links:
        card = terminal.card_fields(DIAMOND, "2906")
        requests = [
            terminal.financial("0200", "000000", "22", card, amount_fen=100) for _ in range(20)
        ]
        link.socket.sendall(b"".join(len(r).to_bytes(2, "big") + r for r in requests))
        sent.append(requests)
    served.process.send_signal(signal.SIGTERM)
    codes = [
        terminal.check(request, link.receive()).code
        for (terminal, link), requests in zip(links, sent, strict=True)
        for request in requests
    ]
    assert codes == ["00"] * 60
    for _, link in links:
        with pytest.raises(ConnectionError):
            link.receive()  # closed by the gateway once answered
        link.close()
    out, _ = served.process.communicate(timeout=60)  # the one SIGTERM above, no other
    served.lines += out.splitlines()
    assert served.process.returncode == 0


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_log_reader_gone_costs_no_answer_and_the_drain_still_ends_in_0(
    served: Served, stop: signal.Signals
) -> None:
    """The log's reader goes away (`vipgate serve | tee`, the session that ran it hung up):
    every request sent is still answered, and a stop signal then drains and exits 0. A log
    line that could not be written raised: an answer's log line cost its link, and the
    drain, which begins with one, was cut short (committed approvals unanswered), exit 1 or
    141."""
    assert served.process.stdout is not None
    served.process.stdout.close()  # the gateway's next line meets a pipe without a reader
    link = Link("127.0.0.1", served.port)
    terminal = terminal_for("10000001")
    signed_on = exchange(link, terminal, terminal.sign_on())
    assert signed_on.code == "00"
    terminal.adopt_sign_on(signed_on)
    card = terminal.card_fields(DIAMOND, "2906")
    assert (
        exchange(
            link, terminal, terminal.financial("0200", "000000", "22", card, amount_fen=100)
        ).code
        == "00"
    )
    requests = [terminal.financial("0200", "000000", "22", card, amount_fen=100) for _ in range(5)]
    for request in requests:
        link.send(request)
    codes = [terminal.check(request, link.receive()).code for request in requests]
    assert codes == ["00"] * 5
    served.process.send_signal(stop)
    assert served.process.wait(timeout=60) == 0
    with pytest.raises(ConnectionError):
        link.receive()  # closed by the drain, once nothing was in flight
    link.close()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stop_signals_at_the_listening_line_and_again_drain_once_and_exit_0(
    served: Served, stop: signal.Signals
) -> None:
    """A stop signal the moment `listening` is logged, and a second one during the drain (an
    operator pressing Ctrl-C twice): one drain, a `stopped` line, exit 0, and nothing on
    stdout but JSON lines. A hang-up (SIGHUP: the operator's session gone) drains as well.
    Twisted's handlers came only once the reactor ran: the first signal killed the process
    without a drain, and a second during the stop printed a `ReactorNotRunning` traceback."""
    served.process.send_signal(stop)
    time.sleep(0.02)
    served.process.send_signal(stop)
    out, _ = served.process.communicate(timeout=60)
    served.lines += out.splitlines()
    assert served.process.returncode == 0
    events = [json.loads(line)["event"] for line in served.lines if line.strip()]
    assert events[-1] == "stopped"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_already_taken_is_a_one_line_error(tmp_path: Path, workers: str) -> None:
    """`serve` on a port another program holds: exit 2 and one line naming it, with one
    process as with several (operations.md: bad input of any kind)."""
    config = tmp_path / "demo.toml"
    shutil.copy(DEMO, config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [str(VIPGATE), "serve", "--config", str(config), "--workers", workers]
        command += ["--db", f"sqlite:///{tmp_path / 'ledger.db'}"]
        command += ["--listen", f"127.0.0.1:{port}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"vipgate: error: --listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert not (tmp_path / "ledger.db").exists()  # refused before the ledger was touched


@pytest.mark.parametrize(
    ("from_config", "host"),
    [(True, "gw..example"), (False, "h" * 64 + ".example")],
)
def test_a_host_no_name_can_have_is_a_one_line_error_naming_its_source(
    tmp_path: Path, from_config: bool, host: str
) -> None:
    """A listen host with an empty label, or one over 63 characters, is no name the
    resolver can even encode: exit 2 and one line naming where it came from (the config's
    `gateway.listen`, or `--listen`), not a traceback and exit 1 ("a check found a fault")."""
    config = tmp_path / "demo.toml"
    text = DEMO.read_text(encoding="utf-8")
    if from_config:
        text = text.replace('listen = "127.0.0.1:8583"', f'listen = "{host}:18594"', 1)
    config.write_text(text, encoding="utf-8")
    command = [str(VIPGATE), "serve", "--config", str(config)]
    command += ["--db", f"sqlite:///{tmp_path / 'ledger.db'}"]
    if not from_config:
        command += ["--listen", f"{host}:18594"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    source = f"{config}: gateway.listen" if from_config else "--listen"
    assert line.startswith(f"vipgate: error: {source}: cannot listen on {host}:18594: ")
    assert not (tmp_path / "ledger.db").exists()


def test_a_traffic_log_that_cannot_be_opened_leaves_the_ledger_as_it_was(
    tmp_path: Path,
) -> None:
    """`serve --record` into a folder that is not there: exit 2, one line, and neither a
    ledger made nor the config loaded into it (a later `--clock` start would be refused
    by the load's time); a log the command made before it was refused is removed."""
    config = tmp_path / "demo.toml"
    shutil.copy(DEMO, config)
    command = [str(VIPGATE), "serve", "--config", str(config), "--listen", "127.0.0.1:0"]
    command += ["--db", f"sqlite:///{tmp_path / 'ledger.db'}"]
    missing = tmp_path / "missing" / "traffic.jsonl"
    result = subprocess.run(
        [*command, "--record", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"vipgate: error: {missing}: cannot open for recording")
    assert not (tmp_path / "ledger.db").exists()
    # Refused later, by the ledger (a --clock before what it holds): the log made goes again.
    load = [str(VIPGATE), "ledger", "load", "--config", str(config), "--db", command[-1]]
    subprocess.run(load, capture_output=True, timeout=120, check=True)  # loads the config now
    made = tmp_path / "traffic.jsonl"
    result = subprocess.run(
        [*command, "--clock", "2026-01-01T00:00:00+08:00", "--record", str(made)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--clock: the database holds transactions up to" in result.stderr
    assert not made.exists()


def test_a_response_mti_from_a_stranger_closes_only_its_own_link(served: Served) -> None:
    """A frame with a response's MTI (here 0410) on another connection is not answered and
    its link closes; a terminal's pipelined redemptions meanwhile are all answered."""
    link = Link("127.0.0.1", served.port)
    terminal = terminal_for("10000001")
    signed_on = exchange(link, terminal, terminal.sign_on())
    terminal.adopt_sign_on(signed_on)
    card = terminal.card_fields(DIAMOND, "2906")
    requests = [terminal.financial("0200", "000000", "22", card, amount_fen=100) for _ in range(20)]
    stranger = Link("127.0.0.1", served.port)
    hostile = build("0410", {11: "000001", 41: "XXXXXXXX", 42: "0" * 15, 60: "00000001301"})
    for request in requests[:10]:
        link.send(request)
    stranger.send(hostile)
    for request in requests[10:]:
        link.send(request)
    answers = [terminal.check(request, link.receive()) for request in requests]
    assert [answer.code for answer in answers] == ["00"] * 20
    with pytest.raises(ConnectionError):
        stranger.receive()
    link.close()
    stranger.close()


def test_a_terminal_disabled_by_another_process_is_refused_within_seconds(
    served: Served, tmp_path: Path, ledger_url: str
) -> None:
    """`vipgate ledger load` of a config that disables terminal 20000001, run while the
    gateway serves it: the gateway follows the ledger's switch (`gateway.follow`), logs it,
    and answers `58` within a few seconds, without a restart."""
    link = Link("127.0.0.1", served.port)
    terminal = terminal_for("20000001")
    signed_on = exchange(link, terminal, terminal.sign_on(with_tdk=False))
    assert signed_on.code == "00"
    terminal.adopt_sign_on(signed_on)

    def redeem() -> str:
        card = terminal.card_fields(DIAMOND, "2906")
        request = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
        return exchange(link, terminal, request).code

    assert redeem() == "00"
    enabled = 'id = "20000001"\nmerchant = "898310058120002"\nenabled = true'
    text = (tmp_path / "demo.toml").read_text(encoding="utf-8")
    assert enabled in text
    off = tmp_path / "off.toml"
    off.write_text(text.replace(enabled, enabled.replace("true", "false")), encoding="utf-8")
    loaded = subprocess.run(
        [str(VIPGATE), "ledger", "load", "--config", str(off), "--db", ledger_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    codes = [redeem()]
    deadline = time.monotonic() + 20
    while codes[-1] != "58" and time.monotonic() < deadline:
        time.sleep(0.25)
        codes.append(redeem())
    assert codes[-1] == "58", codes
    assert set(codes[:-1]) <= {"00"}, codes
    link.close()
    assert served.stop() == 0
    followed = [json.loads(line) for line in served.lines if "terminal_enabled_followed" in line]
    assert [(entry["terminal"], entry["enabled"]) for entry in followed] == [("20000001", False)]

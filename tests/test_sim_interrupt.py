"""Ctrl-C (SIGINT) to `vipgate sim run` and `sim load` as their own processes, against the real
gateway core on a loopback port: the run reverses what it owes, reports the steps played and
says where it stopped (exit 130); the load still settles every terminal and reports each."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cardcodec.errors import CodecError
from cardcodec.frame import add_length
from cardcodec.message import decode_frame
from simulators.recording import read_recording
from tests.gateway_harness import DEMO
from tests.test_gateway_e2e import CTRL_C_AS_USUAL, VIPGATE
from tests.test_sim_commands import FULL_CARD, HarnessServer

WAIT_S = 30.0  # for the command to get as far as the test needs, or to end


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., HarnessServer]]:
    servers: list[HarnessServer] = []

    def start(delay_s: Callable[[bytes], float] | None = None) -> HarnessServer:
        servers.append(HarnessServer(tmp_path / f"gateway{len(servers)}", delay_s))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def sim(server: HarnessServer, *argv: str) -> subprocess.Popen[str]:
    command = [str(VIPGATE.parent / "python"), "-c", CTRL_C_AS_USUAL, "sim", *argv]
    command += ["--config", str(DEMO), "--target", server.target]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the command did not get that far"
        time.sleep(0.05)


def interrupt(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return process.returncode, out, err


OWES_A_REVERSAL = """\
[[step]]
terminal = "10000001"
do = "sign_on"
[[step]]
terminal = "10000001"
do = "redeem"
card = "6688000000000000014"
pin = "123456"
amount_fen = 100
drop_answer = true
[[step]]
terminal = "10000001"
do = "echo"
wait_s = 600
"""


def test_ctrl_c_during_sim_run_reverses_what_is_owed_and_reports_the_steps_played(
    start_server: Callable[..., HarnessServer], tmp_path: Path
) -> None:
    """Ctrl-C while step 3 waits, after a redemption whose answer was dropped: the 0400 goes
    (the gateway answers 00), the report lists steps 1 and 2 with it, and one line says the run
    was interrupted after 2 of 3 steps and starts from step 1 again; exit 130. Not the
    ledger's message (nothing was rolled back)."""
    server = start_server()
    scenario = tmp_path / "owes.toml"
    scenario.write_text(OWES_A_REVERSAL, encoding="utf-8")
    log = tmp_path / "run.jsonl"
    process = sim(server, "run", str(scenario), "--record", str(log))
    # Sign-on and redemption, each sent and answered: step 3 is waiting.
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 4, process)
    status, out, err = interrupt(process)
    assert status == 130, (out, err)
    mtis = [(r.direction, decode_frame(r.frame).mti) for r in read_recording(log)]
    assert mtis[4:] == [("out", "0400"), ("in", "0410")]
    lines = out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert steps == ["step   1 PASS 10000001 sign_on", "step   2 PASS 10000001 redeem"]
    reversal = lines[lines.index(steps[1]) + 4]
    assert reversal.startswith("      > 0400 reversal trace 000002 batch 000001 reason 98")
    assert reversal.endswith("(owed when the run was interrupted)")
    assert lines[-1] == "2 steps: 2 passed, 0 failed" and "still owed" not in out
    assert FULL_CARD.search(out) is None
    assert err.splitlines() == [
        f"vipgate: scenario {scenario}: interrupted after 2 of 3 steps;"
        " running it again starts from step 1"
    ]


def settlement_of(terminal: str) -> Callable[[bytes], float]:
    """Hold a terminal's 0500 for 2 s, so that it settles after the others."""

    def delay_s(payload: bytes) -> float:
        try:
            message = decode_frame(add_length(payload))
        except CodecError:
            return 0.0
        return 2.0 if message.mti == "0500" and message.text(41) == terminal else 0.0

    return delay_s


def test_ctrl_c_during_sim_load_still_settles_every_terminal_and_reports_it(
    start_server: Callable[..., HarnessServer],
) -> None:
    """Ctrl-C during the sending: every terminal settles, the first one too (whose thread
    the main thread was joining when the signal came, and which settles last here), and the
    summary lists each settlement, all balanced (exit 0)."""
    server = start_server(settlement_of("10000001"))
    argv = ["--terminals", "3", "--rate", "15", "--duration", "60", "--seed", "5", "--json"]
    process = sim(server, "load", *argv)
    wait_for(lambda: server.connections >= 4, process)  # the probe, then each terminal's link
    time.sleep(1.0)
    status, out, err = interrupt(process)
    assert status == 0, (out, err)
    summary = json.loads(out)
    settled = [(s["terminal"], s["result"]) for s in summary["settlements"]]
    assert sorted(settled) == [(t, "balanced") for t in ("10000001", "10000002", "20000001")]
    assert summary["balanced"] is True and summary["failures"] == []

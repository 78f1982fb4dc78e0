"""The `vipgate` parser: the common options before or after the sub-command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import DEFAULT_CONFIG, build_parser, main

VIPGATE = Path(sys.executable).with_name("vipgate")


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "x.toml", "--db", "sqlite://", "ledger", "check"],
        ["ledger", "check", "--config", "x.toml", "--db", "sqlite://"],
        ["--config", "x.toml", "ledger", "check", "--db", "sqlite://"],
    ],
)
def test_common_options_work_on_either_side_of_the_command(argv: list[str]) -> None:
    """--config and --db given before the sub-command are not reset by its defaults."""
    args = build_parser().parse_args(argv)
    assert (args.config, args.db) == (Path("x.toml"), "sqlite://")


def test_defaults_when_not_given() -> None:
    """Without the options: config/demo.toml and the config's database."""
    args = build_parser().parse_args(["ledger", "check"])
    assert (args.config, args.db) == (DEFAULT_CONFIG, None)


def test_a_reader_that_stops_early_ends_the_command_with_141_and_no_traceback(
    tmp_path: Path,
) -> None:
    """`vipgate ledger load | head -1`: the reader goes away before the command writes; the
    command ends with 141 (as a SIGPIPE would end it), never 1 (a check found a fault) and
    never with a traceback. What it did stands: the config is loaded."""
    config = tmp_path / "demo.toml"
    shutil.copy(Path(__file__).resolve().parents[1] / DEFAULT_CONFIG, config)
    command = [str(VIPGATE), "ledger", "load", "--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command has written anything
    errors = process.stderr.read()
    assert process.wait(timeout=120) == 141
    assert errors == b""
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and "no change" in again.stdout  # loaded the first time


class _FailsWhenCollected:
    def __del__(self) -> None:
        raise AssertionError("left by the interrupted bookkeeping")


@pytest.mark.parametrize("interrupted", [True, False])
def test_an_error_python_cannot_raise_waits_for_the_end_and_ctrl_c_drops_it(
    interrupted: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C inside the ORM's bookkeeping can leave an error in a collected object, which
    Python prints with its traceback: interrupted, the command's stderr is its one line; run
    to its end, the error is printed after the command, as Python would have."""

    def handler(_args: object) -> int:
        _FailsWhenCollected()  # collected at once: its error cannot be raised
        if interrupted:
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr("gateway.commands.ledger.check", handler)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # pytest's collects them
    status = main(["ledger", "check"])
    error = capsys.readouterr().err
    if interrupted:
        assert status == 130
        assert error.startswith("vipgate: interrupted: ") and error.count("\n") == 1
    else:
        assert status == 0
        assert "Exception ignored in" in error and "left by the interrupted" in error


def test_an_error_line_never_shows_a_card_number_whatever_built_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file name (or any argument) holding a card number and its track is masked in the
    one line an error prints, like a card number a message names itself."""
    missing = tmp_path / "6688000000000000014=28121010000000.toml"
    status = main(["ledger", "check", "--config", str(missing)])
    error = capsys.readouterr().err
    assert status == 2
    assert "6688000000000000014" not in error and "2812101" not in error
    assert "668800*********0014" in error


@pytest.mark.parametrize(
    "argv",
    [
        ["cards", "status", "active", "6688000000000000014"],
        ["cards", "status", "active", "6688000000000000014=28121010000012345678"],
        ["cards", "show", "6688000000000000014", "6688000000000000014=2812101"],
        ["cards", "6688000000000000014"],
        ["sim", "load", "--terminals", "1", "--rate", "1", "--duration", "1",
         "--seed", "6688000000000000014=2812"],
    ],
)  # fmt: skip
def test_a_card_number_the_command_line_refuses_is_masked(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A card number or a track typed where the command line does not take one is refused
    by argparse, which quotes it: masked in that line too, what a track adds hidden."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    error = capsys.readouterr().err
    assert exited.value.code == 2
    assert error.count("\n") == 1
    assert "668800*********0014" in error
    assert "6688000000000000014" not in error and "2812" not in error


def test_a_database_gone_under_a_command_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A restart or a killed backend under a command: one line naming it, exit 2, and what
    to do; not SQLAlchemy's traceback with exit 1 (which says a check found a fault)."""
    import argparse  # noqa: PLC0415

    from sqlalchemy.exc import OperationalError  # noqa: PLC0415

    from gateway import cli  # noqa: PLC0415

    def lost(_args: argparse.Namespace) -> int:
        raise OperationalError(
            "INSERT ...", {}, ConnectionError("terminating connection"), connection_invalidated=True
        )

    parser = argparse.ArgumentParser()
    parser.set_defaults(handler=lost)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "the connection was lost (ConnectionError)" in error
    assert "run the command again" in error

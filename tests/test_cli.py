"""The `vipgate` parser: the common options before or after the sub-command."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import DEFAULT_CONFIG, build_parser


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

"""`make bench-gateway` refuses bad figures before it starts anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("option", "value"),
    [("--cards", "0"), ("--terminals", "0"), ("--duration", "0"), ("--rate", "-1")],
)
def test_bad_figures_are_refused_with_exit_2(option: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench_gateway", "--backend", "sqlite", option, value],
        check=False,
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "must be positive" in result.stderr
    assert "starting the gateway" not in result.stdout

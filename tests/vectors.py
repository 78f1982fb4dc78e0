"""The known-answer vectors of ../shared/vectors/crypto.json, read from the shared folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from cardcodec.crypto import Suite

VECTORS_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "vectors" / "crypto.json"


@dataclass(frozen=True)
class SuiteCase:
    """One case of the vectors file under one key suite."""

    index: int
    suite: Suite
    tmk: bytes
    pik: bytes
    mak: bytes
    tdk: bytes
    card_number: str
    pin: str
    data: dict[str, Any]

    @property
    def id(self) -> str:
        return f"case{self.index}-{self.suite.value}"

    def frame(self, name: str) -> bytes:
        return bytes.fromhex(self.data[name])


@cache
def load() -> dict[str, Any]:
    with VECTORS_PATH.open(encoding="utf-8") as handle:
        loaded: dict[str, Any] = json.load(handle)
    return loaded


def suite_cases() -> list[SuiteCase]:
    cases = []
    for index, case in enumerate(load()["cases"]):
        for suite in Suite:
            cases.append(
                SuiteCase(
                    index=index,
                    suite=suite,
                    tmk=bytes.fromhex(case["tmk"]),
                    pik=bytes.fromhex(case["pik"]),
                    mak=bytes.fromhex(case["mak"]),
                    tdk=bytes.fromhex(case["tdk"]),
                    card_number=case["card_number"],
                    pin=case["pin"],
                    data=case["suites"][suite.value],
                )
            )
    return cases

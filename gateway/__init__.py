"""The vipgate host: terminal sessions, authorisation against the points ledger, the CLI."""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES


def build() -> str:
    """How the hot modules run: "native" when compiled by `make native` (mypyc; see "The
    native build" in docs/gateway.md), "source" when the interpreter runs their source."""
    from gateway import handler  # noqa: PLC0415 (this package's own module, imported late)

    compiled = (handler.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES))
    return "native" if compiled else "source"

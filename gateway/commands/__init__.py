"""The `vipgate` sub-commands, one module per group; each exposes `register(subparsers, common)`."""

from __future__ import annotations

import sys

# A long import says how far it is every so many lines, on standard error.
PROGRESS_LINES = 10_000


def progress(done: int, total: int, what: str = "lines") -> None:
    """After each batch an import has gone through (its lines applied, or skipped as applied
    before: "done", not "applied", which a file sent again would contradict): a line every
    `PROGRESS_LINES` lines of a file that long (or cards of an expiry run), and at its end;
    nothing for a shorter one."""
    if total >= PROGRESS_LINES and (done % PROGRESS_LINES == 0 or done == total):
        print(f"{done} of {total} {what} done", file=sys.stderr, flush=True)

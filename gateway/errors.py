"""Errors that reach a person running a command.

`BadInput` is every kind of bad input (a malformed config, a bad CSV line, an unknown card, an
unfinished month): the command prints its one-line message and exits 2, having changed nothing.
The message names what is wrong and where, never a card number in full, a PIN or a key.
"""


class BadInput(Exception):
    """Input that a command refuses; exit status 2."""


class CheckFailed(Exception):
    """A check that ran and found a fault (ledger, scenario, verification); exit status 1."""


class LedgerDamaged(BadInput):
    """A SQLite ledger file that cannot even be opened, SQLite finding it damaged (its schema
    or header): exit 2 for a command that would use it, a fault found (exit 1) for `vipgate
    ledger check`. `finding` is SQLite's own line."""

    def __init__(self, message: str, finding: str) -> None:
        super().__init__(message)
        self.finding = finding

"""`vipgate keys rotate-master`: a new master key, and every key sealed under the old one sealed
again under the new one, without a moment where a stored key cannot be opened.

The order makes every step safe to interrupt and to run again: the next master key is written
beside the current one, the PIN key is sealed under it, every terminal's TMK and every stored
session's working keys are sealed again in one database transaction, and only then does the
next key replace the current one. Until that
last step both keys open what they sealed, so a stop anywhere leaves everything readable and a
second run finishes the job.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import Engine

from gateway.keystore import FileKeyStore
from gateway.ledger import unit_of_work
from gateway.ledger.models import Terminal, TerminalSession


@dataclass(frozen=True)
class Rotation:
    """What a rotation did."""

    terminals: int
    sessions: int = 0


def rotate_master(engine: Engine, keystore: FileKeyStore) -> Rotation:
    """Rotate the master key of `keystore` over the ledger on `engine`."""
    keystore.begin_rotation()
    with unit_of_work(engine) as session:
        terminals = session.scalars(select(Terminal).with_for_update().order_by(Terminal.id))
        count = 0
        for terminal in terminals:
            terminal.tmk_encrypted = keystore.reseal_tmk(terminal.id, terminal.tmk_encrypted)
            count += 1
        signed_on = session.scalars(
            select(TerminalSession).with_for_update().order_by(TerminalSession.terminal_id)
        )
        sessions = 0
        for row in signed_on:
            row.keys_sealed = keystore.reseal_session_keys(row.terminal_id, row.keys_sealed)
            sessions += 1
    keystore.finish_rotation()
    return Rotation(count, sessions)

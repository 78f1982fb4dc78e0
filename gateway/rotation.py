"""`vipgate keys rotate-master`: a new master key, and every key sealed under the old one sealed
again under the new one, without a moment where a stored key cannot be opened.

The ledger's part is here, the keys' part in the security module (`SecurityModule.
begin_rotation`), so an HSM rotates the same way. The order makes every step safe to interrupt
and to run again: the module begins (the next master key exists and new blobs are sealed under
it), every terminal's TMK and every stored session's working keys are sealed again in one
database transaction, and only then does the module finish (the next key replaces the current
one). Until that last step both keys open what they sealed, so a stop anywhere leaves
everything readable and a second run finishes the job.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from gateway.ledger import unit_of_work
from gateway.ledger.models import KeyCheck, Terminal, TerminalSession
from gateway.loader import MASTER_KEY_CHECK_ID
from gateway.security import MasterKeyRotation, SecurityModule


@dataclass(frozen=True)
class Rotation:
    """What a rotation did."""

    terminals: int
    sessions: int = 0


def rotate_master(engine: Engine, security: SecurityModule) -> Rotation:
    """Rotate the master key of `security` over the ledger on `engine`; a stored key that
    does not open raises `SecurityModuleError` with the ledger unchanged."""
    rotation = security.begin_rotation()
    with unit_of_work(engine) as session:
        done = reseal(session, rotation)
    rotation.finish()
    return done


def reseal(session: Session, rotation: MasterKeyRotation) -> Rotation:
    """Every terminal's TMK, every stored session's working keys and the ledger's master key
    check sealed again under the rotation's next key, in `session`'s unit of work; the
    caller commits, then finishes the rotation. A stored key that does not open raises
    `SecurityModuleError`."""
    terminals = session.scalars(select(Terminal).with_for_update().order_by(Terminal.id))
    count = 0
    for terminal in terminals:
        terminal.tmk_encrypted = rotation.reseal_tmk(terminal.id, terminal.tmk_encrypted)
        count += 1
    signed_on = session.scalars(
        select(TerminalSession).with_for_update().order_by(TerminalSession.terminal_id)
    )
    sessions = 0
    for row in signed_on:
        row.keys_sealed = rotation.reseal_session_keys(row.terminal_id, row.keys_sealed)
        sessions += 1
    check = session.get(KeyCheck, "master key", with_for_update=True)
    if check is not None:
        check.value = rotation.reseal_tmk(MASTER_KEY_CHECK_ID, check.value)
    return Rotation(count, sessions)

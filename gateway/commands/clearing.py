"""`vipgate clear`, `reconcile`, `verify` and `keys export-public`: monthly clearing from the
command line (operations.md).

`clear` and `reconcile` work on the ledger the config names; `verify` is what the acquirer runs
and needs only the file, its `.sig` and a public key (the configured issuer's by default, when
no `--pubkey` is given), never the database. Exit statuses: 0 done, 1 a check found a fault
(a file that does not verify, a reconciliation with exceptions, a month whose bytes would
change), 2 bad input (a malformed month, an unfinished month, an unreadable key).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clearing import signing
from clearing.clear import Cleared, clear, folder_can_be_made
from clearing.close import refuse_unclosable
from clearing.period import Month, refuse_unfinished
from clearing.reconcile import reconcile, refuse_unclosed
from clearing.verify import Verification, verify_file
from gateway.bootstrap import Check, refuse_unwritable, wired, wired_unit
from gateway.clock import SHANGHAI, Clock
from gateway.commands.ledger import refuse_damaged_ledger
from gateway.config import Config, load_config
from gateway.errors import BadInput, CheckFailed
from gateway.rotation import reseal
from gateway.security import SecurityModuleError


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "clear",
        parents=[common],
        help="the month's settlement file, signature, operator and merchant statements",
    )
    parser.add_argument("--month", required=True, metavar="YYYY-MM")
    parser.add_argument("--out", required=True, type=out_folder, metavar="DIR")
    parser.set_defaults(handler=clear_command)
    parser = subparsers.add_parser(
        "reconcile", parents=[common], help="the auditors' reconciliation pack for a month"
    )
    parser.add_argument("--month", required=True, metavar="YYYY-MM")
    parser.add_argument("--out", required=True, type=out_folder, metavar="DIR")
    parser.set_defaults(handler=reconcile_command)
    parser = subparsers.add_parser(
        "verify", parents=[common], help="the acquirer's check of a settlement file"
    )
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.add_argument(
        "--pubkey", type=Path, metavar="FILE", help="public key PEM (default: the issuer's)"
    )
    parser.set_defaults(handler=verify_command)
    group = subparsers.add_parser("keys", help="the issuer's signing key and the master key")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    parser = actions.add_parser(
        "export-public", parents=[common], help="print the signing public key as PEM"
    )
    parser.set_defaults(handler=export_public)
    parser = actions.add_parser(
        "rotate-master",
        parents=[common],
        help="a new master key; every stored TMK and the PIN key sealed again under it",
    )
    parser.set_defaults(handler=rotate_master_command)


def clear_command(args: argparse.Namespace) -> int:
    month = Month.parse(args.month)
    over_and_writable = _over_and_writable(month, args.out)

    def check(config: Config, clock: Clock) -> None:
        over_and_writable(config, clock)
        key = config.issuer.signing_key
        if key.exists() or key.is_symlink():  # else made by the run, once nothing refuses it
            signing.load_private(key)

    with wired(
        args.config,
        args.db,
        check=check,
        refuse=lambda session, _config, _clock: refuse_unclosable(session, month),
        # The month's figures are the ledger's: the rates the gateways charged and the
        # merchants they served. A config loaded here would change a merchant's fee in the
        # M records the close writes (rates no request was charged at), and one left at its
        # default (config/demo.toml) would write demo cards and merchants into the ledger.
        load=False,
    ) as wiring:
        # Money leaves on these figures: never from a file SQLite finds damaged.
        refuse_damaged_ledger(wiring.engine, "clear", "nothing was closed or written")
        # A close writes, and so does a later run (it records the file's and key's
        # SHA-256): a ledger that takes no write (a read-only file, a standby) is refused
        # before `--out` is made, where it was refused after, leaving `--out` empty.
        refuse_unwritable(wiring.engine)
        with _writing_into(args.out):
            cleared = clear(wiring.engine, wiring.config, month, args.out, wiring.now())
    _report_cleared(cleared)
    return 0


@contextlib.contextmanager
def _writing_into(out: Path) -> Iterator[None]:
    """A write into `out` that fails names `out` (a file's write error names no file, and
    the command line would take it for standard output's)."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(out)) from None


def _over_and_writable(month: Month, out: Path) -> Check:
    """The checks of `clear` and `reconcile` that need no ledger, made before the config is
    loaded into it: the month is over, and `--out` is a folder that can be written."""

    def check(config: Config, clock: Clock) -> None:
        gateway = config.gateway
        refuse_unfinished(month, clock.now(), gateway.timezone, gateway.cutoff)
        folder_can_be_made(out)  # made by the command's work, once nothing refuses it

    return check


def _report_cleared(cleared: Cleared) -> None:
    closed = cleared.closed
    when = closed.closed_at.astimezone(SHANGHAI).isoformat()
    if cleared.closed_now:
        print(f"month {closed.month} closed now, at {when}")
    else:
        print(f"month {closed.month} closed earlier, at {when}: the same bytes again")
    trailer = cleared.settlement.trailer
    print(
        f"{cleared.settlement.path}: {trailer.detail_count} details, "
        f"{trailer.merchant_count} merchants, settled {trailer.settled_fen} fen, "
        f"fees {trailer.fees_fen} fen, net {trailer.net_fen} fen"
    )
    print(f"  sha256 {cleared.settlement.sha256}")
    print(f"{cleared.signature}: Ed25519 signature, verified on the file as written")
    figures = cleared.figures
    print(
        f"{cleared.operator_statement}: total due to the network {figures.total_due_fen} fen "
        f"({figures.terminal_count} terminals x {figures.terminal_fee_fen} fen), "
        f"rounding gain {figures.totals.rounding_gain_fen} fen"
    )
    for statement in cleared.merchant_statements:
        print(f"{statement}")


def reconcile_command(args: argparse.Namespace) -> int:
    month = Month.parse(args.month)
    with wired(
        args.config,
        args.db,
        check=_over_and_writable(month, args.out),
        refuse=lambda session, _config, _clock: refuse_unclosed(session, month),
        load=False,
    ) as wiring:
        refuse_damaged_ledger(wiring.engine, "reconcile", "no pack was written")
        with _writing_into(args.out):
            pack = reconcile(wiring.engine, wiring.config, month, args.out, wiring.now())
    for line in pack.summary_lines():
        print(line)
    print(pack.verdict)
    return 0 if pack.exception_count == 0 else 1


def verify_command(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        what = "a folder, not a settlement file" if args.file.is_dir() else "no such file"
        raise BadInput(f"{args.file}: {what}")
    if args.pubkey is not None:
        public_key = signing.load_public(args.pubkey)
    else:
        config = load_config(args.config, args.db)
        path = config.issuer.signing_key
        if not path.exists():
            raise BadInput(f"signing key {path}: missing; give the issuer's key with --pubkey")
        public_key = signing.load_private(path).public_key()
    verification = verify_file(args.file, public_key)
    _report_verification(verification)
    if not verification.good:
        noun = "fault" if verification.fault_count == 1 else "faults"
        raise CheckFailed(f"verify: {args.file}: {verification.fault_count} {noun}")
    return 0


def _report_verification(verification: Verification) -> None:
    for fault in verification.faults:
        print(f"{verification.path.name}: {fault}")
    hidden = verification.fault_count - len(verification.faults)
    if hidden:
        print(f"{verification.path.name}: ... and {hidden} more faults")
    if verification.good and verification.trailer is not None:
        trailer = verification.trailer
        print(
            f"{verification.path}: good: {trailer.detail_count} details, "
            f"{trailer.merchant_count} merchants, settled {trailer.settled_fen} fen, "
            f"fees {trailer.fees_fen} fen, net {trailer.net_fen} fen; trailer SHA-256 and "
            "Ed25519 signature verified"
        )


def rotate_master_command(args: argparse.Namespace) -> int:
    # The config's load and the sealing again are one unit of work: a stored key that does
    # not open leaves the ledger as it was, the load included.
    with wired_unit(args.config, args.db, existing=True) as (wiring, session):
        next_key = wiring.security.begin_rotation()
        try:
            rotation = reseal(session, next_key)
        except SecurityModuleError as error:
            # The next key is kept: once the key is repaired, running the command again
            # finishes the rotation.
            raise BadInput(f"keys rotate-master: {error}; nothing was sealed again") from None
        master_key = wiring.config.issuer.master_key
    next_key.finish()  # only once the ledger holds the keys sealed under it
    print(
        f"master key {master_key} rotated: {rotation.terminals} terminal master keys and the "
        "PIN key sealed under the new key; the old key is gone"
    )
    return 0


def export_public(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.db)
    key = signing.load_or_create(config.issuer.signing_key)
    print(signing.public_pem(key), end="")
    return 0


def out_folder(value: str) -> Path:
    """`--out`: a folder; an empty value is not the current one."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty: name the folder to write into")
    return Path(value)

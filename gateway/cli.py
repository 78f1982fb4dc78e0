"""The `vipgate` command line: one parser, sub-commands registered by their own modules.

Exit statuses (operations.md): 0 success, 1 a check found a fault, 2 bad input of any kind.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import io
import os
import resource
import select
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy.exc import DatabaseError, OperationalError

from cardcodec.cards import mask_card_data
from gateway.errors import BadInput, CheckFailed
from gateway.ledger.db import (
    LEDGER_BUSY,
    STORAGE_FAULTS,
    ledger_busy,
    storage_fault,
)

DEFAULT_CONFIG = Path("config/demo.toml")

# Each module registers its own sub-commands; the order is the order of `vipgate --help`.
COMMAND_MODULES = (
    "gateway.commands.serve",
    "gateway.commands.cards",
    "gateway.commands.points",
    "gateway.commands.ledger",
    "gateway.commands.sim",
    "gateway.commands.clearing",
)

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line (operations.md: a one-line error
    naming what and where, exit 2) rather than the usage block and then the error.
    `--help` still prints the usage. Sub-command parsers are of this class too. argparse
    quotes the argument it refused as typed: a card number or a track given in the wrong
    place is masked there as everywhere else."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {mask_card_data(' '.join(message.split()))}\n")


def common_options(*, defaults: bool = True) -> argparse.ArgumentParser:
    """The options every command takes (operations.md): --config and --db.

    They may stand before or after the sub-command; the sub-commands' copies carry no
    defaults, so a value given before the sub-command is not overwritten by one.
    """
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG if defaults else argparse.SUPPRESS,
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )
    common.add_argument(
        "--db",
        default=None if defaults else argparse.SUPPRESS,
        help="database URL (default: the config's)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vipgate",
        description="Points-redemption gateway for VIP cards on UnionPay-style POS terminals.",
        parents=[common_options()],
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    shared = common_options(defaults=False)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers, shared)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    if getattr(args, "command", None) == "serve":  # runs for months: said as it happens
        return _run(handler, args)
    with _unraisable_held() as held:
        status = _run(handler, args)
        if status == EXIT_INTERRUPTED:
            held.clear()
    return status


@contextlib.contextmanager
def _unraisable_held() -> Iterator[list[str]]:
    """Errors Python cannot raise (a `__del__`'s, a weak reference callback's: printed with
    their traceback as they happen) held back until the command ends, then printed as
    usual; dropped when Ctrl-C ended it. An interrupt that lands inside the ORM's
    bookkeeping leaves such an error in a garbage-collected object (SQLAlchemy's
    `InstanceState._cleanup`), and its traceback would come before the one line that says
    what the interrupt left (`EXIT_INTERRUPTED`). Each is held as the text Python's own
    hook writes (holding the object would bring a finalised one back)."""
    held: list[str] = []

    def hold(unraisable: Any) -> None:
        text = io.StringIO()
        with contextlib.redirect_stderr(text):
            sys.__unraisablehook__(unraisable)
        held.append(text.getvalue())

    previous = sys.unraisablehook
    sys.unraisablehook = hold
    try:
        yield held
    finally:
        sys.unraisablehook = previous
        for text in held:
            sys.stderr.write(text)


def _run(handler: Handler, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except BadInput as error:
        print(f"vipgate: error: {_shown(error)}", file=sys.stderr)
        return 2
    except CheckFailed as error:
        print(f"vipgate: {_shown(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: what committed stands (an import's whole batches; a clearing run or a
        # config load commits whole or not at all), and the command can run again.
        print(
            "vipgate: interrupted: what was committed stands, the rest was rolled back;"
            " run the command again to finish",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a socket's, not the reader of our output: a real failure
        return EXIT_READER_GONE
    except OperationalError as error:
        if error.connection_invalidated:
            # The database went away under the command (a restart, a killed backend): the
            # unit of work it was in was rolled back, or, if the link broke during its COMMIT,
            # may have committed; either way what committed before stands, and every command
            # can run again (imports skip what they applied, clearing writes the same files).
            print(
                "vipgate: error: database: the connection was lost"
                f" ({type(getattr(error, 'orig', None) or error).__name__});"
                " what was committed stands; run the command again to finish",
                file=sys.stderr,
            )
            return 2
        if (code := storage_fault(error)) is not None:
            return _storage_failed(error, code)
        if not ledger_busy(error):
            raise
        # Not a fault a check found (1): the command could not be done, and changed nothing
        # in the unit of work that waited. One line, as for bad input.
        print(f"vipgate: error: {LEDGER_BUSY}", file=sys.stderr)
        return 2
    except DatabaseError as error:
        if (code := storage_fault(error)) is None:
            raise
        return _storage_failed(error, code)
    except OSError as error:
        if error.errno in (errno.EMFILE, errno.ENFILE):
            return _out_of_descriptors(error)
        if error.errno not in _WRITES_REFUSED:
            raise
        return _write_refused(error)


def _out_of_descriptors(error: OSError) -> int:
    """No file descriptor left (the process's limit, or the system's): one line with the
    limit and what to do, exit 2, where it was a traceback. A command stopped so committed
    what it committed, as for any other fault; `serve` stops before it listens."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    whose = (
        f"this process may have {soft} (`ulimit -n`; LimitNOFILE= for a systemd service)"
        if error.errno == errno.EMFILE
        else "the system's limit is reached (fs.file-max)"
    )
    print(
        f"vipgate: error: too many open files: {whose}; raise the limit, then run the command"
        " again",
        file=sys.stderr,
    )
    return 2


# The errors of a file (or standard output) that refuses what a command writes: a full disk, a
# quota, a file-size limit, a failing disk, a read-only file system.
_WRITES_REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


def _write_refused(error: OSError) -> int:
    """A command's output refused (its `--out` files, or standard output on a full disk):
    one line naming what and why, exit 2, where it was a traceback and exit 1 (which says a
    check found a fault). What it committed to the ledger stands; a file it was writing may
    be cut short, and running it again writes it whole."""
    what = error.filename  # a command names the folder it writes into (`clear --out`)
    if what is None:
        _drop_stdout()  # else the interpreter's last flush fails again, with a traceback
        what = "standard output"
    print(
        f"vipgate: error: cannot write {what}: {error.strerror}; what was committed stands,"
        " and a file being written may be cut short: make room and run the command again",
        file=sys.stderr,
    )
    return 2


def _storage_failed(error: DatabaseError, code: str) -> int:
    """A driver's error about the ledger's storage (`STORAGE_FAULTS`), met by a command's
    statement: one line saying what and what to do (a traceback would show the
    statement), exit 2 as for a ledger that cannot be opened. The unit of work it was in
    was rolled back; what committed before stands (an import's whole batches)."""
    text = str(error.orig).strip()
    said = text.splitlines()[0] if text else type(error.orig).__name__
    what, remedy = STORAGE_FAULTS[code]
    print(
        f"vipgate: error: database: {what} ({said}); the command stopped: what was committed"
        f" stands, the rest was rolled back; {remedy}",
        file=sys.stderr,
    )
    return 2


# The status of a command stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130


# Runs of this many digits or more in an error line are masked as card numbers, whichever
# path built it (a file name, an argument): a 15-digit merchant id stays readable.
ERROR_CARD_DIGITS = 16


def _shown(error: Exception) -> str:
    """An error as its one line: card numbers masked (first 6, last 4; what a track adds
    hidden), control and format characters escaped."""
    return one_line(mask_card_data(str(error), shortest=ERROR_CARD_DIGITS))


def one_line(text: str) -> str:
    """A message as one line a terminal shows as it is: control and format characters (a
    newline, an escape sequence, a right-to-left override a file or an argument carried)
    written as escapes."""
    return "".join(
        character.encode("unicode_escape").decode("ascii")
        if unicodedata.category(character) in ("Cc", "Cf")
        else character
        for character in text
    )


# The status of a command whose reader stopped reading (`vipgate ledger check | head -1`), as
# for any command a SIGPIPE ends (128 + 13): not 1, which says a check found a fault. What the
# command did before stands; only its output was cut short.
EXIT_READER_GONE = 141


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader is gone (the kernel reports an error
    condition on its end); if so, it is pointed at /dev/null so that the interpreter's last
    flush at exit does not fail again with a traceback."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a test, or closed
        return False
    poller = select.poll()
    poller.register(descriptor, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):
        return False
    _drop_stdout()
    return True


def _drop_stdout() -> None:
    """Standard output pointed at /dev/null, what its buffer holds with it."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a test, or closed
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)
    with contextlib.suppress(OSError):
        sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`vipgate serve`: the gateway server.

The codec it will speak is in `cardcodec`; the server itself (Twisted protocol, sessions,
authorisation) is not built yet, so the command says so and exits non-zero rather than pretend.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("serve", parents=[common], help="serve terminals")
    parser.add_argument("--listen", metavar="HOST:PORT", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--metrics", metavar="HOST:PORT", default=None)
    parser.add_argument("--record", metavar="FILE", default=None)
    parser.add_argument("--clock", metavar="ISO8601", default=None)
    parser.set_defaults(handler=serve)


def serve(args: argparse.Namespace) -> int:
    print(
        "vipgate serve: the gateway server is not built yet (see the project's open issues); "
        "nothing is listening.",
        file=sys.stderr,
    )
    return 1

"""`make bench-codec`: what the codec costs per redemption, against pyiso8583's own walk.

Prints, for a redemption request and its answer: pyiso8583's decode + encode of the same body,
the codec's decode + encode (envelope, checks and typed values included), the same with the
MAC verified or computed, and a full round as the gateway does it: decode the request, verify
its MAC, encode the answer with its MAC. Best of several repeats, so a busy machine shows less.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

import iso8583

from cardcodec.crypto import Suite, mac, verify_mac
from cardcodec.frame import ENVELOPE_BYTES
from cardcodec.message import (
    Message,
    decode_message,
    encode_message,
    encode_message_with_mac,
    mac_input,
    received_mac,
)
from cardcodec.spec import PYISO_SPEC

# Targets: the codec's decode + encode against pyiso8583's of the same body, and a full round
# with both MACs. 5,000 redemptions a second leave 200 us of CPU for each in all; the codec's
# share should stay under a fifth of it.
RATIO_TARGET = 0.5
FULL_ROUND_TARGET_US = 40

MAK = bytes.fromhex("1349C33040A656CB04BC1244A6FDABA1")

REQUEST_FIELDS: dict[int, str | bytes] = {
    3: "000000",
    4: "000000012800",
    11: "000042",
    22: "022",
    25: "00",
    35: "6688001234567890124D28121010000012345",
    41: "10000001",
    42: "898310048990001",
    49: "156",
    53: "0600000000000000",
    60: "22000001000200",
}
ANSWER_FIELDS: dict[int, str | bytes] = {
    3: "000000",
    4: "000000012800",
    11: "000042",
    12: "100001",
    13: "1115",
    15: "1115",
    32: "48020000",
    37: "000000000002",
    38: "A1B2C3",
    39: "00",
    41: "10000001",
    42: "898310048990001",
    49: "156",
    54: "9002156C000000187200",
    60: "22000001000200",
    63: "VIP000000640000000936000000000000012800",
}


def _per_call_us(function: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e6


def _measure(suite: Suite, number: int, repeat: int) -> list[tuple[str, float]]:
    def sign(data: bytes) -> bytes:
        return mac(suite, MAK, data)

    request = encode_message_with_mac(Message("0200", dict(REQUEST_FIELDS)), sign)
    answer = encode_message_with_mac(Message("0210", dict(ANSWER_FIELDS)), sign)
    spec = dict(PYISO_SPEC)
    rows: list[tuple[str, float]] = []
    for name, payload in (("request", request), ("answer", answer)):
        body = payload[ENVELOPE_BYTES:]

        def pyiso(body: bytes = body) -> object:
            return iso8583.encode(iso8583.decode(body, spec)[0], spec)

        def codec(payload: bytes = payload) -> object:
            return encode_message(decode_message(payload))

        def codec_mac(payload: bytes = payload) -> object:
            message = decode_message(payload)
            verify_mac(suite, MAK, mac_input(payload), received_mac(payload))
            return encode_message_with_mac(message, sign)

        rows += [
            (f"{name}: pyiso8583 decode + encode", _per_call_us(pyiso, number, repeat)),
            (f"{name}: codec decode + encode", _per_call_us(codec, number, repeat)),
            (f"{name}: codec decode + encode + MAC", _per_call_us(codec_mac, number, repeat)),
        ]
    answer_message = decode_message(answer)

    def full_round() -> object:
        decode_message(request)
        verify_mac(suite, MAK, mac_input(request), received_mac(request))
        return encode_message_with_mac(answer_message, sign)

    full = _per_call_us(full_round, number, repeat)
    rows.append(("full round: request in + MAC, answer out + MAC", full))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=5000, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=5, help="repeats; the best is shown")
    args = parser.parse_args()
    for suite in Suite:
        rows = _measure(suite, args.number, args.repeat)
        print(f"suite {suite.value}")
        for label, micros in rows:
            print(f"  {label:<52} {micros:8.1f} us  {1e6 / micros:10,.0f} /s")
        timings = dict(rows)
        for name in ("request", "answer"):
            base = timings[f"{name}: pyiso8583 decode + encode"]
            ours = timings[f"{name}: codec decode + encode"]
            print(f"  {name}: codec / pyiso8583 = {ours / base:.2f} (target <= {RATIO_TARGET:.2f})")
        full = timings["full round: request in + MAC, answer out + MAC"]
        print(f"  full round {full:.1f} us (target < {FULL_ROUND_TARGET_US} us)")


if __name__ == "__main__":
    main()

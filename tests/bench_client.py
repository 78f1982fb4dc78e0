"""The load generator of `make bench-gateway`: lean, as wrk is, so the server keeps the machine.

Client and server share two cores, so every microsecond the client spends is taken from the
gateway. The spec terminal (tests/spec_terminal.py) costs tens of microseconds per redemption
(PIN block, MAC, BCD packing in Python), so the client does that work before the clock runs:
each terminal signs on, then builds its whole list of redemption frames (length prefix
included; a new STAN and a valid MAC each, in the terminal's order). While the clock runs, one
process drives every connection with non-blocking sockets and one selector: an answer is split
off by its 2-byte length, its field 39 is found by walking the bitmap (`Field39`), its latency
is taken with `time.perf_counter`, and the terminal's next frame goes out. The server has just
as much to do as with any terminal: every request is unique and signed.

- `closed_loop`: each terminal keeps one request outstanding and sends its next frame as soon
  as the answer arrives, until the duration is over (then the answers in flight are awaited).
  Latency runs from the send to the answer. A terminal that has used its frames stops, and is
  counted in `Phase.exhausted`.
- `open_loop`: requests are offered at a fixed total rate, request j due at start + j/rate on
  terminal j mod T (so each terminal is offered rate/T per second, the terminals staggered).
  A terminal sends one request at a time, as a real POS does: a request that falls due while
  the terminal's last is unanswered waits in that terminal's queue. Latency runs from the
  moment the request was due, not from when it was sent, so time spent queued behind a slow
  answer counts (no coordinated omission). Requests still queued when the duration is over are
  not sent (`Phase.unsent`): a gateway slower than the offered rate shows as a lower rate
  achieved, and latencies that grow with the run. `Phase.lag` holds how late the client sent
  the requests that found their terminal idle; it is part of every latency. The wait for the
  next due time is select(2) on the epoll descriptor, which keeps microseconds (epoll's own
  timeout is whole milliseconds, rounded up): a wake per request, a little more client CPU
  than batching by the millisecond, for a lag of about 0.1 ms instead of 0.5.

`Phase.cpu_s` is the client's own CPU time (`time.process_time`) over the phase, kernel time
included (much of it the loopback TCP stack, which any client pays).
"""

from __future__ import annotations

import math
import select
import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from tests.spec_terminal import TABLE, Link, SpecTerminal, parse

# A gateway that does not answer for this long has hung: the run stops instead of waiting.
SILENCE_S = 30.0


@dataclass
class Terminal:
    """One terminal's connection, its pre-built frames and the request it has in flight."""

    sock: socket.socket
    frames: list[bytes]
    sent: int = 0  # frames sent so far: the next frame is frames[sent]
    end: int = 0  # this phase sends frames up to frames[end - 1]
    buffer: bytes = b""
    busy: bool = False
    started: float = 0.0  # the in-flight request's start: sent (closed loop) or due (open)
    queued: deque[float] = field(default_factory=deque)  # due times waiting for the line


@dataclass
class Phase:
    """What one phase measured."""

    latencies: list[float]
    codes: dict[str, int]
    elapsed_s: float
    cpu_s: float
    exhausted: int = 0
    offered: int = 0
    unsent: int = 0
    lag: list[float] = field(default_factory=list)
    # Open loop: when each answered request fell due, in seconds from the phase's start, in
    # the order of `latencies` (where in the run the slow answers were).
    dues: list[float] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return len(self.latencies)

    @property
    def cpu_share(self) -> float:
        """The client's CPU time over wall time: 1.0 is one core."""
        return self.cpu_s / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def cpu_per_request_us(self) -> float:
        """Client CPU per request: per request offered in the open loop, else per answer."""
        requests = max(self.offered, self.answered)
        return self.cpu_s / requests * 1e6 if requests else 0.0


def sign_on(port: int, terminal: SpecTerminal) -> socket.socket:
    """Connect and sign on (blocking), then hand back the socket, non-blocking."""
    link = Link("127.0.0.1", port)
    request = terminal.sign_on()
    terminal.adopt_sign_on(terminal.check(request, link.exchange(request)))
    assert not link.buffer, "bytes after the sign-on answer"
    link.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    link.socket.setblocking(False)
    return link.socket


def redemptions(terminal: SpecTerminal, card: str, count: int) -> list[bytes]:
    """`count` redemptions of 100 fen by `card`, in order, each framed with its length."""
    frames = []
    for _ in range(count):
        fields = terminal.card_fields(card, "3012")
        payload = terminal.financial("0200", "000000", "22", fields, amount_fen=100)
        frames.append(len(payload).to_bytes(2, "big") + payload)
    return frames


# One step of a plan: fixed bytes to skip, then a variable field's length prefix width (0 for
# none) and whether its length counts digits (packed two to a byte) rather than bytes.
Step = tuple[int, int, bool]


class Field39:
    """Field 39 of an answer without parsing the rest of it.

    The fields before 39 are walked from the bitmap with the spec's table; the walk is worked
    out once per bitmap (fixed lengths summed, only variable fields read), and that first time
    it is checked against the spec terminal's full `parse` of the same answer.
    """

    def __init__(self) -> None:
        self.plans: dict[bytes, tuple[Step, ...] | None] = {}

    def __call__(self, payload: bytes) -> str:
        bitmap = payload[13:21]
        try:
            plan = self.plans[bitmap]
        except KeyError:
            plan = self._learn(bitmap, payload)
        if plan is None:
            return "--"  # no field 39
        offset = 21
        for skip, prefix, digits in plan:
            offset += skip
            if prefix:
                length = int(payload[offset : offset + prefix].hex())
                offset += prefix + ((length + 1) // 2 if digits else length)
        return payload[offset : offset + 2].decode("ascii")

    def _learn(self, bitmap: bytes, payload: bytes) -> tuple[Step, ...] | None:
        present = int.from_bytes(bitmap, "big")
        plan: tuple[Step, ...] | None = None
        if present & (1 << (64 - 39)):
            steps: list[Step] = []
            skip = 0
            for number in range(2, 39):
                if not present & (1 << (64 - number)):
                    continue
                if number not in TABLE:
                    raise ValueError(f"field {number} is not in the spec's table")
                kind, prefix, size = TABLE[number]
                digits = kind in ("n", "nl", "z")
                if prefix:
                    steps.append((skip, prefix, digits))
                    skip = 0
                else:
                    skip += (size + 1) // 2 if digits else size
            steps.append((skip, 0, False))
            plan = tuple(steps)
        self.plans[bitmap] = plan
        fields = parse(payload)[1]
        expected = str(fields[39]) if 39 in fields else "--"
        if self(payload) != expected:
            raise AssertionError(f"field 39 walk gives {self(payload)!r}, parse {expected!r}")
        return plan


def _send(terminal: Terminal, started: float) -> bool:
    """Send the terminal's next frame; False when it has none left."""
    if terminal.sent >= terminal.end:
        return False
    frame = terminal.frames[terminal.sent]
    terminal.sent += 1
    terminal.busy = True
    terminal.started = started
    written = terminal.sock.send(frame)
    if written < len(frame):  # never with one small request in flight, but be correct
        terminal.sock.setblocking(True)
        terminal.sock.sendall(frame[written:])
        terminal.sock.setblocking(False)
    return True


def _answers(terminal: Terminal) -> list[bytes]:
    """The whole answers now readable on the terminal's connection."""
    try:
        data = terminal.sock.recv(65536)
    except BlockingIOError:
        return []
    if not data:
        raise ConnectionError(f"the gateway closed a connection ({terminal.sent} frames sent)")
    buffer = terminal.buffer + data if terminal.buffer else data
    answers = []
    while len(buffer) >= 2:
        end = 2 + int.from_bytes(buffer[:2], "big")
        if len(buffer) < end:
            break
        answers.append(buffer[2:end])
        buffer = buffer[end:]
    terminal.buffer = buffer
    return answers


def _selector(terminals: list[Terminal]) -> selectors.EpollSelector:
    selector = selectors.EpollSelector()
    for terminal in terminals:
        selector.register(terminal.sock, selectors.EVENT_READ, terminal)
    return selector


def closed_loop(terminals: list[Terminal], duration: float, limit: int) -> Phase:
    """Each terminal sends its next frame as soon as its last is answered, for `duration`;
    a terminal stops after `limit` frames in this phase."""
    field39 = Field39()
    latencies: list[float] = []
    codes: dict[str, int] = {}
    exhausted = 0
    selector = _selector(terminals)
    clock = time.perf_counter
    cpu = time.process_time()
    start = clock()
    stop = start + duration
    busy = 0
    for first in terminals:
        first.end = min(len(first.frames), first.sent + limit)
        if _send(first, clock()):
            busy += 1
        else:
            exhausted += 1
    while busy:
        events = selector.select(SILENCE_S)
        if not events:
            raise TimeoutError(f"no answer for {SILENCE_S:.0f} s ({busy} requests in flight)")
        for key, _ in events:
            terminal: Terminal = key.data
            for answer in _answers(terminal):
                now = clock()
                latencies.append(now - terminal.started)
                code = field39(answer)
                codes[code] = codes.get(code, 0) + 1
                terminal.busy = False
                busy -= 1
                if now < stop:
                    if _send(terminal, now):
                        busy += 1
                    else:
                        exhausted += 1
    elapsed = clock() - start
    cpu_s = time.process_time() - cpu
    selector.close()
    return Phase(latencies, codes, elapsed, cpu_s, exhausted=exhausted)


def open_loop(terminals: list[Terminal], rate: float, duration: float) -> Phase:
    """Offer `rate` requests per second over the terminals for `duration`; latency from due."""
    field39 = Field39()
    latencies: list[float] = []
    dues: list[float] = []
    lag: list[float] = []
    codes: dict[str, int] = {}
    selector = _selector(terminals)
    for each in terminals:
        each.end = len(each.frames)
    count = len(terminals)
    total = math.ceil(rate * duration)
    interval = 1.0 / rate
    unsent = 0
    clock = time.perf_counter
    cpu = time.process_time()
    start = clock()
    stop = start + duration
    offered = 0  # request `offered` is the next to fall due, at start + offered * interval
    busy = 0
    draining = False
    last = start
    while True:
        now = clock()
        while offered < total and start + offered * interval <= now:
            due = start + offered * interval
            terminal = terminals[offered % count]
            offered += 1
            if terminal.busy:
                terminal.queued.append(due)
            elif _send(terminal, due):
                lag.append(now - due)
                busy += 1
            else:
                unsent += 1
        if offered >= total and not draining and now >= stop:
            # Offering is over: what is still queued is not sent; what is in flight is awaited.
            draining = True
            for terminal in terminals:
                unsent += len(terminal.queued)
                terminal.queued.clear()
        if draining and not busy:
            break
        if offered < total:
            timeout = max(0.0, start + offered * interval - clock())
        elif not draining:
            timeout = max(0.0, stop - clock())
        else:
            timeout = SILENCE_S
        if draining:
            events = selector.select(timeout)
        else:
            # epoll waits whole milliseconds (rounded up), 1 ms late for a request due in
            # 0.1 ms; select(2) on the epoll descriptor waits to the microsecond instead.
            if timeout > 0:
                select.select([selector.fileno()], [], [], timeout)
            events = selector.select(0)
        if draining and not events:
            raise TimeoutError(f"no answer for {SILENCE_S:.0f} s ({busy} requests in flight)")
        for key, _ in events:
            waiting: Terminal = key.data
            for answer in _answers(waiting):
                now = clock()
                last = now
                latencies.append(now - waiting.started)
                dues.append(waiting.started - start)
                code = field39(answer)
                codes[code] = codes.get(code, 0) + 1
                waiting.busy = False
                busy -= 1
                if waiting.queued and now < stop:
                    if _send(waiting, waiting.queued.popleft()):
                        busy += 1
                    else:
                        unsent += 1 + len(waiting.queued)
                        waiting.queued.clear()
    elapsed = max(last, stop) - start
    cpu_s = time.process_time() - cpu
    selector.close()
    return Phase(
        latencies, codes, elapsed, cpu_s, offered=offered, unsent=unsent, lag=lag, dues=dues
    )

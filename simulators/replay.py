"""`vipgate sim replay`: send a simulator recording's requests again and report what differs.

A complaint or an incident recorded with `--record` can be played again, against the same
gateway after a fix or against a fresh one. The recording is read whole and checked first
(bad input changes nothing); each request is paired with the answer it got (by MTI and trace,
a repeated request with each of its answers). Then every request is sent again in the order
of the recording, one at a time, each terminal on its own link and session, and each answer
is compared field by field with the recorded one.

The replay cannot reuse the recorded keys: a terminal signs on again by re-sending its
recorded 0800 (or signs on first, when its first request that needs keys comes before any
sign-on), and `Terminal.rebuild` moves each request under the new keys. The recorded keys
are still known (the recorded 0810 under the config's TMK), so an encrypted track is carried
over, and a MAC that was wrong in the recording is sent wrong again. What differs by design
is mapped: the RRN of a void's or refund's original (37) and its date (61) are the ones the
replay got for that original, and when the gateway opened another batch than the recorded
one, the new batch is used for 60.2 and 61. Fields that must differ are not compared: 12, 13,
15, 37, 38, 62, 64 and the header.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cardcodec.cards import mask_card_data, mask_card_number
from cardcodec.errors import CodecError
from cardcodec.frame import LENGTH_BYTES
from cardcodec.message import FieldValue, Message, decode_frame
from cardcodec.profile import Kind, classify
from gateway.config import Config, load_config
from gateway.errors import BadInput
from simulators.connection import NO_FAULTS, Connection, Faults, Link
from simulators.recording import RecordedFrame, read_recording
from simulators.terminal import (
    APPROVED,
    FREE_TEXT_CARD_DIGITS,
    BadAnswerError,
    Request,
    Terminal,
    TerminalError,
    next_batch,
)

# Fields whose values must differ between a recorded answer and its replay.
IGNORED_FIELDS: Final = frozenset({12, 13, 15, 37, 38, 62, 64})
DEFAULT_ANSWER_TIMEOUT_S: Final = 10.0
NO_ANSWER: Final = "(no answer)"


def _mti(frame: bytes) -> str | None:
    """The MTI of a frame, or None when it does not decode."""
    try:
        return decode_frame(frame).mti
    except CodecError:
        return None


def _is_cut(frame: bytes) -> bool:
    """A frame shorter than its length prefix says: the link was cut in the middle of it."""
    return len(frame) < LENGTH_BYTES or int.from_bytes(frame[:LENGTH_BYTES]) > len(frame) - 2


def _answers(request: bytes, answer: bytes) -> bool:
    """Whether `answer` is the answer to `request`: MTI + 10 and the same trace."""
    try:
        asked, got = decode_frame(request), decode_frame(answer)
    except CodecError:
        return False
    return got.mti == f"{int(asked.mti) + 10:04d}" and got.fields.get(11) == asked.fields.get(11)


# --- the recording, paired ------------------------------------------------------------------


@dataclass
class RecordedExchange:
    """One request of the recording and the answer it got (None: none came)."""

    number: int  # 1-based, in the order the requests were sent
    terminal: str
    request: bytes
    answer: bytes | None = None
    frame_number: int = 0  # the request's place among the file's frames, 1-based

    @property
    def cut(self) -> bool:
        return _is_cut(self.request)


@dataclass
class Recording:
    source: str
    exchanges: list[RecordedExchange]
    stray_answers: int = 0  # answers that matched no request
    unattributed: int = 0  # frames the gateway could not tie to a terminal (no 41 read)

    @property
    def terminals(self) -> list[str]:
        return sorted({exchange.terminal for exchange in self.exchanges})


def pair_recording(records: Sequence[RecordedFrame], source: str) -> Recording:
    """The requests in the order sent, each with its answer.

    Per terminal, an answer belongs to the oldest request still waiting whose MTI + 10 and
    trace it has (one that does not decode, to the oldest waiting); requests older than that
    one got none, and an answer that belongs to none is counted as stray. A new request that
    is not a copy of the one waiting (a repeat) means the waiting ones got none; so does a
    cut frame. A frame sent that decodes as an answer means the file is not a simulator's
    recording. A frame of no terminal (a gateway's recording of a frame whose field 41 it
    could not read, terminal "") is counted and left out: it names no terminal to replay it.
    """
    exchanges: list[RecordedExchange] = []
    waiting: dict[str, list[RecordedExchange]] = {}
    stray = unattributed = 0
    for index, record in enumerate(records, start=1):
        if not record.terminal:
            unattributed += 1
            continue
        queue = waiting.setdefault(record.terminal, [])
        if record.direction == "out":
            mti = _mti(record.frame)
            if mti is not None and int(mti) % 20 == 10:
                raise BadInput(
                    f"{source}: frame {index}: sent frame is an answer (MTI {mti}); "
                    "replay takes a simulator's recording, not a gateway's"
                )
            if queue and record.frame != queue[-1].request:
                queue.clear()
            exchange = RecordedExchange(
                len(exchanges) + 1, record.terminal, record.frame, frame_number=index
            )
            exchanges.append(exchange)
            queue.append(exchange)
            if exchange.cut:
                queue.clear()
            continue
        position = next((i for i, e in enumerate(queue) if _answers(e.request, record.frame)), None)
        if position is None and queue and _mti(record.frame) is None:
            position = 0  # an answer that does not decode: the oldest request's, in order
        if position is None:
            stray += 1
            continue
        queue[position].answer = record.frame
        del queue[: position + 1]
    return Recording(source, exchanges, stray, unattributed)


def load_recording(path: Path, config: Config) -> Recording:
    """Read, pair and check a recording against the config; `BadInput` for any problem,
    any card number in its message masked (a path or a key may hold one)."""
    try:
        return _checked_recording(path, config)
    except BadInput as error:
        raise BadInput(mask_card_data(str(error), shortest=FREE_TEXT_CARD_DIGITS)) from None


def _checked_recording(path: Path, config: Config) -> Recording:
    recording = pair_recording(read_recording(path), str(path))
    if not recording.exchanges:
        raise BadInput(f"{path}: no request to replay")
    known = {terminal.id for terminal in config.terminals}
    for exchange in recording.exchanges:
        if exchange.terminal not in known:
            raise BadInput(
                f"{path}: frame {exchange.frame_number}: terminal {exchange.terminal!r} is not a"
                " terminal of the config"
            )
    return recording


# --- comparing answers ----------------------------------------------------------------------


def _shown(number: int, value: FieldValue | None) -> str:
    if value is None:
        return "absent"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return mask_card_number(value) if number == 2 else value


def compare_answers(
    recorded: bytes | None, got: bytes | None, batches: dict[str, str] | None = None
) -> list[str]:
    """What differs between a recorded answer and a new one, one line each, card numbers
    masked. `batches` maps a recorded batch to the replay's (field 60.2)."""
    if recorded is None or got is None:
        if recorded is got:
            return []
        return [f"answer: recorded {_present(recorded)}, got {_present(got)}"]
    try:
        before, after = decode_frame(recorded), decode_frame(got)
    except CodecError:
        return [] if recorded == got else ["answer: one of the two does not decode"]
    differences = []
    if before.mti != after.mti:
        differences.append(f"MTI: recorded {before.mti}, got {after.mti}")
    if before.tpdu != after.tpdu:
        differences.append("TPDU: differs")
    expected = _with_batches(before, batches or {})
    for number in sorted((set(before.fields) | set(after.fields)) - IGNORED_FIELDS):
        old, new = expected.get(number), after.fields.get(number)
        if old != new:
            differences.append(
                f"field {number}: recorded {_shown(number, old)}, got {_shown(number, new)}"
            )
    return differences


def _present(frame: bytes | None) -> str:
    return "none" if frame is None else "one"


def _with_batches(message: Message, batches: dict[str, str]) -> dict[int, FieldValue]:
    """The message's fields with 60.2 mapped to the replay's batch."""
    fields = dict(message.fields)
    data = fields.get(60)
    if isinstance(data, str) and len(data) >= 8 and data[2:8] in batches:
        fields[60] = data[:2] + batches[data[2:8]] + data[8:]
    return fields


# --- the report -----------------------------------------------------------------------------


@dataclass
class ReplayedExchange:
    """One recorded request sent again: what was sent, both answers, what differs."""

    recorded: RecordedExchange
    sent: str
    recorded_answer: str
    answer: str
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> list[str]:
        """Card numbers masked in every line; the differences show field values as
        `compare_answers` does (field 2 masked), since long digit runs of other fields (48's
        totals, say) must stay readable."""
        lines = [f"request {self.recorded.number} {self.recorded.terminal}: {self.sent}"]
        lines.append(f"      recorded < {self.recorded_answer}")
        lines.append(f"      replayed < {self.answer}")
        lines += [f"      note: {note}" for note in self.notes]
        lines = [mask_card_data(line, shortest=FREE_TEXT_CARD_DIGITS) for line in lines]
        lines += [f"      ! {difference}" for difference in self.differences]
        return lines


@dataclass
class ReplayReport:
    source: str
    exchanges: list[ReplayedExchange]
    stray_answers: int = 0
    unattributed: int = 0

    @property
    def differing(self) -> list[ReplayedExchange]:
        return [exchange for exchange in self.exchanges if exchange.differences]

    def render(self) -> str:
        """The answers that differ in full; notes counted; card numbers masked."""
        terminals = sorted({e.recorded.terminal for e in self.exchanges})
        lines = [
            f"replay of {self.source}: {len(self.exchanges)} requests of "
            f"{len(terminals)} terminals ({', '.join(terminals)})"
        ]
        for exchange in self.differing:
            lines += exchange.render()
        notes = Counter(note for exchange in self.exchanges for note in exchange.notes)
        lines += [f"note ({count}x): {note}" for note, count in sorted(notes.items())]
        if self.stray_answers:
            lines.append(f"note: {self.stray_answers} recorded answers matched no request")
        if self.unattributed:
            lines.append(
                f"note: {self.unattributed} recorded frames named no terminal (the gateway"
                " could not read their field 41) and were not replayed"
            )
        same = len(self.exchanges) - len(self.differing)
        lines.append(
            f"{len(self.exchanges)} requests replayed: {same} answered as recorded, "
            f"{len(self.differing)} differ"
        )
        # The file's name is the one free text here.
        lines[0] = mask_card_data(lines[0], shortest=FREE_TEXT_CARD_DIGITS)
        return "\n".join(lines) + "\n"


# --- replaying ------------------------------------------------------------------------------


@dataclass
class _Original:
    """What the replay learnt of a recorded transaction with an RRN."""

    rrn: str  # the replay's RRN for it
    date: str | None  # field 13 of the replay's answer
    terminal: str


class _Session:
    """One terminal of the replay: a live terminal for the new keys, a shadow fed the
    recorded answers for the recorded keys, the link, and the batch map."""

    def __init__(self, terminal: Terminal, shadow: Terminal, connect: Callable[[], Link]) -> None:
        self.live = terminal
        self.shadow = shadow
        self.connect = connect
        self.link: Link | None = None
        self.batches: dict[str, str] = {}

    def open_link(self) -> Link:
        if self.link is None or self.link.closed:
            self.link = self.connect()
        return self.link

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


@dataclass
class _Turn:
    """One recorded request being replayed: its session, the recorded exchange, the recorded
    request typed, and the notes gathered so far."""

    session: _Session
    recorded: RecordedExchange
    original: Request
    notes: list[str] = field(default_factory=list)


class _Replayer:
    def __init__(self, recording: Recording, config: Config, connect: Callable[[], Link]) -> None:
        self.recording = recording
        self.pins = {card.number: card.pin for card in config.cards if card.pin is not None}
        terminals = {terminal.id: terminal for terminal in config.terminals}
        self.sessions = {
            tid: _Session(
                Terminal.from_config(terminals[tid]),
                Terminal.from_config(terminals[tid]),
                connect,
            )
            for tid in recording.terminals
        }
        self.originals: dict[str, _Original] = {}

    def run(self) -> ReplayReport:
        try:
            replayed = [self.one(exchange) for exchange in self.recording.exchanges]
        finally:
            for session in self.sessions.values():
                session.close()
        recording = self.recording
        return ReplayReport(
            recording.source, replayed, recording.stray_answers, recording.unattributed
        )

    def one(self, recorded: RecordedExchange) -> ReplayedExchange:
        session = self.sessions[recorded.terminal]
        if recorded.cut:
            return self._cut(session, recorded)
        try:
            message = decode_frame(recorded.request)
        except CodecError:
            return self._as_recorded(session, recorded)
        kind = _kind(message)
        if kind is None:
            if 64 in message.fields:
                return self._unsupported(session, recorded, message)
            return self._as_recorded(session, recorded)
        turn = _Turn(session, recorded, Request(kind, message, recorded.request))
        if 64 in message.fields and session.live.keys is None:
            turn.notes.append(self._sign_on_first(session))
        try:
            rebuilt = session.live.rebuild(
                recorded.request,
                recorded_keys=session.shadow.keys,
                pins=self.pins,
                replace=self._replacements(session, message, turn.notes),
            )
        except (TerminalError, CodecError, ValueError) as error:
            return ReplayedExchange(
                recorded,
                f"{message.mti} {kind.value} trace {message.fields.get(11)!s}",
                _describe(session.shadow, turn.original, recorded.answer),
                "(not sent)",
                [f"not sent: {error}"],
                turn.notes,
            )
        turn.notes += rebuilt.notes
        faults = Faults(corrupt_mac=True) if rebuilt.recorded_mac_wrong else NO_FAULTS
        if faults.corrupt_mac:
            turn.notes.append("the recorded MAC was wrong: the new one is sent wrong too")
        answer = self._exchange(session, rebuilt.request.frame, faults)
        return self._compare(turn, rebuilt.request, answer)

    def _compare(self, turn: _Turn, sent: Request, answer: bytes | None) -> ReplayedExchange:
        session, recorded = turn.session, turn.recorded
        recorded_text = _describe(session.shadow, turn.original, recorded.answer)
        answer_text = _describe(session.live, sent, answer)
        if sent.kind is Kind.SIGN_ON:
            _adopt(session.shadow, turn.original, recorded.answer)
            _adopt(session.live, sent, answer)
        self._learn(session, recorded, sent, answer)
        differences = compare_answers(recorded.answer, answer, session.batches)
        refused = [text for text in (recorded_text, answer_text) if text.startswith("(refused")]
        if len(refused) == 1:
            differences.append(f"the terminal refused one answer: {refused[0]}")
        return ReplayedExchange(
            recorded, sent.describe(), recorded_text, answer_text, differences, turn.notes
        )

    def _exchange(self, session: _Session, frame: bytes, faults: Faults) -> bytes | None:
        try:
            link = session.open_link()
        except OSError:
            return None
        return link.exchange(frame, faults, session.live.terminal_id).answer

    def _cut(self, session: _Session, recorded: RecordedExchange) -> ReplayedExchange:
        """Part of a frame, then the link closed: sent again the same way."""
        with contextlib.suppress(OSError):
            session.open_link().exchange(
                recorded.request, Faults(disconnect=True), recorded.terminal
            )
        if session.link is not None:
            session.link.close()
        return ReplayedExchange(
            recorded, "(part of a frame, then the link cut, as recorded)", NO_ANSWER, NO_ANSWER
        )

    def _unsupported(
        self, session: _Session, recorded: RecordedExchange, message: Message
    ) -> ReplayedExchange:
        """A MAC'd frame that is no request of the profile (`omit_field = 3`, say): sent with
        its fields as recorded and a MAC under this session's keys, since the gateway checks
        the MAC before it answers `12`; a recorded MAC that was wrong is sent wrong again."""
        notes: list[str] = []
        if session.live.keys is None:
            notes.append(self._sign_on_first(session))
        try:
            frame, mac_wrong = session.live.remac(
                recorded.request,
                recorded_keys=session.shadow.keys,
                replace=self._replacements(session, message, notes),
            )
        except (TerminalError, CodecError) as error:
            return ReplayedExchange(
                recorded, f"{message.mti} (no request of the profile)", NO_ANSWER,
                "(not sent)", [f"not sent: {error}"], notes,
            )  # fmt: skip
        faults = Faults(corrupt_mac=True) if mac_wrong else NO_FAULTS
        answer = self._exchange(session, frame, faults)
        return ReplayedExchange(
            recorded,
            f"{message.mti} (no request of the profile, MAC'd again)",
            NO_ANSWER if recorded.answer is None else "(an answer)",
            NO_ANSWER if answer is None else "(an answer)",
            compare_answers(recorded.answer, answer, session.batches),
            notes,
        )

    def _as_recorded(self, session: _Session, recorded: RecordedExchange) -> ReplayedExchange:
        """A frame that is no request of the profile goes again byte for byte."""
        answer = self._exchange(session, recorded.request, NO_FAULTS)
        return ReplayedExchange(
            recorded,
            "(a frame that is no request of the profile, sent as recorded)",
            NO_ANSWER if recorded.answer is None else "(an answer)",
            NO_ANSWER if answer is None else "(an answer)",
            compare_answers(recorded.answer, answer, session.batches),
        )

    def _sign_on_first(self, session: _Session) -> str:
        """A sign-on (with a TDK) before a request that needs keys, when the recording has
        none before it; its answer is not compared."""
        request = session.live.sign_on(tdk=True)
        answer = self._exchange(session, request.frame, NO_FAULTS)
        _adopt(session.live, request, answer)
        return "signed on first: the recording has no sign-on of this terminal before it"

    def _replacements(
        self, session: _Session, message: Message, notes: list[str]
    ) -> dict[int, FieldValue]:
        """60.2, 61 and 37 as the replay knows them (batch, original's RRN and date)."""
        fields = message.fields
        replace: dict[int, FieldValue] = {}
        data = fields.get(60)
        if isinstance(data, str) and data[2:8] in session.batches:
            replace[60] = data[:2] + session.batches[data[2:8]] + data[8:]
        rrn = fields.get(37)
        original = self.originals.get(rrn) if isinstance(rrn, str) else None
        if isinstance(rrn, str):
            if original is None:
                notes.append("the original's RRN is not in the recording: sent as recorded")
            else:
                replace[37] = original.rrn
        data = fields.get(61)
        if isinstance(data, str) and len(data) in (12, 16):
            owner = session
            if original is not None:
                owner = self.sessions.get(original.terminal, session)
            batch = owner.batches.get(data[:6], data[:6])
            date = data[12:]
            if date and original is not None and original.date is not None:
                date = original.date
            replace[61] = batch + data[6:12] + date
        return replace

    def _learn(
        self, session: _Session, recorded: RecordedExchange, sent: Request, answer: bytes | None
    ) -> None:
        """Remember the replay's RRN and date of each recorded RRN, and the batch the gateway
        opened where the recording had another."""
        if recorded.answer is None or answer is None:
            return
        try:
            before, after = decode_frame(recorded.answer), decode_frame(answer)
        except CodecError:
            return
        old_rrn, new_rrn = before.fields.get(37), after.fields.get(37)
        if isinstance(old_rrn, str) and isinstance(new_rrn, str) and sent.kind is not Kind.SIGN_ON:
            date = after.fields.get(13)
            self.originals[old_rrn] = _Original(
                new_rrn, date if isinstance(date, str) else None, session.live.terminal_id
            )
        both_approved = before.fields.get(39) == APPROVED == after.fields.get(39)
        if not both_approved:
            return
        old_60, new_60 = before.fields.get(60), after.fields.get(60)
        if sent.kind is Kind.SIGN_ON and isinstance(old_60, str) and isinstance(new_60, str):
            session.batches[old_60[2:8]] = new_60[2:8]
        if sent.kind is Kind.SETTLEMENT and isinstance(new_60, str):
            recorded_batch = decode_frame(recorded.request).text(60)[2:8]
            session.batches[next_batch(recorded_batch)] = next_batch(new_60[2:8])


def _kind(message: Message) -> Kind | None:
    processing, data = message.fields.get(3), message.fields.get(60)
    return classify(
        message.mti,
        processing if isinstance(processing, str) else None,
        data if isinstance(data, str) else None,
    )


def _adopt(terminal: Terminal, request: Request, answer: bytes | None) -> None:
    """Take the keys and batch of a sign-on answer, when it is a good one."""
    if answer is not None:
        with contextlib.suppress(BadAnswerError):
            terminal.receive(request, answer)


def _describe(terminal: Terminal, request: Request, answer: bytes | None) -> str:
    """An answer in one line as the terminal reads it (checks and MAC included)."""
    if answer is None:
        return NO_ANSWER
    try:
        return terminal.read(request, answer).describe()
    except BadAnswerError as refused:
        return f"(refused: {refused.reason})"


def replay(recording: Recording, config: Config, connect: Callable[[], Link]) -> ReplayReport:
    """Send every recorded request again through links `connect` opens; report each."""
    return _Replayer(recording, config, connect).run()


def replay_file(
    path: Path,
    config_path: Path,
    target: tuple[str, int],
    answer_timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S,
) -> ReplayReport:
    """`vipgate sim replay`: load the config and the recording, replay it against
    HOST:PORT. `BadInput` for a bad config or recording, before anything is sent."""
    config = load_config(config_path)
    recording = load_recording(path, config)
    return replay(
        recording,
        config,
        lambda: Connection.open(target, answer_timeout_s=answer_timeout_s),
    )

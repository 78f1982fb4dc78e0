"""The terminal simulator's core: vector frames byte for byte, answer checks, the reversal rule
of §4.6, local batch totals, settlement and the trace counter."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcodec.crypto import Suite, WorkingKeys, mac, verify_mac, wrap_working_keys
from cardcodec.frame import PROCESSING_OK, PROCESSING_SIGN_ON_AGAIN, Tpdu, add_length
from cardcodec.message import (
    FieldValue,
    decode_frame,
    encode_frame,
    encode_message_with_mac,
    mac_input,
    received_mac,
)
from cardcodec.subfields import (
    RESULT_BALANCED,
    RESULT_UNBALANCED,
    Balance,
    MessageData,
    OriginalData,
    PointsInfo,
    SettlementTotals,
    Totals,
    parse_upload,
    parse_upload_end,
)
from simulators.terminal import (
    REASON_BAD_MAC,
    REASON_NO_ANSWER,
    REASON_OTHER,
    REASON_TERMINAL_FAILED,
    BadAnswerError,
    CardEntry,
    Completed,
    NotSignedOnError,
    Request,
    Result,
    ReversalPendingError,
    Terminal,
    TerminalError,
    next_batch,
)
from tests.vectors import SuiteCase, suite_cases

CASES = suite_cases()
TERMINAL_ID = "10000001"
MERCHANT_ID = "898310048990001"
TMK = bytes.fromhex("FD32139FDCE66744281F7C0090707DF2")
KEYS = WorkingKeys(
    pik=bytes.fromhex("9AD78580D9DC4FD26CBCFAF95E8625F5"),
    mak=bytes.fromhex("1349C33040A656CB04BC1244A6FDABA1"),
    tdk=bytes.fromhex("034323ECF655B85BF47F4C7914260C35"),
)
CARD = CardEntry("6688000000000000014", "2812")
KEYED = CardEntry("6688000000000000014", "2812", keyed=True)
OTHER_CARD = CardEntry("6688001234567890124", "2906")


# --- helpers: answers as a gateway would send them ------------------------------------------


def answer_frame(
    request: Request,
    code: str,
    fields: dict[int, FieldValue] | None = None,
    *,
    keys: WorkingKeys | None = None,
    suite: Suite = Suite.TDES,
    processing: str = PROCESSING_OK,
) -> bytes:
    """The answer to `request`: 11, 41, 42 and 60 echoed, 12, 13 and 39, plus `fields`;
    MAC'd under `keys` when given."""
    echoed = {n: request.message.fields[n] for n in (11, 41, 42, 60)}
    reply = request.message.reply(
        {**echoed, 12: "120000", 13: "0606", 39: code, **(fields or {})}, processing
    )
    if keys is None:
        return encode_frame(reply)
    return add_length(encode_message_with_mac(reply, lambda data: mac(suite, keys.mak, data)))


def sign_on_answer(
    request: Request, tmk: bytes, keys: WorkingKeys, suite: Suite, batch: str = "000001"
) -> bytes:
    """An approved 0810 with the keys wrapped under the TMK and `batch` in 60.2."""
    data = MessageData.parse(request.message.text(60)).with_batch(batch).format()
    extra: dict[int, FieldValue] = {
        15: "0606",
        32: "48020000",
        37: "000000000001",
        60: data,
        62: wrap_working_keys(suite, tmk, keys),
    }
    return answer_frame(request, "00", extra)


def signed_on(suite: Suite = Suite.TDES, batch: str = "000001") -> Terminal:
    """A terminal of the vectors' first case, signed on with a TDK."""
    terminal = Terminal(TERMINAL_ID, MERCHANT_ID, suite, TMK)
    request = terminal.sign_on(tdk=True)
    terminal.receive(request, sign_on_answer(request, TMK, KEYS, suite, batch))
    return terminal


def financial_answer(
    request: Request,
    code: str = "00",
    *,
    amount_fen: int | None = None,
    points: int = 0,
    balance: int = 1000,
    rrn: str = "000000000100",
    keys: WorkingKeys | None = KEYS,
    suite: Suite = Suite.TDES,
) -> bytes:
    """The answer to a 0200/0220/0400; approved ones carry 38, 54, 63 and a MAC."""
    message = request.message
    fields: dict[int, FieldValue] = {3: message.text(3), 15: "0606", 32: "48020000", 37: rrn}
    fields[49] = "156"
    if 4 in message.fields:
        fields[4] = f"{amount_fen:012d}" if amount_fen is not None else message.text(4)
    if code not in ("00", "10"):
        return answer_frame(request, code, fields)
    if request.message.mti != "0400":
        fields |= {38: "A1B2C3", 54: Balance(2 * balance).format()}
        fields[63] = PointsInfo(points, balance, 0, 2 * points).format()
    return answer_frame(request, code, fields, keys=keys, suite=suite)


def management_answer(
    request: Request, code: str = "00", extra: dict[int, FieldValue] | None = None
) -> bytes:
    """The approved answer to a MAC'd management request (0820 sign-off, 0500, 0320)."""
    return answer_frame(request, code, extra, keys=KEYS if code == "00" else None)


def redeem(terminal: Terminal, requested_fen: int, code: str = "00", **answer: Any) -> Completed:
    """A redemption of CARD answered with `code` (and `answer`'s fields), as a Completed."""
    request = terminal.redemption(CARD, requested_fen)
    result = terminal.receive(request, financial_answer(request, code, **answer))
    return Completed(request, result)


# --- the known-answer vectors ----------------------------------------------------------------


def vector_terminal(case: SuiteCase) -> Terminal:
    return Terminal(TERMINAL_ID, MERCHANT_ID, case.suite, case.tmk)


def vector_signed_on(case: SuiteCase) -> Terminal:
    terminal = vector_terminal(case)
    request = terminal.sign_on(tdk=True)
    terminal.receive(request, case.frame("sign_on_response_frame"))
    terminal.stan = 42
    return terminal


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sign_on_request_is_the_vector_frame(case: SuiteCase) -> None:
    """The 0800 asking for a TDK (004 for 3DES, 006 for SM4) is the vector byte for byte."""
    assert vector_terminal(case).sign_on(tdk=True).frame == case.frame("sign_on_request_frame")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sign_on_answer_unwraps_the_case_keys_and_adopts_the_batch(case: SuiteCase) -> None:
    """The vector 0810 gives the case's PIK, MAK and TDK and the batch of its 60.2."""
    terminal = vector_terminal(case)
    request = terminal.sign_on(tdk=True)
    result = terminal.receive(request, case.frame("sign_on_response_frame"))
    assert result.code == "00"
    assert terminal.keys == WorkingKeys(case.pik, case.mak, case.tdk)
    assert terminal.signed_on and terminal.has_tdk and terminal.asked_tdk
    assert terminal.batch == "000001"


@pytest.mark.parametrize(
    ("name", "trace", "options"),
    [
        ("redemption_frame", 42, {}),
        ("redemption_encrypted_track_frame", 43, {"encrypt_track": True}),
        ("redemption_with_pin_frame", 44, {"pin": "123456"}),
    ],
)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_redemption_builders_give_the_vector_frames(
    case: SuiteCase, name: str, trace: int, options: dict[str, object]
) -> None:
    """Plain, TDK-encrypted-track and PIN redemptions of 12800 fen are the vectors exactly."""
    terminal = vector_signed_on(case)
    terminal.stan = trace
    card = CardEntry(case.card_number, "2812")
    pin = options.get("pin")
    request = terminal.redemption(
        card,
        12800,
        pin=pin if isinstance(pin, str) else None,
        encrypt_track=options.get("encrypt_track") is True,
    )
    assert request.frame == case.frame(name)


def test_a_request_whose_fields_do_not_read_is_still_described() -> None:
    """A recorded request with 60.6 = 9 (a hostile terminal's, in a gateway's recording):
    described by its trace and what is wrong, for the replay's report, never by a crash."""
    case = CASES[0]
    terminal = vector_signed_on(case)
    request = terminal.redemption(CardEntry(case.card_number, "2812"), 12800)
    fields = dict(request.message.fields)
    fields[60] = str(fields[60])[:-1] + "9"
    hostile = dataclasses.replace(request, message=dataclasses.replace(request.message,
                                                                        fields=fields))  # fmt: skip
    described = hostile.describe()
    assert described.startswith(f"0200 redemption trace {request.trace} (fields do not read: ")
    assert "60.6" in described
    assert case.card_number not in described


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_successive_redemptions_take_successive_traces(case: SuiteCase) -> None:
    """From trace 42, the three vector redemptions come out as 42, 43 and 44 in turn."""
    terminal = vector_signed_on(case)
    card = CardEntry(case.card_number, "2812")
    frames = [
        terminal.redemption(card, 12800).frame,
        terminal.redemption(card, 12800, encrypt_track=True).frame,
        terminal.redemption(card, 12800, pin=case.pin).frame,
    ]
    names = ["redemption_frame", "redemption_encrypted_track_frame", "redemption_with_pin_frame"]
    assert frames == [case.frame(name) for name in names]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_vector_redemption_answer_reads_as_typed_result(case: SuiteCase) -> None:
    """The vector 0210: 00, RRN, auth code, 12800 fen, 6400 points, 93600 left, 187200 fen."""
    terminal = vector_signed_on(case)
    request = terminal.redemption(CardEntry(case.card_number, "2812"), 12800)
    result = terminal.receive(request, case.frame("redemption_response_frame"))
    assert result == Result(
        kind=request.kind,
        mti="0210",
        code="00",
        trace="000042",
        batch="000001",
        rrn="000000000002",
        auth_code="A1B2C3",
        amount_fen=12800,
        local_date="1115",
        business_date="1115",
        points=6400,
        balance_points=93600,
        discount_bp=0,
        cash_fen=12800,
        balance_fen=187200,
    )
    assert terminal.totals() == Totals(12800, 1, 0, 0)
    assert terminal.pending_reversal is None


# --- answer checks ---------------------------------------------------------------------------


def test_answer_with_a_bad_mac_is_refused_and_leaves_reason_a0() -> None:
    """An approved 0210 whose MAC is wrong is refused; the redemption is owed a reversal A0."""
    terminal = signed_on()
    request = terminal.redemption(CARD, 1000)
    frame = bytearray(financial_answer(request, points=500))
    frame[-1] ^= 0x01
    with pytest.raises(BadAnswerError) as refused:
        terminal.receive(request, bytes(frame))
    assert refused.value.reversal_reason == REASON_BAD_MAC
    assert terminal.pending_reversal is not None
    assert terminal.pending_reversal.reason == REASON_BAD_MAC
    assert terminal.totals() == Totals(0, 0, 0, 0)


def test_approved_answer_without_a_mac_is_refused() -> None:
    """An approved 0210 that carries no field 64 is refused like a wrong MAC."""
    terminal = signed_on()
    request = terminal.redemption(CARD, 1000)
    with pytest.raises(BadAnswerError) as refused:
        terminal.receive(request, financial_answer(request, keys=None))
    assert refused.value.reversal_reason == REASON_BAD_MAC


def test_decline_without_a_mac_is_accepted() -> None:
    """A 51 carries no MAC (§4) and is taken as it is; nothing is owed or counted."""
    terminal = signed_on()
    request = terminal.redemption(CARD, 1000)
    result = terminal.receive(request, financial_answer(request, "51"))
    assert (result.code, result.approved) == ("51", False)
    assert terminal.pending_reversal is None
    assert terminal.totals() == Totals(0, 0, 0, 0)


def _with(frame: bytes, **changes: object) -> bytes:
    message = decode_frame(frame)
    for name, value in changes.items():
        if name == "field11":
            message.fields[11] = str(value)
        else:
            setattr(message, name, value)
    return encode_frame(message)


@pytest.mark.parametrize(
    "change",
    [
        {"mti": "0230"},
        {"field11": "999999"},
        {"tpdu": Tpdu("0003", "0000")},
    ],
    ids=["mti", "trace", "tpdu-not-swapped"],
)
def test_answer_that_does_not_belong_to_the_request_is_refused(change: dict[str, object]) -> None:
    """Wrong MTI, trace not echoed or TPDU not swapped: refused, reversal reason 06."""
    terminal = signed_on()
    request = terminal.redemption(CARD, 1000)
    frame = _with(financial_answer(request, "51"), **change)
    with pytest.raises(BadAnswerError) as refused:
        terminal.receive(request, frame)
    assert refused.value.reversal_reason == REASON_OTHER
    assert terminal.pending_reversal is not None
    assert terminal.pending_reversal.reason == REASON_OTHER


def test_garbage_answer_is_refused_without_repeating_its_bytes() -> None:
    """An answer that does not decode is refused with the codec's reason, never its bytes."""
    terminal = signed_on()
    request = terminal.balance(CARD)
    with pytest.raises(BadAnswerError) as refused:
        terminal.receive(request, b"\x00\x03\x61\x00\x03")
    assert refused.value.reversal_reason == REASON_OTHER
    assert terminal.pending_reversal is None  # inquiries are never reversed


def test_header_digit_3_means_sign_on_again() -> None:
    """An A0 with header digit 3 marks the terminal as not signed on."""
    terminal = signed_on()
    request = terminal.redemption(CARD, 1000)
    frame = answer_frame(request, "A0", processing=PROCESSING_SIGN_ON_AGAIN)
    result = terminal.receive(request, frame)
    assert result.sign_on_again and result.code == "A0"
    assert not terminal.signed_on
    assert terminal.pending_reversal is None


def test_echo_answer_needs_no_mac_and_can_ask_for_a_sign_on() -> None:
    """An echo from a terminal never signed on is answered 00 with digit 3, no MAC."""
    terminal = Terminal(TERMINAL_ID, MERCHANT_ID, Suite.TDES, TMK)
    request = terminal.echo()
    assert decode_frame(request.frame).fields.keys() == {11, 41, 42, 60}
    result = terminal.receive(request, answer_frame(request, "00", processing="3"))
    assert (result.code, result.sign_on_again) == ("00", True)


def test_failed_sign_on_keeps_the_earlier_keys() -> None:
    """A sign-on answered A7 changes neither keys nor batch."""
    terminal = signed_on(batch="000007")
    request = terminal.sign_on(suite=Suite.SM4)
    assert MessageData.parse(request.message.text(60)).management_code == "005"
    terminal.receive(request, answer_frame(request, "A7"))
    assert terminal.keys == KEYS
    assert terminal.batch == "000007"


def test_sign_on_answer_with_wrong_check_values_is_refused() -> None:
    """Keys whose KCV does not match are refused and not adopted."""
    terminal = Terminal(TERMINAL_ID, MERCHANT_ID, Suite.TDES, TMK)
    request = terminal.sign_on()
    other_tmk = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    with pytest.raises(BadAnswerError):
        terminal.receive(request, sign_on_answer(request, other_tmk, KEYS, Suite.TDES))
    assert terminal.keys is None and not terminal.signed_on


def test_sign_on_answer_with_keys_other_than_asked_is_refused() -> None:
    """An 0810 with a TDK to a sign-on that asked for none (or none when asked) is refused."""
    for asked, sent in ((False, KEYS), (True, WorkingKeys(KEYS.pik, KEYS.mak))):
        terminal = Terminal(TERMINAL_ID, MERCHANT_ID, Suite.TDES, TMK)
        request = terminal.sign_on(tdk=asked)
        with pytest.raises(BadAnswerError, match="field 62"):
            terminal.receive(request, sign_on_answer(request, TMK, sent, Suite.TDES))
        assert terminal.keys is None


def test_sign_off_verifies_its_mac_and_marks_the_terminal_signed_off() -> None:
    """An approved 0830 to a sign-off carries a MAC; then the terminal is signed off."""
    terminal = signed_on()
    request = terminal.sign_off()
    assert verify_mac(
        Suite.TDES, KEYS.mak, mac_input(request.frame[2:]), received_mac(request.frame[2:])
    )
    terminal.receive(request, management_answer(request))
    assert not terminal.signed_on


# --- building ----------------------------------------------------------------------------------


def test_requests_need_keys_before_any_sign_on() -> None:
    """A MAC'd request from a terminal that never signed on cannot be built."""
    terminal = Terminal(TERMINAL_ID, MERCHANT_ID, Suite.TDES, TMK)
    with pytest.raises(NotSignedOnError):
        terminal.redemption(CARD, 1000)


def test_track_encryption_needs_a_tdk() -> None:
    """Asking to encrypt the track after a sign-on without TDK is refused."""
    terminal = Terminal(TERMINAL_ID, MERCHANT_ID, Suite.TDES, TMK)
    request = terminal.sign_on()
    keys = WorkingKeys(KEYS.pik, KEYS.mak)
    terminal.receive(request, sign_on_answer(request, TMK, keys, Suite.TDES))
    with pytest.raises(TerminalError, match="TDK"):
        terminal.redemption(CARD, 1000, encrypt_track=True)


def test_keyed_redemption_carries_card_number_and_expiry_not_track() -> None:
    """Keyed entry: 2 and 14 instead of 35, entry mode 011 with a PIN."""
    terminal = signed_on()
    message = terminal.redemption(KEYED, 1000, pin="123456").message
    assert message.fields[2] == KEYED.number and message.fields[14] == "2812"
    assert 35 not in message.fields
    assert message.fields[22] == "011"


def test_partial_flag_sets_60_6() -> None:
    """`partial` sets 60.6 to 1; otherwise it is 0."""
    terminal = signed_on()
    assert terminal.redemption(CARD, 1, partial=True).message.text(60) == "22000001000201"
    assert terminal.redemption(CARD, 1).message.text(60) == "22000001000200"


def test_void_carries_the_original_amount_rrn_batch_and_trace() -> None:
    """A void: 4 the answered amount (A' after a partial), 37 its RRN, 61 batch + trace."""
    terminal = signed_on()
    original = redeem(terminal, 1000, "10", amount_fen=309, rrn="000000000777")
    message = terminal.void(original).message
    assert message.mti == "0200" and message.fields[3] == "200000"
    assert message.fields[4] == "000000000309"
    assert message.fields[37] == "000000000777"
    assert OriginalData.parse(message.text(61)) == OriginalData("000001", original.request.trace)
    assert message.fields[22] == "022" and 26 not in message.fields


def test_refund_carries_the_original_date_from_its_answer() -> None:
    """A refund's 61 adds the original answer's field 13 (MMDD) to batch and trace."""
    terminal = signed_on()
    original = redeem(terminal, 1000)
    message = terminal.refund(original, 400).message
    assert message.mti == "0220"
    assert message.fields[4] == "000000000400"
    assert OriginalData.parse(message.text(61)).date == "0606"


def test_stan_wraps_from_999999_to_000001() -> None:
    """After trace 999999 the next request carries 000001."""
    terminal = signed_on()
    terminal.stan = 999_999
    traces = [terminal.echo().trace for _ in range(3)]
    assert traces == ["999999", "000001", "000002"]


@given(start=st.integers(1, 999_999), count=st.integers(1, 50))
def test_traces_are_consecutive_modulo_the_wrap(start: int, count: int) -> None:
    """Any run of requests takes consecutive traces in 1-999999, never 0."""
    terminal = Terminal(TERMINAL_ID, MERCHANT_ID, Suite.TDES, TMK, stan=start)
    traces = [int(terminal.echo().trace) for _ in range(count)]
    assert traces == [(start - 1 + i) % 999_999 + 1 for i in range(count)]


def test_batch_after_999999_is_000001() -> None:
    """Batch numbers count on by one and wrap to 000001."""
    assert (next_batch("000001"), next_batch("999999")) == ("000002", "000001")


# --- the reversal rule (§4.6) -------------------------------------------------------------------


def _reversal_fields(request: Request) -> dict[int, FieldValue]:
    return decode_frame(request.frame).fields


def test_dropped_redemption_answer_makes_the_next_thing_sent_a_reversal() -> None:
    """No answer: nothing but the 0400 (reason 98, same trace/batch, no 35/53/37) can go."""
    terminal = signed_on()
    original = terminal.redemption(CARD, 1000, pin="123456", encrypt_track=True)
    terminal.no_answer(original)
    with pytest.raises(ReversalPendingError):
        terminal.balance(CARD)
    with pytest.raises(ReversalPendingError):
        terminal.settlement()
    reversal = terminal.reversal()
    fields = _reversal_fields(reversal)
    assert reversal.mti == "0400"
    assert set(fields) == {3, 4, 11, 22, 25, 39, 41, 42, 49, 60, 64}
    assert fields[39] == REASON_NO_ANSWER
    for number in (3, 4, 11, 22, 25, 41, 42, 49, 60):
        assert fields[number] == original.message.fields[number]
    payload = reversal.frame[2:]
    assert verify_mac(Suite.TDES, KEYS.mak, mac_input(payload), received_mac(payload))


def test_dropped_void_answer_reverses_the_void_with_field_61() -> None:
    """A void without an answer is reversed with 61 and without 37."""
    terminal = signed_on()
    original = redeem(terminal, 1000)
    void = terminal.void(original)
    terminal.no_answer(void)
    fields = _reversal_fields(terminal.reversal())
    assert set(fields) == {3, 4, 11, 22, 25, 39, 41, 42, 49, 60, 61, 64}
    assert fields[61] == void.message.fields[61]
    assert fields[11] == void.trace
    assert MessageData.parse(str(fields[60])).message_type == "23"


@pytest.mark.parametrize("kind", ["redemption", "void"])
def test_keyed_originals_are_reversed_with_card_number_and_expiry(kind: str) -> None:
    """The reversal of a keyed redemption or void keeps fields 2 and 14."""
    terminal = signed_on()
    if kind == "redemption":
        original = terminal.redemption(KEYED, 1000, pin="123456")
    else:
        original = terminal.void(redeem(terminal, 1000), card=KEYED)
    terminal.no_answer(original)
    fields = _reversal_fields(terminal.reversal())
    assert fields[2] == KEYED.number and fields[14] == "2812"
    assert 26 not in fields and 52 not in fields


def test_sign_on_may_go_before_an_owed_reversal_which_then_uses_the_new_mak() -> None:
    """A sign-on is allowed while a reversal is owed; the 0400 is MAC'd under the new MAK."""
    terminal = signed_on()
    terminal.no_answer(terminal.redemption(CARD, 1000))
    request = terminal.sign_on()
    fresh = WorkingKeys(KEYS.mak, KEYS.pik)
    terminal.receive(request, sign_on_answer(request, TMK, fresh, Suite.TDES))
    payload = terminal.reversal().frame[2:]
    assert verify_mac(Suite.TDES, fresh.mak, mac_input(payload), received_mac(payload))


def test_approved_reversal_clears_the_debt_and_a0_keeps_it() -> None:
    """A 0410 with A0 leaves the reversal owed; with 00 it is settled."""
    terminal = signed_on()
    terminal.no_answer(terminal.redemption(CARD, 1000))
    reversal = terminal.reversal()
    terminal.receive(reversal, answer_frame(reversal, "A0", processing="3"))
    assert terminal.pending_reversal is not None
    reversal = terminal.reversal()
    terminal.receive(reversal, financial_answer(reversal))
    assert terminal.pending_reversal is None
    assert terminal.balance(CARD).mti == "0200"


def test_terminal_failure_after_an_approval_reverses_it_out_of_the_totals() -> None:
    """give_up with 96 on an approved redemption: the approved 0410 takes it off the debits."""
    terminal = signed_on()
    kept = redeem(terminal, 700)
    failed = redeem(terminal, 300)
    terminal.give_up(failed.request, REASON_TERMINAL_FAILED)
    reversal = terminal.reversal()
    assert reversal.message.fields[39] == "96"
    terminal.receive(reversal, financial_answer(reversal))
    assert terminal.totals() == Totals(700, 1, 0, 0)
    assert kept.result is not None


def test_refunds_and_inquiries_are_never_reversed() -> None:
    """No answer to a refund or balance inquiry owes nothing; asking to reverse one fails."""
    terminal = signed_on()
    refund = terminal.refund(redeem(terminal, 1000), 100)
    terminal.no_answer(refund)
    terminal.no_answer(terminal.balance(CARD))
    assert terminal.pending_reversal is None
    with pytest.raises(TerminalError):
        terminal.give_up(refund)


# --- local batch totals, settlement and upload -----------------------------------------------


def test_local_totals_after_a_day_of_answers() -> None:
    """Debits: 00 and 10 redemptions at the answered amount, voided included, reversed not;
    credits: approved voids and refunds; declines and inquiries nowhere."""
    terminal = signed_on()
    first = redeem(terminal, 1000)  # debit 1000
    redeem(terminal, 800, "10", amount_fen=309)  # debit 309 (A')
    redeem(terminal, 500, "51")  # nowhere
    voided = redeem(terminal, 2000)  # debit 2000, voided below
    void = terminal.void(voided)
    terminal.receive(void, financial_answer(void))  # credit 2000
    bad_void = terminal.void(first, amount_fen=999)
    terminal.receive(bad_void, financial_answer(bad_void, "64"))  # nowhere
    refund = terminal.refund(first, 400)
    terminal.receive(refund, financial_answer(refund))  # credit 400
    lost = terminal.redemption(CARD, 3000)
    terminal.no_answer(lost)  # never counted
    reversal = terminal.reversal()
    terminal.receive(reversal, financial_answer(reversal))
    inquiry = terminal.balance(CARD)
    terminal.receive(inquiry, financial_answer(inquiry))  # nowhere
    assert terminal.totals() == Totals(1000 + 309 + 2000, 3, 2000 + 400, 2)


@given(
    answers=st.lists(
        st.tuples(st.integers(1, 10**6), st.sampled_from(["00", "10", "51", "55", "61"])),
        max_size=12,
    )
)
def test_debits_are_the_sum_of_approved_redemptions(answers: list[tuple[int, str]]) -> None:
    """For any run of redemption answers, debits are the approved amounts and their count."""
    terminal = signed_on()
    for amount, code in answers:
        redeem(terminal, amount, code)
    approved = [amount for amount, code in answers if code in ("00", "10")]
    assert terminal.totals() == Totals(sum(approved), len(approved), 0, 0)


def test_settlement_sends_local_totals_and_closes_the_batch_either_way() -> None:
    """The 0500 carries the local totals; an unbalanced 0510 still moves to batch + 1 and
    the upload ends with 202 and the record count."""
    terminal = signed_on(batch="999999")
    redeem(terminal, 1234)
    settlement = terminal.settlement()
    sent = SettlementTotals.parse(settlement.message.text(48))
    assert sent == SettlementTotals(Totals(1234, 1, 0, 0))
    assert settlement.message.text(60) == "00999999201"
    gateway = SettlementTotals(Totals(0, 0, 0, 0), RESULT_UNBALANCED).format()
    result = terminal.receive(settlement, management_answer(settlement, extra={48: gateway}))
    assert result.balanced is False
    assert terminal.batch == "000001"
    assert terminal.totals() == Totals(0, 0, 0, 0)
    assert terminal.settled is not None
    (chunk,) = terminal.settled.chunks()
    upload = terminal.batch_upload(chunk)
    assert upload.message.text(60) == "00999999201"
    (record,) = parse_upload(upload.message.text(48))
    assert (record.card_number, record.amount_fen) == (CARD.number, 1234)
    end = terminal.upload_end(1)
    assert end.message.text(60) == "00999999202"
    assert parse_upload_end(end.message.text(48)) == 1


def test_balanced_settlement_ends_its_upload_with_207_and_chunks_of_8() -> None:
    """Twenty records go as 8 + 8 + 4; the end after a balanced 0510 says 207."""
    terminal = signed_on()
    for amount in range(1, 21):
        redeem(terminal, amount)
    settlement = terminal.settlement()
    gateway = SettlementTotals(terminal.totals(), RESULT_BALANCED).format()
    terminal.receive(settlement, management_answer(settlement, extra={48: gateway}))
    assert terminal.settled is not None and terminal.settled.balanced
    assert [len(chunk) for chunk in terminal.settled.chunks()] == [8, 8, 4]
    assert terminal.upload_end(20).message.text(60) == "00000001207"


def test_a_settlement_sent_again_after_a_sign_on_closes_its_own_batch() -> None:
    """The 0510 is lost; the terminal signs on (the 0810 gives batch 000002, the gateway
    having closed 000001) and sends the 0500 again: the stored 0510 closes 000001, the
    settlement's own, and the terminal stays in 000002 (§4.7)."""
    terminal = signed_on()
    redeem(terminal, 100)
    settlement = terminal.settlement()
    request = terminal.sign_on(tdk=True)
    terminal.receive(request, sign_on_answer(request, TMK, KEYS, Suite.TDES, "000002"))
    assert terminal.batch == "000002"
    gateway = SettlementTotals(Totals(100, 1, 0, 0), RESULT_BALANCED).format()
    terminal.receive(settlement, management_answer(settlement, extra={48: gateway}))
    assert terminal.settled is not None and terminal.settled.batch == "000001"
    assert terminal.batch == "000002"


def test_declined_settlement_keeps_the_batch_open() -> None:
    """A 0510 with 22 changes nothing: same batch, same totals."""
    terminal = signed_on()
    redeem(terminal, 100)
    settlement = terminal.settlement()
    terminal.receive(settlement, answer_frame(settlement, "22"))
    assert terminal.batch == "000001"
    assert terminal.totals() == Totals(100, 1, 0, 0)


def test_reports_mask_the_card_and_never_show_pin_or_track() -> None:
    """describe() and repr() show the card masked and neither PIN block nor track."""
    terminal = signed_on()
    request = terminal.redemption(CARD, 1000, pin="123456")
    text = request.describe() + repr(request) + repr(CARD) + repr(terminal)
    assert CARD.number not in text
    assert "668800*********0014" in text
    assert "123456" not in text

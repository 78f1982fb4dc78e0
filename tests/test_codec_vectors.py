"""The codec against the known-answer frames of ../shared/vectors/crypto.json."""

from __future__ import annotations

import pytest

from cardcodec.crypto import mac, verify_mac
from cardcodec.message import (
    decode_frame,
    encode_frame,
    encode_message_with_mac,
    mac_input,
    received_mac,
)
from cardcodec.subfields import (
    Balance,
    EntryMode,
    MessageData,
    PointsInfo,
    SecurityControl,
    Track2,
)
from tests.vectors import SuiteCase, suite_cases

CASES = suite_cases()
FRAME_NAMES = [
    "sign_on_request_frame",
    "sign_on_response_frame",
    "redemption_frame",
    "redemption_encrypted_track_frame",
    "redemption_with_pin_frame",
    "redemption_response_frame",
]
MACED = [name for name in FRAME_NAMES if name.startswith("redemption")]


@pytest.mark.parametrize("name", FRAME_NAMES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_vector_frame_decodes_and_reencodes_byte_for_byte(case: SuiteCase, name: str) -> None:
    """Each known frame decodes and encodes back to exactly the same bytes."""
    frame = case.frame(name)
    assert encode_frame(decode_frame(frame)) == frame


@pytest.mark.parametrize("name", MACED)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_maced_vector_frame_verifies_under_its_mak(case: SuiteCase, name: str) -> None:
    """Field 64 of each known frame is the MAC of its bytes as sent under the case's MAK."""
    payload = case.frame(name)[2:]
    assert verify_mac(case.suite, case.mak, mac_input(payload), received_mac(payload))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mac_input_is_the_published_one(case: SuiteCase) -> None:
    """The MAC input is the message from the MTI to the end of field 63 with bit 64 set."""
    payload = case.frame("redemption_frame")[2:]
    assert mac_input(payload).hex().upper() == case.data["redemption_mac_input"]
    assert received_mac(payload).decode() == case.data["redemption_field64_ascii"]


@pytest.mark.parametrize("name", MACED)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_encoding_with_a_computed_mac_reproduces_the_frame(case: SuiteCase, name: str) -> None:
    """Encoding a decoded frame with its MAC computed afresh gives the published bytes."""
    frame = case.frame(name)
    message = decode_frame(frame)
    payload = encode_message_with_mac(message, lambda data: mac(case.suite, case.mak, data))
    assert payload == frame[2:]


def test_sign_on_request_reads_as_the_profile_says() -> None:
    """The 0800 vector: trace, terminal, merchant, 60 with batch and 60.3, operator 63."""
    message = decode_frame(CASES[0].frame("sign_on_request_frame"))
    assert message.mti == "0800"
    assert message.fields[11] == "000001"
    assert message.fields[41] == "10000001"
    assert message.fields[42] == "898310048990001"
    assert MessageData.parse(message.text(60)) == MessageData("00", "000001", "004")
    assert message.fields[63] == "01 "
    assert message.tpdu.destination == "0003"
    assert message.header.processing == "0"


def test_redemption_request_and_answer_read_as_the_profile_says() -> None:
    """The 0200/0210 vectors: entry mode, security control, track, balance and points."""
    request = decode_frame(CASES[0].frame("redemption_with_pin_frame"))
    assert EntryMode.parse(request.text(22)) == EntryMode(keyed=False, pin_entered=True)
    control = SecurityControl.parse(request.text(53))
    assert (control.pin, control.suite.value, control.track_encrypted) == (True, "3des", False)
    track = Track2.parse(request.text(35))
    assert (track.card_number, track.expiry_yymm, track.service_code) == (
        "6688001234567890124",
        "2812",
        "101",
    )
    assert MessageData.parse(request.text(60)).partial_supported is False
    answer = decode_frame(CASES[0].frame("redemption_response_frame"))
    assert answer.tpdu.destination == "0000"
    assert answer.tpdu.source == "0003"
    assert Balance.parse(answer.text(54)).amount_fen == 187200
    assert PointsInfo.parse(answer.text(63)) == PointsInfo(6400, 93600, 0, 12800)

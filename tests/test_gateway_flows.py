"""The gateway's answers to every message of pos-8583.md §4 against a real ledger (SQLite),
driven by a terminal written from the spec alone."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, insert
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from cardcodec.crypto import Suite, decrypt_pin
from gateway.errors import BadInput
from gateway.handler import Gateway, Reply, finish
from gateway.ledger import operations, records, unit_of_work
from gateway.ledger.models import (
    Authorisation,
    AuthorisationKind,
    AuthorisationState,
    Card,
    CardStatus,
    Terminal,
    TerminalSession,
)
from gateway.points import MAX_CARD_POINTS
from gateway.transactions import Transactions
from tests.conftest import moment, source_only
from tests.gateway_harness import (
    BLOCKED,
    DIAMOND,
    FEW_POINTS,
    GOLD_PIN,
    NOT_ENROLLED,
    Harness,
    demo_config,
)
from tests.spec_terminal import Answer, SpecTerminal, build, parse
from tests.spec_terminal import pin_block as spec_pin_block


@pytest.mark.parametrize("suite", [Suite.TDES, Suite.SM4])
def test_the_test_terminals_pin_blocks_hold_pins_of_every_length(suite: Suite) -> None:
    """§5.3's length is one nibble (`A`-`C` for 10-12 digits): the blocks the test terminal
    builds read back through the gateway's own decryption for every PIN length allowed."""
    pik = bytes(range(1, 17))
    for length in range(4, 13):
        pin = "123456789012"[:length]
        block = spec_pin_block(suite.value, pik, pin, GOLD_PIN)
        assert decrypt_pin(suite, pik, block, GOLD_PIN) == pin


@pytest.fixture
def harness(tmp_path: Path, ledger_url: str) -> Harness:
    """The gateway on a fresh ledger, once on SQLite and once on PostgreSQL."""
    return Harness(demo_config(tmp_path, ledger_url))


@pytest.mark.parametrize(("terminal_id", "with_tdk"), [("10000001", True), ("10000002", False)])
def test_sign_on_issues_working_keys_under_the_tmk(
    harness: Harness, terminal_id: str, with_tdk: bool
) -> None:
    """0810: fresh keys in 62 (KCVs checked by the terminal), the open batch, no MAC."""
    terminal = harness.terminal(terminal_id)
    answer = harness.send(terminal, terminal.sign_on(with_tdk))
    assert answer.code == "00"
    assert len(answer.fields[62]) == (60 if with_tdk else 40)
    assert answer.text(60) == f"00000001{'004' if with_tdk else '005'}"
    assert 64 not in answer.fields
    assert answer.header.hex() == "603100310000"
    terminal.adopt_sign_on(answer)
    assert (terminal.tdk is not None) == with_tdk


def test_sign_on_with_the_other_suite_is_a7(harness: Harness) -> None:
    """A 3DES terminal asking for SM4 keys gets A7 and no keys."""
    terminal = harness.terminal("10000001")
    terminal.suite = "sm4"
    answer = harness.send(terminal, terminal.sign_on())
    assert answer.code == "A7"
    assert 62 not in answer.fields


def test_unknown_terminal_is_97(harness: Harness) -> None:
    """A terminal id the gateway does not know gets 97."""
    terminal = harness.terminal()
    terminal.terminal_id = "99999999"
    assert harness.send(terminal, terminal.sign_on()).code == "97"


def test_merchant_of_another_terminal_is_03(harness: Harness) -> None:
    """Field 42 must be the terminal's own merchant."""
    terminal = harness.terminal()
    terminal.merchant_id = "898310058120002"
    assert harness.send(terminal, terminal.sign_on()).code == "03"


def test_gold_redemption_with_pin_takes_points_and_answers_with_mac(harness: Harness) -> None:
    """12800 fen, no rule for gold: 6400 points, 93600 left, 54 and 63 as §4.8 says."""
    terminal = harness.signed_on()
    _, answer = harness.redeem(terminal, GOLD_PIN, 12800, pin="123456")
    assert answer.code == "00"
    assert (answer.points, answer.balance, answer.discount_bp, answer.cash_fen) == (
        6400,
        93600,
        0,
        12800,
    )
    assert answer.text(54) == "9002156C000000187200"
    assert answer.text(4) == "000000012800"
    assert len(answer.text(37)) == 12
    assert len(answer.text(38)) == 6
    assert answer.text(15) == "1121"
    assert answer.text(32) == "48020000"
    assert 64 in answer.fields


def test_diamond_weekend_discount(harness: Harness) -> None:
    """Saturday 11:00, diamond, 12800 fen at 10%: D = 11520 fen, P = 5760 points."""
    terminal = harness.signed_on()
    _, answer = harness.redeem(terminal, DIAMOND, 12800)
    assert answer.code == "00"
    assert (answer.points, answer.discount_bp, answer.cash_fen) == (5760, 1000, 11520)
    assert answer.balance == 50000 - 5760


def test_encrypted_track_on_sm4_with_tdk(harness: Harness) -> None:
    """A track encrypted with the TDK decrypts to the card (SM4 terminal)."""
    terminal = harness.signed_on("10000002", with_tdk=True)
    _, answer = harness.redeem(terminal, DIAMOND, 1000, encrypted=True)
    assert answer.code == "00"
    assert answer.points == 500  # under the rule's 10000 fen minimum: no discount


def test_encrypted_track_without_tdk_is_a_format_error(harness: Harness) -> None:
    """53 digit 3 = 1 from a terminal whose sign-on issued no TDK: 30."""
    terminal = harness.signed_on("10000001", with_tdk=False)
    terminal.tdk = bytes(16)
    _, answer = harness.redeem(terminal, DIAMOND, 1000, encrypted=True)
    assert answer.code == "30"
    assert 64 not in answer.fields


def test_partial_approval_spends_everything(harness: Harness) -> None:
    """150 points, 1000 fen asked with 60.6 = 1: 10 with A' = 300 fen, P = 150."""
    terminal = harness.signed_on()
    _, answer = harness.redeem(terminal, FEW_POINTS, 1000, partial=True)
    assert answer.code == "10"
    assert answer.text(4) == "000000000300"
    assert (answer.points, answer.balance, answer.cash_fen) == (150, 0, 300)


def test_not_enough_points_without_partial_is_51(harness: Harness) -> None:
    """Without 60.6 the same request is declined 51 with the reduced field set."""
    terminal = harness.signed_on()
    _, answer = harness.redeem(terminal, FEW_POINTS, 1000)
    assert answer.code == "51"
    assert set(answer.fields) <= {3, 4, 11, 12, 13, 15, 32, 37, 39, 41, 42, 49, 60}
    assert 37 in answer.fields


@pytest.mark.parametrize(
    ("card", "code"),
    [(NOT_ENROLLED, "57"), (BLOCKED, "62"), ("6688000000000000055", "14")],
)
def test_card_declines(harness: Harness, card: str, code: str) -> None:
    """Not enrolled 57, blocked 62, unknown card 14."""
    terminal = harness.signed_on()
    _, answer = harness.redeem(terminal, card, 1000)
    assert answer.code == code


@pytest.mark.parametrize(
    ("status", "expiry", "presented", "code"),
    [
        ("lost", "2601", "2512", "14"),  # an expiry that disagrees with the record first
        ("closed", "2601", "2601", "14"),
        ("lost", "2601", "2601", "41"),
        ("stolen", "2601", "2601", "43"),
        ("blocked", "2601", "2601", "62"),
        ("active", "2601", "2601", "54"),
        ("active", "2906", "2906", "57"),
    ],
)
def test_when_several_card_declines_apply_the_first_in_section_6_order_answers(
    harness: Harness, status: str, expiry: str, presented: str, code: str
) -> None:
    """§6's order `14`, `41`, `43`, `62`, `54`, `57`: a card that is also expired (January
    2026, the clock in November) and not enrolled gets the first that applies."""
    with unit_of_work(harness.engine) as session:
        card = session.get(Card, DIAMOND)
        assert card is not None
        card.status, card.expiry_yymm, card.enrolled = CardStatus(status), expiry, False
    terminal = harness.signed_on()
    fields = terminal.card_fields(DIAMOND, presented)
    answer = harness.send(terminal, terminal.financial("0200", "000000", "22", fields,
                                                       amount_fen=1000))  # fmt: skip
    assert answer.code == code


def test_an_empty_sm4_pin_block_is_a_format_error_and_no_try(harness: Harness) -> None:
    """Field 62 present with a zero length (SM4 PIN block) is `30`, three times over, and
    the card's PIN tries are untouched: the right PIN is approved after them."""
    terminal = harness.signed_on("10000002")
    for _ in range(3):
        fields = terminal.card_fields(GOLD_PIN, "2812", pin="123456")
        fields[62] = b""
        request = terminal.financial("0200", "000000", "22", fields, amount_fen=1000)
        answer = harness.send(terminal, request)
        assert answer.code == "30"
        assert 64 not in answer.fields
    assert harness.redeem(terminal, GOLD_PIN, 1000, pin="123456")[1].code == "00"


def test_a_card_holding_the_most_points_a_card_may_hold_is_answered(harness: Harness) -> None:
    """9,999,999,999 points (the accrual cap) fit the answer: 63's balance n10, 54's n12."""
    terminal = harness.signed_on()
    now = harness.clock.now()
    with unit_of_work(harness.engine) as session:
        held = operations.balances(session, DIAMOND, now).ledger_points
        earned = MAX_CARD_POINTS - held
        operations.accrue(session, DIAMOND, now.date(), earned, "test:most", when=moment(now),
                          expiry_years=2)  # fmt: skip
    fields = terminal.card_fields(DIAMOND, "2906")
    answer = harness.send(terminal, terminal.financial("0200", "310000", "01", fields))
    assert (answer.code, answer.balance) == ("00", MAX_CARD_POINTS)
    assert answer.text(54).endswith(f"{2 * MAX_CARD_POINTS:012d}")


def test_an_accrual_counts_the_points_a_sale_could_still_give_back(harness: Harness) -> None:
    """A card at the cap spends 500 points; an accrual of 500 would fill it again, and the
    sale's void would then take it past what field 63 can carry. So the accrual is refused
    and changes nothing, and the void is answered with the cap as its balance."""
    terminal = harness.signed_on()
    now = harness.clock.now()
    with unit_of_work(harness.engine) as session:
        held = operations.balances(session, DIAMOND, now).ledger_points
        operations.accrue(session, DIAMOND, now.date(), MAX_CARD_POINTS - held, "test:most",
                          when=moment(now), expiry_years=2)  # fmt: skip
    _, sale = harness.redeem(terminal, DIAMOND, 1000)
    trace = f"{terminal.trace:06d}"
    assert (sale.code, sale.balance) == ("00", MAX_CARD_POINTS - 500)
    with unit_of_work(harness.engine) as session, pytest.raises(BadInput) as refused:
        operations.accrue(session, DIAMOND, now.date(), 500, "test:back", when=moment(now),
                          expiry_years=2)  # fmt: skip
    assert str(refused.value) == (
        f"accrual test:back: the card would hold {MAX_CARD_POINTS} points and 500 more its"
        f" approved redemptions may give back, more than the {MAX_CARD_POINTS} an answer can"
        " carry"
    )
    with unit_of_work(harness.engine) as session:
        assert operations.balances(session, DIAMOND, now).ledger_points == MAX_CARD_POINTS - 500
    voided = harness.void(terminal, DIAMOND, sale, trace, 1000)
    assert (voided.code, voided.balance) == ("00", MAX_CARD_POINTS)


def test_a_pin_key_that_does_not_open_is_96_for_that_request_alone(harness: Harness) -> None:
    """The PIN key file damaged under a running gateway (a restarted process reads it anew):
    a PIN request is `96` with no try counted, and a request beside it in the same group,
    from another terminal and needing no PIN, is approved."""
    terminal, other = harness.signed_on(), harness.signed_on("20000001")
    pin_file = harness.keystore.pin_path
    pin_file.write_bytes(b"\x02" + bytes(40))  # a blob of this store that opens under no key
    gateway = harness.new_gateway()
    with_pin = terminal.financial("0200", "000000", "22",
                                  terminal.card_fields(GOLD_PIN, "2812", pin="123456"),
                                  amount_fen=1000)  # fmt: skip
    beside = other.financial("0200", "000000", "22", other.card_fields(DIAMOND, "2906"),
                             amount_fen=1000)  # fmt: skip
    with capture_logs() as logged:
        replies = gateway.handle_group([with_pin, beside])
    assert all(reply.payload for reply in replies)
    assert terminal.check(with_pin, replies[0].payload or b"").code == "96"
    assert other.check(beside, replies[1].payload or b"").code == "00"
    assert "pin_check_failed" in [line["event"] for line in logged]
    with unit_of_work(harness.engine) as session:
        card = session.get(Card, GOLD_PIN)
        assert card is not None and card.wrong_pin_count == 0


def test_pin_rules(harness: Harness) -> None:
    """No PIN 55 (not counted); three wrong PINs lock; then a right PIN gets 75. The log
    tells the two 55s apart and marks the try that locks the PIN, card masked."""
    terminal = harness.signed_on()
    whys = []

    def redeem(pin: str | None) -> str:
        fields = terminal.card_fields(GOLD_PIN, "2812", pin=pin)
        request = terminal.financial("0200", "000000", "22", fields, amount_fen=1000)
        reply = harness.gateway.handle(request)
        whys.append(reply.event.get("why"))
        assert reply.payload is not None
        return terminal.check(request, reply.payload).code

    assert redeem(None) == "55"
    with capture_logs() as logs:
        assert [redeem("999999") for _ in range(3)] == ["55", "55", "55"]
    assert [
        (line["card"], line["wrong_tries"]) for line in logs if line["event"] == "pin_locked"
    ] == [("668800*********0014", 3)]
    assert redeem("123456") == "75"
    assert redeem(None) == "55"
    assert whys == [
        "PIN required, none entered",
        "wrong PIN",
        "wrong PIN",
        "wrong PIN",
        "PIN locked",
        "PIN required, none entered",
    ]


@pytest.mark.parametrize(("processing", "message_type"), [("310000", "01"), ("000000", "22")])
def test_another_batch_is_22_before_the_pin_and_counts_no_try(
    harness: Harness, processing: str, message_type: str
) -> None:
    """A balance inquiry or a redemption whose 60.2 is not the open batch: 22 (§4.7), which
    comes before 55 in §6, so three wrong PINs with it lock nothing."""
    terminal = harness.signed_on()
    amount = None if processing == "310000" else 1000
    open_batch, terminal.batch = terminal.batch, "000007"
    for pin in ("999999", "999999", "999999", "123456"):
        fields = terminal.card_fields(GOLD_PIN, "2812", pin=pin)
        request = terminal.financial("0200", processing, message_type, fields, amount_fen=amount)
        assert harness.send(terminal, request).code == "22"
    terminal.batch = open_batch
    fields = terminal.card_fields(GOLD_PIN, "2812", pin="123456")
    request = terminal.financial("0200", processing, message_type, fields, amount_fen=amount)
    assert harness.send(terminal, request).code == "00"


def test_right_pin_resets_the_run_of_wrong_ones(harness: Harness) -> None:
    """Two wrong, one right, two wrong: still not locked."""
    terminal = harness.signed_on()
    for pin in ("000000", "000000", "123456", "000000", "000000"):
        harness.redeem(terminal, GOLD_PIN, 100, pin=pin)
    assert harness.redeem(terminal, GOLD_PIN, 100, pin="123456")[1].code == "00"


def test_keyed_entry_needs_a_pin_card_and_its_pin(harness: Harness) -> None:
    """Keyed without PIN 12; keyed for a card with no PIN 12; keyed, with a PIN, for a number
    the ledger has no card for (its check digit right or wrong) 12, before 14 (§6); keyed
    with the PIN approved."""
    terminal = harness.signed_on()
    assert harness.redeem(terminal, GOLD_PIN, 100, keyed=True)[1].code == "12"
    assert harness.redeem(terminal, DIAMOND, 100, keyed=True, pin="123456")[1].code == "12"
    for unknown in ("6688000000000000097", "6688000000000000098"):  # Luhn right, wrong
        assert harness.redeem(terminal, unknown, 100, keyed=True, pin="123456")[1].code == "12"
        assert harness.redeem(terminal, unknown, 100)[1].code == "14"  # swiped
    _, answer = harness.redeem(terminal, GOLD_PIN, 100, keyed=True, pin="123456")
    assert answer.code == "00"
    assert answer.fields[2] == GOLD_PIN


def test_wrong_mac_is_a0_with_sign_on_again_and_changes_nothing(harness: Harness) -> None:
    """A corrupted MAC: A0, header digit 3, no MAC, and the points stay."""
    terminal = harness.signed_on()
    request = terminal.financial(
        "0200", "000000", "22", terminal.card_fields(DIAMOND, "2906"), amount_fen=1000
    )
    tampered = request[:-1] + bytes([request[-1] ^ 1])
    answer = harness.send(terminal, tampered)
    assert answer.code == "A0"
    assert answer.header.hex() == "603103310000"  # processing digit: low nibble of byte 3
    assert 64 not in answer.fields
    _, approved = harness.redeem(terminal, DIAMOND, 1000)
    assert approved.balance == 50000 - 500


def _xor_fold(data: bytes, size: int) -> bytes:
    """§5.1's R: the MAC input padded with zero bytes and its blocks XORed together."""
    data += bytes(-len(data) % size)
    folded = bytearray(size)
    for start in range(0, len(data), size):
        for index in range(size):
            folded[index] ^= data[start + index]
    return bytes(folded)


def _forged_with_a_pin_block(captured: bytes, size: int, amount_fen: int, trace: int) -> bytes:
    """What an attacker on the wire, holding no key, makes of a captured redemption without a
    PIN: a new trace and amount, "PIN entered", and a PIN block chosen so that the MAC
    input's XOR fold is the captured one's, so that the captured field 64 still verifies."""
    mti, fields, _, _ = parse(captured)
    pin_field = 52 if size == 8 else 62
    forged = {number: value for number, value in fields.items() if number != 64}
    forged[4], forged[11] = f"{amount_fen:012d}", f"{trace:06d}"
    forged[22], forged[26] = str(forged[22])[:2] + "1", "06"
    forged[53] = "2" + str(forged[53])[1:]
    marker = bytes(range(0xE0, 0xE0 + size))
    forged[pin_field], forged[64] = marker, bytes(8)
    mac_input = build(mti, forged)[11:-8]
    at = mac_input.index(marker)
    difference = bytes(
        a ^ b
        for a, b in zip(_xor_fold(mac_input, size), _xor_fold(captured[11:-8], size), strict=True)
    )
    block = bytearray(marker)
    for index in range(size):
        block[(index - at) % size] ^= difference[index]
    forged[pin_field], forged[64] = bytes(block), fields[64]
    payload = build(mti, forged)
    assert _xor_fold(payload[11:-8], size) == _xor_fold(captured[11:-8], size)
    return payload


@pytest.mark.parametrize(("terminal_id", "size"), [("10000001", 8), ("10000002", 16)])
def test_a_pin_block_that_is_not_one_on_a_card_without_a_pin_is_a0_and_not_recorded(
    harness: Harness, terminal_id: str, size: int
) -> None:
    """§5.1's MAC XORs the message's blocks before it encrypts them, and a PIN block sent for
    a card without a PIN is not checked against a PIN (§8): left unchecked, its 8 (3DES) or 16
    (SM4) bytes would be free to make up for any change, so that a captured redemption, its
    track encrypted, could be sent again with a new trace and forty times the amount under
    its own MAC, and approved. Such a block must at least be a valid one under the
    terminal's PIK (a terminal makes one whatever the card): one that is not is `A0` with the
    sign-on digit, no MAC, recorded nowhere (§7: as a failed MAC), points untouched, and the
    terminal's session ends (a block that happens to be valid, one try in about 10^7 under
    3DES, then needs a sign-on and a new capture for every try). A valid block on that card
    is still ignored (never `99`)."""
    terminal = harness.signed_on(terminal_id, with_tdk=True)
    fields = terminal.card_fields(DIAMOND, "2906", encrypt_track_data=True)
    captured = terminal.financial("0200", "000000", "22", fields, amount_fen=100)
    assert harness.send(terminal, captured).code == "00"
    with unit_of_work(harness.engine) as session:
        balance = operations.balances(session, DIAMOND, harness.clock.now()).ledger_points
        rows = session.query(Authorisation).count()
    forged = _forged_with_a_pin_block(captured, size, 4000, terminal.trace + 1)
    with capture_logs() as logs:
        reply = harness.gateway.handle(forged)
    assert reply.payload is not None
    _, answer, _, header = parse(reply.payload)
    assert answer[39] == "A0"
    assert header.hex() == "603103310000"
    assert 64 not in answer
    assert reply.event["why"] == "PIN block not sound, on a card without a PIN"
    assert [line["card"] for line in logs if line["event"] == "pin_block_unsound"] == [
        "668800*********0124"
    ]
    with unit_of_work(harness.engine) as session:
        now = harness.clock.now()
        assert operations.balances(session, DIAMOND, now).ledger_points == balance
        assert session.query(Authorisation).count() == rows
    # The session ended: the terminal's next request is `A0`, and it signs on again.
    fields = terminal.card_fields(DIAMOND, "2906", encrypt_track_data=True)
    stale = harness.send(terminal, terminal.financial("0200", "310000", "01", fields))
    assert (stale.code, stale.header.hex()) == ("A0", "603103310000")
    answer = harness.send(terminal, terminal.sign_on(True))
    terminal.adopt_sign_on(answer)
    # Not recorded: the terminal's own request with that trace is answered, not `94`.
    terminal.trace = int(parse(forged)[1][11]) - 1
    fields = terminal.card_fields(DIAMOND, "2906", pin="1234", encrypt_track_data=True)
    honest = terminal.financial("0200", "000000", "22", fields, amount_fen=100)
    answer = harness.send(terminal, honest)
    assert (answer.code, answer.balance) == ("00", balance - 50)


@pytest.mark.parametrize("behind_in_a_run", [1, 3])
def test_requests_behind_an_a0_that_ends_the_session_in_their_group_are_a0(
    harness: Harness, behind_in_a_run: int
) -> None:
    """The session a PIN block that is not one ends is ended for the rest of its group too:
    the terminal's requests behind it, checked with the keys it ended, are `A0` with the
    sign-on digit and take no points, and an echo behind it says the terminal is not signed
    on, as each would one group later. Decided under those keys, one write of many forged
    frames would have had as many tries at a valid block for one sign-on, and honest
    requests behind it approved under keys the terminal was told were gone. Another
    terminal's requests in the group are unaffected."""
    terminal, other = harness.signed_on(with_tdk=True), harness.signed_on("20000001")
    fields = terminal.card_fields(DIAMOND, "2906", encrypt_track_data=True)
    captured = terminal.financial("0200", "000000", "22", fields, amount_fen=100)
    assert harness.send(terminal, captured).code == "00"
    forged = _forged_with_a_pin_block(captured, 8, 4000, terminal.trace + 1)
    terminal.trace += 1
    behind = [
        terminal.financial(
            "0200", "000000", "22", terminal.card_fields(DIAMOND, "2906"), amount_fen=1000
        )
        for _ in range(behind_in_a_run)
    ]
    echo = build("0820", {11: terminal.next_trace(), **terminal.ids(), 60: "00000001301"})
    elsewhere = other.financial(
        "0200", "000000", "22", other.card_fields(DIAMOND, "2906"), amount_fen=1000
    )
    replies = harness.gateway.handle_group([forged, *behind, echo, elsewhere])
    assert all(reply.payload is not None for reply in replies)
    payloads = [reply.payload for reply in replies if reply.payload is not None]
    _, answer, _, header = parse(payloads[0])
    assert (answer[39], header.hex()) == ("A0", "603103310000")
    for request, payload in zip(behind, payloads[1:-2], strict=True):
        stale = terminal.check(request, payload)
        assert (stale.code, stale.header.hex()) == ("A0", "603103310000")
        assert 64 not in stale.fields
    echoed = terminal.check(echo, payloads[-2])  # answered, saying "sign on again"
    assert (echoed.code, echoed.header.hex()) == ("00", "603103310000")
    approved = other.check(elsewhere, payloads[-1])
    assert approved.code == "00"
    assert harness.redeem(other, DIAMOND, 2)[1].balance == approved.balance - 1  # none taken


@pytest.mark.parametrize(("card", "expiry", "amount", "code"), [
    (DIAMOND, "2906", 0, "13"),  # no PIN: the amount's decline ranks before the block's
    (GOLD_PIN, "2812", 100, "99"),  # a PIN: the block's own decline
])  # fmt: skip
def test_a_decline_of_a_request_whose_pin_block_is_not_one_is_recorded_nowhere(
    harness: Harness, card: str, expiry: str, amount: int, code: str
) -> None:
    """A request altered on the way, its MAC made good by the PIN block's bytes, gets the
    decline §6 ranks first, but is not recorded: recorded, each such request would take a
    trace the terminal has yet to use, and the terminal's own request with it would get
    `94`. Its session stays."""
    terminal = harness.signed_on("10000001", with_tdk=True)
    fields = terminal.card_fields(card, expiry, pin="123456", encrypt_track_data=True)
    captured = terminal.financial("0200", "000000", "22", fields, amount_fen=100)
    assert harness.send(terminal, captured).code == "00"
    with unit_of_work(harness.engine) as session:
        rows = session.query(Authorisation).count()
    forged = _forged_with_a_pin_block(captured, 8, amount, terminal.trace + 1)
    reply = harness.gateway.handle(forged)
    assert reply.payload is not None and parse(reply.payload)[1][39] == code
    with unit_of_work(harness.engine) as session:
        assert session.query(Authorisation).count() == rows
    fields = terminal.card_fields(card, expiry, pin="123456", encrypt_track_data=True)
    honest = terminal.financial("0200", "000000", "22", fields, amount_fen=100)
    assert parse(honest)[1][11] == parse(forged)[1][11]
    assert harness.send(terminal, honest).code == "00"


def test_the_log_tells_the_a0s_and_30s_apart(harness: Harness) -> None:
    """A redemption without its MAC (`30`: which field), with a MAC that does not verify and
    from a terminal not signed on (both `A0`) each say why in the log (`why`), never a
    value."""
    terminal = harness.signed_on()
    signed = terminal.financial(
        "0200", "000000", "22", terminal.card_fields(DIAMOND, "2906"), amount_fen=1000
    )
    mti, fields_sent, _, _ = parse(signed)
    unmaced = build(mti, {number: value for number, value in fields_sent.items() if number != 64})
    whys = [
        harness.gateway.handle(payload).event.get("why") for payload in (unmaced, _tampered(signed))
    ]
    with unit_of_work(harness.engine) as session:  # signed off (or its keys expired)
        session.execute(delete(TerminalSession))
    whys.append(harness.gateway.handle(signed).event.get("why"))
    assert whys == ["field 64 missing", "MAC does not verify", "not signed on"]


def _tampered(payload: bytes) -> bytes:
    return payload[:-1] + bytes([payload[-1] ^ 1])


def test_an_encrypted_track_under_keys_the_terminal_never_took_is_a0_not_30(
    harness: Harness,
) -> None:
    """A terminal that missed a sign-on's answer encrypts its track and MACs under the old
    keys: the track decrypted under the new TDK is garbage, which says nothing of its format.
    `A0` with header digit 3 sends it to sign on again (a `30` would leave it failing every
    request); nothing changes."""
    terminal = harness.signed_on(with_tdk=True)
    stale = copy.deepcopy(terminal)
    harness.signed_on(with_tdk=True)  # keys the stale terminal never adopted
    stale.trace = 500
    _, answer = harness.redeem(stale, DIAMOND, 1000, encrypted=True)
    assert (answer.code, answer.header.hex()) == ("A0", "603103310000")
    assert 64 not in answer.fields
    again = harness.signed_on(with_tdk=True)
    _, approved = harness.redeem(again, DIAMOND, 1000, encrypted=True)
    assert (approved.code, approved.balance) == ("00", 50000 - 500)


@pytest.mark.parametrize("kind", ["void", "refund", "reversal", "settlement", "upload", "sign_off"])
def test_a_wrong_mac_on_any_request_that_carries_one_is_a0_and_changes_nothing(
    harness: Harness, kind: str
) -> None:
    """§5.1: every request but 0800 and echo carries a MAC, checked before anything is done
    (§6): a void, refund, reversal, settlement, upload or sign-off whose MAC is wrong gets
    `A0` with header digit 3, no MAC, and changes nothing; sent again with a right MAC it is
    done."""
    terminal = harness.signed_on()
    sale_request, sale = harness.redeem(terminal, DIAMOND, 12800)
    sale_trace = f"{terminal.trace:06d}"
    card = terminal.card_fields(DIAMOND, "2906")
    extra: dict[int, str | bytes]
    if kind == "void":
        extra = {37: sale.text(37), 61: terminal.batch + sale_trace}
        request = terminal.financial("0200", "200000", "23", card, amount_fen=12800, extra=extra)
    elif kind == "refund":
        extra = {37: sale.text(37), 61: terminal.batch + sale_trace + sale.text(13)}
        request = terminal.financial("0220", "200000", "25", card, amount_fen=12800, extra=extra)
    elif kind == "reversal":
        request = _reversal(harness, terminal, sale_request)
    elif kind == "settlement":
        totals = f"{12800:012d}{1:03d}{0:012d}{0:03d}0" + "0" * 31
        fields = {11: terminal.next_trace(), **terminal.ids(), 48: totals, 49: "156"}
        request = terminal.signed("0500", {**fields, 60: f"00{terminal.batch}201", 63: "01 "})
    elif kind == "upload":
        assert _settle(harness, terminal, "0" * 62).text(48)[30] == "2"  # unbalanced
        record = "00" + sale_trace + DIAMOND.zfill(20) + f"{12800:012d}"
        fields = {11: terminal.next_trace(), **terminal.ids(), 48: "01" + record}
        request = terminal.signed("0320", {**fields, 60: f"00{terminal.batch}201"})
    else:
        fields = {11: terminal.next_trace(), **terminal.ids(), 60: "00000001002"}
        request = terminal.signed("0820", fields)
    with unit_of_work(harness.engine) as session:
        before = operations.balances(session, DIAMOND, harness.clock.now()).ledger_points
        rows = session.query(Authorisation).count()
    answer = harness.send(terminal, _tampered(request))
    assert answer.code == "A0"
    assert answer.header.hex() == "603103310000"
    assert 64 not in answer.fields
    with unit_of_work(harness.engine) as session:
        assert operations.balances(session, DIAMOND, harness.clock.now()).ledger_points == before
        assert session.query(Authorisation).count() == rows
    done = harness.send(terminal, request)  # not recorded: the right MAC is answered afresh
    assert done.code == "00"
    if kind == "sign_off":
        assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "A0"
    elif kind in ("settlement", "upload"):
        assert harness.signed_on().batch == "000002"
    else:
        assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"


def test_not_signed_on_is_a0(harness: Harness) -> None:
    """A terminal that never signed on gets A0 for anything that needs keys."""
    terminal = harness.terminal()
    terminal.mak = bytes(16)
    request = terminal.financial(
        "0200", "000000", "22", terminal.card_fields(DIAMOND, "2906"), amount_fen=1000
    )
    assert harness.send(terminal, request).code == "A0"


def test_keys_expire_after_their_lifetime(harness: Harness) -> None:
    """After 24 h the terminal is no longer signed on: A0."""
    terminal = harness.signed_on()
    harness.clock.advance(timedelta(hours=24, seconds=1))
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "A0"


def test_echo_needs_no_sign_on_but_says_sign_on_again(harness: Harness) -> None:
    """0820/301: 00 without keys, with header digit 3 when not signed on."""
    terminal = harness.terminal()
    request = build("0820", {11: terminal.next_trace(), **terminal.ids(), 60: "00000001301"})
    answer = harness.send(terminal, request)
    assert answer.code == "00"
    assert answer.header.hex() == "603103310000"  # processing digit: low nibble of byte 3


@pytest.mark.parametrize("signed_on", [True, False])
@pytest.mark.parametrize("sixty", ["00000001007", "01000001003"])
def test_an_0800_that_is_no_sign_on_is_12_without_a_mac(
    harness: Harness, signed_on: bool, sixty: str
) -> None:
    """An 0800 carries no MAC (§5.1); one whose 60 names no sign-on (60.3 `007`, or 60.1
    `01`) needs no keys, so it is `12`, signed on or not, and the keys stay as they were."""
    terminal = harness.signed_on() if signed_on else harness.terminal()
    request = build("0800", {11: terminal.next_trace(), **terminal.ids(), 60: sixty, 63: "01 "})
    answer = harness.send(terminal, request)
    assert (answer.mti, answer.code) == ("0810", "12")
    assert answer.header.hex() == ("603100310000" if signed_on else "603103310000")
    assert 64 not in answer.fields and 62 not in answer.fields
    if signed_on:
        assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"


def test_sign_off_destroys_the_keys(harness: Harness) -> None:
    """0820/002 with a MAC: 00 with a MAC, then the terminal is no longer signed on."""
    terminal = harness.signed_on()
    request = terminal.signed(
        "0820", {11: terminal.next_trace(), **terminal.ids(), 60: "00000001002"}
    )
    answer = harness.send(terminal, request)
    assert answer.code == "00"
    assert 64 in answer.fields
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "A0"


def test_a_request_behind_a_sign_off_in_its_group_is_a0(harness: Harness) -> None:
    """A sign-off and a redemption of the same terminal in one group: the sign-off ends the
    keys, so the redemption behind it is A0 and takes no points, as it would one group later."""
    terminal, other = harness.signed_on(), harness.signed_on("20000001")
    sign_off = terminal.signed(
        "0820", {11: terminal.next_trace(), **terminal.ids(), 60: "00000001002"}
    )
    card = terminal.card_fields(DIAMOND, "2906")
    redemption = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
    elsewhere = other.financial(
        "0200", "000000", "22", other.card_fields(DIAMOND, "2906"), amount_fen=1000
    )
    off, beside, behind = harness.gateway.handle_group([sign_off, elsewhere, redemption])
    assert off.payload and beside.payload and behind.payload
    assert terminal.check(sign_off, off.payload).code == "00"
    approved = other.check(elsewhere, beside.payload)  # another terminal: unaffected
    assert approved.code == "00"
    assert terminal.check(redemption, behind.payload).code == "A0"
    assert harness.redeem(other, DIAMOND, 2)[1].balance == approved.balance - 1  # none taken


def test_a_request_behind_a_sign_on_in_its_group_needs_the_new_keys(harness: Harness) -> None:
    """A sign-on and a redemption MAC'd with the keys it replaces, in one group: the old keys
    ended with the sign-on, so the redemption is A0; with the new keys, the next one is
    approved."""
    terminal = harness.signed_on()
    sign_on = terminal.sign_on()
    card = terminal.card_fields(DIAMOND, "2906")
    redemption = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
    on, behind = harness.gateway.handle_group([sign_on, redemption])
    assert on.payload is not None and behind.payload is not None
    terminal.adopt_sign_on(terminal.check(sign_on, on.payload))
    assert terminal.check(redemption, behind.payload).code == "A0"
    assert harness.redeem(terminal, DIAMOND, 1000)[1].balance == 50000 - 500


def _ending(terminal: SpecTerminal, how: str) -> bytes:
    """A request that ends the terminal's keys: a sign-off, or a sign-on (new keys)."""
    if how == "sign-off":
        return terminal.signed(
            "0820", {11: terminal.next_trace(), **terminal.ids(), 60: "00000001002"}
        )
    return terminal.sign_on()


def _end_elsewhere(harness: Harness, terminal: SpecTerminal, request: bytes) -> None:
    """The request answered by another process on the same ledger; the terminal takes the
    new keys of a sign-on."""
    answered = harness.new_gateway().handle(request).payload
    assert answered is not None
    checked = terminal.check(request, answered)
    assert checked.code == "00"
    if 62 in checked.fields:
        terminal.adopt_sign_on(checked)


@pytest.mark.parametrize("how", ["sign-off", "sign-on"])
def test_keys_another_process_ended_after_the_group_read_them_are_a0(
    harness: Harness, how: str
) -> None:
    """A group reads the sessions before its transaction. A sign-off or sign-on of one of its
    terminals that another process commits meanwhile ends the keys its request was checked
    with: read again inside the transaction, that request is left out and prepared again,
    so A0, and it takes no points; the group's other requests go on."""
    terminal, other = harness.signed_on(), harness.signed_on("20000001")
    ending = _ending(terminal, how)
    card = terminal.card_fields(DIAMOND, "2906")
    redemption = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
    beside = other.financial(
        "0200", "000000", "22", other.card_fields(DIAMOND, "2906"), amount_fen=1000
    )
    group = harness.gateway.prepare_group([redemption, beside])
    _end_elsewhere(harness, terminal, ending)
    late, approved = (finish(a).payload for a in harness.gateway.decide_prepared(group))
    assert late is not None and approved is not None
    refused = terminal.check(redemption, late)
    assert refused.code == "A0"
    assert refused.header.hex() == "603103310000"  # sign on again: processing digit 3
    beside_answer = other.check(beside, approved)
    assert beside_answer.code == "00"
    assert harness.redeem(other, DIAMOND, 2)[1].balance == beside_answer.balance - 1
    if how == "sign-on":  # the new keys work
        assert harness.redeem(terminal, DIAMOND, 2)[1].code == "00"


@source_only
def test_a_request_run_alone_after_its_group_failed_checks_its_keys_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group whose transaction fails runs its requests one by one; a request that fails
    again runs alone once more, and there too its keys are read again: a sign-off another
    process committed before that makes it A0."""
    terminal = harness.signed_on()
    ending = _ending(terminal, "sign-off")
    card = terminal.card_fields(DIAMOND, "2906")
    requests = [
        terminal.financial("0200", "000000", "22", card, amount_fen=amount) for amount in (100, 200)
    ]
    verdict = Transactions._redemption_verdict
    alone = Gateway._alone

    def failing(self: Transactions, context, *args):  # type: ignore[no-untyped-def]
        if context.amount_fen == 200:
            raise OperationalError("insert", {}, Exception("disk I/O error"))
        return verdict(self, context, *args)

    def signed_off_first(self: Gateway, request, context, **flags):  # type: ignore[no-untyped-def]
        _end_elsewhere(harness, terminal, ending)
        return alone(self, request, context, **flags)

    monkeypatch.setattr(Transactions, "_redemption_verdict", failing)
    monkeypatch.setattr(Gateway, "_alone", signed_off_first)
    with capture_logs() as logs:
        answers = answered(terminal, requests, harness.gateway.handle_group(requests))
    assert [answer.code for answer in answers] == ["00", "A0"]
    reran = [line for line in logs if line["event"] == "group_ran_alone"]
    assert reran == [
        {
            "event": "group_ran_alone",
            "log_level": "warning",
            "requests": 2,
            "error": "Exception",
            "sqlstate": None,
        }
    ]
    assert answers[1].header.hex() == "603103310000"  # sign on again: processing digit 3


def test_void_puts_every_point_back_and_only_once(harness: Harness) -> None:
    """Void of a redemption: 00, points back; a second void 22; another amount 64."""
    terminal = harness.signed_on()
    _, original = harness.redeem(terminal, DIAMOND, 12800)
    trace = original.text(11)
    assert harness.void(terminal, DIAMOND, original, trace, 12000).code == "64"
    voided = harness.void(terminal, DIAMOND, original, trace, 12800)
    assert voided.code == "00"
    assert (voided.points, voided.balance, voided.cash_fen) == (5760, 50000, 11520)
    assert voided.text(37) != original.text(37)
    assert harness.void(terminal, DIAMOND, original, trace, 12800).code == "22"


def test_void_of_another_terminals_original_is_22(harness: Harness) -> None:
    """An original of another terminal, even of another merchant, cannot be voided: 22."""
    coffee = harness.signed_on("20000001")
    _, original = harness.redeem(coffee, DIAMOND, 1000)
    store = harness.signed_on("10000001")
    assert harness.void(store, DIAMOND, original, original.text(11), 1000).code == "22"


def test_refund_of_another_merchants_original_is_25(harness: Harness) -> None:
    """A refund must name an original of the same merchant: 25 otherwise."""
    coffee = harness.signed_on("20000001")
    _, original = harness.redeem(coffee, DIAMOND, 1000)
    store = harness.signed_on("10000001")
    batch_trace = "000001" + original.text(11)
    assert harness.refund(store, DIAMOND, original, batch_trace, 500).code == "25"


def test_void_of_an_unknown_original_is_25(harness: Harness) -> None:
    """An RRN the gateway never gave: 25."""
    terminal = harness.signed_on()
    _, original = harness.redeem(terminal, DIAMOND, 1000)
    original.fields[37] = "999999999999"
    assert harness.void(terminal, DIAMOND, original, original.text(11), 1000).code == "25"


def test_partial_refunds_add_up_to_the_original_and_no_further(harness: Harness) -> None:
    """Refunds of 5000 and 7800 of a 12800 redemption return exactly P; more is 13."""
    terminal = harness.signed_on()
    _, original = harness.redeem(terminal, DIAMOND, 12800)
    batch_trace = terminal.batch + original.text(11)
    first = harness.refund(terminal, DIAMOND, original, batch_trace, 5000)
    assert first.code == "00"
    assert (first.points, first.cash_fen) == (2250, 4500)  # floor(5760*5000/12800), floor(D..)
    second = harness.refund(terminal, DIAMOND, original, batch_trace, 7800)
    assert second.code == "00"
    assert first.points + second.points == 5760
    assert first.cash_fen + second.cash_fen == 11520
    assert second.balance == 50000
    assert harness.refund(terminal, DIAMOND, original, batch_trace, 1).code == "13"


def test_a_refund_whose_original_was_voided_meanwhile_is_22(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger checks the original again under its lock: a void (or reversal) that came
    first makes the refund 22, as for an original voided before (§6), not 13."""
    terminal = harness.signed_on()
    _, original = harness.redeem(terminal, DIAMOND, 12800)
    batch_trace = terminal.batch + original.text(11)

    def voided_meanwhile(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        return operations.Declined(operations.Decline.ORIGINAL_NOT_ALLOWED)

    monkeypatch.setattr(operations, "refund", voided_meanwhile)
    assert harness.refund(terminal, DIAMOND, original, batch_trace, 5000).code == "22"


def test_refund_outside_the_window_is_22(harness: Harness) -> None:
    """Huangpu Coffee refunds within 7 days of business date."""
    terminal = harness.signed_on("20000001")
    _, original = harness.redeem(terminal, DIAMOND, 1000)
    harness.clock.advance(timedelta(days=8))
    terminal.adopt_sign_on(harness.send(terminal, terminal.sign_on()))
    batch_trace = "000001" + original.text(11)
    assert harness.refund(terminal, DIAMOND, original, batch_trace, 500).code == "22"


def test_repeated_request_gets_the_stored_answer_and_changes_nothing(harness: Harness) -> None:
    """The same redemption sent twice: the same answer, points taken once."""
    terminal = harness.signed_on()
    request, first = harness.redeem(terminal, DIAMOND, 1000)
    second = harness.send(terminal, request)
    assert second.fields == first.fields
    _, after = harness.redeem(terminal, DIAMOND, 1000)
    assert after.balance == 50000 - 2 * 500


def test_different_request_with_a_used_trace_is_94(harness: Harness) -> None:
    """Another amount under the same terminal, batch and trace: 94."""
    terminal = harness.signed_on()
    harness.redeem(terminal, DIAMOND, 1000)
    terminal.trace -= 1
    _, answer = harness.redeem(terminal, DIAMOND, 2000)
    assert answer.code == "94"


def _reversal(harness: Harness, terminal, request: bytes, reason: str = "98") -> bytes:  # type: ignore[no-untyped-def]
    _, fields, _, _ = parse(request)
    for number in (26, 35, 52, 53, 62, 37, 64):
        fields.pop(number, None)
    fields[39] = reason
    return terminal.signed("0400", fields)


def test_reversal_undoes_a_redemption_and_repeats_change_nothing(harness: Harness) -> None:
    """A redemption whose answer was lost is reversed: its points come back, once."""
    terminal = harness.signed_on()
    request, _ = harness.redeem(terminal, DIAMOND, 12800)
    reversal = _reversal(harness, terminal, request)
    assert harness.send(terminal, reversal).code == "00"
    assert harness.send(terminal, reversal).code == "00"
    _, balance = harness.redeem(terminal, DIAMOND, 1000)
    assert balance.balance == 50000 - 500


def test_a_reversal_whose_amount_differs_is_64_and_changes_nothing(harness: Harness) -> None:
    """§4.6: a reversal carries its original's amount (the one requested); another amount is
    `64`, and the points stay taken."""
    terminal = harness.signed_on()
    request, sale = harness.redeem(terminal, DIAMOND, 12800)
    assert sale.code == "00"
    _, fields, _, _ = parse(request)
    for number in (26, 35, 52, 53, 62, 37, 64):
        fields.pop(number, None)
    fields[39] = "98"
    wrong = terminal.signed("0400", {**fields, 4: f"{12700:012d}"})
    assert harness.send(terminal, wrong).code == "64"
    with unit_of_work(harness.engine) as session:
        held = operations.balances(session, DIAMOND, harness.clock.now()).ledger_points
    assert held == sale.balance


def test_reversal_before_its_original_makes_the_original_94(harness: Harness) -> None:
    """The reversal arrives first: 00, and the original is declined 94 when it comes."""
    terminal = harness.signed_on()
    fields = terminal.card_fields(DIAMOND, "2906")
    request = terminal.financial("0200", "000000", "22", fields, amount_fen=1000)
    assert harness.send(terminal, _reversal(harness, terminal, request)).code == "00"
    assert harness.send(terminal, request).code == "94"


def test_settlement_balanced_then_batch_closes_and_repeat_is_stored(harness: Harness) -> None:
    """0500 with matching totals: result 1, the next batch opens, a repeat gets the same."""
    terminal = harness.signed_on()
    harness.redeem(terminal, DIAMOND, 12800)
    harness.redeem(terminal, DIAMOND, 1000)
    totals = f"{13800:012d}{2:03d}{0:012d}{0:03d}0" + "0" * 31
    fields = {11: terminal.next_trace(), **terminal.ids(), 48: totals, 49: "156"}
    fields.update({60: f"00{terminal.batch}201", 63: "01 "})
    request = terminal.signed("0500", fields)
    answer = harness.send(terminal, request)
    assert answer.code == "00"
    assert answer.text(48)[30] == "1"
    assert answer.text(48)[:30] == totals[:30]
    assert harness.send(terminal, request).fields == answer.fields
    terminal2 = harness.signed_on()
    assert terminal2.batch == "000002"


def test_settlement_unbalanced_answers_our_totals(harness: Harness) -> None:
    """Totals that disagree: result 2 and the gateway's own totals."""
    terminal = harness.signed_on()
    harness.redeem(terminal, DIAMOND, 12800)
    totals = f"{1:012d}{1:03d}{0:012d}{0:03d}0" + "0" * 31
    fields = {11: terminal.next_trace(), **terminal.ids(), 48: totals, 49: "156"}
    fields.update({60: f"00{terminal.batch}201", 63: "01 "})
    request = terminal.signed("0500", fields)
    reply = harness.gateway.handle(request)
    assert reply.event["why"] == "not balanced"  # the code is 00 either way: the log says
    assert reply.payload is not None
    answer = terminal.check(request, reply.payload)
    assert answer.text(48)[30] == "2"
    assert answer.text(48)[:15] == f"{12800:012d}001"


def _settle(harness: Harness, terminal: SpecTerminal, field48: str) -> Answer:
    fields = {11: terminal.next_trace(), **terminal.ids(), 48: field48, 49: "156"}
    fields.update({60: f"00{terminal.batch}201", 63: "01 "})
    return harness.send(terminal, terminal.signed("0500", fields))


@pytest.mark.parametrize(
    "foreign",
    [
        "7" + "0" * 31,  # the result digit
        "0" + f"{100:012d}{1:03d}{0:012d}{0:03d}0",  # foreign debits
        "0" + "0" * 30 + "1",  # the foreign result digit
    ],
)
def test_settlement_needs_result_0_and_zero_foreign_totals(harness: Harness, foreign: str) -> None:
    """§4.7: field 48 of a 0500 carries result 0 and the foreign cards' 31 digits all zeros;
    anything else is 30, and the batch stays open."""
    terminal = harness.signed_on()
    assert _settle(harness, terminal, "0" * 30 + foreign).code == "30"
    answer = _settle(harness, terminal, "0" * 62)
    assert (answer.code, answer.text(48)[30]) == ("00", "1")
    assert harness.signed_on().batch == "000002"


def test_a_batch_upload_goes_to_the_batch_just_settled(harness: Harness) -> None:
    """0320 is for the batch just settled (§4.7): the open batch, or one settled before
    that, gets 22."""
    terminal = harness.signed_on()
    for _ in range(2):
        assert _settle(harness, terminal, "0" * 62).code == "00"
        terminal = harness.signed_on()
    assert terminal.batch == "000003"
    terminal.trace = 100  # traces of their own: each sign-on above started them over
    record = "00" + "000001" + DIAMOND.zfill(20) + f"{1000:012d}"
    codes = []
    for batch in ("000001", "000002", "000003"):
        fields = {11: terminal.next_trace(), **terminal.ids(), 48: "01" + record}
        fields[60] = f"00{batch}201"
        codes.append(harness.send(terminal, terminal.signed("0320", fields)).code)
    assert codes == ["22", "00", "22"]


def test_after_batch_999999_the_upload_and_a_repeated_settlement_find_it(
    harness: Harness,
) -> None:
    """Batch 999999 settled, the next is 000001 (§2's wrap): the settlement sent again gets
    its stored answer, and the upload for 999999 (the batch just settled) is taken."""
    with unit_of_work(harness.engine) as session:
        terminal_row = session.get(Terminal, "10000001")
        assert terminal_row is not None
        terminal_row.open_batch_number = 999999
        records.open_batch(session, "10000001").batch_number = 999999
    terminal = harness.signed_on()
    assert terminal.batch == "999999"
    _, sale = harness.redeem(terminal, DIAMOND, 1000)
    sale_trace = f"{terminal.trace:06d}"
    fields = {11: terminal.next_trace(), **terminal.ids(), 48: "0" * 62, 49: "156"}
    settlement = terminal.signed("0500", {**fields, 60: "00999999201", 63: "01 "})
    first = harness.send(terminal, settlement)
    assert (first.code, first.text(48)[30]) == ("00", "2")  # unbalanced: the sale is ours
    assert harness.send(terminal, settlement).fields == first.fields
    record = "00" + sale_trace + DIAMOND.zfill(20) + f"{1000:012d}"
    fields = {11: terminal.next_trace(), **terminal.ids(), 48: "01" + record}
    assert harness.send(terminal, terminal.signed("0320", {**fields, 60: "00999999201"})).code == (
        "00"
    )
    assert harness.signed_on().batch == "000001"
    assert sale.code == "00"


@pytest.mark.parametrize("field60", ["22000001", "220000010", "2200000100002"])
def test_a_field_60_of_other_than_11_or_14_digits_is_30(harness: Harness, field60: str) -> None:
    """§3: every request sends 60.1-60.3 (11 digits), financial ones 60.1-60.6 (14). Any
    other length is a format error, even when the combination could not be told apart."""
    terminal = harness.signed_on()
    fields = terminal.card_fields(DIAMOND, "2906")
    request = terminal.financial("0200", "000000", "22", fields, amount_fen=1000)
    _, parsed, _, _ = parse(request)
    parsed.pop(64)
    parsed[60] = field60
    assert harness.send(terminal, terminal.signed("0200", parsed)).code == "30"


def test_both_pin_fields_or_trace_000000_are_30(harness: Harness) -> None:
    """A PIN block in 52 and in 62 at once fits neither PIN group: 30, answered (it used to
    close the link). A trace of 000000 is outside §2's 000001-999999: 30."""
    terminal = harness.signed_on()
    fields = terminal.card_fields(GOLD_PIN, "2812", pin="123456")
    block = fields[52]
    fields[62] = block if isinstance(block, bytes) else b""
    request = terminal.financial("0200", "000000", "22", fields, amount_fen=1000)
    assert harness.send(terminal, request).code == "30"
    card = terminal.card_fields(DIAMOND, "2906")
    terminal.trace = 999999  # the next is 000001 after a wrap; 000000 is made by hand
    request = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
    _, parsed, _, _ = parse(request)
    parsed.pop(64)
    parsed[11] = "000000"
    assert harness.send(terminal, terminal.signed("0200", parsed)).code == "30"


def test_a_bad_value_before_41_and_42_is_answered_30_with_11_41_42_and_60(
    harness: Harness,
) -> None:
    """§2, §7: a non-digit nibble in field 4 (fixed length) or an F pad in field 35 (its
    prefix reads) leaves 11, 41, 42 and 60 readable behind it: `30`, echoing them (§4),
    where the link used to close."""
    terminal = harness.signed_on()
    card = terminal.card_fields(DIAMOND, "2906")
    request = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
    payload = bytearray(request)
    field4 = 13 + 8 + 3  # envelope and MTI, bitmap, field 3
    payload[field4 + 5] = 0x0A
    answer = harness.raw(bytes(payload))
    assert answer is not None
    _, fields, _, _ = parse(answer)
    assert fields[39] == "30"
    _, sent, _, _ = parse(request)
    assert {number: fields[number] for number in (11, 41, 42)} == {
        number: sent[number] for number in (11, 41, 42)
    }
    assert fields[60][:8] == sent[60][:8]
    assert 64 not in fields
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"  # nothing was taken


def test_missing_field_is_30_and_unknown_field_bit_is_30(harness: Harness) -> None:
    """Without 25: 30. An unknown bit after 42: 30 from what was read; before 11: closed."""
    terminal = harness.signed_on()
    fields = terminal.card_fields(DIAMOND, "2906")
    request = terminal.financial("0200", "000000", "22", fields, amount_fen=1000)
    _, parsed, _, _ = parse(request)
    del parsed[25]
    parsed.pop(64)
    assert harness.send(terminal, terminal.signed("0200", parsed)).code == "30"
    payload = bytearray(request)
    payload[13 + 5] |= 0x20  # bit 43: after 11, 41 and 42, so they can be answered
    answer = harness.raw(bytes(payload))
    assert answer is not None
    assert parse(answer)[1][39] == "30"
    payload = bytearray(request)
    payload[13] |= 0x08  # bit 5: before 11, 41 and 42, nothing to answer with
    assert harness.raw(bytes(payload)) is None


def test_unanswerable_frame_closes_the_link(harness: Harness) -> None:
    """An unlisted MTI or bytes with nothing readable: no answer, the link closes."""
    assert harness.raw(b"\x60\x00\x03\x00\x00" + bytes(6) + b"\x01\x00" + bytes(8)) is None
    assert harness.raw(b"") is None


@pytest.mark.parametrize("mti", ["0210", "0230", "0330", "0410", "0510", "0810", "0830"])
def test_a_response_mti_closes_its_link_and_the_group_is_answered(
    harness: Harness, mti: str
) -> None:
    """A terminal that sends a response's MTI gets no answer (an answer MTI + 10 would not
    exist) and its link closes; the redemption in the same group is approved all the same,
    and so is one behind it whose frame is cut short (its partial message has 11, 41, 42)."""
    terminal = harness.signed_on()
    card = terminal.card_fields(DIAMOND, "2906")
    stranger = build(mti, {11: "000001", 41: "XXXXXXXX", 42: "000000000000000", 60: "00"})
    cut_short = build(mti, {**terminal.ids(), 11: "000002", 60: "00000001"})[:-1]
    group = [
        terminal.financial("0200", "000000", "22", card, amount_fen=1000),
        stranger,
        cut_short,
        terminal.financial("0200", "000000", "22", card, amount_fen=1000),
    ]
    replies = harness.gateway.handle_group(group)
    assert [reply.payload is None for reply in replies] == [False, True, True, False]
    assert [reply.event.get("reason") for reply in replies[1:3]] == ["MTI", "MTI"]
    answers = answered(terminal, group[::3], replies[::3])
    assert [answer.code for answer in answers] == ["00", "00"]
    assert answers[1].balance == 50000 - 2 * 500


@source_only
@pytest.mark.parametrize("where", ["prepare", "ledger"])
def test_a_bug_behind_a_sign_on_costs_the_committed_part_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A sign-on cuts its group: what follows it waits for its commit. A bug (not a decline)
    in a request after the cut closes links (its own, or in the ledger the rest's), never
    those of the part already committed, which are answered."""
    first, other = harness.signed_on(), harness.terminal("20000001")
    card = first.card_fields(DIAMOND, "2906")
    redemption = first.financial("0200", "000000", "22", card, amount_fen=1000)
    poisoned = first.financial("0200", "000000", "22", card, amount_fen=4242)
    sign_on = other.sign_on()
    echo = build("0820", {11: other.next_trace(), **other.ids(), 60: "00000001301"})
    if where == "prepare":
        original_prepare = Gateway._prepare

        def failing_prepare(self: Gateway, payload: bytes, *args):  # type: ignore[no-untyped-def]
            if payload == poisoned:
                raise RuntimeError("a bug")
            return original_prepare(self, payload, *args)

        monkeypatch.setattr(Gateway, "_prepare", failing_prepare)
        closed = [False, False, False, True]
    else:
        original_ledger = Gateway._in_ledger

        def failing_ledger(self: Gateway, pending):  # type: ignore[no-untyped-def]
            if any(request.payload == poisoned for _, request, _ in pending):
                raise RuntimeError("a bug")
            return original_ledger(self, pending)

        monkeypatch.setattr(Gateway, "_in_ledger", failing_ledger)
        closed = [False, False, True, True]
    replies = harness.gateway.handle_group([redemption, sign_on, echo, poisoned])
    assert [reply.payload is None for reply in replies] == closed
    assert replies[3].event == {"event": "closed", "reason": "internal error"}
    assert first.check(redemption, replies[0].payload).code == "00"  # type: ignore[arg-type]
    assert other.check(sign_on, replies[1].payload).code == "00"  # type: ignore[arg-type]


def answered(terminal: SpecTerminal, requests: list[bytes], replies: list[Reply]) -> list[Answer]:
    """Each reply checked against its request (every one must have been answered)."""
    results = []
    for request, reply in zip(requests, replies, strict=True):
        assert reply.payload is not None
        results.append(terminal.check(request, reply.payload))
    return results


def test_an_unsupported_combination_is_12_after_94_and_is_recorded(harness: Harness) -> None:
    """(0200, 000000, 60.1 23) is no combination of §3. Reusing an approved redemption's
    identity it gets 94 (§6 puts 94 before 12); with a trace of its own, 12, recorded like
    any 0200 (§8): sent again, the same answer; another request with its trace, 94."""
    terminal = harness.signed_on()
    card = terminal.card_fields(DIAMOND, "2906")
    redemption = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
    assert harness.send(terminal, redemption).code == "00"
    terminal.trace -= 1
    reused = terminal.financial("0200", "000000", "23", card, amount_fen=1000)
    assert harness.send(terminal, reused).code == "94"
    unsupported = terminal.financial("0200", "000000", "23", card, amount_fen=1000)
    answer = harness.send(terminal, unsupported)
    assert answer.code == "12"
    assert 37 in answer.fields and 64 not in answer.fields
    assert harness.send(terminal, unsupported).fields == answer.fields
    terminal.trace -= 1
    other = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
    assert harness.send(terminal, other).code == "94"


def test_a_group_commits_once_and_answers_each_request(harness: Harness) -> None:
    """In one group: a redemption, its exact repeat, another request reusing its trace, and a
    second redemption: approved, the stored answer, 94, approved, and the points taken twice."""
    terminal = harness.signed_on()
    card = terminal.card_fields(DIAMOND, "2906")
    first = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
    terminal.trace -= 1
    reused = terminal.financial("0200", "000000", "22", card, amount_fen=2000)
    second = terminal.financial("0200", "000000", "22", card, amount_fen=1000)
    group = [first, first, reused, second]
    answers = answered(terminal, group, harness.gateway.handle_group(group))
    assert [a.code for a in answers] == ["00", "00", "94", "00"]
    assert answers[1].fields == answers[0].fields
    assert answers[3].balance == 50000 - 2 * 500


@source_only
def test_one_failing_request_does_not_cost_the_group(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose ledger work fails gets 96 and changes nothing; the others are approved."""
    terminal = harness.signed_on()
    card = terminal.card_fields(DIAMOND, "2906")
    requests = [
        terminal.financial("0200", "000000", "22", card, amount_fen=amount)
        for amount in (100, 200, 300)
    ]
    original = Transactions._redemption_verdict  # the one-request path and runs both use it

    def failing(self: Transactions, context, *args):  # type: ignore[no-untyped-def]
        if context.amount_fen == 200:
            raise OperationalError("insert", {}, Exception("disk I/O error"))
        return original(self, context, *args)

    monkeypatch.setattr(Transactions, "_redemption_verdict", failing)
    answers = answered(terminal, requests, harness.gateway.handle_group(requests))
    assert [answer.code for answer in answers] == ["00", "96", "00"]
    monkeypatch.setattr(Transactions, "_redemption_verdict", original)
    _, after = harness.redeem(terminal, DIAMOND, 1000)
    assert after.balance == 50000 - 50 - 150 - 500


def _fill_batch(harness: Harness, kind: AuthorisationKind, first_trace: int) -> None:
    """999 approved authorisations of one kind in terminal 10000001's open batch."""
    at = harness.clock.now()
    rows = [
        {
            "rrn": f"{first_trace + index:012d}",
            "kind": kind,
            "terminal_id": "10000001",
            "merchant_id": "898310048990001",
            "batch_number": 1,
            "trace": first_trace + index,
            "card_number": DIAMOND,
            "amount_fen": 100,
            "response_code": "00",
            "local_time": at,
            "business_date": at.date(),
            "state": AuthorisationState.APPROVED,
        }
        for index in range(999)
    ]
    with unit_of_work(harness.engine) as session:
        session.execute(insert(Authorisation), rows)


def test_the_thousandth_debit_or_credit_of_a_batch_is_61(harness: Harness) -> None:
    """A batch holds 999 debits and 999 credits: the one that would pass either gets 61."""
    terminal = harness.signed_on()
    _, original = harness.redeem(terminal, DIAMOND, 1000)
    assert original.code == "00"
    terminal.trace = 5000
    _fill_batch(harness, AuthorisationKind.REDEMPTION, 10000)
    assert harness.redeem(terminal, DIAMOND, 100)[1].code == "61"
    batch_trace = terminal.batch + original.text(11)
    assert harness.refund(terminal, DIAMOND, original, batch_trace, 100).code == "00"
    _fill_batch(harness, AuthorisationKind.REFUND, 20000)
    assert harness.refund(terminal, DIAMOND, original, batch_trace, 100).code == "61"


@source_only  # the bound is a compiled constant in the native build
def test_a_batch_whose_debits_or_credits_would_pass_field_48s_twelve_digits_gets_61(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§4.7: field 48's amounts are n12. A redemption that would take the batch's debits
    past them is refused `61`, as the 1,000th item is (before, the 0500 could not be
    answered, ever, and its group failed with it); credits likewise. The bound is lowered
    here to 2,500 fen so that three redemptions reach it."""
    monkeypatch.setattr("gateway.transactions.MAX_BATCH_TOTAL_FEN", 2500)
    terminal = harness.signed_on()
    for _ in range(2):
        assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "00"
    assert harness.redeem(terminal, DIAMOND, 1000)[1].code == "61"
    assert harness.redeem(terminal, DIAMOND, 500)[1].code == "00"  # 2,500: the bound itself
    totals = f"{2500:012d}{3:03d}{0:012d}{0:03d}0" + "0" * 31
    settled = _settle(harness, terminal, totals)
    assert (settled.code, settled.text(48)[:31]) == ("00", totals[:30] + "1")

"""Card cryptography (pos-8583.md §5): known answers, refusals that leak nothing, round trips."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcodec.crypto import (
    Suite,
    WorkingKeys,
    check_value,
    decrypt_ecb,
    decrypt_pin,
    decrypt_track,
    encrypt_ecb,
    encrypt_pin,
    encrypt_track,
    generate_working_keys,
    mac,
    pin_block,
    unwrap_working_keys,
    verify_mac,
    wrap_working_keys,
)
from cardcodec.errors import CodecError, PinBlockError
from tests.vectors import SuiteCase, suite_cases

CASES = suite_cases()
CASE_IDS = [case.id for case in CASES]
MAC_FRAMES = (
    "redemption_frame",
    "redemption_encrypted_track_frame",
    "redemption_with_pin_frame",
    "redemption_response_frame",
)
# LEN(2) + TPDU(5) + HEADER(6): the MAC input starts at the MTI (§1, §5.1).
MTI_OFFSET = 13
CARD = "6688001234567890124"
KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")

suites = st.sampled_from(list(Suite))
keys = st.binary(min_size=16, max_size=16)
card_numbers = st.text(alphabet="0123456789", min_size=13, max_size=19)


def assert_no_secret(error: BaseException, *secrets: bytes | str) -> None:
    """The error's text contains none of the secrets, neither as text nor as hex."""
    text = str(error) + repr(error)
    for secret in secrets:
        if isinstance(secret, str):
            assert secret not in text
        else:
            assert secret.hex() not in text.lower()
            assert repr(secret) not in text


def seal_pin_digits(suite: Suite, pik: bytes, digits: str, tail: bytes = b"") -> bytes:
    """Encrypt a hand-made 16-nibble PIN field (XORed with CARD's PAN field) as a terminal would."""
    clear = bytes.fromhex(digits)
    pan = bytes.fromhex("0000" + CARD[-13:-1])
    block = bytes(a ^ b for a, b in zip(clear, pan, strict=True))
    if suite is Suite.SM4:
        block += tail or bytes(8)
    return encrypt_ecb(suite, pik, block)


# Known answers (../shared/vectors/crypto.json)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_check_values_match_vectors(case: SuiteCase) -> None:
    """The KCV of the TMK, PIK, MAK and TDK are the vectors' values."""
    for name, expected in case.data["kcv"].items():
        assert check_value(case.suite, getattr(case, name)) == bytes.fromhex(expected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_wrap_working_keys_gives_vector_field62(case: SuiteCase) -> None:
    """Wrapping the case's PIK, MAK and TDK under its TMK gives the vector's 60-byte field 62."""
    keys = WorkingKeys(pik=case.pik, mak=case.mak, tdk=case.tdk)
    assert wrap_working_keys(case.suite, case.tmk, keys) == case.frame("field62_with_tdk")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unwrap_working_keys_gives_vector_keys(case: SuiteCase) -> None:
    """Unwrapping the vector's field 62 gives the case's PIK, MAK and TDK back."""
    keys = unwrap_working_keys(case.suite, case.tmk, case.frame("field62_with_tdk"))
    assert keys == WorkingKeys(pik=case.pik, mak=case.mak, tdk=case.tdk)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_field62_without_tdk_is_the_first_40_bytes(case: SuiteCase) -> None:
    """Without a TDK, field 62 is 40 bytes (PIK and MAK) and unwraps with tdk None."""
    field62 = wrap_working_keys(case.suite, case.tmk, WorkingKeys(pik=case.pik, mak=case.mak))
    assert field62 == case.frame("field62_with_tdk")[:40]
    assert unwrap_working_keys(case.suite, case.tmk, field62).tdk is None


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pin_block_matches_vectors(case: SuiteCase) -> None:
    """The clear and encrypted PIN blocks are the vectors', and the encrypted one gives the PIN."""
    assert pin_block(case.pin, case.card_number) == case.frame("pin_block_clear")
    encrypted = encrypt_pin(case.suite, case.pik, case.pin, case.card_number)
    assert encrypted == case.frame("pin_block_encrypted")
    assert len(encrypted) == case.suite.block_size
    assert decrypt_pin(case.suite, case.pik, encrypted, case.card_number) == case.pin


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_track_encryption_matches_vectors(case: SuiteCase) -> None:
    """The clear track encrypts to the vector's track and decrypts back."""
    clear, encrypted = case.data["track2_clear"], case.data["track2_encrypted"]
    assert encrypt_track(case.suite, case.tdk, clear) == encrypted
    assert decrypt_track(case.suite, case.tdk, encrypted) == clear


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mac_of_vector_input(case: SuiteCase) -> None:
    """The MAC of the vector's MAC input is its field 64, as 8 upper-case hex ASCII bytes."""
    mac_input = case.frame("redemption_mac_input")
    expected = case.data["redemption_field64_ascii"].encode("ascii")
    assert mac(case.suite, case.mak, mac_input) == expected
    assert verify_mac(case.suite, case.mak, mac_input, expected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mac_input_is_frame_from_mti_to_before_field64(case: SuiteCase) -> None:
    """The vectors' MAC input is the redemption frame from the MTI up to its last 8 bytes."""
    frame = case.frame("redemption_frame")
    assert frame[MTI_OFFSET:-8] == case.frame("redemption_mac_input")


@pytest.mark.parametrize("frame_name", MAC_FRAMES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vector_frame_macs_verify(case: SuiteCase, frame_name: str) -> None:
    """Each vector frame's field 64 is the MAC of its bytes from the MTI to before field 64."""
    frame = case.frame(frame_name)
    assert verify_mac(case.suite, case.mak, frame[MTI_OFFSET:-8], frame[-8:])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_verify_mac_rejects_changes(case: SuiteCase) -> None:
    """A changed byte of input, a changed MAC, a short MAC or another MAK fails verification."""
    frame = case.frame("redemption_frame")
    mac_input, received = frame[MTI_OFFSET:-8], frame[-8:]
    changed = bytes([mac_input[0] ^ 0x01]) + mac_input[1:]
    assert not verify_mac(case.suite, case.mak, changed, received)
    other_last = b"1" if received.endswith(b"0") else b"0"
    assert not verify_mac(case.suite, case.mak, mac_input, received[:7] + other_last)
    assert not verify_mac(case.suite, case.mak, mac_input, received[:7])
    assert not verify_mac(case.suite, case.pik, mac_input, received)


# Refusals, and what they must not say


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("name", "kcv_at"), [("PIK", 16), ("MAK", 36), ("TDK", 56)])
def test_unwrap_refuses_wrong_kcv(case: SuiteCase, name: str, kcv_at: int) -> None:
    """A KCV that does not match its key is refused for field 62, naming the key, not its bytes."""
    field62 = bytearray(case.frame("field62_with_tdk"))
    field62[kcv_at] ^= 0x01
    with pytest.raises(CodecError, match=f"{name} check value") as caught:
        unwrap_working_keys(case.suite, case.tmk, bytes(field62))
    assert caught.value.field == 62
    assert_no_secret(caught.value, case.tmk, case.pik, case.mak, case.tdk, bytes(field62))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unwrap_refuses_wrong_tmk(case: SuiteCase) -> None:
    """Field 62 unwrapped under another TMK fails its first KCV check."""
    other_tmk = bytes(b ^ 0x10 for b in case.tmk)
    with pytest.raises(CodecError, match="PIK check value") as caught:
        unwrap_working_keys(case.suite, other_tmk, case.frame("field62_with_tdk"))
    assert_no_secret(caught.value, other_tmk, case.pik)


@pytest.mark.parametrize("length", [0, 20, 39, 41, 59, 61, 80])
def test_unwrap_refuses_wrong_length(length: int) -> None:
    """Field 62 of any length but 40 or 60 bytes is refused for field 62."""
    with pytest.raises(CodecError, match="40 or 60 bytes") as caught:
        unwrap_working_keys(Suite.TDES, KEY, bytes(length))
    assert caught.value.field == 62


KeyUse = Callable[[Suite, bytes], object]
KEY_USES: dict[str, KeyUse] = {
    "encrypt_ecb": lambda suite, key: encrypt_ecb(suite, key, bytes(16)),
    "decrypt_ecb": lambda suite, key: decrypt_ecb(suite, key, bytes(16)),
    "check_value": check_value,
    "mac": lambda suite, key: mac(suite, key, b"0200"),
    "verify_mac": lambda suite, key: verify_mac(suite, key, b"0200", b"00000000"),
    "encrypt_pin": lambda suite, key: encrypt_pin(suite, key, "123456", CARD),
    "encrypt_track": lambda suite, key: encrypt_track(suite, key, "1" * 37),
    "wrap": lambda suite, key: wrap_working_keys(suite, key, WorkingKeys(pik=KEY, mak=KEY)),
    "unwrap": lambda suite, key: unwrap_working_keys(suite, key, bytes(40)),
}


@pytest.mark.parametrize("use", list(KEY_USES), ids=list(KEY_USES))
@pytest.mark.parametrize("length", [0, 8, 15, 17, 24, 32])
@pytest.mark.parametrize("suite", list(Suite), ids=[suite.value for suite in Suite])
def test_wrong_key_length_is_refused(suite: Suite, length: int, use: str) -> None:
    """Every operation refuses a key that is not 16 bytes, without showing the key."""
    key = bytes(range(0xA0, 0xA0 + length))
    with pytest.raises(CodecError, match="key is not 16 bytes") as caught:
        KEY_USES[use](suite, key)
    assert caught.value.part == "key"
    if key:
        assert_no_secret(caught.value, key)


@pytest.mark.parametrize("length", [15, 17])
def test_working_keys_refuse_wrong_length(length: int) -> None:
    """WorkingKeys refuses a key that is not 16 bytes."""
    with pytest.raises(CodecError, match="working key is not 16 bytes"):
        WorkingKeys(pik=KEY, mak=bytes(length))


@pytest.mark.parametrize(("suite", "length"), [(Suite.TDES, 12), (Suite.SM4, 8), (Suite.SM4, 24)])
def test_ecb_refuses_partial_blocks(suite: Suite, length: int) -> None:
    """ECB data that is not a whole number of blocks is refused."""
    with pytest.raises(CodecError, match="not a multiple"):
        encrypt_ecb(suite, KEY, bytes(length))
    with pytest.raises(CodecError, match="not a multiple"):
        decrypt_ecb(suite, KEY, bytes(length))


def test_working_keys_repr_hides_keys() -> None:
    """Neither repr nor str of WorkingKeys shows any key byte."""
    keys = WorkingKeys(pik=KEY, mak=bytes(range(16)), tdk=bytes(range(16, 32)))
    for text in (repr(keys), str(keys), f"{keys!r}"):
        for key in (keys.pik, keys.mak, keys.tdk):
            assert key is not None
            assert key.hex() not in text.lower()
            assert repr(key) not in text
    assert repr(WorkingKeys(pik=KEY, mak=KEY)).endswith("tdk=None)")


BAD_PIN_FIELDS = {
    "control nibble 1": ("16123456FFFFFFFF", "not format 0"),
    "control nibble F": ("F6123456FFFFFFFF", "not format 0"),
    "length 0": ("00FFFFFFFFFFFFFF", "length is not 4 to 12"),
    "length 3": ("03123FFFFFFFFFFF", "length is not 4 to 12"),
    "length 13": ("0D1234567890123F", "length is not 4 to 12"),
    "length F": ("0F12345678901234", "length is not 4 to 12"),
    "non-digit A": ("06123A56FFFFFFFF", "non-digit"),
    "non-digit F": ("0612345FFFFFFFFF", "non-digit"),
    "pad 0": ("06123456FFFFFFF0", "padding is not F"),
    "pad E": ("06123456EFFFFFFF", "padding is not F"),
}


@pytest.mark.parametrize("defect", list(BAD_PIN_FIELDS), ids=list(BAD_PIN_FIELDS))
@pytest.mark.parametrize("suite", list(Suite), ids=[suite.value for suite in Suite])
def test_decrypt_pin_refuses_invalid_format0_blocks(suite: Suite, defect: str) -> None:
    """A block that decrypts to an invalid format 0 field raises PinBlockError for 52 or 62."""
    digits, reason = BAD_PIN_FIELDS[defect]
    block = seal_pin_digits(suite, KEY, digits)
    with pytest.raises(PinBlockError, match=reason) as caught:
        decrypt_pin(suite, KEY, block, CARD)
    assert caught.value.field == (52 if suite is Suite.TDES else 62)
    assert_no_secret(caught.value, KEY, block, "123456")


@pytest.mark.parametrize("tail", [bytes(7) + b"\x01", b"\x80" + bytes(7), b"\xff" * 8])
def test_decrypt_pin_refuses_sm4_nonzero_tail(tail: bytes) -> None:
    """An SM4 PIN block whose last 8 clear bytes are not zero raises PinBlockError for 62."""
    block = seal_pin_digits(Suite.SM4, KEY, "06123456FFFFFFFF", tail)
    with pytest.raises(PinBlockError, match="tail is not zero") as caught:
        decrypt_pin(Suite.SM4, KEY, block, CARD)
    assert caught.value.field == 62
    assert_no_secret(caught.value, KEY, block, "123456")


@pytest.mark.parametrize(
    ("suite", "length"), [(Suite.TDES, 0), (Suite.TDES, 7), (Suite.TDES, 16), (Suite.SM4, 8)]
)
def test_decrypt_pin_refuses_wrong_block_length(suite: Suite, length: int) -> None:
    """A PIN block of the wrong size for the suite raises PinBlockError."""
    with pytest.raises(PinBlockError, match="PIN block is not"):
        decrypt_pin(suite, KEY, bytes(length), CARD)


@pytest.mark.parametrize("pin", ["", "123", "1234567890123", "12a4", "12 34", "١٢٣٤"])
def test_pin_block_refuses_bad_pin(pin: str) -> None:
    """A PIN that is not 4 to 12 ASCII digits is refused without being repeated."""
    with pytest.raises(CodecError, match="PIN is not 4 to 12 digits") as caught:
        pin_block(pin, CARD)
    assert not isinstance(caught.value, PinBlockError)
    if pin:
        assert_no_secret(caught.value, pin)


@pytest.mark.parametrize("card", ["668800123456", "66880012345678901240", "668800123456789012D"])
def test_pin_operations_refuse_bad_card_number(card: str) -> None:
    """A card number that is not 13-19 digits is a CodecError, not a bad PIN block."""
    with pytest.raises(CodecError, match="card number") as caught:
        pin_block("1234", card)
    assert_no_secret(caught.value, card)
    block = encrypt_pin(Suite.TDES, KEY, "1234", CARD)
    with pytest.raises(CodecError, match="card number") as caught:
        decrypt_pin(Suite.TDES, KEY, block, card)
    assert not isinstance(caught.value, PinBlockError)


@pytest.mark.parametrize(("suite", "shortest"), [(Suite.TDES, 17), (Suite.SM4, 33)])
def test_track_shorter_than_block_plus_one_byte_is_refused(suite: Suite, shortest: int) -> None:
    """A track of fewer than B + 1 packed bytes is refused for field 35; B + 1 bytes is enough."""
    for transform in (encrypt_track, decrypt_track):
        assert len(transform(suite, KEY, "1" * shortest)) == shortest
        with pytest.raises(CodecError, match="shorter than") as caught:
            transform(suite, KEY, "1" * (shortest - 1))
        assert caught.value.field == 35
        assert_no_secret(caught.value, KEY, "1" * (shortest - 1))
    with pytest.raises(CodecError, match="shorter than"):
        encrypt_track(suite, KEY, "")


@pytest.mark.parametrize("track", ["6688001234567890124=2812101", "6688 0012345678901242812"])
def test_track_refuses_non_hex(track: str) -> None:
    """A track with anything but hex nibbles is refused for field 35 without being repeated."""
    with pytest.raises(CodecError, match="not hex") as caught:
        encrypt_track(Suite.TDES, KEY, track)
    assert caught.value.field == 35
    assert_no_secret(caught.value, track)


# Key generation


def draws_from(blocks: list[bytes]) -> Callable[[int], bytes]:
    """A random source that gives the listed 16-byte blocks in order."""
    supply: Iterator[bytes] = iter(blocks)
    return lambda size: next(supply)


EQUAL_HALVES = bytes.fromhex("0123456789ABCDEF0123456789ABCDEF")
PARITY_ONLY = bytes.fromhex("0123456789ABCDEF0022446688AACCEE")


def test_generate_3des_draws_again_for_equal_halves() -> None:
    """3DES skips draws whose halves are equal, also when they differ only in parity bits."""
    source = draws_from([EQUAL_HALVES, PARITY_ONLY, KEY, EQUAL_HALVES, bytes(range(16))])
    keys = generate_working_keys(Suite.TDES, with_tdk=False, random_bytes=source)
    assert keys == WorkingKeys(pik=KEY, mak=bytes(range(16)), tdk=None)


def test_generate_sm4_keeps_any_key() -> None:
    """SM4 has no halves rule: a draw with equal halves is used as it is."""
    source = draws_from([EQUAL_HALVES, KEY, bytes(range(16))])
    keys = generate_working_keys(Suite.SM4, with_tdk=True, random_bytes=source)
    assert keys == WorkingKeys(pik=EQUAL_HALVES, mak=KEY, tdk=bytes(range(16)))


def test_generate_refuses_a_broken_random_source() -> None:
    """A source that keeps repeating halves, or gives the wrong size, raises instead of looping."""
    with pytest.raises(RuntimeError, match="equal halves"):
        generate_working_keys(Suite.TDES, False, random_bytes=lambda size: EQUAL_HALVES)
    with pytest.raises(RuntimeError, match="wrong number of bytes"):
        generate_working_keys(Suite.SM4, False, random_bytes=lambda size: bytes(size - 1))


@pytest.mark.parametrize("suite", list(Suite), ids=[suite.value for suite in Suite])
def test_generated_keys_wrap_and_unwrap(suite: Suite) -> None:
    """Fresh keys from the OS source are 16 bytes each and survive field 62 both ways."""
    keys = generate_working_keys(suite, with_tdk=True)
    assert keys.tdk is not None
    assert {len(keys.pik), len(keys.mak), len(keys.tdk)} == {16}
    assert len(wrap_working_keys(suite, KEY, keys)) == 60
    assert unwrap_working_keys(suite, KEY, wrap_working_keys(suite, KEY, keys)) == keys


# Properties


def halves_differ_beyond_parity(key: bytes) -> bool:
    return any((a ^ b) & 0xFE for a, b in zip(key[:8], key[8:], strict=True))


@given(st.lists(st.binary(min_size=8, max_size=8), min_size=6, max_size=6), st.booleans())
def test_generated_3des_keys_have_different_halves(halves: list[bytes], with_tdk: bool) -> None:
    """Whatever the source gives, each 3DES key is the next draw whose halves differ."""
    blocks = [halves[i] + halves[(i + 1) % 6] for i in range(6)] + [halves[0] * 2] * 30
    eligible = [block for block in blocks if halves_differ_beyond_parity(block)]
    needed = 3 if with_tdk else 2
    if len(eligible) < needed:
        with pytest.raises(RuntimeError, match="equal halves"):
            generate_working_keys(Suite.TDES, with_tdk, random_bytes=draws_from(blocks))
        return
    keys = generate_working_keys(Suite.TDES, with_tdk, random_bytes=draws_from(blocks))
    assert [keys.pik, keys.mak] + ([keys.tdk] if with_tdk else []) == eligible[:needed]


@pytest.mark.parametrize("length", range(4, 13))
@given(suite=suites, pik=keys, card=card_numbers, data=st.data())
def test_pin_round_trip_for_every_length(
    length: int, suite: Suite, pik: bytes, card: str, data: st.DataObject
) -> None:
    """decrypt_pin(encrypt_pin(pin)) is the PIN for every valid PIN length, suite and key."""
    pin = data.draw(st.text(alphabet="0123456789", min_size=length, max_size=length))
    block = encrypt_pin(suite, pik, pin, card)
    assert len(block) == suite.block_size
    assert decrypt_pin(suite, pik, block, card) == pin


@given(suite=suites, tdk=keys, data=st.data())
def test_track_round_trip(suite: Suite, tdk: bytes, data: st.DataObject) -> None:
    """Tracks keep their length, change only the block before the last byte, and decrypt back."""
    shortest = 2 * suite.block_size + 1
    track = data.draw(st.text(alphabet="0123456789D", min_size=shortest, max_size=104))
    encrypted = encrypt_track(suite, tdk, track)
    assert len(encrypted) == len(track)
    untouched = 2 * ((len(track) + 1) // 2 - 1 - suite.block_size)
    assert encrypted[:untouched] == track[:untouched]
    assert (
        encrypted[untouched + 2 * suite.block_size :] == track[untouched + 2 * suite.block_size :]
    )
    assert decrypt_track(suite, tdk, encrypted) == track


def reference_mac(suite: Suite, mak: bytes, mac_input: bytes) -> bytes:
    """§5.1 written out block by block, as a slow model of the MAC."""
    size = suite.block_size
    padded = mac_input + bytes(-len(mac_input) % size)
    folded = bytes(size)
    for start in range(0, len(padded), size):
        folded = bytes(a ^ b for a, b in zip(folded, padded[start : start + size], strict=True))
    hex_folded = folded.hex().upper().encode("ascii")
    first = encrypt_ecb(suite, mak, hex_folded[:size])
    second = bytes(a ^ b for a, b in zip(first, hex_folded[size:], strict=True))
    return encrypt_ecb(suite, mak, second).hex().upper()[:8].encode("ascii")


@given(suite=suites, mak=keys, mac_input=st.binary(max_size=600))
def test_mac_matches_block_by_block_model(suite: Suite, mak: bytes, mac_input: bytes) -> None:
    """The MAC of any input equals the block-by-block reading of §5.1, and verifies."""
    expected = reference_mac(suite, mak, mac_input)
    assert mac(suite, mak, mac_input) == expected
    assert verify_mac(suite, mak, mac_input, expected)


@given(suite=suites, pik=keys, block=st.binary(max_size=24))
def test_decrypt_pin_of_arbitrary_bytes_fails_only_with_pin_block_error(
    suite: Suite, pik: bytes, block: bytes
) -> None:
    """Arbitrary bytes either give a 4-12 digit PIN or raise PinBlockError, nothing else."""
    try:
        pin = decrypt_pin(suite, pik, block, CARD)
    except PinBlockError:
        return
    assert 4 <= len(pin) <= 12
    assert pin.isdigit()


@given(suite=suites, tmk=keys, field62=st.binary(max_size=70))
def test_unwrap_of_arbitrary_bytes_fails_only_with_codec_error(
    suite: Suite, tmk: bytes, field62: bytes
) -> None:
    """Arbitrary field 62 bytes either unwrap to 16-byte keys or raise CodecError for 62."""
    try:
        keys = unwrap_working_keys(suite, tmk, field62)
    except CodecError as error:
        assert error.field == 62
        return
    assert len(keys.pik) == len(keys.mak) == 16

"""Properties of the settlement file: the trailer is the sum of the details, `verify` accepts
every file clearing writes and rejects every single-byte change, and the streaming Ed25519 is
the standard one. The strategies for settlement entries live here, with the tests that use
them."""

from __future__ import annotations

import itertools
import tempfile
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearing import ed25519, signing
from clearing.layout import (
    ENTRY_TYPES,
    SEQUENCE,
    Detail,
    Header,
    _parse_detail_by_field,
    _parse_good_detail,
    format_detail,
    parse_merchant,
    parse_trailer,
)
from clearing.money import merchant_fee_fen
from clearing.settlement import write_file
from clearing.signing import sign_file
from clearing.verify import verify_file
from gateway.clock import SHANGHAI
from gateway.errors import CheckFailed
from gateway.points import convert

KEY = Ed25519PrivateKey.generate()
FIRST_DAY = date(2026, 11, 1)
HEADER = Header(
    "CMCCVIP00000001", "ACQ000000000001", "202611", SEQUENCE, datetime(2026, 12, 1, tzinfo=SHANGHAI)
)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def entries(draw: st.DrawFn, merchants: list[str], number: int) -> Detail:
    """One settlement entry whose own figures agree (as clearing computes them)."""
    entry_type = draw(st.sampled_from(ENTRY_TYPES))
    conversion = convert(draw(st.integers(2, 10**9)), draw(st.integers(0, 9000)))
    settled, points, amount = conversion.settled_fen, conversion.points, conversion.amount_fen
    sign = {"22": 1, "25": -1, "23": -1}.get(entry_type) or draw(st.sampled_from([-1, 1]))
    if entry_type == "25":
        amount = draw(st.integers(1, amount))
        settled = settled * amount // conversion.amount_fen
        points = points * amount // conversion.amount_fen
    fee = merchant_fee_fen(sign * settled, draw(st.integers(0, 100)))
    day = FIRST_DAY + timedelta(days=draw(st.integers(0, 29)))
    return Detail(
        sequence=0,
        merchant_id=draw(st.sampled_from(merchants)),
        terminal_id=draw(st.sampled_from(["10000001", "10000002", "2000000A"])),
        business_date=day,
        local_time=datetime.combine(day, datetime.min.time(), SHANGHAI)
        + timedelta(seconds=draw(st.integers(0, 86399))),
        entry_type=entry_type,
        batch=draw(st.integers(1, 999999)),
        trace=draw(st.integers(1, 999999)),
        rrn=f"{number:012d}",
        card_masked="668800*********" + draw(st.from_regex(r"[0-9]{4}", fullmatch=True)),
        list_amount_fen=amount,
        discount_bp=conversion.discount_bp,
        settled_fen=sign * settled,
        points=points,
        fee_fen=fee,
        net_fen=sign * settled - fee,
        original_rrn=None if entry_type == "22" else f"{number + 500000:012d}",
    )


@st.composite
def months(draw: st.DrawFn) -> tuple[list[Detail], dict[str, int]]:
    """A month's details in §6's order, numbered, and the merchants' fee rates."""
    merchants = draw(
        st.lists(
            st.from_regex(r"[0-9A-Z]{15}", fullmatch=True), min_size=1, max_size=3, unique=True
        )
    )
    count = draw(st.integers(0, 12))
    drawn = [draw(entries(merchants, number)) for number in range(1, count + 1)]
    ordered = sorted(drawn, key=Detail.order_key)
    numbered = [detail._replace(sequence=index) for index, detail in enumerate(ordered, start=1)]
    return numbered, {merchant: draw(st.integers(0, 100)) for merchant in merchants}


def write_signed(folder: Path, details: list[Detail], fee_rates: dict[str, int]) -> Path:
    path = folder / "VIPSETTLE_ACQ000000000001_202611_001.txt"
    write_file(path, HEADER, details, fee_rates)
    path.with_name(path.name + ".sig").write_text(sign_file(KEY, path), encoding="ascii")
    return path


@FAST
@given(months())
def test_trailer_and_merchant_records_are_the_sums_of_the_details(
    month: tuple[list[Detail], dict[str, int]],
) -> None:
    """Counts, settled amounts, fees and nets of M and T records, summed here independently."""
    details, fee_rates = month
    with tempfile.TemporaryDirectory() as folder:
        path = write_signed(Path(folder), details, fee_rates)
        lines = path.read_text(encoding="ascii").splitlines()
    merchants = [parse_merchant(line, []) for line in lines if line[0] == "M"]
    trailer = parse_trailer(lines[-1], [])
    assert [m.merchant_id for m in merchants] == sorted({d.merchant_id for d in details})
    for record in merchants:
        own = [d for d in details if d.merchant_id == record.merchant_id]
        redemptions = [d for d in own if d.entry_type == "22"]
        others = [d for d in own if d.entry_type != "22"]
        assert record.redemption_count == len(redemptions)
        assert record.redemptions_fen == sum(d.settled_fen for d in redemptions)
        assert record.other_count == len(others)
        assert record.others_fen == sum(d.settled_fen for d in others)
        assert record.fees_fen == sum(d.fee_fen for d in own)
        assert record.net_fen == sum(d.settled_fen - d.fee_fen for d in own)
        assert record.fee_bp == fee_rates[record.merchant_id]
    assert trailer.detail_count == len(details)
    assert trailer.merchant_count == len(merchants)
    assert trailer.settled_fen == sum(d.settled_fen for d in details)
    assert trailer.fees_fen == sum(d.fee_fen for d in details)
    assert trailer.net_fen == trailer.settled_fen - trailer.fees_fen


@FAST
@given(months())
def test_verify_accepts_every_file_clearing_writes(
    month: tuple[list[Detail], dict[str, int]],
) -> None:
    """Whatever the entries, the written and signed file verifies with no fault."""
    with tempfile.TemporaryDirectory() as folder:
        path = write_signed(Path(folder), *month)
        result = verify_file(path, KEY.public_key())
    assert result.faults == []
    assert result.good and result.signature_good


@FAST
@given(months(), st.data())
def test_verify_rejects_every_single_byte_change(
    month: tuple[list[Detail], dict[str, int]], data: st.DataObject
) -> None:
    """Any one byte of the file or of its .sig changed: at least one fault."""
    with tempfile.TemporaryDirectory() as folder:
        path = write_signed(Path(folder), *month)
        target = data.draw(st.sampled_from([path, path.with_name(path.name + ".sig")]))
        content = bytearray(target.read_bytes())
        position = data.draw(st.integers(0, len(content) - 1))
        content[position] = data.draw(st.integers(0, 255).filter(lambda b: b != content[position]))
        target.write_bytes(bytes(content))
        result = verify_file(path, KEY.public_key())
    assert not result.good
    assert result.fault_count >= 1


@FAST
@given(months(), st.data())
def test_the_fast_detail_reader_agrees_with_the_field_by_field_one(
    month: tuple[list[Detail], dict[str, int]], data: st.DataObject
) -> None:
    """A good record reads the same both ways; a damaged one the fast reader accepts is one
    the careful reader finds no fault in."""
    details, _ = month
    for detail in details:
        record = format_detail(detail)
        faults: list[str] = []
        assert _parse_good_detail(record) == _parse_detail_by_field(record, faults)
        assert faults == []
        position = data.draw(st.integers(0, len(record) - 1))
        damaged = (
            record[:position] + data.draw(st.characters(max_codepoint=127)) + record[position + 1 :]
        )
        fast = _parse_good_detail(damaged)
        careful = _parse_detail_by_field(damaged, faults)
        if fast is not None:
            assert faults == []
            assert fast == careful


def _raw(key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return seed, public


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=4))
def test_streaming_ed25519_is_the_standard_signature(message: bytes, cuts: list[int]) -> None:
    """Signed in chunks, the signature is byte for byte cryptography's, and verifies both ways."""
    seed, public = _raw(KEY)
    points = sorted({0, len(message), *(cut % (len(message) + 1) for cut in cuts)})
    chunks = [message[start:end] for start, end in itertools.pairwise(points)]
    signature = ed25519.sign(seed, public, lambda: iter(chunks))
    assert signature == KEY.sign(message)
    assert ed25519.verify(public, signature, chunks)
    assert not ed25519.verify(public, signature, [message + b"\x00"])


def test_rfc8032_test_vectors() -> None:
    """RFC 8032 §7.1 tests 1 and 2: keys, messages and signatures as published."""
    vectors = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
    ]
    for seed, public, message, signature in vectors:
        made = ed25519.sign(
            bytes.fromhex(seed), bytes.fromhex(public), lambda m=message: [bytes.fromhex(m)]
        )
        assert made.hex() == signature
        assert ed25519.verify(bytes.fromhex(public), made, [bytes.fromhex(message)])


def test_a_message_that_changes_between_the_two_passes_is_not_signed(tmp_path: Path) -> None:
    """The nonce comes from the first pass, the challenge from the second: bytes that differ
    between them would give a signature that, beside an honest one, yields the private key.
    So nothing is signed; a file changed while `sign_file` reads it is a CheckFailed."""
    seed, public = _raw(KEY)
    passes = iter([[b"settlement"], [b"settlemenT"]])
    with pytest.raises(ed25519.MessageChangedError):
        ed25519.sign(seed, public, lambda: next(passes))
    path = tmp_path / "file.txt"
    path.write_bytes(b"A" * (3 * signing.CHUNK_BYTES))
    real_sign = ed25519.sign

    def sign_while_written(seed: bytes, public: bytes, message):  # type: ignore[no-untyped-def]
        def changing():  # type: ignore[no-untyped-def]
            yield from message()
            path.write_bytes(b"B" * (3 * signing.CHUNK_BYTES))  # after the first pass

        return real_sign(seed, public, changing)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ed25519, "sign", sign_while_written)
        with pytest.raises(CheckFailed, match="changed while it was being signed"):
            signing.sign_file(KEY, path)


def test_a_signature_with_s_above_the_group_order_is_refused() -> None:
    """S >= L is malleability, refused as OpenSSL refuses it."""
    seed, public = _raw(KEY)
    signature = ed25519.sign(seed, public, lambda: [b"file"])
    s = int.from_bytes(signature[32:], "little") + ed25519.L
    forged = signature[:32] + s.to_bytes(32, "little")
    assert not ed25519.verify(public, forged, [b"file"])
